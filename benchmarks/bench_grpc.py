"""gRPC benchmark: what the agent's KServe V2 gRPC hop costs, beside its REST hop.

    .venv/bin/python benchmarks/bench_grpc.py                          # defaults (~4 min)
    .venv/bin/python benchmarks/bench_grpc.py --duration 2 --rounds 1 --out ''   # a quick look

One agent with its embedded MLServer serves one small sklearn model (loaded at start). The same
client sends the same request to five targets that all end in the SAME MLServer process:

  grpc-direct  MLServer's own gRPC port (read from the repository's settings.json)
  grpc-agent   the agent's gRPC port (grpc.aio generic handlers -> one channel -> MLServer)
  grpc-bare    a bare grpc.aio pass-through (a generic handler awaiting one channel call, on
               uvloop, nothing else) in its own process: the floor of any grpcio-based hop, as
               nginx is for REST in bench_proxy
  rest-direct  MLServer's HTTP port
  rest-agent   the agent's HTTP port

The gRPC client is grpc.aio with generic bytes-in/bytes-out calls (one pre-serialized
ModelInferRequest: one FP64 row of 4 features); the REST client is aiohttp with the same request
as V2 JSON. Both run on uvloop in this process. Per target: latency p50/p99 at concurrency 1
(sequential calls) and throughput at concurrency 16 (16 tasks on one channel / session), plus
the CPU each process spent per request during the concurrency-16 run. Targets are interleaved
over --rounds rounds and the median of the rounds is reported. Any failed call voids the run.

On a 2-core machine the client, the agent and the server share the cores: throughput through
the agent is bounded by the CPU the agent takes from the server and the client. The results
state the CPU per request of each process and the load average.

Results: benchmarks/results/grpc.md and grpc.json (`--out NAME` for NAME.md/json, '' for none).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    V2_BODY, Agent, command_line, cpu_seconds, free_port, loadavg, machine, machine_md, md_table, write_results,
    write_sklearn_model,
)

MODEL = "iris"
GOAL_RATIO = 0.9
GOAL_ADDED_P50_MS = 0.3
INFER = "/inference.GRPCInferenceService/ModelInfer"
BARE_PROXY = """
import sys, grpc, uvloop

