"""Measurement after load against REAL processes: the RSS delta of a process tree whose child
allocates 200 MB, the floor for tiny deltas, the allocator-reuse rule, overlapping windows not
recorded, persistence for the next load. GPU measurement goes through FakeGpu (see conftest:
no GPU here), attributing usage to the real child's pid so the tree walk is what is tested."""
from __future__ import annotations

import psutil
import pytest

from agent.memory import HOST, Blocked, Cost, InMemoryStore, LargerThanBudget, MemoryManager, tree_rss

from .conftest import GiB, MiB

ALLOC = 200_000_000


def test_tree_rss_sees_the_child(tree):
    before = tree_rss(tree.pid)
    own = psutil.Process(tree.pid).memory_info().rss
    assert before > own  # the child counts too
    tree.send(f"alloc {ALLOC}")
    delta = tree_rss(tree.pid) - before
    assert 0.9 * ALLOC <= delta <= 1.3 * ALLOC, delta


def test_real_load_is_measured_recorded_and_reused(tree):
    store = InMemoryStore()
    mm = MemoryManager({HOST: 4 * GiB}, store=store, server_pid=lambda: tree.pid)
    est = mm.cost_for(key="entry", runtime="sklearn", entry_bytes=10 * MiB)
    assert (est.host, est.method) == (20 * MiB, "estimated")
    mm.reserve("m", est)
    m = mm.start_measure("m")
    tree.send(f"alloc {ALLOC}")  # "the load"
    cost = mm.finish_measure(m, key="entry")
    assert cost.method == "measured"
    assert 0.9 * ALLOC <= cost.host <= 1.3 * ALLOC, cost
    assert mm.reservations()["m"] == cost and mm.used()[HOST] == cost.host
    rec = store.get_meta("entry")["memory"]["default"]
    assert rec["method"] == "measured" and rec["samples"] == 1 and rec["host"] == cost.host
    # the next load of that entry, by a new manager (a restart), starts from the measurement
    mm2 = MemoryManager({HOST: 4 * GiB}, store=store)
    again = mm2.cost_for(key="entry", runtime="sklearn", entry_bytes=10 * MiB)
    assert (again.host, again.method) == (cost.host, "measured")


def test_tiny_delta_is_floored_and_reuse_does_not_lower_the_record(tree):
    store = InMemoryStore()
    mm = MemoryManager({HOST: 4 * GiB}, store=store, server_pid=tree.pid, floor_fraction=0.5)
    est = mm.cost_for(key="k", runtime="sklearn", entry_bytes=100 * MiB)  # 200 MiB estimated
    mm.reserve("m", est)
    m = mm.start_measure("m")  # nothing allocated: delta ~0, as when an allocator reuses memory
    cost = mm.finish_measure(m, key="k")
    rec = store.get_meta("k")["memory"]["default"]
    assert abs(rec["raw_host"]) < 8 * MiB
    assert (cost.host, cost.method) == (100 * MiB, "measured")  # floor: half the estimate

    # a real 200 MB measurement, then a reload whose delta is ~0: the record stays at 200 MB
    mm.release("m")
    mm.reserve("m", mm.cost_for(key="k", runtime="sklearn", entry_bytes=100 * MiB))
    m = mm.start_measure("m")
    tree.send(f"alloc {ALLOC}")
    big = mm.finish_measure(m, key="k").host
    assert big >= 0.9 * ALLOC
    mm.release("m")
    mm.reserve("m", mm.cost_for(key="k", runtime="sklearn", entry_bytes=100 * MiB))
    m = mm.start_measure("m")
    again = mm.finish_measure(m, key="k")
    assert again.host == big
    assert store.get_meta("k")["memory"]["default"]["samples"] == 3


