"""maildirsmtp (pqmail.serialmail.flush) against a real receiving server on 127.0.0.1."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import mail_owner
from pqmail.config.control import load_control
from pqmail.init import init_tree
from pqmail.maildir import deliver, maildirmake, scan
from pqmail.paths import Root
from pqmail.queue.store import Queue
from pqmail.serialmail.flush import (
    DataEncoder,
    DirLock,
    dialup_status,
    flush,
    parse_head,
    read_last_transfer,
)
from serialmail.smtpsink import Sink

DOMAIN = "some.example.com"
PREFIX = f"{DOMAIN}-"


# ----------------------------------------------------------------------------- pure parts

@pytest.mark.parametrize("data, want", [
    (b"Return-Path: <a@b.test>\nDelivered-To: some.example.com-x@some.example.com\nbody\n",
     ("a@b.test", "x@some.example.com", b"body\n")),
    (b"Return-Path: <>\nDelivered-To: some.example.com-x@some.example.com\n",
     ("", "x@some.example.com", b"")),
    (b"Return-Path: <a@b>\nDelivered-To: SOME.example.com-x@y\n\n", ("a@b", "x@y", b"\n")),
    (b"Return-Path: <a@b>\nDelivered-To: other.example.com-x@y\n", None),  # another prefix
    (b"Return-Path: <a@b>\nDelivered-To: some.example.com-\n", None),  # nothing after the prefix
    (b"Return-Path: <a@b>\nX-Other: some.example.com-x@y\n", None),
    (b"Delivered-To: some.example.com-x@y\nReturn-Path: <a@b>\n", None),  # wrong order
    (b"Return-Path: <a@b>\nDelivered-To: some.example.com-x@y", None),  # second line unfinished
    (b"Return-Path: <a b>\nDelivered-To: some.example.com-x@y\n", None),  # space in the sender
    (b"Return-Path: <a@b>\nDelivered-To: some.example.com-x@y\r\n", None),  # CR in the recipient
    (b"", None),
])
def test_parse_head(data, want):
    head = parse_head(data, PREFIX)
    assert (None if head is None else (head.sender, head.recipient, data[head.offset:])) == want


def _encode(chunks: list[bytes]) -> bytes:
    enc = DataEncoder()
    return b"".join(enc.feed(c) for c in chunks) + enc.finish()


def test_data_encoding_crlf_and_dots_across_chunks():
    assert _encode([b"a\n.b\n", b".c\n..d\n"]) == b"a\r\n..b\r\n..c\r\n...d\r\n.\r\n"
    assert _encode([b"a", b".b\n"]) == b"a.b\r\n.\r\n"  # a dot inside a line is left alone
    assert _encode([b"a\n", b".", b"\n"]) == b"a\r\n..\r\n.\r\n"
    assert _encode([b".x"]) == b"..x\r\n.\r\n"  # the last line gets its line end
    assert _encode([]) == b".\r\n"


@given(st.lists(st.text(alphabet="ab.\n\r", max_size=20).map(str.encode), max_size=6))
def test_data_encoding_round_trips(chunks):
    body = b"".join(chunks)
    lines = _encode(chunks)[:-3].split(b"\r\n")
    assert lines.pop() == b""
    assert all(not line.startswith(b".") or line.startswith(b"..") for line in lines)  # no early end
    decoded = b"".join((line[1:] if line.startswith(b".") else line) + b"\n" for line in lines)
    assert decoded == body + (b"\n" if body and not body.endswith(b"\n") else b"")


# ----------------------------------------------------------------------------- flush against a sink

@pytest.fixture
def sink():
    s = Sink().start()
    yield s
    s.stop()


@pytest.fixture
def tree(mailtmp: Path):
    root = Root(mailtmp / "root")
    init_tree(root, me="mx.isp.test", owner=mail_owner())
    d = mailtmp / "serialmail" / DOMAIN
    d.mkdir(parents=True)
    maildirmake(d / "Maildir")
    return root, d


def _relay(d: Path, port: int) -> None:
    (d / "RELAYHOST").write_text(f"127.0.0.1:{port}\n")


def _put(d: Path, n: int, *, sender: str = "alice@remote.test", age: float = 0.0,
         body: bytes | None = None) -> Path:
    msg = (f"Return-Path: <{sender}>\nDelivered-To: {PREFIX}user{n}@{DOMAIN}\n"
           f"Received: from remote.test\nSubject: message {n}\n\n").encode()
    msg += body if body is not None else f"body {n}\n".encode()
    name = deliver(d / "Maildir", [msg])
    path = d / "Maildir" / "new" / name
    when = time.time() - 600 + n - age  # in the past, in order
    os.utime(path, (when, when))
    return path


def _flush(root: Root, d: Path, logs: list[str] | None = None, **kw):
    q = Queue(root.queue)
    try:
        return flush(d, control=load_control(root), queue=q, log=(logs if logs is not None else []).append,
                     **kw)
    finally:
        q.close()


def _bounces(root: Root) -> list[tuple[str, list[str], bytes]]:
    q = Queue(root.queue)
    out = []
    for mid in sorted(q.list_todo()):
        env = q.read_todo(mid)
        out.append((env.sender, env.recipients, q.message_path(mid).read_bytes()))
    return out


@pytest.mark.parametrize("pipelining", [True, False])
def test_flush_delivers_everything_with_the_right_envelope(tree, sink, pipelining):
    root, d = tree
    sink.pipelining = pipelining
    _relay(d, sink.port)
    for n in range(3):
        _put(d, n, body=b"line\n.starts with a dot\n" if n == 1 else None)
    logs: list[str] = []
    result = _flush(root, d, logs)
    assert (result.status, result.delivered, result.left) == ("ok", 3, 0), logs
    assert scan(d / "Maildir") == []
    assert sink.connections == 1
    assert [(m.sender, m.rcpts) for m in sink.messages] == [
        ("alice@remote.test", [f"user{n}@{DOMAIN}"]) for n in range(3)]
    assert sink.messages[1].data == (b"Received: from remote.test\r\nSubject: message 1\r\n\r\n"
                                     b"line\r\n.starts with a dot\r\n")
    assert sum("delivered new/" in line and "127.0.0.1 said: 250" in line for line in logs) == 3
    last = read_last_transfer(d)
    assert last is not None and last.status == "ok" and "delivered 3" in last.text
    assert abs(last.when - time.time()) < 60


def test_empty_maildir_makes_no_connection(tree, sink):
    root, d = tree
    _relay(d, sink.port)
    result = _flush(root, d)
    assert result.status == "empty"
    assert sink.connections == 0
    assert read_last_transfer(d) is None


def test_transfer_in_progress_returns_at_once(tree, sink):
    root, d = tree
    _relay(d, sink.port)
    _put(d, 0)
    held = DirLock.try_lock(d)
    assert held is not None
    try:
        logs: list[str] = []
        result = _flush(root, d, logs)
    finally:
        held.release()
    assert result.status == "busy"
    assert any("transfer already in progress" in line for line in logs)
    assert sink.connections == 0
    assert len(scan(d / "Maildir")) == 1


def test_4xx_mid_batch_keeps_the_rest_for_the_next_run(tree, sink):
    root, d = tree
    _relay(d, sink.port)
    for n in range(4):
        _put(d, n)
    sink.data_replies = {2: "451 4.3.0 disk full, come back later"}
    logs: list[str] = []
    result = _flush(root, d, logs)
    assert (result.status, result.delivered, result.deferred, result.left) == ("deferred", 1, 1, 3)
    assert any("deferred new/" in line and "451 4.3.0 disk full" in line for line in logs)
    assert _bounces(root) == []
    assert read_last_transfer(d).status == "deferred"
    second = _flush(root, d)
    assert (second.status, second.delivered, second.left) == ("ok", 3, 0)
    assert sorted(m.rcpts[0] for m in sink.messages) == [f"user{n}@{DOMAIN}" for n in range(4)]


def test_5xx_bounces_that_message_only(tree, sink):
    root, d = tree
    _relay(d, sink.port)
    for n in range(3):
        _put(d, n, sender=f"sender{n}@remote.test")
    sink.data_replies = {2: "554 5.7.1 we do not want this one"}
    result = _flush(root, d)
    assert (result.status, result.delivered, result.bounced, result.left) == ("ok", 2, 1, 0)
    assert [m.rcpts[0] for m in sink.messages] == [f"user0@{DOMAIN}", f"user2@{DOMAIN}"]
    [(sender, rcpts, text)] = _bounces(root)
    assert (sender, rcpts) == ("", ["sender1@remote.test"])
    body = text.split(b"\n\n", 1)[1]
    assert body.startswith(b"Hi. This is the maildirbounce program at mx.isp.test.\n")
    assert f"\n<user1@{DOMAIN}>:\n127.0.0.1 said: 554 5.7.1 we do not want this one\n\n".encode() in body
    assert b"\n--- Below this line is a copy of the message.\n\nReturn-Path: <sender1@remote.test>\n" in body
    assert b"Subject: message 1\n" in body
    assert b"Subject: failure notice\n" in text and b"To: sender1@remote.test\n" in text


def test_rcpt_5xx_bounces_and_the_session_goes_on(tree, sink):
    root, d = tree
    _relay(d, sink.port)
    for n in range(3):
        _put(d, n)
    sink.rcpt_replies = {f"user0@{DOMAIN}": "550 5.1.1 no such user"}
    result = _flush(root, d)
    assert (result.delivered, result.bounced, result.left) == (2, 1, 0)
    [(_, rcpts, text)] = _bounces(root)
    assert rcpts == ["alice@remote.test"] and b"550 5.1.1 no such user" in text


def test_message_older_than_the_lifetime_bounces_on_a_temporary_failure(tree, sink):
    root, d = tree
    _relay(d, sink.port)
    _put(d, 0, age=8 * 86400)
    _put(d, 1)
    sink.data_replies = {1: "451 4.2.0 try later", 2: "451 4.2.0 try later"}
    logs: list[str] = []
    result = _flush(root, d, logs)
    # the old one bounces and the run goes on; the young one is deferred and stays
    assert (result.bounced, result.deferred, result.left) == (1, 1, 1), logs
    [(_, _, text)] = _bounces(root)
    too_old = b"I'm not going to try again; this message has been in the queue too long.\n"
    assert b"451 4.2.0 try later\n" + too_old in text
    assert [m.path.read_bytes().split(b"\n")[1] for m in scan(d / "Maildir")] == [
        f"Delivered-To: {PREFIX}user1@{DOMAIN}".encode()]


def test_lifetime_option_and_unreachable_host_ages_nothing_out(tree):
    root, d = tree
    (d / "RELAYHOST").write_text("127.0.0.1:1\n")  # nothing listens on port 1
    _put(d, 0, age=30 * 86400)
    result = _flush(root, d, lifetime=60)
    assert result.status == "failed" and "unable to connect" in result.detail
    assert len(scan(d / "Maildir")) == 1
    assert _bounces(root) == []
    assert read_last_transfer(d).status == "failed"


def test_files_that_do_not_fit_are_skipped_and_logged(tree, sink):
    root, d = tree
    _relay(d, sink.port)
    deliver(d / "Maildir", [b"Subject: no envelope lines\n\nhello\n"])
    logs: list[str] = []
    result = _flush(root, d, logs)
    assert (result.status, result.skipped, result.left) == ("empty", 1, 1)
    assert sink.connections == 0
    assert any("skipped new/" in line for line in logs)
    _put(d, 0)
    result = _flush(root, d, prefix=PREFIX)
    assert (result.delivered, result.skipped, result.left) == (1, 1, 1)


def test_helo_when_ehlo_is_refused(tree, sink):
    root, d = tree
    _relay(d, sink.port)
    _put(d, 0)

    async def no_ehlo(server, session, envelope, hostname, responses):
        return ["502 5.5.1 EHLO not here"]

    sink.handle_EHLO = no_ehlo
    assert _flush(root, d).delivered == 1


def test_mail_arriving_during_the_session_goes_in_the_same_session(tree, sink):
    root, d = tree
    _relay(d, sink.port)
    _put(d, 0)
    sink.stall_on = {1}
    out: dict[str, object] = {}
    t = threading.Thread(target=lambda: out.setdefault("r", _flush(root, d)))
    t.start()
    assert sink.stalled.wait(20)
    _put(d, 1)
    sink.release()
    t.join(60)
    result = out["r"]
    assert (result.delivered, result.left) == (2, 0)
    assert sink.connections == 1


def test_dialup_status(tree, sink):
    root, d = tree
    _relay(d, sink.port)
    assert dialup_status(d) .waiting == 0
    _put(d, 0, age=3600)
    st_ = dialup_status(d, now=time.time())
    assert st_.waiting == 1 and st_.oldest_age is not None and st_.oldest_age > 3600
    assert st_.last is None
    _flush(root, d)
    st_ = dialup_status(d)
    assert st_.waiting == 0 and st_.last is not None and st_.last.status == "ok"
