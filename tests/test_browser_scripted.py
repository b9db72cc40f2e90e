"""The browser client (gateway/static/gateway.js) and the demo page, in a real Chromium.

The client's reconnect, resume and give-up logic depends on close codes and errors the real
gateway only produces under failure (a deploy, a revoked right, a stream reset). To drive each one
on purpose, these tests run the client against ``ScriptedGateway``: a small aiohttp WebSocket peer
that speaks the wire protocol with the real message types of ``gateway.protocol`` (so a frame the
client gets wrong fails to decode here) and lets a test choose what the server does next. It stands
in for the server, not for the database; the tests against the real gateway and PostgreSQL are
test_browser_e2e.py, test_browser_recovery.py and test_browser_embed.py.

Chromium comes from the system (``/usr/bin/chromium``); Playwright never downloads a browser.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from aiohttp import WSMsgType, web

from gateway import __version__
from gateway import protocol as p

from .browsertest import BROWSER_TESTS, rec, set_visibility, wait_for
from .gwtest import serving
from .polling import eventually

STATIC = Path(__file__).resolve().parent.parent / "gateway" / "static"
EPOCH = "ab12cd34"
WAIT = 10.0  # upper bound for a condition to become true; never a measured duration

pytestmark = BROWSER_TESTS


async def wait_rec(page: Any, expr: str) -> None:
    """Wait until ``expr`` holds on the page (what its harness recorded)."""
    await wait_for(page, expr, timeout_ms=int(WAIT * 1000))


# --- the scripted server ---------------------------------------------------------------


@dataclass
class Conn:
    ws: web.WebSocketResponse
    frames: list[Any] = field(default_factory=list)  # decoded client frames, in order
    topics: set[str] = field(default_factory=set)
    user: str | None = None
    conn_id: str = ""
    tracked: dict[str, dict[str, Any]] = field(default_factory=dict)  # room -> state

    async def send(self, message: p.ServerMessage) -> None:
        await self.ws.send_str(p.encode(message).decode())

    def of(self, kind: type) -> list[Any]:
        return [f for f in self.frames if isinstance(f, kind)]


@dataclass
class ScriptedGateway:
    """A protocol peer. Topics keep an in-memory log; a subscribe with ``since`` is replayed from it."""

    log: dict[str, list[p.Event]] = field(default_factory=dict)
    conns: list[Conn] = field(default_factory=list)
    bad_frames: list[str] = field(default_factory=list)
    forbidden: set[str] = field(default_factory=set)
    unavailable: int = 0  # subscribes still to answer "unavailable" (the database is down)
    recoverable: bool = True  # False: answer every resume with recovered=false (as after a reset)
    expires_in: int | None = None
    presence: dict[str, p.PresenceEntry] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)  # every token received (auth and refresh)
    answer_pings: bool = True
    drop_statuses: int = 0  # status frames answered rate_limited, as a gateway over its frame rate
    # Presence subscribes still to answer recovered=false, each losing the offline change of user
    # `goes_offline` between the snapshot and the ack (as when more changed meanwhile than
    # GATEWAY_REPLAY_MAX_EVENTS).
    presence_not_recovered: int = 0
    goes_offline: str | None = None
    task_loads: int = 0  # GET /demo/tasks served
    next_id: int = 0
    # Room members that are no connection of this server (another replica's), by room:
    # conn -> (user, state); a test adds and removes them, then sends the change itself.
    others: dict[str, dict[str, tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    hold_publishes: bool = False  # True: publishes get no answer (as when the socket then drops)

    def head(self, topic: str) -> int:
        events = self.log.get(topic, [])
        return events[-1].pos if events else 0

    def append(self, topic: str, op: str, key: str, row: dict[str, Any] | None) -> p.Event:
        raw = msgspec.Raw(json.dumps(row).encode()) if row is not None else None
        event = p.Event(topic=topic, epoch=EPOCH, pos=self.head(topic) + 1, op=op, key=key, row=raw)  # type: ignore[arg-type]
        self.log.setdefault(topic, []).append(event)
        return event

    async def publish(self, topic: str, op: str, key: str, row: dict[str, Any] | None) -> p.Event:
        event = self.append(topic, op, key, row)
        for conn in self.live():
            if topic in conn.topics:
                await conn.send(event)
        return event

    def live(self) -> list[Conn]:
        return [c for c in self.conns if not c.ws.closed]

    def members(self, room: str) -> list[p.RoomMember]:
        """A room's presence snapshot, as the real gateway's: per user, each connection's state."""
        conns: dict[str, list[p.RoomConn]] = {}
        for c in self.live():
            if room in c.tracked and c.user is not None:
                state = msgspec.Raw(msgspec.json.encode(c.tracked[room]))
                conns.setdefault(c.user, []).append(p.RoomConn(conn=c.conn_id, state=state))
        for conn_id, (user, state) in self.others.get(room, {}).items():
            conns.setdefault(user, []).append(
                p.RoomConn(conn=conn_id, state=msgspec.Raw(msgspec.json.encode(state)))
            )
        return [p.RoomMember(user=u, conns=cs) for u, cs in sorted(conns.items())]

    async def room_change(self, room: str, change: dict[str, Any]) -> None:
        """One change of a room's presence, to every connection subscribed to it."""
        frame = p.Presence(topic=f"presence:{room}", change=msgspec.Raw(msgspec.json.encode(change)))
        for conn in self.live():
            if f"presence:{room}" in conn.topics:
                await conn.send(frame)

    async def set_presence(self, user: str, status: str) -> None:
        entry = p.PresenceEntry(user=user, status=status, last_seen=time.time())  # type: ignore[arg-type]
        self.presence[user] = entry
        for conn in self.live():
            for topic in conn.topics:
                if topic == "presence:global":
                    # The server passes the database's JSON through untouched (msgspec.Raw).
                    await conn.send(p.Presence(topic=topic, change=msgspec.Raw(msgspec.json.encode(entry))))

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        conn = Conn(ws)
        self.conns.append(conn)
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                self.bad_frames.append(f"non-text frame {msg.type}")
                continue
            try:
                frame = p.decoder.decode(msg.data)
            except msgspec.DecodeError as exc:
                self.bad_frames.append(f"{msg.data}: {exc}")
                continue
            conn.frames.append(frame)
            await self.answer(conn, frame)
        # Closed: it leaves every room it was in.
        for room in list(conn.tracked):
            del conn.tracked[room]
            await self.room_change(room, {"op": "leave", "user": conn.user, "conn": conn.conn_id})
        return ws

    async def answer(self, conn: Conn, frame: p.ClientMessage) -> None:
        match frame:
            case p.Auth(token=token, status=status):
                self.tokens.append(token)
                conn.user = token.split(".")[0]
                self.next_id += 1
                conn.conn_id = f"c{self.next_id}"
                expires = int(time.time()) + self.expires_in if self.expires_in else None
                await conn.send(
                    p.Welcome(
                        user=conn.user,
                        conn=f"c{self.next_id}",
                        version=__version__,
                        expires=expires,
                        expires_in=self.expires_in,
                    )
                )
                await self.set_presence(conn.user, status)
            case p.Refresh(token=token):
                self.tokens.append(token)
                if token.split(".")[0] != conn.user:
                    message = "the new token is for another user; reconnect instead"
                    await conn.send(p.Error(code=p.ErrorCode.TOKEN_USER_CHANGED, message=message))
                    return
                life = self.expires_in or 60
                await conn.send(p.Refreshed(expires=int(time.time()) + life, expires_in=life))
            case p.Ping(id=ping_id):
                if self.answer_pings:
                    await conn.send(p.Pong(id=ping_id))
            case p.SetStatus(status=status) if self.drop_statuses:
                self.drop_statuses -= 1
                message = "too many messages; this one was dropped"
                await conn.send(p.Error(code=p.ErrorCode.RATE_LIMITED, message=message))
            case p.SetStatus(status=status):
                assert conn.user is not None
                await self.set_presence(conn.user, status)
            case p.Publish() if self.hold_publishes:
                pass
            case p.Publish(topic=topic, id=req):
                if topic in self.forbidden:
                    msg = f"user {conn.user} may not publish to {topic}"
                    await conn.send(p.Error(code=p.ErrorCode.FORBIDDEN, message=msg, id=req, topic=topic))
                    return
                await conn.send(p.Published(topic=topic, id=req))
            case p.Track(topic=room, state=state, id=req):
                op = "update" if room in conn.tracked else "join"
                conn.tracked[room] = state
                await conn.send(p.Tracked(topic=room, id=req))
                await self.room_change(
                    room, {"op": op, "user": conn.user, "conn": conn.conn_id, "state": state}
                )
            case p.Untrack(topic=room, id=req):
                if conn.tracked.pop(room, None) is None:
                    msg = f"this connection does not track {room}"
                    await conn.send(p.Error(code=p.ErrorCode.NOT_TRACKED, message=msg, id=req, topic=room))
                    return
                await conn.send(p.Untracked(topic=room, id=req))
                await self.room_change(room, {"op": "leave", "user": conn.user, "conn": conn.conn_id})
            case p.Unsubscribe(topic=topic, id=req):
                conn.topics.discard(topic)
                await conn.send(p.Unsubscribed(topic=topic, id=req))
            case p.Subscribe(topic=topic, id=req, since=since):
                if topic in self.forbidden:
                    msg = f"user {conn.user} may not read {topic}"
                    await conn.send(p.Error(code=p.ErrorCode.FORBIDDEN, message=msg, id=req, topic=topic))
                    return
                if self.unavailable:
                    self.unavailable -= 1
                    msg = "the database is unreachable; subscribe again later"
                    await conn.send(p.Error(code=p.ErrorCode.UNAVAILABLE, message=msg, id=req, topic=topic))
                    return
                conn.topics.add(topic)
                if topic.startswith("presence:") and topic != "presence:global":
                    # A room's presence: its members with their state, then "subscribed".
                    room = topic.removeprefix("presence:")
                    await conn.send(p.Presence(topic=topic, members=self.members(room)))
                    await conn.send(p.Subscribed(topic=topic, epoch=EPOCH, pos=0, id=req))
                    return
                if topic.startswith("presence:"):
                    # As the real gateway does: the snapshot, then "subscribed" once changes flow.
                    await conn.send(p.Presence(topic=topic, snapshot=list(self.presence.values())))
                    recovered = None
                    if self.presence_not_recovered > 0:
                        self.presence_not_recovered -= 1
                        recovered = False
                        if self.goes_offline is not None:  # a snapshot holds no offline user
                            self.presence.pop(self.goes_offline, None)
                    await conn.send(
                        p.Subscribed(topic=topic, epoch=EPOCH, pos=0, id=req, recovered=recovered)
                    )
                    return
                recovered = None
                replay: list[p.Event] = []
                if since is not None:
                    recovered = self.recoverable and since.epoch == EPOCH
                    replay = [e for e in self.log.get(topic, []) if e.pos > since.pos] if recovered else []
                for event in replay:
                    await conn.send(event)
                head = self.head(topic)
                await conn.send(
                    p.Subscribed(
                        topic=topic, epoch=EPOCH, pos=head, id=req, recovered=recovered, replayed=len(replay)
                    )
                )


