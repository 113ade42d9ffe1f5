"""The data plane: KServe V2 (and V1, translated) requests routed to their model.

A raw ASGI app, because this is the hot path: one dict lookup per request, the V2 body is
passed through as bytes (never parsed), the binary tensor extension header
(`Inference-Header-Content-Length`) passes through untouched, and nothing is logged per
request at info level.

Every model request holds an in-flight lease (Reconciler.acquire/release) until its response
is sent, so eviction never unloads a model under a request; a request for a model that is not
loaded waits for one (single-flight) load. Forwarding goes through agent.upstream (keep-alive
HTTP/1.1 with httptools), the cheapest client we measured (benchmarks/results/proxy.md).

V1 -> V2 mapping (for servers that speak only V2):
  GET  /v1/models/{m}           -> {"name": m, "ready": <the model can serve now>}
  POST /v1/models/{m}:predict   {"instances": [row, ...]}
        -> V2 infer with one input "input-0", shape [len(instances), *row shape],
           datatype BOOL/INT64/FP64/BYTES from the values, data flattened row-major
        <- {"predictions": [...]} from the output named "predict" (MLServer's sklearn/xgboost
           runtimes) or else the first output, reshaped to its V2 shape.
"""
from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Awaitable, Callable

from agent.logging import get_logger
from agent.metrics import Metrics
from agent.reconciler import ModelUnavailable, Reconciler, State, UnknownModel
from agent.upstream import Upstream, UpstreamError

log = get_logger("modelshelf.router")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# /v2/models/{name}[/versions/{v}][/(infer|ready)]
_V2_MODEL = re.compile(r"^/v2/models/([^/]+)(/versions/[^/]+)?(/infer|/ready)?/?$")
_V1_MODEL = re.compile(r"^/v1/models/([^/:]+)(:predict)?$")
# response headers worth passing back to the client
_PASS_RESPONSE = (b"content-type", b"inference-header-content-length")
_PASS_REQUEST = (b"content-type", b"inference-header-content-length", b"accept", b"x-request-id", b"traceparent")


class _TooLarge(Exception):
    pass


