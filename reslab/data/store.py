"""Where image bytes live: a folder, a zip archive read in place, or tar shards written by
``reslab data pack``. One :class:`FileStore` reads any of them by the names an index holds, in the
main process or in a DataLoader worker (each process opens its own archive handles)."""

from __future__ import annotations

import os
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from reslab.data.images import BadImageError, read_bounded

__all__ = ["FileStore", "check_source", "open_zip"]

# (pid, path) -> open ZipFile: a handle must not cross a fork, so each worker opens its own
_ZIPS: dict[tuple[int, str], zipfile.ZipFile] = {}
_SHARDS: dict[tuple[int, str], int] = {}  # (pid, path) -> file descriptor


def check_source(path: Path) -> Path:
    """``path`` if it can be a data source: a folder or a regular file. A named pipe, a device
    (``/dev/zero``) or a socket is refused by name: reading one would block or never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(
            f"data not found: {path} (expected 'digits', a CIFAR python folder or .tar.gz, an "
            "image folder / .zip with train/ (and val/, test/), or a CSV/TSV list of path,label)"
        ) from None
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        kind = (
            "a named pipe"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        raise ValueError(f"data source {path} is {kind}, not a data file or folder")
    return path


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"corrupt or unreadable zip archive {path}: {exc}") from exc


@dataclass(frozen=True)
class FileStore:
    """``kind``: "dir" (names are paths relative to ``root``, or absolute), "zip" (member names
    of the archive ``root``) or "shards" (``shard.tar/member`` with byte offset and size)."""

    root: str
    kind: str

    def where(self, name: str) -> str:
        """The file's name in messages: a path, or ``archive:member``."""
        # os.path, not pathlib: this runs for every image read (pathlib's parsing cost 0.1 ms)
        return f"{self.root}:{name}" if self.kind == "zip" else os.path.join(self.root, name)

    def read(self, name: str, limit: int, *, offset: int = -1, size: int = -1) -> bytes:
        """The bytes of one image (at most ``limit``); errors name the file."""
        where = self.where(name)
        if self.kind == "dir":
            return read_bounded(where, limit, where)
        if self.kind == "zip":
            return self._read_zip(name, limit, where)
        if self.kind == "shards":
            return self._read_shard(name, limit, where, offset, size)
        raise ValueError(f"unknown store kind {self.kind!r}")

    def _read_zip(self, name: str, limit: int, where: str) -> bytes:
        key = (os.getpid(), self.root)
        zf = _ZIPS.get(key)
        if zf is None:
            zf = _ZIPS[key] = open_zip(Path(self.root))
        try:
            info = zf.getinfo(name)
            if info.file_size > limit:  # the declared size: a zip bomb is refused unread
                raise BadImageError(where, f"{info.file_size:,} bytes, over the limit {limit:,}")
            with zf.open(info) as f:
                data = f.read(limit + 1)  # zipfile checks the CRC at the member's end
        except BadImageError:
            raise
        except (zipfile.BadZipFile, OSError, KeyError, EOFError, zlib.error) as exc:
            # a damaged deflate stream raises a bare zlib.error that names no file
            raise BadImageError(where, f"cannot read: {exc}") from exc
        if len(data) > limit:
            raise BadImageError(where, f"over the limit {limit:,} bytes")
        return data

    def _read_shard(self, name: str, limit: int, where: str, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise ValueError(f"{where}: a shard member needs its offset and size")
        if size > limit:
            raise BadImageError(where, f"{size:,} bytes, over the limit {limit:,}")
        shard = str(Path(self.root) / name.split("/", 1)[0])
        key = (os.getpid(), shard)
        fd = _SHARDS.get(key)
        if fd is None:
            try:
                fd = _SHARDS[key] = os.open(shard, os.O_RDONLY)
            except OSError as exc:
                raise BadImageError(where, exc.strerror or str(exc)) from exc
        data = os.pread(fd, size, offset)  # one positioned read: no seek state shared
        if len(data) != size:
            raise BadImageError(where, f"shard is truncated ({len(data)} of {size} bytes)")
        return data
