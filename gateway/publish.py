"""Messages published on a topic by clients (the ``publish`` frame) and by servers (the HTTP API).

Two kinds (docs/protocol.md, "Publishing"):

* **ephemeral** (the default): handed to the replica bus (gateway/bus.py, kind ``message``),
  which calls every process's handler, this one's at once; each process writes a ``message``
  frame to the topic's local subscribers. Never stored: no position, nothing to replay, and a
  subscriber that was not connected when it passed never sees it. Best effort: the bus may
  drop it (a full queue, the database down) without telling anyone.
* **durable**: ``gateway.publish_message()`` (sql/105_rooms.sql) appends it to the log like
  ``gateway.emit``, with the sender in ``gateway.events.sender``; the caller is answered with its
  epoch and position once it has committed, and it reaches subscribers as an ``event`` (op
  ``message``, with ``from``) through the relay and the pipeline like every event, replayed on
  resume and gap-filled.

``from`` is always the authenticated user (or the server token's ``sub``), set here and never
taken from the client. Who may publish is decided by the session (``Authorizer.may_publish``,
once per connection and topic, again after a refresh); the limits of size and of rate per
topic and per replica are checked here, for the session and the HTTP API alike. The rate per
connection is the session's (``Publishing.bucket``).
"""

from __future__ import annotations

import logging
from typing import Protocol

import asyncpg
import msgspec

from . import protocol as p
from .auth import Identity
from .authz import AuthorizationUnavailable, Authorizer
from .bus import Bus, BusTooLarge
from .config import Settings
from .hub import Hub, text_frame
from .pgerrors import DB_ERRORS
from .ratelimit import TokenBucket

log = logging.getLogger("gateway.publish")

KIND = "message"
# Topics whose rate buckets are kept at most; past it the oldest are forgotten (a forgotten
# bucket starts full again, which lets a topic burst once more, no worse).
MAX_TOPIC_BUCKETS = 10_000


class PublishError(Exception):
    """A publish refused: ``code`` (a protocol.ErrorCode) and a message for the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class BusMessage(msgspec.Struct, omit_defaults=True):
    """What travels on the bus for one ephemeral message."""

    t: str  # topic
    f: str  # from: the sender's user id
    d: msgspec.Raw  # data
    c: str | None = None  # the sender's connection id, absent for the HTTP API
    o: str = ""  # the bus origin (process) of the sender's connection
    e: bool = True  # echo: false, the sender's own connection does not get it


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(BusMessage).decode


class Publishing:
    """A connection's own publishing state: its rate and its decisions per topic."""

    __slots__ = ("bucket", "grants")

    def __init__(self, rate: float) -> None:
        self.bucket = TokenBucket(rate)
        self.grants: dict[str, bool] = {}  # topic -> may publish (cleared by a refresh)


class Client(Protocol):
    """What a publish needs of a connection (gateway/session.py's Session, which imports this
    module: a Protocol keeps the arrow one way)."""

    identity: Identity | None
    publishing: Publishing | None

    @property
    def conn_id(self) -> str: ...

    def send(self, msg: p.ServerMessage) -> None: ...

    def error(self, code: str, message: str, req_id: int | None = None, topic: str | None = None) -> None: ...


