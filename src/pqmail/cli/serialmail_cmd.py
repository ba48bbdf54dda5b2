"""``pqmail serialmail``: push dial-up customers' Maildirs to their hosts (serialmail's commands).

Only argument handling and output live here; the work is in :mod:`pqmail.serialmail`.
"""

from __future__ import annotations

import os
import sys

import click

from pqmail.cli.common import password_store_ids, read_password, root_option
from pqmail.errors import UsageError
from pqmail.paths import Root

CTX = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=CTX)
def serialmail() -> None:
    """Deliver dial-up customers' waiting mail to their hosts by SMTP (serialmail).

    \b
    flush DIR    one customer now (maildirsmtp under setlock -n)
    run          every customer once, e.g. from cron
    daemon       every customer every control/serialmailinterval seconds
    odmrd        the ODMR (RFC 2645, ATRN) server for customers without a fixed address
    passwd       set a customer's ODMR/ETRN password
    """


@serialmail.command("flush", context_settings=CTX)
@click.argument("dir", metavar="DIR")
@click.option("--prefix", metavar="P",
              help="Removed from each Delivered-To address to give the recipient. Default: '<DIR name>-'.")
@click.option("--lifetime", type=click.IntRange(min=0), metavar="SECONDS",
              help="Bounce a deferred message older than this. Default: control/serialmaillifetime, "
                   "else 604800 (7 days).")
@root_option
def flush_cmd(dir: str, prefix: str | None, lifetime: int | None, root: Root) -> None:
    """Deliver the mail waiting in DIR/Maildir to the host in DIR/RELAYHOST.

    \b
    DIR/RELAYHOST is host[:port] (port 25 by default). One transfer per
    customer: if another holds the lock on DIR/RELAYHOST this says so and
    exits 0 at once. Nothing waiting: no connection. Each message goes in
    its own SMTP transaction: sender from its Return-Path line, recipient
    from its Delivered-To line minus the prefix. A message is removed only
    after the host answers 2xx to its data; a 5xx bounces it (QSBMF, into
    the queue); a 4xx keeps it and ends the run, unless it is older than
    the lifetime (then it bounces). DIR/LASTTRANSFER records the outcome.

    \b
    Exit status: 0 nothing left to do now (or another transfer runs);
    111 messages stay (deferred, or the host could not be reached);
    100 usage or configuration error.
    """
    from pqmail.config.control import load_control
    from pqmail.queue.store import Queue
    from pqmail.serialmail.flush import flush
    from pqmail.serialmail.runner import load_settings

    if not os.path.isdir(dir):
        raise UsageError(f"{dir}: no such directory")
    life = load_settings(root).lifetime if lifetime is None else lifetime
    queue = Queue(root.queue)
    try:
        result = flush(dir, prefix=prefix, lifetime=life, control=load_control(root), queue=queue)
    finally:
        queue.close()
    if result.status in ("deferred", "failed", "interrupted"):
        sys.exit(111)


@serialmail.command("run", context_settings=CTX)
@click.option("--base", "bases", multiple=True, metavar="DIR",
              help="Flush every DIR/*/ holding a RELAYHOST (repeatable). Default: the dial-up customers "
                   "that pqmail dialup add provisioned.")
@click.option("--concurrency", type=click.IntRange(min=1), metavar="N",
              help="Flushes at once. Default: control/serialmailconcurrency, else 10.")
@click.option("--grace", type=click.FloatRange(min=0), default=1.0, show_default=True, metavar="SECONDS",
              help="Pause between the starts of two flushes.")
@root_option
def run_cmd(bases: tuple[str, ...], concurrency: int | None, grace: float, root: Root) -> None:
    """Flush every dial-up customer that has mail waiting, then exit (for cron).

    Customers with nothing waiting cost a directory listing and no
    connection. Each flush takes its customer's lock, so a run overlapping
    another (or an ETRN/ODMR transfer) skips the customers already being
    served. The last line printed sums up the run.
    """
    from pqmail.serialmail.runner import run_all

    summary = run_all(root, list(bases) or None, concurrency=concurrency, grace=grace)
    click.echo(summary.line())


def _drop_if_root(root: Root) -> None:
    from pqmail.supervisor import drop_privileges, mail_user_ids

    if os.geteuid() == 0:
        drop_privileges(*mail_user_ids(root.control))


