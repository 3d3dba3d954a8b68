"""The in-memory path for image sources: every image decoded once into one uint8 tensor.

Fastest where it fits (CIFAR-like sets of one small size): an epoch is a gather from memory and
the augmentation runs on the device. The images' total size is known from the index before
anything is decoded, and is refused above a memory budget rather than found out by the OOM killer.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from reslab.data.images import DEFAULT_LIMITS, BadImageError, Limits, decode
from reslab.data.index import SourceIndex, SplitIndex, index_source
from reslab.data.presets import ClassificationPresetEval, InputConfig
from reslab.data.sources import RawData

__all__ = ["decode_split", "memory_budget", "read_image_folder"]


def memory_budget() -> int:
    """Bytes the in-memory path may fill: a quarter of this machine's physical memory (the
    decoded set is held once, then batches, the model and the DataLoader's copies come on top)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def _decoded_bytes(index: SourceIndex, channels: int, size: int | None) -> int:
    n = sum(len(s) for s in index.splits.values())
    if size is not None:
        return n * channels * size * size
    return sum(
        int((s.widths.astype(np.int64) * s.heights).sum()) * channels for s in index.splits.values()
    )


def _check_fits(index: SourceIndex, channels: int, size: int | None, budget: int) -> None:
    need = _decoded_bytes(index, channels, size)
    if need > budget:
        raise ValueError(
            f"{index.store.root}: decoding its {sum(len(s) for s in index.splits.values()):,} "
            f"images into memory would take {need / 2**30:.1f} GiB, over the in-memory budget of "
            f"{budget / 2**30:.1f} GiB (a quarter of this machine's memory): use the streaming "
            "loader (loader='stream'), or a smaller image_size"
        )
    if size is None and not index.uniform():
        (w0, h0), (w1, h1) = index.size_range()
        first = next(iter(index.splits.values()))
        odd = next(
            (s, i)
            for s in index.splits.values()
            for i in range(len(s))
            if (s.widths[i], s.heights[i]) != (first.widths[0], first.heights[0])
        )
        shape = (int(odd[0].heights[odd[1]]), int(odd[0].widths[odd[1]]), channels)
        ref = (int(first.heights[0]), int(first.widths[0]), channels)
        raise ValueError(
            f"image {index.store.where(odd[0].files[odd[1]])} is {shape}, expected {ref} like "
            f"{index.store.where(first.files[0])}: the images differ in size ({w0}x{h0} to "
            f"{w1}x{h1}); the in-memory path needs one size: give image_size to resize them, "
            "or use the streaming loader (loader='stream')"
        )


def _resize_and_crop(channels: int, size: int) -> ClassificationPresetEval:
    """The evaluation view of :class:`InputConfig` (shorter side to ``size``, centre crop) on
    uint8 images (the transform holds no normalisation: that happens on the training device)."""
    cfg = InputConfig(
        channels=channels, size=(size, size), resize=size, mean=(0.5,) * channels,
        std=(1.0,) * channels,
    )  # fmt: skip
    return cfg.eval_transform()


def decode_split(
    index: SourceIndex,
    split: SplitIndex,
    *,
    channels: int = 3,
    size: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
    skip_bad: bool = False,
    threads: int | None = None,
    desc: str = "decode",
) -> tuple[Tensor, Tensor, list[tuple[str, str]]]:
    """(uint8 images (N, C, H, W), int64 labels, skipped files) of one split, decoded by a pool of
    threads (torchvision's and Pillow's decoders release the GIL), with a progress bar.
    ``size``: each image resized and centre-cropped to ``size`` x ``size`` (the evaluation
    transform of :class:`InputConfig` with resize = size)."""
    from tqdm import tqdm

    transform = None if size is None else _resize_and_crop(channels, size)

    def one(i: int) -> Tensor | BadImageError:
        name = split.files[i]
        try:
            data = index.store.read(
                name, limits.max_file_bytes, offset=int(split.offsets[i]), size=int(split.nbytes[i])
            )
            x = decode(
                data, index.store.where(name), channels=channels, limits=limits, min_side=size
            )
        except BadImageError as exc:
            if not skip_bad:
                raise
            return exc
        return transform(x) if transform is not None else x

    images: list[Tensor] = []
    keep: list[int] = []
    skipped: list[tuple[str, str]] = []
    workers = threads or min(8, os.cpu_count() or 1)
    with (
        cf.ThreadPoolExecutor(workers) as pool,
        tqdm(total=len(split), desc=desc, unit="img", disable=None) as bar,
    ):
        for i, out in enumerate(pool.map(one, range(len(split)), chunksize=64)):
            bar.update(1)
            if isinstance(out, BadImageError):
                skipped.append((out.where, out.reason))
                continue
            images.append(out)
            keep.append(i)
    if images:
        x = torch.stack(images)
    else:
        side = size or 0
        x = torch.zeros(0, channels, side, side, dtype=torch.uint8)
    return x, torch.from_numpy(split.labels[np.asarray(keep, dtype=np.int64)]), skipped


def read_image_folder(
    path: Path,
    *,
    channels: int = 3,
    image_size: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
    skip_bad: bool = False,
    cache_dir: Path | None = None,
    budget: int | None = None,
) -> RawData:
    """Decode an image source (class folders in a directory or zip, a CSV/TSV list, or packed
    shards) into memory. All images must share one size unless ``image_size`` resizes them."""
    index = index_source(Path(path), limits=limits, skip_bad=skip_bad, cache_dir=cache_dir)
    _check_fits(index, channels, image_size, memory_budget() if budget is None else budget)
    out: dict[str, tuple[Tensor, Tensor]] = {}
    skipped = list(index.skipped)
    for name, split in index.splits.items():
        x, y, bad = decode_split(
            index,
            split,
            channels=channels,
            size=image_size,
            limits=limits,
            skip_bad=skip_bad,
            desc=f"decode {name}",
        )
        out[name] = (x, y)
        skipped += bad
    val = out.get("val")
    return RawData(
        *out["train"],
        *out["test"],
        index.classes,
        val[0] if val else None,
        val[1] if val else None,
        skipped,
        list(index.notes),
    )
