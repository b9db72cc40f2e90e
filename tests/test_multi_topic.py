"""A row on several topics (docs/sql.md, "A row on several topics"): a topic expression giving
an array publishes each row on every topic in it.

Checked against a real PostgreSQL: each topic gets its own gap-free positions, one event per
distinct topic (duplicates and NULLs left out); an update that moves a row between topic sets
logs a delete on each topic it left and an update on each it is on; a key change deletes on
every old topic; multi-row statements, TRUNCATE and publishing again; and through a gateway,
each topic's subscribers get the row, the topic a row left gets a delete, never the row.
"""

from __future__ import annotations

import asyncpg
import pytest

from .gwtest import running_gateway, token
from .pgconn import connection

pytestmark = pytest.mark.timeout(120)

TASKS = """
CREATE TABLE tasks (id int PRIMARY KEY, owner_id int, team_id int, watcher_id int, title text);
SELECT gateway.publish('public.tasks',
    $$ARRAY['user:' || owner_id, 'team:' || team_id, 'user:' || watcher_id]$$);
"""


async def events(db: asyncpg.Connection) -> list[tuple[str, int, str, str]]:
    rows = await db.fetch(
        "SELECT topic, pos, op::text AS op, key FROM gateway.events WHERE tbl = 'public.tasks' "
        'ORDER BY topic COLLATE "C", pos'
    )
    return [(r["topic"], r["pos"], r["op"], r["key"]) for r in rows]


async def test_each_topic_gets_its_own_gap_free_positions(db: asyncpg.Connection) -> None:
    await db.execute(TASKS)
    # A row on user:1 and team:7; its watcher is NULL, so 'user:' || NULL is no topic.
    await db.execute("INSERT INTO tasks VALUES (1, 1, 7, NULL, 'a')")
    # Owner and watcher the same user: one event on user:2, not two.
    await db.execute("INSERT INTO tasks VALUES (2, 2, 7, 2, 'b')")
    assert await events(db) == [
        ("team:7", 1, "i", "1"),
        ("team:7", 2, "i", "2"),
        ("user:1", 1, "i", "1"),
        ("user:2", 1, "i", "2"),
    ]
    heads = dict(await db.fetch("SELECT topic, pos FROM gateway.topics ORDER BY topic"))
    assert heads == {"team:7": 2, "user:1": 1, "user:2": 1}


async def test_an_update_deletes_on_the_topics_the_row_left(db: asyncpg.Connection) -> None:
    await db.execute(TASKS)
    await db.execute("INSERT INTO tasks VALUES (1, 1, 7, 3, 'a')")
    await db.execute("DELETE FROM gateway.events")
    # Same topics: an update on each.
    await db.execute("UPDATE tasks SET title = 'b' WHERE id = 1")
    assert [(t, op) for t, _, op, _ in await events(db)] == [
        ("team:7", "u"),
        ("user:1", "u"),
        ("user:3", "u"),
    ]
    await db.execute("DELETE FROM gateway.events")
    # Another team, no watcher: deletes where it left, updates where it is.
    await db.execute("UPDATE tasks SET team_id = 8, watcher_id = NULL WHERE id = 1")
    assert await events(db) == [
        ("team:7", 3, "d", "1"),
        ("team:8", 1, "u", "1"),
        ("user:1", 3, "u", "1"),
        ("user:3", 3, "d", "1"),
    ]
    await db.execute("DELETE FROM gateway.events")
    # A new key: the old key is gone from every old topic.
    await db.execute("UPDATE tasks SET id = 10 WHERE id = 1")
    assert await events(db) == [
        ("team:8", 2, "d", "1"),
        ("team:8", 3, "u", "10"),
        ("user:1", 4, "d", "1"),
        ("user:1", 5, "u", "10"),
    ]
    await db.execute("DELETE FROM gateway.events")
    await db.execute("DELETE FROM tasks")
    assert await events(db) == [("team:8", 4, "d", "10"), ("user:1", 6, "d", "10")]


async def test_multi_row_statements_truncate_and_publish_again(db: asyncpg.Connection) -> None:
    await db.execute(TASKS)
    await db.execute("INSERT INTO tasks SELECT g, g % 2, 7, NULL, 'x' FROM generate_series(1, 4) AS g")
    await db.execute("UPDATE tasks SET team_id = 9")
    counts = dict(await db.fetch("SELECT topic || ':' || op::text, count(*) FROM gateway.events GROUP BY 1"))
    assert counts == {
        "user:0:i": 2, "user:1:i": 2, "team:7:i": 4,
        "user:0:u": 2, "user:1:u": 2, "team:9:u": 4, "team:7:d": 4,
    }  # fmt: skip
    # Positions stay gap-free per topic through all of it.
    gaps = await db.fetchval(
        "SELECT count(*) FROM (SELECT topic, pos, row_number() OVER (PARTITION BY topic ORDER BY pos) AS n "
        "FROM gateway.events) AS e WHERE pos <> n"
    )
    assert gaps == 0
    await db.execute("DELETE FROM gateway.events")
    await db.execute("TRUNCATE tasks")
    assert sorted({(t, op) for t, _, op, _ in await events(db)}) == [
        ("team:9", "d"),
        ("user:0", "d"),
        ("user:1", "d"),
    ]
    assert len(await events(db)) == 8
    # Published again, with one topic: the triggers are the single-topic ones again.
    await db.execute("SELECT gateway.publish('public.tasks', $$'user:' || owner_id$$)")
    await db.execute("DELETE FROM gateway.events")
    await db.execute("INSERT INTO tasks VALUES (1, 5, 7, NULL, 'one')")
    assert await events(db) == [("user:5", 1, "i", "1")]


async def test_subscribers_of_each_topic_get_the_row_and_a_topic_it_left_a_delete(dsn: str) -> None:
    async with connection(dsn) as db:
        await db.execute(TASKS)
    async with running_gateway(dsn, tables="tasks") as gw, connection(dsn) as db:
        owner, team = await gw.connect(), await gw.connect()
        await owner.auth(token("1"))
        await team.auth(token("9", topics=["team:*"]))
        await owner.subscribe("user:1")
        await team.subscribe("team:7")
        await db.execute("INSERT INTO tasks VALUES (1, 1, 7, NULL, 'a')")
        ((to_owner,), (to_team,)) = [await owner.events(1), await team.events(1)]
        assert to_owner["row"] == to_team["row"] and to_owner["row"]["title"] == "a"
        assert (to_owner["topic"], to_team["topic"]) == ("user:1", "team:7")
        # The task moves to another team: the old team's subscribers see it go; its row stays
        # with the owner.
        await db.execute("UPDATE tasks SET team_id = 8, title = 'moved' WHERE id = 1")
        (gone,) = await team.events(1)
        assert (gone["op"], gone["key"]) == ("delete", "1") and "row" not in gone
        (still,) = await owner.events(1)
        assert (still["op"], still["row"]["title"]) == ("update", "moved")
        await owner.close()
        await team.close()
