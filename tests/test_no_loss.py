"""No lost events: every committed change reaches every subscriber exactly once, in commit order.

Each test compares what clients received with the log itself (``gateway.events``): the same
positions, ops and keys, in the same order, nothing missing and nothing twice. "Nothing
more" is checked by committing a marker last and requiring it to be the next event, never
by waiting for silence.

Everything is real: PostgreSQL, the capture trigger, the listener, WebSocket sockets, and a
second gateway running as its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from .gwtest import (
    Client,
    Closed,
    Gateway,
    GatewayProcess,
    running_gateway,
    wait_for_lock_wait,
)
from .pgconn import pg_connect
from .polling import eventually

TABLES = "public.items"
TOPIC = "user:1"
OPS = {"i": "insert", "u": "update", "d": "delete", "m": "message"}
# Errors a writer sees while PostgreSQL restarts or its backend is killed. After one of these
# the outcome of an in-flight COMMIT is unknown and must be read back from the table.
# asyncpg may also raise InternalClientError on a connection whose backend was terminated
# (MagicStack/asyncpg#784, #1069).
CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)

Seq = list[tuple[int, str, str | None]]  # (pos, op, key)


# --- helpers -------------------------------------------------------------------------------


async def log_seq(dsn: str, topic: str = TOPIC) -> Seq:
    """The topic's committed sequence, as the log has it."""
    conn = await pg_connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pos, op::text AS op, key FROM gateway.events WHERE topic = $1 ORDER BY pos", topic
        )
    finally:
        await conn.close()
    return [(r["pos"], OPS[r["op"]], r["key"]) for r in rows]


def seq(events: list[dict[str, Any]]) -> Seq:
    return [(e["pos"], e["op"], e.get("key")) for e in events]


async def head(dsn: str, topic: str = TOPIC) -> int:
    conn = await pg_connect(dsn)
    try:
        return int(
            await conn.fetchval("SELECT coalesce(max(pos), 0) FROM gateway.topics WHERE topic = $1", topic)
        )
    finally:
        await conn.close()


async def wait_head(dsn: str, at_least: int, timeout: float = 60.0) -> int:
    """Wait until the topic's head reaches ``at_least`` (writers are running meanwhile)."""

    async def reached() -> int | None:
        with contextlib.suppress(*CONNECTION_ERRORS):
            h = await head(dsn)
            if h >= at_least:
                return h
        return None

    return await eventually(reached, timeout, f"the head of {TOPIC} to reach {at_least}", interval=0.05)


async def commit_marker(dsn: str) -> int:
    """Commit one more row and return its position: once a client has it, it has everything."""
    conn = await pg_connect(dsn)
    try:
        await conn.execute("INSERT INTO items (owner_id, title) VALUES (1, 'marker')")
        return int(await conn.fetchval("SELECT pos FROM gateway.topics WHERE topic = $1", TOPIC))
    finally:
        await conn.close()


async def drop(client: Client) -> None:
    """Cut the client's TCP connection without a close frame, as a network failure would."""
    assert client.ws is not None
    sock = client.ws.get_extra_info("socket")
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        await client.close()


class Reader:
    """Reads every frame a client receives, in the background, so no socket backs up."""

    def __init__(self, client: Client, name: str, log_path: Path | None = None) -> None:
        self.client = client
        self.name = name
        self.log_path = log_path  # a gateway process's log, quoted when something is missing
        self.frames: list[dict[str, Any]] = []
        self.closed: Closed | None = None
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                self.frames.append(await self.client.recv(timeout=3600))
        except Closed as exc:
            self.closed = exc

    @property
    def events(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == "event"]

    async def wait_pos(self, pos: int, timeout: float = 60.0) -> None:

        def arrived() -> bool:
            if self.closed is not None:
                raise AssertionError(f"{self.name} was disconnected ({self.closed}) before position {pos}")
            return any(e["pos"] >= pos for e in self.events)

        def missing() -> str:
            last = self.events[-1]["pos"] if self.events else None
            errors = ""
            if self.log_path is not None:
                lines = self.log_path.read_text(errors="replace").splitlines()
                errors = "\n".join(line for line in lines if " error " in line or "Error:" in line)
            return f"{self.name} to get position {pos} (last: {last})\n{errors}"

        await eventually(arrived, timeout, missing, interval=0.02)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.client.close()


