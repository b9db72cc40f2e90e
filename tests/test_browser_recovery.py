"""The browser client (gateway/static/gateway.js) recovering against the real gateway: a stream
that cannot be recovered, a subscription revoked at refresh, a refresh refused, a token function
that hangs, frames refused for the rate, more subscriptions at once than the frame rate allows.

Same setup as tests/test_browser_e2e.py: the real gateway in this process on a database of its
own, Debian's Chromium through Playwright, a page under the gateway's origin whose token function
calls a Python minter. The harness also records every raw frame the socket received
(``rec.raw``), so a test can show what the server sent next to what the client made of it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from gateway import protocol as p
from gateway.auth import mint_token

from .browsertest import BROWSER_TESTS, client_page, rec, wait_for
from .gwtest import make_items_table, running_gateway, token
from .pgconn import connection

pytestmark = BROWSER_TESTS

HARNESS = """() => {
  window.rec = { states: [], conns: [], appErrors: [], events: [], errors: {}, subscribed: [],
                 notRecovered: [], raw: [] };
  // Record what the socket really received; the client's own onmessage still runs.
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener("message", (m) => rec.raw.push(JSON.parse(m.data)));
    }
  };
  window.gw = PgGateway.connect("/ws", {
    token: () => window.mintToken(),
    onState: (state, detail) => {
      rec.states.push(state);
      if (state === "open") rec.conns.push(detail.conn);
    },
    onError: (err) => rec.appErrors.push({ code: err.code, message: err.message, topic: err.topic }),
  });
  window.unsubscribe = {};
  window.subscribeTo = (topic) => {
    rec.errors[topic] = [];
    unsubscribe[topic] = gw.subscribe(
      topic,
      (e) => rec.events.push({ topic: e.topic, pos: e.pos, epoch: e.epoch, title: e.row && e.row.title }),
      {
        onSubscribed: (info) => rec.subscribed.push(info),
        onNotRecovered: (info) => rec.notRecovered.push(info),
        onError: (err) => rec.errors[topic].push({ code: err.code, message: err.message }),
      },
    );
  };
}"""


def audit_page(
    browser: Any, base: str, mint: Callable[[], Any]
) -> contextlib.AbstractAsyncContextManager[Any]:
    """A client page (tests/browsertest.py) with this module's harness (errors per topic, raw frames)."""
    return client_page(browser, base, mint, harness=HARNESS)


async def sql(dsn: str, *statements: str) -> None:
    async with connection(dsn) as conn:
        for s in statements:
            await conn.execute(s)


def insert(title: str, owner: int = 1) -> str:
    return f"INSERT INTO items (owner_id, title) VALUES ({owner}, '{title}')"


@contextlib.asynccontextmanager
async def alice_in_room_1(browser: Any, dsn: str, **settings: str) -> AsyncIterator[tuple[Any, Any]]:
    """The set-up most tests here share: a gateway sending rows of ``items`` on ``room:<owner>``,
    and a page whose client is subscribed to room:1 as alice. Yields (gateway, page)."""
    await make_items_table(dsn, "'room:' || owner_id")
    async with running_gateway(dsn, tables="public.items", **settings) as gw:
        async with audit_page(browser, gw.base, lambda: token("alice", topics=["room:1"])) as page:
            await page.evaluate("subscribeTo('room:1')")
            await wait_for(page, "rec.subscribed.length === 1")
            yield gw, page


# --- a live subscription the gateway cannot recover is reported ---------------------------------


async def test_live_not_recovered_frame_reaches_the_application(browser: Any, dsn: str) -> None:
    async with alice_in_room_1(browser, dsn) as (_gw, page):
        await sql(dsn, insert("first"))
        await wait_for(page, "rec.events.length === 1")

        # Positions 2..3 are gone from the log before the gateway could read them (as when
        # retention pruned them); position 4 is a real row. The gateway cannot deliver 4
        # without a hole, so it sends {"type": "subscribed", "recovered": false, "pos": 4}
        # (docs/protocol.md: "reload, then continue from pos"). Then row 5.
        await sql(
            dsn,
            "UPDATE gateway.topics SET pos = pos + 2 WHERE topic = 'room:1'",
            insert("lost in the hole"),
        )
        await wait_for(page, "rec.raw.some((f) => f.type === 'subscribed' && f.recovered === false)")
        await sql(dsn, insert("after the hole"))
        await wait_for(page, "rec.events.length === 2")

        raw = [f for f in await rec(page, "raw") if f["type"] == "subscribed" and f.get("recovered") is False]
        assert raw and raw[0]["pos"] == 4 and "id" not in raw[0], raw
        events = await rec(page, "events")
        assert [(e["pos"], e["title"]) for e in events] == [(1, "first"), (5, "after the hole")]
        # The application was handed pos 1 then pos 5 of the same epoch, and never told that
        # 2..4 (including the committed row "lost in the hole") are missing: a silent gap.
        assert await rec(page, "notRecovered") != [], "onNotRecovered was never called"


