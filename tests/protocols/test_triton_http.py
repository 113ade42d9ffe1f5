"""Triton's HTTP extensions through the agent, with Triton's own client (tritonclient.http)
against a real embedded Triton: model config (PyTriton's ModelClient needs it), statistics,
per-model trace settings, generate / generate_stream, gzip request and response compression,
the server metadata's extension list, and versioned readiness. On MLServer, which has none of
these endpoints, the same calls are a clear 501."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from agent.router import SERVED_EXTENSIONS
from tests.support.agentproc import request

def _client(agent):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(f"127.0.0.1:{agent.port}", network_timeout=60, connection_timeout=60)


def _infer(client, model: str, values: list[float], **kwargs):
    import tritonclient.http as httpclient

    x = httpclient.InferInput("INPUT0", [len(values)], "FP32")
    x.set_data_from_numpy(np.asarray(values, dtype=np.float32))
    return client.infer(model, [x], outputs=[httpclient.InferRequestedOutput("OUTPUT0")], **kwargs)


@pytest.mark.triton
def test_model_config_and_statistics_with_tritonclient(triton_agent):
    client = _client(triton_agent)
    config = client.get_model_config("double")
    assert config["name"] == "double" and config["backend"] == "python"
    assert [i["name"] for i in config["input"]] == ["INPUT0"]
    assert client.get_model_config("double", model_version="1")["name"] == "double"
    _infer(client, "double", [1.0, 2.0])
    stats = client.get_inference_statistics("double")
    (entry,) = [s for s in stats["model_stats"] if s["name"] == "double"]
    assert entry["version"] == "1" and "success" in entry["inference_stats"]


@pytest.mark.triton
def test_gzip_request_and_response_compression(triton_agent):
    client = _client(triton_agent)
    result = _infer(client, "triple", [1.0, 2.5, 4.0], request_compression_algorithm="gzip",
                    response_compression_algorithm="gzip")
    assert result.as_numpy("OUTPUT0").tolist() == [3.0, 7.5, 12.0]
    result = _infer(client, "triple", [2.0], request_compression_algorithm="deflate")
    assert result.as_numpy("OUTPUT0").tolist() == [6.0]


@pytest.mark.triton
def test_a_compressed_body_above_the_stream_threshold(triton_agent):
    values = [float(i % 97) for i in range(40_000)]  # 160 KB of FP32: streamed to the server
    result = _infer(_client(triton_agent), "double", values, request_compression_algorithm="gzip")
    assert result.as_numpy("OUTPUT0").tolist() == [v * 2 for v in values]
    result = _infer(_client(triton_agent), "double", values)
    assert result.as_numpy("OUTPUT0").tolist() == [v * 2 for v in values]


@pytest.mark.triton
def test_per_model_trace_settings(triton_agent):
    client = _client(triton_agent)
    settings = client.get_trace_settings(model_name="double")
    assert "trace_level" in settings and "trace_rate" in settings
    updated = client.update_trace_settings(model_name="double", settings={"trace_rate": "7"})
    assert updated["trace_rate"] == "7"
    assert client.get_trace_settings(model_name="double")["trace_rate"] == "7"


@pytest.mark.triton
def test_server_wide_settings_are_refused(triton_agent):
    for path in ("/v2/logging", "/v2/trace/setting"):
        code, body = request("GET", triton_agent.url + path)
        assert code == 403 and "server-wide" in body["error"], (path, body)


@pytest.mark.triton
def test_generate_and_generate_stream(triton_agent):
    code, body = triton_agent.post("/v2/models/double/generate", {"INPUT0": [1.0, 4.0]})
    assert code == 200, body
    assert body["model_name"] == "double" and body["OUTPUT0"] == [2.0, 8.0]
    code, raw = request("POST", triton_agent.url + "/v2/models/triple/generate_stream", {"INPUT0": [2.0]})
    assert code == 200, raw
    events = [json.loads(b[len(b"data: "):]) for b in raw.split(b"\n\n") if b.startswith(b"data: ")]
    assert [e["OUTPUT0"] for e in events] == [6.0]  # one event; Triton flattens a 1-element output


@pytest.mark.triton
def test_server_metadata_lists_only_what_the_agent_serves(triton_agent):
    meta = _client(triton_agent).get_server_metadata()
    assert meta["name"] == "triton"
    assert set(meta["extensions"]) <= SERVED_EXTENSIONS
    assert {"model_configuration", "statistics"} <= set(meta["extensions"])
    assert "model_repository" not in meta["extensions"] and "logging" not in meta["extensions"]


@pytest.mark.triton
def test_versioned_readiness_honours_the_version(triton_agent):
    client = _client(triton_agent)
    _infer(client, "triple", [1.0])  # loaded
    assert client.is_model_ready("triple") and client.is_model_ready("triple", "1")
    assert not client.is_model_ready("triple", "7")  # the server has only version 1
    assert client.is_model_ready("double", "1")
    assert not client.is_model_ready("double", "2")  # configured version: 1


@pytest.mark.triton
def test_pytriton_model_client_works_unchanged(triton_agent, tmp_path):
    """PyTriton's ModelClient reads the model config first; it runs in the Triton venv (numpy<2)."""
    from agent.runtimes.triton import find_triton

    python = Path(find_triton().site_packages).parents[2] / "bin" / "python"
    script = tmp_path / "client.py"
    script.write_text(f"""
import numpy as np
from pytriton.client import ModelClient
with ModelClient("http://127.0.0.1:{triton_agent.port}", "double", init_timeout_s=60) as c:
    out = c.infer_sample(INPUT0=np.array([1.5, 2.0], dtype=np.float32))
    print(out["OUTPUT0"].tolist())
""")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(python), str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[3.0, 4.0]"


@pytest.mark.parametrize("path", ["/v2/models/iris/config", "/v2/models/iris/stats", "/v2/models/iris/trace/setting"])
def test_triton_extensions_on_mlserver_are_501(ms_agent, path):
    code, body = ms_agent.get(path)
    assert code == 501, body
    assert "iris" in body["error"] and "not served by mlserver" in body["error"]


def test_mlserver_metadata_has_no_extensions_it_lacks(ms_agent):
    code, meta = ms_agent.get("/v2")
    assert code == 200 and set(meta["extensions"]) <= SERVED_EXTENSIONS


@pytest.mark.parametrize("compression", ["gzip", None])
def test_tritonclient_with_gzip_request_compression_on_mlserver(ms_agent, compression):
    import tritonclient.http as httpclient

    from tests.support.models import sklearn_predictions

    rows = [[5.1, 3.5, 1.4, 0.2], [7.7, 3.0, 6.1, 2.3]]
    client = _client(ms_agent)
    x = httpclient.InferInput("input-0", [2, 4], "FP64")
    x.set_data_from_numpy(np.asarray(rows, dtype=np.float64), binary_data=False)  # MLServer: no binary extension
    result = client.infer("iris", [x], outputs=[httpclient.InferRequestedOutput("predict", binary_data=False)],
                          request_compression_algorithm=compression)
    assert result.as_numpy("predict").ravel().tolist() == sklearn_predictions(ms_agent.root / "store" / "iris", rows)
