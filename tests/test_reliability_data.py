"""Data that cannot hurt: special files and endless or huge inputs refused before they are read,
and CIFAR batches checked (labels, shapes, entries) before a run folder is written."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from reslab.cli import main
from reslab.data import load_data

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [f"c{i}" for i in range(10)]


def _batch(n: int, seed: int = 0, **override: object) -> dict:
    rng = np.random.default_rng(seed)
    batch = {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": rng.integers(0, 10, n).tolist(),
    }
    for key, value in override.items():
        if value is None:
            batch.pop(key.encode())
        else:
            batch[key.encode()] = value
    return batch


def _cifar(root: Path, **test_batch: object) -> Path:
    """A CIFAR-10 python folder of 5 x 8 training and 6 test images; ``test_batch`` overrides
    entries of the test batch (None removes one)."""
    root.mkdir(parents=True)
    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(_batch(8, i)))
    (root / "test_batch").write_bytes(pickle.dumps(_batch(6, 9, **test_batch)))
    meta = {b"label_names": [c.encode() for c in CLASSES]}
    (root / "batches.meta").write_bytes(pickle.dumps(meta))
    return root


def test_special_files_as_data_are_refused_at_once(tmp_path: Path) -> None:
    """`--data /dev/zero` read until the OOM killer; a named pipe (also one named like a CIFAR
    archive or batch file) blocked forever."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    os.mkfifo(tmp_path / "cifar-10-python.tar.gz")
    batches = _cifar(tmp_path / "cifar")
    (batches / "data_batch_3").unlink()
    os.mkfifo(batches / "data_batch_3")
    code = f"""
        import sys
        from reslab.cli import main
        for data in ("/dev/zero", {str(pipe)!r}, {str(tmp_path / "cifar-10-python.tar.gz")!r},
                     {str(batches)!r}):
            out = {str(tmp_path / "run")!r}
            print(main(["train", "--iters", "1", "--data", data, "--out", out]), flush=True)
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RESLAB_CACHE_DIR": str(tmp_path / "c")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.split() == ["2", "2", "2", "2"], done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "reslab train: error: data source /dev/zero is a device, not a data file or folder",
        f"reslab train: error: data source {pipe} is a named pipe, not a data file or folder",
        f"reslab train: error: data source {tmp_path / 'cifar-10-python.tar.gz'} is a named "
        "pipe, not a data file or folder",
        f"reslab train: error: CIFAR file {batches / 'data_batch_3'} is not a regular file",
    ]
    assert not (tmp_path / "run").exists()


def test_a_huge_cifar_archive_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A CIFAR archive was read whole into memory (a 30 GB file: MemoryError, or the OOM
    killer); a sparse file costs no disk here."""
    huge = tmp_path / "cifar-10-python.tar.gz"
    with open(huge, "wb") as f:
        f.truncate(30 * 2**30)
    with pytest.raises(ValueError, match=r"32,212,254,720 bytes, over the 1,073,741,824"):
        load_data(str(huge), cache_dir=tmp_path / "c")


def test_other_files_beside_cifar_batches_are_not_read(tmp_path: Path) -> None:
    """Every file below a CIFAR folder was read into memory, a 30 GB one beside the batches
    too."""
    root = _cifar(tmp_path / "cifar-10-batches-py")
    with open(root / "backup.img", "wb") as f:
        f.truncate(30 * 2**30)
    s = load_data(str(root), cache_dir=tmp_path / "c", val_size=0)
    assert len(s.train) == 40 and len(s.test) == 6


def test_a_gzip_bomb_is_refused_at_the_limit(tmp_path: Path, monkeypatch) -> None:
    """The whole gzip stream was decompressed into memory, however large it grew."""
    import reslab.data.sources as sources

    root = _cifar(tmp_path / "cifar-10-batches-py")
    (root / "data_batch_1").write_bytes(b"\0" * 3_000_000)  # compresses to a few KB
    bomb = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(bomb, "w:gz") as tf:
        tf.add(root, arcname="cifar-10-batches-py")
    assert bomb.stat().st_size < 2**18  # a quarter of the limit below
    monkeypatch.setattr(sources, "CIFAR_MAX_BYTES", 2**20)
    with pytest.raises(ValueError, match=r"decompresses to more than the 1,048,576 bytes"):
        load_data(str(bomb), cache_dir=tmp_path / "c")


@pytest.mark.parametrize(
    ("test_batch", "message"),
    [
        ({"data": None}, r"test_batch: no 'data' entry \(it has \['labels'\]\)"),
        ({"labels": None}, r"test_batch: no 'labels' entry"),
        ({"labels": [0, 1, 2, 3, 4, 10]}, r"label 10 of image 5 is outside the 10 class names"),
        ({"labels": [0, 1, 2, 3, 4, 5, 6]}, r"6 images, 7 labels"),
        ({"labels": [0, 1, 2, 3, 4, -1]}, r"label -1 of image 5"),
        (
            {"data": np.full((6, 3072), 300, dtype=np.int64)},
            r"'data' is int64 of shape \(6, 3072\), not uint8 rows of 3x32x32",
        ),
        ({"data": np.zeros((6, 1000), np.uint8)}, r"not uint8 rows of 3x32x32"),
        ({"labels": [[0, 1]] * 6}, r"'labels' is int64 of shape \(6, 2\), not a list"),
    ],
)
def test_cifar_batches_are_checked_before_a_run_starts(
    tmp_path: Path, capsys, test_batch: dict, message: str
) -> None:
    """Out-of-range labels, more labels than images, a missing entry or wrongly typed pixels
    crashed at step 0 with a traceback, or trained on wrapped values (300 -> 44)."""
    root = _cifar(tmp_path / "cifar-10-batches-py", **test_batch)
    with pytest.raises(ValueError, match=message):
        load_data(str(root), cache_dir=tmp_path / "c")
    run = tmp_path / "run"
    argv = ["train", "--iters", "1", "--data", str(root), "--out", str(run)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{root / 'test_batch'}" in err
    assert not run.exists()  # no run folder, no config.json describing a run that never was


def test_a_good_cifar_archive_still_loads(tmp_path: Path) -> None:
    root = _cifar(tmp_path / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(root, arcname="cifar-10-batches-py")
    archive.write_bytes(buf.getvalue())
    a = load_data(str(archive), cache_dir=tmp_path / "c1", val_size=0)
    b = load_data(str(root), cache_dir=tmp_path / "c2", val_size=0)
    assert a.classes == CLASSES and (a.train.images == b.train.images).all()
