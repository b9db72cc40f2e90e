"""The event log, the capture triggers and the relay's doorbells (sql/, gateway/relay.py),
against a real PostgreSQL.

Each test gets a fresh migrated database (``dsn``). Doorbells are read with LISTEN on a
separate connection, rung by a relay running in the test. To know that *all* doorbells of
what was committed so far have arrived, without waiting for a timeout, the test waits for a
relay poll that began after the commit, then commits a marker notification: PostgreSQL
delivers notifications in commit order, so everything before the marker is in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from gateway.migrate import migrate
from gateway.relay import Relay

from .gwtest import relay_running, wait_for_lock_wait
from .pgconn import pg_connect
from .polling import eventually

NOTIFY_LIMIT = 8000  # PostgreSQL rejects payloads of 8000 bytes or more

pytestmark = pytest.mark.timeout(120)


class Doorbells:
    """LISTEN gateway on its own connection; ``collect`` returns what arrived up to now."""

    def __init__(self, listener: asyncpg.Connection, relay: Relay) -> None:
        self.listener = listener
        self.relay = relay
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.markers = 0

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.queue.put_nowait(payload)

    async def start(self) -> None:
        await self.listener.add_listener("gateway", self._on_notify)

    async def collect(self, writer: asyncpg.Connection) -> list[dict[str, Any]]:
        """Every doorbell committed before now, decoded, in commit order."""
        # Two polls after the poke: the second began after everything committed so far.
        polls = self.relay.polls
        await writer.execute("SELECT pg_notify('gateway_poll', '')")
        await eventually(lambda: self.relay.polls >= polls + 2, 30, "two relay polls", interval=0.002)
        self.markers += 1
        marker = json.dumps({"marker": self.markers})
        await writer.execute("SELECT pg_notify('gateway', $1)", marker)
        got: list[dict[str, Any]] = []
        while True:
            payload = await asyncio.wait_for(self.queue.get(), 30)
            if payload == marker:
                return got
            assert len(payload.encode()) < NOTIFY_LIMIT
            bell = json.loads(payload)
            if "ev" in bell:
                # Event lists carry the time their newest transaction began; compared apart.
                ts = bell.pop("ts")
                assert isinstance(ts, float) and abs(ts - time.time()) < 60
            got.append(bell)


@pytest.fixture
async def bells(dsn: str) -> AsyncIterator[Doorbells]:
    listener = await pg_connect(dsn)
    try:
        async with relay_running(dsn, idle_poll=0.05) as relay:
            # A relay's first lease starts from the snapshot it is taken in: events committed
            # before that are in the log, but never rung (docs/guarantees.md).
            await eventually(lambda: relay.leader, 10, "the relay's lease")
            d = Doorbells(listener, relay)
            await d.start()
            yield d
    finally:
        await listener.close()


def named(bellz: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Every event the doorbells name, sorted: (topic, epoch, pos, op, key) for listed
    events, (topic, epoch, pos) for each position of a range."""
    out: list[tuple[Any, ...]] = []
    for bell in bellz:
        out.extend(tuple(e) for e in bell.get("ev", ()))
        for topic, epoch, lo, hi in bell.get("rg", ()):
            out.extend((topic, epoch, p) for p in range(lo, hi + 1))
    return sorted(out, key=lambda e: (e[0], e[2]))


async def make_items(db: asyncpg.Connection, name: str = "items") -> None:
    """A published table: topic 'user:<owner>', key id."""
    await db.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, owner int, body text)")
    await db.execute(f"SELECT gateway.publish('{name}', $$'user:' || owner$$)")


async def events(db: asyncpg.Connection, topic: str | None = None) -> list[tuple[Any, ...]]:
    rows = await db.fetch(
        "SELECT topic, pos, op::text, tbl, key FROM gateway.events WHERE $1::text IS NULL OR topic = $1 "
        "ORDER BY topic, pos",
        topic,
    )
    return [tuple(r) for r in rows]


async def epoch_of(db: asyncpg.Connection, topic: str) -> str:
    epoch = await db.fetchval("SELECT epoch FROM gateway.topics WHERE topic = $1", topic)
    assert isinstance(epoch, str)
    return epoch


async def test_insert_update_delete_log_events_and_ring_doorbells(
    db: asyncpg.Connection, bells: Doorbells
) -> None:
    await make_items(db)
    await db.execute("INSERT INTO items VALUES (1, 7, 'a')")
    await db.execute("UPDATE items SET body = 'b' WHERE id = 1")
    await db.execute("DELETE FROM items WHERE id = 1")
    assert await events(db) == [
        ("user:7", 1, "i", "public.items", "1"),
        ("user:7", 2, "u", "public.items", "1"),
        ("user:7", 3, "d", "public.items", "1"),
    ]
    epoch = await epoch_of(db, "user:7")
    assert len(epoch) == 8
    assert await db.fetchval("SELECT pos FROM gateway.topics WHERE topic = 'user:7'") == 3
    got = await bells.collect(db)
    assert {b["tb"] for b in got} == {"public.items"}
    assert named(got) == [
        ("user:7", epoch, 1, "i", "1"),
        ("user:7", epoch, 2, "u", "1"),
        ("user:7", epoch, 3, "d", "1"),
    ]


