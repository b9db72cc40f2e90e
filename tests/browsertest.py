"""Browser helpers: Debian's Chromium driven by Playwright, and pages running the browser client.

``launch_chromium()`` starts ``/usr/bin/chromium`` (or ``$CHROMIUM``) with the flags below;
conftest.py's ``browser`` fixture gives one per test module. ``BROWSER_TESTS`` is the
``pytestmark`` of a module of browser tests: it skips the module, saying why, without a
Chromium, and runs its tests and fixtures in the module's event loop (the browser's).

The pages of tests against the real gateway are a document written over the gateway's
``/healthz`` response (``page.set_content``), so they have the gateway's origin and address
space: its Origin check applies unchanged, and Chromium's local-network-access check allows the
WebSocket to 127.0.0.1 (it blocks it from a page that Playwright fulfils itself). Their token
function calls ``window.mintToken``, a Python function exposed to the page (``minter``).

A page's timers (the client's backoff, pings, refreshes, handshake deadline) are driven with
Playwright's clock (``page.clock.install()`` then ``page.clock.run_for(ms)``), never waited
for with a sleep. Playwright never downloads a browser here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from .gwtest import serving, token

playwright_api = pytest.importorskip("playwright.async_api")

# Debian's Chromium, driven by Playwright (never a downloaded browser); the flags keep it
# from reaching for the network this machine does not have.
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# One browser for the module (starting Chromium is the slow part), a fresh context per page: the
# module's tests and fixtures share one event loop for that.
BROWSER_TESTS = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}"),
    pytest.mark.asyncio(loop_scope="module"),
]

VIEWPORT = {"width": 1200, "height": 800}
# Chromium reports a refused WebSocket connection on the console; expected while a gateway is down.
SOCKET_REFUSED = "WebSocket connection to"
# Upper bound for a condition to become true (never a measured duration). Generous: the machine
# running the suite may be busy, and a gateway restart includes a Python interpreter start.
WAIT_MS = 20_000

# A blank page under the gateway's origin that loads the client from the gateway itself.
BLANK = (
    '<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>e2e</title>'
    '<script src="/client/gateway.js"></script>'
)

# Connect and record every callback in window.rec, for the test to read.
HARNESS = """() => {
  window.rec = { states: [], conns: [], appErrors: [], events: [], errors: [], subscribed: [],
                 online: null, changes: [] };
  window.gw = PgGateway.connect("/ws", {
    token: () => window.mintToken(),
    onState: (state, detail) => {
      rec.states.push(state);
      if (state === "open") rec.conns.push(detail.conn);
    },
    onError: (err) => rec.appErrors.push({ code: err.code, message: err.message }),
  });
  // Neither helper returns the unsubscribe function: page.evaluate would call it.
  window.unsubscribe = {};
  window.subscribeTo = (topic) => { unsubscribe[topic] = gw.subscribe(
    topic,
    (e) => rec.events.push({ topic: e.topic, pos: e.pos, op: e.op, key: e.key, title: e.row && e.row.title }),
    {
      onSubscribed: (info) => rec.subscribed.push(info),
      onError: (err) => rec.errors.push({ code: err.code, message: err.message, topic: err.topic }),
    },
  ); };
  window.watchPresence = (topic) => { unsubscribe[topic] = gw.presence(topic, {
    onSnapshot: (list, users) => { rec.online = [...users.keys()].sort(); },
    onChange: (entry, users) => {
      rec.changes.push([entry.user, entry.status]);
      rec.online = [...users.keys()].sort();
    },
  }); };
}"""


@contextlib.asynccontextmanager
async def launch_chromium() -> AsyncIterator[Any]:
    """Debian's Chromium through Playwright, closed on the way out."""
    async with playwright_api.async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


class BrowserErrors:
    """Console errors and uncaught exceptions of a page; any of them fails the test."""

    def __init__(self, tolerate: tuple[str, ...] = ()) -> None:
        self.tolerate = tolerate
        self.seen: list[str] = []

    def watch(self, page: Any) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.seen.append(f"uncaught: {e}"))

    def _console(self, message: Any) -> None:
        # The /healthz document the harness pages start from makes Chromium ask for a favicon.
        if message.location.get("url", "").endswith("/favicon.ico"):
            return
        if message.type == "error" and not message.text.startswith(self.tolerate):
            self.seen.append(message.text)

    def check(self) -> None:
        assert not self.seen, f"browser errors: {self.seen}"


@contextlib.asynccontextmanager
async def client_page(
    browser: Any,
    base: str,
    mint: Callable[[], str],
    tolerate: tuple[str, ...] = (),
    harness: str = HARNESS,
) -> AsyncIterator[Any]:
    """A page of its own context under ``base`` running ``harness``; tokens come from ``mint()``."""
    context = await browser.new_context(viewport=VIEWPORT)
    errors = BrowserErrors(tolerate)
    try:
        await context.expose_function("mintToken", mint)
        page = await context.new_page()
        errors.watch(page)
        await page.goto(base + "/healthz")
        await page.set_content(BLANK)
        await page.evaluate(harness)
        await wait_for(page, "rec.states.includes('open')")
        yield page
    finally:
        await context.close()
    errors.check()


async def wait_for(page: Any, expr: str, timeout_ms: int = WAIT_MS) -> None:
    """Wait until the JS expression ``expr`` holds on ``page``; on timeout say which and show rec."""
    try:
        await page.wait_for_function(f"() => {expr}", timeout=timeout_ms)
    except playwright_api.TimeoutError:
        state = await page.evaluate("typeof rec === 'undefined' ? null : rec")
        raise AssertionError(f"timed out waiting for `{expr}`; page recorded {state}") from None


async def rec(page: Any, name: str) -> Any:
    """``window.rec.<name>`` of the page: what its harness recorded."""
    return await page.evaluate(f"window.rec.{name}")


async def set_visibility(page: Any, state: str) -> None:
    """Make the page "hidden" or "visible" as a browser does when its tab is switched."""
    await page.evaluate(
        """(state) => {
          Object.defineProperty(document, "visibilityState", { value: state, configurable: true });
          document.dispatchEvent(new Event("visibilitychange"));
        }""",
        state,
    )


def minter(user: str, *, ttl: float = 300, topics: list[str]) -> tuple[Callable[[], str], list[str]]:
    """A token function for a page, and the list of every token it handed out."""
    minted: list[str] = []

    def mint() -> str:
        minted.append(token(user, ttl=ttl, topics=topics))
        return minted[-1]

    return mint, minted


@contextlib.asynccontextmanager
async def app_site(pages: dict[str, str]) -> AsyncIterator[str]:
    """Another origin (the application's own site) serving ``pages`` (path -> HTML, read at
    each request); yields its origin."""
    app = web.Application()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=pages[request.path], content_type="text/html")

    app.router.add_get("/{name:.*}", page)
    async with serving(app, shutdown_timeout=1) as origin:
        yield origin
