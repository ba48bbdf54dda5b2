"""The durable queue store: qmail's layout, write order, records, clean-up and concurrency."""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import pwd
import re
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pqmail.errors import PermanentFailure, TemporaryFailure, UsageError
from pqmail.queue import store
from pqmail.queue.store import SPLIT, Queue, make_queue

RECEIVED = re.compile(rb"^Received: \(qmail (\d+) invoked (by uid \d+|for bounce)\); "
                      rb"([1-9]\d?) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) (\d{4}) "
                      rb"\d\d:\d\d:\d\d -0000\n")


@pytest.fixture
def qdir(tmp_path: Path) -> Path:
    make_queue(tmp_path / "queue")
    return tmp_path / "queue"


@pytest.fixture
def q(qdir: Path) -> Queue:
    return Queue(qdir)


def files(qdir: Path, sub: str) -> list[str]:
    """Every file under queue/<sub>, relative to it."""
    base = qdir / sub
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if not p.is_dir())


# ----------------------------------------------------------------------------- layout

def test_make_queue_creates_qmails_layout_with_modes(qdir: Path):
    mode = {p: stat.S_IMODE(os.lstat(qdir / p).st_mode) for p in
            ("", "pid", "intd", "todo", "mess", "mess/0", "mess/22", "info", "info/7", "local/22",
             "remote/0", "bounce", "lock", "lock/sendmutex", "lock/trigger")}
    assert mode["pid"] == mode["intd"] == mode["todo"] == mode["mess/0"] == mode["mess/22"] == 0o3770
    assert mode["info"] == mode["info/7"] == mode["local/22"] == mode["remote/0"] == mode["bounce"] == 0o700
    assert (mode[""], mode["mess"], mode["lock"]) == (0o750, 0o750, 0o750)
    assert mode["lock/sendmutex"] == 0o600
    assert mode["lock/trigger"] == 0o622
    assert stat.S_ISFIFO(os.lstat(qdir / "lock" / "trigger").st_mode)
    for sub in ("mess", "info", "local", "remote"):
        assert sorted(os.listdir(qdir / sub), key=int) == [str(n) for n in range(SPLIT)]


def test_make_queue_is_idempotent_and_repairs_modes(qdir: Path, q: Queue):
    mid = q.enqueue("a@b.test", ["c@d.test"], b"x\n")
    (qdir / "todo").chmod(0o777)
    make_queue(qdir)
    assert stat.S_IMODE((qdir / "todo").stat().st_mode) == 0o3770
    assert q.list_todo() == [mid]  # nothing queued was touched


def test_make_queue_refuses_a_trigger_that_is_not_a_fifo(tmp_path: Path):
    (tmp_path / "queue" / "lock").mkdir(parents=True)
    (tmp_path / "queue" / "lock" / "trigger").write_text("")
    with pytest.raises(UsageError, match="not a FIFO"):
        make_queue(tmp_path / "queue")


def test_make_queue_sets_the_owner(tmp_path: Path):
    if os.geteuid() == 0:
        pw = pwd.getpwnam("nobody")
        uid, gid = pw.pw_uid, pw.pw_gid
    else:
        uid, gid = os.getuid(), os.getgid()
    make_queue(tmp_path / "queue", uid, gid)
    for p in ("", "todo", "mess/3", "info/3", "lock/trigger", "lock/sendmutex"):
        st = os.lstat(tmp_path / "queue" / p)
        assert (st.st_uid, st.st_gid) == (uid, gid), p
    assert stat.S_IMODE((tmp_path / "queue" / "todo").stat().st_mode) == 0o3770  # chown kept it
    mid = Queue(tmp_path / "queue").enqueue("a@b.test", ["c@d.test"], b"x\n")
    for p in (f"mess/{mid % SPLIT}/{mid}", f"todo/{mid}"):
        assert os.stat(tmp_path / "queue" / p).st_gid == gid  # setgid: the queue's group can read it


# ----------------------------------------------------------------------------- enqueue