async def test_statement_with_some_rows_rings_once_naming_each_event(
    db: asyncpg.Connection, bells: Doorbells
) -> None:
    await make_items(db)
    await db.execute("INSERT INTO items SELECT g, g % 3, 'x' FROM generate_series(1, 12) g")
    [bell] = await bells.collect(db)
    assert bell["tb"] == "public.items"
    listed = sorted((t, p, op, k) for t, _e, p, op, k in bell["ev"])
    assert listed == sorted((t, p, op, k) for t, p, op, _tbl, k in await events(db))
    assert len(listed) == 12
    # A row whose topic is NULL is not published; nor is a statement that changes no row.
    await db.execute("INSERT INTO items VALUES (100, NULL, 'hidden')")
    await db.execute("UPDATE items SET body = 'y' WHERE id = 100")
    await db.execute("UPDATE items SET body = 'y' WHERE id = -1")
    assert await bells.collect(db) == []
    assert len(await events(db)) == 12


async def test_rolled_back_transaction_leaves_no_event_no_hole_no_doorbell(
    db: asyncpg.Connection, bells: Doorbells
) -> None:
    await make_items(db)
    await db.execute("INSERT INTO items VALUES (1, 1, 'kept')")
    tr = db.transaction()
    await tr.start()
    await db.execute("INSERT INTO items VALUES (2, 1, 'gone')")
    await db.execute("UPDATE items SET body = 'gone' WHERE id = 1")
    await tr.rollback()
    # A savepoint rolled back inside a committed transaction leaves nothing either.
    async with db.transaction():
        await db.execute("INSERT INTO items VALUES (3, 1, 'kept')")
        with contextlib.suppress(asyncpg.UniqueViolationError):
            async with db.transaction():
                await db.execute("UPDATE items SET body = 'gone' WHERE id = 1")
                await db.execute("INSERT INTO items VALUES (3, 1, 'duplicate')")
    await db.execute("DELETE FROM items WHERE id = 3")
    assert [(p, op, k) for _t, p, op, _tbl, k in await events(db)] == [
        (1, "i", "1"),
        (2, "i", "3"),
        (3, "d", "3"),
    ]
    assert [(e[2], e[3]) for e in named(await bells.collect(db))] == [(1, "i"), (2, "i"), (3, "d")]


async def test_thousand_row_update_is_rung_as_ranges_and_logs_a_thousand_events(
    db: asyncpg.Connection, bells: Doorbells
) -> None:
    await make_items(db)
    await db.execute("INSERT INTO items SELECT g, g % 10, 'x' FROM generate_series(1, 1000) g")
    await db.execute("UPDATE items SET body = 'y'")
    got = await bells.collect(db)
    # Too many events to name one by one: each topic's range of positions instead.
    assert all(set(b) == {"v", "rg"} for b in got)
    epochs = {f"user:{o}": await epoch_of(db, f"user:{o}") for o in range(10)}
    assert named(got) == [(t, e, p) for t, e in sorted(epochs.items()) for p in range(1, 201)]
    updates = await db.fetchval(
        "SELECT count(*) FROM gateway.events WHERE op = 'u' AND pos BETWEEN 101 AND 200"
    )
    assert updates == 1000
    assert await db.fetchval("SELECT count(DISTINCT key) FROM gateway.events WHERE op = 'u'") == 1000


async def test_statement_over_a_thousand_topics_is_rung_in_several_doorbells(
    db: asyncpg.Connection, bells: Doorbells
) -> None:
    await make_items(db)
    await db.execute("INSERT INTO items SELECT g, g, 'x' FROM generate_series(1, 1000) g")
    got = await bells.collect(db)
    assert len(got) > 1  # each under the payload limit (checked by collect)
    assert [(t, p) for t, _e, p in named(got)] == sorted((f"user:{g}", 1) for g in range(1, 1001))
    assert await db.fetchval("SELECT count(*) FROM gateway.events") == 1000
    assert await db.fetchval("SELECT count(*) FROM gateway.topics WHERE pos = 1") == 1000


async def test_key_or_topic_too_long_for_the_event_list(db: asyncpg.Connection, bells: Doorbells) -> None:
    await db.execute("CREATE TABLE docs (name text PRIMARY KEY, room text)")
    await db.execute("SELECT gateway.publish('docs', 'room')")
    long_name = "n" * 9000
    await db.execute("INSERT INTO docs VALUES ($1, 'r')", long_name)
    epoch = await epoch_of(db, "r")
    assert await bells.collect(db) == [{"v": 1, "rg": [["r", epoch, 1, 1]]}]
    assert await db.fetchval("SELECT key FROM gateway.events WHERE topic = 'r'") == long_name
    await db.execute("INSERT INTO docs VALUES ('short', $1)", "t" * 9000)
    assert await bells.collect(db) == [{"v": 1, "sync": True}]


