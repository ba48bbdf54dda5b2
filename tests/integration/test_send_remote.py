"""pqmail send delivering to remote hosts: smtproutes to loopback SMTP receivers, forwards, bounces.

The receivers are aiosmtpd sinks on 127.0.0.1 (ports the test picks), reached through
control/smtproutes, so no DNS is involved; MX behaviour is tested in test_remote.py.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from conftest import run_pqmail


class Sink:
    """Records every accepted transaction; ``reply`` (e.g. "550 no such user") refuses RCPTs."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.reply: str | None = None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.reply:
            return self.reply
        envelope.rcpt_tos.append(address)
        return "250 ok"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 accepted"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sink():
    handler = Sink()
    port = _free_port()
    c = Controller(handler, hostname="127.0.0.1", port=port)
    c.start()
    handler.port = port
    yield handler
    c.stop()


def _route(seed: dict, sink: Sink) -> Path:
    root: Path = seed["root"]
    (root / "control" / "smtproutes").write_text(f"remote.test:127.0.0.1:{sink.port}\n")
    return root


def _inject(root: Path, *rcpts: str, sender: str = "alice@isp.test", body: str = "hi\n") -> None:
    msg = f"From: {sender}\nSubject: t\n\n{body}".encode()
    run_pqmail("inject", "-f", sender, *rcpts, input=msg, env={"PQMAIL_ROOT": str(root)})


def _drain(root: Path) -> str:
    return run_pqmail("send", "--drain", "--root", str(root)).stderr.decode()


def test_remote_recipient_goes_through_smtproutes(seed, sink):
    root = _route(seed, sink)
    _inject(root, "bob@remote.test", "carol@Remote.Test", body="for bob\n")
    log = _drain(root)
    assert len(sink.messages) == 1, log  # one transaction for both recipients of the host
    mail_from, rcpts, data = sink.messages[0]
    assert mail_from == "alice@isp.test"
    assert sorted(rcpts) == ["bob@remote.test", "carol@Remote.Test"]
    assert data.endswith(b"\r\nfor bob\r\n") and b"Received: (qmail " in data
    assert "to remote bob@remote.test" in log and "success" in log
    assert run_pqmail("queue", "stat", "--root", str(root)).stdout.startswith(b"messages in queue: 0")


def test_forward_from_dotqmail_reaches_remote_with_original_sender(seed, sink):
    root = _route(seed, sink)
    (seed["domains"] / "example.com" / ".qmail-fwd").write_text("&bob@remote.test\n")
    _inject(root, "fwd@example.com", sender="alice@isp.test", body="forward me\n")
    log = _drain(root)
    assert len(sink.messages) == 1, log
    mail_from, rcpts, data = sink.messages[0]
    assert (mail_from, rcpts) == ("alice@isp.test", ["bob@remote.test"])
    assert b"Delivered-To: example.com-fwd@example.com\r\n" in data


def test_permanent_refusal_bounces_with_remote_text(seed, sink):
    root = _route(seed, sink)
    sink.reply = "550 5.1.1 mailbox bob unknown here"
    _inject(root, "bob@remote.test", sender="joe@example.com", body="lost\n")
    log = _drain(root)
    joe = list((seed["pop"] / "ex1-0001" / "new").iterdir())
    assert len(joe) == 1, log
    text = joe[0].read_text()
    assert "Subject: failure notice" in text
    assert "<bob@remote.test>:\n" in text and "550 5.1.1 mailbox bob unknown here" in text
    assert "failure:" in log


def test_temporary_refusal_stays_queued_with_next_attempt(seed, sink):
    root = _route(seed, sink)
    sink.reply = "451 4.3.0 try later"
    _inject(root, "bob@remote.test")
    log = _drain(root)
    assert "deferral" in log and "451 4.3.0 try later" in log
    listing = run_pqmail("queue", "--root", str(root)).stdout.decode()
    assert "\tremote\tbob@remote.test" in listing and "next attempt in" in listing
    assert "last attempt: " in listing and "451 4.3.0 try later" in listing
    sink.reply = None
    # qmail's first remote retry is 400 s later: a flush (SIGALRM) makes it now
    run_pqmail("send", "--drain", "--root", str(root))  # nothing due yet: stays
    assert sink.messages == []
