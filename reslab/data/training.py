"""The data of one training run, whichever way it is fed: :class:`TrainingData`.

:func:`reslab.data.reading.open_data` reads any source (digits, CIFAR python, an image folder or
``.zip``, a CSV/TSV list, packed shards), picks the in-memory or the streaming path
(:func:`~reslab.data.feed.choose_loader`, or the caller's ``loader``) and returns a
:class:`MemoryData` or a :class:`StreamData`. The trainer only sees their common interface: the
training batches (:class:`~reslab.data.feed.TrainingBatches`), evaluation batches of each split,
the statistics to normalise with, and the :class:`~reslab.data.presets.InputConfig` that
evaluation, ``predict`` and export apply.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reslab.data import DataSplits, Split
from reslab.data.augment import Normalize
from reslab.data.feed import (
    MEMORY_MAX_SIDE,
    InMemoryBatches,
    LoaderChoice,
    TrainingBatches,
    rank_batch_size,
)
from reslab.data.images import DEFAULT_LIMITS, Limits
from reslab.data.index import SourceIndex, SplitIndex
from reslab.data.presets import ClassificationPresetTrain, InputConfig
from reslab.data.stream import ImageDataset, StreamingBatches

__all__ = [
    "AUGMENTS",
    "EvalBatches",
    "MemoryData",
    "StreamData",
    "TrainingData",
    "as_training_data",
    "default_workers",
    "plain_input",
]

#: Training augmentations: "cifar" pads, crops and mirrors (He et al. 2015, §4.2), "photo" is
#: RandomResizedCrop + flip, "imagenet" the scale augmentation of §3.4, "none" the evaluation
#: transform; "auto" is "cifar" for inputs up to MEMORY_MAX_SIDE pixels and "photo" above.
AUGMENTS = ("auto", "cifar", "photo", "imagenet", "none")
NORM_SAMPLE = 5000  # training images a streamed source's normalisation statistics are taken from
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class EvalBatches:
    """A split's images for evaluation: an iterable of (uint8 images, labels) batches at the
    model's input size, and how many images it holds."""

    batches: Iterable[tuple[Tensor, Tensor]]
    size: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # filled while iterating

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(self.batches)


