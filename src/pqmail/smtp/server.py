"""``pqmail smtpd``: the SMTP server (qmail-smtpd) on aiosmtpd, with qmail-smtpd's policy.

What it does: answers SMTP on the sockets it is given (port 25 ``smtp``; ``submission``, where every
message needs AUTH; ``smtps``, the same over implicit TLS), applies the policy of
:mod:`pqmail.smtp.policy` (rcpthosts, relayclients, badmailfrom, badrcptto, limits), adds qmail's
Received line and hands each message to the durable queue. ``250`` after DATA is sent only once
:meth:`Queue.enqueue_future` has its id, i.e. the message is fsync'd and committed (design.md).
ESMTP: PIPELINING, 8BITMIME, SIZE, ENHANCEDSTATUSCODES, STARTTLS (``control/servercert.pem``, cert
and key in one file; ``control/servercert.d/<host>.pem`` chosen by SNI), AUTH PLAIN and LOGIN
against the POP box passwords, offered only under TLS.

What it trusts: the control files and the password store. Nothing a client sends: every command
line is bounded (998 bytes, then 500), every session is bounded in idle time (``timeoutsmtpd``) and
in total (``maxsessiontime``), concurrent sessions in all and per client IP are bounded
(``maxsessions``, ``maxsessionsperip``: 421 and close; counted over every smtpd process of
``pqmail serve``, see pqmail.sessioncount), as are unknown commands and AUTH failures.

What it never does: run as root (the caller drops privileges first), answer 250 before the queue
has the message, queue a message whose client went away mid-DATA, block its event loop on disk or
on argon2 (both run in threads), or print a traceback: an unexpected error is one log line and a
``451`` for that command.

Control files are re-read without restart: their stamps (one stat each) are compared at most once
a second, and SIGHUP forces a re-read. SIGTERM stops accepting, closes idle sessions with 421, lets
transactions in flight finish for up to :data:`STOP_GRACE` seconds, then exits.

Implementation note (performance): :class:`QmailSMTP` subclasses aiosmtpd's ``SMTP`` (1.4.x) and
keeps its connection handling, STARTTLS switch and AUTH exchange, but not its per-connection
``__init__`` (method tables built with ``inspect``: over 100 µs a connection), its command loop
(per-line logging and a new timer per command) nor its DATA reader (one ``readuntil`` per line).
A port-25 session does not even run a Task: ``data_received`` splits the lines and runs each
command at once, feeds DATA to the decoder as it arrives, and the queue's future sends the ``250``
(the "direct path", see ``QmailSMTP._pump``); only STARTTLS, AUTH and ETRN move a session to the
coroutine command loop, which AUTH-only listeners use from the start. Per message that saves a
StreamReader wake-up, a Task step and a pass of the event loop for each command: the protocol's
own CPU went from about 0.45 ms to about 0.28 ms a session (in-process, queue stubbed).
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import signal
import socket
import ssl
import sys
import threading
import time
from base64 import b64decode
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import argon2.exceptions  # noqa: F401  (see below)
import cdbx  # noqa: F401
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session, TLSSetupException, login_always_fail

from pqmail import aio
from pqmail.config.control import control_stamp
from pqmail.errors import ConfigError, PermanentFailure, PqmailError, TemporaryFailure
from pqmail.hashes import verify_secret
from pqmail.passwords import PasswordStore, hash_password, verify_password
from pqmail.paths import Root
from pqmail.queue.store import Queue
from pqmail.serialmail.etrn import handle_etrn
from pqmail.sessioncount import SessionCounter
from pqmail.smtp import policy as pol
from pqmail.smtp.policy import SmtpPolicy

# Every module a worker needs is imported above, when this module is: pqmail serve imports it
# before it forks and drops privileges, and the mail user may not be able to read the interpreter's
# or the package's files afterwards (a pyenv under /root). argon2 and cdbx are imported lazily by
# pqmail.passwords and pqmail.config.control, hence their imports here.

__all__ = ["STOP_GRACE", "QmailSMTP", "SmtpService", "serve_listeners"]

STOP_GRACE = 45.0  # seconds a transaction in flight may take after SIGTERM (serve kills at 60)
COMMAND_LIMIT = 998  # RFC 5321 §4.5.3.1.4: 1000 octets with CRLF
READER_LIMIT = 1 << 16  # StreamReader buffer: commands beyond it are drained in pieces, DATA chunked
BOGUS_LIMIT = 10  # unknown commands before 421 and close
AUTH_FAILURES = 3  # failed AUTH attempts before 421 and close
REFRESH_EVERY = 1.0  # seconds between control-file stamp comparisons
SNI_CACHE = 1024
CHATTER_LIMIT = 200  # HELO/EHLO/RSET/NOOP/VRFY/HELP/STARTTLS/AUTH per session before 421
HIGH_WATER = 1 << 16  # unsent reply bytes before push waits for the client to read

R_GREETING_FAIL = "421 4.3.0 unable to read controls (#4.3.0)"
R_TOO_MANY = "421 4.3.2 too many sessions, try again later (#4.3.2)"
R_TOO_MANY_IP = "421 4.7.0 too many sessions from your address, try again later (#4.7.0)"
R_SHUTDOWN = "421 4.3.2 shutting down, try again later (#4.3.2)"
R_TIMEOUT = "451 4.4.2 timeout (#4.4.2)"
R_SESSION_TIME = "421 4.4.2 session time limit reached (#4.4.2)"
R_UNIMPL = "502 5.5.1 unimplemented (#5.5.1)"
R_BOGUS = "421 4.7.0 too many unrecognized commands (#4.7.0)"
R_CHATTER = "421 4.7.0 too many commands without mail (#4.7.0)"
R_LINE_TOO_LONG = "500 5.5.2 line too long (#5.5.2)"
R_QQ = "451 4.3.0 qq write error or disk full (#4.3.0)"
R_INTERNAL = "451 4.3.0 internal error, try again later (#4.3.0)"
R_AUTH_FAILED = "535 5.7.8 authentication failed (#5.7.8)"
R_AUTH_TEMP = "454 4.7.0 temporary authentication failure (#4.7.0)"
R_AUTH_TOO_MANY = "421 4.7.0 too many authentication failures (#4.7.0)"
R_TLS_ACTIVE = "503 5.5.1 TLS already active (#5.5.1)"

# The fixed replies of aiosmtpd's STARTTLS and AUTH code, in qmail's style with RFC 2034 codes.
REWRITE = {
    "503 Error: send EHLO first": "503 5.5.1 send EHLO first (#5.5.1)",
    "500 Error: command 'AUTH' not recognized": "503 5.5.1 send EHLO first (#5.5.1)",
    "503 Already authenticated": "503 5.5.1 already authenticated (#5.5.1)",
    "501 Not enough value": "501 5.5.4 syntax: AUTH mechanism [initial-response] (#5.5.4)",
    "501 Too many values": "501 5.5.4 syntax: AUTH mechanism [initial-response] (#5.5.4)",
    "501 Syntax: STARTTLS": "501 5.5.4 syntax: STARTTLS (#5.5.4)",
    "454 TLS not available": "454 4.7.0 TLS not available (#4.7.0)",
    "220 Ready to start TLS": "220 2.0.0 ready to start TLS",
}

_SIZE_PARAM = re.compile(r"(?i)(?:^|\s)SIZE=([0-9]+)")


def _printable(text: str | None, limit: int = 200) -> str:
    """A log field: non-printable characters escaped, long values cut (no log injection)."""
    if text is None:
        return "-"
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def _stderr_log(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class _LoopLog:
    """Log lines gathered during one pass of the event loop and written to stderr together.

    Two lines a message (session, msg accepted) otherwise cost two writes to the supervisor's pipe
    each; here a busy loop writes once per pass. Lines from other threads go through the loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.get_ident()
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        if threading.get_ident() != self.thread:  # a worker thread (auth, enqueue): hand it over
            self.loop.call_soon_threadsafe(self, line)
            return
        if not self.lines:
            self.loop.call_soon(self.flush)
        self.lines.append(line)

    def flush(self) -> None:
        lines, self.lines = self.lines, []
        if lines:
            _stderr_log("\n".join(lines))


