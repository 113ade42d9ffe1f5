"""Real-memory density: models whose in-server size is what they weigh, a budget in real bytes,
and the server's REAL memory against it over time (issue 10, item 4).

bench_density.py counts slots (models declared 10Mi that really hold a few hundred KB); this
one does not. Each model is a sklearn classifier carrying a distinct incompressible numpy
payload of 1, 4, 16 or 64 MiB (tests/support/models.py), so it really takes that much in
MLServer. A third of the models declare their size, a third declare a quarter of it (too low),
a third declare nothing. The host budget is in real bytes (`--budget-mib`). For each over-commit
ratio (sum of the configured models' payloads / budget) a Zipf request sequence runs while a
sampler reads the agent's /status every `--sample-s`: the "reality" block (server RSS over its
bare baseline) and the "ledger" block. Reported: real memory vs budget over time (plot), the
longest stretch above budget + 5%, ledger-vs-reality drift, p50/p95/p99 per ratio, the cold-start
breakdown (request wait, server load, unload), and one MLServer per model measured for real
(one standalone server per payload size, holding that model, summed over the loaded set and over
all models).

Goals (issue 10): ledger and reality agree within 5% of the budget (mean |drift| over the
samples taken while the ledger is settled, i.e. no load or unload in flight; every sample's drift
is shown beside it); real memory never above budget + 5% for longer than one reality-check
interval (2 s); p95 at ratio 1.5 <= 3x the ratio-1.0 p95. The reconciler's reality loop
(agent.memory.reality_loop) evicts on excess. The allocator-slack check (--no-slack skips it)
runs one MLServer through 150 random loads/unloads under glibc's default, MALLOC_ARENA_MAX=2 and
the fixed mmap threshold the agent gives its embedded server, and reports the RSS left over.

    .venv/bin/python benchmarks/bench_density_real.py [--budget-mib 256] [--ratios 1.0,1.5,2.0] [--requests 300]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_density  # noqa: E402
from benchmarks.bench_density import RssSampler, _metric, _pct, drive, zipf_sequence  # noqa: E402
from benchmarks.common import (  # noqa: E402
    MI, RESULTS, Agent, Flag, arg_parser, command_line, loadavg, machine, machine_md, md_table, write_results,
)

SIZES_MIB = (1, 4, 16, 64)
TOLERANCE = 0.05
INTERVAL_S = 2.0  # the reality-check interval the goal is stated against


def write_models(store: Path, count: int) -> list[dict[str, Any]]:
    """`count` models cycling through SIZES_MIB, declarations cycling right / too low / none."""
    from tests.support.models import write_sklearn_model

    out = []
    for i in range(count):
        size = SIZES_MIB[i % len(SIZES_MIB)]
        d = store / f"r{i:03d}"
        if not (d / "model.joblib").exists():
            write_sklearn_model(d, kind="iris-logreg", seed=i, pad_bytes=size * MI)
        spec: dict[str, Any] = {"name": d.name, "uri": str(d), "runtime": "sklearn", "preload": False}
        kind = ("declared", "too_low", "undeclared")[(i // len(SIZES_MIB)) % 3]
        if kind == "declared":
            spec["memory"] = f"{size + 1}Mi"  # payload + the model object itself
        elif kind == "too_low":
            spec["memory"] = f"{max(1, size // 4)}Mi"
        out.append({"spec": spec, "size": size * MI, "kind": kind})
    return out


def models_for_ratio(models: list[dict[str, Any]], room: int, ratio: float) -> list[dict[str, Any]]:
    """Models in order whose payloads sum to at most ratio x room (one that would overshoot is
    skipped). ``room``: the budget minus the runtime import the server pays once."""
    chosen, total = [], 0
    for m in models:
        if total + m["size"] <= ratio * room:
            chosen.append(m)
            total += m["size"]
    return chosen


class StatusSampler(RssSampler):
    """Reads /status every `interval` s: (t, real host, ledger host, held, drift, excess). Reuses
    RssSampler's thread (its `sample` is replaced; a failed read is skipped, not the end)."""

    def __init__(self, agent: Agent, interval: float):
        super().__init__(agent.proc.pid, agent.proc.pid, interval)
        self.agent = agent
        self.samples: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def sample(self) -> tuple[int, int]:
        try:
            st = self.agent.status()
        except Exception:
            return 0, 0
        r = ((st.get("reality") or {}).get("devices") or {}).get("host") or {}
        led = ((st.get("ledger") or {}).get("devices") or {}).get("host") or {}
        self.samples.append({"t": round(time.monotonic() - self.t0, 2), "real": r.get("real"), "ledger": led.get("used"),
                             "held": led.get("held"), "drift": r.get("drift"), "excess": r.get("excess", 0),
                             "settled": (st.get("reality") or {}).get("settled")})
        return 0, 0


