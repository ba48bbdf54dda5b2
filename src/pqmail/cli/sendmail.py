"""``sendmail``: the sendmail command line that cron, PHP, MUAs and scripts call.

It queues through pqmail inject (see pqmail.inject for the header rules), exactly as qmail's
sendmail wrapper runs qmail-inject: without ``-t`` the recipients are the arguments only
(qmail-inject ``-a``); with ``-t`` the header's To/Cc/Bcc are added to them (``-H``).
``-f SENDER`` (or ``-r``) also becomes the default From address, with no full name unless ``-F``
gives one (qmail drops an ``-F`` given with ``-f``; pqmail keeps it).

Accepted and ignored, as sendmail or qmail ignores them: ``-i``, ``-oi``, ``-od*``, ``-oe*``,
``-om``, any other ``-o``/``-O`` option, ``-B type``, ``-e*``, ``-h N``, ``-m``, ``-n``,
``-N dsn``, ``-R ret``, ``-V envid``, ``-v``, ``-x``, ``-U``, ``-G``, ``-L tag``, ``-X file``,
``-C file``, ``-d*``, ``-p proto``, ``-A*``, ``-bm``. Refused with a clear message: ``-bs``
(SMTP on stdin), ``-bd``, ``-bi``/newaliases, ``-bt``, ``-bv``. ``-bp`` (or running as ``mailq``)
lists the queue as qmail-qread does; ``-q`` asks pqmail send to retry now.

Options may come before or after the recipients (GNU getopt style); ``--`` ends them. The root is
$PQMAIL_ROOT, else /var/pqmail. Exit status: 0 once the message is durably queued, 100 for a
permanent error (bad address, no recipients, bad usage), 111 for a temporary one.

This module is the start-up path of every mail a web application or cron job sends: it imports
neither click nor rich nor asyncio, and the rest only when needed.
"""

from __future__ import annotations

import os
import sys

USAGE = ("usage: sendmail [-t] [-i] [-f sender] [-F name] [-oi] [-odi|-odb] [-bp] [-q] "
         "[--] [recipient ...]")
HELP = """Queue a message read from standard input (pqmail's sendmail interface).

Without -t the recipients are the arguments only; with -t the To, Cc and Bcc
addresses of the header (Resent-To/Cc/Bcc for a resent message) are added to
them, and Bcc is removed. Date, Message-ID and From are added when missing,
and addresses are qualified with control/defaulthost, defaultdomain and
plusdomain, as qmail-inject does (see pqmail inject --help). A line with a
single dot does not end the message: input is read to its end.

Options:
  -t            also take recipients from the header
  -f SENDER     envelope sender (also -fSENDER, -r SENDER); -f '<>' is the null
                sender; it also becomes the default From address
  -F NAME       full name for the default From line
  -bp           list the queue (like mailq and qmail-qread)
  -q            ask pqmail send to retry every queued message now
  --            end of options
  Ignored, as qmail ignores them: -i, -oi, -odb, -odi, -oem and any other -o
  or -O option, -B, -e, -h, -m, -n, -N, -R, -V, -v, -x, -U, -G, -L, -X, -C,
  -d, -p, -A, -bm. Refused: -bs (talk SMTP to pqmail smtpd), -bd, -bi
  (newaliases), -bt, -bv.

Environment: PQMAIL_ROOT (default /var/pqmail), and qmail-inject's QMAILUSER,
QMAILHOST, QMAILNAME, MAILUSER, MAILHOST, MAILNAME, NAME, QMAILSUSER,
QMAILSHOST, QMAILINJECT, QMAILDEFAULTHOST, QMAILDEFAULTDOMAIN,
QMAILPLUSDOMAIN, QMAILIDHOST.

Exit status: 0 once the message is durably queued; 100 for a permanent error
(bad address, no recipients, bad usage); 111 for a temporary one (queue
missing or not writable, disk full). Each error is one line on stderr.
"""
_WITH_ARG = frozenset("ABCFLNORVXbdefhopqr")  # the rest of the word, or the next word
_OPTIONAL_ARG = frozenset("Adeq")  # the argument may only be attached (-d, -q30m, -Am, -oem...)
_FLAGS = frozenset("GUimntvx")
_REFUSED_MODES = {
    "s": "-bs (SMTP on standard input) is not supported: talk SMTP to pqmail smtpd instead",
    "d": "-bd (run as a daemon) is not supported: run pqmail serve or pqmail smtpd",
    "D": "-bD (run as a daemon) is not supported: run pqmail serve or pqmail smtpd",
    "i": "-bi (newaliases) is not supported: pqmail has no aliases file; use dot-qmail files",
    "t": "-bt (address test mode) is not supported: use pqmail route ADDRESS",
    "v": "-bv (verify addresses) is not supported: use pqmail route ADDRESS",
}


class Usage(Exception):
    """A command line sendmail cannot honour: exit 100 with the message."""


class Args:
    """The parsed command line."""

    def __init__(self) -> None:
        self.header = False
        self.sender: str | None = None
        self.fullname: str | None = None
        self.mode = "m"  # m: send, p: list the queue, q: retry the queue now
        self.recipients: list[str] = []