# ----------------------------------------------------------------------------- TLS

_HOSTNAME = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")


def _server_context(pem: Path) -> ssl.SSLContext:
    """A server context from one PEM holding certificate chain and key (qmail's servercert.pem)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(pem))
    except FileNotFoundError:
        raise
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(str(pem), f"unusable certificate or key: {getattr(e, 'strerror', None) or e}"
                          ) from None
    return ctx


class TlsContexts:
    """The default context (servercert.pem) and per-host ones (servercert.d/<host>.pem) by SNI.

    :attr:`front` is the context listeners and STARTTLS start with; its SNI callback switches every
    handshake to the current default or per-host context, so a replaced certificate takes effect
    for new connections without re-creating the listening servers.
    """

    def __init__(self, root: Root, log: Callable[[str], None]) -> None:
        self.root = root
        self.log = log
        self.default: ssl.SSLContext | None = None
        self.front: ssl.SSLContext | None = None
        self._by_name: dict[str, ssl.SSLContext | None] = {}
        self.load()

    def load(self) -> None:
        pem = self.root.control_file("servercert.pem")
        try:
            ctx = _server_context(pem)
        except FileNotFoundError:
            ctx = None
        self.default = ctx
        self._by_name = {}
        if ctx is not None:
            ctx.sni_callback = self._sni
            if self.front is None:
                self.front = ctx

    def _sni(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        chosen = self._for_name(server_name) if server_name else None
        chosen = chosen or self.default
        if chosen is not None and sslobj.context is not chosen:
            sslobj.context = chosen

    def _for_name(self, server_name: str) -> ssl.SSLContext | None:
        name = server_name.lower().rstrip(".")
        if name in self._by_name:
            return self._by_name[name]
        ctx = None
        if _HOSTNAME.fullmatch(name):
            pem = self.root.control_file("servercert.d") / f"{name}.pem"
            try:
                ctx = _server_context(pem)
            except FileNotFoundError:
                ctx = None
            except ConfigError as e:
                self.log(f"warning: {e}")
                ctx = None
        if len(self._by_name) >= SNI_CACHE:
            self._by_name.clear()
        self._by_name[name] = ctx
        return ctx


# ----------------------------------------------------------------------------- the per-process service

def _extra_stamp(root: Root) -> tuple:
    out = []
    for name in (*pol.POLICY_FILES, "servercert.pem", "servercert.d"):
        try:
            st = os.stat(root.control / name)
        except OSError:
            continue
        out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class SmtpService:
    """What the sessions of one smtpd process share: settings, the queue, counters, thread pools."""

    def __init__(self, root: Root, log: Callable[[str], None] | None = None,
                 sessions: SessionCounter | None = None) -> None:
        self.root = root
        self.log = log or _stderr_log
        self.policy: SmtpPolicy = pol.load_policy(root)
        self._stamp = self._compute_stamp()
        self._checked = time.monotonic()
        self.tls = TlsContexts(root, self.log)
        self.queue = Queue(root.queue)
        self.passwords = PasswordStore(root)
        # shared with the other smtpd processes of `pqmail serve`, so the limits hold for the host
        self.sessions = sessions or SessionCounter.private()
        self.sessions.reset()
        self.protocols: set[QmailSMTP] = set()
        self.inflight: set[asyncio.Future] = set()
        self.stopping = False
        self._local_ips: dict[str, frozenset[str]] = {}
        # argon2 takes 64 MiB and tens of ms per check: one thread per process bounds both.
        self._auth_pool = ThreadPoolExecutor(1, thread_name_prefix="auth")
        self._auth_lock = threading.Lock()
        self._auth_cache: dict[tuple[str, str, bytes], float] = {}
        self._auth_key = secrets.token_bytes(32)
        self._dummy_hash: str | None = None
        for w in self.policy.control.warnings:
            self.log(f"warning: {w}")
        if self.policy.control.rcpthosts is None:
            self.log(f"warning: {root.control_file('rcpthosts')} is missing: every recipient is refused "
                     "(qmail would be an open relay)")

    # -- settings

    def _compute_stamp(self) -> tuple:
        return control_stamp(self.root), _extra_stamp(self.root)

    def refresh(self) -> None:
        """Re-read control/ if a file changed; at most one comparison of stamps a second."""
        now = time.monotonic()
        if now - self._checked < REFRESH_EVERY:
            return
        self._checked = now
        try:
            stamp = self._compute_stamp()
        except ConfigError as e:
            self.log(f"warning: keeping the previous configuration: {e}")
            return
        if stamp != self._stamp:
            self._reload(stamp)

    def reload(self) -> None:
        """SIGHUP: re-read everything now."""
        try:
            stamp = self._compute_stamp()
        except ConfigError as e:
            self.log(f"warning: keeping the previous configuration: {e}")
            return
        self._reload(stamp)

    def _reload(self, stamp: tuple) -> None:
        self._stamp = stamp  # a broken file is reported once, and again only when it changes
        try:
            policy = pol.load_policy(self.root)
            self.tls.load()
        except ConfigError as e:
            self.log(f"warning: keeping the previous configuration: {e}")
            return
        self.policy = policy
        self._local_ips.clear()
        self.log("control files re-read")

    def local_ips(self, sockname_ip: str | None) -> frozenset[str]:
        """This host's addresses for ``box@[ip]``: the address the client reached, 0.0.0.0, loopback."""
        key = sockname_ip or ""
        found = self._local_ips.get(key)
        if found is None:
            ips = {"0.0.0.0", "127.0.0.1", "::1", "::"}
            if sockname_ip:
                ips.add(sockname_ip)
            found = self._local_ips[key] = frozenset(ips)
        return found

    # -- sessions

    def admit(self, ip: str) -> str | None:
        """Count a new session; the 421 reply instead when it is over a limit or we are stopping."""
        p = self.policy
        if self.stopping:
            return R_SHUTDOWN
        if "smtpgreeting" in p.control.unset:
            return R_GREETING_FAIL
        if p.maxsessions and self.sessions.total() >= p.maxsessions:
            return R_TOO_MANY
        if (p.maxsessionsperip and self.sessions.for_ip(ip) >= p.maxsessionsperip
                and not self._trusted(ip)):
            return R_TOO_MANY_IP
        self.sessions.add(ip)
        return None

    def _trusted(self, ip: str) -> bool:
        """Loopback and relayclients are exempt from maxsessionsperip (local webmail, monitoring,
        the office's MTA, a benchmark): the limit exists to share the server among strangers."""
        try:
            if ipaddress.ip_address(ip).is_loopback:
                return True
        except ValueError:
            return False
        return pol.client_may_relay(self.policy, ip)

    def release(self, ip: str) -> None:
        self.sessions.remove(ip)

    # -- the queue

    def enqueue(self, sender: str, recipients: list[str], message: list[bytes]) -> asyncio.Future:
        """Start a durable enqueue; the future survives the session (shielded, awaited at exit)."""
        fut = self.queue.enqueue_future(sender, recipients, message, invoked="from network")
        self.inflight.add(fut)
        fut.add_done_callback(self._enqueued)
        return fut

    def _enqueued(self, fut: asyncio.Future) -> None:
        self.inflight.discard(fut)
        if not fut.cancelled():
            fut.exception()  # retrieved even if nobody waits (the session went away)

    # -- passwords

    async def check_password(self, box: str, password: str) -> bool:
        """argon2 verification in this process's auth thread; TemporaryFailure if the store fails."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._auth_pool, self._check_password, box, password)

    def _check_password(self, box: str, password: str) -> bool:
        try:
            rec = self.passwords.get(box)
        except (PqmailError, OSError) as e:
            raise TemporaryFailure(str(e)) from None
        if rec is None:
            # Spend the same time as for a real box, so that timing does not reveal box names.
            if self._dummy_hash is None:
                self._dummy_hash = hash_password(secrets.token_urlsafe(12))
            verify_password(self._dummy_hash, password)
            return False
        stored = rec[0]
        digest = hmac.new(self._auth_key, password.encode("utf-8", "surrogateescape"),
                          hashlib.sha256).digest()
        key = (box, stored, digest)
        now = time.monotonic()
        with self._auth_lock:
            if self._auth_cache.get(key, 0.0) > now:
                return True
        if not verify_secret(stored, password):  # argon2id, crypt(3), bcrypt, {PLAIN}: as POP3
            return False
        with self._auth_lock:
            if len(self._auth_cache) > 4096:
                self._auth_cache.clear()
            self._auth_cache[key] = now + 300  # a client re-authenticating per message skips argon2
        return True

    def close(self) -> None:
        self._auth_pool.shutdown(wait=False, cancel_futures=True)
        self.queue.close()


# ----------------------------------------------------------------------------- one session

class _AuthMech(NamedTuple):  # the shape aiosmtpd's smtp_AUTH expects in _auth_methods
    method: Callable
    is_builtin: bool


_NO_HOOKS: dict[str, Callable] = {}


class QSession(Session):
    """aiosmtpd's Session plus what qmail-smtpd remembers: the HELO argument, the AUTH box."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.helo: str | None = None
        self.auth_box: str | None = None


