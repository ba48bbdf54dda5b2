"""The remote delivery engine: what the queue manager calls to send one message to one domain.

:meth:`RemoteEngine.deliver` takes a host (the recipients' domain), the envelope sender, the recipients
for that host and the queued message file, and returns one :class:`RemoteResult` per recipient, in
order: ``K`` delivered, ``Z`` try again later, ``D`` bounce, each with qmail-remote's report and the
host and address tried. It resolves the host (:mod:`pqmail.remote.mx`), then tries the addresses in
order until one takes the transaction (:mod:`pqmail.remote.client`): an address that refuses the
connection, times out, or fails the greeting, HELO or a required STARTTLS is skipped for the next one;
once a transaction has started, its replies decide.

It keeps connections: after a transaction the session stays open for a few seconds, and the next
message for the same (address, port, TLS mode) reuses it, starting with RSET (pipelined with the next
transaction when the server offers PIPELINING); one found dead then is replaced at once. At most
``per_host`` sessions are open to one address at a time (further deliveries wait for one), and at most
``MAX_IDLE`` idle sessions in all. qmail's tcpto rule skips an address whose connects timed out twice lately.

Control files, re-read when they change (looked at once a second at most): ``resolvers``,
``tlsroutes``, ``ipme``, ``notipme`` (see mx.py and client.py) and ``remoteport``, the port for MX and
A deliveries (default 25; smtproutes ports override it), which test set-ups and port-redirecting
firewalls need.

Trusts: the queue's message file and the configuration. Never: raises for a delivery problem (any
error, even an internal one, becomes Z or D), delivers to this host through MX, or writes a file.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pqmail.config.control import Control, read_lines_or_none, read_value
from pqmail.errors import ConfigError
from pqmail.paths import Root
from pqmail.remote.client import (
    NO_CONNECTION,
    PARTIAL_LINE,
    Outcome,
    Refusal,
    Session,
    Settings,
    TlsContexts,
    Wire,
    combine,
    parse_tlsroutes,
    prepare_message,
    tls_mode_for,
)
from pqmail.remote.mx import (
    SMTP_PORT,
    DnsClient,
    Mine,
    Target,
    interface_networks,
    mine_from,
    parse_networks,
    parse_resolvers,
    resolve,
)

MAX_RCPTS = 100  # RFC 5321 §4.5.3.1.8: every server takes at least 100 recipients per transaction
PER_HOST = 20  # sessions open to one address at once (Postfix's default destination concurrency)
IDLE_TIMEOUT = 5.0  # seconds an unused session stays open for the next message
MAX_AGE = 300.0  # a session older than this is not reused (Postfix's connection reuse time limit)
MAX_IDLE = 100  # idle sessions kept in all
INTERFACES_TTL = 60.0  # seconds between reads of this host's interface addresses
CLOSE_WAIT = 2.0  # seconds close() waits for sessions to finish closing
BIG_MESSAGE = 256 * 1024  # read larger messages off the event loop
EXTRA_FILES = ("resolvers", "tlsroutes", "ipme", "notipme", "remoteport")
EXTRA_RECHECK = 1.0  # seconds between looks at whether those files changed


@dataclass(frozen=True)
class RemoteResult:
    """One recipient's result: ``status`` "K", "Z" or "D", qmail-remote's report, the host(s) tried."""

    status: str
    report: str
    host_tried: str = ""


# ----------------------------------------------------------------------------- tcpto

class TcpTo:
    """qmail's tcpto.c: skip an address whose connects timed out twice, for a while.

    A time-out counts when none was counted in the two minutes before; any connect that does not time
    out (success or refusal) clears the address. With two or more, the address is skipped for
    ``backoff`` seconds after the last time-out ((60 + pid mod 32) * 64 s in qmail, 64-97 minutes).
    """

    def __init__(self, backoff: float | None = None, size: int = 1024) -> None:
        self.backoff = backoff if backoff is not None else float((60 + (os.getpid() & 31)) << 6)
        self.size = size
        self._errors: dict[str, tuple[int, float]] = {}

    def skip(self, address: str, now: float) -> bool:
        count, when = self._errors.get(address, (0, 0.0))
        return count >= 2 and now - when < self.backoff

    def record(self, address: str, timed_out: bool, now: float) -> None:
        if not timed_out:
            self._errors.pop(address, None)
            return
        count, when = self._errors.get(address, (0, 0.0))
        if count and now < when + 120:
            return
        self._errors[address] = (min(count + 1, 10), now)
        if len(self._errors) > self.size:
            del self._errors[min(self._errors, key=lambda a: self._errors[a][1])]


def prefer_idle(targets: Sequence[Target], has_idle: Callable[[Target], bool]) -> list[Target]:
    """Within each preference, targets with an idle session first (else the shuffled order stays)."""
    return sorted(targets, key=lambda t: (t.preference, not has_idle(t)))


def chunks(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)] or [items]


# ----------------------------------------------------------------------------- the pool

@dataclass
class _Slot:
    idle: list[Session] = field(default_factory=list)
    count: int = 0  # sessions open (idle or busy) plus connects under way
    waiters: list[asyncio.Future] = field(default_factory=list)


Key = tuple[str, int, str]  # address, port, TLS mode


class _Pool:
    """Open sessions by (address, port, TLS mode), capped per key, reused until idle or old."""

    def __init__(self, per_host: int, idle_timeout: float, max_idle: int = MAX_IDLE,
                 max_age: float = MAX_AGE) -> None:
        self.per_host = max(1, per_host)
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.max_age = max_age
        self.closed = False
        self._slots: dict[Key, _Slot] = {}
        self._keys: dict[Session, Key] = {}
        self._idle: OrderedDict[Session, None] = OrderedDict()  # oldest first, for MAX_IDLE

    def has_idle(self, key: Key) -> bool:
        slot = self._slots.get(key)
        return bool(slot and slot.idle)

    async def acquire(self, key: Key, opener: Callable[[], Awaitable[Session | Refusal]]
                      ) -> Session | Refusal:
        """An idle session for ``key`` (its transaction starts with RSET), else a new one."""
        while True:
            slot = self._slots.setdefault(key, _Slot())  # afresh each time: _drop may delete it
            if slot.idle:
                session = slot.idle.pop()  # the most recently used: least likely to be stale
                self._idle.pop(session, None)
                if session.alive and time.monotonic() - session.opened < self.max_age:
                    return session
                self._drop(session)
                continue
            if slot.count < self.per_host:
                slot.count += 1
                try:
                    result = await opener()
                except BaseException:
                    self._release_slot(key)
                    raise
                if isinstance(result, Refusal):
                    self._release_slot(key)
                else:
                    self._keys[result] = key
                return result
            await self._wait(slot)

    async def _wait(self, slot: _Slot) -> None:
        fut = asyncio.get_running_loop().create_future()
        slot.waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._wake(slot)  # pass the wake-up on
            raise
        finally:
            if fut in slot.waiters:
                slot.waiters.remove(fut)

    def release(self, session: Session, reusable: bool) -> None:
        key = self._keys.get(session)
        if key is None:
            session.close()
            return
        slot = self._slots.get(key)
        if slot is None or not reusable or self.closed or not session.alive:
            self._drop(session)
            return
        session.idle_since = time.monotonic()
        slot.idle.append(session)
        self._idle[session] = None
        asyncio.get_running_loop().call_later(self.idle_timeout, self._expire, session, session.idle_since)
        while len(self._idle) > self.max_idle:
            self._evict(next(iter(self._idle)))
        self._wake(slot)

    def close(self) -> list[Session]:
        """Close the idle sessions (those in use close when released); returns those closed."""
        self.closed = True
        sessions = list(self._idle)
        for session in sessions:
            self._evict(session)
        return sessions

    def _expire(self, session: Session, since: float) -> None:
        if session in self._idle and session.idle_since == since:
            self._evict(session)

    def _evict(self, session: Session) -> None:
        self._idle.pop(session, None)
        slot = self._slots.get(self._keys.get(session, ("", 0, "")))
        if slot is not None and session in slot.idle:
            slot.idle.remove(session)
        self._drop(session)

    def _drop(self, session: Session) -> None:
        session.close()
        key = self._keys.pop(session, None)
        if key is not None:
            self._release_slot(key)

    def _release_slot(self, key: Key) -> None:
        slot = self._slots.get(key)
        if slot is None:
            return
        slot.count -= 1
        if slot.count <= 0 and not slot.waiters and not slot.idle:
            del self._slots[key]
        else:
            self._wake(slot)

    @staticmethod
    def _wake(slot: _Slot) -> None:
        while slot.waiters:
            fut = slot.waiters.pop(0)
            if not fut.done():
                fut.set_result(None)
                return


# ----------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class _Extra:
    resolvers: tuple[tuple[str, int], ...] | None
    tlsroutes: dict[str, str]
    ipme: tuple
    notipme: tuple
    port: int


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(path, f"unable to read: {e.strerror or e}") from None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def load_extra(control_dir: Path) -> _Extra:
    """The control files only remote delivery reads; ConfigError names the file and line."""
    resolvers = read_lines_or_none(control_dir / "resolvers")
    port_text = read_value(control_dir / "remoteport")
    port = SMTP_PORT
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
            raise ConfigError(control_dir / "remoteport", f"bad port {port_text!r} (want 1-65535)", 1)
        port = int(port_text)
    return _Extra(
        resolvers=None if resolvers is None else tuple(parse_resolvers(resolvers, control_dir / "resolvers")),
        tlsroutes=parse_tlsroutes(read_lines_or_none(control_dir / "tlsroutes") or [],
                                  control_dir / "tlsroutes"),
        ipme=tuple(parse_networks(read_lines_or_none(control_dir / "ipme") or [], control_dir / "ipme")),
        notipme=tuple(parse_networks(read_lines_or_none(control_dir / "notipme") or [],
                                     control_dir / "notipme")),
        port=port,
    )


# ----------------------------------------------------------------------------- the engine

class RemoteEngine:
    """Remote delivery for one queue manager (one event loop). ``close()`` when done."""

    def __init__(self, control_loader: Callable[[], Control], root: Root | Path | str, *,
                 per_host: int = PER_HOST, idle_timeout: float = IDLE_TIMEOUT,
                 rng: random.Random | None = None) -> None:
        self._load_control = control_loader
        self.root = root if isinstance(root, Root) else Root(root)
        self._pool = _Pool(per_host, idle_timeout)
        self._tcpto = TcpTo()
        self._contexts = TlsContexts()
        self._rng = rng or random.Random()
        self._extra: _Extra | None = None
        self._extra_stamp: tuple = ()
        self._extra_dir: Path | None = None
        self._extra_until = 0.0
        self._dns: DnsClient | None = None
        self._dns_key: tuple = ()
        self._mine: Mine | None = None
        self._mine_key: tuple = ()
        self._interfaces: list = []
        self._interfaces_read = -INTERFACES_TTL

    async def deliver(self, host: str, sender: str, recipients: list[str],
                      message_path: Path) -> list[RemoteResult]:
        """Deliver ``message_path`` from ``sender`` to ``recipients`` (all at ``host``); never raises."""
        recipients = list(recipients)
        if not recipients:
            return []
        try:
            return await self._deliver(host, sender, recipients, Path(message_path))
        except Exception as e:  # a bug must defer the mail, not take the queue manager down
            report = f"Internal error in remote delivery: {type(e).__name__}: {e}. (#4.3.0)"
            return [RemoteResult("Z", report)] * len(recipients)

    async def close(self) -> None:
        """Close idle sessions (QUIT); sessions in use close when their transaction ends."""
        closing = [asyncio.ensure_future(s.closed()) for s in self._pool.close()]
        if closing:  # let them finish (TLS says close_notify) before the caller's event loop ends
            await asyncio.wait(closing, timeout=CLOSE_WAIT)
            for task in closing:
                task.cancel()

    # -- one delivery

    async def _deliver(self, host: str, sender: str, recipients: list[str],
                       path: Path) -> list[RemoteResult]:
        control = self._load_control()
        try:
            extra = self._extra_for(control)
        except ConfigError as e:
            return _all(recipients, "Z", f"{e} (#4.3.0)")
        problem = _helohost_problem(control)
        if problem:
            return _all(recipients, "Z", problem)
        try:
            raw = await _read(path)
        except OSError as e:
            return _all(recipients, "Z", f"Unable to read the queued message: {e.strerror or e}. (#4.3.0)")
        wire = prepare_message(raw)
        if wire is None:
            return _all(recipients, "D", PARTIAL_LINE)
        resolution = await resolve(host, control, self._dns_for(control, extra),
                                   self._mine_for(control, extra), extra.port, self._rng)
        if not resolution.ok:
            return _all(recipients, resolution.status, resolution.report)
        settings = Settings(helohost=control.helohost, timeoutconnect=control.timeoutconnect,
                            timeoutremote=control.timeoutremote, tls=tls_mode_for(extra.tlsroutes, host))
        results: list[RemoteResult] = []
        for chunk in chunks(recipients, MAX_RCPTS):
            results.extend(await self._send(resolution.targets, settings, sender, chunk, wire))
        return results

    async def _send(self, targets: Sequence[Target], settings: Settings, sender: str,
                    recipients: Sequence[str], wire: Wire) -> list[RemoteResult]:
        """Try the addresses in order until one takes the transaction."""
        tried: list[Target] = []
        notes: list[str] = []
        session_failure = ""
        ordered = prefer_idle(targets, lambda t: self._pool.has_idle(_key(t, settings)))
        for target in ordered:
            if self._tcpto.skip(target.address, time.time()):
                notes.append(f"{target.label}: skipped, its connections timed out twice lately")
                continue
            tried.append(target)
            outcome = await self._transact(target, settings, sender, recipients, wire)
            if isinstance(outcome, Refusal):
                notes.append(f"{target.label}: {outcome.why or outcome.report}")
                if outcome.connected:
                    session_failure = outcome.report
                continue
            return [RemoteResult(*combine(r, outcome.status, outcome.report), target.label)
                    for r in outcome.rcpt]
        report = session_failure or NO_CONNECTION
        if notes and (len(notes) > 1 or not session_failure):
            report += "\nI tried: " + "; ".join(notes) + "."
        return _all(recipients, "Z", report, ", ".join(t.label for t in tried))

    async def _transact(self, target: Target, settings: Settings, sender: str, recipients: Sequence[str],
                        wire: Wire) -> Outcome | Refusal:
        """One transaction on an idle session to ``target`` or a new one; a dead idle one is replaced
        (each such try drops one idle session, and a new session is never stale, so this ends)."""
        while True:
            session = await self._pool.acquire(_key(target, settings), lambda: self._open(target, settings))
            if isinstance(session, Refusal):
                return session
            session.settings = settings
            reusable = False
            try:
                outcome = await session.transact(sender, recipients, wire)
                reusable = outcome.reusable and session.alive
            finally:
                self._pool.release(session, reusable)
            if not outcome.stale:
                return outcome

    async def _open(self, target: Target, settings: Settings) -> Session | Refusal:
        session = await Session.open(target, settings, self._contexts)
        if isinstance(session, Refusal) and session.tls_failed:
            session = await Session.open(target, settings, self._contexts, plain=True)
        timed_out = isinstance(session, Refusal) and session.timed_out
        self._tcpto.record(target.address, timed_out, time.time())
        return session

    # -- configuration, cached until it changes

    def _extra_for(self, control: Control) -> _Extra:
        now = time.monotonic()
        if self._extra is not None and self._extra_dir == control.control_dir and now < self._extra_until:
            return self._extra
        stamp = tuple(_stamp(control.control_dir / n) for n in EXTRA_FILES)
        if self._extra is None or self._extra_dir != control.control_dir or stamp != self._extra_stamp:
            self._extra = load_extra(control.control_dir)
            self._extra_stamp = stamp
            self._extra_dir = control.control_dir
        self._extra_until = now + EXTRA_RECHECK
        return self._extra

    def _dns_for(self, control: Control, extra: _Extra) -> DnsClient:
        key = (extra.resolvers, control.timeoutconnect)
        if self._dns is None or key != self._dns_key:
            self._dns = DnsClient(extra.resolvers, control.timeoutconnect)
            self._dns_key = key
        return self._dns

    def _mine_for(self, control: Control, extra: _Extra) -> Mine:
        now = time.monotonic()
        if now - self._interfaces_read >= INTERFACES_TTL:
            self._interfaces = interface_networks()
            self._interfaces_read = now
        key = (control.me, control.locals, extra.ipme, extra.notipme, tuple(self._interfaces))
        if self._mine is None or key != self._mine_key:
            self._mine = mine_from(control, self._interfaces, extra.ipme, extra.notipme)
            self._mine_key = key
        return self._mine


def _key(target: Target, settings: Settings) -> Key:
    return (target.address, target.port, settings.tls)


def _all(recipients: Sequence[str], status: str, report: str, host_tried: str = "") -> list[RemoteResult]:
    return [RemoteResult(status, report, host_tried)] * len(recipients)


def _helohost_problem(control: Control) -> str:
    if "helohost" in control.unset:
        return "Sorry, I cannot say HELO: neither control/helohost nor control/me exists. (#4.3.0)"
    helo = control.helohost.strip()
    if not helo or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in helo):
        return f"Sorry, control/helohost {control.helohost!r} is not a usable host name. (#4.3.0)"
    return ""


async def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > BIG_MESSAGE:
            return await asyncio.to_thread(f.read)
        return f.read()


__all__ = ["MAX_RCPTS", "RemoteEngine", "RemoteResult", "TcpTo", "chunks", "load_extra", "prefer_idle"]
