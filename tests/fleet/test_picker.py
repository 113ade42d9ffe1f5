"""`modelshelf picker` as a real process, driven through ext_proc by a real gRPC client the way
Envoy drives it (one stream per request: headers, then the body for gRPC calls), against two
real agents (each with its embedded MLServer). Every endpoint the picker answers is then called
for real, as the gateway would: the right agent must answer.

The agents' GET /fleet/state is read through `StateStandIn`: it passes the agent's own answer
through when the agent has the endpoint, else derives the same document from the agent's
/status (until the fleet-agent branch lands here). The Envoy side (ORIGINAL_DST on the header)
is tested with a real Envoy by tests/fleet/test_gateway*.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qsl, urlsplit

import grpc
import pytest
import tritonclient.grpc as tg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.picker import messages as pb
from agent.picker.placement import Placement
from tests.fleet.test_placement import agent as placement_agent
from tests.support.agentproc import AgentProcess, request
from tests.support.configmap import ConfigMapDir
from tests.support.models import sample_rows, sklearn_predictions, v2_request, write_sklearn_model
from tests.support.net import free_port

DEST = "x-gateway-destination-endpoint"
MODELS = ("m0", "m1", "m2")
POLL_TIMEOUT = 30.0  # the stand-in fleet's picker --poll-timeout (see stand_in_fleet)


# ------------------------------------------------------------------------------ helpers
class StateStandIn:
    """A real HTTP server answering GET /fleet/state with `doc()` (a 503 while `fail` is set);
    `stop()` closes it, so the picker's next read is refused. With `long_poll`, it honours
    `?since=SEQ&wait=S` as the agent does: the answer waits until `changed()` or S seconds."""

    def __init__(self, doc: Callable[[], dict[str, Any]], long_poll: bool = False):
        self.doc, self.fail, self.long_poll, self.closing = doc, False, long_poll, False
        self.cond = threading.Condition()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if stand_in.fail or not self.path.startswith("/fleet/state"):
                    self.send_error(503 if stand_in.fail else 404)
                    return
                query = dict(parse_qsl(urlsplit(self.path).query))
                if stand_in.long_poll and "since" in query:
                    with stand_in.cond:
                        stand_in.cond.wait_for(lambda: stand_in.closing or str(stand_in.doc().get("seq")) != query["since"],
                                               timeout=float(query.get("wait", 5)))
                body = json.dumps(stand_in.doc()).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a picker that hung up mid-answer (its timeout, its exit)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def changed(self) -> None:
        with self.cond:
            doc = self.doc()
            doc["seq"] = doc.get("seq", 0) + 1
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:  # held long polls answer now: server_close() joins their threads
            self.closing = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()


def state_of(agent: AgentProcess) -> dict[str, Any]:
    """The agent's /fleet/state, or the same document derived from its /status."""
    status, body = request("GET", agent.management_url + "/fleet/state")
    if status == 200 and isinstance(body, dict):
        return body
    s = agent.status()
    ready = request("GET", agent.url + "/readyz")[0] == 200
    models = {name: {"state": m["state"], "inflight": m.get("inflight", 0), "requests": 0, "bytes": 0, "last_used": 0.0}
              for name, m in s["models"].items()}
    return {"agent": str(agent.port), "seq": 0, "ready": ready, "draining": False, "http_port": agent.port,
            "grpc_port": agent.grpc_port, "models": models, "memory": {"host": {"free": None}, "gpu": {}}}


class Picker:
    """`modelshelf picker` as a subprocess on a free port."""

    def __init__(self, log_path: Path, agents: list[tuple[str, str]], *args: str):
        self.target = f"127.0.0.1:{free_port()}"
        self._log = open(log_path, "ab")
        self.log_path = log_path
        flags = [f for data, mgmt in agents for f in ("--agent", f"{data}={mgmt}")]
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "picker", "--listen", self.target,
                                      "--poll-interval", "0.05", *flags, *args],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(self.target)
        self._process = self.channel.stream_stream(pb.PROCESS_METHOD, request_serializer=lambda m: m.SerializeToString(),
                                                   response_deserializer=pb.ProcessingResponse.FromString)

    def health(self, service: str) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status

    def wait_ready(self, timeout: float = 20) -> "Picker":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.health("readiness") == health_pb2.HealthCheckResponse.SERVING:
                    return self
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"picker not ready; log:\n{self.log_path.read_text()[-3000:]}")

    def exchange(self, *messages: Any) -> list[Any]:
        """One ext_proc stream: send `messages`, return every answer."""
        return list(self._process(iter(messages), timeout=10))

    def stop(self) -> None:
        self.channel.close()
        self.proc.terminate()
        self.proc.wait(10)
        self._log.close()