def longest_over(samples: list[dict[str, Any]], limit: float) -> float:
    """Longest stretch (s) of consecutive samples whose real bytes exceed `limit`."""
    longest, start = 0.0, None
    for s in samples:
        over = s["real"] is not None and s["real"] > limit
        if over and start is None:
            start = s["t"]
        elif not over and start is not None:
            longest, start = max(longest, s["t"] - start), None
    if start is not None and samples:
        longest = max(longest, samples[-1]["t"] - start)
    return round(longest, 2)


def one_run(work: Path, models: list[dict[str, Any]], budget: int, ratio: float, args: argparse.Namespace) -> dict[str, Any]:
    chosen = models_for_ratio(models, budget - args.import_mib * MI, ratio)
    names = [m["spec"]["name"] for m in chosen]
    seq = zipf_sequence(names, args.requests, 1.1, args.seed)
    agent = Agent(work / f"ratio-{ratio:g}", [m["spec"] for m in chosen], "--host-memory", str(budget),
                  "--min-residency", "0.25", "--resync-interval", "600", "--load-timeout", "60",
                  "--log-level", args.agent_log_level)
    la = loadavg()
    try:
        agent.wait_ready(120)
        agent.wait_models(lambda ms: len(ms) == len(chosen) and all(m["state"] == "cached" for m in ms.values()), 300, "cached")
        m0 = agent.metrics()
        with StatusSampler(agent, args.sample_s) as sampler:
            t0 = time.monotonic()
            res = drive(agent.url, seq, args.clients)
            wall = time.monotonic() - t0
            time.sleep(2 * args.sample_s)
        m1 = agent.metrics()
        st = agent.status()
    finally:
        agent.stop()
    ok = [lat * 1000 for lat, code, _ in res if code == 200]
    codes: dict[str, int] = {}
    for _, code, _ in res:
        codes[str(code)] = codes.get(str(code), 0) + 1

    def mean_ms(name: str) -> float | None:
        n = _metric(m1, f"{name}_count") - _metric(m0, f"{name}_count")
        return round(1000 * (_metric(m1, f"{name}_sum") - _metric(m0, f"{name}_sum")) / n, 1) if n else None

    reals = [s["real"] for s in sampler.samples if s["real"] is not None]
    drifts = [abs(s["drift"]) for s in sampler.samples if s["drift"] is not None]
    settled = [abs(s["drift"]) for s in sampler.samples if s["drift"] is not None and s.get("settled")]
    loaded = [n for n, m in st["models"].items() if m["state"] == "loaded"]
    sizes = {m["spec"]["name"]: m["size"] for m in chosen}
    kinds = {m["spec"]["name"]: m["kind"] for m in chosen}
    run = {
        "ratio": ratio, "models": len(chosen), "configured_bytes": sum(m["size"] for m in chosen), "budget": budget,
        "requests": len(res), "codes": codes, "wall_s": round(wall, 1),
        "p50_ms": round(_pct(ok, 50), 2), "p95_ms": round(_pct(ok, 95), 2), "p99_ms": round(_pct(ok, 99), 2),
        "cold_start_mean_ms": mean_ms("modelshelf_cold_start_seconds"), "server_load_mean_ms": mean_ms("modelshelf_load_seconds"),
        "server_unload_mean_ms": mean_ms("modelshelf_unload_seconds"),
        "evictions": int(_metric(m1, "modelshelf_evictions_total") - _metric(m0, "modelshelf_evictions_total")),
        "real_max": max(reals) if reals else None, "real_mean": int(statistics.fmean(reals)) if reals else None,
        "longest_over_budget_5pct_s": longest_over(sampler.samples, budget * (1 + TOLERANCE)),
        "drift_abs_mean": int(statistics.fmean(drifts)) if drifts else None, "drift_abs_max": max(drifts) if drifts else None,
        # judged only where no load or unload is in flight (see agent/memory/reality.py: mid-load
        # the model is reserved before the server holds it); every sample is reported beside it
        "settled_samples": len(settled),
        "settled_drift_abs_mean": int(statistics.fmean(settled)) if settled else None,
        "settled_drift_abs_max": max(settled) if settled else None,
        "drift_signed_mean": int(statistics.fmean(s["drift"] for s in sampler.samples if s["drift"] is not None)) if drifts else None,
        "loaded_at_end": len(loaded), "loaded_payload_bytes": sum(sizes.get(n, 0) for n in loaded),
        "under_declared_at_end": (st.get("ledger") or {}).get("under_declared"),
        # per loaded model: payload, declaration, reservation and measurement (where drift comes from)
        "ledger_models_at_end": {n: {"payload": sizes.get(n), "kind": kinds.get(n), "reserved": d.get("host"),
                                     "method": d.get("method"), "declared": (d.get("declared") or {}).get("host"),
                                     "measured": (d.get("measured") or {}).get("host")}
                                 for n, d in ((st.get("ledger") or {}).get("models") or {}).items()},
        "runtime_imports_at_end": (st.get("ledger") or {}).get("runtime_imports"),
        "reality_at_end": (st.get("reality") or {}).get("devices", {}).get("host"),
        "samples": sampler.samples, "loadavg_start": la, "loadavg_end": loadavg(),
    }
    print(f"ratio {ratio}: models={len(chosen)} p50={run['p50_ms']} p95={run['p95_ms']} p99={run['p99_ms']} codes={codes} "
          f"real_max={(run['real_max'] or 0) / MI:.0f}Mi budget={budget / MI:.0f}Mi over5%={run['longest_over_budget_5pct_s']}s "
          f"drift_mean={(run['drift_abs_mean'] or 0) / MI:.1f}Mi", flush=True)
    return run