class Publisher:
    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, bus: Bus, hub: Hub, authorizer: Authorizer
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._bus = bus
        self._hub = hub
        self._authorizer = authorizer
        self._max_bytes = settings.max_publish_bytes
        self._replica = TokenBucket(settings.publish_replica_rate)
        self._topics: dict[str, TokenBucket] = {}
        bus.on(KIND, self._on_message)
        # counters, for metrics and tests
        self.ephemeral = 0  # ephemeral messages accepted here
        self.durable = 0  # durable messages committed here
        self.delivered = 0  # message frames written to local subscribers
        self.refused: dict[str, int] = {}  # by error code

    # --- the API (the session and the HTTP API) ---------------------------------------

    async def publish(
        self,
        topic: str,
        data_raw: bytes,
        *,
        durable: bool,
        sender: str,
        conn: str | None = None,
        echo: bool = True,
    ) -> tuple[str, int] | None:
        """Publish ``data_raw`` (valid JSON: the caller has decoded it) on ``topic`` as ``sender``.

        Returns (epoch, pos) of a durable message once committed, None for an ephemeral one.
        Raises PublishError (``bad_topic``, ``too_large``, ``rate_limited``, ``unavailable``).
        The caller has checked that ``sender`` may publish on ``topic``."""
        try:
            return await self._publish(topic, data_raw, durable, sender, conn, echo)
        except PublishError as exc:
            self.refused[exc.code] = self.refused.get(exc.code, 0) + 1
            raise

    async def _publish(
        self, topic: str, data_raw: bytes, durable: bool, sender: str, conn: str | None, echo: bool
    ) -> tuple[str, int] | None:
        problem = p.validate_topic(topic)
        if problem:
            raise PublishError(p.ErrorCode.BAD_TOPIC, problem)
        if topic.startswith(p.PRESENCE_PREFIX):
            raise PublishError(p.ErrorCode.BAD_TOPIC, "presence topics are written by the gateway only")
        if len(data_raw) > self._max_bytes:
            raise PublishError(
                p.ErrorCode.TOO_LARGE,
                f"data is {len(data_raw)} bytes; at most {self._max_bytes} (GATEWAY_MAX_PUBLISH_BYTES)",
            )
        if not self._topic_bucket(topic).take():
            raise PublishError(p.ErrorCode.RATE_LIMITED, f"too many messages on {topic} right now; dropped")
        if not self._replica.take():
            raise PublishError(
                p.ErrorCode.RATE_LIMITED, "too many messages on this gateway right now; dropped"
            )
        if durable:
            try:
                row = await self._pool.fetchrow(
                    "SELECT epoch, pos FROM gateway.publish_message($1, $2::text::jsonb, $3)",
                    topic,
                    data_raw.decode(),
                    sender,
                )
            except asyncpg.DataError as exc:
                # Valid JSON that jsonb refuses (a \u0000 in a string): the client's to fix.
                raise PublishError(p.ErrorCode.BAD_MESSAGE, f"data cannot be stored: {exc}") from None
            except DB_ERRORS as exc:
                log.warning("durable publish failed: %s: %s", type(exc).__name__, exc)
                raise PublishError(
                    p.ErrorCode.UNAVAILABLE, "the database is unreachable; publish again later"
                ) from None
            self.durable += 1
            return row["epoch"], row["pos"]
        body = _encode(
            BusMessage(t=topic, f=sender, d=msgspec.Raw(data_raw), c=conn, o=self._bus.origin, e=echo)
        )
        try:
            self._bus.send(KIND, body)
        except BusTooLarge:
            # A long topic and a long user id on top of the largest data.
            raise PublishError(
                p.ErrorCode.TOO_LARGE, "the message is too large with its topic and sender"
            ) from None
        except ValueError:
            # Not text a NOTIFY can carry; JSON from msgspec always is, so only a caller's bug.
            raise PublishError(p.ErrorCode.BAD_MESSAGE, "data must be UTF-8 JSON text") from None
        self.ephemeral += 1
        return None

    def _topic_bucket(self, topic: str) -> TokenBucket:
        bucket = self._topics.get(topic)
        if bucket is None:
            while len(self._topics) >= MAX_TOPIC_BUCKETS:
                del self._topics[next(iter(self._topics))]
            bucket = self._topics[topic] = TokenBucket(self._settings.publish_topic_rate)
        return bucket

    # --- a client's publish frame --------------------------------------------------------

    async def handle(self, session: Client, msg: p.Publish) -> None:
        """Answer a client's ``publish`` frame with ``published`` or an ``error`` (with its id)."""
        topic, req_id = msg.topic, msg.id
        identity = session.identity
        assert identity is not None
        state = session.publishing
        if state is None:
            state = session.publishing = Publishing(self._settings.publish_rate)
        problem = p.validate_topic(topic)
        if problem:
            session.error(p.ErrorCode.BAD_TOPIC, problem, req_id, topic)
            return
        if not state.bucket.take():
            session.error(p.ErrorCode.RATE_LIMITED, "too many publishes; this one was dropped", req_id, topic)
            return
        allowed = state.grants.get(topic)
        if allowed is None:
            try:
                allowed = await self._authorizer.may_publish(identity, topic)
            except AuthorizationUnavailable as exc:
                session.error(
                    p.ErrorCode.UNAVAILABLE, f"cannot check the right to publish now: {exc}", req_id, topic
                )
                return
            if len(state.grants) >= 1000:  # bounded: a client may try endless topics
                state.grants.clear()
            state.grants[topic] = allowed
        if not allowed:
            session.error(
                p.ErrorCode.FORBIDDEN, f"user {identity.user} may not publish on {topic}", req_id, topic
            )
            return
        try:
            result = await self.publish(
                topic,
                bytes(msg.data),
                durable=msg.durable,
                sender=identity.user,
                conn=session.conn_id,
                echo=msg.echo,
            )
        except PublishError as exc:
            session.error(exc.code, exc.message, req_id, topic)
            return
        if result is None:
            session.send(p.Published(topic=topic, id=req_id))
        else:
            session.send(p.Published(topic=topic, id=req_id, epoch=result[0], pos=result[1]))

    # --- delivery of ephemeral messages (every process) -----------------------------------

    def _on_message(self, body: bytes) -> None:
        try:
            m = _decode(body)
        except msgspec.DecodeError:
            log.warning("bus: a message that does not decode was dropped")
            return
        if not self._hub.has(m.t):
            return
        frame = text_frame(p.encode(p.Message(topic=m.t, from_=m.f, data=m.d, conn=m.c)))
        # echo false: everyone but the sender's own connection (connection ids are per process).
        skip = m.c if not m.e and m.c is not None and m.o == self._bus.origin else None
        for sub in self._hub.subscribers(m.t):
            if skip is None or getattr(sub, "conn_id", None) != skip:
                sub.deliver(frame)
                self.delivered += 1
