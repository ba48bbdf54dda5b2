"""`pqmail pop3d` on a tree made by the provisioning commands, driven by real clients (poplib, fetchmail)."""

from __future__ import annotations

import base64
import hashlib
import os
import poplib
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import PQMAIL, mail_owner, require_tool, run_pqmail
from pqmail.maildir import deliver
from pqmail.passwords import PasswordStore

PASSWORD = "open sesame"
BOXES = 10  # one per test that changes a box, so that tests do not see each other's mail
CRYPT_BOX = 9  # imported with a SHA512-CRYPT hash: verified (and the box opened) on the event loop


@dataclass
class Server:
    root: Path
    port: int
    pop3s_port: int
    boxes: list[str]
    maildirs: dict[str, Path]
    ca: object
    log: Path
    proc: subprocess.Popen

    def connect(self) -> poplib.POP3:
        return poplib.POP3("127.0.0.1", self.port, timeout=60)

    def login(self, box: str, password: str = PASSWORD) -> poplib.POP3:
        p = self.connect()
        p.user(box)
        p.pass_(password)
        return p

    def deliver(self, box: str, data: bytes) -> str:
        md = self.maildirs[box]
        name = deliver(md, [data])
        if os.geteuid() == 0:
            pw = pwd.getpwnam(mail_owner())
            os.chown(md / "new" / name, pw.pw_uid, pw.pw_gid)
        return name

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pop3d_command() -> list[str]:
    """`pqmail pop3d`, or its module while the command table does not list it yet."""
    from pqmail.cli.main import COMMANDS

    return [*PQMAIL, "pop3d"] if "pop3d" in COMMANDS else [sys.executable, "-m", "pqmail.cli.pop3d_cmd"]


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"pop3d exited {proc.returncode}: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # polling for an observable event (the port accepting), with a deadline
    raise AssertionError(f"pop3d did not listen within {deadline}s: {log.read_text()}")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    trustme = pytest.importorskip("trustme")
    # Not under pytest's base directory: any pytest run (another session's too) makes that 0700 again,
    # and the server, running as the mail user when we are root, must reach the boxes.
    top = Path(tempfile.mkdtemp(prefix="pqmail-pop3d-"))
    top.chmod(0o755)
    root, base = top / "root", top / "popmail"
    base.mkdir()
    run_pqmail("init", "--root", str(root), "--me", "mx.isp.test", "--owner", mail_owner())
    run_pqmail("domain", "add", "example.com", "--handle", "ex1", "--base", str(base), "--root", str(root))
    pwfile = top / "password"
    pwfile.write_text(PASSWORD + "\n")
    boxes = [run_pqmail("box", "add", "ex1", "--password-file", str(pwfile), "--root", str(root))
             .stdout.decode().strip() for _ in range(BOXES)]
    run_pqmail("alias", "add", "joe@example.com", boxes[1], "--root", str(root))
    with warnings.catch_warnings():  # passlib imports the deprecated crypt module
        warnings.simplefilter("ignore", DeprecationWarning)
        from passlib.hash import sha512_crypt
        crypt_hash = sha512_crypt.using(rounds=5000).hash(PASSWORD)
    (top / "import").write_text(f"{boxes[CRYPT_BOX]}:{crypt_hash}\n")
    run_pqmail("box", "import", str(top / "import"), "--root", str(root))
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")  # fetchmail checks the CN
    pem = root / "control" / "servercert.pem"
    pem.write_bytes(cert.private_key_pem.bytes() + b"".join(c.bytes() for c in cert.cert_chain_pems))
    pem.chmod(0o600)  # readable by root only, as usual: pop3d loads it before dropping privileges
    store = PasswordStore(root)
    maildirs = {b: Path(store.get(b)[1]) for b in boxes}
    port, pop3s_port = free_port(), free_port()
    log = top / "pop3d.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([*pop3d_command(), "--root", str(root), "--listen", f"127.0.0.1:{port}",
                                 "--pop3s", f"127.0.0.1:{pop3s_port}", "--workers", "2"],
                                stdout=logf, stderr=subprocess.STDOUT)
    srv = Server(root, port, pop3s_port, boxes, maildirs, ca, log, proc)
    try:
        wait_for_port(port, proc, log)
        wait_for_port(pop3s_port, proc, log)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
        text = log.read_text()
        shutil.rmtree(top, ignore_errors=True)
    assert "Traceback" not in text, text


def message(i: int, body: bytes = b"hello\n") -> bytes:
    return b"From: a@example.net\nSubject: message %d\n\n" % i + body


def raw(lines: list[bytes]) -> bytes:
    return b"".join(ln + b"\n" for ln in lines)


# ----------------------------------------------------------------------------- poplib

