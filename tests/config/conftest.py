"""Helpers for the config tests: run a coroutine with a deadline, record watcher callbacks."""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable

import pytest

from agent.config import ConfigParseError, ConfigResult


def arun(coro: Awaitable[Any], timeout: float = 20.0) -> Any:
    """Run one test coroutine on a fresh loop, bounded."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Recorder:
    """Collects on_change / on_error calls with the time they arrived (time.monotonic())."""

    def __init__(self) -> None:
        self.changes: list[tuple[float, ConfigResult]] = []
        self.errors: list[tuple[float, ConfigParseError]] = []
        self._event: asyncio.Event | None = None

    def _poke(self) -> None:
        if self._event is None:
            self._event = asyncio.Event()
        self._event.set()

    async def on_change(self, result: ConfigResult) -> None:
        self.changes.append((time.monotonic(), result))
        self._poke()

    async def on_error(self, error: ConfigParseError) -> None:
        self.errors.append((time.monotonic(), error))
        self._poke()

    async def wait_for(self, predicate, timeout: float = 5.0, what: str = "callback") -> None:
        """Wait until predicate(self) holds; fail naming `what` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"timed out after {timeout}s waiting for {what}: "
                            f"changes={[sorted(r.models) for _, r in self.changes]} errors={[str(e) for _, e in self.errors]}")
            if self._event is None:
                self._event = asyncio.Event()
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), min(left, 0.05))
            except asyncio.TimeoutError:
                pass

    def names(self, i: int = -1) -> list[str]:
        return sorted(self.changes[i][1].models)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()
