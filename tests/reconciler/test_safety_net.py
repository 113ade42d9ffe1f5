"""Item 3 (safety net) and item 4 (state changes only under the model's lock)."""
from __future__ import annotations

import asyncio
import errno
import os

import pytest

from agent.memory import MemoryManager
from agent.reconciler import ModelUnavailable, State
from tests.reconciler.conftest import Harness, run


def test_disk_full_during_a_load_gives_a_503_with_the_reason_and_a_consistent_model(tmp_path, http):
    """An OSError (ENOSPC writing the repository entry) in the load: the client gets
    ModelUnavailable (503) naming the cause, the model is FAILED with that reason, nothing
    stays reserved, and the measurement window is closed (the next load is measured)."""
    async def scenario():
        async with Harness(tmp_path, http) as h:
            h.memory = h.rec.memory = MemoryManager({"host": 10 * 2**20}, store=h.cache, min_model_bytes=1,
                                                    server_pid=os.getpid(), min_residency_s=0)
            await h.apply(h.spec("m", preload=False), h.spec("a", preload=False))
            h.adapter.fail_next("load", "m", OSError(errno.ENOSPC, "No space left on device"))
            with pytest.raises(ModelUnavailable) as e:
                await h.rec.acquire("m")
            assert "No space left on device" in e.value.reason
            m = h.model("m")
            assert m.state is State.FAILED and "No space left" in m.reason
            assert "m" not in h.memory.reservations()
            # a second model of the same runtime: measured, not dropped as "overlapping a load"
            h.rec.release(await h.rec.acquire("a"))
            assert h.rec.status()["models"]["a"]["memory"]["method"] == "measured"
    run(scenario())


def test_an_unexpected_error_during_an_update_keeps_the_old_copy_serving(tmp_path, http):
    """A bug-like error (not an adapter error) while the new copy loads: the old copy keeps
    serving, /status says why, `updating` is off and the `name#new` reservation is gone."""
    async def scenario():
        async with Harness(tmp_path, http) as h:
            await h.apply(h.spec("m"))
            old = h.model("m").entry
            h.adapter.fail_next("load", "m", ValueError("unexpected"))
            h.rec.settings.retry_base_s = 60.0  # no retry during this test
            await h.apply(h.spec("m", h.publish("m", version="v2")))
            m = h.model("m")
            assert m.state is State.LOADED
            assert not m.updating
            assert "update failed" in m.reason and "unexpected" in m.reason
            assert set(h.memory.reservations()) == {"m"}
            assert h.adapter.ready["m"].path == old.path
    run(scenario())


def test_a_server_restart_during_an_update_ends_with_the_new_copy_loaded(tmp_path, http):
    """The restart is applied by the model's own task after the update, not beside it (today:
    "illegal transition cached -> loaded", the model FAILED)."""
    async def scenario():
        async with Harness(tmp_path, http) as h:
            await h.apply(h.spec("m"))
            gate = h.adapter.hold("load", "m")
            await h.apply(h.spec("m", h.publish("m", version="v2")), settle=False)
            await gate.entered.wait()
            await h.adapter.restart()
            gate.release()
            await h.settle()
            m = h.model("m")
            assert m.state is State.LOADED, m.reason
            assert h.adapter.ready["m"].path == m.entry.path
            assert "v2" in m.entry.uri
            assert set(h.memory.reservations()) == {"m"}
    run(scenario())


def test_a_server_restart_during_an_eviction_leaves_the_ledger_right(tmp_path, http):
    """A victim is being unloaded when the server restarts: afterwards every reservation
    belongs to a loaded model and the ledger is within budget."""
    async def scenario():
        async with Harness(tmp_path, http, budget=300 * 1024) as h:  # two 128 KiB models fit
            await h.apply(*(h.spec(n, preload=False) for n in ("a", "b", "c")))
            for n in ("a", "b"):
                h.rec.release(await h.rec.acquire(n))
            gate = h.adapter.hold("unload", "a")
            request = asyncio.create_task(h.rec.acquire("c"))
            await gate.entered.wait()
            await h.adapter.restart()
            gate.release()
            h.rec.release(await request)
            await h.settle()
            loaded = {n for n in "abc" if h.state(n) is State.LOADED}
            assert set(h.memory.reservations()) == loaded
            assert set(h.adapter.ready) == loaded
            assert sum(c.host for c in h.memory.reservations().values()) <= 300 * 1024
    run(scenario())


