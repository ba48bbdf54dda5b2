"""Benchmark: SMTP into ``pqmail serve`` on loopback, then end to end into 1,000 Maildirs, fsync on.

Set-up (not timed): a fresh root under --dir made with ``pqmail init`` and ``pqmail domain add``,
1,000 ``.qmail-uN`` files pointing at Maildirs owned by the mail owner (``nobody`` as root).
For each concurrency level a fresh ``pqmail serve`` (SMTP on a free loopback port, --workers
smtpd processes, the queue manager) is started, and the client sends --messages messages of
--size body bytes with that many concurrent sessions, one connection per message like Postfix's
smtp-source (HELO, MAIL, RCPT, DATA, QUIT; no pipelining), recipients round-robin over the boxes.

Measured, from the first connection: *accepted* until the last ``250`` after DATA, *delivered*
until every message is in its Maildir's new/ (polled every 20 ms once sending is over), and the
peak memory of serve and all its descendants (sum of PSS from /proc/PID/smaps_rollup, sampled
every 0.25 s), plus the CPU the server tree and the client used per message. The client shares
the machine's cores with the server: its CPU is part of the result.

Each level runs in a new tree of its own under --dir (marked ``chattr +T`` where possible, so
that ext4 spreads the trees over block groups), and trees of earlier runs are deleted only once
everything is measured: deleting them first would make this run pay for the deletion (see below).

The file system under --dir is part of what is measured. On ext4 without a journal (the root file
system of the 2-core reference VM) every new inode costs a scan of the inodes freed there in the last
minute or so (ext4's ``recently_deleted`` check, done only when there is no journal): the queue
files the manager has just removed make each new message file slower, and this kernel time counts
as the smtpd's. ``perf record -g -p <smtpd pid>`` shows it under ``find_inode_bit``.

Drivers: ``python`` (default), an asyncio Protocol client in this file; ``smtp-source``, Postfix's
C generator (Debian package postfix), cheaper per message: S sessions become lanes of
``smtp-source -N -t @bench.test`` over ``.qmail-1`` .. ``.qmail-K`` (aliases of the same boxes).

Usage: python bench/smtp.py [--messages 5000] [--sessions 1,20,100] [--workers 2] [--boxes 1000]
       [--size 4096] [--driver python|smtp-source] [--dir /tmp/pqbench-smtp] [--keep]
Last line: ``smtp: 1 sessions: accepted X msgs/s, delivered Y msgs/s end to end; 20 sessions: ...;
peak PSS Z MB``
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PQMAIL = [sys.executable, "-m", "pqmail.cli.main"]
DOMAIN = "bench.test"
SENDER = b"bench@sender.test"
POLL = 0.02
HZ = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ set-up

def sh(*args: str) -> None:
    subprocess.run([*PQMAIL, *args], check=True, stdout=subprocess.DEVNULL)


def setup(top: Path, boxes: int, numbered: bool) -> tuple[Path, list[Path]]:
    """A fresh root with ``boxes`` Maildirs reached as uN@bench.test (and N+1@ when ``numbered``)."""
    from pqmail.maildir import maildirmake

    shutil.rmtree(top, ignore_errors=True)
    top.mkdir(parents=True)
    top.chmod(0o755)
    root, base, store = top / "root", top / "popmail", top / "boxes"
    base.mkdir()
    owner = "nobody" if os.geteuid() == 0 else getpass.getuser()
    pw = pwd.getpwnam(owner)
    sh("init", "--root", str(root), "--me", "mx.bench.test", "--owner", owner)
    sh("domain", "add", DOMAIN, "--handle", "bn1", "--base", str(base), "--root", str(root))
    home = base / "b" / "bn1" / "DOMAINS" / DOMAIN
    store.mkdir()
    os.chown(store, pw.pw_uid, pw.pw_gid)
    maildirs = []
    for i in range(boxes):
        md = store / f"u{i}"
        maildirmake(md, uid=pw.pw_uid, gid=pw.pw_gid)
        maildirs.append(md)
        names = [f".qmail-u{i}"] + ([f".qmail-{i + 1}"] if numbered else [])
        for name in names:  # smtp-source -N numbers its recipients 1, 2, ...
            dq = home / name
            dq.write_text(f"{md}/\n")
            os.chown(dq, pw.pw_uid, pw.pw_gid)
    return root, maildirs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """``pqmail serve`` on free loopback ports, its log in a file."""

    def __init__(self, root: Path, workers: int, log: Path) -> None:
        self.port = free_port()
        self.log_path = log
        self.out = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [*PQMAIL, "serve", "--root", str(root), "--smtp", f"127.0.0.1:{self.port}",
             "--submission", f"127.0.0.1:{free_port()}", "--no-pop3", "--no-odmr", "--no-serialmail",
             "--workers", str(workers), "--pidfile", str(root / "serve.pid")],
            stdout=self.out, stderr=self.out)
        deadline = time.monotonic() + 60
        while not (self._banner() and " send: status: local " in self.log()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"pqmail serve did not start:\n{self.log()}")
            time.sleep(POLL)

    def _banner(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                return s.recv(512).startswith(b"220 ")
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        finally:
            self.out.close()


# ------------------------------------------------------------------ /proc sampling

def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds of the process and of its reaped children)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(b")") + 2:].split()
        table[int(name)] = (int(rest[1]), sum(int(x) for x in rest[11:15]) / HZ)
    return table


def descendants(root: int, table: dict[int, tuple[int, float]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root] if root in table else []
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Sampler:
    """Peak PSS sum and process count of a process tree, and its CPU seconds, in a thread."""

    def __init__(self, root: int, interval: float = 0.25) -> None:
        self.root = root
        self.interval = interval
        self.peak_pss = 0
        self.peak_procs = 0
        self.cpu0 = self.cpu1 = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict[int, tuple[int, float]]:
        table = _proc_table()
        pids = descendants(self.root, table)
        self.peak_procs = max(self.peak_procs, len(pids))
        self.peak_pss = max(self.peak_pss, sum(pss(p) for p in pids))
        return {p: table[p] for p in pids}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> Sampler:
        self.first = self._sample()
        self.cpu0 = sum(cpu for _, cpu in self.first.values())
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.last = self._sample()
        self.cpu1 = sum(cpu for _, cpu in self.last.values())

    def cpu_by_child(self) -> dict[int, float]:
        """CPU seconds used during the run per direct child of the root (its subtree), root itself too."""
        out: dict[int, float] = {}
        for pid, (_ppid, cpu) in self.last.items():
            top = pid
            while top != self.root and self.last.get(top, (self.root,))[0] != self.root:
                top = self.last[top][0]
            out[top] = out.get(top, 0.0) + cpu - self.first.get(pid, (0, 0.0))[1]
        return out


# ------------------------------------------------------------------ the python driver

EXPECT = (220, 250, 250, 250, 354, 250, 221)  # the banner, then the reply to each command


@dataclass
class Outcome:
    accepted: list[int] = field(default_factory=list)  # per box
    count: int = 0
    last_250: float = 0.0
    errors: list[str] = field(default_factory=list)


class _Session(asyncio.Protocol):
    """One message on one connection: a state machine that sends the next command on each reply."""

    def __init__(self, script: tuple[bytes, ...], done: asyncio.Future) -> None:
        self.script = script
        self.done = done
        self.step = 0
        self.buf = b""
        self.accepted_at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (nl := self.buf.find(b"\n")) >= 0:
            line, self.buf = self.buf[:nl + 1], self.buf[nl + 1:]
            if line[3:4] != b"-":
                self._reply(line)

    def _reply(self, line: bytes) -> None:
        if self.done.done():
            return
        if not line[:3].isdigit() or int(line[:3]) != EXPECT[self.step]:
            self.done.set_result(f"step {self.step}: {line.strip()[:120]!r}")
            self.transport.close()
            return
        if self.step == 5:
            self.accepted_at = time.monotonic()
        if self.step == 6:
            self.done.set_result(None)
            self.transport.close()
            return
        self.transport.write(self.script[self.step])
        self.step += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None if self.accepted_at else f"connection lost at step {self.step}: {exc}")


def script_for(i: int, boxes: int, body: bytes) -> tuple[bytes, ...]:
    rcpt = f"u{i % boxes}@{DOMAIN}".encode()
    head = (b"From: <" + SENDER + b">\r\nTo: <" + rcpt + b">\r\nSubject: bench " + str(i).encode()
            + b"\r\nMessage-ID: <" + str(i).encode() + b".smtp-bench@sender.test>\r\n\r\n")
    return (b"HELO bench.client\r\n", b"MAIL FROM:<" + SENDER + b">\r\n", b"RCPT TO:<" + rcpt + b">\r\n",
            b"DATA\r\n", head + body + b".\r\n", b"QUIT\r\n")


def body_bytes(size: int) -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd\r\n"
    return (line * (size // len(line) + 1))[:size].rstrip(b"\r\n") + b"\r\n"


async def _python_load(port: int, messages: int, sessions: int, boxes: int, size: int) -> Outcome:
    loop = asyncio.get_running_loop()
    body = body_bytes(size)
    out = Outcome(accepted=[0] * boxes)
    counter = iter(range(messages))

    async def session() -> None:
        for i in counter:
            done = loop.create_future()
            proto = _Session(script_for(i, boxes, body), done)
            try:
                await loop.create_connection(lambda proto=proto: proto, "127.0.0.1", port)
            except OSError as e:
                out.errors.append(f"message {i}: connect: {e}")
                continue
            error = await done
            if proto.accepted_at:
                out.accepted[i % boxes] += 1
                out.count += 1
                out.last_250 = max(out.last_250, proto.accepted_at)
            if error:
                out.errors.append(f"message {i}: {error}")

    await asyncio.gather(*(session() for _ in range(sessions)))
    return out


def run_python(port: int, messages: int, sessions: int, boxes: int, size: int) -> Outcome:
    return asyncio.run(_python_load(port, messages, sessions, boxes, size))


# ------------------------------------------------------------------ the smtp-source driver

def lanes(messages: int, sessions: int, boxes: int) -> list[tuple[int, list[int]]]:
    """(sessions, [message count of each smtp-source run]) per parallel lane; a run numbers its
    recipients 1..count, so no run is longer than the number of boxes."""
    n = min(sessions, max(1, -(-messages // boxes)))
    out = []
    for k in range(n):
        s = sessions // n + (k < sessions % n)
        m = messages // n + (k < messages % n)
        out.append((s, [min(boxes, m - j) for j in range(0, m, boxes)]))
    return out


def run_smtp_source(tool: str, port: int, messages: int, sessions: int, boxes: int, size: int) -> Outcome:
    out = Outcome(accepted=[0] * boxes)
    lock = threading.Lock()

    def lane(s: int, runs: list[int]) -> None:
        for m in runs:
            cmd = [tool, "-s", str(s), "-m", str(m), "-l", str(size), "-N", "-t", f"@{DOMAIN}",
                   "-f", SENDER.decode(), "-M", "bench.client", f"127.0.0.1:{port}"]
            p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            with lock:
                if p.returncode:
                    out.errors.append(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()[-300:]}")
                    return
                for j in range(m):
                    out.accepted[j] += 1
                out.count += m
                out.last_250 = time.monotonic()

    threads = [threading.Thread(target=lane, args=spec) for spec in lanes(messages, sessions, boxes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


# ------------------------------------------------------------------ one level

def count_new(md: Path) -> int:
    try:
        return len(os.listdir(md / "new"))
    except FileNotFoundError:
        return 0


def wait_delivered(maildirs: list[Path], want: list[int], timeout: float) -> tuple[float | None, int]:
    """Poll until every Maildir holds its count; (monotonic time, 0) or (None, messages missing)."""
    pending = {k: n for k, n in enumerate(want) if n}
    deadline = time.monotonic() + timeout
    while True:
        for k in list(pending):
            if count_new(maildirs[k]) >= pending[k]:
                del pending[k]
        now = time.monotonic()
        if not pending:
            return now, 0
        if now > deadline:
            return None, sum(pending[k] - count_new(maildirs[k]) for k in pending)
        time.sleep(POLL)


def queue_empty(root: Path) -> bool:
    from pqmail.queue.store import Queue

    q = Queue(root / "queue")
    return not q.list_todo() and not q.list_info()


@dataclass
class Level:
    sessions: int
    accepted_mps: float
    delivered_mps: float | None
    peak_pss_mb: float
    line: str


def run_level(a: argparse.Namespace, root: Path, maildirs: list[Path], sessions: int) -> Level:
    srv = Serve(root, a.workers, root.parent / f"serve-{sessions}.log")
    load = os.getloadavg()[0]
    os.sync()  # no dirty pages from the set-up or the previous level
    sampler = Sampler(srv.proc.pid).start()
    ru0, pt0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time()
    t0 = time.monotonic()
    if a.driver == "python":
        out = run_python(srv.port, a.messages, sessions, len(maildirs), a.size)
    else:
        out = run_smtp_source(a.smtp_source, srv.port, a.messages, sessions, len(maildirs), a.size)
    ru1, pt1 = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time()
    t_done, missing = wait_delivered(maildirs, out.accepted, a.timeout)
    sampler.stop()
    drained = time.monotonic() + 60
    while not queue_empty(root) and time.monotonic() < drained:
        time.sleep(POLL)
    code = srv.stop()
    if code != 0 or "Traceback" in srv.log():
        print(f"warning: pqmail serve exited {code}; see {srv.log_path}", file=sys.stderr)
    client_cpu = (pt1 - pt0) + (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    n = max(out.count, 1)
    acc = out.count / (out.last_250 - t0) if out.count else 0.0
    e2e = out.count / (t_done - t0) if t_done else None
    mb = sampler.peak_pss / 2**20
    line = (f"{sessions:3d} sessions: accepted {acc:.0f} msgs/s ({out.count} in {out.last_250 - t0:.2f} s), "
            + (f"delivered {e2e:.0f} msgs/s end to end ({t_done - t0:.2f} s)" if t_done
               else f"NOT delivered: {missing} missing after {a.timeout:.0f} s")
            + f", peak PSS {mb:.1f} MB ({sampler.peak_procs} procs), server CPU "
              f"{1e6 * (sampler.cpu1 - sampler.cpu0) / n:.0f} us/msg, "
              f"client CPU {1e6 * client_cpu / n:.0f} us/msg"
            + f", load avg before {load:.2f}")
    names = {int(pid): name for name, pid in re.findall(r" serve: started (\S+) \(pid (\d+)\)", srv.log())}
    names[srv.proc.pid] = "supervisor"
    by = sorted(sampler.cpu_by_child().items(), key=lambda kv: -kv[1])
    line += "\n     server CPU by service: " + ", ".join(
        f"{names.get(pid, pid)} {1e6 * cpu / n:.0f}" for pid, cpu in by if cpu > 0) + " us/msg"
    if out.errors:
        line += f"; {len(out.errors)} errors, first: {out.errors[0]}"
    return Level(sessions, acc, e2e, mb, line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=5000, help="messages per concurrency level")
    ap.add_argument("--sessions", default="1,20,100", help="comma-separated concurrency levels")
    ap.add_argument("--workers", type=int, default=2, help="smtpd worker processes of pqmail serve")
    ap.add_argument("--boxes", type=int, default=1000)
    ap.add_argument("--size", type=int, default=4096, help="body bytes per message (headers extra)")
    ap.add_argument("--driver", choices=["python", "smtp-source"], default="python")
    ap.add_argument("--smtp-source", default="/usr/sbin/smtp-source", help="path of Postfix's smtp-source")
    ap.add_argument("--dir", default="/tmp/pqbench-smtp")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for delivery per level")
    ap.add_argument("--keep", action="store_true", help="leave every tree under --dir in place afterwards")
    a = ap.parse_args()
    levels = [int(s) for s in re.split(r"[,\s]+", a.sessions.strip()) if s]
    if a.driver == "smtp-source" and not os.access(a.smtp_source, os.X_OK):
        sys.exit(f"{a.smtp_source}: not found (Debian package postfix); use --driver python")

    parent = Path(a.dir)
    parent.mkdir(parents=True, exist_ok=True)
    parent.chmod(0o755)
    subprocess.run(["chattr", "+T", str(parent)], stderr=subprocess.DEVNULL, check=False)
    earlier = sorted(p for p in parent.iterdir() if p.name.startswith("run-"))
    print(f"smtp bench: {a.messages} messages x {a.size} B per level, {a.boxes} boxes, {a.workers} smtpd "
          f"workers, driver {a.driver}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}", flush=True)
    results, trees = [], []
    for s in levels:
        top = Path(tempfile.mkdtemp(prefix="run-", dir=parent))
        trees.append(top)
        root, maildirs = setup(top, a.boxes, numbered=a.driver == "smtp-source")
        r = run_level(a, root, maildirs, s)
        print(r.line, flush=True)
        results.append(r)
    if not a.keep:  # measured: now the trees can go (the last one is left to the next run)
        for old in earlier + trees[:-1]:
            shutil.rmtree(old, ignore_errors=True)
    parts = [f"{r.sessions} sessions: accepted {r.accepted_mps:.0f} msgs/s, "
             + (f"delivered {r.delivered_mps:.0f} msgs/s end to end" if r.delivered_mps
                else "delivery INCOMPLETE") for r in results]
    print(f"smtp: {'; '.join(parts)}; peak PSS {max(r.peak_pss_mb for r in results):.0f} MB")
    if any(r.delivered_mps is None for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
