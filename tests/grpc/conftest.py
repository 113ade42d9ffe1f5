"""Shared by the gRPC tests: an agent process with a given model list, and a tritonclient.grpc
client on its gRPC port."""
from __future__ import annotations

import contextlib
import json
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
