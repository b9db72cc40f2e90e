"""The operator's side: the metrics alerts are built on, the alert rules (deploy/prometheus/),
the Grafana dashboard (deploy/grafana/), each against a real gateway and a real database.

The rules are checked with Prometheus's own tools: ``promtool check rules`` and ``promtool test
rules`` on synthetic series (deploy/prometheus/alerts.test.yaml), and end to end by a real
Prometheus server scraping a real gateway. Those tests skip with the reason when Debian's
``prometheus`` package is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import jsonschema
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway import config
from tests.gwtest import (
    REPO,
    SECRET,
    Closed,
    Gateway,
    bare_env,
    free_port,
    running_gateway,
    settings_env,
)
from tests.pgconn import pg_connect
from tests.polling import eventually

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yaml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts.test.yaml"
DEPLOY_MD = REPO / "docs" / "deploy.md"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`; .ci/run installs it)"
)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A scrape as {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(gw: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return samples(await gw.metrics())


@contextlib.asynccontextmanager
async def gateway_role(db: asyncpg.Connection, dsn: str) -> AsyncIterator[tuple[str, str]]:
    """A role of its own for the gateway, so a test can keep it out (ALTER ROLE ... NOLOGIN):
    (its name, the gateway's URL). Roles belong to the whole cluster, which other tests share:
    the name is unique, and the role is dropped after the test."""
    role = f"gw_ops_{uuid.uuid4().hex[:12]}"
    await db.execute(f"CREATE ROLE {role} LOGIN SUPERUSER")
    try:
        yield role, dsn.replace("postgres@", f"{role}@", 1)
    finally:
        await db.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
        await db.execute(f"DROP ROLE {role}")


# --- the metrics ---------------------------------------------------------------------------


async def test_database_sessions_and_heartbeat_failures_are_counted(dsn: str) -> None:
    db = await pg_connect(dsn)
    try:
        async with gateway_role(db, dsn) as (role, gw_dsn), running_gateway(gw_dsn, presence="true") as gw:
            presence = gw.state.ctx.presence
            await eventually(lambda: presence.heartbeats >= 1, 10, "a first heartbeat")
            m = await scrape(gw)
            for use in ("listener", "relay", "heartbeat"):
                assert m[("gateway_db_sessions", (("use", use),))] == 1.0, use
            assert m[("gateway_db_sessions", (("use", "pool"),))] >= 1.0
            assert m[("gateway_presence_heartbeats_total", ())] >= 1.0
            assert m[("gateway_presence_heartbeat_failures_total", ())] == 0.0

            # The database keeps the gateway out: its heartbeat fails, and every session it
            # held is gone (the pool's too: the pool reconnects only on demand).
            await db.execute(f"ALTER ROLE {role} NOLOGIN")
            await db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
            )
            await eventually(lambda: presence.heartbeat_failures >= 2, 10, "heartbeat failures")
            await eventually(lambda: not gw.state.listener.connected, 10, "the listener to notice")
            m = await scrape(gw)
            assert m[("gateway_presence_heartbeat_failures_total", ())] >= 2.0
            for use in ("listener", "heartbeat"):
                assert m[("gateway_db_sessions", (("use", use),))] == 0.0, use

            await db.execute(f"ALTER ROLE {role} LOGIN")
            before = presence.heartbeats
            await eventually(lambda: presence.heartbeats > before, 10, "the heartbeat to come back")
            await gw.wait_ready()
            m = await scrape(gw)
            assert m[("gateway_db_sessions", (("use", "heartbeat"),))] == 1.0
    finally:
        await db.close()


# --- the alert rules -----------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def deploy_anchors() -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", DEPLOY_MD.read_text(), re.MULTILINE)}


def alert_rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_every_alert_says_what_to_do_and_links_a_section_of_deploy_md_that_exists() -> None:
    rules = alert_rules()
    assert len(rules) >= 8
    anchors = deploy_anchors()
    for rule in rules:
        ann = rule["annotations"]
        assert isinstance(ann, dict)
        assert rule["labels"]["severity"] in ("warning", "page"), rule["alert"]  # type: ignore[index]
        link = ann["runbook_url"]
        m = re.fullmatch(r".*docs/deploy\.md#([\w-]+)", link)
        assert m, f"{rule['alert']}: runbook_url {link!r} is not a section of docs/deploy.md"
        assert m.group(1) in anchors, f"{rule['alert']}: docs/deploy.md has no section #{m.group(1)}"
        assert f"#{m.group(1)}" in ann["summary"], f"{rule['alert']}: the summary names no section"
        assert len(ann["summary"]) > 40 and ann["description"], rule["alert"]


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    assert PROMTOOL is not None
    out = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass_and_cover_every_alert() -> None:
    assert PROMTOOL is not None
    out = subprocess.run(
        [PROMTOOL, "test", "rules", ALERTS_TEST.name], capture_output=True, text=True, cwd=PROMETHEUS_DIR
    )
    assert out.returncode == 0, out.stdout + out.stderr
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {rule["alert"] for rule in alert_rules()} <= tested, "an alert no test sees firing"


@needs_promtool
def test_promtool_tests_fail_when_a_rule_is_broken(tmp_path: Path) -> None:
    """The unit tests can fail: with one threshold changed, promtool reports it."""
    assert PROMTOOL is not None
    broken = ALERTS.read_text().replace("> 0.5", "> 0.9", 1)
    assert broken != ALERTS.read_text()
    (tmp_path / "alerts.yaml").write_text(broken)
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    out = subprocess.run(
        [PROMTOOL, "test", "rules", ALERTS_TEST.name], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode != 0
    assert "GatewayNotificationQueueHalfFull" in out.stdout + out.stderr


# --- the dashboard -------------------------------------------------------------------------

DASHBOARD = REPO / "deploy" / "grafana" / "dashboard.json"
PANEL_TYPES = {"row", "timeseries", "stat", "heatmap"}
GRID_WIDTH = 24
DS_REF = {"type": "prometheus", "uid": "${datasource}"}
# What Grafana needs to import a dashboard and show its panels, and what we promise: every
# query goes to the datasource the importer picks, with a refId and a PromQL expression.
DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {
                "list": {
                    "type": "array",
                    "items": {"type": "object", "required": ["name", "type"]},
                }
            },
        },
        "panels": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "type", "title", "gridPos"],
                "properties": {
                    "id": {"type": "integer"},
                    "type": {"enum": sorted(PANEL_TYPES)},
                    "title": {"type": "string", "minLength": 1},
                    "gridPos": {
                        "type": "object",
                        "required": ["x", "y", "w", "h"],
                        "properties": {
                            k: {"type": "integer", "minimum": 0 if k in "xy" else 1}
                            for k in ("x", "y", "w", "h")
                        },
                    },
                    "datasource": {"const": DS_REF},
                    "targets": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["refId", "expr", "datasource"],
                            "properties": {
                                "refId": {"type": "string", "minLength": 1},
                                "expr": {"type": "string", "minLength": 1},
                                "datasource": {"const": DS_REF},
                            },
                        },
                    },
                },
                "if": {"properties": {"type": {"not": {"const": "row"}}}},
                "then": {"required": ["targets", "datasource", "description"]},
            },
        },
    },
}


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def dashboard_queries() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bgateway_[a-z_]+\b", expr))


def test_the_dashboard_is_valid_and_its_panels_do_not_overlap() -> None:
    doc = dashboard()
    jsonschema.validate(doc, DASHBOARD_SCHEMA)
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: dict[tuple[int, int], str] = {}
    for p in doc["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= GRID_WIDTH, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
        for t in p.get("targets", []):
            # Every query follows the replica selector, and uses only variables that exist.
            used = set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval"}
            assert used <= variables, (p["title"], used)
            assert all(
                'instance=~"$instance"' in sel for sel in re.findall(r"gateway_\w+\{[^}]*\}", t["expr"])
            )
            assert metric_names(t["expr"]), (p["title"], t["expr"])
    # What the issue asks the dashboard to show, each by the metric it reads.
    wanted = {
        "gateway_connections",
        "gateway_subscriptions",
        "gateway_deliveries_total",
        "gateway_commit_to_send_seconds_bucket",
        "gateway_relay_leader",
        "gateway_relay_polls_total",
        "gateway_notification_queue_usage",
        "gateway_closes_total",
        "gateway_process_cpu_seconds_total",
        "gateway_process_rss_bytes",
        "gateway_db_sessions",
    }
    used_metrics = set().union(*map(metric_names, dashboard_queries()))
    assert wanted <= used_metrics, wanted - used_metrics
    assert any(p["type"] == "heatmap" for p in doc["panels"])


async def test_every_metric_the_dashboard_and_alerts_query_is_in_a_live_scrape(dsn: str) -> None:
    rules_exprs = [str(rule["expr"]) for rule in alert_rules()]
    async with running_gateway(dsn, presence="true") as gw:
        await eventually(lambda: gw.state.relay.leader, 10, "the relay to lead")
        # Labelled series appear once something is counted: one refused upgrade (a plain GET
        # on /ws) and one connection closed by the gateway (a bad token).
        async with aiohttp.ClientSession() as http, http.get(gw.ws_url.replace("ws", "http", 1)) as r:
            assert r.status == 400
        client = await gw.connect()
        await client.send({"type": "auth", "token": "not-a-token"})
        with pytest.raises(Closed):
            await client.recv()
        await client.close()
        scraped = {name for name, _labels in await scrape(gw)}
    for expr in dashboard_queries() + rules_exprs:
        missing = metric_names(expr) - scraped
        assert not missing, f"{expr}: {sorted(missing)} not in the gateway's /metrics"


# --- every worker's metrics ----------------------------------------------------------------


def _free_port_pair() -> int:
    """A port whose next port is free too (for two workers' metrics ports)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


async def _get(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 200, url
        return await r.text()


async def test_each_worker_serves_its_own_metrics_on_its_own_port(dsn: str, tmp_path: Path) -> None:
    port, metrics_port = free_port(), _free_port_pair()
    env = dict(bare_env(), **settings_env(dsn, port=port, metrics_port=metrics_port))
    log = open(tmp_path / "supervisor.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--workers", "2"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    clients = []
    try:
        gw = Gateway(f"http://127.0.0.1:{port}")
        await gw.wait_ready()
        pages = {}
        for worker in (0, 1):
            url = f"http://127.0.0.1:{metrics_port + worker}/metrics"
            await eventually(lambda url=url: _answers(url), 15, f"worker metrics at {url}")  # type: ignore[misc]
            pages[worker] = samples(await _get(url))
            assert pages[worker][("gateway_worker", (("worker", str(worker)),))] == 1.0
        # Connections spread over the workers by the kernel: the main port's /metrics shows one
        # worker's count, the workers' own ports add up to all of them.
        for i in range(16):
            clients.append(await gw.connect(str(i)))

        async def all_connections() -> bool:
            counts = [
                samples(await _get(f"http://127.0.0.1:{metrics_port + w}/metrics"))[
                    ("gateway_connections", ())
                ]
                for w in (0, 1)
            ]
            # Both workers got some, or the test would not show that both are counted.
            return sum(counts) == 16.0 and min(counts) > 0

        await eventually(all_connections, 10, "16 connections over both workers")
        # Only /metrics there: the worker's own port is no second way in to the WebSocket.
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{metrics_port}/ws") as r:
            assert r.status == 404
    finally:
        for c in clients:
            await c.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


async def _answers(url: str) -> bool:
    try:
        await _get(url)
    except aiohttp.ClientError:
        return False
    return True


def test_metrics_port_settings_are_checked() -> None:
    base = {"GATEWAY_DATABASE_URL": "postgresql://u@h/d", "GATEWAY_JWT_SECRET": SECRET}
    with pytest.raises(config.ConfigError, match="include GATEWAY_PORT=8081"):
        config.load({**base, "GATEWAY_METRICS_PORT": "8080", "GATEWAY_PORT": "8081", "GATEWAY_WORKERS": "2"})
    with pytest.raises(config.ConfigError, match="ports up to 65536"):
        config.load({**base, "GATEWAY_METRICS_PORT": "65535", "GATEWAY_WORKERS": "2"})
    with pytest.raises(config.ConfigError, match="GATEWAY_METRICS is false"):
        config.load({**base, "GATEWAY_METRICS_PORT": "9100", "GATEWAY_METRICS": "false"})
    assert config.load({**base, "GATEWAY_METRICS_PORT": "9100", "GATEWAY_WORKERS": "4"}).metrics_port == 9100


# --- end to end: a real Prometheus scraping a real gateway ---------------------------------

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian package `prometheus`; .ci/run installs it)"
)


class PrometheusServer:
    """``prometheus`` on a loopback port, scraping ``targets`` every second with alerts.yaml."""

    def __init__(self, tmp_path: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = tmp_path / "prometheus.yml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(ALERTS)],
                    "scrape_configs": [{"job_name": "gateway", "static_configs": [{"targets": targets}]}],
                }
            )
        )
        self.data = tmp_path / "prometheus-data"
        self.log_path = tmp_path / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert PROMETHEUS is not None
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.data}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    async def api(self, path: str, **params: str) -> Any:
        async with aiohttp.ClientSession() as http, http.get(self.base + path, params=params) as r:
            body = await r.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def alerts(self, state: str = "firing") -> list[dict[str, Any]]:
        data = await self.api("/api/v1/alerts")
        return [a for a in data["alerts"] if a["state"] == state]

    async def wait_ready(self) -> None:
        async def ready() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                async with aiohttp.ClientSession() as http, http.get(self.base + "/-/ready") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(ready, 30, "prometheus to start")


