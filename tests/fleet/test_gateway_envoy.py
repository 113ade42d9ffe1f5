"""The gateway harness on its own: a real Envoy (tests/support/envoy.py) with a small stand-in
Endpoint Picker (a fixed model -> endpoint table, speaking real ext_proc over gRPC) in front of
small real HTTP/1.1 and gRPC backends that say who they are.

What this pins, independent of modelshelf's picker: a header-less REST request and a gRPC call
reach the endpoint the picker named (ORIGINAL_DST on `x-gateway-destination-endpoint`); the
picker sees the model name (REST: path; gRPC: the body, so the body must be sent); a client
cannot choose its destination by sending the header itself; the picker down gives 503 under
FailClose and the pool under FailOpen; an endpoint that is dead when picked fails the request
with ORIGINAL_DST and is retried elsewhere with the override-host policy. Every test runs with
both ways of routing to the picked endpoint (`lb`).
"""
from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from tritonclient.grpc import service_pb2

from agent.picker import messages as pb
from tests.support.agentproc import request
from tests.support.envoy import DEST_HEADER, LB_MODES, LB_NAMESPACE, Envoy
from tests.support.net import free_port
from tests.support.whoami import WhoAmI

INFER = "/inference.GRPCInferenceService/ModelInfer"


class StandInPicker:
    """Fixed table model -> (http endpoint, grpc endpoint), speaking ext_proc over real gRPC (the
    message classes are the picker's, the decisions are this table's); records every model it saw."""

    def __init__(self, table: dict[str, tuple[str, str]]):
        self.table = table
        self.seen: list[tuple[str, str]] = []  # (kind, model)
        self.port = free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        service, method = pb.PROCESS_METHOD.rsplit("/", 1)
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service.lstrip("/"), {
            method: grpc.stream_stream_rpc_method_handler(self.process, request_deserializer=pb.ProcessingRequest.FromString,
                                                          response_serializer=lambda m: m.SerializeToString())})])
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")

    def start(self) -> "StandInPicker":
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(0).wait()

    @staticmethod
    def _answer(endpoint: str, phase: str):
        header = pb.HeaderValueOption(header=pb.HeaderValue(key=DEST_HEADER, raw_value=endpoint.encode()),
                                      append_action=pb.OVERWRITE_IF_EXISTS_OR_ADD)
        common = pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=[header]), clear_route_cache=True)
        meta = pb.Struct()
        meta.update({LB_NAMESPACE: {DEST_HEADER: endpoint}})
        if phase == "headers":
            return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common), dynamic_metadata=meta)
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common), dynamic_metadata=meta)

    def process(self, requests, context):
        for req in requests:
            which = req.WhichOneof("request")
            if which == "request_headers":
                hdrs = {h.key: (h.raw_value or h.value.encode()).decode() for h in req.request_headers.headers.headers}
                path = hdrs.get(":path", "")
                if path.startswith("/inference."):
                    yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())  # the model is in the body
                    continue
                model = path.split("/")[3] if path.startswith("/v2/models/") else ""
                self.seen.append(("rest", model))
                yield self._answer(self.table[model][0], "headers")
            elif which == "request_body":
                body = req.request_body.body
                model = service_pb2.ModelInferRequest.FromString(body[5:]).model_name  # 5-byte gRPC frame prefix
                self.seen.append(("grpc", model))
                yield self._answer(self.table[model][1], "body")


@pytest.fixture(scope="module")
def backends():
    bs = [WhoAmI("a"), WhoAmI("b")]
    yield bs
    for b in bs:
        b.stop()


DEAD = f"127.0.0.1:{free_port()}"  # an agent that was killed: nothing listens there


@pytest.fixture(scope="module")
def picker(backends):
    a, b = backends
    p = StandInPicker({"m1": (a.http_addr, a.grpc_addr), "m2": (b.http_addr, b.grpc_addr), "gone": (DEAD, DEAD)}).start()
    yield p
    p.stop()


@pytest.fixture(scope="module", params=LB_MODES)
def envoy(request, picker, backends, tmp_path_factory):
    a, b = backends
    with Envoy(f"127.0.0.1:{picker.port}", workdir=tmp_path_factory.mktemp("envoy"), lb=request.param,
               pool_http=[a.http_addr, b.http_addr, DEAD], pool_grpc=[a.grpc_addr, b.grpc_addr, DEAD]) as e:
        e.lb = request.param
        yield e


