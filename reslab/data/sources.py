"""Readers that decode a data source into uint8 tensors: digits, CIFAR python, image folders.

Each reader returns a :class:`RawData` (the source's own train/test split, nothing held out yet);
:func:`reslab.data.load_data` caches it and carves the validation split.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

__all__ = ["RawData", "read_cifar_python", "read_digits", "read_image_folder"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


@dataclass(frozen=True)
class RawData:
    """A source's own train/test split as uint8 (N, C, H, W) images and int64 labels."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: list[str]


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

    def read(names: list[str]) -> tuple[Tensor, Tensor]:
        parts = [
            _cifar_arrays(_unpickle(files[n][1], files[n][0]), files[n][0], label_key)
            for n in names
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    where, data = files[meta_name]
    meta = _unpickle(data, where)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(names_key, [])]
    tr_x, tr_y = read(train_names)
    te_x, te_y = read(test_names)
    return RawData(tr_x, tr_y, te_x, te_y, classes)


# -- image folders -------------------------------------------------------------------------------
def _is_image(rel: PurePosixPath) -> bool:
    """An image by its suffix, except macOS Finder metadata (``__MACOSX/``, ``._*`` AppleDouble
    files), which carries image suffixes but is not an image."""
    return (
        rel.suffix.lower() in IMAGE_SUFFIXES
        and "__MACOSX" not in rel.parts
        and not rel.name.startswith("._")
    )


def _list_images(path: Path) -> Iterator[tuple[PurePosixPath, str, str]]:
    """(relative path, where, name to read) of every image file, from a directory or a zip
    archive. The name to read is the file's path, or the zip member's name as stored: the
    relative path is normalised (``./train/a.png`` -> ``train/a.png``) and may not open it."""
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            rel = PurePosixPath(f.relative_to(path).as_posix())
            if _is_image(rel) and f.is_file():
                yield rel, str(f), str(f)
    else:
        with _open_zip(path) as zf:
            for name in sorted(zf.namelist()):
                if _is_image(PurePosixPath(name)):
                    yield PurePosixPath(name), f"{path}:{name}", name


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"corrupt or unreadable zip archive {path}: {exc}") from exc


def _split_layout(
    files: list[PurePosixPath], root: Path
) -> dict[str, dict[str, list[PurePosixPath]]]:
    """{"train"|"test": {class: [files]}} from ``[top/]train/<class>/<file>`` paths."""
    layout: dict[str, dict[str, list[PurePosixPath]]] = {"train": {}, "test": {}}
    nested = []  # split/class/.../file: not read, so not silently dropped either
    for f in files:
        parts = f.parts
        for i, p in enumerate(parts[:-2]):
            if p in layout and len(parts) - i == 3:  # split/class/file
                layout[p].setdefault(parts[i + 1], []).append(f)
                break
        else:
            if any(p in layout for p in parts[:-3]):
                nested.append(f)
    if nested:
        raise ValueError(
            f"{root}: {len(nested)} image(s) sit below a class folder, e.g. {nested[0]}; images "
            "must be directly in [top/]train/<class>/ and [top/]test/<class>/"
        )
    for split in ("train", "test"):
        if not layout[split]:
            raise ValueError(
                f"{root}: no images found under a '{split}/<class>/' folder "
                "(expected [top/]train/<class>/*.jpg and [top/]test/<class>/*.jpg)"
            )
    return layout


def _decode(data: bytes, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise ValueError(f"cannot decode image {where}: {exc}") from exc


def read_image_folder(path: Path) -> RawData:
    """Images in ``[top/]train/<class>/`` and ``[top/]test/<class>/``, from a folder or a zip read
    in place. Class names are the sorted folder names of ``train/``; all images share one size."""
    entries = {rel: (where, name) for rel, where, name in _list_images(path)}
    layout = _split_layout(list(entries), path)
    classes = sorted(layout["train"])
    unknown = sorted(set(layout["test"]) - set(classes))
    if unknown:
        raise ValueError(f"{path}: test classes {unknown} have no train/ folder")
    zf = None if path.is_dir() else _open_zip(path)

    def read_bytes(rel: PurePosixPath) -> bytes:
        where, name = entries[rel]
        if zf is None:
            return Path(name).read_bytes()
        try:
            return zf.read(name)
        except (zipfile.BadZipFile, OSError, KeyError, EOFError, zlib.error) as exc:
            # a damaged deflate stream raises a bare zlib.error that names no file
            raise ValueError(f"cannot read {where}: {exc}") from exc

    first: list[tuple[tuple[int, ...], str]] = []  # (shape, where) of the first image decoded

    def read_split(split: str) -> tuple[Tensor, Tensor]:
        arrays, labels = [], []
        for label, cls in enumerate(classes):
            for rel in layout[split].get(cls, []):
                where = entries[rel][0]
                a = _decode(read_bytes(rel), where)
                if not first:
                    first.append((a.shape, where))
                elif a.shape != first[0][0]:  # one size across train and test: a model fits one
                    shape, ref = first[0]
                    raise ValueError(f"image {where} is {a.shape}, expected {shape} like {ref}")
                arrays.append(a)
                labels.append(label)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return x, torch.tensor(labels, dtype=torch.int64)

    try:
        tr_x, tr_y = read_split("train")
        te_x, te_y = read_split("test")
    finally:
        if zf is not None:
            zf.close()
    return RawData(tr_x, tr_y, te_x, te_y, classes)
