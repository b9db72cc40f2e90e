"""The WebSocket protocol: every frame, error code, close code and refused upgrade, in one place.

This module is the single source of truth; ``docs/protocol.md`` describes the same
frames for people, and ``tests/test_protocol_doc.py`` checks that the two agree.

Frames are JSON text frames. Every frame is an object with a ``type`` field
(msgspec tagged unions). Client frames are decoded with one typed decoder, so a
frame with a wrong field type is rejected with a message naming the field.
Server frames are encoded once and the same bytes go to every subscriber.
"""

from __future__ import annotations

import re
from typing import Any, Literal, NamedTuple

import msgspec

# --- client -> server -------------------------------------------------------------


class Since(msgspec.Struct, forbid_unknown_fields=True):
    """The last position a client saw on a topic, to resume after it."""

    pos: int
    epoch: str


class Auth(msgspec.Struct, tag="auth", forbid_unknown_fields=True):
    """First frame when the token did not come with the upgrade request.

    ``status`` is the connection's first presence status: a hidden tab that reconnects says
    ``away`` here, or its user would be published ``online`` and then ``away`` again."""

    token: str
    status: Literal["online", "away"] = "online"


class Refresh(msgspec.Struct, tag="refresh", forbid_unknown_fields=True):
    """A fresh token for a live connection, sent before the old one expires."""

    token: str


class Subscribe(msgspec.Struct, tag="subscribe", forbid_unknown_fields=True):
    topic: str
    id: int | None = None
    since: Since | None = None


class Unsubscribe(msgspec.Struct, tag="unsubscribe", forbid_unknown_fields=True):
    topic: str
    id: int | None = None


class Ping(msgspec.Struct, tag="ping", forbid_unknown_fields=True):
    id: int | None = None


class SetStatus(msgspec.Struct, tag="status", forbid_unknown_fields=True):
    """Set this connection's presence status (``online`` or ``away``)."""

    status: Literal["online", "away"]


class Publish(msgspec.Struct, tag="publish", forbid_unknown_fields=True):
    """A message from this client to the topic's subscribers (docs/protocol.md, "Publishing").

    ``data`` is any JSON value, kept as the client's bytes (at most GATEWAY_MAX_PUBLISH_BYTES).
    Ephemeral by default: delivered live as ``message`` frames, never stored. ``durable``:
    written to the log, delivered as an ``event`` with a position. ``echo`` false: this
    connection does not receive its own ephemeral message."""

    topic: str
    data: msgspec.Raw
    id: int | None = None
    durable: bool = False
    echo: bool = True


class Track(msgspec.Struct, tag="track", forbid_unknown_fields=True):
    """Join a room's presence, or update this connection's state in it (docs/presence.md, "Rooms").

    ``topic`` is the room (``room:7``), not its presence topic. ``state`` is any JSON object of
    at most ``MAX_PRESENCE_STATE_BYTES`` (compact encoding)."""

    topic: str
    state: dict[str, Any] = msgspec.field(default_factory=dict)
    id: int | None = None


class Untrack(msgspec.Struct, tag="untrack", forbid_unknown_fields=True):
    """Leave a room's presence (closing the connection leaves every room)."""

    topic: str
    id: int | None = None


ClientMessage = Auth | Refresh | Subscribe | Unsubscribe | Ping | SetStatus | Publish | Track | Untrack

# --- server -> client -------------------------------------------------------------


class Welcome(msgspec.Struct, tag="welcome", omit_defaults=True):
    """Authentication succeeded; the connection is usable."""

    user: str
    conn: str
    version: str  # the gateway's release (gateway.__version__): which replica a client reached
    expires: int | None = None  # unix seconds when the token runs out
    # Seconds from now until then, by the gateway's clock: a client schedules its refresh
    # from this, so a browser whose clock is off does not refresh too late or in a loop.
    expires_in: int | None = None


class Refreshed(msgspec.Struct, tag="refreshed", omit_defaults=True):
    expires: int | None = None
    expires_in: int | None = None  # as in Welcome


class Subscribed(msgspec.Struct, tag="subscribed", omit_defaults=True):
    """The subscription is live: every commit on the topic after ``pos`` will be pushed.

    ``recovered`` is true when the client asked to resume and every event after its
    position was replayed before this frame. False means the client must reload its
    state: its position is older than the log keeps, or the epoch changed.
    """

    topic: str
    epoch: str
    pos: int
    id: int | None = None
    recovered: bool | None = None
    replayed: int = 0


