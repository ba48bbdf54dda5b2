"""POP box passwords: hashing, and the password store users/poppasswd + users/poppasswd.cdb.

Passwords are hashed with argon2id (argon2-cffi, RFC 9106's low-memory profile); plain text is never
stored. The store keeps two files, in qmail's style of "text for people, cdb for programs":

* ``users/poppasswd``: one ``box:hash:maildir`` a line, mode 0600. An administrator may read and edit
  it; comments (``#``), blank lines and order are kept by every change made through this module.
* ``users/poppasswd.cdb``: key ``box``, value ``hash\\0maildir``, recompiled atomically on every change.
  The POP3 server reads only this file, so a login costs one cdb probe whatever the number of boxes.

What it trusts: the box names and paths given by provisioning (validated: no ``:``, newline or NUL).
What it never does: store or log a plain password, or let a malformed stored hash raise during a login.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from pqmail.config.assign import CachedCdb, write_cdb
from pqmail.errors import ConfigError, UsageError
from pqmail.fsutil import atomic_write
from pqmail.paths import Root

__all__ = [
    "PasswordStore",
    "hash_password",
    "needs_rehash",
    "random_password",
    "verify_password",
]

_hasher = None


def _ph():  # argon2 is imported on first use: `pqmail --help` and the SMTP side never need it
    global _hasher
    if _hasher is None:
        from argon2 import PasswordHasher

        _hasher = PasswordHasher()  # argon2id, t=3, m=64 MiB, p=4
    return _hasher


def hash_password(pw: str) -> str:
    """An argon2id hash of ``pw`` in PHC string form (``$argon2id$v=19$...``), salted at random."""
    return _ph().hash(pw)


def verify_password(stored: str, pw: str) -> bool:
    """Whether ``pw`` matches ``stored``; False (never an exception) for a wrong or malformed hash."""
    if not isinstance(stored, str) or not isinstance(pw, str) or not stored.startswith("$argon2"):
        return False
    from argon2.exceptions import Argon2Error

    try:
        return _ph().verify(stored, pw)
    except (Argon2Error, ValueError, TypeError):
        return False


def needs_rehash(stored: str) -> bool:
    """Whether ``stored`` was made with weaker parameters than today's (rehash after a good login)."""
    try:
        return _ph().check_needs_rehash(stored)
    except Exception:
        return True


def random_password() -> str:
    """A fresh 16-character URL-safe password (96 random bits)."""
    return secrets.token_urlsafe(12)


# ----------------------------------------------------------------------------- the text file (pure)

@dataclass(frozen=True)
class _Line:
    text: str  # the line as written, without its newline
    box: str | None  # None for comments and blank lines


def _check_field(what: str, value: str, allow_colon: bool = False) -> None:
    bad = "\n\r\0" if allow_colon else ":\n\r\0"
    if not value or any(c in value for c in bad) or (what == "box" and value.startswith("#")):
        raise UsageError(f"invalid {what} {value!r} for users/poppasswd")


def _parse(data: bytes, path: str) -> list[_Line]:
    text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            out.append(_Line(line, None))
            continue
        parts = line.split(":", 2)
        if len(parts) < 3 or not parts[0] or not parts[1]:
            raise ConfigError(path, "expected box:hash:maildir", n)
        if "\0" in line:
            raise ConfigError(path, "NUL byte in line", n)
        out.append(_Line(line, parts[0]))
    return out


def _render(lines: list[_Line]) -> bytes:
    return "".join(f"{ln.text}\n" for ln in lines).encode("utf-8", "surrogateescape")


def _records(lines: list[_Line]) -> list[tuple[bytes, bytes]]:
    recs = []
    for ln in lines:
        if ln.box is not None:
            box, hashed, maildir = ln.text.split(":", 2)
            recs.append((_b(box), _b(hashed) + b"\0" + _b(maildir)))
    return recs


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


# ----------------------------------------------------------------------------- the store

