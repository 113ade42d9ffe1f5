"""The agent's idle footprint (goal: <= 80 MB RSS idle, benchmarks/results/reconcile.md): what
`modelshelf run` imports to start must not pull in frameworks or clients only other features
need. Each one listed cost measured RSS when it was imported at start: httpx's CLI with rich and
pygments ~3 MiB (click stays: uvicorn imports it).
The picker's protobuf messages and S3's botocore belong to the picker and the puller's S3
source only."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# top-level packages (or agent subpackages) that must not be imported by starting the agent
NOT_AT_START = ("rich", "pygments",
                "google.protobuf", "botocore", "boto3", "agent.picker")

SCRIPT = """
import json, sys
from agent.app import Agent, run  # what `modelshelf run` imports
from agent.runtimes import make_adapter  # the adapter modules the agent starts with
import agent.runtimes.mlserver, agent.runtimes.triton
from agent.api import build_api, build_probes
import httpx
print(json.dumps(sorted(sys.modules)))
"""


def test_starting_the_agent_imports_no_framework_or_client_it_does_not_use():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    modules = json.loads(out.stdout)
    assert "agent.app" in modules and "httpx" in modules and "grpc" in modules  # the check sees real imports
    heavy = sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in NOT_AT_START))
    assert not heavy, f"imported at start: {heavy}"
