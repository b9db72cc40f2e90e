"""``python -m loadtest``: run the scenarios and baselines, write the report, print the bar."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.dev.pgcluster import LocalCluster, PostgresUnavailable

from . import db, report, rooms, scale
from .scenarios import Plan, Progress, Runner
from .sysinfo import describe, loadavg, pgbench_path, raise_nofile

REPO = Path(__file__).resolve().parent.parent
# rooms: rooms talking beside the row path (loadtest/rooms.py)
SCENARIOS = ("notify", "fanout", "scoped", "ramp", "idle", "churn", "rooms")
# Run after the scenarios, into the result's "baseline" and "curve" (loadtest/compare.py); "all"
# runs the baseline but not the curve (eight gateway runs: on request).
COMPARISONS = ("baseline", "curve")

FULL = Plan(
    clients=1000,
    workers=2,
    writers=4,
    duration=15.0,
    fanout_rate=20.0,
    scoped_rate=200.0,
    churn_rate=50.0,
    churn_clients=200,
    churn_life=(1.0, 3.0),
    idle_clients=10000,
    ramp_start=50.0,
    ramp_step=5.0,
    ramp_max_steps=8,
    ramp_half=10.0,
    ramp_flat=5.0,
    p99_break_ms=100.0,
    floor_clients=1000,
    floor_frames=300,
    bare_seconds=5.0,
    cost_seconds=4,
    cost_rounds=7,
    cost_clients=4,
    procs=2,
    idle_procs=4,
    sync_timeout=30.0,
)

SMOKE = Plan(
    clients=4,
    workers=2,
    writers=2,
    duration=1.5,
    fanout_rate=20.0,
    scoped_rate=20.0,
    churn_rate=20.0,
    churn_clients=4,
    churn_life=(0.2, 0.6),
    idle_clients=20,
    ramp_start=20.0,
    ramp_step=1.0,
    ramp_max_steps=2,
    ramp_half=1.0,
    ramp_flat=1.0,
    p99_break_ms=1000.0,
    floor_clients=4,
    floor_frames=30,
    bare_seconds=1.0,
    cost_seconds=1,
    cost_rounds=1,
    cost_clients=2,
    procs=1,
    idle_procs=1,
    sync_timeout=15.0,
    rooms=2,
    room_size=3,
    room_presence_every=0.5,
    room_row_clients=2,
    room_procs=1,
)


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, not {text!r}")
        return value

    return parse


NAMES = (*SCENARIOS, *scale.SCALE_SCENARIOS, *COMPARISONS, "all")


def _scenarios(text: str) -> tuple[str, ...]:
    """``notify,fanout`` → ("notify", "fanout"): each name known, none twice, "all" alone."""
    names = tuple(n.strip() for n in text.split(","))
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scenario {unknown[0]!r}: choose from {', '.join(NAMES)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a scenario is named twice in {text!r}")
    if "all" in names and len(names) > 1:
        raise argparse.ArgumentTypeError("all already runs every scenario: name it alone")
    return names


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="End-to-end load test of the gateway on this machine; writes JSON and HTML to --out.",
    )
    ap.add_argument(
        "--scenario",
        type=_scenarios,
        default=("all",),
        metavar="{" + ",".join(NAMES) + "}",
        help=(
            "what to run, one name or several separated by commas, e.g. notify,fanout (default all:"
            " every scenario and the baseline; with --smoke, all leaves out crowd, storm and"
            " replicas; curve: the relay's latency knob)"
        ),
    )
    ap.add_argument(
        "--skip-writer-cost",
        action="store_true",
        help=(
            "do not measure the writer cost (about 3.5 minutes, run before the first live scenario);"
            " the report then says it was not run"
        ),
    )
    ap.add_argument("--duration", type=_positive(float), help="seconds of writes per scenario (default 15)")
    ap.add_argument(
        "--clients", type=_positive(int), help="WebSocket clients in fanout, scoped, ramp (default 1000)"
    )
    ap.add_argument(
        "--idle-clients", type=_positive(int), help="connections in the idle scenario (default 10000)"
    )
    ap.add_argument("--workers", type=_positive(int), help="gateway worker processes (default 2)")
    ap.add_argument("--writers", type=_positive(int), help="writer connections (default 4)")
    ap.add_argument(
        "--rate", type=_positive(float), help="commits/s in fanout, scoped and churn (default 20, 200, 50)"
    )
    ap.add_argument("--crowd-connections", type=_positive(int), help="connections in crowd (default 50000)")
    ap.add_argument("--storm-clients", type=_positive(int), help="clients in storm (default 10000)")
    ap.add_argument("--smoke", action="store_true", help="a few seconds of every scenario at tiny scale")
    ap.add_argument("--out", type=Path, default=REPO / "loadtest" / "report", help="report directory")
    return ap


def make_plan(args: argparse.Namespace) -> Plan:
    plan = SMOKE if args.smoke else FULL
    changes: dict[str, Any] = {}
    if args.clients:
        changes.update(clients=args.clients, floor_clients=args.clients, churn_clients=min(args.clients, 200))
    if args.idle_clients:
        changes["idle_clients"] = args.idle_clients
    if args.workers:
        changes["workers"] = args.workers
    if args.writers:
        changes["writers"] = args.writers
    if args.duration:
        d = args.duration
        changes.update(
            duration=d, ramp_step=max(1.0, d / 3), ramp_half=max(1.0, d * 2 / 3), ramp_flat=max(1.0, d / 3)
        )
    if args.rate:
        changes.update(fanout_rate=args.rate, scoped_rate=args.rate, churn_rate=args.rate)
    plan = dataclasses.replace(plan, **changes)
    # The floor writes as many frames, at the same rate, as the fanout scenario commits.
    return dataclasses.replace(plan, floor_frames=max(10, int(plan.fanout_rate * plan.duration)))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    soft, hard = raise_nofile()
    plan = make_plan(args)
    # Each gateway worker and each client process holds its share of the sockets.
    need = max(plan.clients, plan.idle_clients // min(plan.idle_procs, plan.workers)) + 500
    if soft < need:
        print(
            f"loadtest: the open-files limit is {soft} (hard {hard}) but a process needs about {need} "
            "sockets; raise the hard limit (`ulimit -Hn`) or pass fewer --clients / --idle-clients.",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m loadtest " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        import uvloop

        return int(uvloop.run(run(args, plan, command.strip())))
    except ImportError:
        return asyncio.run(run(args, plan, command.strip()))


async def run(args: argparse.Namespace, plan: Plan, command: str) -> int:
    started = time.monotonic()
    progress = Progress()
    progress.done(f"loadtest: {'smoke' if args.smoke else 'full'} run, report in {args.out}")
    try:
        # Durable settings (fsync on): the writer cost and commit rates mean what they say.
        server, dsn, own_db = await db.open_server("loadtest", fast=False)
    except PostgresUnavailable as exc:
        print(f"loadtest: no PostgreSQL: {exc}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {
        "command": command,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "plan": dataclasses.asdict(plan),
        "postgres": {"kind": server.kind, "durable": not getattr(server, "fast", False)},
        "baselines": {},
        "scenarios": {},
        "errors": {},
        "machine": describe("unknown"),
    }
    runner: Runner | None = None
    try:
        version = await db.prepare(dsn)
        result["machine"] = describe(version)
        runner = Runner(dsn, plan, args.out, progress)
        await runner.writers.open()
        bin_dir = server.bin_dir if isinstance(server, LocalCluster) else None
        everything = args.scenario == ("all",)
        selected: tuple[str, ...] = (*SCENARIOS, "baseline") if everything else args.scenario
        if everything and not args.smoke:
            # The scale scenarios take minutes at full scale; a smoke run has a test of each.
            selected = (*SCENARIOS, *scale.SCALE_SCENARIOS, "baseline")
        sizes = {"crowd": args.crowd_connections, "storm": args.storm_clients}

        async def attempt(kind: str, name: str, coro: Any) -> None:
            try:
                value = await coro
            except Exception as exc:
                result["errors"][name] = f"{type(exc).__name__}: {exc}"
                progress.done(f"[{name}] FAILED: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                return
            result[kind][name] = value
            progress.done(f"[{name}] done")

        # Not for the baseline, the curve or the scale scenarios alone: they need no baseline.
        if any(name in SCENARIOS for name in selected):
            if not args.skip_writer_cost:
                await attempt("baselines", "writer_cost", runner.writer_cost(pgbench_path(bin_dir)))
            await attempt("baselines", "bare_listen", runner.bare_listen())
        for name in selected:
            if name in COMPARISONS:
                await _compare(name, dsn, plan, args, progress, result)
                continue
            if name in scale.SCALE_SCENARIOS:
                await attempt(
                    "scenarios", name, scale.run(name, server, args.smoke, args.out, progress, sizes)
                )
                continue
            if name == "rooms":  # its own module, which takes the runner (loadtest/rooms.py)
                await attempt("scenarios", name, rooms.run_rooms(runner))
                continue
            await attempt("scenarios", name, getattr(runner, name)())
            if name == "fanout":
                await attempt("baselines", "floor", runner.floor(plan.fanout_rate))
    finally:
        if runner is not None:
            await runner.writers.close()
        if own_db is not None:
            await db.drop_database(server, own_db)
        await asyncio.to_thread(server.stop)
    result["loadavg_end"] = loadavg()
    result["total_seconds"] = round(time.monotonic() - started, 1)
    result["bar"] = report.evaluate_bar(result) + scale.bar_lines(result)
    report.write_json(result, args.out / "loadtest.json")
    report.write_html(result, args.out / "loadtest.html")
    print()
    print(report.summary(result))
    print(
        f"\nreport: {args.out / 'loadtest.html'} and {args.out / 'loadtest.json'} ({result['total_seconds']:.0f} s)"
    )
    if result["errors"]:
        print("errors: " + "; ".join(f"{k}: {v}" for k, v in result["errors"].items()))
    status = exit_status(result, args.smoke)
    if status == 3:
        print("loadtest: a bar failed (exit status 3)")
    return status


def exit_status(result: dict[str, Any], smoke: bool) -> int:
    """1: a run failed, or lost or duplicated events; 3: a bar missed (the report is written
    first); else 0. A smoke run judges no timing (its performance lines are n/a), so it fails
    only on errors and lost or duplicated events."""
    if result["errors"]:
        return 1
    if any(s.get("lost") or s.get("duplicated") for s in result["scenarios"].values()):
        return 1
    # The gateway's runs beside the naive baseline, and the curve's (the naive server promises nothing).
    gateway_runs = [x["gateway"] for x in result.get("baseline", {}).get("loads", [])]
    gateway_runs += [p["gateway"] for p in result.get("curve", {}).get("points", [])]
    if any(g.get("lost") or g.get("duplicated") for g in gateway_runs):
        return 1
    if not smoke and any(b["verdict"] == "FAIL" for b in result["bar"]):
        return 3
    return 0


async def _compare(
    name: str, dsn: str, plan: Plan, args: argparse.Namespace, progress: Progress, result: dict[str, Any]
) -> None:
    """The baseline comparison or the curve, into result[name] (errors into result["errors"])."""
    from .compare import Compare

    try:
        cmp = Compare(dsn, plan, args.out, progress, args.smoke)
        result[name] = await (cmp.baseline() if name == "baseline" else cmp.curve())
    except Exception as exc:
        result["errors"][name] = f"{type(exc).__name__}: {exc}"
        progress.done(f"[{name}] FAILED: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        return
    progress.done(f"[{name}] done")
