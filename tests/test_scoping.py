"""Per-user scoping under concurrency: every user gets all of its topics' events and nothing else.

Twenty users subscribe to their own topic and to the rooms their tokens grant (exact grants and a
``room:*`` pattern); two users have two connections each. Several writers commit interleaved rows
across every topic at once: single rows, statements spanning many topics, statements big enough
to be announced as position ranges, updates, and transactions of several statements. Afterwards
the event log is the truth: each connection must have received, per granted topic, exactly the
log's events in position order (none missing, none twice) and not one event of another topic.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg

from .gwtest import Client, expect_error, open_raw, running_gateway, token
from .pgconn import pg_connect

USERS = [f"u{i}" for i in range(20)]
ROOMS = [f"room:r{i}" for i in range(6)]
# Topics nobody may subscribe to: their rows must reach no one.
UNWATCHED = ["user:nobody", "room:r99"]
ALL_TOPICS = [f"user:{u}" for u in USERS] + ROOMS + UNWATCHED
WRITERS = 4
STATEMENTS_PER_WRITER = 40


def grants(i: int) -> list[str]:
    if i == 0:
        return ["room:*"]  # every room, by pattern (room:r99 included)
    return [ROOMS[i % 6], ROOMS[(i + 2) % 6]]


def topics_of(i: int) -> list[str]:
    rooms = [*ROOMS, "room:r99"] if i == 0 else grants(i)
    return [f"user:{USERS[i]}", *rooms]


async def make_msgs(db: asyncpg.Connection) -> None:
    await db.execute(
        "CREATE TABLE msgs (id bigserial PRIMARY KEY, topic text NOT NULL, writer int, body text);"
        "SELECT gateway.publish('msgs', $$topic$$)"
    )


async def writer(dsn: str, w: int) -> None:
    rnd = random.Random(w)  # reproducible interleavings per writer; the race between writers is real
    db = await pg_connect(dsn)
    try:
        for s in range(STATEMENTS_PER_WRITER):
            kind = rnd.choice(["one", "many", "many", "range", "update", "tx"])
            if kind == "one":
                await db.execute(
                    "INSERT INTO msgs (topic, writer, body) VALUES ($1, $2, $3)",
                    rnd.choice(ALL_TOPICS),
                    w,
                    f"{w}.{s}",
                )
            elif kind == "many":
                topics = [rnd.choice(ALL_TOPICS) for _ in range(rnd.randint(2, 12))]
                await db.execute(
                    "INSERT INTO msgs (topic, writer, body) SELECT t, $2, $3 FROM unnest($1::text[]) t",
                    topics,
                    w,
                    f"{w}.{s}",
                )
            elif kind == "range":
                # More than 40 rows: the doorbell names position ranges, read back from the log.
                topics = [rnd.choice(ALL_TOPICS) for _ in range(rnd.randint(41, 80))]
                await db.execute(
                    "INSERT INTO msgs (topic, writer, body) SELECT t, $2, $3 FROM unnest($1::text[]) t",
                    topics,
                    w,
                    f"{w}.{s}",
                )
            elif kind == "update":
                # Rows stay on their topic; an update is one more event on it.
                await db.execute(
                    "UPDATE msgs SET body = body || '+' WHERE id IN "
                    "(SELECT id FROM msgs WHERE writer = $1 ORDER BY random() LIMIT 5)",
                    w,
                )
            else:
                # Each statement holds its topics' position locks until commit, so a transaction
                # of several statements must take topics in one global (sorted) order, as the
                # statements themselves do, or two writers can deadlock (docs/security.md).
                async with db.transaction():
                    for topic in sorted(rnd.choice(ALL_TOPICS) for _ in range(rnd.randint(2, 5))):
                        await db.execute(
                            "INSERT INTO msgs (topic, writer, body) VALUES ($1, $2, $3)",
                            topic,
                            w,
                            f"{w}.{s}.tx",
                        )
    finally:
        await db.close()


async def test_every_user_gets_exactly_the_events_of_its_topics(dsn: str) -> None:
    db = await pg_connect(dsn)
    await make_msgs(db)
    async with running_gateway(dsn, tables="public.msgs") as gw:
        conns: list[tuple[int, Client]] = []
        for i, user in enumerate(USERS):
            for _ in range(2 if i >= 18 else 1):
                c = await open_raw(gw)
                welcome = await c.auth(token(user, topics=grants(i)))
                assert welcome["user"] == user
                for topic in topics_of(i):
                    ack = await c.subscribe(topic)
                    assert ack["pos"] == 0, ack
                # Scoping is enforced, not just unrequested: other users' topics are refused.
                neighbour = f"user:{USERS[(i + 1) % len(USERS)]}"
                for topic in (neighbour, "user:nobody") if i else (neighbour,):
                    await c.send({"type": "subscribe", "topic": topic, "id": 99})
                    await expect_error(c, "forbidden", id=99, topic=topic)
                conns.append((i, c))

        await asyncio.gather(*(writer(dsn, w) for w in range(WRITERS)))

        log: dict[str, list[tuple[int, str]]] = {t: [] for t in ALL_TOPICS}
        for r in await db.fetch("SELECT topic, pos, key FROM gateway.events ORDER BY topic, pos"):
            log[r["topic"]].append((r["pos"], r["key"]))
        for topic, entries in log.items():
            assert [pos for pos, _ in entries] == list(range(1, len(entries) + 1)), topic
        assert all(log[t] for t in ALL_TOPICS), "every topic should have had writes"

        async def received(i: int, c: Client) -> None:
            """All of this connection's events: per topic exactly the log, nothing of another topic."""
            mine = topics_of(i)
            events = await c.events(sum(len(log[t]) for t in mine), timeout=30.0)
            got: dict[str, list[tuple[int, str]]] = {}
            for e in events:
                assert e["topic"] in mine, f"{USERS[i]} got an event of {e['topic']}"
                row: Any = e.get("row")
                if row is not None:
                    assert row["topic"] == e["topic"], (
                        f"{USERS[i]} got a row of {row['topic']} on {e['topic']}"
                    )
                got.setdefault(e["topic"], []).append((e["pos"], e["key"]))
            for topic in mine:
                assert got.get(topic, []) == log[topic], f"{USERS[i]} on {topic}"

        await asyncio.gather(*(received(i, c) for i, c in conns))
        # Nothing more is on its way: the next event of every connection is a fresh marker on its
        # user's own topic (one marker per user; users 18 and 19 have two connections).
        for i, user in enumerate(USERS):
            pos = await db.fetchval("SELECT gateway.emit($1, '{}'::jsonb)", f"user:{user}")
            for c in (c for j, c in conns if j == i):
                (marker,) = await c.events(1)
                assert (marker["topic"], marker["pos"]) == (f"user:{user}", pos), user
        for _, c in conns:
            await c.close()
    await db.close()


