"""Both views of memory through a REAL agent (embedded MLServer): /status carries "ledger"
(used vs held, declared vs measured per model, runtime imports) beside "reality" (the server's
real bytes over its baseline, drift, excess), /metrics the matching gauges, and the status page
shows both."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.support.agentproc import AgentProcess, request
from tests.support.configmap import ConfigMapDir
from tests.support.models import write_sklearn_model

MiB = 2**20


@pytest.mark.timeout(120)
def test_status_and_metrics_show_ledger_and_reality(tmp_path):
    models = []
    for i, pad in enumerate((0, 30 * MiB)):
        d = write_sklearn_model(tmp_path / "store" / f"m{i}", seed=i, pad_bytes=pad)
        models.append({"name": f"m{i}", "uri": str(d), "runtime": "sklearn"})
    cm = ConfigMapDir(tmp_path / "config")
    cm.write({"models.yaml": json.dumps({"models": models})})
    agent = AgentProcess(cm.root, tmp_path / "cache", tmp_path / "agent.log", "--host-memory", "1Gi",
                         "--server-malloc-keep", "24Mi", "--server-repository", str(tmp_path / "repository"))
    try:
        agent.wait_ready()
        status = agent.wait_for(lambda s: all(m["state"] == "loaded" for m in s["models"].values()), what="both loaded")
        status = agent.status()
        ledger, reality = status["ledger"], status["reality"]
        host = ledger["devices"]["host"]
        assert host["budget"] == 1024 * MiB and host["used"] <= host["budget"] and host["held"] >= host["used"]
        # the allocator's reserve: one line of the ledger, the very figure the embedded server was given
        assert ledger["malloc_keep"]["host"] == 24 * MiB and host["overhead"] >= 24 * MiB
        server_settings = json.loads((tmp_path / "repository" / "settings.json").read_text())
        assert server_settings["model_repository_implementation_args"]["malloc_keep"] == 24 * MiB
        assert set(ledger["models"]) == {"m0", "m1"}
        real = reality["devices"]["host"]
        assert real["real"] >= 30 * MiB, reality  # the 30 MiB payload, over the bare server's baseline
        # drift = ledger - real, the reserve counted only as far as the server says it keeps it
        kept = reality["allocator_reserve"]
        assert kept is not None and 0 <= kept <= 24 * MiB, reality
        assert real["drift"] == real["ledger"] - 24 * MiB + kept - real["real"] and real["excess"] == 0
        assert reality["server_rss"] > real["real"]
        text = agent.get("/metrics")[1].decode()
        value = re.search(r'^modelshelf_memory_real_bytes\{device="host"\} ([0-9.e+]+)$', text, re.M)
        assert value and float(value.group(1)) >= 30 * MiB
        assert re.search(r'^modelshelf_memory_held_bytes\{device="host"\} ', text, re.M)
        assert re.search(r'^modelshelf_memory_excess_bytes\{device="host"\} 0\.0$', text, re.M)
        page = request("GET", agent.url + "/", headers={"accept": "text/html"})[1]  # a browser: the page
        page = page.decode() if isinstance(page, bytes) else str(page)
        assert "Ledger vs reality" in page and "drift" in page
    finally:
        agent.stop()


def test_a_bad_malloc_keep_is_refused_naming_the_flag(tmp_path):
    for args, env in ((["--server-malloc-keep", "lots"], {}), ([], {"MODELSHELF_SERVER_MALLOC_KEEP": "-1Mi"})):
        out = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config-dir", str(tmp_path), "--cache-dir",
                              str(tmp_path / "cache"), *args], capture_output=True, text=True, timeout=60,
                             env={**os.environ, **env})
        assert out.returncode == 2, out.stderr
        assert "--server-malloc-keep" in out.stderr and "not a quantity" in out.stderr, out.stderr
        assert all(f"{k}=" in out.stderr for k in env), out.stderr


def test_the_variable_the_adapter_reads_is_the_flags_own():
    """`modelshelf run` exports --server-malloc-keep to the embedded MLServer's adapter under the
    flag's own environment variable: a keep set in the environment is the same setting."""
    from agent.cli import env_name
    from agent.runtimes.mlserver import MALLOC_KEEP_ENV

    assert MALLOC_KEEP_ENV == env_name("--server-malloc-keep")


@pytest.mark.timeout(180)
def test_the_agent_evicts_when_real_memory_exceeds_the_budget(tmp_path):
    """Models that declare 2Mi but really hold 40 MiB each: admission by the ledger lets them
    in, reality then says the server holds more than the budget, and the agent's own reality
    loop evicts (least recently used, never under a request) until real memory is within the
    budget again. Without the loop the excess stays (the ledger only grows by measurement)."""
    names = ["m0", "m1", "m2"]
    models = []
    for i, name in enumerate(names):
        d = write_sklearn_model(tmp_path / "store" / name, seed=i, pad_bytes=40 * MiB)
        models.append({"name": name, "uri": str(d), "runtime": "sklearn", "memory": "2Mi", "preload": False})
    cm = ConfigMapDir(tmp_path / "config")
    cm.write({"models.yaml": json.dumps({"models": models})})
    budget = 150 * MiB  # the runtime's import (~80 MiB) and one padded model fit; two do not
    agent = AgentProcess(cm.root, tmp_path / "cache", tmp_path / "agent.log", "--host-memory", str(budget),
                         "--min-residency", "0")
    try:
        agent.wait_ready()
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]}
        for name in names:
            code, answer = agent.post(f"/v2/models/{name}/infer", body)
            assert code == 200, answer
        status = agent.wait_for(lambda s: s["reality"]["devices"]["host"]["excess"] == 0
                                and any(m["state"] == "cached" for m in s["models"].values()),
                                timeout=60, what="real memory back within the budget after evictions")
        real = status["reality"]["devices"]["host"]["real"]
        assert real <= budget * 1.05, status["reality"]
        assert "evicted_for_excess" in agent.log()
        assert status["models"]["m2"]["state"] == "loaded"  # the most recently used one stays
    finally:
        agent.stop()