def parse_args(argv: list[str]) -> Args:
    """Parse sendmail's options (pure). Raises :class:`Usage`."""
    a = Args()
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            a.recipients.extend(argv[i:])
            break
        if not word.startswith("-") or word == "-":
            a.recipients.append(word)
            continue
        j = 1
        while j < len(word):
            opt = word[j]
            j += 1
            if opt in ("E", "J"):  # Sony NEWS-OS: the rest of the word is an optional argument
                break
            if opt in _FLAGS:
                if opt == "t":
                    a.header = True
                continue
            if opt not in _WITH_ARG:
                raise Usage(f"unknown option -{opt}")
            value = word[j:]
            if not value and opt not in _OPTIONAL_ARG:
                if i >= len(argv):
                    raise Usage(f"option -{opt} needs an argument")
                value = argv[i]
                i += 1
            _apply(a, opt, value)
            break
    return a


def _apply(a: Args, opt: str, value: str) -> None:
    if opt in ("f", "r"):
        a.sender = value
    elif opt == "F":
        a.fullname = value
    elif opt == "q":
        a.mode = "q"
    elif opt == "b":
        mode = value[:1]
        if mode in _REFUSED_MODES:
            raise Usage(_REFUSED_MODES[mode])
        if mode == "p":
            a.mode = "p"
        elif mode != "m":
            raise Usage(f"unsupported mode -b{value}")


def inject_env(env: dict[str, str], sender: str | None, fullname: str | None) -> dict[str, str]:
    """The environment qmail's sendmail hands qmail-inject: ``-f`` names the From user and host."""
    env = dict(env)
    if sender is not None:
        for name in ("QMAILNAME", "MAILNAME", "NAME", "QMAILHOST", "MAILHOST"):
            env.pop(name, None)
        at = sender.rfind("@")
        if at < 0:
            env["QMAILUSER"] = sender
        else:
            env["QMAILUSER"] = sender[:at]
            env["QMAILHOST"] = sender[at + 1:]
    if fullname is not None:
        env["QMAILNAME"] = fullname
    return env


def _list_queue(root: str) -> None:
    """qmail-qread's listing."""
    import time

    from pqmail.queue.store import Queue

    out = sys.stdout
    for m in Queue(os.path.join(root, "queue")).iter_messages():
        when = time.strftime("%d %b %Y %H:%M:%S", time.gmtime(m.birth)).lstrip("0")
        flag = " bouncing" if m.bouncing else ""
        out.write(f"{when} GMT  #{m.id}  {m.size}  <{_printable(m.sender)}> {flag}\n")
        for r in m.recipients:
            out.write(f"{'  done' if r.done else ''}\t{r.channel}\t{_printable(r.address)}\n")
    out.flush()


def _printable(s: str) -> str:
    return "".join(c if c.isprintable() else "_" for c in s)


def _retry_now(root: str) -> None:
    from pqmail.queue.store import Queue

    Queue(os.path.join(root, "queue")).request_retry()


def run(argv: list[str], prog: str = "sendmail") -> int:
    """Do what the command line asks; raise PqmailError or Usage on failure."""
    if "--help" in argv:
        sys.stdout.write(f"{USAGE}\n\n{HELP}")
        return 0
    a = parse_args(argv)
    # pqmail.paths.default_root, without importing pathlib on this start-up path
    root = os.environ.get("PQMAIL_ROOT") or "/var/pqmail"
    if prog == "mailq" or a.mode == "p":
        _list_queue(root)
        return 0
    if prog == "newaliases":
        raise Usage(_REFUSED_MODES["i"])
    if a.mode == "q":
        _retry_now(root)
        return 0
    if not a.recipients and not a.header:
        raise Usage("no recipients given (name them as arguments, or use -t)")
    from pqmail.inject import inject

    inject(root, sys.stdin.buffer, sender=a.sender, recipients=a.recipients,
           strategy="both" if a.header else "args",
           env=inject_env(dict(os.environ), a.sender, a.fullname))
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one line on stderr and exit 100/111 for every failure."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "sendmail"
    if prog not in ("mailq", "newaliases"):
        prog = "sendmail"
    try:
        code = run(sys.argv[1:] if argv is None else argv, prog)
    except Usage as e:
        sys.stderr.write(f"sendmail: {e} (see sendmail --help)\n")
        code = 100
    except KeyboardInterrupt:
        code = 111
    except BrokenPipeError:  # sendmail -bp | head: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except Exception as e:
        code = _report(e)
    sys.exit(code)


def _report(e: Exception, prog: str = "sendmail") -> int:
    """One line on stderr for ``e``; the exit code (100 permanent, 111 temporary)."""
    from pqmail.errors import PqmailError

    if isinstance(e, PqmailError):
        sys.stderr.write(f"{prog}: {e}\n")
        return e.exit_code
    if isinstance(e, OSError):
        where = f" {e.filename}:" if e.filename else ""
        sys.stderr.write(f"{prog}: system error:{where} {e.strerror or e}\n")
        return 111
    if os.environ.get("PQMAIL_DEBUG"):
        raise e
    sys.stderr.write(f"{prog}: internal error: {type(e).__name__}: {e} (set PQMAIL_DEBUG=1 for details)\n")
    return 111


if __name__ == "__main__":
    main()
