"""ETRN decisions (RFC 1985) and the ODMR protocol (RFC 2645): tables, the state machine, and ATRN
end to end through the asyncio layer with a Python stand-in for the customer's ODMR client."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import time
from pathlib import Path

import pytest

from conftest import mail_owner
from pqmail.init import init_tree
from pqmail.maildir import deliver, scan
from pqmail.passwords import PasswordStore, hash_password
from pqmail.paths import Root
from pqmail.provision import Provisioner
from pqmail.serialmail.etrn import (
    Candidate,
    client_allowed,
    decide,
    etrn_decision,
    parse_etrn,
)
from pqmail.serialmail.flush import DirLock, read_last_transfer
from pqmail.serialmail.odmr import (
    Atrn,
    Close,
    OdmrProtocol,
    OdmrService,
    Reply,
    Verify,
    check_secret,
)
from serialmail.smtpsink import Sink

DOMAIN = "some.example.com"


# ----------------------------------------------------------------------------- ETRN, pure

@pytest.mark.parametrize("arg, code", [
    (None, 501), ("", 501), ("a.example b.example", 501), ("bad/name", 501),
    ("#queue1", 458),
])
def test_parse_etrn_refusals(arg, code):
    assert parse_etrn(arg).code == code


def test_parse_etrn_forms():
    host = parse_etrn("Some.Example.COM")
    assert (host.domain, host.subdomains) == (DOMAIN, False)
    at = parse_etrn("@example.com")
    assert (at.domain, at.subdomains) == ("example.com", True)


def _cand(domain=DOMAIN, allowed=True, waiting=3, busy=False):
    return Candidate(domain, Path("/x") / domain, allowed, waiting, busy)


@pytest.mark.parametrize("node, cands, code, ndirs", [
    (DOMAIN, [], 459, 0),  # not ours
    (DOMAIN, [_cand(allowed=False)], 459, 0),  # not this client's
    (DOMAIN, [_cand(waiting=0)], 251, 0),
    (DOMAIN, [_cand(waiting=3)], 253, 1),
    (DOMAIN, [_cand(waiting=3, busy=True)], 252, 1),
    (DOMAIN, [_cand(waiting=None)], 250, 1),
    ("@example.com", [_cand(), _cand("b.example.com", waiting=2), _cand("c.example.com", waiting=0)], 253, 2),
    ("@example.com", [_cand(allowed=False), _cand("b.example.com", waiting=2)], 253, 1),
])
def test_etrn_decision_table(node, cands, code, ndirs):
    d = decide(parse_etrn(node), cands)
    assert (d.code, len(d.dirs)) == (code, ndirs)
    assert d.reply.startswith(f"{code} ")
    if code == 253:
        assert f"{sum(c.waiting for c in cands if c.allowed)} pending messages for node {node}" in d.text


@pytest.mark.parametrize("ip, nets, auth, ok", [
    ("192.0.2.7", ["192.0.2.0/24"], None, True),
    ("::ffff:192.0.2.7", ["192.0.2.7/32"], None, True),
    ("2001:db8::1", ["2001:db8::/32"], None, True),
    ("198.51.100.1", ["192.0.2.0/24"], None, False),
    ("198.51.100.1", [], "Some.Example.com", True),  # authenticated as the customer
    ("198.51.100.1", [], "ex1-0001", False),  # authenticated as someone else
    (None, ["0.0.0.0/0"], None, False),
])
def test_client_allowed(ip, nets, auth, ok):
    import ipaddress

    assert client_allowed(ip, [ipaddress.ip_network(n) for n in nets], auth, DOMAIN) is ok


# ----------------------------------------------------------------------------- ETRN on a provisioned tree

@pytest.fixture
def tree(mailtmp: Path):
    root = Root(mailtmp / "root")
    init_tree(root, me="mx.isp.test", owner=mail_owner())
    sink = Sink().start()
    Provisioner(root, mail_owner()).dialup_add(DOMAIN, "ex1", f"127.0.0.1:{sink.port}",
                                               base=mailtmp / "serialmail")
    d = mailtmp / "serialmail" / DOMAIN
    yield root, d, sink
    sink.stop()


def _put(d: Path, n: int) -> None:
    name = deliver(d / "Maildir", [f"Return-Path: <a@remote.test>\nDelivered-To: {DOMAIN}-u{n}@{DOMAIN}\n"
                                   f"Subject: {n}\n\nhello {n}\n".encode()])
    when = time.time() - 100 + n
    os.utime(d / "Maildir" / "new" / name, (when, when))


def test_etrn_decision_on_a_provisioned_tree(tree):
    root, d, _ = tree
    assert etrn_decision(DOMAIN, "192.0.2.7", None, root).code == 459  # not listed
    (d / "ETRNCLIENTS").write_text("# the customer's office\n192.0.2.0/24\nnot an address\n")
    assert etrn_decision(DOMAIN, "192.0.2.7", None, root).code == 251
    _put(d, 0)
    _put(d, 1)
    dec = etrn_decision(DOMAIN, "192.0.2.7", None, root)
    assert (dec.code, dec.dirs) == (253, (d,))
    assert dec.reply == f"253 2.0.0 OK, 2 pending messages for node {DOMAIN} started"
    assert etrn_decision("@example.com", "192.0.2.7", None, root).code == 253
    assert etrn_decision("other.example.net", "192.0.2.7", None, root).code == 459
    assert etrn_decision(DOMAIN, "198.51.100.1", DOMAIN, root).code == 253  # AUTH as the customer
    held = DirLock.try_lock(d)
    try:
        assert etrn_decision(DOMAIN, "192.0.2.7", None, root).code == 252
    finally:
        held.release()


# ----------------------------------------------------------------------------- ODMR, the state machine

def _texts(events) -> list[str]:
    return [e.data.decode() for e in events if isinstance(e, Reply)]


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_odmr_protocol_plain_then_atrn():
    p = OdmrProtocol("odmr.isp.test")
    assert p.greeting().data == b"220 odmr.isp.test ODMR service ready\r\n"
    assert _texts(p.receive_line(b"ATRN\r\n")) == ["530 5.7.0 authentication required\r\n"]
    ehlo = _texts(p.receive_line(b"EHLO customer.test\r\n"))[0]
    assert "250-AUTH CRAM-MD5 PLAIN LOGIN\r\n" in ehlo and ehlo.endswith("250 ATRN\r\n")
    for cmd in (b"HELO x", b"MAIL FROM:<a@b>", b"NOOP", b"TURN"):
        assert _texts(p.receive_line(cmd))[0].startswith("502 ")
    assert _texts(p.receive_line(b"ATRN " + DOMAIN.encode()))[0].startswith("530 ")
    [v] = p.receive_line(b"AUTH PLAIN " + _b64(b"\0some.example.com\0secret"))
    assert v == Verify("PLAIN", DOMAIN, "secret")
    with pytest.raises(RuntimeError):
        p.receive_line(b"NOOP")  # nothing is read while a check is pending
    assert _texts(p.verified(DOMAIN)) == ["235 2.7.0 authentication successful\r\n"]
    assert _texts(p.receive_line(b"AUTH PLAIN x"))[0].startswith("503 ")
    assert p.receive_line(b"ATRN") == [Atrn(DOMAIN, (DOMAIN,))]
    assert _texts(p.atrn_done(453, "4.4.5 You have no mail")) == ["453 4.4.5 You have no mail\r\n"]
    assert p.state == "command"
    assert p.receive_line(b"ATRN Some.Example.com,b.example.com") == [Atrn(DOMAIN, (DOMAIN, "b.example.com"))]
    assert _texts(p.atrn_done(250, "2.0.0 OK now reversing the connection"))[0].startswith("250 ")
    assert p.state == "turned"


def test_odmr_protocol_login_cram_and_failures():
    p = OdmrProtocol("odmr.isp.test", challenge=lambda: b"<1.2@odmr.isp.test>")
    p.receive_line(b"EHLO c")
    assert _texts(p.receive_line(b"AUTH LOGIN")) == ["334 VXNlcm5hbWU6\r\n"]
    assert _texts(p.receive_line(_b64(DOMAIN.encode()))) == ["334 UGFzc3dvcmQ6\r\n"]
    assert p.receive_line(_b64(b"pw")) == [Verify("LOGIN", DOMAIN, "pw")]
    assert _texts(p.verified(None)) == ["535 5.7.8 authentication failed\r\n"]
    challenge = "334 " + _b64(b"<1.2@odmr.isp.test>").decode() + "\r\n"
    assert _texts(p.receive_line(b"AUTH CRAM-MD5")) == [challenge]
    [v] = p.receive_line(_b64(b"some.example.com 0123abcd"))
    assert v == Verify("CRAM-MD5", DOMAIN, "0123abcd", b"<1.2@odmr.isp.test>")
    assert _texts(p.verified(None)) == ["535 5.7.8 authentication failed\r\n"]
    assert _texts(p.receive_line(b"AUTH UNKNOWN"))[0].startswith("504 ")
    [v] = p.receive_line(b"AUTH PLAIN " + _b64(b"\0x\0y"))
    events = p.verified(None)
    assert _texts(events) == ["421 4.7.0 too many authentication failures\r\n"] and events[-1] == Close()


def test_check_secret():
    chal = b"<99.1@odmr.isp.test>"
    digest = hmac.new(b"s3cret", chal, hashlib.md5).hexdigest()
    assert check_secret("{PLAIN}s3cret", Verify("CRAM-MD5", DOMAIN, digest, chal))
    assert not check_secret("{PLAIN}other", Verify("CRAM-MD5", DOMAIN, digest, chal))
    assert check_secret("{PLAIN}s3cret", Verify("PLAIN", DOMAIN, "s3cret"))
    hashed = hash_password("s3cret")
    assert check_secret(hashed, Verify("LOGIN", DOMAIN, "s3cret"))
    assert not check_secret(hashed, Verify("CRAM-MD5", DOMAIN, digest, chal))  # needs the secret itself
    assert not check_secret("garbage", Verify("PLAIN", DOMAIN, "s3cret"))


# ----------------------------------------------------------------------------- ODMR, end to end in-process

async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    while data := await src.read(65536):
        dst.write(data)
        await dst.drain()
    dst.close()


async def _customer(port: int, sink_port: int, auth: bytes, atrn: bytes) -> list[bytes]:
    """What fetchmail does for ODMR: EHLO, AUTH, ATRN; on 250 shovel bytes to the local SMTP server."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    seen = [await r.readline()]
    for line in (b"EHLO customer.test", auth, atrn):
        w.write(line + b"\r\n")
        while True:
            reply = await r.readline()
            seen.append(reply)
            if reply[3:4] != b"-":
                break
    if seen[-1].startswith(b"250 "):
        sr, sw = await asyncio.open_connection("127.0.0.1", sink_port)
        await asyncio.wait_for(asyncio.gather(_pipe(r, sw), _pipe(sr, w)), 60)
    w.close()
    return seen


