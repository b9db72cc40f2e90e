"""Every per-connection and per-process limit, against the real gateway.

Limits are set low through the same settings an operator uses (``GATEWAY_MAX_FRAME_BYTES`` and
friends). Rates are token buckets (``rate`` per second, bursts of ``2 * rate``), so the tests
count replies rather than measure time: a burst sent at once is bigger than the bucket.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import socket
import struct
import termios
from typing import Any

import aiohttp
import pytest

from gateway import protocol as p
from gateway import session as session_module
from gateway.ratelimit import TokenBucket
from gateway.websocket import SEND_BUFFER_BYTES, _MaskedFramesOnly

from .gwtest import (
    WAIT,
    Client,
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


async def send_until_closed(c: Client, frames: list[str]) -> int:
    """Send ``frames`` without reading; how many went out before the socket closed."""
    assert c.ws is not None
    sent = 0
    for frame in frames:
        if c.ws.closed:
            break
        try:
            await c.ws.send_str(frame)
        except (ConnectionError, aiohttp.ClientError):
            break
        sent += 1
    return sent


async def replies(c: Client, n: int) -> list[dict[str, Any]]:
    """The next ``n`` frames (fails if the socket closes first)."""
    return [await c.recv(WAIT) for _ in range(n)]


# --- frame size ---------------------------------------------------------------------------------


def padded_ping(size: int, req: int = 1) -> str:
    """A valid ping frame of exactly ``size`` bytes (JSON allows trailing whitespace)."""
    text = json.dumps({"type": "ping", "id": req})
    assert len(text) <= size
    return text + " " * (size - len(text))


async def test_frame_at_the_limit_is_accepted_one_byte_more_closes_1009(dsn: str) -> None:
    async with running_gateway(dsn, max_frame_bytes=1024) as gw:
        c = await gw.connect("1")
        await c.send(padded_ping(1000, 1))
        assert await c.recv() == {"type": "pong", "id": 1}
        # GATEWAY_MAX_FRAME_BYTES is "the largest client frame accepted".
        await c.send(padded_ping(1024, 2))
        assert await c.recv() == {"type": "pong", "id": 2}, "a frame of exactly the limit must pass"
        await c.send(padded_ping(1025, 3))
        assert await close_code(c) == p.CloseCode.MESSAGE_TOO_BIG
        await c.close()


async def test_oversized_frame_closes_1009_before_auth_too(dsn: str) -> None:
    async with running_gateway(dsn, max_frame_bytes=1024) as gw:
        c = await open_raw(gw)
        # An oversized auth frame: the token inside never reaches the verifier.
        await c.send(json.dumps({"type": "auth", "token": "x" * 5000}))
        assert await close_code(c) == p.CloseCode.MESSAGE_TOO_BIG
        await c.close()
        assert not gw.state.ctx.registry.sessions


# --- subscriptions ------------------------------------------------------------------------------


async def test_too_many_subscriptions(dsn: str) -> None:
    async with running_gateway(dsn, max_subscriptions=3) as gw:
        c = await open_raw(gw)
        await c.auth(token("1", topics=["room:*"]))
        for topic in ("user:1", "room:1", "room:2"):
            await c.subscribe(topic)
        await c.send({"type": "subscribe", "topic": "room:3", "id": 40})
        error = await expect_error(c, "too_many_subscriptions", id=40, topic="room:3")
        assert "3" in error["message"]
        await assert_alive(c)
        # The limit counts live subscriptions: after an unsubscribe there is room again.
        await c.send({"type": "unsubscribe", "topic": "room:1"})
        await c.expect("unsubscribed")
        await c.subscribe("room:3")
        # A refused subscribe is not a subscription: room:4's events never arrive.
        await c.send({"type": "subscribe", "topic": "room:4", "id": 41})
        await expect_error(c, "too_many_subscriptions", id=41, topic="room:4")
        db = await pg_connect(dsn)
        await emit(db, "room:4", {"refused": True})
        marker = await emit(db, "room:3", {"marker": True})
        (event,) = await c.events(1)
        assert (event["topic"], event["pos"]) == ("room:3", marker)
        await db.close()
        await c.close()


# --- rates --------------------------------------------------------------------------------------


async def test_message_rate_drops_frames_with_rate_limited(dsn: str) -> None:
    rate = 5  # burst 10
    async with running_gateway(dsn, message_rate=rate) as gw:
        c = await gw.connect("1")
        n = 4 * rate  # sent at once: more than the burst, fewer than the flood threshold
        for req in range(n):
            await c.send({"type": "ping", "id": req})
        got = await replies(c, n)
        pongs = [f for f in got if f["type"] == "pong"]
        limited = [f for f in got if f["type"] == "error"]
        # Exactly one reply per frame: a pong, or an error saying the frame was dropped.
        assert len(pongs) + len(limited) == n, got
        assert {f["code"] for f in limited} == {"rate_limited"}, limited
        # The burst allowance is 2x the rate, and the auth frame took one of it.
        assert len(pongs) >= 2 * rate - 1, "the burst allowance is 2x the rate"
        assert limited, "a burst of 4x the rate must be limited"
        # The pongs answered are the first ones sent, in order.
        assert [f["id"] for f in pongs] == sorted(f["id"] for f in pongs)
        # The bucket refills: the connection is usable again.
        await asyncio.sleep(1.0)
        await assert_alive(c)
        await c.close()


async def test_flooding_as_fast_as_possible_closes_4029(dsn: str) -> None:
    rate = 5
    async with running_gateway(dsn, message_rate=rate) as gw:
        c = await gw.connect("1")
        await send_until_closed(c, [json.dumps({"type": "ping", "id": i}) for i in range(2000)])
        assert await close_code(c) == p.CloseCode.RATE_LIMITED
        await c.close()


async def test_sustained_flooding_at_ten_times_the_rate_closes_4029(dsn: str) -> None:
    """A client that keeps sending 10x its rate is flooding, even though a frame gets through now
    and then as the bucket refills. The gateway must cut it off rather than answer ~9 of 10 frames
    with rate_limited forever."""
    rate = 5
    async with running_gateway(dsn, message_rate=rate) as gw:
        c = await gw.connect("1")
        assert c.ws is not None

        async def flood() -> None:
            i = 0
            while not c.ws.closed:  # type: ignore[union-attr]
                try:
                    await c.ws.send_str(json.dumps({"type": "ping", "id": i}))  # type: ignore[union-attr]
                except (ConnectionError, aiohttp.ClientError):
                    return
                i += 1
                await asyncio.sleep(1 / (10 * rate))

        sender = asyncio.create_task(flood())
        try:
            # 5 s of flooding at 10x is 45x the rate in dropped frames; the threshold is 4x.
            code = await close_code(c, timeout=5.0)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        assert code == p.CloseCode.RATE_LIMITED
        await c.close()


async def test_binary_frames_count_towards_the_message_rate(dsn: str) -> None:
    """Every client frame costs the same to receive and answer: a flood of binary frames is a
    flood like any other and must end in 4029, not in one binary_frame error per frame forever."""
    rate = 5
    async with running_gateway(dsn, message_rate=rate) as gw:
        c = await gw.connect("1")
        assert c.ws is not None
        for _ in range(2000):
            if c.ws.closed:
                break
            try:
                await c.ws.send_bytes(b"\x00" * 16)
            except (ConnectionError, aiohttp.ClientError):
                break
        assert await close_code(c, timeout=5.0) == p.CloseCode.RATE_LIMITED
        await c.close()


async def test_subscribe_rate(dsn: str) -> None:
    rate = 2  # burst 4
    async with running_gateway(dsn, subscribe_rate=rate, message_rate=1000) as gw:
        c = await open_raw(gw)
        await c.auth(token("1", topics=["room:*"]))
        n = 12
        for i in range(n):
            await c.send({"type": "subscribe", "topic": f"room:{i}", "id": i})
        got = await replies(c, n)
        ok = [f for f in got if f["type"] == "subscribed"]
        limited = [f for f in got if f["type"] == "error"]
        assert len(ok) + len(limited) == n, got
        assert {f["code"] for f in limited} == {"rate_limited"}, limited
        # Each refusal names the subscribe it refused.
        assert all(f["topic"] == f"room:{f['id']}" for f in limited), limited
        assert len(ok) >= 2 * rate and limited
        # Other messages are not subscribes: pings still pass.
        await assert_alive(c)
        # A rate-limited subscribe did not subscribe: it can be sent again later.
        await asyncio.sleep(1.0)
        await c.subscribe(limited[0]["topic"])
        await c.close()


# --- connections --------------------------------------------------------------------------------


async def test_connections_per_user_close_1013(dsn: str) -> None:
    async with running_gateway(dsn, max_connections_per_user=2) as gw:
        first = await gw.connect("1")
        second = await gw.connect("1")
        third = await open_raw(gw)
        await third.send({"type": "auth", "token": token("1")})
        assert await close_code(third) == p.CloseCode.TRY_AGAIN_LATER
        await third.close()
        # Header auth is counted the same way.
        fourth = await open_raw(gw, headers={"Authorization": f"Bearer {token('1')}"})
        assert await close_code(fourth) == p.CloseCode.TRY_AGAIN_LATER
        await fourth.close()
        # Other users are not affected; the first two still work.
        other = await gw.connect("2")
        await assert_alive(first)
        await assert_alive(second)
        # A freed slot can be used again.
        await first.close()
        await eventually(lambda: gw.state.ctx.registry.user_count("1") < 2, 10, "the closed slot to be freed")
        again = await gw.connect("1")
        await assert_alive(again)
        for c in (second, other, again):
            await c.close()


async def _handshake_status(url: str, **kw: Any) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await s.ws_connect(url, **kw)
    headers = dict(info.value.headers or {})
    return info.value.status, headers


async def test_max_connections_is_http_503_before_upgrade(dsn: str) -> None:
    async with running_gateway(dsn, max_connections=2) as gw:
        a = await gw.connect("1")
        b = await gw.connect("2")
        status, headers = await _handshake_status(
            gw.ws_url, headers={"Authorization": f"Bearer {token('3')}"}
        )
        assert status == 503
        assert "Retry-After" in headers
        status, _ = await _handshake_status(gw.ws_url)
        assert status == 503
        await assert_alive(a)
        await b.close()
        await eventually(
            lambda: len(gw.state.ctx.registry.sessions) < 2, 10, "the closed connection to be gone"
        )
        c = await gw.connect("3")
        await assert_alive(c)
        await a.close()
        await c.close()


async def _upgrade_refusal(gw: Gateway, **headers: str) -> tuple[int, dict[str, str], Any]:
    """A raw upgrade request expected to be refused: its status, headers and JSON body."""
    upgrade = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    }
    async with aiohttp.ClientSession() as s, s.get(gw.base + "/ws", headers={**upgrade, **headers}) as r:
        return r.status, dict(r.headers), await r.json()


async def test_connect_rate_is_http_503_before_the_token_is_checked(dsn: str) -> None:
    # 0.5/s: one connection, then the next is refused until two seconds have refilled a token.
    async with running_gateway(dsn, connect_rate=0.5) as gw:
        first = await gw.connect("1")
        # A bad token is not even looked at: the refusal is the cheap one.
        status, headers, body = await _upgrade_refusal(gw, Authorization="Bearer not-a-token")
        assert (status, body["error"], headers.get("Retry-After")) == (503, "too_many_connects", "1"), body
        await assert_alive(first)
        async with aiohttp.ClientSession() as s, s.get(gw.base + "/metrics") as r:
            assert 'gateway_upgrades_refused_total{error="too_many_connects"} 1.0' in await r.text()
        refusals: list[aiohttp.WSServerHandshakeError] = []

        async def retry() -> Client | None:
            try:
                return await gw.connect("2")
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 503, exc
                refusals.append(exc)
                return None

        # a retry after the refill is let in
        second = await eventually(retry, 10, lambda: f"a connect let in: {refusals[-1:]}", interval=0.25)
        await assert_alive(second)
        await first.close()
        await second.close()


def test_a_rate_below_one_every_two_seconds_still_lets_one_through() -> None:
    bucket = TokenBucket(0.1)
    assert bucket.take() and not bucket.take()


async def test_sockets_waiting_for_auth_count_towards_max_connections(dsn: str) -> None:
    """An unauthenticated socket holds a connection as much as an authenticated one: without
    counting it, anyone could open unlimited sockets, each kept for GATEWAY_AUTH_TIMEOUT."""
    async with running_gateway(dsn, max_connections=2) as gw:
        idle = [await open_raw(gw), await open_raw(gw)]
        status, _ = await _handshake_status(gw.ws_url)
        assert status == 503
        for c in idle:
            await c.close()


# --- Origin ----------------------------------------------------------------------------------------


async def test_origin_allow_list(dsn: str) -> None:
    allowed = "https://app.example.com"
    async with running_gateway(dsn, allowed_origins=f"{allowed},https://admin.example.com") as gw:
        for origin in ("https://evil.example.com", "http://app.example.com", "null", gw.base):
            status, _ = await _handshake_status(gw.ws_url, headers={"Origin": origin})
            assert status == 403, origin
            # Refused before the token is looked at: a valid token does not help.
            status, _ = await _handshake_status(
                gw.ws_url, headers={"Origin": origin, "Authorization": f"Bearer {token('1')}"}
            )
            assert status == 403, origin
        for origin in (allowed, "https://admin.example.com"):
            c = await open_raw(gw, headers={"Origin": origin})
            await c.auth(token("1"))
            await c.close()
        # No Origin: not a browser, so no cross-site risk; the token still decides.
        c = await open_raw(gw)
        await c.auth(token("1"))
        await c.close()


async def test_origin_default_is_same_origin_only(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        c = await open_raw(gw, headers={"Origin": gw.base})  # http://127.0.0.1:<port>
        await c.auth(token("1"))
        await c.close()
        for origin in ("https://evil.example.com", "null", "http://127.0.0.1:1", "http://localhost"):
            status, _ = await _handshake_status(gw.ws_url, headers={"Origin": origin})
            assert status == 403, origin
        c = await open_raw(gw)
        await c.auth(token("1"))
        await c.close()


# --- isolation ------------------------------------------------------------------------------------


async def test_other_clients_unaffected_while_one_misbehaves(dsn: str) -> None:
    async with running_gateway(dsn, message_rate=5, max_frame_bytes=1024) as gw:
        victim = await gw.connect("2")
        await victim.subscribe("user:2")
        db = await pg_connect(dsn)

        async def misbehave(kind: int) -> int | None:
            bad = await gw.connect("1")
            if kind == 0:
                await send_until_closed(bad, ["{garbage"] * 2000)
            elif kind == 1:
                await send_until_closed(bad, ["x" * 5000])
            else:
                await send_until_closed(bad, ['{"type": "subscribe", "topic": "user:2"}'] * 2000)
            try:
                return await close_code(bad)
            finally:
                await bad.close()

        async def write() -> list[int]:
            return [await emit(db, "user:2", {"n": i}) for i in range(50)]

        codes, positions = await asyncio.gather(
            asyncio.gather(misbehave(0), misbehave(1), misbehave(2)), write()
        )
        assert list(codes) == [
            p.CloseCode.RATE_LIMITED,
            p.CloseCode.MESSAGE_TOO_BIG,
            p.CloseCode.RATE_LIMITED,
        ]
        events = await victim.events(50)
        assert [e["pos"] for e in events] == positions
        assert [e["data"]["n"] for e in events] == list(range(50))
        await assert_alive(victim)
        await db.close()
        await victim.close()


# --- raw WebSocket framing: what aiohttp's client never sends -----------------------------


def ws_frame(payload: bytes, *, opcode: int = 0x1, masked: bool = True) -> bytes:
    """One final client frame, masked with a random key unless ``masked`` is false."""
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes([0x80 | opcode, mask_bit | n])
    elif n < 1 << 16:
        head = bytes([0x80 | opcode, mask_bit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, mask_bit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def raw_upgrade(gw: Gateway, user: str, *, rcvbuf: int | None = None, tail: bytes = b"") -> Any:
    """A WebSocket opened by hand (token in the Authorization header), with ``tail`` sent in
    the same write as the upgrade request. Returns (reader, writer) past the 101 answer."""

    host, port = gw.base.removeprefix("http://").split(":")
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Protocol: gateway.v1\r\nAuthorization: Bearer {token(user)}\r\n\r\n".encode()
        + tail
    )
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert answer.startswith(b"HTTP/1.1 101 "), answer
    return reader, writer


async def read_server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(opcode, payload) of the next frame from the server (server frames are never masked)."""
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), WAIT)
    assert not b1 & 0x80, "a server frame must not be masked"
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return b0 & 0x0F, await asyncio.wait_for(reader.readexactly(n), WAIT)