def test_enqueue_writes_message_and_envelope_as_qmail_queue(qdir: Path, q: Queue):
    mid = q.enqueue("alice@a.test", ["bob@b.test", "carol@c.test"], b"Subject: hi\n\nbody\n")
    mess = qdir / "mess" / str(mid % SPLIT) / str(mid)
    assert q.message_path(mid) == mess
    assert mess.stat().st_ino == mid  # the id is the inode number
    data = mess.read_bytes()
    m = RECEIVED.match(data)
    assert m, data
    assert int(m.group(1)) == os.getpid()
    assert m.group(2) == f"by uid {os.getuid()}".encode()
    assert data[m.end():] == b"Subject: hi\n\nbody\n"
    envelope = b"u%d\0p%d\0Falice@a.test\0Tbob@b.test\0Tcarol@c.test\0" % (os.getuid(), os.getpid())
    assert (qdir / "todo" / str(mid)).read_bytes() == envelope
    assert os.path.samefile(qdir / "todo" / str(mid), qdir / "intd" / str(mid))  # one inode
    assert files(qdir, "pid") == []
    assert files(qdir, "info") == files(qdir, "local") == files(qdir, "bounce") == []


def test_received_line_is_qmails():
    assert store.received_line(123, "by uid 7", 0) == \
        b"Received: (qmail 123 invoked by uid 7); 1 Jan 1970 00:00:00 -0000\n"
    assert store.received_line(9, "from network", 1669294862) == \
        b"Received: (qmail 9 invoked from network); 24 Nov 2022 13:01:02 -0000\n"


def test_invoked_and_empty_sender(q: Queue):
    mid = q.enqueue("", ["postmaster@x.test"], b"bounce\n", invoked="for bounce")
    assert RECEIVED.match(q.message_path(mid).read_bytes()).group(2) == b"for bounce"
    env = q.read_todo(mid)
    assert (env.sender, env.recipients, env.pid, env.uid) == ("", ["postmaster@x.test"], os.getpid(),
                                                             os.getuid())


def test_message_chunks_bytes_path_file_and_stream(tmp_path: Path, q: Queue):
    src = tmp_path / "orig"
    src.write_bytes(b"Subject: orig\n\n" + b"y" * 300_000)

    def stream():
        yield b"tail1\n"
        yield b"tail2\n"

    mid = q.enqueue("a@b.test", ["c@d.test"],
                    [b"Delivered-To: x\n", src, io.BytesIO(b"from a file\n"), stream(), b"end\n"])
    data = q.message_path(mid).read_bytes()
    body = data[RECEIVED.match(data).end():]
    assert body == b"Delivered-To: x\n" + src.read_bytes() + b"from a file\ntail1\ntail2\nend\n"
    assert q.message_size(mid) == len(data)


def test_commit_order_is_visible_on_disk(qdir: Path, q: Queue):
    """While the message is being written: it has its mess name (its inode is the id), the pid
    name is gone, there is no intd/todo yet, and clean-up leaves the locked file alone."""
    seen = {}

    def body():
        (name,) = files(qdir, "mess")
        seen["mess"] = name
        seen["pid"] = files(qdir, "pid")
        seen["intd"], seen["todo"] = files(qdir, "intd"), files(qdir, "todo")
        seen["cleanup"] = q.cleanup_stale()
        seen["still there"] = (qdir / "mess" / name).exists()
        yield b"body\n"

    mid = q.enqueue("a@b.test", ["c@d.test"], [b"Subject: x\n\n", body()])
    assert seen == {"mess": f"{mid % SPLIT}/{mid}", "pid": [], "intd": [], "todo": [],
                    "cleanup": 0, "still there": True}
    assert files(qdir, "todo") == files(qdir, "intd") == [str(mid)]
    assert os.stat(qdir / "todo" / str(mid)).st_nlink == 2


def test_enqueue_wakes_the_manager_through_the_trigger(qdir: Path, q: Queue):
    fd = os.open(qdir / "lock" / "trigger", os.O_RDONLY | os.O_NONBLOCK)
    try:
        q.enqueue("a@b.test", ["c@d.test"], b"x\n")
        assert os.read(fd, 16) == b"\n"
    finally:
        os.close(fd)
    q.enqueue("a@b.test", ["c@d.test"], b"x\n")  # nobody reading: still fine


@pytest.mark.parametrize(("sender", "rcpts", "match"), [
    ("a@b.test", [], "no recipients"),
    ("a@b.test", ["x\n@b.test"], "NUL or line feed"),
    ("a@b.test", ["x\0@b.test"], "NUL or line feed"),
    ("a\n@b.test", ["c@d.test"], "sender contains"),
    ("a@b.test", ["x" * 996 + "@b.test"], "longer than 1002"),
    ("x" * 1003, ["c@d.test"], "longer than 1002"),
    ("a@b.test", ["\udcff\ud800"], "not valid text"),
])
def test_bad_envelopes_are_permanent_and_leave_nothing(qdir: Path, q: Queue, sender, rcpts, match):
    with pytest.raises(PermanentFailure, match=match):
        q.enqueue(sender, rcpts, b"x\n")
    assert files(qdir, "pid") == files(qdir, "mess") == files(qdir, "todo") == []


