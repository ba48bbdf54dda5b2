"""The smtpd's direct path (QmailSMTP answering from data_received, without a Task), in-process.

However the client's bytes are cut into reads, the dialogue and the queued messages are the same:
the terminator CRLF.CRLF split across reads, pipelined commands waiting behind a message being
queued, an overlong line, a client leaving inside DATA.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from pqmail.paths import Root
from pqmail.smtp.server import QmailSMTP, SmtpService

SESSION = (b"HELO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\n"
           b"Subject: one\r\n\r\n..dot\r\nline\r\n.\r\n"
           b"MAIL FROM:<c@d.test>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\n.\r\n"
           b"NOOP " + b"y" * 1500 + b"\r\nNOOP\r\nQUIT\r\n")
REPLIES = [b"220 mx.isp.test ESMTP", b"250 mx.isp.test", b"250 2.1.0 ok", b"250 2.1.5 ok", b"354 go ahead",
           b"250 2.0.0 ok T qp N", b"250 2.1.0 ok", b"250 2.1.5 ok", b"354 go ahead", b"250 2.0.0 ok T qp N",
           b"500 5.5.2 line too long (#5.5.2)", b"250 2.0.0 ok", b"221 2.0.0 mx.isp.test"]


class FakeTransport(asyncio.Transport):
    """What the protocol writes, and whether it closed or paused reading."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("192.0.2.7", 4242), "sockname": ("192.0.2.1", 25)}.get(name, default)

    def write(self, data: Any) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


async def _session(root: Root, chunks: list[bytes], eof: bool = False) -> tuple[list[bytes], list[str],
                                                                                 list[bytes]]:
    """Feed ``chunks`` to one session; (replies, log lines, queued messages after the Received lines)."""
    log: list[str] = []
    service = SmtpService(root, log.append)
    try:
        proto = QmailSMTP(service, "smtp")
        transport = FakeTransport()
        proto.connection_made(transport)
        for chunk in chunks:
            assert transport.reading
            proto.data_received(chunk)
        if eof:
            proto.eof_received()
        while service.inflight:  # each message's reply lets the commands behind it run
            await asyncio.gather(*list(service.inflight))
        assert transport.closed
        proto.connection_lost(None)
    finally:
        service.close()
    replies = [re.sub(rb"^250 2\.0\.0 ok \d+ qp \d+$", b"250 2.0.0 ok T qp N", line)
               for line in bytes(transport.out).split(b"\r\n")[:-1]]
    q = service.queue
    queued = sorted(q.message_path(mid).read_bytes().split(b"\n", 3)[3] for mid in q.list_todo())
    return replies, log, queued


def _cut(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [len(SESSION), 1, 2, 3, 4, 5, 7, 64, 1000])
def test_any_split_of_the_input_gives_the_same_session(seed, size):
    root = Root(seed["root"])
    replies, log, queued = asyncio.run(_session(root, _cut(SESSION, size)))
    assert replies == REPLIES
    assert queued == [b"", b"Subject: one\n\n.dot\nline\n"]
    assert [line.split()[-1] for line in log if line.startswith("session ")] == ["end=quit"]
    assert sum(" accepted: from 192.0.2.7 " in line for line in log) == 2


def test_terminator_split_at_every_byte(seed):
    root = Root(seed["root"])
    head = b"HELO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\n"
    body = b"S: x\r\n\r\nab\r\n.\r\nQUIT\r\n"
    end = body.index(b"\r\n.\r\n")
    for cut in range(end - 1, end + 6):
        replies, _, queued = asyncio.run(_session(root, [head, body[:cut], body[cut:]]))
        assert replies[-2:] == [b"250 2.0.0 ok T qp N", b"221 2.0.0 mx.isp.test"], cut
        assert queued[-1:] == [b"S: x\n\nab\n"], cut


def test_eof_inside_data_queues_nothing(seed):
    root = Root(seed["root"])
    start = (b"HELO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\n"
             b"Subject: cut\r\n\r\nz\r\n.")
    replies, log, queued = asyncio.run(_session(root, [start], eof=True))
    assert replies[-1] == b"354 go ahead"
    assert queued == []
    assert [line.split()[-1] for line in log if line.startswith("session ")] == ["end=drop-in-data"]


def test_pipelined_input_waits_while_a_message_is_queued(seed):
    root = Root(seed["root"])
    one = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\nx\r\n.\r\n"
    replies, _, queued = asyncio.run(_session(root, [b"EHLO x\r\n" + one * 3 + b"QUIT\r\n"]))
    assert replies[-1] == b"221 2.0.0 mx.isp.test"
    assert replies.count(b"250 2.0.0 ok T qp N") == 3
    assert queued == [b"x\n"] * 3