def dashboard_query(expr: str) -> str:
    """A dashboard query as Grafana sends it: variables replaced (all replicas; a rate window
    of 4 scrape intervals, as Grafana's $__rate_interval)."""
    return expr.replace("$instance", ".*").replace("$__rate_interval", "4s")


@needs_prometheus
async def test_prometheus_scrapes_a_gateway_and_the_listener_alert_fires_and_resolves(
    dsn: str, tmp_path: Path
) -> None:
    db = await pg_connect(dsn)
    prom: PrometheusServer | None = None
    try:
        async with gateway_role(db, dsn) as (role, gw_dsn), running_gateway(gw_dsn, presence="true") as gw:
            client = await gw.connect("1")
            await client.subscribe("user:1")
            target = gw.base.removeprefix("http://")
            prom = PrometheusServer(tmp_path, [target])
            prom.start()
            await prom.wait_ready()

            async def scraped(expr: str, value: str) -> bool:
                result = await prom.query(expr)  # type: ignore[union-attr]
                return bool(result) and result[0]["value"][1] == value

            await eventually(lambda: scraped(f'up{{instance="{target}"}}', "1"), 20, "the first scrape")
            await eventually(
                lambda: scraped("sum(gateway_relay_leader)", "1"), 10, "the relay leader scraped"
            )
            # Every query of the dashboard is PromQL Prometheus accepts; those that show the
            # state of now have the values of the gateway.
            for expr in dashboard_queries():
                await prom.query(dashboard_query(expr))
            assert await scraped(dashboard_query(dashboard_queries()[0]), "1")  # Connections
            await asyncio.sleep(3)  # a few more scrapes: rates have two samples
            assert await prom.alerts() == [] and await prom.alerts("pending") == []

            # The fault: the listener's connection killed, and the gateway's role kept out.
            listener = gw.state.listener
            await db.execute(f"ALTER ROLE {role} NOLOGIN")
            assert await db.fetchval("SELECT pg_terminate_backend($1)", listener.backend_pid)
            await eventually(lambda: not listener.connected, 10, "the listener to notice")

            async def firing() -> list[dict[str, Any]]:
                return [
                    a
                    for a in await prom.alerts()  # type: ignore[union-attr]
                    if a["labels"]["alertname"] == "GatewayListenerDisconnected"
                ]

            # `for: 30s`, evaluated every second.
            await eventually(firing, 60, "GatewayListenerDisconnected to fire")
            [alert] = await firing()
            assert alert["labels"]["instance"] == target and alert["labels"]["severity"] == "page"
            assert "docs/deploy.md#listener-disconnected" in alert["annotations"]["summary"]
            assert target in alert["annotations"]["summary"]

            # The gateway may log in again: the listener reconnects and the alert resolves.
            await db.execute(f"ALTER ROLE {role} LOGIN")
            await gw.wait_ready()
            await eventually(lambda: _not(firing()), 20, "the alert to resolve")
            await client.close()
    finally:
        if prom is not None:
            prom.stop()
        await db.close()


