"""The browser client (gateway/static/gateway.js) embedded in sites as they really are, against the REAL gateway.

Same setup as tests/test_browser_e2e.py (its helpers are reused): the real gateway in this
process on a database of its own, Debian's Chromium through Playwright. These are the ways an
existing site can differ from the demo page: a fixed token string instead of a token function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .gwtest import CHROMIUM, running_gateway, token
from .test_browser_e2e import BLANK, VIEWPORT, BrowserErrors, rec, wait_for

pytest.importorskip("playwright.async_api")

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}"),
    pytest.mark.asyncio(loop_scope="module"),
]


async def test_a_fixed_token_string_leaves_no_uncaught_error_behind(browser: Any, dsn: str) -> None:
    """The README allows a string for options.token. The client armed a 10 s "no answer in time"
    rejection for the token function at every connect, and with a string nothing awaited it: an
    uncaught error in the console (and in the site's error tracker) 10 s after every connect."""
    async with running_gateway(dsn) as gw:
        context = await browser.new_context(viewport=VIEWPORT)
        errors = BrowserErrors()
        try:
            page = await context.new_page()
            errors.watch(page)
            await page.clock.install()
            await page.goto(gw.base + "/healthz")
            await page.set_content(BLANK)
            await page.evaluate(
                """(token) => {
                  window.rec = { states: [] };
                  window.gw = PgGateway.connect("/ws", { token, onState: (state) => rec.states.push(state) });
                }""",
                token("alice"),
            )
            await wait_for(page, "rec.states.includes('open')")
            await page.clock.run_for(11_000)  # past the 10 s the token may take
            assert await rec(page, "states") == ["connecting", "open"]
        finally:
            await context.close()
        errors.check()
