"""`gateway demo`'s board and the command it prints, against a real PostgreSQL.

The activity generator runs one step every second or so; here its step function is called
directly, hundreds of times in a row, on the demo's real table (with its capture trigger), so
an hour of the demo takes a couple of seconds. The page in a browser is covered in
tests/test_browser_e2e.py.
"""

from __future__ import annotations

import random
from collections import Counter

import asyncpg

from gateway.clientscript import STATIC
from gateway.config import Settings
from gateway.dev import demo

from .pgconn import pg_connect

STEPS = 600  # about fifteen minutes of the demo


async def board(conn: asyncpg.Connection) -> Counter[str]:
    """Tasks per status, besides task #1."""
    rows = await conn.fetch(
        "SELECT status, count(*) AS n FROM public.demo_tasks WHERE board = 'demo' AND id <> $1 GROUP BY status",
        demo.PINNED_ID,
    )
    return Counter({r["status"]: r["n"] for r in rows})


async def pinned(conn: asyncpg.Connection) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM public.demo_tasks WHERE id = $1", demo.PINNED_ID)


def test_the_printed_command_is_the_one_the_page_shows() -> None:
    settings = Settings(database_url="postgresql://demo:pw@127.0.0.1:5432/demo", port=8080)
    text = demo.banner(settings)
    assert f"psql 'postgresql://demo:***@127.0.0.1:5432/demo' -c \"{demo.TRY_SQL}\"" in text
    assert "*** is the database password" in text
    assert f"<code>{demo.TRY_SQL}</code>" in (STATIC / "demo.html").read_text()
    assert f"WHERE id = {demo.PINNED_ID}" in demo.TRY_SQL


async def test_the_board_keeps_moving_in_every_column_and_task_1_stays(dsn: str) -> None:
    await demo.prepare_database(dsn)
    rng = random.Random(23)
    conn = await pg_connect(dsn)
    try:
        first = await pinned(conn)
        assert first is not None and first["title"] == demo.PINNED_TITLE
        start = await board(conn)
        assert all(start[s] >= 1 for s in demo.STATUSES), start  # something in every column at once

        moves: Counter[str] = Counter()
        empty: Counter[str] = Counter()
        for step in range(STEPS):
            moves[await demo.activity_step(conn, rng)] += 1
            now = await board(conn)
            total = sum(now.values())
            assert demo.LOW <= total <= demo.HIGH, (step, now)
            assert max(now.values()) <= demo.COLUMN_MAX, (step, now)
            # Never "To do 0, Doing 0, Done 9": the Done column alone cannot hold the board.
            assert now["todo"] + now["doing"] >= 1, (step, now)
            empty.update(s for s in demo.STATUSES if not now[s])

        # Every move happens about as often as the others, so no column fills up or dries out.
        assert set(moves) == {"add", "start", "finish", "remove"}, moves
        assert min(moves.values()) >= STEPS / 8, moves
        for status in demo.STATUSES:
            assert empty[status] <= STEPS / 10, (status, empty)

        # Task #1 is exactly as prepared: the generator never touched it.
        assert dict(await pinned(conn) or {}) == dict(first)
        # The printed command works, and moves the card each time it is run.
        assert await conn.execute(demo.TRY_SQL) == "UPDATE 1"
        assert (await pinned(conn) or {})["status"] == "done"
        assert await conn.execute(demo.TRY_SQL) == "UPDATE 1"
        assert (await pinned(conn) or {})["status"] == "todo"
    finally:
        await conn.close()


async def test_task_1_comes_back_on_the_next_start_and_ids_go_on(dsn: str) -> None:
    await demo.prepare_database(dsn)
    conn = await pg_connect(dsn)
    try:
        last = await conn.fetchval("INSERT INTO public.demo_tasks (title) VALUES ('x') RETURNING id")
        await conn.execute("DELETE FROM public.demo_tasks WHERE id IN ($1, $2)", demo.PINNED_ID, last)
        await demo.prepare_database(dsn)  # a second `gateway demo` on the same DATABASE_URL
        assert await pinned(conn) is not None
        assert await conn.execute(demo.TRY_SQL) == "UPDATE 1"
        # Inserting without an id still works, and no id is used twice.
        new_id = await conn.fetchval("INSERT INTO public.demo_tasks (title) VALUES ('y') RETURNING id")
        assert new_id > last
    finally:
        await conn.close()


async def test_a_fresh_table_gets_task_1_and_the_sequence_after_it(dsn: str) -> None:
    await demo.prepare_database(dsn)
    conn = await pg_connect(dsn)
    try:
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM public.demo_tasks ORDER BY id")]
        assert ids == list(range(1, demo.LOW + 2)), ids  # task #1, then the seeded ones
    finally:
        await conn.close()