# --- a subscription revoked at refresh is dropped and told so ------------------------------------


async def test_subscription_revoked_at_refresh_is_dropped_and_reported_to_it(browser: Any, dsn: str) -> None:
    await make_items_table(dsn, "'room:' || owner_id")
    async with running_gateway(dsn, tables="public.items", expiry_grace="0.5", jwt_leeway="0") as gw:
        minted: list[str] = []

        def mint() -> str:
            # The first token grants room:2; every later one (refreshes, reconnects) does not.
            minted.append(token("alice", ttl=3, topics=["room:1", "room:2"] if not minted else ["room:1"]))
            return minted[-1]

        async with audit_page(browser, gw.base, mint) as page:
            await page.evaluate("subscribeTo('room:1'); subscribeTo('room:2')")
            await wait_for(page, "rec.subscribed.length === 2")
            # The in-band refresh (about 1.5 s in) revokes room:2: the gateway drops it and sends
            # {"type": "error", "code": "forbidden", "topic": "room:2"} (no id), then "refreshed".
            await wait_for(page, "rec.raw.some((f) => f.type === 'error' && f.topic === 'room:2')")
            await wait_for(page, "rec.raw.some((f) => f.type === 'refreshed')")
            ctx = gw.state.ctx
            assert [s.topics for s in ctx.registry.sessions.values()] == [{"room:1"}]
            sub_errors_at_revocation = await rec(page, "errors['room:2']")
            still_held = await page.evaluate("gw._subs.has('room:2')")

            # A reconnect: the client subscribes room:2 again, although the gateway revoked it.
            for session in list(ctx.registry.sessions.values()):
                await session.close(p.CloseCode.SERVICE_RESTART, "test: reconnect")
            await wait_for(page, "rec.conns.length === 2 && rec.subscribed.length === 3")
            await wait_for(page, "rec.errors['room:2'].length > 0")
            refusals = [
                f for f in await rec(page, "raw") if f["type"] == "error" and f.get("topic") == "room:2"
            ]
            assert (sub_errors_at_revocation, still_held, len(refusals)) == (
                [{"code": "forbidden", "message": "access to room:2 was revoked"}],
                False,
                1,
            ), (
                f"at revocation the subscription's onError got {sub_errors_at_revocation} (the error went to "
                f"options.onError: {await rec(page, 'appErrors')}), the client still held room:2: {still_held}, "
                f"and after the reconnect it subscribed to it again and was refused again: {refusals}"
            )


# --- a refresh the gateway rejects is retried -----------------------------------------------------


async def test_rejected_refresh_is_retried_before_the_token_expires(browser: Any, dsn: str) -> None:
    await make_items_table(dsn, "'room:' || owner_id")
    async with running_gateway(dsn, tables="public.items", expiry_grace="4", jwt_leeway="0") as gw:
        minted: list[str] = []

        def mint() -> str:
            n = len(minted)
            # The second token (the first refresh) does not verify, e.g. the token endpoint
            # answered from a misconfigured node for a moment; every other one is good.
            secret = "another-secret-0123456789-abcdefghijkl" if n == 1 else None
            tok = (
                mint_token(secret, "alice", ttl=8, topics=["room:1"])
                if secret
                else token("alice", ttl=8, topics=["room:1"])
            )
            minted.append(tok)
            return tok

        async with audit_page(browser, gw.base, mint) as page:
            await page.evaluate("subscribeTo('room:1')")
            await wait_for(page, "rec.subscribed.length === 1")
            await wait_for(page, "rec.appErrors.some((e) => e.code === 'bad_token')")
            # The first token is in force for ~8 s + 4 s grace; a retry of the refresh (the client
            # retries a failing token function every 5 s) has ample time. A real wait, not the
            # page's clock: what must pass is the token's expiry by the gateway's clock.
            await asyncio.sleep(10)
            registry = gw.state.ctx.registry
            assert registry.closed_by_code[p.CloseCode.TOKEN_EXPIRED] == 0, (
                f"closed with 4005: the client never retried the refresh; {len(minted)} token(s) minted; "
                f"states {await rec(page, 'states')}"
            )
            assert await rec(page, "states") == ["connecting", "open"]


# --- a token function that never settles is given up on ------------------------------------------


async def test_a_hung_token_function_does_not_stall_reconnects_forever(browser: Any, dsn: str) -> None:
    async with alice_in_room_1(browser, dsn) as (gw, page):
        # The client's own deadline for a token is a timer in the page: its clock is driven.
        await page.clock.install()
        # From now on the token endpoint hangs (a stuck fetch: browsers never time it out).
        await page.evaluate(
            """() => {
              const good = gw.options.token;
              window.hang = true;
              gw.options.token = () => (window.hang ? new Promise(() => {}) : good());
            }"""
        )
        for session in list(gw.state.ctx.registry.sessions.values()):
            await session.close(p.CloseCode.SERVICE_RESTART, "test: reconnect")
        await wait_for(page, "rec.states.filter((s) => s === 'connecting').length === 2")
        await page.clock.run_for(12_000)  # longer than the client's own handshake deadline (10 s)
        await page.evaluate("window.hang = false")  # the endpoint answers again
        # A client that gives up on a stuck token request retries, and comes back: the attempt
        # that was waiting when the endpoint recovered gives up in its turn, the next one connects.
        await page.clock.run_for(12_000)
        await wait_for(page, "rec.conns.length === 2")