@contextlib.asynccontextmanager
async def gateway_process(
    dsn: str, tmp_path: Path, name: str, **settings: Any
) -> AsyncIterator[GatewayProcess]:
    log_path = tmp_path / f"{name}.log"
    gw = GatewayProcess(dsn, log_path, tables=TABLES, **settings)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


async def subscribed_readers(gateways: list[tuple[str, Gateway]]) -> tuple[list[Reader], str]:
    readers = []
    epochs = set()
    for name, gw in gateways:
        c = await gw.connect("1")
        ack = await c.subscribe(TOPIC)
        assert ack["events"] == [] and "recovered" not in ack, ack
        epochs.add(ack["epoch"])
        readers.append(Reader(c, name, gw.log_path if isinstance(gw, GatewayProcess) else None))
    assert len(epochs) == 1, f"subscribers of one topic were told different epochs: {epochs}"
    return readers, epochs.pop()


async def assert_all_got_the_log(dsn: str, readers: list[Reader], epoch: str) -> Seq:
    marker = await commit_marker(dsn)
    expected = await log_seq(dsn)
    assert [p for p, _, _ in expected] == list(range(1, marker + 1)), "the log has holes"
    for r in readers:
        await r.wait_pos(marker)
        assert r.closed is None, f"{r.name} was disconnected: {r.closed}"
        got = seq(r.events)
        assert got == expected, f"{r.name} received a different sequence than the log: {diff(got, expected)}"
        assert {e["epoch"] for e in r.events} == {epoch}
        stray = [f for f in r.frames if f["type"] != "event"]
        assert stray == [], f"{r.name} got unexpected frames: {stray[:3]}"
    return expected


def diff(got: Seq, expected: Seq) -> str:
    for i, (g, e) in enumerate(itertools.zip_longest(got, expected)):
        if g != e:
            return (
                f"first difference at index {i}: got {g}, log has {e} ({len(got)} vs {len(expected)} events)"
            )
    return "equal"


# --- 1. concurrent writers committing out of start order -----------------------------------


@dataclass
class WriterResult:
    n: int
    xid: int
    ids: list[str] = field(default_factory=list)
    rolled_back: bool = False
    locked: int = 0  # tick when its INSERT returned, i.e. it held the topic's row lock
    committing: int = 0  # tick just before it sent COMMIT (or ROLLBACK)


