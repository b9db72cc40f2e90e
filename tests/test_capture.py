"""Edges of the capture path, against a real PostgreSQL: statements, tables and sessions that
write a published table in ways a plain INSERT/UPDATE/DELETE does not.

What is checked here:
* every kind of statement logs one event per changed row (upserts, MERGE, COPY, writable CTEs,
  an application trigger writing the table it fires on);
* how publish() leaves its triggers enabled is kept when it runs again (a migration's
  republish_all() included), so ENABLE ALWAYS (for sessions with session_replication_role =
  replica) survives;
* the gateway refuses to serve a table whose rows row-level security hides from it (they
  would reach subscribers as deletes), and reads a published parent's own rows, not those of
  its inheritance children;
* the grants docs/sql.md gives a writer role are enough to write a published table and to
  emit, and leave it no way to change the log, the heads or anything else of the gateway's
  (the capture triggers and emit are SECURITY DEFINER; emit has a search_path of its own, the
  row triggers name everything with its schema: a writer's functions, operators, types,
  collation and tables planted under every name they use never run);
* the grants docs/sql.md gives the gateway's own role are enough for `gateway serve`.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from gateway import resolver as resolver_module
from gateway.config import ConfigError
from gateway.resolver import Resolver
from gateway.tables import parse_tables

from .gwtest import running_gateway
from .pgconn import pg_connect, pg_pool
from .polling import eventually

pytestmark = pytest.mark.timeout(120)

DOCS = Path(__file__).resolve().parent.parent / "docs"


async def events(db: asyncpg.Connection, table: str = "public.items") -> list[tuple[str, int, str, str]]:
    rows = await db.fetch(
        'SELECT topic, pos, op::text AS op, key FROM gateway.events WHERE tbl = $1 ORDER BY topic COLLATE "C", pos',
        table,
    )
    return [(r["topic"], r["pos"], r["op"], r["key"]) for r in rows]


async def items(db: asyncpg.Connection) -> None:
    await db.execute(
        "CREATE TABLE items (id int PRIMARY KEY, owner_id int, title text);"
        "SELECT gateway.publish('public.items', $$'user:' || owner_id$$);"
    )


@pytest.fixture
async def role(dsn: str, db: asyncpg.Connection) -> AsyncIterator[str]:
    """A login role of the test's own (roles are cluster-wide), dropped after it."""
    name = f"gw_edge_{uuid.uuid4().hex[:10]}"
    await db.execute(f"CREATE ROLE {name} LOGIN")
    try:
        yield name
    finally:
        await db.execute(f"DROP OWNED BY {name}; DROP ROLE {name}")


@pytest.fixture
async def gw_role(dsn: str, db: asyncpg.Connection) -> AsyncIterator[str]:
    """A second login role of the test's own, for the gateway."""
    name = f"gw_serve_{uuid.uuid4().hex[:10]}"
    await db.execute(f"CREATE ROLE {name} LOGIN")
    try:
        yield name
    finally:
        await db.execute(f"DROP OWNED BY {name}; DROP ROLE {name}")


def as_role(dsn: str, role: str) -> str:
    u = urlsplit(dsn)
    return urlunsplit(u._replace(netloc=f"{role}@{u.netloc.split('@')[-1]}"))


# --- statements ------------------------------------------------------------------------------


async def test_upserts_merge_copy_and_ctes_log_one_event_per_changed_row(db: asyncpg.Connection) -> None:
    await items(db)
    await db.execute("INSERT INTO items SELECT g, g, 'x' FROM generate_series(1, 4) AS g")
    await db.execute("TRUNCATE gateway.events; DELETE FROM gateway.topics")
    # Both branches of an upsert, interleaved.
    await db.execute(
        "INSERT INTO items VALUES (10, 10, 'n'), (1, 1, 'u'), (11, 11, 'n'), (2, 20, 'u') "
        "ON CONFLICT (id) DO UPDATE SET owner_id = excluded.owner_id, title = excluded.title"
    )
    # MERGE: update, insert and delete in one statement, interleaved.
    await db.execute(
        "MERGE INTO items AS t USING (VALUES (3, 30, false), (12, 12, false), (4, 4, true), (13, 13, false)) "
        "AS s(id, owner_id, del) ON t.id = s.id "
        "WHEN MATCHED AND s.del THEN DELETE "
        "WHEN MATCHED THEN UPDATE SET owner_id = s.owner_id "
        "WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.owner_id, 'm')"
    )
    # COPY, and a writable CTE touching the table twice.
    await db.copy_records_to_table("items", records=[(20, 20, "c"), (21, 21, "c")])
    await db.execute(
        "WITH a AS (UPDATE items SET title = 'a' WHERE id = 10 RETURNING 1), "
        "b AS (DELETE FROM items WHERE id = 11 RETURNING 1) SELECT count(*) FROM a, b"
    )
    assert await events(db) == [
        ("user:1", 1, "u", "1"),
        ("user:10", 1, "i", "10"),
        ("user:10", 2, "u", "10"),
        ("user:11", 1, "i", "11"),
        ("user:11", 2, "d", "11"),
        ("user:12", 1, "i", "12"),
        ("user:13", 1, "i", "13"),
        ("user:2", 1, "d", "2"),
        ("user:20", 1, "u", "2"),
        ("user:20", 2, "i", "20"),
        ("user:21", 1, "i", "21"),
        ("user:3", 1, "d", "3"),
        ("user:30", 1, "u", "3"),
        ("user:4", 1, "d", "4"),
    ]


