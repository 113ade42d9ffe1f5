"""Issue 13 item 1, reconciler side: a miss's victims are unloaded off its critical path (the
load starts once each eviction committed, while the unloads run), the ledger stays within its
budget meanwhile, a load that will be measured still waits for its victims, and each lazy load's
time is broken down in /metrics (modelshelf_cold_start_phase_seconds{phase}).

The scripted server holds the victim's unload open, so the interleaving is exact. The harness's
ledger has no server pid, so it would measure every load; the tests of the off-path unload set
`needs_measure` to answer as it does for a warm server whose entries are measured already (the
steady state of a dense node), and one test keeps the real answer to pin the measured case.
"""
from __future__ import annotations

import asyncio
import os
import random
import time

import pytest

from agent.memory import MemoryManager
from agent.reconciler import HEADROOM_PRESSURE_S, HEADROOM_WINDOW_S, MissRuns, State
from tests.reconciler.conftest import KB, Harness, run

ONE_MODEL = 200 * KB  # a 64 KiB sklearn entry is reserved at 128 KiB: one fits, two do not


def _measured_already(h: Harness) -> None:
    h.memory.needs_measure = lambda key, runtime, **_: False  # type: ignore[method-assign]


async def _a_loaded_then_b_misses(h: Harness):
    """a and b configured (lazy), a loaded, a's next unload held: returns (gate, b's acquire task)."""
    await h.apply(h.spec("a", preload=False), h.spec("b", preload=False))
    h.rec.release(await h.rec.acquire("a"))
    gate = h.adapter.hold("unload", "a")
    return gate, asyncio.create_task(h.rec.acquire("b"))


def _phase(h: Harness, phase: str, stat: str) -> float:
    return h.metrics.registry.get_sample_value(f"modelshelf_cold_start_phase_seconds_{stat}", {"phase": phase}) or 0.0


def _waits(h: Harness) -> dict[str, int]:
    """Lazy loads that waited for unloads, by the rule that made them wait (/metrics)."""
    rules = ("victim_measured", "victim_gpu", "victim_overlap", "in_flight_measured", "in_flight_overlap")
    return {r: int(n) for r in rules
            if (n := h.metrics.registry.get_sample_value("modelshelf_cold_start_unload_wait_seconds_count", {"rule": r}))}


def test_a_miss_loads_while_its_victim_unloads_and_the_ledger_stays_within_budget(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http, budget=ONE_MODEL, unload_overlap=1.0) as h:  # the server may hold both
            _measured_already(h)
            free_at_load: list[int] = []
            h.adapter.on_load = lambda model: free_at_load.append(h.memory.free()["host"])
            gate, miss = await _a_loaded_then_b_misses(h)
            await gate.entered.wait()
            # the victim's unload is still in flight, and b serves already
            b = await asyncio.wait_for(miss, 2.0)
            assert b.state is State.LOADED and "b" in h.adapter.ready
            assert h.state("a") is State.UNLOADING and "a" in h.adapter.ready
            # at each load the ledger had room for it (a's bytes were promised to b, not counted twice)
            assert free_at_load == [ONE_MODEL - 128 * KB] * 2, free_at_load
            assert h.memory.free()["host"] >= 0  # used: a counts as gone
            assert h.memory.held()["host"] == 2 * 128 * KB  # held: a until its unload ends
            gate.release()
            await h.wait_for(lambda: h.state("a") is State.CACHED, what="a unloaded")
            assert h.memory.held()["host"] == 128 * KB
            h.rec.release(b)
            assert h.adapter.count("unload", "a") == 1
    run(scenario())


def test_by_default_a_load_waits_for_unloads_that_would_leave_the_server_over_its_budget(tmp_path, http):
    """--unload-overlap (default 0.05): while a victim unloads the server still holds it; a miss
    whose load would put what the server holds above budget x 1.05 waits for the unload, so real
    memory never leaves the budget's tolerance for the sake of a faster cold start."""
    async def scenario():
        async with Harness(tmp_path, http, budget=ONE_MODEL) as h:
            _measured_already(h)
            held_at_load: list[int] = []
            h.adapter.on_load = lambda model: held_at_load.append(h.memory.held()["host"])
            gate, miss = await _a_loaded_then_b_misses(h)
            await gate.entered.wait()
            await asyncio.sleep(0.2)
            assert not miss.done() and "b" not in h.adapter.ready  # b waits: a is still in the server
            gate.release()
            b = await asyncio.wait_for(miss, 2.0)
            assert b.state is State.LOADED and h.state("a") is State.CACHED
            assert max(held_at_load) <= ONE_MODEL * 1.05, held_at_load
            assert _waits(h) == {"victim_overlap": 1}  # /metrics says which rule held it
            h.rec.release(b)
    run(scenario())


