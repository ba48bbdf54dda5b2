"""Options and helpers shared by the subcommands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from pqmail.paths import Root, default_root

F = TypeVar("F", bound=Callable[..., Any])


def root_option(func: F) -> F:
    """``--root DIR``: the qmail tree; default $PQMAIL_ROOT, then /var/pqmail. Passes ``root: Root``."""

    def to_root(ctx: click.Context, param: click.Parameter, value: str | None) -> Root:
        return Root(value) if value else Root(default_root())

    return click.option(
        "--root",
        "root",
        metavar="DIR",
        callback=to_root,
        help="The pqmail root (a qmail tree). Default: $PQMAIL_ROOT, then /var/pqmail.",
    )(func)


def read_password(password_file: str | None, random_password: bool,
                  prompt: str = "Password") -> tuple[str, bool]:
    """(password, generated?) from --password-file (``-`` = stdin), --random-password, a prompt on a
    terminal, or the first line of standard input. A UsageError for conflicting options or no password.
    """
    import os
    import sys

    from pqmail.errors import UsageError

    if password_file is not None and random_password:
        raise UsageError("give --password-file or --random-password, not both")
    if random_password:
        from pqmail.passwords import random_password as make

        return make(), True
    if password_file is None and sys.stdin.isatty():
        return click.prompt(prompt, hide_input=True, confirmation_prompt=True), False
    data = read_input(password_file, "cannot read the password")
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not line:
        where = "standard input" if password_file in (None, "-") else password_file
        raise UsageError(f"no password in {where} (its first line is empty)")
    return os.fsdecode(line), False


def password_store_ids(root: Root) -> tuple[int | None, int | None]:
    """uid/gid that users/poppasswd has now, so that root's edits keep it readable by the mail user."""
    import os

    if os.geteuid() != 0:
        return None, None
    for p in (root.users / "poppasswd.cdb", root.users / "poppasswd", root.users):
        try:
            st = os.stat(p)
        except FileNotFoundError:
            continue
        return st.st_uid, st.st_gid
    return None, None


def read_input(file: str | None, what: str = "cannot read") -> bytes:
    """The bytes of ``file``, or of standard input for None or ``-``; UsageError naming it if unreadable."""
    import sys

    from pqmail.errors import UsageError

    try:
        if file in (None, "-"):
            return sys.stdin.buffer.read()
        with open(file, "rb") as f:
            return f.read()
    except OSError as e:
        where = "standard input" if file in (None, "-") else file
        raise UsageError(f"{where}: {what}: {e.strerror or e}") from None
