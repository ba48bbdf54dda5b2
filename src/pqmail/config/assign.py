"""users/assign, users/cdb and control/morercpthosts.cdb: qmail-newu, qmail-lspawn's lookup, qmail-newmrh.

``users/assign`` is parsed exactly as qmail-newu.c parses it (qmail-semantics.md §2.1): a line is
``<kind><local>:user:uid:gid:home:dash:ext:`` where any kind other than ``+`` means ``=``, at least six
colons must follow the first, anything after the sixth is ignored, NUL bytes are forbidden, and the file
ends with a line starting with ``.``. pqmail is stricter in one point: uid and gid must be decimal
numbers (qmail-newu copies whatever is there and qmail-lspawn would read garbage as uid 0).

:func:`compile_assign` writes the records qmail-newu writes, in its order, so that ``cdb -d`` prints the
same dump for the same assign file: one record a line, keys ``"!" + lower(local) + "\\0"`` for ``=`` and
``"!" + lower(loc)`` for ``+`` (duplicates are written too; the first wins on lookup), values
``user\\0uid\\0gid\\0home\\0dash\\0ext`` with no final NUL, and last the empty key whose value lists the
distinct last characters of the non-empty wildcard ``loc`` strings, in order of first appearance and in
the case written (qmail-newu takes them from the line before lowercasing).

:class:`UsersDB` answers qmail-lspawn's ``nughde_get`` from ``users/cdb`` only (§2.3). One deliberate
difference: qmail-lspawn compares the *lowercased* address against that case-preserving character set, so
a wildcard whose ``loc`` ends in an upper-case letter can never match there; qmail-users(5) says keys are
matched without regard to case, and pqmail follows the manual by comparing case-insensitively.

What it trusts: nothing in users/assign; users/cdb is trusted to be what newu wrote (it is root's file).
What it never does: read users/assign to answer a lookup, or leave a half-written cdb in place.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cdbx

from pqmail.errors import ConfigError
from pqmail.fsutil import fsync_dir
from pqmail.paths import Root

__all__ = [
    "AssignEntry",
    "AssignLine",
    "CachedCdb",
    "UsersDB",
    "assign_records",
    "compile_assign",
    "compile_morercpthosts",
    "morercpthosts_records",
    "parse_assign",
    "write_cdb",
]

T = TypeVar("T")

_DECIMAL = re.compile(r"[0-9]+")
_MAX_ID = 2**32 - 1


@dataclass(frozen=True)
class AssignEntry:
    """One users/cdb answer: deliver as ``user`` (uid, gid) via ``home/.qmail`` + ``dash`` + ``ext``."""

    user: str
    uid: int
    gid: int
    home: str
    dash: str
    ext: str


@dataclass(frozen=True)
class AssignLine:
    """One parsed assign line: kind ``=`` (exact) or ``+`` (wildcard), the key as written, its entry.

    ``fields`` keeps the six fields exactly as written (``uid`` ``0100`` stays ``0100``) so that the
    compiled record is byte-for-byte qmail-newu's.
    """

    kind: str
    key: str
    entry: AssignEntry
    lineno: int
    fields: tuple[str, ...] = ()

    def raw_fields(self) -> tuple[str, ...]:
        if self.fields:
            return self.fields
        e = self.entry
        return (e.user, str(e.uid), str(e.gid), e.home, e.dash, e.ext)


# ----------------------------------------------------------------------------- parsing (pure)

def parse_assign(data: bytes, path: str | os.PathLike[str] = "users/assign") -> list[AssignLine]:
    """Parse ``users/assign`` as qmail-newu does; a ConfigError names the file and line of any fault."""
    where = os.fspath(path)
    lines: list[AssignLine] = []
    pos = 0
    lineno = 0
    while True:
        lineno += 1
        if pos >= len(data):
            raise ConfigError(where, "missing the final line starting with '.' (the file must end with one)",
                              lineno)
        nl = data.find(b"\n", pos)
        raw = data[pos:] if nl < 0 else data[pos:nl]
        pos = len(data) if nl < 0 else nl + 1
        if raw.startswith(b"."):
            return lines  # qmail-newu stops here; the rest of the file is ignored
        if nl < 0:
            raise ConfigError(where, "last line has no newline, and no final '.' line follows", lineno)
        lines.append(_parse_line(raw.decode("latin-1"), where, lineno))


def _parse_line(text: str, where: str, lineno: int) -> AssignLine:
    if "\0" in text:
        raise ConfigError(where, "NUL byte in line", lineno)
    colon = text.find(":")
    if colon < 0:
        raise ConfigError(where, "no ':' in line (expected =local:user:uid:gid:home:dash:ext:)", lineno)
    if colon == 0:
        raise ConfigError(where, "line starts with ':' (expected '=' or '+' first)", lineno)
    kind = "+" if text[0] == "+" else "="
    parts = text[colon + 1:].split(":", 6)
    if len(parts) < 7:
        raise ConfigError(where, f"{len(parts) - 1} colons after the address, need 6 "
                                 "(user:uid:gid:home:dash:ext: with the trailing ':')", lineno)
    fields = tuple(parts[:6])
    uid = _parse_id(fields[1], "uid", where, lineno)
    gid = _parse_id(fields[2], "gid", where, lineno)
    entry = AssignEntry(fields[0], uid, gid, fields[3], fields[4], fields[5])
    return AssignLine(kind, text[1:colon], entry, lineno, fields)


def _parse_id(text: str, what: str, where: str, lineno: int) -> int:
    if not _DECIMAL.fullmatch(text) or int(text) > _MAX_ID:
        raise ConfigError(where, f"{what} {text!r} is not a decimal number (0 to {_MAX_ID})", lineno)
    return int(text)


def _lower_bytes(text: str) -> bytes:
    # bytes.lower() folds ASCII only, exactly as qmail's case_lowerb.
    return text.encode("latin-1").lower()


def assign_records(lines: Iterable[AssignLine]) -> list[tuple[bytes, bytes]]:
    """qmail-newu's cdb records for parsed lines, in the order it writes them (wildcard record last)."""
    records: list[tuple[bytes, bytes]] = []
    wildchars = bytearray()
    for line in lines:
        key = b"!" + _lower_bytes(line.key)
        if line.kind == "=":
            key += b"\0"
        elif line.key:
            last = line.key[-1].encode("latin-1")  # as written, before lowercasing: qmail-newu's quirk
            if last not in wildchars:
                wildchars += last
        value = b"\0".join(f.encode("latin-1") for f in line.raw_fields())
        records.append((key, value))
    records.append((b"", bytes(wildchars)))
    return records


