"""Index an image source once: every file, its label and its declared size, checked and cached.

Sources: a class-folder tree (``[top/]train/<class>/``, ``val/<class>/``, ``test/<class>/``) in a
directory or a zip, a CSV/TSV list of ``path,label[,split]`` (paths relative to the list), or the
shards written by ``reslab data pack``. Every file's header is read (:func:`probe`) before anything
trains, in parallel worker processes for large sets: the size check bounds memory, the end-of-file
check catches truncated copies, and the result is cached with the index, so the check costs one
read of the data set's bytes once (no decode), not a decode per epoch. Damage inside compressed
data is only seen when decoding; the decoders then raise an error naming the file.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import gzip
import json
import os
import signal
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reslab.data.cache import cache_path, default_cache_dir, warn_cache
from reslab.data.images import DEFAULT_LIMITS, BadImageError, Limits, probe
from reslab.data.lists import SPLITS, list_layout, list_tree, tree_layout
from reslab.data.store import FileStore, check_source

__all__ = [
    "HOLDOUT_FRACTION",
    "HOLDOUT_SEED",
    "SPLITS",
    "SourceIndex",
    "SplitIndex",
    "carve",
    "index_source",
]

# a missing test/ is taken from train/ always with this seed and share, so every run is scored on
# the same images, whatever its own seed
HOLDOUT_SEED = 0
HOLDOUT_FRACTION = 0.1
PARALLEL_FROM = 2048  # files; below this the process start-up costs more than it saves


@dataclass(frozen=True)
class SplitIndex:
    """One split's files (columns, so a million entries stay compact)."""

    files: list[str]  # names in the source's FileStore
    labels: np.ndarray  # int64 (N,)
    widths: np.ndarray  # int32 (N,), after EXIF orientation
    heights: np.ndarray  # int32 (N,)
    offsets: np.ndarray  # int64 (N,): byte offset in a shard, -1 elsewhere
    nbytes: np.ndarray  # int64 (N,): file size

    def __len__(self) -> int:
        return len(self.files)

    def take(self, idx: np.ndarray) -> SplitIndex:
        return SplitIndex(
            [self.files[i] for i in idx],
            self.labels[idx],
            self.widths[idx],
            self.heights[idx],
            self.offsets[idx],
            self.nbytes[idx],
        )

    @staticmethod
    def concat(parts: Sequence[SplitIndex]) -> SplitIndex:
        return SplitIndex(
            [f for p in parts for f in p.files],
            *(
                np.concatenate([getattr(p, k) for p in parts])
                for k in ("labels", "widths", "heights", "offsets", "nbytes")
            ),
        )

    def to_dict(self) -> dict:
        return {
            "files": self.files,
            **{k: getattr(self, k).tolist() for k in ("labels", "widths", "heights")},
            **{k: getattr(self, k).tolist() for k in ("offsets", "nbytes")},
        }

    @classmethod
    def from_dict(cls, d: dict) -> SplitIndex:
        n = len(d["files"])
        cols: dict[str, np.ndarray] = {
            "labels": np.asarray(d["labels"], dtype=np.int64),
            "widths": np.asarray(d["widths"], dtype=np.int32),
            "heights": np.asarray(d["heights"], dtype=np.int32),
            "offsets": np.asarray(d["offsets"], dtype=np.int64),
            "nbytes": np.asarray(d["nbytes"], dtype=np.int64),
        }
        if any(len(c) != n for c in cols.values()):
            raise ValueError("index columns differ in length")
        return cls(list(map(str, d["files"])), **cols)

    @classmethod
    def empty(cls) -> SplitIndex:
        i64, i32 = np.zeros(0, np.int64), np.zeros(0, np.int32)
        return cls([], i64, i32, i32.copy(), i64.copy(), i64.copy())


