"""pqmail init: the tree qmail's install and config-fast would make, and never over an existing one."""

from __future__ import annotations

import getpass
import os
import pwd
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import mail_owner, require_tool, run_pqmail
from pqmail.init import derived_domains

AS_ROOT = os.geteuid() == 0


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def init(root: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_pqmail("init", "--root", str(root), *extra, check=check)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 100, p
    err = p.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("pqmail: "), err
    assert b"Traceback" not in p.stderr
    return err


@pytest.mark.parametrize("me, default, plus", [
    ("mx.isp.test", "isp.test", "isp.test"),
    ("a.b.c.d", "b.c.d", "c.d"),  # config-fast's seds: not the same rule for the two files
    ("isp.test", "isp.test", "isp.test"),
    ("localhost", "localhost", "localhost"),
])
def test_derived_domains_follow_config_fast(me, default, plus):
    assert derived_domains(me) == (default, plus)


def test_init_creates_the_tree(mailtmp):
    root = mailtmp / "root"
    owner = mail_owner()
    p = init(root, "--me", "mx.isp.test", "--owner", owner)
    assert b"mx.isp.test" in p.stdout
    control = root / "control"
    assert {n: (control / n).read_text() for n in os.listdir(control)} == {
        "me": "mx.isp.test\n",
        "locals": "mx.isp.test\n",
        "rcpthosts": "mx.isp.test\n",
        "defaultdomain": "isp.test\n",
        "plusdomain": "isp.test\n",
        "mailuser": f"{owner}\n",
    }
    assert (root / "users" / "assign").read_text() == ".\n"
    for d in (root, control, root / "users"):
        assert mode(d) == 0o755, d
    for f in [*control.iterdir(), root / "users" / "assign", root / "users" / "cdb"]:
        assert mode(f) == 0o644, f
        assert os.stat(f).st_uid == os.geteuid()
    uid = pwd.getpwnam(owner).pw_uid
    queue = root / "queue"
    assert queue.is_dir() and os.stat(queue).st_uid == uid
    for sub in ("mess", "todo", "info", "local", "remote", "bounce", "lock", "intd"):
        assert (queue / sub).is_dir(), sub
        assert os.stat(queue / sub).st_uid == uid


def test_users_cdb_is_newu_of_the_dot_only_assign(mailtmp):
    cdb = require_tool("cdb")
    root = mailtmp / "root"
    init(root, "--me", "mx.isp.test", "--owner", mail_owner())
    dump = subprocess.run([cdb, "-d", str(root / "users" / "cdb")], capture_output=True, check=True).stdout
    assert dump == b"+0,0:->\n\n"  # only the (empty) wildcard-character record


def test_showctl_reads_the_new_tree(mailtmp):
    root = mailtmp / "root"
    init(root, "--me", "mx.isp.test", "--owner", mail_owner())
    out = run_pqmail("showctl", "--root", str(root)).stdout.decode()
    assert "mx.isp.test" in out


def test_existing_tree_is_refused_and_left_alone(mailtmp):
    root = mailtmp / "root"
    init(root, "--me", "mx.isp.test", "--owner", mail_owner())
    me = root / "control" / "me"
    before = os.stat(me)
    err = one_line_error(init(root, "--me", "other.isp.test", "--owner", mail_owner(), check=False))
    assert "already holds a qmail tree" in err and "control/me" in err
    assert me.read_text() == "mx.isp.test\n" and os.stat(me).st_mtime_ns == before.st_mtime_ns


@pytest.mark.parametrize("part", ["queue", "users/assign", "control/rcpthosts"])
def test_any_part_of_a_tree_is_refused(mailtmp, part):
    root = mailtmp / "root"
    target = root / part
    target.parent.mkdir(parents=True)
    if part == "queue":
        target.mkdir()
    else:
        target.write_text("x\n")
    err = one_line_error(init(root, "--me", "mx.isp.test", "--owner", mail_owner(), check=False))
    assert part in err
    assert not (root / "control" / "me").exists()


def test_root_that_is_a_file_is_refused(mailtmp):
    root = mailtmp / "root"
    root.write_text("")
    assert "not a directory" in one_line_error(init(root, "--owner", mail_owner(), check=False))


def test_existing_empty_directory_is_fine(mailtmp):
    root = mailtmp / "root"
    root.mkdir()
    init(root, "--me", "mx.isp.test", "--owner", mail_owner())
    assert (root / "control" / "me").read_text() == "mx.isp.test\n"


@pytest.mark.parametrize("args, text", [
    (["--me", "bad host", "--owner", "OWNER"], "invalid host name"),
    (["--me", "mx..test", "--owner", "OWNER"], "invalid host name"),
    (["--me", "mx.isp.test", "--owner", "no-such-user-pqmail"], "no such user"),
    (["--me", "mx.isp.test", "--owner", "root"], "root"),
])
def test_bad_arguments_change_nothing(mailtmp, args, text):
    root = mailtmp / "root"
    args = [mail_owner() if a == "OWNER" else a for a in args]
    assert text in one_line_error(init(root, *args, check=False))
    assert not root.exists()


@pytest.mark.skipif(not AS_ROOT, reason="only root must name the mail user")
def test_root_must_name_the_owner(mailtmp):
    root = mailtmp / "root"
    err = one_line_error(init(root, "--me", "mx.isp.test", check=False))
    assert "--owner" in err
    assert not root.exists()


@pytest.mark.skipif(not AS_ROOT, reason="needs root")
def test_an_existing_mailuser_is_used_and_kept(mailtmp):
    root = mailtmp / "root"
    (root / "control").mkdir(parents=True)
    (root / "control" / "mailuser").write_text("nobody\n")
    init(root, "--me", "mx.isp.test")
    assert (root / "control" / "mailuser").read_text() == "nobody\n"
    assert os.stat(root / "queue").st_uid == pwd.getpwnam("nobody").pw_uid
    other = mailtmp / "other"
    (other / "control").mkdir(parents=True)
    (other / "control" / "mailuser").write_text("nobody\n")
    assert "names 'nobody'" in one_line_error(init(other, "--me", "x.test", "--owner", "daemon", check=False))


@pytest.mark.skipif(AS_ROOT, reason="as root the owner must be named")
def test_not_root_the_owner_is_the_invoking_user(mailtmp):
    root = mailtmp / "root"
    init(root, "--me", "mx.isp.test")
    assert (root / "control" / "mailuser").read_text() == f"{getpass.getuser()}\n"


def test_me_defaults_to_the_fqdn(mailtmp):
    root = mailtmp / "root"
    fqdn = socket.getfqdn().lower()
    p = init(root, "--owner", mail_owner(), check=False)
    if p.returncode != 0:  # a sandbox whose host name is not a valid domain name: refused cleanly
        assert "invalid host name" in one_line_error(p)
        return
    assert (root / "control" / "me").read_text() == f"{fqdn}\n"
    assert (root / "control" / "rcpthosts").read_text() == f"{fqdn}\n"
