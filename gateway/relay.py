"""The relay: one replica at a time rings the doorbells of committed events (sql/102_relay.sql).

Why: a writer that NOTIFYs inside its own transaction makes PostgreSQL serialize its commit
with every other notifying commit (a cluster-wide lock held across the WAL flush), so under
load writers wait on each other. Instead, the capture triggers only append to the log; the
relay finds events committed since it last looked, by the transaction ids they record, and NOTIFYs the
usual doorbells (``{"v":1,"tb":..,"ev":[..]}``, ``{"v":1,"rg":[..]}``) on channel
``gateway`` from its own transaction, many events per notification. Every replica's listener
and pipeline work exactly as before. With ``GATEWAY_BROKER`` the same doorbells go to
NATS instead, cut per topic (an ``Outlet``: gateway/broker.py), and nothing is NOTIFYed.

Modes. Quiet: the relay waits for a ``gateway_poll`` notification, which a writing
transaction sends (once, however many rows it writes) when the relay is not polling, and then
polls once (plus once every ``idle_poll`` as a safety net). Busy (``wake_rate`` events per
second or more, judged over 0.1 s when quiet, over 1 s to go quiet again): a poll starts
every ``poll_interval`` (stretched up to 4 times above 1,000 events/s), and the relay keeps
``gateway.relay_awake_until`` a few seconds in the future, and writers send nothing at all.
With ``wait`` (GATEWAY_RELAY_WAIT), each busy poll instead waits inside PostgreSQL, looking
about every millisecond, until a transaction that wrote events has committed (or
``poll_interval`` has passed), so an event waits a millisecond or so for its poll, not half
the interval, for PostgreSQL's CPU spent looking; polls are then spaced out only as the rate
grows, so each carries more (up to 4 times ``poll_interval`` apart, from 4,000 events/s).

Why no committed event is missed (the approach of PgQ):

* Each event records its writer's transaction id. Each poll takes a snapshot S and reads the
  events of transactions visible in S but not in the previous poll's snapshot P. A commit
  becomes visible in exactly one such step, so each transaction's events are rung once, in
  full, whatever order transactions commit in. Only ids from P's xmin up can qualify
  (anything older was visible in P), so the read is one index range.
* Going quiet: the relay sets the flag to 0, then takes a transaction id X of its own, and
  keeps polling until a snapshot's xmin passes X. A writer that saw the flag still set had
  its id before X (each row trigger reads the flag after writing its event), so it has
  ended by then and its events were in that poll; every later writer sees the flag cleared
  and rings ``gateway_poll``.
* Takeover: the lease row stores P. A relay whose process dies loses its database session,
  and another replica takes over at its next try (every second, or ``lease``/3); one that
  stalls past its lease is replaced within ``lease`` seconds. The new relay continues from
  that snapshot, in busy mode (the dead relay's flag may still be set). Events rung again are
  harmless: the gateway delivers each position once.
* A poll that finds more than ``batch`` events (a relay back after a long outage) rings
  ``sync`` instead: every replica re-reads the heads of its topics from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Iterable
from typing import Protocol

import asyncpg
import msgspec

from .config import mask_dsn
from .pgerrors import Backoff, keep_connected

log = logging.getLogger("gateway.relay")

POLL_CHANNEL = "gateway_poll"
CHANNEL = "gateway"
# A doorbell's payload stays under PostgreSQL's 8000-byte NOTIFY limit with room to spare.
PAYLOAD_MAX = 7000
# A poll that finds events costs the database, the relay and every replica's listener and
# pipeline about the same whatever number it finds. Above STRETCH_RATE events/s the busy
# relay spaces its polls out in proportion (up to MAX_STRETCH times poll_interval), so each
# carries more events: under heavy writes the gateway's share of the database's CPU stops
# growing, for a few milliseconds of latency. A relay that waits in PostgreSQL for each
# commit starts its polls at least poll_interval * rate / STRETCH_RATE apart: at a few hundred
# events/s each poll still waits for the next commit (about one event per poll), and from
# STRETCH_RATE events/s on the spacing is the same as without waiting.
STRETCH_RATE = 1000.0
MAX_STRETCH = 4.0

# Free when it ran out, or when its holder's session is gone (sql/102_relay.sql).
_TAKE_LEASE = """
UPDATE gateway.relay AS r
SET holder = $1, lease_until = now() + make_interval(secs => $2), backend_pid = pg_backend_pid(),
    snapshot = coalesce(r.snapshot, pg_current_snapshot())
