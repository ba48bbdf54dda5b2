"""``pqmail send``: the queue manager (qmail-send).

What it does: takes committed messages from ``queue/todo``, rewrites their recipients once
(envnoathost, percenthack, locals, virtualdomains: routing.rewrite_recipient) and records them in
``info``/``local``/``remote``; delivers local recipients concurrently (up to ``concurrencylocal``)
as the uid/gid users/assign names (lspawn.Spawner); retries deferrals on qmail's schedule until
``queuelifetime``; collects permanent failures and sends one QSBMF bounce per message when the
message is finished; then removes the message.

What it trusts: the queue (written only by pqmail's own store) and the configuration. Local delivery
reports come back from a less trusted worker and are used only as data.

What it never does: remove a message or mark a recipient done before the delivery's result is on
disk (the Maildir file is fsync'd by the delivery, ``mark_done`` fsyncs the channel file, a bounce
or forward is enqueued durably before the recipient is marked); deliver as root; run twice (an
exclusive lock on ``queue/lock/sendmutex``).

Wake-ups: a byte on the ``queue/lock/trigger`` FIFO (``F`` also means "retry everything now", which is
what ``pqmail queue flush`` sends), the next retry time, SIGALRM (flush), SIGHUP (reload control and
users/cdb), SIGTERM/SIGINT (finish deliveries in flight, then exit). Remote recipients stay queued,
marked remote, until remote delivery is configured.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pqmail import routing
from pqmail.config.assign import UsersDB
from pqmail.config.control import Control, load_control
from pqmail.errors import ConfigError, PqmailError, UsageError
from pqmail.local.deliver import LocalJob, LocalResult
from pqmail.paths import Root
from pqmail.queue import bounce, schedule
from pqmail.queue.lspawn import Spawner
from pqmail.queue.store import Queue

IDLE_RESCAN = 25 * 60  # qmail-send looks at todo/ at least every 25 minutes


def _oneline(text: str) -> str:
    return text.strip().replace("\r", "").replace("\n", "/")


@dataclass
class _Msg:
    id: int
    sender: str
    birth: float
    local: list = field(default_factory=list)  # undone local records (store.Record)
    remote_pending: int = 0
    next_local: float = 0.0
    in_flight: int = 0
    attempt_started: float = 0.0


class Manager:
    """One queue manager for one root. ``run()`` blocks until stopped (or drained)."""

    def __init__(self, root: Root, *, drain: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        self.root = root
        self.drain = drain
        self.log = log or _stderr_log
        self.queue = Queue(root.queue)
        self.control: Control = load_control(root)
        self.users = UsersDB(root)
        self.default_delivery = _read_default_delivery(root)
        self.spawner = Spawner(threads_per_worker=max(1, self.control.concurrencylocal), log=self.log)
        self.msgs: dict[int, _Msg] = {}
        self.ready: deque[tuple[_Msg, object]] = deque()
        self.in_flight = 0
        self.delivery_ids = itertools.count(1)
        self.stopping = False
        self.todo_wanted = True
        self._wake: asyncio.Event | None = None
        self._tasks: set[asyncio.Future] = set()
        self._mutex_fd = -1

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        if not self.root.queue.is_dir():
            raise UsageError(f"{self.root.queue}: no queue here; create the tree with pqmail init")
        self._lock_mutex()
        self.spawner.start()  # forks the root zygote: must precede every thread
        try:
            asyncio.run(self._main())
        finally:
            self.spawner.close()
            os.close(self._mutex_fd)
        return 0

    def _lock_mutex(self) -> None:
        path = self.root.queue / "lock" / "sendmutex"
        self._mutex_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._mutex_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._mutex_fd)
            raise UsageError(f"{path}: another pqmail send is running") from None

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self.pool = ThreadPoolExecutor(max_workers=max(2, self.control.concurrencylocal),
                                       thread_name_prefix="deliver")
        loop.set_default_executor(self.pool)
        self._wake = asyncio.Event()
        self._install_signals(loop)
        trigger_fds = self._open_trigger(loop)
        removed = await loop.run_in_executor(None, self.queue.cleanup_stale)
        if removed:
            self.log(f"status: removed {removed} stale partial message file(s)")
        await loop.run_in_executor(None, self._load_preprocessed)
        self.log(f"status: local 0/{self.control.concurrencylocal} remote 0/{self.control.concurrencyremote}")
        last_scan = 0.0
        try:
            while True:
                now = time.time()
                if self.todo_wanted or now - last_scan >= IDLE_RESCAN:
                    self.todo_wanted = False
                    last_scan = now
                    await self._process_todo()
                    now = time.time()
                if not self.stopping:
                    self._queue_due(now)
                    self._dispatch()
                if self.stopping and self.in_flight == 0:
                    break
                if self.drain and self.in_flight == 0 and not self.ready and not self._due_soon(now):
                    if not await loop.run_in_executor(None, self.queue.list_todo):
                        break
                    self.todo_wanted = True
                    continue
                timeout = min(IDLE_RESCAN, max(0.0, self._next_wakeup() - now))
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=timeout)
                except TimeoutError:
                    pass
        finally:
            if trigger_fds:
                loop.remove_reader(trigger_fds[0])
            for fd in trigger_fds:
                os.close(fd)
            self._save_retry_times()
            self.pool.shutdown(wait=True)
        self.log("status: exiting")

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self._stop)
        loop.add_signal_handler(signal.SIGINT, self._stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        loop.add_signal_handler(signal.SIGALRM, self._flush)

    def _stop(self) -> None:
        if not self.stopping:
            self.log("status: stopping after deliveries in flight")
        self.stopping = True
        self._poke()

    def _reload(self) -> None:
        try:
            self.control = load_control(self.root)
            self.default_delivery = _read_default_delivery(self.root)
            self.log("status: control files reloaded")
        except ConfigError as e:
            self.log(f"alert: cannot reload, keeping the old configuration: {e}")
        self._poke()

    def _flush(self) -> None:
        for m in self.msgs.values():
            m.next_local = 0.0
        self.todo_wanted = True
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _open_trigger(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        path = self.root.queue / "lock" / "trigger"
        try:
            rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            self.log(f"warning: cannot open {path}: {e.strerror}; checking todo/ every 25 minutes only")
            return []
        wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # keeps the FIFO from reporting EOF forever

        def on_trigger() -> None:
            try:
                data = os.read(rfd, 4096)
            except BlockingIOError:
                return
            if b"F" in data:
                self._flush()
            self.todo_wanted = True
            self._poke()

        loop.add_reader(rfd, on_trigger)
        return [rfd, wfd]

    # ------------------------------------------------------------------ preprocessing

    def _load_preprocessed(self) -> None:
        """Rebuild the schedule from info/ after a restart; retry times come from the channel mtimes."""
        unfinished = set(self.queue.list_todo())  # preprocessing was cut short: redo it from todo/
        for mid in self.queue.list_info():
            if mid in unfinished:
                continue
            try:
                self.msgs[mid] = self._read_msg(mid)
            except (OSError, PqmailError) as e:
                self.log(f"warning: msg {mid}: cannot read its queue files: {e}")

    def _read_msg(self, mid: int) -> _Msg:
        sender = self.queue.read_info(mid)
        birth = self.queue.birth(mid)
        m = _Msg(id=mid, sender=sender, birth=birth)
        m.local = [r for r in self.queue.read_channel(mid, "local") if not r.done]
        m.remote_pending = sum(1 for r in self.queue.read_channel(mid, "remote") if not r.done)
        m.next_local = self.queue.channel_mtime(mid, "local") or 0.0
        if not m.local and not m.remote_pending:
            m.next_local = 0.0  # finished but not removed before a crash: finish it now
        return m

    async def _process_todo(self) -> None:
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(None, self.queue.list_todo)
        ids = [i for i in ids if i not in self.msgs]
        if ids:
            done = await asyncio.gather(*(loop.run_in_executor(None, self._preprocess, i) for i in ids))
            for m in done:
                if m is not None:
                    self.msgs[m.id] = m

    def _preprocess(self, mid: int) -> _Msg | None:
        try:
            env = self.queue.read_todo(mid)
        except (OSError, PqmailError) as e:
            self.log(f"warning: msg {mid}: unreadable todo entry: {e}")
            return None
        self.log(f"new msg {mid}")
        local: list[str] = []
        remote: list[str] = []
        for rcpt in env.recipients:
            rw = routing.rewrite_recipient(self.control, rcpt)
            (local if rw.is_local else remote).append(rw.address)
        self.queue.write_info(mid, env.sender)
        if local:
            self.queue.write_channel(mid, "local", local)
        if remote:
            self.queue.write_channel(mid, "remote", remote)
        self.queue.finish_preprocess(mid)
        size = self.queue.message_size(mid)
        self.log(f"info msg {mid}: bytes {size} from <{env.sender}> qp {env.pid} uid {env.uid}")
        return self._read_msg(mid)

    # ------------------------------------------------------------------ scheduling

    def _queue_due(self, now: float) -> None:
        for m in list(self.msgs.values()):
            if m.in_flight or m.next_local > now:
                continue
            if not m.local:
                if not m.remote_pending:
                    m.next_local = float("inf")
                    m.in_flight = 1
                    self.in_flight += 1
                    self._spawn(self._finish(m))
                continue
            m.attempt_started = now
            m.next_local = float("inf")
            for rec in m.local:
                self.ready.append((m, rec))
                m.in_flight += 1

    def _due_soon(self, now: float) -> bool:
        return any(m.local and m.next_local <= now and not m.in_flight for m in self.msgs.values())

    def _next_wakeup(self) -> float:
        times = [m.next_local for m in self.msgs.values() if m.local and not m.in_flight]
        return min(times, default=time.time() + IDLE_RESCAN)

    def _dispatch(self) -> None:
        limit = self.control.concurrencylocal
        while self.ready and self.in_flight < limit:
            m, rec = self.ready.popleft()
            self.in_flight += 1
            self._spawn(self._deliver(m, rec))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, m: _Msg, rec) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._deliver_blocking, m, rec)
        except Exception as e:  # never let one delivery take the manager down
            self.log(f"alert: msg {m.id}: internal error delivering to {rec.address}: "
                     f"{type(e).__name__}: {e}")
        finally:
            self.in_flight -= 1
            m.in_flight -= 1
            if m.in_flight == 0:
                m.local = [r for r in m.local if not r.done]
                if m.local:
                    m.next_local = schedule.next_retry(m.birth, m.attempt_started, "local")
                else:
                    m.next_local = 0.0
            self._poke()

    def _deliver_blocking(self, m: _Msg, rec) -> None:
        d = next(self.delivery_ids)
        self.log(f"starting delivery {d}: msg {m.id} to local {rec.address}")
        result = self._run_local(m, rec)
        last = schedule.expired(m.birth, m.attempt_started, self.control.queuelifetime)
        if result.status == "Z" and last:
            result = LocalResult(status="D", report=f"{result.report}\n{bounce.TOO_LONG}",
                                 forwards=[], new_sender="", forward_prefix=b"")
        text = _oneline(result.report)
        if result.status == "K":
            if result.forwards:
                fid = self.queue.enqueue(
                    result.new_sender, result.forwards,
                    [result.forward_prefix, self.queue.message_path(m.id)],
                    invoked=f"by uid {self._uid_for(rec)}",
                )
                text = f"{text}/forwarded as msg {fid}" if text else f"forwarded as msg {fid}"
            self.queue.mark_done(m.id, "local", rec.offset)
            rec.done = True
            self.log(f"delivery {d}: success: {text}")
        elif result.status == "D":
            shown = routing.strip_vdom_prefix(self.control, rec.address)
            self.queue.append_bounce(m.id, bounce.paragraph(shown, result.report))
            self.queue.mark_done(m.id, "local", rec.offset)
            rec.done = True
            self.log(f"delivery {d}: failure: {text}")
        else:
            self.log(f"delivery {d}: deferral: {text}")

    def _uid_for(self, rec) -> int:
        return getattr(rec, "uid", os.getuid())

    def _run_local(self, m: _Msg, rec) -> LocalResult:
        r = routing.local_route(self.users, rec.address)  # rec.address was rewritten at preprocessing
        if r.trash:
            return LocalResult("K", "Trash address: nothing delivered.", [], "", b"")
        entry = r.entry
        if entry is None:
            entry = _getpw(r.local)
            if isinstance(entry, str):
                return LocalResult("Z", entry, [], "", b"")
        rec.uid = entry.uid
        job = LocalJob(
            message_path=self.queue.message_path(m.id),
            sender=routing.verp_expand(m.sender, rec.address),
            recipient=rec.address, entry=entry, default_delivery=self.default_delivery,
        )
        try:
            fd = os.open(job.message_path, os.O_RDONLY)
        except OSError as e:
            return LocalResult("Z", f"Unable to open the queued message: {e.strerror}. (#4.3.0)",
                               [], "", b"")
        try:
            return self.spawner.deliver(job, fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ finishing

    async def _finish(self, m: _Msg) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._finish_blocking, m)
            self.msgs.pop(m.id, None)
        except (OSError, PqmailError) as e:
            self.log(f"warning: msg {m.id}: cannot finish yet ({e}); will retry")
            m.next_local = time.time() + 60
        finally:
            m.in_flight = 0
            self.in_flight -= 1
            self._poke()

    def _finish_blocking(self, m: _Msg) -> None:
        paragraphs = self.queue.read_bounce(m.id)
        if paragraphs:
            c = self.control
            target = bounce.bounce_target(m.sender, c.doublebounceto, c.doublebouncehost)
            if target.recipient is None:
                self.log(f"triple bounce: discarding bounce/{m.id}")
            else:
                body = bounce.compose(
                    target=target, original_sender=m.sender, paragraphs=paragraphs,
                    message=self.queue.message_path(m.id).read_bytes(),
                    bouncefrom=c.bouncefrom, bouncehost=c.bouncehost,
                )
                bid = self.queue.enqueue(target.sender, [target.recipient], body, invoked="for bounce")
                self.log(f"bounce msg {m.id} qp {bid}")
        self.queue.remove_message(m.id)
        self.log(f"end msg {m.id}")

    def _save_retry_times(self) -> None:
        for m in self.msgs.values():
            if m.local and m.next_local not in (0.0, float("inf")):
                self.queue.set_channel_mtime(m.id, "local", m.next_local)


def _getpw(local: str):
    """qmail-getpw's fallback for a local part users/cdb does not know: an AssignEntry or a report."""
    from pqmail.local.getpw import getpw

    try:
        entry = getpw(local)
    except PqmailError as e:
        return f"{e}"
    if entry is None:
        return "Sorry, no account for that address and no alias user. (#4.3.0)"
    return entry


def _read_default_delivery(root: Root) -> str:
    """``control/defaultdelivery`` (as netqmail sites keep it), else ``./Maildir/``."""
    path = root.control_file("defaultdelivery")
    try:
        text = path.read_bytes().decode("latin-1")
    except FileNotFoundError:
        return "./Maildir/\n"
    except OSError as e:
        raise ConfigError(str(path), e.strerror or str(e)) from None
    return text if text.endswith("\n") else text + "\n"


def _stderr_log(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_send(root: Root, drain: bool) -> int:
    return Manager(root, drain=drain).run()


__all__ = ["Manager", "Path", "run_send"]