def test_an_address_of_1002_bytes_is_accepted(q: Queue):
    rcpt = "x" * 995 + "@b.test"
    assert len(rcpt) == 1002
    mid = q.enqueue("a@b.test", [rcpt], b"x\n")
    assert q.read_todo(mid).recipients == [rcpt]


def test_8bit_addresses_round_trip(q: Queue):
    rcpts = ["jürgen@bücher.test", "raw\udce9@x.test"]  # UTF-8, and a latin-1 byte from the wire
    mid = q.enqueue("é@x.test", rcpts, b"x\n")
    assert q.read_todo(mid).recipients == rcpts
    todo = (q.path / "todo" / str(mid)).read_bytes()
    assert b"Tj\xc3\xbcrgen@b\xc3\xbccher.test\0Traw\xe9@x.test\0" in todo


def test_a_queue_that_cannot_take_the_message_is_temporary_and_rolls_back(qdir: Path, q: Queue):
    os.rmdir(qdir / "intd")  # fails after the message was written: everything written goes again
    with pytest.raises(TemporaryFailure, match="unable to queue"):
        q.enqueue("a@b.test", ["c@d.test"], b"x\n")
    assert files(qdir, "mess") == files(qdir, "pid") == files(qdir, "todo") == []


def test_missing_queue_is_temporary(tmp_path: Path):
    with pytest.raises(TemporaryFailure):
        Queue(tmp_path / "nothing").enqueue("a@b.test", ["c@d.test"], b"x\n")


# ----------------------------------------------------------------------------- preprocessing, delivery state

def _preprocess(q: Queue, mid: int, local: list[str], remote: list[str]) -> None:
    env = q.read_todo(mid)
    q.write_info(mid, env.sender)
    if local:
        q.write_channel(mid, "local", local)
    if remote:
        q.write_channel(mid, "remote", remote)
    q.finish_preprocess(mid)


def test_preprocessing_moves_the_message_from_todo_to_info(qdir: Path, q: Queue):
    mid = q.enqueue("a@b.test", ["l1@x", "r1@y", "l2@x"], b"x\n")
    assert q.list_todo() == [mid] and q.list_info() == []
    _preprocess(q, mid, ["pre-l1@x", "pre-l2@x"], ["r1@y"])
    n = mid % SPLIT
    assert q.list_todo() == [] and q.list_info() == [mid]
    assert files(qdir, "intd") == []
    assert (qdir / "info" / str(n) / str(mid)).read_bytes() == b"Fa@b.test\0"
    assert (qdir / "local" / str(n) / str(mid)).read_bytes() == b"Tpre-l1@x\0Tpre-l2@x\0"
    assert (qdir / "remote" / str(n) / str(mid)).read_bytes() == b"Tr1@y\0"
    assert q.read_info(mid) == "a@b.test"
    assert q.birth(mid) == (qdir / "info" / str(n) / str(mid)).stat().st_mtime
    recs = q.read_channel(mid, "local")
    assert [(r.address, r.offset, r.done) for r in recs] == [("pre-l1@x", 0, False), ("pre-l2@x", 10, False)]
    assert q.read_channel(mid, "remote")[0].address == "r1@y"


def test_mark_done_overwrites_t_with_d_in_place(qdir: Path, q: Queue):
    mid = q.enqueue("a@b.test", ["x@y"], b"x\n")
    _preprocess(q, mid, ["one@x", "two@x", "three@x"], [])
    path = qdir / "local" / str(mid % SPLIT) / str(mid)
    ino = path.stat().st_ino
    second = q.read_channel(mid, "local")[1]
    q.mark_done(mid, "local", second.offset)
    assert path.read_bytes() == b"Tone@x\0Dtwo@x\0Tthree@x\0"
    assert path.stat().st_ino == ino  # in place, not a new file
    second.done = True  # records are mutable: the manager flips them after mark_done
    assert [r.done for r in q.read_channel(mid, "local")] == [False, True, False]


def test_channel_mtime_holds_the_retry_time(q: Queue):
    mid = q.enqueue("a@b.test", ["x@y"], b"x\n")
    _preprocess(q, mid, ["x@y"], [])
    q.set_channel_mtime(mid, "local", 2_000_000_000.0)
    assert q.channel_mtime(mid, "local") == 2_000_000_000.0
    assert q.channel_mtime(mid, "remote") is None
    q.set_channel_mtime(mid, "remote", 1.0)  # no such file: nothing to do
    with pytest.raises(ValueError):
        q.read_channel(mid, "elsewhere")


