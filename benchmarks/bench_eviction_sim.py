"""Eviction-policy simulation for bench_peers' big workload: no servers, only which requests miss.

    .venv/bin/python benchmarks/bench_eviction_sim.py

The bench's models (100 forests spread evenly over 19-49 MiB, each reserved at size + 1 MiB)
and the room the agent's ledger has for them (--room-mib, 716: bench_peers' 801 MiB budget less
the 85 MiB sklearn import), with and without --headroom-loads medians kept free (the agent's
--headroom under pressure); --models/--fit/--min-mib/--max-mib/--room-mib/--pass-requests
describe bench_peers' small workload as well (see benchmarks/results/peers.notes.md).
Time is counted in requests, as the agent's --eviction-half-life is.
Traces, each over --seeds seeds, misses counted after the warm-up:
- bench: what bench_peers sends one system: one request to each of the `fit` most popular, a
  --warmup Zipf warm-up, then --passes passes of --pass-requests, each pass a Zipf sequence
  with its OWN seeded ranking (bench_peers reseeds per round): popularity moves every pass;
- stable: one Zipf ranking for the warm-up and every measured request;
- shift: stable, but the ranking is permuted afresh halfway through the measured requests;
- scan: stable, with every --scan-every-th request going to a model asked for once and never
  again (a sweep of one-shot models over the same size range).
Policies (the order in which idle models are evicted; every rule other than the order is the
agent's business and not modelled):
- lru: least recently used first (the agent's --eviction lru);
- lfu-decay H: lowest decayed request count first, halving every H requests, ties least recently
  used (the agent's --eviction lfu-decay with --eviction-half-life H; LRFU-style, using the
  agent's own `decayed`); the count survives an eviction, as the agent's Model does;
- lfu: the count since start, never decayed (for reference: it never forgets);
- lru-2: oldest second-to-last request first (LRU-K, K=2; O'Neil et al. 1993), for reference.
Per policy and trace: the share of measured requests that miss (each miss is a load on the
server's one loop, where bench_peers' big workload is saturated: see results/peers.notes.md).
A simulation of hit ratios, not a benchmark: no timing, nothing machine-dependent.
"""
from __future__ import annotations

import random
import statistics
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent.memory.planner import decayed  # noqa: E402
from benchmarks.bench_density import popular, zipf_sequence  # noqa: E402
from benchmarks.common import Flag, arg_parser  # noqa: E402


def simulate(seq: list[str], sizes: dict[str, float], room: float, policy: str, half_life: float, measure_from: int) -> float:
    """Miss ratio over seq[measure_from:]."""
    held: dict[str, None] = {}
    last: dict[str, float] = {}
    prev: dict[str, float] = {}
    score: dict[str, float] = {}
    score_at: dict[str, float] = {}
    used = misses = 0.0
    key: Callable[[str], tuple]
    for i, name in enumerate(seq):
        now = float(i)
        if name in held:
            pass
        else:
            if i >= measure_from:
                misses += 1
            if used + sizes[name] > room:
                if policy == "lru":
                    def key(n: str) -> tuple: return (last[n],)
                elif policy == "lru-2":
                    def key(n: str) -> tuple: return (prev.get(n, -1.0), last[n])
                elif policy == "lfu":
                    def key(n: str) -> tuple: return (score[n], last[n])
                else:
                    def key(n: str) -> tuple: return (decayed(score[n], score_at[n], now, half_life), last[n])
                for victim in sorted(held, key=key):
                    if used + sizes[name] <= room:
                        break
                    del held[victim]
                    used -= sizes[victim]
            held[name] = None
            used += sizes[name]
        if name in last:
            prev[name] = last[name]
        last[name] = now
        if policy == "lfu":
            score[name] = score.get(name, 0.0) + 1.0
        else:
            score[name] = decayed(score.get(name, 0.0), score_at.get(name, now), now, half_life) + 1.0
        score_at[name] = now
    return misses / (len(seq) - measure_from)


def traces(names: list[str], sizes: dict[str, float], args, seed: int) -> dict[str, tuple[list[str], int]]:
    """name -> (sequence, index of the first measured request); may add one-shot models to sizes."""
    s = args.zipf_s
    measured = args.passes * args.pass_requests
    bench = popular(names, seed)[:args.fit] + zipf_sequence(names, args.warmup, s, seed + 1)
    start = len(bench)
    for r in range(args.passes):
        bench += zipf_sequence(names, args.pass_requests, s, seed + 10 + r)
    warm = args.fit + args.warmup
    stable = zipf_sequence(names, warm + measured, s, seed)
    half = warm + measured // 2
    shifted = stable[:half] + zipf_sequence(names, measured - measured // 2, s, seed + 1000)
    rng = random.Random(seed)
    scan = list(stable)
    for i in range(warm, len(scan), args.scan_every):
        one = f"scan-{seed}-{i}"
        sizes[one] = rng.uniform(args.min_mib, args.max_mib) + 1
        scan.insert(i, one)
    return {"bench": (bench, start), "stable": (stable, warm), "shift": (shifted, warm), "scan": (scan[:warm + measured], warm)}


def main(argv: list[str] | None = None) -> int:
    args = arg_parser(__doc__, models=100, fit=20, min_mib=19.0, max_mib=49.0, room_mib=716.0,
                      headroom_loads=Flag(2, "the headroom bench_peers' budget allows (10%% cap)"), warmup=500,
                      passes=3, pass_requests=600, seeds=10, zipf_s=1.1,
                      half_lives=Flag("50,100,200,500,2000", "lfu-decay half-lives to try (requests)"),
                      scan_every=Flag(5, "scan trace: every Nth request is a one-shot model")).parse_args(argv)
    names = [f"f{i:03d}" for i in range(args.models)]
    base = {n: args.min_mib + (args.max_mib - args.min_mib) * i / max(1, args.models - 1) + 1 for i, n in enumerate(names)}
    median = statistics.median(base.values())
    policies = [("lru", "lru", 1.0)] + [(f"lfu-decay {float(h):g}", "lfu-decay", float(h)) for h in args.half_lives.split(",")] \
        + [("lfu (never decays)", "lfu", 1.0), ("lru-2", "lru-2", 1.0)]
    rooms = [("whole room", args.room_mib), (f"{args.headroom_loads} loads kept free", args.room_mib - args.headroom_loads * median)]
    seeds = [1 + 100 * k for k in range(args.seeds)]  # bench_peers uses --seed 1
    print(f"{args.models} models of {args.min_mib + 1:g}-{args.max_mib + 1:g} MiB, room {args.room_mib:g} MiB, Zipf s={args.zipf_s}, "
          f"{args.fit} + {args.warmup} warm-up + {args.passes} x {args.pass_requests} measured requests, {len(seeds)} seeds; "
          f"miss ratio mean (min-max over seeds)\n")
    for room_label, room in rooms:
        cols = None
        rows = []
        for label, policy, h in policies:
            cells = {}
            for seed in seeds:
                sizes = dict(base)
                for t, (seq, start) in traces(names, sizes, args, seed).items():
                    cells.setdefault(t, []).append(simulate(seq, sizes, room, policy, h, start))
            cols = list(cells)
            rows.append(f"| {label} | " + " | ".join(f"{statistics.fmean(v):.3f} ({min(v):.3f}-{max(v):.3f})" for v in cells.values()) + " |")
        print(f"### {room_label} ({room:g} MiB)\n\n| policy | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
        print("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
