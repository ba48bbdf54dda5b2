"""Benchmark: one ``pqmail serialmail run`` empties 1,000 dial-up customers of 10 messages each.

Set-up (not timed): a fresh root (``pqmail init`` in-process), 1,000 directories ``BASE/cNNNN.test/``
with ``RELAYHOST`` pointing at a loopback sink and a Maildir holding 10 small messages each, written
as qmail-local writes them (Return-Path and Delivered-To first). The sink is Postfix's ``smtp-sink``
when installed (C, so the sink is not what is measured), else a small asyncio sink in a subprocess.
Timed: the ``serialmail run --base BASE`` process from start to exit; every message is sent, answered
250, unlinked and its directory fsync'd. The grace period between starts is 0 here (``--grace``):
with the default 1 s, 1,000 customers with mail would take at least 1,000 s by design.

Usage: python bench/serialmail.py [--customers 1000] [--messages 10] [--concurrency 10] [--grace 0]
       [--dir /tmp/pqbench-serialmail]
Last line: ``serialmail run: N messages for C customers in T s: R messages/s``
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

SINK = r"""
import asyncio, sys
async def session(r, w):
    w.write(b"220 sink ESMTP\r\n")
    data = False
    while True:
        line = await r.readline()
        if not line:
            break
        if data:
            if line == b".\r\n":
                data = False
                w.write(b"250 ok\r\n")
            continue
        verb = line[:4].upper()
        if verb == b"EHLO":
            w.write(b"250-sink\r\n250 PIPELINING\r\n")
        elif verb == b"DATA":
            data = True
            w.write(b"354 go\r\n")
        elif verb == b"QUIT":
            w.write(b"221 bye\r\n")
            break
        else:
            w.write(b"250 ok\r\n")
        await w.drain()
    w.close()
async def main():
    srv = await asyncio.start_server(session, "127.0.0.1", int(sys.argv[1]), backlog=256)
    await srv.serve_forever()
asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_sink(port: int) -> tuple[subprocess.Popen, str]:
    tool = shutil.which("smtp-sink")
    if tool:
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        cmd, name = [tool, *user, "-m", "512", f"127.0.0.1:{port}", "256"], "smtp-sink"
    else:
        cmd, name = [sys.executable, "-c", SINK, str(port)], "asyncio sink"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, name
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"the {name} did not start") from None
            time.sleep(0.05)


def _populate(base: Path, customers: int, messages: int, port: int) -> None:
    body = b"From: alice@remote.test\nSubject: waiting\n\n" + b"Some text of a typical short message.\n" * 40
    now = time.time() - 3600
    for c in range(customers):
        domain = f"c{c:04d}.test"
        d = base / domain
        for sub in ("tmp", "new", "cur"):
            os.makedirs(d / "Maildir" / sub)
        (d / "RELAYHOST").write_text(f"127.0.0.1:{port}\n")
        for m in range(messages):
            path = d / "Maildir" / "new" / f"{int(now)}.M{m}P{c}Q{m}.bench"
            path.write_bytes(f"Return-Path: <alice@remote.test>\nDelivered-To: {domain}-user{m}@{domain}\n"
                             .encode() + body)
            os.utime(path, (now + m, now + m))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--customers", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--grace", type=float, default=0.0)
    ap.add_argument("--dir", default="/tmp/pqbench-serialmail")
    args = ap.parse_args()

    from pqmail.init import init_tree
    from pqmail.paths import Root

    top = Path(args.dir)
    shutil.rmtree(top, ignore_errors=True)
    top.mkdir(parents=True)
    root = Root(top / "root")
    init_tree(root, me="mx.bench.test", owner="nobody" if os.geteuid() == 0 else None)
    base = top / "serialmail"
    port = _free_port()
    sink, sink_name = _start_sink(port)
    try:
        _populate(base, args.customers, args.messages, port)
        os.sync()
        cmd = [sys.executable, "-m", "pqmail.cli.serialmail_cmd", "run", "--root", str(root.path),
               "--base", str(base), "--concurrency", str(args.concurrency), "--grace", str(args.grace)]
        started = time.monotonic()
        p = subprocess.run(cmd, capture_output=True)
        elapsed = time.monotonic() - started
    finally:
        sink.kill()
        sink.wait()
    left = sum(len(os.listdir(base / d / "Maildir" / "new")) for d in os.listdir(base))
    total = args.customers * args.messages
    print(p.stdout.decode().strip())
    if p.returncode != 0 or left:
        print(p.stderr.decode()[-2000:], file=sys.stderr)
        raise SystemExit(f"serialmail run exited {p.returncode} with {left} messages left")
    print(f"sink: {sink_name}; concurrency {args.concurrency}; grace {args.grace:g} s")
    print(f"serialmail run: {total} messages for {args.customers} customers in {elapsed:.2f} s: "
          f"{total / elapsed:.0f} messages/s")


if __name__ == "__main__":
    main()
