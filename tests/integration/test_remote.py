"""Remote delivery end to end: a real DNS server (dnsmasq) and real SMTP receivers on loopback.

dnsmasq serves the zone ``test`` on 127.0.0.1 at a port the module picks; control/resolvers points at
it. Receivers are aiosmtpd sinks, each on its own 127.0.0.x address and all on one port, which
control/remoteport makes the port for MX and A deliveries. 127.0.0.1 stands for this host (it is ours);
control/notipme says the other loopback addresses are not, as other MTAs on them would not be.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest
import trustme
from aiosmtpd.controller import Controller

from conftest import require_tool
from pqmail.config.control import load_control
from pqmail.paths import Root
from pqmail.remote.deliver import RemoteEngine, RemoteResult

SINK_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 13)]
MESSAGE = (b"Received: (qmail 1 invoked by uid 0); 1 Jan 2026 00:00:00 -0000\n"
           b"From: a@isp.test\nSubject: hi\n\nfirst line\n.a line with a leading dot\n\xc3\xa9t\xc3\xa9\n")
WIRE_CONTENT = MESSAGE.replace(b"\n", b"\r\n")  # what the receiver stores: CRLF, dots unstuffed


def free_port(host: str, kind: int = socket.SOCK_STREAM) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _has_ipv6_loopback() -> bool:
    try:
        free_port("::1")
    except OSError:
        return False
    return True


HAS_IPV6 = _has_ipv6_loopback()


def shared_port() -> int:
    """A TCP port free on every sink address (and on 127.0.0.1 and ::1)."""
    for _ in range(50):
        port = free_port("127.0.0.2")
        try:
            for host in ["127.0.0.1", *SINK_ADDRESSES, *(["::1"] if HAS_IPV6 else [])]:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                with socket.socket(family) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no shared free port")


# ----------------------------------------------------------------------------- DNS

class UdpResponder:
    """An upstream DNS server for dnsmasq to forward to: answers SERVFAIL, or nothing at all."""

    def __init__(self, answer: bool) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            if self.answer:
                reply = dns.message.make_response(dns.message.from_wire(data))
                reply.set_rcode(dns.rcode.SERVFAIL)
                self.sock.sendto(reply.to_wire(), peer)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.sock.close()


def zone_args(servfail_port: int, blackhole_port: int) -> list[str]:
    mx = [("order.test", "mx1.order.test", 10), ("order.test", "mx2.order.test", 20),
          ("greet.test", "mx1.greet.test", 10), ("greet.test", "mx2.order.test", 20),
          ("backup.test", "mx1.backup.test", 10), ("backup.test", "me.backup.test", 20),
          ("self.test", "me.backup.test", 10), ("selfname.test", "mx.isp.test", 10),
          ("mixed.test", "mx.mixed.test", 10), ("tls.test", "mx.tls.test", 10),
          ("flaky.test", "mx.flaky.test", 10), ("v6.test", "mx.v6.test", 10),
          ("nullmx.test", ".", 0)]
    hosts = [("mx1.order.test", "127.0.0.2"), ("mx2.order.test", "127.0.0.3"),
             ("mx1.greet.test", "127.0.0.4"), ("afb.test", "127.0.0.5"), ("relay.test", "127.0.0.6"),
             ("mx1.backup.test", "127.0.0.7"), ("me.backup.test", "127.0.0.1"),
             ("mx.mixed.test", "127.0.0.8"), ("mx.tls.test", "127.0.0.9"), ("mx.flaky.test", "127.0.0.10"),
             ("mx.v6.test", "::1")]
    return ([f"--mx-host={d},{t},{p}" for d, t, p in mx] + [f"--host-record={n},{a}" for n, a in hosts]
            + ["--local=/test/", f"--server=/sf.test/127.0.0.1#{servfail_port}",
               f"--server=/slow.test/127.0.0.1#{blackhole_port}"])


@pytest.fixture(scope="module")
def dns_port(tmp_path_factory):
    dnsmasq = require_tool("dnsmasq")
    servfail, blackhole = UdpResponder(answer=True), UdpResponder(answer=False)
    log = tmp_path_factory.mktemp("dnsmasq") / "log"
    proc = None
    try:
        for _ in range(5):
            port = free_port("127.0.0.1", socket.SOCK_DGRAM)
            with open(log, "wb") as err:
                proc = subprocess.Popen(
                    [dnsmasq, f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
                     "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--keep-in-foreground",
                     "--pid-file=", "--log-facility=-", "--log-queries",
                     *zone_args(servfail.port, blackhole.port)],
                    stdout=err, stderr=err)
            if _dns_ready(port, proc):
                break
            proc.kill()
            proc.wait()
            proc = None
        if proc is None:
            pytest.fail(f"dnsmasq did not start: {log.read_text(errors='replace')}")
        yield port
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        servfail.stop()
        blackhole.stop()


def _dns_ready(port: int, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + 10
    query = dns.message.make_query("afb.test", "A")
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            reply = dns.query.udp(query, "127.0.0.1", port=port, timeout=0.2)
        except (dns.exception.Timeout, OSError):
            continue
        return bool(reply.answer)
    return False


# ----------------------------------------------------------------------------- SMTP receivers

@dataclass
class Received:
    sender: str
    recipients: list[str]
    content: bytes
    tls: bool


@dataclass
class Sink:
    """An aiosmtpd handler: local parts ``bad*`` get 550, ``later*`` 451; ``data_replies`` are
    answered (one per message) instead of accepting."""

    data_replies: list[str] = field(default_factory=list)
    messages: list[Received] = field(default_factory=list)
    sessions: list[object] = field(default_factory=list)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if not any(s is session for s in self.sessions):
            self.sessions.append(session)
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0]
        if local.startswith("bad"):
            return "550 5.1.1 no such user here"
        if local.startswith("later"):
            return "451 4.2.0 mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_replies:
            return self.data_replies.pop(0)
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.content,
                                      session.ssl is not None))
        return "250 2.0.0 queued as 4711"


class GreetingRefuser:
    """A server that answers every connection with a 421 greeting and hangs up."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_server((host, port))
        self.sock.settimeout(0.2)
        self.stopping = threading.Event()
        self.connections = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                conn.sendall(b"421 4.3.2 too busy, go away\r\n")

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.sock.close()