def test_bounce_paragraphs_append_durably(q: Queue):
    mid = q.enqueue("a@b.test", ["x@y"], b"x\n")
    assert q.read_bounce(mid) == b""
    q.append_bounce(mid, b"<x@y>:\nSorry.\n\n")
    q.append_bounce(mid, b"<z@y>:\nNo.\n\n")
    assert q.read_bounce(mid) == b"<x@y>:\nSorry.\n\n<z@y>:\nNo.\n\n"


def test_remove_message_removes_every_file(qdir: Path, q: Queue):
    keep = q.enqueue("a@b.test", ["k@y"], b"keep\n")
    mid = q.enqueue("a@b.test", ["x@y", "r@z"], b"x\n")
    _preprocess(q, mid, ["x@y"], ["r@z"])
    q.append_bounce(mid, b"<x@y>:\nSorry.\n\n")
    q.remove_message(mid)
    for sub in ("info", "local", "remote", "bounce", "pid"):
        assert files(qdir, sub) == [], sub
    assert files(qdir, "mess") == [f"{keep % SPLIT}/{keep}"]
    assert files(qdir, "intd") == files(qdir, "todo") == [str(keep)]
    assert q.counts() == (1, 1)


def test_counts_are_qmail_qstats(q: Queue):
    assert q.counts() == (0, 0)
    ids = [q.enqueue("a@b.test", ["x@y"], b"x\n") for _ in range(3)]
    assert q.counts() == (3, 3)
    _preprocess(q, ids[0], ["x@y"], [])
    assert q.counts() == (3, 2)


def test_iter_messages_shows_todo_and_preprocessed_messages(q: Queue):
    a = q.enqueue("s1@x", ["t1@y", "t2@y"], b"12345\n")
    b = q.enqueue("s2@x", ["l@y", "r@z"], b"x\n")
    _preprocess(q, b, ["pre-l@y", "pre-m@y"], ["r@z"])
    q.mark_done(b, "local", 0)
    q.set_channel_mtime(b, "local", 2_000_000_000.0)
    q.append_bounce(b, b"<pre-l@y>:\nno\n\n")
    msgs = {m.id: m for m in q.iter_messages()}
    assert set(msgs) == {a, b}
    ma, mb = msgs[a], msgs[b]
    assert (ma.sender, ma.bouncing, ma.size) == ("s1@x", False, q.message_size(a))
    assert [(r.channel, r.address, r.done) for r in ma.recipients] == [("todo", "t1@y", False),
                                                                        ("todo", "t2@y", False)]
    assert (mb.sender, mb.bouncing, mb.birth) == ("s2@x", True, q.birth(b))
    assert [(r.channel, r.address, r.done, r.next_attempt) for r in mb.recipients] == [
        ("local", "pre-l@y", True, None), ("local", "pre-m@y", False, 2_000_000_000.0),
        ("remote", "r@z", False, q.channel_mtime(b, "remote"))]


# ----------------------------------------------------------------------------- crash clean-up

def _stray_mess(qdir: Path, content: bytes = b"partial") -> int:
    """A message file as a writer that died before its commit leaves it."""
    tmp = qdir / "pid" / "stray"
    tmp.write_bytes(content)
    mid = tmp.stat().st_ino
    os.link(tmp, qdir / "mess" / str(mid % SPLIT) / str(mid))
    tmp.unlink()
    return mid


def test_cleanup_removes_uncommitted_files_only(qdir: Path, q: Queue):
    committed = q.enqueue("a@b.test", ["x@y"], b"x\n")
    done = q.enqueue("a@b.test", ["x@y"], b"x\n")
    _preprocess(q, done, ["x@y"], [])
    partial = _stray_mess(qdir)                    # died while writing the message
    with_intd = _stray_mess(qdir)                  # died between intd and the todo link
    (qdir / "intd" / str(with_intd)).write_bytes(b"u0\0p1\0Fa\0Tb\0")
    (qdir / "intd" / "999999999").write_bytes(b"")  # an intd whose message is gone
    old_pid = qdir / "pid" / "1.2.3"
    old_pid.write_bytes(b"")
    os.utime(old_pid, (time.time() - 3600,) * 2)
    young_pid = qdir / "pid" / "4.5.6"              # perhaps a writer between open and flock
    young_pid.write_bytes(b"")

    assert q.cleanup_stale() == 5  # partial; with_intd and its intd; the orphan intd; old pid
    assert files(qdir, "mess") == sorted([f"{committed % SPLIT}/{committed}", f"{done % SPLIT}/{done}"])
    assert files(qdir, "intd") == [str(committed)]
    assert files(qdir, "pid") == ["4.5.6"]
    assert not (qdir / "mess" / str(partial % SPLIT) / str(partial)).exists()
    assert q.list_todo() == [committed] and q.list_info() == [done]
    assert q.cleanup_stale() == 0


