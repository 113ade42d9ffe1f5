"""Hostile-traffic benchmark: what attacks beside them cost legitimate clients of the data plane.

    .venv/bin/python benchmarks/bench_hostile.py                    # defaults (~2 min)
    .venv/bin/python benchmarks/bench_hostile.py --duration 5       # a quick look

One agent with its embedded MLServer serves two small sklearn models (m1, m2) and `slow`, a
model that answers after 30 s (longer than the agent's --request-timeout of 5 s). Legitimate
clients (threads in this process, one keep-alive connection each) send small V2 infers to m1
and m2 in turn, each with its own request id, and check every answer: the asked model's name
and the request's own id, else it counts as a wrong answer.

Phases, each --duration seconds, legitimate clients always running:
  baseline  nothing else
  desync    an attacker sends request lines smuggled into /versions/{v} (%0d%0a...), one after
            another (refused 400 before anything is forwarded)
  big-v1    an attacker sends 4 MiB V1 bodies that the agent must parse and translate before it
            can refuse them (last row ragged), one after another
  slow      an attacker keeps --slow-clients requests to `slow` in flight (each ends at the
            request timeout with 503), above the per-model upstream bound
  all       the three attackers together
Attackers run in their own processes, so their client-side CPU is not charged to this one
(all share the machine's cores with the agent and the server, as on a real node).

Reported per phase: legitimate requests, p50/p99 latency (ms), ratio to the baseline, errors,
wrong answers, and what the attacker got (status counts). Verdict: zero wrong answers and zero
legitimate errors in every phase, and the p99 ratio under all attacks at most --goal-p99-ratio.

Results: benchmarks/results/hostile.md and hostile.json (`--out NAME` for NAME.md/json).
"""
from __future__ import annotations

import argparse
import collections
import http.client
import json
import multiprocessing
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    Agent, command_line, loadavg, machine, machine_md, md_table, write_results, write_sklearn_model,
)
from tests.support.models import SLOW_IMPLEMENTATION, write_slow_model  # noqa: E402

MODELS = ("m1", "m2")
AGENT_FLAGS = ("--min-residency", "0", "--request-timeout", "5", "--upstream-connections", "64",
               "--max-upstream-per-model", "16")
DESYNC_PATHS = (
    "/v2/models/m1/versions/1%0d%0ax:%20y%0d%0a%0d%0aGET%20*",
    "/v2/models/m1/versions/1%0d%0a%0d%0a",
    "/v2/models/m1/versions/1%0d%0a",
)
BIG_V1 = b'{"instances": [' + b"[1]," * (4 * 2**20 // 4 - 100) + b"[1, 2]]}"
SLOW_BODY = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1.0]}]}).encode()


