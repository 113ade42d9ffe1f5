"""The Python cost of one fast-path request in the agent, in process: no sockets, no server.

    .venv/bin/python benchmarks/bench_hop_python.py                       # this checkout
    .venv/bin/python benchmarks/bench_hop_python.py --src OLD --src .     # before/after, alternated

bench_proxy measures the hop end to end (the agent's CPU per request beside nginx's), but on a
shared 2-core machine that figure moves ±15 % between runs of the same code. This script
measures only what the agent's own Python spends on one plain infer request, which a change to
the fast path moves and nothing else does: the public protocol (agent.app) reads the request
bytes, the router (agent.router) leases the model and hands it to the upstream pool
(agent.upstream), whose connection reads MLServer's answer (its real bytes: the head and the
body in two reads, as MLServer writes them) and the answer is written to the client. The
transports are stand-ins that keep what is written (no syscalls: those are the same for any
code, and bench_proxy counts them), and the reconciler is a stub doing the same lease steps as
Reconciler.try_acquire/release. Each source tree runs in its own interpreter; the figure is the
minimum over repeats of the mean over a batch (the least disturbed batch). Code that ends the
upstream request through a Future needs a loop turn per request, which is counted (it is part
of that design's cost).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# MLServer 1.7.1's answer to bench_proxy's request (as read from its port), cut where it cuts it
ANSWER_HEAD = (b"HTTP/1.1 200 OK\r\ndate: Wed, 02 Dec 2026 20:04:45 GMT\r\nserver: uvicorn\r\ncontent-length: 191\r\n"
               b"content-type: application/json\r\nce-specversion: 0.3\r\nce-source: io.seldon.serving.deployment.mlserver\r\n"
               b"ce-type: io.seldon.serving.inference.response\r\nce-modelid: iris\r\nce-inferenceservicename: mlserver\r\n"
               b"ce-endpoint: iris\r\nce-id: b58c6842-1dc7-4f34-8e48-e386bb02809b\r\n"
               b"ce-requestid: b58c6842-1dc7-4f34-8e48-e386bb02809b\r\n\r\n")
ANSWER_BODY = (b'{"model_name":"iris","id":"b58c6842-1dc7-4f34-8e48-e386bb02809b","parameters":{},"outputs":[{"name":'
               b'"predict","shape":[1,1],"datatype":"INT64","parameters":{"content_type":"np"},"data":[0]}]}')
V2 = b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]}'
REQUEST = (b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(V2), V2))  # what wrk sends in bench_proxy

_CHILD = r'''
import asyncio, json, sys, time
sys.path.insert(0, SRC)
from uvicorn.server import ServerState
from agent import app as appmod, upstream as up
from agent.metrics import Metrics
from agent.router import Router
from agent.settings import Settings


class Transport:
    def __init__(self): self.out = []
    def write(self, b): self.out.append(b)
    def close(self): pass
    def is_closing(self): return False
    def get_extra_info(self, *a, **k): return None
    def pause_reading(self): pass
    def resume_reading(self): pass


class Event:
    def set(self): pass
    def clear(self): pass
    def is_set(self): return True


class Spec:
    name, version = "iris", None


class Model:
    def __init__(self):
        self.removed = self.draining = False
        self.state, self.inflight, self.requests, self.last_used = "loaded", 0, 0, 0.0
        self.idle, self.spec = Event(), Spec()

    @property
    def name(self): return self.spec.name


class Reconciler:  # the lease steps of agent.reconciler.Reconciler.try_acquire/_lease/release
    def __init__(self, settings):
        self.settings, self.models, self.applied_once = settings, {"iris": Model()}, Event()
        self._inflight, self._hit_count = {}, 0

    def try_acquire(self, name):
        m = self.models.get(name)
        if m is None or m.removed or m.state != "loaded" or m.draining:
            return None
        m.inflight += 1
        self._inflight[m.name] = self._inflight.get(m.name, 0) + 1
        m.requests += 1
        m.idle.clear()
        m.last_used = time.monotonic()
        self._hit_count += 1
        return m

    def release(self, m):
        m.inflight -= 1
        self._inflight[m.name] -= 1
        m.last_used = time.monotonic()
        if m.inflight == 0:
            m.idle.set()


async def main():
    loop = asyncio.get_running_loop()
    settings = Settings(config_dir="/nonexistent", cache_dir="/nonexistent")
    router = Router(Reconciler(settings), lambda: "http://127.0.0.1:1", Metrics(), server_ready=lambda: True)
    await router.start()
    pool = router._upstream
    conn = up._Conn()
    conn.connection_made(Transport())
    if hasattr(conn, "pool"):
        conn.pool = pool
    pool._all.add(conn)
    conn.idle_since = time.monotonic()
    pool._idle.append(conn)
    config = appmod._server((lambda scope, receive, send: None), settings, lambda: router).config
    config.load()
    state = ServerState()
    state.default_headers = [(b"date", b"Wed, 02 Dec 2026 20:04:45 GMT"), (b"server", b"uvicorn")]
    proto = config.http_protocol_class(config=config, server_state=state, app_state={}, _loop=loop)
    client = Transport()
    proto.connection_made(client)
    future_based = not hasattr(conn, "start_now")

    async def one():
        proto.data_received(REQUEST)
        conn.data_received(HEAD)
        conn.data_received(BODY)
        if future_based:
            await asyncio.sleep(0)  # the answer's done-callback runs on the next loop turn

    for _ in range(200):
        await one()
    assert client.out[-1].startswith(b"HTTP/1.1 200 OK") and client.out[-1].endswith(BODY), client.out[-1]
    best = float("inf")
    for _ in range(REPEATS):
        client.out.clear()
        t0 = time.perf_counter()
        for _ in range(BATCH):
            await one()
        best = min(best, (time.perf_counter() - t0) / BATCH)
    assert len(client.out) == BATCH and router.fast_answers == 200 + REPEATS * BATCH
    print(json.dumps({"us_per_request": round(best * 1e6, 2), "future_based": future_based}))

import uvloop
uvloop.run(main())
'''


def run_one(src: Path, repeats: int, batch: int) -> dict:
    code = (f"SRC = {str(src)!r}\nREPEATS = {repeats}\nBATCH = {batch}\nREQUEST = {REQUEST!r}\n"
            f"HEAD = {ANSWER_HEAD!r}\nBODY = {ANSWER_BODY!r}\n" + _CHILD)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(src))
    if out.returncode != 0:
        raise SystemExit(f"{src}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", action="append", type=Path, help="a source tree (repeat for before/after; default: this checkout)")
    p.add_argument("--runs", type=int, default=3, help="interpreters per source tree, alternated")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--batch", type=int, default=500)
    args = p.parse_args(argv)
    srcs = [s.resolve() for s in (args.src or [ROOT])]
    results: dict[str, list[float]] = {str(s): [] for s in srcs}
    for _ in range(args.runs):
        for s in srcs:
            r = run_one(s, args.repeats, args.batch)
            results[str(s)].append(r["us_per_request"])
    for i, s in enumerate(srcs):
        figures = results[str(s)]
        print(f"source {i + 1} ({s.name}): {min(figures):.2f} µs of Python per fast-path request (runs: {figures})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
