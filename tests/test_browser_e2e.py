"""End to end in a real Chromium: the browser client and the demo page against the REAL gateway.

Every test here runs the real gateway (in this process with ``running_gateway``, or as a child
process when it must be signalled) on a real PostgreSQL database of its own, and the real
``gateway/static/gateway.js`` in Chromium. Rows are committed with asyncpg, exactly as an
application would; what the page received is read back from arrays the page's callbacks fill.
``tests/test_browser_scripted.py`` covers the client's edge cases against a scripted stand-in
server, ``tests/test_browser_recovery.py`` its recovery from what the real gateway refuses.

Pages other than the demo are ``client_page``s of tests/browsertest.py: under the gateway's
origin, with a token function that mints a real token.

``UPDATE_DEMO_SCREENSHOT=1`` makes ``test_demo_page_shows_committed_rows_and_who_is_online``
write its screenshot to ``docs/demo.png`` (it always writes one under the test's tmp_path).

Chromium comes from the system (``/usr/bin/chromium``); Playwright never downloads a browser.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from gateway import protocol as p

from .browsertest import (
    BROWSER_TESTS,
    SOCKET_REFUSED,
    VIEWPORT,
    WAIT_MS,
    BrowserErrors,
    app_site,
    client_page,
    minter,
    rec,
    wait_for,
)
from .gwtest import REPO, DemoProcess, GatewayProcess, insert_items, make_items_table, running_gateway
from .pgconn import connection, pg_connect
from .polling import eventually

SCREENSHOT = REPO / "docs" / "demo.png"

pytestmark = BROWSER_TESTS


# --- the demo page, as `make demo` runs it ------------------------------------------------------


async def open_demo(browser: Any, base: str, name: str, errors: BrowserErrors) -> tuple[Any, Any]:
    context = await browser.new_context(viewport=VIEWPORT)
    # The page takes its user name from sessionStorage: a fixed one per context.
    await context.add_init_script(f"sessionStorage.setItem('demo-name', {name!r})")
    page = await context.new_page()
    errors.watch(page)
    await page.goto(base + "/demo")
    await page.wait_for_selector("#badge.open", timeout=WAIT_MS)
    return context, page


async def test_demo_page_shows_committed_rows_and_who_is_online(
    browser: Any, dsn: str, tmp_path: Path
) -> None:
    demo = DemoProcess(dsn, tmp_path / "demo.log", presence="true", presence_grace="0.5")
    await demo.start()
    errors = BrowserErrors()
    contexts = []
    try:
        context, alice = await open_demo(browser, demo.base, "alice", errors)
        contexts.append(context)
        assert await alice.text_content("#badge") == "live as alice"

        title = "Ship the browser test"  # the activity generator never makes this title
        async with connection(dsn) as conn:
            row_id = await conn.fetchval(
                "INSERT INTO public.demo_tasks (title, assignee) VALUES ($1, 'ada') RETURNING id", title
            )
        card = await alice.wait_for_selector(f".card[data-key='{row_id}']", timeout=WAIT_MS)
        assert title in (await card.text_content() or "")

        context, bob = await open_demo(browser, demo.base, "bob", errors)
        contexts.append(context)
        for page in (alice, bob):
            for name in ("alice", "bob"):
                await page.wait_for_selector(f"#users li:has-text('{name}')", timeout=WAIT_MS)
                # the board's room: each tab lists both viewers, each with its colour
                await page.wait_for_selector(f"#viewers li[data-user='{name}'] .swatch", timeout=WAIT_MS)

        # Bob's pointer over the board reaches alice's tab (ephemeral messages in the room),
        # drawn in the colour bob's tab tracks in the room's presence.
        box = await bob.locator("#room").bounding_box()
        assert box is not None
        for step in range(5):
            await bob.mouse.move(box["x"] + 300 + 20 * step, box["y"] + 120 + 10 * step)
            await bob.wait_for_timeout(100)
        cursor = alice.locator(".cursor:has-text('bob')")
        await cursor.wait_for(timeout=WAIT_MS)
        bob_color = await bob.input_value("#color")
        assert await cursor.evaluate("(el) => el.style.getPropertyValue('--c')") == bob_color

        # As `make demo` looks with a second tab open: live rows, two users online, and a few
        # changes from the demo's activity generator in the log.
        await alice.wait_for_function("document.querySelectorAll('#log li').length >= 4", timeout=WAIT_MS)
        shot = tmp_path / "demo.png"
        await alice.screenshot(path=str(shot))
        if os.environ.get("UPDATE_DEMO_SCREENSHOT") == "1":
            shutil.copyfile(shot, SCREENSHOT)
        assert await alice.text_content("#error") == ""
        assert await bob.text_content("#error") == ""

        # Bob closes his tab: he leaves the board's room, and his pointer goes with him.
        await contexts.pop().close()
        await alice.wait_for_selector("#viewers li[data-user='bob']", state="detached", timeout=WAIT_MS)
        await cursor.wait_for(state="detached", timeout=WAIT_MS)
    finally:
        for context in contexts:
            await context.close()
        await demo.stop()
    errors.check()


# Every user the page has listed under "Who's online" since this ran (the list is re-rendered
# on every presence change, so a name shown for a moment is caught too).
WATCH_USERS = """() => {
  window.listed = new Set();
  const note = () => document.querySelectorAll("#users li:not(.empty)").forEach(
    (li) => listed.add(li.firstChild.textContent.trim()));
  new MutationObserver(note).observe(document.getElementById("users"), { childList: true, subtree: true });
  note();
}"""


async def test_a_second_tab_shows_no_ghost_user(browser: Any, dsn: str, tmp_path: Path) -> None:
    """A new tab connects under the name chosen last in this browser, not a random one that
    would be listed to everyone, then linger as a ghost once the visitor typed their name."""
    demo = DemoProcess(dsn, tmp_path / "demo.log", presence="true", presence_grace="0.5")
    await demo.start()
    errors = BrowserErrors()
    context = await browser.new_context(viewport=VIEWPORT)
    try:
        first = await context.new_page()
        errors.watch(first)
        await first.goto(demo.base + "/demo")
        await first.wait_for_selector("#badge.open", timeout=WAIT_MS)
        name = await first.input_value("#name")  # a random name: the first visit
        await first.wait_for_selector(f"#users li:has-text('{name}')", timeout=WAIT_MS)
        await first.evaluate(WATCH_USERS)

        # The visitor opens a second tab (same browser: a sessionStorage of its own, the same
        # localStorage) and connects under another name.
        second = await context.new_page()
        errors.watch(second)
        await second.goto(demo.base + "/demo")
        await second.wait_for_selector("#badge.open", timeout=WAIT_MS)
        assert await second.text_content("#badge") == f"live as {name}"
        await second.fill("#name", "carol")
        await second.click("#who button[type=submit]")
        await second.wait_for_function(
            "document.getElementById('badge').textContent === 'live as carol'", timeout=WAIT_MS
        )
        await first.wait_for_selector("#users li:has-text('carol')", timeout=WAIT_MS)
        # Three times the presence grace: a name connected and left meanwhile would be gone
        # from the list by now, but not from what the first tab has seen.
        await asyncio.sleep(1.5)
        assert sorted(await first.evaluate("[...listed]")) == sorted([name, "carol"])

        # A tab opened later starts as the name chosen last; a reload keeps the tab's own name.
        third = await context.new_page()
        errors.watch(third)
        await third.goto(demo.base + "/demo")
        await third.wait_for_selector("#badge.open", timeout=WAIT_MS)
        assert await third.text_content("#badge") == "live as carol"
        await first.reload()
        await first.wait_for_selector("#badge.open", timeout=WAIT_MS)
        assert await first.text_content("#badge") == f"live as {name}"
    finally:
        await context.close()
        await demo.stop()
    errors.check()


# --- nothing lost or doubled across a gateway restart -------------------------------------------


async def test_every_row_arrives_once_across_a_gateway_restart(
    browser: Any, dsn: str, tmp_path: Path
) -> None:
    await make_items_table(dsn, "'room:' || owner_id")
    gateway = GatewayProcess(dsn, tmp_path / "gateway.log", tables="public.items", drain_timeout="2")
    await gateway.start()
    mint, _ = minter("alice", topics=["room:1"])
    committed: list[str] = []
    try:
        async with client_page(browser, gateway.base, mint, tolerate=(SOCKET_REFUSED,)) as page:
            await page.evaluate("subscribeTo('room:1')")
            await wait_for(page, "rec.subscribed.length === 1")

            writes_before_stop = asyncio.Event()
            restarted = asyncio.Event()

            async def writer() -> None:
                conn = await pg_connect(dsn)
                try:
                    n = 0

                    async def commit() -> None:
                        nonlocal n
                        n += 1
                        title = f"row {n:03d}"
                        await conn.execute("INSERT INTO items (owner_id, title) VALUES (1, $1)", title)
                        committed.append(title)
                        await asyncio.sleep(0.05)

                    for _ in range(10):  # while the gateway runs
                        await commit()
                    writes_before_stop.set()
                    while not restarted.is_set():  # while it drains, is down and starts again
                        await commit()
                    for _ in range(10):  # after it is back
                        await commit()
                finally:
                    await conn.close()

            async def restarter() -> None:
                await writes_before_stop.wait()
                gateway.signal(signal.SIGTERM)  # a deploy: drain (close 1012), then exit
                assert await gateway.wait_exit() == 0, gateway.log_path.read_text()[-3000:]
                gateway._close_log()
                count = len(committed)
                # some rows are committed while it is down
                await eventually(
                    lambda: len(committed) >= count + 5, WAIT_MS / 1000, "rows committed while it is down"
                )
                await gateway.start()
                restarted.set()

            await asyncio.gather(writer(), restarter())

            await wait_for(page, f"rec.events.length >= {len(committed)}")
            events = await rec(page, "events")
            titles = [e["title"] for e in events]
            assert titles == committed, f"missing {set(committed) - set(titles)}, got {titles}"
            positions = [e["pos"] for e in events]
            assert positions == sorted(set(positions)), positions
            assert all(e["op"] == "insert" for e in events)

            # The client saw the restart and resumed where it was, with nothing to reload.
            states = await rec(page, "states")
            assert "reconnecting" in states
            subscribed = await rec(page, "subscribed")
            assert len(subscribed) >= 2
            assert subscribed[-1]["recovered"] is True
            assert await rec(page, "appErrors") == []
    finally:
        await gateway.stop()


# --- a token about to expire is refreshed in band -----------------------------------------------


async def test_short_lived_token_is_refreshed_on_the_same_connection(browser: Any, dsn: str) -> None:
    await make_items_table(dsn, "'room:' || owner_id")
    async with running_gateway(dsn, tables="public.items", expiry_grace="0.5", jwt_leeway="0") as gw:
        mint, minted = minter("alice", ttl=3, topics=["room:1"])
        async with client_page(browser, gw.base, mint) as page:
            await page.evaluate("subscribeTo('room:1')")
            await wait_for(page, "rec.subscribed.length === 1")
            [conn_id] = await rec(page, "conns")

            # Several token lifetimes: without an in-band refresh the gateway closes the socket
            # (4005) half a second after each token expires. A real wait, not the page's clock:
            # the tokens expire by the gateway's clock.
            await asyncio.sleep(8)
            await insert_items(dsn, 1, ["after the refreshes"])
            await wait_for(page, "rec.events.length === 1")

            assert (await rec(page, "events"))[0]["title"] == "after the refreshes"
            registry = gw.state.ctx.registry
            expired = registry.closed_by_code[p.CloseCode.TOKEN_EXPIRED]
            assert expired == 0, (
                f"the gateway closed {expired} connection(s) with 4005 (token expired): the client "
                f"did not refresh in time; {len(minted)} token(s) minted"
            )
            assert await rec(page, "states") == ["connecting", "open"]
            assert await page.evaluate("gw.conn") == conn_id
            assert conn_id in registry.sessions
            assert len(minted) >= 3, "the first token and at least two refreshes"
            assert await rec(page, "appErrors") == []


# --- embedded in another site as an ES module --------------------------------------------------


# The application's page: it imports the client module from the gateway (GW: its address).
APP_PAGE = """<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>app</title>
<script type="module">
  import { connect } from "GW/client/gateway.mjs";
  window.rec = { titles: [], subscribed: 0 };
  const gw = connect("GW/ws".replace(/^http/, "ws"), { token: () => window.mintToken() });
  gw.subscribe("room:1", (e) => rec.titles.push(e.row.title), { onSubscribed: () => rec.subscribed++ });
