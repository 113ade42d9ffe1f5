"""The deterministic harness: the REAL Reconciler, MemoryManager and Cache (on tmp_path, models
served by a real HTTP file server on loopback), with the scripted server of
tests/support/scripted.py in place of MLServer/Triton, so each interleaving is reproduced
exactly (calls held open, failed, crashed on command).

Tests are plain functions that run one coroutine: `run(harness_test)`; inside, `async with
Harness(tmp_path, http) as h:` builds the parts and closes them."""
from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import pytest

from agent.config import ConfigResult, ModelSpec
from agent.memory import MemoryManager
from agent.metrics import Metrics
from agent.reconciler import Model, Reconciler, State
from agent.settings import Settings
from puller import Cache, model_holder
from tests.support.httpserver import HTTPFileServer
from tests.support.scripted import BROKEN_MARKER, ScriptedAdapter
from tests.support.servers import mlserver, mlserver_session  # noqa: F401  (fixtures)

T = TypeVar("T")
KB = 1024
_digests = itertools.count()


def run(coro: Awaitable[T], timeout: float = 30.0) -> T:
    """Run one harness coroutine to its end (a hang fails the test after `timeout`)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


@pytest.fixture
def http() -> Iterator[HTTPFileServer]:
    with HTTPFileServer() as srv:
        yield srv


class Harness:
    """One agent core: cache + memory ledger + reconciler + scripted server."""

    def __init__(self, tmp_path: Path, http: HTTPFileServer, *, budget: int = 10 * 2**20, adapter: Any = None, **settings: Any):
        self.http = http
        self.settings = Settings(config_dir=tmp_path / "config", cache_dir=tmp_path / "cache", holder="pod-a")
        defaults = dict(min_residency_s=0.0, retry_base_s=0.05, load_timeout_s=5.0, drain_timeout_s=5.0, resync_interval_s=3600.0)
        for k, v in {**defaults, **settings}.items():
            setattr(self.settings, k, v)
        self.cache = Cache(self.settings.cache_dir, max_bytes=self.settings.max_cache_bytes, holder="pod-a")
        self.memory = MemoryManager({"host": budget}, store=self.cache, min_residency_s=self.settings.min_residency_s,
                                    min_model_bytes=1)
        self.adapter = adapter if adapter is not None else ScriptedAdapter()
        self.metrics = Metrics()
        self.rec = Reconciler(self.settings, self.cache, self.adapter, self.memory, self.metrics)
        self.adapter.on_restart = self.rec.server_restarted
        self.specs: dict[str, ModelSpec] = {}

    async def __aenter__(self) -> "Harness":
        await self.rec.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.rec.close()

    # -- models ---------------------------------------------------------------------------

    def publish(self, name: str, size: int = 64 * KB, *, version: str = "v1", broken: bool = False) -> str:
        """Put a model's file on the HTTP server; returns its URI (runtime "sklearn" costs 2x)."""
        filename = BROKEN_MARKER if broken else "model.bin"
        path = f"{name}/{version}/{filename}"
        self.http.set_file(path, (name + version).encode().ljust(size, b"."))
        return self.http.url(path)

    def spec(self, name: str, uri: str | None = None, **kw: Any) -> ModelSpec:
        return ModelSpec(name=name, source=uri or self.publish(name), **kw)

    async def apply(self, *specs: ModelSpec, settle: bool = True) -> None:
        """Make `specs` the whole config."""
        self.specs = {s.name: s for s in specs}
        await self.rec.apply(ConfigResult(models=dict(self.specs), errors=(), file="models.json", digest=str(next(_digests))))
        if settle:
            await self.settle()

    async def settle(self, timeout: float = 10.0) -> None:
        await self.rec.wait_idle(timeout)

    def model(self, name: str) -> Model:
        return self.rec.models[name]

    def state(self, name: str) -> State | None:
        m = self.rec.models.get(name)
        return m.state if m else None

    def holder(self, name: str) -> str:
        return model_holder("pod-a", name)

    def leased(self, name: str, key: str) -> bool:
        return any(lease.holder == self.holder(name) for lease in self.cache.leases(key))

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
        """Poll (every 5 ms) until `predicate()` holds; a state the test waits for, not a timing."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.005)