def one_server_per_model(work: Path, models: list[dict[str, Any]]) -> dict[int, int]:
    """RSS of a standalone MLServer holding one model of each payload size (after one inference)."""
    out: dict[int, int] = {}
    for size in SIZES_MIB:
        m = next(m for m in models if m["size"] == size * MI)
        measured = bench_density.one_server_per_model(work / f"standalone-{size}", Path(m["spec"]["uri"]))
        out[size] = measured["rss_one_server_one_model"]
    return out


SLACK_SCRIPT = r"""
import json, os, random, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from tests.support.servers import embedded_mlserver
from agent.runtimes.base import ServedModel
from agent.memory.reality import ProcessTracker
MI = 2**20
models = json.loads(sys.argv[1])  # [[uri, size_mib], ...]
budget = int(sys.argv[2]) * MI
with embedded_mlserver(Path(os.environ["SLACK_WORKDIR"])) as srv:
    t = ProcessTracker(srv.adapter.process.pid)
    time.sleep(0.5)
    base = t.rss()
    size = {u: s for u, s in models}
    def load(u): srv.call(srv.adapter.load(ServedModel(name=Path(u).name, path=Path(u), runtime="sklearn")))
    def unload(u): srv.call(srv.adapter.unload(Path(u).name))
    first = models[0][0]
    load(first)
    imp = t.rss() - base - size[first] * MI
    loaded, rng, steps = {first}, random.Random(1), 0
    for _ in range(150):
        u = rng.choice(list(size))
        if u in loaded:
            continue
        while sum(size[m] for m in loaded) * MI + size[u] * MI > budget:
            v = rng.choice(sorted(loaded)); unload(v); loaded.discard(v)
        load(u); loaded.add(u); steps += 1
    time.sleep(0.5)
    rss = t.rss()
    payload = sum(size[m] for m in loaded) * MI
    print(json.dumps({"import": imp, "payload": payload, "over_baseline": rss - base,
                      "slack": rss - base - imp - payload, "loaded": len(loaded), "loads": steps + 1}))
"""

# the embedded MLServer runs with MALLOC_MMAP_THRESHOLD_=4194304 (MLServerAdapter) and, with no
# allocator reserve (MODELSHELF_SERVER_MALLOC_KEEP=0, --server-malloc-keep 0), trims its heap after
# every load and unload (agent/runtimes/mlserver_repository.py), in every variant: the slack is
# what the allocator keeps by itself; "" removes the threshold (glibc's dynamic default)
_NO_RESERVE = {"MODELSHELF_SERVER_MALLOC_KEEP": "0"}
SLACK_VARIANTS = {"glibc default (dynamic mmap threshold), trim after unload": {"MALLOC_MMAP_THRESHOLD_": "", **_NO_RESERVE},
                  "MALLOC_MMAP_THRESHOLD_=131072 (the agent's default before), trim after unload": {"MALLOC_MMAP_THRESHOLD_": "131072", **_NO_RESERVE},
                  "MALLOC_MMAP_THRESHOLD_=4194304, trim after unload (the agent's default)": {"MALLOC_MMAP_THRESHOLD_": "4194304", **_NO_RESERVE}}


