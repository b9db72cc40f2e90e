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
truth: the pipeline's ``catch_up`` is called after every (re)connect and it catches up every
topic it serves from the log. The notification callback only enqueues (``ring``), with the
sender's backend pid: any session may NOTIFY the channel, so the pipeline acts only on the
relay's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import asyncpg

from .config import mask_dsn
from .pgerrors import DB_ERRORS, Backoff, keep_connected

log = logging.getLogger("gateway.listener")

CHANNEL = "gateway"


def _ignore_doorbell(payload: str, sender: int) -> None:
    pass


def _ignore_catch_up() -> None:
    pass


class _Forward:
    """asyncpg's listener callback for an extra channel: hands on the payload and the pid."""

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[str, int], None]) -> None:
        self._callback = callback

    def __call__(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self._callback(payload, pid)


class Listener:
    """The PostgreSQL doorbell source (gateway/pipeline.py, ``DoorbellSource``)."""

    # Any session may NOTIFY the channel: the pipeline believes only the relay's pid.
    verify_senders = True

    def __init__(
        self,
        dsn: str,
        *,
        probe_interval: float = 5.0,
        probe_timeout: float = 3.0,
        max_delay: float = 10.0,
        base_delay: float = 0.1,
    ) -> None:
        self._dsn = dsn
        # Until a pipeline attaches, doorbells go nowhere (run() is started after attach()).
        self._ring: Callable[[str, int], None] = _ignore_doorbell
        self._catch_up: Callable[[], None] = _ignore_catch_up
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self._backoff = Backoff(max_delay, base_delay)
        self._conn: asyncpg.Connection | None = None
        self._stopping = False
        self._first = True
        self.connected = False
        self.reconnects = 0  # successful connections after the first
        self.last_notification = 0.0  # monotonic time of the last notification
        self.backend_pid: int | None = None
        # More channels heard on this connection (the replica bus, gateway/bus.py): channel ->
        # callback(payload, sender pid). What they mean is their listeners' business.
        self._channels: dict[str, Callable[[str, int], None]] = {}

    def add_channel(self, channel: str, callback: Callable[[str, int], None]) -> None:
        """Also LISTEN on ``channel`` (from the next connect on): ``callback(payload, pid)``."""
        self._channels[channel] = callback

    def attach(self, ring: Callable[[str, int], None], catch_up: Callable[[], None]) -> None:
        self._ring, self._catch_up = ring, catch_up

    async def want(self, topic: str) -> None:
        """LISTEN hears every topic's doorbells: nothing to subscribe to."""

    def drop(self, topic: str) -> None:
        pass

    def _callback(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self.last_notification = time.monotonic()
        self._ring(payload, pid)

    async def run(self) -> None:
        await keep_connected(
            "listener",
            lambda: asyncpg.connect(self._dsn, timeout=max(self._probe_timeout, 5.0)),
            self._listen,
            lambda: self._stopping,
            target=mask_dsn(self._dsn),
            logger=log,
            backoff=self._backoff,
        )

    async def _listen(self, conn: asyncpg.Connection, backoff: Backoff) -> None:
        """LISTEN on ``conn`` until it is known to be dead."""
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _c: lost.set())
            await conn.add_listener(CHANNEL, self._callback)
            for channel, callback in self._channels.items():
                await conn.add_listener(channel, _Forward(callback))
            self._conn = conn
            self.backend_pid = conn.get_server_pid()
            self.connected = True
            if not self._first:
                self.reconnects += 1
                log.info(
                    "listener reconnected (backend pid %s) after %d attempt(s)",
                    self.backend_pid,
                    backoff.attempt,
                )
            else:
                log.info("listener connected (backend pid %s)", self.backend_pid)
            self._first = False
            backoff.reset()
            self._catch_up()
            cause = await self._watch(conn, lost)
            if not self._stopping:
                log.warning("listener connection lost: %s", cause)
        finally:
            self.connected = False
            self._conn = None

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
