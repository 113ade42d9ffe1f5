"""Density benchmark: many more small models configured than fit, Zipf traffic, LRU eviction.

    .venv/bin/python benchmarks/bench_density.py                   # defaults (~10 min on 2 cores)
    .venv/bin/python benchmarks/bench_density.py --requests 1000 --warmup-requests 300 --ratios 1.0,1.5   # quick look

Set-up: --models (1,000) tiny sklearn classifiers, each its own directory with its own bytes (one
logistic regression fitted once, then each copy's intercept nudged, so 1,000 distinct cache
entries; fitting 1,000 separately would only add minutes). Every model declares
`memory: --model-memory` (10Mi) and `preload: false`; the host budget is
`--capacity x --model-memory + O + --model-memory/2`, where O is the server-level overhead the
agent charges on the first sklearn load in a server process (agent/memory.py: the RSS the runtime
import takes beyond the model's reservation, never freed by eviction), measured by a
calibration agent first. The half-model margin absorbs the noise of O between server processes.
So the budget holds exactly --capacity (100) models; each run checks that and reports it.

One run = a fresh agent (embedded MLServer) over N configured models:
  1. calibrate: one request to the most popular model alone, so the first sklearn load is
     measured alone and its overhead is charged (a first load overlapping another one is not);
  2. warm-up (not measured): one request to each of the min(N, capacity) most popular models,
     then --warmup-requests Zipf requests;
  3. measured: --requests Zipf (s = --zipf-s) requests from --clients concurrent clients, each
     with one keep-alive connection. Popularity ranks are a seeded random permutation of the
     models, the same for every run.
Reported per run: latency p50/p95/p99/max of the measured requests (client side, ms), non-200
answers, loaded-set hit ratio and evictions (agent /metrics deltas), mean cold start, RSS of the
agent process and of the server process tree (peak and end, psutil), the budget in use.

Runs: N = --models (the headline run), then N = ratio x capacity for each --ratios (1.0, 1.1,
1.2, 1.5: configured / fitting). Goal: p95 at ratio 1.5 <= 3x the p95 at ratio 1.0.

--min-residency (default 0.25 s; the agent's default is 30 s): a model loaded less than this ago
is not evicted for a lazy load; the request gets 503 instead. Its job is to stop two models that
cannot both fit from evicting each other on every request. Under Zipf traffic with 100 slots the
loaded set turns over in about a second at the miss rates seen here, so a residency near that
would turn most misses into 503s; 30 s would stop nearly all evictions. 0.25 s keeps the guard
armed against ping-pong while letting the LRU work. --min-residency 0 switches it off.

Memory is compared with one MLServer per model: one standalone MLServer holding one of these
models (after one inference) is measured, and multiplied by N.

Results: benchmarks/results/density.md, density.json and density.png (p50/p95/p99 vs ratio;
matplotlib, skipped with a note when it is not installed).
"""
from __future__ import annotations

import argparse
import http.client as httpclient
import math
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    MI, RESULTS, V2_BODY, Agent, StandaloneMLServer, command_line, http, loadavg, machine, machine_md, md_table,
    tree_rss, write_results,
)

GOAL_P95_FACTOR = 3.0


# ---------------------------------------------------------------------------------- models
def write_models(store: Path, count: int) -> list[Path]:
    """`count` model dirs, each with a distinct model.joblib (one fit, intercepts nudged)."""
    import copy

    import joblib
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    dirs = [store / f"m{i:04d}" for i in range(count)]
    todo = [d for d in dirs if not (d / "model.joblib").exists()]
    if not todo:
        return dirs
    rng = np.random.default_rng(0)
    centers = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]])
    X = np.concatenate([c + 0.3 * rng.standard_normal((50, 4)) for c in centers])
    y = np.repeat([0, 1, 2], 50)
    base = LogisticRegression(max_iter=500).fit(X, y)
    for d in todo:
        i = int(d.name[1:])
        model = copy.deepcopy(base)
        model.intercept_ = model.intercept_ + 1e-6 * i  # distinct bytes, same behaviour
        d.mkdir(parents=True, exist_ok=True)
        joblib.dump(model, d / "model.joblib")
    return dirs


def model_entries(dirs: list[Path], n: int, memory: str) -> list[dict[str, Any]]:
    return [{"name": d.name, "uri": str(d), "runtime": "sklearn", "memory": memory, "preload": False} for d in dirs[:n]]