def test_a_request_for_the_victim_during_its_unload_waits_and_then_loads_it_again(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http, budget=ONE_MODEL, unload_overlap=1.0) as h:  # the server may hold both
            _measured_already(h)
            gate, miss = await _a_loaded_then_b_misses(h)
            b = await asyncio.wait_for(miss, 2.0)
            await gate.entered.wait()
            back = asyncio.create_task(h.rec.acquire("a"))  # no lease on a copy being unloaded
            await asyncio.sleep(0.05)
            assert not back.done() and h.model("a").inflight == 1
            h.rec.release(b)
            gate.release()
            a = await asyncio.wait_for(back, 2.0)
            assert a.state is State.LOADED and h.state("b") is State.CACHED
            assert h.adapter.count("load", "a") == 2 and h.adapter.count("unload", "a") == 1
            assert h.memory.free()["host"] >= 0
            h.rec.release(a)
    run(scenario())


def test_a_load_that_will_be_measured_waits_for_its_victims_unloads(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http, budget=ONE_MODEL) as h:  # no pid: every load is measured
            gate, miss = await _a_loaded_then_b_misses(h)
            await gate.entered.wait()
            await asyncio.sleep(0.05)
            assert not miss.done() and h.adapter.count("load", "b") == 0  # its window must not see a's unload
            gate.release()
            h.rec.release(await asyncio.wait_for(miss, 2.0))
            assert _phase(h, "unload", "sum") >= 0.05  # the wait shows in the breakdown
            assert _waits(h) == {"victim_measured": 1}
    run(scenario())


def test_a_victim_holding_gpu_memory_is_unloaded_before_the_load_starts(tmp_path, http):
    async def scenario():
        h = Harness(tmp_path, http)
        h.memory = MemoryManager({"host": 10 * 2**20, "gpu:0": 150 * KB}, store=h.cache, min_residency_s=0.0, min_model_bytes=1)
        h.rec.memory = h.memory
        async with h:
            _measured_already(h)
            await h.apply(h.spec("a", preload=False, gpu_memory=100 * KB), h.spec("b", preload=False, gpu_memory=100 * KB))
            h.rec.release(await h.rec.acquire("a"))
            gate = h.adapter.hold("unload", "a")
            miss = asyncio.create_task(h.rec.acquire("b"))
            await gate.entered.wait()
            await asyncio.sleep(0.05)
            assert not miss.done() and h.adapter.count("load", "b") == 0  # a device has no slack for both
            gate.release()
            h.rec.release(await asyncio.wait_for(miss, 2.0))
            assert _waits(h) == {"victim_gpu": 1}
    run(scenario())


def test_each_lazy_load_is_broken_down_into_phases_in_the_metrics(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http, budget=ONE_MODEL) as h:
            _measured_already(h)
            h.adapter.load_delay = 0.05  # the "server" takes 50 ms to load
            await h.apply(h.spec("a", preload=False), h.spec("b", preload=False))
            h.rec.release(await h.rec.acquire("a"))
            h.rec.release(await h.rec.acquire("b"))
            h.rec.release(await h.rec.acquire("b"))  # a hit: no load, nothing observed
            for phase in ("queue", "unload", "server", "measure", "agent"):
                assert _phase(h, phase, "count") == 2, phase
            assert _phase(h, "server", "sum") >= 0.1
            assert _phase(h, "unload", "sum") < 0.05  # the scripted unload is instant: any wait for a's unload (the overlap rule) is short
            total = sum(_phase(h, p, "sum") for p in ("queue", "unload", "server", "measure", "agent"))
            cold = h.metrics.registry.get_sample_value("modelshelf_cold_start_seconds_sum")
            assert total <= cold + 0.01  # the phases split the requests' wait, they add nothing
    run(scenario())


