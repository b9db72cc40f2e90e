"""Connections that stop answering without closing (a NAT that dropped the flow, a network
partition, a stalled peer): each of the gateway's database connections must notice and be
replaced, and the events committed meanwhile must still arrive.

``tests/blackhole.py`` is a loopback proxy in front of the test's PostgreSQL whose
connections can be frozen one by one: the socket stays open and nothing crosses it any more,
so only a deadline can tell. ``pg_terminate_backend`` (tests/test_no_loss.py) is the other
kind of death, the one that closes the socket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from .blackhole import BlackholeProxy
from .gwtest import Client, Gateway, make_items_table, running_gateway
from .pgconn import pg_connect

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def proxy(dsn: str) -> AsyncIterator[BlackholeProxy]:
    await make_items_table(dsn)
    p = BlackholeProxy(dsn)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def _receiving(gw: Gateway, db: asyncpg.Connection) -> tuple[Client, dict[str, Any]]:
    """A client on user:1 that got the first event: the path works before anything stalls."""
    alice = await gw.connect("1")
    await alice.subscribe("user:1")
    await db.execute("INSERT INTO items (owner_id, title) VALUES (1, 'before')")
    (first,) = await alice.events(1)
    assert first["row"]["title"] == "before"
    return alice, first


async def _client_ports(db: asyncpg.Connection, pids: list[int]) -> set[int]:
    rows = await db.fetch("SELECT client_port FROM pg_stat_activity WHERE pid = ANY($1::int[])", pids)
    return {r["client_port"] for r in rows}


async def test_a_pool_connection_that_stops_answering_is_given_up(dsn: str, proxy: BlackholeProxy) -> None:
    async with running_gateway(proxy.dsn, tables="public.items", db_timeout="1s") as gw:
        db = await pg_connect(dsn)
        alice, first = await _receiving(gw, db)

        listener_pid = gw.state.listener.backend_pid
        relay_pid = gw.state.relay.backend_pid
        ports = {p.upstream_port for p in proxy.pipes}
        rows = await db.fetch(
            "SELECT pid FROM pg_stat_activity WHERE client_port = ANY($1::int[]) AND NOT pid = ANY($2::int[])",
            list(ports),
            [listener_pid, relay_pid],
        )
        pool_pids = [r["pid"] for r in rows]
        assert pool_pids, "no pool connection found"
        # Only the pool's connections stop answering; the listener and the relay keep working.
        assert proxy.freeze_ports(await _client_ports(db, pool_pids)) == len(pool_pids)

        await db.execute("INSERT INTO items (owner_id, title) VALUES (1, 'after the stall')")
        (second,) = await alice.events(1, timeout=30)
        assert second["row"]["title"] == "after the stall" and second["pos"] == first["pos"] + 1
        await alice.close()
        await db.close()


async def test_a_relay_connection_that_stops_answering_is_replaced(dsn: str, proxy: BlackholeProxy) -> None:
    # One worker: no other replica could take the lease over, so the relay must notice itself.
    async with running_gateway(proxy.dsn, tables="public.items", relay_lease="1s") as gw:
        db = await pg_connect(dsn)
        alice, first = await _receiving(gw, db)

        relay = gw.state.relay
        stalled = relay.backend_pid
        assert stalled is not None
        assert proxy.freeze_ports(await _client_ports(db, [stalled])) == 1

        await db.execute("INSERT INTO items (owner_id, title) VALUES (1, 'after the stall')")
        (second,) = await alice.events(1, timeout=30)
        assert second["row"]["title"] == "after the stall" and second["pos"] == first["pos"] + 1
        assert relay.backend_pid not in (None, stalled)
        await alice.close()
        await db.close()


async def test_a_listener_connection_that_stops_answering_is_replaced(
    dsn: str, proxy: BlackholeProxy
) -> None:
    async with running_gateway(proxy.dsn, tables="public.items") as gw:
        db = await pg_connect(dsn)
        alice = await gw.connect("1")
        await alice.subscribe("user:1")
        listener = gw.state.listener
        stalled = listener.backend_pid
        assert proxy.freeze_ports(await _client_ports(db, [stalled])) == 1
        await db.execute("INSERT INTO items (owner_id, title) VALUES (1, 'during the stall')")
        (event,) = await alice.events(1, timeout=30)
        assert event["row"]["title"] == "during the stall"
        assert listener.backend_pid != stalled and listener.reconnects == 1
        await alice.close()
        await db.close()
