"""The browser client (gateway/static/gateway.js) embedded in sites as they really are, against the REAL gateway.

Same setup as tests/test_browser_e2e.py (helpers in tests/browsertest.py): the real gateway in this
process on a database of its own, Debian's Chromium through Playwright. These are the ways an
existing site can differ from the demo page: a strict Content-Security-Policy, or a fixed token
string instead of a token function.
"""

from __future__ import annotations

from typing import Any

from .browsertest import BLANK, BROWSER_TESTS, VIEWPORT, BrowserErrors, app_site, minter, rec, wait_for
from .gwtest import insert_items, make_items_table, running_gateway, token

pytestmark = BROWSER_TESTS

# The application's page on its own origin, under a Content-Security-Policy given in a <meta>
# tag (as a header would), loading the client from the gateway. Its own inline script runs by
# the policy's nonce, as on a site with a strict policy. GW: the gateway's address.
CSP_PAGE = """<!doctype html><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="POLICY">
<title>app</title>
<script src="GW/client/gateway.js"></script>
<script nonce="n0nce">
  window.rec = { states: [], errors: [], titles: [], subscribed: 0 };
  const gw = PgGateway.connect("GW/ws".replace(/^http/, "ws"), {
    token: () => window.mintToken(),
    onState: (state) => rec.states.push(state),
    onError: (err) => rec.errors.push({ code: err.code, message: err.message }),
  });
  gw.subscribe("room:1", (e) => rec.titles.push(e.row.title), { onSubscribed: () => rec.subscribed++ });
</script>"""
# What Chromium itself logs when the policy blocks the WebSocket.
CSP_BLOCKED = "Connecting to '"


async def open_app_page(browser: Any, url: str, errors: BrowserErrors) -> tuple[Any, Any]:
    mint, _ = minter("alice", topics=["room:1"])
    context = await browser.new_context(viewport=VIEWPORT)
    await context.expose_function("mintToken", mint)
    page = await context.new_page()
    errors.watch(page)
    await page.goto(url)
    return context, page


async def test_a_strict_content_security_policy_with_trusted_types_needs_only_script_src_and_connect_src(
    browser: Any, dsn: str
) -> None:
    """No eval, no inline script or style, no HTML sink: a page allowing the gateway in
    script-src and its ws: URL in connect-src, nothing else, with Trusted Types required, works."""
    await make_items_table(dsn, "'room:' || owner_id")
    pages: dict[str, str] = {}
    async with (
        app_site(pages) as origin,
        running_gateway(dsn, tables="public.items", allowed_origins=origin) as gw,
    ):
        policy = (
            f"default-src 'none'; script-src {gw.base} 'nonce-n0nce'; connect-src {gw.ws_url}; "
            "require-trusted-types-for 'script'; trusted-types 'none'"
        )
        pages["/"] = CSP_PAGE.replace("POLICY", policy).replace("GW", gw.base)
        errors = BrowserErrors()
        context, page = await open_app_page(browser, origin + "/", errors)
        try:
            await wait_for(page, "typeof rec !== 'undefined' && rec.subscribed === 1")
            await insert_items(dsn, 1, ["under a strict policy"])
            await wait_for(page, "rec.titles.length === 1")
            assert await rec(page, "errors") == []
        finally:
            await context.close()
        errors.check()


async def test_a_policy_without_the_gateway_in_connect_src_closes_the_client_saying_so(
    browser: Any, dsn: str
) -> None:
    """Chromium refuses the socket at once (readyState CLOSED, an error event, no close event):
    the client sat in "connecting" for its 10 s handshake wait, blamed "no welcome from the
    server" and tried again, forever, though nothing but the page's policy could change that."""
    pages: dict[str, str] = {}
    async with app_site(pages) as origin, running_gateway(dsn, allowed_origins=origin) as gw:
        # The common mistake: the gateway's script is allowed, its ws: URL is not.
        policy = f"default-src 'self'; script-src 'self' {gw.base} 'nonce-n0nce'"
        pages["/"] = CSP_PAGE.replace("POLICY", policy).replace("GW", gw.base)
        errors = BrowserErrors(tolerate=(CSP_BLOCKED,))
        context, page = await open_app_page(browser, origin + "/", errors)
        try:
            # well within the 10 s the client waits for a welcome
            await wait_for(
                page, "typeof rec !== 'undefined' && rec.states.includes('closed')", timeout_ms=5_000
            )
            assert await rec(page, "states") == ["connecting", "closed"]
            [error] = await rec(page, "errors")
            assert error["code"] == "closed"
            assert "connect-src" in error["message"] and gw.ws_url in error["message"], error
            assert gw.state.ctx is not None and gw.state.ctx.registry.sessions == {}
        finally:
            await context.close()
        errors.check()


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