def test_list_retrieve_delete_and_stable_uidl(server: Server) -> None:
    box = server.boxes[0]
    names = [server.deliver(box, message(i)) for i in range(3)]
    p = server.login(box)
    count, octets = p.stat()
    assert count == 3 and octets == sum(len(message(i)) + message(i).count(b"\n") for i in range(3))
    _, listing, _ = p.list()
    assert len(listing) == 3
    _, uidl1, _ = p.uidl()
    assert sorted(u.split()[1].decode() for u in uidl1) == sorted(names)
    _, lines, _ = p.retr(1)
    assert b"\n".join(lines) + b"\n" in {message(i) for i in range(3)}
    p.quit()  # nothing deleted

    p = server.login(box)
    _, uidl2, _ = p.uidl()
    assert uidl2 == uidl1  # same numbers, same ids, in a new session (and after new -> cur)
    p.dele(2)
    assert p.stat()[0] == 2
    assert p.quit().startswith(b"+OK")

    p = server.login(box)
    _, uidl3, _ = p.uidl()
    assert [u.split()[1] for u in uidl3] == [uidl1[0].split()[1], uidl1[2].split()[1]]
    p.quit()
    assert len(os.listdir(server.maildirs[box] / "cur")) == 2


def test_session_dropped_without_quit_deletes_nothing(server: Server) -> None:
    box = server.boxes[2]
    server.deliver(box, message(1))
    p = server.login(box)
    p.dele(1)
    p.sock.shutdown(socket.SHUT_RDWR)  # gone without QUIT
    p.close()
    p2 = None
    deadline = time.monotonic() + 30
    while p2 is None:  # the server notices the close and releases the lock
        try:
            p2 = server.login(box)
        except poplib.error_proto as e:
            assert b"IN-USE" in e.args[0] and time.monotonic() < deadline
    assert p2.stat()[0] == 1
    p2.quit()


def test_top(server: Server) -> None:
    box = server.boxes[3]
    server.deliver(box, raw([b"Subject: top", b"X-H: 2", b"", b"line 1", b".line 2", b"line 3"]))
    p = server.login(box)
    _, lines, _ = p.top(1, 2)
    assert lines == [b"Subject: top", b"X-H: 2", b"", b"line 1", b".line 2"]
    _, lines, _ = p.top(1, 0)
    assert lines == [b"Subject: top", b"X-H: 2", b""]
    p.quit()


def test_dot_lines_and_bare_lf_and_no_final_newline(server: Server) -> None:
    box = server.boxes[4]
    data = b"Subject: dots\n\n.\n..\n.hidden\nbare lf\nno final newline"
    server.deliver(box, data)
    p = server.connect()
    p.user(box)
    p.pass_(PASSWORD)
    _, listing, _ = p.list()
    size = int(listing[0].split()[1])
    p._putcmd("RETR 1")  # the raw wire form, before poplib removes the stuffing
    assert p._getline()[0].startswith(b"+OK")
    wire = []
    while (line := p._getline()[0]) != b".":
        wire.append(line)
    assert wire == [b"Subject: dots", b"", b"..", b"...", b"..hidden", b"bare lf", b"no final newline"]
    assert size == sum(len(ln) + 2 for ln in wire) - 3  # CRLF counted, stuffing dots not
    _, lines, _ = p.retr(1)
    assert lines == [b"Subject: dots", b"", b".", b"..", b".hidden", b"bare lf", b"no final newline"]
    p.quit()


def test_empty_box(server: Server) -> None:
    p = server.login(server.boxes[5])
    assert p.stat() == (0, 0)
    assert p.list()[1] == [] and p.uidl()[1] == []
    with pytest.raises(poplib.error_proto):
        p.retr(1)
    p.quit()


