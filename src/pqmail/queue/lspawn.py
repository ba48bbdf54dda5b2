"""Local delivery as the right user: qmail-lspawn's job.

When ``pqmail send`` runs as root, every local delivery must run with the uid/gid that users/assign
names, never as root. Exec'ing a fresh interpreter as that user is not an option (the interpreter
and the package may sit in directories only root can read), so this module follows qmail-lspawn:

* ``Spawner.start()`` forks a **zygote** before the queue manager starts any thread. The zygote is
  single-threaded and stays root; its only job is to fork one long-lived **worker** per (uid, gid).
* A worker drops privileges (setgroups([]), setgid, setuid — in that order), then serves delivery
  jobs over a SOCK_SEQPACKET socket: a job frame plus the queued message's file descriptor (passed
  with SCM_RIGHTS, so the worker never needs to read the queue directory), and answers a result
  frame. A worker is single-threaded (a delivery is mostly file creation and fsync: threads in one
  interpreter would spend their time handing the GIL over). It takes every job waiting on its
  socket at once and delivers them one after the other with one group commit of their Maildir
  files (two syncs for the group instead of two fsyncs per message); a lone job is synced alone.
* A uid gets up to ``procs_per_uid`` workers, started as the load needs them, so one uid's
  thousands of virtual boxes are served concurrently. Under load the manager gives a busy worker
  up to ``_SHARE`` jobs before it starts another, so that jobs wait together and share a commit;
  a worker that has not answered for ``_STALLED`` seconds (a slow program) gets no more.
* A worker that dies takes only its jobs in flight with it: they come back as temporary failures
  and the manager retries them; the next job starts a new worker.

It never delivers as uid 0 (qmail-lspawn refuses too), and it trusts nothing a worker sends back
beyond the result fields.
"""

from __future__ import annotations

import array
import asyncio
import itertools
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pqmail import maildir
from pqmail.config.assign import AssignEntry
from pqmail.local.deliver import LocalJob, LocalResult, deliver_local

_MAX_FRAME = 1 << 20
_GROUP_MAX = 32  # jobs a worker takes together (one group commit)
_FDS_SPACE = socket.CMSG_SPACE(_GROUP_MAX * array.array("i").itemsize)
_SHARE = 4  # jobs the manager gives one worker before it starts another
_STALLED = 1.0  # seconds without an answer after which a busy worker gets no more jobs


# The frames between the manager and a worker: fields joined by NUL, text as UTF-8 with lone
# surrogates kept (8-bit addresses). Addresses and users/assign fields never hold a NUL (the queue's
# own records are NUL-terminated), so a field with one is refused; a result's report, which holds
# whatever a program printed, is its last field and may hold anything.
_ENC = ("utf-8", "surrogatepass")
_JOB_FIELDS = 10


def _joined(fields: list[str], what: str) -> bytes:
    text = "\0".join(fields)
    if text.count("\0") != len(fields) - 1:
        raise ValueError(f"NUL byte in a {what} field")
    return text.encode(*_ENC)


def _job_to_wire(job_id: int, job: LocalJob) -> bytes:
    e = job.entry
    return _joined([str(job_id), job.sender, job.recipient, e.user, str(e.uid), str(e.gid), e.home,
                    e.dash, e.ext, job.default_delivery], "job")


def _job_from_wire(data: bytes, message_path: str) -> tuple[int, LocalJob]:
    parts = data.decode(*_ENC).split("\0")
    if len(parts) != _JOB_FIELDS:
        raise ValueError(f"a job has {len(parts)} fields, not {_JOB_FIELDS}")
    job_id, sender, recipient, user, uid, gid, home, dash, ext, default = parts
    return int(job_id), LocalJob(
        message_path=message_path, sender=sender, recipient=recipient,
        entry=AssignEntry(user, int(uid), int(gid), home, dash, ext), default_delivery=default,
    )


def _result_to_wire(job_id: int, r: LocalResult) -> bytes:
    head = _joined([str(job_id), r.status, r.new_sender], "result")
    tail = [_joined(r.forwards, "forward")] if r.forwards else []
    return b"\0".join([head, r.forward_prefix.replace(b"\0", b""), b"%d" % len(r.forwards), *tail,
                       _report_bytes(r.report)])


