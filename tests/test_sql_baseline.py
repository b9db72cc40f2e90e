"""The SQL baseline (sql/baseline/) builds the same database as the migration chain (sql/0NN_*.sql).

The chain wrote gateway.publish() four times and then patched its text in place through
gateway.patch_function(); the baseline writes every function once, as the chain left it. This
proves the two equal, against a real PostgreSQL, before the chain is removed:

- the catalog of schema gateway, as ``pg_dump --schema-only -n gateway`` prints it, is the
  same, but for publish() itself (rewritten with named placeholders), the helper that fills
  them (fill_template, new) and patch_function (gone);
- publish() generates, byte for byte, the same functions and triggers for tables of several
  key types, column lists and topic expressions (generated_functions() finds them, in both).
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from gateway.migrate import migrate
from gateway.pgcluster import Postgres, find_pg_bin
from tests.conftest import admin_sql

REPO_SQL = Path(__file__).resolve().parent.parent / "sql"
CHAIN = REPO_SQL
BASELINE = REPO_SQL / "baseline"

# Left out of the catalog comparison: rewritten (publish), new (fill_template), or only the
# chain's (patch_function).
NOT_COMPARED = ("publish(", "fill_template(", "patch_function(")

# Tables published in both databases: key types int, bigint, text, uuid, a key type without
# an equality (xml: compared as text), a composite primary key with an explicit key column,
# topics reading no column, the key only, a type whose equal values can differ (numeric), a
# collation, quoted and odd names (braces included), a long non-ASCII name.
TABLES = r"""
CREATE TABLE public.items (id int PRIMARY KEY, owner text, n int);
SELECT gateway.publish('public.items', $$'user:' || owner$$);

CREATE TABLE public.orders (id bigint PRIMARY KEY, shop_id bigint NOT NULL, note text, at timestamptz);
SELECT gateway.publish('public.orders', $$'shop:' || shop_id || ':' || coalesce(note, '-')$$);

CREATE TABLE public.docs (slug text PRIMARY KEY, body text);
SELECT gateway.publish('public.docs', $$'doc:' || slug$$);

CREATE TABLE public.sessions (id uuid PRIMARY KEY, room int, active boolean, day date);
SELECT gateway.publish('public.sessions', $$CASE WHEN active THEN 'room:' || room || ':' || day END$$);

CREATE TABLE public.prices (id int PRIMARY KEY, amount numeric(10, 2), label varchar(20));
SELECT gateway.publish('public.prices', $$'price:' || amount || ':' || label$$);

CREATE TABLE public.members (room int, user_id text, id int UNIQUE NOT NULL, PRIMARY KEY (room, user_id));
SELECT gateway.publish('public.members', $$'room:' || room$$, 'id');

CREATE TABLE public.blobs (id xml, owner text);
SELECT gateway.publish('public.blobs', $$'user:' || owner$$, 'id');

CREATE TABLE public.news (id int PRIMARY KEY, title text);
SELECT gateway.publish('public.news', $$'news:all'$$);

CREATE TABLE public.people (id int PRIMARY KEY, name text COLLATE "POSIX");
SELECT gateway.publish('public.people', $$'person:' || name$$);

CREATE SCHEMA "My Schema";
CREATE TABLE "My Schema"."Odd {op} Table" ("a,b" int PRIMARY KEY, "Weird Col" text, "x""y" int);
SELECT gateway.publish('"My Schema"."Odd {op} Table"', $$'odd:' || "Weird Col" || "x""y"$$);

CREATE TABLE public."非常に長い名前のテーブルで関数名が六十三バイトに収まるか確かめる" (id int PRIMARY KEY, k text);
SELECT gateway.publish('public."非常に長い名前のテーブルで関数名が六十三バイトに収まるか確かめる"', $$'k:' || k$$);

