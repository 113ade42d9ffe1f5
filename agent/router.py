"""The data plane: KServe V2 (and V1, translated) requests routed to their model.

A raw ASGI app, because this is the hot path: one dict lookup per request, the V2 body is
passed through as bytes (never parsed), the binary tensor extension header
(`Inference-Header-Content-Length`) passes through untouched, and nothing is logged per
request at info level.

Every model request holds an in-flight lease (Reconciler.acquire/release) until its response
is sent, so eviction never unloads a model under a request; a request for a model that is not
loaded waits for one (single-flight) load. Forwarding goes through agent.upstream (keep-alive
HTTP/1.1 with httptools), the cheapest client we measured (benchmarks/results/proxy.md).

V1 -> V2 mapping (for servers that speak only V2; agent.v1):
  GET  /v1/models/{m}           -> {"name": m, "ready": <the model can serve now>}
  POST /v1/models/{m}:predict   {"instances": [row, ...]}
        -> V2 infer with one input "input-0", shape [len(instances), *row shape],
           datatype BOOL/INT64/FP64/BYTES from the values, data flattened row-major
        <- {"predictions": [...]} from the output named "predict" (MLServer's sklearn/xgboost
           runtimes) or else the first output, reshaped to its V2 shape.

Hostile input (the port is the cluster's inference endpoint):
  * The upstream request target is built only from validated parts, never from the client's
    path: the model name must be a configured model (names are [A-Za-z0-9._-]), a version must
    match [A-Za-z0-9._-]{1,64} and the model's configured `version` when it has one; a query
    string is forwarded with every byte outside visible ASCII percent-encoded. Anything else
    is answered 400/404 before a byte is forwarded (agent.upstream refuses CR/LF/non-ASCII in
    a request line or header again, and closes a connection that receives an extra answer).
  * Every error is {"error": "<reason>"}: the server's other error bodies (FastAPI's
    {"detail": ...}, tracebacks, plain text) keep their status and get a short reason, with
    tracebacks cut to their last line and file paths replaced by <path>.
  * V1 bodies have their own limit (--max-v1-body-bytes); translating one above 256 KiB (or an
    answer that large) runs in one worker process (agent.v1; started on first use), so neither
    the event loop nor its GIL is held by it: json.loads of a 4 MiB body holds the GIL for
    hundreds of ms, and a thread would stall the loop that long. Large translations queue for
    that one worker, so they also cost at most one core.
  * Waiting for an upstream slot counts inside --request-timeout; one model holds at most
    --max-upstream-per-model of the pool's --upstream-connections; a request that cannot get a
    slot in time gets 503 + Retry-After.
  * Request metrics carry a model label only for configured models (model="" otherwise), and
    the series of models no longer configured are dropped at the next scrape.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Awaitable, Callable

from agent.logging import get_logger
from agent.metrics import Metrics
from agent.reconciler import ModelUnavailable, Reconciler, State, UnknownModel
from agent.upstream import Upstream, UpstreamBusy, UpstreamError, UnsafeRequest
from agent.v1 import translate_v1_request, translate_v2_response

log = get_logger("modelshelf.router")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# /v2/models/{name}[/versions/{v}][/(infer|ready)]   (matched with fullmatch: no "$\n" slip)
_V2_MODEL = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]*))?(/infer|/ready)?/?")
_V1_MODEL = re.compile(r"/v1/models/([^/:]+)(:predict)?")
_VERSION = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SAFE_QUERY = re.compile(rb"[\x21-\x7e]*")
_UNSAFE_QUERY_BYTE = re.compile(rb"[^\x21-\x7e]")
# response headers worth passing back to the client
_PASS_RESPONSE = (b"content-type", b"inference-header-content-length")
_PASS_REQUEST = (b"content-type", b"inference-header-content-length", b"accept", b"x-request-id", b"traceparent")
V1_WORKER_BYTES = 256 * 1024  # V1 bodies (and answers) above this are translated in the worker process
_ECHO = 80  # characters of a client's input echoed in an error


class _TooLarge(Exception):
    pass


class Router:
    def __init__(self, reconciler: Reconciler, server_url: Callable[[], str], metrics: Metrics,
                 *, max_body_bytes: int, request_timeout_s: float, server_ready: Callable[[], bool],
                 max_v1_body_bytes: int | None = None, upstream_connections: int | None = None,
                 max_upstream_per_model: int | None = None):
        settings = getattr(reconciler, "settings", None)
        self.reconciler = reconciler
        self._server_url = server_url
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.max_v1_body_bytes = max_v1_body_bytes or getattr(settings, "max_v1_body_bytes", 4 * 2**20)
        self.request_timeout_s = request_timeout_s
        self.upstream_connections = upstream_connections or getattr(settings, "upstream_connections", 256)
        per_model = max_upstream_per_model or getattr(settings, "max_upstream_per_model", 0)
        self.max_upstream_per_model = per_model or max(1, self.upstream_connections // 2)
        self._server_ready = server_ready
        self._upstream: Upstream | None = None
        self._counters: dict[tuple[str, str], Any] = {}  # (model, code) -> counter child
        self._v1_worker: ProcessPoolExecutor | None = None
        hooks = getattr(metrics, "before_render", None)
        if hooks is not None:
            hooks.append(self.prune_metrics)

    def _new_upstream(self) -> Upstream:
        return Upstream(self._server_url(), max_connections=self.upstream_connections,
                        max_per_key=self.max_upstream_per_model)

    async def start(self) -> None:
        self._upstream = self._new_upstream()

    async def close(self) -> None:
        if self._upstream is not None:
            await self._upstream.close()
        if self._v1_worker is not None:
            self._v1_worker.shutdown(wait=False, cancel_futures=True)

    async def _translate(self, fn: Callable[[bytes], bytes], data: bytes) -> bytes:
        """fn(data) here when small, else in the worker process (off the loop and its GIL)."""
        if len(data) <= V1_WORKER_BYTES:
            return fn(data)
        if self._v1_worker is None:
            self._v1_worker = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return await asyncio.get_running_loop().run_in_executor(self._v1_worker, fn, data)
        except BrokenProcessPool:  # the worker died (e.g. killed for memory): a fresh one next time
            self._v1_worker = None
            raise

    # ------------------------------------------------------------------ metrics
    def _count(self, model: str, code: int | str) -> None:
        """One request for `model` (a configured name, or "" for anything else) answered `code`."""
        key = (model, code)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = self.metrics.requests.labels(model=model, code=str(code))
        child.inc()

    def prune_metrics(self, configured: Any = None) -> None:
        """Drop the request series of models no longer configured. `configured`: the names
        (default: the reconciler's models not removed). Runs at each /metrics scrape."""
        if configured is None:
            configured = {n for n, m in self.reconciler.models.items() if not m.removed}
        for key in [k for k in self._counters if k[0] and k[0] not in configured]:
            del self._counters[key]
            try:
                self.metrics.requests.remove(key[0], str(key[1]))
            except KeyError:
                pass

    # ------------------------------------------------------------------ ASGI entry
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path.startswith("/v1/"):
            await self._v1(scope, receive, send, path, method)
            return
        m = _V2_MODEL.fullmatch(path)
        if m is not None:
            name, version, action = m.group(1), m.group(2), m.group(3)
            model = await self._configured(send, name, version)
            if model is None:
                return
            if action == "/ready":
                await self._ready(send, model)
                return
            target = f"/v2/models/{name}" if version is None else f"/v2/models/{name}/versions/{version}"
            if action == "/infer" and method == "POST":
                await self._model_call(scope, receive, send, model, "POST", target + "/infer", version, v1=False)
            elif action is None and method == "GET":
                await self._model_call(scope, receive, send, model, "GET", target, version, v1=False)
            else:
                await send_error(send, 405, f"{method} {_echo(path)} is not supported")
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
            await send_error(send, 404, f"no route for {_echo(method)} {_echo(path)}")

    async def _configured(self, send: Send, name: str, version: str | None) -> Any:
        """The configured model `name` if the request may go to it (else answer and None)."""
        model = self.reconciler.models.get(name)
        if model is None or model.removed:
            self._count("", 404)
            await send_error(send, 404, f"model {_echo(name)!r} is not configured")
            return None
        if version is not None:
            wanted = model.spec.version
            if not _VERSION.fullmatch(version):
                self._count(name, 400)
                await send_error(send, 400, f"model {name!r}: version {_echo(version)!r} is not a version "
                                             "(letters, digits, '.', '_', '-'; at most 64)")
                return None
            if wanted is not None and version != str(wanted):
                self._count(name, 404)
                await send_error(send, 404, f"model {name!r} has no version {version!r} (configured: {wanted})")
                return None
        return model

    # ------------------------------------------------------------------ V2
    async def _ready(self, send: Send, model: Any) -> None:
        ok = _can_serve(model)
        # KServe V2: 200 when ready, 400 otherwise; the body says which
        await _json(send, 200 if ok else 400, {"name": model.name, "ready": ok, "state": model.state.value})

    async def _model_call(self, scope: Scope, receive: Receive, send: Send, model: Any, method: str,
                          target: str, version: str | None, *, v1: bool,
                          body: bytes | None = None) -> tuple[int, bytes] | None:
        """Lease, lazy-load, forward. With `v1`, return (status, body) instead of sending."""
        name = model.name
        if body is None and method == "POST":
            try:
                body = await self._read_body(scope, receive, self.max_body_bytes)
            except _TooLarge:
                self._count(name, 413)
                await send_error(send, 413, f"request body exceeds {self.max_body_bytes} bytes (--max-body-bytes)")
                return None
        try:
            model = await self.reconciler.acquire(name)
        except UnknownModel:
            self._count("", 404)
            await send_error(send, 404, f"model {name!r} is not configured")
            return None
        except ModelUnavailable as e:
            self._count(name, 503)
            await send_error(send, 503, str(e), retry_after=e.retry_after)
            return None
        try:
            return await self._forward(scope, send, model, method, target, version, body, v1=v1)
        finally:
            self.reconciler.release(model)

    async def _forward(self, scope: Scope, send: Send, model: Any, method: str, target: str,
                       version: str | None, body: bytes | None, *, v1: bool) -> tuple[int, bytes] | None:
        name = model.name
        headers = [(k, v) for k, v in scope["headers"] if k in _PASS_REQUEST]
        query = scope.get("query_string")
        if query:
            target = target + "?" + _safe_query(query)
        try:
            status, payload, out_headers = await self._send(method, target, body, headers, key=name)
        except UnsafeRequest as e:
            self._count(name, 400)
            await send_error(send, 400, str(e))
            return None
        except (UpstreamError, asyncio.TimeoutError) as e:
            self._count(name, 503)
            if isinstance(e, UpstreamBusy):
                reason = f"busy: {e} (--max-upstream-per-model / --upstream-connections / --request-timeout)"
            elif isinstance(e, asyncio.TimeoutError):
                reason = f"no answer within {self.request_timeout_s:g}s (--request-timeout)"
            else:
                reason = "server unreachable"
            await send_error(send, 503, f"model {name!r}: {reason}", retry_after=1)
            return None
        if status == 404 and (version is None or version == model.spec.version):
            # the server does not have a model we leased as served (a restart, an unload behind
            # our back, or the window before a restarted server is restocked): never a 404 for
            # a configured model; the reconciler rechecks the server when it thinks it loaded
            self.reconciler.report_missing(name)
            self._count(name, 503)
            await send_error(send, 503, f"model {name!r}: the server does not have it loaded; reloading", retry_after=1)
            return None
        self._count(name, status)
        if status >= 400:
            payload = json.dumps({"error": error_reason(status, payload)}).encode()
            out_headers = [(b"content-type", b"application/json")]
        if v1:
            return status, payload
        out_headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        await send({"type": "http.response.body", "body": payload})
        return None

    async def _send(self, method: str, target: str, body: bytes | None, headers: list[tuple[bytes, bytes]],
                    key: str = "") -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        upstream = self._upstream
        if upstream is None or upstream.base_url != self._server_url():
            upstream = self._upstream = self._new_upstream()
        status, resp_headers, payload = await upstream.request(method, target, headers, body or b"",
                                                               self.request_timeout_s, key)
        return status, payload, [(k, v) for k, v in resp_headers if k in _PASS_RESPONSE]

    async def _forward_plain(self, send: Send, method: str, target: str) -> None:
        try:
            status, payload, headers = await self._send(method, target, None, [])
        except (UpstreamError, asyncio.TimeoutError):
            await send_error(send, 503, "server unreachable", retry_after=1)
            return
        if status >= 400:
            payload = json.dumps({"error": error_reason(status, payload)}).encode()
            headers = [(b"content-type", b"application/json")]
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _read_body(self, scope: Scope, receive: Receive, limit: int) -> bytes:
        for k, v in scope["headers"]:
            if k == b"content-length" and (not v.isdigit() or int(v) > limit):
                raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    # ------------------------------------------------------------------ V1
    async def _v1(self, scope: Scope, receive: Receive, send: Send, path: str, method: str) -> None:
        m = _V1_MODEL.fullmatch(path)
        if m is None:
            await send_error(send, 404, f"no route for {_echo(method)} {_echo(path)}")
            return
        name, predict = m.group(1), m.group(2)
        model = await self._configured(send, name, None)
        if model is None:
            return
        if not predict:
            await _json(send, 200, {"name": name, "ready": _can_serve(model)})
            return
        if method != "POST":
            await send_error(send, 405, "use POST for :predict")
            return
        limit = min(self.max_v1_body_bytes, self.max_body_bytes)
        try:
            raw = await self._read_body(scope, receive, limit)
        except _TooLarge:
            self._count(name, 413)
            await send_error(send, 413, f"V1 request body exceeds {limit} bytes (--max-v1-body-bytes)")
            return
        try:
            v2_body = await self._translate(translate_v1_request, raw)
        except ValueError as e:
            self._count(name, 400)
            await send_error(send, 400, f"bad V1 request: {e}")
            return
        except BrokenProcessPool:
            self._count(name, 503)
            await send_error(send, 503, "the V1 translation worker stopped; retry", retry_after=1)
            return
        v2_scope = dict(scope, headers=[(b"content-type", b"application/json")], query_string=b"")
        result = await self._model_call(v2_scope, receive, send, model, "POST", f"/v2/models/{name}/infer", None,
                                        v1=True, body=v2_body)
        if result is None:
            return
        status, payload = result
        if status != 200:
            await send_error(send, status, error_reason(status, payload))
            return
        try:
            answer = await self._translate(translate_v2_response, payload)
        except (ValueError, KeyError, TypeError, IndexError, BrokenProcessPool) as e:
            await send_error(send, 502, f"could not translate the server's V2 response: {type(e).__name__}")
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})