# ---------------------------------------------------------------------------------- traffic
def zipf_sequence(names: list[str], count: int, s: float, seed: int) -> list[str]:
    """`count` model names drawn with P(rank k) ~ 1/k^s; ranks are a seeded shuffle of names."""
    rng = random.Random(seed)
    ranked = list(names)
    rng.shuffle(ranked)
    weights = [1.0 / (k ** s) for k in range(1, len(ranked) + 1)]
    return rng.choices(ranked, weights=weights, k=count)


def popular(names: list[str], seed: int) -> list[str]:
    """The same permutation zipf_sequence uses: most popular first."""
    rng = random.Random(seed)
    ranked = list(names)
    rng.shuffle(ranked)
    return ranked


def drive(base_url: str, sequence: list[str], clients: int, timeout: float = 120) -> list[tuple[float, int, str]]:
    """Send one V2 infer per name in `sequence` from `clients` threads, each on one keep-alive
    connection. Returns (latency seconds, status, name) per request, in completion order."""
    host, port = base_url.split("//", 1)[1].split(":")
    lock = threading.Lock()
    it = iter(sequence)
    out: list[tuple[float, int, str]] = []
    headers = {"content-type": "application/json", "content-length": str(len(V2_BODY))}

    def client() -> None:
        conn = httpclient.HTTPConnection(host, int(port), timeout=timeout)
        local: list[tuple[float, int, str]] = []
        try:
            while True:
                with lock:
                    name = next(it, None)
                if name is None:
                    break
                t0 = time.perf_counter()
                try:
                    conn.request("POST", f"/v2/models/{name}/infer", V2_BODY, headers)
                    resp = conn.getresponse()
                    resp.read()
                    status = resp.status
                except (OSError, httpclient.HTTPException):
                    conn.close()
                    conn = httpclient.HTTPConnection(host, int(port), timeout=timeout)
                    status = 0
                local.append((time.perf_counter() - t0, status, name))
        finally:
            conn.close()
            with lock:
                out.extend(local)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


class RssSampler:
    """Peak RSS of the agent process and of the server tree, sampled every `interval` s."""

    def __init__(self, agent_pid: int, server_pid: int, interval: float = 0.5):
        import psutil

        self._agent = psutil.Process(agent_pid)
        self._server_pid = server_pid
        self.interval = interval
        self.peak_agent = self.peak_server = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int]:
        a = self._agent.memory_info().rss
        s = tree_rss(self._server_pid)
        self.peak_agent, self.peak_server = max(self.peak_agent, a), max(self.peak_server, s)
        return a, s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # the process went away at the end of the run
                return

    def __enter__(self) -> "RssSampler":
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join(5)


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = max(0, min(len(v) - 1, math.ceil(q / 100.0 * len(v)) - 1))
    return v[k]


def _metric(m: dict[str, float], key: str) -> float:
    return m.get(key, 0.0)


# ---------------------------------------------------------------------------------- one run
def calibrate_overhead(work: Path, dirs: list[Path], args: argparse.Namespace) -> int:
    """Bytes the agent charges to the server on the first sklearn load (see module doc): the
    runtime's import alone (no allocator reserve, --server-malloc-keep 0: a reserve takes its
    bytes from the models' share of the budget, as it would for a user)."""
    mem = int(args.model_memory_bytes)
    agent = Agent(work / "calibrate", model_entries(dirs, 1, args.model_memory), "--host-memory", "4Gi",
                  "--min-residency", "0", "--resync-interval", "600", "--server-malloc-keep", "0", entry=args.entry)
    try:
        agent.wait_ready()
        agent.wait_models(lambda ms: all(m["state"] == "cached" for m in ms.values()), 60, "cached")
        status, body = http("POST", f"{agent.url}/v2/models/{dirs[0].name}/infer", V2_BODY, {"content-type": "application/json"})
        if status != 200:
            raise RuntimeError(f"calibration request failed: {status} {body[:300]!r}")
        used = agent.status()["memory"]["host"]["used"]
    finally:
        agent.stop()
    return max(0, used - mem)


