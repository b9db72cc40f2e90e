"""A minimal WebSocket client for holding tens of thousands of connections in one process.

An aiohttp client costs a task, a reader, a response object and a few KB per connection, and
tens of microseconds of CPU per message; at 50,000 connections on a shared 2-core machine the
clients would then measure themselves instead of the gateway. This one is an
``asyncio.Protocol`` per connection and nothing else: no task while a connection is idle, frames
parsed straight from the transport's bytes, text frames handed to a callback. It speaks only
what the gateway sends (RFC 6455 without extensions: text, ping, close, no fragmentation
needed but handled), answers pings, and masks what it sends as a client must.

The owner gets ``on_open(conn)`` after the 101, ``on_text(conn, payload)`` per text message,
``on_refused(conn, status, retry_after)`` for an upgrade answered with anything but 101, and
``on_closed(conn, code)`` once when the connection ends (code None: no close frame).
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from typing import Any, Protocol, cast


class Owner(Protocol):
    def on_open(self, conn: WSConn) -> None: ...
    def on_text(self, conn: WSConn, payload: bytes) -> None: ...
    def on_refused(self, conn: WSConn, status: int, retry_after: float | None) -> None: ...
    def on_closed(self, conn: WSConn, code: int | None) -> None: ...


def upgrade_request(host: str, path: str, token: str) -> bytes:
    """The HTTP upgrade request; the token goes in Authorization (never in the URL)."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return payload
    k = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ k).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked frame (clients must mask, RFC 6455 5.3)."""
    n = len(payload)
    key = os.urandom(4)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + key + _mask(payload, key)


class WSConn(asyncio.Protocol):
    """One client connection. ``state`` and ``data`` are the owner's (what it tracks per client)."""

    __slots__ = ("buf", "closed", "data", "frag", "index", "open", "owner", "request", "transport")

    def __init__(self, owner: Owner, request: bytes, index: int, data: Any = None) -> None:
        self.owner = owner
        self.request = request
        self.index = index
        self.data = data
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.open = False
        self.closed = False
        self.frag = b""  # a text message split over continuation frames

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            head, buf = buf[:end].decode("latin-1"), buf[end + 4 :]
            status = int(head.split(" ", 2)[1])
            if status != 101:
                retry = None
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "retry-after":
                        try:
                            retry = float(value.strip())
                        except ValueError:
                            pass
                self.closed = True
                self.owner.on_refused(self, status, retry)
                self.abort()
                return
            self.open = True
            self.owner.on_open(self)
        self.buf = self._frames(buf)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed:
            self.closed = True
            self.owner.on_closed(self, None)

    # --- frames -----------------------------------------------------------------------

    def _frames(self, buf: bytes) -> bytes:
        """Handle every complete frame in ``buf``; returns what is left (a partial frame)."""
        pos, size = 0, len(buf)
        while size - pos >= 2 and not self.closed:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            start = pos + 2
            if n == 126:
                if size - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = struct.unpack_from("!Q", buf, pos + 2)[0]
                start = pos + 10
            if b1 & 0x80:  # a server must not mask; refuse rather than misread
                self._fail(1002)
                return b""
            end = start + n
            if end > size:
                break
            payload = buf[start:end]
            pos = end
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            if opcode == 1 or opcode == 0:
                if not fin:
                    self.frag += payload
                    continue
                if self.frag:
                    payload, self.frag = self.frag + payload, b""
                self.owner.on_text(self, payload)
            elif opcode == 9:  # ping: answer with the same payload
                self.send(0xA, payload)
            elif opcode == 8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                self.closed = True
                self.send(0x8, payload[:2])
                self.owner.on_closed(self, code)
                if self.transport is not None:
                    self.transport.close()
                return b""
            # pong (10) and binary frames (2) are not used by the gateway: ignored
        return buf[pos:] if pos < size else b""

    # --- the owner's side -------------------------------------------------------------

    def send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(opcode, payload))

    def send_text(self, payload: bytes) -> None:
        self.send(0x1, payload)

    def _fail(self, code: int) -> None:
        self.closed = True
        self.owner.on_closed(self, code)
        self.abort()

    def abort(self) -> None:
        """Drop the connection at once (RST, no TIME_WAIT): for ending a test, not for a client."""
        if self.transport is not None:
            self.transport.abort()
