"""The database side: the server (and a database of the run's own), schema, writers at a target
rate, the bare LISTEN ceiling, the writer cost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import tempfile
import time
import uuid
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from gateway.dev.pgcluster import ExistingPostgres, Postgres, start_throwaway
from gateway.migrate import migrate

# ~200-byte event frames: the row is {"id":..,"topic":..,"sent_at":..,"body":"<BODY>"}.
BODY = "x" * 24
COST_ROWS = 1000
COST_TOPICS = 100

SCHEMA = f"""
DROP TABLE IF EXISTS lt_items, lt_cost_plain, lt_cost_gateway, lt_cost_two_topics, lt_cost_naive;
CREATE TABLE lt_items (
    id bigserial PRIMARY KEY,
    topic text NOT NULL,
    sent_at double precision NOT NULL,  -- the writer's time.time() when it sent the commit
    body text NOT NULL
);
SELECT gateway.publish('public.lt_items', $$'t:' || topic$$);

-- Writer cost: the same single-row UPDATE on four identical tables.
CREATE TABLE lt_cost_plain (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0);
CREATE TABLE lt_cost_gateway (LIKE lt_cost_plain INCLUDING ALL);
CREATE TABLE lt_cost_two_topics (LIKE lt_cost_plain INCLUDING ALL);
CREATE TABLE lt_cost_naive (LIKE lt_cost_plain INCLUDING ALL);
INSERT INTO lt_cost_plain (id) SELECT generate_series(1, {COST_ROWS});
INSERT INTO lt_cost_gateway (id) SELECT generate_series(1, {COST_ROWS});
INSERT INTO lt_cost_two_topics (id) SELECT generate_series(1, {COST_ROWS});
INSERT INTO lt_cost_naive (id) SELECT generate_series(1, {COST_ROWS});
-- The gateway's capture trigger; rows spread over {COST_TOPICS} topics like per-user topics.
SELECT gateway.publish('public.lt_cost_gateway', $$'c:' || (id % {COST_TOPICS})$$);
-- The same rows on two topics each (docs/sql.md, "A row on several topics"): an owner's and a team's.
SELECT gateway.publish(
    'public.lt_cost_two_topics', $$ARRAY['c:' || (id % {COST_TOPICS}), 'team:' || (id % 10)]$$
);
-- The seed tutorial's trigger: one NOTIFY per row carrying the whole row as JSON.
CREATE OR REPLACE FUNCTION lt_naive_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('lt_naive', row_to_json(NEW)::text);
    RETURN NEW;
END $$;
CREATE TRIGGER lt_naive AFTER INSERT OR UPDATE ON lt_cost_naive FOR EACH ROW EXECUTE FUNCTION lt_naive_notify();
"""


# --- the server ---------------------------------------------------------------------------


async def open_server(prefix: str, *, fast: bool) -> tuple[Postgres, str, str | None]:
    """The PostgreSQL a run uses, a DSN of a database of the run's own in it, and the database
    to drop after it (``drop_database``), None when the whole server is the run's.

    With ``DATABASE_URL`` set: that server, in a new database ``<prefix>_<pid>_<random>``, so
    that a run never writes into a database someone uses. Otherwise a throwaway cluster,
    durable (fsync on) unless ``fast``. Raises PostgresUnavailable when neither can be had.
    """
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        server: Postgres = ExistingPostgres(url)
        name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        await create_database(server, name)
        return server, server.dsn(name), name
    server = await asyncio.to_thread(start_throwaway, fast=fast)
    return server, server.dsn("postgres"), None


async def create_database(server: Postgres, name: str) -> None:
    await _maintenance(server, f'CREATE DATABASE "{name}"')


async def drop_database(server: Postgres, name: str) -> None:
    """Drop a database of the run's own, ending the sessions still in it (WITH FORCE)."""
    await _maintenance(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _maintenance(server: Postgres, statement: str) -> None:
    """Run a statement on the server's ``postgres`` database (one outside every run's own)."""
    conn = await asyncpg.connect(server.dsn("postgres"))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


# --- the schema ---------------------------------------------------------------------------


async def prepare(dsn: str) -> str:
    """Migrate and create the benchmark tables; returns the server version."""
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA)
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


async def heads(dsn: str, topics: list[str]) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT topic, pos FROM gateway.heads($1::text[])", topics)
        return {r["topic"]: r["pos"] for r in rows}
    finally:
        await conn.close()


# --- writers ------------------------------------------------------------------------------


@dataclass
class WriteResult:
    commits: int = 0
    seconds: float = 0.0
    commit_times: array[float] = field(default_factory=lambda: array("d"))  # when each commit returned
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.commits / self.seconds if self.seconds else 0.0