def morercpthosts_records(data: bytes) -> list[tuple[bytes, bytes]]:
    """qmail-newmrh's records: lines lowercased, trailing space/tab/LF removed, ``#`` and empty skipped."""
    records = []
    for raw in data.split(b"\n"):
        line = raw.lower().rstrip(b" \t")
        if line and not line.startswith(b"#"):
            records.append((line, b""))
    return records


# ----------------------------------------------------------------------------- writing cdb files

def _open_locked_tmp(tmp: str, mode: int) -> int:
    """Open ``tmp`` (created 0644) holding an exclusive lock, so two newu runs never write it at once.

    After a rename the locked inode carries the final name; a waiter then sees that ``tmp`` is no
    longer its file and opens afresh.
    """
    import fcntl

    while True:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            try:
                cur = os.stat(tmp)
            except FileNotFoundError:
                cur = None
            if cur is not None and (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino):
                os.ftruncate(fd, 0)
                os.fchmod(fd, mode)  # exact, whatever the umask
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def write_cdb(tmp: Path, final: Path, records: Iterable[tuple[bytes, bytes]], mode: int = 0o644,
              uid: int | None = None, gid: int | None = None) -> int:
    """Write ``records`` to ``tmp``, fsync, rename over ``final``, fsync the directory; return the count.

    On any error ``final`` is untouched and ``tmp`` removed.
    """
    fd = _open_locked_tmp(os.fspath(tmp), mode)
    count = 0
    try:
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        maker = cdbx.CDB.make(fd, close=False, mmap=False)
        for key, value in records:
            maker.add(key, value)
            count += 1
        maker.commit().close()
        os.fsync(fd)
        os.rename(tmp, final)  # still holding the lock, so no other writer has truncated it
    except BaseException:
        _unlink_quietly(tmp)
        raise
    finally:
        os.close(fd)
    fsync_dir(final.parent)
    return count


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _read_config(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), f"unable to read {what}: file does not exist") from None
    except OSError as e:
        raise ConfigError(str(path), f"unable to read {what}: {e.strerror or e}") from None