class Router:
    def __init__(self, reconciler: Reconciler, server_url: Callable[[], str], metrics: Metrics,
                 *, max_body_bytes: int, request_timeout_s: float, server_ready: Callable[[], bool]):
        self.reconciler = reconciler
        self._server_url = server_url
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self._server_ready = server_ready
        self._upstream: Upstream | None = None

    async def start(self) -> None:
        self._upstream = Upstream(self._server_url())

    async def close(self) -> None:
        if self._upstream is not None:
            await self._upstream.close()

    # ------------------------------------------------------------------ ASGI entry
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path.startswith("/v1/"):
            await self._v1(scope, receive, send, path, method)
            return
        m = _V2_MODEL.match(path)
        if m is not None:
            name, action = m.group(1), m.group(3)  # a version stays in the forwarded path
            if action == "/ready":
                await self._ready(send, name)
            elif action == "/infer" and method == "POST":
                await self._model_call(scope, receive, send, name, "POST", path, v1=False)
            elif action is None and method == "GET":
                await self._model_call(scope, receive, send, name, "GET", path, v1=False)
            else:
                await send_error(send, 405, f"{method} {path} is not supported")
            return
        if path in ("/v2/health/live",):
            await _json(send, 200, {"live": True})
        elif path == "/v2/health/ready":
            ok = self.reconciler.applied_once.is_set() and self._server_ready()
            await _json(send, 200 if ok else 503, {"ready": ok})
        elif path in ("/v2", "/v2/") and method == "GET":
            await self._forward_plain(send, "GET", "/v2")
        elif path.startswith("/v2/repository"):
            await send_error(send, 403, "the model repository is managed by the modelshelf agent: edit the model config instead")
        else:
            await send_error(send, 404, f"no route for {method} {path}")

    # ------------------------------------------------------------------ V2
    async def _ready(self, send: Send, name: str) -> None:
        model = self.reconciler.models.get(name)
        if model is None or model.removed:
            await send_error(send, 404, f"model {name!r} is not configured")
            return
        ok = _can_serve(model)
        # KServe V2: 200 when ready, 400 otherwise; the body says which
        await _json(send, 200 if ok else 400, {"name": name, "ready": ok, "state": model.state.value})

    async def _model_call(self, scope: Scope, receive: Receive, send: Send, name: str, method: str,
                          path: str, *, v1: bool, body: bytes | None = None) -> tuple[int, bytes] | None:
        """Lease, lazy-load, forward. With `v1`, return (status, body) instead of sending."""
        if body is None and method == "POST":
            try:
                body = await self._read_body(scope, receive)
            except _TooLarge:
                self.metrics.requests.labels(model=name, code="413").inc()
                await send_error(send, 413, f"request body exceeds {self.max_body_bytes} bytes")
                return None
        try:
            model = await self.reconciler.acquire(name)
        except UnknownModel:
            self.metrics.requests.labels(model="", code="404").inc()
            await send_error(send, 404, f"model {name!r} is not configured")
            return None
        except ModelUnavailable as e:
            self.metrics.requests.labels(model=name, code="503").inc()
            await send_error(send, 503, str(e), retry_after=e.retry_after)
            return None
        try:
            return await self._forward(scope, send, model.name, method, path, body, v1=v1)
        finally:
            self.reconciler.release(model)

    async def _forward(self, scope: Scope, send: Send, name: str, method: str, path: str,
                       body: bytes | None, *, v1: bool) -> tuple[int, bytes] | None:
        headers = [(k, v) for k, v in scope["headers"] if k in _PASS_REQUEST]
        if scope.get("query_string"):
            path = path + "?" + scope["query_string"].decode("latin-1")
        try:
            status, payload, out_headers = await self._send(method, path, body, headers)
        except (UpstreamError, asyncio.TimeoutError) as e:
            self.metrics.requests.labels(model=name, code="503").inc()
            reason = "timed out" if isinstance(e, asyncio.TimeoutError) else "server unreachable"
            await send_error(send, 503, f"model {name!r}: {reason}", retry_after=1)
            return None
        self.metrics.requests.labels(model=name, code=str(status)).inc()
        if v1:
            return status, payload
        out_headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        await send({"type": "http.response.body", "body": payload})
        return None

    async def _send(self, method: str, path: str, body: bytes | None,
                    headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        upstream = self._upstream
        if upstream is None or upstream.base_url != self._server_url():
            upstream = self._upstream = Upstream(self._server_url())
        status, resp_headers, payload = await upstream.request(method, path, headers, body or b"", self.request_timeout_s)
        return status, payload, [(k, v) for k, v in resp_headers if k in _PASS_RESPONSE]

    async def _forward_plain(self, send: Send, method: str, path: str) -> None:
        try:
            status, payload, headers = await self._send(method, path, None, [])
        except (UpstreamError, asyncio.TimeoutError):
            await send_error(send, 503, "server unreachable", retry_after=1)
            return
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        for k, v in scope["headers"]:
            if k == b"content-length" and int(v) > self.max_body_bytes:
                raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    # ------------------------------------------------------------------ V1
    async def _v1(self, scope: Scope, receive: Receive, send: Send, path: str, method: str) -> None:
        m = _V1_MODEL.match(path)
        if m is None:
            await send_error(send, 404, f"no route for {method} {path}")
            return
        name, predict = m.group(1), m.group(2)
        if not predict:
            model = self.reconciler.models.get(name)
            if model is None or model.removed:
                await send_error(send, 404, f"model {name!r} is not configured")
            else:
                await _json(send, 200, {"name": name, "ready": _can_serve(model)})
            return
        if method != "POST":
            await send_error(send, 405, "use POST for :predict")
            return
        try:
            raw = await self._read_body(scope, receive)
        except _TooLarge:
            await send_error(send, 413, f"request body exceeds {self.max_body_bytes} bytes")
            return
        try:
            v2_body = json.dumps(v1_to_v2(json.loads(raw or b"{}"))).encode()
        except (ValueError, TypeError) as e:
            await send_error(send, 400, f"bad V1 request: {e}")
            return
        v2_scope = dict(scope, headers=[(b"content-type", b"application/json")])
        result = await self._model_call(v2_scope, receive, send, name, "POST", f"/v2/models/{name}/infer", v1=True, body=v2_body)
        if result is None:
            return
        status, payload = result
        if status != 200:
            try:
                message = json.loads(payload).get("error", payload.decode(errors="replace"))
            except ValueError:
                message = payload.decode(errors="replace")
            await send_error(send, status, message)
            return
        try:
            await _json(send, 200, v2_to_v1(json.loads(payload)))
        except (ValueError, KeyError, TypeError) as e:
            await send_error(send, 502, f"could not translate the server's V2 response: {e}")


def _can_serve(model: Any) -> bool:
    """Ready in the data-plane sense: an infer now succeeds (possibly after a lazy load)."""
    if model.state is State.LOADED:
        return True
    return model.state in (State.CACHED, State.REGISTERED) and not model.wants_loaded() and not model.permanent


# ---------------------------------------------------------------------- V1 <-> V2
def _datatype(values: list[Any]) -> str:
    if all(isinstance(v, bool) for v in values):
        return "BOOL"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "INT64"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "FP64"
    if all(isinstance(v, str) for v in values):
        return "BYTES"
    raise ValueError("instances must hold numbers, booleans or strings of one kind")


def _shape_and_flat(value: Any) -> tuple[list[int], list[Any]]:
    if not isinstance(value, list):
        return [], [value]
    if not value:
        return [0], []
    shapes_flats = [_shape_and_flat(v) for v in value]
    inner = shapes_flats[0][0]
    if any(s != inner for s, _ in shapes_flats):
        raise ValueError("instances are ragged: every row must have the same shape")
    flat: list[Any] = []
    for _, f in shapes_flats:
        flat.extend(f)
    return [len(value), *inner], flat


def v1_to_v2(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict) or "instances" not in doc:
        raise ValueError('expected {"instances": [...]}')
    instances = doc["instances"]
    if not isinstance(instances, list) or not instances:
        raise ValueError('"instances" must be a non-empty list')
    shape, flat = _shape_and_flat(instances)
    if len(shape) == 1:  # a list of scalars: one feature per instance
        shape = [shape[0], 1]
    return {"inputs": [{"name": "input-0", "shape": shape, "datatype": _datatype(flat), "data": flat}]}


def _reshape(flat: list[Any], shape: list[int]) -> Any:
    if len(shape) <= 1:
        return list(flat)
    step = len(flat) // shape[0] if shape[0] else 0
    return [_reshape(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def v2_to_v1(doc: dict[str, Any]) -> dict[str, Any]:
    outputs = doc["outputs"]
    chosen = next((o for o in outputs if o.get("name") == "predict"), outputs[0])
    data = chosen["data"]
    shape = chosen.get("shape") or [len(data)]
    predictions = _reshape(data, shape)
    if len(shape) == 2 and shape[1] == 1:
        predictions = [row[0] for row in predictions]
    return {"predictions": predictions}


# ---------------------------------------------------------------------- responses
async def _json(send: Send, status: int, doc: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(doc).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if extra:
        headers += extra
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, status: int, message: str, *, retry_after: float | None = None) -> None:
    """An error in the shape both protocols use, {"error": "<message>"} (V2 and KServe V1)."""
    extra = [(b"retry-after", str(max(1, int(round(retry_after)))).encode())] if retry_after is not None else None
    await _json(send, status, {"error": message}, extra)
