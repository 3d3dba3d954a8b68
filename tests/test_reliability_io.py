"""Writes that fail lose nothing and say why: a full disk, a read-only folder, a writer killed
mid-write; the data cache only warns. Each defect test here failed on the code before the fix."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from reslab._io import WriteError, append_text, atomic_path, clean_stale_temp, save_torch
from reslab.record import write_json
from reslab.train import TrainConfig, fit
from reslab.train.checkpoint import LATEST, non_finite_tensors, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _can_mount_tmpfs() -> bool:
    """A user and mount namespace (``unshare -rm``) lets an unprivileged process mount a small
    tmpfs, a real file system that fills up; some kernels and containers forbid it."""
    if shutil.which("unshare") is None:
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=1m none $d && umount $d && rmdir $d"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True)
    return done.returncode == 0


needs_tmpfs = pytest.mark.skipif(
    not _can_mount_tmpfs(), reason="cannot mount a tmpfs here (no unshare -rm: user namespaces)"
)


def _in_small_filesystems(tmp_path: Path, driver: str, *mounts: tuple[str, str]) -> dict:
    """Run ``driver`` (Python) with each ``(folder, tmpfs options)`` mounted as a tmpfs, in a
    private mount namespace; returns the JSON object it prints last."""
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(driver))
    setup = " && ".join(
        f"mkdir -p {tmp_path / name} && mount -t tmpfs -o {options} none {tmp_path / name}"
        for name, options in mounts
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RESLAB_PROGRESS": "0"}
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f'{setup} && exec "{sys.executable}" {script} {tmp_path}'],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_tmpfs
def test_a_full_disk_stops_the_run_with_one_line_and_the_last_checkpoint_intact(
    tmp_path: Path,
) -> None:
    """A full disk ended in a 30-line torch traceback (`inline_container.cc ... unexpected pos`)
    naming no file. A 6 MB file system holds config.json and the first evaluation's two
    checkpoints (2.2 MB each) but not the next one's."""
    driver = """
        import json, subprocess, sys
        from pathlib import Path
        import torch

        disk = Path(sys.argv[1]) / "disk"
        run = disk / "run"
        cli = [sys.executable, "-m", "reslab", "train"]
        full = subprocess.run(cli + ["--iters", "20", "--eval-every", "10", "--out", str(run)],
                              capture_output=True, text=True)
        ckpt = torch.load(run / "checkpoint_latest.pt", weights_only=True)
        finite = all(bool(torch.isfinite(v).all()) for v in ckpt["model"].values()
                     if v.is_floating_point())
        left = sorted(p.name for p in run.iterdir())
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space again
        again = subprocess.run(cli + ["--resume", str(run)], capture_output=True, text=True)
        summary = json.loads((run / "summary.json").read_text())
        print(json.dumps({"rc": full.returncode, "err": full.stderr, "step": ckpt["step"],
                          "finite": finite, "left": left, "resumed": again.returncode,
                          "resumed_err": again.stderr, "steps": summary["steps"]}))
    """
    r = _in_small_filesystems(tmp_path, driver, ("disk", "size=6m"))
    assert r["rc"] == 2, r["err"]
    err = r["err"].strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(f"reslab train: error: cannot write {tmp_path / 'disk' / 'run'}/")
    assert "No space left on device" in err and "last good checkpoint" in err
    assert r["step"] == 10 and r["finite"]  # the previous checkpoint, intact
    assert not [name for name in r["left"] if name.endswith(".tmp")]  # no half-written file
    assert r["resumed"] == 0, r["resumed_err"]
    assert r["steps"] == 20


@needs_tmpfs
def test_a_full_or_read_only_cache_folder_falls_back_to_decoding(tmp_path: Path) -> None:
    """A read-only or full cache folder stopped the data from loading (torch.save's
    RuntimeError); the cache is an optimisation: warn, decode, go on."""
    from image_files import encode, rgb, write_tree
    from PIL import Image

    png = {f"{i}.png": encode(Image.fromarray(rgb(8, 8, i)), "PNG") for i in range(6)}
    write_tree(tmp_path / "imgs", {"train": {"a": png, "b": png}, "test": {"a": png}})
    driver = """
        import json, subprocess, sys, warnings
        from pathlib import Path
        from reslab.data import load_data

        root = Path(sys.argv[1])
        filler = root / "full" / "filler"
        try:  # fill the small file system to its last byte
            with open(filler, "wb") as f:
                while True:
                    f.write(b"x" * 4096)
        except OSError:
            pass
        subprocess.run(["mount", "-o", "remount,ro", str(root / "readonly")], check=True)
        out = {}
        for name in ("full", "readonly"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                s = load_data(str(root / "imgs"), cache_dir=root / name, val_size=0)
            out[name] = {"train": len(s.train), "warnings": [str(w.message) for w in caught]}
        print(json.dumps(out))
    """
    r = _in_small_filesystems(tmp_path, driver, ("full", "size=1m"), ("readonly", "size=1m"))
    for name, reason in (("full", "No space left on device"), ("readonly", "Read-only")):
        assert r[name]["train"] == 12
        assert any(
            "cannot write the data cache" in w and reason in w for w in r[name]["warnings"]
        ), r[name]


