"""Shared fixtures: a mail owner that works as root or not, the pqmail CLI, and the seed tree."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PQMAIL = [sys.executable, "-m", "pqmail.cli.entry"]


def mail_owner() -> str:
    """qmail refuses deliveries as root, so as root the boxes belong to ``nobody``."""
    return "nobody" if os.geteuid() == 0 else getpass.getuser()


def require_tool(name: str) -> str:
    """Path of a Debian tool; skip when absent locally, fail when CI=true."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required in CI (install it in .ci/run)")
        pytest.skip(f"{name} not installed")
    return path


def run_pqmail(*args: str, input: bytes | None = None, check: bool = True,
               env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``pqmail ARGS`` as a subprocess; on an unexpected exit status show its output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    p = subprocess.run([*PQMAIL, *args], input=input, capture_output=True, env=full_env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"pqmail {' '.join(args)} exited {p.returncode}\n"
                             f"stdout: {p.stdout.decode(errors='replace')}\n"
                             f"stderr: {p.stderr.decode(errors='replace')}")
    assert b"Traceback" not in p.stderr, p.stderr.decode(errors="replace")
    return p


@pytest.fixture
def mailtmp() -> Iterator[Path]:
    """A fresh directory that deliveries as the mail owner can reach (o+x all the way down).

    Not under pytest's tmp_path: pytest makes /tmp/pytest-of-<user> 0700 at every session start,
    which would cut off a test of another session running at the same time.
    """
    top = Path(tempfile.mkdtemp(prefix="pqmail-test-", dir="/tmp"))
    top.chmod(0o711)
    yield top
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def seed(mailtmp: Path) -> dict[str, object]:
    """The seed configuration of issue 2, produced by the provisioning commands alone."""
    root = mailtmp / "root"
    base = mailtmp / "popmail"
    serial = mailtmp / "serialmail"
    base.mkdir()
    serial.mkdir()
    owner = mail_owner()
    run_pqmail("init", "--root", str(root), "--me", "mx.isp.test", "--owner", owner)
    run_pqmail("domain", "add", "example.com", "--handle", "ex1", "--base", str(base), "--root", str(root))
    for _ in range(3):
        run_pqmail("box", "add", "ex1", "--random-password", "--root", str(root))
    run_pqmail("alias", "add", "joe@example.com", "ex1-0001", "--root", str(root))
    run_pqmail("dialup", "add", "some.example.com", "--handle", "ex1", "--relayhost", "127.0.0.1:2626",
               "--base", str(serial), "--root", str(root))
    return {
        "root": root,
        "base": base,
        "serial": serial,
        "owner": owner,
        "pop": base / "e" / "ex1" / "POP",
        "domains": base / "e" / "ex1" / "DOMAINS",
    }
