"""Client processes: each runs many aiohttp WebSocket clients and checks every stream it gets.

A client knows exactly which events it must see: every position of its topic after the
``pos`` of its ``subscribed`` ack, up to the head the parent reads from ``gateway.topics``
once the writers stop. The gateway delivers each topic in position order, so a client keeps
only its last position: the next event must be ``last + 1``; anything at or below ``last`` is
a duplicate, anything above ``last + 1`` skipped positions that are counted as lost.

The parent talks to a process over a Pipe:

    child -> ("ready", [setup errors], connected)
    parent -> ("sync", {topic: head}, timeout)   child -> ("synced", behind, samples)
    parent -> ("finish", {topic: head}, timeout) child -> ("result", per-client rows, samples)

``samples`` are the latencies measured since the previous reply (receive time, latency), as
bytes of two ``array('d')``, so the parent can compute percentiles over every delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import SynchronizedArray
from typing import Any

import aiohttp
import msgspec

CONNECT_CONCURRENCY = 32  # upgrades in flight per process: above it the listen backlog overflows
# Progress counters each process publishes in its slot of a shared array.
C_CONNECTED, C_RECEIVED, C_ERRORS, C_RECONNECTS, C_REFUSED = range(5)
N_COUNTERS = 5
# How long a client keeps retrying an upgrade the gateway refuses for now (HTTP 503 with
# Retry-After: GATEWAY_CONNECT_RATE, or a full replica), as a real client would.
CONNECT_PATIENCE = 60.0


class Row(msgspec.Struct):
    sent_at: float = 0.0


class Frame(msgspec.Struct):
    """The fields of any server frame a load test client looks at (here, and the storm's and
    the crowd's clients); the rest is ignored."""

    type: str
    topic: str | None = None
    pos: int | None = None
    epoch: str | None = None
    recovered: bool | None = None
    row: Row | None = None
    code: str | None = None
    message: str | None = None


decode_frame = msgspec.json.Decoder(Frame).decode


@dataclass
class ProcSpec:
    url: str
    secret: str
    clients: list[tuple[str, str]]  # (user, topic); topic "" = no subscription (floor)
    mode: str  # live | idle | churn | floor
    churn_life: tuple[float, float] = (1.0, 3.0)  # seconds a churning connection lives
    index: int = 0


@dataclass
class ClientState:
    user: str
    topic: str
    epoch: str = ""
    ack: int = 0  # position of the first subscribed ack
    last: int = 0
    received: int = 0
    lost: int = 0
    dup: int = 0
    reconnects: int = 0
    not_recovered: int = 0
    errors: list[str] = field(default_factory=list)
    ws: aiohttp.ClientWebSocketResponse | None = None


class Worker:
    def __init__(self, spec: ProcSpec, counters: SynchronizedArray[int]) -> None:
        self.spec = spec
        self.counters = counters
        self.base = spec.index * N_COUNTERS
        self.clients = [ClientState(u, t) for u, t in spec.clients]
        self.rt = array("d")  # receive time of each event (unix seconds)
        self.lat = array("d")  # receive time - sent_at written in the row by the writer
        self.stopping = False  # set by finish: readers return, sockets are closed
        self.churning = True  # churn clients reconnect until finish
        self.connect_done = 0  # first connection attempts finished (ok or failed)
        self.session: aiohttp.ClientSession | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self._received = 0

    def count(self, which: int, n: int = 1) -> None:
        self.counters[self.base + which] += n

    def token(self, user: str) -> str:
        from gateway.auth import mint_token

        return mint_token(self.spec.secret, user, ttl=3600, topics=["t:*"])

    # --- one event --------------------------------------------------------------------

    def on_event(self, c: ClientState, f: Frame, now: float) -> None:
        pos = f.pos or 0
        if pos <= c.last:
            c.dup += 1
            return
        if pos > c.last + 1:
            c.lost += pos - c.last - 1  # the gateway delivers in order: skipped positions are lost
        c.last = pos
        c.received += 1
        self._received += 1
        if f.row is not None:
            self.rt.append(now)
            self.lat.append(now - f.row.sent_at)

    # --- connecting -------------------------------------------------------------------

    async def connect(self, c: ClientState, since: bool) -> None:
        """Open the socket (token in the upgrade request), then subscribe; replays are checked too."""
        assert self.session is not None
        headers = {"Authorization": "Bearer " + self.token(c.user)} if self.spec.mode != "floor" else {}
        deadline = time.monotonic() + CONNECT_PATIENCE
        while True:
            try:
                ws = await self.session.ws_connect(
                    self.spec.url,
                    headers=headers,
                    max_msg_size=0,
                    autoping=True,
                    timeout=aiohttp.ClientWSTimeout(30),
                )
                break
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status != 503 or time.monotonic() > deadline:
                    raise
                self.count(C_REFUSED)
                retry_after = float(exc.headers.get("Retry-After", "1")) if exc.headers else 1.0
                await asyncio.sleep(retry_after * random.uniform(0.5, 1.5))
        c.ws = ws
        if self.spec.mode == "floor":
            return
        first = decode_frame((await ws.receive(timeout=30)).data)
        if first.type != "welcome":
            raise RuntimeError(f"expected welcome, got {first}")
        msg: dict[str, Any] = {"type": "subscribe", "topic": c.topic, "id": 1}
        if since:
            msg["since"] = {"epoch": c.epoch, "pos": c.last}
        await ws.send_str(msgspec.json.encode(msg).decode())
        while True:
            m = await ws.receive(timeout=30)
            if m.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"socket closed while subscribing: {m.type.name} {m.data!r}")
            now = time.time()
            f = decode_frame(m.data)
            if f.type == "event":
                self.on_event(c, f, now)  # a replay on resume
            elif f.type == "subscribed":
                if not since:
                    c.epoch, c.ack, c.last = f.epoch or "", f.pos or 0, f.pos or 0
                elif not f.recovered:
                    c.not_recovered += 1
                    c.errors.append(f"resume not recovered at pos {c.last}")
                return
            elif f.type == "error":
                raise RuntimeError(f"subscribe refused: {f.code}: {f.message}")

    async def read(self, c: ClientState, until: float | None) -> None:
        """Read events until the socket closes, ``until`` passes (churn), or we stop."""
        ws = c.ws
        assert ws is not None
        while not self.stopping:
            timeout = None if until is None else until - time.monotonic()
            if timeout is not None and timeout <= 0:
                return
            try:
                m = await ws.receive(timeout=timeout)
            except TimeoutError:
                return
            if m.type != aiohttp.WSMsgType.TEXT:
                if not self.stopping and m.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                ):
                    c.errors.append(f"socket closed by the server: {ws.close_code} {m.extra!r}")
                    self.count(C_ERRORS)
                return
            f = decode_frame(m.data)
            if f.type == "event":
                self.on_event(c, f, time.time())
            elif f.type == "error":
                c.errors.append(f"error frame: {f.code}: {f.message}")
                self.count(C_ERRORS)

    async def run_client(self, c: ClientState, sem: asyncio.Semaphore, ready: asyncio.Event) -> None:
        try:
            async with sem:
                await self.connect(c, since=False)
            self.count(C_CONNECTED)
        except Exception as exc:
            c.ws = None
            c.errors.append(f"connect: {type(exc).__name__}: {exc}")
            self.count(C_ERRORS)
            return
        finally:
            self.connect_done += 1
        if self.spec.mode != "churn":
            await self.read(c, None)
            return
        # Churn: after the whole fleet is up, close and resume with `since` again and again.
        await ready.wait()
        lo, hi = self.spec.churn_life
        rng = random.Random(c.user)
        while not self.stopping:
            if not self.churning:
                await self.read(c, None)  # finish: stay connected and read up to the head
                return
            await self.read(c, time.monotonic() + rng.uniform(lo, hi))
            if self.stopping or not self.churning:
                continue
            assert c.ws is not None
            with contextlib.suppress(Exception):
                await c.ws.close()
            try:
                async with sem:
                    await self.connect(c, since=True)
                c.reconnects += 1
                self.count(C_RECONNECTS)
            except Exception as exc:
                c.errors.append(f"reconnect: {type(exc).__name__}: {exc}")
                self.count(C_ERRORS)
                await asyncio.sleep(0.2)

    # --- talking to the parent --------------------------------------------------------

    def take_samples(self) -> tuple[bytes, bytes]:
        out = (self.rt.tobytes(), self.lat.tobytes())
        self.rt, self.lat = array("d"), array("d")
        return out

    async def wait_heads(self, heads: dict[str, int], timeout: float) -> int:
        """Wait until every client reached its topic's head; returns how many did not."""
        deadline = time.monotonic() + timeout
        while True:
            behind = sum(
                1 for c in self.clients if c.ws is not None and c.topic and c.last < heads.get(c.topic, 0)
            )
            if behind == 0 or time.monotonic() >= deadline:
                return behind
            await asyncio.sleep(0.05)

    async def main(self, pipe: Connection) -> None:
        loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        self.session = aiohttp.ClientSession(connector=connector)
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
        ready = asyncio.Event()
        self.tasks = [asyncio.create_task(self.run_client(c, sem, ready)) for c in self.clients]
        counter = asyncio.create_task(self._publish_counts())
        # Wait until every client is connected (or failed): bounded by the connect timeouts.
        while self.connect_done < len(self.clients):
            await asyncio.sleep(0.05)
        setup_errors = [e for c in self.clients for e in c.errors]
        pipe.send(("ready", setup_errors[:20], sum(1 for c in self.clients if c.ws is not None)))
        ready.set()
        try:
            while True:
                cmd = await loop.run_in_executor(None, pipe.recv)
                if cmd[0] == "sync":
                    behind = await self.wait_heads(cmd[1], cmd[2])
                    pipe.send(("synced", behind, *self.take_samples()))
                elif cmd[0] == "finish":
                    await self._finish(pipe, cmd[1], cmd[2])
                    return
        finally:
            counter.cancel()
            for t in self.tasks:
                t.cancel()
            await asyncio.gather(*self.tasks, counter, return_exceptions=True)
            await self.session.close()

    async def _finish(self, pipe: Connection, heads: dict[str, int], timeout: float) -> None:
        self.churning = False  # no more reconnects; readers keep reading until the head
        behind = await self.wait_heads(heads, timeout)
        self.stopping = True
        for c in self.clients:
            if c.ws is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.ws.close(), 2)
        rows = []
        for c in self.clients:
            head = heads.get(c.topic, 0)
            lost = c.lost + max(0, head - c.last) if c.topic else c.lost
            rows.append(
                {
                    "user": c.user,
                    "topic": c.topic,
                    "ack": c.ack,
                    "last": c.last,
                    "head": head,
                    "expected": max(0, head - c.ack),
                    "received": c.received,
                    "lost": lost,
                    "dup": c.dup,
                    "reconnects": c.reconnects,
                    "not_recovered": c.not_recovered,
                    "errors": c.errors[:5],
                }
            )
        pipe.send(("result", rows, behind, *self.take_samples()))

    async def _publish_counts(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self.counters[self.base + C_RECEIVED] = self._received


def child_main(spec: ProcSpec, pipe: Connection, counters: SynchronizedArray[int]) -> None:
    """Entry point of a client process (spawned)."""
    from .sysinfo import raise_nofile

    raise_nofile()
    worker = Worker(spec, counters)
    try:
        import uvloop

        uvloop.run(worker.main(pipe))
    except ImportError:
        asyncio.run(worker.main(pipe))