class Writers:
    """``n`` asyncpg connections inserting rows into lt_items through the real trigger path."""

    def __init__(self, dsn: str, n: int) -> None:
        self.dsn = dsn
        self.n = n
        self.conns: list[asyncpg.Connection] = []
        self.committed = 0  # for progress

    async def open(self) -> None:
        self.conns = [await asyncpg.connect(self.dsn) for _ in range(self.n)]

    async def close(self) -> None:
        for c in self.conns:
            await c.close(timeout=5)
        self.conns = []

    async def run(
        self, topics: list[str], rate: float | None, seconds: float, rows: int = 1, table: str = "lt_items"
    ) -> WriteResult:
        """Commit statements round-robin over ``topics`` at ``rate`` per second (None: as fast as
        possible) for ``seconds``, each inserting ``rows`` rows into one topic of ``table`` (lt_items,
        or the naive baseline's copy of it). A writer that falls
        behind its schedule does not sleep, so the achieved rate shows saturation rather than
        hiding it."""
        result = WriteResult()
        start = time.monotonic()
        end = start + seconds
        interval = self.n / rate if rate else 0.0
        names = [t.removeprefix("t:") for t in topics]

        async def one(i: int, conn: asyncpg.Connection) -> None:
            k = 0
            stmt = await conn.prepare(
                f"INSERT INTO {table} (topic, sent_at, body) VALUES ($1, $2, $3)"
                if rows == 1
                else f"INSERT INTO {table} (topic, sent_at, body) SELECT $1, $2, $3 FROM generate_series(1, {int(rows)})"
            )
            while True:
                slot = start + (i / self.n) * interval + k * interval
                now = time.monotonic()
                if slot >= end or now >= end:
                    return
                if slot > now:
                    await asyncio.sleep(slot - now)
                topic = names[(k * self.n + i) % len(names)]
                k += 1
                try:
                    await stmt.fetch(topic, time.time(), BODY)
                except (asyncpg.PostgresError, OSError) as exc:
                    result.errors.append(f"{type(exc).__name__}: {exc}")
                    if len(result.errors) > 100:
                        return
                    continue
                result.commits += 1
                self.committed += 1
                result.commit_times.append(time.time())

        await asyncio.gather(*(one(i, c) for i, c in enumerate(self.conns)))
        result.seconds = time.monotonic() - start
        return result


# --- baseline (a): the rate one bare LISTEN connection keeps up with ------------------------


async def bare_listen_ceiling(dsn: str, writers: int, seconds: float) -> dict[str, Any]:
    """``writers`` connections NOTIFY as fast as they can for ``seconds``; one bare asyncpg
    listener counts what it receives. The payload has the size of a one-event doorbell."""
    listener = await asyncpg.connect(dsn)
    received = 0
    last_at = 0.0

    def on_notify(*_: object) -> None:
        nonlocal received, last_at
        received += 1
        last_at = time.monotonic()

    await listener.add_listener("lt_bare", on_notify)
    payload = '{"v":1,"tb":"public.lt_items","ev":[["t:u123","0a1b2c3d",123456,"i","123456"]]}'
    conns = [await asyncpg.connect(dsn) for _ in range(writers)]
    sent = 0
    start = time.monotonic()
    end = start + seconds

    async def one(conn: asyncpg.Connection) -> None:
        nonlocal sent
        stmt = await conn.prepare("SELECT pg_notify('lt_bare', $1)")
        while time.monotonic() < end:
            await stmt.fetch(payload)
            sent += 1

    try:
        await asyncio.gather(*(one(c) for c in conns))
        sent_seconds = time.monotonic() - start
        deadline = time.monotonic() + 10
        while received < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        for c in conns:
            await c.close()
        await listener.close()
    span = (last_at - start) if last_at > start else sent_seconds
    return {
        "writers": writers,
        "seconds": round(sent_seconds, 2),
        "sent": sent,
        "received": received,
        "sent_per_s": round(sent / sent_seconds, 1),
        "received_per_s": round(received / max(span, sent_seconds), 1),
        "drain_lag_s": round(max(0.0, span - sent_seconds), 3),
    }


# --- writer cost -----------------------------------------------------------------------------

_TPS = re.compile(r"tps = ([0-9.]+) \((?:without initial connection time|excluding connections establishing)")


