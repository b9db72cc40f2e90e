"""The suite's one way to wait for a condition: ``eventually``.

A test that waits for something another task, process or database session makes true polls for
it with a deadline, and on timeout fails naming what it waited for. The deadline is an upper
bound for a loaded machine, never a measured duration: a test is never slower than the
condition, and never passes because time went by.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float,
    what: str | Callable[[], object],
    *,
    interval: float = 0.01,
) -> T:
    """Call ``predicate`` every ``interval`` s until it returns something true, and return that.

    ``predicate`` may return an awaitable (a query), which is awaited. After ``timeout`` s fail
    with an AssertionError naming ``what``; a callable ``what`` is called then, so the message
    can show the state that was not reached.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            message = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
        await asyncio.sleep(interval)
