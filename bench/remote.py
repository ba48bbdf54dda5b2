"""Benchmark: remote delivery of 10,000 messages to 100 domains, each routed to a loopback SMTP sink.

Set-up (not timed): a fresh root (``pqmail init``) whose control/smtproutes sends ``dNNN.bench`` to
its own sink port on 127.0.0.1 (one sink process serves all 100 ports: a minimal asyncio SMTP
receiver that accepts everything), and 10,000 messages (``--size`` bytes each) queued through the
queue's own API, message i for domain i mod 100.
Timed: ``pqmail send --drain`` from start to exit: preprocessing, remote delivery
(``concurrencyremote`` at a time, connections reused) and queue clean-up of every message.

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


def setup(top: Path, a: argparse.Namespace, ports: list[int]) -> Path:
    """A fresh root routing dNNN.bench to the sinks, with ``a.messages`` messages queued."""
    import getpass
    import os
    from concurrent.futures import ThreadPoolExecutor

    from pqmail.queue.store import Queue

    root = top / "root"
    owner = "nobody" if os.geteuid() == 0 else getpass.getuser()
    subprocess.run([sys.executable, "-m", "pqmail.cli.entry", "init", "--root", str(root),
                    "--me", "mx.bench.test", "--owner", owner], check=True, stdout=subprocess.DEVNULL)
    control = root / "control"
    (control / "concurrencyremote").write_text(f"{a.concurrency}\n")
    (control / "smtproutes").write_text("".join(f"d{i:03d}.bench:127.0.0.1:{p}\n"
                                                for i, p in enumerate(ports)))
    q = Queue(root / "queue")
    filler = b"x" * 76 + b"\n"

    def one(i: int) -> None:
        domain = f"d{i % a.domains:03d}.bench"
        head = f"From: sender@mx.bench.test\nTo: user{i}@{domain}\nSubject: bench {i}\n\n".encode()
        body = filler * max(1, (a.size - len(head)) // len(filler))
        q.enqueue("sender@mx.bench.test", [f"user{i}@{domain}"], head + body)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(a.messages)))
    return root


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
        root = setup(top, a, ports)
        started = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "pqmail.cli.entry", "send", "--drain", "--root", str(root)],
                           stderr=subprocess.PIPE, text=True)
        elapsed = time.monotonic() - started
    finally:
        sink.send_signal(signal.SIGTERM)
        received = int(sink.communicate(timeout=30)[0].strip() or 0)
    successes = p.stderr.count(": success: ")
    problems = [ln for ln in p.stderr.splitlines() if ": deferral: " in ln or ": failure: " in ln]
    if p.returncode or problems:
        print(f"pqmail send exited {p.returncode}; {len(problems)} deferrals/failures, e.g. {problems[:1]}")
    print(f"sink received {received} messages; pqmail send logged {successes} successful deliveries")
    print(f"remote delivery: {successes / elapsed:.0f} msgs/s ({a.messages} messages, {a.domains} domains, "
          f"{a.size} bytes, concurrencyremote {a.concurrency}, {elapsed:.2f} s)")
    shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
