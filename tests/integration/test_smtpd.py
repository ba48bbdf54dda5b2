"""pqmail smtpd as a subprocess on the seed tree, driven by smtplib, swaks and raw sockets."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PQMAIL, mail_owner, require_tool, run_pqmail
from pqmail.config.control import load_control
from pqmail.paths import Root
from pqmail.queue.store import Queue
from pqmail.routing import rewrite_recipient

PASSWORD = "correct horse 42"
RELAY_TRICKS = [
    "<joe@other.test>",
    "joe@other.test",
    "<JOE@OTHER.TEST>",
    "<@example.com:joe@other.test>",
    "<@example.com,@mx.isp.test:joe@other.test>",
    '<"joe@other.test"@example.com>',
    "<joe\\@other.test@example.com>",
    "<joe@other.test@example.com>",
    "<other.test!joe@example.com>",
    "<joe@other.test.>",
    "<joe@example.com.>",
    "<joe@[192.0.2.99]>",
    "<joe%other.test@[192.0.2.99]>",
    "<joe@notexample.com>",
    "<joe@example.com.other.test>",
    "<joe@other.test%example.com>",
    "<joe@other.test> <joe@example.com",  # qmail takes the text after the first '<'
]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def outside_address() -> str:
    """A non-loopback address of this host (the one a default route would use), or skip."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP: no packet is sent
        except OSError:
            pytest.skip("no non-loopback IPv4 address")
        addr = s.getsockname()[0]
    if addr.startswith("127."):
        pytest.skip("no non-loopback IPv4 address")
    return addr


