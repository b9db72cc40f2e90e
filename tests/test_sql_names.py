"""Names in the SQL API (sql/101_capture.sql, sql/100_event_log.sql), against a real
PostgreSQL: the functions gateway.publish() generates, the primary key it picks, and the
topics gateway.emit() and gateway.emit_many() accept.
"""

from __future__ import annotations

import re
from typing import Any

import asyncpg
import pytest

from gateway.protocol import validate_topic

pytestmark = pytest.mark.timeout(120)

# The kinds of function publish() generates per table.
KINDS = ("topic", "row_topic", "capture_insert", "capture_update", "capture_delete")
GENERATED_SQL = "^(topic|row_topic|capture_insert|capture_update|capture_delete)_"
NAME_LIMIT = 63  # PostgreSQL's max_identifier_length, in bytes


async def generated(db: asyncpg.Connection) -> dict[str, str]:
    """Every function in schema gateway named like a generated one: name -> its definition."""
    rows = await db.fetch(
        "SELECT proname::text AS name, pg_get_functiondef(oid) AS def FROM pg_proc "
        "WHERE pronamespace = 'gateway'::regnamespace AND proname ~ $1",
        GENERATED_SQL,
    )
    return {r["name"]: r["def"] for r in rows}


async def expected_names(db: asyncpg.Connection, table: str) -> set[str]:
    """The names capture_name() gives the functions of a table."""
    rows = await db.fetch(
        "SELECT gateway.capture_name($1::regclass, k) FROM unnest($2::text[]) AS k", table, KINDS
    )
    return {r[0] for r in rows}


async def gateway_triggers(db: asyncpg.Connection, table: str) -> list[str]:
    rows = await db.fetch(
        "SELECT tgname::text FROM pg_trigger WHERE tgrelid = $1::regclass AND tgname LIKE 'gateway%' ORDER BY 1",
        table,
    )
    return [r[0] for r in rows]


async def events_of(db: asyncpg.Connection, table_name: str) -> list[tuple[Any, ...]]:
    rows = await db.fetch(
        "SELECT topic, pos, op::text, key FROM gateway.events WHERE tbl = $1 ORDER BY topic, pos", table_name
    )
    return [tuple(r) for r in rows]


async def check_capture(db: asyncpg.Connection, table: str, table_name: str, first_id: int) -> None:
    """An insert, an update moving the row and a delete on a published (id, owner) table log their events."""
    before = await events_of(db, table_name)
    await db.execute(f"INSERT INTO {table} VALUES ({first_id}, 1)")
    await db.execute(f"UPDATE {table} SET owner = 2 WHERE id = {first_id}")
    await db.execute(f"DELETE FROM {table} WHERE id = {first_id}")
    new = [e for e in await events_of(db, table_name) if e not in before]
    key = str(first_id)
    assert sorted((t, op, k) for t, _p, op, k in new) == [
        ("user:1", "d", key),
        ("user:1", "i", key),
        ("user:2", "d", key),
        ("user:2", "u", key),
    ]


# Schema and table names of at most 63 bytes each (PostgreSQL would cut the table's name
# itself otherwise), whose schema_table is far over the 36 bytes capture_name() keeps.
LONG_NAMES = [
    ("public", "заказы_покупателей_интернет_ма"),  # 30 Cyrillic letters: 60 bytes
    ("склад_данных", "注文履歴テーブルの非常に長い名前です"),  # 18 CJK letters: 54 bytes
]