class Unsubscribed(msgspec.Struct, tag="unsubscribed", omit_defaults=True):
    topic: str
    id: int | None = None


class Tracked(msgspec.Struct, tag="tracked", omit_defaults=True):
    """A ``track`` was accepted; the change reaches the room's presence topic within a second."""

    topic: str
    id: int | None = None


class Untracked(msgspec.Struct, tag="untracked", omit_defaults=True):
    topic: str
    id: int | None = None


class Pong(msgspec.Struct, tag="pong", omit_defaults=True):
    id: int | None = None


class Error(msgspec.Struct, tag="error", omit_defaults=True):
    code: str
    message: str
    id: int | None = None
    topic: str | None = None


class Event(msgspec.Struct, tag="event", omit_defaults=True):
    """One change on a topic. ``row`` is the current row as JSON (absent for deletes)."""

    topic: str
    epoch: str
    pos: int
    op: Literal["insert", "update", "delete", "message"]
    table: str | None = None
    key: str | None = None
    row: msgspec.Raw | None = None
    data: msgspec.Raw | None = None
    # Unix seconds when the writing transaction *began* (gateway.events.created_at defaults to
    # now(), sql/100_event_log.sql), not when it committed: PostgreSQL records no commit time unless
    # track_commit_timestamp is on. An event listed in a row doorbell carries the doorbell's
    # ts instead: the start of the newest transaction listed with it (relay.doorbells()).
    ts: float | None = None
    # The user who published it (a durable publish); set by the gateway only, absent on rows
    # and on gateway.emit's events (gateway.events.sender, sql/105_rooms.sql).
    from_: str | None = msgspec.field(default=None, name="from")


class Published(msgspec.Struct, tag="published", omit_defaults=True):
    """A publish was accepted: an ephemeral one handed to the replica bus, a durable one
    committed to the log (then with its ``epoch`` and ``pos``)."""

    topic: str
    id: int | None = None
    epoch: str | None = None
    pos: int | None = None


class Message(msgspec.Struct, tag="message", omit_defaults=True):
    """An ephemeral message another client (or a server, ``conn`` absent) published on a topic
    this connection subscribes to. No position: never stored, never replayed."""

    topic: str
    from_: str = msgspec.field(name="from")
    data: msgspec.Raw | None = None  # always sent (JSON null is msgspec.Raw(b"null"), not None)
    conn: str | None = None


class PresenceEntry(msgspec.Struct, array_like=False):
    user: str
    status: Literal["online", "away", "offline"]
    last_seen: float


# Topics whose events are presence changes, sent as `presence` frames (docs/presence.md).
PRESENCE_PREFIX = "presence:"

# Topic names: what a client may subscribe to and gateway.emit() may publish to.
MAX_TOPIC_CHARS = 200
_PRINTABLE_NO_SPACE = re.compile(r"[\x21-\x7e]+")


def validate_topic(topic: str) -> str | None:
    """None if ``topic`` is a valid topic name, else a sentence saying what is wrong.

    gateway.emit() refuses the same topics with gateway.invalid_topic_reason()
    (sql/100_event_log.sql): change both together (tests/test_sql_names.py compares them).
    """
    if not isinstance(topic, str):
        return "the topic must be a string"
    if not topic:
        return "the topic is empty"
    if len(topic) > MAX_TOPIC_CHARS:
        return f"the topic is longer than {MAX_TOPIC_CHARS} characters"
    if not _PRINTABLE_NO_SPACE.fullmatch(topic):
        return "the topic may only contain printable ASCII characters without spaces"
    if "*" in topic:
        return "the topic contains '*': wildcards are only for grants in tokens, subscribe to one topic"
    kind, sep, ident = topic.partition(":")
    if not sep or not kind or not ident:
        return "the topic must look like kind:id, such as user:42 or room:7"
    return None


class RoomConn(msgspec.Struct):
    """One connection of a room member, with the state it tracked (a JSON object)."""

    conn: str
    state: msgspec.Raw


class RoomMember(msgspec.Struct):
    """A user in a room's presence: each of its connections there, with its own state."""

    user: str
    conns: list[RoomConn]