class Smtpd:
    """A running ``pqmail smtpd``; ``log()`` is its stderr so far."""

    def __init__(self, root: Path, logfile: Path, listeners: list[tuple[str, str, int]]) -> None:
        self.root = root
        self.logfile = logfile
        self.listeners = listeners
        self.ports = {kind: port for kind, _, port in reversed(listeners)}
        self.port = self.ports.get("smtp", 0)
        args = [*PQMAIL, "smtpd", "--root", str(root)]
        for kind, host, port in listeners:
            args += ["--listen" if kind == "smtp" else f"--{kind}", f"{host}:{port}"]
        self.out = open(logfile, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(args, stdout=self.out, stderr=self.out)
        deadline = time.monotonic() + 30
        for _, host, port in listeners:
            while True:
                assert self.proc.poll() is None, f"smtpd exited {self.proc.returncode}: {self.log()}"
                assert time.monotonic() < deadline, "smtpd did not start listening"
                try:
                    socket.create_connection((host, port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.02)  # polling for the port, not synchronising on time
        # each probe above was a session; wait until it is over, so that it counts for no limit
        probes = sum(1 for kind, _, _ in listeners if kind != "smtps")
        deadline = time.monotonic() + 30
        while self.log().count("session ") < probes:
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.02)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while needle not in (text := self.log()):
            assert time.monotonic() < deadline, f"{needle!r} never logged:\n{text}"
            assert self.proc.poll() is None, text
            time.sleep(0.02)
        return text

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        finally:
            self.out.close()
        return code

    def queue(self) -> Queue:
        return Queue(self.root / "queue")


@pytest.fixture
def tls(seed) -> trustme.CA:
    """A test CA, and control/servercert.pem for mx.isp.test/127.0.0.1 issued by it."""
    ca = trustme.CA()
    write_cert(seed["root"] / "control" / "servercert.pem", ca.issue_cert("mx.isp.test", "127.0.0.1"))
    return ca


def write_cert(path: Path, cert: trustme.LeafCert) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(cert.private_key_and_cert_chain_pem.bytes())
    path.chmod(0o600)
    if os.geteuid() == 0:  # qmail convention: readable by the user smtpd runs as, nobody else
        shutil.chown(path, mail_owner())


@pytest.fixture
def box(seed) -> str:
    out = run_pqmail("box", "add", "ex1", "--root", str(seed["root"]), input=PASSWORD.encode() + b"\n")
    return out.stdout.decode().split()[0]


@pytest.fixture
def start(seed, mailtmp) -> Iterator[Callable[..., Smtpd]]:
    servers: list[Smtpd] = []

    def start(control: dict[str, str] | None = None, kinds: tuple[str, ...] = ("smtp",),
              extra: tuple[tuple[str, str], ...] = ()) -> Smtpd:
        for name, text in (control or {}).items():
            (seed["root"] / "control" / name).write_text(text)
        listeners = [(k, "127.0.0.1", free_port()) for k in kinds]
        listeners += [(k, host, free_port(host)) for k, host in extra]
        srv = Smtpd(seed["root"], mailtmp / f"smtpd{len(servers)}.log", listeners)
        servers.append(srv)
        return srv

    yield start
    results = [(srv.stop(), srv.log()) for srv in servers]  # stop them all before judging any
    for code, log in results:
        assert code == 0, log
        assert "Traceback" not in log and "internal error" not in log, log


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def queued(srv: Smtpd) -> list[tuple[int, str, list[str]]]:
    q = srv.queue()
    return [(mid, (env := q.read_todo(mid)).sender, env.recipients) for mid in q.list_todo()]


def drain(root: Path) -> None:
    run_pqmail("send", "--drain", "--root", str(root))


def destination(root: Path, rcpt: str) -> str:
    """``local`` or ``remote``: what pqmail send will make of a queued recipient (qmail's rewrite)."""
    return "local" if rewrite_recipient(load_control(Root(root)), rcpt).is_local else "remote"


class Raw:
    """A line-level SMTP client on a plain socket, for what smtplib will not send."""

    def __init__(self, port: int, timeout: float = 20, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self) -> bytes:
        """One whole (possibly multi-line) reply, lines joined with LF."""
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return b"\n".join(lines)

    def cmd(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def rest(self) -> bytes:
        """Everything until the server closes the connection."""
        data = self.buf
        while chunk := self.sock.recv(65536):
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


MESSAGE = b"From: alice@remote.test\r\nSubject: hello\r\n\r\nHello, Joe.\r\n.leading dot\r\n"


# ----------------------------------------------------------------------------- accepting mail

def test_mail_for_rcpthosts_is_queued_with_qmails_received_line(seed, start):
    srv = start()
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        code, banner = s.ehlo("client.example")
        assert code == 250
        assert banner.split(b"\n")[0] == b"mx.isp.test"
        for ext in ("pipelining", "8bitmime", "size", "enhancedstatuscodes"):
            assert s.has_extn(ext), ext
        assert not s.has_extn("auth") and not s.has_extn("starttls")  # no certificate, no TLS
        assert s.mail("alice@remote.test") == (250, b"2.1.0 ok")
        assert s.rcpt("joe@example.com") == (250, b"2.1.5 ok")
        assert s.rcpt("Someone@Sub.Example.COM")[0] == 250
        code, text = s.data(MESSAGE)
    assert code == 250
    words = text.decode().split()
    assert words[:2] == ["2.0.0", "ok"] and abs(int(words[2]) - time.time()) < 60 and words[3] == "qp"
    mid = int(words[4])
    assert queued(srv) == [(mid, "alice@remote.test", ["joe@example.com", "Someone@Sub.Example.COM"])]
    stored = srv.queue().message_path(mid).read_bytes()
    lines = stored.split(b"\n")
    assert lines[0].startswith(b"Received: (qmail ") and b" invoked from network); " in lines[0]
    assert lines[1] == b"Received: from unknown (HELO client.example) (127.0.0.1)"
    assert lines[2].startswith(b"  by mx.isp.test with SMTP; ") and lines[2].endswith(b" -0000")
    assert stored.endswith(b"\nFrom: alice@remote.test\nSubject: hello\n\nHello, Joe.\n.leading dot\n")
    log = srv.wait_log("session 127.0.0.1 smtp helo=client.example")
    assert f"msg {mid} accepted: from 127.0.0.1 helo=client.example sender=<alice@remote.test> " \
           f"rcpts=<joe@example.com>,<Someone@Sub.Example.COM> size=" in log


def test_accepted_mail_is_delivered_into_the_maildir(seed, start):
    srv = start()
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.sendmail("alice@remote.test", ["joe@example.com"], MESSAGE)
    drain(seed["root"])
    new = list((seed["pop"] / "ex1-0001" / "new").iterdir())
    assert len(new) == 1
    text = new[0].read_bytes()
    assert text.startswith(b"Return-Path: <alice@remote.test>\nDelivered-To: example.com-joe@example.com\n")
    assert b"\nReceived: from unknown (HELO " in text and text.endswith(b"\n\nHello, Joe.\n.leading dot\n")


def test_swaks_sends_and_pipelines(seed, start):
    swaks = require_tool("swaks")
    srv = start()
    for extra in ([], ["--pipeline"]):
        p = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(srv.port), "--from",
                            "alice@remote.test", "--to", "joe@example.com", "--helo", "swaks.test",
                            "--body", "via swaks", *extra], capture_output=True, timeout=60)
        assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
        assert b"<-  250 2.0.0 ok " in p.stdout
    p = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(srv.port), "--from", "a@remote.test",
                        "--to", "joe@other.test", "--quit-after", "RCPT"], capture_output=True, timeout=60)
    assert p.returncode != 0
    assert b"<** 553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)" in p.stdout
    assert [r for _, _, r in queued(srv)] == [["joe@example.com"], ["joe@example.com"]]


