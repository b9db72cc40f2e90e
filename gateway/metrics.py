"""Prometheus metrics at /metrics.

The hot path only bumps plain integer attributes (hub.delivered, pipeline.resolved, ...);
this collector reads them at scrape time, so serving metrics costs nothing per event.
The notification queue usage is read from PostgreSQL at scrape time, and a warning is
logged when it passes half full (see docs/deploy.md: a listener that cannot keep up, or
a long transaction holding the queue tail, fills it; at 100% every NOTIFY fails).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .config import ConfigError
from .db import DB_ERRORS

if TYPE_CHECKING:
    import asyncpg

    from .listener import Listener
    from .presence import Presence
    from .relay import Relay

log = logging.getLogger("gateway.metrics")

QUEUE_WARN = 0.5


class GatewayCollector(Collector):
    def __init__(self, app: web.Application) -> None:
        self._app = app
        self.queue_usage = 0.0

    def collect(self) -> Iterator[Metric]:
        from .server import STATE

        state = self._app[STATE]
        ctx, pipeline, listener = state.ctx, state.pipeline, state.listener
        if ctx is None or pipeline is None or listener is None:
            return
        reg = ctx.registry
        info = GaugeMetricFamily(
            "gateway_worker",
            "always 1; its label: this process's worker number under --workers",
            labels=["worker"],
        )
        info.add_metric([str(worker_id())], 1)
        yield info
        hub = pipeline.hub
        yield GaugeMetricFamily("gateway_connections", "open WebSocket connections", value=len(reg.sessions))
        refused = CounterMetricFamily(
            "gateway_upgrades_refused", "WebSocket upgrades refused before the upgrade", labels=["error"]
        )
        for error, count in sorted(state.refused.items()):
            refused.add_metric([error], count)
        yield refused
        yield GaugeMetricFamily(
            "gateway_subscriptions", "topic subscriptions", value=hub.subscription_count()
        )
        yield GaugeMetricFamily("gateway_topics", "topics with local subscribers", value=len(hub.topics()))
        yield CounterMetricFamily(
            "gateway_notifications_received", "doorbells received", value=pipeline.received
        )
        yield CounterMetricFamily(
            "gateway_events_resolved", "events resolved and encoded", value=pipeline.resolved
        )
        yield CounterMetricFamily("gateway_deliveries", "events handed to subscribers", value=hub.delivered)
        yield CounterMetricFamily(
            "gateway_log_reads",
            "position ranges read from the log (large statements, gaps, catch-ups)",
            value=pipeline.log_reads,
        )
        yield CounterMetricFamily(
            "gateway_not_recovered",
            "subscriptions told to reload (recovered=false)",
            value=pipeline.not_recovered,
        )
        yield CounterMetricFamily(
            "gateway_deliveries_dropped", "frames not sent: client closing or too slow", value=reg.dropped
        )
        yield CounterMetricFamily(
            "gateway_clients_evicted_slow", "slow consumers cut off", value=reg.evicted_slow
        )
        closed = CounterMetricFamily("gateway_closes", "connections closed by the gateway", labels=["code"])
        for code, n in sorted(reg.closed_by_code.items()):
            closed.add_metric([str(code)], n)
        yield closed
        for name, doc, hist in (
            ("gateway_resolve_batch_size", "doorbells and joins processed together", pipeline.batch_size),
            (
                "gateway_resolve_batch_seconds",
                "time to resolve, encode and fan out one batch",
                pipeline.batch_seconds,
            ),
            (
                "gateway_commit_to_send_seconds",
                "from the start of the newest transaction a doorbell names (its commit, for short "
                "transactions; earlier for long ones) to the frame handed to sockets",
                pipeline.commit_to_send,
            ),
        ):
            yield HistogramMetricFamily(name, doc, buckets=hist.cumulative(), sum_value=hist.sum)
        yield GaugeMetricFamily(
            "gateway_listener_connected", "1 if LISTEN is up", value=int(listener.connected)
        )
        yield CounterMetricFamily(
            "gateway_listener_reconnects", "listener reconnections", value=listener.reconnects
        )
        since = time.monotonic() - listener.last_notification if listener.last_notification else -1
        yield GaugeMetricFamily(
            "gateway_seconds_since_last_notification", "-1 before the first notification", value=since
        )
        relay = state.relay
        if relay is not None:
            yield GaugeMetricFamily(
                "gateway_relay_leader",
                "1 if this replica is the relay (rings the doorbells)",
                value=int(relay.leader),
            )
            yield GaugeMetricFamily(
                "gateway_relay_busy",
                "1 while the relay polls on its own (writers send no NOTIFY)",
                value=int(relay.awake),
            )
            yield CounterMetricFamily("gateway_relay_polls", "log reads by the relay", value=relay.polls)
            yield CounterMetricFamily("gateway_relay_events_rung", "events the relay rang", value=relay.rung)
            yield CounterMetricFamily(
                "gateway_relay_notifications", "NOTIFYs the relay sent", value=relay.notifications
            )
        yield GaugeMetricFamily(
            "gateway_notification_queue_usage", "pg_notification_queue_usage() (0..1)", value=self.queue_usage
        )
        yield GaugeMetricFamily("gateway_draining", "1 while draining", value=int(state.draining))
        presence = ctx.presence
        if presence is not None:
            yield CounterMetricFamily(
                "gateway_presence_heartbeats", "presence heartbeats renewed", value=presence.heartbeats
            )
            yield CounterMetricFamily(
                "gateway_presence_heartbeat_failures",
                "presence heartbeats that failed or missed their deadline",
                value=presence.heartbeat_failures,
            )
        yield _db_sessions(state.pool, listener, relay, presence)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        yield CounterMetricFamily(
            "gateway_process_cpu_seconds", "user+system CPU", value=usage.ru_utime + usage.ru_stime
        )
        yield GaugeMetricFamily(
            "gateway_process_max_rss_bytes", "peak resident memory", value=usage.ru_maxrss * 1024
        )
        yield GaugeMetricFamily("gateway_process_rss_bytes", "resident memory", value=_rss_bytes())


def _db_sessions(
    pool: asyncpg.Pool | None, listener: Listener, relay: Relay | None, presence: Presence | None
) -> Metric:
    """The PostgreSQL sessions this process holds, by use: what counts against
    max_connections (docs/deploy.md: workers * (3 + GATEWAY_POOL_SIZE))."""
    sessions = GaugeMetricFamily(
        "gateway_db_sessions", "PostgreSQL sessions this process holds, by use", labels=["use"]
    )
    sessions.add_metric(["pool"], pool.get_size() if pool is not None else 0)
    sessions.add_metric(["listener"], int(listener.connected))
    sessions.add_metric(["relay"], int(relay is not None and relay.backend_pid is not None))
    if presence is not None:
        sessions.add_metric(["heartbeat"], int(presence.heartbeat.backend_pid is not None))
    return sessions


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


COLLECTOR = web.AppKey("collector", GatewayCollector)
REGISTRY = web.AppKey("registry", CollectorRegistry)


def install(app: web.Application) -> None:
    """Register the collector and the /metrics route (before the app starts), and with
    GATEWAY_METRICS_PORT the worker's own metrics port."""
    collector = GatewayCollector(app)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    app[COLLECTOR], app[REGISTRY] = collector, registry
    app.router.add_get("/metrics", metrics_handler)
    app.cleanup_ctx.append(_own_port)


