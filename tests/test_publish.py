"""Client messages on a topic (the publish frame, gateway/publish.py) across two gateway replicas
on one real PostgreSQL: ephemeral messages reach every replica's subscribers and leave no trace
in the log; durable ones get a position, are replayed with their sender; grants, sizes and rates
are enforced with the documented errors; a forged bus NOTIFY is not delivered; and the
application's writes keep committing while ephemeral messages flow."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest

from gateway.auth import Authenticator, TokenError
from gateway.config import Settings
from gateway.server import BUS

from . import natsserver
from .gwtest import SECRET, Client, Gateway, GatewayProcess, free_port, running_gateway, token
from .lbtest import HAPROXY, haproxy_config, haproxy_status
from .natsserver import NatsServer
from .pgconn import pg_connect
from .polling import eventually

ROOM = "room:7"


@pytest.fixture
async def replicas(dsn: str) -> AsyncIterator[tuple[Gateway, Gateway]]:
    async with running_gateway(dsn) as a, running_gateway(dsn) as b:
        await bus_ready(a, b)
        yield a, b


async def bus_ready(a: Gateway, b: Gateway) -> None:
    ba, bb = a.app[BUS], b.app[BUS]  # type: ignore[index]

    async def ready() -> bool:
        if ba._own_pid is None or bb._own_pid is None:
            return False
        await ba._read_senders()
        await bb._read_senders()
        return ba._own_pid in bb._senders and bb._own_pid in ba._senders

    await eventually(ready, 10, "both replicas' buses registered")


async def client(gw: Gateway, user: str, *, publish: list[str] | None = None, **claims: Any) -> Client:
    c = await gw.connect()
    if publish is not None:
        claims["publish"] = publish
    welcome = await c.auth(token(user, topics=[ROOM, "room:*"], **claims))
    c.conn_id = welcome["conn"]  # type: ignore[attr-defined]
    return c


_held: dict[int, list[dict[str, Any]]] = {}  # frames read past while waiting for an answer


@pytest.fixture(autouse=True)
def _forget_held_frames() -> None:
    # Keyed by id(client): a later test's client may get a finished one's id.
    _held.clear()


async def publish(c: Client, req_id: int, data: Any, **kw: Any) -> dict[str, Any]:
    """Send a publish and return its answer (published or error); other frames are kept for
    next_of (a client's own message may come before its ack)."""
    await c.send({"type": "publish", "topic": kw.pop("topic", ROOM), "data": data, "id": req_id, **kw})
    while True:
        frame = await c.recv()
        if frame["type"] in ("published", "error") and frame.get("id") == req_id:
            return frame
        _held.setdefault(id(c), []).append(frame)


async def next_of(c: Client, type_: str, timeout: float = 5.0) -> dict[str, Any]:
    held = _held.get(id(c), [])
    for i, frame in enumerate(held):
        if frame["type"] == type_:
            return held.pop(i)
    deadline = time.monotonic() + timeout
    while True:
        frame = await c.recv(max(0.01, deadline - time.monotonic()))
        if frame["type"] == type_:
            return frame


async def nothing_of(c: Client, type_: str, seconds: float) -> None:
    assert not [f for f in _held.get(id(c), []) if f["type"] == type_]
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            frame = await c.recv(left)
        except (TimeoutError, AssertionError):
            return
        assert frame["type"] != type_, frame


async def log_state(dsn: str, topic: str) -> tuple[int, Any]:
    db = await pg_connect(dsn)
    try:
        n = await db.fetchval("SELECT count(*) FROM gateway.events WHERE topic = $1", topic)
        head = await db.fetchrow("SELECT epoch, pos FROM gateway.topic_heads(ARRAY[$1])", topic)
        return n, tuple(head)
    finally:
        await db.close()


async def test_ephemeral_reaches_subscribers_on_both_replicas_and_leaves_no_trace(
    dsn: str, replicas: tuple[Gateway, Gateway]
) -> None:
    a, b = replicas
    alice = await client(a, "alice", publish=["room:*"])
    alice_conn = alice.conn_id  # type: ignore[attr-defined]
    bob_a, carol_b = await client(a, "bob"), await client(b, "carol")
    acks = [await x.subscribe(ROOM) for x in (alice, bob_a, carol_b)]
    before = await log_state(dsn, ROOM)

    ack = await publish(alice, 1, {"x": 10, "y": 20})
    assert ack == {"type": "published", "topic": ROOM, "id": 1}
    for c in (alice, bob_a, carol_b):  # echo: the sender gets its own too
        m = await next_of(c, "message")
        assert m["topic"] == ROOM and m["from"] == "alice" and m["data"] == {"x": 10, "y": 20}, m
        assert "pos" not in m and "epoch" not in m
        assert isinstance(m["conn"], str) and m["conn"]
        assert m["conn"] == alice_conn

    # Never stored: the log and the head did not move, and a resume replays nothing.
    assert await log_state(dsn, ROOM) == before
    late = await client(b, "dave")
    resumed = await late.subscribe(ROOM, since=(acks[2]["epoch"], acks[2]["pos"]))
    assert resumed["recovered"] is True and resumed["events"] == [] and resumed["pos"] == acks[2]["pos"]
    await nothing_of(late, "message", 0.3)


async def test_echo_false_spares_only_the_sender_s_own_connection(replicas: tuple[Gateway, Gateway]) -> None:
    a, b = replicas
    alice = await client(a, "alice", publish=[ROOM])
    alice_tab2 = await client(a, "alice")  # same user, another connection, same replica
    bob_b = await client(b, "bob")
    for c in (alice, alice_tab2, bob_b):
        await c.subscribe(ROOM)
    assert (await publish(alice, 1, "typing", echo=False))["type"] == "published"
    for c in (alice_tab2, bob_b):
        assert (await next_of(c, "message"))["data"] == "typing"
    await nothing_of(alice, "message", 0.5)


async def test_durable_gets_a_position_after_commit_and_is_replayed_with_its_sender(
    dsn: str, replicas: tuple[Gateway, Gateway]
) -> None:
    a, b = replicas
    alice = await client(a, "alice", publish=["room:*"])
    bob_b = await client(b, "bob")
    sub = await bob_b.subscribe(ROOM)
    ack = await publish(alice, 5, {"text": "hello"}, durable=True)
    assert ack["type"] == "published" and ack["id"] == 5 and ack["pos"] == sub["pos"] + 1, ack
    assert ack["epoch"] == sub["epoch"]
    # Acknowledged after commit: another session sees the row already.
    db = await pg_connect(dsn)
    try:
        row = await db.fetchrow(
            "SELECT sender, data::text FROM gateway.events WHERE topic = $1 AND pos = $2", ROOM, ack["pos"]
        )
        assert row is not None and row["sender"] == "alice"
        # emit from SQL cannot forge a sender: its events have none.
        await db.execute('SELECT gateway.emit($1, \'{"text": "from sql"}\')', ROOM)
    finally:
        await db.close()
    [ev, emitted] = await bob_b.events(2)
    assert ev["op"] == "message" and ev["from"] == "alice" and ev["data"] == {"text": "hello"}
    assert ev["pos"] == ack["pos"]
    assert emitted["op"] == "message" and "from" not in emitted

    # Replayed on resume, with its sender.
    late = await client(b, "carol")
    resumed = await late.subscribe(ROOM, since=(sub["epoch"], sub["pos"]))
    assert resumed["recovered"] is True
    assert [(e["pos"], e.get("from")) for e in resumed["events"]] == [
        (ack["pos"], "alice"),
        (ack["pos"] + 1, None),
    ]


async def test_publishing_needs_its_own_grant_never_a_read_grant(
    dsn: str, replicas: tuple[Gateway, Gateway]
) -> None:
    a, _ = replicas
    reader = await client(a, "rita")  # may read room:* but has no publish claim
    await reader.subscribe(ROOM)
    for req_id, durable in ((1, False), (2, True)):
        err = await publish(reader, req_id, "hi", durable=durable)
        assert err["type"] == "error" and err["code"] == "forbidden" and err["id"] == req_id, err
    own = await publish(reader, 3, "hi", topic="user:rita")  # not even her own topic
    assert own["code"] == "forbidden"
    narrow = await client(a, "nina", publish=["room:8"])
    assert (await publish(narrow, 4, "hi"))["code"] == "forbidden"

    # gateway.authorize_publish grants what the token does not.
    db = await pg_connect(dsn)
    try:
        await db.execute(
            "CREATE OR REPLACE FUNCTION gateway.authorize_publish(user_id text, topic text, claims jsonb) "
            "RETURNS boolean LANGUAGE sql STABLE AS $$ SELECT user_id = 'sam' AND topic = 'room:7' $$"
        )
    finally:
        await db.close()
    sam = await client(a, "sam")
    assert (await publish(sam, 5, "hi"))["type"] == "published"
    assert (await publish(sam, 6, "hi", topic="room:9"))["code"] == "forbidden"


async def test_the_grant_is_checked_again_on_refresh(replicas: tuple[Gateway, Gateway]) -> None:
    a, _ = replicas
    alice = await client(a, "alice", publish=[ROOM])
    assert (await publish(alice, 1, "a"))["type"] == "published"
    await alice.send({"type": "refresh", "token": token("alice", topics=[ROOM])})
    await next_of(alice, "refreshed")
    assert (await publish(alice, 2, "b"))["code"] == "forbidden"
    await alice.send({"type": "refresh", "token": token("alice", topics=[ROOM], publish=["room:*"])})
    await next_of(alice, "refreshed")
    assert (await publish(alice, 3, "c"))["type"] == "published"


@pytest.mark.parametrize("grant", ["user:*", "user:alice*"])
async def test_a_publish_pattern_over_user_topics_is_refused_at_verification(grant: str) -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET))
    with pytest.raises(TokenError, match=r"the publish claim grants .*pattern over user: topics") as info:
        await auth.verify(token("alice", publish=["room:*", grant]))
    assert info.value.reason == "bad_grant"
    ok = await auth.verify(token("alice", publish=["user:bob", "room:*"]))  # exact user topics stay
    assert ok.claims["publish"] == ["user:bob", "room:*"]


