"""The load test must not rot: ``python -m loadtest --smoke`` runs every scenario at tiny scale
against a real PostgreSQL, real gateway workers and real sockets, and writes its report.

Only correctness is checked (every event exactly once, the report exists and is complete);
timings on a shared machine say nothing, so none are asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = ("notify", "fanout", "scoped", "ramp", "idle", "churn")


@pytest.mark.timeout(180)
def test_smoke_run_reports_every_scenario_with_nothing_lost(tmp_path: Path) -> None:
    env = dict(os.environ)
    # A throwaway cluster unless the suite was pointed at a server; either way a database of its own.
    if env.get("TEST_DATABASE_URL") and not env.get("DATABASE_URL"):
        env["DATABASE_URL"] = env["TEST_DATABASE_URL"]
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
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
    assert {b["verdict"] for b in report["bar"]} <= {"PASS", "FAIL", "n/a"}
    for key in ("cpu_model", "cores", "ram_gb", "kernel", "python", "postgresql"):
        assert report["machine"][key], key
