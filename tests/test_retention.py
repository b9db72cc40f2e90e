"""Retention of the event log: what is pruned, what stays, and what resuming clients are told.

``EventLog.prune(max_events, max_age)`` deletes events beyond the newest ``max_events`` of
each topic and events older than ``max_age`` seconds. The heads in ``gateway.topics`` stay,
so positions continue where they were. Old events are made by moving ``created_at`` back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from gateway.eventlog import RETENTION_LOCK, EventLog

from .gwtest import make_items_table, running_gateway
from .pgconn import pg_connect, pg_pool
from .polling import eventually


@contextlib.asynccontextmanager
async def event_log(dsn: str) -> AsyncIterator[EventLog]:
    pool = await pg_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        yield EventLog(pool)
    finally:
        await pool.close()


async def emit(db: asyncpg.Connection, topic: str, n: int) -> None:
    for i in range(n):
        await db.execute("SELECT gateway.emit($1, jsonb_build_object('i', $2::int))", topic, i)


async def positions(db: asyncpg.Connection, topic: str) -> list[int]:
    rows = await db.fetch("SELECT pos FROM gateway.events WHERE topic = $1 ORDER BY pos", topic)
    return [r["pos"] for r in rows]


async def heads(db: asyncpg.Connection) -> dict[str, tuple[str, int]]:
    return {r["topic"]: (r["epoch"], r["pos"]) for r in await db.fetch("SELECT * FROM gateway.topics")}


async def age(db: asyncpg.Connection, topic: str, upto: int) -> None:
    """Make the topic's events up to ``upto`` two hours old."""
    await db.execute(
        "UPDATE gateway.events SET created_at = now() - interval '2 hours' WHERE topic = $1 AND pos <= $2",
        topic,
        upto,
    )


async def test_prune_by_count_and_age_keeps_heads_and_positions_continue(dsn: str) -> None:
    db = await pg_connect(dsn)
    # Written oldest first: pruning by age goes in the order events were written.
    await emit(db, "room:c", 3)
    await emit(db, "room:b", 5)
    await emit(db, "room:a", 30)
    await age(db, "room:c", 3)  # every event of room:c is old
    await age(db, "room:b", 2)
    before = await heads(db)
    async with event_log(dsn) as log:
        # A small batch, so the batching loop runs several times.
        deleted = await log.prune(max_events=10, max_age=3600, batch=4)
        assert deleted == 20 + 2 + 3
        assert await positions(db, "room:a") == list(range(21, 31))
        assert await positions(db, "room:b") == [3, 4, 5]
        assert await positions(db, "room:c") == []
        assert await heads(db) == before, "pruning must leave every topic's head (epoch, pos)"

        # Positions continue after the head, with the same epoch, even for an emptied topic.
        for topic, (_, pos) in before.items():
            assert await db.fetchval("SELECT gateway.emit($1, '{}')", topic) == pos + 1
        assert {t: e for t, (e, _) in (await heads(db)).items()} == {t: e for t, (e, _) in before.items()}

        # Pruning again deletes only what fell out of the window since.
        assert await log.prune(max_events=10, max_age=3600) == 1  # room:a pos 21
        assert await positions(db, "room:a") == list(range(22, 32))
        assert await log.prune(max_events=10, max_age=3600) == 0
    await db.close()


async def test_pruning_by_age_stops_at_the_first_event_inside_the_window(dsn: str) -> None:
    """Pruning by age walks the log in transaction order (sql/100_event_log.sql): an old
    event written after a young one waits for that one, and then goes with it."""
    db = await pg_connect(dsn)
    await emit(db, "room:a", 3)
    await emit(db, "room:b", 3)
    await emit(db, "room:c", 2)
    await age(db, "room:a", 2)
    await age(db, "room:b", 3)
    async with event_log(dsn) as log:
        # room:a 3 is young, so room:b's old events behind it stay (batch 1: one at a time).
        assert await log.prune(max_events=100, max_age=3600, batch=1) == 2
        assert (await positions(db, "room:a"), await positions(db, "room:b")) == ([3], [1, 2, 3])
        await age(db, "room:a", 3)
        assert await log.prune(max_events=100, max_age=3600, batch=2) == 4
        assert [await positions(db, t) for t in ("room:a", "room:b", "room:c")] == [[], [], [1, 2]]
        # Every event has its transaction id, so the walk in that order meets every event.
        with pytest.raises(asyncpg.NotNullViolationError):
            await db.execute("UPDATE gateway.events SET xid = NULL WHERE topic = 'room:c' AND pos = 1")
        await age(db, "room:c", 1)
        assert await log.prune(max_events=100, max_age=3600) == 1
        assert await positions(db, "room:c") == [2]
    await db.close()


