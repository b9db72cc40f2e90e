"""Settings: environment variables with the ``GATEWAY_`` prefix, or the same names as CLI flags.

Every setting is declared once below (name, type, default, meaning). From that one table
come the parser, the CLI flags (``--max-frame-bytes`` for ``GATEWAY_MAX_FRAME_BYTES``),
``gateway config`` (which prints every setting with its default and meaning) and the
validation errors, which name the variable and what it expects.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .protocol import PRESENCE_PREFIX, validate_topic
from .tables import parse_name, parse_tables

PREFIX = "GATEWAY_"
# Variables with the prefix that are not settings: where the SQL migrations live
# (read by `gateway migrate`) and the worker number the supervisor gives each worker.
NOT_SETTINGS = frozenset({"GATEWAY_SQL_DIR", "GATEWAY_WORKER_ID"})


# --- value parsers: each raises ValueError with what it expects --------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise ValueError("a duration such as 5, 5s, 250ms, 2m or 1h")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("true or false")


def parse_int(text: str) -> int:
    try:
        return int(text.strip().replace("_", ""))
    except ValueError:
        raise ValueError("a whole number") from None


def parse_number(text: str) -> float:
    try:
        value = float(text.strip().replace("_", ""))
    except ValueError:
        raise ValueError("a number such as 20 or 0.5") from None
    if not math.isfinite(value):  # float() takes "nan" and "inf", which no rate means
        raise ValueError("a finite number such as 20 or 0.5")
    return value


def parse_port(text: str) -> int:
    port = parse_int(text)
    if not 0 <= port <= 65535:  # uvloop would silently listen on port % 65536
        raise ValueError("a port number from 0 to 65535")
    return port


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def parse_dsn(text: str) -> str:
    t = text.strip()
    if not t:
        return ""
    parts = urlsplit(t)
    if parts.scheme not in ("postgres", "postgresql") or (not parts.hostname and "host=" not in parts.query):
        raise ValueError("a PostgreSQL URL such as postgresql://user:password@host:5432/dbname")
    return t


_DSN_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/?#]*:).*@")
_QUERY_PASSWORD = re.compile(r"([?&](?:ssl)?password=)[^&#]*", re.IGNORECASE)


def require_database_url(s: Settings) -> str:
    """The database URL, for the commands that cannot run without one (serve, migrate)."""
    if not s.database_url:
        raise ConfigError("GATEWAY_DATABASE_URL (or DATABASE_URL) is not set: expected a PostgreSQL URL")
    return s.database_url


def _mask_userinfo(url: str) -> str:
    """A URL without its user info (a password, or a NATS token standing alone)."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}" if "@" in rest else url


def mask_dsn(dsn: str) -> str:
    """The DSN with its passwords replaced, for logs and error messages: the one after the user
    name (up to the last "@", so an unescaped "#" or "/" in it is covered too) and the
    ``password``/``sslpassword`` query parameters libpq and asyncpg also accept."""
    return _QUERY_PASSWORD.sub(r"\1***", _DSN_PASSWORD.sub(r"\1***@", dsn))


def parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        t = text.strip().lower()
        if t not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return t

    return parse


def parse_broker(text: str) -> tuple[str, ...]:
    urls = parse_list(text)
    for url in urls:
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
        except ValueError:
            raise ValueError("NATS URLs such as nats://user:password@host:4222") from None
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise ValueError(
                "NATS URLs such as nats://user:password@host:4222 (or tls://...), comma-separated"
            )
    return urls


_SUBJECT_PREFIX = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def parse_subject_prefix(text: str) -> str:
    t = text.strip()
    if not _SUBJECT_PREFIX.match(t):
        raise ValueError(
            "NATS subject tokens of letters, digits, _ and - separated by dots, such as gateway.prod"
        )
    return t


def _identity(text: str) -> str:
    return text.strip()


