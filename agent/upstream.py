"""The data plane's client to the co-located server: keep-alive HTTP/1.1 over loopback.

Small on purpose. The general clients (aiohttp, httpx) spend more CPU per request than the
rest of the agent's hop together (bench_proxy's profile: ~40% of the agent's CPU in aiohttp
alone); on a 2-core node that CPU is taken from the model server. This one writes a request
in one `transport.write` and parses the response with httptools (llhttp, C), which uvicorn
also uses.

Guarantees:
  * at most `max_connections` requests in flight (callers wait for a slot);
  * idle connections are reused newest first and dropped after `idle_timeout` (below the
    servers' own keep-alive timeout: uvicorn's, MLServer's, is 5 s);
  * a reused connection that the server closed before sending any byte of the answer is
    retried once on a fresh connection (nothing was served on it); any other failure is the
    caller's (UpstreamError), never retried, since an infer may not be idempotent;
  * each request is bounded by `timeout` seconds.
"""
from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import httptools


class UpstreamError(ConnectionError):
    """The server could not be reached or broke the connection mid-answer."""


class _Stale(UpstreamError):
    """A reused connection was closed before any byte of the answer."""


class _Conn(asyncio.Protocol):
    """One connection; httptools calls the on_* methods while parsing a response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._got_bytes = False
        self._headers_done = False
        self._length_known = False
        self.keep_alive = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._headers_done and not self._length_known:  # body delimited by the close
            waiter.set_result(self.parser.get_status_code())
        elif self._got_bytes:
            waiter.set_exception(UpstreamError("the server closed the connection mid-answer"))
        else:
            waiter.set_exception(_Stale("the server closed an idle connection"))

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._abort(UpstreamError(f"unreadable answer from the server: {e}"))

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in (b"content-length", b"transfer-encoding"):
            self._length_known = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            self._headers, self._body, self._headers_done = [], [], False
            return
        self.keep_alive = self.parser.should_keep_alive()  # only valid inside this callback
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(status)

    # -- use
    def start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        self._headers, self._body = [], []
        self._got_bytes = self._headers_done = self._length_known = False
        self.keep_alive = False
        self._waiter = loop.create_future()
        return self._waiter

    def result(self) -> tuple[list[tuple[bytes, bytes]], bytes]:
        self._waiter = None
        return self._headers, b"".join(self._body)

    def _abort(self, exc: Exception) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class Upstream:
    """A keep-alive connection pool to one server (`http://host:port`)."""

    def __init__(self, base_url: str, *, max_connections: int = 256, idle_timeout: float = 4.0,
                 connect_timeout: float = 5.0):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://host:port, got {base_url!r}")
        self.base_url = base_url
        self._host, self._port = parts.hostname, parts.port
        self._host_header = parts.netloc.encode()
        self._idle: list[_Conn] = []
        self._all: set[_Conn] = set()
        self._slots = asyncio.Semaphore(max_connections)
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout

    async def request(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes,
                      timeout: float) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Send one request; (status, lower-cased response headers, body). Raises UpstreamError
        or asyncio.TimeoutError."""
        head = b"".join(b"%s: %s\r\n" % (k, v) for k, v in headers)
        message = b"%s %s HTTP/1.1\r\nhost: %s\r\n%scontent-length: %d\r\n\r\n" % (
            method.encode(), target.encode("latin-1"), self._host_header, head, len(body))
        async with self._slots:
            conn = self._take()
            if conn is not None:
                try:
                    return await self._exchange(conn, message, body, timeout)
                except _Stale:
                    pass  # nothing was served on it: once more on a fresh connection
            conn = await self._connect()
            return await self._exchange(conn, message, body, timeout)

    async def close(self) -> None:
        for conn in list(self._all):
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
        self._all.clear()

    # -- internals
    def _take(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self._idle_timeout:
                return conn
            self._drop(conn)
        return None

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(_Conn, self._host, self._port),
                                             self._connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise UpstreamError(f"cannot connect to {self.base_url}: {type(e).__name__}") from None
        self._all.add(conn)
        return conn

    async def _exchange(self, conn: _Conn, message: bytes, body: bytes,
                        timeout: float) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        loop = asyncio.get_running_loop()
        waiter = conn.start(loop)
        assert conn.transport is not None
        conn.transport.write(message + body if len(body) < 65536 else message)
        if len(body) >= 65536:
            conn.transport.write(body)  # no copy of a large body
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            status = await waiter
        except BaseException:
            self._drop(conn)
            raise
        finally:
            timer.cancel()
        headers, payload = conn.result()
        if conn.closed or not conn.keep_alive:
            self._drop(conn)
        else:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        return status, headers, payload

    def _drop(self, conn: _Conn) -> None:
        conn.closed = True
        self._all.discard(conn)
        if conn.transport is not None:
            conn.transport.close()


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())
