"""Shared by the gRPC tests: an agent process with a given model list, a tritonclient.grpc
client on its gRPC port, and KServe's own gRPC client (its SDK lives in .venv-kserve: its
dependencies do not fit the project's venv)."""
from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import tritonclient.grpc as tg

from tests.support.agentproc import AgentProcess
from tests.support.configmap import ConfigMapDir


@contextlib.contextmanager
def running_agent(root: Path, models: list[dict], *args: str, loaded: tuple[str, ...] = ()) -> Iterator[AgentProcess]:
    """`modelshelf run` on `models` (a ConfigMap dir under `root`), ready, with `loaded` loaded."""
    cm = ConfigMapDir(root / "config")
    cm.write({"models.yaml": json.dumps({"models": models})})
    proc = AgentProcess(cm.root, root / "cache", root / "agent.log", *args).wait_ready()
    try:
        for name in loaded:
            proc.wait_state(name, "loaded", timeout=60)
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(agent: AgentProcess) -> Iterator[tg.InferenceServerClient]:
    """tritonclient.grpc on the module's agent (its `agent` fixture)."""
    c = tg.InferenceServerClient(agent.grpc_target)
    yield c
    c.close()


KSERVE_PYTHON = Path(__file__).resolve().parents[2] / ".venv-kserve" / "bin" / "python"
kserve_sdk = pytest.mark.skipif(not KSERVE_PYTHON.exists(), reason="KServe SDK venv absent (~450 MB): "
                                "python3 -m venv .venv-kserve && .venv-kserve/bin/pip install kserve==0.21.0")
_KSERVE_CLIENT = """
import asyncio, json, sys
from kserve import InferenceGRPCClient, InferInput, InferRequest

async def main(target, model, tensor):
    c = InferenceGRPCClient(target, retries=0)
    out = {"live": await c.is_server_live(), "ready": await c.is_server_ready(), "model_ready": await c.is_model_ready(model)}
    tensor = InferInput(**json.loads(tensor))
    r = await c.infer(InferRequest(model_name=model, infer_inputs=[tensor]))
    out["infer"] = {"model_name": r.model_name, "outputs": {o.name: o.as_numpy().ravel().tolist() for o in r.outputs}}
    try:
        await c.infer(InferRequest(model_name="nope", infer_inputs=[tensor]))
    except Exception as e:
        out["unknown"] = str(e)
    await c.close()
    print(json.dumps(out))

asyncio.run(main(*sys.argv[1:]))
"""


def kserve_client(agent: AgentProcess, model: str, tensor: dict) -> dict:
    """KServe's InferenceGRPCClient against the agent: liveness, readiness, one infer of `model`
    with `tensor` (InferInput's fields), one infer of an unknown model; what it saw, as JSON."""
    out = subprocess.run([str(KSERVE_PYTHON), "-c", _KSERVE_CLIENT, agent.grpc_target, model, json.dumps(tensor)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
