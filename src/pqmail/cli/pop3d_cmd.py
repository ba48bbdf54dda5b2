"""``pqmail pop3d``: run the POP3 server alone, in one process (qmail-popup + qmail-pop3d under tcpserver)."""

from __future__ import annotations

import os
import sys

import click

from pqmail.cli.common import root_option


def default_listeners(is_root: bool, have_cert: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(pop3, pop3s) addresses used when none is given: ports 110/995 as root, else 1110/1995."""
    host, plain, tls = ("0.0.0.0", 110, 995) if is_root else ("127.0.0.1", 1110, 1995)
    return (f"{host}:{plain}",), ((f"{host}:{tls}",) if have_cert else ())


@click.command()
@root_option
@click.option("--listen", "listen", multiple=True, metavar="HOST:PORT",
              help="POP3 listener (repeatable; STLS when control/servercert.pem exists). "
                   "Default: 0.0.0.0:110 as root, else 127.0.0.1:1110.")
@click.option("--pop3s", multiple=True, metavar="HOST:PORT",
              help="Implicit-TLS POP3 listener (repeatable; needs control/servercert.pem). "
                   "Default: 0.0.0.0:995 as root, else 127.0.0.1:1995, when the certificate exists.")
@click.option("--workers", type=click.IntRange(1, 256), default=None, metavar="N",
              help="Server processes sharing the listeners. Default: one per CPU core.")
def pop3d(root, listen: tuple[str, ...], pop3s: tuple[str, ...], workers: int | None) -> None:
    """Serve the POP boxes by POP3 (RFC 1939, CAPA, STLS, AUTH PLAIN).

    \b
    pqmail pop3d binds its listeners, then runs --workers server processes
    sharing them (one per core by default), each dropping privileges to the
    user named in control/mailuser when started as root: it never serves as
    root. A worker that dies is restarted. Password hashes are verified off
    the event loop. The default listeners apply only when neither --listen
    nor --pop3s is given. `pqmail serve --pop3 ...` runs the same workers;
    use `pqmail pop3d` under systemd, runit or daemontools.

    \b
    LOGINS
      The box name (ex1-0001) or an address (joe@example.com) whose
      .qmail-joe delivers to exactly one box. Passwords from
      users/poppasswd.cdb: argon2id, or imported $1$/$5$/$6$ crypt and
      bcrypt hashes. control/pop3checkpassword names a checkpassword
      program that decides logins instead. Unknown logins and wrong
      passwords get the same "-ERR [AUTH]" after pop3faildelay seconds.

    \b
    MAILDROP (as qmail-pop3d, with RFC 1939's rules)
      At login new/ moves to cur/ (name:2,); one session per box (a second
      gets -ERR [IN-USE]); UIDL is the Maildir unique name; sizes count
      CRLF; DELE takes effect only at QUIT (unlink, then fsync of cur/).

    \b
    CONTROL FILES (read at start and on SIGHUP)
      timeoutpop3d (600), concurrencypop3 (500), concurrencypop3perip (50),
      pop3faildelay (1), pop3authfailures (10 per 5 min and address),
      pop3authcache (300 s; 0: off), pop3tlsonly (0), pop3apop (0),
      pop3checkpassword, servercert.pem (cert chain + key, for STLS/995).

    \b
    SIGNALS
      SIGTERM, SIGINT  stop accepting, let sessions end (up to 30 s), exit
      SIGHUP           re-read the control files and the certificate

    \b
    Exit status: 0 after a clean stop; 100 for a usage or configuration
    error; 111 for a system error.
    """
    from pqmail.pop3.server import serve_pop3_listeners  # loads every hash backend (pqmail.hashes)
    from pqmail.sessioncount import SessionCounter
    from pqmail.supervisor import Supervisor, bind_listener, mail_user_ids, parse_hostport, worker_services

    is_root = os.geteuid() == 0
    if not (listen or pop3s):
        listen, pop3s = default_listeners(is_root, root.control_file("servercert.pem").exists())
    wanted = [(kind, spec) for kind, specs in (("pop3", listen), ("pop3s", pop3s)) for spec in specs]
    parsed = [(kind, parse_hostport(spec)) for kind, spec in wanted]  # every error before binding
    drop = mail_user_ids(root.control) if is_root else None
    listeners = []
    for kind, (host, port) in parsed:
        listeners.append((kind, bind_listener(host, port)))

    def ready() -> None:
        for kind, (host, port) in parsed:
            print(f"pqmail pop3d: {kind} listening on {host}:{port}", file=sys.stderr, flush=True)

    n = workers or os.cpu_count() or 1
    if n == 1:
        serve_pop3_listeners(root, listeners, ready=ready, drop_to=drop)
        return
    ready()

    def worker(counts: SessionCounter) -> None:  # drops privileges itself, after reading the TLS key
        serve_pop3_listeners(root, listeners, drop_to=drop, counts=counts)

    raise SystemExit(Supervisor(worker_services("pop3d", n, None, worker)).run())


if __name__ == "__main__":  # `python -m pqmail.cli.pop3d_cmd` works before the command table lists pop3d
    from pqmail.cli.main import run

    run(pop3d, None, prog_name="pqmail pop3d")
