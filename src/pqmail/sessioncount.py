"""Session counts shared by the worker processes of one service, so that its limits hold per host.

``pqmail serve`` forks N smtpd (or pop3d) processes onto one listening socket, and a client's
connections land in whichever process accepts first. ``maxsessions`` and ``maxsessionsperip`` (and
POP3's ``concurrencypop3``/``concurrencypop3perip``) must therefore count the sessions of all of
them, as tcpserver's ``-c`` does for qmail.

The supervisor creates a :class:`SessionTable` before forking: an anonymous shared mapping with one
region per worker. A worker writes only its own region, so there is no lock that a worker killed at
any instant could leave held; the others read every region. The supervisor zeroes the region of a
worker that died (its connections died with it), and a worker zeroes its own when it starts.

A region holds the worker's session count and 65,536 per-address counters, indexed by a hash of the
address. The hash is Python's string hash: randomised per ``serve`` run, the same in every worker
forked from it, so clients cannot pick addresses that share a counter. A worker counts its own
sessions exactly (by address); two addresses sharing a counter matter only when the other address
holds sessions in another worker, and then only by those sessions.
"""

from __future__ import annotations

import mmap

BUCKETS = 1 << 16
_HEAD = 8  # the session count (u32), then padding so the counters stay aligned
_REGION = _HEAD + 2 * BUCKETS
_COUNTER_MAX = 0xFFFF


class SessionTable:
    """The shared counts of ``workers`` processes; create it before forking them."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("a session table needs at least one worker")
        self.workers = workers
        self._map = mmap.mmap(-1, workers * _REGION)  # anonymous and MAP_SHARED: forks see writes
        self._totals = memoryview(self._map).cast("I")
        self._counters = memoryview(self._map).cast("H")

    def counter(self, index: int) -> SessionCounter:
        """Worker ``index``'s handle: it counts its sessions in region ``index``."""
        if not 0 <= index < self.workers:
            raise IndexError(f"worker {index} of {self.workers}")
        return SessionCounter(self, index)

    def clear(self, index: int) -> None:
        """Forget worker ``index``'s sessions (it died, or is starting)."""
        start = index * _REGION
        self._map[start:start + _REGION] = bytes(_REGION)

    def total(self) -> int:
        step = _REGION // 4
        return sum(self._totals[r * step] for r in range(self.workers))

    def others_at(self, bucket: int, skip: int) -> int:
        step = _REGION // 2
        first = _HEAD // 2 + bucket
        return sum(self._counters[r * step + first] for r in range(self.workers) if r != skip)

    def publish(self, index: int, total: int, bucket: int, delta: int) -> None:
        self._totals[index * (_REGION // 4)] = total
        at = index * (_REGION // 2) + _HEAD // 2 + bucket
        self._counters[at] = max(0, min(self._counters[at] + delta, _COUNTER_MAX))


class SessionCounter:
    """One worker's view: admit and release its sessions, read the counts of all workers."""

    def __init__(self, table: SessionTable, index: int) -> None:
        self._table = table
        self._index = index
        self._own: dict[str, int] = {}
        self._mine = 0

    @classmethod
    def private(cls) -> SessionCounter:
        """A counter for a process that serves alone (no supervisor, or one worker)."""
        return SessionTable(1).counter(0)

    def reset(self) -> None:
        self._own.clear()
        self._mine = 0
        self._table.clear(self._index)

    @property
    def own(self) -> int:
        """Sessions of this worker."""
        return self._mine

    def total(self) -> int:
        """Sessions of all workers."""
        return self._table.total()

    def for_ip(self, ip: str) -> int:
        """Sessions from ``ip`` in all workers (exact here, by shared counter elsewhere)."""
        return self._own.get(ip, 0) + self._table.others_at(_bucket(ip), self._index)

    def add(self, ip: str) -> None:
        self._own[ip] = self._own.get(ip, 0) + 1
        self._mine += 1
        self._table.publish(self._index, self._mine, _bucket(ip), +1)

    def remove(self, ip: str) -> None:
        n = self._own.get(ip, 0)
        if n <= 0:
            return
        if n == 1:
            del self._own[ip]
        else:
            self._own[ip] = n - 1
        self._mine -= 1
        self._table.publish(self._index, self._mine, _bucket(ip), -1)


def _bucket(ip: str) -> int:
    return hash(ip) & (BUCKETS - 1)
