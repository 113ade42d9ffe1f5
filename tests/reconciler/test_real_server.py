"""The reconciler against a REAL MLServer (the session's, driven in sidecar mode from this
test's loop): a model unloaded behind the agent's back is noticed and served again, by the
periodic resync and at once through `report_missing` (what the router calls on a 404); under
--eviction lfu-decay the model asked for most stays on the server where lru would unload it."""
from __future__ import annotations

import httpx

from agent.reconciler import State
from agent.runtimes.mlserver import MLServerAdapter
from tests.reconciler.conftest import Harness, run
from tests.support.models import sample_rows, v2_request, write_sklearn_model


def _publish_sklearn(h: Harness, tmp_path, name: str) -> str:
    d = write_sklearn_model(tmp_path / f"src-{name}")
    path = f"{name}/v1/model.joblib"
    h.http.set_file(path, (d / "model.joblib").read_bytes())
    return h.http.url(path)


async def _scenario(tmp_path, http, mlserver, *, resync: float, report: bool) -> None:
    adapter = MLServerAdapter(mlserver.repository, base_url=mlserver.base_url, sidecar_interval=None)
    await adapter.start(timeout=10)
    name = f"real-{'report' if report else 'resync'}"
    try:
        async with Harness(tmp_path, http, adapter=adapter, resync_interval_s=resync, load_timeout_s=60.0) as h:
            await h.apply(h.spec(name, _publish_sklearn(h, tmp_path, name)))
            assert h.state(name) is State.LOADED, h.model(name).reason
            async with httpx.AsyncClient(base_url=mlserver.base_url, timeout=10) as client:
                r = await client.post(f"/v2/repository/models/{name}/unload", json={})  # behind our back
                assert r.status_code == 200
                infer = f"/v2/models/{name}/infer"
                body = v2_request(sample_rows(2))
                assert (await client.post(infer, json=body)).status_code == 404
                if report:
                    h.rec.report_missing(name)
                await h.wait_for(lambda: h.model(name).loads == 2, what="reloaded")
                assert (await adapter.index()).get(name) == "READY"
                assert (await client.post(infer, json=body)).status_code == 200
    finally:
        await adapter.stop()


def test_a_model_unloaded_on_the_real_server_is_reloaded_by_the_resync(tmp_path, http, mlserver):
    run(_scenario(tmp_path, http, mlserver, resync=0.3, report=False), timeout=90)


def test_report_missing_reloads_a_model_the_real_server_lost(tmp_path, http, mlserver):
    run(_scenario(tmp_path, http, mlserver, resync=3600.0, report=True), timeout=90)


async def _eviction_scenario(tmp_path, http, mlserver, policy: str) -> dict[str, str]:
    """Room for two of three real models; "hot" is asked for 5 times, then "rare" once, then
    "new" needs room. Returns what the real server holds READY afterwards."""
    adapter = MLServerAdapter(mlserver.repository, base_url=mlserver.base_url, sidecar_interval=None)
    await adapter.start(timeout=10)
    names = {n: f"{policy}-{n}" for n in ("hot", "rare", "new")}
    try:
        async with Harness(tmp_path, http, adapter=adapter, budget=250 * 2**20, load_timeout_s=60.0,
                           eviction=policy, eviction_half_life=100.0) as h:
            await h.apply(*(h.spec(m, _publish_sklearn(h, tmp_path, m), preload=False, memory=100 * 2**20) for m in names.values()))
            for name in [names["hot"]] * 5 + [names["rare"], names["new"]]:
                h.rec.release(await h.rec.acquire(name))
            await h.settle()
            status = h.rec.status()
            assert status["eviction"]["policy"] == policy
            scores = {n: status["models"][m]["eviction_score"] for n, m in names.items()}
            if policy == "lru":
                assert set(scores.values()) == {None}, scores
            else:  # what /status shows: 5 requests (barely decayed) above 1
                assert scores["hot"] > 4 and 0 < scores["rare"] < 1.1, scores
            index = await adapter.index()
            return {n: index.get(m, "absent") for n, m in names.items()}
    finally:
        await adapter.stop()


def test_lfu_decay_keeps_the_model_asked_for_most_on_the_real_server(tmp_path, http, mlserver):
    held = run(_eviction_scenario(tmp_path, http, mlserver, "lfu-decay"), timeout=120)
    assert held["hot"] == "READY" and held["new"] == "READY" and held["rare"] != "READY", held
    # lru evicts the model asked for most: its last request is older than rare's
    held = run(_eviction_scenario(tmp_path / "lru", http, mlserver, "lru"), timeout=120)
    assert held["rare"] == "READY" and held["new"] == "READY" and held["hot"] != "READY", held
