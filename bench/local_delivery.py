"""Benchmark: pqmail send delivering 10,000 queued 4 KB messages into 1,000 Maildirs, fsync on.

Set-up (not timed): a fresh root with one virtual domain, 1,000 Maildirs reached through
``.qmail-uN`` files, and 10,000 messages enqueued through the queue's own API (threads, so the
enqueue fsyncs overlap). Timed: ``pqmail send --drain`` from start to exit, i.e. preprocessing,
local delivery (Maildir write + fsync + link + directory fsync) and queue clean-up of every message.

Each run works in a new directory under --dir and removes the trees of earlier runs only after its
measurement: on ext4 without a journal (as on the CI machines) creating a file skips every inode
freed in the last five minutes of its block group one by one, so a run set up right where the
previous run's 20,000 files were just deleted measures that deletion more than pqmail. --dir is
marked ``chattr +T`` (ext4's top-of-hierarchy flag) when possible, so each run's directories are
spread to other block groups.

Usage: python bench/local_delivery.py [--messages 10000] [--boxes 1000] [--size 4096]
       [--concurrency 10] [--dir /tmp/pqbench-local]
Last line: ``local delivery: X msgs/s (N messages, B boxes, S bytes, T s, host steal P% of the CPUs)``
(steal is CPU time the hypervisor gave to other guests during the run: compare runs where it is low)
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PQMAIL = [sys.executable, "-m", "pqmail.cli.main"]


def sh(*args: str) -> None:
    subprocess.run([*PQMAIL, *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--boxes", type=int, default=1000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--concurrency", type=int, default=10, help="control/concurrencylocal")
    ap.add_argument("--dir", default="/tmp/pqbench-local")
    a = ap.parse_args()

    from pqmail.maildir import maildirmake
    from pqmail.queue.store import Queue

    parent = Path(a.dir)
    parent.mkdir(parents=True, exist_ok=True)
    parent.chmod(0o755)
    subprocess.run(["chattr", "+T", str(parent)], stderr=subprocess.DEVNULL, check=False)
    earlier = [p for p in parent.iterdir() if p.name.startswith("run-")]
    top = Path(tempfile.mkdtemp(prefix="run-", dir=parent))
    top.chmod(0o755)
    root, base = top / "root", top / "popmail"
    base.mkdir()
    owner = "nobody" if os.geteuid() == 0 else getpass.getuser()
    sh("init", "--root", str(root), "--me", "mx.bench.test", "--owner", owner)
    sh("domain", "add", "bench.test", "--handle", "bn1", "--base", str(base), "--root", str(root))
    (root / "control" / "concurrencylocal").write_text(f"{a.concurrency}\n")
    home = base / "b" / "bn1" / "DOMAINS" / "bench.test"
    import pwd

    pw = pwd.getpwnam(owner)
    boxes = top / "boxes"
    boxes.mkdir()
    os.chown(boxes, pw.pw_uid, pw.pw_gid)
    for i in range(a.boxes):
        md = boxes / f"u{i}"
        maildirmake(md, uid=pw.pw_uid, gid=pw.pw_gid)
        dq = home / f".qmail-u{i}"
        dq.write_text(f"{md}/\n")
        os.chown(dq, pw.pw_uid, pw.pw_gid)

    q = Queue(root / "queue")
    filler = ("x" * 76 + "\n") * (a.size // 77)
    def one(i: int) -> None:
        body = f"From: load@bench.test\nTo: u{i % a.boxes}@bench.test\nSubject: m{i}\n\n{filler}"
        q.enqueue("load@bench.test", [f"u{i % a.boxes}@bench.test"], body.encode())
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(a.messages)))

    steal0 = _steal_ticks()
    t0 = time.monotonic()
    subprocess.run([*PQMAIL, "send", "--drain", "--root", str(root)], check=True,
                   stderr=subprocess.DEVNULL)
    dt = time.monotonic() - t0
    steal = (_steal_ticks() - steal0) / os.sysconf("SC_CLK_TCK") / (dt * (os.cpu_count() or 1))
    delivered = sum(len(os.listdir(boxes / f"u{i}" / "new")) for i in range(a.boxes))
    if delivered != a.messages:
        sys.exit(f"only {delivered} of {a.messages} messages delivered")
    for old in earlier:
        shutil.rmtree(old, ignore_errors=True)
    print(f"local delivery: {a.messages / dt:.0f} msgs/s ({a.messages} messages, {a.boxes} boxes, "
          f"{a.size} bytes, {dt:.2f} s, host steal {100 * steal:.0f}% of the CPUs)")


def _steal_ticks() -> int:
    """CPU time the hypervisor gave to other guests (/proc/stat): a run with much of it says little."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8])
    except (OSError, IndexError, ValueError):
        return 0


if __name__ == "__main__":
    main()
