"""The POP3 protocol core, sans-IO: bytes in, events and reply bytes out (after h11's design).

:class:`POP3Connection` is the server side of one POP3 session: RFC 1939 (USER, PASS, APOP, STAT,
LIST, RETR, DELE, NOOP, RSET, QUIT, TOP, UIDL), RFC 2449 (CAPA, response codes, the 255-octet command
line), RFC 2595 (STLS), RFC 3206 (``[AUTH]``, ``[SYS/TEMP]``, ``[SYS/PERM]``) and RFC 5034 (AUTH PLAIN).
It opens no socket and no file and never blocks. The server feeds it what the client sent
(:meth:`~POP3Connection.receive_data`), asks for the next thing to do (:meth:`~POP3Connection.next_event`)
and writes whatever :meth:`~POP3Connection.data_to_send` returns.

Everything that needs only the maildrop's listing (STAT, LIST, UIDL, DELE, RSET, NOOP, CAPA, wrong-state
and syntax errors) is answered here. Whatever needs the outside world comes out as an event, and the
connection then pauses (:data:`PAUSED`) until the server answers it:

=====================  ==========================================================================
event                  the server answers with
=====================  ==========================================================================
:class:`Authenticate`  :meth:`~POP3Connection.auth_succeeded` (the listing) or ``auth_failed``
:class:`StartTLS`      the TLS handshake, then :meth:`~POP3Connection.tls_started`
:class:`Retrieve`      ``message_follows``, the body (:class:`BodyEncoder`), ``message_end``;
                       or ``message_unavailable``
:class:`Quit`          the deletions, then :meth:`~POP3Connection.quit_done`
:class:`ConnectionClosed`  closing the connection (nothing to answer)
=====================  ==========================================================================

Message sizes are octets as transmitted: LF counted as CRLF, a missing final line end supplied (RFC
1939), deleted messages excluded from STAT and LIST (RFC 1939, not qmail-pop3d's quirk).

Two kinds of error, as in h11: :class:`LocalProtocolError` when the server code calls a method that
does not fit the state (a bug here or there), :class:`RemoteProtocolError` when the client misbehaved
so badly that the session must end (endless lines, a stream of bad commands); the last ``-ERR`` is
then in :meth:`~POP3Connection.data_to_send`. A merely wrong command gets ``-ERR`` and the session goes
on. What it trusts: nothing the client sends. What it never does: echo client bytes into a reply,
accept input pipelined behind STLS (it is discarded when TLS starts), or reveal whether a login exists.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_LINE",
    "NEED_DATA",
    "PAUSED",
    "Authenticate",
    "BodyEncoder",
    "ConnectionClosed",
    "LocalProtocolError",
    "POP3Connection",
    "ProtocolError",
    "Quit",
    "RemoteProtocolError",
    "Retrieve",
    "StartTLS",
    "State",
    "wire_size",
]

MAX_LINE = 255  # RFC 2449 §4: a command line is at most 255 octets, CRLF included
MAX_SASL_LINE = 2048  # RFC 5034 §4 lets AUTH with an initial response (and SASL answers) run longer
MAX_DISCARD = 16384  # past this much without a line end the client is not speaking POP3
MAX_BAD_COMMANDS = 20  # consecutive errors before we hang up
MAX_AUTH_FAILURES = 3  # per connection; the server adds a delay and a per-IP limit
IMPLEMENTATION = "pqmail"


# ----------------------------------------------------------------------------- errors and sentinels

class ProtocolError(Exception):
    """Base class of the two error kinds."""


class LocalProtocolError(ProtocolError):
    """The server code used the connection wrongly (answered an event that is not pending, ...)."""


class RemoteProtocolError(ProtocolError):
    """The client broke the protocol beyond recovery: write :meth:`data_to_send`, then close."""


class _Sentinel(type):
    def __repr__(cls) -> str:
        return cls.__name__


class NEED_DATA(metaclass=_Sentinel):  # h11's spelling: a sentinel, never instantiated
    """next_event(): no complete command buffered; read from the client and call receive_data."""


class PAUSED(metaclass=_Sentinel):
    """next_event(): an event is waiting for the server's answer."""