def headers(path: str, end_of_stream: bool = False, metadata: dict[str, Any] | None = None, **extra: str) -> Any:
    hs = [pb.HeaderValue(key=k, raw_value=v.encode()) for k, v in
          {":method": "POST", ":path": path, ":authority": "gateway", **{k.replace("_", "-"): v for k, v in extra.items()}}.items()]
    req = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=pb.HeaderMap(headers=hs), end_of_stream=end_of_stream))
    for namespace, fields in (metadata or {}).items():
        req.metadata_context.filter_metadata[namespace].update(fields)
    return req


def body(data: bytes) -> Any:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=True))


def grpc_frame(message: Any) -> bytes:
    data = message.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


def destination(response: Any) -> str:
    """The endpoint a headers/body answer sets; the header and the metadata must agree."""
    kind = response.WhichOneof("response")
    common = getattr(response, kind).response
    values = [h.header.raw_value.decode() for h in common.header_mutation.set_headers if h.header.key == DEST]
    assert len(values) == 1, response
    assert common.header_mutation.set_headers[0].append_action == pb.OVERWRITE_IF_EXISTS_OR_ADD  # a client's own header loses
    assert common.clear_route_cache
    assert response.dynamic_metadata.fields["envoy.lb"].struct_value.fields[DEST].string_value == values[0]
    return values[0]


def rest_destination(picker: Picker, path: str, **kw: Any) -> str:
    (answer,) = picker.exchange(headers(path, **kw))
    return destination(answer)


def infer_request(model: str) -> Any:
    inp = tg.InferInput("input-0", [1, 4], "FP64")
    inp.set_data_from_numpy(__import__("numpy").array(sample_rows(1), dtype="float64"))
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(model_name=model)
    req.inputs.extend([inp._get_tensor()])
    return req


def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


# ------------------------------------------------------------------------------ real agents
@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("fleet")
    for i, name in enumerate(MODELS):
        write_sklearn_model(root / "store" / name, seed=i)
    models = [{"name": n, "uri": str(root / "store" / n), "runtime": "sklearn", "preload": False} for n in MODELS]
    agents, stand_ins = [], []
    try:
        for i in range(2):
            cm = ConfigMapDir(root / f"config{i}")
            cm.write({"models.yaml": json.dumps({"models": models})})
            agents.append(AgentProcess(cm.root, root / "cache", root / f"agent{i}.log"))
        for a in agents:
            a.wait_ready()
            stand_ins.append(StateStandIn(lambda a=a: state_of(a)))
        picker = Picker(root / "picker.log", [(f"127.0.0.1:{a.port}", s.url) for a, s in zip(agents, stand_ins)]).wait_ready()
        yield {"agents": agents, "picker": picker, "root": root, "by_endpoint": {f"127.0.0.1:{a.port}": a for a in agents}}
        picker.stop()
    finally:
        for s in stand_ins:
            s.stop()
        for a in agents:
            a.stop()


def loaded_holder(fleet: dict[str, Any], model: str) -> AgentProcess:
    """The agent holding `model` loaded (loaded on the first agent when none does), once the
    picker routes to it: each test runs alone too."""
    agents = fleet["agents"]
    holder = next((a for a in agents if a.state(model) == "loaded"), None)
    if holder is None:
        holder = agents[0]
        assert holder.post(f"/v2/models/{model}/infer", v2_request(sample_rows(1)))[0] == 200
        holder.wait_state(model, "loaded")
    want = f"127.0.0.1:{holder.port}"
    eventually(lambda: rest_destination(fleet["picker"], f"/v2/models/{model}/infer") == want, what=f"{model} on its copy")
    return holder


