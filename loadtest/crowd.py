"""The "crowd" scenario: tens of thousands of authenticated connections on one machine.

    python -m loadtest.crowd                                  # 50,000 connections, 3 workers
    python -m loadtest.crowd --connections 300 --seconds 3    # a few seconds, as the smoke test
    python -m loadtest --scenario crowd                       # the same inside `make loadtest`

``gateway serve --workers 3`` (``GATEWAY_MAX_CONNECTIONS`` at its default, 20,000 per process)
and client processes of :mod:`loadtest.wsclient` connections, each process connecting from a
source address of its own (127.0.0.10, .11, ...): one source address has about 28,000
ephemeral ports (``net.ipv4.ip_local_port_range``), fewer than the crowd needs. Every
connection authenticates with its own user's token and subscribes to one topic: nearly all to
one broadcast topic that gets one commit a second, a few (``--user-topics``) each to a topic of
its own that gets commits too. Measured: the connect rate with ``GATEWAY_CONNECT_RATE`` at its
default (500/s per process), the gateway's RSS per connection, commit-to-client latency of the
fan-out and of the per-user events, and lost / duplicated events (must be 0); then, with a
fresh gateway whose ``GATEWAY_CONNECT_RATE`` is raised (``--raised-connect-rate``), the connect
rate again (connect, then close: no writes).

Every process started here ends by itself: clients after ``close``/``exit`` from the parent (or
when the parent's pipe closes), the gateway on SIGINT, and ``Fleet``-like joins are bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import random
import sys
import time
from array import array
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import SynchronizedArray
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from . import db
from .clients import decode_frame
from .gw import SECRET, GatewayProcess
from .procpool import ClientProcesses
from .stats import latency_summary
from .sysinfo import loadavg, raise_nofile, rss_kb
from .wsclient import WSConn, upgrade_request

BROADCAST = "crowd"  # lt_items.topic: the gateway's topic is 't:crowd'
PER_PROCESS = 15_000  # connections per client process: under the 20,000 open files allowed here
CONNECT_CONCURRENCY = 32  # handshakes in flight per client process
CONNECT_PATIENCE = 180.0  # seconds a connection keeps retrying upgrades refused with 503
# counters per client process in a shared array: connected, refused (503, retried), failed,
# attempts that timed out or failed and were retried
N_COUNTERS = 4


@dataclass
class Size:
    connections: int = 50_000
    workers: int = 3
    procs: int = 0  # 0: one per PER_PROCESS connections, at least 3
    seconds: float = 20.0  # of writes (one broadcast commit a second)
    user_topics: int = 20  # connections on a topic of their own
    user_rate: float = 10.0  # commits/s over the per-user topics
    raised_connect_rate: int = 5000  # GATEWAY_CONNECT_RATE of the second connect
    sync_timeout: float = 60.0

    def client_procs(self) -> int:
        return self.procs or max(3, math.ceil(self.connections / PER_PROCESS))


SMOKE = Size(connections=300, seconds=3.0, user_topics=5, user_rate=5.0, sync_timeout=20.0)


# --- the client process --------------------------------------------------------------------


class Client:
    __slots__ = ("ack", "conn", "dup", "fan", "last", "lost", "received", "topic", "user", "waiter")

    def __init__(self, user: str, topic: str) -> None:
        self.user, self.topic = user, topic
        self.fan = topic == "t:" + BROADCAST
        self.ack = self.last = self.lost = self.dup = self.received = 0
        self.waiter: asyncio.Future[str] | None = None
        self.conn: WSConn | None = None


class CrowdClients:
    """One client process: its share of the connections, and what each of them saw."""

    def __init__(self, users: list[tuple[str, str]], index: int, counters: SynchronizedArray[int]) -> None:
        self.clients = [Client(u, t) for u, t in users]
        self.counters = counters
        self.base = index * N_COUNTERS
        self.lat_fan, self.lat_user = array("d"), array("d")
        self.errors: list[str] = []
        self.subscribe = [
            msgspec.json.encode({"type": "subscribe", "topic": c.topic, "id": 1}) for c in self.clients
        ]

    def _error(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)

    # wsclient's callbacks
    def on_open(self, conn: WSConn) -> None:
        pass

    def on_text(self, conn: WSConn, payload: bytes) -> None:
        c: Client = conn.data
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
                (self.lat_fan if c.fan else self.lat_user).append(time.time() - f.row.sent_at)
        elif f.type == "welcome":
            conn.send_text(self.subscribe[conn.index])
        elif f.type == "subscribed":
            c.ack = c.last = f.pos or 0
            if c.waiter is not None and not c.waiter.done():
                c.waiter.set_result("ok")
        elif f.type == "error":
            self._error(f"{c.user}: error frame {f.code}: {f.message}")

    def on_refused(self, conn: WSConn, status: int, retry_after: float | None) -> None:
        c: Client = conn.data
        if c.waiter is not None and not c.waiter.done():
            c.waiter.set_result(f"refused {status} {retry_after or 1.0}")

    def on_closed(self, conn: WSConn, code: int | None) -> None:
        c: Client = conn.data
        if c.waiter is not None and not c.waiter.done():
            c.waiter.set_result(f"closed {code}")
        elif c.conn is conn:
            self._error(f"{c.user}: closed by the server ({code})")
            c.conn = None

    # connecting
    async def _open(
        self, i: int, host: str, port: int, src: str, secret: str, sem: asyncio.Semaphore
    ) -> None:
        from gateway.auth import mint_token

        loop = asyncio.get_running_loop()
        c = self.clients[i]
        c.ack = c.last = c.lost = c.dup = c.received = 0
        deadline = time.monotonic() + CONNECT_PATIENCE
        while True:
            async with sem:
                request = upgrade_request(
                    f"{host}:{port}", "/ws", mint_token(secret, c.user, ttl=7200, topics=["t:*"])
                )
                c.waiter = loop.create_future()
                conn: WSConn | None = None
                try:
                    _, conn = await loop.create_connection(
                        functools.partial(WSConn, self, request, i, c), host, port, local_addr=(src, 0)
                    )
                    result = await asyncio.wait_for(c.waiter, 60)
                except (OSError, TimeoutError) as exc:
                    result = f"failed {type(exc).__name__}: {exc}"
                    if conn is not None:
                        conn.abort()
                        conn = None
            if result == "ok":
                c.conn = conn
                self.counters[self.base] += 1
                return
            if result.startswith("refused 503") and time.monotonic() < deadline:
                self.counters[self.base + 1] += 1
                # As a client would: after Retry-After, spread so retries do not come back together.
                await asyncio.sleep(float(result.split()[2]) * random.uniform(0.5, 1.5))
                continue
            if result.startswith("failed") and time.monotonic() < deadline:
                # No answer in time (a gateway starved of CPU) or a refused connection: a real
                # client tries again after a while; counted, and reported with the first errors.
                self.counters[self.base + 3] += 1
                self._error(f"{c.user}: {result} (retried)")
                await asyncio.sleep(random.uniform(1.0, 3.0))
                continue
            self.counters[self.base + 2] += 1
            self._error(f"{c.user}: {result}")
            return

    async def connect(self, host: str, port: int, src: str, secret: str) -> dict[str, Any]:
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
        self.errors = []
        t0 = time.time()
        await asyncio.gather(*(self._open(i, host, port, src, secret, sem) for i in range(len(self.clients))))
        return {
            "started": t0,
            "ended": time.time(),
            "connected": sum(1 for c in self.clients if c.conn is not None),
            "errors": self.errors[:10],
        }

    async def sync(self, heads: dict[str, int], timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            behind = sum(1 for c in self.clients if c.conn is not None and c.last < heads.get(c.topic, 0))
            if behind == 0 or time.monotonic() > deadline:
                return behind
            await asyncio.sleep(0.1)

    def close(self, heads: dict[str, int]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "lost": 0,
            "duplicated": 0,
            "received": 0,
            "expected": 0,
            "closed_by_server": 0,
        }
        for c in self.clients:
            head = heads.get(c.topic, c.last)
            out["lost"] += c.lost + max(0, head - c.last)
            out["duplicated"] += c.dup
            out["received"] += c.received
            out["expected"] += max(0, head - c.ack)
            if c.conn is None:
                out["closed_by_server"] += 1
            else:
                c.conn.abort()
                c.conn = None
        out["errors"] = self.errors[:10]
        out["lat_fan"], out["lat_user"] = self.lat_fan.tobytes(), self.lat_user.tobytes()
        self.lat_fan, self.lat_user = array("d"), array("d")
        return out


async def _child(users: list[tuple[str, str]], index: int, pipe: Connection, counters: Any) -> None:
    loop = asyncio.get_running_loop()
    clients = CrowdClients(users, index, counters)
    while True:
        try:
            cmd = await loop.run_in_executor(None, pipe.recv)
        except EOFError:
            cmd = ("exit",)  # the parent went away: drop everything and end
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


class Crowd(ClientProcesses):
    """The client processes, spawned once and used for every connect of the scenario."""

    def __init__(self, users: list[tuple[str, str]], procs: int) -> None:
        super().__init__("crowd", child_main, users, procs, N_COUNTERS, poll=0.2)


async def _connect_all(
    crowd: Crowd, gw: GatewayProcess, first_src: int, name: str, progress: Any
) -> dict[str, Any]:
    crowd.reset_counts()
    n_procs = len(crowd.procs)
    t = time.time()

    def show() -> None:
        el = time.time() - t
        ok = crowd.count(0)
        progress(
            f"[{name}] connected {ok:,} ({ok / max(el, 1e-9):,.0f}/s), refused and retried "
            f"{crowd.count(1):,}, failed {crowd.count(2):,}"
        )

    cmds = [("connect", "127.0.0.1", gw.port, f"127.0.0.{first_src + i}", SECRET) for i in range(n_procs)]
    # Bounded, but long enough for this machine's slowest measured rate (about 100/s).
    n = sum(len(u) for u in crowd.users)
    answers = await crowd.ask(cmds, CONNECT_PATIENCE + 120 + n / 50, show)
    started = min(a["started"] for a in answers)
    ended = max(a["ended"] for a in answers)
    connected = sum(a["connected"] for a in answers)
    return {
        "connected": connected,
        "connect_seconds": round(ended - started, 2),
        "connects_per_s": round(connected / max(ended - started, 1e-9), 1),
        "refused_and_retried": crowd.count(1),
        "failed": crowd.count(2),
        "timed_out_and_retried": crowd.count(3),
        "errors": [e for a in answers for e in a["errors"]][:10],
    }


async def _write(dsn: str, seconds: float, user_topics: list[str], user_rate: float) -> dict[str, Any]:
    """One broadcast commit a second, and ``user_rate`` commits/s round robin over the per-user topics."""
    conn = await asyncpg.connect(dsn)
    sql = "INSERT INTO lt_items (topic, sent_at, body) VALUES ($1, $2, $3)"
    fan = user = 0
    try:
        start = time.monotonic()
        while (el := time.monotonic() - start) < seconds:
            if fan <= el:  # the broadcast's k-th commit is due at k seconds
                await conn.execute(sql, BROADCAST, time.time(), db.BODY)
                fan += 1
            elif user_topics and user < el * user_rate:
                await conn.execute(sql, user_topics[user % len(user_topics)], time.time(), db.BODY)
                user += 1
            else:
                nxt = min(fan, (user + 1) / user_rate if user_topics else fan)
                await asyncio.sleep(max(0.0, nxt - (time.monotonic() - start)))
    finally:
        await conn.close()
    return {"broadcast_commits": fan, "user_commits": user, "seconds": round(time.monotonic() - start, 2)}


def _worker_rss(gw: GatewayProcess) -> list[int]:
    return [rss_kb(pid) for pid in gw.worker_pids()]


def _gateway(dsn: str, size: Size, out: Path, name: str, connect_rate: int | None) -> GatewayProcess:
    gw = GatewayProcess(dsn, size.workers, out / f"gateway-{name}.log")
    # The product's limits, not the harness's: 20,000 connections per process, 20 per user
    # (each connection here is a user of its own).
    gw.env["GATEWAY_MAX_CONNECTIONS"] = "20000"
    gw.env["GATEWAY_MAX_CONNECTIONS_PER_USER"] = "20"
    if connect_rate is None:
        gw.env.pop("GATEWAY_CONNECT_RATE", None)
    else:
        gw.env["GATEWAY_CONNECT_RATE"] = str(connect_rate)
    return gw


async def run(dsn: str, size: Size, out: Path, progress: Any) -> dict[str, Any]:
    """The scenario; ``dsn`` is a prepared database (db.prepare)."""
    soft, hard = raise_nofile()
    n, procs = size.connections, size.client_procs()
    per_proc = math.ceil(n / procs)
    per_worker = math.ceil(n / size.workers)
    if per_proc + 200 > soft or per_worker > 20_000:
        raise RuntimeError(
            f"{n:,} connections need about {per_proc + 200:,} open files per client process "
            f"(limit here {soft:,}, hard {hard:,}) and at most 20,000 per gateway worker "
            f"({per_worker:,} with {size.workers}): raise the limit or pass more --procs / --workers"
        )
    k = min(size.user_topics, n)
    users = [(f"crowd{i}", f"t:u{i}" if i < k else "t:" + BROADCAST) for i in range(n)]
    user_topics = [f"u{i}" for i in range(k)]
    topics = sorted({t for _, t in users})
    result: dict[str, Any] = {
        "scenario": "crowd",
        "clients": n,
        "workers": size.workers,
        "client_processes": procs,
        "per_user_topics": k,
        "nofile_limit": [soft, hard],
    }
    crowd = Crowd(users, procs)
    try:
        # 1. GATEWAY_CONNECT_RATE at its default: connect, hold, write, check.
        gw = _gateway(dsn, size, out, "crowd", None)
        progress(f"[crowd] starting gateway ({size.workers} workers)")
        await gw.start(60)
        try:
            await asyncio.sleep(1.0)
            rss0 = _worker_rss(gw)
            c = await _connect_all(crowd, gw, 10, "crowd", progress)
            if c["connected"] < n:
                raise RuntimeError(f"only {c['connected']:,} of {n:,} connected: {c['errors'][:3]}")
            progress.done(
                f"[crowd] {n:,} connected in {c['connect_seconds']} s ({c['connects_per_s']:,}/s, "
                f"GATEWAY_CONNECT_RATE default), {c['refused_and_retried']:,} upgrades refused and retried"
            )
            await asyncio.sleep(3.0)  # pending writes flushed, buffers freed
            rss1 = _worker_rss(gw)
            cpu0, t0 = gw.cpu(), time.time()
            load0 = loadavg()
            progress(f"[crowd] writing for {size.seconds:.0f} s")
            w = await _write(dsn, size.seconds, user_topics, size.user_rate)
            heads = await db.heads(dsn, topics)
            behind = sum(
                await crowd.ask([("sync", heads, size.sync_timeout)] * procs, size.sync_timeout + 60)
            )
            cpu = gw.cpu() - cpu0
            wall = time.time() - t0
            answers = await crowd.ask([("close", heads)] * procs, 120)
        finally:
            await gw.stop()
        lat_fan, lat_user = array("d"), array("d")
        for a in answers:
            lat_fan.frombytes(a["lat_fan"])
            lat_user.frombytes(a["lat_user"])
        deliveries = sum(a["received"] for a in answers)
        result.update(
            connect_default=c,
            gateway_rss_before_kb=rss0,
            gateway_rss_after_connect_kb=rss1,
            connections_per_worker_approx=round(n / size.workers),
            kb_per_connection=round((sum(rss1) - sum(rss0)) / n, 2),
            writes=w,
            commits=w["broadcast_commits"] + w["user_commits"],
            commits_per_s=round((w["broadcast_commits"] + w["user_commits"]) / w["seconds"], 1),
            deliveries=deliveries,
            expected_deliveries=sum(a["expected"] for a in answers),
            deliveries_per_s=round(deliveries / max(wall, 1e-9), 1),
            latency_ms=latency_summary(lat_fan),
            latency_ms_per_user_topics=latency_summary(lat_user),
            lost=sum(a["lost"] for a in answers),
            duplicated=sum(a["duplicated"] for a in answers),
            behind_at_end=behind,
            closed_by_server=sum(a["closed_by_server"] for a in answers),
            client_errors=[e for a in answers for e in a["errors"]][:10],
            gateway_cpu_s=round(cpu, 2),
            gateway_cpu_us_per_delivery=round(cpu / deliveries * 1e6, 2) if deliveries else None,
            loadavg=load0,
        )
        # 2. GATEWAY_CONNECT_RATE raised: a fresh gateway, connect everyone again, close.
        # Other source addresses: the first connect's ports may still be in TIME_WAIT.
        gw = _gateway(dsn, size, out, "crowd-raised", size.raised_connect_rate)
        progress(f"[crowd] starting gateway with GATEWAY_CONNECT_RATE={size.raised_connect_rate}")
        await gw.start(60)
        try:
            await asyncio.sleep(1.0)
            c2 = await _connect_all(crowd, gw, 10 + procs, "crowd raised", progress)
            await crowd.ask([("close", {})] * procs, 120)
        finally:
            await gw.stop()
        c2["gateway_connect_rate"] = size.raised_connect_rate
        result["connect_raised"] = c2
        progress.done(
            f"[crowd] again with GATEWAY_CONNECT_RATE={size.raised_connect_rate}: {c2['connected']:,} in "
            f"{c2['connect_seconds']} s ({c2['connects_per_s']:,}/s)"
        )
    finally:
        crowd.stop()
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
    (args.out / "crowd.json").write_text(json.dumps(r, indent=1) + "\n")
    print(json.dumps({k: v for k, v in r.items() if k != "client_errors"}, indent=1))
    return 1 if r["lost"] or r["duplicated"] or r["behind_at_end"] else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.crowd", description=__doc__.split("\n\n")[0])
    d = Size()
    ap.add_argument("--connections", type=int, default=d.connections)
    ap.add_argument("--workers", type=int, default=d.workers)
    ap.add_argument(
        "--procs", type=int, default=0, help="client processes (default: 1 per 15,000, at least 3)"
    )
    ap.add_argument("--seconds", type=float, default=d.seconds, help="seconds of writes")
    ap.add_argument("--user-topics", type=int, default=d.user_topics)
    ap.add_argument("--raised-connect-rate", type=int, default=d.raised_connect_rate)
    ap.add_argument("--out", type=Path, default=Path("loadtest/report"))
    args = ap.parse_args(argv)
    size = Size(
        connections=args.connections,
        workers=args.workers,
        procs=args.procs,
        seconds=args.seconds,
        user_topics=args.user_topics,
        raised_connect_rate=args.raised_connect_rate,
        sync_timeout=d.sync_timeout if args.connections > 1000 else 20.0,
    )
    try:
        import uvloop

        return int(uvloop.run(_main(args, size)))
    except ImportError:
        return asyncio.run(_main(args, size))


if __name__ == "__main__":
    sys.exit(main())
