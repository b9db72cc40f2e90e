"""Presence per room, with each connection's state (docs/presence.md, "Rooms").

A connection joins a room's presence with ``track`` (the room topic, ``room:7``, and a state:
a JSON object of at most 1 KB), updates its state by tracking again, and leaves with
``untrack`` or by closing. Who is in ``room:7`` is published on ``presence:room:7``, which a
client subscribes to like any topic, with the read access of ``room:7``.

* The state lives in PostgreSQL (sql/106_room_presence.sql), one row per (connection, room);
  every change appends an event to the room's presence topic in the same transaction, so
  subscribers get a snapshot (``members``) and then every change, with positions, through the
  pipeline like global presence.
* This module only records what each connection wants; the presence writer
  (gateway/presence.py) writes the changes in batches, on this replica's registration, and
  registers them again whole (``p_full``) after an outage or when this replica was declared
  dead, exactly as it does the connections of global presence.
* A client updating its state fast is coalesced: each connection's changes are handed to the
  writer at most once a second (bursts of two), each room with its latest state, never
  dropped. High-rate things (cursors, typing) belong in ephemeral publishes, not here.
* A killed replica's rows are deleted, and their leaves published, by whatever deletes its
  row of gateway.replicas: the sweep of silent replicas (a trigger, sql/106_room_presence.sql).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
import msgspec

from . import protocol as p
from .auth import Identity
from .authz import AuthorizationUnavailable, Authorizer
from .pgerrors import DB_ERRORS
from .pipeline import UNREACHABLE, Unavailable
from .ratelimit import TokenBucket


class Tracker(Protocol):
    """What room presence needs of a client connection (a session)."""

    conn_id: str
    identity: Identity | None
    closed: bool

    def send(self, msg: p.ServerMessage) -> None: ...

    def error(self, code: str, message: str, req_id: int | None = None, topic: str | None = None) -> None: ...


# Changes handed to the writer per second per connection (bursts of 2x); faster ones are
# coalesced, the latest state of each room wins (like the status of global presence).
STATE_RATE = 1.0
# Deadline for one call (as presence.CALL_TIMEOUT); a write that misses it is repaired.
CALL_TIMEOUT = 10.0

APPLY = "SELECT gateway.room_presence_apply($1, $2, $3, $4, $5::jsonb[], $6)"
MEMBERS = "SELECT user_id, conn_id, state::text FROM gateway.room_presence WHERE room = $1 ORDER BY user_id, conn_id"

# A row change: (user, state as compact JSON, or None: left the room)
Change = tuple[str, bytes | None]


def room_of(topic: str, global_topics: Collection[str]) -> str | None:
    """The room whose presence ``topic`` is (``presence:room:7`` -> ``room:7``), or None when it
    is not a room presence topic: not ``presence:...``, or one of GATEWAY_PRESENCE_TOPICS."""
    if not topic.startswith(p.PRESENCE_PREFIX) or topic in global_topics:
        return None
    return topic[len(p.PRESENCE_PREFIX) :]


def read_topic(topic: str, global_topics: Collection[str]) -> str | None:
    """The topic whose read access decides who may subscribe to ``topic``: the room for a room's
    presence topic, ``topic`` itself otherwise; None for a presence topic that is neither global
    nor the presence of a valid room (``presence:foo``)."""
    room = room_of(topic, global_topics)
    if room is None:
        return topic
    return None if room_problem(room, global_topics) else room


def room_problem(room: str, global_topics: Collection[str]) -> str | None:
    """None if ``room`` can be tracked, else a sentence saying why not."""
    problem = p.validate_topic(room)
    if problem:
        return problem
    if room.startswith(p.PRESENCE_PREFIX):
        return f"track the room itself ({room[len(p.PRESENCE_PREFIX) :]}), not a presence topic"
    topic = p.PRESENCE_PREFIX + room
    if topic in global_topics:
        return f"{topic} is a global presence topic (GATEWAY_PRESENCE_TOPICS), not a room's"
    if len(topic) > p.MAX_TOPIC_CHARS:
        return (
            f"the room's presence topic {topic[:20]}... would be longer than {p.MAX_TOPIC_CHARS} "
            f"characters: a room name has at most {p.MAX_TOPIC_CHARS - len(p.PRESENCE_PREFIX)}"
        )
    return None


@dataclass(eq=False)
class _Conn:
    """One connection's rooms: what it asked for last, and what the writer was handed."""

    user: str
    want: dict[str, bytes] = field(default_factory=dict)  # room -> state (compact JSON)
    sent: dict[str, bytes] = field(default_factory=dict)  # room -> state handed to the writer
    bucket: TokenBucket = field(default_factory=lambda: TokenBucket(STATE_RATE))
    timer: asyncio.TimerHandle | None = None