def allocator_slack(work: Path, models: list[dict[str, Any]], budget_mib: int) -> dict[str, Any]:
    """Is RSS given back after unloads? One MLServer loads and unloads the benchmark's models at
    random (150 steps, loaded payload kept under `budget_mib`); afterwards its RSS over the bare
    server minus the sklearn import minus the payloads still loaded is the allocator's slack
    (memory freed by unloads but not returned to the OS). Run under glibc's default and two
    malloc settings (environment variables of the server process)."""
    import json
    import os
    import subprocess

    pairs = json.dumps([[m["spec"]["uri"], m["size"] // MI] for m in models])
    root = str(Path(__file__).resolve().parent.parent)
    out: dict[str, Any] = {}
    for label, env in SLACK_VARIANTS.items():
        wd = work / f"slack-{len(out)}"
        r = subprocess.run([sys.executable, "-c", SLACK_SCRIPT, pairs, str(budget_mib), root], capture_output=True, text=True,
                           env={**os.environ, **env, "SLACK_WORKDIR": str(wd)}, timeout=600)
        out[label] = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-500:]}
        print(f"allocator slack, {label}: {out[label]}", flush=True)
    return out


def _plot(runs: list[dict[str, Any]], path: Path) -> str | None:
    """Real bytes over time per ratio against the budget, as a small SVG (no plotting library)."""
    series = [(r["ratio"], [(s["t"], s["real"] / MI) for s in r["samples"] if s["real"] is not None]) for r in runs]
    series = [(ratio, pts) for ratio, pts in series if pts]
    if not series:
        return None
    budget = runs[0]["budget"] / MI
    w, h, pad = 720, 300, 40
    tmax = max(p[0] for _, pts in series for p in pts) or 1.0
    ymax = max(budget * 1.3, max(p[1] for _, pts in series for p in pts) * 1.05)

    def xy(t: float, y: float) -> str:
        return f"{pad + (w - 2 * pad) * t / tmax:.1f},{h - pad - (h - 2 * pad) * y / ymax:.1f}"

    colors = ["#1565c0", "#2e7d32", "#ef6c00", "#6a1b9a"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
             f'<rect width="{w}" height="{h}" fill="white"/>']
    for y, style, label in ((budget, "stroke:black;stroke-dasharray:4", "budget"),
                            (budget * (1 + TOLERANCE), "stroke:#c62828;stroke-dasharray:2", "budget + 5%")):
        parts.append(f'<line x1="{pad}" x2="{w - pad}" y1="{xy(0, y).split(",")[1]}" y2="{xy(0, y).split(",")[1]}" style="{style}"/>')
        parts.append(f'<text x="{w - pad + 2}" y="{xy(0, y).split(",")[1]}">{label}</text>')
    for i, (ratio, pts) in enumerate(series):
        c = colors[i % len(colors)]
        parts.append(f'<polyline fill="none" stroke="{c}" points="{" ".join(xy(t, y) for t, y in pts)}"/>')
        parts.append(f'<text x="{pad + 8}" y="{pad + 14 * i}" fill="{c}">real, ratio {ratio:g}</text>')
    parts.append(f'<text x="{pad}" y="{h - 8}">seconds into the measured requests (0..{tmax:.0f}); '
                 f'y: server RSS over its bare baseline, 0..{ymax:.0f} MiB</text></svg>')
    path.write_text("\n".join(parts))
    return path.name


def main(argv: list[str] | None = None) -> int:
    p = arg_parser(
        __doc__, budget_mib=256, ratios="1.0,1.5,2.0", requests=300, clients=3, sample_s=0.25, seed=1,
        import_mib=Flag(96, "room left in the budget for the sklearn import MLServer pays once (~80 MiB measured)"),
        workdir=Path("/tmp/modelshelf-bench-density-real"), out="density_real",
        agent_log_level=Flag("warning", "info: the agent's log (in --workdir) says what each load measured"),
        no_slack=Flag(False, "skip the allocator-slack check (three more MLServers)"))
    args = p.parse_args(argv)
    budget = args.budget_mib * MI
    ratios = [float(r) for r in args.ratios.split(",") if r]
    count = 1
    while sum(SIZES_MIB[i % len(SIZES_MIB)] for i in range(count)) * MI < max(ratios) * (budget - args.import_mib * MI):
        count += 1
    models = write_models(args.workdir / "store", count + len(SIZES_MIB))
    runs = [one_run(args.workdir, models, budget, r, args) for r in ratios]
    slack = None if args.no_slack else allocator_slack(args.workdir, models, args.budget_mib - args.import_mib)
    per_size = one_server_per_model(args.workdir, models)
    for r in runs:
        chosen = models_for_ratio(models, budget - args.import_mib * MI, r["ratio"])
        r["one_server_per_model_all_bytes"] = sum(per_size[m["size"] // MI] for m in chosen)
    base = next((r for r in runs if r["ratio"] == 1.0), None)
    r15 = next((r for r in runs if r["ratio"] == 1.5), None)
    drift_limit = TOLERANCE * budget
    verdicts = {
        "ledger_and_reality_agree_within_5pct_of_budget_mean_abs_drift_settled":
            "met" if all(r["settled_samples"] and (r["settled_drift_abs_mean"] or 0) <= drift_limit for r in runs) else "missed",
        "real_within_budget_5pct_beyond_one_interval": "met" if all(r["longest_over_budget_5pct_s"] <= INTERVAL_S for r in runs) else "missed",
        "p95_ratio_1.5_le_3x_ratio_1.0": ("met" if r15["p95_ms"] <= 3 * base["p95_ms"] else "missed") if base and r15 else "not run",
    }
    figures = {  # the figure each verdict was judged on, beside it in the results file
        "ledger_and_reality_agree_within_5pct_of_budget_mean_abs_drift_settled":
            "settled drift " + "/".join(f"{(r['settled_drift_abs_mean'] or 0) / MI:.1f}" for r in runs)
            + f" MiB, limit {drift_limit / MI:.0f}",
        "real_within_budget_5pct_beyond_one_interval":
            "longest over " + "/".join(f"{r['longest_over_budget_5pct_s']:g}" for r in runs) + f" s, limit {INTERVAL_S:g}",
        "p95_ratio_1.5_le_3x_ratio_1.0": f"{r15['p95_ms'] / base['p95_ms']:.2f}x" if base and r15 and base["p95_ms"] else "",
    }
    data = {"machine": machine(), "command": command_line(), "budget": budget, "runs": runs,
            "one_server_per_model_rss_by_size_mib": per_size, "allocator_slack": slack, "verdicts": verdicts}
    plot = _plot(runs, RESULTS / f"{args.out}.svg") if args.out else None
    rows = [[f"{r['ratio']:g}", r["models"], f"{r['configured_bytes'] / MI:.0f}", f"{(r['real_max'] or 0) / MI:.0f}",
             r["longest_over_budget_5pct_s"], f"{(r['settled_drift_abs_mean'] or 0) / MI:.1f} ({r['settled_samples']})",
             f"{(r['drift_abs_mean'] or 0) / MI:.1f} ({len(r['samples'])})", r["p50_ms"], r["p95_ms"], r["p99_ms"],
             r["cold_start_mean_ms"], r["server_load_mean_ms"], r["server_unload_mean_ms"], r["evictions"],
             f"{r['one_server_per_model_all_bytes'] / MI:.0f}"] for r in runs]
    md = "\n".join([
        "# Real-memory density", "", machine_md(data["machine"]), "", f"command: `{data['command']}`", "",
        f"budget: {args.budget_mib} MiB of real model memory (host), of which ~{args.import_mib} MiB go to the sklearn import; "
        f"ratio = configured payload / (budget - import); tolerance 5%; reality sampled every {args.sample_s} s",
        "",
        md_table(["ratio", "models", "configured MiB", "real max MiB", "longest > budget+5% (s)",
                  "mean |drift| MiB, settled (samples)", "mean |drift| MiB, all (samples)",
                  "p50 ms", "p95 ms", "p99 ms", "cold start ms", "load ms", "unload ms", "evictions",
                  "one server per model, all (MiB)"], rows),
        "", "one MLServer per model, RSS by payload size (MiB): "
        + ", ".join(f"{s}: {b / MI:.0f}" for s, b in per_size.items()),
        "", "Drift = ledger used - real (server RSS over its bare baseline). \"Settled\": samples taken with no load "
        "and no unload in flight (/status reality.settled); mid-load the model is reserved before the server holds it "
        "and mid-unload it is still held while its bytes are promised to its successor, so drift there is the "
        "reservation in motion, not an accounting error (all samples are shown beside it).",
        *(["", "Allocator slack (memory freed by unloads but not returned to the OS; one MLServer, 150 random "
           f"loads/unloads of these models under {args.budget_mib - args.import_mib} MiB of payload): "
           + "; ".join(f"{k}: {v['slack'] / MI:.1f} MiB (import {v['import'] / MI:.0f} MiB)" if "slack" in v else f"{k}: {v}"
                       for k, v in slack.items())] if slack else []),
        "", "## Verdicts", *[f"- {k}: **{v}**" + (f" ({figures[k]})" if figures[k] else "") for k, v in verdicts.items()],
        "", f"![real vs budget]({plot})" if plot else "",
    ])
    if args.out:
        write_results(args.out, md + "\n", data)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
