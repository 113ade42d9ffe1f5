"""Proxy benchmark: what the agent's data-plane hop costs, beside nginx as a reference hop.

    .venv/bin/python benchmarks/bench_proxy.py                      # defaults (~3 min)
    .venv/bin/python benchmarks/bench_proxy.py --duration 5 --rounds 1   # a quick look
    .venv/bin/python benchmarks/bench_proxy.py --profile            # + py-spy profile of the agent

One agent with its embedded MLServer serves one small sklearn model (loaded at start). The same
load generator, wrk (apt; a Lua script sends the POST body), drives the same small V2 infer
request (one row, 4 features) against three targets that all end in the SAME MLServer process:

  direct      the MLServer's own HTTP port (`/status` -> server.url)
  agent       the agent's port: the fast path (a plain infer for a loaded model is answered from
              the connection's callbacks: uvicorn's httptools protocol -> agent.upstream's pool)
  nginx       nginx (apt) as a reverse proxy on a free loopback port, one worker, keep-alive upstream
  agent-asgi  (optional, `--targets direct,agent,nginx,agent-asgi`) the same agent code with
              --no-fast-path (every request through the ASGI router): the before/after of the
              fast path in the same run. It is a second agent with its OWN MLServer (same code and
              model), so its server figures come from that process; its ratios are against the
              first server's direct runs (indicative); its agent CPU per request is the figure.
  agent-base  (optional, with `--baseline-entry CMD`) a second agent run by CMD (e.g. another
              source tree: `env -C OLD PYTHONPATH=OLD python -m agent.cli`), with its own
              MLServer, as agent-asgi: the before/after of a change in the same run, interleaved,
              its agent CPU per request paired by round with the agent's.
  relay       (optional) benchmarks/relay_floor.py: a uvloop relay that only moves bytes between
              each client connection and its own upstream connection (no parsing, no lease, no
              pool): the floor of any Python data plane on uvloop, beside nginx's.

Per target: latency p50/p99 at concurrency 1 (wrk -t1 -c1) and throughput at concurrency 16
(wrk -t1 -c16), plus the CPU time each process spent per request during the concurrency-16 run.
Targets are interleaved over --rounds rounds and the median of the rounds is reported, so slow
drift in machine load hits every target alike. Any non-2xx response or socket error voids a run.

On a 2-core machine the load generator, the proxy and the server compete for the same cores:
throughput through a proxy is then bounded by the CPU the proxy takes from the server, not by
added latency alone. The results say so, with the CPU per request of each process.

`--profile` records the agent with py-spy (PyPI) during one extra concurrency-16 run and reports
where its CPU goes (self time by component: h11 parsing, uvicorn, aiohttp, the router...).
`--agent-entry CMD` runs the agent through another entry point (for before/after experiments
with a launcher that patches it; default `python -m agent.cli`).

Results: benchmarks/results/proxy.md and proxy.json (`--out NAME` to write NAME.md/json).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    RESULTS, V2_BODY, Agent, command_line, cpu_seconds, free_port, http, loadavg, machine, machine_md, md_table,
    process_tree, stop_group, wait_http, write_results, write_sklearn_model,
)

MODEL = "iris"
# issue 13's goals for the hop
GOAL_RATIO = 0.95  # agent throughput / direct (c=16)
GOAL_ADDED_P50_MS = 0.2  # agent p50 - direct p50 (c=1)
GOAL_CPU_VS_NGINX = 2.0  # agent CPU per request / nginx CPU per request (c=16)

_LUA = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d, ' ..
    '"p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "mean_us": %%f, "max_us": %%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""

_NGINX = """
worker_processes 1;
daemon off;
master_process on;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  upstream backend {{
    server {upstream};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port};
    keepalive_requests 100000;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""


# ---------------------------------------------------------------------------------- nginx
class Nginx:
    """nginx as a foreground reverse proxy to `upstream` (host:port), config in a temp dir."""

    def __init__(self, upstream: str, workdir: Path):
        self.tmp = workdir / "nginx"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        user = "user root;" if os.geteuid() == 0 else ""  # workers keep access to the temp dir
        conf = self.tmp / "nginx.conf"
        conf.write_text(_NGINX.format(tmp=self.tmp, port=self.port, upstream=upstream, user=user))
        self._log = open(self.tmp / "stderr.log", "ab")
        self.proc = subprocess.Popen([shutil.which("nginx") or "nginx", "-p", str(self.tmp), "-c", str(conf), "-e", str(self.tmp / "error.log")],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self) -> list[int]:
        return [p.pid for p in process_tree(self.proc.pid)]

    def stop(self) -> None:
        stop_group(self.proc)
        self._log.close()


class Relay:
    """benchmarks/relay_floor.py in front of `upstream` (host:port): the Python/uvloop floor."""

    def __init__(self, upstream: str, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        host, port = upstream.rsplit(":", 1)
        self._log = open(workdir / "relay.log", "ab")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("relay_floor.py")), str(self.port), host, port],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        stop_group(self.proc)
        self._log.close()