# --- parsers of settings with a syntax of their own: each raises ConfigError, naming the
# setting, with a message that says more than "expected ..." -------------------------


def parse_tables_setting(text: str) -> str:
    """GATEWAY_TABLES, its syntax only, so a typo is reported before the gateway connects;
    the catalog is checked at startup (gateway/resolver.py)."""
    parse_tables(text)
    return text.strip()


def parse_function_setting(text: str) -> str:
    """GATEWAY_AUTHZ_FUNCTION: empty, or a function name written as in SQL."""
    t = text.strip()
    if t:
        parse_name(t, "GATEWAY_AUTHZ_FUNCTION", "a function")
    return t


def parse_presence_topics(text: str) -> tuple[str, ...]:
    topics = parse_list(text)
    for topic in topics:
        if not topic.startswith(PRESENCE_PREFIX):
            raise ConfigError(
                f"GATEWAY_PRESENCE_TOPICS has {topic!r}: expected names starting with presence:"
            )
        # Presence changes go out through gateway.emit_many, which refuses a topic no client
        # could subscribe to, and with it every change of the batch: refuse it here instead.
        problem = validate_topic(topic)
        if problem:
            raise ConfigError(f"GATEWAY_PRESENCE_TOPICS has {topic!r}: {problem}")
    return topics


HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
KNOWN_ALGORITHMS = (*HMAC_ALGORITHMS, "RS256", "RS384", "RS512", "ES256", "ES384", "PS256")


def parse_jwt_secret(text: str) -> str:
    t = text.strip()
    if t and len(t) < 32:
        raise ConfigError("GATEWAY_JWT_SECRET is too short: expected at least 32 characters for HS256")
    return t


def parse_jwt_algorithms(text: str) -> tuple[str, ...]:
    algorithms = parse_list(text)
    for alg in algorithms:
        if alg not in KNOWN_ALGORITHMS:
            raise ConfigError(
                f"GATEWAY_JWT_ALGORITHMS has {alg!r}: expected HS256, RS256, ES256 and the like"
            )
    return algorithms


def parse_jwks_url(text: str) -> str:
    t = text.strip()
    if t and not t.startswith(("http://", "https://")):
        raise ConfigError("GATEWAY_JWT_JWKS_URL is not valid: expected an http:// or https:// URL")
    return t


def _setting(
    default: Any,
    help: str,
    parse: Callable[[str], Any] = _identity,
    *,
    secret: bool = False,
    minimum: float | None = None,
) -> Any:
    return field(
        default=default,
        metadata={"help": help, "parse": parse, "secret": secret, "minimum": minimum},
    )


