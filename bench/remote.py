"""Benchmark: remote delivery of 10,000 messages to 100 domains, each routed to a loopback SMTP sink.

Set-up (not timed): a fresh root whose control/smtproutes sends ``dNNN.bench`` to its own sink port on
127.0.0.1 (one sink process serves all 100 ports: a minimal asyncio SMTP receiver that accepts
everything), and 10,000 message files (``--size`` bytes each) on disk, message i for domain i mod 100.
Timed: :meth:`pqmail.remote.RemoteEngine.deliver` for every message, ``concurrencyremote`` (20)
deliveries at a time, each reading its message from disk; connections are reused as the engine does.

Until the queue manager drives remote delivery, this calls the engine directly; it will become
``pqmail send --drain`` over a queue of the same messages.

Usage: python bench/remote.py [--messages 10000] [--domains 100] [--size 2048] [--concurrency 20]
       [--dir /tmp/pqbench-remote]
Last line: ``remote delivery: X msgs/s (N messages, D domains, S bytes, T s)``
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# ----------------------------------------------------------------------------- the sink process

EHLO_REPLY = b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n"


class SinkProtocol(asyncio.Protocol):
    """Accepts every command and every message; counts messages."""

    count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""
        self.in_data = False
        transport.write(b"220 sink.bench ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.buf = self.buf[end + 5:]
                self.in_data = False
                SinkProtocol.count += 1
                self.transport.write(b"250 ok\r\n")
                continue
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            verb, self.buf = self.buf[:4].upper(), self.buf[end + 2:]
            if verb in (b"EHLO", b"HELO"):
                self.transport.write(EHLO_REPLY)
            elif verb == b"DATA":
                self.in_data = True
                self.buf = b"\r\n" + self.buf  # so an empty message's ".\r\n" ends it too
                self.transport.write(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                self.transport.write(b"221 bye\r\n")
                self.transport.close()
                return
            else:
                self.transport.write(b"250 ok\r\n")


async def run_sink(ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(SinkProtocol, "127.0.0.1", p, backlog=512) for p in ports]
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for s in servers:
        s.close()
    print(SinkProtocol.count, flush=True)


# ----------------------------------------------------------------------------- the bench

def free_ports(n: int) -> list[int]:
    import socket

    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def setup(top: Path, a: argparse.Namespace, ports: list[int]) -> tuple[Path, list[tuple[str, str, Path]]]:
    root = top / "root"
    control = root / "control"
    control.mkdir(parents=True)
    (control / "me").write_text("mx.bench.test\n")
    (control / "concurrencyremote").write_text(f"{a.concurrency}\n")
    routes = "".join(f"d{i:03d}.bench:127.0.0.1:{p}\n" for i, p in enumerate(ports))
    (control / "smtproutes").write_text(routes)
    mess = top / "mess"
    mess.mkdir()
    filler = b"x" * 76 + b"\n"
    jobs = []
    for i in range(a.messages):
        domain = f"d{i % a.domains:03d}.bench"
        head = (f"Received: (qmail 1 invoked by uid 1000); 1 Jan 2026 00:00:00 -0000\n"
                f"From: sender@mx.bench.test\nTo: user{i}@{domain}\nSubject: bench {i}\n\n").encode()
        body = filler * max(1, (a.size - len(head)) // len(filler))
        path = mess / str(i)
        path.write_bytes(head + body)
        jobs.append((domain, f"user{i}@{domain}", path))
    return root, jobs


async def deliver_all(root: Path, jobs: list[tuple[str, str, Path]], concurrency: int) -> tuple[int, dict]:
    from pqmail.config.control import load_control
    from pqmail.paths import Root
    from pqmail.remote import RemoteEngine

    control = load_control(Root(root))
    engine = RemoteEngine(lambda: control, root)
    pending = iter(jobs)
    statuses: dict[str, int] = {}
    sample: dict[str, str] = {}

    async def worker() -> None:
        for domain, rcpt, path in pending:
            [r] = await engine.deliver(domain, "sender@mx.bench.test", [rcpt], path)
            statuses[r.status] = statuses.get(r.status, 0) + 1
            sample.setdefault(r.status, r.report)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await engine.close()
    return statuses.get("K", 0), {s: (n, sample[s]) for s, n in statuses.items() if s != "K"}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--sink":
        asyncio.run(run_sink([int(p) for p in sys.argv[2:]]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--domains", type=int, default=100)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--concurrency", type=int, default=20, help="control/concurrencyremote")
    ap.add_argument("--dir", default="/tmp/pqbench-remote")
    a = ap.parse_args()

    top = Path(a.dir)
    shutil.rmtree(top, ignore_errors=True)
    top.mkdir(parents=True)
    ports = free_ports(a.domains)
    sink = subprocess.Popen([sys.executable, __file__, "--sink", *map(str, ports)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        root, jobs = setup(top, a, ports)
        started = time.monotonic()
        delivered, other = asyncio.run(deliver_all(root, jobs, a.concurrency))
        elapsed = time.monotonic() - started
    finally:
        sink.send_signal(signal.SIGTERM)
        received = sink.communicate(timeout=30)[0].strip()
    for status, (n, report) in other.items():
        print(f"{n} results {status}, e.g.: {report!r}")
    print(f"sink received {received} messages; the engine reported {delivered} delivered")
    print(f"remote delivery: {delivered / elapsed:.0f} msgs/s ({a.messages} messages, {a.domains} domains, "
          f"{a.size} bytes, {elapsed:.2f} s)")
    shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
