"""The browser client at /client/: gateway.js, gateway.mjs and the rooms script beside them
(gateway-rooms.js, .mjs) from gateway/static/, served
without their whole-line comments, gzipped for clients that take it, with an ETag so a
page's stale copy costs a 304."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent / "static"
SCRIPTS = ("gateway.js", "gateway.mjs", "gateway-rooms.js", "gateway-rooms.mjs")


def install(app: web.Application) -> None:
    """The /client/ routes, one per script."""
    for name in SCRIPTS:
        app.router.add_get(f"/client/{name}", _handler(name))


def client_script(name: str) -> bytes:
    """The browser client as served: the source without its whole-line ``//`` comments. They
    are for whoever reads gateway/static/; a page embedding the script need not download them
    (a third of its gzipped size)."""
    text = (STATIC / name).read_text(encoding="utf-8")
    return "".join(ln for ln in text.splitlines(keepends=True) if not ln.lstrip().startswith("//")).encode()


@dataclass(frozen=True)
class _Script:
    """A client script as served: plain and gzipped, each with its ETag."""

    plain: bytes
    gzipped: bytes
    etag: str
    gzip_etag: str


def _script(name: str) -> _Script:
    body = client_script(name)
    digest = hashlib.sha256(body).hexdigest()[:20]
    return _Script(body, gzip.compress(body, compresslevel=9, mtime=0), f'"{digest}"', f'"{digest}-gz"')


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header takes gzip (RFC 9110 section 12.5.3; ``q=0`` refuses)."""
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() not in ("gzip", "*"):
            continue
        q = params.strip().lower()
        if q.startswith("q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False


def _etag_matches(if_none_match: str, *etags: str) -> bool:
    """If-None-Match uses the weak comparison: ``W/"x"`` matches ``"x"``."""
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in tags or any(etag in tags for etag in etags)


def _handler(name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    script: list[_Script] = []  # read once, on first use

    async def handler(request: web.Request) -> web.StreamResponse:
        if not script:
            if not (STATIC / name).exists():
                raise web.HTTPNotFound(text=f"{name} is not installed")
            script.append(_script(name))
        s = script[0]
        # Every page that embeds the client downloads it: gzipped (a third of its size), and
        # revalidated with its ETag once max-age has passed, so a stale copy costs a 304.
        gz = _accepts_gzip(request.headers.get("Accept-Encoding", ""))
        # Allow-Origin *: a page on the application's own site imports gateway.mjs (and, through
        # it, gateway.js) from here, and browsers fetch module scripts with CORS. The files are
        # the same public code for everyone; who may connect is the WebSocket's Origin check.
        headers = {
            "Cache-Control": "public, max-age=300",
            "Access-Control-Allow-Origin": "*",
            "Vary": "Accept-Encoding",
            "ETag": s.gzip_etag if gz else s.etag,
        }
        if _etag_matches(request.headers.get("If-None-Match", ""), s.etag, s.gzip_etag):
            return web.Response(status=304, headers=headers)
        if gz:
            headers["Content-Encoding"] = "gzip"
        return web.Response(
            body=s.gzipped if gz else s.plain, content_type="text/javascript", headers=headers
        )

    return handler