# Largest `state` of a `track` frame, in bytes of its compact JSON encoding. Not a setting:
# clients and their rooms must agree on it whatever replica they reach.
MAX_PRESENCE_STATE_BYTES = 1024
# Rooms one connection may track at once: each tracked room is a row, and a change to publish
# whenever the connection closes.
MAX_TRACKED_ROOMS = 20


class Presence(msgspec.Struct, tag="presence", omit_defaults=True):
    """A presence snapshot (``snapshot`` set on a global presence topic, ``members`` on a room's
    presence topic) or one change (``change`` set) on a topic.

    ``change`` has the shape of a PresenceEntry (global presence) or of a room change
    ({"op", "user", "conn", "state"}); it is carried as the JSON the database published
    (msgspec.Raw), so it is not decoded and re-encoded on the way.
    """

    topic: str
    snapshot: list[PresenceEntry] | None = None
    change: msgspec.Raw | None = None
    members: list[RoomMember] | None = None


ServerMessage = (
    Welcome
    | Refreshed
    | Subscribed
    | Unsubscribed
    | Pong
    | Error
    | Event
    | Presence
    | Published
    | Message
    | Tracked
    | Untracked
)

# --- error codes (the ``code`` of an Error frame) ---------------------------------


class ErrorCode:
    BAD_JSON = "bad_json"  # the frame is not valid JSON
    BAD_MESSAGE = "bad_message"  # valid JSON, but not a known message or a field has the wrong type
    BINARY_FRAME = "binary_frame"  # binary frames are not part of the protocol
    NOT_AUTHENTICATED = "not_authenticated"  # a message other than auth before authentication
    ALREADY_AUTHENTICATED = "already_authenticated"  # auth sent twice (use refresh)
    BAD_TOKEN = "bad_token"  # refresh with a token that does not verify
    TOKEN_USER_CHANGED = "token_user_changed"  # refresh with a token for another user
    BAD_TOPIC = "bad_topic"  # topic name empty, too long or with forbidden characters
    FORBIDDEN = "forbidden"  # the user may not subscribe (or publish) to this topic
    ALREADY_SUBSCRIBED = "already_subscribed"
    NOT_SUBSCRIBED = "not_subscribed"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    RATE_LIMITED = "rate_limited"  # too many messages or subscribes per second; the frame was dropped
    UNAVAILABLE = "unavailable"  # the database is unreachable; retry the subscribe later
    PRESENCE_DISABLED = "presence_disabled"
    # Publishing, and room presence (track / untrack)
    # a publish's data over GATEWAY_MAX_PUBLISH_BYTES, or a track's state over MAX_PRESENCE_STATE_BYTES
    TOO_LARGE = "too_large"
    NOT_TRACKED = "not_tracked"  # untrack of a room this connection does not track
    TOO_MANY_TRACKED = "too_many_tracked"  # a track of one room more than MAX_TRACKED_ROOMS


ERROR_CODES: tuple[str, ...] = tuple(v for k, v in vars(ErrorCode).items() if k.isupper())

# --- close codes --------------------------------------------------------------------


