"""How well a load of a big model is measured when the embedded MLServer keeps an allocator
reserve (--server-malloc-keep): the bench_peers big models (StandardScaler + RandomForest
pipelines of 19-49 MiB) loaded one at a time, in an LRU loop of 20 held, into two embedded
MLServers side by side, one trimming after every call (keep 0) and one keeping a reserve; the
same sequence for both, loads alternating between them.

    .venv/bin/python benchmarks/bench_load_measure.py

Per load and server: the server's RSS growth over the load (what the agent measured before
this change), the reserve's growth over the same window as the server reports it
(MLServerAdapter.allocator_reserve), and their difference (what the agent measures now,
agent/memory/ledger.py finish_measure). Reported as ratios to the model file's size, and how
many loads read above the model's declaration (file + 1 MiB, as bench_peers declares them) or
below half the file (an under-count). No agent, no HTTP traffic beyond the repository API:
the windows never overlap, so every load is measured (in bench_peers most are not: their
windows overlap).
"""
from __future__ import annotations

import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_peers import write_forests  # noqa: E402
from benchmarks.common import MI, Flag, arg_parser, command_line, loadavg, machine, machine_md, md_table, publish, settings_of  # noqa: E402

from agent.memory import ProcessTracker  # noqa: E402
from agent.runtimes.base import ServedModel  # noqa: E402
from agent.runtimes.mlserver import MLServerAdapter  # noqa: E402


def _q(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


async def run(args: Any, work: Path) -> dict[str, Any]:
    forests = write_forests(Path(tempfile.gettempdir()) / "modelshelf-bench-peers" / f"store-big-{args.models}", args.models)
    keeps = {"keep 0 (trim after every call)": 0, f"keep {args.keep_mib} MiB": args.keep_mib * MI}
    servers: dict[str, MLServerAdapter] = {}
    try:
        for label, keep in keeps.items():
            a = MLServerAdapter.embedded(work / f"repo-{keep}", workdir=work / f"cwd-{keep}", malloc_keep=keep)
            await a.start()
            servers[label] = a
        rng = random.Random(args.seed)
        sequence = [rng.randrange(len(forests)) for _ in range(args.loads)]
        held: dict[str, list[str]] = {label: [] for label in servers}
        rows: dict[str, list[dict[str, float]]] = {label: [] for label in servers}
        t0 = time.monotonic()
        for step, i in enumerate([0, *sequence]):  # the first load imports sklearn: not counted
            d, size = forests[i]
            name = d.name
            for label, a in servers.items():
                tracker = ProcessTracker(a.process.pid)
                if name in held[label]:  # a hit: the LRU order moves, nothing loads
                    held[label].remove(name)
                    held[label].append(name)
                    continue
                if len(held[label]) >= args.held:
                    await a.unload(held[label].pop(0))
                r0, k0 = tracker.rss(), a.allocator_reserve()
                await a.load(ServedModel(name=name, path=d, runtime="sklearn"))
                r1, k1 = tracker.rss(), a.allocator_reserve()
                held[label].append(name)
                if step:
                    moved = (k1 - k0) if k0 is not None and k1 is not None else 0
                    rows[label].append({"size": size, "rss": r1 - r0, "reserve": moved, "now": r1 - r0 - moved})
        wall = time.monotonic() - t0
    finally:
        for a in servers.values():
            await a.stop()
    out: dict[str, Any] = {"wall_s": round(wall, 1), "variants": {}}
    for label, rs in rows.items():
        for what in ("rss", "now"):
            if what == "now" and not any(r["reserve"] for r in rs):
                continue  # keep 0: no reserve, the two are the same
            ratios = [r[what] / r["size"] for r in rs]
            above = sum(r[what] > r["size"] + MI for r in rs)
            under = sum(r[what] < 0.5 * r["size"] for r in rs)
            out["variants"][f"{label}: {'RSS growth (before)' if what == 'rss' else 'RSS growth - reserve growth (now)'}"] = {
                "loads": len(rs), "ratio_min": round(min(ratios), 3), "ratio_p5": round(_q(ratios, 0.05), 3),
                "ratio_median": round(statistics.median(ratios), 3), "ratio_p95": round(_q(ratios, 0.95), 3),
                "ratio_max": round(max(ratios), 3), "above_declaration": above, "below_half": under,
                "reserve_moved_mib_max": round(max(abs(r["reserve"]) for r in rs) / MI, 1)}
    return out


def main() -> None:
    p = arg_parser(__doc__,
                   models=Flag(100, "bench_peers' big models (19-49 MiB)"),
                   held=Flag(20, "models held at once (LRU)"),
                   loads=Flag(150, "uniform picks (hits move the LRU order; misses load)"),
                   keep_mib=Flag(100, "the second server's --server-malloc-keep, MiB (bench_peers big's default: 100)"),
                   seed=Flag(0, "the picks' seed"),
                   out=Flag("load_measure", "result name under benchmarks/results/ ('' = don't write)"))
    args = p.parse_args()
    info = machine()
    with tempfile.TemporaryDirectory(prefix="bench-load-measure-") as tmp:
        res = asyncio.run(run(args, Path(tmp)))
    info["loadavg_at_end"] = loadavg()
    data = {"benchmark": "load_measure", "command": command_line(), "machine": info, "settings": settings_of(args), **res}
    rows = [[k, v["loads"], v["ratio_min"], v["ratio_p5"], v["ratio_median"], v["ratio_p95"], v["ratio_max"],
             v["above_declaration"], v["below_half"], v["reserve_moved_mib_max"]] for k, v in res["variants"].items()]
    md = "\n".join([
        "# A load's measured size with and without an allocator reserve", "",
        f"Command: `{data['command']}`", "",
        machine_md(data["machine"]), "",
        f"{args.loads} uniform picks among {args.models} bench_peers forests (19-49 MiB), {args.held} held (LRU), "
        "into two embedded MLServers in the same sequence; the first load (sklearn's import) not counted. "
        "Ratio = measured bytes / the model file's bytes; above declaration: measured > file + 1 MiB (bench_peers' "
        "declaration); below half: measured < 0.5 x file. Reserve moved: the largest change of the server's "
        "reported reserve over one load.", "",
        md_table(["server: measurement", "loads", "min", "p5", "median", "p95", "max", "above declaration",
                  "below half", "reserve moved, max MiB"], rows), "",
        f"Wall time of the loop: {res['wall_s']} s.", ""])
    publish(args.out, md, data)


if __name__ == "__main__":
    main()
