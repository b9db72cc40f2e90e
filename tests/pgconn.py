"""The suite's one way to open PostgreSQL connections (ruff bans ``asyncpg.connect`` and
``asyncpg.create_pool`` elsewhere under tests/).

``pg_connect(dsn)`` is ``asyncpg.connect`` remembered by the suite: the autouse fixture in
conftest.py terminates whatever a test left open, also when it failed halfway, so a failure does
not leave a connection that keeps its database from being dropped or whose ResourceWarning is
blamed on a later test. A test still closes what it opens when it is done with it.

``pg_pool(dsn)`` is ``asyncpg.create_pool`` remembered the same way, for the gateway's
components that take a pool (Authorizer, Resolver, EventLog).

``connection(dsn)`` is the same as an ``async with`` block that closes on the way out; it is
what code running on an event loop of its own (the session fixtures' worker thread) uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

_open: list[asyncpg.Connection] = []
_pools: list[asyncpg.Pool] = []


async def pg_connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect(dsn, **kwargs)``, terminated after the test if it is still open."""
    conn = await asyncpg.connect(dsn, **kwargs)
    _open.append(conn)
    return conn


async def pg_pool(dsn: str, **kwargs: Any) -> asyncpg.Pool:
    """``asyncpg.create_pool(dsn, **kwargs)``, terminated after the test if it is still open."""
    pool = await asyncpg.create_pool(dsn, **kwargs)
    _pools.append(pool)
    return pool


@contextlib.asynccontextmanager
async def connection(dsn: str, **kwargs: Any) -> AsyncIterator[asyncpg.Connection]:
    """A connection closed at the end of the block (not remembered: it never outlives it)."""
    conn = await asyncpg.connect(dsn, **kwargs)
    try:
        yield conn
    finally:
        await conn.close()


def terminate_leftovers() -> None:
    """Terminate the connections and pools ``pg_connect`` and ``pg_pool`` opened that are still open."""
    while _open:
        conn = _open.pop()
        if not conn.is_closed():
            conn.terminate()
    while _pools:
        _pools.pop().terminate()  # a no-op for a pool already closed
