"""Refuse to start behind a connection pooler that does not keep a session per connection.

The gateway needs each of its database connections to be one PostgreSQL session for its whole
life: the listener's ``LISTEN``, the relay's lease (doorbells are believed only from the backend
pid the relay recorded), the migration's session advisory lock and asyncpg's prepared
statements all belong to a session. PgBouncer in ``pool_mode = session`` keeps that; in
``transaction`` mode every transaction of a client connection may run on another server
session, and in ``statement`` mode every statement. Those modes do not fail at once: LISTEN
stops hearing, doorbells are ignored, prepared statements vanish now and then. So the gateway
looks before it starts (docs/deploy.md, "PgBouncer").

How: two client connections, A and B. A sets a session-level custom setting and reads its
backend pid; B, in a transaction held open, reads its pid and that setting; A reads its pid and
the setting again. A session per connection means A keeps one pid and its setting, and B has
another pid and never sees A's setting. A pooler that hands server sessions out per
transaction gives B the session A just released (PgBouncer reuses the most recently released
one first), or A another one the second time: either shows. Each step is its own explicit
transaction, so asyncpg's prepare and execute of one statement are never split across server
sessions. A pooler in statement mode refuses explicit transactions outright, which shows too.
"""

from __future__ import annotations

import asyncio
import secrets

import asyncpg

from .config import ConfigError, mask_dsn

# A custom setting only this check uses; set with is_local = false, so it lives as long as the
# server session does, not the transaction.
PROBE_SETTING = "gateway.session_probe"
ROUNDS = 3
# How long the first connection may wait for a server session while the second holds one in a
# transaction. PostgreSQL answers at once; a pooler with one server session per pool (and
# per-transaction pooling) makes it wait until the second commits, which it will not first.
WAIT = 5.0
CONNECT_TIMEOUT = 10.0
# The whole check; it only runs after the pool has connected, so the server does answer.
CHECK_TIMEOUT = 30.0

_SET = f"SELECT pg_backend_pid(), set_config('{PROBE_SETTING}', $1, false)"
_READ = f"SELECT pg_backend_pid(), current_setting('{PROBE_SETTING}', true)"

ADVICE = (
    "The gateway needs one PostgreSQL session per connection (LISTEN, the relay's lease, prepared "
    "statements): point GATEWAY_DATABASE_URL at PostgreSQL itself or at a PgBouncer pool with "
    "pool_mode = session (docs/deploy.md, 'PgBouncer')."
)


class SessionPoolingError(ConfigError):
    """The database URL leads to a pooler that shares server sessions between clients."""


async def _one_round(a: asyncpg.Connection, b: asyncpg.Connection) -> str | None:
    """What showed that server sessions are shared, or None."""
    token = secrets.token_hex(8)
    async with a.transaction():
        pid_a, _ = await a.fetchrow(_SET, token)
    async with b.transaction():
        pid_b, seen_b = await b.fetchrow(_READ)
        try:
            async with asyncio.timeout(WAIT), a.transaction():
                pid_a2, seen_a = await a.fetchrow(_READ)
        except TimeoutError:
            return f"a connection waited {WAIT:g} s for a server session while another one held a transaction"
    if pid_b == pid_a or seen_b == token:
        return f"a second connection ran in the first one's server session (backend pid {pid_a})"
    if pid_a2 != pid_a or seen_a != token:
        return (
            f"one connection's transactions ran in different server sessions (backend pids {pid_a} and "
            f"{pid_a2}), and a session setting it made was {'kept' if seen_a == token else 'lost'}"
        )
    return None


async def check_session_pooling(dsn: str) -> None:
    """Raise :class:`SessionPoolingError` if connections to ``dsn`` do not each keep a session.

    Connection failures are not this check's business: they propagate as they are, for the
    caller that would have met them anyway."""
    # No statement cache: nothing of this check stays prepared in a server session that a pooler
    # might hand to someone else.
    a = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT, statement_cache_size=0)
    try:
        b = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT, statement_cache_size=0)
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                await _rounds(dsn, a, b)
        except TimeoutError:
            raise SessionPoolingError(
                f"the database at {mask_dsn(dsn)} did not answer the session check within "
                f"{CHECK_TIMEOUT:g} s. {ADVICE}"
            ) from None
        finally:
            await b.close(timeout=5)
    finally:
        await a.close(timeout=5)


async def _rounds(dsn: str, a: asyncpg.Connection, b: asyncpg.Connection) -> None:
    for _ in range(ROUNDS):
        try:
            problem = await _one_round(a, b)
        except asyncpg.PostgresError as exc:
            # PgBouncer in statement mode: "transaction blocks not allowed in statement
            # pooling mode"; in transaction mode a prepared statement may vanish between
            # two messages (SQLSTATE 26000).
            problem = f"the pooler refused a transaction or lost a statement: {exc}"
        if problem:
            raise SessionPoolingError(
                f"the database at {mask_dsn(dsn)} is behind a pooler that shares server sessions "
                f"between clients (PgBouncer pool_mode = transaction or statement?): {problem}. {ADVICE}"
            )
