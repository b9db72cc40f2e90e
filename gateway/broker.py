"""NATS as the fan-out engine (optional, ``GATEWAY_BROKER``): one connection per process.

Without it every process LISTENs on PostgreSQL and is woken by every doorbell, for every
topic. With it the relay (still one per database, by lease) publishes each poll's doorbells
per topic, on one subject per topic, and each process subscribes only to the subjects of the
topics it has local subscribers for: NATS routes by interest, and no process holds a LISTEN
connection. The doorbells are the same JSON as on PostgreSQL (docs/architecture.md), cut per
topic; the pipeline resolves rows for what it serves, exactly as before.

Why doorbells and not resolved events: a doorbell is what the pipeline already trusts only
as a claim, checked against the log (positions in order, gaps read from the log, never past
the head), so NATS adds no new way to deliver a wrong or missing event. Resolved events
would spare each process its row read but put rows (and their size limits, and who may read
which columns) on the broker; that is a second, larger step, worth it only once the reads
are measured to matter (docs/deploy.md, "Scaling out").

Subjects: ``<prefix>.t.<topic in base32, no padding>``. Base32 uses only ``A-Z2-7``, so no
topic can reach another subject with ``.``, ``*`` or ``>``. ``<prefix>.sync`` (every
process listens) carries the "re-read every head" doorbell; ``<prefix>.tables`` is where
processes compare their ``GATEWAY_TABLES``.

The broker is trusted like the database (docs/security.md): doorbells from it carry no
sender to check. The log stays the truth: after every (re)connect and every slow-consumer
notice the pipeline catches every served topic up from the log; heads are re-read every
``check_interval`` (a lost last doorbell is found), and every second while disconnected, so
an outage of NATS costs latency, never an event.

nats-py is imported only when ``GATEWAY_BROKER`` is set: the PostgreSQL-only mode needs
nothing more than it did.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .relay import Row, doorbells
from .tables import parse_tables

log = logging.getLogger("gateway.broker")

# What the pipeline gets as a broker doorbell's sender: the broker is trusted, so there is
# no session pid to check (``verify_senders`` is False).
BROKER_SENDER = 0
SYNC = '{"v":1,"sync":true}'
# While disconnected from NATS every served topic is caught up from the log this often.
OUTAGE_CHECK_INTERVAL = 1.0
# How long a subscription waits for the server to confirm its interest before the join
# goes on anyway (the periodic head check then covers what a late interest could miss).
SUBSCRIBE_TIMEOUT = 2.0
INSTALL_HINT = "pip install 'pg-ws-gateway[nats]'"


def require_client() -> None:
    """Refuse to start, with what to install, when GATEWAY_BROKER is set without nats-py."""
    try:
        import nats  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"GATEWAY_BROKER is set but the NATS client (nats-py) is not installed: {INSTALL_HINT}"
        ) from None


def subject(prefix: str, topic: str) -> str:
    """The NATS subject of ``topic``: one token of base32 (A-Z, 2-7) under ``<prefix>.t``."""
    return f"{prefix}.t." + base64.b32encode(topic.encode()).decode().rstrip("=")


def tables_digest(tables: str) -> str:
    """GATEWAY_TABLES in a canonical form (names as in the catalog, in order): two spellings
    of the same list (`Items` and `public.items`) compare equal."""
    return ";".join(
        e.display + ("(" + ",".join(e.columns) + ")" if e.columns else "") for e in parse_tables(tables)
    )


def mask_url(url: str) -> str:
    """The URL without its user info (a password or a token), for logs and errors."""
    parts = urlsplit(url)
    if not (parts.username or parts.password):
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


class Broker:
    """The NATS connection of one process: the pipeline's doorbell source (see
    ``DoorbellSource`` in gateway/pipeline.py) and the relay's outlet (``Outlet`` in
    gateway/relay.py)."""

    verify_senders = False

    def __init__(
        self,
        servers: tuple[str, ...],
        *,
        prefix: str = "gateway",
        creds: str = "",
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        check_interval: float = 5.0,
        tables: str = "",
        connect_timeout: float = 5.0,
    ) -> None:
        self._servers = list(servers)
        self._prefix = prefix
        self._creds = creds
        self._tls_ca, self._tls_cert, self._tls_key = tls_ca, tls_cert, tls_key
        self._check_interval = check_interval
        self._tables = tables_digest(tables)
        self._connect_timeout = connect_timeout
        self._nc: Any = None
        self._ring: Callable[[str, int], None] = lambda payload, sender: None
        self._catch_up: Callable[[], None] = lambda: None
        # topic -> its subscription; and, per wanted topic, done once the server has the interest
        self._subs: dict[str, Any] = {}
        self._ready: dict[str, asyncio.Future[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._lost = asyncio.Event()
        self._last_error = ""
        # The last error the server itself reported (nats.errors.AuthorizationError: the
        # "Authorization Violation" of a wrong password): a start that fails names it, not the
        # connection reset that the server's close often turns the next attempt into.
        self._server_error = ""
        self._catch_up_timer: asyncio.TimerHandle | None = None
        self.connected = False
        # state, read by metrics and /status (the same names as the PostgreSQL listener's)
        self.reconnects = 0
        self.last_notification = 0.0
        self.backend_pid: int | None = None
        self.published = 0  # doorbells published by this process's relay
        self.publish_errors = 0
        self.slow_consumer = 0

    def where(self) -> str:
        return ", ".join(mask_url(u) for u in self._servers)

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (refusing to start when no server answers, as with the database), check
        GATEWAY_TABLES against the other processes, and listen for "sync" doorbells."""
        require_client()
        import nats
        import nats.errors

        options: dict[str, Any] = {
            "servers": self._servers,
            "name": f"pg-ws-gateway {socket.gethostname()}:{os.getpid()}",
            "connect_timeout": self._connect_timeout,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,  # forever: an outage costs latency, never delivery
            "reconnect_time_wait": 1,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        if self._creds:
            try:
                import nkeys  # noqa: F401  (nats-py signs with it; not a dependency of nats-py)
            except ImportError:
                raise ConfigError(
                    "GATEWAY_BROKER_CREDS is set but the nkeys package is not installed: pip install nkeys"
                ) from None
            options["user_credentials"] = self._creds
        try:
            tls = self._tls_context()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(f"the broker's TLS files cannot be used: {exc}") from None
        if tls is not None:
            options["tls"] = tls
        # With max_reconnect_attempts < 0 nats-py's first connect would retry forever:
        # bounded here, so a wrong URL, a wrong password or a broker down stops the start
        # with an error (the last one the attempts met: "Authorization Violation", ...).
        try:
            self._nc = await asyncio.wait_for(nats.connect(**options), self._connect_timeout * 2)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            cause = self._server_error or self._last_error or f"{type(exc).__name__}: {exc}"
            raise ConfigError(f"cannot connect to the broker at {self.where()}: {cause}") from None
        self._last_error = ""
        self.connected = True
        log.info("broker connected (%s)", self.where())
        try:
            await self._check_tables()
            await self._nc.subscribe(f"{self._prefix}.sync", cb=self._on_doorbell)
            await self._nc.subscribe(f"{self._prefix}.tables", cb=self._on_tables_request)
            await self._nc.flush(self._connect_timeout)
        except BaseException:
            await self._close()
            raise
        self._tasks.append(asyncio.create_task(self._check_heads(), name="broker heads"))

    def _tls_context(self) -> ssl.SSLContext | None:
        wants_tls = any(urlsplit(u).scheme == "tls" for u in self._servers)
        if not (wants_tls or self._tls_ca or self._tls_cert):
            return None
        ctx = ssl.create_default_context(cafile=self._tls_ca or None)
        if self._tls_cert:
            ctx.load_cert_chain(self._tls_cert, self._tls_key or None)
        return ctx

    async def _check_tables(self) -> None:
        """Refuse to start when the processes already on this broker serve other tables: they
        would resolve the same doorbells into different rows (or none)."""
        import nats.errors

        try:
            reply = await self._nc.request(f"{self._prefix}.tables", b"", timeout=1.0)
        except nats.errors.NoRespondersError:
            return  # the first process on this broker
        except (TimeoutError, nats.errors.TimeoutError):
            log.warning("no gateway answered the GATEWAY_TABLES check within 1s; starting anyway")
            return
        theirs = reply.data.decode()
        if theirs != self._tables:
            raise ConfigError(
                "GATEWAY_TABLES differs from the gateway processes already on this broker "
                f"(subject prefix {self._prefix!r}): they serve {theirs or '(no tables)'!r}, this one "
                f"{self._tables or '(no tables)'!r}. Every process must have the same GATEWAY_TABLES"
            )

    async def _on_tables_request(self, msg: Any) -> None:
        with contextlib.suppress(Exception):  # a broken reply inbox is the asker's problem
            await msg.respond(self._tables.encode())

    async def stop(self) -> None:
        self._stopping = True
        if self._catch_up_timer is not None:
            self._catch_up_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._close()

    async def _close(self) -> None:
        nc, self._nc = self._nc, None
        self.connected = False
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 2.0)

    # --- the doorbell source ----------------------------------------------------------

    def attach(self, ring: Callable[[str, int], None], catch_up: Callable[[], None]) -> None:
        self._ring, self._catch_up = ring, catch_up
        catch_up()

    async def want(self, topic: str) -> None:
        """Subscribe to ``topic``'s subject, and return once the server has the interest (or
        could not confirm it in time): a doorbell published after that reaches us."""
        ready = self._ready.get(topic)
        if ready is None:
            ready = self._ready[topic] = asyncio.get_running_loop().create_future()
            try:
                await self._subscribe(topic, ready)
            finally:
                if not ready.done():
                    ready.set_result(None)
        await asyncio.shield(ready)

    async def _subscribe(self, topic: str, ready: asyncio.Future[None]) -> None:
        nc = self._nc
        if nc is None:
            return
        try:
            sub = await nc.subscribe(subject(self._prefix, topic), cb=self._on_doorbell)
        except Exception as exc:  # closing: the join goes on, the head checks deliver
            log.warning("cannot subscribe to the doorbells of %s: %s: %s", topic, type(exc).__name__, exc)
            self._ready.pop(topic, None)
            return
        if self._ready.get(topic) is not ready:  # dropped while subscribing
            await self._unsubscribe(sub)
            return
        self._subs[topic] = sub
        try:
            await nc.flush(SUBSCRIBE_TIMEOUT)
        except Exception as exc:  # disconnected: it is sent on reconnect, then caught up
            log.debug("interest in %s not confirmed yet: %s", topic, exc)

    def drop(self, topic: str) -> None:
        """No local subscriber wants ``topic`` any more: drop its subscription."""
        self._ready.pop(topic, None)
        sub = self._subs.pop(topic, None)
        if sub is not None:
            task = asyncio.get_running_loop().create_task(self._unsubscribe(sub))
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)

    @staticmethod
    async def _unsubscribe(sub: Any) -> None:
        with contextlib.suppress(Exception):  # closed or reconnecting: the interest goes with it
            await sub.unsubscribe()

    async def _on_doorbell(self, msg: Any) -> None:
        self.last_notification = time.monotonic()
        self._ring(msg.data.decode(), BROKER_SENDER)

    async def _check_heads(self) -> None:
        """Re-read every served topic's head from the log, often while NATS is out."""
        while True:
            # Woken early when the connection is lost: the outage's pace starts at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._lost.wait(), self._check_interval if self.connected else OUTAGE_CHECK_INTERVAL
                )
            self._lost.clear()
            self._catch_up()

    async def _on_error(self, exc: Exception) -> None:
        import nats.errors

        if isinstance(exc, nats.errors.SlowConsumerError):
            self.slow_consumer += 1
            if self.slow_consumer == 1 or self.slow_consumer % 1000 == 0:
                log.warning(
                    "broker: %d doorbell(s) dropped as a slow consumer; catching up", self.slow_consumer
                )
            # A burst of drops is one notice per doorbell: one catch-up for all of them.
            self._catch_up_soon()
            return
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, nats.errors.AuthorizationError):
            self._server_error = error
        if error != self._last_error:  # each distinct error once per outage, not once per retry
            self._last_error = error
            log.warning("broker: %s", error)

    def _catch_up_soon(self) -> None:
        """One catch-up for a burst of dropped doorbells, not one per doorbell."""
        if self._catch_up_timer is None:
            self._catch_up_timer = asyncio.get_running_loop().call_later(0.1, self._catch_up_now)

    def _catch_up_now(self) -> None:
        self._catch_up_timer = None
        self._catch_up()

    async def _on_disconnected(self) -> None:
        if self._stopping:
            return
        if self.connected:
            log.warning("broker disconnected: catching up from the log every %gs", OUTAGE_CHECK_INTERVAL)
        self.connected = False
        self._lost.set()

    async def _on_reconnected(self) -> None:
        self.connected = True
        self._last_error = ""
        self.reconnects += 1
        log.info("broker reconnected: catching up from the log")
        self._catch_up()

    # --- the replica bus (gateway/bus.py) ------------------------------------------------

    async def bus_subscribe(self, callback: Callable[[bytes], None]) -> None:
        """Hand every payload on ``<prefix>.bus`` to ``callback`` (nats-py subscribes again
        by itself after a reconnect)."""

        async def on_message(msg: Any) -> None:
            callback(msg.data)

        await self._nc.subscribe(f"{self._prefix}.bus", cb=on_message)

    async def bus_publish(self, payload: bytes) -> bool:
        """Publish one bus payload; False if it could not be (disconnected, closed)."""
        nc = self._nc
        if nc is None:
            return False
        try:
            await nc.publish(f"{self._prefix}.bus", payload)
        except Exception:  # best effort: the bus counts it as dropped
            return False
        return True

    # --- the relay's outlet -----------------------------------------------------------

    async def ring(self, rows: list[Row] | None) -> int:
        """Publish the doorbells of one poll, each topic's on its own subject (``None``: a
        sync for everyone). Returns how many messages went out. A failure is logged, never
        raised: the subscribers' head checks find the events in the log."""
        nc = self._nc
        if nc is None:
            return 0
        if rows is None:
            out = [(f"{self._prefix}.sync", SYNC)]
        else:
            by_topic: dict[str, list[Row]] = {}
            for row in rows:
                by_topic.setdefault(row[0], []).append(row)
            out = []
            for topic, topic_rows in by_topic.items():
                subj = subject(self._prefix, topic)
                out.extend((subj, payload) for payload in doorbells(topic_rows))
        sent = 0
        try:
            for subj, payload in out:
                await nc.publish(subj, payload.encode())
                sent += 1
        except Exception as exc:
            self.publish_errors += 1
            log.warning(
                "broker: doorbells not published (%s: %s); readers catch up from the log",
                type(exc).__name__,
                exc,
            )
        self.published += sent
        return sent