def test_greeting_and_qmail_replies(seed, start):
    srv = start({"smtpgreeting": "mx.isp.test NO UCE\n"})
    c = Raw(srv.port)
    assert c.reply() == b"220 mx.isp.test NO UCE ESMTP"
    assert c.cmd(b"HELO x") == b"250 mx.isp.test NO UCE"
    assert c.cmd(b"RCPT TO:<joe@example.com>") == b"503 5.5.1 MAIL first (#5.5.1)"
    assert c.cmd(b"DATA") == b"503 5.5.1 MAIL first (#5.5.1)"
    assert c.cmd(b"MAIL FROM:<a@b.test>") == b"250 2.1.0 ok"
    assert c.cmd(b"DATA") == b"503 5.5.1 RCPT first (#5.5.1)"
    assert c.cmd(b"mail from:<>") == b"250 2.1.0 ok"  # verbs ignore case; a second MAIL restarts
    assert c.cmd(b"RSET") == b"250 2.0.0 flushed"
    assert c.cmd(b"RCPT TO:<joe@example.com>") == b"503 5.5.1 MAIL first (#5.5.1)"
    assert c.cmd(b"NOOP") == b"250 2.0.0 ok"
    assert c.cmd(b"VRFY joe") == b"252 2.0.0 send some mail, i'll try my best"
    assert c.cmd(b"EXPN joe") == b"502 5.5.1 unimplemented (#5.5.1)"
    assert c.cmd(b"AUTH PLAIN") == b"503 5.5.1 send EHLO first (#5.5.1)"
    assert c.cmd(b"STARTTLS") == b"502 5.5.1 unimplemented (#5.5.1)"
    assert c.cmd(b"QUIT") == b"221 2.0.0 mx.isp.test NO UCE"
    assert c.rest() == b""


# ----------------------------------------------------------------------------- relay control

def test_every_relay_trick_is_refused_and_nothing_queued(seed, start):
    srv = start()
    c = Raw(srv.port)
    c.reply()
    assert c.cmd(b"EHLO relay.tester").startswith(b"250-")
    assert c.cmd(b"MAIL FROM:<tester@relay.test>") == b"250 2.1.0 ok"
    for trick in RELAY_TRICKS:
        reply = c.cmd(b"RCPT TO:" + trick.encode())
        assert reply.startswith(b"553 5."), (trick, reply)
    assert c.cmd(b"DATA") == b"503 5.5.1 RCPT first (#5.5.1)"
    assert c.cmd(b"QUIT").startswith(b"221")
    assert queued(srv) == []


def test_tricks_aimed_at_our_domains_stay_local(seed, start):
    srv = start()
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.ehlo("x")
        s.docmd("MAIL", "FROM:<>")
        assert s.docmd("RCPT", "TO:<user%other.test@example.com>")[0] == 250  # mail for example.com
        assert s.docmd("RCPT", "TO:<@other.test:joe@example.com>")[0] == 250  # route dropped
        assert s.data(MESSAGE)[0] == 250
        s.docmd("MAIL", "FROM:<>")
        assert s.docmd("RCPT", "TO:<joe@[127.0.0.1]>")[0] == 250  # our IP literal: localiphost
        assert s.data(MESSAGE)[0] == 250
    assert sorted(r for _, _, r in queued(srv)) == [["joe@mx.isp.test"],
                                                     ["user%other.test@example.com", "joe@example.com"]]
    for _, _, rcpts in queued(srv):
        assert [destination(seed["root"], r) for r in rcpts] == ["local"] * len(rcpts)


def test_relayclients_may_relay_and_the_file_is_reread(seed, start):
    srv = start()
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.mail("alice@remote.test")
        assert s.rcpt("joe@other.test")[0] == 553
    (seed["root"] / "control" / "relayclients").write_text("# the office\n10.0.0.0/8\n127.0.0.1\n")
    deadline = time.monotonic() + 20
    while True:  # re-read within a second of the change, without a restart
        with smtplib.SMTP("127.0.0.1", srv.port) as s:
            s.mail("alice@remote.test")
            if s.rcpt("joe@other.test")[0] == 250:
                assert s.data(MESSAGE)[0] == 250
                break
        assert time.monotonic() < deadline, "relayclients was not re-read"
    assert [r for _, _, r in queued(srv)] == [["joe@other.test"]]
    assert destination(seed["root"], "joe@other.test") == "remote"


def test_rcpthosts_is_reread_when_it_changes(seed, start):
    srv = start()
    rcpthosts = seed["root"] / "control" / "rcpthosts"
    rcpthosts.write_text(rcpthosts.read_text() + "new.test\n")
    deadline = time.monotonic() + 20
    while True:
        with smtplib.SMTP("127.0.0.1", srv.port) as s:
            s.mail("alice@remote.test")
            if s.rcpt("joe@new.test")[0] == 250:
                break
        assert time.monotonic() < deadline


