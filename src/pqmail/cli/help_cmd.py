"""``pqmail help``: reference pages an administrator reads at the console.

``pqmail help control`` prints every configuration file pqmail reads (from
:mod:`pqmail.config.reference`, the single source of that table), as a rich table on a terminal and
as plain, greppable lines otherwise; ``pqmail help control NAME`` prints one file in detail. The
rendering is pure (lists of lines), so tests and the README are fed from the same functions.

It reads no file of the tree and needs no ``--root``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable

import click

from pqmail.config import reference as ref
from pqmail.errors import UsageError

CTX = {"help_option_names": ["-h", "--help"]}
_PAREN = re.compile(r"\s*\([^)]*\)")
HEAD = ("FILE", "KIND", "ORIGIN", "DEFAULT", "READ BY", "MEANING")
_RICH_WIDTHS = (None, None, None, 18, 26, None)  # the meaning gets what the terminal has left


def services(entry: ref.FileDoc) -> list[str]:
    """The short names of the services that read ``entry`` (``send (remote delivery)`` -> ``send``)."""
    out: list[str] = []
    for reader in entry.readers:
        for name in _PAREN.sub("", reader.service).split(", "):
            if name not in out:
                out.append(name)
    return out


def rows(entries: Iterable[ref.FileDoc]) -> list[tuple[str, str, str, str, str, str]]:
    return [(e.name, e.kind, e.origin, e.default, ", ".join(services(e)), e.summary) for e in entries]


def by_place(entries: Iterable[ref.FileDoc] = ref.ENTRIES) -> list[tuple[str, list[ref.FileDoc]]]:
    """Entries grouped by where they live, in PLACES order."""
    entries = list(entries)
    return [(place, [e for e in entries if e.place == place]) for place in ref.PLACES
            if any(e.place == place for e in entries)]


def render_table(entries: Iterable[ref.FileDoc] = ref.ENTRIES) -> list[str]:
    """The plain-text table: one line per file, columns aligned, a section per place."""
    out = ["Configuration files pqmail reads. `pqmail help control NAME` shows one in detail.", ""]
    for place, group in by_place(entries):
        table = [HEAD, *rows(group)]
        widths = [max(len(r[i]) for r in table) for i in range(len(HEAD) - 1)]
        out.append(ref.PLACES[place])
        for r in table:
            cells = [c.ljust(w) for c, w in zip(r, widths, strict=False)]
            out.append("  " + "  ".join([*cells, r[-1]]).rstrip())
        out.append("")
    out.append("Kinds:")
    out.extend(f"  {k:<10} {v}" for k, v in ref.KINDS.items())
    out.append("Origins:")
    out.extend(f"  {k:<10} {v}" for k, v in ref.ORIGINS.items())
    return out


def render_entry(entry: ref.FileDoc) -> list[str]:
    """One file in detail: kind, origin, default, meaning, every reader and when, then the details."""
    out = [f"{entry.path}  ({ref.ORIGINS[entry.origin]})",
           f"  kind:     {entry.kind} ({ref.KINDS[entry.kind]})",
           f"  default:  {entry.default}",
           f"  meaning:  {entry.summary}"]
    for n, reader in enumerate(entry.readers):
        label = "read by:" if n == 0 else ""
        out.append(f"  {label:<9} {reader.service}: {reader.when}")
    if entry.details:
        out.append("")
        out.extend(f"  {line}".rstrip() for line in entry.details.splitlines())
    return out


def print_rich_table(entries: Iterable[ref.FileDoc] = ref.ENTRIES) -> None:
    """The table for a terminal (rich is imported only here)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print("Configuration files pqmail reads. [bold]pqmail help control NAME[/] shows one in detail.")
    for place, group in by_place(entries):
        table = Table(title=ref.PLACES[place], title_justify="left", show_lines=False)
        for title, width in zip(HEAD, _RICH_WIDTHS, strict=True):
            table.add_column(title.capitalize(), overflow="fold", max_width=width,
                             no_wrap=title in ("FILE", "KIND", "ORIGIN"))
        for r in rows(group):
            table.add_row(*r)
        console.print(table)
    console.print("Kinds: " + "; ".join(f"[bold]{k}[/]: {v}" for k, v in ref.KINDS.items()),
                  highlight=False)


@click.group("help", context_settings=CTX)
def help_group() -> None:
    """Reference pages: what every configuration file means.

    \b
      pqmail help control          every file: kind, origin, default, readers, meaning
      pqmail help control NAME     one file in detail (rcpthosts, users/assign, RELAYHOST, ...)
    """


@help_group.command("control", context_settings=CTX)
@click.argument("name", required=False, metavar="[NAME]")
def control(name: str | None) -> None:
    """Show the control files (and users/ and dial-up files) pqmail reads.

    Without NAME: a table of every file with its kind, whether it is qmail's or a pqmail addition,
    its default, the services that read it and its meaning (rich on a terminal, plain text
    otherwise). With NAME: that file in detail, including when each service reads it again (at
    start, per connection, on change, on SIGHUP), its syntax and how pqmail differs from qmail.

    \b
    Exit status: 0; 100 when NAME is not a file pqmail reads.
    """
    if name is not None:
        entry = ref.find(name)
        if entry is None:
            raise UsageError(f"{name}: pqmail reads no such file; `pqmail help control` lists them")
        click.echo("\n".join(render_entry(entry)))
    elif sys.stdout.isatty():
        print_rich_table()
    else:
        click.echo("\n".join(render_table()))


if __name__ == "__main__":  # python -m pqmail.cli.help_cmd: the same, without the pqmail command table
    from pqmail.cli.main import run

    run(help_group, None, prog_name="pqmail help")
