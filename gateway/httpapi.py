"""The HTTP API for the application's own servers: publish, read presence, disconnect users.

Off unless ``GATEWAY_HTTP_API=true``. Every request under ``/v1/`` goes through the same
checks, cheapest first, before its endpoint runs:

1. an ``Origin`` header: 403 ``origin_not_allowed``. Browsers send Origin with every POST and
   with cross-site GETs; this API is for servers, which never do. (It also means no page can
   use a token it obtained to call the API from a browser.)
2. ``GATEWAY_HTTP_API_RATE``, one token bucket per process: 429 ``rate_limited``.
3. ``Authorization: Bearer <JWT>``, verified exactly as client tokens are (gateway/auth.py: the
   same keys, algorithms, audience, issuer, leeway): 401 ``bad_token`` with the verifier's
   reason (``missing``, ``expired``...).
4. the token's claims include ``"role": "server"``: else 403 ``not_server``. A client's token
   must never be enough, whatever topics it grants.

Then the body: at most a few KB are read (413 ``too_large``), decoded with msgspec against
the endpoint's struct (400 ``bad_json`` / ``bad_request`` naming the field), topics checked
with ``protocol.validate_topic`` (400 ``bad_topic``). Every error is JSON,
``{"error": code, "message": sentence}``, with the HTTP status of ``ERRORS``; docs/http-api.md
lists them all (tests/test_httpapi.py checks it).

Publishes go through the same Publisher as a client's ``publish`` frame (gateway/publish.py),
with the caller's user claim as ``from``. Disconnects reach every replica over the replica bus
(gateway/bus.py, kind ``disconnect``): ``send`` calls this process's handler at once, so the
replica that took the request has closed its own connections of the user when it answers,
and the others close theirs when the message arrives. Replicas with the API off still obey
it. Best effort, like everything on the bus.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import msgspec
from aiohttp import web

from . import protocol as p
from .auth import MAX_USER_CHARS, Identity, TokenError
from .bus import Bus
from .pipeline import Unavailable
from .publish import PublishError
from .ratelimit import TokenBucket

if TYPE_CHECKING:
    from .config import Settings
    from .presence import Presence
    from .session import SessionContext

log = logging.getLogger("gateway.httpapi")

SERVER_ROLE = "server"
# The claim that must hold SERVER_ROLE. Fixed: a setting would let a deployment point it at a
# claim its users can influence.
ROLE_CLAIM = "role"
# Largest request body read for a disconnect (a user id, a topic, a reason: far below this).
MAX_SMALL_BODY = 4096
# Room around `data` in a publish body: the topic (MAX_TOPIC_CHARS) and the JSON around it.
PUBLISH_ENVELOPE = 512
# Longest close reason a caller may give: the close frame holds 123 bytes, of which the
# gateway's own prefix takes the rest.
MAX_REASON_BYTES = 80
DISCONNECT_CODES = (p.CloseCode.DISCONNECTED, p.CloseCode.REAUTHENTICATE)
BUS_KIND = "disconnect"

_tasks: set[asyncio.Future[None]] = set()


class ApiErrorKind(NamedTuple):
    status: int
    error: str


class Errors:
    """Every error the HTTP API answers with (docs/http-api.md lists each)."""

    ORIGIN_NOT_ALLOWED = ApiErrorKind(403, "origin_not_allowed")
    RATE_LIMITED = ApiErrorKind(429, "rate_limited")
    BAD_TOKEN = ApiErrorKind(401, "bad_token")
    NOT_SERVER = ApiErrorKind(403, "not_server")
    NOT_FOUND = ApiErrorKind(404, "not_found")
    METHOD_NOT_ALLOWED = ApiErrorKind(405, "method_not_allowed")
    TOO_LARGE = ApiErrorKind(413, "too_large")
    BAD_JSON = ApiErrorKind(400, "bad_json")
    BAD_REQUEST = ApiErrorKind(400, "bad_request")
    BAD_TOPIC = ApiErrorKind(400, "bad_topic")
    PRESENCE_DISABLED = ApiErrorKind(404, "presence_disabled")
    UNAVAILABLE = ApiErrorKind(503, "unavailable")


ERRORS: tuple[ApiErrorKind, ...] = tuple(v for k, v in vars(Errors).items() if k.isupper())

# The publisher's refusals (gateway/publish.py) as HTTP answers; any other is a bad request.
_PUBLISH_ERRORS: dict[str, tuple[ApiErrorKind, dict[str, str] | None]] = {
    p.ErrorCode.BAD_TOPIC: (Errors.BAD_TOPIC, None),
    p.ErrorCode.TOO_LARGE: (Errors.TOO_LARGE, None),
    p.ErrorCode.RATE_LIMITED: (Errors.RATE_LIMITED, {"Retry-After": "1"}),
    p.ErrorCode.UNAVAILABLE: (Errors.UNAVAILABLE, None),
}


class ApiError(Exception):
    def __init__(
        self, kind: ApiErrorKind, message: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.kind, self.message, self.headers, self.extra = kind, message, headers or {}, extra

    def response(self) -> web.Response:
        body = {"error": self.kind.error, "message": self.message, **self.extra}
        return web.json_response(body, status=self.kind.status, headers=self.headers)


# --- request bodies ------------------------------------------------------------------


class PublishRequest(msgspec.Struct, forbid_unknown_fields=True):
    topic: str
    data: msgspec.Raw  # any JSON value, passed on as the bytes the caller sent
    durable: bool = False


class DisconnectRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Also the body of the bus message to the other replicas."""

    user: str
    topic: str | None = None
    code: int | None = None
    reason: str | None = None


