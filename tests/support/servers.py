"""Start a real embedded MLServer / Triton through the runtime adapters, for tests.

The adapters are asyncio objects; pytest tests here are plain functions. `LoopThread` runs one
event loop in a background thread for a server's whole life, so a session-scoped server keeps
its watch task (restart on death) running between tests; `RunningServer.call(coro)` runs a
coroutine on that loop and returns its result.

Use from a conftest.py:
    from tests.support.servers import mlserver_session, mlserver  # noqa: F401  (fixtures)
`mlserver_session` is one server per test session; `mlserver` is the same server, with every
model the test loaded unloaded afterwards. Triton fixtures skip with a reason when
.venv-triton is absent (`make triton` creates it).

To drive the server from your own event loop (e.g. the agent under test), build a sidecar-mode
adapter on `RunningServer.base_url` and `RunningServer.repository` in that loop.

`poll_during(base_url, name, request, action)` probes a model (ready + infer) while an action
(e.g. a reload) runs, to show that no request failed meanwhile and which copies answered.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import httpx
import pytest

from agent.runtimes.base import RuntimeAdapter

T = TypeVar("T")

START_TIMEOUT = 60.0  # two shared cores: MLServer needs ~1.5 s alone, more under load


class LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self, name: str = "test-loop"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 60.0) -> T:
        """Run `coro` on the loop; its result, or its exception, or TimeoutError after `timeout`."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"coroutine did not finish within {timeout}s") from None

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()


@dataclass
class RunningServer:
    """A started adapter, the loop it lives on, and the repository dir it owns."""

    adapter: Any  # MLServerAdapter | TritonAdapter
    loop: LoopThread
    repository: Path

    @property
    def base_url(self) -> str:
        return self.adapter.base_url

    def call(self, coro: Awaitable[T], timeout: float = 60.0) -> T:
        return self.loop.run(coro, timeout)

    def load(self, served: Any, timeout: float = 60.0) -> Any:
        """The adapter's load of `served`, then (MLServer) the park it started in the background:
        the repository on disk is as the load leaves it."""
        return self.call(self._load_parked(served), timeout)

    async def _load_parked(self, served: Any) -> Any:
        try:
            return await self.adapter.load(served)
        finally:
            if hasattr(self.adapter, "parked"):
                await self.adapter.parked(served.name)

    def unload_all(self) -> None:
        """Unload every model with an entry in the repository (test isolation)."""
        if hasattr(self.adapter, "parked"):
            self.call(self.adapter.parked())
        for name in sorted(self.adapter.repository_entries()):
            self.call(self.adapter.unload(name))

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.adapter.stop(), timeout=30)
        self.loop.close()


def start_server(factory: Callable[[], RuntimeAdapter], repository: Path, timeout: float = START_TIMEOUT) -> RunningServer:
    """Build the adapter on a fresh loop thread (`factory` runs there) and start it."""
    loop = LoopThread()

    async def _build() -> RuntimeAdapter:
        adapter = factory()
        await adapter.start(timeout)  # type: ignore[attr-defined]
        return adapter

    try:
        adapter = loop.run(_build(), timeout + 10)
    except BaseException:
        loop.close()
        raise
    return RunningServer(adapter, loop, repository)


@contextlib.contextmanager
def embedded_mlserver(base: Path, **kwargs: Any) -> Iterator[RunningServer]:
    """An embedded MLServer with its repository and private cwd under `base`; stopped on exit."""
    from agent.runtimes.mlserver import MLServerAdapter

    repo = Path(base) / "repository"
    srv = start_server(lambda: MLServerAdapter.embedded(repo, workdir=Path(base) / "cwd", **kwargs), repo)
    try:
        yield srv
    finally:
        srv.stop()


def triton_available() -> str | None:
    """None when a Triton install can be found, else why not (for pytest.skip)."""
    from agent.runtimes.triton import find_triton

    try:
        find_triton()
        return None
    except FileNotFoundError as e:
        return str(e)


def triton_site_packages() -> Path:
    """The Triton venv's site-packages (numpy for python-backend models)."""
    from agent.runtimes.triton import find_triton

    return find_triton().site_packages


@contextlib.contextmanager
def embedded_triton(base: Path, **kwargs: Any) -> Iterator[RunningServer]:
    """An embedded Triton with its repository and cwd under `base`; skips when not installed."""
    from agent.runtimes.triton import TritonAdapter

    why = triton_available()
    if why:
        pytest.skip(f"Triton not installed: {why}")
    repo = Path(base) / "repository"
    srv = start_server(lambda: TritonAdapter.embedded(repo, workdir=Path(base) / "cwd", **kwargs), repo)
    try:
        yield srv
    finally:
        srv.stop()


@dataclass
class Polled:
    """What `poll_during` saw: rounds in all, rounds in flight while the action ran, failed
    rounds (one line each), distinct outputs of successful rounds."""

    polls: int
    during: int
    failures: list[str]
    outputs: set[tuple[Any, ...]]


async def poll_during(base_url: str, name: str, request: dict[str, Any], action: Awaitable[Any],
                      before: int = 3, warm_timeout: float = 10.0) -> Polled:
    """Probe `name` (GET .../ready, then POST .../infer with `request`) in a loop while `action`
    runs. `action` starts only after `before` rounds completed (so the answer of the copy served
    before is on record, however slow the machine), and polling stops when it ends. A round
    fails unless both answer 200; each successful round records the first output's data."""
    stop, warm, acting = asyncio.Event(), asyncio.Event(), asyncio.Event()
    seen = Polled(0, 0, [], set())

    async def poll() -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=5, trust_env=False) as c:
            while not stop.is_set():
                ready = await c.get(f"/v2/models/{name}/ready")
                r = await c.post(f"/v2/models/{name}/infer", json=request)
                seen.polls += 1
                seen.during += acting.is_set()  # it ended after the action began, and began before it ended
                if ready.status_code != 200 or r.status_code != 200:
                    seen.failures.append(f"ready={ready.status_code} infer={r.status_code} {r.text[:120]}")
                else:
                    seen.outputs.add(tuple(r.json()["outputs"][0]["data"]))
                if seen.polls >= before:
                    warm.set()

    task = asyncio.create_task(poll())
    try:
        try:
            await asyncio.wait_for(warm.wait(), warm_timeout)
        except BaseException:
            if asyncio.iscoroutine(action):
                action.close()  # never started
            raise
        acting.set()
        await action
    finally:
        stop.set()
        await task
    return seen


# -- fixtures (import them into a conftest.py) ---------------------------------------------


@pytest.fixture(scope="session")
def mlserver_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One embedded MLServer for the whole session."""
    with embedded_mlserver(tmp_path_factory.mktemp("mlserver")) as srv:
        yield srv


@pytest.fixture
def mlserver(mlserver_session: RunningServer) -> Iterator[RunningServer]:
    """The session's MLServer; whatever the test loaded is unloaded afterwards."""
    yield mlserver_session
    mlserver_session.unload_all()


@pytest.fixture(scope="session")
def triton_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One embedded Triton for the whole session (skips when .venv-triton is absent)."""
    with embedded_triton(tmp_path_factory.mktemp("triton")) as srv:
        yield srv


@pytest.fixture
def triton(triton_session: RunningServer) -> Iterator[RunningServer]:
    """The session's Triton; whatever the test loaded is unloaded afterwards."""
    yield triton_session
    triton_session.unload_all()
