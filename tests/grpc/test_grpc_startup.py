"""The gRPC port's flags, and what it answers while the agent is still starting."""
from __future__ import annotations

import json

import grpc
import pytest
import tritonclient.grpc as tg
from tritonclient.grpc import service_pb2 as pb

from agent.cli import build_parser, settings_from_args
from tests.support.agentproc import AgentProcess
from tests.support.configmap import ConfigMapDir
from tests.support.net import free_port


def settings(*argv: str):
    return settings_from_args(build_parser().parse_args(["run", "--config-dir=/c", "--cache-dir=/d", *argv]))


def test_grpc_port_flags(monkeypatch):
    assert settings().grpc_port == 8001  # Triton's and KServe's port
    assert settings("--grpc-port", "off").grpc_port == 0
    assert settings("--grpc-port", "0").grpc_port == 0
    s = settings("--host", "0.0.0.0", "--grpc-port", "9001", "--server-grpc-target", "127.0.0.1:8081")
    assert (s.grpc_port, s.grpc_host, s.server_grpc_target) == (9001, None, "127.0.0.1:8081")
    assert settings("--grpc-host", "127.0.0.1").grpc_host == "127.0.0.1"
    monkeypatch.setenv("MODELSHELF_GRPC_PORT", "off")
    assert settings_from_args(build_parser().parse_args(["run", "--config-dir=/c", "--cache-dir=/d"])).grpc_port == 0
    with pytest.raises(SystemExit):
        settings("--grpc-port", "70000")


def test_while_starting_live_not_ready_and_calls_unavailable(tmp_path):
    """gRPC listens before the agent has started (here: waiting for a sidecar server that is not
    up): live, not ready, and model calls UNAVAILABLE with retry-after, like REST's 503."""
    cm = ConfigMapDir(tmp_path / "config")
    cm.write({"models.yaml": json.dumps({"models": []})})
    nothing = f"http://127.0.0.1:{free_port()}"
    agent = AgentProcess(cm.root, tmp_path / "cache", tmp_path / "agent.log", "--server-url", nothing,
                         "--server-repository", str(tmp_path / "repo"))
    try:
        agent.wait_up(60)
        with tg.InferenceServerClient(agent.grpc_target) as c:
            assert c.is_server_live() and not c.is_server_ready()
        with grpc.insecure_channel(agent.grpc_target) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            with pytest.raises(grpc.RpcError) as e:
                call(pb.ModelInferRequest(model_name="a").SerializeToString(), timeout=10)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
        assert e.value.details() == "the agent is starting"
        assert dict(e.value.trailing_metadata())["retry-after"] == "1"
    finally:
        agent.stop()


def test_grpc_off_listens_on_nothing(tmp_path):
    cm = ConfigMapDir(tmp_path / "config")
    cm.write({"models.yaml": json.dumps({"models": []})})
    agent = AgentProcess(cm.root, tmp_path / "cache", tmp_path / "agent.log", "--server-url", f"http://127.0.0.1:{free_port()}",
                         "--server-repository", str(tmp_path / "repo"), "--grpc-port", "off")
    try:
        agent.wait_up(60)
        with tg.InferenceServerClient(agent.grpc_target) as c:
            with pytest.raises(Exception):
                c.is_server_live(client_timeout=5)
        assert "gRPC data plane listening" not in agent.log()
    finally:
        agent.stop()
