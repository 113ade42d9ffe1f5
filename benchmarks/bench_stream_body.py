"""Large request bodies through the agent: streamed (forwarded as they arrive) vs buffered whole.

    .venv/bin/python benchmarks/bench_stream_body.py                  # 3 x 256 MiB per mode (~1 min)
    .venv/bin/python benchmarks/bench_stream_body.py --mib 64 --requests 5

One agent per mode with an embedded Triton (needs .venv-triton) serving `sum`, a python-backend
model whose answer is one number (OUTPUT0 = [sum(INPUT0)]), so the answer costs the agent
nothing and its memory shows what the request body costs. Each request is a V2 infer with the
binary tensor extension (a JSON header + --mib MiB of FP32), as tritonclient sends it, with a
Content-Length. Modes:
  streamed  --stream-body-bytes 1Mi (the default): the body is forwarded as it arrives
  buffered  --stream-body-bytes above the body: the body is read whole, then forwarded
Both with --max-body-bytes 2Gi. Reported: the agent process's RSS before the first request and
its peak while the requests ran (sampled every 5 ms; the agent alone, not Triton), and the
median request time. Every answer is checked (the sum).

Results: benchmarks/results/stream_body.md and stream_body.json.
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import MI, Agent, command_line, loadavg, machine, machine_md, md_table, write_results  # noqa: E402

SUM_MODEL = '''# OUTPUT0 = [sum(INPUT0)]; numpy from the Triton venv the agent names (the stub runs system Python)
import os, sys
sys.path[:0] = [p for p in [os.environ.get("MODELSHELF_TRITON_SITE_PACKAGES")] if p and p not in sys.path]
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", np.array(
            [pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy().astype(np.float64).sum()], dtype=np.float32))])
            for r in requests]
'''


def write_sum_model(dest: Path) -> None:
    from agent.demo import TRITON_PYTHON_CONFIG

    (dest / "1").mkdir(parents=True, exist_ok=True)
    (dest / "config.pbtxt").write_text(TRITON_PYTHON_CONFIG.format(name="sum"))
    (dest / "1" / "model.py").write_text(SUM_MODEL)


def binary_request(values: np.ndarray) -> tuple[bytes, int]:
    header = json.dumps({"inputs": [{"name": "INPUT0", "shape": [int(values.size)], "datatype": "FP32",
                                     "parameters": {"binary_data_size": int(values.nbytes)}}],
                         "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": False}}]}).encode()
    return header + values.tobytes(), len(header)


class PeakRSS:
    """The peak RSS of one process, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.005):
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_mode(name: str, stream_bytes: str, body: bytes, header_len: int, want: float, requests: int, work: Path) -> dict:
    store = work / "store"
    if not (store / "sum").exists():
        write_sum_model(store / "sum")
    with Agent(work / name, [{"name": "sum", "uri": str(store / "sum"), "runtime": "triton"}], "--server", "triton",
               "--max-body-bytes", "2Gi", "--stream-body-bytes", stream_bytes, "--request-timeout", "300") as agent:
        agent.wait_ready()
        agent.wait_models(lambda m: m.get("sum", {}).get("state") == "loaded", what="sum loaded")
        before = psutil.Process(agent.proc.pid).memory_info().rss
        times = []
        with PeakRSS(agent.proc.pid) as peak:
            for _ in range(requests):
                conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=300)
                started = time.perf_counter()
                conn.request("POST", "/v2/models/sum/infer", body, {
                    "content-type": "application/octet-stream", "inference-header-content-length": str(header_len)})
                r = conn.getresponse()
                answer = r.read()
                times.append(time.perf_counter() - started)
                conn.close()
                if r.status != 200:
                    raise RuntimeError(f"{name}: {r.status} {answer[:300]!r}")
                got = json.loads(answer)["outputs"][0]["data"][0]
                if abs(got - want) > abs(want) * 1e-3 + 1:
                    raise RuntimeError(f"{name}: wrong sum {got} (want {want})")
        return {"mode": name, "stream_body_bytes": stream_bytes, "rss_before_mib": round(before / MI, 1),
                "rss_peak_mib": round(peak.peak / MI, 1), "rss_growth_mib": round((peak.peak - before) / MI, 1),
                "p50_s": round(statistics.median(times), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="tensor bytes per request (MiB)")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--out", default="stream_body")
    args = parser.parse_args()
    values = (np.arange(args.mib * MI // 4, dtype=np.float32) % 7).astype(np.float32)
    body, header_len = binary_request(values)
    want = float(values.astype(np.float64).sum())
    load_start = loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-stream-body-") as tmp:
        rows = [run_mode("streamed", "1Mi", body, header_len, want, args.requests, Path(tmp)),
                run_mode("buffered", f"{args.mib + 1}Mi", body, header_len, want, args.requests, Path(tmp))]
    data = {"machine": machine(), "command": command_line(), "loadavg_start": load_start, "loadavg_end": loadavg(),
            "body_mib": round(len(body) / MI, 1), "requests": args.requests, "results": rows}
    md = (f"# Large request bodies: streamed vs buffered\n\n{machine_md(data['machine'])}\n\n"
          f"Command: `{data['command']}`  \nLoad average start/end: {load_start} / {data['loadavg_end']}  \n"
          f"{args.requests} requests of {data['body_mib']} MiB each (V2 binary tensor, Triton `sum` model)\n\n"
          + md_table(["mode", "--stream-body-bytes", "agent RSS before (MiB)", "agent RSS peak (MiB)",
                      "growth (MiB)", "p50 (s)"],
                     [[r["mode"], r["stream_body_bytes"], r["rss_before_mib"], r["rss_peak_mib"], r["rss_growth_mib"],
                       r["p50_s"]] for r in rows]) + "\n")
    write_results(args.out, md, data)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