async def server_close_code(reader: asyncio.StreamReader) -> int:
    while True:
        opcode, payload = await read_server_frame(reader)
        if opcode == 0x8:
            return int.from_bytes(payload[:2], "big")


def ping(req: int, pad: int = 0) -> bytes:
    """A ping frame's text, made ``pad`` bytes longer with JSON whitespace."""
    return b'{"type": "ping",' + b" " * pad + f'"id": {req}}}'.encode()


async def test_masked_frames_of_every_length_encoding_are_read(dsn: str) -> None:
    """The mask check follows frame boundaries: 7-bit and 16-bit lengths, frames split across
    writes byte by byte and several in one write, all get their answer."""
    async with running_gateway(dsn, message_rate=1000) as gw:
        reader, writer = await raw_upgrade(gw, "1", tail=ws_frame(ping(1)))
        frames = [ws_frame(ping(i, pad)) for i, pad in ((2, 0), (3, 300), (4, 5000))]
        writer.write(b"".join(frames))
        for byte in ws_frame(ping(5, 200)):
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0)
        writer.write(ws_frame(b"", opcode=0x9))  # a masked ping control frame
        seen: list[Any] = []
        while len(seen) < 6:
            opcode, payload = await read_server_frame(reader)
            if opcode == 0xA:
                seen.append("pong")
            elif opcode == 0x1 and json.loads(payload)["type"] == "pong":
                seen.append(json.loads(payload)["id"])
        assert sorted(seen, key=str) == [1, 2, 3, 4, 5, "pong"]
        writer.close()


