"""``pqmail serve`` as a subprocess on the seed tree: end-to-end delivery, crash safety under load
(SIGKILL to the smtpd workers and to ``send``), signals, ``--check``, and the ``make run`` demo tree."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import PQMAIL, run_pqmail
from pqmail.queue.store import Queue

STARTED = re.compile(r" serve: started (\S+) \(pid (\d+)\)$", re.M)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(what: str, ready: Callable[[], object], timeout: float = 60, explain: Callable[[], str] = str):
    """Poll ``ready()`` until it returns something true; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (result := ready()):
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f}s\n{explain()}"
        time.sleep(0.02)  # polling an observable event, not synchronising on time
    return result


class Serve:
    """A running ``pqmail serve`` with two smtpd workers, SMTP and submission on loopback."""

    def __init__(self, root: Path, logfile: Path, workers: int = 2) -> None:
        self.root = root
        self.logfile = logfile
        self.pidfile = root / "serve.pid"
        self.port, self.submission = free_port(), free_port()
        args = [*PQMAIL, "serve", "--root", str(root), "--smtp", f"127.0.0.1:{self.port}",
                "--submission", f"127.0.0.1:{self.submission}", "--no-pop3", "--no-odmr",
                "--no-serialmail", "--workers", str(workers), "--pidfile", str(self.pidfile)]
        self.out = open(logfile, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(args, stdout=self.out, stderr=self.out)
        for port in (self.port, self.submission):  # the banner proves a worker serves the socket
            wait_for(f"a 220 banner on port {port}", lambda port=port: self._banner(port), explain=self.log)
        # the probes were sessions; wait until they are logged, so they count for no limit
        wait_for("the probe sessions logged", lambda: self.log().count(" session ") >= 2, explain=self.log)
        # send has its signal handlers once it reports its status (a SIGHUP before is not a reload)
        self.wait_log(" send: status: local ")

    def _banner(self, port: int) -> bool:
        assert self.proc.poll() is None, f"serve exited {self.proc.returncode}:\n{self.log()}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                return s.recv(512).startswith(b"220 ")
        except OSError:
            return False

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 30) -> str:
        return wait_for(f"{needle!r} in the serve log", lambda: t if needle in (t := self.log()) else "",
                        timeout, self.log)

    def pids(self) -> dict[str, int]:
        """The current pid of every service, from the supervisor's ``started`` lines."""
        return {name: int(pid) for name, pid in STARTED.findall(self.log())}

    def kill(self, name: str) -> int:
        pid = self.pids()[name]
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait_restarted(self, name: str, old_pid: int, timeout: float = 90) -> int:
        return wait_for(f"{name} restarted after SIGKILL of pid {old_pid}",
                        lambda: (p := self.pids().get(name)) != old_pid and p, timeout, self.log)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=90)
        finally:
            self.out.close()


@pytest.fixture
def serve(seed, mailtmp) -> Iterator[Callable[[], Serve]]:
    running: list[Serve] = []

    def start() -> Serve:
        srv = Serve(seed["root"], mailtmp / f"serve{len(running)}.log")
        running.append(srv)
        return srv

    yield start
    results = [(srv.stop(), srv.log()) for srv in running]
    for code, log in results:
        assert code == 0, log
        assert "Traceback" not in log and "internal error" not in log, log


def maildir_files(pop: Path) -> list[Path]:
    return [f for box in pop.iterdir() for sub in ("new", "cur") if (box / sub).is_dir()
            for f in (box / sub).iterdir()]


def committed(root: Path) -> list[int]:
    """Ids of the messages the queue still holds (todo/ or info/): empty once drained."""
    q = Queue(root / "queue")
    return sorted(set(q.list_todo()) | set(q.list_info()))


# ----------------------------------------------------------------------------- end to end