class ScriptedServer:
    """A bare SMTP server thread with fixed replies per command (``RCPT TO:<bad...>`` gets 550; a reply
    of None hangs up); ``after_dot`` None hangs up instead of answering the message. ``chunks`` records
    the command lines of each read, to see what the client pipelined."""

    def __init__(self, host: str, port: int, replies: dict[str, bytes | None],
                 after_dot: bytes | None) -> None:
        self.sock = socket.create_server((host, port))
        self.sock.settimeout(0.2)
        self.replies = {b"EHLO": b"250-scripted\r\n250 8BITMIME\r\n", b"HELO": b"250 scripted\r\n",
                        b"MAIL": b"250 ok\r\n", b"RCPT": b"250 ok\r\n", b"DATA": b"354 go\r\n",
                        b"RSET": b"250 ok\r\n", b"QUIT": b"221 bye\r\n"}
        self.replies.update({k.encode(): v for k, v in replies.items()})
        self.after_dot = after_dot
        self.chunks: list[list[bytes]] = []
        self.sessions = 0
        self.messages = 0
        self.conn: socket.socket | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def commands(self) -> list[bytes]:
        return [line[:4] for chunk in self.chunks for line in chunk]

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.sessions += 1
            self.conn = conn
            with conn:
                conn.settimeout(5)
                conn.sendall(b"220 scripted ESMTP\r\n")
                try:
                    self._session(conn)
                except OSError:
                    pass

    def _session(self, conn: socket.socket) -> None:
        buf, in_data = b"", False
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            chunk: list[bytes] = []
            while True:
                if in_data:
                    end = buf.find(b"\r\n.\r\n")
                    if end < 0:
                        break
                    buf, in_data = buf[end + 5:], False
                    self.messages += 1
                    if self.after_dot is None:
                        return
                    conn.sendall(self.after_dot)
                    continue
                line, sep, rest = buf.partition(b"\r\n")
                if not sep:
                    break
                buf = rest
                chunk.append(line)
                verb = line[:4].upper()
                reply = b"550 5.1.1 no such user\r\n" if line.startswith(b"RCPT TO:<bad") else \
                    self.replies.get(verb, b"502 unknown\r\n")
                if reply is None:
                    self.chunks.append(chunk)
                    return
                conn.sendall(reply)
                if verb == b"QUIT":
                    self.chunks.append(chunk)
                    return
                if verb == b"DATA" and reply.startswith(b"354"):
                    in_data, buf = True, b"\r\n" + buf
            if chunk:
                self.chunks.append(chunk)

    def stop(self) -> None:
        self.stopping.set()
        if self.conn is not None:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join()
        self.sock.close()


