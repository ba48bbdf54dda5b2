"""``pqmail serve``: run every service under one supervisor (see pqmail.supervisor)."""

from __future__ import annotations

import os

import click

from pqmail.cli.common import root_option


def _defaults(root_user: bool) -> dict[str, list[str]]:
    if root_user:
        return {"smtp": ["0.0.0.0:25"], "submission": ["0.0.0.0:587"], "smtps": ["0.0.0.0:465"]}
    return {"smtp": ["127.0.0.1:2525"], "submission": ["127.0.0.1:2587"], "smtps": ["127.0.0.1:2465"]}


@click.command()
@root_option
@click.option("--smtp", "smtp", multiple=True, metavar="HOST:PORT",
              help="SMTP listener (repeatable). Default: 0.0.0.0:25 as root, else 127.0.0.1:2525.")
@click.option("--submission", multiple=True, metavar="HOST:PORT",
              help="Submission listener requiring AUTH (repeatable). Default :587 / 127.0.0.1:2587.")
@click.option("--smtps", multiple=True, metavar="HOST:PORT",
              help="Implicit-TLS submission listener (repeatable; needs control/servercert.pem). "
                   "Default :465 / 127.0.0.1:2465.")
@click.option("--no-smtp", is_flag=True, help="Run no SMTP listeners (queue manager only).")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="smtpd worker processes. Default: one per CPU core.")
@click.option("--pidfile", type=click.Path(dir_okay=False), default=None,
              help="Where to write the supervisor's pid. Default: ROOT/serve.pid.")
@click.option("--check", is_flag=True, help="Validate the configuration and exit (0 when usable).")
def serve(root, smtp, submission, smtps, no_smtp, workers, pidfile, check) -> None:
    """Run pqmail: SMTP listeners, the queue manager, and their supervisor.

    \b
    The supervisor binds every listening socket (as root, so ports below
    1024 work), then forks:
      smtpd-N   SMTP workers sharing the listeners (as control/mailuser)
      send      the queue manager (keeps root to deliver as each user)
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
    )
    raise SystemExit(run_serve(root, opts, check_only=check))