class QmailSMTP(SMTP):
    """One SMTP connection with qmail-smtpd's dialogue. Created by :meth:`SmtpService` listeners."""

    line_length_limit = READER_LIMIT
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, service: SmtpService, kind: str,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        # aiosmtpd's SMTP.__init__ inspects both classes on every connection; set its state directly.
        loop = loop or asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(limit=READER_LIMIT, loop=loop),
            client_connected_cb=self._cb_client_connected, loop=loop)
        p = service.policy
        self.service = service
        self.kind = kind
        self.__ident__ = "ESMTP"
        self.loop = loop
        self.event_handler = self
        self.data_size_limit = pol.effective_databytes(p)
        self.enable_SMTPUTF8 = True  # only to read 8-bit arguments, as qmail does; not advertised
        self._decode_data = False
        self.hostname = p.control.smtpgreeting
        self.tls_context = service.tls.front if kind != "smtps" and service.tls.default else None
        self.require_starttls = False
        self._timeout_duration = max(1, p.control.timeoutsmtpd)
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session: QSession | None = None
        self.envelope: Envelope | None = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = kind != "smtps"
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = kind in ("submission", "smtps")
        self._auth_methods = {"PLAIN": _AuthMech(self._auth_plain, False),
                              "LOGIN": _AuthMech(self._auth_login, False)}
        self._handle_hooks = _NO_HOOKS
        self._ehlo_hook_ver = None
        self.command_size_limit = COMMAND_LIMIT
        # ours
        self._last_activity = 0.0
        self._session_end = float("inf")
        self._chatter = 0
        self.ip = "unknown"
        self.local_ip: str | None = None
        self._local_ips: frozenset[str] = frozenset()
        self._counted = False
        self._refused = False
        self._started = 0.0
        self._session_limit = 0
        self._relay_ip: tuple[SmtpPolicy, bool] | None = None
        self._bogus = 0
        self._auth_failures = 0
        self._busy = False
        self.messages = 0
        self.rejected = 0
        self.end = "drop"
        self.tls_used = False
        self.last_helo: str | None = None
        self.last_auth: str | None = None
        # the direct path (see _pump)
        self._direct = False
        self._buf = bytearray()  # received, not yet consumed
        self._held = False  # a message is being queued: what follows waits for its reply
        self._read_paused = False
        self._skipping = False  # inside a command line too long to keep
        self._eof = False
        self._dec: pol.DataDecoder | None = None  # inside DATA: the message being decoded
        self._denv: Envelope | None = None
        self._dtail = b""

    # -- connection life cycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:  # the TLS layer after STARTTLS: a fresh session
            super().connection_made(transport)
            self.tls_used = True
            return
        svc = self.service
        svc.refresh()
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.ip = _ip_text(peer)
        self.local_ip = _ip_text(local) if local else None
        refusal = svc.admit(self.ip)
        if refusal is not None:
            self._refused = True
            transport.write(refusal.encode() + b"\r\n")
            transport.close()
            return
        self._counted = True
        self._started = time.monotonic()
        self._local_ips = svc.local_ips(self.local_ip)
        self.tls_used = self.kind == "smtps"
        svc.protocols.add(self)
        self._session_limit = svc.policy.maxsessiontime
        if self._auth_required or self.kind == "smtps":
            super().connection_made(transport)  # aiosmtpd's: the command loop runs in a Task
            return
        # The direct path (see _pump): aiosmtpd's connection_made without its Task.
        self._direct = True
        self._set_rset_state()
        self.session = QSession(self.loop)
        self.session.peer = peer
        self._reset_timeout()
        asyncio.StreamReaderProtocol.connection_made(self, transport)  # reader and writer, for _to_stream
        self.transport = transport
        self._send(f"220 {self.hostname} ESMTP")

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if not self._direct:
            super().data_received(data)
            return
        self._last_activity = self.loop.time()
        self._buf += data
        self._pump()

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the session here, dropping commands still buffered; qmail reads on until
        # the end, so the reader just sees EOF and the command loop ends (and closes) by itself.
        if self._refused:
            return False
        if self._direct:
            self._eof = True
            self._pump()
            return True  # keep our side open for the replies still owed
        reader = self._stream_reader
        if reader is not None:
            reader.feed_eof()
        return not self._tls_active() and not self._over_ssl

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._dec is not None:  # the session ended inside DATA: nothing is queued
            self._dec = self._denv = None
            if self.end == "drop":  # not a timeout or shutdown, which said so already
                self.end = "drop-in-data"
        if self._counted:
            self._counted = False
            self.service.release(self.ip)
            self.service.protocols.discard(self)
            self._log_session()
        if self._handler_coroutine is None:  # the direct path: no Task for aiosmtpd to cancel
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            asyncio.StreamReaderProtocol.connection_lost(self, error)
            self.transport = None
            self._buf.clear()
            return
        super().connection_lost(error)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._direct:
            self._pump()  # commands held back while the client did not read its replies

    def _log_session(self) -> None:
        took = time.monotonic() - self._started
        self.service.log(
            f"session {self.ip} {self.kind} helo={_printable(self.last_helo, 80)} "
            f"tls={'yes' if self.tls_used else 'no'} auth={_printable(self.last_auth, 80)} "
            f"messages={self.messages} rejected={self.rejected} time={took:.3f}s end={self.end}")

    def _create_session(self) -> QSession:
        return QSession(self.loop)

    def _close_with(self, reply: str, end: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply.encode() + b"\r\n")
            self.end = end
            self.transport.close()

    # One timer per session for both the idle timeout and the session time limit. aiosmtpd re-arms a
    # TimerHandle per command; here a command only records the time, and the timer re-arms itself
    # for whatever is left when it fires early.

    def _reset_timeout(self, duration: float | None = None) -> None:
        now = self.loop.time()
        self._last_activity = now
        if self._timeout_handle is None:
            self._session_end = now + self._session_limit if self._session_limit else float("inf")
            first = min(self._timeout_duration, self._session_end - now)
            self._timeout_handle = self.loop.call_later(first, self._timeout_cb)

    def _touch(self) -> None:
        self._last_activity = self.loop.time()

    def _timeout_cb(self) -> None:
        now = self.loop.time()
        if now >= self._session_end - 0.001:
            self._close_with(R_SESSION_TIME, "session-time")
            return
        left = min(self._last_activity + self._timeout_duration, self._session_end) - now
        if left > 0.001:
            self._timeout_handle = self.loop.call_later(left, self._timeout_cb)
            return
        self._close_with(R_TIMEOUT, "timeout")  # qmail's "451 timeout" before closing

    def shutdown(self, force: bool) -> None:
        """Called on SIGTERM: close now if idle (or when forced), else after the transaction."""
        if force or (not self._busy and (self.envelope is None or self.envelope.mail_from is None)):
            self._close_with(R_SHUTDOWN, "shutdown")

    def _send(self, status: str) -> None:
        """Write one reply now (nothing once the connection is closing); flow control is the caller's:
        :meth:`_pump` stops while the transport has paused us, :meth:`_flush` waits."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(REWRITE.get(status, status).encode("utf-8", "surrogateescape") + b"\r\n")

    async def _flush(self) -> None:
        transport = self.transport
        if (transport is not None and not transport.is_closing()
                and transport.get_write_buffer_size() > HIGH_WATER):  # a client that does not read
            await self._writer.drain()

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            status = REWRITE.get(status, status).encode("utf-8", "surrogateescape")
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection closed")
        transport.write(status + b"\r\n")
        if transport.get_write_buffer_size() > HIGH_WATER:  # a client that does not read its replies
            await self._writer.drain()

    # -- the direct path: commands run in data_received, without a Task or a StreamReader
    #
    # A session on port 25 costs aiosmtpd, per command, a StreamReader wake-up, a Task step and a
    # pass of the event loop between reading the line and answering it. Here data_received splits
    # the lines itself and runs the (synchronous) command at once; DATA is fed to the decoder as it
    # arrives and the queue's future answers it. Input that arrives meanwhile (pipelining) waits in
    # self._buf, and reading pauses when that holds more than READER_LIMIT bytes. STARTTLS, AUTH and
    # ETRN need aiosmtpd's coroutines: the session then moves, with what it has buffered, to the
    # command loop below for good (_to_stream). Sessions that must authenticate start there.

    def _pump(self) -> None:
        buf = self._buf
        while self._direct and not (self._held or self._paused):
            transport = self.transport
            if transport is None or transport.is_closing():  # nothing after a close is read
                buf.clear()
                return
            if self._dec is not None:
                if not buf:
                    break
                self._data_piece()
                continue
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > COMMAND_LIMIT + 1:  # too long already: drop it, answer at its end
                    self._skipping = True
                    buf.clear()
                break
            raw = bytes(buf[:nl + 1])
            del buf[:nl + 1]
            if self._skipping:
                self._skipping = False
                self._send(R_LINE_TOO_LONG)
                continue
            self._line(raw)
        if not self._direct:
            return
        blocked = self._held or self._paused
        if self._eof and not blocked:
            self._at_eof()
        elif blocked != self._read_paused and self.transport is not None:
            if not blocked:
                self._read_paused = False
                self.transport.resume_reading()
            elif len(buf) > READER_LIMIT:
                self._read_paused = True
                self.transport.pause_reading()

    def _line(self, raw: bytes) -> None:
        # qmail: a line ends at LF; one CR before it is removed
        line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        if len(line) > COMMAND_LIMIT:
            self._send(R_LINE_TOO_LONG)
            return
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        command = _DIRECT.get(verb)
        if command is None:
            if verb in _DISPATCH:
                self._to_stream(raw)
                return
            command = QmailSMTP._unimplemented
        try:
            command(self, arg.lstrip(b" ").decode("utf-8", "surrogateescape") or None)
        except Exception as error:
            self._send(self._internal_error(error))

    def _to_stream(self, raw: bytes) -> None:
        """Hand the session, from the command ``raw`` on, to the coroutine command loop."""
        self._direct = False
        reader = self._reader
        reader.feed_data(raw + bytes(self._buf))
        self._buf.clear()
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()
        if self._eof:
            reader.feed_eof()
        self._handler_coroutine = self.loop.create_task(self._handle_client(greet=False))

    def _at_eof(self) -> None:
        """The client has closed its side and everything before has been answered: close ours."""
        if self._dec is not None:
            self._dec = self._denv = None
            self.end = "drop-in-data"
            self._data_done()
        if self.transport is not None:
            self.transport.close()

    def _data_piece(self) -> None:
        """Feed the buffered DATA bytes, up to and including CRLF.CRLF, to the decoder."""
        buf = self._buf
        tail = self._dtail  # the last bytes fed (at first the CRLF that ended the DATA line)
        end = (tail + buf[:4]).find(_SEP)  # a terminator that began in what was fed already
        if end >= 0:
            end += 5 - len(tail)
        else:
            end = buf.find(_SEP)
            if end >= 0:
                end += 5
        dec = self._dec
        assert dec is not None
        if end < 0:
            piece = bytes(buf)
            buf.clear()
            self._dtail = (tail + piece[-4:])[-4:]
            dec.feed(piece)
            return
        piece = bytes(buf[:end])
        del buf[:end]
        env = self._denv
        self._dec = self._denv = None
        dec.feed(piece)
        if env is None or not self._verdict(dec):
            self._data_done()
            return
        self._held = True  # what the client sends next waits for this message's reply
        fut = self._start_queue(env, dec)
        fut.add_done_callback(lambda f: self._queued_direct(env, dec, f))

    def _queued_direct(self, env: Envelope, dec: pol.DataDecoder, fut: asyncio.Future) -> None:
        self._held = False
        self._queued(env, dec, fut)
        self._data_done()
        self._pump()

    # -- the command loop for STARTTLS/AUTH sessions (replaces aiosmtpd's: one readuntil per line,
    #    no per-line logging/timers)

    async def _handle_client(self, greet: bool = True) -> None:
        try:
            await self._command_loop(greet)
        finally:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    async def _command_loop(self, greet: bool = True) -> None:
        reader = self._reader
        if greet:
            await self.push(f"220 {self.hostname} ESMTP")
        try:
            while self.transport is not None and not self.transport.is_closing():
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError as e:
                    await self._skip_long_line(reader, e.consumed)
                    await self.push(R_LINE_TOO_LONG)
                    continue
                self._last_activity = self.loop.time()
                # qmail: a line ends at LF; one CR before it is removed
                line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
                if len(line) > COMMAND_LIMIT:
                    await self.push(R_LINE_TOO_LONG)
                    continue
                verb, _, arg = line.partition(b" ")
                handler = _DISPATCH.get(verb.upper())
                try:
                    if handler is None:
                        await self.smtp_unimplemented(None)
                    else:
                        await handler(self, arg.lstrip(b" ").decode("utf-8", "surrogateescape") or None)
                except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
                    raise
                except TLSSetupException:
                    self.end = "tls-failed"
                    self.transport.close()
                    return
                except Exception as error:
                    await self.push(await self.handle_exception(error))
        except asyncio.IncompleteReadError:
            pass  # the client closed its side
        except ConnectionError:
            if self.transport is not None:
                self.transport.close()

    async def _skip_long_line(self, reader: asyncio.StreamReader, consumed: int) -> None:
        await reader.read(consumed)
        while True:
            self._touch()
            try:
                await reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as e:
                await reader.read(e.consumed)

    def _chat(self) -> bool:
        """Count a command that moves no mail; False (after 421) when a session only chats."""
        self._chatter += 1
        if self._chatter > CHATTER_LIMIT:
            self._close_with(R_CHATTER, "chatter")
            return False
        return True

    async def handle_exception(self, error: Exception) -> str:
        return self._internal_error(error)

    def _internal_error(self, error: BaseException) -> str:
        what = f"{type(error).__name__}: {_printable(str(error))}"
        self.service.log(f"internal error: session {self.ip}: {what}")
        return R_INTERNAL

    # -- helpers

    def _tls_active(self) -> bool:
        return self.kind == "smtps" or self._tls_protocol is not None

    def _may_relay(self) -> bool:
        if self.session is not None and self.session.authenticated:
            return True
        policy = self.service.policy
        if self._relay_ip is None or self._relay_ip[0] is not policy:
            self._relay_ip = (policy, pol.client_may_relay(policy, self.ip))
        return self._relay_ip[1]

    def _addrparse(self, arg: str) -> str | None:
        control = self.service.policy.control
        liphost = None if "localiphost" in control.unset else control.localiphost
        return pol.addrparse(arg, self._local_ips, liphost)

    def _protocol_name(self) -> str:
        tls = self._tls_active()
        auth = bool(self.session and self.session.authenticated)
        if not tls and not auth:
            return "SMTP"  # qmail's word
        return "ESMTP" + ("S" if tls else "") + ("A" if auth else "")  # RFC 3848

    def _auth_needed(self) -> bool:
        """aiosmtpd's check_auth_needed without a coroutine: 530 (and True) before AUTH on submission."""
        if self._auth_required and not self.session.authenticated:
            self._send("530 5.7.0 Authentication required")
            return True
        return False

    # -- commands (qmail-smtpd's table). Each is a plain method that answers with _send, called by
    #    the direct path; the smtp_* coroutines of the command loop (and aiosmtpd) wrap them.

    def _helo(self, arg: str | None) -> None:
        if not self._chat():
            return
        self._hello(arg, extended=False)
        self._send(f"250 {self.hostname}")

    def _ehlo(self, arg: str | None) -> None:
        if not self._chat():
            return
        self._hello(arg, extended=True)
        lines = [self.hostname, "PIPELINING", "8BITMIME", f"SIZE {self.data_size_limit}",
                 "ENHANCEDSTATUSCODES", "ETRN"]
        if self.tls_context is not None and not self._tls_active():
            lines.append("STARTTLS")
        if self._tls_active():
            lines.append("AUTH PLAIN LOGIN")
        self._send("".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}")

    def _hello(self, arg: str | None, extended: bool) -> None:
        self._set_rset_state()
        s = self.session
        s.extended_smtp = extended
        s.helo = arg or ""
        s.host_name = arg or ""
        self.last_helo = s.helo

    def _rset(self, arg: str | None) -> None:
        if not self._chat():
            return
        self._set_rset_state()
        self._send("250 2.0.0 flushed")

    def _noop(self, arg: str | None) -> None:
        if self._chat():
            self._send("250 2.0.0 ok")

    def _vrfy(self, arg: str | None) -> None:
        if self._chat():
            self._send("252 2.0.0 send some mail, i'll try my best")

    def _help(self, arg: str | None) -> None:
        if self._chat():
            self._send("214 2.0.0 pqmail, a qmail-compatible mail server")

    def _quit(self, arg: str | None) -> None:
        self._send(f"221 2.0.0 {self.hostname}")
        self.end = "quit"
        self.transport.close()

    def _unimplemented(self, arg: str | None) -> None:
        self._bogus += 1
        if self._bogus > BOGUS_LIMIT:
            self._send(R_BOGUS)
            self.end = "bogus"
            self.transport.close()
            return
        self._send(R_UNIMPL)

    def _mail(self, arg: str | None) -> None:
        if self._auth_needed():
            return
        self.service.refresh()
        addr = self._addrparse(arg) if arg else None
        if addr is None:
            self._send(pol.R_SYNTAX)
            return
        m = _SIZE_PARAM.search(arg, arg.rfind(">") + 1)
        refusal = pol.check_mail_size(m.group(1) if m else None, self.data_size_limit)
        if refusal is not None:
            self.rejected += 1
            self._send(refusal)
            return
        self.envelope = env = Envelope()
        env.mail_from = addr
        self._send("250 2.1.0 ok")

    def _rcpt(self, arg: str | None) -> None:
        if self._auth_needed():
            return
        env = self.envelope
        if env is None or env.mail_from is None:
            self._send(pol.R_MAIL_FIRST)
            return
        addr = self._addrparse(arg) if arg else None
        if addr is None:
            self._send(pol.R_SYNTAX)
            return
        refusal = pol.check_rcpt(self.service.policy, env.mail_from, addr, self._may_relay(),
                                 len(env.rcpt_tos))
        if refusal is not None:
            self.rejected += 1
            self._send(refusal)
            return
        env.rcpt_tos.append(addr)
        self._send(pol.R_RCPT_OK)

    def _data_start(self) -> Envelope | None:
        """DATA's checks, then 354: the envelope of the message that follows, or None (answered)."""
        if self._auth_needed():
            return None
        env = self.envelope
        if env is None or env.mail_from is None:
            self._send(pol.R_MAIL_FIRST)
            return None
        if not env.rcpt_tos:
            self._send(pol.R_RCPT_FIRST)
            return None
        self._set_post_data_state()  # whatever happens next, a new MAIL is needed (qmail's seenmail = 0)
        self._busy = True
        self._send("354 go ahead")
        return env

    def _data(self, arg: str | None) -> None:
        env = self._data_start()
        if env is not None:
            self._dec = pol.DataDecoder(self.data_size_limit, self.service.policy.maxheaderbytes)
            self._denv = env
            self._dtail = b"\r\n"

    def _data_done(self) -> None:
        self._busy = False
        if self.service.stopping:
            self.shutdown(force=False)

    def _verdict(self, dec: pol.DataDecoder) -> bool:
        """After the terminator: True if the message may be queued, else False (answered)."""
        dec.finish()
        refusal = dec.verdict()
        if refusal is None:
            return True
        self.rejected += 1
        self._send(refusal)
        if dec.bare_lf:  # qmail closes after this one; it also ends any smuggling attempt
            self.end = "bare-lf"
            self.transport.close()
        return False

    def _start_queue(self, env: Envelope, dec: pol.DataDecoder) -> asyncio.Future:
        control = self.service.policy.control
        local = control.me if control.me else (self.local_ip or "unknown")
        received = pol.received_line(remote_ip=self.ip, local=local, helo=self.session.helo,
                                     when=time.time(), protocol=self._protocol_name())
        return self.service.enqueue(env.mail_from, env.rcpt_tos, [received, *dec.chunks])

    def _queued(self, env: Envelope, dec: pol.DataDecoder, fut: asyncio.Future) -> None:
        """Answer a message once the queue has: 250 only now that it is committed and durable."""
        svc = self.service
        try:
            mid = fut.result()
        except TemporaryFailure as e:
            svc.log(f"queue error: session {self.ip}: {_printable(str(e))}")
            self._send(R_QQ)
            return
        except PermanentFailure as e:
            self._send(f"554 5.3.0 {_printable(str(e))}")
            return
        except (Exception, asyncio.CancelledError) as error:
            self._send(self._internal_error(error))
            return
        self.messages += 1
        self._chatter = 0
        svc.log(f"msg {mid} accepted: from {self.ip} helo={_printable(self.session.helo, 80)} "
                f"sender=<{_printable(env.mail_from)}> rcpts={_rcpt_list(env.rcpt_tos)} "
                f"size={dec.size}")
        self._send(f"250 2.0.0 ok {int(time.time())} qp {mid}")

    # the coroutines of the command loop

    async def smtp_HELO(self, arg: str | None) -> None:
        self._helo(arg)
        await self._flush()

    async def smtp_EHLO(self, arg: str | None) -> None:
        self._ehlo(arg)
        await self._flush()

    async def smtp_RSET(self, arg: str | None) -> None:
        self._rset(arg)
        await self._flush()

    async def smtp_NOOP(self, arg: str | None) -> None:
        self._noop(arg)
        await self._flush()

    async def smtp_VRFY(self, arg: str | None) -> None:
        self._vrfy(arg)
        await self._flush()

    async def smtp_HELP(self, arg: str | None) -> None:
        self._help(arg)
        await self._flush()

    async def smtp_QUIT(self, arg: str | None) -> None:
        self._quit(arg)
        self._handler_coroutine.cancel()

    async def smtp_unimplemented(self, arg: str | None) -> None:
        self._unimplemented(arg)
        await self._flush()

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._mail(arg)
        await self._flush()

    async def smtp_RCPT(self, arg: str | None) -> None:
        self._rcpt(arg)
        await self._flush()

    async def smtp_DATA(self, arg: str | None) -> None:
        env = self._data_start()
        await self._flush()
        if env is None:
            return
        try:
            dec = pol.DataDecoder(self.data_size_limit, self.service.policy.maxheaderbytes)
            try:
                await read_data(self._reader, dec.feed, self._touch)
            except (asyncio.IncompleteReadError, ConnectionError):
                self.end = "drop-in-data"
                if self.transport is not None:
                    self.transport.close()
                return
            if not self._verdict(dec):
                return
            fut = self._start_queue(env, dec)
            await asyncio.wait((fut,))  # a cancelled session leaves the enqueue running (inflight)
            self._queued(env, dec, fut)
            await self._flush()
        finally:
            self._data_done()

    async def smtp_ETRN(self, arg: str | None) -> None:
        """RFC 1985: start the flush of a dial-up customer's Maildir (pqmail.serialmail.etrn)."""
        if not self._chat():
            return
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(None, handle_etrn, arg, self.ip, self.session.auth_box,
                                           self.service.root)
        self.service.log(f"etrn {self.ip} {_printable(arg or '', 80)}: {_printable(reply, 120)}")
        await self.push(reply)

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if not self._chat():
            return
        if self._tls_active():
            await self.push(R_TLS_ACTIVE)
            return
        if self.tls_context is None:
            await self.push(R_UNIMPL)
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str | None) -> None:
        if not self._chat():
            return
        await super().smtp_AUTH(arg)

    # -- AUTH (PLAIN and LOGIN; aiosmtpd's smtp_AUTH calls these with (self, args))

    async def _auth_plain(self, _server: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            blob = _b64(args[1])
            if blob is None:
                await self.push("501 5.5.2 cannot decode base64 (#5.5.2)")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            return await self._auth_failed()
        return await self._verify(parts[1], parts[2])

    async def _auth_login(self, _server: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if not isinstance(login, bytes):
                return AuthResult(success=False, handled=True)
        else:
            login = _b64(args[1])
            if login is None:
                await self.push("501 5.5.2 cannot decode base64 (#5.5.2)")
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._verify(login, password)

    async def _verify(self, login: bytes, password: bytes) -> AuthResult:
        try:
            box, pw = login.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            return await self._auth_failed()
        if not box or not pw:
            return await self._auth_failed()
        try:
            ok = await self.service.check_password(box, pw)
        except TemporaryFailure as e:
            self.service.log(f"auth error: session {self.ip}: password store: {_printable(str(e))}")
            await self.push(R_AUTH_TEMP)
            return AuthResult(success=False, handled=True)
        if not ok:
            self.last_auth = f"failed:{box}"
            return await self._auth_failed()
        self.session.auth_box = box
        self.last_auth = box
        return AuthResult(success=True, auth_data=box, message="235 2.7.0 authentication successful")

    async def _auth_failed(self) -> AuthResult:
        self._auth_failures += 1
        if self._auth_failures >= AUTH_FAILURES:
            await self.push(R_AUTH_TOO_MANY)
            self.end = "auth-failures"
            self.transport.close()
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=R_AUTH_FAILED)


_DISPATCH = {verb.encode(): getattr(QmailSMTP, "smtp_" + verb)
             for verb in ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP",
                          "STARTTLS", "AUTH", "ETRN")}
