"""Reconcile benchmark: config write -> model ready, the agent's CPU per edit among 1,000 models,
and the agent's idle RSS. The real agent (`python -m agent.cli run`) with its embedded MLServer,
driven through a ConfigMap-style directory (`..data` symlink swap, tests/support/configmap.py).

    .venv/bin/python benchmarks/bench_reconcile.py                    # defaults (about 3 minutes)
    .venv/bin/python benchmarks/bench_reconcile.py --edits 50 --models 1000
    .venv/bin/python benchmarks/bench_reconcile.py --agent-cmd "python /tmp/patched_launcher.py"

Parts (each agent runs on its own free loopback port, in a temp dir, and is stopped at the end):

1. Latency. One agent, one small sklearn model on a local path (used in place: always a cache
   hit). Warm-up edits first (MLServer imports sklearn on its first load, ~1-3 s: reported apart,
   not counted). Then per iteration three edits, each one `..data` swap: add the model under a
   new name (-> ready), change its `version` (-> the new copy replaced the old one in place, the
   model never stops serving), remove it (-> unloaded and gone). The end of each edit is seen
   without polling: the agent runs with `--log-format json` and its log comes through a pipe;
   a reader thread stamps every line with time.monotonic() on arrival. "model loaded" is logged
   in the same event-loop step that sets the state LOADED, before /v2/models/NAME/ready can
   answer 200, so the arrival time is at most the pipe's wake-up later than the readiness
   (tens of microseconds; the swap's own timestamp is taken right after rename(2)). Each add is
   checked with one GET /ready (must be 200). A second, shorter pass polls /ready every
   --poll-interval-ms on one keep-alive connection, as a client would, and compares.
   Breakdown per add from the agent's own log timestamps (record.created, microseconds):
   swap -> "config applied" (watch event, 2 ms settle, read, parse, apply), -> "model files
   ready" (cache hit), -> adapter "event=model_loaded" (model-settings.json + MLServer's
   repository load), -> "model loaded" (memory measurement, state LOADED), -> seen by us.
2. CPU per edit among --models models (all `preload: false`: they stay cached, not loaded).
   Agent CPU = sum over the agent's threads of /proc/PID/task/TID/schedstat (nanoseconds; the
   psutil cpu_times figure is shown too, but it counts 10 ms clock ticks). Each edit window
   (swap, wait for the edit's last log line, fill up to --cpu-window s) is paired with an idle
   window of the same length just before it; cost = edit window - idle window rate x length.
   Edits cycle add / change version / remove of one model; models.yaml first, then the same
   config as models.json. Then in this process, on the same agent code: parse cost per format
   (load_config_dir), apply + converge cost (a real Reconciler, cache and memory manager; no
   server is needed for preload: false models), and a cProfile of one edit.
3. RSS (psutil) of the agent process alone, idle with 0 and with --models configured models;
   the MLServer process tree apart.

Results: benchmarks/results/reconcile.md and reconcile.json.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import http.client as httpclient
import io
import json
import os
import pstats
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from benchmarks.common import (  # noqa: E402
    command_line,
    free_port,
    http,
    loadavg,
    machine,
    machine_md,
    md_table,
    tree_rss,
    write_results,
)
from tests.support.configmap import ConfigMapDir  # noqa: E402

MiB = 2**20
PROFILED_EDITS = 5
GOALS = {"p50_ms": 100.0, "edit_cpu_ms": 10.0, "idle_rss_mib": 80.0}

# ------------------------------------------------------------------------------------ helpers


def pct(xs: list[float], q: float) -> float | None:
    """Percentile by linear interpolation (q in 0..100); None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(xs: list[float]) -> dict[str, Any]:
    """n, p50, p90, p99, min, max, mean of a list of numbers (rounded)."""
    if not xs:
        return {"n": 0}
    r = lambda v: round(v, 3)  # noqa: E731
    return {"n": len(xs), "p50": r(pct(xs, 50)), "p90": r(pct(xs, 90)), "p99": r(pct(xs, 99)),
            "min": r(min(xs)), "max": r(max(xs)), "mean": r(statistics.fmean(xs))}


@dataclass
class Line:
    t: float  # time.monotonic() when the line arrived here
    doc: dict[str, Any]


