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

Without a task: `ready_now(key)` says whether a request would get its slots and an idle
connection without waiting, and `send_now(...)` sends it at once and calls back with the
answer (the data plane's fast path, agent.router.Router.fast_forward); the bounds, the
timeout and the desync rules above are the same ones, and a reused connection that the server
closed before any byte of the answer is reported (None), never silently retried. Per request it
costs no Future, no done-callback and no timer: the connection calls back when httptools has
read the whole answer (or on the error), with the connection already back in the pool when
clean, and one timer per connection watches the deadlines, moved on lazily when it fires early
for a request that began after it was armed; only the answer's headers the caller names are
read, by a find per name.

Two streaming modes, both on a fresh connection (nothing is retried once a client's byte was
forwarded) and both holding their slots until they end:
  * a request body given as a BodySource (its declared length and an async chunk reader) is
    written chunk by chunk as the client sends it, waiting for the socket to drain between
    chunks, so a large body is never held whole in the agent; an early answer from the server
    stops the upload, and a body shorter than declared drops the connection;
  * `stream()` yields the answer's status and headers as soon as they arrive and then its body
    chunks as the server sends them (server-sent events pass through unbuffered); the wait
    for the first byte and each gap between chunks are bounded by `timeout`, and reading
    stops (the socket is paused) while the caller has 16 chunks it has not taken.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable
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
# header lines as send_now() joins them (name NUL value CRLF), every name and value in the safe form above
_SAFE_FIELDS = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+\0[\x20-\x7e\t]*\r\n)*")


def check_target(target: str) -> None:
    """Raise UnsafeRequest unless `target` is only visible ASCII (no space, CR, LF)."""
    if not target or _UNSAFE_TARGET.search(target):
        raise UnsafeRequest(f"request target {target[:80]!r} holds characters that cannot be forwarded")


def check_headers(headers: list[tuple[bytes, bytes]]) -> None:
    """Raise UnsafeRequest if a header name or value could break the request's framing."""
    for k, v in headers:
        if not k or _UNSAFE_NAME.search(k) or _UNSAFE_VALUE.search(v):
            raise UnsafeRequest(f"header {k[:40]!r} holds characters that cannot be forwarded")


@dataclass
class BodySource:
    """A request body read while it is forwarded: `length` bytes (the client's Content-Length),
    or, with `length` None, chunked transfer encoding up to `limit` bytes; `read()` returns the
    next chunk (b"" at the end)."""

    length: int | None
    read: Callable[[], Awaitable[bytes]]
    limit: int | None = None


class BodyIncomplete(UpstreamError):
    """The client's body ended before its declared length (or its read failed)."""


class BodyTooLarge(BodyIncomplete):
    """A chunked body went past its BodySource.limit (what was sent is abandoned)."""


_STREAM_QUEUE = 16  # answer chunks buffered before reading from the server pauses