def test_badmailfrom_badrcptto_maxrcpt(seed, start):
    srv = start({"badmailfrom": "@spam.test\n", "badrcptto": "nobody@example.com\n", "maxrcpt": "2\n"})
    c = Raw(srv.port)
    c.reply()
    assert c.cmd(b"MAIL FROM:<x@SPAM.test>") == b"250 2.1.0 ok"  # qmail refuses at RCPT
    assert c.cmd(b"RCPT TO:<joe@example.com>") == (
        b"553 5.7.1 sorry, your envelope sender is in my badmailfrom list (#5.7.1)")
    assert c.cmd(b"MAIL FROM:<x@ok.test>") == b"250 2.1.0 ok"
    assert c.cmd(b"RCPT TO:<Nobody@Example.com>") == (
        b"553 5.7.1 sorry, mail to that recipient is not accepted (#5.7.1)")
    assert c.cmd(b"RCPT TO:<a@example.com>") == b"250 2.1.5 ok"
    assert c.cmd(b"RCPT TO:<b@example.com>") == b"250 2.1.5 ok"
    assert c.cmd(b"RCPT TO:<c@example.com>") == b"452 4.5.3 too many recipients (#4.5.3)"
    c.close()


# ----------------------------------------------------------------------------- TLS and AUTH

def test_starttls_then_auth_relays(seed, start, tls, box):
    srv = start()
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.ehlo("client.test")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        assert s.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{box}\0{PASSWORD}".encode()).decode()) == (
            538, b"5.7.11 Encryption required for requested authentication mechanism")
        s.starttls(context=client_context(tls))
        s.ehlo("client.test")
        assert s.has_extn("auth") and not s.has_extn("starttls")
        assert "PLAIN" in s.esmtp_features["auth"] and "LOGIN" in s.esmtp_features["auth"]
        assert s.login(box, PASSWORD) == (235, b"2.7.0 authentication successful")
        s.mail("someone@example.com")
        assert s.rcpt("friend@other.test")[0] == 250
        assert s.data(MESSAGE)[0] == 250
    (mid, _, rcpts), = queued(srv)
    assert rcpts == ["friend@other.test"]
    assert b"\n  by mx.isp.test with ESMTPSA; " in srv.queue().message_path(mid).read_bytes()
    log = srv.wait_log(f"auth={box} ")
    assert "tls=yes" in log and PASSWORD not in log
    assert destination(seed["root"], "friend@other.test") == "remote"


@pytest.mark.parametrize("scheme", ["sha512_crypt", "md5_crypt", "bcrypt"])
def test_auth_accepts_imported_crypt_and_bcrypt_hashes(seed, start, tls, box, scheme):
    """Hashes imported from another system (pqmail passwd --hash) work for SMTP AUTH as for POP3,
    also once smtpd runs as the mail user, when the interpreter's own files may be unreadable."""
    import warnings

    import bcrypt

    with warnings.catch_warnings():  # passlib's crypt backend imports the deprecated crypt module
        warnings.simplefilter("ignore", DeprecationWarning)
        from passlib import hash as ph
    stored = (bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode() if scheme == "bcrypt"
              else getattr(ph, scheme).hash(PASSWORD))
    run_pqmail("passwd", box, "--hash", stored, "--root", str(seed["root"]))
    srv = start()
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.starttls(context=client_context(tls))
        s.ehlo("client.test")
        assert s.login(box, PASSWORD) == (235, b"2.7.0 authentication successful")
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.starttls(context=client_context(tls))
        s.ehlo("client.test")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login(box, PASSWORD + "!")


def test_auth_login_and_failures(seed, start, tls, box):
    srv = start()
    s = smtplib.SMTP("127.0.0.1", srv.port)
    s.starttls(context=client_context(tls))
    s.ehlo("x")
    s.user, s.password = box, PASSWORD
    assert s.auth("LOGIN", s.auth_login) == (235, b"2.7.0 authentication successful")
    s.quit()
    c = Raw(srv.port)
    c.reply()
    c.cmd(b"EHLO x")
    assert c.cmd(b"STARTTLS").startswith(b"220 2.0.0")
    c.sock = client_context(tls).wrap_socket(c.sock, server_hostname="mx.isp.test")
    c.cmd(b"EHLO x")
    bad = base64.b64encode(f"\0{box}\0wrong".encode())
    assert c.cmd(b"AUTH PLAIN " + bad) == b"535 5.7.8 authentication failed (#5.7.8)"
    unknown = base64.b64encode(b"\0no-such-box\0" + PASSWORD.encode())
    assert c.cmd(b"AUTH PLAIN " + unknown) == b"535 5.7.8 authentication failed (#5.7.8)"
    assert c.cmd(b"AUTH PLAIN !!!") == b"501 5.5.2 cannot decode base64 (#5.5.2)"
    assert c.cmd(b"AUTH PLAIN " + bad) == b"421 4.7.0 too many authentication failures (#4.7.0)"
    assert c.rest() == b""
    c.close()  # the TLS layer waits for the client's close_notify before the session ends
    srv.wait_log("end=auth-failures")


