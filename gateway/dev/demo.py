"""``gateway demo``: everything a newcomer needs to see rows move, in one command.

Starts a throwaway PostgreSQL when no DATABASE_URL is set (local binaries, else Docker),
applies the migrations, creates and publishes a ``demo_tasks`` table, starts the gateway
with demo-only endpoints and an activity generator, and prints the page's URL.
Ctrl-C stops all of it, including the throwaway PostgreSQL.

Demo-only endpoints (never mounted by ``gateway serve``):
``GET /demo`` the page, ``GET /demo/token?user=NAME`` a short-lived token for that name,
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


def random_title() -> str:
    return f"{random.choice(VERBS)} {random.choice(THINGS)}"


async def prepare_database(dsn: str) -> None:
    from ..migrate import migrate

    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA)
        if not await conn.fetchval("SELECT count(*) FROM public.demo_tasks"):
            for _ in range(5):
                await conn.execute(
                    "INSERT INTO public.demo_tasks (title, status, assignee) VALUES ($1, $2, $3)",
                    random_title(),
                    random.choice(["todo", "doing", "done"]),
                    random.choice(PEOPLE),
                )
    finally:
        await conn.close()


async def activity(dsn: str, interval: float = 1.5) -> None:
    """Commit a small random change every ``interval`` seconds so the page keeps moving."""
    conn: asyncpg.Connection | None = None
    while True:
        await asyncio.sleep(interval * random.uniform(0.5, 1.5))
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(dsn)
            count = await conn.fetchval("SELECT count(*) FROM public.demo_tasks")
            roll = random.random()
            if count < 6 or (roll < 0.25 and count < 14):
                await conn.execute(
                    "INSERT INTO public.demo_tasks (title, assignee) VALUES ($1, $2)",
                    random_title(),
                    random.choice(PEOPLE),
                )
            elif roll < 0.4 or count > 14:
                await conn.execute(
                    "DELETE FROM public.demo_tasks WHERE id = (SELECT id FROM public.demo_tasks "
                    "WHERE status = 'done' ORDER BY updated_at LIMIT 1)"
                )
            else:
                await conn.execute(
                    "UPDATE public.demo_tasks SET status = CASE status WHEN 'todo' THEN 'doing' ELSE 'done' END, "
                    "assignee = coalesce(assignee, $1), updated_at = now() "
                    "WHERE id = (SELECT id FROM public.demo_tasks WHERE status <> 'done' ORDER BY random() LIMIT 1)",
                    random.choice(PEOPLE[:-1]),
                )
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
        tok = mint_token(settings.jwt_secret, user, ttl=TOKEN_TTL, topics=["board:*", "presence:*"])
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


async def _run(settings: Settings) -> None:
    await prepare_database(settings.database_url)
    app = build_app(settings)
    add_demo_routes(app, settings)
    generator = asyncio.create_task(activity(settings.database_url))
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    # The password is never printed; where there is one, the line says what *** stands for.
    masked = mask_dsn(settings.database_url)
    hint = "  (*** is the database password)" if masked != settings.database_url else ""
    print(
        f"\n  Demo running: open http://{host}:{settings.port}/demo\n"
        f"  Open a second tab with another name to see presence. Commit a change yourself:\n"
        f"    psql '{masked}' -c \"UPDATE demo_tasks SET status = 'done' WHERE id = 1\"{hint}\n"
        f"  Ctrl-C stops everything.\n",
        flush=True,
    )
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
