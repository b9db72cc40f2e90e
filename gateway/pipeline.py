"""The pipeline: doorbells and subscription joins, processed in order by one task.

Lifecycle: ``run()`` is one task for the life of the process. Doorbells come from one
``DoorbellSource`` (the PostgreSQL listener, or a NATS broker), which calls ``notify()`` and ``resync()``
(enqueue only) once the pipeline ``consume()``s it; sessions call ``join()`` and ``leave()``.

Invariants (what makes "no lost events" hold):

* For every topic with local subscribers the pipeline keeps a *stream*: the epoch and the
  last position delivered here. Events are handed to the hub strictly in position order,
  each position exactly once; an event at or below the stream position is a duplicate
  and dropped; an event above ``pos + 1`` means positions were missed (a lost doorbell, a
  listener reconnect, a batch out of order), and the missing ones are read from the log
  before anything later is delivered.
* A join reads the topic's head (epoch, pos) *after* the topic is known to be wanted, and it
  runs in this same task, between batches. A resume's replay (up to
  ``GATEWAY_REPLAY_MAX_EVENTS`` events to read, resolve and encode) is done before that,
  outside this task, up to the head as it was then: one client's long replay must not hold
  up delivery to everyone else. The join here then reads only what committed since. Before
  the new subscriber is added, the stream is brought up to that head for the existing
  subscribers, so all subscribers of a topic share one position. The replay (if resuming),
  then the ``subscribed`` frame, then every later event are written in that order; nothing
  can slip in between because all of it happens without an ``await`` between the last read
  and ``hub.add``.
* After the listener reconnects (or a doorbell says "sync", or the database was
  unreachable), every local topic is caught up from its head: notifications are only a
  doorbell, the log is the truth.
* If positions are missing from the log (pruned before they could be read), subscribers
  get ``subscribed`` with ``recovered: false`` and must reload: never a silent gap.
* A topic is wanted from the doorbell source (``want``) before its first join reads the
  head, and dropped after its last subscriber leaves: a source that routes by interest (NATS)
  then delivers every doorbell sent after that read.
* Only the relay's doorbells are acted on. Any role that can log in may NOTIFY the channel,
  so a doorbell is a claim by its sender: it is believed only when the sender's backend pid
  is the relay's (``gateway.relay.backend_pid``, re-read when a doorbell comes from another
  pid, at most once a second). Any other doorbell is dropped unread and at most asks for one
  catch-up from the log per second, so a flood of them costs a head read a second. A
  position is never taken from a doorbell beyond the topic's head in the log.

Only this module joins the listener's world (doorbells, the log, the resolver) with the
hub's (frames); the hub never sees asyncpg and the listener never sees a socket.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

import msgspec

from .eventlog import EventLog, Head
from .histogram import BATCH_BOUNDS, LATENCY_BOUNDS, Histogram
from .hub import Hub, text_frame
from .pgerrors import DB_ERRORS
from .protocol import PRESENCE_PREFIX, Event, Presence, Since, Subscribed, encode
from .resolver import Resolver

log = logging.getLogger("gateway.pipeline")

Op = Literal["insert", "update", "delete", "message"]
OPS: dict[str, Op] = {"i": "insert", "u": "update", "d": "delete", "m": "message"}

# Doorbells queued beyond this are replaced by one catch-up from the log: memory stays
# bounded however far behind the pipeline falls, and nothing is lost.
MAX_PENDING = 100_000
# The relay's pid is re-read at most this often, and doorbells from other sessions cause at
# most one catch-up from the log this often: a NOTIFY flood costs one head read a second.
SENDER_CHECK_INTERVAL = 1.0
# The doorbell format this replica reads. During a rolling upgrade the relay may be a newer
# replica: a doorbell of a higher "v" is not read (its fields may mean something else), it
# only says "something was committed" and the pipeline catches up from the log, which every
# version reads the same way. Fields added without changing a meaning keep "v" (msgspec
# ignores unknown fields); "v" goes up only when an older replica would misread a doorbell.
# docs/protocol.md, "Versions and compatibility".
DOORBELL_VERSION = 1


class Member(Protocol):
    """What the pipeline needs of a subscriber (a session)."""

    closed: bool

    def deliver(self, frame: bytes) -> None: ...


class DoorbellSource(Protocol):
    """Where doorbells come from: PostgreSQL's LISTEN (gateway/listener.py), or a broker
    (gateway/broker.py, NATS) that takes its place by offering the same.

    Once attached, the source calls ``ring`` with each doorbell's payload (the JSON of
    docs/architecture.md, "The doorbell") and its sender, and ``catch_up`` whenever doorbells
    may have been missed (after every connect and reconnect): the pipeline then re-reads every
    topic it serves from the log. Both only enqueue. ``connected`` says whether doorbells can
    arrive now (readiness).

    ``verify_senders``: whether a doorbell's sender must be checked. On PostgreSQL any role
    that can log in may NOTIFY the channel, so the sender is the backend pid of the session
    that sent it and only the relay's is believed. A broker is trusted like the database
    (docs/security.md): its doorbells carry no pid and are believed as they come.

    ``want(topic)`` (awaited before a topic's first join reads the head) and ``drop(topic)``
    (after its last subscriber left) say which topics this process serves: a source that
    routes by interest receives only their doorbells from then on; LISTEN receives all."""

    connected: bool
    verify_senders: bool

    def attach(self, ring: Callable[[str, int], None], catch_up: Callable[[], None]) -> None: ...

    async def want(self, topic: str) -> None: ...

    def drop(self, topic: str) -> None: ...


class _NoSource:
    """Until ``consume()``: doorbells come from nowhere, and every sender would be checked."""

    connected = False
    verify_senders = True

    def attach(self, ring: Callable[[str, int], None], catch_up: Callable[[], None]) -> None:
        pass

    async def want(self, topic: str) -> None:
        pass

    def drop(self, topic: str) -> None:
        pass


class Doorbell(msgspec.Struct):
    v: int = 1
    tb: str | None = None
    ev: list[tuple[str, str, int, str, str | None]] | None = None
    rg: list[tuple[str, str, int, int]] | None = None
    sync: bool = False
    ts: float | None = None  # when the newest listed transaction began (unix seconds), with "ev"


_decode_doorbell = msgspec.json.Decoder(Doorbell).decode


class _Versioned(msgspec.Struct):
    v: int = 1


_decode_version = msgspec.json.Decoder(_Versioned).decode


def _doorbell_version(payload: str) -> int | None:
    """The ``v`` of a doorbell whose other fields this replica cannot read, if it has one."""
    try:
        return _decode_version(payload).v
    except msgspec.DecodeError:
        return None


class Pending(NamedTuple):
    topic: str
    epoch: str
    pos: int
    op: str
    tbl: str | None
    key: str | None
    data: str | None = None
    ts: float | None = None
    sender: str | None = None  # the user who published it (gateway.events.sender)


@dataclass
class Stream:
    epoch: str
    pos: int


@dataclass
class Prefetched:
    """A resume's replay, read and encoded before its join reaches the pipeline task."""

    recovered: bool
    epoch: str
    pos: int  # the last position the frames cover (the head when they were read)
    frames: list[bytes]


@dataclass
class JoinRequest:
    topic: str
    member: Member
    since: Since | None
    id: int | None
    prefetched: Prefetched | None = None
    future: asyncio.Future[Subscribed] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Unavailable(Exception):
    """The database could not be reached to complete a join. The message goes to the client,
    so it names no host, port or SQL error: the cause is logged where it is caught."""


UNREACHABLE = "the database is unreachable; subscribe again later"


_RESYNC = object()
# A catch-up owed to doorbells from other sessions, queued when its turn comes.
_STRANGERS = object()


class Pipeline:
    def __init__(
        self,
        hub: Hub,
        event_log: EventLog,
        resolver: Resolver,
        *,
        batch_max: int = 1000,
        replay_max_events: int = 10000,
        replay_max_age: float = 86400.0,
        replay_concurrency: int = 2,
        replay_max_bytes: int = 512 * 1024,
    ) -> None:
        self.hub = hub
        self._log = event_log
        self._resolver = resolver
        self._batch_max = batch_max
        self._replay_max_events = replay_max_events
        self._replay_max_age = replay_max_age
        # Replays read ahead at once: each holds a pool connection while it reads, and the
        # pipeline task needs the others.
        self._replay_slots = asyncio.Semaphore(max(1, replay_concurrency))
        # A replay is written into the subscriber's socket buffer at once (nothing may come
        # between it and the ack), so one bigger than the client's send limit would only get
        # it cut off as a slow consumer, again at every retry: it gets recovered=false instead.
        self._replay_max_bytes = replay_max_bytes
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._streams: dict[str, Stream] = {}
        self._source: DoorbellSource = _NoSource()
        # Per topic, who joined and has not left yet: the topics the source is told we want.
        self._wanted: dict[str, set[Member]] = {}
        self._bad_doorbells = 0
        self._newer_doorbells = 0
        self._relay_pid: int | None = None
        self._relay_pid_read = -SENDER_CHECK_INTERVAL  # monotonic time of the last read
        self._strangers_caught_up = -SENDER_CHECK_INTERVAL  # ... of the last catch-up they caused
        self._strangers_timer: asyncio.TimerHandle | None = None
        self._over_head_logged = False
        # counters for metrics
        self.received = 0
        self.resolved = 0
        self.log_reads = 0  # ranges read from the log: large statements, gaps, catch-ups
        self.not_recovered = 0
        self.untrusted = 0  # doorbells from a session other than the relay's, ignored
        self.batch_size = Histogram(BATCH_BOUNDS)
        self.batch_seconds = Histogram(LATENCY_BOUNDS)
        # From about the commit (the start of the newest transaction the doorbell lists, as
        # the relay reports it) to the moment the frame is handed to sockets.
        self.commit_to_send = Histogram(LATENCY_BOUNDS)

    # --- called from elsewhere (never await the database) --------------------------

    def consume(self, source: DoorbellSource) -> None:
        """Take doorbells from ``source`` from now on."""
        self._source = source
        source.attach(self.notify, self.resync)

    def notify(self, payload: str, sender_pid: int) -> None:
        """A doorbell, and the backend pid of the session that sent it: only the relay's
        doorbells are believed (see the module's invariants)."""
        self.received += 1
        if self._queue.qsize() >= MAX_PENDING:
            self._drain_queue_to_resync()
        self._queue.put_nowait((payload, sender_pid))

    def resync(self) -> None:
        self._queue.put_nowait(_RESYNC)

    async def join(self, topic: str, member: Member, since: Since | None, req_id: int | None) -> Subscribed:
        """Subscribe ``member``; its replay, then the ack, then every later event.

        The slow part runs here, in the caller's task, before the join is queued for the
        pipeline task: a resume's replay. It holds up this subscriber only; in the pipeline
        task it would hold up every topic's delivery."""
        self._wanted.setdefault(topic, set()).add(member)
        try:
            # Before the head is read: a doorbell sent after that read must reach us.
            await self._source.want(topic)
            head = (await self._log.heads([topic]))[topic]
            prefetched = None
            if since is not None:
                async with self._replay_slots:
                    prefetched = await self._prefetch(topic, since, head)
        except DB_ERRORS as exc:
            log.warning("subscribe to %s: database unreachable (%s: %s)", topic, type(exc).__name__, exc)
            raise Unavailable(UNREACHABLE) from exc
        except Exception as exc:
            log.exception("subscribe to %s failed", topic)
            raise Unavailable("internal error; subscribe again later") from exc
        req = JoinRequest(topic, member, since, req_id, prefetched)
        self._queue.put_nowait(req)
        return await req.future

    async def _prefetch(self, topic: str, since: Since, head: Head) -> Prefetched:
        """The replay after ``since`` up to ``head``, encoded."""
        recovered, events = await self._replay(topic, since, head)
        frames = await self._frames(events)
        early = [frames[(e.topic, e.pos)] for e in events]
        if sum(map(len, early)) > self._replay_max_bytes:
            self.not_recovered += 1
            return Prefetched(False, head.epoch, head.pos, [])
        return Prefetched(recovered, head.epoch, head.pos, early)

    def leave(self, topic: str, member: Member) -> None:
        """``member`` no longer wants ``topic`` (also after a failed join; twice is harmless)."""
        self.hub.remove(topic, member)
        if not self.hub.has(topic):
            self._streams.pop(topic, None)
        wanted = self._wanted.get(topic)
        if wanted is not None:
            wanted.discard(member)
            if not wanted:
                del self._wanted[topic]
                self._source.drop(topic)

    def position(self, topic: str) -> Stream | None:
        return self._streams.get(topic)

    # --- the task ---------------------------------------------------------------------

    async def run(self) -> None:
        failing = False
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < self._batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            started = time.perf_counter()
            doorbells: list[tuple[str, int]] = []
            joins: list[JoinRequest] = []
            resync = failing
            strangers = False
            for item in batch:
                if item is _RESYNC:
                    resync = True
                elif item is _STRANGERS:
                    strangers = True
                elif isinstance(item, JoinRequest):
                    joins.append(item)
                elif isinstance(item, tuple):
                    doorbells.append(item)
            try:
                trusted, strangers = await self._from_relay(doorbells, strangers)
                await self._advance(trusted, resync or self._strangers_catch_up(strangers))
                if joins:
                    await self._join(joins)
                if failing:
                    log.info("recovered: every topic caught up from the log")
                failing = False
            except Exception as exc:
                # Either way, delivery must go on: fail the joins of this batch and catch every
                # topic up from the log on the next round.
                if isinstance(exc, DB_ERRORS):
                    if not failing:
                        log.warning(
                            "pipeline cannot reach the database (%s: %s); will catch up",
                            type(exc).__name__,
                            exc,
                        )
                    reason = UNREACHABLE
                else:
                    # A bug must not stop delivery for good: log it whole.
                    log.exception("pipeline batch failed; catching up from the log")
                    reason = "internal error; subscribe again later"
                failing = True
                for j in joins:
                    if not j.future.done():
                        j.future.set_exception(Unavailable(reason))
                await asyncio.sleep(0.5)
                if self._queue.empty():
                    self._queue.put_nowait(_RESYNC)
            self.batch_size.observe(len(batch))
            self.batch_seconds.observe(time.perf_counter() - started)

    def _drain_queue_to_resync(self) -> None:
        kept: list[object] = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, JoinRequest):
                kept.append(item)
        log.warning("more than %d doorbells queued: catching up from the log instead", MAX_PENDING)
        self._queue.put_nowait(_RESYNC)
        for item in kept:
            self._queue.put_nowait(item)

    # --- senders ------------------------------------------------------------------------

    async def _from_relay(self, doorbells: list[tuple[str, int]], strangers: bool) -> tuple[list[str], bool]:
        """The payloads the relay sent, and whether others (or an owed catch-up) want one.

        A doorbell from a pid other than the known relay's re-reads the relay's pid (at most
        once a second): after a lease change the new relay's first doorbell finds it. What
        still comes from another session is dropped unread: the log, not the claim, decides."""
        if not self._source.verify_senders:
            return [payload for payload, _ in doorbells], strangers
        now = time.monotonic()
        if (
            any(pid != self._relay_pid for _, pid in doorbells)
            and now - self._relay_pid_read >= SENDER_CHECK_INTERVAL
        ):
            self._relay_pid_read = now
            pid = await self._log.relay_pid()
            if pid != self._relay_pid:
                log.debug("doorbells are believed from backend pid %s (the relay's) now", pid)
            self._relay_pid = pid
        trusted = [payload for payload, pid in doorbells if pid == self._relay_pid]
        ignored = len(doorbells) - len(trusted)
        if ignored:
            self.untrusted += ignored
            if self.untrusted == ignored or self.untrusted // 1000 > (self.untrusted - ignored) // 1000:
                sender = next(pid for _, pid in doorbells if pid != self._relay_pid)
                log.warning(
                    "ignored %d doorbell(s) so far from sessions other than the relay's (e.g. backend pid %s): "
                    "another database session notified channel 'gateway'; catching up from the log instead",
                    self.untrusted,
                    sender,
                )
        return trusted, strangers or ignored > 0

    def _strangers_catch_up(self, wanted: bool) -> bool:
        """Whether to catch up from the log now for doorbells from other sessions: at once if
        the last such catch-up is a second old, else once when the second is up (queued)."""
        if not wanted:
            return False
        now = time.monotonic()
        wait = self._strangers_caught_up + SENDER_CHECK_INTERVAL - now
        if wait <= 0:
            self._strangers_caught_up = now
            return True
        if self._strangers_timer is None:
            self._strangers_timer = asyncio.get_running_loop().call_later(wait, self._owe_catch_up)
        return False

    def _owe_catch_up(self) -> None:
        self._strangers_timer = None
        self._queue.put_nowait(_STRANGERS)

    # --- live path ----------------------------------------------------------------------

    async def _advance(self, doorbells: list[str], resync: bool) -> None:
        """Deliver everything the doorbells name (and, with ``resync``, everything up to each
        topic's head) for topics with local subscribers, in order, filling gaps from the log."""
        inline: dict[str, dict[int, Pending]] = {}
        marks: list[tuple[str, str, int]] = []  # (topic, epoch, a position known to exist)
        has = self.hub.has
        for payload in doorbells:
            try:
                bell = _decode_doorbell(payload)
            except msgspec.DecodeError as exc:
                version = _doorbell_version(payload)
                if version is not None and version > DOORBELL_VERSION:
                    self._newer_doorbell(version)  # a newer format, not a malformed one
                    resync = True
                    continue
                self._bad_doorbells += 1
                if self._bad_doorbells == 1 or self._bad_doorbells % 1000 == 0:
                    log.warning(
                        "ignored %d malformed doorbell(s), e.g. %.200r: %s", self._bad_doorbells, payload, exc
                    )
                resync = True  # someone notified our channel by hand: be safe, catch up
                continue
            if bell.v > DOORBELL_VERSION:
                self._newer_doorbell(bell.v)
                resync = True
                continue
            if bell.sync:
                resync = True
            for topic, epoch, pos, op, key in bell.ev or ():
                if has(topic):
                    inline.setdefault(topic, {})[pos] = Pending(
                        topic, epoch, pos, op, bell.tb, key, None, bell.ts
                    )
                    marks.append((topic, epoch, pos))
            for topic, epoch, _lo, hi in bell.rg or ():
                if has(topic):
                    marks.append((topic, epoch, hi))
        if resync:
            topics = self.hub.topics()
            if topics:
                marks.extend((t, h.epoch, h.pos) for t, h in (await self._log.heads(topics)).items())
        if marks:
            await self._deliver_up_to(marks, inline)

    def _newer_doorbell(self, version: int) -> None:
        self._newer_doorbells += 1
        if self._newer_doorbells == 1 or self._newer_doorbells % 1000 == 0:
            log.warning(
                "%d doorbell(s) of version %d, this replica reads version %d: catching up from the "
                "log for each instead (slower, nothing lost); finish upgrading the replicas",
                self._newer_doorbells,
                version,
                DOORBELL_VERSION,
            )

    async def _deliver_up_to(
        self, marks: Iterable[tuple[str, str, int]], inline: dict[str, dict[int, Pending]] | None = None
    ) -> None:
        """Bring each marked topic's stream up to the highest position marked for it."""
        inline = inline or {}
        targets: dict[str, int] = {}
        other_epoch: set[str] = set()
        for topic, epoch, pos in marks:
            stream = self._streams.get(topic)
            if stream is None:
                continue  # joined topics always have a stream; nobody here wants this one
            if epoch != stream.epoch:
                other_epoch.add(topic)
            elif pos > targets.get(topic, stream.pos):
                targets[topic] = pos
        if other_epoch:
            # Another epoch: the topic was reset (gateway.reset_topic), or this is a late
            # doorbell from before a reset we already followed. Only the head can tell.
            heads = await self._log.heads(sorted(other_epoch))
            for topic in other_epoch:
                head = heads[topic]
                stream = self._streams.get(topic)
                if stream is None or head.epoch == stream.epoch:
                    continue  # stale: the current stream's marks (if any) stand
                self._not_recovered(topic, Head(head.epoch, 0), "the topic's stream was reset")
                stream.epoch, stream.pos = head.epoch, 0
                targets[topic] = head.pos  # everything of the new stream
        plan: list[tuple[str, list[Pending]]] = []
        to_read: list[tuple[str, str, int, int]] = []
        for topic, upto in targets.items():
            stream = self._streams.get(topic)
            if stream is None:
                continue  # joined topics always have a stream; nobody here wants this one
            if upto <= stream.pos:
                continue  # duplicates only
            # Inline events of another epoch (a doorbell from before a reset) do not count.
            have = {pos: p for pos, p in inline.get(topic, {}).items() if p.epoch == stream.epoch}
            wanted = range(stream.pos + 1, upto + 1)
            if all(p in have for p in wanted):
                plan.append((topic, [have[p] for p in wanted]))
            else:
                to_read.append((topic, stream.epoch, stream.pos + 1, upto))
        if to_read:
            epochs = {topic: epoch for topic, epoch, _, _ in to_read}
            by_topic: dict[str, list[Pending]] = {}
            for e in await self._log.read(to_read):
                by_topic.setdefault(e.topic, []).append(
                    Pending(e.topic, epochs[e.topic], e.pos, e.op, e.tbl, e.key, e.data, e.ts, e.sender)
                )
            short = [t for t, _, lo, hi in to_read if len(by_topic.get(t, [])) != hi - lo + 1]
            real_heads = await self._log.heads(short) if short else {}
            for topic, epoch, lo, hi in to_read:
                got = by_topic.get(topic, [])
                real = real_heads.get(topic)
                if real is not None and real.epoch == epoch and real.pos < hi:
                    # A position claimed beyond what the log holds: never move the stream past
                    # the real head, or every later event (at or below the claim) is dropped as
                    # a duplicate and the topic freezes. Only the relay's doorbells get here, so
                    # this is a bug or a tampered log, not traffic: logged once.
                    if not self._over_head_logged:
                        self._over_head_logged = True
                        log.warning(
                            "topic %s: a doorbell claimed position %d, beyond the head %d of the log; "
                            "ignored (logged once)",
                            topic,
                            hi,
                            real.pos,
                        )
                    stream = self._streams.get(topic)
                    hi = targets[topic] = max(real.pos, stream.pos if stream is not None else 0)
                    got = [p for p in got if p.pos <= hi]
                if len(got) != hi - lo + 1:
                    # Some positions are gone from the log (pruned, or the topic was reset since
                    # they were rung): say so and skip to the head rather than deliver a stream
                    # with a hole in it.
                    if hi >= lo:
                        self._not_recovered(topic, Head(epoch, hi), "events were pruned or reset")
                    got = []
                else:
                    self.log_reads += 1
                plan.append((topic, got))
        if not plan:
            return
        frames = await self._frames([p for _, events in plan for p in events])
        publish = self.hub.publish
        observe = self.commit_to_send.observe
        now = time.time()
        for topic, events in plan:
            stream = self._streams.get(topic)
            if stream is None:
                continue  # everyone left while we were reading
            out = []
            for p in events:
                if p.pos > stream.pos:
                    out.append(frames[(topic, p.pos)])
                    stream.pos = p.pos
                    if p.ts is not None:
                        observe(now - p.ts)
            if out:
                # One write per subscriber for all of this topic's events in the batch.
                publish(topic, out[0] if len(out) == 1 else b"".join(out), len(out))
            stream.pos = max(stream.pos, targets[topic])

    def _not_recovered(self, topic: str, head: Head, why: str) -> None:
        self.not_recovered += 1
        log.warning("topic %s: subscribers must reload (%s)", topic, why)
        frame = text_frame(encode(Subscribed(topic=topic, epoch=head.epoch, pos=head.pos, recovered=False)))
        self.hub.publish(topic, frame)

    async def _frames(self, events: Iterable[Pending]) -> dict[tuple[str, int], bytes]:
        """Resolve rows (one SELECT per table) and encode each event once."""
        events = list(events)
        wanted: dict[str, set[str]] = {}
        allowed = self._resolver.allowed
        for p in events:
            if p.op in ("i", "u") and p.tbl is not None and p.key is not None and allowed(p.tbl):
                wanted.setdefault(p.tbl, set()).add(p.key)
        rows = await self._resolver.fetch(wanted) if wanted else {}
        # A table the fetch could not read is no longer allowed: its events go without rows.
        read = {t for t in wanted if allowed(t)}
        out: dict[tuple[str, int], bytes] = {}
        for p in events:
            op: Op = OPS.get(p.op, "message")
            row = None
            if p.op in ("i", "u") and p.tbl in read:
                got = rows.get((p.tbl, p.key or ""))
                if got is None or p.topic not in got[1]:
                    # Deleted, or moved to another topic, before we could read it: to this
                    # topic it is gone, so a delete carrying its key (never another topic's row).
                    op = "delete"
                else:
                    row = msgspec.Raw(got[0].encode())
            if p.op == "m" and p.data is not None and p.topic.startswith(PRESENCE_PREFIX):
                # Presence changes are published through the log like any event, but a
                # client wants them as presence frames (docs/presence.md).
                out[(p.topic, p.pos)] = text_frame(
                    encode(Presence(topic=p.topic, change=msgspec.Raw(p.data.encode())))
                )
                continue
            msg = Event(
                topic=p.topic,
                epoch=p.epoch,
                pos=p.pos,
                op=op,
                table=p.tbl,
                key=p.key,
                row=row,
                data=msgspec.Raw(p.data.encode()) if p.data is not None else None,
                ts=p.ts,
                from_=p.sender,
            )
            out[(p.topic, p.pos)] = text_frame(encode(msg))
        self.resolved += len(events)
        return out

    # --- joins --------------------------------------------------------------------------

    async def _join(self, joins: list[JoinRequest]) -> None:
        topics = sorted({j.topic for j in joins})
        heads = await self._log.heads(topics)
        # Bring streams that already have subscribers up to the head first.
        catch_up: list[tuple[str, str, int]] = []
        for topic in topics:
            head = heads[topic]
            stream = self._streams.get(topic)
            if stream is None or not self.hub.has(topic):
                self._streams[topic] = Stream(head.epoch, head.pos)
            else:
                catch_up.append((topic, head.epoch, head.pos))
        if catch_up:
            await self._deliver_up_to(catch_up)

        # Replays: read and resolve everything first, then write with no await in between. A
        # resume brings most of its replay read ahead (join()); what committed since is read here.
        replays: list[tuple[JoinRequest, bool | None, list[bytes], list[Pending]]] = []
        for j in joins:
            recovered: bool | None = None
            early: list[bytes] = []
            events: list[Pending] = []
            ahead = j.prefetched
            if ahead is not None and not ahead.recovered:
                recovered = False  # too old or another epoch then: still so now
            elif j.since is not None:
                since = j.since if ahead is None else Since(pos=ahead.pos, epoch=ahead.epoch)
                recovered, events = await self._replay(j.topic, since, heads[j.topic])
                if recovered and ahead is not None:
                    early = ahead.frames
            replays.append((j, recovered, early, events))
        frames = await self._frames(p for _, _, _, events in replays for p in events)
        for i, (j, recovered, early, events) in enumerate(replays):
            size = sum(map(len, early)) + sum(len(frames[(p.topic, p.pos)]) for p in events)
            if recovered and size > self._replay_max_bytes:
                self.not_recovered += 1
                replays[i] = (j, False, [], [])

        for j, recovered, early, events in replays:
            stream = self._streams.get(j.topic)
            if stream is None:  # the last subscriber left while we were reading
                stream = self._streams[j.topic] = Stream(heads[j.topic].epoch, heads[j.topic].pos)
            # Events the stream delivered beyond the head (a concurrent commit caught up
            # above) must also reach the newcomer: its ack position is the stream's.
            ack = Subscribed(
                topic=j.topic,
                epoch=stream.epoch,
                pos=stream.pos,
                id=j.id,
                recovered=recovered,
                replayed=len(early) + len(events),
            )
            if j.member.closed:
                if not j.future.done():
                    j.future.set_result(ack)
                continue
            for frame in early:
                j.member.deliver(frame)
            for p in events:
                j.member.deliver(frames[(p.topic, p.pos)])
            j.member.deliver(text_frame(encode(ack)))
            self.hub.add(j.topic, j.member)
            if not j.future.done():
                j.future.set_result(ack)

    async def _replay(self, topic: str, since: Since, head: Head) -> tuple[bool, list[Pending]]:
        """Everything after ``since`` up to ``head``, or (False, []) if that cannot be complete."""
        if since.epoch != head.epoch or since.pos > head.pos or since.pos < 0:
            self.not_recovered += 1
            return False, []
        missed = head.pos - since.pos
        if missed == 0:
            return True, []
        if missed > self._replay_max_events:
            self.not_recovered += 1
            return False, []
        got = await self._log.window(topic, head.epoch, since.pos, head.pos, self._replay_max_age)
        if len(got) != missed:
            self.not_recovered += 1
            return False, []  # never a partial replay presented as complete
        return True, [
            Pending(e.topic, head.epoch, e.pos, e.op, e.tbl, e.key, e.data, e.ts, e.sender) for e in got
        ]
