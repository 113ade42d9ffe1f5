"""Agents fit for a fleet, on the pull side (the real Reconciler, MemoryManager and Cache with
models on a real HTTP server, and the scripted server of tests/support/scripted.py):

- with `--prefetch preload` (fleet agents), `preload: false` models are not pulled (not even
  listed) until a request asks for them here; `--prefetch all` (the default) pulls them ahead;
- pull slots go to what a request waits for first: a cold model's first request is not queued
  behind hundreds of source checks nor behind other models' prefetches;
- a source check of a cached model runs no cache-wide scan (no GC, no re-index)."""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from agent.reconciler import State
from tests.reconciler.conftest import Harness, http, run  # noqa: F401  (http: fixture)


def listed(h: Harness, name: str) -> int:
    """Requests the model's source got (HEAD or GET): listing and downloading alike."""
    return sum(1 for _, path, _ in list(h.http.requests) if path.lstrip("/").startswith(f"{name}/"))


async def request_while_queued(h: Harness, name: str, queue: Callable[[], Any], progress: Callable[[], int]) -> int:
    """On a slow source (every answer 50 ms late), queue work for the pull slots, then serve one
    request for `name`; returns `progress()` (how much of the queued work was done) as the
    request was served. Afterwards the source is fast again and everything settles."""
    h.http.delay_s = 0.05
    try:
        queued = queue()
        if asyncio.iscoroutine(queued):
            await queued
        else:
            assert queued
        await asyncio.sleep(0.02)
        h.rec.release(await h.rec.acquire(name))
        done = progress()
        assert h.state(name) is State.LOADED
    finally:
        h.http.delay_s = 0.0
    await h.settle()
    return done


def test_a_lazy_model_is_not_pulled_until_its_first_request(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http, prefetch="preload") as h:
            await h.apply(h.spec("hot"), h.spec("cold", preload=False))
            assert h.state("hot") is State.LOADED
            assert h.state("cold") is State.REGISTERED and h.model("cold").entry is None
            assert listed(h, "cold") == 0, "a lazy model's source was touched before any request"
            assert h.rec.refresh_sources() == 1  # only what was pulled is re-checked
            await h.settle()
            assert listed(h, "cold") == 0
            h.rec.release(await h.rec.acquire("cold"))
            assert h.state("cold") is State.LOADED and h.http.get_count("cold/v1/model.bin") == 1
    run(scenario())


def test_prefetch_all_pulls_every_model_ahead(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http, prefetch="all") as h:
            await h.apply(h.spec("hot"), h.spec("cold", preload=False))
            assert h.state("cold") is State.CACHED and h.http.get_count("cold/v1/model.bin") == 1
            assert h.adapter.count("load", "cold") == 0  # pulled, not loaded
    run(scenario())


def test_a_cold_request_is_not_queued_behind_source_checks(tmp_path, http):
    """40 cached models' periodic checks queue for two pull slots on a slow source (each check
    waits for the source's answer); a request for a model never pulled here is served while
    most checks still wait (first come, first served: it waited for all 40)."""
    async def scenario():
        async with Harness(tmp_path, http, budget=64 * 2**20, pull_concurrency=2, prefetch="preload") as h:
            names = [f"m{i}" for i in range(40)]
            await h.apply(*(h.spec(n) for n in names), h.spec("cold", preload=False), settle=True)
            assert all(h.state(n) is State.LOADED for n in names)
            start = len(http.requests)
            checks_done = await request_while_queued(
                h, "cold", lambda: h.rec.refresh_sources() == 40,
                lambda: sum(1 for _, path, _ in http.requests[start:] if path.lstrip("/").startswith("m")))
            assert checks_done < 20, f"the cold request waited for {checks_done} of 40 source checks"
    run(scenario())


def test_a_request_promotes_its_model_s_queued_prefetch(tmp_path, http):
    """`--prefetch all` on a slow source: 30 models queue for two pull slots. A request for the
    last of them gets its pull next (its model's converge holds the model while it queues, so
    first come, first served made the request wait for all 30)."""
    async def scenario():
        async with Harness(tmp_path, http, pull_concurrency=2, prefetch="all") as h:
            names = [f"p{i}" for i in range(30)]
            specs = [h.spec(n, preload=False) for n in names]
            pulled = await request_while_queued(h, "p29", lambda: h.apply(*specs, settle=False),
                                                lambda: sum(1 for n in names if h.model(n).entry is not None))
            assert pulled < 15, f"the request waited for {pulled} of 30 prefetches"
    run(scenario())


def test_a_source_check_runs_no_cache_wide_scan(tmp_path, http):
    """Checks of 20 cached models under a cache budget: hits only, no GC and no re-index."""
    async def scenario():
        async with Harness(tmp_path, http, budget=64 * 2**20, max_cache_bytes=2**30) as h:
            await h.apply(*(h.spec(f"m{i}") for i in range(20)))
            calls = {"gc": 0, "rescan": 0}

            def spy(name, real):
                def wrapped(*a, **kw):
                    calls[name] += 1
                    return real(*a, **kw)
                return wrapped

            h.cache.gc = spy("gc", h.cache.gc)
            h.cache._rescan = spy("rescan", h.cache._rescan)
            h.cache.rescan_s = 3600.0
            assert h.rec.refresh_sources() == 20
            await h.settle()
            assert calls == {"gc": 0, "rescan": 0}
    run(scenario())


def test_pull_slots_keep_the_last_one_for_a_request_and_lose_none_on_cancel():
    from agent.slots import BACKGROUND, CHECK, URGENT, PrioritySlots

    async def scenario():
        slots = PrioritySlots(2)
        order: list[str] = []
        hold = asyncio.Event()

        async def work(name: str, rank: int) -> None:
            async with slots.slot(lambda: rank):
                order.append(name)
                await hold.wait()

        first = asyncio.create_task(work("bg1", BACKGROUND))
        check = asyncio.create_task(work("check", CHECK))
        bg2 = asyncio.create_task(work("bg2", BACKGROUND))
        await asyncio.sleep(0.01)
        assert order == ["bg1"], "background work took the slot kept for requests"
        urgent = asyncio.create_task(work("urgent", URGENT))
        await asyncio.sleep(0.01)
        assert order == ["bg1", "urgent"]
        bg2.cancel()  # a waiter that goes away leaves no hole
        await asyncio.gather(bg2, return_exceptions=True)
        hold.set()
        await asyncio.gather(first, check, urgent)
        assert order == ["bg1", "urgent", "check"] and slots._in_use == 0 and slots.waiting == 0

    run(scenario())
