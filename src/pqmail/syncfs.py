"""Group syncs: make many written files durable with two system calls per file system.

Used by the group commits of the queue (smtpd's messages) and of Maildir delivery. ``syncfs(2)``
writes and waits for everything dirty on a file system; on ext4 without a journal it issues no
disk-cache flush after the metadata blocks it writes last, so :func:`sync_and_flush` follows it
with the ``fsync`` of a now clean descriptor, which is exactly that flush (and costs next to nothing
more on journalled file systems).

The first call of :func:`available` loads ctypes: make it before dropping privileges (the
interpreter's library may be readable by root alone); ``supervisor.drop_privileges`` and the
delivery zygote do. Only errno, functools and os are imported here: inject loads this module.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable, Iterable


def available() -> bool:
    """Whether syncfs(2) can be called here."""
    return _syncfs() is not None


def sync_and_flush(fds: Iterable[int]) -> None:
    """Make everything written so far durable on the file systems of ``fds`` (one descriptor on
    each is enough). OSError as fsync raises it."""
    for fd in fds:
        syncfs(fd)
        os.fsync(fd)


def syncfs(fd: int) -> None:
    """syncfs(2) of the file system ``fd`` is on; no cache flush guaranteed (see sync_and_flush)."""
    sync = _syncfs()
    if sync is None:
        raise OSError(errno.ENOSYS, "syncfs is not available")  # callers check available()
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
