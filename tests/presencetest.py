"""Presence subscribers for the tests: they follow a presence topic from its first frame on.

``Watcher`` follows users' presence (``presence:global``, ``presence:staff``...): a
``snapshot``, then changes of status. ``RoomWatcher`` follows a room's (``presence:room:7``):
its ``members``, then joins, updates and leaves. Both check every frame's shape as they apply
it, and keep every change they saw in ``changes``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from .gwtest import Client


class _Follower:
    """What every presence subscriber does: subscribe, apply the first frame, then apply each
    change until ``until``'s expectation is met. A kind of presence says how to apply its
    first frame (``_start``) and a change (``_change``), and what it has (``_has``, ``_view``)."""

    TOPIC: str | None = None  # the topic ``subscribe`` takes when given none

    def __init__(self, client: Client) -> None:
        self.client = client
        self.changes: list[dict[str, Any]] = []

    async def subscribe(self, topic: str | None = None) -> dict[str, Any]:
        topic = topic or self.TOPIC
        assert topic, f"{type(self).__name__}.subscribe needs a topic"
        await self.client.send({"type": "subscribe", "topic": topic, "id": 7})
        first = await self.client.recv()
        assert first["type"] == "presence" and first["topic"] == topic, first
        self._start(first)
        while True:
            frame = await self.client.recv()
            if frame["type"] == "subscribed":
                assert frame["topic"] == topic and frame["id"] == 7
                return frame
            self._apply(frame)

    def _apply(self, frame: dict[str, Any]) -> None:
        assert frame["type"] == "presence" and "change" in frame, frame
        change = frame["change"]
        self._change(change)
        self.changes.append(change)

    async def until(self, expected: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._has(expected):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"expected {expected}, have {self._view()}")
            try:
                frame = await self.client.recv(remaining)
            except TimeoutError:
                raise AssertionError(f"expected {expected}, have {self._view()}") from None
            self._apply(frame)

    async def drain(self, quiet: float = 0.5) -> None:
        """Apply whatever arrives until nothing has for ``quiet`` seconds."""
        with contextlib.suppress(TimeoutError):
            while True:
                self._apply(await self.client.recv(quiet))

    def _start(self, first: dict[str, Any]) -> None:
        raise NotImplementedError

    def _change(self, change: dict[str, Any]) -> None:
        raise NotImplementedError

    def _has(self, expected: Any) -> bool:
        raise NotImplementedError

    def _view(self) -> object:
        raise NotImplementedError


class Watcher(_Follower):
    """A subscriber of users' presence: applies the snapshot and every change to ``status``
    (user -> status)."""

    TOPIC = "presence:global"

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.status: dict[str, str] = {}

    def of(self, user: str) -> list[str]:
        return [c["status"] for c in self.changes if c["user"] == user]

    def _start(self, first: dict[str, Any]) -> None:
        assert "snapshot" in first, first
        self.status = {e["user"]: e["status"] for e in first["snapshot"]}

    def _change(self, change: dict[str, Any]) -> None:
        assert set(change) == {"user", "status", "last_seen"}, change
        self.status[change["user"]] = change["status"]

    def _has(self, expected: dict[str, str]) -> bool:
        return all(self.status.get(u, "offline") == s for u, s in expected.items())

    def _view(self) -> object:
        return self.status


class RoomWatcher(_Follower):
    """A subscriber of a room's presence: applies ``members`` and every change to ``members``
    (user -> conn -> state)."""

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.members: dict[str, dict[str, dict[str, Any]]] = {}

    def _start(self, first: dict[str, Any]) -> None:
        assert "members" in first and "snapshot" not in first, first
        self.members = {m["user"]: {c["conn"]: c["state"] for c in m["conns"]} for m in first["members"]}

    def _change(self, change: dict[str, Any]) -> None:
        conns = self.members.setdefault(change["user"], {})
        if change["op"] == "leave":
            assert set(change) == {"op", "user", "conn"}, change
            assert change["conn"] in conns, (change, self.members)
            del conns[change["conn"]]
            if not conns:
                del self.members[change["user"]]
        else:
            assert set(change) == {"op", "user", "conn", "state"}, change
            assert (change["conn"] in conns) == (change["op"] == "update"), (change, self.members)
            conns[change["conn"]] = change["state"]

    def _has(self, expected: dict[str, dict[str, dict[str, Any]]]) -> bool:
        return self.members == expected

    def _view(self) -> object:
        return self.members
