"""PostgreSQL's CPU: the postmaster and every process it started, read from /proc.

A reading is user + system CPU seconds of the postmaster, of each child it has now (backends,
checkpointer, WAL writer, autovacuum launcher and workers, ...), and of the children it has
already reaped: a backend that exits during a measured window (a connection closed, an
autovacuum worker done) leaves /proc, but the kernel adds its whole CPU to the postmaster's
cutime/cstime when the postmaster waits for it. So the difference of two readings is the CPU
the whole cluster used in between, exits included.

Only for a server on this machine, readable in /proc (a local cluster of any user: /proc/PID/stat
is world-readable); otherwise the postmaster is not found and the cost is not reported.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg

from .sysinfo import CLK_TCK, children


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


async def postmaster_pid(dsn: str) -> int | None:
    """The postmaster of the server ``dsn`` reaches: the parent of a backend of ours."""
    conn = await asyncpg.connect(dsn)
    try:
        # Read while the backend lives: once the connection closes it exits.
        fields = _stat(int(await conn.fetchval("SELECT pg_backend_pid()")))
    finally:
        await conn.close()
    if fields is None:  # not on this machine, or in another PID namespace
        return None
    parent = int(fields[1])
    return parent if _stat(parent) is not None else None


def process_cpu(pid: int) -> float | None:
    """CPU seconds of one live process: the scheduler's run time to the nanosecond
    (/proc/PID/schedstat), or utime + stime in clock ticks (10 ms) where that is missing.
    Ticks are too coarse here: a backend uses well under a tick per commit, so a window's
    per-process truncations would add up to more than the cost measured."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    f = _stat(pid)
    return None if f is None else (int(f[11]) + int(f[12])) / CLK_TCK


def cluster_cpu(postmaster: int | None) -> float | None:
    """CPU seconds used so far by the cluster (see the module's docstring); None if unknown."""
    if postmaster is None:
        return None
    own = _stat(postmaster)
    if own is None:
        return None
    # Reaped children: cutime + cstime, fields 16-17 of /proc/PID/stat (13-14 after the name),
    # in ticks; a total kept by the kernel in nanoseconds, so only the sum is truncated.
    total = (int(own[13]) + int(own[14])) / CLK_TCK
    for pid in [postmaster, *children(postmaster)]:
        # None: gone between the listing and the read; its CPU is in the cutime of a later reading.
        total += process_cpu(pid) or 0.0
    return total
