"""Presence per room (docs/presence.md, "Rooms"): the SQL functions on a real PostgreSQL, then
real gateways on real sockets: two replicas as processes (``python -m gateway serve``, FAST
timings of test_presence.py), and one in this process where a test reads its state."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.config import ConfigError
from gateway.rooms import read_topic, room_problem
from gateway.server import PRESENCE

from .gwtest import Client, assert_alive, expect_error, running_gateway, token
from .pgconn import connection
from .presencetest import RoomWatcher
from .test_capture import as_role, sql_block
from .test_presence import Cluster, sql, val, wait_for

ROOM = "room:7"
TOPIC = "presence:room:7"
APPLY = "SELECT gateway.room_presence_apply($1, $2, $3, $4, $5::jsonb[], $6)"
# After a kill -9 with FAST settings, a replica's members are gone at most ttl + interval later.
FAST_BOUND = 2.0

Row = tuple[str, str, str, dict[str, Any] | None]


# --- helpers --------------------------------------------------------------------------------


@pytest.fixture
async def cluster(dsn: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(dsn, tmp_path)
    try:
        yield c
    finally:
        await c.close()


async def logged(db: asyncpg.Connection, topic: str = TOPIC) -> list[dict[str, Any]]:
    rows = await db.fetch("SELECT data FROM gateway.events WHERE topic = $1 ORDER BY pos", topic)
    return [json.loads(r["data"]) for r in rows]


async def apply(db: asyncpg.Connection, replica: str, rows: list[Row], full: bool = False) -> int:
    n: int = await db.fetchval(
        APPLY,
        replica,
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [None if r[3] is None else json.dumps(r[3]) for r in rows],
        full,
    )
    return n


async def track(c: Client, room: str, state: dict[str, Any] | None, req: int = 1) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "track", "topic": room, "id": req}
    if state is not None:
        msg["state"] = state
    await c.send(msg)
    return await c.recv()


async def joined(cl: Cluster, gw: Any, user: str, topics: list[str] | None = None) -> tuple[Client, str]:
    """A connection of ``user`` on ``gw``, and its connection id."""
    client = Client(gw.ws_url)
    await client.open()
    cl.clients.append(client)
    welcome = await client.auth(token(user, topics=topics if topics is not None else [ROOM]))
    return client, welcome["conn"]


# --- the SQL function, directly ------------------------------------------------------------


async def test_sql_join_update_leave_full_and_the_replicas_delete(db: asyncpg.Connection) -> None:
    await db.execute("INSERT INTO gateway.replicas (replica_id) VALUES ('r1'), ('r2')")
    assert await apply(db, "r1", [("c1", ROOM, "alice", {"name": "Ada"})]) == 1
    assert await apply(db, "r2", [("c9", ROOM, "alice", {"name": "Ada 2"})]) == 1
    assert await apply(db, "r1", [("c1", ROOM, "alice", {"name": "Ada"})]) == 0  # same state
    assert await apply(db, "r1", [("c1", ROOM, "alice", {"name": "Ada", "x": 1})]) == 1
    assert await apply(db, "r1", [("c1", ROOM, "alice", None)]) == 1
    assert await apply(db, "r1", [("c1", ROOM, "alice", None)]) == 0  # gone already
    assert await apply(db, "gone", [("c1", ROOM, "alice", {})]) == -1  # not registered: nothing done
    # The full set: c2 stays (no change), c3 joins, everything else of r1 leaves.
    await apply(db, "r1", [("c2", ROOM, "bob", {}), ("c4", "room:8", "bob", {})])
    assert await apply(db, "r1", [("c2", ROOM, "bob", {}), ("c3", ROOM, "carol", {"a": [1]})], full=True) == 2
    assert await logged(db) == [
        {"op": "join", "user": "alice", "conn": "c1", "state": {"name": "Ada"}},
        {"op": "join", "user": "alice", "conn": "c9", "state": {"name": "Ada 2"}},
        {"op": "update", "user": "alice", "conn": "c1", "state": {"name": "Ada", "x": 1}},
        {"op": "leave", "user": "alice", "conn": "c1"},
        {"op": "join", "user": "bob", "conn": "c2", "state": {}},
        {"op": "join", "user": "carol", "conn": "c3", "state": {"a": [1]}},
    ]
    assert await logged(db, "presence:room:8") == [
        {"op": "join", "user": "bob", "conn": "c4", "state": {}},
        {"op": "leave", "user": "bob", "conn": "c4"},
    ]
    # Deleting a replica (the sweep, a clean shutdown, an operator) takes its members with it.
    await db.execute("DELETE FROM gateway.replicas WHERE replica_id = 'r2'")
    assert (await logged(db))[-1] == {"op": "leave", "user": "alice", "conn": "c9"}
    await db.execute("UPDATE gateway.replicas SET heartbeat_at = now() - interval '1 min'")
    assert await db.fetchval("SELECT gateway.presence_sweep('10 s', '0 s')") >= 0
    assert (await logged(db))[-2:] == [
        {"op": "leave", "user": "bob", "conn": "c2"},
        {"op": "leave", "user": "carol", "conn": "c3"},
    ]
    assert await db.fetchval("SELECT count(*) FROM gateway.room_presence") == 0


async def test_sql_refuses_bad_input_naming_it(db: asyncpg.Connection) -> None:
    await db.execute("INSERT INTO gateway.replicas (replica_id) VALUES ('r')")
    cases: list[tuple[list[Row], str]] = [
        ([("c1", "presence:room:7", "u", {})], "bad room 'presence:room:7'"),
        ([("c1", "room 7", "u", {})], "bad room 'room 7'"),
        ([("c1", "room:" + "x" * 192, "u", {})], "longer than 200"),
        ([("c1", ROOM, "u", {}), ("c1", ROOM, "u", {})], "appears twice"),
    ]
    for rows, message in cases:
        with pytest.raises(asyncpg.RaiseError, match=message):
            await apply(db, "r", rows)
    with pytest.raises(asyncpg.RaiseError, match="must be a JSON object"):
        await db.fetchval(APPLY, "r", ["c1"], [ROOM], ["u"], ["[1, 2]"], False)
    with pytest.raises(asyncpg.RaiseError, match="same length"):
        await db.fetchval(APPLY, "r", ["c1"], [ROOM], [], ["{}"], False)
    with pytest.raises(asyncpg.RaiseError, match="must not contain NULL"):
        await db.fetchval(APPLY, "r", ["c1"], [ROOM], [None], ["{}"], False)
    assert await db.fetchval("SELECT count(*) FROM gateway.events") == 0


async def test_a_gateway_role_without_the_room_grants_still_sweeps_and_unregisters(
    dsn: str, db: asyncpg.Connection
) -> None:
    """During a rolling upgrade the previous release's replicas run with the gateway role's
    grants of that release, which name no room presence: deleting a replica (their sweep, their
    clean shutdown) must still work, and still take the replica's members with it."""
    grants = "\n".join(
        line
        for line in sql_block("The gateway's role").splitlines()
        if "room_presence" not in line and "public.items" not in line
    )
    name = f"gw_old_{uuid.uuid4().hex[:10]}"
    await db.execute(f"CREATE ROLE {name} LOGIN")
    try:
        await db.execute(re.sub(r"\bgw\b", name, grants))
        await db.execute("INSERT INTO gateway.replicas (replica_id) VALUES ('a'), ('b')")
        await apply(db, "a", [("c1", ROOM, "alice", {})])
        await apply(db, "b", [("c2", ROOM, "bob", {})])
        await db.execute(
            "UPDATE gateway.replicas SET heartbeat_at = now() - interval '1 min' WHERE replica_id = 'b'"
        )
        async with connection(as_role(dsn, name)) as old:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await old.fetch("SELECT * FROM gateway.room_presence")
            await old.fetchval("SELECT gateway.presence_unregister('a')")
            assert await old.fetchval("SELECT gateway.presence_sweep('10 s', '5 s')") >= 0
        assert await db.fetchval("SELECT count(*) FROM gateway.room_presence") == 0
        assert [c["op"] for c in await logged(db)] == ["join", "join", "leave", "leave"]
        # A gateway of this release with that role would fail every registration: it refuses to start.
        with pytest.raises(ConfigError, match=r"may not read gateway\.room_presence"):
            async with running_gateway(as_role(dsn, name), presence="true"):
                pass
    finally:
        await db.execute(f"DROP OWNED BY {name}; DROP ROLE {name}")


