"""Process lifecycle: graceful stop, drain on SIGTERM, supervised workers, health endpoints."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from gateway.protocol import CloseCode

from .gwtest import Closed, GatewayProcess, free_port, running_gateway, settings_env, token
from .pgconn import pg_connect
from .polling import eventually


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, CloseCode.SERVICE_RESTART), (signal.SIGINT, CloseCode.GOING_AWAY)]
)
async def test_signal_closes_clients_with_documented_code_and_exits_0(
    dsn: str, tmp_path: Path, signum: int, code: int
) -> None:
    gw = await GatewayProcess(dsn, tmp_path / "gw.log").start()
    try:
        client = await gw.connect("1")
        await client.subscribe("user:1")
        gw.signal(signum)
        with pytest.raises(Closed) as info:
            while True:
                await client.recv(timeout=15)
        assert info.value.code == code
        assert await gw.wait_exit() == 0
        await client.close()
    finally:
        gw.kill()


async def test_health_endpoints_and_non_websocket_request(dsn: str) -> None:
    async with running_gateway(dsn) as gw, aiohttp.ClientSession() as http:
        async with http.get(gw.base + "/healthz") as r:
            assert r.status == 200
        async with http.get(gw.base + "/readyz") as r:
            assert r.status == 200 and (await r.json())["ready"] is True
        async with http.get(gw.base + "/ws") as r:
            assert r.status == 400 and (await r.json())["error"] == "not_websocket"
        async with http.get(gw.base + "/client/gateway.js") as r:
            assert r.status == 200 and "PgGateway" in await r.text()


async def test_metrics_count_connections_and_deliveries(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        client = await gw.connect("1")
        await client.subscribe("user:1")

        db = await pg_connect(dsn)
        await db.execute("SELECT gateway.emit('user:1', '{}')")
        await client.events(1)
        text = await gw.metrics()
        assert "gateway_connections 1.0" in text
        assert "gateway_subscriptions 1.0" in text
        assert "gateway_deliveries_total 1.0" in text
        assert "gateway_listener_connected 1.0" in text
        assert "gateway_notification_queue_usage" in text
        assert "gateway_commit_to_send_seconds_count 1.0" in text
        await db.close()
        await client.close()


async def test_workers_share_one_port_and_a_crashed_worker_is_restarted(dsn: str, tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, **settings_env(dsn, port=port))
    log = open(tmp_path / "supervisor.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--workers", "2"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        sup = psutil.Process(proc.pid)
        workers = await eventually(
            lambda: kids if len(kids := sup.children()) == 2 else None, 10, "two workers", interval=0.05
        )
        gw = GatewayProcess.__new__(GatewayProcess)
        gw.base = f"http://127.0.0.1:{port}"
        await gw.wait_ready()
        victim = workers[0]
        victim.send_signal(signal.SIGKILL)
        await eventually(
            lambda: len(now := sup.children()) == 2 and victim.pid not in {w.pid for w in now},
            10,
            "the killed worker to be replaced",
            interval=0.05,
        )
        await gw.wait_ready()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        text = (tmp_path / "supervisor.log").read_text()
        assert f"pid {victim.pid}) exited with -9; restarting" in text
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


async def test_json_logs_carry_the_connection_id_and_never_a_token(dsn: str, tmp_path: Path) -> None:
    import json

    from .gwtest import token

    gw = await GatewayProcess(dsn, tmp_path / "gw.log", log_format="json", auth_timeout=0.3).start()
    try:
        good = token("1")
        client = await gw.connect("1")
        await client.send({"type": "refresh", "token": good + "x"})  # a bad refresh: logged, token not
        await client.expect("error")
        silent = await gw.connect()  # never authenticates: closed by the deadline
        with pytest.raises(Closed):
            await silent.recv(timeout=10)
        await client.close()
        await silent.close()
    finally:
        await gw.stop()
    lines = [json.loads(line) for line in (tmp_path / "gw.log").read_text().splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    closing = [line for line in lines if line["msg"].startswith("closing with 4004")]
    assert closing and closing[0]["conn"].startswith("c")
    assert good not in (tmp_path / "gw.log").read_text()


async def test_a_socket_still_authenticating_when_draining_starts_is_closed_1012_too(
    dsn: str, tmp_path: Path
) -> None:
    """A drain tells every client 1012, also one whose upgrade carried no token and whose
    ``auth`` frame has not come yet (the browser client's way): it was neither closed with the
    others nor kept from being welcomed by a replica that is going away."""
    gw = await GatewayProcess(dsn, tmp_path / "gw.log", auth_timeout=30).start()
    try:
        waiting = await gw.connect()  # upgraded, no auth yet
        late = await gw.connect()  # authenticates once the drain has begun
        settled = await gw.connect("1")
        await settled.subscribe("user:1")
        gw.signal(signal.SIGTERM)
        with pytest.raises(Closed) as info:
            await settled.recv(timeout=15)
        assert info.value.code == CloseCode.SERVICE_RESTART
        await late.send({"type": "auth", "token": token("2")})
        for client in (waiting, late):
            with pytest.raises(Closed) as info:
                frame = await client.recv(timeout=5)
                raise AssertionError(f"got {frame} from a draining replica")
            assert info.value.code == CloseCode.SERVICE_RESTART
        assert await gw.wait_exit() == 0
        for client in (waiting, late, settled):
            await client.close()
    finally:
        gw.kill()


@pytest.mark.timeout(120)
async def test_a_postgres_restart_logs_one_line_per_outage_without_tracebacks(
    dsn: str, tmp_path: Path, pg_restart: Any
) -> None:
    """asyncpg's pool logged "Failed to restore the pool connection floor" with a full
    traceback at every retry, 12 to 14 times per replica per restart. An expected reconnect
    is one warning line naming the cause, then one line when the database is back."""
    log_path = tmp_path / "gw.log"
    gw = await GatewayProcess(dsn, log_path).start()
    try:
        c = await gw.connect("1")
        await c.subscribe("user:1")
        await c.close()
        for _ in range(2):  # two outages: each gets its own line
            await pg_restart.adown()
            await asyncio.sleep(3)  # the pool retries meanwhile
            await pg_restart.aup()
            await gw.wait_ready(30)
            await asyncio.sleep(1)
    finally:
        await gw.stop()
    text = log_path.read_text()
    assert "Traceback" not in text, text[-4000:]
    assert "Failed to restore the pool connection floor" not in text, text[-4000:]
    lost = [line for line in text.splitlines() if "database pool cannot connect" in line]
    assert len(lost) == 2, text[-4000:]
    assert all("warning" in line.lower() for line in lost), lost
    back = [line for line in text.splitlines() if "database pool connected again" in line]
    assert len(back) == 2, text[-4000:]