def test_a_lazy_load_beside_another_load_takes_no_window_that_would_be_discarded(tmp_path, http):
    """With another load in flight a measurement window is contaminated from its start and
    never recorded: the lazy load skips it (no process-tree snapshots, no wait for the open
    window) once the runtime's import is charged. The first load of the runtime is measured."""
    async def scenario():
        h = Harness(tmp_path, http)
        h.memory = MemoryManager({"host": 10 * 2**20}, store=h.cache, server_pid=os.getpid(), min_residency_s=0.0,
                                 min_model_bytes=1)
        h.rec.memory = h.memory
        windows: list[str] = []
        start = h.memory.start_measure
        def measured_windows(name, runtime=None, *, measure=True, server_pid=None):  # every load opens one; which take snapshots
            if measure:
                windows.append(name)
            return start(name, runtime, measure=measure, server_pid=server_pid)
        h.memory.start_measure = measured_windows  # type: ignore[method-assign]
        async with h:
            await h.apply(*(h.spec(n, preload=False) for n in ("a", "b", "c")))
            h.rec.release(await h.rec.acquire("a"))
            assert windows == ["a"] and "runtime:sklearn" in h.memory.overhead()
            gate = h.adapter.hold("load", "b")
            b = asyncio.create_task(h.rec.acquire("b"))
            await gate.entered.wait()
            h.rec.release(await asyncio.wait_for(h.rec.acquire("c"), 2.0))  # while b's load is in flight
            assert windows == ["a", "b"], windows  # c took no measured window (no snapshot, no wait)
            gate.release()
            h.rec.release(await b)
    run(scenario())



def test_a_lazy_load_waits_for_the_runtime_import_in_flight_so_the_import_is_measured_alone(tmp_path, http):
    """The runtime's first load in the server imports it (seconds) and is measured: that window
    charges the import to the server for good. A request's load arriving meanwhile (a window
    opened on the loop) is not sent to the server until the import's load ends, so its model
    never lands in the import's figure; once it ends, the load goes on and serves."""
    async def scenario():
        h = Harness(tmp_path, http)  # MLServer's profile: the sklearn import is charged (estimated) from its start
        h.memory = MemoryManager({"host": 200 * 2**20}, store=h.cache, server_pid=os.getpid(), min_residency_s=0.0,
                                 min_model_bytes=1, profile="mlserver")
        h.rec.memory = h.memory
        spoilt: dict[str, bool] = {}
        finish = h.memory.finish_measure
        def recorded(m, *, key=None):
            spoilt[m.name] = m.contaminated
            return finish(m, key=key)
        h.memory.finish_measure = recorded  # type: ignore[method-assign]
        async with h:
            await h.apply(*(h.spec(n, preload=False) for n in ("a", "b")))
            gate = h.adapter.hold("load", "a")  # a's load imports the runtime: held open
            a = asyncio.create_task(h.rec.acquire("a"))
            await gate.entered.wait()
            b = asyncio.create_task(h.rec.acquire("b"))
            await asyncio.sleep(0.3)
            assert not [c for c in h.adapter.calls if c.op == "load" and c.name == "b"], "b's load went beside the import"
            gate.release()
            h.rec.release(await a)
            h.rec.release(await asyncio.wait_for(b, 5.0))
            assert spoilt == {"a": False, "b": False}, spoilt  # each window saw its own load alone: both recorded
    run(scenario())


def test_a_runtime_import_that_hangs_holds_a_lazy_load_back_no_longer_than_the_import_wait(tmp_path, http):
    """The runtime's first load hangs: a request's load waits for it at most `import_wait_s`,
    then goes to the server beside it and serves."""
    async def scenario():
        h = Harness(tmp_path, http)
        h.memory = MemoryManager({"host": 200 * 2**20}, store=h.cache, server_pid=os.getpid(), min_residency_s=0.0,
                                 min_model_bytes=1, profile="mlserver", import_wait_s=0.3)
        h.rec.memory = h.memory
        async with h:
            await h.apply(*(h.spec(n, preload=False) for n in ("a", "b")))
            gate = h.adapter.hold("load", "a")  # a's load imports the runtime, and hangs
            a = asyncio.create_task(h.rec.acquire("a"))
            await gate.entered.wait()
            h.rec.release(await asyncio.wait_for(h.rec.acquire("b"), 5.0))  # while a's is still held
            gate.release()
            h.rec.release(await a)
    run(scenario())

