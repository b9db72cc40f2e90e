"""The command line as an operator meets it: bad input gives a message and exit code 2, never a
traceback or a secret; the worker supervisor stops what it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
import pytest

from gateway.config import mask_dsn

from .gwtest import REPO, SECRET, DemoProcess, GatewayProcess, bare_env, free_port, settings_env
from .pgconn import pg_connect
from .polling import eventually

pytestmark = pytest.mark.timeout(120)


def cli_env(dsn: str, **overrides: object) -> dict[str, str]:
    env = bare_env()
    env.update(settings_env(dsn, workers=1, **overrides))
    return env


def cli(dsn: str, *args: str, **overrides: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env=cli_env(dsn, **overrides),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


# --- secrets and bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://gw:hunter2secret@db.example:5432/app",
        "postgresql://gw@db.example:5432/app?password=hunter2secret&sslmode=require",
        "postgresql://gw@db.example/app?sslmode=verify-full&sslpassword=hunter2secret",
        "postgresql://gw:hunter2#secret@db.example/app",  # an unescaped '#': urlsplit sees no password
    ],
)
def test_every_form_of_password_is_masked(dsn: str) -> None:
    assert "hunter2" not in mask_dsn(dsn) and "***" in mask_dsn(dsn)


def test_a_password_given_as_a_url_parameter_is_not_printed() -> None:
    r = cli(f"postgresql://gw@127.0.0.1:{free_port()}/app?password=hunter2secret", "migrate")
    assert r.returncode == 2 and "hunter2secret" not in r.stderr, r.stderr


def test_a_port_above_65535_is_refused() -> None:
    # uvloop would listen on port % 65536 and log the number it was given.
    r = cli("postgresql://gw@127.0.0.1/app", "serve", port=65536 + 8080)
    assert r.returncode == 2 and "GATEWAY_PORT" in r.stderr and "65535" in r.stderr, r.stderr


def test_serve_with_a_malformed_port_in_the_url_says_so() -> None:
    r = cli("postgresql://gw:pw@127.0.0.1:54x2/app", "serve")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "pw" not in r.stderr.split("***")[0], (
        r.stderr
    )


async def test_a_role_without_privileges_gets_a_message_not_a_traceback(dsn: str) -> None:
    db = await pg_connect(dsn)
    none, usage = f"none_{uuid.uuid4().hex[:8]}", f"usage_{uuid.uuid4().hex[:8]}"  # roles are cluster-wide
    try:
        await db.execute(f"CREATE ROLE {none} LOGIN PASSWORD 'pw'")
        await db.execute(f"CREATE ROLE {usage} LOGIN PASSWORD 'pw'")
        await db.execute(f"GRANT USAGE ON SCHEMA gateway TO {usage}")  # but no table
        u = urlsplit(dsn)
        bad = []
        for user, args in ((none, ["migrate", "--status"]), (none, ["serve"]), (usage, ["migrate"])):
            r = cli(urlunsplit(u._replace(netloc=f"{user}:pw@{u.hostname}:{u.port}")), *args, port=0)
            if r.returncode != 2 or "Traceback" in r.stderr or "permission denied" not in r.stderr:
                bad.append((user, args, r.returncode, r.stderr.strip().splitlines()[-1:]))
        assert bad == []
    finally:
        await db.execute(f"DROP OWNED BY {usage}; DROP ROLE {none}; DROP ROLE {usage}")
        await db.close()


def test_config_check_shows_what_is_set_without_its_secrets() -> None:
    r = cli(
        "postgresql://gw:hunter2secret@db.example/app", "config", "--check", "--tables", 'public."Orders"'
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "GATEWAY_DATABASE_URL=postgresql://gw:***@db.example/app" in lines
    assert "GATEWAY_JWT_SECRET=***" in lines and 'GATEWAY_TABLES=public."Orders"' in lines
    assert "hunter2" not in r.stdout and SECRET not in r.stdout
    assert lines[-1].startswith("configuration is valid")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"tables": "public.items(id"}, "GATEWAY_TABLES entry"),
        ({"jwt_secret": ""}, "no way to verify tokens"),
        ({"heartbeat_ttl": "1"}, "GATEWAY_HEARTBEAT_TTL"),
    ],
)
def test_config_check_refuses_what_serve_would(overrides: dict[str, str], expected: str) -> None:
    r = cli("postgresql://gw@db.example/app", "config", "--check", **overrides)
    assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_an_abbreviated_flag_is_refused() -> None:
    # "--worker 2" passing for --workers would be handed to every worker: workers of workers.
    r = cli("postgresql://gw@127.0.0.1/app", "serve", "--worker", "2")
    assert r.returncode == 2 and "unrecognized arguments: --worker" in r.stderr, r.stderr


# --- the supervisor -----------------------------------------------------------------------------


async def _children(
    sup: psutil.Process, n: int, exclude: set[int], timeout: float = 15
) -> list[psutil.Process]:
    return await eventually(
        lambda: kids if len(kids := [k for k in sup.children() if k.pid not in exclude]) >= n else None,
        timeout,
        lambda: f"{n} workers (have {sup.children()})",
        interval=0.02,
    )


async def _wait_log(path: Path, needle: str, timeout: float = 15) -> None:
    await eventually(
        lambda: needle in path.read_text(),
        timeout,
        lambda: f"{needle!r} in the log:\n{path.read_text()[-2000:]}",
    )


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Whatever is left of a supervisor's process group (started with start_new_session)."""
    for _ in range(50):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    proc.wait(10)


