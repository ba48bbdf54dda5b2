"""The durable on-disk queue under ``ROOT/queue``: qmail's layout, qmail-queue's write order.

What it does: makes a message safe (:meth:`Queue.enqueue`), and gives the queue manager and the
queue tools the few file operations they need (preprocessing, marking recipients done, bounce
paragraphs, removal, clean-up after a crash). It holds no state worth keeping between calls: the
files are the state.

Layout (qmail-semantics.md §4.1; ``N`` = id mod 23; the id is the inode number of the mess file)::

    pid/<pid>.<ns>.<seq>   a new message's first name, gone once it is linked into mess/
    mess/N/<id>            "Received: (qmail <pid> invoked <who>); <date822>" + the message
    intd/<id>, todo/<id>   one inode, two names: u<uid>\\0 p<pid>\\0 F<sender>\\0 T<rcpt>\\0 ...
                           (todo/ is the commit point; both go once the message is preprocessed)
    info/N/<id>            F<sender>\\0; its mtime is the message's birth
    local/N/<id>           T<addr>\\0 per recipient after rewriting; T becomes D in place when done
    remote/N/<id>          likewise; its mtime is used by the manager as the next retry time
    bounce/<id>            permanent-failure paragraphs collected so far
    lock/sendmutex         flock'd by the one queue manager
    lock/trigger           FIFO: one byte wakes the manager (``F`` = retry everything now)
    pool/<inode>           spare files: a finished message's mess and intd files, kept for reuse

Why ``pool/``: freeing two inodes per message costs more than anything else the queue does on
ext4 without a journal (every new inode then walks past each inode of its block group freed in the
last one to six minutes, and every freed data block is a synchronous discard when mounted with
``discard``). So the manager moves a finished message's files (up to POOL_FILE_MAX bytes, at most
POOL_MAX of them) into ``pool/`` instead of unlinking them, and writers take their new files from
there. A spare's old bytes are never seen: a message counts only once it is linked into ``todo/``,
and by then it has been overwritten, trimmed to its length and fsync'd.

Making a message safe (§4.2, plus what Linux needs): create ``pid/...`` O_EXCL and flock it (or
claim a spare: open ``pool/<inode>``, take its flock without waiting, rename it to ``mess/N/<inode>``);
its inode is the id; link it to ``mess/N/id`` and unlink the pid name; write the Received line and the
message, and ``intd/id``; fsync both and ``mess/N/``; link ``intd/id`` to ``todo/id`` (the commit
point); fsync ``todo/``; only then return, after writing one byte to the trigger without blocking.
Concurrent enqueue_async calls share these fsyncs (group commit); enqueue is a group of one. A
group of several replaces the per-file and per-directory fsyncs by one syncfs and one flush before
the todo links, and one syncfs before the fsync of ``todo/`` (see :mod:`pqmail.syncfs`).
A crash before the todo link leaves files that :meth:`Queue.cleanup_stale` removes and that are
never delivered; after it, the message is whole and will be delivered.

What it trusts: the files under ``queue/`` (only pqmail writes there). What it never does: return
from enqueue before the message is committed and durable; mark a recipient done or drop a message
file except when the manager asks; remove a file a writer still holds (see cleanup_stale).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import stat
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from pqmail import syncfs
from pqmail.addresses import date822
from pqmail.errors import PermanentFailure, TemporaryFailure
from pqmail.queue.layout import SPLIT, make_queue

if TYPE_CHECKING:  # pathlib is imported only when used: inject's start-up time counts
    from pathlib import Path

MAX_ADDRESS = 1002  # qmail-queue's ADDR - 1: a longer address is its exit 11
CHANNELS = ("local", "remote")
STALE_PID_AGE = 300  # seconds: see cleanup_stale
_BATCH = 1 << 16  # bytes gathered before one writev while copying a message
_ENC = ("utf-8", "surrogateescape")  # addresses: 8-bit clean, UTF-8 when they are UTF-8

_seq = itertools.count(1)  # with pid and time_ns, unique pid/ names across threads
POOL_MAX = 2048  # spare files kept in pool/ at the most
POOL_FILE_MAX = 64 * 1024  # a larger file is removed: reusing it for a small message frees blocks
_SPARES_RELIST = 0.2  # seconds a writer waits before looking again at a pool/ it found empty
_POOL_RECOUNT = 5.0  # seconds: how often the manager counts pool/ again (writers take from it)


# ----------------------------------------------------------------------------- records
# Immutable records are NamedTuples; Record is a plain class: importing dataclasses would cost
# inject's start-up about 14 ms (inspect, ast, dis).

class Record:
    """One recipient line of a ``local`` or ``remote`` file: ``offset`` is where its T/D byte is.

    Mutable on purpose: the manager flips ``done`` (and may set other attributes, e.g. ``uid``)
    after a delivery.
    """

    def __init__(self, address: str, offset: int, done: bool) -> None:
        self.address = address
        self.offset = offset
        self.done = done

    def __repr__(self) -> str:
        return f"Record(address={self.address!r}, offset={self.offset}, done={self.done})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        return (self.address, self.offset, self.done) == (other.address, other.offset, other.done)

    __hash__ = None  # mutable


class Envelope(NamedTuple):
    """A ``todo`` entry: who queued it (uid, pid) and the envelope as given to enqueue."""

    sender: str
    recipients: list[str]
    pid: int | None
    uid: int | None


class QueuedRecipient(NamedTuple):
    """One recipient as the queue tools show it; channel is ``local``, ``remote`` or ``todo``."""

    channel: str
    address: str
    done: bool
    next_attempt: float | None
    last: str | None = None  # the last attempt's report, for recipients still waiting


class QueuedMessage(NamedTuple):
    """One committed message as the queue tools show it (qmail-qread's fields)."""

    id: int
    birth: float
    size: int
    sender: str
    bouncing: bool
    recipients: list[QueuedRecipient]


# ----------------------------------------------------------------------------- pure helpers

def received_line(pid: int, invoked: str, when: float | None = None) -> bytes:
    """qmail-queue's first line: ``Received: (qmail <pid> invoked <who>); <date822>``."""
    return f"Received: (qmail {pid} invoked {invoked}); {date822(when)}\n".encode(*_ENC)


def encode_address(addr: str, what: str = "address") -> bytes:
    """The address as stored, or PermanentFailure: NUL/LF, or longer than 1002 bytes (qmail's 11)."""
    try:
        raw = addr.encode(*_ENC)
    except UnicodeEncodeError:
        raise PermanentFailure(f"{what} is not valid text: {addr!r}") from None
    if b"\0" in raw or b"\n" in raw:
        raise PermanentFailure(f"{what} contains a NUL or line feed: {addr!r}")
    if len(raw) > MAX_ADDRESS:
        raise PermanentFailure(f"{what} is longer than {MAX_ADDRESS} bytes (#5.1.3)")
    return raw


def pack_envelope(uid: int, pid: int, sender: str, recipients: list[str]) -> bytes:
    """The ``intd``/``todo`` bytes: ``u<uid>\\0p<pid>\\0F<sender>\\0`` then ``T<rcpt>\\0`` each."""
    if not recipients:
        raise PermanentFailure("no recipients")
    parts = [b"u%d\0p%d\0F" % (uid, pid), encode_address(sender, "sender"), b"\0"]
    for r in recipients:
        parts += (b"T", encode_address(r, "recipient"), b"\0")
    return b"".join(parts)


def parse_envelope(data: bytes, where: str = "envelope") -> Envelope:
    """Read a ``todo`` entry; a truncated or sender-less one is a TemporaryFailure naming ``where``."""
    if not data.endswith(b"\0"):
        raise TemporaryFailure(f"{where}: truncated envelope")
    sender: str | None = None
    rcpts: list[str] = []
    pid = uid = None
    for field in data[:-1].split(b"\0"):
        kind, value = field[:1], field[1:]
        if kind == b"T":
            rcpts.append(value.decode(*_ENC))
        elif kind == b"F":
            sender = value.decode(*_ENC)
        elif kind == b"u" and value.isdigit():
            uid = int(value)
        elif kind == b"p" and value.isdigit():
            pid = int(value)
    if sender is None:
        raise TemporaryFailure(f"{where}: envelope without a sender")
    return Envelope(sender=sender, recipients=rcpts, pid=pid, uid=uid)


def channel_records(addresses: list[str]) -> list[Record]:
    """Records for a new channel file, with the offsets they will have once written."""
    out: list[Record] = []
    offset = 0
    for a in addresses:
        out.append(Record(address=a, offset=offset, done=False))
        offset += len(a.encode(*_ENC)) + 2
    return out


def parse_channel(data: bytes) -> list[Record]:
    """The records of a ``local``/``remote`` file; a final record without its NUL is ignored."""
    out: list[Record] = []
    i = 0
    n = len(data)
    while i < n:
        j = data.find(b"\0", i)
        if j < 0:
            break
        kind = data[i:i + 1]
        if kind in (b"T", b"D"):
            out.append(Record(address=data[i + 1:j].decode(*_ENC), offset=i, done=kind == b"D"))
        i = j + 1
    return out


# ----------------------------------------------------------------------------- low-level I/O

def _as_failure(e: BaseException, where: str) -> BaseException:
    """An enqueue failure as the caller sees it: PqmailError as is, OSError as TemporaryFailure."""
    if isinstance(e, OSError):
        return TemporaryFailure(f"unable to queue the message in {where}: {e.strerror or e}")
    return e


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _exists(path: str) -> bool:
    try:
        os.lstat(path)
        return True
    except FileNotFoundError:
        return False


def _writev_all(fd: int, bufs: list[Any]) -> None:
    """writev until everything is written (a regular file rarely writes short, but it may)."""
    if len(bufs) <= 1024 and all(type(b) is bytes for b in bufs):  # the usual case: one writev
        n = os.writev(fd, bufs)
        if n == sum(map(len, bufs)):
            return
        bufs = [memoryview(b"".join(bufs))[n:]]
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    while views:
        n = os.writev(fd, views[:1024])  # IOV_MAX
        while n and views:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def _copy_fd(src: int, dst: int) -> None:
    """Append the rest of ``src`` to ``dst``: sendfile (in the kernel), else read/write."""
    try:
        while os.sendfile(dst, src, None, 1 << 24):
            pass
        return
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while block := os.read(src, 1 << 20):
        _writev_all(dst, [block])


def _write_message(fd: int, head: bytes, message: Any) -> None:
    """Write ``head`` then the message: bytes, or an iterable of bytes / PathLike / readable /
    iterables of bytes (written as they come: that is how a slow stdin is streamed)."""
    if isinstance(message, (bytes, bytearray, memoryview)):
        _writev_all(fd, [head, message])
        return
    if isinstance(message, (str, os.PathLike)) or hasattr(message, "read"):
        message = [message]
    pending: list[Any] = [head]
    size = len(head)

    def flush() -> None:
        nonlocal pending, size
        _writev_all(fd, pending)
        pending, size = [], 0

    for chunk in message:
        if isinstance(chunk, (bytes, bytearray, memoryview)):
            pending.append(chunk)
            size += len(chunk)
            if size >= _BATCH:
                flush()
            continue
        flush()
        if isinstance(chunk, os.PathLike):
            src = os.open(chunk, os.O_RDONLY)
            try:
                _copy_fd(src, fd)
            finally:
                os.close(src)
        elif hasattr(chunk, "read"):
            while block := chunk.read(1 << 16):
                _writev_all(fd, [block])
        elif isinstance(chunk, str):
            raise TypeError("message chunks are bytes, a Path, a binary file or an iterable of bytes")
        else:
            for block in chunk:
                _writev_all(fd, [block])
    flush()


def _write_synced(path: str, data: bytes, flags: int = os.O_TRUNC, sync: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o600)
    try:
        _writev_all(fd, [data])
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # already finished and removed
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ids(path: str) -> list[int]:
    try:
        return [int(n) for n in os.listdir(path) if n.isdigit()]
    except FileNotFoundError:
        return []


# ----------------------------------------------------------------------------- the queue

class Queue:
    """One queue directory (``ROOT/queue``). Safe to share between threads and processes."""

    def __init__(self, path: str | os.PathLike[str], max_threads: int = 32) -> None:
        self._dir = os.fspath(path)
        self._max_threads = max_threads
        self._pool: Any = None  # made on first use, by the event loop's thread (no lock needed)
        self._waiting: list[tuple[tuple, Any]] = []  # enqueue_async calls for the next group commit
        self._committing = False
        self._commit_task: Any = None
        self._dirty: dict[int, set[str]] = {}  # mid -> channel dirs to fsync at finish_preprocess
        self._dir_fds: dict[str, int] = {}  # enqueue_async's directories (mess/N, todo), kept open
        self._spares: list[str] = []  # names in pool/ this writer may claim
        self._spares_listed = 0.0
        self._pool_count = 0  # the manager's estimate of the files in pool/
        self._pool_counted = float("-inf")
        self._pool_owner: tuple[int, int] | None = None  # (uid, gid) of pool/, once known

    # -- names

    def _split(self, sub: str, mid: int) -> str:
        return f"{self._dir}/{sub}/{mid % SPLIT}/{mid}"

    def _flat(self, sub: str, mid: int) -> str:
        return f"{self._dir}/{sub}/{mid}"

    @property
    def path(self) -> Path:
        from pathlib import Path

        return Path(self._dir)

    def message_path(self, mid: int) -> Path:
        """``mess/N/id``: the message as queued (Received line first)."""
        from pathlib import Path

        return Path(self.message_name(mid))

    def message_name(self, mid: int) -> str:
        """:meth:`message_path` as a string, for the hot path."""
        return self._split("mess", mid)

    # -- injection

    def enqueue(self, sender: str, recipients: list[str], message: Any,
                invoked: str | None = None) -> int:
        """Make a message safe and return its id; return only once it is committed and durable.

        ``message``: bytes, or an iterable of chunks, each bytes, a Path (its contents are copied),
        a binary file (read to EOF) or an iterable of bytes (written as it comes). ``invoked`` is
        qmail-queue's ``<who>``: ``by uid <n>`` (default: ours), ``from network``, ``for bounce``.
        Raises PermanentFailure for a bad envelope (no recipients; NUL/LF; over 1002 bytes),
        TemporaryFailure when the queue cannot take it (permissions, disk full, I/O error).
        """
        [outcome] = self._commit_group([(sender, list(recipients), message, invoked)])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def enqueue_async(self, sender: str, recipients: list[str], message: Any,
                            invoked: str | None = None) -> int:
        """:meth:`enqueue` for an event loop, with group commit: returns once committed and durable.

        Calls that arrive while a group is being committed wait for the next group, which is then
        made safe with one fsync per file (cheap after the first: the journal commits them together)
        and one per directory, and committed into ``todo/`` with one fsync of ``todo/`` for all.
        The blocking work runs in this queue's thread pool, never on the event loop.
        """
        return await self.enqueue_future(sender, recipients, message, invoked)

    def enqueue_future(self, sender: str, recipients: list[str], message: Any,
                       invoked: str | None = None) -> Any:
        """:meth:`enqueue_async` as a plain asyncio future of the id (no coroutine, no Task): for a
        caller that answers from a done callback, as the smtpd does for every message. Must be
        called on the event loop's thread. Cancelling the future does not stop the enqueue."""
        import asyncio

        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiting.append(((sender, list(recipients), message, invoked), fut))
        if not self._committing:
            self._committing = True
            self._commit_task = loop.create_task(self._commit_groups())
        return fut

    async def _commit_groups(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                try:
                    outcomes = await loop.run_in_executor(self._executor(), self._commit_group_kept,
                                                          [args for args, _ in group])
                except BaseException as e:  # the pool is gone (shutdown): fail this group
                    outcomes = [e] * len(group)
                for (_, fut), outcome in zip(group, outcomes, strict=True):
                    if fut.done():
                        continue
                    if isinstance(outcome, BaseException):
                        fut.set_exception(outcome)
                    else:
                        fut.set_result(outcome)
        finally:
            self._committing = False

    def _commit_group_kept(self, calls: list[tuple]) -> list[int | BaseException]:
        """:meth:`_commit_group` for enqueue_async: a long-lived queue (a server's) keeps the
        descriptors of the directories it syncs open, which saves an open and a close per directory
        and group; :meth:`close` closes them."""
        return self._commit_group(calls, self._sync_kept_dir)

    def _sync_kept_dir(self, path: str) -> None:
        fd = self._dir_fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            if self._dir_fds.setdefault(path, fd) != fd:  # another thread opened it first
                os.close(fd)
                fd = self._dir_fds[path]
        os.fsync(fd)

    def _commit_group(self, calls: list[tuple], sync_dir: Any = _fsync_dir) -> list[int | BaseException]:
        """Commit several messages together: write all, sync all, link all into todo/, sync todo/."""
        outcomes: list[int | BaseException] = []
        staged: list[tuple[int, int, str, str, int]] = []  # (index, fd, mess, intd, intd fd)
        pid, uid = os.getpid(), os.getuid()
        heads: dict[str, bytes] = {}  # the group is queued at one time: one Received line per <who>
        try:
            for sender, recipients, message, invoked in calls:
                try:
                    envelope = pack_envelope(uid, pid, sender, recipients)
                    who = invoked or f"by uid {uid}"
                    head = heads.get(who)
                    if head is None:
                        head = heads[who] = received_line(pid, who)
                    staged.append((len(outcomes), *self._stage(pid, head, message, envelope)))
                    outcomes.append(-1)
                except BaseException as e:
                    outcomes.append(_as_failure(e, self._dir))
            try:
                # Several messages: one syncfs and flush for all their files and directories,
                # where each would cost two fsyncs and one per mess/N directory (see
                # pqmail.syncfs); one message keeps its fsyncs (a light load pays no
                # whole-file-system sync).
                grouped = len(staged) > 1 and syncfs.available()
                if grouped:
                    first = staged[0][1]
                    syncfs.sync_and_flush([first])
                else:
                    dirs = set()
                    for _, fd, mess, _, ifd in staged:
                        os.fsync(fd)
                        os.fsync(ifd)
                        dirs.add(os.path.dirname(mess))
                    for d in sorted(dirs):
                        sync_dir(d)
                for i, _, mess, intd, _ in staged:
                    mid = int(os.path.basename(mess))
                    self._link_todo(intd, mid)
                    outcomes[i] = mid
                if grouped:
                    syncfs.syncfs(first)  # the new todo/ names and link counts, flushed by the fsync below
                sync_dir(f"{self._dir}/todo")
            except BaseException as e:
                failure = _as_failure(e, self._dir)
                for i, _, mess, intd, _ in staged:
                    if outcomes[i] == -1:  # never committed: nothing may keep these names
                        outcomes[i] = failure
                        for name in (intd, mess):
                            try:
                                os.unlink(name)
                            except OSError:
                                pass
                    else:  # linked but todo/ not known durable: fail it too (the sender retries)
                        outcomes[i] = failure
        finally:
            for _, fd, _, _, ifd in staged:
                os.close(ifd)
                os.close(fd)  # releases the writer's lock (see cleanup_stale)
        if any(not isinstance(o, BaseException) for o in outcomes):
            self._trigger(b"\n")
        return outcomes

    def _stage(self, pid: int, head: bytes, message: Any, envelope: bytes) -> tuple[int, str, str, int]:
        """Write a message and its intd entry, unsynced; the fds stay open and the message locked."""
        pidname = mess = intd = None
        spare = self._claim_spare(lambda ino: self._split("mess", ino))
        if spare is not None:
            fd, mid = spare
            mess = self._split("mess", mid)
        else:
            fd, pidname = self._create_pid_file(pid)
        try:
            if pidname is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
                mid = os.fstat(fd).st_ino
                os.link(pidname, self._split("mess", mid))
                mess = self._split("mess", mid)
                os.unlink(pidname)
                pidname = None
            _write_message(fd, head, message)
            if spare is not None:
                os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR))  # the spare's old tail goes
            intd = self._flat("intd", mid)
            ispare = self._claim_spare(lambda _ino: intd)  # a stale intd/<mid> is replaced
            if ispare is not None:
                ifd = ispare[0]
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                try:
                    ifd = os.open(intd, flags, 0o640)
                except FileExistsError:
                    os.unlink(intd)  # stale: its inode number is ours now, so its message is gone
                    ifd = os.open(intd, flags, 0o640)
            try:
                _writev_all(ifd, [envelope])
                if ispare is not None:
                    os.ftruncate(ifd, len(envelope))
            except BaseException:
                os.close(ifd)
                raise
            return fd, mess, intd, ifd
        except BaseException:
            for name in (pidname, intd, mess):
                if name is not None:
                    try:
                        os.unlink(name)
                    except OSError:
                        pass
            os.close(fd)
            raise

    def _link_todo(self, intd: str, mid: int) -> None:
        todo = self._flat("todo", mid)
        try:
            os.link(intd, todo)
        except FileExistsError:
            # Our inode is new, so a todo entry with its number belongs to no message.
            os.unlink(todo)
            os.link(intd, todo)

    def _executor(self) -> Any:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self._max_threads, thread_name_prefix="enqueue")
        return self._pool

    def close(self) -> None:
        """Stop the enqueue_async thread pool (waiting for enqueues in progress); close the
        directory descriptors it kept."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        fds, self._dir_fds = self._dir_fds, {}
        for fd in fds.values():
            os.close(fd)

    def _claim_spare(self, dest: Any) -> tuple[int, int] | None:
        """A spare from pool/, flock'd, renamed to ``dest(inode)`` and open for writing at offset
        0: (fd, inode). None when there is none we may take (then the caller creates a file).

        Claiming is safe against other writers: only the holder of the spare's flock renames it,
        and a writer that opened it too late finds the name gone. ``pool/<n>`` always names
        inode n, with no other link, so the rename moves the very file that is locked."""
        spares = self._spares
        while True:
            if not spares:
                now = time.monotonic()
                if now < self._spares_listed:  # the last look found nothing: not again so soon
                    return None
                names = [n for n in _listdir(f"{self._dir}/pool") if n.isdigit()]
                if not names:
                    self._spares_listed = now + _SPARES_RELIST
                    return None
                # writers in other processes list the same names: each starts somewhere else
                from random import randrange  # here: inject's start-up time counts

                k = randrange(len(names))
                spares.extend(names[k:] + names[:k])
            try:
                name = spares.pop()
            except IndexError:  # another thread took the last one
                continue
            path = f"{self._dir}/pool/{name}"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue  # taken meanwhile, or not ours to write
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or str(st.st_ino) != name:
                    raise OSError(errno.EINVAL, "not a spare")
                os.rename(path, dest(st.st_ino))
            except OSError:
                os.close(fd)
                continue
            return fd, st.st_ino

    def _recycle(self, path: str, limit: int) -> bool:
        """Move a finished message's file into pool/ instead of unlinking it; False: unlink it.

        Kept only if it is a plain file of at most ``limit`` bytes with no other name, pool/ has
        room, and pool/'s owner can write it (as root, a file of ours is given to that owner)."""
        owner = self._pool_owner
        if owner is None:
            try:
                st = os.stat(f"{self._dir}/pool")
            except OSError:
                return False  # a queue made before pool/ existed: the manager makes it at start
            owner = self._pool_owner = (st.st_uid, st.st_gid)
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > limit:
            return False
        now = time.monotonic()
        if now - self._pool_counted > _POOL_RECOUNT:
            self._pool_count = len(_listdir(f"{self._dir}/pool"))
            self._pool_counted = now
        if self._pool_count >= POOL_MAX:
            return False
        try:
            if st.st_uid != owner[0]:
                if os.geteuid() != 0:
                    return False
                os.chown(path, owner[0], owner[1], follow_symlinks=False)
            os.rename(path, f"{self._dir}/pool/{st.st_ino}")
        except OSError:
            return False
        self._pool_count += 1
        return True

    def ensure_pool(self) -> None:
        """Give a queue made before pool/ existed its pool/ (owned like pid/); for the manager."""
        pool = f"{self._dir}/pool"
        if os.path.isdir(pool):
            return
        st = os.stat(f"{self._dir}/pid")
        try:
            os.mkdir(pool, 0o700)
        except FileExistsError:
            return
        if os.geteuid() == 0:
            os.chown(pool, st.st_uid, st.st_gid)
        os.chmod(pool, stat.S_IMODE(st.st_mode))
        _fsync_dir(self._dir)

    def _create_pid_file(self, pid: int) -> tuple[int, str]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for _ in range(9):
            name = f"{self._dir}/pid/{pid}.{time.time_ns()}.{next(_seq)}"
            try:
                return os.open(name, flags, 0o640), name
            except FileExistsError:
                continue  # a leftover of an earlier process with our pid
        raise TemporaryFailure(f"{self._dir}/pid: unable to create a unique file")

    def request_retry(self) -> None:
        """Ask the running manager to retry every deferred message now (qmail's SIGALRM): ``F`` on the
        trigger. TemporaryFailure when no manager listens."""
        path = f"{self._dir}/lock/trigger"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TemporaryFailure(f"{path}: pqmail send is not running ({e.strerror})") from None
        try:
            os.write(fd, b"F")
        finally:
            os.close(fd)

    def _trigger(self, byte: bytes) -> None:
        """Wake the manager; nobody listening (ENXIO), a full FIFO or any other error is fine."""
        try:
            fd = os.open(f"{self._dir}/lock/trigger", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.write(fd, byte)
        except OSError:
            pass
        finally:
            os.close(fd)

    # -- preprocessing (the manager)

    def list_todo(self) -> list[int]:
        """Committed messages not yet preprocessed, oldest id first."""
        return sorted(_ids(f"{self._dir}/todo"))

    def read_todo(self, mid: int) -> Envelope:
        path = self._flat("todo", mid)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while chunk := os.read(fd, 65536):  # an envelope is usually one read
                chunks.append(chunk)
        finally:
            os.close(fd)
        return parse_envelope(b"".join(chunks), path)

    def write_info(self, mid: int, sender: str) -> None:
        """``info/N/id`` = ``F<sender>\\0``, fsync'd (its mtime becomes the birth)."""
        _write_synced(self._split("info", mid), b"F" + sender.encode(*_ENC) + b"\0")

    def write_channel(self, mid: int, channel: str, addresses: list[str]) -> None:
        """``local/N/id`` or ``remote/N/id`` with one ``T<addr>\\0`` each, fsync'd."""
        _check_channel(channel)
        data = b"".join(b"T" + a.encode(*_ENC) + b"\0" for a in addresses)
        _write_synced(self._split(channel, mid), data)
        self._dirty.setdefault(mid, set()).add(channel)

    def settle(self, entries: list[tuple[int, str, float, dict[str, list[Record]]]]) -> dict[int, set[int]]:
        """Write and fsync ``info`` and the channel files of preprocessed messages, then drop ``todo``.

        The queue manager preprocesses in memory and relies on ``todo/id`` (already durable) for as
        long as a message is being delivered; most messages are finished and removed before they
        ever need these files. ``entries`` are (id, sender, birth, {channel: records}); a record is
        written ``D`` when it is done. Files are fsync'd one by one (the journal commits concurrent
        fsyncs together), each directory once for the batch, and only then are ``todo``/``intd``
        unlinked. Returns, per id, the offsets written as done. A crash before the end leaves
        ``todo/id``: the message is preprocessed again, as qmail-send does.
        """
        written: dict[int, set[int]] = {}
        dirs: set[str] = set()
        paths: list[str] = []
        for mid, sender, birth, channels in entries:
            n = mid % SPLIT
            info = self._split("info", mid)
            _write_synced(info, b"F" + sender.encode(*_ENC) + b"\0", sync=False)
            os.utime(info, (birth, birth))
            paths.append(info)
            dirs.add(f"{self._dir}/info/{n}")
            done: set[int] = set()
            for channel in CHANNELS:
                records = channels.get(channel)
                path = self._split(channel, mid)
                if not records:
                    _unlink(path)  # left over from an earlier, interrupted pass
                    continue
                parts = []
                for r in records:
                    if r.done:
                        done.add(r.offset)
                    parts.append((b"D" if r.done else b"T") + r.address.encode(*_ENC) + b"\0")
                _write_synced(path, b"".join(parts), sync=False)
                paths.append(path)
                dirs.add(f"{self._dir}/{channel}/{n}")
            written[mid] = done
        for path in paths:
            _fsync_file(path)
        for d in sorted(dirs):
            _fsync_dir(d)
        for mid, *_ in entries:
            _unlink(self._flat("todo", mid))
            _unlink(self._flat("intd", mid))
        return written

    def finish_preprocess(self, mid: int) -> None:
        """Make the new entries durable, then drop ``todo/id`` and ``intd/id``."""
        channels = self._dirty.pop(mid, set(CHANNELS))
        n = mid % SPLIT
        for sub in ("info", *sorted(channels)):
            _fsync_dir(f"{self._dir}/{sub}/{n}")
        # A crash from here on at worst leaves todo/: the manager then preprocesses again.
        _unlink(self._flat("todo", mid))
        _unlink(self._flat("intd", mid))

    # -- delivery state

    def list_leftovers(self) -> set[int]:
        """Ids with a ``bounce`` or ``status`` file: what a message preprocessed before a crash may
        have left for its todo/ entry's next pass (see :meth:`discard_bounce`)."""
        return set(_ids(f"{self._dir}/bounce")) | set(_ids(f"{self._dir}/status"))

    def list_info(self) -> list[int]:
        """Preprocessed messages (those with an ``info`` file)."""
        out: list[int] = []
        for n in range(SPLIT):
            out.extend(_ids(f"{self._dir}/info/{n}"))
        return sorted(out)

    def read_info(self, mid: int) -> str:
        path = self._split("info", mid)
        with open(path, "rb") as f:
            data = f.read()
        if not data.startswith(b"F") or not data.endswith(b"\0"):
            raise TemporaryFailure(f"{path}: malformed info file")
        return data[1:-1].decode(*_ENC)

    def birth(self, mid: int) -> float:
        return os.stat(self._split("info", mid)).st_mtime

    def message_size(self, mid: int) -> int:
        return os.stat(self._split("mess", mid)).st_size

    def read_channel(self, mid: int, channel: str) -> list[Record]:
        _check_channel(channel)
        try:
            with open(self._split(channel, mid), "rb") as f:
                return parse_channel(f.read())
        except FileNotFoundError:
            return []

    def channel_mtime(self, mid: int, channel: str) -> float | None:
        _check_channel(channel)
        try:
            return os.stat(self._split(channel, mid)).st_mtime
        except FileNotFoundError:
            return None

    def set_channel_mtime(self, mid: int, channel: str, when: float) -> None:
        _check_channel(channel)
        try:
            os.utime(self._split(channel, mid), (when, when))
        except FileNotFoundError:
            pass

    def mark_done(self, mid: int, channel: str, offset: int) -> None:
        """Overwrite the record's ``T`` with ``D`` in place and fsync (qmail-send's markdone)."""
        _check_channel(channel)
        fd = os.open(self._split(channel, mid), os.O_WRONLY | os.O_CLOEXEC)
        try:
            if os.pwrite(fd, b"D", offset) != 1:
                raise TemporaryFailure(f"{self._split(channel, mid)}: short write")
            os.fsync(fd)
        finally:
            os.close(fd)

    def append_bounce(self, mid: int, data: bytes) -> None:
        """Append permanent-failure paragraphs to ``bounce/id``, durably."""
        _write_synced(self._flat("bounce", mid), data, os.O_APPEND)
        _fsync_dir(f"{self._dir}/bounce")

    def write_status(self, mid: int, entries: list[tuple[str, float, str]]) -> None:
        """Record (address, next attempt, last report) of waiting recipients, for ``pqmail queue``.

        Informational only (not fsync'd; qmail keeps no such file): lost in a crash, rewritten at
        the next attempt.
        """
        data = "".join(f"{a}\t{when:.0f}\t{text}\n" for a, when, text in entries
                       if "\n" not in a and "\t" not in a)
        path = self._flat("status", mid)
        try:
            _write_synced(path, data.encode(*_ENC), sync=False)
        except FileNotFoundError:  # a queue made before status/ existed
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            _write_synced(path, data.encode(*_ENC), sync=False)

    def read_status(self, mid: int) -> dict[str, tuple[float, str]]:
        try:
            with open(self._flat("status", mid), "rb") as f:
                data = f.read().decode(*_ENC)
        except FileNotFoundError:
            return {}
        out: dict[str, tuple[float, str]] = {}
        for line in data.splitlines():
            a, _, rest = line.partition("\t")
            when, _, text = rest.partition("\t")
            if when.isdigit():
                out[a] = (float(when), text)
        return out

    def discard_bounce(self, mid: int) -> None:
        _unlink(self._flat("bounce", mid))

    def discard_status(self, mid: int) -> None:
        _unlink(self._flat("status", mid))

    def has_bounce(self, mid: int) -> bool:
        return _exists(self._flat("bounce", mid))

    def read_bounce(self, mid: int) -> bytes:
        try:
            with open(self._flat("bounce", mid), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def remove_message(self, mid: int, files: set[str] | None = None) -> None:
        """Drop every file of a finished message; the message file goes last.

        ``files`` names the subdirectories known to hold one (the manager keeps track), so that
        the others are not looked at; None means any of them may.
        A crash part-way leaves either a message with nothing left to do (finished again, with no
        second bounce since bounce/ went first) or a stray mess file (removed by cleanup_stale).
        """
        for sub in _REMOVE_ORDER:
            if files is None or sub in files:
                path = self._flat(sub, mid) if sub in _FLAT else self._split(sub, mid)
                limit = _RECYCLED.get(sub)
                if limit is None or not self._recycle(path, limit):
                    _unlink(path)
        self._dirty.pop(mid, None)

    # -- crash clean-up

    def cleanup_stale(self) -> int:
        """Remove what a writer that died before its commit left behind; return how many files.

        Removed: ``mess`` files with neither ``todo`` nor ``info`` (with their ``intd``), ``intd``
        files with neither ``todo`` nor ``mess``, and ``pid/`` leftovers. None of these was ever
        committed, so none is ever delivered.

        Why this is safe while other processes inject (qmail waits 36 hours instead): every
        writer holds an flock on its message file from before the file gets its ``mess`` name
        until after the todo link, and the lock dies with the process. A ``mess`` file is removed
        only if its lock can be taken *and*, with the lock held, there is still no ``todo`` or
        ``info`` entry; a live writer, however slowly its input arrives, keeps its file. A
        ``pid/`` name exists unlocked for a moment between its creation and the flock, so pid
        files are removed only when unlocked and older than STALE_PID_AGE seconds.
        """
        removed = 0
        d = self._dir
        now = time.time()
        for name in _listdir(f"{d}/pid"):
            path = f"{d}/pid/{name}"
            try:
                if now - os.lstat(path).st_mtime < STALE_PID_AGE:
                    continue
            except FileNotFoundError:
                continue
            if _remove_if_unlocked(path, lambda: False):
                removed += 1

        todo = set(_listdir(f"{d}/todo"))
        info: set[str] = set()
        for n in range(SPLIT):
            info.update(_listdir(f"{d}/info/{n}"))
        for n in range(SPLIT):
            for name in _listdir(f"{d}/mess/{n}"):
                if name in todo or name in info:
                    continue
                todo_p, info_p = f"{d}/todo/{name}", f"{d}/info/{n}/{name}"

                def committed(todo_p: str = todo_p, info_p: str = info_p) -> bool:
                    return _exists(todo_p) or _exists(info_p)

                if _remove_if_unlocked(f"{d}/mess/{n}/{name}", committed):
                    removed += 1 + int(_unlink(f"{d}/intd/{name}"))

        for name in _listdir(f"{d}/intd"):
            if not name.isdigit() or name in todo:
                continue
            mid = int(name)
            if not _exists(f"{d}/todo/{name}") and not _exists(self._split("mess", mid)):
                removed += int(_unlink(f"{d}/intd/{name}"))
        return removed

    # -- queue tools

    def counts(self) -> tuple[int, int]:
        """(messages in queue, not yet preprocessed), as qmail-qstat counts them."""
        total = sum(len(_listdir(f"{self._dir}/mess/{n}")) for n in range(SPLIT))
        return total, len(_listdir(f"{self._dir}/todo"))

    def iter_messages(self) -> Iterator[QueuedMessage]:
        """Every committed message, oldest first; messages being written are not shown."""
        todo = set(self.list_todo())
        msgs = []
        for mid in sorted(todo | set(self.list_info())):
            try:
                msgs.append(self._describe(mid, mid in todo))
            except (FileNotFoundError, TemporaryFailure):
                continue  # finished or being rewritten meanwhile
        msgs.sort(key=lambda m: (m.birth, m.id))
        return iter(msgs)

    def _describe(self, mid: int, in_todo: bool) -> QueuedMessage:
        size = self.message_size(mid)
        bouncing = _exists(self._flat("bounce", mid))
        if in_todo:
            env = self.read_todo(mid)
            birth = os.stat(self._flat("todo", mid)).st_mtime
            rcpts = [QueuedRecipient("todo", a, False, None) for a in env.recipients]
            return QueuedMessage(mid, birth, size, env.sender, bouncing, rcpts)
        sender = self.read_info(mid)
        birth = self.birth(mid)
        rcpts = []
        status = self.read_status(mid)
        for ch in CHANNELS:
            when = self.channel_mtime(mid, ch)
            for r in self.read_channel(mid, ch):
                if r.done:
                    rcpts.append(QueuedRecipient(ch, r.address, True, None))
                    continue
                nxt, last = status.get(r.address, (when, None))
                rcpts.append(QueuedRecipient(ch, r.address, False, nxt, last))
        return QueuedMessage(mid, birth, size, sender, bouncing, rcpts)


# bounce first (no second bounce after a crash), the message file last (see remove_message)
_REMOVE_ORDER = ("bounce", "status", "todo", "intd", "local", "remote", "info", "mess")
_FLAT = frozenset({"bounce", "status", "todo", "intd"})
_RECYCLED = {"intd": POOL_FILE_MAX, "mess": POOL_FILE_MAX}  # files kept in pool/, and up to what size


def _check_channel(channel: str) -> None:
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}")


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _remove_if_unlocked(path: str, committed: Any) -> bool:
    """Unlink ``path`` if nobody holds its flock and ``committed()`` is still false under the lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a writer is alive
        if committed():
            return False
        return _unlink(path)
    finally:
        os.close(fd)


__all__ = [
    "CHANNELS",
    "MAX_ADDRESS",
    "SPLIT",
    "Envelope",
    "Queue",
    "QueuedMessage",
    "QueuedRecipient",
    "Record",
    "encode_address",
    "make_queue",
    "pack_envelope",
    "parse_channel",
    "parse_envelope",
    "received_line",
]