def _echo(text: str) -> str:
    """A client's input, cut short, for an error message."""
    return text if len(text) <= _ECHO else text[:_ECHO] + "..."


def _safe_query(query: bytes) -> str:
    """The query string with every byte outside visible ASCII percent-encoded (never CR/LF/space)."""
    if not _SAFE_QUERY.fullmatch(query):
        query = _UNSAFE_QUERY_BYTE.sub(lambda m: b"%%%02X" % m.group()[0], query)
    return query.decode("ascii")


# ---------------------------------------------------------------------- upstream errors
_TRACEBACK = "Traceback (most recent call last)"
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.@+~-]+){2,}[\\/]?")


def _clean(text: str) -> str:
    if _TRACEBACK in text:  # keep the exception line, not the stack
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        text = lines[-1] if lines else ""
    text = _PATH.sub("<path>", " ".join(text.split()))
    return text if len(text) <= 300 else text[:300] + "..."


def error_reason(status: int, payload: bytes) -> str:
    """A short reason a client can act on, from whatever error body the server sent."""
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        doc = None
    reason = ""
    if isinstance(doc, dict):
        if isinstance(doc.get("error"), str):
            reason = doc["error"]
        elif isinstance(doc.get("detail"), list):  # FastAPI's validation errors
            parts = []
            for d in doc["detail"][:3]:
                if isinstance(d, dict):
                    loc = ".".join(str(p) for p in d.get("loc", []) if p != "body")
                    parts.append(f"{loc}: {d.get('msg', '')}" if loc else str(d.get("msg", "")))
            reason = "invalid request: " + "; ".join(parts)
        elif isinstance(doc.get("detail"), str):
            reason = doc["detail"]
    elif doc is None and payload:
        text = payload.decode("utf-8", "replace")
        readable = " ".join(text.split())  # tracebacks span lines; binary garbage is not text
        reason = text if readable.isprintable() and "\ufffd" not in text else ""
    reason = _clean(reason)
    return reason or f"the server answered {status} without a reason"


def _can_serve(model: Any) -> bool:
    """Ready in the data-plane sense: an infer now succeeds (possibly after a lazy load)."""
    if model.state is State.LOADED:
        return True
    return model.state in (State.CACHED, State.REGISTERED) and not model.wants_loaded() and not model.permanent


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
