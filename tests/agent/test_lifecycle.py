"""The agent end to end: a real `modelshelf run` process with a real embedded MLServer, driven
through a ConfigMap-style directory, observed through its HTTP API."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from datetime import datetime, timezone

import psutil
import pytest

from agent.demo import write_model
from tests.support.agentproc import IRIS_ROW, AgentProcess, v2_infer_body
from tests.support.configmap import ConfigMapDir
from tests.support.models import SLOW_IMPLEMENTATION, count_loads, write_slow_model


def models_yaml(*entries: dict) -> dict[str, str]:
    return {"models.yaml": json.dumps({"models": list(entries)})}  # JSON is valid YAML


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    write_model(root / "logreg", "logreg", 0)
    write_model(root / "tree", "tree", 1)
    write_model(root / "forest", "forest", 2)
    (root / "broken").mkdir()
    (root / "broken" / "model.joblib").write_bytes(b"this is not a joblib file")
    return root


@pytest.fixture
def agent_env(tmp_path):
    cm = ConfigMapDir(tmp_path / "config")
    procs: list[AgentProcess] = []

    def start(*args: str, env: dict | None = None, cache: str = "cache") -> AgentProcess:
        p = AgentProcess(cm.root, tmp_path / cache, tmp_path / f"agent{len(procs)}.log", *args, env=env)
        procs.append(p)
        return p

    yield cm, start
    for p in procs:
        p.stop()


def infer(agent: AgentProcess, name: str, row=IRIS_ROW):
    return agent.post(f"/v2/models/{name}/infer", v2_infer_body([row]))


def test_add_update_remove_through_configmap_swaps(agent_env, store):
    cm, start = agent_env
    cm.write(models_yaml({"name": "a", "uri": str(store / "logreg")}))
    agent = start().wait_ready()
    agent.wait_state("a", "loaded")
    code, body = infer(agent, "a")
    assert code == 200, body
    assert body["model_name"] == "a"

    # add b by swapping ..data
    cm.write(models_yaml({"name": "a", "uri": str(store / "logreg")}, {"name": "b", "uri": str(store / "tree")}))
    agent.wait_state("b", "loaded")
    assert infer(agent, "b")[0] == 200

    # remove b: unloaded and gone from status; requests get the V2 404
    cm.write(models_yaml({"name": "a", "uri": str(store / "logreg")}))
    agent.wait_state("b", None)
    code, body = infer(agent, "b")
    assert code == 404 and "error" in body
    assert agent.state("a") == "loaded"


def _server_load_window(agent: AgentProcess, name: str) -> tuple[float, float]:
    """(start, end) wall-clock seconds of the last repository load of `name` on the server, from
    the adapter's own log line (its timestamp is the end; `seconds=` the load's duration)."""
    line = [ln for ln in agent.log().splitlines() if "event=model_loaded" in ln and f" model={name} " in ln][-1]
    end = datetime.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
    return end - float(re.search(r" seconds=([0-9.]+)", line).group(1)), end


def test_update_never_leaves_a_gap(agent_env, store, tmp_path):
    """Ready and infer are polled while `m` is swapped to a new copy whose load takes 1.5 s
    inside the server: polls that ran wholly within that load (as the adapter timed it) all
    succeed and get the old copy's answer, and the new copy answers afterwards."""
    load_log = tmp_path / "loads.log"
    write_slow_model(tmp_path / "slowstore" / "slow", delay=0.0, load_delay=1.5, load_log=load_log)
    cm, start = agent_env
    cm.write(models_yaml({"name": "m", "uri": str(store / "logreg")}))
    agent = start().wait_ready()
    agent.wait_state("m", "loaded")
    failures: list = []
    rounds: list[tuple[float, float, object]] = []  # (start, end, output) of successful rounds
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            t0 = time.time()
            code, body = agent.get("/v2/models/m/ready")
            if code != 200:
                failures.append(("ready", code, body))
            code2, body2 = infer(agent, "m")
            if code2 != 200:
                failures.append(("infer", code2, body2))
            elif code == 200:
                rounds.append((t0, time.time(), body2["outputs"][0]["data"]))

    t = threading.Thread(target=poll)
    t.start()
    try:
        time.sleep(0.3)
        before = agent.status()["models"]["m"]["cache_key"]
        cm.write(models_yaml({"name": "m", "uri": str(tmp_path / "slowstore" / "slow"), "runtime": "mlserver",
                              "implementation": SLOW_IMPLEMENTATION}))
        agent.wait_for(lambda s: s["models"]["m"]["cache_key"] != before and s["models"]["m"]["state"] == "loaded"
                       and s["models"]["m"]["loads"] == 2, what="m replaced")
        time.sleep(0.3)
    finally:
        stop.set()
        t.join(10)
    assert failures == []
    assert count_loads(load_log, "m") == 1
    start, end = _server_load_window(agent, "m")
    old_answer = rounds[0][2]
    during = [r for r in rounds if r[0] >= start and r[1] <= end]
    assert len(during) >= 3, f"only {len(during)} poll rounds ran within the swap: the test proved nothing"
    assert all(r[2] == old_answer for r in during)  # the old copy served throughout the new copy's load
    print(f"\n{len(rounds)} rounds, {len(during)} within the swap; last answer {rounds[-1][2]}")
    assert rounds[-1][2] == IRIS_ROW, rounds[-1]  # the new copy (an echo of the input) serves now


