"""Peers: modelshelf beside Ray Serve model multiplexing and MLServer with every model loaded.

    make bench-peers                                              # the full run, under the bench lock
    .venv/bin/python benchmarks/bench_peers.py           # the same
    .venv/bin/python benchmarks/bench_peers.py --quick   # a short look
    .venv/bin/python benchmarks/bench_peers.py --workloads small --rounds 1 --requests 500 --out ''

Needs Ray Serve in its own venv: `make ray` creates `.venv-ray` (`ray[serve]`, with .venv's
scikit-learn, joblib and numpy versions so it loads the very same model files). Ray never runs
in .venv; benchmarks/peers_ray_app.py is the Ray side (one replica, `@serve.multiplexed`).

Three workloads (issue 13), each on its own set of model files:
- small: --small-models (1,000) tiny sklearn classifiers (bench_density.write_models: one
  logistic regression, distinct bytes per copy), --small-fit (100) fit. modelshelf: every model
  `memory: 10Mi`, `preload: false`, a host budget of exactly that many slots plus the server's
  calibrated runtime overhead (bench_density's calibration); Ray:
  `max_num_models_per_replica = 100`; floor: one MLServer with all of them loaded at start.
- big: --big-models (100) sklearn pipelines (StandardScaler + RandomForest) of 19-49 MiB real
  in-memory size (the forests' node arrays: the file size, which is what a loaded model holds
  once the loader's transient buffers are freed; an RSS check after malloc_trim agreed within
  1%), --big-fit (20) fit. modelshelf: each model declares its size, the budget is
  fit x the mean size + half a model + the calibrated overhead + the allocator reserve (below);
  Ray holds 20 per replica.
  No floor (100 forests in one server is 3.4 GiB of a shared machine).
- hits: --hits-models (100) tiny models, all fit (budget and Ray hold them all); floor: MLServer
  with the same 100 loaded, queried directly. Measures the steady-state data plane.

Traffic: the same V2 infer body (one row of 4 features), Zipf s=--zipf-s (1.1) over each
workload's models (popularity ranks: a seeded permutation), --clients (5) threads each on one
keep-alive connection (bench_density.drive). The systems run side by side for a workload; each
is warmed (one request to each of the `fit` most popular models, then --warmup Zipf requests),
then --rounds rounds, each sending one pass of --requests requests to every system in turn
(the order rotates per round); every system gets the same sequence in a round. Figures are per
pass; the table gives ranges over the rounds and verdicts use the median of the rounds.

--alt-agent-arg adds a second modelshelf (its own agent, MLServer and cache, the same models and
budget) with extra flags, driven in the same rounds: two agent configurations compared
side by side (benchmarks/results/peers.md was run with --alt-agent-arg=--eviction=lfu-decay).
Every agent gets the same room for models (fit x the mean declared size + half a model) plus
what that agent takes from its budget before any model (agent_budget): one calibrated runtime
import per server process that holds models (--server-processes N pays N, as each of Ray's
replicas pays its own; but tiny models all go to the first process, shards.is_quick, so small
and hits pay one: processes_holding) and the embedded server's allocator reserve for each of
those processes (--server-malloc-keep, or the agent's default: 128 MiB per process, all N
together at most 1/8 of the budget; the ledger charges it only for a process that has loaded a
model, MemoryManager.keep_processes). The reserve is memory
the server keeps resident so that the next load reuses warm pages; the agent counts it as a
line of its own, so without it in the budget it comes out of the models' room (an 801 MiB
budget held 14-16 forests, not 20: peers_shards_keep). Adding it is the same room for models,
not a gift: Ray's replica keeps all the memory its models freed (glibc's defaults, no trim) and
no budget counts it; the peak-RSS column, side by side, shows what each system really uses.
--no-reserve-room gives the budget without it (runs before task bigload3).

Per pass: client-side p50/p95/p99, req/s, non-200; CPU seconds of every process tree (agent
alone, its MLServer, Ray's whole tree, the floor MLServer, this process as the client) and the
CPU ms per request of each system's own trees; peak RSS of each tree (sampled every 0.5 s);
the load average; for modelshelf the hit ratio, evictions and a cold-start breakdown: the
delta of every `modelshelf_*_seconds` histogram in /metrics (count and mean), so phases added
later show up without a change here; for Ray its loader's joblib.load count and mean.
"Cold start" is a request's wait for its model on both: modelshelf_cold_start_seconds, and for
Ray the replica's own counter around `get_model` (peers_ray_app.py), with its joblib.load alone
beside it.

Goals (issue 13): small: p95 <= 0.8x Ray's and p50 <= 0.5x Ray's; big: p50 and p95 <= Ray's;
hits: throughput >= 3x Ray's. The machine is shared: results carry the load average, and
`results/peers.md` says the figures are preliminary unless the run was quiet.

Results: benchmarks/results/peers.md, peers.json, peers.svg (bars by hand: no plotting library).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_density import _metric, _pct, calibrate_overhead, drive, model_entries, popular, write_models, zipf_sequence  # noqa: E402
from benchmarks.common import (  # noqa: E402
    MI, RESULTS, ROOT, Agent, Flag, StandaloneMLServer, arg_parser, command_line, free_port, loadavg, machine, machine_md, md_table,
    publish, settings_of, stop_group, tree_rss,
)
from agent.memory import process_tree  # noqa: E402

RAY_VENV = ROOT / ".venv-ray"
RAY_APP = Path(__file__).resolve().parent / "peers_ray_app.py"
TINY_MEMORY = "10Mi"
GOALS = {"small": "p95 <= 0.8x Ray's and p50 <= 0.5x Ray's", "big": "p50 and p95 <= Ray's",
         "hits": "throughput >= 3x Ray's"}
SYSTEMS = ("modelshelf", "modelshelf-alt", "ray", "floor")  # modelshelf-alt: only with --alt-agent-arg
LABELS = {"modelshelf": "modelshelf + MLServer", "modelshelf-alt": "modelshelf + MLServer, --alt-agent-arg",
          "ray": "Ray Serve @serve.multiplexed", "floor": "MLServer, all loaded (floor)"}
TREES = {"modelshelf": ("agent", "agent's MLServer"), "modelshelf-alt": ("alt agent", "alt agent's MLServer"),
         "ray": ("ray",), "floor": ("floor MLServer",)}


# ---------------------------------------------------------------------------------- models
def write_forests(store: Path, count: int, lo_mib: int = 19, hi_mib: int = 49, seed: int = 0) -> list[tuple[Path, int]]:
    """`count` pipeline dirs (StandardScaler + RandomForest, 4 features, 3 classes) whose sizes
    spread evenly over lo..hi MiB: one forest is fitted on noise (fully grown trees, ~2 MiB each),
    each model takes the first k of its trees and nudges the scaler (distinct bytes, one fit).
    Returns (dir, bytes of model.joblib) per model."""
    dirs = [store / f"f{i:03d}" for i in range(count)]
    if all((d / "model.joblib").exists() for d in dirs):
        return [(d, (d / "model.joblib").stat().st_size) for d in dirs]
    import pickle

    import joblib
    import numpy as np
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(40000, 4)), rng.integers(0, 3, 40000)
    n_trees = 40
    base = make_pipeline(StandardScaler(), RandomForestClassifier(n_estimators=n_trees, random_state=seed, n_jobs=-1)).fit(x, y)
    base[-1].n_jobs = None  # served one row at a time: no thread pool per predict
    per_tree = statistics.fmean(len(pickle.dumps(t)) for t in base[-1].estimators_[:5])
    out = []
    for i, d in enumerate(dirs):
        target = (lo_mib + (hi_mib - lo_mib) * i / max(1, count - 1)) * MI
        k = max(1, min(n_trees, round(target / per_tree)))
        model = copy.copy(base)
        model.steps = [(name, copy.deepcopy(step) if name == "standardscaler" else step) for name, step in base.steps]
        forest = copy.copy(base[-1])
        forest.estimators_ = base[-1].estimators_[:k]
        forest.n_estimators = k
        model.steps[-1] = (model.steps[-1][0], forest)
        model[0].mean_ = model[0].mean_ + 1e-9 * (i + 1)
        d.mkdir(parents=True, exist_ok=True)
        joblib.dump(model, d / "model.joblib.tmp")
        os.replace(d / "model.joblib.tmp", d / "model.joblib")
        out.append((d, (d / "model.joblib").stat().st_size))
    return out


# ---------------------------------------------------------------------------------- processes
class RayServe:
    """benchmarks/peers_ray_app.py in .venv-ray, on a free port; stop() ends its whole tree."""

    def __init__(self, workdir: Path, store: Path, max_models: int):
        py = RAY_VENV / "bin" / "python"
        if not py.exists():
            raise SystemExit(f"Ray Serve is not installed: {RAY_VENV.name} is missing; run `make ray` "
                             "(creates it without touching .venv), then run this again")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(workdir / "ray.log", "ab")
        self.proc = subprocess.Popen([str(py), str(RAY_APP), "--store", str(store), "--max-models", str(max_models),
                                      "--port", str(self.port)], cwd=workdir, stdout=subprocess.PIPE, stderr=self._log,
                                     env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, start_new_session=True)
        self.log_path = workdir / "ray.log"

    def wait_ready(self, timeout: float = 180) -> "RayServe":
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline().decode()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not result or not result[0].startswith("READY"):
            self.stop()
            raise RuntimeError(f"Ray Serve did not start; log tail:\n{self.log_path.read_text(errors='replace')[-3000:]}")
        return self

    def stats(self) -> dict[str, float]:
        from benchmarks.common import http

        status, body = http("GET", self.url + "/-/stats")
        return json.loads(body) if status == 200 else {}

    def stop(self) -> None:
        tree = process_tree(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)  # the app shuts Serve and Ray down, then exits
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            stop_group(self.proc)
        for p in tree:  # Ray's helpers that outlived the shutdown: started by us, ended by pid
            try:
                p.kill()
            except psutil.Error:
                pass
        self._log.close()


def start_floor(workdir: Path, dirs: list[Path], attempts: int = 3, timeout: float = 900) -> StandaloneMLServer:
    """A standalone MLServer with every model in `dirs` loaded at start, ready. Its ports are
    picked free and bound a moment later; on a busy machine another process can take one
    meanwhile and the server exits: then it is started again on new ports."""
    for attempt in range(1, attempts + 1):
        shutil.rmtree(workdir, ignore_errors=True)  # its repository must hold exactly these models
        srv = StandaloneMLServer(workdir, {d.name: d for d in dirs})
        deadline = time.monotonic() + timeout
        while srv.proc.poll() is None and time.monotonic() < deadline:
            try:
                return srv.wait_ready(5)
            except TimeoutError:
                pass
        log = (workdir / "mlserver.log").read_text(errors="replace")[-2000:]
        srv.stop()
        print(f"floor MLServer did not start (attempt {attempt}, exit {srv.proc.returncode}); log tail:\n{log}", flush=True)
    raise RuntimeError(f"floor MLServer did not start in {attempts} attempts; see {workdir / 'mlserver.log'}")


def run_settings(agent_args: list[str]) -> tuple[argparse.Namespace, Any]:
    """`modelshelf run` arguments as the agent reads them: its parser's namespace and its
    Settings (agent.cli.build_parser, settings_from_args)."""
    from agent.cli import build_parser, settings_from_args

    options = build_parser().parse_args(["run", "--config-dir", ".", "--cache-dir", ".", *agent_args])
    return options, settings_from_args(options)


def server_processes(agent_args: list[str]) -> int:
    """The --server-processes N among `modelshelf run` arguments (1 when absent)."""
    return run_settings(agent_args)[1].server_processes


def malloc_reserve(agent_args: list[str], room: int, holding: int | None = None) -> int:
    """The allocator reserve (bytes) a `modelshelf run` with these arguments charges beside a
    budget of ``room`` + that reserve: --server-malloc-keep K per server process that holds
    models (``holding`` of the N, default all: the ledger charges K only for a process that
    has loaded one, MemoryManager.keep_processes), K given or the agent's default (agent.cli:
    DEFAULT_SERVER_MALLOC_KEEP per process, all N together at most 1/MALLOC_KEEP_SHARE of the
    budget), solved so that what is left for models and runtime imports is ``room``. 0 with
    --server other than MLServer or a sidecar."""
    from agent.memory.budget import default_malloc_keep
    from agent.settings import DEFAULT_SERVER_MALLOC_KEEP

    options, settings = run_settings(agent_args)
    if settings.server != "mlserver" or settings.server_url:
        return 0
    n = settings.server_processes
    h = n if holding is None else max(1, min(n, holding))
    if options.server_malloc_keep is not None:  # given (the agent's default is computed from the budget)
        return options.server_malloc_keep * h
    cap = DEFAULT_SERVER_MALLOC_KEEP * n  # budget B = room + h x K(B), K(B) = min(cap, B / SHARE) // n
    budget = room
    for _ in range(64):  # from below, monotone: each step moves at most h / (SHARE x n) <= 1/8 as far as the last
        nxt = room + default_malloc_keep(budget, cap) // n * h
        if nxt == budget:
            break
        budget = nxt
    return budget - room


def agent_budget(agent_args: list[str], overhead: int, models_room: int, reserve: bool,
                 holding: int | None = None) -> tuple[int, int]:
    """(--host-memory, the reserve it includes) for an agent with these arguments: the same room
    for models whatever its flags: ``models_room`` + one calibrated runtime import per server
    process that holds models (each pays its own, as each of Ray's replicas does; ``holding``
    of the N, default all: the ledger charges a process only once it loads a model, and tiny
    models all go to the first, see ``processes_holding``) + with ``reserve`` the allocator
    reserve the agent charges in its budget for those processes (malloc_reserve)."""
    n = server_processes(agent_args)
    h = n if holding is None else max(1, min(n, holding))
    room = models_room + h * int(overhead)
    kept = malloc_reserve(agent_args, room, h) if reserve else 0
    return room + kept, kept


def processes_holding(agent_args: list[str], dirs: list[Path]) -> int:
    """How many of an agent's server processes will hold these models: with --server-processes N
    quick models (files under shards.QUICK_BYTES) all go to the first process (shards.is_quick),
    so 1 when every model is quick; else all N (a big model goes to the emptier process)."""
    from agent.runtimes.shards import is_quick

    n = server_processes(agent_args)
    quick = all(is_quick(None, sum(f.stat().st_size for f in d.rglob("*") if f.is_file())) for d in dirs)
    return 1 if quick else n


class TreeSampler:
    """CPU seconds (delta between start and stop) and peak RSS of named process trees; a tree
    is (root pid, include descendants); a tuple of roots is several trees counted as one (an
    agent's --server-processes N servers). Processes that exit during the pass lose their CPU."""

    def __init__(self, trees: dict[str, tuple[int | tuple[int, ...], bool]], interval: float = 0.5):
        self.trees, self.interval = trees, interval
        self.peak = {name: 0 for name in trees}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _procs(self, name: str) -> list[psutil.Process]:
        pid, tree = self.trees[name]
        if isinstance(pid, tuple):
            return [p for root in pid for p in (process_tree(root) if tree else process_tree(root)[:1])]
        return process_tree(pid) if tree else process_tree(pid)[:1]

    def _cpu(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for name in self.trees:
            out[name] = {}
            for p in self._procs(name):
                try:
                    t = p.cpu_times()
                    out[name][p.pid] = t.user + t.system
                except psutil.Error:
                    pass
        return out

    def sample(self) -> None:
        for name, (pid, tree) in self.trees.items():
            rss = tree_rss(pid) if tree else sum(p.memory_info().rss for p in self._procs(name))
            self.peak[name] = max(self.peak[name], rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except psutil.Error:
                pass

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)

    def __enter__(self) -> "TreeSampler":
        self._busy0 = self._busy()
        self._cpu0 = self._cpu()
        self.sample()
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join(5)
        self.sample()
        cpu1 = self._cpu()
        self.cpu_s = {name: round(sum(v - self._cpu0[name].get(pid, 0.0) for pid, v in cpu1[name].items()), 3) for name in cpu1}
        # the whole machine's busy CPU minus our trees: what other people's work took meanwhile
        self.others_cpu_s = round(max(0.0, self._busy() - self._busy0 - sum(self.cpu_s.values())), 3)


# ---------------------------------------------------------------------------------- metrics
def histogram_deltas(m0: dict[str, float], m1: dict[str, float]) -> dict[str, dict[str, float]]:
    """Every modelshelf_*_seconds histogram that moved: {'name{labels}': {count, mean_ms}}, and
    `over_100ms` where the histogram has a 0.1 s bucket: how many took longer (a mean hides a
    tail: one tiny model's load that read 100+ ms on a busy server moved its placement)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in m1.items():
        base, brace, labels = key.partition("{")
        if not (base.startswith("modelshelf_") and base.endswith("_seconds_count")):
            continue
        name, labels = base[: -len("_count")], brace + labels
        n = value - m0.get(key, 0.0)
        if n > 0:
            s = m1.get(f"{name}_sum{labels}", 0.0) - m0.get(f"{name}_sum{labels}", 0.0)
            row = out[name[len("modelshelf_"): -len("_seconds")] + labels] = {"count": int(n), "mean_ms": round(1000 * s / n, 2)}
            bucket = f'{name}_bucket{{le="0.1"' + (f",{labels[1:]}" if labels else "}")  # prometheus_client writes le first
            if bucket in m1:
                row["over_100ms"] = int(n - (m1[bucket] - m0.get(bucket, 0.0)))
    return out


def memory_view(status: dict[str, Any]) -> dict[str, Any]:
    """The agent's two views of host memory, how many models it holds and the runtime imports
    it charges (host bytes per server process, as measured from each runtime's first load; from /status)."""
    real = ((status.get("reality") or {}).get("devices") or {}).get("host") or {}
    ledger = ((status.get("ledger") or {}).get("devices") or {}).get("host") or {}
    imports = {rt: c.get("host") for rt, c in ((status.get("ledger") or {}).get("runtime_imports") or {}).items()}
    return {"loaded": sum(1 for m in status["models"].values() if m["state"] == "loaded"), "ledger_used": ledger.get("used"),
            "real": real.get("real"), "excess": real.get("excess"), "budget": status["memory"]["host"]["budget"],
            "runtime_imports": imports,
            # --server-processes N: models held by each process (which ones imported a runtime)
            "per_process": [len(p.get("models", ())) for p in (status.get("server") or {}).get("processes") or ()]}


def latency_figures(res: list[tuple[float, int, str]], wall: float) -> dict[str, Any]:
    ok = [lat * 1000 for lat, code, _ in res if code == 200]
    codes: dict[str, int] = {}
    for _, code, _ in res:
        codes[str(code)] = codes.get(str(code), 0) + 1
    return {"requests": len(res), "codes": codes, "non_200": len(res) - len(ok),
            "p50_ms": round(_pct(ok, 50), 2), "p95_ms": round(_pct(ok, 95), 2), "p99_ms": round(_pct(ok, 99), 2),
            "mean_ms": round(statistics.fmean(ok), 2) if ok else None, "rps": round(len(res) / wall, 1), "wall_s": round(wall, 2)}


# ---------------------------------------------------------------------------------- one workload
def workload_models(name: str, work: Path, args: argparse.Namespace) -> tuple[list[Path], list[dict[str, Any]], int, str]:
    """(model dirs, agent entries, models that fit, declared memory of the first model)."""
    if name == "big":
        forests = write_forests(work / f"store-big-{args.big_models}", args.big_models)  # sizes spread by count
        entries = [{"name": d.name, "uri": str(d), "runtime": "sklearn", "memory": str(size + MI), "preload": False}
                   for d, size in forests]
        return [d for d, _ in forests], entries, args.big_fit, entries[0]["memory"]
    n = args.small_models if name == "small" else args.hits_models
    dirs = write_models(work / "store-small", max(args.small_models, args.hits_models))[:n]
    return dirs, model_entries(dirs, n, TINY_MEMORY), (args.small_fit if name == "small" else n), TINY_MEMORY


def run_workload(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    dirs, entries, fit, first_memory = workload_models(name, work, args)
    names = [d.name for d in dirs]
    store = dirs[0].parent
    print(f"[{name}] {len(dirs)} models ready in {time.monotonic() - t0:.1f}s; {fit} fit", flush=True)
    from agent.quantity import parse_quantity

    cal = argparse.Namespace(model_memory=first_memory, model_memory_bytes=parse_quantity(first_memory), entry=None)
    overhead = calibrate_overhead(work / f"calibrate-{name}", dirs, cal)
    declared = [parse_quantity(e["memory"]) for e in entries]
    mean_model = statistics.fmean(declared)
    models_room = int(fit * mean_model + mean_model / 2)
    holding = processes_holding(args.agent_arg, dirs)
    budget, reserve = agent_budget(args.agent_arg, overhead, models_room, not args.no_reserve_room, holding)
    print(f"[{name}] calibrated overhead {overhead / MI:.1f}Mi, allocator reserve {reserve / MI:.1f}Mi "
          f"-> --host-memory {budget / MI:.1f}Mi", flush=True)

    systems: dict[str, Any] = {}
    alt_budget = alt_reserve = None
    ranked = popular(names, args.seed)
    warm = ranked[:fit] + zipf_sequence(names, args.warmup, args.zipf_s, args.seed + 1)
    try:
        if name != "big" and not args.no_floor:  # first: loading every model at start is the longest start
            systems["floor"] = start_floor(work / f"floor-{name}", dirs)
        agent = Agent(work / f"agent-{name}", entries, "--host-memory", str(budget), "--min-residency", f"{args.min_residency:g}",
                      "--resync-interval", "600", "--load-timeout", "60", *args.agent_arg,
                      entry=shlex.split(args.agent_entry) if args.agent_entry else None)
        systems["modelshelf"] = agent
        if args.alt_agent_arg:  # the same agent with other flags, driven in the same rounds
            # the same room for models (agent_budget): --server-processes N pays N runtime
            # imports, --server-malloc-keep its own reserve
            alt_args = [*args.agent_arg, *args.alt_agent_arg]
            alt_budget, alt_reserve = agent_budget(alt_args, overhead, models_room, not args.no_reserve_room,
                                                   processes_holding(alt_args, dirs))
            print(f"[{name}] alt: allocator reserve {alt_reserve / MI:.1f}Mi -> --host-memory {alt_budget / MI:.1f}Mi", flush=True)
            systems["modelshelf-alt"] = Agent(work / f"agent-alt-{name}", entries, "--host-memory", str(alt_budget), "--min-residency",
                                              f"{args.min_residency:g}", "--resync-interval", "600", "--load-timeout", "60",
                                              *args.agent_arg, *args.alt_agent_arg)
        ray = RayServe(work / f"ray-{name}", store, fit)
        systems["ray"] = ray
        agents = {s: a for s, a in systems.items() if s.startswith("modelshelf")}
        for a in agents.values():
            a.wait_ready(180)
            a.wait_models(lambda ms: len(ms) == len(entries) and all(m["state"] == "cached" for m in ms.values()), 300, "cached")
        ray.wait_ready()
        urls = {s: systems[s].url for s in systems}
        server_pid = agent.server_pids
        trees = {"agent": (agent.proc.pid, False), "agent's MLServer": (server_pid, True), "ray": (ray.proc.pid, True),
                 "client": (os.getpid(), False)}
        if "floor" in systems:
            trees["floor MLServer"] = (systems["floor"].proc.pid, True)
        if "modelshelf-alt" in systems:
            alt = systems["modelshelf-alt"]
            trees["alt agent"], trees["alt agent's MLServer"] = (alt.proc.pid, False), (alt.server_pids, True)
        own = TREES
        warm_non_200 = {}
        for s in systems:  # warm-up: not measured
            w0 = time.monotonic()
            res = drive(urls[s], warm, args.clients)
            warm_non_200[s] = sum(1 for _, c, _ in res if c != 200)
            print(f"[{name}] warm-up {s}: {len(res)} requests in {time.monotonic() - w0:.1f}s, non-200 {warm_non_200[s]}", flush=True)
        passes: list[dict[str, Any]] = []
        order = [s for s in SYSTEMS if s in systems]
        for r in range(args.rounds):
            seq = zipf_sequence(names, args.big_requests if name == "big" else args.requests, args.zipf_s, args.seed + 10 + r)
            for s in order[r % len(order):] + order[: r % len(order)]:
                la = loadavg()
                m0 = agents[s].metrics() if s in agents else {}
                st0 = ray.stats() if s == "ray" else {}
                with TreeSampler(trees) as sampler:
                    w0 = time.monotonic()
                    res = drive(urls[s], seq, args.clients)
                    wall = time.monotonic() - w0
                p = {"system": s, "round": r + 1, **latency_figures(res, wall), "loadavg_start": la, "loadavg_end": loadavg(),
                     "cpu_s": sampler.cpu_s, "others_cpu_s": sampler.others_cpu_s, "peak_rss": sampler.peak}
                p["cpu_ms_per_request"] = round(1000 * sum(sampler.cpu_s[t] for t in own[s]) / max(1, len(res)), 3)
                if s in agents:
                    m1 = agents[s].metrics()
                    hits = _metric(m1, 'modelshelf_loaded_lookups_total{result="hit"}') - _metric(m0, 'modelshelf_loaded_lookups_total{result="hit"}')
                    misses = _metric(m1, 'modelshelf_loaded_lookups_total{result="miss"}') - _metric(m0, 'modelshelf_loaded_lookups_total{result="miss"}')
                    p["misses"] = int(misses)
                    p["hit_ratio"] = round(hits / (hits + misses), 4) if hits + misses else None
                    p["evictions"] = int(_metric(m1, "modelshelf_evictions_total") - _metric(m0, "modelshelf_evictions_total"))
                    p["breakdown"] = histogram_deltas(m0, m1)
                    p["cold_start_mean_ms"] = p["breakdown"].get("cold_start", {}).get("mean_ms")
                    p["memory_at_end"] = memory_view(agents[s].status())
                elif s == "ray":
                    st1 = ray.stats()
                    loads, waits = (st1.get(k, 0) - st0.get(k, 0) for k in ("loads", "waits"))
                    p["misses"] = int(waits)
                    p["loads"] = int(loads)
                    p["cold_start_mean_ms"] = round(1000 * (st1["wait_seconds"] - st0["wait_seconds"]) / waits, 2) if waits else None
                    p["joblib_load_mean_ms"] = round(1000 * (st1["load_seconds"] - st0["load_seconds"]) / loads, 2) if loads else None
                passes.append(p)
                print(f"[{name}] round {r + 1} {s}: p50={p['p50_ms']} p95={p['p95_ms']} rps={p['rps']} non200={p['non_200']} "
                      f"misses={p.get('misses')} cold={p.get('cold_start_mean_ms')} cpu/req={p['cpu_ms_per_request']}ms "
                      f"load={p['loadavg_end'][0]} others_cpu={p['others_cpu_s']}s", flush=True)
        status = agent.status()
        loaded = [(m["memory"] or {}).get("host", 0) for m in status["models"].values() if m["state"] == "loaded"]
    finally:
        for s in systems.values():
            s.stop()
    return {"workload": name, "models": len(dirs), "fit": fit, "host_budget_bytes": budget, "calibrated_overhead_bytes": overhead,
            "malloc_reserve_bytes": reserve, "alt_host_budget_bytes": alt_budget, "alt_malloc_reserve_bytes": alt_reserve,
            "model_bytes_min": min(declared), "model_bytes_max": max(declared), "warmup_requests": len(warm),
            "warmup_non_200": warm_non_200, "passes": passes,
            "loaded_at_end": len(loaded), "reserved_mean_bytes": int(statistics.fmean(loaded)) if loaded else None,
            "summary": summarize(passes), "total_s": round(time.monotonic() - t0, 1)}


# ---------------------------------------------------------------------------------- verdicts
def summarize(passes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per system: median and (min, max) over rounds of each figure."""
    out: dict[str, dict[str, Any]] = {}
    for s in SYSTEMS:
        mine = [p for p in passes if p["system"] == s]
        if not mine:
            continue
        row: dict[str, Any] = {"rounds": len(mine)}
        for key in ("p50_ms", "p95_ms", "p99_ms", "rps", "cold_start_mean_ms", "cpu_ms_per_request", "non_200"):
            vals = [p[key] for p in mine if p.get(key) is not None]
            row[key] = {"median": round(statistics.median(vals), 2), "min": min(vals), "max": max(vals)} if vals else None
        out[s] = row
    return out


def verdict(w: dict[str, Any], system: str = "modelshelf") -> dict[str, Any]:
    ms, ray = w["summary"].get(system), w["summary"].get("ray")
    if not ms or not ray:
        return {"goal": GOALS[w["workload"]], "verdict": "not run"}
    med = lambda row, k: row[k]["median"]  # noqa: E731

    def per_round(check) -> list[bool]:
        out = []
        for r in sorted({p["round"] for p in w["passes"]}):
            a = next((p for p in w["passes"] if p["round"] == r and p["system"] == system), None)
            b = next((p for p in w["passes"] if p["round"] == r and p["system"] == "ray"), None)
            if a and b:
                out.append(check(lambda k: a[k], lambda k: b[k]))
        return out

    if w["workload"] == "small":
        check = lambda a, b: a("p95_ms") <= 0.8 * b("p95_ms") and a("p50_ms") <= 0.5 * b("p50_ms")  # noqa: E731
        ratios = {"p95_ratio": med(ms, "p95_ms") / med(ray, "p95_ms"), "p50_ratio": med(ms, "p50_ms") / med(ray, "p50_ms")}
        met = ratios["p95_ratio"] <= 0.8 and ratios["p50_ratio"] <= 0.5
    elif w["workload"] == "big":
        check = lambda a, b: a("p95_ms") <= b("p95_ms") and a("p50_ms") <= b("p50_ms")  # noqa: E731
        ratios = {"p95_ratio": med(ms, "p95_ms") / med(ray, "p95_ms"), "p50_ratio": med(ms, "p50_ms") / med(ray, "p50_ms")}
        met = ratios["p95_ratio"] <= 1.0 and ratios["p50_ratio"] <= 1.0
    else:
        check = lambda a, b: a("rps") >= 3 * b("rps")  # noqa: E731
        ratios = {"throughput_ratio": med(ms, "rps") / med(ray, "rps")}
        met = ratios["throughput_ratio"] >= 3.0
    rounds = per_round(check)
    return {"goal": GOALS[w["workload"]], "ratios": {k: round(v, 3) for k, v in ratios.items()}, "verdict": "met" if met else "missed",
            "rounds_meeting_goal": f"{sum(rounds)} of {len(rounds)}"}


# ---------------------------------------------------------------------------------- report
def _rng(cell: dict[str, Any] | None, digits: int = 3) -> str:
    if not cell:
        return "–"
    fmt = lambda v: f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:,.0f}"  # noqa: E731
    return fmt(cell["min"]) if cell["min"] == cell["max"] else f"{fmt(cell['min'])}–{fmt(cell['max'])}"


def _memory_note(mem: dict[str, Any] | None) -> str:
    if not mem:
        return ""
    imports = "".join(f", {rt} import {(b or 0) / MI:.1f} MiB per server process" for rt, b in (mem.get("runtime_imports") or {}).items())
    return (f"; at the pass's end {mem['loaded']} loaded, ledger {(mem['ledger_used'] or 0) / MI:.0f} MiB, real "
            f"{(mem['real'] or 0) / MI:.0f} MiB, excess {(mem['excess'] or 0) / MI:.0f} MiB, budget {mem['budget'] / MI:.0f} MiB"
            + imports + (f", models per server process {'/'.join(map(str, mem['per_process']))}"
                         if len(mem.get("per_process") or ()) > 1 else ""))


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    quiet = data["quiet"]
    lines = [
        "# Peers: modelshelf vs Ray Serve multiplexing vs MLServer with every model loaded",
        "",
        f"Command: `{data['command']}`",
        "",
        machine_md(m),
        "",
        ("Figures measured on a quiet machine." if quiet else
         "**Preliminary figures**: the machine was shared with other engineers' work during this run (the load "
         "average and other processes' CPU seconds per pass are in the CPU table below); re-run on a quiet machine."),
        "",
        f"Traffic: Zipf s={data['settings']['zipf_s']}, {data['settings']['clients']} keep-alive clients, "
        f"{data['settings']['requests']} requests per pass ({data['settings']['big_requests']} for big), {data['settings']['rounds']} interleaved rounds (order rotates), "
        "the same sequence for every system in a round; ranges are over the rounds. The client, the agent, MLServer "
        "and Ray share the machine's cores. Cold start: a request's wait for its model to load (its own load or one it queued "
        "behind): modelshelf's `modelshelf_cold_start_seconds`; Ray's measured around `get_model` in the replica, "
        "which also gives Ray's `joblib.load` alone (in the breakdown below).",
        "",
        "| workload | system | p50 ms | p95 ms | p99 ms | req/s | cold start mean ms | misses/pass | CPU ms/request | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in data["workloads"]:
        desc = {"small": f"{w['models']:,} tiny sklearn models, {w['fit']} fit",
                "big": f"{w['models']} RandomForest pipelines of {w['model_bytes_min'] / MI - 1:.0f}–{w['model_bytes_max'] / MI - 1:.0f} MiB, {w['fit']} fit",
                "hits": f"{w['models']} tiny models, all fit"}[w["workload"]]
        for i, s in enumerate(s for s in SYSTEMS if s in w["summary"]):
            row = w["summary"][s]
            mine = [p for p in w["passes"] if p["system"] == s]
            misses = [p["misses"] for p in mine if p.get("misses") is not None]
            tree = TREES[s]
            rss = max(sum(p["peak_rss"].get(t, 0) for t in tree) for p in mine)
            label = LABELS[s] if s != "modelshelf-alt" else f"modelshelf + MLServer, {' '.join(data['settings']['alt_agent_arg'])}"
            if s == "modelshelf" and data["settings"].get("agent_arg"):
                label += ", " + " ".join(data["settings"]["agent_arg"])
            if s == "modelshelf" and data["settings"].get("agent_entry"):
                label += " (the --agent-entry code)"
            lines.append(f"| {desc if i == 0 else ''} | {label} | {_rng(row['p50_ms'])} | {_rng(row['p95_ms'])} | "
                         f"{_rng(row['p99_ms'])} | {_rng(row['rps'], 4)} | {_rng(row['cold_start_mean_ms'])} | "
                         f"{(f'{min(misses)}–{max(misses)}' if misses and min(misses) != max(misses) else (misses[0] if misses else '–'))} | "
                         f"{_rng(row['cpu_ms_per_request'])} | {rss / MI:.0f} |")
    lines += ["", "What modelshelf held (its ledger at the end of the workload): "
              + "; ".join(f"{w['workload']}: {w['loaded_at_end']} of {w['models']} loaded, reserving "
                          f"{(w['reserved_mean_bytes'] or 0) / MI:.1f} MiB each on average (declared, size + 1 MiB for big: "
                          f"{w['model_bytes_min'] / MI:.0f}–{w['model_bytes_max'] / MI:.0f} MiB; budget "
                          f"{w['host_budget_bytes'] / MI:.0f} MiB incl. {w['calibrated_overhead_bytes'] / MI:.0f} MiB "
                          f"for the runtime import per server process and {(w.get('malloc_reserve_bytes') or 0) / MI:.0f} MiB "
                          "for the allocator reserve"
                          + (f"; alt: budget {w['alt_host_budget_bytes'] / MI:.0f} MiB incl. a reserve of "
                             f"{(w.get('alt_malloc_reserve_bytes') or 0) / MI:.0f} MiB" if w.get("alt_host_budget_bytes") else "")
                          + ")" for w in data["workloads"]) + ". Ray holds `fit` models by count. The budgets are the same "
              "room for models (fit x the mean size + half a model) plus what each agent takes from its budget before "
              "any model: its runtime imports and its allocator reserve (memory a server keeps resident for the next "
              "load; Ray's replica keeps all its freed memory, unbudgeted): the peak RSS column shows what each system "
              "really used.", ""]
    lines += ["## Verdicts (medians over the rounds)", ""]
    for w in data["workloads"]:
        for alt, v in ((False, w["verdict"]), (True, w.get("verdict_alt"))):
            if v is None:
                continue
            ratios = ", ".join(f"{k} {x}" for k, x in (v.get("ratios") or {}).items())
            lines.append(f"- {w['workload']}{' (modelshelf-alt: ' + ' '.join(data['settings']['alt_agent_arg']) + ')' if alt else ''}: "
                         f"goal {v['goal']}: {ratios} → **{v['verdict']}** ({v.get('rounds_meeting_goal', '–')} rounds meet it on their own)")
    lines += alt_comparison(data)
    lines += ["", "## Cold-start breakdown (per pass; modelshelf: every agent /metrics histogram that moved, count × mean ms)", ""]
    for w in data["workloads"]:
        for p in (p for p in w["passes"] if p["system"].startswith("modelshelf")):
            parts = ", ".join(f"{k} {v['count']}×{v['mean_ms']}" + (f" ({v['over_100ms']} over 100 ms)" if v.get("over_100ms") else "")
                              for k, v in sorted(p.get("breakdown", {}).items()))
            ray = next((q for q in w["passes"] if q["system"] == "ray" and q["round"] == p["round"]), {})
            lines.append(f"- {w['workload']} round {p['round']}{' (alt)' if p['system'] == 'modelshelf-alt' else ''}: Ray: {ray.get('misses')} waits × {ray.get('cold_start_mean_ms')} ms, "
                         f"{ray.get('loads')} loads, joblib.load {ray.get('joblib_load_mean_ms')} ms; modelshelf: hit ratio {p.get('hit_ratio')}, evictions {p.get('evictions')}; "
                         f"{parts or 'no histogram moved'}" + _memory_note(p.get("memory_at_end")))
    lines += ["", "## CPU seconds per pass, every process tree", ""]
    trees = sorted({t for w in data["workloads"] for p in w["passes"] for t in p["cpu_s"]})
    rows = [[w["workload"], p["round"], p["system"], p["requests"], p["wall_s"], *[p["cpu_s"].get(t) for t in trees],
             p["others_cpu_s"], round(p["others_cpu_s"] / p["wall_s"], 2) if p["wall_s"] else None, p["loadavg_end"][0]]
            for w in data["workloads"] for p in w["passes"]]
    lines += [md_table(["workload", "round", "system driven", "requests", "wall s", *trees, "other processes",
                        "other processes, cores", "load avg (end)"], rows), "",
              "The trees not driven in a pass show what each system costs while idle beside the others; \"other processes\" "
              "is the machine's busy CPU minus all of these trees (other people's work on a shared machine), also as "
              "cores taken on average over the pass: a pass that got fewer cores than another is not comparable with it.", ""]
    if data.get("plot"):
        lines += [f"![p50/p95 per workload and system]({data['plot']})", ""]
    lines.append(f"Total time of the benchmark: {data['total_s']:.0f} s.")
    return "\n".join(lines)


def alt_comparison(data: dict[str, Any]) -> list[str]:
    """With --alt-agent-arg: modelshelf-alt against modelshelf round by round (the same request
    sequence in a round), as ratios alt / base, with the CPU other processes took in each pass
    (a pass that got less of the machine is not comparable); verdicts: fewer misses and a lower
    p95 in every round."""
    if not data["settings"].get("alt_agent_arg"):
        return []
    flags = " ".join(data["settings"]["alt_agent_arg"])
    lines = ["", f"## modelshelf-alt ({flags}) vs modelshelf, round by round (same sequence; ratio alt / base)", "",
             "| workload | round | misses base → alt | misses ratio | p50 ratio | p95 ratio | req/s ratio | other processes' CPU s, base / alt |",
             "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for w in data["workloads"]:
        fewer = lower = n = 0
        for r in sorted({p["round"] for p in w["passes"]}):
            a = next((p for p in w["passes"] if p["round"] == r and p["system"] == "modelshelf"), None)
            b = next((p for p in w["passes"] if p["round"] == r and p["system"] == "modelshelf-alt"), None)
            if not a or not b:
                continue
            n += 1
            fewer += b["misses"] < a["misses"]
            lower += b["p95_ms"] < a["p95_ms"]
            ratio = lambda k: f"{b[k] / a[k]:.3f}" if a.get(k) else "–"  # noqa: E731
            lines.append(f"| {w['workload']} | {r} | {a['misses']} → {b['misses']} | {ratio('misses')} | {ratio('p50_ms')} | "
                         f"{ratio('p95_ms')} | {ratio('rps')} | {a['others_cpu_s']} / {b['others_cpu_s']} |")
        if n:
            verdicts.append(f"- {w['workload']}: fewer misses in {fewer} of {n} rounds, lower p95 in {lower} of {n} rounds → "
                            f"**{'better' if fewer == n and lower == n else 'not better in every round'}**")
    return lines + ["", *verdicts]


def plot_svg(data: dict[str, Any], path: Path) -> str:
    """One panel per workload: p50 (solid) and p95 (light) bars per system, log scale, labelled."""
    import math

    ws = [w for w in data["workloads"] if w["summary"]]
    pw, h, pad, top = 300, 320, 50, 40
    colors = {"modelshelf": ("#1565c0", "#90caf9"), "modelshelf-alt": ("#6a1b9a", "#ce93d8"), "ray": ("#ef6c00", "#ffcc80"), "floor": ("#2e7d32", "#a5d6a7")}
    vals = [row[k]["median"] for w in ws for row in w["summary"].values() for k in ("p50_ms", "p95_ms")
            if row.get(k) and math.isfinite(row[k]["median"])]  # a system that answered nothing has no percentiles
    lo, hi = math.log10(max(0.5, min(vals) / 2)), math.log10(max(vals) * 2)
    y = lambda v: h - pad - (h - pad - top) * (math.log10(max(v, 10 ** lo)) - lo) / (hi - lo)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{pw * len(ws) + 20}" height="{h + 20}" font-family="sans-serif" font-size="11">',
             f'<rect width="{pw * len(ws) + 20}" height="{h + 20}" fill="white"/>']
    for i, w in enumerate(ws):
        x0 = 10 + i * pw
        parts.append(f'<text x="{x0 + pad}" y="20" font-weight="bold">{w["workload"]}: {w["models"]} models, {w["fit"]} fit</text>')
        parts.append(f'<line x1="{x0 + pad}" x2="{x0 + pw - 10}" y1="{h - pad}" y2="{h - pad}" stroke="black"/>')
        for e in range(math.ceil(lo), math.floor(hi) + 1):
            parts.append(f'<line x1="{x0 + pad}" x2="{x0 + pw - 10}" y1="{y(10 ** e):.1f}" y2="{y(10 ** e):.1f}" stroke="#ddd"/>'
                         f'<text x="{x0 + pad - 4}" y="{y(10 ** e) + 4:.1f}" text-anchor="end">{10 ** e:g} ms</text>')
        systems = [s for s in SYSTEMS if s in w["summary"]]
        bw = (pw - pad - 20) / (2 * len(systems) + len(systems))
        for j, s in enumerate(systems):
            row = w["summary"][s]
            for k, key in enumerate(("p50_ms", "p95_ms")):
                v = row[key]["median"]
                bx = x0 + pad + 5 + j * 3 * bw + k * bw
                if not math.isfinite(v):
                    continue
                parts.append(f'<rect x="{bx:.1f}" y="{y(v):.1f}" width="{bw - 2:.1f}" height="{h - pad - y(v):.1f}" fill="{colors[s][k]}"/>'
                             f'<text x="{bx + bw / 2:.1f}" y="{y(v) - 3:.1f}" text-anchor="middle" font-size="9">{v:.3g}</text>')
            parts.append(f'<text x="{x0 + pad + 5 + j * 3 * bw + bw:.1f}" y="{h - pad + 14}" text-anchor="middle">{s}</text>'
                         f'<text x="{x0 + pad + 5 + j * 3 * bw + bw:.1f}" y="{h - pad + 27}" text-anchor="middle" font-size="9">'
                         f'{row["rps"]["median"]:.0f} req/s</text>')
    parts.append(f'<text x="10" y="{h + 12}">bars: p50 (dark) and p95 (light), median over rounds, ms, log scale; '
                 f'{"preliminary: shared machine" if not data.get("quiet") else "quiet machine"}</text></svg>')
    path.write_text("\n".join(parts))
    return path.name


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = arg_parser(
        __doc__, quick=Flag(False, "a short look: fewer models and requests, one round"),
        workloads="small,big,hits", rounds=3, requests=Flag(2000, "measured requests per pass (small, hits)"),
        big_requests=Flag(600, "measured requests per pass (big: ~30 req/s here)"),
        warmup=Flag(500, "Zipf warm-up requests per system (after one per fitting model)"), clients=5, zipf_s=1.1,
        small_models=1000, small_fit=100, big_models=100, big_fit=20, hits_models=100,
        min_residency=Flag(0.25, "agent --min-residency (s), as bench_density"),
        agent_arg=Flag([], "an extra `modelshelf run` argument (repeat; e.g. --agent-arg=--memory-tolerance=0.5)"),
        alt_agent_arg=Flag([], "adds a second modelshelf system (modelshelf-alt), driven in the same rounds, with this extra "
                               "`modelshelf run` argument on top of --agent-arg (repeat; e.g. --alt-agent-arg=--eviction=lfu-decay)"),
        no_floor=Flag(False, "skip the MLServer-with-everything-loaded floor"),
        agent_entry=Flag("", "the command that runs the base agent (`... run ARGS` follows), e.g. another checkout's "
                         "`env -C DIR .venv/bin/python -m agent.cli`: an A/B of two versions of the code in one run"),
        no_reserve_room=Flag(False, "budget without the agent's allocator reserve (as before task bigload3): the reserve "
                             "then takes its bytes from the models' room"), seed=1,
        workdir=Flag(Path(tempfile.gettempdir()) / "modelshelf-bench-peers", "model files and caches, kept for the next run"),
        out=Flag("peers", "result name under benchmarks/results/ ('' = don't write)"))
    args = p.parse_args(argv)
    if args.out and (Path(args.out).name != args.out or args.out.startswith(".")):
        p.error(f"--out {args.out!r}: a plain name for benchmarks/results/<name>.md, not a path ('' writes nothing)")
    if args.quick:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        quick = {"--rounds": ("rounds", 1), "--requests": ("requests", 300), "--big-requests": ("big_requests", 150), "--warmup": ("warmup", 100),
                 "--small-models": ("small_models", 200), "--small-fit": ("small_fit", 20),
                 "--big-models": ("big_models", 20), "--big-fit": ("big_fit", 5), "--hits-models": ("hits_models", 30)}
        for flag, (attr, value) in quick.items():
            if flag not in given:
                setattr(args, attr, value)
    t0 = time.monotonic()
    info = machine()
    try:
        ray_version = subprocess.run([str(RAY_VENV / "bin" / "python"), "-c", "import ray; print(ray.__version__)"],
                                     capture_output=True, text=True, timeout=60).stdout.strip() or None
    except OSError:
        ray_version = None
    info["versions"]["ray"] = ray_version
    args.workdir.mkdir(parents=True, exist_ok=True)
    workloads = []
    for name in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        if name not in GOALS:
            raise SystemExit(f"unknown workload {name!r}: one of {', '.join(GOALS)}")
        w = run_workload(name, args.workdir, args)
        w["verdict"] = verdict(w)
        if args.alt_agent_arg:
            w["verdict_alt"] = verdict(w, "modelshelf-alt")
        workloads.append(w)
    info["loadavg_at_end"] = loadavg()
    data = {"benchmark": "peers", "command": command_line(), "machine": info,
            "settings": settings_of(args),
            "workloads": workloads, "total_s": round(time.monotonic() - t0, 1)}
    # quiet: other processes took under 5% of one core during every pass
    data["quiet"] = all(p["others_cpu_s"] <= 0.05 * p["wall_s"] for w in workloads for p in w["passes"])
    if args.out:
        data["plot"] = plot_svg(data, RESULTS / f"{args.out}.svg")
    md = markdown(data)
    publish(args.out, md, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
