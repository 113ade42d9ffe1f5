"""Fleet agent benchmark (issue 12, item 3): what the picker's state endpoint costs, how fast a
change reaches a long-polling picker, and how long a cold model's first request waits while
the periodic source re-checks of many models are queued, this code beside a baseline ref.

    .venv/bin/python benchmarks/bench_fleet.py                      # about 2 minutes
    .venv/bin/python benchmarks/bench_fleet.py --models 1000 --check-models 300 --baseline-ref main

1. /fleet/state, in process (no servers): the REAL Reconciler, MemoryManager and Cache with
   --models configured models (--loaded of them loaded through the scripted server of
   tests/support/scripted.py); the document built and JSON-encoded --samples times: p50/p99 in
   microseconds, beside the /status document of the same agent (what a picker would otherwise
   poll). Goal (the fleet contract): < 1 ms for 1,000 models.
2. Over HTTP, a real agent (`modelshelf run`, embedded MLServer, --models lazy models on one
   local sklearn dir, `--prefetch preload`): GET /fleet/state p50/p99 beside GET /healthz on the
   same keep-alive connection (the HTTP stack's floor) and GET /status. Goal: /fleet/state
   p50 within 1 ms of /healthz. Then the long poll: `GET /fleet/state?since=SEQ` parked, a
   request for a cold model sent; the time from that request to the poll's answer (the picker
   learns the model is loading). Goal: p50 <= 50 ms.
3. A cold request under queued re-checks (the issue: 300 models, a cold model's first request
   waited 57 s): --check-models models loaded from a slow HTTP source (every answer
   --source-delay late), --pull-concurrency slots, all their periodic source checks triggered,
   then one request for a model never pulled; its latency, and how many checks had run by then.
   The same scenario runs in a subprocess on --baseline-ref (its code from `git archive`),
   where checks and pulls share one first-come-first-served semaphore. Goal: the cold request
   no slower than one check plus its own pull and load (below --source-delay x 4 + 0.5 s).

Results: benchmarks/results/fleet.md and fleet.json. Figures depend on the machine and what else
runs on it (the load average is recorded); it is a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (ROOT, Agent, command_line, loadavg, machine, machine_md, md_table,  # noqa: E402
                               write_results, write_sklearn_model)

V2_BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def micro(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_us": statistics.median(values) * 1e6, "p99_us": pct(values, 0.99) * 1e6}


# ------------------------------------------------------------------ 1. in process
async def _in_process(models: int, loaded: int, samples: int) -> dict[str, Any]:
    from agent.app import Agent as AgentCore
    from agent.config import ConfigResult, ModelSpec
    from agent.memory import MemoryManager
    from agent.reconciler import Reconciler
    from agent.settings import Settings
    from puller import Cache
    from tests.support.scripted import ScriptedAdapter

    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        root = Path(tmp)
        store = root / "store"
        store.mkdir()
        (store / "model.bin").write_bytes(b"x" * 4096)
        s = Settings(config_dir=root / "config", cache_dir=root / "cache", holder="bench", prefetch="preload",
                     resync_interval_s=3600.0, min_residency_s=0.0)
        core = AgentCore(s)
        core.cache = Cache(s.cache_dir, holder="bench")
        core.memory = MemoryManager({"host": 2**40}, store=core.cache, min_model_bytes=1)
        core.adapter = ScriptedAdapter()
        core.reconciler = Reconciler(s, core.cache, core.adapter, core.memory, core.metrics)
        core.reconciler.on_change = core.fleet.bump
        rec = core.reconciler
        await rec.start()
        specs = {f"m{i:05d}": ModelSpec(name=f"m{i:05d}", source=str(store), preload=False) for i in range(models)}
        await rec.apply(ConfigResult(models=specs, errors=(), file="models.json", digest="1"))
        await rec.wait_idle(120)
        for name in list(specs)[:loaded]:
            rec.release(await rec.acquire(name))
        await rec.wait_idle(120)

        def timed(fn) -> list[float]:
            out = []
            for _ in range(samples):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
            return out

        fleet = timed(core.fleet.body)
        status = timed(lambda: json.dumps(core.status()).encode())
        size = len(core.fleet.body())
        await rec.close()
    return {"models": models, "loaded": loaded, "fleet_state": micro(fleet), "status": micro(status), "bytes": size}


# ------------------------------------------------------------------ 2. over HTTP
class Conn:
    def __init__(self, url: str):
        import http.client

        host, port = url.removeprefix("http://").split(":")
        self.c = http.client.HTTPConnection(host, int(port), timeout=60)

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, float]:
        t0 = time.perf_counter()
        self.c.request(method, path, body=body, headers={"content-type": "application/json"} if body else {})
        r = self.c.getresponse()
        data = r.read()
        return r.status, data, time.perf_counter() - t0


def _over_http(work: Path, models: int, samples: int, polls: int) -> dict[str, Any]:
    write_sklearn_model(work / "store" / "m", "tree", 1)
    config = [{"name": f"m{i:05d}", "uri": str(work / "store" / "m"), "preload": False} for i in range(models)]
    with Agent(work, config, "--prefetch", "preload", "--min-residency", "0") as agent:
        agent.wait_ready(300)
        c = Conn(agent.url)
        lat: dict[str, list[float]] = {"/healthz": [], "/fleet/state": [], "/status": []}
        for _ in range(samples):  # interleaved, so a disturbance hits all three alike
            for path in lat:
                status, _, dt = c.call("GET", path)
                assert status == 200, path
                lat[path].append(dt)
        wake = []
        for i in range(polls):
            seq = json.loads(c.call("GET", "/fleet/state")[1])["seq"]
            answered: dict[str, float] = {}

            def poll() -> None:
                with urllib.request.urlopen(f"{agent.url}/fleet/state?since={seq}", timeout=30) as r:
                    r.read()
                answered["at"] = time.perf_counter()

            t = threading.Thread(target=poll)
            t.start()
            time.sleep(0.2)  # parked on the agent
            sent = time.perf_counter()
            status, _, _ = c.call("POST", f"/v2/models/m{i:05d}/infer", V2_BODY)
            t.join(30)
            assert status == 200 and "at" in answered
            wake.append(answered["at"] - sent)
    ms = {p: {"p50_ms": statistics.median(v) * 1e3, "p99_ms": pct(v, 0.99) * 1e3} for p, v in lat.items()}
    return {"models": models, "samples": samples, "latency": ms,
            "wake_ms": {"n": len(wake), "p50": statistics.median(wake) * 1e3, "max": max(wake) * 1e3}}


# ------------------------------------------------------------------ 3. cold request under re-checks
SCENARIO = r'''
import asyncio, json, sys, time
sys.path.insert(0, ".")
from agent.config import ConfigResult, ModelSpec
from agent.memory import MemoryManager
from agent.metrics import Metrics
from agent.reconciler import Reconciler
from agent.settings import Settings
from puller import Cache
from tests.support.httpserver import HTTPFileServer
from tests.support.scripted import ScriptedAdapter

n, delay, slots, tmp = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

async def main():
    with HTTPFileServer() as http:
        for i in range(n + 1):
            http.set_file(f"m{i}/model.bin", b"m%d" % i * 1000)
        s = Settings(config_dir=tmp + "/config", cache_dir=tmp + "/cache", holder="bench")
        s.pull_concurrency, s.resync_interval_s, s.min_residency_s, s.load_timeout_s = slots, 3600.0, 0.0, 600.0
        cache = Cache(s.cache_dir, holder="bench")
        memory = MemoryManager({"host": 2**40}, store=cache, min_model_bytes=1)
        rec = Reconciler(s, cache, ScriptedAdapter(), memory, Metrics())
        await rec.start()
        specs = {f"m{i}": ModelSpec(name=f"m{i}", source=http.url(f"m{i}/model.bin")) for i in range(n)}
        await rec.apply(ConfigResult(models=specs, errors=(), file="models.json", digest="1"))
        await rec.wait_idle(600)
        cold = ModelSpec(name="cold", source=http.url(f"m{n}/model.bin"), preload=False)
        await rec.apply(ConfigResult(models={**specs, "cold": cold}, errors=(), file="models.json", digest="2"))
        await rec.wait_idle(600)
        rec.models["cold"].entry = None  # never pulled here (the baseline pulls every model ahead)
        http.delay_s = delay
        start = len(http.requests)
        rec.refresh_sources()
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        rec.release(await rec.acquire("cold"))
        took = time.perf_counter() - t0
        checks = sum(1 for _, p, _ in http.requests[start:] if not p.lstrip("/").startswith(f"m{n}/"))
        http.delay_s = 0.0
        await rec.close()
        print(json.dumps({"cold_request_s": took, "checks_done": checks, "checks": n}))

asyncio.run(main())
'''


def _cold_under_checks(tree: Path, n: int, delay: float, slots: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-fleet-cold-") as tmp:
        out = subprocess.run([sys.executable, "-c", SCENARIO, str(n), str(delay), str(slots), tmp], cwd=tree,
                             capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"scenario failed in {tree}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _baseline_tree(ref: str, dest: Path) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", "--format=tar", ref, "agent", "puller", "tests/support", "tests/__init__.py"],
                             cwd=ROOT, capture_output=True, check=True).stdout
    dest.mkdir(parents=True)
    (dest / "x.tar").write_bytes(archive)
    with tarfile.open(dest / "x.tar") as t:
        t.extractall(dest)
    return commit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=1000, help="configured models for parts 1 and 2")
    ap.add_argument("--loaded", type=int, default=100, help="of them loaded, in part 1")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--polls", type=int, default=20)
    ap.add_argument("--check-models", type=int, default=300)
    ap.add_argument("--source-delay", type=float, default=0.05, help="seconds every answer of the slow source is late")
    ap.add_argument("--pull-concurrency", type=int, default=4)
    ap.add_argument("--baseline-ref", default="main")
    ap.add_argument("--out", default="fleet")
    args = ap.parse_args()

    m = machine()
    part1 = asyncio.run(_in_process(args.models, args.loaded, args.samples))
    with tempfile.TemporaryDirectory(prefix="bench-fleet-http-") as tmp:
        part2 = _over_http(Path(tmp), args.models, args.samples, args.polls)
    cold = {"this": _cold_under_checks(ROOT, args.check_models, args.source_delay, args.pull_concurrency)}
    with tempfile.TemporaryDirectory(prefix="bench-fleet-base-") as tmp:
        commit = _baseline_tree(args.baseline_ref, Path(tmp) / "tree")
        cold["baseline"] = _cold_under_checks(Path(tmp) / "tree", args.check_models, args.source_delay, args.pull_concurrency)
    m["loadavg_at_end"] = loadavg()

    fs, st = part1["fleet_state"], part1["status"]
    lat = part2["latency"]
    added = lat["/fleet/state"]["p50_ms"] - lat["/healthz"]["p50_ms"]
    bound = args.source_delay * 4 + 0.5
    goals = [
        ("state document, in process", f"{args.models:,} models: p50 {fs['p50_us']:.0f} us, p99 {fs['p99_us']:.0f} us "
         f"(/status {st['p50_us']:.0f} us: {st['p50_us'] / fs['p50_us']:.1f}x)", "< 1 ms", fs["p50_us"] < 1000),
        ("GET /fleet/state over HTTP", f"p50 {lat['/fleet/state']['p50_ms']:.2f} ms, /healthz {lat['/healthz']['p50_ms']:.2f} ms "
         f"(+{added:.2f} ms)", "within 1 ms of /healthz", added <= 1.0),
        ("long poll wakes on a change", f"p50 {part2['wake_ms']['p50']:.1f} ms, max {part2['wake_ms']['max']:.1f} ms",
         "p50 <= 50 ms", part2["wake_ms"]["p50"] <= 50),
        ("cold request, re-checks queued", f"{cold['this']['cold_request_s']:.2f} s ({cold['this']['checks_done']} of "
         f"{args.check_models} checks done); {args.baseline_ref} ({commit}): {cold['baseline']['cold_request_s']:.2f} s "
         f"({cold['baseline']['checks_done']} done), {cold['baseline']['cold_request_s'] / cold['this']['cold_request_s']:.0f}x",
         f"<= {bound:.2f} s", cold["this"]["cold_request_s"] <= bound),
    ]
    verdict = "Verdict: " + ("every goal met" if all(g[3] for g in goals) else
                             "missed: " + ", ".join(g[0] for g in goals if not g[3]))
    md = "\n\n".join([
        "# Fleet agent: state endpoint, long poll, cold request under re-checks (issue 12, item 3)",
        verdict,
        md_table(["what", "measured", "goal", "met"], [(g[0], g[1], g[2], "met" if g[3] else "MISSED") for g in goals]),
        machine_md(m) + "\n- The machine is shared with other engineers' runs: see the load average.",
        f"- Command: `{command_line()}`",
        f"- Part 1: {args.models:,} models, {args.loaded} loaded (scripted server), {args.samples} samples; document "
        f"{part1['bytes']:,} bytes. Part 2: real agent, embedded MLServer, {args.models:,} lazy models, "
        f"{args.samples} interleaved GETs per path on one keep-alive connection:",
        md_table(["path", "p50 ms", "p99 ms"], [(p, v["p50_ms"], v["p99_ms"]) for p, v in lat.items()]),
        f"- Part 3: {args.check_models} loaded models on an HTTP source answering {args.source_delay * 1000:.0f} ms late, "
        f"--pull-concurrency {args.pull_concurrency}, every source check triggered, then one request for a model not "
        f"pulled here. The baseline runs the same scenario on `{args.baseline_ref}` ({commit}), where source checks and "
        f"a request's pull share one first-come-first-served semaphore.",
    ])
    data = {"machine": m, "command": command_line(), "args": vars(args), "in_process": part1, "http": part2,
            "cold": cold, "baseline_commit": commit, "goals": [{"what": g[0], "measured": g[1], "goal": g[2], "met": g[3]} for g in goals],
            "verdict": verdict}
    print(f"{md}\n\nwrote {write_results(args.out, md, data)[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