def test_submission_requires_auth_for_every_message(seed, start, tls, box):
    srv = start(kinds=("smtp", "submission"))
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"]) as s:
        s.ehlo("x")
        assert s.mail("a@example.com") == (530, b"5.7.0 Authentication required")
        s.starttls(context=client_context(tls))
        s.ehlo("x")
        assert s.mail("a@example.com") == (530, b"5.7.0 Authentication required")
        assert s.rcpt("joe@example.com")[0] == 530
        s.login(box, PASSWORD)
        assert s.sendmail("a@example.com", ["b@other.test"], MESSAGE) == {}
    assert [r for _, _, r in queued(srv)] == [["b@other.test"]]


def test_smtps_is_implicit_tls_with_auth(seed, start, tls, box):
    srv = start(kinds=("smtps",))
    with smtplib.SMTP_SSL("127.0.0.1", srv.ports["smtps"], context=client_context(tls)) as s:
        s.ehlo("x")
        assert s.has_extn("auth") and not s.has_extn("starttls")
        assert s.mail("a@example.com")[0] == 530
        s.login(box, PASSWORD)
        assert s.sendmail("a@example.com", ["b@other.test"], MESSAGE) == {}
        assert s.docmd("STARTTLS") == (503, b"5.5.1 TLS already active (#5.5.1)")
    (mid, _, rcpts), = queued(srv)
    assert rcpts == ["b@other.test"]
    assert b"\n  by mx.isp.test with ESMTPSA; " in srv.queue().message_path(mid).read_bytes()


def test_sni_chooses_the_per_host_certificate(seed, start, tls):
    write_cert(seed["root"] / "control" / "servercert.d" / "mail.customer.test.pem",
               tls.issue_cert("mail.customer.test"))
    srv = start()
    for name, expected in (("mail.customer.test", "mail.customer.test"), ("mx.isp.test", "mx.isp.test"),
                           ("unknown.test", "mx.isp.test")):
        c = Raw(srv.port)
        c.reply()
        c.cmd(b"EHLO x")
        assert c.cmd(b"STARTTLS") == b"220 2.0.0 ready to start TLS"
        ctx = client_context(tls)
        ctx.check_hostname = False
        c.sock = ctx.wrap_socket(c.sock, server_hostname=name)
        sans = [v for k, v in c.sock.getpeercert()["subjectAltName"] if k == "DNS"]
        assert sans == [expected]
        assert b"AUTH PLAIN LOGIN" in c.cmd(b"EHLO x")
        c.cmd(b"QUIT")
        c.close()


def test_starttls_discards_plaintext_pipelined_after_it(seed, start, tls):
    srv = start()
    c = Raw(srv.port)
    c.reply()
    c.cmd(b"EHLO x")
    c.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
    assert c.reply() == b"220 2.0.0 ready to start TLS"
    c.sock = client_context(tls).wrap_socket(c.sock, server_hostname="mx.isp.test")
    assert c.cmd(b"RCPT TO:<joe@example.com>") == b"503 5.5.1 MAIL first (#5.5.1)"
    c.close()


# ----------------------------------------------------------------------------- DATA and limits

def test_oversized_message_gets_552_and_nothing_is_queued(seed, start):
    srv = start({"databytes": "1000\n"})
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.ehlo("x")
        assert s.esmtp_features["size"] == "1000"
        assert s.docmd("MAIL", "FROM:<a@b.test> SIZE=1500")[0] == 250  # might fit as stored
        assert s.docmd("MAIL", "FROM:<a@b.test> SIZE=2001") == (
            552, b"5.3.4 sorry, that message size exceeds my databytes limit (#5.3.4)")
        s.mail("a@b.test")
        s.rcpt("joe@example.com")
        assert s.data(b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n") == (
            552, b"5.3.4 sorry, that message size exceeds my databytes limit (#5.3.4)")
        assert queued(srv) == []
        exact = b"S: x\r\n\r\n" + b"y" * 993 + b"\r\n"  # 1000 bytes as stored (LF line ends)
        assert s.sendmail("a@b.test", ["joe@example.com"], exact) == {}  # the session goes on
    assert len(queued(srv)) == 1


