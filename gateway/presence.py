"""Presence: who is online, across every replica, with no ghosts after a crash.

The state lives in PostgreSQL (sql/103_presence.sql); this module feeds it and reads it:

* ``connected`` / ``disconnected`` / ``set_status`` never touch the database themselves:
  they record the connection's new state and wake one writer task, which sends every
  change queued meanwhile in ONE call of ``gateway.presence_apply`` (one round trip, one
  transaction). A burst of 5 000 reconnects after a deploy costs a handful of calls, and a
  session never waits on the database (or on its outage) to be admitted.
* The database derives each user's status from its connections on all replicas and, when
  it changes, appends the change to the presence topic's event log in the same transaction.
  Changes therefore reach subscribers on every replica through the normal pipeline, with
  positions: nothing missed or doubled, in commit order.
* A heartbeat task renews this replica's row every ``heartbeat_interval`` (one UPDATE,
  whatever the number of connections), on a connection of its own (gateway/heartbeat.py):
  a pool kept busy longer than ``heartbeat_ttl`` must not get a live replica declared dead.
  A sweeper task on every replica calls
  ``gateway.presence_sweep`` as often; one at a time does the work (advisory lock): it removes
  replicas silent for ``heartbeat_ttl`` with their connections, and marks offline users whose
  last connection closed more than ``presence_grace`` ago.
* A pruner task on every replica calls ``gateway.presence_prune`` every
  ``retention_interval``; one at a time does the work (advisory lock): it deletes, in
  batches, the rows of users offline and last seen more than ``presence_retention`` ago.
  Nothing is published: those users were offline for every subscriber already.
* Repair instead of failure: when any call fails (database down), or the heartbeat finds this
  replica's row gone (it was declared dead during a long stall), the writer registers the
  whole local set of live connections again (``p_full``) as soon as the database answers,
  which also removes rows of connections that closed meanwhile. Until then changes are only
  kept locally, and the failure is logged once per outage.

``subscribe`` reads the snapshot and the topic head in one REPEATABLE READ transaction, sends
the snapshot, then joins the pipeline from that position: the pipeline replays every change
committed after the snapshot, then sends ``subscribed`` and the live changes.

Presence per room (gateway/rooms.py) rides on the same machinery: its changes are written by
this writer, registered again whole with this replica's connections, and its rows of a dead
replica go with the replica's row; a room's presence topic is subscribed to here too.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import random
import secrets
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Mapping
from typing import Protocol

import asyncpg

from . import protocol as p
from .auth import Identity
from .config import ConfigError, Settings
from .heartbeat import HeartbeatConnection
from .pgerrors import DB_ERRORS
from .pipeline import UNREACHABLE, Member, Pipeline, Unavailable
from .rooms import MEMBERS, RoomPresence, group

log = logging.getLogger("gateway.presence")


class Connection(Member, Protocol):
    """What presence needs of a client connection (a session): who it is, its status, the
    presence topics it subscribes to, and a way to send it a frame."""

    conn_id: str
    identity: Identity | None
    status: str
    presence_topics: set[str]

    def send(self, msg: p.ServerMessage) -> None: ...


# A grace check fires this much after the grace, so the database clock has surely passed it.
GRACE_SLACK = 0.05
# Deadline for one presence call; a call that misses it is repaired like a failed one.
CALL_TIMEOUT = 10.0
# Retry delays of the registration while the database is unreachable.
RETRY_MIN, RETRY_MAX = 0.5, 10.0
# Rows deleted per gateway.presence_prune call (one transaction, about 10 ms: presence writes
# wait for it), and calls per run at most, so a backlog (the first run after an upgrade)
# is spread over several runs instead of holding writes back for long.
PRUNE_BATCH = 1000
PRUNE_BATCHES = 50
# The ttl a sweep passes while it must not remove any replica (see _sweep_ttl).
NO_REMOVAL = datetime.timedelta(days=36500)

_APPLY = "SELECT gateway.presence_apply($1, $2, $3, $4, $5, $6)"
# At start: the presence functions exist (migrated), and the role may use room presence's.
_ROOM_APPLY = "to_regprocedure('gateway.room_presence_apply(text,text[],text[],text[],jsonb[],boolean)')"
_CHECK = (
    "SELECT to_regprocedure('gateway.presence_apply(text,text[],text[],text[],text[],boolean)') IS NOT NULL, "
    f"{_ROOM_APPLY} IS NOT NULL, "
    f"coalesce(has_function_privilege({_ROOM_APPLY}, 'EXECUTE') "
    "AND has_table_privilege(to_regclass('gateway.room_presence'), 'SELECT'), true)"
)
_PRUNE = "SELECT gateway.presence_prune($1, $2)"
_SNAPSHOT = (
    "SELECT user_id, status, extract(epoch FROM last_seen)::float8 FROM gateway.presence "
    "WHERE topic = $1 AND status <> 'offline' ORDER BY user_id"
)


def _replica_id() -> str:
    """Random per process start, with host and pid so an operator can tell replicas apart."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"


