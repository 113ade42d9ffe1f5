"""The data plane: KServe V2 (and V1, translated) requests routed to their model.

A raw ASGI app, because this is the hot path: one dict lookup per request, the V2 body is
passed through as bytes (never parsed), the binary tensor extension header
(`Inference-Header-Content-Length`) passes through untouched, and nothing is logged per
request at info level.

Every model request holds an in-flight lease (Reconciler.acquire/release) until its response
is sent, so eviction never unloads a model under a request; a request for a model that is not
loaded waits for one (single-flight) load. Forwarding goes through agent.upstream (keep-alive
HTTP/1.1 with httptools), the cheapest client we measured (benchmarks/results/proxy.md).

The fast path (fast_route/fast_forward; the public listener's protocol in agent.app calls it):
a plain infer request -- POST /v2/models/{m}/infer, no version, no query string, a
Content-Length body of at most 64 KiB -- for a model that is loaded now, when an idle upstream
connection and its slots are free now, is answered from the connection's callbacks without an
ASGI task: Reconciler.try_acquire leases the model, Upstream.send_now sends it, and the answer
is composed by the same code as the ASGI path's (_compose) and written in one write; the lease
ends after that write. Every other request, and one the fast path cannot take at once (not
loaded, no idle connection or slot, a stale pooled connection), goes through the ASGI app
whole, with nothing held and nothing sent. The answers, the timeout and the bounds are the
same either way (tests/protocols/test_fast_path.py sends the same requests both ways).

What a client gets, per path (every model path: configured models only, under an in-flight
lease, after a lazy single-flight load):
  passed through (bytes; Content-Encoding gzip/deflate and Accept-Encoding forwarded, so
  tritonclient's request/response compression works):
    GET  /v2/models/{m}[/versions/{v}]                 metadata
    POST /v2/models/{m}[/versions/{v}]/infer           inference
    GET  /v2/models/{m}[/versions/{v}]/config          Triton model configuration
    GET  /v2/models/{m}[/versions/{v}]/stats           Triton statistics
    GET|POST /v2/models/{m}/trace/setting              Triton per-model trace settings
    POST /v2/models/{m}[/versions/{v}]/generate        generate extension
    POST /v2/models/{m}[/versions/{v}]/generate_stream streamed: each chunk (SSE event) is passed
    POST /v2/models/{m}[/versions/{v}]/infer_stream    on as the server sends it, never buffered
    A server without the endpoint (MLServer has no /config, /stats, /trace/setting) -> 501.
    Request bodies with a Content-Length above --stream-body-bytes are forwarded as they arrive
    (never held whole); --max-body-bytes is checked on the Content-Length first (413).
  answered by the agent:
    GET  /v2/health/live, /v2/health/ready             the agent's own liveness / readiness
    GET  /v2/models/{m}[/versions/{v}]/ready           200 ready / 400 not ready (KServe V2); with
         a version: 404 unless it is the configured version or (none configured) a version the
         server has loaded (the server is asked); not loaded and no configured version -> 400
    GET  /v2                                           the server's metadata, its `extensions`
                                                       cut to those the agent serves
    GET  /, /v1                                        KServe V1 liveness {"status": "alive"}
    GET  /v1/models                                    {"models": [configured names]}
    GET  /v1/models/{m}                                200 {"name", "ready": true}; 503 when not
                                                       ready (as KServe; its SDK reads False)
  translated (agent.v1):
    POST /v1/models/{m}:predict  {"instances"|"inputs": [row, ...]}
        -> V2 infer with one input "input-0", shape [len(instances), *row shape],
           datatype BOOL/INT64/FP64/BYTES from the values, data flattened row-major;
           dict instances (records, columns, pandas' to_dict form, top-level columns)
        -> one V2 input per column, request parameter content_type "pd"
        <- {"predictions": [...]} from the output named "predict" (MLServer's sklearn/xgboost
           runtimes) or else the first output, reshaped to its V2 shape.
  refused:
    POST /v1/models/{m}:explain                         501: neither server has V1 explain
    /v2/repository/...                                  403: the agent owns the repository
    /v2/logging, /v2/trace/setting, /v2/*sharedmemory   403: server-wide settings

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
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any, Awaitable, Callable

from agent.logging import get_logger, kv
from agent.metrics import Metrics
from agent.reconciler import ModelUnavailable, Reconciler, State, UnknownModel
from agent.upstream import BodyIncomplete, BodySource, BodyTooLarge, Upstream, UpstreamBusy, UpstreamError, UnsafeRequest
from agent.v1 import translate_v1_request, translate_v2_response

log = get_logger("modelshelf.router")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# /v2/models/{name}[/versions/{v}][/action]   (matched with fullmatch: no "$\n" slip)
_V2_MODEL = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]*))?"
                       r"(/infer|/ready|/config|/stats|/generate|/generate_stream|/infer_stream|/trace/setting)?/?")
_V1_MODEL = re.compile(r"/v1/models/([^/:]+)(:predict|:explain)?")
# action -> the methods it takes; every one is forwarded under a lease after a lazy load
_V2_ACTIONS: dict[str | None, tuple[str, ...]] = {
    None: ("GET",), "/infer": ("POST",), "/config": ("GET",), "/stats": ("GET",),
    "/generate": ("POST",), "/generate_stream": ("POST",), "/infer_stream": ("POST",),
    "/trace/setting": ("GET", "POST"),
}
_STREAMED = ("/generate_stream", "/infer_stream")  # answers passed on chunk by chunk (SSE)
_EXTENSIONS = ("/config", "/stats", "/generate", "/generate_stream", "/infer_stream", "/trace/setting")
# server-wide settings of the co-located server: the agent's operator owns them, not a client
_SERVER_WIDE = ("/v2/logging", "/v2/trace/setting", "/v2/systemsharedmemory", "/v2/cudasharedmemory")
# the server's extensions (from GET /v2) that the agent serves too: the others are dropped
SERVED_EXTENSIONS = frozenset({
    "classification", "sequence", "binary_tensor_data", "parameters", "schedule_policy",
    "model_configuration", "statistics", "trace", "generate",
})
_VERSION = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SAFE_QUERY = re.compile(rb"[\x21-\x7e]*")
_UNSAFE_QUERY_BYTE = re.compile(rb"[^\x21-\x7e]")
# response headers worth passing back to the client
_PASS_RESPONSE = (b"content-type", b"inference-header-content-length", b"content-encoding")
_PASS_REQUEST = (b"content-type", b"inference-header-content-length", b"accept", b"x-request-id", b"traceparent",
                 b"content-encoding", b"accept-encoding")
_PASS_REQUEST_SET = frozenset(_PASS_REQUEST)
_ERROR_BYTES = 64 * 1024  # of an error answer read (and decompressed) for its reason
FAST_BODY_BYTES = 64 * 1024  # infer bodies up to this size may take the fast path (uvicorn buffers them unpaused)
V1_WORKER_BYTES = 256 * 1024  # V1 bodies (and answers) above this are translated in the worker process
_ECHO = 80  # characters of a client's input echoed in an error


class _TooLarge(Exception):
    pass


class Router:
    def __init__(self, reconciler: Reconciler, server_url: Callable[[], str], metrics: Metrics,
                 *, server_ready: Callable[[], bool], server_url_for: Callable[[str], str] | None = None):
        s = reconciler.settings  # every data-plane limit is a flag (agent.settings)
        self.reconciler = reconciler
        self._server_url = server_url
        # --server-processes N: the server holding a model (agent/runtimes/shards.py); one pool each
        self._server_url_for = server_url_for
        self._shard_upstreams: dict[str, Upstream] = {}
        self.metrics = metrics
        self.max_body_bytes = s.max_body_bytes
        self.max_v1_body_bytes = s.max_v1_body_bytes
        self.request_timeout_s = s.request_timeout_s
        self.stream_body_bytes = s.stream_body_bytes
        self.upstream_connections = s.upstream_connections
        self.max_upstream_per_model = s.max_upstream_per_model or max(1, self.upstream_connections // 2)
        self._server_ready = server_ready
        self._fast_body_bytes = min(FAST_BODY_BYTES, self.stream_body_bytes, self.max_body_bytes)
        self.fast_answers = 0  # requests answered on the fast path, and those it handed to the ASGI path
        self.fast_fallbacks = 0
        self._applied = False  # the reconciler's first config is applied (fast_takes)
        self._upstream: Upstream | None = None
        self._counters: dict[tuple[str, str], Any] = {}  # (model, code) -> counter child
        self._tally: dict[tuple[str, int | str], int] = {}  # (model, code) -> requests since the last scrape
        self._v1_worker: ProcessPoolExecutor | None = None
        hooks = getattr(metrics, "before_render", None)
        if hooks is not None:
            hooks.append(self.prune_metrics)

    def _new_upstream(self, url: str | None = None) -> Upstream:
        return Upstream(url or self._server_url(), max_connections=self.upstream_connections,
                        max_per_key=self.max_upstream_per_model)

    async def start(self) -> None:
        self._upstream = self._new_upstream()

    async def close(self) -> None:
        if self._upstream is not None:
            await self._upstream.close()
        for upstream in self._shard_upstreams.values():
            await upstream.close()
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
        """One request for `model` (a configured name, or "" for anything else) answered `code`:
        a plain integer here, added to the prometheus counter at the next scrape (prune_metrics),
        not a locked update per request."""
        key = (model, code)
        tally = self._tally
        tally[key] = tally.get(key, 0) + 1

    def prune_metrics(self, configured: Any = None) -> None:
        """Fold the requests counted since the last scrape into their series, and drop the
        request series of models no longer configured. `configured`: the names (default: the
        reconciler's models not removed). Runs at each /metrics scrape."""
        tally, self._tally = self._tally, {}
        for key, n in tally.items():
            child = self._counters.get(key)
            if child is None:
                child = self._counters[key] = self.metrics.requests.labels(model=key[0], code=str(key[1]))
            child.inc(n)
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
        if path in ("/", "/v1", "/v1/"):
            await liveness(send)
            return
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
                await self._ready(send, model, version)
                return
            target = f"/v2/models/{name}" if version is None else f"/v2/models/{name}/versions/{version}"
            if method not in _V2_ACTIONS[action]:
                await send_error(send, 405, f"{method} {_echo(path)} is not supported (use {' or '.join(_V2_ACTIONS[action])})")
                return
            await self._model_call(scope, receive, send, model, method, target + (action or ""), version,
                                   v1=False, action=action)
            return
        if path in ("/v2/health/live",):
            await _json(send, 200, {"live": True})
        elif path == "/v2/health/ready":
            ok = self.reconciler.applied_once.is_set() and self._server_ready()
            await _json(send, 200 if ok else 503, {"ready": ok})
        elif path in ("/v2", "/v2/") and method == "GET":
            await self._server_metadata(send)
        elif path.startswith("/v2/repository"):
            await send_error(send, 403, "the model repository is managed by the modelshelf agent: edit the model config instead")
        elif path.startswith(_SERVER_WIDE):
            await send_error(send, 403, f"{_echo(path)} is a server-wide setting of the co-located server: the agent's "
                                        "operator owns it (per-model trace settings: /v2/models/{name}/trace/setting)")
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
    async def _ready(self, send: Send, model: Any, version: str | None) -> None:
        ok = can_serve(model)
        if ok and version is not None and model.spec.version is None:
            # no configured version: only the server knows which versions the model has, and
            # only once it is loaded (a version that is not there is 404, as infer on it is)
            if model.state is not State.LOADED:
                await _json(send, 400, {"name": model.name, "ready": False, "state": model.state.value,
                                        "error": f"model {model.name!r} is not loaded: its versions are known once it "
                                                 f"is (a request to /v2/models/{model.name}/infer loads it)"})
                return
            try:
                status, _, _ = await self._send("GET", f"/v2/models/{model.name}/versions/{version}/ready", None, [],
                                                key=model.name)
            except (UpstreamError, asyncio.TimeoutError, UnsafeRequest):
                await send_error(send, 503, f"model {model.name!r}: server unreachable", retry_after=1)
                return
            if status != 200:
                await send_error(send, 404, f"model {model.name!r} has no version {version!r} "
                                            f"(the server answered {status} for it)")
                return
        # KServe V2: 200 when ready, 400 otherwise; the body says which
        await _json(send, 200 if ok else 400, {"name": model.name, "ready": ok, "state": model.state.value})

    async def _model_call(self, scope: Scope, receive: Receive, send: Send, model: Any, method: str,
                          target: str, version: str | None, *, v1: bool,
                          body: bytes | None = None, action: str | None = None) -> tuple[int, bytes] | None:
        """Lease, lazy-load, forward. With `v1`, return (status, body) instead of sending."""
        name = model.name
        source: bytes | BodySource | None = body
        if body is None and method == "POST":
            try:
                source = await self._body(scope, receive)
            except ConnectionError:
                return None  # the client went away mid-body: nothing to forward, no one to answer
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
            if action in _STREAMED:
                await self._forward_stream(scope, receive, send, model, method, target, source)
                return None
            return await self._forward(scope, send, model, method, target, version, source, v1=v1, action=action)
        finally:
            self.reconciler.release(model)

    async def _body(self, scope: Scope, receive: Receive) -> bytes | BodySource:
        """The request body: read whole when it is at most --stream-body-bytes, else a
        BodySource that forwards it as it arrives (with its Content-Length, or chunked when
        the client sent none). --max-body-bytes: a Content-Length is checked before a byte is
        read (413); a chunked body is cut off past it (BodyTooLarge, 413)."""
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None:
            if not length.isdigit() or int(length) <= self.stream_body_bytes:
                return await self._read_body(scope, receive, self.max_body_bytes)
            if int(length) > self.max_body_bytes:
                raise _TooLarge
        head: list[bytes] = []  # no Content-Length: what arrived before the threshold was crossed
        size, more = 0, True
        while more and size <= self.stream_body_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError("the client went away")
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge
            head.append(chunk)
        if length is None and not more:
            return b"".join(head)
        ended = not more

        async def read() -> bytes:
            nonlocal ended
            while head:
                chunk = head.pop(0)
                if chunk:
                    return chunk
            while not ended:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ConnectionError("the client went away")
                ended = not message.get("more_body", False)
                if message.get("body"):
                    return message["body"]
            return b""

        if length is not None:
            return BodySource(int(length), read)
        return BodySource(None, read, limit=self.max_body_bytes)

    def _upstream_failure(self, name: str, e: Exception) -> tuple[int, str]:
        """The status and reason a client gets when the server could not be asked."""
        if isinstance(e, UnsafeRequest):
            return 400, str(e)
        if isinstance(e, BodyTooLarge):
            return 413, f"request body exceeds {self.max_body_bytes} bytes (--max-body-bytes)"
        if isinstance(e, BodyIncomplete):
            return 400, f"model {name!r}: {e}"
        if isinstance(e, UpstreamBusy):
            reason = f"busy: {e} (--max-upstream-per-model / --upstream-connections / --request-timeout)"
        elif isinstance(e, asyncio.TimeoutError):
            reason = f"no answer within {self.request_timeout_s:g}s (--request-timeout)"
        else:
            reason = "server unreachable"
        return 503, f"model {name!r}: {reason}"

    async def _forward_stream(self, scope: Scope, receive: Receive, send: Send, model: Any, method: str, target: str,
                              body: bytes | BodySource | None) -> None:
        """Forward and pass the answer on chunk by chunk as the server sends it (SSE); stop
        (and close the server connection) when the client goes away."""
        name = model.name
        # no compression of a stream: a compressor holds back small chunks
        headers = [(k, v) for k, v in scope["headers"] if k in _PASS_REQUEST and k != b"accept-encoding"]
        query = scope.get("query_string")
        if query:
            target = target + "?" + _safe_query(query)
        upstream = self._current_upstream(name)
        started = False
        try:
            async with upstream.stream(method, target, headers, body or b"", self.request_timeout_s, key=name) as answer:
                if answer.status >= 400:
                    payload = await answer.read(_ERROR_BYTES)
                    await self._answer(send, model, target, None, answer.status, payload, answer.headers, "/generate_stream")
                    return
                self._count(name, answer.status)
                out_headers = [(k, v) for k, v in answer.headers if k in _PASS_RESPONSE]
                await send({"type": "http.response.start", "status": answer.status, "headers": out_headers})
                started = True
                gone = asyncio.ensure_future(_client_gone(receive))
                try:
                    while True:
                        upcoming = asyncio.ensure_future(answer.next_chunk())
                        await asyncio.wait((upcoming, gone), return_when=asyncio.FIRST_COMPLETED)
                        if not upcoming.done():
                            # the client went away: stop here; closing the server connection
                            # tells the server too, and the lease ends with this request
                            upcoming.cancel()
                            return
                        chunk = upcoming.result()
                        if chunk is None:
                            break
                        if chunk:
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                finally:
                    gone.cancel()
                await send({"type": "http.response.body", "body": b""})
        except (UpstreamError, asyncio.TimeoutError, UnsafeRequest) as e:
            if started:  # the status is sent: cut the stream (the client sees it end early)
                log.warning("stream cut", extra=kv(model=name, error=type(e).__name__))
                await send({"type": "http.response.body", "body": b""})
                return
            status, reason = self._upstream_failure(name, e)
            self._count(name, status)
            await send_error(send, status, reason, retry_after=1 if status == 503 else None)

    async def _forward(self, scope: Scope, send: Send, model: Any, method: str, target: str,
                       version: str | None, body: bytes | BodySource | None, *, v1: bool,
                       action: str | None = None) -> tuple[int, bytes] | None:
        name = model.name
        headers = [(k, v) for k, v in scope["headers"] if k in _PASS_REQUEST]
        query = scope.get("query_string")
        if query:
            target = target + "?" + _safe_query(query)
        try:
            status, payload, out_headers = await self._send(method, target, body, headers, key=name)
        except (UpstreamError, asyncio.TimeoutError, UnsafeRequest) as e:
            status, reason = self._upstream_failure(name, e)
            self._count(name, status)
            await send_error(send, status, reason, retry_after=1 if status == 503 else None)
            return None
        if v1:
            if status >= 400 and not (status == 404 and self._lost(model, version)):
                self._count(name, status)
                return status, json.dumps({"error": error_reason(status, _decoded(payload, out_headers))}).encode()
            if status < 400:
                self._count(name, status)
                return status, payload
        await self._answer(send, model, target, version, status, payload, out_headers, action)
        return None

    # ------------------------------------------------------------------ fast path
    def fast_route(self, scope: Scope) -> str | None:
        """The model of a request that fast_forward() may answer: POST /v2/models/{m}/infer
        without a version or query string, for a configured model, with a Content-Length body of
        at most FAST_BODY_BYTES (and the limits), no Transfer-Encoding, no Expect. None: the
        ASGI path answers it. Cheap: only the path and headers are read."""
        path = scope["path"]
        if scope["method"] != "POST" or scope["query_string"] or not path.startswith("/v2/models/") \
                or not path.endswith("/infer"):
            return None
        name = path[11:-6]
        length = None
        for k, v in scope["headers"]:
            if k == b"content-length":
                length = v
            elif k == b"transfer-encoding" or k == b"expect":
                return None
        if length is None or not length.isdigit() or not self.fast_takes(name, int(length)):
            return None
        return name

    def fast_takes(self, name: str, length: int) -> bool:
        """Whether fast_forward() may take an infer request for `name` with a `length`-byte body:
        a configured model (loaded or not: fast_forward checks), a body within FAST_BODY_BYTES
        and the limits, the config applied."""
        model = self.reconciler.models.get(name)  # configured names hold no "/"
        return model is not None and not model.removed and length <= self._fast_body_bytes \
            and (self._applied or self._applied_once())

    def _applied_once(self) -> bool:
        self._applied = self.reconciler.applied_once.is_set()  # (never cleared once set)
        return self._applied

    def fast_forward(self, name: str, headers: list[tuple[bytes, bytes]], body: bytes,
                     reply: Callable[[_Parts], None], demote: Callable[[], None]) -> None:
        """Answer a request fast_route() chose from callbacks, without a task: when the model is
        loaded now and an idle upstream connection and its slots are free now, lease the model,
        send the request, and `reply(parts)` when the answer (or the error) is there, the same
        answer _forward() gives; then release the lease. Otherwise `demote()`: the ASGI path
        takes the request whole (lazy load, waits for a slot, connects, retries a stale
        connection), with nothing held and nothing sent."""
        upstream = self._current_upstream(name)
        if not upstream.ready_now(name):  # first: a request handed on was never leased (nor counted as a hit)
            self._fall_back(demote)
            return
        model = self.reconciler.try_acquire(name)
        if model is None:  # not loaded now: the ASGI path loads it (single flight) and waits
            self._fall_back(demote)
            return
        sent = False
        try:
            upstream.send_ready("POST", f"/v2/models/{name}/infer", headers, body, self.request_timeout_s, name,
                                partial(self._fast_answered, model, name, reply, demote), _PASS_RESPONSE, _PASS_REQUEST_SET)
            sent = True
        except UnsafeRequest:
            pass  # the ASGI path answers it (400)
        finally:
            if not sent:
                self.reconciler.release(model)
        if not sent:
            self._fall_back(demote)

    def _fast_answered(self, model: Any, name: str, reply: Callable[[_Parts], None], demote: Callable[[], None],
                       result: tuple[int, list[tuple[bytes, bytes]], bytes] | BaseException | None) -> None:
        """fast_forward()'s request ended: the client's answer, then the lease's end."""
        if result is None:  # a stale pooled connection: nothing was served, so the
            self.reconciler.release(model)  # ASGI path sends it again on a fresh one
            self._fall_back(demote)
            return
        try:
            self.fast_answers += 1
            if isinstance(result, BaseException):
                status, reason = self._upstream_failure(name, result)
                self._count(name, status)
                reply(error_parts(status, reason, retry_after=1 if status == 503 else None))
                return
            status, resp_headers, payload = result
            reply(self._compose(model, None, status, payload, resp_headers, "/infer"))  # (only _PASS_RESPONSE's)
        except Exception:
            log.exception("fast path failed", extra=kv(model=name))
            reply(error_parts(500, f"model {name!r}: internal error in the agent"))
        finally:
            self.reconciler.release(model)

    def _fall_back(self, demote: Callable[[], None]) -> None:
        self.fast_fallbacks += 1
        demote()

    def _lost(self, model: Any, version: str | None) -> bool:
        """A 404 for the model we leased as served (not for a version it may lack)."""
        return version is None or version == model.spec.version

    async def _answer(self, send: Send, model: Any, target: str, version: str | None, status: int, payload: bytes,
                      out_headers: list[tuple[bytes, bytes]], action: str | None) -> None:
        """Send the server's answer on; its errors as {"error": reason}."""
        await _send_parts(send, self._compose(model, version, status, payload, out_headers, action))

    def _compose(self, model: Any, version: str | None, status: int, payload: bytes,
                 out_headers: list[tuple[bytes, bytes]], action: str | None) -> _Parts:
        """What the client gets for the server's answer (counted): its errors as {"error": reason}."""
        name = model.name
        if status == 404 and action in _EXTENSIONS and _no_route(payload, out_headers):
            self._count(name, 501)
            kind = getattr(getattr(self.reconciler, "adapter", None), "kind", "the co-located server")
            return error_parts(501, f"model {name!r}: {action} is not served by {kind} (a Triton extension; "
                                    "the server has no such endpoint)")
        if status == 404 and self._lost(model, version):
            # the server does not have a model we leased as served (a restart, an unload behind
            # our back, or the window before a restarted server is restocked): never a 404 for
            # a configured model; the reconciler rechecks the server when it thinks it loaded
            self.reconciler.report_missing(name)
            self._count(name, 503)
            return error_parts(503, f"model {name!r}: the server does not have it loaded; reloading", retry_after=1)
        self._count(name, status)
        if status >= 400:
            payload = json.dumps({"error": error_reason(status, _decoded(payload, out_headers))}).encode()
            out_headers = [(b"content-type", b"application/json")]
        out_headers.append((b"content-length", b"%d" % len(payload)))
        return status, out_headers, payload

    def _current_upstream(self, name: str = "") -> Upstream:
        """The pool to the server holding model `name` ("": server-wide calls, the first server)."""
        if name and self._server_url_for is not None:
            url = self._server_url_for(name)
            upstream = self._shard_upstreams.get(url)
            if upstream is None:
                upstream = self._shard_upstreams[url] = self._new_upstream(url)
            return upstream
        upstream = self._upstream
        if upstream is None or upstream.base_url != self._server_url():
            upstream = self._upstream = self._new_upstream()
        return upstream

    async def _send(self, method: str, target: str, body: bytes | BodySource | None,
                    headers: list[tuple[bytes, bytes]], key: str = "") -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        status, resp_headers, payload = await self._current_upstream(key).request(
            method, target, headers, body or b"", self.request_timeout_s, key)
        return status, payload, [(k, v) for k, v in resp_headers if k in _PASS_RESPONSE]

    async def _server_metadata(self, send: Send) -> None:
        """GET /v2: the server's metadata, its `extensions` cut to those the agent serves."""
        try:
            status, payload, _ = await self._send("GET", "/v2", None, [])
        except (UpstreamError, asyncio.TimeoutError):
            await send_error(send, 503, "server unreachable", retry_after=1)
            return
        if status >= 400:
            await send_error(send, status, error_reason(status, payload))
            return
        try:
            doc = json.loads(payload)
            doc["extensions"] = [e for e in doc.get("extensions") or [] if e in SERVED_EXTENSIONS]
        except (ValueError, TypeError, AttributeError):
            await send_error(send, 502, "the server's metadata (GET /v2) is not a JSON object")
            return
        await _json(send, 200, doc)

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
        if path in ("/v1/models", "/v1/models/") and method == "GET":
            names = sorted(n for n, m in self.reconciler.models.items() if not m.removed)
            await _json(send, 200, {"models": names})
            return
        m = _V1_MODEL.fullmatch(path)
        if m is None:
            await send_error(send, 404, f"no route for {_echo(method)} {_echo(path)}")
            return
        name, verb = m.group(1), m.group(2)
        model = await self._configured(send, name, None)
        if model is None:
            return
        if not verb:
            if can_serve(model):
                await _json(send, 200, {"name": name, "ready": True})
            else:  # KServe answers 503 for a model that is not ready (its SDK reads it as False)
                reason = getattr(model, "reason", None)
                if not reason and (failure := model.failure_now()):
                    # a failed model being retried: its state says loading, the client still learns why
                    reason = f"retrying after {model.failures} failed load(s), the last: {failure}"
                await send_error(send, 503, f"model {name!r} is not ready (state: {model.state.value}"
                                            + (f": {_clean(str(reason))}" if reason else "") + ")")
            return
        if method != "POST":
            await send_error(send, 405, f"use POST for {verb}")
            return
        if verb == ":explain":
            self._count(name, 501)
            kind = getattr(getattr(self.reconciler, "adapter", None), "kind", "the co-located server")
            await send_error(send, 501, f"model {name!r}: :explain is not served: {kind} speaks KServe V2, which has no "
                                        "explain endpoint; serve the explainer as a model of its own (e.g. MLServer's "
                                        "alibi-explain runtime) and call its :predict or /infer")
            return
        limit = min(self.max_v1_body_bytes, self.max_body_bytes)
        try:
            raw = _inflate(await self._read_body(scope, receive, limit), scope["headers"], limit)
        except _TooLarge:
            self._count(name, 413)
            await send_error(send, 413, f"V1 request body exceeds {limit} bytes (--max-v1-body-bytes; "
                                        "a compressed body counts decompressed)")
            return
        except ValueError as e:
            self._count(name, 400)
            await send_error(send, 400, f"bad V1 request: {e}")
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

async def _client_gone(receive: Receive) -> None:
    """Return when the client disconnects (after its body: other messages are skipped)."""
    while (await receive())["type"] != "http.disconnect":
        pass


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


def _decoded(payload: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """An error answer's bytes, decompressed (at most _ERROR_BYTES) when it came gzip/deflate."""
    encoding = next((v for k, v in headers if k == b"content-encoding"), b"").strip().lower()
    if encoding not in (b"gzip", b"deflate"):
        return payload
    try:
        wbits = 31 if encoding == b"gzip" else zlib.MAX_WBITS
        return zlib.decompressobj(wbits).decompress(payload[:_ERROR_BYTES], _ERROR_BYTES)
    except zlib.error:
        return b""


def _inflate(raw: bytes, headers: list[tuple[bytes, bytes]], limit: int) -> bytes:
    """A V1 body as JSON bytes: decompressed when its Content-Encoding is gzip or deflate (the
    agent parses V1 bodies); _TooLarge past `limit` decompressed bytes, ValueError when the
    encoding is unknown or the bytes are not what it says."""
    encoding = next((v for k, v in headers if k == b"content-encoding"), b"identity").strip().lower()
    if encoding == b"identity":
        return raw
    if encoding not in (b"gzip", b"deflate"):
        raise ValueError(f"Content-Encoding {encoding[:20].decode('ascii', 'replace')!r} is not gzip or deflate")
    inflater = zlib.decompressobj(31 if encoding == b"gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(raw, limit + 1)
    except zlib.error:
        raise ValueError(f"the body is not valid {encoding.decode()} data") from None
    if len(out) > limit:
        raise _TooLarge
    return out


def _no_route(payload: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
    """A 404 that says the server has no such endpoint (FastAPI's {"detail": "Not Found"},
    MLServer's), not that it lacks the model."""
    try:
        doc = json.loads(_decoded(payload, headers))
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("detail") == "Not Found"


def can_serve(model: Any) -> bool:
    """Ready in the data-plane sense: an infer now succeeds (possibly after a lazy load)."""
    if model.state is State.LOADED:
        return True
    return model.state in (State.CACHED, State.REGISTERED) and not model.wants_loaded() and not model.permanent


# ---------------------------------------------------------------------- responses
_Parts = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers (with content-length), body


def _json_parts(status: int, doc: Any, extra: list[tuple[bytes, bytes]] | None = None) -> _Parts:
    body = json.dumps(doc).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if extra:
        headers += extra
    return status, headers, body


async def _send_parts(send: Send, parts: _Parts) -> None:
    status, headers, body = parts
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, doc: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await _send_parts(send, _json_parts(status, doc, extra))


async def liveness(send: Send) -> None:
    """KServe's liveness (`GET /`, `GET /v1`): {"status": "alive"} while the process answers."""
    await _json(send, 200, {"status": "alive"})


def error_parts(status: int, message: str, *, retry_after: float | None = None) -> _Parts:
    """An error in the shape both protocols use, {"error": "<message>"} (V2 and KServe V1)."""
    extra = [(b"retry-after", str(max(1, int(round(retry_after)))).encode())] if retry_after is not None else None
    return _json_parts(status, {"error": message}, extra)


async def send_error(send: Send, status: int, message: str, *, retry_after: float | None = None) -> None:
    """Send error_parts(...)."""
    await _send_parts(send, error_parts(status, message, retry_after=retry_after))
