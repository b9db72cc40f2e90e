"""Topic -> local subscribers, and fan-out of pre-encoded frames.

The hub knows nothing about PostgreSQL or aiohttp. A subscriber is anything with a
non-blocking ``deliver(frame)``: the session writes the bytes straight into its socket's
transport buffer and cuts itself off when that buffer passes its limit, so one slow
client never delays another and the hub never awaits.

Every event is turned into one complete WebSocket frame (header + JSON) once, and the same
``bytes`` object is handed to every subscriber of the topic.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Protocol


class Subscriber(Protocol):
    def deliver(self, frame: bytes) -> None:
        """Queue one complete WebSocket frame for sending; must not block or raise."""


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final WebSocket text frame (RFC 6455 section 5.2), as a server sends it."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


class Hub:
    def __init__(self) -> None:
        self._topics: dict[str, set[Subscriber]] = {}
        # Per topic, the subscribers' bound ``deliver`` methods: fan-out is then one call per
        # subscriber and nothing else. A join or leave only drops the topic's tuple and the next
        # fan-out rebuilds it: rebuilding on every join made a topic's N joins cost N^2/2
        # (50,000 subscribers of one topic: over a billion bound methods made, minutes of CPU),
        # and a reconnect storm's thousands of joins arrive between two events anyway.
        self._targets: dict[str, tuple[Callable[[bytes], None], ...]] = {}
        self.delivered = 0  # events handed to subscribers, for metrics

    def add(self, topic: str, subscriber: Subscriber) -> None:
        self._topics.setdefault(topic, set()).add(subscriber)
        self._targets.pop(topic, None)

    def remove(self, topic: str, subscriber: Subscriber) -> None:
        subs = self._topics.get(topic)
        if subs is None:
            return
        subs.discard(subscriber)
        self._targets.pop(topic, None)
        if not subs:
            del self._topics[topic]

    def has(self, topic: str) -> bool:
        return topic in self._topics

    def topics(self) -> list[str]:
        return list(self._topics)

    def subscribers(self, topic: str) -> Iterable[Subscriber]:
        return tuple(self._topics.get(topic, ()))

    def count(self, topic: str) -> int:
        return len(self._topics.get(topic, ()))

    def subscription_count(self) -> int:
        return sum(len(s) for s in self._topics.values())

    def publish(self, topic: str, frame: bytes, events: int = 1) -> int:
        """Hand ``frame`` (``events`` complete frames back to back) to every subscriber of ``topic``."""
        # The tuple is replaced, never mutated, so a subscriber that removes itself while
        # we iterate (a slow consumer) does not disturb this loop.
        targets = self._targets.get(topic)
        if targets is None:
            subs = self._topics.get(topic)
            if not subs:
                return 0
            targets = self._targets[topic] = tuple(s.deliver for s in subs)
        for deliver in targets:
            deliver(frame)
        self.delivered += len(targets) * events
        return len(targets)
