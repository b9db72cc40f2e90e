"""Test helpers: a real gateway (in this process or as a subprocess) and a protocol client.

``running_gateway(dsn, **settings)``: the aiohttp app on a real 127.0.0.1 socket in this
event loop. ``GatewayProcess``: ``python -m gateway serve`` as a child process, for tests
that kill or signal it. ``Client``: a WebSocket client speaking the protocol, with the checks
every protocol test uses (``assert_alive``, ``expect_error``, ``close_code``).

The other helper modules: ``polling.py`` (``eventually``: the one way to wait for a condition),
``pgconn.py`` (the one way to open a PostgreSQL connection), ``browsertest.py`` (Chromium and
pages running the browser client); the fixtures are in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from gateway import config
from gateway.auth import mint_token
from gateway.protocol import ERROR_CODES
from gateway.relay import Relay
from gateway.server import STATE, build_app

from .pgconn import connection, terminate_leftovers
from .polling import eventually

SECRET = "test-secret-0123456789-abcdefghijklmnop"
REPO = Path(__file__).resolve().parent.parent


def token(user: str, *, ttl: float = 300, topics: list[str] | None = None, **claims: Any) -> str:
    return mint_token(SECRET, user, ttl=ttl, topics=topics, **claims)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bare_env() -> dict[str, str]:
    """This process's environment without any gateway setting: a child gateway sees only what
    the test gives it, not a GATEWAY_* or DATABASE_URL of the shell that runs the suite."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "DATABASE_URL"}


def settings_env(dsn: str, **overrides: Any) -> dict[str, str]:
    env = {
        "GATEWAY_DATABASE_URL": dsn,
        "GATEWAY_JWT_SECRET": SECRET,
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PRESENCE": "false",
        "GATEWAY_PROBE_INTERVAL": "0.5",
        "GATEWAY_PROBE_TIMEOUT": "0.5",
        "GATEWAY_RECONNECT_MAX_DELAY": "0.5",
        "GATEWAY_HEARTBEAT_INTERVAL": "1",
        "GATEWAY_HEARTBEAT_TTL": "3",
    }
    for key, value in overrides.items():
        env[config.env_name(key)] = str(value)
    return env


@contextlib.asynccontextmanager
async def serving(app: web.Application, **runner_options: Any) -> AsyncIterator[str]:
    """``app`` on a free loopback port, in this process; yields its base URL."""
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running_gateway(dsn: str, **overrides: Any) -> AsyncIterator[Gateway]:
    env = settings_env(dsn, port=0, **overrides)
    settings = config.load(env)
    app = build_app(settings)
    async with serving(app, handle_signals=False, access_log=None) as base:
        gw = Gateway(base, app)
        await gw.wait_ready()
        yield gw


class Gateway:
    def __init__(self, base: str, app: web.Application | None = None) -> None:
        self.base = base
        self.ws_url = base.replace("http", "ws", 1) + "/ws"
        self.app = app

    @property
    def state(self) -> Any:
        assert self.app is not None
        return self.app[STATE]

    async def ready(self) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.get(self.base + "/readyz") as r:
            return r.status, await r.json()

    async def wait_ready(self, timeout: float = 15.0) -> None:
        last: Any = None

        async def is_ready() -> bool:
            nonlocal last
            try:
                status, last = await self.ready()
            except aiohttp.ClientError as exc:
                last = exc
                return False
            return status == 200

        await eventually(
            is_ready, timeout, lambda: f"gateway at {self.base} to be ready (last: {last})", interval=0.05
        )

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as s, s.get(self.base + "/metrics") as r:
            return await r.text()

    async def connect(self, user: str | None = None, **kw: Any) -> Client:
        c = Client(self.ws_url)
        await c.open(**kw)
        if user is not None:
            await c.auth(token(user, topics=kw.get("topics")))
        return c


