"""Maildir: create one (maildirmake), deliver into one, list what is in one.

Delivery follows maildir(5) and qmail-local's ``maildir_child`` (qmail-semantics.md §3.9, §9): create
``tmp/<unique>`` exclusively (mode 0600), write, fsync, close, ``link()`` it to ``new/<unique>`` (the
moment the message counts as delivered), unlink the tmp name, then fsync ``new/`` as pqmail's
durability contract demands (qmail itself does not). Every failure is a :class:`TemporaryFailure`
worded as qmail-local words it, and leaves no tmp file behind.

On Linux the file in ``tmp/`` is anonymous (``O_TMPFILE``) and is linked into ``new/`` through
``/proc/self/fd``: readers see exactly what they would otherwise, but nothing is ever left in
``tmp/``, and the file's fsync no longer writes a ``tmp/`` entry that is deleted a moment later
(ext4 syncs a new file's directory entry with it): a quarter less kernel time per delivery. Where
the file system refuses ``O_TMPFILE`` (NFS, older kernels) the named tmp file is used.

Unique names are the modern form ``<time>.M<usec>P<pid>Q<n>.<host>``: the per-process counter ``Q``
makes two deliveries by one process in one microsecond differ, the pid separates processes, and the
host (with ``/`` and ``:`` escaped as ``\\057`` and ``\\072``) separates machines sharing a Maildir over NFS.

What it trusts: the path it is given is the Maildir the caller (the assign entry and dot-qmail line)
chose. What it never does: follow a name out of the Maildir, parse message names it did not write
(readers must not), or lock anything (Maildir needs no locks).
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pqmail import syncfs
from pqmail.errors import TemporaryFailure, UsageError

__all__ = [
    "MaildirMessage",
    "SyncGroup",
    "deliver",
    "escape_host",
    "group_commit_available",
    "is_maildir",
    "maildirmake",
    "scan",
    "unique_name",
]

SUBDIRS = ("tmp", "new", "cur")

_O_CREATE = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
_O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_CREATE_TRIES = 3  # as qmail-local; a collision means another writer used our exact name
_O_ANON = os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC if hasattr(os, "O_TMPFILE") else 0
_NO_ANON = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL})  # what refuses O_TMPFILE
_PROC_FD = "/proc/self/fd/"
_LINK_REFUSED = frozenset({errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EINVAL})
_WRITEV_MAX = 64  # chunks in one writev (far below IOV_MAX)


# ----------------------------------------------------------------------------- unique names

def escape_host(host: str) -> str:
    """A host name fit for a Maildir file name: ``/`` -> ``\\057``, ``:`` -> ``\\072`` (maildir(5))."""
    return host.replace("/", "\\057").replace(":", "\\072")


_counter = itertools.count(1)
_counter_lock = threading.Lock()
_host_cache: tuple[str, str] | None = None  # (raw gethostname(), escaped)


def _local_host() -> str:
    # gethostname() costs a syscall; re-escape only when the host was renamed.
    global _host_cache
    raw = socket.gethostname()
    cached = _host_cache
    if cached is None or cached[0] != raw:
        cached = (raw, escape_host(raw))
        _host_cache = cached
    return cached[1]


def unique_name(hostname: str | None = None) -> str:
    """``<time>.M<usec>P<pid>Q<n>.<host>``: unique per delivery across threads, processes and hosts."""
    with _counter_lock:
        n = next(_counter)
    sec, nsec = divmod(time.time_ns(), 1_000_000_000)
    host = _local_host() if hostname is None else escape_host(hostname)
    return f"{sec}.M{nsec // 1000}P{os.getpid()}Q{n}.{host}"


# ----------------------------------------------------------------------------- maildirmake

def maildirmake(path: str | os.PathLike[str], uid: int | None = None, gid: int | None = None,
                mode: int = 0o700) -> Path:
    """maildirmake: ``path`` (``mode``) with ``tmp``, ``new``, ``cur`` (0700); chown all to uid/gid if given.

    Raises UsageError if ``path`` already exists (as maildirmake refuses to), OSError on a system error
    (a missing parent, permissions); on any failure nothing it created is left behind.
    """
    top = Path(path)
    try:
        os.mkdir(top, 0o700)
    except FileExistsError:
        raise UsageError(f"{top}: already exists") from None
    made = [top]
    try:
        os.chmod(top, mode)  # mkdir's mode is cut by the umask; qmail's is exact
        for sub in SUBDIRS:
            p = top / sub
            os.mkdir(p, 0o700)
            made.append(p)
            os.chmod(p, 0o700)
        if uid is not None or gid is not None:
            for p in made:
                os.chown(p, -1 if uid is None else uid, -1 if gid is None else gid)
        for d in (top, top.parent):  # the new entries must survive a crash like any provisioning step
            _fsync_dir(os.fspath(d))
    except BaseException:
        for p in reversed(made):
            try:
                os.rmdir(p)
            except OSError:
                pass
        raise
    return top


def is_maildir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has the three Maildir subdirectories ``tmp``, ``new`` and ``cur``."""
    base = os.fspath(path)
    return all(os.path.isdir(os.path.join(base, sub)) for sub in SUBDIRS)


