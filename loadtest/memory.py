"""``python -m loadtest.memory``: what one idle, authenticated, subscribed connection costs the
gateway in memory.

For each connection count (``--connections 1000,5000,10000``), each presence setting and each
run, it starts a fresh gateway (``--workers 1``, one process, so nothing is shared or split),
reads its memory, connects that many clients from ``--procs`` separate client processes
(token in the upgrade request, one ``subscribe`` to a topic of its own each), waits
``--settle`` seconds, and reads the memory again:

- RSS: VmRSS from /proc/PID/status, as ``make loadtest``'s idle scenario reads it;
- USS and PSS: from /proc/PID/smaps_rollup (USS = Private_Clean + Private_Dirty: what the
  process alone holds; PSS adds its share of pages shared with other processes).

Each is given as the difference ÷ connections, in KB (KiB, like the bar). With ``--runs 3``
the median of the three is printed too. ``--tracemalloc`` runs the gateway under
``loadtest.memtrace`` instead and prints which lines of code allocated the difference
(tracemalloc's own bookkeeping inflates RSS then, so those runs' RSS is not comparable).

With ``DATABASE_URL`` set it uses that server (in a database of its own, dropped after);
otherwise a throwaway cluster. ``--json PATH`` writes every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.dev.pgcluster import PostgresUnavailable

from . import db
from .fleet import Fleet
from .gw import SECRET, GatewayProcess
from .sysinfo import raise_nofile, rss_kb


def smaps_rollup(pid: int) -> dict[str, int]:
    """Rss, Pss, Uss (Private_Clean + Private_Dirty) and Anonymous of a process, in KiB."""
    fields: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        return {"rss": rss_kb(pid), "pss": 0, "uss": 0, "anon": 0}
    return {
        "rss": fields.get("Rss", 0),
        "pss": fields.get("Pss", 0),
        "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
        "anon": fields.get("Anonymous", 0),
    }


# Allocations of tracemalloc's own snapshot machinery and of imports are not the connections'.
_NOT_CONNECTIONS = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
)


def _where(frame: tracemalloc.Frame) -> str:
    """A path short enough to read: from the package directory on."""
    name = frame.filename
    for marker in ("site-packages/", "/lib/python3"):
        if marker in name:
            name = name.split(marker, 1)[1]
            break
    else:
        name = os.path.relpath(name) if name.startswith("/") else name
    return f"{name}:{frame.lineno}"


def trace_difference(before: Path, after: Path, n: int, top: int) -> dict[str, Any]:
    """What was allocated between two snapshots and is still alive, per connection: by the
    line that allocated it, by file, and by the full stack of the biggest."""
    s0 = tracemalloc.Snapshot.load(str(before)).filter_traces(_NOT_CONNECTIONS)
    s1 = tracemalloc.Snapshot.load(str(after)).filter_traces(_NOT_CONNECTIONS)
    out: dict[str, Any] = {}
    total = sum(st.size_diff for st in s1.compare_to(s0, "filename"))
    out["total_bytes_per_connection"] = round(total / n, 1)
    for key in ("lineno", "filename"):
        stats = s1.compare_to(s0, key)[:top]
        out[f"by_{key}"] = [
            {
                "where": _where(st.traceback[0]),
                "bytes_per_connection": round(st.size_diff / n, 1),
                "blocks_per_connection": round(st.count_diff / n, 2),
            }
            for st in stats
        ]
    stacks = s1.compare_to(s0, "traceback")[: max(5, top // 2)]
    out["stacks"] = [
        {
            "bytes_per_connection": round(st.size_diff / n, 1),
            "blocks_per_connection": round(st.count_diff / n, 2),
            "stack": [_where(f) for f in st.traceback],
        }
        for st in stacks
    ]
    return out


def _log_size(gw: GatewayProcess) -> int:
    try:
        return gw.log_path.stat().st_size
    except OSError:
        return 0


def _log_since(gw: GatewayProcess, offset: int) -> str:
    with open(gw.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


async def _signal_and_wait(gw: GatewayProcess, path: Path, timeout: float = 120.0) -> None:
    assert gw.proc is not None
    # The log is appended to across runs with the same label: only what follows counts.
    offset = await asyncio.to_thread(_log_size, gw)
    os.kill(gw.proc.pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    # The snapshot is complete once the log line naming it is written (after dump returned).
    while f"snapshot {path}" not in await asyncio.to_thread(_log_since, gw, offset):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway wrote no tracemalloc snapshot {path} within {timeout:.0f}s")
        await asyncio.sleep(0.2)


async def measure(
    dsn: str,
    n: int,
    presence: bool,
    procs: int,
    settle: float,
    out: Path,
    label: str,
    trace: int = 0,
) -> dict[str, Any]:
    """One gateway, ``n`` idle subscribed clients: its memory before and after, per connection."""
    gw = GatewayProcess(dsn, 1, out / f"gateway-{label}.log", presence=presence)
    # No connect rate limit: how fast they arrive is not what is measured here.
    gw.env["GATEWAY_CONNECT_RATE"] = "0"
    snap = out / f"tracemalloc-{label}"
    if trace:
        gw.module = "loadtest.memtrace"
        gw.env["LOADTEST_TRACEMALLOC_OUT"] = str(snap)
        gw.env["LOADTEST_TRACEMALLOC_FRAMES"] = str(trace)
    await gw.start(timeout=120)  # a loaded machine, or tracemalloc, makes the start slow
    try:
        await asyncio.sleep(1.0)
        pid = gw.worker_pids()[0]
        m0 = smaps_rollup(pid)
        if trace:
            await _signal_and_wait(gw, Path(f"{snap}.1"))
        clients = [(f"m{i}", f"t:m{i}") for i in range(n)]
        fleet = Fleet(gw.ws_url, SECRET, clients, procs, "idle")
        try:
            t = time.monotonic()
            await fleet.start(300)
            connect_s = time.monotonic() - t
            # Let the process settle: upgrade-time garbage freed, the subscribe joins done.
            await asyncio.sleep(settle)
            m1 = smaps_rollup(pid)
            if trace:
                await _signal_and_wait(gw, Path(f"{snap}.2"))
            rows, _ = await fleet.finish({}, 5)
        finally:
            fleet.stop()
    finally:
        await gw.stop()
    result: dict[str, Any] = {
        "connections": n,
        "presence": presence,
        "connected": fleet.connected,
        "connect_seconds": round(connect_s, 1),
        "closed_by_server": sum(1 for r in rows if r["errors"]),
        "before_kb": m0,
        "after_kb": m1,
        **{f"{k}_kb_per_connection": round((m1[k] - m0[k]) / n, 2) for k in ("rss", "uss", "pss", "anon")},
    }
    if trace:
        result["tracemalloc"] = await asyncio.to_thread(_analyse, snap, n)
    return result


def _analyse(snap: Path, n: int) -> dict[str, Any]:
    """The two snapshots' difference; the snapshots themselves (tens of MB) are deleted."""
    try:
        return trace_difference(Path(f"{snap}.1"), Path(f"{snap}.2"), n, 80)
    finally:
        for i in (1, 2):
            Path(f"{snap}.{i}").unlink(missing_ok=True)


