"""The release (docs/release.md): one version, shown where operators and clients look, and a
wheel that installs and runs on its own.

The version is written once, in ``gateway/__init__.py``; pyproject.toml reads it, ``gateway
--version`` prints it, ``/healthz`` and the ``welcome`` frame carry it, and CHANGELOG.md has an
entry for it. The wheel is built with ``python -m build`` from a copy of the working tree (the
tree itself is left as it was), installed into a fresh virtual environment outside the checkout,
and run there: ``--help``, ``--version``, and ``migrate`` against a real database, which only
works if the wheel carries the SQL files.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import aiohttp
import pytest

from gateway import __version__

from .gwtest import REPO, bare_env, running_gateway, token
from .pgconn import connection


def test_the_version_is_written_once_and_has_a_changelog_entry() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"], (
        "the version lives in gateway/__init__.py"
    )
    dynamic = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]
    assert dynamic["version"] == {"attr": "gateway.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__), __version__
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(__version__)}\]", changelog, re.M), (
        f"CHANGELOG.md has no '## [{__version__}]' entry"
    )
    assert f"**{__version__}**" in (REPO / "README.md").read_text(), "README.md names the current version"


def test_gateway_version_prints_the_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "--version"],
        capture_output=True,
        text=True,
        env=bare_env(),
        check=True,
    )
    assert out.stdout.strip() == f"gateway {__version__}"


async def test_healthz_and_welcome_carry_the_version(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        async with aiohttp.ClientSession() as s, s.get(gw.base + "/healthz") as r:
            assert r.status == 200
            assert await r.json() == {"ok": True, "version": __version__}
        c = await gw.connect()
        welcome = await c.auth(token("ann"))
        assert welcome["version"] == __version__
        await c.close()


def _copy_of_the_tree(dest: Path) -> Path:
    """The working tree as it is (uncommitted changes included), without what a build or a
    virtual environment left in it."""
    skip = {".git", ".venv", "build", "dist", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache"}
    skip |= {".pytest_cache", ".hypothesis", "report"}
    shutil.copytree(
        REPO,
        dest,
        ignore=lambda _dir, names: [n for n in names if n in skip or n.endswith(".egg-info")],
    )
    return dest


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env or bare_env(), timeout=timeout)
    assert out.returncode == 0, (
        f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out.stdout


@pytest.mark.timeout(900)
async def test_the_wheel_carries_everything_installs_and_runs(tmp_path: Path, blank_dsn: str) -> None:
    src = _copy_of_the_tree(tmp_path / "src")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(src)], cwd=tmp_path, timeout=600)
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    assert wheel.name == f"pg_ws_gateway-{__version__}-py3-none-any.whl"
    assert sdist.name == f"pg_ws_gateway-{__version__}.tar.gz"

    names = set(zipfile.ZipFile(wheel).namelist())
    static = {f"gateway/static/{p.name}" for p in (REPO / "gateway" / "static").iterdir() if p.is_file()}
    assert static and static <= names, f"static client files missing from the wheel: {static - names}"
    data = f"pg_ws_gateway-{__version__}.data/data/share/pg-ws-gateway/sql/"
    sql = {data + p.relative_to(REPO / "sql").as_posix() for p in (REPO / "sql").rglob("*.sql")}
    assert sql and sql <= names, f"SQL files missing from the wheel: {sorted(sql - names)}"
    assert not any(n.startswith("tests/") for n in names), "the tests do not ship"

    # A fresh environment outside the checkout: nothing can come from the working tree.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, "-c", str(REPO / "requirements.lock"), str(wheel)], cwd=tmp_path, timeout=600)
    gateway = str(venv / "bin" / "gateway")
    assert "serve" in _run([gateway, "--help"], cwd=tmp_path)
    assert _run([gateway, "--version"], cwd=tmp_path).strip() == f"gateway {__version__}"
    env = {**bare_env(), "GATEWAY_DATABASE_URL": blank_dsn}
    env.pop("GATEWAY_SQL_DIR", None)
    assert "applied:" in _run([gateway, "migrate"], cwd=tmp_path, env=env)
    async with connection(blank_dsn) as db:
        assert await db.fetchval("SELECT to_regnamespace('gateway') IS NOT NULL")
    assert os.path.isdir(venv / "share" / "pg-ws-gateway" / "sql")
