"""The ``pqmail`` console script: ``pqmail inject`` on a short path, everything else through click.

Cron jobs and web applications run ``pqmail inject`` once per message, so its start-up time is
paid per message; importing click alone costs about 30 ms. The common forms (``-f SENDER``, ``-t``,
``-n``, ``--root DIR``, recipients) are parsed here; anything else (``--help``, a typo) goes to the
full click command, which gives the same behaviour and the usual error messages.
"""

from __future__ import annotations

import os
import sys


class _Fallback(Exception):
    """The command line needs the full CLI."""


def _parse_inject(argv: list[str]) -> tuple[str | None, bool, bool, str | None, list[str]]:
    sender: str | None = None
    header = print_only = False
    root: str | None = None
    rcpts: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rcpts.extend(argv[i + 1:])
            break
        if arg in ("-f", "--root"):
            if i + 1 >= len(argv):
                raise _Fallback
            if arg == "-f":
                sender = argv[i + 1]
            else:
                root = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--root="):
            root = arg[len("--root="):]
        elif arg.startswith("-f") and len(arg) > 2:
            sender = arg[2:]
        elif arg == "-t":
            header = True
        elif arg == "-n":
            print_only = True
        elif arg.startswith("-") and arg != "-":
            raise _Fallback  # --help, -h, combined or unknown flags: click explains them
        else:
            rcpts.append(arg)
        i += 1
    return sender, header, print_only, root, rcpts


def _inject(argv: list[str]) -> int:
    sender, header, print_only, root, rcpts = _parse_inject(argv)
    from pqmail.cli.sendmail import _report
    from pqmail.inject import inject

    try:
        inject(root or os.environ.get("PQMAIL_ROOT") or "/var/pqmail", sys.stdin.buffer,
               sender=sender, recipients=rcpts, strategy="both" if header else "default",
               print_to=sys.stdout.buffer if print_only else None)
    except KeyboardInterrupt:
        return 111
    except Exception as e:
        return _report(e, prog="pqmail")
    return 0


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["inject"]:
        try:
            sys.exit(_inject(argv[1:]))
        except _Fallback:
            pass
    from pqmail.cli.main import main as full_main

    full_main()


if __name__ == "__main__":
    main()
