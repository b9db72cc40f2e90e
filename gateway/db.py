"""What counts as "the database is unreachable or the connection broke".

One tuple, used everywhere the gateway survives a database outage, so no task dies on an
error type one module forgot. ``InternalClientError`` is what asyncpg raises on a pooled
connection whose backend was terminated mid-operation (MagicStack/asyncpg#784, #1069);
it is not an ``InterfaceError``.
"""

from __future__ import annotations

import asyncpg

DB_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
