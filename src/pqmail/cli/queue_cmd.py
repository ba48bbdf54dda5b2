"""``pqmail queue``: list, count and flush the queue (qmail-qread, qmail-qstat, SIGALRM)."""

from __future__ import annotations

import time

import click

from pqmail.cli.common import root_option


def _printable(s: str) -> str:
    return "".join(c if c.isprintable() else "_" for c in s)


def _pick_root(group_root, sub_root: str | None):
    from pqmail.paths import Root

    return Root(sub_root) if sub_root else group_root


def _age(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


@click.group(invoke_without_command=True)
@root_option
@click.pass_context
def queue(ctx: click.Context, root) -> None:
    """Inspect the queue (no subcommand: list it, like qmail-qread).

    \b
    For every message: the id, when it was queued (UTC) and its age, its size,
    the envelope sender, and "bouncing" when a bounce is being collected. Then
    one line per recipient: local or remote, "done" when delivered or bounced,
    and for recipients still waiting the time of the next attempt. Messages
    not yet preprocessed by pqmail send show their envelope recipients as
    "todo".
    """
    ctx.obj = root
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_cmd)


@queue.command("list")
@click.option("--root", "sub_root", metavar="DIR", default=None,
              help="The pqmail root (also accepted before the subcommand).")
@click.pass_obj
def list_cmd(root, sub_root: str | None = None) -> None:
    """List every message and recipient (the default)."""
    root = _pick_root(root, sub_root)
    from pqmail.queue.store import Queue

    q = Queue(root.queue)
    now = time.time()
    count = 0
    for m in q.iter_messages():
        count += 1
        when = time.strftime("%d %b %Y %H:%M:%S", time.gmtime(m.birth))
        flag = " bouncing" if m.bouncing else ""
        click.echo(f"{when} GMT  #{m.id}  {m.size}  <{_printable(m.sender)}>{flag}  "
                   f"age {_age(now - m.birth)}")
        for r in m.recipients:
            state = "  done" if r.done else ""
            nxt = ""
            if not r.done and r.next_attempt:
                nxt = "  next attempt " + ("now" if r.next_attempt <= now
                                           else f"in {_age(r.next_attempt - now)}")
            click.echo(f"{state}\t{r.channel}\t{_printable(r.address)}{nxt}")
            if not r.done and r.last:
                click.echo(f"\t\tlast attempt: {_printable(r.last)}")
    if count == 0:
        click.echo("queue is empty")


@queue.command("stat")
@click.option("--root", "sub_root", metavar="DIR", default=None,
              help="The pqmail root (also accepted before the subcommand).")
@click.pass_obj
def stat_cmd(root, sub_root: str | None = None) -> None:
    """Count messages, like qmail-qstat."""
    root = _pick_root(root, sub_root)
    from pqmail.queue.store import Queue

    q = Queue(root.queue)
    total, todo = q.counts()
    click.echo(f"messages in queue: {total}")
    click.echo(f"messages in queue but not yet preprocessed: {todo}")


@queue.command("flush")
@click.option("--root", "sub_root", metavar="DIR", default=None,
              help="The pqmail root (also accepted before the subcommand).")
@click.pass_obj
def flush_cmd(root, sub_root: str | None = None) -> None:
    """Ask pqmail send to retry every deferred message now (qmail's SIGALRM).

    Writes "F" to queue/lock/trigger; exits 111 when no pqmail send is
    listening.
    """
    root = _pick_root(root, sub_root)
    from pqmail.queue.store import Queue

    Queue(root.queue).request_retry()
    click.echo("pqmail send will retry every deferred message now")


@queue.command("fix")
@click.option("--root", "sub_root", metavar="DIR", default=None,
              help="The pqmail root (also accepted before the subcommand).")
@click.option("--owner", metavar="USER", default=None,
              help="Give the queue to this user and its primary group. Default: control/mailuser "
                   "(the invoking user when that file is missing and we are not root).")
@click.pass_obj
def fix_cmd(root, sub_root: str | None = None, owner: str | None = None) -> None:
    """Restore the queue's layout, modes and owner (like queue-fix for qmail).

    \b
    Creates missing directories and lock files, and gives every directory the
    mode and owner that `pqmail init` gives it. Spare files in queue/pool/
    of another owner, or that are not regular files, are removed (they hold no
    mail). Messages are not touched. Safe while pqmail runs. Prints each
    problem it repaired; `pqmail check` reports the same problems without
    changing anything.

    \b
    Exit status: 0 when the layout is right afterwards; 1 when problems are
    left (listed); 100 for a usage error; 111 for a system error.
    """
    root = _pick_root(root, sub_root)
    import os
    import sys

    from pqmail.provision import default_owner, lookup_owner
    from pqmail.queue.layout import layout_problems, make_queue

    who = lookup_owner(owner) if owner else default_owner(root)
    queue_dir = root.queue
    before = layout_problems(queue_dir) if queue_dir.exists() else []
    if queue_dir.exists() and os.stat(queue_dir).st_uid != who.uid:
        before.append((str(queue_dir), f"owner becomes {who.name}"))
    make_queue(queue_dir, who.uid, who.gid)
    pool = str(queue_dir / "pool")
    for path, _text in layout_problems(queue_dir):
        if os.path.dirname(path) == pool and (os.path.islink(path) or not os.path.isdir(path)):
            os.unlink(path)
    after = layout_problems(queue_dir)
    left = set(after)
    for path, text in before:
        if (path, text) not in left:
            click.echo(f"fixed: {path}: {text}")
    for path, text in after:
        click.echo(f"left: {path}: {text}")
    if after:
        sys.exit(1)
    click.echo(f"queue layout is right ({queue_dir}, owner {who.name})")