def test_client_dropping_mid_data_leaves_nothing_queued(seed, start):
    srv = start()
    c = Raw(srv.port)
    c.reply()
    c.cmd(b"HELO x")
    c.cmd(b"MAIL FROM:<a@b.test>")
    c.cmd(b"RCPT TO:<joe@example.com>")
    assert c.cmd(b"DATA") == b"354 go ahead"
    c.send(b"Subject: cut\r\n\r\n" + b"z" * 100_000 + b"\r\n.")  # no CRLF after the dot
    c.close()
    srv.wait_log("end=drop-in-data")
    assert queued(srv) == []
    q = srv.root / "queue"
    assert [p for d in ("pid", "intd", "todo", "mess") for p in (q / d).rglob("*") if p.is_file()] == []


def test_bare_lf_and_smuggling_attempts_are_refused(seed, start):
    srv = start()
    for body in (b"Subject: x\r\n\r\nline\nmore\r\n.\r\n",
                 b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@x.test>\nRCPT TO:<joe@example.com>\nDATA\n",
                 b"Subject: x\r\n\r\nhi\r\n.\nMAIL FROM:<evil@x.test>\r\n"):
        c = Raw(srv.port)
        c.reply()
        c.cmd(b"HELO x")
        c.cmd(b"MAIL FROM:<a@b.test>")
        c.cmd(b"RCPT TO:<joe@example.com>")
        assert c.cmd(b"DATA") == b"354 go ahead"
        c.send(body + b"\r\n.\r\nRSET\r\n")
        assert c.reply() == b"451 4.5.0 See https://cr.yp.to/docs/smtplf.html."
        assert c.rest() == b""  # closed: nothing after the 451 is read
    # a CR alone is data, and the end is CRLF.CRLF only (smtplib would turn a lone CR into CRLF)
    c = Raw(srv.port)
    c.reply()
    c.send(b"HELO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\n")
    assert [c.reply() for _ in range(4)][-1] == b"354 go ahead"
    c.send(b"S: x\r\n\r\na\r.\rb\r\n.\r\r\n.\r\n")
    assert c.reply().startswith(b"250 2.0.0 ok ")
    c.close()
    (mid, _, _), = queued(srv)
    assert srv.queue().message_path(mid).read_bytes().endswith(b"\n\na\r.\rb\n\r\n")


def test_too_many_hops(seed, start):
    srv = start()
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.mail("a@b.test")
        s.rcpt("joe@example.com")
        assert s.data(b"Received: x\r\n" * 99 + b"Delivered-To: y\r\n\r\nloop\r\n") == (
            554, b"5.4.6 too many hops, this message is looping (#5.4.6)")
    assert queued(srv) == []


def test_pipelining(seed, start):
    srv = start()
    c = Raw(srv.port)
    c.reply()
    c.send(b"EHLO pipe.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<joe@example.com>\r\n"
           b"RCPT TO:<x@other.test>\r\nDATA\r\n")
    assert c.reply().startswith(b"250-mx.isp.test\n250-PIPELINING")
    assert [c.reply() for _ in range(4)] == [b"250 2.1.0 ok", b"250 2.1.5 ok", b"553 5.7.1 sorry, that "
                                             b"domain isn't in my list of allowed rcpthosts (#5.7.1)",
                                             b"354 go ahead"]
    c.send(b"Subject: one\r\n\r\n1\r\n.\r\nMAIL FROM:<c@d.test>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\n")
    assert c.reply().startswith(b"250 2.0.0 ok ")
    assert [c.reply() for _ in range(3)] == [b"250 2.1.0 ok", b"250 2.1.5 ok", b"354 go ahead"]
    c.send(b".\r\nQUIT\r\n")  # an empty message
    assert c.reply().startswith(b"250 2.0.0 ok ")
    assert c.reply() == b"221 2.0.0 mx.isp.test"
    msgs = {sender: srv.queue().message_path(mid).read_bytes().split(b"\n", 3)[3]
            for mid, sender, _ in queued(srv)}
    assert msgs == {"a@b.test": b"Subject: one\n\n1\n", "c@d.test": b""}


