"""Maildir: maildirmake's modes, delivery (unique names, fsync order, qmail's failure wording), scan."""

from __future__ import annotations

import errno
import os
import pwd
import re
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import mail_owner, run_pqmail
from pqmail import maildir
from pqmail.errors import TemporaryFailure, UsageError
from pqmail.maildir import deliver, escape_host, is_maildir, maildirmake, scan, unique_name

NAME = re.compile(r"(\d+)\.M(\d{1,6})P(\d+)Q(\d+)\.([^/:]+)")


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def md(tmp_path: Path) -> Path:
    return maildirmake(tmp_path / "Maildir")


# ----------------------------------------------------------------------------- maildirmake

@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_maildirmake_modes_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        d = maildirmake(tmp_path / "Maildir")
    finally:
        os.umask(old)
    assert sorted(p.name for p in d.iterdir()) == ["cur", "new", "tmp"]
    for p in (d, d / "tmp", d / "new", d / "cur"):
        assert p.is_dir() and mode(p) == 0o700
    assert is_maildir(d)


def test_maildirmake_refuses_an_existing_path(tmp_path: Path) -> None:
    d = tmp_path / "Maildir"
    d.mkdir(mode=0o755)
    (d / "keep").write_text("x")
    with pytest.raises(UsageError, match="already exists"):
        maildirmake(d)
    assert [p.name for p in d.iterdir()] == ["keep"] and mode(d) == 0o755


def test_maildirmake_missing_parent_is_a_system_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        maildirmake(tmp_path / "no" / "Maildir")
    assert not (tmp_path / "no").exists()


def test_maildirmake_chowns_everything(tmp_path: Path) -> None:
    pw = pwd.getpwnam(mail_owner())
    d = maildirmake(tmp_path / "Maildir", uid=pw.pw_uid, gid=pw.pw_gid)
    for p in (d, d / "tmp", d / "new", d / "cur"):
        assert (p.stat().st_uid, p.stat().st_gid) == (pw.pw_uid, pw.pw_gid)


