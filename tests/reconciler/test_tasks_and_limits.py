"""Items 11 and 7 (reconciler side): lazy loads are tracked tasks, a source check never holds a
model's lock while it queues for a pull slot, and --max-queue / --load-timeout bound a wait."""
from __future__ import annotations

import asyncio

import pytest

from agent.reconciler import ModelUnavailable, State
from tests.reconciler.conftest import Harness, run


def test_lazy_loads_are_tracked_by_wait_idle_and_close(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http) as h:
            await h.apply(h.spec("m", preload=False))
            gate = h.adapter.hold("load", "m")
            request = asyncio.create_task(h.rec.acquire("m"))
            await gate.entered.wait()
            with pytest.raises(TimeoutError):
                await h.rec.wait_idle(0.05)
            gate.release()
            h.rec.release(await request)
            await h.settle()
            second = h.adapter.hold("load", "n")
            await h.apply(h.spec("m", preload=False), h.spec("n", preload=False))
            pending = asyncio.create_task(h.rec.acquire("n"))
            await second.entered.wait()
            lazy = h.model("n").load_task
            await h.rec.close()
            assert lazy.done(), "close() left a lazy load running"
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
    run(scenario())


def test_a_source_check_does_not_hold_the_model_while_it_waits_for_a_pull_slot(tmp_path, http):
    """One pull slot, busy with a slow download: the periodic source check of a cached model
    queues for it, and a request for that model loads meanwhile (today: it waits for the
    unrelated download to finish)."""
    async def scenario():
        async with Harness(tmp_path, http, pull_concurrency=1) as h:
            m_spec = h.spec("m", preload=False)
            await h.apply(m_spec)
            big = h.publish("big", size=3 * 2**20)
            http.rate_bps = 1.5 * 2**20  # the download takes about two seconds
            await h.apply(m_spec, h.spec("big", big), settle=False)
            await h.wait_for(lambda: h.state("big") is State.PULLING, what="big pulling")
            assert h.rec.refresh_sources() >= 1
            await asyncio.sleep(0.05)
            lease = await h.rec.acquire("m")
            assert h.state("big") is State.PULLING, "the request waited for an unrelated download"
            h.rec.release(lease)
            http.rate_bps = None
            await h.settle()
    run(scenario())


def test_max_queue_bounds_the_requests_waiting_for_one_load(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http, max_queue=2) as h:
            await h.apply(h.spec("m", preload=False))
            gate = h.adapter.hold("load", "m")
            waiting = [asyncio.create_task(h.rec.acquire("m")) for _ in range(2)]
            await gate.entered.wait()
            await asyncio.sleep(0)
            with pytest.raises(ModelUnavailable) as e:
                await h.rec.acquire("m")
            assert "2 requests already wait" in e.value.reason and e.value.retry_after == 1
            gate.release()
            for t in waiting:
                h.rec.release(await t)
            assert h.adapter.count("load", "m") == 1
    run(scenario())


def test_a_request_whose_lazy_load_was_cancelled_before_it_ran_is_answered_at_once(tmp_path, http):
    """Requests wait on an event their lazy load sets as it ends; a load task cancelled before its
    first step (close() or a config removal right after the request came) must still wake them,
    not leave them to the load timeout."""
    async def scenario():
        async with Harness(tmp_path, http, load_timeout_s=30.0) as h:
            await h.apply(h.spec("m", preload=False))
            request = asyncio.create_task(h.rec.acquire("m"))
            while h.model("m").load_task is None:  # this task's next turn is queued before the load's first
                await asyncio.sleep(0)
            h.model("m").load_task.cancel()
            with pytest.raises(ModelUnavailable):
                await asyncio.wait_for(request, 2.0)
            assert h.model("m").waiters == 0
    run(scenario())


def test_load_timeout_bounds_a_request_s_wait(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http, load_timeout_s=0.2, retry_base_s=60.0) as h:
            await h.apply(h.spec("m", preload=False))
            h.adapter.hold("load", "m")
            with pytest.raises(ModelUnavailable) as e:
                await h.rec.acquire("m")
            assert e.value.retry_after is not None
            assert h.model("m").inflight == 0
    run(scenario())