def test_rest_request_goes_to_an_agent_and_stays_with_its_copy(fleet):
    picker, by_endpoint = fleet["picker"], fleet["by_endpoint"]
    first = rest_destination(picker, "/v2/models/m0/infer")
    assert first in by_endpoint
    rows = sample_rows(2)
    status, out = request("POST", f"http://{first}/v2/models/m0/infer", v2_request(rows))
    assert status == 200, out
    assert out["outputs"][0]["data"] == sklearn_predictions(fleet["root"] / "store" / "m0", rows)
    by_endpoint[first].wait_state("m0", "loaded")
    time.sleep(0.3)  # the picker has read the agent's report: the copy now decides
    assert {rest_destination(picker, "/v2/models/m0/infer") for _ in range(10)} == {first}
    assert rest_destination(picker, "/v2/models/m0/versions/1/infer") == first
    assert rest_destination(picker, "/v1/models/m0:predict") == first


def test_a_loaded_copy_wins_over_where_hashing_would_place_it(fleet):
    picker, agents = fleet["picker"], fleet["agents"]
    names = [f"127.0.0.1:{a.port}" for a in agents]
    ring = Placement()
    for n in names:
        ring.set_agent(placement_agent(n), known=False)
    hashed = next(ring._walk("m1"))
    other = next(a for n, a in zip(names, agents) if n != hashed)
    status, _ = other.post("/v2/models/m1/infer", v2_request(sample_rows(1)))  # loaded where hashing would not put it
    assert status == 200
    other.wait_state("m1", "loaded")
    want = f"127.0.0.1:{other.port}"
    eventually(lambda: rest_destination(picker, "/v2/models/m1/infer") == want, timeout=30,
               what=f"m1 routed to its loaded copy on {want} (picker log: {fleet['picker'].log_path})")
    assert {rest_destination(picker, "/v2/models/m1/infer") for _ in range(10)} == {want}


def test_grpc_model_call_is_routed_from_its_message_to_the_agents_grpc_port(fleet):
    picker, agents = fleet["picker"], fleet["agents"]
    holder = loaded_holder(fleet, "m1")
    first, second = picker.exchange(headers("/inference.GRPCInferenceService/ModelInfer", content_type="application/grpc"),
                                    body(grpc_frame(infer_request("m1"))))
    # headers: continue, and ask for the body (the model's name is in the message)
    assert first.WhichOneof("response") == "request_headers"
    assert not first.request_headers.response.header_mutation.set_headers
    assert first.mode_override.request_body_mode == pb.BODY_BUFFERED
    target = destination(second)
    assert target == holder.grpc_target
    client = tg.InferenceServerClient(target)  # the gateway's hop, done by hand: the agent serves it
    try:
        inp = tg.InferInput("input-0", [1, 4], "FP64")
        inp.set_data_from_numpy(__import__("numpy").array(sample_rows(1), dtype="float64"))
        result = client.infer("m1", [inp])
        assert result.as_numpy("predict").ravel().tolist() == sklearn_predictions(fleet["root"] / "store" / "m1", sample_rows(1))
    finally:
        client.close()


@pytest.mark.parametrize("method", ["ModelInfer", "ModelStreamInfer"])
@pytest.mark.parametrize("metadata", ["mm_vmodel_id", "mm_model_id"])
def test_grpc_model_named_by_modelmesh_metadata_needs_no_body(fleet, method, metadata):
    """ModelMesh's mm-vmodel-id / mm-model-id names the model: routed to its holder at the headers."""
    holder = loaded_holder(fleet, "m1")
    (answer,) = fleet["picker"].exchange(headers(f"/inference.GRPCInferenceService/{method}", content_type="application/grpc",
                                                 **{metadata: "m1"}))
    assert answer.WhichOneof("response") == "request_headers" and not answer.HasField("mode_override")
    assert destination(answer) == holder.grpc_target