async def test_row_moved_between_topics(db: asyncpg.Connection, bells: Doorbells) -> None:
    await make_items(db)
    await db.execute("INSERT INTO items VALUES (1, 1, 'a')")
    await bells.collect(db)
    await db.execute("UPDATE items SET owner = 2 WHERE id = 1")
    e1, e2 = await epoch_of(db, "user:1"), await epoch_of(db, "user:2")
    assert await bells.collect(db) == [
        {"v": 1, "tb": "public.items", "ev": [["user:1", e1, 2, "d", "1"], ["user:2", e2, 1, "u", "1"]]}
    ]
    # Out of every topic: a delete on the old one only. Back in: an update on the new one.
    await db.execute("UPDATE items SET owner = NULL WHERE id = 1")
    await db.execute("UPDATE items SET owner = 3 WHERE id = 1")
    # A new key on the same topic: a delete of the old key, an update of the new.
    await db.execute("UPDATE items SET id = 10 WHERE id = 1")
    assert await events(db) == [
        ("user:1", 1, "i", "public.items", "1"),
        ("user:1", 2, "d", "public.items", "1"),
        ("user:2", 1, "u", "public.items", "1"),
        ("user:2", 2, "d", "public.items", "1"),
        ("user:3", 1, "u", "public.items", "1"),
        ("user:3", 2, "d", "public.items", "1"),
        ("user:3", 3, "u", "public.items", "10"),
    ]
    assert [(t, p, op, k) for t, _e, p, op, k in named(await bells.collect(db))] == [
        ("user:2", 2, "d", "1"),
        ("user:3", 1, "u", "1"),
        ("user:3", 2, "d", "1"),
        ("user:3", 3, "u", "10"),
    ]


async def test_row_moved_between_topics_by_a_column_not_the_key(db: asyncpg.Connection) -> None:
    # The update trigger computes the old topic only when a column the expression reads
    # changed (sql/101_capture.sql): here two columns, and an update of the other column moves nothing.
    await db.execute("CREATE TABLE docs (id int PRIMARY KEY, org text, team int, body text)")
    await db.execute("SELECT gateway.publish('docs', $$org || ':' || team$$)")
    await db.execute("INSERT INTO docs VALUES (1, 'acme', 1, 'a')")
    await db.execute("UPDATE docs SET body = 'b'")
    await db.execute("UPDATE docs SET team = 2")
    await db.execute("UPDATE docs SET org = 'ajax'")
    await db.execute("UPDATE docs SET team = NULL")
    assert await events(db) == [
        ("acme:1", 1, "i", "public.docs", "1"),
        ("acme:1", 2, "u", "public.docs", "1"),
        ("acme:1", 3, "d", "public.docs", "1"),
        ("acme:2", 1, "u", "public.docs", "1"),
        ("acme:2", 2, "d", "public.docs", "1"),
        ("ajax:2", 1, "u", "public.docs", "1"),
        ("ajax:2", 2, "d", "public.docs", "1"),
    ]


async def test_row_moved_by_a_change_its_type_calls_equal(db: asyncpg.Connection) -> None:
    # numeric 1.0 = 1.00, but the topics they make differ: the row moved, and the trigger
    # must not take the equal columns for an unchanged topic (sql/101_capture.sql).
    await db.execute("CREATE TABLE prices (id int PRIMARY KEY, price numeric)")
    await db.execute("SELECT gateway.publish('prices', $$'price:' || price$$)")
    await db.execute("INSERT INTO prices VALUES (1, 1.0)")
    await db.execute("UPDATE prices SET price = 1.00")
    assert await events(db) == [
        ("price:1.0", 1, "i", "public.prices", "1"),
        ("price:1.0", 2, "d", "public.prices", "1"),
        ("price:1.00", 1, "u", "public.prices", "1"),
    ]


async def test_topic_made_of_a_column_with_its_own_collation(db: asyncpg.Connection) -> None:
    # The topic's text took the column's collation, which cannot be compared with the heads'
    # ("C"): statements of several rows, and moves, failed before topics compared as bytes.
    await db.execute('CREATE TABLE people (id int PRIMARY KEY, name text COLLATE "POSIX")')
    await db.execute("SELECT gateway.publish('people', $$'person:' || name$$)")
    await db.execute("INSERT INTO people VALUES (1, 'ann'), (2, 'bob')")
    await db.execute("UPDATE people SET name = 'cy' WHERE id = 1")
    await db.execute("DELETE FROM people")
    assert await events(db) == [
        ("person:ann", 1, "i", "public.people", "1"),
        ("person:ann", 2, "d", "public.people", "1"),
        ("person:bob", 1, "i", "public.people", "2"),
        ("person:bob", 2, "d", "public.people", "2"),
        ("person:cy", 1, "u", "public.people", "1"),
        ("person:cy", 2, "d", "public.people", "1"),
    ]


