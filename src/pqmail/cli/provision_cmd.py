"""``pqmail domain|box|alias|dialup``: provisioning in the customer-handle layout (see pqmail.provision).

Only argument handling and output live here; every decision and every file change is in
:mod:`pqmail.provision`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

import click

from pqmail.cli.common import password_store_ids, read_input, read_password, root_option
from pqmail.errors import UsageError
from pqmail.paths import Root

CTX = {"help_option_names": ["-h", "--help"]}

base_option = click.option(
    "--base", metavar="DIR",
    help="Where the handle's tree lives (BASE/e/ex1/...). Default: the base recorded for the handle in "
         "users/handles, else /home/popmail.")
owner_option = click.option(
    "--owner", metavar="USER",
    help="The user that owns the files and receives the deliveries. Default: control/mailuser "
         "(or the invoking user when not root).")


def _provisioner(root: Root, owner: str | None = None):
    from pqmail.provision import Provisioner

    return Provisioner(root, owner)


def _report(lines: Iterable[str]) -> None:
    for line in lines:
        click.echo(line)


def _table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """A rich table on stdout; wide enough not to fold paths when stdout is a file or a pipe."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console = Console(width=None if sys.stdout.isatty() else 250, highlight=False)
    console.print(table)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# ----------------------------------------------------------------------------- domain

@click.group(context_settings=CTX)
def domain() -> None:
    """Add, remove or list virtual domains (and domains relayed to a customer's server)."""


@domain.command("add", context_settings=CTX)
@click.argument("name", metavar="DOMAIN")
@click.option("--handle", metavar="H", help="The customer handle that owns the domain (like ex1).")
@base_option
@owner_option
@click.option("--relay", metavar="HOST[:PORT]",
              help="Do not deliver here: accept the domain and pass its mail to HOST (control/smtproutes).")
@click.option("--postmaster", metavar="ADDR",
              help="Forward postmaster@DOMAIN to ADDR instead of the handle's first box.")
@root_option
def domain_add(name: str, handle: str | None, base: str | None, owner: str | None, relay: str | None,
               postmaster: str | None, root: Root) -> None:
    """Add DOMAIN as a virtual domain of customer H (or, with --relay, as a relayed domain).

    \b
    A virtual domain gets, as a qmail administrator would write them:
      control/rcpthosts       DOMAIN and .DOMAIN
      control/virtualdomains  DOMAIN:DOMAIN and .DOMAIN:DOMAIN
      users/assign            +DOMAIN-:OWNER:UID:GID:BASE/h/H/DOMAINS/DOMAIN:-::  (then newu)
      BASE/h/H/DOMAINS/DOMAIN/.qmail-postmaster   the Maildir of box H-0000 (or &ADDR)
      BASE/h/H/DOMAINS/DOMAIN/.qmail-default      &postmaster@DOMAIN
    With --relay HOST[:PORT]: DOMAIN in rcpthosts and DOMAIN:HOST[:PORT] in smtproutes, nothing else.

    Running it again changes nothing; an existing different entry is an error naming its file and line.
    Exit status: 0 done, 100 bad input or a clash, 111 system error.
    """
    p = _provisioner(root, owner)
    if relay is not None:
        if postmaster is not None or base is not None:
            raise UsageError("--relay takes no --postmaster or --base: the mail is delivered elsewhere")
        _report(p.relay_add(name, relay, handle).lines)
        return
    if handle is None:
        raise UsageError("domain add needs --handle H (the customer the domain belongs to)")
    _report(p.domain_add(name, handle, base, postmaster).lines)


@domain.command("remove", context_settings=CTX)
@click.argument("name", metavar="DOMAIN")
@click.option("--purge", is_flag=True, help="Also delete the domain's directory (its dot-qmail files).")
@root_option
def domain_remove(name: str, purge: bool, root: Root) -> None:
    """Undo domain add (or dialup add): rcpthosts first, then virtualdomains, smtproutes, users/assign.

    The domain's directory stays unless --purge is given; a dial-up Maildir still holding mail is
    never purged. Boxes are not touched (they belong to the handle).
    """
    _report(_provisioner(root).domain_remove(name, purge).lines)


@domain.command("list", context_settings=CTX)
@root_option
def domain_list(root: Root) -> None:
    """List virtual, dial-up and relayed domains (from virtualdomains, users/assign and smtproutes)."""
    rows = [(d.domain, d.kind, d.handle or "-", d.target, "yes" if d.in_rcpthosts else "NO")
            for d in _provisioner(root).domains()]
    _table("domains", ("domain", "kind", "handle", "delivered to", "rcpthosts"), rows)


