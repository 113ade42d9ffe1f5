"""GET /fleet/state and POST /fleet/drain on a real agent (`modelshelf run` with its embedded
MLServer, `--prefetch preload` as in a fleet), read as an endpoint picker reads them (agent/fleet.py).

A terminating agent (preStop -> `modelshelf drain` -> POST /fleet/drain) takes no new
placements: every readiness surface says not ready, /fleet/state says draining; and it keeps
serving every request it still receives. `drain --wait` returns when the agent is quiet."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import httpx
import pytest
import tritonclient.grpc as grpcclient

from tests.support.agentproc import AgentProcess, request
from tests.support.configmap import ConfigMapDir
from tests.support.models import sample_rows, sklearn_predictions, v2_request, write_sklearn_model
from tests.support.net import free_port

ROWS = sample_rows(3, seed=5)


@pytest.fixture(scope="module")
def fleet_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One agent for the module: `hot` preloaded, `cold` lazy; management on its own port."""
    root = tmp_path_factory.mktemp("fleet-state")
    for name in ("hot", "cold"):
        write_sklearn_model(root / "store" / name, kind="tree", seed=len(name))
    cm = ConfigMapDir(root / "config")
    cm.write({"models.yaml": json.dumps({"models": [
        {"name": "hot", "uri": str(root / "store" / "hot")},
        {"name": "cold", "uri": str(root / "store" / "cold"), "preload": False}]})})
    agent = AgentProcess(cm.root, root / "cache", root / "agent.log", f"--management-port={free_port()}",
                         "--min-residency", "0", "--prefetch", "preload", "--idle-unload", "5").wait_ready()
    agent.wait_state("hot", "loaded")
    agent.expected = sklearn_predictions(root / "store" / "hot", ROWS)  # type: ignore[attr-defined]
    yield agent
    agent.stop()


def state(agent: AgentProcess, query: str = "") -> dict[str, Any]:
    code, doc = request("GET", agent.management_url + "/fleet/state" + query)
    assert code == 200, doc
    return doc


def infer(agent: AgentProcess, name: str) -> int:
    return request("POST", f"{agent.url}/v2/models/{name}/infer", v2_request(ROWS))[0]


def test_state_names_every_model_its_state_counters_memory_and_ports(fleet_agent: AgentProcess) -> None:
    a = fleet_agent
    doc = state(a)
    assert doc["ready"] is True and doc["draining"] is False and doc["reasons"] == []
    assert doc["http_port"] == a.port and doc["grpc_port"] == a.grpc_port
    assert isinstance(doc["agent"], str) and doc["started"] <= time.time()
    assert set(doc["models"]) == {"hot", "cold"}
    hot = doc["models"]["hot"]
    assert hot["state"] == "loaded" and hot["bytes"] > 0 and hot["inflight"] == 0
    host = doc["memory"]["host"]
    assert host["budget"] > 0 and host["reserved"] >= hot["bytes"] and host["free"] == host["budget"] - host["reserved"]
    assert doc["memory"]["gpu"] == {}  # no GPU here: GPU budgeting is off

    before = doc["models"]["hot"]["requests"]
    assert infer(a, "hot") == 200
    after = state(a)
    assert after["models"]["hot"]["requests"] == before + 1
    assert after["models"]["hot"]["last_used"] >= time.time() - 30


def test_a_lazy_load_bumps_seq_and_wakes_a_long_poll(fleet_agent: AgentProcess) -> None:
    a = fleet_agent
    doc = state(a)
    assert doc["models"]["cold"]["state"] in ("registered", "cached")
    seq = doc["seq"]
    # nothing changes: the long poll answers after `wait` with the same seq
    assert state(a, f"?since={seq}&wait=0.2")["seq"] == seq
    answer: dict[str, Any] = {}
    poller = threading.Thread(target=lambda: answer.update(state(a, f"?since={seq}")))
    poller.start()
    time.sleep(0.3)  # the poll is parked on the agent (a change after this wakes it)
    assert not answer, "the long poll answered before anything changed"
    assert infer(a, "cold") == 200
    poller.join(10)
    assert answer and answer["seq"] > seq
    assert state(a)["models"]["cold"]["state"] == "loaded"


def test_the_state_is_not_served_to_clients_on_the_public_port(fleet_agent: AgentProcess) -> None:
    assert request("GET", fleet_agent.url + "/fleet/state")[0] == 404
    assert request("POST", fleet_agent.url + "/fleet/drain")[0] == 404


def test_a_copy_nobody_asks_for_leaves_after_idle_unload(fleet_agent: AgentProcess) -> None:
    """--idle-unload 5: `cold`, loaded on demand by the test above, is unloaded once no request
    used it for 5 s (a copy the picker stopped routing here); `hot` (preload) stays."""
    a = fleet_agent
    if state(a)["models"]["cold"]["state"] != "loaded":
        assert infer(a, "cold") == 200
    status = a.wait_state("cold", "cached", timeout=60)
    assert status["models"]["hot"]["state"] == "loaded"
    assert "unloaded idle models" in a.log()


def drain(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", "drain", "--management-url", agent.management_url, *args],
                          capture_output=True, text=True, timeout=60)


class Client(threading.Thread):
    """Keeps asking one model until stopped; counts answers that are right and those that are not."""

    def __init__(self, url: str, name: str, expected: list[int]):
        super().__init__(daemon=True)
        self.url, self.name, self.expected = url, name, expected
        self.ok = 0
        self.bad: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30, trust_env=False) as c:
            while not self.stop.is_set():
                r = c.post(f"/v2/models/{self.name}/infer", json=v2_request(ROWS))
                outs = r.json().get("outputs", []) if r.status_code == 200 else []
                if r.status_code == 200 and [int(v) for v in outs[0]["data"]] == self.expected:
                    self.ok += 1
                else:
                    self.bad.append(f"{r.status_code} {r.text[:200]}")

    def finish(self) -> "Client":
        self.stop.set()
        self.join(30)
        return self


def test_a_draining_agent_is_not_ready_and_keeps_serving(fleet_agent: AgentProcess) -> None:
    """Last but one in this module: the module's agent stays draining."""
    agent = fleet_agent
    client = Client(agent.url, "hot", agent.expected)
    client.start()
    # busy: the wait ends with traffic still arriving (exit 1), but the agent is draining
    busy = drain(agent, "--wait", "2", "--quiet", "1")
    assert busy.returncode == 1, busy.stderr
    assert request("GET", agent.url + "/readyz")[0] == 503
    assert request("GET", agent.url + "/v2/health/ready")[0] == 503
    with grpcclient.InferenceServerClient(agent.grpc_target) as g:
        assert g.is_server_ready() is False and g.is_server_live() is True
    doc = request("GET", agent.management_url + "/fleet/state")[1]
    assert doc["draining"] is True and doc["ready"] is False and any("draining" in r for r in doc["reasons"])
    # requests still sent to it are served, right, after the drain began
    drained_at = client.ok
    deadline = time.monotonic() + 30
    while client.ok < drained_at + 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    client.finish()
    assert client.bad == [] and client.ok >= drained_at + 5
    # quiet now: drain --wait returns 0 (a second drain is harmless)
    quiet = drain(agent, "--wait", "20", "--quiet", "0.5")
    assert quiet.returncode == 0, quiet.stderr
    assert "quiet" in quiet.stderr


def test_drain_of_an_unreachable_agent_says_so() -> None:
    r = subprocess.run([sys.executable, "-m", "agent.cli", "drain", "--management-url", f"http://127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot reach" in r.stderr
