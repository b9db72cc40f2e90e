"""What the capture triggers cost a writer, per row: ``python -m loadtest.trigger_cost``.

A throwaway PostgreSQL (gateway/dev/pgcluster.py, fsync off: commits are not measured), three
tables of the same shape: not published, published on one topic, published on two (a topic
expression giving an array, docs/sql.md "A row on several topics"). On one connection, N
single-row INSERT statements in one transaction (a DO block), for each table in turn, several
rounds; the best round per table is printed in microseconds per row. It measures the triggers'
work inside the writer's transaction, without commits and without contention.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import asyncpg

from gateway.dev.pgcluster import LocalCluster
from gateway.migrate import migrate

TABLES = {
    "not published": None,
    "one topic": "$$'user:' || owner_id$$",
    "two topics": "$$ARRAY['user:' || owner_id, 'team:' || team_id]$$",
}


async def measure(dsn: str, rows: int, rounds: int) -> dict[str, float]:
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        names = {}
        for i, (label, topic) in enumerate(TABLES.items()):
            name = f"cost_{i}"
            names[label] = name
            await conn.execute(
                f"CREATE TABLE {name} (id bigserial PRIMARY KEY, owner_id int, team_id int, title text)"
            )
            if topic is not None:
                await conn.execute(f"SELECT gateway.publish('{name}', {topic})")
        best: dict[str, float] = {}
        for _ in range(rounds):
            for label, name in names.items():
                sql = (
                    f"DO $$BEGIN FOR i IN 1..{rows} LOOP INSERT INTO {name} (owner_id, team_id, title) "
                    "VALUES (i % 1000, i % 100, 'x'); END LOOP; END$$"
                )
                start = time.perf_counter()
                await conn.execute(sql)
                per_row = (time.perf_counter() - start) / rows * 1e6
                best[label] = min(best.get(label, per_row), per_row)
        return best
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.trigger_cost", description=__doc__)
    parser.add_argument("--rows", type=int, default=5000, help="INSERT statements per round and table")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best is kept")
    args = parser.parse_args()
    with LocalCluster(fast=True) as pg:
        best = asyncio.run(measure(pg.dsn("postgres"), args.rows, args.rounds))
    for label, micros in best.items():
        print(f"{label:>14}: {micros:6.1f} µs per row")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
