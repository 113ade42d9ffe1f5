"""The data plane's upstream client against a real loopback server that misbehaves on demand."""
from __future__ import annotations

import asyncio

import pytest

from agent.upstream import Upstream, UpstreamError


class Server:
    """A raw HTTP/1.1 server: answers each request per `mode`, counts connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.mode = "ok"  # ok | close-after | half-answer | slow | chunked
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> "Server":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        for w in self._writers:
            w.close()
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                self.requests += 1
                if self.mode == "half-answer":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
                    await writer.drain()
                    writer.close()
                    return
                if self.mode == "slow":
                    await asyncio.sleep(1)
                if self.mode == "chunked":
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/plain\r\n\r\n"
                                 b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                else:
                    answer = b"echo:" + body
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(answer), answer))
                await writer.drain()
                if self.mode == "close-after":  # like a server whose keep-alive timer fired
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass


def run(coro):
    return asyncio.run(coro)


def test_connections_are_reused():
    async def main():
        async with Server() as srv:
            up = Upstream(srv.url)
            for i in range(10):
                status, headers, body = await up.request("POST", "/x", [], b"%d" % i, timeout=5)
                assert (status, body) == (200, b"echo:%d" % i)
                assert (b"content-type", b"text/plain") in headers
            await up.close()
            return srv.connections
    assert run(main()) == 1


def test_a_connection_the_server_closed_is_retried_once_on_a_fresh_one():
    async def main():
        async with Server() as srv:
            srv.mode = "close-after"
            up = Upstream(srv.url)
            for _ in range(3):
                await asyncio.sleep(0.05)  # let the close arrive: the pooled connection is stale
                status, _, body = await up.request("POST", "/x", [], b"a", timeout=5)
                assert (status, body) == (200, b"echo:a")
            await up.close()
            return srv.requests
    assert run(main()) == 3  # each request served exactly once


def test_idle_connections_expire():
    async def main():
        async with Server() as srv:
            up = Upstream(srv.url, idle_timeout=0.05)
            await up.request("GET", "/", [], b"", timeout=5)
            await asyncio.sleep(0.1)
            await up.request("GET", "/", [], b"", timeout=5)
            await up.close()
            return srv.connections
    assert run(main()) == 2


def test_an_answer_broken_midway_is_an_error_not_a_retry():
    async def main():
        async with Server() as srv:
            srv.mode = "half-answer"
            up = Upstream(srv.url)
            with pytest.raises(UpstreamError, match="mid-answer"):
                await up.request("POST", "/x", [], b"a", timeout=5)
            await up.close()
            return srv.requests
    assert run(main()) == 1


def test_timeout_and_unreachable_server():
    async def main():
        async with Server() as srv:
            srv.mode = "slow"
            up = Upstream(srv.url)
            with pytest.raises(asyncio.TimeoutError):
                await up.request("GET", "/", [], b"", timeout=0.1)
            await up.close()
        dead = Upstream(srv.url)
        with pytest.raises(UpstreamError, match="cannot connect"):
            await dead.request("GET", "/", [], b"", timeout=1)
    run(main())


def test_chunked_answers_are_decoded():
    async def main():
        async with Server() as srv:
            srv.mode = "chunked"
            up = Upstream(srv.url)
            status, _, body = await up.request("GET", "/", [], b"", timeout=5)
            await up.close()
            return status, body
    assert run(main()) == (200, b"abcde")
