"""Forcing interleavings of an adapter's calls against a real server (tests/runtimes): what a
test holds is the adapter's own file work or the network, never the server.

- `hold_entry_removal`: an unload's entry removal (file work, in a thread) waits until the
  test opens the gate; `entered` says the server already answered the unload.
- `LateRequest`: the adapter's next POST to a path ending in `suffix` leaves only when the test
  calls `release()`, whatever happened to the call that sent it meanwhile (cancelled, timed
  out): a request still on the wire after its caller gave up.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest


def hold_entry_removal(adapter: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """(entered, gate): the adapter's `_remove_entry` sets `entered`, then waits for `gate`."""
    entered, gate = threading.Event(), threading.Event()
    real_remove = adapter._remove_entry
    monkeypatch.setattr(adapter, "_remove_entry", lambda name: (entered.set(), gate.wait(30), real_remove(name)))
    return entered, gate


class LateRequest:
    """Holds the adapter's next POST to `...suffix` until `release()` (see the module doc)."""

    def __init__(self, adapter: Any, monkeypatch: pytest.MonkeyPatch, suffix: str):
        self.posted = asyncio.Event()  # the adapter sent it (into the held "wire")
        self._release = asyncio.Event()
        self._task: asyncio.Future | None = None
        real_post = adapter._post

        async def post(path: str, model: str | None, **kw: Any) -> Any:
            if not path.endswith(suffix) or self._task is not None:
                return await real_post(path, model, **kw)

            async def on_the_wire() -> Any:
                await self._release.wait()
                return await real_post(path, model, **kw)

            self._task = asyncio.ensure_future(on_the_wire())
            self.posted.set()
            return await asyncio.shield(self._task)  # the caller may give up; the request goes on

        monkeypatch.setattr(adapter, "_post", post)

    async def release(self) -> int:
        """Let the request reach the server; its HTTP status once answered."""
        assert self._task is not None, "nothing was posted"
        self._release.set()
        return (await self._task).status_code


async def unload_past_a_late_load(adapter: Any, served: Any, monkeypatch: pytest.MonkeyPatch) -> int:
    """load(served) given up once its request is on the wire (cancelled, as the reconciler's
    --load-timeout does), then unload(served.name), whose entry removal waits until that late
    request reached the server (after the unload's answer). Returns the late load's status."""
    late = LateRequest(adapter, monkeypatch, f"/{served.name}/load")
    entered, gate = hold_entry_removal(adapter, monkeypatch)
    try:
        loading = asyncio.create_task(adapter.load(served))
        await asyncio.wait_for(late.posted.wait(), 10)
        loading.cancel()  # given up: its request is on its way all the same
        with pytest.raises(asyncio.CancelledError):
            await loading
        unloading = asyncio.create_task(adapter.unload(served.name))
        assert await asyncio.to_thread(entered.wait, 20)  # the server answered the unload
        status = await late.release()  # the late load reached the server: the entry was still there
        gate.set()
        await unloading
        return status
    finally:
        gate.set()
