"""The PostgreSQL setups people run (docs/sql.md, "Roles without a superuser"; docs/deploy.md,
"PgBouncer").

* Managed services give no superuser: every role here is an ordinary one. The role that runs
  ``gateway migrate`` creates and owns the ``gateway`` schema, the application's role owns its
  table and writes it, and the gateway serves as the schema's owner. Migrate, publish, serve,
  write and resume must all work so.
* PgBouncer (Debian's) in session mode in front of every connection, the gateway's (its pool,
  the LISTEN connection, the relay, presence heartbeats) and the writers': delivery, resume and
  presence work through it. In transaction and statement mode it would share server sessions
  between clients, which breaks LISTEN, the relay's lease and prepared statements: the gateway
  refuses to start there, saying why (gateway/pooling.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from gateway.config import ConfigError
from gateway.pooling import SessionPoolingError, check_session_pooling

from .gwtest import bare_env, free_port, make_items_table, running_gateway, token
from .pgconn import connection
from .polling import eventually

PGBOUNCER = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/sbin")
needs_pgbouncer = pytest.mark.skipif(
    PGBOUNCER is None, reason="pgbouncer is not installed (.ci/run installs Debian's pgbouncer)"
)


def as_role(dsn: str, role: str) -> str:
    u = urlsplit(dsn)
    return urlunsplit(u._replace(netloc=f"{role}@{u.netloc.split('@')[-1]}"))


def gateway_cli(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    env = {**bare_env(), "GATEWAY_DATABASE_URL": dsn}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=env, timeout=120
    )


@dataclass
class Roles:
    owner: str  # runs `gateway migrate` and `gateway serve`; owns schema gateway
    app: str  # the application: owns its table, writes it
    owner_dsn: str
    app_dsn: str


@pytest.fixture
async def roles(blank_dsn: str) -> AsyncIterator[Roles]:
    """Two ordinary roles on an empty database, set up as a managed service's admin would:
    no SUPERUSER, CREATEROLE, CREATEDB, REPLICATION or BYPASSRLS for either."""
    suffix = uuid.uuid4().hex[:8]
    owner, app = f"gw_owner_{suffix}", f"gw_app_{suffix}"
    dbname = urlsplit(blank_dsn).path.lstrip("/")
    async with connection(blank_dsn) as admin:
        for role in (owner, app):
            await admin.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS")
        # The owner may create schemas in this database (gateway migrate creates one).
        await admin.execute(f'GRANT CREATE ON DATABASE "{dbname}" TO {owner}')
        await admin.execute(f"CREATE SCHEMA app AUTHORIZATION {app}")
    try:
        yield Roles(owner, app, as_role(blank_dsn, owner), as_role(blank_dsn, app))
    finally:
        async with connection(blank_dsn) as admin:
            for role in (owner, app):
                await admin.execute(f"DROP OWNED BY {role} CASCADE")
            for role in (owner, app):
                await admin.execute(f"DROP ROLE {role}")


async def test_every_role_an_ordinary_one_migrate_publish_serve_write_resume(roles: Roles) -> None:
    async with connection(roles.owner_dsn) as db:
        assert not await db.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")

    migrated = gateway_cli("migrate", dsn=roles.owner_dsn)
    assert migrated.returncode == 0, migrated.stderr
    assert "applied:" in migrated.stdout

    async with connection(roles.owner_dsn) as db:
        assert await db.fetchval(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'gateway'"
        ) == (roles.owner)
        # The application's role gets nothing on schema gateway: the capture triggers run as
        # the schema's owner (docs/sql.md, "Writer roles").
    async with connection(roles.app_dsn) as db:
        await db.execute(
            f"""
            CREATE TABLE app.items (id bigserial PRIMARY KEY, owner_id int NOT NULL, title text);
            -- What the gateway's role needs on a table it publishes and serves.
            GRANT USAGE ON SCHEMA app TO {roles.owner};
            GRANT SELECT, TRIGGER ON app.items TO {roles.owner};
            """
        )
    async with connection(roles.owner_dsn) as db:
        await db.execute("SELECT gateway.publish('app.items', $$'user:' || owner_id$$)")

    async with (
        running_gateway(roles.owner_dsn, tables="app.items") as gw,
        connection(roles.app_dsn) as db,
    ):
        assert gw.state.relay is not None
        c = await gw.connect()
        await c.auth(token("7"))
        ack = await c.subscribe("user:7")
        row_id = await db.fetchval("INSERT INTO app.items (owner_id, title) VALUES (7, 'first') RETURNING id")
        (event,) = await c.events(1)
        assert (event["op"], event["key"], event["row"]["title"]) == ("insert", str(row_id), "first")
        await c.close()

        await db.execute("UPDATE app.items SET title = 'while away' WHERE id = $1", row_id)
        again = await gw.connect()
        await again.auth(token("7"))
        resumed = await again.subscribe("user:7", since=(ack["epoch"], event["pos"]))
        assert resumed["recovered"] is True
        assert [(e["op"], e["row"]["title"]) for e in resumed["events"]] == [("update", "while away")]
        await db.execute("DELETE FROM app.items WHERE id = $1", row_id)
        (gone,) = await again.events(1)
        assert (gone["op"], gone["pos"]) == ("delete", event["pos"] + 2)
        await again.close()


# --- PgBouncer ---------------------------------------------------------------------------


class PgBouncer:
    """Debian's pgbouncer in front of one PostgreSQL server, in the given pool mode.

    Every database of the server is reachable through it by name (``* =``); clients are trusted
    (the server behind it trusts 127.0.0.1 too). It refuses to run as root, so as root it drops
    to the ``postgres`` OS user (``-u``), like the test clusters."""

    def __init__(self, upstream_dsn: str, mode: str, work: Path) -> None:
        u = urlsplit(upstream_dsn)
        self.upstream_port = u.port
        self.mode = mode
        self.work = work
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def dsn(self, dsn: str) -> str:
        """``dsn`` (a database of the upstream server) through this pgbouncer."""
        u = urlsplit(dsn)
        user = u.netloc.split("@")[0] if "@" in u.netloc else "postgres"
        return urlunsplit(u._replace(netloc=f"{user}@127.0.0.1:{self.port}"))

    def start(self, users: list[str]) -> PgBouncer:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "users.txt").write_text("".join(f'"{u}" ""\n' for u in users))
        (self.work / "pgbouncer.ini").write_text(
            f"""[databases]