def compile_assign(root: Root) -> int:
    """qmail-newu: compile users/assign into users/cdb atomically; return the number of records written.

    The count includes the wildcard-character record (so it is the number of assign lines + 1). A
    malformed assign raises ConfigError naming the line and leaves users/cdb as it was.
    """
    data = _read_config(root.assign, "users/assign")
    records = assign_records(parse_assign(data, root.assign))
    return _write(root.users / "cdb.tmp", root.users_cdb, records)


def compile_morercpthosts(root: Root) -> int:
    """qmail-newmrh: compile control/morercpthosts into control/morercpthosts.cdb; return the key count."""
    src = root.control_file("morercpthosts")
    records = morercpthosts_records(_read_config(src, "control/morercpthosts"))
    return _write(root.control_file("morercpthosts.tmp"), root.control_file("morercpthosts.cdb"), records)


def _write(tmp: Path, final: Path, records: list[tuple[bytes, bytes]]) -> int:
    try:
        return write_cdb(tmp, final, records)
    except OSError as e:
        raise ConfigError(str(tmp), f"unable to write {tmp.name} or move it to {final.name}: "
                                    f"{e.strerror or e}") from None


# ----------------------------------------------------------------------------- lookup

def _scan_ulong(text: bytes) -> int:
    if text.isdigit():  # the usual case, without a regex
        return int(text)
    m = re.match(rb"[0-9]*", text)
    return int(m.group()) if m and m.group() else 0


_MEMO_MAX = 65536  # users/cdb answers kept per opening of the file


