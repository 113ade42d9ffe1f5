"""Error bodies from the server as the agent passes them on: every one {"error": reason}, the
reason short, without a traceback or a server path (what MLServer and Triton send on their
error paths, as literal bodies)."""
from __future__ import annotations

import json

import pytest

from agent.router import error_reason

TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/opt/venv/lib/python3.11/site-packages/mlserver/handlers/dataplane.py", line 110, in infer\n'
    "    prediction = await model.predict(payload)\n"
    '  File "/srv/models/iris/model.py", line 12, in predict\n'
    "ValueError: X has 2 features, but LogisticRegression is expecting 4 features as input.\n"
)


@pytest.mark.parametrize("status, body, expected", [
    (500, json.dumps({"error": TRACEBACK}).encode(),
     "ValueError: X has 2 features, but LogisticRegression is expecting 4 features as input."),
    (500, TRACEBACK.encode(), "ValueError: X has 2 features, but LogisticRegression is expecting 4 features as input."),
    (422, json.dumps({"detail": [{"type": "list_type", "loc": ["body", "inputs"], "msg": "Input should be a valid list",
                                  "input": "nope"}]}).encode(), "invalid request: inputs: Input should be a valid list"),
    (404, json.dumps({"detail": "Not Found"}).encode(), "Not Found"),
    (400, b"Invalid HTTP request received.", "Invalid HTTP request received."),
    (500, json.dumps({"error": "failed to open /var/lib/models/iris/1/model.onnx: no such file"}).encode(),
     "failed to open <path>: no such file"),
    (500, b"", "the server answered 500 without a reason"),
    (502, bytes(range(256)), "the server answered 502 without a reason"),
    (500, json.dumps({"error": "x" * 1000}).encode(), "x" * 300 + "..."),
])
def test_server_error_bodies_become_a_short_reason(status, body, expected):
    assert error_reason(status, body) == expected