class Sinks:
    """Starts sinks on demand and stops them all at the end of the test."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.running: list = []

    def start(self, host: str, sink: Sink | None = None, port: int | None = None, **smtp_kwargs) -> Sink:
        sink = sink or Sink()
        controller = Controller(sink, hostname=host, port=port or self.port, server_hostname="sink.test",
                                ready_timeout=10, **smtp_kwargs)
        controller.start()
        self.running.append(controller)
        sink.controller = controller
        return sink

    def stop(self, sink: Sink) -> None:
        sink.controller.stop()
        self.running.remove(sink.controller)

    def refuse_greeting(self, host: str) -> GreetingRefuser:
        server = GreetingRefuser(host, self.port)
        self.running.append(server)
        return server

    def scripted(self, host: str, after_dot: bytes | None = b"250 ok\r\n",
                 **replies: bytes | None) -> ScriptedServer:
        server = ScriptedServer(host, self.port, replies, after_dot)
        self.running.append(server)
        return server

    def close(self) -> None:
        for c in self.running:
            c.stop()


@pytest.fixture
def sinks():
    s = Sinks(shared_port())
    yield s
    s.close()


# ----------------------------------------------------------------------------- the pqmail side

@pytest.fixture
def root(tmp_path, dns_port, sinks) -> Path:
    control = tmp_path / "control"
    control.mkdir(parents=True)
    files = {
        "me": "mx.isp.test", "locals": "isp.test", "rcpthosts": "isp.test",
        "resolvers": f"127.0.0.1:{dns_port}", "remoteport": str(sinks.port),
        "notipme": "\n".join([*SINK_ADDRESSES, "::1"]), "timeoutconnect": "5", "timeoutremote": "10",
    }
    for name, text in files.items():
        (control / name).write_text(text + "\n")
    return tmp_path


def write_control(root: Path, name: str, text: str) -> None:
    (root / "control" / name).write_text(text)


def message_file(root: Path, data: bytes = MESSAGE) -> Path:
    path = root / "message"
    path.write_bytes(data)
    return path


def deliver(root: Path, host: str, recipients: list[str], sender: str = "a@isp.test",
            data: bytes = MESSAGE, times: int = 1, between=None) -> list[list[RemoteResult]]:
    """Run ``times`` deliveries on one engine (so its connections are reused), then close it.

    ``between()`` runs (in a thread) after each delivery but the last.
    """
    path = message_file(root, data)

    async def run() -> list[list[RemoteResult]]:
        engine = RemoteEngine(lambda: load_control(Root(root)), root)
        out = []
        try:
            for i in range(times):
                out.append(await engine.deliver(host, sender, recipients, path))
                if between is not None and i < times - 1:
                    await asyncio.to_thread(between)
            return out
        finally:
            await engine.close()

    return asyncio.run(run())


def one(root: Path, host: str, rcpt: str, **kw) -> RemoteResult:
    [[result]] = deliver(root, host, [rcpt], **kw)
    return result


# ----------------------------------------------------------------------------- MX and routes

def test_best_mx_first_and_the_message_arrives_intact(root, sinks):
    mx1, mx2 = sinks.start("127.0.0.2"), sinks.start("127.0.0.3")
    r = one(root, "order.test", "joe@order.test")
    assert r.status == "K", r
    assert r.report == "127.0.0.2 accepted message.\nRemote host said: 250 2.0.0 queued as 4711"
    assert r.host_tried == f"mx1.order.test [127.0.0.2]:{sinks.port}"
    assert mx2.messages == []
    [got] = mx1.messages
    assert (got.sender, got.recipients) == ("a@isp.test", ["joe@order.test"])
    assert got.content == WIRE_CONTENT
    assert not got.tls  # aiosmtpd offers no STARTTLS without a certificate


def test_next_mx_when_the_first_refuses_the_connection(root, sinks):
    mx2 = sinks.start("127.0.0.3")
    r = one(root, "order.test", "joe@order.test")
    assert (r.status, r.host_tried) == ("K", f"mx2.order.test [127.0.0.3]:{sinks.port}")
    assert len(mx2.messages) == 1


def test_next_mx_when_the_first_greets_with_4xx(root, sinks):
    refuser = sinks.refuse_greeting("127.0.0.4")
    mx2 = sinks.start("127.0.0.3")
    r = one(root, "greet.test", "joe@greet.test")
    assert r.status == "K" and refuser.connections == 1 and len(mx2.messages) == 1


def test_every_mx_down_defers_with_what_was_tried(root, sinks):
    refuser = sinks.refuse_greeting("127.0.0.4")
    r = one(root, "greet.test", "joe@greet.test")
    assert r.status == "Z"
    assert r.report.startswith("Connected to 127.0.0.4 but greeting failed.\n"
                               "Remote host said: 421 4.3.2 too busy, go away\nI tried: ")
    assert "mx2.order.test [127.0.0.3]" in r.report and refuser.connections == 1
    assert r.host_tried == f"mx1.greet.test [127.0.0.4]:{sinks.port}, mx2.order.test [127.0.0.3]:{sinks.port}"


def test_a_record_fallback_without_mx(root, sinks):
    sink = sinks.start("127.0.0.5")
    assert one(root, "afb.test", "joe@afb.test").status == "K"
    assert len(sink.messages) == 1


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback here")
def test_ipv6_mx(root, sinks):
    sink = sinks.start("::1")
    r = one(root, "v6.test", "joe@v6.test")
    assert r.status == "K" and r.report.startswith("::1 accepted message."), r
    assert len(sink.messages) == 1


def test_smtproutes_override_mx_with_ports(root, sinks):
    other = free_port("127.0.0.6")
    relay = sinks.start("127.0.0.6", port=other)
    mx1 = sinks.start("127.0.0.2")
    a_host = sinks.start("127.0.0.5")
    write_control(root, "smtproutes", f"order.test:127.0.0.6:{other}\n"
                                      f".sub.test:relay.test:{other}\n"
                                      f":[127.0.0.6]:{other}\n"
                                      "afb.test:\n")
    assert one(root, "order.test", "a@order.test").host_tried == f"[127.0.0.6]:{other}"
    assert one(root, "x.sub.test", "b@x.sub.test").host_tried == f"relay.test [127.0.0.6]:{other}"
    assert one(root, "elsewhere.example", "c@elsewhere.example").status == "K"  # the default route
    assert one(root, "afb.test", "d@afb.test").host_tried == f"afb.test [127.0.0.5]:{sinks.port}"
    assert [m.recipients for m in relay.messages] == [["a@order.test"], ["b@x.sub.test"],
                                                      ["c@elsewhere.example"]]
    assert mx1.messages == [] and len(a_host.messages) == 1


def test_smtproutes_relay_that_does_not_exist_bounces(root):
    write_control(root, "smtproutes", "order.test:nosuchrelay.test\n")
    r = one(root, "order.test", "a@order.test")
    assert (r.status, r.report) == ("D", "Sorry, I couldn't find any host named nosuchrelay.test. (#5.1.2)")


# ----------------------------------------------------------------------------- backup MX

def test_backup_mx_waits_for_the_primary_and_never_loops(root, sinks):
    ourselves = sinks.start("127.0.0.1")  # would catch mail sent to this host by MX
    r = one(root, "backup.test", "joe@backup.test")
    assert r.status == "Z" and r.report.startswith("Sorry, I wasn't able to establish an SMTP connection.")
    assert "127.0.0.1" not in r.report
    primary = sinks.start("127.0.0.7")
    r = one(root, "backup.test", "joe@backup.test")
    assert r.status == "K" and r.host_tried == f"mx1.backup.test [127.0.0.7]:{sinks.port}"
    assert len(primary.messages) == 1 and ourselves.sessions == []


def test_best_mx_is_this_host_bounces_instead_of_looping(root, sinks):
    ourselves = sinks.start("127.0.0.1")
    for domain in ("self.test", "selfname.test"):  # by address, and by the name in control/me
        r = one(root, domain, f"joe@{domain}")
        assert r.status == "D" and r.report.endswith("so I don't treat it as local. (#5.4.6)"), r
    assert one(root, "[127.0.0.1]", "joe@[127.0.0.1]").status == "D"  # an IP literal that is ours
    assert ourselves.sessions == []


def test_ipme_makes_an_address_ours(root, sinks):
    sink = sinks.start("127.0.0.8")
    write_control(root, "ipme", "127.0.0.8\n")
    assert one(root, "mixed.test", "ok@mixed.test").report.endswith("(#5.4.6)")
    assert sink.sessions == []


# ----------------------------------------------------------------------------- replies

def test_4xx_then_success_on_the_next_attempt(root, sinks):
    sink = sinks.start("127.0.0.10", Sink(data_replies=["451 4.3.0 queue full, try again"]))
    r = one(root, "flaky.test", "joe@flaky.test")
    assert r.status == "Z"
    assert r.report == ("127.0.0.10 failed after I sent the message.\n"
                        "Remote host said: 451 4.3.0 queue full, try again")
    assert one(root, "flaky.test", "joe@flaky.test").status == "K"
    assert len(sink.messages) == 1


def test_5xx_bounces_with_the_remote_text(root, sinks):
    sinks.start("127.0.0.8")
    r = one(root, "mixed.test", "bad@mixed.test")
    assert r.status == "D"
    assert r.report == ("127.0.0.8 does not like recipient.\n"
                        "Remote host said: 550 5.1.1 no such user here\nGiving up on 127.0.0.8.")


def test_per_recipient_results_in_one_transaction(root, sinks):
    sink = sinks.start("127.0.0.8")
    rcpts = ["ok1@mixed.test", "bad@mixed.test", "later@mixed.test", "ok2@mixed.test"]
    [results] = deliver(root, "mixed.test", rcpts)
    assert [r.status for r in results] == ["K", "D", "Z", "K"]
    assert results[1].report == ("127.0.0.8 does not like recipient.\n"
                                 "Remote host said: 550 5.1.1 no such user here")
    assert results[2].report == ("127.0.0.8 does not like recipient.\n"
                                 "Remote host said: 451 4.2.0 mailbox busy, try later")
    assert [m.recipients for m in sink.messages] == [["ok1@mixed.test", "ok2@mixed.test"]]


def test_partial_final_line_bounces_without_connecting(root, sinks):
    sink = sinks.start("127.0.0.8")
    r = one(root, "mixed.test", "ok@mixed.test", data=b"Subject: x\n\nno newline at the end")
    assert (r.status, r.report) == ("D", "SMTP cannot transfer messages with partial final lines. (#5.6.2)")
    assert sink.sessions == []


def test_message_bigger_than_the_servers_size_bounces(root, sinks):
    sink = sinks.start("127.0.0.8", data_size_limit=100)
    r = one(root, "mixed.test", "ok@mixed.test", data=b"Subject: big\n\n" + b"x" * 200 + b"\n")
    assert r.status == "D" and "at most 100 bytes. (#5.3.4)" in r.report
    assert sink.messages == []


# ----------------------------------------------------------------------------- DNS failures

def test_null_mx_bounces_at_once(root):
    r = one(root, "nullmx.test", "joe@nullmx.test")
    assert r.status == "D" and r.report.endswith("(#5.1.10)") and r.host_tried == ""


def test_nxdomain_bounces(root):
    r = one(root, "nosuch.test", "joe@nosuch.test")
    assert (r.status, r.report) == ("D", "Sorry, I couldn't find any host named nosuch.test. (#5.1.2)")


def test_servfail_defers(root):
    r = one(root, "x.sf.test", "joe@x.sf.test")
    assert (r.status, r.report) == ("Z", "Sorry, I couldn't find any host by that name. (#4.1.2)")


def test_dns_timeout_defers(root):
    write_control(root, "timeoutconnect", "1\n")
    started = time.monotonic()
    r = one(root, "x.slow.test", "joe@x.slow.test")
    assert (r.status, r.report) == ("Z", "Sorry, I couldn't find any host by that name. (#4.1.2)")
    assert time.monotonic() - started < 5


# ----------------------------------------------------------------------------- TLS and reuse

@pytest.fixture
def tls_sink(sinks, tmp_path):
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.tls.test").configure_cert(ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sink = sinks.start("127.0.0.9", tls_context=ctx, require_starttls=False)
    return sink, ca_file


def test_starttls_is_used_when_offered(root, tls_sink):
    sink, _ = tls_sink
    assert one(root, "tls.test", "joe@tls.test").status == "K"
    assert [m.tls for m in sink.messages] == [True]
    assert sink.messages[0].content == WIRE_CONTENT


def test_tlsroutes_verify_checks_the_certificate(root, tls_sink, monkeypatch):
    sink, ca_file = tls_sink
    write_control(root, "tlsroutes", "tls.test:verify\n")
    r = one(root, "tls.test", "joe@tls.test")  # the test CA is not trusted
    assert r.status == "Z" and "TLS certificate could not be verified for mx.tls.test" in r.report, r
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    assert one(root, "tls.test", "joe@tls.test").status == "K"
    assert [m.tls for m in sink.messages] == [True]


def test_tlsroutes_require_defers_when_no_starttls(root, sinks):
    sink = sinks.start("127.0.0.8")
    write_control(root, "tlsroutes", ".test:require\n")
    r = one(root, "mixed.test", "ok@mixed.test")
    assert r.status == "Z" and "does not offer STARTTLS" in r.report
    assert sink.messages == []


def test_connection_reused_for_the_next_message(root, sinks):
    sink = sinks.start("127.0.0.2")
    results = deliver(root, "order.test", ["joe@order.test"], times=3)
    assert [r.status for [r] in results] == ["K", "K", "K"]
    assert len(sink.messages) == 3 and len(sink.sessions) == 1


def test_a_session_closed_while_idle_is_replaced(root, sinks):
    sink = sinks.start("127.0.0.2")

    def restart() -> None:  # the receiver drops its idle connections
        sinks.stop(sink)
        sinks.start("127.0.0.2", sink)

    results = deliver(root, "order.test", ["joe@order.test"], times=2, between=restart)
    assert [r.status for [r] in results] == ["K", "K"], results
    assert len(sink.messages) == 2 and len(sink.sessions) == 2


def test_sessions_per_host_are_capped_and_shared(root, sinks):
    sink = sinks.start("127.0.0.2")
    path = message_file(root)

    async def run() -> list[list[RemoteResult]]:
        engine = RemoteEngine(lambda: load_control(Root(root)), root, per_host=2)
        try:
            return await asyncio.gather(*(engine.deliver("order.test", "a@isp.test", [f"u{i}@order.test"],
                                                         path) for i in range(8)))
        finally:
            await engine.close()

    results = asyncio.run(run())
    assert [r.status for [r] in results] == ["K"] * 8
    assert len(sink.messages) == 8 and len(sink.sessions) <= 2


def test_helo_when_ehlo_is_refused(root, sinks):
    server = sinks.scripted("127.0.0.2", EHLO=b"502 5.5.1 what is EHLO\r\n")
    assert one(root, "order.test", "joe@order.test").status == "K"
    assert server.commands[:3] == [b"EHLO", b"HELO", b"MAIL"]


def test_connection_lost_after_the_dot_is_a_possible_duplicate(root, sinks):
    sinks.scripted("127.0.0.2", after_dot=None)
    r = one(root, "order.test", "joe@order.test")
    assert (r.status, r.report) == (
        "Z", "Connected to 127.0.0.2 but connection died. Possible duplicate! (#4.4.2)")


def test_sender_refused(root, sinks):
    sinks.scripted("127.0.0.2", MAIL=b"553 5.7.1 sender not allowed\r\n")
    r = one(root, "order.test", "joe@order.test")
    assert (r.status, r.report) == ("D", "Connected to 127.0.0.2 but sender was rejected.\n"
                                         "Remote host said: 553 5.7.1 sender not allowed")


PIPELINING = b"250-scripted\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n"


def test_pipelining_sends_the_envelope_in_one_go_and_reuses_with_rset(root, sinks):
    server = sinks.scripted("127.0.0.2", EHLO=PIPELINING)
    results = deliver(root, "order.test", ["ok1@order.test", "bad@order.test", "ok2@order.test"], times=2)
    assert [r.status for r in results[0]] == ["K", "D", "K"] == [r.status for r in results[1]]
    assert results[0][1].report == ("127.0.0.2 does not like recipient.\n"
                                    "Remote host said: 550 5.1.1 no such user")
    envelopes = [[line[:4] for line in chunk] for chunk in server.chunks
                 if any(line.startswith(b"MAIL") for line in chunk)]
    assert envelopes == [[b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"DATA"],
                         [b"RSET", b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"DATA"]]
    assert server.sessions == 1 and server.messages == 2


def test_pipelined_sender_refusal_reads_every_reply_and_sends_no_message(root, sinks):
    server = sinks.scripted("127.0.0.2", EHLO=PIPELINING, MAIL=b"451 4.3.0 try later\r\n")
    results = deliver(root, "order.test", ["ok@order.test"], times=2)
    assert [r.status for [r] in results] == ["Z", "Z"]
    assert results[0][0].report == ("Connected to 127.0.0.2 but sender was rejected.\n"
                                    "Remote host said: 451 4.3.0 try later")
    # the scripted server says 354 to DATA anyway: pqmail ends that with an empty message, stays in step
    assert server.sessions == 1 and server.messages == 2


def test_pipelined_all_recipients_refused(root, sinks):
    server = sinks.scripted("127.0.0.2", EHLO=PIPELINING, DATA=b"554 5.5.1 no valid recipients\r\n")
    [[r]] = deliver(root, "order.test", ["bad@order.test"])
    assert r.status == "D" and r.report.endswith("Giving up on 127.0.0.2.")
    assert server.messages == 0


def test_a_dead_idle_session_with_pipelining_is_replaced(root, sinks):
    server = sinks.scripted("127.0.0.2", EHLO=PIPELINING, after_dot=b"250 ok\r\n")

    def drop_idle() -> None:  # the server hangs up on its idle client, as on a time-out
        server.stop()
        sinks.running.remove(server)
        sinks.running.append(sinks.scripted("127.0.0.2", EHLO=PIPELINING))

    results = deliver(root, "order.test", ["ok@order.test"], times=2, between=drop_idle)
    assert [r.status for [r] in results] == ["K", "K"]


def test_a_session_that_dies_on_rset_is_replaced_without_losing_the_message(root, sinks):
    server = sinks.scripted("127.0.0.2", EHLO=PIPELINING, RSET=None)
    results = deliver(root, "order.test", ["ok@order.test"], times=2)
    assert [r.status for [r] in results] == ["K", "K"]
    assert server.sessions == 2 and server.messages == 2


# ----------------------------------------------------------------------------- the whole path

def test_backup_mx_accepts_by_smtp_and_hands_to_the_primary(seed, dns_port, sinks):
    """backup.test is in rcpthosts only (not local, not virtual): pqmail is its MX at preference 20.

    smtpd accepts the mail; pqmail send defers it while the primary (preference 10) is down, never
    delivering to itself; once the primary answers, a flush hands the message over.
    """
    import smtplib

    from conftest import PQMAIL, run_pqmail

    root: Path = seed["root"]
    control = root / "control"
    with open(control / "rcpthosts", "a") as f:
        f.write("backup.test\n")
    for name, text in {"resolvers": f"127.0.0.1:{dns_port}", "remoteport": str(sinks.port),
                       "notipme": "\n".join([*SINK_ADDRESSES, "::1"]), "timeoutconnect": "5",
                       "timeoutremote": "10"}.items():
        (control / name).write_text(text + "\n")
    ourselves = sinks.start("127.0.0.1")  # would catch mail this host sent to itself by MX
    port = free_port("127.0.0.1")
    log = root / "servers.log"
    out = open(log, "wb")  # noqa: SIM115 (closed below)
    procs = [subprocess.Popen([*PQMAIL, "smtpd", "--root", str(root), "--listen", f"127.0.0.1:{port}"],
                              stdout=out, stderr=out)]
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.02)  # polling for the port
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.sendmail("alice@remote.example", ["joe@backup.test"], "Subject: via backup\n\nhello\n")
        first = run_pqmail("send", "--drain", "--root", str(root)).stderr.decode()
        assert "to remote joe@backup.test" in first and "deferral" in first, first
        assert "127.0.0.1" not in first.split("deferral", 1)[1].split("\n", 1)[0]
        assert run_pqmail("queue", "stat", "--root", str(root)).stdout.startswith(b"messages in queue: 1")

        primary = sinks.start("127.0.0.7")
        procs.append(subprocess.Popen([*PQMAIL, "send", "--root", str(root)], stdout=out, stderr=out))
        deadline = time.monotonic() + 60
        while b"status: local" not in log.read_bytes():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)  # polling the log: the queue manager is up
        run_pqmail("queue", "flush", "--root", str(root))  # qmail's SIGALRM: retry now
        while not primary.messages:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)  # polling for the observable event: the primary got it
        msg = primary.messages[0]
        assert (msg.sender, msg.recipients) == ("alice@remote.example", ["joe@backup.test"])
        assert ourselves.sessions == []
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=60)
        out.close()
