"""Writing files so that a failure loses nothing and names its file.

- :func:`atomic_path`: a write goes to a temporary file that is renamed over the target only when
  complete, so a crash, a kill or a full disk leaves the old file or the new one, never half of
  one. Temporary files of writers that died (``.NAME.PID.tmp``) are removed by the next write in
  their folder.
- :class:`WriteError`: every failed write becomes one ``OSError`` that names the file and the
  reason ("cannot write runs/x/checkpoint_latest.pt: No space left on device"), including the
  errors ``torch.save`` reports as a ``RuntimeError`` from its zip writer.
- :class:`FolderLock`: one process owns a folder (``fcntl.flock`` on a lock file in it). The
  kernel drops the lock when its holder exits in any way (``kill -9`` included), so a crash
  never leaves a folder locked.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

try:  # POSIX; elsewhere folders are not locked (FolderLock says so in its docstring)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_NAME",
    "FolderLock",
    "FolderLockedError",
    "WriteError",
    "append_text",
    "atomic_path",
    "clean_stale_temp",
    "is_temp_name",
    "os_error_of",
    "save_torch",
]

LOCK_NAME = ".reslab.lock"


class WriteError(OSError):
    """A write that failed, naming the file and the operating system's reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str, code: int | None = None):
        super().__init__(code, reason, str(path))

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"

    @classmethod
    def of(cls, path: str | os.PathLike[str], exc: BaseException) -> WriteError:
        """The ``WriteError`` for ``exc`` raised while writing ``path`` (its ``OSError``, found
        in the exception's chain where a library wrapped it, gives the reason)."""
        if isinstance(exc, WriteError):
            return exc
        cause = os_error_of(exc)
        if cause is None:
            return cls(path, f"{type(exc).__name__}: {exc}")
        reason = cause.strerror or (os.strerror(cause.errno) if cause.errno else str(cause))
        return cls(path, reason or type(cause).__name__, cause.errno)


def os_error_of(exc: BaseException | None) -> OSError | None:
    """The ``OSError`` behind ``exc``: itself, or one in its ``__cause__``/``__context__`` chain.

    ``torch.save`` reports a failed write (``ENOSPC`` on a full disk) as ``RuntimeError:
    [enforce fail at inline_container.cc] ... unexpected pos``, naming neither file nor reason;
    when it writes to a Python file object the ``OSError`` of that object's ``write`` is the
    RuntimeError's context, and that is the reason to report.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary file of :func:`atomic_path` (``.NAME.PID.tmp``)."""
    parts = name.rsplit(".", 2)
    return name.startswith(".") and len(parts) == 3 and parts[2] == "tmp" and parts[1].isdigit()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def clean_stale_temp(folder: Path) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` in ``folder`` whose writer no longer
    runs (a process killed mid-write); returns what was removed. Files of live processes stay.
    The process id is this host's: folders shared by writers on several hosts (a cluster's
    network file system) must not be written by two hosts at once, which the run folder's lock
    and rank 0's sole writing ensure for run folders."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if is_temp_name(entry.name) and not _alive(int(entry.name.rsplit(".", 2)[1])):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # the rename itself, where directories can be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to. On success its bytes are flushed to disk
    (fsync) and it is renamed over ``path``, so a crash or power loss leaves the old file or
    the new one, never half of one; if the write fails, the temporary file is removed, ``path``
    is untouched and the error is a :class:`WriteError` naming ``path`` and the reason (an
    exception that carries no ``OSError``, a bug rather than the file system, passes as it is).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError.of(path, exc) from exc
    clean_stale_temp(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and os_error_of(exc) is not None:
            raise WriteError.of(path, exc) from exc
        raise
    _fsync_folder(path.parent)


def save_torch(obj: object, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_path`. It writes to an open file
    object rather than a path: torch's own file writer turns a failed write into a bare
    ``RuntimeError`` that loses the OS's reason, a file object keeps it (:func:`os_error_of`)."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def append_text(path: Path, text: str) -> None:
    """Append ``text`` to ``path`` (a log such as metrics.jsonl); a failure is a
    :class:`WriteError` naming the file."""
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as exc:
        raise WriteError.of(path, exc) from exc


# -- one process per folder ------------------------------------------------------------------------


class FolderLockedError(OSError):
    """Another process holds the folder's lock."""

    def __init__(self, folder: Path, holder: str) -> None:
        super().__init__(errno.EBUSY, "in use", str(folder))
        self.folder, self.holder = folder, holder

    def __str__(self) -> str:
        return f"{self.folder} is in use by another reslab process ({self.holder})"


def _holder(path: Path) -> str:
    try:
        words = path.read_text().split()
    except OSError:
        words = []
    if len(words) >= 2:
        return f"pid {words[0]} on {words[1]}" + (f", since {words[2]}" if len(words) > 2 else "")
    return "its lock file is held"


class FolderLock:
    """An exclusive lock on a folder, held by this process until :meth:`release`.

    ``fcntl.flock`` on ``folder/.reslab.lock`` (created if missing; it holds the owner's pid,
    host and start time, for the message another process gets). The lock belongs to the open
    file, so the kernel releases it when the process ends however it ends; nothing is left
    stuck. Taking a lock this process already holds on the same folder only counts it (the
    command line takes a run folder before loading data, then :func:`reslab.train.fit` takes it
    again), and the folder is released when every holder has released it.

    Where ``fcntl`` is missing (Windows) there is no lock. On network file systems ``flock`` is
    as reliable as the file system's locking (NFSv4 supports it).
    """

    _held: ClassVar[dict[str, list[Any]]] = {}  # real path -> [fd, holders, found]
    _mutex: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._key: str | None = None
        self._created = False
        #: whether the lock file was there before this process first took the lock: the folder
        #: was a reslab run folder already (a run's leftovers, not a user's files)
        self.found = False

    def acquire(self) -> FolderLock:
        """Take the lock or raise :class:`FolderLockedError`; creates the folder if needed."""
        if self._key is not None:
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"{self.folder} is a file, not a folder")
        self._created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WriteError.of(self.folder, exc) from exc
        key = os.path.realpath(self.folder)
        with self._mutex:
            entry = self._held.get(key)
            if entry is not None:
                entry[1] += 1
            else:
                found = self.path.exists()
                fd = self._lock() if fcntl is not None else -1
                entry = self._held[key] = [fd, 1, found]
        self._key, self.found = key, bool(entry[2])
        return self

    def _lock(self) -> int:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise WriteError.of(self.path, exc) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FolderLockedError(self.folder, _holder(self.path)) from None
            except OSError:
                os.close(fd)
                raise
            try:  # the file we locked may have been unlinked by a holder that let go meanwhile
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with contextlib.suppress(OSError):  # only informative: a full disk must not stop the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {stamp}\n".encode(), 0)
        return fd

    def release(self) -> None:
        """Let go (the last holder in this process unlocks). A folder that holds nothing but the
        lock file (a run that failed before writing anything) is left as it was found: the lock
        file is removed, and the folder too if the lock created it."""
        key, self._key = self._key, None
        if key is None:
            return
        with self._mutex:
            entry = self._held[key]
            entry[1] -= 1
            if entry[1] > 0:
                return
            fd = self._held.pop(key)[0]
            with contextlib.suppress(OSError):  # while still locked: nobody else uses it
                if [e.name for e in os.scandir(self.folder)] == [LOCK_NAME]:
                    os.unlink(self.path)
                    if self._created:
                        os.rmdir(self.folder)
            if fd >= 0:
                os.close(fd)  # closing the only descriptor drops the flock

    @property
    def held(self) -> bool:
        return self._key is not None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
