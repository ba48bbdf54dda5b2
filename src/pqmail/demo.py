"""``make run``: create (once) the demo tree with the seed configuration, show it, then serve it.

The tree is built with the provisioning commands alone, exactly as an administrator would:
example.com for customer ex1, boxes ex1-0000..ex1-0002, joe@example.com -> ex1-0001, postmaster and
a default, the dial-up customer some.example.com, and second-example.com relayed to its own server.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

PQMAIL = [sys.executable, "-m", "pqmail.cli.main"]


def pq(*args: str, input: bytes | None = None) -> str:
    p = subprocess.run([*PQMAIL, *args], input=input, capture_output=True)
    if p.returncode != 0:
        sys.stderr.write(p.stderr.decode(errors="replace"))
        raise SystemExit(f"demo: pqmail {' '.join(args)} failed (exit {p.returncode})")
    return p.stdout.decode(errors="replace")


def demo_owner() -> str:
    """The mail user: ourselves when not root; as root a system user ``pqmail``, created if needed."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.getuid()).pw_name
    try:
        pwd.getpwnam("pqmail")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", "pqmail"], check=True)
        print("demo: created the system user 'pqmail' to own the demo mailboxes")
    return "pqmail"


def setup(top: Path) -> None:
    root, base, serial = top / "root", top / "popmail", top / "serialmail"
    owner = demo_owner()
    top.mkdir(parents=True, exist_ok=True)
    for d in (top, base, serial):
        d.mkdir(exist_ok=True)
        d.chmod(0o755)
    pw = pwd.getpwnam(owner)
    for d in (base, serial):
        os.chown(d, pw.pw_uid, pw.pw_gid)
    pq("init", "--root", str(root), "--me", "mx.example.com", "--owner", owner)
    pq("domain", "add", "example.com", "--handle", "ex1", "--base", str(base), "--root", str(root))
    lines = []
    for _ in range(3):
        out = pq("box", "add", "ex1", "--random-password", "--root", str(root))
        lines.append(out.strip())
    pq("alias", "add", "joe@example.com", "ex1-0001", "--root", str(root))
    pq("dialup", "add", "some.example.com", "--handle", "ex1", "--relayhost", "127.0.0.1:2626",
       "--base", str(serial), "--root", str(root))
    pq("domain", "add", "second-example.com", "--handle", "ex1", "--relay", "127.0.0.1:2727",
       "--root", str(root))
    pw_file = top / "passwords.txt"
    pw_file.write_text("\n".join(lines) + "\n")
    pw_file.chmod(0o600)
    welcome = (b"From: postmaster@example.com\nTo: joe@example.com\nSubject: welcome to pqmail\n\n"
               b"This message was queued by pqmail inject and delivered by pqmail send.\n")
    subprocess.run([*PQMAIL, "inject", "-f", "postmaster@example.com", "joe@example.com"],
                   input=welcome, check=True, env={**os.environ, "PQMAIL_ROOT": str(root)})
    subprocess.run([*PQMAIL, "send", "--drain", "--root", str(root)], check=True)


def show(top: Path) -> None:
    root = top / "root"
    print(f"\n== demo root: {root}")
    for name in ("me", "rcpthosts", "virtualdomains", "smtproutes"):
        path = root / "control" / name
        if path.exists():
            print(f"-- control/{name}")
            print(path.read_text().rstrip())
    print("-- users/assign")
    print((root / "users" / "assign").read_text().rstrip())
    print("-- POP boxes and passwords (var/demo/passwords.txt)")
    print((top / "passwords.txt").read_text().rstrip())
    print(pq("box", "list", "ex1", "--root", str(root)).rstrip())
    print("-- pqmail check")
    p = subprocess.run([*PQMAIL, "check", "--root", str(root)], capture_output=True, text=True)
    print((p.stdout + p.stderr).rstrip() or "clean")
    joe = top / "popmail" / "e" / "ex1" / "POP" / "ex1-0001"
    print(f"-- joe@example.com's mail is in {joe}/new/:")
    for f in sorted((joe / "new").iterdir()) if (joe / "new").is_dir() else []:
        print(f"   {f.name}")
    print("\nTry:  PQMAIL_ROOT=" + str(root) + " .venv/bin/pqmail route joe@example.com")


def how_to_send(top: Path, smtp: str) -> None:
    host, port = smtp.rsplit(":", 1)
    joe = top / "popmail" / "e" / "ex1" / "POP" / "ex1-0001" / "new"
    print(f"""
== pqmail serve is starting: SMTP on {smtp}, submission on {host}:{int(port) + 62}
Send a message to joe@example.com, in another terminal:
  swaks --server {host} --port {port} --from you@remote.test --to joe@example.com
or with Python:
  python3 -c "import smtplib; s = smtplib.SMTP('{host}', {port}); \\
    s.sendmail('you@remote.test', ['joe@example.com'], 'Subject: hi\\n\\nhello\\n'); s.quit()"
It lands in {joe}/
Stop with Ctrl-C (SIGTERM/SIGINT: sessions in flight finish first).""", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="var/demo", help="where the demo lives (default var/demo)")
    ap.add_argument("--reset", action="store_true", help="delete and recreate the demo tree")
    ap.add_argument("--smtp", default="127.0.0.1:2525", help="SMTP listener (default 127.0.0.1:2525)")
    ap.add_argument("--no-serve", action="store_true", help="set up and show the tree, then exit")
    a = ap.parse_args()
    top = Path(a.dir).resolve()
    if a.reset and top.exists():
        shutil.rmtree(top)
    if not (top / "root" / "control").exists():
        print(f"demo: creating the demo tree in {top}")
        setup(top)
    show(top)
    if a.no_serve:
        return
    how_to_send(top, a.smtp)
    host, port = a.smtp.rsplit(":", 1)
    os.execv(sys.executable, [*PQMAIL, "serve", "--root", str(top / "root"), "--smtp", a.smtp,
                              "--submission", f"{host}:{int(port) + 62}", "--pop3", f"{host}:1110",
                              "--odmr", f"{host}:2366", "--workers", "2"])


if __name__ == "__main__":
    main()