def test_a_grpc_stream_is_routed_at_its_headers(fleet):
    """ModelStreamInfer never ends its body: the picker must not ask for it."""
    picker, agents = fleet["picker"], fleet["agents"]
    (answer,) = picker.exchange(headers("/inference.GRPCInferenceService/ModelStreamInfer", content_type="application/grpc"))
    assert answer.WhichOneof("response") == "request_headers" and not answer.HasField("mode_override")
    assert destination(answer) in {a.grpc_target for a in agents}


def test_a_partial_grpc_body_is_enough(fleet):
    """BUFFERED_PARTIAL: only the first bytes of a large message arrive; the name is in front."""
    picker, agents = fleet["picker"], fleet["agents"]
    holder = loaded_holder(fleet, "m1")
    frame = grpc_frame(infer_request("m1"))
    partial = pb.ProcessingRequest(request_body=pb.HttpBody(body=frame[:12], end_of_stream=False))
    _, answer = picker.exchange(headers("/inference.GRPCInferenceService/ModelInfer", content_type="application/grpc"), partial)
    assert destination(answer) == holder.grpc_target


def test_unknown_model_goes_to_an_agent_that_answers_404(fleet):
    picker, by_endpoint = fleet["picker"], fleet["by_endpoint"]
    target = rest_destination(picker, "/v2/models/never-configured/infer")
    assert target in by_endpoint
    assert rest_destination(picker, "/v2/models/never-configured") == target  # hashed: always the same agent
    status, out = request("POST", f"http://{target}/v2/models/never-configured/infer", v2_request(sample_rows(1)))
    assert status == 404 and "never-configured" in out["error"]


def test_calls_naming_no_model_go_to_any_agent(fleet):
    picker, by_endpoint, agents = fleet["picker"], fleet["by_endpoint"], fleet["agents"]
    seen = {rest_destination(picker, "/v2/health/ready", end_of_stream=True) for _ in range(4)}
    assert seen == set(by_endpoint)  # spread over the agents
    for target in seen:
        assert request("GET", f"http://{target}/v2/health/ready")[0] == 200
    (answer,) = picker.exchange(headers("/inference.GRPCInferenceService/ServerLive", content_type="application/grpc"))
    assert destination(answer) in {a.grpc_target for a in agents}


def test_responses_pass_through_untouched(fleet):
    picker = fleet["picker"]
    resp_headers = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=pb.HeaderMap()))
    resp_body = pb.ProcessingRequest(response_body=pb.HttpBody(body=b"{}", end_of_stream=True))
    _, h, b = picker.exchange(headers("/v2/models/m0/infer"), resp_headers, resp_body)
    assert h.WhichOneof("response") == "response_headers" and not h.response_headers.response.header_mutation.set_headers
    assert b.WhichOneof("response") == "response_body" and not b.response_body.response.HasField("header_mutation")


# ------------------------------------------------------------------------------ stand-ins
def doc(port: int, *, loaded: tuple[str, ...] = (), ready: bool = True, draining: bool = False) -> dict[str, Any]:
    return {"agent": f"agent-{port}", "seq": 1, "ready": ready, "draining": draining, "http_port": port,
            "grpc_port": port + 1, "memory": {"host": {"budget": None, "reserved": 0, "free": None}, "gpu": {}},
            "models": {m: {"state": "loaded" if m in loaded else "cached", "inflight": 0, "requests": 0, "bytes": 0,
                           "last_used": 0.0} for m in MODELS}}


@pytest.fixture
def stand_in_fleet(tmp_path) -> Iterator[tuple[Picker, list[dict], list[StateStandIn], list[str]]]:
    """Two stand-in agents (documents the test edits: `docs[i]`), 127.0.0.2 and 127.0.0.3 ports
    that nobody serves (the picker only names them), and a picker on them."""
    docs = [doc(20000, loaded=("m0",)), doc(20010)]
    stand_ins = [StateStandIn(lambda d=d: d) for d in docs]
    names = ["127.0.0.1:20000", "127.0.0.1:20010"]
    # --poll-timeout 30: an agent that fails must leave on that failed report, well within the
    # waits below; one kept until its read timed out would need 30 s (the default is 1 s)
    picker = Picker(tmp_path / "picker.log", [(n, s.url) for n, s in zip(names, stand_ins)],
                    "--hot-rate", "20", "--max-copies", "2", "--poll-timeout", str(POLL_TIMEOUT)).wait_ready()
    yield picker, docs, stand_ins, names
    picker.stop()
    for s in stand_ins:
        try:
            s.stop()
        except OSError:
            pass


