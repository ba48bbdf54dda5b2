"""Local delivery as the right user: qmail-lspawn's job.

When ``pqmail send`` runs as root, every local delivery must run with the uid/gid that users/assign
names, never as root. Exec'ing a fresh interpreter as that user is not an option (the interpreter
and the package may sit in directories only root can read), so this module follows qmail-lspawn:

* ``Spawner.start()`` forks a **zygote** before the queue manager starts any thread. The zygote is
  single-threaded and stays root; its only job is to fork one long-lived **worker** per (uid, gid).
* A worker drops privileges (setgroups([]), setgid, setuid — in that order), then serves delivery
  jobs over a SOCK_SEQPACKET socket: a JSON job plus the queued message's file descriptor (passed
  with SCM_RIGHTS, so the worker never needs to read the queue directory), and answers a JSON result.
  It runs jobs in a thread pool, so one worker serves thousands of virtual boxes concurrently.
* A worker that dies takes only its jobs in flight with it: they come back as temporary failures
  and the manager retries them; the next job starts a new worker.

It never delivers as uid 0 (qmail-lspawn refuses too), and it trusts nothing a worker sends back
beyond the result fields.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import signal
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pqmail.config.assign import AssignEntry
from pqmail.local.deliver import LocalJob, LocalResult, deliver_local

_MAX_FRAME = 1 << 20


def _job_to_wire(job_id: int, job: LocalJob) -> bytes:
    e = job.entry
    return json.dumps({
        "id": job_id, "sender": job.sender, "recipient": job.recipient,
        "entry": [e.user, e.uid, e.gid, e.home, e.dash, e.ext],
        "default_delivery": job.default_delivery,
    }, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _result_to_wire(job_id: int, r: LocalResult) -> bytes:
    return json.dumps({
        "id": job_id, "status": r.status, "report": r.report, "forwards": r.forwards,
        "new_sender": r.new_sender, "forward_prefix": base64.b64encode(r.forward_prefix).decode(),
    }, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _result_from_wire(d: dict) -> LocalResult:
    return LocalResult(
        status=str(d["status"]) if d.get("status") in ("K", "Z", "D") else "Z",
        report=str(d.get("report", "")),
        forwards=[str(a) for a in d.get("forwards", [])],
        new_sender=str(d.get("new_sender", "")),
        forward_prefix=base64.b64decode(d.get("forward_prefix", "")),
    )


def _temporary(text: str) -> LocalResult:
    return LocalResult(status="Z", report=text, forwards=[], new_sender="", forward_prefix=b"")


# ---------------------------------------------------------------- worker (runs as the target user)

def _worker_main(sock: socket.socket, threads: int) -> None:
    """Serve jobs until the manager closes the socket. Runs after privileges were dropped."""
    lock = threading.Lock()
    pool = ThreadPoolExecutor(max_workers=threads)

    def run(d: dict, fd: int) -> None:
        try:
            user, uid, gid, home, dash, ext = d["entry"]
            job = LocalJob(
                message_path=Path(f"/proc/self/fd/{fd}"), sender=d["sender"], recipient=d["recipient"],
                entry=AssignEntry(user, int(uid), int(gid), home, dash, ext),
                default_delivery=d["default_delivery"],
            )
            result = deliver_local(job)
        except Exception as e:  # a bug must come back as a deferral, never kill the worker
            result = _temporary(f"Unable to deliver: internal error {type(e).__name__}: {e}. (#4.3.0)")
        finally:
            os.close(fd)
        data = _result_to_wire(d["id"], result)
        with lock:
            sock.send(data)

    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_FRAME, 1)
        except OSError:
            break
        if not data:
            break
        if not fds:
            continue
        pool.submit(run, json.loads(data.decode("utf-8", "surrogatepass")), fds[0])
    pool.shutdown(wait=True)


def _zygote_main(ctl: socket.socket, threads: int) -> None:
    """Fork a worker per request ``{"uid":…, "gid":…}`` + the worker's socket; answer its pid."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped automatically
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            data, fds, _f, _a = socket.recv_fds(ctl, 4096, 1)
        except OSError:
            os._exit(0)
        if not data:
            os._exit(0)
        req = json.loads(data)
        uid, gid = int(req["uid"]), int(req["gid"])
        child_sock = socket.socket(fileno=fds[0])
        if uid == 0:
            ctl.send(json.dumps({"error": "not allowed as root"}).encode())
            child_sock.close()
            continue
        pid = os.fork()
        if pid == 0:
            try:
                ctl.close()
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                if os.getuid() == 0 or os.geteuid() == 0:
                    os._exit(1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _worker_main(child_sock, threads)
            finally:
                os._exit(0)
        child_sock.close()
        ctl.send(json.dumps({"pid": pid}).encode())


# ---------------------------------------------------------------- manager side

@dataclass
class _Worker:
    sock: socket.socket
    pid: int
    loop: asyncio.AbstractEventLoop  # reads the results; pending futures belong to it
    pending: dict[int, asyncio.Future]
    alive: bool = True


class Spawner:
    """Runs local deliveries with the right privileges; ``deliver`` is thread-safe and blocking.

    As root, jobs go to per-uid workers forked by the zygote. Not as root, a job for our own uid runs
    in the calling thread, and a job for any other uid is deferred with a clear report.
    """

    def __init__(self, threads_per_worker: int = 20, log: Callable[[str], None] | None = None,
                 workers_per_uid: int = 1) -> None:
        # Several processes per uid spread deliveries over the cores: one interpreter's threads
        # would share one GIL (and spend their time handing it over).
        self.procs = max(1, workers_per_uid)
        self.threads = max(1, -(-threads_per_worker // self.procs))
        self._rr = itertools.count()
        self.log = log or (lambda s: None)
        self.privileged = os.geteuid() == 0
        self._ctl: socket.socket | None = None
        self._ctl_lock = threading.Lock()
        self._workers: dict[tuple[int, int, int], _Worker] = {}
        self._workers_lock = threading.Lock()
        self._ids = iter(range(1, 1 << 62))
        self._zygote_pid = 0

    def start(self) -> None:
        """Fork the zygote (root only). Call before the process starts any thread."""
        if not self.privileged:
            return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            parent.close()
            try:
                _zygote_main(child, self.threads)
            finally:
                os._exit(0)
        child.close()
        self._ctl = parent
        self._zygote_pid = pid

    def close(self) -> None:
        with self._workers_lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for w in workers:
            try:
                w.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self._zygote_pid:
            try:
                os.waitpid(self._zygote_pid, 0)
            except ChildProcessError:
                pass
            self._zygote_pid = 0

    def deliver(self, job: LocalJob, message_fd: int) -> LocalResult:
        """Deliver in this process (not root): blocking, for a thread. Another uid is deferred."""
        uid = job.entry.uid
        if uid == 0:
            return _temporary("Unable to deliver as root: users/assign names uid 0. (#4.3.0)")
        if uid != os.getuid():
            return _temporary(
                f"Unable to switch to uid {uid}: pqmail send is not running as root. (#4.3.0)")
        return deliver_local(LocalJob(
            message_path=Path(f"/proc/self/fd/{message_fd}"), sender=job.sender,
            recipient=job.recipient, entry=job.entry, default_delivery=job.default_delivery))

    async def deliver_async(self, job: LocalJob, message_fd: int) -> LocalResult:
        """:meth:`deliver` for an event loop: no thread waits while a worker delivers.

        As root the job goes to the uid's worker and the result is read by the loop itself;
        not as root the delivery runs in the loop's default executor (it blocks on fsync).
        """
        loop = asyncio.get_running_loop()
        uid, gid = job.entry.uid, job.entry.gid
        if not self.privileged or uid == 0:
            return await loop.run_in_executor(None, self.deliver, job, message_fd)
        try:
            worker = self._worker(uid, gid, loop)
        except OSError as e:
            return _temporary(f"Unable to start a delivery process for uid {uid}: {e}. (#4.3.0)")
        job_id = next(self._ids)
        fut: asyncio.Future = loop.create_future()
        if not worker.alive:
            return _temporary(f"Delivery process for uid {uid} is gone; will retry. (#4.3.0)")
        worker.pending[job_id] = fut
        try:
            socket.send_fds(worker.sock, [_job_to_wire(job_id, job)], [message_fd])
        except OSError as e:
            worker.pending.pop(job_id, None)
            self._drop(worker)
            return _temporary(f"Delivery process for uid {uid} is gone: {e}. (#4.3.0)")
        return await fut

    def _on_readable(self, w: _Worker) -> None:
        try:
            data = w.sock.recv(_MAX_FRAME)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(w)  # removes the reader too
            return
        try:
            d = json.loads(data.decode("utf-8", "surrogatepass"))
            fut = w.pending.pop(int(d["id"]))
        except (ValueError, KeyError, TypeError):
            return
        if not fut.done():
            fut.set_result(_result_from_wire(d))

    def _worker(self, uid: int, gid: int, loop: asyncio.AbstractEventLoop) -> _Worker:
        key = (uid, gid, next(self._rr) % self.procs)
        with self._workers_lock:
            w = self._workers.get(key)
            if w is not None and w.alive:
                return w
            if self._ctl is None:
                raise OSError("delivery spawner not started")
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with self._ctl_lock:
                socket.send_fds(self._ctl, [json.dumps({"uid": uid, "gid": gid}).encode()],
                                [theirs.fileno()])
                answer = json.loads(self._ctl.recv(4096) or b'{"error": "zygote gone"}')
            theirs.close()
            if "error" in answer:
                mine.close()
                raise OSError(answer["error"])
            w = _Worker(sock=mine, pid=int(answer["pid"]), loop=loop, pending={})
            self._workers[key] = w
            self.log(f"status: delivery process {w.pid} started for uid {uid} gid {gid}")
        loop.add_reader(mine.fileno(), self._on_readable, w)
        return w

    def _drop(self, w: _Worker) -> None:
        w.alive = False
        with self._workers_lock:
            for key, other in list(self._workers.items()):
                if other is w:
                    del self._workers[key]
        for fut in list(w.pending.values()):
            if not fut.done():
                fut.set_result(_temporary("Delivery process died; will retry. (#4.3.0)"))
        w.pending.clear()
        try:
            w.loop.remove_reader(w.sock.fileno())
        except (ValueError, OSError, RuntimeError):
            pass
        try:
            w.sock.close()
        except OSError:
            pass
