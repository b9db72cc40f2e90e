"""Doorbells are believed only from the relay (docs/security.md, "What a database role can and
cannot do"). Any role that can log in may ``NOTIFY gateway``: these tests forge doorbells from a
role with no privilege on schema ``gateway`` while clients are subscribed on two replicas, and
check that nobody receives a forged event, every real event arrives exactly once, and no stream
freezes or is pushed past the log's head."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from .gwtest import Client, Gateway, make_items_table, running_gateway, token
from .pgconn import pg_connect

TOPIC = "user:7"


@pytest.fixture
async def stranger(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of a login role with no privilege on the gateway's schema."""
    admin = await pg_connect(dsn)
    name = f"gw_stranger_{uuid.uuid4().hex[:10]}"
    await admin.execute(f"CREATE ROLE {name} LOGIN")
    u = urlsplit(dsn)
    conn = await pg_connect(urlunsplit(u._replace(netloc=f"{name}@{u.netloc.split('@')[-1]}")))
    try:
        assert not await conn.fetchval("SELECT has_schema_privilege('gateway', 'USAGE')")
        yield conn
    finally:
        await conn.close()
        await admin.execute(f"DROP ROLE {name}")
        await admin.close()


@pytest.fixture
async def replicas(dsn: str) -> AsyncIterator[tuple[Gateway, Gateway]]:
    await make_items_table(dsn)
    async with (
        running_gateway(dsn, tables="items") as a,
        running_gateway(dsn, tables="items") as b,
    ):
        yield a, b


async def subscribed(gw: Gateway) -> tuple[Client, dict[str, object]]:
    c = await gw.connect()
    await c.auth(token("7"))
    return c, await c.subscribe(TOPIC)


async def nothing_more(c: Client, seconds: float) -> None:
    """No frame at all arrives within ``seconds``."""
    try:
        frame = await c.recv(seconds)
    except (TimeoutError, AssertionError):
        return
    raise AssertionError(f"unexpected frame: {frame}")


async def commit_row(dsn: str, title: str) -> int:
    db = await pg_connect(dsn)
    try:
        row_id: int = await db.fetchval(
            "INSERT INTO items (owner_id, title) VALUES (7, $1) RETURNING id", title
        )
        return row_id
    finally:
        await db.close()


async def test_a_forged_inline_doorbell_is_not_delivered_and_the_real_event_still_is(
    dsn: str, replicas: tuple[Gateway, Gateway], stranger: asyncpg.Connection
) -> None:
    a, b = replicas
    clients = [await subscribed(a), await subscribed(b)]
    epoch, head = clients[0][1]["epoch"], clients[0][1]["pos"]
    assert isinstance(head, int)
    forged = {
        "v": 1,
        "tb": "public.items",
        "ts": time.time(),
        "ev": [[TOPIC, epoch, head + 1, "d", "424242"]],
    }
    await stranger.execute("SELECT pg_notify('gateway', $1)", json.dumps(forged))
    for c, _ in clients:
        await nothing_more(c, 0.5)
    row_id = await commit_row(dsn, "real")
    for c, _ in clients:
        (event,) = await c.events(1)
        assert (event["pos"], event["op"], event["key"]) == (head + 1, "insert", str(row_id))
        assert event["row"]["title"] == "real"
        await nothing_more(c, 0.3)
    for gw in replicas:
        assert gw.state.pipeline.untrusted >= 1


async def test_a_forged_range_doorbell_does_not_freeze_the_topic(
    dsn: str, replicas: tuple[Gateway, Gateway], stranger: asyncpg.Connection
) -> None:
    a, b = replicas
    clients = [await subscribed(a), await subscribed(b)]
    epoch, head = clients[0][1]["epoch"], clients[0][1]["pos"]
    assert isinstance(head, int)
    forged = {"v": 1, "rg": [[TOPIC, epoch, head + 1, 10**12]]}
    await stranger.execute("SELECT pg_notify('gateway', $1)", json.dumps(forged))
    for c, _ in clients:
        await nothing_more(c, 0.5)  # neither events nor "subscribed recovered:false"
    row_id = await commit_row(dsn, "after the forgery")
    for c, _ in clients:
        (event,) = await c.events(1)
        assert (event["pos"], event["key"]) == (head + 1, str(row_id))
    # A newcomer on either replica starts at the real head, not at the claim.
    for gw in replicas:
        _, ack = await subscribed(gw)
        assert (ack["epoch"], ack["pos"], ack.get("recovered")) == (epoch, head + 1, None)


async def test_doorbells_naming_foreign_tables_or_unknown_topics_are_ignored(
    dsn: str, replicas: tuple[Gateway, Gateway], stranger: asyncpg.Connection
) -> None:
    admin = await pg_connect(dsn)
    await admin.execute("CREATE TABLE secrets (id int PRIMARY KEY, owner_id int, body text)")
    await admin.execute("INSERT INTO secrets VALUES (1, 7, 'the launch codes')")
    a, b = replicas
    clients = [await subscribed(a), await subscribed(b)]
    epoch, head = clients[0][1]["epoch"], clients[0][1]["pos"]
    assert isinstance(head, int)
    for forged in (
        {"v": 1, "tb": "public.secrets", "ts": time.time(), "ev": [[TOPIC, epoch, head + 1, "i", "1"]]},
        {"v": 1, "tb": "public.items", "ts": time.time(), "ev": [["user:nobody", "e", 1, "i", "1"]]},
        {"v": 1, "rg": [["no:such:topic", "e", 1, 5]]},
        {"v": 2, "surprise": True},
        "not json at all",
    ):
        payload = forged if isinstance(forged, str) else json.dumps(forged)
        await stranger.execute("SELECT pg_notify('gateway', $1)", payload)
    for c, _ in clients:
        await nothing_more(c, 0.5)
    row_id = await commit_row(dsn, "real")
    for c, _ in clients:
        (event,) = await c.events(1)
        assert (event["pos"], event["key"], event["row"]["title"]) == (head + 1, str(row_id), "real")
        await nothing_more(c, 0.3)
    await admin.close()


