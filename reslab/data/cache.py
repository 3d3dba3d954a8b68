"""Decode once: decoded tensors are kept in one file keyed by the source's size and mtime."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

from reslab._io import atomic_path
from reslab.data.sources import RawData

__all__ = ["cache_path", "default_cache_dir", "load_cached", "save_cached"]

# bump when a reader's output changes; 2: the readers now refuse damaged or incomplete sources
# that version 1 decoded and cached (a cache hit would keep serving them); 3: also duplicate
# CIFAR batch files and images nested below a class folder
CACHE_VERSION = 3


def default_cache_dir() -> Path:
    """``$RESLAB_CACHE_DIR`` or ``~/.cache/reslab``."""
    env = os.environ.get("RESLAB_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "reslab"


def _fingerprint(path: Path) -> str:
    """Size and modification time of a file, or of every file below a folder."""
    if path.is_dir():
        items = sorted(
            (str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
            for f in path.rglob("*")
            if f.is_file()
        )
        return repr(items)
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def cache_path(path: Path, cache_dir: Path) -> Path:
    path = path.resolve()
    key = f"{CACHE_VERSION}|{path}|{_fingerprint(path)}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_dir / f"{path.name}.{digest}.pt"


def load_cached(file: Path) -> RawData | None:
    """The cached tensors, or None when absent or unreadable (then the source is decoded again)."""
    if not file.exists():
        return None
    try:
        d = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return RawData(
            d["train_images"],
            d["train_labels"],
            d["test_images"],
            d["test_labels"],
            list(d["classes"]),
        )
    except Exception as exc:  # a truncated or foreign file: decode again and overwrite it
        warnings.warn(f"ignoring unreadable data cache {file}: {exc}", stacklevel=2)
        return None


def save_cached(raw: RawData, file: Path) -> None:
    """Write atomically (temporary file + rename) so an interrupted write never looks valid."""
    with atomic_path(file) as tmp:
        torch.save(
            {
                "train_images": raw.train_images,
                "train_labels": raw.train_labels,
                "test_images": raw.test_images,
                "test_labels": raw.test_labels,
                "classes": raw.classes,
            },
            tmp,
        )