@dataclass
class Site:
    url: str
    gateway: ScriptedGateway


@pytest_asyncio.fixture(loop_scope="module")
async def site() -> AsyncIterator[Site]:
    """The static files as the real server serves them, the demo endpoints and a scripted /ws."""
    gw = ScriptedGateway()
    tasks: dict[str, dict[str, Any]] = {}

    def static(name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(STATIC / name)

        return handler

    async def blank(request: web.Request) -> web.Response:
        html = '<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>t</title><script src="/client/gateway.js"></script>'
        return web.Response(text=html, content_type="text/html")

    async def token(request: web.Request) -> web.Response:
        user = request.query["user"]
        return web.json_response({"token": f"{user}.{len(gw.tokens)}", "expires": int(time.time()) + 60})

    async def get_tasks(request: web.Request) -> web.Response:
        topic = "board:demo"
        gw.task_loads += 1
        return web.json_response(
            {"rows": list(tasks.values()), "topic": topic, "epoch": EPOCH, "pos": gw.head(topic)}
        )

    async def post_task(request: web.Request) -> web.Response:
        key = str(len(tasks) + 1)
        row = {"id": int(key), "board": "demo", "title": f"Task {key}", "status": "todo", "assignee": None,
               "updated_at": f"2024-01-01T00:00:0{key}Z"}  # fmt: skip
        tasks[key] = row
        await gw.publish("board:demo", "insert", key, row)
        return web.json_response(row, status=201)

    app = web.Application()
    app.router.add_get("/ws", gw.handle)
    app.router.add_get("/client/gateway.js", static("gateway.js"))
    app.router.add_get("/client/gateway.mjs", static("gateway.mjs"))
    app.router.add_get("/client/gateway-rooms.js", static("gateway-rooms.js"))
    app.router.add_get("/demo", static("demo.html"))
    app.router.add_get("/blank", blank)
    app.router.add_get("/demo/token", token)
    app.router.add_get("/demo/tasks", get_tasks)
    app.router.add_post("/demo/tasks", post_task)
    async with serving(app, shutdown_timeout=1) as url:
        yield Site(url, gw)


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Any, site: Site) -> AsyncIterator[Any]:
    """A page in a fresh context; any console error or uncaught exception fails the test."""
    context = await browser.new_context()
    pg = await context.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield pg
    finally:
        await context.close()
    assert not errors, f"browser errors: {errors}"
    assert not site.gateway.bad_frames, f"frames the protocol rejects: {site.gateway.bad_frames}"


