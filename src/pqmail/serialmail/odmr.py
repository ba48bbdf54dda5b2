"""ODMR (RFC 2645, On-Demand Mail Relay): a customer without a fixed address fetches its mail by SMTP.

The customer's host connects to port 366 (``pqmail serialmail odmrd``; not as root the default is
127.0.0.1:2366), says ``EHLO``, authenticates, and sends ``ATRN [domain[,domain...]]``. When mail is
waiting we answer ``250`` and the roles turn on the same connection: the customer's side now sends an SMTP
greeting and pqmail, as the SMTP client, delivers the customer's dial-up Maildir over it exactly as a
scheduled flush would (:func:`pqmail.serialmail.flush.transfer`, under the customer's lock), then QUITs.

Credentials: the login is the dial-up domain and the secret is the one ``pqmail serialmail passwd DOMAIN``
stored in ``users/poppasswd`` under that name. ``AUTH CRAM-MD5`` (what fetchmail uses for ODMR) needs the
secret itself, so the default is to store it as ``{PLAIN}secret`` (the file is mode 0600); a secret stored
hashed (``--hashed``) still works with ``AUTH PLAIN`` and ``AUTH LOGIN``. A login may ask for its own
domain only; ``ATRN`` without a list means that domain.

Replies to ATRN: ``250`` turning around; ``450`` refused (not this login's domain, not a dial-up customer
here, or a transfer for it already under way); ``451`` unable to process it now (our configuration
failed); ``453`` no mail; ``530`` before AUTH. Every other command but EHLO, AUTH and QUIT gets ``502``.

The protocol is :class:`OdmrProtocol`, without I/O: it takes command lines and returns events (replies to
send, a credential to check, an ATRN to carry out, the end). The asyncio layer does the checks (argon2 in
a thread), the locks and the transfer.

What it trusts: the password store and provisioning's files. Nothing the client sends: lines are bounded
(512 bytes), sessions idle out, AUTH failures are counted (3, then 421), sessions are limited in number.
What it never does: run as root (the CLI and ``pqmail serve`` drop privileges first), deliver a domain the
login does not own, or run two transfers for one customer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import argon2.exceptions  # noqa: F401  (every import is at the top: the server runs after a privilege drop)

from pqmail.config.casefold import ascii_lower
from pqmail.config.control import load_control
from pqmail.errors import PqmailError
from pqmail.hashes import plain_secret, verify_secret
from pqmail.passwords import PasswordStore
from pqmail.paths import Root
from pqmail.queue.store import Queue
from pqmail.serialmail.flush import DirLock, Job, SmtpIO, finish, finish_interrupted, transfer
from pqmail.serialmail.runner import find_dialups, load_settings

__all__ = ["Atrn", "Close", "OdmrProtocol", "Reply", "Verify", "check_secret", "serve_odmr_listeners"]

Log = Callable[[str], None]

LINE_MAX = 512  # RFC 5321 §4.5.3.1.4, command line with CRLF
AUTH_FAILURES = 3
BOGUS_LIMIT = 20  # unknown or misplaced commands before 421
IDLE_TIMEOUT = 300.0
MAX_SESSIONS = 100
STOP_GRACE = 45.0


# ----------------------------------------------------------------------------- events

@dataclass(frozen=True)
class Reply:
    """Send these bytes (one or more CRLF-ended reply lines)."""

    data: bytes


@dataclass(frozen=True)
class Verify:
    """Check a credential, then call :meth:`OdmrProtocol.verified`.

    ``mechanism`` PLAIN or LOGIN: ``secret`` is the password. CRAM-MD5: ``secret`` is the client's hex
    digest of ``challenge``.
    """

    mechanism: str
    login: str
    secret: str
    challenge: bytes = b""


@dataclass(frozen=True)
class Atrn:
    """Carry out ATRN for ``login``, then call :meth:`OdmrProtocol.atrn_done` with the reply."""

    login: str
    domains: tuple[str, ...]


@dataclass(frozen=True)
class Close:
    """Close the connection (after sending any reply before it)."""


Event = Reply | Verify | Atrn | Close


def _r(*lines: str) -> Reply:
    return Reply("".join(f"{line}\r\n" for line in lines).encode("ascii", "replace"))


def _b64decode(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


# ----------------------------------------------------------------------------- the protocol (no I/O)

class OdmrProtocol:
    """The server side of ODMR up to the turn, as a state machine over command lines.

    States: ``command`` (reading commands), ``auth-plain``/``auth-login-user``/``auth-login-pass``/
    ``auth-cram`` (reading a SASL response line), ``verifying`` and ``atrn`` (waiting for the caller),
    ``turned`` (the caller now runs SMTP as the client), ``closed``.
    """

    def __init__(self, hostname: str, challenge: Callable[[], bytes] | None = None) -> None:
        self.hostname = hostname
        self.state = "command"
        self.helo: str | None = None
        self.login: str | None = None
        self.auth_failures = 0
        self.bogus = 0
        self._challenge_factory = challenge or self._make_challenge
        self._pending_user = ""
        self._challenge = b""

    def _make_challenge(self) -> bytes:
        return f"<{secrets.randbelow(10**12)}.{int(time.time())}@{self.hostname}>".encode("ascii", "replace")

    def greeting(self) -> Reply:
        return _r(f"220 {self.hostname} ODMR service ready")

    # -- input

    def receive_line(self, line: bytes) -> list[Event]:
        """One line from the client (with or without its CRLF)."""
        if self.state in ("verifying", "atrn", "turned", "closed"):
            raise RuntimeError(f"receive_line in state {self.state}")
        if len(line) > LINE_MAX:
            return self._bogus(_r("500 5.5.2 line too long"))
        text = line.rstrip(b"\r\n").decode("latin-1")
        if self.state.startswith("auth-"):
            return self._sasl(text)
        verb, _, arg = text.partition(" ")
        handler = {"EHLO": self._ehlo, "AUTH": self._auth, "ATRN": self._atrn,
                   "QUIT": self._quit}.get(verb.upper())
        if handler is None:
            return self._bogus(_r("502 5.5.1 command not implemented"))
        return handler(arg.strip())

    def _bogus(self, reply: Reply) -> list[Event]:
        self.bogus += 1
        if self.bogus > BOGUS_LIMIT:
            self.state = "closed"
            return [_r("421 4.7.0 too many errors; closing"), Close()]
        return [reply]

    def _ehlo(self, arg: str) -> list[Event]:
        if not arg:
            return self._bogus(_r("501 5.5.4 syntax: EHLO hostname"))
        self.helo = arg
        return [_r(f"250-{self.hostname}", "250-AUTH CRAM-MD5 PLAIN LOGIN", "250-ENHANCEDSTATUSCODES",
                   "250 ATRN")]

    def _quit(self, arg: str) -> list[Event]:
        self.state = "closed"
        return [_r(f"221 2.0.0 {self.hostname} closing"), Close()]

    # -- AUTH

    def _auth(self, arg: str) -> list[Event]:
        if self.helo is None:
            return self._bogus(_r("503 5.5.1 send EHLO first"))
        if self.login is not None:
            return self._bogus(_r("503 5.5.1 already authenticated"))
        parts = arg.split()
        if not parts or len(parts) > 2:
            return self._bogus(_r("501 5.5.4 syntax: AUTH mechanism [initial-response]"))
        mech = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        if mech == "PLAIN":
            if initial is None:
                self.state = "auth-plain"
                return [_r("334 ")]
            return self._plain(initial)
        if mech == "LOGIN":
            if initial is None:
                self.state = "auth-login-user"
                return [_r("334 VXNlcm5hbWU6")]
            self.state = "auth-login-user"
            return self._sasl(initial)
        if mech == "CRAM-MD5" and initial is None:
            self._challenge = self._challenge_factory()
            self.state = "auth-cram"
            return [_r("334 " + base64.b64encode(self._challenge).decode("ascii"))]
        return self._bogus(_r("504 5.5.4 unsupported authentication mechanism"))

    def _sasl(self, text: str) -> list[Event]:
        state, self.state = self.state, "command"
        if text.strip() == "*":
            return [_r("501 5.0.0 authentication cancelled")]
        if state == "auth-plain":
            return self._plain(text)
        blob = _b64decode(text)
        if blob is None:
            return [_r("501 5.5.2 cannot decode base64")]
        decoded = blob.decode("utf-8", "replace")
        if state == "auth-login-user":
            self._pending_user = decoded
            self.state = "auth-login-pass"
            return [_r("334 UGFzc3dvcmQ6")]
        if state == "auth-login-pass":
            return self._verify("LOGIN", self._pending_user, decoded)
        user, _, digest = decoded.rpartition(" ")  # auth-cram: "user hexdigest"
        return self._verify("CRAM-MD5", user, digest, self._challenge)

    def _plain(self, text: str) -> list[Event]:
        blob = _b64decode(text)
        if blob is None:
            return [_r("501 5.5.2 cannot decode base64")]
        parts = blob.split(b"\0")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            return self._failed()
        return self._verify("PLAIN", parts[1].decode("utf-8", "replace"), parts[2].decode("utf-8", "replace"))

    def _verify(self, mechanism: str, login: str, secret: str, challenge: bytes = b"") -> list[Event]:
        if not login or not secret:
            return self._failed()
        self.state = "verifying"
        return [Verify(mechanism, login, secret, challenge)]

    def verified(self, login: str | None) -> list[Event]:
        """The caller's verdict on the last :class:`Verify`: the login, or None when it failed."""
        self.state = "command"
        if login is None:
            return self._failed()
        self.login = login
        return [_r("235 2.7.0 authentication successful")]

    def _failed(self) -> list[Event]:
        self.state = "command"
        self.auth_failures += 1
        if self.auth_failures >= AUTH_FAILURES:
            self.state = "closed"
            return [_r("421 4.7.0 too many authentication failures"), Close()]
        return [_r("535 5.7.8 authentication failed")]

    # -- ATRN

    def _atrn(self, arg: str) -> list[Event]:
        if self.login is None:
            return self._bogus(_r("530 5.7.0 authentication required"))
        domains = tuple(ascii_lower(d.strip()).rstrip(".") for d in arg.split(",")) if arg else ()
        if any(not d or any(c.isspace() for c in d) for d in domains):
            return self._bogus(_r("501 5.5.4 syntax: ATRN [domain[,domain...]]"))
        self.state = "atrn"
        return [Atrn(self.login, domains or (ascii_lower(self.login),))]

    def atrn_done(self, code: int, text: str) -> list[Event]:
        """The caller's answer to the last :class:`Atrn`; with 250 the connection is turned."""
        self.state = "turned" if code == 250 else "command"
        return [_r(f"{code} {text}")]