def grpc_infer(target: str, model: str) -> service_pb2.ModelInferResponse:
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(INFER, request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=service_pb2.ModelInferResponse.FromString)
        return call(service_pb2.ModelInferRequest(model_name=model), timeout=10)


def test_rest_request_reaches_the_picked_endpoint(envoy, picker):
    for model, who in (("m1", "a"), ("m2", "b"), ("m1", "a")):
        status, body = request("POST", f"{envoy.url}/v2/models/{model}/infer", {"inputs": []})
        assert status == 200, body
        assert body["who"] == who and body["path"] == f"/v2/models/{model}/infer"
    assert ("rest", "m2") in picker.seen


def test_grpc_call_reaches_the_picked_endpoint_by_the_model_in_its_body(envoy, picker):
    for model, who in (("m2", "b"), ("m1", "a")):
        r = grpc_infer(envoy.grpc_target, model)
        assert (r.model_name, r.model_version) == (model, who)
    assert ("grpc", "m2") in picker.seen and ("grpc", "m1") in picker.seen


def test_a_client_cannot_pick_its_own_destination(envoy, backends):
    """A client's x-gateway-destination-endpoint does not win over the picker's: m1 still goes to
    a (the picker overwrites it; the gateway also strips it first: see the FailOpen test)."""
    _, b = backends
    status, body = request("POST", f"{envoy.url}/v2/models/m1/infer", {"inputs": []}, headers={DEST_HEADER: b.http_addr})
    assert status == 200 and body["who"] == "a"


def test_a_request_picked_for_a_dead_agent(envoy):
    """The picker has not noticed yet that an agent died and names it. With the override-host
    policy the connect failure is retried on another agent and answered; ORIGINAL_DST takes one
    address and retries the same one: the client gets 503 (why the benchmark compares both)."""
    status, body = request("POST", f"{envoy.url}/v2/models/gone/infer", {"inputs": []})
    if envoy.lb == "override_host":
        assert status == 200 and body["who"] in ("a", "b"), body
        # and many at once (an agent dies under traffic): every retry is allowed, none overflows
        with futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: request("POST", f"{envoy.url}/v2/models/gone/infer", {"inputs": []}), range(64)))
        assert [st for st, _ in answers] == [200] * 64, [b for st, b in answers if st != 200][:3]
        assert envoy.stats("cluster.picked_http.upstream_rq_retry_success").get("cluster.picked_http.upstream_rq_retry_success", 0) >= 1
        r = grpc_infer(envoy.grpc_target, "gone")
        assert r.model_version in ("a", "b")
    else:
        assert status == 503, body


def test_picker_down_fail_close_answers_503(picker, tmp_path):
    dead = free_port()
    with Envoy(f"127.0.0.1:{dead}", workdir=tmp_path) as e:
        status, body = request("POST", f"{e.url}/v2/models/m1/infer", {"inputs": []})
        assert status == 503, body


@pytest.mark.parametrize("lb", LB_MODES)
def test_picker_down_fail_open_routes_to_the_pool(backends, tmp_path, lb):
    a, b = backends
    dead = free_port()
    with Envoy(f"127.0.0.1:{dead}", workdir=tmp_path, fail_open=True, lb=lb, pool_http=[a.http_addr, b.http_addr],
               pool_grpc=[a.grpc_addr, b.grpc_addr]) as e:
        whos = {request("POST", f"{e.url}/v2/models/m1/infer", {"inputs": []})[1]["who"] for _ in range(4)}
        assert whos == {"a", "b"}  # round robin over the pool: no affinity, but answered
        assert grpc_infer(e.grpc_target, "m1").model_version in ("a", "b")
        # with no picker to overwrite it, a client's own destination header must not steer the
        # gateway anywhere (ORIGINAL_DST would connect to any ip:port it names)
        outsider = WhoAmI("outsider")
        try:
            for _ in range(4):
                status, body = request("POST", f"{e.url}/v2/models/m1/infer", {"inputs": []},
                                       headers={DEST_HEADER: outsider.http_addr})
                assert status == 200 and body["who"] in ("a", "b"), body
        finally:
            outsider.stop()