WHERE r.lease_until < now() OR r.holder = $1
   OR (r.backend_pid IS NOT NULL AND NOT EXISTS (SELECT FROM pg_stat_get_activity(r.backend_pid)))
RETURNING r.snapshot::text
"""
_RENEW_LEASE = """
UPDATE gateway.relay SET lease_until = now() + make_interval(secs => $2), snapshot = $3::text::pg_snapshot
WHERE holder = $1 AND lease_until > now()
RETURNING 1
"""
_RELEASE_LEASE = "UPDATE gateway.relay SET lease_until = '-infinity' WHERE holder = $1"
# The snapshot now and the events of transactions committed since $1 (sql/102_relay.sql).
_POLL = "SELECT snapshot, events FROM gateway.relay_poll($1, $2, $3)"
_OWN_XID = "SELECT pg_current_xact_id()::text::bigint"
_SET_FLAG = "SELECT setval('gateway.relay_awake_until', $1)"
_NOTIFY = "SELECT count(pg_notify('gateway', p)) FROM unnest($1::text[]) AS p"

# topic, epoch (None: the topic was reset since), pos, op, tbl, key, created_at
Row = tuple[str, str | None, int, str, str | None, str | None, float]
_decode_rows = msgspec.json.Decoder(list[Row]).decode
_encode = msgspec.json.encode


class Outlet(Protocol):
    """Where the relay rings instead of ``NOTIFY gateway``: a broker (gateway/broker.py)."""

    async def ring(self, rows: list[Row] | None) -> int:
        """Publish the doorbells of ``rows`` (``None``: a sync); return the messages sent."""
        ...


def doorbells(rows: Iterable[Row]) -> list[str]:
    """The doorbell payloads naming ``rows`` (the events of one poll), each under 7000 bytes.

    Row events are listed per table (the gateway resolves them by key) when the list fits one
    payload. Otherwise, and for hand-published events (their data is in the log), each topic's
    range of positions is named: the events of one topic that one poll finds have consecutive
    positions (positions are taken in commit order), so the range is exact and the gateway
    reads it from the log. A topic name too long even for that asks for a ``sync``."""
    by_table: dict[str, list[bytes]] = {}
    topics_of: dict[str, set[str]] = {}
    ts: dict[str, float] = {}
    ranges: dict[str, list[int]] = {}  # topic -> [first, last]
    epochs: dict[str, str] = {}
    unlisted: set[str] = set()  # topics with an event no list names
    for topic, epoch, pos, op, tbl, key, created in rows:
        if epoch is None:
            continue  # reset (gateway.reset_topic) since: nothing left to deliver
        if tbl is None:
            unlisted.add(topic)
        else:
            by_table.setdefault(tbl, []).append(_encode([topic, epoch, pos, op, key]))
            topics_of.setdefault(tbl, set()).add(topic)
            ts[tbl] = max(ts.get(tbl, 0.0), created)
        r = ranges.get(topic)
        if r is None:
            ranges[topic], epochs[topic] = [pos, pos], epoch
        else:
            r[0], r[1] = min(r[0], pos), max(r[1], pos)
    out: list[str] = []
    for tbl, entries in by_table.items():
        head = b'{"v":1,"tb":' + _encode(tbl) + b',"ts":' + _encode(ts[tbl]) + b',"ev":['
        if len(head) + sum(len(e) + 1 for e in entries) + 2 <= PAYLOAD_MAX:
            out.append((head + b",".join(entries) + b"]}").decode())
        else:
            unlisted |= topics_of[tbl]
    # A range may also cover listed positions: the gateway delivers each position once.
    rest = [_encode([t, epochs[t], *ranges[t]]) for t in ranges if t in unlisted]
    if rest:
        out.extend(_chunks(b'{"v":1,"rg":[', rest))
    return out


def _chunks(head: bytes, entries: list[bytes]) -> list[str]:
    out: list[str] = []
    part: list[bytes] = []
    size = len(head) + 2
    for entry in entries:
        if len(head) + len(entry) + 2 > PAYLOAD_MAX:
            if '{"v":1,"sync":true}' not in out:
                out.append('{"v":1,"sync":true}')  # a name too long for any doorbell: re-read heads
            continue
        if part and size + len(entry) + 1 > PAYLOAD_MAX:
            out.append((head + b",".join(part) + b"]}").decode())
            part, size = [], len(head) + 2
        part.append(entry)
        size += len(entry) + 1
    if part:
        out.append((head + b",".join(part) + b"]}").decode())
    return out


def _xmin(snapshot: str) -> int:
    """The xmin of a pg_snapshot in its text form ``xmin:xmax:xip,...``."""
    return int(snapshot.split(":", 1)[0])


class Relay:
    def __init__(
        self,
        dsn: str,
        *,
        poll_interval: float = 0.003,
        wait: bool = False,
        idle_poll: float = 1.0,
        wake_rate: int = 200,
        lease: float = 3.0,
        batch: int = 5000,
        max_delay: float = 10.0,
        outlet: Outlet | None = None,
    ) -> None:
        self._dsn = dsn
        # With a broker, doorbells go there and nothing is NOTIFYed on channel gateway.
        self._outlet = outlet
        # Who holds the lease, for an operator reading gateway.relay: host, pid, and a random
        # part so a restarted process never renews its predecessor's lease.
        self.replica_id = f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"
        self._poll_interval = poll_interval
        self._wait = wait
        self._idle_poll = idle_poll
        self._wake_rate = wake_rate
        self._lease = lease
        self._batch = batch
        self._max_delay = max_delay
        self._poke = asyncio.Event()
        self._done = asyncio.Event()
        self._stopping = False
        self._conn: asyncpg.Connection | None = None
        self._snapshot = ""  # of the last poll: every transaction visible in it has been rung
        # state, read by metrics and tests
        self.leader = False
        self.awake = False
        self.polls = 0
        self.rung = 0  # events rung
        self.notifications = 0  # NOTIFYs sent

    # --- lifecycle ------------------------------------------------------------------

    async def run(self) -> None:
        # synchronous_commit off: the relay's transactions only NOTIFY and renew its lease, and
        # a doorbell lost in a crash is caught up from the log anyway, so none of them needs to
        # wait for a WAL flush (hundreds a second, otherwise).
        # command_timeout: a connection that stops answering fails the query within the lease
        # (after which another replica may take over anyway) instead of wedging this relay for
        # good; it is then dropped and a new one made.
        await keep_connected(
            "relay",
            lambda: asyncpg.connect(
                self._dsn,
                timeout=10,
                command_timeout=self._lease,
                server_settings={"synchronous_commit": "off"},
            ),
            self._relay,
            lambda: self._stopping,
            target=mask_dsn(self._dsn),
            logger=log,
            backoff=Backoff(self._max_delay),
        )
        self._done.set()

    async def _relay(self, conn: asyncpg.Connection, backoff: Backoff) -> None:
        """Take the lease whenever it is free and lead while it is held, until ``conn`` fails."""
        self._conn = conn
        backoff.reset()
        try:
            while not self._stopping:
                snapshot = await conn.fetchval(_TAKE_LEASE, self.replica_id, self._lease)
                if snapshot is None:
                    # Try again soon: a holder whose session ended is replaced at once.
                    self._poke.clear()
                    await self._nap(min(1.0, self._lease / 3) * random.uniform(0.8, 1.2))
                    continue
                await self._lead(conn, snapshot)
                if self._stopping:
                    # Hand over at once instead of making the others wait for the lease.
                    await asyncio.wait_for(conn.execute(_RELEASE_LEASE, self.replica_id), 2.0)
        finally:
            self.leader = self.awake = False
            self._conn = None

    @property
    def backend_pid(self) -> int | None:
        """The relay connection's PostgreSQL backend, while it has one."""
        return self._conn.get_server_pid() if self._conn is not None else None

    async def _nap(self, seconds: float) -> None:
        """Sleep, unless poked (a writer's NOTIFY, or stop()) since the poke was last cleared."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._poke.wait(), seconds)

    async def stop(self) -> None:
        """Let the run loop finish (a leader hands its lease over on the way out)."""
        self._stopping = True
        self._poke.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._done.wait(), 3.0)

    # --- leading ----------------------------------------------------------------------

    def _on_poke(self, *_: object) -> None:
        self._poke.set()

    async def _lead(self, conn: asyncpg.Connection, snapshot: str) -> None:
        # Start busy: a relay that died may have left the flag set, so writers may be silent.
        # (Both set before any await, so nobody sees a leader that is not yet busy.)
        self.awake = self.leader = True
        log.info("relay: this replica rings the doorbells now")
        self._snapshot = snapshot
        await conn.add_listener(POLL_CHANNEL, self._on_poke)
        flag_renewed = 0.0
        lease_renewed = time.monotonic()
        window_start, window_events = time.monotonic(), 0
        # Busy: the time from the start of a poll to the next, from the rate of each window.
        # Until the first window ends (a new leader may find a backlog), the interval.
        spacing = self._poll_interval
        # With self._wait, a busy poll waits inside PostgreSQL for a commit, up to this
        # (sql/102_relay.sql), and needs no spacing below STRETCH_RATE events/s.
        wait = min(self._poll_interval, self._lease / 3) if self._wait else 0.0
        least_stretch = 0.0 if self._wait else 1.0
        quiet_after: int | None = None  # going quiet: poll until a snapshot's xmin passes this
        try:
            while not self._stopping:
                now = time.monotonic()
                if now - lease_renewed >= self._lease / 3:
                    renewed = await conn.fetchval(_RENEW_LEASE, self.replica_id, self._lease, self._snapshot)
                    if renewed is None:
                        log.warning("relay: lease lost to another replica")
                        return
                    lease_renewed = now
                if self.awake and quiet_after is None and now - flag_renewed >= 0.5:
                    await conn.execute(_SET_FLAG, int(time.time() * 1000 + max(2.0, self._lease) * 1000))
                    flag_renewed = now
                # Cleared before the poll, not after: a writer that rings while the poll runs
                # may have committed too late for it, and must get a poll of its own.
                self._poke.clear()
                polled_at = time.monotonic()
                window_events += await self._poll(conn, wait if self.awake else 0.0)
                now = time.monotonic()
                # Quiet, the rate is judged over a tenth of a second: at the start of a burst
                # every writing transaction NOTIFYs, which is what busy mode spares writers.
                # Busy, over a second, so a lull of a few hundred ms does not end it.
                window = 1.0 if self.awake and quiet_after is None else 0.1
                if now - window_start >= window:
                    rate = window_events / (now - window_start)
                    window_start, window_events = now, 0
                    spacing = self._poll_interval * min(MAX_STRETCH, max(least_stretch, rate / STRETCH_RATE))
                    if (not self.awake or quiet_after is not None) and rate >= self._wake_rate:
                        self.awake, quiet_after = True, None
                        flag_renewed = 0.0
                        log.debug("relay: busy (%.0f events/s): polling every %gs", rate, self._poll_interval)
                    elif self.awake and quiet_after is None and rate < self._wake_rate / 2:
                        await conn.execute(_SET_FLAG, 0)
                        quiet_after = await conn.fetchval(_OWN_XID)
                if quiet_after is not None and _xmin(self._snapshot) > quiet_after:
                    self.awake, quiet_after = False, None
                    log.debug("relay: quiet: polling when writers ring")
                if self.awake:
                    # Polls start every ``spacing``: the time the poll, its doorbells and the
                    # event loop's other work took is not added to every event's wait. Without
                    # waiting in PostgreSQL, a quarter of it at least between two polls: a relay
                    # whose polls take longer (an overloaded database or process) must not poll
                    # back to back. (Waiting, the next poll waits for the next commit itself.)
                    least = 0.0 if self._wait else spacing / 4
                    await asyncio.sleep(max(least, polled_at + spacing - time.monotonic()))
                else:
                    await self._nap(min(self._idle_poll, self._lease / 3))
        finally:
            self.leader = self.awake = False
            if not conn.is_closed():
                await conn.remove_listener(POLL_CHANNEL, self._on_poke)

    async def _poll(self, conn: asyncpg.Connection, wait: float = 0.0) -> int:
        """Ring the events of every transaction committed since the last poll, once one has
        (waiting up to ``wait`` seconds for it); return how many."""
        current, text = await conn.fetchrow(_POLL, self._snapshot, self._batch + 1, wait)
        self._snapshot = current
        rows = _decode_rows(text)
        if not rows:
            self.polls += 1
            return 0
        too_many = len(rows) > self._batch
        if too_many:
            log.warning(
                "relay: more than %d events committed since the last poll: asking for a sync", self._batch
            )
        if self._outlet is not None:
            sent = await self._outlet.ring(None if too_many else rows)
        else:
            payloads = ['{"v":1,"sync":true}'] if too_many else doorbells(rows)
            await conn.fetchval(_NOTIFY, payloads)
            sent = len(payloads)
        # Counted once rung, so a poll counted has committed its doorbells (tests rely on it).
        self.polls += 1
        self.notifications += sent
        self.rung += len(rows)
        return len(rows)