def _pgbench(pgbench: str, dsn: str, table: str, clients: int, seconds: int, options: str = "") -> float:
    parts = urlsplit(dsn)
    script = f"\\set id random(1, {COST_ROWS})\nUPDATE {table} SET n = n + 1 WHERE id = :id;\n"
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
        path = f.name
    try:
        cmd = [
            pgbench,
            "-n",
            "-c",
            str(clients),
            "-j",
            str(min(clients, 2)),
            "-T",
            str(seconds),
            "-f",
            path,
            "-h",
            parts.hostname or "127.0.0.1",
            "-p",
            str(parts.port or 5432),
            "-U",
            parts.username or "postgres",
            parts.path.lstrip("/"),
        ]
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
        if parts.password:
            env["PGPASSWORD"] = parts.password
        if options:
            env["PGOPTIONS"] = options
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, env=env, check=False)
    finally:
        Path(path).unlink(missing_ok=True)
    m = _TPS.search(out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"pgbench on {table} failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return float(m.group(1))


async def _asyncpg_tps(dsn: str, table: str, clients: int, seconds: float) -> float:
    conns = [await asyncpg.connect(dsn) for _ in range(clients)]
    count = 0
    end = time.monotonic() + seconds

    async def one(i: int, conn: asyncpg.Connection) -> None:
        nonlocal count
        stmt = await conn.prepare(f"UPDATE {table} SET n = n + 1 WHERE id = $1")
        k = i
        while time.monotonic() < end:
            await stmt.fetch(k % COST_ROWS + 1)
            k += 7919
            count += 1

    start = time.monotonic()
    try:
        await asyncio.gather(*(one(i, c) for i, c in enumerate(conns)))
    finally:
        for c in conns:
            await c.close()
    return count / (time.monotonic() - start)


async def _settle(dsn: str) -> None:
    """Start every writer-cost run from the same state. The runs before leave dead rows, which
    autovacuum would otherwise clean up during some later run, slowing that one alone; and the
    first change to each page after a checkpoint also writes the whole page to the WAL, so a
    run that a timed checkpoint happens to precede pays more than the others."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "VACUUM lt_cost_plain, lt_cost_gateway, lt_cost_two_topics, lt_cost_naive, gateway.topics, gateway.events"
        )
        # Superusers and (PostgreSQL 15+) members of pg_checkpoint only; without it the runs
        # are merely noisier.
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def writer_cost(
    dsn: str,
    pgbench: str | None,
    clients: int,
    seconds: int,
    rounds: int,
    progress: Any,
    flush_delay_us: int = 0,
    flush_wait: bool = True,
) -> dict[str, Any]:
    """Commits/s of a single-row UPDATE without a trigger, with the gateway's capture trigger (the
    row on one topic, and on two), and with the naive per-row pg_notify(row_to_json(NEW)) trigger.

    This machine's speed drifts by a fifth from second to second (other tenants of the host),
    more than the differences measured. So each round runs the tables back to back, in
    alternating order (plain, gateway, two topics, naive; then the reverse), each ratio is taken
    within its round, where the three ran under about the same conditions, and the result is
    the median of the rounds' ratios: a round disturbed by a neighbour does not decide.

    ``flush_delay_us`` makes every commit's WAL flush take that much longer (PostgreSQL's
    commit_delay, set for pgbench's sessions), as on a disk slower than this machine's: that
    is where notifying transactions, which commit one at a time, fall behind the others.

    ``flush_wait=False`` sets synchronous_commit off in pgbench's sessions: commits no longer
    wait for the disk at all, so the ratio is that of CPU alone, the least favourable to the
    trigger and the same on any disk (the ratio at this machine's own flush lies between the
    two, by how much of a commit is spent waiting for the disk)."""
    options = f"-c commit_delay={flush_delay_us} -c commit_siblings=1" if flush_delay_us else ""
    if not flush_wait:
        options = (options + " -c synchronous_commit=off").strip()
    tables = {
        "plain": "lt_cost_plain",
        "gateway": "lt_cost_gateway",
        "two_topics": "lt_cost_two_topics",
        "naive": "lt_cost_naive",
    }
    runs: dict[str, list[float]] = {k: [] for k in tables}
    tool = "pgbench" if pgbench else "asyncpg"
    for r in range(rounds):
        for name in list(tables)[:: 1 if r % 2 == 0 else -1]:
            progress(f"writer cost round {r + 1}/{rounds}: {name} ({tool}, {clients} clients, {seconds}s)")
            await _settle(dsn)
            if pgbench:
                tps = await asyncio.to_thread(_pgbench, pgbench, dsn, tables[name], clients, seconds, options)
            else:
                tps = await _asyncpg_tps(dsn, tables[name], clients, seconds)
            runs[name].append(tps)
    ratios = {
        k: [round(x / p, 3) if p else 0.0 for x, p in zip(runs[k], runs["plain"], strict=True)]
        for k in ("gateway", "two_topics", "naive")
    }
    return {
        "tool": tool,
        "flush_delay_us": flush_delay_us,
        "synchronous_commit": "on" if flush_wait else "off",
        "clients": clients,
        "seconds_per_run": seconds,
        "rounds": rounds,
        "statement": "UPDATE <table> SET n = n + 1 WHERE id = random(1, 1000)",
        "tps": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "tps_median": {k: round(statistics.median(v), 1) for k, v in runs.items()},
        "ratios": ratios,
        "ratio_gateway": statistics.median(ratios["gateway"]),
        "ratio_two_topics": statistics.median(ratios["two_topics"]),
        "ratio_naive": statistics.median(ratios["naive"]),
    }