async def test_only_one_pruner_at_a_time(dsn: str) -> None:
    db = await pg_connect(dsn)
    await emit(db, "room:a", 20)
    async with event_log(dsn) as first, event_log(dsn) as second:
        # Another replica holds the pruning lock: this one does nothing and says so.
        holder = await pg_connect(dsn)
        await holder.execute("SELECT pg_advisory_lock($1)", RETENTION_LOCK)
        assert await first.prune(max_events=5, max_age=3600) is None
        assert await positions(db, "room:a") == list(range(1, 21))
        await holder.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK)

        # Two pruners at once: the first is held up inside its DELETE (a row it must delete
        # is locked), holding the pruning lock; the second gives up at once.
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM gateway.events WHERE topic = 'room:a' AND pos = 1 FOR UPDATE")
        running = asyncio.create_task(first.prune(max_events=5, max_age=3600))
        await eventually(
            lambda: db.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid <> pg_backend_pid())"
            ),
            20,
            "the first pruner to take the pruning lock",
            interval=0.02,
        )
        assert await second.prune(max_events=5, max_age=3600) is None
        await tx.rollback()
        assert await running == 15
        assert await positions(db, "room:a") == list(range(16, 21))

        # The lock was released with the pruning: the next run (either replica) may prune.
        assert await second.prune(max_events=5, max_age=3600) == 0
        assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK)
        await holder.close()
    await db.close()


async def test_retention_task_prunes_and_resume_is_recovered_only_inside_what_is_left(dsn: str) -> None:
    await make_items_table(dsn)
    async with running_gateway(
        dsn,
        tables="public.items",
        retention_interval=1,
        retention_max_events=10,
        retention_max_age="1h",
    ) as gw:
        db = await pg_connect(dsn)
        client = await gw.connect("1")
        epoch = (await client.subscribe("user:1"))["epoch"]
        await db.execute(
            "INSERT INTO items (owner_id, title) SELECT 1, 'row ' || g FROM generate_series(1, 30) g"
        )
        assert [e["pos"] for e in await client.events(30)] == list(range(1, 31))
        await client.close()

        async def wait_positions(expected: list[int]) -> None:
            got: list[int] = []

            async def pruned() -> bool:
                nonlocal got
                got = await positions(db, "user:1")
                return got == expected

            await eventually(
                pruned, 20, lambda: f"retention to leave {expected} (it left {got})", interval=0.1
            )

        # The server's retention task keeps the newest 10.
        await wait_positions(list(range(21, 31)))

        async def resume(pos: int) -> dict[str, Any]:
            c = await gw.connect("1")
            ack = await c.subscribe("user:1", since=(epoch, pos))
            await c.close()
            return ack

        ack = await resume(20)  # everything after 20 is still there
        assert ack["recovered"] is True and [e["pos"] for e in ack["events"]] == list(range(21, 31))
        for before_pruned in (19, 5, 0):
            ack = await resume(before_pruned)
            assert (ack["recovered"], ack["events"], ack["pos"]) == (False, [], 30), before_pruned

        # Age: events older than GATEWAY_RETENTION_MAX_AGE go too, even inside the count.
        await age(db, "user:1", 25)
        await wait_positions(list(range(26, 31)))
        ack = await resume(24)
        assert (ack["recovered"], ack["events"]) == (False, [])
        ack = await resume(25)
        assert ack["recovered"] is True and [e["pos"] for e in ack["events"]] == list(range(26, 31))

        # The head stayed: the next change is position 31 for a live subscriber.
        client = await gw.connect("1")
        ack = await client.subscribe("user:1", since=(epoch, 30))
        assert (ack["recovered"], ack["pos"]) == (True, 30)
        await db.execute("INSERT INTO items (owner_id, title) VALUES (1, 'after pruning')")
        (event,) = await client.events(1)
        assert (event["pos"], event["epoch"], event["row"]["title"]) == (31, epoch, "after pruning")
        await client.close()
        await db.close()
