"""Three gateway replicas behind a real HAProxy: one killed with -9, one drained with SIGTERM,
while rows are committed continuously. Every client must end with exactly the committed
sequence of its topic, resuming on another replica through the load balancer."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from .gwtest import GatewayProcess, free_port
from .lbtest import HAPROXY, ResumingClient, haproxy_config, haproxy_status
from .pgconn import pg_connect
from .polling import eventually

pytestmark = pytest.mark.timeout(180)

TOPICS = [f"room:{i}" for i in range(4)]


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (CI installs Debian's haproxy)")
async def test_cluster_kill_and_drain_lose_nothing(dsn: str, tmp_path: Path) -> None:
    replicas = [
        GatewayProcess(dsn, tmp_path / f"g{i}.log", drain_timeout=3, max_connections_per_user=100)
        for i in range(3)
    ]
    for r in replicas:
        await r.start()
    lb_port, stats_port = free_port(), free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(lb_port, stats_port, [r.port for r in replicas]))
    lb = subprocess.Popen(
        [str(HAPROXY), "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    clients: list[ResumingClient] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        seen: dict[str, str] = {}

        async def all_up() -> bool:
            nonlocal seen
            with contextlib.suppress(aiohttp.ClientError, OSError):
                # The CSV has a row per server (g0..g2) and one for the backend as a whole.
                seen = await haproxy_status(stats_port)
            return all(seen.get(f"g{i}") == "UP" for i in range(3))

        await eventually(
            all_up, 30, lambda: f"HAProxy to see three replicas up (it says {seen})", interval=0.1
        )
        url = f"ws://127.0.0.1:{lb_port}/ws"
        clients = [ResumingClient(url, f"u{i}", TOPICS[i % len(TOPICS)]) for i in range(12)]
        tasks = [asyncio.create_task(c.run()) for c in clients]
        await eventually(
            lambda: all(c.epoch is not None for c in clients), 20, "every client subscribed", interval=0.05
        )

        db = await pg_connect(dsn)
        committed = 0

        async def write(seconds: float) -> None:
            nonlocal committed
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                await db.execute("SELECT gateway.emit($1, '{\"n\": 1}')", random.choice(TOPICS))
                committed += 1
                await asyncio.sleep(0.005)

        await write(1.5)
        replicas[0].kill()  # kill -9: its clients see an abnormal close and come back elsewhere
        await write(1.5)
        replicas[1].signal(signal.SIGTERM)  # drain: clients are told 1012 and resume elsewhere
        await write(1.5)
        assert await replicas[1].wait_exit(15) == 0
        await write(1.0)

        heads = {r["topic"]: r["pos"] for r in await db.fetch("SELECT topic, pos FROM gateway.topics")}
        metrics = ""

        async def caught_up() -> bool:
            nonlocal metrics
            if not all(c.positions and c.positions[-1] == heads[c.topic] for c in clients):
                return False
            # A client that caught up by replay may still be finishing its subscribe.
            metrics = await replicas[2].metrics()
            return "gateway_subscriptions 12.0" in metrics

        def behind() -> str:
            lagging = {c.user: (c.positions[-1:], heads[c.topic], c.closes) for c in clients}
            return f"every client at its topic's head, subscribed on the survivor: {lagging}\n{metrics}"

        await eventually(caught_up, 30, behind, interval=0.1)
        status = await haproxy_status(stats_port)
        for c in clients:
            c.stop()
        await asyncio.gather(*tasks)
        await db.close()

        assert committed > 100
        for c in clients:
            assert c.start is not None
            assert c.positions == list(range(c.start + 1, heads[c.topic] + 1)), (c.user, c.topic, c.closes)
            assert c.not_recovered == 0
        assert sum(c.reconnects for c in clients) >= 8  # the clients of two replicas moved
        assert any(code == 1012 for c in clients for code in c.closes)

        assert status["g0"].startswith("DOWN") and status["g1"].startswith("DOWN") and status["g2"] == "UP"
        assert "gateway_connections 12.0" in metrics  # everyone ended on the survivor
        assert "gateway_subscriptions 12.0" in metrics
    finally:
        for c in clients:
            c.stop()
        for t in tasks:
            t.cancel()
        lb.terminate()
        lb.wait(10)
        if lb.stderr is not None:
            lb.stderr.close()
        for r in replicas:
            await r.stop()