async def test_bad_input_gets_its_error_with_the_request_id(replicas: tuple[Gateway, Gateway]) -> None:
    a, _ = replicas
    alice = await client(a, "alice", publish=["room:*", "presence:room:7"])
    big = "x" * 5000  # over the default 4096 bytes
    for req_id, kw, code in (
        (1, {"data": big}, "too_large"),
        (2, {"data": big, "durable": True}, "too_large"),
        (3, {"data": 1, "topic": "no colon"}, "bad_topic"),
        (4, {"data": 1, "topic": "presence:room:7"}, "bad_topic"),
    ):
        data = kw.pop("data")
        err = await publish(alice, req_id, data, **kw)
        assert err["type"] == "error" and err["code"] == code and err["id"] == req_id, err
    await alice.send({"type": "publish", "topic": ROOM, "id": 9})  # no data
    err = await next_of(alice, "error")
    assert err["code"] == "bad_message" and err["id"] == 9
    assert (await publish(alice, 10, "x" * 4000))["type"] == "published"  # within the limit


async def test_a_flood_is_rate_limited_and_other_clients_are_unaffected(
    replicas: tuple[Gateway, Gateway],
) -> None:
    a, b = replicas
    flooder = await client(a, "flo", publish=["room:*"])
    alice = await client(a, "alice", publish=["room:*"])
    bob_b = await client(b, "bob")
    await bob_b.subscribe("room:8")
    for i in range(60):  # the default 20/s allows a burst of 40
        await flooder.send({"type": "publish", "topic": ROOM, "data": i, "id": i})
    answers = []
    while len(answers) < 60:
        f = await flooder.recv()
        if f["type"] in ("published", "error"):
            answers.append(f)
    limited = [f for f in answers if f["type"] == "error"]
    assert limited and all(f["code"] == "rate_limited" for f in limited), answers[-3:]
    assert {f["id"] for f in answers} == set(range(60))  # every request answered, by its id
    # Alice, on the same replica, publishes and Bob receives, as if nothing happened.
    for i in range(5):
        assert (await publish(alice, 100 + i, {"n": i}, topic="room:8"))["type"] == "published"
    got = [(await next_of(bob_b, "message"))["data"] for _ in range(5)]
    assert got == [{"n": i} for i in range(5)]


