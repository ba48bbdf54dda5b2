"""``pqmail pop3d``: the POP3 service, asyncio around the sans-IO core (pqmail.pop3.protocol).

What it does: accepts POP3 (port 110, with STLS when ``control/servercert.pem`` exists) and POP3S
(port 995, implicit TLS) on sockets the caller bound, runs one :class:`~pqmail.pop3.protocol.POP3Connection`
per client, checks logins with :class:`~pqmail.pop3.auth.Authenticator` and serves the box with
:class:`~pqmail.pop3.mailbox.Mailbox`. What is quicker than a hand-off to a thread and back runs on
the event loop: a crypt(3) hash (2 ms at SHA512-CRYPT's 5,000 rounds; it holds the GIL, so a thread
would only add the hand-off), opening a small box, reading a small message. What may take long goes to
threads, one hop each: argon2 and bcrypt hashes and checkpassword (login threads, which they share
with the loop by releasing the GIL), big boxes, big messages and QUIT's unlinks and fsync (disk
threads). Run one such process per core on the same sockets (``pqmail pop3d --workers``): hashing then
uses every core.
One log line per login, logout and failed login. SIGTERM stops accepting and lets sessions finish for
a grace period; SIGHUP re-reads the control files below and the certificate.

Settings (control files, one value each; qmail-style leading-digit numbers):

=========================  =======  ===================================================================
file                       default  meaning
=========================  =======  ===================================================================
``timeoutpop3d``           600      idle seconds before autologout (RFC 1939: at least 10 minutes)
``concurrencypop3``        500      sessions at once, counting every pop3d process of the host
``concurrencypop3perip``   50       sessions at once from one client address
``pop3faildelay``          1        seconds before the reply to a failed login
``pop3authfailures``       10       failed logins from one address in 5 minutes before it is refused
``pop3authcache``          300      seconds a verified password is remembered (as an HMAC); 0 = never
``pop3tlsonly``            0        1: no USER/PASS/AUTH before STLS (port 110)
``pop3apop``               0        1: offer APOP (only boxes with a ``{PLAIN}`` secret can use it)
``pop3checkpassword``      -        a checkpassword program that decides logins instead of the store
``servercert.pem``         -        certificate chain and key, for STLS and port 995
=========================  =======  ===================================================================

Everything it will need is imported when this module is: after the privilege drop the interpreter's
own files may be unreadable (a pyenv under /root), so nothing may be imported lazily later.

What it trusts: the root's configuration and password store. What it never does: run as root (the
caller drops privileges first; :func:`serve_pop3_listeners` refuses uid 0), delete anything except
at QUIT, reveal whether a login exists, or let one client's error end another's session.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from pqmail import aio
from pqmail.config.control import read_value
from pqmail.errors import ConfigError, UsageError
from pqmail.paths import Root
from pqmail.pop3.auth import Authenticator, AuthResult, FailureTracker, checkpassword_command
from pqmail.pop3.mailbox import Mailbox, MailboxError, MailboxInUse, Opening
from pqmail.pop3.protocol import (
    NEED_DATA,
    Authenticate,
    ConnectionClosed,
    POP3Connection,
    Quit,
    RemoteProtocolError,
    Retrieve,
    StartTLS,
    State,
)
from pqmail.sessioncount import SessionCounter
from pqmail.supervisor import drop_privileges

_Decided = tuple[AuthResult, Mailbox | MailboxError | Opening | None]  # what login_now decided

__all__ = ["Pop3Server", "Pop3Settings", "load_settings", "serve_pop3_listeners"]

STOP_GRACE = 30.0
CLOSE_LINGER = 10.0  # seconds a closed session's last bytes may wait for a client that does not read
TLS_HANDSHAKE_TIMEOUT = 30.0
WRITE_HIGH_WATER = 256 * 1024
FAILURE_WINDOW = 300.0
RECV_BUFFER = 64 * 1024  # one per process: every read is handed to the session's core at once
# What is done on the event loop rather than in a thread. A hand-off to a thread and back costs two
# thread switches and wake-ups; a small Maildir (a few dozen quick system calls) or a small message
# file (open, read, close) costs less, and keeps the loop's GIL to itself.
INLINE_FILES = 100  # names in new/ and cur/ together: a box with more is opened in a thread
INLINE_READ = 256 * 1024  # bytes to read to count line ends at login: more, and a thread does it
INLINE_RETR = 64 * 1024  # a message file up to this size is read on the loop for RETR


# ----------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Pop3Settings:
    hostname: str = "localhost"
    idle_timeout: float = 600.0
    max_sessions: int = 500
    max_per_ip: int = 50
    fail_delay: float = 1.0
    max_failures: int = 10
    cache_ttl: float = 300.0
    tls_only: bool = False
    apop: bool = False
    checkpassword: tuple[str, ...] | None = None
    cert: Path | None = None


def _number(root: Root, name: str, default: int) -> int:
    value = read_value(root.control_file(name))
    if value is None:
        return default
    m = re.match(r"[0-9]+", value)
    return int(m.group()) if m else default


def load_settings(root: Root) -> Pop3Settings:
    """The settings from control/ (see the module docstring); ConfigError for an unusable file."""
    cert = root.control_file("servercert.pem")
    cp = checkpassword_command(root)
    return Pop3Settings(
        hostname=read_value(root.control_file("me")) or socket.getfqdn() or "localhost",
        idle_timeout=float(max(1, _number(root, "timeoutpop3d", 600))),
        max_sessions=max(1, _number(root, "concurrencypop3", 500)),
        max_per_ip=max(1, _number(root, "concurrencypop3perip", 50)),
        fail_delay=float(_number(root, "pop3faildelay", 1)),
        max_failures=_number(root, "pop3authfailures", 10),
        cache_ttl=float(_number(root, "pop3authcache", 300)),
        tls_only=_number(root, "pop3tlsonly", 0) > 0,
        apop=_number(root, "pop3apop", 0) > 0,
        checkpassword=tuple(cp) if cp else None,
        cert=cert if cert.exists() else None,
    )


def tls_context(pem: Path) -> ssl.SSLContext:
    """A server context from one PEM holding certificate chain and key (qmail's servercert.pem)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(pem)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(str(pem), f"unusable certificate/key: {e}") from None
    return ctx


# ----------------------------------------------------------------------------- one session

class _Abort(Exception):
    """End this session now (the client vanished, or a message broke mid-transfer)."""


class _Session(asyncio.BufferedProtocol):
    """One client connection: feeds the sans-IO core and carries out its events.

    An asyncio Protocol rather than streams: a command answered from the listing (most of them) costs
    one read and one ``write``, no task switch. A buffered one: the transport reads into the server's
    one receive buffer instead of allocating a fresh 256 KB bytes object for every command line. A login
    with a crypt(3) hash, a small box and small messages are handled right there too (see
    :meth:`Pop3Server.login_now`). What must wait (a slow hash, a big box, a big message, QUIT's
    deletions, STLS) runs as a task while reading is paused; commands the client pipelined meanwhile
    wait in the core's buffer.
    """

    def __init__(self, server: Pop3Server, kind: str) -> None:
        self.server = server
        self.kind = kind
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.ip = "unknown"
        self.conn: POP3Connection | None = None
        self.task: asyncio.Task | None = None  # the event being carried out
        self.mailbox: Mailbox | None = None
        self.opening: Opening | None = None  # a box locked at login, being finished in a thread
        self.box: str | None = None
        self.retrieved = self.deleted = self.octets = 0
        self.last = self.loop.time()  # the client's last sign of life
        self.timer: asyncio.TimerHandle | None = None
        self.reason = "eof"
        self.closed = False  # the connection is gone (or going)
        self.counted = False  # counted in the server's session limits
        self._drained: asyncio.Future | None = None  # set while the transport's buffer is too full

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        srv, st = self.server, self.server.settings
        self.conn = POP3Connection(
            hostname=st.hostname, tls_available=srv.tls is not None and self.kind == "pop3",
            tls_active=self.kind == "pop3s", plaintext_auth=not st.tls_only,
            apop_timestamp=srv.apop_stamp() if st.apop else None)
        if srv.counts.total() >= st.max_sessions or srv.counts.for_ip(self.ip) >= st.max_per_ip:
            self.conn.send_refusal("SYS/TEMP", "too many sessions, try again later")
            srv.log(f"refused ip={self.ip}: too many sessions")
            self._finish("refused")
            return
        srv.sessions.add(self)
        srv.counts.add(self.ip)
        self.counted = True
        self.conn.send_greeting()
        self.timer = self.loop.call_at(self.last + st.idle_timeout, self._idle_check)
        self._pump()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.recv_view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.server.recv_view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.closed or self.conn is None:
            return
        self.last = self.loop.time()
        self.conn.receive_data(data)  # copied into the core's buffer: the receive buffer is free again
        if self.task is None:
            self._pump()

    def eof_received(self) -> bool:
        if self.conn is not None and not self.closed:
            self.conn.receive_data(b"")
            if self.task is None:
                self._pump()
        # keep our side open to answer a QUIT that came with the EOF; TLS transports cannot do that
        return self.conn is not None and not self.conn.tls_active

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.reason = f"aborted ({exc})" if exc else "connection lost"
        self.closed = True
        self.resume_writing()  # a RETR waiting for the buffer to drain sees `closed` and stops
        if self.task is None:
            self._cleanup()
        # else the task's end cleans up: it may hold the mailbox (QUIT's deletions finish first)

    def pause_writing(self) -> None:
        if self._drained is None or self._drained.done():
            self._drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- driving the core

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def _pump(self) -> None:
        """Handle buffered commands until one needs waiting for, more input is needed, or the end."""
        conn = self.conn
        assert conn is not None
        while not self.closed:
            try:
                event = conn.next_event()
            except RemoteProtocolError as e:
                self._finish(f"protocol error: {e}")
                return
            self._write(conn.data_to_send())
            if event is NEED_DATA:
                return
            if isinstance(event, ConnectionClosed):
                self._finish(event.reason)
                return
            if isinstance(event, Retrieve) and self._retrieve_now(event):
                continue
            decided: _Decided | None = None
            started = 0.0
            if isinstance(event, Authenticate):
                started = self.loop.time()
                decided = self.server.login_now(self, event)
                if decided is not None and self.server.answer_login(self, event, *decided):
                    continue
                if decided is not None and isinstance(decided[1], Opening):
                    self.opening = decided[1]  # unlocked by _cleanup if the task never gets to it
            assert self.transport is not None
            self.transport.pause_reading()
            self.task = self.loop.create_task(self._carry_out(event, decided, started))
            return

    async def _carry_out(self, event: object, decided: _Decided | None = None, started: float = 0.0) -> None:
        try:
            if isinstance(event, Authenticate):
                await self.server.authenticate(self, event, decided, started)
            elif isinstance(event, Retrieve):
                await self._retrieve(event)
            elif isinstance(event, Quit):
                await self._quit(event)
            elif isinstance(event, StartTLS):
                await self._starttls()
            else:
                raise AssertionError(f"unexpected {event!r}")
        except (_Abort, ConnectionError, OSError, ssl.SSLError) as e:
            self._finish(f"aborted ({type(e).__name__}: {e})")
        except asyncio.CancelledError:  # autologout, or the end of SIGTERM's grace: no UPDATE
            if not self.closed:
                self._finish(self.reason if self.reason != "eof" else "server stopping")
        except Exception as e:  # a bug: this session ends with a log line, the others go on
            self.server.log(f"internal error ip={self.ip}: {type(e).__name__}: {e}")
            self._finish("internal error")
        finally:
            self.task = None
        if self.closed:
            self._cleanup()
            return
        if isinstance(event, Quit) and self.conn is not None and self.conn.state is State.CLOSED:
            self._pump()  # only the last reply and the close are left: reading stays paused
            return
        assert self.transport is not None
        self.transport.resume_reading()
        self._pump()

    def _finish(self, reason: str) -> None:
        """Send what the core queued, close the connection (a client that does not read is cut off)."""
        if self.closed:
            return
        self.reason = reason
        self.closed = True
        transport = self.transport
        assert transport is not None and self.conn is not None
        try:
            transport.write(self.conn.data_to_send())
            transport.close()
        except (ConnectionError, OSError, ssl.SSLError, RuntimeError):
            transport.abort()
        if transport.get_write_buffer_size():
            self.loop.call_later(CLOSE_LINGER, transport.abort)
        if self.task is None:
            self._cleanup()

    def _cleanup(self) -> None:
        """Once, when the session is over and no task runs: unlock the box, log, forget the session."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.counted:
            self.counted = False
            srv = self.server
            srv.sessions.discard(self)
            srv.counts.remove(self.ip)
        if self.opening is not None:
            self.opening.abandon()
            self.opening = None
        if self.mailbox is not None:
            self.mailbox.close()
            self.mailbox = None
            self.server.log(f"logout {self.box} ip={self.ip} retrieved={self.retrieved} "
                            f"deleted={self.deleted} octets={self.octets} ({self.reason})")

    def _idle_check(self) -> None:
        """RFC 1939 autologout; one timer per session, re-armed only when it fires."""
        due = self.last + self.server.settings.idle_timeout
        if self.loop.time() < due:
            self.timer = self.loop.call_at(due, self._idle_check)
            return
        self.timer = None
        self._write(b"-ERR autologout: idle for too long\r\n")
        self.reason = "timeout"
        if self.task is not None:
            self.task.cancel()
        else:
            self._finish("timeout")

    def stop(self) -> None:
        """The server's grace period is over: end now, without UPDATE."""
        if self.task is not None:
            self.reason = "server stopping"
            self.task.cancel()
        elif not self.closed:
            self._finish("server stopping")

    async def _drain(self) -> None:
        if self._drained is not None and not self._drained.done():
            await self._drained
        self.last = self.loop.time()  # the client is reading: not idle

    # -- events

    def _retrieve_now(self, ev: Retrieve) -> bool:
        """RETR/TOP of a message kept in memory since login, or of a small file: answered at once."""
        if self.mailbox is None:
            return False
        conn = self.conn
        assert conn is not None
        try:
            data = self.mailbox.small_wire(ev.number, INLINE_RETR, ev.lines)
        except MailboxError as e:
            conn.message_unavailable(e.text, e.code)
            return True
        if data is None:
            return False
        conn.message_follows()
        head = conn.data_to_send()
        conn.message_end()
        self._write(b"".join((head, data, conn.data_to_send())))
        if ev.lines is None:
            self.retrieved += 1
        self.octets += len(data)
        return True

    async def _retrieve(self, ev: Retrieve) -> None:
        mailbox, conn = self.mailbox, self.conn
        assert mailbox is not None and conn is not None
        disk = self.server.disk
        chunks = mailbox.chunks(ev.number, ev.lines)
        try:
            chunk = await self.loop.run_in_executor(disk, _next_chunk, chunks)
        except MailboxError as e:
            conn.message_unavailable(e.text, e.code)
            return
        conn.message_follows()
        self._write(conn.data_to_send())
        while chunk is not None:
            self._write(chunk)
            self.octets += len(chunk)
            await self._drain()
            if self.closed:
                raise _Abort("connection lost during RETR")
            try:
                chunk = await self.loop.run_in_executor(disk, _next_chunk, chunks)
            except MailboxError as e:  # half a message is out: the session cannot go on
                raise _Abort(f"message {ev.number} broke off: {e.text}") from None
        conn.message_end()
        if ev.lines is None:
            self.retrieved += 1

    async def _quit(self, ev: Quit) -> None:
        assert self.mailbox is not None and self.conn is not None
        failed = 0
        if ev.deleted:  # once started, the deletions and their fsync finish before the box is unlocked
            fut = self.loop.run_in_executor(self.server.disk, self.mailbox.commit, ev.deleted)
            try:
                failed = await asyncio.shield(fut)
            except asyncio.CancelledError:
                await asyncio.wait([fut])
                raise
        self.deleted = len(ev.deleted) - failed
        # unlocked before the last reply goes out: a client that logs in again as soon as it has read
        # it (possibly to another worker process) must find the box free
        self.mailbox.close()
        self.conn.quit_done(failed)

    async def _starttls(self) -> None:
        srv, conn, transport = self.server, self.conn, self.transport
        assert srv.tls is not None and conn is not None and transport is not None
        await self._drain()
        new = await self.loop.start_tls(transport, self, srv.tls, server_side=True,
                                        ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        if new is None:
            raise _Abort("TLS handshake did not complete")
        self.transport = new
        conn.tls_started()  # everything the client pipelined in plaintext is dropped here


# ----------------------------------------------------------------------------- the server

class Pop3Server:
    """Sessions of one pop3d process (see :class:`_Session`)."""

    def __init__(self, root: Root, settings: Pop3Settings, *,
                 log: Callable[[str], None] | None = None, counts: SessionCounter | None = None) -> None:
        self.root = root
        self.log = log or _stderr_log
        # logins (hash + opening the box) apart from message reads and QUIT's fsync, so that a burst of
        # slow argon2 checks never holds up the sessions already logged in
        self.logins = ThreadPoolExecutor(max_workers=max(4, 2 * (os.cpu_count() or 1)),
                                         thread_name_prefix="pop3-login")
        self.disk = ThreadPoolExecutor(max_workers=16, thread_name_prefix="pop3-disk")
        self.sessions: set[_Session] = set()
        # shared with the other pop3d processes of `pqmail serve`, so the limits hold for the host
        self.counts = counts or SessionCounter.private()
        self.counts.reset()
        self.recv_view = memoryview(bytearray(RECV_BUFFER))  # shared: the loop runs one read at a time
        self._apop_counter = 0
        self.apply(settings)

    def apply(self, settings: Pop3Settings) -> None:
        """Use new settings (at start); sessions already running keep theirs."""
        self.settings = settings
        self.tls = None
        self.tls_trouble: ConfigError | None = None
        if settings.cert:
            try:
                self.tls = tls_context(settings.cert)
            except ConfigError as e:  # plain POP3 still works; STLS is not offered, pop3s cannot start
                self.tls_trouble = e
                self.log(f"no TLS: {e}")
        cp = list(settings.checkpassword) if settings.checkpassword else None
        self.auth = Authenticator(self.root, cache_ttl=settings.cache_ttl, checkpassword=cp)
        self.failures = FailureTracker(settings.max_failures, FAILURE_WINDOW)

    def reload(self) -> None:
        """SIGHUP: re-read control/. Remembered verifications and failure counts are kept."""
        try:
            settings = load_settings(self.root)
        except (ConfigError, UsageError) as e:
            self.log(f"reload failed, keeping the old settings: {e}")
            return
        if settings.cert:
            try:
                self.tls = tls_context(settings.cert)
            except ConfigError as e:  # usually a key only root may read: we run as the mail user now
                self.log(f"keeping the old certificate: {e}")
        self.settings = settings
        cp = list(settings.checkpassword) if settings.checkpassword else None
        cache = self.auth.cache
        self.auth = Authenticator(self.root, cache_ttl=settings.cache_ttl, checkpassword=cp)
        self.auth.cache = cache
        cache.ttl = settings.cache_ttl
        self.failures.limit = settings.max_failures
        self.log("reloaded control files")

    def apop_stamp(self) -> str:
        self._apop_counter += 1
        return f"<{os.getpid()}.{self._apop_counter}.{int(time.time())}@{self.settings.hostname}>"

    # -- logins

    def login_now(self, s: _Session, ev: Authenticate) -> _Decided | None:
        """The login decided on the event loop, where that is cheaper than a thread; None: use one.

        Decided here: whatever :meth:`Authenticator.check_now` decides (crypt(3) hashes, which hold the
        GIL anyway, unknown logins, remembered verifications), then the box, opened here when it is small
        (:data:`INLINE_FILES`, :data:`INLINE_READ`) and otherwise returned as an :class:`Opening` (locked)
        for a thread to finish. A blocked address is left to :meth:`authenticate` (its reply waits).
        """
        if self.failures.blocked(s.ip):
            return None
        conn = s.conn
        assert conn is not None
        result = self.auth.check_now(ev.login, ev.secret, mechanism=ev.mechanism, authzid=ev.authzid,
                                     apop_timestamp=conn.apop_timestamp)
        if result is None:
            return None
        if not result.ok:
            return result, None
        assert result.maildir is not None
        try:
            opening = Mailbox.begin(result.maildir)
            if opening.files <= INLINE_FILES and opening.settle() <= INLINE_READ:
                return result, opening.finish()
        except MailboxError as e:
            return result, e
        return result, opening

    def answer_login(self, s: _Session, ev: Authenticate, result: AuthResult | None,
                     opened: Mailbox | MailboxError | Opening | None) -> bool:
        """Answer a decided login; False when the answer must wait (a failure's delay, a box to finish)."""
        conn = s.conn
        assert conn is not None
        if result is not None and result.temporary:
            self.log(f"login trouble login={_printable(ev.login)} ip={s.ip}: {result.detail}")
            conn.auth_failed("SYS/TEMP", "temporary failure, try again later")
            return True
        if result is None or not result.ok or isinstance(opened, Opening):
            return False
        if isinstance(opened, MailboxError):
            why = "in use" if isinstance(opened, MailboxInUse) else f"mailbox trouble: {opened.text}"
            self.log(f"login {result.box} ip={s.ip}: {why}")
            conn.auth_failed(opened.code, opened.text)
            return True
        assert isinstance(opened, Mailbox)
        if s.closed:  # the client left while we checked
            opened.close()
            return True
        s.mailbox, s.box = opened, result.box
        conn.auth_succeeded(opened.sizes, opened.uids)
        self.log(f"login {result.box} ip={s.ip} messages={len(opened.messages)}"
                 f"{' (cached)' if result.cached else ''}")
        return True

    async def authenticate(self, s: _Session, ev: Authenticate, decided: _Decided | None = None,
                           started: float | None = None) -> None:
        """The rest of a login :meth:`login_now` did not finish (with ``decided`` None: all of it)."""
        loop = asyncio.get_running_loop()
        conn = s.conn
        assert conn is not None
        if started is None:
            started = loop.time()
        detail = "too many failed logins from this address"
        if decided is not None:
            result, opened = decided
        elif self.failures.blocked(s.ip):
            result, opened = None, None
        else:
            result, opened = await self._login(ev, conn.apop_timestamp)
        if isinstance(opened, Opening):
            opened = await self._finish_opening(s, opened)
        if self.answer_login(s, ev, result, opened):
            return
        if result is not None:
            detail = result.detail
        self.failures.record(s.ip)
        self.log(f"auth failed login={_printable(ev.login)} ip={s.ip} ({ev.mechanism}): {detail}")
        # the reply comes fail_delay after the attempt, however long checking took: an unknown
        # login and a wrong password look the same, and guessing is slow
        wait = self.settings.fail_delay - (loop.time() - started)
        if wait > 0:
            await asyncio.sleep(wait)
        conn.auth_failed("AUTH", "authentication failed")

    async def _finish_opening(self, s: _Session, opening: Opening) -> Mailbox | MailboxError:
        """A big box's :meth:`Opening.finish` in a disk thread; the session's cleanup unlocks it if we are
        cancelled before the thread starts, the thread's end if after."""
        fut = asyncio.get_running_loop().run_in_executor(self.disk, _finish, opening)
        s.opening = None  # from here on, the future owns the lock
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(_close_finished)
            raise

    def _login_blocking(self, ev: Authenticate,
                        timestamp: str | None) -> tuple[AuthResult, Mailbox | MailboxError | None]:
        """In a thread: check the password, and open the box if it is right."""
        result = self.auth.check(ev.login, ev.secret, mechanism=ev.mechanism, authzid=ev.authzid,
                                 apop_timestamp=timestamp)
        if not result.ok:
            return result, None
        assert result.maildir is not None
        try:
            return result, Mailbox.open(result.maildir)
        except MailboxError as e:
            return result, e

    async def _login(self, ev: Authenticate,
                     timestamp: str | None) -> tuple[AuthResult, Mailbox | MailboxError | None]:
        """:meth:`_login_blocking` in a login thread; if we are cancelled meanwhile, the box is unlocked."""
        fut = asyncio.get_running_loop().run_in_executor(self.logins, self._login_blocking, ev, timestamp)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(_close_opened)
            raise

    # -- the whole process

    async def serve(self, listeners: Iterable[tuple[str, socket.socket]],
                    ready: Callable[[], None] | None = None) -> None:
        """Serve until SIGTERM/SIGINT, then let sessions finish (up to STOP_GRACE seconds)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        servers = []
        for kind, sock in listeners:
            if kind not in ("pop3", "pop3s"):
                raise UsageError(f"unknown POP3 listener kind {kind!r} (want pop3 or pop3s)")
            if kind == "pop3s" and self.tls is None:
                raise self.tls_trouble or UsageError(f"{self.root.control_file('servercert.pem')}: missing; "
                                                     "the implicit-TLS listener (pop3s) needs it")
            servers.append(await loop.create_server(
                functools.partial(_Session, self, kind), sock=sock, ssl=self.tls if kind == "pop3s" else None,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if kind == "pop3s" else None))
        if ready is not None:
            ready()
        await stop.wait()
        for srv in servers:
            srv.close()
        self.log(f"stopping: {len(self.sessions)} sessions to finish")
        deadline = loop.time() + STOP_GRACE
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.2)  # sessions end on their own clients' QUIT
        for s in list(self.sessions):
            s.stop()
        end = loop.time() + 5.0
        while any(s.task is not None for s in self.sessions) and loop.time() < end:
            await asyncio.sleep(0.05)
        self.disk.shutdown(wait=False)
        self.logins.shutdown(wait=False, cancel_futures=True)


def _finish(opening: Opening) -> Mailbox | MailboxError:
    try:
        return opening.finish()
    except MailboxError as e:
        return e


def _close_finished(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is None and isinstance(fut.result(), Mailbox):
        fut.result().close()


def _close_opened(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is None:
        opened = fut.result()[1]
        if isinstance(opened, Mailbox):
            opened.close()


def _next_chunk(chunks: Iterator[bytes]) -> bytes | None:
    return next(chunks, None)


def _printable(text: str, limit: int = 64) -> str:
    """A client-supplied string fit for a log line: no controls, no spaces, bounded."""
    out = "".join(c if 0x21 <= ord(c) < 0x7F else "?" for c in text[:limit])
    return out + ("..." if len(text) > limit else "")


def _stderr_log(line: str) -> None:
    sys.stderr.write(f"pop3d: {line}\n")
    sys.stderr.flush()


def serve_pop3_listeners(root: Root | str | os.PathLike[str], listeners: Iterable[tuple[str, socket.socket]],
                         log: Callable[[str], None] | None = None, ready: Callable[[], None] | None = None,
                         drop_to: tuple[int, int] | None = None,
                         counts: SessionCounter | None = None) -> None:
    """Serve POP3 on bound, listening sockets (``pop3`` or ``pop3s``) until SIGTERM/SIGINT; then return.

    Call it in the process that will serve; several such processes may share the sockets (one per
    core serves best), each with its own ``counts`` of one SessionTable so that the session limits
    count them all. ``drop_to`` (uid, gid): become that user once set up (the TLS key read); without
    it the caller must have dropped privileges already, as this refuses to serve as root. Raises
    ConfigError/UsageError when control/ is unusable at start.
    """
    root = root if isinstance(root, Root) else Root(root)
    if os.geteuid() == 0 and drop_to is None:
        raise UsageError("pop3d refuses to run as root: drop to control/mailuser first")
    server = Pop3Server(root, load_settings(root), log=log, counts=counts)  # reads the key file
    if drop_to is not None:
        drop_privileges(*drop_to)
    aio.run(server.serve(list(listeners), ready))

