"""The React hooks (pg-ws-gateway/react) in a real Chromium, against the real gateway and PostgreSQL.

The page runs the npm package as packed (``npm pack`` of clients/js, unpacked: what a frontend
project installs) with React's UMD build from clients/js/node_modules (``make js``); an import
map gives the package's ``import ... from "react"`` that global React, so no bundler is needed.
The app renders in React.StrictMode, whose mount, unmount, mount of every effect is what trips
subscription code. Rows are committed with asyncpg; the test reads what React rendered (the DOM)
and what the hooks returned (``window.rec``). Page setup as in tests/test_browser_e2e.py.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from .browsertest import CHROMIUM, VIEWPORT, BrowserErrors, wait_for
from .gwtest import REPO, Gateway, insert_items, make_items_table, running_gateway, token
from .pgconn import pg_connect

pytest.importorskip("playwright.async_api")

PACKAGE = REPO / "clients" / "js"
REACT_UMD = {
    "react.js": PACKAGE / "node_modules" / "react" / "umd" / "react.development.js",
    "react-dom.js": PACKAGE / "node_modules" / "react-dom" / "umd" / "react-dom.development.js",
}

# Skipped before any fixture starts (a PostgreSQL, a browser) when what they need is missing.
pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}"),
    pytest.mark.skipif(
        shutil.which("npm") is None, reason="needs npm (Debian package npm) to pack clients/js"
    ),
    pytest.mark.skipif(
        not all(path.exists() for path in REACT_UMD.values()),
        reason="no React in clients/js/node_modules: run `make js`",
    ),
    pytest.mark.asyncio(loop_scope="module"),
]
# The package imports these names from "react"; the UMD build has them on window.React.
REACT_SHIM = """const R = window.React;
export default R;
export const { createContext, createElement, useCallback, useContext, useEffect, useRef, useState,
  useSyncExternalStore } = R;
"""

PAGE = """<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>react</title>
<script type="importmap">{"imports": {"react": "/pkg/react-shim.mjs",
  "pg-ws-gateway": "/pkg/gateway.mjs", "pg-ws-gateway/react": "/pkg/react.mjs"}}</script>
<script src="/pkg/react.js"></script>
<script src="/pkg/react-dom.js"></script>
<div id="root"></div>
<script type="module">
  import { connect } from "pg-ws-gateway";
  import { GatewayProvider, useConnectionState, usePresence, useTopic } from "pg-ws-gateway/react";

  const h = React.createElement;
  window.rec = {};
  const gw = window.gw = connect("/ws", { token: () => window.mintToken() });

  function Items({ topic, id, limit }) {
    const { rows, events, state, subscribed, error } = useTopic(topic, { limit });
    rec[id] = { titles: [...rows.values()].map((r) => r.title), ops: events.map((e) => e.op), state, subscribed,
                error: error && error.message };
    return h("ul", { id }, [...rows].map(([key, row]) => h("li", { key }, row.title)));
  }
  function Online({ id }) {
    const { users, error } = usePresence("presence:global");
    rec[id] = error ? error.message : [...users.keys()].sort();
    return h("p", { id }, [...users.keys()].join(","));
  }
  function State() {
    rec.state = useConnectionState();
    return h("p", { id: "state" }, rec.state);
  }
  function App() {
    const [topic, setTopic] = React.useState("room:1");
    const [second, setSecond] = React.useState(false);
    Object.assign(window, { setTopic, setSecond });
    // `second`: another component on room:1, keeping fewer events
    return h(GatewayProvider, { gateway: gw }, h(Items, { topic, id: "items", limit: 3 }),
             second && h(Items, { topic: "room:1", id: "items2", limit: 1 }),
             h(Online, { id: "online" }), h(Online, { id: "online2" }), h(State));
  }
  ReactDOM.createRoot(document.getElementById("root")).render(h(React.StrictMode, null, h(App)));
</script>"""


# useRoom: who is in room:1 with which colour; the colour is a state the test changes.
ROOM_PAGE = """<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>react</title>
<script type="importmap">{"imports": {"react": "/pkg/react-shim.mjs", "pg-ws-gateway": "/pkg/gateway.mjs",
  "pg-ws-gateway/rooms": "/pkg/gateway-rooms.mjs", "pg-ws-gateway/react": "/pkg/react.mjs"}}</script>
<script src="/pkg/react.js"></script>
<script src="/pkg/react-dom.js"></script>
<div id="root"></div>
<script type="module">
  import { connect } from "pg-ws-gateway";
  import "pg-ws-gateway/rooms";
  import { GatewayProvider, useConnectionState, useRoom } from "pg-ws-gateway/react";

  const h = React.createElement;
  window.rec = { messages: [] };
  const gw = window.gw = connect("/ws", { token: () => window.mintToken() });

  function Viewers() {
    const [color, setColor] = React.useState("teal");
    window.setColor = setColor;
    const { members, room, error } = useRoom("room:1", { state: color && { color },
      onMessage: (m) => rec.messages.push([m.from, m.data]) });
    window.room = room;
    rec.members = members.map((m) => [m.user, m.conns.map((c) => c.state.color)]);
    rec.error = error && error.message;
    return h("ul", { id: "viewers" }, members.map((m) => h("li", { key: m.user }, m.user)));
  }
  function State() {
    rec.state = useConnectionState();
    return null;
  }
  ReactDOM.createRoot(document.getElementById("root")).render(
    h(React.StrictMode, null, h(GatewayProvider, { gateway: gw }, h(Viewers), h(State))));
