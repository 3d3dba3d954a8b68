"""Readers that decode a data source into uint8 tensors: digits and CIFAR python (image folders:
:mod:`reslab.data.memory`).

Each reader returns a :class:`RawData` (the source's own train/test split, nothing held out yet);
:func:`reslab.data.load_data` caches it and carves the validation split.
"""

from __future__ import annotations

import io
import pickle
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

__all__ = ["RawData", "read_cifar_python", "read_digits"]


@dataclass(frozen=True)
class RawData:
    """A source's own train/test split as uint8 (N, C, H, W) images and int64 labels."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: list[str]
    val_images: Tensor | None = None  # a val/ split of the source itself, when it has one
    val_labels: Tensor | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason), skip_bad only
    notes: list[str] = field(default_factory=list)  # how missing splits were made


# -- scikit-learn digits ---------------------------------------------------------------------------
DIGITS_TEST_SIZE = 360  # ~20% of the 1,797 images, stratified, always drawn with seed 0


def read_digits() -> RawData:
    """The 8x8 handwritten digits bundled with scikit-learn (Alpaydin & Kaynak 1998).

    Pixel values 0..16 are rescaled to 0..255. The train/test split is fixed (seed 0, stratified),
    so every run and every seed is scored on the same 360 test images.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8))[:, None]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    g = torch.Generator().manual_seed(0)
    test_idx = []
    for c in range(10):  # stratified: the same share of every class goes to the test split
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[: round(len(idx) * DIGITS_TEST_SIZE / len(labels))])
    test = torch.sort(torch.cat(test_idx)).values
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[test] = True
    return RawData(
        images[~is_test],
        labels[~is_test],
        images[is_test],
        labels[is_test],
        list(map(str, range(10))),
        notes=[f"test: {len(test)} images, a fixed stratified share of each digit (seed 0)"],
    )


# -- CIFAR python format ----------------------------------------------------------------------
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR batches contain (dicts, lists, numpy arrays): a data file
    cannot run code."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        d = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:
        raise ValueError(f"corrupt CIFAR batch file {where}: {exc}") from exc
    if not isinstance(d, dict):
        raise ValueError(f"corrupt CIFAR batch file {where}: expected a dict, got {type(d)}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


# The largest any file of the python versions is (CIFAR-100's decompressed archive: 178 MB; its
# `train` file 155 MB), with room to spare: what is read into memory is bounded before reading.
CIFAR_MAX_BYTES = 2**30

# the official python versions' files (CIFAR-10, then CIFAR-100)
_CIFAR_FILES = {
    *(f"data_batch_{i}" for i in range(1, 6)),
    *("test_batch", "batches.meta", "train", "test", "meta"),
}


def _read_member(path: Path, limit: int) -> bytes:
    """A CIFAR file of a folder: a regular file of at most ``limit`` bytes, read once."""
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):  # a named pipe would block, a device never end
        raise ValueError(f"CIFAR file {path} is not a regular file")
    if st.st_size > limit:
        raise ValueError(
            f"CIFAR file {path} is {st.st_size:,} bytes, over the {limit:,} that any file of "
            "CIFAR-10/100 in the python format can have"
        )
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # grew since the stat
        raise ValueError(f"CIFAR file {path} is over the {limit:,} bytes it had a moment ago")
    return data


def _gunzip(blob: bytes, limit: int, path: Path) -> bytes:
    """The whole gzip stream, checked (CRC and length: damaged bytes fail here, not as wrong
    pixels), refused once it passes ``limit`` bytes (a gzip bomb stops there)."""
    out, rest = bytearray(), blob
    while rest:  # one gzip member after another, as gzip.decompress reads them
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out += d.decompress(rest, limit + 1 - len(out))
        if len(out) > limit or d.unconsumed_tail:
            raise ValueError(
                f"corrupt CIFAR archive {path}: it decompresses to more than the {limit:,} bytes "
                "that CIFAR-10/100 in the python format take"
            )
        if not d.eof:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
        rest = d.unused_data.lstrip(b"\0")
    return bytes(out)


