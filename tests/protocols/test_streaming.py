"""generate_stream through the agent, against a real MLServer and a real Triton (a decoupled
model): server-sent events reach the client as the model yields them, not when the answer ends;
and request bodies above --stream-body-bytes (64 KiB here) are forwarded as they arrive, with
their Content-Length or chunked as the client sent them, within --max-body-bytes (1 MiB here)."""
from __future__ import annotations

import http.client
import json
import time

import pytest

from tests.support.agentproc import IRIS_ROW
from tests.support.models import sklearn_predictions


def _events(buffer: bytes) -> list[dict]:
    return [json.loads(block[len(b"data: "):]) for block in buffer.split(b"\n\n") if block.startswith(b"data: ")]


def _word(event: dict) -> str:
    return event["outputs"][0]["data"][0]


def _gated_stream(port: int, body: dict, gate, during=None,
                  path: str = "/v2/models/gated/generate_stream") -> tuple[list[dict], list[dict]]:
    """POST generate_stream to `gated`; the events seen before the gate was opened (the model
    waits for it after its first event), and all of them. `during()` runs before the gate opens."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200, r.read()[:300]
        assert r.getheader("content-type", "").startswith("text/event-stream")
        seen = b""
        while not _events(seen):  # the first event, while the model still waits for the gate
            chunk = r.read1(65536)
            assert chunk, f"the stream ended before its first event: {seen!r}"
            seen += chunk
        before = _events(seen)
        if during is not None:
            during()
        gate.touch()
        seen += r.read()
        return before, _events(seen)
    finally:
        conn.close()


def test_generate_stream_passes_each_event_on_as_the_model_yields_it(ms_agent, tmp_path):
    gate = tmp_path / "gate"
    body = {"parameters": {"gate": str(gate)}, "inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["go"]}]}
    leases = []
    before, events = _gated_stream(ms_agent.port, body, gate,
                                   during=lambda: leases.append(ms_agent.status()["models"]["gated"]["inflight"]))
    assert [_word(e) for e in before] == ["first"]
    assert [_word(e) for e in events] == ["first", "after-gate"]
    assert leases == [1]  # the stream holds its model's lease (no eviction under it) ...
    assert ms_agent.status()["models"]["gated"]["inflight"] == 0  # ... until it ends
    # the same model on generate (not streamed) and on infer keeps working after the stream
    code, doc = ms_agent.post("/v2/models/gated/infer", {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                                                                     "data": ["go"]}]})
    assert code == 200 and doc["outputs"][0]["data"] == ["whole"]


def test_a_body_above_the_stream_threshold_is_forwarded_and_answered(ms_agent):
    rows = [IRIS_ROW] * 4000  # ~100 KiB of JSON: above --stream-body-bytes 64Ki
    doc = {"inputs": [{"name": "x", "shape": [len(rows), 4], "datatype": "FP64", "data": [v for r in rows for v in r]}]}
    data = json.dumps(doc).encode()
    assert len(data) > 64 * 1024
    for _ in range(3):  # a streamed body's connection is never pooled half-written: every answer is right
        code, body = ms_agent.post("/v2/models/iris/infer", data=data, headers={"content-type": "application/json"})
        assert code == 200, body
        assert body["outputs"][0]["data"] == sklearn_predictions(ms_agent.root / "store" / "iris", rows)


def test_a_streamed_body_cut_short_gets_no_answer_and_leaves_others_unharmed(ms_agent):
    data = json.dumps({"inputs": [{"name": "x", "shape": [4000, 4], "datatype": "FP64", "data": IRIS_ROW * 4000}]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", ms_agent.port, timeout=30)
    conn.putrequest("POST", "/v2/models/iris/infer")
    conn.putheader("content-type", "application/json")
    conn.putheader("content-length", str(len(data)))
    conn.endheaders()
    conn.send(data[: len(data) // 2])
    conn.close()  # the client goes away mid-body
    code, body = ms_agent.post("/v2/models/iris/infer", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64",
                                                                     "data": IRIS_ROW}]})
    assert code == 200, body


@pytest.mark.triton
def test_triton_generate_stream_of_a_decoupled_model_is_not_buffered(triton_agent, tmp_path):
    gate = tmp_path / "gate"
    before, events = _gated_stream(triton_agent.port, {"INPUT0": [0.0], "gate": str(gate)}, gate)
    assert [e["OUTPUT0"] for e in before] == [1.0]
    assert [e["OUTPUT0"] for e in events] == [1.0, 2.0]  # 2.0: sent after the gate opened (-1.0 if never)


def test_mlserver_generate_and_infer_stream(ms_agent, tmp_path):
    """MLServer's generate (a V2 infer body) and infer_stream, the same gate on the latter."""
    gate = tmp_path / "gate"
    code, doc = ms_agent.post("/v2/models/gated/generate", {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES",
                                                                        "data": ["go"]}]})
    assert code == 200 and doc["outputs"][0]["data"] == ["whole"], doc
    body = {"parameters": {"gate": str(gate)}, "inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["go"]}]}
    before, events = _gated_stream(ms_agent.port, body, gate, path="/v2/models/gated/infer_stream")
    assert [_word(e) for e in before] == ["first"]
    assert [_word(e) for e in events] == ["first", "after-gate"]


def test_a_client_leaving_a_stream_ends_its_lease_while_the_model_still_runs(ms_agent, tmp_path):
    """The model would stream an event every 0.5 s for 10 minutes more (its gate never opens);
    the client leaves after the first event: the agent stops reading and its lease ends."""
    body = {"parameters": {"gate": str(tmp_path / "never"), "patience": 600, "tick": True},
            "inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["go"]}]}
    conn = http.client.HTTPConnection("127.0.0.1", ms_agent.port, timeout=60)
    conn.request("POST", "/v2/models/gated/generate_stream", json.dumps(body), {"content-type": "application/json"})
    r = conn.getresponse()
    seen = b""
    while not _events(seen):
        chunk = r.read1(65536)
        assert chunk, seen
        seen += chunk
    assert ms_agent.status()["models"]["gated"]["inflight"] == 1
    r.close()
    conn.close()
    deadline = time.monotonic() + 60  # a bound on the wait, far below the model's 600 s
    while ms_agent.status()["models"]["gated"]["inflight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ms_agent.status()["models"]["gated"]["inflight"] == 0


def _post_chunked(port: int, path: str, data: bytes, piece: int = 16384) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, (data[i:i + piece] for i in range(0, len(data), piece)),
                     {"content-type": "application/json"}, encode_chunked=True)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_a_chunked_body_is_forwarded_and_answered_within_the_limit(ms_agent):
    rows = [IRIS_ROW] * 4000  # ~100 KiB: above --stream-body-bytes, forwarded chunked
    data = json.dumps({"inputs": [{"name": "x", "shape": [len(rows), 4], "datatype": "FP64",
                                   "data": [v for r in rows for v in r]}]}).encode()
    small = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": IRIS_ROW}]}).encode()
    code, doc = _post_chunked(ms_agent.port, "/v2/models/iris/infer", small)  # below the threshold: read whole
    assert code == 200, doc
    code, doc = _post_chunked(ms_agent.port, "/v2/models/iris/infer", data)
    assert code == 200, doc
    assert doc["outputs"][0]["data"] == sklearn_predictions(ms_agent.root / "store" / "iris", rows)
    big = json.dumps({"inputs": [{"name": "x", "shape": [80000, 4], "datatype": "FP64", "data": IRIS_ROW * 80000}]}).encode()
    assert len(big) > 2**20
    code, doc = _post_chunked(ms_agent.port, "/v2/models/iris/infer", big)
    assert code == 413 and "--max-body-bytes" in doc["error"]
    code, doc = ms_agent.post("/v2/models/iris/infer", data=data, headers={"content-type": "application/json"})
    assert code == 200  # the server and the agent are fine after the cut-off body


@pytest.mark.triton
def test_triton_takes_a_streamed_body_with_or_without_content_length(triton_agent):
    values = [float(i % 13) for i in range(30_000)]
    data = json.dumps({"inputs": [{"name": "INPUT0", "shape": [len(values)], "datatype": "FP32", "data": values}]}).encode()
    assert len(data) > 64 * 1024
    code, doc = _post_chunked(triton_agent.port, "/v2/models/triple/infer", data)
    assert code == 200, doc
    assert doc["outputs"][0]["data"] == [v * 3 for v in values]
    code, doc = triton_agent.post("/v2/models/triple/infer", data=data, headers={"content-type": "application/json"})
    assert code == 200 and doc["outputs"][0]["data"] == [v * 3 for v in values]