# A page-side harness: connect and record every callback in window.rec, for the test to read.
HARNESS = """(opts) => {
  window.rec = { states: [], events: [], errors: [], subscribed: [], notRecovered: [], presence: [] };
  let n = 0;
  window.gw = PgGateway.connect("/ws", {
    token: async () => opts.user + "." + (n++),
    onState: (state, detail) => rec.states.push([state, detail || {}]),
    onError: (err) => rec.errors.push({ code: err.code, message: err.message, closeCode: err.closeCode }),
  });
  window.unsubscribe = gw.subscribe(opts.topic, (e) => rec.events.push([e.pos, e.op, e.key, e.row]), {
    since: opts.since,
    onSubscribed: (info) => rec.subscribed.push(info),
    onNotRecovered: (info) => rec.notRecovered.push(info),
    onError: (err) => rec.errors.push({ code: err.code, message: err.message, topic: err.topic }),
  });
}"""


async def start(
    page: Any, site: Site, topic: str = "board:demo", since: dict[str, Any] | None = None
) -> None:
    await page.goto(site.url + "/blank")
    await page.evaluate(HARNESS, {"user": "alice", "topic": topic, "since": since})
    await wait_rec(page, "rec.subscribed.length > 0 || rec.errors.length > 0")


# --- loading ---------------------------------------------------------------------------


async def test_classic_script_defines_connect(page: Any, site: Site) -> None:
    await page.goto(site.url + "/blank")
    assert await page.evaluate("typeof PgGateway.connect") == "function"
    assert await page.evaluate("PgGateway.RECONNECT_AFTER") == sorted(p.RECONNECT_AFTER)


