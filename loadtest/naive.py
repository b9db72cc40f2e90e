"""The naive baseline: the LISTEN bridge common tutorials show, which the gateway is measured against.

A per-row trigger on its own copy of the load test's table sends the whole row as JSON with
``pg_notify('lt_naive_items', row_to_json(NEW)::text)``; one server process LISTENs on that
channel and writes every notification to every socket subscribed to the row's topic (with one
topic, as in the comparisons, every socket). No log, no replay, no authorization, nothing kept:
what a notification costs when nothing is guaranteed. It runs like the fan-out floor
(loadtest/floor.py): aiohttp + asyncpg on uvloop, in a process of its own (spawned), so the
parent measures its CPU from /proc exactly as it measures the gateway's.

It speaks just enough of the gateway's protocol for the load test's clients (loadtest/clients.py):
a ``welcome`` on connect, ``subscribed`` with the topic's current position, and ``event`` frames
whose ``pos`` counts the notifications of that topic received since the server started. The
table is emptied before each start, so a topic's head is its row count (``heads``): a client
that ends below it lost events, one that received a position twice got a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
from multiprocessing.connection import Connection

import asyncpg
import msgspec
from aiohttp import WSMsgType, web

TABLE = "lt_naive_items"
CHANNEL = "lt_naive_items"

# The same columns as lt_items (loadtest/db.py), so the rows, and so the frames, have its size.
SCHEMA = f"""
DROP TABLE IF EXISTS {TABLE};
CREATE TABLE {TABLE} (
    id bigserial PRIMARY KEY,
    topic text NOT NULL,
    sent_at double precision NOT NULL,
    body text NOT NULL
);
CREATE OR REPLACE FUNCTION lt_naive_items_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', row_to_json(NEW)::text);
    RETURN NEW;
END $$;
CREATE TRIGGER lt_naive_items AFTER INSERT ON {TABLE} FOR EACH ROW EXECUTE FUNCTION lt_naive_items_notify();
"""


async def prepare(dsn: str) -> None:
    """Create (or re-create, empty) the naive table and its trigger."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA)
    finally:
        await conn.close()


async def heads(dsn: str, topics: list[str]) -> dict[str, int]:
    """Each topic's head as the naive server numbers it: the rows of that topic (table emptied
    before the server started)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            f"SELECT 't:' || topic AS topic, count(*) AS n FROM {TABLE} WHERE 't:' || topic = ANY($1::text[]) "
            "GROUP BY topic",
            topics,
        )
        found = {r["topic"]: int(r["n"]) for r in rows}
        return {t: found.get(t, 0) for t in topics}
    finally:
        await conn.close()


class _Topic(msgspec.Struct):
    topic: str


class _Subscribe(msgspec.Struct):
    type: str
    topic: str = ""
    id: int | None = None


_row_topic = msgspec.json.Decoder(_Topic).decode
_subscribe = msgspec.json.Decoder(_Subscribe).decode


class Naive:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.subscribers: dict[str, set[web.WebSocketResponse]] = {}
        self.positions: dict[str, int] = {}
        self.queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.notifications = 0

    def on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        # Parsed only for the topic; the row goes out as PostgreSQL wrote it.
        topic = "t:" + _row_topic(payload).topic
        pos = self.positions.get(topic, 0) + 1
        self.positions[topic] = pos
        self.notifications += 1
        frame = (
            f'{{"type":"event","topic":{msgspec.json.encode(topic).decode()},"pos":{pos},"row":{payload}}}'
        )
        self.queue.put_nowait((topic, frame))

    async def broadcast(self) -> None:
        # One task, in notification order: every socket sees its topic's positions in order.
        while True:
            topic, frame = await self.queue.get()
            for ws in list(self.subscribers.get(topic, ())):
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_str(frame)

    async def ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=30.0)
        await ws.prepare(request)
        await ws.send_str('{"type":"welcome"}')
        topics: list[str] = []
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    m = _subscribe(msg.data)
                except msgspec.DecodeError:
                    continue
                if m.type == "subscribe" and m.topic:
                    self.subscribers.setdefault(m.topic, set()).add(ws)
                    topics.append(m.topic)
                    # Joined at the current position: no notification is sent twice or skipped
                    # (this runs on the loop thread, between notifications).
                    pos = self.positions.get(m.topic, 0)
                    await ws.send_str(
                        msgspec.json.encode(
                            {"type": "subscribed", "topic": m.topic, "id": m.id, "epoch": "naive", "pos": pos}
                        ).decode()
                    )
        finally:
            for t in topics:
                self.subscribers.get(t, set()).discard(ws)
        return ws

    async def main(self, port: int, pipe: Connection) -> None:
        app = web.Application()
        app.router.add_get("/ws", self.ws)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        conn = await asyncpg.connect(self.dsn)
        await conn.add_listener(CHANNEL, self.on_notify)
        sender = asyncio.create_task(self.broadcast())
        loop = asyncio.get_running_loop()
        pipe.send(("listening",))
        try:
            while True:
                cmd = await loop.run_in_executor(None, pipe.recv)
                if cmd[0] == "stop":
                    return
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            await conn.close()
            await runner.cleanup()


def naive_main(dsn: str, port: int, pipe: Connection) -> None:
    """Entry point of the naive server's process (spawned)."""
    from .sysinfo import raise_nofile

    raise_nofile()
    server = Naive(dsn)
    try:
        import uvloop

        uvloop.run(server.main(port, pipe))
    except ImportError:
        asyncio.run(server.main(port, pipe))
