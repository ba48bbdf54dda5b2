"""serialmail end to end on the seed tree: mail for the dial-up customer some.example.com is injected,
delivered into its Maildir by pqmail send, and pushed to the customer's host by the serialmail commands
(as subprocesses): on a schedule, from cron, on ETRN, and over ODMR with Debian's fetchmail. The
customer's host is a real SMTP server on 127.0.0.1: an aiosmtpd sink, or Postfix's smtp-sink."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import require_tool, run_pqmail
from pqmail.maildir import scan
from pqmail.paths import Root
from pqmail.queue.store import Queue
from pqmail.serialmail.etrn import handle_etrn
from pqmail.serialmail.flush import read_last_transfer
from serialmail.smtpsink import Sink

DOMAIN = "some.example.com"
SERIALMAIL = [sys.executable, "-m", "pqmail.cli.serialmail_cmd"]


def serialmail(*args: str, input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run([*SERIALMAIL, *args], input=input, capture_output=True, timeout=timeout)
    assert b"Traceback" not in p.stderr, p.stderr.decode(errors="replace")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def sink():
    s = Sink().start()
    yield s
    s.stop()


def _dialup(seed) -> Path:
    return seed["serial"] / DOMAIN


def _point_at(seed, port: int) -> None:
    run_pqmail("dialup", "add", DOMAIN, "--handle", "ex1", "--relayhost", f"127.0.0.1:{port}",
               "--base", str(seed["serial"]), "--root", str(seed["root"]))


def _mail(seed, n: int, sender: str = "alice@remote.test") -> None:
    """n messages for anyone@ ... through inject and pqmail send, into the dial-up Maildir."""
    root = seed["root"]
    for i in range(n):
        run_pqmail("inject", "-f", sender, f"user{i}@{DOMAIN}",
                   input=f"From: {sender}\nSubject: serial {i}\n\nbody {i}\n".encode(),
                   env={"PQMAIL_ROOT": str(root)})
    log = run_pqmail("send", "--drain", "--root", str(root)).stderr.decode(errors="replace")
    assert len(scan(_dialup(seed) / "Maildir")) == n, log


def _queued(root: Path) -> list[tuple[str, list[str], bytes]]:
    q = Queue(root / "queue")
    return [(q.read_todo(m).sender, q.read_todo(m).recipients, q.message_path(m).read_bytes())
            for m in sorted(q.list_todo())]


# ----------------------------------------------------------------------------- schedule and cron

def test_scheduled_service_delivers_every_waiting_message(seed, sink):
    root = seed["root"]
    _point_at(seed, sink.port)
    _mail(seed, 5)
    (root / "control" / "serialmailinterval").write_text("1\n")
    proc = subprocess.Popen([*SERIALMAIL, "daemon", "--root", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        sink.wait_for(lambda s: len(s.messages) == 5, timeout=60)
        _wait(lambda: not scan(_dialup(seed) / "Maildir"), "the Maildir to empty")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode(errors="replace")
    assert sorted((m.sender, tuple(m.rcpts)) for m in sink.messages) == [
        ("alice@remote.test", (f"user{i}@{DOMAIN}",)) for i in range(5)]
    # the two envelope lines are not part of what is sent: it starts with qmail's Received lines
    assert all(m.data.startswith(b"Received: ") and b"\r\nSubject: serial" in m.data
               and b"Delivered-To:" not in m.data and b"Return-Path:" not in m.data for m in sink.messages)
    assert read_last_transfer(_dialup(seed)).status == "ok"


def test_run_from_cron_and_empty_maildir_makes_no_connection(seed, sink):
    root = seed["root"]
    _point_at(seed, sink.port)
    p = serialmail("run", "--root", str(root))
    assert p.returncode == 0 and b"1 with nothing waiting" in p.stdout, p.stdout
    assert sink.connections == 0
    _mail(seed, 2)
    p = serialmail("run", "--root", str(root), "--base", str(seed["serial"]))
    assert p.returncode == 0 and b"delivered 2" in p.stdout, p.stdout + p.stderr
    assert sink.connections == 1 and len(sink.messages) == 2


def test_two_flushes_started_together_one_transfers(seed, sink):
    root, d = seed["root"], _dialup(seed)
    _point_at(seed, sink.port)
    _mail(seed, 3)
    sink.stall_on = {1}  # the first transfer holds the lock until we let it go
    first = subprocess.Popen([*SERIALMAIL, "flush", str(d), "--root", str(root)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert sink.stalled.wait(30)
    started = time.monotonic()
    second = serialmail("flush", str(d), "--root", str(root), timeout=30)
    assert second.returncode == 0 and b"transfer already in progress" in second.stderr
    assert time.monotonic() - started < 15
    sink.release()
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err.decode(errors="replace")
    assert sink.connections == 1 and len(sink.messages) == 3
    assert not scan(d / "Maildir")


def test_sigkill_during_a_flush_loses_nothing(seed, sink):
    root, d = seed["root"], _dialup(seed)
    _point_at(seed, sink.port)
    _mail(seed, 4)
    sink.stall_on = {2}
    proc = subprocess.Popen([*SERIALMAIL, "flush", str(d), "--root", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert sink.stalled.wait(30)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert len(scan(d / "Maildir")) == 3  # the first went; the one in flight and the rest stay
    sink.release()
    p = serialmail("flush", str(d), "--root", str(root))
    assert p.returncode == 0, p.stderr
    assert not scan(d / "Maildir")
    got = [m.rcpts[0] for m in sink.messages]
    assert sorted(set(got)) == [f"user{i}@{DOMAIN}" for i in range(4)]
    in_flight = f"user1@{DOMAIN}"
    assert all(got.count(r) == 1 for r in set(got) - {in_flight}) and got.count(in_flight) <= 2


# ----------------------------------------------------------------------------- Postfix's smtp-sink

@pytest.fixture
def postfix_sink(mailtmp):
    """Start smtp-sink with extra options on a free port; yields a starter, stops them all at the end."""
    tool = require_tool("smtp-sink")
    procs = []

    def start(*opts: str) -> int:
        port = _free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        procs.append(subprocess.Popen([tool, *user, *opts, f"127.0.0.1:{port}", "10"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait(lambda: _listening(port), "smtp-sink to listen")
        return port

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_smtp_sink_takes_the_batch_pipelined(seed, postfix_sink):
    root, d = seed["root"], _dialup(seed)
    _point_at(seed, postfix_sink())
    _mail(seed, 3)
    p = serialmail("flush", str(d), "--root", str(root))
    assert p.returncode == 0, p.stderr
    log = p.stderr.decode()
    assert log.count("said: 250") == 3 and not scan(d / "Maildir")


def test_smtp_sink_4xx_keeps_everything_and_5xx_bounces_each(seed, postfix_sink):
    root, d = seed["root"], _dialup(seed)
    _point_at(seed, postfix_sink("-r", "."))  # 450 after every message's data
    _mail(seed, 3)
    p = serialmail("flush", str(d), "--root", str(root))
    assert p.returncode == 111 and p.stderr.decode().count("deferred new/") == 1
    assert len(scan(d / "Maildir")) == 3 and _queued(root) == []
    _point_at(seed, postfix_sink("-f", "."))  # 500 after every message's data
    p = serialmail("flush", str(d), "--root", str(root))
    assert p.returncode == 0 and p.stderr.decode().count("bounced new/") == 3
    bounces = _queued(root)
    assert len(bounces) == 3 and all(b[:2] == ("", ["alice@remote.test"]) for b in bounces)
    assert all(b"Hi. This is the maildirbounce program at mx.isp.test." in b[2] for b in bounces)


# ----------------------------------------------------------------------------- ETRN

def test_etrn_from_an_allowed_client_starts_the_flush(seed, sink):
    root, d = seed["root"], _dialup(seed)
    _point_at(seed, sink.port)
    _mail(seed, 2)
    reply = handle_etrn(DOMAIN, "192.0.2.7", None, Root(root))
    assert reply.startswith("459 "), reply
    assert sink.connections == 0
    (d / "ETRNCLIENTS").write_text("192.0.2.0/24\n")
    reply = handle_etrn(DOMAIN, "192.0.2.7", None, Root(root))
    assert reply == f"253 2.0.0 OK, 2 pending messages for node {DOMAIN} started"
    sink.wait_for(lambda s: len(s.messages) == 2)
    _wait(lambda: not scan(d / "Maildir"), "the Maildir to empty")
    assert handle_etrn(f"@{DOMAIN}", "192.0.2.7", None, Root(root)).startswith("251 ")


# ----------------------------------------------------------------------------- ODMR with fetchmail

def test_odmr_with_fetchmail(seed, sink, mailtmp):
    fetchmail = require_tool("fetchmail")
    root, d = seed["root"], _dialup(seed)
    _mail(seed, 3)
    p = serialmail("passwd", DOMAIN, "--password-file", "-", "--root", str(root), input=b"s3cret\n")
    assert p.returncode == 0, p.stderr
    port = _free_port()
    server = subprocess.Popen([*SERIALMAIL, "odmrd", "--listen", f"127.0.0.1:{port}", "--root", str(root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait(lambda: _listening(port), "odmrd to listen")
        home = mailtmp / "fetchmail-home"
        home.mkdir()
        rc = home / "fetchmailrc"
        rc.write_text(f'set no syslog\npoll 127.0.0.1 protocol ODMR service {port}\n'
                      f'  user "{DOMAIN}" password "s3cret"\n'
                      f'  fetchdomains {DOMAIN} smtphost 127.0.0.1/{sink.port}\n')
        rc.chmod(0o600)
        env = {**os.environ, "HOME": str(home), "FETCHMAILHOME": str(home)}
        run = subprocess.run([fetchmail, "-f", str(rc), "-v", "--nodetach"], capture_output=True, env=env,
                             timeout=120)
        out = (run.stdout + run.stderr).decode(errors="replace")
        assert run.returncode == 0, out
        assert "Turnaround now" in out
        sink.wait_for(lambda s: len(s.messages) == 3)
        assert sorted(m.rcpts[0] for m in sink.messages) == [f"user{i}@{DOMAIN}" for i in range(3)]
        _wait(lambda: not scan(d / "Maildir"), "the Maildir to empty")
        again = subprocess.run([fetchmail, "-f", str(rc), "--nodetach"], capture_output=True, env=env,
                               timeout=120)
        assert b"You have no mail" in again.stdout + again.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err.decode(errors="replace")
    assert "ATRN some.example.com by some.example.com: 250" in err.decode()