# ----------------------------------------------------------------------------- box

@click.group(context_settings=CTX)
def box() -> None:
    """Add, list or remove a customer's POP boxes (Maildirs named HANDLE-NNNN)."""


@box.command("add", context_settings=CTX)
@click.argument("handle", metavar="H")
@click.option("--password-file", metavar="F", help="Read the password from the first line of F ('-': stdin).")
@click.option("--random-password", is_flag=True, help="Generate a password and print it after the box name.")
@base_option
@owner_option
@root_option
def box_add(handle: str, password_file: str | None, random_password: bool, base: str | None,
            owner: str | None, root: Root) -> None:
    """Create the next POP box of customer H: BASE/h/H/POP/H-NNNN, a Maildir owned by the mail user.

    Without --password-file or --random-password the password is read from standard input (its first
    line), or asked for twice when standard input is a terminal. It is stored hashed (argon2id) in
    users/poppasswd. Prints the box name, followed by the password when it was generated.
    """
    from pqmail.provision import validate_handle

    p = _provisioner(root, owner)  # first: a wrong --root or handle must not wait for a password
    validate_handle(handle)
    password, generated = read_password(password_file, random_password)
    name = p.box_add(handle, password, base)
    click.echo(f"{name} {password}" if generated else name)


@box.command("list", context_settings=CTX)
@click.argument("handle", metavar="H")
@root_option
def box_list(handle: str, root: Root) -> None:
    """List customer H's boxes: messages in new/ and cur/, their size, and the addresses delivering there."""
    rows = []
    for b in _provisioner(root).boxes(handle):
        note = "" if b.is_maildir else " (no Maildir)"
        note += "" if b.has_password else " (no password)"
        rows.append((b.box + note, b.new, b.cur, _size(b.size), ", ".join(b.aliases) or "-"))
    _table(f"boxes of {handle}", ("box", "new", "cur", "size", "addresses"), rows)


