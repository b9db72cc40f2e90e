"""/status (gateway/status.py) in a real Chromium against two real gateways, and over HTTP.

``UPDATE_STATUS_SCREENSHOT=1`` makes the browser test write its screenshot to
``docs/status.png`` (it always writes one under the test's tmp_path).

Chromium comes from the system (``/usr/bin/chromium``); Playwright never downloads a browser.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .browsertest import CHROMIUM
from .gwtest import REPO, running_gateway
from .polling import eventually

playwright_api = pytest.importorskip("playwright.async_api")

STATUS_TOKEN = "status-token-0123456789abcdef"
SCREENSHOT = REPO / "docs" / "status.png"
WAIT_MS = 20_000
# What clients use: none of it may reach the page.
USERS = ("alice-7f3a", "bob-91c2")
TOPICS = ("user:alice-7f3a", "orders:region-north-51")

# One browser for the module (starting Chromium is the slow part).
pytestmark = [pytest.mark.asyncio(loop_scope="module")]
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}")


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers or {}) as r:
        return r.status, dict(r.headers), await r.text()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_status_needs_its_token_and_is_off_without_one(dsn: str) -> None:
    async with running_gateway(dsn) as gw:
        status, _, _ = await get(gw.base + "/status", basic("ops", STATUS_TOKEN))
        assert status == 404  # no token set: no page
    async with running_gateway(dsn, status_token=STATUS_TOKEN) as gw:
        url = gw.base + "/status"
        for headers in (
            None,
            basic("ops", "wrong-token-0123456789"),
            basic("ops", STATUS_TOKEN[:-1]),
            {"Authorization": "Bearer " + STATUS_TOKEN + "x"},
            {"Authorization": "Basic not-base64!"},
        ):
            status, h, body = await get(url, headers)
            assert status == 401, headers
            assert h["WWW-Authenticate"].startswith("Basic realm=")
            assert "GATEWAY_STATUS_TOKEN" in body and "<table" not in body
        # Never from the URL (access logs, browser history).
        status, _, _ = await get(url + "?token=" + STATUS_TOKEN)
        assert status == 401
        for headers in (
            basic("ops", STATUS_TOKEN),
            basic("", STATUS_TOKEN),
            {"Authorization": "Bearer " + STATUS_TOKEN},
        ):
            status, h, body = await get(url, headers)
            assert status == 200, headers
            assert h["Content-Type"].startswith("text/html")
            assert "default-src 'none'" in h["Content-Security-Policy"]
            assert h["Cache-Control"] == "no-store"
            assert "pg-ws-gateway status" in body


@needs_chromium
async def test_status_page_in_chromium_shows_counts_and_states_never_users_or_topics(
    dsn: str, browser: Any, tmp_path: Path
) -> None:
    # Two replicas on one database: each sees the other through its presence heartbeat.
    async with (
        running_gateway(dsn, status_token=STATUS_TOKEN, presence="true") as gw,
        running_gateway(dsn, presence="true") as other,
    ):
        clients = [
            await gw.connect(USERS[0], topics=[TOPICS[0]]),
            await gw.connect(USERS[1], topics=[TOPICS[1]]),
        ]
        await clients[0].subscribe(TOPICS[0])
        await clients[1].subscribe(TOPICS[1])
        for replica in (gw, other):
            presence = replica.state.ctx.presence
            assert presence is not None
            await eventually(lambda p=presence: p.heartbeats >= 1, 10, "a first heartbeat")

        # With a wrong token Chromium gets the 401, and nothing of the page.
        context = await browser.new_context(http_credentials={"username": "ops", "password": "wrong" * 4})
        page = await context.new_page()
        response = await page.goto(gw.base + "/status")
        assert response is not None and response.status == 401
        assert "<table" not in await page.content()
        await context.close()

        context = await browser.new_context(
            http_credentials={"username": "ops", "password": STATUS_TOKEN},
            viewport={"width": 900, "height": 900},
        )
        page = await context.new_page()
        errors: list[str] = []
        requests: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("request", lambda r: requests.append(r.url))
        response = await page.goto(gw.base + "/status")
        assert response is not None and response.status == 200
        await page.wait_for_selector("h1", timeout=WAIT_MS)
        text = await page.inner_text("body")
        assert "2 authenticated, 2 sockets open" in text
        assert "2 on 2 topic(s)" in text
        assert "connected, 0 reconnection(s) (LISTEN)" in text
        relay_roles = {gw.state.relay.leader, other.state.relay.leader}
        assert relay_roles == {True, False}
        if gw.state.relay.leader:
            assert "leader" in text and "this replica, " in text
        else:
            assert "follower" in text and "another replica (" in text
        assert "Replicas seen through their heartbeats: 2" in text
        assert "(this one)" in text
        assert await page.locator("table.list tr").count() == 3  # a header and two replicas
        # Counts and states only.
        html = await page.content()
        for secret in (*USERS, *TOPICS, STATUS_TOKEN):
            assert secret not in html, secret
        # Self-contained: the page asked for nothing but itself (the favicon aside).
        assert [u for u in requests if not u.startswith(gw.base)] == []
        assert [u for u in requests if "favicon" not in u] == [gw.base + "/status"]
        assert errors == [], errors
        await page.screenshot(path=str(tmp_path / "status.png"), full_page=True)
        if os.environ.get("UPDATE_STATUS_SCREENSHOT"):
            shutil.copy(tmp_path / "status.png", SCREENSHOT)
        await context.close()
        for c in clients:
            await c.close()