async def test_emit_and_reset_a_topic_made_of_a_column_with_its_own_collation(db: asyncpg.Connection) -> None:
    await db.execute('CREATE TABLE rooms (name text COLLATE "POSIX")')
    await db.execute("INSERT INTO rooms VALUES ('a'), ('b')")
    assert await db.fetchval("SELECT gateway.emit('room:' || name, '{}') FROM rooms WHERE name = 'a'") == 1
    await db.execute(
        "SELECT gateway.emit_many(ARRAY(SELECT 'room:' || name FROM rooms ORDER BY name), ARRAY['{}', '{}']::jsonb[])"
    )
    assert [(t, p) for t, p, *_ in await events(db)] == [("room:a", 1), ("room:a", 2), ("room:b", 1)]
    await db.execute("SELECT gateway.reset_topic('room:' || name) FROM rooms WHERE name = 'a'")
    assert [(t, p) for t, p, *_ in await events(db)] == [("room:b", 1)]
    assert await db.fetchval("SELECT pos FROM gateway.topics WHERE topic = 'room:a'") == 0


async def test_row_moved_by_a_change_a_case_insensitive_collation_calls_equal(db: asyncpg.Connection) -> None:
    # Equal under the column's collation, different topics (compared as bytes).
    if not await db.fetchval("SELECT EXISTS (SELECT FROM pg_collation WHERE collprovider = 'i')"):
        pytest.skip("this PostgreSQL was built without ICU: no nondeterministic collations")
    await db.execute(
        "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)"
    )
    await db.execute("CREATE TABLE people (id int PRIMARY KEY, name text COLLATE ci)")
    await db.execute("SELECT gateway.publish('people', $$'person:' || name$$)")
    await db.execute("INSERT INTO people VALUES (1, 'Ann')")
    assert await db.fetchval("SELECT name = 'ann' FROM people")
    await db.execute("UPDATE people SET name = 'ann'")
    assert await events(db) == [
        ("person:Ann", 1, "i", "public.people", "1"),
        ("person:Ann", 2, "d", "public.people", "1"),
        ("person:ann", 1, "u", "public.people", "1"),
    ]


async def test_each_table_of_one_statement_rings_its_own_doorbell(
    db: asyncpg.Connection, bells: Doorbells
) -> None:
    await make_items(db, "a")
    await make_items(db, "b")
    await db.execute("WITH x AS (INSERT INTO a VALUES (1, 1, 'x')) INSERT INTO b VALUES (2, 2, 'y')")
    got = await bells.collect(db)
    assert sorted((b["tb"], [(t, p, k) for t, _e, p, _op, k in b["ev"]]) for b in got) == [
        ("public.a", [("user:1", 1, "1")]),
        ("public.b", [("user:2", 1, "2")]),
    ]


async def test_emit_large_data(db: asyncpg.Connection, bells: Doorbells) -> None:
    data = {"text": "x" * 20000, "n": 1}
    assert await db.fetchval("SELECT gateway.emit('room:1', $1::jsonb)", json.dumps(data)) == 1
    assert await db.fetchval("SELECT gateway.emit('room:1', '{}')") == 2
    row = await db.fetchrow(
        "SELECT op::text AS op, tbl, key, data FROM gateway.events WHERE topic = 'room:1' AND pos = 1"
    )
    assert (row["op"], row["tbl"], row["key"], json.loads(row["data"])) == ("m", None, None, data)
    epoch = await epoch_of(db, "room:1")
    got = await bells.collect(db)
    assert all(set(b) == {"v", "rg"} for b in got)  # the data is read from the log
    assert named(got) == [("room:1", epoch, 1), ("room:1", epoch, 2)]
    for bad in ("NULL", "''"):
        with pytest.raises(asyncpg.RaiseError, match="bad topic"):
            await db.execute(f"SELECT gateway.emit({bad}, '{{}}')")


@pytest.mark.parametrize(
    ("ddl", "args", "message"),
    [
        ("CREATE TABLE t (a int, b int)", "'a::text'", "public.t has no primary key"),
        (
            "CREATE TABLE t (a int, b int, PRIMARY KEY (a, b))",
            "'a::text'",
            "public.t has a composite primary key",
        ),
        ("CREATE TABLE t (a int PRIMARY KEY)", "'a::text', 'nope'", "public.t has no column nope"),
        (
            "CREATE TABLE t (a int PRIMARY KEY)",
            "$$'x:' || nope$$",
            "topic expression .* does not work on public.t",
        ),
        ("CREATE TABLE t (a int PRIMARY KEY)", "'a +'", "topic expression .* does not work on public.t"),
        ("CREATE TABLE t (a int PRIMARY KEY)", "''", "the topic expression for public.t is empty"),
        ("CREATE VIEW t AS SELECT 1 AS a", "'a::text'", "public.t is not a table"),
    ],
)
async def test_publish_errors_name_the_table(
    db: asyncpg.Connection, ddl: str, args: str, message: str
) -> None:
    await db.execute(ddl)
    with pytest.raises(asyncpg.RaiseError, match=message):
        await db.execute(f"SELECT gateway.publish('t', {args})")
    assert await db.fetchval("SELECT count(*) FROM pg_trigger WHERE tgrelid = 't'::regclass") == 0


