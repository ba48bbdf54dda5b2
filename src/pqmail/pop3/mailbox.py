"""A POP3 maildrop on a Maildir, opened and updated as qmail-pop3d does it (qmail-semantics.md §8.3, §9).

:meth:`Mailbox.open` takes an exclusive ``flock`` on the Maildir directory (RFC 1939 §8: one session
per maildrop; a second one gets :class:`MailboxInUse`; on a filesystem that refuses to flock a directory,
NFS, on ``<maildir>/.pop3lock`` instead), removes ``tmp/`` files untouched for 36 hours,
moves every message in ``new/`` to ``cur/<name>:2,`` (the unique part before ``:`` never changes, so
neither does its UIDL), and lists ``cur/`` once, oldest first. Nothing else in the maildir changes
until :meth:`Mailbox.commit` (QUIT), which unlinks the deleted messages and fsyncs ``cur/`` before the
``+OK``. A session that ends any other way deletes nothing.

Sizes are octets as the client will count them (LF sent as CRLF): the file's size plus its LF count.
Counting needs one read of each message; the count is remembered per process, keyed by the file's
device, inode, size and mtime, so a client polling every minute costs a ``stat`` per message. Small
messages read for counting are kept for the session (up to a budget) so RETR of them reads no file.
Large ones are streamed in chunks (:meth:`Mailbox.chunks`).

UIDL is the unique part of the file name; one that is not 1-70 characters of 0x21-0x7E (RFC 1939 §7)
becomes ``x:`` + 64 hex digits of its SHA-256, stable across sessions and never equal to a real
unique part (those cannot contain ``:``).

What it trusts: the maildir path from the password store. What it never does: follow symlinks out of
the maildir, delete anything before QUIT, or raise anything but :class:`MailboxError` for a box that
vanished or cannot be read. Every call here blocks on the disk. Opening goes in steps
(:meth:`Mailbox.begin`, :class:`Opening`) so that the server can open a small box on its event loop (a few
dozen quick system calls, cheaper than a hand-off to a thread and back) and a big one in a thread.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pqmail.pop3.protocol import BodyEncoder, wire_size

__all__ = ["LOCK_NAME", "Mailbox", "MailboxError", "MailboxInUse", "Message", "Opening", "uidl_for"]

LOCK_NAME = ".pop3lock"
READ_CHUNK = 256 * 1024
SMALL = 64 * 1024  # messages up to this size are kept in memory after the counting read
SESSION_BUDGET = 1024 * 1024  # bytes of message text one session may keep
TMP_MAX_AGE = 36 * 3600  # maildir(5): a tmp file untouched this long is garbage
_SIZE_CACHE_MAX = 100_000

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_O_MSG = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_O_LOCK = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
_UIDL_OK = re.compile(r"[\x21-\x7e]{1,70}")
# flock of a directory refused: NFS (byte-range locks need a file open for writing), odd filesystems
_NO_DIR_LOCK = frozenset({errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL})


class MailboxError(Exception):
    """The maildrop cannot be used. ``code`` is the RFC 2449/3206 response code for the client."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class MailboxInUse(MailboxError):
    """Another session holds the maildrop's lock."""

    def __init__(self) -> None:
        super().__init__("IN-USE", "mailbox is in use by another session")


@dataclass
class Message:
    path: str
    uid: str
    size: int  # octets on the wire (CRLF)
    raw_size: int
    mtime: float
    text: bytes | None = None  # the file's content, when small enough to keep
    name: str = ""  # the file's name in cur/


def uidl_for(uniq: str) -> str:
    """The RFC 1939 unique-id for a Maildir unique name (hashed when it does not fit the rules)."""
    if _UIDL_OK.fullmatch(uniq):
        return uniq
    return "x:" + hashlib.sha256(os.fsencode(uniq)).hexdigest()


# ----------------------------------------------------------------------------- the size cache

