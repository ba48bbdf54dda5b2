"""Benchmark: pqmail pop3d serving 10,000 boxes of 10 x 4 KB messages to C concurrent clients.

Set-up (not timed): a fresh root (``pqmail init``), 10,000 box Maildirs in the provisioning layout
(``BASE/b/bNN/POP/bNN-NNNN``) and their lines in users/poppasswd, compiled to users/poppasswd.cdb by
the PasswordStore. Per scheme the stored hashes are SHA512-CRYPT (``$6$``, glibc's default 5,000
rounds, a distinct salt and password per box, as imported from an existing installation) or pqmail's
argon2id default (``--argon2-distinct`` distinct password/hash pairs shared round-robin: hashing
10,000 of them would take most of an hour, and verifying costs the same either way).

Timed, per scheme and client count C: /work/shared/bench/maildir_fill.py puts 10 messages into each
box of the run, ``pqmail pop3d`` starts afresh (so no verification is remembered from an earlier
run), and /work/shared/bench/pop3_load.py runs C concurrent clients that log in (USER/PASS), STAT,
UIDL, RETR every message, DELE every message and QUIT, one session per box, each box once.

Usage: python bench/pop3.py [--schemes sha512-crypt,argon2id] [--clients 1,20,100] [--sessions 2000]
       [--argon2-sessions 100] [--boxes 10000] [--dir /tmp/pqbench-pop3] [--port 11110]
Last line: ``pop3 bench (C=20): sha512-crypt X logins/s, Y msgs/s; argon2id X logins/s, Y msgs/s``
"""

from __future__ import annotations

import argparse
import getpass
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

PQMAIL = [sys.executable, "-m", "pqmail.cli.main"]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "bench"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/bench")


def sh(*args: str) -> None:
    subprocess.run([*PQMAIL, *args], check=True, stdout=subprocess.DEVNULL)


def sha512_crypt(pw: str) -> str:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from passlib.hash import sha512_crypt as h

        return h.using(rounds=5000).hash(pw)


def argon2id(pw: str) -> str:
    from pqmail.passwords import hash_password

    return hash_password(pw)


def make_boxes(base: Path, n: int, owner: pwd.struct_passwd) -> list[tuple[str, Path]]:
    out = []
    for i in range(n):
        handle = f"b{i // 1000:02d}"
        box = f"{handle}-{i % 1000:04d}"
        md = base / handle[0] / handle / "POP" / box
        for sub in ("tmp", "new", "cur"):
            (md / sub).mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            for p in (md, md / "tmp", md / "new", md / "cur"):
                os.chown(p, owner.pw_uid, owner.pw_gid)
        out.append((box, md))
    if os.geteuid() == 0:
        for d in {md.parent for _, md in out} | {md.parent.parent for _, md in out} | \
                 {md.parent.parent.parent for _, md in out}:
            d.chmod(0o755)
    return out