async def test_concurrent_writers_reach_every_subscriber_in_commit_order(items: str, tmp_path: Path) -> None:
    n_writers = 20
    rng = random.Random(20240611)
    tick = itertools.count()
    async with (
        running_gateway(items, tables=TABLES) as gw_a,
        gateway_process(items, tmp_path, "gw_b") as gw_b,
    ):
        readers, epoch = await subscribed_readers([("a1", gw_a), ("a2", gw_a), ("b1", gw_b), ("b2", gw_b)])
        conns = [await pg_connect(items) for _ in range(n_writers)]
        started = asyncio.Barrier(n_writers)

        async def writer(n: int) -> WriterResult:
            conn = conns[n]
            # Single rows, multi-row statements, and 50-row statements (over the doorbell's
            # 40-event limit, so they ring with a position range instead of naming events).
            rows = 50 if n % 5 == 0 else 1 + n % 3
            tx = conn.transaction()
            await tx.start()
            result = WriterResult(n, int(await conn.fetchval("SELECT txid_current()")))
            # Every transaction has started before any appends: the order they commit in
            # is then decided by the random holds below, not by the order they began.
            await started.wait()
            await asyncio.sleep(rng.uniform(0, 0.03))
            keys = await conn.fetch(
                "INSERT INTO items (owner_id, title) SELECT 1, $1 || '/' || g FROM generate_series(1, $2) g "
                "RETURNING id::text",
                f"w{n}",
                rows,
            )
            result.locked = next(tick)
            result.ids = [r["id"] for r in keys]
            await asyncio.sleep(rng.uniform(0, 0.01))  # hold the topic's lock a little
            result.committing = next(tick)
            if n % 7 == 3:
                result.rolled_back = True
                await tx.rollback()
            else:
                await tx.commit()
            return result

        results = await asyncio.gather(*(writer(n) for n in range(n_writers)))
        for c in conns:
            await c.close()

        # The log: positions 1..N with no hole (rolled-back writers left none), each committed
        # writer's rows together and in statement order.
        log = await log_seq(items)
        committed = [r for r in results if not r.rolled_back]
        total = sum(len(r.ids) for r in committed)
        assert [p for p, _, _ in log] == list(range(1, total + 1))
        owner = {key: r for r in results for key in r.ids}
        assert all(owner[k].rolled_back is False for _, _, k in log if k is not None)
        blocks = [next(g) for _, g in itertools.groupby(owner[k] for _, _, k in log if k is not None)]
        assert len(blocks) == len(committed), "a writer's rows are not contiguous in the log"
        for b in blocks:
            keys = [k for _, _, k in log if k is not None and owner[k] is b]
            assert keys == b.ids
        # Commit order: the writer after another in the log got the topic's lock only after
        # the one before it had sent COMMIT (the lock is held until the transaction ends).
        for before, after in itertools.pairwise(blocks):
            assert after.locked > before.committing, (before, after)
        # And the scenario really had transactions committing out of the order they began.
        xids = [b.xid for b in blocks]
        assert xids != sorted(xids), "every writer committed in start order; the test proved nothing"

        await assert_all_got_the_log(items, readers, epoch)
        for r in readers:
            await r.stop()


# --- 2. a client drops and resumes, on the same gateway and on another one ---------------


async def continuous_writer(dsn: str, stop: asyncio.Event) -> int:
    """Commit rows one statement at a time (sometimes three rows at once) until ``stop``."""
    conn = await pg_connect(dsn)
    n = 0
    try:
        while not stop.is_set():
            rows = 3 if n % 4 == 0 else 1
            await conn.execute(
                "INSERT INTO items (owner_id, title) SELECT 1, 'c' || $1 || '/' || g FROM generate_series(1, $2) g",
                str(n),
                rows,
            )
            n += 1
            await asyncio.sleep(0.003)
    finally:
        await conn.close()
    return n


async def test_client_resumes_on_same_and_other_gateway_without_loss_or_duplicate(
    items: str, tmp_path: Path
) -> None:
    async with (
        running_gateway(items, tables=TABLES) as gw_a,
        gateway_process(items, tmp_path, "gw_b") as gw_b,
    ):
        client = await gw_a.connect("1")
        ack = await client.subscribe(TOPIC)
        epoch = ack["epoch"]
        # Only now: rows committed before the subscription are not the client's to receive,
        # and its stream is compared with the whole log below.
        stop = asyncio.Event()
        writing = asyncio.create_task(continuous_writer(items, stop))
        try:
            received: list[dict[str, Any]] = []
            for hop, gw in enumerate([gw_a, gw_b, gw_b, gw_a]):
                received += await client.events(10)
                last = received[-1]["pos"]
                await drop(client)
                # Let the writer get well past the client, so the resume has to replay.
                await wait_head(items, last + 10)
                client = await gw.connect("1")
                ack = await client.subscribe(TOPIC, since=(epoch, last))
                replayed = ack["events"]
                # The seam: the missed events, then `subscribed`, then live events from pos+1.
                assert ack["recovered"] is True, (hop, ack)
                assert ack["epoch"] == epoch
                assert ack.get("replayed", 0) == len(replayed) >= 10
                assert [e["pos"] for e in replayed] == list(range(last + 1, ack["pos"] + 1)), hop
                received += replayed
                (live,) = await client.events(1)
                assert live["pos"] == ack["pos"] + 1, (hop, ack["pos"], live["pos"])
                received.append(live)
        finally:
            stop.set()
            await writing
        # Everything since the last hop, then a marker: the whole history must be the log.
        marker = await commit_marker(items)
        received += await client.events(marker - received[-1]["pos"])
        await client.close()
        expected = await log_seq(items)
        assert [p for p, _, _ in expected] == list(range(1, marker + 1)), "the log has holes"
        got = seq(received)
        assert got == expected, diff(got, expected)
        assert {e["epoch"] for e in received} == {epoch}