def test_no_agent_ready_is_an_immediate_503_in_the_protocols_shape(stand_in_fleet):
    picker, docs, _, _ = stand_in_fleet
    docs[0]["ready"] = docs[1]["ready"] = False
    answer = eventually(lambda: (a := picker.exchange(headers("/v2/models/m0/infer"))[0])
                        .WhichOneof("response") == "immediate_response" and a, what="503")
    immediate = answer.immediate_response
    assert immediate.status.code == 503
    assert "no agent is ready" in json.loads(immediate.body)["error"]
    (answer,) = picker.exchange(headers("/inference.GRPCInferenceService/ModelInfer", content_type="application/grpc",
                                        mm_model_id="m0"))
    assert answer.immediate_response.status.code == 503
    assert answer.immediate_response.grpc_status.status == grpc.StatusCode.UNAVAILABLE.value[0]


def test_a_dead_agent_leaves_at_once_and_its_models_go_elsewhere(stand_in_fleet):
    """A refused report takes the agent out on that report (polled every 0.05 s here), not
    once a read timed out: the fixture's --poll-timeout (30 s) is three times this test's wait,
    so a picker that waited for a timeout fails it, however slow the machine."""
    picker, _, stand_ins, names = stand_in_fleet
    assert rest_destination(picker, "/v2/models/m0/infer") == names[0]  # its loaded copy
    stand_ins[0].stop()  # connection refused from now on
    eventually(lambda: rest_destination(picker, "/v2/models/m0/infer") == names[1], timeout=POLL_TIMEOUT / 3,
               what="m0 re-placed")
    assert {rest_destination(picker, f"/v2/models/{m}/infer") for m in MODELS} == {names[1]}


def test_a_failing_report_counts_as_dead(stand_in_fleet):
    picker, _, stand_ins, names = stand_in_fleet
    stand_ins[0].fail = True  # 503 from the state endpoint
    eventually(lambda: rest_destination(picker, "/v2/models/m0/infer") == names[1], timeout=5, what="m0 re-placed")
    stand_ins[0].fail = False  # back: its copy wins again
    eventually(lambda: rest_destination(picker, "/v2/models/m0/infer") == names[0], timeout=5, what="m0 back on its copy")


def test_a_draining_agent_gets_no_new_request(stand_in_fleet):
    picker, docs, _, names = stand_in_fleet
    docs[0]["draining"] = True
    eventually(lambda: rest_destination(picker, "/v2/models/m0/infer") == names[1], timeout=5, what="drain seen")
    assert {rest_destination(picker, f"/v2/models/{m}/infer") for m in MODELS for _ in range(3)} == {names[1]}


def test_the_gateways_subset_hint_limits_the_choice(stand_in_fleet):
    picker, _, _, names = stand_in_fleet
    hint = {"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": [names[1]]}}
    assert rest_destination(picker, "/v2/models/m0/infer", metadata=hint) == names[1]
    hint = {"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": "10.9.9.9:80"}}
    (answer,) = picker.exchange(headers("/v2/models/m0/infer", metadata=hint))
    assert answer.immediate_response.status.code == 503


def test_a_hot_model_gets_a_second_copy(stand_in_fleet):
    picker, _, _, names = stand_in_fleet
    seen = [rest_destination(picker, "/v2/models/m0/infer") for _ in range(400)]  # far above 20/s
    assert seen[0] == names[0]
    assert set(seen) == {names[0], names[1]}
    assert "copy added" in eventually(lambda: "copy added" in picker.log_path.read_text() and picker.log_path.read_text(),
                                      timeout=5, what="log line")


