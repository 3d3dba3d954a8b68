"""The streaming path: images decoded and augmented in DataLoader worker processes, batch by batch.

Memory does not grow with the data set: the index is a few compact arrays, each worker holds the
batches in flight. Workers decode with torchvision's decoders (libjpeg-turbo) and augment with
transforms v2 on uint8 tensors; batches leave as uint8 (4x less to copy and pin than float32) and
are normalised on the training device (:meth:`reslab.data.InputConfig.normalizer`).

Deterministic and resumable: sample ``i`` of epoch ``e`` is augmented with torch's RNG seeded from
``(seed, e, i)``, and the order of an epoch is a permutation seeded from ``(seed, e)``; so the
batches do not depend on the number of workers, and :class:`StreamingBatches` resumes at any batch
from its ``state_dict``. Under DDP each rank reads a disjoint part of every epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from reslab.data.images import DEFAULT_LIMITS, BadImageError, Limits, decode
from reslab.data.index import SourceIndex, SplitIndex

__all__ = [
    "BatchPosition",
    "ImageDataset",
    "ResumableSampler",
    "StreamingBatches",
    "collate_uint8",
    "sample_seed",
]

_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: nearby inputs give unrelated 64-bit outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation: a function of (run seed, epoch, sample) only."""
    return _mix(_mix(_mix(seed & _MASK64) ^ epoch) ^ index) >> 1  # torch seeds are < 2**63


class _Names:
    """File names as one byte buffer + offsets: a Python list of a million str objects would be
    copied page by page into every forked worker as reference counts are touched (PyTorch
    issue #13246), and RSS would grow with the data set."""

    def __init__(self, names: Sequence[str]) -> None:
        encoded = [n.encode() for n in names]
        self.ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
        self.buf = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        start = int(self.ends[i - 1]) if i else 0
        return self.buf[start : int(self.ends[i])].tobytes().decode()


class ImageDataset(Dataset):
    """One split of an indexed source; item ``(epoch, i)`` (or ``i``: epoch 0) is ``(uint8 image
    (C, H, W) after ``transform``, label)``.

    A file that cannot be read or decoded raises :class:`BadImageError` naming it, or, with
    ``skip_bad``, gives ``(None, label, file, reason)``, which :func:`collate_uint8` leaves out and
    reports. ``transform.min_side`` (the presets have it) lets large JPEGs decode at reduced size.
    """

    def __init__(
        self,
        index: SourceIndex,
        split: str | SplitIndex = "train",
        transform: Callable[[Tensor], Tensor] | None = None,
        *,
        channels: int = 3,
        seed: int = 0,
        skip_bad: bool = False,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        s = index.split(split) if isinstance(split, str) else split
        self.store = index.store
        self.names = _Names(s.files)
        self.labels = s.labels.copy()
        self.offsets, self.nbytes = s.offsets.copy(), s.nbytes.copy()
        self.transform, self.channels, self.seed = transform, channels, seed
        self.skip_bad, self.limits = skip_bad, limits
        self.min_side: int | None = getattr(transform, "min_side", None)
        # shard of each sample (packed sources), so DDP ranks can read disjoint shards
        self.groups: np.ndarray | None = None
        if self.store.kind == "shards":
            shard_names = [n.split("/", 1)[0] for n in s.files]
            _, self.groups = np.unique(shard_names, return_inverse=True)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> tuple[bytes, str]:
        """The encoded bytes of sample ``i`` and its name for messages."""
        name = self.names[i]
        data = self.store.read(
            name, self.limits.max_file_bytes, offset=int(self.offsets[i]), size=int(self.nbytes[i])
        )
        return data, self.store.where(name)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, ...]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        label = int(self.labels[i])
        where = self.store.where(self.names[i])
        try:
            data, where = self.read(i)
            x = decode(
                data, where, channels=self.channels, min_side=self.min_side, limits=self.limits
            )
            if self.transform is not None:
                with torch.random.fork_rng(devices=[]):
                    # the CPU generator only: torch.manual_seed also queues a CUDA seeding with
                    # a recorded stack trace, 0.3 ms per image
                    torch.default_generator.manual_seed(sample_seed(self.seed, epoch, i))
                    x = self.transform(x)
        except BadImageError as exc:
            if not self.skip_bad:
                raise
            return None, label, exc.where, exc.reason
        except Exception as exc:  # a transform failing on this image: name the image
            err = BadImageError(where, f"{type(exc).__name__}: {exc}")
            if not self.skip_bad:
                raise err from exc
            return None, label, err.where, err.reason
        return x, label


