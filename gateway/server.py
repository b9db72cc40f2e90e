"""The aiohttp application: routes, health, and the lifecycle of every resource.

Each resource's start is paired with its teardown in one cleanup context, in order:
pool -> resolver check -> authenticator -> pipeline task -> presence -> listener task ->
relay task -> retention task. Stopping runs them backwards.

Authentication happens before the upgrade when the token comes with the request
(``Authorization: Bearer`` for non-browser clients, or the ``bearer.<token>`` WebSocket
subprotocol for browsers): a bad token gets HTTP 401 and never a socket. Otherwise the
first frame must be ``auth`` within ``auth_timeout``. Tokens are never accepted in the
URL, where they would end up in access logs and browser history.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import logging
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
from aiohttp import web

from . import protocol as p
from .auth import Authenticator, TokenError
from .authz import Authorizer
from .config import ConfigError, Settings, mask_dsn, require_database_url
from .db import DB_ERRORS, PoolConnectWatch
from .hub import Hub
from .listener import Listener
from .log import EventLog
from .logs import QUIET_BAD_REQUESTS, REDACT_BEARER
from .pipeline import Pipeline
from .ratelimit import TokenBucket
from .relay import Relay
from .resolver import Resolver
from .session import Registry, Session, SessionContext
from .tables import parse_tables
from .websocket import GatewayWebSocketResponse

log = logging.getLogger("gateway.server")
# aiohttp's WebSocket handshake logs the subprotocols a client offered (a bearer.<token>).
logging.getLogger("aiohttp.websocket").addFilter(REDACT_BEARER)
logging.getLogger("aiohttp.server").addFilter(QUIET_BAD_REQUESTS)

STATIC = Path(__file__).parent / "static"
SUBPROTOCOL = "gateway.v1"
BEARER_PREFIX = "bearer."


@dataclass
class State:
    settings: Settings
    draining: bool = False
    started: float = field(default_factory=time.time)
    pool: asyncpg.Pool | None = None
    listener: Listener | None = None
    relay: Relay | None = None
    pipeline: Pipeline | None = None
    ctx: SessionContext | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    pending_upgrades: int = 0
    open_sockets: int = 0  # upgraded sockets, authenticated or still waiting for auth
    connects: TokenBucket | None = None  # GATEWAY_CONNECT_RATE; None: no limit
    refused: Counter[str] = field(default_factory=Counter)  # upgrades refused, by error code


STATE = web.AppKey("state", State)


def build_app(settings: Settings) -> web.Application:
    require_database_url(settings)
    app = web.Application()
    app[STATE] = State(settings)
    if settings.connect_rate > 0:
        app[STATE].connects = TokenBucket(settings.connect_rate)
    app.cleanup_ctx.append(_resources)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/client/gateway.js", _static("gateway.js"))
    app.router.add_get("/client/gateway.mjs", _static("gateway.mjs"))
    if settings.metrics:
        from . import metrics

        metrics.install(app)
    return app


# ValueError: what asyncpg raises for a malformed part of the URL (a port "54x2").
_CONNECT_ERRORS: tuple[type[Exception], ...] = (*DB_ERRORS, ValueError)


def client_script(name: str) -> bytes:
    """The browser client as served: the source without its whole-line ``//`` comments. They
    are for whoever reads gateway/static/; a page embedding the script need not download them
    (a third of its gzipped size)."""
    text = (STATIC / name).read_text(encoding="utf-8")
    return "".join(ln for ln in text.splitlines(keepends=True) if not ln.lstrip().startswith("//")).encode()


@dataclass(frozen=True)
class _Script:
    """A client script as served: plain and gzipped, each with its ETag."""

    plain: bytes
    gzipped: bytes
    etag: str
    gzip_etag: str


def _script(name: str) -> _Script:
    body = client_script(name)
    digest = hashlib.sha256(body).hexdigest()[:20]
    return _Script(body, gzip.compress(body, compresslevel=9, mtime=0), f'"{digest}"', f'"{digest}-gz"')


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header takes gzip (RFC 9110 section 12.5.3; ``q=0`` refuses)."""
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() not in ("gzip", "*"):
            continue
        q = params.strip().lower()
        if q.startswith("q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False


def _etag_matches(if_none_match: str, *etags: str) -> bool:
    """If-None-Match uses the weak comparison: ``W/"x"`` matches ``"x"``."""
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in tags or any(etag in tags for etag in etags)


def _static(name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    script: list[_Script] = []  # read once, on first use

    async def handler(request: web.Request) -> web.StreamResponse:
        if not script:
            if not (STATIC / name).exists():
                raise web.HTTPNotFound(text=f"{name} is not installed")
            script.append(_script(name))
        s = script[0]
        # Every page that embeds the client downloads it: gzipped (a third of its size), and
        # revalidated with its ETag once max-age has passed, so a stale copy costs a 304.
        gz = _accepts_gzip(request.headers.get("Accept-Encoding", ""))
        # Allow-Origin *: a page on the application's own site imports gateway.mjs (and, through
        # it, gateway.js) from here, and browsers fetch module scripts with CORS. The files are
        # the same public code for everyone; who may connect is the WebSocket's Origin check.
        headers = {
            "Cache-Control": "public, max-age=300",
            "Access-Control-Allow-Origin": "*",
            "Vary": "Accept-Encoding",
            "ETag": s.gzip_etag if gz else s.etag,
        }
        if _etag_matches(request.headers.get("If-None-Match", ""), s.etag, s.gzip_etag):
            return web.Response(status=304, headers=headers)
        if gz:
            headers["Content-Encoding"] = "gzip"
        return web.Response(
            body=s.gzipped if gz else s.plain, content_type="text/javascript", headers=headers
        )

    return handler


async def _resources(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    s = state.settings
    try:
        # command_timeout: a query on a connection that stopped answering fails instead of
        # waiting forever, and the pipeline, which awaits it, catches up from the log.
        pool = await asyncpg.create_pool(
            s.database_url,
            min_size=1,
            max_size=s.pool_size,
            timeout=10,
            command_timeout=s.db_timeout,
            reset=_keep_session,
            connect=PoolConnectWatch(),
        )
    except _CONNECT_ERRORS as exc:
        raise ConfigError(f"cannot connect to the database at {mask_dsn(s.database_url)}: {exc}") from None
    assert pool is not None
    state.pool = pool
    try:
        missing = await pool.fetchval("SELECT to_regclass('gateway.events') IS NULL")
        if missing:
            raise ConfigError("the database has no gateway schema: run `gateway migrate` first")
        resolver = Resolver(pool, parse_tables(s.tables))
        await resolver.check()
        authenticator = Authenticator(s)
        await authenticator.start()
    except BaseException:
        await pool.close()
        raise
    hub = Hub()
    pipeline = Pipeline(
        hub,
        EventLog(pool),
        resolver,
        batch_max=s.batch_max,
        replay_max_events=s.replay_max_events,
        replay_max_age=s.replay_max_age,
        replay_concurrency=s.pool_size // 2,
        replay_max_bytes=s.send_queue_bytes // 2,
    )
    registry = Registry()
    ctx = SessionContext(s, authenticator, Authorizer(s, pool), pipeline, registry)
    if s.presence:
        from .presence import Presence

        ctx.presence = Presence(s, pool, hub)
        try:
            await ctx.presence.start()
        except BaseException:
            await authenticator.close()
            await pool.close()
            raise
    listener = Listener(
        s.database_url,
        pipeline.notify,
        pipeline.resync,
        probe_interval=s.probe_interval,
        probe_timeout=s.probe_timeout,
        max_delay=s.reconnect_max_delay,
    )
    relay = Relay(
        s.database_url,
        poll_interval=s.relay_poll_interval,
        idle_poll=s.relay_idle_poll,
        wake_rate=s.relay_wake_rate,
        lease=s.relay_lease,
        max_delay=s.reconnect_max_delay,
    )
    state.listener, state.pipeline, state.ctx, state.relay = listener, pipeline, ctx, relay
    state.tasks = [
        asyncio.create_task(pipeline.run(), name="pipeline"),
        asyncio.create_task(listener.run(), name="listener"),
        asyncio.create_task(relay.run(), name="relay"),
        asyncio.create_task(_retention(state, EventLog(pool)), name="retention"),
    ]
    for task in state.tasks:
        task.add_done_callback(_crash_report)
    log.info(
        "gateway ready: tables %s", ", ".join(t.entry.display for t in resolver.tables.values()) or "(none)"
    )
    try:
        yield
    finally:
        await relay.stop()
        await listener.stop()
        for task in state.tasks:
            task.cancel()
        await asyncio.gather(*state.tasks, return_exceptions=True)
        if ctx.presence is not None:
            await ctx.presence.stop()
        await authenticator.close()
        await pool.close()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's per-release reset query (a round trip after every batch).

    asyncpg still rolls back an open transaction on release. Nothing else needs undoing:
    the pool never LISTENs, sets session variables or keeps cursors, and the one session
    advisory lock (log pruning) is released explicitly.
    """


def _crash_report(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s crashed", task.get_name(), exc_info=task.exception())


async def _retention(state: State, event_log: EventLog) -> None:
    s = state.settings
    while True:
        await asyncio.sleep(s.retention_interval)
        try:
            deleted = await event_log.prune(s.retention_max_events, s.retention_max_age)
        except DB_ERRORS as exc:
            log.warning("retention skipped: %s: %s", type(exc).__name__, exc)
            continue
        if deleted:
            log.info("retention pruned %d event(s)", deleted)


async def _on_shutdown(app: web.Application) -> None:
    state = app[STATE]
    if state.ctx is not None:
        code = p.CloseCode.SERVICE_RESTART if state.draining else p.CloseCode.GOING_AWAY
        reason = "draining: reconnect to another replica" if state.draining else "gateway shutting down"
        await state.ctx.registry.close_all(code, reason, state.settings.drain_timeout)


# --- health ------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    problems = []
    if state.draining:
        problems.append("draining")
    if state.listener is None or not state.listener.connected:
        problems.append("listener not connected")
    problems.extend(f"{t.get_name()} task stopped" for t in state.tasks if t.done())
    if state.pool is not None:
        try:
            async with asyncio.timeout(1.0):
                await state.pool.fetchval("SELECT 1")
        except DB_ERRORS as exc:
            problems.append(f"database unreachable: {type(exc).__name__}")
    if problems:
        return web.json_response({"ready": False, "problems": problems}, status=503)
    return web.json_response({"ready": True})


# --- the WebSocket endpoint --------------------------------------------------------------


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Cross-site WebSocket hijacking defence: a browser always sends Origin."""
    if origin is None:
        return True  # not a browser; it must still present a token
    if "*" in allowed:
        return True
    if allowed:
        return origin.rstrip("/") in {a.rstrip("/") for a in allowed}
    return urlsplit(origin).netloc == host


def _token_from_request(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    for proto in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        proto = proto.strip()
        if proto.startswith(BEARER_PREFIX):
            return proto[len(BEARER_PREFIX) :]
    return None


def _refuse(state: State, refusal: p.Refusal, message: str) -> web.Response:
    state.refused[refusal.error] += 1
    headers = {} if refusal.retry_after is None else {"Retry-After": str(refusal.retry_after)}
    return web.json_response(
        {"error": refusal.error, "message": message}, status=refusal.status, headers=headers
    )


async def ws_handler(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    s = state.settings
    ctx = state.ctx
    assert ctx is not None
    ws = GatewayWebSocketResponse(
        protocols=(SUBPROTOCOL,),
        compress=s.compression,
        # aiohttp refuses frames of max_msg_size bytes or more; the setting is the largest accepted.
        max_msg_size=s.max_frame_bytes + 1,
        heartbeat=30.0,
        # Pings are answered by the session, so they count against GATEWAY_MESSAGE_RATE like
        # any client frame: aiohttp's autoping would answer a flood of them without limit.
        autoping=False,
    )
    # In the order of p.REFUSALS (docs/protocol.md lists them so), cheapest first.
    if not ws.can_prepare(request).ok:
        return _refuse(state, p.Refused.NOT_WEBSOCKET, "this endpoint takes WebSocket upgrades only")
    if state.draining:
        return _refuse(state, p.Refused.DRAINING, "this replica is shutting down; connect again")
    if not origin_allowed(request.headers.get("Origin"), request.host, s.allowed_origins):
        return _refuse(state, p.Refused.ORIGIN_NOT_ALLOWED, "this Origin may not open a WebSocket here")
    if state.connects is not None and not state.connects.take():
        return _refuse(
            state, p.Refused.TOO_MANY_CONNECTS, "too many new connections right now; try again shortly"
        )
    if state.open_sockets + state.pending_upgrades >= s.max_connections:
        return _refuse(state, p.Refused.TOO_MANY_CONNECTIONS, "this replica is full; try again later")
    identity = None
    token = _token_from_request(request)
    state.pending_upgrades += 1
    try:
        if token is not None:
            try:
                identity = await ctx.authenticator.verify(token)
            except TokenError as exc:
                return _refuse(state, p.Refused.BAD_TOKEN, str(exc))
        await ws.prepare(request)
    finally:
        state.pending_upgrades -= 1
    transport = request.transport
    if transport is None:
        return ws
    session = Session(ctx, ws, transport, ctx.registry.new_id(), identity)
    state.open_sockets += 1
    try:
        await session.run()
    finally:
        state.open_sockets -= 1
    return ws


# --- running -----------------------------------------------------------------------------


async def serve(settings: Settings, *, reuse_port: bool = False, app: web.Application | None = None) -> None:
    """Run until SIGTERM (drain: close clients with 1012) or SIGINT (close with 1001)."""
    app = app or build_app(settings)
    # keepalive_timeout: aiohttp's default (3630 s) would let a connection that never finishes
    # its request hold a descriptor for an hour, uncounted by GATEWAY_MAX_CONNECTIONS.
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, keepalive_timeout=settings.http_idle_timeout
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None
    log.info("listening on http://%s:%d", settings.host, settings.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(draining: bool) -> None:
        app[STATE].draining = app[STATE].draining or draining
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_signal, True)
    loop.add_signal_handler(signal.SIGINT, on_signal, False)
    try:
        await stop.wait()
    finally:
        log.info("stopping (%s)", "draining" if app[STATE].draining else "shutdown")
        await site.stop()  # stop accepting; existing sockets stay until closed below
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(runner.cleanup(), app[STATE].settings.drain_timeout + 5)
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)
        log.info("stopped")
