"""Loads that go wrong inside the real server: one raises, one hangs, one kills the server.
The other models keep serving, and the status says what happened to each."""
from __future__ import annotations

import re
import secrets
import signal
import time

from tests.faults.conftest import Traffic, infer, served
from tests.faults.faultmodels import FAULT_TOKEN_ENV, fault_entry, write_fault_model
from tests.support.net import wait_http


def _restarts(agent) -> float:
    found = re.findall(r"^modelshelf_server_restarts_total(?:\{[^}]*\})? ([0-9.e+]+)$", agent.get("/metrics")[1].decode(), re.M)
    return sum(float(v) for v in found)  # all reasons


def test_a_failing_and_a_hanging_load_leave_the_rest_serving(start_agent, store, tmp_path):
    fails = write_fault_model(tmp_path / "fails", "raise", message="weights corrupt on purpose")
    hangs = write_fault_model(tmp_path / "hangs", "hang", hang_s=600)
    agent = start_agent([store.entry("a"), fault_entry("fails", fails), fault_entry("hangs", hangs)],
                        "--load-timeout", "8", wait=False)
    try:
        agent.wait_up(60)  # not ready until its first loads ended, one by hanging
        agent.wait_state("a", "loaded", timeout=60)
        with Traffic(agent.url, {"a": store.expected["a"]}) as traffic:
            status = agent.wait_for(lambda s: s["models"]["fails"]["state"] == "failed" and s["models"]["hangs"]["state"] == "failed",
                                    timeout=40, what="both faulty models failed")
            traffic.wait_ok(5, timeout=30)
        assert "weights corrupt on purpose" in status["models"]["fails"]["reason"], status["models"]["fails"]
        assert re.search(r"time[ds]? ?out|timeout", status["models"]["hangs"]["reason"], re.I), status["models"]["hangs"]
        assert traffic.wrong() == [] and traffic.failed() == [], traffic.summary()
        r = infer(agent, "fails")
        assert r.status_code == 503 and r.headers.get("retry-after") and "weights corrupt on purpose" in r.text, (r.status_code, r.text)
        assert served(agent)["a"]["state"] == "loaded"
    finally:
        agent.stop(signal.SIGKILL)  # the server dies with it (no graceful wait for the hung load)


def test_hanging_preloads_do_not_starve_a_lazy_load(start_agent, store, tmp_path):
    """Two preloads hang (as many as load slots); a lazy model's first request still loads it
    and gets its answer, instead of waiting behind the stuck loads until they time out. (The
    agent is not ready meanwhile: its preloads are not loaded; requests it gets are served.)"""
    hangs = write_fault_model(tmp_path / "hangs", "hang", hang_s=600)
    agent = start_agent([fault_entry("h1", hangs), fault_entry("h2", hangs), store.entry("a", preload=False)],
                        "--load-timeout", "30", "--load-concurrency", "2", wait=False)
    try:
        agent.wait_up(60)
        agent.wait_for(lambda s: all(s["models"].get(n, {}).get("state") == "loading" for n in ("h1", "h2")), timeout=60,
                       what="both hanging loads in flight")
        code, doc = agent.get("/readyz")
        assert code == 503 and any(r.startswith("restocking") for r in doc["reasons"]), doc
        r = infer(agent, "a")
        assert r.status_code == 200, (r.status_code, r.text)
        assert [int(v) for v in r.json()["outputs"][0]["data"]] == store.expected["a"]
        assert all(served(agent)[n]["state"] == "loading" for n in ("h1", "h2"))  # still stuck: a did not wait for them
    finally:
        agent.stop(signal.SIGKILL)  # the server dies with it (no graceful wait for the hung loads)


def test_a_load_that_kills_the_server_is_quarantined(start_agent, store, tmp_path):
    """`crash`'s load ends the server process. After it did so twice the agent names it the
    culprit, quarantines it with that reason, and stops restarting the server; a and b serve
    again and keep serving, and no answer was ever wrong."""
    token = secrets.token_hex(8)
    load_log = tmp_path / "loads.log"
    crash = write_fault_model(tmp_path / "crash", "exit", token=token, load_log=load_log)
    agent = start_agent([store.entry("a"), store.entry("b"), fault_entry("crash", crash)],
                        "--resync-interval", "1", env={FAULT_TOKEN_ENV: token}, wait=False)
    agent.wait_up(60)  # up; ready only once its server stopped crashing
    agent.wait_for(lambda s: "crash" in s["models"], timeout=30, what="the config applied")
    with Traffic(agent.url, {n: store.expected[n] for n in "ab"}, per_model=1) as traffic:
        status = agent.wait_for(lambda s: s["models"]["crash"]["state"] == "failed"
                                and "quarantin" in (s["models"]["crash"]["reason"] or ""), timeout=60,
                                what="crash quarantined")
        agent.wait_for(lambda s: s["server"]["ready"] and all(s["models"][n]["state"] == "loaded" for n in "ab"),
                       timeout=60, what="a and b loaded again")
        wait_http(agent.url + "/readyz", 30)  # ready again: restocked, the culprit quarantined
        restarts, pid = _restarts(agent), agent.status()["server"]["pid"]
        mark = len(traffic.snapshot())
        time.sleep(4)  # no further crash: the culprit is not loaded again
        traffic.wait_ok(5, timeout=20, since=mark)
    reason = status["models"]["crash"]["reason"]
    assert "server" in reason, reason
    assert _restarts(agent) == restarts and agent.status()["server"]["pid"] == pid, "the server kept crashing"
    assert restarts <= 2, f"{restarts} server restarts: the culprit was not found after its second crash"
    assert len(load_log.read_text().splitlines()) == restarts, "crash was loaded again after its quarantine"
    assert traffic.wrong() == [], traffic.summary()
    assert traffic.bad_failures() == [], traffic.summary()
    assert infer(agent, "crash").status_code == 503
