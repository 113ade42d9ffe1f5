"""The data plane's client to the co-located server: keep-alive HTTP/1.1 over loopback.

Small on purpose. The general clients (aiohttp, httpx) spend more CPU per request than the
rest of the agent's hop together (bench_proxy's profile: ~40% of the agent's CPU in aiohttp
alone); on a 2-core node that CPU is taken from the model server. This one writes a request
in one `transport.write` and parses the response with httptools (llhttp, C), which uvicorn
also uses.

Guarantees:
  * at most `max_connections` requests in flight (callers wait for a slot), and at most
    `max_per_key` of them for one key (the router's key is the model name), so one model's
    hanging requests cannot take every slot from the others;
  * `timeout` bounds the whole request: the wait for a slot (per key, then the pool), the
    connect and the exchange; a wait that outlasts it raises UpstreamBusy (a TimeoutError);
  * nothing unsafe reaches the wire: a request target or header with CR, LF, a space (in the
    target) or a byte outside visible ASCII is refused (UnsafeRequest) before it is written;
  * a connection is reused only after its answer completed, and never once it is desynced:
    any byte that arrives while it is idle or after its answer completed (a second answer)
    closes it, so no client can ever read an answer meant for another;
  * idle connections are reused newest first and dropped after `idle_timeout` (below the
    servers' own keep-alive timeout: uvicorn's, MLServer's, is 5 s);
  * a reused connection that the server closed before sending any byte of the answer is
    retried once on a fresh connection (nothing was served on it); any other failure is the
    caller's (UpstreamError), never retried, since an infer may not be idempotent;
  * each request is bounded by `timeout` seconds.
"""
from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from urllib.parse import urlsplit

import httptools


class UpstreamError(ConnectionError):
    """The server could not be reached or broke the connection mid-answer."""


class _Stale(UpstreamError):
    """A reused connection was closed before any byte of the answer."""


class _Desynced(Exception):
    """Raised inside the parser to stop it at an answer to no request."""


class UnsafeRequest(ValueError):
    """A request target or header that must not be written to the server (CR/LF, non-ASCII)."""


class UpstreamBusy(asyncio.TimeoutError):
    """No upstream slot came free within the request's timeout (says which bound was hit)."""


# request target: visible ASCII only (no space, CR, LF, controls, bytes >= 0x7f)
_UNSAFE_TARGET = re.compile(r"[^\x21-\x7e]")
# header names: visible ASCII without ':'; values: visible ASCII, space and tab
_UNSAFE_NAME = re.compile(rb"[^\x21-\x39\x3b-\x7e]")
_UNSAFE_VALUE = re.compile(rb"[^\x20-\x7e\t]")


def check_target(target: str) -> None:
    """Raise UnsafeRequest unless `target` is only visible ASCII (no space, CR, LF)."""
    if not target or _UNSAFE_TARGET.search(target):
        raise UnsafeRequest(f"request target {target[:80]!r} holds characters that cannot be forwarded")


def check_headers(headers: list[tuple[bytes, bytes]]) -> None:
    """Raise UnsafeRequest if a header name or value could break the request's framing."""
    for k, v in headers:
        if not k or _UNSAFE_NAME.search(k) or _UNSAFE_VALUE.search(v):
            raise UnsafeRequest(f"header {k[:40]!r} holds characters that cannot be forwarded")


