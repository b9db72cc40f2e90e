"""The "rooms" scenario: clients talking in rooms while the row path runs beside them.

``rooms`` rooms of ``room_size`` clients each. Every client subscribes to its room (``room:N``)
and to the room's presence (``presence:room:N``), tracks a state there, then publishes one
ephemeral message a second to the room (each reaches the room's every member, the sender
included: ``rooms x room_size^2`` deliveries a second, 10,000 at 100 x 10) and tracks a new
state every ``room_presence_every`` seconds. Meanwhile the row path runs as in the other
scenarios: writers commit rows on one topic with ``room_row_clients`` subscribers.

Measured, on one gateway (presence on, ``workers`` processes, so messages also cross between
worker processes on the replica bus):

1. the row path alone (the baseline: its p99 commit-to-client latency);
2. the row path again with the rooms load: room deliveries/s, publish->receive latency (the
   sender's clock in the message, the receiver's at arrival: one machine, one clock),
   messages lost (every member must receive every message the gateway acknowledged while
   it was subscribed: 0 expected without faults; ephemeral messages are best effort, so a
   loss is reported, not hidden), duplicates, the gateway's CPU per delivery, and the row
   path's p99 / its value alone (the bar: <= 1.5).

The room clients are processes of their own (``room_main``), spoken to over a Pipe:

    child -> ("ready", [setup errors], connected)
    parent -> ("warm", seconds)                 child -> ("warmed", clients deaf, error frames)
    parent -> ("go", seconds, presence_every)   child -> ("done", stats, rt bytes, lat bytes)
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import random
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from . import db
from .fleet import Fleet
from .gw import SECRET, GatewayProcess
from .stats import histogram, latency_summary, time_series
from .sysinfo import cpu_seconds, loadavg

if TYPE_CHECKING:
    from .scenarios import Runner

CONNECT_CONCURRENCY = 32  # upgrades in flight per process (as loadtest/clients.py)
DRAIN_SECONDS = 3.0  # after the last publish, how long a process waits for messages in flight
# Before measuring, every client publishes a warm-up message twice a second for this long, not
# counted: the scenario measures the steady state, not the first second of worker processes
# that just started (their bus connections, their first reads of each other's registration,
# gateway/bus.py). Whether every client then heard every member of its room is reported.
WARMUP_SECONDS = 3.0
ROW_TOPIC = "t:rowpath"
# The row path's p99 with the rooms load may be this many times its p99 alone (issue #22).
P99_RATIO_LIMIT = 1.5
# Below this scale the bar's rooms lines are n/a: the numbers are printed, but a few clients
# for a second or two measure start-up and scheduling noise.
BAR_ROOMS, BAR_ROOM_SIZE = 100, 10


class MessageData(msgspec.Struct):
    """What a room client publishes: its clock at sending, its sequence number, its index."""

    t: float = 0.0
    s: int = 0
    c: int = -1


class Frame(msgspec.Struct):
    """The fields of a server frame a room client looks at."""

    type: str
    topic: str | None = None
    id: int | None = None
    data: MessageData | None = None
    code: str | None = None
    message: str | None = None


_decode = msgspec.json.Decoder(Frame).decode
_encode = msgspec.json.Encoder().encode


@dataclass
class RoomSpec:
    url: str
    secret: str
    clients: list[tuple[int, str]]  # (client index, room topic)
    room_size: int = 1


@dataclass
class RoomClient:
    index: int
    room: str
    ws: aiohttp.ClientWebSocketResponse | None = None
    next_id: int = 10
    first_measured_id: int = 1 << 62  # requests above this id are the measured publishes
    sent: int = 0  # publishes sent
    acked: int = 0  # publishes the gateway answered "published"
    tracks: int = 0
    last: dict[int, int] = field(default_factory=dict)  # sender index -> last sequence received
    received: int = 0
    dup: int = 0
    presence_frames: int = 0
    heard: set[int] = field(default_factory=set)  # members whose warm-up message arrived
    errors: Counter[str] = field(default_factory=Counter)


class RoomWorker:
    def __init__(self, spec: RoomSpec) -> None:
        self.spec = spec
        self.clients = [RoomClient(i, room) for i, room in spec.clients]
        self.rt = array("d")  # receive time of each message
        self.lat = array("d")  # receive time - the sender's time in the message
        self.publishing = False
        self.session: aiohttp.ClientSession | None = None

    def token(self, c: RoomClient) -> str:
        from gateway.auth import mint_token

        # Read and publish in every room (its presence topic is read with the room's access).
        return mint_token(self.spec.secret, f"u{c.index}", ttl=3600, topics=["room:*"], publish=["room:*"])

    async def send(self, c: RoomClient, frame: dict[str, Any]) -> None:
        assert c.ws is not None
        await c.ws.send_str(_encode(frame).decode())

    async def connect(self, c: RoomClient) -> None:
        """Open, subscribe to the room and its presence, track: every answer awaited."""
        assert self.session is not None
        headers = {"Authorization": "Bearer " + self.token(c)}
        c.ws = await self.session.ws_connect(
            self.spec.url, headers=headers, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(30)
        )
        first = _decode((await c.ws.receive(timeout=30)).data)
        if first.type != "welcome":
            raise RuntimeError(f"expected welcome, got {first}")
        await self.send(c, {"type": "subscribe", "topic": c.room, "id": 1})
        await self.send(c, {"type": "subscribe", "topic": f"presence:{c.room}", "id": 2})
        await self.send(c, {"type": "track", "topic": c.room, "state": {"n": 0}, "id": 3})
        waiting = {1, 2, 3}
        while waiting:
            m = await c.ws.receive(timeout=30)
            if m.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"socket closed while joining {c.room}: {m.type.name} {m.data!r}")
            f = _decode(m.data)
            if f.type == "error":
                raise RuntimeError(f"{f.code}: {f.message} (request {f.id})")
            if f.id in waiting and f.type in ("subscribed", "tracked"):
                waiting.discard(f.id)
            self.on_frame(c, f, time.time())

    def on_frame(self, c: RoomClient, f: Frame, now: float) -> None:
        if f.type == "message" and f.data is not None:
            d = f.data
            if d.s == 0:  # a warm-up message: not counted
                c.heard.add(d.c)
                return
            last = c.last.get(d.c, 0)
            if d.s <= last:
                c.dup += 1
                return
            c.last[d.c] = d.s
            c.received += 1
            self.rt.append(now)
            self.lat.append(now - d.t)
        elif f.type == "published":
            # (a warm-up message's ack is not counted; a measured one's may come after the end)
            c.acked += (f.id or 0) > c.first_measured_id
        elif f.type == "presence":
            c.presence_frames += 1
        elif f.type == "error":
            c.errors[str(f.code)] += 1

    async def read(self, c: RoomClient) -> None:
        assert c.ws is not None
        async for m in c.ws:
            if m.type != aiohttp.WSMsgType.TEXT:
                break
            self.on_frame(c, _decode(m.data), time.time())
        if self.publishing:
            c.errors[f"closed {c.ws.close_code}"] += 1

    async def talk(self, c: RoomClient, seconds: float, presence_every: float) -> None:
        """One message a second (random phase), a new state every ``presence_every`` seconds."""
        rng = random.Random(c.index)
        start = time.monotonic()
        next_msg = start + rng.uniform(0, 1.0)
        next_track = start + rng.uniform(0, presence_every)
        end = start + seconds
        while True:
            now = time.monotonic()
            at = min(next_msg, next_track)
            if at >= end:
                return
            if at > now:
                await asyncio.sleep(at - now)
            if next_msg <= next_track:
                c.sent += 1
                c.next_id += 1
                data = {"t": time.time(), "s": c.sent, "c": c.index}
                await self.send(c, {"type": "publish", "topic": c.room, "data": data, "id": c.next_id})
                next_msg += 1.0
            else:
                c.tracks += 1
                c.next_id += 1
                await self.send(
                    c, {"type": "track", "topic": c.room, "state": {"n": c.tracks}, "id": c.next_id}
                )
                next_track += presence_every

    async def warm_up(self, live: list[RoomClient], seconds: float) -> None:
        """Warm-up messages (sequence 0) twice a second from every client, then a pause."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for c in live:
                c.next_id += 1
                data = {"t": time.time(), "s": 0, "c": c.index}
                await self.send(c, {"type": "publish", "topic": c.room, "data": data, "id": c.next_id})
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)

    async def main(self, pipe: Connection) -> None:
        loop = asyncio.get_running_loop()
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
        setup_errors: list[str] = []

        async def join(c: RoomClient) -> None:
            try:
                async with sem:
                    await self.connect(c)
            except Exception as exc:
                setup_errors.append(f"u{c.index} {c.room}: {type(exc).__name__}: {exc}")
                if c.ws is not None:
                    await c.ws.close()
                c.ws = None

        readers: list[asyncio.Task[None]] = []
        try:
            await asyncio.gather(*(join(c) for c in self.clients))
            live = [c for c in self.clients if c.ws is not None]
            readers = [asyncio.create_task(self.read(c)) for c in live]
            pipe.send(("ready", setup_errors[:20], len(live)))
            cmd = await loop.run_in_executor(None, pipe.recv)
            if cmd[0] != "warm":
                return
            await self.warm_up(live, cmd[1])
            # how many clients did not hear every member of their room, and what went wrong
            deaf = sum(1 for c in live if len(c.heard) < self.spec.room_size)
            pipe.send(("warmed", deaf, sum(sum(c.errors.values()) for c in live)))
            for c in live:
                c.errors.clear()
            cmd = await loop.run_in_executor(None, pipe.recv)
            if cmd[0] != "go":
                return
            _, seconds, presence_every = cmd
            for c in live:
                c.first_measured_id = c.next_id
            self.publishing = True
            t0 = time.time()
            await asyncio.gather(*(self.talk(c, seconds, presence_every) for c in live))
            t1 = time.time()
            self.publishing = False
            # Messages in flight: wait until nothing more arrives (bounded).
            deadline = time.monotonic() + DRAIN_SECONDS
            seen = -1
            while time.monotonic() < deadline:
                now_seen = sum(c.received + c.acked for c in live)
                if now_seen == seen:
                    break
                seen = now_seen
                await asyncio.sleep(0.5)
            stats = {
                "t0": t0,
                "t1": t1,
                "clients": [
                    {
                        "index": c.index,
                        "room": c.room,
                        "connected": c.ws is not None,
                        "sent": c.sent,
                        "acked": c.acked,
                        "tracks": c.tracks,
                        "received": c.received,
                        "dup": c.dup,
                        "presence_frames": c.presence_frames,
                        "errors": dict(c.errors),
                    }
                    for c in self.clients
                ],
            }
            pipe.send(("done", stats, self.rt.tobytes(), self.lat.tobytes()))
        finally:
            for c in self.clients:
                if c.ws is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(c.ws.close(), 2)
            for t in readers:
                t.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            await self.session.close()


