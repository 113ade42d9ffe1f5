"""KServe's own Python SDK (InferenceRESTClient, protocols v1 and v2) against the agent with
MLServer, unchanged. The SDK needs its own venv (`kserve` pins numpy/pandas/fastapi versions
that clash with MLServer's): `.venv-kserve` with `pip install kserve` (about 2 minutes here);
skipped when it is absent. The calls run in that venv as a script; this test checks its output."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.models import sklearn_predictions

ROOT = Path(__file__).resolve().parents[2]
KSERVE_PYTHON = ROOT / ".venv-kserve" / "bin" / "python"
ROWS = [[5.1, 3.5, 1.4, 0.2], [7.7, 3.0, 6.1, 2.3]]

SCRIPT = '''
import asyncio, json, sys
import httpx
from kserve import InferenceRESTClient, RESTConfig, InferRequest, InferInput

base, rows = sys.argv[1], json.loads(sys.argv[2])


async def main():
    out = {}
    v1 = InferenceRESTClient(RESTConfig(protocol="v1"))
    out["v1_live"] = await v1.is_server_live(base)
    out["v1_ready_iris"] = await v1.is_model_ready(base, "iris")
    out["v1_ready_broken"] = await v1.is_model_ready(base, "broken")
    out["v1_predict"] = await v1.infer(base, {"inputs": rows}, model_name="iris")
    try:
        await v1.explain(base, "iris", {"instances": rows})
        out["v1_explain"] = "no error"
    except httpx.HTTPStatusError as e:
        out["v1_explain"] = [e.response.status_code, e.response.json()["error"]]
    v2 = InferenceRESTClient(RESTConfig(protocol="v2"))
    out["v2_live"] = await v2.is_server_live(base)
    out["v2_ready"] = await v2.is_server_ready(base)
    out["v2_model_ready"] = await v2.is_model_ready(base, "iris")
    x = InferInput("input-0", [len(rows), 4], "FP64", [v for r in rows for v in r])
    answer = await v2.infer(base, InferRequest(model_name="iris", infer_inputs=[x]), model_name="iris")
    out["v2_predict"] = [int(v) for v in answer.outputs[0].data]
    print(json.dumps(out))


asyncio.run(main())
'''


def test_kserve_sdk_rest_client_v1_and_v2(ms_agent, tmp_path):
    if not KSERVE_PYTHON.exists():
        pytest.skip("KServe SDK venv absent: python3 -m venv .venv-kserve && .venv-kserve/bin/pip install kserve")
    script = tmp_path / "sdk.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(KSERVE_PYTHON), str(script), ms_agent.url, json.dumps(ROWS)], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    want = sklearn_predictions(ms_agent.root / "store" / "iris", ROWS)
    assert out["v1_live"] is True and out["v1_ready_iris"] is True and out["v1_ready_broken"] is False
    assert out["v1_predict"] == {"predictions": want}
    assert out["v1_explain"][0] == 501 and "explain" in out["v1_explain"][1]
    assert out["v2_live"] is True and out["v2_ready"] is True and out["v2_model_ready"] is True
    assert out["v2_predict"] == want