# --- 3. the listener is killed, then PostgreSQL restarts, while writes continue ------------


@dataclass
class RetryingWriter:
    """Commits one row per statement, reconnecting through failures.

    A statement that failed with a connection error may or may not have committed (the
    COMMIT may have been applied before the connection broke): such titles are kept in
    ``unknown`` and looked up in the table afterwards, so ``committed`` is exact.
    """

    dsn: str
    name: str
    committed: set[str] = field(default_factory=set)
    unknown: list[str] = field(default_factory=list)
    failures: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        conn: asyncpg.Connection | None = None
        n = 0
        while not stop.is_set():
            title = f"{self.name}/{n}"
            n += 1
            try:
                if conn is None or conn.is_closed():
                    conn = await pg_connect(self.dsn, timeout=2)
                await conn.execute("INSERT INTO items (owner_id, title) VALUES (1, $1)", title)
                self.committed.add(title)
            except CONNECTION_ERRORS as exc:
                self.failures += 1
                assert self.failures < 500, f"{self.name} keeps failing: {exc!r}"
                self.unknown.append(title)
                if conn is not None:
                    conn.terminate()
                conn = None
                await asyncio.sleep(0.1)
                continue
            await asyncio.sleep(0.005)
        if conn is not None:
            await conn.close()

    async def settle(self, conn: asyncpg.Connection) -> None:
        found = await conn.fetch("SELECT title FROM items WHERE title = ANY($1::text[])", self.unknown)
        self.committed |= {r["title"] for r in found}


@pytest.mark.timeout(180)
async def test_listener_kill_and_postgres_restart_lose_nothing_and_keep_client_sockets(
    items: str, tmp_path: Path, pg_restart: Any
) -> None:
    # The gateways name themselves, so their backends can be found in pg_stat_activity.
    async with (
        running_gateway(items + "?application_name=gw_a", tables=TABLES) as gw_a,
        gateway_process(items + "?application_name=gw_b", tmp_path, "gw_b") as gw_b,
    ):
        readers, epoch = await subscribed_readers([("a1", gw_a), ("a2", gw_a), ("b1", gw_b), ("b2", gw_b)])
        stop = asyncio.Event()
        writers = [RetryingWriter(items, f"w{n}") for n in range(3)]
        tasks = [asyncio.create_task(w.run(stop)) for w in writers]
        try:
            await wait_head(items, 30)
            # Kill both gateways' LISTEN backends (the in-process one by its pid).
            listener = gw_a.state.listener
            old_pid = listener.backend_pid
            admin = await pg_connect(items)
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", old_pid)
            killed_b = await admin.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                # Its last statement: one of its LISTENs (the replica bus's channel is the last
                # one), or the probe.
                "WHERE application_name = 'gw_b' "
                "AND query IN ('LISTEN \"gateway\"', 'LISTEN \"gateway_bus\"', 'SELECT 1')"
            )
            await admin.close()
            assert killed_b >= 1, "found no LISTEN backend of the second gateway"
            h = await wait_head(items, 0)
            await wait_head(items, h + 30)
            await eventually(
                lambda: listener.connected and listener.backend_pid != old_pid,
                30,
                "the listener to reconnect",
                interval=0.05,
            )

            # Then every backend of both gateways at once (listener and pool, as a failover or
            # an idle-session timeout would), a few times, each time while events are flowing.
            for _ in range(3):
                await gw_a.wait_ready(30)  # listener connected and a pool connection open
                await gw_b.wait_ready(30)
                admin = await pg_connect(items)
                killed = await admin.fetchval(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name IN ('gw_a', 'gw_b')"
                )
                await admin.close()
                assert killed >= 4, f"expected the backends of two gateways, terminated {killed}"
                h = await wait_head(items, 0)
                await wait_head(items, h + 20)

            # Now restart PostgreSQL itself; the writers keep trying through it.
            h = await wait_head(items, 0)
            await pg_restart.arestart()
            await wait_head(items, h + 30)
            await gw_a.wait_ready(30)
            await gw_b.wait_ready(30)
        finally:
            stop.set()
            await asyncio.gather(*tasks)

        check = await pg_connect(items)
        try:
            for w in writers:
                await w.settle(check)
            table = {r["title"]: str(r["id"]) for r in await check.fetch("SELECT id, title FROM items")}
        finally:
            await check.close()
        assert sum(w.failures for w in writers) > 0, "no writer saw the restart; the test proved nothing"
        committed = set().union(*(w.committed for w in writers))
        assert committed == set(table), "a writer's idea of what committed differs from the table"

        # Client sockets stayed up through both (checked in assert_all_got_the_log: no Closed),
        # and every client has exactly the log, which has exactly the committed rows.
        expected = await assert_all_got_the_log(items, readers, epoch)
        keys = [str(k) for _, _, k in expected]
        assert keys[-1] not in table.values()  # the marker, committed after the table was read
        assert sorted(keys[:-1]) == sorted(table.values()), "the log and the committed rows differ"
        for r in readers:
            await r.stop()


