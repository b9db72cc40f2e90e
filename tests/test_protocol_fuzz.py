"""Property tests: arbitrary frames never break the gateway, and each bad frame gets one error.

One real gateway per test function runs in a background thread with its own event loop (the
``dsn`` database, a real socket). Hypothesis drives many examples through it from the test's
thread, each example with ``asyncio.run`` and fresh connections: hypothesis and async tests mix
poorly, and this keeps every example independent while the server is shared.

Invariants checked on every example:

* every frame gets exactly the replies the protocol promises: one error with a known code for a
  bad frame (a ping sent after each frame marks where its replies end), the documented reply
  for a valid one, close 1009 for a frame over GATEWAY_MAX_FRAME_BYTES;
* the server keeps answering: a ping and ``/healthz`` after every example;
* an observer client on another connection receives every event written while the fuzzing goes
  on, in order, none missing, none twice;
* nothing is logged at ERROR level (an exception escaping a handler is logged by aiohttp).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway import protocol as p

from .gwtest import Client, Closed, Gateway, running_gateway, token
from .pgconn import pg_connect

MAX_FRAME = 4096
USER = "fz"
GRANTS = ["room:*", "doc:7"]
OBSERVER_TOPIC = "user:observer"
WAIT = 10.0

FUZZ_SETTINGS = {
    "message_rate": 100000,  # rate limits have their own tests; here every frame is answered
    "subscribe_rate": 100000,
    "max_frame_bytes": MAX_FRAME,
    "max_subscriptions": 1000,
}


# --- the gateway in a thread ----------------------------------------------------------------------


@dataclass
class Background:
    """A gateway served from a thread's event loop, an observer subscribed to its own topic and a
    writer committing events to that topic until ``stop``."""

    dsn: str
    gw: Gateway | None = None
    written: list[int] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    failure: BaseException | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with running_gateway(self.dsn, **FUZZ_SETTINGS) as gw:
                observer = await gw.connect("observer")
                await observer.subscribe(OBSERVER_TOPIC)
                db = await pg_connect(self.dsn)
                self.gw = gw
                self._ready.set()
                reader = asyncio.create_task(self._read(observer))
                while not self._stop.is_set():
                    pos = await db.fetchval("SELECT gateway.emit($1, '{}'::jsonb)", OBSERVER_TOPIC)
                    self.written.append(pos)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), 0.02)
                # Everything written must arrive; the reader stops once it has.
                await asyncio.wait_for(reader, WAIT)
                await db.close()
                await observer.close()
        except BaseException as exc:
            self.failure = exc
        finally:
            self._ready.set()

    async def _read(self, observer: Client) -> None:
        while not (
            self._stop is not None and self._stop.is_set() and len(self.received) >= len(self.written)
        ):
            try:
                frame = await observer.recv(0.2)
            except TimeoutError:
                continue
            assert frame["type"] == "event" and frame["topic"] == OBSERVER_TOPIC, frame
            self.received.append(frame["pos"])

    def stop(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)


@contextlib.contextmanager
def background_gateway(dsn: str) -> Iterator[Background]:
    bg = Background(dsn)
    thread = threading.Thread(target=lambda: asyncio.run(bg._main()), name="fuzz-gateway")
    thread.start()
    try:
        bg._ready.wait(30)
        if bg.failure is not None:
            raise bg.failure
        assert bg.gw is not None, "the gateway did not start"
        yield bg
    finally:
        if bg._loop is not None:
            bg.stop()
        thread.join(30)
    assert not thread.is_alive(), "the gateway thread did not stop"
    if bg.failure is not None:
        raise bg.failure
    # Other clients were never disturbed: every event, in order, exactly once.
    assert bg.received == bg.written, f"observer got {len(bg.received)} of {len(bg.written)} events"
    assert bg.written, "the writer wrote nothing"


@pytest.fixture
def no_error_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.INFO)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, "errors logged: " + "; ".join(f"{r.name}: {r.getMessage()}" for r in errors[:5])


# --- strategies -----------------------------------------------------------------------------------

text_chars = st.characters(exclude_categories=["Cs"])  # a text frame must be valid UTF-8
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(text_chars, max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(text_chars, max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
huge_strings = st.tuples(
    st.sampled_from(["x", "é", "\u4e2d", "\U0001f600", " ", '"', "\\"]), st.integers(1, 5000)
).map(lambda t: t[0] * t[1])
topics = (
    st.sampled_from(
        [
            "user:fz",
            "room:1",
            "room:2",
            "doc:7",
            "doc:8",
            "user:other",
            "presence:global",
            "room:*",
            "",
            "x",
            "room: 1",
        ]
    )
    | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7F), min_size=0, max_size=20)
    | huge_strings
)
ids = st.none() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
message_types = ["auth", "refresh", "subscribe", "unsubscribe", "ping", "status", "track", "untrack"]


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    """A message whose type (usually) exists but whose fields may be missing, wrong or extra."""
    msg: dict[str, Any] = {"type": draw(st.sampled_from([*message_types, "PING", "", "welcome", "event"]))}
    fields = {
        "topic": topics | json_values,
        "id": ids | json_values,
        "token": st.sampled_from(["garbage", "a.b.c", ""]) | json_values | huge_strings,
        "since": st.fixed_dictionaries(
            {"pos": ids | json_values, "epoch": st.text(max_size=10) | json_values}
        )
        | json_values,
        "status": st.sampled_from(["online", "away", "busy", "Online"]) | json_values,
        "state": st.dictionaries(st.text(max_size=5), json_values, max_size=3) | json_values,
        "extra": json_values,
    }
    for name in draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=4)):
        msg[name] = draw(fields[name])
    return msg


@st.composite
def valid(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["ping", "subscribe", "unsubscribe", "status", "auth", "refresh"]))
    if kind == "ping":
        return {"type": "ping", "id": draw(ids)}
    if kind in ("subscribe", "unsubscribe"):
        msg: dict[str, Any] = {"type": kind, "topic": draw(topics), "id": draw(ids)}
        if kind == "subscribe" and draw(st.booleans()):
            msg["since"] = {"pos": draw(st.integers(-5, 5)), "epoch": draw(st.text(text_chars, max_size=8))}
        return msg
    if kind == "status":
        return {"type": "status", "status": draw(st.sampled_from(["online", "away"]))}
    return {"type": kind, "token": draw(st.sampled_from(["garbage", "VALID", "OTHER_USER"]))}


def encode_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


frames = st.one_of(
    st.tuples(st.just("text"), st.text(text_chars, max_size=200)),
    st.tuples(st.just("text"), json_values.map(encode_json)),
    st.tuples(st.just("text"), near_valid().map(encode_json)),
    st.tuples(st.just("text"), valid().map(encode_json)),
    st.tuples(
        st.just("text"),
        st.sampled_from(["{", "[", '{"type": "ping"', "NaN", "Infinity", "[" * 2000, "1e999", "\ufeff{}"]),
    ),
    st.tuples(st.just("binary"), st.binary(max_size=300)),
)


# --- the model: which replies a frame must get ----------------------------------------------------

_TOPIC = re.compile(r"[!-~]{1,200}")


def topic_ok(topic: str) -> bool:
    kind, sep, ident = topic.partition(":")
    return bool(_TOPIC.fullmatch(topic)) and "*" not in topic and bool(sep and kind and ident)


def granted(topic: str) -> bool:
    return topic == f"user:{USER}" or (topic.startswith("room:") and len(topic) > 5) or topic == "doc:7"


def json_kind(text: str) -> str:
    """bad_json if the text is not JSON (RFC 8259: no NaN, no Infinity), else bad_message.

    A number too big for a double (1e999) counts as not JSON: RFC 8259 section 6 lets a parser
    set that limit, and the gateway's says "Number out of range".
    """

    def refuse(_: str) -> Any:
        raise ValueError("not JSON")

    def finite(number: str) -> float:
        value = float(number)
        if value in (float("inf"), float("-inf")):
            raise ValueError("number out of range")
        return value

    try:
        json.loads(text, parse_constant=refuse, parse_float=finite)
    except (ValueError, RecursionError):
        return "bad_json"
    return "bad_message"


def real_tokens(text: str) -> str:
    return text.replace('"VALID"', json.dumps(token(USER, topics=GRANTS))).replace(
        '"OTHER_USER"', json.dumps(token("someone-else"))
    )


@dataclass
class Model:
    subscribed: set[str] = field(default_factory=set)

    def expect(self, text: str) -> list[tuple[str, str | None]]:
        """The replies (type, error code) the authenticated connection must send to ``text``."""
        try:
            msg = p.decoder.decode(text)
        except msgspec.DecodeError:
            return [("error", json_kind(text))]
        match msg:
            case p.Ping():
                return [("pong", None)]
            case p.Auth():
                return [("error", "already_authenticated")]
            case p.Refresh(token=tok):
                if _is_user_token(tok, USER):
                    return [("refreshed", None)]
                if _is_user_token(tok, "someone-else"):
                    return [("error", "token_user_changed")]
                return [("error", "bad_token")]
            case p.SetStatus():
                return []  # presence is off: a status change has no reply
            case p.Track() | p.Untrack():
                return [("error", "presence_disabled")]  # presence is off, whatever the room
            case p.Subscribe(topic=topic):
                if not topic_ok(topic):
                    return [("error", "bad_topic")]
                if topic in self.subscribed:
                    return [("error", "already_subscribed")]
                if topic.startswith("presence:"):
                    return [("error", "presence_disabled")]  # presence is off, whoever asks
                if not granted(topic):
                    return [("error", "forbidden")]
                self.subscribed.add(topic)
                return [("subscribed", None)]
            case p.Unsubscribe(topic=topic):
                if topic in self.subscribed:
                    self.subscribed.discard(topic)
                    return [("unsubscribed", None)]
                return [("error", "not_subscribed")]
        raise AssertionError(f"unmodelled message {msg!r}")


def _is_user_token(tok: str, user: str) -> bool:
    try:
        return bool(msgspec.json.decode(_payload(tok)).get("sub") == user)
    except Exception:
        return False


def _payload(tok: str) -> bytes:
    import base64

    seg = tok.split(".")[1]
    return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))


def summary(frame: dict[str, Any]) -> tuple[str, str | None]:
    return frame["type"], frame.get("code")


async def send(c: Client, kind: str, data: str | bytes) -> None:
    assert c.ws is not None
    if kind == "binary":
        assert isinstance(data, bytes)
        await c.ws.send_bytes(data)
    else:
        assert isinstance(data, str)
        await c.ws.send_str(data)


async def healthz(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as s, s.get(gw.base + "/healthz") as r:
        assert r.status == 200 and (await r.json())["ok"] is True


def size(kind: str, data: str | bytes) -> int:
    return len(data) if isinstance(data, bytes) else len(data.encode())


# --- the properties -------------------------------------------------------------------------------

# Ping ids no strategy above generates (they stay within +-2**70), to mark the end of the replies.
_barrier = iter(range(2**71, 2**72))


async def authenticated_example(gw: Gateway, sequence: list[tuple[str, str | bytes]]) -> None:
    c = Client(gw.ws_url)
    await c.open()
    try:
        await c.auth(token(USER, topics=GRANTS))
        model = Model()
        for kind, data in sequence:
            if kind == "text":
                assert isinstance(data, str)
                data = real_tokens(data)
            n = size(kind, data)
            assume(n != MAX_FRAME)  # the exact limit has its own test in test_limits.py
            await send(c, kind, data)
            if n > MAX_FRAME:
                with pytest.raises(Closed) as info:
                    while True:
                        await c.recv(WAIT)
                assert info.value.code == p.CloseCode.MESSAGE_TOO_BIG
                return
            expected = [("error", "binary_frame")] if kind == "binary" else model.expect(str(data))
            barrier = next(_barrier)
            await c.send({"type": "ping", "id": barrier})
            got = []
            while True:
                frame = await c.recv(WAIT)
                if frame == {"type": "pong", "id": barrier}:
                    break
                got.append(frame)
            assert [summary(f) for f in got] == expected, f"frame {data!r:.300}: got {got!r:.500}"
            for f in got:
                if f["type"] == "error":
                    assert f["code"] in p.ERROR_CODES and f["message"], f
        # Still fully alive after the whole sequence.
        await c.send({"type": "ping", "id": 1})
        assert await c.recv(WAIT) == {"type": "pong", "id": 1}
    finally:
        await c.close()
    await healthz(gw)


async def unauthenticated_example(gw: Gateway, sequence: list[tuple[str, str | bytes]]) -> None:
    c = Client(gw.ws_url)
    await c.open()
    try:
        for kind, data in sequence:
            n = size(kind, data)
            assume(n != MAX_FRAME)
            await send(c, kind, data)
            if n > MAX_FRAME:
                expected_close: int | None = p.CloseCode.MESSAGE_TOO_BIG
            elif kind == "text" and isinstance(_decoded(str(data)), p.Auth):
                expected_close = p.CloseCode.UNAUTHORIZED  # no token generated here is valid
            else:
                expected_close = None
            if expected_close is not None:
                with pytest.raises(Closed) as info:
                    while True:
                        await c.recv(WAIT)
                assert info.value.code == expected_close, data
                return
            frame = await c.recv(WAIT)
            if kind == "binary":
                expected = "binary_frame"
            elif _decoded(str(data)) is not None:
                expected = "not_authenticated"
            else:
                expected = json_kind(str(data))
            assert summary(frame) == ("error", expected), f"frame {data!r:.300}: got {frame!r:.500}"
        # Exactly one reply per frame: the next frame after a valid auth is the welcome.
        await c.auth(token(USER))
    finally:
        await c.close()
    await healthz(gw)


def _decoded(text: str) -> p.ClientMessage | None:
    try:
        return p.decoder.decode(text)
    except msgspec.DecodeError:
        return None


def test_arbitrary_frames_after_auth(dsn: str, no_error_logs: None) -> None:
    with background_gateway(dsn) as bg:
        assert bg.gw is not None
        gw = bg.gw

        @settings(
            max_examples=150,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.lists(frames, min_size=1, max_size=12))
        def check(sequence: list[tuple[str, str | bytes]]) -> None:
            asyncio.run(authenticated_example(gw, sequence))

        check()


def test_arbitrary_frames_before_auth(dsn: str, no_error_logs: None) -> None:
    with background_gateway(dsn) as bg:
        assert bg.gw is not None
        gw = bg.gw

        @settings(
            max_examples=100,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.lists(frames, min_size=1, max_size=8))
        def check(sequence: list[tuple[str, str | bytes]]) -> None:
            asyncio.run(unauthenticated_example(gw, sequence))

        check()
