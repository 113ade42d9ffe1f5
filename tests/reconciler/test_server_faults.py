"""Item 9 (the server's real state is reconciled) and item 10, reconciler side (a load that
kills the server is quarantined, loads time out, lazy loads are not starved, requests queue
behind a load under over-commit)."""
from __future__ import annotations

import asyncio

import pytest

from agent.reconciler import ModelUnavailable, State
from tests.reconciler.conftest import Harness, run

QUARANTINE = "server died twice while loading this model; quarantined until its config changes"


def test_a_model_unloaded_behind_the_agent_is_reloaded_by_the_periodic_resync(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http, resync_interval_s=0.05) as h:
            await h.apply(h.spec("m"))
            h.adapter.lose("m")
            await h.wait_for(lambda: "m" in h.adapter.ready and h.state("m") is State.LOADED, what="m reloaded by the resync")
            assert h.adapter.count("load", "m") == 2
    run(scenario())


def test_report_missing_rechecks_the_server_and_reloads_at_once(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http) as h:  # resync every hour: only the report helps
            await h.apply(h.spec("m"), h.spec("n"))
            h.adapter.lose("m")
            h.rec.report_missing("m")
            h.rec.report_missing("n")  # a wrong report: the index says READY, nothing reloads
            h.rec.report_missing("nobody")  # never raises
            await h.settle()
            await h.wait_for(lambda: "m" in h.adapter.ready, what="m reloaded")
            assert h.adapter.count("load", "m") == 2 and h.adapter.count("load", "n") == 1
    run(scenario())


def test_a_model_whose_load_kills_the_server_twice_is_quarantined_and_the_rest_serve(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http) as h:
            await h.apply(h.spec("good"))
            h.adapter.fail_next("load", "bad", "crash")
            h.adapter.fail_next("load", "bad", "crash")
            await h.apply(h.spec("good"), h.spec("bad"))
            await h.wait_for(lambda: h.model("bad").reason == QUARANTINE, what="bad quarantined")
            await asyncio.sleep(0.2)  # retries would come every ~50 ms: none may
            await h.settle()
            assert h.adapter.count("load", "bad") == 2 and h.adapter.restarts == 2
            assert h.state("bad") is State.FAILED
            assert h.state("good") is State.LOADED and "good" in h.adapter.ready
            with pytest.raises(ModelUnavailable) as e:
                await h.rec.acquire("bad")
            assert e.value.reason == QUARANTINE and e.value.retry_after is None
            await h.apply(h.spec("good"), h.spec("bad", h.publish("bad", version="v2")))  # a config change frees it
            await h.wait_for(lambda: h.state("bad") is State.LOADED, what="bad loaded after its config changed")
    run(scenario())


def test_a_load_that_hangs_fails_after_the_load_timeout_and_frees_its_memory(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http, load_timeout_s=0.3, retry_base_s=60.0) as h:
            await h.apply(h.spec("m", preload=False))
            h.adapter.hold("load", "m")  # never answers
            with pytest.raises(ModelUnavailable):
                await h.rec.acquire("m")
            await h.wait_for(lambda: h.state("m") is State.FAILED, what="m failed")
            assert "load-timeout" in h.model("m").reason
            assert h.memory.reservations() == {}
    run(scenario())


def test_hanging_preloads_do_not_starve_a_request_s_lazy_load(tmp_path, http):
    """Two preloads hang in the server (both load slots, today): a request's lazy load still
    finds a slot and loads."""
    async def scenario():
        async with Harness(tmp_path, http, load_timeout_s=3.0, load_concurrency=2) as h:
            gates = [h.adapter.hold("load", n) for n in ("p1", "p2")]
            await h.apply(h.spec("p1"), h.spec("p2"), h.spec("lazy", preload=False), settle=False)
            await gates[0].entered.wait()
            m = await h.rec.acquire("lazy")
            assert m.state is State.LOADED
            h.rec.release(m)
            for g in gates:
                g.release()
            await h.settle()
    run(scenario())


def test_under_over_commit_a_request_waits_for_memory_instead_of_an_immediate_503(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http, budget=200 * 1024) as h:  # one model at a time
            await h.apply(h.spec("a", preload=False), h.spec("b", preload=False))
            lease = await h.rec.acquire("a")
            waiting = asyncio.create_task(h.rec.acquire("b"))
            await asyncio.sleep(0.05)
            assert not waiting.done(), f"answered at once: {waiting.exception() if waiting.done() else ''}"
            h.rec.release(lease)
            m = await waiting
            assert m.state is State.LOADED and h.state("a") is State.CACHED
            h.rec.release(m)
    run(scenario())