@pytest.mark.parametrize("where", ["after-auth", "first-frame", "with-the-upgrade", "control-frame"])
async def test_an_unmasked_client_frame_closes_1002(dsn: str, where: str) -> None:
    """RFC 6455 5.1: the server MUST close the connection on a frame that is not masked."""
    async with running_gateway(dsn) as gw:
        bad = (
            ws_frame(b"", opcode=0x9, masked=False)
            if where == "control-frame"
            else ws_frame(ping(9), masked=False)
        )
        reader, writer = await raw_upgrade(gw, "1", tail=bad if where == "with-the-upgrade" else b"")
        if where == "after-auth":
            writer.write(ws_frame(ping(1)))
            while True:
                opcode, payload = await read_server_frame(reader)
                if opcode == 0x1 and json.loads(payload) == {"type": "pong", "id": 1}:
                    break
        if where != "with-the-upgrade":
            writer.write(bad)
        assert await server_close_code(reader) == 1002
        # ...and the socket is closed, whatever else the client sends.
        writer.write(ws_frame(ping(2)))
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        writer.close()


def test_the_mask_check_follows_frames_split_at_every_byte() -> None:
    """The header reader in front of aiohttp's, fed every way a stream can be cut: frames with
    7-, 16- and 64-bit lengths pass whole to the reader; an unmasked frame after them fails."""

    class Sink:
        def __init__(self) -> None:
            self.data = b""
            self.error: Exception | None = None

        def feed_data(self, data: bytes) -> tuple[bool, bytes]:
            self.data += data
            return False, b""

        def set_exception(self, exc: Exception) -> None:
            self.error = exc

    good = ws_frame(b"a" * 5) + ws_frame(b"b" * 300) + ws_frame(b"c" * 70000) + ws_frame(b"", opcode=0x9)
    bad = ws_frame(b"d" * 3, masked=False)
    for cut in [*range(0, 20), *range(300, 330), len(good) - 3, len(good) + 1]:
        sink = Sink()
        check = _MaskedFramesOnly(sink, sink)
        stream = good + bad
        results = [check.feed_data(stream[:cut]), check.feed_data(stream[cut:])]
        assert sink.error is not None and "masked" in str(sink.error), cut
        assert results[-1] == (True, b"")
        assert sink.data == stream[:cut], "a read holding the unmasked frame is not passed on"
    sink = Sink()
    check = _MaskedFramesOnly(sink, sink)
    for i in range(len(good)):
        assert check.feed_data(good[i : i + 1]) == (False, b"")
    assert sink.error is None and sink.data == good


