"""serialmail's maildirsmtp: push one dial-up customer's Maildir to the customer's host over SMTP.

A dial-up customer's directory DIR (made by ``pqmail dialup add``) holds ``RELAYHOST`` (``host[:port]``)
and ``Maildir/``, where qmail-local puts every message for the customer's domain, each file beginning
with ``Return-Path: <sender>`` and ``Delivered-To: <prefix><recipient>`` (qmail-semantics.md §3.9, §7).
:func:`flush` is ``setlock -nx DIR/RELAYHOST maildirsmtp DIR prefix host helohost`` (§7.1-7.4):

* one transfer per customer: an exclusive, non-blocking flock on DIR/RELAYHOST; when another transfer
  holds it, we say so and return at once;
* nothing to send in new/ or cur/: no connection at all;
* otherwise one SMTP session (greeting 220; EHLO, else HELO; PIPELINING when offered) with one
  transaction per message: MAIL FROM the Return-Path, RCPT TO the Delivered-To address minus the prefix
  (default ``<dir name>-``), DATA the rest of the file (LF -> CRLF, dot-stuffed);
* 2xx after the data: the file is unlinked and its directory fsync'd (a crash before that sends it again;
  nothing is lost); 5xx: a QSBMF bounce "from the maildirbounce program" is queued, then the file goes;
  4xx: the file stays and this run stops, unless the file is older than the lifetime (counted from its
  mtime), when it is bounced too; a failed connection or a broken session leaves every file where it is
  and ages nothing out (§7.1);
* files whose first two lines do not fit are skipped and logged; tmp/ files older than 36 h are removed;
* after the batch the Maildir is scanned again, so mail that arrived meanwhile goes in the same session;
* the outcome is written to DIR/LASTTRANSFER (one line) for ``pqmail dialup list``.

The session code is shared with ODMR (:func:`transfer`): there the customer connected to us, and after
``ATRN`` we are the SMTP client on that same connection.

What it trusts: the files in DIR (written by qmail-local and provisioning) and the control files. Not
the customer's server: reply lines are bounded in length and number, every read and write has
serialsmtp's timeouts (81 s, 73 s), and reply text is logged with non-printable characters as ``?``.
What it never does: remove a file before the customer's 2xx to its data (or before its bounce is safely
queued), age a message out while the host is unreachable, or run two transfers for one customer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread  # noqa: F401  (see below)
import contextlib
import encodings.idna  # noqa: F401
import fcntl
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from pqmail.config.control import read_value
from pqmail.config.smtproutes import Route, parse_relay
from pqmail.errors import ConfigError, PqmailError
from pqmail.fsutil import atomic_write, fsync_dir
from pqmail.maildir import MaildirMessage, scan
from pqmail.queue.bounce import TOO_LONG, bounce_target, compose, paragraph

if TYPE_CHECKING:
    from pqmail.config.control import Control
    from pqmail.queue.store import Queue

__all__ = [
    "DEFAULT_LIFETIME",
    "DataEncoder",
    "DialupStatus",
    "DirLock",
    "FlushResult",
    "Head",
    "Job",
    "LastTransfer",
    "SessionError",
    "SmtpIO",
    "dialup_status",
    "flush",
    "flush_async",
    "parse_head",
    "read_last_transfer",
    "record_last_transfer",
    "transfer",
]

# concurrent.futures.thread (asyncio.to_thread) and encodings.idna (getaddrinfo of a str host) are
# imported above, not on first use: a service has dropped privileges by then and may be unable to
# read the interpreter's files (pqmail.supervisor explains why services fork without exec).

Log = Callable[[str], None]

DEFAULT_LIFETIME = 604800  # control/serialmaillifetime: 7 days
READ_TIMEOUT = 81.0  # serialsmtp.c
WRITE_TIMEOUT = 73.0
QUIT_TIMEOUT = 10.0
TMP_MAX_AGE = 36 * 3600  # maildir(5): readers may remove tmp files untouched this long
HEAD_MAX = 4096  # both head lines must fit here (an address is at most 1002 bytes)
REPLY_LINE_MAX = 4096
REPLY_LINES_MAX = 100
SAID_MAX = 2000  # serialsmtp cuts the reply it reports at 2000 bytes
CHUNK = 1 << 16
MAX_ROUNDS = 20  # rescans per session, so that a steady trickle of new mail cannot hold it forever
LASTTRANSFER = "LASTTRANSFER"


def _log(line: str) -> None:
    sys.stderr.write(f"serialmail: {line}\n")
    sys.stderr.flush()


# ----------------------------------------------------------------------------- pure helpers

@dataclass(frozen=True)
class Head:
    """The envelope recovered from a Maildir file's first two lines, and where the message starts."""

    sender: str
    recipient: str
    offset: int