async def main(port, target):
    server = grpc.aio.server()
    upstream = grpc.aio.insecure_channel(target).unary_unary("/inference.GRPCInferenceService/ModelInfer")

    async def forward(request, context):
        return await upstream(request, timeout=30)

    handlers = {"ModelInfer": grpc.unary_unary_rpc_method_handler(forward)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()

uvloop.run(main(sys.argv[1], sys.argv[2]))
"""

Call = Callable[[], Awaitable[None]]


def infer_request_bytes() -> bytes:
    """ModelInferRequest for MODEL: input "x", FP64 [1, 4] (the same row as V2_BODY)."""
    from tritonclient.grpc import service_pb2 as pb

    doc = json.loads(V2_BODY)["inputs"][0]
    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name=doc["name"], datatype=doc["datatype"], shape=doc["shape"])
    tensor.contents.fp64_contents.extend(doc["data"])
    return request.SerializeToString()


class Clients:
    """One grpc.aio channel and one aiohttp session per target, opened once."""

    def __init__(self, targets: dict[str, str]):
        import aiohttp
        import grpc

        self._closers: list[Callable[[], Awaitable[Any]]] = []
        self.calls: dict[str, Call] = {}
        body = infer_request_bytes()
        for name, address in targets.items():
            if name.startswith("grpc"):
                channel = grpc.aio.insecure_channel(address)
                method = channel.unary_unary(INFER)
                self._closers.append(channel.close)
                self.calls[name] = self._grpc_call(method, body)
            else:
                session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
                self._closers.append(session.close)
                self.calls[name] = self._rest_call(session, f"{address}/v2/models/{MODEL}/infer")

    @staticmethod
    def _grpc_call(method: Any, body: bytes) -> Call:
        async def call() -> None:
            await method(body, timeout=30)
        return call

    @staticmethod
    def _rest_call(session: Any, url: str) -> Call:
        headers = {"content-type": "application/json"}

        async def call() -> None:
            async with session.post(url, data=V2_BODY, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url} -> {r.status}")
        return call

    async def close(self) -> None:
        for close in self._closers:
            await close()


async def sequential(call: Call, seconds: float) -> dict[str, float]:
    """Concurrency 1: one call after another for `seconds`; latency percentiles in ms."""
    latencies: list[float] = []
    end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        if t0 >= end:
            break
        await call()
        latencies.append(time.perf_counter() - t0)
    latencies.sort()
    n = len(latencies)
    return {"requests": n, "p50_ms": latencies[n // 2] * 1e3, "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1e3}


async def concurrent(call: Call, seconds: float, concurrency: int, pids: dict[str, int]) -> dict[str, float]:
    """`concurrency` tasks calling in a loop for `seconds`: requests/s and CPU ms per request."""
    count = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < end:
            await call()
            count += 1

    cpu0 = {k: cpu_seconds([pid]) for k, pid in pids.items()}
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    out = {"requests": count, "rps": count / elapsed}
    for k, pid in pids.items():
        out[f"{k}_cpu_ms_per_req"] = (cpu_seconds([pid]) - cpu0[k]) * 1e3 / max(count, 1)
    return out


async def measure(targets: dict[str, str], pids: dict[str, int], args: argparse.Namespace) -> dict[str, list[dict]]:
    clients = Clients(targets)
    runs: dict[str, list[dict]] = {t: [] for t in targets}
    try:
        for call in clients.calls.values():  # warm: connections open, first-call paths taken
            for _ in range(50):
                await call()
        for r in range(args.rounds):
            order = list(targets) if r % 2 == 0 else list(reversed(targets))  # interleaved, both orders
            for name in order:
                c1 = await sequential(clients.calls[name], args.duration)
                c16 = await concurrent(clients.calls[name], args.duration, args.concurrency, pids)
                runs[name].append({"c1": c1, "c16": c16})
                print(f"round {r + 1} {name:12s} p50 {c1['p50_ms']:.3f} ms  c{args.concurrency} {c16['rps']:.0f} req/s", flush=True)
    finally:
        await clients.close()
    return runs


def median_of(runs: list[dict], phase: str, key: str) -> float:
    return statistics.median(run[phase][key] for run in runs)


def summarize(runs: dict[str, list[dict]], pids: dict[str, int]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, rs in runs.items():
        row = {"p50_ms": median_of(rs, "c1", "p50_ms"), "p99_ms": median_of(rs, "c1", "p99_ms"), "rps": median_of(rs, "c16", "rps")}
        for k in pids:
            row[f"{k}_cpu_ms_per_req"] = median_of(rs, "c16", f"{k}_cpu_ms_per_req")
        out[name] = row
    return out


def verdicts(summary: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    rows = []
    for hop, direct_name, proxy, cpu_of in (("grpc via agent", "grpc-direct", "grpc-agent", "agent"),
                                             ("grpc via bare grpc.aio proxy", "grpc-direct", "grpc-bare", "bare"),
                                             ("rest via agent", "rest-direct", "rest-agent", "agent")):
        direct, through = summary[direct_name], summary[proxy]
        ratio = through["rps"] / direct["rps"]
        added = through["p50_ms"] - direct["p50_ms"]
        rows.append({"protocol": hop, "throughput_ratio": ratio, "added_p50_ms": added,
                     "throughput_goal_met": ratio >= GOAL_RATIO, "latency_goal_met": added <= GOAL_ADDED_P50_MS,
                     "agent_cpu_ms_per_req": through[f"{cpu_of}_cpu_ms_per_req"]})
    return rows


def report(m: dict[str, Any], args: argparse.Namespace, summary: dict, rows: list[dict]) -> str:
    table = md_table(
        ["target", "p50 c=1 (ms)", "p99 c=1 (ms)", f"req/s c={args.concurrency}", "agent CPU ms/req", "bare proxy CPU ms/req",
         "server CPU ms/req", "client CPU ms/req"],
        [[t, s["p50_ms"], s["p99_ms"], s["rps"], s["agent_cpu_ms_per_req"], s["bare_cpu_ms_per_req"], s["server_cpu_ms_per_req"],
          s["client_cpu_ms_per_req"]] for t, s in summary.items()])
    goals = md_table(
        ["hop", "throughput hop/direct", f"goal >= {GOAL_RATIO}", "added p50 (ms)", f"goal <= {GOAL_ADDED_P50_MS}", "hop's CPU ms/req"],
        [[r["protocol"], r["throughput_ratio"], "met" if r["throughput_goal_met"] else "NOT met", r["added_p50_ms"],
          "met" if r["latency_goal_met"] else "NOT met", r["agent_cpu_ms_per_req"]] for r in rows])
    return f"""# gRPC hop vs direct (and the REST hop beside it)

Command: `{command_line()}`

{machine_md(m)}
- Rounds: {args.rounds} (interleaved, medians reported), {args.duration:g} s per phase, concurrency {args.concurrency}
- Client: grpc.aio generic bytes calls (gRPC) and aiohttp (REST), in the benchmark process on uvloop;
  one pre-serialized ModelInferRequest / one V2 JSON body (1 row x 4 FP64) to a loaded sklearn model

## Per target (medians)

{table}

## Goals

{goals}

The machine is shared: the load average above shows how much other work ran beside this one.
On 2 cores the client, the agent and MLServer compete for CPU, so the throughput ratio mostly
reflects the CPU per request the hop takes from the other two. The bare grpc.aio proxy row is
the floor of a hop built on grpcio's Python server and channel (the agent's choice); the
agent's row minus it is what the agent itself adds (lease, name read, metrics).
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per phase (c=1, c=16) per target per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out", default="grpc", help="results name under benchmarks/results ('' for none)")
    args = p.parse_args()
    try:
        import uvloop
        loop_run = uvloop.run
    except ImportError:
        loop_run = asyncio.run

    m = machine()
    with tempfile.TemporaryDirectory(prefix="bench-grpc-") as tmp:
        work = Path(tmp)
        write_sklearn_model(work / "models" / MODEL)
        repository = work / "repository"
        with Agent(work, [{"name": MODEL, "uri": str(work / "models" / MODEL)}], "--server-repository", str(repository)) as agent:
            agent.wait_ready()
            agent.wait_models(lambda ms: ms[MODEL]["state"] == "loaded", what="iris loaded")
            server_grpc = f"127.0.0.1:{json.loads((repository / 'settings.json').read_text())['grpc_port']}"
            bare_port = free_port()
            bare = subprocess.Popen([sys.executable, "-c", BARE_PROXY, str(bare_port), server_grpc])
            try:
                targets = {
                    "grpc-direct": server_grpc,
                    "grpc-agent": f"127.0.0.1:{agent.grpc_port}",
                    "grpc-bare": f"127.0.0.1:{bare_port}",
                    "rest-direct": agent.server_url,
                    "rest-agent": agent.url,
                }
                pids = {"agent": agent.proc.pid, "bare": bare.pid, "server": agent.server_pid, "client": os.getpid()}
                runs = loop_run(measure(targets, pids, args))
            finally:
                bare.terminate()
                bare.wait(10)
    m["loadavg_at_end"] = loadavg()
    summary = summarize(runs, pids)
    rows = verdicts(summary)
    text = report(m, args, summary, rows)
    print(text)
    if args.out:
        md, js = write_results(args.out, text, {"machine": m, "args": vars(args), "summary": summary, "goals": rows, "runs": runs})
        print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
