"""Reads of the event log (``gateway.events``, ``gateway.topics``) and its retention.

The log is written only by the capture trigger, ``gateway.emit`` and ``gateway.publish_message``
(sql/101_capture.sql, sql/100_event_log.sql, sql/105_rooms.sql). Here the gateway reads topic heads, ranges of positions, replay
windows, and prunes old events.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import asyncpg

log = logging.getLogger("gateway.log")

# pg_try_advisory_lock key for pruning, so only one replica prunes at a time.
RETENTION_LOCK = 0x6761_7465_7761_79  # "gateway"


class Head(NamedTuple):
    epoch: str
    pos: int


class LogEvent(NamedTuple):
    topic: str
    pos: int
    op: str  # i, u, d, m
    tbl: str | None
    key: str | None
    data: str | None  # JSON text, hand-published events only
    ts: float | None  # unix seconds the writing transaction started
    sender: str | None = None  # the user who published it (sql/105_rooms.sql); None for rows, emit


_EVENT_COLUMNS = "e.topic, e.pos, e.op::text, e.tbl, e.key, e.data::text, extract(epoch from e.created_at)::float8, e.sender"


class EventLog:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.head_reads = 0  # calls of heads(): what a doorbell flood would multiply

    async def relay_pid(self) -> int | None:
        """The backend pid of the relay that last took the lease: the one session whose doorbells
        are acted on (anyone who can log in may NOTIFY the channel). None before any relay."""
        async with self._pool.acquire() as conn:
            pid: int | None = await conn.fetchval("SELECT backend_pid FROM gateway.relay")
        return pid

    async def heads(self, topics: list[str]) -> dict[str, Head]:
        """Epoch and last position of each topic; (its first epoch, 0) for a topic never written
        to, which has no row (sql/100_event_log.sql): reading a head never writes or waits."""
        self.head_reads += 1
        async with self._pool.acquire() as conn:
            rows = await conn.fetch("SELECT topic, epoch, pos FROM gateway.topic_heads($1::text[])", topics)
        return {r["topic"]: Head(r["epoch"], r["pos"]) for r in rows}

    async def read(self, ranges: list[tuple[str, str, int, int]]) -> list[LogEvent]:
        """Events with ``lo <= pos <= hi`` for each (topic, epoch, lo, hi), ordered by topic and
        position; none of a topic whose epoch is no longer ``epoch``.

        Events carry no epoch: positions start over when a topic is reset, so position 2 of
        the log may be the new stream's. The head's epoch is read in the same statement (one
        snapshot), and reset_topic() changes it and deletes the old events in one transaction:
        the events read are those of ``epoch``, or there are none and the caller sees the gap."""
        if not ranges:
            return []
        topics, epochs, los, his = zip(*ranges, strict=True)
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_EVENT_COLUMNS} "
                "FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS r(topic, epoch, lo, hi) "
                "JOIN gateway.topics t ON t.topic = r.topic AND t.epoch = r.epoch "
                "JOIN gateway.events e ON e.topic = r.topic AND e.pos BETWEEN r.lo AND r.hi "
                "ORDER BY e.topic, e.pos",
                list(topics),
                list(epochs),
                list(los),
                list(his),
            )
        return [LogEvent(*r) for r in rows]

    async def window(self, topic: str, epoch: str, after: int, upto: int, max_age: float) -> list[LogEvent]:
        """Events ``after < pos <= upto`` of ``epoch`` no older than ``max_age`` seconds (none if
        the topic's epoch is another by now: see read())."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_EVENT_COLUMNS} FROM gateway.events e WHERE e.topic = $1 AND e.pos > $2 AND e.pos <= $3 "
                "AND e.created_at >= now() - make_interval(secs => $4) "
                "AND EXISTS (SELECT FROM gateway.topics t WHERE t.topic = $1 AND t.epoch = $5) ORDER BY e.pos",
                topic,
                after,
                upto,
                max_age,
                epoch,
            )
        return [LogEvent(*r) for r in rows]

    async def prune(self, max_events: int, max_age: float, batch: int = 5000) -> int | None:
        """Delete events older than ``max_age`` or beyond ``max_events`` per topic.

        Returns how many were deleted, or None if another replica holds the pruning lock.
        Deletes go in batches so no statement holds locks or bloats WAL for long.

        By age, the log is walked from its oldest transaction id up and the walk stops at the
        first batch holding an event still inside the window (sql/100_event_log.sql): an
        event is pruned once it and every event of a lower transaction id are past ``max_age``.
        """
        deleted = 0
        async with self._pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK):
                return None
            try:
                for sql, arg in (
                    (_PRUNE_OLD, max_age),
                    (_PRUNE_MANY, max_events),
                ):
                    while True:
                        status = await conn.execute(sql, arg, batch)
                        n = int(status.split()[-1])
                        deleted += n
                        if n < batch:
                            break
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK)
        return deleted


# The oldest $2 events by transaction id (the index events_xid), those of them older than $1
# seconds. Fewer than $2 deleted means a younger event was among them: the walk stops there.
_PRUNE_OLD = (
    "DELETE FROM gateway.events WHERE ctid = ANY(ARRAY("
    "SELECT o.ctid FROM (SELECT ctid, created_at FROM gateway.events ORDER BY xid LIMIT $2) AS o "
    "WHERE o.created_at < now() - make_interval(secs => $1)))"
)
# Each topic's events more than $1 positions behind its head.
_PRUNE_MANY = (
    "DELETE FROM gateway.events WHERE ctid = ANY(ARRAY("
    "SELECT e.ctid FROM gateway.topics t JOIN gateway.events e "
    "ON e.topic = t.topic AND e.pos <= t.pos - $1 LIMIT $2))"
)
