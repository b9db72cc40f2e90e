"""The gateway beside the naive baseline (loadtest/naive.py), and what each costs PostgreSQL.

Each load runs twice in a row, with the same client processes' code, table shape, writers and
rate: first one gateway process (``--workers 1``, presence off), then the naive server (one
process too). For each: commit-to-client latency over every delivery, the server's CPU per
delivery, and PostgreSQL's CPU per commit (loadtest/pgcpu.py: the postmaster and all its
children, autovacuum and reaped backends included) over the window from the first write to
the last delivery. Then the fixed cost: PostgreSQL's CPU per second with one idle gateway
process connected, minus that of the cluster alone.

``curve`` runs the 200-commit/s load once per setting of the relay's latency knobs
(GATEWAY_RELAY_POLL_INTERVAL, GATEWAY_RELAY_WAKE_RATE; gateway/relay.py) with the naive server
once as the reference: the trade-off between latency and the database's CPU.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from gateway.dev.pgcluster import free_port

from . import db, naive, pgcpu
from .fleet import Fleet
from .gw import SECRET, GatewayProcess
from .scenarios import Plan, Progress
from .stats import latency_summary
from .sysinfo import loadavg


@dataclass(frozen=True)
class Load:
    label: str
    clients: int  # all subscribed to one topic
    rate: float  # commits/s, one row each
    writers: int


# The loads of the targets (issue "Performance", section 2). Below them (--smoke, fewer
# --clients, shorter --duration) the numbers are printed but not judged.
LOADS = (Load("200/s", 200, 200.0, 4), Load("1000/s", 50, 1000.0, 8), Load("20/s", 10, 20.0, 2))
JUDGED_SECONDS = 5.0
# The relay's settings the curve tries at the 200/s load: (poll interval in ms, wake rate).
CURVE = ((1, 200), (2, 200), (5, 200), (10, 200), (20, 200), (1, 50), (5, 50), (5, 1000))
TOPIC = "t:cmp"


def scaled(load: Load, plan: Plan, smoke: bool) -> Load:
    """The load this run can carry: a smoke run or fewer --clients shrink it."""
    if not smoke:
        return Load(load.label, min(load.clients, plan.clients), load.rate, load.writers)
    return Load(load.label, min(load.clients, plan.clients), min(load.rate, 40.0), min(load.writers, 2))


class Compare:
    def __init__(self, dsn: str, plan: Plan, out: Path, progress: Progress, smoke: bool) -> None:
        self.dsn = dsn
        self.plan = plan
        self.out = out
        self.progress = progress
        self.smoke = smoke
        self.postmaster: int | None = None
        self.probe: asyncpg.Connection | None = None  # opened before any window: heads cost no fork

    async def open(self) -> None:
        self.postmaster = await pgcpu.postmaster_pid(self.dsn)
        self.probe = await asyncpg.connect(self.dsn)

    async def close(self) -> None:
        if self.probe is not None:
            await self.probe.close()
            self.probe = None

    def _pg(self) -> float | None:
        return pgcpu.cluster_cpu(self.postmaster)

    async def _gateway_heads(self, topics: list[str]) -> dict[str, int]:
        assert self.probe is not None
        rows = await self.probe.fetch("SELECT topic, pos FROM gateway.heads($1::text[])", topics)
        return {r["topic"]: r["pos"] for r in rows}

    async def _naive_heads(self, topics: list[str]) -> dict[str, int]:
        assert self.probe is not None
        n = await self.probe.fetchval(f"SELECT count(*) FROM {naive.TABLE}")
        return {topics[0]: int(n)}  # one topic

    # --- one measured run against a server already listening ----------------------------

    async def _measure(
        self,
        name: str,
        url: str,
        load: Load,
        table: str,
        heads: Callable[[list[str]], Awaitable[dict[str, int]]],
        server_cpu: Callable[[], float],
    ) -> dict[str, Any]:
        p = self.plan
        clients = [(f"{name[:1]}{i}", TOPIC) for i in range(load.clients)]
        writers = db.Writers(self.dsn, load.writers)
        await writers.open()
        try:
            fleet = Fleet(url, SECRET, clients, p.procs, "live")
            try:
                await fleet.start(120, lambda s: self.progress(f"[{name}] {s}"))
                await asyncio.sleep(0.5)
                load0 = loadavg()
                cpu0, pg0, ccpu0, t0 = server_cpu(), self._pg(), fleet.cpu(), time.time()
                task = asyncio.create_task(writers.run([TOPIC], load.rate, p.duration, table=table))
                while not task.done():
                    await asyncio.wait([task], timeout=1.0)
                    self.progress(
                        f"[{name}] {time.time() - t0:5.1f}/{p.duration:.0f}s commits {writers.committed} "
                        f"deliveries {fleet.received}"
                    )
                w = task.result()
                h = await heads([TOPIC])
                behind = await fleet.sync(h, p.sync_timeout)
                cpu1, pg1, ccpu1, t1 = server_cpu(), self._pg(), fleet.cpu(), time.time()
                rows, _ = await fleet.finish(h, 5)
            finally:
                fleet.stop()
        finally:
            await writers.close()
        lat = fleet.samples.lat
        deliveries = len(lat)
        cpu = cpu1 - cpu0
        pg = None if pg0 is None or pg1 is None else pg1 - pg0
        seconds = t1 - t0
        return {
            "clients": load.clients,
            "writers": load.writers,
            "rate_target": load.rate,
            "commits": w.commits,
            "commits_per_s": round(w.rate, 1),
            "write_errors": w.errors[:5],
            "deliveries": deliveries,
            "expected_deliveries": sum(r["expected"] for r in rows),
            "latency_ms": latency_summary(lat),
            "lost": sum(r["lost"] for r in rows),
            "duplicated": sum(r["dup"] for r in rows),
            "behind_at_end": behind,
            "client_errors": [e for r in rows for e in r["errors"]][:5],
            "measured_seconds": round(seconds, 2),
            "server_cpu_s": round(cpu, 3),
            "server_cpu_us_per_delivery": round(cpu / deliveries * 1e6, 2) if deliveries else None,
            "pg_cpu_s": None if pg is None else round(pg, 3),
            "pg_cpu_us_per_commit": round(pg / w.commits * 1e6, 1) if pg is not None and w.commits else None,
            "pg_cpu_ms_per_s": None if pg is None else round(pg / seconds * 1e3, 2),
            "client_cpu_per_process": round((ccpu1 - ccpu0) / seconds / max(1, len(fleet.procs)), 2),
            "loadavg": load0,
        }

    # --- the two servers ----------------------------------------------------------------

    async def gateway(self, name: str, load: Load, env: dict[str, str] | None = None) -> dict[str, Any]:
        log = "".join(c if c.isalnum() else "-" for c in name)
        gw = GatewayProcess(self.dsn, 1, self.out / f"gateway-{log}.log", presence=False)
        gw.env.update(env or {})
        self.progress(f"[{name}] starting one gateway process")
        await gw.start()
        try:
            await asyncio.sleep(0.5)
            r = await self._measure(
                name,
                gw.ws_url,
                load,
                "lt_items",
                self._gateway_heads,
                lambda: sum(pgcpu.process_cpu(pid) or 0.0 for pid in gw.worker_pids()),
            )
            r["stages"] = await _stages(gw.base)
        finally:
            await gw.stop()
        r["settings"] = dict(env or {})
        return r

    async def naive(self, name: str, load: Load) -> dict[str, Any]:
        await naive.prepare(self.dsn)  # empty: positions count from 0 again
        port = free_port()
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=naive.naive_main, args=(self.dsn, port, child), daemon=True)
        proc.start()
        child.close()
        pid = proc.pid
        assert pid is not None
        loop = asyncio.get_running_loop()
        try:
            if not await loop.run_in_executor(None, parent.poll, 30):
                raise RuntimeError("the naive server did not start within 30s")
            parent.recv()
            self.progress(f"[{name}] naive server listening")
            r = await self._measure(
                name,
                f"ws://127.0.0.1:{port}/ws",
                load,
                naive.TABLE,
                self._naive_heads,
                lambda: pgcpu.process_cpu(pid) or 0.0,
            )
            parent.send(("stop",))
        finally:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        return r

    # --- the comparisons, the fixed cost, the curve --------------------------------------

    async def _window(self, seconds: float) -> dict[str, Any]:
        load0 = loadavg()
        pg0, t0 = self._pg(), time.monotonic()
        await asyncio.sleep(seconds)
        pg1, t1 = self._pg(), time.monotonic()
        ms = None if pg0 is None or pg1 is None else round((pg1 - pg0) / (t1 - t0) * 1e3, 3)
        return {"seconds": round(t1 - t0, 2), "pg_cpu_ms_per_s": ms, "loadavg": load0}

    async def fixed_cost(self) -> dict[str, Any]:
        """PostgreSQL's CPU per second with one idle gateway process (presence off) connected,
        minus that of the cluster with nothing connected but the probe: the relay's idle polls,
        its lease renewals, the listener's probes, whatever else the gateway does with no writes."""
        seconds = max(1.0, self.plan.duration)
        self.progress(f"[fixed cost] the cluster alone, {seconds:.0f}s")
        alone = await self._window(seconds)
        gw = GatewayProcess(self.dsn, 1, self.out / "gateway-fixed-cost.log", presence=False)
        await gw.start()
        try:
            await asyncio.sleep(2.0)  # past start-up (migrations check, first polls)
            self.progress(f"[fixed cost] one idle gateway process, {seconds:.0f}s")
            with_gw = await self._window(seconds)
        finally:
            await gw.stop()
        fixed = None
        if alone["pg_cpu_ms_per_s"] is not None and with_gw["pg_cpu_ms_per_s"] is not None:
            fixed = round(with_gw["pg_cpu_ms_per_s"] - alone["pg_cpu_ms_per_s"], 3)
        return {"cluster_alone": alone, "one_idle_gateway": with_gw, "fixed_ms_per_s": fixed}

    async def baseline(self) -> dict[str, Any]:
        """Every load of LOADS on both servers, then the fixed cost."""
        await self.open()
        try:
            loads = []
            for full in LOADS:
                load = scaled(full, self.plan, self.smoke)
                g = await self.gateway(f"gateway {load.label}", load)
                n = await self.naive(f"naive {load.label}", load)
                loads.append(
                    {
                        "label": full.label,
                        "target": _load_dict(full),
                        "load": _load_dict(load),
                        "gateway": g,
                        "naive": n,
                    }
                )
                self.progress.done(f"[baseline {load.label}] {_line(g, n)}")
            fixed = await self.fixed_cost()
            self.progress.done(
                f"[baseline] fixed cost of one idle gateway process: {fixed['fixed_ms_per_s']} ms/s"
            )
        finally:
            await self.close()
        return {
            "postmaster_found": self.postmaster is not None,
            "duration": self.plan.duration,
            "judged": not self.smoke and self.plan.duration >= JUDGED_SECONDS,
            "loads": loads,
            "fixed_cost": fixed,
        }

    async def curve(self) -> dict[str, Any]:
        """The 200/s load with each relay setting of CURVE, the naive server first as reference."""
        load = scaled(LOADS[0], self.plan, self.smoke)
        settings = CURVE[:2] if self.smoke else CURVE
        await self.open()
        try:
            ref = await self.naive("curve naive", load)
            self.progress.done(f"[curve] naive: {_brief(ref)}")
            points = []
            for poll_ms, wake in settings:
                env = {"GATEWAY_RELAY_POLL_INTERVAL": f"{poll_ms}ms", "GATEWAY_RELAY_WAKE_RATE": str(wake)}
                g = await self.gateway(f"curve {poll_ms}ms/{wake}", load, env)
                points.append({"poll_interval_ms": poll_ms, "wake_rate": wake, "gateway": g})
                self.progress.done(f"[curve] poll {poll_ms} ms, wake rate {wake}: {_brief(g)}")
        finally:
            await self.close()
        return {"load": _load_dict(load), "duration": self.plan.duration, "naive": ref, "points": points}


