"""Presence: the SQL functions on a real PostgreSQL, then real gateway processes on real sockets.

The process tests run ``python -m gateway serve`` (one worker each) with short timings, so a
whole crash-and-sweep cycle takes about two seconds: heartbeat every 0.5 s, a replica is dead
after 1.5 s of silence, a user is offline 1 s after its last connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.heartbeat import BEAT
from gateway.migrate import migrate
from gateway.presence import _SNAPSHOT

from .gwtest import Client, GatewayProcess, running_gateway, token, wait_for_lock_wait
from .pgconn import pg_connect
from .polling import eventually
from .presencetest import Watcher

TOPIC = "presence:global"
WATCH = ["presence:*"]  # the grant a presence subscriber's token carries
FAST = {"presence": "true", "heartbeat_interval": "0.5", "heartbeat_ttl": "1.5", "presence_grace": "1"}
# The offline bound after a kill -9 with FAST settings: max(ttl, grace) + interval.
FAST_BOUND = 2.0


# --- helpers --------------------------------------------------------------------------------


async def sql(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await pg_connect(dsn)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def val(dsn: str, query: str, *args: Any) -> Any:
    rows = await sql(dsn, query, *args)
    return rows[0][0] if rows else None


async def logged_changes(dsn: str, topic: str = TOPIC) -> list[tuple[str, str]]:
    """(user, status) of every presence change in the event log, in position order."""
    rows = await sql(dsn, "SELECT data FROM gateway.events WHERE topic = $1 ORDER BY pos", topic)
    out = []
    for r in rows:
        data = json.loads(r["data"])  # asyncpg hands jsonb over as text
        out.append((data["user"], data["status"]))
    return out


async def wait_for(dsn: str, query: str, *args: Any, timeout: float = 20.0) -> None:
    """Poll until ``query`` returns true (database state, not timing, is what is checked)."""
    await eventually(lambda: val(dsn, query, *args), timeout, f"{query} {args} to be true", interval=0.05)


class Cluster:
    """Gateway processes and the clients connected to them, all stopped at the end."""

    def __init__(self, dsn: str, tmp_path: Path) -> None:
        self.dsn = dsn
        self.tmp_path = tmp_path
        self.gateways: list[GatewayProcess] = []
        self.clients: list[Client] = []

    async def start(self, n: int, **overrides: str) -> list[GatewayProcess]:
        settings = {**FAST, **overrides}
        first = len(self.gateways)
        new = [GatewayProcess(self.dsn, self.tmp_path / f"gw{first + i}.log", **settings) for i in range(n)]
        self.gateways += new
        await asyncio.gather(*(g.start() for g in new))
        return new

    async def connect(self, gw: GatewayProcess, user: str, topics: list[str] | None = None) -> Client:
        client = Client(gw.ws_url)
        await client.open()
        self.clients.append(client)
        await client.auth(token(user, topics=topics))
        return client

    async def watch(self, gw: GatewayProcess, user: str) -> Watcher:
        watcher = Watcher(await self.connect(gw, user, WATCH))
        await watcher.subscribe()
        return watcher

    async def close(self) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                await c.close()
        for g in self.gateways:
            await g.stop()


@pytest.fixture
async def cluster(dsn: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(dsn, tmp_path)
    try:
        yield c
    finally:
        await c.close()


# --- the SQL functions, directly -----------------------------------------------------------


async def test_migrating_again_keeps_presence_state(dsn: str) -> None:
    # The SQL files are applied once each (gateway.migrations records them), not re-run.
    conn = await pg_connect(dsn)
    try:
        await conn.execute("SELECT gateway.presence_connect('r1', 'c1', 'alice')")
        assert await migrate(dsn) == []
        rows = await conn.fetch("SELECT user_id, status FROM gateway.presence")
        assert [tuple(r) for r in rows] == [("alice", "online")]
    finally:
        await conn.close()


async def test_five_tabs_cost_one_change_each_way_and_offline_waits_for_the_grace(dsn: str) -> None:
    conn = await pg_connect(dsn)
    try:
        for i in range(5):
            await conn.execute("SELECT gateway.presence_connect($1, $2, 'alice')", f"r{i % 2}", f"c{i}")
        assert await logged_changes(dsn) == [("alice", "online")]

        # Away only when every tab is away; one tab back is enough for online.
        for i in range(4):
            assert (
                await conn.fetchval(
                    "SELECT gateway.presence_set_status($1, $2, 'away')", f"r{i % 2}", f"c{i}"
                )
                == 0
            )
        assert await conn.fetchval("SELECT gateway.presence_set_status('r0', 'c4', 'away')") == 1
        assert await conn.fetchval("SELECT gateway.presence_set_status('r1', 'c1', 'online')") == 1

        for i in (0, 2, 3, 4, 1):  # the online tab last: closing away tabs changes nothing
            assert (
                await conn.fetchval("SELECT gateway.presence_disconnect($1, $2)", f"r{i % 2}", f"c{i}") == 0
            )
        # Inside the grace: still online, the time of leaving kept, nothing published.
        row = await conn.fetchrow("SELECT status, left_at FROM gateway.presence WHERE user_id = 'alice'")
        assert row["status"] == "online" and row["left_at"] is not None
        assert await conn.fetchval("SELECT gateway.presence_sweep('1 min', '1 hour', ARRAY['alice'])") == 0

        assert await conn.fetchval("SELECT gateway.presence_sweep('1 min', '0 s', ARRAY['alice'])") == 1
        row = await conn.fetchrow(
            "SELECT status, last_seen, left_at FROM gateway.presence WHERE topic = $1 AND user_id = 'alice'",
            TOPIC,
        )
        assert row["status"] == "offline" and row["left_at"] is None
        assert await logged_changes(dsn) == [
            ("alice", "online"),
            ("alice", "away"),
            ("alice", "online"),
            ("alice", "offline"),
        ]
        # The published last_seen is the time the last connection closed, as stored.
        last = await conn.fetchval(
            "SELECT (data->>'last_seen')::float8 FROM gateway.events WHERE topic = $1 ORDER BY pos DESC LIMIT 1",
            TOPIC,
        )
        assert last == pytest.approx(row["last_seen"].timestamp(), abs=1e-6)
    finally:
        await conn.close()


async def test_reconnect_inside_the_grace_publishes_nothing(dsn: str) -> None:
    conn = await pg_connect(dsn)
    try:
        await conn.execute("SELECT gateway.presence_connect('r1', 'c1', 'bob')")
        await conn.execute("SELECT gateway.presence_disconnect('r1', 'c1')")
        await conn.execute("SELECT gateway.presence_connect('r2', 'c1', 'bob')")
        # The reconnect ended the grace: even a zero grace sweep finds nothing to do.
        assert await conn.fetchval("SELECT gateway.presence_sweep('1 min', '0 s')") == 0
        assert await conn.fetchval("SELECT left_at FROM gateway.presence WHERE user_id = 'bob'") is None
        assert await logged_changes(dsn) == [("bob", "online")]
    finally:
        await conn.close()


async def test_a_dead_replica_is_swept_and_its_users_go_offline(dsn: str) -> None:
    conn = await pg_connect(dsn)
    try:
        await conn.execute("SELECT gateway.presence_connect('dead', 'c1', 'alice')")
        await conn.execute("SELECT gateway.presence_connect('dead', 'c2', 'bob')")
        await conn.execute("SELECT gateway.presence_connect('live', 'c1', 'bob')")
        # The replica 'dead' last spoke a minute ago (everything it did, before that).
        await conn.execute(
            "UPDATE gateway.replicas SET heartbeat_at = heartbeat_at - interval '1 min' WHERE replica_id = 'dead';"
            "UPDATE gateway.presence_connections SET connected_at = connected_at - interval '1 min';"
            "UPDATE gateway.presence SET last_seen = last_seen - interval '1 min'"
        )
        dead_hb = await conn.fetchval("SELECT heartbeat_at FROM gateway.replicas WHERE replica_id = 'dead'")

        # Another replica holds the sweep lock: this one skips.
        other = await pg_connect(dsn)
        try:
            async with other.transaction():
                await other.execute("SELECT pg_advisory_xact_lock(7455532644695372654)")
                assert await conn.fetchval("SELECT gateway.presence_sweep('30 s', '5 s')") == -1
        finally:
            await other.close()

        assert await conn.fetchval("SELECT gateway.presence_sweep('30 s', '5 s')") == 1
        assert [r[0] for r in await conn.fetch("SELECT replica_id FROM gateway.replicas")] == ["live"]
        conns = await conn.fetch("SELECT replica_id, user_id FROM gateway.presence_connections")
        assert [tuple(r) for r in conns] == [("live", "bob")]
        rows = {r["user_id"]: r for r in await conn.fetch("SELECT * FROM gateway.presence")}
        assert rows["bob"]["status"] == "online"
        # Last seen when its replica was last heard of.
        assert rows["alice"]["status"] == "offline" and rows["alice"]["last_seen"] == dead_hb
        assert await logged_changes(dsn) == [("alice", "online"), ("bob", "online"), ("alice", "offline")]

        # The dead replica, if it was only stalled, learns it must register again.
        assert await conn.fetchval("SELECT gateway.presence_heartbeat('dead')") is False
        assert await conn.fetchval("SELECT gateway.presence_heartbeat('live')") is True
        assert (
            await conn.fetchval(
                "SELECT gateway.presence_apply('dead', $1, ARRAY['c3'], ARRAY['alice'], ARRAY['online'])",
                [TOPIC],
            )
            == -1
        )
        assert await conn.fetchval("SELECT count(*) FROM gateway.presence_connections") == 1
    finally:
        await conn.close()


# Three ways a user's connection can close while she keeps one on a replica that is about to
# be swept as dead: each is a later sighting of her than that replica's last heartbeat.
LATER_CLOSES = {
    "a tab on a live replica": (
        "SELECT gateway.presence_connect('live', 'c2', 'alice')",
        "SELECT gateway.presence_disconnect('live', 'c2')",
    ),
    "a tab on the dead replica, after its last heartbeat": (
        "SELECT gateway.presence_connect('dead', 'c2', 'alice')",
        "SELECT gateway.presence_disconnect('dead', 'c2')",
    ),
    "a replica shutting down cleanly": (
        "SELECT gateway.presence_connect('leaving', 'c2', 'alice')",
        "SELECT gateway.presence_unregister('leaving')",
    ),
}


@pytest.mark.parametrize("closed", list(LATER_CLOSES))
async def test_a_dead_replicas_user_is_graced_from_her_latest_close_not_its_last_heartbeat(
    dsn: str, closed: str
) -> None:
    """Alice has a tab on a replica that dies and another that she closes after its last
    heartbeat. When the sweep removes the dead replica, she was last seen at that close, not
    at the heartbeat: a grace shorter than the time since the heartbeat must not make her
    offline at once (closed_at, sql/103_presence.sql)."""
    open_other, close_other = LATER_CLOSES[closed]
    grace = datetime.timedelta(seconds=2)
    conn = await pg_connect(dsn)
    await conn.execute("SELECT gateway.presence_connect('dead', 'c1', 'alice')")
    await conn.execute(open_other)
    # The replica 'dead' last spoke a minute ago; both tabs (and her status) are older still.
    await conn.execute(
        "UPDATE gateway.replicas SET heartbeat_at = heartbeat_at - interval '1 min' WHERE replica_id = 'dead';"
        "UPDATE gateway.presence_connections SET connected_at = connected_at - interval '1 min';"
        "UPDATE gateway.presence SET last_seen = last_seen - interval '1 min'"
    )
    before_close = await conn.fetchval("SELECT now()")
    assert await conn.fetchval(close_other) == 0  # she keeps the tab on 'dead': nothing changes
    after_close = await conn.fetchval("SELECT now()")

    # The sweep removes 'dead' and her last tab: the grace runs from the close, so she is kept.
    changes = await conn.fetchval("SELECT gateway.presence_sweep('30 s', $1)", grace)
    swept = await conn.fetchval("SELECT now()")
    assert swept - before_close < grace, "too slow a machine for this test: the grace passed"
    assert changes == 0
    assert "dead" not in [r[0] for r in await conn.fetch("SELECT replica_id FROM gateway.replicas")]
    assert await conn.fetchval("SELECT count(*) FROM gateway.presence_connections") == 0
    row = await conn.fetchrow("SELECT status, left_at FROM gateway.presence WHERE user_id = 'alice'")
    assert row["status"] == "online", "offline by the sweep, though she closed a tab a moment ago"
    left_at = row["left_at"]
    assert before_close <= left_at <= after_close

    # Once the grace since that close has passed, she is offline, last seen at the close.
    await eventually(
        lambda: conn.fetchval("SELECT now() >= $1::timestamptz + $2::interval", left_at, grace),
        20,
        "the grace to pass",
    )
    assert await conn.fetchval("SELECT gateway.presence_sweep('30 s', $1)", grace) == 1
    row = await conn.fetchrow(
        "SELECT status, last_seen, left_at FROM gateway.presence WHERE user_id = 'alice'"
    )
    assert row["status"] == "offline" and row["left_at"] is None and row["last_seen"] == left_at
    assert await logged_changes(dsn) == [("alice", "online"), ("alice", "offline")]
    published = await conn.fetchval(
        "SELECT (data->>'last_seen')::float8 FROM gateway.events WHERE topic = $1 ORDER BY pos DESC LIMIT 1",
        TOPIC,
    )
    assert published == pytest.approx(left_at.timestamp(), abs=1e-6)


async def test_full_apply_replaces_the_replicas_connections(dsn: str) -> None:
    conn = await pg_connect(dsn)
    try:
        await conn.execute("SELECT gateway.presence_connect('r1', 'c1', 'alice')")
        await conn.execute("SELECT gateway.presence_connect('r1', 'c2', 'bob')")
        # After an outage the replica states its complete set: bob's close was lost.
        changed = await conn.fetchval(
            "SELECT gateway.presence_apply('r1', $1, ARRAY['c1', 'c3'], ARRAY['alice', 'carol'], "
            "ARRAY['away', 'online'], true)",
            [TOPIC],
        )
        assert changed == 2  # alice away, carol online; bob enters the grace
        rows = await conn.fetch(
            "SELECT conn_id, user_id, status FROM gateway.presence_connections ORDER BY 1"
        )
        assert [tuple(r) for r in rows] == [("c1", "alice", "away"), ("c3", "carol", "online")]
        bob = await conn.fetchrow("SELECT status, left_at FROM gateway.presence WHERE user_id = 'bob'")
        assert bob["status"] == "online" and bob["left_at"] is not None
    finally:
        await conn.close()


async def test_two_tabs_going_away_at_once_make_the_user_away(dsn: str) -> None:
    """The race the per-user lock exists for: each transaction alone still sees the other tab
    online, so without serialisation neither would publish and the user would stay online."""
    setup = await pg_connect(dsn)
    first = await pg_connect(dsn)
    second = await pg_connect(dsn)
    try:
        await setup.execute("SELECT gateway.presence_connect('r1', 'c1', 'alice')")
        await setup.execute("SELECT gateway.presence_connect('r2', 'c1', 'alice')")
        tx = first.transaction()
        await tx.start()
        await first.fetchval("SELECT gateway.presence_set_status('r1', 'c1', 'away')")
        pid = second.get_server_pid()
        other = asyncio.ensure_future(
            second.fetchval("SELECT gateway.presence_set_status('r2', 'c1', 'away')")
        )

        # Let the second transaction run until it either finished or waits for the first's lock.
        async def finished_or_waiting() -> bool:
            return other.done() or await setup.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND NOT granted)", pid
            )

        await eventually(finished_or_waiting, 10, "the second transaction to finish or wait for the lock")
        await tx.commit()
        await other
        assert await setup.fetchval("SELECT status FROM gateway.presence WHERE user_id = 'alice'") == "away"
        assert await logged_changes(dsn) == [("alice", "online"), ("alice", "away")]
    finally:
        for c in (setup, first, second):
            await c.close()


WORKERS, OPS = 12, 40


async def test_concurrent_transitions_of_one_user_on_many_replicas_converge(dsn: str) -> None:
    """Twelve sessions change two users' connections at once; the stored status must end up
    derived from the connections, and the published changes must alternate (never doubled)."""
    rng = random.Random(7)
    users = ["u1", "u2"]  # few users, many sessions: as much contention as possible

    async def worker(n: int) -> None:
        conn = await pg_connect(dsn)
        mine: dict[str, str] = {}  # conn_id -> user
        try:
            for i in range(OPS):
                op = rng.random()
                if not mine or op < 0.4:
                    cid, user = f"w{n}c{i}", rng.choice(users)
                    mine[cid] = user
                    await conn.execute(
                        "SELECT gateway.presence_connect($1, $2, $3, $4)",
                        f"r{n}",
                        cid,
                        user,
                        rng.choice(["online", "away"]),
                    )
                elif op < 0.7:
                    cid = rng.choice(list(mine))
                    await conn.execute(
                        "SELECT gateway.presence_set_status($1, $2, $3)",
                        f"r{n}",
                        cid,
                        rng.choice(["online", "away"]),
                    )
                else:
                    cid = rng.choice(list(mine))
                    del mine[cid]
                    await conn.execute("SELECT gateway.presence_disconnect($1, $2)", f"r{n}", cid)
        finally:
            await conn.close()

    await asyncio.gather(*(worker(n) for n in range(WORKERS)))

    changes = await logged_changes(dsn)
    positions = [
        r[0] for r in await sql(dsn, "SELECT pos FROM gateway.events WHERE topic = $1 ORDER BY pos", TOPIC)
    ]
    assert positions == list(range(1, len(positions) + 1))
    for user in users:
        seen = [s for u, s in changes if u == user]
        assert seen, f"{user} never changed"
        assert all(a != b for a, b in itertools.pairwise(seen)), f"{user} published twice: {seen}"
        derived = await val(
            dsn,
            "SELECT CASE WHEN bool_or(status = 'online') THEN 'online' WHEN bool_or(status = 'away') THEN 'away' END "
            "FROM gateway.presence_connections WHERE user_id = $1",
            user,
        )
        row = (await sql(dsn, "SELECT status, left_at FROM gateway.presence WHERE user_id = $1", user))[0]
        assert row["status"] == seen[-1]  # the log and the table agree
        if derived is None:
            assert row["left_at"] is not None  # in the grace
        else:
            assert row["status"] == derived and row["left_at"] is None


async def test_the_snapshot_reads_no_offline_user(dsn: str) -> None:
    """Users once seen stay in gateway.presence, offline. A subscribe's snapshot must not read
    them: with many, a reconnect storm of subscribes keeps the pool busy (sql/103_presence.sql)."""
    conn = await pg_connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO gateway.presence (topic, user_id, status, last_seen) "
            "SELECT $1, 'gone' || g, 'offline', now() - interval '1 day' FROM generate_series(1, 20000) g",
            TOPIC,
        )
        await conn.execute("SELECT gateway.presence_connect('r1', 'c1', 'alice')")
        await conn.execute("SELECT gateway.presence_connect('r1', 'c2', 'bob', 'away')")
        await conn.execute("ANALYZE gateway.presence")
        # The gateway's statements are prepared: check the plan made for the value, and the
        # generic one PostgreSQL may switch to after a few runs.
        for mode in ("force_custom_plan", "force_generic_plan"):
            await conn.execute(f"SET plan_cache_mode = {mode}")
            plan = json.loads(await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + _SNAPSHOT, TOPIC))
            scans = [n for n in _plan_nodes(plan[0]["Plan"]) if n.get("Relation Name") == "presence"]
            assert scans, plan
            read = sum(n["Actual Rows"] + n.get("Rows Removed by Filter", 0) for n in scans)
            assert read == 2, f"{mode}: the snapshot read {read} rows for 2 users online or away: {plan}"
        rows = await conn.fetch(_SNAPSHOT, TOPIC)
        assert [(r[0], r[1]) for r in rows] == [("alice", "online"), ("bob", "away")]
    finally:
        await conn.close()


def _plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", []) for n in _plan_nodes(child))]


# b"gw_prune" read as an integer: the advisory lock of gateway.presence_prune.
PRUNE_LOCK = 7455532644696419941


async def _make_offline(conn: asyncpg.Connection, user: str, topics: list[str]) -> None:
    """Connect ``user`` on ``topics``, close, and end its grace: offline, last seen now."""
    await conn.execute("SELECT gateway.presence_connect('r0', $1, $1, 'online', $2)", user, topics)
    await conn.execute("SELECT gateway.presence_disconnect('r0', $1)", user)
    offline = await conn.fetchval("SELECT gateway.presence_sweep('1 min', '0 s', ARRAY[$1])", user)
    assert offline == len(topics)  # one change per topic


async def _last_seen(conn: asyncpg.Connection, user: str, days_ago: float) -> None:
    await conn.execute(
        "UPDATE gateway.presence SET last_seen = now() - $2 * interval '1 day' WHERE user_id = $1",
        user,
        days_ago,
    )


async def _offline_since(conn: asyncpg.Connection, user: str, days: float, topics: list[str]) -> None:
    """Make ``user`` offline on ``topics``, its last connection closed ``days`` ago."""
    await _make_offline(conn, user, topics)
    await _last_seen(conn, user, days)


async def test_prune_deletes_only_users_offline_longer_than_the_retention_and_publishes_nothing(
    dsn: str,
) -> None:
    staff = [TOPIC, "presence:staff"]
    conn = await pg_connect(dsn)
    try:
        # Gone long enough: two of them on two topics (a row each), all last seen days apart.
        await _offline_since(conn, "dave", 8, staff)
        await _offline_since(conn, "frank", 9, [TOPIC])
        await _offline_since(conn, "gina", 10, staff)
        # Offline, but not for long enough.
        await _offline_since(conn, "erin", 6.9, [TOPIC])
        # Online, away, and in the grace, each last seen a month ago: never pruned.
        await conn.execute("SELECT gateway.presence_connect('r1', 'c1', 'alice', 'online', $1)", staff)
        await conn.execute("SELECT gateway.presence_connect('r1', 'c2', 'bob', 'away')")
        await conn.execute("SELECT gateway.presence_connect('r1', 'c3', 'carol')")
        await conn.execute("SELECT gateway.presence_disconnect('r1', 'c3')")
        await conn.execute(
            "UPDATE gateway.presence SET last_seen = now() - interval '30 days', "
            "left_at = left_at - interval '30 days' WHERE user_id IN ('alice', 'bob', 'carol')"
        )
        events = await conn.fetchval("SELECT count(*) FROM gateway.events")
        heads = await conn.fetch("SELECT topic, epoch, pos FROM gateway.topics ORDER BY topic")

        # Another replica is pruning: nothing done.
        other = await pg_connect(dsn)
        try:
            async with other.transaction():
                await other.execute("SELECT pg_advisory_xact_lock($1)", PRUNE_LOCK)
                assert await conn.fetchval("SELECT gateway.presence_prune('7 days')") == -1
        finally:
            await other.close()

        # In batches, oldest first: gina (2 rows), frank, then dave (2 rows).
        assert await conn.fetchval("SELECT gateway.presence_prune('7 days', 3)") == 3
        assert await val(
            dsn,
            "SELECT array_agg(DISTINCT user_id) FROM gateway.presence WHERE user_id IN ('dave', 'frank', 'gina')",
        ) == ["dave"]
        assert await conn.fetchval("SELECT gateway.presence_prune('7 days', 3)") == 2
        assert await conn.fetchval("SELECT gateway.presence_prune('7 days', 3)") == 0

        rows = await conn.fetch("SELECT topic, user_id, status FROM gateway.presence ORDER BY user_id, topic")
        assert [tuple(r) for r in rows] == [
            ("presence:global", "alice", "online"),
            ("presence:staff", "alice", "online"),
            ("presence:global", "bob", "away"),
            ("presence:global", "carol", "online"),
            ("presence:global", "erin", "offline"),
        ]
        # Nothing published: no event, no position taken, no topic reset.
        assert await conn.fetchval("SELECT count(*) FROM gateway.events") == events
        assert await conn.fetch("SELECT topic, epoch, pos FROM gateway.topics ORDER BY topic") == heads

        # A pruned user who comes back is a new row, and online as usual.
        await conn.execute("SELECT gateway.presence_connect('r1', 'c4', 'dave')")
        assert await val(dsn, "SELECT status FROM gateway.presence WHERE user_id = 'dave'") == "online"

        for query, message in [
            ("SELECT gateway.presence_prune('0 s')", "age must be a positive interval"),
            ("SELECT gateway.presence_prune(NULL)", "age must be a positive interval, not NULL"),
            ("SELECT gateway.presence_prune('1 day', 0)", "batch size must be 1 or more"),
        ]:
            with pytest.raises(asyncpg.RaiseError, match=message):
                await conn.fetchval(query)
    finally:
        await conn.close()


async def test_prune_never_deletes_the_row_of_a_user_who_is_connecting(dsn: str) -> None:
    """presence_apply creates a connecting user's row (or finds it there) before it locks it.
    A prune in between would leave the user connected without a row: online, shown to nobody.
    The prune waits for presence writes in flight instead, and gives up after 100 ms."""
    setup = await pg_connect(dsn)
    await setup.execute("SELECT gateway.presence_connect('r1', 'c1', 'aaa')")
    await _offline_since(setup, "old", 30, [TOPIC])
    holder, connecting, pruner = [await pg_connect(dsn) for _ in range(3)]
    # aaa's row locked, as a transition of aaa on another replica would: the connect below
    # finds old's row, then waits at the lock of aaa's (it locks in user order).
    async with holder.transaction():
        await holder.execute("SELECT FROM gateway.presence WHERE user_id = 'aaa' FOR UPDATE")
        connect = asyncio.ensure_future(
            connecting.fetchval(
                "SELECT gateway.presence_apply('r1', $1, ARRAY['c2', 'c3'], ARRAY['aaa', 'old'], "
                "ARRAY['online', 'online'])",
                [TOPIC],
            )
        )
        await wait_for_lock_wait(
            setup, "SELECT gateway.presence_apply(%", "the connect to wait for aaa's row"
        )
        pruned = await pruner.fetchval("SELECT gateway.presence_prune('7 days')")
        gone = not await setup.fetchval("SELECT count(*) FROM gateway.presence WHERE user_id = 'old'")
        assert not gone, "old's row was pruned while old was connecting"
        assert pruned == -1  # it waited 100 ms for the connect's transaction, then gave up
        assert not connect.done()
    assert await connect == 1  # old came online
    assert await val(dsn, "SELECT status FROM gateway.presence WHERE user_id = 'old'") == "online"
    assert await pruner.fetchval("SELECT gateway.presence_prune('7 days')") == 0


async def test_bad_input_is_refused_with_a_message_naming_it(dsn: str) -> None:
    conn = await pg_connect(dsn)
    try:
        cases = [
            (
                "SELECT gateway.presence_apply('r', $1, ARRAY['c1'], ARRAY['u', 'v'], ARRAY['online'])",
                "same length",
            ),
            ("SELECT gateway.presence_apply('r', $1, ARRAY['c1'], ARRAY['u'], ARRAY['busy'])", "not busy"),
            (
                "SELECT gateway.presence_apply('r', $1, ARRAY['c1', 'c1'], ARRAY['u', 'u'], ARRAY['online', 'away'])",
                "appears twice",
            ),
            ("SELECT gateway.presence_apply('', $1, '{}', '{}', '{}')", "replica id"),
            (
                "SELECT gateway.presence_connect('r', 'c1', 'u', 'online', ARRAY['room:1'])",
                "start with presence:",
            ),
            ("SELECT gateway.presence_set_status('r', 'nope', 'away')", "no connection nope"),
            ("SELECT gateway.presence_set_status('r', 'c1', 'busy')", "online or away, not busy"),
            ("SELECT gateway.presence_sweep('0 s', '1 s')", "ttl must be a positive interval"),
            ("SELECT gateway.presence_sweep('1 s', '-1 s')", "grace must be an interval of 0 or more"),
        ]
        for query, message in cases:
            args = [[TOPIC]] if "$1" in query else []
            with pytest.raises(asyncpg.RaiseError, match=message):
                await conn.fetchval(query, *args)
    finally:
        await conn.close()


# --- real gateway processes ----------------------------------------------------------------


async def test_statuses_converge_on_subscribers_of_both_replicas(cluster: Cluster) -> None:
    gw1, gw2 = await cluster.start(2)
    early = await cluster.watch(gw1, "watch1")  # sees the changes live
    await cluster.connect(gw1, "alice")
    await cluster.connect(gw2, "bob")
    await cluster.connect(gw1, "carol")
    await cluster.connect(gw2, "carol")
    everyone = {"alice": "online", "bob": "online", "carol": "online", "watch1": "online"}
    await early.until(everyone)
    late = await cluster.watch(gw2, "watch2")  # starts from the snapshot
    everyone["watch2"] = "online"
    await late.until(everyone)
    await early.until(everyone)
    # Four users, one online change each (carol's second tab changed nothing).
    assert sorted(early.of("carol")) == ["online"]
    assert early.status == late.status

    # The table is plain SQL.
    rows = await sql(
        cluster.dsn,
        "SELECT user_id, status, last_seen FROM gateway.presence WHERE topic = 'presence:global' ORDER BY user_id",
    )
    assert {r["user_id"]: r["status"] for r in rows} == everyone
    assert all(r["last_seen"] is not None for r in rows)


async def test_a_user_stays_online_while_one_connection_remains_then_goes_offline_after_the_grace(
    cluster: Cluster,
) -> None:
    gw1, gw2 = await cluster.start(2, presence_grace="4")
    watcher = await cluster.watch(gw2, "watch")
    a1 = await cluster.connect(gw1, "alice")
    a2 = await cluster.connect(gw2, "alice")
    await watcher.until({"alice": "online"})
    await wait_for(
        cluster.dsn, "SELECT count(*) = 2 FROM gateway.presence_connections WHERE user_id = 'alice'"
    )

    await a1.close()
    await wait_for(
        cluster.dsn, "SELECT count(*) = 1 FROM gateway.presence_connections WHERE user_id = 'alice'"
    )
    # One connection left, so no grace even started.
    row = (await sql(cluster.dsn, "SELECT status, left_at FROM gateway.presence WHERE user_id = 'alice'"))[0]
    assert row["status"] == "online" and row["left_at"] is None

    # A reload: the last tab closes and a new one opens on the other replica within the grace.
    await a2.close()
    await wait_for(cluster.dsn, "SELECT left_at IS NOT NULL FROM gateway.presence WHERE user_id = 'alice'")
    a3 = await cluster.connect(gw1, "alice")
    await wait_for(cluster.dsn, "SELECT left_at IS NULL FROM gateway.presence WHERE user_id = 'alice'")
    assert await val(cluster.dsn, "SELECT status FROM gateway.presence WHERE user_id = 'alice'") == "online"

    # Now leave for good: offline once the grace has passed, and seen on the subscriber.
    await a3.close()
    left = time.monotonic()
    await watcher.until({"alice": "offline"}, timeout=30)
    print(f"offline {time.monotonic() - left:.2f}s after the last close (grace 4s)")
    assert watcher.of("alice") == ["online", "offline"]  # the reload published nothing
    assert [s for u, s in await logged_changes(cluster.dsn) if u == "alice"] == ["online", "offline"]


async def test_away_and_online_follow_every_connection(cluster: Cluster) -> None:
    gw1, gw2 = await cluster.start(2)
    w1 = await cluster.watch(gw1, "watch1")
    w2 = await cluster.watch(gw2, "watch2")
    a1 = await cluster.connect(gw1, "alice")
    a2 = await cluster.connect(gw2, "alice")
    await w1.until({"alice": "online"})
    await wait_for(
        cluster.dsn, "SELECT count(*) = 2 FROM gateway.presence_connections WHERE user_id = 'alice'"
    )

    await a1.send({"type": "status", "status": "away"})
    await wait_for(
        cluster.dsn,
        "SELECT count(*) = 1 FROM gateway.presence_connections WHERE user_id = 'alice' AND status = 'away'",
    )
    await a2.send({"type": "status", "status": "away"})
    await w1.until({"alice": "away"})
    await w2.until({"alice": "away"})
    await a1.send({"type": "status", "status": "online"})
    await w1.until({"alice": "online"})
    await w2.until({"alice": "online"})
    assert w1.of("alice") == ["online", "away", "online"]  # one tab away changed nothing
    assert w2.of("alice") == ["online", "away", "online"]

    await a1.send({"type": "status", "status": "busy"})
    error = await a1.expect("error")
    assert error["code"] == "bad_message" and "status" in error["message"]


async def test_a_hidden_tab_that_reconnects_away_publishes_nothing(cluster: Cluster) -> None:
    """A hidden tab (away) whose socket is replaced, by a network blip or a deploy moving it to
    another replica, must not make its user flicker online and back: it authenticates away."""
    gw1, gw2 = await cluster.start(2, presence_grace="5")
    watcher = await cluster.watch(gw2, "watch")
    tab = await cluster.connect(gw1, "alice")
    await tab.send({"type": "status", "status": "away"})
    await watcher.until({"alice": "away"})
    await tab.close()
    await wait_for(cluster.dsn, "SELECT left_at IS NOT NULL FROM gateway.presence WHERE user_id = 'alice'")

    # The same tab again, on the other replica, inside the grace: still hidden.
    again = Client(gw2.ws_url)
    await again.open()
    cluster.clients.append(again)
    await again.send({"type": "auth", "token": token("alice"), "status": "away"})
    await again.expect("welcome")
    await wait_for(cluster.dsn, "SELECT left_at IS NULL FROM gateway.presence WHERE user_id = 'alice'")
    assert await val(cluster.dsn, "SELECT status FROM gateway.presence WHERE user_id = 'alice'") == "away"
    assert (
        await val(cluster.dsn, "SELECT status FROM gateway.presence_connections WHERE user_id = 'alice'")
        == "away"
    )

    # A new user whose first tab is hidden appears away at once, never online.
    bob = Client(gw1.ws_url)
    await bob.open()
    cluster.clients.append(bob)
    await bob.send({"type": "auth", "token": token("bob"), "status": "away"})
    await bob.expect("welcome")
    await watcher.until({"bob": "away"})
    await asyncio.sleep(1.0)  # anything else the two would publish is published by now
    assert [s for u, s in await logged_changes(cluster.dsn) if u == "alice"] == ["online", "away"]
    assert [s for u, s in await logged_changes(cluster.dsn) if u == "bob"] == ["away"]


async def test_kill_9_replica_users_go_offline_within_the_bound(cluster: Cluster) -> None:
    victim, survivor = await cluster.start(2)
    watcher = await cluster.watch(survivor, "watch")
    await cluster.connect(victim, "alice")
    await cluster.connect(victim, "bob")
    await cluster.connect(survivor, "bob")
    await watcher.until({"alice": "online", "bob": "online"})
    await wait_for(
        cluster.dsn, "SELECT count(*) = 3 FROM gateway.presence_connections WHERE user_id <> 'watch'"
    )

    killed = time.monotonic()
    victim.kill()
    # Generous deadline for a loaded machine; the measured time is printed.
    await watcher.until({"alice": "offline"}, timeout=FAST_BOUND + 20)
    print(f"offline {time.monotonic() - killed:.2f}s after kill -9 (bound {FAST_BOUND}s)")
    assert watcher.status["bob"] == "online"
    assert watcher.of("bob") == ["online"]
    assert await val(cluster.dsn, "SELECT count(*) FROM gateway.replicas") == 1
    rows = await sql(cluster.dsn, "SELECT user_id, status FROM gateway.presence ORDER BY user_id")
    assert [tuple(r) for r in rows] == [("alice", "offline"), ("bob", "online"), ("watch", "online")]


async def test_subscribers_only_see_topics_they_are_granted(cluster: Cluster) -> None:
    (gw,) = await cluster.start(1, presence_topics="presence:global,presence:staff")
    nobody = await cluster.connect(gw, "nobody")
    await nobody.send({"type": "subscribe", "topic": TOPIC, "id": 1})
    error = await nobody.expect("error")
    assert error["code"] == "forbidden" and error["topic"] == TOPIC

    staff_only = await cluster.connect(gw, "staffer", ["presence:staff"])
    await staff_only.send({"type": "subscribe", "topic": TOPIC, "id": 2})
    assert (await staff_only.expect("error"))["code"] == "forbidden"
    watcher = Watcher(staff_only)
    await watcher.subscribe("presence:staff")
    await watcher.until({"staffer": "online", "nobody": "online"})


async def test_a_replica_declared_dead_while_alive_registers_its_connections_again(cluster: Cluster) -> None:
    (gw,) = await cluster.start(1, presence_grace="30")
    watcher = await cluster.watch(gw, "watch")
    await cluster.connect(gw, "alice")
    await watcher.until({"alice": "online"})
    replica = await val(cluster.dsn, "SELECT replica_id FROM gateway.replicas")
    # As a sweep does to a replica that stalled longer than the ttl.
    await sql(cluster.dsn, "SELECT gateway.presence_unregister($1)", replica)
    assert await val(cluster.dsn, "SELECT count(*) FROM gateway.presence_connections") == 0
    # Its next heartbeat finds its row gone and it writes its live connections back.
    await wait_for(cluster.dsn, "SELECT count(*) = 2 FROM gateway.presence_connections")
    assert await val(cluster.dsn, "SELECT replica_id FROM gateway.replicas") == replica
    rows = await sql(cluster.dsn, "SELECT user_id, status, left_at FROM gateway.presence ORDER BY user_id")
    assert [tuple(r) for r in rows] == [("alice", "online", None), ("watch", "online", None)]
    assert watcher.of("alice") == ["online"]


async def test_clean_shutdown_hands_users_to_the_grace(cluster: Cluster) -> None:
    leaving, staying = await cluster.start(2)
    watcher = await cluster.watch(staying, "watch")
    await cluster.connect(leaving, "alice")
    await watcher.until({"alice": "online"})
    await wait_for(
        cluster.dsn, "SELECT count(*) = 1 FROM gateway.presence_connections WHERE user_id = 'alice'"
    )
    leaving.signal(signal.SIGTERM)
    assert await leaving.wait_exit() == 0
    # Its row and connections are gone at once; the survivor's sweep ends alice's grace.
    assert await val(cluster.dsn, "SELECT count(*) FROM gateway.replicas") == 1
    await watcher.until({"alice": "offline"})


async def test_presence_is_repaired_after_a_database_outage(
    cluster: Cluster, pg_restart: Any, tmp_path: Path
) -> None:
    (gw,) = await cluster.start(1)
    watcher = await cluster.watch(gw, "watch")
    await cluster.connect(gw, "alice")
    bob = await cluster.connect(gw, "bob")
    await watcher.until({"alice": "online", "bob": "online"})
    await wait_for(cluster.dsn, "SELECT count(*) = 3 FROM gateway.presence_connections")

    # The test cluster commits asynchronously: make what is committed survive the crash.
    await sql(cluster.dsn, "CHECKPOINT")
    await pg_restart.adown()
    # While the database is away: a connection opens and one closes. Neither may fail.
    await cluster.connect(gw, "carol")
    await bob.close()
    await asyncio.sleep(1.0)  # let the gateway try (and fail) to write both
    await pg_restart.aup()

    # The gateway writes its live set back: carol is there, bob's lost close is applied and his
    # grace ends. The watcher's subscription may have been cut; the database is the judge.
    await wait_for(
        cluster.dsn,
        "SELECT array_agg(user_id ORDER BY user_id) = ARRAY['alice', 'carol', 'watch'] "
        "FROM gateway.presence_connections",
        timeout=30,
    )
    await wait_for(
        cluster.dsn, "SELECT status = 'offline' FROM gateway.presence WHERE user_id = 'bob'", timeout=30
    )
    assert await val(cluster.dsn, "SELECT status FROM gateway.presence WHERE user_id = 'carol'") == "online"
    log_text = (tmp_path / "gw0.log").read_text()
    assert log_text.count("presence: cannot reach the database") == 1, log_text[-3000:]
    assert "presence: database reachable again" in log_text


async def test_an_outage_of_the_whole_database_longer_than_the_ttl_takes_no_one_offline(
    cluster: Cluster, pg_restart: Any
) -> None:
    """When the database itself was away, no replica could beat: when it is back, whichever
    replica sweeps first must not take the others (or itself) for dead before they have had
    the time to beat again, which would make all their users flicker offline and back."""
    gws = await cluster.start(3)
    for i, gw in enumerate(gws):
        await cluster.connect(gw, f"user{i}")
    await wait_for(cluster.dsn, "SELECT count(*) = 3 FROM gateway.presence WHERE status = 'online'")
    await sql(cluster.dsn, "CHECKPOINT")  # the test cluster commits asynchronously
    await pg_restart.adown()
    await asyncio.sleep(2 * 1.5)  # twice FAST's ttl: every heartbeat is stale when it is back
    await pg_restart.aup()
    back = await val(cluster.dsn, "SELECT now()")
    # Every replica beats again, and every sweep of the next two ttls passes.
    await wait_for(cluster.dsn, "SELECT count(*) = 3 FROM gateway.replicas WHERE heartbeat_at > $1", back)
    await asyncio.sleep(2 * 1.5)
    assert await val(cluster.dsn, "SELECT count(*) FROM gateway.replicas") == 3
    assert sorted(await logged_changes(cluster.dsn)) == [(f"user{i}", "online") for i in range(3)]


async def test_a_client_flipping_its_status_is_coalesced_and_its_last_status_wins(cluster: Cluster) -> None:
    # Every published change is a transaction, a log row and a frame to every watcher.
    (gw,) = await cluster.start(1)
    watcher = await cluster.watch(gw, "watch")
    flapper = await cluster.connect(gw, "mallory")
    await watcher.until({"mallory": "online"})
    before = len(watcher.of("mallory"))
    flips = ["away" if i % 2 == 0 else "online" for i in range(31)]  # ends "away"
    for status in flips:  # 16 a second: within GATEWAY_MESSAGE_RATE, each its own write
        await flapper.send({"type": "status", "status": status})
        await asyncio.sleep(0.06)
    await watcher.until({"mallory": "away"})
    await asyncio.sleep(2.5)  # anything still due is published by now; read it
    with contextlib.suppress(TimeoutError):
        while True:
            watcher._apply(await watcher.client.recv(0.5))
    published = watcher.of("mallory")[before:]
    assert 1 <= len(published) <= 6, f"{len(flips)} flips, {len(published)} published: {published}"
    assert published[-1] == "away" and watcher.status["mallory"] == "away"


async def test_a_replica_prunes_offline_users_past_the_retention(cluster: Cluster) -> None:
    (gw,) = await cluster.start(1, retention_interval="1")
    watcher = Watcher(await cluster.connect(gw, "watch", WATCH))
    subscribed = await watcher.subscribe()
    # Each change after the one at the ack's position is a frame still to come.
    replayed = len(watcher.changes)
    await cluster.connect(gw, "alice")
    conn = await pg_connect(cluster.dsn)
    for user in ("ghost1", "ghost2", "recent"):
        await _make_offline(conn, user, [TOPIC])
    await wait_for(cluster.dsn, "SELECT status = 'online' FROM gateway.presence WHERE user_id = 'alice'")
    head = await conn.fetchval("SELECT pos FROM gateway.topics WHERE topic = $1", TOPIC)
    events = await conn.fetchval("SELECT count(*) FROM gateway.events")

    # Gone for long enough from here on; alice online, last seen a month ago, is kept.
    for user, days in (("ghost1", 8), ("ghost2", 30), ("recent", 6), ("alice", 30)):
        await _last_seen(conn, user, days)
    await wait_for(
        cluster.dsn, "SELECT NOT EXISTS (SELECT FROM gateway.presence WHERE user_id LIKE 'ghost%')"
    )
    rows = await conn.fetch("SELECT user_id, status FROM gateway.presence ORDER BY user_id")
    assert [tuple(r) for r in rows] == [("alice", "online"), ("recent", "offline"), ("watch", "online")]
    assert "presence: deleted 2 row(s) of users offline" in (cluster.tmp_path / "gw0.log").read_text()

    # Nothing published: no event, so the subscriber gets the changes up to the head, no more.
    assert await conn.fetchval("SELECT count(*) FROM gateway.events") == events
    assert await conn.fetchval("SELECT pos FROM gateway.topics WHERE topic = $1", TOPIC) == head
    deadline = time.monotonic() + 20
    while len(watcher.changes) < replayed + head - subscribed["pos"] and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            watcher._apply(await watcher.client.recv(0.5))
    with contextlib.suppress(TimeoutError):
        while True:
            watcher._apply(await watcher.client.recv(0.5))
    assert len(watcher.changes) == replayed + head - subscribed["pos"], watcher.changes
    assert watcher.of("ghost1") == watcher.of("ghost2") == ["online", "offline"]


# --- the heartbeat, on a connection of its own -----------------------------------------------

# In-process gateways (the test reaches into their pool): a ttl of four intervals, a pool of two.
HEARTBEAT = {
    "presence": "true",
    "heartbeat_interval": "0.5",
    "heartbeat_ttl": "2",
    "presence_grace": "1",
    "pool_size": "2",
}
TTL = datetime.timedelta(seconds=2)
GRACE = datetime.timedelta(seconds=1)


async def test_a_replica_whose_pool_stays_busy_longer_than_the_ttl_is_not_declared_dead(dsn: str) -> None:
    """A reconnect storm (each presence subscribe reads a snapshot) can keep every pool
    connection busy for longer than the ttl. The heartbeat must still arrive: otherwise the
    other replicas' sweeps remove this live replica, and its users flicker offline."""
    async with running_gateway(dsn, **HEARTBEAT) as gw:
        replica = gw.state.ctx.presence.replica_id
        await gw.connect("alice")
        await wait_for(dsn, "SELECT status = 'online' FROM gateway.presence WHERE user_id = 'alice'")
        pool = gw.state.pool
        held = [await pool.acquire() for _ in range(pool.get_max_size())]
        try:
            with pytest.raises(TimeoutError):  # nothing else in the gateway gets a connection now
                await pool.acquire(timeout=0.1)
            # Another replica's sweeper, sweeping as often as it can, with this one's ttl.
            other = await pg_connect(dsn)
            start = await other.fetchval("SELECT now()")
            beat = None

            async def beat_past_twice_the_ttl() -> bool:
                nonlocal beat
                await other.fetchval("SELECT gateway.presence_sweep($1, $2)", TTL, GRACE)
                beat = await other.fetchval(
                    "SELECT heartbeat_at FROM gateway.replicas WHERE replica_id = $1", replica
                )
                assert beat is not None, "the replica was declared dead while its pool was busy"
                # it kept beating through twice the ttl of a pool it could not use
                return bool(beat > start + 2 * TTL)

            await eventually(
                beat_past_twice_the_ttl,
                60,
                lambda: f"the heartbeat to go on (it stopped at {beat}; pool busy since {start})",
                interval=0.1,
            )
            with pytest.raises(TimeoutError):  # and the pool was busy all along
                await pool.acquire(timeout=0.1)
        finally:
            for conn in held:
                await pool.release(conn)
        assert await logged_changes(dsn) == [("alice", "online")]


