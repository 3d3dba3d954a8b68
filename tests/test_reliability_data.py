"""Data that cannot hurt: special files and endless or huge inputs refused before they are read,
and CIFAR batches checked (labels, shapes, entries) before a run folder is written."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

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


# -- the decode and index caches: never in the way ------------------------------------------------


def _image_folder(root: Path) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(3):
                pixels = np.full((8, 8, 3), 40 * i + (label == "b"), np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def _damage(file: Path, how: str) -> None:
    if how == "truncated":
        file.write_bytes(file.read_bytes()[:100])
    elif how == "folder":
        file.unlink()
        file.mkdir()
    else:  # a named pipe: opening it for reading waits for a writer that never comes
        file.unlink()
        os.mkfifo(file)


class _Hung(BaseException):
    """Not an Exception: the cache's own ``except Exception`` must not take it for damage."""


@contextlib.contextmanager
def _no_hang(seconds: int = 20):
    """Turn a hang (a read that never returns) into a failure instead of a stuck test run."""

    def hung(signum: int, frame: object) -> None:
        raise _Hung(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("how", ["truncated", "folder", "pipe"])
@pytest.mark.parametrize("kind", ["pt", "index.json.gz"])
def test_an_unusable_cache_file_is_decoded_again(tmp_path: Path, how: str, kind: str) -> None:
    """A damaged, foreign or special file where a cache file belongs costs a warning and a fresh
    decode of the same pixels; a named pipe there blocked every later load forever."""
    root = _image_folder(tmp_path / "photos")
    cache = tmp_path / "cache"
    first = load_data(str(root), cache_dir=cache, val_size=0)
    (file,) = cache.glob(f"photos.*.{kind}")
    if kind != "pt":  # the decoded tensors' cache would answer before the index is read
        next(cache.glob("photos.*.pt")).unlink()
    _damage(file, how)
    with _no_hang(), pytest.warns(UserWarning, match=f"unusable .*cache {file}"):
        again = load_data(str(root), cache_dir=cache, val_size=0)
    assert torch.equal(again.train.images, first.train.images)
    assert torch.equal(again.test.labels, first.test.labels)


def test_writing_a_cache_removes_the_temp_files_of_killed_writers(tmp_path: Path) -> None:
    """A writer killed mid-write leaves ``.NAME.PID.tmp`` in the cache folder: the next cache
    write there removes it (its process is gone) and keeps a live writer's."""
    root = _image_folder(tmp_path / "photos")
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = cache / ".photos.0123456789abcdef.pt.999999999.tmp"  # no such process
    live = cache / f".photos.0123456789abcdef.pt.{os.getpid()}.tmp"
    dead.write_bytes(b"half a tensor file")
    live.write_bytes(b"being written")
    load_data(str(root), cache_dir=cache, val_size=0)
    assert not dead.exists() and live.exists()
    assert sorted(p.suffix for p in cache.iterdir() if p != live) == [".gz", ".pt"]


def test_resizing_in_memory_data_is_bounded_before_it_is_allocated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--image-size` upsizes data held in memory (the digits, CIFAR batches) all at once:
    `--image-size 100000` on the digits asked the allocator for 13 TB and ended in a traceback.
    The size is now checked against the in-memory budget before anything is allocated (here a
    budget of 1 MiB against the digits at 64 px, 7 MiB)."""
    import reslab.data.memory as memory
    from reslab.data.reading import open_data

    monkeypatch.setattr(memory, "memory_budget", lambda: 2**20)
    with pytest.raises(
        ValueError,
        match=r"digits: resizing .* 8x8 to 64x64 .*over the in-memory budget of 1\.0 MiB",
    ):
        open_data("digits", image_size=64, cache_dir=tmp_path / "c")
    assert open_data("digits", image_size=16, cache_dir=tmp_path / "c").input.size == (16, 16)
    run = tmp_path / "run"
    assert main(["train", "--data", "digits", "--image-size", "64", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "over the in-memory budget" in err, err
    assert not run.exists()


# -- labels of image sources ----------------------------------------------------------------------


def test_labels_of_image_sources_are_checked_against_the_training_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A test class no training image has (a folder or a CSV row), and packed shards whose
    manifest holds a label outside its class names, are refused by name before a run starts."""
    from reslab.data.shards import MANIFEST, PackConfig, pack

    folder = _image_folder(tmp_path / "photos")
    (folder / "test" / "b").rename(folder / "test" / "c")
    rows = ["path,label,split"] + [
        f"{p.relative_to(folder)},{p.parent.name},{p.parts[-3]}" for p in folder.rglob("*.png")
    ]
    (folder / "list.csv").write_text("\n".join(rows) + "\n")
    for source in (folder, folder / "list.csv"):
        with pytest.raises(ValueError, match=rf"{source.name}: test classes \['c'\] have no train"):
            load_data(str(source), cache_dir=tmp_path / "c", val_size=0)
        run = tmp_path / "run"
        assert main(["train", "--iters", "1", "--data", str(source), "--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "test classes ['c']" in err and not run.exists()
    (folder / "test" / "c").rename(folder / "test" / "b")
    (folder / "list.csv").unlink()
    shards = tmp_path / "shards"
    pack(folder, shards, PackConfig(shard_samples=4), workers=1, progress=False,
         cache_dir=tmp_path / "c")  # fmt: skip
    manifest = json.loads((shards / MANIFEST).read_text())
    manifest["splits"]["train"]["labels"][0] = 2  # two classes: 0 and 1
    (shards / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"{MANIFEST}: labels out of range for 2 classes"):
        load_data(str(shards), cache_dir=tmp_path / "c2", val_size=0)


def test_a_list_that_is_not_utf8_text_or_too_large_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CSV list in another encoding ended in `reslab train: error: 'utf-8' codec can't decode
    byte 0xff in position 11`, naming no file; a list is read whole, so its size is bounded
    before it is read."""
    import reslab.data.lists as lists

    latin = tmp_path / "latin1.csv"
    latin.write_bytes("path,label\ncafé.png,a\n".encode("latin-1"))
    run = tmp_path / "run"
    assert main(["train", "--iters", "1", "--data", str(latin), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{latin}: not UTF-8 text" in err, err
    assert not run.exists()
    big = tmp_path / "big.csv"
    big.write_text("path,label\n" + "x.png,a\n" * 200)
    monkeypatch.setattr(lists, "MAX_LIST_BYTES", 1000)
    with pytest.raises(ValueError, match=rf"{big}: 1,611 bytes, over the 1,000 a list may have"):
        lists.read_list(big)