# ----------------------------------------------------------------------------- events

@dataclass(frozen=True)
class Authenticate:
    """Check a login. ``mechanism`` is ``USER`` (USER/PASS), ``APOP`` (``secret`` is the hex digest of
    :attr:`POP3Connection.apop_timestamp` + secret) or ``PLAIN`` (AUTH PLAIN, with its ``authzid``)."""

    mechanism: str
    login: str
    secret: str
    authzid: str = ""

    def __repr__(self) -> str:  # never let a password reach a log through repr()
        return f"Authenticate(mechanism={self.mechanism!r}, login={self.login!r}, secret=<hidden>)"


@dataclass(frozen=True)
class StartTLS:
    """``+OK`` to STLS is queued: send it, run the TLS handshake, then call ``tls_started()``."""


@dataclass(frozen=True)
class Retrieve:
    """RETR (``lines`` None) or TOP (``lines`` body lines) of message ``number`` (1-based)."""

    number: int
    lines: int | None = None


@dataclass(frozen=True)
class Quit:
    """QUIT in the TRANSACTION state: delete ``deleted`` (message numbers), then ``quit_done()``."""

    deleted: tuple[int, ...]


@dataclass(frozen=True)
class ConnectionClosed:
    """The session is over (``quit``, ``eof`` or ``auth-failures``): close the connection."""

    reason: str


Event = Authenticate | StartTLS | Retrieve | Quit | ConnectionClosed


class State(enum.Enum):
    NEW = "new"  # before the greeting
    AUTHORIZATION = "authorization"
    SASL = "sasl"  # AUTH PLAIN sent "+ ": the next line is the client's answer
    TRANSACTION = "transaction"
    CLOSED = "closed"


# Which commands exist, and in which state each is valid (RFC 1939 §§4-6, RFC 2449, RFC 2595, RFC 5034).
_AUTH_COMMANDS = frozenset({b"USER", b"PASS", b"APOP", b"AUTH", b"STLS", b"CAPA", b"NOOP", b"QUIT"})
_TRANSACTION_COMMANDS = frozenset({b"STAT", b"LIST", b"RETR", b"DELE", b"NOOP", b"RSET", b"QUIT", b"TOP",
                                   b"UIDL", b"CAPA"})
_KNOWN = _AUTH_COMMANDS | _TRANSACTION_COMMANDS
_NO_ARGS = frozenset({b"STAT", b"NOOP", b"RSET", b"QUIT", b"CAPA", b"STLS"})


# ----------------------------------------------------------------------------- message bodies

def wire_size(data: bytes) -> int:
    """Octets ``data`` takes on the wire: every LF as CRLF, plus CRLF for a missing final line end."""
    return len(data) + data.count(b"\n") + (2 if data and not data.endswith(b"\n") else 0)