@pytest.mark.parametrize(("schema", "table"), LONG_NAMES)
async def test_long_non_ascii_table_is_published_again_and_unpublished_without_leftovers(
    db: asyncpg.Connection, schema: str, table: str
) -> None:
    qualified = f'"{schema}"."{table}"'
    await db.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    await db.execute(f"CREATE TABLE {qualified} (id int PRIMARY KEY, owner int)")
    before = await generated(db)

    await db.execute("SELECT gateway.publish($1, $$'user:' || owner$$)", qualified)
    first = await generated(db)
    # Published twice: when names were cut by characters, not bytes, this failed ("function
    # ... already exists").
    await db.execute("SELECT gateway.publish($1, $$'user:' || owner$$)", qualified)
    names = await expected_names(db, qualified)
    assert set(await generated(db)) - set(before) == names == set(first) - set(before)
    assert all(len(n.encode()) <= NAME_LIMIT for n in names)
    # The hash survives: the names tell this table apart from one sharing its first letters.
    assert all(re.search(r"_[0-9a-f]{8}$", n) for n in names)
    row_topic = await db.fetchval(
        "SELECT row_topic FROM gateway.published WHERE tbl = $1::regclass", qualified
    )
    assert row_topic in names
    await check_capture(db, qualified, f"{schema}.{table}", 1)

    await db.execute("SELECT gateway.unpublish($1)", qualified)
    assert await generated(db) == before
    assert await gateway_triggers(db, qualified) == []
    assert await db.fetchval("SELECT count(*) FROM gateway.published") == 0


async def test_unpublish_keeps_the_functions_the_topic_expression_calls(db: asyncpg.Connection) -> None:
    """unpublish() finds the topic function by its name in the generated functions' code; a
    function of the caller's, called by the topic expression, is not one of them, even in
    schema gateway and named topic_..."""
    await db.execute(
        "CREATE FUNCTION gateway.topic_for(owner int) RETURNS text LANGUAGE sql AS $$SELECT 'user:' || owner$$"
    )
    await db.execute("CREATE TABLE t (id int PRIMARY KEY, owner int)")
    before = await generated(db)
    await db.execute("SELECT gateway.publish('t', 'gateway.topic_for(owner)')")
    await db.execute("SELECT gateway.publish('t', 'gateway.topic_for(owner)')")
    await check_capture(db, "t", "public.t", 1)
    await db.execute("SELECT gateway.unpublish('t')")
    assert await generated(db) == before
    assert "topic_for" in before


@pytest.mark.parametrize(
    ("ddl", "key"),
    [
        ('CREATE TABLE t ("a,b" int PRIMARY KEY, owner int)', "a,b"),
        ("CREATE TABLE t (id int, owner int, PRIMARY KEY (id) INCLUDE (owner))", "id"),
    ],
)
async def test_one_column_primary_key_is_the_default_key(db: asyncpg.Connection, ddl: str, key: str) -> None:
    """A primary key of one column is used whatever its name (a comma in it once
    read as a composite key) and whatever columns it INCLUDEs (which are not part of the key)."""
    await db.execute(ddl)
    await db.execute("SELECT gateway.publish('t', $$'user:' || owner$$)")
    assert await db.fetchval("SELECT key_column FROM gateway.published WHERE tbl = 't'::regclass") == key
    await db.execute("INSERT INTO t VALUES (7, 1)")
    assert await events_of(db, "public.t") == [("user:1", 1, "i", "7")]


async def test_composite_primary_key_is_refused_naming_its_columns(db: asyncpg.Connection) -> None:
    await db.execute('CREATE TABLE t ("a,b" int, c int, PRIMARY KEY ("a,b", c))')
    with pytest.raises(asyncpg.RaiseError, match=r'public\.t has a composite primary key \("a,b", c\)'):
        await db.execute("SELECT gateway.publish('t', 'c::text')")