@box.command("import", context_settings=CTX)
@click.argument("file", metavar="FILE")
@root_option
def box_import(file: str, root: Root) -> None:
    """Import password hashes from FILE ('-': stdin), e.g. from vpopmail or a passwd-file installation.

    \b
    One box a line, `BOX:HASH` or `BOX:HASH:MAILDIR`; blank lines and lines
    starting with # are skipped. HASH is stored as it is: argon2id, $1$ (MD5-
    crypt), $5$/$6$ (SHA-crypt), $2a$/$2b$/$2y$ (bcrypt) or {PLAIN}secret; the
    POP3 server and SMTP AUTH verify all of them. Without MAIDIR the box must
    exist already (its Maildir is kept); with it, the Maildir must exist.
    Nothing is changed unless every line is valid: an error names FILE:LINE.
    Everything is written in one atomic rewrite of users/poppasswd and its cdb.

    \b
    Exit status: 0 done; 100 bad input; 111 system error.
    """
    from pqmail.hashes import scheme_of
    from pqmail.maildir import is_maildir
    from pqmail.passwords import PasswordStore

    data = read_input(file)
    store = PasswordStore(root, *password_store_ids(root))
    entries = []
    for n, raw in enumerate(data.decode("utf-8", "surrogateescape").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        box, _, rest = line.partition(":")
        hashed, _, maildir = rest.partition(":")
        where = f"{file}:{n}"
        if not box or not hashed:
            raise UsageError(f"{where}: expected BOX:HASH[:MAILDIR]")
        if scheme_of(hashed) == "unknown":
            raise UsageError(f"{where}: unsupported hash {hashed[:12]!r}...: want $argon2id$, $1$, $5$, "
                             "$6$, $2b$ or {PLAIN}")
        if not maildir:
            current = store.get(box)
            if current is None:
                raise UsageError(f"{where}: no box {box!r} here; give its Maildir as a third field")
            maildir = current[1]
        elif not is_maildir(maildir):
            raise UsageError(f"{where}: {maildir} is not a Maildir")
        entries.append((box, hashed, maildir))
    store.set_many(entries)
    click.echo(f"imported {len(entries)} password hash(es) into {store.path}")


@box.command("remove", context_settings=CTX)
@click.argument("name", metavar="BOX")
@click.option("--force", is_flag=True, help="Delete the box even if it still holds messages.")
@root_option
def box_remove(name: str, force: bool, root: Root) -> None:
    """Delete BOX (its Maildir and password). Refused while an address still delivers to it."""
    _report(_provisioner(root).box_remove(name, force).lines)


# ----------------------------------------------------------------------------- alias

@click.group(context_settings=CTX)
def alias() -> None:
    """Point an address of a virtual domain at a box, or forward it elsewhere (dot-qmail files)."""


@alias.command("add", context_settings=CTX)
@click.argument("address", metavar="ADDR")
@click.argument("target", metavar="[BOX]", required=False)
@click.option("--forward", metavar="ADDR", help="Forward to this address instead of delivering to a box.")
@click.option("--replace", is_flag=True, help="Replace an existing dot-qmail file for ADDR.")
@owner_option
@root_option
def alias_add(address: str, target: str | None, forward: str | None, replace: bool, owner: str | None,
              root: Root) -> None:
    """Deliver ADDR (local@domain) into BOX, or forward it with --forward.

    Writes the domain's .qmail-LOCAL (dots in LOCAL become ':' as qmail-local expects, so
    john.smith is .qmail-john:smith) holding the box's Maildir path with a trailing '/', or &ADDR.
    """
    _report(_provisioner(root, owner).alias_add(address, target, forward, replace).lines)


@alias.command("list", context_settings=CTX)
@click.argument("name", metavar="DOMAIN")
@root_option
def alias_list(name: str, root: Root) -> None:
    """List DOMAIN's addresses and where each one delivers (* is the default for all others)."""
    rows = [(a.address, "; ".join(a.targets) or "(empty)", a.path.name)
            for a in _provisioner(root).aliases(name)]
    _table(f"addresses of {name}", ("address", "delivers to", "file"), rows)


@alias.command("remove", context_settings=CTX)
@click.argument("address", metavar="ADDR")
@root_option
def alias_remove(address: str, root: Root) -> None:
    """Delete ADDR's dot-qmail file (postmaster cannot be removed, only re-pointed)."""
    _report(_provisioner(root).alias_remove(address).lines)


# ----------------------------------------------------------------------------- dialup

@click.group(context_settings=CTX)
def dialup() -> None:
    """Add or list dial-up customers: their mail waits in a Maildir until flushed to their host."""


@dialup.command("add", context_settings=CTX)
@click.argument("name", metavar="DOMAIN")
@click.option("--handle", metavar="H", help="The customer handle (required).")
@click.option("--relayhost", metavar="HOST[:PORT]",
              help="The customer's own server, where serialmail delivers the waiting mail (required).")
@click.option("--base", metavar="DIR", help="Parent of the domain's directory. Default: /home/serialmail.")
@owner_option
@root_option
def dialup_add(name: str, handle: str | None, relayhost: str | None, base: str | None, owner: str | None,
               root: Root) -> None:
    """Add DOMAIN as a dial-up customer of H.

    \b
    Creates BASE/DOMAIN/ with RELAYHOST (HOST[:PORT]), Maildir/ and .qmail-default (./Maildir/),
    and adds DOMAIN:DOMAIN to virtualdomains, DOMAIN to rcpthosts and
    +DOMAIN-:OWNER:UID:GID:BASE/DOMAIN:-:: to users/assign (then newu).
    Running it again with another --relayhost changes RELAYHOST.
    """
    if handle is None or relayhost is None:
        raise UsageError("dialup add needs --handle H and --relayhost HOST[:PORT]")
    _report(_provisioner(root, owner).dialup_add(name, handle, relayhost, base).lines)


@dialup.command("list", context_settings=CTX)
@root_option
def dialup_list(root: Root) -> None:
    """List dial-up domains: relay host, messages waiting, oldest age, the last transfer.

    The last transfer is what the latest flush (scheduled, ETRN, ODMR or
    `pqmail serialmail flush`) recorded in DIR/LASTTRANSFER: when, and ok,
    deferred, failed or interrupted (the service stopped midway), with a
    summary of the customer's answers.
    """
    import time

    from pqmail.serialmail.flush import dialup_status

    rows = []
    for d in _provisioner(root).dialups():
        st = dialup_status(d.home)
        age = "-" if st.oldest_age is None else _age(st.oldest_age)
        last = "never"
        if st.last is not None:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(st.last.when))
            last = f"{when} {st.last.status}: {st.last.text}"
        rows.append((d.domain, d.relayhost or "(no RELAYHOST)", st.waiting, age, last, d.home))
    _table("dial-up domains", ("domain", "relay host", "waiting", "oldest", "last transfer", "directory"),
           rows)


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