def _print_trace(t: dict[str, Any], top: int) -> None:
    print(f"    tracemalloc: {t['total_bytes_per_connection']:.0f} B per connection still allocated")
    print("    by line:")
    for row in t["by_lineno"][:top]:
        print(
            f"      {row['bytes_per_connection']:8.0f} B {row['blocks_per_connection']:6.2f} blocks  {row['where']}"
        )
    print("    by file:")
    for row in t["by_filename"][: top // 2]:
        print(f"      {row['bytes_per_connection']:8.0f} B  {row['where'].rsplit(':', 1)[0]}")


async def run(args: argparse.Namespace) -> int:
    # SIGTERM (or Ctrl-C) ends the run through the finally clauses below, so that the gateway,
    # the client processes and the throwaway cluster are stopped, not orphaned.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    try:
        # Memory does not depend on the disk: the fast (non-durable) throwaway is enough.
        server, dsn, own_db = await db.open_server("loadtest_mem", fast=True)
    except PostgresUnavailable as exc:
        print(f"loadtest.memory: no PostgreSQL: {exc}", file=sys.stderr)
        return 2
    results: list[dict[str, Any]] = []
    try:
        await db.prepare(dsn)
        for presence in args.presence:
            for n in args.connections:
                runs = []
                for i in range(args.runs):
                    label = f"{n}-{'presence' if presence else 'nopresence'}-{i + 1}"
                    r = await measure(
                        dsn, n, presence, args.procs, args.settle, args.out, label, args.tracemalloc
                    )
                    runs.append(r)
                    print(
                        f"{n:6d} connections, presence {'on ' if presence else 'off'}, run {i + 1}: "
                        f"RSS {r['rss_kb_per_connection']:6.2f} KB  USS {r['uss_kb_per_connection']:6.2f} KB  "
                        f"PSS {r['pss_kb_per_connection']:6.2f} KB per connection "
                        f"(connected {r['connected']}, closed by the server {r['closed_by_server']}, "
                        f"{r['connect_seconds']}s to connect)",
                        flush=True,
                    )
                    if "tracemalloc" in r:
                        _print_trace(r["tracemalloc"], args.top)
                summary = {
                    "connections": n,
                    "presence": presence,
                    "runs": runs,
                    **{
                        f"median_{k}_kb_per_connection": statistics.median(
                            r[f"{k}_kb_per_connection"] for r in runs
                        )
                        for k in ("rss", "uss", "pss")
                    },
                }
                results.append(summary)
                if args.runs > 1:
                    print(
                        f"{n:6d} connections, presence {'on ' if presence else 'off'}, median of {args.runs}: "
                        f"RSS {summary['median_rss_kb_per_connection']:6.2f} KB  "
                        f"USS {summary['median_uss_kb_per_connection']:6.2f} KB  "
                        f"PSS {summary['median_pss_kb_per_connection']:6.2f} KB",
                        flush=True,
                    )
    finally:
        if own_db is not None:
            await db.drop_database(server, own_db)
        server.stop()
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=1))
    closed = sum(r["closed_by_server"] for s in results for r in s["runs"])
    if closed:
        print(
            f"loadtest.memory: the gateway closed {closed} connections during the measurement",
            file=sys.stderr,
        )
        return 1
    return 0


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated connection counts, got {text!r}"
        ) from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"connection counts must be at least 1, got {text!r}")
    return counts