def test_a_restarted_picker_routes_as_before(stand_in_fleet, tmp_path):
    picker, docs, stand_ins, names = stand_in_fleet
    docs[1]["models"]["m2"]["state"] = "loaded"
    time.sleep(0.3)
    before = {m: rest_destination(picker, f"/v2/models/{m}/infer") for m in ("m0", "m2")}
    assert before == {"m0": names[0], "m2": names[1]}
    again = Picker(tmp_path / "picker2.log", [(n, s.url) for n, s in zip(names, stand_ins)]).wait_ready()
    try:
        assert {m: rest_destination(again, f"/v2/models/{m}/infer") for m in ("m0", "m2")} == before
        assert again.health("liveness") == health_pb2.HealthCheckResponse.SERVING
        assert again.health("envoy.service.ext_proc.v3.ExternalProcessor") == health_pb2.HealthCheckResponse.SERVING
    finally:
        again.stop()


def test_long_poll_sees_a_change_within_moments_not_a_poll_interval(tmp_path):
    """The held long poll answers the change: the picker sees it well within this test's 10 s
    wait, where the next plain poll (--poll-interval 30) or the end of the held read
    (--long-poll 30) would come three times later: no wall-clock bound of its own."""
    docs = [doc(20000, loaded=("m0",)), doc(20010)]
    stand_ins = [StateStandIn(lambda d=d: d, long_poll=True) for d in docs]
    names = ["127.0.0.1:20000", "127.0.0.1:20010"]
    picker = Picker(tmp_path / "picker.log", [(n, s.url) for n, s in zip(names, stand_ins)],
                    "--poll-interval", "30", "--long-poll", "30").wait_ready()
    try:
        assert rest_destination(picker, "/v2/models/m0/infer") == names[0]
        time.sleep(0.3)  # the picker's long polls are waiting now
        docs[0]["draining"] = True
        stand_ins[0].changed()
        eventually(lambda: rest_destination(picker, "/v2/models/m0/infer") == names[1], timeout=10, what="drain seen")
    finally:
        picker.stop()
        for s in stand_ins:
            s.stop()


def test_fallbacks_list_the_next_agent_in_header_and_metadata_alike(tmp_path):
    """--fallbacks 1: `chosen,next` (the protocol's list; Envoy's override-host policy retries down it)."""
    docs = [doc(20000, loaded=("m0",)), doc(20010)]
    stand_ins = [StateStandIn(lambda d=d: d) for d in docs]
    names = ["127.0.0.1:20000", "127.0.0.1:20010"]
    picker = Picker(tmp_path / "picker.log", [(n, s.url) for n, s in zip(names, stand_ins)], "--fallbacks", "1").wait_ready()
    try:
        assert rest_destination(picker, "/v2/models/m0/infer") == ",".join(names)  # destination() checks the metadata too
        (answer,) = picker.exchange(headers("/inference.GRPCInferenceService/ModelInfer", content_type="application/grpc",
                                            mm_model_id="m0"))
        assert destination(answer) == "127.0.0.1:20001,127.0.0.1:20011"
    finally:
        picker.stop()
        for s in stand_ins:
            s.stop()


def test_agents_are_discovered_from_dns(tmp_path):
    """--agents-dns: every A record of the name is an agent; its management port is shared."""
    state = StateStandIn(lambda: doc(20000, loaded=("m0",)))
    port = state.server.server_address[1]
    picker = Picker(tmp_path / "picker.log", [], "--agents-dns", "localhost:20000", "--agent-management-port", str(port),
                    "--dns-interval", "0.2")
    try:
        picker.wait_ready()
        eventually(lambda: rest_destination(picker, "/v2/models/m0/infer") == "127.0.0.1:20000", what="discovered agent")
    finally:
        picker.stop()
        state.stop()


def test_picker_flags_are_checked():
    out = subprocess.run([sys.executable, "-m", "agent.cli", "picker", "--agent", "10.0.0.1:8000"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "--agent wants HOST:HTTP_PORT=http://HOST:MANAGEMENT_PORT" in out.stderr
    out = subprocess.run([sys.executable, "-m", "agent.cli", "picker"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "give the agents" in out.stderr


def test_ipv6_agents_are_named_as_the_destination_header_wants():
    from agent.picker.agents import parse_agent, report_from_state

    address = parse_agent("[fd00::5]:8000=http://[fd00::5]:8003")
    report = report_from_state(address, doc(8000))
    assert (report.endpoint, report.grpc_endpoint) == ("[fd00::5]:8000", "[fd00::5]:8001")