def one_run(work: Path, dirs: list[Path], n: int, budget: int, args: argparse.Namespace, label: str) -> dict[str, Any]:
    names = [d.name for d in dirs[:n]]
    ranked = popular(names, args.seed)
    warm = ranked[:min(n, args.capacity)] + zipf_sequence(names, args.warmup_requests, args.zipf_s, args.seed + 1)
    measured = zipf_sequence(names, args.requests, args.zipf_s, args.seed + 2)
    la_start = loadavg()
    agent = Agent(work / "agent", model_entries(dirs, n, args.model_memory), "--host-memory", str(budget),
                  "--min-residency", f"{args.min_residency:g}", "--resync-interval", "600", "--load-timeout", "60",
                  entry=args.entry)
    t_start = time.monotonic()
    try:
        agent.wait_ready(180)
        agent.wait_models(lambda ms: len(ms) == n and all(m["state"] == "cached" for m in ms.values()), 300,
                          f"{n} models cached")
        ready_s = time.monotonic() - t_start
        server_pid = agent.server_pid
        # 1. the first sklearn load alone, so its runtime overhead is charged as in calibration
        status, body = http("POST", f"{agent.url}/v2/models/{ranked[0]}/infer", V2_BODY, {"content-type": "application/json"})
        if status != 200:
            raise RuntimeError(f"{label}: first request failed: {status} {body[:300]!r}")
        st = agent.status()
        overhead = st["memory"]["host"]["used"] - sum((m["memory"] or {}).get("host", 0) for m in st["models"].values())
        # 2. warm-up
        warm_res = drive(agent.url, warm, args.clients)
        # 3. measured
        m0 = agent.metrics()
        with RssSampler(agent.proc.pid, server_pid) as rss:
            rss.sample()
            t0 = time.monotonic()
            res = drive(agent.url, measured, args.clients)
            wall = time.monotonic() - t0
            agent_rss_end, server_rss_end = rss.sample()
        m1 = agent.metrics()
        st = agent.status()
    finally:
        agent.stop()
    lat_ok = [lat * 1000 for lat, code, _ in res if code == 200]
    if len(lat_ok) < len(res) // 2:
        raise RuntimeError(f"{label}: only {len(lat_ok)} of {len(res)} requests succeeded; see {agent.log_path}")
    lat_all = [lat * 1000 for lat, _, _ in res]
    codes: dict[str, int] = {}
    for _, code, _ in res:
        codes[str(code)] = codes.get(str(code), 0) + 1
    hits = _metric(m1, 'modelshelf_loaded_lookups_total{result="hit"}') - _metric(m0, 'modelshelf_loaded_lookups_total{result="hit"}')
    misses = _metric(m1, 'modelshelf_loaded_lookups_total{result="miss"}') - _metric(m0, 'modelshelf_loaded_lookups_total{result="miss"}')
    cs_sum = _metric(m1, "modelshelf_cold_start_seconds_sum") - _metric(m0, "modelshelf_cold_start_seconds_sum")
    cs_n = _metric(m1, "modelshelf_cold_start_seconds_count") - _metric(m0, "modelshelf_cold_start_seconds_count")
    def hist_mean_ms(name: str) -> float | None:
        n_ = _metric(m1, f"{name}_count") - _metric(m0, f"{name}_count")
        return round(1000 * (_metric(m1, f"{name}_sum") - _metric(m0, f"{name}_sum")) / n_, 1) if n_ else None

    loaded = [m for m in st["models"].values() if m["state"] == "loaded"]
    costs = sorted({(m["memory"] or {}).get("host", 0) for m in loaded})
    run = {
        "label": label, "configured": n, "ratio": round(n / args.capacity, 3),
        "requests": len(res), "status_counts": codes, "warmup_requests": len(warm),
        "warmup_non_200": sum(1 for _, c, _ in warm_res if c != 200),
        "p50_ms": round(_pct(lat_ok, 50), 2), "p95_ms": round(_pct(lat_ok, 95), 2), "p99_ms": round(_pct(lat_ok, 99), 2),
        "max_ms": round(max(lat_ok), 1) if lat_ok else None, "mean_ms": round(statistics.fmean(lat_ok), 2) if lat_ok else None,
        "p95_all_ms": round(_pct(lat_all, 95), 2),
        "throughput_rps": round(len(res) / wall, 1), "wall_s": round(wall, 1),
        "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None, "hits": int(hits), "misses": int(misses),
        "evictions": int(_metric(m1, "modelshelf_evictions_total") - _metric(m0, "modelshelf_evictions_total")),
        "loads_ok": int(_metric(m1, 'modelshelf_loads_total{result="ok"}') - _metric(m0, 'modelshelf_loads_total{result="ok"}')),
        "cold_start_mean_ms": round(1000 * cs_sum / cs_n, 1) if cs_n else None,
        "server_load_mean_ms": hist_mean_ms("modelshelf_load_seconds"),
        "server_unload_mean_ms": hist_mean_ms("modelshelf_unload_seconds"),
        "loaded_at_end": len(loaded), "model_costs_at_end": costs,
        "memory_used": st["memory"]["host"]["used"], "memory_budget": st["memory"]["host"]["budget"],
        "server_overhead_charged": overhead,
        "rss_agent_end": agent_rss_end, "rss_server_end": server_rss_end,
        "rss_agent_peak": rss.peak_agent, "rss_server_peak": rss.peak_server,
        "agent_ready_s": round(ready_s, 1), "loadavg_start": la_start, "loadavg_end": loadavg(),
    }
    print(f"{label}: N={n} p50={run['p50_ms']} p95={run['p95_ms']} p99={run['p99_ms']} hit={run['hit_ratio']} "
          f"evictions={run['evictions']} codes={codes} loaded={len(loaded)} rss agent={agent_rss_end / MI:.0f}Mi "
          f"server={server_rss_end / MI:.0f}Mi wall={wall:.1f}s load={run['loadavg_end'][0]}", flush=True)
    return run


