"""Baseline (b): the fan-out floor. A bare aiohttp server holds the clients' WebSockets and
writes the same pre-built frame bytes into every transport, as the gateway's hub does, with no
database, no pipeline and no per-event work: what a delivery costs at the very least here.

It runs in its own process (spawned), on uvloop like the gateway, so the parent measures its
CPU from /proc exactly as it measures the gateway workers'.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from multiprocessing.connection import Connection

import msgspec
from aiohttp import web

from gateway.hub import text_frame
from gateway.protocol import Event, encode


def build_frames(k: int) -> list[bytes]:
    """``k`` event frames shaped like the gateway's for a lt_items row (~200 bytes each)."""
    from .db import BODY

    now = time.time()
    frames = []
    for pos in range(1, k + 1):
        row = msgspec.json.encode({"id": pos, "topic": "floor", "sent_at": now, "body": BODY})
        ev = Event(
            topic="t:floor",
            epoch="0a1b2c3d",
            pos=pos,
            op="insert",
            table="public.lt_items",
            key=str(pos),
            row=msgspec.Raw(row),
        )
        frames.append(text_frame(encode(ev)))
    return frames


class Floor:
    def __init__(self) -> None:
        self.transports: list[asyncio.Transport] = []

    async def ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=30.0)
        await ws.prepare(request)
        transport = request.transport
        assert transport is not None
        self.transports.append(transport)
        try:
            async for _ in ws:
                pass
        finally:
            with contextlib.suppress(ValueError):
                self.transports.remove(transport)
        return ws

    async def broadcast(self, frames: list[bytes], rate: float) -> int:
        """Write frame k to every transport, k = 1..K, paced at ``rate`` frames per second.
        (The frames' sent_at is their build time: the floor's latency is not reported.)"""
        start = time.monotonic()
        n = 0
        for k, frame in enumerate(frames):
            slot = start + k / rate
            delay = slot - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            for t in self.transports:
                t.write(frame)
            n += len(self.transports)
        return n

    async def main(self, port: int, pipe: Connection) -> None:
        app = web.Application()
        app.router.add_get("/ws", self.ws)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        loop = asyncio.get_running_loop()
        pipe.send(("listening",))
        try:
            while True:
                cmd = await loop.run_in_executor(None, pipe.recv)
                if cmd[0] == "broadcast":
                    frames = build_frames(cmd[1])
                    pipe.send(("built",))
                    await loop.run_in_executor(None, pipe.recv)  # "go": the parent took its CPU reading
                    pipe.send(("done", await self.broadcast(frames, cmd[2])))
                elif cmd[0] == "stop":
                    return
        finally:
            await runner.cleanup()


def floor_main(port: int, pipe: Connection) -> None:
    from .sysinfo import raise_nofile

    raise_nofile()
    floor = Floor()
    try:
        import uvloop

        uvloop.run(floor.main(port, pipe))
    except ImportError:
        asyncio.run(floor.main(port, pipe))
