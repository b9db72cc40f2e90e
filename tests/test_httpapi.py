"""The HTTP API for servers (gateway/httpapi.py) on real sockets, against a real PostgreSQL.

Who may call it (a server token only, never a browser), every bad input with its error, and
each endpoint seen from WebSocket clients: a publish reaches subscribers, presence returns
the snapshot a subscribe gets, a disconnect closes the user's connections on every replica.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import httpapi
from gateway import protocol as p

from .gwtest import Closed, Gateway, assert_alive, close_code, expect_error, open_raw, running_gateway, token
from .polling import eventually

DOC = Path(__file__).resolve().parent.parent / "docs" / "http-api.md"
API = {"http_api": "true"}
SERVER = token("backend-1", role="server")
MAX_DATA = 4096  # GATEWAY_MAX_PUBLISH_BYTES's default


async def call(
    gw: Gateway,
    method: str,
    path: str,
    body: Any = None,
    *,
    tok: str | None = SERVER,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """One request; (status, JSON body, headers)."""
    h = dict(headers or {})
    if tok is not None:
        h["Authorization"] = f"Bearer {tok}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, gw.base + path, data=data, headers=h) as r,
    ):
        assert r.content_type == "application/json", (r.status, await r.text())
        return r.status, await r.json(), dict(r.headers)


def assert_error(
    answer: tuple[int, dict[str, Any], dict[str, str]], kind: httpapi.ApiErrorKind
) -> dict[str, Any]:
    status, body, _ = answer
    assert (status, body.get("error")) == (kind.status, kind.error), answer
    assert isinstance(body["message"], str) and body["message"].strip()
    return body


# --- who may call it --------------------------------------------------------------------


async def test_off_unless_enabled(dsn: str) -> None:
    async with running_gateway(dsn) as gw, aiohttp.ClientSession() as s:
        async with s.post(gw.base + "/v1/publish", headers={"Authorization": f"Bearer {SERVER}"}) as r:
            assert r.status == 404


async def test_only_a_server_token_without_origin_gets_in(dsn: str) -> None:
    body = {"topic": "room:1", "data": {"n": 1}, "durable": True}
    async with running_gateway(dsn, **API) as gw:
        # no token, a malformed header, a bad signature, an expired token
        b = assert_error(await call(gw, "POST", "/v1/publish", body, tok=None), httpapi.Errors.BAD_TOKEN)
        assert b["reason"] == "missing"
        answer = await call(
            gw, "POST", "/v1/publish", body, tok=None, headers={"Authorization": "Basic eDp5"}
        )
        assert answer[2]["WWW-Authenticate"] == "Bearer"
        assert_error(answer, httpapi.Errors.BAD_TOKEN)
        b = assert_error(
            await call(gw, "POST", "/v1/publish", body, tok=SERVER[:-3] + "AAA"), httpapi.Errors.BAD_TOKEN
        )
        assert b["reason"] == "bad_signature"
        b = assert_error(
            await call(gw, "POST", "/v1/publish", body, tok=token("backend-1", ttl=-120, role="server")),
            httpapi.Errors.BAD_TOKEN,
        )
        assert b["reason"] == "expired"
        # a valid client token, even one granting every topic, is not a server token
        for client in (token("alice", topics=["*:*"]), token("alice", role="authenticated")):
            assert_error(await call(gw, "POST", "/v1/publish", body, tok=client), httpapi.Errors.NOT_SERVER)
        # a browser: refused whatever token it carries, before the token is looked at
        for path, method in (("/v1/publish", "POST"), ("/v1/presence/presence:global", "GET")):
            answer = await call(gw, method, path, body, headers={"Origin": gw.base})
            assert_error(answer, httpapi.Errors.ORIGIN_NOT_ALLOWED)
        status, b, _ = await call(gw, "POST", "/v1/publish", body)
        assert status == 200 and b["ok"] is True, b


async def test_rate_limited(dsn: str) -> None:
    # 0.5 per second: a bucket of one request.
    async with running_gateway(dsn, **API, http_api_rate="0.5") as gw:
        await call(gw, "POST", "/v1/disconnect", {"user": "nobody"})
        answer = await call(gw, "POST", "/v1/disconnect", {"user": "nobody"})
        assert_error(answer, httpapi.Errors.RATE_LIMITED)
        assert answer[2]["Retry-After"] == "1"


# --- bad input --------------------------------------------------------------------------


async def test_every_bad_input_gets_its_error(dsn: str) -> None:
    E = httpapi.Errors
    big = {"topic": "room:1", "data": "x" * MAX_DATA}
    cases: list[tuple[str, str, Any, bytes | None, httpapi.ApiErrorKind, str]] = [
        ("POST", "/v1/publish", None, b"{not json", E.BAD_JSON, "not valid JSON"),
        ("POST", "/v1/publish", None, b"", E.BAD_JSON, "no body"),
        ("POST", "/v1/publish", None, b"[" * 5000 + b"]" * 5000, E.TOO_LARGE, "bytes"),
        ("POST", "/v1/publish", {"data": 1}, None, E.BAD_REQUEST, "topic"),
        ("POST", "/v1/publish", {"topic": "room:1"}, None, E.BAD_REQUEST, "data"),
        (
            "POST",
            "/v1/publish",
            {"topic": "room:1", "data": 1, "durable": "yes"},
            None,
            E.BAD_REQUEST,
            "durable",
        ),
        ("POST", "/v1/publish", {"topic": "room:1", "data": 1, "echo": False}, None, E.BAD_REQUEST, "echo"),
        ("POST", "/v1/publish", {"topic": "room 1", "data": 1}, None, E.BAD_TOPIC, "printable"),
        ("POST", "/v1/publish", {"topic": "room:*", "data": 1}, None, E.BAD_TOPIC, "wildcard"),
        ("POST", "/v1/publish", big, None, E.TOO_LARGE, "at most"),
        ("GET", "/v1/publish", None, None, E.METHOD_NOT_ALLOWED, "POST"),
        ("POST", "/v1/nothing", {}, None, E.NOT_FOUND, "/v1/nothing"),
        ("GET", "/v1/presence/room", None, None, E.BAD_TOPIC, "kind:id"),
        ("GET", "/v1/presence/room:1", None, None, E.BAD_TOPIC, "not a presence topic"),
        ("GET", "/v1/presence/presence:global", None, None, E.PRESENCE_DISABLED, "GATEWAY_PRESENCE"),
        ("POST", "/v1/disconnect", {"topic": "room:1"}, None, E.BAD_REQUEST, "user"),
        ("POST", "/v1/disconnect", {"user": ""}, None, E.BAD_REQUEST, "user"),
        ("POST", "/v1/disconnect", {"user": "a", "code": 1000}, None, E.BAD_REQUEST, "4010"),
        (
            "POST",
            "/v1/disconnect",
            {"user": "a", "topic": "room:1", "code": 4010},
            None,
            E.BAD_REQUEST,
            "topic",
        ),
        ("POST", "/v1/disconnect", {"user": "a", "topic": "x"}, None, E.BAD_TOPIC, "kind:id"),
        ("POST", "/v1/disconnect", {"user": "a", "reason": "é" * 41}, None, E.BAD_REQUEST, "reason"),
    ]
    async with running_gateway(dsn, **API) as gw:
        for method, path, body, raw, kind, words in cases:
            b = assert_error(await call(gw, method, path, body, raw=raw), kind)
            assert words in b["message"], (path, body, b)


def test_the_doc_lists_every_error() -> None:
    doc = DOC.read_text()
    rows = re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", doc, re.M)
    assert sorted((int(s), e) for s, e in rows) == sorted((k.status, k.error) for k in httpapi.ERRORS)
    for endpoint in ("POST /v1/publish", "GET /v1/presence/", "POST /v1/disconnect"):
        assert endpoint in doc


# --- the endpoints, seen from WebSocket clients -----------------------------------------


async def bus_connected(gw: Gateway) -> None:
    """Wait until ``gw`` has its bus sending connection: /readyz does not wait for it, and a
    message sent before it is dropped (gateway/bus.py). The receiving replica needs no wait: it
    holds a message from a sender it does not know yet until it has read the senders again."""
    await eventually(lambda: gw.state.bus.describe()["pid"] is not None, 15, "the bus connection")


async def test_publish_reaches_subscribers_on_every_replica(dsn: str) -> None:
    async with running_gateway(dsn, **API) as gw1, running_gateway(dsn) as gw2:
        await bus_connected(gw1)
        subs = [await gw.connect("alice", topics=["room:*"]) for gw in (gw1, gw2)]
        for c in subs:
            await c.subscribe("room:7")
        # durable: answered with its position once committed, delivered as an event from the caller
        status, body, _ = await call(
            gw1, "POST", "/v1/publish", {"topic": "room:7", "data": {"t": "hi"}, "durable": True}
        )
        assert status == 200 and body == {"ok": True, "epoch": body["epoch"], "pos": 1}, body
        for c in subs:
            (ev,) = await c.events(1)
            assert (ev["op"], ev["pos"], ev["epoch"], ev["data"]) == (
                "message",
                1,
                body["epoch"],
                {"t": "hi"},
            )
            assert ev["from"] == "backend-1"
        # ephemeral (the default): a message frame, with no position and no connection
        status, body, _ = await call(
            gw1, "POST", "/v1/publish", {"topic": "room:7", "data": [1, "two", None]}
        )
        assert (status, body) == (200, {"ok": True})
        for c in subs:
            frame = await c.expect("message")
            assert frame == {
                "type": "message",
                "topic": "room:7",
                "from": "backend-1",
                "data": [1, "two", None],
            }


async def test_publish_refusals_of_the_publisher(dsn: str) -> None:
    E = httpapi.Errors
    async with running_gateway(dsn, **API, publish_topic_rate="1") as gw:
        b = assert_error(
            await call(gw, "POST", "/v1/publish", {"topic": "presence:global", "data": 1}), E.BAD_TOPIC
        )
        assert "presence" in b["message"]
        b = assert_error(
            await call(gw, "POST", "/v1/publish", {"topic": "room:2", "data": "a\u0000b", "durable": True}),
            E.BAD_REQUEST,
        )
        assert "cannot be stored" in b["message"]
        # a topic's rate (1/s, bursts of 2): the third in a row is refused
        for _ in range(2):
            assert (await call(gw, "POST", "/v1/publish", {"topic": "room:1", "data": 1}))[0] == 200
        answer = await call(gw, "POST", "/v1/publish", {"topic": "room:1", "data": 1})
        assert_error(answer, E.RATE_LIMITED)
        assert answer[2]["Retry-After"] == "1"


async def test_presence_returns_the_snapshot(dsn: str) -> None:
    settings = {**API, "presence": "true"}
    async with running_gateway(dsn, **settings) as gw1, running_gateway(dsn, presence="true") as gw2:
        await gw1.connect("alice")
        await gw2.connect("bob")
        watcher = await gw2.connect("carol", topics=["presence:*"])
        answer: Any = None

        async def both() -> bool:
            nonlocal answer
            answer = await call(gw1, "GET", "/v1/presence/presence:global")
            return answer[0] == 200 and {e["user"] for e in answer[1]["snapshot"]} == {
                "alice",
                "bob",
                "carol",
            }

        await eventually(both, 10, lambda: f"alice, bob and carol in the snapshot: {answer}")
        await watcher.send({"type": "subscribe", "topic": "presence:global", "id": 1})
        frame = await watcher.expect("presence")
        # The same frame a subscriber starts with.
        assert answer[1] == frame, (answer[1], frame)
        assert answer[1]["type"] == "presence" and answer[1]["topic"] == "presence:global"
        assert all(e["status"] == "online" for e in answer[1]["snapshot"])


async def test_room_presence_returns_the_members(dsn: str) -> None:
    async with running_gateway(dsn, **API, presence="true") as gw:
        alice = await open_raw(gw)
        welcome = await alice.auth(token("alice", topics=["room:*"]))
        await alice.send({"type": "track", "topic": "room:7", "state": {"color": "teal"}, "id": 1})
        await alice.expect("tracked")
        want = {
            "type": "presence",
            "topic": "presence:room:7",
            "members": [{"user": "alice", "conns": [{"conn": welcome["conn"], "state": {"color": "teal"}}]}],
        }
        answer: Any = None

        async def listed() -> bool:
            nonlocal answer
            answer = await call(gw, "GET", "/v1/presence/presence:room:7")
            return answer[:2] == (200, want)

        await eventually(listed, 10, lambda: f"alice in room 7's presence: {answer}")


async def test_disconnect_closes_the_users_connections_here(dsn: str) -> None:
    async with running_gateway(dsn, **API) as gw:
        alice = [await gw.connect("alice") for _ in range(2)]
        bob = await gw.connect("bob")
        status, body, _ = await call(
            gw, "POST", "/v1/disconnect", {"user": "alice", "reason": "account suspended"}
        )
        assert (status, body) == (200, {"ok": True, "here": 2})
        for c in alice:
            with pytest.raises(Closed) as closed:
                while True:
                    await c.recv()
            assert closed.value.code == p.CloseCode.DISCONNECTED
            assert closed.value.reason == "disconnected by the server: account suspended"
        await assert_alive(bob)
        # 4011: reconnect with a fresh token
        again = await gw.connect("alice")
        await call(gw, "POST", "/v1/disconnect", {"user": "alice", "code": 4011})
        assert await close_code(again) == p.CloseCode.REAUTHENTICATE
        # nobody connected: nothing to do, still fine
        assert (await call(gw, "POST", "/v1/disconnect", {"user": "zed"}))[:2] == (
            200,
            {"ok": True, "here": 0},
        )


async def test_disconnect_from_one_topic_drops_only_that_subscription(dsn: str) -> None:
    async with running_gateway(dsn, **API) as gw:
        alice = await gw.connect("alice", topics=["room:*"])
        await alice.subscribe("room:1")
        await alice.subscribe("room:2")
        status, body, _ = await call(gw, "POST", "/v1/disconnect", {"user": "alice", "topic": "room:1"})
        assert (status, body) == (200, {"ok": True, "here": 1})
        err = await expect_error(alice, p.ErrorCode.REMOVED, topic="room:1")
        assert "id" not in err and "removed you from room:1" in err["message"]
        await call(gw, "POST", "/v1/publish", {"topic": "room:1", "data": 1, "durable": True})
        await call(gw, "POST", "/v1/publish", {"topic": "room:2", "data": 2, "durable": True})
        (ev,) = await alice.events(1)
        assert (ev["topic"], ev["data"]) == ("room:2", 2)
        await assert_alive(alice)
        # not subscribed (any more): nothing dropped
        assert (await call(gw, "POST", "/v1/disconnect", {"user": "alice", "topic": "room:1"}))[1][
            "here"
        ] == 0


async def test_disconnect_reaches_every_replica(dsn: str) -> None:
    # The second replica does not serve the API: it still obeys a disconnect sent over the bus.
    async with running_gateway(dsn, **API) as gw1, running_gateway(dsn) as gw2:
        await bus_connected(gw1)
        here = await gw1.connect("alice")
        there = [await gw2.connect("alice", topics=["room:*"]) for _ in range(2)]
        bob = await gw2.connect("bob", topics=["room:*"])
        await there[0].subscribe("room:1")
        await bob.subscribe("room:1")
        # One topic first: only alice's subscription on the other replica is dropped.
        status, body, _ = await call(gw1, "POST", "/v1/disconnect", {"user": "alice", "topic": "room:1"})
        assert (status, body) == (200, {"ok": True, "here": 0})
        await expect_error(there[0], p.ErrorCode.REMOVED, topic="room:1")
        await assert_alive(bob)
        # Then every connection.
        status, body, _ = await call(gw1, "POST", "/v1/disconnect", {"user": "alice"})
        assert (status, body) == (200, {"ok": True, "here": 1})
        for c in (here, *there):
            assert await close_code(c) == p.CloseCode.DISCONNECTED
        await assert_alive(bob)
        assert gw2.state.ctx.registry.user_count("alice") == 0
        # Each replica counts what it carried out; the one that took the requests counts them.
        assert "gateway_disconnects_total 2.0" in await gw2.metrics()
        assert (
            'gateway_http_api_requests_total{endpoint="/v1/disconnect",status="200"} 2.0'
            in await gw1.metrics()
        )


async def test_a_body_in_several_packets_and_without_a_length(dsn: str) -> None:
    async def chunks() -> Any:
        for part in (b'{"topic": "room:1", ', b'"data": {"n": 1}, ', b'"durable": true}'):
            yield part
            await asyncio.sleep(0.05)

    async def too_much() -> Any:
        yield b'{"topic": "room:1", "data": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    async with running_gateway(dsn, **API) as gw:
        headers = {"Authorization": f"Bearer {SERVER}"}
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.base + "/v1/publish", data=chunks(), headers=headers) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["pos"] == 1
            async with s.post(gw.base + "/v1/publish", data=too_much(), headers=headers) as r:
                assert r.status == 413, await r.text()
