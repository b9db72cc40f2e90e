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
* the grants docs/sql.md gives a writer role are enough to write a published table.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from gateway.config import ConfigError
from gateway.resolver import Resolver
from gateway.tables import parse_tables

from .pgconn import pg_connect, pg_pool

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


async def test_the_grants_docs_give_a_writer_role_are_enough(
    dsn: str, db: asyncpg.Connection, role: str
) -> None:
    text = (DOCS / "sql.md").read_text()
    found = re.search(r"## Writer roles\n.*?```sql\n(.*?)```", text, re.S)
    assert found, "docs/sql.md has no '## Writer roles' section with the grants in an sql block"
    grants = found.group(1)
    assert " app" in grants
    await items(db)
    await db.execute(re.sub(r"\bapp\b", role, grants))
    await db.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON items TO {role}")
    writer = await pg_connect(as_role(dsn, role))
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
            await writer.execute("DELETE FROM items WHERE id = 2")
            await writer.execute("SELECT gateway.emit('room:1', '{}')")
            await writer.execute("TRUNCATE items")
    finally:
        await writer.close()
    assert len(await events(db)) == 2 * 8


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
        "INSERT INTO lock_calls (events) "
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
