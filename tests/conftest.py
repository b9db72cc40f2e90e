"""Fixtures for the whole suite: a real PostgreSQL, and a migrated database of its own per test.

``pg`` (session)
    The PostgreSQL server of the test session (see ``gateway.dev.pgcluster.Postgres``), chosen in order:

    1. ``TEST_DATABASE_URL``: an existing server, whose user may CREATE DATABASE; it cannot be
       restarted. On a server shared by several sessions set ``TEST_DB_PREFIX`` (e.g. ``h2_``)
       so their databases keep apart.
    2. a throwaway cluster from local PostgreSQL binaries, with fsync off;
    3. a ``postgres:16-alpine`` container (testcontainers) when Docker answers;

    otherwise every test fails with what to install. ``pg.dsn(dbname)`` is the URL of a database,
    ``pg.can_restart`` says whether ``pg_restart`` works. Stopped at the end of the session.

``pg_template`` (session)
    Name of the template database (``gw_template``) holding every migration of ``sql/``, applied
    once per session with ``gateway.migrate.migrate``. Nobody may connect to it (ALLOW_CONNECTIONS
    false), so it can always be cloned.

``dsn`` (function)
    URL of a fresh database cloned from the template: migrated, unique to the test, dropped after
    it even if the test left connections open. Example::

        async def test_emit(dsn):
            conn = await pg_connect(dsn)  # tests/pgconn.py: the suite's one way to connect

``db`` (function)
    A connection to the test's own database (``dsn``), closed after the test.

``items`` (function)
    ``dsn`` with a published table ``items`` (``gwtest.make_items_table``): rows of owner N go
    to topic ``user:N``.

``blank_dsn`` (function)
    Like ``dsn`` but empty (cloned from template0): no migration applied.

``pg_restart`` (function)
    Restarts the session's PostgreSQL with the same port and data. Skipped with the reason when
    ``pg.can_restart`` is false (TEST_DATABASE_URL, Docker). Blocking calls: ``pg_restart()``,
    ``pg_restart.down()`` (immediate shutdown, as a crash), ``pg_restart.up()``. In async tests
    use ``await pg_restart.arestart()``, ``await pg_restart.adown()``, ``await pg_restart.aup()``:
    they run in a thread, so the event loop (and a gateway under test) keeps running meanwhile.
    The server is brought back up after the test if it was left down.

``browser`` (module)
    Debian's Chromium through Playwright (``tests/browsertest.py``), one per test module.

The session fixtures are synchronous and run their asyncpg calls in a worker thread with its own
event loop, so they never touch the loops pytest-asyncio gives to tests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import asyncpg
import pytest
import pytest_asyncio

from gateway.config import mask_dsn
from gateway.dev.pgcluster import ExistingPostgres, Postgres, PostgresUnavailable, start_throwaway
from gateway.migrate import migrate

from .pgconn import connection

T = TypeVar("T")

TEMPLATE_NAME = "gw_template"


def run_in_thread(fn: Callable[[], Awaitable[T]]) -> T:
    """Run the coroutine made by ``fn`` to completion in a new thread with its own event loop."""

    async def main() -> T:
        return await fn()

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pg-fixture") as pool:
        return pool.submit(lambda: asyncio.run(main())).result()


async def _execute(dsn: str, *statements: str) -> None:
    async with connection(dsn, timeout=10) as conn:
        for statement in statements:
            await conn.execute(statement)


def admin_sql(pg: Postgres, *statements: str) -> None:
    """Run statements (CREATE/DROP DATABASE, ...) on the server's ``postgres`` database."""
    run_in_thread(lambda: _execute(pg.dsn("postgres"), *statements))


def _prefix() -> str:
    prefix = os.environ.get("TEST_DB_PREFIX", "")
    if not re.fullmatch(r"[a-z0-9_]{0,20}", prefix):
        pytest.fail(
            f"TEST_DB_PREFIX={prefix!r}: use at most 20 lowercase letters, digits or underscores (e.g. h2_)",
            pytrace=False,
        )
    return prefix


