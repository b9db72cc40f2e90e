"""Numbered SQL migrations: ``sql/NNN_name.sql``, applied in version order.

- The baseline, files 100 to 104, is the schema's first version (sql/README.md); releases add
  migrations after it. Versions below 100 belonged to the pre-release chain of migrations
  (001 to 017): a database that recorded any of them was built by it and is refused, with the
  way to start over (:func:`prerelease_problem`), by ``gateway migrate`` and ``gateway serve``.
- Applied migrations are recorded in ``gateway.migrations`` (version, name, checksum, applied_at).
- Everything happens under a session advisory lock on a fixed key, so replicas starting
  together cannot both apply a migration: the second waits, then finds it applied.
- Each migration runs in its own transaction together with its record: a failing file leaves
  neither its changes nor a record, and is raised as :class:`MigrationError` naming the file
  and PostgreSQL's message. Files must not contain BEGIN/COMMIT.
- An applied migration whose file has changed since is logged as a warning and not re-run
  (development edits happen; write a new migration to change a deployed database).

The directory is ``GATEWAY_SQL_DIR`` when set; else ``sql/`` at the repository root when
running from a checkout (or an editable install); else the copy an installed package carries
in ``<prefix>/share/pg-ws-gateway/sql`` (pyproject.toml's data-files).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import os
import re
import sysconfig
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import asyncpg

from gateway.config import mask_dsn

from .pgerrors import DB_ERRORS

log = logging.getLogger("gateway.migrate")

# pg_advisory_lock key held while migrating; any fixed bigint works, as long as it never
# changes between versions (b"gw_migra" read as an integer).
LOCK_KEY = 0x67775F6D69677261
SQL_DIR_ENV = "GATEWAY_SQL_DIR"
_FILE_NAME = re.compile(r"^(?P<version>\d+)_(?P<slug>[A-Za-z0-9][A-Za-z0-9_.-]*)\.sql$")
_CONNECT_TIMEOUT = 10.0
# The version of the baseline's first file; every version below belonged to the pre-release
# chain, so that a database it built is never taken for one at the baseline.
BASELINE_VERSION = 100

_CREATE_TABLE = """
CREATE SCHEMA IF NOT EXISTS gateway;
CREATE TABLE IF NOT EXISTS gateway.migrations (
    version    int PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


class MigrationError(RuntimeError):
    """Migrations could not be read or applied; the message names the file or the database."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str  # the file name, e.g. 100_event_log.sql
    path: Path
    sql: str
    checksum: str  # sha256 of the file's bytes


State = Literal["applied", "pending", "changed", "missing"]


@dataclass(frozen=True)
class MigrationStatus:
    version: int
    name: str
    # applied; pending; changed (applied, but the file differs now); missing (applied, no file)
    state: State
    applied_at: datetime.datetime | None


def sql_dir() -> Path:
    """The migrations directory: GATEWAY_SQL_DIR, else the checkout's sql/, else the installed copy."""
    configured = os.environ.get(SQL_DIR_ENV, "").strip()
    if configured:
        if not Path(configured).is_dir():
            raise MigrationError(f"migrations directory not found: {SQL_DIR_ENV}={configured}")
        return Path(configured)
    candidates = [Path(__file__).resolve().parent.parent / "sql", installed_sql_dir()]
    for directory in candidates:
        if directory.is_dir():
            return directory
    raise MigrationError(
        f"migrations directory not found: looked in {' and '.join(map(str, candidates))} "
        f"(set {SQL_DIR_ENV} to the directory holding the gateway's NNN_name.sql files)"
    )


def installed_sql_dir() -> Path:
    """Where a (non-editable) install of the package puts sql/: see pyproject.toml."""
    return Path(sysconfig.get_path("data")) / "share" / "pg-ws-gateway" / "sql"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """The migrations of ``directory`` (default :func:`sql_dir`) in version order.

    Every ``*.sql`` file must be named ``NNN_name.sql``, with a version of at least
    :data:`BASELINE_VERSION`, and versions must be unique; other files (README.md, ...) are
    ignored.
    """
    directory = sql_dir() if directory is None else directory
    if not directory.is_dir():
        raise MigrationError(f"migrations directory not found: {directory}")
    by_version: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        m = _FILE_NAME.match(path.name)
        if m is None:
            raise MigrationError(
                f"{path}: migration files must be named NNN_name.sql (a number, an underscore, a name)"
            )
        version = int(m.group("version"))
        if version < BASELINE_VERSION:
            raise MigrationError(
                f"{path}: version {version} is below {BASELINE_VERSION}, the baseline's first; the "
                "numbers below belonged to the pre-release migrations: number a new migration after "
                "the last one (sql/README.md)"
            )
        if version > 2**31 - 1:
            raise MigrationError(f"{path}: version {version} is too large (at most {2**31 - 1})")
        if version in by_version:
            raise MigrationError(
                f"{path} and {by_version[version].path} have the same version {version}; renumber one of them"
            )
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MigrationError(f"{path}: not UTF-8 text ({e})") from None
        by_version[version] = Migration(version, path.name, path, text, hashlib.sha256(data).hexdigest())
    return [by_version[v] for v in sorted(by_version)]


def pending(migrations: Iterable[Migration], applied: Collection[int]) -> list[Migration]:
    """The migrations whose version is not in ``applied``, in version order."""
    return sorted((m for m in migrations if m.version not in applied), key=lambda m: m.version)


# asyncpg raises ValueError for a malformed DSN.
_CONNECT_ERRORS: tuple[type[Exception], ...] = (*DB_ERRORS, ValueError)


async def _connect(dsn: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(
            dsn, timeout=_CONNECT_TIMEOUT, server_settings={"application_name": "gateway-migrate"}
        )
    except _CONNECT_ERRORS as e:
        raise MigrationError(f"cannot connect to {mask_dsn(dsn)} to migrate: {e}") from e


async def _close(conn: asyncpg.Connection) -> None:
    # Closing the session also releases the advisory lock. A broken connection is dropped
    # without masking the error that broke it.
    try:
        await asyncio.wait_for(conn.close(), 5)
    except DB_ERRORS:
        conn.terminate()


def _describe(m: Migration, e: Exception) -> str:
    """PostgreSQL's message, with the file, the line and any detail, hint or context."""
    where = str(m.path)
    position = getattr(e, "position", None)  # 1-based character offset in the file, for syntax errors
    if position:
        with contextlib.suppress(ValueError):
            where += f", line {m.sql.count(chr(10), 0, int(position) - 1) + 1}"
    lines = [f"migration {where} failed: {e}"]
    for label, attr in (("detail", "detail"), ("hint", "hint"), ("context", "context")):
        value = getattr(e, attr, None)
        if value:
            lines.append(f"{label}: {value}")
    return "\n".join(lines)


async def _recorded(conn: asyncpg.Connection) -> dict[int, asyncpg.Record]:
    rows = await conn.fetch(
        "SELECT version, name, checksum, applied_at FROM gateway.migrations ORDER BY version"
    )
    return {r["version"]: r for r in rows}


def _prerelease_message(where: str, versions: Sequence[int]) -> str:
    shown = ", ".join(map(str, versions[:5])) + (", ..." if len(versions) > 5 else "")
    return (
        f"{where} was set up by a pre-release version of the gateway: gateway.migrations records "
        f"migrations numbered below {BASELINE_VERSION} ({shown}), which this version no longer has, and "
        "that schema cannot be upgraded in place. Start over: drop the gateway's schema with "
        "`DROP SCHEMA gateway CASCADE` (this deletes the event log, presence and the capture triggers "
        "of your published tables, and anything of yours that uses them; your tables and their rows "
        "stay), or use a new database; then run `gateway migrate` and call gateway.publish() again "
        "for each table. Clients resuming from before are told their history was not recovered."
    )


async def prerelease_problem(conn: asyncpg.Connection | asyncpg.Pool, where: str) -> str | None:
    """Why the database cannot be used as it is, if the pre-release chain of migrations built
    it (``where`` names it in the message, which says how to start over); else None.

    Read from gateway.migrations; a role that may not read it is not checked (nor is a schema
    applied by hand, without it).
    """
    readable = await conn.fetchval(
        "SELECT CASE WHEN to_regclass('gateway.migrations') IS NULL THEN false "
        "ELSE has_table_privilege(to_regclass('gateway.migrations'), 'SELECT') END"
    )
    if not readable:
        return None
    rows = await conn.fetch(
        "SELECT version FROM gateway.migrations WHERE version < $1 ORDER BY version", BASELINE_VERSION
    )
    return _prerelease_message(where, [r["version"] for r in rows]) if rows else None


def _compare(migrations: Sequence[Migration], recorded: dict[int, asyncpg.Record]) -> list[MigrationStatus]:
    result: list[MigrationStatus] = []
    files = {m.version: m for m in migrations}
    for version in sorted(files.keys() | recorded.keys()):
        m, r = files.get(version), recorded.get(version)
        if r is None:
            assert m is not None
            result.append(MigrationStatus(version, m.name, "pending", None))
        elif m is None:
            result.append(MigrationStatus(version, r["name"], "missing", r["applied_at"]))
        else:
            state: State = "applied" if r["checksum"] == m.checksum else "changed"
            result.append(MigrationStatus(version, m.name, state, r["applied_at"]))
    return result


async def _apply(conn: asyncpg.Connection, m: Migration) -> None:
    async with conn.transaction():
        try:
            # Without arguments asyncpg uses the simple query protocol: the whole file, many statements.
            await conn.execute(m.sql)
        except DB_ERRORS as e:
            raise MigrationError(_describe(m, e)) from e
        if not conn.is_in_transaction():
            raise MigrationError(
                f"migration {m.path} ended its transaction (COMMIT or ROLLBACK in the file); remove it: "
                "each migration already runs in its own transaction. Its statements before that were kept."
            )
        await conn.execute(
            "INSERT INTO gateway.migrations (version, name, checksum) VALUES ($1, $2, $3)",
            m.version,
            m.name,
            m.checksum,
        )


async def migrate(dsn: str, *, directory: Path | None = None) -> list[str]:
    """Apply the pending migrations to the database at ``dsn``; returns the file names applied now."""
    migrations = load_migrations(directory)  # before connecting: a bad file fails fast
    conn = await _connect(dsn)
    try:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
            log.info("another process is applying migrations to %s; waiting for it", mask_dsn(dsn))
            await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        try:
            # Only when missing: CREATE SCHEMA IF NOT EXISTS still needs the CREATE privilege, which
            # a replica's role may lack once an administrator has applied the migrations.
            if not await conn.fetchval("SELECT to_regclass('gateway.migrations') IS NOT NULL"):
                await conn.execute(_CREATE_TABLE)
        except asyncpg.PostgresError as e:
            raise MigrationError(f"cannot create gateway.migrations in {mask_dsn(dsn)}: {e}") from e
        recorded = await _recorded(conn)
        old = sorted(v for v in recorded if v < BASELINE_VERSION)
        if old:
            raise MigrationError(_prerelease_message(mask_dsn(dsn), old))
        for s in _compare(migrations, recorded):
            if s.state == "changed":
                log.warning(
                    "migration %s has changed since it was applied (%s); it is not run again: "
                    "put further changes in a new migration file",
                    s.name,
                    s.applied_at,
                )
            elif s.state == "missing":
                log.warning("migration %d (%s) is recorded as applied but has no file", s.version, s.name)
        applied_now: list[str] = []
        for m in pending(migrations, recorded.keys()):
            await _apply(conn, m)
            log.info("applied migration %s", m.name)
            applied_now.append(m.name)
        return applied_now
    finally:
        await _close(conn)


async def status(dsn: str, *, directory: Path | None = None) -> list[MigrationStatus]:
    """Applied, pending, changed and missing migrations of the database at ``dsn``. Changes nothing."""
    migrations = load_migrations(directory)
    conn = await _connect(dsn)
    try:
        exists = await conn.fetchval("SELECT to_regclass('gateway.migrations') IS NOT NULL")
        recorded = await _recorded(conn) if exists else {}
    finally:
        await _close(conn)
    old = sorted(v for v in recorded if v < BASELINE_VERSION)
    if old:
        raise MigrationError(_prerelease_message(mask_dsn(dsn), old))
    return _compare(migrations, recorded)


def format_status(statuses: Iterable[MigrationStatus]) -> str:
    """One line per migration, for ``gateway migrate --status``."""
    lines = []
    for s in statuses:
        when = s.applied_at.isoformat(timespec="seconds") if s.applied_at else ""
        lines.append(f"{s.version:>4}  {s.state:<8} {s.name:<40} {when}".rstrip())
    return "\n".join(lines) if lines else "no migrations"