# ----------------------------------------------------------------------------- credentials

def check_secret(stored: str, v: Verify) -> bool:
    """Whether ``v`` proves knowledge of the secret ``stored`` (a ``{PLAIN}`` secret or a hash)."""
    if v.mechanism == "CRAM-MD5":
        plain = plain_secret(stored)
        if plain is None:
            return False  # CRAM-MD5 needs the secret itself
        expect = hmac.new(plain.encode("utf-8", "surrogateescape"), v.challenge, hashlib.md5).hexdigest()
        return hmac.compare_digest(expect, v.secret.strip().lower())
    return verify_secret(stored, v.secret)  # {PLAIN} or any hash; False for a malformed one


def _lookup_and_check(root: Root, v: Verify) -> str | None:
    login = ascii_lower(v.login)
    rec = PasswordStore(root).get(login)
    if rec is None or not check_secret(rec[0], v):
        return None
    return login


# ----------------------------------------------------------------------------- ATRN: locks and mail

@dataclass
class _Turn:
    code: int
    text: str
    locks: list
    jobs: list


def _reserve(root: Root, login: str, domains: tuple[str, ...], lifetime: int, log: Log) -> _Turn:
    """Lock every requested customer and find its mail; release everything unless the answer is 250."""
    try:
        dialups = {d.domain: d.dir for d in find_dialups(root)}
    except (PqmailError, OSError) as e:
        log(f"odmr: unable to read the dial-up customers: {e}")
        return _Turn(451, "4.3.0 Unable to process ATRN request now", [], [])
    dirs: list[Path] = []
    for d in domains:
        if d != login:
            return _Turn(450, f"4.7.1 ATRN request refused: {login} may not ask for {d}", [], [])
        if d not in dialups:
            return _Turn(450, f"4.7.1 ATRN request refused: {d} is not a dial-up customer here", [], [])
        dirs.append(dialups[d])
    locks = []
    try:
        for d in dirs:
            lock = DirLock.try_lock(d)
            if lock is None:
                raise _Busy(d.name)
            locks.append(lock)
        jobs = [Job.for_dir(d, lifetime=lifetime) for d in dirs]
        if sum(job.prepare(log) for job in jobs) == 0:
            raise _NoMail
    except _Busy as e:
        _release(locks)
        return _Turn(450, f"4.4.5 ATRN request refused: a transfer for {e} is already under way", [], [])
    except _NoMail:
        _release(locks)
        return _Turn(453, "4.4.5 You have no mail", [], [])
    except (PqmailError, OSError) as e:
        _release(locks)
        log(f"odmr: {login}: {e}")
        return _Turn(451, "4.3.0 Unable to process ATRN request now", [], [])
    return _Turn(250, "2.0.0 OK now reversing the connection", locks, jobs)


