"""The event loop the long-running services run on: uvloop (libuv) when it is installed, else asyncio's.

uvloop does the same work with less CPU per event (the services handle several events per message or
session); the code uses only the asyncio API, so either loop runs it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop when available."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
