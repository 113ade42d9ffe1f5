"""The agent process: wires cache, server adapter, memory, reconciler, watcher, router and the
management API, and serves them on two listeners:

- public (`--host`/`--port`): the data plane (`/v1/`, `/v2/`) and the probes (`/healthz`,
  `/readyz`) that a kubelet or a gateway needs; every other path is 404. Its protocol answers
  plain infer requests for loaded models on the router's fast path (no ASGI task; see
  agent.router) unless `--no-fast-path`.
- management (`--management-host`/`--management-port`, default the same host and port 8003;
  8002 stays free for a Triton sidecar's metrics):
  the probes, `/status`, `/status/models/NAME`, `/metrics` and the status page.
  `--management-port` equal to `--port` serves everything on one port (`make run`).

Both listeners cap the request head: a connection that has not sent a complete request line
and headers within `--header-timeout` seconds of connecting (or of its first byte after a
keep-alive pause) is closed, so slowloris connections do not pile up, and a head larger than
`--max-header-bytes` is answered 431; an idle keep-alive connection is closed after
`--keep-alive-timeout` seconds (long, for load balancers)."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import signal
import socket
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import psutil
import uvicorn
from uvicorn.protocols.http.httptools_impl import HEADER_VALUE_RE, STATUS_LINE, HttpToolsProtocol

from agent.api import build_api, build_probes
from agent.config import load_config_dir
from agent.fleet import FleetState
from agent.grpc_server import start_grpc
from agent.health import ServerHealth
from agent.logging import get_logger, kv, setup_logging
from agent.memory import MemoryManager, tree_rss
from agent.metrics import Metrics
from agent.reconciler import Reconciler
from agent.router import Router, error_parts, liveness, send_error
from agent.runtimes import RuntimeAdapter, make_adapter
from agent.runtimes.base import ServerUnavailable
from agent.runtimes.shards import ShardedAdapter  # built here only: its quirks stay in the adapter
from agent.settings import Settings
from agent.watcher import ConfigWatcher
from puller import Cache

log = get_logger("modelshelf.agent")


class Agent:
    """One agent: `await start()`, serve `asgi`, `await stop()`."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.cache: Cache | None = None
        self.adapter: RuntimeAdapter | None = None
        self.reconciler: Reconciler | None = None
        self.watcher: ConfigWatcher | None = None
        self.router: Router | None = None
        self.memory: MemoryManager | None = None
        self._server_ready = False
        self._health_task: asyncio.Task | None = None
        self.health = ServerHealth()  # the health loop's probe counts, per server process
        self._idle_task: asyncio.Task | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.fleet = FleetState(self)  # /fleet/state and /fleet/drain (agent/fleet.py)
        self.api = build_api(self)
        self.probes = build_probes(self)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        s = self.settings
        s.cache_dir.mkdir(parents=True, exist_ok=True)
        self.cache = await asyncio.to_thread(Cache, s.cache_dir, max_bytes=s.max_cache_bytes, holder=s.holder)
        await asyncio.to_thread(self.cache.stats)  # the first call indexes every manifest; later ones are O(1)
        self.adapter = await self._start_server()
        # a % budget is of what is left to models: the server's and the agent's own RSS is not
        pid = self._server_pid()
        overhead = tree_rss(os.getpid()) if pid is None else tree_rss(pid) + psutil.Process().memory_info().rss
        self.memory = MemoryManager.from_settings(s, store=self.cache, server_pid=self._server_pid, host_overhead=overhead,
                                                  allocator_reserve=self.adapter.allocator_reserve)
        memory = self.memory  # placement between several server processes weighs their reserved memory
        self.adapter.reserved = lambda: {n: c.host for n, c in memory.reservations().items()}
        self.reconciler = Reconciler(s, self.cache, self.adapter, self.memory, self.metrics)
        self.reconciler.on_change = self.fleet.bump
        url_for = getattr(self.adapter, "base_url_for", None)
        self.router = Router(self.reconciler, lambda: self.adapter.base_url, self.metrics, server_ready=self.ready,
                             server_url_for=url_for)
        await self.router.start()
        await self.reconciler.start()
        self.watcher = ConfigWatcher(
            s.config_dir, on_change=self.reconciler.apply, on_error=self.reconciler.config_failed,
            resync_interval_s=s.resync_interval_s, limits=s.config_limits(),
        )
        await self.watcher.start()
        self._health_task = asyncio.create_task(self._health_loop(), name="server-health")
        if s.idle_unload_s > 0:
            self._idle_task = asyncio.create_task(self._idle_loop(s.idle_unload_s), name="idle-unload")
        # everything imported and built so far lives as long as the agent: keep it out of the
        # collector's generations, so a full collection does not walk it on every config edit
        gc.collect()
        gc.freeze()
        log.info("agent started", extra=kv(server=s.server, server_url=self.adapter.base_url, config_dir=s.config_dir,
                                            cache_dir=s.cache_dir, listen=f"{s.host}:{s.port}",
                                            management=self._management_address()))

    async def _start_server(self) -> RuntimeAdapter:
        s = self.settings
        kwargs: dict[str, Any] = {"on_restart": self._on_server_restart, "load_timeout": s.load_timeout_s}
        if s.server_url:  # sidecar: an external server; we own only its repository dir
            if s.server_repository is None:
                raise SystemExit("modelshelf run: --server-url needs --server-repository (the repository dir the server reads)")
            adapter = make_adapter(s.server, repository=s.server_repository, base_url=s.server_url, **kwargs)
            log.info("waiting for the sidecar server", extra=kv(url=s.server_url))
            await adapter.start(timeout=600)
        else:
            repository = s.server_repository
            if repository is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="modelshelf-")
                repository = Path(self._tmp.name) / "repository"
            if s.server == "triton" and s.triton_bin:
                kwargs["triton_bin"] = s.triton_bin
            if s.server_processes > 1:  # models partitioned between N embedded MLServers
                kwargs["on_restart"] = self._on_shard_restart

                def build() -> RuntimeAdapter:
                    return ShardedAdapter(repository, s.server_processes, http_port=s.server_port, **kwargs)
            else:
                def build() -> RuntimeAdapter:
                    return make_adapter(s.server, repository=repository, http_port=s.server_port, **kwargs)
            adapter = await start_embedded(build)
        self._server_ready = True
        return adapter

    def _management_address(self) -> str:
        address = management_listener(self.settings)
        return "same port" if address is None else f"{address[0]}:{address[1]}"

    def _server_pid(self) -> int | tuple[int, ...] | None:
        """The embedded server's pid; with --server-processes N, the tuple of every shard's
        pid that is up (the memory ledger tracks all their trees), None when none is."""
        return self.adapter.server_pid() if self.adapter is not None else None

    async def _on_server_restart(self) -> None:
        if self.reconciler is not None:
            await self.reconciler.server_restarted()

    async def _on_shard_restart(self, lost: set[str], exit_: dict | None) -> None:
        """One of N server processes came back empty: only the models it held are lost."""
        if self.reconciler is not None:
            await self.reconciler.server_restarted(lost, exit_)

    async def _health_loop(self) -> None:
        """Probe each server process every 2 s for /readyz: three failed probes in a row of one
        mark the server not ready, except those of a server busy with a load in flight
        (agent/health.py says which count). When it is back, the server's index is compared
        with what we think is loaded (restarts themselves are handled by the adapter's
        on_restart)."""
        while True:
            await asyncio.sleep(2.0)
            if self.health.observe(await self.adapter.probe()):
                if not self._server_ready:
                    log.info("server is ready again")
                    self._server_ready = True
                    self.fleet.bump()
                    await self.reconciler.resync_server(restock=True)
                continue
            if self._server_ready:
                log.warning("server is not ready", extra=kv(failed_probes=self.health.failed_probes))
                self._server_ready = False
                self.fleet.bump()

    async def _idle_loop(self, idle_s: float) -> None:
        """--idle-unload: copies nobody asked for in `idle_s` seconds leave (a fleet's stale copies)."""
        while True:
            await asyncio.sleep(min(30.0, max(0.05, idle_s / 4)))
            n = await self.reconciler.unload_idle(idle_s)
            if n:
                log.info("unloaded idle models", extra=kv(models=n, idle_seconds=idle_s))

    async def stop(self) -> None:
        for task in (self._health_task, self._idle_task):
            if task:
                task.cancel()
        if self.watcher:
            await self.watcher.stop()
        if self.reconciler:
            await self.reconciler.close()
        if self.router:
            await self.router.close()
        if self.adapter:
            await self.adapter.close()
            stop = getattr(self.adapter, "stop", None)
            if stop is not None:
                await stop()
        if self._tmp:
            self._tmp.cleanup()

    # ------------------------------------------------------------------ views
    def not_ready_reasons(self) -> list[str]:
        """Why the agent should take no traffic now ([] when ready): /readyz, /v2/health/ready,
        gRPC ServerReady and /fleet/state all answer from this."""
        reasons = []
        # the embedded server's process (each of several): known at once when it died
        if not self._server_ready or (self.adapter is not None and not self.adapter.ready_now()):
            reasons.append("server not ready")
        if self.reconciler is None or not self.reconciler.applied_once.is_set():
            reasons.append("config not applied yet")
        elif self.reconciler.restocking:
            reasons.append(f"restocking: {self.reconciler.restocking} model(s) not checked and loaded yet")
        if self.fleet.draining:
            reasons.append("draining (preStop): no new placements")
        return reasons

    def ready(self) -> bool:
        return not self.not_ready_reasons()

    def status(self) -> dict[str, Any]:
        doc = self.reconciler.status() if self.reconciler else {"models": {}, "config": {}, "memory": {}, "counts": {}}
        doc["server"] = {
            "kind": self.settings.server,
            "url": self.adapter.base_url if self.adapter else None,
            "ready": self._server_ready,
            "busy": self.health.busy_doc(),  # loading with its probes unanswered: not counted (agent/health.py)
            "embedded": self.settings.server_url is None,
            "pid": process.pid if (process := getattr(self.adapter, "process", None)) is not None else None,
            **(self.adapter.status_doc() if self.adapter is not None else {}),  # e.g. each of several processes
        }
        doc["cache"] = self._cache_stats()
        doc["data_plane"] = {"fast_path": self.settings.fast_path,  # agent.router.Router.fast_forward
                             "fast_path_answers": getattr(self.router, "fast_answers", 0),
                             "fast_path_fallbacks": getattr(self.router, "fast_fallbacks", 0)}
        doc["holder"] = self.settings.holder
        return doc

    def _cache_stats(self) -> dict[str, Any]:
        return self.cache.stats() if self.cache is not None else {}

    def refresh_gauges(self) -> None:
        """Gauges that are derived state are computed when /metrics is scraped, not on every change."""
        if self.reconciler is not None:
            self.reconciler.update_gauges()
        if self.cache is not None:
            self.metrics.cache_bytes.set(self.cache.stats()["bytes"])

    # ------------------------------------------------------------------ ASGI
    async def asgi(self, scope: dict, receive: Any, send: Any) -> None:
        """The public port: the data plane and the probes, nothing else."""
        await self._route(self.probes, scope, receive, send)

    async def management_asgi(self, scope: dict, receive: Any, send: Any) -> None:
        """The management listener: status, metrics, page, probes."""
        await self.api(scope, receive, send)

    async def single_port_asgi(self, scope: dict, receive: Any, send: Any) -> None:
        """Everything on one port (`--management-port` equal to `--port`)."""
        await self._route(self.api, scope, receive, send)

    async def _route(self, other: Any, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and _is_liveness(scope, page_at_root=other is self.api):
            await liveness(send)
        elif scope["type"] == "http" and _is_data_plane(scope["path"]):
            await self._data_plane(scope, receive, send)
        else:
            await other(scope, receive, send)

    async def _data_plane(self, scope: dict, receive: Any, send: Any) -> None:
        if self.router is None or self.reconciler is None or not self.reconciler.applied_once.is_set():
            await send_error(send, 503, "the agent is starting", retry_after=1)
        else:
            await self.router(scope, receive, send)


def _is_liveness(scope: dict, page_at_root: bool) -> bool:
    """KServe V1 liveness (`GET /`, `GET /v1`); where the page shares the port, a browser's
    `GET /` (Accept names text/html) gets the page instead."""
    path = scope["path"]
    if path in ("/v1", "/v1/"):
        return True
    return path == "/" and not (page_at_root and any(k == b"accept" and b"text/html" in v for k, v in scope["headers"]))


def _is_data_plane(path: str) -> bool:
    return path.startswith("/v2") or path.startswith("/v1/")


class _HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus bounds on the request head, which uvicorn lacks (its
    keep-alive timer runs only between requests, and httptools buffers a head of any size):

    - a deadline: armed when the connection opens and when a read that began a request ends
      with its head incomplete (the time its first byte arrived, to within that read),
      disarmed when the headers are complete; on expiry the connection is closed (with a 408
      if part of a request had arrived);
    - a size: bytes received while a head is incomplete are counted; past `max_head_bytes`
      the client gets a 431 and the connection is closed.

    On the public listener (fast_router set) a read that starts at a request boundary, with
    nothing of uvicorn's in flight, is first offered to parse_plain_infer: a plain infer
    request in the strictest form, head and Content-Length body, is handed to the router's
    fast path from here (_take_own), with no scope, no RequestResponseCycle, no Event and no
    per-header callback. Its answer is written in one write; requests that arrive meanwhile
    wait in `_held` (reading paused) so answers keep their order; a request the fast path
    gives back, and anything parse_plain_infer refuses, is fed to uvicorn's parser as it came.
    After our own answers the keep-alive deadline is one lazy timer per idle period
    (_idle_expired), not a timer armed and cancelled per request. A request uvicorn parses may
    still take the fast path from its cycle (_start_asgi_task below): a head split over reads,
    a header outside the strict form."""

    header_timeout: float = 10.0
    max_head_bytes: int = 64 * 1024
    _header_timer: asyncio.TimerHandle | None = None
    _partial = False
    _in_body = False
    _head_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self._own is not None:  # our own request is in flight: what follows waits its turn
            self._held += data
            self.flow.pause_reading()
            return
        if self._body_wait:  # a plain infer request's head came whole, its body not yet
            data, self._held, self._body_wait = self._held + data, b"", False
        if self.fast_router is not None and not self._partial and not self._in_body and not self.flow.write_paused \
                and (self.cycle is None or self.cycle.response_complete):  # (a client not reading its answers:
            # uvicorn's cycles wait for the socket to drain, ours would not)
            data = self._take_own(data)
            if not data:
                return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """uvicorn's own handling of `data` (httptools, a cycle per request), with the head's bounds."""
        if self._idle_timer is not None:  # uvicorn's keep-alive timer takes over after its answer
            self._idle_timer.cancel()
            self._idle_timer = None
        if not self._in_body:
            self._head_bytes += len(data)  # reset when a head completes (within the feed below)
        super().data_received(data)
        if self._partial and self._header_timer is None and not self.transport.is_closing():
            # a head begun in this read and not complete at its end: its deadline starts now
            # (armed here, not in on_message_begin, so a head that arrives whole, the usual
            # case, arms and cancels no timer)
            self._arm_header_timer()
        if not self._in_body and self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
            self._close_with(b"431 Request Header Fields Too Large", b"request head too large")

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()
        if self._fast is not None and self._fast[0] is self.cycle:
            self._fast_start()

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._partial = True

    def on_headers_complete(self) -> None:
        if self._header_timer is not None:
            self._disarm_header_timer()
        self._partial, self._in_body, self._head_bytes = False, True, 0
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._gone = True
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """Graceful stop: a connection with our own request in flight, or one whose body is on
        its way, closes after its answer."""
        self._stopping = True
        if self._own is not None:
            self._own[0] = False  # keep-alive off
        elif not self._body_wait:  # (a request whose body is on its way is answered, then closed)
            super().shutdown()

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout_expired)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout_expired(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._partial:
            self._close_with(b"408 Request Timeout", b"request head too slow")
        else:
            self.transport.close()

    # -- the data plane's fast path (public listener only; agent.router.Router.fast_route)
    fast_router: Callable[[], Router | None] | None = None
    _fast: tuple[Any, Any, Router, str] | None = None  # (cycle, app, router, model) waiting for its body

    _router: Router | None = None  # fast_router()'s answer, once it has one
    _own: list | None = None  # our own request in flight: [keep_alive, its bytes]
    _held = b""  # bytes that came while it was in flight (pipelined requests), reading paused
    _body_wait = False  # _held is a plain infer request whose body is not all in yet
    _gone = False  # the client went away
    _stopping = False  # graceful stop: the request in flight (or on its way) is the last
    _taking = False  # within fast_forward() called by _take_own
    _asgi_next = False  # the next request uvicorn parses was given back by the fast path: ASGI
    _idle_timer: asyncio.TimerHandle | None = None  # keep-alive deadline after our own answers
    _idle_since = 0.0

    def _take_own(self, data: bytes) -> bytes:
        """Answer the whole plain infer requests at the start of `data` ourselves (no scope, no
        cycle, no per-header callbacks: see parse_plain_infer); returns the bytes left for
        uvicorn (b"" when none, or when the rest waits behind our request in flight)."""
        router = self._router
        if router is None:  # (the agent's router, made once at start: looked up once per connection)
            router = self._router = self.fast_router()  # type: ignore[misc]
        while data and router is not None:
            request = parse_plain_infer(data, self.max_head_bytes)
            if request is None or not router.fast_takes(request[0], request[3]):
                return data
            name, headers, keep_alive, length, head_end = request
            keep_alive = keep_alive and not self._stopping
            end = head_end + length
            if len(data) < end:  # the rest of the body comes in later reads (a client that writes
                self._held, self._body_wait = data, True  # head and body apart): wait for it
                if self._header_timer is not None:
                    self._disarm_header_timer()
                return b""
            if self.timeout_keep_alive_task is not None:  # uvicorn's, armed after its last answer
                self.timeout_keep_alive_task.cancel()
                self.timeout_keep_alive_task = None
            if self._header_timer is not None:  # the connection's first head: it came whole
                self._disarm_header_timer()
            own = self._own = [keep_alive, data[:end]]
            self._taking = True
            try:
                router.fast_forward(name, headers, data[head_end:end], partial(self._own_reply, own),
                                    partial(self._own_demote, own))  # (a partial calls on from C: no frame of its own)
            finally:
                self._taking = False
            if self._own is own:  # in flight: the rest waits for its answer
                if len(data) > end:
                    self._held += data[end:]
                    self.flow.pause_reading()
                return b""
            if own[1] is None:  # given back at once: uvicorn parses it (and the rest), the app answers it
                self._asgi_next = True
                return data
            if self.transport.is_closing():  # answered at once, and that closed the connection
                return b""
            data = data[end:]  # answered at once
        return data

    def _own_reply(self, own: list, parts: tuple[int, list[tuple[bytes, bytes]], bytes]) -> None:
        if self._own is not own:
            return
        self._own = None
        if self._gone or self.transport.is_closing():
            return
        keep_alive = own[0]
        self.transport.write(_answer(self.server_state.default_headers, parts, keep_alive))
        self.server_state.total_requests += 1
        if not keep_alive:
            self.transport.close()
            return
        self._idle_since = self.loop.time()
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_at(self._idle_since + self.timeout_keep_alive, self._idle_expired)
        if self._held:
            held, self._held = self._held, b""
            self.flow.resume_reading()
            self.data_received(held)

    def _own_demote(self, own: list) -> None:
        """The fast path gave our request back: uvicorn parses it, the ASGI app answers it."""
        if self._own is not own:
            return
        self._own = None
        raw, own[1] = own[1], None
        if self._taking or self._gone or self.transport.is_closing():
            return  # at once: _take_own hands it to uvicorn
        data, self._held = raw + self._held, b""  # later (a stale upstream connection): now
        self._asgi_next = True
        self.flow.resume_reading()
        self._feed(data)

    def _idle_expired(self) -> None:
        """The keep-alive deadline after our own answers: one timer per idle period, not per
        request (moved on by the answers that came meanwhile)."""
        self._idle_timer = None
        if self.transport.is_closing() or self._own is not None or self._body_wait or self._partial or self._in_body \
                or (self.cycle is not None and not self.cycle.response_complete):
            return  # busy: the next answer arms it again (or uvicorn's own timer does)
        due = self._idle_since + self.timeout_keep_alive
        if self.loop.time() >= due:
            self.transport.close()
        else:
            self._idle_timer = self.loop.call_at(due, self._idle_expired)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        """A plain infer request is answered from this connection's callbacks once its body is in
        (no ASGI task, no app chain); every other request, and one the fast path gives back, runs
        the ASGI app. uvicorn's cycle still carries the request, so keep-alive, pipelining,
        disconnects and shutdown work as for any request."""
        if self._stopping:  # a request given back by our own parse after the graceful stop began
            cycle.keep_alive = False
        if self._asgi_next or self.flow.write_paused:  # (the ASGI path waits for the socket to drain)
            self._asgi_next = False
            super()._start_asgi_task(cycle, app)
            return
        router = self.fast_router() if self.fast_router is not None and app is self.app else None
        name = router.fast_route(cycle.scope) if router is not None else None
        if name is None:
            super()._start_asgi_task(cycle, app)
            return
        self._fast = (cycle, app, router, name)
        if not cycle.more_body:
            self._fast_start()

    def _fast_start(self) -> None:
        assert self._fast is not None
        cycle, app, router, name = self._fast
        self._fast = None

        def demote() -> None:
            if not cycle.disconnected:  # the body stays in the cycle for the app's receive()
                HttpToolsProtocol._start_asgi_task(self, cycle, app)

        router.fast_forward(name, cycle.scope["headers"], bytes(cycle.body), lambda parts: self._fast_reply(cycle, parts),
                            demote)

    def _fast_reply(self, cycle: Any, parts: tuple[int, list[tuple[bytes, bytes]], bytes]) -> None:
        """Write a whole answer in one write, with the headers uvicorn adds, and end the cycle."""
        if cycle.response_complete or cycle.disconnected:
            return
        cycle.transport.write(_answer(cycle.default_headers, parts, cycle.keep_alive))
        cycle.response_complete = True
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()

    def _close_with(self, status: bytes, reason: bytes) -> None:
        self._disarm_header_timer()
        self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain\r\ncontent-length: "
                             + str(len(reason)).encode() + b"\r\nconnection: close\r\n\r\n" + reason)
        self.transport.close()


def _answer(default_headers: Any, parts: tuple[int, list[tuple[bytes, bytes]], bytes], keep_alive: bool) -> bytes:
    """A whole answer's bytes, with the headers uvicorn adds (date, server: their lines are
    joined once per list uvicorn makes, i.e. once a second, not per answer)."""
    status, headers, body = parts
    for _, value in headers:  # each value checked once, then known (the regex engine stays out of the
        if value not in _CLEAN_VALUES:  # usual answer's path: its content-type, its content-length)
            if HEADER_VALUE_RE.search(value):
                status, headers, body = error_parts(502, "the server's answer holds a header that cannot be passed on")
                break
            if len(_CLEAN_VALUES) >= 4096:
                _CLEAN_VALUES.clear()
            _CLEAN_VALUES.add(value)
    if _defaults[0] is not default_headers:
        _defaults[:] = default_headers, b"".join([b"%s: %s\r\n" % h for h in default_headers])
    if not headers:
        return b"".join((STATUS_LINE[status], _defaults[1], b"\r\n" if keep_alive else b"connection: close\r\n\r\n", body))
    return b"".join((STATUS_LINE[status], _defaults[1], b"\r\n".join(map(b": ".join, headers)),  # (map: no comprehension
                     b"\r\n\r\n" if keep_alive else b"\r\nconnection: close\r\n\r\n", body))  # frame, which 3.11 makes per call)


_CLEAN_VALUES: set[bytes] = set()  # answer header values already found free of control bytes (bounded)
_defaults: list[Any] = [None, b""]  # uvicorn's default headers (a list, replaced each second) and their lines


# A plain infer request's head, all of it, in the strictest form: the request line exactly, then
# header lines of token names and visible-ASCII values, each ended by CRLF (no bare CR or LF, no
# obs-fold, no NUL or other control byte), then the empty line.
_PLAIN_INFER = re.compile(rb"POST /v2/models/([A-Za-z0-9][A-Za-z0-9_.\-]*)/infer HTTP/1\.([01])\r\n"
                          rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z\-]+:[ \t\x21-\x7e]*\r\n)*)\r\n")
_FIELD = re.compile(rb"([^:]+):[ \t]*((?:[^\r]*[^\r \t])?)[ \t]*\r\n")  # (greedy: a lazy value is ~1.7x slower)
# headers that send a request to uvicorn's parser instead (it knows what to do with them)
_NOT_OURS = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"content-length", b"connection"))


_HEADS: dict[bytes, tuple[str, tuple[tuple[bytes, bytes], ...], bool, int, int]] = {}  # heads parsed before
_HEADS_MAX = 256  # distinct heads kept (a client sends the same head for every request of one shape)
_HEAD_CACHED_BYTES = 2048  # longer heads are parsed each time (at most ~0.5 MiB of heads kept)


def parse_plain_infer(data: bytes, max_head: int
                      ) -> tuple[str, tuple[tuple[bytes, bytes], ...], bool, int, int] | None:
    """The head at the start of `data` when it is a plain infer request the public protocol may
    answer itself: (model, headers with lower-cased names, keep-alive, Content-Length, head
    length); its body may not all be in `data` yet. None for anything else (another request, a
    head or body not all here yet, a Transfer-Encoding, Expect or Upgrade, no Content-Length or
    more than one, a Connection other than one `close` or `keep-alive`, any byte outside the
    strict form): uvicorn's parser takes those, so the message boundaries we find are never
    ones it would find differently.

    A head seen before (byte for byte: a client sends the same head for every request of one
    shape and size) is not parsed again: its answer is looked up by its bytes, up to and
    including the first empty line, which is where the strict form's head ends (no value or
    name may hold a CR or LF). The headers are a tuple: shared by every request with that head."""
    end = data.find(b"\r\n\r\n", 0, max_head)
    if end < 0:
        return None
    head = data[:end + 4]
    request = _HEADS.get(head)
    if request is not None:
        return request
    request = _parse_head(head)
    if request is not None and len(head) <= _HEAD_CACHED_BYTES:
        if len(_HEADS) >= _HEADS_MAX:
            _HEADS.clear()
        _HEADS[head] = request
    return request


def _parse_head(head: bytes) -> tuple[str, tuple[tuple[bytes, bytes], ...], bool, int, int] | None:
    """parse_plain_infer() of a head not seen before (`head` ends at its first empty line)."""
    m = _PLAIN_INFER.fullmatch(head)
    if m is None:
        return None
    name, minor, fields = m.groups()
    keep_alive = minor == b"1"
    length = -1
    connection = False
    headers = []
    for k, v in _FIELD.findall(fields):
        k = k.lower()
        if k in _NOT_OURS:
            if k == b"content-length" and length < 0 and v.isdigit() and len(v) <= 9:
                length = int(v)
            elif k == b"connection" and not connection and v.lower() in (b"close", b"keep-alive"):
                connection = True  # HTTP/1.0 closes either way, as uvicorn's cycle does
                keep_alive = keep_alive and v.lower() != b"close"
            else:
                return None
        headers.append((k, v))
    if length < 0:
        return None
    return name.decode(), tuple(headers), keep_alive, length, len(head)


PORT_ATTEMPTS = 3


async def start_embedded(build: Callable[[], RuntimeAdapter], attempts: int = PORT_ATTEMPTS) -> RuntimeAdapter:
    """Start an embedded server built by `build()`. Its free ports are picked a moment before
    the server binds them, and another process may take one meanwhile: a server that exits
    because a port was taken is built again on other free ports (up to `attempts` in all);
    any other failure, or the last one, ends the start with its error."""
    attempt = 1
    while True:
        adapter = build()
        try:
            await adapter.start()
            return adapter
        except ServerUnavailable as e:
            await adapter.stop()  # (embedded adapters stop their server)
            # a port still held once the server stopped was taken by another process: that was
            # the failure, whatever words the server used for it
            if attempt == attempts or not adapter.ports_taken():
                raise
            log.warning("the embedded server's port was taken before it bound it; starting it on other ports",
                        extra=kv(attempt=attempt, reason=e.reason[-300:]))
            attempt += 1


def management_listener(settings: Settings) -> tuple[str, int] | None:
    """(host, port) of the management listener; None when the public port serves it too."""
    host = settings.management_host or settings.host
    if settings.management_port is None or (settings.management_port == settings.port and host == settings.host):
        return None
    return host, settings.management_port


def _listen(host: str, port: int, flags: str) -> socket.socket:
    """A bound, listening socket; a clear SystemExit naming the flags when the address is taken."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise SystemExit(f"modelshelf run: cannot listen on {host}:{port}: {e.strerror or e} (set {flags})") from None


