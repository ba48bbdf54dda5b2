"""``pqmail serve``: run every service under one supervisor (see pqmail.supervisor)."""

from __future__ import annotations

import os

import click

from pqmail.cli.common import root_option


def _defaults(root_user: bool) -> dict[str, list[str]]:
    if root_user:
        return {"smtp": ["0.0.0.0:25"], "submission": ["0.0.0.0:587"], "smtps": ["0.0.0.0:465"],
                "pop3": ["0.0.0.0:110"], "pop3s": ["0.0.0.0:995"], "odmr": ["0.0.0.0:366"]}
    return {"smtp": ["127.0.0.1:2525"], "submission": ["127.0.0.1:2587"], "smtps": ["127.0.0.1:2465"],
            "pop3": ["127.0.0.1:1110"], "pop3s": ["127.0.0.1:1995"], "odmr": ["127.0.0.1:2366"]}


@click.command()
@root_option
@click.option("--smtp", "smtp", multiple=True, metavar="HOST:PORT",
              help="SMTP listener (repeatable). Default: 0.0.0.0:25 as root, else 127.0.0.1:2525.")
@click.option("--submission", multiple=True, metavar="HOST:PORT",
              help="Submission listener requiring AUTH (repeatable). Default :587 / 127.0.0.1:2587.")
@click.option("--smtps", multiple=True, metavar="HOST:PORT",
              help="Implicit-TLS submission listener (repeatable; needs control/servercert.pem). "
                   "Default :465 / 127.0.0.1:2465.")
@click.option("--pop3", multiple=True, metavar="HOST:PORT",
              help="POP3 listener (repeatable). Default: 0.0.0.0:110 as root, else 127.0.0.1:1110.")
@click.option("--pop3s", multiple=True, metavar="HOST:PORT",
              help="Implicit-TLS POP3 listener (repeatable; needs control/servercert.pem). "
                   "Default :995 / 127.0.0.1:1995.")
@click.option("--odmr", multiple=True, metavar="HOST:PORT",
              help="ODMR (RFC 2645, ATRN) listener for dial-up customers. Default :366 / 127.0.0.1:2366.")
@click.option("--no-smtp", is_flag=True, help="Run no SMTP listeners.")
@click.option("--no-pop3", is_flag=True, help="Run no POP3 listeners.")
@click.option("--no-odmr", is_flag=True, help="Run no ODMR listener.")
@click.option("--no-serialmail", is_flag=True,
              help="Do not push dial-up customers' mail every control/serialmailinterval seconds.")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="smtpd worker processes. Default: one per CPU core.")
@click.option("--pidfile", type=click.Path(dir_okay=False), default=None,
              help="Where to write the supervisor's pid. Default: ROOT/serve.pid.")
@click.option("--check", is_flag=True,
              help="Validate the configuration and the queue's layout, modes and owner, and exit "
                   "(0 when usable).")
def serve(root, smtp, submission, smtps, pop3, pop3s, odmr, no_smtp, no_pop3, no_odmr, no_serialmail,
          workers, pidfile, check) -> None:
    """Run pqmail: SMTP listeners, the queue manager, and their supervisor.

    \b
    The supervisor binds every listening socket (as root, so ports below
    1024 work), then forks:
      smtpd-N     SMTP workers sharing the listeners (as control/mailuser)
      pop3d-N     POP3 workers sharing the listeners (as control/mailuser)
      odmrd       the ODMR server for dial-up customers (as control/mailuser)
      serialmail  pushes dial-up Maildirs every control/serialmailinterval s
      send        the queue manager (keeps root to deliver as each user)
    It restarts a service that dies (back-off up to 60 s), forwards SIGHUP
    (reload control files) to every service, and on SIGTERM stops accepting,
    lets sessions and deliveries in flight finish, and exits. Each service's
    log lines appear on stderr prefixed with its name.

    \b
    Exit status: 0 after a clean stop; 100 for a configuration or usage
    error (also what --check reports); 111 for a system error.
    """
    from pqmail.serve import ServeOptions, run_serve

    is_root = os.geteuid() == 0
    d = _defaults(is_root)
    opts = ServeOptions(
        smtp=[] if no_smtp else list(smtp or d["smtp"]),
        submission=[] if no_smtp else list(submission or d["submission"]),
        smtps=[] if no_smtp else list(smtps or d["smtps"]),
        explicit_smtps=bool(smtps),
        workers=workers or os.cpu_count() or 1,
        pidfile=pidfile,
        pop3=[] if no_pop3 else list(pop3 or d["pop3"]),
        pop3s=[] if no_pop3 else list(pop3s or d["pop3s"]),
        explicit_pop3s=bool(pop3s),
        odmr=[] if no_odmr else list(odmr or d["odmr"]),
        serialmail=not no_serialmail,
    )
    raise SystemExit(run_serve(root, opts, check_only=check))
