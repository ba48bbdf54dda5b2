"""Crash safety of injection: an inject killed mid-write leaves no message that can be delivered.

The message arrives slowly on a pipe; once the store is writing it (its mess file holds more than
the pre-read), the writer is checked to keep its file against a concurrent clean-up, then killed
with SIGKILL. What the queue manager does at start (Queue.cleanup_stale, then list_todo) must find
nothing to deliver and leave no trace of the partial message.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import PQMAIL
from pqmail.inject import PREREAD
from pqmail.queue.store import SPLIT, Queue, make_queue


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "control").mkdir(parents=True)
    (root / "control" / "me").write_text("mx.isp.test\n")
    make_queue(root / "queue")
    return root


def _mess_files(root: Path) -> list[Path]:
    return [p for n in range(SPLIT) for p in (root / "queue" / "mess" / str(n)).iterdir()]


def _wait_for_partial(root: Path, proc: subprocess.Popen, size: int) -> Path:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the inject exited before it was killed"
        for p in _mess_files(root):
            try:
                if p.stat().st_size >= size:
                    return p
            except FileNotFoundError:
                pass
        time.sleep(0.005)  # polling the observable event: the message file growing
    raise AssertionError("the message file never reached the expected size")


@pytest.mark.parametrize("command", ["pqmail inject", "sendmail"])
def test_sigkill_mid_write_is_never_delivered(tmp_path: Path, command: str):
    root = _root(tmp_path)
    if command == "sendmail":
        argv = [sys.executable, "-m", "pqmail.cli.sendmail", "joe@example.com"]
    else:
        argv = [*PQMAIL, "inject", "--root", str(root), "joe@example.com"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PQMAIL_ROOT": str(root)})
    stall = threading.Event()

    def feed() -> None:  # more than the pre-read, then nothing more: the inject blocks reading
        try:
            proc.stdin.write(b"Subject: partial\n\n" + b"x" * 76 + b"\n" + b"y" * (PREREAD + 50_000))
            proc.stdin.flush()
            stall.wait(60)
        except BrokenPipeError:
            pass

    feeder = threading.Thread(target=feed)
    feeder.start()
    q = Queue(root / "queue")
    try:
        partial = _wait_for_partial(root, proc, PREREAD)
        # A clean-up running now (the manager starting) must leave the live writer's file alone.
        assert q.cleanup_stale() == 0
        assert partial.exists()
        assert q.list_todo() == []
    finally:
        proc.kill()
        proc.wait()
        stall.set()
        feeder.join()
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass

    assert proc.returncode == -9
    assert q.counts() == (1, 0)  # the partial message is on disk, never committed
    assert q.list_todo() == [] and list(q.iter_messages()) == []

    # What pqmail send does at start: clean up, then look for work.
    assert q.cleanup_stale() >= 1
    assert q.list_todo() == [] and q.list_info() == []
    assert q.counts() == (0, 0)
    for sub in ("pid", "intd", "todo"):
        assert os.listdir(root / "queue" / sub) == [], sub


def test_inject_after_a_crash_still_works(tmp_path: Path):
    """The clean-up leaves the queue usable: the next inject is committed and listed."""
    root = _root(tmp_path)
    q = Queue(root / "queue")
    stray = root / "queue" / "pid" / "crashed"
    stray.write_bytes(b"Received: partial")
    mid = stray.stat().st_ino
    os.link(stray, root / "queue" / "mess" / str(mid % SPLIT) / str(mid))
    stray.unlink()
    p = subprocess.run([*PQMAIL, "inject", "--root", str(root), "joe@example.com"],
                       input=b"Subject: ok\n\nfine\n", capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert q.cleanup_stale() == 1
    [m] = q.iter_messages()
    assert [r.address for r in m.recipients] == ["joe@example.com"]
    assert q.message_path(m.id).read_bytes().endswith(b"Subject: ok\n\nfine\n")