async def test_module_exports_the_same_client(page: Any, site: Site) -> None:
    await page.goto(site.url + "/blank")
    same = await page.evaluate(
        """async () => {
          const m = await import("/client/gateway.mjs");
          return typeof m.connect === "function" && m.default.Gateway === m.Gateway;
        }"""
    )
    assert same is True


async def test_bad_arguments_are_named(page: Any, site: Site) -> None:
    await page.goto(site.url + "/blank")
    message = await page.evaluate(
        "() => { try { PgGateway.connect('/ws', {}) } catch (e) { return e.message } }"
    )
    assert "options.token" in message
    message = await page.evaluate(
        "() => { try { PgGateway.connect('ftp://x/ws', {token: 't'}) } catch (e) { return e.message } }"
    )
    assert "ftp:" in message


async def test_a_url_object_is_taken_for_the_url(page: Any, site: Site) -> None:
    # connect(url, options) with a URL object was taken for connect(options): "options.token
    # must be a non-empty string", about the options the page had given.
    await page.goto(site.url + "/blank")
    await page.evaluate(
        """() => {
          window.rec = { states: [] };
          const url = new URL("/ws", location.href.replace(/^http/, "ws"));
          window.gw = PgGateway.connect(url, { token: async () => "alice.0", onState: (s) => rec.states.push(s) });
        }"""
    )
    await wait_rec(page, "rec.states.includes('open')")


@pytest.mark.parametrize("url", ["gateway.example.com/ws", "localhost:8080/ws"])
async def test_a_url_without_its_scheme_is_refused_naming_the_fix(page: Any, site: Site, url: str) -> None:
    # Resolved against the page as a relative path, "gateway.example.com/ws" went to
    # wss://<this page's host>/<its path>/gateway.example.com/ws, retried forever.
    await page.goto(site.url + "/blank")
    message = await page.evaluate(
        "(url) => { try { PgGateway.connect(url, {token: 't'}) } catch (e) { return e.message } }", url
    )
    assert message is not None and f'"wss://{url}"' in message, message


# --- subscriptions across reconnects ---------------------------------------------------


async def test_resumes_from_the_last_position_after_a_drop(page: Any, site: Site) -> None:
    gw = site.gateway
    await start(page, site)
    for key in "123":
        await gw.publish("board:demo", "insert", key, {"id": int(key)})
    await wait_rec(page, "rec.events.length === 3")

    # Written while the client is away: it must get them by replay, once each.
    await gw.conns[0].ws.close(code=p.CloseCode.GOING_AWAY)
    gw.append("board:demo", "update", "1", {"id": 1, "v": 2})
    gw.append("board:demo", "delete", "2", None)
    await wait_rec(page, "rec.subscribed.length === 2")

    resume = gw.conns[1].of(p.Subscribe)[0]
    assert resume.since == p.Since(pos=3, epoch=EPOCH)
    assert [e[:3] for e in await rec(page, "events")] == [
        [1, "insert", "1"],
        [2, "insert", "2"],
        [3, "insert", "3"],
        [4, "update", "1"],
        [5, "delete", "2"],
    ]
    assert (await rec(page, "subscribed"))[1]["recovered"] is True
    assert await rec(page, "notRecovered") == []
    states = [s for s, _ in await rec(page, "states")]
    assert states == ["connecting", "open", "reconnecting", "connecting", "open"]


async def test_duplicates_are_dropped(page: Any, site: Site) -> None:
    gw = site.gateway
    await start(page, site)
    event = await gw.publish("board:demo", "insert", "1", {"id": 1})
    await gw.conns[0].send(event)  # the same position again
    await gw.publish("board:demo", "insert", "2", {"id": 2})
    await wait_rec(page, "rec.events.length >= 2")
    assert [e[0] for e in await rec(page, "events")] == [1, 2]


async def test_not_recovered_is_reported(page: Any, site: Site) -> None:
    gw = site.gateway
    gw.recoverable = False
    await start(page, site, since={"pos": 0, "epoch": "old-epoch"})
    subscribed = (await rec(page, "subscribed"))[0]
    assert subscribed["recovered"] is False
    assert await rec(page, "notRecovered") == [subscribed]


async def test_forbidden_subscribe_is_reported_and_not_retried(page: Any, site: Site) -> None:
    gw = site.gateway
    gw.forbidden.add("room:9")
    await start(page, site, topic="room:9")
    errors = await rec(page, "errors")
    assert [(e["code"], e["topic"]) for e in errors] == [("forbidden", "room:9")]

    await gw.conns[0].ws.close(code=p.CloseCode.SERVICE_RESTART)
    await eventually(lambda: len(gw.live()) == 1 and gw.live()[0].user is not None, WAIT, "the reconnect")
    await wait_rec(page, "rec.states.filter(([s]) => s === 'open').length === 2")
    assert gw.conns[1].of(p.Subscribe) == []


async def test_a_subscription_the_server_removed_is_reported_and_not_resubscribed(
    page: Any, site: Site
) -> None:
    # POST /v1/disconnect with a topic (docs/http-api.md): an error without id drops the subscription.
    gw = site.gateway
    await start(page, site)
    await gw.conns[0].send(p.Error(code=p.ErrorCode.REMOVED, message="removed", topic="board:demo"))
    await wait_rec(page, "rec.errors.length > 0")
    errors = await rec(page, "errors")
    assert [(e["code"], e["topic"]) for e in errors] == [("removed", "board:demo")]

    await gw.conns[0].ws.close(code=p.CloseCode.SERVICE_RESTART)
    await eventually(lambda: len(gw.live()) == 1 and gw.live()[0].user is not None, WAIT, "the reconnect")
    await wait_rec(page, "rec.states.filter(([s]) => s === 'open').length === 2")
    assert gw.conns[1].of(p.Subscribe) == []