_RETURN_PATH = b"Return-Path: <"
_DELIVERED_TO = b"Delivered-To: "


def _unusable(addr: bytes) -> bool:
    # An address with a space, a control character or angle brackets would break the SMTP command.
    return any(c <= 32 or c == 127 or c in b"<>" for c in addr)


def parse_head(data: bytes, prefix: str) -> Head | None:
    """serialsmtp's check: line 1 ``Return-Path: <sender>``, line 2 ``Delivered-To: <prefix><rcpt>``.

    Returns None when the file does not fit (serialsmtp skips such files). The prefix is compared
    ignoring ASCII case, as qmail's virtualdomains lookup is.
    """
    first, nl1, rest = data.partition(b"\n")
    second, nl2, _ = rest.partition(b"\n")
    if not (nl1 and nl2 and first.startswith(_RETURN_PATH) and first.endswith(b">")
            and second.startswith(_DELIVERED_TO)):
        return None
    sender = first[len(_RETURN_PATH):-1]
    rcpt = second[len(_DELIVERED_TO):]
    p = prefix.encode("utf-8", "surrogateescape")
    if rcpt[:len(p)].lower() != p.lower():
        return None
    rcpt = rcpt[len(p):]
    if not rcpt or _unusable(rcpt) or _unusable(sender):
        return None
    dec = ("utf-8", "surrogateescape")
    return Head(sender.decode(*dec), rcpt.decode(*dec), len(first) + len(second) + 2)


class DataEncoder:
    """SMTP DATA encoding fed in chunks: LF -> CRLF, a leading ``.`` doubled, then ``.`` CRLF.

    A last line without LF is ended with CRLF (serialsmtp gives up on such a file; sending it whole is
    kinder and loses nothing).
    """

    def __init__(self) -> None:
        self._bol = True  # the next byte starts a line

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        out = chunk.replace(b"\n", b"\r\n").replace(b"\n.", b"\n..")
        if self._bol and out.startswith(b"."):
            out = b"." + out
        self._bol = chunk.endswith(b"\n")
        return out

    def finish(self) -> bytes:
        return b".\r\n" if self._bol else b"\r\n.\r\n"


def printable(text: str, limit: int = SAID_MAX) -> str:
    """serialsmtp's report text: non-printable characters become ``?``, at most ``limit`` characters."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])


def letter(code: int) -> str:
    """qmail's result letter for a final reply: K delivered, D permanent (5xx), Z anything else."""
    if 200 <= code < 300:
        return "K"
    return "D" if 500 <= code < 600 else "Z"


# ----------------------------------------------------------------------------- results and status

@dataclass
class FlushResult:
    """What one transfer did. ``status``: busy, empty, ok, deferred (a 4xx stopped it), failed, or
    interrupted (the service stopped midway)."""

    dir: Path
    status: str = "empty"
    delivered: int = 0
    bounced: int = 0
    deferred: int = 0
    skipped: int = 0
    left: int = 0
    detail: str = ""

    def counts(self) -> str:
        text = (f"delivered {self.delivered}, bounced {self.bounced}, deferred {self.deferred}, "
                f"skipped {self.skipped}, left {self.left}")
        return f"{text}; {self.detail}" if self.detail else text

    def summary(self) -> str:
        return f"{self.status}: {self.counts()}"


