"""The load test must not rot: ``python -m loadtest --smoke`` runs every scenario at tiny scale
against a real PostgreSQL, real gateway workers and real sockets, and writes its report.

Only correctness is checked (every event exactly once, the report exists and is complete);
timings on a shared machine say nothing, so none are asserted, and the bar must not judge
them either at this scale: its performance lines say n/a.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest import report as lt_report

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = ("notify", "fanout", "scoped", "ramp", "idle", "churn", "rooms")


def series_commits(series: dict[str, Any]) -> int:
    """The commits a time series counts: commits/s per bucket x the bucket's width."""
    t = series["t"]
    width = t[1] - t[0] if len(t) > 1 else 0.5
    return round(sum(series["commits_per_s"]) * width)


def check_page(page: str, scenarios: list[str]) -> None:
    """Every in-page link lands on an id, the summary links to every scenario, and no table
    shows a float as Python prints it (1089.6299999999999)."""
    ids = set(re.findall(r"""\bid=['"]([^'"]+)['"]""", page))
    links = re.findall(r"""href=['"]#([^'"]*)['"]""", page)
    assert links and set(links) <= ids, f"links to no id: {sorted(set(links) - ids)}"
    summary = page.split("id='summary'", 1)[1].split("id='bar'", 1)[0]
    for name in scenarios:
        assert f"href='#scenario-{name}'" in summary, name
    text = re.sub(r"<svg.*?</svg>", "", page, flags=re.S)
    long_floats = re.findall(r"\d\.\d{5,}", text)
    assert not long_floats, long_floats


def throughput_commit_heights(page: str, scenario: str) -> list[float]:
    """How far above the plot's bottom (in px) each point of a scenario's commits/s line is
    drawn: 0 on a linear axis, the lowest power of ten on a logarithmic one."""
    section = page.split(f"id='scenario-{scenario}'", 1)[1].split("<h2", 1)[0]
    svg = section.split("<h3>Throughput</h3>", 1)[1].split("</svg>", 1)[0]
    height = float(re.search(r'<svg[^>]* height="(\d+)"', svg).group(1))  # type: ignore[union-attr]
    zero = height - 40  # the plot's bottom margin
    color = lt_report.COLORS[1]  # the second series, commits/s
    points = [p for line in re.findall(rf'stroke="{color}"[^>]*points="([^"]*)"', svg) for p in line.split()]
    return [zero - float(p.split(",")[1]) for p in points]


