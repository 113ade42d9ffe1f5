"""KServe V1 as KServe's own server answers it, against a real agent with MLServer: the exact
HTTP calls of the KServe SDK's InferenceRESTClient (protocol "v1"; kserve/inference_client.py:
is_server_live reads {"status": "alive"} from GET <base>, is_model_ready reads 503 as False),
and the V1 bodies KServe's model server accepts (kserve/utils/utils.py get_predict_input:
"inputs" is an alias of "instances"; dict instances become a DataFrame)."""
from __future__ import annotations

import pytest

from tests.support.agentproc import IRIS_ROW, request
from tests.support.models import sklearn_predictions

ROWS = [IRIS_ROW, [6.2, 2.9, 4.3, 1.3], [7.7, 3.0, 6.1, 2.3]]
COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def _expected(ms_agent) -> list[int]:
    return sklearn_predictions(ms_agent.root / "store" / "iris", ROWS)


def test_server_liveness_is_kserve_json_at_root_and_v1(ms_agent):
    for path in ("/", "/v1"):
        code, body = request("GET", ms_agent.url + path, headers={"accept": "application/json"})
        assert (code, body) == (200, {"status": "alive"}), path
    # httpx's default Accept (*/*), as the SDK sends it
    code, body = request("GET", ms_agent.url + "/")
    assert code == 200 and body["status"].lower() == "alive"


def test_model_list_names_every_configured_model(ms_agent):
    code, body = ms_agent.get("/v1/models")
    assert code == 200
    assert body == {"models": ["broken", "folder", "gated", "iris"]}


def test_readiness_is_200_when_ready_and_503_when_not(ms_agent):
    assert ms_agent.get("/v1/models/iris") == (200, {"name": "iris", "ready": True})
    code, body = ms_agent.get("/v1/models/broken")
    assert code == 503
    assert "broken" in body["error"] and "failed" in body["error"]
    assert ms_agent.get("/v1/models/nope")[0] == 404


@pytest.mark.parametrize("key", ["instances", "inputs"])
def test_predict_accepts_inputs_as_an_alias_of_instances(ms_agent, key):
    code, body = ms_agent.post("/v1/models/iris:predict", {key: ROWS})
    assert code == 200, body
    assert body == {"predictions": _expected(ms_agent)}


@pytest.mark.parametrize("shape", ["records", "columns", "pandas-dict", "records-per-instance", "top-columnar"])
def test_predict_translates_dict_instances_as_kserve_does(ms_agent, shape):
    if shape == "records":
        doc = {"instances": [dict(zip(COLUMNS, r)) for r in ROWS]}
    elif shape == "columns":
        doc = {"instances": [{c: [r[i] for r in ROWS] for i, c in enumerate(COLUMNS)}]}
    elif shape == "pandas-dict":  # KServe's lightgbm doc payload: DataFrame.to_dict() per instance
        doc = {"inputs": [{c: {"0": r[i]} for i, c in enumerate(COLUMNS)} for r in ROWS]}
    elif shape == "records-per-instance":
        doc = {"instances": [[dict(zip(COLUMNS, r)) for r in ROWS]]}
    else:
        doc = {"inputs": {c: [r[i] for r in ROWS] for i, c in enumerate(COLUMNS)}}
    code, body = ms_agent.post("/v1/models/iris:predict", doc)
    assert code == 200, body
    assert body == {"predictions": _expected(ms_agent)}


def test_dict_instances_with_different_columns_are_a_400_naming_them(ms_agent):
    code, body = ms_agent.post("/v1/models/iris:predict", {"instances": [{"a": 1.0}, {"b": 2.0}]})
    assert code == 400 and "columns" in body["error"] and "'b'" in body["error"]


def test_explain_is_501_with_a_reason(ms_agent):
    code, body = ms_agent.post("/v1/models/iris:explain", {"instances": ROWS})
    assert code == 501
    assert "explain" in body["error"] and "iris" in body["error"]


def test_versioned_v2_readiness_honours_the_version(ms_agent):
    """iris has no configured version: the server's versions decide (none but the default)."""
    assert ms_agent.get("/v2/models/iris/ready")[0] == 200
    code, body = ms_agent.get("/v2/models/iris/versions/1/ready")
    assert code == 404 and "version" in body["error"]
    assert ms_agent.post("/v2/models/iris/versions/1/infer", {"inputs": []})[0] == 404


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_v1_body_is_decompressed_and_its_limit_counts_decompressed(ms_agent, encoding):
    import gzip
    import json
    import zlib

    raw = json.dumps({"instances": ROWS}).encode()
    data = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    code, body = ms_agent.post("/v1/models/iris:predict", data=data,
                               headers={"content-type": "application/json", "content-encoding": encoding})
    assert code == 200, body
    assert body == {"predictions": _expected(ms_agent)}
    bomb = gzip.compress(b'{"instances": [' + b"1," * (3 * 2**20) + b"1]}")  # ~6 MiB inflated, 4 MiB limit
    code, body = ms_agent.post("/v1/models/iris:predict", data=bomb,
                               headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert code == 413 and "decompressed" in body["error"]