class _Busy(Exception):
    pass


class _NoMail(Exception):
    pass


def _release(locks: Iterable) -> None:
    for lock in locks:
        lock.release()


# ----------------------------------------------------------------------------- asyncio layer

class OdmrService:
    """Per-process state of the ODMR server: the tree, its settings, the sessions."""

    def __init__(self, root: Root, log: Log) -> None:
        self.root = root
        self.log = log
        self.control = load_control(root)
        self.queue = Queue(root.queue)
        self.lifetime = load_settings(root).lifetime
        self.hostname = self.control.me or socket.gethostname()
        self.sessions: set[asyncio.Task] = set()
        self.stopping = False

    def reload(self) -> None:
        try:
            self.control = load_control(self.root)
            self.lifetime = load_settings(self.root).lifetime
        except PqmailError as e:
            self.log(f"odmr: reload failed, keeping the old settings: {e}")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.sessions.add(task)
        peer = writer.get_extra_info("peername") or ("?",)
        ip = str(peer[0])
        try:
            if len(self.sessions) > MAX_SESSIONS or self.stopping:
                writer.write(b"421 4.3.2 too many sessions, try again later\r\n")
                return
            await self._session(reader, writer, ip)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self.sessions.discard(task)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip: str) -> None:
        proto = OdmrProtocol(self.hostname)
        writer.write(proto.greeting().data)
        while proto.state == "command" or proto.state.startswith("auth-"):
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), IDLE_TIMEOUT)
            except asyncio.LimitOverrunError:
                writer.write(b"500 5.5.2 line too long\r\n")
                return
            except TimeoutError:
                writer.write(b"421 4.4.2 idle too long; closing\r\n")
                return
            events = proto.receive_line(line)
            if not await self._run(proto, events, reader, writer, ip):
                return

    async def _run(self, proto: OdmrProtocol, events: list[Event], reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter, ip: str) -> bool:
        """Carry out events (and those they lead to); False when the session is over."""
        queue = list(events)
        while queue:
            ev = queue.pop(0)
            if isinstance(ev, Reply):
                writer.write(ev.data)
                await writer.drain()
            elif isinstance(ev, Close):
                return False
            elif isinstance(ev, Verify):
                login = await asyncio.to_thread(self._check, ev)
                self.log(f"odmr: {ip}: AUTH {ev.mechanism} {'ok' if login else 'failed'} "
                         f"for {''.join(c if c.isprintable() else '?' for c in ev.login[:80])}")
                queue[:0] = proto.verified(login)
            elif isinstance(ev, Atrn):
                turn = await asyncio.to_thread(_reserve, self.root, ev.login, ev.domains, self.lifetime,
                                               self.log)
                self.log(f"odmr: {ip}: ATRN {','.join(ev.domains)} by {ev.login}: {turn.code}")
                queue[:0] = proto.atrn_done(turn.code, turn.text)
                if turn.code == 250:
                    for rest in queue:
                        if isinstance(rest, Reply):
                            writer.write(rest.data)
                    await writer.drain()
                    await self._turn(turn, reader, writer, ip)
                    return False
        return True

    def _check(self, v: Verify) -> str | None:
        try:
            return _lookup_and_check(self.root, v)
        except (PqmailError, OSError) as e:
            self.log(f"odmr: password store: {e}")
            return None

    async def _turn(self, turn: _Turn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    ip: str) -> None:
        """Roles reversed: we are the SMTP client on this connection until QUIT."""
        try:
            await transfer(SmtpIO(reader, writer, ip), turn.jobs, control=self.control, queue=self.queue,
                           log=self.log)
        except asyncio.CancelledError:  # stopping after the grace period: say so in LASTTRANSFER
            for job in turn.jobs:
                finish_interrupted(job, self.log)
            raise
        else:
            for job in turn.jobs:
                await asyncio.to_thread(finish, job, self.log)
        finally:
            _release(turn.locks)


