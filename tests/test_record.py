"""The run record every result file carries: the device used, reslab's version and own commit."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reslab
from reslab.record import jsonable, reslab_commit, run_record, write_json

ROOT = Path(__file__).resolve().parents[1]
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        cwd=cwd, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip


def _repo(path: Path, project: str | None) -> Path:
    """A git repository with one commit; its pyproject.toml names ``project`` (None: none)."""
    path.mkdir(parents=True)
    _git(path, "init", "-q")
    if project is not None:
        (path / "pyproject.toml").write_text(f'[project]\nname = "{project}"\nversion = "1"\n')
    (path / "README").write_text("x\n")
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "first")
    return path


def _package(at: Path) -> Path:
    """reslab's package folder copied to ``at`` (as an installer would lay it out)."""
    shutil.copytree(ROOT / "reslab", at, ignore=shutil.ignore_patterns("__pycache__"))
    return at


def test_record_names_device_version_and_libraries() -> None:
    r = run_record("cpu", experiment="x")
    assert r["device"] == "cpu" and r["experiment"] == "x"
    assert r["reslab_version"] == reslab.__version__
    assert r["torch_version"] == torch.__version__
    assert r["num_threads"] == torch.get_num_threads()


def test_experiments_record_the_device_they_train_on(monkeypatch) -> None:
    """The experiments' metadata said "cpu" whatever device the trainer picked."""
    from reslab.analysis.training import TrainSpec, experiment_meta, recipe
    from reslab.data import load_data

    splits = load_data("digits")
    cfg = recipe("digits", 10)  # device "auto": CUDA where present, as fit resolves it
    assert experiment_meta("t", TrainSpec(), splits, cfg, quick=True)["device"] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    meta = experiment_meta("t", TrainSpec(), splits, cfg, quick=True)
    assert (meta["device"], meta["device_name"]) == ("cuda:0", "Test GPU")


@needs_git
def test_commit_of_this_checkout() -> None:
    top = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True
    )
    if top.returncode or Path(top.stdout.strip()).resolve() != ROOT:
        pytest.skip("the tests do not run from a git checkout of reslab")
    head = _git(ROOT, "rev-parse", "HEAD")
    commit = reslab_commit()
    assert commit is not None and commit.removesuffix("+dirty") == head


@needs_git
def test_commit_of_a_reslab_source_tree_and_its_uncommitted_changes(tmp_path: Path) -> None:
    src = _repo(tmp_path / "src", "reslab")
    _package(src / "reslab")
    _git(src, "add", "-A")
    _git(src, "commit", "-q", "-m", "package")
    head = _git(src, "rev-parse", "HEAD")
    assert reslab_commit(src / "reslab") == head
    with (src / "reslab" / "__init__.py").open("a") as f:
        f.write("# changed\n")
    assert reslab_commit(src / "reslab") == head + "+dirty"


@needs_git
@pytest.mark.parametrize(
    ("project", "where"),
    [
        ("other", ".venv/lib/python3.11/site-packages/reslab"),  # a venv in someone's project
        ("other", "reslab"),  # a folder named reslab in another project
        (None, "vendor/reslab"),  # a repository without a pyproject.toml
        ("reslab", ".venv/lib/python3.11/site-packages/reslab"),  # an installed copy
    ],
)
def test_no_commit_from_a_repository_that_is_not_reslabs_source(
    tmp_path: Path, project: str | None, where: str
) -> None:
    repo = _repo(tmp_path / "project", project)
    assert reslab_commit(_package(repo / where)) is None


def test_no_commit_outside_any_repository(tmp_path: Path) -> None:
    assert reslab_commit(_package(tmp_path / "site-packages" / "reslab")) is None


@needs_git
def test_installed_copy_inside_a_foreign_repository_records_no_commit(tmp_path: Path) -> None:
    """The real import path: reslab imported from a virtualenv inside another project's git
    repository, run from that project's folder. (The old record gave that project's commit.)"""
    repo = _repo(tmp_path / "project", "other")
    site = repo / ".venv" / "lib" / "python3.11" / "site-packages"
    _package(site / "reslab")
    code = (
        "import json, reslab.record as r; rec = r.run_record('cpu'); "
        "print(json.dumps([r.__file__, rec['git_revision']]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    where, commit = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(where).resolve().is_relative_to(site.resolve())  # the copy was the one imported
    assert commit is None


def test_write_json_is_strict_json_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json(path, {"nan": math.nan, "inf": -math.inf, "t": torch.tensor([1.5, math.nan])})
    text = path.read_text()
    assert json.loads(text) == {"nan": None, "inf": None, "t": [1.5, None]}
    assert "NaN" not in text and "Infinity" not in text
    with pytest.raises(TypeError):  # not JSON: refused before the old file is touched
        write_json(path, {"x": object()})
    assert json.loads(path.read_text())["t"] == [1.5, None]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert jsonable((1, Path("a"))) == [1, "a"]
