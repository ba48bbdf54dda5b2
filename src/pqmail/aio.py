"""The event loop the long-running services run on: uvloop (libuv) when it is installed, else asyncio's.

uvloop does the same work with less CPU per event (the services handle several events per message or
session); the code uses only the asyncio API, so either loop runs it. It is imported with this module,
not when a service starts its loop: by then the service may have dropped privileges and be unable
to read the files of the interpreter or of its virtualenv, and would quietly lose uvloop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio's loop works too
    uvloop = None  # type: ignore[assignment]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop when available."""
    if uvloop is None:
        return asyncio.run(main)
    return uvloop.run(main)