# ---------------------------------------------------------------------------------- wrk
def wrk(url: str, script: Path, connections: int, duration: float, timeout_s: float = 10) -> dict[str, Any]:
    """One wrk run (one thread); the Lua `done` hook prints the summary as JSON."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", f"--timeout={timeout_s:g}s", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    m = re.search(r"^WRKJSON (.*)$", out.stdout, re.M)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return r


def _ms(us: float) -> float:
    return round(us / 1000.0, 3)


def measure(target: str, url: str, script: Path, args: argparse.Namespace, pids: dict[str, list[int]]) -> dict[str, Any]:
    """Latency at -c LAT and throughput at -c THR for one target; CPU/request per process at THR."""
    wrk(url, script, args.throughput_concurrency, args.warmup)  # warm connections, pools, caches
    lat = wrk(url, script, args.latency_concurrency, args.duration)
    before = {k: cpu_seconds(v) for k, v in pids.items()}
    wrk_before, t0 = _children_cpu(), time.monotonic()
    thr = wrk(url, script, args.throughput_concurrency, args.duration)
    wall = time.monotonic() - t0
    cpu = {k: cpu_seconds(v) - before[k] for k, v in pids.items()}
    cpu["wrk"] = _children_cpu() - wrk_before
    for r in (lat, thr):
        if r["errors"]:
            raise RuntimeError(f"{target}: wrk saw errors {r} (non-2xx or socket errors): the run is void")
    return {
        "target": target,
        "latency_c": args.latency_concurrency,
        "p50_ms": _ms(lat["p50_us"]), "p90_ms": _ms(lat["p90_us"]), "p99_ms": _ms(lat["p99_us"]),
        "rps_at_latency_c": round(lat["rps"], 1),
        "throughput_c": args.throughput_concurrency,
        "rps": round(thr["rps"], 1),
        "thr_p50_ms": _ms(thr["p50_us"]), "thr_p99_ms": _ms(thr["p99_us"]),
        # CPU microseconds per request at the throughput concurrency, per process kind
        "cpu_us_per_req": {k: round(v / thr["requests"] * 1e6, 1) for k, v in cpu.items() if k in ("server", "wrk") or k == target},
        "cpu_util": {k: round(v / wall, 2) for k, v in cpu.items() if k in ("server", "wrk") or k == target},
        "raw": {"latency": lat, "throughput": thr},
    }


def _children_cpu() -> float:
    """CPU seconds of reaped children: around one wrk run, the CPU of that wrk process."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ---------------------------------------------------------------------------------- profile