async def test_the_heartbeat_connection_is_replaced_when_it_breaks_or_stops_answering(dsn: str) -> None:
    """Killed or stuck, the heartbeat's connection is closed and a new one made at the next
    beat; there is never more than one left, and it closes with the gateway."""
    admin = await pg_connect(dsn)

    async def heartbeat_backends(waiting: bool = False) -> list[int]:
        """The backends whose last query is the heartbeat's (the pool never sends it)."""
        rows = await admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE query = $1 AND (NOT $2 OR wait_event_type = 'Lock') "
            "ORDER BY pid",
            BEAT,
            waiting,
        )
        return [r["pid"] for r in rows]

    async def beats_after(moment: datetime.datetime) -> bool:
        beat = await admin.fetchval(
            "SELECT heartbeat_at FROM gateway.replicas WHERE replica_id = $1", replica
        )
        return beat is not None and beat > moment

    async def exactly(n: int) -> bool:
        return len(await heartbeat_backends()) == n

    async with running_gateway(dsn, **HEARTBEAT) as gw:
        replica = gw.state.ctx.presence.replica_id
        await eventually(heartbeat_backends, 20, "the heartbeat's connection")
        (first,) = await heartbeat_backends()
        assert first == gw.state.ctx.presence.heartbeat.backend_pid

        # Broken: the next beat connects again.
        assert await admin.fetchval("SELECT pg_terminate_backend($1, 10000)", first)  # waits for its exit
        killed = await admin.fetchval("SELECT now()")
        await eventually(lambda: beats_after(killed), 20, "a heartbeat after its connection was killed")
        (second,) = await heartbeat_backends()
        assert second != first

        # Not answering (its UPDATE waits for a row lock the test holds): each beat is given up
        # at its deadline and the next one tried on a new connection.
        # (Another connection: pg_stat_activity stays as first read for a whole transaction.)
        locker = await pg_connect(dsn)
        async with locker.transaction():
            await locker.execute("SELECT FROM gateway.replicas WHERE replica_id = $1 FOR UPDATE", replica)
            seen: set[int] = set()

            async def two_stuck_connections() -> bool:
                seen.update(await heartbeat_backends(waiting=True))
                return len(seen) >= 2

            await eventually(two_stuck_connections, 30, "the stuck heartbeat to be given up and retried")
        released = await admin.fetchval("SELECT now()")
        await eventually(lambda: beats_after(released), 20, "a heartbeat once the lock was released")
        # Given up means closed: one connection is left, not one per deadline missed.
        await eventually(lambda: exactly(1), 20, "one heartbeat connection")

    # Stopped with the gateway.
    await eventually(lambda: exactly(0), 20, "the heartbeat connection to close")
