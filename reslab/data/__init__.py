"""Data: image sources of any size, fed to a network in memory or streamed by DataLoader workers.

``load_data("digits" | CIFAR python folder/.tar.gz | image folder dir/.zip | CSV list)`` is the
in-memory path: it returns :class:`DataSplits` of uint8 tensors, with the training set split into
train/val (He et al. 2015, §4.2: 45k/5k) unless the source has its own val/, so the test set is
never used to choose anything. :mod:`reslab.data.stream` decodes in worker processes instead, for
data of any size and number; :func:`choose_loader` picks between the two from the index.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from reslab.data.augment import Normalize, random_crop_flip
from reslab.data.cache import cache_path, default_cache_dir, load_cached, save_cached
from reslab.data.images import DEFAULT_LIMITS, BadImageError, Limits
from reslab.data.index import SourceIndex, index_source
from reslab.data.memory import read_image_folder
from reslab.data.presets import (
    ClassificationPresetEval,
    ClassificationPresetTrain,
    InputConfig,
    PCALighting,
    RandomResizedCropFlip,
)
from reslab.data.sources import RawData, read_cifar_python, read_digits
from reslab.data.store import check_source

__all__ = [
    "BadImageError",
    "ClassificationPresetEval",
    "ClassificationPresetTrain",
    "DataSplits",
    "InputConfig",
    "Limits",
    "Normalize",
    "PCALighting",
    "RandomResizedCropFlip",
    "RawData",
    "SourceIndex",
    "Split",
    "index_source",
    "load_data",
    "load_raw",
    "random_crop_flip",
    "read_image_folder",
]


@dataclass(frozen=True)
class Split:
    """Images as uint8 (N, C, H, W) on the CPU and int64 labels (N,)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DataSplits:
    train: Split
    val: Split
    test: Split
    classes: list[str]
    name: str
    notes: list[str] = field(default_factory=list)  # where val/test came from, for the run record
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason), skip_bad only

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _is_cifar_python(path: Path) -> bool:
    if path.is_dir():
        return any(
            (p / "batches.meta").exists() or (p / "meta").exists() for p in (path, *path.iterdir())
        )
    return path.name.endswith((".tar.gz", ".tgz", ".tar"))


