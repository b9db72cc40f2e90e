"""The browser client as the npm package ``pg-ws-gateway`` (clients/js/).

Its types (gateway.d.ts, react.d.ts) against the protocol and TypeScript's compiler, the files
``npm pack`` puts in the tarball (the gateway's own gateway/static/ files, byte for byte), and a
frontend project installing that tarball and type-checking its use of it. TypeScript and React's
types come from clients/js/package-lock.json (``make js``); without Node and npm the tests that
need them skip, saying so. The React hooks run in tests/test_browser_react.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from gateway import protocol as p
from gateway.server import SUBPROTOCOL

from .gwtest import REPO

PACKAGE = REPO / "clients" / "js"
NODE_MODULES = PACKAGE / "node_modules"
TSC = NODE_MODULES / "typescript" / "bin" / "tsc"
# What a frontend project gets, nothing more (no tests, no build script, no lock file).
PACKED = {
    "LICENSE",
    "README.md",
    "package.json",
    "gateway.js",
    "gateway.mjs",
    "gateway.d.ts",
    "gateway-rooms.js",
    "gateway-rooms.mjs",
    "gateway-rooms.d.ts",
    "react.mjs",
    "react.d.ts",
}


def node_tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        pytest.skip("needs Node and npm (Debian packages nodejs and npm) for the npm package's tests")
    return node, npm


def installed_tsc() -> tuple[str, Path]:
    node, _ = node_tools()
    if not TSC.exists():
        pytest.skip(f"no TypeScript in {NODE_MODULES}: run `make js` (npm ci in clients/js)")
    return node, TSC


def run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def pack(npm: str, into: Path) -> Path:
    """``npm pack`` of clients/js (its prepack script copies the client in); returns the tarball."""
    out = run([npm, "pack", "--json", "--pack-destination", str(into)], PACKAGE)
    [info] = json.loads(out.stdout)
    return into / info["filename"]


@pytest.fixture(scope="module")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, npm = node_tools()
    return pack(npm, tmp_path_factory.mktemp("npm-pack"))


# --- the types say what the protocol says (Python alone: no Node needed) ----------------------

DTS = (PACKAGE / "gateway.d.ts").read_text(encoding="utf-8")


def union(name: str) -> list[str]:
    """The members of ``export type <name> = | "a" | 1 ...;`` in gateway.d.ts, in order."""
    m = re.search(rf"export type {name} =([^;]*);", DTS)
    assert m, f"gateway.d.ts has no `export type {name}`"
    return [v.strip().strip('"') for v in m.group(1).split("|") if v.strip()]


def test_the_types_list_exactly_the_protocols_error_codes() -> None:
    assert sorted(union("ServerErrorCode")) == sorted(p.ERROR_CODES)


def test_the_types_list_exactly_the_protocols_close_codes_by_name() -> None:
    m = re.search(r"export interface CloseCodes \{(.*?)\n\}", DTS, re.S)
    assert m, "gateway.d.ts has no `export interface CloseCodes`"
    declared = {name: int(code) for name, code in re.findall(r"^\s*(\w+): (\d+);", m.group(1), re.M)}
    assert declared == p.CLOSE_CODES


def test_the_types_reconnect_after_the_protocols_close_codes() -> None:
    assert sorted(int(c) for c in union("ReconnectCode")) == sorted(p.RECONNECT_AFTER)


def test_the_package_major_version_is_the_protocol_version() -> None:
    manifest = json.loads((PACKAGE / "package.json").read_text(encoding="utf-8"))
    protocol_version = int(SUBPROTOCOL.removeprefix("gateway.v"))
    assert manifest["name"] == "pg-ws-gateway"
    assert int(manifest["version"].split(".")[0]) == protocol_version, manifest["version"]


def test_the_javascript_tools_are_pinned_in_the_lock_file() -> None:
    manifest = json.loads((PACKAGE / "package.json").read_text(encoding="utf-8"))
    lock = json.loads((PACKAGE / "package-lock.json").read_text(encoding="utf-8"))
    for name, version in manifest["devDependencies"].items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"{name} {version}: pin an exact version"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version, name


# --- TypeScript's compiler ---------------------------------------------------------------------


def test_typed_usage_examples_compile_and_the_types_refuse_misuse() -> None:
    """clients/js/test/: the core client, rooms and the React hooks used from TypeScript, strict; the
    lines marked @ts-expect-error must fail to compile (tsc reports an unused one)."""
    node, tsc = installed_tsc()
    run([node, str(tsc), "-p", "test"], PACKAGE)


def test_a_page_script_is_typed_through_the_global() -> None:
    """TypeScript for a page with <script src=".../gateway.js"> (no modules): the global PgGateway."""
    node, tsc = installed_tsc()
    run([node, str(tsc), "-p", "test/tsconfig.script.json"], PACKAGE)


def test_tsc_catches_a_wrong_use() -> None:
    """The check above can fail: the same compiler and settings on one misuse, unmarked."""
    node, tsc = installed_tsc()
    test = PACKAGE / "test"
    (test / "_wrong_use.ts").write_text(
        'import { connect } from "pg-ws-gateway";\nconnect({ token: 42 });\n', encoding="utf-8"
    )
    config = {"extends": "./tsconfig.json", "files": ["_wrong_use.ts"]}
    (test / "_wrong_use.json").write_text(json.dumps(config), encoding="utf-8")
    try:
        done = subprocess.run(
            [node, str(tsc), "-p", "test/_wrong_use.json"],
            cwd=PACKAGE,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        (test / "_wrong_use.ts").unlink()
        (test / "_wrong_use.json").unlink()
    errors = [line for line in done.stdout.splitlines() if ": error TS" in line]
    assert len(errors) == 1 and errors[0].startswith("test/_wrong_use.ts(2,"), done.stdout
    assert "'number' is not assignable to type 'TokenSource'" in done.stdout, done.stdout


# --- npm pack -------------------------------------------------------------------------------------


def test_npm_pack_lists_exactly_the_intended_files() -> None:
    _, npm = node_tools()
    out = run([npm, "pack", "--dry-run", "--json"], PACKAGE)
    [info] = json.loads(out.stdout)
    assert {f["path"] for f in info["files"]} == PACKED


def test_the_tarball_holds_the_files_the_gateway_serves_and_the_license(tarball: Path) -> None:
    with tarfile.open(tarball) as tar:
        files = {m.name.removeprefix("package/"): tar.extractfile(m) for m in tar.getmembers() if m.isfile()}
        content = {name: f.read() for name, f in files.items() if f is not None}
    assert set(content) == PACKED
    for name in ("gateway.js", "gateway.mjs", "gateway-rooms.js", "gateway-rooms.mjs"):
        assert content[name] == (REPO / "gateway" / "static" / name).read_bytes(), name
    assert content["LICENSE"] == (REPO / "LICENSE").read_bytes()
    assert b"Copyright (c) 2026 the pg-ws-gateway authors" in content["LICENSE"]


# --- a frontend project installs the tarball -------------------------------------------------------


def test_a_project_installs_the_tarball_and_type_checks_its_use(tarball: Path, tmp_path: Path) -> None:
    """The "done when" of the npm package: `npm install` of the packed tarball into a fresh
    project, which then type-checks a file importing pg-ws-gateway and pg-ws-gateway/react.
    TypeScript and React's types at the lock file's versions come from npm's cache (filled by
    `make js`); npm asks the registry only for what the cache lacks."""
    _, npm = node_tools()
    lock = json.loads((PACKAGE / "package-lock.json").read_text(encoding="utf-8"))["packages"]
    tools = [f"{name}@{lock[f'node_modules/{name}']['version']}" for name in ("typescript", "@types/react")]
    project = tmp_path / "app"
    project.mkdir()
    manifest: dict[str, Any] = {"name": "app", "version": "0.0.0", "private": True, "type": "module"}
    (project / "package.json").write_text(json.dumps(manifest), encoding="utf-8")
    run([npm, "install", "--prefer-offline", "--no-audit", "--no-fund", str(tarball), *tools], project, 300)

    installed = project / "node_modules" / "pg-ws-gateway"
    assert not installed.is_symlink(), "installed as a link to the checkout, not from the tarball"
    assert {f.name for f in installed.iterdir()} == PACKED
    usages = ["usage.ts", "usage-react.tsx", "usage-rooms.ts"]
    for name in usages:
        shutil.copy(PACKAGE / "test" / name, project / name)
    config = json.loads((PACKAGE / "test" / "tsconfig.json").read_text(encoding="utf-8"))
    config["files"] = usages  # the types now come from node_modules
    (project / "tsconfig.json").write_text(json.dumps(config), encoding="utf-8")
    node, _ = node_tools()
    run([node, str(project / "node_modules" / "typescript" / "bin" / "tsc"), "-p", "."], project)
