"""The load test's comparison with the naive baseline: PostgreSQL's CPU as loadtest/pgcpu.py
reads it, the targets' lines of the bar, and the exit status. (The comparison itself runs at
tiny scale in test_loadtest_smoke.py.)"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest

from loadtest import compare_report, pgcpu
from loadtest import report as lt_report
from loadtest.cli import exit_status
from tests.pgconn import pg_connect


async def test_pg_cpu_keeps_the_cpu_of_a_backend_that_exited(dsn: str) -> None:
    """A backend that burns CPU and exits inside the window is counted: its time moves from
    its own /proc entry into the postmaster's cutime/cstime when the postmaster reaps it."""
    postmaster = await pgcpu.postmaster_pid(dsn)
    if postmaster is None:
        pytest.skip("the server's postmaster is not on this machine")
    before = pgcpu.cluster_cpu(postmaster)
    conn = await pg_connect(dsn)
    backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
    await conn.fetchval("SELECT count(*) FROM generate_series(1, 3000000)")
    burnt = pgcpu.process_cpu(backend)
    await conn.close()
    for _ in range(200):  # until the postmaster has reaped it
        if not Path(f"/proc/{backend}").exists():
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the backend did not exit")
    after = pgcpu.cluster_cpu(postmaster)
    assert before is not None and after is not None and burnt is not None
    assert burnt > 0.05, burnt  # the query really used CPU, so the check below means something
    # cutime is kept in clock ticks: allow one tick of truncation.
    assert after - before >= burnt - 0.011, (before, after, burnt)


def _server(p50: float, p99: float, pg_us: float, rate: float) -> dict[str, Any]:
    return {
        "clients": 200,
        "commits_per_s": rate,
        "latency_ms": {"p50": p50, "p99": p99, "max": p99 * 2},
        "pg_cpu_us_per_commit": pg_us,
        "pg_cpu_ms_per_s": pg_us * rate / 1000,
        "server_cpu_us_per_delivery": 5.0,
        "lost": 0,
        "duplicated": 0,
        "behind_at_end": 0,
        "loadavg": [1.0, 1.0, 1.0],
    }


def _result(judged: bool = True) -> dict[str, Any]:
    def load(label: str, clients: int, rate: float, g: dict[str, Any], n: dict[str, Any]) -> dict[str, Any]:
        size = {"clients": clients, "rate": rate, "writers": 4}
        return {"label": label, "target": size, "load": dict(size), "gateway": g, "naive": n}

    return {
        "scenarios": {},
        "baselines": {},
        "errors": {},
        "baseline": {
            "judged": judged,
            "postmaster_found": True,
            "loads": [
                load("200/s", 200, 200.0, _server(5.0, 10.0, 400.0, 199.0), _server(2.5, 6.0, 100.0, 200.0)),
                load(
                    "1000/s", 50, 1000.0, _server(6.0, 15.0, 100.0, 990.0), _server(1.0, 18.0, 120.0, 995.0)
                ),
                load("20/s", 10, 20.0, _server(5.0, 9.0, 900.0, 20.0), _server(2.0, 5.0, 300.0, 20.0)),
            ],
            "fixed_cost": {
                "cluster_alone": {"pg_cpu_ms_per_s": 1.5, "seconds": 15.0},
                "one_idle_gateway": {"pg_cpu_ms_per_s": 2.5, "seconds": 15.0},
                "fixed_ms_per_s": 1.0,
            },
        },
    }


def _verdicts(r: dict[str, Any]) -> dict[str, str]:
    return {b["criterion"]: b["verdict"] for b in compare_report.bar_lines(r)}


def test_every_target_of_the_baseline_loads_is_judged() -> None:
    v = _verdicts(_result())
    assert v == {
        "200 clients x 200 commits/s: p50 - baseline p50 (ms)": "PASS",  # 2.5 <= 3
        "200 clients x 200 commits/s: p99 - baseline p99 (ms)": "PASS",  # 4 <= 5
        "200 clients x 200 commits/s: PostgreSQL CPU per commit / baseline's": "PASS",  # 4x <= 5x
        "50 clients x 1,000 commits/s: p99 - baseline p99 (ms)": "PASS",  # 15 <= 18
        "50 clients x 1,000 commits/s: PostgreSQL CPU per commit / baseline's": "PASS",  # 100 <= 120
        "fixed PostgreSQL CPU per idle gateway process (ms per s)": "PASS",
        "baseline comparison 200/s: gateway delivers every event exactly once": "PASS",
        "baseline comparison 1000/s: gateway delivers every event exactly once": "PASS",
        "baseline comparison 20/s: gateway delivers every event exactly once": "PASS",
    }


