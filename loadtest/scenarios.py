"""The scenarios and baselines. Each starts its own gateway (fresh memory, fresh counters), its own
client processes, and stops both before returning; every wait is bounded."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.dev.pgcluster import free_port

from . import db
from .fleet import Fleet
from .floor import build_frames, floor_main
from .gw import SECRET, GatewayProcess
from .stats import histogram, latency_summary, time_series
from .sysinfo import cpu_seconds, loadavg, rss_kb


@dataclass
class Plan:
    """Sizes and durations of one run (the full default, or --smoke)."""

    clients: int
    workers: int
    writers: int
    duration: float  # seconds of writes in fanout, scoped and churn
    fanout_rate: float
    scoped_rate: float
    churn_rate: float
    churn_clients: int
    churn_life: tuple[float, float]
    idle_clients: int
    ramp_start: float
    ramp_step: float
    ramp_max_steps: int
    ramp_half: float
    ramp_flat: float
    p99_break_ms: float
    floor_clients: int
    floor_frames: int
    bare_seconds: float
    cost_seconds: int
    cost_rounds: int
    cost_clients: int
    procs: int  # client processes for live scenarios
    idle_procs: int
    sync_timeout: float
    notify_rows: int = 20  # rows per statement in the notify scenario
    # the rooms scenario (loadtest/rooms.py): rooms x room_size clients, one message a second
    # each, a presence update every room_presence_every s; the row path beside them
    rooms: int = 100
    room_size: int = 10
    room_presence_every: float = 10.0
    room_row_clients: int = 100
    room_row_rate: float = 20.0
    room_procs: int = 2


class Progress:
    """One status line, rewritten in place on a terminal (a line every 2 s otherwise)."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self._last = 0.0

    def __call__(self, text: str) -> None:
        if self.tty:
            sys.stdout.write("\r\x1b[2K" + text[:150])
            sys.stdout.flush()
        elif time.monotonic() - self._last >= 2.0:
            print(text, flush=True)
            self._last = time.monotonic()

    def done(self, text: str) -> None:
        if self.tty:
            sys.stdout.write("\r\x1b[2K")
        print(text, flush=True)
        self._last = 0.0