@pytest.mark.parametrize("channel", ["gateway", "gateway_poll"])
async def test_a_flood_of_forged_notifications_costs_at_most_two_head_reads_a_second(
    dsn: str, replicas: tuple[Gateway, Gateway], stranger: asyncpg.Connection, channel: str
) -> None:
    payload = '{"v":1,"sync":true}' if channel == "gateway" else ""
    clients = [await subscribed(gw) for gw in replicas]
    logs = [gw.state.pipeline._log for gw in replicas]
    await asyncio.sleep(0.3)  # let joins and the relay's first polls settle
    before = [log.head_reads for log in logs]
    started = time.monotonic()
    # 1,000 notifications over about a second, in 20 transactions: each one a separate wake-up.
    for _ in range(20):
        await stranger.execute(f"SELECT pg_notify('{channel}', $1) FROM generate_series(1, 50)", payload)
        await asyncio.sleep(0.05)
    await asyncio.sleep(max(0.0, started + 1.0 - time.monotonic()))
    elapsed = time.monotonic() - started
    reads = [log.head_reads - b for log, b in zip(logs, before, strict=True)]
    assert all(r <= 2 * max(1.0, elapsed) for r in reads), (reads, elapsed)
    # ... and delivery goes on as before.
    row_id = await commit_row(dsn, "after the flood")
    for c, _ in clients:
        (event,) = await c.events(1)
        assert event["key"] == str(row_id)


async def test_a_position_beyond_the_head_is_never_taken_even_from_the_relay(
    dsn: str, replicas: tuple[Gateway, Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    """Defence in depth: a claim the log does not hold (a relay bug, a tampered log) is capped
    at the real head, so later events are not dropped as duplicates."""
    a, _ = replicas
    c, ack = await subscribed(a)
    epoch, head = ack["epoch"], ack["pos"]
    assert isinstance(head, int)
    pipeline = a.state.pipeline
    relay_pid = await pipeline._log.relay_pid()
    assert relay_pid is not None
    for _ in range(2):
        pipeline.notify(json.dumps({"v": 1, "rg": [[TOPIC, epoch, head + 1, 10**12]]}), relay_pid)
    await nothing_more(c, 0.5)
    assert pipeline.position(TOPIC).pos == head
    assert sum("beyond the head" in r.getMessage() for r in caplog.records) == 1  # logged once
    row_id = await commit_row(dsn, "real")
    (event,) = await c.events(1)
    assert (event["pos"], event["key"]) == (head + 1, str(row_id))


async def test_a_doorbell_of_a_newer_version_is_not_read_but_caught_up_from_the_log(
    dsn: str, replicas: tuple[Gateway, Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    """The compatibility rule of docs/protocol.md ("Versions and compatibility"): during a
    rolling upgrade the relay may run a newer version. A doorbell whose ``v`` is higher than
    this replica's is not interpreted (its fields may mean something else; here its claim is
    one the log does not hold) but makes the replica catch up from the log, which every
    version reads the same way; a newer shape is not mistaken for a malformed doorbell."""
    a, _ = replicas
    c, ack = await subscribed(a)
    epoch, head = ack["epoch"], ack["pos"]
    assert isinstance(head, int)
    pipeline = a.state.pipeline
    relay_pid = await pipeline._log.relay_pid()
    assert relay_pid is not None
    head_reads = 0
    read_heads = pipeline._log.heads

    async def counting_heads(*args: object, **kwargs: object) -> object:
        nonlocal head_reads
        head_reads += 1
        return await read_heads(*args, **kwargs)  # type: ignore[arg-type]

    pipeline._log.heads = counting_heads  # type: ignore[method-assign]
    # Read as version 1, the first would push the stream to a position the log lacks.
    pipeline.notify(
        json.dumps({"v": 2, "tb": "items", "ev": [[TOPIC, epoch, head + 1, "i", "999"]]}), relay_pid
    )
    pipeline.notify(json.dumps({"v": 2, "ev": [{"topic": TOPIC, "pos": head + 1}]}), relay_pid)
    await nothing_more(c, 0.5)
    assert head_reads >= 1, "a newer doorbell must be taken as a reason to catch up from the log"
    assert pipeline.position(TOPIC).pos == head
    messages = [r.getMessage() for r in caplog.records]
    assert not any("beyond the head" in m or "malformed" in m for m in messages), messages
    assert sum("of version 2" in m for m in messages) == 1, messages  # logged once, not per doorbell
    row_id = await commit_row(dsn, "real")
    (event,) = await c.events(1)
    assert (event["pos"], event["key"]) == (head + 1, str(row_id))