@dataclass(frozen=True)
class SourceIndex:
    """A source's splits, class names, how missing splits were made, and files skipped."""

    store: FileStore
    classes: list[str]
    splits: dict[str, SplitIndex]
    notes: list[str] = field(default_factory=list)  # e.g. "test: no test/ folder: 10% of train/"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason), skip_bad only

    @property
    def name(self) -> str:
        return Path(self.store.root).name

    def split(self, name: str) -> SplitIndex:
        if name not in self.splits:
            raise ValueError(f"{self.store.root} has no {name!r} split; it has {list(self.splits)}")
        return self.splits[name]

    def size_range(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((min width, min height), (max width, max height)) over all splits."""
        w = np.concatenate([s.widths for s in self.splits.values()])
        h = np.concatenate([s.heights for s in self.splits.values()])
        return (int(w.min()), int(h.min())), (int(w.max()), int(h.max()))

    def uniform(self) -> bool:
        """Whether every image has one size (what the in-memory path needs)."""
        (w0, h0), (w1, h1) = self.size_range()
        return (w0, h0) == (w1, h1)

    def to_dict(self) -> dict:
        return {
            "store": dataclasses.asdict(self.store),
            "classes": self.classes,
            "splits": {k: v.to_dict() for k, v in self.splits.items()},
            "notes": self.notes,
            "skipped": [list(s) for s in self.skipped],
        }

    @classmethod
    def from_dict(cls, d: dict) -> SourceIndex:
        return cls(
            FileStore(**d["store"]),
            list(d["classes"]),
            {k: SplitIndex.from_dict(v) for k, v in d["splits"].items()},
            list(d["notes"]),
            [(str(a), str(b)) for a, b in d["skipped"]],
        )


def carve(
    split: SplitIndex, *, fraction: float | None = None, size: int | None = None, seed: int
) -> tuple[SplitIndex, SplitIndex]:
    """(rest, held out): ``size`` images or ``fraction`` of each class, drawn with ``seed``,
    stratified so every class keeps its share. Order inside each part is the source order."""
    rng = np.random.default_rng(seed)
    n = len(split)
    share = fraction if fraction is not None else (size or 0) / max(n, 1)
    held = []
    for c in np.unique(split.labels):
        idx = np.flatnonzero(split.labels == c)
        held.append(rng.permutation(idx)[: round(len(idx) * share)])
    out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    if size is not None and len(out) != size:  # rounding per class: fix the total exactly
        rest = np.setdiff1d(np.arange(n), out)
        extra = size - len(out)
        out = (
            np.sort(np.concatenate([out, rng.permutation(rest)[:extra]]))
            if extra > 0
            else np.sort(rng.permutation(out)[:size])
        )
    mask = np.zeros(n, dtype=bool)
    mask[out] = True
    return split.take(np.flatnonzero(~mask)), split.take(np.flatnonzero(mask))


# -- probing ------------------------------------------------------------------------------------
def quiet_worker() -> None:  # pragma: no cover - runs in the pool's processes
    """Ctrl-C signals the whole process group: the main process stops the pool and says so in
    one line; a worker's own KeyboardInterrupt would only print one traceback per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _probe_chunk(
    store: FileStore, names: list[str], limits: Limits
) -> list[tuple[int, int, int, str | None]]:
    """(width, height, bytes, error or None) of each file: runs in a worker process."""
    out: list[tuple[int, int, int, str | None]] = []
    for name in names:
        try:
            data = store.read(name, limits.max_file_bytes)
            h = probe(data, store.where(name), limits)
            out.append((h.width, h.height, len(data), None))
        except BadImageError as exc:
            out.append((0, 0, 0, exc.reason))
    return out


def _probe_all(
    store: FileStore, names: list[str], limits: Limits, workers: int, progress: bool
) -> list[tuple[int, int, int, str | None]]:
    from tqdm import tqdm

    bar = tqdm(
        total=len(names), desc="check headers", unit="img", disable=None if progress else True
    )
    chunk = 256
    chunks = [names[i : i + chunk] for i in range(0, len(names), chunk)]
    results: list[tuple[int, int, int, str | None]] = []
    try:
        if workers > 1 and len(names) >= PARALLEL_FROM:
            with cf.ProcessPoolExecutor(workers, initializer=quiet_worker) as pool:
                for part in pool.map(
                    _probe_chunk, [store] * len(chunks), chunks, [limits] * len(chunks)
                ):
                    results.extend(part)
                    bar.update(len(part))
        else:
            for c in chunks:
                results.extend(_probe_chunk(store, c, limits))
                bar.update(len(c))
    finally:
        bar.close()
    return results


def _class_names(layout: dict[str, dict[str, list[str]]], root: Path) -> list[str]:
    """train/'s classes, sorted (numerically where all are numbers: 2 before 10); val/ and
    test/ may hold no class that train/ lacks."""
    classes = sorted(layout["train"])
    if all(c.isdigit() for c in classes):
        classes.sort(key=int)
    for s in ("val", "test"):
        unknown = sorted(set(layout[s]) - set(classes))
        if unknown:
            raise ValueError(f"{root}: {s} classes {unknown} have no train/ folder or rows")
    return classes


def _fill_missing_splits(splits: dict[str, SplitIndex]) -> list[str]:
    """A missing test/ is held out of train/ (stratified, stated seed and size); a missing val/
    is left to the loader. Returns the notes that say so."""
    notes = []
    if "test" not in splits:
        rest, held = carve(splits["train"], fraction=HOLDOUT_FRACTION, seed=HOLDOUT_SEED)
        splits["train"], splits["test"] = rest, held
        notes.append(
            f"test: no test/ split in the source: {len(held)} images ({HOLDOUT_FRACTION:.0%} of "
            f"each train/ class, seed {HOLDOUT_SEED}) held out of train/"
        )
    if "val" not in splits:
        notes.append("val: no val/ split in the source: taken from train/ by the loader")
    return notes