@pytest.mark.parametrize(
    "code", [p.CloseCode.UNAUTHORIZED, p.CloseCode.MESSAGE_TOO_BIG, p.CloseCode.DISCONNECTED]
)
async def test_close_codes_that_retrying_cannot_fix_end_the_client(page: Any, site: Site, code: int) -> None:
    gw = site.gateway
    await start(page, site)
    await gw.conns[0].ws.close(code=code, message=b"go away")
    await wait_rec(page, "rec.states.some(([s]) => s === 'closed')")
    states = await rec(page, "states")
    assert [s for s, _ in states] == ["connecting", "open", "closed"]
    assert states[-1][1] == {"code": code, "reason": "go away"}
    closed = [e for e in await rec(page, "errors") if e["code"] == "closed"]
    assert closed and closed[0]["closeCode"] == code
    assert len(gw.conns) == 1


@pytest.mark.parametrize("code", sorted(p.RECONNECT_AFTER))
async def test_reconnects_after_the_codes_protocol_py_names(page: Any, site: Site, code: int) -> None:
    gw = site.gateway
    await start(page, site)
    await gw.conns[0].ws.close(code=code)
    await wait_rec(page, "rec.subscribed.length === 2")
    assert [s for s, _ in await rec(page, "states")][-3:] == ["reconnecting", "connecting", "open"]
    assert len(gw.conns) == 2
    assert gw.tokens == ["alice.0", "alice.1"]  # a fresh token for every connect


# --- token, status, presence, ping ---------------------------------------------------------


async def test_token_is_refreshed_in_band_before_it_expires(page: Any, site: Site) -> None:
    gw = site.gateway
    gw.expires_in = 60
    await page.clock.install()
    await start(page, site)
    await page.clock.run_for(31_000)  # past "30 s before expiry", before it expires
    await eventually(lambda: len(gw.conns[0].of(p.Refresh)) == 1, WAIT, "a refresh frame")
    assert gw.conns[0].of(p.Refresh)[0].token == "alice.1"
    assert len(gw.conns) == 1


async def test_a_clock_an_hour_ahead_does_not_refresh_in_a_loop(page: Any, site: Site) -> None:
    """By this page's clock the token has long expired: counting from its own clock, the client
    refreshed every second (each refresh as "expired" as the last). It counts from expires_in."""
    gw = site.gateway
    gw.expires_in = 60
    await page.clock.install(time=(time.time() + 3600) * 1000)
    await start(page, site)
    await page.clock.run_for(10_000)
    assert gw.conns[0].of(p.Refresh) == []
    await page.clock.run_for(25_000)  # half the token's life, by the gateway's count
    await eventually(lambda: len(gw.conns[0].of(p.Refresh)) == 1, WAIT, "a refresh frame")
    await page.clock.run_for(5_000)
    assert len(gw.conns[0].of(p.Refresh)) == 1
    assert len(gw.conns) == 1


async def test_a_clock_set_back_does_not_hold_back_a_new_subscription(page: Any, site: Site) -> None:
    # The subscribe pacing counted by the wall clock: set back an hour (a clock that ran ahead,
    # corrected while the page is open), the next subscribe waited an hour before going out.
    gw = site.gateway
    await page.clock.install()
    await start(page, site)
    await page.clock.set_system_time(time.time() - 3600)  # seconds, in Playwright's Python API
    await page.evaluate(
        "() => { gw.subscribe('room:2', () => {}, { onSubscribed: (i) => rec.subscribed.push(i) }); }"
    )
    await page.clock.run_for(100)
    await wait_rec(page, "rec.subscribed.length === 2")
    assert [f.topic for f in gw.conns[0].of(p.Subscribe)] == ["board:demo", "room:2"]


async def test_a_refresh_for_another_user_reconnects_as_that_user(page: Any, site: Site) -> None:
    """The application's token function now answers for another user (it switched accounts):
    the gateway refuses that refresh with token_user_changed, "reconnect with the new token"
    (docs/protocol.md). Staying on would keep the old user's subscriptions streaming to the
    page until the old token expires."""
    gw = site.gateway
    gw.expires_in = 60
    await page.clock.install()
    await start(page, site)
    assert gw.conns[0].user == "alice"
    # From now on the token function answers for bob.
    await page.evaluate(
        """() => {
          const next = gw.options.token;
          gw.options.token = async () => (await next()).replace(/^alice/, "bob");
        }"""
    )
    await page.clock.run_for(31_000)  # the refresh is due
    await eventually(lambda: len(gw.conns[0].of(p.Refresh)) == 1, WAIT, "a refresh frame")
    await page.clock.run_for(1_000)  # past the first backoff step (at most 0.5 s)
    await eventually(lambda: len(gw.conns) == 2 and gw.conns[1].user == "bob", WAIT, "a connection as bob")
    await eventually(lambda: gw.conns[0].ws.closed, WAIT, "the connection as alice to close")
    assert "token_user_changed" in [e["code"] for e in await rec(page, "errors")]


