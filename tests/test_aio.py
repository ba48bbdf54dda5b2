"""pqmail.aio.run: the services' event loop is uvloop (a declared dependency), running asyncio code."""

from __future__ import annotations

import asyncio

from pqmail import aio


def test_services_run_on_uvloop_and_the_asyncio_api_works():
    async def main() -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.call_soon(fut.set_result, 41)
        value = await fut
        done = await loop.run_in_executor(None, lambda: value + 1)
        return type(loop).__module__, done

    module, value = aio.run(main())
    assert module.startswith("uvloop")
    assert value == 42
