"""``pqmail inject``: queue a message read from stdin (qmail-inject).

Its ``--root`` is a plain string option rather than cli.common's root_option: that one builds a
paths.Root, whose pathlib import costs start-up time that every mailing cron job would pay.
"""

from __future__ import annotations

import os
import sys

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-f", "sender", metavar="SENDER",
              help="Envelope sender (qualified like any address; -f '' is the null sender <>). "
                   "Default: the first Return-Path address, else user@host from the environment.")
@click.option("-t", "use_header", is_flag=True,
              help="Also send to the To, Cc and Bcc addresses of the header (Resent-To/Cc/Bcc "
                   "for a resent message), besides any RCPT arguments.")
@click.option("-n", "print_only", is_flag=True,
              help="Do not queue: print the message as it would be queued, after a Return-Path line.")
@click.option("--root", "root", metavar="DIR",
              help="The pqmail root (a qmail tree). Default: $PQMAIL_ROOT, then /var/pqmail.")
@click.argument("recipients", nargs=-1, metavar="[RCPT]...")
def inject(sender: str | None, use_header: bool, print_only: bool, root: str | None,
           recipients: tuple[str, ...]) -> None:
    """Read a message on stdin and queue it, as qmail-inject does.

    \b
    The recipients are the RCPT arguments; with no argument, or with -t, they are
    also taken from the header: To, Cc, Bcc and Apparently-To (or
    Resent-To, Resent-Cc and Resent-Bcc if the message has any Resent-
    field). Bcc and Resent-Bcc are then removed from the header, as are
    Return-Path and Content-Length.

    \b
    The header gets, when it lacks them: Date, Message-ID
    (<time.pid.n@idhost>), From ("Full Name" <user@host>), and
    "Cc: recipient list not shown: ;" when there is neither To nor Cc.
    Addresses in the arguments, in -f and in the header are qualified:
    an address without @ gets @defaulthost, a host ending in + gets
    .plusdomain instead of the +, and a host without a dot gets
    .defaultdomain. CRLF line ends become LF.

    \b
    Settings: control/defaulthost, defaultdomain, plusdomain and idhost
    (each defaulting to control/me), overridden by the environment
    variables QMAILDEFAULTHOST, QMAILDEFAULTDOMAIN, QMAILPLUSDOMAIN and
    QMAILIDHOST. The From user is $QMAILUSER, $MAILUSER, $USER or
    $LOGNAME; its host $QMAILHOST or $MAILHOST (else defaulthost); the
    full name $QMAILNAME, $MAILNAME or $NAME. The default envelope sender
    uses $QMAILSUSER and $QMAILSHOST when set. $QMAILINJECT holds
    qmail-inject's flags: c (full name as a comment), s (ignore
    Return-Path), f (replace From), i (replace Message-ID), r (VERP
    sender), m (per-message sender).

    \b
    Exit status: 0 once the message is durably queued (written, fsync'd
    and linked into queue/todo); 100 for a permanent error (an address
    that cannot be parsed or is too long, no recipients, a bad option);
    111 for a temporary one (queue missing or not writable, disk full,
    read error). Each error is one line on stderr.

    \b
    Examples:
      echo 'Subject: hi' | pqmail inject joe@example.com
      pqmail inject -t < message.eml
      pqmail inject -f '' postmaster < bounce.txt
    """
    from pqmail.inject import inject as run_inject

    root = root or os.environ.get("PQMAIL_ROOT") or "/var/pqmail"  # as paths.default_root
    run_inject(root, sys.stdin.buffer, sender=sender, recipients=list(recipients),
               strategy="both" if use_header else "default",
               print_to=sys.stdout.buffer if print_only else None)
