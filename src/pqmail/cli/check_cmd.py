"""``pqmail check``: print every problem pqmail.check finds, one a line; exit 0 only when clean."""

from __future__ import annotations

import sys

import click

from pqmail.cli.common import root_option
from pqmail.paths import Root


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@root_option
def check(root: Root) -> None:
    """Report what qmail would trip on in the tree, one problem a line as FILE:LINE: TEXT.

    \b
    Checked:
      control/*            unreadable files and everything showctl warns about (rcpthosts missing, ...)
      control/mailuser     an unknown user, or root
      users/assign, cdb    a bad line, users/cdb missing or older than users/assign, uid 0,
                           homes that are missing, relative, sticky or group/world-writable
      control/virtualdomains  domains missing from rcpthosts or shadowed by locals, and
                           domains whose postmaster has no mailbox (or forwards to itself)
      HOME/.qmail*         group/world-writable files, Maildir lines that are not Maildirs
                           or belong to another uid, delivery lines in forward-only files
      queue/               directories, lock files, modes and owner as `pqmail init`
                           makes them; spare files in queue/pool/; whether the mail user
                           (smtpd) may write it. `pqmail queue fix` repairs these.

    Nothing is changed. Output is empty when the tree is clean.

    \b
    Exit status:
      0    clean
      1    problems were found (listed on standard output)
      111  the tree could not be read at all
    """
    from pqmail.check import check_tree

    problems = check_tree(root)
    for p in problems:
        click.echo(str(p))
    if problems:
        click.echo(f"pqmail check: {len(problems)} problem{'s' if len(problems) > 1 else ''}", err=True)
        # sys.exit, not ctx.exit: click's non-standalone main() would turn Exit(1) into a return value
        sys.exit(1)