_CATEGORIES = [
    # (label, regex on the frame text "func (file:line)"), checked leaf first
    ("h11 (HTTP/1.1 parsing and framing, pure Python)", r"[/\\]h11[/\\]"),
    ("httptools (HTTP parsing, C)", r"httptools"),
    ("uvicorn protocol glue", r"uvicorn[/\\]"),
    ("aiohttp client (request, connection pool, response parsing)", r"aiohttp[/\\]|multidict|yarl[/\\]"),
    ("modelshelf router", r"agent[/\\]router\.py"),
    ("modelshelf reconciler acquire/release", r"agent[/\\]reconciler\.py"),
    ("prometheus_client (per-request metrics)", r"prometheus_client"),
    ("agent ASGI entry (app.py)", r"agent[/\\]app\.py"),
    ("event loop (asyncio/uvloop, transports, tasks)", r"asyncio[/\\]|uvloop|selectors\.py"),
]


def summarize_profile(raw: Path, rate: int, seconds: float) -> dict[str, Any]:
    """Self time by component (a sample goes to the first category matched from the leaf
    up), inclusive time of a few key frames, and the top leaf functions."""
    by_cat: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    key_frames = {  # py-spy frames read "Class.method (path/file.py:line)"
        "Router._forward (the whole upstream round trip, aiohttp included)": r"^Router\._forward \(agent[/\\]router\.py",
        "aiohttp ClientSession._request + ClientRequest.write_bytes (its body-writer task)":
            r"^(ClientSession\._request|ClientRequest\.write_bytes) \(aiohttp[/\\]",
        "uvicorn H11Protocol / RequestResponseCycle (h11 server side, incl. writes)": r"h11_impl\.py",
        "uvicorn HttpToolsProtocol (httptools server side)": r"httptools_impl\.py",
        "h11 library": r"\(h11[/\\]",
        "Reconciler.acquire/release": r"^Reconciler\.(acquire|release) \(agent[/\\]reconciler\.py",
        "prometheus_client": r"prometheus_client",
    }
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        for label, rx in key_frames.items():
            if any(re.search(rx, f) for f in frames):
                inclusive[label] += n
        for f in reversed(frames):
            cat = next((label for label, rx in _CATEGORIES if re.search(rx, f)), None)
            if cat:
                by_cat[cat] += n
                break
        else:
            by_cat["other (python runtime, stdlib, ...)"] += n
        leaf = re.sub(r":\d+\)$", ")", frames[-1])
        leaf = re.sub(r"\(.*[/\\](site-packages|lib/python3\.\d+)[/\\]", "(", leaf)
        leaves[leaf] += n
    pct = (lambda n: round(100.0 * n / total, 1)) if total else (lambda n: 0.0)
    return {
        "samples": total,
        "busy_fraction": round(total / (rate * seconds), 2) if seconds else None,
        "self_by_component_pct": {k: pct(v) for k, v in by_cat.most_common()},
        "inclusive_pct": {k: pct(v) for k, v in inclusive.most_common()},
        "top_leaf_functions_pct": {k: pct(v) for k, v in leaves.most_common(15)},
    }


