"""gateway.migrate against a real PostgreSQL: applying, recording, locking, failing cleanly."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import shutil
import subprocess
import sys
import sysconfig
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from gateway.dev.pgcluster import Postgres, free_port
from gateway.migrate import MigrationError, format_status, load_migrations, migrate, sql_dir, status

from .gwtest import bare_env, settings_env
from .pgconn import pg_connect

REPO_SQL = Path(__file__).resolve().parent.parent / "sql"
REPO_FILES = sorted(p.name for p in REPO_SQL.glob("*.sql"))


async def fetch(dsn: str, query: str) -> list[asyncpg.Record]:
    conn = await pg_connect(dsn)
    try:
        return await conn.fetch(query)
    finally:
        await conn.close()


async def recorded(dsn: str) -> list[tuple[int, str, str]]:
    rows = await fetch(dsn, "SELECT version, name, checksum FROM gateway.migrations ORDER BY version")
    return [(r["version"], r["name"], r["checksum"]) for r in rows]


def repo_copy(tmp_path: Path) -> Path:
    """A migrations directory holding the repository's files, to add test files to."""
    directory = tmp_path / "sql"
    directory.mkdir()
    for name in REPO_FILES:
        shutil.copy(REPO_SQL / name, directory / name)
    return directory


def test_repository_has_migrations() -> None:
    assert REPO_FILES, f"no migrations found in {REPO_SQL}"
    assert [m.name for m in load_migrations()] == REPO_FILES


async def test_migrations_apply_and_are_recorded(blank_dsn: str) -> None:
    assert await migrate(blank_dsn) == REPO_FILES

    expected = [
        (int(name.split("_", 1)[0]), name, hashlib.sha256((REPO_SQL / name).read_bytes()).hexdigest())
        for name in REPO_FILES
    ]
    assert await recorded(blank_dsn) == expected
    rows = await fetch(blank_dsn, "SELECT to_regclass('gateway.events') IS NOT NULL AS ok")
    assert rows[0]["ok"], "100_event_log.sql did not create gateway.events"
    assert {s.state for s in await status(blank_dsn)} == {"applied"}


async def test_second_run_applies_nothing(blank_dsn: str) -> None:
    await migrate(blank_dsn)
    before = await fetch(blank_dsn, "SELECT version, applied_at FROM gateway.migrations ORDER BY version")
    assert await migrate(blank_dsn) == []
    assert (
        await fetch(blank_dsn, "SELECT version, applied_at FROM gateway.migrations ORDER BY version")
        == before
    )


async def test_dsn_fixture_is_already_migrated(dsn: str) -> None:
    assert await migrate(dsn) == []
    assert [s.state for s in await status(dsn)] == ["applied"] * len(REPO_FILES)