def test_bad_file_keeps_last_good_config(agent_env, store):
    cm, start = agent_env
    cm.write(models_yaml({"name": "a", "uri": str(store / "logreg")}))
    agent = start().wait_ready()
    agent.wait_state("a", "loaded")
    cm.write({"models.yaml": "models: [ {name: a, uri: oops"})  # does not parse
    status = agent.wait_for(lambda s: s["config"]["parse_error"], what="parse error shown")
    assert "models.yaml" in status["config"]["parse_error"]
    assert status["models"]["a"]["state"] == "loaded"
    assert infer(agent, "a")[0] == 200
    # one bad entry among good ones: the good ones apply, the bad one is named with its reason
    cm.write(models_yaml({"name": "a", "uri": str(store / "logreg")}, {"name": "c", "uri": str(store / "tree"), "memory": "12XB"}))
    status = agent.wait_for(lambda s: s["config"]["rejected"] and not s["config"]["parse_error"], what="entry rejected")
    assert any("12XB" in r["reason"] for r in status["config"]["rejected"])
    assert "c" not in status["models"] and status["models"]["a"]["state"] == "loaded"
    metrics = agent.get("/metrics")[1].decode()
    assert 'modelshelf_config_errors_total{kind="file"} 1.0' in metrics


def test_kserve_models_json_is_accepted(agent_env, store):
    cm, start = agent_env
    cm.write({"models.json": json.dumps([
        {"modelName": "k1", "modelSpec": {"storageUri": str(store / "logreg"), "framework": "sklearn", "memory": "64Mi"}},
    ])})
    agent = start().wait_ready()
    agent.wait_state("k1", "loaded")
    assert infer(agent, "k1")[0] == 200


def test_broken_model_fails_with_reason_and_others_serve(agent_env, store):
    cm, start = agent_env
    cm.write(models_yaml({"name": "good", "uri": str(store / "logreg")}, {"name": "bad", "uri": str(store / "broken")}))
    agent = start().wait_ready()
    status = agent.wait_state("bad", "failed")
    assert status["models"]["bad"]["reason"].startswith("load:")
    agent.wait_state("good", "loaded")
    assert infer(agent, "good")[0] == 200
    code, body = infer(agent, "bad")
    assert code == 503 and "load:" in body["error"]


def test_embedded_server_killed_comes_back_with_its_models(agent_env, store):
    cm, start = agent_env
    cm.write(models_yaml({"name": "a", "uri": str(store / "logreg")}, {"name": "b", "uri": str(store / "tree")}))
    agent = start().wait_ready()
    agent.wait_state("a", "loaded")
    agent.wait_state("b", "loaded")
    server_pid = agent.status()["server"]["pid"]
    assert server_pid in {c.pid for c in psutil.Process(agent.proc.pid).children(recursive=True)}
    os.kill(server_pid, signal.SIGKILL)
    agent.wait_for(lambda s: s["server"]["pid"] not in (None, server_pid) and s["server"]["ready"]
                   and all(s["models"][n]["state"] == "loaded" and s["models"][n]["loads"] == 2 for n in ("a", "b")),
                   timeout=60, what="server back with both models reloaded")
    assert infer(agent, "a")[0] == 200 and infer(agent, "b")[0] == 200