class RoomPresence:
    """The room memberships of this replica's connections. Owned by presence.Presence, whose
    writer calls ``take_pending`` and ``full_set`` and wakes on ``wake``."""

    def __init__(self, global_topics: Collection[str], pool: asyncpg.Pool, wake: Callable[[], None]) -> None:
        self.global_topics = frozenset(global_topics)
        self._pool = pool
        self._wake = wake
        self._conns: dict[str, _Conn] = {}
        # Changes not written yet: (conn_id, room) -> (user, state or None). Latest wins.
        self.pending: dict[tuple[str, str], Change] = {}
        self.changes_published = 0

    # --- frames (called by the session; reply or error, never raise) ----------------------

    async def track(self, session: Tracker, msg: p.Track, authorizer: Authorizer) -> None:
        room, req_id = msg.topic, msg.id
        problem = room_problem(room, self.global_topics)
        if problem:
            session.error(p.ErrorCode.BAD_TOPIC, problem, req_id, room)
            return
        state = p.encoder.encode(msg.state)
        if len(state) > p.MAX_PRESENCE_STATE_BYTES:
            session.error(
                p.ErrorCode.TOO_LARGE,
                f"the state is {len(state)} bytes of JSON; at most {p.MAX_PRESENCE_STATE_BYTES}",
                req_id,
                room,
            )
            return
        c = self._conns.get(session.conn_id)
        if c is None or room not in c.want:
            if c is not None and len(c.want) >= p.MAX_TRACKED_ROOMS:
                session.error(
                    p.ErrorCode.TOO_MANY_TRACKED,
                    f"at most {p.MAX_TRACKED_ROOMS} rooms tracked per connection; untrack one first",
                    req_id,
                    room,
                )
                return
            # Joining needs read access to the room, decided as for a subscribe (an update of
            # a room already tracked was decided at its join; refresh decides again).
            identity = session.identity
            assert identity is not None
            try:
                allowed = await authorizer.allowed(identity, room)
            except AuthorizationUnavailable as exc:
                session.error(p.ErrorCode.UNAVAILABLE, f"cannot check access right now: {exc}", req_id, room)
                return
            if not allowed:
                session.error(
                    p.ErrorCode.FORBIDDEN,
                    f"user {identity.user} may not track in {room}: it needs read access to it",
                    req_id,
                    room,
                )
                return
            if session.closed:
                return
            c = self._conns.get(session.conn_id)
            if c is None:
                c = self._conns[session.conn_id] = _Conn(identity.user)
        c.want[room] = state
        self._changed(session.conn_id, c)
        session.send(p.Tracked(topic=room, id=req_id))

    def untrack(self, session: Tracker, msg: p.Untrack) -> None:
        c = self._conns.get(session.conn_id)
        if c is None or msg.topic not in c.want:
            session.error(p.ErrorCode.NOT_TRACKED, f"not tracking {msg.topic}", msg.id, msg.topic)
            return
        del c.want[msg.topic]
        self._changed(session.conn_id, c)
        session.send(p.Untracked(topic=msg.topic, id=msg.id))

    async def recheck(self, session: Tracker, identity: Identity, authorizer: Authorizer) -> None:
        """After a refresh: leave the rooms the new token may no longer read (an error says so)."""
        c = self._conns.get(session.conn_id)
        if c is None:
            return
        for room in sorted(c.want):
            try:
                ok = await authorizer.allowed(identity, room)
            except AuthorizationUnavailable:
                continue  # keep what was granted; it is checked again on the next refresh
            if not ok and room in c.want:
                del c.want[room]
                self._changed(session.conn_id, c)
                session.error(p.ErrorCode.FORBIDDEN, f"tracking in {room} was revoked", topic=room)

    def disconnected(self, conn_id: str) -> None:
        """The connection closed: it leaves every room now, whatever the rate."""
        c = self._conns.pop(conn_id, None)
        if c is None:
            return
        if c.timer is not None:
            c.timer.cancel()
        for room in c.sent:
            self.pending[(conn_id, room)] = (c.user, None)
        if c.sent:
            self._wake()

    def tracked(self, conn_id: str) -> list[str]:
        c = self._conns.get(conn_id)
        return sorted(c.want) if c else []

    # --- coalescing ----------------------------------------------------------------------

    def _changed(self, conn_id: str, c: _Conn) -> None:
        if c.timer is not None:
            return  # one is due, and will carry the latest state of every room
        if c.bucket.take():
            self._flush(conn_id, c)
            return

        def due() -> None:
            # A second has passed since the bucket ran dry: flush whatever the bucket says (a
            # timer may fire a hair early by the bucket's clock, and must not wait a second more).
            c.timer = None
            if self._conns.get(conn_id) is c:
                c.bucket.take()
                self._flush(conn_id, c)

        c.timer = asyncio.get_running_loop().call_later(1 / STATE_RATE, due)

    def _flush(self, conn_id: str, c: _Conn) -> None:
        changed = False
        for room in c.want.keys() | c.sent.keys():
            state = c.want.get(room)
            if state != c.sent.get(room):
                self.pending[(conn_id, room)] = (c.user, state)
                changed = True
        c.sent = dict(c.want)
        if changed:
            self._wake()

    # --- for the writer (gateway/presence.py) --------------------------------------------

    def take_pending(self) -> dict[tuple[str, str], Change]:
        batch, self.pending = self.pending, {}
        return batch

    def full_set(self) -> dict[tuple[str, str], Change]:
        """Every (connection, room) handed to the writer: this replica's rows as they should be."""
        self.pending.clear()  # the full set supersedes them
        return {
            (conn_id, room): (c.user, state)
            for conn_id, c in self._conns.items()
            for room, state in c.sent.items()
        }

    async def write(
        self,
        conn: asyncpg.Pool | asyncpg.Connection,
        replica: str,
        rows: dict[tuple[str, str], Change],
        *,
        full: bool,
    ) -> int:
        """One gateway.room_presence_apply call; -1 when the replica is not registered."""
        keys = list(rows)
        states = [rows[k][1] for k in keys]
        changed: int = await conn.fetchval(
            APPLY,
            replica,
            [k[0] for k in keys],
            [k[1] for k in keys],
            [rows[k][0] for k in keys],
            [None if s is None else s.decode() for s in states],
            full,
            timeout=CALL_TIMEOUT,
        )
        if changed > 0:
            self.changes_published += changed
        return changed

    # --- reading ---------------------------------------------------------------------------

    async def members(self, topic: str) -> list[dict[str, Any]]:
        """Who is in the room whose presence topic is ``topic`` (``presence:room:7``), as plain
        JSON values: ``[{"user": ..., "conns": [{"conn": ..., "state": {...}}]}]``, by user.
        For the HTTP API; a subscriber gets the same in its ``members`` frame. Raises
        ValueError for a topic that is not a room's presence topic, Unavailable when the
        database cannot be read."""
        room = room_of(topic, self.global_topics)
        if room is None or room_problem(room, self.global_topics):
            raise ValueError(f"{topic} is not the presence topic of a room (presence:kind:id)")
        try:
            rows = await self._pool.fetch(MEMBERS, room, timeout=CALL_TIMEOUT)
        except DB_ERRORS as exc:
            raise Unavailable(UNREACHABLE) from exc
        return [
            {
                "user": m.user,
                "conns": [{"conn": c.conn, "state": msgspec.json.decode(c.state)} for c in m.conns],
            }
            for m in group(rows)
        ]

    def tracked_count(self) -> int:
        return sum(len(c.want) for c in self._conns.values())

    def describe(self) -> dict[str, int]:
        return {"tracking": len(self._conns), "rooms_tracked": self.tracked_count()}


def group(rows: list[asyncpg.Record] | list[tuple[str, str, str]]) -> list[p.RoomMember]:
    """Rows (user, conn, state JSON) ordered by user into members, each with its connections."""
    out: list[p.RoomMember] = []
    for user, conn, state in rows:
        if not out or out[-1].user != user:
            out.append(p.RoomMember(user=user, conns=[]))
        out[-1].conns.append(p.RoomConn(conn=conn, state=msgspec.Raw(state.encode())))
    return out