def test_cleanup_leaves_a_file_whose_writer_holds_the_lock(qdir: Path, q: Queue):
    mid = _stray_mess(qdir)
    path = qdir / "mess" / str(mid % SPLIT) / str(mid)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a live writer holds until its commit
        assert q.cleanup_stale() == 0
        assert path.exists()
    finally:
        os.close(fd)  # the writer is gone (a SIGKILL releases the lock the same way)
    assert q.cleanup_stale() == 1
    assert not path.exists()


# ----------------------------------------------------------------------------- concurrency

def _eight_writers(queue_for: Callable[[], Queue]) -> list[int]:
    """8 threads enqueue 25 messages each, thread t through ``queue_for()``; the ids, in order."""
    ids: list[int] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        q = queue_for()
        for i in range(25):
            mid = q.enqueue(f"s{t}@x", [f"r{t}.{i}@y"], f"m {t} {i}\n".encode())
            with lock:
                ids.append(mid)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ids


def test_concurrent_enqueues_from_threads(q: Queue):
    ids = _eight_writers(lambda: q)
    assert len(set(ids)) == 200
    assert q.counts() == (200, 200)
    for mid in ids:
        env = q.read_todo(mid)
        t, i = env.recipients[0][1:-2].split(".")
        assert env.sender == f"s{t}@x"
        assert q.message_path(mid).read_bytes().endswith(f"m {t} {i}\n".encode())


def test_enqueue_async_runs_in_a_thread_pool(q: Queue):
    async def main() -> list[int]:
        loop_thread = threading.get_ident()
        threads: set[int] = set()

        def body(i: int):
            threads.add(threading.get_ident())
            yield f"message {i}\n".encode()

        ids = await asyncio.gather(*(q.enqueue_async("a@b.test", [f"r{i}@y"], [body(i)])
                                     for i in range(50)))
        assert loop_thread not in threads  # the blocking work never ran on the event loop
        return ids

    try:
        ids = asyncio.run(main())
    finally:
        q.close()
    assert len(set(ids)) == 50
    assert q.list_todo() == sorted(ids)
    for i, mid in enumerate(ids):
        assert q.read_todo(mid).recipients == [f"r{i}@y"]


def test_enqueue_async_reports_failures(q: Queue):
    with pytest.raises(PermanentFailure):
        asyncio.run(q.enqueue_async("a@b.test", [], b"x\n"))
    q.close()


# ----------------------------------------------------------------------------- pure parsers

def test_parse_envelope_and_channel():
    env = store.parse_envelope(b"u7\0p42\0Fs@x\0Ta@y\0Tb@z\0")
    assert env == store.Envelope("s@x", ["a@y", "b@z"], 42, 7)
    with pytest.raises(TemporaryFailure, match="truncated"):
        store.parse_envelope(b"u7\0p42\0Fs@x\0Ta@y")
    recs = store.parse_channel(b"Ta\0Dbb\0Tccc\0Tpartial")
    assert [(r.address, r.offset, r.done) for r in recs] == [("a", 0, False), ("bb", 3, True),
                                                             ("ccc", 7, False)]


def test_group_commit_isolates_a_bad_envelope(q: Queue):
    """Concurrent enqueue_async calls are committed together; one bad envelope fails alone."""
    async def main() -> list:
        calls = [q.enqueue_async("a@b.test", [f"r{i}@y"] if i != 7 else ["bad\nrcpt@y"], b"x\n")
                 for i in range(20)]
        return await asyncio.gather(*calls, return_exceptions=True)

    try:
        outcomes = asyncio.run(main())
    finally:
        q.close()
    assert isinstance(outcomes[7], PermanentFailure)
    ids = [o for i, o in enumerate(outcomes) if i != 7]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == 19
    assert q.list_todo() == sorted(ids)
    assert [q.read_todo(mid).recipients for mid in ids] == [[f"r{i}@y"] for i in range(20) if i != 7]