# -- headroom: a free margin kept by evicting ahead of need, off any request's path ---------------

SLOT = 128 * KB  # what one 64 KiB sklearn entry reserves
SLOTS = 12  # the budget below holds 12: room for one is under 10% of it, so the headroom applies


def _unloads_in_flight(h: Harness) -> list[str]:
    return [c.name for c in h.adapter.calls if c.op == "unload" and c.outcome is None]


async def _fill(h: Harness, names: list[str]) -> None:
    for n in names:
        h.rec.release(await h.rec.acquire(n))


async def _full_node(h: Harness, slots: int, extra: int) -> list[str]:
    """`slots + extra` lazy models configured (their entries measured already), the first
    `slots` loaded: a full node. Returns their names, oldest first."""
    _measured_already(h)
    names = [f"m{i:02}" for i in range(slots + extra)]
    await h.apply(*(h.spec(n, preload=False) for n in names))
    await _fill(h, names[:slots])
    return names


def test_with_headroom_a_miss_on_a_full_node_loads_with_no_unload_on_its_path(tmp_path, http):
    """Models that all fit give up no room. Once a miss had to evict on its own path, the
    headroom evicts the next LRU model in the background, so the next miss finds room: its
    load starts with no unload in flight, and the model it would have had to unload (held open
    here) is not on its path."""
    async def scenario():
        async with Harness(tmp_path, http, budget=SLOTS * SLOT) as h:
            names = await _full_node(h, SLOTS, 2)
            assert await h.rec._keep_headroom() == 0  # they all fit: no miss needed room, none is given up
            assert all(h.state(n) is State.LOADED for n in names[:SLOTS]) and h.memory.free()["host"] == 0
            h.rec.release(await asyncio.wait_for(h.rec.acquire(names[SLOTS]), 2.0))  # evicts m00 on its path
            await h.wait_for(lambda: h.memory.free()["host"] >= SLOT and not _unloads_in_flight(h), timeout=2.0,
                             what="room for one load kept free")
            assert h.state(names[1]) is State.CACHED  # the next LRU model made the room, off any path
            lru = min((m for m in h.rec.models.values() if m.state is State.LOADED), key=lambda m: m.last_used).name
            gate = h.adapter.hold("unload", lru)  # the victim the miss would otherwise unload first
            at_load: list[list[str]] = []
            h.adapter.on_load = lambda model: at_load.append(_unloads_in_flight(h))
            m = await asyncio.wait_for(h.rec.acquire(names[-1]), 2.0)
            assert m.state is State.LOADED and at_load == [[]], at_load  # nothing unloading at its load
            assert h.memory.held()["host"] <= SLOTS * SLOT
            await gate.entered.wait()  # then the margin is made again, in the background
            gate.release()
            await h.wait_for(lambda: h.state(lru) is State.CACHED, what="the next LRU evicted ahead of need")
            assert h.model(names[-1]).state is State.LOADED
            h.rec.release(m)
    run(scenario())


def test_the_headroom_never_evicts_a_leased_a_pinned_or_a_young_model(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http, budget=SLOTS * SLOT) as h:
            _measured_already(h)
            others = [f"m{i:02}" for i in range(SLOTS - 1)]  # with pinned and leased: one more than fits
            await h.apply(h.spec("pinned", pinned=True), h.spec("leased", preload=False),
                          *(h.spec(n, preload=False) for n in others))
            leased = await h.rec.acquire("leased")  # held through the test's first part
            await _fill(h, others)  # the last one evicts m00 on its path; then the headroom goes on
            await h.wait_for(lambda: h.state(others[1]) is State.CACHED, timeout=2.0, what="the headroom eviction")
            assert h.state("pinned") is State.LOADED and h.state("leased") is State.LOADED  # older, but kept
            assert h.adapter.count("unload", "pinned") == h.adapter.count("unload", "leased") == 0
            # young: every model was loaded less than min_residency_s ago
            h.memory.min_residency_s = 3600.0
            h.rec.release(leased)  # leased is now the least recently used model that may go
            h.rec.release(await asyncio.wait_for(h.rec.acquire(others[1]), 2.0))  # fills the margin
            assert await h.rec._keep_headroom() == 0
            assert all(h.state(n) is State.LOADED for n in ["pinned", "leased", *others[1:]])
            assert h.adapter.count("unload", "leased") == 0 and h.memory.free()["host"] < SLOT
    run(scenario())


