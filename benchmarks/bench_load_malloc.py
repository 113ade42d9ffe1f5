"""What glibc's malloc settings cost a server that loads and unloads big sklearn models: the
bench_peers big models (StandardScaler + RandomForest pipelines of 19-49 MiB) joblib.load-ed in
an LRU loop of 20 held models, in one fresh python (the project's venv, MLServer's libraries)
per variant, no server around it: what a load, an unload and the memory given back cost under
each setting, without MLServer's loop, HTTP or the agent.

    .venv/bin/python benchmarks/bench_load_malloc.py

Per variant: the mean and p50 of a joblib.load, the mean of malloc_trim(0) where the variant
trims after each unload (as the embedded MLServer does, agent/runtimes/mlserver_repository.py),
the process's CPU seconds (user + system) and minor page faults over the loop, and its RSS
with the last 20 held and after every model is freed (what the allocator keeps of freed memory:
what an agent's ledger cannot see). The variants run in a rotating order over --rounds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MI, Flag, arg_parser, command_line, loadavg, machine, machine_md, md_table, publish, settings_of  # noqa: E402

LOOP = r"""
import ctypes, gc, json, os, random, resource, sys, time
import joblib, psutil
store, held_max, steps, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
libc = ctypes.CDLL("libc.so.6")
malloc_trim = libc.malloc_trim
class Mallinfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Mallinfo2
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE
# mode: "none"; "unload" (trim after each unload); "both" (after each unload and load);
# "keep:K" (after each unload and load, trim when the resident free estimate RSS - in use -
# what the last trim left exceeds K); "fordblks:K" (same, trim when mallinfo2's fordblks > K)
kind, _, k = mode.partition(":")
keep = int(k or 0)
names = sorted(n for n in os.listdir(store) if not n.startswith("."))
rng = random.Random(0)
held, loads, trims, checks, freed, seen = {}, [], [], [], [], []
def unaccounted():
    m = libc.mallinfo2()
    return rss() - m.uordblks - m.hblkhd, m.fordblks
def trim():
    before = rss(); t0 = time.perf_counter(); malloc_trim(0); trims.append(time.perf_counter() - t0); freed.append(before - rss())
left = [unaccounted()[0]] if kind == "keep" else None
def after_call(unload):
    if kind == "unload" and unload or kind == "both":
        trim()
    elif kind in ("keep", "fordblks"):
        t0 = time.perf_counter(); extra, fordblks = unaccounted(); checks.append(time.perf_counter() - t0)
        free = extra - left[0] if kind == "keep" else fordblks
        seen.append(free)
        if free > keep:
            trim()
            if kind == "keep":
                left[0] = unaccounted()[0]
ru0 = resource.getrusage(resource.RUSAGE_SELF)
for name in [rng.choice(names) for _ in range(steps)]:
    if name in held:
        held[name] = held.pop(name)
        continue
    if len(held) >= held_max:
        del held[next(iter(held))]
        after_call(True)
    t0 = time.perf_counter()
    held[name] = joblib.load(os.path.join(store, name, "model.joblib"))
    loads.append(time.perf_counter() - t0)
    after_call(False)
ru1 = resource.getrusage(resource.RUSAGE_SELF)
rss_held = psutil.Process().memory_info().rss
held.clear(); gc.collect()
if kind != "none":
    after_call(True)