class _SizeCache:
    """(dev, ino, size, mtime_ns) -> wire size, for this process; thread-safe, bounded."""

    def __init__(self, limit: int = _SIZE_CACHE_MAX) -> None:
        self.limit = limit
        self._d: dict[tuple[int, int, int, int], int] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int, int, int]) -> int | None:
        return self._d.get(key)

    def put(self, key: tuple[int, int, int, int], size: int) -> None:
        with self._lock:
            if len(self._d) >= self.limit:  # drop the oldest half (dicts keep insertion order)
                for k in list(self._d)[: self.limit // 2]:
                    del self._d[k]
            self._d[key] = size


_sizes = _SizeCache()


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# ----------------------------------------------------------------------------- the maildrop

class Mailbox:
    """An open, locked maildrop. Use :meth:`open`; :meth:`close` (or the context manager) unlocks."""

    def __init__(self, maildir: str, lock_fd: int, messages: list[Message]) -> None:
        self.maildir = maildir
        self.messages = messages
        self._lock_fd = lock_fd

    # -- opening

    @classmethod
    def open(cls, maildir: str | os.PathLike[str], now: float | None = None) -> Mailbox:
        """Lock and list ``maildir``; raises MailboxInUse or MailboxError, never OSError."""
        return cls.begin(maildir, now).finish()

    @classmethod
    def begin(cls, maildir: str | os.PathLike[str], now: float | None = None) -> Opening:
        """The first step of :meth:`open`: lock, clean ``tmp/``, list ``new/`` and ``cur/`` (names only).

        Costs a handful of system calls whatever the box holds; :attr:`Opening.files` then tells what
        the rest will cost, so that a caller on an event loop can finish a small box itself and hand a
        big one to a thread. Raises MailboxInUse or MailboxError (and then holds no lock).
        """
        md = os.fspath(maildir).rstrip("/") or "/"
        fd = _lock(md)
        try:
            return Opening(md, fd, time.time() if now is None else now)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """Release the lock (deleting nothing)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Mailbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def sizes(self) -> list[int]:
        return [m.size for m in self.messages]

    @property
    def uids(self) -> list[str]:
        return [m.uid for m in self.messages]

    # -- reading

    def cached_wire(self, number: int) -> bytes | None:
        """RETR's body of message ``number`` (1-based) when its text is in memory, else None."""
        text = self.messages[number - 1].text
        if text is None:
            return None
        return _wire(text)

    def small_wire(self, number: int, limit: int, lines: int | None = None) -> bytes | None:
        """RETR's (or with ``lines``, TOP's) body of message ``number``, whole, when its text is kept or its
        file is at most ``limit`` bytes; else None.

        For the server to answer a small message without a thread: no file, or one open and read.
        Raises MailboxError as :meth:`chunks` does.
        """
        msg = self.messages[number - 1]
        if msg.text is not None:
            return _wire(msg.text, lines)
        if msg.raw_size > limit:
            return None
        fd = _open_message(msg.path)
        try:
            data = os.read(fd, msg.raw_size + 1)
        except OSError as e:
            raise MailboxError("SYS/TEMP", f"unable to read that message: {e.strerror}") from None
        finally:
            os.close(fd)
        if len(data) > msg.raw_size:  # it grew (a Maildir file never should): stream it instead
            return None
        return _wire(data, lines)

    def chunks(self, number: int, lines: int | None = None) -> Iterator[bytes]:
        """The wire form of message ``number`` (1-based) for RETR (``lines`` None) or TOP, in chunks.

        Opening the file happens at the first ``next()``: a vanished or unreadable message raises
        MailboxError there, before anything was sent. Reading stops as soon as TOP has its lines.
        """
        msg = self.messages[number - 1]
        enc = BodyEncoder(lines)
        if msg.text is not None:
            out = enc.feed(msg.text) + enc.finish()
            if out:
                yield out
            return
        fd = _open_message(msg.path)
        try:
            while not enc.done:
                try:
                    block = os.read(fd, READ_CHUNK)
                except OSError as e:
                    raise MailboxError("SYS/TEMP", f"unable to read that message: {e.strerror}") from None
                if not block:
                    break
                out = enc.feed(block)
                if out:
                    yield out
        finally:
            os.close(fd)
        tail = enc.finish()
        if tail:
            yield tail

    # -- the UPDATE state

    def commit(self, deleted: Iterable[int]) -> int:
        """Unlink messages ``deleted`` (1-based numbers) and fsync ``cur/``; return how many failed.

        A message already gone counts as deleted. If ``cur/`` cannot be opened or the fsync fails, every
        deletion counts as failed: it is not known to be durable.
        """
        numbers = list(deleted)
        if not numbers:
            return 0
        # every message lives in cur/ (open moved new/ there): one directory descriptor serves the
        # unlinks (no path walk each) and the fsync; opened first, so a vanished cur/ fails them all
        try:
            dfd = os.open(f"{self.maildir}/cur", _O_DIR)
        except OSError:
            return len(numbers)
        try:
            failed = 0
            for n in numbers:
                try:
                    os.unlink(self.messages[n - 1].name, dir_fd=dfd)
                except FileNotFoundError:
                    pass
                except OSError:
                    failed += 1
            try:
                os.fsync(dfd)
            except OSError:
                return len(numbers)
            return failed
        finally:
            os.close(dfd)


class Opening:
    """A maildrop locked and listed by :meth:`Mailbox.begin`, not yet settled; :meth:`finish` completes it.

    ``files`` is the number of names in ``new/`` and ``cur/``: what :meth:`settle` will rename and stat.
    :meth:`settle` returns how many bytes :meth:`finish` will read to count line ends (sizes not known
    from an earlier session). Each step raises only MailboxError, after releasing the lock;
    :meth:`abandon` releases it when the caller gives up (a client that left).
    """

    def __init__(self, md: str, lock_fd: int, now: float) -> None:
        self.md = md
        self._lock_fd = lock_fd
        self._entries: list[tuple[str, os.stat_result]] | None = None
        try:
            _clean_tmp(f"{md}/tmp", now)
            with os.scandir(f"{md}/new") as it:
                self._new = [e for e in it if not e.name.startswith(".")]
            with os.scandir(f"{md}/cur") as it:
                self._cur = [e for e in it if not e.name.startswith(".")]
        except FileNotFoundError:
            raise MailboxError("SYS/PERM", "this box is not a Maildir (no new/ or cur/)") from None
        except OSError as e:
            raise MailboxError("SYS/TEMP", f"unable to read the Maildir: {e.strerror}") from None
        self.files = len(self._new) + len(self._cur)

    def abandon(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def settle(self) -> int:
        """Move ``new/`` to ``cur/`` and stat every message (once); the bytes :meth:`finish` will read."""
        if self._entries is None:
            try:
                self._entries = _settle(self.md, self._new, self._cur)
            except BaseException:
                self.abandon()
                raise
        return sum(st.st_size for _, st in self._entries if _sizes.get(_stat_key(st)) is None)

    def finish(self) -> Mailbox:
        """Settle if not yet done, count the sizes not known, and hand over the lock to the Mailbox."""
        self.settle()
        assert self._entries is not None
        try:
            messages = _measure_all(self.md, self._entries)
        except BaseException:
            self.abandon()
            raise
        fd, self._lock_fd = self._lock_fd, -1
        return Mailbox(self.md, fd, messages)


# ----------------------------------------------------------------------------- helpers

def _lock(md: str) -> int:
    """An exclusive flock on the Maildir directory itself (no lock file to create: creating one costs
    more than the rest of opening a small box); .pop3lock where the filesystem refuses that (NFS
    emulates flock with byte-range locks, which need a file open for writing)."""
    try:
        try:
            return _open_locked(md, _O_DIR)
        except OSError as e:
            if e.errno not in _NO_DIR_LOCK:
                raise
        return _open_locked(os.path.join(md, LOCK_NAME), _O_LOCK)
    except OSError as e:
        raise MailboxError("SYS/TEMP", f"unable to lock the Maildir: {e.strerror}") from None


def _open_locked(path: str, flags: int) -> int:
    """``path`` opened and flock'ed; MailboxError/MailboxInUse, or the OSError of flock itself."""
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        raise MailboxError("SYS/PERM", "this box has no Maildir") from None
    except NotADirectoryError:
        raise MailboxError("SYS/PERM", "this box's Maildir is not a directory") from None
    except OSError as e:
        raise MailboxError("SYS/TEMP", f"unable to open the Maildir: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MailboxInUse() from None
    except OSError:
        os.close(fd)
        raise
    return fd


def _settle(md: str, new: list[os.DirEntry[str]],
            cur: list[os.DirEntry[str]]) -> list[tuple[str, os.stat_result]]:
    """new/<name> -> cur/<name>:2, (qmail-pop3d does it at QUIT; we do it at login, once); then the
    (name, stat) of every regular file in cur/, oldest first."""
    entries: list[tuple[str, os.stat_result]] = []
    names = {e.name for e in cur}
    try:
        for e in cur:
            try:
                if e.is_file(follow_symlinks=False):
                    entries.append((e.name, e.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
        for e in new:
            name = e.name
            target = name if ":" in name else f"{name}:2,"
            # never overwrite: that would lose a message (the cur/ listing is from a moment ago, and
            # only a program ignoring the lock could add this name meanwhile: unique names never repeat)
            if target in names:
                continue
            try:
                # a rename keeps inode, size and mtime: this stat holds for the file under its cur/ name
                st = e.stat(follow_symlinks=False) if e.is_file(follow_symlinks=False) else None
                os.rename(f"{md}/new/{name}", f"{md}/cur/{target}")
            except FileNotFoundError:
                continue
            names.add(target)
            if st is not None:
                entries.append((target, st))
    except OSError as e:
        raise MailboxError("SYS/TEMP", f"unable to read the Maildir: {e.strerror}") from None
    entries.sort(key=lambda e: (e[1].st_mtime, e[0]))
    return entries


def _measure_all(md: str, entries: list[tuple[str, os.stat_result]]) -> list[Message]:
    cur = f"{md}/cur"
    budget = SESSION_BUDGET
    seen: set[str] = set()
    out = []
    for name, st in entries:
        path = f"{cur}/{name}"
        uid = uidl_for(name.split(":", 1)[0])
        if uid in seen:  # the same unique name twice (new/ and cur/): keep UIDLs unique
            uid = "x:" + hashlib.sha256(os.fsencode(name)).hexdigest()
        seen.add(uid)
        try:
            size, text = _measure(path, st, budget)
        except FileNotFoundError:
            continue  # removed while we listed it
        except OSError as e:
            raise MailboxError("SYS/TEMP", f"unable to read a message: {e.strerror}") from None
        if text is not None:
            budget -= len(text)
        out.append(Message(path, uid, size, st.st_size, st.st_mtime, text, name))
    return out


def _clean_tmp(tmp: str, now: float) -> None:
    try:
        it = os.scandir(tmp)
    except FileNotFoundError:
        return
    with it:
        for entry in it:
            try:
                if entry.is_file(follow_symlinks=False) and \
                        now - entry.stat(follow_symlinks=False).st_atime > TMP_MAX_AGE:
                    os.unlink(entry.path)
            except OSError:
                continue


def _measure(path: str, st: os.stat_result, budget: int) -> tuple[int, bytes | None]:
    """(wire size, content if kept): from the size cache, else by one read of the file."""
    key = _stat_key(st)
    known = _sizes.get(key)
    if known is not None:
        return known, None
    fd = os.open(path, _O_MSG)
    try:
        if st.st_size <= SMALL and st.st_size <= budget:
            # one read of one byte more than the stat said: a short read of a regular file is its end
            text = os.read(fd, st.st_size + 1)
            if len(text) <= st.st_size:
                size = wire_size(text)
                _sizes.put(key, size)
                return size, text
            lfs, total, last = text.count(b"\n"), len(text), text[-1:]
        else:
            lfs, total, last = 0, 0, b"\n"
        while block := os.read(fd, READ_CHUNK):
            lfs += block.count(b"\n")
            total += len(block)
            last = block[-1:]
    finally:
        os.close(fd)
    size = total + lfs + (2 if total and last != b"\n" else 0)
    if total == st.st_size:
        _sizes.put(key, size)
    return size, None


def _open_message(path: str) -> int:
    try:
        return os.open(path, _O_MSG)
    except FileNotFoundError:
        raise MailboxError("SYS/PERM", "message has been removed by another program") from None
    except OSError as e:
        raise MailboxError("SYS/TEMP", f"unable to open that message: {e.strerror}") from None


def _wire(text: bytes, lines: int | None = None) -> bytes:
    enc = BodyEncoder(lines)
    return enc.feed(text) + enc.finish()
