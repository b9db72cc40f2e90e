"""The replica bus: best-effort messages between the gateway processes of one database.

What for: things that concern every replica but must not go through the event log, because
they are not worth a position, a row and a WAL record each: a client's ephemeral message on a
topic (gateway/publish.py, kind ``message``), an order to disconnect a user (kind
``disconnect``). API::

    bus.on(kind, handler)   # handler(body: bytes) -> None, called for every message of kind
    bus.send(kind, body)    # fire and forget, to every process, this one included

``send`` never blocks and never raises for a full queue or a database that is down: the
message is dropped and counted (best effort, documented as such in docs/protocol.md). The
handlers of this process are called at once, inside ``send``; the other processes' when the
message reaches them (a few milliseconds). A message is delivered at most once per process.

Transport, without a broker: NOTIFY on channel ``gateway_bus``.

* Batched: messages sent within 5 ms go out together, in one NOTIFY, several per payload
  (each payload under 8000 bytes, PostgreSQL's limit); at most one NOTIFY per 5 ms per process.
  A notifying commit takes a cluster-wide lock (sql/102_relay.sql), so that bound is what keeps
  the bus from ever making the application's own notifying commits wait on it.
* From a dedicated connection whose backend pid is registered in ``gateway.bus_senders``
  (``gateway.bus_register()``, which only the gateway's role may call, sql/105_rooms.sql).
* Received on the listener's LISTEN connection (gateway/listener.py), which already exists
  for the doorbells: the bus adds its channel there and the listener stays ignorant of what
  the payloads mean. Any role that can log in may NOTIFY ``gateway_bus``, so a payload is
  believed only when its sender's pid is a registered one, as doorbells are believed only
  from the relay (gateway/pipeline.py). The registered pids are re-read when a payload comes
  from an unknown pid (at most once a second; the payload waits for that read, so a replica
  that just started is heard from its first message) and every ``SENDERS_REFRESH`` seconds.
  Others are dropped unread and counted (``untrusted``).
* Not sent while ``pg_notification_queue_usage()`` is above 0.1: PostgreSQL's notification
  queue is shared by every database of the cluster, and a full queue makes every notifying
  commit fail, the relay's and the application's. The bus gives way long before: it drops
  its messages (counted, ``dropped_queue``) and the doorbells keep the room they need.

With ``GATEWAY_BROKER`` (NATS): the subject ``<prefix>.bus``, trusted like the broker's
doorbells (docs/security.md); nothing is NOTIFYed.

Payload format (text, UTF-8): ``gwbus1 <origin>\\n`` then, per message, ``<kind> <n>\\n`` and
the ``n`` bytes of its body. ``origin`` names the sending process (random per process), so a
process skips its own messages, which it has handled in ``send``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

import asyncpg

from .config import mask_dsn
from .pgerrors import DB_ERRORS, Backoff, keep_connected

log = logging.getLogger("gateway.bus")

CHANNEL = "gateway_bus"
# One NOTIFY per this many seconds at most, per process.
FLUSH_INTERVAL = 0.005
# A payload's size in bytes, header included: under PostgreSQL's 8000-byte limit.
PAYLOAD_MAX = 7900
# Messages waiting beyond this many bytes are dropped: at one payload per FLUSH_INTERVAL the
# queue drains in about 0.15 s, and an ephemeral message older than that is worth little.
QUEUE_MAX_BYTES = 256 * 1024
# Above this share of PostgreSQL's notification queue in use, nothing is sent.
QUEUE_USAGE_MAX = 0.1
# The registered senders are re-read at most this often when an unknown pid sends...
SENDERS_CHECK_INTERVAL = 1.0
# ...and this often anyway, so a sender gone (its pid free for another session, of any role)
# is forgotten within about a second, as doorbells forget a relay that is gone (one small
# read a second per process).
SENDERS_REFRESH = 1.0
# Payloads from unknown pids held while the senders are read again, at most.
HELD_MAX = 64
MAGIC = b"gwbus1"

# One statement: the queue's usage checked and the payload sent in the same round trip.
# count() is 1 when it was sent, 0 when the queue was too full.
_NOTIFY = (
    "SELECT count(pg_notify('gateway_bus', $1)) FROM (SELECT) AS x WHERE pg_notification_queue_usage() <= $2"
)
_REGISTER = "SELECT gateway.bus_register($1)"
_SENDERS = "SELECT array_agg(p) FROM gateway.bus_live_senders() AS p"

Handler = Callable[[bytes], None]


class Channel(Protocol):
    """A LISTEN connection that can listen on more channels (gateway/listener.py)."""

    def add_channel(self, channel: str, callback: Callable[[str, int], None]) -> None: ...


class BrokerLink(Protocol):
    """The NATS connection (gateway/broker.py) as the bus uses it."""

    async def bus_subscribe(self, callback: Callable[[bytes], None]) -> None: ...

    async def bus_publish(self, payload: bytes) -> bool: ...


class BusTooLarge(ValueError):
    """A message that cannot fit one payload."""


def _encode_entry(kind: str, body: bytes) -> bytes:
    return kind.encode() + b" " + str(len(body)).encode() + b"\n" + body


def decode_payload(payload: bytes) -> tuple[str, list[tuple[str, bytes]]]:
    """(origin, [(kind, body), ...]) of a payload; ValueError if it is not one."""
    head, sep, rest = payload.partition(b"\n")
    magic, _, origin = head.partition(b" ")
    if not sep or magic != MAGIC or not origin:
        raise ValueError("not a bus payload")
    out: list[tuple[str, bytes]] = []
    i = 0
    while i < len(rest):
        nl = rest.index(b"\n", i)
        kind, _, n_text = rest[i:nl].partition(b" ")
        n = int(n_text)
        body = rest[nl + 1 : nl + 1 + n]
        if n < 0 or len(body) != n:
            raise ValueError("truncated bus payload")
        out.append((kind.decode(), body))
        i = nl + 1 + n
    return origin.decode(), out


class Bus:
    def __init__(self, dsn: str | None, *, max_delay: float = 10.0) -> None:
        # dsn None: no PostgreSQL sender (a broker, or a test without a database).
        self._dsn = dsn
        self._max_delay = max_delay
        self.origin = secrets.token_hex(6)
        self._header = MAGIC + b" " + self.origin.encode() + b"\n"
        self._handlers: dict[str, list[Handler]] = {}
        self._queue: list[bytes] = []
        self._queued_bytes = 0
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flushing = False
        self._last_flush = 0.0
        self._conn: asyncpg.Connection | None = None
        # One query at a time on the sending connection (sends and reads of the senders).
        self._lock = asyncio.Lock()
        self._broker: BrokerLink | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # Registered sender pids, believed; and when they were last read.
        self._senders: frozenset[int] = frozenset()
        self._senders_read = 0.0
        self._senders_reading = False
        self._held: list[tuple[str, int]] = []
        self._reader: asyncio.Future[None] | None = None
        self._own_pid: int | None = None
        # counters, for metrics and tests
        self.sent = 0  # messages handed to the transport
        self.payloads = 0  # NOTIFYs (or NATS messages) sent
        self.received = 0  # messages from other processes handled
        self.untrusted = 0  # payloads from unregistered backends, dropped unread
        self.dropped_queue = 0  # messages dropped: notification queue above QUEUE_USAGE_MAX
        self.dropped_full = 0  # messages dropped: the bus's own queue full, or no transport
        self.dropped_error = 0  # messages dropped: the send failed (database unreachable)
        self.malformed = 0  # payloads from a registered sender that did not decode

    # --- the API -----------------------------------------------------------------------

    def on(self, kind: str, handler: Handler) -> None:
        """Call ``handler(body)`` for every message of ``kind``, this process's own included."""
        if not kind or " " in kind or "\n" in kind:
            raise ValueError(f"a bus kind is one word: {kind!r}")
        self._handlers.setdefault(kind, []).append(handler)

    def max_body(self, kind: str) -> int:
        """The largest body a message of ``kind`` may have."""
        return PAYLOAD_MAX - len(self._header) - len(_encode_entry(kind, b"")) - 6

    def send(self, kind: str, body: bytes) -> None:
        """Hand ``body`` to the handlers of ``kind`` here, and send it to every other process.

        ``body`` is UTF-8 text without NUL (JSON is). Raises BusTooLarge for a body over
        ``max_body(kind)`` and ValueError for one that is not such text (a caller's bug: limit
        sizes before). Everything else (a full queue, a database down) drops it, counted."""
        if len(body) > self.max_body(kind):
            raise BusTooLarge(f"a bus message is at most {self.max_body(kind)} bytes, this one {len(body)}")
        if b"\x00" in body:
            # A NOTIFY payload is text: PostgreSQL refuses NUL (and anything not UTF-8 below).
            raise ValueError("a bus message is UTF-8 text without NUL characters")
        body.decode()  # UnicodeDecodeError (a ValueError) for bytes that are not UTF-8
        self._dispatch(kind, body)
        if self._stopping or (self._dsn is None and self._broker is None):
            return
        entry = _encode_entry(kind, body)
        if self._queued_bytes + len(entry) > QUEUE_MAX_BYTES:
            self.dropped_full += 1
            return
        self._queue.append(entry)
        self._queued_bytes += len(entry)
        self._schedule()

    # --- sending -----------------------------------------------------------------------

    def _schedule(self) -> None:
        if self._flush_handle is not None or self._flushing:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._last_flush + FLUSH_INTERVAL - time.monotonic())
        self._flush_handle = loop.call_later(delay, self._start_flush)

    def _start_flush(self) -> None:
        self._flush_handle = None
        self._flushing = True
        task = asyncio.ensure_future(self._flush())
        task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Future[None]) -> None:
        self._flushing = False
        if not task.cancelled() and task.exception() is not None:
            log.error("bus: flush failed", exc_info=task.exception())
        if self._queue and not self._stopping:
            self._schedule()

    def _take_payload(self) -> tuple[bytes, int]:
        """The next payload: as many queued messages as fit, in order."""
        parts = [self._header]
        size = len(self._header)
        n = 0
        for entry in self._queue:
            if size + len(entry) > PAYLOAD_MAX:
                break
            parts.append(entry)
            size += len(entry)
            n += 1
        del self._queue[:n]
        self._queued_bytes -= size - len(self._header)
        return b"".join(parts), n

    async def _flush(self) -> None:
        self._last_flush = time.monotonic()
        payload, n = self._take_payload()
        if n == 0:
            return
        if self._broker is not None:
            if await self._broker.bus_publish(payload):
                self.sent += n
                self.payloads += 1
            else:
                self.dropped_error += n
            return
        conn = self._conn
        if conn is None or conn.is_closed():
            self.dropped_error += n
            return
        try:
            async with self._lock:
                sent = await conn.fetchval(_NOTIFY, payload.decode(), QUEUE_USAGE_MAX)
        except DB_ERRORS as exc:
            self.dropped_error += n
            log.debug("bus: send failed: %s: %s", type(exc).__name__, exc)
            return
        if sent:
            self.sent += n
            self.payloads += 1
        else:
            if self.dropped_queue == 0 or self.dropped_queue % 10_000 < n:
                log.warning(
                    "bus: PostgreSQL's notification queue is over %d%% full: ephemeral messages dropped",
                    int(QUEUE_USAGE_MAX * 100),
                )
            self.dropped_queue += n

    # --- receiving ---------------------------------------------------------------------

    def _dispatch(self, kind: str, body: bytes) -> None:
        for handler in self._handlers.get(kind, ()):
            try:
                handler(body)
            except Exception:
                log.exception("bus: the handler of %r failed", kind)

    def _on_payload(self, payload: bytes) -> None:
        try:
            origin, messages = decode_payload(payload)
        except (ValueError, UnicodeDecodeError):
            self.malformed += 1
            return
        if origin == self.origin:
            return  # handled in send()
        for kind, body in messages:
            self.received += 1
            self._dispatch(kind, body)

    def _on_notify(self, payload: str, pid: int) -> None:
        """A NOTIFY on gateway_bus, from backend ``pid``: believed only from a registered one."""
        if pid == self._own_pid:
            return  # this process's own: handled in send()
        if pid in self._senders:
            self._on_payload(payload.encode())
            return
        # Perhaps a process that registered since the last read (a replica that just started):
        # read again, at most once a second, and hold its payloads until then. A payload from
        # a pid still unknown after the read is dropped unread, so a flood of forged payloads
        # costs one query a second and a bounded list.
        if (self._senders_reading or self._read_senders_soon()) and len(self._held) < HELD_MAX:
            self._held.append((payload, pid))
            return
        self.untrusted += 1

    def _read_senders_soon(self) -> bool:
        """Start a read of the registered senders unless one was made within the last second."""
        if self._dsn is None or time.monotonic() - self._senders_read < SENDERS_CHECK_INTERVAL:
            return False
        self._senders_reading = True  # at once: what arrives before the task runs is held too
        # Kept until done: the loop holds only a weak reference to a task.
        self._reader = asyncio.ensure_future(self._read_senders())
        return True

    async def _read_senders(self) -> None:
        self._senders_read = time.monotonic()
        self._senders_reading = True
        try:
            conn = self._conn
            if conn is not None and not conn.is_closed():
                async with self._lock:
                    pids = await conn.fetchval(_SENDERS)
                self._senders = frozenset(pids or ())
        except DB_ERRORS as exc:
            log.debug("bus: senders not read: %s: %s", type(exc).__name__, exc)
        finally:
            self._senders_reading = False
            held, self._held = self._held, []
            for payload, pid in held:
                if pid in self._senders:
                    self._on_payload(payload.encode())
                else:
                    self.untrusted += 1

    # --- transports --------------------------------------------------------------------

    def listen_on(self, channel: Channel) -> None:
        """Receive on the LISTEN connection of gateway/listener.py."""
        channel.add_channel(CHANNEL, self._on_notify)

    async def use_broker(self, broker: BrokerLink) -> None:
        """Send and receive on NATS instead of PostgreSQL."""
        await broker.bus_subscribe(self._on_payload)
        self._broker = broker
        if self._queue:
            self._schedule()

    async def start(self) -> None:
        """The sending connection's task (nothing with a broker: use_broker)."""
        if self._dsn is not None and self._broker is None:
            self._task = asyncio.create_task(self.run(), name="bus")

    async def run(self) -> None:
        assert self._dsn is not None
        await keep_connected(
            "bus",
            lambda: asyncpg.connect(
                self._dsn, timeout=10, command_timeout=5.0, server_settings={"synchronous_commit": "off"}
            ),
            self._serve,
            lambda: self._stopping,
            target=mask_dsn(self._dsn),
            logger=log,
            backoff=Backoff(self._max_delay),
        )

    async def _serve(self, conn: asyncpg.Connection, backoff: Backoff) -> None:
        """Register this connection's backend as a sender, then keep the senders fresh."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        await conn.execute(_REGISTER, self.origin)
        self._own_pid = conn.get_server_pid()
        self._conn = conn
        self._lock = asyncio.Lock()  # a query cancelled on the last connection leaves none held
        backoff.reset()
        log.info("bus: sending from backend pid %s", self._own_pid)
        try:
            while not self._stopping and not conn.is_closed():
                await self._read_senders()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), SENDERS_REFRESH)
                if lost.is_set():
                    return
        finally:
            self._conn = None

    @property
    def backend_pid(self) -> int | None:
        """The sending connection's PostgreSQL backend, while it has one."""
        conn = self._conn
        return self._own_pid if conn is not None and not conn.is_closed() else None

    @property
    def connected(self) -> bool:
        return self._broker is not None or (self._conn is not None and not self._conn.is_closed())

    async def stop(self) -> None:
        self._stopping = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        if self._task is not None:
            # keep_connected closes the connection on the way out (its row in
            # gateway.bus_senders is forgotten at the next registration of any process).
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def describe(self) -> dict[str, Any]:
        return {"origin": self.origin, "pid": self._own_pid, "senders": sorted(self._senders)}