# ----------------------------------------------------------------------------- delivery

def _fsync_dir(path: str) -> None:
    fd = os.open(path, _O_DIR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    n = os.write(fd, data)
    if n < len(data):  # short writes are rare (signals, pipes); loop only then
        view = memoryview(data)[n:]
        while view:
            view = view[os.write(fd, view):]


def _open_failure(maildir: str, err: OSError) -> TemporaryFailure:
    # Only on the error path: tell "no such maildir" (qmail: chdir failed, #4.2.1) from the rest.
    if not os.path.isdir(maildir) or not os.access(maildir, os.X_OK):
        return TemporaryFailure("Unable to chdir to maildir. (#4.2.1)")
    return TemporaryFailure(f"Unable to open tmp file in maildir: {err.strerror or err}. (#4.3.0)")


def _create_tmp(maildir: str) -> tuple[int, str, str]:
    """Exclusive create of ``tmp/<unique>``; returns (fd, name, tmp path)."""
    for attempt in range(_CREATE_TRIES):
        name = unique_name()
        tmp = f"{maildir}/tmp/{name}"
        try:
            return os.open(tmp, _O_CREATE, 0o600), name, tmp
        except FileExistsError as e:
            if attempt == _CREATE_TRIES - 1:
                raise TemporaryFailure(f"Unable to open tmp file in maildir: {e.strerror}. (#4.3.0)") \
                    from None
        except OSError as e:
            raise _open_failure(maildir, e) from None
    raise AssertionError("unreachable")


def _writev_all(fd: int, chunks: Sequence[bytes]) -> None:
    """All of ``chunks`` with as few system calls as the kernel allows (usually one)."""
    total = sum(map(len, chunks))
    done = os.writev(fd, chunks)
    if done < total:  # short writes are rare: finish the rest one piece at a time
        rest = b"".join(chunks)[done:]
        _write_all(fd, rest)


def _write_message(fd: int, chunks: Iterable[bytes]) -> None:
    """Write every chunk to fd, fsync it; OSError from the source is told apart from a write error."""
    _write_chunks(fd, chunks)
    try:
        os.fsync(fd)
    except OSError as e:
        raise TemporaryFailure(f"Unable to write to maildir: {e.strerror or e}. (#4.3.0)") from None


def _write_chunks(fd: int, chunks: Iterable[bytes]) -> None:
    if isinstance(chunks, tuple | list) and len(chunks) <= _WRITEV_MAX:  # in memory: one writev
        try:
            _writev_all(fd, chunks)
        except OSError as e:
            raise TemporaryFailure(f"Unable to write to maildir: {e.strerror or e}. (#4.3.0)") from None
        chunks = ()
    it = iter(chunks)
    while True:
        try:
            chunk = next(it)
        except StopIteration:
            break
        except OSError:
            raise TemporaryFailure("Unable to read message. (#4.3.0)") from None
        try:
            _write_all(fd, chunk)
        except OSError as e:
            raise TemporaryFailure(f"Unable to write to maildir: {e.strerror or e}. (#4.3.0)") from None


def deliver(maildir: str | os.PathLike[str], chunks: Iterable[bytes]) -> str:
    """Deliver the concatenation of ``chunks`` into ``maildir``; return the new file's name.

    When this returns, the message is in ``new/``, fsync'd, and ``new/`` is fsync'd. Any failure raises
    TemporaryFailure (qmail-local's wording and #4.x.x code) and removes the tmp file.
    """
    md = os.fspath(maildir)
    fd = _open_anonymous(md)
    if fd is not None:
        try:
            return _deliver_anonymous(md, fd, chunks)
        except _LinkRefused as e:
            if not isinstance(chunks, tuple | list):  # already consumed: cannot start over
                raise TemporaryFailure(f"Unable to link tmp file into new: {e}. (#4.3.0)") from None
    return _deliver_named(md, chunks)


def _open_anonymous(md: str) -> int | None:
    """An anonymous file in ``md/tmp``; None where the system or file system has none."""
    if not _anonymous_files():
        return None
    try:
        return os.open(f"{md}/tmp", _O_ANON, 0o600)
    except OSError as e:
        if e.errno not in _NO_ANON:
            raise _open_failure(md, e) from None
        return None


class _LinkRefused(Exception):
    """The file system made the anonymous file but will not link it: use a named tmp file."""


@functools.cache
def _anonymous_files() -> bool:
    return bool(_O_ANON) and os.path.isdir(_PROC_FD)


def _deliver_anonymous(md: str, fd: int, chunks: Iterable[bytes]) -> str:
    """Write and fsync the anonymous file ``fd``, link it into ``new/`` and fsync ``new/``."""
    try:
        _write_message(fd, chunks)
        new = _open_new(md)
        try:
            name = _link_into(new, fd)
            try:
                os.fsync(new)
            except OSError as e:
                # Not known to be durable: withdraw it so that the queue's retry neither loses nor
                # duplicates it.
                _unlink_quietly(name, new)
                raise TemporaryFailure(f"Unable to sync maildir new: {e.strerror or e}. (#4.3.0)") \
                    from None
            return name
        finally:
            os.close(new)
    finally:
        os.close(fd)  # an unlinked anonymous file simply goes


def _open_new(md: str) -> int:
    try:
        return os.open(f"{md}/new", _O_DIR)
    except OSError as e:
        raise TemporaryFailure(f"Unable to link tmp file into new: {e.strerror or e}. (#4.3.0)") from None


def _link_into(new: int, fd: int) -> str:
    """Give the anonymous file ``fd`` a unique name in the directory ``new``; return the name."""
    for attempt in range(_CREATE_TRIES):
        name = unique_name()
        try:
            # a dir fd makes CPython call linkat(), which follows the /proc link to the file itself
            os.link(f"{_PROC_FD}{fd}", name, dst_dir_fd=new, follow_symlinks=True)
            return name
        except FileExistsError as e:
            if attempt == _CREATE_TRIES - 1:
                raise TemporaryFailure(f"Unable to link tmp file into new: {e.strerror}. (#4.3.0)") \
                    from None
        except OSError as e:
            if e.errno in _LINK_REFUSED:
                raise _LinkRefused(e.strerror or str(e)) from None
            raise TemporaryFailure(f"Unable to link tmp file into new: {e.strerror or e}. (#4.3.0)") \
                from None
    raise AssertionError("unreachable")


def _deliver_named(md: str, chunks: Iterable[bytes]) -> str:
    """The classic way: a named ``tmp/`` file, linked into ``new/``, then unlinked."""
    fd, name, tmp = _create_tmp(md)
    new = f"{md}/new/{name}"
    try:
        try:
            _write_message(fd, chunks)
        finally:
            try:
                os.close(fd)
            except OSError as e:  # NFS reports write errors at close
                raise TemporaryFailure(f"Unable to write to maildir: {e.strerror or e}. (#4.3.0)") from None
        try:
            os.link(tmp, new)
        except OSError as e:
            raise TemporaryFailure(f"Unable to link tmp file into new: {e.strerror or e}. (#4.3.0)") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    # Delivered. A tmp name left behind is harmless: readers remove stale tmp files (maildir(5)).
    _unlink_quietly(tmp)
    try:
        _fsync_dir(f"{md}/new")
    except OSError as e:
        # Not known to be durable: withdraw it so that the queue's retry neither loses nor duplicates it.
        _unlink_quietly(new)
        raise TemporaryFailure(f"Unable to sync maildir new: {e.strerror or e}. (#4.3.0)") from None
    return name


def _unlink_quietly(path: str, dir_fd: int | None = None) -> None:
    try:
        os.unlink(path, dir_fd=dir_fd)
    except OSError:
        pass


# ----------------------------------------------------------------------------- group commit

@dataclass(eq=False)
class _Pending:
    fd: int  # the anonymous file, written, not yet synced
    maildir: str
    chunks: Sequence[bytes]  # kept for the named-file fallback
    tag: object
    dev: int


class SyncGroup:
    """Maildir deliveries that share their syncs: a delivery process's group commit.

    :meth:`add` writes a message into an anonymous file in the Maildir's ``tmp/`` at once (a failure
    there is the delivery's own, raised as :func:`deliver` raises it). :meth:`commit` then makes every
    added file durable, links each into its ``new/``, and makes those names durable: per file system,
    one ``syncfs`` and one ``fsync`` (the disk-cache flush) for all the files, then the same for all
    the ``new/`` directories, where :func:`deliver` costs two fsyncs per message, each writing its own
    blocks and flushing the disk cache (on the reference VM, a quarter of the CPU per message).

    The guarantee per delivery is :func:`deliver`'s, in the same order: the file is on disk before
    its name in ``new/`` exists, and the name is on disk before :meth:`commit` returns; a name not
    known to be durable is withdrawn. ``syncfs`` writes whatever else is dirty on that file system
    too: the price of a group is the other writers' pending data, which is why a delivery process
    uses one only when several jobs are waiting. Where anonymous files or ``syncfs`` are missing,
    :meth:`add` simply delivers (fsync'd) at once.

    Failures are per tag (the caller's job): :attr:`failed` maps a tag to the TemporaryFailure of
    the first of its files that could not be made durable.
    """

    def __init__(self) -> None:
        self._pending: list[_Pending] = []
        self.failed: dict[object, TemporaryFailure] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, maildir: str | os.PathLike[str], chunks: Sequence[bytes], tag: object) -> None:
        """Write ``chunks`` (in memory) into ``maildir``'s tmp/; delivered at the next commit."""
        md = os.fspath(maildir)
        if not syncfs.available():
            deliver(md, chunks)
            return
        fd = _open_anonymous(md)
        if fd is None:  # no anonymous files here: the classic way, synced on its own
            _deliver_named(md, chunks)
            return
        try:
            _write_chunks(fd, chunks)
            dev = os.fstat(fd).st_dev
        except BaseException:
            os.close(fd)
            raise
        self._pending.append(_Pending(fd, md, chunks, tag, dev))

    def commit(self) -> None:
        """Make every added message durable in its ``new/``; failures go to :attr:`failed`."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            try:
                syncfs.sync_and_flush({p.dev: p.fd for p in pending}.values())
            except OSError as e:
                self._fail(pending, f"Unable to write to maildir: {e.strerror or e}. (#4.3.0)")
                return
            self._link(pending)
        finally:
            for p in pending:
                os.close(p.fd)

    def _link(self, pending: list[_Pending]) -> None:
        dirs: dict[str, int] = {}  # new/ of each Maildir, opened once for the group
        linked: list[tuple[_Pending, int, str]] = []
        try:
            for p in pending:
                if p.tag in self.failed:
                    continue  # as qmail-local: a recipient's first failure stops its deliveries
                try:
                    new = dirs.get(p.maildir)
                    if new is None:
                        new = dirs[p.maildir] = _open_new(p.maildir)
                    linked.append((p, new, _link_into(new, p.fd)))
                except _LinkRefused:
                    try:
                        _deliver_named(p.maildir, p.chunks)  # synced on its own
                    except TemporaryFailure as e:
                        self.failed.setdefault(p.tag, e)
                except TemporaryFailure as e:
                    self.failed.setdefault(p.tag, e)
            try:
                syncfs.sync_and_flush({p.dev: new for p, new, _name in linked}.values())
            except OSError as e:
                for _p, new, name in linked:
                    _unlink_quietly(name, new)  # not known to be durable: withdrawn, retried
                self._fail([p for p, _new, _name in linked],
                           f"Unable to sync maildir new: {e.strerror or e}. (#4.3.0)")
        finally:
            for fd in dirs.values():
                os.close(fd)

    def _fail(self, pending: list[_Pending], text: str) -> None:
        for p in pending:
            self.failed.setdefault(p.tag, TemporaryFailure(text))


def group_commit_available() -> bool:
    """Whether :class:`SyncGroup` shares syncs here (else it delivers each message on its own).

    The first call loads what it needs (ctypes): make it before dropping privileges."""
    return _anonymous_files() and syncfs.available()


# ----------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class MaildirMessage:
    """One message file in ``new/`` or ``cur/``."""

    path: Path
    name: str
    uniq: str  # the name up to the first ':' (the info suffix is not part of the identity)
    size: int
    mtime: float
    in_new: bool


def scan(path: str | os.PathLike[str]) -> list[MaildirMessage]:
    """Messages in ``new/`` and ``cur/`` (dot-files skipped), oldest first by mtime, then by name.

    A file that disappears while being listed (a concurrent reader moved or deleted it) is skipped.
    """
    base = Path(path)
    out: list[MaildirMessage] = []
    for sub, in_new in (("new", True), ("cur", False)):
        d = base / sub
        with os.scandir(d) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                out.append(MaildirMessage(path=d / entry.name, name=entry.name,
                                          uniq=entry.name.split(":", 1)[0], size=st.st_size,
                                          mtime=st.st_mtime, in_new=in_new))
    out.sort(key=lambda m: (m.mtime, m.name))
    return out
