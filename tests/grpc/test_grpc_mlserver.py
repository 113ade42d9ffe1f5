"""KServe V2 gRPC on the agent, driven with tritonclient.grpc (and a raw grpcio channel where a
test needs the status's trailing metadata; KServe's own gRPC client where its SDK is installed) against a real `modelshelf run` with its embedded
MLServer. One agent for the module: the models differ per test."""
from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from agent.demo import write_model
from tests.grpc.conftest import kserve_client, kserve_sdk, running_agent
from tests.support.agentproc import IRIS_ROW, AgentProcess, request, v2_infer_body
from tests.support.configmap import ConfigMapDir
from tests.support.models import SLOW_IMPLEMENTATION, count_loads, write_broken_model, write_slow_model
from tests.support.servers import embedded_mlserver

SERVICE = "/inference.GRPCInferenceService/"
LIMIT = 2**20  # --max-body-bytes of the module's agent


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc-mlserver")
    write_model(root / "store" / "a", "logreg", 0)
    write_model(root / "store" / "b", "tree", 1)
    write_model(root / "store" / "lazy", "forest", 2)
    write_model(root / "store" / "lost", "logreg", 3)
    write_broken_model(root / "store" / "broken")
    write_slow_model(root / "store" / "slow", delay=1.5)
    models = [
        {"name": "a", "uri": str(root / "store" / "a")},
        {"name": "b", "uri": str(root / "store" / "b")},
        {"name": "lazy", "uri": str(root / "store" / "lazy"), "preload": False},
        {"name": "lost", "uri": str(root / "store" / "lost")},
        {"name": "broken", "uri": str(root / "store" / "broken"), "preload": False},
        {"name": "slow", "uri": str(root / "store" / "slow"), "runtime": "mlserver", "implementation": SLOW_IMPLEMENTATION},
    ]
    with running_agent(root, models, "--max-body-bytes", str(LIMIT), loaded=("a", "b", "slow", "lost")) as proc:
        yield proc


def iris_inputs(rows=(IRIS_ROW,)) -> list[tg.InferInput]:
    data = np.asarray(rows, dtype=np.float64)
    inp = tg.InferInput("x", list(data.shape), "FP64")
    inp.set_data_from_numpy(data)
    return [inp]


def raw_call(agent: AgentProcess, method: str, message, metadata=()) -> bytes:
    """One unary call with grpcio itself: the status's trailing metadata stays readable."""
    with grpc.insecure_channel(agent.grpc_target) as channel:
        return channel.unary_unary(SERVICE + method)(message.SerializeToString(), metadata=metadata, timeout=30)


