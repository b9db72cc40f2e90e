"""A rolling upgrade (docs/release.md, "Upgrading a deployment"): replicas of the previous
version and of this working tree serve side by side behind a real HAProxy while rows are
committed continuously and clients move between them. Nothing may be lost or delivered twice,
and neither version may stumble on the other's doorbells, whichever holds the relay lease.

The order is the documented one: the database is migrated by the *new* version first, then
the replicas roll. Timeline: an old replica (which takes the relay lease) and a new one serve;
the old one drains, its clients resume on the new one, which takes over the lease; an old one
comes back (a replica not yet upgraded, or a rollback) and new clients land on both while the
new one rings; then the new one drains and everyone resumes on the old one.

Which previous version: the newest release tag (``v*``) of another version than this tree's;
until the first release is tagged, the last pre-release commit (``PRE_RELEASE``, main before
0.1.0). That commit speaks the same doorbells and runs on the baseline schema, so this proves
the replicas interoperate; it is not a database upgrade from a pre-release schema, which is not
supported (``gateway migrate`` refuses one). ``TEST_PREVIOUS_REF`` names another commit.
The previous version is exported with ``git archive`` and installed, from its own lock file,
into a virtual environment of its own; without git history (an sdist) the test is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import __version__

from .gwtest import REPO, GatewayProcess, free_port, make_items_table
from .lbtest import HAPROXY, ResumingClient, haproxy_config, haproxy_status
from .pgconn import pg_connect
from .polling import eventually

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (CI installs Debian's haproxy)"),
]

# main's last commit before the first release (0.1.0): the predecessor until a release is tagged.
PRE_RELEASE = "2c8f14c92f8148460b2ec432201f904e368f23f1"
TOPICS = [f"room:{i}" for i in range(4)]


def _git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise LookupError(out.stderr.strip() or f"git {' '.join(args)} failed")
    return out.stdout.strip()


def previous_ref() -> tuple[str, str]:
    """(commit, what it is) of the version to upgrade from; LookupError saying why there is none."""
    named = os.environ.get("TEST_PREVIOUS_REF", "").strip()
    if named:
        return _git("rev-parse", "--verify", f"{named}^{{commit}}"), f"TEST_PREVIOUS_REF={named}"
    tags = _git("tag", "--list", "v*", "--sort=-v:refname", "--merged", "HEAD").split()
    for tag in tags:
        if tag != f"v{__version__}":
            return _git("rev-parse", f"{tag}^{{commit}}"), f"the release {tag}"
    _git("cat-file", "-e", f"{PRE_RELEASE}^{{commit}}")
    return PRE_RELEASE, f"the last pre-release commit {PRE_RELEASE[:10]} (no earlier release is tagged)"


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The previous version's ``gateway`` program, installed in a virtual environment of its own."""
    try:
        commit, what = previous_ref()
    except (LookupError, OSError) as exc:
        pytest.skip(f"no previous version to upgrade from: {exc}")
    base = tmp_path_factory.mktemp("previous")
    src, venv = base / "src", base / "venv"
    src.mkdir()
    archive = base / "src.tar"
    _git("archive", "--format=tar", f"--output={archive}", commit)
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="data")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    lock = str(src / "requirements.lock")  # the previous version's own locked dependencies
    pip = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-c",
            lock,
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, f"installing {what} failed:\n{pip.stderr[-3000:]}"
    return venv / "bin" / "gateway", what


