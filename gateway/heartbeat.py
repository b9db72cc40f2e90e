"""The presence heartbeat's database connection: one per process, used by nothing else.

Why not the pool: the heartbeat is what tells the other replicas that this one is alive, and
the pool can be busy for longer than ``GATEWAY_HEARTBEAT_TTL`` while this replica is
perfectly healthy: a reconnect storm whose presence subscribes each read a snapshot, replays
of a long log, a slow table. A heartbeat queued behind them arrives too late, the other
replicas' sweeps declare this replica dead, and all its users flicker offline. On its own
connection it waits for nothing but its one UPDATE.

Every call has a deadline. A connection that misses it (a NAT that dropped the flow, a
PostgreSQL host that stopped answering) or fails is closed, and the next call connects
again, so one bad connection costs one heartbeat, not all the following ones.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from .pgerrors import DB_ERRORS

log = logging.getLogger("gateway.presence")

# The only query of the connection: pg_stat_activity.query tells it from the pool's.
BEAT = "SELECT gateway.presence_heartbeat($1)"


class HeartbeatConnection:
    def __init__(self, dsn: str, timeout: float) -> None:
        self._dsn = dsn
        self.timeout = timeout
        self._conn: asyncpg.Connection | None = None

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL backend of the connection, while there is one (tests, operators)."""
        return self._conn.get_server_pid() if self._conn is not None else None

    async def beat(self, replica_id: str) -> bool:
        """Renew the replica's row: False if it has none (it was declared dead, or is not
        registered yet). Raises one of DB_ERRORS, after dropping the connection, if the
        database does not answer within the deadline (connecting and the call, each)."""
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(
                    self._dsn,
                    timeout=self.timeout,
                    # synchronous_commit off: the heartbeat must not wait for a WAL flush (a
                    # slow disk would delay it like a busy pool), and one lost in a database
                    # crash only means the row is a heartbeat older; the next one renews it.
                    # (No application_name: the one in GATEWAY_DATABASE_URL, if any, names
                    # the replica's connections, this one included.)
                    server_settings={"synchronous_commit": "off"},
                )
            alive: bool = await self._conn.fetchval(BEAT, replica_id, timeout=self.timeout)
        except BaseException:
            # Whatever interrupted it (an error, the deadline, the gateway stopping), the
            # connection may be in any state: it is not reused.
            self._drop()
            raise
        return alive

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        try:
            await asyncio.wait_for(conn.close(), self.timeout)
        except DB_ERRORS as exc:
            log.debug("presence heartbeat connection closed abruptly: %s: %s", type(exc).__name__, exc)
            conn.terminate()
