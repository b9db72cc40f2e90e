"""The "storm" scenario: one of two replicas drained while writes go on; its clients move.

    python -m loadtest.storm                               # 10,000 clients
    python -m loadtest.storm --clients 200 --seconds 2     # as the smoke test
    python -m loadtest --scenario storm                    # the same inside `make loadtest`

Two replicas (``gateway serve --workers 1`` each, product defaults: ``GATEWAY_CONNECT_RATE``
500/s, ``GATEWAY_DRAIN_TIMEOUT`` 10 s) behind HAProxy configured as deploy/haproxy.cfg
(leastconn, /readyz health checks every 2 s with 500 ms after a failure, ``retries 3`` and
``option redispatch``). HAProxy holds two sockets per client and may open no more than
20,000 files here, so there is one HAProxy per 5,000 clients, as a deployment with several
load balancers has. Clients (:mod:`loadtest.wsclient`, in processes of their own, each from a
source address of its own) subscribe, each to one of ``--topics`` topics, and behave like the
embeddable client (gateway.js): on close code 1012 they reconnect after a random 0-0.5 s, on
a failed attempt (an upgrade refused with 503, a refused connection) after a random delay
doubling from 0.5 s up to 20 s, and resubscribe with ``since`` = the last position they saw.

A writer commits ``--rate`` rows a second round robin over the topics the whole time. After a
warm-up one replica gets SIGTERM. Measured: the time from the SIGTERM until 99 % and 100 % of
its clients were resubscribed on the other replica; ``recovered: true`` on every resume;
lost / duplicated events (0 and 0); the p99 commit-to-client latency of the surviving
replica's own clients (those never closed) before and during the storm.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import functools
import io
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import time
from array import array
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec

from gateway.dev.pgcluster import free_port

from . import db
from .clients import decode_frame
from .gw import SECRET, GatewayProcess
from .procpool import ClientProcesses
from .stats import latency_summary
from .sysinfo import loadavg, raise_nofile
from .wsclient import WSConn, upgrade_request

PER_HAPROXY = 5_000  # clients per HAProxy: two sockets each, under the 20,000 open files here
PER_PROCESS = 5_000  # clients per client process
CONNECT_CONCURRENCY = 64
BACKOFF, BACKOFF_CAP = 0.5, 20.0  # gateway.js's BACKOFF_MS and BACKOFF_CAP_MS
# counters per client process: connected now, closed by the server, resubscribed after a
# close, resumes with recovered != true, failed attempts (retried)
C_UP, C_CLOSED, C_RESUB, C_NOT_RECOVERED, C_FAILED = range(5)
N_COUNTERS = 5


@dataclass
class Size:
    clients: int = 10_000
    topics: int = 100
    rate: float = 50.0  # commits/s over the topics, the whole time
    warmup: float = 10.0  # seconds of writes before the SIGTERM
    after: float = 3.0  # seconds of writes after the last client resubscribed
    storm_timeout: float = 120.0  # at most this long from SIGTERM to everyone resubscribed
    sync_timeout: float = 60.0

    def client_procs(self) -> int:
        return max(2, math.ceil(self.clients / PER_PROCESS))

    def haproxies(self) -> int:
        return max(1, math.ceil(self.clients / PER_HAPROXY))


SMOKE = Size(clients=200, topics=10, rate=20.0, warmup=2.0, after=1.0, storm_timeout=40.0, sync_timeout=20.0)


def haproxy_config(port: int, stats_port: int, backends: list[int], maxconn: int) -> str:
    """deploy/haproxy.cfg's settings, with 127.0.0.1 servers instead of Docker's DNS."""
    servers = "\n".join(f"    server g{i} 127.0.0.1:{p} check" for i, p in enumerate(backends))
    return f"""
global
    maxconn {maxconn}
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout tunnel 1h
    timeout client-fin 30s
    timeout server-fin 30s
    retries 3
    option redispatch
frontend gateway
    bind 127.0.0.1:{port}
    default_backend gateways
