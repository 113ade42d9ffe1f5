"""Eviction-policy simulation for bench_peers' big workload: no servers, only which requests miss.

    .venv/bin/python benchmarks/bench_eviction_sim.py

The bench's models (100 forests spread evenly over 19-49 MiB, each reserved at size + 1 MiB),
the room the agent's ledger has for them (--room-mib, 716: bench_peers' 801 MiB budget less the
85 MiB sklearn import) and its traffic (Zipf s=1.1 over a seeded ranking, `zipf_sequence`):
--warmup requests, then --requests measured, over --seeds sequences. For each policy, the share
of measured requests that miss (each miss is a load on the server's one loop, where bench_peers'
big workload is saturated: see results/peers.notes.md) and the MiB loaded per request:
- LRU with the whole room, and with --headroom-loads medians kept free (the agent's --headroom);
- LFU: evict the model asked for least often since start (ties: least recently used).
A simulation of hit ratios, not a benchmark: no timing, nothing machine-dependent.
"""
from __future__ import annotations

import statistics
import sys
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_density import zipf_sequence  # noqa: E402
from benchmarks.common import Flag, arg_parser  # noqa: E402


def simulate(seq: list[str], sizes: dict[str, float], room: float, policy: str, measure_from: int) -> tuple[float, float]:
    """(miss ratio, MiB loaded per request) over seq[measure_from:]."""
    held: OrderedDict[str, None] = OrderedDict()  # least recently used first
    asked: dict[str, int] = {}
    used = misses = loaded = 0.0
    for i, name in enumerate(seq):
        asked[name] = asked.get(name, 0) + 1
        if name in held:
            held.move_to_end(name)
            continue
        if i >= measure_from:
            misses += 1
            loaded += sizes[name]
        while used + sizes[name] > room:
            if policy == "lru":
                victim = next(iter(held))
            else:
                order = {n: k for k, n in enumerate(held)}
                victim = min(held, key=lambda n: (asked[n], order[n]))
            del held[victim]
            used -= sizes[victim]
        held[name] = None
        used += sizes[name]
    n = len(seq) - measure_from
    return misses / n, loaded / n


def main(argv: list[str] | None = None) -> int:
    args = arg_parser(__doc__, models=100, room_mib=716.0,
                      headroom_loads=Flag(2, "the headroom bench_peers' budget allows (10%% cap)"), warmup=520,
                      requests=Flag(1800, "bench_peers: 3 passes of 600"), seeds=10, zipf_s=1.1).parse_args(argv)
    names = [f"f{i:03d}" for i in range(args.models)]
    sizes = {n: 19 + 30 * i / max(1, args.models - 1) + 1 for i, n in enumerate(names)}
    median = statistics.median(sizes.values())
    variants = [("LRU, whole room", "lru", args.room_mib),
                (f"LRU, {args.headroom_loads} loads kept free", "lru", args.room_mib - args.headroom_loads * median),
                ("LFU, whole room", "lfu", args.room_mib)]
    print(f"{args.models} models of 20-50 MiB, room {args.room_mib:g} MiB, Zipf s={args.zipf_s}, "
          f"{args.warmup} warm-up + {args.requests} measured requests, {args.seeds} seeds\n")
    print("| policy | miss ratio mean (min-max) | MiB loaded per request |\n|---|---|---|")
    for label, policy, room in variants:
        runs = [simulate(zipf_sequence(names, args.warmup + args.requests, args.zipf_s, seed), sizes, room, policy, args.warmup)
                for seed in range(args.seeds)]
        ratios = [r[0] for r in runs]
        print(f"| {label} | {statistics.fmean(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | "
              f"{statistics.fmean(r[1] for r in runs):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
