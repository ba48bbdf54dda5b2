"""``pqmail smtpd``: run the SMTP server alone, in one process (qmail-smtpd under tcpserver)."""

from __future__ import annotations

import os
import sys

import click

from pqmail.cli.common import root_option


@click.command()
@root_option
@click.option("--listen", "listen", multiple=True, metavar="HOST:PORT",
              help="SMTP listener (repeatable). Default: 0.0.0.0:25 as root, else 127.0.0.1:2525 "
                   "(only when no listener of any kind is given).")
@click.option("--submission", multiple=True, metavar="HOST:PORT",
              help="Submission listener (repeatable): every message needs AUTH, after STARTTLS.")
@click.option("--smtps", multiple=True, metavar="HOST:PORT",
              help="Implicit-TLS submission listener (repeatable; needs control/servercert.pem).")
def smtpd(root, listen: tuple[str, ...], submission: tuple[str, ...], smtps: tuple[str, ...]) -> None:
    """Receive mail by SMTP with qmail-smtpd's policy, and queue it.

    \b
    pqmail smtpd binds its listeners, drops privileges to the user named in
    control/mailuser (when started as root), and serves every connection in
    one process. `pqmail serve` runs several of these sharing the sockets,
    together with the queue manager; use `pqmail smtpd` under your own
    supervisor (systemd, runit, daemontools) instead.

    \b
    POLICY (qmail-smtpd, see control files below)
      A recipient is accepted when its domain (after the last @) or a
      .suffix of it is in rcpthosts or morercpthosts.cdb, unless the
      client may relay: its IP is in relayclients, or it authenticated.
      Otherwise: 553 sorry, that domain isn't in my list of allowed
      rcpthosts. Bang paths and addresses with two @ are refused, source
      routes are dropped, box@[our IP] becomes box@localiphost, user%host
      is mail for the domain after the @ (percenthack off unless listed).
      Senders in badmailfrom (address or @domain) get 553 at every RCPT;
      recipients in badrcptto get 553.

    \b
    ESMTP
      PIPELINING, 8BITMIME, SIZE (databytes), ENHANCEDSTATUSCODES,
      STARTTLS with control/servercert.pem (certificate chain and key in
      one PEM file) or control/servercert.d/HOST.pem chosen by SNI, and
      AUTH PLAIN/LOGIN against the POP box passwords (login = box name),
      offered only under TLS. On --submission and --smtps listeners every
      message needs AUTH.

    \b
    CONTROL FILES (re-read within a second of a change; SIGHUP: now)
      smtpgreeting      greeting (default: me)
      rcpthosts, morercpthosts.cdb, badmailfrom, databytes, localiphost,
      timeoutsmtpd      as in qmail (idle timeout, default 1200 s: 451)
      relayclients      one IP or CIDR network a line that may relay
      badrcptto         recipients refused (address or @domain)
      maxrcpt           recipients per message (100; more: 452)
      maxsessions       concurrent sessions per process (200; more: 421)
      maxsessionsperip  concurrent sessions per client IP (20; more: 421;
                        loopback and relayclients are exempt)
      maxheaderbytes    header size limit (262144; more: 552)
      maxsessiontime    seconds a session may last (3600; then 421)
    A databytes of 0 (qmail: no limit) means 64 MiB: messages are held in
    memory until they are queued.

    \b
    The reply to DATA is "250 ok <time> qp <id>" only after the message is
    fsync'd and committed in the queue; a client that disconnects during
    DATA leaves nothing queued. A bare LF in DATA gets qmail's 451 and the
    connection is closed. One log line per session and per accepted
    message goes to stderr.

    \b
    SIGNALS
      SIGTERM, SIGINT  stop accepting, close idle sessions (421), let
                       transactions in flight finish (up to 45 s), exit
      SIGHUP           re-read the control files and certificates

    \b
    Exit status: 0 after a clean stop; 100 for a usage error (bad address,
    port taken, no control/mailuser as root); 111 for an unreadable or
    malformed control file (named with its line) or a system error.
    """
    from pqmail.smtp.server import serve_listeners
    from pqmail.supervisor import bind_listener, drop_privileges, mail_user_ids, parse_hostport

    is_root = os.geteuid() == 0
    if not (listen or submission or smtps):
        listen = ("0.0.0.0:25",) if is_root else ("127.0.0.1:2525",)
    wanted = [(kind, spec) for kind, specs in (("smtp", listen), ("submission", submission),
                                               ("smtps", smtps)) for spec in specs]
    parsed = [(kind, parse_hostport(spec)) for kind, spec in wanted]  # every error before binding
    drop = mail_user_ids(root.control) if is_root else None
    listeners = []
    for kind, (host, port) in parsed:
        listeners.append((kind, bind_listener(host, port)))
        print(f"pqmail smtpd: {kind} listening on {host}:{port}", file=sys.stderr, flush=True)
    if drop is not None:
        drop_privileges(*drop)
    serve_listeners(root, listeners)