def test_mail_sent_to_serve_is_delivered_into_the_box(seed, serve):
    srv = serve()
    assert srv.pidfile.read_text().strip() == str(srv.proc.pid)
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
        s.sendmail("alice@remote.test", ["joe@example.com"],
                   b"From: alice@remote.test\r\nSubject: through serve\r\n\r\nHello, Joe.\r\n")
    new = seed["pop"] / "ex1-0001" / "new"
    files = wait_for("delivery into ex1-0001/new", lambda: list(new.iterdir()), explain=srv.log)
    assert len(files) == 1
    text = files[0].read_bytes()
    assert text.startswith(b"Return-Path: <alice@remote.test>\nDelivered-To: example.com-joe@example.com\n")
    assert text.endswith(b"\nSubject: through serve\n\nHello, Joe.\n")
    log = srv.wait_log("send: end msg ")
    assert re.search(r" smtpd-[01]: msg \d+ accepted: from 127\.0\.0\.1 ", log), log
    wait_for("the queue drained", lambda: not committed(seed["root"]), explain=srv.log)
    # the submission listener is up too, and without AUTH (no certificate here) it takes no mail
    with smtplib.SMTP("127.0.0.1", srv.submission, timeout=30) as s:
        s.ehlo("client.test")
        code, _ = s.mail("alice@remote.test")
    assert code == 530


# ----------------------------------------------------------------------------- crash safety

class Load:
    """Client threads sending one message per connection, each with a token in its Subject.

    A message counts as accepted only when the server answered 250 after DATA; any other outcome
    (connection refused or reset because a worker died, 4xx) puts it back to be sent again. New
    messages start only up to ``allowed``, so that the kills happen at chosen points of progress.
    """

    def __init__(self, port: int, total: int, threads: int) -> None:
        self.port = port
        self.nonce = uuid.uuid4().hex[:12]
        self.todo = list(range(total - 1, -1, -1))
        self.accepted: set[int] = set()
        self.retries = 0
        self.allowed = 0
        self.started = 0
        self.cond = threading.Condition()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def token(self, i: int) -> str:
        return f"crash-{self.nonce}-{i:05d}"

    def allow(self, n: int) -> None:
        with self.cond:
            self.allowed = max(self.allowed, n)
            self.cond.notify_all()

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def wait_accepted(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.accepted) < n:
                left = deadline - time.monotonic()
                assert left > 0, f"only {len(self.accepted)} of {n} accepted; errors: {self.errors[-5:]}"
                self.cond.wait(left)

    def _next(self) -> int | None:
        with self.cond:
            while True:
                if not self.todo:
                    return None
                retry = self.todo[-1] < self.started
                if retry or self.started < self.allowed:
                    i = self.todo.pop()
                    self.started = max(self.started, i + 1)
                    return i
                self.cond.wait()

    def _run(self) -> None:
        while (i := self._next()) is not None:
            ok = self._send(i)
            with self.cond:
                if ok:
                    self.accepted.add(i)
                else:
                    self.retries += 1
                    self.todo.append(i)
                    self.todo.sort(reverse=True)
                self.cond.notify_all()

    def _send(self, i: int) -> bool:
        rcpt = ("joe@example.com", "postmaster@example.com", "ex1-0002@example.com")[i % 3]
        msg = (f"From: load@remote.test\r\nTo: {rcpt}\r\nSubject: {self.token(i)}\r\n\r\n"
               + "crash safety under load\r\n" * 20).encode()
        try:
            s = smtplib.SMTP("127.0.0.1", self.port, timeout=60)
        except (OSError, smtplib.SMTPException) as e:
            self.errors.append(f"{i}: connect: {e!r}")
            return False
        try:
            s.helo("load.test")
            s.mail("load@remote.test")
            if s.rcpt(rcpt)[0] != 250:
                return False
            code, _ = s.data(msg)
            accepted = code == 250
        except (OSError, smtplib.SMTPException) as e:
            self.errors.append(f"{i}: {e!r}")
            return False
        try:
            s.quit()
        except (OSError, smtplib.SMTPException):
            pass  # after the 250 the message is the server's, whatever happens to QUIT
        finally:
            s.close()
        return accepted


def delivered_tokens(pop: Path, nonce: str) -> list[int]:
    pattern = re.compile(rb"\nSubject: crash-" + nonce.encode() + rb"-(\d{5})\n")
    out = []
    for f in maildir_files(pop):
        try:
            m = pattern.search(f.read_bytes())
        except FileNotFoundError:
            continue
        if m:
            out.append(int(m.group(1)))
    return out


