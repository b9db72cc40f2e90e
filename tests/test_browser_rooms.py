"""Rooms in a real Chromium against the REAL gateway and PostgreSQL: the browser client's
``publish()`` and the rooms script's ``gw.room()`` (gateway/static/gateway-rooms.js).

Two pages, two users, one room: each sees the other's presence state and messages, a page
that closes leaves the room, and a page whose socket dropped is back in the room with its
state by itself. Pages are tests/browsertest.py's ``client_page``s; the rooms script is loaded
from the gateway, as a page embedding it does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from gateway import protocol as p

from .browsertest import BROWSER_TESTS, HARNESS, client_page, rec, wait_for
from .gwtest import running_gateway, token

pytestmark = BROWSER_TESTS

ROOM = "room:1"

# The usual harness, then the rooms script from the gateway, and a room recording everything.
ROOM_HARNESS = (
    "async () => {\n  ("
    + HARNESS
    + """)();
  await new Promise((ok, no) => {
    const s = document.createElement("script");
    s.src = "/client/gateway-rooms.js";
    s.onload = ok;
    s.onerror = () => no(new Error("gateway-rooms.js did not load"));
    document.head.append(s);
  });
  Object.assign(rec, { members: null, joins: [], leaves: [], updates: [], messages: [], acks: [], pubErrors: [] });
  window.enter = (topic, state) => {
    window.room = gw.room(topic, { onError: (err) => rec.errors.push({ code: err.code, message: err.message }) });
    room.onSync((members) => { rec.members = members; });
    room.onJoin((e) => rec.joins.push([e.user, e.conn, e.state]));
    room.onLeave((e) => rec.leaves.push([e.user, e.conn]));
    room.onUpdate((e, before) => rec.updates.push([e.user, e.state, before.state]));
    room.onMessage((m) => rec.messages.push({ type: m.type, from: m.from, conn: m.conn, data: m.data }));
    return room.track(state).then((f) => f && f.type);
  };
  window.say = (data, opts) => room.publish(data, opts).then(
    (ack) => { rec.acks.push(ack.type); return ack.type; },
    (err) => { rec.pubErrors.push(err.code); return err.code; });
  // who is in the room and with what: [[user, state], ...] sorted by user
  window.who = () => (rec.members || []).flatMap((m) => m.conns.map((c) => [m.user, c.state]));
}"""
)


def mint(user: str) -> Callable[[], str]:
    """Tokens that read every room (and so its presence) and publish to every room."""
    return lambda: token(user, topics=["room:*"], publish=["room:*"])


def members_are(expected: list[list[Any]]) -> str:
    """Whether the page's room members are ``expected`` ([[user, state], ...] sorted by user)."""
    return f"JSON.stringify(who()) === {json.dumps(json.dumps(expected, separators=(',', ':')))}"


async def test_two_pages_see_each_other_s_state_and_messages_and_a_closed_page_leaves(
    browser: Any, dsn: str
) -> None:
    async with running_gateway(dsn, presence="true", presence_grace="0.5") as gw:
        async with client_page(browser, gw.base, mint("alice"), harness=ROOM_HARNESS) as alice:
            assert await alice.evaluate(f"enter({ROOM!r}, {{color: 'teal'}})") == "tracked"
            await wait_for(alice, members_are([["alice", {"color": "teal"}]]))

            async with client_page(browser, gw.base, mint("bob"), harness=ROOM_HARNESS) as bob:
                assert await bob.evaluate(f"enter({ROOM!r}, {{color: 'orange'}})") == "tracked"
                both = [["alice", {"color": "teal"}], ["bob", {"color": "orange"}]]
                await wait_for(alice, members_are(both))
                await wait_for(bob, members_are(both))
                bob_conn = await bob.evaluate("gw.conn")
                assert ["bob", bob_conn, {"color": "orange"}] in await rec(alice, "joins")

                # Messages both ways, with the sender's user and connection set by the gateway.
                assert await alice.evaluate("say({text: 'hi bob'})") == "published"
                await wait_for(bob, "rec.messages.length === 1")
                [m] = await rec(bob, "messages")
                alice_conn = await alice.evaluate("gw.conn")
                assert m == {
                    "type": "message",
                    "from": "alice",
                    "conn": alice_conn,
                    "data": {"text": "hi bob"},
                }
                # echo (the default): the sender gets its own message too
                await wait_for(alice, "rec.messages.length === 1")

                # echo: false: bob's message reaches alice, not bob himself.
                assert await bob.evaluate("say({text: 'hi alice'}, {echo: false})") == "published"
                await wait_for(alice, "rec.messages.length === 2")
                assert (await rec(alice, "messages"))[1]["from"] == "bob"

                # A new state is an update, seen by the other page.
                assert await bob.evaluate("room.track({color: 'plum'}).then((f) => f.type)") == "tracked"
                await wait_for(alice, members_are([["alice", {"color": "teal"}], ["bob", {"color": "plum"}]]))
                assert ["bob", {"color": "plum"}, {"color": "orange"}] in await rec(alice, "updates")
                assert await rec(bob, "messages") == [m]  # its own echo-less message never came back

            # Bob's page is closed: he leaves alice's room.
            await wait_for(alice, members_are([["alice", {"color": "teal"}]]))
            assert ["bob", bob_conn] in await rec(alice, "leaves")
            assert await rec(alice, "errors") == []
            assert await rec(alice, "appErrors") == []


