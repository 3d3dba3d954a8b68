"""Readers that decode a data source into uint8 tensors: digits, CIFAR python, image folders.

Each reader returns a :class:`RawData` (the source's own train/test split, nothing held out yet);
:func:`reslab.data.load_data` caches it and carves the validation split.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
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


def _cifar_members(path: Path) -> dict[str, tuple[str, bytes]]:
    """{file name: (where, bytes)} of every regular file in a CIFAR folder or .tar.gz."""
    out: dict[str, tuple[str, bytes]] = {}
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.is_file():
                out[f.name] = (str(f), f.read_bytes())
        return out
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar.getmembers():
                if m.isfile():
                    fobj = tar.extractfile(m)
                    assert fobj is not None
                    out[PurePosixPath(m.name).name] = (f"{path}:{m.name}", fobj.read())
    except (tarfile.TarError, OSError, EOFError) as exc:
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
    if "batches.meta" in files or "data_batch_1" in files:  # CIFAR-10
        train_names = sorted(n for n in files if n.startswith("data_batch_"))
        test_names, meta_name, label_key, names_key = (
            ["test_batch"],
            "batches.meta",
            "labels",
            "label_names",
        )
    elif "train" in files and "meta" in files:  # CIFAR-100
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
def _list_images(path: Path) -> Iterator[tuple[PurePosixPath, str]]:
    """(relative path, where) of every image file, from a directory or a zip archive."""
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                yield PurePosixPath(f.relative_to(path).as_posix()), str(f)
    else:
        with _open_zip(path) as zf:
            for name in sorted(zf.namelist()):
                if PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES:
                    yield PurePosixPath(name), f"{path}:{name}"


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
    for f in files:
        parts = f.parts
        for i, p in enumerate(parts[:-2]):
            if p in layout and len(parts) - i == 3:  # split/class/file
                layout[p].setdefault(parts[i + 1], []).append(f)
                break
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
    entries = dict(_list_images(path))
    layout = _split_layout(list(entries), path)
    classes = sorted(layout["train"])
    unknown = sorted(set(layout["test"]) - set(classes))
    if unknown:
        raise ValueError(f"{path}: test classes {unknown} have no train/ folder")
    zf = None if path.is_dir() else _open_zip(path)

    def read_bytes(rel: PurePosixPath) -> bytes:
        if zf is None:
            return Path(entries[rel]).read_bytes()
        try:
            return zf.read(str(rel))
        except (zipfile.BadZipFile, OSError, KeyError) as exc:
            raise ValueError(f"cannot read {entries[rel]}: {exc}") from exc

    def read_split(split: str) -> tuple[Tensor, Tensor]:
        arrays, labels, shape = [], [], None
        for label, cls in enumerate(classes):
            for rel in layout[split].get(cls, []):
                a = _decode(read_bytes(rel), entries[rel])
                if shape is None:
                    shape = a.shape
                elif a.shape != shape:
                    raise ValueError(
                        f"image {entries[rel]} is {a.shape}, expected {shape} like the others"
                    )
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