async def test_an_application_trigger_writing_the_same_table_logs_every_row(db: asyncpg.Connection) -> None:
    await items(db)
    await db.execute(
        "CREATE FUNCTION spawn() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.id < 100 THEN INSERT INTO items VALUES (NEW.id * 100, NEW.owner_id + 1, 'child'), "
        "(NEW.id * 100 + 1, NEW.owner_id + 2, 'child'); END IF; RETURN NULL; END $$;"
        "CREATE TRIGGER a_spawn AFTER INSERT ON items FOR EACH ROW EXECUTE FUNCTION spawn()"
    )
    await db.execute("INSERT INTO items VALUES (1, 1, 'p'), (2, 5, 'p')")
    logged = await events(db)
    assert sorted(int(key) for _, _, _, key in logged) == [1, 2, 100, 101, 200, 201]
    assert {(topic, key) for topic, _, _, key in logged} == {
        ("user:1", "1"),
        ("user:5", "2"),
        ("user:2", "100"),
        ("user:3", "101"),
        ("user:6", "200"),
        ("user:7", "201"),
    }


# --- sessions ----------------------------------------------------------------------------------


async def test_the_topic_function_is_inlined_into_the_security_definer_triggers(
    db: asyncpg.Connection,
) -> None:
    # The capture triggers are SECURITY DEFINER (a function that is would never be inlined);
    # the generated topic function they call must stay a plain SQL function that is inlined
    # into them, or every changed row would pay for one more function call. The row triggers
    # set no search_path (every name in them has its schema, sql/101_capture.sql); the
    # TRUNCATE trigger, not on the per-row path, fixes its own.
    await items(db)
    secdef = await db.fetch(
        "SELECT p.proname, p.prosecdef, p.proconfig FROM pg_proc p JOIN pg_trigger t ON t.tgfoid = p.oid "
        "WHERE t.tgrelid = 'items'::regclass AND NOT t.tgisinternal ORDER BY 1"
    )
    assert len(secdef) == 4  # insert, update, delete, truncate
    assert all(r["prosecdef"] for r in secdef), secdef
    config = {r["proname"].split("_")[1]: r["proconfig"] for r in secdef}
    assert config == {
        "delete": None,
        "insert": None,
        "update": None,
        "truncate": ["search_path=pg_catalog, pg_temp", "row_security=off"],
    }, secdef
    await db.execute("SET track_functions = 'all'")
    await db.execute("INSERT INTO items VALUES (1, 1, 'a'), (2, 2, 'b')")
    await db.execute("UPDATE items SET owner_id = 3 WHERE id = 1")  # the old row's topic too
    await db.execute("DELETE FROM items WHERE id = 2")
    await db.execute("SELECT pg_stat_force_next_flush()")
    await db.execute("SELECT 1")  # the flush happens when the session goes idle
    calls = {
        r["funcname"]: r["calls"]
        for r in await db.fetch(
            "SELECT funcname, calls FROM pg_stat_user_functions WHERE schemaname = 'gateway'"
        )
    }
    capture = {name for name in calls if name.startswith("capture_") and "_public_items_" in name}
    assert len(capture) == 3, calls  # the statistics are there: the three row triggers ran
    assert not [name for name in calls if name.startswith("topic_public_items_")], calls


async def test_publish_again_keeps_how_the_triggers_are_enabled(db: asyncpg.Connection) -> None:
    # Triggers do not fire under session_replication_role = replica (a logical replication
    # subscriber's apply, some bulk loaders) unless enabled ALWAYS: docs/sql.md says how. A
    # migration re-publishes every table (republish_all), which must not undo that.
    await items(db)
    await db.execute(
        "CREATE TABLE other (id int PRIMARY KEY, room int);"
        "SELECT gateway.publish('public.other', $$'room:' || room$$);"
    )
    await db.execute(
        "ALTER TABLE items ENABLE ALWAYS TRIGGER gateway_capture_insert;"
        "ALTER TABLE items ENABLE ALWAYS TRIGGER gateway_capture_update;"
        "ALTER TABLE items ENABLE ALWAYS TRIGGER gateway_capture_delete;"
        "ALTER TABLE items ENABLE ALWAYS TRIGGER gateway_capture_truncate;"
        "ALTER TABLE other DISABLE TRIGGER gateway_capture_update"
    )
    enabled = "SELECT tgrelid::regclass::text, tgname, tgenabled::text FROM pg_trigger WHERE tgname LIKE 'gateway%' ORDER BY 1, 2"
    before = [tuple(r) for r in await db.fetch(enabled)]
    await db.execute("SELECT gateway.republish_all()")
    await db.execute("SELECT gateway.publish('public.items', $$'user:' || owner_id$$)")
    assert [tuple(r) for r in await db.fetch(enabled)] == before
    await db.execute(
        "SET session_replication_role = replica; INSERT INTO items VALUES (1, 1, 'r');"
        "UPDATE items SET owner_id = 2; DELETE FROM items; INSERT INTO items VALUES (2, 2, 'r');"
        "TRUNCATE items; SELECT gateway.emit('room:9', '{}'); RESET session_replication_role"
    )
    assert await db.fetchval("SELECT pos FROM gateway.events WHERE topic = 'room:9'") == 1
    assert await events(db) == [
        ("user:1", 1, "i", "1"),
        ("user:1", 2, "d", "1"),
        ("user:2", 1, "u", "1"),
        ("user:2", 2, "d", "1"),
        ("user:2", 3, "i", "2"),
        ("user:2", 4, "d", "2"),
    ]
    # unpublish() and publish() start afresh: a table published anew is enabled as usual.
    await db.execute(
        "SELECT gateway.unpublish('public.items'); SELECT gateway.publish('public.items', $$'user:' || owner_id$$)"
    )
    assert {r["tgenabled"] for r in await db.fetch(enabled) if r["tgrelid"] == "items"} == {"O"}