class PreviousGatewayProcess(GatewayProcess):
    """``gateway serve`` of the previous version, run from outside the checkout."""

    def __init__(self, program: Path, dsn: str, log_path: Path, **overrides: Any) -> None:
        super().__init__(dsn, log_path, **overrides)
        self.program = program

    async def start(self) -> GatewayProcess:
        self._log = open(self.log_path, "ab")
        env = {k: v for k, v in self.env.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen(
            [str(self.program), "serve"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.log_path.parent,
        )
        try:
            await self.wait_ready(self.start_timeout)
        except AssertionError:
            self.kill()
            raise AssertionError(
                f"the previous gateway did not start:\n{self.log_path.read_text()[-3000:]}"
            ) from None
        return self


async def test_old_and_new_replicas_side_by_side_lose_and_double_nothing(
    dsn: str, tmp_path: Path, previous: tuple[Path, str]
) -> None:
    program, what = previous
    # Migrated by the new version (the `dsn` fixture), then the application's table published.
    await make_items_table(dsn, "'room:' || owner_id")
    settings = {"drain_timeout": 3, "max_connections_per_user": 100, "tables": "items"}
    old = PreviousGatewayProcess(program, dsn, tmp_path / "old.log", **settings)
    new = GatewayProcess(dsn, tmp_path / "new.log", **settings)
    await old.start()  # first: it takes the relay lease, so the new replica reads its doorbells
    await new.start()
    async with aiohttp.ClientSession() as s, s.get(new.base + "/healthz") as r:
        assert (await r.json())["version"] == __version__

    lb_port, stats_port = free_port(), free_port()
    (tmp_path / "haproxy.cfg").write_text(haproxy_config(lb_port, stats_port, [old.port, new.port]))
    lb = subprocess.Popen(
        [str(HAPROXY), "-f", str(tmp_path / "haproxy.cfg"), "-db"], stdout=subprocess.DEVNULL
    )
    url = f"ws://127.0.0.1:{lb_port}/ws"
    followers: list[ResumingClient] = []
    tasks: list[asyncio.Task[None]] = []
    db = await pg_connect(dsn)
    committed = 0

    async def both_up(up: dict[str, bool]) -> None:
        seen: dict[str, str] = {}

        async def as_wanted() -> bool:
            nonlocal seen
            with contextlib.suppress(aiohttp.ClientError, OSError):  # HAProxy still starting
                seen = await haproxy_status(stats_port)
            return all((seen.get(name) == "UP") == want for name, want in up.items())

        await eventually(as_wanted, 30, lambda: f"HAProxy to see {up} (it says {seen})", interval=0.1)

    async def follow(n: int) -> None:
        fresh = [ResumingClient(url, f"u{len(followers) + i}", TOPICS[i % len(TOPICS)]) for i in range(n)]
        followers.extend(fresh)
        tasks.extend(asyncio.create_task(f.run()) for f in fresh)
        await eventually(lambda: all(f.epoch is not None for f in fresh), 20, "every new client subscribed")

    async def write(seconds: float) -> None:
        nonlocal committed
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await db.execute(
                "INSERT INTO items (owner_id, title) VALUES ($1, 'x')", random.randrange(len(TOPICS))
            )
            committed += 1
            await asyncio.sleep(0.005)

    try:
        await both_up({"g0": True, "g1": True})
        await follow(8)  # round robin: on both versions
        await write(1.5)
        old.signal(signal.SIGTERM)  # the old replica drains: its clients resume on the new one
        await write(1.5)
        assert await old.wait_exit(15) == 0
        await old.stop()  # closes its log
        await write(0.5)

        # An old replica again (not yet upgraded, or a rollback), while the new one rings.
        old = PreviousGatewayProcess(program, dsn, tmp_path / "old2.log", port=old.port, **settings)
        await old.start()
        await both_up({"g0": True, "g1": True})
        await follow(8)
        await write(1.5)
        new.signal(signal.SIGTERM)  # now the new one drains: everyone resumes on the old one
        await write(1.5)
        assert await new.wait_exit(15) == 0
        await write(1.0)

        heads = {r["topic"]: r["pos"] for r in await db.fetch("SELECT topic, pos FROM gateway.topics")}

        def behind() -> str:
            return "every client at its topic's head: " + str(
                {f.user: (f.positions[-1:], heads[f.topic], f.versions) for f in followers}
            )

        await eventually(
            lambda: all(f.positions and f.positions[-1] == heads[f.topic] for f in followers), 30, behind
        )
    finally:
        for f in followers:
            f.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await db.close()
        lb.terminate()
        lb.wait(10)
        await old.stop()
        await new.stop()

    assert committed > 100
    versions_seen = {v for f in followers for v in f.versions}
    assert versions_seen == {None, __version__}, (
        f"clients were served by both versions ({what}): {versions_seen}"
    )
    for f in followers:
        assert f.start is not None
        # Every committed event of its topic since it subscribed, once each, in order.
        assert f.positions == list(range(f.start + 1, heads[f.topic] + 1)), (f.user, f.versions)
        assert f.not_recovered == 0, f.user
    for log in ("old.log", "old2.log", "new.log"):
        text = (tmp_path / log).read_text()
        who = "new" if log == "new.log" else what
        for bad in ("Traceback", "malformed doorbell", "doorbell(s) of version"):
            assert bad not in text, f"{log} ({who}): {bad!r}\n{text[-3000:]}"
        assert not re.search(r"^\S+ +(error|critical) ", text, re.M), f"{log} ({who}):\n{text[-3000:]}"
        # Each held the relay lease in turn: old, then new, then the old one again.
        assert "relay: this replica rings the doorbells now" in text, f"{log} ({who}) never rang"