def test_headroom_zero_fills_the_budget_and_a_miss_evicts_on_its_path_as_before(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http, budget=SLOTS * SLOT, headroom=0.0) as h:
            names = await _full_node(h, SLOTS, 1)
            gate = h.adapter.hold("unload", names[0])
            miss = asyncio.create_task(h.rec.acquire(names[-1]))
            await gate.entered.wait()  # the miss unloads its victim itself
            await asyncio.sleep(0.05)
            assert not miss.done() and h.adapter.count("load", names[-1]) == 0  # and waits for it (budget x 1.05)
            gate.release()
            h.rec.release(await asyncio.wait_for(miss, 2.0))
            assert await h.rec._keep_headroom() == 0  # under pressure, still nothing evicted ahead of need
            assert h.adapter.count("unload") == 1 and h.memory.free()["host"] == 0
            assert h.rec.status()["headroom"] == {"max_loads": 0.0, "loads": 0, "bytes": {}}
    run(scenario())


@pytest.mark.parametrize("device", ["host", "gpu:0"])
def test_a_miss_beside_a_headroom_unload_waits_while_the_server_could_not_hold_both(tmp_path, http, device):
    """The headroom's unload is held open when a miss arrives: its bytes are promised, so the
    miss needs no victim, but the server still holds them; with --unload-overlap 0 (host) or on
    a GPU (no slack) the load waits for the unload: what the server holds never exceeds the
    budget, nor does the ledger's `used`."""
    async def scenario():
        gpu = device != "host"
        h = Harness(tmp_path, http, budget=SLOTS * SLOT, unload_overlap=0.0 if not gpu else 1.0)
        if gpu:
            h.memory = MemoryManager({"host": 10 * 2**20, "gpu:0": SLOTS * 100 * KB}, store=h.cache, min_residency_s=0.0,
                                     min_model_bytes=1)
            h.rec.memory = h.memory
        budget = h.memory.budget()[device]
        async with h:
            _measured_already(h)
            names = [f"m{i:02}" for i in range(SLOTS + 2)]
            await h.apply(*(h.spec(n, preload=False, gpu_memory=100 * KB if gpu else None) for n in names))
            seen: list[tuple[int, int]] = []
            h.adapter.on_load = lambda model: seen.append((h.memory.held()[device], h.memory.used()[device]))
            await _fill(h, names[:SLOTS])
            gate = h.adapter.hold("unload", names[1])  # the headroom's victim, once a miss evicted m00
            h.rec.release(await asyncio.wait_for(h.rec.acquire(names[SLOTS]), 2.0))
            await gate.entered.wait()
            miss = asyncio.create_task(h.rec.acquire(names[-1]))
            await asyncio.sleep(0.05)
            assert not miss.done() and h.adapter.count("load", names[-1]) == 0
            assert h.memory.used()[device] <= budget
            gate.release()
            h.rec.release(await asyncio.wait_for(miss, 2.0))
            assert all(held <= budget and used <= budget for held, used in seen), seen
            assert _phase(h, "unload", "sum") > 0  # the wait shows in the breakdown
            assert _waits(h).get("in_flight_overlap") == 1  # not its own victim: the headroom's, in flight
    run(scenario())


WIDE = 50  # a budget of 50 loads: the 10% cap is 5 loads, so --headroom 8 would keep 5 free


def _loaded(h: Harness) -> int:
    return sum(1 for m in h.rec.models.values() if m.state is State.LOADED)