def test_malformed_input_gets_errors_and_the_server_goes_on(seed, start):
    srv = start()
    c = Raw(srv.port)
    c.reply()
    assert c.cmd(b"\x00\x01\x02\xff\xfe garbage \x80") == b"502 5.5.1 unimplemented (#5.5.1)"
    assert c.cmd(b"") == b"502 5.5.1 unimplemented (#5.5.1)"
    assert c.cmd(b"HELO \x00evil\x00") == b"250 mx.isp.test"
    assert c.cmd(b"MAIL FROM:<a\x00b@c.test>") == b"555 5.5.4 syntax error (#5.5.4)"
    assert c.cmd(b"MAIL FROM:<" + b"a" * 950 + b">") == b"555 5.5.4 syntax error (#5.5.4)"
    assert c.cmd(b"MAIL") == b"555 5.5.4 syntax error (#5.5.4)"
    assert c.cmd(b"MAIL FROM:<a@b.test>") == b"250 2.1.0 ok"
    assert c.cmd(b"RCPT TO:<joe@\xff\xfe.example.com>").startswith(b"553 ")
    assert c.cmd(b"RCPT TO:") == b"555 5.5.4 syntax error (#5.5.4)"
    assert c.cmd(b"X" * 2000) == b"500 5.5.2 line too long (#5.5.2)"
    assert c.cmd(b"NOOP " + b"y" * 1_000_000) == b"500 5.5.2 line too long (#5.5.2)"
    assert c.cmd(b"NOOP") == b"250 2.0.0 ok"
    for _ in range(8):  # with the two above: ten unknown commands are answered
        assert c.cmd(b"BOGUS") == b"502 5.5.1 unimplemented (#5.5.1)"
    assert c.cmd(b"BOGUS") == b"421 4.7.0 too many unrecognized commands (#4.7.0)"
    assert c.rest() == b""
    raw = Raw(srv.port)
    raw.reply()
    raw.send(os.urandom(200_000))
    raw.close()
    with smtplib.SMTP("127.0.0.1", srv.port) as s:  # the next client is served
        assert s.sendmail("a@b.test", ["joe@example.com"], MESSAGE) == {}
    assert srv.proc.poll() is None


# ----------------------------------------------------------------------------- sessions

def test_queue_failure_is_451_and_nothing_is_queued(seed, start):
    srv = start()
    pid_dir = seed["root"] / "queue" / "pid"
    mode = pid_dir.stat().st_mode
    pid_dir.chmod(0)
    try:
        with smtplib.SMTP("127.0.0.1", srv.port) as s:
            s.mail("a@b.test")
            s.rcpt("joe@example.com")
            assert s.data(MESSAGE) == (451, b"4.3.0 qq write error or disk full (#4.3.0)")
    finally:
        pid_dir.chmod(mode)
    assert queued(srv) == []
    assert "queue error: session 127.0.0.1: " in srv.log()
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        assert s.sendmail("a@b.test", ["joe@example.com"], MESSAGE) == {}


def test_total_sessions_limit_and_session_time_limit(seed, start):
    srv = start({"maxsessions": "1\n", "maxsessiontime": "1\n"})
    first = Raw(srv.port)
    assert first.reply().startswith(b"220 ")
    second = Raw(srv.port)
    assert second.reply() == b"421 4.3.2 too many sessions, try again later (#4.3.2)"
    first.cmd(b"HELO x")  # busy or not, the session ends after maxsessiontime
    assert first.rest() == b"421 4.4.2 session time limit reached (#4.4.2)\r\n"
    srv.wait_log("end=session-time")


def test_sighup_rereads_the_control_files(seed, start):
    srv = start()
    srv.proc.send_signal(signal.SIGHUP)
    srv.wait_log("control files re-read")


def test_a_replaced_certificate_is_used_for_new_sessions(seed, start, tls):
    srv = start()
    write_cert(seed["root"] / "control" / "servercert.pem", tls.issue_cert("mx2.isp.test"))
    deadline = time.monotonic() + 20
    while True:
        c = Raw(srv.port)
        c.reply()
        c.cmd(b"EHLO x")
        c.cmd(b"STARTTLS")
        ctx = client_context(tls)
        ctx.check_hostname = False
        c.sock = ctx.wrap_socket(c.sock, server_hostname="mx.isp.test")
        sans = [v for k, v in c.sock.getpeercert()["subjectAltName"] if k == "DNS"]
        c.cmd(b"QUIT")
        c.close()
        if sans == ["mx2.isp.test"]:
            break
        assert time.monotonic() < deadline, sans


def test_sessions_per_ip_limit(seed, start):
    ip = outside_address()  # loopback clients are exempt, so talk to the host's own outside address
    srv = start({"maxsessionsperip": "2\n"}, extra=(("smtp", ip),))
    port = next(p for _, host, p in srv.listeners if host == ip)
    first, second = Raw(port, host=ip), Raw(port, host=ip)
    assert first.reply().startswith(b"220 ") and second.reply().startswith(b"220 ")
    third = Raw(port, host=ip)
    assert third.reply() == b"421 4.7.0 too many sessions from your address, try again later (#4.7.0)"
    assert third.rest() == b""
    local = [Raw(srv.port) for _ in range(3)]  # loopback: exempt
    assert all(c.reply().startswith(b"220 ") for c in local)
    first.cmd(b"QUIT")
    first.close()
    deadline = time.monotonic() + 20
    while True:  # the slot is given back once the server has seen the close
        c = Raw(port, host=ip)
        if c.reply().startswith(b"220 "):
            break
        c.close()
        assert time.monotonic() < deadline


def test_idle_timeout_is_qmails_451(seed, start):
    srv = start({"timeoutsmtpd": "1\n"})
    c = Raw(srv.port)
    c.reply()
    c.cmd(b"HELO x")
    assert c.rest() == b"451 4.4.2 timeout (#4.4.2)\r\n"
    srv.wait_log("end=timeout")