class Runner:
    def __init__(self, dsn: str, plan: Plan, out: Path, progress: Progress) -> None:
        self.dsn = dsn
        self.plan = plan
        self.out = out
        self.progress = progress
        self.writers = db.Writers(dsn, plan.writers)
        self.ceiling: float | None = None  # notifications/s of the bare LISTEN baseline

    def _gateway(self, name: str) -> GatewayProcess:
        return GatewayProcess(self.dsn, self.plan.workers, self.out / f"gateway-{name}.log")

    async def _write(
        self, name: str, fleet: Fleet, topics: list[str], rate: float | None, seconds: float, rows: int = 1
    ) -> db.WriteResult:
        """Run the writers while printing progress once a second."""
        task = asyncio.create_task(self.writers.run(topics, rate, seconds, rows))
        start = time.monotonic()
        c0, r0 = self.writers.committed, fleet.received
        while not task.done():
            await asyncio.wait([task], timeout=1.0)
            el = max(1e-9, time.monotonic() - start)
            c, r = self.writers.committed - c0, fleet.received - r0
            self.progress(
                f"[{name}] {el:5.1f}/{seconds:.0f}s  commits {c} ({c / el:,.0f}/s)  deliveries {r} "
                f"({r / el:,.0f}/s)  reconnects {fleet.reconnects}  client errors {fleet.errors}"
            )
        return task.result()

    # --- the generic live scenario ------------------------------------------------------

    async def live(
        self,
        name: str,
        clients: list[tuple[str, str]],
        rate: float,
        mode: str = "live",
        write_topics: list[str] | None = None,
        rows_per_statement: int = 1,
    ) -> dict[str, Any]:
        p = self.plan
        topics = sorted({t for _, t in clients})
        gw = self._gateway(name)
        self.progress(f"[{name}] starting gateway ({p.workers} workers)")
        await gw.start()
        try:
            await asyncio.sleep(0.5)
            rss0 = gw.rss_kb()
            fleet = Fleet(gw.ws_url, SECRET, clients, p.procs, mode, p.churn_life)
            try:
                await fleet.start(120, lambda s: self.progress(f"[{name}] {s}"))
                rss1 = gw.rss_kb()
                load0 = loadavg()
                cpu0, ccpu0, t0 = gw.cpu(), fleet.cpu(), time.time()
                w = await self._write(
                    name, fleet, write_topics or topics, rate, p.duration, rows_per_statement
                )
                heads = await db.heads(self.dsn, topics)
                behind = await fleet.sync(heads, p.sync_timeout)
                cpu1, ccpu1, t1 = gw.cpu(), fleet.cpu(), time.time()
                rows, _ = await fleet.finish(heads, 5)
            finally:
                fleet.stop()
        finally:
            await gw.stop()
        result = self._summary(name, fleet, rows, w, t0, t1, cpu1 - cpu0, behind)
        result.update(
            rate_target=rate,
            gateway_rss_before_kb=rss0,
            gateway_rss_after_connect_kb=rss1,
            kb_per_connection=round((rss1 - rss0) / len(clients), 2),
            client_processes=len(fleet.procs),
            # Near 1.0 means the client processes were CPU-bound: latency then includes their queueing.
            client_cpu_per_process=round((ccpu1 - ccpu0) / (t1 - t0) / len(fleet.procs), 2),
            loadavg=load0,
        )
        return result

    def _summary(
        self,
        name: str,
        fleet: Fleet,
        rows: list[dict[str, Any]],
        w: db.WriteResult,
        t0: float,
        t1: float,
        cpu: float,
        behind: int,
    ) -> dict[str, Any]:
        deliveries = sum(r["received"] for r in rows)
        lat = fleet.samples.lat
        seconds = t1 - t0
        return {
            "scenario": name,
            "clients": len(rows),
            "workers": self.plan.workers,
            "writers": self.plan.writers,
            "write_seconds": round(w.seconds, 2),
            "commits": w.commits,
            "commits_per_s": round(w.rate, 1),
            "write_errors": w.errors[:5],
            "deliveries": deliveries,
            "expected_deliveries": sum(r["expected"] for r in rows),
            "deliveries_per_s": round(deliveries / w.seconds, 1) if w.seconds else 0.0,
            "measured_seconds": round(seconds, 2),
            "latency_ms": latency_summary(lat),
            "lost": sum(r["lost"] for r in rows),
            "duplicated": sum(r["dup"] for r in rows),
            "not_recovered": sum(r["not_recovered"] for r in rows),
            "reconnects": sum(r["reconnects"] for r in rows),
            "connects_refused_and_retried": fleet.refused,
            "clients_lost_any": sum(1 for r in rows if r["lost"]),
            "behind_at_end": behind,
            "client_errors": [e for r in rows for e in r["errors"]][:10],
            "gateway_cpu_s": round(cpu, 3),
            "gateway_cpu_us_per_delivery": round(cpu / deliveries * 1e6, 3) if deliveries else None,
            "series": time_series(fleet.samples.rt, lat, w.commit_times, t0),
            "histogram": histogram(lat),
        }

    # --- scenarios ------------------------------------------------------------------------

    async def fanout(self) -> dict[str, Any]:
        p = self.plan
        clients = [(f"f{i}", "t:fan") for i in range(p.clients)]
        return await self.live("fanout", clients, p.fanout_rate)

    async def notify(self) -> dict[str, Any]:
        """The notify path at the bare LISTEN ceiling: one subscribed client; writers produce
        events at the rate a bare listener received notifications, through the real trigger.
        Durable single-row commits cannot reach that rate on this machine (each NOTIFYing
        commit waits for its own WAL flush), so each statement inserts ``notify_rows`` rows:
        ``ceiling / notify_rows`` statements per second, ``ceiling`` events per second."""
        p = self.plan
        ceiling = self.ceiling or 1000.0
        rate = ceiling / p.notify_rows
        result = await self.live("notify", [("n0", "t:notify")], rate, rows_per_statement=p.notify_rows)
        result.update(rows_per_statement=p.notify_rows, target_events_per_s=round(ceiling, 1))
        return result

    async def scoped(self) -> dict[str, Any]:
        p = self.plan
        clients = [(f"s{i}", f"t:s{i}") for i in range(p.clients)]
        return await self.live("scoped", clients, p.scoped_rate)

    async def churn(self) -> dict[str, Any]:
        p = self.plan
        clients = [(f"c{i}", "t:churn") for i in range(p.churn_clients)]
        return await self.live("churn", clients, p.churn_rate, mode="churn")

    async def idle(self) -> dict[str, Any]:
        p = self.plan
        n = p.idle_clients
        clients = [(f"i{i}", f"t:i{i}") for i in range(n)]
        gw = self._gateway("idle")
        self.progress("[idle] starting gateway")
        await gw.start()
        try:
            await asyncio.sleep(1.0)
            per_worker0 = [rss_kb(pid) for pid in gw.worker_pids()]
            fleet = Fleet(gw.ws_url, SECRET, clients, p.idle_procs, "idle")
            try:
                t = time.monotonic()
                await fleet.start(300, lambda s: self.progress(f"[idle] {s}"))
                connect_s = time.monotonic() - t
                await asyncio.sleep(2.0)  # let the workers settle (pending writes, freed buffers)
                per_worker1 = [rss_kb(pid) for pid in gw.worker_pids()]
                cpu_idle0 = gw.cpu()
                await asyncio.sleep(2.0)
                cpu_idle = gw.cpu() - cpu_idle0
                rows, _ = await fleet.finish({}, 5)
            finally:
                fleet.stop()
        finally:
            await gw.stop()
        before, after = sum(per_worker0), sum(per_worker1)
        return {
            "scenario": "idle",
            "clients": n,
            "workers": p.workers,
            "connected": fleet.connected,
            "connect_seconds": round(connect_s, 1),
            "connects_per_s": round(n / connect_s, 1),
            "connects_refused_and_retried": fleet.refused,
            "gateway_rss_before_kb": per_worker0,
            "gateway_rss_after_kb": per_worker1,
            "kb_per_connection": round((after - before) / n, 2),
            "gateway_cpu_s_per_s_idle": round(cpu_idle / 2.0, 4),
            "lost": 0,
            "duplicated": sum(r["dup"] for r in rows),
            "closed_by_server": sum(1 for r in rows if r["errors"]),
            "client_errors": [e for r in rows for e in r["errors"]][:10],
            "loadavg": loadavg(),
        }

    async def ramp(self) -> dict[str, Any]:
        """Raise the write rate step by step (1 topic per client, so one delivery per commit)
        until p99 or loss or the achieved rate breaks; then half the saturation rate; then flat out."""
        p = self.plan
        clients = [(f"r{i}", f"t:r{i}") for i in range(p.clients)]
        topics = [t for _, t in clients]
        gw = self._gateway("ramp")
        self.progress("[ramp] starting gateway")
        await gw.start()
        steps: list[dict[str, Any]] = []
        commit_times: array[float] = array("d")  # of every step, for the throughput series
        try:
            fleet = Fleet(gw.ws_url, SECRET, clients, p.procs, "live")
            try:
                await fleet.start(120, lambda s: self.progress(f"[ramp] {s}"))

                async def step(label: str, rate: float | None, seconds: float) -> dict[str, Any]:
                    mark = len(fleet.samples.lat)
                    cpu0, t0 = gw.cpu(), time.time()
                    w = await self._write(f"ramp {label}", fleet, topics, rate, seconds)
                    commit_times.extend(w.commit_times)
                    heads = await db.heads(self.dsn, topics)
                    behind = await fleet.sync(heads, p.sync_timeout)
                    cpu = gw.cpu() - cpu0
                    lat = fleet.samples.lat[mark:]
                    rt = fleet.samples.rt[mark:]
                    last = max(rt, default=t0)
                    s: dict[str, Any] = {
                        "label": label,
                        "rate_target": rate,
                        "commits": w.commits,
                        "commits_per_s": round(w.rate, 1),
                        "deliveries": len(lat),
                        # Delivered rate over the time from the first commit to the last delivery.
                        "deliveries_per_s": round(len(lat) / max(last - t0, w.seconds), 1),
                        "latency_ms": latency_summary(lat),
                        "behind_at_end": behind,
                        "gateway_cpu_s": round(cpu, 3),
                        "loadavg": loadavg(),
                    }
                    self.progress.done(
                        f"[ramp] {label}: {s['commits_per_s']:.0f} commits/s, "
                        f"{s['deliveries_per_s']:.0f} deliveries/s, p99 {s['latency_ms']['p99']} ms, behind {behind}"
                    )
                    return s

                def judge(s: dict[str, Any], rate: float) -> None:
                    p99 = s["latency_ms"]["p99"]
                    s["throughput_ok"] = bool(
                        s["commits_per_s"] >= 0.9 * rate
                        and s["behind_at_end"] == 0
                        and s["deliveries"] >= s["commits"]
                    )
                    s["ok"] = bool(s["throughput_ok"] and p99 is not None and p99 <= p.p99_break_ms)

                rate = p.ramp_start
                saturation: float | None = None
                for _ in range(p.ramp_max_steps):
                    s = await step(f"{rate:.0f}/s", rate, p.ramp_step)
                    judge(s, rate)
                    steps.append(s)
                    if not s["ok"] and s["throughput_ok"]:
                        # Only the latency broke while every commit was delivered: on a shared
                        # machine one stall of a neighbour does that. Repeat the step once; both
                        # attempts are reported, and the repeat decides.
                        s = await step(f"{rate:.0f}/s (repeat)", rate, p.ramp_step)
                        judge(s, rate)
                        steps.append(s)
                    if not s["ok"]:
                        break
                    saturation = rate
                    rate *= 2
                half_rate = (saturation if saturation is not None else p.ramp_start) / 2
                half = await step(f"half saturation {half_rate:.0f}/s", half_rate, p.ramp_half)
                flat = await step("flat out", None, p.ramp_flat)
                heads = await db.heads(self.dsn, topics)
                rows, _ = await fleet.finish(heads, 5)
            finally:
                fleet.stop()
        finally:
            await gw.stop()
        return {
            "scenario": "ramp",
            "clients": p.clients,
            "workers": p.workers,
            "writers": p.writers,
            "p99_break_ms": p.p99_break_ms,
            "steps": steps,
            "saturation_rate": saturation,
            "saturation_note": "highest step with commits >= 0.9 x target, every event delivered, "
            f"p99 <= {p.p99_break_ms} ms (a step that broke on latency alone is repeated once)"
            + ("" if saturation else "; the first step already broke"),
            "half": half,
            "flat": flat,
            "lost": sum(r["lost"] for r in rows),
            "duplicated": sum(r["dup"] for r in rows),
            "client_errors": [e for r in rows for e in r["errors"]][:10],
            "latency_ms": latency_summary(fleet.samples.lat),
            "histogram": histogram(fleet.samples.lat),
            "series": time_series(
                fleet.samples.rt,
                fleet.samples.lat,
                commit_times,
                min(fleet.samples.rt[0], commit_times[0] if commit_times else fleet.samples.rt[0]),
            )
            if fleet.samples.rt
            else {},
        }

    # --- baselines ------------------------------------------------------------------------

    async def bare_listen(self) -> dict[str, Any]:
        self.progress(
            f"[baseline] bare LISTEN ceiling ({self.plan.writers} writers, {self.plan.bare_seconds}s)"
        )
        r = await db.bare_listen_ceiling(self.dsn, self.plan.writers, self.plan.bare_seconds)
        r["loadavg"] = loadavg()
        self.ceiling = float(r["received_per_s"])
        return r

    async def floor(self, rate: float) -> dict[str, Any]:
        """The fan-out floor at the fan-out scenario's rate and client count."""
        p = self.plan
        port = free_port()
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=floor_main, args=(port, child), daemon=True)
        proc.start()
        child.close()
        pid = proc.pid
        assert pid is not None
        loop = asyncio.get_running_loop()

        async def recv(timeout: float) -> Any:
            if not await loop.run_in_executor(None, parent.poll, timeout):
                raise RuntimeError(f"the floor server did not answer within {timeout:.0f}s")
            return parent.recv()

        k = p.floor_frames
        clients = [(f"b{i}", "floor") for i in range(p.floor_clients)]
        try:
            await recv(30)
            fleet = Fleet(f"ws://127.0.0.1:{port}/ws", "", clients, p.procs, "floor")
            try:
                await asyncio.sleep(0.5)
                rss0 = rss_kb(pid)
                await fleet.start(120, lambda s: self.progress(f"[floor] {s}"))
                await asyncio.sleep(1.0)
                rss1 = rss_kb(pid)
                parent.send(("broadcast", k, rate))
                await recv(60)
                cpu0 = cpu_seconds(pid)
                parent.send(("go",))
                self.progress(f"[floor] writing {k} frames to {len(clients)} sockets at {rate:.0f}/s")
                _, written = await recv(k / rate + 60)
                behind = await fleet.sync({"floor": k}, p.sync_timeout)
                cpu = cpu_seconds(pid) - cpu0
                rows, _ = await fleet.finish({"floor": k}, 5)
            finally:
                fleet.stop()
            parent.send(("stop",))
        finally:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        deliveries = sum(r["received"] for r in rows)
        frame_bytes = len(build_frames(1)[0])
        return {
            "clients": len(clients),
            "frames": k,
            "rate": rate,
            "frame_bytes": frame_bytes,
            "written": written,
            "deliveries": deliveries,
            "lost": sum(r["lost"] for r in rows),
            "behind_at_end": behind,
            "cpu_s": round(cpu, 3),
            "cpu_us_per_delivery": round(cpu / deliveries * 1e6, 3) if deliveries else None,
            # What a bare aiohttp WebSocket costs in memory, for comparison with the gateway's.
            "kb_per_connection": round((rss1 - rss0) / len(clients), 2),
            "loadavg": loadavg(),
        }

    async def writer_cost(self, pgbench: str | None) -> dict[str, Any]:
        """Measured with a gateway running, as in production: its relay is what spares
        writers the NOTIFY under load (sql/102_relay.sql), and its CPU counts against the writers'."""
        p = self.plan
        gw = self._gateway("writer-cost")
        self.progress("[writer_cost] starting gateway")
        await gw.start()
        try:
            r = await db.writer_cost(
                self.dsn, pgbench, p.cost_clients, p.cost_seconds, p.cost_rounds, self.progress
            )
            if pgbench:  # these settings need pgbench's sessions (PGOPTIONS)
                # Informative, not the bar: fewer rounds. The bar's ratio depends on how long
                # this machine's disk takes to flush a commit, which hides the trigger's CPU;
                # these two show the range: commits that wait 1 ms more, and commits that do
                # not wait at all (CPU alone).
                self.progress("[writer_cost] again with 1 ms commit flushes")
                r["slow_flush"] = await db.writer_cost(
                    self.dsn,
                    pgbench,
                    p.cost_clients * 2,
                    p.cost_seconds,
                    min(3, p.cost_rounds),
                    self.progress,
                    1000,
                )
                self.progress("[writer_cost] again without waiting for commit flushes")
                r["no_flush"] = await db.writer_cost(
                    self.dsn,
                    pgbench,
                    p.cost_clients,
                    p.cost_seconds,
                    min(3, p.cost_rounds),
                    self.progress,
                    flush_wait=False,
                )
        finally:
            await gw.stop()
        r["gateway_running"] = True
        r["loadavg"] = loadavg()
        return r
