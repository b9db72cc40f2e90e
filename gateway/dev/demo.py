"""``gateway demo``: everything a newcomer needs to see rows move, in one command.

Starts a throwaway PostgreSQL when no DATABASE_URL is set (local binaries, else Docker),
applies the migrations, creates and publishes a ``demo_tasks`` table, starts the gateway
with demo-only endpoints and an activity generator, and prints the page's URL.
Ctrl-C stops all of it, including the throwaway PostgreSQL.

Demo-only endpoints (never mounted by ``gateway serve``):
``GET /demo`` the page, ``GET /demo/token?user=NAME`` a short-lived token for that name (reading
the board and presence, publishing to the board's room),
``GET /demo/tasks`` the current rows with the topic position they correspond to,
``POST /demo/tasks`` commits a random new task.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import re
import secrets
import sys
import time
from typing import Any

import asyncpg
from aiohttp import web

from ..auth import mint_token
from ..clientscript import STATIC
from ..config import ConfigError, Settings, mask_dsn
from ..pgerrors import DB_ERRORS
from ..server import build_app, run, serve
from ..tables import parse_tables

log = logging.getLogger("gateway.demo")

TOPIC = "board:demo"
TOKEN_TTL = 120.0  # short, so the page shows an in-band token refresh every couple of minutes
_NAME = re.compile(r"^[A-Za-z0-9 _.-]{1,40}$")

# Task #1 is the visitor's: the command printed at start (and shown on the page) moves it
# between To do and Done, and works however long the demo has run, because the activity
# generator never changes or deletes it. prepare_database() puts it back if it is gone.
PINNED_ID = 1
PINNED_TITLE = "Move me with the UPDATE shown above"
TRY_SQL = "UPDATE demo_tasks SET status = CASE status WHEN 'done' THEN 'todo' ELSE 'done' END WHERE id = 1"

# The generator keeps LOW to HIGH tasks besides task #1, at most COLUMN_MAX per status.
LOW, HIGH, COLUMN_MAX = 6, 12, 4
STATUSES = ("todo", "doing", "done")

SCHEMA = """
CREATE TABLE IF NOT EXISTS public.demo_tasks (
    id         bigserial PRIMARY KEY,
    board      text NOT NULL DEFAULT 'demo',
    title      text NOT NULL,
    status     text NOT NULL DEFAULT 'todo' CHECK (status IN ('todo', 'doing', 'done')),
    assignee   text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
SELECT gateway.publish('public.demo_tasks', $$'board:' || board$$);
"""

VERBS = ["Write", "Review", "Ship", "Fix", "Plan", "Test", "Document", "Measure"]
THINGS = [
    "the login page",
    "release notes",
    "the slow query",
    "onboarding",
    "the API docs",
    "backups",
    "the invoice job",
]
PEOPLE = ["ada", "grace", "linus", "margaret", "ken", "barbara", None]


def random_title(rng: random.Random | None = None) -> str:
    rng = rng or random.Random()
    return f"{rng.choice(VERBS)} {rng.choice(THINGS)}"


async def prepare_database(dsn: str) -> None:
    from ..migrate import migrate

    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA)
        added = await conn.fetchval(
            "INSERT INTO public.demo_tasks (id, title) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING RETURNING id",
            PINNED_ID,
            PINNED_TITLE,
        )
        if added is not None:
            # An explicit id leaves a fresh table's sequence at it: the next insert would
            # collide. Past every id, and never back (ids of deleted rows are not reused).
            await conn.execute(
                "SELECT setval(seq, greatest(max(id), nextval(seq) - 1)) "
                "FROM public.demo_tasks, pg_get_serial_sequence('public.demo_tasks', 'id') AS seq GROUP BY seq"
            )
        others = await conn.fetchval(
            "SELECT count(*) FROM public.demo_tasks WHERE board = 'demo' AND id <> $1", PINNED_ID
        )
        # A board with something in every column from the first moment.
        for i in range(LOW - others):
            await conn.execute(
                "INSERT INTO public.demo_tasks (title, status, assignee) VALUES ($1, $2, $3)",
                random_title(),
                STATUSES[i % len(STATUSES)],
                random.choice(PEOPLE),
            )
    finally:
        await conn.close()


async def activity_step(conn: asyncpg.Connection, rng: random.Random) -> str:
    """One small change on the board, named by what it did: add, start, finish or remove.

    A task flows To do -> Doing -> Done -> removed. The step picks among the moves the board
    allows (a column holds at most COLUMN_MAX tasks, the board LOW to HIGH besides task #1),
    the likelier the more room the move's target column has and the more tasks its source
    column holds, and a quarter as likely when it would take the last task of a column. As
    many tasks flow into each column as out of it, so the board neither drifts to everything
    Done nor empties a column for long; task #1 is never touched."""
    rows = await conn.fetch(
        "SELECT id, status FROM public.demo_tasks WHERE board = 'demo' AND id <> $1 ORDER BY updated_at, id",
        PINNED_ID,
    )
    ids: dict[str, list[int]] = {status: [] for status in STATUSES}
    for row in rows:
        ids[row["status"]].append(row["id"])
    n = len(rows)
    todo, doing, done = (ids[status] for status in STATUSES)

    def weight(source: list[int] | None, target: list[int] | None) -> float:
        room = COLUMN_MAX - len(target) if target is not None else COLUMN_MAX
        held = len(source) if source is not None else COLUMN_MAX
        return min(room, held) * (0.25 if held == 1 else 1.0)

    moves: dict[str, float] = {}
    if n < HIGH and len(todo) < COLUMN_MAX:
        moves["add"] = weight(None, todo)
    if todo and len(doing) < COLUMN_MAX:
        moves["start"] = weight(todo, doing)
    if doing and len(done) < COLUMN_MAX:
        moves["finish"] = weight(doing, done)
    if done and n > LOW:
        moves["remove"] = weight(done, None)
    if not moves:  # only a board a visitor filled far past HIGH: removing one of its tasks
        moves["remove" if done else "finish" if doing else "start"] = 1.0
    move = rng.choices(list(moves), weights=list(moves.values()))[0]
    if move == "add":
        await conn.execute(
            "INSERT INTO public.demo_tasks (title, assignee) VALUES ($1, $2)",
            random_title(rng),
            rng.choice(PEOPLE),
        )
    elif move in ("start", "finish"):
        await conn.execute(
            "UPDATE public.demo_tasks SET status = $2, assignee = coalesce(assignee, $3), updated_at = now() "
            "WHERE id = $1",
            rng.choice(todo if move == "start" else doing),
            "doing" if move == "start" else "done",
            rng.choice(PEOPLE[:-1]),
        )
    else:
        await conn.execute("DELETE FROM public.demo_tasks WHERE id = $1", done[0])  # the oldest Done
    return move


async def activity(dsn: str, interval: float = 1.5) -> None:
    """Commit a small random change every ``interval`` seconds so the page keeps moving."""
    rng = random.Random()
    conn: asyncpg.Connection | None = None
    while True:
        await asyncio.sleep(interval * rng.uniform(0.5, 1.5))
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(dsn)
            await activity_step(conn, rng)
        except DB_ERRORS as exc:
            log.warning("activity generator: %s", exc)
            conn = None


def add_demo_routes(app: web.Application, settings: Settings) -> None:
    async def page(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "demo.html")

    async def token(request: web.Request) -> web.Response:
        user = request.query.get("user", "").strip()
        if not _NAME.match(user):
            return web.json_response(
                {
                    "error": "bad_user",
                    "message": "user must be 1-40 letters, digits, spaces, '.', '_' or '-'",
                },
                status=400,
            )
        # publish: the board's room, where the page sends its pointer positions (ephemeral).
        tok = mint_token(
            settings.jwt_secret, user, ttl=TOKEN_TTL, topics=["board:*", "presence:*"], publish=["board:*"]
        )
        return web.json_response({"token": tok, "expires": int(time.time() + TOKEN_TTL)})

    async def tasks(request: web.Request) -> web.Response:
        conn = await asyncpg.connect(settings.database_url)
        try:
            # One snapshot for the rows and the position: subscribing with since=this
            # position then delivers exactly the changes after what the page shows.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                head = await conn.fetchrow("SELECT epoch, pos FROM gateway.heads(ARRAY[$1::text])", TOPIC)
                rows = await conn.fetch(
                    "SELECT row_to_json(t)::text AS j FROM public.demo_tasks t WHERE board = 'demo' ORDER BY id"
                )
        finally:
            await conn.close()
        rows_json = ",".join(r["j"] for r in rows)
        body = f'{{"topic":"{TOPIC}","epoch":"{head["epoch"]}","pos":{head["pos"]},"rows":[{rows_json}]}}'
        return web.Response(text=body, content_type="application/json")

    async def add_task(request: web.Request) -> web.Response:
        conn = await asyncpg.connect(settings.database_url)
        try:
            row_id = await conn.fetchval(
                "INSERT INTO public.demo_tasks (title) VALUES ($1) RETURNING id", random_title()
            )
        finally:
            await conn.close()
        return web.json_response({"id": row_id}, status=201)

    async def root(request: web.Request) -> web.Response:
        raise web.HTTPFound("/demo")

    app.router.add_get("/", root)
    app.router.add_get("/demo", page)
    app.router.add_get("/demo/token", token)
    app.router.add_get("/demo/tasks", tasks)
    app.router.add_post("/demo/tasks", add_task)
    app.router.add_static("/demo/static", STATIC)


def banner(settings: Settings) -> str:
    """What `gateway demo` prints once it is up: the page, and a commit to try by hand."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    # The password is never printed; where there is one, the line says what *** stands for.
    masked = mask_dsn(settings.database_url)
    hint = "\n    (*** is the database password)" if masked != settings.database_url else ""
    return (
        f"\n  Demo running: open http://{host}:{settings.port}/demo\n"
        f"  Open a second tab and connect under another name to see presence and each other's pointer.\n"
        f"  Commit a change yourself (it moves task #1 between To do and Done):\n"
        f"    psql '{masked}' -c \"{TRY_SQL}\"{hint}\n"
        f"  Ctrl-C stops everything.\n"
    )


async def _run(settings: Settings) -> None:
    await prepare_database(settings.database_url)
    app = build_app(settings)
    add_demo_routes(app, settings)
    generator = asyncio.create_task(activity(settings.database_url))
    print(banner(settings), flush=True)
    try:
        await serve(settings, app=app)
    finally:
        generator.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await generator


def with_demo_table(tables: str) -> str:
    """GATEWAY_TABLES with the demo's table added unless it is listed. Parsed, not split on
    ";" and compared as text: an entry may be quoted or in another case
    (`"public".DEMO_TASKS`), and a ";" may stand inside a quoted name."""
    listed = parse_tables(tables)
    if any((e.schema, e.table) == ("public", "demo_tasks") for e in listed):
        return tables
    return f"{tables};public.demo_tasks" if listed else "public.demo_tasks"


def run_demo(settings: Settings, *, host_given: bool = False) -> int:
    from .pgcluster import PostgresUnavailable, start_throwaway

    cluster = None
    changes: dict[str, Any] = {}
    if not settings.database_url:
        try:
            print("Starting a throwaway PostgreSQL (set DATABASE_URL to use your own)...", flush=True)
            cluster = start_throwaway(fast=True)
        except PostgresUnavailable as exc:
            print(f"gateway demo: {exc}", file=sys.stderr)
            return 2
        changes["database_url"] = cluster.dsn("postgres")
    if not settings.jwt_secret:
        changes["jwt_secret"] = secrets.token_urlsafe(32)
    if not host_given:
        # The demo hands a token to anyone who asks and commits rows on request: only this
        # machine may reach it unless GATEWAY_HOST (or --host) says otherwise.
        changes["host"] = "127.0.0.1"
    try:
        changes["tables"] = with_demo_table(settings.tables)
    except ConfigError as exc:
        print(f"gateway demo: {exc}", file=sys.stderr)
        return 2
    settings = dataclasses.replace(settings, **changes)
    log.info("demo database: %s", mask_dsn(settings.database_url))
    try:
        run(_run(settings))
    except ConfigError as exc:
        print(f"gateway demo: {exc}", file=sys.stderr)
        return 2
    finally:
        if cluster is not None:
            print("Stopping the throwaway PostgreSQL...", flush=True)
            cluster.stop()
    return 0