async def test_pings_keep_the_socket_busy(page: Any, site: Site) -> None:
    gw = site.gateway
    await page.clock.install()
    await start(page, site)
    await page.clock.run_for(26_000)
    await eventually(lambda: len(gw.conns[0].of(p.Ping)) == 1, WAIT, "a ping frame")


async def test_a_socket_that_stops_answering_is_replaced(page: Any, site: Site) -> None:
    gw = site.gateway
    gw.answer_pings = False  # a half-open TCP connection: nothing comes back, nothing closes
    await page.clock.install()
    await start(page, site)
    await page.clock.run_for(26_000)
    await eventually(lambda: len(gw.conns[0].of(p.Ping)) == 1, WAIT, "a ping frame")
    await page.clock.run_for(26_000)  # no pong by the next ping: give up on this socket
    await wait_rec(page, "rec.states.some(([s]) => s === 'reconnecting')")
    await page.clock.run_for(1_000)  # past the first backoff step (at most 0.5 s)
    await wait_rec(page, "rec.subscribed.length === 2")
    assert len(gw.conns) == 2


async def test_hidden_page_is_away_and_visible_page_online(page: Any, site: Site) -> None:
    gw = site.gateway
    await start(page, site)
    for state in ["hidden", "visible"]:
        await set_visibility(page, state)
    await eventually(lambda: len(gw.conns[0].of(p.SetStatus)) == 2, WAIT, "two status frames")
    assert [f.status for f in gw.conns[0].of(p.SetStatus)] == ["away", "online"]


async def test_a_hidden_page_reconnects_away(page: Any, site: Site) -> None:
    # Its new connection must not start online: its user would be published online, then away.
    gw = site.gateway
    await start(page, site)
    await set_visibility(page, "hidden")
    await eventually(lambda: len(gw.conns[0].of(p.SetStatus)) == 1, WAIT, "a status frame")
    await gw.conns[0].ws.close(code=1012)  # a deploy moves it
    await wait_rec(page, "rec.subscribed.length === 2")
    assert [f.status for f in gw.conns[1].of(p.Auth)] == ["away"]
    assert gw.conns[1].of(p.SetStatus) == []
    assert gw.presence["alice"].status == "away"

    await set_visibility(page, "visible")
    await eventually(lambda: len(gw.conns[1].of(p.SetStatus)) == 1, WAIT, "a status frame")
    assert gw.conns[1].of(p.SetStatus)[0].status == "online"


async def test_a_status_dropped_for_the_frame_rate_is_sent_again_and_the_refresh_keeps_its_time(
    page: Any, site: Site
) -> None:
    # A dropped status left the user shown online while away, and the id-less error, taken
    # for a refused refresh, moved the refresh to 5 s away.
    gw = site.gateway
    gw.expires_in = 60
    gw.drop_statuses = 1
    await page.clock.install()
    await start(page, site)
    await set_visibility(page, "hidden")
    await eventually(lambda: len(gw.conns[0].of(p.SetStatus)) == 1, WAIT, "a status frame")
    await page.clock.run_for(1_500)
    await eventually(lambda: len(gw.conns[0].of(p.SetStatus)) == 2, WAIT, "the status again")
    assert gw.presence["alice"].status == "away"
    await page.clock.run_for(10_000)
    assert gw.conns[0].of(p.Refresh) == [], "the refresh is due 30 s after welcome, not 5 s after the error"
    await page.clock.run_for(25_000)
    await eventually(lambda: len(gw.conns[0].of(p.Refresh)) == 1, WAIT, "a refresh frame")


async def test_a_subscribe_answered_unavailable_is_retried_after_a_second_and_some_jitter(
    page: Any, site: Site
) -> None:
    # Clamped to exactly one second, the retries of every client the gateway turned away at
    # the same moment came back together.
    gw = site.gateway
    gw.unavailable = 1
    await page.clock.install()
    await page.add_init_script("Math.random = () => 0.5")
    await page.goto(site.url + "/blank")
    await page.evaluate(HARNESS, {"user": "alice", "topic": "board:demo", "since": None})
    await wait_rec(page, "rec.errors.length === 1")
    assert (await rec(page, "errors"))[0]["code"] == "unavailable"
    await page.clock.run_for(1_100)
    assert len(gw.conns[0].of(p.Subscribe)) == 1, "retried before its jitter"
    await page.clock.run_for(400)  # 1 s + 0.5 x 1 s
    await eventually(lambda: len(gw.conns[0].of(p.Subscribe)) == 2, WAIT, "the retry")
    await wait_rec(page, "rec.subscribed.length === 1")


