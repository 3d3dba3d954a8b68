"""Readers that decode a data source into uint8 tensors: digits and CIFAR python (image folders:
:mod:`reslab.data.memory`).

Each reader returns a :class:`RawData` (the source's own train/test split, nothing held out yet);
:func:`reslab.data.load_data` caches it and carves the validation split.
"""

from __future__ import annotations

import gzip
import io
import pickle
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


# the official python versions' files (CIFAR-10, then CIFAR-100)
_CIFAR_FILES = {
    *(f"data_batch_{i}" for i in range(1, 6)),
    *("test_batch", "batches.meta", "train", "test", "meta"),
}


def _cifar_members(path: Path) -> dict[str, tuple[str, bytes]]:
    """{file name: (where, bytes)} of every regular file in a CIFAR folder, .tar.gz or .tar."""
    out: dict[str, tuple[str, bytes]] = {}
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.is_file():
                if f.name in out and f.name in _CIFAR_FILES:  # a backup copy: which is meant?
                    raise ValueError(f"{path}: two files named {f.name}: {out[f.name][0]} and {f}")
                out.setdefault(f.name, (str(f), f.read_bytes()))
        return out
    try:
        blob = path.read_bytes()
        if blob[:2] == b"\x1f\x8b":
            # tarfile stops at the end-of-archive marker and never checks the gzip CRC/length:
            # decompress the whole stream first so damaged bytes fail here, not as wrong pixels
            blob = gzip.decompress(blob)
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            members = tar.getmembers()
            # tarfile ends the listing quietly at a damaged header after the first: only zero
            # blocks may follow where it stopped, else a later file would be reported "missing"
            if blob[tar.offset :].strip(b"\0"):
                after = f" after {members[-1].name}" if members else ""
                raise tarfile.ReadError(f"unreadable tar header at byte {tar.offset}{after}")
            for m in members:
                if m.isfile():
                    fobj = tar.extractfile(m)
                    assert fobj is not None
                    out[PurePosixPath(m.name).name] = (f"{path}:{m.name}", fobj.read())
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"corrupt CIFAR archive {path}: {exc}") from exc
    return out


def _cifar_arrays(batch: dict, where: str, label_key: str) -> tuple[Tensor, Tensor]:
    try:
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"corrupt CIFAR batch file {where}: {exc!r}") from exc
    if len(labels) != len(data):
        raise ValueError(
            f"corrupt CIFAR batch file {where}: {len(data)} images, {len(labels)} labels"
        )
    return torch.from_numpy(data.copy()), torch.from_numpy(labels)


def read_cifar_python(path: Path) -> RawData:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or CIFAR-100 (``train``,
    ``test``, ``meta``; fine labels) in the official python format, as a folder or ``.tar.gz``."""
    files = _cifar_members(path)
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