def worker_id() -> int:
    """This process's worker number under `gateway serve --workers N` (0 when alone)."""
    return int(os.environ.get("GATEWAY_WORKER_ID") or 0)


async def _own_port(app: web.Application) -> AsyncIterator[None]:
    """/metrics of this worker alone on GATEWAY_METRICS_PORT + its worker number.

    Workers share the main port (SO_REUSEPORT), so a scrape there reaches whichever worker the
    kernel picks. On a port of its own each worker is a scrape target (an `instance`) of its
    own, and nothing changes on the hot path: the page is still built at scrape time.
    """
    from .server import STATE

    s = app[STATE].settings
    if not s.metrics_port:
        yield
        return
    port = s.metrics_port + worker_id()
    own = web.Application()

    async def handler(request: web.Request) -> web.Response:
        return await _page(app)

    own.router.add_get("/metrics", handler)
    runner = web.AppRunner(own, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, s.host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"cannot serve this worker's metrics on {s.host}:{port} (GATEWAY_METRICS_PORT): {exc.strerror}"
        ) from None
    log.info("metrics of worker %d on http://%s:%d/metrics", worker_id(), s.host, port)
    try:
        yield
    finally:
        await runner.cleanup()


async def metrics_handler(request: web.Request) -> web.Response:
    return await _page(request.app)


async def _page(app: web.Application) -> web.Response:
    from .server import STATE

    collector = app[COLLECTOR]
    pool = app[STATE].pool
    if pool is not None:
        try:
            async with asyncio.timeout(1.0):
                collector.queue_usage = float(await pool.fetchval("SELECT pg_notification_queue_usage()"))
        except DB_ERRORS:
            pass
        if collector.queue_usage > QUEUE_WARN:
            log.warning("PostgreSQL notification queue is %.0f%% full", collector.queue_usage * 100)
    body = generate_latest(app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
