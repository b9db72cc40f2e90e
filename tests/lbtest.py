"""Replicas behind a real HAProxy: its configuration, its view of the replicas, and a client
that stays subscribed through the load balancer across reconnects (test_cluster.py,
test_rolling_upgrade.py)."""

from __future__ import annotations

import asyncio
import csv
import io
import random
import shutil

import aiohttp

from gateway.protocol import RECONNECT_AFTER

from .gwtest import Client, Closed, token

HAPROXY = shutil.which("haproxy")


def haproxy_config(port: int, stats_port: int, backends: list[int]) -> str:
    servers = "\n".join(
        f"    server g{i} 127.0.0.1:{p} check inter 200ms fall 1 rise 2" for i, p in enumerate(backends)
    )
    return f"""
global
    maxconn 2000
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
frontend ws
    bind 127.0.0.1:{port}
    default_backend gateways
frontend stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
backend gateways
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
{servers}
"""


class ResumingClient:
    """Stays subscribed to one topic through reconnects, resuming from the last position."""

    def __init__(self, url: str, user: str, topic: str) -> None:
        self.url, self.user, self.topic = url, user, topic
        self.positions: list[int] = []
        self.epoch: str | None = None
        self.start: int | None = None  # position of the first ack: events after it are owed
        self.reconnects = 0
        self.not_recovered = 0
        self.closes: list[int | None] = []
        self.versions: list[str | None] = []  # welcome's version each time; None from one without it
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            c = Client(self.url)
            try:
                await c.open()
                welcome = await c.auth(token(self.user, topics=["room:*"]))
                self.versions.append(welcome.get("version"))
                since = (
                    (self.epoch, self.positions[-1] if self.positions else self.start) if self.epoch else None
                )
                ack = await c.subscribe(self.topic, since=since)  # type: ignore[arg-type]
                if self.epoch is None:
                    self.epoch, self.start = ack["epoch"], ack["pos"]
                elif ack.get("recovered") is not True:
                    self.not_recovered += 1
                for e in ack["events"]:
                    self.positions.append(e["pos"])
                while not self._stop.is_set():
                    try:
                        frame = await c.recv(timeout=0.5)
                    except TimeoutError:
                        # Quiet is not a failure (no writes, or no relay while its lease
                        # passes to another replica): stay connected, check for stop.
                        continue
                    if frame["type"] == "event":
                        self.positions.append(frame["pos"])
            except Closed as exc:
                self.closes.append(exc.code)
                assert exc.code is None or exc.code in RECONNECT_AFTER or exc.code == 1006, exc
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass  # the load balancer had no healthy replica for a moment: retry
            finally:
                await c.close()
            if not self._stop.is_set():
                self.reconnects += 1
                await asyncio.sleep(random.uniform(0.05, 0.3))

    def stop(self) -> None:
        self._stop.set()


async def haproxy_status(stats_port: int) -> dict[str, str]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{stats_port}/stats;csv") as r:
        text = await r.text()
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    return {row["svname"]: row["status"] for row in rows if row["pxname"] == "gateways"}
