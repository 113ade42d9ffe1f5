"""The Endpoint Picker Protocol (Gateway API Inference Extension, docs/proposals/004) over
Envoy's ext_proc: read the model name of each request, answer where it goes.

One ext_proc stream is one HTTP request. The picker answers:

- request headers of a REST call (`/v2/models/NAME[/versions/V]/...`, `/v1/models/NAME[:verb]`):
  the destination at once, as the header `x-gateway-destination-endpoint: ip:port` (set with
  OVERWRITE, so a client cannot choose its own agent) and the same value as dynamic metadata
  `envoy.lb` / `x-gateway-destination-endpoint` (the protocol says both, never two values), with
  `clear_route_cache` so the route is chosen again with the header;
- request headers of a gRPC model call (`/inference.GRPCInferenceService/ModelInfer`, ModelReady,
  ModelMetadata, ModelConfig, ModelStatistics): the name is in the message, so
  CONTINUE with a mode override asking for the BUFFERED request body (ignored by an Envoy that
  does not allow overrides and already sends the body), then the destination (the agent's gRPC
  port) in answer to the body. BUFFERED_PARTIAL works too: the name is field 1, at the front of
  the message. ModelMesh's `mm-vmodel-id` / `mm-model-id` metadata names the model without the
  body. A stream (ModelStreamInfer) is never asked for its body (a buffered stream would wait
  for its end): it goes by that metadata, else to any eligible agent (right answers, no
  affinity);
- calls that name no model (server metadata, health, `/v2`, ServerLive...): any eligible agent;
- no eligible agent: the immediate response the protocol defines, 503, with a JSON body
  `{"error": ...}` (the agents' error shape) and, for gRPC, grpc-status UNAVAILABLE;
- the gateway's subset hint (filter metadata `envoy.lb.subset_hint` /
  `x-gateway-destination-endpoint-subset`, a list or a comma-separated string) limits the choice;
  none of them eligible: 503.

Every other message (response headers/body, trailers) is answered with an empty CONTINUE, except
in observability mode, where Envoy expects no answer.
"""
from __future__ import annotations

import itertools
import json
import time
from typing import AsyncIterator, Callable
from urllib.parse import unquote

import grpc

from agent.grpc_wire import WireError, _varint
from agent.logging import get_logger, kv
from agent.picker import messages as pb
from agent.picker.placement import AgentReport, Placement

log = get_logger("modelshelf.picker.extproc")

DESTINATION = "x-gateway-destination-endpoint"
NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE, SUBSET_KEY = "envoy.lb.subset_hint", "x-gateway-destination-endpoint-subset"
GRPC_SERVICE = "/inference.GRPCInferenceService/"
GRPC_MODEL_METHODS = frozenset({"ModelReady", "ModelMetadata", "ModelInfer", "ModelConfig", "ModelStatistics"})
GRPC_UNAVAILABLE = 14


def model_from_path(path: str) -> str | None:
    """The model a REST path names (None: the path names none)."""
    path = path.split("?", 1)[0]
    parts = path.split("/")
    if len(parts) >= 4 and parts[1] in ("v2", "v1") and parts[2] == "models" and parts[3]:
        name = unquote(parts[3])
        return name.split(":", 1)[0] if parts[1] == "v1" else name
    return None


def model_from_grpc_body(body: bytes) -> str | None:
    """String field 1 of the first gRPC message in `body` (a length-prefixed frame), read from the
    bytes at hand: a partial body (BUFFERED_PARTIAL) is enough when the name comes first, as
    protobuf encoders write it. None: a compressed frame, or no name in the bytes."""
    if len(body) < 5 or body[0] != 0:
        return None
    msg = body[5:5 + int.from_bytes(body[1:5], "big")]
    i, name = 0, None
    try:
        while i < len(msg):
            key, i = _varint(msg, i)
            field, wire = key >> 3, key & 7
            if wire == 2:
                size, i = _varint(msg, i)
                if field == 1:
                    if i + size > len(msg):
                        return name
                    name = msg[i:i + size].decode()  # a later field 1 wins, as protobuf parsers do
                i += size
            elif wire == 0:
                _, i = _varint(msg, i)
            elif wire in (1, 5):
                i += 8 if wire == 1 else 4
            else:
                return name
    except (WireError, UnicodeDecodeError):
        return name
    return name


def _headers(http_headers) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in http_headers.headers.headers:
        out[h.key.lower()] = h.raw_value.decode("latin-1") if h.raw_value else h.value
    return out


def _subset(request) -> set[str] | None:
    fm = request.metadata_context.filter_metadata
    if SUBSET_NAMESPACE not in fm or SUBSET_KEY not in fm[SUBSET_NAMESPACE].fields:
        return None
    value = fm[SUBSET_NAMESPACE].fields[SUBSET_KEY]
    items = [v.string_value for v in value.list_value.values] if value.HasField("list_value") else [value.string_value]
    return {part.strip() for item in items for part in item.split(",") if part.strip()}