def _build(
    store: FileStore,
    layout: dict[str, dict[str, list[str]]],
    root: Path,
    *,
    limits: Limits,
    skip_bad: bool,
    workers: int,
    progress: bool,
) -> SourceIndex:
    classes = _class_names(layout, root)
    names, labels, owner = [], [], []
    for s in SPLITS:
        for label, c in enumerate(classes):
            for n in layout[s].get(c, []):
                names.append(n)
                labels.append(label)
                owner.append(s)
    res = _probe_all(store, names, limits, workers, progress)
    bad = [(names[i], r[3]) for i, r in enumerate(res) if r[3] is not None]
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise BadImageError(store.where(bad[0][0]), f"{bad[0][1]}{more}") from None
    ok = np.asarray([r[3] is None for r in res], dtype=bool)
    cols = np.asarray([r[:3] for r in res], dtype=np.int64).reshape(-1, 3)
    splits = {}
    for s in SPLITS:
        m = ok & np.asarray([o == s for o in owner], dtype=bool)
        idx = np.flatnonzero(m)
        if len(idx) or s == "train":
            splits[s] = SplitIndex(
                [names[i] for i in idx],
                np.asarray(labels, dtype=np.int64)[idx],
                cols[idx, 0].astype(np.int32),
                cols[idx, 1].astype(np.int32),
                np.full(len(idx), -1, np.int64),
                cols[idx, 2],
            )
    if not len(splits["train"]):
        raise ValueError(f"{root}: no usable training images ({len(bad)} skipped as unreadable)")
    notes = _fill_missing_splits(splits)
    skipped = [(store.where(n), str(r)) for n, r in bad]
    if skipped:
        warnings.warn(
            f"skipping {len(skipped)} unreadable image(s) in {root}, e.g. {skipped[0][0]}: "
            f"{skipped[0][1]}",
            stacklevel=3,
        )
    return SourceIndex(store, classes, splits, notes, skipped)


def _load_index(path: Path, cache_dir: Path, key: str) -> SourceIndex | None:
    try:
        file = cache_path(path, cache_dir, kind="index", extra=key)
    except OSError:
        return None
    if not file.exists():
        return None
    try:
        blob = json.loads(gzip.decompress(file.read_bytes()))
        body = json.dumps(blob["index"], sort_keys=True).encode()
        if zlib.crc32(body) != blob["crc32"]:
            raise ValueError("checksum mismatch: the file was changed or damaged")
        return SourceIndex.from_dict(blob["index"])
    except Exception as exc:  # damaged or foreign: index the source again
        warn_cache(f"ignoring unusable index cache {file}: {exc}")
        return None


def _save_index(index: SourceIndex, path: Path, cache_dir: Path, key: str) -> None:
    from reslab._io import atomic_path

    d = index.to_dict()
    body = json.dumps(d, sort_keys=True).encode()
    file = cache_path(path, cache_dir, kind="index", extra=key)
    blob = gzip.compress(json.dumps({"crc32": zlib.crc32(body), "index": d}).encode(), 5)
    try:
        with atomic_path(file) as tmp:
            tmp.write_bytes(blob)
    except OSError as exc:
        warn_cache(f"cannot write the index cache {file} ({exc.strerror or exc}); going on without")


def _kind(path: Path) -> str:
    if path.suffix.lower() in (".csv", ".tsv") and path.is_file():
        return "list"
    if (path / "reslab-shards.json").is_file():
        return "shards"
    return "tree"


def index_source(
    path: Path,
    *,
    limits: Limits = DEFAULT_LIMITS,
    skip_bad: bool = False,
    workers: int | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> SourceIndex:
    """The index of an image source, from the cache when the source is unchanged.

    Every file's header is checked before this returns: an unreadable, truncated or oversized
    image raises :class:`~reslab.data.images.BadImageError` naming it or, with ``skip_bad``, is
    left out and listed in ``SourceIndex.skipped`` (with a warning). ``workers`` processes read
    the headers (default: the CPU count).
    """
    path = check_source(Path(path).expanduser())  # missing, a pipe, a device: named
    kind = _kind(path)
    if kind == "shards":
        from reslab.data.shards import read_shard_index

        return read_shard_index(path)
    cache_dir = cache_dir or default_cache_dir()
    key = json.dumps([kind, dataclasses.asdict(limits), skip_bad])
    cached = _load_index(path, cache_dir, key)
    if cached is not None:
        return cached
    if kind == "list":
        store, layout = list_layout(path)
    else:
        store, files = list_tree(path)
        layout = tree_layout(files, path)
    idx = _build(
        store,
        layout,
        path,
        limits=limits,
        skip_bad=skip_bad,
        workers=workers or os.cpu_count() or 1,
        progress=progress,
    )
    _save_index(idx, path, cache_dir, key)
    return idx
