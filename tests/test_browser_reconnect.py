"""The browser client reconnects when the page is shown again or the network comes back, instead
of waiting out its backoff (up to 20 s): mobile browsers and background tabs kill sockets, and the
user looking at the page again should not stare at stale data.

The real gateway and PostgreSQL, Debian's Chromium, as in tests/test_browser_e2e.py (its helpers
are reused). The page's clock is Playwright's fake one, so "within a second" and "not before 8 s"
are exact rather than raced (it is paused once the page is open); its Math.random is pinned to 1, so the backoff and the jitter take
their longest values. Tabs are hidden and shown as tests/test_browser.py does it; the network goes
away with Chromium's offline emulation, in which new sockets fail and ``online`` fires on return.
The gateway refuses to reconnect while it is ``draining`` (503, as a replica shutting down does).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway import protocol as p

from .browsertest import (
    BLANK,
    CHROMIUM,
    SOCKET_REFUSED,
    VIEWPORT,
    BrowserErrors,
    set_visibility,
    wait_for,
)
from .gwtest import Gateway, insert_items, make_items_table, running_gateway, token

pytest.importorskip("playwright.async_api")

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}"),
    pytest.mark.asyncio(loop_scope="module"),
]

# rec.states: every [state, detail]; rec.titles: the rows received on room:1.
HARNESS = """() => {
  window.rec = { states: [], conns: [], titles: [], subscribed: 0 };
  window.gw = PgGateway.connect("/ws", {
    token: () => window.mintToken(),
    onState: (state, detail) => {
      rec.states.push([state, detail]);
      if (state === "open") rec.conns.push(detail.conn);
    },
  });
  gw.subscribe("room:1", (e) => rec.titles.push(e.row.title), { onSubscribed: () => rec.subscribed++ });
}"""
LONG_BACKOFF_MS = 8_000


@contextlib.asynccontextmanager
async def page_on_a_fake_clock(browser: Any, gw: Gateway) -> AsyncIterator[tuple[Any, Any]]:
    """A page under the gateway's origin, subscribed to room:1 as alice; yields (context, page)."""
    context = await browser.new_context(viewport=VIEWPORT)
    errors = BrowserErrors(tolerate=(SOCKET_REFUSED,))
    try:
        await context.expose_function("mintToken", lambda: token("alice", topics=["room:1"]))
        page = await context.new_page()
        errors.watch(page)
        await page.clock.install()
        await page.goto(gw.base + "/healthz")
        await page.set_content(BLANK)
        await page.evaluate("Math.random = () => 1")
        await page.evaluate(HARNESS)
        # subscribed, so the client knows its position: the rows committed while away are replayed
        await wait_for(page, "rec.conns.length === 1 && rec.subscribed === 1")
        # Installed, the fake clock still runs on its own; from here it moves only when told.
        await page.clock.pause_at(round(time.time() * 1000) + 1_000)
        yield context, page
    finally:
        await context.close()
    errors.check()


async def drop_and_back_off(page: Any, gw: Gateway, offline: Any = None) -> None:
    """Close the page's connection (1001, retried with backoff) and let its retries fail until
    the next one is at least LONG_BACKOFF_MS away: refused by a draining gateway, or, given
    the page's browser context as ``offline``, for want of a network."""
    ctx = gw.state.ctx
    assert ctx is not None
    for session in list(ctx.registry.sessions.values()):
        await session.close(p.CloseCode.GOING_AWAY, "test: the socket dies")
    await wait_for(page, "rec.states.at(-1)[0] === 'reconnecting'")
    # Offline only now: Chromium's emulation also holds back frames of open sockets (the close).
    if offline is not None:
        await offline.set_offline(True)
    else:
        gw.state.draining = True
    while (delay := await page.evaluate("rec.states.at(-1)[1].delay")) < LONG_BACKOFF_MS:
        seen = await page.evaluate("rec.states.length")
        await page.clock.run_for(delay + 1)
        await wait_for(page, f"rec.states.length >= {seen + 2} && rec.states.at(-1)[0] === 'reconnecting'")


async def test_a_page_shown_again_reconnects_within_a_second_not_after_the_backoff(
    browser: Any, dsn: str
) -> None:
    await make_items_table(dsn, "'room:' || owner_id")
    async with running_gateway(dsn, tables="public.items") as gw:
        async with page_on_a_fake_clock(browser, gw) as (_context, page):
            await set_visibility(page, "hidden")
            await drop_and_back_off(page, gw)
            await insert_items(dsn, 1, ["while hidden"])
            gw.state.draining = False

            await set_visibility(page, "visible")
            tries = await page.evaluate("rec.states.length")
            await page.clock.run_for(900)
            # Not at once either: with Math.random() = 1 the jitter is exactly 1000 ms.
            assert await page.evaluate("rec.states.length") == tries, await page.evaluate("rec.states")
            await page.clock.run_for(200)  # ... and nowhere near the backoff's 8 s or more
            await wait_for(page, "rec.conns.length === 2")
            # resumed from its position: the row committed meanwhile arrives
            await wait_for(page, "rec.titles.includes('while hidden')")


async def test_an_offline_page_waits_for_the_network_then_reconnects_at_once(browser: Any, dsn: str) -> None:
    await make_items_table(dsn, "'room:' || owner_id")
    async with running_gateway(dsn, tables="public.items") as gw:
        async with page_on_a_fake_clock(browser, gw) as (context, page):
            await drop_and_back_off(page, gw, offline=context)
            await insert_items(dsn, 1, ["while offline"])

            # Shown again while still offline: no try can succeed, so none is made.
            await set_visibility(page, "hidden")
            await set_visibility(page, "visible")
            tries = await page.evaluate("rec.states.length")
            await page.clock.run_for(1_500)
            assert await page.evaluate("rec.states.length") == tries, await page.evaluate("rec.states")

            # The network is back: the `online` event reconnects at once, no timer involved
            # (the fake clock does not move from here on).
            await context.set_offline(False)
            await wait_for(page, "rec.conns.length === 2")
            await wait_for(page, "rec.titles.includes('while offline')")
