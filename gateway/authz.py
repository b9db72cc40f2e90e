"""Which topics a user may read.

``Authorizer.allowed(identity, topic)`` is asked once per subscription and again when a
token is refreshed; never per message (per message x subscriber is where row-level checks
stop scaling). The answer comes from, in order:

1. the user's own topic ``user:<id>``: always allowed;
2. the token's grants (``GATEWAY_JWT_TOPICS_CLAIM``): exact names and ``kind:prefix*``
   patterns, e.g. ``["room:7", "doc:*"]``;
3. the SQL function ``GATEWAY_AUTHZ_FUNCTION(user_id text, topic text, claims jsonb)``,
   whose answers are cached per (user, topic, claims) for ``GATEWAY_AUTHZ_CACHE_TTL`` seconds
   and whose concurrent identical questions share one query, so a reconnect storm costs the
   database one query per distinct question rather than one per socket. The claims count
   without the ones every fresh token changes (``TIME_CLAIMS``): the function decides on the
   claims it is given, so its answer for one token's claims must not stand for another's.

When the function cannot be asked (database down, function missing) ``allowed`` raises
``AuthorizationUnavailable``: "we don't know" must not be reported as "forbidden", and
must never be cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import asyncpg

from .auth import Identity
from .config import Settings
from .pgerrors import DB_ERRORS
from .protocol import validate_topic
from .tables import parse_name, quote_ident

log = logging.getLogger(__name__)

# Answers of the SQL function kept at most; the oldest is evicted first.
CACHE_SIZE = 100_000
# Deadline for one question to the SQL function, pool wait and connect included.
QUERY_TIMEOUT = 5.0

# Claims that differ between any two tokens of one user (when issued, until when): left out of
# the cache key, so fresh tokens with the same rights still share answers.
TIME_CLAIMS = frozenset({"exp", "iat", "nbf", "jti", "auth_time"})

# Grants already reported as unusable, so a token handed to thousands of connections
# logs its mistake once. Bounded: a hostile issuer could invent endless bad grants.
_reported: set[str] = set()


# Publishing (docs/security.md, "Who may publish"): the token's claim and the SQL function.
PUBLISH_CLAIM = "publish"
PUBLISH_FUNCTION = "gateway.authorize_publish"
PUBLISH_SQL = "SELECT gateway.authorize_publish($1::text, $2::text, $3::text::jsonb)"

_Key = tuple[str, str, str, bytes]


def _report_bad_grant(pattern: str, why: str) -> None:
    if pattern in _reported or len(_reported) >= 1000:
        return
    _reported.add(pattern)
    log.warning("ignoring topic grant %r in a token: %s", pattern[:100], why)


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether a grant covers a topic: equal, or ``kind:prefix*`` and the topic starts with ``kind:prefix``.

    The wildcard is only allowed after the ``kind:`` part, so ``room:*`` never covers
    ``roomx:7`` and a bare ``*`` (every topic, every user's private one included) grants nothing;
    nor does a pattern over the ``user:`` kind (``user:alice*`` covers ``user:alice2``).
    """
    if pattern == topic:
        return True
    if "*" not in pattern:
        return False
    prefix = pattern[:-1]
    kind, sep, _ = prefix.partition(":")
    if not pattern.endswith("*") or not sep or not kind or "*" in prefix:
        _report_bad_grant(pattern, "a wildcard must follow kind:, as in room:*")
        return False
    if kind == "user":
        # Would cover other users' private topics. Authenticator.verify refuses such tokens;
        # this keeps an Identity made any other way from honouring one.
        _report_bad_grant(pattern, "patterns over user: topics are never honoured")
        return False
    return len(topic) > len(prefix) and topic.startswith(prefix)


def _granted(grants: Any, topic: str) -> bool:
    if grants is None:
        return False
    if not isinstance(grants, list):
        _report_bad_grant(repr(grants)[:100], "the topics claim must be a list of topic names")
        return False
    return any(isinstance(g, str) and topic_matches(g, topic) for g in grants)