class BodyEncoder:
    """A stored message (LF line ends) into RETR/TOP wire form, one chunk at a time.

    LF becomes CRLF, a line starting with ``.`` gets another ``.`` (RFC 1939 §3), a missing final line
    end is supplied by :meth:`finish`. With ``body_lines`` (TOP) only the header, the blank line and
    that many body lines pass; :attr:`done` then tells the reader to stop reading. Linear in the input
    whatever the chunking; the terminating ``.`` line is the connection's (``message_end``).
    """

    def __init__(self, body_lines: int | None = None) -> None:
        self._bol = True  # the next byte starts a line
        self._limit = body_lines
        self._in_header = body_lines is not None
        self._sent = 0  # body lines passed (TOP)
        self._line = 0  # TOP: 0 = current line empty so far, 1 = only "\r", 2 = has content
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done or not chunk:
            return b""
        if self._limit is not None:
            chunk = self._cut(chunk)
            if not chunk:
                return b""
        out = chunk.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
        if self._bol and chunk[0] == 0x2E:
            out = b"." + out
        self._bol = chunk[-1] == 0x0A
        return out

    def finish(self) -> bytes:
        """The CRLF that ends an unterminated last line (nothing for an empty message)."""
        return b"" if self._bol else b"\r\n"

    def _cut(self, chunk: bytes) -> bytes:
        """The part of ``chunk`` TOP sends; sets :attr:`done` when the limit is reached."""
        assert self._limit is not None
        pos = 0
        while True:
            if not self._in_header:
                left = self._limit - self._sent
                n = chunk.count(b"\n", pos)
                if n < left:  # the whole rest fits: no line-by-line walk
                    self._sent += n
                    if n:
                        self._line = 0
                        pos = chunk.rfind(b"\n") + 1
                    self._track_partial(chunk, pos)
                    return chunk
            i = chunk.find(b"\n", pos)
            if i < 0:
                self._track_partial(chunk, pos)
                return chunk
            blank = self._line < 2 and chunk[pos:i] in (b"", b"\r") and not (self._line == 1 and i > pos)
            self._line = 0
            pos = i + 1
            if self._in_header:
                if blank:
                    self._in_header = False
                    if self._limit == 0:
                        self.done = True
                        return chunk[:pos]
            else:
                self._sent += 1
                if self._sent >= self._limit:
                    self.done = True
                    return chunk[:pos]

    def _track_partial(self, chunk: bytes, start: int) -> None:
        """Remember whether the unterminated line from ``start`` is (so far) empty, ``\\r`` or more."""
        seg = chunk[start:]
        if not seg:
            return
        if self._line == 0 and seg == b"\r":
            self._line = 1
        else:
            self._line = 2


# ----------------------------------------------------------------------------- the connection