loads.sort()
mean = lambda xs: sum(xs) / len(xs) if xs else None
print(json.dumps({"loads": len(loads), "load_ms_mean": 1000 * sum(loads) / len(loads), "load_ms_p50": 1000 * loads[len(loads) // 2],
                  "trim_ms_mean": 1000 * mean(trims) if trims else None, "trims": len(trims),
                  "trim_freed_mean": mean(freed), "check_us_mean": 1e6 * mean(checks) if checks else None,
                  "free_seen_max": max(seen) if seen else None,
                  "cpu_s": ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime, "sys_s": ru1.ru_stime - ru0.ru_stime,
                  "minflt": ru1.ru_minflt - ru0.ru_minflt, "rss_held": rss_held, "rss_after_free": psutil.Process().memory_info().rss}))
"""

# label -> (environment of the loading python, when to trim: see LOOP's mode)
T4 = {"MALLOC_MMAP_THRESHOLD_": "4194304"}
VARIANTS = {
    "glibc default (dynamic threshold), no trim": ({"MALLOC_MMAP_THRESHOLD_": None}, "none"),
    "MALLOC_MMAP_THRESHOLD_=131072, no trim (the agent before)": ({"MALLOC_MMAP_THRESHOLD_": "131072"}, "none"),
    "MALLOC_MMAP_THRESHOLD_=4194304, no trim": (T4, "none"),
    "MALLOC_MMAP_THRESHOLD_=4194304, trim after unload": (T4, "unload"),
    "MALLOC_MMAP_THRESHOLD_=4194304, trim after each unload and load (the agent before keep)": (T4, "both"),
    "4 MiB, trim when mallinfo2 fordblks > 100 MiB": (T4, f"fordblks:{100 * MI}"),
    "4 MiB, trim when resident free > 50 MiB (keep 1x largest)": (T4, f"keep:{50 * MI}"),
    "4 MiB, trim when resident free > 100 MiB (keep 2x)": (T4, f"keep:{100 * MI}"),
    "4 MiB, trim when resident free > 200 MiB (keep 4x)": (T4, f"keep:{200 * MI}"),
}


def run_variant(store: Path, env_over: dict[str, str | None], mode: str, held: int, steps: int) -> dict[str, Any]:
    env = dict(os.environ)
    for k, v in env_over.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    r = subprocess.run([sys.executable, "-c", LOOP, str(store), str(held), str(steps), mode],
                       capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        return {"error": r.stderr[-500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def markdown(data: dict[str, Any]) -> str:
    """The report of one run (its JSON's `runs`, in VARIANTS' order)."""
    runs, st = data["runs"], data["settings"]

    def rng(label: str, key: str, scale: float = 1.0, digits: int = 1) -> str:
        vals = [r[key] * scale for r in runs.get(label, []) if r.get(key) is not None]
        return "" if not vals else f"{min(vals):.{digits}f}–{max(vals):.{digits}f}" if len(vals) > 1 else f"{vals[0]:.{digits}f}"

    rows = [[label, rng(label, "load_ms_mean"), rng(label, "load_ms_p50"), rng(label, "trims", digits=0),
             rng(label, "trim_ms_mean", digits=2), rng(label, "trim_freed_mean", 1 / MI, 0), rng(label, "check_us_mean", digits=0),
             rng(label, "cpu_s", digits=2), rng(label, "sys_s", digits=2), rng(label, "minflt", 1 / 1000, 0),
             rng(label, "rss_held", 1 / MI, 0), rng(label, "rss_after_free", 1 / MI, 0)] for label in VARIANTS if label in runs]
    return "\n".join([
        "# Loading big sklearn models under glibc malloc settings", "", machine_md(data["machine"]), "",
        f"Command: `{data['command']}`", "",
        f"One python per variant and round loads the {st['models']} bench_peers forests (19–49 MiB) in an LRU loop of "
        f"{st['held']} held ({st['steps']} uniform picks), freeing the oldest before each load; ranges over {st['rounds']} rounds "
        "(rotating order). No server: this is joblib.load and the allocator alone.", "",
        md_table(["variant", "load ms mean", "load ms p50", "trims", "trim ms mean", "MiB a trim gave back", "check µs",
                  "CPU s", "of which system s", "minor faults (k)", "RSS, 20 held (MiB)", "RSS after freeing all (MiB)"], rows), "",
        "RSS after freeing all is the interpreter and libraries (~160 MiB) plus what the allocator kept of freed models.",
        "\"Resident free\" is RSS minus malloc's bytes in use (mallinfo2 uordblks + hblkhd) minus what it was right after the "
        "last trim (agent/runtimes/mlserver_repository.py `Reserve`); \"check µs\" is one such reading (mallinfo2 walks every "
        "free chunk, + /proc/self/statm). mallinfo2's `fordblks` alone is no measure of what a trim can give back: it still "
        "counts free chunks whose pages an earlier trim released, so past its bound it trims after almost every call "
        "(the fordblks row).", "",
    ])


def main(argv: list[str] | None = None) -> int:
    args = arg_parser(__doc__, models=100, held=20,
                      steps=Flag(150, "Zipf-free uniform picks per variant (hits skip the load)"), rounds=2,
                      workdir=Flag(Path(tempfile.gettempdir()) / "modelshelf-bench-peers",
                                   "where bench_peers keeps its model files (written if missing)"),
                      out="load_malloc").parse_args(argv)
    from bench_peers import write_forests

    store = args.workdir / f"store-big-{args.models}"
    write_forests(store, args.models)
    info = machine()
    t0 = time.monotonic()
    labels = list(VARIANTS)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in labels}
    for rnd in range(args.rounds):
        for label in labels[rnd % len(labels):] + labels[:rnd % len(labels)]:
            env_over, mode = VARIANTS[label]
            res = run_variant(store, env_over, mode, args.held, args.steps)
            res["loadavg"] = loadavg()
            runs[label].append(res)
            print(label, json.dumps(res), flush=True)
    info["loadavg_at_end"] = loadavg()
    data = {"benchmark": "load_malloc", "command": command_line(), "machine": info, "settings": settings_of(args),
            "runs": runs, "total_s": round(time.monotonic() - t0, 1)}
    md = markdown(data)
    publish(args.out, md, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