def test_health_and_metadata(agent, client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata().name == "mlserver"  # the server's own, forwarded
    meta = client.get_model_metadata("a")
    assert meta.name == "a"
    assert client.is_model_ready("a")
    with pytest.raises(InferenceServerException) as e:  # Triton's extension: MLServer has none
        client.get_model_config("a")
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"


def test_infer_gives_the_rest_answer(agent, client):
    rows = [IRIS_ROW, [6.6, 3.0, 5.6, 2.0], [5.9, 2.8, 4.3, 1.3]]
    code, rest = agent.post("/v2/models/b/infer", v2_infer_body(rows))
    assert code == 200, rest
    result = client.infer("b", iris_inputs(rows))
    assert result.get_response().model_name == "b"
    predict = result.as_numpy("predict")
    assert list(predict.shape) == rest["outputs"][0]["shape"]
    assert predict.ravel().tolist() == rest["outputs"][0]["data"]


def test_lazy_model_loads_on_first_grpc_infer(agent, client):
    assert agent.state("lazy") in ("registered", "cached")
    assert client.is_model_ready("lazy")  # as REST: a call now succeeds, after a load
    result = client.infer("lazy", iris_inputs())
    assert result.as_numpy("predict").size == 1
    assert agent.state("lazy") == "loaded"
    assert agent.status()["models"]["lazy"]["loads"] == 1


def test_unknown_model_is_not_found(agent, client):
    for call in (lambda: client.infer("nope", iris_inputs()), lambda: client.get_model_metadata("nope"),
                 lambda: client.is_model_ready("nope")):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == "StatusCode.NOT_FOUND"
        assert "'nope' is not configured" in e.value.message()


def test_repository_rpcs_are_refused_like_rest(agent, client):
    code, body = agent.post("/v2/repository/index", {})
    assert code == 403
    for call in (client.get_model_repository_index, lambda: client.load_model("a"), lambda: client.unload_model("a")):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == "StatusCode.PERMISSION_DENIED"
        assert e.value.message() == body["error"]
    assert agent.state("a") == "loaded"


def test_modelmesh_metadata_names_the_model(agent, client):
    """`mm-vmodel-id` (else `mm-model-id`) names the model whatever the message says."""
    result = client.infer("not-a-model", iris_inputs(), headers={"mm-vmodel-id": "a"})
    assert result.get_response().model_name == "a"
    request = pb.ModelInferRequest()  # no model name at all, as ModelMesh clients may send
    request.inputs.add(name="x", datatype="FP64", shape=[1, 4]).contents.fp64_contents.extend(IRIS_ROW)
    answer = pb.ModelInferResponse.FromString(raw_call(agent, "ModelInfer", request, [("mm-model-id", "b")]))
    assert answer.model_name == "b"
    with pytest.raises(grpc.RpcError) as e:
        raw_call(agent, "ModelInfer", request)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "names no model" in e.value.details()


def test_message_over_the_limit_is_resource_exhausted(agent, client):
    big = np.zeros((LIMIT // 32 + 1, 4), dtype=np.float64)  # just over 1 MiB of FP64
    with pytest.raises(InferenceServerException) as e:
        client.infer("a", iris_inputs(big))
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert client.infer("a", iris_inputs()).as_numpy("predict").size == 1  # the next call is fine


def test_model_that_cannot_load_is_unavailable_with_retry_after(agent):
    request = pb.ModelInferRequest(model_name="broken")
    request.inputs.add(name="x", datatype="FP64", shape=[1, 4]).contents.fp64_contents.extend(IRIS_ROW)
    with pytest.raises(grpc.RpcError) as e:
        raw_call(agent, "ModelInfer", request)
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "'broken'" in e.value.details()
    retry = dict(e.value.trailing_metadata() or ())
    assert int(retry["retry-after"]) >= 1


def test_a_call_holds_its_model_leased_until_it_answers(agent, client):
    """The in-flight lease: while a gRPC call is at the server, the agent counts it on its
    model (eviction skips such a model), and drops it once the answer is back."""
    done = threading.Event()
    result: list = []

    def call():
        try:
            result.append(client.infer("slow", iris_inputs()))
        finally:
            done.set()

    threading.Thread(target=call, daemon=True).start()
    agent.wait_for(lambda s: s["models"]["slow"]["inflight"] == 1, timeout=10, what="a lease on slow")
    assert done.wait(30)
    assert result and result[0].as_numpy("echo").tolist() == [IRIS_ROW]
    agent.wait_for(lambda s: s["models"]["slow"]["inflight"] == 0, timeout=10, what="the lease released")


def test_a_taken_grpc_port_stops_the_agent_with_the_address(tmp_path):
    """grpcio binds with SO_REUSEPORT by default, which would let a second agent share the port
    silently and split the calls; the agent refuses to start instead."""
    other = grpc.server(concurrent.futures.ThreadPoolExecutor(1))  # reuseport on, like grpcio's default
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        cm = ConfigMapDir(tmp_path / "config")
        cm.write({"models.yaml": json.dumps({"models": []})})
        proc = AgentProcess(cm.root, tmp_path / "cache", tmp_path / "agent.log", "--grpc-port", str(port))
        try:
            assert proc.proc.wait(30) != 0
        finally:
            proc.stop()
        assert f"cannot listen on 127.0.0.1:{port}" in proc.log()
    finally:
        other.stop(None)


def test_sidecar_server_grpc_target(tmp_path):
    """Sidecar mode: gRPC model calls go to --server-grpc-target; without it the agent says what
    is missing instead of guessing a port (in a pod the guess could be the agent's own)."""
    write_model(tmp_path / "store" / "a", "logreg", 0)
    models = [{"name": "a", "uri": str(tmp_path / "store" / "a")}]
    with embedded_mlserver(tmp_path / "server") as server:
        sidecar = ("--server-url", server.base_url, "--server-repository", str(server.repository))
        with running_agent(tmp_path / "with", models, *sidecar, "--server-grpc-target", server.adapter.grpc_target,
                           loaded=("a",)) as agent:
            with tg.InferenceServerClient(agent.grpc_target) as c:
                assert c.infer("a", iris_inputs()).get_response().model_name == "a"
                # 5 MiB: over MLServer's own 4 MiB gRPC default, within the agent's --max-body-bytes
                rows = np.tile(np.asarray(IRIS_ROW, dtype=np.float64), (5 * 2**20 // 32, 1))
                assert c.infer("a", iris_inputs(rows)).as_numpy("predict").shape[0] == len(rows)
        with running_agent(tmp_path / "without", models, *sidecar, loaded=("a",)) as agent:
            with tg.InferenceServerClient(agent.grpc_target) as c:
                assert c.is_model_ready("a")  # answered by the agent
                with pytest.raises(InferenceServerException) as e:
                    c.infer("a", iris_inputs())
            assert e.value.status() == "StatusCode.UNAVAILABLE"
            assert "--server-grpc-target" in e.value.message()


@kserve_sdk
def test_kserve_grpc_client(agent):
    """KServe's own InferenceGRPCClient (its SDK, in its own venv) against the agent."""
    got = kserve_client(agent, "a", {"name": "x", "shape": [1, 4], "datatype": "FP64", "data": IRIS_ROW})
    assert got["live"] is True and got["ready"] is True and got["model_ready"] is True
    code, rest = agent.post("/v2/models/a/infer", v2_infer_body([IRIS_ROW]))
    assert code == 200, rest
    assert got["infer"] == {"model_name": "a", "outputs": {"predict": rest["outputs"][0]["data"]}}
    assert "'nope' is not configured" in got["unknown"]


def test_a_grpc_call_in_flight_is_never_evicted(tmp_path):
    """Room for one model: a lazy load that needs the memory of a model a gRPC call is using
    waits until that call is answered, then evicts it and loads (the REST rule)."""
    load_log = tmp_path / "loads.log"
    write_slow_model(tmp_path / "store" / "slow", delay=3.0, load_log=load_log)
    write_model(tmp_path / "store" / "other", "logreg", 0)
    models = [
        {"name": "slow", "uri": str(tmp_path / "store" / "slow"), "runtime": "mlserver",
         "implementation": SLOW_IMPLEMENTATION, "memory": "300Mi"},
        {"name": "other", "uri": str(tmp_path / "store" / "other"), "memory": "300Mi", "preload": False},
    ]
    with running_agent(tmp_path, models, "--host-memory", "500Mi", "--min-residency", "0", loaded=("slow",)) as agent, \
            tg.InferenceServerClient(agent.grpc_target) as c:
        done: dict = {}

        def slow_call() -> None:
            done["slow"] = c.infer("slow", iris_inputs())
            done["slow_at"] = time.monotonic()

        t = threading.Thread(target=slow_call)
        t.start()
        agent.wait_for(lambda s: s["models"]["slow"]["inflight"] == 1, what="the slow call in flight")
        other = c.infer("other", iris_inputs())  # needs slow's memory while slow holds a lease
        other_at = time.monotonic()
        t.join(30)
        assert done["slow"].as_numpy("echo").tolist() == [IRIS_ROW]
        assert other.get_response().model_name == "other"
        assert done["slow_at"] <= other_at  # slow was never unloaded under its call
        assert count_loads(load_log, "slow") == 1
        agent.wait_state("slow", "cached")


def test_grpc_calls_are_counted_per_model_until_it_is_removed(tmp_path):
    write_model(tmp_path / "store" / "a", "logreg", 0)
    write_model(tmp_path / "store" / "b", "tree", 1)
    a, b = ({"name": n, "uri": str(tmp_path / "store" / n)} for n in ("a", "b"))
    with running_agent(tmp_path, [a, b], loaded=("a", "b")) as agent, tg.InferenceServerClient(agent.grpc_target) as c:
        c.infer("a", iris_inputs())
        c.infer("b", iris_inputs())
        with pytest.raises(InferenceServerException):
            c.infer("nope", iris_inputs())
        metrics = agent.get("/metrics")[1].decode()
        assert 'modelshelf_grpc_requests_total{code="OK",model="a"} 1.0' in metrics
        assert 'modelshelf_grpc_requests_total{code="NOT_FOUND",model=""} 1.0' in metrics  # no name from the client
        ConfigMapDir(tmp_path / "config").write({"models.yaml": json.dumps({"models": [a]})})
        agent.wait_state("b", None)
        metrics = agent.get("/metrics")[1].decode()
        assert 'model="b"' not in metrics.split("modelshelf_grpc_requests_total", 1)[1]
        assert 'modelshelf_grpc_requests_total{code="OK",model="a"} 1.0' in metrics


def test_a_model_the_server_lost_is_unavailable_not_not_found(agent, client):
    """The server no longer has a model the agent holds loaded (unloaded behind its back): the
    call is UNAVAILABLE with retry-after, never NOT_FOUND for a configured model (REST: 503), and
    the agent reloads it at once (well before its periodic resync)."""
    server = agent.status()["server"]["url"]
    assert request("POST", f"{server}/v2/repository/models/lost/unload", {})[0] == 200
    request_ = pb.ModelInferRequest(model_name="lost")
    request_.inputs.add(name="x", datatype="FP64", shape=[1, 4]).contents.fp64_contents.extend(IRIS_ROW)
    with pytest.raises(grpc.RpcError) as e:
        raw_call(agent, "ModelInfer", request_)
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "'lost'" in e.value.details() and int(dict(e.value.trailing_metadata())["retry-after"]) >= 1
    agent.wait_for(lambda s: s["models"]["lost"]["loads"] == 2 and s["models"]["lost"]["state"] == "loaded",
                   timeout=30, what="lost reloaded")
    assert pb.ModelInferResponse.FromString(raw_call(agent, "ModelInfer", request_)).model_name == "lost"