* = host=127.0.0.1 port={self.upstream_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.work}/users.txt
pool_mode = {self.mode}
max_client_conn = 1000
default_pool_size = 200
logfile = {self.work}/pgbouncer.log
pidfile = {self.work}/pgbouncer.pid
; the relay and the presence heartbeat set it at connect; pgbouncer refuses parameters it does not know.
ignore_startup_parameters = synchronous_commit
"""
        )
        cmd = [str(PGBOUNCER), str(self.work / "pgbouncer.ini")]
        if os.geteuid() == 0:
            shutil.chown(self.work, "postgres")
            for f in self.work.iterdir():
                shutil.chown(f, "postgres")
            cmd[1:1] = ["-u", "postgres"]
        with open(self.work / "stderr.txt", "wb") as err:  # what it says before its log file is open
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        return self

    async def wait_up(self) -> None:
        async def accepts() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            with contextlib.suppress(OSError):
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return True
            return False

        await eventually(
            accepts, 15, lambda: f"pgbouncer to listen on {self.port}: {self.log()}", interval=0.05
        )

    def log(self) -> str:
        paths = [self.work / "stderr.txt", self.work / "pgbouncer.log"]
        return "".join(p.read_text()[-2000:] for p in paths if p.exists())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def pgbouncer(dsn: str, mode: str, users: list[str]) -> Iterator[PgBouncer]:
    # Not pytest's tmp_path: that is private to root, and pgbouncer may run as postgres.
    work = Path(tempfile.mkdtemp(prefix="gateway-pgbouncer-"))
    work.chmod(0o755)
    bouncer = PgBouncer(dsn, mode, work).start(users)
    try:
        yield bouncer
    finally:
        bouncer.stop()
        shutil.rmtree(work, ignore_errors=True)


@needs_pgbouncer
async def test_through_pgbouncer_in_session_mode_everything_works(dsn: str) -> None:
    """The gateway (pool, LISTEN, relay, presence) and the writer all connect through PgBouncer in
    session mode: the pooling check passes, rows arrive, a resume replays, presence works."""
    await make_items_table(dsn)
    with pgbouncer(dsn, "session", ["postgres"]) as bouncer:
        await bouncer.wait_up()
        via = bouncer.dsn(dsn)
        await check_session_pooling(via)
        async with (
            running_gateway(via, tables="items", presence="true") as gw,
            connection(via) as db,
        ):
            c = await gw.connect()
            await c.auth(token("7"))
            ack = await c.subscribe("user:7")
            row_id = await db.fetchval("INSERT INTO items (owner_id, title) VALUES (7, 'a') RETURNING id")
            (event,) = await c.events(1)
            assert (event["op"], event["key"], event["pos"]) == ("insert", str(row_id), ack["pos"] + 1)
            watcher = await gw.connect()
            await watcher.auth(token("8", topics=["presence:global"]))
            await watcher.subscribe("presence:global", expect=False)
            while (await watcher.recv())["type"] != "subscribed":
                pass  # the presence snapshot comes first
            member = await gw.connect()
            await member.auth(token("9"))
            # Presence goes through the heartbeat connection and the pool, both via pgbouncer.
            while True:
                frame = await watcher.recv()
                if frame["type"] == "presence" and frame.get("change", {}).get("user") == "9":
                    break
            await member.close()
            await c.close()
            await db.execute("UPDATE items SET title = 'b' WHERE id = $1", row_id)
            again = await gw.connect()
            await again.auth(token("7"))
            resumed = await again.subscribe("user:7", since=(ack["epoch"], event["pos"]))
            assert resumed["recovered"] is True
            assert [e["row"]["title"] for e in resumed["events"]] == ["b"]
            await db.execute("DELETE FROM items WHERE id = $1", row_id)
            (gone,) = await again.events(1)
            assert gone["op"] == "delete"
            await again.close()
            await watcher.close()


@needs_pgbouncer
@pytest.mark.parametrize("mode", ["transaction", "statement"])
async def test_pgbouncer_sharing_sessions_is_refused_with_a_clear_message(dsn: str, mode: str) -> None:
    await make_items_table(dsn)
    with pgbouncer(dsn, mode, ["postgres"]) as bouncer:
        await bouncer.wait_up()
        via = bouncer.dsn(dsn)
        with pytest.raises(SessionPoolingError) as refused:
            await check_session_pooling(via)
        message = str(refused.value)
        assert "pool_mode = session" in message and "shares server sessions" in message, message
        # `gateway serve` says so and exits instead of starting half-broken.
        serve = gateway_cli(
            "serve", "--port", str(free_port()), "--tables", "items", "--workers", "1", dsn=via
        )
        assert serve.returncode != 0
        assert "pool_mode = session" in serve.stderr, serve.stderr
        assert "Traceback" not in serve.stderr, serve.stderr
        assert isinstance(refused.value, ConfigError)