async def test_presence_keeps_a_map_of_users(page: Any, site: Site) -> None:
    gw = site.gateway
    await gw.set_presence("bob", "online")
    await start(page, site)
    await page.evaluate(
        """() => {
          window.stopPresence = gw.presence("presence:global", {
            onSnapshot: (list) => rec.presence.push(["snapshot", list.map((e) => e.user).sort()]),
            onChange: (e) => rec.presence.push(["change", e.user, e.status]),
          });
        }"""
    )
    await wait_rec(page, "rec.presence.length === 1")
    await gw.set_presence("bob", "away")
    await gw.set_presence("carol", "online")
    await gw.set_presence("bob", "offline")
    await wait_rec(page, "rec.presence.length === 4")
    assert await rec(page, "presence") == [
        ["snapshot", ["alice", "bob"]],
        ["change", "bob", "away"],
        ["change", "carol", "online"],
        ["change", "bob", "offline"],
    ]
    assert await page.evaluate("[...stopPresence.users.keys()].sort()") == ["alice", "carol"]


async def test_presence_not_recovered_takes_a_fresh_snapshot(page: Any, site: Site) -> None:
    # recovered=false on a presence topic: changes after the snapshot were lost, and the map
    # is wrong until a new snapshot (docs/presence.md: subscribe again). Kept, bob is a ghost.
    gw = site.gateway
    await gw.set_presence("bob", "online")
    gw.presence_not_recovered = 1
    gw.goes_offline = "bob"
    await start(page, site)
    await page.evaluate(
        """() => {
          window.stopPresence = gw.presence("presence:global", {
            onSnapshot: (list) => rec.presence.push(["snapshot", list.map((e) => e.user).sort()]),
          });
        }"""
    )
    await wait_rec(page, "rec.presence.length === 2")
    assert await rec(page, "presence") == [["snapshot", ["alice", "bob"]], ["snapshot", ["alice"]]]
    assert await page.evaluate("[...stopPresence.users.keys()].sort()") == ["alice"]
    assert [f.topic for f in gw.conns[0].of(p.Unsubscribe)] == ["presence:global"]

    # The same when a live stream says so (a gap it could not fill): carol's online was lost.
    entry = p.PresenceEntry(user="carol", status="online", last_seen=time.time())  # type: ignore[arg-type]
    gw.presence["carol"] = entry
    await gw.conns[0].send(p.Subscribed(topic="presence:global", epoch=EPOCH, pos=0, recovered=False))
    await wait_rec(page, "rec.presence.length === 3")
    assert await page.evaluate("[...stopPresence.users.keys()].sort()") == ["alice", "carol"]


# --- rooms (gateway-rooms.js) -----------------------------------------------------------

ROOM_HARNESS = """async () => {
  await new Promise((ok) => {
    const s = document.createElement("script");
    s.src = "/client/gateway-rooms.js";
    s.onload = ok;
    document.head.append(s);
  });
  Object.assign(rec, { syncs: [], joins: [], leaves: [], updates: [] });
  window.room = gw.room("room:1");
  room.onSync((members) => rec.syncs.push(members));
  room.onJoin((e) => rec.joins.push([e.user, e.conn, e.state]));
  room.onLeave((e) => rec.leaves.push([e.user, e.conn]));
  room.onUpdate((e, before) => rec.updates.push([e.user, e.state, before.state]));
  return room.track({ color: "teal" }).then((f) => f.type);
}"""


async def test_a_room_s_members_follow_its_presence_and_a_reconnect_tracks_again(
    page: Any, site: Site
) -> None:
    gw = site.gateway
    await start(page, site)
    assert await page.evaluate(ROOM_HARNESS) == "tracked"
    me = gw.conns[0].conn_id
    await wait_rec(page, "rec.syncs.length > 0 && rec.syncs.at(-1).length === 1")
    assert await page.evaluate("rec.joins") == [["alice", me, {"color": "teal"}]]

    # Another replica's member joins, then updates its state.
    gw.others["room:1"] = {"x9": ("bob", {"color": "plum"})}
    await gw.room_change("room:1", {"op": "join", "user": "bob", "conn": "x9", "state": {"color": "plum"}})
    await gw.room_change("room:1", {"op": "update", "user": "bob", "conn": "x9", "state": {"color": "red"}})
    await wait_rec(page, "rec.updates.length === 1")
    assert await page.evaluate("room.members") == [
        {"user": "alice", "conns": [{"conn": me, "state": {"color": "teal"}}]},
        {"user": "bob", "conns": [{"conn": "x9", "state": {"color": "red"}}]},
    ]
    assert await page.evaluate("rec.updates") == [["bob", {"color": "red"}, {"color": "plum"}]]

    # Bob leaves while this page is disconnected: the snapshot after the reconnect lacks him,
    # and the room says he left. The page tracks its state again by itself.
    del gw.others["room:1"]
    await gw.conns[0].ws.close(code=p.CloseCode.SERVICE_RESTART)
    await eventually(lambda: len(gw.live()) == 1 and gw.live()[0].tracked, WAIT, "the page to track again")
    again = gw.live()[0]
    assert again.tracked == {"room:1": {"color": "teal"}}
    assert [f.topic for f in again.of(p.Subscribe)] == ["board:demo", "room:1", "presence:room:1"]
    await wait_rec(page, f"room.conns.has({again.conn_id!r}) && room.conns.size === 1")
    leaves = await page.evaluate("rec.leaves")
    assert ["bob", "x9"] in leaves and ["alice", me] in leaves

    # untrack, then leave: the gateway is told, and the room's subscriptions end.
    assert await page.evaluate("room.untrack().then((f) => f.type)") == "untracked"
    assert again.tracked == {}
    await page.evaluate("room.leave()")
    await eventually(lambda: again.topics == {"board:demo"}, WAIT, "the room's subscriptions to end")
    # A request the gateway refuses rejects with its code.
    untrack = "gw._request({ type: 'untrack', topic: 'room:2' }).catch((e) => e.code)"
    assert await page.evaluate(untrack) == "not_tracked"


