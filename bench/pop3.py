"""Benchmark: pqmail pop3d serving 10,000 boxes of 10 x 4 KB messages to C concurrent clients.

Set-up (not timed): a fresh root (``pqmail init``), 10,000 box Maildirs in the provisioning layout
(``BASE/b/bNN/POP/bNN-NNNN``) and their lines in users/poppasswd, compiled to users/poppasswd.cdb by
the PasswordStore. Per scheme the stored hashes are SHA512-CRYPT (``$6$``, glibc's default 5,000
rounds, a distinct salt and password per box, as imported from an existing installation) or pqmail's
argon2id default (``--argon2-distinct`` distinct password/hash pairs shared round-robin: hashing
10,000 of them would take most of an hour, and verifying costs the same either way).

Timed, per scheme and client count C: /work/shared/bench/maildir_fill.py puts 10 messages into each
box of the run, ``pqmail pop3d`` starts afresh (so no verification is remembered from an earlier
run), and C concurrent clients log in (USER/PASS), STAT, UIDL, RETR every message, DELE every message
and QUIT, one session per box, each box once.

The clients (``--client``): ``lean`` (the default) is the load client below, one process, non-blocking
sockets on one epoll loop, a small state machine per session. It is an ordinary POP3 client (one
command, one reply, no pipelining) and checks what it receives: every status line, STAT's count against
the 10 delivered, UIDL's length against STAT, every RETR's payload (dot-unstuffed) against the octets
its ``+OK`` announced. It costs about half the CPU per session of ``pop3_load``
(/work/shared/bench/pop3_load.py, asyncio streams and a /proc sampling thread), which the server shares
the machine's two cores with. Use ``--client pop3_load`` for figures comparable with the shared
harness (and Dovecot's, measured with it). Each line shows the server's and the client's CPU
milliseconds per session.

Usage: python bench/pop3.py [--schemes sha512-crypt,argon2id] [--clients 1,20,100] [--sessions 2000]
       [--argon2-sessions 100] [--boxes 10000] [--dir /tmp/pqbench-pop3] [--port 11110]
       [--client lean|pop3_load]
Last line: ``pop3 bench (C=20): sha512-crypt X logins/s, Y msgs/s; argon2id X logins/s, Y msgs/s``
"""

from __future__ import annotations