async def _not(value: Any) -> bool:
    return not await value


async def test_a_metrics_port_taken_stops_the_gateway_with_a_clear_error(dsn: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(bare_env(), **settings_env(dsn, port=free_port(), metrics_port=port, workers=1))
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway", "serve"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 2, out.stderr
    assert f"cannot serve this worker's metrics on 127.0.0.1:{port} (GATEWAY_METRICS_PORT)" in out.stderr


def _deploy_yaml_blocks() -> list[str]:
    text = DEPLOY_MD.read_text()
    section = text[text.index("## Metrics, alerts and the dashboard") :]
    return re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)


def test_the_yaml_in_the_metrics_section_of_deploy_md_parses() -> None:
    blocks = _deploy_yaml_blocks()
    assert len(blocks) >= 5
    for block in blocks:
        assert isinstance(yaml.safe_load(block), dict), block


@needs_promtool
def test_the_static_scrape_config_of_deploy_md_is_valid_for_promtool(tmp_path: Path) -> None:
    """Copy-paste as the docs say: prometheus.yml beside alerts.yaml. (Debian builds Prometheus
    without Kubernetes discovery, so the pod job is only parsed, above.)"""
    assert PROMTOOL is not None
    [static] = [b for b in _deploy_yaml_blocks() if "static_configs" in b]
    (tmp_path / "prometheus.yml").write_text(static)
    shutil.copy(ALERTS, tmp_path / "alerts.yaml")
    out = subprocess.run(
        [PROMTOOL, "check", "config", "prometheus.yml"], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout + out.stderr
