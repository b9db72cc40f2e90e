"""What counts as "the database is unreachable or the connection broke", and how long to
wait before trying again.

One tuple, used everywhere the gateway survives a database outage, so no task dies on an
error type one module forgot. ``InternalClientError`` is what asyncpg raises on a pooled
connection whose backend was terminated mid-operation (MagicStack/asyncpg#784, #1069);
it is not an ``InterfaceError``.
"""

from __future__ import annotations

import asyncio
import random

import asyncpg

DB_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


async def reconnect_pause(attempt: int, max_delay: float, base_delay: float = 0.1) -> None:
    """Wait before reconnect attempt ``attempt`` (0, 1, ...): capped exponential backoff with
    full jitter, so replicas that lost the database together do not all come back at once."""
    await asyncio.sleep(random.uniform(0, min(max_delay, base_delay * (2**attempt))))
