"""mbox delivery as qmail-local's ``mailfile`` does it (qmail-semantics.md §3.4, §3.10).

:func:`format_message` is pure: ``From_`` line (UFLINE), Return-Path, Delivered-To, the message with
every line matching ``^>*From `` given one more ``>``, a final LF if the message lacks one, then one
blank line. :func:`append` opens the file ``O_WRONLY|O_APPEND|O_CREAT|O_NONBLOCK`` (0600), takes an
exclusive ``flock`` waiting at most 30 s (if locking itself errors, qmail goes on without the lock),
writes, fsyncs, and on any write error truncates the file back to its old length (only when it holds
the lock). Every failure is a :class:`~pqmail.errors.TemporaryFailure` worded as qmail words it.

It runs as the box owner, in a delivery thread: it never changes directory, umask or signals.
"""

from __future__ import annotations

import fcntl
import os
import re
import time

from pqmail.errors import TemporaryFailure
from pqmail.local.syserr import error_str

LOCK_TIMEOUT = 30.0
_FROM = re.compile(rb"^(>*From )", re.MULTILINE)


def format_message(ufline: bytes, rpline: bytes, dtline: bytes, message: bytes) -> bytes:
    """The bytes appended to the mbox for one message."""
    body = _FROM.sub(rb">\1", message) if b"From " in message else message
    if body and not body.endswith(b"\n"):
        body += b"\n"
    return b"".join((ufline, rpline, dtline, body, b"\n"))


def _lock(fd: int, timeout: float) -> bool:
    """Exclusive flock within ``timeout`` seconds: True if locked, False if locking is unsupported."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except OSError:
            return False  # qmail: a lock that errors is skipped, not fatal
        left = deadline - time.monotonic()
        if left <= 0:
            raise TemporaryFailure("File has been locked for 30 seconds straight. (#4.3.0)")
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.25)


def append(path: bytes, name: str, data: bytes, lock_timeout: float = LOCK_TIMEOUT) -> None:
    """Append ``data`` (from :func:`format_message`) to the mbox at ``path``; ``name`` is for reports."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o600)
    except OSError as e:
        raise TemporaryFailure(f"Unable to open {name}: {error_str(e.errno)}. (#4.2.1)") from None
    locked = False
    pos = 0
    try:
        locked = _lock(fd, lock_timeout)
        pos = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except OSError as e:
        if locked:
            try:
                os.ftruncate(fd, pos)
            except OSError:
                pass
        raise TemporaryFailure(f"Unable to write {name}: {error_str(e.errno)}. (#4.3.0)") from None
    finally:
        os.close(fd)