@dataclass(frozen=True)
class Settings:
    # Database
    database_url: str = _setting(
        "",
        "PostgreSQL URL. DATABASE_URL is read too; when both are set this one wins. Empty: `gateway demo` "
        "starts a throwaway cluster; `serve` and `migrate` refuse to start.",
        parse_dsn,
        secret=True,
    )
    pool_size: int = _setting(
        4, "connections in the pool that resolves rows and replays the log", parse_int, minimum=1
    )
    db_timeout: float = _setting(
        10.0,
        "longest a query of the pool may take: a connection that does not answer (a dropped NAT "
        "flow, a partition) is given up and the gateway catches up from the log",
        parse_duration,
        minimum=0.1,
    )
    tables: str = _setting(
        "",
        "allow-list of tables whose rows are sent: `schema.table` (`table` alone: schema public) or "
        "`schema.table(col1,col2)` to send only those columns, separated by `;`. Names are written as "
        'in SQL: unquoted ones are folded to lower case, others double-quoted (`public."Orders"(id,"unit price")`). '
        "Tables not listed are never read; empty sends no table rows.",
        parse_tables_setting,
    )
    # HTTP
    host: str = _setting("0.0.0.0", "address to listen on (`gateway demo`: 127.0.0.1 unless this is set)")
    port: int = _setting(8080, "TCP port to listen on (0 to 65535)", parse_port)
    workers: int = _setting(
        0,
        "worker processes sharing the port (SO_REUSEPORT) for `gateway serve`; 0 = one per core",
        parse_int,
        minimum=0,
    )
    allowed_origins: tuple[str, ...] = _setting(
        (),
        "Origins allowed to open a WebSocket (comma-separated, e.g. https://app.example.com). "
        "Empty: only the gateway's own origin. `*` allows any (not recommended).",
        parse_list,
    )
    compression: bool = _setting(
        False,
        "accept permessage-deflate: clients may then compress the frames they send (costs CPU and memory "
        "per connection). The gateway's own frames are never compressed: each event is encoded once and "
        "the same bytes go to every subscriber, so this saves no bandwidth toward clients",
        parse_bool,
    )
    # Authentication
    jwt_secret: str = _setting(
        "",
        "shared secret for HS256 (HS384, HS512) tokens, at least 32 characters; "
        "empty when tokens are checked with GATEWAY_JWT_JWKS_URL only",
        parse_jwt_secret,
        secret=True,
    )
    jwt_jwks_url: str = _setting(
        "", "URL of a JWKS document with the public keys for RS256/ES256 tokens", parse_jwks_url
    )
    jwt_algorithms: tuple[str, ...] = _setting(
        (),
        "accepted algorithms; default: with a secret, HS256 plus HS384/HS512 when it is 48/64 bytes or longer; "
        "with a JWKS URL, RS256,ES256; with both, all of these",
        parse_jwt_algorithms,
    )
    jwt_audience: str = _setting("", "required `aud` claim (empty: not checked)")
    jwt_issuer: str = _setting("", "required `iss` claim (empty: not checked)")
    jwt_leeway: float = _setting(
        30.0, "clock skew allowed when checking exp/nbf/iat", parse_duration, minimum=0
    )
    jwt_user_claim: str = _setting("sub", "claim holding the user id")
    jwt_topics_claim: str = _setting(
        "topics", "claim listing extra topics the user may read (`room:7`, `room:*`)"
    )
    jwks_refresh_interval: float = _setting(
        30.0, "least time between two JWKS fetches caused by unknown key ids", parse_duration, minimum=0
    )
    auth_timeout: float = _setting(
        5.0, "how long a client has to send its auth frame", parse_duration, minimum=0.1
    )
    http_idle_timeout: float = _setting(
        75.0,
        "how long an HTTP connection may stay open without a request in progress: one that sends no "
        "request, or its headers too slowly (slowloris), or sits idle between keep-alive requests is "
        "closed after this. Keep it above the idle timeout of a proxy's pooled connections (nginx "
        "upstream keepalive: 60 s). Upgraded WebSockets are not affected",
        parse_duration,
        minimum=1,
    )
    expiry_grace: float = _setting(
        10.0,
        "how long past token expiry (plus the JWT leeway) a connection may stay open awaiting a refresh",
        parse_duration,
        minimum=0,
    )
    max_token_lifetime: float = _setting(
        86400.0,
        "a token's exp counts as at most this long after the token was verified, whatever it says: "
        "the connection is then closed (4005, after GATEWAY_JWT_LEEWAY and GATEWAY_EXPIRY_GRACE) "
        "unless the client sent refresh, and each refresh starts a new period. Bounds how long a "
        "token minted with an exp far away keeps a connection open",
        parse_duration,
        minimum=1,
    )
    authz_function: str = _setting(
        "gateway.authorize",
        "SQL function (user_id text, topic text, claims jsonb) -> boolean deciding topics not granted by "
        'the token, named as in SQL (`app."CanRead"`: unquoted names are folded to lower case); '
        "empty to disable",
        parse_function_setting,
    )
    authz_cache_ttl: float = _setting(
        5.0,
        "how long answers of the SQL authorization function are cached, per user, topic and token "
        "claims (exp, iat, nbf, jti, auth_time aside); 0 disables the cache (every subscribe not "
        "granted by the token asks the database)",
        parse_duration,
    )
    # Limits
    max_frame_bytes: int = _setting(16384, "largest client frame accepted", parse_int, minimum=256)
    max_subscriptions: int = _setting(100, "subscriptions per connection", parse_int, minimum=1)
    max_connections: int = _setting(20000, "connections per process", parse_int, minimum=1)
    max_connections_per_user: int = _setting(20, "connections per user on one process", parse_int, minimum=1)
    connect_rate: float = _setting(
        500.0,
        "new WebSocket connections accepted per second per process (burst: 2x); above it an upgrade "
        "gets HTTP 503 `too_many_connects` with Retry-After: 1 before its token is checked, so a "
        "reconnect storm after a deploy costs little. 0 = no limit",
        parse_number,
        minimum=0,
    )
    message_rate: float = _setting(
        20.0, "client frames per second per connection (burst: 2x)", parse_number, minimum=0.1
    )
    subscribe_rate: float = _setting(
        10.0, "subscribes per second per connection (burst: 2x)", parse_number, minimum=0.1
    )
    # Publishing (docs/protocol.md, "Publishing"): a client's messages to a topic.
    max_publish_bytes: int = _setting(
        4096,
        "largest `data` of a publish, in bytes of JSON; larger ones get `too_large`. At most 6000: "
        "an ephemeral message travels between replicas in one NOTIFY (under 8000 bytes)",
        parse_int,
        minimum=2,
    )
    publish_rate: float = _setting(
        20.0,
        "publishes per second per connection (burst: 2x), within GATEWAY_MESSAGE_RATE; over it a "
        "publish gets `rate_limited`",
        parse_number,
        minimum=0.1,
    )
    publish_topic_rate: float = _setting(
        200.0,
        "publishes per second per topic on one replica (burst: 2x), all clients and the HTTP API together",
        parse_number,
        minimum=0.1,
    )
    publish_replica_rate: float = _setting(
        5000.0,
        "publishes per second on one replica (burst: 2x), all topics together",
        parse_number,
        minimum=0.1,
    )
    send_queue_bytes: int = _setting(
        1 << 20,
        "bytes queued to one client before it is cut off as a slow consumer; a resume whose "
        "replay is more than half of it gets recovered=false. The kernel's send buffer of the "
        "client's socket holds at most about 320 KiB more (SO_SNDBUF)",
        parse_int,
        minimum=1024,
    )
    # Listener and pipeline
    probe_interval: float = _setting(
        5.0, "how often the LISTEN connection is probed", parse_duration, minimum=0.1
    )
    probe_timeout: float = _setting(
        3.0, "probe answer deadline before the connection is declared dead", parse_duration
    )
    reconnect_max_delay: float = _setting(
        10.0, "cap of the listener's reconnect backoff", parse_duration, minimum=0.1
    )
    batch_max: int = _setting(1000, "notifications resolved together in one batch", parse_int, minimum=1)
    # Relay (sql/102_relay.sql, gateway/relay.py): one replica rings the doorbells of committed events
    relay_poll_interval: float = _setting(
        0.003,
        "how often the relay reads new events while writes are frequent (writers then send no NOTIFY); "
        "above 1,000 events/s it grows in proportion to the rate, up to 4 times this (from 4,000 events/s). "
        "With GATEWAY_RELAY_WAIT: the longest a poll waits for a commit",
        parse_duration,
        minimum=0.001,
    )
    relay_wait: bool = _setting(
        False,
        "while writes are frequent, each of the relay's polls waits inside PostgreSQL for the next commit "
        "(looking about every millisecond) instead of the relay sleeping through the poll interval: "
        "2-3 ms less latency at a few hundred commits/s, for more PostgreSQL CPU per commit "
        '(docs/performance.md, "Where the latency goes"); worth it where the database has a core to spare',
        parse_bool,
    )
    relay_wake_rate: int = _setting(
        200,
        "events per second from which the relay polls on its own instead of being rung by each writer "
        "(judged over 0.1 s; it goes back to being rung after a second below half of it)",
        parse_int,
        minimum=1,
    )
    relay_idle_poll: float = _setting(
        1.0, "how often a quiet relay reads new events anyway (a safety net)", parse_duration, minimum=0.01
    )
    relay_lease: float = _setting(
        3.0,
        "the relay's lease: if the replica relaying stalls, another takes over within this time "
        "(within about a second if the replica's process died)",
        parse_duration,
        minimum=0.5,
    )
    # Broker (optional, gateway/broker.py): NATS fans doorbells out instead of LISTEN
    broker: tuple[str, ...] = _setting(
        (),
        "NATS server URL(s) for fan-out (comma-separated, one per server of a NATS cluster): "
        "`nats://user:password@host:4222`, `nats://token@host:4222`, or `tls://...` for TLS. Credentials "
        "are required (in the URL or GATEWAY_BROKER_CREDS) unless every host is loopback. Needs "
        "`pip install 'pg-ws-gateway[nats]'`. Empty: PostgreSQL LISTEN only",
        parse_broker,
        secret=True,
    )
    broker_creds: str = _setting(
        "",
        "a NATS credentials file (`.creds`: user JWT and NKey seed) for the broker connection; "
        "needs `pip install nkeys`",
    )
    broker_tls_ca: str = _setting(
        "", "CA certificate file (PEM) the broker's TLS certificate is checked against; empty: the system's"
    )
    broker_tls_cert: str = _setting(
        "", "client certificate file (PEM) for brokers that require TLS client auth"
    )
    broker_tls_key: str = _setting("", "the client certificate's private key file (PEM)")
    broker_subject_prefix: str = _setting(
        "gateway",
        "first tokens of every NATS subject the gateway uses: one prefix per database when several "
        "share a NATS cluster",
        parse_subject_prefix,
    )
    broker_check_interval: float = _setting(
        5.0,
        "with a broker, how often each process re-reads the heads of its topics from the log, so an "
        "event whose doorbell was lost is delivered anyway (every second while NATS is unreachable)",
        parse_duration,
        minimum=0.1,
    )
    # Event log
    replay_max_events: int = _setting(
        10000, "most events replayed on resume; older positions get recovered=false", parse_int, minimum=0
    )
    replay_max_age: float = _setting(
        86400.0, "oldest event age replayed on resume; older positions get recovered=false", parse_duration
    )
    retention_max_events: int = _setting(10000, "events kept per topic in the log", parse_int, minimum=1)
    retention_max_age: float = _setting(
        86400.0, "age after which events are pruned from the log", parse_duration
    )
    retention_interval: float = _setting(
        60.0,
        "how often the log is pruned, and offline users past GATEWAY_PRESENCE_RETENTION deleted "
        "(each by one replica at a time)",
        parse_duration,
        minimum=1,
    )
    # Presence
    presence: bool = _setting(True, "record and publish who is online", parse_bool)
    presence_topics: tuple[str, ...] = _setting(
        ("presence:global",),
        "presence topics (comma-separated, each `presence:<name>`) on which every authenticated "
        "connection's user is shown; seeing who is on one takes a subscribe that the token's topics "
        "claim or the SQL authorization function allows",
        parse_presence_topics,
    )
    presence_grace: float = _setting(
        5.0, "time after the last connection closes before a user is offline", parse_duration
    )
    presence_retention: float = _setting(
        604800.0,
        "how long an offline user stays in gateway.presence (with its last_seen) before it is deleted; "
        "subscribers never see the deletion: the user is offline for them either way. 7 days = 168h",
        parse_duration,
        minimum=1,
    )
    heartbeat_interval: float = _setting(
        5.0,
        "how often a replica renews its presence heartbeat and tries to sweep dead replicas",
        parse_duration,
        minimum=0.5,
    )
    heartbeat_ttl: float = _setting(
        20.0,
        "a replica silent for this long is dead and its connections are swept (offline within ttl+interval+grace)",
        parse_duration,
        minimum=1,
    )
    # HTTP API for the application's servers (gateway/httpapi.py, docs/http-api.md)
    http_api: bool = _setting(
        False,
        "serve the HTTP API under /v1/ (publish, presence, disconnect) to requests with a bearer token "
        'whose claims include role: "server"; requests with an Origin header (browsers) are refused. '
        "Replicas with it off still carry out disconnects sent from the others",
        parse_bool,
    )
    http_api_rate: float = _setting(
        1000.0,
        "HTTP API requests accepted per second per process (burst: 2x), all callers together; above it "
        "a request gets HTTP 429 `rate_limited` with Retry-After: 1, before its token is checked",
        parse_number,
        minimum=0.1,
    )
    # Operations
    drain_timeout: float = _setting(10.0, "on SIGTERM, time to close clients before exiting", parse_duration)
    log_format: str = _setting(
        "text", "text or json (one JSON object per line)", parse_choice("text", "json")
    )
    log_level: str = _setting(
        "info", "debug, info, warning or error", parse_choice("debug", "info", "warning", "error")
    )
    metrics: bool = _setting(True, "serve Prometheus metrics at /metrics", parse_bool)
    metrics_port: int = _setting(
        0,
        "also serve /metrics on a port of each worker's own: this port for worker 0, the next for "
        "worker 1, and so on (the main port's /metrics reaches one worker at a time); 0: off",
        parse_port,
    )
    status_token: str = _setting(
        "",
        "serve an HTML status page at /status to requests carrying this token (HTTP basic auth "
        "password, or Authorization: Bearer); empty: no status page",
        secret=True,
    )

    def masked(self) -> dict[str, str]:
        """Every setting as text, secrets masked: safe to log."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            text = ",".join(value) if isinstance(value, tuple) else str(value)
            if f.name == "database_url":
                text = mask_dsn(text)
            elif f.name == "broker":
                text = ",".join(_mask_userinfo(u) for u in value)
            elif f.metadata["secret"] and text:
                text = "***"
            out[env_name(f.name)] = text
        return out


def env_name(field_name: str) -> str:
    return PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def settings_fields() -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(Settings)


def load(env: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment, then CLI overrides (raw text keyed by field name)."""
    env = os.environ if env is None else env
    raw: dict[str, tuple[str, str]] = {}  # field -> (source name, text)
    if env.get("DATABASE_URL"):
        raw["database_url"] = ("DATABASE_URL", env["DATABASE_URL"])
    for f in settings_fields():
        name = env_name(f.name)
        if name in env:
            raw[f.name] = (name, env[name])
    for key, text in (overrides or {}).items():
        raw[key] = (flag_name(key), text)

    unknown = sorted(
        k
        for k in env
        if k.startswith(PREFIX) and k[len(PREFIX) :].lower() not in _FIELD_NAMES and k not in NOT_SETTINGS
    )
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]}; `gateway config` lists every setting")

    values: dict[str, Any] = {}
    for f in settings_fields():
        if f.name not in raw:
            continue
        source, text = raw[f.name]
        try:
            value = f.metadata["parse"](text)
        except ConfigError:
            raise  # its message already names the setting and what is wrong
        except ValueError as exc:
            shown = "***" if f.metadata["secret"] else repr(text)
            raise ConfigError(f"{source}={shown} is not valid: expected {exc}") from None
        minimum = f.metadata["minimum"]
        if minimum is not None and value < minimum:
            raise ConfigError(f"{source}={text!r} is not valid: expected at least {minimum}")
        values[f.name] = value
    settings = Settings(**values)
    _check(settings)
    return settings


