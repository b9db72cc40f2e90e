"""The WebSocket protocol against the real gateway: authentication, per-user scoping, every error.

Each test runs the real aiohttp app on a 127.0.0.1 socket (``running_gateway``) with a fresh
migrated database, and talks to it with ``Client``. Events come from real commits
(``gateway.emit`` or a published table). Every error reply is followed by a ping, to prove the
connection survived it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import aiohttp
import jwt
import pytest

from gateway import protocol as p

from .gwtest import (
    SECRET,
    WAIT,
    Client,
    Closed,
    Gateway,
    assert_alive,
    close_code,
    emit,
    expect_error,
    open_raw,
    running_gateway,
    token,
)
from .pgconn import pg_connect
from .polling import eventually

# --- helpers of this module ----------------------------------------------------------------


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims(user: str = "1", **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": user, "iat": now, "exp": now + 300, **extra}


# --- authentication ---------------------------------------------------------------------------


async def test_first_frame_auth_welcome_names_user_conn_and_expiry(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        c = await open_raw(gw)
        tok = token("alice", ttl=300)
        exp = jwt.decode(tok, options={"verify_signature": False})["exp"]
        welcome = await c.auth(tok)
        assert welcome["user"] == "alice"
        assert isinstance(welcome["conn"], str) and welcome["conn"]
        assert welcome["expires"] == exp
        assert 295 <= welcome["expires_in"] <= 300  # by the gateway's clock: what a client counts from
        other = await open_raw(gw)
        second = await other.auth(token("alice"))
        assert second["conn"] != welcome["conn"]  # ids tell a user's connections apart
        await assert_alive(c)
        await c.close()
        await other.close()


async def test_auth_by_authorization_header(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        c = await open_raw(gw, headers={"Authorization": f"Bearer {token('bob')}"})
        welcome = await c.expect("welcome")
        assert welcome["user"] == "bob"
        # The socket is authenticated: sending auth again is a mistake, not a second login.
        await c.send({"type": "auth", "token": token("bob")})
        await expect_error(c, "already_authenticated")
        await c.subscribe("user:bob")
        await assert_alive(c)
        await c.close()


async def test_auth_by_bearer_subprotocol_selects_gateway_v1(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        tok = token("carol")
        c = await open_raw(gw, protocols=("gateway.v1", f"bearer.{tok}"))
        assert c.ws is not None
        # The server selects the protocol name, never echoes the credential back.
        assert c.ws.protocol == "gateway.v1"
        welcome = await c.expect("welcome")
        assert welcome["user"] == "carol"
        await assert_alive(c)
        await c.close()


BAD_UPGRADE_TOKENS: list[tuple[str, Any]] = [
    ("expired", lambda: token("x", ttl=-120)),
    ("forged", lambda: jwt.encode(claims(), "another-secret-0123456789-abcdefghijk")),
    ("garbage", lambda: "not-a-jwt"),
]


async def test_bad_token_before_upgrade_is_http_401(dsn: str) -> None:
    async with running_gateway(dsn) as gw, aiohttp.ClientSession() as s:
        for what, bad in BAD_UPGRADE_TOKENS:
            tok = bad()
            for kw in (
                {"headers": {"Authorization": f"Bearer {tok}"}},
                {"protocols": ("gateway.v1", f"bearer.{tok}")},
            ):
                with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                    await s.ws_connect(gw.ws_url, **kw)
                assert info.value.status == 401, (what, kw)
        # Nothing was upgraded, nothing registered.
        assert not gw.state.ctx.registry.sessions


async def _raw_upgrade(gw: Gateway, header: bytes) -> bytes:
    """An upgrade request written by hand (a header with raw bytes in it): the status line."""
    host, port = gw.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: " + f"{host}:{port}".encode() + b"\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" + header + b"\r\n\r\n"
        )
        await writer.drain()
        return (await asyncio.wait_for(reader.read(4096), WAIT)).split(b"\r\n", 1)[0]
    finally:
        writer.close()


async def test_a_token_with_a_byte_no_jwt_has_is_http_401(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        bad = token("1").encode() + b"\xff"
        for header in (b"Authorization: Bearer ", b"Sec-WebSocket-Protocol: gateway.v1, bearer."):
            status = await _raw_upgrade(gw, header + bad)
            assert status.startswith(b"HTTP/1.1 401 "), (header, status)


async def test_token_in_url_is_never_accepted(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        tok = token("dave")
        c = Client(f"{gw.ws_url}?token={tok}&access_token={tok}")
        await c.open()
        await c.send({"type": "ping", "id": 1})
        await expect_error(c, "not_authenticated")
        await c.close()


def _alg_none() -> str:
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}."


def _alg_none_upper() -> str:
    return f"{b64({'alg': 'None', 'typ': 'JWT'})}.{b64(claims())}."


BAD_FIRST_FRAME_TOKENS: list[tuple[str, Any]] = [
    ("expired", lambda: token("1", ttl=-120, aud="gateway-tests")),
    ("forged", lambda: jwt.encode(claims(aud="gateway-tests"), "another-secret-0123456789-abcdefghijk")),
    ("alg none", _alg_none),
    ("alg None", _alg_none_upper),
    ("wrong audience", lambda: token("1", aud="someone-else")),
    ("no audience", lambda: token("1")),
    ("no exp", lambda: jwt.encode({"sub": "1", "aud": "gateway-tests"}, SECRET)),
    ("not yet valid", lambda: token("1", aud="gateway-tests", nbf=int(time.time()) + 3600)),
    ("empty", lambda: ""),
    ("garbage", lambda: "a.b.c"),
]


async def test_bad_token_in_first_frame_closes_4001(dsn: str) -> None:
    async with running_gateway(dsn, jwt_audience="gateway-tests") as gw:
        for what, bad in BAD_FIRST_FRAME_TOKENS:
            c = await open_raw(gw)
            await c.send({"type": "auth", "token": bad()})
            assert await close_code(c) == p.CloseCode.UNAUTHORIZED, what
            await c.close()
        # The audience is checked, not merely tolerated: the right one gets in.
        ok = await open_raw(gw)
        await ok.auth(token("1", aud="gateway-tests"))
        await assert_alive(ok)
        await ok.close()


async def test_no_auth_frame_within_deadline_closes_4004(dsn: str) -> None:
    async with running_gateway(dsn, auth_timeout="0.5s") as gw:
        c = await open_raw(gw)
        assert await close_code(c) == p.CloseCode.AUTH_TIMEOUT
        await c.close()


async def test_frames_before_auth_get_not_authenticated_and_the_deadline_still_holds(dsn: str) -> None:
    async with running_gateway(dsn, auth_timeout="0.5s") as gw:
        c = await open_raw(gw)
        for frame in (
            {"type": "ping", "id": 1},
            {"type": "subscribe", "topic": "user:1"},
            {"type": "refresh", "token": token("1")},
        ):
            await c.send(frame)
            await expect_error(c, "not_authenticated")
        # Errors do not extend the deadline: the socket is closed without an auth frame.
        assert await close_code(c) == p.CloseCode.AUTH_TIMEOUT
        await c.close()


async def test_deeply_nested_json_before_auth_is_bad_json(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        c = await open_raw(gw)
        for text in DEEP_JSON:
            await c.send(text)
            await expect_error(c, "bad_json")
        await c.auth(token("1"))
        await assert_alive(c)
        await c.close()


async def test_frames_before_auth_are_rate_limited_too(dsn: str) -> None:
    # An unauthenticated socket may not make the gateway decode an endless stream either.
    async with running_gateway(dsn, message_rate=1, auth_timeout="10s") as gw:
        c = await open_raw(gw)
        for i in range(40):
            await c.send({"type": "ping", "id": i})
        codes: list[str] = []
        with pytest.raises(Closed) as closed:
            while True:
                codes.append((await c.recv(WAIT))["code"])
        assert closed.value.code == p.CloseCode.RATE_LIMITED
        # The burst (2 x the rate) is answered; the rest is dropped, each with rate_limited.
        assert codes.count("not_authenticated") <= 2, codes
        assert set(codes) == {"not_authenticated", "rate_limited"}, codes
        await c.close()


async def test_a_token_let_in_by_the_leeway_is_not_closed_at_once(dsn: str) -> None:
    # GATEWAY_JWT_LEEWAY (30 s by default) accepts a token 20 s past its exp; the connection
    # then has the leeway too, and lives until exp + leeway + GATEWAY_EXPIRY_GRACE.
    async with running_gateway(dsn, expiry_grace="0.5s") as gw:
        c = await open_raw(gw)
        await c.auth(token("1", ttl=-20))
        for _ in range(4):
            await assert_alive(c)
            await asyncio.sleep(0.5)
        await c.close()


async def test_a_frame_that_is_not_utf8_closes_with_a_documented_code(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        c = await gw.connect("1")
        assert c.ws is not None
        await c.ws.send_frame(b'{"type": "ping", "id": 1, "x": "\xff"}', aiohttp.WSMsgType.TEXT)
        code = await close_code(c)
        assert code == p.CloseCode.INVALID_PAYLOAD and code not in p.RECONNECT_AFTER
        await c.close()


async def test_auth_after_a_rejected_frame_still_succeeds(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        c = await open_raw(gw)
        await c.send({"type": "ping", "id": 1})
        await expect_error(c, "not_authenticated")
        await c.send("{not json")
        await expect_error(c, "bad_json")
        await c.auth(token("1"))
        await assert_alive(c)
        await c.close()


# --- token expiry and refresh ---------------------------------------------------------------


async def test_token_expiry_closes_4005_after_grace(dsn: str) -> None:
    async with running_gateway(dsn, expiry_grace="0.5s", jwt_leeway="0") as gw:
        c = await open_raw(gw)
        welcome = await c.auth(token("1", ttl=2))
        assert welcome["expires"] <= time.time() + 2
        await c.subscribe("user:1")
        assert await close_code(c) == p.CloseCode.TOKEN_EXPIRED
        # The connection is gone from the registry (and from the topic's subscribers).
        await eventually(lambda: not gw.state.ctx.registry.sessions, WAIT, "the session to be unregistered")
        assert not gw.state.pipeline.hub.has("user:1")
        await c.close()


async def test_a_token_that_expires_in_ten_years_holds_a_connection_for_the_max_lifetime(dsn: str) -> None:
    """GATEWAY_MAX_TOKEN_LIFETIME caps how long one verification is trusted; a refresh (even with
    the same token) is verified again and starts a new period."""
    async with running_gateway(dsn, expiry_grace="0.2s", jwt_leeway="0", max_token_lifetime="2s") as gw:
        forever = token("1", ttl=10 * 365 * 86400)
        c = await open_raw(gw)
        welcome = await c.auth(forever)
        welcomed_at = time.monotonic()
        assert welcome["expires_in"] <= 2 and welcome["expires"] <= time.time() + 2
        await asyncio.sleep(1.2)
        await c.send({"type": "refresh", "token": forever})
        refreshed = await c.expect("refreshed")
        refreshed_at = time.monotonic()
        # (expires is in whole seconds: 1.2 s later it is at least one more.)
        assert refreshed["expires"] > welcome["expires"] and refreshed["expires_in"] <= 2
        # Past the first period (2 s + 0.2 s grace) the connection still works...
        await asyncio.sleep(max(0.0, welcomed_at + 2.5 - time.monotonic()))
        await assert_alive(c)
        # ...and it is closed at the end of the second one.
        assert await close_code(c) == p.CloseCode.TOKEN_EXPIRED
        assert 2.0 <= time.monotonic() - refreshed_at < WAIT
        await c.close()


async def test_a_token_with_a_user_pattern_is_refused_before_and_after_the_upgrade(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        bad = token("1", topics=["user:*"])
        host, port = gw.base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: " + f"{host}:{port}".encode() + b"\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nConnection: close\r\n"
            b"Authorization: Bearer " + bad.encode() + b"\r\n\r\n"
        )
        answer = await asyncio.wait_for(reader.read(), WAIT)
        writer.close()
        status, _, body = answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 401 "), answer
        refusal = json.loads(body)
        assert refusal["error"] == "bad_token" and "user:*" in refusal["message"], refusal
        c = await open_raw(gw)
        await c.send({"type": "auth", "token": bad})
        with pytest.raises(Closed) as info:
            await c.recv(WAIT)
        assert info.value.code == p.CloseCode.UNAUTHORIZED
        assert info.value.reason.endswith("covers other users' private topics"), "the whole sentence fits"
        await c.close()


async def test_refresh_before_expiry_keeps_the_connection_open(dsn: str) -> None:
    async with running_gateway(dsn, expiry_grace="0.5s", jwt_leeway="0") as gw:
        c = await open_raw(gw)
        old = await c.auth(token("1", ttl=2))
        await c.subscribe("user:1")
        fresh = token("1", ttl=300)
        await c.send({"type": "refresh", "token": fresh})
        refreshed = await c.expect("refreshed")
        assert refreshed["expires"] == jwt.decode(fresh, options={"verify_signature": False})["exp"]
        assert refreshed["expires"] > old["expires"]
        assert 295 <= refreshed["expires_in"] <= 300
        # Well past the old expiry plus grace, the socket and its subscription still work.
        while time.time() < old["expires"] + 1.5:
            await assert_alive(c)
            await asyncio.sleep(0.25)
        db = await pg_connect(dsn)
        pos = await emit(db, "user:1", {"n": 1})
        (event,) = await c.events(1)
        assert event["pos"] == pos and event["data"] == {"n": 1}
        await db.close()
        await c.close()


async def test_refresh_for_another_user_is_refused(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        c = await gw.connect("1")
        await c.send({"type": "refresh", "token": token("2")})
        await expect_error(c, "token_user_changed")
        await assert_alive(c)
        # The identity did not change: user 2's topic is still forbidden.
        await c.send({"type": "subscribe", "topic": "user:2", "id": 5})
        await expect_error(c, "forbidden", id=5, topic="user:2")
        await c.close()


async def test_refresh_with_a_bad_token_is_refused_and_the_old_one_stays(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        c = await gw.connect("1")
        for bad in (token("1", ttl=-120), "garbage", _alg_none()):
            await c.send({"type": "refresh", "token": bad})
            await expect_error(c, "bad_token")
            await assert_alive(c)
        await c.close()


async def test_refresh_that_loses_a_grant_drops_that_subscription(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        c = await open_raw(gw)
        await c.auth(token("1", topics=["room:1", "room:2"]))
        await c.subscribe("room:1")
        await c.subscribe("room:2")
        await c.subscribe("user:1")
        await c.send({"type": "refresh", "token": token("1", topics=["room:2"])})
        await expect_error(c, "forbidden", topic="room:1")
        await c.expect("refreshed")
        db = await pg_connect(dsn)
        await emit(db, "room:1", {"lost": True})
        await emit(db, "room:2", {"kept": True})
        await emit(db, "user:1", {"own": True})
        events = await c.events(2)
        assert [(e["topic"], e["data"]) for e in events] == [
            ("room:2", {"kept": True}),
            ("user:1", {"own": True}),
        ]
        # Dropped means dropped: unsubscribing again says so; subscribing again is forbidden.
        await c.send({"type": "unsubscribe", "topic": "room:1"})
        await expect_error(c, "not_subscribed", topic="room:1")
        await c.send({"type": "subscribe", "topic": "room:1"})
        await expect_error(c, "forbidden", topic="room:1")
        await db.close()
        await c.close()


async def test_an_sql_answer_given_for_one_token_s_claims_is_not_reused_for_other_claims(dsn: str) -> None:
    """The authorization function gets the token's claims; its cached answer must not decide for
    a token whose claims differ: not for the same user's refresh that lost the role (docs: "on
    refresh every subscription is checked again with the new token"), nor for another socket of
    the same user with a lesser token. Within the cache TTL it did, per (user, topic)."""
    db = await pg_connect(dsn)
    await db.execute(
        "CREATE OR REPLACE FUNCTION gateway.authorize(user_id text, topic text, claims jsonb) "
        "RETURNS boolean LANGUAGE sql STABLE AS $$ "
        "SELECT (claims ->> 'role') = 'admin' AND topic LIKE 'audit:%' $$"
    )
    async with running_gateway(dsn, authz_cache_ttl=3600) as gw:
        admin = await open_raw(gw)
        await admin.auth(token("root", role="admin"))
        await admin.subscribe("audit:1")
        # Another tab of the same user, whose token no longer carries the role.
        plain = await open_raw(gw)
        await plain.auth(token("root", role="viewer"))
        await plain.send({"type": "subscribe", "topic": "audit:1", "id": 1})
        await expect_error(plain, "forbidden", id=1, topic="audit:1")
        # The admin's own refresh without the role revokes it.
        await admin.send({"type": "refresh", "token": token("root", role="viewer")})
        await expect_error(admin, "forbidden", topic="audit:1")
        await admin.expect("refreshed")
        # Tokens differing only in their times (every fresh token) still share one answer.
        queries = gw.state.ctx.authorizer.queries
        again = await open_raw(gw)
        await again.auth(token("root", ttl=600, role="admin"))
        await again.subscribe("audit:1")
        assert gw.state.ctx.authorizer.queries == queries
        for c in (admin, plain, again):
            await c.close()
    await db.close()


# --- requests and replies -------------------------------------------------------------------


async def test_ping_pong_echoes_the_id(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        c = await gw.connect("1")
        for req in (0, 1, 2**53, -5):
            await c.send({"type": "ping", "id": req})
            assert await c.recv() == {"type": "pong", "id": req}
        await c.send({"type": "ping"})
        assert await c.recv() == {"type": "pong"}
        await c.close()


async def test_subscribe_unsubscribe_and_no_events_after(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        c = await open_raw(gw)
        await c.auth(token("1", topics=["room:9"]))
        ack = await c.subscribe("room:9")
        assert ack["topic"] == "room:9" and ack["id"] == 1 and ack["epoch"] and ack["pos"] == 0
        await c.subscribe("user:1")
        db = await pg_connect(dsn)
        await emit(db, "room:9", {"n": 1})
        (event,) = await c.events(1)
        assert event["topic"] == "room:9" and event["op"] == "message"
        await c.send({"type": "unsubscribe", "topic": "room:9", "id": 77})
        assert await c.recv() == {"type": "unsubscribed", "topic": "room:9", "id": 77}
        await emit(db, "room:9", {"n": 2})
        marker = await emit(db, "user:1", {"marker": True})
        (event,) = await c.events(1)
        assert (event["topic"], event["pos"]) == ("user:1", marker)
        await c.send({"type": "unsubscribe", "topic": "room:9", "id": 78})
        await expect_error(c, "not_subscribed", id=78, topic="room:9")
        await c.send({"type": "unsubscribe", "topic": "room:never"})
        await expect_error(c, "not_subscribed", topic="room:never")
        await assert_alive(c)
        await db.close()
        await c.close()


async def test_double_subscribe_is_already_subscribed(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        c = await gw.connect("1")
        await c.subscribe("user:1")
        await c.send({"type": "subscribe", "topic": "user:1", "id": 9})
        await expect_error(c, "already_subscribed", id=9, topic="user:1")
        # Still exactly one subscription: one event arrives once.
        db = await pg_connect(dsn)
        await emit(db, "user:1", {"n": 1})
        await emit(db, "user:1", {"n": 2})
        events = await c.events(2)
        assert [e["data"]["n"] for e in events] == [1, 2]
        await assert_alive(c)
        await db.close()
        await c.close()


async def test_presence_topic_on_a_gateway_without_presence_is_presence_disabled(dsn: str) -> None:
    """docs/presence.md: with GATEWAY_PRESENCE=false a presence: topic gets presence_disabled,
    whether or not the user may read it: forbidden would tell the client its token is at fault,
    and the authorization function need not be asked about a topic that cannot be served."""
    async with running_gateway(dsn, presence="false") as gw:
        granted = await open_raw(gw)
        await granted.auth(token("1", topics=["presence:*"]))
        await granted.send({"type": "subscribe", "topic": "presence:global", "id": 1})
        await expect_error(granted, "presence_disabled", id=1, topic="presence:global")
        plain = await gw.connect("2")  # no grant
        await plain.send({"type": "subscribe", "topic": "presence:global", "id": 2})
        await expect_error(plain, "presence_disabled", id=2, topic="presence:global")
        assert gw.state.ctx.authorizer.queries == 0
        await assert_alive(plain)
        await granted.close()
        await plain.close()


async def test_topics_granted_by_own_id_and_token_claims(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        c = await open_raw(gw)
        # Malformed grants (a bare *, a wildcard without kind:, a number) are ignored.
        grants: list[Any] = ["room:7", "doc:*", "*", "bogus*", 42]
        await c.auth(token("7", topics=grants))
        for topic in ("user:7", "room:7", "doc:1", "doc:anything-at-all"):
            await c.subscribe(topic)
        # Not granted: another user's topic, another room, a kind the pattern does not cover,
        # and the pattern's own bare prefix. A bare `*` grant grants nothing.
        for topic in ("user:8", "room:8", "docs:1", "room:70", "secret:1"):
            await c.send({"type": "subscribe", "topic": topic, "id": 3})
            await expect_error(c, "forbidden", id=3, topic=topic)
        await assert_alive(c)
        await c.close()


async def test_sql_authorization_function_grants_topics(dsn: str) -> None:
    db = await pg_connect(dsn)
    await db.execute(
        "CREATE OR REPLACE FUNCTION gateway.authorize(user_id text, topic text, claims jsonb) "
        "RETURNS boolean LANGUAGE sql STABLE AS $$ "
        "SELECT topic = 'team:' || user_id OR (claims ->> 'role') = 'admin' AND topic LIKE 'audit:%' $$"
    )
    async with running_gateway(dsn) as gw:
        alice = await gw.connect("alice")
        await alice.subscribe("team:alice")
        for topic in ("team:bob", "audit:1"):
            await alice.send({"type": "subscribe", "topic": topic})
            await expect_error(alice, "forbidden", topic=topic)
        admin = await open_raw(gw)
        await admin.auth(token("root", role="admin"))
        await admin.subscribe("audit:1")
        pos = await emit(db, "team:alice", {"hello": "team"})
        (event,) = await alice.events(1)
        assert (event["topic"], event["pos"], event["data"]) == ("team:alice", pos, {"hello": "team"})
        await alice.close()
        await admin.close()
    await db.close()


BAD_TOPICS = [
    "",
    "nocolon",
    "room:",
    ":7",
    "room:a b",
    "room:*",
    "room:\u00e9",
    "room:\x00",
    "room:" + "x" * 200,
]


async def test_bad_topic_names(dsn: str) -> None:
    async with running_gateway(dsn, subscribe_rate=1000) as gw:
        c = await gw.connect("1")
        for n, topic in enumerate(BAD_TOPICS):
            await c.send({"type": "subscribe", "topic": topic, "id": n})
            await expect_error(c, "bad_topic", id=n, topic=topic)
            await assert_alive(c)
        await c.close()


# --- malformed frames -----------------------------------------------------------------------

# The last two nest deeper than the decoder recurses, under the default 16 KiB frame limit.
DEEP_JSON = ['{"a":' * 3000, '{"type": "ping", "id": ' + "[" * 5000]
BAD_JSON = [
    "{not json",
    "",
    "{",
    '{"type": "ping"',
    "\u00e9",
    "[1, 2,]",
    "nul",
    '{"type": "ping"} x',
    *DEEP_JSON,
]

# (frame, a word the error message must contain to name the problem)
BAD_MESSAGES: list[tuple[Any, str]] = [
    ({"type": "frobnicate"}, "frobnicate"),
    ({"type": "subscibe", "topic": "user:1"}, "subscribe"),  # a typo: the error lists the types
    ({"kind": "ping"}, "type"),
    ({"type": 7}, "type"),
    ({"type": "subscribe"}, "topic"),
    ({"type": "subscribe", "topic": 7}, "topic"),
    ({"type": "subscribe", "topic": "user:1", "id": "one"}, "id"),
    ({"type": "subscribe", "topic": "user:1", "id": 1.5}, "id"),
    ({"type": "subscribe", "topic": "user:1", "id": True}, "id"),
    ({"type": "subscribe", "topic": "user:1", "since": {"pos": "x", "epoch": "e"}}, "since"),
    ({"type": "subscribe", "topic": "user:1", "since": {"pos": 1}}, "epoch"),
    ({"type": "subscribe", "topic": "user:1", "since": {"pos": 1, "epoch": "e", "x": 1}}, "x"),
    ({"type": "ping", "extra": 1}, "extra"),
    ({"type": "status", "status": "busy"}, "status"),
    ({"type": "refresh"}, "token"),
    ({"type": "auth", "token": None}, "token"),
    ({"type": "unsubscribe", "topic": ["user:1"]}, "topic"),
    ([{"type": "ping"}], "object"),
    ("ping", "object"),
    (None, "object"),
    (42, "object"),
]


async def test_malformed_json_is_bad_json(dsn: str) -> None:
    async with running_gateway(dsn, message_rate=1000) as gw:
        c = await gw.connect("1")
        for text in BAD_JSON:
            await c.send(text)
            frame = await expect_error(c, "bad_json")
            assert "JSON" in frame["message"], frame
            await assert_alive(c)
        await c.close()


async def test_well_formed_json_but_wrong_message_is_bad_message(dsn: str) -> None:
    async with running_gateway(dsn, message_rate=1000) as gw:
        c = await gw.connect("1")
        for frame, names in BAD_MESSAGES:
            await c.send(json.dumps(frame))
            error = await expect_error(c, "bad_message")
            assert names in error["message"], f"{frame}: the message should name {names!r}: {error}"
            await assert_alive(c)
        await c.close()


# (a frame that is not a valid message, the `id` and `topic` its error must echo)
ECHOED: list[tuple[dict[str, Any], dict[str, Any]]] = [
    (
        {"type": "subscribe", "topic": "user:1", "id": 7, "sinse": {"pos": 1, "epoch": "e"}},
        {"id": 7, "topic": "user:1"},
    ),
    ({"type": "subscribe", "topc": "user:1", "id": 8}, {"id": 8}),
    (
        {"type": "subscribe", "topic": "user:1", "id": 9, "since": {"pos": "x", "epoch": "e"}},
        {"id": 9, "topic": "user:1"},
    ),
    ({"type": "unsubscribe", "topic": "room:7", "id": 10, "extra": 1}, {"id": 10, "topic": "room:7"}),
    ({"type": "ping", "id": 11, "extra": 1}, {"id": 11}),
    ({"type": "subscibe", "topic": "room:7", "id": 12}, {"id": 12, "topic": "room:7"}),
    ({"type": "status", "status": "busy", "id": 13}, {"id": 13}),
    ({"type": "subscribe", "topic": 7, "id": 14}, {"id": 14}),
    # What is not an integer id or a text topic is no request's: nothing to echo.
    ({"type": "subscribe", "topic": "user:1", "id": "one"}, {"topic": "user:1"}),
    ({"type": "subscribe", "topic": "user:1", "id": True}, {"topic": "user:1"}),
    ({"type": "subscribe", "topic": "user:1", "id": 1.5}, {"topic": "user:1"}),
    ({"type": "subscribe", "topic": ["user:1"], "id": None}, {}),
]


def echoed(frame: dict[str, Any]) -> dict[str, Any]:
    return {k: frame[k] for k in ("id", "topic") if k in frame}


async def test_a_bad_message_is_answered_with_the_request_s_id_and_topic(dsn: str) -> None:
    """docs/protocol.md: errors answer a request with its id. A misspelled field must not
    leave the client waiting for an answer it cannot match to its request."""
    async with running_gateway(dsn, message_rate=1000) as gw:
        c = await gw.connect("1")
        for frame, expected in ECHOED:
            await c.send(json.dumps(frame))
            error = await expect_error(c, "bad_message")
            assert echoed(error) == expected, f"{frame}: {error}"
        await assert_alive(c)
        await c.close()


async def test_frames_before_auth_are_answered_with_their_id_and_topic(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        c = await open_raw(gw)
        await c.send({"type": "subscribe", "topic": "user:1", "id": 1})
        assert echoed(await expect_error(c, "not_authenticated")) == {"id": 1, "topic": "user:1"}
        await c.send({"type": "subscribe", "topic": "user:1", "id": 2, "sinse": None})
        assert echoed(await expect_error(c, "bad_message")) == {"id": 2, "topic": "user:1"}
        await c.send({"type": "ping"})
        assert echoed(await expect_error(c, "not_authenticated")) == {}
        await c.auth(token("1"))
        await assert_alive(c)
        await c.close()


async def test_binary_frame_is_refused_before_and_after_auth(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        c = await open_raw(gw)
        assert c.ws is not None
        await c.ws.send_bytes(b'{"type": "auth"}')
        await expect_error(c, "binary_frame")
        await c.auth(token("1"))
        await c.ws.send_bytes(b'{"type": "ping", "id": 1}')
        await expect_error(c, "binary_frame")
        await assert_alive(c)
        await c.close()


# --- the subscribe-ack guarantee ------------------------------------------------------------


async def test_commit_right_after_subscribed_is_always_delivered(dsn: str) -> None:
    """A row committed the moment ``subscribed`` arrives (no sleep) is never lost.

    The gateway reads the topic's head before it sends the ack and adds the subscriber in
    the same step, so any later commit is above the head. Half the rounds use a table row
    (inline doorbell), half ``gateway.emit`` (range doorbell read from the log); some topics
    already have history, so the head is not 0.
    """
    db = await pg_connect(dsn)
    await db.execute(
        "CREATE TABLE acks (id bigserial PRIMARY KEY, topic text NOT NULL, n int);"
        "SELECT gateway.publish('acks', $$topic$$)"
    )
    async with running_gateway(dsn, tables="public.acks", subscribe_rate=1000, message_rate=1000) as gw:
        c = await open_raw(gw)
        await c.auth(token("1", topics=["room:*"]))
        for i in range(24):
            topic = f"room:ack{i % 8}"
            if i % 3 == 0:
                await emit(db, topic, {"history": i})  # before the subscription: not delivered
            ack = await c.subscribe(topic)
            if i % 2:
                await db.execute("INSERT INTO acks (topic, n) VALUES ($1, $2)", topic, i)
            else:
                await emit(db, topic, {"n": i})
            (event,) = await c.events(1)
            assert event["topic"] == topic and event["pos"] == ack["pos"] + 1, (ack, event)
            assert (event["row"] if i % 2 else event["data"])["n"] == i
            await c.send({"type": "unsubscribe", "topic": topic})
            await c.expect("unsubscribed")
        await c.close()
    await db.close()


# --- outages ------------------------------------------------------------------------------------


async def test_subscribe_during_an_outage_is_unavailable_without_database_details(
    dsn: str, pg_restart: Any
) -> None:
    # The cause of an outage (host, port, the driver's message) goes to the log, not to clients.
    async with running_gateway(dsn) as gw:
        c = await gw.connect("1")
        await pg_restart.adown()
        try:
            await c.send({"type": "subscribe", "topic": "user:1", "id": 1})
            error = await expect_error(c, "unavailable", id=1, topic="user:1")
        finally:
            await pg_restart.aup()
        assert error["message"] == "the database is unreachable; subscribe again later", error
        await c.close()
