"""The co-located server misbehaves under traffic: killed (-9), frozen (SIGSTOP/SIGCONT), or a
model unloaded on it behind the agent's back. Clients check every answer: never a wrong one,
failures only 503 with Retry-After, and every model serves again afterwards."""
from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.faults.conftest import Traffic, infer, served
from tests.support.models import triton_v2_request, write_triton_model
from tests.support.servers import triton_available


def _agent_with_a_and_b(start_agent, store, *args: str):
    """An agent serving a and b (both loaded), and its server's pid."""
    agent = start_agent([store.entry("a"), store.entry("b")], *args)
    agent.wait_for(lambda s: all(s["models"][n]["state"] == "loaded" for n in "ab"), what="a and b loaded")
    return agent, agent.status()["server"]["pid"]


def test_kill_9_of_the_server_under_traffic(start_agent, store):
    agent, pid = _agent_with_a_and_b(start_agent, store, "--resync-interval", "1")
    with Traffic(agent.url, {n: store.expected[n] for n in "ab"}) as traffic:
        traffic.wait_ok(5, timeout=30)
        os.kill(pid, signal.SIGKILL)
        agent.wait_for(lambda s: s["server"]["pid"] not in (None, pid) and s["server"]["ready"], timeout=60,
                       what="server restarted")
        mark = len(traffic.snapshot())
        traffic.wait_ok(5, timeout=60, since=mark)  # both models serve again, through the same clients
        time.sleep(0.5)
    assert traffic.wrong() == [], traffic.summary()
    assert traffic.failed(), "the kill caused no failed request: the fault was not injected"
    assert traffic.bad_failures() == [], traffic.summary()
    status = served(agent)
    assert all(status[n]["state"] == "loaded" for n in "ab"), status


def test_sigstop_sigcont_of_the_server_under_traffic(start_agent, store):
    agent, pid = _agent_with_a_and_b(start_agent, store, "--request-timeout", "1")
    with Traffic(agent.url, {n: store.expected[n] for n in "ab"}) as traffic:
        traffic.wait_ok(5, timeout=30)
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(3)  # requests time out meanwhile (--request-timeout 1)
            frozen = len(traffic.failed())
        finally:
            os.kill(pid, signal.SIGCONT)
        mark = len(traffic.snapshot())
        traffic.wait_ok(5, timeout=30, since=mark)
    assert frozen > 0, "no request failed while the server was frozen: the fault was not injected"
    assert traffic.wrong() == [], traffic.summary()
    assert traffic.bad_failures() == [], traffic.summary()
    status = agent.status()
    assert status["server"]["pid"] == pid  # frozen, not dead: the same server serves on
    assert all(status["models"][n]["state"] == "loaded" and status["models"][n]["loads"] == 1 for n in "ab")


def test_model_unloaded_behind_the_agent_is_noticed_and_reloaded(start_agent, store):
    """Someone unloads `a` on the server directly. Requests for it never get 404 (a configured
    model): 503 + Retry-After at worst, and within the resync interval it serves again."""
    agent, _ = _agent_with_a_and_b(start_agent, store, "--resync-interval", "1")
    server = agent.status()["server"]["url"]
    r = httpx.post(f"{server}/v2/repository/models/a/unload", json={}, trust_env=False)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{server}/v2/models/a/ready", trust_env=False).status_code != 200  # really gone
    first = infer(agent, "a")
    assert first.status_code == 200 or (first.status_code == 503 and first.headers.get("retry-after")), \
        (first.status_code, first.text)
    agent.wait_for(lambda s: s["models"]["a"]["state"] == "loaded" and s["models"]["a"]["loads"] == 2, timeout=6,
                   what="a reloaded by the agent (resync interval 1 s)")
    deadline = time.monotonic() + 5
    while (r := infer(agent, "a")).status_code != 200 and time.monotonic() < deadline:
        assert r.status_code == 503 and r.headers.get("retry-after"), (r.status_code, r.text)
        time.sleep(0.1)
    assert r.status_code == 200 and [int(v) for v in r.json()["outputs"][0]["data"]] == store.expected["a"]
    assert infer(agent, "b").status_code == 200


def test_kill_9_of_an_embedded_triton_under_traffic(start_agent, tmp_path):
    """The same kill under traffic with Triton as the co-located server (python-backend models
    x2 and x3: a wrong answer is caught)."""
    why = triton_available()
    if why:
        pytest.skip(f"Triton not installed: {why}")
    from tests.support.servers import triton_site_packages

    values = [1.0, 2.5, -4.0]
    models = []
    for name, factor in (("x2", 2.0), ("x3", 3.0)):
        write_triton_model(tmp_path / "tstore" / name, name=name, factor=factor, site_packages=triton_site_packages())
        models.append({"name": name, "uri": str(tmp_path / "tstore" / name), "runtime": "triton"})
    agent = start_agent(models, "--server", "triton", "--resync-interval", "1")
    agent.wait_for(lambda s: all(s["models"][n]["state"] == "loaded" for n in ("x2", "x3")), what="x2 and x3 loaded")
    pid = agent.status()["server"]["pid"]
    expected = {"x2": [v * 2 for v in values], "x3": [v * 3 for v in values]}
    with Traffic(agent.url, expected, body=triton_v2_request(values),
                 check=lambda want, doc: doc["outputs"][0]["data"] == want) as traffic:
        traffic.wait_ok(5, timeout=30)
        os.kill(pid, signal.SIGKILL)
        agent.wait_for(lambda s: s["server"]["pid"] not in (None, pid) and s["server"]["ready"], timeout=60,
                       what="server restarted")
        traffic.wait_ok(5, timeout=60, since=len(traffic.snapshot()))
    assert traffic.wrong() == [], traffic.summary()
    assert traffic.failed(), "the kill caused no failed request: the fault was not injected"
    assert traffic.bad_failures() == [], traffic.summary()
