"""``pqmail newu`` and ``pqmail newmrh``: qmail-newu and qmail-newmrh.

Each reads one text file and replaces its cdb atomically (temp file, fsync, rename), so the SMTP server
and local delivery see either the old or the new database, never a mix. The work is in
pqmail.config.assign; this module only words the result.
"""

from __future__ import annotations

import click

from pqmail.cli.common import root_option
from pqmail.paths import Root

CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.command(context_settings=CONTEXT)
@root_option
def newu(root: Root) -> None:
    """Compile users/assign into users/cdb, as qmail-newu does.

    \b
    READS   ROOT/users/assign
    WRITES  ROOT/users/cdb.tmp (mode 0644), then renames it over ROOT/users/cdb

    users/assign holds one assignment a line and must end with a line starting with '.':

    \b
      =local:user:uid:gid:homedir:dash:ext:   exactly the address local
      +loc:user:uid:gid:homedir:dash:pre:     every address starting with loc
      .

    Local delivery reads users/cdb only, never users/assign: run this after every edit.
    Keys are compiled in lower case; the first of two identical keys wins. The cdb has the
    layout qmail-newu writes, so qmail's tools and `cdb -d` read it too.

    \b
    EXIT STATUS
      0    users/cdb replaced; the number of records written is printed
      111  users/assign is malformed (the message names the line) or a file could not
           be read or written; users/cdb is left exactly as it was
    """
    from pqmail.config.assign import compile_assign

    count = compile_assign(root)
    click.echo(f"users/cdb: {count} records written "
               f"({count - 1} assignments and the wildcard-character record)")


@click.command(context_settings=CONTEXT)
@root_option
def newmrh(root: Root) -> None:
    """Compile control/morercpthosts into control/morercpthosts.cdb, as qmail-newmrh does.

    \b
    READS   ROOT/control/morercpthosts
    WRITES  ROOT/control/morercpthosts.tmp (mode 0644), then renames it over
            ROOT/control/morercpthosts.cdb

    morercpthosts lists further domains to accept mail for, like control/rcpthosts, one a line,
    for sites with too many to keep in rcpthosts. Lines are lower-cased and trailing spaces and
    tabs removed; empty lines and lines starting with '#' are skipped. The SMTP server consults
    the cdb only, and only when control/rcpthosts exists: run this after every edit.

    \b
    EXIT STATUS
      0    morercpthosts.cdb replaced; the number of domains written is printed
      111  morercpthosts is missing or unreadable, or the cdb could not be written;
           the old morercpthosts.cdb is left as it was
    """
    from pqmail.config.assign import compile_morercpthosts

    count = compile_morercpthosts(root)
    click.echo(f"control/morercpthosts.cdb: {count} domains written")
