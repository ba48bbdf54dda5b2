"""A POP3 maildrop on a Maildir, opened and updated as qmail-pop3d does it (qmail-semantics.md §8.3, §9).

:meth:`Mailbox.open` takes an exclusive ``flock`` on ``<maildir>/.pop3lock`` (RFC 1939 §8: one session
per maildrop; a second one gets :class:`MailboxInUse`), removes ``tmp/`` files untouched for 36 hours,
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
vanished or cannot be read. Every call here blocks on the disk: the server runs them in threads.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pqmail.pop3.protocol import BodyEncoder

__all__ = ["LOCK_NAME", "Mailbox", "MailboxError", "MailboxInUse", "Message", "uidl_for"]

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
        md = os.fspath(maildir).rstrip("/") or "/"
        fd = _lock(md)
        try:
            messages = _load(md, time.time() if now is None else now)
        except BaseException:
            os.close(fd)
            raise
        return cls(md, fd, messages)

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
        enc = BodyEncoder()
        return enc.feed(text) + enc.finish()

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
        try:
            fd = os.open(msg.path, _O_MSG)
        except FileNotFoundError:
            raise MailboxError("SYS/PERM", "message has been removed by another program") from None
        except OSError as e:
            raise MailboxError("SYS/TEMP", f"unable to open that message: {e.strerror}") from None
        with open(fd, "rb", buffering=0, closefd=True) as f:
            while not enc.done:
                try:
                    block = f.read(READ_CHUNK)
                except OSError as e:
                    raise MailboxError("SYS/TEMP", f"unable to read that message: {e.strerror}") from None
                if not block:
                    break
                out = enc.feed(block)
                if out:
                    yield out
        tail = enc.finish()
        if tail:
            yield tail

    # -- the UPDATE state

    def commit(self, deleted: Iterable[int]) -> int:
        """Unlink messages ``deleted`` (1-based numbers) and fsync ``cur/``; return how many failed.

        A message already gone counts as deleted. If the fsync fails, every deletion counts as failed:
        it is not known to be durable.
        """
        numbers = list(deleted)
        if not numbers:
            return 0
        failed = 0
        dirs = set()
        for n in numbers:
            path = self.messages[n - 1].path
            dirs.add(os.path.dirname(path))
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError:
                failed += 1
        try:
            for d in dirs:
                _fsync_dir(d)
        except OSError:
            return len(numbers)
        return failed


# ----------------------------------------------------------------------------- helpers

def _lock(md: str) -> int:
    try:
        fd = os.open(os.path.join(md, LOCK_NAME), _O_LOCK, 0o600)
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
    except OSError as e:
        os.close(fd)
        raise MailboxError("SYS/TEMP", f"unable to lock the Maildir: {e.strerror}") from None
    return fd


def _load(md: str, now: float) -> list[Message]:
    cur = f"{md}/cur"
    try:
        _clean_tmp(f"{md}/tmp", now)
        _move_new(f"{md}/new", cur)
        entries = _list(cur)
    except FileNotFoundError:
        raise MailboxError("SYS/PERM", "this box is not a Maildir (no new/ or cur/)") from None
    except OSError as e:
        raise MailboxError("SYS/TEMP", f"unable to read the Maildir: {e.strerror}") from None
    entries.sort(key=lambda e: (e[1].st_mtime, e[0]))
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
        out.append(Message(path, uid, size, st.st_size, st.st_mtime, text))
    return out


def _list(d: str) -> list[tuple[str, os.stat_result]]:
    out = []
    with os.scandir(d) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                out.append((entry.name, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
    return out


def _move_new(new: str, cur: str) -> None:
    """new/<name> -> cur/<name>:2, (qmail-pop3d does it at QUIT; we do it at login, once)."""
    with os.scandir(new) as it:
        names = [e.name for e in it if not e.name.startswith(".")]
    for name in names:
        target = f"{cur}/{name}" if ":" in name else f"{cur}/{name}:2,"
        if os.path.lexists(target):
            continue  # never overwrite: that would lose a message
        try:
            os.rename(f"{new}/{name}", target)
        except FileNotFoundError:
            continue


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
    with open(fd, "rb", buffering=0, closefd=True) as f:
        if st.st_size <= SMALL and st.st_size <= budget:
            text = f.read()
            size = len(text) + text.count(b"\n") + (2 if text and not text.endswith(b"\n") else 0)
            _sizes.put(key, size)
            return size, text
        lfs = 0
        total = 0
        last = b"\n"
        while block := f.read(READ_CHUNK):
            lfs += block.count(b"\n")
            total += len(block)
            last = block[-1:]
    size = total + lfs + (2 if total and last != b"\n" else 0)
    _sizes.put(key, size)
    return size, None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, _O_DIR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
