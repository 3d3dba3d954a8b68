"""Ensembles: the mean of the members' softmax, accuracy against the number of members, the
checks that every member scores the same images, and a packed run's members as an ensemble."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from reslab import create_model
from reslab.cli import main
from reslab.data import DataSplits, Normalize
from reslab.train import evaluate
from reslab.train.checkpoint import BEST, LATEST, load_model, set_input_norm
from reslab.train.ensemble import evaluate_ensemble, expand_runs, packed_members

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three short digits runs of ResNet-20 with different seeds, through the CLI (run folders
    with config.json and checkpoints, as `reslab train` writes them); a few seconds each."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ensemble")
    folders = [root / f"seed{s}" for s in SEEDS]
    for s, out in zip(SEEDS, folders, strict=True):
        assert main(["train", "--iters", "12", "--seed", str(s), "--out", str(out)]) == 0
    return folders


@pytest.fixture(scope="module")
def members(runs: list[Path], digits: DataSplits) -> list[torch.nn.Module]:
    """The three runs' models, the last given the per-pixel mean instead of the per-channel
    normalisation the digits recipe trains with: each member must be fed through its own."""
    models = [load_model(r) for r in runs]
    set_input_norm(models[2], Normalize.fit(digits.train.images, "pixel"))
    assert models[2].input_norm.mode == "pixel" and models[0].input_norm.mode == "channel"
    return models


def _softmax(model: torch.nn.Module, images: torch.Tensor, *, flip: bool = False) -> torch.Tensor:
    """A member's class probabilities, computed here without the library's batching: one
    forward pass of the whole split through the model's own normalisation."""
    with torch.no_grad():
        p = model(model.input_norm(images)).softmax(1)
        if flip:
            p = (p + model(model.input_norm(images.flip(3))).softmax(1)) / 2
    return p


@pytest.mark.parametrize("flip", [False, True], ids=["one-view", "flip"])
def test_an_ensemble_of_one_is_plain_evaluation(digits, members, flip: bool) -> None:
    model = members[2]
    plain = evaluate(model, digits.test, flip=flip, batch_size=100)
    one = evaluate_ensemble([model], digits.test, flip=flip, batch_size=100)
    for key in ("accuracy", "error", "n", "per_class_accuracy", "confusion"):
        assert one[key] == plain[key], key
    assert one["accuracy_vs_members"] == one["member_accuracy"] == [plain["accuracy"]]
    assert one["member_accuracy_mean"] == plain["accuracy"] and one["member_accuracy_std"] is None


def test_ensemble_probabilities_are_the_mean_of_the_members_softmax(digits, members) -> None:
    models = members
    flips = [False, True, False]
    report = evaluate_ensemble(
        models, digits.test, flip=flips, batch_size=100, keep_probabilities=True
    )
    images, labels = digits.test.images, digits.test.labels
    probs = [_softmax(m, images, flip=f) for m, f in zip(models, flips, strict=True)]
    expected = torch.stack(probs).mean(0)
    torch.testing.assert_close(report["probabilities"], expected, rtol=0, atol=1e-6)
    assert report["members"] == len(models)
    assert len(report["accuracy_vs_members"]) == len(models)
    for k in range(1, len(models) + 1):
        first_k = torch.stack(probs[:k]).mean(0).argmax(1)
        acc = float((first_k == labels).double().mean())
        # one image may tip: a batch of 100 and one of 359 round the convolutions differently
        assert report["accuracy_vs_members"][k - 1] == pytest.approx(acc, abs=1.5 / len(labels))
    for m, f, acc in zip(models, flips, report["member_accuracy"], strict=True):
        assert acc == evaluate(m, digits.test, flip=f)["accuracy"]
    assert report["accuracy"] == report["accuracy_vs_members"][-1]
    confusion = torch.tensor(report["confusion"])
    assert confusion.sum() == len(labels) and confusion.trace() / len(labels) == pytest.approx(
        report["accuracy"]
    )


def test_members_with_different_class_counts_are_refused(digits) -> None:
    models = [create_model("cifar_resnet20", in_channels=1, num_classes=n) for n in (10, 9)]
    with pytest.raises(ValueError, match="different numbers of classes: 10, 9"):
        evaluate_ensemble(models, digits.test)