# --- 4. resume outside and inside the replay window ---------------------------------------


async def test_resume_windows_stale_epoch_and_head(items: str) -> None:
    async with running_gateway(items, tables=TABLES, replay_max_events=5, replay_max_age="1h") as gw:
        db = await pg_connect(items)

        async def insert(n: int) -> None:
            await db.execute(
                "INSERT INTO items (owner_id, title) SELECT 1, 'r' || g FROM generate_series(1, $1) g", n
            )

        async def resume(since: tuple[str, int]) -> tuple[Client, dict[str, Any]]:
            c = await gw.connect("1")
            return c, await c.subscribe(TOPIC, since=since)

        live = await gw.connect("1")
        epoch = (await live.subscribe(TOPIC))["epoch"]
        await insert(3)
        await live.events(3)
        await insert(8)  # head 11: a client that saw 3 missed 8, more than the window of 5
        await live.events(8)
        log = await log_seq(items)
        clients = []

        c, ack = await resume((epoch, 3))
        clients.append(c)
        assert (ack["recovered"], ack.get("replayed", 0), ack["events"]) == (False, 0, [])
        assert (ack["epoch"], ack["pos"]) == (epoch, 11)

        c, ack = await resume((epoch, 11))  # exactly at the head
        clients.append(c)
        assert (ack["recovered"], ack.get("replayed", 0), ack["events"], ack["pos"]) == (True, 0, [], 11)

        c, ack = await resume((epoch, 6))  # exactly the window: 5 missed
        clients.append(c)
        assert ack["recovered"] is True and ack.get("replayed", 0) == 5
        assert seq(ack["events"]) == log[6:11]

        c, ack = await resume((epoch, 8))  # inside the window
        clients.append(c)
        assert ack["recovered"] is True and ack.get("replayed", 0) == 3
        assert seq(ack["events"]) == log[8:11]
        assert all(e["row"]["title"].startswith("r") for e in ack["events"])

        c, ack = await resume((epoch, 12))  # ahead of the head: not this stream
        clients.append(c)
        assert (ack["recovered"], ack["events"], ack["pos"]) == (False, [], 11)

        # Every one of them, recovered or not, is live from the head on.
        await insert(1)
        for c in [live, *clients]:
            (e,) = await c.events(1)
            assert (e["pos"], e["epoch"]) == (12, epoch)

        # Inside the count window but older than GATEWAY_REPLAY_MAX_AGE: not recoverable.
        await db.execute(
            "UPDATE gateway.events SET created_at = now() - interval '2 hours' WHERE topic = $1 AND pos = 10",
            TOPIC,
        )
        c, ack = await resume((epoch, 9))
        clients.append(c)
        assert (ack["recovered"], ack["events"]) == (False, [])
        c, ack = await resume((epoch, 10))  # 11 and 12 are young enough
        clients.append(c)
        assert ack["recovered"] is True and [e["pos"] for e in ack["events"]] == [11, 12]

        # The topic is started over: the old epoch cannot be resumed, even at its head.
        await db.execute("SELECT gateway.reset_topic($1)", TOPIC)
        c, ack = await resume((epoch, 12))
        clients.append(c)
        assert (ack["recovered"], ack["events"], ack["pos"]) == (False, [], 0)
        new_epoch = ack["epoch"]
        assert new_epoch != epoch
        await insert(1)
        (e,) = await c.events(1)
        assert (e["pos"], e["epoch"]) == (1, new_epoch)
        # A subscriber that was live across the reset is told to reload, then gets the new stream.
        frames = [await live.recv(), await live.recv()]
        assert frames[0]["type"] == "subscribed" and frames[0]["recovered"] is False, frames
        assert frames[0]["epoch"] == new_epoch
        assert (frames[1]["type"], frames[1]["pos"], frames[1]["epoch"]) == ("event", 1, new_epoch)

        for c in [live, *clients]:
            await c.close()
        await db.close()


