"""Item 5 (backoff obeyed, failed updates retried, preloads retried when memory frees) and
item 6 (drain: no unload under a request, removal or update swap)."""
from __future__ import annotations

import asyncio
import logging

import pytest

from agent.reconciler import ModelUnavailable, State, UnknownModel
from agent.runtimes.base import LoadFailed
from tests.reconciler.conftest import Harness, run


def test_a_failed_lazy_model_is_not_loaded_again_within_its_backoff(tmp_path, http):
    """10 requests for a model whose load failed: one server load, and every client is told
    the true Retry-After (today: 10 loads)."""
    async def scenario():
        async with Harness(tmp_path, http, retry_base_s=60.0) as h:
            await h.apply(h.spec("m", h.publish("m", broken=True), preload=False))
            answers = []
            for _ in range(10):
                with pytest.raises(ModelUnavailable) as e:
                    await h.rec.acquire("m")
                answers.append(e.value.retry_after)
            assert h.adapter.count("load", "m") == 1
            retry_in = h.rec.status()["models"]["m"]["retry_in_seconds"]
            assert all(a is not None and a >= 25 for a in answers), answers
            assert abs(answers[-1] - retry_in) <= 1.5
    run(scenario())


def test_a_failed_model_being_retried_still_says_why_its_last_load_failed(tmp_path, http):
    """While a failed preload is retried its state is `loading` and its reason is cleared; the
    last failure stays in /status (`last_failure`), which the data plane's 503 quotes."""
    async def scenario():
        async with Harness(tmp_path, http, retry_base_s=1.0) as h:
            h.adapter.fail_next("load", "m", LoadFailed("m", "weights file truncated"))
            await h.apply(h.spec("m"))
            await h.wait_for(lambda: h.state("m") is State.FAILED, what="m failed")
            gate = h.adapter.hold("load", "m")  # its retry, due in 0.5-1.5 s
            await gate.entered.wait()
            doc = h.rec.status()["models"]["m"]
            assert doc["state"] == "loading" and doc["failures"] >= 1, doc
            assert "weights file truncated" in (doc["last_failure"] or ""), doc
            gate.release()
            await h.wait_for(lambda: h.state("m") is State.LOADED, what="m loaded on retry")
            assert h.rec.status()["models"]["m"]["last_failure"] is None
    run(scenario())


def test_a_failed_update_is_retried_with_backoff(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http) as h:
            await h.apply(h.spec("m"))
            h.adapter.fail_next("load", "m", LoadFailed("m", "transient"))
            await h.apply(h.spec("m", h.publish("m", version="v2")))
            # the server holds the new copy a moment before the agent records it (its lock is still
            # held while the load's window closes): wait for the agent's record, not the server's
            await h.wait_for(lambda: h.adapter.ready["m"].path == h.model("m").entry.path and not h.model("m").lock.locked(),
                             what="update retried")
            m = h.model("m")
            assert m.state is State.LOADED and m.reason is None and "v2" in m.entry.uri
            assert h.adapter.count("load", "m") == 3  # v1, v2 failed, v2 retried
    run(scenario())


def test_a_failed_update_keeps_the_old_lease_and_a_restart_restores_the_old_copy(tmp_path, http):
    """The new copy does not load: the old entry keeps its lease (GC cannot take it) and a
    server restart reloads the old, good copy, not the broken one."""
    async def scenario():
        async with Harness(tmp_path, http, retry_base_s=60.0) as h:
            await h.apply(h.spec("m"))
            old = h.model("m").entry
            await h.apply(h.spec("m", h.publish("m", version="v2", broken=True)))
            assert "update failed" in h.model("m").reason
            assert old.key not in {i.key for i in h.cache.gc(max_bytes=0).removed}
            await h.adapter.restart()
            await h.settle()
            assert h.state("m") is State.LOADED, h.model("m").reason
            assert h.adapter.ready["m"].path == old.path
    run(scenario())


def test_a_preload_that_did_not_fit_loads_when_memory_frees(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http, budget=200 * 1024) as h:  # one 128 KiB model fits
            await h.apply(h.spec("a", preload=False))
            lease = await h.rec.acquire("a")  # in use: cannot be evicted
            await h.apply(h.spec("a", preload=False), h.spec("b"))
            assert h.state("b") is State.CACHED and "in-use" in h.model("b").reason
            await h.apply(h.spec("b"), settle=False)  # a removed: drains, then unloads
            h.rec.release(lease)
            await h.settle()
            await h.wait_for(lambda: h.state("b") is State.LOADED, what="b loaded once a freed its memory")
    run(scenario())


