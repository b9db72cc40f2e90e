"""gateway.dev.pgcluster: throwaway clusters start, restart, stop, and leave nothing behind."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from gateway.dev import pgcluster
from gateway.dev.pgcluster import (
    INSTALL_HINT,
    ClusterError,
    ExistingPostgres,
    LocalCluster,
    Postgres,
    PostgresUnavailable,
    RestartUnsupported,
    docker_available,
    find_pg_bin,
    free_port,
    throwaway_postgres,
)
from tests.conftest import PgRestart

from .pgconn import pg_connect

needs_binaries = pytest.mark.skipif(
    find_pg_bin() is None, reason="no local PostgreSQL server binaries (initdb, pg_ctl, postgres)"
)


def processes_using(path: Path) -> list[psutil.Process]:
    """Live processes whose command line names ``path`` (the postmaster is started with -D path)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and any(str(path) in a for a in p.info["cmdline"] or ()):
            found.append(p)
    return found


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def cluster_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("gateway-pg-*"))


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    if find_pg_bin() is None:
        pytest.skip("no local PostgreSQL server binaries (initdb, pg_ctl, postgres)")
    with LocalCluster(fast=True) as c:
        yield c


async def query(dsn: str, sql: str) -> object:
    conn = await pg_connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def test_find_pg_bin_finds_all_three_programs() -> None:
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip("no local PostgreSQL server binaries")
    for tool in ("initdb", "pg_ctl", "postgres"):
        assert (bin_dir / tool).is_file(), f"{bin_dir} lacks {tool}"


@needs_binaries
async def test_start_then_stop_leaves_no_process_and_no_directory() -> None:
    c = LocalCluster(fast=True).start()
    base, port, pid = c.base_dir, c.port, c.postmaster_pid()
    assert base is not None and port is not None and pid is not None
    try:
        assert base.is_dir()
        assert processes_using(c.data_dir)
        assert await query(c.dsn(), "SELECT current_setting('listen_addresses')") == "127.0.0.1"
        assert await query(c.dsn(), "SELECT current_setting('fsync')") == "off"
        assert await query(c.dsn(), "SELECT current_setting('max_connections')::int") == 300
        assert await query(c.dsn(), "SELECT current_setting('unix_socket_directories')") == str(c.socket_dir)
    finally:
        c.stop()

    assert not base.exists()
    assert processes_using(base) == []
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not accepts_connections(port)
    c.stop()  # a second stop is harmless
    assert c.base_dir is None


@needs_binaries
async def test_context_manager_stops_the_cluster() -> None:
    with LocalCluster() as c:
        base = c.base_dir
        assert base is not None
        # Not fast: durability settings stay at PostgreSQL's defaults.
        assert await query(c.dsn(), "SELECT current_setting('fsync')") == "on"
    assert base is not None and not base.exists()
    assert processes_using(base) == []


async def test_restart_keeps_data_and_port(cluster: LocalCluster) -> None:
    port, pid = cluster.port, cluster.postmaster_pid()
    conn = await pg_connect(cluster.dsn())
    try:
        await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('before restart')")
        cluster.restart()
        # The old session died with the server: proof it really restarted.
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await conn.fetchval("SELECT 1")
    finally:
        conn.terminate()
    assert cluster.port == port
    assert cluster.postmaster_pid() not in (None, pid)
    assert await query(cluster.dsn(), "SELECT v FROM kept") == "before restart"


async def test_kill_then_restart_recovers_committed_data(cluster: LocalCluster) -> None:
    conn = await pg_connect(cluster.dsn())
    try:
        # fast=True commits asynchronously; this commit must be durable to survive a crash.
        await conn.execute(
            "SET synchronous_commit = on; CREATE TABLE kept (v int); INSERT INTO kept VALUES (7)"
        )
    finally:
        await conn.close()
    cluster.kill()
    assert not cluster.is_running()
    assert cluster.port is not None and not accepts_connections(cluster.port)
    cluster.restart()
    assert cluster.is_running()
    assert await query(cluster.dsn(), "SELECT v FROM kept") == 7


@needs_binaries
def test_taken_port_is_reported_and_leaves_nothing() -> None:
    before = cluster_dirs()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ClusterError, match=f"port {port} on 127.0.0.1 is already in use"):
            LocalCluster(port=port).start()
    assert cluster_dirs() <= before


def test_dsn_before_start_is_an_error() -> None:
    with pytest.raises(ClusterError, match="not been started"):
        LocalCluster().dsn()
    with pytest.raises(ValueError, match="port must be between 1 and 65535, not 70000"):
        LocalCluster(port=70000)


def test_nothing_available_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pgcluster, "find_pg_bin", lambda: None)
    monkeypatch.setattr(pgcluster, "docker_available", lambda timeout=3.0: False)
    with pytest.raises(PostgresUnavailable) as info, throwaway_postgres(fast=True):
        pass
    assert str(info.value) == INSTALL_HINT
    assert "sudo apt-get install postgresql" in INSTALL_HINT and "brew install postgresql" in INSTALL_HINT


def test_docker_available_is_false_when_nothing_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{free_port()}")
    assert docker_available(timeout=2) is False


def test_existing_postgres_swaps_the_database_only() -> None:
    server = ExistingPostgres("postgresql://u:p%40ss@db.example:6543/app?sslmode=require")
    assert server.dsn("other") == "postgresql://u:p%40ss@db.example:6543/other?sslmode=require"
    assert server.can_restart is False
    with pytest.raises(RestartUnsupported, match="given by URL"):
        server.restart()
    with pytest.raises(ValueError, match="expected a PostgreSQL URL"):
        ExistingPostgres("mysql://db.example/app")


# --- the pg_restart fixture of conftest.py ----------------------------------------------


async def test_pg_restart_fixture_keeps_the_test_database(dsn: str, pg_restart: PgRestart) -> None:
    conn = await pg_connect(dsn)
    try:
        await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('before restart')")
    finally:
        await conn.close()

    await pg_restart.arestart()
    assert await query(dsn, "SELECT v FROM kept") == "before restart"

    await pg_restart.adown()
    with pytest.raises(OSError):
        await pg_connect(dsn, timeout=5)
    await pg_restart.aup()
    assert await query(dsn, "SELECT count(*) FROM kept") == 1


_left_down: list[bool] = []


def test_pg_restart_fixture_left_down(pg_restart: PgRestart) -> None:
    pg_restart.down()
    assert not pg_restart.server.is_running()
    _left_down.append(True)


def test_pg_restart_fixture_brought_it_back_up(pg: Postgres) -> None:
    if not _left_down:
        pytest.skip("runs after test_pg_restart_fixture_left_down")
    assert pg.is_running()
