"""One WebSocket client: authentication, frames, limits, and its send buffer.

Lifecycle: the server authenticates (header token) or hands over an unauthenticated
socket; ``run()`` waits for the ``auth`` frame (deadline ``auth_timeout``), sends
``welcome``, then reads frames until the socket closes; ``_cleanup`` leaves every topic.

Concurrency: only the handler task reads the socket. Frames to the client are written
by whoever produces them (the pipeline, via ``deliver``) straight into the transport's
buffer, which is the connection's bounded send queue: once it holds more than
``send_queue_bytes`` the client is cut off with close code 4008 (slow consumer), so it can
never hold up the pipeline or other clients, and its memory is capped.

Every bad frame gets an ``error`` reply naming what was wrong; the connection stays up.

Timers are shared, not one per connection (each cost ~0.8 KB at 10,000 connections): the
registry keeps token expiries by quarter second and runs one heartbeat sweep over every
session (ping the silent, drop the dead).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import defaultdict
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import WSCloseCode, WSMessage, WSMsgType

from . import __version__
from . import protocol as p
from .auth import Authenticator, Identity, TokenError
from .authz import AuthorizationUnavailable, Authorizer
from .config import Settings
from .hub import text_frame
from .pipeline import Pipeline, Unavailable
from .ratelimit import TokenBucket
from .rooms import read_topic
from .websocket import GatewayWebSocketResponse

if TYPE_CHECKING:
    from .presence import Presence
    from .publish import Publisher, Publishing

log = logging.getLogger("gateway.session")
_background: set[asyncio.Future[None]] = set()


# Presence status changes published per second per connection (bursts of 2x); faster ones are
# coalesced, not dropped (Session._publish_status). A person goes away and comes back far
# less often.
STATUS_RATE = 1.0
# Token expiries are checked this many times a second: a connection is closed at most
# 1/EXPIRY_TICKS_PER_S s after its token (plus leeway and grace) ran out.
EXPIRY_TICKS_PER_S = 4
# The WebSocket heartbeat, one sweep over every session each HEARTBEAT_TICK seconds rather
# than two timers per connection: a client silent for PING_AFTER ticks (25-30 s) gets a
# ping, and one still silent DROP_AFTER ticks in (15 s after the ping) is dropped as dead.
HEARTBEAT_TICK = 5.0
PING_AFTER = 6
DROP_AFTER = 9
# Every session's presence_topics until it subscribes to one; never added to (only discarded
# from, which leaves an empty set as it is).
_NO_PRESENCE_TOPICS: set[str] = set()
PING_FRAME = b"\x89\x00"  # a server-to-client ping, empty payload (RFC 6455 5.5.2)


@dataclass
class SessionContext:
    settings: Settings
    authenticator: Authenticator
    authorizer: Authorizer
    pipeline: Pipeline
    registry: Registry
    presence: Presence | None = None
    publisher: Publisher | None = None  # the publish frame (gateway/publish.py)


class Registry:
    """Live sessions of this process, by connection id and by user."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        # Upgraded sockets still waiting for their auth frame: not counted as connections, but
        # a drain must close them too.
        self.authenticating: set[Session] = set()
        # (code, reason) once close_all has begun: a socket that authenticates after that is
        # closed with it instead of welcomed by a replica that is going away.
        self.closing: tuple[int, str] | None = None
        self._by_user: defaultdict[str, int] = defaultdict(int)
        self._next = 0
        # Connection ids are unique across replicas (and restarts): room presence shows them
        # to every member of a room, where a "c1" of each replica would be one connection.
        self._suffix = secrets.token_hex(4)
        # Token expiries, shared: sessions by the quarter second their token runs out in, one
        # timer per quarter second that has any. A timer per session cost ~0.8 KB each
        # (docs/performance.md, "Memory per connection"); tokens minted together share one.
        self._expiring: dict[int, set[Session]] = {}
        self._expiry_timers: dict[int, asyncio.TimerHandle] = {}
        self._heartbeat: asyncio.TimerHandle | None = None  # set while there are sessions
        self.evicted_slow = 0
        self.dropped = 0  # frames not sent: the client was being closed or was too slow
        self.closed_by_code: defaultdict[int, int] = defaultdict(int)

    def new_id(self) -> str:
        self._next += 1
        return f"c{self._next}-{self._suffix}"

    def user_count(self, user: str) -> int:
        return self._by_user.get(user, 0)

    def of_user(self, user: str) -> list[Session]:
        """This user's authenticated sessions here (the HTTP API's disconnect). A scan: it is
        rare, and an index by user would cost every connect and close."""
        if user not in self._by_user:
            return []
        return [s for s in self.sessions.values() if s.identity is not None and s.identity.user == user]

    def add(self, s: Session) -> None:
        self.sessions[s.conn_id] = s
        assert s.identity is not None
        self._by_user[s.identity.user] += 1
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().call_later(HEARTBEAT_TICK, self._beat)

    def _beat(self) -> None:
        self._heartbeat = None
        for s in list(self.sessions.values()):
            try:
                s.heartbeat()
            except Exception:  # one broken connection must not stop the others' heartbeat
                log.exception("heartbeat of %s failed", s.conn_id)
        if self.sessions:
            self._heartbeat = asyncio.get_running_loop().call_later(HEARTBEAT_TICK, self._beat)

    def remove(self, s: Session) -> None:
        if self.sessions.pop(s.conn_id, None) is not None and s.identity is not None:
            self._by_user[s.identity.user] -= 1
            if self._by_user[s.identity.user] <= 0:
                del self._by_user[s.identity.user]

    def expire_at(self, s: Session, deadline: float) -> int:
        """Call ``s._expired()`` at ``deadline`` (unix time), at most EXPIRY_TICK later; returns
        the key that ``unexpire`` takes."""
        key = math.ceil(deadline * EXPIRY_TICKS_PER_S)
        sessions = self._expiring.get(key)
        if sessions is None:
            sessions = self._expiring[key] = set()
            delay = max(0.0, key / EXPIRY_TICKS_PER_S - time.time())
            self._expiry_timers[key] = asyncio.get_running_loop().call_later(delay, self._expire, key)
        sessions.add(s)
        return key

    def unexpire(self, s: Session, key: int) -> None:
        sessions = self._expiring.get(key)
        if sessions is None:
            return
        sessions.discard(s)
        if not sessions:
            del self._expiring[key]
            self._expiry_timers.pop(key).cancel()

    def _expire(self, key: int) -> None:
        self._expiry_timers.pop(key, None)
        for s in self._expiring.pop(key, ()):
            s._expired()

    async def close_all(self, code: int, reason: str, wait: float) -> None:
        self.closing = (code, reason)
        sessions = [*self.sessions.values(), *self.authenticating]
        if not sessions:
            return
        await asyncio.wait(
            [asyncio.ensure_future(s.close(code, reason)) for s in sessions],
            timeout=wait,
        )
        for s in sessions:
            s.abort()