def run_python(
    args: list[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python <args>`` from the repository. By default on a throwaway cluster unless the suite
    was pointed at a server; either way a database of the run's own."""
    if env is None:
        env = dict(os.environ)
        if env.get("TEST_DATABASE_URL") and not env.get("DATABASE_URL"):
            env["DATABASE_URL"] = env["TEST_DATABASE_URL"]
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.timeout(270)
def test_smoke_run_reports_every_scenario_with_nothing_lost(tmp_path: Path) -> None:
    proc = run_python(["-m", "loadtest", "--smoke", "--out", str(tmp_path)], 240)
    output = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, output

    report = json.loads((tmp_path / "loadtest.json").read_text())
    html = (tmp_path / "loadtest.html").read_text()
    assert html.startswith("<!doctype html>") and "<svg" in html
    assert "<script" not in html and "http://" not in html.split("</style>", 1)[1].replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    ), "the page must be self-contained"

    assert report["errors"] == {}, report["errors"]
    assert set(report["scenarios"]) == set(SCENARIOS)
    for name, scenario in report["scenarios"].items():
        assert scenario["lost"] == 0, (name, scenario.get("client_errors"))
        assert scenario["duplicated"] == 0, (name, scenario.get("client_errors"))
    # Events really flowed, so zero lost means something.
    for name in ("notify", "fanout", "scoped", "churn"):
        s = report["scenarios"][name]
        assert s["commits"] > 0 and s["deliveries"] == s["expected_deliveries"] > 0, (name, s)
    assert report["scenarios"]["churn"]["reconnects"] > 0
    assert set(report["baselines"]) == {"writer_cost", "bare_listen", "floor"}
    # The naive baseline beside the gateway, each load on both, nothing lost on either, and
    # PostgreSQL's CPU measured for each (the throwaway cluster's postmaster is on this machine).
    base = report["baseline"]
    assert [x["label"] for x in base["loads"]] == ["200/s", "1000/s", "20/s"] and not base["judged"]
    for x in base["loads"]:
        for kind in ("gateway", "naive"):
            s = x[kind]
            assert s["commits"] > 0 and s["deliveries"] == s["expected_deliveries"] > 0, (x["label"], kind, s)
            assert s["lost"] == 0 and s["duplicated"] == 0, (x["label"], kind, s["client_errors"])
            if base["postmaster_found"]:
                assert s["pg_cpu_us_per_commit"] > 0, (x["label"], kind, s)
    if base["postmaster_found"]:
        assert base["fixed_cost"]["one_idle_gateway"]["pg_cpu_ms_per_s"] > 0
    assert {b["verdict"] for b in report["bar"]} <= {"PASS", "FAIL", "n/a"}
    for key in ("cpu_model", "cores", "ram_gb", "kernel", "python", "postgresql"):
        assert report["machine"][key], key

    # At this scale only "exactly once" means something; every performance line is n/a.
    for line in report["bar"]:
        expected = "PASS" if line["criterion"].endswith("every event exactly once") else "n/a"
        assert line["verdict"] == expected, line
    assert "FAIL" not in proc.stdout, proc.stdout[-3000:]

    # The throughput series count every commit the scenario made, the ramp's steps included.
    ramp = report["scenarios"]["ramp"]
    ramp_commits = sum(st["commits"] for st in [*ramp["steps"], ramp["half"], ramp["flat"]])
    assert ramp_commits > 0 and series_commits(ramp["series"]) == ramp_commits
    for name in ("notify", "fanout", "scoped", "churn"):
        s = report["scenarios"][name]
        assert series_commits(s["series"]) == s["commits"], name
    assert max(throughput_commit_heights(html, "ramp")) > 10, "the ramp's commits/s line lies on zero"
    check_page(html, list(SCENARIOS))

    # Rooms: messages and presence flowed, each message reached every member of its room
    # (2 rooms of 3), and the row path ran alone and beside them.
    rooms = report["scenarios"]["rooms"]
    assert rooms["clients"] == 6 and rooms["messages_acked"] > 0, rooms
    assert rooms["message_deliveries"] == rooms["expected_message_deliveries"] == 3 * rooms["messages_acked"]
    assert rooms["presence_updates_sent"] > 0 and rooms["presence_frames_received"] > 0, rooms
    assert rooms["publish_errors"] == {}, rooms["publish_errors"]
    assert rooms["row_latency_alone_ms"]["count"] > 0 and rooms["row_latency_with_rooms_ms"]["count"] > 0


def result(**scenarios: dict[str, Any]) -> dict[str, Any]:
    """A results document of the shape `python -m loadtest` writes, with only what is given."""
    return {
        "command": "python -m loadtest",
        "started": "2026-12-07T10:14:00+00:00",
        "total_seconds": 300.0,
        "plan": {"duration": 15.0, "bare_seconds": 5.0},
        "machine": {"cpu_model": "x", "cores": 2, "loadavg_start": [1.0999999999999999, 1.0, 0.9]},
        "loadavg_end": [2.0, 1.5, 1.0],
        "baselines": {"floor": {"cpu_us_per_delivery": 7.2, "frame_bytes": 209, "clients": 1000}},
        "scenarios": scenarios,
        "errors": {},
    }


def fanout(clients: int, cpu_us: float) -> dict[str, Any]:
    series = {
        "t": [0.0, 0.5, 1.0],
        "deliveries_per_s": [20.0 * clients, 20.0 * clients, 0.0],
        "commits_per_s": [20.0, 20.0, 0.0],
        "p50_ms": [3.1, 3.3, None],
        "p99_ms": [9.5, 12.25, None],
    }
    return {
        "clients": clients,
        "commits": 20,
        "commits_per_s": 19.999999999999996,
        "deliveries": 20 * clients,
        "deliveries_per_s": 1089.6299999999999,
        "gateway_cpu_us_per_delivery": cpu_us,
        "latency_ms": {"p50": 3.2, "p99": 12.25, "max": 20.5},
        "lost": 0,
        "duplicated": 0,
        "rate_target": 1329.3600000000001,
        "series": series,
    }


def test_fan_out_cpu_is_judged_only_at_the_bar_s_scale() -> None:
    def verdict(clients: int, cpu_us: float) -> str:
        bar = lt_report.evaluate_bar(result(fanout=fanout(clients, cpu_us)))
        return next(b["verdict"] for b in bar if b["criterion"].startswith("fan-out CPU"))

    assert verdict(1000, 8.6) == "PASS"
    assert verdict(1000, 43.2) == "FAIL"
    assert verdict(4, 43.2) == "n/a"  # the smoke run's 4 subscribers
    assert verdict(999, 8.6) == "n/a"


def test_the_page_has_a_summary_linking_every_section_and_rounded_numbers(tmp_path: Path) -> None:
    r = result(fanout=fanout(1000, 8.6), scoped=fanout(1, 9.1))
    r["bar"] = lt_report.evaluate_bar(r)
    lt_report.write_html(r, tmp_path / "loadtest.html")
    page = (tmp_path / "loadtest.html").read_text()
    check_page(page, ["fanout", "scoped"])
    assert "1,089.6" in page and "1,329.4" in page and "[1.1, 1.0, 0.9]" in page
    assert "baseline-floor" in page.split("id='bar'", 1)[0]  # the summary links the baselines too
    # One delivery per commit: a linear axis, the commits line from 0 up to near the top.
    heights = throughput_commit_heights(page, "scoped")
    assert min(heights) == 0 and max(heights) > 150, heights
    # 1,000 deliveries per commit: on a linear axis the commits would lie on zero.
    assert min(throughput_commit_heights(page, "fanout")) > 10


def run_scale_smoke(tmp_path: Path, scenario: str, timeout: float) -> dict[str, Any]:
    """``python -m loadtest --smoke --scenario <scenario>``: its report, after checking that it
    ran without errors, with nothing lost, and that its lines of the bar held."""
    # The scale scenarios measure PostgreSQL from /proc (replicas): always a throwaway cluster.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "DATABASE_URL"}
    proc = run_python(
        ["-m", "loadtest", "--smoke", "--scenario", scenario, "--out", str(tmp_path)], timeout, env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "loadtest.json").read_text())
    assert report["errors"] == {}, report["errors"]
    assert set(report["scenarios"]) == {scenario}
    assert report["baselines"] == {}  # the scale scenarios run without the baselines
    s = report["scenarios"][scenario]
    assert s["lost"] == 0 and s["duplicated"] == 0, s
    assert "FAIL" not in proc.stdout, proc.stdout[-3000:]
    assert f"href='#scenario-{scenario}'" in (tmp_path / "loadtest.html").read_text()
    return report