def test_which_topics_are_rooms_and_who_may_read_their_presence() -> None:
    glob = ("presence:global", "presence:room:1")
    assert read_topic("presence:room:7", glob) == ROOM
    assert read_topic("presence:global", glob) == "presence:global"
    assert read_topic("presence:room:1", glob) == "presence:room:1"  # configured as global
    assert read_topic("room:7", glob) == ROOM
    assert read_topic("presence:foo", glob) is None
    assert read_topic("presence:presence:room:7", glob) is None
    assert room_problem(ROOM, glob) is None
    assert room_problem("room:1", glob) is not None
    assert room_problem("presence:room:7", glob) is not None
    assert room_problem("room:" + "x" * 191, glob) is not None
    assert room_problem("room:" + "x" * 186, glob) is None


# --- two replicas ------------------------------------------------------------------------


async def test_one_user_with_tabs_on_two_replicas_is_one_member_with_two_connections(
    cluster: Cluster,
) -> None:
    gw1, gw2 = await cluster.start(2)
    early = RoomWatcher(await cluster.connect(gw1, "watch", [ROOM]))
    await early.subscribe(TOPIC)
    assert early.members == {}

    tab1, conn1 = await joined(cluster, gw1, "alice")
    tab2, conn2 = await joined(cluster, gw2, "alice")
    assert conn1 != conn2  # ids are unique across replicas
    assert await track(tab1, ROOM, {"name": "Ada", "color": "teal"}, 5) == {
        "type": "tracked",
        "topic": ROOM,
        "id": 5,
    }
    assert (await track(tab2, ROOM, {"name": "Ada", "color": "red"}))["type"] == "tracked"
    bob, bob_conn = await joined(cluster, gw2, "bob")
    assert (await track(bob, ROOM, None))["type"] == "tracked"  # no state: {}
    everyone = {
        "alice": {conn1: {"name": "Ada", "color": "teal"}, conn2: {"name": "Ada", "color": "red"}},
        "bob": {bob_conn: {}},
    }
    await early.until(everyone)

    # A late subscriber on the other replica starts from the snapshot: one member, two conns.
    late_client = await cluster.connect(gw2, "watch2", [ROOM])
    await late_client.send({"type": "subscribe", "topic": TOPIC, "id": 7})
    snap = await late_client.recv()
    assert snap == {
        "type": "presence",
        "topic": TOPIC,
        "members": [
            {
                "user": "alice",
                "conns": sorted(
                    [
                        {"conn": conn1, "state": {"name": "Ada", "color": "teal"}},
                        {"conn": conn2, "state": {"name": "Ada", "color": "red"}},
                    ],
                    key=lambda c: c["conn"],
                ),
            },
            {"user": "bob", "conns": [{"conn": bob_conn, "state": {}}]},
        ],
    }
    late = RoomWatcher(late_client)
    late.members = everyone
    assert (await late_client.recv())["type"] == "subscribed"

    # An update, then leaving: untrack (answered), closing a tab.
    assert (await track(tab2, ROOM, {"name": "Ada", "color": "blue"}))["type"] == "tracked"
    everyone["alice"][conn2] = {"name": "Ada", "color": "blue"}
    await early.until(everyone)
    await late.until(everyone)
    await bob.send({"type": "untrack", "topic": ROOM, "id": 9})
    assert await bob.recv() == {"type": "untracked", "topic": ROOM, "id": 9}
    del everyone["bob"]
    # "untracked" answers once the change is recorded, not written (the presence writer
    # batches, on each replica): bob's leave is seen before the tab closes, so that the
    # order of the two leaves below is the test's, not a race between the replicas' writers.
    await early.until(everyone)
    await tab1.close()
    del everyone["alice"][conn1]
    await early.until(everyone)
    await late.until(everyone)
    # The three joins commit on two replicas, in either order; then one change per step.
    ops = [(c["op"], c["user"], c["conn"]) for c in early.changes]
    assert sorted(ops[:3]) == sorted(
        [("join", "alice", conn1), ("join", "alice", conn2), ("join", "bob", bob_conn)]
    )
    assert ops[3:] == [("update", "alice", conn2), ("leave", "bob", bob_conn), ("leave", "alice", conn1)]
    assert await val(cluster.dsn, "SELECT count(*) FROM gateway.room_presence") == 1
    # Global presence goes on as before, beside rooms.
    assert await val(cluster.dsn, "SELECT status FROM gateway.presence WHERE user_id = 'alice'") == "online"


