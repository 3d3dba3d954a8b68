"""Two ways to feed a network behind one interface, :class:`TrainingBatches`, and the choice
between them.

:class:`InMemoryBatches` (uint8 tensors held in memory, augmented on the device) and
:class:`~reslab.data.stream.StreamingBatches` (decoded and augmented in DataLoader workers) are
the two implementations; :func:`reslab.train.fit` takes either through
:class:`~reslab.data.training.TrainingData`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from reslab.data.augment import crop_flip
from reslab.data.index import SourceIndex, SplitIndex, carve
from reslab.data.memory import memory_budget
from reslab.data.stream import BatchPosition, ResumableSampler, rank_and_world, sample_seed

__all__ = [
    "LOADERS",
    "InMemoryBatches",
    "LoaderChoice",
    "TrainingBatches",
    "choose_loader",
    "endless",
    "pad_crop_flip",
    "rank_batch_size",
    "streaming_splits",
]

LOADERS = ("auto", "memory", "stream")
# the in-memory path serves small images: above this side, photos want RandomResizedCrop at the
# model's input size, which is the streaming path's job
MEMORY_MAX_SIDE = 96


@runtime_checkable
class TrainingBatches(Protocol):
    """The training images of one run, batch by batch, resumable at any step.

    The contract that exact resume and DDP rest on:

    - ``len()`` is the number of optimiser steps of one epoch, the same on every rank.
    - Iterating yields the rest of the current epoch from the position: this rank's share of each
      global batch as uint8 images (N, C, H, W) and int64 labels (N,) on the training device,
      augmented but not normalised (normalisation belongs to the model's ``input_norm``). The
      ranks' shares are disjoint, equal in size and together the global batch (a streamed batch
      may be short by the images ``skip_bad`` left out). Each yielded batch advances the
      position; after a full pass it is batch 0 of the next epoch.
    - Batches are a function of the run seed and the position only (epoch order seeded from
      (seed, epoch), each sample's augmentation from (seed, epoch, sample)): the same position
      gives the same batches bit for bit, whatever the number of ranks or DataLoader workers.
    - ``state_dict()`` is the position as plain data that ``torch.load(..., weights_only=True)``
      reads; ``load_state_dict()`` puts it back (refusing a position of other data, seed or
      number of ranks); ``seek(step)`` goes to global step ``step``.
    """

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...
    def seek(self, step: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def endless(batches: TrainingBatches) -> Iterator[tuple[Tensor, Tensor]]:
    """The batches from the current position on, epoch after epoch."""
    if len(batches) < 1:
        raise ValueError("training batches with no batch per epoch")
    while True:
        yield from batches


def rank_batch_size(num_samples: int, batch_size: int, world_size: int) -> int:
    """One rank's share of a global batch of ``batch_size`` images; a training split smaller
    than one batch trains on all its images each step. Refuses shares that cannot be equal,
    which would weight the ranks' images unequally in DDP's mean gradient."""
    if num_samples < 1:
        raise ValueError("the training split is empty")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by {world_size} ranks")
    size = min(batch_size, num_samples)
    if size % world_size:
        raise ValueError(
            f"{num_samples} training images, fewer than one batch of {batch_size}, cannot be "
            f"split evenly over {world_size} ranks: use a multiple of {world_size} images or "
            "fewer ranks"
        )
    return size // world_size


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


Augment = Callable[[Tensor, list[int]], Tensor]


def pad_crop_flip(padding: int = 4, flip: bool = True) -> Augment:
    """He et al. 2015, §4.2's augmentation of a whole uint8 batch on its device: zero padding,
    a random crop of the original size and a mirror with probability 1/2, each sample's offsets
    and mirror taken from its own seed (so they do not depend on which batch or rank it is in).
    """
    side = 2 * padding + 1

    def augment(images: Tensor, seeds: list[int]) -> Tensor:
        # three draws from one 63-bit hash per sample: the offsets' bias is below 2**-50
        s = torch.tensor(seeds, dtype=torch.int64)
        dy, dx = s % side, (s // side) % side
        mirror = (s >> 40) & 1 == 1 if flip else torch.zeros(len(s), dtype=torch.bool)
        return crop_flip(images, dy, dx, mirror, padding=padding)

    return augment


class InMemoryBatches(BatchPosition):
    """Training batches from uint8 tensors held in memory (on ``device`` once, up front).

    ``batch_size`` is per rank. Epoch order as the streaming path's (:class:`ResumableSampler`:
    a permutation seeded from (seed, epoch), each rank a strided share of every global batch);
    ``augment(images, seeds)`` runs on the device per batch with each sample's seed from
    ``(seed, epoch, sample)`` (:func:`pad_crop_flip`), so a resumed run, and every number of
    ranks, sees the same images.
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
        augment: Augment | None = None,
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

    @classmethod
    def training(
        cls,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        seed: int,
        device: torch.device | str | None = None,
        pad: int = 4,
        flip: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> InMemoryBatches:
        """The trainer's batches of a training split: this rank's share of global batches of
        ``batch_size`` (:func:`rank_batch_size`), padded, cropped and mirrored
        (:func:`pad_crop_flip`; ``pad=0, flip=False``: as they are)."""
        return cls(
            images,
            labels,
            batch_size=rank_batch_size(len(labels), batch_size, world_size),
            seed=seed,
            device=device,
            augment=pad_crop_flip(pad, flip) if pad or flip else None,
            rank=rank,
            world_size=world_size,
        )

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.sampler:
            epoch = self.sampler.epoch
            picks = [i for _, i in batch]
            idx = torch.tensor(picks, device=self.device)
            x, y = self.images[idx], self.labels[idx]
            if self.augment is not None:
                x = self.augment(x, [sample_seed(self.sampler.seed, epoch, i) for i in picks])
            self.sampler.batch += 1
            yield x, y
        self.sampler.set_epoch(self.sampler.epoch + 1)