@pytest.fixture(scope="session")
def pg() -> Iterator[Postgres]:
    # Failures are reported outside the except blocks, so the report is the message alone.
    problem = ""
    url = os.environ.get("TEST_DATABASE_URL", "").strip()
    if url:
        try:
            server: Postgres = ExistingPostgres(url)
            run_in_thread(lambda: _execute(url, "SELECT 1"))
        except ValueError as e:
            problem = f"TEST_DATABASE_URL: {e}"
        except Exception as e:
            problem = f"TEST_DATABASE_URL={mask_dsn(url)} does not answer: {e}"
        if problem:
            pytest.fail(problem, pytrace=False)
        yield server
        return
    try:
        server = start_throwaway(fast=True)
    except PostgresUnavailable as e:
        problem = f"The tests need a PostgreSQL server. {e}"
    if problem:
        pytest.fail(problem, pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_template(pg: Postgres) -> Iterator[str]:
    name = _prefix() + TEMPLATE_NAME
    # Left over from an interrupted session on a shared server, possibly with older migrations.
    admin_sql(pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    run_in_thread(lambda: migrate(pg.dsn(name)))
    # migrate() has closed its connection. CREATE DATABASE ... TEMPLATE fails while anyone is
    # connected to the template, so connections are refused from now on.
    admin_sql(pg, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
    yield name
    if pg.is_running():
        admin_sql(pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _fresh_database(pg: Postgres, template: str) -> Iterator[str]:
    name = f"{_prefix()}gw_t_{uuid.uuid4().hex[:16]}"
    admin_sql(pg, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield pg.dsn(name)
    finally:
        if pg.can_restart and not pg.is_running():
            pg.restart()  # a test took the server down and failed before bringing it back
        admin_sql(pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def dsn(pg: Postgres, pg_template: str) -> Iterator[str]:
    yield from _fresh_database(pg, pg_template)


@pytest.fixture
def blank_dsn(pg: Postgres) -> Iterator[str]:
    yield from _fresh_database(pg, "template0")


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test's own database (``dsn``)."""
    async with connection(dsn) as conn:
        yield conn


@pytest.fixture
async def items(dsn: str) -> str:
    """``dsn`` with the published table ``items`` of gwtest.make_items_table (topic user:<owner_id>)."""
    from .gwtest import make_items_table

    await make_items_table(dsn)
    return dsn


class PgRestart:
    """Restart, take down or bring back the session's PostgreSQL (see the module docstring)."""

    def __init__(self, server: Postgres) -> None:
        self.server = server

    def __call__(self) -> None:
        self.server.restart()

    def down(self) -> None:
        kill = getattr(self.server, "kill", None)
        if kill is None:
            raise RuntimeError(f"a {self.server.kind} server cannot be taken down")
        kill()

    def up(self) -> None:
        if not self.server.is_running():
            self.server.restart()

    async def arestart(self) -> None:
        await asyncio.to_thread(self.server.restart)

    async def adown(self) -> None:
        await asyncio.to_thread(self.down)

    async def aup(self) -> None:
        await asyncio.to_thread(self.up)


@pytest.fixture
def pg_restart(pg: Postgres) -> Iterator[PgRestart]:
    if not pg.can_restart:
        pytest.skip(
            f"needs a PostgreSQL this session can restart; this one is a {pg.kind} server "
            "(unset TEST_DATABASE_URL and install PostgreSQL server binaries)"
        )
    control = PgRestart(pg)
    try:
        yield control
    finally:
        control.up()


@pytest.fixture(autouse=True)
async def _close_leftover_clients() -> AsyncIterator[None]:
    """Close the protocol clients and connections a test left open (tests/gwtest.py)."""
    yield
    from .gwtest import close_leftovers

    await close_leftovers()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Any]:
    """Debian's Chromium through Playwright, one per test module (tests/browsertest.py has the flags)."""
    from .browsertest import launch_chromium

    async with launch_chromium() as chromium:
        yield chromium
