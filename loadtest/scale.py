"""The scale scenarios inside ``python -m loadtest``: crowd, storm and replicas.

Each also runs alone (``python -m loadtest.crowd``, ``.storm``, ``.replicas``); here they share
the run's PostgreSQL, each in a database of its own, and report like the other scenarios
(``lost``, ``duplicated``, ``clients``, ``latency_ms``...) plus their own lines of the bar.
``--smoke`` runs them at tiny scale (crowd 300 connections, storm 200 clients, replicas 2
processes), where only their correctness lines are judged.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import uuid
from pathlib import Path
from typing import Any

from gateway.dev.pgcluster import LocalCluster, Postgres

from . import crowd, db, replicas, storm

SCALE_SCENARIOS = ("crowd", "storm", "replicas")
CROWD_BAR = 50_000  # connections the crowd's bar asks for
STORM_BAR = 10_000


async def _own_database(server: Postgres, name: str) -> str:
    await db.create_database(server, name)
    dsn = server.dsn(name)
    await db.prepare(dsn)
    return dsn


def _nats_path() -> str | None:
    return shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/bin")


async def run(
    name: str, server: Postgres, smoke: bool, out: Path, progress: Any, sizes: dict[str, int | None]
) -> dict[str, Any]:
    if name == "replicas":
        return await _replicas(server, smoke, out, progress)
    db_name = f"loadtest_{name}_{uuid.uuid4().hex[:8]}"
    dsn = await _own_database(server, db_name)
    try:
        if name == "crowd":
            size = crowd.SMOKE if smoke else crowd.Size()
            if n := sizes.get("crowd"):
                size = dataclasses.replace(size, connections=n)
            return await crowd.run(dsn, size, out, progress)
        s = storm.SMOKE if smoke else storm.Size()
        if n := sizes.get("storm"):
            s = dataclasses.replace(s, clients=n, topics=min(s.topics, n))
        return await storm.run(dsn, s, out, progress)
    finally:
        await db.drop_database(server, db_name)


async def _replicas(server: Postgres, smoke: bool, out: Path, progress: Any) -> dict[str, Any]:
    if not isinstance(server, LocalCluster):
        raise RuntimeError(
            "the replicas scenario measures PostgreSQL's CPU from /proc: it needs the throwaway cluster"
        )
    args = argparse.Namespace(
        replicas=2 if smoke else 8,
        clients=8 if smoke else 400,
        rate=50.0 if smoke else 200.0,
        seconds=2.0 if smoke else 15.0,
        pool_size=2,
    )
    engines = ["postgres", "nats"] if _nats_path() else ["postgres"]
    runs = {}
    for engine in engines:
        progress(f"[replicas] {args.replicas} gateway processes, engine {engine}")
        runs[engine] = await replicas.run_engine(server, engine, args, out)
    pg = runs["postgres"]
    return {
        "scenario": "replicas",
        "clients": args.clients,
        "replicas": args.replicas,
        "commits": pg["commits"],
        "commits_per_s": pg["commits_per_s"],
        "latency_ms": {"p50": pg["p50_ms"], "p99": pg["p99_ms"]},
        "engines": runs,
        "nats": "measured" if "nats" in runs else "not measured: nats-server not found",
        "lost": sum(r["lost"] for r in runs.values()),
        "duplicated": sum(r["duplicated"] for r in runs.values()),
    }


def bar_lines(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The scale scenarios' lines of the bar, in the shape of report.evaluate_bar's."""
    sc = r.get("scenarios", {})
    lines: list[dict[str, Any]] = []

    def line(name: str, value: Any, limit: str, ok: bool | None, detail: str) -> None:
        verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        lines.append(
            {"criterion": name, "value": value, "limit": limit, "verdict": verdict, "detail": detail}
        )

    c = sc.get("crowd")
    if c:
        n = c["clients"]
        held = c["connect_default"]["connected"]
        line(
            "crowd: connections held, each subscribed",
            held,
            f">= {CROWD_BAR:,} with lost 0",
            (held >= CROWD_BAR and c["lost"] == 0 and not c["behind_at_end"]) if n >= CROWD_BAR else None,
            f"{c['workers']} workers, {c['client_processes']} client processes; connects/s "
            f"{c['connect_default']['connects_per_s']} (GATEWAY_CONNECT_RATE default), "
            f"{c['connect_raised']['connects_per_s']} (raised to {c['connect_raised']['gateway_connect_rate']}); "
            f"{c['kb_per_connection']} KB per connection; fan-out p50 {c['latency_ms'].get('p50')} ms, "
            f"p99 {c['latency_ms'].get('p99')} ms"
            + ("" if n >= CROWD_BAR else f" (fewer than {CROWD_BAR:,}: indicative only)"),
        )
    s = sc.get("storm")
    if s:
        line(
            "storm: every client of the drained replica resubscribed, recovered",
            f"{s['resubscribed']}/{s['moved']}, not recovered {s['not_recovered']}",
            "all, recovered: true",
            bool(s["storm_complete"] and s["not_recovered"] == 0 and s["closed_twice"] == 0),
            f"99 % after {s['resubscribed_99pct_s']} s, 100 % after {s['resubscribed_100pct_s']} s; survivor's own "
            f"clients p99 {s['survivor_latency_ms_before'].get('p99')} ms before, "
            f"{s['survivor_latency_ms_during'].get('p99')} ms during"
            + ("" if s["clients"] >= STORM_BAR else f" ({s['clients']} clients, fewer than {STORM_BAR:,})"),
        )
    return lines
