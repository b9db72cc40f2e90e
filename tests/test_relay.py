"""The relay (gateway/relay.py, sql/102_relay.sql) against a real PostgreSQL: writers ring it
only when it is quiet, it rings every committed event across its busy/quiet switches, and
another replica's relay takes over, losing nothing, when the leader's connection dies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import asyncpg
import pytest

from gateway.dev.pgcluster import LocalCluster
from gateway.migrate import migrate
from gateway.relay import Relay

from .gwtest import make_items_table, relay_running, running_gateway
from .pgconn import pg_connect
from .polling import eventually

pytestmark = pytest.mark.timeout(120)


class Rung:
    """Positions named by the doorbells on channel `gateway`, per topic."""

    def __init__(self) -> None:
        self.positions: dict[str, list[int]] = {}
        self.payloads = 0

    def __call__(self, _c: object, _pid: int, _channel: str, payload: str) -> None:
        self.payloads += 1
        bell = json.loads(payload)
        for topic, _epoch, pos, _op, _key in bell.get("ev", ()):
            self.positions.setdefault(topic, []).append(pos)
        for topic, _epoch, lo, hi in bell.get("rg", ()):
            self.positions.setdefault(topic, []).extend(range(lo, hi + 1))

    def distinct(self, topic: str) -> list[int]:
        return sorted(set(self.positions.get(topic, [])))

    async def wait_for(self, topic: str, n: int, timeout: float) -> None:

        def missing() -> str:
            have = self.distinct(topic)
            missing = sorted(set(range(1, n + 1)) - set(have))
            return f"{topic}: all {n} rung ({len(have)} rung; missing {missing[:20]})"

        await eventually(lambda: self.distinct(topic) == list(range(1, n + 1)), timeout, missing)


async def listen(dsn: str, channel: str, callback: Any) -> asyncpg.Connection:
    conn = await pg_connect(dsn)
    await conn.add_listener(channel, callback)
    return conn


async def make_table(dsn: str) -> None:
    conn = await pg_connect(dsn)
    await conn.execute("CREATE TABLE msgs (id bigserial PRIMARY KEY, room text NOT NULL)")
    await conn.execute("SELECT gateway.publish('msgs', $$'room:' || room$$)")
    await conn.close()


async def test_writers_ring_the_relay_once_per_statement_when_quiet_and_never_when_busy(dsn: str) -> None:
    await make_table(dsn)
    pokes: list[str] = []
    listener = await listen(dsn, "gateway_poll", lambda *a: pokes.append(a[3]))
    db = await pg_connect(dsn)

    async def count_pokes() -> int:
        """Pokes committed so far (a marker committed last arrives last)."""
        await db.execute("SELECT pg_notify('gateway_poll', 'marker')")
        await eventually(lambda: "marker" in pokes, 10, "the marker")
        n = pokes.index("marker")
        del pokes[: n + 1]
        return n

    await db.execute("SELECT setval('gateway.relay_awake_until', 0)")
    await db.execute("INSERT INTO msgs (room) SELECT 'r' || g FROM generate_series(1, 12) g")
    assert await count_pokes() == 1
    async with db.transaction():  # three statements, one commit: PostgreSQL folds the three
        for _ in range(3):
            await db.execute("INSERT INTO msgs (room) VALUES ('a')")
    await db.execute("SELECT gateway.emit('room:x', '{}')")
    assert await count_pokes() == 2
    await db.execute("UPDATE msgs SET room = room WHERE id < 0")  # no row: no event, no poke
    assert await count_pokes() == 0

    # The relay says it is polling anyway: writers send nothing.
    await db.execute("SELECT setval('gateway.relay_awake_until', $1)", int(time.time() * 1000) + 60_000)
    await db.execute("INSERT INTO msgs (room) SELECT 'r' || g FROM generate_series(1, 12) g")
    await db.execute("SELECT gateway.emit('room:x', '{}')")
    assert await count_pokes() == 0
    assert await db.fetchval("SELECT count(*) FROM gateway.events") == 12 + 3 + 1 + 12 + 1
    await listener.close()
    await db.close()


async def test_a_burst_of_writes_makes_the_quiet_relay_busy_within_a_fraction_of_a_second(dsn: str) -> None:
    """While the relay is quiet every writing transaction NOTIFYs it, which is what costs
    writers most (each such commit is serialized with the others). So a burst must turn it
    busy after a tenth of a second, not after a whole second of NOTIFYs."""
    await make_table(dsn)
    pokes: list[str] = []
    listener = await listen(dsn, "gateway_poll", lambda *a: pokes.append(a[3]))
    db = await pg_connect(dsn)
    async with relay_running(dsn, wake_rate=100) as relay:
        await eventually(lambda: relay.leader and not relay.awake, 10, "a quiet leader")
        await asyncio.sleep(0.3)
        written, start = 0, time.monotonic()
        while time.monotonic() - start < 0.8:  # a burst of single-row transactions, ~1000/s
            await db.execute("INSERT INTO msgs (room) VALUES ('a')")
            written += 1
            await asyncio.sleep(0.001)
        assert relay.awake
    await db.execute("SELECT pg_notify('gateway_poll', 'marker')")
    await eventually(lambda: "marker" in pokes, 10, "the marker")
    rung = pokes.index("marker")
    # Busy after ~0.1 s of the 0.8 s burst: the later transactions saw the flag and kept quiet.
    assert written > 150 and rung < written / 2, (written, rung)
    await listener.close()


async def test_a_writer_that_saw_the_relay_busy_is_rung_after_it_went_quiet(dsn: str) -> None:
    """The switch from busy to quiet: a REPEATABLE READ transaction writes while the relay is
    busy (so it sends no NOTIFY) and commits only after the load has stopped. The relay must
    not go quiet before that transaction ended, and must ring its event."""
    await make_table(dsn)
    rung = Rung()
    listener = await listen(dsn, "gateway", rung)
    db = await pg_connect(dsn)
    slow = await pg_connect(dsn)
    # idle_poll 30 s: in quiet mode only a writer's NOTIFY would make the relay look.
    async with relay_running(dsn, wake_rate=50, idle_poll=30.0, poll_interval=0.005) as relay:
        await eventually(lambda: relay.leader, 10, "leadership")
        load_done = asyncio.Event()

        async def load() -> int:
            n = 0
            while not load_done.is_set():
                await db.execute("INSERT INTO msgs (room) VALUES ('load')")
                n += 1
                await asyncio.sleep(0.002)
            return n

        loader = asyncio.ensure_future(load())
        await asyncio.sleep(2.5)  # more than a rate window at ~300 events/s: busy
        assert relay.awake
        tr = slow.transaction(isolation="repeatable_read")
        await tr.start()
        await slow.execute("INSERT INTO msgs (room) VALUES ('slow')")  # flag set: no NOTIFY
        load_done.set()
        loads = await loader
        await asyncio.sleep(2.5)  # the rate drops: the relay starts going quiet
        assert relay.awake, "went quiet while a writer that saw it busy was still open"
        await tr.commit()
        await rung.wait_for("room:slow", 1, timeout=5)
        await eventually(lambda: not relay.awake, 10, "the relay to go quiet")
        await rung.wait_for("room:load", loads, timeout=5)
        # Quiet now: a new writer rings the relay itself.
        await db.execute("INSERT INTO msgs (room) VALUES ('later')")
        await rung.wait_for("room:later", 1, timeout=5)
    await listener.close()


async def test_another_replica_takes_over_when_the_relay_connection_dies(dsn: str) -> None:
    await make_table(dsn)
    rung = Rung()
    listener = await listen(dsn, "gateway", rung)
    db = await pg_connect(dsn)
    admin = await pg_connect(dsn)
    async with (
        relay_running(dsn, lease=1.0, wake_rate=50) as one,
        relay_running(dsn, lease=1.0, wake_rate=50) as two,
    ):
        await eventually(lambda: one.leader or two.leader, 10, "a leader")
        leader, other = (one, two) if one.leader else (two, one)
        assert not other.leader
        holder = await db.fetchval("SELECT holder FROM gateway.relay")
        assert holder == leader.replica_id
        written = 0
        for round_ in range(3):
            for _ in range(100):
                await db.execute("INSERT INTO msgs (room) VALUES ('a')")
                written += 1
                await asyncio.sleep(0.001)
            if round_ == 0:
                # Kill the leader's backend mid-stream; writes go on.
                conn = leader._conn
                assert conn is not None
                await admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        await rung.wait_for("room:a", written, timeout=15)
        await eventually(lambda: one.leader or two.leader, 10, "a leader after the kill")
        assert rung.payloads < written  # many events per NOTIFY
    await listener.close()


async def test_a_relay_whose_process_died_is_replaced_long_before_its_lease_runs_out(dsn: str) -> None:
    await make_table(dsn)
    rung = Rung()
    listener = await listen(dsn, "gateway", rung)
    db = await pg_connect(dsn)
    first = Relay(dsn, lease=30.0, wake_rate=1_000_000)
    crashed = asyncio.ensure_future(first.run())
    try:
        await eventually(lambda: first.leader, 10, "the first relay leading")
        async with relay_running(dsn, lease=30.0, wake_rate=1_000_000) as second:
            for _ in range(10):
                await db.execute("INSERT INTO msgs (room) VALUES ('a')")
            await rung.wait_for("room:a", 10, timeout=5)
            # The first relay's process dies: its connection closes and its lease, 30 s long
            # and just renewed, is not released (as after kill -9).
            crashed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await crashed
            for _ in range(10):
                await db.execute("INSERT INTO msgs (room) VALUES ('a')")
            await eventually(lambda: second.leader, 10, "the second relay taking over")
            await rung.wait_for("room:a", 20, timeout=5)
            holder, left = await db.fetchrow("SELECT holder, lease_until - now() FROM gateway.relay")
            assert holder == second.replica_id and left.total_seconds() > 20
    finally:
        crashed.cancel()
    await listener.close()


async def test_quiet_relay_rings_every_commit_without_waiting_for_its_safety_poll(dsn: str) -> None:
    """Writers ring while a poll is running: each ring must still get a poll that sees its
    commit. With the safety-net poll 30 s away, a lost ring would show as a stuck event."""
    await make_table(dsn)
    rung = Rung()
    listener = await listen(dsn, "gateway", rung)
    writers = [await pg_connect(dsn) for _ in range(4)]
    # Quiet for good (wake_rate), and the next poll of its own (idle_poll, lease/3) 20 s away.
    async with relay_running(dsn, wake_rate=1_000_000, idle_poll=30.0, lease=60.0) as relay:
        await eventually(lambda: relay.leader and not relay.awake, 15, "a quiet leader")
        # Each round: one commit rings, and three more commit while the poll it caused runs.
        total = 0
        for _ in range(20):
            await writers[0].execute("INSERT INTO msgs (room) VALUES ('q')")
            await asyncio.gather(*(w.execute("INSERT INTO msgs (room) VALUES ('q')") for w in writers[1:]))
            total += len(writers)
            await rung.wait_for("room:q", total, timeout=2)
        assert not relay.awake
    await listener.close()


# --- two-phase commit ------------------------------------------------------------------------


async def test_two_phase_commit_writes_with_ring_off_are_prepared_and_delivered() -> None:
    """PostgreSQL refuses to PREPARE a transaction that sent NOTIFY, and a quiet relay is rung
    with one: a session that sets gateway.ring = off sends none, and the relay's idle poll
    delivers its events."""
    with LocalCluster(fast=True, settings={"max_prepared_transactions": 4}) as cluster:
        dsn = cluster.dsn("postgres")
        await migrate(dsn)
        await make_items_table(dsn)
        db = await pg_connect(dsn)
        try:
            # No relay runs: the row trigger rings, and the PREPARE fails.
            await db.execute("BEGIN; INSERT INTO items (owner_id, title) VALUES (1, 'rung')")
            with pytest.raises(asyncpg.FeatureNotSupportedError, match="NOTIFY"):
                await db.execute("PREPARE TRANSACTION 'rung'")
            await db.execute("ROLLBACK")

            async with running_gateway(dsn, tables="public.items", relay_idle_poll="0.2") as gw:
                alice = await gw.connect("1")
                await alice.subscribe("user:1")
                await db.execute("SET gateway.ring = off")
                await eventually(lambda: not gw.state.relay.awake, 10, "the relay to be quiet")
                await db.execute("BEGIN; INSERT INTO items (owner_id, title) VALUES (1, 'two-phase')")
                await db.execute("PREPARE TRANSACTION 'two_phase'")
                await db.execute("COMMIT PREPARED 'two_phase'")
                (event,) = await alice.events(1)
                assert (event["pos"], event["row"]["title"]) == (1, "two-phase")
                await alice.close()
        finally:
            await db.close()


async def test_a_busy_relay_starts_a_poll_every_interval_however_long_each_poll_takes(dsn: str) -> None:
    """An event waits for the next poll: half the cycle on average. The cycle must be the poll
    interval, not the interval plus the time the poll, its doorbells and the event loop's other
    work took (each poll here is made to take 60 % of the interval)."""
    await make_table(dsn)
    db = await pg_connect(dsn)
    interval = 0.05
    async with relay_running(dsn, wake_rate=1, idle_poll=30.0, poll_interval=interval) as relay:
        real_poll = relay._poll

        async def slow_poll(conn: asyncpg.Connection, wait: float = 0.0) -> int:
            found = await real_poll(conn, wait)
            await asyncio.sleep(interval * 0.6)  # a slow doorbell NOTIFY, a busy event loop
            return found

        relay._poll = slow_poll  # type: ignore[method-assign]
        await eventually(lambda: relay.leader, 10, "leadership")
        stop = asyncio.Event()

        async def write() -> None:  # keeps the relay busy (wake rate 1 event/s)
            while not stop.is_set():
                await db.execute("INSERT INTO msgs (room) VALUES ('cycle')")
                await asyncio.sleep(0.05)

        writer = asyncio.ensure_future(write())
        await asyncio.sleep(0.5)
        polls, started = relay.polls, time.monotonic()
        await asyncio.sleep(2.0)
        rate = (relay.polls - polls) / (time.monotonic() - started)
        stop.set()
        await writer
        assert relay.awake
        # One poll per interval (20/s); the interval plus each poll's time would be 12.5/s.
        assert rate > 0.85 / interval, f"{rate:.1f} polls/s with a {interval * 1000:g} ms interval"
    await db.close()


async def test_a_busy_relay_that_waits_rings_a_commit_within_milliseconds_not_after_its_interval(
    dsn: str,
) -> None:
    """With ``wait`` (GATEWAY_RELAY_WAIT) a busy poll waits inside PostgreSQL for the next commit (sql/102_relay.sql),
    so an event is rung about a millisecond after it committed, not half a poll interval later
    on average. The interval here is half a second: sleeping through it, the median wait
    would be a quarter of a second."""
    await make_table(dsn)
    db = await pg_connect(dsn)
    rung_at: dict[int, float] = {}

    def on_doorbell(_c: object, _pid: int, _channel: str, payload: str) -> None:
        for _topic, _epoch, pos, _op, _key in json.loads(payload).get("ev", ()):
            rung_at.setdefault(pos, time.monotonic())

    listener = await listen(dsn, "gateway", on_doorbell)
    async with relay_running(dsn, wake_rate=1, idle_poll=30.0, poll_interval=0.5, wait=True) as relay:
        await eventually(lambda: relay.leader, 10, "leadership")
        committed: dict[int, float] = {}
        # 20 events/s: busy (wake rate 1), polls at least 10 ms apart once the first second's
        # rate is known (a new leader spaces them by the interval until then); measured after.
        for pos in range(1, 61):
            await db.execute("INSERT INTO msgs (room) VALUES ('wait')")
            if pos > 30:
                committed[pos] = time.monotonic()
            await asyncio.sleep(0.05)
        assert relay.awake
        await eventually(lambda: len(rung_at) == 60, 10, "every event rung")
        waits = sorted(rung_at[pos] - committed[pos] for pos in committed)
        assert waits[len(waits) // 2] < 0.05, (
            f"median {waits[len(waits) // 2] * 1000:.1f} ms after the commit"
        )
    await listener.close()
    await db.close()
