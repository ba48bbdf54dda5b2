"""qmail-smtpd's policy as pure functions: addresses, relaying, limits, DATA decoding, Received.

Everything the SMTP server decides about a command lives here, without sockets or asyncio, so that
it is tested with tables and hypothesis (qmail-semantics.md §5). The server (pqmail.smtp.server)
only moves bytes and calls these functions.

* :func:`addrparse` is qmail-smtpd's ``addrparse``: ``<...>`` or the text after ``:``, a leading
  source route ``@a,@b:`` removed, quotes and backslash escapes removed, ``box@[ip]`` of this host
  turned into ``box@<localiphost>``, 900 bytes at most. pqmail adds one rule: an address holding a
  control character (NUL, CR, TAB, DEL, ...) is a syntax error, because qmail's C strings would
  silently cut it at a NUL and our queue keeps addresses NUL-separated.
* :func:`check_rcpt` is the relay decision. Only the domain after the **last** ``@`` counts, judged
  on the address as the queue manager will deliver it (envnoathost and percenthack applied).
  Relay tricks and how each is decided (a client that may relay skips only the rcpthosts step):

  ===============================  ==========================================================
  ``user%other@rcpthost``          accepted as mail *for rcpthost* (percenthack is off unless
                                   ``control/percenthack`` lists rcpthost; when it does, the
                                   rewritten domain must itself be allowed, else 553)
  ``@rcpthost:user@other``         the source route is dropped: judged as ``user@other``: 553
  ``"user@other"@rcpthost``        553: pqmail never queues an address with two ``@``
  ``user@other@rcpthost``          553, same rule
  ``other!user@rcpthost``          553: pqmail never queues a bang path (a downstream UUCP-minded
                                   MTA, e.g. a dial-up customer's, could relay it)
  ``user@other.com.``              553: ``other.com.`` is not in rcpthosts (a trailing dot is
                                   never stripped, as in qmail; ``user@rcpthost.`` is refused too)
  ``user@[1.2.3.4]``               553 unless 1.2.3.4 is this host (then ``user@localiphost``)
  ``USER@OTHER.COM``               553: lookups ignore ASCII case, nothing else
  ``user@notexample.com``          553: ``.example.com`` matches ``x.example.com`` only at a dot
  ``user@other%x.example.com``     553: a domain must look like a host name or an IP literal
  ``postmaster`` (no ``@``)        always accepted (RFC 5321 §4.5.1); another address without
                                   ``@`` is judged as ``addr@envnoathost``
  ===============================  ==========================================================

* :class:`DataDecoder` is qmail-smtpd's ``blast()``: CRLF to LF, a leading dot removed, the end at
  ``CRLF.CRLF`` only (never a bare LF: any bare LF is qmail's 451, which also defeats the "SMTP
  smuggling" tricks), databytes counted on the stored bytes, hops counted in the header.
* :func:`received_line` is qmail's received.c, byte for byte.

What it trusts: nothing a client sends. What it never does: I/O, except :func:`load_policy`, which
reads ``control/`` (pqmail's own settings next to the qmail ones, see :class:`SmtpPolicy`).
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from pqmail.config.casefold import ascii_lower
from pqmail.config.control import (
    Control,
    badmailfrom_matches,
    load_control,
    rcpthosts_allows,
    read_lines_or_none,
    read_value,
)
from pqmail.errors import ConfigError
from pqmail.paths import Root
from pqmail.routing import rewrite_recipient

__all__ = [
    "DEFAULT_MAX_DATABYTES",
    "MAXHOPS",
    "MAX_ADDRESS_BYTES",
    "DataDecoder",
    "SmtpPolicy",
    "addrparse",
    "check_mail_size",
    "check_rcpt",
    "client_may_relay",
    "date822fmt",
    "effective_databytes",
    "load_policy",
    "parse_relayclients",
    "received_line",
    "safe_field",
]

MAX_ADDRESS_BYTES = 900  # qmail-smtpd: addr.len (with its NUL) > 900 is a syntax error
MAXHOPS = 100
# databytes 0 means "no limit" to qmail. pqmail holds a message in memory until it is queued, so an
# unlimited size would let one client exhaust memory: 0 means this much instead.
DEFAULT_MAX_DATABYTES = 64 * 1024 * 1024

# Replies (qmail's wording from §5.2 where qmail has one), with RFC 2034 enhanced status codes.
R_SYNTAX = "555 5.5.4 syntax error (#5.5.4)"
R_MAIL_FIRST = "503 5.5.1 MAIL first (#5.5.1)"
R_RCPT_FIRST = "503 5.5.1 RCPT first (#5.5.1)"
R_BADMAILFROM = "553 5.7.1 sorry, your envelope sender is in my badmailfrom list (#5.7.1)"
R_NOGATEWAY = "553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
R_BADRCPTTO = "553 5.7.1 sorry, mail to that recipient is not accepted (#5.7.1)"
R_FORM = "553 5.1.3 sorry, bang paths and addresses with more than one @ are not accepted (#5.1.3)"
R_BADDOMAIN = "553 5.1.2 sorry, that domain name is not valid (#5.1.2)"
R_TOOMANYRCPT = "452 4.5.3 too many recipients (#4.5.3)"
R_DATABYTES = "552 5.3.4 sorry, that message size exceeds my databytes limit (#5.3.4)"
R_HEADERBYTES = "552 5.3.4 sorry, that message header exceeds my limit (#5.3.4)"
R_HOPS = "554 5.4.6 too many hops, this message is looping (#5.4.6)"
R_BARELF = "451 4.5.0 See https://cr.yp.to/docs/smtplf.html."
R_RCPT_OK = "250 2.1.5 ok"


# ----------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class SmtpPolicy:
    """The smtpd's settings: qmail's :class:`Control` plus pqmail's own control files.

    ======================  ========  =====================================================
    file                    default   meaning
    ======================  ========  =====================================================
    ``relayclients``        (none)    IPs or CIDR networks that may relay (tcprules'
                                      ``RELAYCLIENT``); ``#`` comments
    ``badrcptto``           (none)    recipients refused (whole address, or ``@domain``)
    ``maxrcpt``             100       recipients per message; more get 452
    ``maxsessions``         200       concurrent sessions, all smtpd processes together
    ``maxsessionsperip``    20        concurrent sessions per client IP, all smtpd processes together
                                      (loopback and relayclients are exempt)
    ``maxheaderbytes``      262144    bytes of header (up to the first empty line); 0 = no limit
    ``maxsessiontime``      3600      seconds a whole session may last; 0 = no limit
    ======================  ========  =====================================================
    """

    control: Control
    relayclients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    badrcptto: frozenset[str] = frozenset()
    maxrcpt: int = 100
    maxsessions: int = 200
    maxsessionsperip: int = 20
    maxheaderbytes: int = 262144
    maxsessiontime: int = 3600
    warnings: tuple[str, ...] = field(default=())


POLICY_FILES = ("relayclients", "badrcptto", "maxrcpt", "maxsessions", "maxsessionsperip",
                "maxheaderbytes", "maxsessiontime")
_NUMBERS = {"maxrcpt": 100, "maxsessions": 200, "maxsessionsperip": 20, "maxheaderbytes": 262144,
            "maxsessiontime": 3600}


def _number(path: Path, default: int) -> int:
    """qmail's control_readint: the leading digits of the first line; the default without any."""
    text = read_value(path)
    if text is None:
        return default
    m = re.match(r"[0-9]+", text)
    return int(m.group()) if m else default


