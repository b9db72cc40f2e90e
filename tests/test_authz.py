"""Topic names, token grants and the SQL authorization function on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from gateway import authz
from gateway.auth import Identity
from gateway.authz import AuthorizationUnavailable, Authorizer, function_sql, topic_matches
from gateway.config import ConfigError, Settings
from gateway.protocol import validate_topic

from .pgconn import pg_pool

# A function that counts its calls (so the tests can see the cache) and grants what
# h4_grants lists, or everything to a token with role=admin (so the claims must arrive).
SETUP = """
CREATE TABLE h4_grants (user_id text, topic text);
CREATE TABLE h4_calls (user_id text, topic text, claims jsonb);
CREATE FUNCTION public.h4_allow(user_id text, topic text, claims jsonb) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO h4_calls VALUES (user_id, topic, claims);
    RETURN claims->>'role' = 'admin'
        OR EXISTS (SELECT 1 FROM h4_grants g WHERE g.user_id = h4_allow.user_id AND g.topic = h4_allow.topic);
END
$$;
"""


def ident(user: str = "alice", **claims: Any) -> Identity:
    return Identity(user=user, claims={"sub": user, "exp": 2_000_000_000, **claims}, expires=2e9)


def settings(**kw: Any) -> Settings:
    return Settings(**{"authz_function": "public.h4_allow", **kw})


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await pg_pool(dsn, min_size=1, max_size=4)
    await pool.execute(SETUP)
    yield pool
    await pool.close()


async def calls(pool: asyncpg.Pool) -> int:
    n: int = await pool.fetchval("SELECT count(*) FROM h4_calls")
    return n


# --- topic names --------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    ["user:42", "room:7", "presence:global", "a:b", "doc:a:b:c", "x:" + "y" * 198, "k:!#$%&'()+,-./~"],
)
def test_valid_topics(topic: str) -> None:
    assert validate_topic(topic) is None


@pytest.mark.parametrize(
    ("topic", "says"),
    [
        ("", "empty"),
        ("x:" + "y" * 199, "longer than 200"),
        ("room 7:1", "without spaces"),
        ("room:7\n", "printable ASCII"),
        ("room:\x00", "printable ASCII"),
        ("räum:7", "printable ASCII"),
        ("room:*", "'*'"),
        ("*", "'*'"),
        ("room", "kind:id"),
        (":7", "kind:id"),
        ("room:", "kind:id"),
        (42, "string"),
    ],
)
def test_invalid_topics(topic: Any, says: str) -> None:
    problem = validate_topic(topic)
    assert problem is not None and says in problem


def test_topic_patterns(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(authz, "_reported", set())
    assert topic_matches("room:7", "room:7")
    assert not topic_matches("room:7", "room:70")
    assert topic_matches("room:*", "room:7")
    assert topic_matches("room:*", "room:7:thread:2")
    assert topic_matches("room:1*", "room:12")
    assert not topic_matches("room:*", "roomx:7")
    assert not topic_matches("room:*", "room:")
    assert not topic_matches("room:1*", "room:2")
    # Grants that would cover other kinds (or everything) grant nothing, and are reported once.
    for _ in range(3):
        assert not topic_matches("*", "room:7")
        assert not topic_matches("room*", "roomx:7")
        assert not topic_matches("*:7", "room:7")
        # Other users' private topics: the token is refused when verified; never honoured here.
        assert not topic_matches("user:*", "user:bob")
        assert not topic_matches("user:alice*", "user:alice2")
    assert topic_matches("user:bob", "user:bob"), "an exact user: grant is the issuer's choice"
    reported = [r.getMessage() for r in caplog.records if "ignoring topic grant" in r.getMessage()]
    assert len(reported) == 5, reported


# --- own topic and token grants -----------------------------------------------------


async def test_own_topic_and_grants_without_database() -> None:
    az = Authorizer(settings(), None)
    alice = ident(topics=["room:7", "doc:*", 42, None, {"x": 1}])
    assert await az.allowed(alice, "user:alice")
    assert not await az.allowed(alice, "user:bob")
    assert not await az.allowed(alice, "user:alice2")
    assert await az.allowed(alice, "room:7")
    assert not await az.allowed(alice, "room:8")
    assert await az.allowed(alice, "doc:123")
    assert not await az.allowed(alice, "docs:123")
    assert not await az.allowed(alice, "doc:*"), "a pattern is not a topic"
    assert not await az.allowed(ident(), "room:7"), "no topics claim, no grants"


async def test_grants_claim_name_and_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(authz, "_reported", set())
    az = Authorizer(settings(jwt_topics_claim="chan"), None)
    assert await az.allowed(ident(chan=["room:7"]), "room:7")
    assert not await az.allowed(ident(topics=["room:7"]), "room:7"), "only the configured claim grants"
    assert not await az.allowed(ident(chan="room:7"), "room:7"), "the claim must be a list"
    assert not await az.allowed(ident(chan=["*"]), "room:7")


async def test_own_topic_with_integer_user() -> None:
    az = Authorizer(settings(), None)
    assert await az.allowed(ident("42"), "user:42")


# --- the SQL function ---------------------------------------------------------------


def test_function_sql_quotes_identifiers() -> None:
    assert function_sql("gateway.authorize") == (
        'SELECT "gateway"."authorize"($1::text, $2::text, $3::text::jsonb)'
    )
    assert function_sql("may_read") == 'SELECT "may_read"($1::text, $2::text, $3::text::jsonb)'
    # Names as SQL writes them: unquoted folded to lower case, quoted as written.
    assert function_sql("App.May_Read") == 'SELECT "app"."may_read"($1::text, $2::text, $3::text::jsonb)'
    assert function_sql(' app . "Can Read""s" ') == (
        'SELECT "app"."Can Read""s"($1::text, $2::text, $3::text::jsonb)'
    )
    for bad, why in (
        ("gateway.authorize(); DROP TABLE x; --", "unexpected '\\('"),
        ("a.b.c", "3 name parts"),
        ("", "expected a function name"),
        ("a..b", "expected a name after '.'"),
        ('a"b', "unexpected"),
        ('"unclosed', "no closing"),
        ("café-bar", "must be double-quoted"),
    ):
        with pytest.raises(ConfigError, match=f"GATEWAY_AUTHZ_FUNCTION.*{why}"):
            function_sql(bad)


async def test_a_quoted_function_name_in_its_own_schema_is_asked(db: asyncpg.Pool) -> None:
    await db.execute(
        'CREATE SCHEMA "Policy"; CREATE FUNCTION "Policy"."May Read"(u text, t text, c jsonb) '
        "RETURNS boolean LANGUAGE sql AS $$SELECT t = 'room:1'$$"
    )
    az = Authorizer(settings(authz_function='"Policy"."May Read"'), db)
    assert await az.allowed(ident(), "room:1")
    assert not await az.allowed(ident(), "room:2")


async def test_sql_function_decides(db: asyncpg.Pool) -> None:
    await db.execute("INSERT INTO h4_grants VALUES ('alice', 'room:7')")
    az = Authorizer(settings(), db)
    assert await az.allowed(ident(), "room:7")
    assert not await az.allowed(ident(), "room:8")
    assert not await az.allowed(ident("bob"), "room:7")
    # The claims reach the function as jsonb.
    assert await az.allowed(ident("carol", role="admin"), "room:9")
    row = await db.fetchrow("SELECT claims FROM h4_calls WHERE user_id = 'carol'")
    assert '"role": "admin"' in row["claims"]
    # Own topic and token grants never ask the database.
    before = await calls(db)
    assert await az.allowed(ident(topics=["room:*"]), "room:99")
    assert await az.allowed(ident(), "user:alice")
    assert await calls(db) == before


async def test_default_function_from_migrations_grants_nothing(db: asyncpg.Pool) -> None:
    az = Authorizer(Settings(), db)  # gateway.authorize, created by the migrations
    assert not await az.allowed(ident(), "room:7")
    assert await az.allowed(ident(), "user:alice")


async def test_function_disabled(db: asyncpg.Pool) -> None:
    await db.execute("INSERT INTO h4_grants VALUES ('alice', 'room:7')")
    az = Authorizer(settings(authz_function=""), db)
    assert not await az.allowed(ident(), "room:7")
    assert await calls(db) == 0


async def test_answer_cached_within_ttl(db: asyncpg.Pool) -> None:
    await db.execute("INSERT INTO h4_grants VALUES ('alice', 'room:7')")
    az = Authorizer(settings(authz_cache_ttl=3600), db)
    assert await az.allowed(ident(), "room:7")
    assert not await az.allowed(ident(), "room:8")
    await db.execute("DELETE FROM h4_grants")
    await db.execute("INSERT INTO h4_grants VALUES ('alice', 'room:8')")
    for _ in range(5):
        assert await az.allowed(ident(), "room:7"), "cached yes"
        assert not await az.allowed(ident(), "room:8"), "cached no"
    assert await calls(db) == 2
    assert az.queries == 2
    # The cache is per user (and topic and claims): bob is asked for.
    assert not await az.allowed(ident("bob"), "room:7")
    assert await calls(db) == 3


async def test_answer_changes_after_ttl(db: asyncpg.Pool) -> None:
    await db.execute("INSERT INTO h4_grants VALUES ('alice', 'room:7')")
    az = Authorizer(settings(authz_cache_ttl=0.05), db)
    assert await az.allowed(ident(), "room:7")
    await db.execute("DELETE FROM h4_grants")
    await asyncio.sleep(0.1)  # past the TTL; the monotonic clock never runs backwards
    assert not await az.allowed(ident(), "room:7")
    assert await calls(db) == 2


async def test_ttl_zero_disables_the_cache(db: asyncpg.Pool) -> None:
    az = Authorizer(settings(authz_cache_ttl=0), db)
    for _ in range(3):
        assert not await az.allowed(ident(), "room:7")
    assert await calls(db) == 3


async def test_cache_is_bounded_and_evicts_oldest(db: asyncpg.Pool) -> None:
    az = Authorizer(settings(authz_cache_ttl=3600), db, cache_size=2)
    for topic in ("room:1", "room:2", "room:3"):  # room:1 is evicted by room:3
        await az.allowed(ident(), topic)
    assert await calls(db) == 3
    await az.allowed(ident(), "room:3")
    await az.allowed(ident(), "room:2")
    assert await calls(db) == 3
    await az.allowed(ident(), "room:1")
    assert await calls(db) == 4


async def test_concurrent_questions_share_one_query(db: asyncpg.Pool) -> None:
    """A reconnect storm: many sockets of one user subscribe to the same topic at once."""
    await db.execute("INSERT INTO h4_grants VALUES ('alice', 'room:7')")
    az = Authorizer(settings(), db)
    answers = await asyncio.gather(*(az.allowed(ident(), "room:7") for _ in range(50)))
    assert answers == [True] * 50
    assert await calls(db) == 1


async def test_missing_function_is_unavailable(db: asyncpg.Pool, caplog: pytest.LogCaptureFixture) -> None:
    az = Authorizer(settings(authz_function="public.h4_nope"), db)
    for _ in range(3):
        with pytest.raises(AuthorizationUnavailable, match="h4_nope"):
            await az.allowed(ident(), "room:7")
    logged = [r for r in caplog.records if r.name == "gateway.authz" and r.levelno >= logging.ERROR]
    assert len(logged) == 1, "logged once per outage, not once per subscribe"
    assert "UndefinedFunctionError" in logged[0].getMessage()
    # Failures are not cached: once the function exists, it answers.
    await db.execute(
        "CREATE FUNCTION public.h4_nope(text, text, jsonb) RETURNS boolean LANGUAGE sql AS 'SELECT true'"
    )
    assert await az.allowed(ident(), "room:7")


class Proxy:
    """A TCP proxy to PostgreSQL that the test can cut, as a network or server outage."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        await self.server.wait_closed()
        self.server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}