frontend stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
backend gateways
    balance leastconn
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host gateway
    http-check expect status 200
    default-server inter 2s fastinter 500ms downinter 2s fall 2 rise 2 maxconn 20000
{servers}
"""


class HAProxy:
    def __init__(self, path: str, backends: list[int], maxconn: int, cfg: Path, log: Path) -> None:
        self.port, self.stats_port = free_port(), free_port()
        cfg.write_text(haproxy_config(self.port, self.stats_port, backends, maxconn))
        with open(log, "ab") as out:
            # -db: stay in the foreground, so stopping this process stops HAProxy.
            self.proc = subprocess.Popen([path, "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT)
        self.log = log

    async def wait_up(self, servers: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"haproxy exited: {self.log.read_text()[-2000:]}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with s.get(f"http://127.0.0.1:{self.stats_port}/stats;csv") as r:
                        rows = csv.DictReader(io.StringIO((await r.text()).lstrip("# ")))
                        up = [x for x in rows if x["pxname"] == "gateways" and x["status"] == "UP"]
                        if len([x for x in up if x["svname"] != "BACKEND"]) == servers:
                            return
                if time.monotonic() > deadline:
                    raise RuntimeError("haproxy did not see every replica up")
                await asyncio.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --- the client process --------------------------------------------------------------------


class Client:
    __slots__ = (
        "ack",
        "attempt",
        "closed_at",
        "closes",
        "codes",
        "conn",
        "dup",
        "epoch",
        "last",
        "lost",
        "moved",
        "not_recovered",
        "received",
        "resubscribed_at",
        "topic",
        "user",
        "waiter",
    )  # fmt: skip

    def __init__(self, user: str, topic: str) -> None:
        self.user, self.topic = user, topic
        self.epoch = ""
        self.ack = self.last = self.lost = self.dup = self.received = 0
        self.waiter: asyncio.Future[str] | None = None
        self.conn: WSConn | None = None
        self.closes = 0
        self.closed_at = 0.0
        self.resubscribed_at: list[float] = []
        self.not_recovered = 0
        self.attempt = 0
        self.codes: list[int | None] = []
        self.moved = False  # closed by the server at least once: a client of the drained replica


class StormClients:
    def __init__(self, users: list[tuple[str, str]], index: int, counters: Any) -> None:
        self.clients = [Client(u, t) for u, t in users]
        self.counters = counters
        self.base = index * N_COUNTERS
        # every event: receive time, latency, the client's index
        self.rt, self.lat, self.who = array("d"), array("d"), array("i")
        self.errors: list[str] = []
        self.stopping = False
        self.host, self.port, self.src, self.secret = "", 0, "", ""
        self.tasks: set[asyncio.Task[None]] = set()

    def count(self, which: int, n: int = 1) -> None:
        self.counters[self.base + which] += n

    def _error(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)

    def on_open(self, conn: WSConn) -> None:
        pass

    def on_text(self, conn: WSConn, payload: bytes) -> None:
        c: Client = self.clients[conn.index]
        f = decode_frame(payload)
        if f.type == "event":
            pos = f.pos or 0
            if pos <= c.last:
                c.dup += 1
                return
            if pos > c.last + 1:
                c.lost += pos - c.last - 1
            c.last = pos
            c.received += 1
            if f.row is not None:
                now = time.time()
                self.rt.append(now)
                self.lat.append(now - f.row.sent_at)
                self.who.append(conn.index)
        elif f.type == "welcome":
            msg: dict[str, Any] = {"type": "subscribe", "topic": c.topic, "id": 1}
            if c.epoch:
                msg["since"] = {"epoch": c.epoch, "pos": c.last}
            conn.send_text(msgspec.json.encode(msg))
        elif f.type == "subscribed":
            if not c.epoch:
                c.epoch, c.ack, c.last = f.epoch or "", f.pos or 0, f.pos or 0
            elif f.recovered is not True:
                c.not_recovered += 1
                self.count(C_NOT_RECOVERED)
            if c.waiter is not None and not c.waiter.done():
                c.waiter.set_result("ok")
        elif f.type == "error":
            self._error(f"{c.user}: error frame {f.code}: {f.message}")

    def on_refused(self, conn: WSConn, status: int, retry_after: float | None) -> None:
        c = self.clients[conn.index]
        if c.waiter is not None and not c.waiter.done():
            c.waiter.set_result(f"refused {status}")

    def on_closed(self, conn: WSConn, code: int | None) -> None:
        c = self.clients[conn.index]
        if c.waiter is not None and not c.waiter.done():
            c.waiter.set_result(f"closed {code}")
        elif c.conn is conn and not self.stopping:
            # An established connection closed by the server (or the balancer): reconnect.
            c.conn = None
            c.closes += 1
            c.moved = True
            c.closed_at = time.time()
            c.codes.append(code)
            self.count(C_UP, -1)
            self.count(C_CLOSED)
            if code == 1012:
                c.attempt = 0  # gateway.js: a restart starts the backoff from its first step
            t = asyncio.get_running_loop().create_task(self._reconnect(c, conn.index))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def _attempt(self, c: Client, i: int) -> str:
        from gateway.auth import mint_token

        loop = asyncio.get_running_loop()
        request = upgrade_request(
            f"{self.host}:{self.port}", "/ws", mint_token(self.secret, c.user, ttl=7200, topics=["t:*"])
        )
        c.waiter = loop.create_future()
        try:
            _, conn = await loop.create_connection(
                functools.partial(WSConn, self, request, i), self.host, self.port, local_addr=(self.src, 0)
            )
        except OSError as exc:
            return f"failed {type(exc).__name__}: {exc}"
        try:
            result = await asyncio.wait_for(c.waiter, 15)
        except TimeoutError:
            conn.abort()
            return "failed: no subscribed within 15 s"
        if result == "ok":
            c.conn = conn
            self.count(C_UP)
        return result

    async def _reconnect(self, c: Client, i: int) -> None:
        while not self.stopping:
            await asyncio.sleep(random.uniform(0, min(BACKOFF_CAP, BACKOFF * 2**c.attempt)))
            c.attempt += 1
            if self.stopping:
                return
            result = await self._attempt(c, i)
            if result == "ok":
                c.resubscribed_at.append(time.time())
                self.count(C_RESUB)
                return
            self.count(C_FAILED)

    async def connect(self, host: str, port: int, src: str, secret: str) -> dict[str, Any]:
        self.host, self.port, self.src, self.secret = host, port, src, secret
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
        t0 = time.time()

        async def first(i: int) -> None:
            c = self.clients[i]
            for _ in range(60):
                async with sem:
                    result = await self._attempt(c, i)
                if result == "ok":
                    return
                self.count(C_FAILED)
                await asyncio.sleep(random.uniform(0.5, 1.5))
            self._error(f"{c.user}: could not connect: {result}")

        await asyncio.gather(*(first(i) for i in range(len(self.clients))))
        return {
            "started": t0,
            "ended": time.time(),
            "connected": sum(1 for c in self.clients if c.conn is not None),
            "errors": self.errors[:10],
        }

    async def sync(self, heads: dict[str, int], timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            behind = sum(1 for c in self.clients if c.last < heads.get(c.topic, 0))
            if behind == 0 or time.monotonic() > deadline:
                return behind
            await asyncio.sleep(0.1)

    def close(self, heads: dict[str, int]) -> dict[str, Any]:
        self.stopping = True
        for t in self.tasks:
            t.cancel()
        out: dict[str, Any] = {"lost": 0, "duplicated": 0, "received": 0, "expected": 0}
        for c in self.clients:
            head = heads.get(c.topic, c.last)
            out["lost"] += c.lost + max(0, head - c.last)
            out["duplicated"] += c.dup
            out["received"] += c.received
            out["expected"] += max(0, head - c.ack)
            if c.conn is not None:
                c.conn.abort()
                c.conn = None
        moved = [c for c in self.clients if c.moved]
        out["moved"] = len(moved)
        out["closed_twice"] = sum(1 for c in moved if c.closes > 1)
        out["not_recovered"] = sum(c.not_recovered for c in self.clients)
        out["close_codes"] = sorted({str(code) for c in moved for code in c.codes})
        out["closed_at"] = [c.closed_at for c in moved]
        # the first resubscription after the first close: when this client was served again
        out["resubscribed_at"] = [c.resubscribed_at[0] if c.resubscribed_at else -1.0 for c in moved]
        stayed = array("b", (0 if c.moved else 1 for c in self.clients))
        keep = array("d")
        keep_lat = array("d")
        moved_rt, moved_lat = array("d"), array("d")
        for when, lat, who in zip(self.rt, self.lat, self.who, strict=True):
            if stayed[who]:
                keep.append(when)
                keep_lat.append(lat)
            else:
                moved_rt.append(when)
                moved_lat.append(lat)
        out["stayed_rt"], out["stayed_lat"] = keep.tobytes(), keep_lat.tobytes()
        out["moved_rt"], out["moved_lat"] = moved_rt.tobytes(), moved_lat.tobytes()
        out["errors"] = self.errors[:10]
        return out


async def _child(users: list[tuple[str, str]], index: int, pipe: Connection, counters: Any) -> None:
    loop = asyncio.get_running_loop()
    clients = StormClients(users, index, counters)
    while True:
        try:
            cmd = await loop.run_in_executor(None, pipe.recv)
        except EOFError:
            cmd = ("exit",)
        if cmd[0] == "connect":
            pipe.send(await clients.connect(*cmd[1:]))
        elif cmd[0] == "sync":
            pipe.send(await clients.sync(cmd[1], cmd[2]))
        elif cmd[0] == "close":
            pipe.send(clients.close(cmd[1]))
        else:
            clients.close({})
            return


def child_main(users: list[tuple[str, str]], index: int, pipe: Connection, counters: Any) -> None:
    raise_nofile()
    try:
        import uvloop

        uvloop.run(_child(users, index, pipe, counters))
    except ImportError:
        asyncio.run(_child(users, index, pipe, counters))


# --- the parent -----------------------------------------------------------------------------


class Clients(ClientProcesses):
    def __init__(self, users: list[tuple[str, str]], procs: int) -> None:
        super().__init__("storm", child_main, users, procs, N_COUNTERS, poll=0.1)


class Writer:
    """``rate`` commits/s round robin over ``topics`` until stopped."""

    def __init__(self, dsn: str, topics: list[str], rate: float) -> None:
        self.dsn, self.topics, self.rate = dsn, topics, rate
        self.commits = 0
        self._stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            start = time.monotonic()
            while not self._stop.is_set():
                await conn.execute(
                    "INSERT INTO lt_items (topic, sent_at, body) VALUES ($1, $2, $3)",
                    self.topics[self.commits % len(self.topics)],
                    time.time(),
                    db.BODY,
                )
                self.commits += 1
                ahead = self.commits / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        finally:
            await conn.close()

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self.task is not None:
            await self.task


def _percentile_time(times: list[float], q: float) -> float | None:
    """The time by which a fraction q of the clients were resubscribed (nearest rank)."""
    if not times:
        return None
    s = sorted(times)
    return round(s[max(0, math.ceil(q * len(s)) - 1)], 2)


def _window(rt: array[float], lat: array[float], lo: float, hi: float) -> dict[str, Any]:
    return latency_summary(array("d", (x for t, x in zip(rt, lat, strict=True) if lo <= t <= hi)))


async def run(dsn: str, size: Size, out: Path, progress: Any) -> dict[str, Any]:
    """The scenario; ``dsn`` is a prepared database (db.prepare). Needs haproxy on PATH."""
    path = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/bin")
    if path is None:
        raise RuntimeError("haproxy not found (Debian package haproxy): the storm scenario needs it")
    raise_nofile()
    n = size.clients
    topic_names = [f"s{i}" for i in range(size.topics)]
    users = [(f"storm{i}", f"t:s{i % size.topics}") for i in range(n)]
    replicas = [GatewayProcess(dsn, 1, out / f"gateway-storm-{i}.log") for i in range(2)]
    for gw in replicas:
        gw.env["GATEWAY_MAX_CONNECTIONS"] = "20000"
        gw.env["GATEWAY_MAX_CONNECTIONS_PER_USER"] = "20"
    haproxies: list[HAProxy] = []
    clients: Clients | None = None
    writer: Writer | None = None
    result: dict[str, Any] = {
        "scenario": "storm",
        "clients": n,
        "topics": size.topics,
        "rate_target": size.rate,
    }
    try:
        progress("[storm] starting two replicas and HAProxy")
        await asyncio.gather(*(gw.start(60) for gw in replicas))
        per = math.ceil(n / size.haproxies())
        for i in range(size.haproxies()):
            haproxies.append(
                HAProxy(
                    path,
                    [gw.port for gw in replicas],
                    per + 500,
                    out / f"haproxy-{i}.cfg",
                    out / f"haproxy-{i}.log",
                )
            )
        await asyncio.gather(*(h.wait_up(2) for h in haproxies))
        procs = size.client_procs()
        clients = Clients(users, procs)
        t = time.time()

        def show_connect() -> None:
            assert clients is not None
            up = clients.count(C_UP)
            progress(f"[storm] connected {up:,}/{n:,} ({up / max(time.time() - t, 1e-9):,.0f}/s)")

        cmds = [
            ("connect", "127.0.0.1", haproxies[i % len(haproxies)].port, f"127.0.0.{50 + i}", SECRET)
            for i in range(procs)
        ]
        answers = await clients.ask(cmds, 600, show_connect)
        connected = sum(a["connected"] for a in answers)
        if connected < n:
            raise RuntimeError(
                f"only {connected} of {n} connected: {[e for a in answers for e in a['errors']][:3]}"
            )
        result["connect_seconds"] = round(
            max(a["ended"] for a in answers) - min(a["started"] for a in answers), 1
        )
        progress.done(
            f"[storm] {n:,} clients subscribed through {len(haproxies)} HAProxy in {result['connect_seconds']} s"
        )
        writer = Writer(dsn, topic_names, size.rate)
        writer.start()
        t_start = time.time()
        await asyncio.sleep(size.warmup)
        drained = replicas[0]  # the other one survives
        assert drained.proc is not None
        t_sig = time.time()
        drained.proc.send_signal(signal.SIGTERM)
        progress(f"[storm] SIGTERM sent to replica {drained.port}")
        deadline = time.monotonic() + size.storm_timeout
        while True:
            closed, done = clients.count(C_CLOSED), clients.count(C_RESUB)
            gone = drained.proc.poll() is not None
            progress(
                f"[storm] {time.time() - t_sig:5.1f}s after SIGTERM: closed {closed:,}, resubscribed {done:,}, "
                f"failed attempts {clients.count(C_FAILED):,}, drained replica {'exited' if gone else 'draining'}"
            )
            if gone and closed and done >= closed:
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        t_all = time.time()
        drain_exit = drained.proc.returncode
        await asyncio.sleep(size.after)
        await writer.stop()
        t_end = time.time()
        heads = await db.heads(dsn, [f"t:{x}" for x in topic_names])
        behind = sum(await clients.ask([("sync", heads, size.sync_timeout)] * procs, size.sync_timeout + 30))
        answers = await clients.ask([("close", heads)] * procs, 120)
    finally:
        if writer is not None and writer.task is not None and not writer.task.done():
            await writer.stop()
        if clients is not None:
            clients.stop()
        for h in haproxies:
            h.stop()
        await asyncio.gather(*(gw.stop() for gw in replicas))
    resub = [r - t_sig for a in answers for r in a["resubscribed_at"] if r >= 0]
    moved = sum(a["moved"] for a in answers)
    stayed_rt, stayed_lat, moved_rt, moved_lat = array("d"), array("d"), array("d"), array("d")
    for a in answers:
        stayed_rt.frombytes(a["stayed_rt"])
        stayed_lat.frombytes(a["stayed_lat"])
        moved_rt.frombytes(a["moved_rt"])
        moved_lat.frombytes(a["moved_lat"])
    t100 = max(resub, default=0.0)
    received = sum(a["received"] for a in answers)
    result.update(
        client_processes=procs,
        haproxies=len(haproxies),
        commits=writer.commits if writer else 0,
        commits_per_s=round((writer.commits if writer else 0) / max(t_end - t_start, 1e-9), 1),
        deliveries=received,
        expected_deliveries=sum(a["expected"] for a in answers),
        moved=moved,
        resubscribed=len(resub),
        not_resubscribed=moved - len(resub),
        resubscribed_99pct_s=_percentile_time(resub, 0.99),
        resubscribed_100pct_s=round(t100, 2) if resub else None,
        storm_complete=moved > 0 and len(resub) == moved,
        storm_seconds_waited=round(t_all - t_sig, 1),
        drained_replica_exit_code=drain_exit,
        close_codes=sorted({c for a in answers for c in a["close_codes"]}),
        closed_twice=sum(a["closed_twice"] for a in answers),
        not_recovered=sum(a["not_recovered"] for a in answers),
        lost=sum(a["lost"] for a in answers),
        duplicated=sum(a["duplicated"] for a in answers),
        behind_at_end=behind,
        # The survivor's own clients (never closed): before the SIGTERM, and from it until the
        # last moved client was resubscribed.
        latency_ms=_window(stayed_rt, stayed_lat, t_sig, t_sig + t100),
        survivor_latency_ms_before=_window(stayed_rt, stayed_lat, t_start, t_sig),
        survivor_latency_ms_during=_window(stayed_rt, stayed_lat, t_sig, t_sig + t100),
        moved_latency_ms_after=_window(moved_rt, moved_lat, t_sig + t100, t_end),
        client_errors=[e for a in answers for e in a["errors"]][:10],
        loadavg=loadavg(),
    )
    return result


# --- standalone -----------------------------------------------------------------------------


class _Progress:
    def __call__(self, text: str) -> None:
        print(text, flush=True)

    def done(self, text: str) -> None:
        print(text, flush=True)


async def _main(args: argparse.Namespace, size: Size) -> int:
    from gateway.dev.pgcluster import start_throwaway

    args.out.mkdir(parents=True, exist_ok=True)
    server = await asyncio.to_thread(start_throwaway, fast=False)
    try:
        dsn = server.dsn("postgres")
        await db.prepare(dsn)
        r = await run(dsn, size, args.out, _Progress())
    finally:
        await asyncio.to_thread(server.stop)
    (args.out / "storm.json").write_text(json.dumps(r, indent=1) + "\n")
    print(json.dumps(r, indent=1))
    bad = r["lost"] or r["duplicated"] or r["not_recovered"] or r["behind_at_end"] or not r["storm_complete"]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.storm", description=__doc__.split("\n\n")[0])
    d = Size()
    ap.add_argument("--clients", type=int, default=d.clients)
    ap.add_argument("--topics", type=int, default=d.topics)
    ap.add_argument("--rate", type=float, default=d.rate, help="commits/s")
    ap.add_argument("--seconds", type=float, default=d.warmup, help="seconds of writes before the SIGTERM")
    ap.add_argument("--out", type=Path, default=Path("loadtest/report"))
    args = ap.parse_args(argv)
    small = args.clients <= 1000
    size = Size(
        clients=args.clients,
        topics=min(args.topics, args.clients),
        rate=args.rate,
        warmup=args.seconds,
        after=SMOKE.after if small else d.after,
        storm_timeout=SMOKE.storm_timeout if small else d.storm_timeout,
        sync_timeout=SMOKE.sync_timeout if small else d.sync_timeout,
    )
    try:
        import uvloop

        return int(uvloop.run(_main(args, size)))
    except ImportError:
        return asyncio.run(_main(args, size))


if __name__ == "__main__":
    sys.exit(main())
