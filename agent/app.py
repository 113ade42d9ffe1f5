"""The agent process: wires cache, server adapter, memory, reconciler, watcher, router and the
management API, and serves the data plane and the API on one port."""
from __future__ import annotations

import asyncio
import gc
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import uvicorn

from agent.api import build_api
from agent.config import load_config_dir
from agent.grpc_server import start_grpc
from agent.logging import get_logger, kv, setup_logging
from agent.memory import MemoryManager, tree_rss
from agent.metrics import Metrics
from agent.reconciler import Reconciler
from agent.router import Router, send_error
from agent.runtimes import RuntimeAdapter, make_adapter
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
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.api = build_api(self)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        s = self.settings
        s.cache_dir.mkdir(parents=True, exist_ok=True)
        self.cache = await asyncio.to_thread(Cache, s.cache_dir, max_bytes=s.max_cache_bytes, holder=s.holder)
        self.adapter = await self._start_server()
        # a % budget is of what is left to models: the server's and the agent's own RSS is not
        pid = self._server_pid()
        overhead = tree_rss(os.getpid()) if pid is None else tree_rss(pid) + psutil.Process().memory_info().rss
        self.memory = MemoryManager.from_settings(s, store=self.cache, server_pid=self._server_pid, host_overhead=overhead)
        self.reconciler = Reconciler(s, self.cache, self.adapter, self.memory, self.metrics)
        self.router = Router(
            self.reconciler, lambda: self.adapter.base_url, self.metrics,
            max_body_bytes=s.max_body_bytes, request_timeout_s=s.request_timeout_s,
            server_ready=lambda: self._server_ready,
        )
        await self.router.start()
        await self.reconciler.start()
        self.watcher = ConfigWatcher(
            s.config_dir, on_change=self.reconciler.apply, on_error=self.reconciler.config_failed,
            resync_interval_s=s.resync_interval_s,
        )
        await self.watcher.start()
        self._health_task = asyncio.create_task(self._health_loop(), name="server-health")
        # everything imported and built so far lives as long as the agent: keep it out of the
        # collector's generations, so a full collection does not walk it on every config edit
        gc.collect()
        gc.freeze()
        log.info("agent started", extra=kv(server=s.server, server_url=self.adapter.base_url, config_dir=s.config_dir,
                                            cache_dir=s.cache_dir, listen=f"{s.host}:{s.port}"))

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
            adapter = make_adapter(s.server, repository=repository, http_port=s.server_port, **kwargs)
            await adapter.start()
        self._server_ready = True
        return adapter

    def _server_pid(self) -> int | None:
        process = getattr(self.adapter, "process", None)
        return process.pid if process is not None else None

    async def _on_server_restart(self) -> None:
        if self.reconciler is not None:
            await self.reconciler.server_restarted()

    async def _health_loop(self) -> None:
        """Probe the server for /readyz. Three failed probes in a row mark it not ready (MLServer
        blocks its loop for a second or two while it imports a runtime). When it is back, the
        server's index is compared with what we think is loaded (restarts themselves are
        handled by the adapter's on_restart)."""
        failures = 0
        while True:
            await asyncio.sleep(2.0)
            if await self.adapter.is_ready():
                failures = 0
                if not self._server_ready:
                    log.info("server is ready again")
                    self._server_ready = True
                    await self.reconciler.resync_server()
                continue
            failures += 1
            if failures >= 3 and self._server_ready:
                log.warning("server is not ready", extra=kv(failed_probes=failures))
                self._server_ready = False

    async def stop(self) -> None:
        if self._health_task:
            self._health_task.cancel()
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
        reasons = []
        if not self._server_ready:
            reasons.append("server not ready")
        if self.reconciler is None or not self.reconciler.applied_once.is_set():
            reasons.append("config not applied yet")
        return reasons

    def status(self) -> dict[str, Any]:
        doc = self.reconciler.status() if self.reconciler else {"models": {}, "config": {}, "memory": {}, "counts": {}}
        doc["server"] = {
            "kind": self.settings.server,
            "url": self.adapter.base_url if self.adapter else None,
            "ready": self._server_ready,
            "embedded": self.settings.server_url is None,
            "pid": self._server_pid(),
        }
        doc["cache"] = self._cache_stats()
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
        if scope["type"] == "http":
            path = scope["path"]
            if path.startswith("/v2") or path.startswith("/v1/"):
                if self.router is None or self.reconciler is None or not self.reconciler.applied_once.is_set():
                    await send_error(send, 503, "the agent is starting", retry_after=1)
                else:
                    await self.router(scope, receive, send)
                return
        await self.api(scope, receive, send)


async def serve(settings: Settings) -> None:
    """Listen first (so /healthz answers while the server starts), then start the agent."""
    agent = Agent(settings)
    config = uvicorn.Config(agent.asgi, host=settings.host, port=settings.port, log_level="warning",
                            access_log=False, lifespan="off", timeout_keep_alive=75, interface="asgi3",
                            http="httptools")  # C parser: ~200 µs less agent CPU per request than h11
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # ours below stop the agent too
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    grpc_plane = await start_grpc(settings, agent)  # KServe V2 gRPC beside the HTTP port (None: off)
    serving = asyncio.create_task(server.serve(), name="http")
    try:
        starting = asyncio.create_task(agent.start(), name="agent-start")
        done, _ = await asyncio.wait({serving, starting}, return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            starting.result()  # a failed start ends the agent with its error
        else:
            starting.cancel()
        await serving
    finally:
        server.should_exit = True
        await asyncio.gather(serving, return_exceptions=True)
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