# (topic, whether a client may subscribe to it). NUL is left out: PostgreSQL's text cannot hold it.
TOPICS = [
    ("user:42", True),
    ("room:7", True),
    ("presence:global", True),
    ("a:b", True),
    ("a::", True),
    ("a:b:c", True),
    ("~:!", True),
    ("k:" + "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "*"), True),
    ("x:" + "y" * 198, True),  # 200 characters
    ("x:" + "y" * 199, False),  # 201
    ("x:" + "é" * 198, False),  # 200 characters, not ASCII
    ("é" * 201, False),
    ("", False),
    ("room", False),
    (":7", False),
    ("room:", False),
    ("room 7", False),
    ("room: 7", False),
    (" room:7", False),
    ("room:7 ", False),
    ("room:\t7", False),
    ("room:7\n", False),
    ("room:\x01", False),
    ("room:\x7f", False),
    ("room:\x80", False),
    ("room:é", False),
    ("комната:7", False),
    ("room:7\U0001f642", False),
    ("room:*", False),
    ("room:7*", False),
    ("*", False),
    ("*:x", False),
]


async def test_sql_and_the_gateway_agree_on_which_topics_can_be_subscribed_to(db: asyncpg.Connection) -> None:
    """gateway.invalid_topic_reason() (SQL) and validate_topic() (the gateway's bad_topic check)
    accept exactly the same topics: the examples above, and every character from U+0001 to
    U+00FF plus a few beyond, at the start, in the middle and at the end of a topic."""
    chars = [chr(c) for c in (*range(1, 0x100), 0x2028, 0x3000, 0xFEFF, 0x1F642)]
    cases = [t for t, _ in TOPICS] + [f for c in chars for f in (f"{c}a:b", f"a{c}b:c", f"a:b{c}", f"a:{c}")]
    sql = await db.fetchval(
        "SELECT array_agg(gateway.invalid_topic_reason(t) ORDER BY n) FROM unnest($1::text[]) WITH ORDINALITY AS u(t, n)",
        cases,
    )
    disagree = [
        (t, validate_topic(t), r)
        for t, r in zip(cases, sql, strict=True)
        if (validate_topic(t) is None) != (r is None)
    ]
    assert disagree == []
    for topic, valid in TOPICS:
        assert (validate_topic(topic) is None) is valid, topic
    assert await db.fetchval("SELECT gateway.invalid_topic_reason(NULL)") == "the topic is NULL"


async def test_emit_refuses_a_topic_no_client_can_subscribe_to(db: asyncpg.Connection) -> None:
    for topic, valid in TOPICS:
        if valid:
            assert await db.fetchval("SELECT gateway.emit($1, '{}')", topic) == 1
            continue
        reason = re.escape(str(validate_topic(topic)).split(":")[0])
        with pytest.raises(
            asyncpg.RaiseError, match=rf"(?s)^gateway\.emit: bad topic .*: {reason}.*No client can subscribe"
        ):
            await db.execute("SELECT gateway.emit($1, '{}')", topic)
    with pytest.raises(asyncpg.RaiseError, match=r"gateway\.emit: bad topic NULL: the topic is NULL"):
        await db.execute("SELECT gateway.emit(NULL, '{}')")
    valid_topics = sorted(t for t, v in TOPICS if v)
    assert [r[0] for r in await db.fetch("SELECT topic FROM gateway.events ORDER BY topic")] == valid_topics
    assert [r[0] for r in await db.fetch("SELECT topic FROM gateway.topics ORDER BY topic")] == valid_topics


async def test_emit_many_refuses_a_bad_topic_and_publishes_nothing(db: asyncpg.Connection) -> None:
    with pytest.raises(
        asyncpg.RaiseError,
        match=r"gateway\.emit_many \(element 3\): bad topic 'room 7': the topic may only contain printable ASCII",
    ):
        await db.execute(
            "SELECT gateway.emit_many(ARRAY['room:1', NULL, 'room 7', 'room:*'], ARRAY['{}', '{}', '{}', '{}']::jsonb[])"
        )
    assert await db.fetchval("SELECT count(*) FROM gateway.events") == 0
    assert await db.fetchval("SELECT count(*) FROM gateway.topics") == 0
    # NULL topics are still skipped, and presence topics are ordinary topics.
    await db.execute(
        "SELECT gateway.emit_many(ARRAY['room:1', NULL, 'presence:global', 'room:1'], "
        "ARRAY['{\"n\": 1}', '{}', '{}', '{\"n\": 2}']::jsonb[])"
    )
    rows = await db.fetch("SELECT topic, pos, data::text FROM gateway.events ORDER BY topic, pos")
    assert [tuple(r) for r in rows] == [
        ("presence:global", 1, "{}"),
        ("room:1", 1, '{"n": 1}'),
        ("room:1", 2, '{"n": 2}'),
    ]
