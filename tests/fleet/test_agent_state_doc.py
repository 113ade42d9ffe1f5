"""The /fleet/state document as written by agent/fleet.py (by hand, for speed) against the real
Reconciler and ledger (harness of tests/reconciler): valid JSON for every name the config
allows, the right figures per model, removed models gone, seq moving on changes only."""
from __future__ import annotations

import json

from agent.app import Agent
from tests.reconciler.conftest import Harness, http, run  # noqa: F401  (http: fixture)


def fleet_of(h: Harness) -> Agent:
    agent = Agent(h.settings)
    agent.cache, agent.memory, agent.adapter, agent.reconciler = h.cache, h.memory, h.adapter, h.rec
    h.rec.on_change = agent.fleet.bump
    return agent


def test_the_document_is_json_with_each_model_s_figures(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http, prefetch="preload") as h:
            agent = fleet_of(h)
            names = ["a.b", "c_d-e", "Z9", "lazy"]
            await h.apply(*(h.spec(n) for n in names[:3]), h.spec("lazy", preload=False, memory=5 * 2**20))
            seq = agent.fleet.seq
            doc = json.loads(agent.fleet.body())
            assert set(doc["models"]) == set(names)
            assert doc["models"]["lazy"] == {"state": "registered", "inflight": 0, "requests": 0,
                                             "bytes": 5 * 2**20, "gpu_bytes": 0, "last_used": 0.0}
            reserved = h.memory.reservations()["a.b"].host
            assert doc["models"]["a.b"]["state"] == "loaded" and doc["models"]["a.b"]["bytes"] == reserved
            assert doc["memory"]["host"]["reserved"] == sum(c.host for c in h.memory.reservations().values())
            assert doc["ready"] is False and "server not ready" in doc["reasons"]  # no server started here

            lease = await h.rec.acquire("Z9")  # a request: counters move, seq does not
            assert json.loads(agent.fleet.body())["models"]["Z9"]["inflight"] == 1 and agent.fleet.seq == seq
            h.rec.release(lease)
            doc = json.loads(agent.fleet.body())
            assert doc["models"]["Z9"]["requests"] == 1 and doc["models"]["Z9"]["last_used"] > 0

            await h.apply(*(h.spec(n) for n in names[:2]), settle=False)  # Z9 and lazy removed: gone
            assert set(json.loads(agent.fleet.body())["models"]) == {"a.b", "c_d-e"} and agent.fleet.seq > seq
            await h.settle()  # at once, not once unloaded
    run(scenario())


def test_the_document_still_answers_after_most_models_left_the_config(tmp_path, http):
    """The builder forgets the figures of names removed from the config once they outnumber the
    live ones (its memo tables stay bounded); the document must keep answering right after."""
    async def scenario():
        async with Harness(tmp_path, http, budget=200 * 2**20, prefetch="preload") as h:
            agent = fleet_of(h)
            many = [f"m{i}" for i in range(80)]
            await h.apply(*(h.spec(n, memory=2**20) for n in many))  # loaded: their reservations are remembered
            doc = json.loads(agent.fleet.body())
            assert len(doc["models"]) == 80 and {m["state"] for m in doc["models"].values()} == {"loaded"}
            await h.apply(h.spec("m0", preload=False, memory=2**20))
            assert set(json.loads(agent.fleet.body())["models"]) == {"m0"}
            assert set(json.loads(agent.fleet.body())["models"]) == {"m0"}  # after the tables were pruned
    run(scenario())
