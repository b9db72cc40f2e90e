"""``/status``: one HTML page with this replica's state, for the operator looking at one replica.

Off unless ``GATEWAY_STATUS_TOKEN`` is set; then a request must carry that token, as the
password of HTTP basic auth (a browser asks for it; any user name) or as
``Authorization: Bearer <token>``. Never in the URL, where it would end up in access logs and
browser history. A missing or wrong token gets 401 and nothing else.

What the page shows is counts and states only: connections, subscriptions, the relay's role,
the listener, the last doorbell, the notification queue, database sessions, the replicas seen
through their presence heartbeats. Never a topic name or a user id: whoever holds the token
sees the health of the gateway, not who uses it or what they read. The page is self-contained
(no script, no external stylesheet or image) and reloads itself every few seconds.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import html
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from . import metrics
from .listener import Listener
from .pgerrors import DB_ERRORS

log = logging.getLogger("gateway.status")

REFRESH_SECONDS = 5
REALM = 'Basic realm="gateway status", charset="UTF-8"'
# The page needs nothing but its own inline style: a script or a resource it did not expect
# would be refused by the browser.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
# The other replicas, as their heartbeats left them in gateway.replicas (presence), and the
# relay's lease. Names of replicas (host:pid:random) are no user's data.
_REPLICAS = (
    "SELECT replica_id, extract(epoch FROM now() - heartbeat_at)::float8, "
    "extract(epoch FROM now() - started_at)::float8 FROM gateway.replicas ORDER BY started_at"
)
_LEASE = "SELECT holder, extract(epoch FROM lease_until - now())::float8 FROM gateway.relay"


class Source(metrics.Source, Protocol):
    """What the page reads: the server's state (gateway/server.py), as /metrics does."""

    started: float
    open_sockets: int


def install(app: web.Application, state: Source, token: str) -> None:
    """Serve /status when a token is set (before the app starts)."""
    if token:
        app.router.add_get("/status", _handler(state, token.encode()))


def _presented(request: web.Request) -> bytes | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip().encode()
    if scheme.lower() == "basic":
        try:
            _user, _, password = base64.b64decode(value.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return None
        return password
    return None


def _handler(state: Source, token: bytes) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        presented = _presented(request)
        # compare_digest: the time taken does not tell how much of a guess was right.
        if presented is None or not hmac.compare_digest(presented, token):
            return web.Response(
                status=401,
                text="the status page needs GATEWAY_STATUS_TOKEN (as the basic auth password, or a Bearer token)\n",
                headers={"WWW-Authenticate": REALM, **HEADERS},
            )
        body = render(await snapshot(state))
        return web.Response(text=body, content_type="text/html", charset="utf-8", headers=HEADERS)

    return handler


@dataclass
class Replica:
    name: str
    heartbeat_age: float
    uptime: float
    this: bool


@dataclass
class Snapshot:
    worker: int
    uptime: float
    draining: bool
    connections: int
    sockets: int
    subscriptions: int
    topics: int
    listener_connected: bool
    listener_kind: str  # where doorbells come from: "LISTEN", or "NATS" with GATEWAY_BROKER
    listener_reconnects: int
    last_doorbell: float | None  # seconds ago; None: none yet
    relay_role: str
    relay_polls: int
    lease_holder: str | None
    lease_left: float | None
    lease_mine: bool
    queue_usage: float | None  # None: the database did not answer
    db_sessions: dict[str, int]
    presence: bool
    heartbeats: int
    heartbeat_failures: int
    replicas: list[Replica] | None  # None: presence off, or the database did not answer


async def snapshot(state: Source) -> Snapshot:
    ctx, pipeline, listener, relay, pool = state.ctx, state.pipeline, state.listener, state.relay, state.pool
    presence = ctx.presence
    queue: float | None = None
    lease: tuple[str | None, float | None] = (None, None)
    replicas: list[Replica] | None = None
    try:
        async with asyncio.timeout(1.0):
            queue = float(await pool.fetchval("SELECT pg_notification_queue_usage()"))
            row = await pool.fetchrow(_LEASE)
            if row is not None and row[0] is not None:
                lease = (row[0], row[1])
            if presence is not None:
                replicas = [
                    Replica(name, age, up, name == presence.replica_id)
                    for name, age, up in await pool.fetch(_REPLICAS)
                ]
    except DB_ERRORS as exc:
        log.debug("status: the database did not answer: %s: %s", type(exc).__name__, exc)
    if relay.leader:
        role = "leader, polling on its own (busy)" if relay.awake else "leader"
    else:
        role = "follower" if relay.backend_pid is not None else "not connected"
    return Snapshot(
        worker=metrics.worker_id(),
        uptime=time.time() - state.started,
        draining=state.draining,
        connections=len(ctx.registry.sessions),
        sockets=state.open_sockets,
        subscriptions=pipeline.hub.subscription_count(),
        topics=len(pipeline.hub.topics()),
        listener_connected=listener.connected,
        listener_kind="LISTEN" if isinstance(listener, Listener) else "NATS",
        listener_reconnects=listener.reconnects,
        last_doorbell=time.monotonic() - listener.last_notification if listener.last_notification else None,
        relay_role=role,
        relay_polls=relay.polls,
        lease_holder=lease[0],
        lease_left=lease[1],
        lease_mine=lease[0] is not None and lease[0] == relay.replica_id,
        queue_usage=queue,
        db_sessions=metrics.db_sessions(state),
        presence=presence is not None,
        heartbeats=presence.heartbeats if presence is not None else 0,
        heartbeat_failures=presence.heartbeat_failures if presence is not None else 0,
        replicas=replicas,
    )


# --- the page ------------------------------------------------------------------------------


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return f"{_duration(seconds)} ago"


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _state(ok: bool, text: str) -> str:
    return f'<span class="{"ok" if ok else "bad"}">{html.escape(text)}</span>'


def _rows(rows: list[tuple[str, str]]) -> str:
    # Labels are ours; values are escaped where they are built.
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)