def parse_relayclients(lines: list[tuple[int, str]], path: Path | str
                       ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``control/relayclients`` lines (an IP or a CIDR network each) -> networks; ConfigError names
    the line that is neither. A tcprules-style prefix (``192.168.``) is not accepted: it is ambiguous.
    """
    out = []
    for lineno, text in lines:
        entry = text.strip()
        try:
            out.append(_canonical_network(ipaddress.ip_network(entry, strict=False)))
        except ValueError:
            raise ConfigError(str(path), f"{entry!r} is neither an IP address nor a CIDR network",
                              lineno) from None
    return tuple(out)


def _canonical_network(net: ipaddress.IPv4Network | ipaddress.IPv6Network
                       ) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped and net.prefixlen >= 96:
        return ipaddress.IPv4Network((net.network_address.ipv4_mapped, net.prefixlen - 96))
    return net


def load_policy(root: Root, control: Control | None = None) -> SmtpPolicy:
    """Read control/ (qmail's files through load_control, then pqmail's smtpd files).

    Raises ConfigError naming file and line for anything unusable.
    """
    if control is None:
        control = load_control(root)
    rc_path = root.control_file("relayclients")
    relay = parse_relayclients(read_lines_or_none(rc_path) or [], rc_path)
    bad = frozenset(ascii_lower(t) for _, t in read_lines_or_none(root.control_file("badrcptto")) or [])
    numbers = {name: _number(root.control_file(name), d) for name, d in _NUMBERS.items()}
    return SmtpPolicy(control=control, relayclients=relay, badrcptto=bad, **numbers)


def effective_databytes(policy: SmtpPolicy) -> int:
    """The message size limit: control/databytes, or DEFAULT_MAX_DATABYTES when that is 0."""
    return policy.control.databytes or DEFAULT_MAX_DATABYTES


# ----------------------------------------------------------------------------- addresses

_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f]")


def addrparse(arg: str, local_ips: frozenset[str] = frozenset(), localiphost: str | None = None
              ) -> str | None:
    """qmail-smtpd's addrparse of a MAIL/RCPT argument; None for a syntax error (555).

    ``local_ips`` are this host's addresses (canonical text, e.g. ``192.0.2.1``); ``box@[ip]`` for
    one of them becomes ``box@<localiphost>`` when ``localiphost`` is given. Never raises.
    """
    lt = arg.find("<")
    if lt >= 0:
        rest, terminator = arg[lt + 1:], ">"
    else:  # "partner should go read rfc 821": the text after ':' up to a space
        colon = arg.find(":")
        rest = arg[colon + 1:].lstrip(" ") if colon >= 0 else ""
        terminator = " "
    if rest.startswith("@"):  # source route: drop everything up to the first ':'
        colon = rest.find(":")
        rest = rest[colon + 1:] if colon >= 0 else ""
    out: list[str] = []
    escaped = quoted = False
    for ch in rest:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == terminator and not quoted:
            break
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        else:
            out.append(ch)
    addr = "".join(out)
    if localiphost is not None and local_ips:
        addr = _liphost(addr, local_ips, localiphost)
    if _CONTROL_CHARS.search(addr):
        return None
    if len(addr.encode("utf-8", "surrogateescape")) >= MAX_ADDRESS_BYTES:
        return None
    return addr


def _liphost(addr: str, local_ips: frozenset[str], localiphost: str) -> str:
    at = addr.rfind("@")
    if at < 0 or not addr.startswith("[", at + 1) or not addr.endswith("]"):
        return addr
    ip = ip_literal(addr[at + 1:])
    if ip is not None and ip in local_ips:
        return addr[:at + 1] + localiphost
    return addr


def ip_literal(domain: str) -> str | None:
    """``[1.2.3.4]`` or ``[IPv6:2001:db8::1]`` -> the canonical IP text; None if not a literal."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
        if ":" not in inner:
            return None
    elif ":" in inner:
        return None
    try:
        return canonical_ip(inner)
    except ValueError:
        return None


def canonical_ip(text: str) -> str:
    """The canonical text of an IP address; an IPv4-mapped IPv6 address becomes plain IPv4."""
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


_HOSTNAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")


def _domain_form_ok(domain: str) -> bool:
    return bool(_HOSTNAME.fullmatch(domain)) or ip_literal(domain) is not None


# ----------------------------------------------------------------------------- decisions

def client_may_relay(policy: SmtpPolicy, ip: str | None) -> bool:
    """Whether ``ip`` is listed (as an address or inside a network) in control/relayclients."""
    if not ip or not policy.relayclients:
        return False
    try:
        addr = ipaddress.ip_address(canonical_ip(ip))
    except ValueError:
        return False
    return any(addr in net for net in policy.relayclients if net.version == addr.version)


def check_rcpt(policy: SmtpPolicy, sender: str, addr: str, may_relay: bool, accepted: int) -> str | None:
    """qmail-smtpd's smtp_rcpt after addrparse: None to accept ``addr``, else the reply.

    ``sender`` is the envelope sender of this transaction, ``accepted`` the number of recipients
    accepted so far. Order: badmailfrom (qmail answers it at RCPT), the address form, rcpthosts
    (skipped for a client that may relay), badrcptto, then the recipient limit.
    """
    control = policy.control
    if badmailfrom_matches(control, sender):
        return R_BADMAILFROM
    if not addr:
        return R_SYNTAX
    at = addr.rfind("@")
    local = addr[:at] if at >= 0 else addr
    if "@" in local or "!" in local:
        return R_FORM
    if at >= 0 and not _domain_form_ok(addr[at + 1:]):
        return R_BADDOMAIN
    if not may_relay and not _for_us(control, addr, at):
        return R_NOGATEWAY
    if policy.badrcptto and _listed(policy.badrcptto, addr):
        return R_BADRCPTTO
    if policy.maxrcpt and accepted >= policy.maxrcpt:
        return R_TOOMANYRCPT
    return None


def _for_us(control: Control, addr: str, at: int) -> bool:
    if at < 0 and ascii_lower(addr) == "postmaster":
        return True
    if not rcpthosts_allows(control, addr[at + 1:] if at >= 0 else control.envnoathost):
        return False
    if not control.percenthack or "%" not in addr:
        return True
    # percenthack turns user%other@gw into user@other: the destination must be ours as well.
    final = rewrite_recipient(control, addr).address
    return rcpthosts_allows(control, final[final.rfind("@") + 1:])


def _listed(entries: frozenset[str], addr: str) -> bool:
    a = ascii_lower(addr)
    if a in entries:
        return True
    at = a.rfind("@")
    return at >= 0 and a[at:] in entries


def check_mail_size(declared: str | None, limit: int) -> str | None:
    """RFC 1870's ``SIZE=``: refuse at MAIL a message that cannot fit (qmail ignores the parameter).

    The client counts octets on the wire (CRLF, dot-stuffing); databytes counts them as stored (LF),
    which is at least half as many. Only a declared size above twice the limit is sure to be too
    big, so only that is refused early; anything else is judged on the bytes after DATA.
    """
    if declared and declared.isdigit() and limit and int(declared) > 2 * limit:
        return R_DATABYTES
    return None


# ----------------------------------------------------------------------------- DATA

_HOP = re.compile(rb"^(?:received|delivered)", re.IGNORECASE | re.MULTILINE)


class DataDecoder:
    """qmail-smtpd's ``blast()`` as a stream decoder: feed raw DATA bytes, read the outcome.

    Feed every byte received after ``354`` up to and including the terminating ``CRLF.CRLF``, in
    chunks of any size, then call :meth:`finish`. The stored message is :attr:`chunks` (LF line
    ends, leading dots removed). A leading dot is always removed (RFC 5321 §4.5.2; qmail keeps it in
    the single case ``.`` CR followed by a byte other than LF). After a bare LF, a size overflow or
    a header overflow the decoder stops storing but keeps counting, as qmail reads the whole
    message before it answers 552.
    """

    __slots__ = ("_at_line_start", "_header", "_in_header", "_last", "_pending_cr", "bare_lf",
                 "chunks", "header_too_big", "hops", "limit", "max_header", "size", "too_big")

    def __init__(self, limit: int = 0, max_header: int = 0) -> None:
        self.limit = limit
        self.max_header = max_header
        self.chunks: list[bytes] = []
        self.size = 0
        self.bare_lf = False
        self.too_big = False
        self.header_too_big = False
        self.hops = 0
        self._at_line_start = True
        self._pending_cr = False
        self._in_header = True
        self._header = bytearray()
        self._last = b"\n"

    @property
    def failed(self) -> bool:
        return self.bare_lf or self.too_big or self.header_too_big

    def feed(self, raw: bytes) -> None:
        if self.bare_lf or not raw:
            return
        if self._pending_cr:
            raw = b"\r" + raw
            self._pending_cr = False
        if raw[-1] == 13:  # a CR that may be the first half of CRLF
            raw = raw[:-1]
            self._pending_cr = True
            if not raw:
                return
        lfs = raw.count(b"\n")
        if lfs:
            if lfs != raw.count(b"\r\n"):
                self.bare_lf = True
                self.chunks = []
                return
            out = raw.replace(b"\r\n", b"\n")
        else:
            out = raw
        if self._at_line_start and out[:1] == b".":
            out = out[1:]
        if b"\n." in out:
            out = out.replace(b"\n.", b"\n")
        self._at_line_start = raw[-1] == 10
        if not out:
            return
        self.size += len(out)
        if self._in_header:
            self._scan_header(out)
        # +1: the terminator's LF, dropped by finish
        if self.limit and self.size > self.limit + 1 and not self.too_big:
            self.too_big = True
            self.chunks = []
            self._header = bytearray()  # stop holding anything of an oversized message
        if not self.failed:
            self.chunks.append(out)
        self._last = out[-1:]

    def _scan_header(self, out: bytes) -> None:
        end = (self._last + out).find(b"\n\n")
        part = out if end < 0 else out[:end]
        if not self.header_too_big and not self.too_big:
            self._header += part
            if self.max_header and len(self._header) > self.max_header:
                self.header_too_big = True
                self.chunks = []
                self._header = bytearray()
        if end >= 0:
            self._in_header = False

    def finish(self) -> None:
        """The terminator has been fed: drop its LF and count the hops."""
        if self.bare_lf:
            return
        self.size = max(0, self.size - 1)
        if self.chunks:
            last = self.chunks[-1][:-1]
            if last:
                self.chunks[-1] = last
            else:
                self.chunks.pop()
        if self.limit and self.size > self.limit:
            self.too_big = True
            self.chunks = []
        self.hops = len(_HOP.findall(self._header))

    def verdict(self) -> str | None:
        """None when the message may be queued, else the reply (qmail's order: hops, then size)."""
        if self.bare_lf:
            return R_BARELF
        if self.hops >= MAXHOPS:
            return R_HOPS
        if self.too_big:
            return R_DATABYTES
        if self.header_too_big:
            return R_HEADERBYTES
        return None


# ----------------------------------------------------------------------------- Received

_SAFE = b".@%+/=:-[]abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_SAFE_TABLE = bytes(c if c in _SAFE else ord("?") for c in range(256))
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def safe_field(text: str) -> bytes:
    """received.c's safeput: every byte outside ``[A-Za-z0-9.@%+/=:-[]]`` becomes ``?``."""
    return text.encode("utf-8", "surrogateescape").translate(_SAFE_TABLE)


def date822fmt(when: float) -> bytes:
    """qmail's date822fmt in UTC: ``26 Sep 1995 04:46:54 -0000`` (no LF)."""
    t = time.gmtime(when)
    return b"%d %s %d %02d:%02d:%02d -0000" % (t.tm_mday, _MONTHS[t.tm_mon - 1].encode(), t.tm_year,
                                               t.tm_hour, t.tm_min, t.tm_sec)


def received_line(*, remote_ip: str, local: str, helo: str | None, when: float,
                  remote_host: str = "unknown", remote_info: str | None = None,
                  protocol: str = "SMTP") -> bytes:
    """qmail-smtpd's Received line (received.c), two lines ending in LF::

        Received: from <remotehost> (HELO <helo>) (<remoteinfo>@<remoteip>)
          by <local> with <protocol>; <d Mon yyyy hh:mm:ss> -0000

    ``(HELO ...)`` appears only when ``helo`` is not None and differs (ignoring ASCII case) from
    ``remote_host``; ``helo`` is None when the client sent no HELO/EHLO (qmail's fakehelo).
    """
    parts = [b"Received: from ", safe_field(remote_host)]
    if helo is not None and ascii_lower(helo) != ascii_lower(remote_host):
        parts += [b" (HELO ", safe_field(helo), b")"]
    parts.append(b" (")
    if remote_info is not None:
        parts += [safe_field(remote_info), b"@"]
    parts += [safe_field(remote_ip), b")\n  by ", safe_field(local), b" with ",
              protocol.encode("ascii"), b"; ", date822fmt(when), b"\n"]
    return b"".join(parts)
