"""The gateway's WebSocketResponse: aiohttp's, plus two things a server facing the internet needs.

1. Client frames must be masked. RFC 6455 section 5.1: "The server MUST close the connection
   upon receiving a frame that is not masked." aiohttp's frame reader serves both directions
   and accepts either (its threat model lists this as a known gap), and its reader is compiled
   and keeps the mask bit to itself. So ``_MaskedFramesOnly`` reads just the frame headers
   (two to fourteen bytes per frame) on their way to aiohttp's reader, and on an unmasked
   frame makes the connection fail the way aiohttp fails one for any other protocol error:
   the handler's ``receive()`` gets the error, aiohttp sends close 1002 and drops the socket.
   Clients send little (a few frames a second, limits in docs/security.md), so this costs
   next to nothing; the frames the gateway sends are not touched.

2. The kernel's send buffer is bounded. Linux grows a socket's send buffer on its own (up to
   ``net.ipv4.tcp_wmem``'s maximum, 4 MB by default), so a client that stops reading held
   megabytes in the kernel besides the ``GATEWAY_SEND_QUEUE_BYTES`` the gateway counts.
   ``SEND_BUFFER_BYTES`` is set on each upgraded socket (SO_SNDBUF; Linux doubles the value
   for its bookkeeping and stops growing it), so a stuck client costs at most
   ``GATEWAY_SEND_QUEUE_BYTES`` plus ``2 * SEND_BUFFER_BYTES`` plus one packet (the kernel
   takes a write while it holds less than its limit; a packet is up to 64 KiB).

Both are done when the upgrade completes (``_post_start``), before any frame is read.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from typing import Any

from aiohttp import WSCloseCode, web
from aiohttp.http_websocket import WebSocketError

log = logging.getLogger(__name__)

# Requested SO_SNDBUF of an upgraded socket; the kernel reports and allows twice this. 128 KiB
# lets one client receive about 1 MB/s at 250 ms round trip, far more than events need, while
# a burst beyond it waits in the gateway's own, counted send queue.
SEND_BUFFER_BYTES = 128 * 1024


class _MaskedFramesOnly:
    """Passes the bytes of a WebSocket stream on to aiohttp's reader, checking that every
    frame carries a mask; fails the connection (1002) at the first frame that does not."""

    __slots__ = ("_head", "_queue", "_reader", "_skip", "silent")

    def __init__(self, reader: Any, queue: Any) -> None:
        self._reader = reader  # aiohttp's WebSocketReader (feed_data, feed_eof)
        self._queue = queue  # its WebSocketDataQueue, where receive() reads from
        self._head = b""  # the start of a frame header split across reads
        self._skip = 0  # payload bytes of the current frame still to come
        self.silent = 0  # heartbeat ticks since the client last sent anything

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.silent = 0
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            head = self._head + data[pos : pos + 14]  # a header is at most 14 bytes
            if len(head) < 2:
                self._head, pos = head, end
                break
            if not head[1] & 0x80:
                return self._fail()
            length = head[1] & 0x7F
            extra = 2 if length == 126 else 8 if length == 127 else 0
            size = 2 + extra + 4  # the 4-byte masking key
            if len(head) < size:
                self._head, pos = head, end
                break
            if extra:
                length = int.from_bytes(head[2 : 2 + extra], "big")
            pos += size - len(self._head)
            self._head = b""
            self._skip = length
        result: tuple[bool, bytes] = self._reader.feed_data(data)
        return result

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    def _fail(self) -> tuple[bool, bytes]:
        # What aiohttp's reader does on a protocol error: the error for receive(), then eof,
        # on which the protocol stops reading; the handler then closes with the error's code.
        self._queue.set_exception(
            WebSocketError(WSCloseCode.PROTOCOL_ERROR, "client frames must be masked (RFC 6455 5.1)")
        )
        return True, b""


class GatewayWebSocketResponse(web.WebSocketResponse):
    """``web.WebSocketResponse`` that refuses unmasked client frames and bounds SO_SNDBUF, and
    tells the heartbeat how long the client has been silent (``silence``)."""

    _wire: _MaskedFramesOnly | None = None

    def silence(self) -> int:
        """Counts one more heartbeat tick; returns the ticks since the client last sent a byte
        (0 when that cannot be known: aiohttp's internals changed, warned at the upgrade)."""
        wire = self._wire
        if wire is None:
            return 0
        wire.silent += 1
        return wire.silent

    def _post_start(self, request: web.BaseRequest, protocol: str | None, writer: Any) -> None:
        proto: Any = request.protocol
        # Bytes that came with the upgrade request are fed to the reader when it is installed:
        # hold them back so they pass the mask check too.
        tail = getattr(proto, "_message_tail", b"")
        if tail:
            proto._message_tail = b""
        super()._post_start(request, protocol, writer)
        reader = getattr(proto, "_payload_parser", None)
        if reader is None or self._reader is None:  # aiohttp's internals moved: checked by tests
            _warn_once("cannot check that client frames are masked (aiohttp internals changed)")
        else:
            proto._payload_parser = self._wire = _MaskedFramesOnly(reader, self._reader)
        if tail:
            proto._payload_parser.feed_data(tail)  # as set_parser does; an error reaches receive()
        _drop_http_state(proto)
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            except OSError as exc:  # a socket type without it; the limit is then the kernel's
                _warn_once(f"cannot bound the socket send buffer: {exc}")


# Stands in for the protocol's queue of parsed HTTP requests once the connection is a
# WebSocket: always empty, and anything appended is discarded (maxlen 0).
_NO_MESSAGES: deque[Any] = deque(maxlen=0)


def _drop_http_state(proto: Any) -> None:
    """Free what the connection needed only while it spoke HTTP: the request parser (aiohttp
    consumed the upgrade request before the handler ran, feeds every later byte to the
    WebSocket reader, and treats a ``None`` parser as it does after the connection is lost)
    and the queue of parsed requests (an empty deque still holds a 64-slot block). About
    1.2 KB per connection, of a total near 20 (docs/performance.md, "Memory per connection")."""
    if getattr(proto, "_payload_parser", None) is None or not getattr(proto, "_upgraded", False):
        return  # not the state these attributes were checked against: leave it alone
    if hasattr(proto, "_parser"):
        proto._parser = None
    messages = getattr(proto, "_messages", None)
    if isinstance(messages, deque) and not messages:
        proto._messages = _NO_MESSAGES


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)