async def test_a_forged_bus_notify_is_not_delivered(dsn: str, replicas: tuple[Gateway, Gateway]) -> None:
    a, b = replicas
    bob_b = await client(b, "bob")
    await bob_b.subscribe(ROOM)
    admin = await pg_connect(dsn)
    name = f"gw_stranger_{uuid.uuid4().hex[:10]}"
    await admin.execute(f"CREATE ROLE {name} LOGIN")
    u = urlsplit(dsn)
    stranger = await pg_connect(urlunsplit(u._replace(netloc=f"{name}@{u.netloc.split('@')[-1]}")))
    try:
        bus_a = a.app[BUS]  # type: ignore[index]
        body = f'{{"t":"{ROOM}","f":"admin","d":"forged","c":"c1","o":"x"}}'
        payload = f"gwbus1 {bus_a.origin}\nmessage {len(body)}\n{body}"
        untrusted = b.app[BUS].untrusted  # type: ignore[index]
        await stranger.execute("SELECT pg_notify('gateway_bus', $1)", payload)
        await eventually(lambda: b.app[BUS].untrusted > untrusted, 5, "the forgery counted")  # type: ignore[index]
        await nothing_of(bob_b, "message", 0.5)
    finally:
        await stranger.close()
        await admin.execute(f"DROP ROLE {name}")
        await admin.close()