def test_20mb_message(server: Server) -> None:
    box = server.boxes[6]
    line = b"0123456789" * 7 + b"abcde\n"
    data = b"Subject: big\n\n" + line * (20 * 1024 * 1024 // len(line))
    server.deliver(box, data)
    p = server.login(box)
    assert p.list()[1] == [b"1 %d" % (len(data) + data.count(b"\n"))]
    _, lines, _ = p.retr(1)
    assert hashlib.sha256(b"\n".join(lines) + b"\n").digest() == hashlib.sha256(data).digest()
    p.dele(1)
    p.quit()
    assert os.listdir(server.maildirs[box] / "cur") == []


def test_in_use(server: Server) -> None:
    box = server.boxes[7]
    first = server.login(box)
    second = server.connect()
    second.user(box)
    with pytest.raises(poplib.error_proto) as e:
        second.pass_(PASSWORD)
    assert e.value.args[0] == b"-ERR [IN-USE] mailbox is in use by another session"
    first.quit()
    second.user(box)
    assert second.pass_(PASSWORD).startswith(b"+OK")
    second.quit()


def test_crypt_box_login_retrieve_in_use_and_delete(server: Server) -> None:
    box = server.boxes[CRYPT_BOX]
    names = {server.deliver(box, message(i)) for i in range(3)}
    bad = server.connect()
    bad.user(box)
    t0 = time.monotonic()
    with pytest.raises(poplib.error_proto) as e:
        bad.pass_("wrong")
    assert time.monotonic() - t0 >= 1.0  # the same delay as any failed login
    assert e.value.args[0] == b"-ERR [AUTH] authentication failed"
    bad.quit()
    p = server.login(box)
    assert p.stat() == (3, sum(len(message(i)) + message(i).count(b"\n") for i in range(3)))
    assert {ln.split()[1].decode() for ln in p.uidl()[1]} == names
    assert {b"\n".join(p.retr(n)[1]) + b"\n" for n in (1, 2, 3)} == {message(i) for i in range(3)}
    second = server.connect()
    second.user(box)
    with pytest.raises(poplib.error_proto) as e:
        second.pass_(PASSWORD)
    assert e.value.args[0] == b"-ERR [IN-USE] mailbox is in use by another session"
    for n in (1, 2, 3):
        p.dele(n)
    assert p.quit().startswith(b"+OK")
    assert os.listdir(server.maildirs[box] / "cur") == os.listdir(server.maildirs[box] / "new") == []
    second.user(box)
    assert second.pass_(PASSWORD).startswith(b"+OK 0 messages")
    second.quit()


def test_bad_password_and_unknown_login_get_the_same_delayed_reply(server: Server) -> None:
    replies = []
    for login, password in ((server.boxes[0], "wrong"), ("ex9-0042", PASSWORD)):
        p = server.connect()
        p.user(login)
        t0 = time.monotonic()
        with pytest.raises(poplib.error_proto) as e:
            p.pass_(password)
        assert time.monotonic() - t0 >= 1.0  # control/pop3faildelay's default
        replies.append(e.value.args[0])
        p.quit()
    assert replies == [b"-ERR [AUTH] authentication failed"] * 2
    assert "auth failed login=ex9-0042" in server.log.read_text()


def test_auth_plain(server: Server) -> None:
    box = server.boxes[0]
    p = server.connect()
    token = base64.b64encode(f"\0{box}\0{PASSWORD}".encode()).decode()
    assert p._shortcmd(f"AUTH PLAIN {token}").startswith(b"+OK")
    p.quit()
    p = server.connect()
    p._putcmd("AUTH PLAIN")
    assert p._getline()[0] == b"+ "
    assert p._shortcmd(token).startswith(b"+OK")
    p.quit()


def test_address_login(server: Server) -> None:
    server.deliver(server.boxes[1], message(7))
    p = server.login("joe@example.com")
    assert p.stat()[0] == 1
    p.quit()


def test_stls(server: Server) -> None:
    p = server.connect()
    assert "STLS" in p.capa()
    p.stls(server.client_context())
    assert "STLS" not in p.capa()
    p.user(server.boxes[0])
    assert p.pass_(PASSWORD).startswith(b"+OK")
    p.quit()


def test_pop3s(server: Server) -> None:
    p = poplib.POP3_SSL("127.0.0.1", server.pop3s_port, context=server.client_context(), timeout=60)
    assert "STLS" not in p.capa() and "USER" in p.capa()
    p.user(server.boxes[0])
    assert p.pass_(PASSWORD).startswith(b"+OK")
    p.quit()


def test_log_lines(server: Server) -> None:
    p = server.login(server.boxes[5])
    p.quit()
    text = server.log.read_text()
    assert f"login {server.boxes[5]} ip=127.0.0.1" in text
    assert f"logout {server.boxes[5]} ip=127.0.0.1 retrieved=0 deleted=0" in text


# ----------------------------------------------------------------------------- fetchmail

def fetchmail(server: Server, tmp: Path, box: str, keep: bool) -> tuple[int, str]:
    exe = require_tool("fetchmail")
    out = tmp / "delivered"
    rc = tmp / "fetchmailrc"
    ca = tmp / "ca.pem"
    server.ca.cert_pem.write_to_path(str(ca))
    rc.write_text(
        f'set no syslog\n'
        f'poll 127.0.0.1 protocol pop3 port {server.port} uidl\n'
        f'  user "{box}" there with password "{PASSWORD}" is "{pwd.getpwuid(os.geteuid()).pw_name}" here\n'
        f'  {"keep" if keep else "nokeep fetchall"}\n'
        f'  sslproto "tls1.2+" sslcertck sslcertfile "{ca}" sslcommonname "localhost"\n'
        f'  mda "cat >> {out}"\n')
    rc.chmod(0o600)
    env = {**os.environ, "HOME": str(tmp), "FETCHMAILHOME": str(tmp)}
    p = subprocess.run([exe, "-f", str(rc), "--idfile", str(tmp / "ids"), "--nodetach", "-v"],
                       capture_output=True, env=env, timeout=120)
    return p.returncode, p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")


def test_fetchmail_uidl_keep_then_delete(server: Server, tmp_path: Path) -> None:
    require_tool("fetchmail")
    box = server.boxes[8]
    for i in range(3):
        server.deliver(box, message(i, b".starts with a dot\nbody\n"))
    code, out = fetchmail(server, tmp_path, box, keep=True)
    assert code == 0, out
    assert (tmp_path / "delivered").read_bytes().count(b"Subject: message") == 3
    assert b".starts with a dot\n" in (tmp_path / "delivered").read_bytes()
    code, out = fetchmail(server, tmp_path, box, keep=True)  # UIDL: nothing new
    assert code == 1, out
    server.deliver(box, message(3))
    code, out = fetchmail(server, tmp_path, box, keep=False)  # everything, then delete
    assert code == 0, out
    assert (tmp_path / "delivered").read_bytes().count(b"Subject: message") == 7
    assert os.listdir(server.maildirs[box] / "cur") == []


def test_pqmail_serve_runs_the_same_pop3_workers(server: Server, tmp_path: Path) -> None:
    """`pqmail serve --pop3` on the same tree: mail is there, and the box lock spans both servers."""
    box = server.boxes[5]
    server.deliver(box, message(9))
    port = free_port()
    log = tmp_path / "serve.log"
    pem = server.root / "control" / "servercert.pem"
    if os.geteuid() == 0:  # serve's workers load the key after dropping privileges: qmail's usual owner
        owner = pwd.getpwnam(mail_owner())
        os.chown(pem, owner.pw_uid, owner.pw_gid)
    with open(log, "wb") as logf:
        proc = subprocess.Popen([*PQMAIL, "serve", "--root", str(server.root), "--pop3", f"127.0.0.1:{port}",
                                 "--pop3s", f"127.0.0.1:{free_port()}",
                                 "--no-smtp", "--no-odmr", "--no-serialmail", "--workers", "1",
                                 "--pidfile", str(tmp_path / "serve.pid")],
                                stdout=logf, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, log)
        p = poplib.POP3("127.0.0.1", port, timeout=60)
        p.user(box)
        p.pass_(PASSWORD)
        assert p.stat()[0] == 1
        with pytest.raises(poplib.error_proto) as e:
            server.login(box)  # the other server
        assert b"[IN-USE]" in e.value.args[0]
        p.quit()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        os.chown(pem, os.geteuid(), os.getegid())
    assert proc.returncode == 0 and "Traceback" not in log.read_text(), log.read_text()


# ----------------------------------------------------------------- limits (last: they change settings)

def reload(server: Server) -> None:
    """SIGHUP, then wait until both workers logged that they re-read control/."""
    before = server.log.read_text().count("reloaded control files")
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while server.log.read_text().count("reloaded control files") < before + 2:
        assert time.monotonic() < deadline, server.log.read_text()
        time.sleep(0.05)  # polling the log for the observable event, with a deadline


def test_idle_timeout_and_session_limits(server: Server) -> None:
    control = server.root / "control"
    (control / "timeoutpop3d").write_text("1\n")
    (control / "concurrencypop3perip").write_text("1\n")
    reload(server)
    try:
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(3)]
        greetings = [s.recv(200) for s in socks]
        refused = [g for g in greetings if g.startswith(b"-ERR [SYS/TEMP] too many sessions")]
        # the 2 worker processes count together: one session from our address in all
        assert len(refused) >= 2
        kept = next((s for s, g in zip(socks, greetings, strict=True) if g.startswith(b"+OK")), None)
        deadline = time.monotonic() + 30
        while kept is None:  # sessions of earlier tests may still be ending in the workers
            assert time.monotonic() < deadline, "every session refused"
            s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            socks.append(s)
            if s.recv(200).startswith(b"+OK"):
                kept = s
            time.sleep(0.05)
        t0 = time.monotonic()
        assert kept.recv(200) == b"-ERR autologout: idle for too long\r\n"
        assert time.monotonic() - t0 >= 0.5
        assert kept.recv(200) == b""  # and the server closed the connection
        for s in socks:
            s.close()
    finally:
        (control / "timeoutpop3d").unlink()
        (control / "concurrencypop3perip").unlink()
        reload(server)