async def test_role_without_create_privilege_can_run_applied_migrations(dsn: str) -> None:
    # A replica connecting as an application role, after an administrator migrated the database.
    role = f"gw_app_{uuid.uuid4().hex[:12]}"
    conn = await pg_connect(dsn)
    try:
        await conn.execute(
            f"CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA gateway TO {role}; "
            f"GRANT SELECT ON gateway.migrations TO {role}"
        )
        try:
            app_dsn = urlunsplit(
                urlsplit(dsn)._replace(netloc=f"{role}@{urlsplit(dsn).netloc.split('@')[-1]}")
            )
            assert await migrate(app_dsn) == []
        finally:
            await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_each_once(
    blank_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = repo_copy(tmp_path)
    # Not idempotent, and slow enough for the other callers to arrive while it runs: applied
    # twice, the second CREATE TABLE would fail.
    (directory / "900_slow.sql").write_text(
        "CREATE TABLE public.applied_once (id int);\nSELECT pg_sleep(0.5);\n"
    )
    monkeypatch.setenv("GATEWAY_SQL_DIR", str(directory))

    results = await asyncio.gather(*(migrate(blank_dsn) for _ in range(4)))

    counts = collections.Counter(name for result in results for name in result)
    assert counts == collections.Counter([*REPO_FILES, "900_slow.sql"])
    # The first to take the lock applies everything; the others wait and find nothing to do.
    assert sorted(len(r) for r in results) == [0, 0, 0, len(REPO_FILES) + 1]
    assert [v for v, _, _ in await recorded(blank_dsn)][-1] == 900


@pytest.mark.parametrize(
    ("body", "message", "line"),
    [
        (
            "CREATE TABLE public.made_before_error (id int);\n-- a typo:\nSELEC 1;\n",
            'syntax error at or near "SELEC"',
            3,
        ),
        ("CREATE TABLE public.made_before_error (id int);\nSELECT 1 / 0;\n", "division by zero", None),
    ],
)
async def test_broken_migration_names_the_file_and_leaves_no_trace(
    blank_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, message: str, line: int | None
) -> None:
    directory = repo_copy(tmp_path)
    broken = directory / "900_broken.sql"
    broken.write_text(body)
    monkeypatch.setenv("GATEWAY_SQL_DIR", str(directory))

    with pytest.raises(MigrationError) as info:
        await migrate(blank_dsn)

    text = str(info.value)
    assert str(broken) in text
    assert message in text
    if line is not None:
        assert f"line {line}" in text
    # The migrations before it stay applied; its own statements and record are gone.
    assert [name for _, name, _ in await recorded(blank_dsn)] == REPO_FILES
    rows = await fetch(blank_dsn, "SELECT to_regclass('public.made_before_error') IS NULL AS gone")
    assert rows[0]["gone"]

    # Fixed, it applies, which also shows the failure released the advisory lock.
    broken.write_text("CREATE TABLE public.made_before_error (id int);\n")
    assert await migrate(blank_dsn) == ["900_broken.sql"]


async def test_commit_inside_a_migration_is_refused(
    blank_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = repo_copy(tmp_path)
    (directory / "900_commits.sql").write_text("CREATE TABLE public.t (id int);\nCOMMIT;\n")
    monkeypatch.setenv("GATEWAY_SQL_DIR", str(directory))

    with pytest.raises(MigrationError, match=r"900_commits\.sql ended its transaction"):
        await migrate(blank_dsn)
    assert 900 not in [v for v, _, _ in await recorded(blank_dsn)]


async def test_changed_file_is_reported_not_rerun(
    blank_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    directory = repo_copy(tmp_path)
    edited = directory / "900_edit.sql"
    edited.write_text("CREATE TABLE public.edited (id int);\n")
    monkeypatch.setenv("GATEWAY_SQL_DIR", str(directory))
    await migrate(blank_dsn)

    edited.write_text("CREATE TABLE public.edited (id int, more text);\n")
    caplog.set_level(logging.WARNING, logger="gateway.migrate")
    assert await migrate(blank_dsn) == []

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("900_edit.sql has changed" in w for w in warnings), warnings
    states = {s.name: s.state for s in await status(blank_dsn)}
    assert states["900_edit.sql"] == "changed"
    assert all(states[name] == "applied" for name in REPO_FILES)
    assert "changed" in format_status(await status(blank_dsn))


async def test_status_of_an_empty_database_changes_nothing(blank_dsn: str) -> None:
    statuses = await status(blank_dsn)
    assert [(s.name, s.state) for s in statuses] == [(name, "pending") for name in REPO_FILES]
    rows = await fetch(blank_dsn, "SELECT to_regnamespace('gateway') IS NULL AS untouched")
    assert rows[0]["untouched"]


# The pre-release chain of migrations, as gateway.migrations recorded it: replaced by the
# baseline (100_event_log.sql ...), which cannot be applied over it.
PRERELEASE_CHAIN = [
    "001_event_log.sql", "002_presence.sql", "003_relay.sql", "004_lean_capture.sql",
    "005_relay_takeover.sql", "006_no_age_index.sql", "007_presence.sql", "008_publish_names.sql",
    "009_first_epoch.sql", "010_truncate.sql", "011_ring_off.sql", "012_cheaper_capture.sql",
    "013_presence_last_close.sql", "014_topics_as_bytes.sql", "015_keep_trigger_state.sql",
    "016_rows_left_per_kind.sql", "017_topic_bound_at_publish.sql",
]  # fmt: skip


async def record_prerelease_chain(dsn: str) -> None:
    """Leave in the database what the pre-release chain left in gateway.migrations (and the
    gateway.events it created, so that the schema looks migrated to a quick check)."""
    conn = await pg_connect(dsn)
    try:
        await conn.execute(
            "CREATE SCHEMA gateway; CREATE TABLE gateway.migrations (version int PRIMARY KEY, "
            "name text NOT NULL, checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now()); "
            "CREATE TABLE gateway.events (topic text, pos bigint)"
        )
        await conn.executemany(
            "INSERT INTO gateway.migrations (version, name, checksum) VALUES ($1, $2, $3)",
            [(int(n[:3]), n, hashlib.sha256(n.encode()).hexdigest()) for n in PRERELEASE_CHAIN],
        )
    finally:
        await conn.close()


async def test_a_database_built_by_the_prerelease_chain_is_refused_with_the_way_to_start_over(
    blank_dsn: str,
) -> None:
    await record_prerelease_chain(blank_dsn)
    before = await recorded(blank_dsn)

    for attempt in (migrate(blank_dsn), status(blank_dsn)):
        with pytest.raises(MigrationError) as info:
            await attempt
        text = str(info.value)
        assert "pre-release version of the gateway" in text
        assert "below 100 (1, 2, 3, 4, 5, ...)" in text
        assert "DROP SCHEMA gateway CASCADE" in text and "new database" in text
        assert "`gateway migrate`" in text and "gateway.publish() again" in text
    # Nothing applied, nothing recorded.
    assert await recorded(blank_dsn) == before
    rows = await fetch(blank_dsn, "SELECT to_regclass('gateway.topics') IS NULL AS untouched")
    assert rows[0]["untouched"]

    # Doing as it says works.
    conn = await pg_connect(blank_dsn)
    try:
        await conn.execute("DROP SCHEMA gateway CASCADE")
    finally:
        await conn.close()
    assert await migrate(blank_dsn) == REPO_FILES


def test_serve_and_migrate_refuse_a_database_of_the_prerelease_chain(blank_dsn: str) -> None:
    asyncio.run(record_prerelease_chain(blank_dsn))
    env = bare_env()
    env.update(settings_env(blank_dsn, workers=1, port=0))
    for command in ("serve", "migrate"):
        r = subprocess.run(
            [sys.executable, "-m", "gateway", command],
            env=env,
            cwd=REPO_SQL.parent,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 2, (command, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, (command, r.stderr)
        assert "pre-release version of the gateway" in r.stderr, (command, r.stderr)
        assert "DROP SCHEMA gateway CASCADE" in r.stderr, (command, r.stderr)


def test_a_migration_numbered_below_the_baseline_is_refused(tmp_path: Path) -> None:
    (tmp_path / "100_baseline.sql").write_text("SELECT 1;")
    (tmp_path / "018_next.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"018_next\.sql: version 18 is below 100, the baseline's first"):
        load_migrations(tmp_path)


async def test_unreachable_database_is_named_without_its_password() -> None:
    url = f"postgresql://someone:s3cret@127.0.0.1:{free_port()}/nowhere"
    with pytest.raises(MigrationError) as info:
        await migrate(url)
    assert "cannot connect to postgresql://someone:***@127.0.0.1" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_badly_named_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("ignored: not an .sql file")
    (tmp_path / "100_ok.sql").write_text("SELECT 1;")
    (tmp_path / "setup.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"setup\.sql: migration files must be named NNN_name\.sql"):
        load_migrations(tmp_path)


def test_duplicate_versions_are_refused(tmp_path: Path) -> None:
    (tmp_path / "0200_a.sql").write_text("SELECT 1;")
    (tmp_path / "200_b.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"200_b\.sql and .*0200_a\.sql have the same version 200"):
        load_migrations(tmp_path)


def test_missing_directory_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_SQL_DIR", str(tmp_path / "nope"))
    with pytest.raises(MigrationError, match=r"migrations directory not found: GATEWAY_SQL_DIR=.*nope"):
        sql_dir()
    monkeypatch.delenv("GATEWAY_SQL_DIR")
    assert sql_dir() == REPO_SQL


def test_an_installed_package_migrates_with_the_sql_it_carries(blank_dsn: str, tmp_path: Path) -> None:
    """`pip install .` (not editable, as a deployment does it): the package is copied into
    site-packages, away from the checkout's sql/, and `gateway migrate` must still find the
    migrations. The wheel is built from this checkout and installed into an empty virtual
    environment; the dependencies come from the test environment's site-packages."""
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    repo = REPO_SQL.parent
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(wheels), str(repo)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    shutil.rmtree(repo / "build", ignore_errors=True)  # setuptools' scratch directory
    (wheel,) = wheels.glob("*.whl")
    venv_python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run(
        [*pip, "--python", str(venv_python), "install", "--no-deps", str(wheel)],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": sysconfig.get_path("purelib"),  # aiohttp, asyncpg, ...: not the package
        "GATEWAY_DATABASE_URL": blank_dsn,
    }
    out = subprocess.run(
        [str(venv / "bin" / "gateway"), "migrate"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    applied = asyncio.run(recorded(blank_dsn))
    assert [name for _, name, _ in applied] == REPO_FILES
    where = subprocess.run(
        [str(venv_python), "-c", "from gateway.migrate import sql_dir; print(sql_dir())"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout.strip()
    assert Path(where) == venv / "share" / "pg-ws-gateway" / "sql"


# --- the fixtures of conftest.py ------------------------------------------------------

_first_database: list[str] = []


async def test_dsn_fixture_gives_a_database_of_its_own(dsn: str) -> None:
    rows = await fetch(dsn, "SELECT current_database() AS name")
    name = rows[0]["name"]
    assert "gw_t_" in name
    conn = await pg_connect(dsn)
    try:
        await conn.execute("CREATE TABLE public.left_behind (id int)")
    finally:
        await conn.close()
    _first_database.append(name)


async def test_dsn_fixture_drops_the_database_after_the_test(pg: Postgres) -> None:
    if not _first_database:
        pytest.skip("runs after test_dsn_fixture_gives_a_database_of_its_own")
    query = f"SELECT 1 FROM pg_database WHERE datname = '{_first_database[0]}'"
    assert await fetch(pg.dsn("postgres"), query) == []


def with_user(dsn: str, role: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(netloc=f"{role}@{urlsplit(dsn).netloc.split('@')[-1]}"))


async def test_a_migration_after_a_published_table_was_dropped_succeeds_without_superuser(
    blank_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DROP TABLE ... CASCADE took the table's triggers but left its row in gateway.published:
    # republish_all(), which a migration that changes the triggers runs, then failed, and
    # unpublish() could not be given the table's name. The migrating role is not a superuser
    # (managed services grant none), so no event trigger can do the cleaning.
    role = f"gw_owner_{uuid.uuid4().hex[:10]}"
    admin = await pg_connect(blank_dsn)
    await admin.execute(
        f"CREATE ROLE {role} LOGIN; GRANT CREATE ON DATABASE {urlsplit(blank_dsn).path.lstrip('/')} TO {role};"
        f"GRANT CREATE ON SCHEMA public TO {role}"
    )
    owner_dsn = with_user(blank_dsn, role)
    directory = repo_copy(tmp_path)
    monkeypatch.setenv("GATEWAY_SQL_DIR", str(directory))
    try:
        await migrate(owner_dsn)
        owner = await pg_connect(owner_dsn)
        notices: list[str] = []
        owner.add_log_listener(lambda _conn, msg: notices.append(msg.message))
        await owner.execute(
            "CREATE TABLE public.items (id int PRIMARY KEY, owner_id int);"
            "CREATE TABLE public.notes (id int PRIMARY KEY, owner_id int);"
            "CREATE TABLE public.memos (id int PRIMARY KEY, owner_id int);"
            "SELECT gateway.publish('public.items', $$'user:' || owner_id$$);"
            "SELECT gateway.publish('public.notes', $$'user:' || owner_id$$);"
            "SELECT gateway.publish('public.memos', $$'user:' || owner_id$$);"
        )
        items_oid = await owner.fetchval("SELECT 'public.items'::regclass::oid")
        memos_oid = await owner.fetchval("SELECT 'public.memos'::regclass::oid")
        generated = await owner.fetchval("SELECT count(*) FROM gateway.generated_functions('public.items')")
        assert generated == 5
        functions = "SELECT count(*) FROM pg_proc WHERE pronamespace = 'gateway'::regnamespace AND proname LIKE '%public\\_items\\_%'"
        await owner.execute("DROP TABLE public.items CASCADE; DROP TABLE public.memos CASCADE")

        # unpublish() of a dropped table (by its oid, as gateway.published holds it).
        await owner.execute("SELECT gateway.unpublish($1::oid::regclass)", memos_oid)
        assert not await owner.fetchval(
            "SELECT EXISTS (SELECT FROM gateway.published WHERE tbl::oid = $1)", memos_oid
        )

        # A later migration that republishes every table.
        (directory / "900_republish.sql").write_text("SELECT gateway.republish_all();\n")
        assert await migrate(owner_dsn) == ["900_republish.sql"]
        assert [r["tbl"] for r in await owner.fetch("SELECT tbl::text FROM gateway.published")] == ["notes"]
        assert await owner.fetchval(functions) == 0
        assert not await owner.fetchval(
            "SELECT EXISTS (SELECT FROM gateway.published WHERE tbl::oid = $1)", items_oid
        )
        await owner.execute("INSERT INTO public.notes VALUES (1, 1)")
        assert await owner.fetchval("SELECT count(*) FROM gateway.events WHERE tbl = 'public.notes'") == 1

        # What the notice says: the table's name is gone with it, its functions' names are not.
        await owner.execute(
            "CREATE TABLE public.items (id int PRIMARY KEY, owner_id int);"
            "SELECT gateway.publish('public.items', $$'user:' || owner_id$$);"
            "DROP TABLE public.items CASCADE; SELECT gateway.republish_all()"
        )
        await owner.close()

        # A superuser's publish() still hands the functions to the schema's owner: the capture
        # functions run as their owner, which must not be a superuser it never chose.
        await admin.execute(
            "CREATE TABLE public.others (id int PRIMARY KEY, owner_id int);"
            "SELECT gateway.publish('public.others', $$'user:' || owner_id$$)"
        )
        owners = await admin.fetch(
            "SELECT DISTINCT p.proowner::regrole::text AS o FROM pg_proc p "
            "WHERE p.oid IN (SELECT gateway.generated_functions('public.others'))"
        )
        assert [r["o"] for r in owners] == [role]
        dropped = [n for n in notices if "was dropped" in n]
        assert len(dropped) == 3 and all("public_items_" in n or "public_memos_" in n for n in dropped), (
            notices
        )
    finally:
        await admin.execute(f"DROP OWNED BY {role} CASCADE; DROP ROLE {role}")
        await admin.close()