async def test_a_killed_replicas_members_leave_within_the_bound(cluster: Cluster) -> None:
    victim, survivor = await cluster.start(2)
    watcher = RoomWatcher(await cluster.connect(survivor, "watch", [ROOM]))
    await watcher.subscribe(TOPIC)
    a1, c1 = await joined(cluster, victim, "alice")
    a2, c2 = await joined(cluster, survivor, "alice")
    b1, cb = await joined(cluster, victim, "bob")
    for c in (a1, a2, b1):
        assert (await track(c, ROOM, {"here": True}))["type"] == "tracked"
    await watcher.until({"alice": {c1: {"here": True}, c2: {"here": True}}, "bob": {cb: {"here": True}}})

    killed = time.monotonic()
    victim.kill()  # kill -9: nothing cleans up after it but the survivor's sweep
    await watcher.until({"alice": {c2: {"here": True}}}, timeout=FAST_BOUND + 20)
    print(f"members gone {time.monotonic() - killed:.2f}s after kill -9 (bound {FAST_BOUND}s)")
    rows = await sql(cluster.dsn, "SELECT user_id, conn_id FROM gateway.room_presence")
    assert [tuple(r) for r in rows] == [("alice", c2)]
    # No ghost comes back, and the survivor's member stays.
    await watcher.drain(1.0)
    assert watcher.members == {"alice": {c2: {"here": True}}}


