"""--server-processes N: N embedded MLServers, each model in exactly one (agent/runtimes/shards.py).
Real agents and real MLServer processes; which process loaded a model is read from the model's
own load log (slow test models write their pid at each load)."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from agent.cli import build_parser, settings_from_args
from agent.memory import tree_rss
from tests.support.agentproc import AgentProcess
from tests.support.configmap import ConfigMapDir
from tests.support.models import SLOW_IMPLEMENTATION, v2_request, write_sklearn_model, write_slow_model

ROWS = [[1.0, 2.0, 3.0, 4.0]]


def _loads(log: Path) -> list[tuple[str, int]]:
    """(model, server pid) per load recorded in `log`."""
    if not log.exists():
        return []
    return [(ln.split()[0], int(ln.split()[1])) for ln in log.read_text().splitlines() if ln.strip()]


def _start(tmp_path: Path, models: list[dict], *args: str) -> AgentProcess:
    cm = ConfigMapDir(tmp_path / "config")
    cm.write({"models.yaml": json.dumps({"models": models})})
    agent = AgentProcess(cm.root, tmp_path / "cache", tmp_path / "agent.log", "--min-residency", "0",
                         "--load-concurrency", "1", *args)
    return agent.wait_ready(120)


def _slow(tmp_path: Path, name: str, log: Path) -> dict:
    """A model with 5 MiB of files: not quick (agent/runtimes/shards.py), so spread over the processes."""
    write_slow_model(tmp_path / "store" / name, delay=0.0, load_log=log)
    (tmp_path / "store" / name / "pad.bin").write_bytes(os.urandom(5 * 2**20))
    return {"name": name, "uri": str(tmp_path / "store" / name), "runtime": "mlserver", "implementation": SLOW_IMPLEMENTATION}


def _placement(agent: AgentProcess) -> dict[str, int]:
    """model -> index of the server process holding it, from /status."""
    return {m: i for i, p in enumerate(agent.status()["server"]["processes"]) for m in p["models"]}


def _two_shards(tmp_path: Path):
    log = tmp_path / "loads.log"
    agent = _start(tmp_path, [_slow(tmp_path, n, log) for n in ("a", "b")], "--server-processes", "2")
    try:
        agent.wait_for(lambda s: all(s["models"][n]["state"] == "loaded" for n in "ab"), 60, "a and b loaded")
        yield agent, log
    finally:
        agent.stop()


@pytest.fixture(scope="module")
def shared_two_shards(tmp_path_factory: pytest.TempPathFactory):
    """An agent with a and b on two server processes, for the tests that only send requests."""
    yield from _two_shards(tmp_path_factory.mktemp("two-shards"))


@pytest.fixture
def two_shards(tmp_path: Path):
    """The same, of its own (the test kills a process)."""
    yield from _two_shards(tmp_path)


def test_two_server_processes_each_hold_and_answer_their_own_models(shared_two_shards):
    agent, log = shared_two_shards
    server = agent.status()["server"]
    pids = server["pids"]
    assert len(pids) == 2 and len(set(pids)) == 2, server
    placement = _placement(agent)
    assert sorted(placement.values()) == [0, 1], placement  # one model in each process
    loaded_in = dict(_loads(log))
    assert len(_loads(log)) == 2, _loads(log)  # each model loaded once, in one process only
    for name in "ab":
        assert loaded_in[name] == server["processes"][placement[name]]["pid"], (name, loaded_in, server)
        # the agent sends each request to the process holding the model (the other has no such
        # model: a request sent there would be answered 404, and the agent 503)
        code, doc = agent.post(f"/v2/models/{name}/infer", v2_request(ROWS))
        assert code == 200 and doc["model_name"] == name, (code, doc)


def test_kill_9_of_one_server_process_reloads_only_its_models(two_shards):
    agent, log = two_shards
    server = agent.status()["server"]
    placement = _placement(agent)
    victim = server["processes"][placement["a"]]["pid"]
    other = server["processes"][placement["b"]]["pid"]
    os.kill(victim, signal.SIGKILL)
    # while it is down (MLServer takes seconds to start again) the agent is not ready, and the
    # other process's model keeps serving
    agent.wait_for(lambda s: agent.get("/readyz")[0] == 503, 10, "not ready while one process is down")
    code, doc = agent.post("/v2/models/b/infer", v2_request(ROWS))
    assert code == 200 and doc["model_name"] == "b", (code, doc)

    def back(s: dict) -> bool:  # the restarted process came back empty and a was loaded again
        return [name for name, _ in _loads(log)].count("a") == 2 and s["models"]["a"]["state"] == "loaded"

    agent.wait_for(back, 60, "the killed process restarted and a reloaded")
    code, doc = agent.post("/v2/models/a/infer", v2_request(ROWS))
    assert code == 200 and doc["model_name"] == "a", (code, doc)
    code, doc = agent.post("/v2/models/b/infer", v2_request(ROWS))
    assert code == 200 and doc["model_name"] == "b", (code, doc)
    loads = _loads(log)
    # a was loaded again (in the new process); b never was: its process kept serving it
    assert [pid for name, pid in loads if name == "b"] == [other], loads
    assert [pid for name, pid in loads if name == "a"][0] == victim and len([1 for name, _ in loads if name == "a"]) == 2, loads
    assert agent.status()["server"]["processes"][placement["b"]]["pid"] == other


def test_memory_counts_every_server_process(tmp_path: Path):
    """Both processes hold a model: the ledger charges the runtime import once for each of
    them; reality reads both trees."""
    store = tmp_path / "store"
    models = []
    for i, name in enumerate(("m0", "m1")):
        write_sklearn_model(store / name, kind="tree", seed=i, pad_bytes=8 * 2**20)
        models.append({"name": name, "uri": str(store / name), "memory": "9Mi"})
    agent = _start(tmp_path, models, "--server-processes", "2", "--host-memory", "800Mi")
    try:
        agent.wait_for(lambda s: all(s["models"][n]["state"] == "loaded" for n in ("m0", "m1")), 60, "loaded")
        status = agent.status()
        assert sorted(_placement(agent).values()) == [0, 1], status["server"]
        ledger = agent.wait_for(lambda s: "sklearn" in s["ledger"]["runtime_imports"], 30, "import charged")["ledger"]
        imported = ledger["runtime_imports"]["sklearn"]["host"]
        assert imported > 10 * 2**20, ledger  # an import, not a rounding error
        keep = ledger["malloc_keep"]  # each process also keeps its own allocator reserve
        assert keep["host"] == 2 * keep["per_process"] > 0 and keep["processes"] == 2, ledger
        assert ledger["devices"]["host"]["overhead"] == 2 * imported + keep["host"], ledger  # once per process
        assert ledger["runtime_imports"]["sklearn"]["processes"] == 2, ledger
        pids = status["server"]["pids"]
        both = sum(tree_rss(p) for p in pids)
        rss = agent.status()["reality"]["server_rss"]
        assert rss > max(tree_rss(p) for p in pids) * 1.5, (rss, [tree_rss(p) for p in pids])  # both trees, not one
        assert abs(rss - both) < 0.2 * both, (rss, both)
    finally:
        agent.stop()


def _settings(*argv: str):
    return settings_from_args(build_parser().parse_args(["run", "--config-dir=/c", "--cache-dir=/d", *argv]))


def test_server_processes_flag(capsys):
    assert _settings().server_processes == 1
    assert _settings("--server-processes", "3").server_processes == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            _settings("--server-processes", bad)
        assert "--server-processes" in capsys.readouterr().err
    for other in (("--server-url", "http://127.0.0.1:9"), ("--server", "triton")):
        with pytest.raises(SystemExit) as e:
            _settings("--server-processes", "2", *other)
        assert "--server-processes" in str(e.value) and other[0] in str(e.value), str(e.value)


def _grpc_input(rows: list[list[float]]):
    import numpy as np
    import tritonclient.grpc as tg

    data = np.asarray(rows, dtype=np.float64)
    inp = tg.InferInput("x", list(data.shape), "FP64")
    inp.set_data_from_numpy(data)
    return [inp]


def test_grpc_calls_go_to_the_process_holding_the_model(shared_two_shards):
    import tritonclient.grpc as tg

    agent, _ = shared_two_shards
    client = tg.InferenceServerClient(agent.grpc_target)
    try:
        for name in "ab":  # one on each process: the other would answer NOT_FOUND (the agent: UNAVAILABLE)
            assert client.infer(name, _grpc_input(ROWS)).get_response().model_name == name
            assert client.get_model_metadata(name).name == name
    finally:
        client.close()


def test_two_first_loads_at_once_import_the_runtime_in_one_process(tmp_path: Path):
    """Two sklearn models' first requests at once on a fresh agent (lazy loads, which never wait
    for each other's memory windows): the second load goes to the process already importing
    sklearn for the first, instead of importing it in the other process at the same time; so
    the ledger's import figure is one import, not two seen at once."""
    from concurrent.futures import ThreadPoolExecutor

    store = tmp_path / "store"
    models = []
    for i, name in enumerate(("m0", "m1")):
        write_sklearn_model(store / name, kind="tree", seed=i, pad_bytes=8 * 2**20)
        models.append({"name": name, "uri": str(store / name), "memory": "9Mi", "preload": False})
    agent = _start(tmp_path, models, "--server-processes", "2", "--host-memory", "800Mi", "--load-concurrency", "2")
    try:
        with ThreadPoolExecutor(2) as pool:
            codes = list(pool.map(lambda n: agent.post(f"/v2/models/{n}/infer", v2_request(ROWS))[0], ("m0", "m1")))
        assert codes == [200, 200], codes
        assert len(set(_placement(agent).values())) == 1, agent.status()["server"]
        imported = agent.status()["ledger"]["runtime_imports"]["sklearn"]["host"]
        assert 10 * 2**20 < imported < 130 * 2**20, imported  # one import (~85 MiB here), not two
    finally:
        agent.stop()