async def _serve(root: Root, listeners: Iterable[tuple[str, socket.socket]], log: Log,
                 ready: Callable[[], None] | None) -> None:
    loop = asyncio.get_running_loop()
    service = OdmrService(root, log)
    servers = []
    for kind, sock in listeners:
        if kind != "odmr":
            raise PqmailError(f"serve_odmr_listeners: unknown listener kind {kind!r}")
        servers.append(await asyncio.start_server(service.handle, sock=sock, limit=LINE_MAX * 16))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload)
    loop.add_signal_handler(signal.SIGALRM, lambda: None)  # serve forwards SIGALRM to every service
    if ready is not None:
        ready()
    await stop.wait()
    service.stopping = True
    for srv in servers:
        srv.close()
    if service.sessions:  # transfers in progress finish; their files stay safe if they cannot
        await asyncio.wait(list(service.sessions), timeout=STOP_GRACE)
    for task in list(service.sessions):
        task.cancel()
    service.queue.close()


def _stderr_log(line: str) -> None:
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


def serve_odmr_listeners(root: Root | str | os.PathLike[str], listeners: Iterable[tuple[str, socket.socket]],
                         log: Log | None = None, ready: Callable[[], None] | None = None) -> None:
    """Serve ODMR on bound, listening sockets (kind ``odmr``) until SIGTERM/SIGINT, then return.

    Call it in the process that serves, after the fork and the privilege drop (pqmail serve's
    service function, or ``pqmail serialmail odmrd``).
    """
    root = root if isinstance(root, Root) else Root(root)
    asyncio.run(_serve(root, listeners, log or _stderr_log, ready))