@pytest.mark.parametrize(
    ("label", "path", "value", "criterion"),
    [
        ("200/s", ("latency_ms", "p50"), 5.6, "200 clients x 200 commits/s: p50 - baseline p50 (ms)"),
        ("200/s", ("latency_ms", "p99"), 11.1, "200 clients x 200 commits/s: p99 - baseline p99 (ms)"),
        (
            "200/s",
            ("pg_cpu_us_per_commit",),
            501.0,
            "200 clients x 200 commits/s: PostgreSQL CPU per commit / baseline's",
        ),
        ("1000/s", ("latency_ms", "p99"), 18.5, "50 clients x 1,000 commits/s: p99 - baseline p99 (ms)"),
        (
            "1000/s",
            ("pg_cpu_us_per_commit",),
            121.0,
            "50 clients x 1,000 commits/s: PostgreSQL CPU per commit / baseline's",
        ),
        ("1000/s", ("lost",), 3, "baseline comparison 1000/s: gateway delivers every event exactly once"),
    ],
)
def test_a_gateway_past_a_target_fails_it(
    label: str, path: tuple[str, ...], value: float, criterion: str
) -> None:
    r = _result()
    x = next(x for x in r["baseline"]["loads"] if x["label"] == label)
    target = x["gateway"]
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    v = _verdicts(r)
    assert v[criterion] == "FAIL"
    assert [c for c, verdict in v.items() if verdict == "FAIL"] == [criterion]


def test_the_fixed_cost_fails_above_5_ms_per_second() -> None:
    r = _result()
    r["baseline"]["fixed_cost"]["fixed_ms_per_s"] = 5.2
    assert _verdicts(r)["fixed PostgreSQL CPU per idle gateway process (ms per s)"] == "FAIL"


def test_timings_are_not_judged_below_the_targets_scale() -> None:
    smoke = _verdicts(_result(judged=False))
    small = _result()
    small["baseline"]["loads"][0]["load"]["clients"] = 4  # fewer --clients than the target's 200
    slow = _result()
    slow["baseline"]["loads"][1]["naive"]["commits_per_s"] = 700.0  # the 1,000/s not reached
    for v, judged_off in (
        (smoke, ("200", "50", "fixed")),
        (_verdicts(small), ("200",)),
        (_verdicts(slow), ("50",)),
    ):
        for criterion, verdict in v.items():
            if criterion.startswith(judged_off):
                assert verdict == "n/a", (criterion, verdict)
            else:
                assert verdict == "PASS", (criterion, verdict)


def test_the_exit_status_is_3_when_a_bar_fails_except_in_a_smoke_run(tmp_path: Path) -> None:
    r = _result()
    r["baseline"]["loads"][0]["gateway"]["latency_ms"]["p50"] = 9.0
    r["bar"] = lt_report.evaluate_bar(r)
    assert any(b["verdict"] == "FAIL" for b in r["bar"])
    assert exit_status(r, smoke=False) == 3
    assert exit_status(r, smoke=True) == 0
    passing = _result()
    passing["bar"] = lt_report.evaluate_bar(passing)
    assert exit_status(passing, smoke=False) == 0
    # Lost events and errors stay 1, as before.
    lost = copy.deepcopy(r)
    lost["scenarios"] = {"fanout": {"lost": 2, "duplicated": 0}}
    assert exit_status(lost, smoke=True) == 1
    lost = copy.deepcopy(passing)
    lost["baseline"]["loads"][1]["gateway"]["duplicated"] = 1
    assert exit_status(lost, smoke=True) == 1
    lost = copy.deepcopy(passing)
    lost["baseline"]["loads"][1]["naive"]["lost"] = 5  # not judged: the naive server promises nothing
    assert exit_status(lost, smoke=False) == 0
    r["errors"] = {"baseline": "RuntimeError: x"}
    assert exit_status(r, smoke=False) == 1
    # The report shows both servers and the targets.
    lt_report.write_html({**passing, "command": "", "started": "", "machine": {}}, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "id='baseline-naive'" in page and "PostgreSQL µs CPU/commit" in page
    text = lt_report.summary(passing)
    assert "PASS  200 clients x 200 commits/s: p50 - baseline p50 (ms)" in text
    assert "naive" in text and "PG us/commit" in text


def test_latency_is_not_judged_when_the_baseline_itself_fell_behind() -> None:
    """On an overloaded machine the clients lag seconds behind both servers: the latency lines
    then say n/a and why, while PostgreSQL's CPU per commit is still judged."""
    r = _result()
    x = r["baseline"]["loads"][0]
    x["naive"]["latency_ms"].update(p50=11657.0, p99=17364.0)
    x["gateway"]["latency_ms"].update(p50=1821.0, p99=6060.0)
    lines = {b["criterion"]: b for b in compare_report.bar_lines(r)}
    for name in ("p50 - baseline p50 (ms)", "p99 - baseline p99 (ms)"):
        line = lines[f"200 clients x 200 commits/s: {name}"]
        assert line["verdict"] == "n/a" and "fell behind" in line["detail"], line
    assert lines["200 clients x 200 commits/s: PostgreSQL CPU per commit / baseline's"]["verdict"] == "PASS"
    # A slow gateway beside a healthy baseline still fails.
    r = _result()
    r["baseline"]["loads"][0]["gateway"]["latency_ms"]["p50"] = 1821.0
    assert _verdicts(r)["200 clients x 200 commits/s: p50 - baseline p50 (ms)"] == "FAIL"