def room_main(spec: RoomSpec, pipe: Connection) -> None:
    """Entry point of a room client process (spawned)."""
    from .sysinfo import raise_nofile

    raise_nofile()
    worker = RoomWorker(spec)
    try:
        import uvloop

        uvloop.run(worker.main(pipe))
    except ImportError:
        asyncio.run(worker.main(pipe))


class RoomFleet:
    """The room clients, ``rooms x room_size``, spread round-robin over ``procs`` processes."""

    def __init__(self, url: str, rooms: int, room_size: int, procs: int) -> None:
        clients = [(r * room_size + k, f"room:{r}") for r in range(rooms) for k in range(room_size)]
        self.n = len(clients)
        procs = max(1, min(procs, self.n))
        self.specs = [RoomSpec(url, SECRET, clients[i::procs], room_size) for i in range(procs)]
        self.pipes: list[Connection] = []
        self.procs: list[mp.process.BaseProcess] = []
        self.rt = array("d")
        self.lat = array("d")

    async def _recv(self, i: int, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if await loop.run_in_executor(None, self.pipes[i].poll, 0.2):
                return self.pipes[i].recv()
            if not self.procs[i].is_alive():
                raise RuntimeError(f"room client process {i} died with exit code {self.procs[i].exitcode}")
            if loop.time() > deadline:
                raise RuntimeError(f"room client process {i} did not answer within {timeout:.0f}s")

    async def start(self, timeout: float) -> None:
        ctx = mp.get_context("spawn")
        for spec in self.specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=room_main, args=(spec, child), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)
        connected, errors = 0, []
        for i in range(len(self.specs)):
            kind, errs, n = await self._recv(i, timeout)
            assert kind == "ready"
            connected += n
            errors += errs
        if connected < self.n:
            raise RuntimeError(
                f"only {connected} of {self.n} room clients joined; first errors: {errors[:3]}"
            )

    async def warm_up(self, seconds: float) -> tuple[int, int]:
        """Every process's warm-up; returns the clients that did not hear every member of their
        room, and the error frames they got meanwhile."""
        for pipe in self.pipes:
            pipe.send(("warm", seconds))
        deaf = errors = 0
        for i in range(len(self.pipes)):
            kind, d, e = await self._recv(i, seconds + 60)
            assert kind == "warmed"
            deaf += d
            errors += e
        return deaf, errors

    def go(self, seconds: float, presence_every: float) -> None:
        for pipe in self.pipes:
            pipe.send(("go", seconds, presence_every))

    async def done(self, timeout: float) -> list[dict[str, Any]]:
        stats = []
        for i in range(len(self.pipes)):
            kind, s, rt, lat = await self._recv(i, timeout)
            assert kind == "done"
            stats.append(s)
            self.rt.frombytes(rt)
            self.lat.frombytes(lat)
        return stats

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs if p.pid is not None)

    def stop(self) -> None:
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for pipe in self.pipes:
            pipe.close()


