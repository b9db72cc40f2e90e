"""The replica bus (gateway/bus.py) between two gateway processes on one real PostgreSQL (and on
a real nats-server with GATEWAY_BROKER): messages reach the other process once, batched into
few NOTIFYs; a NOTIFY on gateway_bus from any other session is ignored and counted; nothing is
sent while the notification queue is above the threshold."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from gateway import bus as busmod
from gateway.bus import Bus, BusTooLarge, decode_payload
from gateway.server import BUS

from . import natsserver
from .gwtest import Gateway, running_gateway
from .natsserver import NatsServer
from .pgconn import pg_connect
from .polling import eventually


def the_bus(gw: Gateway) -> Bus:
    assert gw.app is not None
    return gw.app[BUS]


def collect(bus: Bus, kind: str) -> list[bytes]:
    got: list[bytes] = []
    bus.on(kind, got.append)
    return got


async def senders_known(a: Bus, b: Bus) -> None:
    """Both buses connected and registered (each knows the other's sending backend)."""

    async def ready() -> bool:
        for x in (a, b):
            if x._own_pid is None:
                return False
        # Reading the senders is done on a timer; ask now instead of waiting for it.
        for x in (a, b):
            await x._read_senders()
        return a._own_pid in b._senders and b._own_pid in a._senders

    await eventually(ready, 10, "both buses registered")


@pytest.fixture
async def two(dsn: str) -> AsyncIterator[tuple[Bus, Bus]]:
    async with running_gateway(dsn) as a, running_gateway(dsn) as b:
        ba, bb = the_bus(a), the_bus(b)
        await senders_known(ba, bb)
        yield ba, bb


@pytest.fixture
async def stranger(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of a login role with no privilege on the gateway's schema."""
    admin = await pg_connect(dsn)
    name = f"gw_stranger_{uuid.uuid4().hex[:10]}"
    await admin.execute(f"CREATE ROLE {name} LOGIN")
    u = urlsplit(dsn)
    conn = await pg_connect(urlunsplit(u._replace(netloc=f"{name}@{u.netloc.split('@')[-1]}")))
    try:
        yield conn
    finally:
        await conn.close()
        await admin.execute(f"DROP ROLE {name}")
        await admin.close()


def test_payload_round_trip() -> None:
    bus = Bus(None)
    entries = [("message", b'{"a":"x\ny"}'), ("disconnect", b""), ("message", "é".encode())]
    payload = bus._header + b"".join(busmod._encode_entry(k, v) for k, v in entries)
    assert decode_payload(payload) == (bus.origin, entries)
    for bad in (b"", b"gwbus1\n", b"nope x\nm 1\na", bus._header + b"m 5\nab", bus._header + b"m x\nab"):
        with pytest.raises(ValueError):
            decode_payload(bad)


async def test_a_message_reaches_the_other_process_once_and_this_one_at_once(two: tuple[Bus, Bus]) -> None:
    a, b = two
    got_a, got_b = collect(a, "t"), collect(b, "t")
    a.send("t", b'{"hello":1}')
    assert got_a == [b'{"hello":1}']  # this process's handlers: inside send()
    await eventually(lambda: got_b == [b'{"hello":1}'], 5, "the other process to get it")
    await asyncio.sleep(0.2)
    assert got_a == [b'{"hello":1}'] and got_b == [b'{"hello":1}']  # not twice (own NOTIFY skipped)


async def test_the_first_message_of_a_process_just_started_arrives(dsn: str) -> None:
    """The receiver learns a new sender when its first payload comes: that payload waits for
    the read instead of being dropped as unknown."""
    async with running_gateway(dsn) as gw_a:
        a = the_bus(gw_a)
        got = collect(a, "t")
        await eventually(lambda: a._own_pid is not None, 10, "a registered")
        await a._read_senders()  # a's view of the senders, before b exists
        async with running_gateway(dsn) as gw_b:
            b = the_bus(gw_b)
            await eventually(lambda: b._own_pid is not None, 10, "b registered")
            a._senders_read = 0.0  # no read within the last second (the test came fast)
            b.send("t", b"first")
            await eventually(lambda: got == [b"first"], 5, "b's first message at a")
            assert a.untrusted == 0


async def test_a_burst_is_batched_into_few_notifies_and_arrives_in_order(two: tuple[Bus, Bus]) -> None:
    a, b = two
    got = collect(b, "t")
    before = a.payloads
    bodies = [f'{{"n":{i},"pad":"{"x" * 100}"}}'.encode() for i in range(500)]
    started = time.monotonic()
    for body in bodies:
        a.send("t", body)
    await eventually(lambda: len(got) == len(bodies), 10, "every message of the burst")
    elapsed = time.monotonic() - started
    assert got == bodies
    notifies = a.payloads - before
    # ~60 KB in payloads of < 8000 bytes: about 8 NOTIFYs, and never more than one per 5 ms.
    assert notifies <= 12, notifies
    assert notifies <= elapsed / busmod.FLUSH_INTERVAL + 1


async def test_a_notify_from_another_session_is_ignored_and_counted(
    dsn: str, two: tuple[Bus, Bus], stranger: asyncpg.Connection
) -> None:
    a, b = two
    got = collect(b, "t")
    forged = f'gwbus1 {a.origin}\nt 8\n"forged"'.replace("8", str(len(b'"forged"')))
    untrusted = b.untrusted
    await stranger.execute("SELECT pg_notify('gateway_bus', $1)", forged)
    # A superuser's session that is not a registered sender is no better.
    admin = await pg_connect(dsn)
    try:
        await admin.execute("SELECT pg_notify('gateway_bus', $1)", forged)
    finally:
        await admin.close()
    await eventually(lambda: b.untrusted >= untrusted + 2, 5, "the forged NOTIFYs to be counted")
    a.send("t", b'"real"')  # and the bus still works
    await eventually(lambda: got == [b'"real"'], 5, "the real message")
    assert b'"forged"' not in got


async def test_a_stranger_cannot_register_itself(stranger: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.PostgresError):
        await stranger.execute("SELECT gateway.bus_register('me')")
    with pytest.raises(asyncpg.PostgresError):
        await stranger.execute(
            "INSERT INTO gateway.bus_senders (pid, replica) VALUES (pg_backend_pid(), 'me')"
        )


async def test_nothing_is_sent_while_the_notification_queue_is_over_the_threshold(
    two: tuple[Bus, Bus], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = two
    got = collect(b, "t")
    # No test can fill PostgreSQL's 8 GB queue in reasonable time: a threshold below any
    # usage takes the same branch of the same statement.
    monkeypatch.setattr(busmod, "QUEUE_USAGE_MAX", -1.0)
    dropped, sent = a.dropped_queue, a.sent
    a.send("t", b"1")
    a.send("t", b"2")
    await eventually(lambda: a.dropped_queue == dropped + 2, 5, "the messages to be dropped")
    assert a.sent == sent
    monkeypatch.setattr(busmod, "QUEUE_USAGE_MAX", 0.1)
    a.send("t", b"3")
    await eventually(lambda: got == [b"3"], 5, "a message once the queue has room")


async def test_a_body_too_large_for_one_payload_is_refused(two: tuple[Bus, Bus]) -> None:
    a, _ = two
    with pytest.raises(BusTooLarge):
        a.send("t", b"x" * (a.max_body("t") + 1))
    a.send("t", b"x" * a.max_body("t"))  # the largest fits
    for bad in (b"a\x00b", b"\xff\xfe"):  # not text a NOTIFY can carry
        with pytest.raises(ValueError):
            a.send("t", bad)


async def test_the_sender_comes_back_after_its_backend_is_terminated(dsn: str, two: tuple[Bus, Bus]) -> None:
    a, b = two
    got = collect(b, "t")
    old = a._own_pid
    admin = await pg_connect(dsn)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", old)
    finally:
        await admin.close()
    await eventually(lambda: a._own_pid not in (None, old) and a.connected, 10, "a new sending backend")

    async def arrives() -> bool:
        a.send("t", b"again")
        await asyncio.sleep(0.2)
        return b"again" in got

    # b learns the new pid at its first payload from it (at most a second later).
    await eventually(arrives, 10, "a message from the new backend")


async def test_a_sender_whose_session_ended_is_forgotten_within_about_a_second(
    dsn: str, two: tuple[Bus, Bus]
) -> None:
    """Its pid is free for PostgreSQL to give to any other session, of any role: b must stop
    believing it about as fast as doorbells stop believing a relay that is gone (1 s)."""
    a, b = two
    old = a._own_pid
    await eventually(lambda: old in b._senders, 5, "a registered in b's senders")
    admin = await pg_connect(dsn)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", old)
    finally:
        await admin.close()
    t0 = time.monotonic()
    await eventually(lambda: old not in b._senders, 5, "a's old pid forgotten by b")
    assert time.monotonic() - t0 < 2.5


# --- with a broker ------------------------------------------------------------------------


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    if natsserver.binary() is None:
        pytest.skip("nats-server not found (Debian package nats-server)")
    server = NatsServer(tmp_path / "nats.log").start()
    try:
        yield server
    finally:
        server.stop()


async def test_with_a_broker_the_bus_uses_nats_and_nothing_is_notified(dsn: str, nats: NatsServer) -> None:
    async with (
        running_gateway(dsn, broker=nats.url) as gw_a,
        running_gateway(dsn, broker=nats.url) as gw_b,
    ):
        a, b = the_bus(gw_a), the_bus(gw_b)
        got_a, got_b = collect(a, "t"), collect(b, "t")
        a.send("t", b"over nats")
        await eventually(lambda: got_b == [b"over nats"], 5, "the message over NATS")
        await asyncio.sleep(0.1)
        assert got_a == [b"over nats"]
        assert a._own_pid is None  # no PostgreSQL sender at all
