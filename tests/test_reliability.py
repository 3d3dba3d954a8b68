"""A run folder nothing can corrupt: one owner, nothing of the user's replaced, no diverged
checkpoint, resume checked before anything is written, and the small rough edges of issue 15.

Each test here failed on the code before the fix it checks (docs/reliability.md lists them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from reslab import create_model
from reslab._io import LOCK_NAME, FolderLock, FolderLockedError
from reslab.cli import main
from reslab.data import DataSplits, Split
from reslab.train import NonFiniteLossError, TrainConfig, TrainingInterrupted, fit
from reslab.train.checkpoint import BEST, LATEST, non_finite_tensors

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return create_model("cifar_resnet20", in_channels=1, num_classes=10, **kw)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig.preset("digits", **{"iters": 10, "eval_every": 5, **kw})


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


def _record(folder: Path) -> dict[str, bytes]:
    """The run's files, without the lock file (which names its current holder)."""
    return {k: v for k, v in _files(folder).items() if k != LOCK_NAME}


def _python(code: str, **env: str) -> subprocess.Popen:
    """A Python process running ``code`` with this checkout's reslab (and ``env`` set)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RESLAB_PROGRESS": "0", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- one owner per run folder ------------------------------------------------------------------


def test_a_run_folder_in_use_is_refused_and_a_killed_owner_leaves_no_lock(
    tmp_path: Path, capsys
) -> None:
    """Two `reslab train --out X` at once both exited 0, mixing their checkpoints and metrics;
    the lock that stops the second must not outlive a `kill -9` of the first."""
    run = tmp_path / "run"
    holder = _python(
        f"""
        import time
        from pathlib import Path
        from reslab._io import FolderLock
        FolderLock(Path({str(run)!r})).acquire()
        print("held", flush=True)
        time.sleep(600)
        """
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    try:
        assert main(["train", "--iters", "2", "--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{run} is in use by another reslab process" in err
        assert f"pid {holder.pid}" in err
        assert main(["train", "--resume", str(run)]) == 2
        assert f"{run} is in use by another reslab process" in capsys.readouterr().err
        with pytest.raises(FolderLockedError):
            FolderLock(run).acquire()
        assert _files(run).keys() == {LOCK_NAME}  # nothing written by the refused run
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs in the holder
        holder.wait()
    assert main(["train", "--iters", "2", "--eval-every", "2", "--out", str(run)]) == 0
    assert (run / LATEST).exists() and (run / "summary.json").exists()


@pytest.mark.slow
def test_resume_of_a_running_run_is_refused(tmp_path: Path) -> None:
    """`--resume X` while X's run goes on: the second process would write the same
    checkpoints; it must stop with one line, before reading the data."""
    run = tmp_path / "run"
    trainer = _python(
        f"""
        from reslab.cli import main
        main(["train", "--iters", "100000", "--eval-every", "2", "--out", {str(run)!r}])
        """
    )
    try:
        deadline = time.time() + 300
        while not (run / LATEST).exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (run / LATEST).exists(), "the first run never checkpointed"
        second = subprocess.run(  # as long a run: only the lock can stop it (60 s: it did not)
            [sys.executable, "-m", "reslab", "train", "--resume", str(run), "--iters", "100000"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2, second.stdout + second.stderr
        assert (
            second.stderr.count("\n") == 1 and "in use by another reslab process" in second.stderr
        )
    finally:
        trainer.kill()
        trainer.wait()
    step = torch.load(run / LATEST, weights_only=True)["step"]
    assert main(["train", "--resume", str(run), "--iters", str(step + 2)]) == 0  # not stuck


def _ddp_claim(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    import torch.distributed as dist

    from reslab.train.setup import own_run_folder, place

    where = place(_cfg(device="cpu"))
    try:
        own_run_folder(Path(folder), where, resume=False)
        outcome = "took it"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    Path(folder, f"rank{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


@pytest.mark.slow
def test_under_ddp_rank_0_owns_the_folder_and_every_rank_stops_with_it(tmp_path: Path) -> None:
    """Rank 0 alone takes the lock; where it cannot, the other ranks must stop too rather than
    wait for it at the first collective."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    with FolderLock(run):  # this process holds it: the two ranks are others
        torch.multiprocessing.spawn(_ddp_claim, args=(2, port, str(run)), nprocs=2)
    assert (run / "rank0.txt").read_text().startswith("FolderLockedError: ")
    assert (run / "rank1.txt").read_text().startswith("RuntimeError: rank 0 cannot train")