def sql_block(heading: str) -> str:
    """The first ```sql block of the section of docs/sql.md under ``heading``."""
    text = (DOCS / "sql.md").read_text()
    found = re.search(rf"## {re.escape(heading)}\n.*?```sql\n(.*?)```", text, re.S)
    assert found, f"docs/sql.md has no '## {heading}' section with the grants in an sql block"
    return found.group(1)


async def writer_with_documented_grants(dsn: str, db: asyncpg.Connection, role: str) -> asyncpg.Connection:
    """A connection as ``role``, given what "Writer roles" in docs/sql.md gives ``app`` and
    every privilege on the published table ``items``."""
    grants = sql_block("Writer roles")
    assert " app" in grants
    await items(db)
    await db.execute(re.sub(r"\bapp\b", role, grants))
    await db.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON items TO {role}")
    return await pg_connect(as_role(dsn, role))


async def test_the_grants_docs_give_a_writer_role_are_enough(
    dsn: str, db: asyncpg.Connection, role: str
) -> None:
    writer = await writer_with_documented_grants(dsn, db, role)
    try:
        for awake in (False, True):  # the relay quiet (the trigger rings), then polling
            await db.execute(
                "SELECT setval('gateway.relay_awake_until', $1)",
                (2**62) if awake else 1,
            )
            await writer.execute("INSERT INTO items VALUES (1, 1, 'a'), (2, 2, 'b')")
            await writer.execute(
                "INSERT INTO items VALUES (1, 3, 'a') ON CONFLICT (id) DO UPDATE SET owner_id = 3"
            )
            await writer.execute("UPDATE items SET title = 'c'")
            await writer.execute("UPDATE items SET owner_id = 4 WHERE id = 1")  # moved: two events
            await writer.execute("DELETE FROM items WHERE id = 2")
            await writer.execute("SELECT gateway.emit('room:1', '{}')")
            await writer.execute("""SELECT gateway.emit_many('{room:1,room:2}', '{"{}","{}"}')""")
            await writer.execute("TRUNCATE items")
        # What an application reads for a consistent initial load.
        assert await writer.fetchval("SELECT pos FROM gateway.heads('{user:4}')") == 4
        assert await writer.fetchval("SELECT gateway.invalid_topic_reason('room 1')") is not None
    finally:
        await writer.close()
    assert len(await events(db)) == 2 * 10
    assert await db.fetchval("SELECT pos FROM gateway.topics WHERE topic = 'room:1'") == 4


async def test_a_writer_can_change_no_table_of_the_gateway_schema(
    dsn: str, db: asyncpg.Connection, role: str
) -> None:
    # With the grants docs/sql.md once gave writers (INSERT on events, UPDATE on topics), a
    # writer could insert an event at head + 1, after which every write to the topic failed
    # with a duplicate key, or set a head back (pos = -9), hiding later events from live
    # subscribers. Now only the gateway's SECURITY DEFINER functions write the log.
    writer = await writer_with_documented_grants(dsn, db, role)
    try:
        await writer.execute("INSERT INTO items VALUES (1, 1, 'a')")
        attacks = [
            "INSERT INTO gateway.events (topic, pos, op, tbl, key) VALUES ('user:1', 2, 'd', 'public.items', '9')",
            "UPDATE gateway.topics SET pos = -9 WHERE topic = 'user:1'",
        ]
        tables = [
            r["t"]
            for r in await db.fetch(
                "SELECT format('gateway.%I', relname) AS t FROM pg_class "
                "WHERE relnamespace = 'gateway'::regnamespace AND relkind = 'r' ORDER BY 1"
            )
        ]
        assert "gateway.events" in tables and "gateway.relay" in tables
        for t in tables:
            attacks += [
                f"INSERT INTO {t} DEFAULT VALUES",
                f"UPDATE {t} SET {await first_column(db, t)} = NULL",
                f"DELETE FROM {t}",
                f"TRUNCATE {t}",
                f"SELECT FROM {t}",
            ]
        attacks += [
            "SELECT setval('gateway.relay_awake_until', 1)",
            # The internal functions, and those that change what is published.
            "SELECT gateway.advance('user:1')",
            "SELECT * FROM gateway.topic_heads('{user:1}')",  # heads() is theirs
            "SELECT gateway.lock_topics('{user:1,user:2}')",
            "SELECT gateway.log_event('public.items', 'd', 'user:1', '9')",
            "SELECT gateway.reset_topic('user:1')",
            "SELECT gateway.relay_poll(pg_current_snapshot()::text, 10, 0)",
            "SELECT gateway.presence_connect('r', 'c', 'u')",
            "SELECT gateway.presence_sweep('1s', '1s')",
            "SELECT gateway.fill_template('{a}', '{\"a\": \"b\"}')",
            "SELECT gateway.publish('public.items', $$'user:1'$$)",
            "SELECT gateway.unpublish('public.items')",
            "SELECT gateway.unpublish_dropped()",
            "SELECT gateway.republish_all()",
        ]
        for sql in attacks:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await writer.execute(sql)
        # The topic is whole: the next writes continue it.
        await writer.execute("INSERT INTO items VALUES (2, 1, 'b')")
        await writer.execute("UPDATE items SET title = 'c' WHERE id = 1")
    finally:
        await writer.close()
    assert [e[1] for e in await events(db)] == [1, 2, 3]
    assert await db.fetchval("SELECT pos FROM gateway.topics WHERE topic = 'user:1'") == 3


async def first_column(db: asyncpg.Connection, table: str) -> str:
    name: str = await db.fetchval(
        "SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = $1::regclass AND attnum = 1", table
    )
    return name