class _Slots:
    """A counting semaphore whose waits end at a deadline (loop time) and that never loses a
    slot to a cancelled waiter; first come, first served."""

    __slots__ = ("free", "size", "_waiters")

    def __init__(self, size: int):
        self.free = self.size = size
        self._waiters: deque[asyncio.Future] = deque()

    async def take(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if self.try_take():
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

    def try_take(self) -> bool:
        """Take a slot if one is free now and nobody waits for one."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

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
        self.loop: asyncio.AbstractEventLoop | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._head = bytearray()  # the answer's bytes until its head is complete
        self._body: list[bytes] = []
        self._got_bytes = False
        self._headers_done = False
        self._length_known: bool | None = False
        self._low_head = b""  # the kept-headers read's lower-cased read, its head up to _head_end (see _length_is_known)
        self._head_end = 0
        self._complete = False
        self.keep_alive = False
        self.desynced = False
        self._streaming = False  # stream(): chunks go to _chunks as they arrive
        self._chunks: deque[bytes | BaseException | None] = deque()
        self._chunk_ready: asyncio.Future | None = None
        self._paused = False
        self._writable: asyncio.Future | None = None  # set while the socket's buffer is full
        # send_now(): the request's end is a call, not a Future (see _settle)
        self._keep: tuple[tuple[bytes, bytes, int], ...] | None = None  # (b"\nname:", name, its length) of the answer's headers it keeps
        self.pool: Upstream | None = None
        self._done: Callable[..., None] | None = None
        self._key = ""
        self._key_slots: _Slots | None = None
        self._status = 0
        self.deadline = 0.0  # send_now(): when the request in flight times out (loop time)
        self._timer: asyncio.TimerHandle | None = None  # one per connection, re-armed lazily
        self._timer_at = 0.0

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # kept for send_now(): on Python 3.11 every get_running_loop() is a getpid() syscall
        self.loop = asyncio.get_running_loop()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    async def drain(self) -> None:
        """Wait until the socket takes more bytes (asyncio's flow control)."""
        if self._writable is not None:
            await self._writable

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.resume_writing()
        if self._streaming and self._headers_done and not self._complete:
            self._complete = True
            self._push(None if not self._length_is_known() else UpstreamError("the server closed the connection mid-answer"))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter = self._waiter
        if (waiter is None or waiter.done()) and self._done is None:
            return
        if self._headers_done and not self._length_is_known():  # body delimited by the close
            outcome: int | BaseException = self.parser.get_status_code()
        elif self._got_bytes:
            outcome = UpstreamError("the server closed the connection mid-answer")
        else:
            outcome = _Stale("the server closed an idle connection")
        if self._done is not None:
            self._settle(outcome)
        elif isinstance(outcome, int):
            waiter.set_result(outcome)
        else:
            waiter.set_exception(outcome)

    def _length_is_known(self) -> bool:
        """Whether the answer's head gave its body's length (Content-Length or Transfer-Encoding)."""
        if self._length_known is None:  # on_headers_complete's kept-headers read left it for here
            low, end = self._low_head, self._head_end
            self._length_known = low.find(b"\ncontent-length:", 0, end) >= 0 or low.find(b"\ntransfer-encoding:", 0, end) >= 0
        return self._length_known

    def data_received(self, data: bytes) -> None:
        if self._complete or (self._waiter is None and self._done is None):
            # bytes on an idle connection, or after the answer completed: an answer to no
            # request of ours (a desynced server). Never read it, never reuse the connection.
            self._desync()
            return
        self._got_bytes = True
        if not self._headers_done:
            self._head += data  # read whole in on_headers_complete (may hold body bytes too)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if not self.desynced:  # (a desync stopped parsing at a second answer: ours is complete)
                self._abort(UpstreamError(f"unreadable answer from the server: {e}"))
                return
        if self._complete and self._done is not None:  # last: the callback may start the next request on
            done, self._done = self._done, None  # this connection (_settle written out: once per request)
            self.pool._fast_end(self, self._status, self._key, self._key_slots, done)  # type: ignore[union-attr,arg-type]

    def _desync(self) -> None:
        self.desynced = self.closed = True
        if self.transport is not None:
            self.transport.close()

    def on_message_begin(self) -> None:
        if self._complete:  # a second answer in the same read: stop parsing here
            self._desync()
            raise _Desynced

    # -- httptools callbacks (no on_header: a Python call per header line, a dozen per MLServer
    # answer; the head httptools has validated is split here in one go instead)
    def on_headers_complete(self) -> None:
        self._headers_done = True
        head = self._head
        if self._keep is not None and self.parser.get_status_code() >= 200:
            # send_now(): only the headers the caller keeps, found by name in the head (a find
            # per name, not a Python step per header line: MLServer sends a dozen, the data
            # plane passes on two or three); one copy of the read, body bytes and all: every
            # find stops at the head's end
            raw = bytes(head)
            end = raw.find(b"\r\n\r\n") + 2
            if end >= 2:
                low = raw.lower()
                found = []
                folded = False
                for needle, name, size in self._keep:
                    i = low.find(needle, 0, end)
                    while i >= 0:
                        stop = low.find(b"\n", i + size)
                        found.append((i, name, raw[i + size:stop].strip(b" \t\r")))
                        # an obsolete folded line continues a header: only one of ours matters (a
                        # continuation starts with a space or tab, so it never matches a needle)
                        folded = folded or raw[stop + 1:stop + 2] in (b" ", b"\t")
                        i = low.find(needle, stop, end)
                if not folded:
                    head.clear()
                    self._low_head, self._head_end = low, end  # whether the body's length is known: read
                    self._length_known = None  # only if the connection closes mid-answer (_length_is_known)
                    if len(found) > 1:
                        found.sort()
                        self._headers = [(name, value) for _, name, value in found]
                    elif found:
                        self._headers = [found[0][1:]]
                    return
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            cut = end + 4
            lines = bytes(head[:end]).split(b"\r\n")
        else:  # bare line feeds
            end = head.find(b"\n\n")
            cut = end + 2 if end >= 0 else len(head)
            lines = [x.rstrip(b"\r") for x in bytes(head[:end if end >= 0 else cut]).split(b"\n")]
        if self.parser.get_status_code() < 200:
            del head[:cut]  # an interim head: what follows it is the real answer's
        else:
            head.clear()  # body bytes: on_body has them; an idle pooled connection holds none
        headers = self._headers
        for line in lines[1:]:  # after the status line
            if line[:1] in (b" ", b"\t") and headers:  # an obsolete folded continuation
                name, value = headers[-1]
                headers[-1] = (name, (value + b" " + line.strip(b" \t")).strip(b" \t"))
                continue
            name, _, value = line.partition(b":")
            name = name.lower()
            if name == b"content-length" or name == b"transfer-encoding":
                self._length_known = True
            headers.append((name, value.strip(b" \t")))
        if self._streaming and self.parser.get_status_code() >= 200:
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if self._streaming:
            self._push(body)
        else:
            self._body.append(body)

    def _push(self, item: bytes | BaseException | None) -> None:
        self._chunks.append(item)
        ready = self._chunk_ready
        if ready is not None and not ready.done():
            ready.set_result(None)
        if len(self._chunks) >= _STREAM_QUEUE and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    async def next_chunk(self, timeout: float) -> bytes | None:
        """stream(): the next body chunk as it arrives; None at the end of the answer."""
        while not self._chunks:
            loop = asyncio.get_running_loop()
            self._chunk_ready = loop.create_future()
            timer = loop.call_later(timeout, _expire, self._chunk_ready)
            try:
                await self._chunk_ready
            finally:
                timer.cancel()
                self._chunk_ready = None
        item = self._chunks.popleft()
        if self._paused and len(self._chunks) < _STREAM_QUEUE // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        if isinstance(item, BaseException):
            raise item
        return item

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            self._headers, self._body, self._headers_done = [], [], False
            self._length_known = False
            return
        self.keep_alive = self.parser.should_keep_alive()  # only valid inside this callback
        self._complete = True
        self._status = status
        if self._streaming:
            self._push(None)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(status)

    # -- use
    def start(self, loop: asyncio.AbstractEventLoop, streaming: bool = False) -> asyncio.Future:
        self._streaming = streaming
        self._keep = None
        self._chunks.clear()
        self._headers, self._body = [], []
        self._head.clear()
        self._got_bytes = self._headers_done = self._length_known = self._complete = False
        self.keep_alive = False
        self._waiter = loop.create_future()
        return self._waiter

    def start_now(self, done: Callable[..., None], key: str, key_slots: "_Slots", deadline: float,
                  keep: tuple[tuple[bytes, bytes, int], ...] | None) -> None:
        """send_now(): the answer (its status) or the error that ends the request goes to
        Upstream._fast_end from the connection's own callbacks; `deadline` (loop time) is
        watched by one timer per connection, re-armed lazily (_deadline)."""
        self._streaming = False
        self._headers, self._body = [], []
        self._head.clear()
        self._got_bytes = self._headers_done = self._length_known = self._complete = self.keep_alive = False
        self._done, self._key, self._key_slots, self._keep = done, key, key_slots, keep
        self.deadline = deadline
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._deadline)

    def _deadline(self) -> None:
        """The connection's timer: the request in flight ends with a TimeoutError once its own
        deadline passed; before that (the timer was armed for an earlier request) the timer
        moves on to this request's deadline; idle, it stops."""
        self._timer = None
        if self._done is None:
            return
        if self.loop.time() >= self.deadline:
            self._settle(asyncio.TimeoutError())
        else:
            self._timer_at = self.deadline
            self._timer = self.loop.call_at(self.deadline, self._deadline)

    def _settle(self, outcome: int | BaseException) -> None:
        done = self._done
        if done is None:
            return
        self._done = None
        assert self.pool is not None and self._key_slots is not None
        self.pool._fast_end(self, outcome, self._key, self._key_slots, done)

    def result(self) -> tuple[list[tuple[bytes, bytes]], bytes]:
        self._waiter = None
        body = self._body
        return self._headers, body[0] if len(body) == 1 else b"".join(body)

    def _abort(self, exc: Exception) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()
        self._settle(exc)


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
        self._prefixes: dict[tuple[str, str], bytes] = {}
        self._keeps: dict[tuple[bytes, ...], tuple[tuple[bytes, bytes, int], ...]] = {}
        self._heads: dict[tuple[str, str, tuple[tuple[bytes, bytes], ...], frozenset[bytes] | None], bytes] = {}

    async def request(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes | BodySource,
                      timeout: float, key: str = "") -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Send one request; (status, lower-cased response headers, body). `timeout` covers the
        waits for a slot, the connect and the answer. Raises UnsafeRequest (nothing sent),
        UpstreamBusy, UpstreamError (BodyIncomplete: the client's body fell short) or
        asyncio.TimeoutError."""
        message = self._head(method, target, headers, body)
        deadline = asyncio.get_running_loop().time() + timeout
        async with self._slot(key, deadline, timeout):
            if isinstance(body, BodySource):  # a client's bytes are read once: never a retry
                return await self._exchange(await self._connect(deadline), message, body, deadline)
            conn = self._take()
            if conn is not None:
                try:
                    return await self._exchange(conn, message, body, deadline)
                except _Stale:
                    pass  # nothing was served on it: once more on a fresh connection
            conn = await self._connect(deadline)
            return await self._exchange(conn, message, body, deadline)

    @contextlib.asynccontextmanager
    async def stream(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes | BodySource,
                     timeout: float, key: str = "") -> AsyncIterator["StreamedAnswer"]:
        """Send one request on a fresh connection; yield its answer once the status and headers
        arrived, its body read with `StreamedAnswer.next_chunk()` as the server sends it. The
        slots are held until the block ends; a connection whose answer was not read to its end
        is closed, never reused."""
        message = self._head(method, target, headers, body)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._slot(key, deadline, timeout):
            conn = await self._connect(deadline)
            waiter = conn.start(loop, streaming=True)
            try:
                await self._write(conn, message, body, deadline, waiter)
                timer = loop.call_at(deadline, _expire, waiter)
                try:
                    status = await waiter
                finally:
                    timer.cancel()
                yield StreamedAnswer(status, list(conn._headers), conn, timeout)
            finally:
                # a stream is never pooled: whatever its state, the connection ends with it
                conn._waiter = None
                self._drop(conn)

    def _head(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes | BodySource) -> bytes:
        check_target(target)
        check_headers(headers)
        head = b"".join(b"%s: %s\r\n" % (k, v) for k, v in headers)
        if isinstance(body, BodySource) and body.length is None:
            framing = b"transfer-encoding: chunked"
        else:
            framing = b"content-length: %d" % (body.length if isinstance(body, BodySource) else len(body))
        return b"%s %s HTTP/1.1\r\nhost: %s\r\n%s%s\r\n\r\n" % (
            method.encode(), target.encode("ascii"), self._host_header, head, framing)

    @contextlib.asynccontextmanager
    async def _slot(self, key: str, deadline: float, timeout: float) -> AsyncIterator[None]:
        """Hold one of `key`'s slots, then one of the pool's, until the block ends."""
        loop = asyncio.get_running_loop()
        key_slots = self._key_slot(key)
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
                yield
            finally:
                self._slots.give()
        finally:
            self._give_key(key, key_slots)

    def _key_slot(self, key: str) -> _Slots:
        key_slots = self._key_slots.get(key)
        if key_slots is None:
            key_slots = self._key_slots[key] = _Slots(self.max_per_key)
        return key_slots

    def _give_key(self, key: str, key_slots: _Slots) -> None:
        key_slots.give()
        if key_slots.idle() and self._key_slots.get(key) is key_slots:
            del self._key_slots[key]

    # -- the fast path: no task, no await
    def ready_now(self, key: str = "") -> bool:
        """Whether send_now() for `key` would get its slots and an idle connection at once."""
        key_slots = self._key_slots.get(key)
        if key_slots is not None and (key_slots.free <= 0 or key_slots._waiters):
            return False
        if self._slots.free <= 0 or self._slots._waiters:
            return False
        now = time.monotonic()
        while self._idle:  # the newest idle connection is the one send_now() takes
            conn = self._idle[-1]
            if not conn.closed and now - conn.idle_since < self._idle_timeout:
                return True
            self._drop(self._idle.pop())
        return False

    def send_now(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes, timeout: float,
                 key: str, done: Callable[[tuple[int, list[tuple[bytes, bytes]], bytes] | BaseException | None], None],
                 keep: tuple[bytes, ...] | None = None) -> bool:
        """Send one request on an idle connection now, if ready_now(key); False (nothing taken,
        nothing sent) otherwise. `done` is called once, from the loop, with (status, lower-cased
        headers, body), with the exception that ended the request (UpstreamError,
        asyncio.TimeoutError after `timeout` seconds), or with None when the reused connection
        had been closed by the server before any byte of the answer (nothing was served: the
        caller may send the request again). With `keep` (lower-cased names), only the
        answer's headers of those names are read, in the order they came. The slots are given back before `done` runs; the
        connection is back in the pool (when clean) before `done` runs, so `done` may send the
        next request at once. No Future, no task and no timer per request: the connection calls
        back when httptools has read the whole answer, and one timer per connection watches
        the deadline.
        Raises UnsafeRequest before anything is taken."""
        if not self.ready_now(key):
            return False
        self.send_ready(method, target, headers, body, timeout, key, done, keep)
        return True

    def send_ready(self, method: str, target: str, headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...],
                   body: bytes, timeout: float,
                   key: str, done: Callable[[tuple[int, list[tuple[bytes, bytes]], bytes] | BaseException | None], None],
                   keep: tuple[bytes, ...] | None = None, allow: frozenset[bytes] | None = None) -> None:
        """send_now() for a caller that has just seen ready_now(key) true, with nothing run on
        the loop since (the fast path checks it before leasing the model, and does not check it
        twice). `allow`: only the headers of those (lower-case) names are sent. Raises
        UnsafeRequest before anything is taken."""
        if type(headers) is tuple:  # a head the caller has seen before (agent.app's parse): its lines were made once
            head = self._heads.get((method, target, headers, allow)) or self._head_of(method, target, headers, allow)
        else:
            head = (self._prefixes.get((method, target)) or self._prefix(method, target)) + self._fields(headers, allow)
        message = b"".join((head, b"content-length: %d\r\n\r\n" % len(body), body))
        key_slots = self._key_slots.get(key) or self._key_slot(key)
        key_slots.free -= 1  # ready_now: both are free and nobody waits
        self._slots.free -= 1
        conn = self._idle.pop()
        conn.start_now(done, key, key_slots, conn.loop.time() + timeout,
                       None if keep is None else self._keeps.get(keep) or self._needles(keep))
        conn.transport.write(message)

    def _fast_end(self, conn: _Conn, outcome: int | BaseException, key: str, key_slots: _Slots,
                  done: Callable[[tuple[int, list[tuple[bytes, bytes]], bytes] | BaseException | None], None]) -> None:
        """send_now()'s request ended: slots back, the connection back to the pool or dropped, then `done`.
        (_Slots.give, _give_key and _finish written out: this runs once per fast-path request.)"""
        slots = self._slots
        if slots._waiters:
            slots.give()
        else:
            slots.free += 1
        if key_slots._waiters:
            key_slots.give()
        else:
            key_slots.free += 1
        if key_slots.free == key_slots.size and self._key_slots.get(key) is key_slots:
            del self._key_slots[key]
        if isinstance(outcome, int):
            conn._waiter = None
            body = conn._body
            answer = (outcome, conn._headers, body[0] if len(body) == 1 else b"".join(body))
            if conn.closed or conn.desynced or not conn.keep_alive:
                self._drop(conn)
            else:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            done(answer)
            return
        self._drop(conn)
        done(None if isinstance(outcome, _Stale) else outcome)

    def _needles(self, keep: tuple[bytes, ...]) -> tuple[tuple[bytes, bytes, int], ...]:
        needles = self._keeps.get(keep)
        if needles is None:
            needles = self._keeps[keep] = tuple((b"\n%s:" % name.lower(), name.lower(), len(name) + 2) for name in keep)
        return needles

    def _head_of(self, method: str, target: str, headers: tuple[tuple[bytes, bytes], ...],
                 allow: frozenset[bytes] | None) -> bytes:
        """send_ready()'s request line, host and header lines for a tuple of headers, checked and
        made once, then cached (bounded, as the prefixes are)."""
        head = self._prefix(method, target) + self._fields(headers, allow)  # (raises UnsafeRequest: not cached)
        if len(self._heads) >= 256:
            self._heads.clear()
        self._heads[(method, target, headers, allow)] = head
        return head

    def _prefix(self, method: str, target: str) -> bytes:
        """The request line and host header (the target checked once per target, then cached)."""
        prefix = self._prefixes.get((method, target))
        if prefix is None:
            check_target(target)
            if len(self._prefixes) >= 4096:
                self._prefixes.clear()
            prefix = self._prefixes[(method, target)] = b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (
                method.encode(), target.encode("ascii"), self._host_header)
        return prefix

    @staticmethod
    def _fields(headers: list[tuple[bytes, bytes]], allow: frozenset[bytes] | None = None) -> bytes:
        """The header lines (only those named in `allow`, when given), checked as check_headers()
        does without a call per header: each name and value joined by a NUL, which neither may
        hold, and the whole in the safe form of _SAFE_FIELDS (so a CR or LF inside a name or
        value, which would start a line without its NUL, or a ':' or space inside a name, fails
        it)."""
        if not headers:
            return b""
        block = b"".join([b"%s\0%s\r\n" % h for h in headers] if allow is None else
                         [b"%s\0%s\r\n" % h for h in headers if h[0] in allow])
        if not block:
            return b""
        if _SAFE_FIELDS.fullmatch(block) is None:
            raise UnsafeRequest("a header holds characters that cannot be forwarded")
        return block.replace(b"\0", b": ")

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
        conn.pool = self
        self._all.add(conn)
        return conn

    async def _write(self, conn: _Conn, message: bytes, body: bytes | BodySource, deadline: float,
                     waiter: asyncio.Future) -> None:
        """Write the request; a BodySource chunk by chunk as the client sends it, each after the
        socket drained. Stops early when the server answered already (the connection is then
        not reused: part of the body was never sent)."""
        assert conn.transport is not None
        if not isinstance(body, BodySource):
            conn.transport.write(message + body if len(body) < 65536 else message)
            if len(body) >= 65536:
                conn.transport.write(body)  # no copy of a large body
            return
        conn.transport.write(message)
        loop = asyncio.get_running_loop()
        chunked = body.length is None
        want = body.length if body.length is not None else (body.limit or 0) + 1
        sent = 0
        ended = False
        while sent < want and not waiter.done():
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError()
            try:
                chunk = await asyncio.wait_for(body.read(), left)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                raise
            except Exception as e:
                raise BodyIncomplete(f"the request body could not be read: {e}") from None
            if not chunk:
                ended = True
                break
            chunk = chunk[:want - sent]
            sent += len(chunk)
            if chunked and sent > (body.limit or 0):
                conn.keep_alive = False
                raise BodyTooLarge(f"the request body exceeds {body.limit} bytes")
            conn.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            await asyncio.wait_for(conn.drain(), max(0.0, deadline - loop.time()))
            if conn.closed:
                break
        if chunked and ended:
            conn.transport.write(b"0\r\n\r\n")
        elif sent < want:
            conn.keep_alive = False
            if not waiter.done():
                raise BodyIncomplete(f"the request body ended after {sent} of {body.length} bytes" if not chunked
                                     else "the server closed the connection while the body was sent")

    async def _exchange(self, conn: _Conn, message: bytes, body: bytes | BodySource,
                        deadline: float) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        loop = asyncio.get_running_loop()
        waiter = conn.start(loop)
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            await self._write(conn, message, body, deadline, waiter)
            status = await waiter
        except BaseException:
            self._drop(conn)
            if not waiter.done():
                waiter.cancel()
            elif not waiter.cancelled():
                waiter.exception()  # retrieved: no "never retrieved" warning
            raise
        finally:
            timer.cancel()
        return (status, *self._finish(conn))

    def _finish(self, conn: _Conn) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """A completed answer's headers and body; the connection back to the pool if it may be reused."""
        headers, payload = conn.result()
        if conn.closed or conn.desynced or not conn.keep_alive:
            self._drop(conn)
        else:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        return headers, payload

    def _drop(self, conn: _Conn) -> None:
        conn.closed = True
        if conn._timer is not None:
            conn._timer.cancel()
            conn._timer = None
        self._all.discard(conn)
        if conn.transport is not None:
            conn.transport.close()


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


class StreamedAnswer:
    """An answer being received: `status`, lower-cased `headers`, then `next_chunk()` until None."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], conn: _Conn, timeout: float):
        self.status = status
        self.headers = headers
        self._conn = conn
        self._timeout = timeout

    async def next_chunk(self) -> bytes | None:
        """The next chunk of the body as the server sent it; None at its end. Raises
        asyncio.TimeoutError when none arrives within the request timeout, UpstreamError when
        the server breaks the connection mid-answer."""
        return await self._conn.next_chunk(self._timeout)

    async def read(self, limit: int) -> bytes:
        """The rest of the body, at most `limit` bytes (an error answer)."""
        parts: list[bytes] = []
        size = 0
        while size < limit and (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)[:limit]