-- Enabled ALWAYS by an operator, then every table published again, as a migration would.
ALTER TABLE public.items ENABLE ALWAYS TRIGGER gateway_capture_update;
ALTER TABLE public.docs DISABLE TRIGGER gateway_capture_truncate;
SELECT gateway.republish_all();
"""


def _pg_dump() -> str:
    bin_dir = find_pg_bin()
    path = bin_dir / "pg_dump" if bin_dir else Path("pg_dump")
    return str(path)


@pytest.fixture
def two_databases(pg: Postgres) -> Iterator[tuple[str, str]]:
    names = [f"gw_chain_{uuid.uuid4().hex[:12]}", f"gw_base_{uuid.uuid4().hex[:12]}"]
    admin_sql(pg, *(f'CREATE DATABASE "{n}" TEMPLATE template0' for n in names))
    try:
        yield pg.dsn(names[0]), pg.dsn(names[1])
    finally:
        admin_sql(pg, *(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)' for n in names))


def catalog(dsn: str) -> dict[str, str]:
    """The schema-only dump of schema gateway, by object ("Name: ...; Type: ..."), normalised
    only where two dumps of equal schemas differ: the random key of \\restrict."""
    out = subprocess.run(
        [_pg_dump(), "--schema-only", "-n", "gateway", dsn],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    out = re.sub(r"^\\(un)?restrict .*$", r"\\\1restrict <key>", out, flags=re.M)
    blocks: dict[str, str] = {}
    for block in re.split(r"^--\n(?=-- Name: )", out, flags=re.M):
        first = block.split("\n", 1)[0]
        name = first.removeprefix("-- Name: ") if first.startswith("-- Name: ") else "(header)"
        assert name not in blocks, f"two objects dumped as {name}"
        blocks[name] = block
    return blocks


async def generated(dsn: str) -> dict[str, object]:
    """Per published table: its row in gateway.published, the definitions of the functions
    publish() generated for it, and its triggers (how they are enabled and defined). The
    table's oid (in the names of its transaction-local settings) is written as <oid>."""
    conn = await asyncpg.connect(dsn)
    try:
        result: dict[str, object] = {}
        for p in await conn.fetch("SELECT tbl, tbl::oid AS oid, * FROM gateway.published ORDER BY tbl::text"):
            oid = str(p["oid"])
            functions = await conn.fetch(
                "SELECT f::text AS name, pg_get_functiondef(f) AS def "
                "FROM gateway.generated_functions($1::oid) AS f ORDER BY 1",
                p["oid"],
            )
            triggers = await conn.fetch(
                "SELECT tgname, tgenabled, pg_get_triggerdef(oid) AS def FROM pg_trigger "
                "WHERE tgrelid = $1::oid AND NOT tgisinternal ORDER BY tgname",
                p["oid"],
            )
            result[str(p["tbl"])] = {
                "published": (p["key_column"], p["topic"], p["row_topic"]),
                "functions": {
                    f["name"]: f["def"].replace(f"rows_left_{oid}_", "rows_left_<oid>_") for f in functions
                },
                "triggers": [tuple(t) for t in triggers],
            }
        return result
    finally:
        await conn.close()


async def test_baseline_builds_the_schema_the_chain_built(two_databases: tuple[str, str]) -> None:
    chain_dsn, baseline_dsn = two_databases
    chain_files = sorted(p.name for p in CHAIN.glob("*.sql"))
    baseline_files = sorted(p.name for p in BASELINE.glob("*.sql"))
    assert chain_files[0] == "001_event_log.sql" and len(chain_files) == 17
    assert await migrate(chain_dsn, directory=CHAIN) == chain_files
    assert await migrate(baseline_dsn, directory=BASELINE) == baseline_files

    chain, baseline = catalog(chain_dsn), catalog(baseline_dsn)
    for name in list(chain) + list(baseline):
        if name.startswith(NOT_COMPARED):
            chain.pop(name, None)
            baseline.pop(name, None)
    assert sorted(baseline) == sorted(chain)
    for name in chain:
        assert baseline[name] == chain[name], name
    assert len(chain) > 60  # every function, table, index, trigger and owner of the schema

    # Rows the schema needs: the installation's salt and the relay's lease.
    for dsn in (chain_dsn, baseline_dsn):
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM gateway.installation") == 1
            assert await conn.fetchval("SELECT count(*) FROM gateway.relay") == 1
        finally:
            await conn.close()


async def test_baseline_publish_generates_what_the_chain_generated(two_databases: tuple[str, str]) -> None:
    chain_dsn, baseline_dsn = two_databases
    await migrate(chain_dsn, directory=CHAIN)
    await migrate(baseline_dsn, directory=BASELINE)
    for dsn in two_databases:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(TABLES)
        finally:
            await conn.close()

    chain, baseline = await generated(chain_dsn), await generated(baseline_dsn)
    assert len(chain) == 11
    assert list(baseline) == list(chain)
    for table, made in chain.items():
        assert isinstance(made, dict)
        assert len(made["functions"]) == 5, table  # topic, row_topic, three row triggers
        assert len(made["triggers"]) == 4, table  # insert, update, delete, truncate
        assert baseline[table] == made, table