def _lease(s: Snapshot) -> str:
    if s.lease_holder is None:
        return _state(False, "held by no replica")
    left = s.lease_left or 0.0
    if left <= 0:
        return _state(False, f"{s.lease_holder}, expired")
    # The relay names itself apart from presence (its own id per process): say which is this one.
    holder = "this replica" if s.lease_mine else f"another replica ({s.lease_holder})"
    return html.escape(f"{holder}, {_duration(left)} left")


def render(s: Snapshot) -> str:
    e = html.escape
    if s.queue_usage is None:
        queue = _state(False, "unknown (the database did not answer)")
    else:
        queue = _state(s.queue_usage < 0.25, f"{s.queue_usage:.1%}")
    replica_rows = [
        ("this replica", f"worker {s.worker}, up {_duration(s.uptime)}"),
        ("accepting clients", _state(not s.draining, "no, draining" if s.draining else "yes")),
        ("connections", f"{s.connections} authenticated, {s.sockets} sockets open"),
        ("subscriptions", f"{s.subscriptions} on {s.topics} topic(s)"),
    ]
    pipeline_rows = [
        (
            "listener",
            _state(s.listener_connected, "connected" if s.listener_connected else "disconnected")
            + f", {s.listener_reconnects} reconnection(s) ({s.listener_kind})",
        ),
        ("last doorbell", e(_ago(s.last_doorbell))),
        ("relay role", _state(s.relay_role != "not connected", s.relay_role) + f", {s.relay_polls} poll(s)"),
        ("relay lease", _lease(s)),
        ("notification queue", queue),
        ("database sessions", e(", ".join(f"{k} {v}" for k, v in s.db_sessions.items()))),
    ]
    if not s.presence:
        presence_rows = [("presence", "off (GATEWAY_PRESENCE=false)")]
        replicas_html = ""
    else:
        presence_rows = [
            (
                "heartbeats",
                f"{s.heartbeats} renewed, "
                + _state(s.heartbeat_failures == 0, f"{s.heartbeat_failures} failed"),
            )
        ]
        if s.replicas is None:
            replicas_html = "<p>The replicas are unknown: the database did not answer.</p>"
        else:
            items = "".join(
                f"<tr><td>{e(r.name)}{' (this one)' if r.this else ''}</td>"
                f"<td>{e(_ago(r.heartbeat_age))}</td><td>{e(_duration(r.uptime))}</td></tr>"
                for r in s.replicas
            )
            replicas_html = (
                f"<h2>Replicas seen through their heartbeats: {len(s.replicas)}</h2>"
                "<table class=list><tr><th>replica</th><th>last heartbeat</th><th>up</th></tr>"
                f"{items}</table>"
            )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gateway status</title>
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 52em; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.1em; margin-top: 1.6em; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .3em .6em; border-bottom: 1px solid #ddd; vertical-align: top; }}
th {{ width: 14em; font-weight: 600; color: #555; }} table.list th {{ width: auto; }}
.ok {{ color: #1a7f37; font-weight: 600; }} .bad {{ color: #c0392b; font-weight: 600; }}
footer {{ margin-top: 2em; color: #777; font-size: .85em; }}
</style></head>
<body>
<h1>pg-ws-gateway status</h1>
<h2>This replica</h2><table>{_rows(replica_rows)}</table>
<h2>Events</h2><table>{_rows(pipeline_rows)}</table>
<h2>Presence</h2><table>{_rows(presence_rows)}</table>
{replicas_html}
<footer>Counts and states only. Reloads every {REFRESH_SECONDS} s. Metrics: /metrics; what to do
when something is red: docs/deploy.md, "Alerts and what to do".</footer>
</body></html>
"""