class TrainingData(ABC):
    """The data of one run: its splits, how they are fed, and the input a model trained on them
    takes (``input``: size, resize/crop policy, interpolation; the normalisation is filled in
    by the trainer from :meth:`normalization` or from pretrained weights)."""

    def __init__(
        self,
        *,
        name: str,
        classes: list[str],
        input: InputConfig,
        loader: LoaderChoice,
        notes: Sequence[str] = (),
        skipped: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.name, self.classes, self.input, self.loader = name, list(classes), input, loader
        self.notes, self.skipped = list(notes), list(skipped)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.input.channels

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the model's input."""
        return (int(self.input.size[0]), int(self.input.size[1]))

    def augmentation(self, kind: str) -> str:
        """``kind`` with "auto" resolved for this data's input size."""
        if kind not in AUGMENTS:
            raise ValueError(f"unknown augmentation {kind!r}; valid choices: {', '.join(AUGMENTS)}")
        if kind == "auto":
            return "cifar" if max(self.image_size) <= MEMORY_MAX_SIDE else "photo"
        return kind

    @abstractmethod
    def split_size(self, split: str) -> int:
        """Images in ``split`` ("train", "val" or "test")."""

    @abstractmethod
    def train_batches(
        self,
        batch_size: int,
        *,
        seed: int,
        device: torch.device,
        augment: str = "auto",
        pad: int = 4,
        flip: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> TrainingBatches:
        """This rank's training batches of a global ``batch_size``."""

    @abstractmethod
    def eval_batches(self, split: str, *, batch_size: int, device: torch.device) -> EvalBatches:
        """``split``'s images at the input size in batches of uint8 images and labels (streamed:
        never more than a batch of the split in memory)."""

    @abstractmethod
    def images(self, split: str) -> Iterator[tuple[list[Tensor], Tensor]]:
        """``split``'s images as decoded, before any resize (for multi-crop evaluation), in
        small groups: (list of uint8 (C, H, W), labels)."""

    @abstractmethod
    def fingerprint(self, split: str, samples: int) -> Iterator[bytes]:
        """What identifies ``split`` beyond its size, for a resume's data check: its labels and
        up to ``samples`` of its images (in memory) or its file names and sizes (streamed)."""

    @abstractmethod
    def normalization(self, mode: str) -> Normalize:
        """Statistics of the training images at the input size: "pixel" mean or "channel"
        mean/std (:meth:`Normalize.fit`)."""

    def record(self) -> dict[str, Any]:
        """config.json's "data" entry."""
        return {
            "name": self.name,
            "classes": self.classes,
            **{s: self.split_size(s) for s in SPLITS},
            "loader": str(self.loader),
            "input": self.input.describe(),
            "notes": self.notes,
            "skipped": len(self.skipped),
        }


class MemoryData(TrainingData):
    """Splits held in memory as uint8 tensors (:class:`~reslab.data.DataSplits`): batches are
    gathered and augmented on the training device."""

    def __init__(
        self,
        splits: DataSplits,
        *,
        input: InputConfig | None = None,
        loader: LoaderChoice | None = None,
    ) -> None:
        c, h, w = (int(s) for s in splits.train.images.shape[1:])
        super().__init__(
            name=splits.name,
            classes=splits.classes,
            input=input or plain_input(c, (h, w), resize=min(h, w)),
            loader=loader or LoaderChoice("memory", f"{splits.name}: tensors in memory"),
            notes=splits.notes,
            skipped=splits.skipped,
        )
        self.splits = splits

    def split_size(self, split: str) -> int:
        return len(getattr(self.splits, split))

    def train_batches(
        self,
        batch_size: int,
        *,
        seed: int,
        device: torch.device,
        augment: str = "auto",
        pad: int = 4,
        flip: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> TrainingBatches:
        kind = "cifar" if augment == "auto" else self.augmentation(augment)
        if kind not in ("cifar", "none"):
            raise ValueError(
                f"the in-memory loader augments by padding, cropping and mirroring only; the "
                f"{kind!r} augmentation needs the streaming loader (--loader stream)"
            )
        train = self.splits.train
        return InMemoryBatches.training(
            train.images,
            train.labels,
            batch_size,
            seed=seed,
            device=device,
            pad=pad if kind == "cifar" else 0,
            flip=flip and kind == "cifar",
            rank=rank,
            world_size=world_size,
        )

    def eval_batches(self, split: str, *, batch_size: int, device: torch.device) -> EvalBatches:
        s: Split = getattr(self.splits, split)
        slices = [
            (s.images[i : i + batch_size], s.labels[i : i + batch_size])
            for i in range(0, len(s), batch_size)
        ]  # views of the split's tensor, moved to the device batch by batch by evaluate
        return EvalBatches(slices, len(s), self.splits.skipped)

    def images(self, split: str) -> Iterator[tuple[list[Tensor], Tensor]]:
        s: Split = getattr(self.splits, split)
        for i in range(0, len(s), 64):
            yield list(s.images[i : i + 64]), s.labels[i : i + 64]

    def fingerprint(self, split: str, samples: int) -> Iterator[bytes]:
        s: Split = getattr(self.splits, split)
        yield s.labels.to(torch.int64).contiguous().numpy().tobytes()
        if len(s):  # evenly spaced images: cheap for any size, yet other images differ
            idx = torch.linspace(0, len(s) - 1, min(samples, len(s))).round().long()
            yield str(tuple(s.images.shape)).encode() + s.images[idx].contiguous().numpy().tobytes()

    def normalization(self, mode: str) -> Normalize:
        return Normalize.fit(self.splits.train.images, mode)


class StreamData(TrainingData):
    """Splits of an indexed source, decoded batch by batch in DataLoader worker processes
    (:mod:`reslab.data.stream`); memory does not grow with the data set."""

    def __init__(
        self,
        index: SourceIndex,
        splits: dict[str, SplitIndex],
        *,
        input: InputConfig,
        loader: LoaderChoice,
        notes: Sequence[str] = (),
        workers: int | None = None,
        skip_bad: bool = False,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(
            name=index.name,
            classes=index.classes,
            input=input,
            loader=loader,
            notes=notes,
            skipped=index.skipped,
        )
        self.index, self.splits = index, splits
        self.workers = default_workers() if workers is None else workers
        self.skip_bad, self.limits = skip_bad, limits

    def split_size(self, split: str) -> int:
        return len(self.splits[split]) if split in self.splits else 0

    def _dataset(self, split: str | SplitIndex, transform: Any, seed: int = 0) -> ImageDataset:
        s = self.splits[split] if isinstance(split, str) else split
        return ImageDataset(
            self.index,
            s,
            transform,
            channels=self.input.channels,
            seed=seed,
            skip_bad=self.skip_bad,
            limits=self.limits,
        )

    def train_transform(self, kind: str, *, pad: int = 4, flip: bool = True) -> Any:
        """The per-image training transform of augmentation ``kind`` at the input size."""
        kind = self.augmentation(kind)
        if kind == "none":
            return self.input.eval_transform()
        side = min(self.image_size)
        # the ImageNet recipe's shorter-side range [256, 480] is for 224 crops: same ratios
        scale_range = (round(256 * side / 224), round(480 * side / 224))
        return ClassificationPresetTrain(
            self.input,
            kind,
            hflip=0.5 if flip else 0.0,
            padding=pad,
            scale_range=scale_range,
        )

    def train_batches(
        self,
        batch_size: int,
        *,
        seed: int,
        device: torch.device,
        augment: str = "auto",
        pad: int = 4,
        flip: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> TrainingBatches:
        n = len(self.splits["train"])
        dataset = self._dataset("train", self.train_transform(augment, pad=pad, flip=flip), seed)
        return StreamingBatches(
            dataset,
            batch_size=rank_batch_size(n, batch_size, world_size),
            seed=seed,
            num_workers=self.workers,
            rank=rank,
            world_size=world_size,
            device=device,
        )

    def _stream(
        self, split: str | SplitIndex, transform: Any, batch_size: int, device: torch.device | None
    ) -> StreamingBatches:
        return StreamingBatches(
            self._dataset(split, transform),
            batch_size=batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=self.workers,
            rank=0,
            world_size=1,
            device=device,
            persistent=False,  # evaluations are rare: no idle worker processes between them
        )

    def eval_batches(self, split: str, *, batch_size: int, device: torch.device) -> EvalBatches:
        if not self.split_size(split):
            return EvalBatches([], 0)
        stream = self._stream(split, self.input.eval_transform(), batch_size, device)
        return EvalBatches(stream, self.split_size(split), stream.skipped)

    def images(self, split: str) -> Iterator[tuple[list[Tensor], Tensor]]:
        if not self.split_size(split):
            return
        stream = StreamingBatches(
            self._dataset(split, None),
            batch_size=16,
            shuffle=False,
            drop_last=False,
            num_workers=self.workers,
            rank=0,
            world_size=1,
            persistent=False,
            collate_fn=_collate_list,
        )
        yield from stream  # type: ignore[misc]  # lists of images, by _collate_list

    def fingerprint(self, split: str, samples: int) -> Iterator[bytes]:
        s = self.splits.get(split)
        if s is not None:  # the files themselves: names, sizes and labels, from the index
            yield s.labels.astype(np.int64).tobytes() + s.nbytes.astype(np.int64).tobytes()
            yield "\n".join(s.files).encode()

    def normalization(self, mode: str) -> Normalize:
        """From up to NORM_SAMPLE training images (drawn with seed 0) at the input size, in
        float64: the same statistics as :meth:`Normalize.fit` up to rounding."""
        train = self.splits["train"]
        n = len(train)
        pick = np.sort(np.random.default_rng(0).permutation(n)[: min(n, NORM_SAMPLE)])
        total: Tensor | None = None
        squares = torch.zeros(self.in_channels, dtype=torch.float64)
        count = 0
        batches = self._stream(train.take(pick), self.input.eval_transform(), 256, None)
        for images, _ in batches:
            x = images.double().div_(255.0)
            total = x.sum(0) if total is None else total + x.sum(0)
            squares += x.square().sum((0, 2, 3))
            count += len(x)
        if total is None or count == 0:
            raise ValueError(f"{self.name}: no readable training image to normalise with")
        if mode == "pixel":
            mean = (total / count).float()
            return Normalize("pixel", mean, torch.ones_like(mean))
        if mode != "channel":
            raise ValueError(f"unknown normalize mode {mode!r}; valid choices: pixel, channel")
        pixels = count * total.shape[1] * total.shape[2]
        mean_c = total.sum((1, 2)) / pixels
        var_c = (squares - pixels * mean_c.square()) / max(pixels - 1, 1)
        std_c = var_c.clamp_min(0).sqrt().float().clamp_min(1e-3)
        return Normalize("channel", mean_c.float()[:, None, None], std_c[:, None, None])


def _collate_list(samples: list[tuple[Any, ...]]) -> tuple[list[Tensor], Tensor, list]:
    good = [s for s in samples if s[0] is not None]
    skipped = [(s[2], s[3]) for s in samples if s[0] is None]
    labels = torch.tensor([s[1] for s in good], dtype=torch.int64)
    return [s[0] for s in good], labels, skipped


def default_workers() -> int:
    """DataLoader worker processes of the streaming path: one per CPU core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def plain_input(
    channels: int, size: tuple[int, int], *, resize: int | None, interpolation: str = "bilinear"
) -> InputConfig:
    """An input config of this geometry, not yet normalised."""
    return InputConfig(
        channels=channels,
        size=size,
        resize=resize,
        interpolation=interpolation,
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
        normalize="none",
    )


def as_training_data(data: DataSplits | TrainingData) -> TrainingData:
    """``data``, with in-memory :class:`~reslab.data.DataSplits` wrapped as :class:`MemoryData`."""
    return data if isinstance(data, TrainingData) else MemoryData(data)
