"""Two views of memory (issue 10, items 1 and 3): the ledger checked against reality.

Reality is read from REAL processes: an embedded MLServer holding a model whose ledger figure is
wrong, a process tree whose child allocates on command, and (where this machine lets us create
one) a real cgroup v1 memory cgroup with a limit, in which the kernel really OOM-kills. The
cgroup v2 file format is read from files written by the test (this machine mounts v1).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from agent.memory import HOST, Candidate, Cost, InMemoryStore, MemoryManager
from agent.memory.reality import CgroupMemory, ProcessTracker, RealityCheck
from agent.runtimes.base import ServedModel
from tests.support.models import write_sklearn_model
from tests.support.servers import embedded_mlserver

from .conftest import GiB, MiB, drive_reality_loop


@pytest.mark.timeout(120)
def test_real_usage_over_budget_is_reported_and_relieved_by_lru_eviction(tmp_path):
    """A model whose ledger figure is far too low (declared 10Mi, holds 120 MiB, not measured:
    a stale record) pushes the server's real memory over a 100 MiB budget: excess is reported
    with the drift, relief picks the least recently used model not under a request, and once it
    is unloaded reality is back under the budget."""
    with embedded_mlserver(tmp_path / "srv") as srv:
        mm = MemoryManager({HOST: 100 * MiB}, store=InMemoryStore(), server_pid=lambda: srv.adapter.process.pid)
        reality = mm.reality
        assert reality.check().excess == {}  # the bare server: its baseline
        for name, pad, declared in (("small", 0, 5 * MiB), ("big", 120 * MiB, 10 * MiB), ("busy", 0, 5 * MiB)):
            d = write_sklearn_model(tmp_path / name, seed=len(name), pad_bytes=pad)
            mm.reserve(name, mm.cost_for(key=None, runtime="sklearn", entry_bytes=None, declared_host=declared))
            srv.call(srv.adapter.load(ServedModel(name=name, path=d, runtime="sklearn")))
        report = reality.check()
        assert report.ledger[HOST] == 20 * MiB  # the ledger believes all is well
        assert report.real[HOST] > 120 * MiB, report
        assert report.excess[HOST] >= report.real[HOST] - 100 * MiB and report.reasons[HOST] == "real_over_budget"
        assert report.drift[HOST] == report.ledger[HOST] - report.real[HOST] < -100 * MiB
        assert report.doc()["devices"][HOST]["reason"] == "real_over_budget"
        # "big" by the ledger is only 10Mi: relief takes LRU models until their reservations cover
        # the excess, skipping the one under a request
        cands = [Candidate("busy", last_used=0, loaded_at=0, inflight=1), Candidate("big", last_used=1, loaded_at=0),
                 Candidate("small", last_used=2, loaded_at=0)]
        assert reality.relief(report.excess, cands) == ["big", "small"]
        srv.call(srv.adapter.unload("big"))
        mm.release("big")
        after = reality.check()
        assert after.excess == {} and after.real[HOST] < 100 * MiB, after


def test_tracked_pids_are_read_without_rescanning(tree):
    """Each check reads the known pids; the tree is walked again only when asked (after a load)."""
    tracker = ProcessTracker(tree.pid)
    assert tracker.pids() == {tree.pid, tree.child_pid} and tracker.scans == 1
    before = tracker.rss()
    tree.send(f"alloc {80 * MiB}")
    assert tracker.rss() - before >= 75 * MiB  # the child's growth, seen through the tracked pid
    tracker.pids()
    assert tracker.scans == 1
    tracker.refresh()
    tracker.pids()
    assert tracker.scans == 2


def test_ledger_over_budget_after_a_measurement_is_excess(tree):
    """A measurement larger than reserved pushes the ledger over budget: excess says so (main only
    logged it, and nobody evicted)."""
    mm = MemoryManager({HOST: 100 * MiB}, server_pid=tree.pid)
    mm.reality.check()  # baseline
    mm.reserve("m", Cost(10 * MiB, entry_bytes=5 * MiB, host_floor=MiB))
    w = mm.start_measure("m")
    tree.send(f"alloc {150 * MiB}")
    mm.finish_measure(w, key="k")
    report = mm.reality.check()
    assert report.ledger[HOST] >= 150 * MiB and report.excess[HOST] >= 50 * MiB
    assert mm.reality.excess() == {HOST: report.excess[HOST]}


def test_cgroup_v2_files_are_read(tmp_path):
    """cgroup v2 (this machine mounts v1): working set = memory.current - inactive_file; a working
    set above 90% of memory.max is excess ("cgroup_pressure"); an oom_kill rise is counted once."""
    cg = tmp_path / "kubepods" / "pod"
    cg.mkdir(parents=True)
    (tmp_path / "self").write_text("0::/kubepods/pod\n")

    def write(current: int, inactive: int, oom: int) -> None:
        (cg / "memory.current").write_text(f"{current}\n")
        (cg / "memory.max").write_text(f"{1000 * MiB}\n")
        (cg / "memory.stat").write_text(f"anon {current - inactive}\ninactive_file {inactive}\n")
        (cg / "memory.events").write_text(f"low 0\nhigh 3\nmax 0\noom 0\noom_kill {oom}\n")

    write(950 * MiB, 200 * MiB, 0)
    probe = CgroupMemory.discover(tmp_path, tmp_path / "self")
    assert probe is not None and probe.version == 2 and probe.path == cg
    kills = []
    mm = MemoryManager({HOST: 10_000 * MiB})
    check = RealityCheck(mm, tracker=ProcessTracker(None), cgroup=probe, on_oom_kill=kills.append)
    r = check.check()
    assert r.cgroup.working_set == 750 * MiB and r.excess == {}  # page cache is not pressure
    write(960 * MiB, 10 * MiB, 0)
    r = check.check()
    assert r.excess == {HOST: 50 * MiB} and r.reasons[HOST] == "cgroup_pressure"
    write(300 * MiB, 10 * MiB, 2)
    r = check.check()
    assert kills == [2] and r.oom_kills == 2 and r.last_oom_kill_at is not None
    assert check.check().oom_kills == 2  # counted once


def _own_memory_cgroup() -> Path | None:
    probe = CgroupMemory.discover()
    if probe is None or probe.version != 1:
        return None
    return probe.path


@pytest.mark.timeout(60)
def test_real_cgroup_pressure_then_oom_kill_are_seen(tree):
    """A REAL memory cgroup (v1, child of ours) with a 200 MiB limit holding the tree's child: at
    190 MiB the check reports pressure before the kernel acts; past the limit the kernel
    OOM-kills the child and the check counts it."""
    parent = _own_memory_cgroup()
    if parent is None or not os.access(parent, os.W_OK):
        pytest.skip("no writable cgroup v1 memory hierarchy here to create a limited child cgroup in")
    cg = parent / f"modelshelf-test-{uuid.uuid4().hex[:8]}"
    try:
        cg.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create a memory cgroup: {e}")
    try:
        (cg / "memory.limit_in_bytes").write_text(str(200 * MiB))
        try:
            (cg / "memory.memsw.limit_in_bytes").write_text(str(200 * MiB))
        except OSError:
            pass  # no swap accounting: no swap here either
        (cg / "cgroup.procs").write_text(str(tree.child_pid))
        kills = []
        mm = MemoryManager({HOST: 10_000 * MiB}, server_pid=tree.pid)
        check = RealityCheck(mm, tracker=ProcessTracker(tree.pid), cgroup=CgroupMemory(cg, 1), on_oom_kill=kills.append)
        assert check.check().excess == {}
        tree.send(f"alloc {185 * MiB}")
        r = check.check()
        assert r.reasons.get(HOST) == "cgroup_pressure" and r.excess[HOST] > 0, r
        with pytest.raises(Exception):
            tree.send(f"alloc {100 * MiB}", timeout=20)  # the kernel kills the child: no answer
        r = check.check()
        assert kills and r.oom_kills >= 1, r
    finally:
        try:
            os.kill(tree.child_pid, 9)
        except OSError:
            pass
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                import time

                time.sleep(0.1)


@pytest.mark.timeout(120)
def test_reality_loop_evicts_lru_until_within_never_a_leased_model(tmp_path):
    """The loop the reconciler runs (agent.memory.reality_loop) against a REAL MLServer: a model
    whose ledger figure is far too low pushes real memory over budget; the loop evicts least
    recently used models not under a request, re-checking after each, until reality is within."""
    with embedded_mlserver(tmp_path / "srv") as srv:
        mm = MemoryManager({HOST: 100 * MiB}, store=InMemoryStore(), server_pid=lambda: srv.adapter.process.pid)
        mm.reality.check()  # baseline
        last_used = {}
        for i, (name, pad, declared) in enumerate((("old", 0, 5 * MiB), ("big", 120 * MiB, 10 * MiB), ("busy", 0, 5 * MiB))):
            d = write_sklearn_model(tmp_path / name, seed=i, pad_bytes=pad)
            mm.reserve(name, mm.cost_for(key=None, runtime="sklearn", entry_bytes=None, declared_host=declared))
            srv.call(srv.adapter.load(ServedModel(name=name, path=d, runtime="sklearn")))
            last_used[name] = i
        evicted = drive_reality_loop(mm, srv, last_used, busy="busy")
        assert evicted == ["old", "big"]  # LRU first; "old" alone did not cover the real excess
        assert set(srv.call(srv.adapter.index())) >= {"busy"} and mm.reality.check().excess == {}


def test_another_tenant_of_a_shared_gpu_is_not_counted_as_the_server(fake_gpu):
    """NVML lists none of the server's pids (another PID namespace): the device's used bytes are
    the fallback, but only over what the device used while the ledger held nothing there. A
    neighbour holding 15 GiB of gpu:0 is not the server's (main read it as real excess over an
    8 GiB budget and would have evicted every model for it). FakeGpu: no GPU here (conftest)."""
    mm = MemoryManager({HOST: 10 * 2**30, "gpu:0": 8 * 2**30, "gpu:1": 8 * 2**30}, gpu_probe=fake_gpu)
    check = RealityCheck(mm, tracker=ProcessTracker(os.getpid()), gpu_probe=fake_gpu)
    fake_gpu.others["gpu:0"] = 15 * 2**30  # someone else's process
    r = check.check()
    assert r.real.get("gpu:0") == 0 and "gpu:0" not in r.excess, r
    mm.reserve("m", Cost(MiB, {"gpu:0": 2 * 2**30}))
    fake_gpu.others["gpu:0"] = 17 * 2**30 + 100 * MiB  # our model, invisible by pid, on the same device
    r = check.check()
    assert r.real["gpu:0"] == 2 * 2**30 + 100 * MiB and r.drift["gpu:0"] == -100 * MiB and r.excess == {}, r


def test_an_allocator_reserve_is_drift_only_beyond_its_bound(tree):
    """The ledger counts the embedded server's allocator reserve (--server-malloc-keep) whole; the
    server keeps anywhere from none of it to all of it. Real memory between the ledger without
    the reserve and the ledger with it is no drift; beyond the ledger it is, as always."""
    mm = MemoryManager({HOST: GiB}, server_pid=tree.pid, malloc_keep=40 * MiB)
    mm.reality.check()  # baseline: the bare 'server'
    mm.reserve("m", Cost(20 * MiB))
    tree.send(f"alloc {20 * MiB}")
    tree.send(f"alloc {30 * MiB}")  # the model, and 30 MiB the allocator kept of freed memory
    report = mm.reality.check()
    assert report.ledger[HOST] == 60 * MiB and 45 * MiB <= report.real[HOST] <= 58 * MiB, report
    assert report.drift[HOST] == 0
    tree.send(f"alloc {30 * MiB}")  # past the reserve
    report = mm.reality.check()
    assert report.drift[HOST] == report.ledger[HOST] - report.real[HOST] <= -15 * MiB, report


def test_the_reserve_the_server_reports_is_the_part_of_its_bound_that_is_no_drift(tree):
    """Where the server reports what its allocator keeps now (MLServerAdapter.allocator_reserve),
    drift counts exactly that much of the reserve's line: real memory the reserve does not
    explain is drift, even within the ledger with the whole reserve."""
    kept = {"now": 30 * MiB}
    mm = MemoryManager({HOST: GiB}, server_pid=tree.pid, malloc_keep=40 * MiB, allocator_reserve=lambda: kept["now"])
    mm.reality.check()  # baseline: the bare 'server'
    mm.reserve("m", Cost(20 * MiB))
    tree.send(f"alloc {20 * MiB}")
    tree.send(f"alloc {30 * MiB}")  # the model, and 30 MiB the allocator says it kept
    report = mm.reality.check()
    assert report.ledger[HOST] == 60 * MiB and 45 * MiB <= report.real[HOST] <= 58 * MiB, report
    assert report.drift[HOST] == report.ledger[HOST] - 10 * MiB - report.real[HOST], report  # 10 MiB of the bound unused
    kept["now"] = 5 * MiB  # the same 50 MiB, of which the reserve explains only 5: 25 MiB nobody counts
    report = mm.reality.check()
    assert report.drift[HOST] == report.ledger[HOST] - 35 * MiB - report.real[HOST] <= -15 * MiB, report