async def test_application_writes_keep_committing_while_ephemeral_messages_flow(
    dsn: str, replicas: tuple[Gateway, Gateway]
) -> None:
    """A writer commits rows (each with its own NOTIFY, the relay's wake-up, when the relay is
    quiet) while clients on both replicas publish ephemeral messages as fast as they may: every
    commit succeeds, and its latency is reported beside the same writer's without the load."""
    a, b = replicas
    db = await pg_connect(dsn)
    await db.execute("CREATE TABLE bus_writes (id serial PRIMARY KEY, note text)")

    async def write(n: int, seconds: float = 0.0) -> list[float]:
        took: list[float] = []
        end = time.monotonic() + seconds
        i = 0
        while i < n or time.monotonic() < end:
            i += 1
            t0 = time.perf_counter()
            # With a NOTIFY of its own: notifying commits are the ones that share a lock with
            # the bus's (sql/102_relay.sql), so they would be the first to wait or fail.
            async with db.transaction():
                await db.execute("INSERT INTO bus_writes (note) VALUES ($1)", str(i))
                await db.execute("SELECT pg_notify('app_channel', $1)", str(i))
            took.append(time.perf_counter() - t0)
        return took

    quiet = await write(100)
    publishers = [await client(gw, f"p{i}", publish=["room:*"]) for i, gw in enumerate((a, b, a, b))]
    listener = await client(b, "l")
    await listener.subscribe(ROOM)
    bus_a = a.app[BUS]  # type: ignore[index]
    payloads_before = bus_a.payloads
    stop = asyncio.Event()

    async def flood(c: Client) -> int:
        n = 0
        while not stop.is_set():
            await c.send({"type": "publish", "topic": ROOM, "data": {"n": n, "pad": "x" * 200}})
            n += 1
            await asyncio.sleep(0.05)  # 20/s: the per-connection rate
        return n

    # And the bus itself at full speed, as many replicas' clients would make it.
    async def bus_burst() -> None:
        while not stop.is_set():
            for _ in range(50):
                bus_a.send("loadtest", b"y" * 300)
            await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(flood(c)) for c in publishers] + [asyncio.create_task(bus_burst())]
    try:
        busy = await write(300, seconds=2.0)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    # Every commit succeeded.
    assert await db.fetchval("SELECT count(*) FROM bus_writes") == len(quiet) + len(busy)
    # The bus was busy meanwhile: a NOTIFY every few milliseconds (at most one per 5 ms).
    assert bus_a.payloads - payloads_before > 100, bus_a.payloads - payloads_before
    await next_of(listener, "message")
    q50, b50 = statistics.median(quiet), statistics.median(busy)
    print(
        f"writer commit p50: quiet {q50 * 1000:.2f} ms, with the bus busy {b50 * 1000:.2f} ms "
        f"({len(busy)} commits, {bus_a.payloads - payloads_before} bus NOTIFYs)"
    )
    await db.close()