@dataclass(frozen=True)
class LastTransfer:
    """DIR/LASTTRANSFER: ``<unix time> <status> <summary>`` on one line."""

    when: float
    status: str
    text: str


def record_last_transfer(result: FlushResult, when: float | None = None) -> None:
    """Write DIR/LASTTRANSFER atomically, owned like DIR (so root's runs leave it to the mail user)."""
    stamp = int(time.time() if when is None else when)
    line = printable(f"{stamp} {result.status} {result.counts()}", 4000) + "\n"
    path = result.dir / LASTTRANSFER
    try:
        st = os.stat(result.dir)
        ids = (st.st_uid, st.st_gid) if os.geteuid() == 0 else (None, None)
        atomic_write(path, line.encode("ascii"), mode=0o644, uid=ids[0], gid=ids[1])
    except OSError:
        pass  # a status line is not worth failing a transfer for; the log has the outcome


def read_last_transfer(dir: str | os.PathLike[str]) -> LastTransfer | None:
    """The last recorded transfer of a dial-up directory, or None (never flushed, or unreadable)."""
    try:
        line = read_value(Path(dir) / LASTTRANSFER)
    except (ConfigError, OSError):
        return None
    if not line:
        return None
    stamp, _, rest = line.partition(" ")
    status, _, text = rest.partition(" ")
    if not stamp.isdigit() or not status:
        return None
    return LastTransfer(float(stamp), status, text)


@dataclass(frozen=True)
class DialupStatus:
    """For ``pqmail dialup list``: messages waiting, age of the oldest (s), the last transfer."""

    waiting: int
    oldest_age: float | None
    last: LastTransfer | None


def dialup_status(dir: str | os.PathLike[str], now: float | None = None) -> DialupStatus:
    d = Path(dir)
    try:
        msgs = scan(d / "Maildir")
    except OSError:
        msgs = []
    now = time.time() if now is None else now
    oldest = max(0.0, now - msgs[0].mtime) if msgs else None
    return DialupStatus(len(msgs), oldest, read_last_transfer(d))


# ----------------------------------------------------------------------------- the per-customer lock

