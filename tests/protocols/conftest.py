"""One real agent per server kind for the protocol tests: `modelshelf run` with its embedded
MLServer (session-wide, shared by the files here) or Triton (skipped without .venv-triton)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.agentproc import AgentProcess
from tests.support.configmap import ConfigMapDir
from tests.support.models import write_broken_model, write_sklearn_model

# A custom MLServer runtime whose predict_stream sends one event, then waits for a gate file
# (named by the request parameter "gate"; at most "patience" seconds, default 20) before the
# second: a client that gets the first event while the gate is still closed got it unbuffered.
GATED_STREAM = '''
import asyncio
import os

from mlserver import MLModel
from mlserver.codecs import StringCodec
from mlserver.types import InferenceResponse


class GatedStream(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload):
        return InferenceResponse(model_name=self.name, outputs=[StringCodec.encode_output("out", ["whole"])])

    async def predict_stream(self, payloads):
        async for payload in payloads:
            gate = payload.parameters.gate
            patience = float(getattr(payload.parameters, "patience", None) or 20)  # seconds
            yield InferenceResponse(model_name=self.name, outputs=[StringCodec.encode_output("out", ["first"])])
            tick = bool(getattr(payload.parameters, "tick", False))  # an event every 0.5 s meanwhile
            for i in range(int(patience * 100)):
                if os.path.exists(gate):
                    break
                if tick and i % 50 == 49:
                    yield InferenceResponse(model_name=self.name, outputs=[StringCodec.encode_output("out", ["tick"])])
                await asyncio.sleep(0.01)
            word = "after-gate" if os.path.exists(gate) else "gate-timeout"
            yield InferenceResponse(model_name=self.name, outputs=[StringCodec.encode_output("out", [word])])
'''

# MLServer's own model folder convention: model-settings.json shipped beside the model file
SHIPPED_SETTINGS = {
    "name": "shipped-name",
    "implementation": "mlserver_sklearn.SKLearnModel",
    "inputs": [{"name": "measurements", "datatype": "FP64", "shape": [-1, 4]}],
    "outputs": [{"name": "predict", "datatype": "INT64", "shape": [-1, 1]}],
    "parameters": {"uri": "./model.joblib", "version": "v0.1.0"},
}


def write_shipped_folder(directory: Path) -> Path:
    write_sklearn_model(directory, "iris-logreg", 3)
    (directory / "model-settings.json").write_text(json.dumps(SHIPPED_SETTINGS))
    return directory


@pytest.fixture(scope="session")
def ms_agent(tmp_path_factory):
    """An agent with MLServer: `iris` (sklearn), `folder` (a folder shipping model-settings.json),
    `broken` (fails to load), `gated` (a streaming custom runtime)."""
    root = tmp_path_factory.mktemp("protocols-mlserver")
    store = root / "store"
    write_sklearn_model(store / "iris", "iris-logreg", 0)
    write_shipped_folder(store / "folder")
    write_broken_model(store / "broken")
    (store / "gated").mkdir(parents=True)
    (store / "gated" / "gated_stream.py").write_text(GATED_STREAM)
    models = [
        {"name": "iris", "uri": str(store / "iris")},
        {"name": "folder", "uri": str(store / "folder")},
        {"name": "broken", "uri": str(store / "broken"), "preload": True},
        {"name": "gated", "uri": str(store / "gated"), "runtime": "mlserver", "implementation": "gated_stream.GatedStream"},
    ]
    cm = ConfigMapDir(root / "config")
    cm.write({"models.json": json.dumps({"models": models})})
    agent = AgentProcess(cm.root, root / "cache", root / "agent.log", "--min-residency", "0",
                         "--request-timeout", "30", "--stream-body-bytes", "64Ki", "--max-body-bytes", "1Mi").wait_ready()
    try:
        agent.wait_for(lambda s: s["models"].get("broken", {}).get("state") == "failed", timeout=60,
                       what="broken failed")
        agent.root = root
        yield agent
    finally:
        agent.stop()


# The same gate for Triton: a decoupled python-backend model (the request parameter "gate",
# which Triton's generate extension fills from a JSON field that is not an input).
TRITON_GATED = '''
import json
import os
import sys
import time

for _p in (os.environ.get("MODELSHELF_TRITON_SITE_PACKAGES"), {site!r}):
    if _p and _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            gate = json.loads(request.parameters() or "{{}}").get("gate", "")
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", np.array([1.0], dtype=np.float32))]))
            for _ in range(2000):  # 20 s at most
                if os.path.exists(gate):
                    break
                time.sleep(0.01)
            word = 2.0 if os.path.exists(gate) else -1.0
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", np.array([word], dtype=np.float32))]),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''


def write_triton_gated(directory: Path, site: Path) -> Path:
    from agent.demo import TRITON_PYTHON_CONFIG

    (directory / "1").mkdir(parents=True, exist_ok=True)
    config = TRITON_PYTHON_CONFIG.format(name=directory.name) + "model_transaction_policy { decoupled: true }\n"
    (directory / "config.pbtxt").write_text(config)
    (directory / "1" / "model.py").write_text(TRITON_GATED.format(site=str(site)))
    return directory


@pytest.fixture(scope="session")
def triton_agent(tmp_path_factory):
    """An agent with an embedded Triton serving `double` (version 1), `triple` (unversioned) and
    `gated` (decoupled: streams two responses, the second after a gate file appears)."""
    from tests.support.models import write_triton_model
    from tests.support.servers import triton_available, triton_site_packages

    why = triton_available()
    if why:
        pytest.skip(f"Triton not installed: {why}")
    root = tmp_path_factory.mktemp("protocols-triton")
    site = triton_site_packages()
    store = root / "store"
    write_triton_model(store / "double", name="double", factor=2.0, site_packages=site)
    write_triton_model(store / "triple", name="triple", factor=3.0, site_packages=site)
    write_triton_gated(store / "gated", site)
    cm = ConfigMapDir(root / "config")
    cm.write({"models.json": json.dumps({"models": [
        {"name": "double", "uri": str(store / "double"), "runtime": "triton", "version": "1"},
        {"name": "triple", "uri": str(store / "triple"), "runtime": "triton"},
        {"name": "gated", "uri": str(store / "gated"), "runtime": "triton"}]})})
    agent = AgentProcess(cm.root, root / "cache", root / "agent.log", "--server", "triton",
                         "--request-timeout", "30", "--stream-body-bytes", "64Ki").wait_ready(90)
    try:
        yield agent
    finally:
        agent.stop()
