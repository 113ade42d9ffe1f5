"""A terminating agent (preStop -> `modelshelf drain` -> POST /fleet/drain) takes no new
placements: every readiness surface says not ready, /fleet/state says draining; and it keeps
serving every request it still receives. `drain --wait` returns when the agent is quiet."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.agentproc import AgentProcess, request
from tests.support.configmap import ConfigMapDir
from tests.support.models import sample_rows, sklearn_predictions, v2_request, write_sklearn_model
from tests.support.net import free_port

ROWS = sample_rows(3, seed=7)


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


def test_a_draining_agent_is_not_ready_and_keeps_serving(tmp_path: Path) -> None:
    store = tmp_path / "store" / "m"
    write_sklearn_model(store, kind="tree", seed=3)
    expected = sklearn_predictions(store, ROWS)
    cm = ConfigMapDir(tmp_path / "config")
    cm.write({"models.yaml": json.dumps({"models": [{"name": "m", "uri": str(store)}]})})
    agent = AgentProcess(cm.root, tmp_path / "cache", tmp_path / "agent.log", f"--management-port={free_port()}").wait_ready()
    try:
        agent.wait_state("m", "loaded")
        client = Client(agent.url, "m", expected)
        client.start()
        # busy: the wait ends with traffic still arriving (exit 1), but the agent is draining
        busy = drain(agent, "--wait", "2", "--quiet", "1")
        assert busy.returncode == 1, busy.stderr
        assert request("GET", agent.url + "/readyz")[0] == 503
        assert request("GET", agent.url + "/v2/health/ready")[0] == 503
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
    finally:
        agent.stop()


def test_drain_of_an_unreachable_agent_says_so(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "agent.cli", "drain", "--management-url", f"http://127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot reach" in r.stderr
