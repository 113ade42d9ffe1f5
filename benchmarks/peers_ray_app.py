"""The Ray Serve side of bench_peers: one replica with `@serve.multiplexed`, serving KServe
V2-shaped infer requests for the same sklearn `model.joblib` files MLServer serves.

    .venv-ray/bin/python benchmarks/peers_ray_app.py --store DIR --max-models 100 --port P

Runs in Ray's own venv (`make ray`: .venv-ray), never in .venv; it imports nothing from this
project. It starts a local Ray instance (no dashboard, usage stats off, its temp dir private),
deploys the app, prints one line `READY {"port": P, "pid": ...}` on stdout and serves until
SIGTERM or SIGINT, then shuts Serve and Ray down (their processes are its children) and removes
its temp dir.

The work per request is what MLServer's sklearn runtime does for the same request: parse the V2
JSON body, build the input array from `data` and `shape`, `model.predict`, answer a V2 JSON body
with the output `predict`. A model is `joblib.load(<store>/<name>/model.joblib)` in the
multiplexed loader, synchronously on the replica's loop as mlserver-sklearn does it; Ray
evicts the least recently used model when `--max-models` are held. The model id is Ray's
`serve_multiplexed_model_id` header when a client sends it, else the name in the path (one
replica: Ray's model-aware routing has nothing to choose between).

`GET /-/stats` answers the replica's own counters, so the benchmark can report Ray's cold starts
beside the agent's: loads and the seconds spent in joblib.load, and "waits": requests that
waited for a load (their own, or one they queued behind on Ray's model-cache lock, which also
covers Ray's LRU unload) and the seconds they waited, measured around `get_model`. A hit never
suspends there, so a request during which the load counter moved is one that waited: the same
meaning as the agent's `modelshelf_cold_start_seconds`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path


def build_app(store: Path, max_models: int, max_ongoing: int):
    import joblib
    import numpy as np
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=1, max_ongoing_requests=max_ongoing, ray_actor_options={"num_cpus": 0})
    class MultiplexedSklearn:
        def __init__(self, store: str):
            self.store = Path(store)
            self.loads = 0
            self.load_s = 0.0
            self.waits = 0
            self.wait_s = 0.0

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, model_id: str):
            t0 = time.perf_counter()
            model = joblib.load(self.store / model_id / "model.joblib")
            self.load_s += time.perf_counter() - t0
            self.loads += 1
            return model

        async def __call__(self, request: Request):
            parts = request.url.path.strip("/").split("/")
            if parts == ["-", "stats"]:
                return JSONResponse({"loads": self.loads, "load_seconds": self.load_s,
                                     "waits": self.waits, "wait_seconds": self.wait_s})
            if len(parts) != 4 or parts[:2] != ["v2", "models"] or parts[3] != "infer":
                return JSONResponse({"error": f"no route {request.url.path}"}, status_code=404)
            name = serve.get_multiplexed_model_id() or parts[2]
            body = await request.json()
            tensor = body["inputs"][0]
            x = np.asarray(tensor["data"], dtype=np.float64).reshape(tensor["shape"])
            loads, t0 = self.loads, time.perf_counter()
            try:
                model = await self.get_model(name)
            except FileNotFoundError:
                return JSONResponse({"error": f"model {name} not found"}, status_code=404)
            if self.loads != loads:  # this request waited for a load (a hit returns without suspending)
                self.waits += 1
                self.wait_s += time.perf_counter() - t0
            y = model.predict(x)
            return JSONResponse({"model_name": name, "outputs": [
                # a column, as MLServer's numpy codec answers a 1-D prediction
                {"name": "predict", "shape": [len(y), 1] if y.ndim == 1 else list(y.shape), "datatype": "INT64",
                 "data": y.tolist()}]})

    return MultiplexedSklearn.bind(str(store))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, required=True, help="directory of <name>/model.joblib")
    p.add_argument("--max-models", type=int, required=True, help="max_num_models_per_replica")
    p.add_argument("--port", type=int, required=True, help="Serve's HTTP port on 127.0.0.1")
    p.add_argument("--max-ongoing", type=int, default=64, help="max_ongoing_requests of the replica")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    # a short private temp dir: Ray's unix sockets live under it (path length limit)
    temp = tempfile.mkdtemp(prefix="rayp-", dir="/tmp")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
             configure_logging=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own handlers
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app(args.store.resolve(), args.max_models, args.max_ongoing), name="peers", route_prefix="/")
        print("READY " + json.dumps({"port": args.port, "pid": os.getpid()}), flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)  # Ray's session logs and sockets: ~1 MB per run
    return 0


if __name__ == "__main__":
    sys.exit(main())