# --- 6. a position gap on the live path is filled from the log ------------------------------


async def test_gap_on_live_path_is_filled_from_log_before_later_events(items: str) -> None:
    async with running_gateway(items, tables=TABLES) as gw:
        client = await gw.connect("1", topics=["room:ctl"])
        epoch = (await client.subscribe(TOPIC))["epoch"]
        await client.subscribe("room:ctl")
        db = await pg_connect(items)
        await db.execute("INSERT INTO items (owner_id, title) VALUES (1, 'normal 1')")
        (first,) = await client.events(1)
        assert first["pos"] == 1

        # Append three events by hand, with no doorbell: two rows written with the capture
        # trigger switched off, and one hand-made message, all with a transaction id older
        # than any snapshot the relay has seen (3, the first normal one), so the relay never
        # finds them (gateway/relay.py). The gateway cannot know of them.
        async with db.transaction():
            await db.execute("SET LOCAL session_replication_role = replica")
            ids = [
                str(r["id"])
                for r in await db.fetch(
                    "INSERT INTO items (owner_id, title) VALUES (1, 'silent a'), (1, 'silent b') RETURNING id"
                )
            ]
            hd = await db.fetchval(
                "UPDATE gateway.topics SET pos = pos + 3 WHERE topic = $1 RETURNING pos", TOPIC
            )
            assert hd == 4
            await db.executemany(
                "INSERT INTO gateway.events (topic, pos, op, tbl, key, data, xid) "
                "VALUES ($1, $2, $3::text::\"char\", $4, $5, $6::jsonb, '3'::xid8)",
                [
                    (TOPIC, 2, "i", TABLES, ids[0], None),
                    (TOPIC, 3, "i", TABLES, ids[1], None),
                    (TOPIC, 4, "m", None, None, '{"hand": true}'),
                ],
            )
        # Proof the gateway was not told: an event on another topic committed after them
        # arrives, and nothing of user:1 came before it.
        await db.execute("SELECT gateway.emit('room:ctl', '{}')")
        (ctl,) = await client.events(1)
        assert ctl["topic"] == "room:ctl"

        filled = gw.state.pipeline.log_reads
        await db.execute("INSERT INTO items (owner_id, title) VALUES (1, 'normal 5')")
        events = await client.events(4)
        assert [(e["pos"], e["op"]) for e in events] == [
            (2, "insert"),
            (3, "insert"),
            (4, "message"),
            (5, "insert"),
        ]
        assert [e.get("row", {}).get("title") for e in events] == ["silent a", "silent b", None, "normal 5"]
        assert events[2]["data"] == {"hand": True}
        assert {e["epoch"] for e in events} == {epoch}
        assert gw.state.pipeline.log_reads > filled
        assert seq([first, *events]) == await log_seq(items)

        # Positions whose events are gone from the log (pruned before they were read) are
        # never skipped silently: the subscriber is told to reload, then the stream goes on.
        await db.execute("UPDATE gateway.topics SET pos = pos + 2 WHERE topic = $1", TOPIC)
        await db.execute("INSERT INTO items (owner_id, title) VALUES (1, 'after the hole')")
        frame = await client.recv()
        assert frame["type"] == "subscribed" and frame["recovered"] is False and frame["pos"] == 8, frame
        await db.execute("INSERT INTO items (owner_id, title) VALUES (1, 'next')")
        (nxt,) = await client.events(1)
        assert (nxt["pos"], nxt["row"]["title"]) == (9, "next")
        await client.close()
        await db.close()