async def test_fill_template_fills_each_placeholder_once_and_refuses_a_missing_one(
    db: asyncpg.Connection,
) -> None:
    # publish() builds the row triggers with it: a value is never searched for placeholders
    # itself (a table may be named "a{op}"), a JSON null fills in nothing, and a typo in a
    # template is an error, not a trigger with "{tabel}" in it.
    fill = "SELECT gateway.fill_template($1, $2::jsonb)"
    assert await db.fetchval(fill, "x {a} {b}{c} '{}' {a}", '{"a": "{b}", "b": "B", "c": null}') == (
        "x {b} B '{}' {b}"
    )
    assert await db.fetchval(fill, "", "{}") == ""
    with pytest.raises(asyncpg.RaiseError, match=r"no value for the placeholder \{tabel\}"):
        await db.fetchval(fill, "INSERT ... {tabel}", '{"table": "t"}')


async def test_publish_and_unpublish_print_no_notices(db: asyncpg.Connection) -> None:
    # A table's first publish() printed "trigger ... does not exist, skipping" for each capture
    # trigger it was about to create: noise every new user saw, meaning nothing.
    notices: list[str] = []
    db.add_log_listener(lambda _conn, message: notices.append(message.message))
    await db.execute("CREATE TABLE quiet (id int PRIMARY KEY, owner int)")
    for statement in (
        "SELECT gateway.publish('quiet', $$'user:' || owner$$)",  # the first time
        "SELECT gateway.publish('quiet', $$'user:' || owner$$)",  # again
        "SELECT gateway.unpublish('quiet')",
        "SELECT gateway.unpublish('quiet')",  # again: nothing left to drop
        "SELECT gateway.publish('quiet', $$'user:' || owner$$)",
        "DROP TRIGGER gateway_capture_truncate ON quiet",  # by hand
        "SELECT gateway.unpublish('quiet')",
    ):
        await db.execute(statement)
    # Notices arrive in order: once this one is in, any before it would be too.
    await db.execute("DO $$ BEGIN RAISE NOTICE 'the last one'; END $$")
    await eventually(lambda: "the last one" in notices, 10, "the notice")
    assert notices == ["the last one"]


async def test_publish_warns_of_a_function_that_looks_names_up_with_the_writer_s_search_path(
    db: asyncpg.Connection,
) -> None:
    """The trigger runs as the owner with the writer's search_path: a function with a string
    body and no SET search_path, called by the topic expression, would let a writer run its own
    code as the owner. publish() says so, naming it; the two safe ways to write it pass quietly."""
    messages: list[tuple[str, str]] = []
    db.add_log_listener(lambda _conn, m: messages.append((m.severity, m.message)))
    await db.execute(
        """
        CREATE TABLE warned (id int PRIMARY KEY, owner int);
        CREATE FUNCTION owner_topic_string(o int) RETURNS text LANGUAGE plpgsql AS
            $f$ BEGIN RETURN 'user:' || o; END $f$;
        CREATE FUNCTION owner_topic_fixed(o int) RETURNS text LANGUAGE plpgsql
            SET search_path = pg_catalog, pg_temp AS $f$ BEGIN RETURN 'user:' || o; END $f$;
        CREATE FUNCTION owner_topic_atomic(o int) RETURNS text LANGUAGE sql RETURN 'user:' || o;
        """
    )
    for fn in ("owner_topic_fixed", "owner_topic_atomic", "owner_topic_string"):
        await db.execute(f"SELECT gateway.publish('warned', $${fn}(owner)$$)")
    await db.execute("DO $$ BEGIN RAISE NOTICE 'the last one'; END $$")
    await eventually(lambda: ("NOTICE", "the last one") in messages, 10, "the notice")
    warnings = [text for severity, text in messages if severity == "WARNING"]
    assert len(warnings) == 1, messages
    assert "public.warned calls owner_topic_string(integer)" in warnings[0]
    assert "search_path of whoever writes the table" in warnings[0]
    # Published all the same: the warning says what to fix, it refuses nothing.
    await db.execute("INSERT INTO warned VALUES (1, 7)")
    assert await db.fetchval("SELECT topic FROM gateway.events WHERE tbl = 'public.warned'") == "user:7"


