"""Helpers shared by the benchmark scripts (not by the tests): the machine's description, a
modelshelf agent as a subprocess, process-tree RSS/CPU, and result files (Markdown + JSON).

Benchmarks are standalone scripts, never timed pass/fail tests. Every result file states the
machine, the load average when the run started and ended (other work on a shared machine
disturbs the figures), and the exact command that produced it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.memory import process_tree, tree_rss  # noqa: E402  (the agent's own accounting)

MI = 2**20
PACKAGES = ("mlserver", "mlserver-sklearn", "uvicorn", "httptools", "h11", "uvloop", "aiohttp", "fastapi", "scikit-learn", "psutil")


# ---------------------------------------------------------------------------------- flags
class Flag(NamedTuple):
    """A flag of `arg_parser` that needs more than its default: a help text, or its type
    (which a None default cannot tell)."""

    default: Any
    help: str | None = None
    type: Callable[[str], Any] | None = None


def arg_parser(doc: str | None, **flags: Any) -> argparse.ArgumentParser:
    """A benchmark's command line, described by the first line of `doc`, with one `--flag` per
    keyword, in order: `zipf_s=1.1` is `--zipf-s`, a float that defaults to 1.1. The default's
    type is the flag's (a Path default: Path); False makes a switch (store_true), a list a flag
    that may repeat (append); `Flag(default, help, type)` adds a help text or a type."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    for name, value in flags.items():
        flag = value if isinstance(value, Flag) else Flag(value)
        options: dict[str, Any] = {"default": flag.default, "help": flag.help}
        if flag.default is False and flag.type is None:
            options["action"] = "store_true"
        elif isinstance(flag.default, list):
            options["action"] = "append"
        else:
            kind = flag.type or (Path if isinstance(flag.default, Path) else type(flag.default))
            if kind is not str:
                options["type"] = kind
        p.add_argument("--" + name.replace("_", "-"), **options)
    return p


# ---------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _tool_version(argv: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else None


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def machine(tools: Iterable[Sequence[str]] = ()) -> dict[str, Any]:
    """What the numbers were measured on: CPUs usable by this process, RAM, versions."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    for argv in tools:
        versions[Path(argv[0]).name] = _tool_version(argv)
    return {
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "ram_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": loadavg(),
        "versions": versions,
    }


def machine_md(m: dict[str, Any]) -> str:
    """Markdown lines describing the machine and the load during the run."""
    vers = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines = [
        f"- Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['ram_bytes'] / 2**30:.1f} GiB RAM, "
        f"Python {m['python']}, {m['platform']}",
        f"- Load average (1/5/15 min) at start: {m['loadavg_at_start']}"
        + (f", at end: {m['loadavg_at_end']}" if m.get("loadavg_at_end") else ""),
        f"- Versions: {vers or 'n/a'}",
    ]
    return "\n".join(lines)


def command_line() -> str:
    """The command that ran this script, relative to the repository root where possible."""
    argv = list(sys.argv)
    try:
        argv[0] = str(Path(argv[0]).resolve().relative_to(ROOT))
    except ValueError:
        pass
    return ".venv/bin/python " + " ".join(shlex.quote(a) for a in argv)


# ---------------------------------------------------------------------------------- results
def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def write_results(name: str, markdown: str, data: dict[str, Any], out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """benchmarks/results/<name>.md and <name>.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md.write_text(markdown.rstrip() + "\n")
    # paths of this checkout would tie the results to one machine: keep them repo-relative
    text = json.dumps(data, indent=1, default=str).replace(str(ROOT) + "/", "")
    js.write_text(text + "\n")
    return md, js


# ---------------------------------------------------------------------------------- processes
def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """A run's flags for its results file, without the scratch directory (a machine path)."""
    return {k: v for k, v in vars(args).items() if k != "workdir"}


