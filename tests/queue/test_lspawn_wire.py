"""The frames between the queue manager and its delivery processes: exact round trips, and a
worker's frame taken as untrusted input (garbage is refused with ValueError, never a crash; the
worker that sent it is stopped and its jobs are retried)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pqmail.config.assign import AssignEntry
from pqmail.local.deliver import LocalJob, LocalResult
from pqmail.queue.lspawn import (
    Spawner,
    _frame,
    _job_from_wire,
    _job_to_wire,
    _result_from_wire,
    _result_to_wire,
    _split_frame,
    _Worker,
)

ENTRY = AssignEntry("popuser", 1001, 1002, "/m/e/ex1/DOMAINS/example.com", "-", "J\xf6e.Smith")


def test_job_round_trip_keeps_8bit_addresses() -> None:
    job = LocalJob(message_path="unused", sender="s\udce4@x.test", recipient="ex1-J\xf6e@example.com",
                   entry=ENTRY, default_delivery="./Maildir/\n")
    job_id, back = _job_from_wire(_job_to_wire(7, job), "/proc/self/fd/5")
    assert job_id == 7
    assert back == LocalJob(message_path="/proc/self/fd/5", sender=job.sender, recipient=job.recipient,
                            entry=ENTRY, default_delivery="./Maildir/\n")


def test_job_with_a_nul_in_a_field_is_refused() -> None:
    job = LocalJob(message_path="x", sender="a\0b@x.test", recipient="r@x.test", entry=ENTRY,
                   default_delivery="./Maildir/\n")
    with pytest.raises(ValueError, match="NUL"):
        _job_to_wire(1, job)


def test_job_frame_with_the_wrong_field_count_is_refused() -> None:
    with pytest.raises(ValueError, match="fields"):
        _job_from_wire(b"1\0a\0b", "/proc/self/fd/3")


def test_several_jobs_travel_in_one_frame_each_with_its_descriptor() -> None:
    jobs = [LocalJob(message_path="x", sender=f"s{i}@x.test", recipient=f"r{i}@x.test", entry=ENTRY,
                     default_delivery="") for i in range(3)]  # empty fields too
    split = _split_frame(_frame([_job_to_wire(10 + i, j) for i, j in enumerate(jobs)]), [7, 8, 9])
    assert [fd for _data, fd in split] == [7, 8, 9]
    back = [_job_from_wire(data, f"/proc/self/fd/{fd}") for data, fd in split]
    assert [(i, j.sender, j.recipient, j.message_path) for i, j in back] == [
        (10 + i, f"s{i}@x.test", f"r{i}@x.test", f"/proc/self/fd/{7 + i}") for i in range(3)]


@pytest.mark.parametrize("frame, fds", [
    (b"2\0" + b"\0".join([b"f"] * 10), [3, 4]),  # fewer jobs than announced
    (b"1\0" + b"\0".join([b"f"] * 10), [3, 4]),  # a descriptor too many
    (b"x\0", []),
    (b"", []),
])
def test_a_frame_that_does_not_add_up_is_refused(frame: bytes, fds: list[int]) -> None:
    with pytest.raises(ValueError):
        _split_frame(frame, fds)


@pytest.mark.parametrize("result", [
    LocalResult("K", "did 1+0+0\n", [], "", b""),
    LocalResult("K", "did 0+2+0\n", ["a@x.test", "b\udce4@y.test"], "ex1-owner@example.com",
                b"Delivered-To: ex1-joe@example.com\n"),
    LocalResult("Z", "program said \udcff\udcfe and a NUL? no: \n", [], "", b""),
    LocalResult("D", "Sorry, no mailbox here by that name. (#5.1.1)\n", [], "", b""),
])
def test_result_round_trip(result: LocalResult) -> None:
    assert _result_from_wire(_result_to_wire(42, result)) == (42, result)


def test_a_report_may_hold_nul_bytes_and_still_ends_the_frame() -> None:
    result = LocalResult("Z", "before\0after", ["x@y.test"], "", b"")
    assert _result_from_wire(_result_to_wire(3, result)) == (3, result)


@given(st.binary(max_size=200))
def test_any_bytes_from_a_worker_give_a_result_or_value_error(data: bytes) -> None:
    try:
        job_id, result = _result_from_wire(data)
    except ValueError:
        return
    assert isinstance(job_id, int)
    assert result.status in ("K", "Z", "D")
    assert all(isinstance(a, str) for a in result.forwards)


def test_an_unreadable_result_stops_the_worker_and_its_jobs_come_back_as_deferrals() -> None:
    """The manager's side of a worker's socket, with the test playing the worker: one good
    result, then garbage. The job still waiting must not wait forever."""
    logged: list[str] = []

    async def scenario() -> tuple[LocalResult, LocalResult, bytes]:
        loop = asyncio.get_running_loop()
        spawner = Spawner(log=logged.append)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        mine.setblocking(False)
        first, second = loop.create_future(), loop.create_future()
        w = _Worker(sock=mine, pid=4242, key=(1001, 1002), loop=loop,
                    pending={1: first.set_result, 2: second.set_result})
        spawner._workers[w.key] = [w]
        loop.add_reader(mine.fileno(), spawner._on_readable, w)
        with theirs:
            theirs.send(_result_to_wire(1, LocalResult("K", "did 1+0+0\n", [], "", b"")))
            theirs.send(b"2\0K\0\0\0not a count")
            done = await asyncio.wait_for(asyncio.gather(first, second), 30)
            return (*done, theirs.recv(100))  # b"": the manager closed its end, so the worker exits

    ok, deferred, eof = asyncio.run(scenario())
    assert ok.status == "K"
    assert deferred.status == "Z" and "will retry" in deferred.report
    assert eof == b""
    assert any("delivery process 4242 sent an unreadable result" in line and "retried" in line
               for line in logged), logged
