"""The whole fleet with real parts: 3 agents (then a 4th) each with an embedded MLServer, one shared
cache dir, the real picker, and a real Envoy calling it through ext_proc (tests/support/fleet.py).
Clients are plain: V2 REST with no header (urllib) and tritonclient.grpc.

One fleet for the module; the tests run in order and build on each other (placement, then a hot
model's copy, then kill -9, then a fourth agent). Where a request went is read from the agents
themselves (/fleet/state: which agent has a model loaded, and its own request counters).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as tg

from tests.support.agentproc import request
from tests.support.fleet import Fleet
from tests.support.models import sample_rows, sklearn_predictions, v2_request, write_sklearn_model

pytestmark = pytest.mark.slow

MODELS = [f"m{i}" for i in range(16)]
ROWS = sample_rows(2)
HOT_RATE = 15.0  # requests/s per copy above which the picker adds a copy (low, so a test can reach it)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    models = []
    for i, name in enumerate(MODELS):
        write_sklearn_model(root / "store" / name, seed=i)
        models.append({"name": name, "uri": str(root / "store" / name), "preload": False})
    write_sklearn_model(root / "store" / "warm", seed=99)
    models.append({"name": "warm", "uri": str(root / "store" / "warm"), "preload": True})
    f = Fleet(root, models, slots=4, picker_args=("--hot-rate", str(HOT_RATE), "--copy-hold", "60"))
    try:
        f.start(initial=3)
        # every agent's MLServer has imported its sklearn runtime (a preloaded model) before the
        # tests: that import blocks MLServer for seconds on a busy machine, and an agent whose
        # server does not answer its probes reports not ready and loses its placements
        for s in f.live():
            s.proc.wait_state("warm", "loaded", timeout=120)
        f.wait_all_ready()
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="module")
def expected(fleet):
    return {m: sklearn_predictions(fleet.root / "store" / m, ROWS) for m in MODELS}


def rest(fleet: Fleet, model: str) -> tuple[int, object]:
    return request("POST", f"{fleet.envoy.url}/v2/models/{model}/infer", v2_request(ROWS), timeout=60)


def answer(body) -> list[int]:
    return [int(v) for v in body["outputs"][0]["data"]]


def grpc_infer(client: tg.InferenceServerClient, model: str) -> list[int]:
    x = tg.InferInput("input-0", [len(ROWS), len(ROWS[0])], "FP64")
    x.set_data_from_numpy(np.asarray(ROWS, dtype=np.float64))
    return [int(v) for v in client.infer(model, [x]).as_numpy("predict").ravel()]


def test_plain_rest_and_grpc_clients_reach_one_agent_per_model(fleet, expected):
    """No header: the picker reads the model from the path (REST) or the message (gRPC); each
    model ends up loaded on exactly one agent, the one that served all its requests."""
    for model in MODELS[:8]:
        for _ in range(2):
            status, body = rest(fleet, model)
            assert status == 200, body
            assert answer(body) == expected[model]
    client = tg.InferenceServerClient(fleet.envoy.grpc_target)
    try:
        for model in MODELS[:3] + MODELS[8:10]:  # some already loaded by REST, some new
            assert grpc_infer(client, model) == expected[model]
        assert client.is_model_ready("m0")
    finally:
        client.close()
    for model in MODELS[:10]:
        holders = fleet.holders(model)
        assert len(holders) == 1, f"{model} loaded on agents {holders}"
        served = {i: n for i, n in fleet.requests(model).items() if n}
        assert list(served) == holders, f"{model}: loaded on {holders}, requests served by {served}"
    spread = {i: sum(1 for m in MODELS[:10] if fleet.holders(m) == [i]) for i in range(3)}
    assert all(spread.values()), f"the picker left an agent without models: {spread}"


def _hammer(fleet: Fleet, model: str, seconds: float, threads: int = 4) -> list[int]:
    stop = time.monotonic() + seconds
    statuses: list[int] = []

    def loop():
        while time.monotonic() < stop:
            statuses.append(rest(fleet, model)[0])

    with ThreadPoolExecutor(threads) as pool:
        for _ in range(threads):
            pool.submit(loop)
    return statuses


def test_a_hot_model_gets_a_second_copy(fleet):
    """Above --hot-rate requests/s a model gets another copy on another agent, and both copies
    serve (the agents' own request counters grow on both)."""
    assert len(fleet.holders("m0")) == 1
    deadline = time.monotonic() + 30
    while len(fleet.holders("m0")) < 2 and time.monotonic() < deadline:
        statuses = _hammer(fleet, "m0", 1.0)
        assert set(statuses) == {200}, statuses
    holders = fleet.holders("m0")
    assert len(holders) >= 2, f"m0 still on {holders} after 30 s above {HOT_RATE} req/s"
    before = fleet.requests("m0")
    assert set(_hammer(fleet, "m0", 2.0)) == {200}
    after = fleet.requests("m0")
    grew = [i for i in holders if after[i] > before[i]]
    assert len(grew) >= 2, f"copies on {holders}, but only {grew} served: before {before}, after {after}"


def test_kill_9_under_traffic_fails_only_requests_in_flight(fleet, expected):
    """kill -9 of the agent holding the most models while 4 clients send requests for every model:
    only requests that had reached the dead agent fail (they started before the kill); a request
    picked for it before the picker saw it die is retried by Envoy on another agent (override-host
    policy); the dead agent's models answer from the others (loaded from the shared cache)."""
    by_agent = {s.index: [m for m in MODELS[:10] if s.index in fleet.holders(m)] for s in fleet.live()}
    victim = max(by_agent, key=lambda i: len(by_agent[i]))
    orphans = [m for m in by_agent[victim] if len(fleet.holders(m)) == 1]
    assert orphans, by_agent
    results: list[tuple[float, float, str, int]] = []  # (start, end, model, status)
    stop = threading.Event()

    def client(k: int):
        i = k
        while not stop.is_set():
            model = MODELS[i % 10]
            i += 3
            t0 = time.monotonic()
            status, body = rest(fleet, model)
            if status == 200:
                assert answer(body) == expected[model]
            results.append((t0, time.monotonic(), model, status))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    killed_at, dead_at = fleet.kill(victim)
    time.sleep(4.0)
    stop.set()
    for t in threads:
        t.join(60)
    failed = [r for r in results if r[3] != 200]
    assert all(r[0] < dead_at and r[1] >= killed_at for r in failed), \
        f"requests not in flight at the kill ({dead_at - killed_at:.3f} s long) failed: " \
        f"{[(round(r[0] - killed_at, 3), r[2], r[3]) for r in failed]}"
    assert all(r[2] in by_agent[victim] for r in failed), f"a model the victim did not hold failed: {failed}"
    for model in orphans:
        after = [r for r in results if r[2] == model and r[0] >= dead_at]
        assert after and all(r[3] == 200 for r in after), f"{model} did not answer after its agent died"
        assert fleet.holders(model) and victim not in fleet.holders(model)
    print(f"kill -9 agent {victim} ({len(by_agent[victim])} models): {len(failed)} failed of {len(results)}")


def test_a_fourth_agent_takes_load(fleet):
    """A new agent (a scale-up) gets placements: models placed after it joined go to it too
    (bounded loads: the fullest agents are skipped), and it serves them."""
    fleet.start_agent(3)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "3" not in "".join(str(s.index) for s in fleet.live()):
        time.sleep(0.1)
    time.sleep(0.5)  # one picker poll
    for model in MODELS[10:]:
        status, body = rest(fleet, model)
        assert status == 200, body
    placed = {m: fleet.holders(m) for m in MODELS[10:]}
    mine = [m for m, h in placed.items() if h == [3]]
    assert mine, f"the new agent took none of the new models: {placed}"
    assert all(fleet.requests(m)[3] > 0 for m in mine)