class CachedCdb:
    """A cdb file kept open and re-opened whenever it is replaced (new inode, mtime or size).

    :meth:`query` runs a function on the open cdb under a lock, so concurrent threads never see a cdb
    being closed under them. Costs one ``stat`` per query. A missing file makes :meth:`query` return
    None; any other trouble raises ConfigError ("Trouble reading <name>", a temporary failure).
    ``prepare(cdb)`` runs once per opening and its result is passed to every query on that opening.
    """

    def __init__(self, path: str | os.PathLike[str], prepare: Callable[[cdbx.CDB], Any] | None = None,
                 name: str | None = None) -> None:
        self.path = os.fspath(path)
        self.name = name or os.path.basename(self.path)  # as the operator knows it, e.g. "users/cdb"
        self._prepare = prepare
        self._lock = threading.Lock()
        self._cdb: cdbx.CDB | None = None
        self._extra: Any = None
        self._stamp: tuple[int, int, int, int] | None = None

    def trouble(self, detail: str) -> ConfigError:
        return ConfigError(self.path, f"Trouble reading {self.name}: {detail}")

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._cdb is not None:
            self._cdb.close()
        self._cdb, self._extra, self._stamp = None, None, None

    def query(self, fn: Callable[[cdbx.CDB, Any], T]) -> T | None:
        """``fn(cdb, prepared)`` on the current file; None when the file does not exist."""
        with self._lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self._drop()
                return None
            except OSError as e:
                raise self.trouble(e.strerror or str(e)) from None
            if self._stamp != (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size):
                self._drop()
                if not self._open():
                    return None
            try:
                return fn(self._cdb, self._extra)
            except ConfigError:
                raise
            except Exception as e:  # cdbx reports a damaged file with assorted exception types
                raise self.trouble(str(e)) from None

    def _open(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise self.trouble(e.strerror or str(e)) from None
        try:
            st = os.fstat(fd)  # stamp the file actually opened, not the one stat() saw before a rename
            cdb = cdbx.CDB(fd, close=True)
        except Exception as e:
            os.close(fd)
            raise self.trouble(f"not a cdb file ({e})") from None
        try:
            extra = self._prepare(cdb) if self._prepare else None
        except BaseException as e:
            cdb.close()
            if isinstance(e, ConfigError):
                raise
            raise self.trouble(f"unreadable ({e})") from None
        self._cdb, self._extra = cdb, extra
        self._stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        return True


class UsersDB:
    """qmail-lspawn's users/cdb lookup, re-opening the cdb whenever newu replaces it.

    Safe for concurrent lookups from several threads. Costs one ``stat`` per lookup; the answers
    are remembered for as long as the same users/cdb stays in place (the queue manager asks about
    the same boxes over and over), and forgotten the moment newu replaces it. A missing users/cdb
    answers None for everything (the caller then applies qmail-getpw's fallback); any other trouble
    raises ConfigError (a temporary failure, exit 111), as qmail-lspawn reports "Trouble reading
    users/cdb".
    """

    def __init__(self, root: Root | str | os.PathLike[str]) -> None:
        path = root.users_cdb if isinstance(root, Root) else Root(root).users_cdb
        self.path = os.fspath(path)
        self._cdb = CachedCdb(path, self._wildchars, "users/cdb")

    def close(self) -> None:
        self._cdb.close()

    def _wildchars(self, cdb: cdbx.CDB) -> tuple[frozenset[int], dict[str, AssignEntry | None]]:
        """Per opening of the cdb: its wildcard characters and an empty memo of answers."""
        wild = cdb.get(b"")
        if wild is None:
            raise self._cdb.trouble("no wildcard-character record (the empty key): was it written by newu?")
        return frozenset(wild.lower()), {}

    def lookup(self, local: str) -> AssignEntry | None:
        """The assign entry for local part ``local``: exact, else the longest wildcard; None if no match."""
        return self._cdb.query(lambda cdb, prepared: self._remembered(cdb, prepared, local))

    def _remembered(self, cdb: cdbx.CDB, prepared: tuple[frozenset[int], dict[str, AssignEntry | None]],
                    local: str) -> AssignEntry | None:
        wild, memo = prepared
        try:
            return memo[local]
        except KeyError:
            pass
        try:
            raw = local.encode("latin-1")
            codec = "latin-1"
        except UnicodeEncodeError:
            raw = local.encode("utf-8", "surrogateescape")
            codec = "utf-8"
        entry = self._find(cdb, wild, b"!" + raw.lower(), raw, codec)
        if len(memo) >= _MEMO_MAX:
            memo.clear()  # a flood of distinct addresses must not grow it without bound
        memo[local] = entry
        return entry

    def _find(self, cdb: cdbx.CDB, wild: frozenset[int], key: bytes, raw: bytes,
              codec: str) -> AssignEntry | None:
        get = cdb.get
        value = get(key + b"\0")
        if value is not None:
            return self._entry(value, "")
        for i in range(len(key), 0, -1):
            if i == 1 or key[i - 1] in wild:
                value = get(key[:i])
                if value is not None:
                    rest = raw[i - 1:].decode(codec, "surrogateescape")
                    return self._entry(value, rest)
        return None

    def _entry(self, value: bytes, rest: str) -> AssignEntry:
        parts = value.split(b"\0", 5)
        if len(parts) < 6:
            raise self._cdb.trouble(f"record {value!r} has fewer than six fields")
        user, uid, gid, home, dash, ext = parts
        ext = ext.split(b"\0", 1)[0]  # a C string, as qmail-lspawn passes it to qmail-local
        return AssignEntry(user.decode("latin-1"), _scan_ulong(uid), _scan_ulong(gid), home.decode("latin-1"),
                           dash.decode("latin-1"), ext.decode("latin-1") + rest)