</script>"""


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The npm package as ``npm pack`` makes it, unpacked."""
    npm = shutil.which("npm")
    assert npm is not None  # pytestmark skips without it
    into = tmp_path_factory.mktemp("npm-pack")
    out = subprocess.run(
        [npm, "pack", "--json", "--pack-destination", str(into)],
        cwd=PACKAGE, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    [info] = json.loads(out.stdout)
    with tarfile.open(into / info["filename"]) as tar:
        tar.extractall(into, filter="data")
    return into / "package"


@pytest_asyncio.fixture(loop_scope="module")
async def items(dsn: str) -> str:
    await make_items_table(dsn, "'room:' || owner_id")
    return dsn


@contextlib.asynccontextmanager
async def react_page(
    browser: Any, gw: Gateway, packed: Path, mint: Callable[[], str], html: str = PAGE
) -> AsyncIterator[Any]:
    """The React app above, as a page under the gateway's origin; yields it once connected."""
    files = {name: path.read_bytes() for name, path in REACT_UMD.items()}
    files["react-shim.mjs"] = REACT_SHIM.encode()
    files.update((f.name, f.read_bytes()) for f in packed.iterdir() if f.suffix in (".js", ".mjs"))

    async def serve(route: Any) -> None:
        name = route.request.url.rsplit("/pkg/", 1)[1]
        if name in files:
            await route.fulfill(body=files[name], content_type="text/javascript")
        else:
            await route.fulfill(status=404, body=f"no {name}")

    context = await browser.new_context(viewport=VIEWPORT)
    errors = BrowserErrors()
    try:
        await context.route(gw.base + "/pkg/**", serve)
        await context.expose_function("mintToken", mint)
        page = await context.new_page()
        errors.watch(page)
        await page.goto(gw.base + "/healthz")
        await page.set_content(html)
        await wait_for(page, "window.rec && rec.state === 'open'")
        yield page
    finally:
        await context.close()
    errors.check()


async def wait_rendered(page: Any, titles: list[str], list_id: str = "items") -> None:
    """Wait until the list React rendered shows ``titles``, in order."""
    shown = f"JSON.stringify([...document.querySelectorAll('#{list_id} li')].map((li) => li.textContent))"
    await wait_for(page, f"{shown} === {json.dumps(json.dumps(titles, separators=(',', ':')))}")


def topics_held(gw: Gateway) -> list[set[str]]:
    ctx = gw.state.ctx
    assert ctx is not None
    return [set(s.topics) for s in ctx.registry.sessions.values()]


async def test_use_topic_renders_the_rows_as_they_are_committed(
    browser: Any, items: str, packed: Path
) -> None:
    dsn = items
    async with running_gateway(dsn, tables="public.items") as gw:
        mint = lambda: token("alice", topics=["room:1", "room:2"])  # noqa: E731
        async with react_page(browser, gw, packed, mint) as page:
            await wait_for(page, "rec.items.subscribed")
            assert topics_held(gw) == [{"room:1"}]  # StrictMode's double effect left one subscription

            await insert_items(dsn, 1, ["one", "two"])
            await insert_items(dsn, 2, ["elsewhere"])
            await wait_rendered(page, ["one", "two"])
            conn = await pg_connect(dsn)
            try:
                await conn.execute("UPDATE items SET title = 'uno' WHERE title = 'one'")
                await wait_rendered(page, ["uno", "two"])
                await conn.execute("DELETE FROM items WHERE title = 'two'")
                await wait_rendered(page, ["uno"])
            finally:
                await conn.close()
            view = await page.evaluate("rec.items")
            # the last 3 events (limit: 3), oldest first
            assert view == {"titles": ["uno"], "ops": ["insert", "update", "delete"], "state": "open",
                            "subscribed": True, "error": None}  # fmt: skip

            # Another topic: the old subscription ends, the rows start over.
            await page.evaluate("setTopic('room:2')")
            await wait_for(page, "rec.items.subscribed")
            await insert_items(dsn, 2, ["two's"])
            await wait_rendered(page, ["two's"])
            assert topics_held(gw) == [{"room:2"}]

            # No topic: no subscription.
            await page.evaluate("setTopic(null)")
            await wait_for(page, "!rec.items.subscribed")
            await wait_rendered(page, [])
            await wait_topics_held(gw, page, [set()])


async def wait_topics_held(gw: Gateway, page: Any, topics: list[set[str]]) -> None:
    """Wait until the gateway holds ``topics`` for its connections (unsubscribes take a round trip)."""
    for _ in range(250):
        if topics_held(gw) == topics:
            return
        await page.wait_for_timeout(20)
    assert topics_held(gw) == topics


async def test_components_on_one_topic_share_its_subscription(browser: Any, items: str, packed: Path) -> None:
    """The client takes one subscription per topic: a second useTopic of it must not be refused."""
    dsn = items
    async with running_gateway(dsn, tables="public.items") as gw:
        async with react_page(browser, gw, packed, lambda: token("alice", topics=["room:1"])) as page:
            await wait_for(page, "rec.items.subscribed")
            await insert_items(dsn, 1, ["before"])
            await wait_rendered(page, ["before"])

            await page.evaluate("setSecond(true)")
            # joins with what the first one has: no second subscription, no refusal
            await wait_rendered(page, ["before"], "items2")
            await insert_items(dsn, 1, ["after"])
            await wait_rendered(page, ["before", "after"])
            await wait_rendered(page, ["before", "after"], "items2")
            views = await page.evaluate("[rec.items, rec.items2]")
            assert [v["ops"] for v in views] == [["insert", "insert"], ["insert"]]  # each its own limit
            assert [v["error"] for v in views] == [None, None]
            assert topics_held(gw) == [{"room:1"}]

            # The first leaves; the second keeps the subscription, and its rows keep coming.
            await page.evaluate("setTopic(null)")
            await wait_rendered(page, [])
            await insert_items(dsn, 1, ["later"])
            await wait_rendered(page, ["before", "after", "later"], "items2")
            assert topics_held(gw) == [{"room:1"}]
            await page.evaluate("setSecond(false)")
            await wait_topics_held(gw, page, [set()])


async def test_use_topic_reports_a_forbidden_topic(browser: Any, items: str, packed: Path) -> None:
    async with running_gateway(items, tables="public.items") as gw:
        async with react_page(browser, gw, packed, lambda: token("alice", topics=["room:2"])) as page:
            await wait_for(page, "rec.items.error !== null")
            assert await page.evaluate("rec.items") == {
                "titles": [], "ops": [], "state": "open", "subscribed": False,
                "error": "user alice may not subscribe to room:1",
            }  # fmt: skip


async def test_use_presence_and_connection_state_follow_who_is_online(
    browser: Any, items: str, packed: Path
) -> None:
    async with running_gateway(items, tables="public.items", presence="true", presence_grace="0.5") as gw:

        def minter(user: str) -> Callable[[], str]:
            return lambda: token(user, topics=["room:1", "presence:*"])

        async with react_page(browser, gw, packed, minter("alice")) as alice:
            await wait_for(alice, "JSON.stringify(rec.online) === '[\"alice\"]'")
            async with react_page(browser, gw, packed, minter("bob")) as bob:
                await wait_for(alice, 'JSON.stringify(rec.online) === \'["alice","bob"]\'')
                assert await alice.locator("#online").inner_text() in ("alice,bob", "bob,alice")
                await wait_for(bob, 'JSON.stringify(rec.online) === \'["alice","bob"]\'')
            await wait_for(alice, "JSON.stringify(rec.online) === '[\"alice\"]'")
            assert await alice.locator("#state").inner_text() == "open"
            # a second component on the same presence topic shares its subscription
            assert await alice.evaluate("rec.online2") == ["alice"]

            # useConnectionState follows the connection: closed for good by the application.
            await alice.evaluate("gw.close()")
            await wait_for(alice, "document.querySelector('#state').textContent === 'closed'")


async def test_use_room_shows_who_is_there_with_their_state(browser: Any, items: str, packed: Path) -> None:
    async with running_gateway(items, tables="public.items", presence="true", presence_grace="0.5") as gw:

        def minter(user: str) -> Callable[[], str]:
            return lambda: token(user, topics=["room:*"], publish=["room:*"])

        async with react_page(browser, gw, packed, minter("alice"), ROOM_PAGE) as alice:
            # StrictMode entered the room twice and left once: one membership, one of each subscription.
            await wait_for(alice, 'JSON.stringify(rec.members) === \'[["alice",["teal"]]]\'')
            async with react_page(browser, gw, packed, minter("bob"), ROOM_PAGE) as bob:
                both = '[["alice",["teal"]],["bob",["teal"]]]'
                await wait_for(alice, f"JSON.stringify(rec.members) === {json.dumps(both)}")
                await bob.evaluate("setColor('plum')")
                both = '[["alice",["teal"]],["bob",["plum"]]]'
                await wait_for(alice, f"JSON.stringify(rec.members) === {json.dumps(both)}")
                assert topics_held(gw) == [{"room:1"}] * 2  # one subscription each, after StrictMode
                # null untracks: bob is no longer in the room, though still connected
                await bob.evaluate("setColor(null)")
                await wait_for(alice, 'JSON.stringify(rec.members) === \'[["alice",["teal"]]]\'')
            assert await alice.evaluate("rec.error") is None
