"""Settings: parsing, validation messages, docs, and bad configuration failing at startup."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config
from gateway.config import ConfigError

from .gwtest import SECRET, bare_env, free_port
from .pgconn import pg_connect

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_defaults_load() -> None:
    s = config.load({})
    assert s.port == 8080 and s.compression is False and s.send_queue_bytes == 1 << 20


def test_values_are_parsed_and_flags_win() -> None:
    s = config.load(
        {
            "GATEWAY_PORT": "9000",
            "GATEWAY_AUTH_TIMEOUT": "250ms",
            "GATEWAY_ALLOWED_ORIGINS": "https://a, https://b",
        },
        overrides={"port": "9001"},
    )
    assert s.port == 9001 and s.auth_timeout == 0.25 and s.allowed_origins == ("https://a", "https://b")
    assert config.load({}).presence_retention == 7 * 86400
    assert config.load({"GATEWAY_PRESENCE_RETENTION": "720h"}).presence_retention == 30 * 86400


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GATEWAY_PORT": "eighty"}, "GATEWAY_PORT='eighty' is not valid: expected a whole number"),
        ({"GATEWAY_AUTH_TIMEOUT": "soon"}, "GATEWAY_AUTH_TIMEOUT='soon' is not valid: expected a duration"),
        (
            {"GATEWAY_COMPRESSION": "maybe"},
            "GATEWAY_COMPRESSION='maybe' is not valid: expected true or false",
        ),
        ({"GATEWAY_POOL_SIZE": "0"}, "GATEWAY_POOL_SIZE='0' is not valid: expected at least 1"),
        (
            {"GATEWAY_MESSAGE_RATE": "fast"},
            "GATEWAY_MESSAGE_RATE='fast' is not valid: expected a number such as 20",
        ),
        (
            {"GATEWAY_SUBSCRIBE_RATE": "nan"},
            "GATEWAY_SUBSCRIBE_RATE='nan' is not valid: expected a finite number",
        ),
        (
            {"GATEWAY_PRESENCE_RETENTION": "a week"},
            "GATEWAY_PRESENCE_RETENTION='a week' is not valid: expected a duration such as 5, 5s, 250ms, 2m or 1h",
        ),
        (
            {"GATEWAY_PRESENCE_RETENTION": "0"},
            "GATEWAY_PRESENCE_RETENTION='0' is not valid: expected at least 1",
        ),
        ({"GATEWAY_LOG_FORMAT": "xml"}, "expected one of text, json"),
        ({"GATEWAY_PORTT": "1"}, "unknown setting GATEWAY_PORTT"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL=*** is not valid: expected a PostgreSQL URL"),
        ({"GATEWAY_JWT_SECRET": "short"}, "GATEWAY_JWT_SECRET is too short"),
        (
            {"GATEWAY_AUTHZ_FUNCTION": "x; drop table y"},
            "GATEWAY_AUTHZ_FUNCTION='x; drop table y' is not valid",
        ),
        (
            {"GATEWAY_PRESENCE_TOPICS": "presence:global,presence:my team"},
            "GATEWAY_PRESENCE_TOPICS has 'presence:my team': the topic may only contain printable ASCII",
        ),
        (
            {"GATEWAY_PRESENCE_TOPICS": "presence:"},
            "GATEWAY_PRESENCE_TOPICS has 'presence:': the topic must look like kind:id",
        ),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(env)
    assert message in str(info.value)


def test_secrets_are_masked() -> None:
    s = config.load({"DATABASE_URL": "postgresql://u:hunter2@h/db", "GATEWAY_JWT_SECRET": SECRET})
    shown = s.masked()
    assert "hunter2" not in str(shown) and SECRET not in str(shown)
    assert shown["GATEWAY_DATABASE_URL"] == "postgresql://u:***@h/db"


def test_configuration_page_lists_every_setting_and_nothing_else() -> None:
    # Row for row: a setting removed from the code must leave the page too.
    documented = [line for line in DOCS.read_text().splitlines() if line.startswith("| `GATEWAY_")]
    generated = [line for line in config.markdown_table().splitlines() if line.startswith("| `GATEWAY_")]
    assert documented == generated, "regenerate with: gateway config --markdown"
    assert config.markdown_table() in DOCS.read_text()


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = bare_env()
    full.update(env)
    full.update({"GATEWAY_PORT": str(free_port()), "GATEWAY_HOST": "127.0.0.1", "GATEWAY_JWT_SECRET": SECRET})
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--workers", "1"],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_bad_configuration_fails_at_startup_with_a_clear_message(dsn: str) -> None:
    conn = await pg_connect(dsn)
    await conn.execute("CREATE TABLE keyless (a int)")
    await conn.close()
    cases = [
        (
            {"GATEWAY_DATABASE_URL": dsn, "GATEWAY_TABLES": "public.nosuch"},
            "lists public.nosuch, but no such table",
        ),
        (
            {"GATEWAY_DATABASE_URL": dsn, "GATEWAY_TABLES": "public.bad-name"},
            "'public.bad-name' is not valid",
        ),
        (
            {"GATEWAY_DATABASE_URL": dsn, "GATEWAY_TABLES": "public.keyless"},
            "public.keyless, but it is not published",
        ),
        (
            {"GATEWAY_DATABASE_URL": dsn, "GATEWAY_TABLES": "public.keyless(a,nope)"},
            "has no column 'nope'",
        ),
        (
            {"GATEWAY_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nope"},
            "cannot connect to the database at postgresql://postgres@127.0.0.1:1/nope",
        ),
        ({"GATEWAY_DATABASE_URL": "not a url"}, "expected a PostgreSQL URL"),
        ({}, "GATEWAY_DATABASE_URL (or DATABASE_URL) is not set"),
    ]
    for env, message in cases:
        result = _serve(env)
        assert result.returncode == 2, (env, result.stderr[-2000:])
        assert message in result.stderr, (env, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


async def test_unmigrated_database_is_reported(blank_dsn: str) -> None:
    result = _serve({"GATEWAY_DATABASE_URL": blank_dsn})
    assert result.returncode == 2
    assert "run `gateway migrate` first" in result.stderr