def profile_agent(agent_pid: int, url: str, script: Path, args: argparse.Namespace, out: Path) -> dict[str, Any] | None:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        print("py-spy not found (pip install py-spy): no profile", file=sys.stderr)
        return None
    rate, seconds = 250, args.duration
    raw = out / "agent-profile.txt"
    spy = subprocess.Popen([pyspy, "record", "-p", str(agent_pid), "-r", str(rate), "-d", f"{seconds:g}", "-f", "raw",
                            "--nonblocking", "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    thr = wrk(url, script, args.throughput_concurrency, seconds)
    _, err = spy.communicate(timeout=seconds + 60)
    if spy.returncode != 0 or not raw.exists():
        print(f"py-spy failed: {err.decode(errors='replace')[-500:]}", file=sys.stderr)
        return None
    summary = summarize_profile(raw, rate, seconds)
    summary["rps_while_profiled"] = round(thr["rps"], 1)
    summary["rate_hz"] = rate
    return summary


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=4, help="seconds per measured wrk run")
    p.add_argument("--warmup", type=float, default=1, help="seconds of warm-up before each target's runs")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the targets; medians are reported")
    p.add_argument("--latency-concurrency", type=int, default=1)
    p.add_argument("--throughput-concurrency", type=int, default=16)
    p.add_argument("--targets", default="direct,agent,nginx",
                   help="comma-separated: direct, agent, nginx, agent-asgi, agent-base, relay")
    p.add_argument("--profile", action="store_true", help="py-spy profile of the agent at the throughput concurrency")
    p.add_argument("--agent-entry", default=None, help="command that takes `run ...` args (default: python -m agent.cli)")
    p.add_argument("--baseline-entry", default=None, help="the agent-base target's command (takes `run ...` args)")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where result files go")
    p.add_argument("--out", default="proxy", help="result name under benchmarks/results/ ('' = don't write)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, profile)")
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    if "nginx" in targets and shutil.which("nginx") is None:
        raise SystemExit("nginx not found: apt-get install -y nginx (or --targets direct,agent)")
    if ("agent-base" in targets) != bool(args.baseline_entry):
        raise SystemExit("--targets agent-base and --baseline-entry CMD go together")

    info = machine(tools=[["wrk", "-v"], ["nginx", "-v"]])
    tmp = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    script = tmp / "post.lua"
    script.write_text(_LUA % V2_BODY.decode())
    write_sklearn_model(tmp / "store" / MODEL, "logreg", 0)
    entry = shlex.split(args.agent_entry) if args.agent_entry else None
    models = [{"name": MODEL, "uri": str(tmp / "store" / MODEL), "runtime": "sklearn"}]
    agent = Agent(tmp / "agent", models, entry=entry)
    extra = {t: a for t, a in (
        ("agent-asgi", Agent(tmp / "agent-asgi", models, "--no-fast-path", entry=entry) if "agent-asgi" in targets else None),
        ("agent-base", Agent(tmp / "agent-base", models, entry=shlex.split(args.baseline_entry)) if "agent-base" in targets else None),
    ) if a is not None}  # second agents, each with its own MLServer
    nginx: Nginx | None = None
    relay: Relay | None = None
    results: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
    profile = None
    try:
        for a in (agent, *extra.values()):
            a.wait_ready()
            a.wait_models(lambda ms: ms.get(MODEL, {}).get("state") == "loaded", 60, f"{MODEL} loaded")
        server_url, server_pid = agent.server_url, agent.server_pid
        pids: dict[str, list[int]] = {"server": [q.pid for q in process_tree(server_pid)], "agent": [agent.proc.pid]}
        urls = {"direct": server_url, "agent": agent.url}
        target_pids = {t: pids for t in targets}
        for t, a in extra.items():
            urls[t] = a.url
            target_pids[t] = {"server": [q.pid for q in process_tree(a.server_pid)], t: [a.proc.pid]}
        if "nginx" in targets:
            nginx = Nginx(server_url.split("//", 1)[1], tmp)
            wait_http(nginx.url + "/v2/health/ready", 20, "nginx")
            pids["nginx"] = nginx.pids()
            urls["nginx"] = nginx.url
        if "relay" in targets:
            relay = Relay(server_url.split("//", 1)[1], tmp)
            wait_http(relay.url + "/v2/health/ready", 20, "relay")
            pids["relay"] = [relay.proc.pid]
            urls["relay"] = relay.url
        infer = f"/v2/models/{MODEL}/infer"
        for t in targets:  # every target answers the same request the same way
            status, body = http("POST", urls[t] + infer, V2_BODY, {"content-type": "application/json"})
            doc = json.loads(body)
            if status != 200 or doc.get("model_name") != MODEL:
                raise RuntimeError(f"{t}: unexpected answer {status} {body[:300]!r}")
        for rnd in range(args.rounds):
            order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
            for t in order:
                r = measure(t, urls[t] + infer, script, args, target_pids[t])
                r["round"] = rnd
                r["loadavg"] = loadavg()
                results[t].append(r)
                print(f"round {rnd} {t:6s} p50={r['p50_ms']:.3f}ms p99={r['p99_ms']:.3f}ms rps@{args.throughput_concurrency}={r['rps']:.0f} "
                      f"cpu/req={r['cpu_us_per_req']} load={r['loadavg'][0]}", flush=True)
        if args.profile and "agent" in targets:
            profile = profile_agent(agent.proc.pid, urls["agent"] + infer, script, args, tmp)
        fast_path = agent.status().get("data_plane")  # how many answers took the fast path
    finally:
        if nginx is not None:
            nginx.stop()
        if relay is not None:
            relay.stop()
        agent.stop()
        for a in extra.values():
            a.stop()
    info["loadavg_at_end"] = loadavg()
    info["fast_path"] = fast_path

    summary = {t: _median(rs) for t, rs in results.items()}
    ratios = _ratios(summary, results)
    data = {"benchmark": "proxy", "command": command_line(), "machine": info, "model": MODEL,
            "request_body": V2_BODY.decode(), "settings": vars(args), "summary": summary, "ratios": ratios,
            "rounds": results, "profile": profile}
    md = _markdown(data)
    print(md)
    if args.out:
        paths = write_results(args.out, md, data, args.results_dir)
        print("wrote", *[str(x) for x in paths])
    if args.keep:
        print("kept", tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _median(rs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("p50_ms", "p90_ms", "p99_ms", "rps_at_latency_c", "rps", "thr_p50_ms", "thr_p99_ms"):
        out[key] = round(statistics.median(r[key] for r in rs), 3)
    for key in ("cpu_us_per_req", "cpu_util"):
        names = rs[0][key].keys()
        out[key] = {n: round(statistics.median(r[key][n] for r in rs), 2) for n in names}
    out["rps_all_rounds"] = [r["rps"] for r in rs]
    out["p50_all_rounds"] = [r["p50_ms"] for r in rs]
    return out


def _ratios(summary: dict[str, Any], results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per hop: the medians of PAIRED per-round figures (each round measures every target
    back to back, so a burst of other work on the machine hits a pair, not one side), and the
    ratio of the medians for reference."""
    d = summary.get("direct")
    out: dict[str, Any] = {}
    if not d:
        return out
    for t in ("agent", "nginx", "agent-asgi", "agent-base", "relay"):
        s = summary.get(t)
        if not s:
            continue
        pairs = list(zip(results["direct"], results[t]))
        out[t] = {
            "throughput_ratio": round(statistics.median(b["rps"] / a["rps"] for a, b in pairs), 3),
            "added_p50_ms": round(statistics.median(b["p50_ms"] - a["p50_ms"] for a, b in pairs), 3),
            "added_p99_ms": round(statistics.median(b["p99_ms"] - a["p99_ms"] for a, b in pairs), 3),
            "throughput_ratio_of_medians": round(s["rps"] / d["rps"], 3),
            "added_p50_of_medians_ms": round(s["p50_ms"] - d["p50_ms"], 3),
            "throughput_ratio_per_round": [round(b["rps"] / a["rps"], 3) for a, b in pairs],
            "added_p50_ms_per_round": [round(b["p50_ms"] - a["p50_ms"], 3) for a, b in pairs],
        }
    for t in ("agent", "agent-asgi", "agent-base", "relay"):  # CPU per request against nginx's, paired by round
        if t in out and "nginx" in results:
            pairs = list(zip(results["nginx"], results[t]))
            per_round = [round(b["cpu_us_per_req"][t] / a["cpu_us_per_req"]["nginx"], 2) for a, b in pairs]
            out[t]["cpu_vs_nginx"] = round(statistics.median(per_round), 2)
            out[t]["cpu_vs_nginx_per_round"] = per_round
    if "agent" in out and "agent-base" in out:  # the change: the agent's CPU per request against the baseline's
        per_round = [round(b["cpu_us_per_req"]["agent"] / a["cpu_us_per_req"]["agent-base"], 3)
                     for a, b in zip(results["agent-base"], results["agent"])]
        out["agent"]["cpu_vs_base"] = round(statistics.median(per_round), 3)
        out["agent"]["cpu_vs_base_per_round"] = per_round
    if "agent" in out:
        a = out["agent"]
        a["goal_throughput_ratio"] = GOAL_RATIO
        a["goal_added_p50_ms"] = GOAL_ADDED_P50_MS
        a["goal_cpu_vs_nginx"] = GOAL_CPU_VS_NGINX
        a["meets_throughput_goal"] = a["throughput_ratio"] >= GOAL_RATIO
        a["meets_latency_goal"] = a["added_p50_ms"] <= GOAL_ADDED_P50_MS
        if "cpu_vs_nginx" in a:
            a["meets_cpu_goal"] = a["cpu_vs_nginx"] <= GOAL_CPU_VS_NGINX
    return out


def _markdown(data: dict[str, Any]) -> str:
    s, r, st = data["summary"], data["ratios"], data["settings"]
    lat_c, thr_c = st["latency_concurrency"], st["throughput_concurrency"]
    lines = [
        "# Proxy benchmark: MLServer direct vs through the agent vs through nginx",
        "",
        f"Command: `{data['command']}`",
        "",
        machine_md(data["machine"]),
        f"- Load generator: wrk, 1 thread, POST of a {len(data['request_body'])}-byte V2 infer body to one loaded sklearn "
        f"model; {st['rounds']} rounds, each measuring every target back to back (order rotated), "
        f"{st['duration']:g} s per measurement after {st['warmup']:g} s of warm-up; medians over rounds.",
        "- The load generator, the proxy and MLServer share the same cores: on 2 cores, a proxy's CPU per request is "
        "taken from the server, so throughput ratios here are lower than on a machine where the proxy has its own core.",
        "",
        "## Results",
        "",
        md_table(
            ["target", f"p50 ms (c={lat_c})", f"p99 ms (c={lat_c})", f"req/s (c={thr_c})", f"p50 ms (c={thr_c})",
             f"p99 ms (c={thr_c})", f"CPU µs/req (c={thr_c})"],
            [[t, v["p50_ms"], v["p99_ms"], v["rps"], v["thr_p50_ms"], v["thr_p99_ms"],
              ", ".join(f"{k} {x:g}" for k, x in v["cpu_us_per_req"].items())] for t, v in s.items()],
        ),
        "",
        "Ratios are medians over rounds of paired figures (the hop's run vs the direct run of the same round):",
        "",
        md_table(
            ["hop", "throughput / direct", "added p50 ms (c=%d)" % lat_c, "added p99 ms (c=%d)" % lat_c, "per-round throughput ratios",
             "per-round added p50 ms"],
            [[t, v["throughput_ratio"], v["added_p50_ms"], v["added_p99_ms"], v["throughput_ratio_per_round"],
              v["added_p50_ms_per_round"]] for t, v in r.items()],
        ),
        "",
    ]
    a = r.get("agent")
    if a:
        verdict = lambda ok: "met" if ok else "MISSED"  # noqa: E731
        lines += [
            "## Goals (issue 13, the hop)",
            "",
            md_table(["goal", "measured (median of paired rounds)", "verdict"], [
                [f"throughput ≥ {GOAL_RATIO}× direct (c={thr_c})", f"{a['throughput_ratio']:.3f}×",
                 verdict(a["meets_throughput_goal"])],
                [f"added p50 ≤ {GOAL_ADDED_P50_MS} ms (c={lat_c})", f"{a['added_p50_ms']:.3f} ms", verdict(a["meets_latency_goal"])],
                *([[f"agent CPU per request ≤ {GOAL_CPU_VS_NGINX}× nginx's (c={thr_c})",
                    f"{a['cpu_vs_nginx']:.2f}× (per round {a['cpu_vs_nginx_per_round']})", verdict(a["meets_cpu_goal"])]]
                  if "cpu_vs_nginx" in a else []),
            ]),
            "",
        ]
        fp = data["machine"].get("fast_path")
        if fp:
            lines += [f"Fast path: {fp.get('fast_path_answers')} answers, {fp.get('fast_path_fallbacks')} handed to the "
                      "ASGI path (a request that found no idle upstream connection or free slot at once), over the "
                      "whole run.", ""]
    b = r.get("agent-asgi")
    if b:
        lines += ["Before/after in this run (agent-asgi is a second agent, same code, with --no-fast-path and its own "
                  "MLServer: its ratios to direct are indicative, its agent CPU per request is the figure): "
                  f"the agent with --no-fast-path spent {s['agent-asgi']['cpu_us_per_req']['agent-asgi']:g} µs "
                  f"of CPU per request ({b.get('cpu_vs_nginx', '?')}× nginx), added {b['added_p50_ms']:.3f} ms at p50; with "
                  f"the fast path {s['agent']['cpu_us_per_req']['agent']:g} µs ({a.get('cpu_vs_nginx', '?') if a else '?'}× nginx), "
                  f"{a['added_p50_ms'] if a else '?'} ms.", ""]
    b = r.get("agent-base")
    if b and a:
        lines += ["Before/after in this run (agent-base is a second agent run by `--baseline-entry`, with its own "
                  "MLServer, interleaved with the others: its ratios to direct are indicative, its agent CPU per request "
                  f"is the figure): agent-base {s['agent-base']['cpu_us_per_req']['agent-base']:g} µs of CPU per request "
                  f"({b.get('cpu_vs_nginx', '?')}× nginx, per round {b.get('cpu_vs_nginx_per_round')}), agent "
                  f"{s['agent']['cpu_us_per_req']['agent']:g} µs ({a.get('cpu_vs_nginx', '?')}× nginx); agent / agent-base "
                  f"paired by round: {a.get('cpu_vs_base')}× (per round {a.get('cpu_vs_base_per_round')}).", ""]
    f = r.get("relay")
    if f:
        lines += ["The floor of a Python data plane in this run (relay: benchmarks/relay_floor.py, a uvloop relay that only "
                  "moves bytes between each client connection and its own upstream connection): "
                  f"{s['relay']['cpu_us_per_req']['relay']:g} µs of CPU per request ({f.get('cpu_vs_nginx', '?')}× nginx, "
                  f"per round {f.get('cpu_vs_nginx_per_round')})."
                  + (f" The agent spent {s['agent']['cpu_us_per_req']['agent']:g} µs: "
                     f"{s['agent']['cpu_us_per_req']['agent'] - s['relay']['cpu_us_per_req']['relay']:.1f} µs more than the "
                     "relay for the HTTP framing, routing, lease, pool and answer." if a else ""), ""]
    lines += ["Per round (req/s at c=%d): " % thr_c + "; ".join(f"{t} {v['rps_all_rounds']}" for t, v in s.items()), ""]
    prof = data.get("profile")
    if prof:
        lines += [
            f"## Where the agent's CPU goes (py-spy, {prof['rate_hz']} Hz, c={thr_c}, {prof['samples']} samples, "
            f"agent busy {prof['busy_fraction']:.0%} of one core, {prof['rps_while_profiled']:.0f} req/s while profiled)",
            "",
            "Self time by component (a sample counts for the innermost frame that matches a component):",
            "",
            md_table(["component", "% of agent CPU"], list(prof["self_by_component_pct"].items())),
            "",
            "Inclusive time of key frames:",
            "",
            md_table(["frame", "% of agent CPU"], list(prof["inclusive_pct"].items())),
            "",
            "Top leaf functions:",
            "",
            md_table(["function", "%"], list(prof["top_leaf_functions_pct"].items())),
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