# The largest GATEWAY_MAX_PUBLISH_BYTES: a bus message (gateway/bus.py) holds the data with
# the topic (200 characters at most), the sender's id and the connection's, under 7900 bytes.
MAX_PUBLISH_BYTES = 6000

_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(Settings))


def _check(s: Settings) -> None:
    """Cross-field checks that a single parser cannot make."""
    if s.probe_timeout >= s.probe_interval * 4:
        raise ConfigError("GATEWAY_PROBE_TIMEOUT is not valid: expected less than 4x GATEWAY_PROBE_INTERVAL")
    if s.heartbeat_ttl <= s.heartbeat_interval * 2:
        raise ConfigError(
            "GATEWAY_HEARTBEAT_TTL is not valid: expected more than twice GATEWAY_HEARTBEAT_INTERVAL"
        )
    if s.metrics_port:
        if not s.metrics:
            raise ConfigError("GATEWAY_METRICS_PORT is set but GATEWAY_METRICS is false: expected both on")
        # One port per worker, from metrics_port up; GATEWAY_WORKERS=0 means one per core.
        last = s.metrics_port + max(s.workers or os.cpu_count() or 1, 1) - 1
        if last > 65535:
            raise ConfigError(
                f"GATEWAY_METRICS_PORT={s.metrics_port} is not valid: its workers would need ports up to {last}"
            )
        if s.metrics_port <= s.port <= last:
            raise ConfigError(
                f"GATEWAY_METRICS_PORT={s.metrics_port} is not valid: the workers' metrics ports "
                f"{s.metrics_port}-{last} include GATEWAY_PORT={s.port}"
            )
    if s.max_publish_bytes > MAX_PUBLISH_BYTES:
        raise ConfigError(
            f"GATEWAY_MAX_PUBLISH_BYTES={s.max_publish_bytes} is not valid: expected at most {MAX_PUBLISH_BYTES} "
            "(an ephemeral message travels between replicas in one NOTIFY, under 8000 bytes)"
        )
    if s.broker:
        _check_broker(s)
    if s.status_token and len(s.status_token) < 16:
        raise ConfigError("GATEWAY_STATUS_TOKEN is too short: expected at least 16 characters")