def test_maildirmake_failure_leaves_nothing(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root may chown to anyone")
    with pytest.raises(OSError):
        maildirmake(tmp_path / "Maildir", uid=0)  # chown to root fails for a normal user
    assert not (tmp_path / "Maildir").exists()


def test_is_maildir(tmp_path: Path, md: Path) -> None:
    assert is_maildir(md)
    assert not is_maildir(tmp_path / "nothing")
    (md / "cur").rmdir()
    assert not is_maildir(md)


def test_cli_maildirmake(tmp_path: Path) -> None:
    owner = mail_owner()
    run_pqmail("maildirmake", str(tmp_path / "M"), "--owner", owner)
    assert is_maildir(tmp_path / "M") and mode(tmp_path / "M" / "new") == 0o700
    assert (tmp_path / "M").stat().st_uid == pwd.getpwnam(owner).pw_uid
    again = run_pqmail("maildirmake", str(tmp_path / "M"), check=False)
    assert again.returncode == 100 and b"already exists" in again.stderr
    no_parent = run_pqmail("maildirmake", str(tmp_path / "x" / "M"), check=False)
    assert no_parent.returncode == 111 and len(no_parent.stderr.splitlines()) == 1
    bad_owner = run_pqmail("maildirmake", str(tmp_path / "N"), "--owner", "no-such-user-pq", check=False)
    assert bad_owner.returncode == 100 and not (tmp_path / "N").exists()
    assert run_pqmail("maildirmake", check=False).returncode == 100
    assert b"EXIT STATUS" in run_pqmail("maildirmake", "--help").stdout


# ----------------------------------------------------------------------------- unique names

def test_unique_name_form() -> None:
    name = unique_name("mx1.example.com")
    m = NAME.fullmatch(name)
    assert m, name
    assert int(m.group(3)) == os.getpid() and m.group(5) == "mx1.example.com"
    assert not name.startswith(".")


def test_unique_name_escapes_host() -> None:
    assert escape_host("a/b:c") == "a\\057b\\072c"
    name = unique_name("a/b:c")
    assert name.endswith(".a\\057b\\072c") and "/" not in name and ":" not in name


def test_unique_name_default_host() -> None:
    import socket

    assert unique_name().endswith("." + escape_host(socket.gethostname()))


def test_unique_names_differ_across_threads() -> None:
    names: list[list[str]] = [[] for _ in range(8)]

    def work(out: list[str]) -> None:
        for _ in range(5000):
            out.append(unique_name("h"))

    threads = [threading.Thread(target=work, args=(out,)) for out in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [n for out in names for n in out]
    assert len(set(flat)) == len(flat) == 40000


# ----------------------------------------------------------------------------- delivery

def test_deliver_writes_into_new(md: Path) -> None:
    chunks = [b"Return-Path: <a@b>\n", b"Delivered-To: joe@example.com\n", b"\n", b"body\n" * 1000]
    name = deliver(md, chunks)
    assert NAME.fullmatch(name)
    f = md / "new" / name
    assert f.read_bytes() == b"".join(chunks)
    assert mode(f) == 0o600
    assert os.listdir(md / "tmp") == [] and os.listdir(md / "cur") == []


def test_deliver_accepts_str_path_and_generators(md: Path) -> None:
    def gen() -> Iterator[bytes]:
        yield b"a"
        yield b""
        yield b"b"

    name = deliver(str(md), gen())
    assert (md / "new" / name).read_bytes() == b"ab"


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record fsync/link/unlink in order (each still does its real work)."""
    events: list[tuple[str, str]] = []
    real_fsync, real_link, real_unlink = os.fsync, os.link, os.unlink

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def link(src: str, dst: str, **kw) -> None:
        where = os.readlink(f"/proc/self/fd/{kw['dst_dir_fd']}") if "dst_dir_fd" in kw else ""
        events.append(("link", f"{where}/{dst}" if where else os.fspath(dst)))
        real_link(src, dst, **kw)

    def unlink(path: str, **kw) -> None:
        events.append(("unlink", os.fspath(path)))
        real_unlink(path, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "unlink", unlink)
    return events


def test_deliver_fsync_order_named_tmp_file(md: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """File fsync'd before the link into new/, then new/ itself fsync'd; tmp unlinked."""
    monkeypatch.setattr(maildir, "_anonymous_files", lambda: False)  # as on NFS
    events = _spy(monkeypatch)
    name = deliver(md, [b"x\n"])
    monkeypatch.undo()
    real = os.path.realpath(md)
    assert events == [
        ("fsync", f"{real}/tmp/{name}"),
        ("link", f"{md}/new/{name}"),
        ("unlink", f"{md}/tmp/{name}"),
        ("fsync", f"{real}/new"),
    ]


def test_deliver_fsync_order_anonymous_file(md: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The anonymous tmp/ file is fsync'd, then linked into the very new/ that is fsync'd next."""
    if not maildir._anonymous_files():
        pytest.skip("no O_TMPFILE or /proc here")
    events = _spy(monkeypatch)
    name = deliver(md, [b"x\n"])
    monkeypatch.undo()
    real = os.path.realpath(md)
    assert [e[0] for e in events] == ["fsync", "link", "fsync"]
    assert events[0][1].startswith(f"{real}/tmp/#")  # no name in tmp/ at any time
    assert events[1:] == [("link", f"{real}/new/{name}"), ("fsync", f"{real}/new")]
    assert os.listdir(md / "tmp") == []
    assert (md / "new" / name).read_bytes() == b"x\n"
    assert (md / "new" / name).stat().st_mode & 0o777 == 0o600


def test_deliver_name_collision_tries_another_name(md: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = iter(["taken", "taken", "free"])
    monkeypatch.setattr(maildir, "unique_name", lambda: next(names))
    (md / "new" / "taken").write_bytes(b"old")
    assert deliver(md, [b"new"]) == "free"
    assert (md / "new" / "taken").read_bytes() == b"old"  # never overwritten
    assert (md / "new" / "free").read_bytes() == b"new"


def test_deliver_missing_maildir(tmp_path: Path) -> None:
    with pytest.raises(TemporaryFailure) as exc:
        deliver(tmp_path / "none", [b"x"])
    assert str(exc.value) == "Unable to chdir to maildir. (#4.2.1)"
    assert exc.value.exit_code == 111


def test_deliver_maildir_without_tmp(md: Path) -> None:
    (md / "tmp").rmdir()
    with pytest.raises(TemporaryFailure, match=r"tmp file.*\(#4\.3\.0\)"):
        deliver(md, [b"x"])


def test_deliver_without_new_removes_tmp(md: Path) -> None:
    (md / "new").rmdir()
    with pytest.raises(TemporaryFailure, match=r"link.*\(#4\.3\.0\)"):
        deliver(md, [b"x"])
    assert os.listdir(md / "tmp") == []


def test_deliver_unreadable_message_removes_tmp(md: Path) -> None:
    def broken() -> Iterator[bytes]:
        yield b"partial"
        raise OSError(5, "Input/output error")

    with pytest.raises(TemporaryFailure) as exc:
        deliver(md, broken())
    assert str(exc.value) == "Unable to read message. (#4.3.0)"
    assert os.listdir(md / "tmp") == [] and os.listdir(md / "new") == []


def test_deliver_write_error_removes_tmp(md: Path) -> None:
    import resource
    import signal

    # A real write failure: a file-size limit makes write() fail with EFBIG (Python ignores SIGXFSZ).
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))
    try:
        with pytest.raises(TemporaryFailure) as exc:
            deliver(md, [b"x" * 50, b"y" * 100])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(exc.value).startswith("Unable to write to maildir: ")
    assert str(exc.value).endswith(". (#4.3.0)")
    assert os.listdir(md / "tmp") == [] and os.listdir(md / "new") == []


def test_ten_thousand_deliveries_from_threads_are_distinct(md: Path) -> None:
    names: list[list[str]] = [[] for _ in range(4)]

    def work(out: list[str]) -> None:
        for i in range(2500):
            out.append(deliver(md, [b"message %d\n" % i]))

    threads = [threading.Thread(target=work, args=(out,)) for out in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [n for out in names for n in out]
    assert len(set(flat)) == 10000
    assert len(os.listdir(md / "new")) == 10000
    assert os.listdir(md / "tmp") == []


# ----------------------------------------------------------------------------- scan

def test_scan(md: Path) -> None:
    a = deliver(md, [b"aaa"])
    b = deliver(md, [b"bbbbb"])
    os.rename(md / "new" / a, md / "cur" / f"{a}:2,S")
    (md / "new" / ".hidden").write_bytes(b"skip me")
    (md / "cur" / "subdir").mkdir()
    os.utime(md / "cur" / f"{a}:2,S", (2000, 2000))
    os.utime(md / "new" / b, (1000, 1000))
    msgs = scan(md)
    assert [(m.name, m.uniq, m.size, m.mtime, m.in_new) for m in msgs] == [
        (b, b, 5, 1000.0, True),
        (f"{a}:2,S", a, 3, 2000.0, False),
    ]
    assert msgs[1].path == md / "cur" / f"{a}:2,S"


def test_scan_empty_and_missing(tmp_path: Path, md: Path) -> None:
    assert scan(md) == []
    with pytest.raises(OSError):
        scan(tmp_path / "none")


def test_a_file_system_that_will_not_link_an_anonymous_file_gets_a_named_one(
        md: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not maildir._anonymous_files():
        pytest.skip("no O_TMPFILE or /proc here")
    real_link = os.link

    def link(src: str, dst: str, **kw) -> None:
        if src.startswith("/proc/self/fd/"):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))  # as some overlay file systems do
        real_link(src, dst, **kw)

    monkeypatch.setattr(os, "link", link)
    name = deliver(md, (b"a", b"b\n"))
    assert (md / "new" / name).read_bytes() == b"ab\n"
    assert os.listdir(md / "tmp") == []
    with pytest.raises(TemporaryFailure, match=r"Unable to link tmp file into new.*#4\.3\.0"):
        deliver(md, iter([b"streamed\n"]))  # consumed once: cannot be written a second time
    assert os.listdir(md / "tmp") == [] and len(os.listdir(md / "new")) == 1


# ----------------------------------------------------------------------------- group commit

needs_group = pytest.mark.skipif(not maildir.group_commit_available(),
                                 reason="no O_TMPFILE or syncfs here: SyncGroup delivers at once")


@needs_group
def test_group_writes_at_add_and_delivers_at_commit(tmp_path: Path) -> None:
    boxes = [maildirmake(tmp_path / f"box{i}") for i in range(3)]
    group = maildir.SyncGroup()
    for i, b in enumerate(boxes):
        group.add(b, (b"Subject: ", b"%d\n\nbody\n" % i), tag=i)
    assert len(group) == 3
    assert all(not list((b / "new").iterdir()) for b in boxes)  # nothing visible before the commit
    group.commit()
    assert group.failed == {} and len(group) == 0
    for i, b in enumerate(boxes):
        (only,) = (b / "new").iterdir()
        assert NAME.fullmatch(only.name)
        assert only.read_bytes() == b"Subject: %d\n\nbody\n" % i
        assert mode(only) == 0o600
        assert list((b / "tmp").iterdir()) == []


@needs_group
def test_group_failure_belongs_to_its_tag_and_stops_that_tags_later_files(tmp_path: Path) -> None:
    good = maildirmake(tmp_path / "good")
    broken = maildirmake(tmp_path / "broken")
    group = maildir.SyncGroup()
    group.add(broken, (b"one\n",), tag="a")
    (broken / "new").rmdir()  # gone between the write and the link
    group.add(good, (b"two\n",), tag="a")  # same recipient, after its failure: not delivered
    group.add(good, (b"three\n",), tag="b")
    group.commit()
    assert set(group.failed) == {"a"}
    assert str(group.failed["a"]).startswith("Unable to link tmp file into new:")
    assert messages_in(good) == [b"three\n"]
    assert list((broken / "tmp").iterdir()) == []


def test_group_add_fails_at_once_like_deliver(tmp_path: Path) -> None:
    group = maildir.SyncGroup()
    with pytest.raises(TemporaryFailure, match=r"Unable to chdir to maildir\. \(#4\.2\.1\)"):
        group.add(tmp_path / "missing", (b"x\n",), tag=1)
    assert len(group) == 0
    group.commit()  # nothing to do
    assert group.failed == {}


def messages_in(md: Path) -> list[bytes]:
    return sorted(p.read_bytes() for p in (md / "new").iterdir())