def test_a_blocking_load_excuses_the_probes_of_its_own_server_process_only(tmp_path: Path) -> None:
    """MLServer runs a load on its event loop: while one blocks it (time.sleep, as a big
    joblib.load does) a probe of that process goes unanswered, and the adapter names the load
    it is busy with (the agent then does not count it: agent/health.py). The other process's
    probe is never excused by it: frozen (SIGSTOP) with nothing in flight, it is plain busy."""
    import asyncio

    from agent.runtimes.base import ServedModel
    from agent.runtimes.shards import ShardedAdapter
    from tests.support.servers import start_server

    write_slow_model(tmp_path / "store" / "big", delay=0.0, load_block=5.0)
    big = ServedModel("big", tmp_path / "store" / "big", "mlserver", implementation=SLOW_IMPLEMENTATION)
    srv = start_server(lambda: ShardedAdapter(tmp_path / "repository", 2), tmp_path / "repository")

    async def scenario() -> tuple[int, list, list]:
        adapter = srv.adapter
        load = asyncio.create_task(adapter.load(big))
        await asyncio.sleep(1.0)  # sent, and its process is blocked in it
        i = adapter.shard_of("big")
        other = adapter.shards[1 - i].process.pid
        os.kill(other, signal.SIGSTOP)
        try:
            during = await adapter.probe()  # 2 s timeout each, both at once
        finally:
            os.kill(other, signal.SIGCONT)
        await load
        return i, during, await adapter.probe()

    try:
        i, during, after = srv.call(scenario(), timeout=60)
    finally:
        srv.stop()
    assert during[i].state == "busy" and during[i].excused and during[i].busy_with == ("big",), during
    assert during[1 - i].state == "busy" and not during[1 - i].excused, during
    assert [p.state for p in after] == ["up", "up"] and not any(p.excused for p in after), after


