"""`modelshelf prefetch` (a Job that fills a shared cache) and the agent pulling over HTTP."""
from __future__ import annotations

import json
import subprocess
import sys

from agent.demo import write_model
from tests.support.agentproc import IRIS_ROW, AgentProcess, v2_infer_body
from tests.support.configmap import ConfigMapDir
from tests.support.httpserver import HTTPFileServer


def _prefetch(config_dir, cache_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", "prefetch", "--config-dir", str(config_dir),
                           "--cache-dir", str(cache_dir)], capture_output=True, text=True, timeout=120)


def test_prefetch_fills_the_cache_once_and_names_failures(tmp_path):
    write_model(tmp_path / "src", "logreg", 0)
    blob = (tmp_path / "src" / "model.joblib").read_bytes()
    cm = ConfigMapDir(tmp_path / "config")
    with HTTPFileServer(files={"a/model.joblib": blob, "b/model.joblib": blob + b"\0"}) as srv:
        models = [{"name": "a", "uri": srv.url("a/model.joblib")},
                  {"name": "b", "uri": srv.url("b/model.joblib")},
                  {"name": "gone", "uri": srv.url("missing/model.joblib")}]
        cm.write({"models.yaml": json.dumps(models)})
        first = _prefetch(cm.root, tmp_path / "cache")
        assert first.returncode == 1
        assert "FAILED gone" in first.stderr and "2/3 models cached" in first.stderr
        assert srv.get_count("a/model.joblib") == 1 and srv.get_count("b/model.joblib") == 1

        cm.write({"models.yaml": json.dumps(models[:2])})
        second = _prefetch(cm.root, tmp_path / "cache")
        assert second.returncode == 0, second.stderr
        assert "0 downloaded, 2 already there" in second.stderr
        assert srv.get_count("a/model.joblib") == 1  # a hit moves no bytes

        # an agent on the prefetched cache serves without downloading anything
        agent = AgentProcess(cm.root, tmp_path / "cache", tmp_path / "agent.log").wait_ready()
        try:
            agent.wait_state("a", "loaded")
            code, body = agent.post("/v2/models/a/infer", v2_infer_body([IRIS_ROW]))
            assert code == 200, body
            assert agent.status()["models"]["a"]["in_place"] is False
        finally:
            agent.stop()
        assert srv.get_count("a/model.joblib") == 1


def test_prefetch_refuses_a_config_that_does_not_parse(tmp_path):
    cm = ConfigMapDir(tmp_path / "config")
    cm.write({"models.yaml": "models: [ {name: a"})
    result = _prefetch(cm.root, tmp_path / "cache")
    assert result.returncode == 2
    assert "models.yaml" in result.stderr


def test_a_source_replaced_under_the_same_uri_is_reloaded(tmp_path):
    """The periodic source check lists the source again: a new ETag makes a new cache entry,
    loaded in place of the old one; an unchanged source moves no bytes."""
    write_model(tmp_path / "v1", "logreg", 0)
    write_model(tmp_path / "v2", "tree", 1)
    cm = ConfigMapDir(tmp_path / "config")
    with HTTPFileServer(files={"m/model.joblib": (tmp_path / "v1" / "model.joblib").read_bytes()}) as srv:
        cm.write({"models.yaml": json.dumps([{"name": "m", "uri": srv.url("m/model.joblib")}])})
        agent = AgentProcess(cm.root, tmp_path / "cache", tmp_path / "agent.log", "--resync-interval", "1").wait_ready()
        try:
            first = agent.wait_state("m", "loaded")["models"]["m"]
            agent.wait_for(lambda s: srv.head_count("m/model.joblib") >= 3, what="two source checks")
            assert srv.get_count("m/model.joblib") == 1 and agent.status()["models"]["m"]["loads"] == 1
            srv.set_file("m/model.joblib", (tmp_path / "v2" / "model.joblib").read_bytes())
            status = agent.wait_for(lambda s: s["models"]["m"]["cache_key"] != first["cache_key"]
                                    and s["models"]["m"]["loads"] == 2, what="new copy loaded")
            assert status["models"]["m"]["state"] == "loaded"
            code, body = agent.post("/v2/models/m/infer", v2_infer_body([IRIS_ROW]))
            assert code == 200, body
            # the store goes away: source checks fail, the cached and loaded copy stays
            srv.stop()
            agent.wait_for(lambda s: "source check failed; cached copy kept" in agent.log(), what="a failed check")
            status = agent.status()["models"]["m"]
            assert (status["state"], status["loads"]) == ("loaded", 2)
            assert agent.post("/v2/models/m/infer", v2_infer_body([IRIS_ROW]))[0] == 200
        finally:
            agent.stop()


def test_prefetch_with_a_budget_keeps_what_it_reports_and_says_what_does_not_fit(tmp_path):
    """--max-cache-bytes: the run's own GC must not remove its earlier downloads (they are leased
    for the run); models that fit together are all cached, and a set that does not fit is said."""
    from puller import Cache

    cm = ConfigMapDir(tmp_path / "config")
    files = {f"m{i}/model.bin": bytes([65 + i]) * 40_000 for i in range(3)}
    with HTTPFileServer(files=files) as srv:
        models = [{"name": f"m{i}", "uri": srv.url(f"m{i}/model.bin")} for i in range(3)]
        cm.write({"models.yaml": json.dumps(models)})
        fits = subprocess.run([sys.executable, "-m", "agent.cli", "prefetch", "--config-dir", str(cm.root),
                               "--cache-dir", str(tmp_path / "c1"), "--max-cache-bytes", "130000",
                               "--pull-concurrency", "1"], capture_output=True, text=True, timeout=120)
        assert fits.returncode == 0, fits.stderr
        assert "3/3 models cached" in fits.stderr
        assert len(Cache(tmp_path / "c1").ls()) == 3
        tight = subprocess.run([sys.executable, "-m", "agent.cli", "prefetch", "--config-dir", str(cm.root),
                                "--cache-dir", str(tmp_path / "c2"), "--max-cache-bytes", "50000",
                                "--pull-concurrency", "1"], capture_output=True, text=True, timeout=120)
        assert tight.returncode == 1
        assert "3/3 models cached" in tight.stderr  # true when it exits: nothing of the run was removed
        assert len(Cache(tmp_path / "c2").ls()) == 3
        assert "need 120000 bytes of cache, more than --max-cache-bytes 50000" in tight.stderr
        assert Cache(tmp_path / "c2").gc(50_000).bytes_after == 40_000  # no lease left behind
