"""Benchmark: wall time of injecting one small message with ``sendmail`` and with ``pqmail inject``.

Cron jobs and web applications start one of these per message, so start-up time is what counts
(target: median at most 80 ms). Set-up (not timed): a fresh root with a minimal ``control/`` and a
queue made by the store's make_queue; the package is byte-compiled first, as an installed package
is (``PYTHONDONTWRITEBYTECODE``, set in some sandboxes, would otherwise make every run compile
pqmail's modules again; ``--no-compile`` measures that case). Timed: each process from start to
exit, message durably queued (fsync on), as a subprocess reading the message on stdin.

Usage: python bench/inject_latency.py [--runs 50] [--dir /tmp/pqbench-inject] [--no-compile]
Last line: ``inject latency: sendmail median X ms, pqmail inject median Y ms (N runs each)``
"""

from __future__ import annotations

import argparse
import compileall
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

MESSAGE = (b"From: Web Shop <shop@example.com>\nTo: Customer <joe@example.com>\n"
           b"Subject: your order\n\nThank you for your order.\n")


def command(name: str) -> list[str]:
    """The installed console script beside this interpreter, else the module."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "pqmail.cli.sendmail" if name == "sendmail" else "pqmail.cli.entry"]


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(argv: list[str], env: dict[str, str], runs: int,
            warmup: int = 3) -> tuple[list[float], list[float]]:
    """(wall times, CPU times) in ms; CPU time tells start-up cost apart from a busy machine."""
    times, cpu = [], []
    for i in range(warmup + runs):
        c0 = _child_cpu()
        t0 = time.perf_counter()
        p = subprocess.run(argv, input=MESSAGE, env=env, capture_output=True)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.decode(errors='replace')}")
        if i >= warmup:
            times.append(dt * 1000)
            cpu.append((_child_cpu() - c0) * 1000)
    return times, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--dir", default="/tmp/pqbench-inject")
    ap.add_argument("--no-compile", action="store_true", help="do not byte-compile the package first")
    a = ap.parse_args()

    import pqmail
    from pqmail.queue.store import Queue, make_queue

    if not a.no_compile:
        compileall.compile_dir(os.path.dirname(pqmail.__file__), quiet=1)
    top = Path(a.dir)
    shutil.rmtree(top, ignore_errors=True)
    root = top / "root"
    (root / "control").mkdir(parents=True)
    (root / "control" / "me").write_text("mx.bench.test\n")
    make_queue(root / "queue")
    env = {**os.environ, "PQMAIL_ROOT": str(root), "USER": "bench"}

    results = {}
    for label, argv in (("sendmail", [*command("sendmail"), "-t", "-i"]),
                        ("pqmail inject", [*command("pqmail"), "inject", "-t"])):
        times, cpu = measure(argv, env, a.runs)
        results[label] = statistics.median(times)
        q = sorted(times)
        print(f"{label:14s} median {results[label]:6.1f} ms  min {q[0]:6.1f}  "
              f"p90 {q[int(len(q) * 0.9) - 1]:6.1f}  max {q[-1]:6.1f}  "
              f"(CPU median {statistics.median(cpu):5.1f} ms)")
    queued = len(Queue(root / "queue").list_todo())
    if queued != 2 * (a.runs + 3):
        sys.exit(f"expected {2 * (a.runs + 3)} queued messages, found {queued}")
    shutil.rmtree(top, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"inject latency: sendmail median {results['sendmail']:.1f} ms, "
          f"pqmail inject median {results['pqmail inject']:.1f} ms ({a.runs} runs each)")


if __name__ == "__main__":
    main()