def test_files_reslab_did_not_write_are_never_replaced(digits, tmp_path: Path, capsys) -> None:
    """A user's own config.json / summary.json / metrics.jsonl in --out (no checkpoint) were
    silently overwritten."""
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("config.json", "summary.json", "metrics.jsonl"):
        (out / name).write_text(f"the user's {name}\n")
    before = _files(out)
    for extra in ([], ["--allow-nonempty"]):  # the flag never allows replacing them
        assert main(["train", "--iters", "2", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert "reslab did not write" in err and "config.json" in err
        assert _files(out) == before
    finetune = ["finetune", "--from", str(tmp_path / "w.pt"), "--data", "digits"]
    assert main([*finetune, "--out", str(out), "--allow-nonempty"]) == 2
    assert "reslab did not write" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="reslab did not write"):
        fit(_model(), digits, _cfg(iters=2), out, allow_nonempty=True)
    assert _files(out) == before


def test_other_files_need_allow_nonempty_and_are_kept(digits, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shared"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", "--iters", "2", "--out", str(out)]) == 2
    assert "--allow-nonempty" in capsys.readouterr().err
    assert _files(out) == {"notes.txt": b"mine"}
    fit(_model(), digits, _cfg(iters=2, eval_every=2), out, allow_nonempty=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / LATEST).exists()


def test_a_run_that_stopped_before_its_first_checkpoint_can_start_again(
    digits, tmp_path: Path
) -> None:
    """Its leftovers (config.json beside reslab's lock file) are reslab's own: replaced."""
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="no checkpoint yet"):
        fit(_model(), digits, _cfg(), out, on_step=_poison_weights_at(1))
    assert {"config.json", LOCK_NAME} <= set(_files(out))
    fit(_model(), digits, _cfg(iters=2, eval_every=2), out)
    assert torch.load(out / LATEST, weights_only=True)["step"] == 2


