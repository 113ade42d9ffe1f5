"""Dense serving with a real agent and a real embedded MLServer: more models than fit, loaded on
demand, evicted least-recently-used, never under a request."""
from __future__ import annotations

import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from agent.demo import write_model
from tests.support.agentproc import IRIS_ROW, AgentProcess, request, v2_infer_body
from tests.support.configmap import ConfigMapDir
from tests.support.models import SLOW_IMPLEMENTATION, count_loads, write_slow_model

MI = 2**20


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense-store")
    for i in range(8):
        write_model(root / f"m{i}", ["logreg", "tree"][i % 2], i)
    return root


@pytest.fixture
def start_agent(tmp_path):
    cm = ConfigMapDir(tmp_path / "config")
    procs: list[AgentProcess] = []

    def start(models: list[dict], *args: str) -> AgentProcess:
        cm.write({"models.yaml": json.dumps({"models": models})})
        p = AgentProcess(cm.root, tmp_path / "cache", tmp_path / f"agent{len(procs)}.log", "--min-residency", "0", *args)
        procs.append(p)
        return p.wait_ready()

    yield start
    for p in procs:
        p.stop()


def infer(agent: AgentProcess, name: str):
    return agent.post(f"/v2/models/{name}/infer", v2_infer_body([IRIS_ROW]))


def metric(agent: AgentProcess, name: str) -> float:
    text = agent.get("/metrics")[1].decode()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def loaded(agent: AgentProcess) -> list[str]:
    return [n for n, m in agent.status()["models"].items() if m["state"] == "loaded"]


def test_budget_holds_k_of_n_through_a_long_mixed_sequence(start_agent, store):
    # each model declares 100Mi; the budget holds at most 4 of the 8
    models = [{"name": f"m{i}", "uri": str(store / f"m{i}"), "memory": "100Mi", "preload": False} for i in range(8)]
    agent = start_agent(models, "--host-memory", "400Mi")
    rng = random.Random(7)
    most = 0
    for _ in range(40):
        name = f"m{rng.randrange(8)}"
        code, body = infer(agent, name)
        assert code == 200, (name, body)
        assert body["model_name"] == name
        most = max(most, len(loaded(agent)))
    status = agent.status()
    assert status["memory"]["host"]["used"] <= 400 * MI
    assert 1 <= most <= 4
    assert metric(agent, "modelshelf_evictions_total") >= 5
    assert metric(agent, 'modelshelf_loaded_lookups_total{result="miss"}') >= 5


def test_200_concurrent_requests_to_an_evicted_model_load_it_once(start_agent, tmp_path):
    """200 requests released together at a model that is cached, not loaded, whose load takes
    2 s inside the server: every request was sent before that load ended (they overlapped it,
    timed by the model itself), all succeed, and the server loaded the model once."""
    load_log = tmp_path / "loads.log"
    write_slow_model(tmp_path / "store" / "slow", delay=0.0, load_log=load_log, load_delay=2.0)
    agent = start_agent([{"name": "slow", "uri": str(tmp_path / "store" / "slow"), "runtime": "mlserver",
                          "implementation": SLOW_IMPLEMENTATION, "preload": False}])
    agent.wait_state("slow", "cached")  # pulled (a local dir: in place), not loaded
    body = v2_infer_body([IRIS_ROW])
    barrier = threading.Barrier(200)
    sent: list[float] = []

    def one(_: int):
        barrier.wait(30)
        sent.append(time.time())
        return request("POST", agent.url + "/v2/models/slow/infer", body, timeout=60)

    with ThreadPoolExecutor(max_workers=200) as pool:
        results = list(pool.map(one, range(200)))
    assert [code for code, _ in results] == [200] * 200
    assert count_loads(load_log, "slow") == 1  # counted by the model itself, inside the server
    assert agent.status()["models"]["slow"]["loads"] == 1
    load_ended = float(load_log.read_text().split()[2])
    late = [t for t in sent if t >= load_ended]
    assert late == [], f"{len(late)} of 200 requests were sent after the load ended: they did not overlap it"