# --- joins must not wait for writers --------------------------------------------------------


async def test_open_writer_transaction_does_not_stall_other_topics_when_its_topic_is_joined(
    items: str,
) -> None:
    """A subscribe reads the topic's head while a writer holds the topic's row lock (an open
    transaction that appended to it). That read must not wait for the writer: the pipeline is
    one task, so a join that waits stalls every topic of the gateway until the writer ends."""
    async with running_gateway(items, tables=TABLES) as gw:
        db = await pg_connect(items)
        holder = await pg_connect(items)
        other = await gw.connect("2")
        await other.subscribe("user:2")
        await db.execute("INSERT INTO items (owner_id, title) VALUES (1, 'topic exists')")
        tx = holder.transaction()
        await tx.start()
        await holder.execute("INSERT INTO items (owner_id, title) VALUES (1, 'held open')")
        try:
            joiner = await gw.connect("1")
            await joiner.subscribe(TOPIC, expect=False)  # its join reads user:1's head
            await db.execute("INSERT INTO items (owner_id, title) VALUES (2, 'other topic')")
            try:
                (e,) = await other.events(1, timeout=10)
            except TimeoutError:
                raise AssertionError(
                    "an event on user:2 did not arrive while a join of user:1 was pending: "
                    "the join waits for the writer's row lock and stalls the whole pipeline"
                ) from None
            assert e["row"]["title"] == "other topic"
            ack = await joiner.expect("subscribed")
            assert ack["pos"] == 1
        finally:
            await tx.rollback()
        await joiner.close()
        await other.close()
        await holder.close()
        await db.close()


# --- TRUNCATE is a committed change like any DELETE -------------------------------------------


async def test_truncate_of_a_published_table_delivers_a_delete_of_every_row(items: str) -> None:
    """TRUNCATE removes every row without firing row triggers. Its subscribers must still be
    told each row is gone, in order, and a resume from before it must replay the deletes:
    otherwise they show the rows forever and a resume says recovered with nothing missed."""
    async with running_gateway(items, tables=TABLES) as gw:
        client = await gw.connect("1")
        epoch = (await client.subscribe(TOPIC))["epoch"]
        db = await pg_connect(items)
        ids = [
            str(r["id"])
            for r in await db.fetch(
                "INSERT INTO items (owner_id, title) VALUES (1, 'a'), (2, 'other'), (1, 'b') RETURNING id"
            )
        ]
        inserted = await client.events(2)
        assert [(e["pos"], e["op"], e["key"]) for e in inserted] == [
            (1, "insert", ids[0]),
            (2, "insert", ids[2]),
        ]

        await db.execute("TRUNCATE items")
        marker = await commit_marker(items)
        got = await client.events(marker - 2)
        assert sorted((e["op"], e["key"]) for e in got[:-1]) == [("delete", ids[0]), ("delete", ids[2])], got
        assert [e["pos"] for e in got] == [3, 4, 5]
        assert got[-1]["row"]["title"] == "marker"
        assert seq(inserted + got) == await log_seq(items)
        # The other owner's row is deleted on its own topic.
        assert [(op, key) for _, op, key in await log_seq(items, "user:2")] == [
            ("insert", ids[1]),
            ("delete", ids[1]),
        ]

        # A client that saw only the inserts resumes and is replayed the deletes.
        late = await gw.connect("1")
        ack = await late.subscribe(TOPIC, since=(epoch, 2))
        assert ack["recovered"] is True
        assert [(e["pos"], e["op"]) for e in ack["events"]] == [(3, "delete"), (4, "delete"), (5, "insert")]
        await late.close()
        await client.close()
        await db.close()


