"""A scriptable receiving SMTP server for the serialmail tests: the customer's host, on 127.0.0.1.

aiosmtpd in an event loop of its own thread. It counts connections, records every accepted message
with its envelope, and can answer the n-th DATA (or a given RCPT) with a chosen reply, or stall on the
n-th DATA until released (for the crash test).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP


@dataclass
class Received:
    sender: str
    rcpts: list[str]
    data: bytes


@dataclass
class Sink:
    pipelining: bool = True
    data_replies: dict[int, str] = field(default_factory=dict)  # n-th DATA (from 1) -> reply
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address -> reply
    stall_on: set[int] = field(default_factory=set)  # n-th DATA waits for release()
    messages: list[Received] = field(default_factory=list)
    connections: int = 0
    data_count: int = 0
    port: int = 0

    def __post_init__(self) -> None:
        self.stalled = threading.Event()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._release: asyncio.Event | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    # -- aiosmtpd handler hooks

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.pipelining:
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self._lock:
            self.data_count += 1
            n = self.data_count
        if n in self.stall_on:
            assert self._release is not None
            self.stalled.set()
            await self._release.wait()
        reply = self.data_replies.get(n, "250 2.0.0 accepted")
        if reply.startswith("2"):
            with self._lock:
                self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                              bytes(envelope.original_content or envelope.content)))
        return reply

    # -- control

    def start(self) -> Sink:
        sink = self

        class Counting(SMTP):
            def connection_made(self, transport):
                with sink._lock:
                    sink.connections += 1
                super().connection_made(transport)

        async def make() -> None:
            self._release = asyncio.Event()
            self._server = await self._loop.create_server(
                lambda: Counting(self, hostname="sink.test", decode_data=False), "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]

        self._thread.start()
        asyncio.run_coroutine_threadsafe(make(), self._loop).result(10)
        return self

    def release(self) -> None:
        assert self._release is not None
        self._loop.call_soon_threadsafe(self._release.set)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            if self._release is not None:
                self._release.set()
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def wait_for(self, predicate, timeout: float = 20.0) -> None:
        """Poll until ``predicate(self)`` holds (the sink's thread fills the lists)."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise AssertionError("the sink did not get there in time")
            time.sleep(0.01)
