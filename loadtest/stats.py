"""Percentiles, time buckets and histograms over every measured delivery (no sampling)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def latency_summary(latencies_s: Sequence[float]) -> dict[str, Any]:
    """p50/p95/p99/max/mean in milliseconds."""
    v = sorted(latencies_s)
    if not v:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    return {
        "count": len(v),
        "p50": round(percentile(v, 50) * 1000, 2),
        "p95": round(percentile(v, 95) * 1000, 2),
        "p99": round(percentile(v, 99) * 1000, 2),
        "max": round(v[-1] * 1000, 2),
        "mean": round(sum(v) / len(v) * 1000, 2),
    }


def time_series(
    rt: Sequence[float], lat: Sequence[float], commit_times: Sequence[float], t0: float, width: float = 0.5
) -> dict[str, list[float | None]]:
    """Per ``width``-second bucket from ``t0``: deliveries/s, commits/s, p50 and p99 latency (ms)."""
    end = max(t0, max(rt, default=t0), max(commit_times, default=t0))
    n = max(1, math.ceil((end - t0) / width) + 1)
    lats: list[list[float]] = [[] for _ in range(n)]
    commits = [0] * n
    for t, x in zip(rt, lat, strict=True):
        i = int((t - t0) / width)
        if 0 <= i < n:
            lats[i].append(x)
    for t in commit_times:
        i = int((t - t0) / width)
        if 0 <= i < n:
            commits[i] += 1
    out: dict[str, list[float | None]] = {
        "t": [],
        "deliveries_per_s": [],
        "commits_per_s": [],
        "p50_ms": [],
        "p99_ms": [],
    }
    for i in range(n):
        bucket = sorted(lats[i])
        out["t"].append(round(i * width, 3))
        out["deliveries_per_s"].append(round(len(bucket) / width, 1))
        out["commits_per_s"].append(round(commits[i] / width, 1))
        # None (JSON null) where nothing arrived: NaN is not valid JSON.
        out["p50_ms"].append(round(percentile(bucket, 50) * 1000, 3) if bucket else None)
        out["p99_ms"].append(round(percentile(bucket, 99) * 1000, 3) if bucket else None)
    return out


# Log-spaced histogram bins from 0.1 ms to 10 s (5 per decade).
BIN_EDGES_MS = [0.1 * 10 ** (i / 5) for i in range(26)]


def histogram(latencies_s: Sequence[float]) -> dict[str, list[float]]:
    counts = [0] * (len(BIN_EDGES_MS) + 1)
    for x in latencies_s:
        ms = x * 1000
        i = 0 if ms < BIN_EDGES_MS[0] else min(len(BIN_EDGES_MS), int(math.log10(ms / 0.1) * 5) + 1)
        counts[i] += 1
    return {"edges_ms": [round(e, 4) for e in BIN_EDGES_MS], "counts": [float(c) for c in counts]}