def test_a_node_one_model_short_of_its_working_set_keeps_all_but_one_when_misses_are_rare(tmp_path, http):
    """Issue 13 follow-up: a working set one model bigger than the budget, under steady skewed
    traffic whose misses come one at a time (each miss's refill unload ends before the next
    miss): the headroom keeps one load free, so the node holds all but one of what fits (it
    kept min(--headroom, 10% of the budget) = 5 free before, holding 45 of 50)."""
    async def scenario():
        async with Harness(tmp_path, http, budget=WIDE * SLOT) as h:
            _measured_already(h)
            names = [f"m{i:02}" for i in range(WIDE + 1)]  # one more than fits
            await h.apply(*(h.spec(n, preload=False) for n in names))
            rng = random.Random(13)
            weights = [1 / (rank + 1) for rank in range(len(names))]  # Zipf-like: m00 the hottest
            for name in [*names, *rng.choices(names, weights, k=400)]:
                h.rec.release(await asyncio.wait_for(h.rec.acquire(name), 2.0))
                await h.wait_for(lambda: not _unloads_in_flight(h), what="the unloads ended")
            assert h.metrics.registry.get_sample_value("modelshelf_evictions_total") > 0  # misses needed room
            await h.rec._keep_headroom()
            assert _loaded(h) == WIDE - 1, _loaded(h)  # all but the one load kept free
            assert h.memory.free()["host"] == SLOT
            # what it keeps is shown: /status and the modelshelf_headroom_bytes gauge
            assert h.rec.status()["headroom"] == {"max_loads": 8.0, "loads": 1, "bytes": {"host": SLOT}}
            h.rec.update_gauges()
            assert h.metrics.registry.get_sample_value("modelshelf_headroom_bytes", {"device": "host"}) == SLOT
    run(scenario())


def test_misses_that_come_while_unloads_are_in_flight_grow_the_headroom_to_its_cap(tmp_path, http):
    """A miss storm: each miss comes while an unload is still in flight (the first victim's,
    held open here), so the run grows with every miss and the headroom with it, up to
    min(--headroom, 10% of the budget): a miss on a full node still loads at once."""
    async def scenario():
        async with Harness(tmp_path, http, budget=WIDE * SLOT) as h:
            names = await _full_node(h, WIDE, 6)
            gate = h.adapter.hold("unload", names[0])  # the first miss's own victim
            h.rec.release(await asyncio.wait_for(h.rec.acquire(names[WIDE]), 2.0))
            await gate.entered.wait()
            assert h.rec._misses.run == 1
            for i, name in enumerate(names[WIDE + 1:WIDE + 5], start=2):
                h.rec.release(await asyncio.wait_for(h.rec.acquire(name), 2.0))  # m00's unload still in flight
                assert h.rec._misses.run == i and h.rec._misses.loads(time.monotonic()) == i
            await h.wait_for(lambda: h.memory.free()["host"] >= 5 * SLOT, what="five loads kept free")
            gate.release()
            h.rec.release(await asyncio.wait_for(h.rec.acquire(names[-1]), 2.0))  # a miss after the storm
            assert h.rec._misses.run == 1 and h.rec._misses.loads(time.monotonic()) == 5  # the window remembers
            await h.wait_for(lambda: not _unloads_in_flight(h), what="the unloads ended")
            await h.rec._keep_headroom()
            assert h.memory.free()["host"] == 5 * SLOT  # capped: 10% of the budget, under --headroom 8
            assert _waits(h) == {}  # no miss waited for an unload
            assert h.rec.status()["headroom"] == {"max_loads": 8.0, "loads": 5, "bytes": {"host": 5 * SLOT}}
            h.rec.update_gauges()
            assert h.metrics.registry.get_sample_value("modelshelf_headroom_bytes", {"device": "host"}) == 5 * SLOT
    run(scenario())


def test_miss_runs_size_the_headroom_over_a_recent_window():
    runs = MissRuns()
    assert runs.loads(0.0) == 0  # no pressure: no headroom
    runs.miss(100.0, unloading=False)
    assert runs.loads(100.0) == 1  # rare misses: one load
    for t in (100.1, 100.2, 100.3):
        runs.miss(t, unloading=True)  # each came while an unload was in flight
    assert runs.loads(100.3) == 4
    runs.miss(105.0, unloading=False)  # a new run
    assert runs.loads(105.0) == 4  # the window's longest
    assert runs.loads(100.3 + HEADROOM_WINDOW_S + 0.01) == 1  # the long run left the window
    assert runs.loads(105.0 + HEADROOM_WINDOW_S + 0.01) == 1  # still under pressure: one load
    assert runs.loads(105.0 + HEADROOM_PRESSURE_S) == 0  # misses stopped: none