def _cifar_members(path: Path, limit: int = CIFAR_MAX_BYTES) -> dict[str, tuple[str, bytes]]:
    """{file name: (where, bytes)} of the CIFAR files (:data:`_CIFAR_FILES`) in a folder,
    .tar.gz or .tar. Memory is bounded before reading: only regular files are read, each and the
    decompressed archive at most ``limit`` bytes; other files of a folder are not read at all."""
    out: dict[str, tuple[str, bytes]] = {}
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.name in _CIFAR_FILES and not f.is_dir():
                if f.name in out:  # a backup copy: which is meant?
                    raise ValueError(f"{path}: two files named {f.name}: {out[f.name][0]} and {f}")
                out[f.name] = (str(f), _read_member(f, limit))
        return out
    blob = _read_member(path, limit)  # the archive: a regular file, bounded
    try:
        if blob[:2] == b"\x1f\x8b":
            # tarfile stops at the end-of-archive marker and never checks the gzip CRC/length:
            # decompress the whole stream first so damaged bytes fail here, not as wrong pixels
            blob = _gunzip(blob, limit, path)
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            members = tar.getmembers()
            # tarfile ends the listing quietly at a damaged header after the first: only zero
            # blocks may follow where it stopped, else a later file would be reported "missing"
            if blob[tar.offset :].strip(b"\0"):
                after = f" after {members[-1].name}" if members else ""
                raise tarfile.ReadError(f"unreadable tar header at byte {tar.offset}{after}")
            for m in members:
                name = PurePosixPath(m.name).name
                if m.isfile() and name in _CIFAR_FILES:
                    fobj = tar.extractfile(m)
                    assert fobj is not None
                    out[name] = (f"{path}:{m.name}", fobj.read())
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"corrupt CIFAR archive {path}: {exc}") from exc
    return out


def _cifar_arrays(batch: dict, where: str, label_key: str) -> tuple[Tensor, Tensor]:
    missing = [k for k in ("data", label_key) if k not in batch]
    if missing:
        raise ValueError(
            f"corrupt CIFAR batch file {where}: no {' or '.join(map(repr, missing))} entry "
            f"(it has {sorted(map(str, batch))})"
        )
    data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.size % (3 * 32 * 32):
        raise ValueError(
            f"corrupt CIFAR batch file {where}: 'data' is {data.dtype} of shape {data.shape}, "
            "not uint8 rows of 3x32x32 = 3,072 pixels"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"corrupt CIFAR batch file {where}: {label_key!r} is {labels.dtype} of shape "
            f"{labels.shape}, not a list of integer labels"
        )
    images = data.reshape(-1, 3, 32, 32)
    if len(labels) != len(images):
        raise ValueError(
            f"corrupt CIFAR batch file {where}: {len(images)} images, {len(labels)} labels"
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def read_cifar_python(path: Path) -> RawData:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or CIFAR-100 (``train``,
    ``test``, ``meta``; fine labels) in the official python format, as a folder or ``.tar.gz``."""
    files = _cifar_members(path, CIFAR_MAX_BYTES)
    if "batches.meta" in files or any(n.startswith(("data_batch_", "test_batch")) for n in files):
        # CIFAR-10: all five batches are expected, so a missing one is named, never skipped
        train_names = [f"data_batch_{i}" for i in range(1, 6)]
        test_names, meta_name, label_key, names_key = (
            ["test_batch"],
            "batches.meta",
            "labels",
            "label_names",
        )
    elif "train" in files or "meta" in files:  # CIFAR-100: the check below names what is missing
        train_names, test_names, meta_name = ["train"], ["test"], "meta"
        label_key, names_key = "fine_labels", "fine_label_names"
    else:
        raise ValueError(
            f"{path} is not a CIFAR python folder/archive: expected data_batch_* or train/test/meta"
        )
    for name in [*train_names, *test_names, meta_name]:
        if name not in files:
            raise FileNotFoundError(f"CIFAR file {name!r} missing in {path}")

    where, data = files[meta_name]
    meta = _unpickle(data, where)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(names_key, [])]

    def read(names: list[str]) -> tuple[Tensor, Tensor]:
        parts = []
        for n in names:
            x, y = _cifar_arrays(_unpickle(files[n][1], files[n][0]), files[n][0], label_key)
            bad = (y < 0) | (y >= len(classes)) if classes else y < 0
            if bool(bad.any()):  # would crash the loss at step 0, or train a phantom class
                k = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"corrupt CIFAR batch file {files[n][0]}: label {int(y[k])} of "
                    f"image {k} is outside the {len(classes)} class names"
                )
            parts.append((x, y))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    tr_x, tr_y = read(train_names)
    te_x, te_y = read(test_names)
    return RawData(tr_x, tr_y, te_x, te_y, classes)
