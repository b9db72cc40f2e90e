"""What counts as "the database is unreachable or the connection broke", how long to wait
before trying again, the loop that keeps a dedicated connection coming back
(``keep_connected``: the listener's and the relay's), and the pool's connect that reports an
outage once (``PoolConnectWatch``).

One tuple, used everywhere the gateway survives a database outage, so no task dies on an
error type one module forgot. ``InternalClientError`` is what asyncpg raises on a pooled
connection whose backend was terminated mid-operation (MagicStack/asyncpg#784, #1069);
it is not an ``InterfaceError``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
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


class Backoff:
    """The reconnect attempts of one connection since it last worked."""

    def __init__(self, max_delay: float, base_delay: float = 0.1) -> None:
        self.attempt = 0
        self._max_delay = max_delay
        self._base_delay = base_delay

    async def pause(self) -> None:
        await reconnect_pause(self.attempt, self._max_delay, self._base_delay)
        self.attempt += 1

    def reset(self) -> None:
        """The connection works again: the next failure starts from the shortest pause."""
        self.attempt = 0


async def keep_connected(
    what: str,
    connect: Callable[[], Awaitable[asyncpg.Connection]],
    use: Callable[[asyncpg.Connection, Backoff], Awaitable[None]],
    stopping: Callable[[], bool],
    *,
    target: str,
    logger: logging.Logger,
    backoff: Backoff,
) -> None:
    """Connect, ``use`` the connection until it fails or returns, close it, back off, and
    again, until ``stopping()``. For a connection that must always come back, whatever went
    wrong: a failure is logged (each distinct connect error once, not once per retry) and
    the loop goes on. ``use`` calls ``backoff.reset()`` once the connection does its job;
    ``what`` names it in log lines and ``target`` (the masked DSN) says where it goes."""
    last_error = ""
    while not stopping():
        try:
            conn = await connect()
        except Exception as exc:  # whatever it is, the connection must come back
            error = f"{type(exc).__name__}: {exc}"
            if error != last_error:
                logger.warning("%s cannot connect to %s: %s", what, target, error)
                last_error = error
            await backoff.pause()
            continue
        last_error = ""
        try:
            await use(conn, backoff)
        except DB_ERRORS as exc:
            if not stopping():
                logger.warning("%s connection failed: %s: %s", what, type(exc).__name__, exc)
        except Exception:
            # Not a connection problem we know: log it whole, then reconnect anyway, because
            # a connection that stays down loses nothing (the log is the truth) but delays
            # everything.
            if not stopping():
                logger.exception("%s failed unexpectedly; reconnecting", what)
        finally:
            conn.terminate()
        if not stopping():
            await backoff.pause()


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