async def _with_server(root: Root, coro_factory, until=None):
    """Run the customer's side against an ODMR server; then, if given, wait (up to 30 s) until
    ``until()`` holds, so that the server's side of the session can finish before the loop ends."""
    service = OdmrService(root, lambda line: None)
    server = await asyncio.start_server(service.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        result = await coro_factory(port)
        deadline = time.monotonic() + 30
        while until is not None and not until():
            assert time.monotonic() < deadline, "the server side never finished"
            await asyncio.sleep(0.02)  # polling for the observable event, with a deadline
        return result
    finally:
        server.close()
        service.queue.close()


def _customer_with_mail(root: Root, d: Path, messages: int) -> bytes:
    """The customer's ODMR password set and ``messages`` waiting; the AUTH line that logs in."""
    PasswordStore(root).set(DOMAIN, "{PLAIN}s3cret", d / "Maildir")
    for n in range(messages):
        _put(d, n)
    return b"AUTH PLAIN " + _b64(b"\0some.example.com\0s3cret")


def test_atrn_turns_the_connection_and_delivers(tree):
    root, d, sink = tree
    plain = _customer_with_mail(root, d, 3)
    seen = asyncio.run(_with_server(root, lambda port: _customer(port, sink.port, plain, b"ATRN"),
                                    until=lambda: read_last_transfer(d) is not None))
    assert seen[-1].startswith(b"250 "), seen
    sink.wait_for(lambda s: len(s.messages) == 3)
    assert [m.rcpts for m in sink.messages] == [[f"u{n}@{DOMAIN}"] for n in range(3)]
    assert scan(d / "Maildir") == []
    assert read_last_transfer(d).status == "ok"
    # nothing left: 453; another customer's domain: 450; wrong password: 535
    seen = asyncio.run(_with_server(root, lambda port: _customer(port, sink.port, plain, b"ATRN")))
    assert seen[-1].startswith(b"453 ")
    seen = asyncio.run(_with_server(root, lambda port: _customer(port, sink.port, plain,
                                                                 b"ATRN other.example.com")))
    assert seen[-1].startswith(b"450 ")
    bad = b"AUTH PLAIN " + _b64(b"\0some.example.com\0wrong")
    seen = asyncio.run(_with_server(root, lambda port: _customer(port, sink.port, bad, b"ATRN")))
    assert seen[-2].startswith(b"535 ") and seen[-1].startswith(b"530 ")


def test_atrn_while_a_transfer_runs_is_refused(tree):
    root, d, sink = tree
    plain = _customer_with_mail(root, d, 1)
    held = DirLock.try_lock(d)
    try:
        seen = asyncio.run(_with_server(root, lambda port: _customer(port, sink.port, plain, b"ATRN")))
    finally:
        held.release()
    assert seen[-1].startswith(b"450 ") and b"already under way" in seen[-1]
    assert len(scan(d / "Maildir")) == 1 and sink.connections == 0


def test_a_transfer_cut_by_a_shutdown_is_recorded_and_keeps_the_mail(tree):
    root, d, sink = tree
    plain = _customer_with_mail(root, d, 2)

    async def scenario() -> bytes:
        service = OdmrService(root, lambda line: None)
        server = await asyncio.start_server(service.handle, "127.0.0.1", 0)
        r, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            await r.readline()
            for line in (b"EHLO customer.test", plain, b"ATRN"):
                w.write(line + b"\r\n")
                while (reply := await r.readline())[3:4] == b"-":
                    pass
            assert reply.startswith(b"250 "), reply
            w.write(b"220 customer.test ESMTP\r\n")  # roles turned: we are the SMTP server now
            ehlo = await r.readline()  # the transfer is under way; then the service stops, as
            tasks = list(service.sessions)  # serve_odmr_listeners does after its grace period
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks)
            return ehlo
        finally:
            w.close()
            server.close()
            service.queue.close()

    assert asyncio.run(scenario()).startswith(b"EHLO ")
    last = read_last_transfer(d)
    assert last is not None and last.status == "interrupted", last
    assert "left 2" in last.text
    assert len(scan(d / "Maildir")) == 2 and sink.connections == 0
    lock = DirLock.try_lock(d)  # and the customer's lock was given back
    assert lock is not None
    lock.release()
