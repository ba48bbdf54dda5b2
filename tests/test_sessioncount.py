"""SessionTable: counts shared across forked workers, each writing only its own region."""

from __future__ import annotations

import os

import pytest

from pqmail.sessioncount import SessionCounter, SessionTable


def test_a_lone_counter_counts_exactly():
    c = SessionCounter.private()
    c.add("192.0.2.1")
    c.add("192.0.2.1")
    c.add("198.51.100.7")
    assert (c.total(), c.own, c.for_ip("192.0.2.1"), c.for_ip("198.51.100.7"), c.for_ip("203.0.113.9")) == (
        3, 3, 2, 1, 0)
    c.remove("192.0.2.1")
    c.remove("203.0.113.9")  # never added: ignored, counts stay right
    assert (c.total(), c.for_ip("192.0.2.1")) == (2, 1)


def test_workers_see_each_others_sessions():
    table = SessionTable(2)
    a, b = table.counter(0), table.counter(1)
    a.add("192.0.2.1")
    b.add("192.0.2.1")
    b.add("198.51.100.7")
    assert (a.total(), b.total()) == (3, 3)
    assert (a.own, b.own) == (1, 2)
    assert a.for_ip("192.0.2.1") == 2 and b.for_ip("198.51.100.7") == 1
    b.remove("192.0.2.1")
    assert a.for_ip("192.0.2.1") == 1 and a.total() == 2


def test_clearing_a_dead_workers_region_gives_its_sessions_back():
    table = SessionTable(2)
    a, b = table.counter(0), table.counter(1)
    a.add("192.0.2.1")
    for _ in range(5):
        b.add("192.0.2.1")
    table.clear(1)
    assert (a.total(), a.for_ip("192.0.2.1")) == (1, 1)


def test_a_starting_worker_resets_its_region():
    table = SessionTable(2)
    old = table.counter(1)
    old.add("192.0.2.1")
    new = table.counter(1)
    new.reset()
    assert table.counter(0).total() == 0 and table.counter(0).for_ip("192.0.2.1") == 0


def test_a_forked_worker_writes_what_the_parent_reads():
    table = SessionTable(2)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: worker 1 takes three sessions, then says so
        try:
            c = table.counter(1)
            for ip in ("192.0.2.1", "192.0.2.1", "2001:db8::1"):
                c.add(ip)
            os.write(w, b"x")
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    os.waitpid(pid, 0)
    parent = table.counter(0)
    assert (parent.total(), parent.for_ip("192.0.2.1"), parent.for_ip("2001:db8::1")) == (3, 2, 1)


def test_bad_indexes_are_refused():
    with pytest.raises(ValueError):
        SessionTable(0)
    with pytest.raises(IndexError):
        SessionTable(2).counter(2)
