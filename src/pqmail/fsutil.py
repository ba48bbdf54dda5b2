"""Durable file operations: atomic replace, fsync of files and directories, group syncs."""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that a rename or link inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes,
    mode: int = 0o644,
    uid: int | None = None,
    gid: int | None = None,
) -> None:
    """Replace ``path`` with ``data``: write a temp file beside it, fsync, rename, fsync the directory.

    Readers see either the old or the new content, never a mix; a crash leaves the old file.
    """
    import tempfile  # here: inject and sendmail import this module, and start-up time counts

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if uid is not None or gid is not None:
                os.fchown(f.fileno(), -1 if uid is None else uid, -1 if gid is None else gid)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def syncfs_available() -> bool:
    """Whether :func:`sync_and_flush` can work here (Linux's syncfs).

    The first call loads ctypes: make it before dropping privileges (the interpreter's library may
    be readable by root alone); :func:`pqmail.supervisor.drop_privileges` does."""
    return _syncfs() is not None


def sync_and_flush(fds: dict[int, int]) -> None:
    """Make everything written so far durable on each file system: ``fds`` maps a device to one
    descriptor on it (a group commit: two system calls for any number of files).

    syncfs() writes and waits for everything dirty there, but on ext4 without a journal it issues
    no cache flush after the metadata blocks it writes last; the fsync() of the now clean
    descriptor that follows does exactly that flush (and costs next to nothing more on journalled
    file systems). OSError as fsync raises it."""
    for fd in fds.values():
        syncfs(fd)
        os.fsync(fd)


def syncfs(fd: int) -> None:
    """syncfs(2) of the file system ``fd`` is on; no cache flush guaranteed (see sync_and_flush)."""
    sync = _syncfs()
    if sync is None:
        raise OSError(errno.ENOSYS, "syncfs is not available")  # callers check syncfs_available()
    sync(fd)


@functools.cache
def _syncfs() -> Callable[[int], None] | None:
    try:
        import ctypes

        call = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError, ImportError):
        return None
    call.argtypes = [ctypes.c_int]
    call.restype = ctypes.c_int

    def syncfs(fd: int) -> None:
        if call(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return syncfs
