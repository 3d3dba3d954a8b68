"""Decode once, index once: decoded tensors and source indexes kept in files keyed by the source's
size and mtime, each with a checksum, each written atomically.

The cache is an optimisation, never a dependency: a file that fails its checksum, a folder that
is read-only or full, only cost a warning and a fresh decode; temporary files of interrupted
writes (a killed process) are removed by the next write to the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from reslab._io import clean_stale_temp, save_torch
from reslab.data.lists import read_list
from reslab.data.sources import RawData

__all__ = [
    "cache_path",
    "clean_stale_temp",
    "default_cache_dir",
    "load_cached",
    "save_cached",
    "warn_cache",
]

# bump when a reader's output changes; 2: the readers now refuse damaged or incomplete sources
# that version 1 decoded and cached (a cache hit would keep serving them); 3: also duplicate
# CIFAR batch files and images nested below a class folder; 4: val/ splits, EXIF orientation,
# 16-bit scaling, and a checksum in the file
CACHE_VERSION = 4
INDEX_VERSION = 1
_TENSORS = ("train_images", "train_labels", "test_images", "test_labels")


def default_cache_dir() -> Path:
    """``$RESLAB_CACHE_DIR`` or ``~/.cache/reslab``."""
    env = os.environ.get("RESLAB_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "reslab"


def _list_paths(path: Path) -> list[Path]:
    try:  # a CSV's fingerprint covers the files it lists
        return [path.parent / p for p in read_list(path)[0]]
    except (ValueError, OSError, UnicodeDecodeError):
        return []  # the indexer names the problem


def _fingerprint(path: Path) -> str:
    """Size and modification time of a file, of every file below a folder, or of a CSV/TSV list
    and every file it lists."""
    if path.is_dir():
        items = []
        for root, _, files in os.walk(path):
            for name in files:
                f = Path(root) / name
                with contextlib.suppress(OSError):
                    st = f.stat()
                    items.append((str(f.relative_to(path)), st.st_size, st.st_mtime_ns))
        return repr(sorted(items))
    st = path.stat()
    parts = [f"{st.st_size}:{st.st_mtime_ns}"]
    if path.suffix.lower() in (".csv", ".tsv"):
        for f in _list_paths(path):
            try:
                s = f.stat()
                parts.append(f"{f}:{s.st_size}:{s.st_mtime_ns}")
            except OSError:
                parts.append(f"{f}:missing")
    return "|".join(parts)


def cache_path(path: Path, cache_dir: Path, *, kind: str = "pt", extra: str = "") -> Path:
    path = path.resolve()
    version = CACHE_VERSION if kind == "pt" else INDEX_VERSION
    key = f"{version}|{path}|{_fingerprint(path)}|{extra}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    suffix = "pt" if kind == "pt" else "index.json.gz"
    return cache_dir / f"{path.name}.{digest}.{suffix}"


def _crc(arrays: list[np.ndarray]) -> int:
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data, crc)
    return crc


def warn_cache(msg: str) -> None:
    """A cache problem: worth a warning, never an error."""
    warnings.warn(msg, stacklevel=3)


def load_cached(file: Path) -> RawData | None:
    """The cached tensors, or None when absent, unreadable or failing the checksum (then the
    source is decoded again)."""
    if not file.exists():
        return None
    try:
        d = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        names = [*_TENSORS, *(("val_images", "val_labels") if "val_images" in d else ())]
        if _crc([d[k].numpy() for k in names]) != int(d["crc32"]):
            raise ValueError("checksum mismatch: the file was changed or damaged")
        return RawData(
            d["train_images"],
            d["train_labels"],
            d["test_images"],
            d["test_labels"],
            list(d["classes"]),
            d.get("val_images"),
            d.get("val_labels"),
            [(str(a), str(b)) for a, b in d.get("skipped", [])],
            list(map(str, d.get("notes", []))),
        )
    except Exception as exc:  # a truncated or foreign file: decode again and overwrite it
        warn_cache(f"ignoring unusable data cache {file}: {exc}")
        return None


def save_cached(raw: RawData, file: Path) -> None:
    """Write atomically (temporary file + rename) so an interrupted write never looks valid. A
    cache folder that cannot be written only costs a warning: the data was decoded already."""
    d: dict = {k: getattr(raw, k) for k in _TENSORS}
    if raw.val_images is not None and raw.val_labels is not None:
        d["val_images"], d["val_labels"] = raw.val_images, raw.val_labels
    d["crc32"] = _crc([t.numpy() for t in d.values()])
    d["classes"] = raw.classes
    d["skipped"] = [list(s) for s in raw.skipped]
    d["notes"] = list(raw.notes)
    try:  # a full disk, a read-only folder: a WriteError (an OSError) naming the file
        save_torch(d, file)
    except OSError as exc:
        warn_cache(
            f"cannot write the data cache {file} ({exc.strerror or exc}); continuing without"
        )
