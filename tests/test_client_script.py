"""The browser client as the gateway serves it: at most 5 KB gzipped, as a page downloads it
(``clientscript.client_script``: the source without its whole-line comments), and at most
6.5 KB with the rooms script beside it; sent gzipped and revalidated with an ETag."""

from __future__ import annotations

import gzip
from pathlib import Path

import aiohttp

from gateway.clientscript import client_script

from .gwtest import running_gateway

STATIC = Path(__file__).resolve().parent.parent / "gateway" / "static"
LIMIT = 5 * 1024  # bytes, gzip level 9
# The core client with gateway-rooms.js (rooms: presence with state, messages): a separate
# script, so pages without rooms keep to LIMIT.
ROOMS_LIMIT = int(6.5 * 1024)


def gzipped_size(name: str) -> int:
    return len(gzip.compress(client_script(name), compresslevel=9))


def test_classic_script_is_at_most_5_kb_gzipped() -> None:
    size = gzipped_size("gateway.js")
    assert size <= LIMIT, f"gateway.js is {size} bytes gzipped, over the {LIMIT}-byte budget"


def test_module_build_is_at_most_5_kb_gzipped() -> None:
    # An ES module user downloads gateway.mjs and the gateway.js it imports.
    size = gzipped_size("gateway.mjs") + gzipped_size("gateway.js")
    assert size <= LIMIT, f"gateway.mjs + gateway.js are {size} bytes gzipped, over the {LIMIT}-byte budget"


def test_classic_scripts_with_rooms_are_at_most_6_5_kb_gzipped() -> None:
    size = gzipped_size("gateway.js") + gzipped_size("gateway-rooms.js")
    assert size <= ROOMS_LIMIT, f"gateway.js + gateway-rooms.js are {size} bytes gzipped, over {ROOMS_LIMIT}"


def test_module_build_with_rooms_is_at_most_6_5_kb_gzipped() -> None:
    # gateway-rooms.mjs imports gateway.mjs (so gateway.js) and gateway-rooms.js.
    size = sum(
        gzipped_size(n) for n in ("gateway.mjs", "gateway.js", "gateway-rooms.mjs", "gateway-rooms.js")
    )
    assert size <= ROOMS_LIMIT, (
        f"the rooms module and what it imports are {size} bytes gzipped, over {ROOMS_LIMIT}"
    )


def test_the_core_client_does_not_carry_the_rooms_code() -> None:
    # Rooms are a script of their own: the core only routes a room presence topic's frames to it.
    assert "class Room" not in (STATIC / "gateway.js").read_text()
    assert 'import "./gateway-rooms.js";' in (STATIC / "gateway-rooms.mjs").read_text()


def test_module_imports_the_classic_script() -> None:
    # One implementation: the module must re-export gateway.js, not carry a copy that drifts.
    source = (STATIC / "gateway.mjs").read_text()
    assert 'import "./gateway.js";' in source


# --- as served -------------------------------------------------------------------------------


async def test_the_client_script_is_served_gzipped_and_revalidated_with_an_etag(dsn: str) -> None:
    """Every page that embeds the client downloads it: gzipped it is under 5 KB
    (the tests above), so that is what the gateway must send, and a browser whose
    copy is stale after max-age revalidates it with a 304 instead of downloading it again."""
    async with running_gateway(dsn) as gw, aiohttp.ClientSession(auto_decompress=False) as http:
        for name in ("gateway.js", "gateway.mjs", "gateway-rooms.js", "gateway-rooms.mjs"):
            url = f"{gw.base}/client/{name}"
            async with http.get(url, headers={"Accept-Encoding": "gzip, deflate, br"}) as r:
                assert r.status == 200
                assert r.headers.get("Content-Encoding") == "gzip", dict(r.headers)
                assert "Accept-Encoding" in r.headers.get("Vary", "")
                assert r.headers["Access-Control-Allow-Origin"] == "*"
                body = await r.read()
                assert len(body) <= LIMIT
                assert gzip.decompress(body) == client_script(name)
                etag = r.headers["ETag"]
            # A client that does not take gzip gets the plain script.
            async with http.get(url, headers={"Accept-Encoding": "identity"}) as r:
                assert "Content-Encoding" not in r.headers
                assert await r.read() == client_script(name)
                plain_etag = r.headers["ETag"]
            async with http.get(url, headers={"Accept-Encoding": "gzip;q=0"}) as r:
                assert "Content-Encoding" not in r.headers
            # Revalidation: the ETag the browser kept gets a 304 without a body.
            for tag in (etag, plain_etag, f"W/{etag}", f'"nope", {etag}'):
                async with http.get(url, headers={"If-None-Match": tag, "Accept-Encoding": "gzip"}) as r:
                    assert r.status == 304, tag
                    assert await r.read() == b""
                    assert r.headers["ETag"] == etag
                    assert "max-age" in r.headers["Cache-Control"]
            async with http.get(url, headers={"If-None-Match": '"something-else"'}) as r:
                assert r.status == 200
