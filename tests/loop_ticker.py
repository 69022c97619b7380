"""Shows whether async code leaves the event loop free."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


def run_while_ticking(work: Callable[[], Awaitable[Any]]) -> tuple[Any, int]:
    """Run `work()` in a fresh event loop beside a 1 ms ticker. Returns its result
    and how often the ticker ran: code that blocked the loop leaves it near 0."""

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        task = asyncio.create_task(ticker())
        try:
            return await work(), ticks
        finally:
            task.cancel()

    return asyncio.run(main())
