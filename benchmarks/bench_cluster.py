"""Past one node, side by side: the same Zipf traffic from header-less V2 REST clients through
(a) a real Envoy + the modelshelf picker (the inference gateway, tests/support/envoy.py), with
Envoy reaching the picked agent through its override-host policy (`gateway`: a retry after a
connect failure goes to another agent) and through an ORIGINAL_DST cluster (`gateway-odst`: the
fleet contract's wiring; a retry goes to the same address), and (b) nginx hashing on the model
name that deploy/k8s/07-scale-out's `map` takes from the path (tests/support/nginx.py, `nginx`),
in one run, each in front of its own fresh fleet of the same agents
(`modelshelf run`, embedded MLServer, one shared cache dir, models served by a local HTTP store
so downloads are counted, a memory budget that holds about a third of the models per agent).

Phases per topology:
1. steady: Zipf(s) traffic from C clients for D s: hit ratio (the agents' own
   modelshelf_loaded_lookups_total), 503 rate, p50/p95/p99, requests and memory per agent
   (max/mean: requests served, ledger reserved, RSS of agent + MLServer), downloads (GETs at the store);
2. hot: every client on the hottest model for H s: its throughput per second and its copies;
3. failover: Zipf traffic, kill -9 of the busiest agent after 2 s: failed requests (and how many
   of them were in flight at the kill), and until when the dead agent's models failed;
4. resize: a fourth agent joins (gateway: the picker polls its slot; nginx: reloaded with it in
   the upstream): models moved (holders that changed) and copies left (models loaded twice).

Goals (issue 12), each with a verdict for `gateway`: 0 failed requests other than those in
flight at a kill; max/mean requests per agent <= 1.25; p95 no worse than nginx's; a hot model's
throughput scales with its copies.

Run (one command; results in benchmarks/results/cluster.{md,json}; ~4 min by default):
    .venv/bin/python benchmarks/bench_cluster.py
nginx comes from Debian (`apt-get install -y nginx`); without it only the gateway runs, and the
results say so.
"""
from __future__ import annotations

import http.client
import json
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, Flag, arg_parser, command_line, cpu_seconds, http as http_call, loadavg, machine, machine_md, md_table, write_results  # noqa: E402
from agent.memory import tree_rss  # noqa: E402
from tests.support.fleet import Fleet  # noqa: E402
from tests.support.httpserver import HTTPFileServer  # noqa: E402
from tests.support.models import sample_rows, v2_request, write_sklearn_model  # noqa: E402
from tests.support.nginx import Nginx, nginx_binary  # noqa: E402

BODY = json.dumps(v2_request(sample_rows(1))).encode()
TOPOLOGIES = ("gateway", "gateway-odst", "nginx")


# ---------------------------------------------------------------------------------- traffic
class Traffic:
    """C client threads, each with one keep-alive connection to `host:port`, sending V2 infer
    requests (no header) for models drawn by `pick()`; every request recorded as
    (start, seconds, model, status), status 0 for a connection error."""

    def __init__(self, url: str, clients: int, pick, seed: int = 0):
        self.host, self.port = url.split("//")[1].split(":")
        self.clients, self.pick, self.seed = clients, pick, seed
        self.records: list[tuple[float, float, str, int]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _run(self, k: int) -> None:
        rng = np.random.default_rng(self.seed * 1000 + k)
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=120)
        while not self._stop.is_set():
            model = self.pick(rng)
            t0 = time.monotonic()
            try:
                conn.request("POST", f"/v2/models/{model}/infer", BODY, {"content-type": "application/json"})
                r = conn.getresponse()
                r.read()
                status = r.status
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = http.client.HTTPConnection(self.host, int(self.port), timeout=120)
            self.records.append((t0, time.monotonic() - t0, model, status))
        conn.close()

    def start(self) -> "Traffic":
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[tuple[float, float, str, int]]:
        self._stop.set()
        for t in self._threads:
            t.join(150)
        return self.records


def zipf_picker(models: list[str], s: float):
    p = 1.0 / np.arange(1, len(models) + 1) ** s
    p /= p.sum()
    return lambda rng: models[int(rng.choice(len(models), p=p))]


def percentiles(records) -> dict[str, float]:
    lat = sorted(r[1] for r in records if r[3] == 200)
    if not lat:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1000  # noqa: E731
    return {"p50_ms": q(0.50), "p95_ms": q(0.95), "p99_ms": q(0.99)}