def _server(app: Any, settings: Settings, fast_router: Callable[[], Router | None] | None = None) -> uvicorn.Server:
    protocol = type("HeaderTimeoutProtocol", (_HeaderTimeoutProtocol,), {
        "header_timeout": settings.header_timeout_s, "max_head_bytes": settings.max_header_bytes,
        "fast_router": staticmethod(fast_router) if fast_router is not None else None})
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_keep_alive=settings.keep_alive_timeout_s, interface="asgi3",
                            http=protocol)  # httptools, the C parser: ~200 µs less agent CPU per request than h11
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # ours below stop the agent too
    return server


async def serve(settings: Settings) -> None:
    """Listen first (so /healthz answers while the server starts), then start the agent."""
    agent = Agent(settings)
    management = management_listener(settings)
    listeners = [(agent.asgi if management else agent.single_port_asgi, _listen(settings.host, settings.port, "--host/--port"))]
    if management:
        listeners.append((agent.management_asgi, _listen(*management, "--management-host/--management-port")))
    # the fast path only on the public listener (listeners[0]), never on management
    fast = (lambda: agent.router) if settings.fast_path else None
    servers = [_server(app, settings, fast if i == 0 else None) for i, (app, _) in enumerate(listeners)]
    loop = asyncio.get_running_loop()

    def exit_all() -> None:
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, exit_all)
    serving = [asyncio.create_task(server.serve(sockets=[sock]), name="http") for server, (_, sock) in zip(servers, listeners)]
    grpc_plane = await start_grpc(settings, agent)  # KServe V2 gRPC beside the HTTP port (None: off)
    try:
        starting = asyncio.create_task(agent.start(), name="agent-start")
        done, _ = await asyncio.wait({*serving, starting}, return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            starting.result()  # a failed start ends the agent with its error
            done, _ = await asyncio.wait(serving, return_when=asyncio.FIRST_COMPLETED)
        else:
            starting.cancel()
        exit_all()  # one listener ending ends the agent
        await asyncio.gather(*serving)
    finally:
        exit_all()
        await asyncio.gather(*serving, return_exceptions=True)
        for _, sock in listeners:
            sock.close()
        if grpc_plane is not None:
            await grpc_plane.stop()
        log.info("agent stopping")
        started = time.monotonic()
        await agent.stop()
        log.info("agent stopped", extra=kv(seconds=round(time.monotonic() - started, 3)))


def run(settings: Settings) -> int:
    setup_logging(settings.log_format, settings.log_level)
    try:
        import uvloop  # a faster event loop; installed with uvicorn's and MLServer's extras
    except ImportError:
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))
    return 0


__all__ = ["Agent", "run", "serve", "load_config_dir"]
