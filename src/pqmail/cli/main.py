"""The ``pqmail`` command: a click group whose subcommands are imported only when used.

Lazy loading keeps ``pqmail inject`` (called once per message by cron jobs and web applications)
from paying for the SMTP, POP3 and rich imports it never needs.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import click

from pqmail import __version__

# name -> (module, attribute, one-line summary shown by `pqmail --help` without importing it)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "init": ("pqmail.cli.init_cmd", "init", "Create a new qmail tree (control/, users/, queue/)."),
    "newu": ("pqmail.cli.newu_cmd", "newu", "Compile users/assign into users/cdb (qmail-newu)."),
    "newmrh": ("pqmail.cli.newu_cmd", "newmrh", "Compile control/morercpthosts into its cdb."),
    "maildirmake": ("pqmail.cli.maildir_cmd", "maildirmake", "Create a Maildir with qmail's modes."),
    "domain": ("pqmail.cli.provision_cmd", "domain", "Add, remove or list virtual domains."),
    "box": ("pqmail.cli.provision_cmd", "box", "Add, remove or list a customer's POP boxes."),
    "alias": ("pqmail.cli.provision_cmd", "alias", "Point an address of a domain at a box or elsewhere."),
    "dialup": ("pqmail.cli.provision_cmd", "dialup", "Add or list dial-up (serialmail) customers."),
    "check": ("pqmail.cli.check_cmd", "check", "Report what qmail would trip on in the tree."),
    "help": ("pqmail.cli.help_cmd", "help_group",
             "Reference pages: every configuration file, its meaning and default."),
    "showctl": ("pqmail.cli.showctl_cmd", "showctl", "Show the effective control settings."),
    "route": ("pqmail.cli.route_cmd", "route", "Show how an address would be delivered."),
    "inject": ("pqmail.cli.inject_cmd", "inject", "Queue a message read from stdin (qmail-inject)."),
    "send": ("pqmail.cli.send_cmd", "send", "Run the queue manager (qmail-send)."),
    "queue": ("pqmail.cli.queue_cmd", "queue", "Inspect the queue, count it, or retry now."),
    "smtpd": ("pqmail.cli.smtpd_cmd", "smtpd", "Run the SMTP server alone (qmail-smtpd)."),
    "pop3d": ("pqmail.cli.pop3d_cmd", "pop3d", "Run the POP3 server alone (qmail-popup + qmail-pop3d)."),
    "passwd": ("pqmail.cli.passwd_cmd", "passwd", "Change a POP box's password."),
    "serve": ("pqmail.cli.serve_cmd", "serve", "Run every service under one supervisor."),
    "serialmail": ("pqmail.cli.serialmail_cmd", "serialmail",
                   "Push dial-up customers' mail to their hosts (serialmail, ETRN, ODMR)."),
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (mod, _, _) in COMMANDS.items() if _available(mod)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None or not _available(entry[0]):
            return None
        module = importlib.import_module(entry[0])
        return getattr(module, entry[1])

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pqmail")
def cli() -> None:
    """pqmail: a qmail-compatible mail system for ISPs and hosters.

    Every command works on a qmail tree (control/, users/, queue/) named by --root, else by
    $PQMAIL_ROOT, else /var/pqmail. Control files keep qmail's names and meanings.
    """


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI and turn every failure into a one-line message."""
    run(cli, argv, prog_name="pqmail")


def run(command: click.Command, argv: list[str] | None, prog_name: str) -> None:
    from pqmail.errors import PqmailError

    try:
        rv = command.main(args=argv, prog_name=prog_name, standalone_mode=False)
        if isinstance(rv, int) and rv:
            sys.exit(rv)  # ctx.exit(n) returns n in non-standalone mode
    except click.exceptions.Abort:
        click.echo(f"{prog_name}: aborted", err=True)
        sys.exit(111)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(100 if e.exit_code == 2 else e.exit_code)
    except PqmailError as e:
        click.echo(f"{prog_name}: {e}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        click.echo(f"{prog_name}: system error:{where}: {e.strerror or e}", err=True)
        sys.exit(111)
    except KeyboardInterrupt:
        sys.exit(111)
    except Exception as e:  # last resort: never a traceback on an operator's terminal
        if os.environ.get("PQMAIL_DEBUG"):
            raise
        click.echo(f"{prog_name}: internal error: {type(e).__name__}: {e} (set PQMAIL_DEBUG=1 for details)",
                   err=True)
        sys.exit(111)


if __name__ == "__main__":
    main()