def test_quick_loads_go_to_the_first_server_process_and_slow_ones_spread(tmp_path: Path):
    """The choice alone (no process started: a pid is None): a model whose last load was quick,
    or before any timed load a small one, goes to shard 0 whatever the others hold; a slow or
    big one goes to the shard with the fewest loads in flight and least memory, as before."""
    from agent.runtimes.shards import QUICK_BYTES, QUICK_LOAD_S, SLOW_LOAD_S, ShardedAdapter

    shards = ShardedAdapter(tmp_path / "repo", 2)
    shards.reserved = lambda: {"big0": 50 * 2**20}
    shards.server_pid_for("big0", runtime="sklearn", place=True, size=50 * 2**20)
    assert shards.shard_of("big0") == 0
    shards._end_import("big0", "sklearn", 0, True)
    shards.server_pid_for("big1", runtime="sklearn", place=True, size=50 * 2**20)  # shard 0 holds more
    assert shards.shard_of("big1") == 1
    shards._end_import("big1", "sklearn", 1, True)
    shards.reserved = lambda: {"big0": 50 * 2**20, "big1": 60 * 2**20}
    shards._loading[0] = 1  # shard 0 also busy loading: a quick model still goes there
    # small, also when its last load read a busy server's wall; big with a quick load
    for name, load_s, size in (("tiny", None, QUICK_BYTES - 1), ("tiny-busy", QUICK_LOAD_S * 2, 2**10),
                               ("fast", QUICK_LOAD_S / 2, 50 * 2**20)):
        shards.server_pid_for(name, runtime="sklearn", place=True, load_s=load_s, size=size)
        assert shards.shard_of(name) == 0, name
    # slow by its last load though small; big with a slower load; unknown size and time: not
    # quick (the rule of before)
    for name, load_s, size in (("slow", SLOW_LOAD_S, 2**10), ("big", QUICK_LOAD_S, 50 * 2**20), ("unknown", None, None)):
        shards.server_pid_for(name, runtime="sklearn", place=True, load_s=load_s, size=size)
        assert shards.shard_of(name) == 1, name
    # while shard 1 imports a runtime shard 0 has not, a quick model of it goes there too:
    # never two imports at once (the ledger measures one from a process's first load)
    shards.server_pid_for("xgb-big", runtime="xgboost", place=True, size=50 * 2**20)
    assert shards.shard_of("xgb-big") == 1
    shards.server_pid_for("xgb-tiny", runtime="xgboost", place=True, size=2**10)
    assert shards.shard_of("xgb-tiny") == 1


