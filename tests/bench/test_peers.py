"""benchmarks/bench_peers.py: what its figures and verdicts rest on (never its timings).

- The verdicts apply issue 13's goals exactly (small: p95 <= 0.8x and p50 <= 0.5x Ray's; big:
  both <= Ray's; hits: throughput >= 3x Ray's), on the medians of the rounds.
- With --alt-agent-arg, the second agent is compared with the first round by round (the same
  sequence), and called better only when it is better in every round.
- The cold-start breakdown reads every `modelshelf_*_seconds` histogram that moved, labelled
  ones included, so phases the agent adds later are reported without a change to the benchmark.
- Every agent gets the same room for models: its budget adds one runtime import per server
  process and the allocator reserve the agent itself takes out of that budget (its default, or
  --server-malloc-keep x N), so what the agent leaves for models is the room asked for.
- The Ray side does the same work as MLServer: for the same V2 request on the same model files
  it answers the same predictions, holds at most `--max-models` (the LRU one is loaded again),
  and counts a request that waited for a load as a cold start. Needs `.venv-ray` (`make ray`):
  skipped with that reason without it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_peers
from benchmarks.common import StandaloneMLServer, http
from tests.support.models import sample_rows, sklearn_predictions, write_sklearn_model


def _passes(workload: str, ms: dict, ray: dict, rounds: int = 3) -> dict:
    passes = []
    for r in range(1, rounds + 1):
        passes.append({"system": "modelshelf", "round": r, **ms})
        passes.append({"system": "ray", "round": r, **ray})
    return {"workload": workload, "passes": passes, "summary": bench_peers.summarize(passes)}


@pytest.mark.parametrize("workload, ms, ray, expected", [
    ("small", {"p50_ms": 5.0, "p95_ms": 80.0, "rps": 1}, {"p50_ms": 10.0, "p95_ms": 100.0, "rps": 1}, "met"),
    ("small", {"p50_ms": 5.1, "p95_ms": 80.0, "rps": 1}, {"p50_ms": 10.0, "p95_ms": 100.0, "rps": 1}, "missed"),
    ("small", {"p50_ms": 5.0, "p95_ms": 81.0, "rps": 1}, {"p50_ms": 10.0, "p95_ms": 100.0, "rps": 1}, "missed"),
    ("big", {"p50_ms": 10.0, "p95_ms": 100.0, "rps": 1}, {"p50_ms": 10.0, "p95_ms": 100.0, "rps": 1}, "met"),
    ("big", {"p50_ms": 9.0, "p95_ms": 101.0, "rps": 1}, {"p50_ms": 10.0, "p95_ms": 100.0, "rps": 1}, "missed"),
    ("hits", {"p50_ms": 1.0, "p95_ms": 1.0, "rps": 300.0}, {"p50_ms": 1.0, "p95_ms": 1.0, "rps": 100.0}, "met"),
    ("hits", {"p50_ms": 1.0, "p95_ms": 1.0, "rps": 299.0}, {"p50_ms": 1.0, "p95_ms": 1.0, "rps": 100.0}, "missed"),
])
def test_verdicts_apply_the_issue_goals(workload, ms, ray, expected):
    v = bench_peers.verdict(_passes(workload, ms, ray))
    assert v["verdict"] == expected, v
    assert v["rounds_meeting_goal"] == ("3 of 3" if expected == "met" else "0 of 3")


def test_verdict_uses_the_median_round_not_the_best():
    w = _passes("hits", {"p50_ms": 1.0, "p95_ms": 1.0, "rps": 100.0}, {"p50_ms": 1.0, "p95_ms": 1.0, "rps": 100.0})
    for p, rps in zip((p for p in w["passes"] if p["system"] == "modelshelf"), (1000.0, 250.0, 200.0)):
        p["rps"] = rps  # one lucky round at 10x; the median round is 2.5x
    w["summary"] = bench_peers.summarize(w["passes"])
    v = bench_peers.verdict(w)
    assert (v["verdict"], v["ratios"]["throughput_ratio"], v["rounds_meeting_goal"]) == ("missed", 2.5, "1 of 3")


def test_the_alt_agent_is_compared_round_by_round_and_better_only_if_better_in_every_round():
    base = {"p50_ms": 100.0, "rps": 30.0, "others_cpu_s": 1.0}
    passes = [{"system": "modelshelf", "round": r, "misses": 200, "p95_ms": 400.0, **base} for r in (1, 2, 3)]
    passes += [{"system": "modelshelf-alt", "round": r, "misses": 180, "p95_ms": p95, **base}
               for r, p95 in ((1, 300.0), (2, 390.0), (3, 401.0))]
    data = {"settings": {"alt_agent_arg": ["--eviction=lfu-decay"]}, "workloads": [{"workload": "big", "passes": passes}]}
    lines = bench_peers.alt_comparison(data)
    assert "| big | 1 | 200 → 180 | 0.900 | 1.000 | 0.750 | 1.000 | 1.0 / 1.0 |" in lines
    assert lines[-1] == "- big: fewer misses in 3 of 3 rounds, lower p95 in 2 of 3 rounds → **not better in every round**"
    passes[-1]["p95_ms"] = 399.0
    assert bench_peers.alt_comparison(data)[-1].endswith("lower p95 in 3 of 3 rounds → **better**")
    assert bench_peers.alt_comparison({"settings": {"alt_agent_arg": []}, "workloads": []}) == []


def test_breakdown_reads_every_histogram_that_moved_labels_included():
    m0 = {"modelshelf_cold_start_seconds_count": 10, "modelshelf_cold_start_seconds_sum": 1.0,
          "modelshelf_load_seconds_count": 4, "modelshelf_load_seconds_sum": 0.4,
          'modelshelf_cold_start_phase_seconds_count{phase="queue"}': 0,
          'modelshelf_cold_start_phase_seconds_sum{phase="queue"}': 0.0}
    m1 = {"modelshelf_cold_start_seconds_count": 14, "modelshelf_cold_start_seconds_sum": 1.2,
          "modelshelf_load_seconds_count": 4, "modelshelf_load_seconds_sum": 0.4,
          'modelshelf_cold_start_phase_seconds_count{phase="queue"}': 2,
          'modelshelf_cold_start_phase_seconds_sum{phase="queue"}': 0.006,
          'modelshelf_requests_total{model="a",code="200"}': 9}
    assert bench_peers.histogram_deltas(m0, m1) == {
        "cold_start": {"count": 4, "mean_ms": 50.0},
        'cold_start_phase{phase="queue"}': {"count": 2, "mean_ms": 3.0},
    }
    # the tail: how many took over 100 ms, from the 0.1 s bucket (as prometheus_client writes it: le first)
    m0.update({'modelshelf_cold_start_seconds_bucket{le="0.1"}': 8,
               'modelshelf_cold_start_phase_seconds_bucket{le="0.1",phase="queue"}': 0})
    m1.update({'modelshelf_cold_start_seconds_bucket{le="0.1"}': 11,
               'modelshelf_cold_start_phase_seconds_bucket{le="0.1",phase="queue"}': 2})
    deltas = bench_peers.histogram_deltas(m0, m1)
    assert deltas["cold_start"]["over_100ms"] == 1 and deltas['cold_start_phase{phase="queue"}']["over_100ms"] == 0


@pytest.fixture(scope="module")
def three_models(tmp_path_factory) -> list[Path]:
    store = tmp_path_factory.mktemp("peers-store")
    return [write_sklearn_model(store / f"m{i}", "iris-logreg", seed=i) for i in range(3)]


@pytest.mark.slow
@pytest.mark.skipif(not (bench_peers.RAY_VENV / "bin" / "python").exists(),
                    reason=".venv-ray is missing (`make ray` creates it; Ray never runs in .venv)")
def test_ray_app_does_the_work_mlserver_does(three_models, tmp_path):
    rows = sample_rows(6, seed=3)
    expected = {d.name: sklearn_predictions(d, rows) for d in three_models}
    assert len({tuple(v) for v in expected.values()}) > 1, "the models must disagree, or a mix-up would pass"
    body = json.dumps({"inputs": [{"name": "x", "shape": [len(rows), 4], "datatype": "FP64",
                                   "data": [v for row in rows for v in row]}]}).encode()
    headers = {"content-type": "application/json"}

    def infer(url: str, name: str) -> dict:
        status, out = http("POST", f"{url}/v2/models/{name}/infer", body, headers, timeout=120)
        assert status == 200, out[:300]
        return json.loads(out)

    mlserver = StandaloneMLServer(tmp_path / "mlserver", {d.name: d for d in three_models})
    try:
        mlserver.wait_ready(120)
        reference = {d.name: infer(mlserver.url, d.name)["outputs"][0] for d in three_models}
    finally:
        mlserver.stop()
    ray = bench_peers.RayServe(tmp_path / "ray", three_models[0].parent, max_models=2).wait_ready(240)
    try:
        order = ["m0", "m1", "m2", "m0", "m0"]  # m2 evicts m0 (LRU, 2 held); m0 is loaded again, then a hit
        answers = [(name, infer(ray.url, name)) for name in order]
        stats = ray.stats()
    finally:
        ray.stop()
    for name, answer in answers:
        out = answer["outputs"][0]
        assert answer["model_name"] == name
        assert out["data"] == expected[name] == reference[name]["data"]
        assert (out["name"], out["datatype"], out["shape"]) == (reference[name]["name"], reference[name]["datatype"], reference[name]["shape"])
    assert (stats["loads"], stats["waits"]) == (4, 4), stats


@pytest.mark.parametrize("args", [[], ["--server-processes=2"], ["--server-processes", "3", "--server-malloc-keep=64Mi"],
                                  ["--server-malloc-keep", "0"]])
@pytest.mark.parametrize("room_mib", [300, 2000])  # under and over the default reserve's cap
@pytest.mark.parametrize("holding", [None, 1])  # all processes hold models; only the first (tiny models)
def test_each_agent_budget_leaves_the_same_room_for_models_after_imports_and_its_reserve(args, room_mib, holding):
    """The agent charges a runtime import and an allocator reserve for each server process that
    holds models (all N, or only the first with tiny models): the budget adds those, no more."""
    from agent.memory.budget import default_malloc_keep
    from agent.quantity import parse_quantity
    from agent.settings import DEFAULT_SERVER_MALLOC_KEEP

    overhead, room = 85 * 2**20, room_mib * 2**20
    budget, reserve = bench_peers.agent_budget(args, overhead, room, reserve=True, holding=holding)
    n = bench_peers.server_processes(args)
    h = n if holding is None else holding
    keep = [a.split("=", 1)[1] if "=" in a else args[i + 1] for i, a in enumerate(args) if a.startswith("--server-malloc-keep")]
    # what `modelshelf run` computes from that budget (agent.cli), charged for each process holding models
    per_process = parse_quantity(keep[0]) if keep else default_malloc_keep(budget, DEFAULT_SERVER_MALLOC_KEEP * n) // n
    assert reserve == per_process * h
    assert budget - reserve - h * overhead == room
    assert bench_peers.agent_budget(args, overhead, room, reserve=False, holding=holding) == (room + h * overhead, 0)
    assert reserve > 0 or keep == ["0"]


def test_tiny_models_are_held_by_the_first_server_process_only(tmp_path):
    """Quick models (files under shards.QUICK_BYTES) all go to the first process: the budget
    counts one process's import and reserve for them; a big one spreads over all N."""
    from agent.runtimes.shards import QUICK_BYTES

    tiny, big = tmp_path / "tiny", tmp_path / "big"
    for d, size in ((tiny, 2**10), (big, QUICK_BYTES + 1)):
        d.mkdir()
        (d / "model.joblib").write_bytes(b"x" * size)
    args = ["--server-processes=2"]
    assert bench_peers.processes_holding(args, [tiny]) == 1
    assert bench_peers.processes_holding(args, [tiny, big]) == 2
    assert bench_peers.processes_holding([], [big]) == 1


def test_the_memory_at_a_pass_end_shows_the_runtime_import_charged_per_process():
    """The results say what the agent charges for each runtime's import (a wrong figure costs
    every server process its room: peers.notes.md, 2026-12-03), beside its ledger and reality."""
    from benchmarks.bench_peers import _memory_note, memory_view

    status = {"models": {"a": {"state": "loaded"}, "b": {"state": "cached"}}, "memory": {"host": {"budget": 100 * 2**20}},
              "ledger": {"devices": {"host": {"used": 80 * 2**20}}, "runtime_imports": {"sklearn": {"host": 89 * 2**20}}},
              "reality": {"devices": {"host": {"real": 70 * 2**20, "excess": 0}}}}
    mem = memory_view(status)
    assert mem["loaded"] == 1 and mem["runtime_imports"] == {"sklearn": 89 * 2**20}
    assert "sklearn import 89.0 MiB per server process" in _memory_note(mem)
    assert "per server process 1/" not in _memory_note(mem)  # one server: no split to show
    status["server"] = {"processes": [{"models": ["a", "c"]}, {"models": []}]}  # --server-processes 2
    assert _memory_note(memory_view(status)).endswith("models per server process 2/0")