class Session:
    # Slots, not a __dict__: there are tens of thousands of these per process.
    __slots__ = (
        "_dropped",
        "_expiry",
        "_limit",
        "_messages",
        "_registered",
        "_status_timer",
        "_statuses",
        "_subscribes",
        "_transport",
        "closed",
        "conn_id",
        "ctx",
        "identity",
        "presence_topics",
        "publishing",
        "status",
        "topics",
        "ws",
    )

    def __init__(
        self,
        ctx: SessionContext,
        ws: GatewayWebSocketResponse,
        transport: asyncio.Transport,
        conn_id: str,
        identity: Identity | None,
    ) -> None:
        self.ctx = ctx
        self.ws = ws
        self.conn_id = conn_id
        self.identity = identity
        self.topics: set[str] = set()
        # Shared and empty until the first presence subscribe (an empty set is 216 bytes).
        self.presence_topics: set[str] = _NO_PRESENCE_TOPICS
        self.publishing: Publishing | None = None  # made by the Publisher at the first publish
        self.status = "online"
        self.closed = False
        self._transport = transport
        self._limit = ctx.settings.send_queue_bytes
        self._messages = TokenBucket(ctx.settings.message_rate)
        self._subscribes = TokenBucket(ctx.settings.subscribe_rate)
        self._statuses: TokenBucket | None = None  # made at the first status frame
        self._status_timer: asyncio.TimerHandle | None = None
        self._dropped = 0
        self._expiry: int | None = None  # the registry's key for our token's expiry
        self._registered = False

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        # Every line about this connection carries its id (a field in JSON logs).
        return logging.LoggerAdapter(log, {"conn": self.conn_id})

    # --- outgoing -----------------------------------------------------------------------

    def deliver(self, frame: bytes) -> None:
        # The hot path of fan-out: no await, no allocation. A transport that already closed
        # just drops the bytes; the handler's cleanup removes this session from the hub.
        if self.closed:
            self.ctx.registry.dropped += 1
            return
        t = self._transport
        if t.get_write_buffer_size() > self._limit:
            self.ctx.registry.dropped += 1
            self._evict_slow()
            return
        try:
            t.write(frame)
        except RuntimeError:
            # uvloop raises here once the peer has gone, before the handler noticed and set
            # `closed`; out of a fan-out or a join that would fail the pipeline's whole batch.
            self.ctx.registry.dropped += 1

    def heartbeat(self) -> None:
        """One tick of the registry's heartbeat: ping a client that has been silent for a while,
        drop one that has not answered (aiohttp's own heartbeat did this with two timers per
        connection). Any byte from the client counts as an answer, as it did for aiohttp."""
        if self.closed:
            return
        silent = self.ws.silence()
        if silent == PING_AFTER:
            if not self._transport.is_closing():
                self._transport.write(PING_FRAME)
        elif silent >= DROP_AFTER:
            self.log.info(
                "no answer to a ping for %.0f s: dropping the connection",
                (DROP_AFTER - PING_AFTER) * HEARTBEAT_TICK,
            )
            self.closed = True
            self._leave_all()
            self.ctx.registry.closed_by_code[WSCloseCode.ABNORMAL_CLOSURE] += 1
            self.abort()  # the handler's receive() then ends and _cleanup runs

    def send(self, msg: p.ServerMessage) -> None:
        self.deliver(text_frame(p.encode(msg)))

    def error(self, code: str, message: str, req_id: int | None = None, topic: str | None = None) -> None:
        self.send(p.Error(code=code, message=message, id=req_id, topic=topic))

    async def _publish_status(self) -> None:
        """Hand the status to presence now, or as soon as STATUS_RATE allows. Each change is a
        transaction, a log row and a frame to every presence subscriber on every replica, so
        a client flipping its status fast is coalesced; its latest status always gets through."""
        if self._status_timer is not None:  # one is due, and will carry the latest status
            return
        if self._statuses is None:
            self._statuses = TokenBucket(STATUS_RATE)
        if self._statuses.take():
            assert self.ctx.presence is not None
            await self.ctx.presence.set_status(self, self.status)
            return

        def later() -> None:
            self._status_timer = None
            if not self.closed:
                self._spawn(self._publish_status())

        self._status_timer = asyncio.get_running_loop().call_later(1 / STATUS_RATE, later)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # Keep a reference so the task is not garbage-collected before it finishes.
        task = asyncio.ensure_future(coro)
        _background.add(task)
        task.add_done_callback(_background.discard)

    def _evict_slow(self) -> None:
        self.closed = True  # nothing more is written, not even an error reply
        self.ctx.registry.evicted_slow += 1
        self.log.warning("slow consumer: more than %d bytes unsent, closing", self._limit)
        self._leave_all()
        self._spawn(self.close(p.CloseCode.SLOW_CONSUMER, "slow consumer: send queue overflowed"))

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code``; a client that does not answer the close is cut off after 5 s."""
        if self.closed and self.ws.closed:
            return
        self.closed = True
        self.log.info("closing with %d: %s", code, reason)
        self._leave_all()
        self.ctx.registry.closed_by_code[code] += 1
        # A close frame's reason is at most 123 bytes; cut on a character boundary, since a
        # browser fails a connection whose reason is not UTF-8 (1006 instead of ``code``).
        message = reason.encode()[:120].decode("utf-8", "ignore").encode()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code=code, message=message), 5.0)
        self.abort()

    def abort(self) -> None:
        if not self._transport.is_closing():
            self._transport.abort()

    # --- incoming -----------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if self.identity is None:
                registry = self.ctx.registry
                registry.authenticating.add(self)
                try:
                    if not await self._await_auth():
                        return
                finally:
                    registry.authenticating.discard(self)
            if not await self._admit():
                return
            async for msg in self.ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_text(msg.data)
                elif msg.type in (WSMsgType.PING, WSMsgType.PONG):
                    await self._on_control(msg)
                elif msg.type == WSMsgType.BINARY:
                    if not await self._within_rate():
                        if self.closed:
                            break
                        self.error(p.ErrorCode.RATE_LIMITED, "too many messages; this one was dropped")
                        continue
                    self.error(
                        p.ErrorCode.BINARY_FRAME, "binary frames are not part of the protocol; send JSON text"
                    )
                elif msg.type == WSMsgType.ERROR:
                    self.log.info("socket error: %s", self.ws.exception())
                    break
                if self.closed:
                    break
        finally:
            await self._cleanup()

    async def _await_auth(self) -> bool:
        deadline = time.monotonic() + self.ctx.settings.auth_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await self.close(p.CloseCode.AUTH_TIMEOUT, "no auth frame within the deadline")
                return False
            try:
                msg = await self.ws.receive(timeout=remaining)
            except TimeoutError:
                continue
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                self.closed = True
                return False
            # Frames before auth count against the rate like any other (the auth frame too):
            # an unauthenticated socket must not get to make the gateway decode an endless stream.
            if msg.type in (WSMsgType.PING, WSMsgType.PONG):
                await self._on_control(msg)
                if self.closed:
                    return False
                continue
            limited = not await self._within_rate()
            if self.closed:
                return False
            if limited:
                self.error(p.ErrorCode.RATE_LIMITED, "too many messages; this one was dropped")
                continue
            if msg.type != WSMsgType.TEXT:
                self.error(
                    p.ErrorCode.BINARY_FRAME, "binary frames are not part of the protocol; send JSON text"
                )
                continue
            try:
                frame = p.decode_frame(msg.data)
            except p.BadFrame as exc:
                self.error(exc.code, exc.message, exc.id, exc.topic)
                continue
            if not isinstance(frame, p.Auth):
                self.error(
                    p.ErrorCode.NOT_AUTHENTICATED,
                    'send {"type": "auth", "token": ...} first',
                    getattr(frame, "id", None),
                    getattr(frame, "topic", None),
                )
                continue
            try:
                self.identity = await self.ctx.authenticator.verify(frame.token)
            except TokenError as exc:
                await self.close(p.CloseCode.UNAUTHORIZED, f"bad token: {exc}")
                return False
            # Before _admit registers the connection with presence, so it starts with it.
            self.status = frame.status
            return True

    async def _admit(self) -> bool:
        """Per-user limit, then welcome. The process-wide limit is checked before the upgrade."""
        assert self.identity is not None
        settings = self.ctx.settings
        if self.ctx.registry.closing is not None:
            # Authenticated after the drain began (or while the upgrade was being verified).
            await self.close(*self.ctx.registry.closing)
            return False
        if self.ctx.registry.user_count(self.identity.user) >= settings.max_connections_per_user:
            await self.close(p.CloseCode.TRY_AGAIN_LATER, "too many connections for this user")
            return False
        self.ctx.registry.add(self)
        self._registered = True
        self._arm_expiry()
        self.send(
            p.Welcome(
                user=self.identity.user, conn=self.conn_id, version=__version__, **self._expiry_fields()
            )
        )
        if self.ctx.presence is not None:
            await self.ctx.presence.connected(self)
        return True

    def _expiry_fields(self) -> dict[str, int]:
        """``expires`` and ``expires_in`` of welcome and refreshed (none for a token without exp)."""
        assert self.identity is not None
        expires = self.identity.expires
        if expires is None:
            return {}
        return {"expires": int(expires), "expires_in": max(0, int(expires - time.time()))}

    def _arm_expiry(self) -> None:
        if self._expiry is not None:
            self.ctx.registry.unexpire(self, self._expiry)
            self._expiry = None
        assert self.identity is not None
        if self.identity.expires is None:
            return
        # The leeway that let the token in (clocks that disagree) holds for as long as it is
        # in use: without it a token accepted 20 s past its exp would be closed at once.
        settings = self.ctx.settings
        deadline = self.identity.expires + settings.jwt_leeway + settings.expiry_grace
        self._expiry = self.ctx.registry.expire_at(self, deadline)

    def _expired(self) -> None:
        self._expiry = None
        self._spawn(self.close(p.CloseCode.TOKEN_EXPIRED, "token expired; reconnect with a fresh token"))

    async def _within_rate(self) -> bool:
        """Take a token for one client frame. A frame over the rate adds a strike, a frame within
        it removes one: a client that keeps sending faster than its rate piles up strikes (even
        though the refilling bucket lets a frame through now and then) and is closed."""
        if self._messages.take():
            self._dropped = max(0, self._dropped - 1)
            return True
        self._dropped += 1
        if self._dropped > 4 * self.ctx.settings.message_rate:
            await self.close(p.CloseCode.RATE_LIMITED, "too many messages")
        return False

    async def _on_control(self, msg: WSMessage) -> None:
        """A WebSocket ping or pong from the client. Each is a frame like any other, so it takes a
        token of the message rate: a ping within the rate is answered with its pong, one over it
        is dropped without an answer (there is no error frame for a control frame), and a client
        that keeps flooding is closed with 4029. The heartbeat needs no pong here: aiohttp counts
        any data received as a sign of life."""
        if await self._within_rate() and msg.type == WSMsgType.PING and not self.closed:
            with contextlib.suppress(ConnectionError):
                await self.ws.pong(msg.data)

    async def _on_text(self, data: str) -> None:
        limited = not await self._within_rate()
        if self.closed:
            return
        try:
            msg = p.decode_frame(data)  # bounded by max_frame_bytes, so cheap even in a flood
        except p.BadFrame as exc:
            if limited:
                self.error(
                    p.ErrorCode.RATE_LIMITED, "too many messages; this one was dropped", exc.id, exc.topic
                )
            else:
                self.error(exc.code, exc.message, exc.id, exc.topic)
            return
        if limited:
            # Name the request, so a client waiting for its answer is not left hanging.
            self.error(
                p.ErrorCode.RATE_LIMITED,
                "too many messages; this one was dropped",
                getattr(msg, "id", None),
                getattr(msg, "topic", None),
            )
            return
        match msg:
            case p.Subscribe():
                await self._subscribe(msg)
            case p.Unsubscribe():
                self._unsubscribe(msg)
            case p.Ping(id=req_id):
                self.send(p.Pong(id=req_id))
            case p.Refresh(token=token):
                await self._refresh(token)
            case p.SetStatus(status=status):
                self.status = status
                if self.ctx.presence is not None:
                    await self._publish_status()
            case p.Publish():
                if self.ctx.publisher is None:
                    self.error(p.ErrorCode.UNAVAILABLE, "publishing is not available here", msg.id, msg.topic)
                else:
                    await self.ctx.publisher.handle(self, msg)
            case p.Auth():
                self.error(
                    p.ErrorCode.ALREADY_AUTHENTICATED, "already authenticated; use refresh for a new token"
                )
            case p.Track():
                if self.ctx.presence is None:
                    self.error(
                        p.ErrorCode.PRESENCE_DISABLED,
                        "presence is disabled on this gateway",
                        msg.id,
                        msg.topic,
                    )
                else:
                    await self.ctx.presence.rooms.track(self, msg, self.ctx.authorizer)
            case p.Untrack():
                if self.ctx.presence is None:
                    self.error(
                        p.ErrorCode.PRESENCE_DISABLED,
                        "presence is disabled on this gateway",
                        msg.id,
                        msg.topic,
                    )
                else:
                    self.ctx.presence.rooms.untrack(self, msg)

    async def _subscribe(self, msg: p.Subscribe) -> None:
        topic, req_id = msg.topic, msg.id
        problem = p.validate_topic(topic)
        if problem:
            self.error(p.ErrorCode.BAD_TOPIC, problem, req_id, topic)
            return
        if not self._subscribes.take():
            self.error(p.ErrorCode.RATE_LIMITED, "too many subscribes; this one was dropped", req_id, topic)
            return
        if topic in self.topics or topic in self.presence_topics:
            self.error(p.ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {topic}", req_id, topic)
            return
        if len(self.topics) + len(self.presence_topics) >= self.ctx.settings.max_subscriptions:
            self.error(
                p.ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"at most {self.ctx.settings.max_subscriptions} subscriptions per connection",
                req_id,
                topic,
            )
            return
        presence = topic.startswith(p.PRESENCE_PREFIX)
        if presence and self.ctx.presence is None:
            # Before authorization: whoever asks, it cannot be served here (not "forbidden",
            # which blames the token), and the authorization function need not be asked.
            self.error(p.ErrorCode.PRESENCE_DISABLED, "presence is disabled on this gateway", req_id, topic)
            return
        # A room's presence topic (presence:room:7) is read with the room's access (room:7).
        readable = read_topic(topic, self.ctx.settings.presence_topics)
        if readable is None:
            self.error(
                p.ErrorCode.BAD_TOPIC,
                f"{topic} is neither a presence topic of GATEWAY_PRESENCE_TOPICS nor a room's "
                "(presence: followed by a topic such as room:7)",
                req_id,
                topic,
            )
            return
        assert self.identity is not None
        try:
            allowed = await self.ctx.authorizer.allowed(self.identity, readable)
        except AuthorizationUnavailable as exc:
            self.error(p.ErrorCode.UNAVAILABLE, f"cannot check access right now: {exc}", req_id, topic)
            return
        if not allowed:
            self.error(
                p.ErrorCode.FORBIDDEN,
                f"user {self.identity.user} may not subscribe to {topic}",
                req_id,
                topic,
            )
            return
        if self.closed:
            return
        if presence:
            assert self.ctx.presence is not None
            if self.presence_topics is _NO_PRESENCE_TOPICS:
                self.presence_topics = set()
            self.presence_topics.add(topic)
            try:
                await self.ctx.presence.subscribe(self, topic, req_id)
            except Unavailable as exc:
                self.presence_topics.discard(topic)
                self.error(p.ErrorCode.UNAVAILABLE, str(exc), req_id, topic)
            return
        self.topics.add(topic)
        try:
            await self.ctx.pipeline.join(topic, self, msg.since, req_id)
            if topic not in self.topics:  # dropped (refresh revoked it, or closing) meanwhile
                self.ctx.pipeline.leave(topic, self)
        except Unavailable as exc:
            self.topics.discard(topic)
            # The join may have failed after the pipeline set up the topic's stream: free it
            # unless somebody else subscribes (one per topic whose join failed, otherwise).
            self.ctx.pipeline.leave(topic, self)
            self.error(p.ErrorCode.UNAVAILABLE, str(exc), req_id, topic)

    def _unsubscribe(self, msg: p.Unsubscribe) -> None:
        if msg.topic in self.topics:
            self.topics.discard(msg.topic)
            self.ctx.pipeline.leave(msg.topic, self)
        elif msg.topic in self.presence_topics and self.ctx.presence is not None:
            self.presence_topics.discard(msg.topic)
            self.ctx.presence.unsubscribe(self, msg.topic)
        else:
            self.error(p.ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {msg.topic}", msg.id, msg.topic)
            return
        self.send(p.Unsubscribed(topic=msg.topic, id=msg.id))

    async def _refresh(self, token: str) -> None:
        assert self.identity is not None
        try:
            identity = await self.ctx.authenticator.verify(token)
        except TokenError as exc:
            self.error(p.ErrorCode.BAD_TOKEN, f"refresh rejected: {exc}")
            return
        if identity.user != self.identity.user:
            self.error(p.ErrorCode.TOKEN_USER_CHANGED, "the new token is for another user; reconnect instead")
            return
        self.identity = identity
        self._arm_expiry()
        if self.publishing is not None:
            self.publishing.grants.clear()  # the right to publish is decided again, per topic
        # Rights may have changed with the token: check every subscription again.
        for topic in sorted(self.topics | self.presence_topics):
            try:
                ok = await self.ctx.authorizer.allowed(
                    identity, read_topic(topic, self.ctx.settings.presence_topics) or topic
                )
            except AuthorizationUnavailable:
                continue  # keep what was granted; it is checked again on the next refresh
            if not ok:
                self._drop_topic(topic)
                self.error(p.ErrorCode.FORBIDDEN, f"access to {topic} was revoked", topic=topic)
        if self.ctx.presence is not None:
            await self.ctx.presence.rooms.recheck(self, identity, self.ctx.authorizer)
        self.send(p.Refreshed(**self._expiry_fields()))

    def remove_from(self, topic: str, message: str) -> bool:
        """Drop the subscription to ``topic`` on the application server's word (the HTTP API's
        disconnect) and say so with a ``removed`` error; False if it had none."""
        if self.closed or (topic not in self.topics and topic not in self.presence_topics):
            return False
        self._drop_topic(topic)
        self.error(p.ErrorCode.REMOVED, message, topic=topic)
        return True

    def _drop_topic(self, topic: str) -> None:
        if topic in self.topics:
            self.topics.discard(topic)
            self.ctx.pipeline.leave(topic, self)
        if topic in self.presence_topics and self.ctx.presence is not None:
            self.presence_topics.discard(topic)
            self.ctx.presence.unsubscribe(self, topic)

    def _leave_all(self) -> None:
        for topic in list(self.topics | self.presence_topics):
            self._drop_topic(topic)

    async def _cleanup(self) -> None:
        self.closed = True
        if self._expiry is not None:
            self.ctx.registry.unexpire(self, self._expiry)
            self._expiry = None
        if self._status_timer is not None:
            self._status_timer.cancel()
        self._leave_all()
        if self._registered:
            self.ctx.registry.remove(self)
            if self.ctx.presence is not None:
                await self.ctx.presence.disconnected(self)

    def describe(self) -> dict[str, Any]:
        return {
            "conn": self.conn_id,
            "user": self.identity.user if self.identity else None,
            "topics": len(self.topics),
        }