def test_tiny_models_stay_in_the_first_server_process_which_alone_imports_the_runtime(tmp_path: Path):
    """--server-processes 2 with tiny models only: every one is loaded in the first process,
    and the second holds nothing and never imports the runtime (its memory stays below the
    first's by about the import). The ledger charges the import and the allocator reserve
    once, for the first process only: what the server really holds (not once per process:
    ~80 MiB + the reserve of budget for nothing)."""
    store = tmp_path / "store"
    models = []
    for i, name in enumerate(("t0", "t1", "t2")):
        write_sklearn_model(store / name, seed=i)
        models.append({"name": name, "uri": str(store / name), "memory": "10Mi"})  # declared: not what counts
    agent = _start(tmp_path, models, "--server-processes", "2", "--host-memory", "800Mi")
    try:
        agent.wait_for(lambda s: all(s["models"][n]["state"] == "loaded" for n in ("t0", "t1", "t2")), 60, "loaded")
        processes = agent.status()["server"]["processes"]
        assert [p["models"] for p in processes] == [["t0", "t1", "t2"], []], processes
        ledger = agent.wait_for(lambda s: "sklearn" in s["ledger"]["runtime_imports"], 30, "import charged")["ledger"]
        imported = ledger["runtime_imports"]["sklearn"]["host"]
        assert imported > 10 * 2**20, ledger
        rss = [tree_rss(p["pid"]) for p in processes]
        assert rss[1] < rss[0] - imported / 2, (rss, imported)  # the second process never imported sklearn
        keep = ledger["malloc_keep"]
        assert keep["host"] == keep["per_process"] > 0 and keep["processes"] == 1, ledger  # the second frees no heap
        assert ledger["devices"]["host"]["overhead"] == imported + keep["host"], ledger
        assert ledger["runtime_imports"]["sklearn"]["processes"] == 1, ledger
        for name in ("t0", "t1", "t2"):
            code, doc = agent.post(f"/v2/models/{name}/infer", v2_request(ROWS))
            assert code == 200 and doc["model_name"] == name, (code, doc)
    finally:
        agent.stop()


