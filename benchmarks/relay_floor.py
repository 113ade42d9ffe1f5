"""The floor of a Python data plane on uvloop: a relay that does nothing but move bytes.

    python benchmarks/relay_floor.py PORT UPSTREAM_HOST UPSTREAM_PORT

bench_proxy's `relay` target. Each client connection gets its own upstream connection (opened
when the client connects), and every read is written as it came to the other side: no parsing,
no routing, no lease, no pool, no answer composed, one Python callback per read. Whatever a
Python proxy on uvloop does per request, it pays at least this: the same reads and writes (the
kernel's work, as nginx pays it) plus uvloop's dispatch of each read into Python. Not a proxy
anyone should run (no HTTP framing: it only works because each connection carries one request
at a time, as wrk's do).
"""
from __future__ import annotations

import asyncio
import sys


class _Upstream(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport):
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    upstream: asyncio.Transport | None = None
    early = b""  # what the client sent before the upstream connection was open

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            upstream, _ = await asyncio.get_running_loop().create_connection(
                lambda: _Upstream(self.transport), self.host, self.port)
        except OSError:
            self.transport.close()
            return
        self.upstream = upstream  # type: ignore[assignment]
        if self.early:
            upstream.write(self.early)

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.early += data
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def main(port: int, host: str, upstream_port: int) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: _Client(host, upstream_port), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