async def test_an_event_never_carries_a_row_that_moved_to_another_topic(dsn: str) -> None:
    """Rows are read when the event is delivered, so a row can have changed since the commit
    the event stands for. If it changed topic (reassigned to another user), its current content
    belongs to the new topic: the old topic's subscribers must not be shown it.

    One transaction updates alice's row, then hands it to bob with a body meant for bob only.
    The log holds: update on user:alice, update on user:bob, delete on user:alice. Alice must
    never see "for bob only".
    """
    db = await pg_connect(dsn)
    await make_msgs(db)
    row_id = await db.fetchval("INSERT INTO msgs (topic, body) VALUES ('user:alice', 'draft') RETURNING id")
    async with running_gateway(dsn, tables="public.msgs") as gw:
        alice = await gw.connect("alice")
        await alice.subscribe("user:alice")
        bob = await gw.connect("bob")
        await bob.subscribe("user:bob")
        async with db.transaction():
            await db.execute("UPDATE msgs SET body = 'shared draft' WHERE id = $1", row_id)
            await db.execute(
                "UPDATE msgs SET topic = 'user:bob', body = 'for bob only' WHERE id = $1", row_id
            )
        (bob_event,) = await bob.events(1)
        assert bob_event["row"]["body"] == "for bob only"
        events = await alice.events(2)
        assert [e["key"] for e in events] == [str(row_id)] * 2
        for e in events:
            row = e.get("row")
            assert row is None or row["topic"] == "user:alice", f"alice was shown bob's row: {e}"
        assert events[-1]["op"] == "delete"
        await alice.close()
        await bob.close()
    await db.close()
