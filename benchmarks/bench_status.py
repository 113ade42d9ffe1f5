"""Status benchmark (issue 8, item 7): what /status and /metrics cost with a big cache and many
models, and what scraping them does to the data plane.

    .venv/bin/python benchmarks/bench_status.py                        # defaults (about 3 minutes)
    .venv/bin/python benchmarks/bench_status.py --entries 10000 --models 1000 --seconds 20

Setup (in a temp dir, removed at the end):
- a cache root with --entries published entries, fabricated in the on-disk layout of
  puller/cache.py (`VERSION`, `entries/<key>/manifest.json`, `entries/<key>/files/model.bin`,
  one small file each): what a node's cache looks like after months of model churn;
- a config with --models models: one `hot` sklearn model (preloaded: the data plane's target)
  and --models - 1 lazy ones (`preload: false`, tiny sklearn models on local paths: used in
  place, registered and cached, never loaded);
- the real agent (`python -m agent.cli run`) with its embedded MLServer on loopback.

Measured, each on one keep-alive connection:
1. GET /status and GET /metrics, --samples each: p50/p99/max latency;
2. the data plane alone: POST /v2/models/hot/infer at --rate per second for --seconds, each
   latency counted from the request's scheduled start (so a stall counts for every request it
   delays, not just the one in flight): p50/p99/max;
3. the same data plane while another thread scrapes /metrics once a second (as Prometheus does).
The verdict compares (3) with (2): scraping must not stall inference (goal: p99 within 1.5x,
and /metrics p99 under 50 ms). Benchmark, not a test: figures depend on the machine and on what
else runs on it (the load average is recorded).

Results: benchmarks/results/status.md and status.json.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import V2_BODY, Agent, command_line, loadavg, machine, machine_md, md_table, write_results, write_sklearn_model  # noqa: E402


def fabricate_cache(root: Path, entries: int) -> None:
    """`entries` published entries in puller/cache.py's on-disk layout (one small file each)."""
    (root / "entries").mkdir(parents=True, exist_ok=True)
    (root / "VERSION").write_text("1\n")
    now = time.time()
    payload = os.urandom(4096)
    for i in range(entries):
        key = uuid.uuid4().hex
        d = root / "entries" / key
        (d / "files").mkdir(parents=True)
        (d / "files" / "model.bin").write_bytes(payload)
        manifest = {
            "format": 1, "key": key, "uri": f"s3://bench/models/m{i}/", "sources": [],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now - i)), "created_ts": now - i,
            "created_by": {"host": "bench", "pid": 0, "holder": "bench"}, "total_bytes": len(payload),
            "source_sha256": None, "links": [], "files": [{"path": "model.bin", "size": len(payload)}],
        }
        (d / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.utime(d, (now - i, now - i))


class Client:
    """One keep-alive HTTP connection; `call` returns (status, seconds)."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, float]:
        headers = {"content-type": "application/json"} if body else {}
        t0 = time.perf_counter()
        self.conn.request(method, path, body=body, headers=headers)
        r = self.conn.getresponse()
        r.read()
        return r.status, time.perf_counter() - t0

    def close(self) -> None:
        self.conn.close()


def summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    if not ms:
        return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p99_ms": p99, "max_ms": ms[-1]}


def sample(url: str, path: str, n: int) -> dict[str, float]:
    c = Client(url)
    times = []
    try:
        for _ in range(n):
            status, dt = c.call("GET", path)
            if status != 200:
                raise RuntimeError(f"GET {path} -> {status}")
            times.append(dt)
    finally:
        c.close()
    return summary(times)


def data_plane(url: str, seconds: float, rate: float, scrape_every: float | None) -> tuple[dict[str, float], dict[str, float] | None]:
    """Infers on `hot` at a fixed `rate` for `seconds`; with `scrape_every`, /metrics is scraped
    by another thread meanwhile. Each infer's latency counts from its SCHEDULED start (t0 + k /
    rate), not from when it could be sent: a client that only sends when the previous answer
    came back would hide a stall behind a single slow request (coordinated omission).
    Returns the infer summary and the scrape summary (or None)."""
    stop = threading.Event()
    scrapes: list[float] = []

    def scraper() -> None:
        c = Client(url)
        try:
            while not stop.wait(scrape_every):
                scrapes.append(c.call("GET", "/metrics")[1])
        finally:
            c.close()

    t = threading.Thread(target=scraper, daemon=True) if scrape_every else None
    if t:
        t.start()
    c = Client(url)
    times, errors, k = [], 0, 0
    t0 = time.perf_counter()
    try:
        while (scheduled := t0 + k / rate) < t0 + seconds:
            k += 1
            now = time.perf_counter()
            if scheduled > now:
                time.sleep(scheduled - now)
            status, _ = c.call("POST", "/v2/models/hot/infer", V2_BODY)
            if status == 200:
                times.append(time.perf_counter() - scheduled)
            else:
                errors += 1
    finally:
        stop.set()
        c.close()
        if t:
            t.join(60)
    out = summary(times)
    out["errors"] = errors
    return out, (summary(scrapes) if t else None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--models", type=int, default=1_000)
    ap.add_argument("--samples", type=int, default=30, help="requests per management endpoint")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each data-plane run")
    ap.add_argument("--rate", type=float, default=20.0, help="infers per second (fixed schedule)")
    ap.add_argument("--out", default="status", help="results name under benchmarks/results")
    args = ap.parse_args()

    m = machine()
    with tempfile.TemporaryDirectory(prefix="bench-status-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        fabricate_cache(work / "cache", args.entries)
        fabricate_s = time.monotonic() - t0
        write_sklearn_model(work / "store" / "hot", "logreg", 0)
        write_sklearn_model(work / "store" / "lazy", "tree", 1)
        models: list[dict[str, Any]] = [{"name": "hot", "uri": str(work / "store" / "hot"), "preload": True}]
        models += [{"name": f"lazy{i:04d}", "uri": str(work / "store" / "lazy"), "preload": False} for i in range(args.models - 1)]
        with Agent(work, models) as agent:
            agent.wait_ready(300)
            agent.wait_models(lambda ms: ms["hot"]["state"] == "loaded" and sum(1 for x in ms.values() if x["state"] == "cached") == args.models - 1,
                              what="hot loaded, the others cached")
            st = agent.status()
            cache_entries = st["cache"].get("entries")
            status_lat = sample(agent.url, "/status", args.samples)
            metrics_lat = sample(agent.url, "/metrics", args.samples)
            alone, _ = data_plane(agent.url, args.seconds, args.rate, None)
            scraped, scrape_lat = data_plane(agent.url, args.seconds, args.rate, 1.0)
    m["loadavg_at_end"] = loadavg()

    ratio_p99 = scraped["p99_ms"] / alone["p99_ms"]
    ratio_max = scraped["max_ms"] / alone["max_ms"]
    ok = ratio_p99 <= 1.5 and metrics_lat["p99_ms"] <= 50
    verdict = (f"Verdict: {'PASS' if ok else 'FAIL'}: with {args.entries:,} cache entries and {args.models:,} models, "
               f"/metrics p99 {metrics_lat['p99_ms']:.0f} ms, /status p99 {status_lat['p99_ms']:.0f} ms; scraping /metrics "
               f"every second makes the data plane's p99 {ratio_p99:.2f}x (max {ratio_max:.2f}x) what it is alone "
               f"(goal: <= 1.5x and /metrics p99 <= 50 ms).")
    rows = [
        ["GET /status", status_lat["n"], status_lat["p50_ms"], status_lat["p99_ms"], status_lat["max_ms"]],
        ["GET /metrics", metrics_lat["n"], metrics_lat["p50_ms"], metrics_lat["p99_ms"], metrics_lat["max_ms"]],
        [f"infer alone ({args.rate:.0f}/s)", alone["n"], alone["p50_ms"], alone["p99_ms"], alone["max_ms"]],
        [f"infer ({args.rate:.0f}/s), /metrics scraped every 1 s", scraped["n"], scraped["p50_ms"], scraped["p99_ms"], scraped["max_ms"]],
        ["the scrapes meanwhile", scrape_lat["n"], scrape_lat["p50_ms"], scrape_lat["p99_ms"], scrape_lat["max_ms"]],
    ]
    md = "\n\n".join([
        "# Status and metrics under a big cache (issue 8, item 7)",
        verdict,
        machine_md(m),
        f"- Command: `{command_line()}`",
        f"- Setup: {args.entries:,} fabricated cache entries (one 4 KiB file each; the agent's /status counted "
        f"{cache_entries}), {args.models:,} models (1 loaded, {args.models - 1:,} lazy and cached), embedded MLServer; "
        f"fabricating the cache took {fabricate_s:.1f} s.",
        md_table(["what", "n", "p50 ms", "p99 ms", "max ms"], rows),
        f"Ratios (scraped / alone): p99 {ratio_p99:.2f}x, max {ratio_max:.2f}x. Data-plane errors: alone {alone['errors']}, "
        f"scraped {scraped['errors']}.",
    ])
    data = {"machine": m, "command": command_line(), "args": vars(args), "cache_entries_seen": cache_entries,
            "status": status_lat, "metrics": metrics_lat, "infer_alone": alone, "infer_scraped": scraped,
            "scrapes": scrape_lat, "ratio_p99": ratio_p99, "ratio_max": ratio_max, "verdict": verdict}
    md_path, _ = write_results(args.out, md, data)
    print(md)
    print(f"\nwrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
