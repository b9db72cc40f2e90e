"""Client processes driven by the parent of a scenario (loadtest/crowd.py, loadtest/storm.py).

Each child gets its share of the users, a pipe for commands (the child answers each with one
object) and a slot of counters in one shared array, which the parent reads without asking:
progress lines while tens of thousands of connections open must not wait for every child.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any


class ClientProcesses:
    """``procs`` spawned children running ``target(users, index, pipe, counters)``."""

    def __init__(
        self,
        name: str,
        target: Callable[..., None],
        users: list[tuple[str, str]],
        procs: int,
        counters: int,
        poll: float = 0.2,
    ) -> None:
        ctx = mp.get_context("spawn")
        self.name, self.poll, self.n_counters = name, poll, counters
        self.users = [users[i::procs] for i in range(procs)]
        self.counters = ctx.Array("q", procs * counters, lock=False)
        self.pipes: list[Connection] = []
        self.procs: list[BaseProcess] = []
        for i in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=target, args=(self.users[i], i, child, self.counters), daemon=True)
            p.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(p)

    def count(self, which: int) -> int:
        """Counter ``which`` summed over the children."""
        return sum(self.counters[i * self.n_counters + which] for i in range(len(self.procs)))

    def reset_counts(self) -> None:
        for i in range(len(self.counters)):
            self.counters[i] = 0

    async def ask(self, cmds: list[tuple[Any, ...]], timeout: float, progress: Any = None) -> list[Any]:
        """Send each child its command and wait for every answer (``progress()`` between polls)."""
        for pipe, cmd in zip(self.pipes, cmds, strict=True):
            pipe.send(cmd)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        answers: list[Any] = [None] * len(self.pipes)
        pending = set(range(len(self.pipes)))
        while pending:
            for i in list(pending):
                if self.pipes[i].poll():
                    answers[i] = self.pipes[i].recv()
                    pending.discard(i)
                elif not self.procs[i].is_alive():
                    raise RuntimeError(
                        f"{self.name} client process {i} died (exit code {self.procs[i].exitcode})"
                    )
            if loop.time() > deadline:
                raise RuntimeError(
                    f"{self.name} client processes {sorted(pending)} did not answer in {timeout:.0f}s"
                )
            if progress is not None:
                progress()
            await asyncio.sleep(self.poll)
        return answers

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("exit",))
        for p in self.procs:
            p.join(15)
            if p.is_alive():
                p.kill()
                p.join(5)
        for pipe in self.pipes:
            pipe.close()
