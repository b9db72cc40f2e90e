"""The machine and its processes: description, open-files limit, CPU and memory of a process.

CPU and memory are read from /proc (Linux), the processes' own accounting, so what a process
costs is measured the same way for the gateway workers and for the baselines.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def raise_nofile() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard limit; children inherit it. Returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep what we have; the scenario that needs more will fail to connect and say so
    return soft, hard


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (utime + stime from /proc/PID/stat)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0  # the process has gone; the caller compares before/after on live processes
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kb(pid: int) -> int:
    """Resident memory of one process in KiB (VmRSS from /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """Direct children of a process: psutil when installed, else a scan of /proc."""
    try:
        import psutil

        try:
            return [c.pid for c in psutil.Process(pid).children()]
        except psutil.Error:
            return []
    except ImportError:
        pass
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


def _versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for mod in ("aiohttp", "asyncpg", "msgspec", "uvloop"):
        try:
            out[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            out[mod] = "not installed"
    return out


def pgbench_path(bin_dir: Path | None) -> str | None:
    """pgbench from the PostgreSQL binaries in use, else from PATH, else None."""
    if bin_dir is not None and (bin_dir / "pgbench").is_file():
        return str(bin_dir / "pgbench")
    found = shutil.which("pgbench")
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True)
    return str(candidates[0]) if candidates else None


def describe(pg_version: str) -> dict[str, Any]:
    uname = platform.uname()
    git = ""
    try:
        git = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
    except OSError:
        pass
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": _ram_gb(),
        "kernel": f"{uname.system} {uname.release}",
        "python": sys.version.split()[0],
        "postgresql": pg_version,
        "packages": _versions(),
        "loadavg_start": loadavg(),
        "nofile_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "git_commit": git,
    }