def _check_broker(s: Settings) -> None:
    """The broker is trusted like the database (docs/security.md): anyone who can publish on
    its subjects can ring doorbells, so a broker beyond this machine needs credentials."""
    for url in s.broker:
        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not (parts.username or parts.password or s.broker_creds or loopback):
            raise ConfigError(
                f"GATEWAY_BROKER has {parts.scheme}://{parts.netloc} without credentials: expected "
                "nats://user:password@host, nats://token@host or GATEWAY_BROKER_CREDS "
                "(only a loopback broker may go without)"
            )
    if s.broker_tls_key and not s.broker_tls_cert:
        raise ConfigError("GATEWAY_BROKER_TLS_KEY is set without GATEWAY_BROKER_TLS_CERT: expected both")
    for name in ("broker_creds", "broker_tls_ca", "broker_tls_cert", "broker_tls_key"):
        path = getattr(s, name)
        if path and not os.path.isfile(path):
            raise ConfigError(f"{env_name(name)}={path} is not valid: no such file")


def jwt_algorithms(s: Settings) -> tuple[str, ...]:
    """The algorithms tokens may be signed with, from the JWT settings together; ConfigError
    when they cannot verify a token (no key, an algorithm without its key, a secret too short
    for its hash). The one check of the JWT settings as a whole: the gateway's authenticator
    is built from its answer, and `serve` asks it before starting workers."""
    if not s.jwt_secret and not s.jwt_jwks_url:
        raise ConfigError(
            "no way to verify tokens: set GATEWAY_JWT_SECRET (HS256) or GATEWAY_JWT_JWKS_URL (RS256/ES256)"
        )
    secret_bytes = len(s.jwt_secret.encode())
    if s.jwt_algorithms:
        algorithms = tuple(s.jwt_algorithms)
        for alg in algorithms:
            if alg in HMAC_ALGORITHMS and secret_bytes < HMAC_MIN_BYTES[alg]:
                raise ConfigError(
                    f"GATEWAY_JWT_ALGORITHMS allows {alg}, which needs a GATEWAY_JWT_SECRET of at least "
                    f"{HMAC_MIN_BYTES[alg]} bytes (RFC 7518 3.2); it has {secret_bytes}"
                )
    else:
        # Each configured key brings its algorithms: setting both accepts both kinds (the
        # key is picked by the token's algorithm, so an HS token is only ever checked
        # against the secret, never against a JWKS public key).
        algorithms = ()
        if s.jwt_secret:
            # Only the HS variants the secret is long enough for (RFC 7518 3.2): a shorter
            # secret weakens the longer hash to the secret's strength.
            algorithms = tuple(a for a in HMAC_ALGORITHMS if secret_bytes >= HMAC_MIN_BYTES[a]) or ("HS256",)
        if s.jwt_jwks_url:
            algorithms += ("RS256", "ES256")
    if "none" in (a.lower() for a in algorithms):
        raise ConfigError("GATEWAY_JWT_ALGORITHMS must not allow 'none': unsigned tokens prove nothing")
    if any(a in HMAC_ALGORITHMS for a in algorithms) and not s.jwt_secret:
        raise ConfigError("GATEWAY_JWT_ALGORITHMS allows HS* tokens but GATEWAY_JWT_SECRET is not set")
    if any(a not in HMAC_ALGORITHMS for a in algorithms) and not s.jwt_jwks_url:
        raise ConfigError("GATEWAY_JWT_ALGORITHMS allows RS*/ES* tokens but GATEWAY_JWT_JWKS_URL is not set")
    return algorithms


