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
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Protocol

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .broker import Broker
from .bus import Bus
from .config import Settings
from .errors import ConfigError
from .listener import Listener
from .pgerrors import DB_ERRORS
from .pipeline import Pipeline
from .relay import Relay
from .session import SessionContext

log = logging.getLogger("gateway.metrics")

QUEUE_WARN = 0.5


class Source(Protocol):
    """What the collector reads at scrape time: the server's state (gateway/server.py), whose
    resources exist once the application has started (no scrape comes before)."""

    settings: Settings
    draining: bool
    refused: Counter[str]

    @property
    def pool(self) -> asyncpg.Pool: ...

    @property
    def ctx(self) -> SessionContext: ...

    @property
    def pipeline(self) -> Pipeline: ...

    @property
    def listener(self) -> Listener | Broker: ...

    @property
    def relay(self) -> Relay: ...

    @property
    def bus(self) -> Bus: ...


class GatewayCollector(Collector):
    def __init__(self, state: Source) -> None:
        self._state = state
        self.queue_usage = 0.0
        self.queue_unread = False  # the last read of the queue usage failed (logged once)

    def collect(self) -> Iterator[Metric]:
        state = self._state
        pipeline, listener = state.pipeline, state.listener
        reg = state.ctx.registry
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
            "gateway_notifications_untrusted",
            "doorbells ignored because a session other than the relay's sent them",
            value=pipeline.untrusted,
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
            "gateway_listener_connected",
            "1 if the doorbell source (LISTEN, or the broker with GATEWAY_BROKER) is up",
            value=int(listener.connected),
        )
        if isinstance(listener, Broker):
            yield CounterMetricFamily(
                "gateway_broker_published",
                "doorbells this process's relay published",
                value=listener.published,
            )
            yield CounterMetricFamily(
                "gateway_broker_publish_errors",
                "polls whose doorbells could not all be published (readers catch up from the log)",
                value=listener.publish_errors,
            )
            yield CounterMetricFamily(
                "gateway_broker_slow_consumer",
                "doorbells NATS dropped for this process as a slow consumer (each caught up from the log)",
                value=listener.slow_consumer,
            )
        yield CounterMetricFamily(
            "gateway_listener_reconnects", "listener reconnections", value=listener.reconnects
        )
        since = time.monotonic() - listener.last_notification if listener.last_notification else -1
        yield GaugeMetricFamily(
            "gateway_seconds_since_last_notification", "-1 before the first notification", value=since
        )
        relay = state.relay
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
        bus = state.bus
        messages = CounterMetricFamily(
            "gateway_bus_messages",
            "replica bus (ephemeral) messages by what became of them; payloads: NOTIFYs or NATS messages",
            labels=["result"],
        )
        for result, n in (
            ("sent", bus.sent),
            ("received", bus.received),
            ("dropped_queue_usage", bus.dropped_queue),
            ("dropped_full", bus.dropped_full),
            ("dropped_error", bus.dropped_error),
        ):
            messages.add_metric([result], n)
        yield messages
        yield CounterMetricFamily("gateway_bus_payloads", "replica bus payloads sent", value=bus.payloads)
        publisher = state.ctx.publisher
        if publisher is not None:
            published = CounterMetricFamily(
                "gateway_publishes", "client and HTTP API publishes accepted here", labels=["kind"]
            )
            published.add_metric(["ephemeral"], publisher.ephemeral)
            published.add_metric(["durable"], publisher.durable)
            yield published
            refused_publishes = CounterMetricFamily(
                "gateway_publishes_refused",
                "publishes refused by the limits or the database",
                labels=["code"],
            )
            for error, n in sorted(publisher.refused.items()):
                refused_publishes.add_metric([error], n)
            yield refused_publishes
            yield CounterMetricFamily(
                "gateway_message_deliveries",
                "ephemeral message frames written to local subscribers",
                value=publisher.delivered,
            )
        yield CounterMetricFamily(
            "gateway_bus_untrusted",
            "replica bus NOTIFYs ignored because an unregistered session sent them",
            value=bus.untrusted,
        )
        presence = state.ctx.presence
        if presence is not None:
            yield CounterMetricFamily(
                "gateway_presence_heartbeats", "presence heartbeats renewed", value=presence.heartbeats
            )
            yield CounterMetricFamily(
                "gateway_presence_heartbeat_failures",
                "presence heartbeats that failed or missed their deadline",
                value=presence.heartbeat_failures,
            )
            rooms = presence.rooms
            yield GaugeMetricFamily(
                "gateway_presence_rooms_tracked",
                "rooms tracked (room presence) by this process's connections, summed over connections",
                value=rooms.tracked_count(),
            )
            yield CounterMetricFamily(
                "gateway_presence_room_changes",
                "room presence joins, updates and leaves this process published",
                value=rooms.changes_published,
            )
        sessions = GaugeMetricFamily(
            "gateway_db_sessions", "PostgreSQL sessions this process holds, by use", labels=["use"]
        )
        for use, n in db_sessions(state).items():
            sessions.add_metric([use], n)
        yield sessions
        usage = resource.getrusage(resource.RUSAGE_SELF)
        yield CounterMetricFamily(
            "gateway_process_cpu_seconds", "user+system CPU", value=usage.ru_utime + usage.ru_stime
        )
        yield GaugeMetricFamily(
            "gateway_process_max_rss_bytes", "peak resident memory", value=usage.ru_maxrss * 1024
        )
        yield GaugeMetricFamily("gateway_process_rss_bytes", "resident memory", value=_rss_bytes())