def test_a_quick_load_waiting_for_its_turn_is_charged_no_second_import(tmp_path: Path):
    """--server-processes 2: a tiny model's load goes to the first process while that one holds
    its runtime, which is known at its admission, before the load is placed (it waits for a load
    slot meanwhile): the ledger charges no import for the second process, which never imports
    it. Charged, a miss on a full node would need room for ~80 MiB more than it loads."""
    store = tmp_path / "store"
    write_sklearn_model(store / "t0", seed=0)
    write_sklearn_model(store / "t1", seed=1)
    gate = tmp_path / "gate"
    write_slow_model(store / "g", delay=0.0, load_gate=gate)  # tiny: quick, so on the first process too
    t0 = {"name": "t0", "uri": str(store / "t0")}
    agent = _start(tmp_path, [t0], "--server-processes", "2")
    try:
        cm = ConfigMapDir(tmp_path / "config")
        g = {"name": "g", "uri": str(store / "g"), "runtime": "mlserver", "implementation": SLOW_IMPLEMENTATION}
        cm.write({"models.yaml": json.dumps({"models": [t0, g]})})
        agent.wait_for(lambda s: s["models"].get("g", {}).get("state") == "loading", 30, "g loading (held by its gate)")
        cm.write({"models.yaml": json.dumps({"models": [t0, g, {"name": "t1", "uri": str(store / "t1")}]})})
        # t1 is admitted (reserved) and waits for the one load slot g holds
        status = agent.wait_for(lambda s: "t1" in s["ledger"]["models"], 30, "t1 admitted")
        charged = []
        for _ in range(5):
            charged.append(status["ledger"]["runtime_imports"]["sklearn"]["processes"])
            assert status["models"]["t1"]["state"] != "loaded", status["models"]["t1"]
            status = agent.status()
        assert charged == [1] * 5, charged
        gate.write_text("go")
        agent.wait_for(lambda s: all(s["models"][n]["state"] == "loaded" for n in ("g", "t1")), 60, "all loaded")
        assert [sorted(p["models"]) for p in agent.status()["server"]["processes"]] == [["g", "t0", "t1"], []]
    finally:
        agent.stop()


