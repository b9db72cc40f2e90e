"""The gateway under test: ``python -m gateway serve --workers N`` on a free 127.0.0.1 port."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from gateway.dev.pgcluster import free_port

from .sysinfo import children, cpu_seconds, rss_kb

SECRET = "loadtest-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
TABLE = "public.lt_items"


class GatewayError(RuntimeError):
    """The gateway did not start or stop; the message holds the end of its log."""


class GatewayProcess:
    def __init__(self, dsn: str, workers: int, log_path: Path, presence: bool = False) -> None:
        self.port = free_port()
        self.workers = workers
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        self.log_path = log_path
        self.env = dict(
            os.environ,
            GATEWAY_DATABASE_URL=dsn,
            GATEWAY_HOST="127.0.0.1",
            GATEWAY_PORT=str(self.port),
            GATEWAY_WORKERS=str(workers),
            GATEWAY_JWT_SECRET=SECRET,
            GATEWAY_TABLES=TABLE,
            GATEWAY_PRESENCE="true" if presence else "false",
            GATEWAY_MAX_CONNECTIONS="100000",
            GATEWAY_MAX_CONNECTIONS_PER_USER="100000",
            GATEWAY_LOG_LEVEL="warning",
        )
        self.env.pop("DATABASE_URL", None)
        # What runs the gateway: loadtest.memtrace wraps it to trace its allocations.
        self.module = "gateway"
        self.proc: subprocess.Popen[bytes] | None = None

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    async def start(self, timeout: float = 30.0) -> None:
        log = open(self.log_path, "ab")  # the child keeps its own copy of the descriptor
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout
        # Every worker must be up: the supervisor has N children, and readyz answers 200 many
        # times in a row (SO_REUSEPORT spreads new connections over the workers).
        ok = 0
        async with aiohttp.ClientSession() as session:
            while ok < 4 * self.workers:
                if self.proc.poll() is not None:
                    raise GatewayError(f"gateway exited with {self.proc.returncode}:\n{self._log_tail()}")
                if time.monotonic() > deadline:
                    await self.stop()
                    raise GatewayError(f"gateway not ready within {timeout:.0f}s:\n{self._log_tail()}")
                try:
                    async with session.get(self.base + "/readyz", timeout=aiohttp.ClientTimeout(2)) as r:
                        ok = ok + 1 if r.status == 200 and len(self.worker_pids()) == self.workers else 0
                except (aiohttp.ClientError, TimeoutError):
                    ok = 0
                if ok < 4 * self.workers:
                    await asyncio.sleep(0.05)

    def worker_pids(self) -> list[int]:
        """The processes serving sockets: the supervisor's children, or itself with one worker."""
        assert self.proc is not None
        if self.workers == 1:
            return [self.proc.pid]
        return children(self.proc.pid)

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.worker_pids())

    def rss_kb(self) -> int:
        return sum(rss_kb(pid) for pid in self.worker_pids())

    async def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 20
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.proc.poll() is None:
            for pid in self.worker_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            self.proc.wait(10)