def _presence(text: str) -> list[bool]:
    choices = {"off": [False], "on": [True], "both": [False, True]}
    if text not in choices:
        raise argparse.ArgumentTypeError(f"--presence takes off, on or both, not {text!r}")
    return choices[text]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.memory",
        description="Gateway memory per idle, authenticated, subscribed connection (one worker).",
    )
    ap.add_argument(
        "--connections",
        type=_counts,
        default=[1000, 5000, 10000],
        help="comma-separated counts (1000,5000,10000)",
    )
    ap.add_argument("--presence", type=_presence, default=[False, True], help="off, on or both (both)")
    ap.add_argument("--runs", type=int, default=1, help="fresh gateways per count; the median is printed (1)")
    ap.add_argument("--procs", type=int, default=4, help="client processes (4)")
    ap.add_argument(
        "--settle", type=float, default=3.0, help="seconds between the last subscribe and the reading (3)"
    )
    ap.add_argument(
        "--tracemalloc",
        type=int,
        default=0,
        metavar="FRAMES",
        help="trace allocations with FRAMES frames each and print where the bytes went (0: off)",
    )
    ap.add_argument("--top", type=int, default=20, help="lines of the tracemalloc breakdown to print (20)")
    ap.add_argument(
        "--out", type=Path, default=Path("loadtest/report"), help="directory for the gateway logs"
    )
    ap.add_argument("--json", type=Path, default=None, help="write every number to this file")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.procs < 1 or args.settle < 0:
        print("loadtest.memory: --runs and --procs must be at least 1, --settle at least 0", file=sys.stderr)
        return 2
    soft, hard = raise_nofile()
    need = max(args.connections) + 500
    if soft < need:
        print(
            f"loadtest.memory: the open-files limit is {soft} (hard {hard}) but the gateway needs about "
            f"{need} descriptors; raise the hard limit (`ulimit -Hn`) or pass fewer --connections.",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(run(args))
        return int(uvloop.run(run(args)))
    except asyncio.CancelledError:
        print("loadtest.memory: stopped (SIGTERM); the gateway and the clients were stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
