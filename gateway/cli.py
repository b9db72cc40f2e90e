"""``gateway serve | migrate | demo | config``: the command line.

Every setting is an environment variable (``GATEWAY_PORT``) or the matching flag
(``--port``); flags win. ``gateway config`` lists them all with defaults and meanings.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import asyncpg

from . import __version__, config, logsetup
from .config import ConfigError, Settings
from .dev.pgcluster import ClusterError, PostgresUnavailable
from .migrate import MigrationError
from .supervisor import CANNOT_START, supervise


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each also an environment variable)")
    for f in config.settings_fields():
        group.add_argument(
            config.flag_name(f.name),
            dest=f"setting_{f.name}",
            metavar="VALUE",
            help=f"{f.metadata['help']} [{config.env_name(f.name)}]",
        )


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    return {
        key[len("setting_") :]: value
        for key, value in vars(args).items()
        if key.startswith("setting_") and value is not None
    }


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: "--worker 2" would pass for --workers, and the supervisor, which
    # strips --workers from its workers' command line, would hand it on: workers of workers.
    parser = argparse.ArgumentParser(
        prog="gateway",
        allow_abbrev=False,
        description="PostgreSQL-to-WebSocket gateway: committed rows reach every allowed client, nothing lost.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve", allow_abbrev=False, help="run the gateway (several worker processes with --workers)"
    )
    _add_setting_flags(serve)
    migrate = sub.add_parser("migrate", allow_abbrev=False, help="apply the SQL migrations in sql/ and exit")
    migrate.add_argument("--status", action="store_true", help="list applied and pending migrations")
    _add_setting_flags(migrate)
    demo = sub.add_parser(
        "demo",
        allow_abbrev=False,
        help="start a throwaway PostgreSQL (unless DATABASE_URL is set), the gateway and a demo",
    )
    _add_setting_flags(demo)
    cfg = sub.add_parser(
        "config", allow_abbrev=False, help="print every setting with its default and meaning"
    )
    cfg.add_argument("--markdown", action="store_true", help="as the Markdown table of docs/configuration.md")
    cfg.add_argument(
        "--check",
        action="store_true",
        help="check the settings of this environment (and flags) as `serve` does, without connecting; "
        "print those that differ from their defaults",
    )
    _add_setting_flags(cfg)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = _overrides(args)
    if args.command == "config" and not args.check:
        print(config.markdown_table() if args.markdown else config.describe())
        return 0
    try:
        settings = config.load(overrides=overrides)
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return CANNOT_START
    logsetup.setup(settings.log_format, settings.log_level)
    try:
        if args.command == "config":
            return _check(settings)
        if args.command == "migrate":
            return _migrate(settings, args.status)
        if args.command == "demo":
            from .dev.demo import run_demo

            host_given = "host" in overrides or config.env_name("host") in os.environ
            return run_demo(settings, host_given=host_given)
        return _serve(settings)
    except (ConfigError, MigrationError, PostgresUnavailable, ClusterError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return CANNOT_START
    except asyncpg.PostgresError as exc:
        # Most often a missing privilege (the role may not use schema gateway, or read one of
        # its tables): say what PostgreSQL said, not a traceback.
        print(f"gateway: the database refused: {exc} (SQLSTATE {exc.sqlstate})", file=sys.stderr)
        return CANNOT_START


def _check(settings: Settings) -> int:
    """What `serve` checks before it connects: the settings, their combinations (a database
    URL, a way to verify tokens) and the GATEWAY_TABLES syntax."""
    config.require_database_url(settings)
    config.jwt_algorithms(settings)
    print(config.describe_settings(settings))
    print("configuration is valid (the database and the tables in it are checked when `serve` starts)")
    return 0


def _migrate(settings: Settings, status: bool) -> int:
    from .migrate import format_status, migrate
    from .migrate import status as migration_status
    from .server import run

    url = config.require_database_url(settings)
    if status:
        print(format_status(run(migration_status(url))))
        return 0
    applied = run(migrate(url))
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    return 0


def _serve(settings: Settings) -> int:
    workers = settings.workers or os.cpu_count() or 1
    if workers == 1:
        from .server import run, serve

        run(serve(settings, reuse_port=os.environ.get("GATEWAY_WORKER_ID") is not None))
        return 0
    from .server import check, run

    # Checked here once, not by every worker (each printing the same error, interleaved).
    config.require_database_url(settings)
    run(check(settings))
    return supervise(workers)
