"""The deployment files under deploy/: they parse, they agree with the code and with each other.

Each external checker (haproxy -c, nginx -t, systemd-analyze verify, kubectl kustomize,
the kubernetes-validate schemas) runs when it is installed and skips with the reason
otherwise; the structural checks beside them always run.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from gateway import config

from .gwtest import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SAMPLE = DEPLOY / "gateway.env.sample"
DEFAULTS = config.Settings()
SETTING_NAMES = {config.env_name(f.name) for f in config.settings_fields()}
# GATEWAY_* variables that are not settings (GATEWAY_SQL_DIR: where `gateway migrate` finds sql/).
EXTRA_ENV = config.NOT_SETTINGS
# The Kubernetes versions the manifests must be valid for: the oldest we still support and
# the newest the validator ships.
K8S_VERSIONS = ("1.27.0", "latest")


# --- helpers -----------------------------------------------------------------------------


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    for d in docs:
        assert isinstance(d, dict), f"{path.relative_to(ROOT)}: a document is not a mapping"
    return docs


def k8s_manifests() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path, d) for d in yaml_docs(path)]
    return out


def k8s_object(kind: str) -> dict[str, Any]:
    found = [d for _, d in k8s_manifests() if d.get("kind") == kind]
    assert len(found) == 1, f"expected exactly one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def parse_env_file(text: str) -> dict[str, str]:
    """NAME=value lines; a name twice is an error (the second would silently win)."""
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f"line {n} is neither a comment nor NAME=value: {line!r}"
        assert name not in out, f"line {n}: {name} is set twice"
        out[name] = value
    return out


def load_gen_env_sample() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_env_sample", DEPLOY / "gen_env_sample.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def drain_timeout() -> float:
    """GATEWAY_DRAIN_TIMEOUT as the Kubernetes ConfigMap sets it, else the default."""
    data = k8s_object("ConfigMap").get("data", {})
    return config.load(env=data).drain_timeout if data else DEFAULTS.drain_timeout


def systemd_seconds(text: str) -> float:
    """A systemd time span such as 30s, 5min, 1min 30s, or plain seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert parts, f"not a systemd time span: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def require_binary(name: str) -> str:
    path = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.exists()), None
    )
    if path is None:
        pytest.skip(f"{name} is not installed (CI installs it: apt-get install -y haproxy nginx)")
    return path


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


# --- every YAML file ---------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    assert yaml_docs(path), f"{path.relative_to(ROOT)} has no document"


# --- the env sample ----------------------------------------------------------------------


def test_env_sample_is_generated_from_settings() -> None:
    expected = load_gen_env_sample().render()
    assert SAMPLE.read_text(encoding="utf-8") == expected, (
        "deploy/gateway.env.sample is out of date with gateway/config.py: "
        "run `.venv/bin/python deploy/gen_env_sample.py`"
    )


def test_env_sample_lists_every_setting_once_with_a_comment() -> None:
    text = SAMPLE.read_text(encoding="utf-8")
    names = set(parse_env_file(text))
    assert names - SETTING_NAMES == set(), "the sample sets variables the gateway does not know"
    assert SETTING_NAMES - names == set(), "the sample misses settings"
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert lines[i - 1].startswith("# "), f"{line.split('=')[0]} has no comment above it"


def test_env_sample_defaults_parse_back_to_the_defaults() -> None:
    # The sample's values, placeholders aside, are what the gateway uses when nothing is set.
    gen = load_gen_env_sample()
    env = parse_env_file(SAMPLE.read_text(encoding="utf-8"))
    for name in gen.PLACEHOLDERS:
        env[config.env_name(name)] = ""
    assert config.load(env=env) == DEFAULTS


def test_env_sample_jwt_placeholder_stops_the_gateway() -> None:
    # A copied sample whose secret was not replaced must not start with a public secret.
    env = parse_env_file(SAMPLE.read_text(encoding="utf-8"))
    with pytest.raises(config.ConfigError, match="GATEWAY_JWT_SECRET"):
        config.load(env=env)


