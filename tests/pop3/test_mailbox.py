"""Maildir access as qmail-pop3d does it: new -> cur, UIDL, sizes, streaming, QUIT-only deletion, lock."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pqmail.maildir import deliver, maildirmake
from pqmail.pop3.mailbox import LOCK_NAME, READ_CHUNK, Mailbox, MailboxError, MailboxInUse, uidl_for
from pqmail.pop3.protocol import POP3Connection, Quit, wire_size


@pytest.fixture
def md(tmp_path: Path) -> Path:
    return maildirmake(tmp_path / "box")


def put(md: Path, data: bytes, age: float = 0.0, name: str | None = None) -> str:
    """Deliver ``data``; give it an mtime ``age`` seconds in the past (for ordering)."""
    if name is None:
        name = deliver(md, [data])
    else:
        (md / "new" / name).write_bytes(data)
    t = time.time() - age
    os.utime(md / "new" / name, (t, t))
    return name


def body(mb: Mailbox, n: int, lines: int | None = None) -> bytes:
    return b"".join(mb.chunks(n, lines))


def test_open_moves_new_to_cur_with_info(md: Path) -> None:
    a = put(md, b"A\n", age=20)
    b = put(md, b"B\n", age=10)
    with Mailbox.open(md) as mb:
        assert [m.uid for m in mb.messages] == [a, b]  # oldest first
    assert os.listdir(md / "new") == []
    assert sorted(os.listdir(md / "cur")) == sorted([f"{a}:2,", f"{b}:2,"])


def test_messages_already_in_cur_keep_their_flags(md: Path) -> None:
    (md / "cur" / "123.x.host:2,S").write_bytes(b"seen\n")
    with Mailbox.open(md) as mb:
        assert mb.uids == ["123.x.host"]
    assert os.listdir(md / "cur") == ["123.x.host:2,S"]


def test_dot_files_and_directories_are_skipped(md: Path) -> None:
    (md / "cur" / ".hidden").write_bytes(b"x\n")
    (md / "new" / ".hidden2").write_bytes(b"x\n")
    (md / "cur" / "subdir").mkdir()
    with Mailbox.open(md) as mb:
        assert mb.messages == []
    assert (md / "new" / ".hidden2").exists()


def test_uidl_is_stable_across_sessions(md: Path) -> None:
    names = [put(md, b"m%d\n" % i, age=10 - i) for i in range(3)]
    with Mailbox.open(md) as mb:
        first = mb.uids
    assert first == names
    put(md, b"newer\n")
    with Mailbox.open(md) as mb:
        assert mb.uids[:3] == first and len(mb.uids) == 4


def test_long_or_odd_unique_names_are_hashed_stably(md: Path) -> None:
    long = "1700000000.M1P1." + "h" * 80
    put(md, b"x\n", name=long)
    put(md, b"y\n", name="1700000001.M1P1.with space")
    with Mailbox.open(md) as mb:
        uids = mb.uids
    with Mailbox.open(md) as mb:
        assert mb.uids == uids
    assert uidl_for(long) == "x:" + hashlib.sha256(long.encode()).hexdigest()
    assert set(uids) == {uidl_for(long), uidl_for("1700000001.M1P1.with space")}
    assert all(len(u) <= 70 and u.isprintable() and " " not in u for u in uids)


def test_sizes_count_crlf_as_transmitted(md: Path) -> None:
    msgs = [b"Subject: x\n\nbody\n", b"bare\nlf\nno final", b"", b".dot\n..two\n"]
    for i, m in enumerate(msgs):
        put(md, m, age=10 - i)
    with Mailbox.open(md) as mb:
        assert mb.sizes == [wire_size(m) for m in msgs]
        for i in range(1, len(msgs) + 1):
            wire = body(mb, i)
            unstuffed = sum(1 for ln in wire.split(b"\r\n") if ln.startswith(b"."))
            assert len(wire) - unstuffed == mb.sizes[i - 1]
            assert mb.cached_wire(i) == wire


def test_dot_stuffing_and_bare_lf(md: Path) -> None:
    put(md, b"From: a\n\n.\n..x\n.y\nlast")
    with Mailbox.open(md) as mb:
        assert body(mb, 1) == b"From: a\r\n\r\n..\r\n...x\r\n..y\r\nlast\r\n"
        assert body(mb, 1, 1) == b"From: a\r\n\r\n..\r\n"
        assert mb.small_wire(1, 0, 1) == body(mb, 1, 1)  # kept since login: no limit applies


def test_20mb_message_is_streamed_in_chunks(md: Path) -> None:
    line = b"x" * 75 + b"\n"
    data = b"Subject: big\n\n" + line * (20 * 1024 * 1024 // len(line))
    put(md, data)
    t0 = time.monotonic()
    with Mailbox.open(md) as mb:
        assert mb.messages[0].text is None  # too big to keep in memory
        assert mb.sizes == [wire_size(data)]
        pieces = list(mb.chunks(1))
        top = list(mb.chunks(1, 2))
    assert time.monotonic() - t0 < 20
    assert len(pieces) > 10 and max(map(len, pieces)) <= 2 * READ_CHUNK + 1
    assert sum(map(len, pieces)) == wire_size(data)
    assert hashlib.sha256(b"".join(pieces)).digest() == hashlib.sha256(data.replace(b"\n", b"\r\n")).digest()
    assert b"".join(top) == b"Subject: big\r\n\r\n" + (line * 2).replace(b"\n", b"\r\n")
    assert len(top) == 1  # TOP stops reading once it has its lines


def test_nothing_is_deleted_without_commit(md: Path) -> None:
    put(md, b"keep\n")
    with Mailbox.open(md):
        pass  # a session that ends without QUIT
    with Mailbox.open(md) as mb:
        assert len(mb.messages) == 1


def test_commit_deletes_durably_what_was_marked(md: Path) -> None:
    names = [put(md, b"m%d\n" % i, age=10 - i) for i in range(3)]
    with Mailbox.open(md) as mb:
        assert mb.commit([1, 3]) == 0
    assert os.listdir(md / "cur") == [f"{names[1]}:2,"]


def test_rset_through_the_protocol_deletes_nothing(md: Path) -> None:
    put(md, b"m\n")
    with Mailbox.open(md) as mb:
        c = POP3Connection()
        c.send_greeting()
        c.receive_data(b"USER a\r\nPASS b\r\n")
        c.next_event()
        c.auth_succeeded(mb.sizes, mb.uids)
        c.receive_data(b"DELE 1\r\nRSET\r\nQUIT\r\n")
        ev = c.next_event()
        assert ev == Quit(())
        assert mb.commit(ev.deleted) == 0
    assert len(os.listdir(md / "cur")) == 1


def test_a_message_removed_by_someone_else_counts_as_deleted(md: Path) -> None:
    put(md, b"m\n")
    with Mailbox.open(md) as mb:
        os.unlink(mb.messages[0].path)
        assert mb.commit([1]) == 0


def test_second_session_gets_in_use(md: Path) -> None:
    with Mailbox.open(md):
        with pytest.raises(MailboxInUse) as e:
            Mailbox.open(md)
        assert e.value.code == "IN-USE"
    Mailbox.open(md).close()  # free again


def test_lock_holds_across_processes(md: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, sys
fd = os.open({str(md)!r}, os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(MailboxInUse):
            Mailbox.open(md)
    finally:
        holder.communicate(b"")
    Mailbox.open(md).close()


def test_the_lock_is_on_the_maildir_itself(md: Path) -> None:
    with Mailbox.open(md):
        assert not (md / LOCK_NAME).exists()  # nothing created in the box: the directory is flocked
        with pytest.raises(MailboxInUse):
            Mailbox.begin(md)


def test_opening_in_steps_reports_its_cost(md: Path) -> None:
    put(md, b"a\n" * 10, age=20)
    (md / "cur" / "1.x.host:2,S").write_bytes(b"seen\n")
    op = Mailbox.begin(md)
    assert op.files == 2
    assert op.settle() == 20 + 5  # bytes still to read for sizes: neither is known yet
    assert os.listdir(md / "new") == []
    with op.finish() as mb:
        assert mb.sizes == [30, 6] or mb.sizes == [6, 30]
        with pytest.raises(MailboxInUse):
            Mailbox.open(md)
    op2 = Mailbox.begin(md)
    assert op2.settle() == 0  # both sizes remembered from the first opening
    op2.abandon()
    Mailbox.open(md).close()  # abandoning unlocked it


def test_small_message_read_whole(md: Path) -> None:
    put(md, b".x\ny" * 30000)  # 150 KB: too big to be kept since login
    with Mailbox.open(md) as mb:
        assert mb.messages[0].text is None
        assert mb.small_wire(1, 1000) is None
        assert mb.small_wire(1, 200_000) == body(mb, 1)
        assert mb.small_wire(1, 200_000, 1) == body(mb, 1, 1)  # TOP


def test_vanished_box(tmp_path: Path) -> None:
    with pytest.raises(MailboxError) as e:
        Mailbox.open(tmp_path / "nothing")
    assert (e.value.code, e.value.text) == ("SYS/PERM", "this box has no Maildir")


def test_directory_that_is_not_a_maildir(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    with pytest.raises(MailboxError) as e:
        Mailbox.open(tmp_path / "half")
    assert e.value.code == "SYS/PERM" and "not a Maildir" in e.value.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_unreadable_box(md: Path) -> None:
    md.chmod(0o000)
    try:
        with pytest.raises(MailboxError) as e:
            Mailbox.open(md)
        assert e.value.code == "SYS/TEMP"
    finally:
        md.chmod(0o700)


def test_message_vanishing_before_retr(md: Path) -> None:
    put(md, b"x" * (200 * 1024))  # too big to be kept in memory
    with Mailbox.open(md) as mb:
        os.unlink(mb.messages[0].path)
        with pytest.raises(MailboxError) as e:
            body(mb, 1)
        assert e.value.code == "SYS/PERM"


def test_box_vanishing_before_quit(md: Path) -> None:
    put(md, b"m\n")
    with Mailbox.open(md) as mb:
        for sub in ("cur", "new", "tmp"):
            for f in os.listdir(md / sub):
                os.unlink(md / sub / f)
            os.rmdir(md / sub)
        assert mb.commit([1]) == 1  # not known to be durable: reported, never raised


def test_stale_tmp_files_are_removed(md: Path) -> None:
    old, fresh = md / "tmp" / "old", md / "tmp" / "fresh"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    t = time.time() - 37 * 3600
    os.utime(old, (t, t))
    Mailbox.open(md).close()
    assert not old.exists() and fresh.exists()