def _report_bytes(report: str) -> bytes:
    try:
        return report.encode("utf-8", "surrogateescape")  # what the program printed, byte for byte
    except UnicodeEncodeError:
        return report.encode("utf-8", "replace")


def _result_from_wire(data: bytes) -> tuple[int, LocalResult]:
    """(job id, result); ValueError when the frame is not one (a worker is not trusted)."""
    job_id, status, new_sender, prefix, count, rest = data.split(b"\0", 5)
    n = int(count)
    if not 0 <= n < 100000:
        raise ValueError(f"{n} forwards")
    *forwards, report = rest.split(b"\0", n)
    if len(forwards) != n:
        raise ValueError("fewer forwards than announced")
    return int(job_id), LocalResult(
        status=status.decode("ascii") if status in (b"K", b"Z", b"D") else "Z",
        report=report.decode("utf-8", "surrogateescape"),  # any bytes: it is what was printed
        forwards=[a.decode(*_ENC) for a in forwards],
        new_sender=new_sender.decode(*_ENC),
        forward_prefix=prefix,
    )


def _temporary(text: str) -> LocalResult:
    return LocalResult(status="Z", report=text, forwards=[], new_sender="", forward_prefix=b"")


# ---------------------------------------------------------------- worker (runs as the target user)

def _worker_main(sock: socket.socket) -> None:
    """Serve jobs until the manager closes the socket. Runs after privileges were dropped.

    Jobs that arrived together are one group: delivered one after the other, their Maildir files
    made durable together (see :class:`maildir.SyncGroup`), then answered. A lone job is delivered
    and synced on its own, as before, so that light traffic pays no group's price.
    """
    while True:
        batch = _receive_jobs(sock)
        if batch is None:
            break
        group = maildir.SyncGroup() if len(batch) > 1 else None
        results = [_run_job(data, fd, group) for data, fd in batch]
        if group is not None:
            group.commit()
            results = [(job_id, _unless_failed(result, group.failed.get(job_id)))
                       for job_id, result in results]
        try:
            for job_id, result in results:
                sock.send(_result_to_wire(job_id, result))
        except OSError:
            break


def _receive_jobs(sock: socket.socket) -> list[tuple[bytes, int]] | None:
    """The next job (waiting for it) and every other one already there, up to _GROUP_MAX; None at EOF."""
    batch: list[tuple[bytes, int]] = []
    flags = 0
    while len(batch) < _GROUP_MAX:
        try:
            data, fds = _recv_frame(sock, flags)
        except BlockingIOError:
            break
        except OSError:
            return batch or None
        if not data:
            return batch or None  # the manager is gone: finish what was taken
        try:
            batch.extend(_split_frame(data, fds))
        except ValueError:  # not from our manager's code: stop; its jobs come back as deferrals
            for fd in fds + [fd for _data, fd in batch]:
                os.close(fd)
            return None
        flags = socket.MSG_DONTWAIT
    return batch


def _frame(jobs: list[bytes]) -> bytes:
    """Several jobs in one frame (their descriptors go with it, in the same order)."""
    return b"%d\0" % len(jobs) + b"\0".join(jobs)


def _split_frame(data: bytes, fds: list[int]) -> list[tuple[bytes, int]]:
    head, _, rest = data.partition(b"\0")
    n = int(head)
    parts = rest.split(b"\0")  # UTF-8 has no NUL byte but NUL itself
    if n != len(fds) or len(parts) != n * _JOB_FIELDS:
        raise ValueError(f"a frame of {n} jobs has {len(parts)} fields and {len(fds)} descriptors")
    f = _JOB_FIELDS
    return [(b"\0".join(parts[i * f:(i + 1) * f]), fds[i]) for i in range(n)]


def _recv_frame(sock: socket.socket, flags: int) -> tuple[bytes, list[int]]:
    # socket.recv_fds, but with the flags passed on (Python 3.11's drops them)
    data, ancdata, _flags, _addr = sock.recvmsg(_MAX_FRAME, _FDS_SPACE, flags)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[:len(payload) - len(payload) % 4]))
    return data, fds


def _run_job(data: bytes, fd: int, group: maildir.SyncGroup | None) -> tuple[int, LocalResult]:
    job_id = 0
    try:
        job_id, job = _job_from_wire(data, f"/proc/self/fd/{fd}")
        result = deliver_local(job, group, job_id)
    except Exception as e:  # a bug must come back as a deferral, never kill the worker
        result = _temporary(f"Unable to deliver: internal error {type(e).__name__}: {e}. (#4.3.0)")
    finally:
        os.close(fd)
    return job_id, result


