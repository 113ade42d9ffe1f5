"""The KServe V2 gRPC data plane: `inference.GRPCInferenceService` on the agent's gRPC port,
passed through to the co-located server's gRPC port with the REST router's semantics.

grpc.aio with generic handlers and no (de)serializers: request and response messages stay
bytes end to end; only a model call's name and version are read (agent.grpc_wire), never its
tensors. One channel to the server (HTTP/2, multiplexed) carries every call.

RPC -> what the agent does (the same rules as agent/router.py):
  ServerLive                      answered by the agent: live
  ServerReady                     answered by the agent: config applied and server ready
  ServerMetadata                  forwarded (the server's name, version, extensions)
  ModelReady                      answered by the agent: the model can serve now, possibly
                                  after a lazy load (REST GET /v2/models/{m}/ready); NOT_FOUND
                                  for a model that is not configured
  ModelMetadata, ModelInfer,      lease the model (Reconciler.acquire: lazy single-flight load;
  ModelConfig, ModelStatistics    eviction never unloads under a call), forward, release after
                                  the answer; ModelConfig/ModelStatistics exist on Triton only
                                  (MLServer answers UNIMPLEMENTED, passed through)
                                  ModelStatistics with no name: every model's, no lease
  ModelStreamInfer                one lease per model named in the stream, held until the
                                  stream ends; messages forwarded in order as they come
  RepositoryIndex/ModelLoad/      PERMISSION_DENIED, with the REST router's 403 message
  ModelUnload
  anything else                   UNIMPLEMENTED (e.g. shared-memory, trace and log settings)

Errors, as gRPC status codes with the reason in the details:
  NOT_FOUND           the model is not configured
  UNAVAILABLE         the agent is starting, the model is loading past the wait or cannot load
                      now, too many calls wait for its load, the server is down or timed out,
                      the server answered NOT_FOUND for it (the reconciler rechecks and reloads);
                      trailing metadata `retry-after: <seconds>` when a retry can help
  RESOURCE_EXHAUSTED  a request message over --max-body-bytes (grpcio's own check)
  INVALID_ARGUMENT    a message that is not protobuf, or a model call with no model name
  other codes         the server's own status and details, passed through as they are

ModelMesh routing metadata: a call with `mm-vmodel-id` (else `mm-model-id`) in its metadata is
for the model that metadata names, whatever the message's name field says; the message is
forwarded with its name set to that model (appended as field 1: the last value wins). Both keys
are not forwarded to the server; other call metadata is.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

import grpc

from agent.grpc_wire import WireError, bool_message, name_and_version, with_name
from agent.logging import get_logger, kv
from agent.metrics import Metrics
from agent.reconciler import Model, ModelUnavailable, Reconciler, UnknownModel
from agent.router import can_serve

log = get_logger("modelshelf.grpc")

SERVICE = "inference.GRPCInferenceService"
REPOSITORY_REFUSED = "the model repository is managed by the modelshelf agent: edit the model config instead"
_ROUTING_KEYS = ("mm-vmodel-id", "mm-model-id")  # first present wins
# call metadata that describes the client's own connection; never forwarded
_HOP_KEYS = frozenset((*_ROUTING_KEYS, "user-agent", "content-type", "te", "grpc-accept-encoding", "grpc-encoding",
                       "grpc-timeout", "accept-encoding", ":authority"))
_MODEL_UNARY = ("ModelMetadata", "ModelInfer", "ModelConfig", "ModelStatistics")
_REPOSITORY = ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")
_UNLIMITED = -1


class _Refused(Exception):
    """A call the agent answers itself with an error status."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after: float | None = None):
        super().__init__(details)
        self.code, self.details, self.retry_after = code, details, retry_after

    def trailers(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after is None:
            return ()
        return (("retry-after", str(max(1, int(round(self.retry_after))))),)


class GrpcDataPlane:
    """The gRPC data plane of one agent. `reconciler()` is None until the agent has started;
    `target(model)` is the gRPC HOST:PORT of the server holding `model` ("": server-wide
    calls), None when unknown."""

    def __init__(self, reconciler: Callable[[], Reconciler | None], target: Callable[[str], str | None],
                 metrics: Metrics, *, max_message_bytes: int, request_timeout_s: float,
                 server_ready: Callable[[], bool]):
        self._reconciler = reconciler
        self._target = target
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.request_timeout_s = request_timeout_s
        self._server_ready = server_ready
        self._channel: grpc.aio.Channel | None = None
        self._channel_target: str | None = None
        self._methods: dict[str, Any] = {}
        self._shard_channels: dict[str, tuple[grpc.aio.Channel, dict[str, Any]]] = {}  # --server-processes N
        self._closing: set[asyncio.Task] = set()
        self._server: grpc.aio.Server | None = None
        self._counted: dict[tuple[str, str], Any] = {}  # (model, code) -> counter child
        hooks = getattr(metrics, "before_render", None)
        if hooks is not None:
            hooks.append(self._prune_metrics)

    def _count(self, model: str, code: str) -> None:
        child = self._counted.get((model, code))
        if child is None:
            child = self._counted[(model, code)] = self.metrics.grpc_requests.labels(model=model, code=code)
        child.inc()

    def _prune_metrics(self) -> None:
        """At each scrape: drop the call series of models no longer configured."""
        reconciler = self._reconciler()
        if reconciler is None:
            return
        configured = {name for name, m in reconciler.models.items() if not m.removed}
        for model, code in [k for k in self._counted if k[0] and k[0] not in configured]:
            del self._counted[(model, code)]
            self.metrics.grpc_requests.remove(model, code)

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str, port: int) -> int:
        """Listen on host:port; the bound port. RuntimeError naming the address when it is taken."""
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", _UNLIMITED),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a second listener
        ])
        unary = {name: grpc.unary_unary_rpc_method_handler(self._model_unary(name)) for name in _MODEL_UNARY}
        unary.update({name: grpc.unary_unary_rpc_method_handler(self._repository) for name in _REPOSITORY})
        unary.update(
            ServerLive=grpc.unary_unary_rpc_method_handler(self._server_live),
            ServerReady=grpc.unary_unary_rpc_method_handler(self._server_ready_rpc),
            ServerMetadata=grpc.unary_unary_rpc_method_handler(self._server_metadata),
            ModelReady=grpc.unary_unary_rpc_method_handler(self._model_ready),
            ModelStreamInfer=grpc.stream_stream_rpc_method_handler(self._stream_infer),
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, unary),))
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as e:
            raise RuntimeError(f"gRPC data plane: cannot listen on {address} ({e}); choose --grpc-port, or 0 to turn gRPC off") from None
        await server.start()
        self._server = server
        log.info("gRPC data plane listening", extra=kv(listen=f"{host}:{bound}"))
        return bound

    async def stop(self, grace: float = 2.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
        if self._channel is not None:
            await self._channel.close()
        for channel, _ in self._shard_channels.values():
            await channel.close()

    # ------------------------------------------------------------------ the server side
    def _method(self, name: str, kind: str = "unary", model: str = "") -> Any:
        """The server's `name` RPC as a bytes-in/bytes-out callable on one shared channel (per
        server, with --server-processes N: the one holding `model`)."""
        target = self._target(model)
        if target is None:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, "the server's gRPC address is unknown (sidecar: --server-grpc-target)", 5)
        if model and target != self._target(""):  # a model on another server than the first
            channel, methods = self._shard_channels.get(target) or (None, {})
            if channel is None:
                channel = grpc.aio.insecure_channel(target, options=[
                    ("grpc.max_receive_message_length", _UNLIMITED),
                    ("grpc.max_send_message_length", _UNLIMITED),
                ])
                self._shard_channels[target] = (channel, methods)
            method = methods.get(name)
            if method is None:
                path = f"/{SERVICE}/{name}"
                method = methods[name] = channel.stream_stream(path) if kind == "stream" else channel.unary_unary(path)
            return method
        if target != self._channel_target:
            if self._channel is not None:  # calls in flight on the old one finish there
                closing = asyncio.get_running_loop().create_task(self._channel.close(grace=self.request_timeout_s))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
            self._channel = grpc.aio.insecure_channel(target, options=[
                ("grpc.max_receive_message_length", _UNLIMITED),
                ("grpc.max_send_message_length", _UNLIMITED),
            ])
            self._channel_target, self._methods = target, {}
        method = self._methods.get(name)
        if method is None:
            path = f"/{SERVICE}/{name}"
            method = self._channel.stream_stream(path) if kind == "stream" else self._channel.unary_unary(path)
            self._methods[name] = method
        return method

    # ------------------------------------------------------------------ RPCs the agent answers
    async def _server_live(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return bool_message(True)

    async def _server_ready_rpc(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        r = self._reconciler()
        return bool_message(r is not None and r.applied_once.is_set() and self._server_ready())

    async def _repository(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, REPOSITORY_REFUSED)
        return b""  # not reached: abort raises

    async def _model_ready(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            reconciler = self._started()
            request, name = _routed(request, context)
            model = reconciler.models.get(name)
            if model is None or model.removed:
                raise _Refused(grpc.StatusCode.NOT_FOUND, f"model {name!r} is not configured")
        except _Refused as e:
            return await _abort(context, e)
        return bool_message(can_serve(model))

    async def _server_metadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            self._started()
            return await self._forward("ServerMetadata", "", request, context)
        except _Refused as e:
            return await _abort(context, e)

    # ------------------------------------------------------------------ model calls
    def _model_unary(self, method: str) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            name = ""
            try:
                reconciler = self._started()
                request, name = _routed(request, context, required=method != "ModelStatistics")
                if not name:  # Triton: the statistics of every model the server holds, no lease
                    response = await self._forward(method, name, request, context)
                else:
                    model = await self._acquire(reconciler, name)
                    try:
                        response = await self._forward(method, name, request, context, model=model)
                    finally:
                        reconciler.release(model)
            except _Refused as e:
                self._count(name if e.code is not grpc.StatusCode.NOT_FOUND else "", e.code.name)
                return await _abort(context, e)
            self._count(name, "OK")
            return response

        handler.__name__ = method
        return handler

    def _started(self) -> Reconciler:
        r = self._reconciler()
        if r is None or not r.applied_once.is_set():
            raise _Refused(grpc.StatusCode.UNAVAILABLE, "the agent is starting", 1)
        return r

    async def _acquire(self, reconciler: Reconciler, name: str) -> Model:
        try:
            return await reconciler.acquire(name)
        except UnknownModel:
            raise _Refused(grpc.StatusCode.NOT_FOUND, f"model {name!r} is not configured") from None
        except ModelUnavailable as e:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, str(e), e.retry_after) from None

    async def _forward(self, method: str, name: str, request: bytes, context: grpc.aio.ServicerContext,
                       *, model: Model | None = None) -> bytes:
        call = self._method(method, model=name)
        try:
            return await call(request, metadata=_forwarded(context), timeout=self.request_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise self._server_error(e, name, model, request) from None

    def _server_error(self, e: grpc.aio.AioRpcError, name: str, model: Model | None, request: bytes = b"") -> _Refused:
        code = e.code()
        what = f"model {name!r}: " if name else ""
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return _Refused(grpc.StatusCode.UNAVAILABLE, f"{what}timed out after {self.request_timeout_s:g}s", 1)
        if code is grpc.StatusCode.UNAVAILABLE:
            return _Refused(grpc.StatusCode.UNAVAILABLE, f"{what}server unreachable ({e.details()})", 1)
        if code is grpc.StatusCode.NOT_FOUND and model is not None and _version(request) in ("", model.spec.version):
            # the server does not have a model we leased as served (a restart, an unload behind
            # our back): never NOT_FOUND for a configured model; the reconciler rechecks the
            # server and reloads it, the client retries (the REST router's rule)
            reconciler = self._reconciler()
            if reconciler is not None:
                reconciler.report_missing(name)
            return _Refused(grpc.StatusCode.UNAVAILABLE, f"{what}the server does not have it loaded; reloading", 1)
        return _Refused(code, e.details() or code.name)

    async def _stream_infer(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """ModelStreamInfer: forwarded message by message; each model named in the stream is
        leased (and lazily loaded) before its first message goes on, released when it ends."""
        leases: dict[str, Model] = {}
        failed: list[_Refused] = []
        reconciler: Reconciler | None = None
        incoming = requests.__aiter__()
        first: list[bytes] = []
        stream_target: str | None = None

        async def lease(name: str) -> None:
            if name not in leases:
                leases[name] = await self._acquire(reconciler, name)
                # several server processes (--server-processes N): a stream goes to one, the
                # one holding its first model; a model held by another cannot join it
                if stream_target is not None and self._target(name) != stream_target:
                    raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"model {name!r} is served by another server process than this stream's first model "
                                   f"(--server-processes): open one stream per model")

        async def upstream_requests() -> AsyncIterator[bytes]:
            try:
                for raw in first:
                    yield raw
                async for raw in incoming:
                    raw, name = _routed(raw, context)
                    await lease(name)
                    yield raw
            except _Refused as e:
                failed.append(e)
                call.cancel()

        try:
            reconciler = self._started()
            try:  # the first message says which model, hence which server, the stream goes to
                raw, name = _routed(await incoming.__anext__(), context)
            except StopAsyncIteration:
                return
            await lease(name)  # loads it if need be: then it has its server
            first.append(raw)
            stream_target = self._target(name)
            call = self._method("ModelStreamInfer", "stream", model=name)(upstream_requests(), metadata=_forwarded(context))
            try:
                async for response in call:
                    yield response
            except asyncio.CancelledError:
                if not failed:
                    raise
            except grpc.aio.AioRpcError as e:
                first = next(iter(leases), "")
                raise self._server_error(e, first, leases.get(first)) from None
            if failed:
                raise failed[0]
        except _Refused as e:
            await _abort(context, e)
        finally:
            for model in leases.values():
                reconciler.release(model)


def _routed(request: bytes, context: grpc.aio.ServicerContext, *, required: bool = True) -> tuple[bytes, str]:
    """The request to forward and the model it is for: ModelMesh routing metadata when present
    (the message renamed to match), else the message's own name field ("" only when not
    `required`)."""
    try:
        name, _version = name_and_version(request)
    except WireError as e:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a protobuf message: {e}") from None
    routed = _routing_name(context.invocation_metadata() or ())
    if routed and routed != name:
        return with_name(request, routed), routed
    if not name and required:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "the request names no model (field 1 is empty; ModelMesh clients may set mm-vmodel-id)")
    return request, name


def _version(request: bytes) -> str:
    try:
        return name_and_version(request)[1]
    except WireError:
        return ""


def _routing_name(metadata: Any) -> str | None:
    for key in _ROUTING_KEYS:
        for k, v in metadata:
            if k == key and v:
                return v
    return None


def _forwarded(context: grpc.aio.ServicerContext) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in (context.invocation_metadata() or ()) if k not in _HOP_KEYS and not k.startswith(":"))


async def _abort(context: grpc.aio.ServicerContext, e: _Refused) -> bytes:
    await context.abort(e.code, e.details, trailing_metadata=e.trailers())
    return b""  # not reached: abort raises


async def start_grpc(settings: Any, agent: Any) -> GrpcDataPlane | None:
    """The agent's gRPC data plane listening per `settings` (None when --grpc-port is 0)."""
    if not settings.grpc_port:
        return None
    plane = GrpcDataPlane(
        lambda: agent.reconciler, lambda model: server_grpc_target(settings, agent.adapter, model), agent.metrics,
        max_message_bytes=settings.max_body_bytes, request_timeout_s=settings.request_timeout_s,
        server_ready=agent.ready,
    )
    await plane.start(settings.grpc_host or settings.host, settings.grpc_port)
    return plane


def server_grpc_target(settings: Any, adapter: Any, model: str = "") -> str | None:
    """The co-located server's gRPC HOST:PORT: --server-grpc-target, else the port the embedded
    server listens on (--server-processes N: the one holding `model`). A sidecar's is never
    guessed (in a pod its default port may be the agent's own): without the flag, model calls
    answer UNAVAILABLE saying so."""
    if settings.server_grpc_target:
        return settings.server_grpc_target
    if adapter is None:
        return None
    target_for = getattr(adapter, "grpc_target_for", None)
    return target_for(model) if model and target_for is not None else adapter.grpc_target