def test_gen_env_sample_check_flags_a_stale_file(tmp_path: Path) -> None:
    script = str(DEPLOY / "gen_env_sample.py")
    assert run([sys.executable, script, "--check"]).returncode == 0
    stale = tmp_path / "stale.env"
    stale.write_text(SAMPLE.read_text(encoding="utf-8").replace("GATEWAY_POOL_SIZE=4", "GATEWAY_POOL_SIZE=5"))
    result = run([sys.executable, script, "--check", "--output", str(stale)])
    assert result.returncode == 1
    assert "out of date" in result.stderr


# --- Dockerfile --------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined; heredoc bodies skipped."""
    out: list[tuple[str, str]] = []
    lines = iter((DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        word, _, args = line.strip().partition(" ")
        out.append((word.upper(), args.strip()))
        heredoc = re.search(r"<<-?'?(\w+)'?", args)
        if heredoc:
            for body in lines:
                if body.strip() == heredoc.group(1):
                    break
    return out


def test_dockerfile_builds_the_image_the_brief_describes() -> None:
    ins = dockerfile_instructions()
    args_of = {word: [a for w, a in ins if w == word] for word in {w for w, _ in ins}}
    assert args_of["ARG"] and "python:3.11-slim" in args_of["ARG"][0]
    runs = " ".join(args_of["RUN"])
    assert "-c requirements.lock" in runs and "--no-deps ." in runs
    # The migrations are installed with the package, so the image needs no GATEWAY_SQL_DIR.
    copy_sql = ins.index(("COPY", "sql ./sql"))
    install = next(i for i, (w, a) in enumerate(ins) if w == "RUN" and "--no-deps ." in a)
    assert copy_sql < install, "sql/ must be in the build context when the package is installed"
    assert not any("GATEWAY_SQL_DIR" in a for a in args_of["ENV"])
    assert args_of["EXPOSE"] == ["8080"]
    assert json.loads(args_of["CMD"][-1]) == ["gateway", "serve"]
    user = args_of["USER"][-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, "USER must be a numeric non-root id (runAsNonRoot checks it)"
    pod_user = k8s_object("Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert int(user) == pod_user, "the Dockerfile's USER and the Deployment's runAsUser differ"


def test_settings_accept_the_image_environment() -> None:
    # `gateway serve` reads settings in the image's environment and must not reject any of its
    # GATEWAY_* variables as unknown.
    env = {}
    for word, args in dockerfile_instructions():
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    gateway_env = {k: v for k, v in env.items() if k.startswith(config.PREFIX)}
    config.load(env=gateway_env)


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    assert "**" in ignore, "the ignore file is an allow-list: everything else stays out of the context"
    for word, args in dockerfile_instructions():
        if word != "COPY" or args.startswith("--from"):
            continue
        for source in args.split()[:-1]:
            assert f"!{source}" in ignore or f"!{source}/" in ignore, (
                f"COPY {source} is excluded from the context"
            )


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest's output clean
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[http.server.HTTPServer, type[_Health]]]:
    handler = type("Handler", (_Health,), {})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()
    thread.join()


def test_dockerfile_healthcheck_asks_healthz(
    health_server: tuple[http.server.HTTPServer, type[_Health]],
) -> None:
    # The HEALTHCHECK command, run as Docker would, against a real socket.
    server, handler = health_server
    (args,) = [a for w, a in dockerfile_instructions() if w == "HEALTHCHECK"]
    cmd = json.loads(args[args.index("CMD") + 3 :])
    assert cmd[0] == "python", "slim images have no curl: the check must use python"
    cmd[0] = sys.executable
    env = {"GATEWAY_PORT": str(server.server_address[1])}
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=30, check=False).returncode == 0
    handler.status = 500
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=30, check=False).returncode != 0


# --- compose -----------------------------------------------------------------------------


def test_compose_services_and_their_order() -> None:
    (compose,) = yaml_docs(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "healthcheck" in services["postgres"]

    migrate = services["migrate"]
    assert migrate["command"] == ["gateway", "migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"

    gateway = services["gateway"]
    assert gateway["command"] == ["gateway", "serve"]
    assert gateway["deploy"]["replicas"] == 3
    assert gateway["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert systemd_seconds(gateway["stop_grace_period"]) > DEFAULTS.drain_timeout, (
        "stop_grace_period must exceed GATEWAY_DRAIN_TIMEOUT or docker kills replicas mid-drain"
    )
    for name in ("migrate", "gateway"):
        service = services[name]
        assert service["env_file"] == ["gateway.env"]
        unknown = set(service["environment"]) - SETTING_NAMES - EXTRA_ENV
        assert not unknown, f"{name} sets variables the gateway rejects: {unknown}"
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()

    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in services["haproxy"]["volumes"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in services["nginx"]["volumes"]
    for service in services.values():
        for volume in service.get("volumes", []):
            if volume.startswith("./"):
                assert (DEPLOY / volume.split(":")[0]).is_file(), f"compose mounts a missing file: {volume}"


# --- load balancers ----------------------------------------------------------------------


def test_haproxy_config_is_websocket_aware() -> None:
    text = (DEPLOY / "haproxy.cfg").read_text(encoding="utf-8")
    assert re.search(r"^\s*timeout tunnel\s+\d+h", text, re.M), "WebSockets need a long `timeout tunnel`"
    assert re.search(r"http-check send meth GET uri /readyz", text)
    assert re.search(r"^\s*balance (leastconn|roundrobin)", text, re.M)
    assert "shutdown-sessions" not in re.sub(r"#.*", "", text), "cutting tunnels would bypass the 1012 drain"


def test_haproxy_accepts_the_config(tmp_path: Path) -> None:
    haproxy = require_binary("haproxy")
    # init-addr none: the compose hostname `gateway` need not resolve for the check.
    result = run([haproxy, "-c", "-f", str(DEPLOY / "haproxy.cfg")])
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "haproxy.cfg"
    broken.write_text(
        (DEPLOY / "haproxy.cfg").read_text(encoding="utf-8").replace("timeout tunnel", "timeout tunel")
    )
    assert run([haproxy, "-c", "-f", str(broken)]).returncode != 0, "haproxy -c did not catch a typo"


def nginx_check(conf: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    nginx = require_binary("nginx")
    # The compose hostname does not resolve here and nginx resolves upstreams at load.
    copy = tmp_path / "nginx.conf"
    copy.write_text(re.sub(r"server gateway:", "server 127.0.0.1:", conf.read_text(encoding="utf-8")))
    return run([nginx, "-t", "-q", "-e", "stderr", "-p", str(tmp_path), "-c", str(copy)])


def test_nginx_config_is_websocket_aware() -> None:
    text = (DEPLOY / "nginx.conf").read_text(encoding="utf-8")
    assert "proxy_set_header Upgrade $http_upgrade;" in text
    assert "proxy_set_header Connection $connection_upgrade;" in text
    assert re.search(r"proxy_read_timeout\s+\d+h;", text)
    # The gateway's Origin check compares with Host including the port; $host drops it.
    assert "proxy_set_header Host $http_host;" in text and "Host $host;" not in text
    assert "max_fails=" in text
    assert "no active health checks" in text.lower(), "the config must say why it relies on max_fails"


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    result = nginx_check(DEPLOY / "nginx.conf", tmp_path)
    assert result.returncode == 0, result.stderr
    broken = tmp_path / "broken.conf"
    broken.write_text(
        (DEPLOY / "nginx.conf").read_text(encoding="utf-8").replace("proxy_read_timeout", "read_timeout")
    )
    assert nginx_check(broken, tmp_path).returncode != 0, "nginx -t did not catch a typo"


class _Backend(http.server.BaseHTTPRequestHandler):
    """Stands in for a replica: every path answers 200 (/readyz included, for HAProxy's check)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def backend() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join()


SECRET_MARK = "s3cr3t-t0ken-in-the-url"


def _requests_with_a_token_in_the_url(port: int) -> None:
    """What a client that wrongly puts its token in the URL sends: a WebSocket upgrade to
    /ws?token=..., and a page with the token in its own URL fetching the client script."""
    import http.client

    for path, headers in (
        (
            f"/ws?token={SECRET_MARK}",
            {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
             "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="},
        ),
        (f"/client/gateway.js?access_token={SECRET_MARK}", {"Referer": f"http://app/page?token={SECRET_MARK}"}),
    ):  # fmt: skip
        for _ in range(50):  # the proxy may still be starting
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", path, headers=headers)
                conn.getresponse().read()
                conn.close()
                break
            except (ConnectionRefusedError, http.client.RemoteDisconnected):
                time.sleep(0.1)
        else:
            raise AssertionError(f"the proxy on port {port} never answered")


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return out + err


def test_haproxy_logs_no_query_string(tmp_path: Path, backend: int) -> None:
    """The shipped haproxy.cfg, run for real: a token in the URL does not reach its log."""
    haproxy = require_binary("haproxy")
    port, stats = free_port(), free_port()
    text = (DEPLOY / "haproxy.cfg").read_text(encoding="utf-8")
    text = re.sub(r"\nresolvers docker\n(?:[ \t]+.*\n|\s*\n)*?(?=\S)", "\n", text)  # Docker's DNS only
    text = re.sub(r"server-template .*", f"server gw1 127.0.0.1:{backend} check", text)
    text = text.replace("bind :8080", f"bind 127.0.0.1:{port}").replace(
        "bind :8404", f"bind 127.0.0.1:{stats}"
    )
    text = re.sub(r"maxconn 50000", "maxconn 1000", text)  # no raised fd limit here
    assert "\nresolvers docker" not in text
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    proc = subprocess.Popen(
        [haproxy, "-f", str(cfg), "-db"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _requests_with_a_token_in_the_url(port)
        time.sleep(0.5)  # the log line is written when the session ends
    finally:
        log = _stop(proc)
    assert "GET /ws HTTP/1.1" in log and "GET /client/gateway.js HTTP/1.1" in log, log
    assert SECRET_MARK not in log, log


def test_nginx_logs_no_query_string(tmp_path: Path, backend: int) -> None:
    """The shipped nginx.conf, run for real: a token in the URL does not reach its logs."""
    nginx = require_binary("nginx")
    port = free_port()
    text = (DEPLOY / "nginx.conf").read_text(encoding="utf-8")
    text = text.replace("server gateway:8080", f"server 127.0.0.1:{backend}")
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    text = text.replace("pid /tmp/nginx.pid;", f"pid {tmp_path}/nginx.pid;")
    text = re.sub(r"worker_processes \w+;", "worker_processes 1;", text)
    text = re.sub(r"worker_rlimit_nofile \d+;", "", text)
    text = re.sub(r"worker_connections \d+;", "worker_connections 256;", text)
    (tmp_path / "logs").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    proc = subprocess.Popen(
        [nginx, "-p", str(tmp_path), "-c", str(conf), "-e", "stderr", "-g", "daemon off;"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _requests_with_a_token_in_the_url(port)
    finally:
        log = _stop(proc)
    assert '"GET /ws HTTP/1.1" 200' in log and '"GET /client/gateway.js HTTP/1.1" 200' in log, log
    assert '"http://app/page"' in log, "the Referer is logged without its query"
    assert SECRET_MARK not in log, log


# --- Kubernetes --------------------------------------------------------------------------


def test_k8s_manifests_are_well_formed_and_namespace_agnostic() -> None:
    manifests = k8s_manifests()
    kinds = {d["kind"] for _, d in manifests}
    assert kinds >= {
        "Deployment",
        "Job",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "Secret",
    }
    for path, d in manifests:
        assert d.get("apiVersion") and d.get("metadata", {}).get("name"), (
            f"{path.name}: apiVersion/name missing"
        )
        assert "namespace" not in d["metadata"], f"{path.name} names a namespace; apply with -n instead"


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = yaml_docs(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_api_schemas(version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (PyPI) is not installed")
    version = kv.latest_version() if version == "latest" else version
    for path, d in k8s_manifests():
        try:
            kv.validate(d, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{path.name} ({d['kind']}) is not valid for Kubernetes {version}: {exc}")


def test_k8s_schema_check_catches_a_typo() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (PyPI) is not installed")
    deployment = k8s_object("Deployment")
    container = dict(deployment["spec"]["template"]["spec"]["containers"][0])
    container["readinesProbe"] = container.pop("readinessProbe")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0] = container
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, kv.latest_version(), strict=True)


def test_kubectl_kustomize_renders() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = run([kubectl, "kustomize", str(K8S)])
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(rendered) == len(k8s_manifests())


def test_deployment_probes_shutdown_and_security() -> None:
    deployment = k8s_object("Deployment")
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    configured_port = k8s_object("ConfigMap")["data"].get("GATEWAY_PORT", str(DEFAULTS.port))
    assert ports["http"] == int(configured_port)

    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}

    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # The grace period runs from the preStop hook: it must cover the sleep and the drain.
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain_timeout()

    assert pod["enableServiceLinks"] is False, "service links inject GATEWAY_* variables the gateway rejects"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert set(container["resources"]) == {"requests", "limits"}

    refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
    assert refs == {k8s_object("ConfigMap")["metadata"]["name"], k8s_object("Secret")["metadata"]["name"]}


def test_k8s_objects_point_at_each_other() -> None:
    deployment = k8s_object("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert k8s_object("Service")["spec"]["selector"].items() <= pod_labels.items()
    assert k8s_object("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = k8s_object("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    job_pod = k8s_object("Job")["spec"]["template"]["spec"]
    assert job_pod["containers"][0]["args"] == ["gateway", "migrate"]
    assert job_pod["enableServiceLinks"] is False


def test_k8s_settings_are_known_and_valid() -> None:
    config_map = k8s_object("ConfigMap")["data"]
    config.load(env=config_map)  # raises ConfigError naming a bad value
    secret = k8s_object("Secret")
    assert "stringData" in secret and "data" not in secret, "placeholders are readable as stringData"
    unknown = set(config_map) | set(secret["stringData"])
    unknown -= SETTING_NAMES | EXTRA_ENV
    assert not unknown, f"variables the gateway rejects: {unknown}"


# --- systemd -----------------------------------------------------------------------------


UNIT = DEPLOY / "systemd" / "gateway.service"


def unit_entries() -> list[tuple[str, str, str]]:
    """(section, key, value); keys may repeat (systemd appends), so configparser will not do."""
    out, section = [], ""
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"bad section header {line!r}"
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep and section, f"not a key=value line inside a section: {line!r}"
        out.append((section, key.strip(), value.strip()))
    return out


def test_systemd_unit_settings() -> None:
    entries = unit_entries()
    service = {k: v for s, k, v in entries if s == "Service"}
    assert {s for s, _, _ in entries} == {"Unit", "Service", "Install"}
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")
    assert service["EnvironmentFile"] == "/etc/gateway/gateway.env"
    assert service["ExecStartPre"].endswith("gateway migrate")
    assert service["ExecStart"].endswith("gateway serve")
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert systemd_seconds(service["TimeoutStopSec"]) > DEFAULTS.drain_timeout
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed; the unit was checked as INI only")
    # verify insists that executables exist: point the unit at a stub in a temporary copy.
    stub = tmp_path / "gateway"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    env = tmp_path / "gateway.env"
    env.write_text("")
    text = UNIT.read_text(encoding="utf-8").replace("/opt/gateway/venv/bin/gateway", str(stub))
    unit = tmp_path / "gateway.service"
    unit.write_text(text.replace("/etc/gateway/gateway.env", str(env)))
    result = run([analyze, "verify", str(unit)])
    # Unknown keys and bad values are only warnings (exit 0): any output is a failure.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


# --- docs --------------------------------------------------------------------------------


def test_deploy_docs_name_only_files_that_exist() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"\bdeploy/[\w./-]*[\w]", text))
    assert paths, "docs/deploy.md names no deploy/ file"
    # deploy/gateway.env is the reader's own copy of the sample, never in the repository.
    for path in paths - {"deploy/gateway.env"}:
        assert (ROOT / path).exists(), f"docs/deploy.md names {path}, which does not exist"
    assert "deploy/gateway.env.sample" in paths, "the page must point at the list of every setting"