_publish_decoder = msgspec.json.Decoder(PublishRequest)
_disconnect_decoder = msgspec.json.Decoder(DisconnectRequest)
_encoder = msgspec.json.Encoder()


# --- the API ---------------------------------------------------------------------------

Handler = Callable[[web.Request, Identity], Awaitable[web.StreamResponse]]


class State(Protocol):
    """What the API needs of the server's state (gateway/server.py's State, whose module imports
    this one: a Protocol keeps the arrow one way). The resources exist once the app started."""

    @property
    def settings(self) -> Settings: ...

    @property
    def ctx(self) -> SessionContext: ...

    @property
    def bus(self) -> Bus: ...


class HttpApi:
    """The routes of ``/v1/`` on one process, and the disconnect command it obeys from the bus."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.settings = state.settings
        self.bucket = TokenBucket(self.settings.http_api_rate)
        self.bus: Bus | None = None  # attached at startup, once the bus exists
        # Requests answered, by endpoint and outcome (status code), for /metrics.
        self.requests: dict[tuple[str, int], int] = {}
        # What the last disconnect carried out here: the bus calls this process's handler
        # inside send(), so the request that sent it reads its count right after.
        self._carried_out = 0
        self.disconnects_received = 0  # disconnect commands carried out here (any replica's)

    def attach(self, bus: Bus) -> None:
        """Obey disconnects from every replica (this one's too: send() hands them here at once)."""
        self.bus = bus
        bus.on(BUS_KIND, self._on_bus)

    def _on_bus(self, body: bytes) -> None:
        try:
            req = _disconnect_decoder.decode(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            # Only the gateway's own registered sessions reach here (gateway/bus.py): a bug or a
            # newer replica's format, never a forgery. Nothing is done.
            log.warning("a disconnect on the bus could not be read: %s", exc)
            return
        self.disconnects_received += 1
        self._carried_out = self.carry_out(req)

    def add_routes(self, app: web.Application) -> None:
        routes: list[tuple[str, str, Handler]] = [
            ("POST", "/v1/publish", self.publish),
            ("GET", "/v1/presence/{topic}", self.presence),
            ("POST", "/v1/disconnect", self.disconnect),
        ]
        for method, path, handler in routes:
            app.router.add_route("*", path, self._guarded(method, path, handler))
        app.router.add_route("*", "/v1/{tail:.*}", self._unknown)

    # --- the checks every request passes ---------------------------------------------

    def _guarded(
        self, method: str, path: str, handler: Handler
    ) -> Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                if request.method != method:
                    raise ApiError(
                        Errors.METHOD_NOT_ALLOWED,
                        f"{path} takes {method} requests, not {request.method}",
                        {"Allow": method},
                    )
                identity = await self._authenticate(request)
                response = await handler(request, identity)
            except ApiError as exc:
                response = exc.response()
            key = (path, response.status)
            self.requests[key] = self.requests.get(key, 0) + 1
            return response

        return guarded

    async def _unknown(self, request: web.Request) -> web.StreamResponse:
        return ApiError(
            Errors.NOT_FOUND,
            f"no endpoint {request.path}: the API has POST /v1/publish, GET /v1/presence/{{topic}} "
            "and POST /v1/disconnect",
        ).response()

    async def _authenticate(self, request: web.Request) -> Identity:
        if "Origin" in request.headers:
            raise ApiError(
                Errors.ORIGIN_NOT_ALLOWED,
                "requests with an Origin header (from browsers) are refused: call the HTTP API from "
                "your server",
            )
        if not self.bucket.take():
            raise ApiError(
                Errors.RATE_LIMITED,
                f"more than GATEWAY_HTTP_API_RATE ({self.settings.http_api_rate:g}) requests per second; "
                "try again shortly",
                {"Retry-After": "1"},
            )
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                Errors.BAD_TOKEN,
                "send the server token as Authorization: Bearer <token>",
                {"WWW-Authenticate": "Bearer"},
                reason="missing",
            )
        try:
            identity = await self.state.ctx.authenticator.verify(token.strip())
        except TokenError as exc:
            raise ApiError(
                Errors.BAD_TOKEN,
                str(exc),
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
                reason=exc.reason,
            ) from None
        if identity.claims.get(ROLE_CLAIM) != SERVER_ROLE:
            raise ApiError(
                Errors.NOT_SERVER,
                f'the token is valid but its claims do not include "{ROLE_CLAIM}": "{SERVER_ROLE}"; '
                "client tokens cannot call the HTTP API",
            )
        return identity

    async def _body(self, request: web.Request, limit: int) -> bytes:
        length = request.content_length
        if length is not None and length > limit:
            raise ApiError(
                Errors.TOO_LARGE, f"the request body is {length} bytes; at most {limit} are accepted"
            )
        # read(n) returns what has arrived, up to n: a body in several packets takes several.
        body = b""
        while chunk := await request.content.read(limit + 1 - len(body)):
            body += chunk
            if len(body) > limit:
                raise ApiError(Errors.TOO_LARGE, f"the request body is over {limit} bytes")
        if not body:
            raise ApiError(Errors.BAD_JSON, "the request has no body: send a JSON object")
        return body

    def _topic(self, topic: str) -> None:
        problem = p.validate_topic(topic)
        if problem:
            raise ApiError(Errors.BAD_TOPIC, f"{problem}: {topic[:100]!r}")

    # --- POST /v1/publish ----------------------------------------------------------

    async def publish(self, request: web.Request, identity: Identity) -> web.StreamResponse:
        limit = self.settings.max_publish_bytes
        req = _decode(_publish_decoder, await self._body(request, limit + PUBLISH_ENVELOPE))
        self._topic(req.topic)
        # The data's size, like the rates, is the publisher's to check (too_large -> 413).
        result = await self._publish(req, identity.user)
        if result is None:
            return web.json_response({"ok": True})
        epoch, pos = result
        return web.json_response({"ok": True, "epoch": epoch, "pos": pos})

    async def _publish(self, req: PublishRequest, sender: str) -> tuple[str, int] | None:
        publisher = self.state.ctx.publisher
        assert publisher is not None  # the server always makes one (gateway/server.py)
        try:
            return await publisher.publish(req.topic, bytes(req.data), durable=req.durable, sender=sender)
        except PublishError as exc:
            kind, headers = _PUBLISH_ERRORS.get(exc.code, (Errors.BAD_REQUEST, None))
            raise ApiError(kind, exc.message, headers) from None

    # --- GET /v1/presence/{topic} --------------------------------------------------

    async def presence(self, request: web.Request, identity: Identity) -> web.StreamResponse:
        topic = request.match_info["topic"]
        self._topic(topic)
        if not topic.startswith(p.PRESENCE_PREFIX):
            raise ApiError(
                Errors.BAD_TOPIC,
                f"{topic[:100]!r} is not a presence topic: they start with {p.PRESENCE_PREFIX}",
            )
        presence = self.state.ctx.presence
        if presence is None:
            raise ApiError(
                Errors.PRESENCE_DISABLED, "presence is disabled on this gateway (GATEWAY_PRESENCE=false)"
            )
        if topic not in self.settings.presence_topics:
            return await self._room_presence(presence, topic)
        try:
            frame = await presence.snapshot(topic)
        except Unavailable:
            raise ApiError(Errors.UNAVAILABLE, "the database is unreachable; try again") from None
        return web.Response(body=p.encode(frame), content_type="application/json")

    async def _room_presence(self, presence: Presence, topic: str) -> web.StreamResponse:
        """A room's presence topic (``presence:room:7``): who is in it, with each connection's
        state, as the ``members`` a subscriber starts with (gateway/rooms.py)."""
        rooms = presence.rooms
        try:
            members = await rooms.members(topic)
        except ValueError as exc:
            raise ApiError(Errors.BAD_TOPIC, str(exc)) from None
        except Unavailable:
            raise ApiError(Errors.UNAVAILABLE, "the database is unreachable; try again") from None
        return web.json_response({"type": "presence", "topic": topic, "members": members})

    # --- POST /v1/disconnect -------------------------------------------------------

    async def disconnect(self, request: web.Request, identity: Identity) -> web.StreamResponse:
        req = _decode(_disconnect_decoder, await self._body(request, MAX_SMALL_BODY))
        if not req.user or len(req.user) > MAX_USER_CHARS:
            raise ApiError(Errors.BAD_REQUEST, f"user must be a user id of 1 to {MAX_USER_CHARS} characters")
        if req.topic is not None:
            self._topic(req.topic)
            if req.code is not None:
                raise ApiError(
                    Errors.BAD_REQUEST,
                    "code is for closing connections; with a topic only that subscription is dropped",
                )
        elif req.code is not None and req.code not in DISCONNECT_CODES:
            raise ApiError(
                Errors.BAD_REQUEST,
                f"code must be {p.CloseCode.DISCONNECTED} (do not reconnect, the default) or "
                f"{p.CloseCode.REAUTHENTICATE} (reconnect with a fresh token), not {req.code}",
            )
        if req.reason is not None and len(req.reason.encode()) > MAX_REASON_BYTES:
            raise ApiError(Errors.BAD_REQUEST, f"reason must be at most {MAX_REASON_BYTES} bytes of UTF-8")
        log.info(
            "disconnect of user %r%s requested by %r",
            req.user,
            f" from {req.topic}" if req.topic else "",
            identity.user,
        )
        assert self.bus is not None
        self._carried_out = 0
        self.bus.send(BUS_KIND, _encoder.encode(req))  # carried out here before it returns
        return web.json_response({"ok": True, "here": self._carried_out})

    def carry_out(self, req: DisconnectRequest) -> int:
        """Close (or drop the topic of) ``req.user``'s connections on this replica; how many."""
        sessions = self.state.ctx.registry.of_user(req.user)
        why = f": {req.reason}" if req.reason else ""
        if req.topic is not None:
            message = f"the application removed you from {req.topic}{why}"
            return sum(s.remove_from(req.topic, message) for s in sessions)
        code = req.code if req.code in DISCONNECT_CODES else p.CloseCode.DISCONNECTED
        reason = f"disconnected by the server{why}"
        for s in sessions:
            _spawn(s.close(code, reason))
        return len(sessions)


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    try:
        return decoder.decode(body)
    except RecursionError:
        raise ApiError(Errors.BAD_JSON, "the body's JSON is nested too deeply") from None
    except msgspec.ValidationError as exc:
        raise ApiError(Errors.BAD_REQUEST, f"the body is not a valid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(Errors.BAD_JSON, f"the body is not valid JSON: {exc}") from None


def _spawn(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


HTTP_API = web.AppKey("http_api", HttpApi)


def install(app: web.Application, state: State) -> None:
    """Add the API to ``app``: its routes when GATEWAY_HTTP_API is on, and, whether or not, the
    handler of disconnects sent by any replica over the bus."""
    api = app[HTTP_API] = HttpApi(state)
    if state.settings.http_api:
        api.add_routes(app)

    async def attach(app: web.Application) -> None:
        # After every cleanup context has started (aiohttp runs them first): the bus exists.
        # Also with the API off here: other replicas' disconnects must close this one's sockets.
        api.attach(state.bus)

    app.on_startup.append(attach)
