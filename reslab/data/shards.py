"""``reslab data pack``: a resized copy of an image source as tar shards, and reading them back.

Format: WebDataset's convention (plain POSIX tar files, each sample ``KEY.jpg`` + ``KEY.cls``),
so the shards are read by ``tar``, the ``webdataset`` package or any tar reader, streamed
sequentially or copied per node; plus ``reslab-shards.json``, which lists every sample's byte
offset, size and image size. With the offsets, reslab reads shards by random access (one
``pread`` per image): the same sampler, determinism and exact resume as every other source, and a
DDP rank opens only its own shards (:class:`~reslab.data.stream.ResumableSampler` ``groups``).
Tar rather than one big file: shards are the unit a rank, a node or a copy job works on, and a
shard is written whole or not at all.

Writing is atomic per shard (temporary file + rename, a manifest beside each shard after it) and
restartable: a rerun with the same arguments skips the shards already complete.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reslab._io import atomic_path
from reslab.data.cache import clean_stale_temp
from reslab.data.images import DEFAULT_LIMITS, BadImageError, Limits, decode, probe
from reslab.data.index import SourceIndex, SplitIndex, index_source, quiet_worker
from reslab.data.store import FileStore

__all__ = ["MANIFEST", "PackConfig", "pack", "read_shard_index"]

MANIFEST = "reslab-shards.json"
FORMAT_VERSION = 1
SHUFFLE_SEED = 0  # samples are shuffled before sharding, so every shard holds a mix of classes


@dataclass(frozen=True)
class PackConfig:
    max_side: int | None = None  # longer side at most this (aspect kept); None: sizes as they are
    quality: int = 90  # JPEG quality of re-encoded images
    shard_samples: int = 1000  # images per shard
    channels: int = 3

    def __post_init__(self) -> None:
        if self.max_side is not None and self.max_side < 8:
            raise ValueError(f"max_side must be >= 8, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {self.quality}")
        if self.shard_samples < 1:
            raise ValueError(f"shard_samples must be >= 1, got {self.shard_samples}")


def _encode_one(
    store: FileStore, name: str, cfg: PackConfig, limits: Limits
) -> tuple[bytes, str, int, int]:
    """(bytes, extension, width, height) of one image as it goes into a shard: the original
    bytes when it is a JPEG/PNG within ``max_side`` (no second lossy encoding), else decoded,
    resized and encoded as JPEG."""
    from torchvision.io import encode_jpeg
    from torchvision.transforms.v2 import functional as F

    data = store.read(name, limits.max_file_bytes)
    where = store.where(name)
    head = probe(data, where, limits)
    small = cfg.max_side is None or max(head.width, head.height) <= cfg.max_side
    if small and head.format in ("JPEG", "PNG") and head.mode in ("RGB", "L"):
        return data, ".jpg" if head.format == "JPEG" else ".png", head.width, head.height
    side = cfg.max_side or max(head.width, head.height)
    # reduced-size decode: the shorter side is never needed above side * short/long
    need = max(1, side * min(head.width, head.height) // max(head.width, head.height))
    x = decode(data, where, channels=cfg.channels, header=head, min_side=need, limits=limits)
    h, w = x.shape[-2:]
    if max(h, w) > side:
        s = side / max(h, w)
        x = F.resize(x, [max(1, round(h * s)), max(1, round(w * s))], antialias=True)
    out = encode_jpeg(x.contiguous(), quality=cfg.quality).numpy().tobytes()
    return out, ".jpg", int(x.shape[-1]), int(x.shape[-2])


def _write_shard(
    store: FileStore,
    split: SplitIndex,
    rows: np.ndarray,
    path: Path,
    cfg: PackConfig,
    limits: Limits,
    skip_bad: bool,
) -> dict:
    """Write one shard atomically; returns its manifest (also written beside it, atomically)."""
    entries, skipped = [], []
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for r in rows:
            name = split.files[r]
            try:
                data, ext, w, h = _encode_one(store, name, cfg, limits)
            except BadImageError as exc:
                if not skip_bad:
                    raise
                skipped.append((exc.where, exc.reason))
                continue
            key = f"{int(r):08d}"
            label = int(split.labels[r])
            for member, payload in ((key + ext, data), (key + ".cls", str(label).encode())):
                info = tarfile.TarInfo(member)
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                start = tar.offset  # a short name in USTAR: one 512-byte header block
                tar.addfile(info, io.BytesIO(payload))
                if member.endswith(ext):
                    entries.append([member, label, w, h, start + tarfile.BLOCKSIZE, len(payload)])
    manifest = {"shard": path.name, "entries": entries, "skipped": skipped}
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(manifest))
    return manifest


def _done(path: Path) -> dict | None:
    """The manifest of a complete shard from an earlier run, or None."""
    side = path.with_suffix(".json")
    if not (path.is_file() and side.is_file()):
        return None
    try:
        m = json.loads(side.read_text())
        last = m["entries"][-1] if m["entries"] else None
        if last and last[4] + last[5] > path.stat().st_size:
            return None
        return m
    except (ValueError, KeyError, OSError):
        return None


_Job = tuple[str, SplitIndex, np.ndarray, Path]  # split name, split, its rows, the shard's path


def _write_shards(
    index: SourceIndex,
    jobs: list[_Job],
    todo: list[_Job],
    cfg: PackConfig,
    limits: Limits,
    skip_bad: bool,
    workers: int | None,
    progress: bool,
) -> dict[Path, dict]:
    """Write the shards of ``todo`` in worker processes, one shard each at a time; their
    manifests by path. The bar counts the images of ``jobs`` done earlier as done."""
    from tqdm import tqdm

    total = sum(len(j[2]) for j in jobs)
    initial = total - sum(len(j[2]) for j in todo)
    bar = tqdm(
        total=total, initial=initial, desc="pack", unit="img", disable=None if progress else True
    )
    manifests: dict[Path, dict] = {}
    try:
        with cf.ProcessPoolExecutor(
            workers or os.cpu_count() or 1, initializer=_one_thread
        ) as pool:
            futures = {
                pool.submit(_write_shard, index.store, split, rows, path, cfg, limits, skip_bad): (
                    path,
                    len(rows),
                )
                for _, split, rows, path in todo
            }
            for fut in cf.as_completed(futures):
                path, n = futures[fut]
                manifests[path] = fut.result()
                bar.update(n)
    finally:
        bar.close()
    return manifests


def _manifest(
    index: SourceIndex, jobs: list[_Job], manifests: dict[Path, dict], settings: dict
) -> dict[str, Any]:
    """The packed folder's manifest: every shard's entries as one index per split."""
    splits: dict[str, dict] = {}
    skipped = list(index.skipped)
    for split_name, _, _, path in jobs:
        m = manifests[path]
        skipped += [tuple(s) for s in m["skipped"]]
        d = splits.setdefault(
            split_name,
            {k: [] for k in ("files", "labels", "widths", "heights", "offsets", "nbytes")},
        )
        for member, label, w, h, off, size in m["entries"]:
            for k, v in zip(d, (f"{path.name}/{member}", label, w, h, off, size), strict=True):
                d[k].append(v)
    return {
        "settings": settings,
        "classes": index.classes,
        "splits": splits,
        "notes": index.notes,
        "skipped": skipped,
    }


def pack(
    src: Path,
    dest: Path,
    cfg: PackConfig = PackConfig(),
    *,
    workers: int | None = None,
    skip_bad: bool = False,
    limits: Limits = DEFAULT_LIMITS,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> SourceIndex:
    """Write ``src`` (any indexed source) to ``dest`` as shards; returns the packed index.

    Splits are kept as the source has them (a missing test/ is the held-out part of train/, as
    the index made it; a missing val/ stays missing). Shards are written by ``workers``
    processes, one shard each at a time.
    """
    index = index_source(
        Path(src),
        limits=limits,
        skip_bad=skip_bad,
        cache_dir=cache_dir,
        workers=workers,
        progress=progress,
    )
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    clean_stale_temp(dest)  # half-written shards of a run that was killed (kill -9, power loss)
    settings = {"format": FORMAT_VERSION, "source": str(Path(src).resolve()), **asdict(cfg)}
    old = dest / MANIFEST
    if old.exists() and json.loads(old.read_text()).get("settings") != settings:
        raise ValueError(f"{dest} holds shards packed with other settings; choose another DEST")
    jobs: list[_Job] = []
    for split_name, split in index.splits.items():
        order = np.random.default_rng(SHUFFLE_SEED).permutation(len(split))
        for k in range(0, len(split), cfg.shard_samples):
            path = dest / f"{split_name}-{k // cfg.shard_samples:06d}.tar"
            jobs.append((split_name, split, order[k : k + cfg.shard_samples], path))
    manifests = {job[3]: m for job in jobs if (m := _done(job[3])) is not None}
    todo = [job for job in jobs if job[3] not in manifests]  # a rerun resumes where it stopped
    manifests.update(_write_shards(index, jobs, todo, cfg, limits, skip_bad, workers, progress))
    body = _manifest(index, jobs, manifests, settings)
    with atomic_path(dest / MANIFEST) as tmp:
        tmp.write_text(json.dumps(body))
    return read_shard_index(dest)


def read_shard_index(dest: Path) -> SourceIndex:
    """The index of a folder written by :func:`pack`."""
    file = Path(dest) / MANIFEST
    try:
        body = json.loads(file.read_text())
        splits = {k: SplitIndex.from_dict(v) for k, v in body["splits"].items()}
        if body["settings"]["format"] != FORMAT_VERSION:
            raise ValueError(f"format {body['settings']['format']}, expected {FORMAT_VERSION}")
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ValueError(f"unreadable shard manifest {file}: {exc}") from exc
    for s in splits.values():
        if len(s) and (s.labels.min() < 0 or s.labels.max() >= len(body["classes"])):
            raise ValueError(f"{file}: labels out of range for {len(body['classes'])} classes")
    return SourceIndex(
        FileStore(str(Path(dest)), "shards"),
        list(body["classes"]),
        splits,
        list(body["notes"]),
        [(str(a), str(b)) for a, b in body["skipped"]],
    )


def _one_thread() -> None:  # pragma: no cover - runs in the pool's processes
    torch.set_num_threads(1)  # one process per core already: no oversubscription
    quiet_worker()
