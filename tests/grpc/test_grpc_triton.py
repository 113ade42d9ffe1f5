"""KServe V2 gRPC on the agent with an embedded Triton, driven with tritonclient.grpc: the
V2 calls, Triton's extensions passed through (ModelConfig, ModelStatistics, ModelStreamInfer),
lazy loading and the same answers as the agent's REST port."""
from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

from tests.grpc.conftest import kserve_client, kserve_sdk, running_agent
from tests.support.models import triton_v2_request, write_triton_model
from tests.support.servers import triton_available, triton_site_packages

triton_missing = triton_available()
pytestmark = [pytest.mark.triton, pytest.mark.skipif(triton_missing is not None, reason=f"Triton not installed: {triton_missing}")]


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc-triton")
    site = triton_site_packages()
    write_triton_model(root / "store" / "double", name="anything", factor=2.0, site_packages=site)
    write_triton_model(root / "store" / "triple", name="anything", factor=3.0, site_packages=site)
    models = [
        {"name": "double", "uri": str(root / "store" / "double"), "runtime": "triton"},
        {"name": "triple", "uri": str(root / "store" / "triple"), "runtime": "triton", "preload": False},
    ]
    with running_agent(root, models, "--server", "triton", loaded=("double",)) as proc:
        yield proc


def fp32_input(values) -> tg.InferInput:
    data = np.asarray(values, dtype=np.float32)
    inp = tg.InferInput("INPUT0", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    return inp


def test_v2_calls_and_same_answer_as_rest(agent, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata().name == "triton"
    meta = client.get_model_metadata("double")
    assert meta.name == "double" and meta.inputs[0].name == "INPUT0"
    assert client.is_model_ready("double")
    code, rest = agent.post("/v2/models/double/infer", triton_v2_request([1.0, 2.5]))
    assert code == 200, rest
    result = client.infer("double", [fp32_input([1.0, 2.5])])
    assert result.as_numpy("OUTPUT0").tolist() == rest["outputs"][0]["data"] == [2.0, 5.0]
    big = np.arange(100_000, dtype=np.float32)  # raw tensor bytes pass through unchanged
    np.testing.assert_array_equal(client.infer("double", [fp32_input(big)]).as_numpy("OUTPUT0"), big * 2)


def test_triton_extensions_pass_through(agent, client):
    config = client.get_model_config("double").config
    assert config.name == "double" and config.backend == "python"
    client.infer("double", [fp32_input([1.0])])
    stats = client.get_inference_statistics("double").model_stats
    assert stats[0].name == "double" and stats[0].inference_count >= 1
    every = client.get_inference_statistics().model_stats  # no name: all the server's models
    assert "double" in {s.name for s in every}
    with pytest.raises(InferenceServerException) as e:
        client.get_model_config("nope")
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_stream_infer_loads_a_lazy_model_and_answers_in_order(agent, client):
    assert agent.state("triple") in ("registered", "cached")
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(3):
            client.async_stream_infer("triple", [fp32_input([float(i)])], request_id=str(i))
        client.async_stream_infer("double", [fp32_input([5.0])], request_id="d")
        got = [answers.get(timeout=60) for _ in range(4)]
    finally:
        client.stop_stream()
    assert [error for _, error in got] == [None] * 4
    assert [(r.get_response().id, r.as_numpy("OUTPUT0").tolist()) for r, _ in got] == [
        ("0", [0.0]), ("1", [3.0]), ("2", [6.0]), ("d", [10.0])]
    assert agent.state("triple") == "loaded"
    agent.wait_for(lambda s: s["models"]["triple"]["inflight"] == 0, timeout=10, what="stream leases released")


def test_stream_naming_an_unknown_model_ends_not_found(agent, client):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer("nope", [fp32_input([1.0])])
        _, error = answers.get(timeout=30)
    finally:
        client.stop_stream()
    assert error is not None and error.status() == "StatusCode.NOT_FOUND"
    assert "'nope' is not configured" in error.message()


@kserve_sdk
def test_kserve_grpc_client(agent):
    """KServe's own InferenceGRPCClient (its SDK, in its own venv) against the agent on Triton."""
    got = kserve_client(agent, "double", {"name": "INPUT0", "shape": [2], "datatype": "FP32", "data": [1.0, 2.5]})
    assert got["live"] is True and got["ready"] is True and got["model_ready"] is True
    assert got["infer"] == {"model_name": "double", "outputs": {"OUTPUT0": [2.0, 5.0]}}
    assert "'nope' is not configured" in got["unknown"]