async def test_a_writer_s_search_path_cannot_take_over_the_gateway_s_functions(
    dsn: str, db: asyncpg.Connection, role: str
) -> None:
    # The capture triggers and emit run as the schema's owner. Were their search_path the
    # caller's, a writer could put an operator of its own in front of pg_catalog's (here the
    # `bigint + integer` that advances a head) and have it run as the owner.
    writer = await writer_with_documented_grants(dsn, db, role)
    await writer.close()
    await db.execute(
        f"CREATE SCHEMA evil AUTHORIZATION {role};"
        f"SET ROLE {role};"
        "CREATE FUNCTION evil.plus(bigint, integer) RETURNS bigint LANGUAGE plpgsql AS "
        "$$BEGIN RAISE EXCEPTION 'the writer''s operator ran as %', current_user; END$$;"
        "CREATE OPERATOR evil.+ (LEFTARG = bigint, RIGHTARG = integer, FUNCTION = evil.plus);"
        "RESET ROLE"
    )
    writer = await pg_connect(as_role(dsn, role), server_settings={"search_path": "evil, pg_catalog, public"})
    try:
        with pytest.raises(asyncpg.RaiseError, match="operator ran as"):
            await writer.execute("SELECT 1::bigint + 1")  # in its own queries, its operator is found
        for sql in (
            "INSERT INTO items VALUES (1, 1, 'a')",
            "INSERT INTO items VALUES (2, 1, 'a'), (3, 2, 'b')",
            "UPDATE items SET owner_id = 3 WHERE id = 1",
            "DELETE FROM items WHERE id = 2",
            "SELECT gateway.emit('room:1', '{}')",
            "SELECT gateway.emit_many('{room:1}', '{\"{}\"}')",
            "SELECT * FROM gateway.heads('{room:1}')",
            "TRUNCATE items",
        ):
            await writer.execute(sql)
    finally:
        await writer.close()
    assert len(await events(db)) == 8


# Everything the capture triggers name, and what they reach (the first-epoch trigger on
# gateway.topics), planted by a writer where its search_path would find it first: functions,
# operators (each pair of operand types the triggers compare or compute with), types, a
# collation and tables. Every one of them raises if it runs. The row triggers have no search_path
# of their own (sql/101_capture.sql says why), so each name in them must carry its schema.
PLANTED_FUNCTIONS = [
    ("current_setting", "text, boolean", "text"),
    ("set_config", "text, text, boolean", "text"),
    ("pg_sequence_last_value", "regclass", "bigint"),
    ("date_part", "text, timestamptz", "double precision"),
    ("clock_timestamp", "", "timestamptz"),
    ("pg_notify", "text, text", "void"),
    ("array_remove", "text[], text", "text[]"),
    ("unnest", "text[]", "SETOF text"),
    ("cardinality", "text[]", "integer"),
    ("substr", "text, integer, integer", "text"),
    ("md5", "text", "text"),
    ("lock_topics", "text[]", "void"),
    ("log_event", 'text, "char", text, text', "bigint"),
    ("log_events", 'text, "char", text[], text', "integer"),
    ("first_epoch", "text", "text"),
    ("ring", "", "void"),
]
PLANTED_OPERATORS = [  # (operator, left, right, result)
    ("=", "text", "text", "boolean"),
    ("=", "integer", "integer", "boolean"),
    ("=", "boolean", "boolean", "boolean"),
    ("<>", "text", "text", "boolean"),
    ("<>", "boolean", "boolean", "boolean"),
    ("+", "bigint", "integer", "bigint"),
    ("-", "bigint", "integer", "bigint"),
    ("<", "bigint", "double precision", "boolean"),
    ("<", "double precision", "double precision", "boolean"),
    ("*", "double precision", "integer", "double precision"),
    ("*", "double precision", "double precision", "double precision"),
    (">", "integer", "integer", "boolean"),
    ("||", "text", "text", "text"),
    ("||", "text[]", "text[]", "text[]"),
]
PLANTED_TYPES = [("text", "pg_catalog.text"), ("int8", "pg_catalog.int8"), ("int4", "pg_catalog.int4")]
PLANTED_TABLES = [
    "topics",
    "events",
    "installation",
    "published",
    "gateway_new",
    "gateway_old",
    "items",
    "tagged",
]


def planted(schema: str, topic_functions: list[tuple[str, str, str]]) -> str:
    """SQL creating, in ``schema``, an object named like each of the above, each raising
    "the writer's <what> ran as <role>" when used."""
    sql = [
        f"CREATE FUNCTION {schema}.planted(what text) RETURNS boolean LANGUAGE plpgsql AS "
        "$$BEGIN RAISE EXCEPTION 'the writer''s % ran as %', what, current_user; END$$;"
    ]
    for name, args, result in [*PLANTED_FUNCTIONS, *topic_functions]:
        sql.append(
            f"CREATE FUNCTION {schema}.{name}({args}) RETURNS {result} LANGUAGE plpgsql AS "
            f"$$BEGIN PERFORM {schema}.planted('function {name}'); END$$;"
        )
    sql.append(
        f"CREATE FUNCTION {schema}.count_step(bigint) RETURNS bigint LANGUAGE plpgsql AS "
        f"$$BEGIN PERFORM {schema}.planted('aggregate count'); END$$;"
        f"CREATE AGGREGATE {schema}.count(*) (SFUNC = {schema}.count_step, STYPE = bigint);"
    )
    for i, (op, left, right, result) in enumerate(PLANTED_OPERATORS):
        sql.append(
            f"CREATE FUNCTION {schema}.op_{i}({left}, {right}) RETURNS {result} LANGUAGE plpgsql AS "
            f"$$BEGIN PERFORM {schema}.planted('operator {left} {op} {right}'); END$$;"
            f"CREATE OPERATOR {schema}.{op} (LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = {schema}.op_{i});"
        )
    for name, base in PLANTED_TYPES:
        sql.append(f"CREATE DOMAIN {schema}.{name} AS {base} CHECK ({schema}.planted('type {name}'));")
    for name in PLANTED_TABLES:
        # Columns as the log's, so that a write could land there; a CHECK refuses any row.
        sql.append(
            f'CREATE TABLE {schema}.{name} (topic pg_catalog.text, pos pg_catalog.int8, op "char", '
            "tbl pg_catalog.text, key pg_catalog.text, epoch pg_catalog.text, salt pg_catalog.text, "
            f"CHECK ({schema}.planted('table {name}')));"
        )
    sql.append(f"CREATE SEQUENCE {schema}.relay_awake_until;")
    return "\n".join(sql)