def test_removal_drains_requests_in_flight_and_refuses_new_ones(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http) as h:
            await h.apply(h.spec("m"))
            lease = await h.rec.acquire("m")
            await h.apply(settle=False)
            await asyncio.sleep(0.05)  # give the removal every chance to (wrongly) unload
            assert h.adapter.count("unload", "m") == 0, "unloaded under a request"
            with pytest.raises(UnknownModel):
                await h.rec.acquire("m")
            h.rec.release(lease)
            await h.settle()
            assert h.adapter.count("unload", "m") == 1 and "m" not in h.rec.models
    run(scenario())


def test_a_drain_is_bounded_by_the_drain_timeout_and_says_so(tmp_path, http, caplog):
    async def scenario():
        async with Harness(tmp_path, http, drain_timeout_s=0.1) as h:
            await h.apply(h.spec("m"))
            await h.rec.acquire("m")  # never released
            with caplog.at_level(logging.WARNING, logger="modelshelf.reconciler"):
                await h.apply()
            assert h.adapter.count("unload", "m") == 1
            assert any("drain timeout expired" in r.getMessage() for r in caplog.records)
    run(scenario())


def test_the_update_swap_waits_for_requests_in_flight(tmp_path, http):
    """Memory holds one copy only: the update swaps (unload, then load), and that unload waits
    for the request in flight; a request arriving meanwhile is served by the new copy."""
    async def scenario():
        async with Harness(tmp_path, http, budget=200 * 1024) as h:
            await h.apply(h.spec("m"))
            lease = await h.rec.acquire("m")
            await h.apply(h.spec("m", h.publish("m", version="v2")), settle=False)
            await h.wait_for(lambda: "v2" in h.model("m").entry.uri, what="the new copy pulled")
            await asyncio.sleep(0.05)
            assert h.adapter.count("unload", "m") == 0, "swapped under a request"
            late = asyncio.create_task(h.rec.acquire("m"))
            await asyncio.sleep(0.01)
            assert not late.done()
            h.rec.release(lease)
            m = await late
            assert m.state is State.LOADED and h.adapter.ready["m"].path == m.entry.path and "v2" in m.entry.uri
            h.rec.release(m)
            await h.settle()
    run(scenario())


def test_a_drain_waits_for_the_last_of_overlapping_requests(tmp_path, http):
    """Leases overlap (the next request starts before the previous ends, as under load): the
    removal's drain waits until the last one ends, not the first; the model serves again after."""
    async def scenario():
        async with Harness(tmp_path, http) as h:
            await h.apply(h.spec("m"))
            first = h.rec.try_acquire("m")
            second = await h.rec.acquire("m")
            h.rec.release(first)
            third = h.rec.try_acquire("m")  # a request arriving between the two ends
            h.rec.release(second)
            await h.apply(settle=False)
            await asyncio.sleep(0.05)  # give the removal every chance to (wrongly) unload
            assert h.adapter.count("unload", "m") == 0, "unloaded under a request"
            h.rec.release(third)
            await h.settle()
            assert h.adapter.count("unload", "m") == 1 and "m" not in h.rec.models
    run(scenario())


def test_the_in_flight_gauge_counts_a_removed_models_requests_until_they_end(tmp_path, http):
    """The modelshelf_inflight_requests series at each scrape: two requests in flight show 2;
    a request still held by a model removed from the config (its drain timed out) still shows
    until it ends, then 0."""
    def inflight(h):
        h.rec.fold_request_metrics()  # what each /metrics scrape runs first
        return h.metrics.inflight.labels(model="m")._value.get()

    async def scenario():
        async with Harness(tmp_path, http, drain_timeout_s=0.1) as h:
            await h.apply(h.spec("m"))
            a, b = h.rec.try_acquire("m"), h.rec.try_acquire("m")
            assert inflight(h) == 2
            h.rec.release(a)
            assert inflight(h) == 1
            await h.apply()  # removed: the drain times out, the model is gone from the reconciler
            assert "m" not in h.rec.models and inflight(h) == 1
            h.rec.release(b)
            assert inflight(h) == 0
    run(scenario())