async def test_a_replica_declared_dead_while_alive_registers_its_members_again(cluster: Cluster) -> None:
    (gw,) = await cluster.start(1)
    watcher = RoomWatcher(await cluster.connect(gw, "watch", [ROOM]))
    await watcher.subscribe(TOPIC)
    tab, conn = await joined(cluster, gw, "alice")
    assert (await track(tab, ROOM, {"v": 1}))["type"] == "tracked"
    await watcher.until({"alice": {conn: {"v": 1}}})
    replica = await val(cluster.dsn, "SELECT replica_id FROM gateway.replicas")
    # As a sweep does to a replica that stalled longer than the ttl: its members leave...
    await sql(cluster.dsn, "SELECT gateway.presence_unregister($1)", replica)
    await watcher.until({})
    # ...and its next heartbeat finds its row gone: it writes its members back, as they are now.
    await watcher.until({"alice": {conn: {"v": 1}}})
    assert [c["op"] for c in watcher.changes] == ["join", "leave", "join"]
    assert (await track(tab, ROOM, {"v": 2}))["type"] == "tracked"
    await watcher.until({"alice": {conn: {"v": 2}}})


async def test_room_presence_is_repaired_after_a_database_outage(cluster: Cluster, pg_restart: Any) -> None:
    (gw,) = await cluster.start(1)
    alice, alice_conn = await joined(cluster, gw, "alice")
    bob, _ = await joined(cluster, gw, "bob")
    for c in (alice, bob):
        assert (await track(c, ROOM, {"v": 1}))["type"] == "tracked"
    await wait_for(cluster.dsn, "SELECT count(*) = 2 FROM gateway.room_presence")

    await sql(cluster.dsn, "CHECKPOINT")  # the test cluster commits asynchronously
    await pg_restart.adown()
    # While the database is away: a join, an update, a close. None may fail or be lost.
    carol, carol_conn = await joined(cluster, gw, "carol")
    assert (await track(carol, ROOM, {"v": 1}))["type"] == "tracked"
    assert (await track(alice, ROOM, {"v": 2}))["type"] == "tracked"
    await bob.close()
    await asyncio.sleep(1.0)  # let the gateway try (and fail) to write them
    await pg_restart.aup()

    # The gateway writes its whole set of members back.
    await wait_for(
        cluster.dsn,
        "SELECT array_agg(user_id || '=' || (state->>'v') ORDER BY user_id) = ARRAY['alice=2', 'carol=1'] "
        "FROM gateway.room_presence",
        timeout=30,
    )
    rows = await sql(cluster.dsn, "SELECT conn_id FROM gateway.room_presence ORDER BY user_id")
    assert [r["conn_id"] for r in rows] == [alice_conn, carol_conn]


