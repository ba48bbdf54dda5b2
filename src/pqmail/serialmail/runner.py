"""The serialmail master: flush every dial-up customer, once (``pqmail serialmail run``) or on a schedule.

Which customers: by default those that dial-up provisioning made (``pqmail dialup add``): every domain
whose ``virtualdomains`` prefix leads, through ``users/assign``, to a home holding ``RELAYHOST``
(:meth:`pqmail.provision.Provisioner.domains`). With ``--base B`` instead: every directory ``B/*``
holding a ``RELAYHOST`` file, as serialmail's own scripts would be pointed at them.

How: one flush (:mod:`pqmail.serialmail.flush`, each under its customer's lock) per directory that has
mail waiting; directories with nothing in ``new/`` and ``cur/`` cost one directory listing and no
connection. Starts are spaced by a grace period (1 s by default) so that a run does not open every
connection in the same instant, and at most ``control/serialmailconcurrency`` (default 10) flushes run
at once. :func:`serialmail_service` repeats the run every ``control/serialmailinterval`` seconds
(default 120) inside ``pqmail serve``, so no cron job is needed; SIGALRM starts a run at once.

Control files (qmail style, one number on the first line):

* ``serialmailinterval``: seconds between the starts of two scheduled runs (default 120);
* ``serialmailconcurrency``: flushes at once (default 10);
* ``serialmaillifetime``: seconds after which a message that is still deferred is bounced (default
  604800, 7 days, from the file's mtime).

What it trusts: provisioning's files and the dial-up directories. What it never does: run two flushes of
one customer at once (each takes the customer's lock), or let one customer's broken directory stop the
others (each failure is logged and the run goes on).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pqmail.config.casefold import ascii_lower
from pqmail.config.control import load_control, read_value
from pqmail.errors import PqmailError
from pqmail.paths import Root
from pqmail.provision import Provisioner
from pqmail.queue.store import Queue
from pqmail.serialmail.flush import DEFAULT_LIFETIME, FlushResult, flush_async

# Every import is at the top: the scheduled service runs after a privilege drop (see flush.py).

Log = Callable[[str], None]

DEFAULT_INTERVAL = 120
DEFAULT_CONCURRENCY = 10
DEFAULT_GRACE = 1.0


def _log(line: str) -> None:
    sys.stderr.write(f"serialmail: {line}\n")
    sys.stderr.flush()


# ----------------------------------------------------------------------------- settings

def control_number(root: Root, name: str, default: int, minimum: int = 0) -> int:
    """A numeric control file read as qmail does (the leading digits of the first line), else default."""
    text = read_value(root.control_file(name))
    digits = ""
    for c in text or "":
        if not "0" <= c <= "9":
            break
        digits += c
    return max(minimum, int(digits)) if digits else default


@dataclass(frozen=True)
class Settings:
    interval: int
    concurrency: int
    lifetime: int


def load_settings(root: Root) -> Settings:
    return Settings(control_number(root, "serialmailinterval", DEFAULT_INTERVAL, 1),
                    control_number(root, "serialmailconcurrency", DEFAULT_CONCURRENCY, 1),
                    control_number(root, "serialmaillifetime", DEFAULT_LIFETIME))


# ----------------------------------------------------------------------------- which directories

@dataclass(frozen=True)
class Dialup:
    """A dial-up customer: its domain and its directory (RELAYHOST, Maildir/)."""

    domain: str
    dir: Path


def find_dialups(root: Root, bases: Sequence[str | os.PathLike[str]] | None = None) -> list[Dialup]:
    """Provisioned dial-up customers, or (``bases`` given) every ``BASE/*`` holding a RELAYHOST."""
    if bases:
        found: dict[Path, Dialup] = {}
        for base in bases:
            b = Path(base)
            try:
                names = sorted(os.listdir(b))
            except FileNotFoundError:
                continue
            for name in names:
                d = b / name
                if not name.startswith(".") and os.path.isfile(d / "RELAYHOST"):
                    found.setdefault(d, Dialup(ascii_lower(name), d))
        return list(found.values())
    return [Dialup(info.domain, Path(info.target)) for info in Provisioner(root).domains()
            if info.kind == "dialup"]


def has_mail(dir: Path) -> bool:
    """Whether Maildir/new or Maildir/cur holds any message file (a quick look, no lock)."""
    for sub in ("new", "cur"):
        try:
            with os.scandir(dir / "Maildir" / sub) as it:
                if any(not e.name.startswith(".") for e in it):
                    return True
        except OSError:
            continue
    return False


# ----------------------------------------------------------------------------- one run

@dataclass
class RunSummary:
    dirs: int = 0
    empty: int = 0
    results: list[FlushResult] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0

    @property
    def delivered(self) -> int:
        return sum(r.delivered for r in self.results)

    def line(self) -> str:
        count: dict[str, int] = {}
        for r in self.results:
            count[r.status] = count.get(r.status, 0) + 1
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(count.items())) or "none"
        return (f"run: {self.dirs} dial-up directories, {self.empty} with nothing waiting; flushes: "
                f"{statuses}; errors {self.errors}; delivered {self.delivered}, "
                f"bounced {sum(r.bounced for r in self.results)}, "
                f"left {sum(r.left for r in self.results)} in {self.elapsed:.2f}s")


async def run_all_async(root: Root, bases: Sequence[str | os.PathLike[str]] | None = None, *,
                        concurrency: int | None = None, grace: float = DEFAULT_GRACE,
                        lifetime: int | None = None, log: Log = _log,
                        stop: asyncio.Event | None = None) -> RunSummary:
    """Flush every dial-up directory that has mail; see the module docstring."""
    started = time.monotonic()
    settings = load_settings(root)
    limit = concurrency or settings.concurrency
    life = settings.lifetime if lifetime is None else lifetime
    control = load_control(root)
    queue = Queue(root.queue)
    summary = RunSummary()
    dialups = await asyncio.to_thread(find_dialups, root, bases)
    summary.dirs = len(dialups)
    slots = asyncio.Semaphore(limit)
    tasks: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    last_start: float | None = None

    async def one(d: Dialup) -> None:
        try:
            summary.results.append(await flush_async(d.dir, lifetime=life, control=control, queue=queue,
                                                     log=log))
        except (PqmailError, OSError) as e:
            summary.errors += 1
            log(f"{d.dir.name}: {e}")
        finally:
            slots.release()

    try:
        for d in dialups:
            if stop is not None and stop.is_set():
                break
            if not await asyncio.to_thread(has_mail, d.dir):
                summary.empty += 1
                continue
            await slots.acquire()
            if last_start is not None and grace > 0:
                await _pause(last_start + grace - loop.time(), stop)
            last_start = loop.time()
            tasks.append(asyncio.create_task(one(d)))
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        queue.close()
    summary.elapsed = time.monotonic() - started
    return summary


async def _pause(seconds: float, stop: asyncio.Event | None) -> None:
    if seconds <= 0:
        return
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def run_all(root: Root, bases: Sequence[str | os.PathLike[str]] | None = None, *,
            concurrency: int | None = None, grace: float = DEFAULT_GRACE, lifetime: int | None = None,
            log: Log = _log) -> RunSummary:
    """:func:`run_all_async` in an event loop of its own (``pqmail serialmail run``, cron)."""
    return asyncio.run(run_all_async(root, bases, concurrency=concurrency, grace=grace, lifetime=lifetime,
                                     log=log))


# ----------------------------------------------------------------------------- the scheduled service

def _plain_log(line: str) -> None:
    # Under pqmail serve every line is already prefixed with the service's name.
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


def serialmail_service(root: Root, bases: Sequence[str | os.PathLike[str]] | None = None,
                       log: Log = _plain_log) -> None:
    """Run :func:`run_all_async` every ``control/serialmailinterval`` seconds until SIGTERM/SIGINT.

    For ``pqmail serve`` (a service function, run in a forked child as the mail user) and for
    ``pqmail serialmail daemon``. SIGALRM starts a run at once; SIGHUP is accepted (the control files
    are read afresh at every run anyway). On SIGTERM, flushes in progress finish and no new one starts.
    """
    asyncio.run(_service(root, bases, log))


async def _service(root: Root, bases: Sequence[str | os.PathLike[str]] | None, log: Log) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    wake = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGALRM, wake.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    log(f"serialmail: started (every {load_settings(root).interval}s)")
    while not stop.is_set():
        began = loop.time()
        wake.clear()
        try:
            summary = await run_all_async(root, bases, log=log, stop=stop)
            if summary.results or summary.errors:
                log(summary.line())
        except (PqmailError, OSError) as e:
            log(f"run failed: {e}")
        interval = load_settings(root).interval
        await _until(began + interval - loop.time(), stop, wake)
    log("serialmail: stopped")


async def _until(seconds: float, stop: asyncio.Event, wake: asyncio.Event) -> None:
    """Wait ``seconds``, or less if asked to stop or to run now."""
    if seconds <= 0 or stop.is_set() or wake.is_set():
        return
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in waiters:
            t.cancel()