def db_sessions(state: Source) -> dict[str, int]:
    """The PostgreSQL sessions this process holds, by use: what counts against
    max_connections (docs/deploy.md, "Database sessions per deployment shape")."""
    sessions = {
        "pool": state.pool.get_size(),
        # With GATEWAY_BROKER the doorbells come from NATS: no LISTEN session.
        "listener": int(isinstance(state.listener, Listener) and state.listener.connected),
        "relay": int(state.relay.backend_pid is not None),
        # The replica bus's sender; with GATEWAY_BROKER the bus is on NATS: none.
        "bus": int(state.bus.backend_pid is not None),
    }
    presence = state.ctx.presence
    if presence is not None:
        sessions["heartbeat"] = int(presence.heartbeat.backend_pid is not None)
    return sessions


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


COLLECTOR = web.AppKey("collector", GatewayCollector)
REGISTRY = web.AppKey("registry", CollectorRegistry)
SOURCE = web.AppKey("metrics_source", Source)


def install(app: web.Application, state: Source) -> None:
    """Register the collector of ``state`` and the /metrics route (before the app starts), and
    with GATEWAY_METRICS_PORT the worker's own metrics port."""
    collector = GatewayCollector(state)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    app[COLLECTOR], app[REGISTRY], app[SOURCE] = collector, registry, state
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
    s = app[SOURCE].settings
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
    collector = app[COLLECTOR]
    try:
        async with asyncio.timeout(1.0):
            collector.queue_usage = float(
                await app[SOURCE].pool.fetchval("SELECT pg_notification_queue_usage()")
            )
    except DB_ERRORS as exc:
        # The scrape goes on with the last value read; the failure is logged once until a
        # read succeeds again (a scrape every few seconds would repeat it in every one).
        if not collector.queue_unread:
            collector.queue_unread = True
            log.warning(
                "metrics: cannot read the notification queue usage (%s: %s); showing the last value read",
                type(exc).__name__,
                exc,
            )
    else:
        collector.queue_unread = False
    if collector.queue_usage > QUEUE_WARN:
        log.warning("PostgreSQL notification queue is %.0f%% full", collector.queue_usage * 100)
    body = generate_latest(app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
