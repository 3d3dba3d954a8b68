"""Open any data source for a run: :func:`open_data` picks the in-memory or the streaming path
and returns the run's :class:`~reslab.data.training.TrainingData`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reslab.data import DataSplits, Split, _is_cifar_python, load_data
from reslab.data.feed import LoaderChoice, choose_loader, streaming_splits
from reslab.data.images import DEFAULT_LIMITS, Limits
from reslab.data.index import SplitIndex, index_source
from reslab.data.presets import InputConfig
from reslab.data.training import MemoryData, StreamData, TrainingData, plain_input

__all__ = ["open_data"]


def _geometry(
    size: int | None,
    resize: int | str | None,
    default_cfg: dict[str, Any] | None,
) -> tuple[tuple[int, int], int | None, str]:
    """((H, W), resize, interpolation) of a streamed input: ``size`` else the model's
    ``default_cfg`` input size; ``resize`` "auto" = floor(side / crop_pct) with the model's
    crop_pct (timm's rule; 0.875 without a model), an int, or None (straight to the size)."""
    cfg = default_cfg or {}
    if size is None:
        if "input_size" not in cfg:
            raise ValueError(
                "the images differ in size or are not the input size: give the input side "
                "(image_size=N, --image-size N)"
            )
        _, h, w = cfg["input_size"]
    else:
        h = w = size
    interpolation = str(cfg.get("interpolation", "bilinear"))
    if interpolation not in ("nearest", "bilinear", "bicubic"):  # timm's "random" and others
        interpolation = "bilinear"
    side: int | None
    if resize == "auto":
        squash = cfg.get("crop_mode") == "squash"
        side = None if squash else math.floor(min(h, w) / float(cfg.get("crop_pct", 0.875)))
    elif isinstance(resize, str):
        raise ValueError(f"resize must be 'auto', a side in pixels or None, got {resize!r}")
    else:
        side = resize
    return (int(h), int(w)), side, interpolation


def _select(
    splits: dict[str, SplitIndex],
    classes: list[str],
    keep: Sequence[str] | None,
    train_fraction: float,
    seed: int,
) -> tuple[dict[str, SplitIndex], list[str]]:
    """``keep``'s classes relabelled 0..k-1 in that order, then ``train_fraction`` of each
    class's training images (drawn with ``seed``): :func:`load_data`'s rules for an index."""
    if keep is not None:
        missing = [c for c in keep if c not in classes]
        if missing:
            raise ValueError(f"unknown classes {missing}; valid: {', '.join(classes)}")
        mapping = np.full(len(classes), -1, np.int64)
        mapping[[classes.index(c) for c in keep]] = np.arange(len(keep))
        out = {}
        for name, s in splits.items():
            new = mapping[s.labels]
            s = s.take(np.flatnonzero(new >= 0))
            out[name] = SplitIndex(s.files, new[new >= 0], s.widths, s.heights, s.offsets, s.nbytes)
        splits, classes = out, list(keep)
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    if train_fraction < 1.0:
        train, rng = splits["train"], np.random.default_rng(seed)
        kept = []
        for c in range(len(classes)):
            idx = rng.permutation(np.flatnonzero(train.labels == c))
            kept.append(idx[: max(1, round(len(idx) * train_fraction))])
        splits = {**splits, "train": train.take(np.sort(np.concatenate(kept)))}
    return splits, classes


def open_data(
    spec: str,
    *,
    loader: str = "auto",
    image_size: int | None = None,
    resize: int | str | None = "auto",
    input: InputConfig | None = None,
    default_cfg: dict[str, Any] | None = None,
    skip_bad: bool = False,
    val_size: int | None = None,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    train_fraction: float = 1.0,
    workers: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
    cache_dir: Path | None = None,
    verbose: bool = False,
) -> TrainingData:
    """The data of a run from any source, in memory or streamed.

    ``loader`` "auto" picks from the data (:func:`choose_loader`: small images of one size that
    fit in memory, at the input size, go to memory; the rest streams), "memory"/"stream"
    override. The input: ``input`` (a checkpoint's, for evaluation) or ``image_size`` (default:
    the data's own size in memory, else the model's ``default_cfg`` input size) with ``resize``
    (the shorter side before the centre crop; "auto": the model's crop_pct rule; None: straight
    to the size). ``val_size``/``seed``: the validation split held out of train/ when the source
    has no val/; ``classes``/``train_fraction``: a subset, as :func:`load_data`. ``skip_bad``
    leaves unreadable images out (listed) instead of stopping with an error naming the first.

    Over 60 lines because it is the one place where the three ways in (whole in memory,
    decoded to memory, streamed) are chosen; split, the choice would be spread over helpers
    that each need all the arguments.
    """
    if input is not None:
        image_size, resize = int(input.size[0]), input.resize
    path = Path(spec).expanduser()
    in_memory_only = spec == "digits" or (path.exists() and _is_cifar_python(path))
    if in_memory_only or not path.exists():
        if loader == "stream":
            raise ValueError(f"{spec} is read into memory whole; --loader stream is for image "
                             "folders, .zip archives, CSV/TSV lists and packed shards")  # fmt: skip
        splits = load_data(spec, cache_dir=cache_dir, seed=seed, classes=classes,
                           train_fraction=train_fraction, val_size=val_size,
                           verbose=verbose)  # fmt: skip
        return _memory(splits, image_size, resize, input, LoaderChoice("memory", "tensors"))
    index = index_source(path, limits=limits, skip_bad=skip_bad, cache_dir=cache_dir,
                         progress=verbose)  # fmt: skip
    choice = choose_loader(index, input_size=image_size, loader=loader)
    if choice.kind == "memory":
        (w0, h0), _ = index.size_range()
        if image_size is not None and (h0, w0) != (image_size, image_size):
            if resize not in ("auto", image_size):
                raise ValueError(
                    "the in-memory loader resizes the shorter side to the image size and crops "
                    "the centre; another resize needs the streaming loader (--loader stream)"
                )
            resize = image_size
        splits = load_data(
            spec, cache_dir=cache_dir, seed=seed, classes=classes, train_fraction=train_fraction,
            val_size=val_size, verbose=verbose, image_size=image_size, skip_bad=skip_bad,
            limits=limits,
        )  # fmt: skip
        return _memory(splits, None, resize, input, choice)
    parts, notes = streaming_splits(index, val_size=val_size, seed=seed)
    parts, names = _select(parts, index.classes, classes, train_fraction, seed)
    if input is None:
        size, rs, interpolation = _geometry(image_size, resize, default_cfg)
        input = plain_input(3, size, resize=rs, interpolation=interpolation)
    data = StreamData(
        index, parts, input=input, loader=choice, notes=notes, workers=workers,
        skip_bad=skip_bad, limits=limits,
    )  # fmt: skip
    data.classes = names
    return data


def _memory(
    splits: DataSplits,
    image_size: int | None,
    resize: int | str | None,
    input: InputConfig | None,
    choice: LoaderChoice,
) -> MemoryData:
    """In-memory splits at the input size: resized here when ``image_size`` differs from the
    data's (digits and CIFAR python are tensors already), with ``input``'s or ``resize``'s
    policy."""
    c, h, w = (int(s) for s in splits.train.images.shape[1:])
    if input is None:
        size = (image_size, image_size) if image_size is not None else (h, w)
        side = resize if isinstance(resize, int) else min(size)
        input = plain_input(c, size, resize=None if resize is None else side)
    if tuple(input.size) != (h, w):
        t = input.eval_transform()
        splits = DataSplits(
            train=Split(t(splits.train.images), splits.train.labels),
            val=Split(t(splits.val.images), splits.val.labels),
            test=Split(t(splits.test.images), splits.test.labels),
            classes=splits.classes,
            name=splits.name,
            notes=[*splits.notes, f"resized from {h}x{w} to {input.size[0]}x{input.size[1]}"],
            skipped=splits.skipped,
        )
    return MemoryData(splits, input=input, loader=choice)
