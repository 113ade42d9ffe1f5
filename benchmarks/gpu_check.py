"""GPU memory check, ready to run wherever an NVIDIA GPU and its driver are present (issue 10, item 5).

Downloads nothing: the model server is benchmarks/gpu_server.py (CUDA driver API through ctypes
on libcuda), NVML comes from nvidia-ml-py (already a dependency). Three checks:

1. per_process: one server loads models of known sizes; NVML's per-process used memory of the
   server's pid grows by each model's bytes (the first load also pays the CUDA context).
2. two_servers: two servers on the same GPU, each loading different amounts; NVML per process
   tells them apart (each agent would measure only its own server).
3. agent_budget: the agent drives a server as a sidecar (--server-url, --server-repository,
   --server-pid-file) with --gpu-memory BUDGET; models of 256 MiB, some declared right, some
   declared too low, some undeclared, requested round-robin so that they cannot all fit. After
   every request, NVML's figure for the server's pid is sampled: verdict "met" when the models'
   device memory (server minus its CUDA context) never exceeds budget + 5%, and each model's
   measured GPU cost in /status is within 10% of its real size.

    .venv/bin/python benchmarks/gpu_check.py [--device 0] [--budget-mib 1024] [--quick]

Results: benchmarks/results/gpu_check.{json,md}. Without a GPU it says why and exits 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MiB = 2**20
SERVER = ROOT / "benchmarks" / "gpu_server.py"


def nvml_device(index: int = 0) -> tuple[Any, Any] | str:
    """(pynvml, handle) for device ``index``, or the reason there is none (a string)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() <= index:
            return f"NVML sees {pynvml.nvmlDeviceGetCount()} device(s); none with index {index}"
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception as e:  # no library, no driver, no device
        return f"no NVML device: {type(e).__name__}: {e}"