def test_declared_stays_a_floor_after_measurement(tree):
    store = InMemoryStore()
    mm = MemoryManager({HOST: 4 * GiB}, store=store, server_pid=tree.pid)
    est = mm.cost_for(key="k", runtime="sklearn", entry_bytes=MiB, declared_host=1 * GiB)
    assert (est.host, est.method) == (GiB, "declared")
    mm.reserve("m", est)
    m = mm.start_measure("m")
    tree.send(f"alloc {ALLOC}")
    cost = mm.finish_measure(m, key="k")
    assert (cost.host, cost.method) == (GiB, "declared")  # reserved: the declaration
    assert store.get_meta("k")["memory"]["default"]["host"] < GiB  # remembered: the truth


def test_overlapping_windows_and_unloads_are_not_recorded(tree):
    store = InMemoryStore()
    mm = MemoryManager({HOST: 4 * GiB}, store=store, server_pid=tree.pid)
    a = mm.cost_for(key="ka", runtime="sklearn", entry_bytes=10 * MiB)
    b = mm.cost_for(key="kb", runtime="sklearn", entry_bytes=10 * MiB)
    mm.reserve("a", a)
    mm.reserve("b", b)
    ma = mm.start_measure("a")
    mb = mm.start_measure("b")
    tree.send(f"alloc {ALLOC}")  # whose bytes? both windows saw them
    assert mm.finish_measure(ma, key="ka") == a
    assert mm.finish_measure(mb, key="kb") == b
    assert store.get_meta("ka") is None and store.get_meta("kb") is None
    # an unload while measuring spoils the window too
    mm.reserve("victim", Cost(10 * MiB))
    m = mm.start_measure("a")
    mm.begin_unload("victim")
    tree.send("free")
    mm.release("victim")
    assert mm.finish_measure(m, key="ka") == a and store.get_meta("ka") is None


def test_no_server_pid_keeps_the_estimate():
    mm = MemoryManager({HOST: 4 * GiB}, server_pid=None)
    est = mm.cost_for(key="k", runtime="sklearn", entry_bytes=10 * MiB)
    mm.reserve("m", est)
    assert mm.finish_measure(mm.start_measure("m"), key="k") == est
    assert mm.server_rss() is None


def test_gpu_measured_per_device_from_the_tree_pids(tree, fake_gpu):
    store = InMemoryStore()
    budget = {HOST: 4 * GiB, "gpu:0": 8 * GiB, "gpu:1": 8 * GiB}
    mm = MemoryManager(budget, store=store, server_pid=tree.pid, gpu_probe=fake_gpu)
    fake_gpu.by_pid[("gpu:0", tree.pid)] = 300 * MiB  # the server's CUDA context, before the load
    fake_gpu.by_pid[("gpu:0", 999_999_999)] = 5 * GiB  # someone else's process: not ours
    mm.reserve("m", mm.cost_for(key="k", runtime="pytorch", entry_bytes=10 * MiB))
    m = mm.start_measure("m")
    fake_gpu.by_pid[("gpu:1", tree.child_pid)] = 2 * GiB  # the worker (a child) puts it on gpu:1
    cost = mm.finish_measure(m, key="k")
    assert cost.gpu == {"gpu:1": 2 * GiB} and cost.method == "measured"
    assert {tree.pid, tree.child_pid} <= fake_gpu.seen_pids[-1]
    assert mm.used() == {HOST: cost.host, "gpu:0": 0, "gpu:1": 2 * GiB}
    # the next load of the entry reserves on gpu:1
    assert MemoryManager(budget, store=store).cost_for(key="k", runtime="pytorch", entry_bytes=10 * MiB).gpu == {"gpu:1": 2 * GiB}


def test_gpu_falls_back_to_device_usage_when_pids_are_invisible(tree, fake_gpu):
    """NVML in a container lists host-namespace pids: none match ours; use the device delta."""
    mm = MemoryManager({HOST: 4 * GiB, "gpu:0": 8 * GiB, "gpu:1": 8 * GiB}, server_pid=tree.pid, gpu_probe=fake_gpu)
    mm.reserve("m", mm.cost_for(key="k", runtime="pytorch", entry_bytes=10 * MiB))
    fake_gpu.others["gpu:0"] = 1 * GiB
    m = mm.start_measure("m")
    fake_gpu.others["gpu:0"] = 4 * GiB
    assert mm.finish_measure(m, key="k").gpu == {"gpu:0": 3 * GiB}