async def test_the_capture_triggers_use_nothing_of_the_writer_s_search_path(
    dsn: str, db: asyncpg.Connection, role: str
) -> None:
    # A writer's schema first in its search_path, and its temporary schema (searched before
    # everything for tables and types when a function sets no search_path), hold a shadow of
    # every name the SECURITY DEFINER triggers use; the triggers still log exactly the right
    # events and run none of them. Both kinds of trigger (a row on one topic, on several),
    # every path: single and multi-row statements, rows that move, keys that change, a topic
    # that changes only in case (a collation named "C" of the writer's is case-insensitive),
    # new topics (the first-epoch trigger), the relay quiet (the triggers ring) and awake.
    await db.execute(
        "CREATE TABLE items (id int PRIMARY KEY, owner text, title text);"
        "SELECT gateway.publish('public.items', $$'user:' || owner$$);"
        "CREATE TABLE tagged (id int PRIMARY KEY, a text, b text NOT NULL);"  # b: compared without NULL-safety
        "SELECT gateway.publish('public.tagged', $$ARRAY['a:' || a, 'b:' || b]$$);"
        + re.sub(r"\bapp\b", role, sql_block("Writer roles"))
        + f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON items, tagged TO {role};"
        f"CREATE SCHEMA evil AUTHORIZATION {role};"
        "SELECT setval('gateway.relay_awake_until', 1)"  # the relay quiet: the triggers ring
    )
    topic_functions = [
        (await db.fetchval("SELECT gateway.capture_name('items'::regclass, 'topic')"), "owner text", "text"),
        (
            await db.fetchval("SELECT gateway.capture_name('tagged'::regclass, 'topic')"),
            "a text, b text",
            "text[]",
        ),
    ]
    await db.execute(
        f"SET ROLE {role};"
        + planted("evil", topic_functions)
        + "CREATE COLLATION evil.\"C\" (provider = icu, locale = 'und-u-ks-level2', deterministic = false);"
        "RESET ROLE"
    )
    writer = await pg_connect(as_role(dsn, role), server_settings={"search_path": "evil, pg_catalog, public"})
    rings: list[str] = []

    def ring(*args: object) -> None:
        rings.append(str(args[3]))  # (connection, pid, channel, payload)

    await db.add_listener("gateway_poll", ring)
    try:
        # Planted with only pg_catalog in the path, so that each plant is made of pg_catalog's types.
        await writer.execute(
            "SET search_path = pg_catalog;"
            + planted("pg_temp", topic_functions)
            + "SET search_path = evil, pg_catalog, public"
        )
        # The plants work: the writer's own statements find them, its temporary ones first.
        for sql, what in (
            ("SELECT 'a'::text", "type text"),
            ("SELECT 1::int8", "type int8"),
            ("SELECT count(*) FROM pg_catalog.pg_class", "aggregate count"),
            ("SELECT current_setting('gateway.ring', true)", "function current_setting"),
            ("SELECT 1::bigint + 1", "operator bigint \\+ integer"),
            ("SELECT 'a'::pg_catalog.text = 'b'", "operator text = text"),
            ("INSERT INTO topics (topic) VALUES ('x')", "table topics"),
        ):
            with pytest.raises(asyncpg.RaiseError, match=f"the writer's {what} ran as {role}$"):
                await writer.execute(sql)
        assert await writer.fetchval(
            "SELECT pg_catalog.to_regclass('topics') OPERATOR(pg_catalog.=) 'pg_temp.topics'::pg_catalog.regclass"
        )
        # The writer's statements name pg_catalog's `=` themselves, to be able to run at all.
        eq = "OPERATOR(pg_catalog.=)"
        for sql in (
            "INSERT INTO public.items VALUES (1, 'Ann', 'x')",
            "INSERT INTO public.items VALUES (2, 'Bob', 'x'), (3, 'Ann', 'y')",
            f"UPDATE public.items SET title = 'z' WHERE id {eq} 1",
            f"UPDATE public.items SET owner = 'ann' WHERE id {eq} 1",  # moved, in case only
            f"UPDATE public.items SET id = 10 WHERE id {eq} 2",  # a new key
            "UPDATE public.items SET owner = 'Cy'",  # several rows, each moved
            f"DELETE FROM public.items WHERE id {eq} 3",
            "DELETE FROM public.items",
            "INSERT INTO public.tagged VALUES (1, 'x', 'y')",
            "INSERT INTO public.tagged VALUES (2, 'x', 'z'), (3, 'w', 'y')",
            f"UPDATE public.tagged SET a = 'X' WHERE id {eq} 1",  # left a:x, in case only
            f"UPDATE public.tagged SET id = 20 WHERE id {eq} 2",  # a new key
            f"DELETE FROM public.tagged WHERE id {eq} 3",
        ):
            await writer.execute(sql)
        await eventually(lambda: len(rings) > 0, 5, "the triggers to ring the quiet relay")
        await db.execute("SELECT setval('gateway.relay_awake_until', (2 ^ 62)::bigint)")  # awake: no ring
        rings.clear()
        for sql in (
            "INSERT INTO public.items VALUES (5, 'Dee', 'x')",
            "UPDATE public.tagged SET b = 'q'",  # several rows, each leaving a topic
            "TRUNCATE public.items",
        ):
            await writer.execute(sql)
        await db.execute("SELECT pg_notify('gateway_poll', 'marker')")
        await eventually(lambda: "marker" in rings, 5, "the marker notification")
        assert rings == ["marker"]  # the triggers saw the relay awake
    finally:
        await writer.close()
        await db.remove_listener("gateway_poll", ring)
    logged = await db.fetch(
        "SELECT topic, pos, op::text AS op, key FROM gateway.events WHERE tbl IN ('public.items', 'public.tagged') "
        'ORDER BY topic COLLATE "C", pos'
    )
    expected = [
        *[("user:Ann", "i", "1"), ("user:Bob", "i", "2"), ("user:Ann", "i", "3"), ("user:Ann", "u", "1")],
        *[("user:Ann", "d", "1"), ("user:ann", "u", "1"), ("user:Bob", "d", "2"), ("user:Bob", "u", "10")],
        *[("user:ann", "d", "1"), ("user:Bob", "d", "10"), ("user:Ann", "d", "3")],
        *[("user:Cy", "u", "1"), ("user:Cy", "u", "10"), ("user:Cy", "u", "3"), ("user:Cy", "d", "3")],
        *[("user:Cy", "d", "1"), ("user:Cy", "d", "10")],
        *[("a:x", "i", "1"), ("b:y", "i", "1"), ("a:x", "i", "2"), ("b:z", "i", "2"), ("a:w", "i", "3")],
        *[("b:y", "i", "3"), ("a:x", "d", "1"), ("a:X", "u", "1"), ("b:y", "u", "1")],
        *[("a:x", "d", "2"), ("b:z", "d", "2"), ("a:x", "u", "20"), ("b:z", "u", "20")],
        *[("a:w", "d", "3"), ("b:y", "d", "3")],
        *[("user:Dee", "i", "5"), ("b:y", "d", "1"), ("a:X", "u", "1"), ("b:q", "u", "1")],
        *[("b:z", "d", "20"), ("a:x", "u", "20"), ("b:q", "u", "20"), ("user:Dee", "d", "5")],
    ]
    assert sorted((r["topic"], r["op"], r["key"]) for r in logged) == sorted(expected)
    # Each topic's events at positions 1, 2, ... n, as its head says.
    by_topic: dict[str, list[int]] = {}
    for r in logged:
        by_topic.setdefault(r["topic"], []).append(r["pos"])
    heads = {r["topic"]: r["pos"] for r in await db.fetch("SELECT topic, pos FROM gateway.topics")}
    assert all(p == list(range(1, len(p) + 1)) and heads[t] == len(p) for t, p in by_topic.items()), by_topic
    # The triggers' own: no search_path of their own, so nothing to set and restore per row.
    configs = await db.fetch(
        "SELECT p.proname::text AS name, p.proconfig FROM pg_proc p JOIN pg_trigger t ON t.tgfoid = p.oid "
        "WHERE t.tgrelid IN ('items'::regclass, 'tagged'::regclass) AND t.tgname <> 'gateway_capture_truncate'"
    )
    assert len(configs) == 6 and all(r["proconfig"] is None for r in configs), configs


