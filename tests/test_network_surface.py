"""The gateway's network surface, against real sockets: what a client that does not play by the
rules can do before, during and after the upgrade, and what the HTTP endpoints answer.

Raw asyncio streams where aiohttp's client would not send what the test needs (a request that
never ends, WebSocket control frames written by hand).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import zlib
from pathlib import Path

import aiohttp

from gateway import config
from gateway import protocol as p

from .gwtest import WAIT, GatewayProcess, running_gateway, token

# --- raw WebSocket helpers ----------------------------------------------------------------------


def client_frame(opcode: int, payload: bytes = b"") -> bytes:
    """One final, masked client frame (RFC 6455 section 5.2) with a payload under 126 bytes."""
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + masked


PING, PONG, TEXT, CLOSE = 0x9, 0xA, 0x1, 0x8


async def open_stream(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = base.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def raw_websocket(
    base: str, user: str | None, extra: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An upgraded socket, authenticated by header when ``user`` is given; the 101 is read."""
    reader, writer = await open_stream(base)
    auth = f"Authorization: Bearer {token(user)}\r\n" if user is not None else ""
    writer.write(
        (
            "GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            f"{auth}{extra}\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


def masked_frame(first_byte: int, payload: bytes) -> bytes:
    """A masked client frame of any size; ``first_byte`` holds FIN, RSV1 and the opcode."""
    n = len(payload)
    if n < 126:
        length = struct.pack("!B", 0x80 | n)
    elif n < 65536:
        length = struct.pack("!BH", 0x80 | 126, n)
    else:
        length = struct.pack("!BQ", 0x80 | 127, n)
    mask = os.urandom(4)
    return bytes([first_byte]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next server frame (servers never mask): its opcode and payload."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return b0 & 0x0F, await reader.readexactly(n)


async def close_code_of(reader: asyncio.StreamReader) -> tuple[int, dict[int, int]]:
    """Read frames until the server's close frame: its code, and how many frames of each opcode
    came before it."""
    seen: dict[int, int] = {}
    while True:
        opcode, payload = await asyncio.wait_for(server_frame(reader), WAIT)
        if opcode == CLOSE:
            return struct.unpack("!H", payload[:2])[0], seen
        seen[opcode] = seen.get(opcode, 0) + 1


# --- before the upgrade: a request that never ends ------------------------------------------------


def test_the_http_idle_timeout_is_short_by_default() -> None:
    """aiohttp keeps a connection that has not finished its request for an hour (its keep-alive
    default, 3630 s): sockets no GATEWAY_MAX_CONNECTIONS counts, each holding a descriptor."""
    assert config.Settings().http_idle_timeout <= 120


async def test_a_connection_that_never_finishes_its_request_is_closed(dsn: str, tmp_path: Path) -> None:
    gw = await GatewayProcess(dsn, tmp_path / "gw.log", http_idle_timeout="1s").start()
    try:
        silent = await open_stream(gw.base)  # connects, sends nothing
        slow = await open_stream(gw.base)  # a slowloris: headers that never end
        slow[1].write(b"GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n")
        for reader, writer in (silent, slow):
            # EOF (b"") within WAIT: the gateway closed it. A timeout here means it did not.
            assert await asyncio.wait_for(reader.read(), WAIT) == b""
            writer.close()
        # An upgraded WebSocket is not an idle HTTP connection: it outlives the timeout.
        reader, writer = await raw_websocket(gw.base, "1")
        await asyncio.sleep(1.5)
        writer.write(client_frame(TEXT, b'{"type": "ping", "id": 7}'))
        while True:
            opcode, payload = await asyncio.wait_for(server_frame(reader), WAIT)
            if opcode == TEXT and json.loads(payload)["type"] == "pong":
                break
        writer.close()
    finally:
        await gw.stop()


# --- after the upgrade: WebSocket control frames ------------------------------------------------------


async def test_a_websocket_ping_is_answered(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        for user in ("1", None):  # after authentication and before it
            reader, writer = await raw_websocket(gw.base, user)
            if user is not None:
                assert (await server_frame(reader))[0] == TEXT  # welcome
            writer.write(client_frame(PING, b"are you there"))
            # A pong with the ping's payload, and no error frame about it.
            assert await asyncio.wait_for(server_frame(reader), WAIT) == (PONG, b"are you there")
            writer.close()


async def test_a_websocket_ping_flood_is_rate_limited_and_closed_4029(dsn: str) -> None:
    """A ping is a client frame like any other: each costs the gateway a read and a pong. A
    client sending them as fast as it can must meet GATEWAY_MESSAGE_RATE, as text and binary
    frames do, not get thousands of pongs a second for as long as it likes."""
    rate = 5
    async with running_gateway(dsn, message_rate=rate) as gw:
        for user in ("1", None):  # after authentication and before it (within the auth deadline)
            reader, writer = await raw_websocket(gw.base, user)
            writer.write(client_frame(PING, b"p" * 100) * 2000)
            code, seen = await close_code_of(reader)
            assert code == p.CloseCode.RATE_LIMITED, (user, seen)
            # At most the burst (2x the rate) was answered before the flood was cut off.
            assert seen.get(PONG, 0) <= 2 * rate, seen
            writer.close()


# --- HTTP endpoints: what they reveal ---------------------------------------------------------------


async def test_metrics_name_no_user_topic_or_token(dsn: str) -> None:
    """/metrics needs no token (docs/security.md): it must hold counts, never who or what."""
    user, topic = "metrics-secret-user", "room:metrics-secret-topic"
    async with running_gateway(dsn) as gw:
        tok = token(user, topics=[topic])
        c = await gw.connect()
        await c.auth(tok)
        await c.subscribe(topic)
        text = await gw.metrics()
        assert "gateway_subscriptions 1.0" in text
        for secret in (user, "metrics-secret", tok, tok.split(".")[1]):
            assert secret not in text
        await c.close()


# --- close frames ---------------------------------------------------------------------------------------


async def test_a_close_reason_cut_to_fit_is_still_valid_utf8(dsn: str) -> None:
    """A close reason is cut to fit a control frame; cut in the middle of a character it is not
    UTF-8, and a browser then fails the connection (RFC 6455 section 8.1) and reports 1006
    instead of the documented code: the embeddable client would retry a token that can never
    work instead of stopping on 4001. Here the audience, in the reason, straddles the cut."""
    prefix = "bad token: the token's aud does not include 'urn:"
    audience = "urn:" + "x" * (119 - len(prefix)) + "é" * 10
    async with running_gateway(dsn, jwt_audience=audience) as gw:
        reader, writer = await raw_websocket(gw.base, None)
        auth = json.dumps({"type": "auth", "token": token("1", aud="another")}).encode()
        mask = os.urandom(4)
        header = struct.pack("!BBH", 0x80 | TEXT, 0x80 | 126, len(auth)) + mask
        writer.write(header + bytes(b ^ mask[i % 4] for i, b in enumerate(auth)))
        while True:
            opcode, payload = await asyncio.wait_for(server_frame(reader), WAIT)
            if opcode == CLOSE:
                break
        assert struct.unpack("!H", payload[:2])[0] == p.CloseCode.UNAUTHORIZED
        reason = payload[2:].decode("utf-8")  # raises if the cut split a character
        assert reason.startswith("bad token: the token's aud") and len(payload) <= 125
        writer.close()


# --- compression ----------------------------------------------------------------------------------------


def deflate(data: bytes) -> bytes:
    """A permessage-deflate message body (RFC 7692 section 7.2.1): raw deflate, tail removed."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]


async def test_compression_is_for_client_frames_only_and_bounded_by_the_frame_limit(dsn: str) -> None:
    """What docs/security.md says of GATEWAY_COMPRESSION: clients may compress what they send,
    the gateway's frames go out uncompressed (the same bytes to every subscriber), and a frame
    that inflates past GATEWAY_MAX_FRAME_BYTES closes 1009 however small it came."""
    offer = "Sec-WebSocket-Extensions: permessage-deflate\r\n"
    async with running_gateway(dsn, compression="true", max_frame_bytes=1024) as gw:
        reader, writer = await raw_websocket(gw.base, "1", offer)
        assert (await server_frame(reader))[0] == TEXT  # welcome
        writer.write(masked_frame(0x80 | 0x40 | TEXT, deflate(b'{"type": "ping", "id": 3}')))
        first_byte, second_byte = await asyncio.wait_for(reader.readexactly(2), WAIT)
        assert first_byte == 0x80 | TEXT, hex(first_byte)  # FIN, text, RSV1 clear: not compressed
        assert second_byte < 126  # the pong, short: its payload follows as it is
        pong = json.loads(await reader.readexactly(second_byte))
        assert pong == {"type": "pong", "id": 3}
        # A decompression bomb: 8 MB of spaces in a few kB.
        writer.write(masked_frame(0x80 | 0x40 | TEXT, deflate(b'{"type": "ping"}' + b" " * (8 << 20))))
        code, _ = await close_code_of(reader)
        assert code == p.CloseCode.MESSAGE_TOO_BIG
        writer.close()


# --- logs ------------------------------------------------------------------------------------------------


async def test_a_bearer_subprotocol_offered_without_gateway_v1_is_not_logged(
    dsn: str, tmp_path: Path
) -> None:
    """A browser client that forgets "gateway.v1" offers only "bearer.<token>". aiohttp logs the
    protocols it could not match, token included, at warning level: "the gateway never logs
    tokens" (docs/security.md) must hold for that line too."""
    gw = await GatewayProcess(dsn, tmp_path / "gw.log").start()
    try:
        tok = token("1")
        for offered in ((f"bearer.{tok}",), ("gateway.v2", f"bearer.{tok}")):
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(gw.ws_url, protocols=offered) as ws:
                    assert ws.protocol is None  # nothing selected, the token never echoed
                    welcome = await ws.receive_json(timeout=WAIT)
                    assert welcome["type"] == "welcome"
    finally:
        await gw.stop()
    log = (tmp_path / "gw.log").read_text()
    assert "overlap" in log  # the warning is kept: it tells the operator what clients offer
    assert tok not in log and tok.split(".")[2] not in log, log


async def test_a_malformed_request_is_logged_in_one_line_without_its_headers(
    dsn: str, tmp_path: Path
) -> None:
    """aiohttp logs a request its parser refuses (a header over 8190 bytes, a byte no header may
    hold) as an error with a traceback quoting the start of the offending header: part of a
    token, in an error-level line anyone on the network can write at will."""
    gw = await GatewayProcess(dsn, tmp_path / "gw.log").start()
    tok = token("1", topics=[f"room:{i}" for i in range(700)])  # over 8 KB
    try:
        for header in (
            f"Authorization: Bearer {tok}".encode(),
            b"Authorization: Bearer \x00" + tok.encode()[:500],
        ):
            reader, writer = await open_stream(gw.base)
            writer.write(b"GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n" + header + b"\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), WAIT)).startswith(b"HTTP/1.0 400 ")
            writer.close()
        # The gateway still serves.
        status, _ = await gw.ready()
        assert status == 200
    finally:
        await gw.stop()
    log = (tmp_path / "gw.log").read_text()
    assert tok[:40] not in log, log
    assert "Traceback" not in log and " error " not in log, log
    assert log.count("bad HTTP request from 127.0.0.1") == 2, log


async def test_with_a_token_in_the_header_and_the_subprotocol_the_header_decides(dsn: str) -> None:
    async with running_gateway(dsn) as gw, aiohttp.ClientSession() as http:
        both = {"headers": {"Authorization": f"Bearer {token('header-user')}"}}
        protocols = ("gateway.v1", f"bearer.{token('subprotocol-user')}")
        async with http.ws_connect(gw.ws_url, protocols=protocols, **both) as ws:
            assert ws.protocol == "gateway.v1"
            assert (await ws.receive_json(timeout=WAIT))["user"] == "header-user"
        # A bad header token is refused even with a good subprotocol token.
        bad = {"headers": {"Authorization": "Bearer not-a-token"}}
        try:
            async with http.ws_connect(gw.ws_url, protocols=protocols, **bad):
                raise AssertionError("upgraded with a bad Authorization header")
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == 401