# The commands the direct path runs itself; the rest of _DISPATCH moves a session to the command loop.
_DIRECT: dict[bytes, Callable[[QmailSMTP, str | None], None]] = {
    verb.encode(): getattr(QmailSMTP, "_" + verb.lower())
    for verb in ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP")}


def _b64(text: str) -> bytes | None:
    try:
        return b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


def _rcpt_list(rcpts: list[str], limit: int = 10) -> str:
    shown = ",".join(f"<{_printable(r, 120)}>" for r in rcpts[:limit])
    return shown + (f",...({len(rcpts)} in all)" if len(rcpts) > limit else "")


_IP_TEXT: dict[str, str] = {}  # address as the socket gives it -> canonical text (ipaddress is slow)


def _ip_text(sockaddr: Any) -> str:
    if isinstance(sockaddr, tuple) and sockaddr:
        raw = str(sockaddr[0])
        text = _IP_TEXT.get(raw)
        if text is None:
            try:
                text = pol.canonical_ip(raw)
            except ValueError:
                text = raw
            if len(_IP_TEXT) >= 4096:
                _IP_TEXT.clear()
            _IP_TEXT[raw] = text
        return text
    return "unknown"


# ----------------------------------------------------------------------------- DATA reading

_SEP = b"\r\n.\r\n"


def _partial_sep(tail: bytes) -> int:
    """How many bytes at the end of ``tail`` could begin the terminator CRLF.CRLF (0..4)."""
    for k in (4, 3, 2, 1):
        if tail.endswith(_SEP[:k]):
            return k
    return 0


async def read_data(reader: asyncio.StreamReader, feed: Callable[[bytes], None],
                    touch: Callable[[], None]) -> None:
    """Read DATA up to and including CRLF.CRLF, passing every byte to ``feed``; nothing beyond it.

    Pipelined commands after the terminator stay in ``reader``. The stream is taken as if it began
    with the CRLF that ended the DATA command, so an empty message (``.`` CRLF at once) ends it too.
    When what was read so far ends with a possible beginning of the terminator, only as many bytes
    as would complete it are read (the client owes us at least those); otherwise ``readuntil`` finds
    the terminator in one call for a message that fits in the buffer. Raises IncompleteReadError
    when the client goes away first.
    """
    tail = b"\r\n"
    while True:
        touch()
        k = _partial_sep(tail)
        if k:
            more = await reader.readexactly(5 - k)
            feed(more)
            window = tail + more
            if window.endswith(_SEP):
                return
            tail = window[-4:]
            continue
        try:
            piece = await reader.readuntil(_SEP)
        except asyncio.LimitOverrunError as e:
            piece = await reader.read(e.consumed)
            feed(piece)
            tail = (tail + piece)[-4:]
            continue
        feed(piece)
        return


# ----------------------------------------------------------------------------- serving

def _quiet_aiosmtpd() -> None:
    """aiosmtpd logs per command and warns about its own deprecations; we log one line a session."""
    lg = logging.getLogger("mail.log")
    lg.setLevel(logging.CRITICAL + 1)
    lg.propagate = False
    lg.addHandler(logging.NullHandler())


def _exception_handler(log: Callable[[str], None]) -> Callable[[asyncio.AbstractEventLoop, dict], None]:
    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        what = f"{type(exc).__name__}: {exc}" if exc is not None else ""
        log(f"internal error: {_printable(context.get('message', 'asyncio'))} {_printable(what)}".rstrip())
    return handle


async def _serve(root: Root, listeners: Iterable[tuple[str, socket.socket]],
                 log: Callable[[str], None] | None, sessions: SessionCounter | None) -> None:
    loop = asyncio.get_running_loop()
    if log is None:
        log = _LoopLog(loop)
    loop.set_exception_handler(_exception_handler(log))
    service = SmtpService(root, log, sessions)
    listeners = list(listeners)
    servers: list[asyncio.base_events.Server] = []
    handshake = float(min(60, max(1, service.policy.control.timeoutsmtpd)))
    for kind, sock in listeners:
        if kind not in ("smtp", "submission", "smtps"):
            raise ConfigError("serve_listeners", f"unknown listener kind {kind!r}")
        tls = None
        if kind == "smtps":
            tls = service.tls.front
            if tls is None:
                log(f"warning: smtps listener disabled: {root.control_file('servercert.pem')} is missing")
                continue
        if kind == "submission" and service.tls.front is None:
            log("warning: submission without control/servercert.pem: no STARTTLS, so no AUTH")
        servers.append(await loop.create_server(
            lambda kind=kind: QmailSMTP(service, kind, loop), sock=sock, ssl=tls, backlog=1024,
            ssl_handshake_timeout=handshake if tls else None))
    if isinstance(log, _LoopLog):
        log.flush()  # the start-up lines, before anything can go wrong
    if not servers:
        raise ConfigError(str(root.control_file("servercert.pem")), "missing; no listener can serve")

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload)
    loop.add_signal_handler(signal.SIGALRM, lambda: None)  # serve forwards SIGALRM to every service
    await stop.wait()

    service.stopping = True
    for srv in servers:
        srv.close()
    for proto in list(service.protocols):
        proto.shutdown(force=False)
    deadline = loop.time() + STOP_GRACE
    while service.protocols and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for proto in list(service.protocols):
        proto.shutdown(force=True)
    if service.inflight:
        await asyncio.gather(*service.inflight, return_exceptions=True)
    await asyncio.sleep(0)  # let connection_lost callbacks log their sessions
    service.close()
    if isinstance(log, _LoopLog):
        log.flush()


def serve_listeners(root: Root | str | os.PathLike[str], listeners: Iterable[tuple[str, socket.socket]],
                    log: Callable[[str], None] | None = None,
                    sessions: SessionCounter | None = None) -> None:
    """Serve SMTP on bound, listening, non-blocking sockets until SIGTERM/SIGINT; then return.

    ``listeners`` pairs a kind (``smtp``, ``submission`` or ``smtps``) with a socket. Runs its own
    asyncio loop; call it in the process that will serve (after fork and privilege drop). Raises
    ConfigError when control/ is unusable at start. ``sessions`` is this worker's share of a
    SessionTable when several processes serve the same sockets (the limits then count them all).
    """
    root = root if isinstance(root, Root) else Root(root)
    _quiet_aiosmtpd()
    aio.run(_serve(root, listeners, log, sessions))
