"""``pqmail init``: create a new qmail tree (control/, users/, queue/), as qmail's install and config-fast do.

``control/me`` holds the host name; ``locals`` and ``rcpthosts`` get the same name, ``defaultdomain``
and ``plusdomain`` what config-fast derives from it (see :func:`derived_domains`). ``control/mailuser``
names the system user that owns the mailboxes; ``users/assign`` holds only the final ``.`` line and is
compiled to ``users/cdb``; ``queue/`` gets qmail's layout, owned by the mail user.

What it trusts: the operator's ``--me`` and ``--owner`` after validation. What it never does: overwrite
or change anything that exists (an existing tree is an error naming what is there), leave a
half-made tree behind after a failure, make control/ or users/ group- or world-writable, or let root
own the mailboxes.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from pqmail.config.control import read_value
from pqmail.errors import UsageError
from pqmail.fsutil import atomic_write, fsync_dir
from pqmail.paths import Root
from pqmail.provision import Owner, lookup_owner, validate_domain

DIR_MODE = 0o755
FILE_MODE = 0o644

# The files init writes; any of them existing means a tree is there already.
CONTROL_FILES = ("me", "defaultdomain", "plusdomain", "locals", "rcpthosts")
USERS_FILES = ("assign", "cdb")


@dataclass(frozen=True)
class InitResult:
    root: Path
    me: str
    owner: Owner
    created: tuple[Path, ...]


def derived_domains(me: str) -> tuple[str, str]:
    """(defaultdomain, plusdomain) exactly as qmail's config-fast derives them with sed.

    defaultdomain drops the first label when at least three remain (``mx.isp.test`` -> ``isp.test``,
    ``a.b.c.d`` -> ``b.c.d``); plusdomain keeps the last two labels (``a.b.c.d`` -> ``c.d``). A name of
    one or two labels is used as it is.
    """
    default = re.sub(r"^([^.]*)\.([^.]*)\.", r"\2.", me, count=1)
    plus = re.sub(r"^.*\.([^.]*)\.([^.]*)$", r"\1.\2", me, count=1)
    return default, plus


def host_fqdn() -> str:
    """This host's fully qualified name, as the resolver gives it."""
    return socket.getfqdn()


def existing_parts(root: Root) -> list[Path]:
    """What of a tree is already there (the files and directories init would create)."""
    paths = [root.control_file(n) for n in CONTROL_FILES] + [root.users / n for n in USERS_FILES]
    paths.append(root.queue)
    return [p for p in paths if os.path.lexists(p)]


def choose_owner(root: Root, owner: str | None) -> tuple[Owner, bool]:
    """The mail user and whether control/mailuser must be written.

    An existing control/mailuser is kept (and --owner must agree with it). Otherwise --owner; without
    it the invoking user, except as root, where the operator must name one: a wrong guess (``nobody``,
    shared by every unprivileged daemon) would give every mailbox to the wrong account.
    """
    path = root.control_file("mailuser")
    recorded = read_value(path)
    if recorded:
        if owner is not None and owner != recorded:
            raise UsageError(f"{path}:1: names {recorded!r}; not changing it to {owner!r}")
        return lookup_owner(recorded), False
    if owner is None:
        if os.geteuid() == 0:
            raise UsageError("running as root: name the mail user with --owner USER (an unprivileged "
                             "system account that will own every mailbox; not root)")
        owner = pwd.getpwuid(os.geteuid()).pw_name
    return lookup_owner(owner), True


class _Builder:
    """Creates files and directories, remembering them so a failure can take them all back."""

    def __init__(self) -> None:
        self.created: list[Path] = []

    def mkdir(self, path: Path) -> None:
        if path.is_dir():
            return
        os.mkdir(path, DIR_MODE)
        self.created.append(path)
        os.chmod(path, DIR_MODE)  # exact, whatever the umask
        fsync_dir(path.parent)

    def write(self, path: Path, text: str) -> None:
        self.created.append(path)
        atomic_write(path, text.encode("latin-1"), mode=FILE_MODE)

    def undo(self) -> None:
        for path in reversed(self.created):
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except OSError:
                pass


def init_tree(root: Root, me: str | None = None, owner: str | None = None) -> InitResult:
    """Create the tree; UsageError (naming what exists) if any part of one is already there."""
    from pqmail.config.assign import compile_assign
    from pqmail.queue.store import make_queue

    if os.path.lexists(root.path) and not root.path.is_dir():
        raise UsageError(f"{root.path}: exists and is not a directory")
    there = existing_parts(root)
    if there:
        names = [str(p.relative_to(root.path)) for p in there]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UsageError(f"{root.path} already holds a qmail tree ({shown} "
                         f"{'exist' if len(names) > 1 else 'exists'}); pqmail init never overwrites one")
    host = validate_domain(me if me is not None else host_fqdn(), "host name (--me)", min_labels=1)
    mail_user, write_mailuser = choose_owner(root, owner)
    default, plus = derived_domains(host)

    b = _Builder()
    try:
        if not root.path.is_dir():
            os.makedirs(root.path.parent, exist_ok=True)
            b.mkdir(root.path)
        b.mkdir(root.control)
        b.write(root.control_file("me"), f"{host}\n")
        b.write(root.control_file("defaultdomain"), f"{default}\n")
        b.write(root.control_file("plusdomain"), f"{plus}\n")
        b.write(root.control_file("locals"), f"{host}\n")
        b.write(root.control_file("rcpthosts"), f"{host}\n")
        if write_mailuser:
            b.write(root.control_file("mailuser"), f"{mail_user.name}\n")
        b.mkdir(root.users)
        b.write(root.assign, ".\n")
        b.created.append(root.users_cdb)
        compile_assign(root)
        b.created.append(root.queue)
        make_queue(root.queue, mail_user.uid, mail_user.gid)
    except BaseException:
        b.undo()
        raise
    return InitResult(root.path, host, mail_user, tuple(b.created))