def one_server_per_model(work: Path, model_dir: Path) -> dict[str, Any]:
    """RSS of a standalone MLServer holding one model, after one inference."""
    srv = StandaloneMLServer(work / "standalone", {model_dir.name: model_dir})
    try:
        srv.wait_ready(90)
        status, body = http("POST", f"{srv.url}/v2/models/{model_dir.name}/infer", V2_BODY, {"content-type": "application/json"})
        if status != 200:
            raise RuntimeError(f"standalone MLServer: {status} {body[:300]!r}")
        time.sleep(1.0)
        rss = tree_rss(srv.proc.pid)
    finally:
        srv.stop()
    return {"rss_one_server_one_model": rss}


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=1000, help="configured models in the headline run")
    p.add_argument("--capacity", type=int, default=100, help="models the host budget holds")
    p.add_argument("--model-memory", default="10Mi", help="declared memory of every model")
    p.add_argument("--ratios", default="1.0,1.1,1.2,1.5", help="configured/fitting ratios to run ('' = none)")
    p.add_argument("--requests", type=int, default=3000, help="measured requests per run")
    p.add_argument("--warmup-requests", type=int, default=1000, help="Zipf warm-up requests per run (after one per popular model)")
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--min-residency", type=float, default=0.25, help="agent --min-residency for every run (s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-headline", action="store_true", help="skip the --models run (ratios only)")
    p.add_argument("--agent-entry", default=None, help="command that takes `run ...` args (default: python -m agent.cli)")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where result files go")
    p.add_argument("--out", default="density", help="result name under benchmarks/results/ ('' = don't write)")
    p.add_argument("--workdir", type=Path, default=None, help="reuse a dir (models, cache) across invocations")
    args = p.parse_args(argv)
    from agent.quantity import parse_quantity

    args.model_memory_bytes = parse_quantity(args.model_memory)
    args.entry = shlex.split(args.agent_entry) if args.agent_entry else None
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    counts = ([] if args.no_headline else [("headline", args.models)]) + [(f"ratio {r:g}", round(r * args.capacity)) for r in ratios]
    need = max(n for _, n in counts)

    info = machine()
    t_all = time.monotonic()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-density-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    dirs = write_models(work / "store", need)
    write_s = time.monotonic() - t0
    print(f"{need} model dirs ready in {write_s:.1f}s under {work}", flush=True)
    overhead = calibrate_overhead(work, dirs, args)
    budget = args.capacity * args.model_memory_bytes + overhead + args.model_memory_bytes // 2
    print(f"calibrated server overhead {overhead / MI:.1f}Mi -> --host-memory {budget} bytes ({budget / MI:.1f}Mi)", flush=True)
    runs = [one_run(work, dirs, n, budget, args, label) for label, n in counts]
    per_model = one_server_per_model(work, dirs[0])
    info["loadavg_at_end"] = loadavg()
    base = next((r for r in runs if r["label"] == "ratio 1"), None)
    top = next((r for r in runs if r["label"] == "ratio 1.5"), None)
    goal = None
    if base and top:
        factor = top["p95_ms"] / base["p95_ms"] if base["p95_ms"] else None
        goal = {"base_p95_ms": base["p95_ms"], "ratio_1_5_p95_ms": top["p95_ms"], "factor": round(factor, 2) if factor else None,
                "goal_factor": GOAL_P95_FACTOR, "met": bool(factor is not None and factor <= GOAL_P95_FACTOR)}
    data = {"benchmark": "density", "command": command_line(), "machine": info,
            "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "entry")},
            "model_dirs_written": need, "model_write_s": round(write_s, 1),
            "calibrated_overhead_bytes": overhead, "host_budget_bytes": budget,
            "runs": runs, "one_server_per_model": per_model, "p95_goal": goal,
            "total_s": round(time.monotonic() - t_all, 1)}
    md = _markdown(data)
    print(md)
    if args.out:
        plot = _plot(runs, args.results_dir / f"{args.out}.png")
        data["plot"] = plot
        paths = write_results(args.out, md + (f"\n![latency vs ratio]({args.out}.png)\n" if plot else "\n(no plot: matplotlib is not installed)\n"), data, args.results_dir)
        print("wrote", *[str(x) for x in paths], plot or "")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _plot(runs: list[dict[str, Any]], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pts = sorted((r for r in runs if r["label"].startswith("ratio")), key=lambda r: r["ratio"])
    if not pts:
        return None
    xs = [r["ratio"] for r in pts]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
        ax.plot(xs, [r[key] for r in pts], style, label=key.split("_")[0])
    ax.set_xlabel("configured / fitting models")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"modelshelf dense serving: {pts[0]['configured']} fit, Zipf traffic")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def _markdown(data: dict[str, Any]) -> str:
    st, runs = data["settings"], data["runs"]
    one = data["one_server_per_model"]["rss_one_server_one_model"]
    lines = [
        "# Density benchmark: many small models, a budget that holds a few, Zipf traffic",
        "",
        f"Command: `{data['command']}`",
        "",
        machine_md(data["machine"]),
        f"- Models: {data['model_dirs_written']} distinct sklearn model dirs (one fit, intercepts nudged; written in "
        f"{data['model_write_s']} s), each `memory: {st['model_memory']}`, `preload: false`.",
        f"- Budget: `--host-memory {data['host_budget_bytes']}` = {st['capacity']} × {st['model_memory']} + "
        f"{data['calibrated_overhead_bytes'] / MI:.1f} MiB server overhead (first sklearn load, calibrated) + half a model of margin.",
        f"- Traffic: Zipf s={st['zipf_s']} over the configured models, {st['clients']} concurrent clients (keep-alive), "
        f"{st['requests']} measured requests per run after a warm-up (one request to each of the {st['capacity']} most "
        f"popular models + {st['warmup_requests']} Zipf requests); `--min-residency {st['min_residency']:g}`.",
        "- Latency is client-side for requests answered 200 (ms); the generator (Python threads), the agent and MLServer "
        "share the machine's cores.",
        "",
        "## Runs",
        "",
        md_table(
            ["run", "configured", "ratio", "p50 ms", "p95 ms", "p99 ms", "max ms", "req/s", "hit ratio", "evictions",
             "cold start ms (mean)", "server load/unload ms (mean)", "non-200", "loaded at end", "agent RSS MiB", "server RSS MiB (peak)", "load avg"],
            [[r["label"], r["configured"], r["ratio"], r["p50_ms"], r["p95_ms"], r["p99_ms"], r["max_ms"], r["throughput_rps"],
              r["hit_ratio"], r["evictions"], r["cold_start_mean_ms"], f"{r['server_load_mean_ms']} / {r['server_unload_mean_ms']}",
              sum(v for k, v in r["status_counts"].items() if k != "200"), r["loaded_at_end"],
              round(r["rss_agent_end"] / MI), f"{r['rss_server_end'] / MI:.0f} ({r['rss_server_peak'] / MI:.0f})",
              r["loadavg_end"][0]] for r in runs],
        ),
        "",
    ]
    goal = data.get("p95_goal")
    if goal:
        lines += [f"Goal: p95 at ratio 1.5 ≤ {goal['goal_factor']:g}× base p95 → {goal['ratio_1_5_p95_ms']} ms / "
                  f"{goal['base_p95_ms']} ms = {goal['factor']}× ({'met' if goal['met'] else 'MISSED'}).", ""]
    head = next((r for r in runs if r["label"] == "headline"), runs[-1])
    n = head["configured"]
    together = head["rss_agent_end"] + head["rss_server_end"]
    lines += [
        "## Memory: one agent + one server vs one server per model",
        "",
        md_table(
            ["setup", "RSS"],
            [
                [f"agent + MLServer, {n} configured, {head['loaded_at_end']} loaded (end of the {head['label']} run)",
                 f"{together / MI:.0f} MiB (agent {head['rss_agent_end'] / MI:.0f} + server {head['rss_server_end'] / MI:.0f})"],
                ["one standalone MLServer holding one model (measured)", f"{one / MI:.0f} MiB"],
                [f"one MLServer per model × {n}", f"{one * n / 2**30:.1f} GiB"],
                [f"one MLServer per model × {head['loaded_at_end']} (only the loaded set)", f"{one * head['loaded_at_end'] / 2**30:.1f} GiB"],
            ],
        ),
        "",
        f"Total time of the benchmark: {data['total_s']:.0f} s.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
