"""--idle-unload on the real Reconciler (harness of tests/reconciler): a model loaded on demand
that no request used for the given time is unloaded, never under a request, never a preload
or pinned model."""
from __future__ import annotations

import asyncio

from agent.reconciler import State
from tests.reconciler.conftest import Harness, http, run  # noqa: F401  (http: fixture)


def test_only_idle_on_demand_models_without_a_request_are_unloaded(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http) as h:
            await h.apply(h.spec("pre"), h.spec("pin", pinned=True, preload=False),
                          h.spec("idle", preload=False), h.spec("busy", preload=False))
            h.rec.release(await h.rec.acquire("idle"))
            held = await h.rec.acquire("busy")  # a request still in flight
            await asyncio.sleep(0.1)
            assert await h.rec.unload_idle(0.05) == 1
            assert {n: h.state(n) for n in ("pre", "pin", "idle", "busy")} == {
                "pre": State.LOADED, "pin": State.LOADED, "idle": State.CACHED, "busy": State.LOADED}
            h.rec.release(held)
            assert await h.rec.unload_idle(60.0) == 0  # used just now
    run(scenario())