def test_a_slow_request_in_flight_is_never_evicted(start_agent, tmp_path, store):
    load_log = tmp_path / "loads.log"
    write_slow_model(tmp_path / "store" / "slow", delay=3.0, load_log=load_log)
    agent = start_agent([
        {"name": "slow", "uri": str(tmp_path / "store" / "slow"), "runtime": "mlserver",
         "implementation": SLOW_IMPLEMENTATION, "memory": "300Mi", "preload": False},
        {"name": "other", "uri": str(store / "m0"), "memory": "300Mi", "preload": False},
    ], "--host-memory", "500Mi")  # one fits, not both (other beside sklearn's import, 80 MiB, and the allocator reserve)
    result: dict = {}

    def slow_request() -> None:
        result["slow"] = infer(agent, "slow")
        result["slow_done"] = time.monotonic()

    t = threading.Thread(target=slow_request)
    t.start()
    agent.wait_for(lambda s: s["models"]["slow"]["inflight"] == 1 and s["models"]["slow"]["state"] == "loaded",
                   what="slow request in flight")
    # `other` needs slow's memory while slow holds a lease: it waits (within --load-timeout)
    # until slow's request is answered, then evicts slow and loads
    code, body = infer(agent, "other")
    other_done = time.monotonic()
    t.join(30)
    assert result["slow"][0] == 200, result["slow"]
    assert code == 200, body
    assert result["slow_done"] <= other_done  # slow was never unloaded under its request
    assert count_loads(load_log, "slow") == 1
    agent.wait_state("slow", "cached")  # evicted only after its request: cached, not loaded


def test_a_model_larger_than_the_whole_budget_gets_a_clear_error(start_agent, store):
    agent = start_agent([
        {"name": "small", "uri": str(store / "m0"), "memory": "10Mi"},
        {"name": "huge", "uri": str(store / "m1"), "memory": "2Gi", "preload": False},
    ], "--host-memory", "500Mi")
    code, body = infer(agent, "huge")
    assert code == 503
    reason = agent.status()["models"]["huge"]["reason"]
    assert "huge" in reason and "larger than the whole budget" in reason
    assert "2.0GiB" in reason and "500.0MiB" in reason, reason
    assert agent.state("huge") == "cached"  # still cached, nothing lost
    assert infer(agent, "small")[0] == 200


def test_pinned_models_are_never_evicted(start_agent, store):
    models = [{"name": "pin", "uri": str(store / "m0"), "memory": "100Mi", "pinned": True}]
    models += [{"name": f"m{i}", "uri": str(store / f"m{i}"), "memory": "100Mi", "preload": False} for i in range(1, 6)]
    agent = start_agent(models, "--host-memory", "350Mi")
    agent.wait_state("pin", "loaded")
    for i in [1, 2, 3, 4, 5, 1, 3, 5, 2, 4]:
        assert infer(agent, f"m{i}")[0] == 200
    status = agent.status()["models"]["pin"]
    assert status["state"] == "loaded" and status["loads"] == 1
    assert metric(agent, "modelshelf_evictions_total") >= 5


def _nvml_devices() -> int:
    """GPUs NVML finds on this machine (0 without a driver, the library or a device)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return 0
    finally:
        pynvml.nvmlShutdown()


def test_runs_without_nvml_and_says_so_once(start_agent, store):
    """Without a GPU, GPU budgeting is off and the log says so once. Where NVML finds devices,
    the right thing is the opposite: one budget per device, and no such line."""
    agent = start_agent([{"name": "a", "uri": str(store / "m0")}])
    agent.wait_state("a", "loaded")
    gpus = _nvml_devices()
    assert sorted(agent.status()["memory"]) == ["host", *sorted(f"gpu:{i}" for i in range(gpus))]
    assert agent.log().count("gpu_budgeting=off") == (0 if gpus else 1)


def test_v1_predict_gives_the_same_predictions_as_v2_infer(start_agent, store):
    agent = start_agent([{"name": "a", "uri": str(store / "m1")}])
    rows = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 2.8, 4.3, 1.3]]
    code, v2 = agent.post("/v2/models/a/infer", v2_infer_body(rows))
    assert code == 200
    code, v1 = agent.post("/v1/models/a:predict", {"instances": rows})
    assert code == 200, v1
    assert v1["predictions"] == v2["outputs"][0]["data"]
    assert len(set(v1["predictions"])) == 3  # three different classes: a real model answered
    code, doc = agent.get("/v1/models/a")
    assert code == 200 and doc == {"name": "a", "ready": True}
    code, err = agent.post("/v1/models/nope:predict", {"instances": rows})
    assert code == 404 and "nope" in err["error"]


def test_body_over_the_limit_is_refused_with_413(start_agent, store):
    agent = start_agent([{"name": "a", "uri": str(store / "m0")}], "--max-body-bytes", "1Ki")
    big = v2_infer_body([IRIS_ROW] * 200)
    code, body = agent.post("/v2/models/a/infer", big)
    assert code == 413 and "error" in body
    assert infer(agent, "a")[0] == 200