async def _stages(base: str) -> dict[str, Any]:
    """Where a gateway's milliseconds go, from its /metrics (totals since it started, so the
    start-up's few doorbells are included): the mean time from a transaction's start to its
    frame handed to the sockets, the mean time to resolve, encode and fan out one batch, and
    how often the relay polled and NOTIFYed."""
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/metrics", timeout=aiohttp.ClientTimeout(5)) as resp:
                text = await resp.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                pass

    def mean_ms(name: str) -> float | None:
        n = values.get(name + "_count")
        return round(values[name + "_sum"] / n * 1e3, 3) if n else None

    return {
        "commit_to_send_ms_mean": mean_ms("gateway_commit_to_send_seconds"),
        "resolve_batch_ms_mean": mean_ms("gateway_resolve_batch_seconds"),
        "resolve_batches": values.get("gateway_resolve_batch_seconds_count"),
        "doorbells_received": values.get("gateway_notifications_received_total"),
        "relay_polls": values.get("gateway_relay_polls_total"),
        "relay_notifications": values.get("gateway_relay_notifications_total"),
        "log_reads": values.get("gateway_log_reads_total"),
    }


def _load_dict(load: Load) -> dict[str, Any]:
    return {"clients": load.clients, "rate": load.rate, "writers": load.writers}


def _brief(x: dict[str, Any]) -> str:
    lat = x["latency_ms"]
    return (
        f"{x['commits_per_s']:.0f} commits/s, p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
        f"PostgreSQL {x['pg_cpu_us_per_commit']} us/commit, server {x['server_cpu_us_per_delivery']} us/delivery, "
        f"lost {x['lost']}"
    )


def _line(g: dict[str, Any], n: dict[str, Any]) -> str:
    return f"gateway {_brief(g)} | naive {_brief(n)}"