@serialmail.command("daemon", context_settings=CTX)
@click.option("--base", "bases", multiple=True, metavar="DIR", help="As for run.")
@root_option
def daemon_cmd(bases: tuple[str, ...], root: Root) -> None:
    """Run `serialmail run` every control/serialmailinterval seconds (default 120).

    \b
    The same job pqmail serve runs, for another supervisor. As root it
    becomes the user in control/mailuser first. SIGALRM: run now.
    SIGTERM: let the flushes in progress finish, then exit.
    """
    from pqmail.serialmail.runner import serialmail_service

    _drop_if_root(root)
    serialmail_service(root, list(bases) or None)


@serialmail.command("odmrd", context_settings=CTX)
@click.option("--listen", "listen", multiple=True, metavar="HOST:PORT",
              help="Listener (repeatable). Default: 0.0.0.0:366 as root, else 127.0.0.1:2366.")
@root_option
def odmrd_cmd(listen: tuple[str, ...], root: Root) -> None:
    """Serve ODMR (RFC 2645): customers fetch their mail with AUTH and ATRN.

    \b
    The customer logs in with its dial-up domain and the password set by
    `pqmail serialmail passwd DOMAIN` (AUTH CRAM-MD5, PLAIN or LOGIN), then
    sends ATRN [DOMAIN]. With mail waiting the answer is 250 and the
    connection turns round: pqmail delivers the customer's Maildir over it
    by SMTP, under the customer's lock. 450: not yours, or a transfer is
    already running; 453: no mail; 530: AUTH first.
    As root it binds, then becomes the user in control/mailuser.
    """
    from pqmail.serialmail.odmr import serve_odmr_listeners
    from pqmail.supervisor import bind_listener, parse_hostport

    if not listen:
        listen = ("0.0.0.0:366",) if os.geteuid() == 0 else ("127.0.0.1:2366",)
    parsed = [parse_hostport(spec) for spec in listen]
    socks = []
    for host, port in parsed:
        socks.append(("odmr", bind_listener(host, port)))
        print(f"pqmail serialmail odmrd: listening on {host}:{port}", file=sys.stderr, flush=True)
    _drop_if_root(root)
    serve_odmr_listeners(root, socks)


@serialmail.command("passwd", context_settings=CTX)
@click.argument("domain", metavar="DOMAIN")
@click.option("--password-file", metavar="F", help="Read the password from the first line of F ('-': stdin).")
@click.option("--random-password", is_flag=True, help="Generate a password and print it.")
@click.option("--hashed", is_flag=True,
              help="Store an argon2id hash instead of the secret: AUTH CRAM-MD5 (fetchmail's ODMR) then "
                   "cannot work, only PLAIN and LOGIN.")
@root_option
def passwd_cmd(domain: str, password_file: str | None, random_password: bool, hashed: bool,
               root: Root) -> None:
    """Set the password dial-up customer DOMAIN uses for ODMR and for ETRN after SMTP AUTH.

    \b
    The login is DOMAIN itself. The entry is DOMAIN's line in users/poppasswd
    (mode 0600) with DOMAIN's Maildir, so the same login can also read the
    waiting mail by POP3. CRAM-MD5 needs the secret itself, so by default it
    is stored as {PLAIN}secret; --hashed stores argon2id instead.
    """
    from pqmail.passwords import PasswordStore, hash_password
    from pqmail.provision import validate_domain
    from pqmail.serialmail.runner import find_dialups

    d = validate_domain(domain)
    found = [x for x in find_dialups(root) if x.domain == d]
    if not found:
        raise UsageError(f"{d} is not a dial-up customer (add it with pqmail dialup add)")
    password, generated = read_password(password_file, random_password)
    if any(c in password for c in "\0\r\n") or (not hashed and ":" in password):
        raise UsageError("invalid password: contains a NUL, CR or LF (or ':', which only --hashed allows)")
    stored = hash_password(password) if hashed else "{PLAIN}" + password
    PasswordStore(root, *password_store_ids(root)).set(d, stored, found[0].dir / "Maildir")
    click.echo(f"{d} {password}" if generated else f"{d}: password set")


if __name__ == "__main__":  # `python -m pqmail.cli.serialmail_cmd`: what ETRN starts in the background
    from pqmail.cli.main import run

    run(serialmail, None, prog_name="pqmail serialmail")
