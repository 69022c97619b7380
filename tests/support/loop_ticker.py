"""Shows whether async code leaves the event loop free."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


def run_while_ticking(work: Callable[[], Awaitable[Any]]) -> tuple[Any, int]:
    """Run `work()` in a fresh event loop beside a 1 ms ticker. Returns its result
    and how often the ticker ran: code that blocked the loop leaves it near 0."""
    result, ticks, _ = run_watching_the_loop(work)
    return result, ticks


def run_watching_the_loop(work: Callable[[], Awaitable[Any]]) -> tuple[Any, int, float]:
    """`run_while_ticking`, and the longest time in seconds between two ticks: how
    long the loop was blocked at worst."""

    async def main():
        ticks, longest, last = 0, 0.0, time.perf_counter()

        async def ticker():
            nonlocal ticks, longest, last
            while True:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                ticks, longest, last = ticks + 1, max(longest, now - last), now

        task = asyncio.create_task(ticker())
        try:
            result = await work()
            return result, ticks, max(longest, time.perf_counter() - last)
        finally:
            task.cancel()

    return asyncio.run(main())
