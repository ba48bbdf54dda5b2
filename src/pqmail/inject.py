"""qmail-inject: turn a message read from stdin into a queued message.

What it does, as qmail-inject does (qmail-inject.c; qmail-semantics.md §1):

* Recipients: the arguments, or (no arguments, or ``-t``) the header's To, Cc, Bcc and
  Apparently-To, or Resent-To/Cc/Bcc when the message has any Resent- field. With ``-t`` the
  arguments are added to the header's (qmail-inject ``-H``, what qmail's sendmail ``-t`` does).
* The header: Bcc, Resent-Bcc, Return-Path and Content-Length are removed; ``Date``,
  ``Message-ID`` and ``From`` are added when missing (``Resent-`` ones for a resent message), and
  ``Cc: recipient list not shown: ;`` when there is neither To nor Cc; an mbox ``From `` line in
  the header becomes ``MBOX-Line:``. Addresses in To, Cc, Bcc, From, Sender, Reply-To and the
  like are qualified (``joe`` -> ``joe@defaulthost``, ``host+`` -> ``host.plusdomain``, a host
  without a dot gets ``.defaultdomain``); a field is re-written only when one of its addresses
  changed, so a message that needs nothing keeps its header byte for byte.
* The envelope sender: ``-f``, else the first Return-Path address, else ``user@host`` from
  $QMAILSUSER/$QMAILSHOST, $QMAILUSER/$MAILUSER/$USER/$LOGNAME and $QMAILHOST/$MAILHOST. The
  default From uses the same user and host and $QMAILNAME/$MAILNAME/$NAME as the full name.
  $QMAILINJECT flags: ``c`` (name as a comment), ``s`` (drop Return-Path), ``f`` (drop From),
  ``i`` (drop Message-ID), ``r`` (VERP sender), ``m`` (per-message sender).
* control/defaulthost, defaultdomain, plusdomain and idhost (each defaulting to control/me) are
  overridden by $QMAILDEFAULTHOST, $QMAILDEFAULTDOMAIN, $QMAILPLUSDOMAIN and $QMAILIDHOST.
* CRLF line ends become LF; a last line without LF gets one.

Differences from qmail-inject, on purpose: Message-ID is ``<YYYYMMDDhhmmss.pid.n@idhost>``; Date
is RFC 5322 with the local offset; without any user variable the login name of the uid is used
before ``anonymous``; header addresses are parsed by :func:`parse_addresses` (RFC 5322 tokens,
agreeing with email.utils.getaddresses on well-formed lists) rather than token822, so a
re-written field is re-formatted as ``name <addr>`` (groups inside it are flattened).

The body is streamed to the queue as it arrives (the message is never held whole in memory), and
the exit status is 0 only once the message is durably queued (see pqmail.queue.store). Startup is
on the path of every cron job and web application that mails, so imports are kept few and late.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from io import BufferedIOBase
from typing import NamedTuple

from pqmail.addresses import inject_qualify
from pqmail.errors import PermanentFailure, TemporaryFailure

PREREAD = 1 << 18  # a body up to this size is read whole and written with one writev
_ENC = ("utf-8", "surrogateescape")

# hfield.c's names, by what qmail-inject does with them.
_TO_CC = frozenset(("to", "cc"))
_HEADER_RCPT = frozenset(("to", "cc", "bcc", "apparently-to"))
_RESENT_RCPT = frozenset(("resent-to", "resent-cc", "resent-bcc"))
_SENDERS = frozenset(("sender", "from", "reply-to", "return-receipt-to", "errors-to",
                      "resent-sender", "resent-from", "resent-reply-to"))
_DROPPED = frozenset(("bcc", "resent-bcc", "return-path", "content-length"))
_RESENT = frozenset(("resent-sender", "resent-from", "resent-reply-to", "resent-to", "resent-cc",
                     "resent-bcc", "resent-date", "resent-message-id"))
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
_PHRASE_SPECIALS = frozenset('()<>[]:;@\\,."')


# ----------------------------------------------------------------------------- settings

class Settings(NamedTuple):
    """Everything qmail-inject takes from control/ and the environment, resolved."""

    defaulthost: str
    defaultdomain: str
    plusdomain: str
    idhost: str
    mailuser: str
    mailhost: str | None
    mailruser: str
    mailrhost: str | None
    fullname: str | None
    flags: str = ""

    def qualify(self, addr: str) -> str:
        return inject_qualify(addr, self.defaulthost, self.defaultdomain, self.plusdomain)


CONTROL_NAMES = ("me", "defaulthost", "defaultdomain", "plusdomain", "idhost")


def read_control(control_dir: str) -> dict[str, str | None]:
    """The first line of each file qmail-inject reads (None when missing), as control_readline.

    Read here rather than through config.control.load_control, which reads every control file
    and costs more start-up time than an inject may spend.
    """
    out: dict[str, str | None] = {}
    for name in CONTROL_NAMES:
        try:
            with open(os.path.join(control_dir, name), "rb") as f:
                first = f.read().split(b"\n", 1)[0]
        except FileNotFoundError:
            out[name] = None
            continue
        except OSError as e:
            path = os.path.join(control_dir, name)
            raise TemporaryFailure(f"unable to read controls: {path}: {e.strerror}") from None
        out[name] = first.rstrip(b" \t").decode("latin-1")
    return out


def _first(env: Mapping[str, str], *names: str) -> str | None:
    for n in names:
        v = env.get(n)
        if v is not None:
            return v
    return None


def settings_from(env: Mapping[str, str], control: Mapping[str, str | None],
                  login: Callable[[], str | None] = lambda: None) -> Settings:
    """Resolve :class:`Settings` (pure): environment first, then control files, then ``me``."""
    me = control.get("me")

    def ctl(name: str, var: str) -> str:
        v = env.get(var)
        if v is not None:
            return v
        v = control.get(name)
        if v is not None:
            return v
        return me if me is not None else name  # qmail's literal placeholder

    mailhost = _first(env, "QMAILHOST", "MAILHOST")
    mailuser = _first(env, "QMAILUSER", "MAILUSER", "USER", "LOGNAME") or login() or "anonymous"
    return Settings(
        defaulthost=ctl("defaulthost", "QMAILDEFAULTHOST"),
        defaultdomain=ctl("defaultdomain", "QMAILDEFAULTDOMAIN"),
        plusdomain=ctl("plusdomain", "QMAILPLUSDOMAIN"),
        idhost=ctl("idhost", "QMAILIDHOST"),
        mailuser=mailuser,
        mailhost=mailhost,
        mailruser=env.get("QMAILSUSER") or mailuser,
        mailrhost=env.get("QMAILSHOST") or mailhost,
        fullname=_first(env, "QMAILNAME", "MAILNAME", "NAME"),
        flags=env.get("QMAILINJECT", ""),
    )


def _login_name() -> str | None:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return None


# ----------------------------------------------------------------------------- reading the header

def _valid_field(line: bytes) -> bool:
    """hfield_valid: a colon, and before it (less trailing blanks) a non-empty printable name."""
    j = line.find(b":")
    if j < 0:
        return False
    name = line[:j].rstrip(b" \t")
    return bool(name) and all(32 < c < 127 for c in name)


def _lf(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2] + b"\n"
    return line if line.endswith(b"\n") else line + b"\n"


def read_header(readline: Callable[[], bytes]) -> tuple[list[bytes], bytes, bool]:
    """qmail's headerbody: (header fields with their continuation lines, start of body, eof).

    The header ends at an empty line (kept as the body's start) or at the first line that is
    neither a field nor a continuation; that line starts the body after an added empty line.
    """
    fields: list[bytes] = []
    cur: bytes | None = None
    while True:
        raw = readline()
        if not raw:
            if cur is not None:
                fields.append(cur)
            return fields, b"", True
        line = _lf(raw)
        if cur is not None:
            if line[:1] in (b" ", b"\t"):
                cur += line
                continue
            fields.append(cur)
            cur = None
        if line == b"\n":
            return fields, b"\n", False
        if line.startswith(b"From "):
            cur = b"MBOX-Line: " + line
        elif _valid_field(line):
            cur = line
        else:
            return fields, b"\n" + line, False


def field_name(field: bytes) -> str:
    """The field's name, lower case (blanks before the colon allowed, as hfield.c's hmatch)."""
    return field[:field.find(b":")].rstrip(b" \t").decode("latin-1").lower()


# ----------------------------------------------------------------------------- addresses

def _is_dot_atom(s: str) -> bool:
    return bool(s) and all(p and all(c in _ATEXT or ord(c) > 127 for c in p) for p in s.split("."))


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unquote_address(addr: str) -> str:
    """The envelope form of a header address: ``"john doe"@x`` -> ``john doe@x``."""
    at = addr.rfind("@")
    local = addr if at < 0 else addr[:at]
    if len(local) >= 2 and local[0] == '"' and local[-1] == '"':
        inner = local[1:-1]
        out, i = [], 0
        while i < len(inner):
            if inner[i] == "\\" and i + 1 < len(inner):
                i += 1
            out.append(inner[i])
            i += 1
        local = "".join(out)
    return local if at < 0 else f"{local}{addr[at:]}"


def _header_address(addr: str) -> str:
    """An envelope address as it must be written in a header (local part quoted if needed)."""
    at = addr.rfind("@")
    local = addr if at < 0 else addr[:at]
    if local.startswith('"') or _is_dot_atom(local):
        return addr
    return _quote(local) + ("" if at < 0 else addr[at:])


def _format_mailbox(name: str, addr: str) -> str:
    addr = _header_address(addr)
    if not name:
        return addr
    if any(c in _PHRASE_SPECIALS for c in name):
        name = _quote(name)
    return f"{name} <{addr}>"


def _tokens(value: str) -> list[tuple[str, str]]:
    """RFC 5322 lexical tokens: (kind, text) with kind ``q`` quoted string (text unquoted), ``c``
    comment (text inside), ``l`` domain literal, ``a`` atom, or the special character itself."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(value)
    while i < n:
        ch = value[i]
        if ch in " \t\r\n":
            i += 1
        elif ch == '"':
            buf, i = [], i + 1
            while i < n and value[i] != '"':
                if value[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(value[i])
                i += 1
            out.append(("q", "".join(buf)))
            i += 1
        elif ch == "(":
            depth, buf, i = 1, [], i + 1
            while i < n and depth:
                c = value[i]
                if c == "\\" and i + 1 < n:
                    i += 1
                    c = value[i]
                elif c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                if depth:
                    buf.append(c)
                i += 1
            out.append(("c", "".join(buf)))
        elif ch == "[":
            j = value.find("]", i)
            j = n if j < 0 else j + 1
            out.append(("l", value[i:j]))
            i = j
        elif ch in "<>,:;@.":
            out.append((ch, ch))
            i += 1
        else:
            j = i
            while j < n and value[j] not in ' \t\r\n"()[]<>,:;@.':
                j += 1
            out.append(("a", value[i:j]))
            i = j
    return out


def _phrase(toks: list[tuple[str, str]]) -> str:
    words: list[str] = []
    for kind, text in toks:
        if kind == "." and words:
            words[-1] += "."
        elif kind in ("a", "q"):
            words.append(text)
    return " ".join(words)


def _spec(toks: list[tuple[str, str]]) -> str:
    return "".join(_quote(t) if k == "q" else t for k, t in toks if k != "c")


def _mailbox(toks: list[tuple[str, str]], angle: list[tuple[str, str]] | None) -> tuple[str, str]:
    comments = [t for k, t in toks if k == "c"]
    if angle is not None:
        colon = max((i for i, (k, _) in enumerate(angle) if k == ":"), default=-1)
        name = _phrase(toks) or (comments[-1] if comments else "")
        return name, _spec(angle[colon + 1:])  # a source route (@a,@b:) is dropped
    return (comments[-1] if comments else ""), _spec(toks)


def parse_addresses(value: str) -> list[tuple[str, str]]:
    """(display name, address) pairs of an address-list field value; empty addresses left out.

    The same results as email.utils.getaddresses for well-formed lists (the tests check this),
    without its import cost on the start-up path: quoted strings, comments (a comment names a
    bare address), ``Name <addr>``, source routes and groups (flattened).
    """
    out: list[tuple[str, str]] = []
    toks: list[tuple[str, str]] = []
    angle: list[tuple[str, str]] = []
    seen_angle = in_angle = False

    def end() -> None:
        nonlocal toks, angle, seen_angle
        name, addr = _mailbox(toks, angle if seen_angle else None)
        if addr:
            out.append((name, addr))
        toks, angle, seen_angle = [], [], False

    for tok in _tokens(value):
        kind = tok[0]
        if in_angle:
            if kind == ">":
                in_angle = False
            else:
                angle.append(tok)
        elif kind == "<":
            if seen_angle:
                end()  # a second <addr> without a comma: a new mailbox, as getaddresses reads it
            in_angle = seen_angle = True
        elif kind in (",", ";"):
            end()
        elif kind == ":" and not seen_angle and all(k != "@" for k, _ in toks):
            toks = []  # "group name:" starts a group; its members are listed like any others
        else:
            toks.append(tok)
    end()
    return out


def qualify_field(field: bytes, s: Settings) -> tuple[bytes, list[str]]:
    """Qualify the addresses of an address field: (the field, maybe re-written; its addresses).

    The field is re-formatted only if an address changed, as ``Name: a, b`` (one address per
    line when it would exceed 78 characters).
    """
    text = field.decode(*_ENC)
    colon = text.index(":")
    pairs = parse_addresses(text[colon + 1:])
    changed = False
    out: list[tuple[str, str]] = []
    for name, addr in pairs:
        q = s.qualify(addr)
        changed = changed or q != addr
        out.append((name, q))
    addrs = [unquote_address(a) for _, a in out]
    if not changed:
        return field, addrs
    items = [_format_mailbox(n, a) for n, a in out]
    head = text[:colon + 1]
    one = f"{head} {', '.join(items)}"
    folded = one if len(one) <= 78 else f"{head} " + ",\n  ".join(items)
    return (folded + "\n").encode(*_ENC), addrs


def check_recipient(arg: str, s: Settings) -> str:
    """A recipient given as an argument, qualified; PermanentFailure if it is not an address."""
    addr = arg.strip()
    if "<" in addr:
        pairs = parse_addresses(addr)
        if len(pairs) != 1:
            raise PermanentFailure(f"unable to parse address: {arg}")
        addr = unquote_address(pairs[0][1])
    qualified = s.qualify(addr) if addr else ""
    if not qualified or any(c in addr for c in "\0\r\n"):  # "@" or "." qualify to nothing
        raise PermanentFailure(f"unable to parse address: {arg!r}")
    return qualified


# ----------------------------------------------------------------------------- new fields

def rfc5322_date(when: float) -> str:
    """``Tue, 3 Mar 2026 14:05:09 +0100``: local time with its offset (C locale names)."""
    t = time.localtime(when)
    off = t.tm_gmtoff // 60
    sign = "-" if off < 0 else "+"
    off = abs(off)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{off // 60:02d}{off % 60:02d}")


_msgid_seq = 0


def message_id(when: float, pid: int, idhost: str) -> str:
    """``<YYYYMMDDhhmmss.pid.n@idhost>`` (UTC), n counting within this process."""
    global _msgid_seq
    _msgid_seq += 1
    return f"<{time.strftime('%Y%m%d%H%M%S', time.gmtime(when))}.{pid}.{_msgid_seq}@{idhost}>"


def default_from(s: Settings) -> str:
    """The From value qmail-inject makes: ``"Full Name" <user@host>`` or ``user@host``."""
    user = s.mailuser if _is_dot_atom(s.mailuser) else _quote(s.mailuser)
    addr = s.qualify(f"{user}@{s.mailhost}" if s.mailhost else user)
    if not s.fullname:
        return addr
    if "c" in s.flags:
        return f"{addr} ({s.fullname})"
    return f"{_quote(s.fullname)} <{addr}>"


def default_sender(s: Settings, when: float, pid: int) -> str:
    """The envelope sender without -f or Return-Path (QMAILSUSER/QMAILSHOST; flags m and r)."""
    user = s.mailruser
    if "m" in s.flags:
        user += f"-{int(when)}.{pid}"
    if "r" in s.flags:
        user += "-"
    addr = unquote_address(s.qualify(f"{user}@{s.mailrhost}" if s.mailrhost else user))
    return addr + "-@[]" if "r" in s.flags else addr


# ----------------------------------------------------------------------------- the whole header

class Prepared(NamedTuple):
    """What the header decides: the header to queue (new fields first), envelope sender and recipients."""

    header: bytes
    sender: str
    recipients: list[str]


def prepare(fields: list[bytes], s: Settings, *, sender: str | None, args: list[str],
            strategy: str = "default", when: float | None = None, pid: int | None = None) -> Prepared:
    """Apply qmail-inject's header rules (pure).

    ``strategy``: ``args`` (arguments only: sendmail without -t), ``header`` (header only),
    ``both`` (-t), ``default`` (arguments if any, else the header). ``sender`` is -f (qualified
    here), or None.
    """
    when = time.time() if when is None else when
    pid = os.getpid() if pid is None else pid
    rcpt_args = [check_recipient(a, s) for a in args] if strategy != "header" else []
    env_sender = None if sender is None else _envelope_sender(sender, s)

    seen: set[str] = set()
    kept: list[bytes] = []
    header_rcpt: list[str] = []
    resent_rcpt: list[str] = []
    for field in fields:
        name = field_name(field)
        if (name == "from" and "f" in s.flags) or (name == "message-id" and "i" in s.flags) \
                or (name == "return-path" and "s" in s.flags):
            continue
        seen.add(name)
        if name in _HEADER_RCPT or name in _RESENT_RCPT or name in _SENDERS or name == "return-path":
            field, addrs = qualify_field(field, s)
            if name in _HEADER_RCPT:
                header_rcpt += addrs
            elif name in _RESENT_RCPT:
                resent_rcpt += addrs
            elif name == "return-path" and env_sender is None:
                empty = field[field.find(b":") + 1:].strip() == b"<>"
                if addrs or empty:
                    env_sender = ("" if empty else addrs[0]) + ("-@[]" if "r" in s.flags else "")
        if name not in _DROPPED:
            kept.append(field)

    if env_sender is None:
        env_sender = default_sender(s, when, pid)
    resent = not seen.isdisjoint(_RESENT)
    prefix = "Resent-" if resent else ""
    new: list[str] = []
    if f"{prefix.lower()}date" not in seen:
        new.append(f"{prefix}Date: {rfc5322_date(when)}\n")
    if f"{prefix.lower()}message-id" not in seen:
        new.append(f"{prefix}Message-ID: {message_id(when, pid, s.idhost)}\n")
    if f"{prefix.lower()}from" not in seen:
        new.append(f"{prefix}From: {default_from(s)}\n")
    to_cc = {"resent-to", "resent-cc"} if resent else _TO_CC
    if seen.isdisjoint(to_cc):
        new.append(f"{prefix}Cc: recipient list not shown: ;\n")

    from_header = resent_rcpt if resent else header_rcpt
    if strategy == "args":
        rcpts = rcpt_args
    elif strategy == "header":
        rcpts = from_header
    elif strategy == "both":
        rcpts = rcpt_args + from_header
    else:
        rcpts = rcpt_args if args else from_header
    if not rcpts:
        raise PermanentFailure("no recipients (give them as arguments, or use -t with To/Cc/Bcc)")
    header = "".join(new).encode(*_ENC) + b"".join(kept)
    return Prepared(header=header, sender=env_sender, recipients=rcpts)


def _envelope_sender(arg: str, s: Settings) -> str:
    """-f: ``<>`` or empty is the null sender; ``<addr>`` loses its brackets; then qualified."""
    addr = arg.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    if any(c in addr for c in "\0\r\n"):
        raise PermanentFailure(f"unable to parse sender address: {arg!r}")
    return unquote_address(s.qualify(addr))


# ----------------------------------------------------------------------------- the body

class _LF:
    """CRLF -> LF across block boundaries, and a final LF after a last line without one."""

    def __init__(self) -> None:
        self.cr = False  # the previous block ended in CR (held back)
        self.last = b"\n"

    def feed(self, block: bytes) -> bytes:
        if self.cr:
            block = b"\r" + block
            self.cr = False
        if block.endswith(b"\r"):
            block = block[:-1]
            self.cr = True
        out = block.replace(b"\r\n", b"\n")
        if out:
            self.last = out[-1:]
        return out

    def end(self) -> bytes:
        tail = b"\r" if self.cr else b""
        self.cr = False
        last = tail[-1:] or self.last
        return tail + (b"\n" if last != b"\n" else b"")


def _body(stream: BufferedIOBase, lf: _LF, start: bytes) -> tuple[bytes, Iterator[bytes] | None]:
    """(the body's first part, the rest as a stream or None when the whole body was read)."""
    read = getattr(stream, "read1", stream.read)
    parts = [start]
    size = len(start)
    while size < PREREAD:
        block = read(1 << 16)
        if not block:
            parts.append(lf.end())
            return b"".join(parts), None
        block = lf.feed(block)
        parts.append(block)
        size += len(block)

    def rest() -> Iterator[bytes]:
        while block := read(1 << 16):
            yield lf.feed(block)
        yield lf.end()

    return b"".join(parts), rest()


# ----------------------------------------------------------------------------- the command

def inject(root: str | os.PathLike[str], stream: BufferedIOBase, *, sender: str | None,
           recipients: list[str], strategy: str = "default", env: Mapping[str, str] | None = None,
           print_to: BufferedIOBase | None = None) -> int | None:
    """Read a message from ``stream``, apply the header rules and queue it under ``root``.

    Returns the message id, or None with ``print_to`` (qmail-inject -n: the message is written
    there, after a Return-Path line, instead of being queued). Raises PermanentFailure (bad
    address, no recipients) or TemporaryFailure (controls unreadable, queue unusable, read error).
    """
    env = os.environ if env is None else env
    root = os.fspath(root)
    s = settings_from(env, read_control(os.path.join(root, "control")), _login_name)
    when = time.time()
    try:
        fields, start, eof = read_header(stream.readline)
        lf = _LF()
        start = lf.feed(start) if start else b""
        if eof:
            first, rest = b"", None
        else:
            first, rest = _body(stream, lf, start)
    except OSError as e:
        raise TemporaryFailure(f"read error: {e.strerror or e}") from None
    p = prepare(fields, s, sender=sender, args=recipients, strategy=strategy, when=when)

    if print_to is not None:
        print_to.write(b"Return-Path: <" + p.sender.encode(*_ENC) + b">\n" + p.header + first)
        for block in rest or ():
            print_to.write(block)
        print_to.flush()
        return None

    from pqmail.queue.store import Queue

    qdir = os.path.join(root, "queue")
    if not os.path.isdir(os.path.join(qdir, "todo")):
        raise TemporaryFailure(f"{qdir}: no queue here (create the tree with pqmail init)")
    message: list[object] = [p.header, first]
    if rest is not None:
        message.append(rest)
    # A read error while the rest of stdin streams in is the store's TemporaryFailure.
    return Queue(qdir).enqueue(p.sender, p.recipients, message)
