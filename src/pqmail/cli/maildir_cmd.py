"""``pqmail maildirmake DIR [--owner USER]``: maildirmake(1) with qmail's modes and exit codes."""

from __future__ import annotations

import click

from pqmail.errors import UsageError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--owner", metavar="USER",
              help="Give the Maildir to this user (and the user's group). Needs root. "
                   "Default: leave it to whoever runs the command.")
def maildirmake(directory: str, owner: str | None) -> None:
    """Create DIR as a Maildir: DIR, DIR/tmp, DIR/new and DIR/cur, each mode 0700.

    Mail is delivered into a Maildir by the uid that users/assign names for the address, so
    the Maildir must belong to that user: pass --owner when running as root.

    \b
    EXIT STATUS
      0    created
      100  usage error: DIR already exists (nothing is changed), or an unknown --owner
      111  system error (missing parent directory, permission denied); nothing is left behind
    """
    from pqmail.maildir import maildirmake as make

    uid = gid = None
    if owner is not None:
        uid, gid = _user_ids(owner)
    make(directory, uid=uid, gid=gid)


def _user_ids(name: str) -> tuple[int, int]:
    import pwd

    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise UsageError(f"--owner {name}: no such user") from None
    return pw.pw_uid, pw.pw_gid
