"""GET /fleet/state and POST /fleet/drain on a real agent (`modelshelf run` with its embedded
MLServer), read as the endpoint picker reads them (the contract: /work's fleet contract, agent/fleet.py)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.agentproc import AgentProcess, request
from tests.support.configmap import ConfigMapDir
from tests.support.models import sample_rows, v2_request, write_sklearn_model
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
                         "--min-residency", "0").wait_ready()
    agent.wait_state("hot", "loaded")
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