class PasswordStore:
    """``users/poppasswd`` and its cdb; files owned by ``uid``/``gid`` when given (as root).

    Changes (:meth:`set`, :meth:`remove`, :meth:`compile`) hold an exclusive lock on
    ``users/poppasswd.lock`` across read, edit, write and compile, so concurrent provisioning commands
    never lose each other's changes. :meth:`get` reads the cdb only and is safe from many threads.
    """

    def __init__(self, root: Root | str | os.PathLike[str], uid: int | None = None,
                 gid: int | None = None) -> None:
        self.root = root if isinstance(root, Root) else Root(root)
        self.path: Path = self.root.users / "poppasswd"
        self.cdb_path: Path = self.root.users / "poppasswd.cdb"
        self.uid, self.gid = uid, gid
        self._cdb = CachedCdb(self.cdb_path, name="users/poppasswd.cdb")

    # -- reading

    def get(self, box: str) -> tuple[str, str] | None:
        """``(hash, maildir)`` for ``box`` from the cdb, or None (unknown box, or no cdb yet)."""
        try:
            key = _b(box)
        except UnicodeEncodeError:
            return None
        value = self._cdb.query(lambda cdb, _: cdb.get(key))
        if value is None:
            return None
        hashed, sep, maildir = value.partition(b"\0")
        if not sep:
            raise self._cdb.trouble(f"record for {box!r} has no NUL between hash and maildir")
        return hashed.decode("ascii", "replace"), os.fsdecode(maildir)

    def boxes(self) -> list[str]:
        """Every box in users/poppasswd, in file order."""
        return [ln.box for ln in self._read() if ln.box is not None]

    def _read(self) -> list[_Line]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise ConfigError(str(self.path), f"unable to read: {e.strerror or e}") from None
        return _parse(data, str(self.path))

    # -- changing

    def set(self, box: str, hash: str, maildir: str | os.PathLike[str]) -> None:
        """Add ``box`` or replace its line in place (later duplicates of it are dropped); recompile."""
        self.set_many([(box, hash, maildir)])

    def set_many(self, entries: list[tuple[str, str, str | os.PathLike[str]]]) -> None:
        """:meth:`set` for many boxes at once: one rewrite and one recompile (bulk imports)."""
        new: dict[str, _Line] = {}
        for box, hash, maildir in entries:
            maildir = os.fspath(maildir)
            _check_field("box", box)
            _check_field("hash", hash)
            _check_field("maildir", maildir, allow_colon=True)
            new[box] = _Line(f"{box}:{hash}:{maildir}", box)
        with self._locked():
            out: list[_Line] = []
            placed: set[str] = set()
            for ln in self._read():
                if ln.box in new:
                    if ln.box not in placed:
                        out.append(new[ln.box])
                        placed.add(ln.box)
                    continue
                out.append(ln)
            out.extend(line for box, line in new.items() if box not in placed)
            self._save(out)

    def remove(self, box: str) -> bool:
        """Remove every line of ``box`` and recompile; False if it was not there."""
        with self._locked():
            lines = self._read()
            out = [ln for ln in lines if ln.box != box]
            if len(out) == len(lines):
                return False
            self._save(out)
            return True

    def compile(self) -> int:
        """Recompile the cdb from the text file (after an administrator's hand edit); return the count."""
        with self._locked():
            return self._compile(self._read())

    def _save(self, lines: list[_Line]) -> None:
        atomic_write(self.path, _render(lines), mode=0o600, uid=self.uid, gid=self.gid)
        self._compile(lines)

    def _compile(self, lines: list[_Line]) -> int:
        tmp = self.root.users / "poppasswd.cdb.tmp"
        try:
            return write_cdb(tmp, self.cdb_path, _records(lines), mode=0o600, uid=self.uid, gid=self.gid)
        except OSError as e:
            raise ConfigError(str(tmp), f"unable to write or move into place: {e.strerror or e}") from None

    def _locked(self) -> _Lock:
        return _Lock(self.root.users / "poppasswd.lock", self.uid, self.gid)


class _Lock:
    """An exclusive flock on a lock file, as a context manager."""

    def __init__(self, path: Path, uid: int | None, gid: int | None) -> None:
        self.path, self.uid, self.gid = path, uid, gid
        self.fd = -1

    def __enter__(self) -> _Lock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if self.uid is not None or self.gid is not None:
            os.fchown(self.fd, -1 if self.uid is None else self.uid, -1 if self.gid is None else self.gid)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
