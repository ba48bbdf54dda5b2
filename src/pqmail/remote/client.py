"""One SMTP session to one address, on aiosmtplib: qmail-remote's dialogue, with ESMTP and TLS added.

A :class:`Session` is opened to a :class:`~pqmail.remote.mx.Target` (connect within
``timeoutconnect``; every reply within ``timeoutremote``), says EHLO (HELO when EHLO is refused) with
``helohost``, upgrades to TLS with STARTTLS when the server offers it, and then carries one transaction
after another (each after the first begins with RSET): ``MAIL FROM`` (with ``SIZE=``, and
``BODY=8BITMIME`` / ``SMTPUTF8`` when the server offers them and the mail needs them), one ``RCPT TO``
per recipient, ``DATA``, the message, and the final reply.

TLS per domain comes from ``control/tlsroutes``, keyed like smtproutes (``domain``, ``.domain``, empty
key for the default; the later line wins)::

    bank.example:verify        STARTTLS required, certificate checked against the MX/relay name
    partner.example:require    STARTTLS required, any certificate
    old.example:off            never STARTTLS (a server whose TLS is broken)
    example.net:               exception: the default, opportunistic TLS without verification

Results are qmail-remote's: a letter per recipient (``r`` accepted, ``h`` refused for good, ``s``
refused for now) and one for the message (``K``, ``Z``, ``D``) with qmail's texts, ``Remote host said:``
and the address tried. :func:`combine` merges them per recipient as qmail-rspawn does.

aiosmtplib does the connection, the greeting, EHLO/HELO and STARTTLS (with its defence against
plaintext injected before the TLS handshake). Then the session's transport is handed to a small
protocol of ours (:class:`_Replies`) that queues one reply per command, because aiosmtplib's protocol
waits for one reply at a time and drops replies that arrive while none is awaited: PIPELINING (RFC
2920) needs several in flight. With PIPELINING, a transaction is two round trips: ``[RSET] MAIL RCPT...
DATA`` in one write, then the message. The message is converted here as qmail-remote's ``blast`` does
(LF to CRLF, an existing CRLF kept, a lone CR made CRLF, a leading ``.`` doubled), so nothing converts
it twice, and a failure on DATA is told apart from one after the final dot ("Possible duplicate!").

Trusts: nothing the server says beyond its reply codes. Never: sends a message whose last line lacks
LF (qmail's ``#5.6.2``), sends more than the server's SIZE allows, or raises for a network problem.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
from aiosmtplib.errors import (
    SMTPConnectResponseError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from pqmail.config.casefold import ascii_lower
from pqmail.config.smtproutes import host_keys
from pqmail.errors import ConfigError
from pqmail.remote.mx import Target

TLS_MODES = ("off", "may", "require", "verify")
PARTIAL_LINE = "SMTP cannot transfer messages with partial final lines. (#5.6.2)"
RSET_TIMEOUT = 30.0  # seconds for the RSET that opens a reused session's next transaction
NO_CONNECTION = "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)"
_EOL = re.compile(rb"\r\n|\r(?!\n)|\n")
_LEADING_DOT = re.compile(rb"(?m)^\.")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# RFC 5321 atext: what a local part may hold without quotes (8-bit text passes, as qmail sends it).
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
_ORDER = {"K": 1, "Z": 0, "D": -1}


# ----------------------------------------------------------------------------- pure parts

def parse_tlsroutes(lines: Iterable[tuple[int, str]], path: Path | str) -> dict[str, str]:
    """control/tlsroutes lines -> lowercased key -> mode ("" value = the default, "may")."""
    routes: dict[str, str] = {}
    for lineno, line in lines:
        key, colon, value = line.partition(":")
        if not colon:
            raise ConfigError(path, f"no ':' in {line!r} (want domain:verify, domain:require, ...)", lineno)
        mode = ascii_lower(value.strip()) or "may"
        if mode not in TLS_MODES:
            raise ConfigError(path, f"unknown TLS mode {value!r} (want one of {', '.join(TLS_MODES)})",
                              lineno)
        routes.pop(ascii_lower(key), None)
        routes[ascii_lower(key)] = mode
    return routes


def tls_mode_for(routes: Mapping[str, str], host: str) -> str:
    """The TLS mode for mail to ``host``: first tlsroutes key as smtproutes orders them, else "may"."""
    for key in host_keys(host):
        if key in routes:
            return routes[key]
    return "may"


@dataclass(frozen=True)
class Wire:
    """A message ready for DATA: CRLF line ends, dot-stuffed, ending with ``.\\r\\n``."""

    data: bytes
    size: int  # the message's size on the wire, for SIZE=
    eightbit: bool


def prepare_message(raw: bytes) -> Wire | None:
    """qmail-remote's ``blast`` conversion; None when the last line has no LF (qmail's #5.6.2)."""
    if raw and raw[-1:] not in (b"\n", b"\r"):  # qmail takes a final lone CR as a line end too
        return None
    body = _EOL.sub(b"\r\n", raw) if b"\r" in raw else raw.replace(b"\n", b"\r\n")
    if body.startswith(b".") or b"\n." in body:
        body = _LEADING_DOT.sub(b"..", body)
    return Wire(data=body + b".\r\n", size=len(body), eightbit=not raw.isascii())