def write_store(root: Path, boxes: list[tuple[str, Path]], scheme: str, distinct: int,
                owner: pwd.struct_passwd) -> list[str]:
    """Hash the passwords, write users/poppasswd and compile its cdb; return the passwords."""
    from pqmail.passwords import PasswordStore
    from pqmail.paths import Root

    passwords = [f"pw-{scheme}-{i}" for i in range(len(boxes))]
    if scheme == "argon2id":
        pairs = [(f"pw-argon2-{i}",) for i in range(min(distinct, len(boxes)))]
        with ProcessPoolExecutor() as ex:
            hashes = list(ex.map(argon2id, [p[0] for p in pairs]))
        passwords = [pairs[i % len(pairs)][0] for i in range(len(boxes))]
        stored = [hashes[i % len(hashes)] for i in range(len(boxes))]
    else:
        with ProcessPoolExecutor() as ex:
            stored = list(ex.map(sha512_crypt, passwords, chunksize=200))
    users = root / "users"
    lines = [f"{b}:{h}:{md}\n" for (b, md), h in zip(boxes, stored, strict=True)]
    (users / "poppasswd").write_text("".join(lines))
    ids = (owner.pw_uid, owner.pw_gid) if os.geteuid() == 0 else (None, None)
    PasswordStore(Root(root), *ids).compile()
    if os.geteuid() == 0:
        os.chown(users / "poppasswd", *ids)
    return passwords


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pop3d(root: Path, port: int, log: Path) -> subprocess.Popen:
    from pqmail.cli.main import COMMANDS

    cmd = [*PQMAIL, "pop3d"] if "pop3d" in COMMANDS else [sys.executable, "-m", "pqmail.cli.pop3d_cmd"]
    with open(log, "ab") as logf:
        proc = subprocess.Popen([*cmd, "--root", str(root), "--listen", f"127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=logf)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"pop3d exited {proc.returncode}; see {log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise SystemExit("pop3d did not start")


def run(a: argparse.Namespace, root: Path, users: Path, scheme: str, clients: int, offset: int,
        sessions: int, log: Path) -> tuple[float, float]:
    subprocess.run([sys.executable, str(SHARED / "maildir_fill.py"), "--users", str(users),
                    "--offset", str(offset), "--boxes", str(sessions), "--messages", "10", "--size", "4096",
                    "--clean"], check=True, stdout=subprocess.DEVNULL)
    port = a.port or free_port()
    proc = start_pop3d(root, port, log)
    try:
        p = subprocess.run([sys.executable, str(SHARED / "pop3_load.py"), "--port", str(port),
                            "--users", str(users), "--offset", str(offset), "--boxes", str(sessions),
                            "-c", str(clients), "--expect", "10", "--server-pid", str(proc.pid)],
                           capture_output=True, text=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    m = re.search(r"pop3 ([\d.]+) logins/s, ([\d.]+) msgs/s", last)
    if p.returncode != 0 or not m:
        sys.stderr.write(p.stdout + p.stderr)
        raise SystemExit(f"pop3_load failed ({scheme}, C={clients})")
    cpu = re.search(r"server_cpu_s\s+(\S+)", p.stdout)
    print(f"{scheme:13} C={clients:<3} sessions={sessions:<5} {last}"
          f"{f' server_cpu_s={cpu.group(1)}' if cpu else ''}", flush=True)
    return float(m.group(1)), float(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="sha512-crypt,argon2id")
    ap.add_argument("--clients", default="1,20,100")
    ap.add_argument("--boxes", type=int, default=10000)
    ap.add_argument("--sessions", type=int, default=2000, help="sessions (= boxes used) per SHA512 run")
    ap.add_argument("--argon2-sessions", type=int, default=100, help="sessions per argon2id run")
    ap.add_argument("--argon2-distinct", type=int, default=64, help="distinct argon2id passwords")
    ap.add_argument("--dir", default="/tmp/pqbench-pop3")
    ap.add_argument("--port", type=int, default=0, help="default: a free port per run")
    a = ap.parse_args()
    schemes = [s for s in a.schemes.split(",") if s]
    counts = [int(c) for c in a.clients.split(",") if c]

    top = Path(a.dir)
    shutil.rmtree(top, ignore_errors=True)
    top.mkdir(parents=True)
    top.chmod(0o755)
    root, base = top / "root", top / "popmail"
    base.mkdir()
    owner_name = "nobody" if os.geteuid() == 0 else getpass.getuser()
    owner = pwd.getpwnam(owner_name)
    t0 = time.monotonic()
    sh("init", "--root", str(root), "--me", "bench.test", "--owner", owner_name)
    control = root / "control"
    limits = {"concurrencypop3": 2000, "concurrencypop3perip": 2000, "pop3authfailures": 0}
    for name, value in limits.items():
        (control / name).write_text(f"{value}\n")
    boxes = make_boxes(base, a.boxes, owner)
    print(f"set-up: {len(boxes)} boxes in {time.monotonic() - t0:.1f}s", flush=True)
    log = top / "pop3d.log"
    summary: dict[str, tuple[float, float]] = {}
    for scheme in schemes:
        t0 = time.monotonic()
        passwords = write_store(root, boxes, scheme, a.argon2_distinct, owner)
        users = top / f"users-{scheme}.tsv"
        rows = [f"{b} {pw} {md} {b}\n" for (b, md), pw in zip(boxes, passwords, strict=True)]
        users.write_text("".join(rows))
        print(f"set-up: {scheme} hashes in {time.monotonic() - t0:.1f}s", flush=True)
        sessions = a.argon2_sessions if scheme == "argon2id" else a.sessions
        offset = 0
        for c in counts:
            if offset + sessions > len(boxes):
                offset = 0
            result = run(a, root, users, scheme, c, offset, sessions, log)
            offset += sessions
            if c == 20 or scheme not in summary:
                summary[scheme] = result
    shown = "20" if 20 in counts else str(counts[-1])
    print(f"pop3 bench (C={shown}): " + "; ".join(f"{s} {li:.0f} logins/s, {ms:.0f} msgs/s"
                                                  for s, (li, ms) in summary.items()))


if __name__ == "__main__":
    main()