async def test_the_grants_docs_give_the_gateway_s_role_are_enough(
    dsn: str, db: asyncpg.Connection, role: str, gw_role: str
) -> None:
    # gateway serve as a role that owns nothing: the relay's lease and poll, rows read and
    # checked by their row_topic function, presence (connect, heartbeat, sweep, disconnect,
    # prune) and retention; a writer with the writer grants writes the table.
    grants = sql_block("The gateway's role")
    assert " gw" in grants
    writer = await writer_with_documented_grants(dsn, db, role)
    await db.execute(re.sub(r"\bgw\b", gw_role, grants))
    assert not await db.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = $1", gw_role)
    try:
        async with running_gateway(
            as_role(dsn, gw_role),
            tables="public.items",
            presence="true",
            heartbeat_interval="0.5",
            heartbeat_ttl="2",
            presence_grace="0",
            presence_retention="1s",
            retention_interval="1",
            retention_max_events="2",
        ) as gw:
            alice = await gw.connect("1")
            assert (await alice.subscribe("user:1"))["pos"] == 0
            await eventually(
                lambda: db.fetchval("SELECT holder IS NOT NULL FROM gateway.relay"), 10, "the relay's lease"
            )
            for title in ("a", "b", "c"):
                await writer.execute("INSERT INTO items VALUES ($1, 1, $2)", ord(title), title)
            got = await alice.events(3)
            assert [(e["pos"], e["row"]["title"]) for e in got] == [(1, "a"), (2, "b"), (3, "c")]
            await eventually(
                lambda: db.fetchval("SELECT status = 'online' FROM gateway.presence WHERE user_id = '1'"),
                10,
                "user 1 online",
            )
            # Room presence: a member written, then deleted with a leave when the tab closes.
            await alice.send({"type": "track", "topic": "user:1", "state": {"n": 1}, "id": 9})
            assert (await alice.expect("tracked"))["id"] == 9
            await eventually(
                lambda: db.fetchval("SELECT count(*) = 1 FROM gateway.room_presence"),
                10,
                "user 1 in its room",
            )
            await alice.close()
            await eventually(
                lambda: db.fetchval(
                    "SELECT count(*) = 2 FROM gateway.events WHERE topic = 'presence:user:1'"
                ),
                10,
                "user 1's join and leave",
            )
            await eventually(  # disconnected, offline after the grace, then pruned
                lambda: db.fetchval("SELECT NOT EXISTS (SELECT FROM gateway.presence WHERE user_id = '1')"),
                20,
                "user 1's presence row to be pruned",
            )
            await eventually(  # retention keeps the newest 2 events per topic
                lambda: db.fetchval("SELECT min(pos) = 2 FROM gateway.events WHERE topic = 'user:1'"),
                20,
                "retention to prune user:1's first event",
            )
    finally:
        await writer.close()


