"""``pqmail init --root DIR [--me HOST] [--owner USER]``: create a new qmail tree (see pqmail.init)."""

from __future__ import annotations

import click

from pqmail.cli.common import root_option
from pqmail.paths import Root


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@root_option
@click.option("--me", metavar="HOST", help="This host's fully qualified name. Default: the resolver's FQDN.")
@click.option("--owner", metavar="USER",
              help="The mail user: owns every mailbox and the queue (never root). Required as root, "
                   "unless control/mailuser exists; otherwise the invoking user.")
def init(root: Root, me: str | None, owner: str | None) -> None:
    """Create a new qmail tree in DIR: control/, users/ and queue/.

    \b
    Files written (as qmail's install and config-fast write them):
      control/me             HOST
      control/locals         HOST (mail for HOST is delivered locally)
      control/rcpthosts      HOST (SMTP accepts only HOST until you add domains)
      control/defaultdomain  HOST without its first label (when it has three or more)
      control/plusdomain     the last two labels of HOST
      control/mailuser       USER
      users/assign           just the final '.' line, compiled to users/cdb
      queue/                 qmail's queue layout, owned by USER

    control/ and users/ are 0755 with 0644 files. pqmail init never overwrites anything: if any of
    these already exists it changes nothing and says what it found.

    \b
    Exit status:
      0    created
      100  a tree is already there, a bad --me, or an unusable --owner
      111  a system error (nothing half-made is left behind)
    """
    from pqmail.init import init_tree

    result = init_tree(root, me=me, owner=owner)
    click.echo(f"created {result.root}: me {result.me}, mail user {result.owner.name} "
               f"(uid {result.owner.uid}, gid {result.owner.gid})")