</script>"""


async def test_a_page_of_another_origin_imports_the_module_from_the_gateway(browser: Any, dsn: str) -> None:
    """Browsers load module scripts with CORS: without the gateway's Allow-Origin header the
    import fails and the page never connects."""
    await make_items_table(dsn, "'room:' || owner_id")
    pages: dict[str, str] = {}
    async with (
        app_site(pages) as origin,
        running_gateway(dsn, tables="public.items", allowed_origins=origin) as gw,
    ):
        pages["/"] = APP_PAGE.replace("GW", gw.base)
        mint, _ = minter("alice", topics=["room:1"])
        context = await browser.new_context(viewport=VIEWPORT)
        errors = BrowserErrors()
        try:
            await context.expose_function("mintToken", mint)
            page = await context.new_page()
            errors.watch(page)
            await page.goto(origin + "/")
            await wait_for(page, "typeof rec !== 'undefined' && rec.subscribed === 1")
            await insert_items(dsn, 1, ["from the app's own site"])
            await wait_for(page, "rec.titles.length === 1")
            assert await rec(page, "titles") == ["from the app's own site"]
        finally:
            await context.close()
        errors.check()


# --- a forbidden topic is reported once, never retried ------------------------------------------


async def test_forbidden_topic_is_reported_once_and_not_retried(browser: Any, dsn: str) -> None:
    await make_items_table(dsn, "'room:' || owner_id")
    async with running_gateway(dsn, tables="public.items") as gw:
        mint, _ = minter("alice", topics=["room:1"])
        async with client_page(browser, gw.base, mint) as page:
            # The forbidden topic first: after a reconnect the client resubscribes in this
            # order and the gateway answers one frame at a time, so had room:2 been sent again,
            # its error would arrive before room:1's second "subscribed".
            await page.evaluate("subscribeTo('room:2'); subscribeTo('room:1')")
            await wait_for(page, "rec.errors.length === 1 && rec.subscribed.length === 1")
            [error] = await rec(page, "errors")
            assert error["code"] == "forbidden"
            assert error["topic"] == "room:2"
            assert "room:2" in error["message"]

            ctx = gw.state.ctx
            assert ctx is not None
            for session in list(ctx.registry.sessions.values()):
                await session.close(p.CloseCode.SERVICE_RESTART, "test: reconnect")
            await wait_for(page, "rec.conns.length === 2 && rec.subscribed.length === 2")
            assert [s["topic"] for s in await rec(page, "subscribed")] == ["room:1", "room:1"]

            # A row on the allowed topic still arrives; nothing about room:2 came back.
            await insert_items(dsn, 1, ["allowed"])
            await wait_for(page, "rec.events.length === 1")
            assert await rec(page, "errors") == [error]
            assert await rec(page, "appErrors") == []
            assert [s.topics for s in ctx.registry.sessions.values()] == [{"room:1"}]


# --- presence across two browsers ---------------------------------------------------------------


async def test_two_users_see_each_other_online_then_offline(browser: Any, dsn: str) -> None:
    async with running_gateway(dsn, presence="true", presence_grace="0.5") as gw:
        mint_alice, _ = minter("alice", topics=["presence:*"])
        mint_bob, _ = minter("bob", topics=["presence:*"])
        async with client_page(browser, gw.base, mint_alice) as alice:
            await alice.evaluate("watchPresence('presence:global')")
            await wait_for(alice, "rec.online !== null && rec.online.includes('alice')")

            async with client_page(browser, gw.base, mint_bob) as bob:
                await bob.evaluate("watchPresence('presence:global')")
                both = "JSON.stringify(rec.online) === JSON.stringify(['alice', 'bob'])"
                await wait_for(bob, both)
                await wait_for(alice, both)

            # Bob's browser is gone: after the grace, alice sees him offline.
            await wait_for(alice, "JSON.stringify(rec.online) === JSON.stringify(['alice'])")
            changes = await rec(alice, "changes")
            assert ["bob", "online"] in changes
            assert changes[-1] == ["bob", "offline"]
            assert await rec(alice, "appErrors") == []