def _unless_failed(result: LocalResult, failure: Exception | None) -> LocalResult:
    """A delivery whose Maildir file could not be made durable is deferred (forwards cancelled)."""
    if failure is None or result.status != "K":
        return result
    return _temporary(str(failure))


def _zygote_main(ctl: socket.socket) -> None:
    """Fork a worker per request ``{"uid":…, "gid":…}`` + the worker's socket; answer its pid."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped automatically
    # What the workers need is loaded here, as root: the interpreter's own library may be readable
    # by root alone, and a worker cannot import anything once it runs as the user.
    maildir.group_commit_available()
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
                _worker_main(child_sock)
            finally:
                os._exit(0)
        child_sock.close()
        ctl.send(json.dumps({"pid": pid}).encode())


# ---------------------------------------------------------------- manager side

@dataclass(eq=False)
class _Worker:
    sock: socket.socket
    pid: int
    key: tuple[int, int]
    loop: asyncio.AbstractEventLoop  # reads the results; the callbacks run on it
    pending: dict[int, Callable[[LocalResult], None]]
    alive: bool = True
    last_done: int = 0  # when it last answered (a counter): the most recent idle one gets the job
    last_seen: float = 0.0  # monotonic time of its last answer, or of its first job since idle
    outbox: list[tuple[bytes, int]] = field(default_factory=list)  # jobs to send: (frame, message fd)


class Spawner:
    """Runs local deliveries with the right privileges, for one event loop.

    As root, jobs go to per-uid workers forked by the zygote. Not as root, a job for our own uid runs
    in the loop's default executor, and a job for any other uid is deferred with a clear report.
    """

    def __init__(self, procs_per_uid: int = 4, log: Callable[[str], None] | None = None) -> None:
        self.procs = max(1, procs_per_uid)
        self.log = log or (lambda s: None)
        self.privileged = os.geteuid() == 0
        self._ctl: socket.socket | None = None
        self._workers: dict[tuple[int, int], list[_Worker]] = {}
        self._ids = itertools.count(1)
        self._zygote_pid = 0
        self._to_send: list[_Worker] = []  # workers with jobs in their outbox

    def start(self) -> None:
        """Fork the zygote (root only). Call before the process starts any thread."""
        if not self.privileged:
            return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            parent.close()
            try:
                _zygote_main(child)
            finally:
                os._exit(0)
        child.close()
        self._ctl = parent
        self._zygote_pid = pid

    def close(self) -> None:
        for w in self._to_send:  # jobs never sent: their descriptors go
            for _wire, fd in w.outbox:
                os.close(fd)
            w.outbox = []
        self._to_send = []
        workers = [w for ws in self._workers.values() for w in ws]
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

    def submit(self, job: LocalJob, message_fd: int, done: Callable[[LocalResult], None]) -> None:
        """Start one delivery; ``done(result)`` runs later on the running loop, exactly once.

        Takes ownership of ``message_fd``. As root the job goes to one of the uid's workers and the
        result is read by the loop itself (no thread waits); not as root the delivery runs in the
        loop's default executor (it blocks on fsync).
        """
        loop = asyncio.get_running_loop()
        uid, gid = job.entry.uid, job.entry.gid
        if not self.privileged or uid == 0:
            fut = loop.run_in_executor(None, self._deliver_closing, job, message_fd)
            fut.add_done_callback(lambda f: done(_outcome(f)))
            return
        try:
            worker = self._worker(uid, gid, loop)
            job_id = next(self._ids)
            wire = _job_to_wire(job_id, job)  # may refuse a field: before the worker looks busy
        except OSError as e:
            os.close(message_fd)
            loop.call_soon(done, _temporary(
                f"Unable to start a delivery process for uid {uid}: {e}. (#4.3.0)"))
            return
        except BaseException:
            os.close(message_fd)
            raise
        if not worker.pending:
            worker.last_seen = time.monotonic()  # busy from now: stalled counts from here
        worker.pending[job_id] = done
        # Sent once the caller's pass is over, with the other jobs for the same worker in one
        # frame: the worker then sees them together and makes them one group commit.
        if not worker.outbox:
            self._to_send.append(worker)
            if len(self._to_send) == 1:
                loop.call_soon(self._send_outboxes)
        worker.outbox.append((wire, message_fd))

    def _send_outboxes(self) -> None:
        workers, self._to_send = self._to_send, []
        for w in workers:
            box, w.outbox = w.outbox, []
            try:
                for i in range(0, len(box) if w.alive else 0, _GROUP_MAX):
                    part = box[i:i + _GROUP_MAX]
                    socket.send_fds(w.sock, [_frame([wire for wire, _fd in part])],
                                    [fd for _wire, fd in part])
            except OSError as e:
                self.log(f"warning: delivery process {w.pid} is gone: {e}")
                self._drop(w)  # its jobs come back as deferrals
            finally:
                for _wire, fd in box:
                    os.close(fd)  # the worker holds its own reference now

    def _deliver_closing(self, job: LocalJob, message_fd: int) -> LocalResult:
        try:
            return self.deliver(job, message_fd)
        finally:
            os.close(message_fd)

    def _on_readable(self, w: _Worker) -> None:
        while w.alive:  # every result that arrived, in one wake-up
            try:
                data = w.sock.recv(_MAX_FRAME, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._drop(w)  # removes the reader too
                return
            try:
                job_id, result = _result_from_wire(data)
                done = w.pending.pop(job_id)
            except (ValueError, KeyError, UnicodeDecodeError) as e:
                # its state is unknown: waiting for the job's real answer could last forever
                self.log(f"warning: delivery process {w.pid} sent an unreadable result ({e}): "
                         "stopping it; its jobs will be retried")
                self._drop(w)
                return
            w.last_done = next(self._ids)
            w.last_seen = time.monotonic()
            done(result)

    def _worker(self, uid: int, gid: int, loop: asyncio.AbstractEventLoop) -> _Worker:
        """An idle worker of the uid; a new one while all are busy and fewer than ``procs`` run."""
        key = (uid, gid)
        workers = self._workers.setdefault(key, [])
        # The fullest worker with room, else the idle one that finished last: when mail trickles
        # in, one process (warm caches) does the work; under load, jobs join a busy worker's next
        # group rather than each taking a process and two fsyncs of its own. A worker that has
        # said nothing for a while (a slow program) gets no more: little waits behind it.
        now = time.monotonic()
        room = [w for w in workers if len(w.pending) < _SHARE
                and (not w.pending or now - w.last_seen < _STALLED)]
        if room:
            return max(room, key=lambda w: (len(w.pending), w.last_done))
        if len(workers) >= self.procs:
            return min(workers, key=lambda w: len(w.pending))
        if self._ctl is None:
            raise OSError("delivery spawner not started")
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            socket.send_fds(self._ctl, [json.dumps({"uid": uid, "gid": gid}).encode()], [theirs.fileno()])
            answer = json.loads(self._ctl.recv(4096) or b'{"error": "zygote gone"}')
        except OSError:
            mine.close()
            raise
        finally:
            theirs.close()
        if "error" in answer:
            mine.close()
            raise OSError(answer["error"])
        w = _Worker(sock=mine, pid=int(answer["pid"]), key=key, loop=loop, pending={})
        workers.append(w)
        self.log(f"status: delivery process {w.pid} started for uid {uid} gid {gid}")
        loop.add_reader(mine.fileno(), self._on_readable, w)
        return w

    def _drop(self, w: _Worker) -> None:
        """Forget a worker that died or misbehaved; its jobs in flight come back as deferrals."""
        w.alive = False
        workers = self._workers.get(w.key)
        if workers is not None:
            workers[:] = [x for x in workers if x is not w]
        pending, w.pending = list(w.pending.values()), {}
        try:
            w.loop.remove_reader(w.sock.fileno())
        except (ValueError, OSError, RuntimeError):
            pass
        try:
            w.sock.close()
        except OSError:
            pass
        for done in pending:
            w.loop.call_soon(done, _temporary("Delivery process died; will retry. (#4.3.0)"))


def _outcome(fut: asyncio.Future) -> LocalResult:
    if fut.cancelled():
        return _temporary("Delivery was cancelled; will retry. (#4.3.0)")
    e = fut.exception()
    if e is not None:
        return _temporary(f"Unable to deliver: internal error {type(e).__name__}: {e}. (#4.3.0)")
    return fut.result()
