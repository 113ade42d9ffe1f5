"""An OOM-killed server (issue 10, item 3): the restart says why ("oom_killed", in /status and
as modelshelf_server_restarts_total{reason="oom_killed"}) and reloads only what fits.

A REAL agent with its embedded MLServer; the server is killed the way the kernel's OOM killer
ends a process (SIGKILL), and the cgroup the agent reads (``--memory-cgroup``) is a FakeCgroup
(see conftest: the kernel's memory.* files, written by the test) whose oom_kill counter the test
raises, as the kernel would."""
from __future__ import annotations

import json
import os
import re
import signal

import pytest

from tests.support.agentproc import AgentProcess
from tests.support.configmap import ConfigMapDir
from tests.support.models import write_sklearn_model

from agent.memory import HOST, CgroupMemory, Cost, DoesNotFit, InMemoryStore, MemoryManager, ProcessTracker, RealityCheck

from .conftest import FakeCgroup, MiB

BUDGET = 250 * MiB


@pytest.mark.timeout(120)
def test_an_oom_killed_server_restarts_with_the_reason_and_reloads_what_fits(tmp_path):
    store = tmp_path / "store"
    models = []
    for i, n in enumerate(("m0", "m1")):
        write_sklearn_model(store / n, seed=i, pad_bytes=4 * MiB)
        models.append({"name": n, "uri": str(store / n), "runtime": "sklearn"})
    cgroup = FakeCgroup(tmp_path / "cgroup").write(current=400 * MiB)
    cm = ConfigMapDir(tmp_path / "config")
    cm.write({"models.yaml": json.dumps({"models": models})})
    agent = AgentProcess(cm.root, tmp_path / "cache", tmp_path / "agent.log", "--host-memory", str(BUDGET),
                         "--memory-cgroup", str(cgroup.path))
    try:
        agent.wait_ready()
        st = agent.wait_for(lambda s: all(s["models"][n]["state"] == "loaded" for n in ("m0", "m1")), timeout=60,
                            what="m0 and m1 loaded")
        assert st["server_restart"] is None
        pid = st["server"]["pid"]
        cgroup.write(current=400 * MiB, oom_kill=1)  # the kernel counts the kill...
        os.kill(pid, signal.SIGKILL)  # ...and ends the server with SIGKILL
        st = agent.wait_for(lambda s: (s.get("server_restart") or {}).get("reason") == "oom_killed"
                            and all(s["models"][n]["state"] == "loaded" and s["models"][n]["loads"] == 2 for n in ("m0", "m1")),
                            timeout=60, what="the server back, m0 and m1 reloaded, the reason oom_killed")
        assert st["server"]["pid"] != pid and st["server_restart"]["signal"] == signal.SIGKILL
        assert "OOM-killed 1 process" in st["server_restart"]["detail"]
        assert st["ledger"]["devices"]["host"]["used"] <= BUDGET
        text = agent.get("/metrics")[1].decode()
        assert re.search(r'^modelshelf_server_restarts_total\{reason="oom_killed"\} 1\.0$', text, re.M), text
        assert "reason=oom_killed" in agent.log()
    finally:
        agent.stop()


def test_restart_reasons_from_the_exit_and_the_cgroup_counter(tmp_path):
    """Only a rise of the cgroup's oom_kill counter since the previous restart is an OOM kill; a
    SIGKILL without it is "killed"; an exit code "exited"; a sidecar's unseen end "unknown"."""
    cg = FakeCgroup(tmp_path / "cg").write(current=100 * MiB, oom_kill=3)  # kills before the agent started
    check = RealityCheck(MemoryManager({HOST: 100 * MiB}), tracker=ProcessTracker(None), cgroup=CgroupMemory.at(cg.path))
    check.check()
    kill = {"code": -9, "signal": 9}
    assert check.restart_reason(kill)["reason"] == "killed"
    cg.write(current=100 * MiB, oom_kill=4)
    why = check.restart_reason(kill)
    assert why["reason"] == "oom_killed" and why["oom_kills"] == 1
    assert check.restart_reason(kill)["reason"] == "killed"  # that kill is not counted twice
    assert check.restart_reason({"code": 1, "signal": None})["reason"] == "exited"
    assert check.restart_reason({"code": -15, "signal": 15})["reason"] == "signal"
    assert check.restart_reason(None)["reason"] == "unknown"


def test_after_a_restart_the_known_import_is_charged_before_any_reload_is_measured(tree):
    """The reloads after a restart (an OOM kill above all) are admitted before the new process's
    first load is measured: the runtime import whose size is known must already count, or the
    restart admits more than fits (main forgot it until the first reload was measured). Real
    growth: the tree's child allocates as the server would."""
    mm = MemoryManager({HOST: 500 * MiB}, store=InMemoryStore(), server_pid=tree.pid, min_model_bytes=MiB)
    for i, (name, grow) in enumerate((("a", 180 * MiB), ("b", 100 * MiB))):  # a: 80 MiB import + 100 MiB
        mm.reserve(name, mm.cost_for(key=f"k{i}", runtime="sklearn", entry_bytes=100 * MiB, declared_host=100 * MiB))
        w = mm.start_measure(name, runtime="sklearn")
        tree.send(f"alloc {grow}")
        mm.finish_measure(w, key=f"k{i}")
    imported = mm.overhead()["runtime:sklearn"].host
    assert 70 * MiB <= imported <= 100 * MiB and mm.ledger_doc()["runtime_imports"]["sklearn"]["provisional"] is False
    mm.reset_server()  # the server was OOM-killed and is back, empty
    mm.release("a")
    mm.release("b")  # the reconciler releases what the server lost, then reloads it
    assert mm.overhead()["runtime:sklearn"].host == imported
    big = Cost(100 * MiB, declared_host=100 * MiB)
    assert mm.admit("a", big, []) == [] and mm.admit("b", big, []) == []
    with pytest.raises(DoesNotFit):  # 200 MiB of models + 260 fit in 500 only if the import is forgotten
        mm.admit("c", Cost(260 * MiB), [])
