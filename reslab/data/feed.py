"""Two ways to feed a network behind one interface, and the choice between them.

Both :class:`InMemoryBatches` and :class:`~reslab.data.stream.StreamingBatches` are *training
batches*: ``len()`` batches per epoch; iterating yields the rest of the current epoch as
``(uint8 images (N, C, H, W), int64 labels)`` on the device, augmented, not yet normalised;
``state_dict()``/``load_state_dict()``/``seek(step)`` hold the position; ``set_epoch(e)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from reslab.data.augment import random_crop_flip
from reslab.data.index import SourceIndex, SplitIndex, carve
from reslab.data.memory import memory_budget
from reslab.data.stream import BatchPosition, ResumableSampler, rank_and_world, sample_seed

__all__ = [
    "LOADERS",
    "InMemoryBatches",
    "LoaderChoice",
    "TrainingBatches",
    "choose_loader",
    "streaming_splits",
]

LOADERS = ("auto", "memory", "stream")
# the in-memory path serves small images: above this side, photos want RandomResizedCrop at the
# model's input size, which is the streaming path's job
MEMORY_MAX_SIDE = 96


class TrainingBatches(Protocol):
    """What a training loop iterates: see the module docstring."""

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...
    def set_epoch(self, epoch: int) -> None: ...
    def seek(self, step: int) -> None: ...
    def state_dict(self) -> dict[str, int]: ...
    def load_state_dict(self, state: dict[str, int]) -> None: ...


@dataclass(frozen=True)
class LoaderChoice:
    kind: str  # "memory" or "stream"
    reason: str

    def __str__(self) -> str:
        return f"{self.kind} ({self.reason})"


def choose_loader(
    index: SourceIndex,
    *,
    input_size: int | None = None,
    loader: str = "auto",
    channels: int = 3,
    budget: int | None = None,
) -> LoaderChoice:
    """Which path feeds this source: "memory" for small images of one size that fit a quarter
    of memory decoded (fastest: an epoch is a gather, augmentation runs on the device), else
    "stream". ``loader`` "memory"/"stream" overrides (a memory choice that cannot work is an
    error). ``input_size``: the side the model wants, when known."""
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; valid choices: {', '.join(LOADERS)}")
    n = sum(len(s) for s in index.splits.values())
    (w0, h0), (w1, h1) = index.size_range()
    need = sum(int((s.widths.astype(np.int64) * s.heights).sum()) for s in index.splits.values())
    need *= channels
    budget = memory_budget() if budget is None else budget
    sizes = f"{n:,} images, {w0}x{h0}" + ("" if (w0, h0) == (w1, h1) else f" to {w1}x{h1}")
    problems = []
    if (w0, h0) != (w1, h1):
        problems.append("sizes differ")
    if need > budget:
        problems.append(f"{need / 2**30:.1f} GiB decoded > budget {budget / 2**30:.1f} GiB")
    if max(w1, h1) > MEMORY_MAX_SIDE:
        problems.append(f"larger than {MEMORY_MAX_SIDE} px")
    if input_size is not None and (w0, h0) == (w1, h1) and (h0, w0) != (input_size, input_size):
        problems.append(f"not the model's input size {input_size}")
    if loader == "memory":
        hard = [p for p in problems if "differ" in p or "budget" in p]
        if hard:
            raise ValueError(
                f"loader='memory' cannot hold {index.store.root} ({sizes}): " + "; ".join(hard)
            )
        return LoaderChoice("memory", f"{sizes}; asked for")
    if loader == "stream":
        return LoaderChoice("stream", f"{sizes}; asked for")
    if problems:
        return LoaderChoice("stream", f"{sizes}: " + "; ".join(problems))
    return LoaderChoice("memory", f"{sizes}, {need / 2**20:.0f} MiB decoded: fits in memory")


def streaming_splits(
    index: SourceIndex, *, val_size: int | None = None, seed: int = 0
) -> tuple[dict[str, SplitIndex], list[str]]:
    """({"train", "val", "test": SplitIndex}, notes) for the streaming path, with
    :func:`reslab.data.load_data`'s rules: the source's own val/ as validation, else ``val_size``
    images (default a tenth) held out of train/ with ``seed`` (stratified by class here)."""
    splits = dict(index.splits)
    notes = [n for n in index.notes if not n.startswith("val:")]
    if "val" not in splits:
        train = splits["train"]
        n_val = len(train) // 10 if val_size is None else val_size
        if not 0 <= n_val < len(train):
            raise ValueError(f"val_size must be in [0, {len(train)}), got {n_val}")
        splits["train"], splits["val"] = carve(train, size=n_val, seed=seed)
        notes.append(f"val: {n_val} images held out of train/ per class (seed {seed})")
    return splits, notes


def pad_crop_flip(
    padding: int = 4, flip: bool = True
) -> Callable[[Tensor, torch.Generator], Tensor]:
    """He et al. 2015, §4.2's augmentation of a whole uint8 batch on its device."""

    def augment(images: Tensor, generator: torch.Generator) -> Tensor:
        return random_crop_flip(images, padding=padding, flip=flip, generator=generator)

    return augment


class InMemoryBatches(BatchPosition):
    """Training batches from uint8 tensors held in memory (on ``device`` once, up front).

    Epoch order as the streaming path's (:class:`ResumableSampler`, disjoint parts under DDP);
    ``augment(images, generator)`` runs on the device per batch, its generator seeded from
    ``(seed, epoch, batch)``, so a resumed run sees the same batches.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        device: torch.device | str | None = None,
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(
                f"need uint8 (N, C, H, W) images and N labels, got "
                f"{tuple(images.shape)} {images.dtype}, {tuple(labels.shape)}"
            )
        rank, world_size = rank_and_world(rank, world_size)
        self.device = torch.device(device) if device is not None else images.device
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.augment = augment
        self.sampler = ResumableSampler(
            len(labels),
            batch_size=batch_size,
            seed=seed,
            shuffle=shuffle,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
        )

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.sampler:
            epoch = self.sampler.epoch
            idx = torch.tensor([i for _, i in batch], device=self.device)
            x, y = self.images[idx], self.labels[idx]
            if self.augment is not None:
                g = torch.Generator().manual_seed(
                    sample_seed(self.sampler.seed, epoch, -1 - self.sampler.batch)
                )
                x = self.augment(x, g)
            self.sampler.batch += 1
            yield x, y
        self.sampler.set_epoch(self.sampler.epoch + 1)
