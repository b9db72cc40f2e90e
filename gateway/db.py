"""What counts as "the database is unreachable or the connection broke", and how long to
wait before trying again.

One tuple, used everywhere the gateway survives a database outage, so no task dies on an
error type one module forgot. ``InternalClientError`` is what asyncpg raises on a pooled
connection whose backend was terminated mid-operation (MagicStack/asyncpg#784, #1069);
it is not an ``InterfaceError``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import asyncpg

log = logging.getLogger("gateway.db")

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


class PoolConnectWatch:
    """The pool's ``connect``: one warning line when the database cannot be reached, one info
    line when it can again.

    asyncpg's pool restores its minimum size in the background and, at every failed attempt,
    logs "Failed to restore the pool connection floor" at warning level with a full traceback:
    a dozen tracebacks per replica for an ordinary PostgreSQL restart. Those records are
    dropped (``_DropFloorRetries``); this wrapper sees every connect the pool makes, so it says
    what happened once per outage, naming the cause. Failures before the first connect ever
    succeeded are left to the caller (startup reports them itself).
    """

    def __init__(self) -> None:
        self.failures = 0  # consecutive failed connects
        self._connected_once = False
        pool_log = logging.getLogger("asyncpg.pool")
        if not any(isinstance(f, _DropFloorRetries) for f in pool_log.filters):
            pool_log.addFilter(_DropFloorRetries())

    async def __call__(self, *args: Any, **kwargs: Any) -> asyncpg.Connection:
        try:
            con = await asyncpg.connect(*args, **kwargs)
        except DB_ERRORS as exc:
            self.failures += 1
            if self.failures == 1 and self._connected_once:
                cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                log.warning("database pool cannot connect (%s); retrying in the background", cause)
            raise
        if self.failures and self._connected_once:
            log.info("database pool connected again after %d failed attempt(s)", self.failures)
        self.failures = 0
        self._connected_once = True
        return con


class _DropFloorRetries(logging.Filter):
    """Drops asyncpg's per-retry "Failed to restore the pool connection floor" warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to restore the pool connection floor")
