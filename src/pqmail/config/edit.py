"""Edit qmail's line-oriented configuration files the way an administrator would, but atomically.

One editor serves every file provisioning touches: ``control/rcpthosts`` (one name a line),
``control/virtualdomains`` and ``control/smtproutes`` (``key:value``), ``users/handles``
(``handle:base``) and ``users/assign`` (``=local:…`` / ``+loc:…`` lines before the final ``.``).
A :class:`LineFormat` says how a line's key is found and where new lines go; the pure functions
(:func:`add_line`, :func:`replace_line`, :func:`remove_key`, :func:`remove_line`) turn a list of lines
into a new list; :class:`LineFile` reads, applies one of them and writes the result back.

What it keeps: every comment, blank line, line order and line the edit does not concern, byte for
byte (text is latin-1, so 8-bit content survives). Adding an entry that is already there changes
nothing; adding a different entry under a key that exists is refused (a :class:`LineConflict` naming
the file and line) unless the caller asks to replace it. Removing deletes only the matching lines.

Writes go through :func:`pqmail.fsutil.atomic_write` (temp file, fsync, rename, fsync of the directory),
so a reader (qmail-smtpd re-reading rcpthosts, newu reading assign) sees the old or the new file, never
half of one. The file keeps its owner and mode, minus group and world write permission. Nothing here
serialises two editors: callers that read-modify-write several files hold their own lock.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pqmail.config.casefold import ascii_lower
from pqmail.errors import ConfigError, UsageError
from pqmail.fsutil import atomic_write

__all__ = [
    "ASSIGN",
    "COLON",
    "NAMES",
    "LineConflict",
    "LineFile",
    "LineFormat",
    "add_line",
    "entries",
    "remove_key",
    "remove_line",
    "replace_line",
]

KeyFunc = Callable[[str], "str | None"]


def _strip(line: str) -> str:
    """control_readfile's view of a line: trailing spaces and tabs do not count."""
    return line.rstrip(" \t")


def _comment_or_blank(line: str) -> bool:
    text = _strip(line)
    return text == "" or text.startswith("#")


def name_key(line: str) -> str | None:
    """rcpthosts-style files: the whole line, ignoring ASCII case; comments and blanks have no key."""
    return None if _comment_or_blank(line) else ascii_lower(_strip(line))


def colon_key(line: str) -> str | None:
    """virtualdomains/smtproutes/handles: the text before the first ``:``; lines without one have no key."""
    if _comment_or_blank(line) or ":" not in line:
        return None
    return ascii_lower(line.split(":", 1)[0])


def assign_key(line: str) -> str | None:
    """users/assign: kind and address (``+example.com-``, ``=joe``), ignoring case as qmail-newu does."""
    if ":" not in line:
        return None
    head = line.split(":", 1)[0]
    kind = "+" if head.startswith("+") else "="
    return kind + ascii_lower(head[1:])


@dataclass(frozen=True)
class LineFormat:
    """How to read one kind of file.

    ``key`` names the entry a line holds (None: not an entry). ``terminator``: a line starting with it
    ends the entries (assign's ``.``); new lines go right before it, and lines after it are left alone.
    ``valued``: lines are ``key:value`` and two lines are the same entry when their keys (case ignored)
    and values (case kept) are equal; otherwise the key is the whole entry. ``exact``: values are
    compared byte for byte (assign) rather than ignoring trailing white space.
    """

    key: KeyFunc
    terminator: str | None = None
    valued: bool = True
    exact: bool = False

    def same(self, a: str, b: str) -> bool:
        if self.key(a) != self.key(b):
            return False
        if not self.valued:
            return True
        if not self.exact:
            a, b = _strip(a), _strip(b)
        return a.partition(":")[2] == b.partition(":")[2]


NAMES = LineFormat(name_key, valued=False)
COLON = LineFormat(colon_key)
ASSIGN = LineFormat(assign_key, terminator=".", exact=True)


class LineConflict(UsageError):
    """An entry with the same key but different text is already there."""

    def __init__(self, path: str, lineno: int, existing: str, wanted: str) -> None:
        self.path, self.lineno, self.existing, self.wanted = path, lineno, existing, wanted
        super().__init__(f"{path}:{lineno}: already has {_strip(existing)!r}; "
                         f"not adding {_strip(wanted)!r} (remove or change that line first)")