class GatewayProcess(Gateway):
    """``python -m gateway serve`` as a child process (its log goes to ``self.log_path``)."""

    command = "serve"
    start_timeout = 15.0

    def __init__(self, dsn: str, log_path: Path, **overrides: Any) -> None:
        self.port = int(overrides.pop("port", 0)) or free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.env = dict(os.environ, **settings_env(dsn, port=self.port, workers=1, **overrides))
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> GatewayProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", self.command],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        try:
            await self.wait_ready(self.start_timeout)
        except AssertionError:
            self.kill()
            raise AssertionError(
                f"gateway {self.command} did not start:\n{self.log_path.read_text()[-3000:]}"
            ) from None
        return self

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    async def wait_exit(self, timeout: float = 20.0) -> int:
        proc = self.proc
        assert proc is not None
        await eventually(
            lambda: proc.poll() is not None, timeout, "the gateway process to exit", interval=0.05
        )
        return proc.returncode

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                await self.wait_exit(15)
            except AssertionError:
                self.kill()
        self._close_log()


class DemoProcess(GatewayProcess):
    """``python -m gateway demo`` on an existing database (no throwaway cluster)."""

    command = "demo"
    start_timeout = 30.0


class Closed(Exception):
    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed with {code}: {reason}")
        self.code = code
        self.reason = reason


# Clients and connections a test opened and has not closed: conftest.py closes them after
# every test, also one that failed halfway, so a failure does not leave sockets whose
# ResourceWarnings would be blamed on a later test.
_open_clients: set[Client] = set()


async def close_leftovers() -> None:
    for c in list(_open_clients):
        with contextlib.suppress(Exception):
            await c.close()
    terminate_leftovers()


class Client:
    """A protocol client. ``recv`` returns decoded frames; ``Closed`` is raised on close."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._next_id = 0
        self.last: dict[str, tuple[str, int]] = {}  # topic -> (epoch, pos) of the last event

    async def open(
        self, headers: dict[str, str] | None = None, protocols: tuple[str, ...] = (), **_: Any
    ) -> None:
        self._session = aiohttp.ClientSession()
        _open_clients.add(self)
        try:
            self.ws = await self._session.ws_connect(
                self.url, headers=headers, protocols=protocols, max_msg_size=0
            )
        except BaseException:
            await self._session.close()
            raise

    async def send(self, msg: dict[str, Any] | str) -> None:
        assert self.ws is not None
        await self.ws.send_str(msg if isinstance(msg, str) else json.dumps(msg))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.ws is not None
        msg = await self.ws.receive(timeout=timeout)
        if msg.type == aiohttp.WSMsgType.TEXT:
            frame: dict[str, Any] = json.loads(msg.data)
            if frame.get("type") == "event":
                self.last[frame["topic"]] = (frame["epoch"], frame["pos"])
            return frame
        if msg.type == aiohttp.WSMsgType.CLOSE:
            # The code the gateway sent. ws.close_code becomes 1006 instead when aiohttp's reply
            # to the close frame fails, as it does when the gateway process has exited meanwhile.
            raise Closed(int(msg.data), str(msg.extra or ""))
        if msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            raise Closed(self.ws.close_code, str(msg.extra or ""))
        raise AssertionError(f"unexpected frame {msg.type}: {msg.data!r}")

    async def expect(self, type_: str, timeout: float = 10.0) -> dict[str, Any]:
        frame = await self.recv(timeout)
        assert frame["type"] == type_, f"expected {type_}, got {frame}"
        return frame

    async def auth(self, tok: str) -> dict[str, Any]:
        await self.send({"type": "auth", "token": tok})
        return await self.expect("welcome")

    async def subscribe(
        self, topic: str, since: tuple[str, int] | None = None, *, expect: bool = True
    ) -> dict[str, Any]:
        """Subscribe; with ``expect``, collect replayed events until the ack (``ack["events"]``)."""
        self._next_id += 1
        msg: dict[str, Any] = {"type": "subscribe", "topic": topic, "id": self._next_id}
        if since is not None:
            msg["since"] = {"epoch": since[0], "pos": since[1]}
        await self.send(msg)
        if not expect:
            return {}
        return await self.subscribe_ack()

    async def subscribe_ack(self) -> dict[str, Any]:
        """The events replayed, then the ``subscribed`` ack they precede (``ack["events"]``)."""
        replayed = []
        while True:
            frame = await self.recv()
            if frame["type"] == "event":
                replayed.append(frame)
                continue
            assert frame["type"] == "subscribed", frame
            frame["events"] = replayed
            return frame

    async def events(self, n: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"got {len(out)} of {n} events: {out[-3:]}")
            frame = await self.recv(remaining)
            if frame["type"] == "event":
                out.append(frame)
        return out

    async def close(self) -> None:
        _open_clients.discard(self)
        if self.ws is not None:
            await self.ws.close()
        if self._session is not None:
            await self._session.close()


# --- protocol helpers (tests/test_protocol.py and the other modules that speak the protocol) ---

WAIT = 10.0  # upper bound for something to happen; never a measured duration
_ids = itertools.count(1000)


async def assert_alive(c: Client) -> None:
    """The connection still works: a ping gets its pong (skipping events in between)."""
    req = next(_ids)
    await c.send({"type": "ping", "id": req})
    while True:
        frame = await c.recv(WAIT)
        if frame["type"] == "event":
            continue
        assert frame == {"type": "pong", "id": req}, frame
        return


async def expect_error(c: Client, code: str, **fields: Any) -> dict[str, Any]:
    """The next frame is an error with ``code`` (and ``fields``); its message is never empty."""
    frame = await c.recv(WAIT)
    assert frame["type"] == "error", f"expected error {code}, got {frame}"
    assert frame["code"] == code, f"expected error {code}, got {frame}"
    assert frame["code"] in ERROR_CODES
    assert isinstance(frame["message"], str) and frame["message"].strip(), frame
    for key, value in fields.items():
        assert frame.get(key) == value, f"{key}: expected {value!r} in {frame}"
    return frame


async def close_code(c: Client, timeout: float = WAIT) -> int | None:
    """Read until the server closes the socket; the close code it sent."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while True:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            last = await c.recv(remaining)
        except Closed as exc:
            return exc.code
        except TimeoutError:
            raise AssertionError(
                f"the server did not close the connection within {timeout} s; last frame: {last}"
            ) from None