def _eval_json(capsys, *args: str) -> list[dict]:
    capsys.readouterr()
    assert main(["eval", *args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_cli_ensemble_reports_accuracy_against_members(runs: list[Path], capsys) -> None:
    [report] = _eval_json(capsys, *map(str, runs), "--ensemble")
    singles = _eval_json(capsys, *map(str, runs))  # without --ensemble: one report per run
    assert [s["checkpoint"] for s in singles] == [str(r / BEST) for r in runs]
    assert report["members"] == len(runs) == len(report["accuracy_vs_members"])
    assert report["member_accuracy"] == [s["accuracy"] for s in singles]
    assert report["accuracy_vs_members"][0] == singles[0]["accuracy"]
    assert report["accuracy_vs_members"][-1] == report["accuracy"]
    assert report["n"] == 359 and sum(map(sum, report["confusion"])) == 359
    mean = sum(report["member_accuracy"]) / len(runs)
    assert report["member_accuracy_mean"] == pytest.approx(mean)
    assert report["member_accuracy_std"] == pytest.approx(
        torch.tensor(report["member_accuracy"]).std().item()  # sample std, as torch's default
    )
    [one] = _eval_json(capsys, str(runs[1]), "--ensemble")
    assert one["accuracy"] == singles[1]["accuracy"] and one["confusion"] == singles[1]["confusion"]


def test_cli_ensemble_text(runs: list[Path], capsys) -> None:
    capsys.readouterr()
    assert main(["eval", *map(str, runs), "--ensemble"]) == 0
    out = capsys.readouterr().out
    assert "ensemble of 3 members" in out and "members  accuracy" in out
    assert "mean ± sample std of 3" in out and out.count("checkpoint_best.pt") == 3


def test_eval_latest_checkpoint_scores_what_the_summary_reports(runs, capsys) -> None:
    [report] = _eval_json(capsys, str(runs[0]), "--checkpoint", "latest")
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert report["checkpoint"] == str(runs[0] / LATEST)
    assert report["accuracy"] == summary["test_accuracy"]


def _copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_members_with_other_classes_are_refused_in_one_line(runs, tmp_path, capsys) -> None:
    other = _copy_run(runs[1], tmp_path / "reordered")
    for name in (BEST, LATEST):
        ckpt = torch.load(other / name, weights_only=True)
        ckpt["classes"] = ckpt["classes"][::-1]  # the same names, another order
        torch.save(ckpt, other / name)
    capsys.readouterr()
    assert main(["eval", str(runs[0]), str(other), "--ensemble"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "one class list in one order: class 0 is '9'" in err and str(other) in err
    # evaluated one by one, each run is scored on its own classes
    assert main(["eval", str(runs[0]), str(other)]) == 0


def test_members_on_other_data_or_val_splits_are_refused(runs, tmp_path, capsys) -> None:
    moved = _copy_run(runs[1], tmp_path / "moved")
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "data_spec": "other.zip"}))
    capsys.readouterr()
    assert main(["eval", str(runs[0]), str(moved), "--ensemble"]) == 2
    assert "trained on different data" in capsys.readouterr().err
    # --data names the one data set every member is scored on
    assert main(["eval", str(runs[0]), str(moved), "--ensemble", "--data", "digits"]) == 0

    held = _copy_run(runs[1], tmp_path / "held-out")
    (held / "config.json").write_text(json.dumps({**config, "val_size": 300}))
    assert main(["eval", str(runs[0]), str(held), "--ensemble", "--split", "val"]) == 2
    assert "different validation splits" in capsys.readouterr().err
    assert main(["eval", str(runs[0]), str(held), "--ensemble"]) == 0  # the test split is shared


def test_a_packed_runs_folder_stands_for_its_members(runs, tmp_path, capsys) -> None:
    parent = tmp_path / "packed"
    parent.mkdir()
    names = ["seed0", "seed1"]
    for name, run in zip(names, runs, strict=False):
        _copy_run(run, parent / name)
    # relative entries resolve against the file's folder; absolute entries stay as they are
    listed = [*names, str(runs[2])]
    (parent / "packed.json").write_text(json.dumps({"members": listed, "seeds": [0, 1, 2]}))
    members = [parent / "seed0", parent / "seed1", runs[2]]
    assert packed_members(parent) == packed_members(parent / "packed.json") == members
    assert expand_runs([runs[0], parent]) == [runs[0], *members]
    assert packed_members(runs[0]) is None  # an ordinary run: its summary lists no members

    [packed] = _eval_json(capsys, str(parent), "--ensemble")
    [separate] = _eval_json(capsys, *map(str, runs), "--ensemble")
    assert packed["accuracy_vs_members"] == separate["accuracy_vs_members"]
    assert packed["member_runs"][0]["checkpoint"] == str(parent / "seed0" / BEST)
    assert len(_eval_json(capsys, str(parent))) == 3  # one by one without --ensemble

    (parent / "packed.json").unlink()  # a summary.json with members serves as well
    (parent / "summary.json").write_text(json.dumps({"members": listed, "test_accuracy": {}}))
    assert packed_members(parent) == members


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"members": "seed0"}, "must be a non-empty list"),
        ({"members": []}, "must be a non-empty list"),
        ({"members": ["seed0", 3]}, "must be a non-empty list"),
        ({"members": ["missing"]}, "member run .*missing listed in .*packed.json not found"),
    ],
)
def test_bad_member_lists_are_refused(tmp_path, capsys, content, message) -> None:
    (tmp_path / "packed.json").write_text(json.dumps(content))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        packed_members(tmp_path)
    capsys.readouterr()
    assert main(["eval", str(tmp_path), "--ensemble"]) == 2
    assert "packed.json" in capsys.readouterr().err


def test_a_json_file_without_members_is_refused(tmp_path) -> None:
    (tmp_path / "packed.json").write_text(json.dumps({"seeds": [0, 1]}))
    with pytest.raises(ValueError, match="lists no 'members'"):
        packed_members(tmp_path / "packed.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json is not a JSON file"):
        packed_members(tmp_path / "broken.json")


def test_eval_text_aligns_the_class_table(runs, capsys) -> None:
    """Class names shorter than the 'class' header (digits: '0'..'9') once shifted the
    accuracy column left of its header."""
    capsys.readouterr()
    assert main(["eval", str(runs[0])]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("class  accuracy")
    rows = lines[start + 1 : lines.index("", start)]
    assert len(rows) == 10 and all(len(row) == len(lines[start]) for row in rows), rows