# -- each write names its file (simulated: a file object whose writes fail) -----------------------


class _FullDisk:
    """``open`` whose files opened for writing take ``room`` bytes in all, then fail with ENOSPC
    as a full disk does."""

    def __init__(self, room: int) -> None:
        self.room = room

    def __call__(self, file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)  # noqa: SIM115
        return f if "w" not in mode and "a" not in mode else _Limited(f, self)


class _Limited:
    def __init__(self, f, disk: _FullDisk) -> None:
        self.f, self.disk = f, disk

    def write(self, data):
        if len(data) > self.disk.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name: str):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def test_torch_save_on_a_full_disk_is_a_write_error_naming_the_file(
    tmp_path: Path, monkeypatch
) -> None:
    path = tmp_path / LATEST
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    monkeypatch.setattr("reslab._io.open", _FullDisk(room=100), raising=False)
    with pytest.raises(WriteError) as info:
        save_checkpoint({"step": 2, "w": torch.ones(10_000)}, path)
    assert str(info.value) == f"cannot write {path}: No space left on device"
    assert info.value.errno == errno.ENOSPC
    assert torch.load(path, weights_only=True)["step"] == 1  # the old file, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST]  # no temporary file left


def test_appends_and_json_writes_name_their_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("reslab._io.open", _FullDisk(room=0), raising=False)
    with pytest.raises(WriteError, match=r"cannot write .*metrics\.jsonl: No space left"):
        append_text(tmp_path / "metrics.jsonl", "{}\n")
    monkeypatch.undo()
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(WriteError, match=r"cannot write .*a-file/sub/x\.json: (File exists|Not a)"):
        write_json(blocked / "sub" / "x.json", {"a": 1})


def test_a_tensorboard_write_that_fails_names_the_events_file(
    digits, tmp_path: Path, monkeypatch
) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    real, calls = SummaryWriter.flush, []

    def flush(self) -> None:  # the disk fills up after the first evaluation
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self)

    monkeypatch.setattr(SummaryWriter, "flush", flush)
    torch.manual_seed(0)
    from reslab import create_model

    model = create_model("cifar_resnet20", in_channels=1, num_classes=10)
    cfg = TrainConfig.preset("digits", iters=4, eval_every=2)
    with pytest.raises(WriteError, match=r"cannot write .*events\.out\.tfevents\..*No space left"):
        fit(model, digits, cfg, tmp_path / "run")
    assert torch.load(tmp_path / "run" / LATEST, weights_only=True)["step"] == 2


def test_the_torch_save_runtime_error_is_mapped_to_its_os_error(tmp_path: Path) -> None:
    """What torch.save raises when the disk fills up in the middle of a file object: a
    RuntimeError from its zip writer (`unexpected pos`) whose context is the OSError."""

    class FillsUp(io.RawIOBase):
        written = 0

        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            self.written += len(data)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return len(data)

    with pytest.raises(RuntimeError, match="unexpected pos") as info:
        torch.save({"w": torch.ones(10_000)}, FillsUp())
    error = WriteError.of(tmp_path / "x.pt", info.value)
    assert error.errno == errno.ENOSPC and str(error).endswith("x.pt: No space left on device")


# -- temporary files of interrupted writes ---------------------------------------------------------


def test_a_writer_killed_mid_write_leaves_a_temp_file_the_next_write_removes(
    tmp_path: Path,
) -> None:
    """kill -9 during a write leaves `.NAME.PID.tmp`: nothing removed it in a run folder."""
    code = f"""
        import time
        from pathlib import Path
        from reslab._io import atomic_path
        with atomic_path(Path({str(tmp_path / "checkpoint_latest.pt")!r})) as tmp:
            tmp.write_bytes(b"half")
            print(tmp.name, flush=True)
            time.sleep(600)
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    name = proc.stdout.readline().strip()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / name).exists() and not (tmp_path / "checkpoint_latest.pt").exists()
    write_json(tmp_path / "config.json", {"a": 1})  # any write in that folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_temp_files_of_live_writers_are_kept(tmp_path: Path) -> None:
    live = tmp_path / f".x.pt.{os.getpid()}.tmp"
    dead = tmp_path / ".x.pt.999999999.tmp"
    other = tmp_path / ".notes.tmp"  # not a reslab temporary name
    for f in (live, dead, other):
        f.write_bytes(b"")
    assert clean_stale_temp(tmp_path) == [dead]
    assert live.exists() and other.exists()
    with atomic_path(tmp_path / "y") as tmp:
        tmp.write_text("y")
    assert live.exists()


def test_save_torch_is_atomic_and_loadable(tmp_path: Path) -> None:
    state = {"w": torch.arange(5.0), "nan": torch.tensor([1.0])}
    save_torch(state, tmp_path / "s.pt")
    assert torch.equal(torch.load(tmp_path / "s.pt", weights_only=True)["w"], state["w"])
    assert non_finite_tensors(state) == []