class DirLock:
    """The exclusive flock on DIR/RELAYHOST that makes one transfer per customer (setlock -n)."""

    def __init__(self, dir: Path, fd: int) -> None:
        self.dir = dir
        self._fd = fd

    @classmethod
    def try_lock(cls, dir: str | os.PathLike[str]) -> DirLock | None:
        """The lock, or None when another transfer holds it. ConfigError if RELAYHOST cannot be opened."""
        d = Path(dir)
        path = d / "RELAYHOST"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConfigError(str(path), "missing; not a dial-up directory (see pqmail dialup add)") from None
        except OSError as e:
            raise ConfigError(str(path), f"unable to open: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as e:
            os.close(fd)
            raise ConfigError(str(path), f"unable to lock: {e.strerror or e}") from None
        return cls(d, fd)

    def route(self) -> Route:
        """The customer's host and port from the first line of RELAYHOST."""
        path = self.dir / "RELAYHOST"
        os.lseek(self._fd, 0, os.SEEK_SET)
        first = os.read(self._fd, 1024).split(b"\n", 1)[0].rstrip(b" \t\r").decode("latin-1")
        route = parse_relay(first, path, 1)
        if route is None:
            raise ConfigError(str(path), "empty; it names the customer's host (host[:port])", 1)
        return route

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = -1

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ----------------------------------------------------------------------------- the Maildir side

@dataclass
class Job:
    """One customer directory in a session; the caller holds its lock."""

    dir: Path
    prefix: str
    lifetime: int = DEFAULT_LIFETIME
    result: FlushResult = field(init=False)
    tried: set[str] = field(default_factory=set)  # unique names already handled in this run
    pending: list[tuple[MaildirMessage, Head]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.result = FlushResult(self.dir)

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def maildir(self) -> Path:
        return self.dir / "Maildir"

    @classmethod
    def for_dir(cls, dir: str | os.PathLike[str], prefix: str | None = None,
                lifetime: int = DEFAULT_LIFETIME) -> Job:
        d = Path(dir)
        return cls(d, f"{d.name}-" if prefix is None else prefix, lifetime)

    def prepare(self, log: Log) -> int:
        """Scan for messages not yet handled in this run; fill ``pending``; return how many."""
        self.pending = []
        for m in scan(self.maildir):
            if m.uniq in self.tried:
                continue
            self.tried.add(m.uniq)
            try:
                head = _read_head(m, self.prefix)
            except OSError as e:
                self.result.skipped += 1
                log(f"{self.name}: skipped {_rel(m)}: unable to read it: {e.strerror or e}")
                continue
            if head is None:
                if m.path.exists():
                    self.result.skipped += 1
                    log(f"{self.name}: skipped {_rel(m)}: its first two lines are not "
                        f"'Return-Path: <...>' and 'Delivered-To: {self.prefix}...'")
                continue
            self.pending.append((m, head))
        return len(self.pending)


def _rel(m: MaildirMessage) -> str:
    return f"{'new' if m.in_new else 'cur'}/{m.name}"


def _read_head(m: MaildirMessage, prefix: str) -> Head | None:
    """The envelope from the first two lines; None when they do not fit or the file is gone.

    Raises OSError when the file exists but cannot be read (permissions, I/O).
    """
    try:
        with open(m.path, "rb") as f:
            return parse_head(f.read(HEAD_MAX), prefix)
    except FileNotFoundError:
        return None  # gone meanwhile (a POP reader took it)


def clean_tmp(maildir: Path, now: float | None = None) -> None:
    """Remove tmp/ files older than 36 hours, as maildirserial's scanner does."""
    limit = (time.time() if now is None else now) - TMP_MAX_AGE
    try:
        with os.scandir(maildir / "tmp") as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_atime < limit:
                        os.unlink(entry.path)
    except OSError:
        pass


def _remove(m: MaildirMessage) -> None:
    """Unlink a delivered (or bounced) file and fsync its directory; follow a new/ -> cur/ move."""
    path = m.path
    try:
        os.unlink(path)
    except FileNotFoundError:
        path = _find_in_cur(m)
        if path is None:
            return  # already gone
        os.unlink(path)
    fsync_dir(path.parent)


def _find_in_cur(m: MaildirMessage) -> Path | None:
    cur = m.path.parent.parent / "cur"
    try:
        names = os.listdir(cur)
    except OSError:
        return None
    for name in names:
        if name.split(":", 1)[0] == m.uniq:
            return cur / name
    return None


# ----------------------------------------------------------------------------- the SMTP client side

class SessionError(Exception):
    """The session with the customer's server broke (network, timeout, protocol); nothing is decided."""


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def last(self) -> str:
        return self.lines[-1]


class SmtpIO:
    """Reads replies and writes commands on a connected stream pair, with serialsmtp's timeouts."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.dead = False  # the server said 421 or the connection broke: no QUIT

    async def _readline(self) -> bytes:
        try:
            async with asyncio.timeout(READ_TIMEOUT):  # no task per read, unlike wait_for
                raw = await self.reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            self.dead = True
            raise SessionError(f"{self.peer} closed the connection") from None
        except asyncio.LimitOverrunError:
            self.dead = True
            raise SessionError(f"{self.peer} sent an overlong reply line") from None
        except TimeoutError:
            self.dead = True
            raise SessionError(f"timeout reading from {self.peer}") from None
        except OSError as e:
            self.dead = True
            raise SessionError(f"reading from {self.peer}: {e.strerror or e}") from None
        if len(raw) > REPLY_LINE_MAX:
            self.dead = True
            raise SessionError(f"{self.peer} sent an overlong reply line")
        return raw.rstrip(b"\r\n")

    async def reply(self) -> Reply:
        lines: list[str] = []
        while True:
            raw = await self._readline()
            if len(raw) < 3 or not raw[:3].isdigit() or raw[3:4] not in (b"", b" ", b"-"):
                self.dead = True
                raise SessionError(f"{self.peer} sent a malformed reply: {printable(raw.decode('latin-1'))}")
            lines.append(raw.decode("latin-1"))
            if raw[3:4] != b"-":
                break
            if len(lines) >= REPLY_LINES_MAX:
                self.dead = True
                raise SessionError(f"{self.peer} sent a reply of more than {REPLY_LINES_MAX} lines")
        code = int(lines[-1][:3])
        if code == 421:
            self.dead = True  # the server is closing the connection
        return Reply(code, tuple(lines))

    async def write(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            async with asyncio.timeout(WRITE_TIMEOUT):
                await self.writer.drain()
        except TimeoutError:
            self.dead = True
            raise SessionError(f"timeout writing to {self.peer}") from None
        except OSError as e:
            self.dead = True
            raise SessionError(f"writing to {self.peer}: {e.strerror or e}") from None

    async def command(self, line: str) -> Reply:
        await self.write(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return await self.reply()

    def said(self, reply: Reply) -> str:
        return printable(f"{self.peer} said: {reply.last}")


class _Session:
    """serialsmtp on one connection: greeting, EHLO/HELO, then one transaction per message."""

    def __init__(self, io: SmtpIO, helohost: str) -> None:
        self.io = io
        self.helohost = helohost
        self.pipelining = False
        self.used = False  # a transaction was started: RSET before the next

    async def open(self) -> None:
        greeting = await self.io.reply()
        if greeting.code != 220:
            raise SessionError(f"greeting failed: {self.io.said(greeting)}")
        ehlo = await self.io.command(f"EHLO {self.helohost}")
        if ehlo.code == 250:
            self.pipelining = any(line[4:].strip().upper().split(" ")[0] == "PIPELINING"
                                  for line in ehlo.lines[1:])
            return
        helo = await self.io.command(f"HELO {self.helohost}")
        if helo.code != 250:
            raise SessionError(f"HELO refused: {self.io.said(helo)}")

    async def send(self, head: Head, body: IO[bytes]) -> Reply:
        """One transaction; the reply that decides the message (its letter comes from the code)."""
        enc = ("utf-8", "surrogateescape")
        cmds = [b"RSET\r\n"] if self.used else []
        cmds += [b"MAIL FROM:<" + head.sender.encode(*enc) + b">\r\n",
                 b"RCPT TO:<" + head.recipient.encode(*enc) + b">\r\n", b"DATA\r\n"]
        self.used = True
        replies = await self._exchange(cmds)
        for cmd, rep in zip(cmds[:-1], replies, strict=False):
            if not 200 <= rep.code < 300:
                if cmd == b"RSET\r\n":
                    raise SessionError(f"RSET refused: {self.io.said(rep)}")
                if len(replies) == len(cmds) and replies[-1].code == 354:
                    await self.io.write(b".\r\n")  # a server that took DATA anyway gets an empty one
                    await self.io.reply()
                return rep
        data_reply = replies[-1]
        if data_reply.code != 354:
            if data_reply.code < 400:
                raise SessionError(f"unexpected reply to DATA: {self.io.said(data_reply)}")
            return data_reply
        encoder = DataEncoder()
        pending = encoder.feed(body.read(CHUNK))
        while chunk := body.read(CHUNK):
            await self.io.write(pending)
            pending = encoder.feed(chunk)
        await self.io.write(pending + encoder.finish())  # a small message goes in one write
        return await self.io.reply()

    async def _exchange(self, cmds: list[bytes]) -> list[Reply]:
        if self.pipelining:
            await self.io.write(b"".join(cmds))
            return [await self.io.reply() for _ in cmds]
        replies = []
        for cmd in cmds:
            await self.io.write(cmd)
            rep = await self.io.reply()
            replies.append(rep)
            if cmd != b"DATA\r\n" and not 200 <= rep.code < 300:
                break
        return replies

    async def quit(self) -> None:
        if self.io.dead:
            return
        with contextlib.suppress(SessionError, OSError, TimeoutError):
            self.io.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.io.reply(), QUIT_TIMEOUT)


@dataclass
class _Context:
    control: Control
    queue: Queue | None
    log: Log


async def transfer(io: SmtpIO, jobs: list[Job], *, control: Control, queue: Queue | None,
                   log: Log = _log) -> None:
    """Deliver every job's messages over a connected stream (we speak first after its greeting).

    The jobs must be locked and prepared (:meth:`Job.prepare`); their ``result`` says what happened.
    Shared by :func:`flush` (we connected) and ODMR (the customer connected; roles turned by ATRN).
    """
    ctx = _Context(control, queue, log)
    session = _Session(io, control.helohost)
    try:
        await session.open()
    except SessionError as e:
        for job in jobs:
            _failed(job, str(e), log)
        return
    for n, job in enumerate(jobs):
        if not await _deliver_job(session, job, ctx):
            for later in jobs[n + 1:]:
                later.result.status = "deferred"
                later.result.detail = f"not reached: {job.name}'s transfer stopped first"
            break
    await session.quit()


def _failed(job: Job, why: str, log: Log) -> None:
    job.result.status = "failed"
    job.result.detail = printable(why)
    log(f"{job.name}: transfer failed, every message stays: {job.result.detail}")


async def _deliver_job(session: _Session, job: Job, ctx: _Context) -> bool:
    """Send a job's messages, rescanning for new arrivals; False when the session must stop."""
    job.result.status = "ok"
    for _ in range(MAX_ROUNDS):
        for m, head in job.pending:
            try:
                go_on = await _deliver_one(session, job, m, head, ctx)
            except SessionError as e:
                _failed(job, str(e), ctx.log)
                return False
            if not go_on:
                return False
        if session.io.dead or not await asyncio.to_thread(job.prepare, ctx.log):
            break
    return not session.io.dead


async def _deliver_one(session: _Session, job: Job, m: MaildirMessage, head: Head, ctx: _Context) -> bool:
    """One message and what follows from the reply; False when this run must stop (a 4xx)."""
    try:
        with open(m.path, "rb") as f:
            f.seek(head.offset)
            reply = await session.send(head, f)
    except FileNotFoundError:
        return True  # a POP reader took it meanwhile
    said = session.io.said(reply)
    who = f"{_rel(m)} to <{head.recipient}> from <{head.sender}>"
    kind = letter(reply.code)
    if kind == "K":
        await _settle(job, m, ctx, f"{job.name}: delivered {who}: {said}")
        job.result.delivered += 1
        return True
    if kind == "Z" and time.time() - m.mtime <= job.lifetime:
        job.result.deferred += 1
        job.result.status = "deferred"
        job.result.detail = said
        ctx.log(f"{job.name}: deferred {who}: {said}; the rest waits for the next run")
        return False
    text = said if kind == "D" else f"{said}\n{TOO_LONG}"
    if await _bounce(job, m, head, text, ctx):
        await _settle(job, m, ctx, f"{job.name}: bounced {who}: {printable(text.replace(chr(10), ' '))}")
        job.result.bounced += 1
    return not session.io.dead


async def _settle(job: Job, m: MaildirMessage, ctx: _Context, line: str) -> None:
    """Remove a file whose fate is decided, then log; a failed unlink means it is sent again."""
    try:
        await asyncio.to_thread(_remove, m)
    except OSError as e:
        ctx.log(f"{line}; warning: unable to remove it ({e.strerror or e}): it will be delivered twice")
        return
    ctx.log(line)


async def _bounce(job: Job, m: MaildirMessage, head: Head, text: str, ctx: _Context) -> bool:
    """maildirbounce: queue a QSBMF bounce to the file's Return-Path; True once it is safe (or moot)."""
    c = ctx.control
    target = bounce_target(head.sender, c.doublebounceto, c.doublebouncehost)
    if target.recipient is None:
        ctx.log(f"{job.name}: triple bounce: discarding {_rel(m)}")
        return True
    if ctx.queue is None:
        ctx.log(f"{job.name}: unable to bounce {_rel(m)}: no queue; keeping it")
        return False
    try:
        data = await asyncio.to_thread(m.path.read_bytes)
        original = data[data.index(b"\n") + 1:]  # from Delivered-To on; compose adds Return-Path
        message = compose(target=target, original_sender=head.sender,
                          paragraphs=paragraph(head.recipient, text), message=original,
                          bouncefrom=c.bouncefrom, bouncehost=c.bouncehost, program="maildirbounce")
        await asyncio.to_thread(ctx.queue.enqueue, target.sender, [target.recipient], message,
                                "for bounce")
    except (PqmailError, OSError, ValueError) as e:
        ctx.log(f"{job.name}: unable to queue the bounce of {_rel(m)} ({e}); keeping it")
        return False
    return True


# ----------------------------------------------------------------------------- flush

async def flush_async(dir: str | os.PathLike[str], *, prefix: str | None = None,
                      lifetime: int = DEFAULT_LIFETIME, control: Control, queue: Queue | None,
                      log: Log = _log) -> FlushResult:
    """maildirsmtp under setlock -n: see the module docstring. ConfigError for a bad RELAYHOST."""
    job = Job.for_dir(dir, prefix, lifetime)
    lock = DirLock.try_lock(job.dir)
    if lock is None:
        log(f"{job.name}: transfer already in progress")
        job.result.status = "busy"
        return job.result
    with lock:
        route = lock.route()
        await asyncio.to_thread(clean_tmp, job.maildir)
        if not await asyncio.to_thread(job.prepare, log):
            job.result.left = job.result.skipped
            return job.result
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(route.host, route.port, limit=REPLY_LINE_MAX * 2),
                max(1, control.timeoutconnect))
        except (OSError, TimeoutError) as e:
            why = getattr(e, "strerror", None) or str(e) or "timed out"
            _failed(job, f"unable to connect to {route}: {why}", log)
        else:
            peer = (writer.get_extra_info("peername") or (route.host,))[0]
            try:
                await transfer(SmtpIO(reader, writer, peer), [job], control=control, queue=queue, log=log)
            except asyncio.CancelledError:
                finish_interrupted(job, log)
                raise
            finally:
                writer.close()
                with contextlib.suppress(OSError, TimeoutError):
                    await asyncio.wait_for(writer.wait_closed(), QUIT_TIMEOUT)
        await asyncio.to_thread(finish, job, log)  # fsyncs off the loop: other flushes go on meanwhile
    return job.result


def finish_interrupted(job: Job, log: Log) -> None:
    """:func:`finish` for a transfer cancelled midway (the service is stopping): what was delivered
    is gone from the Maildir already; the rest waits for the next transfer. Runs in the loop's thread,
    which is going away."""
    if job.result.status != "failed":
        job.result.status = "interrupted"
        job.result.detail = "the server stopped during the transfer; the rest waits for the next one"
    finish(job, log)


def finish(job: Job, log: Log) -> None:
    """Count what is left, log the outcome and record it in DIR/LASTTRANSFER (lock still held)."""
    try:
        job.result.left = len(scan(job.maildir))
    except OSError:
        pass
    log(f"{job.name}: {job.result.summary()}")
    record_last_transfer(job.result)


def flush(dir: str | os.PathLike[str], *, prefix: str | None = None, lifetime: int = DEFAULT_LIFETIME,
          control: Control, queue: Queue | None, log: Log = _log) -> FlushResult:
    """:func:`flush_async` in an event loop of its own (for the CLI and for threads)."""
    return asyncio.run(flush_async(dir, prefix=prefix, lifetime=lifetime, control=control, queue=queue,
                                   log=log))