class Presence:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, pipeline: Pipeline) -> None:
        self.settings = settings
        self.replica_id = _replica_id()
        self._pool = pool
        # Changes reach subscribers through the pipeline, from the log like any event.
        self._pipeline = pipeline
        self._topics = list(settings.presence_topics)
        self._topic_set = frozenset(self._topics)
        self._ttl = datetime.timedelta(seconds=settings.heartbeat_ttl)
        self._grace = datetime.timedelta(seconds=settings.presence_grace)
        self._retention = datetime.timedelta(seconds=settings.presence_retention)
        # The heartbeat's deadline: half of what the ttl leaves after one interval, so a
        # connection that stopped answering is given up, and a new one tried, before the
        # other replicas may declare this one dead.
        self.heartbeat = HeartbeatConnection(
            settings.database_url,
            min(CALL_TIMEOUT, (settings.heartbeat_ttl - settings.heartbeat_interval) / 2),
        )
        # The truth of this replica: its live connections -> (user, status).
        self._live: dict[str, tuple[str, str]] = {}
        self._local_users: Counter[str] = Counter()
        # Changes not written yet: conn_id -> (user, status, or None once closed). One entry
        # per connection: only its latest state matters.
        self._pending: dict[str, tuple[str, str | None]] = {}
        self._due: set[str] = set()  # users whose grace has passed since they left this replica
        self._timers: set[asyncio.TimerHandle] = set()
        self._wake = asyncio.Event()
        # Presence per room: what this replica's connections track, written by this writer.
        self.rooms = RoomPresence(self._topics, pool, self._wake.set)
        self._need_sync = True  # the first write registers this replica
        self._sync_asked = 0  # bumped by every request for a sync, so none is lost during one
        self._failing = False
        # When (monotonic) the database answered again after this replica last failed to reach
        # it; None while it fails; -inf if it never failed.
        self._reachable_since: float | None = float("-inf")
        self._tasks: list[asyncio.Task[None]] = []
        # counters for metrics and tests
        self.writes = 0
        self.changes_published = 0
        self.syncs = 0
        self.sweeps_done = 0
        # Heartbeats renewed and failed (an error or the deadline): a failing heartbeat gets
        # this replica declared dead by the others after GATEWAY_HEARTBEAT_TTL, and all its
        # users shown offline, so operators alert on the failures (deploy/prometheus/).
        self.heartbeats = 0
        self.heartbeat_failures = 0

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        try:
            ok, rooms, granted = await self._pool.fetchrow(_CHECK, timeout=CALL_TIMEOUT)
        except DB_ERRORS as exc:
            self._down("checking the presence tables", exc)
            ok = rooms = granted = True  # cannot tell; the writer keeps trying to register
        if not ok:
            raise ConfigError(
                "the database has no presence tables (sql/103_presence.sql): run `gateway migrate`"
            )
        if not rooms:
            raise ConfigError(
                "the database has no room presence table (sql/106_room_presence.sql): run `gateway migrate`"
            )
        if not granted:
            # Otherwise every registration would fail, and be retried, as if the database were down.
            raise ConfigError(
                "the gateway's database role may not read gateway.room_presence or execute "
                'gateway.room_presence_apply: grant them (docs/sql.md, "The gateway\'s role")'
            )
        await self._sync()
        self._tasks = [
            asyncio.create_task(self._writer(), name="presence-writer"),
            asyncio.create_task(self._heartbeat(), name="presence-heartbeat"),
            asyncio.create_task(self._sweeper(), name="presence-sweeper"),
            asyncio.create_task(self._pruner(), name="presence-pruner"),
        ]
        for task in self._tasks:
            task.add_done_callback(_crash_report)
        log.info(
            "presence: replica %s registered; topics %s, grace %gs, heartbeat %gs, ttl %gs",
            self.replica_id,
            ", ".join(self._topics),
            self.settings.presence_grace,
            self.settings.heartbeat_interval,
            self.settings.heartbeat_ttl,
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        await self.heartbeat.close()
        # Remove our connections now rather than waiting for the ttl: their users enter the
        # grace, so one who reconnects to another replica in time never shows offline.
        try:
            await self._pool.fetchval(
                "SELECT gateway.presence_unregister($1)", self.replica_id, timeout=CALL_TIMEOUT
            )
        except DB_ERRORS as exc:
            log.warning(
                "presence: could not remove replica %s (%s: %s); another replica's sweep removes its "
                "connections after GATEWAY_HEARTBEAT_TTL",
                self.replica_id,
                type(exc).__name__,
                exc,
            )

    # --- connections (called by sessions; never raise, never wait on the database) ------

    async def connected(self, session: Connection) -> None:
        assert session.identity is not None
        user = session.identity.user
        self._live[session.conn_id] = (user, session.status)
        self._local_users[user] += 1
        self._queue(session.conn_id, user, session.status)

    async def disconnected(self, session: Connection) -> None:
        self.rooms.disconnected(session.conn_id)
        entry = self._live.pop(session.conn_id, None)
        if entry is None:
            return
        user = entry[0]
        self._local_users[user] -= 1
        if self._local_users[user] <= 0:
            del self._local_users[user]
        self._queue(session.conn_id, user, None)

    async def set_status(self, session: Connection, status: str) -> None:
        entry = self._live.get(session.conn_id)
        if entry is None or entry[1] == status:
            return
        self._live[session.conn_id] = (entry[0], status)
        self._queue(session.conn_id, entry[0], status)

    def _queue(self, conn_id: str, user: str, status: str | None) -> None:
        self._pending[conn_id] = (user, status)
        self._wake.set()

    # --- subscriptions ------------------------------------------------------------------

    async def subscribe(self, session: Connection, topic: str, req_id: int | None) -> None:
        try:
            async with self._pool.acquire(timeout=CALL_TIMEOUT) as conn:
                # One snapshot for both reads: a change is in the rows and below the head, or
                # in neither, and then the pipeline replays it after the head.
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    head = await conn.fetchrow(
                        "SELECT epoch, pos FROM gateway.topic_heads(ARRAY[$1::text])",
                        topic,
                        timeout=CALL_TIMEOUT,
                    )
                    if topic in self._topic_set:
                        rows = await conn.fetch(_SNAPSHOT, topic, timeout=CALL_TIMEOUT)
                    else:  # a room's presence: presence:room:7 -> the members of room:7
                        room = topic[len(p.PRESENCE_PREFIX) :]
                        rows = await conn.fetch(MEMBERS, room, timeout=CALL_TIMEOUT)
        except DB_ERRORS as exc:
            log.warning(
                "presence subscribe to %s: database unreachable (%s: %s)", topic, type(exc).__name__, exc
            )
            raise Unavailable(UNREACHABLE) from exc
        if session.closed or topic not in session.presence_topics:
            return  # closed or unsubscribed while we read
        if topic in self._topic_set:
            session.send(
                p.Presence(
                    topic=topic,
                    snapshot=[p.PresenceEntry(user=r[0], status=r[1], last_seen=r[2]) for r in rows],
                )
            )
        else:
            session.send(p.Presence(topic=topic, members=group(rows)))
        pipeline = self._pipeline
        await pipeline.join(topic, session, p.Since(pos=head["pos"], epoch=head["epoch"]), req_id)
        if session.closed or topic not in session.presence_topics:
            # It left while the join was queued: the join added it to the hub after the leave.
            pipeline.leave(topic, session)

    def unsubscribe(self, session: Connection, topic: str) -> None:
        self._pipeline.leave(topic, session)

    async def snapshot(self, topic: str) -> p.Presence:
        """Who is on ``topic`` now, as the snapshot frame a subscribe starts with (for the HTTP
        API's GET /v1/presence/{topic}); raises Unavailable when the database does not answer."""
        try:
            async with self._pool.acquire(timeout=CALL_TIMEOUT) as conn:
                rows = await conn.fetch(_SNAPSHOT, topic, timeout=CALL_TIMEOUT)
        except DB_ERRORS as exc:
            raise Unavailable(UNREACHABLE) from exc
        return p.Presence(
            topic=topic, snapshot=[p.PresenceEntry(user=r[0], status=r[1], last_seen=r[2]) for r in rows]
        )

    # --- the writer ---------------------------------------------------------------------

    async def _writer(self) -> None:
        delay = RETRY_MIN
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._need_sync:
                if not await self._sync():
                    # Changes keep accumulating in self._live; the next sync carries them all.
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX, self.settings.heartbeat_interval)
                    self._wake.set()
                    continue
                delay = RETRY_MIN
            if self._pending:
                batch, self._pending = self._pending, {}
                await self._apply(batch)
            if self.rooms.pending and not self._need_sync:
                await self._apply_rooms(self.rooms.take_pending())
            if self._due and not self._need_sync:
                users, self._due = sorted(self._due), set()
                await self._check_grace(users)

    async def _sync(self) -> bool:
        """Register this replica with its complete set of live connections."""
        self._need_sync = True
        # The full set supersedes queued changes. Users who closed their last connection
        # meanwhile enter the grace with this write; check them when it has passed.
        left = {user for user, status in self._pending.values() if status is None}
        self._pending.clear()
        live = dict(self._live)
        rooms = self.rooms.full_set()
        asked = self._sync_asked
        try:
            changed = await self._call_apply(live, full=True)
            # After the replica's row exists (the call above), which room rows need.
            room_changes = await self.rooms.write(self._pool, self.replica_id, rooms, full=True)
        except DB_ERRORS as exc:
            self._down("registering this replica", exc)
            return False
        if room_changes < 0:  # swept again between the two calls: a stall; try again
            return False
        self._up()
        # A failure reported while this call was in flight asks for another sync.
        self._need_sync = self._sync_asked != asked
        self.syncs += 1
        self.writes += 1
        self.changes_published += changed
        for user in left - set(self._local_users):
            self._schedule_grace_check(user)
        return True

    async def _call_apply(self, conns: Mapping[str, tuple[str, str | None]], *, full: bool) -> int:
        """One gateway.presence_apply call for these connections (id -> (user, status))."""
        ids = list(conns)
        changed: int = await self._pool.fetchval(
            _APPLY,
            self.replica_id,
            self._topics,
            ids,
            [conns[c][0] for c in ids],
            [conns[c][1] for c in ids],
            full,
            timeout=CALL_TIMEOUT,
        )
        return changed

    async def _apply(self, batch: dict[str, tuple[str, str | None]]) -> None:
        changed = await self._write("writing connection changes", self._call_apply(batch, full=False))
        if changed is None:
            return
        self.changes_published += changed
        for user, status in batch.values():
            if status is None and user not in self._local_users:
                self._schedule_grace_check(user)

    async def _apply_rooms(self, batch: dict[tuple[str, str], tuple[str, bytes | None]]) -> None:
        # The room module counts the changes it published itself.
        await self._write(
            "writing room presence changes", self.rooms.write(self._pool, self.replica_id, batch, full=False)
        )

    async def _write(self, doing: str, call: Awaitable[int]) -> int | None:
        """Await one write of queued changes (connections' or rooms'): the number of changes it
        published, or None when it did not count and the full set is to be registered again."""
        try:
            changed = await call
        except DB_ERRORS as exc:
            # Whether it committed is unknown (a timeout): register the full set again.
            self._down(doing, exc)
            self._resync()
            return None
        self._up()
        self.writes += 1
        if changed < 0:
            self._declared_dead()
            return None
        return changed

    def _declared_dead(self) -> None:
        """This replica's row was gone: the others think it dead. Register everything again."""
        log.warning(
            "presence: replica %s was declared dead (no heartbeat for GATEWAY_HEARTBEAT_TTL); "
            "registering its %d connection(s) and their room presence again",
            self.replica_id,
            len(self._live),
        )
        self._resync()

    def _schedule_grace_check(self, user: str) -> None:
        """End the grace of a user who left here promptly, instead of at the next sweep."""
        loop = asyncio.get_running_loop()

        def due() -> None:
            self._timers.discard(handle)
            if user not in self._local_users:
                self._due.add(user)
                self._wake.set()

        handle = loop.call_later(self.settings.presence_grace + GRACE_SLACK, due)
        self._timers.add(handle)

    async def _check_grace(self, users: list[str]) -> None:
        try:
            changed = await self._pool.fetchval(
                "SELECT gateway.presence_sweep($1, $2, $3)",
                self._ttl,
                self._grace,
                users,
                timeout=CALL_TIMEOUT,
            )
        except DB_ERRORS as exc:
            self._down("ending the grace of users who left", exc)
            self._resync()
            return  # the periodic sweep of any replica ends it
        self._up()
        self.changes_published += changed

    # --- heartbeat and sweep ------------------------------------------------------------

    async def _heartbeat(self) -> None:
        failures = 0
        while True:
            # After a first failure, at once on a new connection: a connection that broke or
            # stopped answering is usually alone, and the next regular beat could come too
            # late. While the database stays unreachable, once per interval.
            if failures != 1:
                await asyncio.sleep(self.settings.heartbeat_interval)
            # Also while the writer is registering again (it renews the row too, but through
            # the pool, which may be what keeps it waiting).
            try:
                alive = await self.heartbeat.beat(self.replica_id)
            except DB_ERRORS as exc:
                self._reachable_since = None
                failures += 1
                self.heartbeat_failures += 1
                if failures == 1:
                    why = f"{type(exc).__name__}: {exc}" if str(exc) else "no answer"
                    log.warning(
                        "presence heartbeat failed (%s, deadline %gs); trying again on a new connection. "
                        "Other replicas declare this one dead if it stays silent for GATEWAY_HEARTBEAT_TTL (%gs)",
                        why,
                        self.heartbeat.timeout,
                        self.settings.heartbeat_ttl,
                    )
                # No resync: a failed heartbeat wrote nothing, and whatever else an outage
                # lost is repaired when the writer's or the sweeper's calls fail, or when a
                # heartbeat that gets through finds this replica's row gone.
                continue
            self._reached()
            self.heartbeats += 1
            if failures:
                log.info("presence heartbeat renewed again after %d failed attempt(s)", failures)
                failures = 0
            if not alive and not self._need_sync:
                self._declared_dead()

    async def _sweeper(self) -> None:
        interval = self.settings.heartbeat_interval
        # Replicas started together would all try at the same instant; spread them out.
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            try:
                changed = await self._pool.fetchval(
                    "SELECT gateway.presence_sweep($1, $2)",
                    self._sweep_ttl(),
                    self._grace,
                    timeout=CALL_TIMEOUT,
                )
            except DB_ERRORS as exc:
                self._down("sweep", exc)
                self._resync()
            else:
                self._up()
                if changed >= 0:
                    self.sweeps_done += 1
                    self.changes_published += changed
            await asyncio.sleep(interval)

    def _sweep_ttl(self) -> datetime.timedelta:
        """The ttl this replica's sweep may apply now.

        After an outage of the database itself, no replica could beat during it, so every
        heartbeat is older than the ttl when it is back. The first sweep would then remove
        the replicas that have not beaten again yet (itself included), and all their users
        would flicker offline and back. So a replica that failed to reach the database
        removes no replica until it has reached it again for a whole ttl: every live replica
        has beaten by then (a heartbeat is due every interval, and the ttl is several). When
        only this replica was cut off, the others' sweeps go on meanwhile."""
        since = self._reachable_since
        if since is not None and time.monotonic() - since >= self.settings.heartbeat_ttl:
            return self._ttl
        return NO_REMOVAL

    def _reached(self) -> None:
        if self._reachable_since is None:
            self._reachable_since = time.monotonic()

    # --- pruning -----------------------------------------------------------------------

    async def _pruner(self) -> None:
        while True:
            await asyncio.sleep(self.settings.retention_interval)
            try:
                pruned = await self.prune()
            except DB_ERRORS as exc:
                log.warning("presence pruning skipped: %s: %s", type(exc).__name__, exc)
                continue
            if pruned:
                log.info(
                    "presence: deleted %d row(s) of users offline and last seen more than %gs ago "
                    "(GATEWAY_PRESENCE_RETENTION)",
                    pruned,
                    self.settings.presence_retention,
                )

    async def prune(self) -> int:
        """Delete the rows of users offline and last seen more than ``presence_retention``
        ago, in batches; returns how many. Does nothing while another replica prunes."""
        total = 0
        for _ in range(PRUNE_BATCHES):
            n: int = await self._pool.fetchval(_PRUNE, self._retention, PRUNE_BATCH, timeout=CALL_TIMEOUT)
            if n < 0:
                break  # another replica is pruning, or presence writes held the table: next run
            total += n
            if n < PRUNE_BATCH:
                break
        return total

    def _resync(self) -> None:
        """After any failed call, write the full live set once the database answers again.

        The outage may have lost more than the failed call: with synchronous_commit off, a
        crashed server forgets commits it had acknowledged, rows an operator deleted... The
        full set (one call) makes the database agree with this replica whatever happened.
        """
        self._need_sync = True
        self._sync_asked += 1
        self._wake.set()

    # --- logging the database's state once per outage ------------------------------------

    def _down(self, what: str, exc: BaseException) -> None:
        self._reachable_since = None
        if not self._failing:
            self._failing = True
            log.warning(
                "presence: cannot reach the database (%s: %s: %s); presence is repaired when it is back",
                what,
                type(exc).__name__,
                exc,
            )

    def _up(self) -> None:
        self._reached()
        if self._failing:
            self._failing = False
            log.info("presence: database reachable again")

    def describe(self) -> dict[str, object]:
        return {
            "replica": self.replica_id,
            "connections": len(self._live),
            "users": len(self._local_users),
            "pending": len(self._pending),
            "registered": not self._need_sync,
            **self.rooms.describe(),
        }


def _crash_report(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("presence task %s crashed", task.get_name(), exc_info=task.exception())
