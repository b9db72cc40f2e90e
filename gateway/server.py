"""The aiohttp application: routes, health, and the lifecycle of every resource.

Each resource is started and stopped by a cleanup context of its own, which puts it under
its own typed key (``POOL``, ``AUTHENTICATOR``, ...), in order: the database (pool, schema
and tables checked) -> the authenticator -> delivery (hub, pipeline and its task) ->
presence -> the sessions' shared context -> background tasks (listener, relay, retention).
aiohttp stops them backwards, and if one fails to start, it stops exactly those that
started before it.

Authentication happens before the upgrade when the token comes with the request
(``Authorization: Bearer`` for non-browser clients, or the ``bearer.<token>`` WebSocket
subprotocol for browsers): a bad token gets HTTP 401 and never a socket. Otherwise the
first frame must be ``auth`` within ``auth_timeout``. Tokens are never accepted in the
URL, where they would end up in access logs and browser history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
from aiohttp import web

from . import __version__, clientscript, httpapi, metrics, status
from . import protocol as p
from .auth import Authenticator, TokenError
from .authz import Authorizer
from .broker import Broker, require_client
from .bus import Bus
from .config import ConfigError, Settings, jwt_algorithms, mask_dsn, require_database_url
from .eventlog import EventLog
from .hub import Hub
from .listener import Listener
from .logsetup import QUIET_BAD_REQUESTS, REDACT_BEARER
from .migrate import prerelease_problem
from .pgerrors import DB_ERRORS, PoolConnectWatch
from .pipeline import Pipeline
from .pooling import check_session_pooling
from .presence import Presence
from .publish import Publisher
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

T = TypeVar("T")
SUBPROTOCOL = "gateway.v1"
BEARER_PREFIX = "bearer."


@dataclass(frozen=True)
class Background:
    """What runs beside the requests, for /readyz, /metrics and tests: the doorbell source (the
    LISTEN connection, or the broker with GATEWAY_BROKER) and the relay (their tasks, and
    retention's, are in ``State.tasks``)."""

    listener: Listener | Broker
    relay: Relay


# One key per resource, set by the cleanup context that starts it (see the module docstring).
POOL = web.AppKey("pool", asyncpg.Pool)
RESOLVER = web.AppKey("resolver", Resolver)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
PIPELINE = web.AppKey("pipeline", Pipeline)
PRESENCE = web.AppKey("presence", Presence)
SESSIONS = web.AppKey("sessions", SessionContext)
BACKGROUND = web.AppKey("background", Background)
BUS = web.AppKey("bus", Bus)


@dataclass
class State:
    """What the HTTP side keeps between requests, and its view of the running resources
    (for the handlers, /metrics and tests). The resources are read from their keys: they
    exist once the application has started."""

    settings: Settings
    app: web.Application = field(repr=False)
    draining: bool = False
    started: float = field(default_factory=time.time)
    # Every background task of the resources, for /readyz and crash reports.
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    pending_upgrades: int = 0
    open_sockets: int = 0  # upgraded sockets, authenticated or still waiting for auth
    connects: TokenBucket | None = None  # GATEWAY_CONNECT_RATE; None: no limit
    refused: Counter[str] = field(default_factory=Counter)  # upgrades refused, by error code

    @property
    def pool(self) -> asyncpg.Pool:
        return self.app[POOL]

    @property
    def pipeline(self) -> Pipeline:
        return self.app[PIPELINE]

    @property
    def ctx(self) -> SessionContext:
        return self.app[SESSIONS]

    @property
    def listener(self) -> Listener | Broker:
        return self.app[BACKGROUND].listener

    @property
    def bus(self) -> Bus:
        return self.app[BUS]

    @property
    def relay(self) -> Relay:
        return self.app[BACKGROUND].relay


STATE = web.AppKey("state", State)


def build_app(settings: Settings) -> web.Application:
    require_database_url(settings)
    if settings.broker:
        require_client()
    app = web.Application()
    state = app[STATE] = State(settings, app)
    if settings.connect_rate > 0:
        state.connects = TokenBucket(settings.connect_rate)
    app.cleanup_ctx.extend([_database, _authentication, _delivery, _bus])
    if settings.presence:
        app.cleanup_ctx.append(_presence)
    app.cleanup_ctx.extend([_sessions, _background])
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    clientscript.install(app)
    httpapi.install(app, state)
    if settings.metrics:
        metrics.install(app, state)
    if settings.status_token:
        status.install(app, state, settings.status_token)
    return app


# ValueError: what asyncpg raises for a malformed part of the URL (a port "54x2").
_CONNECT_ERRORS: tuple[type[Exception], ...] = (*DB_ERRORS, ValueError)


# --- resources, each started and stopped by its own cleanup context ---------------------


async def check(settings: Settings) -> None:
    """Once, before `serve --workers N` starts its workers: what each of them would refuse to
    start with (the JWT settings as a whole, the database unreachable or without the gateway
    schema, a listed table or column that is not there), so the error is printed once and
    no worker is started."""
    jwt_algorithms(settings)
    if settings.broker:
        require_client()
    pool = await _open_pool(settings, 1)
    try:
        await _checked_resolver(pool, settings)
    finally:
        await pool.close()


async def _database(app: web.Application) -> AsyncIterator[None]:
    """The pool; the gateway schema and the listed tables checked before anything else starts."""
    s = app[STATE].settings
    pool = await _open_pool(s, s.pool_size)
    try:
        app[RESOLVER] = await _checked_resolver(pool, s)
        app[POOL] = pool
        yield
    finally:
        await pool.close()


async def _open_pool(s: Settings, size: int) -> asyncpg.Pool:
    try:
        # command_timeout: a query on a connection that stopped answering fails instead of
        # waiting forever, and the pipeline, which awaits it, catches up from the log.
        pool = await asyncpg.create_pool(
            s.database_url,
            min_size=1,
            max_size=size,
            timeout=10,
            command_timeout=s.db_timeout,
            reset=_keep_session,
            connect=PoolConnectWatch(),
        )
    except _CONNECT_ERRORS as exc:
        raise ConfigError(f"cannot connect to the database at {mask_dsn(s.database_url)}: {exc}") from None
    assert pool is not None
    return pool


async def _checked_resolver(pool: asyncpg.Pool, s: Settings) -> Resolver:
    """The resolver of GATEWAY_TABLES, once the gateway schema and those tables are found."""
    await check_session_pooling(s.database_url)  # PgBouncer in transaction mode breaks LISTEN & co.
    missing = await pool.fetchval("SELECT to_regclass('gateway.events') IS NULL")
    if missing:
        raise ConfigError("the database has no gateway schema: run `gateway migrate` first")
    problem = await prerelease_problem(pool, f"the database at {mask_dsn(s.database_url)}")
    if problem:
        raise ConfigError(problem)
    resolver = Resolver(pool, parse_tables(s.tables))
    await resolver.check()
    return resolver


async def _authentication(app: web.Application) -> AsyncIterator[None]:
    authenticator = Authenticator(app[STATE].settings)
    try:
        await authenticator.start()
        app[AUTHENTICATOR] = authenticator
        yield
    finally:
        await authenticator.close()


async def _delivery(app: web.Application) -> AsyncIterator[None]:
    """The hub and the pipeline that fills it, with the pipeline's task."""
    state, s, pool = app[STATE], app[STATE].settings, app[POOL]
    pipeline = Pipeline(
        Hub(),
        EventLog(pool),
        app[RESOLVER],
        batch_max=s.batch_max,
        replay_max_events=s.replay_max_events,
        replay_max_age=s.replay_max_age,
        replay_concurrency=s.pool_size // 2,
        replay_max_bytes=s.send_queue_bytes // 2,
    )
    app[PIPELINE] = pipeline
    async with _tasks(state, [_task(pipeline.run(), "pipeline")]):
        yield


async def _bus(app: web.Application) -> AsyncIterator[None]:
    """The replica bus (gateway/bus.py): its sending connection here; what it receives on is
    attached in _background (the LISTEN connection, or the broker)."""
    s = app[STATE].settings
    bus = Bus(None if s.broker else s.database_url, max_delay=s.reconnect_max_delay)
    await bus.start()
    try:
        app[BUS] = bus
        yield
    finally:
        await bus.stop()


async def _presence(app: web.Application) -> AsyncIterator[None]:
    presence = Presence(app[STATE].settings, app[POOL], app[PIPELINE])
    await presence.start()
    try:
        app[PRESENCE] = presence
        yield
    finally:
        await presence.stop()


async def _sessions(app: web.Application) -> AsyncIterator[None]:
    """What every WebSocket session shares. Nothing to stop: on_shutdown closes the sessions."""
    s = app[STATE].settings
    authorizer = Authorizer(s, app[POOL])
    app[SESSIONS] = SessionContext(
        s,
        app[AUTHENTICATOR],
        authorizer,
        app[PIPELINE],
        Registry(),
        app.get(PRESENCE),
        Publisher(s, app[POOL], app[BUS], app[PIPELINE].hub, authorizer),
    )
    yield


async def _background(app: web.Application) -> AsyncIterator[None]:
    """The doorbell source (LISTEN, or the broker), the relay and log retention."""
    state, s, pool = app[STATE], app[STATE].settings, app[POOL]
    source: Listener | Broker
    tasks = []
    if s.broker:
        # No LISTEN connection: the relay publishes to NATS, and this process receives the
        # doorbells of the topics it serves only.
        source = broker = Broker(
            s.broker,
            prefix=s.broker_subject_prefix,
            creds=s.broker_creds,
            tls_ca=s.broker_tls_ca,
            tls_cert=s.broker_tls_cert,
            tls_key=s.broker_tls_key,
            check_interval=s.broker_check_interval,
            tables=s.tables,
        )
        await broker.start()
        await app[BUS].use_broker(broker)
    else:
        source = listener = Listener(
            s.database_url,
            probe_interval=s.probe_interval,
            probe_timeout=s.probe_timeout,
            max_delay=s.reconnect_max_delay,
        )
        app[BUS].listen_on(listener)  # before it connects: the bus's channel is LISTENed too
        tasks.append(_task(listener.run(), "listener"))
    app[PIPELINE].consume(source)
    relay = Relay(
        s.database_url,
        poll_interval=s.relay_poll_interval,
        wait=s.relay_wait,
        idle_poll=s.relay_idle_poll,
        wake_rate=s.relay_wake_rate,
        lease=s.relay_lease,
        max_delay=s.reconnect_max_delay,
        outlet=source if isinstance(source, Broker) else None,
    )
    tasks += [
        _task(relay.run(), "relay"),
        _task(_retention(s, EventLog(pool)), "retention"),
    ]
    app[BACKGROUND] = Background(source, relay)
    async with _tasks(state, tasks):
        log.info(
            "gateway ready: tables %s%s",
            ", ".join(t.entry.display for t in app[RESOLVER].tables.values()) or "(none)",
            f"; doorbells through the broker at {source.where()}" if isinstance(source, Broker) else "",
        )
        try:
            yield
        finally:
            # Before their tasks are cancelled: the relay hands its lease over on the way out.
            await relay.stop()
            await source.stop()


def _task(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    task = asyncio.create_task(coro, name=name)
    task.add_done_callback(_crash_report)
    return task


@contextlib.asynccontextmanager
async def _tasks(state: State, tasks: list[asyncio.Task[None]]) -> AsyncIterator[None]:
    """Lists ``tasks`` for /readyz while the block runs, then cancels them and waits for them."""
    state.tasks.extend(tasks)
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            state.tasks.remove(task)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's per-release reset query (a round trip after every batch).

    asyncpg still rolls back an open transaction on release. Nothing else needs undoing:
    the pool never LISTENs, sets session variables or keeps cursors, and the one session
    advisory lock (log pruning) is released explicitly.
    """


def _crash_report(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s crashed", task.get_name(), exc_info=task.exception())


async def _retention(s: Settings, event_log: EventLog) -> None:
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
    code = p.CloseCode.SERVICE_RESTART if state.draining else p.CloseCode.GOING_AWAY
    reason = "draining: reconnect to another replica" if state.draining else "gateway shutting down"
    await state.ctx.registry.close_all(code, reason, state.settings.drain_timeout)


# --- health ------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    # The version lets a rolling deploy be watched replica by replica (docs/release.md).
    return web.json_response({"ok": True, "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    problems = []
    if state.draining:
        problems.append("draining")
    # A broker outage leaves a process ready: it delivers from the log every second meanwhile,
    # and every replica leaving the load balancer at once would be the bigger outage.
    if not state.listener.connected and not isinstance(state.listener, Broker):
        problems.append("listener not connected")
    problems.extend(f"{t.get_name()} task stopped" for t in state.tasks if t.done())
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
    ws = GatewayWebSocketResponse(
        protocols=(SUBPROTOCOL,),
        compress=s.compression,
        # aiohttp refuses frames of max_msg_size bytes or more; the setting is the largest accepted.
        max_msg_size=s.max_frame_bytes + 1,
        # No heartbeat timer per connection (~0.9 KB each): the registry pings silent clients
        # and drops those that do not answer, for all of them at once (Registry._beat).
        heartbeat=None,
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
            # This frame lives as long as the connection: do not keep the token's text in it.
            del token
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


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end on a new event loop: uvloop's where it is installed."""
    try:
        import uvloop
    except ImportError:  # not on every platform; asyncio's own loop works too
        return asyncio.run(coro)
    return uvloop.run(coro)


async def serve(settings: Settings, *, reuse_port: bool = False, app: web.Application | None = None) -> None:
    """Run until SIGTERM (drain: close clients with 1012) or SIGINT (close with 1001)."""
    app = app or build_app(settings)
    # keepalive_timeout: aiohttp's default (3630 s) would let a connection that never finishes
    # its request hold a descriptor for an hour, uncounted by GATEWAY_MAX_CONNECTIONS.
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, keepalive_timeout=settings.http_idle_timeout
    )
    try:
        await runner.setup()
    except BaseException:
        await runner.cleanup()  # stops the resources that did start, in reverse order
        raise
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
