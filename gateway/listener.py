"""The LISTEN connection: one dedicated asyncpg connection per process.

Lifecycle: connect -> LISTEN -> (probe every ``probe_interval``; wait for a termination
or a failed probe) -> close -> back off -> connect again, forever, until ``stop()``.

Why a dedicated connection: a pooled connection is reset with ``UNLISTEN *`` when it is
released, silently ending the subscription. Why the probe: a peer that vanished (a
PostgreSQL host that lost power, a NAT that dropped the flow) may never be reported by
the TCP stack, so a LISTEN connection can look healthy while receiving nothing; a query
with a deadline proves it is alive. The termination listener covers the cases asyncpg
does notice (``pg_terminate_backend``, server shutdown) without waiting for the probe.

Notifications are lost while disconnected; that is fine because the event log is the
truth: ``on_connect`` runs after every (re)connect and the pipeline catches up every
topic it serves from the log. The notification callback only enqueues, with the sender's
backend pid: any session may NOTIFY the channel, so the pipeline acts only on the relay's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import asyncpg

from .config import mask_dsn
from .db import DB_ERRORS, reconnect_pause

log = logging.getLogger("gateway.listener")

CHANNEL = "gateway"


class Listener:
    def __init__(
        self,
        dsn: str,
        on_notify: Callable[[str, int], None],
        on_connect: Callable[[], None],
        *,
        probe_interval: float = 5.0,
        probe_timeout: float = 3.0,
        max_delay: float = 10.0,
        base_delay: float = 0.1,
    ) -> None:
        self._dsn = dsn
        self._on_notify = on_notify
        self._on_connect = on_connect
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self._max_delay = max_delay
        self._base_delay = base_delay
        self._conn: asyncpg.Connection | None = None
        self._stopping = False
        self.connected = False
        self.reconnects = 0  # successful connections after the first
        self.last_notification = 0.0  # monotonic time of the last notification
        self.backend_pid: int | None = None

    def _callback(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self.last_notification = time.monotonic()
        self._on_notify(payload, pid)

    async def run(self) -> None:
        attempt = 0
        first = True
        last_error = ""
        while not self._stopping:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._dsn, timeout=max(self._probe_timeout, 5.0))
            except Exception as exc:  # whatever it is, the listener must come back
                error = f"{type(exc).__name__}: {exc}"
                # Log each distinct failure once, not once per retry.
                if error != last_error:
                    log.warning("listener cannot connect to %s: %s", mask_dsn(self._dsn), error)
                    last_error = error
                await reconnect_pause(attempt, self._max_delay, self._base_delay)
                attempt += 1
                continue
            try:
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._callback)
                self._conn = conn
                self.backend_pid = conn.get_server_pid()
                self.connected = True
                if not first:
                    self.reconnects += 1
                    log.info(
                        "listener reconnected (backend pid %s) after %d attempt(s)", self.backend_pid, attempt
                    )
                else:
                    log.info("listener connected (backend pid %s)", self.backend_pid)
                first = False
                attempt = 0
                last_error = ""
                self._on_connect()
                cause = await self._watch(conn, lost)
                if not self._stopping:
                    log.warning("listener connection lost: %s", cause)
            except DB_ERRORS as exc:
                if not self._stopping:
                    log.warning("listener connection failed: %s: %s", type(exc).__name__, exc)
            except Exception:
                # Not a connection problem we know: log it whole, then reconnect anyway,
                # because a listener that stays down loses nothing but delays everything.
                if not self._stopping:
                    log.exception("listener failed unexpectedly; reconnecting")
            finally:
                self.connected = False
                self._conn = None
                conn.terminate()
            if not self._stopping:
                await reconnect_pause(attempt, self._max_delay, self._base_delay)
                attempt += 1

    async def _watch(self, conn: asyncpg.Connection, lost: asyncio.Event) -> str:
        """Return (with a cause) once the connection is known to be dead."""
        while not self._stopping:
            try:
                await asyncio.wait_for(lost.wait(), self._probe_interval)
                return "terminated by the server"
            except TimeoutError:
                pass
            if conn.is_closed():
                return "connection closed"
            try:
                await asyncio.wait_for(conn.fetchval("SELECT 1"), self._probe_timeout)
            except TimeoutError:
                return f"probe got no answer within {self._probe_timeout:g}s"
            except DB_ERRORS as exc:
                return f"probe failed: {type(exc).__name__}: {exc}"
        return "stopping"

    async def stop(self) -> None:
        self._stopping = True
        conn = self._conn
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except DB_ERRORS:
                conn.terminate()