def publish(out: str | None, markdown: str, data: dict[str, Any]) -> None:
    """Print the report; with `out`, write benchmarks/results/<out>.md and .json too."""
    print(markdown)
    if out:
        print("wrote", *[str(x) for x in write_results(out, markdown, data)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30) -> tuple[int, bytes]:
    """One HTTP call: (status, body); never raises on an HTTP error status."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_http(url: str, timeout: float = 60, what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, _ = http("GET", url, timeout=2)
            if status == 200:
                return
            last = status
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"{what}: {url} did not answer 200 within {timeout}s (last: {last})")


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by the given processes (not their children)."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


class Agent:
    """`modelshelf run` as a subprocess on a free loopback port, with an embedded MLServer.

    `models` is written as <workdir>/config/models.json; the cache is <workdir>/cache (reuse the
    workdir to reuse the cache). `entry` is the command that takes `run ...` arguments (default:
    this interpreter with `-m agent.cli`; a launcher script lets an experiment patch the agent
    in its own process without touching the source)."""

    def __init__(self, workdir: Path, models: list[dict[str, Any]], *args: str, entry: Sequence[str] | None = None,
                 env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        config = self.workdir / "config"
        config.mkdir(parents=True, exist_ok=True)
        (config / "models.json").write_text(json.dumps({"models": models}))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = free_port()  # not the default 8001: two benchmarks' agents would share it
        self.log_path = self.workdir / f"agent-{self.port}.log"
        self._log = open(self.log_path, "ab")
        cmd = [*(entry or [sys.executable, "-m", "agent.cli"]), "run", "--config-dir", str(config),
               "--cache-dir", str(self.workdir / "cache"), "--port", str(self.port), "--grpc-port", str(self.grpc_port), "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "MODELSHELF_MANAGEMENT_PORT": str(self.port), **(env or {})},
                                     start_new_session=True)  # one port: /status and /metrics beside the data plane

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 120) -> "Agent":
        try:
            wait_http(self.url + "/readyz", timeout, "agent")
        except TimeoutError:
            raise TimeoutError(f"agent not ready; log tail:\n{self.log_path.read_text(errors='replace')[-3000:]}") from None
        return self

    def get_json(self, path: str) -> Any:
        status, body = http("GET", self.url + path)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}: {body[:300]!r}")
        return json.loads(body)

    def status(self) -> dict[str, Any]:
        return self.get_json("/status")

    def metrics(self) -> dict[str, float]:
        """Prometheus text as {'name{labels}': value} (samples only)."""
        _, body = http("GET", self.url + "/metrics")
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    pass
        return out

    def wait_models(self, predicate, timeout: float = 300, what: str = "models") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status["models"]):
                return status
            time.sleep(0.2)
        raise TimeoutError(f"agent: timed out waiting for {what}")

    @property
    def server_pid(self) -> int:
        return int(self.status()["server"]["pid"])

    @property
    def server_pids(self) -> tuple[int, ...]:
        """Every server process's pid (several with --server-processes N)."""
        server = self.status()["server"]
        return tuple(server.get("pids") or [server["pid"]])

    @property
    def server_url(self) -> str:
        return str(self.status()["server"]["url"]).rstrip("/")

    def stop(self) -> None:
        stop_group(self.proc)
        self._log.close()


def write_sklearn_model(dest: Path, kind: str = "logreg", seed: int = 0) -> None:
    """A small 4-feature iris-like classifier (agent.demo.write_model)."""
    from agent.demo import write_model

    write_model(dest, kind, seed)


V2_BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()
"""A small V2 infer request for the sklearn models above (one row, 4 features)."""


class StandaloneMLServer:
    """One MLServer process (no agent) serving the sklearn models in `models` (name -> dir),
    loaded at startup, on free loopback ports, with a temp cwd for its .envs/.metrics. Same
    settings as the agent's embedded server (parallel_workers 0)."""

    def __init__(self, workdir: Path, models: dict[str, Path]):
        self.workdir = Path(workdir)
        repo = self.workdir / "repository"
        repo.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (repo / "settings.json").write_text(json.dumps({
            "host": "127.0.0.1", "http_port": self.port, "grpc_port": free_port(), "metrics_port": free_port(),
            "parallel_workers": 0, "load_models_at_startup": True,
        }))
        for name, path in models.items():
            (repo / name).mkdir(exist_ok=True)
            (repo / name / "model-settings.json").write_text(json.dumps({
                "name": name, "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": str(Path(path) / "model.joblib")},
            }))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVER_")}
        self._log = open(self.workdir / "mlserver.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from mlserver.cli import main; sys.exit(main())", "start", str(repo)],
            cwd=self.workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> "StandaloneMLServer":
        wait_http(self.url + "/v2/health/ready", timeout, "mlserver")
        return self

    def stop(self) -> None:
        stop_group(self.proc)
        self._log.close()