def collate_uint8(
    samples: list[tuple[Any, ...]],
) -> tuple[Tensor, Tensor, list[tuple[str, str]]]:
    """(uint8 images (N, C, H, W), int64 labels (N,), skipped (file, reason)) of one batch."""
    good = [s for s in samples if s[0] is not None]
    skipped = [(s[2], s[3]) for s in samples if s[0] is None]
    if not good:
        return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), skipped
    # default_collate stacks straight into shared memory in a worker: one copy of the batch
    # fewer than stacking and then moving it there to cross the process boundary
    images = default_collate([s[0] for s in good])
    labels = torch.tensor([s[1] for s in good], dtype=torch.int64)
    return images, labels, skipped


class ResumableSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` for one rank; its position (epoch, batch) is resumable.

    Epoch ``e``'s order is a permutation seeded from ``(seed, e)``. Ranks read disjoint parts: a
    strided slice of that permutation (as torch's DistributedSampler), or, with ``groups`` (the
    shard of each sample), whole shards, so each rank opens only its own shard files; shorter
    ranks repeat a few of their own samples so every rank takes the same number of steps.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        groups: np.ndarray | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot be split among {world_size} ranks")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size, self.groups = rank, world_size, groups
        self.epoch, self.batch = 0, 0  # the next batch to yield

    def _rng(self, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & _MASK64, self.epoch, *extra])

    def _bins(self) -> list[np.ndarray]:
        """The shards split into ``world_size`` bins of near-equal sample counts (largest shard
        first to the emptiest bin), fixed for the run so every epoch has the same length."""
        assert self.groups is not None
        sizes = np.bincount(self.groups)
        bins: list[list[int]] = [[] for _ in range(self.world_size)]
        load = np.zeros(self.world_size, np.int64)
        for g in np.argsort(-sizes, kind="stable"):
            r = int(np.argmin(load))
            bins[r].append(int(g))
            load[r] += sizes[g]
        return [np.asarray(b, dtype=np.int64) for b in bins]

    def _per_rank(self) -> int:
        if self.groups is not None and self.world_size > 1:
            sizes = np.bincount(self.groups)
            return max(int(sizes[b].sum()) for b in self._bins())
        return -(-self.num_samples // self.world_size)

    def indices(self) -> np.ndarray:
        """This rank's sample order for the current epoch."""
        per_rank = self._per_rank()
        if self.groups is not None and self.world_size > 1:
            bins = self._bins()
            # which bin this rank reads changes each epoch, so no rank sees only one part
            turn = (
                self._rng().permutation(self.world_size)
                if self.shuffle
                else np.arange(self.world_size)
            )
            mine = np.flatnonzero(np.isin(self.groups, bins[int(turn[self.rank])]))
            if self.shuffle:
                mine = self._rng(1, self.rank).permutation(mine)
            return np.resize(mine, per_rank)  # repeats its own samples up to the longest bin
        n = self.num_samples
        perm = self._rng().permutation(n) if self.shuffle else np.arange(n)
        perm = np.resize(perm, per_rank * self.world_size)  # wrap round, as DistributedSampler
        return perm[self.rank :: self.world_size]

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        if self.drop_last and (self.groups is None or self.world_size == 1):
            # whole global batches of the permutation, as one process on the global batch takes
            # them: the wrap-around padding of the last ranks never starts a batch of its own
            return self.num_samples // (self.batch_size * self.world_size)
        per_rank = self._per_rank()
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        idx = self.indices()
        b = self.batch_size
        for k in range(self.batch, len(self)):
            yield [(self.epoch, int(i)) for i in idx[k * b : (k + 1) * b]]

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "num_samples", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the saved position has {key}={state[key]}, this loader "
                    f"{getattr(self, key)} (the data, seed or number of ranks changed)"
                )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def _clean(exc: BadImageError) -> BadImageError:
    """A worker's BadImageError arrives as 'Caught BadImageError in DataLoader worker process 0.
    Original Traceback ...': keep its last line, which names the file."""
    last = str(exc).strip().splitlines()[-1]
    return BadImageError(last.split("BadImageError: ", 1)[-1])


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The given rank and world size, else torch.distributed's when it is initialised, else
    (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    dist = torch.distributed
    ready = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)


class BatchPosition:
    """The position methods of training batches, held by ``self.sampler``
    (a :class:`ResumableSampler`)."""

    sampler: ResumableSampler

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.sampler)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def seek(self, step: int) -> None:
        """Position at global step ``step`` (epoch ``step // len``, batch ``step % len``)."""
        self.sampler.epoch, self.sampler.batch = divmod(step, len(self))

    def state_dict(self) -> dict[str, Any]:
        """The position: the next batch to yield, with what it is valid for."""
        return dict(self.sampler.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class StreamingBatches(BatchPosition):
    """The training batches of a streamed split: iterate for this epoch's remaining batches of
    ``(uint8 images (N, C, H, W), int64 labels)`` on ``device``.

    ``batch_size`` is per rank. Workers are ``persistent`` (started once, kept across epochs),
    batches are pinned when the device is CUDA. ``state_dict()`` is the position: the next batch;
    after a full pass the position is batch 0 of the next epoch. ``skipped`` lists files left out
    with ``skip_bad``, each once (kept in the state, so a resumed run still counts them).
    """

    def __init__(
        self,
        dataset: ImageDataset,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 2,
        rank: int | None = None,
        world_size: int | None = None,
        device: torch.device | str | None = None,
        prefetch_factor: int = 4,
        by_shard: bool = True,
        persistent: bool = True,
        collate_fn: Callable[[list[tuple[Any, ...]]], Any] = collate_uint8,
    ) -> None:
        rank, world_size = rank_and_world(rank, world_size)
        self.dataset = dataset
        self.device = torch.device(device) if device is not None else None
        self.sampler = ResumableSampler(
            len(dataset),
            batch_size=batch_size,
            seed=seed,
            shuffle=shuffle,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
            groups=dataset.groups if by_shard else None,
        )
        pin = self.device is not None and self.device.type == "cuda"
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin,
            persistent_workers=persistent and num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
        )
        self.skipped: list[tuple[str, str]] = []
        self._seen: set[str] = set()

    def state_dict(self) -> dict[str, Any]:
        return {**self.sampler.state_dict(), "skipped": [list(s) for s in self.skipped]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self.skipped = [(str(w), str(r)) for w, r in state.get("skipped", [])]
        self._seen = {w for w, _ in self.skipped}

    def _finish(self, batch: Any) -> tuple[Tensor, Tensor, list[tuple[str, str]]]:
        """What a collated batch becomes in the main process (subclasses decode on a GPU)."""
        return batch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        it = iter(self.loader)
        while True:
            try:
                images, labels, bad = self._finish(next(it))
            except StopIteration:
                break
            except BadImageError as exc:
                raise _clean(exc) from None
            for where, reason in bad:
                if where not in self._seen:
                    self._seen.add(where)
                    self.skipped.append((where, reason))
            self.sampler.batch += 1
            if self.device is not None:
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield images, labels
        self.sampler.set_epoch(self.sampler.epoch + 1)
