"""A loopback TCP proxy in front of PostgreSQL whose connections can be frozen one by one:
a frozen connection stays open but nothing crosses it any more (what a NAT that dropped the
flow, a partition, or a stalled peer looks like to the client). Loopback only."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit


class Pipe:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.frozen = False
        self.upstream_port = upstream.get_extra_info("sockname")[1]  # = pg_stat_activity.client_port

    def close(self) -> None:
        for w in (self.client, self.upstream):
            with contextlib.suppress(Exception):
                w.transport.abort()


class BlackholeProxy:
    def __init__(self, dsn: str) -> None:
        u = urlsplit(dsn)
        self._target = (u.hostname or "127.0.0.1", u.port or 5432)
        self._dsn = u
        self.pipes: list[Pipe] = []
        self.dsn = ""  # the proxy's own URL, once started
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        u = self._dsn
        auth = u.netloc.rpartition("@")[0]  # user[:password], as given
        netloc = (auth + "@" if auth else "") + f"127.0.0.1:{port}"
        self.dsn = urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))
        return self.dsn

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(*self._target)
        pipe = Pipe(cw, uw)
        self.pipes.append(pipe)
        for r, w in ((cr, uw), (ur, cw)):
            t = asyncio.ensure_future(self._pump(pipe, r, w))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pump(self, pipe: Pipe, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await r.read(65536)
                if not data:
                    break
                if pipe.frozen:
                    continue  # swallowed: the peer never hears of it, and nothing is reset
                w.write(data)
                await w.drain()
        except Exception:
            pass
        finally:
            if not pipe.frozen:
                pipe.close()

    def freeze_ports(self, upstream_ports: set[int]) -> int:
        n = 0
        for p in self.pipes:
            if p.upstream_port in upstream_ports:
                p.frozen = True
                n += 1
        return n

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for p in self.pipes:
            p.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
