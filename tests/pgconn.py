"""The suite's one way to open a PostgreSQL connection (ruff bans ``asyncpg.connect`` elsewhere
under tests/).

``pg_connect(dsn)`` is ``asyncpg.connect`` remembered by the suite: the autouse fixture in
conftest.py terminates whatever a test left open, also when it failed halfway, so a failure does
not leave a connection that keeps its database from being dropped or whose ResourceWarning is
blamed on a later test. A test still closes what it opens when it is done with it.

``connection(dsn)`` is the same as an ``async with`` block that closes on the way out; it is
what code running on an event loop of its own (the session fixtures' worker thread) uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

_open: list[asyncpg.Connection] = []


async def pg_connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect(dsn, **kwargs)``, terminated after the test if it is still open."""
    conn = await asyncpg.connect(dsn, **kwargs)
    _open.append(conn)
    return conn


@contextlib.asynccontextmanager
async def connection(dsn: str, **kwargs: Any) -> AsyncIterator[asyncpg.Connection]:
    """A connection closed at the end of the block (not remembered: it never outlives it)."""
    conn = await asyncpg.connect(dsn, **kwargs)
    try:
        yield conn
    finally:
        await conn.close()


def terminate_leftovers() -> None:
    """Terminate the connections ``pg_connect`` opened that are still open."""
    while _open:
        conn = _open.pop()
        if not conn.is_closed():
            conn.terminate()