def quote_address(addr: str) -> str:
    """``<addr>`` with the local part quoted when RFC 5321 needs it (qmail's quote.c); ``<>`` for empty."""
    if addr == "":
        return "<>"
    local, at, domain = addr.rpartition("@")
    if not at:
        local, domain = addr, ""
    atoms = local.split(".")
    if not all(a and all(c in _ATEXT or ord(c) > 127 for c in a) for a in atoms):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"<{local}@{domain}>" if at else f"<{local}>"


def reply_text(code: int, message: str) -> str:
    """A reply as the server sent it (``550-first\\n550 last``), for "Remote host said:"."""
    lines = message.split("\n") if message else [""]
    return "\n".join(f"{code}{'-' if i < len(lines) - 1 else ' '}{line}".rstrip()
                     for i, line in enumerate(lines))


def said(code: int, message: str) -> str:
    return f"Remote host said: {reply_text(code, message)}"


def combine(rcpt: tuple[str, str] | None, status: str, report: str) -> tuple[str, str]:
    """qmail-rspawn's ``report``: one recipient's letter (r/h/s) with the message's into K/Z/D + text.

    ``h`` is D and ``s`` is Z whatever the message did; the message's text is added when the message
    result is no better than the recipient's. A recipient never reported takes the message result.
    """
    if rcpt is None or rcpt[0] == "r":
        return status, report
    letter = "Z" if rcpt[0] == "s" else "D"
    text = rcpt[1]
    if _ORDER[status] <= _ORDER[letter] and report:
        text = f"{text}\n{report}"
    return letter, text


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Refusal:
    """This address could not be used; the engine tries the next one.

    ``report`` is qmail's text for a failure after connecting; ``why`` says it in a few words for the
    list of addresses tried. ``timed_out`` (the TCP connect timed out) feeds qmail's tcpto rule;
    ``tls_failed``: an opportunistic TLS handshake failed, so try the same address again in plain text.
    """

    report: str
    why: str = ""
    timed_out: bool = False
    connected: bool = False
    tls_failed: bool = False


@dataclass
class Outcome:
    """One transaction: per recipient (r/h/s, text) or None when not reached, and the message result.

    ``stale``: a reused session turned out dead before it answered; nothing happened, try another.
    """

    rcpt: list[tuple[str, str] | None]
    status: str
    report: str
    reusable: bool = True
    stale: bool = False


@dataclass(frozen=True)
class Settings:
    helohost: str
    timeoutconnect: float
    timeoutremote: float
    tls: str = "may"


class TlsContexts:
    """The two client contexts, built once: opportunistic (no checks) and verifying (system CAs)."""

    def __init__(self) -> None:
        self._plain: ssl.SSLContext | None = None
        self._verify: ssl.SSLContext | None = None

    def get(self, verify: bool) -> ssl.SSLContext:
        if verify:
            if self._verify is None:
                self._verify = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            return self._verify
        if self._plain is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self._plain = ctx
        return self._plain