def test_a_tiny_model_whose_load_imported_the_runtime_stays_quick_after_an_eviction(tmp_path: Path):
    """--server-processes 2: a tiny model's first load imports the runtime (seconds: the
    import's time, not the model's). Evicted (here by --idle-unload) and asked for again, it
    is still quick and goes back to the first process, which holds the runtime; judged slow by
    that import it went to the emptier second process, which then imported the runtime in the
    middle of traffic (~3 s of CPU, ~80 MiB: benchmarks/results/import_place_ab.md, round 1)."""
    from agent.runtimes.shards import SLOW_LOAD_S

    store = tmp_path / "store"
    write_sklearn_model(store / "t0", seed=0)
    write_sklearn_model(store / "t1", seed=1)
    t0 = {"name": "t0", "uri": str(store / "t0"), "preload": False}  # on demand: --idle-unload applies
    agent = _start(tmp_path, [t0], "--server-processes", "2", "--idle-unload", "1")
    try:
        code, doc = agent.post("/v2/models/t0/infer", v2_request(ROWS))  # its load imports sklearn
        assert code == 200, (code, doc)
        first = agent.status()["models"]["t0"]["load_seconds"]
        assert first >= SLOW_LOAD_S, f"t0's importing load took {first} s: too quick to tell the cases apart"
        cm = ConfigMapDir(tmp_path / "config")  # t1, preloaded, holds memory in the first process
        cm.write({"models.yaml": json.dumps({"models": [t0, {"name": "t1", "uri": str(store / "t1")}]})})
        agent.wait_for(lambda s: s["models"].get("t1", {}).get("state") == "loaded", 60, "t1 loaded")
        agent.wait_for(lambda s: s["models"]["t0"]["state"] == "cached", 30, "t0 unloaded when idle")
        assert _placement(agent) == {"t1": 0}
        code, doc = agent.post("/v2/models/t0/infer", v2_request(ROWS))  # loaded again
        assert code == 200 and doc["model_name"] == "t0", (code, doc)
        assert [sorted(p["models"]) for p in agent.status()["server"]["processes"]] == [["t0", "t1"], []]
    finally:
        agent.stop()


def _evict_and_reload(agent: AgentProcess, name: str) -> None:
    """Wait until --idle-unload unloads `name`, then load it again with a request."""
    agent.wait_for(lambda s: s["models"][name]["state"] == "cached", 30, f"{name} unloaded when idle")
    code, doc = agent.post(f"/v2/models/{name}/infer", v2_request(ROWS))
    assert code == 200 and doc["model_name"] == name, (code, doc)


def test_one_slow_load_of_a_tiny_model_does_not_send_it_away_but_two_do(tmp_path: Path):
    """--server-processes 2: a load's time is the server call's wall, which counts waiting on a
    busy server loop (a tiny model's load, 9-17 ms on average, took over 100 ms now and then
    under bench_peers' small workload: benchmarks/results/import_place_ab2.md).
    A tiny model whose one load was slow (held here by its gate) still goes back to the first
    process when loaded again; sent to the emptier second one, that process imported the runtime
    for it (seconds of CPU, tens of MiB). A model slow at every load spreads from its third on,
    once two timed loads agree (its first imported nothing here either: the runtime was in)."""
    import threading
    import time

    store = tmp_path / "store"
    gate = tmp_path / "gate"
    write_slow_model(store / "g0", delay=0.0)  # imports the runtime in the first process
    write_slow_model(store / "g", delay=0.0, load_gate=gate)  # its first load waits for the gate
    write_slow_model(store / "h", delay=0.0, load_delay=0.3)  # every load slow
    spec = {"runtime": "mlserver", "implementation": SLOW_IMPLEMENTATION}
    models = [{"name": "g0", "uri": str(store / "g0"), **spec},
              *({"name": n, "uri": str(store / n), "preload": False, **spec} for n in ("g", "h"))]
    agent = _start(tmp_path, models, "--server-processes", "2", "--idle-unload", "1")
    try:
        answer: list = []
        first = threading.Thread(target=lambda: answer.append(agent.post("/v2/models/g/infer", v2_request(ROWS))))
        first.start()
        agent.wait_for(lambda s: s["models"]["g"]["state"] == "loading", 30, "g loading (held by its gate)")
        time.sleep(0.4)  # g's load: over SLOW_LOAD_S in the server, however late the call went out
        gate.write_text("go")
        first.join(60)
        assert answer and answer[0][0] == 200, answer
        _evict_and_reload(agent, "g")
        assert _placement(agent)["g"] == 0, _placement(agent)

        loaded_on = []
        agent.post("/v2/models/h/infer", v2_request(ROWS))
        loaded_on.append(_placement(agent)["h"])
        for _ in range(2):
            _evict_and_reload(agent, "h")
            loaded_on.append(_placement(agent)["h"])
        assert loaded_on == [0, 0, 1], loaded_on
    finally:
        agent.stop()
