"""The delivery spawner as root: per-uid single-threaded worker processes, their results, their deaths.

Real processes throughout: the zygote forks workers that drop to ``nobody`` and write real Maildirs.
The tests need root (setuid); they skip otherwise.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
from pathlib import Path

import pytest

from pqmail.config.assign import AssignEntry
from pqmail.local.deliver import LocalJob, LocalResult
from pqmail.maildir import maildirmake
from pqmail.queue.lspawn import Spawner

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the spawner forks setuid workers: root only")


@pytest.fixture
def home(mailtmp: Path) -> tuple[Path, pwd.struct_passwd]:
    pw = pwd.getpwnam("nobody")
    home = mailtmp / "home"
    home.mkdir(mode=0o755)
    os.chown(home, pw.pw_uid, pw.pw_gid)
    maildirmake(home / "Maildir", uid=pw.pw_uid, gid=pw.pw_gid)
    return home, pw


def _job(home: Path, pw: pwd.struct_passwd, message: Path, uid: int | None = None) -> LocalJob:
    entry = AssignEntry("nobody", pw.pw_uid if uid is None else uid, pw.pw_gid, str(home), "", "")
    return LocalJob(message_path=message, sender="a@b.test", recipient="nobody@x.test", entry=entry,
                    default_delivery="./Maildir/\n")


def _message(tmp: Path, n: int) -> Path:
    p = tmp / f"msg{n}"
    p.write_bytes(f"Subject: {n}\n\nbody {n}\n".encode())
    p.chmod(0o600)  # only root can read it: the worker must use the descriptor it is given
    return p


async def _deliver_all(spawner: Spawner, jobs: list[LocalJob]) -> list[LocalResult]:
    loop = asyncio.get_running_loop()
    futures = []
    for job in jobs:
        fut = loop.create_future()
        spawner.submit(job, os.open(job.message_path, os.O_RDONLY), fut.set_result)
        futures.append(fut)
    return list(await asyncio.gather(*futures))


def test_workers_deliver_as_the_box_owner_and_stay_within_the_limit(home, mailtmp):
    home_dir, pw = home
    spawner = Spawner(procs_per_uid=3)
    spawner.start()
    try:
        jobs = [_job(home_dir, pw, _message(mailtmp, i)) for i in range(40)]
        results = asyncio.run(_deliver_all(spawner, jobs))
        workers = [w for ws in spawner._workers.values() for w in ws]
    finally:
        spawner.close()
    assert [r.status for r in results] == ["K"] * 40, results
    assert 1 <= len(workers) <= 3
    new = list((home_dir / "Maildir" / "new").iterdir())
    assert len(new) == 40
    assert {p.stat().st_uid for p in new} == {pw.pw_uid}
    bodies = sorted(p.read_bytes().split(b"\n\n", 1)[1] for p in new)
    assert bodies == sorted(f"body {i}\n".encode() for i in range(40))


def test_uid_0_is_never_used(home, mailtmp):
    home_dir, pw = home
    spawner = Spawner()
    spawner.start()
    try:
        (result,) = asyncio.run(_deliver_all(spawner, [_job(home_dir, pw, _message(mailtmp, 0), uid=0)]))
    finally:
        spawner.close()
    assert result.status == "Z" and "as root" in result.report
    assert list((home_dir / "Maildir" / "new").iterdir()) == []


def test_a_worker_that_dies_defers_its_job_and_the_next_job_gets_a_new_worker(home, mailtmp):
    home_dir, pw = home
    fifo = home_dir / "gate"
    os.mkfifo(fifo)
    os.chown(fifo, pw.pw_uid, pw.pw_gid)
    (home_dir / ".qmail-hang").write_text(f"|cat {fifo} >/dev/null\n")  # blocks until the FIFO opens
    spawner = Spawner(procs_per_uid=1)
    spawner.start()

    async def scenario() -> tuple[LocalResult, LocalResult, int, int]:
        loop = asyncio.get_running_loop()
        hung: asyncio.Future = loop.create_future()
        job = _job(home_dir, pw, _message(mailtmp, 1))
        entry = AssignEntry("nobody", pw.pw_uid, pw.pw_gid, str(home_dir), "-", "hang")
        job = LocalJob(job.message_path, job.sender, "hang@x.test", entry, job.default_delivery)
        spawner.submit(job, os.open(job.message_path, os.O_RDONLY), hung.set_result)
        (first,) = [w for ws in spawner._workers.values() for w in ws]
        os.kill(first.pid, signal.SIGKILL)
        died = await hung
        (after,) = await _deliver_all(spawner, [_job(home_dir, pw, _message(mailtmp, 2))])
        (second,) = [w for ws in spawner._workers.values() for w in ws]
        return died, after, first.pid, second.pid

    try:
        died, after, first_pid, second_pid = asyncio.run(scenario())
    finally:
        spawner.close()
        try:  # an open and close of the write side lets the orphaned cat finish
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert died.status == "Z" and "died" in died.report
    assert after.status == "K"
    assert second_pid != first_pid
    assert len(list((home_dir / "Maildir" / "new").iterdir())) == 1



def test_jobs_sent_together_fail_alone(home, mailtmp):
    """Jobs given in one pass travel in one frame and share a group commit; a Maildir that cannot
    take its file defers its own job only."""
    home_dir, pw = home
    other = mailtmp / "other"
    other.mkdir(mode=0o755)
    os.chown(other, pw.pw_uid, pw.pw_gid)
    broken = maildirmake(other / "Maildir", uid=pw.pw_uid, gid=pw.pw_gid)
    (broken / "new").rmdir()
    good = [_job(home_dir, pw, _message(mailtmp, i)) for i in range(3)]
    bad = _job(home_dir, pw, _message(mailtmp, 9))
    bad = LocalJob(bad.message_path, bad.sender, bad.recipient,
                   AssignEntry("nobody", pw.pw_uid, pw.pw_gid, str(other), "", ""), bad.default_delivery)
    spawner = Spawner(procs_per_uid=3)
    spawner.start()
    try:
        results = asyncio.run(_deliver_all(spawner, [good[0], bad, good[1], good[2]]))
        workers = [w for ws in spawner._workers.values() for w in ws]
    finally:
        spawner.close()
    assert len(workers) == 1  # all four went to one process
    assert [r.status for r in results] == ["K", "Z", "K", "K"], results
    assert "Unable to link tmp file into new" in results[1].report or "chdir" in results[1].report
    bodies = sorted(p.read_bytes().split(b"\n\n", 1)[1] for p in (home_dir / "Maildir" / "new").iterdir())
    assert bodies == [b"body 0\n", b"body 1\n", b"body 2\n"]
    assert list((broken / "tmp").iterdir()) == []
