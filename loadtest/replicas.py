"""The "replicas" scenario: many gateway processes (one worker each) on this machine, clients
spread over them, each client on a topic of its own; with PostgreSQL LISTEN, then with NATS.

    python -m loadtest.replicas                       # 8 replicas, both engines
    python -m loadtest.replicas --replicas 16 --engine nats

What it measures, per engine, over a window of steady writes (one row per commit, each on one
client's topic, round robin): database sessions held by the gateways, database CPU per commit
(every PostgreSQL process), doorbells each gateway process received and its CPU per commit (a
process serving 1/N of the topics is woken by all of them under LISTEN, by its own under
NATS), commit-to-client latency p50/p99, and lost/duplicated events (both must be 0).
Prints a table and writes JSON (``--out``). docs/deploy.md, "Scaling out", quotes a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from gateway.auth import mint_token
from gateway.dev.pgcluster import LocalCluster, free_port, start_throwaway

from . import db
from .gw import SECRET, GatewayProcess
from .sysinfo import children, cpu_seconds, raise_nofile


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Client:
    def __init__(self, url: str, topic: str) -> None:
        self.url, self.topic = url, topic
        self.positions: list[int] = []
        self.latencies: list[float] = []
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self, session: aiohttp.ClientSession) -> None:
        tok = mint_token(SECRET, "u-" + self.topic, ttl=3600, topics=[self.topic])
        self.ws = await session.ws_connect(
            self.url, protocols=("gateway.v1", "bearer." + tok), max_msg_size=0
        )
        async with asyncio.timeout(10):
            await self._handshake()
        self._task = asyncio.create_task(self._read())

    async def _handshake(self) -> None:
        assert self.ws is not None
        await self.ws.receive_json()  # welcome
        await self.ws.send_json({"type": "subscribe", "topic": self.topic, "id": 1})
        while (frame := await self.ws.receive_json())["type"] != "subscribed":
            if frame["type"] == "error":
                raise RuntimeError(f"subscribe to {self.topic} refused: {frame}")

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            frame = json.loads(msg.data)
            if frame.get("type") == "event":
                self.positions.append(frame["pos"])
                self.latencies.append(time.time() - frame["row"]["sent_at"])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.ws is not None:
            await self.ws.close()


async def sessions(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await conn.close()


def postgres_cpu(postmaster: int) -> float:
    return cpu_seconds(postmaster) + sum(cpu_seconds(p) for p in children(postmaster))


class NatsServer:
    def __init__(self, path: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [path, "-a", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


async def run_engine(
    server: LocalCluster, engine: str, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    name = f"replicas_{engine}_{os.getpid()}"
    admin = await asyncpg.connect(server.dsn("postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = server.dsn(name)
    await db.prepare(dsn)
    nats: NatsServer | None = None
    if engine == "nats":
        path = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/bin")
        assert path is not None, "nats-server not found"
        nats = NatsServer(path)
    gateways = [GatewayProcess(dsn, 1, out / f"replicas-{engine}-{i}.log") for i in range(args.replicas)]
    for gw in gateways:
        gw.env["GATEWAY_POOL_SIZE"] = str(args.pool_size)
        if nats is not None:
            gw.env["GATEWAY_BROKER"] = nats.url
    clients: list[Client] = []
    try:
        await asyncio.gather(*(gw.start(60) for gw in gateways))
        topics = [f"t:c{i}" for i in range(args.clients)]
        clients = [Client(gateways[i % len(gateways)].ws_url, t) for i, t in enumerate(topics)]
        # limit=0: a WebSocket holds its connection, and aiohttp's default is 100 per session.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for c in clients:
                await c.open(session)
            await asyncio.sleep(1.0)
            held = await sessions(dsn)

            async def metrics() -> list[str]:
                out = []
                for gw in gateways:
                    async with session.get(gw.base + "/metrics") as r:
                        out.append(await r.text())
                return out

            postmaster = server.postmaster_pid()
            assert postmaster is not None
            before_m = await metrics()
            before_gw = [gw.cpu() for gw in gateways]
            before_db = postgres_cpu(postmaster)
            writer = await asyncpg.connect(dsn)
            commits = 0
            started = time.monotonic()
            try:
                while (elapsed := time.monotonic() - started) < args.seconds:
                    topic = topics[commits % len(topics)][2:]
                    await writer.execute(
                        "INSERT INTO lt_items (topic, sent_at, body) VALUES ($1, $2, $3)",
                        topic,
                        time.time(),
                        db.BODY,
                    )
                    commits += 1
                    ahead = commits / args.rate - elapsed
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            finally:
                await writer.close()
            window = time.monotonic() - started
            deadline = time.monotonic() + 30
            expected = {t: len(range(i, commits, len(topics))) for i, t in enumerate(topics)}
            while time.monotonic() < deadline and any(len(c.positions) < expected[c.topic] for c in clients):
                await asyncio.sleep(0.1)
            after_db = postgres_cpu(postmaster)
            after_gw = [gw.cpu() for gw in gateways]
            after_m = await metrics()
        received = [
            _metric(a, "gateway_notifications_received_total")
            - _metric(b, "gateway_notifications_received_total")
            for a, b in zip(after_m, before_m, strict=True)
        ]
        lost = sum(max(0, expected[c.topic] - len(set(c.positions))) for c in clients)
        duplicated = sum(len(c.positions) - len(set(c.positions)) for c in clients)
        lat = sorted(x for c in clients for x in c.latencies)
        gw_cpu = [a - b for a, b in zip(after_gw, before_gw, strict=True)]
        return {
            "engine": engine,
            "replicas": args.replicas,
            "clients": args.clients,
            "commits": commits,
            "commits_per_s": round(commits / window, 1),
            "db_sessions": held,
            "db_cpu_ms_per_commit": round((after_db - before_db) / commits * 1000, 3),
            "doorbells_per_process": round(statistics.mean(received), 1),
            "gateway_cpu_ms_per_commit_per_process": round(statistics.mean(gw_cpu) / commits * 1000, 3),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
            "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2) if lat else None,
            "lost": lost,
            "duplicated": duplicated,
        }
    finally:
        for c in clients:
            await c.close()
        await asyncio.gather(*(gw.stop() for gw in gateways))
        if nats is not None:
            nats.stop()
        admin = await asyncpg.connect(server.dsn("postgres"))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def main_async(args: argparse.Namespace) -> int:
    raise_nofile()
    args.out.mkdir(parents=True, exist_ok=True)
    server = await asyncio.to_thread(start_throwaway, fast=False, max_connections=400)
    assert isinstance(server, LocalCluster), "the replicas scenario needs local PostgreSQL binaries"
    results = []
    try:
        engines = ["postgres", "nats"] if args.engine == "both" else [args.engine]
        for engine in engines:
            results.append(await run_engine(server, engine, args, args.out))
    finally:
        await asyncio.to_thread(server.stop)
    (args.out / "replicas.json").write_text(json.dumps(results, indent=2) + "\n")
    keys = list(results[0])
    print(" | ".join(keys))
    for r in results:
        print(" | ".join(str(r[k]) for k in keys))
    return 1 if any(r["lost"] or r["duplicated"] for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.replicas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--clients", type=int, default=400)
    parser.add_argument("--rate", type=float, default=200.0, help="commits per second")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--engine", choices=("both", "postgres", "nats"), default="both")
    parser.add_argument("--out", type=Path, default=Path("loadtest/report"))
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