class AgentRun:
    """`modelshelf run` as a subprocess, JSON logs through a pipe, every line time-stamped."""

    def __init__(self, workdir: Path, config_dir: Path, *, agent_cmd: list[str], log_level: str = "info",
                 extra: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[Line] = []
        self._cond = threading.Condition()
        self._raw = open(workdir / f"agent-{self.port}.log", "w", buffering=1)
        cmd = [*agent_cmd, "run", "--config-dir", str(config_dir), "--cache-dir", str(workdir / "cache"),
               "--port", str(self.port), "--resync-interval", "3600", "--log-format", "json",
               "--log-level", log_level, *(extra or [])]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT),
                                          "MODELSHELF_MANAGEMENT_PORT": str(self.port)})  # one port for /status
        self.server_pid: int | None = None
        self._reader = threading.Thread(target=self._read, name="agent-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            t = time.monotonic()
            text = raw.decode(errors="replace").rstrip("\n")
            self._raw.write(text + "\n")
            try:
                doc = json.loads(text)
                if not isinstance(doc, dict):
                    doc = {"msg": text}
            except ValueError:
                doc = {"msg": text, "raw": True}
            with self._cond:
                self.lines.append(Line(t, doc))
                self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def wait(self, pred: Callable[[dict[str, Any]], bool], since: int, timeout: float, what: str) -> Line:
        """The first line at index >= since that matches `pred`."""
        deadline = time.monotonic() + timeout
        i = since
        with self._cond:
            while True:
                while i < len(self.lines):
                    if pred(self.lines[i].doc):
                        return self.lines[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = "\n".join(json.dumps(x.doc)[:300] for x in self.lines[-15:])
                    raise TimeoutError(f"agent: no log line for {what} within {timeout}s; log tail:\n{tail}")
                self._cond.wait(left)

    def find(self, pred: Callable[[dict[str, Any]], bool], since: int, until: int | None = None) -> Line | None:
        with self._cond:
            for line in self.lines[since:until]:
                if pred(line.doc):
                    return line
        return None

    def count(self, pred: Callable[[dict[str, Any]], bool], since: int = 0) -> int:
        with self._cond:
            return sum(1 for line in self.lines[since:] if pred(line.doc))

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if http("GET", self.url + "/readyz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(json.dumps(x.doc)[:300] for x in self.lines[-20:])
                raise RuntimeError(f"agent not ready (exit code {self.proc.poll()}) within {timeout}s; log tail:\n{tail}")
            time.sleep(0.1)
        status, body = http("GET", self.url + "/status")
        self.server_pid = json.loads(body)["server"]["pid"] if status == 200 else None

    def rss(self) -> dict[str, Any]:
        """RSS/USS of the agent process alone, and the server's process tree."""
        p = psutil.Process(self.proc.pid)
        full = p.memory_full_info()
        out = {"agent_rss_mib": round(full.rss / MiB, 1), "agent_uss_mib": round(full.uss / MiB, 1),
               "agent_threads": p.num_threads()}
        if self.server_pid:
            out["server_tree_rss_mib"] = round(tree_rss(self.server_pid) / MiB, 1)
        return out

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the agent's process group; SIGKILL it and the server's group if they linger."""
        server = self.server_pid
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        if server and psutil.pid_exists(server):  # the server runs in its own session
            try:
                os.killpg(server, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._reader.join(5)
        self._raw.close()


_LIVE: list[AgentRun] = []


def _start(*args: Any, **kwargs: Any) -> AgentRun:
    agent = AgentRun(*args, **kwargs)
    _LIVE.append(agent)
    return agent


def _stop_all(*_: Any) -> None:
    while _LIVE:
        _LIVE.pop().stop()


def msg_is(msg: str, model: str | None = None) -> Callable[[dict[str, Any]], bool]:
    return lambda d: d.get("msg") == msg and (model is None or d.get("model") == model)


def adapter_loaded(model: str) -> Callable[[dict[str, Any]], bool]:
    needle = f" model={model} "
    return lambda d: str(d.get("msg", "")).startswith("event=model_loaded") and needle in str(d.get("msg", "")) + " "


def swap_wall(swapped_mono: float) -> float:
    """time.time() of the moment ConfigMapDir.write reported (time.monotonic() right after rename)."""
    return time.time() - (time.monotonic() - swapped_mono)


def model_doc(name: str, uri: Path, **extra: Any) -> dict[str, Any]:
    return {"name": name, "uri": str(uri), "runtime": "sklearn", **extra}


# ------------------------------------------------------------------------------------ part 1


def bench_latency(args: argparse.Namespace, work: Path, store: Path) -> dict[str, Any]:
    cm = ConfigMapDir(work / "config-latency")
    write = lambda models: cm.write({"models.json": json.dumps(models)})  # noqa: E731
    write([])
    agent = _start(work, cm.root, agent_cmd=args.agent_cmd)
    out: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        agent.wait_ready()
        out["agent_start_s"] = round(time.monotonic() - t0, 2)
        time.sleep(args.settle)
        out["rss_idle_0_models"] = agent.rss()
        out["rss_idle_0_models"]["loadavg"] = loadavg()
        conn = httpclient.HTTPConnection("127.0.0.1", agent.port, timeout=10)

        def ready(name: str) -> int:
            conn.request("GET", f"/v2/models/{name}/ready")
            r = conn.getresponse()
            r.read()
            return r.status

        def one_cycle(name: str, uri: Path, *, poll: bool = False) -> dict[str, Any]:
            rec: dict[str, Any] = {"model": name}
            # add
            since = agent.mark()
            sw = write([model_doc(name, uri)])
            wall = swap_wall(sw)
            if poll:
                polls, sends = 0, []
                while True:
                    sends.append(time.monotonic())
                    status = ready(name)
                    polls += 1
                    if status == 200:
                        rec["poll_ready_ms"] = (time.monotonic() - sw) * 1000
                        break
                    if time.monotonic() - sw > 30:
                        raise TimeoutError(f"{name} not ready within 30 s (polling)")
                    time.sleep(args.poll_interval_ms / 1000)
                rec["polls"] = polls
                rec["poll_gap_ms"] = statistics.median([(b - a) * 1000 for a, b in zip(sends, sends[1:])]) if len(sends) > 1 else None
            loaded = agent.wait(msg_is("model loaded", name), since, 30, f"{name} loaded")
            rec["add_ms"] = (loaded.t - sw) * 1000
            if not poll:
                rec["ready_status"] = ready(name)
            applied = agent.find(msg_is("config applied"), since)
            files = agent.find(msg_is("model files ready", name), since)
            server = agent.find(adapter_loaded(name), since)
            measured = agent.find(msg_is("memory measured", name), since)
            marks = {"swap": wall, "applied": applied, "files": files, "server": server, "measured": measured,
                     "loaded": loaded}
            ts = {k: (v if isinstance(v, float) else (v.doc.get("ts") if v else None)) for k, v in marks.items()}
            ts["seen"] = wall + (loaded.t - sw)
            rec["ts"] = ts
            m = re.search(r"seconds=([0-9.]+)", str(server.doc.get("msg"))) if server else None
            rec["server_load_call_ms"] = float(m.group(1)) * 1000 if m else None
            time.sleep(random.uniform(0.02, 0.08))
            # change: a new version loads beside the old one and replaces it in place
            since = agent.mark()
            sw = write([model_doc(name, uri, version="2")])
            line = agent.wait(lambda d: d.get("msg") == "model loaded" and d.get("model") == name and d.get("replaced"),
                              since, 30, f"{name} replaced")
            rec["change_ms"] = (line.t - sw) * 1000
            time.sleep(random.uniform(0.02, 0.08))
            # remove
            since = agent.mark()
            sw = write([])
            line = agent.wait(msg_is("model removed", name), since, 30, f"{name} removed")
            rec["remove_ms"] = (line.t - sw) * 1000
            unloaded = agent.find(msg_is("model unloaded", name), since)
            rec["remove_unloaded_ms"] = ((unloaded.t - sw) * 1000) if unloaded else None
            time.sleep(random.uniform(0.02, 0.08))
            return rec

        warm = []
        for i in range(args.warmup):
            warm.append(one_cycle(f"warmup-{i}", store / "iris"))
        out["warmup_add_ms"] = [round(w["add_ms"], 1) for w in warm]
        out["loadavg_before"] = loadavg()
        records = [one_cycle(f"edit-{i:03d}", store / "iris") for i in range(args.edits)]
        out["loadavg_after"] = loadavg()
        polled = [one_cycle(f"poll-{i:03d}", store / "iris", poll=True) for i in range(args.poll_edits)]
        out["loadavg_after_poll"] = loadavg()
        conn.close()
        time.sleep(args.settle)
        out["rss_idle_0_models_after"] = agent.rss()
        out["rss_idle_0_models_after"]["edits_done"] = 3 * (args.warmup + args.edits + args.poll_edits)
    finally:
        agent.stop()
        _LIVE.remove(agent)

    not_ready = [r["model"] for r in records if r.get("ready_status") != 200]
    out["ready_check_failures"] = not_ready
    out["add_ms"] = summary([r["add_ms"] for r in records])
    out["change_ms"] = summary([r["change_ms"] for r in records])
    out["remove_ms"] = summary([r["remove_ms"] for r in records])
    out["remove_unloaded_ms"] = summary([r["remove_unloaded_ms"] for r in records if r["remove_unloaded_ms"] is not None])
    segs: dict[str, list[float]] = {k: [] for k in ("watch_read_parse_apply", "pull_cache_hit", "server_load",
                                                    "memory_measure_and_state", "log_to_benchmark")}
    edges = (("swap", "applied", "watch_read_parse_apply"), ("applied", "files", "pull_cache_hit"),
             ("files", "server", "server_load"), ("server", "loaded", "memory_measure_and_state"),
             ("loaded", "seen", "log_to_benchmark"))
    for r in records:
        ts = r["ts"]
        for a, b, key in edges:
            if ts.get(a) is not None and ts.get(b) is not None:
                segs[key].append((ts[b] - ts[a]) * 1000)
    out["breakdown_ms"] = {k: summary(v) for k, v in segs.items()}
    out["server_load_call_ms"] = summary([r["server_load_call_ms"] for r in records if r["server_load_call_ms"] is not None])
    out["poll"] = {
        "interval_ms": args.poll_interval_ms,
        "ready_ms": summary([r["poll_ready_ms"] for r in polled]),
        "same_edits_by_log_ms": summary([r["add_ms"] for r in polled]),
        "poll_minus_log_ms": summary([r["poll_ready_ms"] - r["add_ms"] for r in polled]),
        "polls_per_edit": summary([float(r["polls"]) for r in polled]),
        "gap_between_polls_ms": summary([r["poll_gap_ms"] for r in polled if r["poll_gap_ms"]]),
    }
    out["records"] = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "ts"} for r in records]
    return out


# ------------------------------------------------------------------------------------ part 2


def agent_cpu(pid: int) -> tuple[float, dict[str, int], float]:
    """(monotonic, {tid: on-CPU ns from schedstat}, psutil user+system seconds) of one process."""
    tids: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                tids[tid] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    t = psutil.Process(pid).cpu_times()
    return time.monotonic(), tids, t.user + t.system


def cpu_delta(a: tuple[float, dict[str, int], float], b: tuple[float, dict[str, int], float]) -> dict[str, Any]:
    exited = set(a[1]) - set(b[1])
    ns = sum(v - a[1].get(tid, 0) for tid, v in b[1].items())
    return {"wall_s": b[0] - a[0], "cpu_ms": ns / 1e6, "psutil_ms": (b[2] - a[2]) * 1000, "threads_exited": len(exited)}


def write_store(store: Path, n: int) -> list[Path]:
    """n model dirs, each a copy of one small sklearn model (distinct paths = distinct cache keys)."""
    src = store / "iris" / "model.joblib"
    dirs = []
    for i in range(n):
        d = store / "many" / f"m{i:04d}"
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "model.joblib").exists():
            shutil.copyfile(src, d / "model.joblib")
        dirs.append(d)
    return dirs


def many_models(dirs: list[Path], *, versions: dict[int, str] | None = None,
                extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The big config: model-0000.. on `dirs`, `versions` {index: version} set, plus `extra`."""
    models = []
    for i, d in enumerate(dirs):
        m = {"name": f"model-{i:04d}", "uri": str(d), "runtime": "sklearn", "preload": False, "memory": "64Mi"}
        if versions and i in versions:
            m["version"] = versions[i]
        models.append(m)
    if extra:
        models.append(extra)
    return models


def render(models: list[dict[str, Any]], fmt: str) -> dict[str, str]:
    if fmt == "yaml":
        import yaml

        return {"models.yaml": yaml.safe_dump({"models": models}, sort_keys=False)}
    return {"models.json": json.dumps({"models": models}, indent=1)}


def bench_cpu(args: argparse.Namespace, work: Path, store: Path) -> dict[str, Any]:
    n = args.models
    dirs = write_store(store, n)
    cm = ConfigMapDir(work / "config-many")
    cm.write(render(many_models(dirs), "yaml"))
    agent = _start(work, cm.root, agent_cmd=args.agent_cmd)
    out: dict[str, Any] = {"models": n}
    try:
        t0 = time.monotonic()
        agent.wait_ready()
        cached = lambda: agent.count(lambda d: d.get("msg") == "model files ready")  # noqa: E731
        deadline = time.monotonic() + 300
        while cached() < n:
            if time.monotonic() > deadline or agent.proc.poll() is not None:
                raise TimeoutError(f"only {cached()} of {n} models cached after 300 s")
            time.sleep(0.2)
        out["start_to_all_cached_s"] = round(time.monotonic() - t0, 2)
        status = json.loads(http("GET", agent.url + "/status")[1])
        out["counts_after_start"] = {k: v for k, v in status["counts"].items() if v}
        time.sleep(args.settle)
        out["rss_idle_n_models"] = {**agent.rss(), "loadavg": loadavg()}
        pid = agent.proc.pid
        win = args.cpu_window
        formats: dict[str, Any] = {}
        k = 0
        versions: dict[int, str] = {}
        for fmt in ("yaml", "json"):
            if fmt == "json":  # the same models, now from models.json (the yaml key goes away)
                since = agent.mark()
                cm.write(render(many_models(dirs, versions=versions), "json"))
                agent.wait(lambda d: d.get("msg") == "config applied" and d.get("file") == "models.json", since, 30, "switch to json")
                time.sleep(args.settle)
            reps: list[dict[str, Any]] = []
            for rep in range(args.cpu_edits):
                kind = ("add", "change", "remove")[rep % 3]
                k += 1
                extra_name = f"extra-{k // 3:03d}"
                if kind == "add":  # one more model (preload: false -> pulled from the cache, not loaded)
                    payload = many_models(dirs, versions=versions, extra=model_doc(extra_name, dirs[0], preload=False))
                    done = msg_is("model files ready", extra_name)
                    current_extra = extra_name
                elif kind == "change":  # a new version of one of the n models
                    j = (k * 37) % n
                    versions[j] = f"v{k}"
                    payload = many_models(dirs, versions=versions, extra=model_doc(current_extra, dirs[0], preload=False))
                    done = msg_is("model files ready", f"model-{j:04d}")
                else:  # the added model goes again
                    payload = many_models(dirs, versions=versions)
                    done = msg_is("model removed", current_extra)
                files = render(payload, fmt)
                a = agent_cpu(pid)
                time.sleep(win)
                b = agent_cpu(pid)
                idle = cpu_delta(a, b)
                since = agent.mark()
                a = agent_cpu(pid)
                sw = cm.write(files)
                line = agent.wait(done, since, 30, f"{kind} edit #{rep}")
                applied = agent.find(msg_is("config applied"), since)
                done_ms = (line.t - sw) * 1000
                time.sleep(max(0.0, win - (time.monotonic() - a[0])))
                b = agent_cpu(pid)
                edit = cpu_delta(a, b)
                rate = idle["cpu_ms"] / idle["wall_s"]
                prate = idle["psutil_ms"] / idle["wall_s"]
                reps.append({
                    "kind": kind, "done_ms": round(done_ms, 1),
                    "applied_ms": round((applied.t - sw) * 1000, 1) if applied else None,
                    "edit_cpu_ms": round(edit["cpu_ms"], 3), "idle_cpu_ms": round(idle["cpu_ms"], 3),
                    "wall_s": round(edit["wall_s"], 3), "idle_wall_s": round(idle["wall_s"], 3),
                    "cost_ms": round(edit["cpu_ms"] - rate * edit["wall_s"], 3),
                    "cost_psutil_ms": round(edit["psutil_ms"] - prate * edit["wall_s"], 1),
                    "threads_exited": edit["threads_exited"] + idle["threads_exited"],
                })
            costs = [r["cost_ms"] for r in reps]
            formats[fmt] = {
                "cost_ms": summary(costs),
                "cost_psutil_ms": summary([r["cost_psutil_ms"] for r in reps]),
                "by_kind_p50_ms": {kind: round(pct([r["cost_ms"] for r in reps if r["kind"] == kind], 50) or 0, 2)
                                   for kind in ("add", "change", "remove")},
                "idle_cpu_ms_per_s": round(statistics.median([r["idle_cpu_ms"] / r["idle_wall_s"] for r in reps]), 3),
                "edit_done_ms": summary([r["done_ms"] for r in reps]),
                "applied_ms": summary([r["applied_ms"] for r in reps if r["applied_ms"] is not None]),
                "loadavg": loadavg(),
                "reps": reps,
            }
        out["formats"] = formats
        time.sleep(args.settle)
        out["rss_idle_n_models_after"] = {**agent.rss(), "loadavg": loadavg()}
    finally:
        agent.stop()
        _LIVE.remove(agent)
    return out


# ------------------------------------------------------------------------------------ part 2b


def _cpu_ms(fn: Callable[[], Any], reps: int) -> dict[str, Any]:
    xs = []
    for _ in range(reps):
        a = time.process_time()
        fn()
        xs.append((time.process_time() - a) * 1000)
    return summary(xs)


def bench_inprocess(args: argparse.Namespace, work: Path, store: Path) -> dict[str, Any]:
    """Where one edit's CPU goes, measured in this process on the agent's own code."""
    import yaml

    from agent.config import load_config_dir
    from agent.memory import MemoryManager
    from agent.metrics import Metrics
    from agent.reconciler import Reconciler
    from agent.runtimes import make_adapter
    from agent.settings import Settings
    from puller import Cache

    n = args.models
    dirs = write_store(store, n)
    out: dict[str, Any] = {"models": n}
    parse: dict[str, Any] = {}
    for fmt in ("yaml", "json"):
        d = work / f"parse-{fmt}"
        d.mkdir(exist_ok=True)
        (name, text), = render(many_models(dirs), fmt).items()
        (d / name).write_text(text)
        doc_load = (lambda t=text: yaml.load(t, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))) if fmt == "yaml" \
            else (lambda t=text: json.loads(t))
        parse[fmt] = {"file_bytes": len(text), "load_config_dir_ms": _cpu_ms(lambda d=d: load_config_dir(d), args.parse_reps),
                      "document_only_ms": _cpu_ms(doc_load, args.parse_reps)}
    out["parse"] = parse

    cfg_dir = work / "inproc-config"
    cfg_dir.mkdir(exist_ok=True)
    settings = Settings(config_dir=cfg_dir, cache_dir=work / "inproc-cache", holder="bench")

    async def run() -> dict[str, Any]:
        cache = Cache(settings.cache_dir, holder="bench")
        adapter = make_adapter("mlserver", repository=work / "inproc-repo")  # never started: preload false only
        memory = MemoryManager.from_settings(settings, store=cache, server_pid=None, gpu_probe=None)
        rec = Reconciler(settings, cache, adapter, memory, Metrics())

        def config(payload: list[dict[str, Any]]):
            (cfg_dir / "models.json").write_text(json.dumps({"models": payload}))
            return load_config_dir(cfg_dir)

        await rec.apply(config(many_models(dirs)))
        await rec.wait_idle(300)
        res: dict[str, list[float]] = {"apply": [], "converge": [], "parse_json": []}
        gc_pauses: list[float] = []
        gc_start: list[float] = []

        def on_gc(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                gc_start.append(time.perf_counter())
            elif gc_start:
                gc_pauses.append((time.perf_counter() - gc_start.pop()) * 1000)

        gc.callbacks.append(on_gc)
        try:
            for i in range(args.apply_reps):
                payload = many_models(dirs, versions={(i * 37) % n: f"r{i}"})
                a = time.process_time()
                result = config(payload)
                b = time.process_time()
                await rec.apply(result)
                c = time.process_time()
                await rec.wait_idle(60)
                d = time.process_time()
                res["parse_json"].append((b - a) * 1000)
                res["apply"].append((c - b) * 1000)
                res["converge"].append((d - c) * 1000)
        finally:
            gc.callbacks.remove(on_gc)
        # profile PROFILED_EDITS edits with the collector off: a GC pause lands in whatever function
        # runs at the time and would swamp the attribution; GC is reported apart (above)
        prof = cProfile.Profile(time.thread_time)  # CPU time of this thread: preemption by other load does not count
        gc.collect()
        gc.disable()
        try:
            for i in range(PROFILED_EDITS):
                payload = many_models(dirs, versions={3 + i: "profiled"})
                prof.enable()
                result = config(payload)
                await rec.apply(result)
                await rec.wait_idle(60)
                prof.disable()
        finally:
            gc.enable()
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        rows = []
        for (file, line, func), (cc, nc, tt, ct, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:15]:
            short = file.replace(str(ROOT) + "/", "")
            short = re.sub(r".*/site-packages/", "", short)
            short = re.sub(r".*/lib/python3\.\d+/", "stdlib/", short)
            rows.append({"function": f"{short}:{line}({func})", "calls_per_edit": round(nc / PROFILED_EDITS),
                         "tottime_ms_per_edit": round(tt * 1000 / PROFILED_EDITS, 2),
                         "cumtime_ms_per_edit": round(ct * 1000 / PROFILED_EDITS, 2)})
        return {"apply_ms": summary(res["apply"]), "converge_ms": summary(res["converge"]),
                "parse_json_ms": summary(res["parse_json"]),
                "gc_pauses_ms": {"count": len(gc_pauses), "per_edit": round(len(gc_pauses) / args.apply_reps, 2),
                                 "total_per_edit": round(sum(gc_pauses) / args.apply_reps, 2),
                                 "max": round(max(gc_pauses), 2) if gc_pauses else None},
                "profile_top_tottime": rows}

    out["reconciler"] = asyncio.run(run())
    return out


# ------------------------------------------------------------------------------------ report


def fmt_ms(s: dict[str, Any], key: str = "p50") -> str:
    v = s.get(key) if s else None
    return "–" if v is None else (f"{v:.1f}" if v < 100 else f"{v:.0f}")


def verdict(value: float | None, goal: float) -> str:
    if value is None:
        return "not measured"
    return "met" if value <= goal else "MISSED"


def markdown(data: dict[str, Any]) -> str:
    lat, cpu, inp = data.get("latency"), data.get("cpu"), data.get("inprocess")
    n = data["args"]["models"]
    lines = ["# Reconcile benchmark", "",
             "Config write (ConfigMap `..data` swap) -> model ready, agent CPU per edit among "
             f"{n} models, agent idle RSS. Real agent (`python -m agent.cli run`) with its embedded MLServer.", "",
             machine_md(data["machine"]), f"- Command: `{data['command']}`", f"- Duration: {data['duration_s']:.0f} s",
             "- Analysis of where the time goes and measured patches: `reconcile.notes.md` (hand-written, "
             "for the run it names; this file is regenerated by every run)", ""]
    rows = []
    if lat:
        rows.append(["config write -> model ready, p50 (p99)", f"<= {GOALS['p50_ms']:.0f} ms",
                     f"{fmt_ms(lat['add_ms'])} ms ({fmt_ms(lat['add_ms'], 'p99')} ms), n={lat['add_ms']['n']}",
                     verdict(lat["add_ms"].get("p50"), GOALS["p50_ms"])])
    if cpu:
        for fmt, f in cpu["formats"].items():
            said = verdict(f["cost_ms"].get("p50"), GOALS["edit_cpu_ms"])
            floor = ((inp or {}).get("parse", {}).get(fmt) or {}).get("document_only_ms", {}).get("p50")
            if said == "MISSED" and fmt == "yaml" and floor is not None:  # what no work after the parse can cut
                said += f": PyYAML's document alone (C loader) costs {fmt_ms({'p50': floor})} ms, the floor; use models.json"
            rows.append([f"agent CPU for one edit among {n} models, models.{fmt}, p50 (p90)", f"<= {GOALS['edit_cpu_ms']:.0f} ms",
                         f"{fmt_ms(f['cost_ms'])} ms ({fmt_ms(f['cost_ms'], 'p90')} ms), n={f['cost_ms']['n']}", said])
    if lat:
        r = lat["rss_idle_0_models"]
        rows.append(["agent RSS idle, 0 models", f"<= {GOALS['idle_rss_mib']:.0f} MB", f"{r['agent_rss_mib']} MiB",
                     verdict(r["agent_rss_mib"] * MiB / 1e6, GOALS["idle_rss_mib"])])
    if cpu:
        r = cpu["rss_idle_n_models"]
        rows.append([f"agent RSS idle, {n} models configured (cached)", f"<= {GOALS['idle_rss_mib']:.0f} MB",
                     f"{r['agent_rss_mib']} MiB", verdict(r["agent_rss_mib"] * MiB / 1e6, GOALS["idle_rss_mib"])])
    lines += ["## Goals", "", md_table(["what", "goal", "result", "verdict"], rows), ""]

    if lat:
        b = lat["breakdown_ms"]
        lines += ["## 1. Config write -> ready (one cached sklearn model, embedded MLServer)", "",
                  f"Warm-up edits (not counted; the first includes MLServer's first sklearn import): "
                  f"{lat['warmup_add_ms']} ms. Agent start -> /readyz: {lat['agent_start_s']} s. "
                  f"Load average during the run: {lat['loadavg_before']} -> {lat['loadavg_after']}.", "",
                  md_table(["edit (one `..data` swap)", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"], [
                      ["add a model -> ready (seen in the log; GET /ready then 200)", lat["add_ms"]["n"], fmt_ms(lat["add_ms"]),
                       fmt_ms(lat["add_ms"], "p90"), fmt_ms(lat["add_ms"], "p99"), fmt_ms(lat["add_ms"], "max")],
                      ["change its version -> new copy serving (no gap)", lat["change_ms"]["n"], fmt_ms(lat["change_ms"]),
                       fmt_ms(lat["change_ms"], "p90"), fmt_ms(lat["change_ms"], "p99"), fmt_ms(lat["change_ms"], "max")],
                      ["remove it -> unloaded and gone", lat["remove_ms"]["n"], fmt_ms(lat["remove_ms"]),
                       fmt_ms(lat["remove_ms"], "p90"), fmt_ms(lat["remove_ms"], "p99"), fmt_ms(lat["remove_ms"], "max")],
                      [f"add -> ready, polling /ready every {lat['poll']['interval_ms']} ms (keep-alive)",
                       lat["poll"]["ready_ms"]["n"], fmt_ms(lat["poll"]["ready_ms"]), fmt_ms(lat["poll"]["ready_ms"], "p90"),
                       fmt_ms(lat["poll"]["ready_ms"], "p99"), fmt_ms(lat["poll"]["ready_ms"], "max")],
                      ["same polled edits, seen in the log", lat["poll"]["same_edits_by_log_ms"]["n"],
                       fmt_ms(lat["poll"]["same_edits_by_log_ms"]), fmt_ms(lat["poll"]["same_edits_by_log_ms"], "p90"),
                       fmt_ms(lat["poll"]["same_edits_by_log_ms"], "p99"), fmt_ms(lat["poll"]["same_edits_by_log_ms"], "max")],
                  ]), "",
                  f"Failed GET /ready checks after the log said loaded: {len(lat['ready_check_failures'])}. "
                  f"Polling: {fmt_ms(lat['poll']['polls_per_edit'])} polls per edit, "
                  f"{fmt_ms(lat['poll']['gap_between_polls_ms'])} ms between poll sends (p50): the resolution of the polled figure; "
                  f"polled minus log-seen on the same edits: p50 {fmt_ms(lat['poll']['poll_minus_log_ms'])} ms.", "",
                  "Where an add's time goes (agent log timestamps; p50 / p90 ms):", "",
                  md_table(["segment", "p50 ms", "p90 ms", "what"], [
                      ["swap -> config applied", fmt_ms(b["watch_read_parse_apply"]), fmt_ms(b["watch_read_parse_apply"], "p90"),
                       "inotify -> watchdog thread -> loop, 2 ms settle timer, read + hash + parse (thread), apply"],
                      ["-> model files ready", fmt_ms(b["pull_cache_hit"]), fmt_ms(b["pull_cache_hit"], "p90"),
                       "converge task: cache.ensure (local path in place, lease file) in a thread"],
                      ["-> server load returned", fmt_ms(b["server_load"]), fmt_ms(b["server_load"], "p90"),
                       f"memory admit, model-settings.json, MLServer repository load (the HTTP call alone: "
                       f"p50 {fmt_ms(lat['server_load_call_ms'])} ms)"],
                      ["-> state LOADED (\"model loaded\")", fmt_ms(b["memory_measure_and_state"]),
                       fmt_ms(b["memory_measure_and_state"], "p90"), "memory measurement after load (RSS of the server tree, in a thread)"],
                      ["-> seen by the benchmark", fmt_ms(b["log_to_benchmark"]), fmt_ms(b["log_to_benchmark"], "p90"),
                       "log line through the pipe"],
                  ]), ""]
    if cpu:
        lines += [f"## 2. Agent CPU for one edit among {n} configured models", "",
                  f"All {n} models `preload: false`, distinct local paths: cached, not loaded. Agent start -> all cached: "
                  f"{cpu['start_to_all_cached_s']} s. Window per edit {data['args']['cpu_window']} s, each paired with an idle "
                  "window just before; cost = edit window CPU - idle rate x its length. CPU = sum of the agent's "
                  "threads' schedstat (ns); psutil's cpu_times (10 ms ticks) beside it.", ""]
        rows = []
        for fmt, f in cpu["formats"].items():
            rows.append([f"models.{fmt}", f["cost_ms"]["n"], fmt_ms(f["cost_ms"]), fmt_ms(f["cost_ms"], "p90"),
                         f["by_kind_p50_ms"]["add"], f["by_kind_p50_ms"]["change"], f["by_kind_p50_ms"]["remove"],
                         fmt_ms(f["cost_psutil_ms"]), f["idle_cpu_ms_per_s"], fmt_ms(f["applied_ms"]), fmt_ms(f["edit_done_ms"]),
                         f["loadavg"][0]])
        lines += [md_table(["config", "edits", "cost p50 ms", "p90 ms", "add p50", "change p50", "remove p50",
                            "psutil p50 ms", "idle CPU ms/s", "swap -> applied p50 ms", "swap -> edit done p50 ms",
                            "load avg"], rows), ""]
    if inp:
        p, r = inp["parse"], inp["reconciler"]
        lines += [f"In this process, on the same code ({n} models; CPU ms, p50):", "",
                  md_table(["step", "p50 ms", "p90 ms", "note"], [
                      ["parse models.yaml (load_config_dir)", fmt_ms(p["yaml"]["load_config_dir_ms"]),
                       fmt_ms(p["yaml"]["load_config_dir_ms"], "p90"),
                       f"of which the YAML document alone (CSafeLoader): {fmt_ms(p['yaml']['document_only_ms'])} ms; "
                       f"{p['yaml']['file_bytes']} bytes"],
                      ["parse models.json (load_config_dir)", fmt_ms(p["json"]["load_config_dir_ms"]),
                       fmt_ms(p["json"]["load_config_dir_ms"], "p90"),
                       f"of which json.loads: {fmt_ms(p['json']['document_only_ms'])} ms; {p['json']['file_bytes']} bytes"],
                      ["Reconciler.apply (one model changed)", fmt_ms(r["apply_ms"]), fmt_ms(r["apply_ms"], "p90"),
                       "diff of desired against actual"],
                      ["converge of the changed model", fmt_ms(r["converge_ms"]), fmt_ms(r["converge_ms"], "p90"),
                       "cache.ensure (hit) in a thread, state, gauges"],
                  ]), "",
                  f"GC during those edits (this process's heap, smaller than the agent's): {r['gc_pauses_ms']['per_edit']} "
                  f"collections and {r['gc_pauses_ms']['total_per_edit']} ms (wall) per edit, the longest "
                  f"{r['gc_pauses_ms']['max'] if r['gc_pauses_ms']['max'] is not None else '–'} ms.", "",
                  f"cProfile of {PROFILED_EDITS} edits (parse models.json + apply + converge) with the collector off "
                  "(GC is above; thread CPU time; the thread running cache.ensure is not profiled; cProfile's own "
                  "overhead inflates every figure several times over: read them as shares), top functions by own time, per edit:", "",
                  md_table(["function", "calls", "own ms", "cumulative ms"],
                           [[x["function"], x["calls_per_edit"], x["tottime_ms_per_edit"], x["cumtime_ms_per_edit"]]
                            for x in r["profile_top_tottime"]]), ""]
    lines += ["## 3. Agent RSS", "", md_table(["when", "agent RSS MiB", "agent USS MiB", "threads", "MLServer tree RSS MiB", "load avg"], [
        [label, d.get("agent_rss_mib"), d.get("agent_uss_mib"), d.get("agent_threads"), d.get("server_tree_rss_mib"), d.get("loadavg", "")]
        for label, d in (
            ("idle, 0 models (fresh)", (lat or {}).get("rss_idle_0_models")),
            (f"idle, 0 models, after {(lat or {}).get('rss_idle_0_models_after', {}).get('edits_done')} edits",
             (lat or {}).get("rss_idle_0_models_after")),
            (f"idle, {n} models configured (cached)", (cpu or {}).get("rss_idle_n_models")),
            (f"idle, {n} models, after the CPU edits", (cpu or {}).get("rss_idle_n_models_after")),
        ) if d
    ]), "", "MB in the goal taken as 10^6 bytes; MiB = 2^20 bytes. The agent's RSS is its own process only "
           "(the embedded MLServer is a separate process, shown apart).", ""]
    doc = __doc__ or ""
    lines += ["## Method and resolution", "", doc[doc.find("Parts"):doc.find("Results:")].strip(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--edits", type=int, default=60, help="measured add/change/remove cycles (>= 50 for p99)")
    ap.add_argument("--warmup", type=int, default=3, help="cycles before measuring (the first loads sklearn in MLServer)")
    ap.add_argument("--poll-edits", type=int, default=20, help="extra cycles measured by polling /ready")
    ap.add_argument("--poll-interval-ms", type=float, default=1.0)
    ap.add_argument("--models", type=int, default=1000, help="configured models for the CPU and RSS parts")
    ap.add_argument("--cpu-edits", type=int, default=15, help="edits per config format in the CPU part")
    ap.add_argument("--cpu-window", type=float, default=1.0, help="seconds of each CPU window (edit and idle)")
    ap.add_argument("--parse-reps", type=int, default=15)
    ap.add_argument("--apply-reps", type=int, default=15)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds of quiet before an RSS sample")
    ap.add_argument("--parts", default="latency,cpu,inprocess", help="comma-separated subset to run")
    ap.add_argument("--agent-cmd", default=f"{shlex.quote(sys.executable)} -m agent.cli",
                    help="command that takes `run ...` (e.g. a launcher that patches the agent for an experiment)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="directory for reconcile.md/.json")
    ap.add_argument("--name", default="reconcile", help="result file name (without extension)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (agent logs) and print its path")
    args = ap.parse_args(argv)
    args.agent_cmd = shlex.split(args.agent_cmd)
    if os.sep in args.agent_cmd[0]:  # the agents run in a temp dir: resolve a relative program here
        args.agent_cmd[0] = os.path.abspath(args.agent_cmd[0])
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: (_stop_all(), sys.exit(128 + s)))
    started = time.monotonic()
    data: dict[str, Any] = {"machine": machine(), "command": command_line(),
                            "args": {k: v for k, v in vars(args).items() if k not in ("out", "agent_cmd")}, "goals": GOALS}
    data["args"]["agent_cmd"] = " ".join(os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a for a in args.agent_cmd)
    work = Path(tempfile.mkdtemp(prefix="bench-reconcile-"))
    try:
        store = work / "store"
        from agent.demo import write_model

        write_model(store / "iris", "logreg", 0)
        if "latency" in parts:
            print("part 1: config write -> ready ...", flush=True)
            data["latency"] = bench_latency(args, work, store)
            print(f"  add->ready p50 {data['latency']['add_ms'].get('p50')} ms p99 {data['latency']['add_ms'].get('p99')} ms", flush=True)
        if "cpu" in parts:
            print(f"part 2: agent CPU per edit among {args.models} models ...", flush=True)
            data["cpu"] = bench_cpu(args, work, store)
            for fmt, f in data["cpu"]["formats"].items():
                print(f"  {fmt}: cost p50 {f['cost_ms'].get('p50')} ms", flush=True)
        if "inprocess" in parts:
            print("part 2b: parse / apply / converge in process ...", flush=True)
            data["inprocess"] = bench_inprocess(args, work, store)
    finally:
        _stop_all()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    data["machine"]["loadavg_at_end"] = loadavg()
    data["duration_s"] = round(time.monotonic() - started, 1)
    md, js = write_results(args.name, markdown(data), data, args.out)
    print(markdown(data))
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