# ----------------------------------------------------------------------------- pool/: reused files

def _finish(q: Queue, mid: int) -> None:
    q.read_todo(mid)
    q.remove_message(mid)


def test_a_finished_messages_files_are_kept_and_reused_whole_and_trimmed(qdir: Path):
    old = Queue(qdir)
    big = old.enqueue("long-sender@x.test", [f"r{i}@y.test" for i in range(50)], b"B" * 9000 + b"\n")
    _finish(old, big)
    spares = files(qdir, "pool")
    assert len(spares) == 2 and str(big) in spares  # the mess file and the intd file
    assert files(qdir, "mess") == files(qdir, "intd") == files(qdir, "todo") == []

    writer = Queue(qdir)  # another process: it lists pool/ afresh
    mid = writer.enqueue("s@x.test", ["r@y.test"], b"small\n")
    assert str(mid) in spares  # an old inode, so no new one was allocated
    assert files(qdir, "pool") == [] and files(qdir, "pid") == []
    data = writer.message_path(mid).read_bytes()
    head = RECEIVED.match(data)
    assert head is not None and data == head.group(0) + b"small\n"  # nothing of the old message left
    env = writer.read_todo(mid)
    assert (env.sender, env.recipients) == ("s@x.test", ["r@y.test"])
    intd = os.stat(qdir / "intd" / str(mid))
    assert intd.st_ino == os.stat(qdir / "todo" / str(mid)).st_ino and intd.st_nlink == 2
    assert intd.st_size == len((qdir / "todo" / str(mid)).read_bytes())


def test_big_files_and_a_full_pool_are_removed_not_kept(qdir: Path, monkeypatch: pytest.MonkeyPatch):
    q = Queue(qdir)
    big = q.enqueue("s@x.test", ["r@y.test"], b"x" * (store.POOL_FILE_MAX + 1))
    _finish(q, big)
    assert str(big) not in files(qdir, "pool")  # the message file went; its small intd is kept
    assert len(files(qdir, "pool")) == 1
    monkeypatch.setattr(store, "POOL_MAX", 1)
    q2 = Queue(qdir)
    small = q2.enqueue("s@x.test", ["r@y.test"], b"x\n")  # takes the one spare
    other = q2.enqueue("s@x.test", ["r@y.test"], b"y\n")
    _finish(q2, small)
    _finish(q2, other)
    assert len(files(qdir, "pool")) == 1  # the rest was unlinked
    assert files(qdir, "mess") == files(qdir, "intd") == []


def test_writers_claim_spares_concurrently_without_sharing_one(qdir: Path):
    first = Queue(qdir)
    for mid in [first.enqueue("s@x", ["r@y"], b"old %d\n" % i) for i in range(50)]:
        _finish(first, mid)
    assert len(files(qdir, "pool")) == 100
    ids = _eight_writers(lambda: Queue(qdir))  # one each, like separate smtpd and inject processes
    assert len(set(ids)) == 200 and files(qdir, "pool") == []
    q = Queue(qdir)
    assert q.counts() == (200, 200)
    for mid in ids:
        env = q.read_todo(mid)
        t, i = env.recipients[0][1:-2].split(".")
        assert env.sender == f"s{t}@x"
        data = q.message_path(mid).read_bytes()
        assert data == RECEIVED.match(data).group(0) + f"m {t} {i}\n".encode()


def test_the_manager_gives_an_older_queue_its_pool(qdir: Path):
    (qdir / "pool").rmdir()
    q = Queue(qdir)
    mid = q.enqueue("s@x.test", ["r@y.test"], b"x\n")
    _finish(q, mid)  # no pool/: removed as before
    assert files(qdir, "mess") == [] and not (qdir / "pool").exists()
    q.ensure_pool()
    assert stat.S_IMODE(os.stat(qdir / "pool").st_mode) == stat.S_IMODE(os.stat(qdir / "pid").st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="files of another owner: root only")
def test_files_root_wrote_are_given_to_the_queue_owner_when_kept(tmp_path: Path):
    pw = pwd.getpwnam("nobody")
    make_queue(tmp_path / "queue", pw.pw_uid, pw.pw_gid)
    q = Queue(tmp_path / "queue")
    mid = q.enqueue("s@x.test", ["r@y.test"], b"x\n")  # written by root
    _finish(q, mid)
    spare = tmp_path / "queue" / "pool" / str(mid)
    assert (spare.stat().st_uid, spare.stat().st_gid) == (pw.pw_uid, pw.pw_gid)
