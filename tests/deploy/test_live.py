"""Run the agent (and, for the sidecar topology, MLServer) the way the manifests run them, on
loopback, and check what Kubernetes and Prometheus will ask of the pod.

The manifests' own arguments and environment are used, with only what a pod has and a test
machine has not rebased: paths (to tmp_path), ports (to free ones) and the listen address
(127.0.0.1 instead of 0.0.0.0). Probe paths come from the manifest's probes, the scraped
metrics from the dashboard, so a renamed endpoint or metric fails here, not in a cluster.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from agent.runtimes.triton import find_triton
from tests.deploy.manifests import K8S, find, flag_value, literal_env, pods
from tests.support.agentproc import AgentProcess
from tests.support.configmap import ConfigMapDir
from tests.support.models import triton_v2_request, v2_request, write_sklearn_model, write_triton_model
from tests.support.net import free_port, wait_http
from tests.support.servers import triton_available, triton_site_packages

pytestmark = pytest.mark.timeout(90)

# flags whose values only make sense inside the pod; AgentProcess sets its own or the test does
_REBASED = ("--host", "--port", "--config-dir", "--cache-dir", "--server-url", "--server-repository",
            "--management-host", "--management-port")


def _agent_container(deployment: str) -> tuple[dict, dict]:
    doc = find("Deployment", deployment)
    pod = next(p for p in pods() if p.doc is doc)
    return pod, next(c for c in pod.spec["containers"] if c["name"] == "agent")


def _portable_args(args: list[str]) -> list[str]:
    """The manifest's args without the pod-only ones; a management listener of its own (a free
    port) when the manifest asks for one, as every agent manifest does."""
    assert args[0] == "run"
    out = [f"--management-port={free_port()}"] if flag_value(args, "--management-port") else []
    for a in args[1:]:
        if not any(a == f or a.startswith(f + "=") for f in _REBASED):
            assert a.startswith("--") and "=" in a, f"manifest args use --flag=value: {a}"
            out.append(a)
    return out


def _model_config(tmp_path: Path) -> Path:
    model = write_sklearn_model(tmp_path / "store" / "iris")
    cm = ConfigMapDir(tmp_path / "config")
    cm.write({"models.yaml": f"models:\n  - name: iris\n    uri: {model}\n    runtime: sklearn\n    memory: 64Mi\n"})
    return cm.root


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _check_pod_contract(agent: AgentProcess, container: dict) -> None:
    # the probes the manifest declares answer 200 once the agent is up and has applied its config
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        wait_http(agent.url + container[probe]["httpGet"]["path"], timeout=60)
    agent.wait_state("iris", "loaded", timeout=60)  # ready means config applied, not every model loaded
    code, body = _get(agent.url + "/v2/models/iris/ready")
    assert code == 200, body
    code, body = agent.post("/v2/models/iris/infer", v2_request([[5.1, 3.5, 1.4, 0.2]]))
    assert code == 200, body
    # management is off the public port: Prometheus scrapes the management port, clients see 404
    assert agent.management_url != agent.url, "the manifests put management on a port of its own"
    for path in ("/metrics", "/status", "/docs", "/openapi.json"):
        assert _get(agent.url + path)[0] == 404, f"{path} is served on the public port"
    code, body = _get(agent.url + "/")  # KServe V1 liveness, not the status page
    assert code == 200 and json.loads(body) == {"status": "alive"}, body
    # every metric the dashboard queries is exposed (as a family, even before its first sample)
    code, text = _get(agent.management_url + "/metrics")
    assert code == 200
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    dashboard = json.loads((K8S / "monitoring" / "grafana-dashboard.json").read_text())
    used = {m for p in dashboard["panels"] for t in p["targets"] for m in re.findall(r"\bmodelshelf_[a-z0-9_]+", t["expr"])}
    for series in used:
        family = re.sub(r"_(total|bucket|sum|count)$", "", series)
        assert family in families or series in families, f"/metrics has no {series}"
    # MODELSHELF_LOG_FORMAT=json from the manifest took effect: log lines are JSON objects
    if literal_env(container).get("MODELSHELF_LOG_FORMAT") == "json":
        lines = [line for line in agent.log().splitlines() if line.startswith("{")]
        assert lines and all(isinstance(json.loads(line), dict) for line in lines[:20]), agent.log()[-2000:]


def test_embedded_topology_runs_as_declared(tmp_path):
    pod, container = _agent_container("modelshelf-embedded")
    env = {**literal_env(container), "POD_NAME": pod.pod_names()[0]}
    agent = AgentProcess(_model_config(tmp_path), tmp_path / "cache", tmp_path / "agent.log",
                         *_portable_args(container["args"]), env=env)
    try:
        _check_pod_contract(agent, container)
    finally:
        agent.stop()


def _start_mlserver_like_the_manifest(pod, tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:
    server = next(c for c in pod.spec["containers"] if c["name"] == "mlserver")
    cmd = [str(x) for x in server["command"]]
    assert cmd[:2] == ["mlserver", "start"]
    repository = tmp_path / "repository"
    repository.mkdir()
    env = dict(os.environ)
    env.update(literal_env(server))
    ports = {k: str(free_port()) for k in ("MLSERVER_HTTP_PORT", "MLSERVER_GRPC_PORT", "MLSERVER_METRICS_PORT")}
    assert set(ports) <= set(env), "the manifest pins MLServer's ports"
    env.update(ports)
    for k in ("HOME", "NUMBA_CACHE_DIR", "HF_HOME"):
        env[k] = str(tmp_path / "mlserver-home" / k.lower())
    workdir = tmp_path / "mlserver-work"
    workdir.mkdir()
    mlserver = Path(sys.executable).parent / "mlserver"
    proc = subprocess.Popen([str(mlserver), "start", str(repository)], cwd=workdir, env=env,
                            stdout=open(tmp_path / "mlserver.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, int(ports["MLSERVER_HTTP_PORT"]), repository


def test_mlserver_sidecar_topology_runs_as_declared(tmp_path):
    pod, container = _agent_container("modelshelf-mlserver")
    args = container["args"]
    server, port, repository = _start_mlserver_like_the_manifest(pod, tmp_path)
    agent = None
    try:
        assert flag_value(args, "--server-url") == "http://127.0.0.1:8080"
        env = {**literal_env(container), "POD_NAME": pod.pod_names()[0]}
        agent = AgentProcess(_model_config(tmp_path), tmp_path / "cache", tmp_path / "agent.log",
                             *_portable_args(args), f"--server-url=http://127.0.0.1:{port}",
                             f"--server-repository={repository}", env=env)
        _check_pod_contract(agent, container)
        # MLSERVER_LOAD_MODELS_AT_STARTUP=false and the shared repository dir: the agent, not
        # MLServer, put iris there
        assert any(repository.iterdir())
    finally:
        if agent is not None:
            agent.stop()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(5)


@pytest.mark.triton
def test_triton_sidecar_topology_runs_as_declared(tmp_path):
    """Triton started with the manifest's own flags (explicit model control, loopback, strict
    readiness off), the agent with the manifest's args: a model appears only when the config
    names it, and answers through the agent."""
    why = triton_available()
    if why:
        pytest.skip(why)
    install = find_triton()
    pod, container = _agent_container("modelshelf-triton")
    server = next(c for c in pod.spec["containers"] if c["name"] == "triton")
    argv = [str(x) for x in server["command"] + server["args"]]
    assert argv[0] == "tritonserver"
    repository = tmp_path / "repository"
    repository.mkdir()
    ports = {flag: str(free_port()) for flag in ("--http-port", "--grpc-port", "--metrics-port")}
    rebased = [str(install.binary), f"--backend-directory={install.backends}"]  # the NGC image has it built in
    for a in argv[1:]:
        flag = a.split("=", 1)[0]
        if flag == "--model-repository":
            a = f"--model-repository={repository}"
        elif flag in ports:
            a = f"{flag}={ports[flag]}"
        rebased.append(a)
    proc = subprocess.Popen(rebased, cwd=tmp_path, stdout=open(tmp_path / "triton.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    agent = None
    try:
        model = write_triton_model(tmp_path / "store" / "double", name="double", site_packages=triton_site_packages())
        cm = ConfigMapDir(tmp_path / "config")
        cm.write({"models.yaml": f"models:\n  - name: double\n    uri: {model}\n    runtime: triton\n"})
        args = [a for a in _portable_args(container["args"]) if not a.startswith("--storage-config-dir=")]
        agent = AgentProcess(cm.root, tmp_path / "cache", tmp_path / "agent.log", *args,
                             f"--server-url=http://127.0.0.1:{ports['--http-port']}", f"--server-repository={repository}",
                             env={**literal_env(container), "POD_NAME": pod.pod_names()[0]})
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            wait_http(agent.url + container[probe]["httpGet"]["path"], timeout=60)
        agent.wait_state("double", "loaded", timeout=60)
        code, body = agent.post("/v2/models/double/infer", triton_v2_request([1.0, 2.5]))
        assert code == 200, body
        assert body["outputs"][0]["data"] == [2.0, 5.0]
    finally:
        if agent is not None:
            agent.stop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