def _infer_body(rid: str) -> bytes:
    return json.dumps({"id": rid, "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64",
                                              "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()


# ---------------------------------------------------------------------------------- legitimate load
def legit_client(port: int, index: int, stop: threading.Event, out: dict[str, Any]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    n = 0
    while not stop.is_set():
        model = MODELS[n % 2]
        rid = f"c{index}-{n}"
        n += 1
        t0 = time.perf_counter()
        try:
            conn.request("POST", f"/v2/models/{model}/infer", _infer_body(rid), {"content-type": "application/json"})
            r = conn.getresponse()
            body = r.read()
        except (OSError, http.client.HTTPException) as e:
            out["errors"].append(f"{type(e).__name__}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            continue
        out["latencies"].append(time.perf_counter() - t0)
        if r.status != 200:
            out["errors"].append(f"{r.status} {body[:100]!r}")
            continue
        doc = json.loads(body)
        if doc.get("model_name") != model or doc.get("id") != rid:
            out["wrong"].append(f"asked {model} {rid}, got {doc.get('model_name')} {doc.get('id')}")
    conn.close()


# ---------------------------------------------------------------------------------- attackers
def _raw(port: int, head: bytes, body: bytes = b"") -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n" not in data and (chunk := s.recv(65536)):
            data += chunk
    return int(data.split(b" ", 2)[1]) if data else 0


def attack_desync(port: int, stop: Any, counts: Any) -> None:
    i = 0
    while not stop.is_set():
        path = DESYNC_PATHS[i % len(DESYNC_PATHS)]
        i += 1
        code = _raw(port, b"GET %s HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n" % path.encode())
        counts[f"desync {code}"] = counts.get(f"desync {code}", 0) + 1


def attack_big_v1(port: int, stop: Any, counts: Any) -> None:
    while not stop.is_set():
        head = (b"POST /v1/models/m1:predict HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(BIG_V1))
        code = _raw(port, head, BIG_V1)
        counts[f"big-v1 {code}"] = counts.get(f"big-v1 {code}", 0) + 1


def _slow_one(port: int, stop: Any, counts: Any, lock: Any) -> None:
    while not stop.is_set():
        head = (b"POST /v2/models/slow/infer HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(SLOW_BODY))
        code = _raw(port, head, SLOW_BODY)
        with lock:
            counts[f"slow {code}"] = counts.get(f"slow {code}", 0) + 1


def attack_slow(port: int, stop: Any, counts: Any, clients: int) -> None:
    lock = threading.Lock()
    threads = [threading.Thread(target=_slow_one, args=(port, stop, counts, lock)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ---------------------------------------------------------------------------------- phases
def run_phase(name: str, port: int, attacks: list[str], args: argparse.Namespace,
              manager: Any) -> dict[str, Any]:
    stop = manager.Event()
    counts = manager.dict()
    procs = []
    for a in attacks:
        target, extra = {"desync": (attack_desync, ()), "big-v1": (attack_big_v1, ()),
                         "slow": (attack_slow, (args.slow_clients,))}[a]
        p = multiprocessing.Process(target=target, args=(port, stop, counts, *extra), daemon=True)
        p.start()
        procs.append(p)
    if attacks:
        time.sleep(1.0)  # let the attack build up (slow requests fill their slots)
    out: dict[str, Any] = {"latencies": [], "errors": [], "wrong": []}
    lstop = threading.Event()
    threads = [threading.Thread(target=legit_client, args=(port, i, lstop, out)) for i in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(args.duration)
    lstop.set()
    for t in threads:
        t.join(90)
    stop.set()
    for p in procs:
        p.join(60)
        if p.is_alive():
            p.kill()
    lat = sorted(out["latencies"])
    q = statistics.quantiles(lat, n=100) if len(lat) >= 100 else None
    return {
        "phase": name,
        "attacks": attacks,
        "requests": len(lat),
        "p50_ms": round(statistics.median(lat) * 1000, 3) if lat else None,
        "p99_ms": round(q[98] * 1000, 3) if q else None,
        "errors": len(out["errors"]),
        "error_samples": sorted(collections.Counter(out["errors"]).items())[:5],
        "wrong": len(out["wrong"]),
        "wrong_samples": out["wrong"][:5],
        "attacker_got": dict(sorted(counts.items())),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per phase")
    parser.add_argument("--clients", type=int, default=4, help="legitimate clients (threads)")
    parser.add_argument("--slow-clients", type=int, default=32, help="requests the slow attacker keeps in flight")
    parser.add_argument("--goal-p99-ratio", type=float, default=5.0, help="verdict: p99 under all attacks / baseline at most this")
    parser.add_argument("--out", default="hostile")
    args = parser.parse_args()

    m = machine()
    phases = [("baseline", []), ("desync", ["desync"]), ("big-v1", ["big-v1"]), ("slow", ["slow"]),
              ("all", ["desync", "big-v1", "slow"])]
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        work = Path(tmp)
        write_sklearn_model(work / "store" / "m1", "logreg", 0)
        write_sklearn_model(work / "store" / "m2", "tree", 1)
        write_slow_model(work / "store" / "slow", delay=30.0)
        models = [{"name": "m1", "uri": str(work / "store" / "m1"), "version": "1"},
                  {"name": "m2", "uri": str(work / "store" / "m2")},
                  {"name": "slow", "uri": str(work / "store" / "slow"), "runtime": "mlserver",
                   "implementation": SLOW_IMPLEMENTATION}]
        with Agent(work, models, *AGENT_FLAGS) as agent, multiprocessing.Manager() as manager:
            agent.wait_ready()
            agent.wait_models(lambda ms: all(ms.get(n, {}).get("state") == "loaded" for n in ("m1", "m2", "slow")),
                              timeout=120, what="models loaded")
            results = []
            for name, attacks in phases:
                r = run_phase(name, agent.port, attacks, args, manager)
                print(json.dumps({k: v for k, v in r.items() if k != "error_samples"}), flush=True)
                results.append(r)
            after = run_phase("after", agent.port, [], args, manager)  # the pool is healthy after
            results.append(after)
    m["loadavg_at_end"] = loadavg()
    base = results[0]
    for r in results:
        r["p50_ratio"] = round(r["p50_ms"] / base["p50_ms"], 2) if r["p50_ms"] and base["p50_ms"] else None
        r["p99_ratio"] = round(r["p99_ms"] / base["p99_ms"], 2) if r["p99_ms"] and base["p99_ms"] else None
    wrong = sum(r["wrong"] for r in results)
    errors = sum(r["errors"] for r in results)
    all_ratio = next(r["p99_ratio"] for r in results if r["phase"] == "all")
    ok = wrong == 0 and errors == 0 and all_ratio is not None and all_ratio <= args.goal_p99_ratio
    verdict = (f"{'PASS' if ok else 'FAIL'}: {wrong} wrong answers and {errors} errors for legitimate clients in all "
               f"phases; their p99 under all attacks is {all_ratio}x the baseline (goal <= {args.goal_p99_ratio:g}x)")

    rows = [(r["phase"], ", ".join(r["attacks"]) or "-", r["requests"], r["p50_ms"], r["p99_ms"], r["p50_ratio"],
             r["p99_ratio"], r["errors"], r["wrong"], ", ".join(f"{k}: {v}" for k, v in r["attacker_got"].items()) or "-")
            for r in results]
    md = "\n".join([
        "# Hostile traffic beside legitimate clients",
        "",
        f"**Verdict:** {verdict}",
        "",
        f"Command: `{command_line()}`",
        f"Agent flags: `{' '.join(AGENT_FLAGS)}`; {args.clients} legitimate clients (keep-alive, V2 infer to m1/m2 in "
        f"turn, each answer checked for its model and request id); {args.duration:g} s per phase; slow attacker keeps "
        f"{args.slow_clients} requests in flight.",
        "",
        md_table(["phase", "attacks", "legit requests", "p50 ms", "p99 ms", "p50 x", "p99 x", "errors", "wrong",
                  "attacker got (status: count)"], rows),
        "",
        "`after` is one more quiet phase once the attacks stopped: the pool is healthy (no wrong answers, "
        "no errors); its latency follows the machine's load at that time (see the load average below).",
        "",
        "## Machine",
        machine_md(m),
        "",
        "Attackers and legitimate clients share the machine's cores with the agent and the server; on a shared "
        "machine the load average above says how quiet it was.",
    ])
    write_results(args.out, md, {"machine": m, "args": vars(args), "agent_flags": AGENT_FLAGS, "results": results,
                                 "verdict": verdict, "command": command_line()})
    print(verdict)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
