"""System errors in qmail's words: djb's ``error_str`` texts and ``error_temp`` classification.

qmail-local's reports say ``Unable to open X: file does not exist. (#4.3.0)``, not Python's
``[Errno 2] No such file or directory``; bounce and log readers know those texts. Pure tables.
"""

from __future__ import annotations

import errno
import os

_TEXT = {
    0: "no error",
    errno.EINTR: "interrupted system call",
    errno.ENOMEM: "out of memory",
    errno.ENOENT: "file does not exist",
    errno.ETXTBSY: "text busy",
    errno.EIO: "input/output error",
    errno.EEXIST: "file already exists",
    errno.ETIMEDOUT: "timed out",
    errno.EINPROGRESS: "operation in progress",
    errno.EAGAIN: "temporary failure",
    errno.EPIPE: "broken pipe",
    errno.EPERM: "permission denied",
    errno.EACCES: "access denied",
    errno.ENXIO: "device not configured",
    errno.E2BIG: "argument list too long",
    errno.ENOEXEC: "exec format error",
    errno.EBADF: "file descriptor not open",
    errno.EDEADLK: "operation would cause deadlock",
    errno.EBUSY: "device busy",
    errno.EXDEV: "cross-device link",
    errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory",
    errno.EINVAL: "invalid argument",
    errno.ENFILE: "system cannot open more files",
    errno.EMFILE: "process cannot open more files",
    errno.EFBIG: "file too big",
    errno.ENOSPC: "out of disk space",
    errno.EROFS: "read-only file system",
    errno.EMLINK: "too many links",
    errno.ELOOP: "symbolic link loop",
    errno.ENAMETOOLONG: "file name too long",
    errno.EDQUOT: "disk quota exceeded",
    errno.ESTALE: "stale NFS file handle",
    errno.ENOLCK: "no locks available",
    errno.ENOSYS: "system call not available",
    errno.EOPNOTSUPP: "operation not supported",
}

# error_temp.c: errors worth retrying.
TEMPORARY = frozenset({
    errno.EINTR, errno.ENOMEM, errno.ETXTBSY, errno.EIO, errno.ETIMEDOUT, errno.EAGAIN,
    errno.EDEADLK, errno.EBUSY, errno.ENFILE, errno.EMFILE, errno.EFBIG, errno.ENOSPC,
    errno.ENETDOWN, errno.ENETUNREACH, errno.ENETRESET, errno.ECONNABORTED, errno.ECONNRESET,
    errno.ENOBUFS, errno.ETOOMANYREFS, errno.ECONNREFUSED, errno.EHOSTDOWN, errno.EHOSTUNREACH,
    errno.EUSERS, errno.EDQUOT, errno.ESTALE, errno.ENOLCK,
})


def error_str(code: int | None) -> str:
    """djb's text for ``code``; errors his table lacks get the C library's text, lowercased."""
    if code is None:
        return "unknown error"
    text = _TEXT.get(code)
    if text is None:
        text = os.strerror(code).lower()
    return text


def is_temporary(code: int | None) -> bool:
    return code in TEMPORARY