# ----------------------------------------------------------------------------- the session

class _Replies(asyncio.Protocol):
    """The session's protocol once EHLO and STARTTLS are done: replies matched to commands in order.

    aiosmtplib's protocol expects one reply per command and drops what arrives while none is awaited,
    so it cannot carry PIPELINING (RFC 2920); this one queues a future per command sent.
    """

    MAX_REPLY = 64 * 1024

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiting: deque[asyncio.Future] = deque()
        self.error: SMTPException | None = None
        self.lost = asyncio.get_running_loop().create_future()  # done once the transport is closed

    def expect(self) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if self.error is not None:
            _set_error(fut, self.error)
        else:
            self.waiting.append(fut)
            self._deliver()
        return fut

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._deliver()

    def eof_received(self) -> bool:
        self.fail(SMTPServerDisconnected("Connection lost"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(SMTPServerDisconnected("Connection lost"))
        if not self.lost.done():
            self.lost.set_result(None)

    def _deliver(self) -> None:
        while self.waiting:
            try:
                reply = self._parse()
            except SMTPException as e:
                self.fail(e)
                return
            if reply is None:
                break
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(reply)
        if len(self.buf) > self.MAX_REPLY:
            self.fail(SMTPResponseException(500, "Response too long"))

    def _parse(self) -> aiosmtplib.SMTPResponse | None:
        """One whole (multi-line) reply from the buffer, or None until it has arrived."""
        lines: list[bytes] = []
        offset = 0
        while True:
            end = self.buf.find(b"\n", offset)
            if end < 0:
                return None
            line = bytes(self.buf[offset:end + 1])
            offset = end + 1
            if not line[:3].isdigit():
                raise SMTPResponseException(500, f"Malformed reply line: {line[:80]!r}")
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del self.buf[:offset]
                text = b"\n".join(lines).decode("utf-8", "surrogateescape")
                return aiosmtplib.SMTPResponse(int(line[:3]), text)

    def fail(self, exc: SMTPException) -> None:
        if self.error is None:
            self.error = exc
        while self.waiting:
            _set_error(self.waiting.popleft(), exc)


def _set_error(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
        fut.exception()  # retrieved: a reply nobody waits for any more must not be logged


@dataclass(eq=False)
class Session:
    """An open SMTP connection after EHLO/HELO (and STARTTLS); ``open()`` makes one.

    aiosmtplib carries the connection up to there; then the transport is handed to :class:`_Replies`
    and transactions are written directly, pipelined when the server offers PIPELINING.
    """

    target: Target
    smtp: aiosmtplib.SMTP
    settings: Settings
    tls: bool = False
    opened: float = field(default_factory=time.monotonic)
    idle_since: float = 0.0
    uses: int = 0
    extensions: dict[str, str] = field(default_factory=dict)
    transport: asyncio.WriteTransport | None = None
    replies: _Replies | None = None

    @property
    def alive(self) -> bool:
        if self.transport is None or self.replies is None:
            return False
        return not self.transport.is_closing() and self.replies.error is None

    @classmethod
    async def open(cls, target: Target, settings: Settings, contexts: TlsContexts,
                   plain: bool = False) -> Session | Refusal:
        """Connect, read the greeting, EHLO/HELO and STARTTLS; a Refusal says why this address failed."""
        sock = await _connect(target, settings.timeoutconnect)
        if isinstance(sock, Refusal):
            return sock
        smtp = aiosmtplib.SMTP(sock=sock, local_hostname=settings.helohost,
                               timeout=settings.timeoutremote, start_tls=False)
        session = cls(target, smtp, settings)
        ip = target.address
        try:
            await smtp.connect()
        except SMTPConnectResponseError as e:
            session.close()
            return _refused(ip, "greeting failed", e)
        except (SMTPException, OSError) as e:
            session.close()
            return _refused(ip, _died(e))
        refusal = await session._hello()
        if refusal is None and not plain:
            refusal = await session._starttls(contexts)
        if refusal is None and (smtp.transport is None or smtp.transport.is_closing()):
            refusal = _refused(ip, "connection died")
        if refusal is not None:
            session.close()
            return refusal
        session.extensions = dict(smtp.esmtp_extensions)
        session.transport = smtp.transport
        session.replies = _Replies()
        session.transport.set_protocol(session.replies)
        return session

    async def _hello(self) -> Refusal | None:
        """EHLO, and HELO when EHLO is refused (qmail says only HELO); None when one of them worked."""
        ip, smtp, helo = self.target.address, self.smtp, self.settings.helohost
        try:
            try:
                await smtp.ehlo(hostname=helo)
                return None
            except SMTPHeloError as e:
                refused = e
            if smtp.is_connected:
                try:
                    await smtp.helo(hostname=helo)
                    return None
                except SMTPHeloError as e:
                    refused = e
        except (SMTPException, OSError) as e:
            return _refused(ip, _died(e))
        return _refused(ip, "my name was rejected", refused)

    async def _starttls(self, contexts: TlsContexts) -> Refusal | None:
        mode, ip, smtp = self.settings.tls, self.target.address, self.smtp
        required = mode in ("require", "verify")
        if mode == "off":
            return None
        if not smtp.supports_extension("starttls"):
            if required:
                return _refused(ip, "it does not offer STARTTLS, which control/tlsroutes requires. (#4.7.5)")
            return None
        try:
            await smtp.starttls(server_hostname=self.target.name,
                                tls_context=contexts.get(verify=mode == "verify"),
                                timeout=self.settings.timeoutremote)
        except SMTPResponseException as e:
            if required or not smtp.is_connected:
                return _refused(ip, "STARTTLS was refused", e)
            return None  # opportunistic: carry on in plain text, the session is still in step
        except ssl.SSLCertVerificationError as e:
            return _refused(ip, f"its TLS certificate could not be verified for {self.target.name}: "
                                f"{e.verify_message or e}. (#4.7.5)")
        except (ssl.SSLError, SMTPException, OSError) as e:
            return _refused(ip, f"the TLS handshake failed: {e}. (#4.7.5)", tls_failed=not required)
        self.tls = True
        return await self._hello()  # RFC 3207: forget what was said before TLS and ask again

    async def transact(self, sender: str, recipients: Sequence[str], wire: Wire) -> Outcome:
        """One mail transaction, after an RSET when the session was used before.

        ``Outcome.stale``: a reused session was found dead before its first reply; nothing was
        delivered, and the caller tries again on a fresh one.
        """
        reused = self.uses > 0
        self.uses += 1
        ip = self.target.address
        rcpt: list[tuple[str, str] | None] = [None] * len(recipients)
        limit = self._size_limit()
        if limit and wire.size > limit:
            return Outcome(rcpt, "D", f"Connected to {ip} but the message is too big for it: it accepts "
                                      f"at most {limit} bytes. (#5.3.4)")
        if _CONTROL.search(sender):
            return Outcome(rcpt, "D", "Sorry, the sender address contains a control character and cannot "
                                      "be sent by SMTP. (#5.1.7)")
        valid = []
        for i, addr in enumerate(recipients):
            if _CONTROL.search(addr):
                rcpt[i] = ("h", "Sorry, the address contains a control character and cannot be sent "
                                "by SMTP. (#5.1.3)")
            else:
                valid.append(i)
        if not valid:
            return Outcome(rcpt, "D", f"Giving up on {ip}.")
        commands = [b"RSET"] if reused else []
        commands.append(b"MAIL " + _address_arg(b"FROM:", sender) +
                        b"".join(b" " + p for p in self._mail_params(sender, recipients, wire)))
        commands.extend(b"RCPT " + _address_arg(b"TO:", recipients[i]) for i in valid)
        commands.append(b"DATA")
        batch = _Batch(self, commands, pipelined="pipelining" in self.extensions)
        stage = "rset" if reused else "envelope"
        try:
            async with asyncio.timeout(None) as batch.deadline:  # timeoutremote for each reply
                if reused:  # a session that died while idle must not hold us for timeoutremote
                    reply = await batch.next(min(RSET_TIMEOUT, self.settings.timeoutremote))
                    if reply.code != 250:
                        raise SMTPServerDisconnected(f"RSET answered {reply.code}")
                    stage = "envelope"
                return await self._envelope(batch, rcpt, valid, wire)
        except (SMTPException, OSError) as e:  # OSError includes asyncio.timeout's TimeoutError
            self._broken()
            if stage == "rset":
                return Outcome(rcpt, "Z", f"Connected to {ip} but {_died(e)}. (#4.4.2)", reusable=False,
                               stale=True)
            duplicate = " Possible duplicate!" if batch.body_sent else ""
            return Outcome(rcpt, "Z", f"Connected to {ip} but {_died(e)}.{duplicate} (#4.4.2)",
                           reusable=False)

    async def _envelope(self, batch: _Batch, rcpt: list[tuple[str, str] | None], valid: list[int],
                        wire: Wire) -> Outcome:
        """MAIL, RCPT, DATA, the message; replies read in order, whether pipelined or not."""
        ip = self.target.address
        mail = await batch.next()
        if mail.code >= 400:
            await batch.abandon()
            return Outcome(rcpt, _letter(mail.code),
                           f"Connected to {ip} but sender was rejected.\n{said(*mail)}")
        accepted = 0
        for i in valid:
            reply = await batch.next()
            if reply.code >= 400:
                letter = "h" if reply.code >= 500 else "s"
                rcpt[i] = (letter, f"{ip} does not like recipient.\n{said(*reply)}")
            else:
                rcpt[i] = ("r", "")
                accepted += 1
        if not accepted:
            await batch.abandon()
            return Outcome(rcpt, "D", f"Giving up on {ip}.")
        data = await batch.next()
        if data.code >= 400:
            return Outcome(rcpt, _letter(data.code), f"{ip} failed on DATA command.\n{said(*data)}")
        final = await batch.send_body(wire.data)
        if final.code >= 400:
            return Outcome(rcpt, _letter(final.code),
                           f"{ip} failed after I sent the message.\n{said(*final)}")
        return Outcome(rcpt, "K", f"{ip} accepted message.\n{said(*final)}")

    def close(self) -> None:
        """QUIT without waiting for the reply ("just too ridiculous", qmail-remote.c), then close."""
        transport = self.transport or self.smtp.transport
        if transport is not None and not transport.is_closing():
            try:
                transport.write(b"QUIT\r\n")
            except (OSError, RuntimeError):
                pass
            transport.close()
        self.smtp.close()

    async def closed(self) -> None:
        """Wait until the connection is really gone (a TLS session says close_notify first)."""
        if self.replies is not None and not self.replies.lost.done():
            await asyncio.shield(self.replies.lost)

    def _broken(self) -> None:
        if self.replies is not None and self.replies.error is None:
            self.replies.fail(SMTPServerDisconnected("out of step"))

    def _size_limit(self) -> int:
        text = self.extensions.get("size", "").strip()
        return int(text) if text.isascii() and text.isdigit() else 0

    def _mail_params(self, sender: str, recipients: Sequence[str], wire: Wire) -> list[bytes]:
        params: list[bytes] = []
        if "size" in self.extensions:
            params.append(b"SIZE=%d" % wire.size)
        if wire.eightbit and "8bitmime" in self.extensions:
            params.append(b"BODY=8BITMIME")
        if "smtputf8" in self.extensions and not all(a.isascii() for a in (sender, *recipients)):
            params.append(b"SMTPUTF8")
        return params


class _Batch:
    """The commands of one transaction and their replies: all written at once when pipelined
    (RFC 2920: RSET, MAIL and RCPT may precede DATA in one group), else one at a time as read."""

    def __init__(self, session: Session, commands: list[bytes], pipelined: bool) -> None:
        assert session.transport is not None and session.replies is not None
        self.transport, self.replies = session.transport, session.replies
        self.timeout = session.settings.timeoutremote
        self.commands = commands
        self.pipelined = pipelined
        self.futures: deque[asyncio.Future] = deque()
        self.deadline: asyncio.Timeout | None = None
        self.sent = 0
        self.body_sent = False
        if pipelined:
            self.replies.buf.clear()  # anything said while idle is not a reply to these
            self._write(commands)

    def _write(self, commands: list[bytes]) -> None:
        if self.replies.error is not None:
            raise self.replies.error
        if self.transport.is_closing():
            raise SMTPServerDisconnected("Connection lost")
        self.futures.extend(self.replies.expect() for _ in commands)
        self.transport.write(b"".join(c + b"\r\n" for c in commands))
        self.sent += len(commands)

    async def next(self, timeout: float | None = None) -> aiosmtplib.SMTPResponse:
        """The reply to the next command (sent now unless pipelined), within ``timeout`` seconds."""
        if not self.futures:
            if not self.pipelined and self.sent == 0:
                self.replies.buf.clear()
            self._write(self.commands[self.sent:self.sent + 1])
        return await self._await(self.futures.popleft(), timeout)

    async def _await(self, fut: asyncio.Future, timeout: float | None = None) -> aiosmtplib.SMTPResponse:
        # One asyncio.timeout for the transaction, re-armed per reply: cheaper than wait_for each time.
        if self.deadline is not None:
            self.deadline.reschedule(asyncio.get_running_loop().time() + (timeout or self.timeout))
        return await fut

    async def abandon(self) -> None:
        """Read the replies to commands already sent; a 354 to DATA gets an empty message (RFC 2920)."""
        while self.futures:
            reply = await self._await(self.futures.popleft())
            if not self.futures and self.sent == len(self.commands) and reply.code == 354:
                await self.send_body(b".\r\n", empty=True)

    async def send_body(self, data: bytes, empty: bool = False) -> aiosmtplib.SMTPResponse:
        """The message (dot-stuffed, ending ``.\\r\\n``) and the final reply."""
        fut = self.replies.expect()
        self.transport.write(data)
        self.body_sent = not empty  # from here on, a lost connection may mean a duplicate
        return await self._await(fut)


async def _connect(target: Target, timeout: float) -> socket.socket | Refusal:
    family = socket.AF_INET6 if ":" in target.address else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        return Refusal(f"cannot create a socket: {_oserror(e)}")
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (target.address, target.port)),
                               timeout)
    except TimeoutError:
        sock.close()
        return Refusal("connection timed out", timed_out=True)
    except OSError as e:
        sock.close()
        return Refusal(_oserror(e))
    except BaseException:
        sock.close()
        raise
    return sock


def _address_arg(prefix: bytes, addr: str) -> bytes:
    return prefix + quote_address(addr).encode("utf-8", "surrogateescape")


def _letter(code: int) -> str:
    return "D" if code >= 500 else "Z"


def _died(e: BaseException) -> str:
    """What qmail's dropped() says, before its "(#4.4.2)"; a time-out is named as one."""
    if isinstance(e, (SMTPTimeoutError, TimeoutError)):
        return "the connection timed out"
    return "connection died"


def _refused(ip: str, what: str, reply: SMTPResponseException | None = None,
             tls_failed: bool = False) -> Refusal:
    """A failure after connecting: qmail's ``Connected to <ip> but <what>.`` and the reply, if any."""
    if reply is None:
        report = f"Connected to {ip} but {what}" + ("" if what.endswith(")") else ". (#4.4.2)")
        return Refusal(report, why=what, connected=True, tls_failed=tls_failed)
    text = reply_text(reply.code, reply.message)
    return Refusal(f"Connected to {ip} but {what}.\nRemote host said: {text}",
                   why=f"{what}: {text.replace(chr(10), ' / ')}", connected=True, tls_failed=tls_failed)


def _oserror(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


__all__ = [
    "NO_CONNECTION",
    "PARTIAL_LINE",
    "TLS_MODES",
    "Outcome",
    "Refusal",
    "Session",
    "Settings",
    "TlsContexts",
    "Wire",
    "combine",
    "parse_tlsroutes",
    "prepare_message",
    "quote_address",
    "reply_text",
    "said",
    "tls_mode_for",
]
