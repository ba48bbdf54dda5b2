"""``pqmail send``: the queue manager (qmail-send).

What it does: takes committed messages from ``queue/todo``, rewrites their recipients once
(envnoathost, percenthack, locals, virtualdomains: routing.rewrite_recipient) and records them in
``info``/``local``/``remote``; delivers local recipients concurrently (up to ``concurrencylocal``)
as the uid/gid users/assign names (lspawn.Spawner) and remote ones (up to ``concurrencyremote``)
through pqmail.remote; retries deferrals on qmail's schedule until
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
users/cdb), SIGTERM/SIGINT (finish deliveries in flight, then exit); a changed control/ file is
noticed within a second and re-read as on SIGHUP.
"""

from __future__ import annotations

import asyncio
import fcntl
import heapq
import itertools
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pqmail import aio, routing
from pqmail.addresses import split_address
from pqmail.config.assign import UsersDB
from pqmail.config.casefold import ascii_lower
from pqmail.config.control import Control, control_stamp, load_control
from pqmail.errors import ConfigError, PqmailError, UsageError
from pqmail.local.deliver import LocalJob, LocalResult
from pqmail.paths import Root
from pqmail.queue import bounce, schedule
from pqmail.queue.lspawn import Spawner
from pqmail.queue.store import Queue, channel_records
from pqmail.remote.deliver import RemoteEngine

IDLE_RESCAN = 25 * 60  # qmail-send looks at todo/ at least every 25 minutes
SETTLE_AFTER = 5.0  # seconds a preprocessed message may rely on todo/ before its files are fsync'd
PREPROCESS_WINDOW = 1000  # local deliveries waiting for a slot, at most
INLINE_PREPROCESS = 16  # new messages preprocessed on the loop's thread; more go to a thread
MAX_PROCS_PER_UID = 8  # delivery processes for one uid (each delivers one message at a time)


def _oneline(text: str) -> str:
    return text.strip().replace("\r", "").replace("\n", "/")


@dataclass
class _Msg:
    id: int
    sender: str
    birth: float
    local: list = field(default_factory=list)  # undone local records (store.Record)
    remote: list = field(default_factory=list)  # undone remote records
    next_local: float = 0.0
    in_flight: int = 0
    attempt_started: float = 0.0
    next_remote: float = float("inf")
    remote_in_flight: int = 0  # deliver calls (one per host and sender) under way
    remote_started: float = 0.0
    # Until settled, info/local/remote exist only here and todo/ is the durable record of the
    # message; ``records`` then holds every record (done ones too), for Queue.settle.
    settled: bool = True
    records: dict | None = None
    settling: bool = False  # its files are being written: it must not be removed meanwhile
    finishing: bool = False  # being removed: it must not be settled meanwhile (its id may be reused)
    # the queue subdirectories holding a file of this message, when known (None: look at them all)
    files: set[str] | None = None

    @property
    def remote_pending(self) -> int:
        return sum(1 for r in self.remote if not r.done)