def test_sigterm_closes_idle_sessions_and_exits(seed, start):
    srv = start()
    idle = Raw(srv.port)
    idle.reply()
    busy = Raw(srv.port)
    busy.reply()
    busy.cmd(b"MAIL FROM:<a@b.test>")
    busy.cmd(b"RCPT TO:<joe@example.com>")
    srv.proc.send_signal(signal.SIGTERM)
    assert idle.rest() == b"421 4.3.2 shutting down, try again later (#4.3.2)\r\n"
    assert busy.cmd(b"DATA") == b"354 go ahead"  # the transaction in flight may finish
    busy.send(b"Subject: last\r\n\r\nlast one\r\n.\r\n")
    assert busy.reply().startswith(b"250 2.0.0 ok ")
    assert busy.rest() == b"421 4.3.2 shutting down, try again later (#4.3.2)\r\n"
    assert srv.proc.wait(timeout=30) == 0
    assert len(queued(srv)) == 1


# ----------------------------------------------------------------------------- fuzzing

COMMANDS = [b"HELO x", b"EHLO y", b"MAIL FROM:<a@b.test>", b"MAIL FROM:<>", b"RCPT TO:<joe@example.com>",
            b"RCPT TO:<x@other.test>", b"DATA", b"RSET", b"NOOP", b"VRFY x", b"HELP", b"AUTH PLAIN",
            b"AUTH LOGIN", b"STARTTLS", b".", b"", b"Subject: x", b"QUIT"]
LINES = st.one_of(st.sampled_from(COMMANDS), st.binary(max_size=300),
                  st.sampled_from(COMMANDS).flatmap(lambda c: st.binary(max_size=40).map(lambda b: c + b)))
ENDINGS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])


@pytest.fixture
def fuzz_srv(start) -> Smtpd:
    return start({"timeoutsmtpd": "5\n"})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(LINES, ENDINGS), max_size=25))
def test_random_sessions_get_smtp_replies_only(fuzz_srv, lines):
    srv = fuzz_srv  # one server for every example: it must survive them all
    c = Raw(srv.port, timeout=30)
    try:
        c.send(b"".join(line + end for line, end in lines) + b"\r\n.\r\nQUIT\r\n")
        data = c.rest()
    except ConnectionResetError:
        data = c.buf  # a reset after a 421/451 close is fine
    finally:
        c.close()
    for line in data.split(b"\r\n"):
        if line:  # STARTTLS may leave the server waiting for a handshake it never gets
            assert line[:3].isdigit() and line[:1] in b"2345" and line[3:4] in (b" ", b"-"), data
    assert srv.proc.poll() is None, srv.log()


# ----------------------------------------------------------------------------- ETRN (RFC 1985)

def _dialup_waiting(seed, sink_port: int) -> Path:
    from pqmail.maildir import deliver

    home = seed["serial"] / "some.example.com"
    (home / "RELAYHOST").write_text(f"127.0.0.1:{sink_port}\n")
    name = deliver(home / "Maildir", [b"Return-Path: <alice@isp.test>\n",
                                      b"Delivered-To: some.example.com-bob@some.example.com\n",
                                      b"Subject: waiting\n\nfor the dial-up host\n"])
    if os.geteuid() == 0:  # as pqmail send would have written it: owned by the mail user
        shutil.chown(home / "Maildir" / "new" / name, mail_owner())
    return home


def test_etrn_from_an_allowed_client_flushes_the_customer(seed, start):
    from serialmail.smtpsink import Sink

    sink = Sink().start()
    try:
        home = _dialup_waiting(seed, sink.port)
        (home / "ETRNCLIENTS").write_text("127.0.0.1\n")
        srv = start()
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as c:
            c.ehlo("dialup.test")
            assert "etrn" in c.esmtp_features
            code, _ = c.docmd("ETRN", "some.example.com")
            assert code in (250, 252, 253), code
        deadline = time.monotonic() + 60
        while not sink.messages:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)  # polling for the observable event: the customer's server got it
        msg = sink.messages[0]
        assert (msg.sender, msg.rcpts) == ("alice@isp.test", ["bob@some.example.com"])
        deadline = time.monotonic() + 30
        while os.listdir(home / "Maildir" / "new"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        sink.stop()


def test_etrn_from_another_client_is_refused(seed, start):
    _dialup_waiting(seed, free_port())
    srv = start()
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as c:
        c.ehlo("stranger.test")
        code, _ = c.docmd("ETRN", "some.example.com")
        assert code == 459
        code, _ = c.docmd("ETRN", "not-ours.test")
        assert code == 459
    assert os.listdir(seed["serial"] / "some.example.com" / "Maildir" / "new")