# ---------------------------------------------------------------------------------- the agents' view
_LOOKUP = re.compile(r'^modelshelf_loaded_lookups_total\{result="(hit|miss)"\} ([0-9.e+]+)$', re.M)


def lookups(fleet: Fleet) -> dict[int, dict[str, float]]:
    """Each live agent's modelshelf_loaded_lookups_total by result (hit, miss)."""
    return {s.index: {k: float(v) for k, v in _LOOKUP.findall(http_call("GET", f"{s.url}/metrics")[1].decode())}
            for s in fleet.live()}


def snapshot(fleet: Fleet) -> dict[int, dict]:
    """Per live agent: requests served per model, loaded models, ledger reserved, RSS (agent + server)."""
    snap = {}
    for s in fleet.live():
        st = fleet.state(s)
        snap[s.index] = {
            "requests": {m: v.get("requests", 0) for m, v in st["models"].items()},
            "loaded": sorted(m for m, v in st["models"].items() if v["state"] == "loaded"),
            "reserved": st["memory"]["host"]["reserved"],
            "rss": tree_rss(s.proc.proc.pid),
        }
    return snap


def ratio(values: list[float]) -> float:
    mean = statistics.mean(values) if values else 0
    return max(values) / mean if mean else float("nan")


def holders_map(snap: dict[int, dict]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = defaultdict(set)
    for i, s in snap.items():
        for m in s["loaded"]:
            out[m].add(i)
    return out


# ---------------------------------------------------------------------------------- one topology
def run_topology(kind: str, a, store: HTTPFileServer, models: list[dict], names: list[str], root: Path) -> dict:
    agent_args = ("--host-memory", a.budget, "--min-residency", "2")
    picker_args = ("--hot-rate", str(a.hot_rate))
    lb = "original_dst" if kind == "gateway-odst" else "override_host"
    fleet = Fleet(root / kind, models, slots=a.agents + 1, agent_args=agent_args, picker_args=picker_args, lb=lb)
    nginx: Nginx | None = None
    out: dict = {"topology": kind}
    try:
        t0 = time.monotonic()
        gets_at_start = sum(store.get_count(f"{n}/model.joblib") for n in names)
        fleet.start(initial=a.agents, gateway=kind.startswith("gateway"))
        for s in fleet.live():  # MLServer imports its runtime on the first load: not in the figures
            s.proc.wait_state("warm", "loaded", timeout=180)
        fleet.wait_all_ready(timeout=120)
        if kind == "nginx":
            nginx = Nginx([s.endpoint for s in fleet.live()], workdir=root / "nginx").start()
            front = nginx.url
        else:
            front = fleet.envoy.url  # type: ignore[union-attr]
        out["start_s"] = round(time.monotonic() - t0, 1)
        pick = zipf_picker(names, a.zipf)

        # 1. steady
        def front_pids() -> dict[str, list[int]]:
            if nginx is not None:
                master = psutil.Process(nginx.proc.pid)  # type: ignore[union-attr]
                return {"nginx": [master.pid] + [c.pid for c in master.children(recursive=True)]}
            return {"envoy": [fleet.envoy.proc.pid], "picker": [fleet.picker.pid]}  # type: ignore[union-attr]

        cpu0 = {k: cpu_seconds(v) for k, v in front_pids().items()}
        before, look0 = snapshot(fleet), lookups(fleet)
        gets0 = sum(store.get_count(f"{n}/model.joblib") for n in names)
        records = Traffic(front, a.clients, pick, seed=1).start()
        time.sleep(a.duration)
        records = records.stop()
        cpu1 = {k: cpu_seconds(v) for k, v in front_pids().items()}
        after, look1 = snapshot(fleet), lookups(fleet)
        served = {i: sum(after[i]["requests"].values()) - sum(before[i]["requests"].values()) for i in after}
        hits = sum(look1[i].get("hit", 0) - look0[i].get("hit", 0) for i in look1)
        misses = sum(look1[i].get("miss", 0) - look0[i].get("miss", 0) for i in look1)
        statuses = Counter(r[3] for r in records)
        holders = holders_map(after)
        out["steady"] = {
            "requests": len(records), "rps": round(len(records) / a.duration, 1), "statuses": dict(statuses),
            "front_cpu_ms_per_request": {k: round((cpu1[k] - cpu0[k]) * 1000 / max(1, len(records)), 3) for k in cpu0},
            "rate_503": statuses.get(503, 0) / max(1, len(records)),
            "failed": sum(v for k, v in statuses.items() if k != 200),
            "hit_ratio": hits / max(1, hits + misses), **percentiles(records),
            "served_per_agent": served, "requests_max_mean": ratio(list(served.values())),
            "reserved_per_agent": {i: after[i]["reserved"] for i in after},
            "reserved_max_mean": ratio([after[i]["reserved"] for i in after]),
            "rss_per_agent": {i: after[i]["rss"] for i in after}, "rss_max_mean": ratio([after[i]["rss"] for i in after]),
            "models_loaded_per_agent": {i: len(after[i]["loaded"]) for i in after},
            "models_loaded_twice": sum(1 for h in holders.values() if len(h) > 1),
            "downloads": sum(store.get_count(f"{n}/model.joblib") for n in names) - gets0,
            "downloads_total": sum(store.get_count(f"{n}/model.joblib") for n in names) - gets_at_start,
        }

        # 2. hot: every client on the hottest model
        hot = names[0]
        copies_seen = []
        tr = Traffic(front, a.clients, lambda rng: hot, seed=2).start()
        start = time.monotonic()
        while time.monotonic() - start < a.hot:
            time.sleep(1.0)
            copies_seen.append(len(fleet.holders(hot)))
        rec = tr.stop()
        per_s = Counter(int(r[0] + r[1] - start) for r in rec if r[3] == 200 and r[0] + r[1] - start < a.hot)
        timeline = [per_s.get(k, 0) for k in range(int(a.hot))]
        third = max(1, len(timeline) // 3)
        out["hot"] = {"model": hot, "ok_per_second": timeline, "copies_per_second": copies_seen,
                      "first_third_rps": statistics.mean(timeline[:third]), "last_third_rps": statistics.mean(timeline[-third:]),
                      "failed": sum(1 for r in rec if r[3] != 200)}

        # 3. failover: kill -9 the busiest agent under Zipf traffic
        pre = snapshot(fleet)
        tr = Traffic(front, a.clients, pick, seed=3).start()
        time.sleep(2.0)
        mid = snapshot(fleet)
        busiest = max(mid, key=lambda i: sum(mid[i]["requests"].values()) - sum(pre[i]["requests"].values()))
        victim_models = set(mid[busiest]["loaded"]) - {"warm"}
        killed_at, dead_at = fleet.kill(busiest)
        time.sleep(a.failover)
        rec = tr.stop()
        failed = [r for r in rec if r[3] != 200]
        # in flight: the request had started before the victim was gone (kill -9 of its process
        # group takes a few ms, during which its server may already be dead and it answers 503)
        in_flight = [r for r in failed if r[0] < dead_at]
        after_kill = [r for r in failed if r[0] >= dead_at]
        last_fail = max((r[0] + r[1] - killed_at for r in failed), default=0.0)
        first_asked: dict[str, float] = {}
        answered: dict[str, float] = {}  # victim model -> from its first request after the kill to its first answer
        for r in sorted(rec):
            if r[2] in victim_models and r[0] >= dead_at:
                first_asked.setdefault(r[2], r[0])
                if r[3] == 200 and r[2] not in answered:
                    answered[r[2]] = r[0] + r[1] - first_asked[r[2]]
        bins = np.arange(-2.0, a.failover + 0.25, 0.25)
        timeline = {"t_s": bins[:-1].round(2).tolist(),
                    "ok": np.histogram([r[0] + r[1] - killed_at for r in rec if r[3] == 200], bins)[0].tolist(),
                    "failed": np.histogram([r[0] + r[1] - killed_at for r in failed], bins)[0].tolist()}
        out["failover"] = {
            "timeline": timeline,
            "victim": busiest, "victim_models": len(victim_models), "requests": len(rec), "failed": len(failed),
            "kill_ms": round((dead_at - killed_at) * 1000, 1),
            "failed_in_flight_at_kill": len(in_flight), "failed_started_after_kill": len(after_kill),
            "failed_statuses": dict(Counter(r[3] for r in failed)),
            "failed_started_after_kill_at_s": sorted(round(r[0] - killed_at, 3) for r in after_kill)[:50],
            "last_failure_s_after_kill": round(last_fail, 3),
            "victim_models_asked_after_kill": len(first_asked),
            "victim_models_answered_elsewhere": len(answered),
            "max_s_first_request_to_answer": round(max(answered.values(), default=float("nan")), 3),
        }

        # 4. resize: a fourth agent joins
        h0 = holders_map(snapshot(fleet))
        new = a.agents  # the spare slot
        fleet.start_agent(new)
        fleet.slots[new].proc.wait_state("warm", "loaded", timeout=180)  # type: ignore[union-attr]
        if nginx is not None:  # ingress-nginx would follow the endpoints: here a graceful reload
            nginx.stop()
            nginx = Nginx([s.endpoint for s in fleet.live()], workdir=root / "nginx4").start()
            front = nginx.url
        tr = Traffic(front, a.clients, pick, seed=4).start()
        time.sleep(a.resize)
        rec = tr.stop()
        h1 = holders_map(snapshot(fleet))
        moved = [m for m in names if h0.get(m) and h1.get(m) and not (h1[m] <= h0[m] | {new})]
        to_new = [m for m in names if new in h1.get(m, set())]
        out["resize"] = {
            "requests": len(rec), "failed": sum(1 for r in rec if r[3] != 200),
            "models_on_new_agent": len(to_new), "models_moved_between_old_agents": len(moved),
            "models_loaded_before": sum(1 for m in names if h0.get(m)),
            "models_loaded_twice_after": sum(1 for m in names if len(h1.get(m, ())) > 1),
            "served_by_new_agent": sum(snapshot(fleet)[new]["requests"].values()),
        }
        if kind.startswith("gateway"):
            out["picker_copy_events"] = len(re.findall(r"copy added", (root / kind / "picker.log").read_text()))
        return out
    finally:
        if nginx is not None:
            nginx.stop()
        fleet.stop()


# ---------------------------------------------------------------------------------- report
def verdicts(res: dict) -> list[tuple[str, str, str]]:
    g, n = res.get("gateway"), res.get("nginx")
    out = []
    f = g["failover"]
    other_failures = g["steady"]["failed"] + g["resize"]["failed"] + g["hot"]["failed"] + f["failed_started_after_kill"]
    why = (f"{f['failed_in_flight_at_kill']} failed in flight at the kill, {f['failed_started_after_kill']} started after it "
           f"(at {f['failed_started_after_kill_at_s'][:8]} s); steady {g['steady']['failed']}, hot {g['hot']['failed']}, "
           f"resize {g['resize']['failed']}")
    odst = res.get("gateway-odst")
    if odst:
        n_odst = odst["failover"]["failed_started_after_kill"]
        why += f". ORIGINAL_DST wiring: {n_odst} started after the kill failed"
        if n_odst:
            why += " (picked for the dead agent before the picker heard of its death; the retry goes to the same address)"
    out.append(("0 failed requests other than those in flight at a kill (gateway)",
                "met" if other_failures == 0 else "missed", why))
    r = g["steady"]["requests_max_mean"]
    out.append(("max/mean requests per agent <= 1.25 (gateway, steady)", "met" if r <= 1.25 else "missed",
                f"{r:.2f} (nginx: {n['steady']['requests_max_mean']:.2f})" if n else f"{r:.2f}"))
    if n:
        gp, np95 = g["steady"]["p95_ms"], n["steady"]["p95_ms"]
        out.append(("p95 no worse than the nginx path-hash baseline", "met" if gp <= np95 * 1.05 else "missed",
                    f"gateway {gp:.1f} ms vs nginx {np95:.1f} ms (ratio {gp / np95:.2f}; within 5% counts as no worse)"))
    else:
        out.append(("p95 no worse than the nginx path-hash baseline", "not measured", "nginx not installed"))
    h = g["hot"]
    seen = h["copies_per_second"] or [1]
    copies, first = max(seen), min(seen)
    scale = h["last_third_rps"] / max(1e-9, h["first_third_rps"])
    cpu = g["steady"]["front_cpu_ms_per_request"]
    why = (f"copies {seen}; ok/s first third {h['first_third_rps']:.0f}, last third {h['last_third_rps']:.0f}; "
           f"every agent shares the same 2 CPUs here, so a copy adds no CPU, and the front costs "
           f"{sum(cpu.values()):.2f} ms CPU per request ({', '.join(f'{k} {v:.2f}' for k, v in cpu.items())})")
    if n:
        why += f"; nginx, one copy: {n['hot']['last_third_rps']:.0f} ok/s"
    if copies == first:
        verdict = "not measured"
        why = f"the model had {copies} copies already when the phase began (no before/after); " + why
    else:
        verdict = "met" if scale >= 0.8 * copies / first else "missed"
    out.append(("a hot model's throughput scales with its copies", verdict, why))
    return out


def plot(res: dict, path: Path) -> Path | None:
    """Failover timelines (answers and failures per 0.25 s around the kill) and the hot model's
    answers per second with its copies, one line per topology."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    kinds = [k for k in TOPOLOGIES if k in res]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for k in kinds:
        t = res[k]["failover"]["timeline"]
        line, = ax1.plot(t["t_s"], [v * 4 for v in t["ok"]], label=f"{k} answered/s")
        if any(t["failed"]):
            ax1.bar(t["t_s"], [v * 4 for v in t["failed"]], width=0.2, alpha=0.5, color=line.get_color(), label=f"{k} failed/s")
        h = res[k]["hot"]
        ax2.plot(range(len(h["ok_per_second"])), h["ok_per_second"], label=f"{k} (copies {h['copies_per_second']})")
    ax1.axvline(0, color="k", lw=0.8)
    ax1.set(title="kill -9 of the busiest agent at t=0", xlabel="s after the kill", ylabel="requests/s")
    ax2.set(title="every client on the hottest model", xlabel="s", ylabel="answers/s")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def report(a, res: dict, m: dict) -> str:
    kinds = [k for k in TOPOLOGIES if k in res]
    rows = []
    def row(label, f):
        rows.append([label] + [f(res[k]) for k in kinds])
    row("requests (steady)", lambda r: r["steady"]["requests"])
    row("throughput req/s", lambda r: r["steady"]["rps"])
    row("hit ratio", lambda r: f"{r['steady']['hit_ratio']:.3f}")
    row("503 rate", lambda r: f"{r['steady']['rate_503']:.4f}")
    row("failed (any non-200)", lambda r: r["steady"]["failed"])
    row("p50 / p95 / p99 ms", lambda r: f"{r['steady']['p50_ms']:.1f} / {r['steady']['p95_ms']:.1f} / {r['steady']['p99_ms']:.1f}")
    row("front CPU ms per request", lambda r: ", ".join(f"{k} {v:.2f}" for k, v in r["steady"]["front_cpu_ms_per_request"].items()))
    row("requests max/mean per agent", lambda r: f"{r['steady']['requests_max_mean']:.2f} {list(r['steady']['served_per_agent'].values())}")
    row("ledger memory max/mean", lambda r: f"{r['steady']['reserved_max_mean']:.2f}")
    row("RSS (agent+server) max/mean", lambda r: f"{r['steady']['rss_max_mean']:.2f} ({max(r['steady']['rss_per_agent'].values()) / 2**20:.0f} MiB max)")
    row("models loaded per agent", lambda r: list(r["steady"]["models_loaded_per_agent"].values()))
    row("models loaded twice", lambda r: r["steady"]["models_loaded_twice"])
    row("downloads (steady / total)", lambda r: f"{r['steady']['downloads']} / {r['steady']['downloads_total']}")
    row("hot model ok/s first→last third", lambda r: f"{r['hot']['first_third_rps']:.0f} → {r['hot']['last_third_rps']:.0f}, copies {max(r['hot']['copies_per_second'] or [0])}")
    row("failover: failed (in flight / after)", lambda r: f"{r['failover']['failed']} ({r['failover']['failed_in_flight_at_kill']} / {r['failover']['failed_started_after_kill']})")
    row("failover: last failure, s after kill", lambda r: r["failover"]["last_failure_s_after_kill"])
    row("failover: dead agent's models answered elsewhere", lambda r: f"{r['failover']['victim_models_answered_elsewhere']} of {r['failover']['victim_models_asked_after_kill']} asked ({r['failover']['victim_models']} held); first request answered within {r['failover']['max_s_first_request_to_answer']} s")
    row("3→4: models on the new agent", lambda r: r["resize"]["models_on_new_agent"])
    row("3→4: models moved between old agents", lambda r: r["resize"]["models_moved_between_old_agents"])
    row("3→4: models loaded twice after", lambda r: r["resize"]["models_loaded_twice_after"])
    row("3→4: failed", lambda r: r["resize"]["failed"])
    lines = [
        "# bench_cluster: inference gateway (Envoy + picker) vs nginx path hash",
        "",
        f"Command: `{command_line()}`",
        "",
        machine_md(m),
        "- The machine is shared with other engineers' work (see the load average); every process here "
        "(agents, their MLServers, Envoy/nginx, the picker, the clients) shares its CPUs.",
        f"- Setup: {a.agents} agents (+1 joining), {a.models} sklearn models served over HTTP into one shared cache, "
        f"each declared {a.model_memory} with --host-memory {a.budget} per agent, --min-residency 2; "
        f"Zipf s={a.zipf}; {a.clients} keep-alive clients; steady {a.duration} s, hot {a.hot} s, failover {a.failover} s, "
        f"resize {a.resize} s; picker --hot-rate {a.hot_rate}. Each topology gets a fresh fleet, in the order of the columns.",
        "- gateway: Envoy + picker, Envoy's override-host policy to the picked agent (a retry goes to another agent); "
        "gateway-odst: the same with an ORIGINAL_DST cluster (the fleet contract's wiring); nginx: `hash $modelshelf_model "
        "consistent` on the deployed path map (deploy/k8s/07-scale-out).",
        "",
        md_table(["", *kinds], rows),
        "",
        "## Goals",
        "",
        md_table(["goal", "verdict", "why"], verdicts(res)) if "gateway" in res else "gateway not run",
        "",
        "Notes: the hit ratio is the agents' own `modelshelf_loaded_lookups_total` (a request that found its "
        "model loaded); downloads are GETs at the model store (the cache is shared, so a model is fetched once "
        "whatever the topology); 'in flight at the kill' = failed requests that started before it.",
    ]
    if "nginx" not in res:
        lines.append(f"\nnginx: {res.get('nginx_skipped')}")
    return "\n".join(lines)


def main() -> int:
    p = arg_parser(
        __doc__, agents=3, models=60, model_memory=Flag("24Mi", "each model's declared memory"),
        budget=Flag("480Mi", "--host-memory of each agent (480Mi / 24Mi: 20 models)"), zipf=1.1, clients=6,
        duration=20.0, hot=12.0, failover=8.0, resize=8.0, hot_rate=Flag(30.0, "the picker's --hot-rate"),
        topologies=Flag(",".join(TOPOLOGIES), "comma-separated, from: gateway (Envoy override-host + picker), "
                        "gateway-odst (Envoy ORIGINAL_DST + picker), nginx"),
        name="cluster")
    a = p.parse_args()

    m = machine(tools=[["nginx", "-v"]])
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    res: dict = {"args": vars(a)}
    try:
        names = [f"model-{i:03d}" for i in range(a.models)]
        files = {}
        for i, n in enumerate(names + ["warm"]):
            d = write_sklearn_model(root / "src" / n, seed=i)
            files[f"{n}/model.joblib"] = (d / "model.joblib").read_bytes()
        with HTTPFileServer(files=files) as store:
            models = [{"name": n, "uri": store.url(f"{n}/model.joblib"), "runtime": "sklearn", "memory": a.model_memory,
                       "preload": False} for n in names]
            models.append({"name": "warm", "uri": store.url("warm/model.joblib"), "runtime": "sklearn", "memory": "1Mi"})
            for kind in a.topologies.split(","):
                if kind not in TOPOLOGIES:
                    raise SystemExit(f"--topologies: unknown {kind!r} (one of {', '.join(TOPOLOGIES)})")
                if kind == "nginx":
                    try:
                        nginx_binary()
                    except FileNotFoundError as e:
                        res["nginx_skipped"] = str(e)
                        continue
                print(f"[bench_cluster] {kind} ...", flush=True)
                res[kind] = run_topology(kind, a, store, models, names, root)
                print(json.dumps(res[kind])[:2000], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    m["loadavg_at_end"] = loadavg()
    res["machine"] = m
    if "gateway" in res:
        res["verdicts"] = [{"goal": g, "verdict": v, "why": w} for g, v, w in verdicts(res)]
    png = plot(res, RESULTS / f"{a.name}.png")
    md = report(a, res, m) + (f"\n\n![failover and hot model]({png.name})\n" if png else "")
    paths = write_results(a.name, md, res)
    print(md)
    print("wrote", *(p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