def test_first_load_of_a_runtime_is_charged_to_the_server(tree):
    """The first sklearn model in a server imports sklearn (~80 MB measured in MLServer): that is
    the server's, not the model's. Real child allocation stands in for the import."""
    store = InMemoryStore()
    mm = MemoryManager({HOST: 4 * GiB}, store=store, server_pid=tree.pid)
    est = mm.cost_for(key="k1", runtime="sklearn", entry_bytes=10 * MiB)
    mm.reserve("first", est)
    m = mm.start_measure("first", runtime="sklearn")
    tree.send(f"alloc {ALLOC}")
    assert mm.finish_measure(m, key="k1") == est  # the model keeps its estimate
    assert store.get_meta("k1") is None  # and nothing is remembered for its entry
    over = mm.overhead()["runtime:sklearn"].host
    assert 0.9 * ALLOC - est.host <= over <= 1.3 * ALLOC
    assert mm.used()[HOST] == est.host + over
    # eviction cannot free the server's share: a need only it blocks is permanent
    mm2_need = Cost(4 * GiB - over + 1)
    mm.release("first")
    with pytest.raises(LargerThanBudget):
        mm.plan_eviction(Cost(5 * GiB), [], model="huge")
    with pytest.raises(Blocked) as ei:
        mm.plan_eviction(mm2_need, [], model="big")
    assert ei.value.permanent and ei.value.blocked_by == {"server": over}
    # the second sklearn model is measured as itself
    mm.reserve("second", mm.cost_for(key="k2", runtime="sklearn", entry_bytes=10 * MiB))
    m = mm.start_measure("second", runtime="sklearn")
    tree.send(f"alloc {ALLOC // 2}")
    second = mm.finish_measure(m, key="k2")
    assert second.method == "measured" and 0.9 * ALLOC / 2 <= second.host <= 1.3 * ALLOC / 2
    # a restarted server pays the same import again: once its size is known (split by the
    # second load) it stays charged across the restart (tests/memory/test_oom_restart.py)
    known = mm.overhead()["runtime:sklearn"]
    mm.reset_server()
    assert mm.overhead() == {"runtime:sklearn": Cost(known.host, dict(known.gpu), "measured")}


def test_measurement_is_remembered_in_the_puller_cache(tree, tmp_path):
    """The real puller Cache is the store: a measurement survives a new Cache object and a new
    manager (an agent restart), and the cache's own annotations of the entry are kept."""
    from puller import Cache

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.joblib").write_bytes(b"\0" * (5 * MiB))
    cache = Cache(tmp_path / "cache")
    entry = cache.ensure(str(model_dir))
    cache.set_meta(entry.key, {"note": "kept"})
    mm = MemoryManager({HOST: 4 * GiB}, store=cache, server_pid=tree.pid, profile="mlserver")
    mm.reserve("m", mm.cost_for(key=entry.key, runtime="sklearn", entry_bytes=entry.size))
    m = mm.start_measure("m")
    tree.send(f"alloc {ALLOC // 4}")
    measured = mm.finish_measure(m, key=entry.key)
    assert measured.method == "measured" and 0.9 * ALLOC / 4 <= measured.host <= 1.3 * ALLOC / 4

    restarted = MemoryManager({HOST: 4 * GiB}, store=Cache(tmp_path / "cache"), profile="mlserver")
    cost = restarted.cost_for(key=entry.key, runtime="sklearn", entry_bytes=entry.size)
    assert (cost.host, cost.method) == (measured.host, "measured")
    assert Cache(tmp_path / "cache").get_meta(entry.key)["note"] == "kept"