# --- a reset racing the live path -----------------------------------------------------------


async def test_a_doorbell_of_the_old_epoch_read_after_a_reset_never_delivers_the_new_stream_s_events(
    items: str,
) -> None:
    """The relay rings room:1's position 2 of epoch E1; before the gateway reads it from the log
    (the pipeline is busy: here it waits for a table lock while resolving the batch before),
    the topic is reset and written again, so position 2 of the log is now E2's. The gateway
    must not deliver E2's event as E1's position 2: a client would apply an event twice under
    two names, or one that never existed under that name. (batch_max=1 keeps that doorbell in
    a batch of its own, as a busy pipeline would when the reset commits during its read.)"""
    async with running_gateway(items, tables=TABLES, batch_max=1) as gw:
        client = await gw.connect("1", topics=["room:1"])
        await client.subscribe(TOPIC)
        e1 = (await client.subscribe("room:1"))["epoch"]
        db, writer, holder = await pg_connect(items), await pg_connect(items), await pg_connect(items)
        await db.execute("""SELECT gateway.emit('room:1', '"a"')""")
        (a,) = await client.events(1)
        assert (a["epoch"], a["pos"], a["data"]) == (e1, 1, "a")

        # Make the pipeline wait while resolving a row of items: the lock is queued behind the
        # writer's, so it is granted at the writer's commit, before the gateway's SELECT.
        tx = writer.transaction()
        await tx.start()
        await writer.execute("INSERT INTO items (owner_id, title) VALUES (1, 'blocked')")
        lock = holder.transaction()
        await lock.start()
        locking = asyncio.ensure_future(holder.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE"))
        await wait_for_lock_wait(db, "LOCK TABLE items%", "the lock to queue behind the writer")
        await tx.commit()
        await locking
        await wait_for_lock_wait(db, "SELECT %items%", "the gateway to wait for the lock")

        rung = gw.state.relay.rung
        await db.execute("""SELECT gateway.emit('room:1', '"b"')""")
        await eventually(lambda: gw.state.relay.rung > rung, 10, "the relay to ring E1's position 2")
        await db.execute("SELECT gateway.reset_topic('room:1')")
        await db.execute("""SELECT gateway.emit('room:1', '"x"'), gateway.emit('room:1', '"y"')""")
        e2 = await db.fetchval("SELECT epoch FROM gateway.topics WHERE topic = 'room:1'")
        await lock.rollback()

        committed = {(e1, 1): "a", (e1, 2): "b", (e2, 1): "x", (e2, 2): "y"}
        frames = []
        while not any(f.get("data") == "y" and f["epoch"] == e2 for f in frames):
            frame = await client.recv()
            if frame.get("topic") == "room:1":
                frames.append(frame)
        for f in frames:
            if f["type"] == "event":
                assert committed.get((f["epoch"], f["pos"])) == f["data"], (
                    f"got {f['data']!r} as {f['epoch']}:{f['pos']}; frames: {frames}"
                )
        assert [f["type"] for f in frames][-3:] == ["subscribed", "event", "event"], frames
        for conn in (db, writer, holder):
            await conn.close()
        await client.close()