async def test_a_client_that_never_reads_holds_a_bounded_kernel_send_buffer(dsn: str) -> None:
    """Linux grows a socket's send buffer up to net.ipv4.tcp_wmem's maximum (4 MB): a stuck
    client held that much in the gateway's kernel beside GATEWAY_SEND_QUEUE_BYTES. The gateway
    sets SO_SNDBUF on every upgraded socket; measured here on the server's side of a client
    that stops reading, once the kernel buffer is full and the gateway's own queue grows."""
    async with running_gateway(dsn, send_queue_bytes=64 << 20) as gw:
        reader, writer = await raw_upgrade(gw, "1")
        try:
            await _fill_and_measure(dsn, gw, reader, writer)
        finally:
            writer.transport.abort()


async def _fill_and_measure(
    dsn: str, gw: Gateway, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:

    writer.write(ws_frame(json.dumps({"type": "subscribe", "topic": "user:1", "id": 1}).encode()))
    while True:
        opcode, payload = await read_server_frame(reader)
        if opcode == 0x1 and json.loads(payload)["type"] == "subscribed":
            break
    # From here on the client reads nothing.
    (session,) = gw.state.ctx.registry.sessions.values()
    transport = session._transport
    sock = transport.get_extra_info("socket")
    db = await pg_connect(dsn)
    blob = "z" * 60_000
    for i in range(400):  # up to 24 MB, far more than any kernel buffer here takes
        await emit(db, "user:1", {"i": i, "blob": blob})
        if i % 10 == 9 and transport.get_write_buffer_size() > 1 << 20:
            break  # the kernel takes no more: the rest waits in the gateway's queue
    await db.close()
    await asyncio.sleep(0.5)
    sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    unsent = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    queued = transport.get_write_buffer_size()
    print(f"server socket: SO_SNDBUF {sndbuf}, in the kernel {unsent}, in the gateway's queue {queued}")
    # Bytes still in the gateway's queue half a second later: the kernel takes no more.
    assert queued > 0, "the client must be stuck with the kernel buffer full"
    assert sndbuf == 2 * SEND_BUFFER_BYTES  # Linux doubles what is set, and no longer grows it
    # The kernel takes a write while it holds less than SO_SNDBUF, so the last one may go over
    # by one packet (up to 64 KiB on loopback).
    assert unsent <= 2 * SEND_BUFFER_BYTES + 65536


async def test_a_silent_client_is_pinged_and_dropped_when_it_does_not_answer(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat (one sweep over every session, not timers per connection): a client silent
    for PING_AFTER ticks gets a WebSocket ping; one that still sends nothing is dropped, one
    whose client answers the pings stays."""
    monkeypatch.setattr(session_module, "HEARTBEAT_TICK", 0.05)
    async with running_gateway(dsn) as gw:
        answering = await open_raw(gw, headers={"Authorization": f"Bearer {token('2')}"})
        assert (await answering.recv(WAIT))["type"] == "welcome"
        # aiohttp's client answers pings while a receive() waits, as a browser always does.
        assert answering.ws is not None
        listening = asyncio.create_task(answering.ws.receive())
        reader, writer = await raw_upgrade(gw, "1")
        while True:
            opcode, payload = await read_server_frame(reader)
            if opcode == 0x9:
                break
            assert opcode == 0x1 and json.loads(payload)["type"] == "welcome"
        assert payload == b""
        # No answer: the socket is closed without a close frame (there is nobody to hear it).
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        registry = gw.state.ctx.registry
        await eventually(lambda: len(registry.sessions) == 1, WAIT, "the silent session to be removed")
        assert registry.closed_by_code[1006] == 1
        # Many heartbeat ticks later the client that answers is still there.
        await asyncio.sleep(3 * session_module.DROP_AFTER * 0.05)
        assert not listening.done(), listening.result()
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
        assert len(registry.sessions) == 1
        await assert_alive(answering)
        writer.close()
        await answering.close()


async def test_the_http_parser_is_freed_once_the_connection_is_a_websocket(dsn: str) -> None:
    """aiohttp keeps its HTTP parser and request queue for a connection's whole life; the
    gateway drops both after the upgrade (~1.5 KB per connection) and frames still flow."""
    async with running_gateway(dsn) as gw:
        c = await open_raw(gw, headers={"Authorization": f"Bearer {token('1')}"})
        assert (await c.recv(WAIT))["type"] == "welcome"
        (session,) = gw.state.ctx.registry.sessions.values()
        proto = session._transport.get_protocol()
        assert proto._parser is None
        assert len(proto._messages) == 0 and proto._messages.maxlen == 0
        await assert_alive(c)
        await c.close()