def _destination(endpoints: str, *, body: bool) -> "pb.ProcessingResponse":
    mutation = pb.HeaderMutation(set_headers=[pb.HeaderValueOption(
        header=pb.HeaderValue(key=DESTINATION, raw_value=endpoints.encode()),
        append_action=pb.OVERWRITE_IF_EXISTS_OR_ADD)])
    common = pb.CommonResponse(header_mutation=mutation, clear_route_cache=True)
    response = pb.ProcessingResponse(request_body=pb.BodyResponse(response=common)) if body else \
        pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
    response.dynamic_metadata.fields[NAMESPACE].struct_value.fields[DESTINATION].string_value = endpoints
    return response


def unavailable(reason: str, *, grpc_call: bool) -> "pb.ProcessingResponse":
    """The protocol's answer when no endpoint can take the request: an immediate 503."""
    immediate = pb.ImmediateResponse(body=json.dumps({"error": reason}).encode(), details="modelshelf_picker_no_endpoint")
    immediate.status.code = 503
    immediate.headers.set_headers.append(pb.HeaderValueOption(
        header=pb.HeaderValue(key="content-type", raw_value=b"application/json"),
        append_action=pb.OVERWRITE_IF_EXISTS_OR_ADD))
    if grpc_call:
        immediate.grpc_status.status = GRPC_UNAVAILABLE
    return pb.ProcessingResponse(immediate_response=immediate)


class EndpointPicker:
    """The ext_proc servicer. `placement` is read and updated on the event loop that runs it."""

    def __init__(self, placement: Placement, *, fallbacks: int = 0, clock: Callable[[], float] = time.monotonic):
        self.placement, self.fallbacks, self.clock = placement, fallbacks, clock
        self._any = itertools.count()
        self.decisions = 0
        self._warned_at, self._unwarned = -1e9, 0  # "no endpoint": one log line per second at most

    def handler(self) -> grpc.GenericRpcHandler:
        service, method = pb.PROCESS_METHOD.strip("/").split("/")
        return grpc.method_handlers_generic_handler(service, {method: grpc.stream_stream_rpc_method_handler(
            self.process, request_deserializer=pb.ProcessingRequest.FromString,
            response_serializer=lambda m: m.SerializeToString())})

    async def process(self, requests: AsyncIterator, context) -> AsyncIterator:
        grpc_call, waiting_for_body, subset = False, False, None
        async for request in requests:
            kind = request.WhichOneof("request")
            silent = request.observability_mode
            if kind == "request_headers":
                headers = _headers(request.request_headers)
                path = headers.get(":path", "")
                subset = _subset(request)
                grpc_call = path.startswith(GRPC_SERVICE) or headers.get("content-type", "").startswith("application/grpc")
                model: str | None
                if grpc_call:
                    method = path[len(GRPC_SERVICE):] if path.startswith(GRPC_SERVICE) else ""
                    model = headers.get("mm-vmodel-id") or headers.get("mm-model-id") or None
                    if model is None and method in GRPC_MODEL_METHODS and not request.request_headers.end_of_stream:
                        waiting_for_body = True
                        if not silent:
                            response = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
                            response.mode_override.request_body_mode = pb.BODY_BUFFERED
                            yield response
                        continue
                else:
                    model = model_from_path(path)
                answer = self.answer(model, grpc_call=grpc_call, subset=subset, body=False)
            elif kind == "request_body" and waiting_for_body:
                waiting_for_body = False
                model = model_from_grpc_body(request.request_body.body)
                answer = self.answer(model, grpc_call=True, subset=subset, body=True)
            elif kind in ("request_body", "response_body"):
                answer = pb.ProcessingResponse(**{kind: pb.BodyResponse()})
            elif kind == "response_headers":
                answer = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
            elif kind in ("request_trailers", "response_trailers"):
                answer = pb.ProcessingResponse(**{kind: pb.TrailersResponse()})
            else:
                continue
            if not silent:
                yield answer

    def answer(self, model: str | None, *, grpc_call: bool, subset: set[str] | None, body: bool) -> "pb.ProcessingResponse":
        """Where one request goes, as the ext_proc response to its headers (or gRPC body)."""
        self.decisions += 1
        p = self.placement
        if model:
            choice = p.choose(model, self.clock(), subset)
            agent, reason = (choice.agent, choice.reason) if choice else (None, "")
        else:
            agent, reason = p.any_agent(next(self._any), subset), "any"
        if agent is None:
            why = "no agent is ready" if subset is None else "no agent in the gateway's endpoint subset is ready"
            now = self.clock()
            if now - self._warned_at >= 1.0:
                log.warning("no endpoint: answered 503", extra=kv(model=model or "", reason=why, more_since_last=self._unwarned))
                self._warned_at, self._unwarned = now, 0
            else:
                self._unwarned += 1
            return unavailable(f"{why} (modelshelf picker)", grpc_call=grpc_call)
        chosen = [agent] + (p.fallbacks(model or "", agent.name, self.fallbacks) if self.fallbacks else [])
        endpoints = [_endpoint(a, grpc_call) for a in chosen]
        if not endpoints[0]:
            return unavailable(f"agent {agent.name} serves no gRPC data plane", grpc_call=grpc_call)
        value = ",".join(e for e in endpoints if e)
        log.debug("picked", extra=kv(model=model or "", endpoint=value, reason=reason))
        return _destination(value, body=body)


def _endpoint(agent: AgentReport, grpc_call: bool) -> str:
    return agent.grpc_endpoint if grpc_call else agent.endpoint
