"""qmail-getpw: the passwd fallback for a local part users/cdb does not know (qmail-semantics.md §2.4).

Walking back from the end of the local part, at its end and at every ``-``, the lowercased text
before that point is tried as a system account: the longest name wins. An account counts only if its
name is shorter than 32 characters, its uid is not 0, and its home directory exists and is owned by
that uid. ``dash`` is empty when the account name is the whole local part, else ``-`` with ``ext`` the
text after the ``-``. Without a match the ``alias`` user takes the address (dash ``-``, ext = the
whole local part, original case); without ``alias``: None (the caller defers, like qmail's "Unable to
find alias user!").

It only reads the passwd database and stats home directories; a temporary stat error (NFS) raises
:class:`~pqmail.errors.TemporaryFailure`.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable
from typing import Any

from pqmail.config.assign import AssignEntry
from pqmail.config.casefold import ascii_lower
from pqmail.errors import TemporaryFailure
from pqmail.local.syserr import is_temporary

ALIAS_USER = "alias"
USERLEN = 32  # qmail-getpw's buffer: names of 32 characters or more are never tried


def _getpwnam(name: str) -> Any | None:
    try:
        return pwd.getpwnam(name)
    except (KeyError, ValueError):  # ValueError: a NUL in the name
        return None


def _entry(pw: Any, dash: str, ext: str) -> AssignEntry:
    return AssignEntry(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, dash, ext)


def _owned_home(pw: Any) -> bool:
    try:
        st = os.stat(pw.pw_dir)
    except OSError as e:
        if is_temporary(e.errno):
            raise TemporaryFailure("NFS failure in qmail-local.") from None
        return False
    return st.st_uid == pw.pw_uid


def getpw(local: str, *, alias_user: str = ALIAS_USER,
          lookup: Callable[[str], Any | None] = _getpwnam) -> AssignEntry | None:
    """The users/assign-style entry qmail-getpw prints for ``local``, or None if even ``alias`` is missing.

    ``lookup`` maps an account name to a ``pwd.struct_passwd``-like object (or None); it exists so
    tests can supply a passwd table.
    """
    for pos in range(len(local), -1, -1):
        if pos >= USERLEN or (pos < len(local) and local[pos] != "-"):
            continue
        pw = lookup(ascii_lower(local[:pos]))
        if pw is not None and pw.pw_uid != 0 and _owned_home(pw):
            if pos == len(local):
                return _entry(pw, "", "")
            return _entry(pw, "-", local[pos + 1:])
    pw = lookup(alias_user)
    if pw is None:
        return None
    return _entry(pw, "-", local)
