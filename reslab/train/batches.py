"""Where the training loop gets its images: a *training batches* source, asked for step N's batch.

The loop only calls :meth:`TrainingBatches.batch` with consecutive steps and checkpoints the
source's :meth:`~TrainingBatches.state_dict`; what the source does to produce the images (tensors
in memory, a DataLoader streaming from disk, several seeds' orders packed together) is its own
business. :class:`InMemoryBatches` is the source :func:`reslab.train.fit` uses.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from reslab.data import Split, random_crop_flip

__all__ = ["InMemoryBatches", "TrainingBatches"]


@runtime_checkable
class TrainingBatches(Protocol):
    """The training images of one run, batch by batch, resumable at any step.

    Contract, which exact resume and DDP rest on:

    - ``batch(step)`` returns this rank's share of the global batch of optimiser step ``step``
      (0-based): uint8 images (N, C, H, W) and int64 labels (N,), on the training device,
      augmented but not normalised (normalisation belongs to the model, ``input_norm``). The
      ranks' shares are equal in size and together form the global batch.
    - The loop asks for steps 0, 1, 2, ... in order, or, after :meth:`load_state_dict`, from the
      step the state was taken at on. The same state and the same run generator (the random
      number generator the run state checkpoints, given to the source when it is built) give the
      same batches, bit for bit.
    - ``state_dict()`` is plain data (tensors, numbers, lists, dicts) that ``torch.load(...,
      weights_only=True)`` reads; it holds the source's position (for example this epoch's
      permutation), not the images.
    - ``steps_per_epoch`` is the number of steps of one pass over the training images.
    """

    steps_per_epoch: int

    def batch(self, step: int) -> tuple[Tensor, Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class InMemoryBatches:
    """A training split held as one uint8 tensor on the device, read in a new random order each
    epoch, augmented on the device (He et al. 2015, §4.2: pad, random crop, mirror).

    Each epoch is ``max(1, n // batch_size)`` steps; the images after the last full batch are
    dropped and the next epoch draws a new permutation. A split smaller than one batch gives
    steps of all its ``n`` images. Every rank draws the same permutation and augmentation for the
    whole global batch from ``generator`` (so all ranks agree without communicating) and keeps its
    contiguous share.
    """

    def __init__(
        self,
        split: Split,
        *,
        batch_size: int,
        generator: torch.Generator,
        device: torch.device,
        augment: bool = True,
        pad: int = 4,
        flip: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        n = len(split)
        if n < 1:
            raise ValueError("the training split is empty")
        self.size = min(batch_size, n)  # images of one global step
        if self.size % world_size:
            # unequal shares would weight the ranks' images unequally in DDP's mean gradient
            raise ValueError(
                f"{n} training images, fewer than one batch of {batch_size}, cannot be split "
                f"evenly over {world_size} ranks: use a multiple of {world_size} images or fewer "
                "ranks"
            )
        self.batch_size, self.generator, self.device = batch_size, generator, device
        self.augment, self.pad, self.flip = augment, pad, flip
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = max(1, n // batch_size)
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.perm: Tensor | None = None  # this epoch's order of the training images

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        pos = step % self.steps_per_epoch
        if pos == 0 or self.perm is None:
            self.perm = torch.randperm(len(self.labels), generator=self.generator)
        idx = self.perm[pos * self.batch_size : (pos + 1) * self.batch_size].to(self.device)
        x = self.images[idx]
        if self.augment:  # the whole global batch, so every rank draws the same numbers
            x = random_crop_flip(x, padding=self.pad, flip=self.flip, generator=self.generator)
        local = len(idx) // self.world_size
        shard = slice(self.rank * local, (self.rank + 1) * local)
        return x[shard], self.labels[idx][shard]

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self.perm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        perm = state["perm"]
        if perm is not None and len(perm) != len(self.labels):
            raise ValueError(
                f"the checkpoint's data order covers {len(perm)} training images, this data has "
                f"{len(self.labels)}: resume with the run's own data and split"
            )
        self.perm = perm