async def test_a_durable_publish_while_the_database_is_down_is_unavailable(dsn: str, pg_restart: Any) -> None:
    async with running_gateway(dsn, db_timeout="2") as a:
        alice = await client(a, "alice", publish=["room:*"])
        assert (await publish(alice, 1, "x", durable=True))["type"] == "published"
        await pg_restart.adown()
        try:
            err = await publish(alice, 2, "x", durable=True)
            assert err["type"] == "error" and err["code"] == "unavailable" and err["id"] == 2, err
            # An ephemeral one is still answered (best effort: the bus drops what it cannot send).
            assert (await publish(alice, 3, "y"))["type"] == "published"
        finally:
            await pg_restart.aup()


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (CI installs Debian's haproxy)")
async def test_through_the_load_balancer_to_two_replica_processes(dsn: str, tmp_path: Path) -> None:
    """Two `gateway serve` processes behind HAProxy (round robin): clients spread over both
    get each other's ephemeral and durable messages, and see each other in the room's presence."""
    replicas = [GatewayProcess(dsn, tmp_path / f"g{i}.log", presence="true") for i in range(2)]
    for r in replicas:
        await r.start()
    lb_port, stats_port = free_port(), free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(lb_port, stats_port, [r.port for r in replicas]))
    lb = subprocess.Popen(
        [str(HAPROXY), "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:

        async def all_up() -> bool:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                seen = await haproxy_status(stats_port)
                return seen.get("g0") == "UP" and seen.get("g1") == "UP"
            return False

        await eventually(all_up, 30, "HAProxy to see both replicas up", interval=0.1)
        lb_gw = Gateway(f"http://127.0.0.1:{lb_port}")
        clients = [await client(lb_gw, f"u{i}", publish=["room:*"]) for i in range(4)]
        for c in clients:
            await c.subscribe(ROOM)
        # Round robin put two on each replica.
        for r in replicas:
            assert "gateway_connections 2.0" in await r.metrics()

        # Each client publishes an ephemeral message, which every client gets (echo included).
        # The first may race the replicas' bus registration: retry until it goes through.
        async def first_arrives() -> bool:
            await publish(clients[0], 1, "hello?")
            try:
                frame = await next_of(clients[1], "message", 0.5)
                await next_of(clients[2], "message", 0.5)
                await next_of(clients[3], "message", 0.5)
            except (TimeoutError, AssertionError):
                return False
            return bool(frame["data"] == "hello?")

        await eventually(first_arrives, 20, "an ephemeral message across the replicas")
        for c in clients:
            _held.pop(id(c), None)
            await nothing_of(c, "message", 0.3)  # drain what the retries left
        for i, c in enumerate(clients):
            assert (await publish(c, 10 + i, {"from": i}))["type"] == "published"
        for c in clients:
            got = sorted([(await next_of(c, "message"))["data"]["from"] for _ in range(4)])
            assert got == [0, 1, 2, 3]
        # A durable one: one event, same position everywhere.
        ack = await publish(clients[3], 20, {"text": "kept"}, durable=True)
        for c in clients:
            ev = await next_of(c, "event")
            assert (ev["pos"], ev["from"], ev["data"]) == (ack["pos"], "u3", {"text": "kept"})

        # Room presence: u0 and u1 (one on each replica) track the room with a state each; a
        # client that subscribes to the room's presence gets both, whichever replica it is on.
        for i in (0, 1):
            await clients[i].send({"type": "track", "topic": ROOM, "state": {"n": i}, "id": 30 + i})
            assert (await next_of(clients[i], "tracked"))["id"] == 30 + i
        want = [
            {"user": f"u{i}", "conns": [{"conn": clients[i].conn_id, "state": {"n": i}}]}  # type: ignore[attr-defined]
            for i in (0, 1)
        ]
        watchers = [await client(lb_gw, f"w{i}") for i in range(2)]  # one on each replica
        members: list[Any] = []

        async def both_listed() -> bool:
            members.clear()
            for w in watchers:
                await w.send({"type": "subscribe", "topic": f"presence:{ROOM}", "id": 40})
                members.append((await next_of(w, "presence"))["members"])
                await next_of(w, "subscribed")
                await w.send({"type": "unsubscribe", "topic": f"presence:{ROOM}", "id": 41})
                await next_of(w, "unsubscribed")
            return members == [want, want]

        await eventually(both_listed, 15, lambda: f"both trackers in the room's members: {members}")
    finally:
        lb.terminate()
        lb.wait(10)
        for r in replicas:
            await r.stop()


async def test_with_a_broker_ephemeral_messages_travel_on_nats(dsn: str, tmp_path: Path) -> None:
    if natsserver.binary() is None:
        pytest.skip("nats-server not found (Debian package nats-server)")
    nats = NatsServer(tmp_path / "nats.log").start()
    try:
        async with running_gateway(dsn, broker=nats.url) as a, running_gateway(dsn, broker=nats.url) as b:
            alice = await client(a, "alice", publish=["room:*"])
            bob_b = await client(b, "bob")
            await bob_b.subscribe(ROOM)
            payloads = a.app[BUS].payloads  # type: ignore[index]
            assert (await publish(alice, 1, {"over": "nats"}))["type"] == "published"
            m = await next_of(bob_b, "message")
            assert (m["from"], m["data"]) == ("alice", {"over": "nats"})
            assert a.app[BUS].payloads == payloads + 1  # type: ignore[index]
            assert a.app[BUS].backend_pid is None  # type: ignore[index]  (no NOTIFY session at all)
            ack = await publish(alice, 2, {"kept": True}, durable=True)
            ev = await next_of(bob_b, "event")
            assert (ev["pos"], ev["from"]) == (ack["pos"], "alice")
    finally:
        nats.stop()
