"""qmail-send's retry schedule (qmail-send.c ``nextretry``), as pure functions.

Attempts fall at ``birth + (skip*k)**2`` seconds when each happens on time: 100 s, 400 s, 900 s …
for local deliveries (skip 10) and 400 s, 1600 s, 3600 s … for remote ones (skip 20).
"""

from __future__ import annotations

import math

SKIP = {"local": 10, "remote": 20}


def next_retry(birth: float, now: float, channel: str) -> float:
    """When to try a deferred recipient of ``channel`` again, given the message's birth."""
    age = max(0, int(now - birth))
    return birth + (math.isqrt(age) + SKIP[channel]) ** 2


def expired(birth: float, now: float, lifetime: int) -> bool:
    """True when the message has outlived ``queuelifetime``: its next attempt is its last."""
    return now > birth + lifetime