class _Slots:
    """A counting semaphore whose waits end at a deadline (loop time) and that never loses a
    slot to a cancelled waiter; first come, first served."""

    __slots__ = ("free", "size", "_waiters")

    def __init__(self, size: int):
        self.free = self.size = size
        self._waiters: deque[asyncio.Future] = deque()

    async def take(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        fut = loop.create_future()
        self._waiters.append(fut)
        timer = loop.call_at(deadline, _expire, fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.give()  # handed a slot, then cancelled before using it: pass it on
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise
        finally:
            timer.cancel()

    def give(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the next waiter
                return
        self.free += 1

    def idle(self) -> bool:
        return self.free == self.size and not self._waiters


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
        self._complete = False
        self.keep_alive = False
        self.desynced = False

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
        if self._complete or self._waiter is None:
            # bytes on an idle connection, or after the answer completed: an answer to no
            # request of ours (a desynced server). Never read it, never reuse the connection.
            self._desync()
            return
        self._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if self.desynced:
                return  # parsing stopped at the second answer; ours is complete and kept
            self._abort(UpstreamError(f"unreadable answer from the server: {e}"))

    def _desync(self) -> None:
        self.desynced = self.closed = True
        if self.transport is not None:
            self.transport.close()

    def on_message_begin(self) -> None:
        if self._complete:  # a second answer in the same read: stop parsing here
            self._desync()
            raise _Desynced

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
        self._complete = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(status)

    # -- use
    def start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        self._headers, self._body = [], []
        self._got_bytes = self._headers_done = self._length_known = self._complete = False
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

    def __init__(self, base_url: str, *, max_connections: int = 256, max_per_key: int | None = None,
                 idle_timeout: float = 4.0, connect_timeout: float = 5.0):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://host:port, got {base_url!r}")
        self.base_url = base_url
        self._host, self._port = parts.hostname, parts.port
        self._host_header = parts.netloc.encode()
        self._idle: list[_Conn] = []
        self._all: set[_Conn] = set()
        self.max_connections = max_connections
        self.max_per_key = max(1, min(max_per_key or max_connections, max_connections))
        self._slots = _Slots(max_connections)
        self._key_slots: dict[str, _Slots] = {}
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout

    async def request(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes,
                      timeout: float, key: str = "") -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Send one request; (status, lower-cased response headers, body). `timeout` covers the
        waits for a slot, the connect and the answer. Raises UnsafeRequest (nothing sent),
        UpstreamBusy, UpstreamError or asyncio.TimeoutError."""
        check_target(target)
        check_headers(headers)
        head = b"".join(b"%s: %s\r\n" % (k, v) for k, v in headers)
        message = b"%s %s HTTP/1.1\r\nhost: %s\r\n%scontent-length: %d\r\n\r\n" % (
            method.encode(), target.encode("ascii"), self._host_header, head, len(body))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        key_slots = self._key_slots.get(key)
        if key_slots is None:
            key_slots = self._key_slots[key] = _Slots(self.max_per_key)
        try:
            await key_slots.take(loop, deadline)
        except asyncio.TimeoutError:
            raise UpstreamBusy(f"{self.max_per_key} requests to it already in flight for {timeout:g}s") from None
        try:
            try:
                await self._slots.take(loop, deadline)
            except asyncio.TimeoutError:
                raise UpstreamBusy(f"all {self.max_connections} server connections busy for {timeout:g}s") from None
            try:
                conn = self._take()
                if conn is not None:
                    try:
                        return await self._exchange(conn, message, body, deadline)
                    except _Stale:
                        pass  # nothing was served on it: once more on a fresh connection
                conn = await self._connect(deadline)
                return await self._exchange(conn, message, body, deadline)
            finally:
                self._slots.give()
        finally:
            key_slots.give()
            if key_slots.idle() and self._key_slots.get(key) is key_slots:
                del self._key_slots[key]

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

    async def _connect(self, deadline: float) -> _Conn:
        loop = asyncio.get_running_loop()
        left = deadline - loop.time()
        if left <= 0:
            raise asyncio.TimeoutError()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(_Conn, self._host, self._port),
                                             min(self._connect_timeout, left))
        except asyncio.TimeoutError:
            if loop.time() >= deadline:
                raise  # the request's own timeout, not the server's fault
            raise UpstreamError(f"cannot connect to {self.base_url}: TimeoutError") from None
        except OSError as e:
            raise UpstreamError(f"cannot connect to {self.base_url}: {type(e).__name__}") from None
        self._all.add(conn)
        return conn

    async def _exchange(self, conn: _Conn, message: bytes, body: bytes,
                        deadline: float) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        loop = asyncio.get_running_loop()
        waiter = conn.start(loop)
        assert conn.transport is not None
        conn.transport.write(message + body if len(body) < 65536 else message)
        if len(body) >= 65536:
            conn.transport.write(body)  # no copy of a large body
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            status = await waiter
        except BaseException:
            self._drop(conn)
            raise
        finally:
            timer.cancel()
        headers, payload = conn.result()
        if conn.closed or conn.desynced or not conn.keep_alive:
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