async def test_publish_again_replaces_and_unpublish_stops(db: asyncpg.Connection, bells: Doorbells) -> None:
    await make_items(db)
    await db.execute("SELECT gateway.publish('items', $$'user:' || owner$$)")
    await db.execute("INSERT INTO items VALUES (1, 1, 'a')")
    # Another expression and an explicit key column (unique, not the primary key).
    await db.execute("ALTER TABLE items ADD COLUMN code text UNIQUE")
    await db.execute("UPDATE items SET code = 'c1'")
    await db.execute("SELECT gateway.publish('public.items', $$'room:' || upper(body)$$, 'code')")
    await db.execute("UPDATE items SET owner = 2")
    assert [(t, p, op, k) for t, p, op, _tbl, k in await events(db)] == [
        ("room:A", 1, "u", "c1"),
        ("user:1", 1, "i", "1"),
        ("user:1", 2, "u", "1"),
    ]
    await bells.collect(db)
    await db.execute("SELECT gateway.unpublish('items')")
    await db.execute("UPDATE items SET owner = 3")
    assert len(await events(db)) == 3
    assert await bells.collect(db) == []
    functions = await db.fetchval(
        "SELECT count(*) FROM pg_proc WHERE pronamespace = 'gateway'::regnamespace AND proname ~ 'items'"
    )
    assert functions == 0


async def test_truncate_logs_a_delete_per_row_and_stops_with_unpublish(db: asyncpg.Connection) -> None:
    await make_items(db)
    await db.execute(
        "INSERT INTO items VALUES (1, 1, 'a'), (2, 2, 'b'), (3, NULL, 'unpublished'), (4, 1, 'c')"
    )
    await db.execute("TRUNCATE items")
    assert [(t, p, op, k) for t, p, op, _tbl, k in await events(db) if op == "d"] == [
        ("user:1", 3, "d", "1"),
        ("user:1", 4, "d", "4"),
        ("user:2", 2, "d", "2"),
    ]
    # Rolled back with the TRUNCATE, like any event.
    await db.execute("INSERT INTO items VALUES (5, 2, 'e')")
    before = await events(db)
    with contextlib.suppress(asyncpg.RaiseError):
        async with db.transaction():
            await db.execute("TRUNCATE items")
            await db.execute("DO $$ BEGIN RAISE EXCEPTION 'undo'; END $$")
    assert await events(db) == before
    await db.execute("SELECT gateway.unpublish('items')")
    await db.execute("TRUNCATE items")
    assert await events(db) == before
    assert await db.fetchval("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'items'::regclass") == 0


async def test_reset_topic_starts_a_new_epoch_at_one(db: asyncpg.Connection, bells: Doorbells) -> None:
    await make_items(db)
    await db.execute("INSERT INTO items VALUES (1, 1, 'a'), (2, 1, 'b')")
    old_epoch = await epoch_of(db, "user:1")
    await db.execute("SELECT gateway.reset_topic('user:1')")
    assert await events(db) == []
    await db.execute("UPDATE items SET body = 'c' WHERE id = 1")
    new_epoch = await epoch_of(db, "user:1")
    assert new_epoch != old_epoch
    assert await events(db) == [("user:1", 1, "u", "public.items", "1")]
    # The relay may have rung the first two events before the reset (old epoch, positions 1-2).
    rung = named(await bells.collect(db))
    assert ("user:1", new_epoch, 1, "u", "1") in rung
    assert {(e[1], e[2]) for e in rung} <= {(new_epoch, 1), (old_epoch, 1), (old_epoch, 2)}


async def test_reset_topic_waits_out_a_writer_and_leaves_none_of_its_events(
    dsn: str, db: asyncpg.Connection
) -> None:
    # A writer is appending position 3 when the reset starts. Deleting the events before
    # taking the head's lock missed that event: it stayed in the log, and the new stream's
    # own position 3 then failed on the primary key.
    await make_items(db)
    await db.execute("INSERT INTO items VALUES (1, 1, 'a'), (2, 1, 'b')")
    writer = await pg_connect(dsn)
    resetter = await pg_connect(dsn)
    try:
        tx = writer.transaction()
        await tx.start()
        await writer.execute("INSERT INTO items VALUES (3, 1, 'c')")  # position 3, not committed
        reset = asyncio.ensure_future(resetter.execute("SELECT gateway.reset_topic('user:1')"))
        await wait_for_lock_wait(db, "%reset_topic%", "the reset to wait for the writer")
        await tx.commit()
        await reset
    finally:
        await writer.close()
        await resetter.close()
    assert await events(db, "user:1") == []
    await db.execute("INSERT INTO items SELECT g, 1, 'new' FROM generate_series(4, 7) g")
    assert [e[1] for e in await events(db, "user:1")] == [1, 2, 3, 4]