async def test_a_dropped_socket_comes_back_into_the_room_with_its_state(browser: Any, dsn: str) -> None:
    async with running_gateway(dsn, presence="true", presence_grace="0.5") as gw:
        async with (
            client_page(browser, gw.base, mint("alice"), harness=ROOM_HARNESS) as alice,
            client_page(browser, gw.base, mint("bob"), harness=ROOM_HARNESS) as bob,
        ):
            await alice.evaluate(f"enter({ROOM!r}, {{color: 'teal'}})")
            await bob.evaluate(f"enter({ROOM!r}, {{color: 'orange'}})")
            both = members_are([["alice", {"color": "teal"}], ["bob", {"color": "orange"}]])
            await wait_for(bob, both)
            old_conn = await alice.evaluate("gw.conn")

            # Alice's socket is closed by the gateway (a deploy): her client reconnects, then
            # subscribes and tracks again by itself.
            ctx = gw.state.ctx
            for session in list(ctx.registry.sessions.values()):
                if session.conn_id == old_conn:
                    await session.close(p.CloseCode.SERVICE_RESTART, "test: reconnect")
            await wait_for(alice, f"gw.state === 'open' && gw.conn !== {old_conn!r}")
            new_conn = await alice.evaluate("gw.conn")
            await wait_for(bob, f"room.conns.has({new_conn!r}) && !room.conns.has({old_conn!r})")
            await wait_for(bob, both)
            await wait_for(alice, both)

            # Messages flow again both ways on the new connection.
            assert await alice.evaluate("say({n: 1})") == "published"
            await wait_for(bob, "rec.messages.some((m) => m.data.n === 1)")
            assert await bob.evaluate("say({n: 2})") == "published"
            await wait_for(alice, "rec.messages.some((m) => m.data.n === 2)")

            # A durable message: acknowledged with its position once committed, and delivered
            # to the room as an event with that position and its sender.
            ack = await alice.evaluate("room.publish({n: 3}, {durable: true})")
            assert ack["type"] == "published" and ack["pos"] >= 1 and ack["epoch"], ack
            await wait_for(bob, "rec.messages.some((m) => m.type === 'event' && m.data.n === 3)")
            [event] = [m for m in await rec(bob, "messages") if m["type"] == "event"]
            assert event["from"] == "alice" and event["data"] == {"n": 3}
            assert await bob.evaluate("room.conns.size") == 2
            assert await rec(alice, "errors") == []


async def test_a_publish_the_token_does_not_grant_is_refused_with_its_code(browser: Any, dsn: str) -> None:
    async with running_gateway(dsn, presence="true") as gw:
        reader = lambda: token("carol", topics=["room:*"])  # noqa: E731  reads, may not publish
        async with client_page(browser, gw.base, reader, harness=ROOM_HARNESS) as carol:
            await carol.evaluate(f"enter({ROOM!r}, {{color: 'teal'}})")
            assert await carol.evaluate("say({text: 'hello'})") == "forbidden"
            # Over GATEWAY_MAX_PUBLISH_BYTES (4096), within the frame limit (16384): refused, the
            # connection stays.
            assert await carol.evaluate("gw.publish('room:1', 'x'.repeat(6000)).catch((e) => e.code)") in (
                "too_large",
                "forbidden",
            )
            assert await carol.evaluate("gw.state") == "open"
            # Not connected: refused at once, nothing queued.
            await carol.evaluate("gw.close()")
            assert await carol.evaluate("gw.publish('room:1', 1).catch((e) => e.code)") == "disconnected"
