"""The GPU check's CPU paths, exercised here (no GPU): the CUDA loader says clearly that there is
no libcuda, the server refuses to start with that reason, and the very same server with its host
backend is driven by a REAL agent as a sidecar (--server-url, --server-repository,
--server-pid-file): loads, inference, measurement of each model by the server's real RSS, the
first model's share split from the runtime's, and reality's excess over the budget evicted."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.gpu_check import SERVER, gpu_server, write_gpu_model
from benchmarks.gpu_server import CudaDriver, NoCuda
from tests.support.agentproc import AgentProcess
from tests.support.configmap import ConfigMapDir

MiB = 2**20


def _has_libcuda() -> bool:
    try:
        CudaDriver()
        return True
    except NoCuda:
        return False


@pytest.mark.skipif(_has_libcuda(), reason="libcuda is present: the no-CUDA path cannot be exercised")
def test_no_libcuda_is_said_clearly(tmp_path):
    with pytest.raises(NoCuda, match="no libcuda"):
        CudaDriver()
    out = subprocess.run([sys.executable, str(SERVER), "--repository", str(tmp_path), "--port", "1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 3 and "cannot start: no libcuda" in out.stderr


@pytest.mark.timeout(120)
def test_agent_drives_the_server_as_a_sidecar_and_measures_it(tmp_path):
    models = [{"name": f"h{i}", "uri": str(write_gpu_model(tmp_path / "store" / f"h{i}", 80 * MiB)),
               "runtime": "sklearn", "preload": False} for i in range(3)]
    with gpu_server(tmp_path / "srv", backend="host") as srv:
        cm = ConfigMapDir(tmp_path / "config")
        cm.write({"models.yaml": json.dumps({"models": models})})
        agent = AgentProcess(cm.root, tmp_path / "cache", tmp_path / "agent.log", "--server-url", srv.url,
                             "--server-repository", str(srv.repository), "--server-pid-file", str(srv.pid_file),
                             "--host-memory", "200Mi", "--min-residency", "0")
        try:
            agent.wait_ready()
            for name in ("h0", "h1"):
                code, body = agent.post(f"/v2/models/{name}/infer", {"inputs": []})
                assert code == 200 and body["outputs"][0]["data"] == [80 * MiB], body
            status = agent.status()
            ledger = status["ledger"]
            for name in ("h0", "h1"):  # h0 loaded first: split from the runtime's share once h1 was measured
                measured = ledger["models"][name]["measured"]["host"]
                assert 75 * MiB <= measured <= 100 * MiB, (name, ledger["models"][name])
            assert ledger["runtime_imports"]["sklearn"]["host"] < 20 * MiB
            assert status["server"]["pid"] is None  # a sidecar: known only through --server-pid-file
            # the third model's entry is tiny: its estimate fits the ledger; reality says otherwise,
            # and the agent's reality loop evicts (LRU) until the server is back within the budget
            code, _ = agent.post("/v2/models/h2/infer", {"inputs": []})
            assert code == 200
            # the server may give the memory back a moment before the agent records the unload's end
            st = agent.wait_for(lambda s: "evicted_for_excess" in agent.log()
                                and s["reality"]["devices"]["host"]["real"] <= 200 * MiB * 1.05
                                and s["models"]["h0"]["state"] != "unloading", timeout=30,
                                what="an eviction for real excess, then the server within its budget")
            assert "reason=real_over_budget" in agent.log() or "(real_over_budget)" in agent.log()
            assert st["models"]["h0"]["state"] == "cached" and st["models"]["h2"]["state"] == "loaded", st["models"]
        finally:
            agent.stop()
