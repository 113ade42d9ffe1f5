"""Readiness means "send me traffic now": a real agent (embedded MLServer) reports ready only once
its models are checked and loaded as configured, at start and again after its server restarted;
before that /readyz, /v2/health/ready and /fleet/state say why not (today a restarted replica took
traffic and stalled it 19 s)."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from tests.support.agentproc import AgentProcess, request
from tests.support.configmap import ConfigMapDir
from tests.support.models import SLOW_IMPLEMENTATION, write_sklearn_model, write_slow_model
from tests.support.net import free_port


def first_ready(agent: AgentProcess, timeout: float = 90) -> tuple[dict, list[str]]:
    """Poll /readyz (every 20 ms) until 200; returns /fleet/state read right then, and every
    not-ready reason seen on the way."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            code, doc = request("GET", agent.url + "/readyz", timeout=5)
        except OSError:
            code, doc = 0, {}
        if code == 200:
            return request("GET", agent.management_url + "/fleet/state")[1], seen
        seen += [r for r in (doc.get("reasons", []) if isinstance(doc, dict) else []) if r not in seen]
        time.sleep(0.02)
    raise AssertionError(f"not ready within {timeout}s; reasons seen: {seen}\n{agent.log()[-3000:]}")


def test_ready_only_once_models_are_loaded_at_start_and_after_a_server_restart(tmp_path: Path) -> None:
    write_slow_model(tmp_path / "store" / "slow", delay=0.0, load_delay=1.0)  # each load takes 1 s
    write_sklearn_model(tmp_path / "store" / "iris")
    cm = ConfigMapDir(tmp_path / "config")
    cm.write({"models.yaml": json.dumps({"models": [
        {"name": "slow", "uri": str(tmp_path / "store" / "slow"), "runtime": "mlserver",
         "implementation": SLOW_IMPLEMENTATION},
        {"name": "iris", "uri": str(tmp_path / "store" / "iris")}]})})
    agent = AgentProcess(cm.root, tmp_path / "cache", tmp_path / "agent.log", f"--management-port={free_port()}")
    try:
        state, seen = first_ready(agent)
        assert any(r.startswith("restocking") for r in seen), seen  # seen while "slow" loaded
        assert {n: m["state"] for n, m in state["models"].items()} == {"slow": "loaded", "iris": "loaded"}
        assert state["ready"] is True

        pid = agent.status()["server"]["pid"]
        os.kill(pid, signal.SIGKILL)  # the embedded server dies; the agent restarts it
        deadline = time.monotonic() + 10
        while request("GET", agent.url + "/v2/health/ready")[0] == 200:
            assert time.monotonic() < deadline, "still ready 10 s after its server was killed"
            time.sleep(0.02)
        state, seen = first_ready(agent)
        assert agent.status()["server"]["pid"] != pid
        assert {n: m["state"] for n, m in state["models"].items()} == {"slow": "loaded", "iris": "loaded"}
        assert any(r.startswith("restocking") for r in seen), seen
    finally:
        agent.stop()