class Manager:
    """One queue manager for one root. ``run()`` blocks until stopped (or drained)."""

    def __init__(self, root: Root, *, drain: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        self.root = root
        self.drain = drain
        self.log = log or _BufferedLog()
        self.queue = Queue(root.queue)
        self._stamp = (control_stamp(root), _mtime(root.control_file("defaultdelivery")))
        self._stamp_checked = time.time()
        self._dir_mtime = os.stat(root.control).st_mtime_ns if root.control.is_dir() else 0
        self.control: Control = load_control(root)
        self.users = UsersDB(root)
        self.default_delivery = _read_default_delivery(root)
        self.spawner = Spawner(procs_per_uid=min(MAX_PROCS_PER_UID, self.control.concurrencylocal),
                               log=self.log)
        self.msgs: dict[int, _Msg] = {}
        # (time, id): when each message's local records are next due; stale entries are skipped
        self._heap: list[tuple[float, int]] = []
        # (when preprocessed, id), oldest first: todo/ is still their durable record
        self._unsettled: deque[tuple[float, int]] = deque()
        self._leftovers: set[int] = set()  # ids with bounce/ or status/ files at start (see _preprocess)
        self._settling = False
        self.ready: deque[tuple[_Msg, object]] = deque()
        self.in_flight = 0  # local deliveries under way (what concurrencylocal limits)
        self.f_in_flight = 0  # finished messages waiting for, or in, their removal
        self._rheap: list[tuple[float, int]] = []  # like _heap, for remote records
        self.rready: deque[tuple[_Msg, str, str, list]] = deque()  # (msg, host, sender, records)
        self.r_in_flight = 0
        self._to_finish: list[_Msg] = []  # finished messages whose files go in the next batch
        self._rescan_after_finish = False
        self.remote_engine = RemoteEngine(lambda: self.control, root)
        self.delivery_ids = itertools.count(1)
        self.stopping = False
        self.todo_wanted = True
        self._poked = False  # something changed since the loop's pass began: pass again
        self._waiter: asyncio.Future | None = None  # the loop waits on it between passes
        self._tasks: set[asyncio.Future] = set()
        self._mutex_fd = -1

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        if not self.root.queue.is_dir():
            raise UsageError(f"{self.root.queue}: no queue here; create the tree with pqmail init")
        self._lock_mutex()
        self.spawner.start()  # forks the root zygote: must precede every thread
        try:
            aio.run(self._main())
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
        self._install_signals(loop)
        trigger_fds = self._open_trigger(loop)
        try:
            await loop.run_in_executor(None, self.queue.ensure_pool)
        except OSError as e:
            self.log(f"warning: cannot create {self.root.queue}/pool ({e.strerror or e}): "
                     f"finished messages' files are removed, not reused")
        removed = await loop.run_in_executor(None, self.queue.cleanup_stale)
        if removed:
            self.log(f"status: removed {removed} stale partial message file(s)")
        await loop.run_in_executor(None, self._load_preprocessed)
        self.log(f"status: local 0/{self.control.concurrencylocal} remote 0/{self.control.concurrencyremote}")
        last_scan = 0.0
        try:
            while True:
                self._poked = False
                now = time.time()
                self._reload_if_changed(now)
                if self.todo_wanted or now - last_scan >= IDLE_RESCAN:
                    self.todo_wanted = False
                    last_scan = now
                    await self._process_todo()
                    now = time.time()
                if not self.stopping:
                    self._queue_due(now)
                    self._dispatch()
                    self._queue_due_remote(now)
                    self._dispatch_remote()
                self._start_finishes()  # also when stopping: those wait for nothing else
                self._maybe_settle(now)
                busy = self.in_flight + self.r_in_flight + self.f_in_flight
                if self.stopping and busy == 0:
                    break
                if self.drain and busy == 0 and not self.ready and not self.rready \
                        and not self._due_soon(now):
                    todo = await loop.run_in_executor(None, self.queue.list_todo)
                    if not [mid for mid in todo if mid not in self.msgs]:
                        break
                    self.todo_wanted = True
                    continue
                timeout = min(IDLE_RESCAN, max(0.0, self._next_wakeup() - now))
                self._flush_log()
                if not self._poked:
                    # a bare future and a timer: cheaper than wait_for on an Event, which costs a
                    # task per pass (and there is a pass per delivery result)
                    waiter = self._waiter = loop.create_future()
                    timer = loop.call_later(timeout, _wake_up, waiter)
                    try:
                        await waiter
                    finally:
                        timer.cancel()
                        self._waiter = None
        finally:
            if trigger_fds:
                loop.remove_reader(trigger_fds[0])
            for fd in trigger_fds:
                os.close(fd)
            for t in list(self._tasks):
                await asyncio.gather(t, return_exceptions=True)
            await self.remote_engine.close()
            rest = [self.msgs[mid] for _, mid in self._unsettled if mid in self.msgs]
            if rest:
                self._mark_late(self._settled(rest, self.queue.settle(self._settle_entries(rest))))
            self._save_retry_times()
            self.pool.shutdown(wait=True)
        self.log("status: exiting")
        self._flush_log()

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

    def _reload_if_changed(self, now: float, force: bool = False) -> None:
        """Re-read control/ when a file changed (checked at most once a second, and before new
        messages are preprocessed): a domain that ``pqmail domain add`` just made virtual is routed
        as such without a SIGHUP."""
        if force and now - self._stamp_checked < 1.0:
            # Between full checks, one stat: provisioning replaces files by rename, which changes
            # the directory's mtime; an in-place edit is caught by the next full check.
            try:
                dir_mtime = os.stat(self.root.control).st_mtime_ns
            except OSError:
                return
            if dir_mtime == self._dir_mtime:
                return
        elif now - self._stamp_checked < 1.0:
            return
        self._stamp_checked = now
        try:
            self._dir_mtime = os.stat(self.root.control).st_mtime_ns
        except OSError:
            pass
        try:
            stamp = (control_stamp(self.root), _mtime(self.root.control_file("defaultdelivery")))
        except (ConfigError, OSError):
            return
        if stamp != self._stamp:
            self._stamp = stamp
            self._reload()

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
            if not m.in_flight:
                self._schedule(m, 0.0)
            if m.remote and not m.remote_in_flight:
                self._schedule_remote(m, 0.0)
        self.todo_wanted = True
        self._poke()

    def _flush_log(self) -> None:
        flush = getattr(self.log, "flush", None)
        if flush is not None:
            flush()

    def _poke(self) -> None:
        self._poked = True
        _wake_up(self._waiter)

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
        # Only these ids can have bounce/ or status/ files from an interrupted pass: a message's
        # own files go before its mess file frees the id, so a new message never finds any.
        self._leftovers = self.queue.list_leftovers()
        for mid in self.queue.list_info():
            if mid in unfinished:
                continue
            try:
                m = self.msgs[mid] = self._read_msg(mid)
                self._schedule(m, m.next_local)
                if m.remote:
                    self._schedule_remote(m, m.next_remote)
            except (OSError, PqmailError) as e:
                self.log(f"warning: msg {mid}: cannot read its queue files: {e}")

    def _read_msg(self, mid: int) -> _Msg:
        sender = self.queue.read_info(mid)
        birth = self.queue.birth(mid)
        m = _Msg(id=mid, sender=sender, birth=birth)
        m.local = [r for r in self.queue.read_channel(mid, "local") if not r.done]
        m.remote = [r for r in self.queue.read_channel(mid, "remote") if not r.done]
        if m.remote:
            m.next_remote = self.queue.channel_mtime(mid, "remote") or 0.0
        m.next_local = self.queue.channel_mtime(mid, "local") or 0.0
        if not m.local and not m.remote_pending:
            m.next_local = 0.0  # finished but not removed before a crash: finish it now
        return m

    async def _process_todo(self) -> None:
        """Preprocess new messages from todo/, at most PREPROCESS_WINDOW ahead of the deliveries.

        A backlog stays in todo/ (durable as it is) until its turn: preprocessing it all at once
        would only mean fsync'ing info/local files for messages that are delivered seconds later.
        """
        waiting = len(self.ready) + len(self.rready)
        room = PREPROCESS_WINDOW - waiting
        if room < PREPROCESS_WINDOW // 2 and waiting:
            self.todo_wanted = True  # look again once the ready list has drained
            return
        loop = asyncio.get_running_loop()
        # Reading todo/ writes nothing (no journal to wait for): a few messages are cheaper here
        # than two thread hand-offs; a backlog goes to a thread.
        ids = self.queue.list_todo()
        msgs = self.msgs
        if any(msgs[i].finishing for i in ids if i in msgs):
            # A message being removed freed its id (an inode) and a new message got it before
            # the old one left self.msgs: look at todo/ again once the removal is over.
            self._rescan_after_finish = True
        ids = [i for i in ids if i not in msgs]
        if len(ids) > room:
            ids = ids[:room]
            self.todo_wanted = True
        if ids:
            self._reload_if_changed(time.time(), force=True)
            if len(ids) <= INLINE_PREPROCESS:
                done = [self._preprocess(i) for i in ids]
            else:
                done = await loop.run_in_executor(None, lambda: [self._preprocess(i) for i in ids])
            now = time.time()
            for m in done:
                if m is not None:
                    self.msgs[m.id] = m
                    self._schedule(m, 0.0)
                    if m.remote:
                        self._schedule_remote(m, 0.0)
                    self._unsettled.append((now, m.id))

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
        size = self.queue.message_size(mid)
        if mid in self._leftovers:  # from an interrupted earlier pass: its recipients run again
            self._leftovers.discard(mid)
            self.queue.discard_bounce(mid)
            self.queue.discard_status(mid)
        self.log(f"info msg {mid}: bytes {size} from <{env.sender}> qp {env.pid} uid {env.uid}")
        records = {"local": channel_records(local), "remote": channel_records(remote)}
        return _Msg(id=mid, sender=env.sender, birth=time.time(), local=list(records["local"]),
                    remote=list(records["remote"]), settled=False, records=records,
                    files={"mess", "intd", "todo"})

    # ------------------------------------------------------------------ scheduling

    def _schedule(self, m: _Msg, when: float) -> None:
        m.next_local = when
        heapq.heappush(self._heap, (when, m.id))

    def _top(self) -> tuple[float, _Msg] | None:
        """The earliest valid heap entry, dropping stale ones (rescheduled, in flight or gone)."""
        heap = self._heap
        while heap:
            when, mid = heap[0]
            m = self.msgs.get(mid)
            if m is None or m.in_flight or m.next_local != when:
                heapq.heappop(heap)
                continue
            return when, m
        return None

    def _queue_due(self, now: float) -> None:
        while (top := self._top()) is not None and top[0] <= now:
            heapq.heappop(self._heap)
            m = top[1]
            if not m.local:
                if not m.remote_pending and not m.remote_in_flight and not m.settling:
                    m.next_local = float("inf")
                    m.in_flight = 1
                    m.finishing = True
                    self.f_in_flight += 1  # not a delivery: it must not hold a concurrencylocal slot
                    self._to_finish.append(m)
                else:
                    m.next_local = float("inf")  # waits for remote delivery
                continue
            m.attempt_started = now
            m.next_local = float("inf")
            for rec in m.local:
                self.ready.append((m, rec))
                m.in_flight += 1

    def _due_soon(self, now: float) -> bool:
        top, rtop = self._top(), self._rtop()
        return (top is not None and top[0] <= now) or (rtop is not None and rtop[0] <= now)

    def _next_wakeup(self) -> float:
        times = [t[0] for t in (self._top(), self._rtop()) if t is not None]
        return min(times) if times else time.time() + IDLE_RESCAN

    # ------------------------------------------------------------------ remote channel

    def _schedule_remote(self, m: _Msg, when: float) -> None:
        m.next_remote = when
        heapq.heappush(self._rheap, (when, m.id))

    def _rtop(self) -> tuple[float, _Msg] | None:
        heap = self._rheap
        while heap:
            when, mid = heap[0]
            m = self.msgs.get(mid)
            if m is None or m.remote_in_flight or m.next_remote != when or not m.remote:
                heapq.heappop(heap)
                continue
            return when, m
        return None

    def _queue_due_remote(self, now: float) -> None:
        """Group each due message's remote records by host and (VERP-expanded) sender."""
        while (top := self._rtop()) is not None and top[0] <= now:
            heapq.heappop(self._rheap)
            m = top[1]
            m.next_remote = float("inf")
            m.remote_started = now
            groups: dict[tuple[str, str], list] = {}
            for rec in m.remote:
                host = ascii_lower(routing.split_address(rec.address)[1])
                groups.setdefault((host, routing.verp_expand(m.sender, rec.address)), []).append(rec)
            for (host, sender), recs in groups.items():
                self.rready.append((m, host, sender, recs))
                m.remote_in_flight += 1

    def _dispatch_remote(self) -> None:
        limit = self.control.concurrencyremote
        while self.rready and self.r_in_flight < limit:
            m, host, sender, recs = self.rready.popleft()
            self.r_in_flight += 1
            self._spawn(self._deliver_remote(m, host, sender, recs))

    async def _deliver_remote(self, m: _Msg, host: str, sender: str, recs: list) -> None:
        try:
            await self._deliver_remote_group(m, host, sender, recs)
        except Exception as e:  # never let one delivery take the manager down
            self.log(f"alert: msg {m.id}: internal error delivering to {host}: {type(e).__name__}: {e}")
        finally:
            self.r_in_flight -= 1
            m.remote_in_flight -= 1
            if m.remote_in_flight == 0:
                m.remote = [r for r in m.remote if not r.done]
                if m.remote:
                    self._schedule_remote(m, schedule.next_retry(m.birth, m.remote_started, "remote"))
                    self._note_status(m)
                elif not m.local and not m.in_flight:
                    self._schedule(m, 0.0)  # everything done: finish it
            self._poke()

    async def _deliver_remote_group(self, m: _Msg, host: str, sender: str, recs: list) -> None:
        loop = asyncio.get_running_loop()
        ids = [next(self.delivery_ids) for _ in recs]
        for d, rec in zip(ids, recs, strict=True):
            self.log(f"starting delivery {d}: msg {m.id} to remote {rec.address}")
        results = await self.remote_engine.deliver(host, sender, [r.address for r in recs],
                                                   self.queue.message_path(m.id))
        last = schedule.expired(m.birth, m.remote_started, self.control.queuelifetime)
        for d, rec, res in zip(ids, recs, results, strict=True):
            status, report = res.status, res.report
            if status == "Z" and last:
                status, report = "D", f"{report}\n{bounce.TOO_LONG}"
            text = _oneline(report)
            if res.host_tried:
                text = f"{text} [{res.host_tried}]"
            if status == "K":
                if m.settled and not self._last_pending(m, rec):
                    await loop.run_in_executor(None, self.queue.mark_done, m.id, "remote", rec.offset)
                rec.done = True
                self.log(f"delivery {d}: success: {text}")
            elif status == "D":
                shown = routing.strip_vdom_prefix(self.control, rec.address)
                await loop.run_in_executor(None, self._record_failure, m.id, rec.offset,
                                           bounce.paragraph(shown, report), m.settled, "remote")
                m.files = None if m.files is None else m.files | {"bounce"}
                rec.done = True
                self.log(f"delivery {d}: failure: {text}")
            else:
                rec.last = text
                self.log(f"delivery {d}: deferral: {text}")

    def _maybe_settle(self, now: float) -> None:
        """Write the files of preprocessed messages still alive, then drop their todo/ names."""
        if self._settling or not self._unsettled:
            return
        # Only messages still alive SETTLE_AFTER seconds after preprocessing: most are finished
        # by then, and a finished message is removed whole, with nothing to write.
        limit = float("inf") if self.stopping else now - SETTLE_AFTER
        unsettled = self._unsettled
        msgs: list[_Msg] = []
        while unsettled and unsettled[0][0] <= limit:
            _, mid = unsettled.popleft()
            m = self.msgs.get(mid)
            # a finishing one is going whole: settling it would write its files after its removal,
            # and drop the todo/ entry of a new message that got its id (inode) meanwhile
            if m is not None and not m.finishing and not m.settled:
                msgs.append(m)
        if not msgs:
            return
        self._settling = True
        for m in msgs:
            m.settling = True

        async def settle() -> None:
            loop = asyncio.get_running_loop()
            try:
                written = await loop.run_in_executor(None, self.queue.settle, self._settle_entries(msgs))
                # Records done while the files were written are marked before the messages may
                # finish: once a message is removed, its id (an inode) can name a new message.
                late = self._settled(msgs, written)
                if late:
                    await loop.run_in_executor(None, self._mark_late, late)
            except OSError as e:
                self.log(f"warning: cannot settle {len(msgs)} preprocessed message(s): {e}; will retry")
                for m in msgs:
                    m.files = None  # written in part, perhaps
                self._unsettled.extendleft((0.0, m.id) for m in msgs if not m.settled)
            finally:
                self._settling = False
                for m in msgs:
                    m.settling = False
                    if not m.local and not m.remote and not m.in_flight and not m.remote_in_flight:
                        self._schedule(m, 0.0)  # finished while its files were written
                self._poke()

        self._spawn(settle())

    @staticmethod
    def _settle_entries(msgs: list[_Msg]) -> list:
        return [(m.id, m.sender, m.birth, m.records or {}) for m in msgs]

    @staticmethod
    def _settled(msgs: list[_Msg], written: dict[int, set[int]]) -> list[tuple[int, str, int]]:
        """Flag messages settled; return the records done while their files were being written."""
        late = []
        for m in msgs:
            m.settled = True
            channels = m.records or {}
            for channel, records in channels.items():
                late.extend((m.id, channel, r.offset) for r in records
                            if r.done and r.offset not in written.get(m.id, ()))
            if m.files is not None:
                m.files = {"mess", "info", *(c for c, recs in channels.items() if recs),
                           *(m.files & {"bounce", "status"})}
            m.records = None
        return late

    def _mark_late(self, late: list[tuple[int, str, int]]) -> None:
        for mid, channel, offset in late:
            try:
                self.queue.mark_done(mid, channel, offset)
            except FileNotFoundError:
                pass  # finished and removed meanwhile

    def _dispatch(self) -> None:
        limit = self.control.concurrencylocal
        # Finished messages do not hold delivery slots, but as many again waiting for their removal
        # stop new deliveries: a crash repeats the deliveries of messages not yet removed.
        while self.ready and self.in_flight < limit and self.f_in_flight < limit:
            m, rec = self.ready.popleft()
            self.in_flight += 1
            self._start_local(m, rec)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    def _start_local(self, m: _Msg, rec) -> None:
        """Hand one local delivery to the spawner; :meth:`_local_result` takes it from there.

        No task per delivery: the common outcome (delivered, nothing to write) is handled in the
        callback itself; only outcomes that need the disk go through a coroutine.
        """
        d = next(self.delivery_ids)
        self.log(f"starting delivery {d}: msg {m.id} to local {rec.address}")
        try:
            prepared = self._prepare_local(m, rec)
            if isinstance(prepared, LocalResult):
                asyncio.get_running_loop().call_soon(self._local_result, m, rec, d, prepared)
            else:
                job, fd = prepared
                self.spawner.submit(job, fd, lambda result: self._local_result(m, rec, d, result))
        except Exception as e:  # never let one delivery take the manager down
            self.log(f"alert: msg {m.id}: internal error delivering to {rec.address}: "
                     f"{type(e).__name__}: {e}")
            asyncio.get_running_loop().call_soon(self._local_done, m)  # not from inside _dispatch

    def _local_result(self, m: _Msg, rec, d: int, result: LocalResult) -> None:
        """A delivery's result: recorded in memory here, or on disk by :meth:`_record_local`."""
        try:
            last = schedule.expired(m.birth, m.attempt_started, self.control.queuelifetime)
            if result.status == "Z" and last:
                result = LocalResult(status="D", report=f"{result.report}\n{bounce.TOO_LONG}",
                                     forwards=[], new_sender="", forward_prefix=b"")
            if result.status == "Z":
                rec.last = text = _oneline(result.report)
                self.log(f"delivery {d}: deferral: {text}")
            elif result.status == "K" and not result.forwards \
                    and not (m.settled and not self._last_pending(m, rec)):
                # nothing to write: the message is removed next, or Queue.settle writes this record
                # as done; a crash before that repeats this delivery, as qmail-send would
                rec.done = True
                self.log(f"delivery {d}: success: {_oneline(result.report)}")
            else:
                self._spawn(self._record_local(m, rec, d, result))
                return
        except Exception as e:
            self.log(f"alert: msg {m.id}: internal error delivering to {rec.address}: "
                     f"{type(e).__name__}: {e}")
        self._local_done(m)

    def _local_done(self, m: _Msg) -> None:
        self.in_flight -= 1
        m.in_flight -= 1
        if m.in_flight == 0:
            m.local = [r for r in m.local if not r.done]
            if m.local:
                self._schedule(m, schedule.next_retry(m.birth, m.attempt_started, "local"))
                self._note_status(m)
            else:
                self._schedule(m, 0.0)
        if not self.stopping:
            self._dispatch()  # the freed slot's next job now, not after a pass of the loop
        self._poke()

    async def _record_local(self, m: _Msg, rec, d: int, result: LocalResult) -> None:
        """A success with forwards or a channel file to mark, or a failure: durably, then done."""
        try:
            loop = asyncio.get_running_loop()
            text = _oneline(result.report)
            if result.status == "K":
                if result.forwards:
                    fid = await loop.run_in_executor(None, lambda: self.queue.enqueue(
                        result.new_sender, result.forwards,
                        [result.forward_prefix, self.queue.message_path(m.id)],
                        invoked=f"by uid {self._uid_for(rec)}",
                    ))
                    text = f"{text}/forwarded as msg {fid}" if text else f"forwarded as msg {fid}"
                if m.settled and not self._last_pending(m, rec):
                    await loop.run_in_executor(None, self.queue.mark_done, m.id, "local", rec.offset)
                rec.done = True
                self.log(f"delivery {d}: success: {text}")
            else:
                shown = routing.strip_vdom_prefix(self.control, rec.address)
                await loop.run_in_executor(None, self._record_failure, m.id, rec.offset,
                                           bounce.paragraph(shown, result.report), m.settled)
                m.files = None if m.files is None else m.files | {"bounce"}
                rec.done = True
                self.log(f"delivery {d}: failure: {text}")
        except Exception as e:  # the record stays undone: it is tried again
            self.log(f"alert: msg {m.id}: internal error delivering to {rec.address}: "
                     f"{type(e).__name__}: {e}")
        finally:
            self._local_done(m)

    def _note_status(self, m: _Msg) -> None:
        """Tell ``pqmail queue`` when each waiting recipient is tried next and what it last got."""
        entries = [(r.address, when, getattr(r, "last", "") or "")
                   for recs, when in ((m.local, m.next_local), (m.remote, m.next_remote))
                   for r in recs if not r.done]
        if m.files is not None:
            m.files.add("status")

        async def write() -> None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.queue.write_status,
                                                                 m.id, entries)
            except OSError as e:
                self.log(f"warning: msg {m.id}: cannot write its status: {e}")

        self._spawn(write())

    def _record_failure(self, mid: int, offset: int, paragraph: bytes, settled: bool,
                        channel: str = "local") -> None:
        self.queue.append_bounce(mid, paragraph)
        if settled:  # else Queue.settle writes the record as done (or todo/ starts it over)
            self.queue.mark_done(mid, channel, offset)

    @staticmethod
    def _last_pending(m: _Msg, rec) -> bool:
        """True when ``rec`` is the message's only undone recipient (then mark_done is redundant)."""
        return all(r.done or r is rec for r in m.local) and all(r.done or r is rec for r in m.remote)

    def _uid_for(self, rec) -> int:
        return getattr(rec, "uid", os.getuid())

    def _prepare_local(self, m: _Msg, rec) -> LocalResult | tuple[LocalJob, int]:
        """The job and an open descriptor of the message, or the result when there is no job."""
        local, _ = split_address(rec.address)  # rec.address was rewritten at preprocessing
        if not local:
            return LocalResult("K", "Trash address: nothing delivered.", [], "", b"")
        entry = self.users.lookup(local)  # the dot-qmail search itself is the delivery's job
        if entry is None:
            entry = _getpw(local)
            if isinstance(entry, str):
                return LocalResult("Z", entry, [], "", b"")
        rec.uid = entry.uid
        path = self.queue.message_name(m.id)
        job = LocalJob(
            message_path=path, sender=routing.verp_expand(m.sender, rec.address),
            recipient=rec.address, entry=entry, default_delivery=self.default_delivery,
        )
        try:
            return job, os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            return LocalResult("Z", f"Unable to open the queued message: {e.strerror}. (#4.3.0)",
                               [], "", b"")

    # ------------------------------------------------------------------ finishing

    def _start_finishes(self) -> None:
        if self._to_finish:
            batch, self._to_finish = self._to_finish, []
            self._spawn(self._finish(batch))

    async def _finish(self, batch: list[_Msg]) -> None:
        """Bounce (if any) and remove finished messages: one thread hand-off for the whole batch."""
        loop = asyncio.get_running_loop()
        # unlinks wait for the journal while deliveries fsync: never on the loop's thread
        outcomes = await loop.run_in_executor(None, self._finish_many, batch)
        for m, error in zip(batch, outcomes, strict=True):
            if error is None:
                self.msgs.pop(m.id, None)
            else:
                self.log(f"warning: msg {m.id}: cannot finish yet ({error}); will retry")
            m.in_flight = 0
            m.finishing = False
            self.f_in_flight -= 1
            if error is not None:
                self._schedule(m, time.time() + 60)
        if self._rescan_after_finish:
            self._rescan_after_finish = False
            self.todo_wanted = True
        self._poke()

    def _finish_many(self, batch: list[_Msg]) -> list[Exception | None]:
        out: list[Exception | None] = []
        for m in batch:
            try:
                self._finish_blocking(m)
                out.append(None)
            except (OSError, PqmailError) as e:
                out.append(e)
        return out

    def _finish_blocking(self, m: _Msg) -> None:
        paragraphs = self.queue.read_bounce(m.id) if m.files is None or "bounce" in m.files else b""
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
        self.queue.remove_message(m.id, m.files)
        self.log(f"end msg {m.id}")

    def _save_retry_times(self) -> None:
        for m in self.msgs.values():
            if m.local and m.next_local not in (0.0, float("inf")):
                self.queue.set_channel_mtime(m.id, "local", m.next_local)
            if m.remote and m.next_remote not in (0.0, float("inf")):
                self.queue.set_channel_mtime(m.id, "remote", m.next_remote)


