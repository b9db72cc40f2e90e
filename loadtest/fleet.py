"""The parent's side of the client processes: start them, wait for them, collect what they saw."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from .clients import (
    C_CONNECTED,
    C_ERRORS,
    C_RECEIVED,
    C_RECONNECTS,
    C_REFUSED,
    N_COUNTERS,
    ProcSpec,
    child_main,
)
from .sysinfo import cpu_seconds


class FleetError(RuntimeError):
    """A client process failed or did not answer in time; the message says which and why."""


@dataclass
class Samples:
    rt: array[float] = field(default_factory=lambda: array("d"))
    lat: array[float] = field(default_factory=lambda: array("d"))

    def add(self, rt: bytes, lat: bytes) -> None:
        self.rt.frombytes(rt)
        self.lat.frombytes(lat)


class Fleet:
    """``clients`` (user, topic) spread round-robin over ``procs`` spawned processes."""

    def __init__(
        self,
        url: str,
        secret: str,
        clients: list[tuple[str, str]],
        procs: int,
        mode: str,
        churn_life: tuple[float, float] = (1.0, 3.0),
    ) -> None:
        procs = max(1, min(procs, len(clients)))
        self.n = len(clients)
        self.specs = [
            ProcSpec(url, secret, clients[i::procs], mode, churn_life, index=i) for i in range(procs)
        ]
        ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited event loop or sockets
        self.counters = ctx.Array("q", procs * N_COUNTERS, lock=False)
        self.pipes: list[Connection] = []
        self.procs: list[BaseProcess] = []
        self._ctx = ctx
        self.samples = Samples()
        self.setup_errors: list[str] = []
        self.connected = 0

    def _sum(self, which: int) -> int:
        return sum(self.counters[i * N_COUNTERS + which] for i in range(len(self.specs)))

    @property
    def received(self) -> int:
        return self._sum(C_RECEIVED)

    @property
    def connected_now(self) -> int:
        return self._sum(C_CONNECTED)

    @property
    def errors(self) -> int:
        return self._sum(C_ERRORS)

    @property
    def reconnects(self) -> int:
        return self._sum(C_RECONNECTS)

    @property
    def refused(self) -> int:
        """Upgrades the gateway refused for now (HTTP 503) and the client retried."""
        return self._sum(C_REFUSED)

    def cpu(self) -> float:
        """CPU seconds the client processes used so far: shows when the harness itself saturates."""
        return sum(cpu_seconds(p.pid) for p in self.procs if p.pid is not None)

    async def _recv(self, i: int, timeout: float) -> Any:
        pipe, proc = self.pipes[i], self.procs[i]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if await loop.run_in_executor(None, pipe.poll, 0.2):
                try:
                    return pipe.recv()
                except EOFError:
                    raise FleetError(
                        f"client process {i} closed its pipe (exit code {proc.exitcode})"
                    ) from None
            if not proc.is_alive():
                raise FleetError(f"client process {i} died with exit code {proc.exitcode}")
            if loop.time() > deadline:
                raise FleetError(f"client process {i} did not answer within {timeout:.0f}s")

    async def start(self, timeout: float, progress: Any = None) -> None:
        """Spawn the processes and wait until every client connected and subscribed (or failed)."""
        for spec in self.specs:
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(target=child_main, args=(spec, child, self.counters), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)
        waiting = [asyncio.create_task(self._recv(i, timeout)) for i in range(len(self.specs))]
        try:
            while not all(t.done() for t in waiting):
                await asyncio.wait(waiting, timeout=1.0)
                if any(t.done() and t.exception() is not None for t in waiting):
                    break  # one process failed: no point waiting for the others
                if progress is not None:
                    progress(f"connecting {self.connected_now}/{self.n}")
        finally:
            for t in waiting:
                t.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
        for t in waiting:
            exc = None if t.cancelled() else t.exception()
            if exc is not None:
                raise exc
        for t in waiting:
            kind, errors, connected = t.result()
            assert kind == "ready"
            self.setup_errors += errors
            self.connected += connected
        if self.connected < self.n:
            raise FleetError(
                f"only {self.connected} of {self.n} clients connected; first errors: {self.setup_errors[:3]}"
            )

    async def sync(self, heads: dict[str, int], timeout: float) -> int:
        """Wait until every client reached its topic's head; returns how many are still behind."""
        for pipe in self.pipes:
            pipe.send(("sync", heads, timeout))
        behind = 0
        for i in range(len(self.pipes)):
            kind, b, rt, lat = await self._recv(i, timeout + 30)
            assert kind == "synced"
            behind += b
            self.samples.add(rt, lat)
        return behind

    async def finish(self, heads: dict[str, int], timeout: float) -> tuple[list[dict[str, Any]], int]:
        """Stop: wait for the heads, close every socket; per-client rows and how many were behind."""
        for pipe in self.pipes:
            pipe.send(("finish", heads, timeout))
        rows: list[dict[str, Any]] = []
        behind = 0
        for i in range(len(self.pipes)):
            kind, r, b, rt, lat = await self._recv(i, timeout + 60)
            assert kind == "result"
            rows += r
            behind += b
            self.samples.add(rt, lat)
        return rows, behind

    def stop(self) -> None:
        """End the processes (after finish they exit by themselves); bounded."""
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for pipe in self.pipes:
            pipe.close()