class POP3Connection:
    """One POP3 session, server side. See the module docstring for the event/answer protocol.

    ``tls_available``: STLS may be offered (a certificate is configured and TLS is not active).
    ``tls_active``: the connection is already encrypted (port 995). ``plaintext_auth``: USER/PASS and
    AUTH are allowed without TLS. ``apop_timestamp``: offer APOP with this ``<...>`` challenge.
    """

    def __init__(self, *, hostname: str = "localhost", tls_available: bool = False, tls_active: bool = False,
                 plaintext_auth: bool = True, apop_timestamp: str | None = None,
                 max_auth_failures: int = MAX_AUTH_FAILURES) -> None:
        self.hostname = hostname
        self.tls_active = tls_active
        self.tls_available = tls_available
        self.plaintext_auth = plaintext_auth
        self.apop_timestamp = apop_timestamp
        self.max_auth_failures = max_auth_failures
        self.state = State.NEW
        self.auth_failures = 0
        self._in = bytearray()
        self._pos = 0  # start of the unread input in _in
        self._eof = False
        self._discarding = False  # inside an overlong line: drop bytes up to its LF
        self._discarded = 0
        self._out: list[bytes] = []
        self._pending: Event | None = None  # the event the server has not answered yet
        self._closed_event: ConnectionClosed | None = None
        self._bad = 0
        self._user: str | None = None
        self._sizes: list[int] = []
        self._uids: list[str] = []
        self._deleted: set[int] = set()  # 0-based

    # -- input and output

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """What the client sent; ``b""`` means it closed its side."""
        if data:
            if self._eof:
                raise LocalProtocolError("receive_data after end of input")
            self._in += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        """Every reply queued so far, in order (and forget them)."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _reply(self, text: str) -> None:
        self._out.append(text.encode("ascii") + b"\r\n")

    def _ok(self, text: str = "") -> None:
        self._reply(f"+OK {text}" if text else "+OK")

    def _err(self, text: str, code: str | None = None, bad: bool = False) -> None:
        self._reply(f"-ERR [{code}] {text}" if code else f"-ERR {text}")
        if bad:
            self._bad += 1
            if self._bad >= MAX_BAD_COMMANDS:
                self._reply("-ERR too many bad commands; closing")
                self._fail_remote("too many bad commands")

    def _multiline(self, first: str, lines: Sequence[str]) -> None:
        body = "".join(f"{ln}\r\n" for ln in lines)
        self._out.append(f"{first}\r\n{body}.\r\n".encode("ascii"))

    def _fail_remote(self, why: str) -> None:
        self.state = State.CLOSED
        self._closed_event = ConnectionClosed("protocol-error")
        raise RemoteProtocolError(why)

    # -- greeting

    def send_greeting(self) -> None:
        """Queue ``+OK`` greeting (with the APOP challenge when APOP is offered)."""
        self._expect_state(State.NEW, "send_greeting")
        self.state = State.AUTHORIZATION
        stamp = f" {self.apop_timestamp}" if self.apop_timestamp else ""
        self._ok(f"{self.hostname} POP3 server ready{stamp}")

    def send_refusal(self, code: str, text: str) -> None:
        """Queue ``-ERR [code] text`` instead of the greeting (a limit was reached); the session is over."""
        self._expect_state(State.NEW, "send_refusal")
        self._err(text, code)
        self.state = State.CLOSED
        self._closed_event = ConnectionClosed("refused")

    # -- events

    def next_event(self) -> Event | type[NEED_DATA] | type[PAUSED]:
        """Handle buffered commands until one needs the server; raises only RemoteProtocolError."""
        if self.state is State.NEW:
            raise LocalProtocolError("next_event before send_greeting")
        if self._pending is not None:
            return PAUSED
        while True:
            if self._closed_event is not None:
                return self._closed_event
            line = self._take_line()
            if line is None:
                if self._eof:
                    self.state = State.CLOSED
                    self._closed_event = ConnectionClosed("eof")
                    continue
                return NEED_DATA
            event = self._handle(line)
            if event is not None:
                self._pending = None if isinstance(event, ConnectionClosed) else event
                return event

    def _take_line(self) -> bytes | None:
        """The next complete line without its line end; :data:`_TOO_LONG` marks an overlong line."""
        buf = self._in
        if self._discarding:
            i = buf.find(b"\n", self._pos)
            if i < 0:
                self._discarded += len(buf) - self._pos
                self._compact(len(buf))
                if self._discarded > MAX_DISCARD:
                    self._reply("-ERR line too long; closing")
                    self._fail_remote("line too long")
                return None
            self._compact(i + 1)
            self._discarding = False
            return _TOO_LONG
        i = buf.find(b"\n", self._pos, self._pos + MAX_SASL_LINE)
        if i < 0:
            if len(buf) - self._pos >= MAX_SASL_LINE:
                self._discarding = True
                self._discarded = len(buf) - self._pos
                self._compact(len(buf))
                return self._take_line()
            return None
        line = bytes(buf[self._pos:i])
        self._compact(i + 1)
        if line.endswith(b"\r"):
            line = line[:-1]
        long_ok = self.state is State.SASL or line[:5].upper() == b"AUTH "
        if len(line) + 2 > (MAX_SASL_LINE if long_ok else MAX_LINE):
            return _TOO_LONG
        return line

    def _compact(self, upto: int) -> None:
        self._pos = upto
        if self._pos >= 65536 or self._pos == len(self._in):
            del self._in[:self._pos]
            self._pos = 0

    # -- command dispatch

    def _handle(self, line: bytes) -> Event | None:
        if line is _TOO_LONG:
            if self.state is State.SASL:
                self.state = State.AUTHORIZATION
            self._err("line too long", bad=True)
            return None
        if self.state is State.SASL:
            return self._sasl_answer(line)
        if _CONTROL.search(line):
            self._err("syntax error", bad=True)
            return None
        keyword, _, rest = line.partition(b" ")
        keyword = keyword.upper()
        if keyword not in _KNOWN:
            self._err("unknown command", bad=True)
            return None
        valid = _AUTH_COMMANDS if self.state is State.AUTHORIZATION else _TRANSACTION_COMMANDS
        if keyword not in valid:
            where = "before login" if self.state is State.AUTHORIZATION else "after login"
            self._err(f"command not valid {where}", bad=True)
            return None
        if keyword in _NO_ARGS and rest.strip():
            self._err("syntax error", bad=True)
            return None
        bad_before = self._bad
        event = _HANDLERS[keyword](self, rest)
        if self._bad == bad_before:
            self._bad = 0  # only consecutive errors count towards the limit
        return event

    def _auth_refused(self) -> bool:
        if self.plaintext_auth or self.tls_active:
            return False
        self._err("use STLS first: logins without TLS are not allowed", "AUTH")
        return True

    # AUTHORIZATION state

    def _cmd_capa(self, rest: bytes) -> None:
        auth = self.state is State.AUTHORIZATION
        logins = auth and (self.plaintext_auth or self.tls_active)
        caps = ["TOP", "UIDL"]
        caps += ["USER", "SASL PLAIN"] if logins else []
        caps += ["RESP-CODES", "PIPELINING", "AUTH-RESP-CODE", "EXPIRE NEVER", "LOGIN-DELAY 0"]
        caps += ["STLS"] if auth and self.tls_available and not self.tls_active else []
        caps.append(f"IMPLEMENTATION {IMPLEMENTATION}")
        self._multiline("+OK Capability list follows", caps)

    def _cmd_noop(self, rest: bytes) -> None:
        self._ok()

    def _cmd_user(self, rest: bytes) -> None:
        name = rest.strip()
        if not name or b" " in name:
            self._err("syntax error", bad=True)
            return
        if self._auth_refused():
            return
        self._user = _text(name)
        self._ok("send PASS")

    def _cmd_pass(self, rest: bytes) -> Event | None:
        if self._user is None:
            self._err("USER first", bad=True)
            return None
        if not rest:
            self._err("syntax error", bad=True)
            return None
        user, self._user = self._user, None
        return Authenticate("USER", user, _text(rest))

    def _cmd_apop(self, rest: bytes) -> Event | None:
        if self.apop_timestamp is None:
            self._err("APOP not available", bad=True)
            return None
        args = rest.split()
        if len(args) != 2 or len(args[1]) != 32 or any(c not in b"0123456789abcdef" for c in args[1]):
            self._err("syntax error", bad=True)
            return None
        if self._auth_refused():
            return None
        self._user = None
        return Authenticate("APOP", _text(args[0]), args[1].decode("ascii"))

    def _cmd_auth(self, rest: bytes) -> Event | None:
        args = rest.split()
        if not args:
            self._multiline("+OK", ["PLAIN"])  # RFC 1734 clients list mechanisms this way
            return None
        if len(args) > 2:
            self._err("syntax error", bad=True)
            return None
        if args[0].upper() != b"PLAIN":
            self._err("unsupported authentication mechanism", bad=True)
            return None
        if self._auth_refused():
            return None
        self._user = None
        if len(args) == 1:
            self.state = State.SASL
            self._reply("+ ")
            return None
        return self._plain(b"" if args[1] == b"=" else args[1])

    def _sasl_answer(self, line: bytes) -> Event | None:
        self.state = State.AUTHORIZATION
        if line.strip() == b"*":
            self._err("authentication cancelled")
            return None
        return self._plain(line.strip())

    def _plain(self, b64: bytes) -> Event | None:
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            self._err("invalid base64 data", bad=True)
            return None
        parts = raw.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            self._err("malformed PLAIN response", "AUTH", bad=True)
            return None
        return Authenticate("PLAIN", _text(parts[1]), _text(parts[2]), _text(parts[0]))

    def _cmd_stls(self, rest: bytes) -> Event | None:
        if self.tls_active:
            self._err("TLS already active", bad=True)
            return None
        if not self.tls_available:
            self._err("TLS not available", bad=True)
            return None
        self._ok("begin TLS negotiation")
        return StartTLS()

    def _cmd_quit(self, rest: bytes) -> Event:
        if self.state is State.TRANSACTION:
            return Quit(tuple(sorted(i + 1 for i in self._deleted)))
        self._ok(f"{self.hostname} signing off")
        self.state = State.CLOSED
        self._closed_event = ConnectionClosed("quit")
        return self._closed_event

    # TRANSACTION state

    def _live(self) -> tuple[int, int]:
        count = len(self._sizes) - len(self._deleted)
        octets = sum(s for i, s in enumerate(self._sizes) if i not in self._deleted)
        return count, octets

    def _message(self, arg: bytes) -> int | None:
        """0-based index of a valid, undeleted message number, or None after replying -ERR."""
        if not arg.isdigit() or len(arg) > 10:
            self._err("invalid message number", bad=True)
            return None
        n = int(arg)
        if not 1 <= n <= len(self._sizes):
            self._err("no such message", bad=True)
            return None
        if n - 1 in self._deleted:
            self._err(f"message {n} already deleted", bad=True)
            return None
        return n - 1

    def _one_optional(self, rest: bytes) -> tuple[bool, int | None]:
        """(ok, index) for commands with an optional message number (LIST, UIDL)."""
        args = rest.split()
        if not args:
            return True, None
        if len(args) > 1:
            self._err("syntax error", bad=True)
            return False, None
        i = self._message(args[0])
        return i is not None, i

    def _cmd_stat(self, rest: bytes) -> None:
        count, octets = self._live()
        self._ok(f"{count} {octets}")

    def _cmd_list(self, rest: bytes) -> None:
        ok, i = self._one_optional(rest)
        if not ok:
            return
        if i is not None:
            self._ok(f"{i + 1} {self._sizes[i]}")
            return
        count, octets = self._live()
        self._multiline(f"+OK {count} messages ({octets} octets)",
                        [f"{i + 1} {s}" for i, s in enumerate(self._sizes) if i not in self._deleted])

    def _cmd_uidl(self, rest: bytes) -> None:
        ok, i = self._one_optional(rest)
        if not ok:
            return
        if i is not None:
            self._ok(f"{i + 1} {self._uids[i]}")
            return
        self._multiline("+OK unique-id listing follows",
                        [f"{i + 1} {u}" for i, u in enumerate(self._uids) if i not in self._deleted])

    def _cmd_retr(self, rest: bytes) -> Event | None:
        args = rest.split()
        if len(args) != 1:
            self._err("syntax error", bad=True)
            return None
        i = self._message(args[0])
        return None if i is None else Retrieve(i + 1)

    def _cmd_top(self, rest: bytes) -> Event | None:
        args = rest.split()
        if len(args) != 2 or not args[1].isdigit() or len(args[1]) > 10:
            self._err("syntax error", bad=True)
            return None
        i = self._message(args[0])
        return None if i is None else Retrieve(i + 1, int(args[1]))

    def _cmd_dele(self, rest: bytes) -> None:
        args = rest.split()
        if len(args) != 1:
            self._err("syntax error", bad=True)
            return
        i = self._message(args[0])
        if i is not None:
            self._deleted.add(i)
            self._ok(f"message {i + 1} deleted")

    def _cmd_rset(self, rest: bytes) -> None:
        self._deleted.clear()
        count, octets = self._live()
        self._ok(f"maildrop has {count} messages ({octets} octets)")

    # -- the server's answers

    def _answer(self, kind: type, what: str) -> Event:
        event = self._pending
        if not isinstance(event, kind):
            raise LocalProtocolError(f"{what}: no {kind.__name__} event is pending "
                                     f"(state {self.state.value})")
        return event

    def auth_succeeded(self, sizes: Sequence[int], uids: Sequence[str]) -> None:
        """The login is good and the maildrop locked: ``sizes`` (wire octets) and ``uids`` per message."""
        self._answer(Authenticate, "auth_succeeded")
        if len(sizes) != len(uids):
            raise LocalProtocolError("auth_succeeded: sizes and uids differ in length")
        for u in uids:
            if not _UIDL.fullmatch(u):
                raise LocalProtocolError(f"auth_succeeded: {u!r} is not a valid UIDL (RFC 1939)")
        self._pending = None
        self._sizes, self._uids = [int(s) for s in sizes], list(uids)
        self._deleted = set()
        self.state = State.TRANSACTION
        count, octets = self._live()
        self._ok(f"{count} messages ({octets} octets)")

    def auth_failed(self, code: str = "AUTH", text: str = "authentication failed") -> None:
        """Queue ``-ERR [code] text``; after too many failures the session ends."""
        self._answer(Authenticate, "auth_failed")
        self._pending = None
        self.auth_failures += 1
        self._err(text, code)
        if self.auth_failures >= self.max_auth_failures:
            self.state = State.CLOSED
            self._closed_event = ConnectionClosed("auth-failures")

    def tls_started(self) -> None:
        """The handshake succeeded: forget everything from before it, including pipelined input."""
        self._answer(StartTLS, "tls_started")
        self._pending = None
        self.tls_active = True
        self._user = None
        self._in.clear()  # RFC 2595 §4 / CVE-2011-0411: nothing sent in plaintext counts after STLS
        self._pos = 0
        self._discarding = False

    def message_follows(self) -> None:
        """Queue the ``+OK`` that starts a RETR/TOP reply; the server sends the encoded body next."""
        event = self._answer(Retrieve, "message_follows")
        if event.lines is None:
            self._ok(f"{self._sizes[event.number - 1]} octets")
        else:
            self._ok("top of message follows")

    def message_end(self) -> None:
        """Queue the terminating ``.`` line after the body."""
        self._answer(Retrieve, "message_end")
        self._pending = None
        self._out.append(b".\r\n")

    def message_unavailable(self, text: str = "unable to open that message", code: str = "SYS/TEMP") -> None:
        """The message cannot be read (it vanished, or an I/O error): ``-ERR`` instead of the body."""
        self._answer(Retrieve, "message_unavailable")
        self._pending = None
        self._err(text, code)

    def quit_done(self, failed: int = 0) -> None:
        """The UPDATE state is over (``failed`` deletions did not happen); queue the last reply."""
        event = self._answer(Quit, "quit_done")
        self._pending = None
        if failed:
            self._err(f"{failed} of {len(event.deleted)} messages could not be deleted", "SYS/TEMP")
        else:
            self._ok(f"{self.hostname} signing off ({len(event.deleted)} messages deleted)")
        self.state = State.CLOSED
        self._closed_event = ConnectionClosed("quit")

    def _expect_state(self, state: State, what: str) -> None:
        if self.state is not state:
            raise LocalProtocolError(f"{what} in state {self.state.value}")


_TOO_LONG = bytearray()  # an overlong line; compared by identity, so no client line can equal it
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_HANDLERS = {k: getattr(POP3Connection, f"_cmd_{k.decode('ascii').lower()}") for k in _KNOWN}
_UIDL = re.compile(r"[\x21-\x7e]{1,70}")  # RFC 1939 §7: 1 to 70 characters 0x21-0x7E


def _text(raw: bytes) -> str:
    """Client bytes as text: UTF-8, any invalid byte kept as a surrogate (passwords are 8-bit)."""
    return raw.decode("utf-8", "surrogateescape")