async def test_state_updates_are_coalesced_and_the_last_one_wins(cluster: Cluster) -> None:
    (gw,) = await cluster.start(1)
    watcher = RoomWatcher(await cluster.connect(gw, "watch", [ROOM]))
    await watcher.subscribe(TOPIC)
    tab, conn = await joined(cluster, gw, "mallory", ["room:*"])
    sent = 31
    for i in range(sent):  # 16 a second: within GATEWAY_MESSAGE_RATE, each acknowledged
        assert (await track(tab, ROOM, {"n": i}))["type"] == "tracked"
        await asyncio.sleep(0.06)
    await watcher.until({"mallory": {conn: {"n": sent - 1}}})
    await asyncio.sleep(1.5)  # anything still due is published by now
    await watcher.drain()
    published = [c for c in watcher.changes if c["user"] == "mallory"]
    # 2 s of updates at 1 a second, bursts of 2: about 4, never one per frame.
    assert 2 <= len(published) <= 6, published
    assert published[0]["op"] == "join" and published[-1]["state"] == {"n": sent - 1}
    assert watcher.members == {"mallory": {conn: {"n": sent - 1}}}
    # Leaving right after an update is not lost either, and closing leaves at once.
    assert (await track(tab, ROOM, {"n": "last"}))["type"] == "tracked"
    assert (await track(tab, "room:8", {}))["type"] == "tracked"
    await tab.close()
    await watcher.until({})
    await eventually_no_rows(cluster)


async def eventually_no_rows(cluster: Cluster) -> None:
    await wait_for(cluster.dsn, "SELECT count(*) = 0 FROM gateway.room_presence")


# --- one gateway in this process ---------------------------------------------------------