# About 30 s each on this machine when it is quiet; the timeouts leave room for a loaded one.
@pytest.mark.timeout(200)
def test_crowd_scenario_holds_every_connection_and_delivers_everything(tmp_path: Path) -> None:
    """300 connections over 3 workers and 3 client processes from 127.0.0.10-12: the fan-out
    and the per-user topics delivered exactly once, both connects measured."""
    report = run_scale_smoke(tmp_path, "crowd", 170)
    c = report["scenarios"]["crowd"]
    assert c["clients"] == 300 and c["workers"] == 3 and c["client_processes"] == 3
    assert c["connect_default"]["connected"] == 300 and c["connect_default"]["failed"] == 0
    assert c["connect_raised"]["connected"] == 300 and c["connect_raised"]["gateway_connect_rate"] > 500
    w = c["writes"]
    assert w["broadcast_commits"] >= 2 and w["user_commits"] > 0
    # Every fan-out commit reached the 295 broadcast subscribers; every per-user one its owner.
    assert c["deliveries"] == c["expected_deliveries"] == 295 * w["broadcast_commits"] + w["user_commits"]
    assert c["latency_ms"]["count"] == 295 * w["broadcast_commits"]
    assert c["behind_at_end"] == 0 and c["closed_by_server"] == 0
    assert c["kb_per_connection"] > 0
    # Below 50,000 connections the crowd's line is not judged.
    line = next(b for b in report["bar"] if b["criterion"].startswith("crowd: connections held"))
    assert line["verdict"] == "n/a" and line["value"] == 300