async def open_raw(gw: Gateway, **kw: Any) -> Client:
    """A connected socket that has not authenticated (yet)."""
    c = Client(gw.ws_url)
    await c.open(**kw)
    return c


async def emit(db: asyncpg.Connection, topic: str, data: Any) -> int:
    pos: int = await db.fetchval("SELECT gateway.emit($1, $2::jsonb)", topic, json.dumps(data))
    return pos


async def make_items_table(dsn: str, topic_expr: str = "'user:' || owner_id", name: str = "items") -> None:
    async with connection(dsn) as conn:
        await conn.execute(
            f"CREATE TABLE {name} (id bigserial PRIMARY KEY, owner_id int NOT NULL, title text, body text);"
            f"SELECT gateway.publish('{name}', $${topic_expr}$$)"
        )


async def insert_items(dsn: str, owner: int, titles: list[str]) -> None:
    """Commit one row of ``items`` (make_items_table) per title, each in a transaction of its own."""
    async with connection(dsn) as conn:
        for title in titles:
            await conn.execute("INSERT INTO items (owner_id, title) VALUES ($1, $2)", owner, title)


async def wait_for_lock_wait(db: asyncpg.Connection, query_like: str, what: str) -> None:
    """Wait until some backend waits for a lock while running a query LIKE ``query_like``."""
    await eventually(
        lambda: db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1",
            query_like,
        ),
        10,
        what,
    )


@contextlib.asynccontextmanager
async def relay_running(dsn: str, **kwargs: Any) -> AsyncIterator[Relay]:
    """A relay (gateway/relay.py) running in this event loop, stopped on the way out."""
    relay = Relay(dsn, **kwargs)
    task = asyncio.ensure_future(relay.run())
    try:
        yield relay
    finally:
        await relay.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