def test_every_250_survives_sigkill_of_smtpd_workers_and_send(seed, serve):
    total, threads = 600, 12
    # (accepted so far, services to SIGKILL then): each worker twice, send three times
    plan = [(60, ["smtpd-0"]), (150, ["send"]), (250, ["smtpd-0", "smtpd-1"]), (350, ["send"]),
            (450, ["smtpd-1", "send"])]
    srv = serve()
    load = Load(srv.port, total, threads)
    load.allow(plan[0][0] + 3 * threads)  # messages are in flight at every kill
    load.start()
    killed: list[tuple[str, int]] = []
    for n, (at, names) in enumerate(plan):
        load.wait_accepted(at)
        old = [(name, srv.kill(name)) for name in names]
        killed += old
        for name, pid in old:
            srv.wait_restarted(name, pid)
        nxt = plan[n + 1][0] if n + 1 < len(plan) else total
        load.allow(nxt + 3 * threads)
    load.wait_accepted(total, timeout=300)
    for t in load.threads:
        t.join(timeout=60)
    assert load.retries > 0, "no message was interrupted: the kills did not hit the load"

    accepted = set(load.accepted)
    wait_for("every accepted message delivered",
             lambda: accepted <= set(delivered_tokens(seed["pop"], load.nonce)), timeout=300,
             explain=lambda: f"missing: {sorted(accepted - set(delivered_tokens(seed['pop'], load.nonce)))}")
    wait_for("the queue drained to empty", lambda: not committed(seed["root"]), timeout=120,
             explain=lambda: f"still queued: {committed(seed['root'])}\n{srv.log()[-3000:]}")
    got = delivered_tokens(seed["pop"], load.nonce)
    assert set(got) == set(range(total))  # every client retried until its 250: nothing is lost
    assert len(got) >= total  # duplicates are allowed (a kill after the commit, before the 250)

    log = srv.log()
    for name, pid in killed:
        exited = f" serve: {name} exited (signal {signal.SIGKILL.value}) "
        assert exited in log, f"{name} (pid {pid}) not seen dying:\n{log}"
        assert STARTED.findall(log).count((name, str(pid))) == 1
        assert srv.pids()[name] != pid
    for name in ("smtpd-0", "smtpd-1", "send"):
        assert log.count(f" serve: {name} exited (signal 9) ") == sum(1 for k, _ in killed if k == name)
    assert srv.stop() == 0


# ----------------------------------------------------------------------------- signals

def _greeting(port: int) -> tuple[socket.socket, bytes]:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    return s, s.makefile("rb").readline()


def test_maxsessions_counts_the_sessions_of_every_worker(seed, serve):
    (seed["root"] / "control" / "maxsessions").write_text("3\n")
    srv = serve()  # two smtpd workers on one socket: each session lands in either
    held = [_greeting(srv.port) for _ in range(3)]
    assert all(g.startswith(b"220 ") for _, g in held), held
    extra, reply = _greeting(srv.port)
    assert reply == b"421 4.3.2 too many sessions, try again later (#4.3.2)\r\n"
    extra.close()
    held[0][0].sendall(b"QUIT\r\n")
    held[0][0].close()
    # the slot is given back once its worker has seen the QUIT: a later session is admitted
    wait_for("a session admitted after a QUIT", lambda: _greeting(srv.port)[1].startswith(b"220 "),
             explain=srv.log)
    # a killed worker's sessions end with it and stop counting; none is counted twice after the restarts
    for name in ("smtpd-0", "smtpd-1"):
        srv.wait_restarted(name, srv.kill(name))
    for s, _ in held[1:]:
        s.close()
    again = [_greeting(srv.port) for _ in range(3)]
    assert all(g.startswith(b"220 ") for _, g in again), (again, srv.log())
    refused, reply = _greeting(srv.port)
    assert reply.startswith(b"421 4.3.2 too many sessions"), reply
    for s, _ in [*again, (refused, b"")]:
        s.close()


def test_sighup_is_forwarded_and_sigterm_stops_cleanly(seed, serve):
    srv = serve()
    pid = int(srv.pidfile.read_text())
    assert pid == srv.proc.pid
    os.kill(pid, signal.SIGHUP)
    srv.wait_log("serve: reloading")
    srv.wait_log("smtpd-0: control files re-read")
    srv.wait_log("smtpd-1: control files re-read")
    srv.wait_log("send: status: control files reloaded")
    assert " exited (" not in srv.log()  # a SIGHUP early in a service's life must not kill it
    # still serving after the reload
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
        assert s.noop()[0] == 250
    os.kill(pid, signal.SIGTERM)
    assert srv.proc.wait(timeout=90) == 0
    assert not srv.pidfile.exists()
    log = srv.log()
    for name in ("smtpd-0", "smtpd-1", "send"):
        assert f"serve: {name} stopped (status 0)" in log, log
    assert log.rstrip().endswith("serve: stopped"), log
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()