@pytest.mark.timeout(200)
def test_storm_scenario_moves_every_client_of_the_drained_replica_without_loss(tmp_path: Path) -> None:
    """200 clients through HAProxy on two replicas; one gets SIGTERM while writes go on: its
    clients, closed with 1012, resume on the other with recovered: true and miss nothing."""
    if not shutil.which("haproxy", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")):
        pytest.skip("haproxy not found (Debian package haproxy)")
    report = run_scale_smoke(tmp_path, "storm", 170)
    s = report["scenarios"]["storm"]
    assert s["clients"] == 200
    # leastconn spreads the clients over both replicas: the drained one had some, not all.
    assert 0 < s["moved"] < 200, s
    assert s["resubscribed"] == s["moved"] and s["storm_complete"], s
    assert s["close_codes"] == ["1012"] and s["closed_twice"] == 0
    assert s["not_recovered"] == 0 and s["drained_replica_exit_code"] == 0
    assert s["commits"] > 0 and s["deliveries"] == s["expected_deliveries"] > 0
    assert 0 < s["resubscribed_99pct_s"] <= s["resubscribed_100pct_s"]
    assert s["survivor_latency_ms_before"]["count"] > 0
    line = next(b for b in report["bar"] if b["criterion"].startswith("storm:"))
    assert line["verdict"] == "PASS", line


@pytest.mark.timeout(300)
def test_replicas_scenario_runs_both_engines_with_nothing_lost(tmp_path: Path) -> None:
    """The replicas scenario at tiny scale inside ``python -m loadtest`` (it also runs alone
    as ``python -m loadtest.replicas``, the same code): PostgreSQL only, then NATS."""
    if not (shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/bin")):
        pytest.skip("nats-server not found (Debian package nats-server; .ci/run installs it)")
    report = run_scale_smoke(tmp_path, "replicas", 240)
    runs = report["scenarios"]["replicas"]["engines"]
    assert set(runs) == {"postgres", "nats"}
    for r in runs.values():
        assert r["lost"] == 0 and r["duplicated"] == 0 and r["commits"] > 0, r
    # Without a broker every process hears every doorbell; with one, only its own topics'.
    assert runs["nats"]["doorbells_per_process"] < runs["postgres"]["doorbells_per_process"], runs
    # No LISTEN connection with a broker (the pools may differ by what they grew to).
    assert runs["postgres"]["db_sessions"] > runs["nats"]["db_sessions"], runs


def _memory_run(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "memory.json"
    proc = run_python(
        [
            *("-m", "loadtest.memory", "--procs", "2", "--settle", "0.5"),
            *("--out", str(tmp_path), "--json", str(out), *args),
        ],
        150,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


@pytest.mark.timeout(180)
def test_memory_script_measures_every_connection_with_presence_off_and_on(tmp_path: Path) -> None:
    """Only that it runs and every client stays connected: the sizes at 200 connections say nothing."""
    result = _memory_run(tmp_path, "--connections", "200", "--presence", "both")
    assert [(s["connections"], s["presence"]) for s in result["results"]] == [(200, False), (200, True)]
    for summary in result["results"]:
        (run,) = summary["runs"]
        assert run["connected"] == 200 and run["closed_by_server"] == 0
        for key in ("rss", "uss", "pss"):
            assert isinstance(run[f"{key}_kb_per_connection"], float | int)
            assert run["after_kb"][key] > 0


@pytest.mark.timeout(180)
def test_memory_script_says_which_lines_allocated_the_connections(tmp_path: Path) -> None:
    result = _memory_run(tmp_path, "--connections", "200", "--presence", "off", "--tracemalloc", "4")
    trace = result["results"][0]["runs"][0]["tracemalloc"]
    assert trace["total_bytes_per_connection"] > 0
    # Every connection has a WebSocketResponse and a Session: both must show up by file.
    files = [row["where"] for row in trace["by_filename"]]
    assert any("aiohttp/web_ws.py" in f for f in files), files
    assert any("gateway/session.py" in f for f in files), files
    assert trace["by_lineno"] and trace["stacks"]
    assert not list(tmp_path.glob("tracemalloc-*")), "the snapshots are deleted once read"


def test_scenario_takes_a_list_and_refuses_what_it_does_not_know(capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest.cli import build_parser

    parser = build_parser()
    assert parser.parse_args([]).scenario == ("all",)
    assert parser.parse_args(["--scenario", "notify,fanout"]).scenario == ("notify", "fanout")
    assert parser.parse_args(["--scenario", "baseline"]).scenario == ("baseline",)
    for bad, says in (
        ("notify,fanot", "unknown scenario 'fanot'"),
        ("notify,notify", "named twice"),
        ("all,notify", "name it alone"),
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(["--scenario", bad])
        assert says in capsys.readouterr().err


@pytest.mark.timeout(200)
def test_two_scenarios_in_one_run_without_the_writer_cost(tmp_path: Path) -> None:
    proc = run_python(
        [
            "-m",
            "loadtest",
            "--smoke",
            "--scenario",
            "notify,fanout",
            "--skip-writer-cost",
            "--out",
            str(tmp_path),
        ],
        180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "loadtest.json").read_text())
    assert set(result["scenarios"]) == {"notify", "fanout"}
    assert "writer_cost" not in result["baselines"]
    assert "floor" in result["baselines"] and "bare_listen" in result["baselines"]
    assert any(b["criterion"] == "writer cost" and b["detail"] == "not run" for b in result["bar"])