import argparse
import getpass
import os
import pwd
import re
import selectors
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Generator
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
    args = ["--port", str(port), "--users", str(users), "--offset", str(offset), "--boxes", str(sessions),
            "-c", str(clients), "--expect", "10", "--server-pid", str(proc.pid)]
    client = [str(SHARED / "pop3_load.py")] if a.client == "pop3_load" else [__file__, "client"]
    try:
        p = subprocess.run([sys.executable, *client, *args], capture_output=True, text=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    m = re.search(r"pop3 ([\d.]+) logins/s, ([\d.]+) msgs/s", last)
    if p.returncode != 0 or not m:
        sys.stderr.write(p.stdout + p.stderr)
        raise SystemExit(f"{a.client} client failed ({scheme}, C={clients})")

    def field(name: str) -> float | None:
        f = re.search(rf"^{name}\s+(\S+)", p.stdout, re.M)
        return float(f.group(1)) if f else None

    done, server_cpu, client_cpu = field("sessions"), field("server_cpu_s"), field("client_cpu_s")
    per = ""
    if done and server_cpu is not None and client_cpu is not None:
        per = f" cpu ms/session: server {1000 * server_cpu / done:.2f}, client {1000 * client_cpu / done:.2f}"
    print(f"{scheme:13} C={clients:<3} sessions={sessions:<5} {last}{per} [load {os.getloadavg()[0]:.2f}]",
          flush=True)
    return float(m.group(1)), float(m.group(2))


# ----------------------------------------------------------------------------- the lean load client

Reply = tuple[bytes, bytes | None]  # status line, multi-line payload (dot-stuffed, CRLF line ends)
Script = Generator[tuple[bytes | None, bool], Reply, None]


class ClientError(Exception):
    pass


def pop3_session(login: str, password: str, expect: int | None, st: dict) -> Script:
    """One POP3 session as a generator: yields (command or None for the greeting, multi-line reply?),
    is sent each reply, and raises ClientError for anything a real client would not accept."""

    def ok(reply: Reply, what: str) -> bytes:
        if not reply[0].startswith(b"+OK"):
            raise ClientError(f"{what} -> {reply[0][:80]!r}")
        return reply[0]

    ok((yield None, False), "greeting")
    ok((yield b"USER %s\r\n" % login.encode(), False), "USER")
    ok((yield b"PASS %s\r\n" % password.encode(), False), "PASS")
    st["logins"] += 1
    n = int(ok((yield b"STAT\r\n", False), "STAT").split()[1])
    if expect is not None and n != expect:
        st["mismatch"] += 1
    uidl = yield b"UIDL\r\n", True
    ok(uidl, "UIDL")
    if uidl[1] is None or uidl[1].count(b"\r\n") != n:
        raise ClientError(f"UIDL did not list {n} messages")
    for k in range(1, n + 1):
        status, body = yield b"RETR %d\r\n" % k, True
        ok((status, body), f"RETR {k}")
        assert body is not None
        # the octets announced are the message's, before dot-stuffing: a leading "." was doubled
        stuffed = body.count(b"\r\n..") + body.startswith(b"..")
        m = re.match(rb"\+OK (\d+) octets", status)
        if not body or (m and int(m.group(1)) != len(body) - stuffed):
            raise ClientError(f"RETR {k}: {len(body) - stuffed} octets, announced {status[:40]!r}")
        st["msgs"] += 1
        st["bytes"] += len(body)
    for k in range(1, n + 1):
        ok((yield b"DELE %d\r\n" % k, False), f"DELE {k}")
    ok((yield b"QUIT\r\n", False), "QUIT")


class _Conn:
    __slots__ = ("box", "buf", "multi", "script", "sock", "t0")

    def __init__(self, sock: socket.socket, script: Script, box: str) -> None:
        self.sock, self.script, self.box = sock, script, box
        self.buf = bytearray()
        self.multi = False
        self.t0 = time.monotonic()

    def reply(self) -> Reply | None:
        """The complete reply in the buffer (removed from it), or None."""
        buf = self.buf
        i = buf.find(b"\r\n")
        if i < 0:
            return None
        if not self.multi or not buf.startswith(b"+OK"):
            status = bytes(buf[:i])
            del buf[:i + 2]
            return status, None
        j = buf.find(b"\r\n.\r\n", i)  # from the status line's CRLF: an empty listing ends right there
        if j < 0:
            return None
        status, payload = bytes(buf[:i]), bytes(buf[i + 2:j + 2])
        del buf[:j + 5]
        return status, payload


def lean_client(argv: list[str]) -> None:
    """``bench/pop3.py client ...``: the load client; prints what pop3_load.py prints (the fields
    bench/pop3.py reads). Server CPU is read from /proc at the start and the end only."""
    sys.path.insert(0, str(SHARED))
    from _benchlib import load_users, median, pids_from, tree, tree_cpu

    ap = argparse.ArgumentParser(prog="bench/pop3.py client")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--users", required=True)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--boxes", type=int, default=1000)
    ap.add_argument("--concurrency", "-c", type=int, default=20)
    ap.add_argument("--expect", type=int)
    ap.add_argument("--server-pid")
    ap.add_argument("--max-errors", type=int, default=20)
    a = ap.parse_args(argv)
    boxes = load_users(a.users)[a.offset:a.offset + a.boxes]
    roots = pids_from(a.server_pid)
    st = {"logins": 0, "msgs": 0, "bytes": 0, "mismatch": 0, "sessions": 0}
    errors: list[str] = []
    login_lat: list[float] = []
    sel = selectors.EpollSelector()
    todo = iter(boxes)

    def start() -> bool:
        box = next(todo, None)
        if box is None:
            return False
        sock = socket.create_connection((a.host, a.port))  # loopback: connected at once
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        c = _Conn(sock, pop3_session(box.login, box.password, a.expect, st), box.login)
        next(c.script)  # to the greeting
        sel.register(sock, selectors.EVENT_READ, c)
        return True

    def end(c: _Conn, error: str | None) -> None:
        sel.unregister(c.sock)
        c.sock.close()
        if error is not None:
            errors.append(f"{c.box}: {error}")
        else:
            st["sessions"] += 1
        if len(errors) <= a.max_errors:
            start()

    server0 = tree_cpu(tree(roots)) if roots else 0.0
    ru0 = os.times()
    t0 = time.monotonic()
    for _ in range(a.concurrency):
        if not start():
            break
    while sel.get_map():
        for key, _ in sel.select():
            c = key.data
            try:
                data = c.sock.recv(1 << 16)
            except ConnectionError as e:
                end(c, str(e))
                continue
            if not data:
                end(c, "server closed the connection")
                continue
            c.buf += data
            try:
                while (r := c.reply()) is not None:
                    logins = st["logins"]
                    cmd, c.multi = c.script.send(r)
                    if st["logins"] != logins:
                        login_lat.append(time.monotonic() - c.t0)
                    assert cmd is not None
                    c.sock.send(cmd)  # a command line always fits an empty socket buffer
            except StopIteration:
                end(c, None if not c.buf else "data after the QUIT reply")
            except (ClientError, OSError, ValueError, IndexError) as e:
                end(c, str(e))
    wall = time.monotonic() - t0
    ru1 = os.times()
    server_cpu = tree_cpu(tree(roots)) - server0 if roots else None
    client_cpu = ru1.user - ru0.user + ru1.system - ru0.system
    rec = {"sessions": st["sessions"], "logins": st["logins"], "messages": st["msgs"],
           "wall_s": round(wall, 3),
           "login_ms_p50": round(1000 * median(login_lat), 2) if login_lat else None,
           "stat_mismatch": st["mismatch"], "errors": len(errors), "client_cpu_s": round(client_cpu, 2)}
    if server_cpu is not None:
        rec["server_cpu_s"] = round(server_cpu, 2)
    for k, v in rec.items():
        print(f"{k:20} {v}")
    for e in errors[:5]:
        print(f"error: {e}", file=sys.stderr)
    print(f"pop3 {st['logins'] / wall:.1f} logins/s, {st['msgs'] / wall:.1f} msgs/s retrieved, "
          f"{st['bytes'] / 1e6 / wall:.2f} MB/s ({a.concurrency} clients, full"
          f"{f', {len(errors)} ERRORS' if errors else ''})")
    if errors or st["mismatch"]:
        sys.exit(1)


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
    ap.add_argument("--client", choices=("lean", "pop3_load"), default="lean",
                    help="the load client (see above; default %(default)s)")
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
    if sys.argv[1:2] == ["client"]:
        lean_client(sys.argv[2:])
    else:
        main()