# --- an unsubscribe the gateway rate-limited is sent again ---------------------------------------


async def test_rate_limited_unsubscribe_does_not_break_a_later_subscribe(browser: Any, dsn: str) -> None:
    async with alice_in_room_1(browser, dsn, message_rate="1") as (gw, page):
        assert await page.evaluate("document.visibilityState") == "visible"
        await asyncio.sleep(2.5)  # the bucket (burst 2) is full again
        # Two status frames use the burst; the unsubscribe right after is answered
        # {"type": "error", "code": "rate_limited", "id": ..., "topic": "room:1"}.
        await page.evaluate("gw.setStatus('away'); gw.setStatus('online'); unsubscribe['room:1']()")
        await wait_for(page, "rec.raw.some((f) => f.type === 'error' && f.code === 'rate_limited')")
        assert [s.topics for s in gw.state.ctx.registry.sessions.values()] == [{"room:1"}]

        await asyncio.sleep(2.5)
        await page.evaluate("subscribeTo('room:1')")
        await wait_for(page, "rec.subscribed.length === 2 || rec.errors['room:1'].length > 0")
        await sql(dsn, insert("after resubscribing"))
        await asyncio.sleep(1)
        assert await rec(page, "errors['room:1']") == []
        assert [e["title"] for e in await rec(page, "events")] == ["after resubscribing"]


async def test_subscribing_again_while_an_unsubscribe_is_rate_limited_waits_for_it(
    browser: Any, dsn: str
) -> None:
    # The server still has the old subscription until the resent unsubscribe goes through; a
    # subscribe sent before that would be refused already_subscribed (and the subscription lost).
    async with alice_in_room_1(browser, dsn, message_rate="1") as (gw, page):
        await asyncio.sleep(2.5)  # the bucket (burst 2) is full again
        await page.evaluate("gw.setStatus('away'); gw.setStatus('online'); unsubscribe['room:1']()")
        await wait_for(page, "rec.raw.some((f) => f.type === 'error' && f.code === 'rate_limited')")
        await page.evaluate("subscribeTo('room:1')")  # before the client resends the unsubscribe
        # (The subscribe may be rate-limited too and retried: the client says so, and retries.)
        refused = "rec.errors['room:1'].filter((e) => e.code !== 'rate_limited')"
        await wait_for(page, f"rec.subscribed.length === 2 || {refused}.length > 0")
        assert await page.evaluate(refused) == []
        assert [s.topics for s in gw.state.ctx.registry.sessions.values()] == [{"room:1"}]
        await sql(dsn, insert("after resubscribing"))
        await wait_for(page, "rec.events.length > 0")
        await asyncio.sleep(0.5)
        assert [e["title"] for e in await rec(page, "events")] == ["after resubscribing"]


# --- many subscriptions at once stay under the frame rate ----------------------------------------


async def test_as_many_subscriptions_as_the_gateway_allows_are_made_without_being_closed_4029(
    browser: Any, dsn: str
) -> None:
    """The default limits allow 100 subscriptions per connection but 20 frames and 10 subscribes
    a second. An application subscribing to its 100 topics (or the client resubscribing them after
    every reconnect) must end up with all of them, not be closed for flooding and loop forever."""
    async with running_gateway(dsn) as gw:
        async with audit_page(browser, gw.base, lambda: token("alice", topics=["room:*"])) as page:
            await page.evaluate("for (let i = 1; i <= 100; i++) subscribeTo('room:' + i)")
            registry = gw.state.ctx.registry

            def held() -> list[int]:
                return [len(s.topics) for s in registry.sessions.values()]

            try:
                await wait_for(page, "new Set(rec.subscribed.map((s) => s.topic)).size === 100", 30_000)
            finally:
                closed = dict(registry.closed_by_code)
            assert closed == {}, f"closed {closed}; states {await rec(page, 'states')}"
            assert held() == [100]
            # And again after a reconnect, where the client resubscribes all of them at once.
            for session in list(registry.sessions.values()):
                await session.close(p.CloseCode.SERVICE_RESTART, "test: reconnect")
            await wait_for(page, "rec.conns.length === 2")
            await wait_for(page, "rec.subscribed.length >= 200", 30_000)
            assert dict(registry.closed_by_code) == {p.CloseCode.SERVICE_RESTART: 1}
            assert held() == [100]