class CloseCode:
    """WebSocket close codes the gateway sends, and whether a client should reconnect."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the gateway is stopping; reconnect (with backoff)
    # Sent by aiohttp itself, for frames the WebSocket layer refuses; listed so clients know them.
    PROTOCOL_ERROR = 1002  # a malformed WebSocket frame; a client bug, reconnecting repeats it
    INVALID_PAYLOAD = 1007  # a text frame that is not valid UTF-8; fix the client
    MESSAGE_TOO_BIG = 1009  # a frame over the size limit; reconnect only after fixing the client
    SERVICE_RESTART = 1012  # draining for a deploy; reconnect now, another replica takes over
    TRY_AGAIN_LATER = 1013  # connection limit reached on this replica; reconnect with backoff
    UNAUTHORIZED = 4001  # no valid token; do not reconnect with the same token
    AUTH_TIMEOUT = 4004  # no auth frame within the deadline; reconnect
    TOKEN_EXPIRED = 4005  # the token expired and no refresh came; reconnect with a fresh token
    SLOW_CONSUMER = 4008  # the client read too slowly and its send queue overflowed; reconnect
    RATE_LIMITED = 4029  # the client kept sending over its rate limit; reconnect with backoff


CLOSE_CODES: dict[str, int] = {k: v for k, v in vars(CloseCode).items() if k.isupper()}

# Which close codes a client should reconnect after (the embeddable client follows this).
RECONNECT_AFTER: frozenset[int] = frozenset(
    {
        CloseCode.GOING_AWAY,
        CloseCode.SERVICE_RESTART,
        CloseCode.TRY_AGAIN_LATER,
        CloseCode.AUTH_TIMEOUT,
        CloseCode.TOKEN_EXPIRED,
        CloseCode.SLOW_CONSUMER,
        CloseCode.RATE_LIMITED,
    }
)

# --- refusals before the upgrade -----------------------------------------------------
# Plain HTTP answers to an upgrade request, with the JSON body {"error": ..., "message": ...}.


class Refusal(NamedTuple):
    status: int
    error: str
    retry_after: int | None = None  # seconds, sent as a Retry-After header


class Refused:
    """Every refusal before the upgrade, in the order the gateway checks them."""

    NOT_WEBSOCKET = Refusal(400, "not_websocket")  # not a WebSocket upgrade request
    DRAINING = Refusal(503, "draining")  # the replica is shutting down; connect again (elsewhere)
    ORIGIN_NOT_ALLOWED = Refusal(403, "origin_not_allowed")  # GATEWAY_ALLOWED_ORIGINS
    TOO_MANY_CONNECTS = Refusal(503, "too_many_connects", 1)  # GATEWAY_CONNECT_RATE
    TOO_MANY_CONNECTIONS = Refusal(503, "too_many_connections", 5)  # GATEWAY_MAX_CONNECTIONS
    BAD_TOKEN = Refusal(401, "bad_token")  # a header or subprotocol token that does not verify


REFUSALS: tuple[Refusal, ...] = tuple(v for k, v in vars(Refused).items() if k.isupper())

# --- codecs: built once, reused ---------------------------------------------------

decoder: msgspec.json.Decoder[ClientMessage] = msgspec.json.Decoder(ClientMessage)
encoder = msgspec.json.Encoder()


def encode(message: ServerMessage) -> bytes:
    return encoder.encode(message)


# The values of "type" a client may send, for the error that names them.
CLIENT_TYPES: tuple[str, ...] = tuple(
    str(t.__struct_config__.tag)
    for t in (Auth, Refresh, Subscribe, Unsubscribe, Ping, SetStatus, Publish, Track, Untrack)
)
_TOO_DEEP = "the frame's JSON is nested too deeply"


class BadFrame(Exception):
    """A client frame that is not a valid message: ``code`` and ``message`` for its error reply,
    and the ``id`` and ``topic`` the frame carried, if any, for the reply to echo."""

    def __init__(self, code: str, message: str, req_id: int | None = None, topic: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.id, self.topic = req_id, topic


def decode_frame(data: bytes | str) -> ClientMessage:
    """Decode one client frame, or raise :class:`BadFrame` saying what was wrong with it.

    msgspec raises RecursionError, not DecodeError, for JSON nested deeper than it recurses
    (a 16 KB frame can nest thousands of levels); that is a bad frame like any other."""
    try:
        return decoder.decode(data)
    except RecursionError:
        raise BadFrame(ErrorCode.BAD_JSON, _TOO_DEEP) from None
    except msgspec.DecodeError as exc:
        raise describe_decode_error(data, exc) from None


def describe_decode_error(data: bytes | str, exc: msgspec.DecodeError) -> BadFrame:
    """Turn a decode failure into the error naming what was wrong.

    A frame that is a JSON object but not a valid message (a misspelled field, an unknown
    type) still answers a request: its ``id`` (an integer) and ``topic`` (text) are read
    from the untyped object, so the client can match the error to what it sent."""
    try:
        value = msgspec.json.decode(data)
    except RecursionError:
        return BadFrame(ErrorCode.BAD_JSON, _TOO_DEEP)
    except msgspec.DecodeError:
        return BadFrame(ErrorCode.BAD_JSON, f"frame is not valid JSON: {exc}")
    req_id: int | None = None
    topic: str | None = None
    if isinstance(value, dict):
        # bool is an int subclass, but `"id": true` names no request.
        if isinstance(value.get("id"), int) and not isinstance(value["id"], bool):
            req_id = value["id"]
        if isinstance(value.get("topic"), str):
            topic = value["topic"]
    text = str(exc)
    if text.startswith("Invalid value") and text.endswith("at `$.type`"):
        text = f"{text}: the type must be one of {', '.join(CLIENT_TYPES)}"
    return BadFrame(ErrorCode.BAD_MESSAGE, text, req_id, topic)