# --- what the gateway reads ----------------------------------------------------------------------


async def resolver(dsn: str, tables: str) -> tuple[Resolver, asyncpg.Pool]:
    pool = await pg_pool(dsn, min_size=1, max_size=1)
    r = Resolver(pool, parse_tables(tables))
    try:
        await r.check()
    except BaseException:
        await pool.close()
        raise
    return r, pool


async def test_a_table_whose_rows_row_level_security_hides_from_the_gateway_is_refused(
    dsn: str, db: asyncpg.Connection, role: str
) -> None:
    # The gateway reads rows as its own role. Rows a policy hides from it would be taken for
    # deleted ones: an insert would reach its topic's subscribers as a delete.
    await items(db)
    await db.execute(
        f"GRANT USAGE ON SCHEMA gateway TO {role}; GRANT SELECT ON gateway.published TO {role};"
        f"GRANT SELECT ON items TO {role};"
        "ALTER TABLE items ENABLE ROW LEVEL SECURITY;"
        "CREATE POLICY mine ON items USING (owner_id = 1)"
    )
    _, pool = await resolver(dsn, "public.items")  # a superuser is not subject to policies
    await pool.close()
    with pytest.raises(ConfigError, match=r"row-level security.*public\.items.*BYPASSRLS"):
        _, pool = await resolver(as_role(dsn, role), "public.items")
        await pool.close()
    await db.execute(f"ALTER ROLE {role} BYPASSRLS")
    _, pool = await resolver(as_role(dsn, role), "public.items")
    await pool.close()
    # The owner is not subject to its table's policies, unless FORCE ROW LEVEL SECURITY.
    await db.execute(f"ALTER ROLE {role} NOBYPASSRLS; ALTER TABLE items OWNER TO {role}")
    _, pool = await resolver(as_role(dsn, role), "public.items")
    await pool.close()
    await db.execute("ALTER TABLE items FORCE ROW LEVEL SECURITY")
    with pytest.raises(ConfigError, match="row-level security"):
        _, pool = await resolver(as_role(dsn, role), "public.items")
        await pool.close()
    await db.execute("SELECT gateway.unpublish('public.items'); DROP TABLE items")


async def test_the_optional_event_trigger_forgets_a_table_when_it_is_dropped(
    dsn: str, db: asyncpg.Connection, role: str
) -> None:
    # Installed by a superuser (docs/sql.md); the table's owner, who may not write
    # gateway.published, drops it.
    await db.execute(
        f"CREATE TABLE items (id int PRIMARY KEY, owner_id int); ALTER TABLE items OWNER TO {role};"
        "SELECT gateway.publish('public.items', $$'user:' || owner_id$$);"
        "CREATE EVENT TRIGGER gateway_unpublish_dropped ON sql_drop "
        "WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED') "
        "EXECUTE FUNCTION gateway.unpublish_dropped_at_drop()"
    )
    try:
        tbl = await db.fetchval("SELECT 'items'::regclass::oid")
        suffix = await db.fetchval("SELECT substr(row_topic, 11) FROM gateway.published")
        owner = await pg_connect(as_role(dsn, role))
        try:
            await owner.execute("DROP TABLE items CASCADE")
        finally:
            await owner.close()
        assert await db.fetchval("SELECT count(*) FROM gateway.published WHERE tbl::oid = $1", tbl) == 0
        left = "SELECT count(*) FROM pg_proc WHERE pronamespace = 'gateway'::regnamespace AND proname LIKE '%' || $1"
        assert await db.fetchval(left, suffix) == 0
    finally:
        await db.execute("DROP EVENT TRIGGER gateway_unpublish_dropped")