# ----------------------------------------------------------------------------- --check

def test_check_accepts_the_seed_and_names_a_missing_rcpthosts(seed):
    args = ("serve", "--check", "--root", str(seed["root"]), "--smtp", "127.0.0.1:1", "--no-pop3",
            "--no-odmr")
    p = run_pqmail(*args, check=False)
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
    (seed["root"] / "control" / "rcpthosts").unlink()
    p = run_pqmail(*args, check=False)
    assert p.returncode == 100
    lines = (p.stdout + p.stderr).decode().strip().splitlines()
    assert len(lines) == 1 and "control/rcpthosts: missing" in lines[0], lines


def test_check_and_start_name_a_damaged_queue(seed, mailtmp):
    todo = seed["root"] / "queue" / "todo"
    todo.chmod(0o700)
    args = ("serve", "--check", "--root", str(seed["root"]), "--smtp", "127.0.0.1:1", "--no-pop3",
            "--no-odmr")
    p = run_pqmail(*args, check=False)
    assert p.returncode == 100
    assert f"{todo}: mode 0700, should be 3770" in p.stdout.decode()
    assert "`pqmail queue fix` restores" in p.stdout.decode()
    srv = Serve(seed["root"], mailtmp / "serve-damaged.log")  # it still starts, and says why mail may fail
    try:
        assert f"pqmail serve: warning: {todo}: mode 0700, should be 3770" in srv.log()
    finally:
        assert srv.stop() == 0
    run_pqmail("queue", "fix", "--root", str(seed["root"]))
    assert run_pqmail(*args).returncode == 0


# ----------------------------------------------------------------------------- make run

def test_demo_setup_builds_the_seed_tree(mailtmp):
    top = mailtmp / "demo"
    p = subprocess.run([sys.executable, "-m", "pqmail.demo", "--dir", str(top), "--no-serve"],
                       capture_output=True, timeout=300)
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
    assert b"Traceback" not in p.stderr
    root, pop = top / "root", top / "popmail" / "e" / "ex1" / "POP"
    rcpthosts = (root / "control" / "rcpthosts").read_text().split()
    assert "example.com" in rcpthosts and "some.example.com" in rcpthosts
    assert "some.example.com:some.example.com" in (root / "control" / "virtualdomains").read_text().split()
    assert (top / "serialmail" / "some.example.com" / "Maildir" / "new").is_dir()
    boxes = sorted(d.name for d in pop.iterdir())
    assert boxes == ["ex1-0000", "ex1-0001", "ex1-0002"]
    for box in boxes:
        assert all((pop / box / sub).is_dir() for sub in ("new", "cur", "tmp"))
    joe = top / "popmail" / "e" / "ex1" / "DOMAINS" / "example.com" / ".qmail-joe"
    assert joe.read_text().strip() == f"{pop / 'ex1-0001'}/"
    welcome = list((pop / "ex1-0001" / "new").iterdir())  # the demo's welcome went through joe's alias
    assert len(welcome) == 1 and b"Subject: welcome to pqmail" in welcome[0].read_bytes()
    passwords = top / "passwords.txt"
    assert passwords.stat().st_mode & 0o077 == 0
    lines = [line.split() for line in passwords.read_text().splitlines()]
    assert [fields[0] for fields in lines] == boxes and all(len(f) == 2 and f[1] for f in lines)
    assert run_pqmail("serve", "--check", "--root", str(root), "--no-pop3", "--no-odmr").returncode == 0
    # a second run keeps the tree (and the passwords) as they are
    again = subprocess.run([sys.executable, "-m", "pqmail.demo", "--dir", str(top), "--no-serve"],
                           capture_output=True, timeout=300)
    assert again.returncode == 0 and passwords.read_text() == "\n".join(" ".join(f) for f in lines) + "\n"