async def test_database_down_is_unavailable(
    dsn: str, db: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.authz")
    await db.execute("INSERT INTO h4_grants VALUES ('alice', 'room:7')")
    host, port = await db.fetchrow("SELECT host(inet_server_addr()), inet_server_port()")
    proxy = Proxy((host, port))
    await proxy.start()
    pool = await pg_pool(dsn, host="127.0.0.1", port=proxy.port, min_size=1, max_size=2)
    try:
        az = Authorizer(settings(authz_cache_ttl=0), pool)
        assert await az.allowed(ident(), "room:7")

        await proxy.stop()  # the database is gone: open connections die, new ones are refused
        for _ in range(3):
            with pytest.raises(AuthorizationUnavailable) as info:
                await az.allowed(ident(), "room:7")
            assert "127.0.0.1" not in str(info.value), (
                "the cause stays in the log, not in the client's message"
            )
        errors = [r for r in caplog.records if r.name == "gateway.authz" and r.levelno >= logging.ERROR]
        assert len(errors) == 1

        await proxy.start()  # same port: the database is back
        assert await az.allowed(ident(), "room:7")
        assert "answers again" in caplog.text
    finally:
        await pool.close()
        if proxy.server is not None:
            await proxy.stop()


async def test_database_unreachable_from_the_start(db: asyncpg.Pool) -> None:
    # A pool whose server never answered (nothing listens on port 9): no connection yet.
    pool = await pg_pool("postgresql://postgres@127.0.0.1:9/x", min_size=0, max_size=1)
    try:
        with pytest.raises(AuthorizationUnavailable):
            await Authorizer(settings(), pool).allowed(ident(), "room:7")
    finally:
        await pool.close()
