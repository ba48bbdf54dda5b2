"""Crash safety: SIGKILL pqmail send at random points while it delivers 1,000 messages.

Every message must be delivered at least once after restarts, and the queue must end empty.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

from conftest import PQMAIL, run_pqmail

N = 1000


def _count(boxes: list[Path]) -> int:
    return sum(len(os.listdir(b / "new")) for b in boxes)


def _tokens(boxes: list[Path]) -> list[str]:
    out = []
    for b in boxes:
        for name in os.listdir(b / "new"):
            for line in (b / "new" / name).read_bytes().split(b"\n"):
                if line.startswith(b"Subject: token "):
                    out.append(line[len(b"Subject: token "):].decode())
    return out


def test_sigkill_during_delivery_loses_nothing(seed):
    from pqmail.queue.store import Queue

    root: Path = seed["root"]
    q = Queue(root / "queue")
    boxes = [seed["pop"] / f"ex1-000{i}" for i in range(3)]
    (seed["domains"] / "example.com" / ".qmail-b0").write_text(f"{boxes[0]}/\n")
    (seed["domains"] / "example.com" / ".qmail-b2").write_text(f"{boxes[2]}/\n")
    rcpts = ["b0@example.com", "joe@example.com", "b2@example.com"]
    for i in range(N):
        q.enqueue("alice@remote.test", [rcpts[i % 3]],
                  f"From: alice@remote.test\nSubject: token {i}\n\nbody {i}\n".encode())

    rng = random.Random(20261124)
    kill_points = sorted(rng.sample(range(20, N - 50), 5))
    for point in kill_points:
        proc = subprocess.Popen([*PQMAIL, "send", "--root", str(root)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while _count(boxes) < point and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # polling the observable event: files appearing in new/
        assert proc.poll() is None, "pqmail send exited on its own"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _count(boxes) < N, "delivery finished before the kill: raise N or lower the points"

    run_pqmail("send", "--drain", "--root", str(root), timeout=300)
    tokens = _tokens(boxes)
    assert set(tokens) == {str(i) for i in range(N)}
    assert len(tokens) - N <= len(kill_points) * 30  # at most the deliveries in flight are repeated
    stat = run_pqmail("queue", "stat", "--root", str(root)).stdout.decode()
    assert stat.startswith("messages in queue: 0"), stat