async def test_first_epochs_are_the_installation_s_own(dsn: str, blank_dsn: str) -> None:
    # A database set up again from scratch must not hand out the epochs of the old one: a
    # client resuming "after position 5 of epoch E" would be replayed another stream's events.
    await migrate(blank_dsn)
    firsts = []
    for d in (dsn, blank_dsn):
        conn = await pg_connect(d)
        try:
            firsts.append(await conn.fetchval("SELECT epoch FROM gateway.heads(ARRAY['room:1'])"))
            assert await conn.fetchval("SELECT count(*) FROM gateway.topics WHERE topic = 'room:1'") == 0
        finally:
            await conn.close()
    assert firsts[0] != firsts[1]


async def test_a_topic_s_first_row_starts_with_the_epoch_heads_reported(db: asyncpg.Connection) -> None:
    await make_items(db)
    told = await db.fetch(
        "SELECT topic, epoch, pos FROM gateway.heads(ARRAY['user:1', 'user:2', 'user:1', NULL])"
    )
    assert sorted((r["topic"], r["pos"]) for r in told) == [("user:1", 0), ("user:2", 0)]
    # Each way a row is created: a row trigger, a multi-topic statement, emit().
    await db.execute("INSERT INTO items VALUES (1, 1, 'a')")
    await db.execute("INSERT INTO items VALUES (2, 2, 'b'), (3, 3, 'c')")
    await db.execute("SELECT gateway.emit('room:9', '{}')")
    for r in await db.fetch(
        "SELECT topic, epoch, pos FROM gateway.heads(ARRAY['user:1', 'user:2', 'user:3', 'room:9'])"
    ):
        assert r["epoch"] == await db.fetchval("SELECT gateway.first_epoch($1)", r["topic"])
        assert r["epoch"] == await epoch_of(db, r["topic"]) and r["pos"] == 1
    assert {r["topic"]: r["epoch"] for r in told}["user:1"] == await epoch_of(db, "user:1")


async def test_migrating_again_is_harmless(dsn: str, db: asyncpg.Connection, bells: Doorbells) -> None:
    await make_items(db)
    await db.execute("INSERT INTO items VALUES (1, 1, 'a')")
    await db.execute(
        "CREATE OR REPLACE FUNCTION gateway.authorize(user_id text, topic text, claims jsonb) "
        "RETURNS boolean LANGUAGE sql STABLE AS 'SELECT true'"
    )
    # Each SQL file is applied once (gateway.migrations records it): nothing runs again.
    for _ in range(2):
        assert await migrate(dsn) == []
    assert await db.fetchval("SELECT gateway.authorize('u', 't', '{}')") is True  # kept
    await db.execute("UPDATE items SET body = 'b'")
    assert [(p, op) for _t, p, op, _tbl, _k in await events(db)] == [(1, "i"), (2, "u")]
    assert [e[2:4] for e in named(await bells.collect(db))] == [(1, "i"), (2, "u")]


async def test_positions_follow_commit_order_not_start_order(dsn: str, db: asyncpg.Connection) -> None:
    await make_items(db)
    first, second = await pg_connect(dsn), await pg_connect(dsn)
    try:
        # `first` starts first (it has an xid), but `second` appends and commits first.
        t1, t2 = first.transaction(), second.transaction()
        await t1.start()
        await first.execute("CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1)")
        await t2.start()
        await second.execute("INSERT INTO items VALUES (2, 1, 'second')")
        # `first` appends now: it waits for the topic, held by `second` until it commits.
        waiting = asyncio.ensure_future(first.execute("INSERT INTO items VALUES (1, 1, 'first')"))
        await wait_until_blocked(db, first)
        await t2.commit()
        await waiting
        await t1.commit()
        assert [(p, k) for _t, p, _op, _tbl, k in await events(db)] == [(1, "2"), (2, "1")]

        # The holder rolls back: the waiter takes its position, no hole.
        t1, t2 = first.transaction(), second.transaction()
        await t1.start()
        await first.execute("INSERT INTO items VALUES (3, 1, 'rolled back')")
        await t2.start()
        waiting = asyncio.ensure_future(second.execute("INSERT INTO items VALUES (4, 1, 'kept')"))
        await wait_until_blocked(db, second)
        await t1.rollback()
        await waiting
        await t2.commit()
        assert [(p, k) for _t, p, _op, _tbl, k in await events(db)] == [(1, "2"), (2, "1"), (3, "4")]
    finally:
        await first.close()
        await second.close()


