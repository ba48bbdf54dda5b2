"""``pqmail send``: run the queue manager (qmail-send)."""

from __future__ import annotations

import click

from pqmail.cli.common import root_option


@click.command()
@root_option
@click.option("--drain", is_flag=True,
              help="Deliver everything deliverable now (local and remote), wait for deliveries in "
                   "flight, then exit. Deferred messages stay queued for their next retry.")
def send(root, drain: bool) -> None:
    """Run the queue manager: deliver queued mail, retry deferrals, send bounces.

    \b
    Like qmail-send, it preprocesses each new message once (envnoathost,
    percenthack, locals, virtualdomains), delivers local recipients as the
    user users/cdb names (concurrencylocal at a time) and remote ones by
    SMTP (smtproutes, else MX; concurrencyremote at a time), retries
    deferrals on qmail's schedule (birth + (sqrt(age) + 10)^2 seconds for
    local, + 20 for remote) until queuelifetime, and sends one QSBMF bounce
    per message listing every recipient that failed permanently.

    \b
    It wakes up when a message is queued (queue/lock/trigger), at the next
    retry time, and on signals:
      SIGALRM  retry every deferred message now (also: pqmail queue flush)
      SIGHUP   re-read control files, users/cdb and control/defaultdelivery
      SIGTERM  finish deliveries in flight, then exit
    Only one runs per queue (lock on queue/lock/sendmutex). It logs one
    line per event in qmail-send's words on stderr: new msg, info msg,
    starting delivery, delivery N: success/deferral/failure, bounce msg,
    end msg.

    \b
    Run it as root so that deliveries can take each user's uid; not as
    root, deliveries for other uids are deferred with a clear report.

    \b
    Exit status: 0 after a clean stop or drain; 100 on a usage error (no
    queue, another send running); 111 on a system error.
    """
    from pqmail.queue.manager import run_send

    raise SystemExit(run_send(root, drain))