def _wake_up(waiter: asyncio.Future | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


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


def _mtime(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def _read_default_delivery(root: Root) -> str:
    """``control/defaultdelivery`` (as netqmail sites keep it), else ``./Maildir/``."""
    path = root.control_file("defaultdelivery")
    try:
        text = path.read_bytes().decode("latin-1")
    except FileNotFoundError:
        return "./Maildir/\n"
    except OSError as e:
        raise ConfigError(str(path), e.strerror or str(e)) from None
    text = text.split("\0", 1)[0]  # qmail passes it as a C string: a NUL ends it
    return text if text.endswith("\n") else text + "\n"


class _BufferedLog:
    """Log lines gathered and written to stderr once per pass of the manager's loop.

    One write per pass instead of four per message; lines from other threads are appended safely
    (list.append is atomic) and go out with the next flush.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if len(self.lines) >= 256:
            self.flush()

    def flush(self) -> None:
        lines, self.lines = self.lines, []
        if lines:
            data = ("\n".join(lines) + "\n").encode("utf-8", "replace")
            try:
                while data:
                    data = data[os.write(2, data):]
            except OSError:
                pass  # a log that cannot be written must not stop deliveries


def run_send(root: Root, drain: bool) -> int:
    return Manager(root, drain=drain).run()


__all__ = ["Manager", "Path", "run_send"]