class _Conflict(Exception):
    """Pure-layer signal: the index of the clashing line."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


# ----------------------------------------------------------------------------- pure edits

def _end(lines: list[str], fmt: LineFormat) -> int | None:
    """Index of the terminator line, len(lines) without a terminator format, None if it is missing."""
    if fmt.terminator is None:
        return len(lines)
    for i, line in enumerate(lines):
        if line.startswith(fmt.terminator):
            return i
    return None


def _entry_indexes(lines: list[str], fmt: LineFormat, key: str) -> list[int]:
    end = _end(lines, fmt)
    return [i for i in range(end if end is not None else len(lines)) if fmt.key(lines[i]) == key]


def _checked_key(fmt: LineFormat, line: str) -> str:
    if "\n" in line or "\0" in line:
        raise ValueError(f"a line may not contain a newline or NUL: {line!r}")
    key = fmt.key(line)
    if key is None:
        raise ValueError(f"not an entry line: {line!r}")
    return key


def _insert(lines: list[str], fmt: LineFormat, line: str) -> list[str]:
    end = _end(lines, fmt)
    if end is None:  # an empty assign: the entries and the final '.'
        if lines:
            raise ValueError("no terminator line")
        return [line, fmt.terminator or ""]
    return [*lines[:end], line, *lines[end:]]


def add_line(lines: list[str], fmt: LineFormat, line: str) -> list[str] | None:
    """``lines`` with ``line`` added (None: it is already there). Raises _Conflict for a clashing key."""
    key = _checked_key(fmt, line)
    for i in _entry_indexes(lines, fmt, key):
        if fmt.same(lines[i], line):
            return None
        raise _Conflict(i)
    return _insert(lines, fmt, line)


def replace_line(lines: list[str], fmt: LineFormat, line: str) -> list[str] | None:
    """``line`` in place of the first entry with its key (others with that key dropped), else added."""
    key = _checked_key(fmt, line)
    found = _entry_indexes(lines, fmt, key)
    if not found:
        return _insert(lines, fmt, line)
    if len(found) == 1 and fmt.same(lines[found[0]], line):
        return None
    drop = set(found[1:])
    return [line if i == found[0] else text for i, text in enumerate(lines) if i not in drop]


def remove_key(lines: list[str], fmt: LineFormat, key: str) -> tuple[list[str], int]:
    """``lines`` without the entries whose key is ``key`` (as the key function gives it; case ignored)."""
    drop = set(_entry_indexes(lines, fmt, ascii_lower(key)))
    return [t for i, t in enumerate(lines) if i not in drop], len(drop)


def remove_line(lines: list[str], fmt: LineFormat, line: str) -> tuple[list[str], int]:
    """``lines`` without the entries equal to ``line`` (so a hand-changed entry is left alone)."""
    key = _checked_key(fmt, line)
    drop = {i for i in _entry_indexes(lines, fmt, key) if fmt.same(lines[i], line)}
    return [t for i, t in enumerate(lines) if i not in drop], len(drop)


def entries(lines: list[str], fmt: LineFormat) -> list[tuple[int, str, str]]:
    """(line number, key, text) of every entry line, in file order."""
    end = _end(lines, fmt)
    out = []
    for i in range(end if end is not None else len(lines)):
        key = fmt.key(lines[i])
        if key is not None:
            out.append((i + 1, key, _strip(lines[i]) if not fmt.exact else lines[i]))
    return out


# ----------------------------------------------------------------------------- the file

def _split(data: bytes) -> list[str]:
    text = data.decode("latin-1")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the text after the final LF is not a line
    return lines


class LineFile:
    """One configuration file, edited in place: read, change, write back atomically if it changed.

    ``mode``/``uid``/``gid`` apply when the file is created; an existing file keeps its owner and its
    mode (without group/world write permission, which qmail's conf-patrn 022 forbids).
    """

    def __init__(self, path: str | os.PathLike[str], fmt: LineFormat, *, mode: int = 0o644,
                 uid: int | None = None, gid: int | None = None) -> None:
        self.path = Path(path)
        self.fmt = fmt
        self.mode = mode
        self.uid = uid
        self.gid = gid

    def read(self) -> list[str]:
        """The lines (no LF); ``[]`` when the file is missing. Unreadable: ConfigError naming it."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise ConfigError(self.path, f"unable to read: {e.strerror or e}") from None
        if b"\0" in data:
            lineno = data[:data.index(b"\0")].count(b"\n") + 1
            raise ConfigError(self.path, "contains a NUL byte", lineno)
        lines = _split(data)
        if self.fmt.terminator is not None and lines and _end(lines, self.fmt) is None:
            raise ConfigError(self.path, f"no final line starting with {self.fmt.terminator!r}; "
                                         "fix the file by hand first", len(lines))
        return lines

    def entries(self) -> list[tuple[int, str, str]]:
        """(line number, key, text) of every entry line."""
        return entries(self.read(), self.fmt)

    def find(self, key: str) -> list[tuple[int, str]]:
        """(line number, text) of the entries with ``key`` (as the key function gives it; case ignored)."""
        key = ascii_lower(key)
        return [(n, text) for n, k, text in self.entries() if k == key]

    def add(self, line: str) -> bool:
        """Add ``line`` unless it is there; True if the file changed. LineConflict on a clashing key."""
        lines = self.read()
        try:
            new = add_line(lines, self.fmt, line)
        except _Conflict as c:
            raise LineConflict(str(self.path), c.index + 1, lines[c.index], line) from None
        return self._commit(new)

    def check_add(self, line: str) -> bool:
        """Whether :meth:`add` would change the file; LineConflict if it would refuse. Writes nothing."""
        lines = self.read()
        try:
            return add_line(lines, self.fmt, line) is not None
        except _Conflict as c:
            raise LineConflict(str(self.path), c.index + 1, lines[c.index], line) from None

    def replace(self, line: str) -> bool:
        """Put ``line`` in place of the entry with the same key (or add it); True if the file changed."""
        return self._commit(replace_line(self.read(), self.fmt, line))

    def remove(self, key: str) -> int:
        """Delete the entries with ``key``; the number deleted."""
        new, n = remove_key(self.read(), self.fmt, key)
        if n:
            self._commit(new)
        return n

    def remove_line(self, line: str) -> int:
        """Delete the entries equal to ``line``; the number deleted."""
        new, n = remove_line(self.read(), self.fmt, line)
        if n:
            self._commit(new)
        return n

    def _commit(self, lines: list[str] | None) -> bool:
        if lines is None:
            return False
        data = "".join(f"{line}\n" for line in lines).encode("latin-1")
        mode, uid, gid = self.mode, self.uid, self.gid
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            pass
        else:
            mode = st.st_mode & 0o755
            uid, gid = (st.st_uid, st.st_gid) if os.geteuid() == 0 else (None, None)
        atomic_write(self.path, data, mode=mode, uid=uid, gid=gid)
        return True