async def wait_until_blocked(db: asyncpg.Connection, conn: asyncpg.Connection) -> None:
    """Until `conn`'s backend waits for a lock (its statement has reached the topic)."""
    pid = conn.get_server_pid()
    await eventually(
        lambda: db.fetchval("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid),
        30,
        f"backend {pid} to wait for a lock",
    )


async def test_many_concurrent_writers_one_topic_gap_free_in_commit_order(
    dsn: str, db: asyncpg.Connection
) -> None:
    """Writers that hold their transaction open for different times, some rolling back,
    while a reader checks that the committed positions are always exactly 1..n: a later
    position is never visible before an earlier one (commit order), and none is missing."""
    await make_items(db)
    writers, per_writer = 8, 12
    conns = [await pg_connect(dsn) for _ in range(writers)]
    committed: list[int] = []
    done = asyncio.Event()

    async def write(w: int, conn: asyncpg.Connection) -> None:
        for i in range(per_writer):
            key = w * 1000 + i
            tr = conn.transaction()
            await tr.start()
            # Start the transactions in one order, append and commit in another.
            await conn.execute("SELECT pg_sleep($1)", ((w * 7 + i * 3) % 5) / 1000)
            await conn.execute("INSERT INTO items VALUES ($1, 1, 'x')", key)
            await conn.execute("SELECT pg_sleep($1)", ((w * 3 + i) % 4) / 1000)
            if (w + i) % 5 == 0:
                await tr.rollback()
            else:
                await tr.commit()
                committed.append(key)

    async def read() -> int:
        checks = 0
        while not done.is_set():
            positions = await db.fetchval(
                "SELECT coalesce(array_agg(pos ORDER BY pos), '{}') FROM gateway.events WHERE topic = 'user:1'"
            )
            assert positions == list(range(1, len(positions) + 1)), positions
            checks += 1
            await asyncio.sleep(0)
        return checks

    reader = asyncio.ensure_future(read())
    try:
        await asyncio.gather(*(write(w, c) for w, c in enumerate(conns)))
    finally:
        done.set()
        for c in conns:
            await c.close()
    assert await reader > 0
    rows = await db.fetch("SELECT pos, key::int FROM gateway.events WHERE topic = 'user:1' ORDER BY pos")
    assert [r["pos"] for r in rows] == list(range(1, len(committed) + 1))
    assert sorted(r["key"] for r in rows) == sorted(committed)
    assert await db.fetchval("SELECT pos FROM gateway.topics WHERE topic = 'user:1'") == len(committed)


# A published table whose topic expression sleeps 0.1 s per row: two writers' row triggers
# then interleave, as they must for a lock-order deadlock to show.
SLOW_PAIR = """
CREATE FUNCTION slow_topic(t text) RETURNS text LANGUAGE plpgsql AS
$$ BEGIN PERFORM pg_sleep(0.1); RETURN t; END $$;
CREATE TABLE pair (id bigserial PRIMARY KEY, topic text NOT NULL);
SELECT gateway.publish('pair', 'slow_topic(topic)');
"""


async def test_statements_writing_the_same_topics_in_opposite_row_orders_do_not_deadlock(dsn: str) -> None:
    """Each row trigger locks its topic's head; a statement touching several topics locks them
    all in sorted order first. A slow topic expression forces the interleaving that would
    deadlock if the heads were locked in row order: T1 rows (b, a), T2 rows (a, b)."""
    setup = await pg_connect(dsn)
    await setup.execute(SLOW_PAIR)
    writers = [await pg_connect(dsn) for _ in range(2)]
    try:
        for _ in range(3):
            await asyncio.gather(
                writers[0].execute("INSERT INTO pair (topic) SELECT unnest(ARRAY['t:b', 't:a'])"),
                writers[1].execute("INSERT INTO pair (topic) SELECT unnest(ARRAY['t:a', 't:b'])"),
            )
        heads = dict(await setup.fetch("SELECT topic, pos FROM gateway.topics WHERE topic IN ('t:a', 't:b')"))
        assert heads == {"t:a": 6, "t:b": 6}
    finally:
        for w in writers:
            await w.close()
        await setup.close()


async def test_each_statement_of_a_transaction_locks_its_topics_in_sorted_order(dsn: str) -> None:
    """The first row of a multi-row statement locks the statement's topics and counts its rows
    down; the next statement of the same transaction must start over, or it would lock in row
    order and the two writers below would deadlock (40P01) on t:a and t:b."""
    setup = await pg_connect(dsn)
    await setup.execute(SLOW_PAIR)
    writers = [await pg_connect(dsn) for _ in range(2)]

    async def write(conn: asyncpg.Connection, first: list[str], second: list[str]) -> None:
        async with conn.transaction():
            await conn.execute("INSERT INTO pair (topic) SELECT unnest($1::text[])", first)
            await conn.execute("UPDATE pair SET topic = topic WHERE topic = ANY($1::text[])", first)
            await conn.execute("INSERT INTO pair (topic) SELECT unnest($1::text[])", second)

    try:
        await asyncio.gather(
            write(writers[0], ["x:1", "x:2"], ["t:b", "t:a"]),
            write(writers[1], ["y:1", "y:2"], ["t:a", "t:b"]),
        )
        heads = dict(await setup.fetch("SELECT topic, pos FROM gateway.topics"))
        assert heads == {"x:1": 2, "x:2": 2, "y:1": 2, "y:2": 2, "t:a": 2, "t:b": 2}
    finally:
        for w in writers:
            await w.close()
        await setup.close()