async def test_errors_authorization_limits_and_the_members_api(dsn: str) -> None:
    async with running_gateway(dsn, presence="true") as gw:
        c = await gw.connect("alice", topics=["room:*", "presence:*"])
        # Not an object, too large, a bad room, a presence topic.
        await c.send({"type": "track", "topic": ROOM, "state": [1], "id": 1})
        await expect_error(c, "bad_message", id=1, topic=ROOM)
        await c.send({"type": "track", "topic": ROOM, "state": "x", "id": 2})
        await expect_error(c, "bad_message", id=2, topic=ROOM)
        await c.send({"type": "track", "topic": ROOM, "state": {"x": "y" * 1020}, "id": 3})
        error = await expect_error(c, "too_large", id=3, topic=ROOM)
        assert "1024" in error["message"]
        await c.send({"type": "track", "topic": "room 7", "id": 4})
        await expect_error(c, "bad_topic", id=4)
        await c.send({"type": "track", "topic": TOPIC, "id": 5})
        await expect_error(c, "bad_topic", id=5, topic=TOPIC)
        await c.send({"type": "track", "topic": "presence:global", "id": 5})
        await expect_error(c, "bad_topic", id=5)
        await c.send({"type": "untrack", "topic": ROOM, "id": 6})
        await expect_error(c, "not_tracked", id=6, topic=ROOM)
        # The largest state that fits is taken (1024 bytes of compact JSON).
        fits = {"x": "y" * (1024 - len('{"x":""}'))}
        assert (await track(c, ROOM, fits, 7))["type"] == "tracked"
        # Up to MAX_TRACKED_ROOMS rooms.
        for i in range(19):
            assert (await track(c, f"room:{100 + i}", {}, 8))["type"] == "tracked"
        await c.send({"type": "track", "topic": "room:999", "id": 9})
        await expect_error(c, "too_many_tracked", id=9, topic="room:999")
        assert (await track(c, ROOM, {"again": 1}, 10))["type"] == "tracked"  # an update is no new room
        metrics = await gw.metrics()
        assert "gateway_presence_rooms_tracked 20.0" in metrics
        assert "gateway_presence_room_changes_total" in metrics

        # Authorization: tracking and watching a room need read access to the room itself;
        # a grant of presence:* is not one.
        mallory = await gw.connect("mallory", topics=["presence:*"])
        await mallory.send({"type": "track", "topic": ROOM, "state": {}, "id": 1})
        await expect_error(mallory, "forbidden", id=1, topic=ROOM)
        await mallory.send({"type": "subscribe", "topic": TOPIC, "id": 2})
        await expect_error(mallory, "forbidden", id=2, topic=TOPIC)
        await mallory.send({"type": "subscribe", "topic": "presence:foo", "id": 3})
        await expect_error(mallory, "bad_topic", id=3, topic="presence:foo")
        # Its own user topic is a room it may read.
        assert (await track(mallory, "user:mallory", {"me": True}, 4))["type"] == "tracked"
        await assert_alive(mallory)

        # The members API (the HTTP API's GET /v1/presence/{topic}).
        rooms = gw.app[PRESENCE].rooms  # type: ignore[index]

        async def members() -> list[dict[str, Any]]:
            return await rooms.members(TOPIC)

        sessions = gw.state.ctx.registry.sessions.values()
        welcome_conn = next(s.conn_id for s in sessions if s.identity.user == "alice")
        got = await wait_members(
            members, [{"user": "alice", "conns": [{"conn": welcome_conn, "state": {"again": 1}}]}]
        )
        assert got
        with pytest.raises(ValueError, match="not the presence topic of a room"):
            await rooms.members("presence:global")
        with pytest.raises(ValueError):
            await rooms.members(ROOM)

        # A refresh that takes the room away leaves it, and says so.
        await c.send({"type": "refresh", "token": token("alice", topics=["presence:*"])})
        revoked = [await c.recv() for _ in range(21)]
        assert {f["type"] for f in revoked} == {"error", "refreshed"}, revoked
        assert {f["topic"] for f in revoked if f["type"] == "error"} >= {ROOM, "room:100"}
        assert all(f["code"] == "forbidden" for f in revoked if f["type"] == "error")
        await wait_members(members, [])
        await c.send({"type": "untrack", "topic": ROOM, "id": 11})
        await expect_error(c, "not_tracked", id=11)
        await c.close()
        await mallory.close()


async def wait_members(members: Any, expected: list[dict[str, Any]]) -> bool:
    last: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        last = await members()
        if last == expected:
            return True
        await asyncio.sleep(0.05)
    raise AssertionError(f"members {last}, expected {expected}")


async def test_presence_disabled(dsn: str) -> None:
    async with running_gateway(dsn, presence="false") as gw:
        c = await gw.connect("alice", topics=["room:*"])
        await c.send({"type": "track", "topic": ROOM, "state": {}, "id": 1})
        await expect_error(c, "presence_disabled", id=1, topic=ROOM)
        await c.send({"type": "untrack", "topic": ROOM, "id": 2})
        await expect_error(c, "presence_disabled", id=2, topic=ROOM)
        await c.send({"type": "subscribe", "topic": TOPIC, "id": 3})
        await expect_error(c, "presence_disabled", id=3, topic=TOPIC)
        await assert_alive(c)
        await c.close()