def test_the_headroom_flag_takes_a_number_of_loads_and_says_what_is_wrong(capsys):
    from agent.cli import build_parser, settings_from_args

    def parse(*flags: str):
        return settings_from_args(build_parser().parse_args(["run", "--config-dir", "/c", "--cache-dir", "/d", *flags]))

    assert parse().headroom == 8.0 and parse("--headroom", "0").headroom == 0.0 and parse("--headroom", "2.5").headroom == 2.5
    for bad in ("-1", "lots", "inf"):
        with pytest.raises(SystemExit):
            parse("--headroom", bad)
        assert f"--headroom {bad!r} is not a number of loads" in capsys.readouterr().err


def test_reality_checks_after_measured_loads_are_coalesced_but_an_estimated_load_is_checked_at_once(tmp_path, http, monkeypatch):
    """After a load whose reservation is a measurement of its entry, the reality check waits
    (REALITY_COALESCE_S) and one check covers every such load meanwhile; a load reserved from an
    estimate (its real memory may exceed it) wakes the check at once."""
    import agent.reconciler as reconciler_module

    async def scenario():
        async with Harness(tmp_path, http, reality_interval_s=3600.0) as h:
            _measured_already(h)
            checks = []
            real_check = h.memory.reality.check
            h.memory.reality.check = lambda: checks.append(1) or real_check()  # type: ignore[method-assign]
            await h.wait_for(lambda: len(checks) == 1, what="the reality loop's first check")
            await h.apply(*(h.spec(n, preload=False) for n in "abcd"))
            for n in "abd":  # remembered: their reservation is what a measurement found
                h.memory._save_record(h.model(n).entry.key, {"host": 128 * KB, "gpu": {}, "method": "measured", "samples": 1})
            monkeypatch.setattr(reconciler_module, "REALITY_COALESCE_S", 3600.0)
            h.rec.release(await h.rec.acquire("a"))
            h.rec.release(await h.rec.acquire("b"))
            for _ in range(20):
                await asyncio.sleep(0)  # the reality loop would run now if it had been woken
            assert len(checks) == 1  # two measured loads: no check yet, one pending for both
            h.rec.release(await h.rec.acquire("c"))  # estimated: checked at once
            await h.wait_for(lambda: len(checks) == 2, what="a check right after the estimated load")
            monkeypatch.setattr(reconciler_module, "REALITY_COALESCE_S", 0.01)
            h.rec.release(await h.rec.acquire("d"))  # measured: checked once the coalescing delay ends
            await h.wait_for(lambda: len(checks) == 3, what="the coalesced check")
    run(scenario())


def test_a_request_for_an_in_place_model_takes_no_separate_cache_check_and_a_vanished_path_gets_a_503(tmp_path, http):
    """A local (in-place) model's request-driven load is not preceded by a Cache.check in its own
    thread: the adapter's load checks the path where it writes the repository entry. A path that
    is gone still ends in a 503 with the reason (model FAILED), never a raw error."""
    from agent.reconciler import ModelUnavailable

    async def scenario():
        async with Harness(tmp_path, http) as h:
            _measured_already(h)
            dirs = {}
            for n in ("here", "gone"):
                dirs[n] = tmp_path / "local" / n
                dirs[n].mkdir(parents=True)
                (dirs[n] / "model.bin").write_bytes(b"x" * KB)
            await h.apply(*(h.spec(n, str(d), preload=False) for n, d in dirs.items()))
            assert h.model("here").entry.in_place
            checks = []
            real_check = h.cache.check
            h.cache.check = lambda entry: checks.append(entry.key) or real_check(entry)  # type: ignore[method-assign]
            h.rec.release(await h.rec.acquire("here"))
            assert h.state("here") is State.LOADED and checks == []
            for f in dirs["gone"].iterdir():
                f.unlink()
            dirs["gone"].rmdir()
            with pytest.raises(ModelUnavailable) as e:
                await h.rec.acquire("gone")
            assert h.state("gone") is State.FAILED and str(dirs["gone"]) in e.value.reason
    run(scenario())