def function_sql(function: str) -> str:
    """The query asking ``function`` (written as in SQL: ``gateway.authorize``,
    ``app."CanRead"``), each name part quoted as an identifier."""
    parts = parse_name(function, "GATEWAY_AUTHZ_FUNCTION", "a function")
    # The claims travel as text and are cast in SQL, so the query works whatever jsonb
    # codec the pool's connections have installed.
    return f"SELECT {'.'.join(quote_ident(p) for p in parts)}($1::text, $2::text, $3::text::jsonb)"


def _claims_digest(claims: Mapping[str, Any]) -> bytes:
    """The claims the function's answer may depend on, as a short key (a token may be 16 KB)."""
    kept = {k: v for k, v in claims.items() if k not in TIME_CLAIMS}
    text = json.dumps(kept, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class AuthorizationUnavailable(Exception):
    """The SQL authorization function could not be asked; the answer is unknown."""


class Authorizer:
    def __init__(
        self, settings: Settings, pool: asyncpg.Pool | None, *, cache_size: int = CACHE_SIZE
    ) -> None:
        self._topics_claim = settings.jwt_topics_claim
        self._sql = function_sql(settings.authz_function) if settings.authz_function else None
        self._function = settings.authz_function
        self._pool = pool
        self._ttl = settings.authz_cache_ttl
        self._cache_size = max(1, cache_size)
        # (query, user, topic, digest of the claims) -> (monotonic deadline, answer); dicts keep
        # insertion order, so the first key is the oldest answer. The query tells reads from
        # publishes apart.
        self._cache: dict[_Key, tuple[float, bool]] = {}
        self._inflight: dict[_Key, asyncio.Task[bool]] = {}
        self._failing = False
        self.queries = 0  # questions sent to the database, for metrics and tests

    async def allowed(self, identity: Identity, topic: str) -> bool:
        if validate_topic(topic) is not None:
            return False
        if topic == "user:" + identity.user:
            return True
        if _granted(identity.claims.get(self._topics_claim), topic):
            return True
        if self._sql is None or self._pool is None:
            return False
        return await self._decide(self._sql, self._function, identity, topic)

    async def may_publish(self, identity: Identity, topic: str) -> bool:
        """Whether the user may publish on ``topic``: granted by the token's ``publish`` claim
        (the syntax of the topics claim) or by ``gateway.authorize_publish``, never by a read
        grant, not even for the user's own ``user:<id>`` topic. Cached like reads; raises
        AuthorizationUnavailable when the function cannot be asked."""
        if validate_topic(topic) is not None:
            return False
        if _granted(identity.claims.get(PUBLISH_CLAIM), topic):
            return True
        if self._pool is None:
            return False
        return await self._decide(PUBLISH_SQL, PUBLISH_FUNCTION, identity, topic)

    async def _decide(self, sql: str, function: str, identity: Identity, topic: str) -> bool:
        """The SQL function's answer, from the cache or asked once for every concurrent asker."""
        key = (sql, identity.user, topic, _claims_digest(identity.claims))
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > time.monotonic():
                return hit[1]
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._ask(key, function, identity.claims))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        # shield: one subscriber giving up must not cancel the answer others are waiting for.
        return await asyncio.shield(task)

    async def _ask(self, key: _Key, function: str, claims: Mapping[str, Any]) -> bool:
        assert self._pool is not None
        self.queries += 1
        try:
            async with asyncio.timeout(QUERY_TIMEOUT):
                answer = await self._pool.fetchval(
                    key[0], key[1], key[2], json.dumps(dict(claims), default=str)
                )
        except DB_ERRORS as exc:
            cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if not self._failing:
                # Once per outage, not once per subscribe: a storm of failures says nothing new.
                self._failing = True
                log.error("authorization function %s cannot be asked (%s)", function, cause)
            # The message may reach the client: the cause (host names, SQL errors) stays in the log.
            raise AuthorizationUnavailable(
                f"authorization is unavailable: {function} could not be asked; retry later"
            ) from exc
        if self._failing:
            self._failing = False
            log.info("authorization function %s answers again", function)
        allowed = answer is True  # NULL means "no"
        if self._ttl > 0:
            self._cache.pop(key, None)
            while len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]
            self._cache[key] = (time.monotonic() + self._ttl, allowed)
        return allowed