def format_value(f: dataclasses.Field[Any], value: Any) -> str:
    """A setting's value as the text the gateway parses back to the same value, written as a
    person would set it: ``10s`` and ``24h`` rather than ``10.0`` and ``86400.0``, ``true``
    rather than Python's ``True``. Used wherever defaults are shown: `gateway config`,
    docs/configuration.md and deploy/gateway.env.sample."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    if f.metadata["parse"] is parse_duration:
        return format_duration(float(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def format_duration(seconds: float) -> str:
    # The largest unit that keeps a whole number: 86400 reads better as 24h.
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    if (seconds * 1000).is_integer():
        return f"{int(seconds * 1000)}ms"
    return f"{seconds}s"


def describe() -> str:
    """Every setting with its default and meaning (`gateway config`)."""
    lines = []
    for f in settings_fields():
        shown = format_value(f, f.default)
        lines.append(f"{env_name(f.name)} (default: {shown or '<empty>'})\n    {f.metadata['help']}")
    return "\n".join(lines)


def describe_settings(s: Settings) -> str:
    """The settings that differ from their defaults, as they would be written in an env file;
    secrets hidden (the database URL's password only). For `gateway config --check`."""
    lines = []
    for f in settings_fields():
        value = getattr(s, f.name)
        if value == f.default:
            continue
        if f.name == "database_url":
            shown = mask_dsn(value)
        elif f.metadata["secret"]:
            shown = "***"
        else:
            shown = format_value(f, value)
        lines.append(f"{env_name(f.name)}={shown}")
    return "\n".join(lines) or "(every setting at its default)"


def markdown_table() -> str:
    """Every setting as a Markdown table (docs/configuration.md embeds it; a test keeps them equal)."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for f in settings_fields():
        shown = format_value(f, f.default)
        # An empty code span renders as two backticks: say "empty" instead.
        default = f"`{shown}`" if shown else "*empty*"
        meaning = str(f.metadata["help"]).replace("|", "\\|")
        rows.append(f"| `{env_name(f.name)}` | `{flag_name(f.name)}` | {default} | {meaning} |")
    return "\n".join(rows)
