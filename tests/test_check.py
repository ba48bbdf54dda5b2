"""pqmail check: each problem qmail would trip on is reported once, as file:line: text; clean means exit 0."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conftest import mail_owner, run_pqmail
from pqmail.check import check_tree, forwards_to
from pqmail.config.assign import compile_assign
from pqmail.init import init_tree
from pqmail.paths import Root
from pqmail.provision import Provisioner


@pytest.fixture
def tree(mailtmp: Path) -> dict:
    """A small seed built through the provisioning API (fast: no subprocesses)."""
    root = Root(mailtmp / "root")
    base, serial = mailtmp / "popmail", mailtmp / "serialmail"
    init_tree(root, me="mx.isp.test", owner=mail_owner())
    p = Provisioner(root)
    p.domain_add("example.com", "ex1", base)
    p.box_add("ex1", "secret one")
    p.box_add("ex1", "secret two")
    p.alias_add("joe@example.com", "ex1-0001")
    p.dialup_add("some.example.com", "ex1", "127.0.0.1:2626", serial)
    home = base / "e" / "ex1" / "DOMAINS" / "example.com"
    return {"root": root, "p": Provisioner(root), "home": home, "pop": base / "e" / "ex1" / "POP",
            "assign": root.assign, "control": root.control}


def problems(tree: dict) -> list[str]:
    return [str(p) for p in check_tree(tree["root"])]


def only(tree: dict) -> str:
    found = problems(tree)
    assert len(found) == 1, found
    return found[0]


def test_the_tree_is_clean(tree):
    assert problems(tree) == []


def test_rcpthosts_missing(tree):
    (tree["control"] / "rcpthosts").unlink()
    assert only(tree).startswith(f"{tree['control'] / 'rcpthosts'}: missing")


def test_load_control_warnings_are_reported(tree):
    (tree["control"] / "databytes").write_text("lots\n")
    assert only(tree).startswith(f"{tree['control'] / 'databytes'}:1: 'lots' is not a number")


def test_an_unreadable_control_file_is_reported_and_the_rest_still_checked(tree):
    (tree["control"] / "smtproutes").write_text("ok.test:relay\nbad.test:relay:99999\n")
    os.chmod(tree["home"] / ".qmail-joe", 0o666)
    found = problems(tree)
    assert found[0].startswith(f"{tree['control'] / 'smtproutes'}:2: port 99999 out of range")
    assert any(".qmail-joe: group- or world-writable" in f for f in found)


def test_users_cdb_missing(tree):
    tree["root"].users_cdb.unlink()
    assert only(tree).startswith(f"{tree['root'].users_cdb}: missing")


def test_users_cdb_older_than_assign(tree):
    later = time.time() + 10
    os.utime(tree["assign"], (later, later))
    assert only(tree).startswith(f"{tree['root'].users_cdb}: older than users/assign")
    compile_assign(tree["root"])
    os.utime(tree["root"].users_cdb, (later + 1, later + 1))
    assert problems(tree) == []


def add_assign_line(tree: dict, line: str) -> int:
    """Insert ``line`` before the final '.', run newu; return its line number."""
    lines = tree["assign"].read_text().splitlines()
    lines.insert(len(lines) - 1, line)
    tree["assign"].write_text("\n".join(lines) + "\n")
    compile_assign(tree["root"])
    return len(lines) - 1


def test_uid_zero(tree, mailtmp):
    n = add_assign_line(tree, f"+rootish-:root:0:0:{mailtmp}:-::")
    assert only(tree).startswith(f"{tree['assign']}:{n}: uid 0 for +rootish-")


def test_assign_home_missing(tree, mailtmp):
    n = add_assign_line(tree, f"=ghost:nobody:65534:65534:{mailtmp / 'gone'}:::")
    assert only(tree).startswith(f"{tree['assign']}:{n}: home {mailtmp / 'gone'} does not exist")


def test_assign_home_relative(tree):
    n = add_assign_line(tree, "=rel:nobody:65534:65534:relative/home:::")
    assert only(tree).startswith(f"{tree['assign']}:{n}: home 'relative/home' is not an absolute path")


def test_malformed_assign(tree):
    tree["assign"].write_text(tree["assign"].read_text().replace("\n.\n", "\n"))
    assert any(f.startswith(f"{tree['assign']}:3: missing the final line") for f in problems(tree))


@pytest.mark.parametrize("mode, text", [(0o775, "group- or world-writable (mode 0775)"),
                                        (0o757, "group- or world-writable (mode 0757)"),
                                        (0o1755, "sticky")])
def test_unsafe_home(tree, mode, text):
    os.chmod(tree["home"], mode)
    assert only(tree).startswith(f"{tree['assign']}:1: home {tree['home']} is {text}")


@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_group_or_world_writable_dot_qmail(tree, mode):
    path = tree["home"] / ".qmail-joe"
    os.chmod(path, mode)
    assert only(tree) == (f"{path}: group- or world-writable (mode 0{mode:o}): qmail-local defers "
                          "deliveries through it (#4.7.0)")


def test_maildir_line_that_is_not_a_maildir(tree):
    path = tree["home"] / ".qmail-sales"
    path.write_text("# sales\n./nowhere/\n")
    path.chmod(0o644)
    assert only(tree).startswith(f"{path}:2: ./nowhere/ is not a Maildir")


def test_postmaster_of_a_handle_without_boxes(tree, mailtmp):
    p = tree["p"]
    p.domain_add("nobox.test", "ex2", mailtmp / "popmail")
    pm = mailtmp / "popmail" / "e" / "ex2" / "DOMAINS" / "nobox.test" / ".qmail-postmaster"
    assert only(tree).startswith(f"{pm}:1: {mailtmp / 'popmail' / 'e' / 'ex2' / 'POP' / 'ex2-0000'}/ is not "
                                 "a Maildir")
    p.box_add("ex2", "pw")
    assert problems(tree) == []


def test_virtual_domain_without_postmaster_loops_through_the_default(tree):
    (tree["home"] / ".qmail-postmaster").unlink()
    vd = tree["control"] / "virtualdomains"
    assert only(tree).startswith(f"{vd}:1: postmaster@example.com loops")


def test_virtual_domain_without_postmaster_or_default(tree):
    (tree["home"] / ".qmail-postmaster").unlink()
    (tree["home"] / ".qmail-default").unlink()
    assert only(tree).startswith(f"{tree['control'] / 'virtualdomains'}:1: postmaster@example.com has no "
                                 "mailbox")


def test_virtual_domain_missing_from_rcpthosts(tree):
    rcpt = tree["control"] / "rcpthosts"
    rcpt.write_text(rcpt.read_text().replace("example.com\n.example.com\n", ""))
    found = problems(tree)
    vd = tree["control"] / "virtualdomains"
    assert found == [f"{vd}:1: example.com is not in rcpthosts: SMTP refuses mail for it",
                     f"{vd}:2: .example.com is not in rcpthosts: SMTP refuses mail for it"]


def test_virtual_domain_shadowed_by_locals(tree):
    (tree["control"] / "locals").write_text("mx.isp.test\nexample.com\n")
    assert only(tree).startswith(f"{tree['control'] / 'virtualdomains'}:1: example.com is also in locals")


def test_virtual_domain_without_assign_entry(tree):
    vd = tree["control"] / "virtualdomains"
    vd.write_text(vd.read_text() + "other.test:other\n")
    (tree["control"] / "rcpthosts").write_text((tree["control"] / "rcpthosts").read_text() + "other.test\n")
    assert only(tree).startswith(f"{vd}:4: postmaster@other.test has no users/assign entry")


def test_forward_only_file_with_a_maildir_line(tree):
    path = tree["home"] / ".qmail-joe"
    path.chmod(0o744)
    assert only(tree).startswith(f"{path}:1: the file is executable (forward-only)")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a Maildir to another user")
def test_maildir_owned_by_another_uid(tree):
    box = tree["pop"] / "ex1-0001"
    for d in ("", "new", "cur", "tmp"):
        os.chown(box / d, 1, 1)
    assert only(tree).startswith(f"{tree['home'] / '.qmail-joe'}:1: {box}/ belongs to uid 1")


def test_mailuser_that_does_not_exist(tree):
    (tree["control"] / "mailuser").write_text("no-such-user-pqmail\n")
    assert only(tree).startswith(f"{tree['control'] / 'mailuser'}:1: no such user")


def test_not_a_tree(tmp_path):
    assert [str(p) for p in check_tree(Root(tmp_path))] == [f"{tmp_path}: not a pqmail tree: no control/ "
                                                             "directory"]


@pytest.mark.parametrize("lines, hit", [
    (["&postmaster@example.com"], True),
    (["Postmaster@Example.COM"], True),
    (["&postmaster@other.test"], False),
    (["./Maildir/"], False),
    (["# postmaster@example.com"], False),
])
def test_forwards_to(lines, hit):
    assert forwards_to(lines, "postmaster@example.com") is hit


# ----------------------------------------------------------------------------- the command

def test_cli_clean_seed_exits_zero(seed):
    p = run_pqmail("check", "--root", str(seed["root"]))
    assert (p.returncode, p.stdout) == (0, b"")


def test_cli_reports_each_problem_on_a_line_and_exits_one(seed):
    root = seed["root"]
    os.chmod(seed["domains"] / "example.com" / ".qmail-joe", 0o666)
    (root / "users" / "cdb").unlink()
    p = run_pqmail("check", "--root", str(root), check=False)
    assert p.returncode == 1
    lines = p.stdout.decode().splitlines()
    joe = seed["domains"] / "example.com" / ".qmail-joe"
    assert lines == [f"{root / 'users' / 'cdb'}: missing: deliveries ignore users/assign until you run "
                     "pqmail newu",
                     f"{joe}: group- or world-writable (mode 0666): qmail-local defers deliveries through it "
                     "(#4.7.0)"]
    assert p.stderr == b"pqmail check: 2 problems\n"


# ----------------------------------------------------------------------------- queue/

def test_a_damaged_queue_is_reported_then_fixed(tree):
    root: Root = tree["root"]
    q = root.queue
    (q / "todo").chmod(0o700)  # smtpd, running as the mail user's group, could no longer commit
    (q / "mess" / "7").rmdir()
    (q / "lock" / "trigger").unlink()
    os.mkfifo(q / "pool" / "12345")
    found = problems(tree)
    assert f"{q / 'todo'}: mode 0700, should be 3770" in found
    assert f"{q / 'mess' / '7'}: missing (a directory, mode 3770)" in found
    assert f"{q / 'lock' / 'trigger'}: missing (a FIFO, mode 0622)" in found
    assert any(p.startswith(f"{q / 'pool' / '12345'}: not a regular file") for p in found)
    assert found[-1] == f"{q}: `pqmail queue fix` restores the layout, modes and owner"
    assert len(found) == 5, found

    fixed = run_pqmail("queue", "fix", "--root", str(root.path))
    out = fixed.stdout.decode()
    assert f"fixed: {q / 'todo'}: mode 0700, should be 3770" in out
    assert f"fixed: {q / 'lock' / 'trigger'}: missing" in out
    assert "queue layout is right" in out
    assert problems(tree) == []
    assert not (q / "pool" / "12345").exists() and (q / "mess" / "7").is_dir()


def test_queue_fix_reports_what_it_cannot_repair(tree):
    root: Root = tree["root"]
    (root.queue / "status").rmdir()
    (root.queue / "status").write_text("not a directory\n")
    p = run_pqmail("queue", "fix", "--root", str(root.path), check=False)
    assert p.returncode == 100, p
    assert f"{root.queue / 'status'}: exists and is not a directory" in p.stderr.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a queue owned by another user than the mail user")
def test_a_queue_the_mail_user_cannot_write_is_reported(tree):
    root: Root = tree["root"]
    os.chown(root.queue, 0, 0)
    for sub in root.queue.rglob("*"):
        os.chown(sub, 0, 0, follow_symlinks=False)
    assert problems(tree) == [f"{root.queue}: the mail user 'nobody' (control/mailuser) is neither its owner "
                              "(uid 0) nor in its group (0): smtpd could not queue mail"]
    run_pqmail("queue", "fix", "--root", str(root.path))
    assert problems(tree) == []