def tally(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Messages expected and received, per room: every member (connected throughout) must
    receive every message of its room that the gateway acknowledged, its own included."""
    clients = [c for s in stats for c in s["clients"] if c["connected"]]
    members: Counter[str] = Counter(c["room"] for c in clients)
    acked: Counter[str] = Counter()
    for c in clients:
        acked[c["room"]] += c["acked"]
    expected = sum(acked[room] * n for room, n in members.items())
    received = sum(c["received"] for c in clients)
    errors: Counter[str] = Counter()
    for c in clients:
        errors.update(c["errors"])
    return {
        "sent": sum(c["sent"] for c in clients),
        "acked": sum(acked.values()),
        "expected": expected,
        "received": received,
        # More received than expected cannot happen (duplicates are counted apart); a message
        # acked after the last one counted is still in flight, which the drain bounds.
        "lost": max(0, expected - received),
        "duplicated": sum(c["dup"] for c in clients),
        "tracks": sum(c["tracks"] for c in clients),
        "presence_frames": sum(c["presence_frames"] for c in clients),
        "errors": dict(errors),
        "t0": min(s["t0"] for s in stats),
        "t1": max(s["t1"] for s in stats),
    }


async def run_rooms(runner: Runner) -> dict[str, Any]:
    """The scenario: the row path alone, then with the rooms load, on one gateway."""
    p = runner.plan
    progress = runner.progress
    gw = GatewayProcess(runner.dsn, p.workers, runner.out / "gateway-rooms.log", presence=True)
    progress(f"[rooms] starting gateway ({p.workers} workers, presence on)")
    await gw.start()
    row_clients = [(f"rp{i}", ROW_TOPIC) for i in range(p.room_row_clients)]
    rooms_fleet: RoomFleet | None = None
    try:
        rows = Fleet(gw.ws_url, SECRET, row_clients, 1, "live")
        try:
            await rows.start(120, lambda s: progress(f"[rooms] row clients {s}"))

            # 1. The row path alone.
            cpu_a0, t_a0 = gw.cpu(), time.time()
            w_alone = await runner._write("rooms: rows alone", rows, [ROW_TOPIC], p.room_row_rate, p.duration)
            behind = await rows.sync(await db.heads(runner.dsn, [ROW_TOPIC]), p.sync_timeout)
            # the gateway's CPU per second for the rows alone: subtracted below to cost the rooms
            rows_cpu_per_s = (gw.cpu() - cpu_a0) / max(1e-9, time.time() - t_a0)
            alone_lat = array("d", rows.samples.lat)
            mark = len(rows.samples.lat)

            # 2. The same with the rooms load.
            rooms_fleet = RoomFleet(gw.ws_url, p.rooms, p.room_size, p.room_procs)
            progress(f"[rooms] {p.rooms} rooms x {p.room_size} clients joining")
            await rooms_fleet.start(300)
            progress(f"[rooms] warming up for {WARMUP_SECONDS:g} s")
            warmup_deaf, warmup_errors = await rooms_fleet.warm_up(WARMUP_SECONDS)
            cpu0, t0 = gw.cpu(), time.time()
            ccpu0 = rooms_fleet.cpu() + rows.cpu()
            rooms_fleet.go(p.duration, p.room_presence_every)
            w = await runner._write("rooms: rows + rooms", rows, [ROW_TOPIC], p.room_row_rate, p.duration)
            stats = await rooms_fleet.done(p.duration + DRAIN_SECONDS + 60)
            heads = await db.heads(runner.dsn, [ROW_TOPIC])
            behind += await rows.sync(heads, p.sync_timeout)
            cpu1, t1 = gw.cpu(), time.time()
            ccpu1 = rooms_fleet.cpu() + rows.cpu()
            row_results, _ = await rows.finish(heads, 5)
        finally:
            rows.stop()
    finally:
        if rooms_fleet is not None:
            rooms_fleet.stop()
        await gw.stop()

    t = tally(stats)
    with_lat = rows.samples.lat[mark:]
    row_alone, row_with = latency_summary(alone_lat), latency_summary(with_lat)
    ratio = (
        round(row_with["p99"] / row_alone["p99"], 3)
        if row_alone["p99"] and row_with["p99"] is not None
        else None
    )
    msg_seconds = max(1e-9, t["t1"] - t["t0"])
    row_deliveries = len(with_lat)
    cpu = cpu1 - cpu0
    rooms_cpu = max(0.0, cpu - rows_cpu_per_s * (t1 - t0))
    deliveries = t["received"] + row_deliveries
    row_lost = sum(r["lost"] for r in row_results)
    return {
        "scenario": "rooms",
        "rooms": p.rooms,
        "room_size": p.room_size,
        "clients": rooms_fleet.n if rooms_fleet else 0,
        "row_clients": len(row_clients),
        "workers": p.workers,
        "warmup_seconds": WARMUP_SECONDS,
        "warmup_clients_not_hearing_every_member": warmup_deaf,
        "warmup_error_frames": warmup_errors,
        "publish_seconds": round(msg_seconds, 2),
        "messages_sent": t["sent"],
        "messages_acked": t["acked"],
        "messages_per_s": round(t["acked"] / msg_seconds, 1),
        "message_deliveries": t["received"],
        "expected_message_deliveries": t["expected"],
        # the summary's columns: room deliveries, publish->receive latency
        "deliveries": t["received"],
        "deliveries_per_s": round(t["received"] / msg_seconds, 1),
        "latency_ms": latency_summary(rooms_fleet.lat if rooms_fleet else []),
        "messages_lost": t["lost"],
        "row_events_lost": row_lost,
        "lost": t["lost"] + row_lost,
        "duplicated": t["duplicated"] + sum(r["dup"] for r in row_results),
        "not_recovered": sum(r["not_recovered"] for r in row_results),
        "behind_at_end": behind,
        "publish_errors": t["errors"],
        "presence_updates_sent": t["tracks"],
        "presence_frames_received": t["presence_frames"],
        "commits": w.commits,
        "commits_per_s": round(w.rate, 1),
        "row_commits_alone": w_alone.commits,
        "row_latency_alone_ms": row_alone,
        "row_latency_with_rooms_ms": row_with,
        "row_p99_ratio": ratio,
        "gateway_cpu_s": round(cpu, 3),
        # every delivery of the measured phase: room messages and row events
        "gateway_cpu_us_per_delivery": round(cpu / deliveries * 1e6, 3) if deliveries else None,
        # the same less what the rows alone cost per second, over the room messages alone
        "rooms_cpu_us_per_message_delivery": round(rooms_cpu / t["received"] * 1e6, 3)
        if t["received"]
        else None,
        "client_cpu_s": round(ccpu1 - ccpu0, 2),
        "loadavg": loadavg(),
        "series": time_series(rooms_fleet.rt, rooms_fleet.lat, [], t["t0"]) if rooms_fleet else {},
        "histogram": histogram(rooms_fleet.lat if rooms_fleet else []),
        "measured_seconds": round(t1 - t0, 2),
    }


def bar_lines(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The rooms lines of the bar (report.evaluate_bar adds them)."""
    s = r.get("scenarios", {}).get("rooms")
    if not s:
        return [
            {
                "criterion": "rooms: row path p99 with rooms load / alone",
                "value": None,
                "limit": f"<= {P99_RATIO_LIMIT}",
                "verdict": "n/a",
                "detail": "rooms not run",
            }
        ]
    full = s["rooms"] >= BAR_ROOMS and s["room_size"] >= BAR_ROOM_SIZE
    ratio = s.get("row_p99_ratio")
    verdict = "n/a" if ratio is None or not full else ("PASS" if ratio <= P99_RATIO_LIMIT else "FAIL")
    alone, with_ = s["row_latency_alone_ms"]["p99"], s["row_latency_with_rooms_ms"]["p99"]
    return [
        {
            "criterion": "rooms: row path p99 with rooms load / alone",
            "value": ratio,
            "limit": f"<= {P99_RATIO_LIMIT} at {BAR_ROOMS} rooms x {BAR_ROOM_SIZE}",
            "verdict": verdict,
            "detail": f"row p99 {alone} ms alone, {with_} ms beside {s['rooms']} rooms x {s['room_size']} "
            f"clients ({s['deliveries_per_s']:,.0f} message deliveries/s, publish->receive p99 "
            f"{s['latency_ms']['p99']} ms, {s['messages_lost']} messages lost)"
            + ("" if full else f" (below {BAR_ROOMS} x {BAR_ROOM_SIZE}: indicative only)"),
        }
    ]