def load_raw(
    spec: str,
    *,
    cache_dir: Path | None = None,
    verbose: bool = False,
    image_size: int | None = None,
    channels: int = 3,
    skip_bad: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> RawData:
    """Decode ``spec`` (or reload it from the cache) without splitting.

    Image sources only: ``image_size`` resizes (shorter side) and centre-crops every image to a
    square of that side, so images of mixed sizes fit one tensor; ``channels`` 1 or 3;
    ``skip_bad`` leaves unreadable images out, listed in ``RawData.skipped``, instead of raising
    an error that names the first; ``limits`` bound each image before it is decoded.
    """
    if spec == "digits":
        return read_digits()
    path = check_source(Path(spec).expanduser())  # missing, a pipe, a device: named
    cache_dir = cache_dir or default_cache_dir()
    options = f"{image_size}|{channels}|{skip_bad}|{limits}"
    file = cache_path(path, cache_dir, extra=options)
    t0 = time.perf_counter()
    raw = load_cached(file)
    if raw is not None:
        if verbose:
            print(f"data: {path} from cache {file} in {time.perf_counter() - t0:.2f} s")
        return raw
    if _is_cifar_python(path):
        raw = read_cifar_python(path)
    else:
        raw = read_image_folder(
            path,
            channels=channels,
            image_size=image_size,
            skip_bad=skip_bad,
            limits=limits,
            cache_dir=cache_dir,
        )
    save_cached(raw, file)
    if verbose:
        print(f"data: decoded {path} in {time.perf_counter() - t0:.1f} s, cached at {file}")
        for line in raw.notes:
            print(f"data: {line}")
        if raw.skipped:
            print(
                f"data: skipped {len(raw.skipped)} unreadable image(s): "
                + "; ".join(f"{w} ({r})" for w, r in raw.skipped[:5])
            )
    return raw


def _keep_classes(x: Tensor, y: Tensor, keep: list[int]) -> tuple[Tensor, Tensor]:
    # sized for both the kept classes and this split's labels: a split may lack the last class
    size = max([*keep, int(y.max()) if len(y) else 0]) + 1
    mapping = torch.full((size,), -1, dtype=torch.int64)
    mapping[torch.tensor(keep)] = torch.arange(len(keep))
    new = mapping[y]
    mask = new >= 0
    return x[mask], new[mask]


def load_data(
    spec: str,
    *,
    cache_dir: Path | None = None,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    train_fraction: float = 1.0,
    val_size: int | None = None,
    verbose: bool = False,
    image_size: int | None = None,
    channels: int = 3,
    skip_bad: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> DataSplits:
    """Load a data set into memory and split it into train/val/test.

    A source with its own val/ split uses it as validation (``val_size`` is then ignored);
    otherwise ``val_size`` images (default: a tenth of the training set, 5,000 of CIFAR's
    50,000 as in He et al. 2015, §4.2) are held out of the training set at random (``seed``).
    ``classes`` keeps those classes relabelled 0..k-1 in the given order; ``train_fraction`` then
    keeps that share of each class's remaining training images. ``image_size``, ``channels``,
    ``skip_bad`` and ``limits``: see :func:`load_raw`.

    Over 60 lines with this docstring; its body (under 60) is the one place the three kinds of
    source meet their split rules, in the order a reader checks them.
    """
    raw = load_raw(
        spec,
        cache_dir=cache_dir,
        verbose=verbose,
        image_size=image_size,
        channels=channels,
        skip_bad=skip_bad,
        limits=limits,
    )
    names = raw.classes or [str(i) for i in range(int(raw.train_labels.max()) + 1)]
    tr_x, tr_y, te_x, te_y = raw.train_images, raw.train_labels, raw.test_images, raw.test_labels
    own_val = raw.val_images is not None and raw.val_labels is not None
    va_x, va_y = (raw.val_images, raw.val_labels) if own_val else (tr_x[:0], tr_y[:0])
    assert va_x is not None and va_y is not None
    if classes is not None:
        missing = [c for c in classes if c not in names]
        if missing:
            raise ValueError(f"unknown classes {missing} in {spec}; valid: {', '.join(names)}")
        keep = [names.index(c) for c in classes]
        tr_x, tr_y = _keep_classes(tr_x, tr_y, keep)
        va_x, va_y = _keep_classes(va_x, va_y, keep)
        te_x, te_y = _keep_classes(te_x, te_y, keep)
        names = list(classes)
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    n = len(tr_y)
    notes = list(raw.notes)
    if own_val:  # the source's own val/ is the validation set: nothing more is held out
        n_val = 0
        notes = [m for m in notes if not m.startswith("val:")]
    else:
        n_val = n // 10 if val_size is None else val_size
        if not 0 <= n_val < n:
            raise ValueError(f"val_size must be in [0, {n}), got {n_val}")
        notes = [m for m in notes if not m.startswith("val:")]
        notes.append(f"val: {n_val} images held out of train/ at random (seed {seed})")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    val_idx, train_idx = torch.sort(perm[:n_val]).values, torch.sort(perm[n_val:]).values
    if train_fraction < 1.0:
        kept = []
        for c in range(len(names)):
            idx = train_idx[tr_y[train_idx] == c]
            idx = idx[torch.randperm(len(idx), generator=g)]
            kept.append(idx[: max(1, round(len(idx) * train_fraction))])
        train_idx = torch.sort(torch.cat(kept)).values
    name = spec if spec == "digits" else Path(spec).name
    val = Split(va_x.clone(), va_y.clone()) if own_val else Split(tr_x[val_idx], tr_y[val_idx])
    return DataSplits(
        train=Split(tr_x[train_idx], tr_y[train_idx]),
        val=val,
        test=Split(te_x.clone(), te_y.clone()),
        classes=names,
        name=name,
        notes=notes,
        skipped=list(raw.skipped),
    )