# --- publish ---------------------------------------------------------------------------


async def test_publish_resolves_with_the_ack_and_rejects_with_the_error_code(page: Any, site: Site) -> None:
    gw = site.gateway
    await start(page, site)
    await page.evaluate(
        # (not returning the unsubscribe function: page.evaluate would call it)
        "() => { rec.messages = []; gw.subscribe('room:3', () => {}, { onMessage: (m) => rec.messages.push(m) }); }"
    )
    await eventually(lambda: "room:3" in gw.conns[0].topics, WAIT, "the room:3 subscription")
    ack = await page.evaluate("gw.publish('room:3', {text: 'hi'}, {echo: false})")
    assert ack == {"type": "published", "topic": "room:3", "id": ack["id"]}
    [frame] = gw.conns[0].of(p.Publish)
    assert (frame.topic, msgspec.json.decode(frame.data), frame.durable, frame.echo) == (
        "room:3",
        {"text": "hi"},
        False,
        False,
    )

    # An ephemeral message on a subscribed topic goes to the subscription's onMessage.
    await gw.conns[0].send(p.Message(topic="room:3", from_="bob", conn="c9", data=msgspec.Raw(b'{"x":1}')))
    await wait_rec(page, "rec.messages.length === 1")
    assert await page.evaluate("rec.messages[0]") == {
        "type": "message", "topic": "room:3", "from": "bob", "conn": "c9", "data": {"x": 1},
    }  # fmt: skip

    # A refusal rejects the promise with the error frame's code; nothing else is affected.
    gw.forbidden.add("room:4")
    refused = await page.evaluate("gw.publish('room:4', 1).catch((e) => [e.code, e.id, e.topic])")
    assert refused[0] == "forbidden" and refused[2] == "room:4"
    assert await page.evaluate("gw.state") == "open"

    # Unanswered when the socket drops: rejected, "disconnected" (a durable one may have been
    # stored: the application decides). While down: refused at once, nothing queued.
    gw.hold_publishes = True
    # (a function returning nothing: page.evaluate would wait for the promise)
    await page.evaluate(
        "() => { window.pending = gw.publish('room:3', 2, {durable: true}).catch((e) => e.code); }"
    )
    await eventually(lambda: len(gw.conns[0].of(p.Publish)) == 3, WAIT, "the held publish")
    await gw.conns[0].ws.close(code=p.CloseCode.SERVICE_RESTART)
    assert await page.evaluate("pending") == "disconnected"
    if await page.evaluate("gw.state") != "open":
        assert await page.evaluate("gw.publish('room:3', 3).catch((e) => e.code)") == "disconnected"
    gw.hold_publishes = False
    await wait_rec(page, "gw.state === 'open'")
    assert (await page.evaluate("gw.publish('room:3', 4)"))["type"] == "published"


# --- the demo page ---------------------------------------------------------------------


async def test_demo_page_shows_rows_and_presence_live(page: Any, site: Site, tmp_path: Path) -> None:
    await page.goto(site.url + "/demo")
    await page.wait_for_selector("#badge.open", timeout=WAIT * 1000)
    name = await page.input_value("#name")
    assert await page.text_content("#badge") == f"live as {name}"
    await page.wait_for_selector(f"#users li:has-text('{name}')", timeout=WAIT * 1000)

    await page.click("#add")
    card = await page.wait_for_selector(".column[data-status=todo] .card[data-key='1']", timeout=WAIT * 1000)
    assert card is not None
    assert "Task 1" in (await card.text_content() or "")

    # A change committed elsewhere moves the card, with its flash.
    row = {
        "id": 1,
        "board": "demo",
        "title": "Task 1",
        "status": "done",
        "assignee": "bob",
        "updated_at": "x",
    }
    await site.gateway.publish("board:demo", "update", "1", row)
    card = await page.wait_for_selector(
        ".column[data-status=done] .card.flash[data-key='1']", timeout=WAIT * 1000
    )
    assert card is not None
    await page.screenshot(path=str(tmp_path / "demo.png"))


async def test_demo_page_reloads_the_rows_when_the_stream_cannot_be_recovered(page: Any, site: Site) -> None:
    gw = site.gateway
    await page.goto(site.url + "/demo")
    await page.wait_for_selector("#badge.open", timeout=WAIT * 1000)
    await eventually(lambda: any("board:demo" in c.topics for c in gw.live()), WAIT, "the board subscription")
    assert gw.task_loads == 1

    gw.recoverable = False  # as after the log was trimmed past the page's position
    await gw.conns[0].ws.close(code=p.CloseCode.SERVICE_RESTART)
    await eventually(lambda: gw.task_loads == 2, WAIT, "the page to reload /demo/tasks")
    await page.click("#add")
    await page.wait_for_selector(".card[data-key='1']", timeout=WAIT * 1000)