def test_several_workers_without_a_database_url_exit_at_once() -> None:
    env = cli_env("")
    env.pop("DATABASE_URL", None)
    env.pop("GATEWAY_DATABASE_URL", None)
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--workers", "2"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "DATABASE_URL" in r.stderr and "worker" not in r.stderr, r.stderr


def test_workers_that_cannot_start_stop_the_supervisor(dsn: str, tmp_path: Path) -> None:
    """What only a worker can find (its port is taken; settings and tables are checked before
    workers start) fails every worker's start the same way: the supervisor must exit with
    their status, not restart them once a second."""
    logp = tmp_path / "supervisor.log"
    with socket.socket() as taken:  # without SO_REUSEPORT: the workers cannot share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with open(logp, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--workers", "2"],
                env=cli_env(dsn, port=taken.getsockname()[1]),
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            kill_group(proc)
    text = logp.read_text()
    assert code == 2, text[-2000:]
    assert "cannot listen on" in text and "could not start" in text and "restarting" not in text, text[-2000:]


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"jwt_secret": ""}, "no way to verify tokens"),
        (
            {"tables": "public.no_such_table"},
            "GATEWAY_TABLES lists public.no_such_table, but no such table exists",
        ),
    ],
)
def test_serve_with_workers_checks_settings_and_tables_once_before_starting_them(
    dsn: str, overrides: dict[str, str], error: str
) -> None:
    """What every worker would refuse (no way to verify tokens, a table that is not there) is
    found by the supervisor before it starts any: printed once, not once per worker
    (and interleaved), and the exit status is 2."""
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--workers", "2"],
        env=cli_env(dsn, port=free_port(), **overrides),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert out.count(error) == 1, out
    assert "worker" not in out and "Traceback" not in out, out


async def test_sigterm_during_a_restart_backoff_stops_every_worker(dsn: str, tmp_path: Path) -> None:
    """A worker that crashes twice within a second makes the supervisor wait before restarting
    it; a SIGTERM in that wait must still stop everything (no new worker nobody stops)."""
    port = free_port()
    logp = tmp_path / "supervisor.log"
    with open(logp, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--workers", "2"],
            env=dict(os.environ, **settings_env(dsn, port=port)),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        sup = psutil.Process(proc.pid)
        workers = await _children(sup, 2, set())
        gw = GatewayProcess.__new__(GatewayProcess)
        gw.base = f"http://127.0.0.1:{port}"
        await gw.wait_ready()
        first = workers[0]
        first.send_signal(signal.SIGKILL)
        await _wait_log(logp, f"pid {first.pid}) exited with -9; restarting")
        (second,) = [w for w in await _children(sup, 2, {first.pid}) if w.pid != workers[1].pid]
        second.send_signal(signal.SIGKILL)  # within a second of its start: the supervisor waits
        await _wait_log(logp, f"pid {second.pid}) exited with -9; restarting")
        proc.send_signal(signal.SIGTERM)  # during that wait
        try:
            assert proc.wait(20) == 0
        except subprocess.TimeoutExpired:
            left = [(c.pid, c.cmdline()[-3:]) for c in sup.children()]
            raise AssertionError(f"the supervisor still runs 20 s after SIGTERM; workers: {left}") from None
    finally:
        kill_group(proc)


# --- the demo ------------------------------------------------------------------------------------


async def test_the_demo_listens_on_loopback_unless_told_otherwise(dsn: str, tmp_path: Path) -> None:
    """The demo mints a token for any name and commits rows on request: it must not be
    reachable from the network just because GATEWAY_HOST defaults to every interface."""
    demo = DemoProcess(dsn, tmp_path / "demo.log")
    del demo.env["GATEWAY_HOST"]
    await demo.start()
    try:
        assert demo.proc is not None
        listening = {
            c.laddr.ip
            for c in psutil.Process(demo.proc.pid).net_connections()
            if c.status == psutil.CONN_LISTEN
        }
        assert listening == {"127.0.0.1"}, listening
    finally:
        await demo.stop()
