"""The lines qmail-local writes and the environment it gives programs (qmail-semantics.md §3.4, §3.6).

Pure functions over bytes: ``Delivered-To`` (DTLINE), ``Return-Path`` (RPLINE, with quote.c's
``quote2``), the mbox ``From_`` line (UFLINE, with myctime.c's date) and the program environment
(SENDER ... UFLINE). The values come from remote senders and are not sanitised beyond what qmail
does (LF -> ``_`` in DTLINE/RPLINE, space/tab/LF -> ``-`` in UFLINE): programs must treat them as
hostile. No I/O here.

Text becomes bytes by the convention of where it came from: envelope addresses are decoded by the
queue as UTF-8 with surrogateescape (:func:`addr_bytes` / :func:`addr_text` undo that exactly);
users/assign fields and control files are decoded latin-1 (:func:`to_bytes`, which falls back to
UTF-8 with surrogateescape for text that cannot have come from latin-1). 8-bit data passes unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

# quote.c's table: characters that may stand unquoted in an RFC 822 local part.
_OK = frozenset(
    b"!#$%&'*+-./0123456789=?ABCDEFGHIJKLMNOPQRSTUVWXYZ^_`abcdefghijklmnopqrstuvwxyz{|}~"
)
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")  # time.struct_time.tm_wday: Monday is 0
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_UF_TRANS = bytes.maketrans(b" \t\n", b"---")


def to_bytes(text: str) -> bytes:
    """``text`` as the bytes it was decoded from (latin-1, else UTF-8 with surrogateescape)."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


def addr_bytes(address: str) -> bytes:
    """An envelope address from the queue as the bytes it was received as."""
    return address.encode("utf-8", "surrogateescape")


def addr_text(data: bytes) -> str:
    """Address bytes (a forward line of a dot-qmail file) as the queue's text for them."""
    return data.decode("utf-8", "surrogateescape")


def _quote_need(box: bytes) -> bool:
    if not box:
        return True
    if any(ch not in _OK for ch in box):
        return True
    return box[0] == 0x2E or box[-1] == 0x2E or b".." in box


def _quote(box: bytes) -> bytes:
    if not _quote_need(box):
        return box
    out = bytearray(b'"')
    for ch in box:
        if ch in b'\r\n"\\':
            out += b"\\"
        out.append(ch)
    out += b'"'
    return bytes(out)


def quote2(addr: bytes) -> bytes:
    """quote.c's ``quote2``: quote the local part (before the last ``@``) only if RFC 822 requires it."""
    if not addr:
        return addr
    at = addr.rfind(b"@")
    if at < 0:
        return _quote(addr)
    return _quote(addr[:at]) + addr[at:]


def dtline(recipient: bytes) -> bytes:
    """``Delivered-To: local@host`` + LF, any LF inside replaced by ``_``."""
    return b"Delivered-To: " + recipient.replace(b"\n", b"_") + b"\n"


def rpline(sender: bytes) -> bytes:
    """``Return-Path: <sender>`` + LF with the local part quoted (quote2), any LF inside replaced by ``_``."""
    return b"Return-Path: <" + quote2(sender).replace(b"\n", b"_") + b">\n"


def myctime(t: float) -> bytes:
    """myctime.c: ``Www Mmm DD HH:MM:SS YYYY`` + LF in UTC, the day zero-padded to two digits."""
    tm = time.gmtime(int(t))
    return (f"{_DAYS[tm.tm_wday]} {_MONTHS[tm.tm_mon - 1]} {tm.tm_mday:02d} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} {tm.tm_year}\n").encode()


def ufline(sender: bytes, t: float) -> bytes:
    """The mbox ``From_`` line: space/tab/LF in the sender -> ``-``; empty sender -> ``MAILER-DAEMON``."""
    who = sender.translate(_UF_TRANS) if sender else b"MAILER-DAEMON"
    return b"From " + who + b" " + myctime(t)


def host_parts(host: bytes) -> tuple[bytes, bytes, bytes]:
    """HOST2, HOST3, HOST4: ``host`` cut at its last, second-to-last, third-to-last dot (else unchanged)."""
    out = []
    end = len(host)
    for _ in range(3):
        dot = host.rfind(b".", 0, end)
        if dot >= 0:
            end = dot
        out.append(host[:end])
    return out[0], out[1], out[2]


def ext_parts(ext: bytes) -> tuple[bytes, bytes, bytes]:
    """EXT2, EXT3, EXT4: what follows the first, second, third ``-`` of ``ext`` (empty if none)."""
    out = []
    rest = ext
    for _ in range(3):
        dash = rest.find(b"-")
        rest = rest[dash + 1:] if dash >= 0 else b""
        out.append(rest)
    return out[0], out[1], out[2]


def program_env(
    base: Mapping[bytes, bytes], *, sender: bytes, newsender: bytes, local: bytes, host: bytes,
    user: bytes, home: bytes, ext: bytes, default: bytes | None, dtline: bytes, rpline: bytes,
    ufline: bytes,
) -> dict[bytes, bytes]:
    """The environment of a ``|program`` line: ``base`` (the delivery process's own) plus §3.6's variables.

    ``DEFAULT`` is present only when a ``default`` file matched (an inherited one is removed). A value
    ends at its first NUL byte, as qmail's C strings do (exec could not pass it anyway).
    """
    env = dict(base)
    env.pop(b"DEFAULT", None)
    h2, h3, h4 = host_parts(host)
    e2, e3, e4 = ext_parts(ext)
    env.update({
        b"SENDER": sender, b"NEWSENDER": newsender, b"RECIPIENT": local + b"@" + host,
        b"USER": user, b"HOME": home, b"HOST": host, b"HOST2": h2, b"HOST3": h3, b"HOST4": h4,
        b"LOCAL": local, b"EXT": ext, b"EXT2": e2, b"EXT3": e3, b"EXT4": e4,
        b"DTLINE": dtline, b"RPLINE": rpline, b"UFLINE": ufline,
    })
    if default is not None:
        env[b"DEFAULT"] = default
    for key, value in env.items():
        if b"\0" in value:
            env[key] = value.split(b"\0", 1)[0]
    return env
