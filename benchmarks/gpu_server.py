"""A tiny model server that holds REAL device memory per loaded model (CUDA driver API through
ctypes on libcuda: no framework, nothing downloaded), speaking enough of the KServe V2 REST
protocol and MLServer's repository layout to be driven by the agent as a sidecar
(`modelshelf run --server mlserver --server-url URL --server-repository REPO --server-pid-file F`).

A model is a directory holding `gpu.json` (`{"bytes": N}`); the agent's MLServer adapter writes
`REPO/<name>/model-settings.json` whose `parameters.uri` points at it. On load the server
allocates N bytes on its device (`cuMemAlloc`, then `cuMemsetD8` so the pages are really
backed) and frees them on unload (`cuMemFree`). `--backend host` holds N touched host bytes
instead (the same protocol on a machine without a GPU: the CPU path the tests exercise).

Endpoints: GET /v2/health/live|ready, POST /v2/repository/index (body `{}`), POST
/v2/repository/models/{name}/load|unload, GET /v2/models/{name}/ready, GET /v2/models/{name},
POST /v2/models/{name}/infer (answers `predict` = [bytes held by the model]).

    python benchmarks/gpu_server.py --repository REPO --port 8090 --pid-file server.pid [--device 0]
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class NoCuda(RuntimeError):
    """The CUDA driver cannot be used here (no libcuda, no device, init failed): says which."""


class CudaDriver:
    """The few CUDA driver calls the server needs, through ctypes. Raises NoCuda with the reason."""

    def __init__(self, device: int = 0, library: str | None = None):
        names = [library] if library else ["libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda")]
        self._lib = None
        errors = []
        for name in [n for n in names if n]:
            try:
                self._lib = ctypes.CDLL(name)
                break
            except OSError as e:
                errors.append(f"{name}: {e}")
        if self._lib is None:
            raise NoCuda("no libcuda (the NVIDIA driver's CUDA library) on this machine: " + "; ".join(errors or ["not found"]))
        self._lock = threading.Lock()
        self._check(self._lib.cuInit(0), "cuInit")
        dev = ctypes.c_int()
        self._check(self._lib.cuDeviceGet(ctypes.byref(dev), device), f"cuDeviceGet({device})")
        self._ctx = ctypes.c_void_p()
        self._check(self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(self._ctx), dev), "cuDevicePrimaryCtxRetain")
        self.device = device

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            try:
                self._lib.cuGetErrorString(rc, ctypes.byref(msg))
            except Exception:  # very old drivers: the code alone
                pass
            raise NoCuda(f"{what} failed: CUDA error {rc} {(msg.value or b'').decode()}")

    def alloc(self, nbytes: int) -> int:
        with self._lock:
            self._check(self._lib.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
            ptr = ctypes.c_uint64()
            self._check(self._lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), f"cuMemAlloc({nbytes})")
            self._check(self._lib.cuMemsetD8_v2(ptr, ctypes.c_ubyte(1), ctypes.c_size_t(nbytes)), "cuMemsetD8")
            return ptr.value

    def free(self, handle: int) -> None:
        with self._lock:
            self._check(self._lib.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
            self._check(self._lib.cuMemFree_v2(ctypes.c_uint64(handle)), "cuMemFree")


class HostMemory:
    """The host backend: N touched bytes per model (a bytearray written every page)."""

    device = None

    def alloc(self, nbytes: int) -> Any:
        return bytearray(b"\x01") * nbytes

    def free(self, handle: Any) -> None:
        del handle


_PATH = re.compile(r"^/v2/(?:repository/models/(?P<rname>[^/]+)/(?P<op>load|unload)|models/(?P<name>[^/]+)(?P<rest>/ready|/infer)?|repository/index|health/(?:live|ready))/?$")


class ModelServer:
    def __init__(self, repository: Path, backend: Any):
        self.repository = Path(repository)
        self.backend = backend
        self.models: dict[str, tuple[int, Any]] = {}  # name -> (bytes, handle)
        self.lock = threading.Lock()

    def settings_of(self, name: str) -> dict | None:
        for entry in (self.repository / name, self.repository / ".loaded" / name):
            f = entry / "model-settings.json"
            if f.is_file():
                return json.loads(f.read_text())
        return None

    def load(self, name: str) -> tuple[int, dict]:
        settings = self.settings_of(name)
        if settings is None:
            return 404, {"error": f"Model {name} not found"}
        uri = Path(settings.get("parameters", {}).get("uri", ""))
        spec = (uri if uri.is_dir() else uri.parent) / "gpu.json"
        try:
            nbytes = int(json.loads(spec.read_text())["bytes"])
        except (OSError, ValueError, KeyError) as e:
            return 500, {"error": f"model {name}: cannot read {spec}: {e}"}
        try:
            handle = self.backend.alloc(nbytes)
        except NoCuda as e:  # out of device memory, typically
            return 500, {"error": f"model {name}: {e}"}
        with self.lock:
            old = self.models.pop(name, None)
            self.models[name] = (nbytes, handle)
        if old is not None:
            self.backend.free(old[1])
        return 200, {}

    def unload(self, name: str) -> tuple[int, dict]:
        with self.lock:
            old = self.models.pop(name, None)
        if old is None:
            return 404, {"error": f"Model {name} not found"}
        self.backend.free(old[1])
        return 200, {}

    def index(self) -> list[dict]:
        with self.lock:
            return [{"name": n, "state": "READY", "reason": ""} for n in sorted(self.models)]


def make_handler(server: ModelServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _reply(self, code: int, doc: Any) -> None:
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _route(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            m = _PATH.match(self.path.split("?", 1)[0])
            if m is None:
                return self._reply(404, {"error": f"no route {self.path}"})
            if m.group("op") and method == "POST":
                name = m.group("rname")
                return self._reply(*(server.load(name) if m.group("op") == "load" else server.unload(name)))
            if self.path.startswith("/v2/repository/index") and method == "POST":
                return self._reply(200, server.index())
            if self.path.startswith("/v2/health"):
                return self._reply(200, {})
            name, rest = m.group("name"), m.group("rest")
            if name is None:
                return self._reply(405, {"error": "method not allowed"})
            with server.lock:
                held = server.models.get(name)
            if held is None:
                return self._reply(404, {"error": f"Model {name} not found"})
            if rest == "/infer" and method == "POST":
                return self._reply(200, {"model_name": name, "outputs": [
                    {"name": "predict", "shape": [1], "datatype": "INT64", "data": [held[0]]}]})
            return self._reply(200, {"name": name, "ready": True} if rest != "/infer" else {"error": "POST only"})

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid-file", type=Path, default=None)
    p.add_argument("--backend", choices=("cuda", "host"), default="cuda")
    p.add_argument("--device", type=int, default=0)
    args = p.parse_args(argv)
    try:
        backend = CudaDriver(args.device) if args.backend == "cuda" else HostMemory()
    except NoCuda as e:
        print(f"gpu_server: cannot start: {e}", file=sys.stderr, flush=True)
        return 3
    args.repository.mkdir(parents=True, exist_ok=True)
    httpd = ThreadingHTTPServer((args.host, args.port), make_handler(ModelServer(args.repository, backend)))
    if args.pid_file:
        args.pid_file.write_text(f"{os.getpid()}\n")
    print(f"gpu_server: serving on {args.host}:{args.port} backend={args.backend} device={backend.device}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