async def test_a_dropped_key_column_is_named_with_the_way_to_fix_it(
    db: asyncpg.Connection, dsn: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Once the key column is gone, every write to the table fails in its capture triggers
    # (docs/sql.md), and the gateway cannot read the rows of the events logged before.
    await db.execute(
        "CREATE TABLE items (id int PRIMARY KEY, uid int UNIQUE, owner_id int);"
        "SELECT gateway.publish('public.items', $$'user:' || owner_id$$, 'uid');"
        "INSERT INTO items VALUES (1, 1, 1)"
    )
    r, pool = await resolver(dsn, "public.items")
    await db.execute("ALTER TABLE items DROP COLUMN uid")
    for sql in ("INSERT INTO items VALUES (2, 1)", "UPDATE items SET owner_id = 2", "DELETE FROM items"):
        with pytest.raises(asyncpg.UndefinedColumnError, match='has no field "uid"'):
            await db.execute(sql)
    with pytest.raises(asyncpg.UndefinedColumnError, match="uid"):
        await db.execute("TRUNCATE items")

    # At run time: one log line saying what is wrong and how to fix it.
    caplog.set_level(logging.ERROR, logger="gateway.resolver")
    monkeypatch.setattr(resolver_module, "UNREADABLE_RETRY", 0.0)  # tried again at once
    for _ in range(3):
        assert r.allowed("public.items")
        assert await r.fetch({"public.items": {"1"}}) == {}
    lines = [rec.getMessage() for rec in caplog.records]
    assert len(lines) == 1, lines
    assert "key column uid is gone" in lines[0] and "SELECT gateway.unpublish('public.items')" in lines[0]
    await pool.close()

    # At start: the same, with the table's topic expression to publish it with.
    with pytest.raises(ConfigError) as err:
        await resolver(dsn, "public.items")
    assert "key column 'uid', which it no longer has" in str(err.value)
    assert "SELECT gateway.publish('public.items', $$'user:' || owner_id$$, '<column>')" in str(err.value)

    # A migration that publishes every table again stops, saying the same.
    with pytest.raises(asyncpg.RaiseError, match="key column uid, which it no longer has") as failed:
        await db.execute("SELECT gateway.republish_all()")
    assert "SELECT gateway.unpublish('items')" in (failed.value.hint or "")


async def test_the_gateway_reads_a_published_parent_without_its_inheritance_children(
    dsn: str, db: asyncpg.Connection
) -> None:
    # Row triggers are not inherited, and a child cannot be published (PostgreSQL refuses
    # transition tables on inheritance children): the children's rows have no events, and a
    # parent's event must not be answered with a child's row of the same key.
    await items(db)
    await db.execute(
        "CREATE TABLE items_archive () INHERITS (items);"
        "INSERT INTO items VALUES (1, 1, 'parent'); INSERT INTO items_archive VALUES (1, 1, 'child')"
    )
    r, pool = await resolver(dsn, "public.items")
    try:
        rows = await r.fetch({"public.items": {"1"}})
    finally:
        await pool.close()
    assert [row for row, _ in rows.values()] == ['{"id":1,"owner_id":1,"title":"parent"}']


async def test_a_statement_after_a_merge_still_locks_its_topics_before_its_first_event(
    db: asyncpg.Connection,
) -> None:
    # Each multi-row statement locks all its topics, in sorted order, at its first row,
    # before that row's event; it counts its rows down in a transaction-local setting. The
    # insert, update and delete triggers shared one counter, so a MERGE whose kinds of rows
    # interleave could leave it above zero, and the next statement of the transaction took
    # its first rows for the rest of the MERGE: they took their topics' locks in row order,
    # before the sorted locking, which can deadlock (each trigger now has its own, sql/101_capture.sql).
    await items(db)
    await db.execute("INSERT INTO items SELECT g, g, 'x' FROM generate_series(1, 4) AS g")
    # lock_topics, logging how many events the transaction had logged when it was called.
    await db.execute(
        "CREATE TABLE lock_calls (n serial, events bigint);"
        "ALTER FUNCTION gateway.lock_topics(text[]) RENAME TO lock_topics_logged;"
        "CREATE FUNCTION gateway.lock_topics(p_topics text[]) RETURNS void LANGUAGE plpgsql AS $$ BEGIN "
        "INSERT INTO public.lock_calls (events) "  # the triggers run with search_path pg_catalog, pg_temp
        "SELECT count(*) FROM gateway.events WHERE xid = pg_current_xact_id(); "
        "PERFORM gateway.lock_topics_logged(p_topics); END $$"
    )
    async with db.transaction():
        # Rows in this order: update, insert, insert, update, update.
        await db.execute(
            "MERGE INTO items AS t USING (VALUES (1, 10), (12, 12), (13, 13), (2, 20), (3, 30)) "
            "AS s(id, owner_id) ON t.id = s.id "
            "WHEN MATCHED THEN UPDATE SET owner_id = s.owner_id "
            "WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.owner_id, 'm')"
        )
        before = await db.fetchval("SELECT count(*) FROM gateway.events WHERE xid = pg_current_xact_id()")
        await db.execute("DELETE FROM lock_calls")
        await db.execute("UPDATE items SET title = 'z' WHERE id IN (12, 13)")
        calls = await db.fetch("SELECT events FROM lock_calls ORDER BY n")
    assert [c["events"] for c in calls] == [before]


async def test_the_topic_expression_keeps_the_names_it_had_when_published(
    dsn: str, db: asyncpg.Connection
) -> None:
    # The topic function's names were once looked up in each writer's search_path (now bound
    # when publish() runs, sql/101_capture.sql): a writer without the schema failed, one with a
    # function of the same name earlier in its path computed another topic.
    await db.execute(
        "CREATE SCHEMA app; CREATE SCHEMA evil;"
        "CREATE FUNCTION app.org_of(team int) RETURNS text LANGUAGE sql AS $$SELECT 'acme' || team$$;"
        "CREATE FUNCTION evil.org_of(team int) RETURNS text LANGUAGE sql AS $$SELECT 'evil'$$;"
        "CREATE TABLE docs (id int PRIMARY KEY, team int);"
        "SET search_path = app, public;"
        "SELECT gateway.publish('public.docs', $$'org:' || org_of(team)$$);"
        "RESET search_path"
    )
    plain = await pg_connect(dsn)  # search_path "$user", public: no app
    shadowed = await pg_connect(dsn, server_settings={"search_path": "evil, public"})
    try:
        await plain.execute("INSERT INTO docs VALUES (1, 1)")
        await shadowed.execute("INSERT INTO docs VALUES (2, 2)")
    finally:
        await plain.close()
        await shadowed.close()
    assert await events(db, "public.docs") == [("org:acme1", 1, "i", "1"), ("org:acme2", 1, "i", "2")]
    # What the topic calls cannot be dropped from under it.
    with pytest.raises(asyncpg.DependentObjectsStillExistError):
        await db.execute("DROP FUNCTION app.org_of(int)")
