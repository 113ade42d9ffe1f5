"""Item 9 (the server's real state is reconciled) and item 10, reconciler side (a load that
kills the server is quarantined, loads time out, lazy loads are not starved, requests queue
behind a load under over-commit)."""
from __future__ import annotations

import asyncio

import pytest

from agent.reconciler import ModelUnavailable, State
from agent.runtimes.base import LoadFailed, ServerUnavailable
from tests.reconciler.conftest import Harness, run
from tests.support.scripted import Gate

QUARANTINE = "server died twice while loading this model; quarantined until its config changes"


def test_a_model_unloaded_behind_the_agent_is_reloaded_by_the_periodic_resync(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http, resync_interval_s=0.05) as h:
            await h.apply(h.spec("m"))
            h.adapter.lose("m")
            await h.wait_for(lambda: "m" in h.adapter.ready and h.state("m") is State.LOADED, what="m reloaded by the resync")
            assert h.adapter.count("load", "m") == 2
    run(scenario())


def test_a_model_loaded_while_the_index_was_read_is_not_taken_for_lost(tmp_path, http, caplog):
    """The server lists its models while `m`'s load is still running, and the answer arrives
    after the load ended: `m` is missing from it only because it was read too early. The resync
    neither reloads it nor says the server lost it (under load the agent logged "server lost
    models; reloading" for models it had just loaded)."""
    async def scenario():
        async with Harness(tmp_path, http) as h:
            load = h.adapter.hold("load", "m")
            await h.apply(h.spec("m"), settle=False)
            await load.entered.wait()
            listing = h.adapter.hold("index")
            resync = asyncio.ensure_future(h.rec.resync_server(restock=True))
            await listing.entered.wait()  # the server's list is taken: m not in it yet
            load.release()
            await h.wait_for(lambda: h.state("m") is State.LOADED, what="m loaded")
            listing.release()
            await resync
            await h.settle()
            assert h.adapter.count("load", "m") == 1, "m was loaded again"
            assert not [r for r in caplog.records if "lost" in r.getMessage()], "a false loss was logged"
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


def test_a_model_that_loaded_beside_the_culprit_is_not_quarantined(tmp_path, http):
    """The server dies while `innocent` and `bad` load side by side, `bad`'s load being the
    cause: each gets one strike. From then on each of them loads alone until it loads (the
    strike is forgotten) or kills the server again (quarantined), so the second death names
    `bad` alone and `innocent` serves. (Loading them side by side again quarantined both: a
    fresh-clone CI run caught tests/faults' innocent model so.)"""
    async def scenario():
        async with Harness(tmp_path, http, load_concurrency=3, retry_base_s=60.0) as h:
            h.memory.measure_wait_s = 0  # no load waits for another's measurement: they overlap
            held: dict[str, Gate] = {}

            def hold_next_loads(names: set[str]) -> None:
                held.update({n: h.adapter.hold("load", n) for n in names})

            async def die(running: set[str]) -> None:
                """bad's load ends the server: each load in flight sees its connection reset,
                one that starts while it is down is refused, then it comes back empty (the
                order a real server's death takes)."""
                for n in running:
                    held.pop(n).fail(ServerUnavailable(n, "connection reset: the server died"))
                await asyncio.sleep(0.1)
                while True:
                    for n in [n for n, g in held.items() if g.entered.is_set()]:  # started after the death
                        held.pop(n).fail(ServerUnavailable(n, "connection refused: the server is down"))
                        hold_next_loads({n})
                    if not h.rec._loading:
                        break
                    await asyncio.sleep(0.005)
                await h.adapter.restart()

            hold_next_loads({"innocent", "bad"})
            await h.apply(h.spec("innocent"), h.spec("bad"), settle=False)
            await h.wait_for(lambda: all(g.entered.is_set() for g in held.values()), what="both first loads in flight")
            await die({"innocent", "bad"})
            assert h.model("bad").crashes == 1 and h.model("innocent").crashes == 1
            hold_next_loads({"innocent", "bad"})
            for n in held:  # forced: both backoffs run out at the same moment
                h.model(n).retry_at = None
                h.rec._schedule(h.model(n))
            side_by_side = []
            while held:  # their next loads, ended as the server would end them
                await h.wait_for(lambda: any(g.entered.is_set() for g in held.values()), what=f"a next load {side_by_side} {h.rec._gate_in} {h.rec._solo_in} {h.rec._solo_waiting} {[(n, m.state, m.retry_at, m.crashes, m.reason) for n, m in h.rec.models.items()]} {[(c.name, c.outcome) for c in h.adapter.calls if c.op == 'load']}")
                await asyncio.sleep(0.2)  # time for the other to start beside it, if it may
                running = {n for n, g in held.items() if g.entered.is_set()}
                side_by_side.append(running)
                if "bad" in running:
                    await die(running)
                else:
                    held.pop("innocent").release()
            await h.wait_for(lambda: h.model("bad").reason == QUARANTINE, what="bad quarantined")
            await h.wait_for(lambda: h.state("innocent") is State.LOADED and "innocent" in h.adapter.ready,
                             what=f"innocent loaded (its reason: {h.model('innocent').reason})")
            assert all(len(r) == 1 for r in side_by_side), f"suspects loaded side by side: {side_by_side}"
            assert h.model("innocent").crashes == 0 and h.adapter.restarts == 2
    run(scenario())


def test_a_load_that_reached_the_server_only_after_it_died_is_not_blamed(tmp_path, http):
    """`queued` waits for the one background load slot behind `bad`'s load when `bad` kills the
    server; it then reaches the dead server and is refused. Only `bad` gets the strike: `queued`
    is loaded as soon as the server is back, with no strike and no backoff."""
    async def scenario():
        async with Harness(tmp_path, http, load_concurrency=2, retry_base_s=60.0) as h:
            gate = h.adapter.hold("load", "bad")
            await h.apply(h.spec("bad"), settle=False)
            await gate.entered.wait()
            await h.apply(h.spec("bad"), h.spec("queued"), settle=False)
            await h.wait_for(lambda: h.state("queued") is State.LOADING, what="queued's load waiting for the slot")
            assert h.adapter.count("load", "queued") == 0, "queued was to wait for bad's slot"
            h.adapter.up = False  # bad's load ends the server
            gate.fail(ServerUnavailable("bad", "connection reset: the server died"))
            await h.wait_for(lambda: h.adapter.count("load", "queued") == 1 and not h.rec._loading,
                             what="queued refused by the dead server")
            h.adapter.up = True
            h.adapter.fail_next("load", "bad", LoadFailed("bad", "kept out of the way"))
            await h.adapter.restart()
            await h.wait_for(lambda: h.state("queued") is State.LOADED, what="queued loaded once the server is back")
            assert h.model("queued").crashes == 0 and h.model("bad").crashes == 1
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