def process_bytes(nvml: Any, handle: Any, pid: int) -> int:
    """Device bytes NVML attributes to ``pid`` (0 when it is not listed)."""
    return sum(int(p.usedGpuMemory or 0) for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == pid)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_gpu_model(directory: Path, nbytes: int) -> Path:
    """A model for gpu_server: a directory holding gpu.json ({"bytes": N})."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "gpu.json").write_text(json.dumps({"bytes": int(nbytes)}))
    return directory


def http(method: str, url: str, doc: Any = None, timeout: float = 60) -> tuple[int, Any]:
    data = None if doc is None else json.dumps(doc).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class GpuServer:
    """benchmarks/gpu_server.py as a child process on a free loopback port."""

    def __init__(self, base: Path, backend: str = "cuda", device: int = 0):
        self.repository = base / "repository"
        self.pid_file = base / "server.pid"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base.mkdir(parents=True, exist_ok=True)
        self.log = open(base / "server.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(SERVER), "--repository", str(self.repository), "--port", str(self.port),
                                      "--pid-file", str(self.pid_file), "--backend", backend, "--device", str(device)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gpu_server exited {self.proc.returncode}: {(base / 'server.log').read_text()}")
            try:
                if http("GET", self.url + "/v2/health/ready", timeout=2)[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("gpu_server did not become ready in 30 s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def load_direct(self, name: str, model_dir: Path) -> int:
        """Load without the agent: write the MLServer-style entry, POST load."""
        entry = self.repository / name
        entry.mkdir(parents=True, exist_ok=True)
        (entry / "model-settings.json").write_text(json.dumps({"name": name, "parameters": {"uri": str(model_dir)}}))
        return http("POST", f"{self.url}/v2/repository/models/{name}/load", {})[0]

    def unload_direct(self, name: str) -> int:
        return http("POST", f"{self.url}/v2/repository/models/{name}/unload", {})[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@contextlib.contextmanager
def gpu_server(base: Path, backend: str = "cuda", device: int = 0) -> Iterator[GpuServer]:
    srv = GpuServer(base, backend, device)
    try:
        yield srv
    finally:
        srv.stop()


def _settle(nvml: Any, handle: Any, pid: int) -> int:
    time.sleep(0.2)  # NVML's per-process figure follows an allocation within a few ms
    return process_bytes(nvml, handle, pid)


def check_per_process(base: Path, nvml: Any, handle: Any, device: int, sizes_mib: list[int]) -> dict:
    rows = []
    with gpu_server(base, device=device) as srv:
        before = _settle(nvml, handle, srv.pid)
        for i, size in enumerate(sizes_mib):
            code = srv.load_direct(f"m{i}", write_gpu_model(base / "models" / f"m{i}", size * MiB))
            after = _settle(nvml, handle, srv.pid)
            rows.append({"model": f"m{i}", "bytes": size * MiB, "load_code": code, "nvml_delta": after - before,
                         "first": i == 0})
            before = after
        freed_before = before
        srv.unload_direct("m0")
        freed = freed_before - _settle(nvml, handle, srv.pid)
    later = [r for r in rows if not r["first"]]
    ok = all(abs(r["nvml_delta"] - r["bytes"]) <= 0.1 * r["bytes"] + 2 * MiB for r in later) and \
        abs(freed - sizes_mib[0] * MiB) <= 0.1 * sizes_mib[0] * MiB + 2 * MiB
    context = rows[0]["nvml_delta"] - rows[0]["bytes"] if rows else None
    return {"rows": rows, "context_bytes": context, "freed_on_unload": freed, "verdict": "met" if ok else "missed"}


def check_two_servers(base: Path, nvml: Any, handle: Any, device: int, a_mib: int, b_mib: int) -> dict:
    with gpu_server(base / "a", device=device) as a, gpu_server(base / "b", device=device) as b:
        a0, b0 = _settle(nvml, handle, a.pid), _settle(nvml, handle, b.pid)
        a.load_direct("x", write_gpu_model(base / "models" / "x", a_mib * MiB))
        b.load_direct("y", write_gpu_model(base / "models" / "y", b_mib * MiB))
        a1, b1 = _settle(nvml, handle, a.pid), _settle(nvml, handle, b.pid)
    da, db = a1 - a0, b1 - b0
    ok = abs(da - a_mib * MiB) <= 0.1 * a_mib * MiB + 2 * MiB and abs(db - b_mib * MiB) <= 0.1 * b_mib * MiB + 2 * MiB
    return {"a_pid_delta": da, "b_pid_delta": db, "a_bytes": a_mib * MiB, "b_bytes": b_mib * MiB,
            "verdict": "met" if ok else "missed"}


def check_agent_budget(base: Path, nvml: Any, handle: Any, device: int, budget_mib: int, model_mib: int,
                       n_models: int, requests: int) -> dict:
    from tests.support.agentproc import AgentProcess
    from tests.support.configmap import ConfigMapDir

    models = []
    for i in range(n_models):
        d = write_gpu_model(base / "store" / f"g{i}", model_mib * MiB)
        spec: dict[str, Any] = {"name": f"g{i}", "uri": str(d), "runtime": "sklearn", "preload": False}
        if i % 3 == 0:
            spec["gpuMemory"] = f"{model_mib}Mi"  # declared right
        elif i % 3 == 1:
            spec["gpuMemory"] = f"{model_mib // 4}Mi"  # declared too low
        models.append(spec)  # i % 3 == 2: undeclared
    samples = []
    with gpu_server(base / "server", device=device) as srv:
        context = _settle(nvml, handle, srv.pid)  # the CUDA context, before any model
        cm = ConfigMapDir(base / "config")
        cm.write({"models.yaml": json.dumps({"models": models})})
        agent = AgentProcess(cm.root, base / "cache", base / "agent.log", "--server-url", srv.url,
                             "--server-repository", str(srv.repository), "--server-pid-file", str(srv.pid_file),
                             "--gpu-memory", f"{budget_mib}Mi", "--host-memory", "4Gi", "--min-residency", "0")
        try:
            agent.wait_ready()
            codes: dict[int, int] = {}
            for r in range(requests):
                name = f"g{r % n_models}"
                code, _ = agent.post(f"/v2/models/{name}/infer", {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]})
                codes[code] = codes.get(code, 0) + 1
                time.sleep(0.05)
                samples.append(process_bytes(nvml, handle, srv.pid) - context)
            status = agent.status()
        finally:
            agent.stop()
    gpu_dev = f"gpu:{device}"
    measured = {n: (m.get("measured") or {}).get("gpu") for n, m in (status.get("ledger") or {}).get("models", {}).items()}
    within = [abs(v - model_mib * MiB) <= 0.1 * model_mib * MiB for v in measured.values() if v]
    limit = budget_mib * MiB * 1.05
    return {
        "budget": budget_mib * MiB, "context_bytes": context, "model_bytes": model_mib * MiB, "models": n_models,
        "requests": requests, "codes": codes, "max_models_bytes": max(samples or [0]),
        "samples_over_budget_5pct": sum(1 for s in samples if s > limit), "samples": samples,
        "measured_gpu": measured, "reality": (status.get("reality") or {}).get("devices", {}).get(gpu_dev),
        "verdict_budget": "met" if samples and max(samples) <= limit else "missed",
        "verdict_measured": "met" if within and all(within) else "missed",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="GPU memory check (needs an NVIDIA GPU; downloads nothing)")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--budget-mib", type=int, default=1024)
    p.add_argument("--quick", action="store_true", help="fewer models and requests")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    found = nvml_device(args.device)
    if isinstance(found, str):
        print(f"gpu_check: no GPU was available: {found}", file=sys.stderr)
        return 2
    nvml, handle = found
    results: dict[str, Any] = {"device": nvml.nvmlDeviceGetName(handle), "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        results["per_process"] = check_per_process(base / "pp", nvml, handle, args.device, [64, 128, 256])
        results["two_servers"] = check_two_servers(base / "two", nvml, handle, args.device, 96, 192)
        results["agent_budget"] = check_agent_budget(base / "agent", nvml, handle, args.device, args.budget_mib, 256,
                                                     6 if args.quick else 9, 18 if args.quick else 45)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    ab = results["agent_budget"]
    md = [f"# GPU check on {results['device']}", "", f"command: `{results['command']}`", "",
          f"- per-process accounting: {results['per_process']['verdict']} (CUDA context {results['per_process']['context_bytes']} B)",
          f"- two servers told apart: {results['two_servers']['verdict']}",
          f"- device memory under budget +5% (agent, {ab['requests']} requests): {ab['verdict_budget']} "
          f"(max {ab['max_models_bytes'] / MiB:.0f} MiB of {ab['budget'] / MiB:.0f} MiB; {ab['samples_over_budget_5pct']} samples over)",
          f"- each model's GPU cost measured within 10%: {ab['verdict_measured']}"]
    (args.out / "gpu_check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