def test_a_refused_or_failed_run_leaves_no_folder_behind(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-data"
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


# -- no diverged checkpoint on any path ----------------------------------------------------------


def _poison_weights_at(k: int):
    def on_step(step: int, model) -> None:
        if step == k:
            with torch.no_grad():
                model.fc.weight.fill_(float("nan"))

    return on_step


def test_a_signal_during_the_diverging_step_writes_no_checkpoint(digits, tmp_path: Path) -> None:
    """The interrupt path skipped the finiteness check: a SIGTERM in the step whose gradients
    broke the weights saved them as the latest checkpoint and called it the last good one."""

    def diverge_and_signal(step: int, model) -> None:
        if step == 7:
            model.fc.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
            signal.raise_signal(signal.SIGTERM)  # caught: the loop checkpoints after this step

    with pytest.raises(NonFiniteLossError, match=r"not writing .*checkpoint.*model\.fc\.weight"):
        fit(_model(), digits, _cfg(iters=20), tmp_path, on_step=diverge_and_signal)
    ckpt = torch.load(tmp_path / LATEST, weights_only=True)
    assert ckpt["step"] == 5 and non_finite_tensors(ckpt) == []
    assert non_finite_tensors(torch.load(tmp_path / BEST, weights_only=True)) == []


def test_non_finite_states_are_found_in_weights_and_optimiser_buffers() -> None:
    state = {
        "model": {"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])},
        "optimizer": {"state": {3: {"momentum_buffer": torch.tensor([float("nan")])}}},
        "rng": torch.zeros(4, dtype=torch.uint8),
        "step": 3,
    }
    assert non_finite_tensors(state) == ["model.b", "optimizer.state.3.momentum_buffer"]


# -- resume: everything checked before anything is written ---------------------------------------


def _other_data(digits: DataSplits) -> DataSplits:
    """Same classes and split sizes as the digits, other images."""
    flipped = [Split(s.images.flip(-1).contiguous(), s.labels) for s in (digits.train, digits.val)]
    return DataSplits(flipped[0], flipped[1], digits.test, digits.classes, "digits-mirrored")


def test_resume_with_other_data_is_refused_before_anything_is_written(
    digits, tmp_path: Path
) -> None:
    """Data of the same size resumed silently (and a failed resume rewrote config.json first)."""
    fit(_model(), digits, _cfg(), tmp_path)
    before = _record(tmp_path)
    with pytest.raises(ValueError, match=r"not the data it was trained on.*fingerprint"):
        fit(_model(), _other_data(digits), _cfg(iters=20), tmp_path, resume=True)
    assert _record(tmp_path) == before  # config.json, metrics and checkpoints untouched


def test_resume_with_another_network_is_refused_by_name(digits, tmp_path: Path) -> None:
    fit(_model(), digits, _cfg(), tmp_path)
    before = _record(tmp_path)
    with pytest.raises(ValueError, match=r"another network: .*norm"):
        fit(_model(norm="none"), digits, _cfg(iters=20), tmp_path, resume=True)
    assert _record(tmp_path) == before


def test_config_json_records_the_datas_identity(digits, tmp_path: Path) -> None:
    fit(_model(), digits, _cfg(iters=2, eval_every=2), tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())["data"]
    assert {k: data[k] for k in ("train", "val", "test")} == {
        "train": 1295,
        "val": 143,
        "test": 359,
    }
    assert data["classes"] == digits.classes and len(data["fingerprint"]) == 32
    saved = torch.load(tmp_path / LATEST, weights_only=True)["data"]  # what a resume checks
    assert {"classes", "train", "val", "test", "fingerprint"} <= set(saved)
    assert saved == {k: data[k] for k in saved}


def test_a_damaged_config_json_is_named(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--iters", "2", "--out", str(run)]) == 0
    text = (run / "config.json").read_text()
    (run / "config.json").write_text(text[: len(text) // 2])  # a truncated copy
    capsys.readouterr()
    for argv in (["train", "--resume", str(run), "--iters", "4"], ["eval", str(run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"config.json in {run} is not valid JSON" in err and err.count("\n") == 1
    config = json.loads(text)
    config["train_config"]["learning_rate"] = 0.1  # a hand-edited recipe: was a TypeError
    (run / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(run), "--iters", "4"]) == 2
    err = capsys.readouterr().err
    assert f"config.json in {run} has an invalid train_config" in err and "learning_rate" in err


def test_resume_of_a_run_started_from_python_asks_for_its_data(
    digits, tmp_path: Path, capsys
) -> None:
    """config.json of a `fit` call without run_info has no data_spec: was a KeyError traceback."""
    fit(_model(), digits, _cfg(iters=2, eval_every=2), tmp_path)
    assert main(["train", "--resume", str(tmp_path), "--iters", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not say which data the run trained on" in err
    assert main(["train", "--resume", str(tmp_path), "--iters", "4", "--data", "digits"]) == 0


# -- signals at the end and at the start -----------------------------------------------------------


def test_sigterm_during_the_final_summary_still_writes_it(tmp_path: Path) -> None:
    """The summary ran after the signal handlers were gone: SIGTERM killed the process there."""
    proc = _python(
        f"""
        import os, signal
        from pathlib import Path
        import reslab.train.runs as loop  # where fit's run looks summarize up
        from reslab import create_model
        from reslab.data import load_data
        from reslab.train import TrainConfig, fit

        real = loop.summarize
        def summarize(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's time limit would
            return real(*args, **kwargs)
        loop.summarize = summarize
        model = create_model("cifar_resnet20", in_channels=1, num_classes=10)
        cfg = TrainConfig.preset("digits", iters=4, eval_every=2)
        fit(model, load_data("digits"), cfg, Path({str(tmp_path)!r}))
        print("finished", flush=True)
        """
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "finished" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4


def test_ctrl_c_while_decoding_is_one_line(tmp_path: Path) -> None:
    """Ctrl-C while the images were decoded printed a traceback."""
    from image_files import encode, rgb, write_tree
    from PIL import Image

    root = tmp_path / "imgs"
    png = {f"{i}.png": encode(Image.fromarray(rgb(8, 8, i)), "PNG") for i in range(8)}
    write_tree(root, {"train": {"a": png, "b": png}, "test": {"a": png, "b": png}})
    proc = _python(
        f"""
        import os, signal, sys
        import reslab.data.memory as memory
        from reslab.cli import main

        real, calls = memory.decode, []
        def decode(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
            return real(*args, **kwargs)
        memory.decode = decode
        sys.exit(main(["train", "--data", {str(root)!r}, "--out", {str(tmp_path / "run")!r}]))
        """,
        RESLAB_CACHE_DIR=str(tmp_path / "c"),
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "reslab train: interrupted"
    assert not (tmp_path / "run").exists()


def test_interrupted_training_still_says_where_to_resume(digits, tmp_path: Path) -> None:
    def interrupt(step: int, model) -> None:
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="SIGINT at step 4"):
        fit(_model(), digits, _cfg(), tmp_path, on_step=interrupt)
    assert torch.load(tmp_path / LATEST, weights_only=True)["step"] == 4


# -- evaluation ----------------------------------------------------------------------------------


def test_eval_of_an_empty_validation_split_says_so(tmp_path: Path, capsys) -> None:
    """`eval --split val` of a run without a validation split printed `nan%`."""
    run = tmp_path / "run"
    assert main(["train", "--iters", "2", "--val-size", "0", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert "no val images to evaluate" in err and "--val-size 0" in err and "nan" not in err
