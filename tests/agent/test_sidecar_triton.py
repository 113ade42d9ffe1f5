"""Sidecar mode (an external server the agent does not start) and Triton behind the agent."""
from __future__ import annotations

import json

import numpy as np
import pytest

from agent.demo import write_model
from tests.support.agentproc import IRIS_ROW, AgentProcess, request, v2_infer_body
from tests.support.configmap import ConfigMapDir
from tests.support.models import SLOW_IMPLEMENTATION, count_loads, triton_v2_request, write_slow_model, write_triton_model
from tests.support.servers import embedded_mlserver, triton_available, triton_site_packages


def test_agent_restart_adopts_loaded_models_without_reloading(tmp_path):
    """Restart recovery: a new agent reads the server's index and adopts what is loaded and
    still wanted (no load on the server, no download); what is no longer wanted is unloaded."""
    load_log = tmp_path / "loads.log"
    write_slow_model(tmp_path / "store" / "slow", delay=0.0, load_log=load_log)
    write_model(tmp_path / "store" / "a", "logreg", 0)
    slow = {"name": "slow", "uri": str(tmp_path / "store" / "slow"), "runtime": "mlserver", "implementation": SLOW_IMPLEMENTATION}
    a = {"name": "a", "uri": str(tmp_path / "store" / "a")}
    cm = ConfigMapDir(tmp_path / "config")
    cm.write({"models.yaml": json.dumps([slow, a])})
    with embedded_mlserver(tmp_path / "server") as server:
        args = ("--server-url", server.base_url, "--server-repository", str(server.repository))
        first = AgentProcess(cm.root, tmp_path / "cache", tmp_path / "agent1.log", *args).wait_ready()
        first.wait_state("slow", "loaded")
        first.wait_state("a", "loaded")
        assert first.stop() == 0
        assert count_loads(load_log, "slow") == 1
        index = server.call(server.adapter.index())
        assert index.get("slow") == "READY" and index.get("a") == "READY"  # stopping the agent unloads nothing

        cm.write({"models.yaml": json.dumps([slow])})  # `a` removed while no agent ran
        second = AgentProcess(cm.root, tmp_path / "cache", tmp_path / "agent2.log", *args).wait_ready()
        try:
            status = second.wait_state("slow", "loaded")
            assert status["models"]["slow"]["loads"] == 0  # adopted
            assert count_loads(load_log, "slow") == 1  # the server did not load it again
            code, body = second.post("/v2/models/slow/infer", v2_infer_body([IRIS_ROW]))
            assert code == 200, body
            second.wait_for(lambda s: "a" not in server.call(server.adapter.index()), what="orphan a unloaded")
            assert "adopted" in second.log()
        finally:
            second.stop()


triton_missing = triton_available()


@pytest.mark.triton
@pytest.mark.skipif(triton_missing is not None, reason=f"Triton not installed: {triton_missing}")
def test_triton_behind_the_agent_with_binary_tensors(tmp_path):
    """A native Triton model dir served by an embedded Triton; the binary tensor extension
    passes through the agent byte for byte (compared with the same request sent directly)."""
    import tritonclient.http as tc

    write_triton_model(tmp_path / "store" / "double", name="anything", factor=2.0, site_packages=triton_site_packages())
    cm = ConfigMapDir(tmp_path / "config")
    cm.write({"models.yaml": json.dumps([{"name": "double", "uri": str(tmp_path / "store" / "double"), "runtime": "triton"}])})
    agent = AgentProcess(cm.root, tmp_path / "cache", tmp_path / "agent.log", "--server", "triton").wait_ready()
    try:
        agent.wait_state("double", "loaded", timeout=60)
        code, body = agent.post("/v2/models/double/infer", triton_v2_request([1.0, 2.5]))
        assert code == 200, body
        assert body["outputs"][0]["data"] == [2.0, 5.0]

        values = np.arange(1000, dtype=np.float32)
        inp = tc.InferInput("INPUT0", [values.size], "FP32")
        inp.set_data_from_numpy(values, binary_data=True)
        out = tc.InferRequestedOutput("OUTPUT0", binary_data=True)
        client = tc.InferenceServerClient(agent.url.removeprefix("http://"))
        result = client.infer("double", [inp], outputs=[out])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), values * 2)

        # the same raw binary request, direct and through the agent: identical response bodies
        body_bytes, header_len = tc.InferenceServerClient.generate_request_body([inp], outputs=[out])
        headers = {"Inference-Header-Content-Length": str(header_len), "Content-Type": "application/octet-stream"}
        direct_url = agent.status()["server"]["url"]
        code_d, direct = request("POST", f"{direct_url}/v2/models/double/infer", data=body_bytes, headers=headers)
        code_a, proxied = request("POST", f"{agent.url}/v2/models/double/infer", data=body_bytes, headers=headers)
        assert code_d == code_a == 200
        assert isinstance(proxied, bytes) and proxied == direct
        assert len(proxied) > values.nbytes  # the output tensor really came back as binary
    finally:
        agent.stop()
