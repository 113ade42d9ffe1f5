"""The container's cgroup as a memory source (issue 10, item 3): ``CgroupMemory.discover()`` and
``read()`` against fake /sys/fs/cgroup trees in the kernel's file formats (v2 and v1; "max" and
huge "no limit" values; missing files), and the agent evicting as the container APPROACHES its
limit, before the kernel's OOM killer acts.

The trees are FakeCgroup dirs (conftest: the kernel's memory.* formats, written by the test):
this machine mounts one cgroup version and its counters move only as the kernel decides. The
eviction test drives a REAL MLServer; only the cgroup's memory.current is the test's, kept equal
to the server's real RSS plus what the rest of the container holds, as the kernel would count it."""
from __future__ import annotations

import threading
import time

import pytest

from agent.memory import HOST, CgroupMemory, InMemoryStore, MemoryManager, ProcessTracker
from agent.runtimes.base import ServedModel
from tests.support.models import write_sklearn_model
from tests.support.servers import embedded_mlserver

from .conftest import FakeCgroup, MiB, drive_reality_loop

V1_NO_LIMIT = 9223372036854771712


def _self(tmp_path, text: str):
    p = tmp_path / "proc-self-cgroup"
    p.write_text(text)
    return p


def test_v2_under_its_own_path_and_at_the_namespace_root(tmp_path):
    root = tmp_path / "sys-fs-cgroup"
    FakeCgroup(root / "kubepods.slice" / "pod1").write(current=300 * MiB, limit=1000 * MiB, inactive_file=100 * MiB, oom_kill=2)
    found = CgroupMemory.discover(root, _self(tmp_path, "0::/kubepods.slice/pod1\n"))
    assert (found.path, found.version) == (root / "kubepods.slice" / "pod1", 2)
    r = found.read()
    assert (r.current, r.limit, r.working_set, r.oom_kills) == (300 * MiB, 1000 * MiB, 200 * MiB, 2)
    # a cgroup namespace: /proc/self/cgroup says "/", the files sit at the mount root
    ns = tmp_path / "ns"
    FakeCgroup(ns).write(current=10 * MiB)
    found = CgroupMemory.discover(ns, _self(tmp_path, "0::/\n"))
    assert (found.path, found.version) == (ns, 2)
    r = found.read()
    assert r.limit is None and r.working_set == 10 * MiB  # "max": no limit


def test_v2_missing_stat_and_events_read_as_zero_and_a_vanished_cgroup_as_none(tmp_path):
    cg = FakeCgroup(tmp_path / "cg").write(current=50 * MiB, limit=100 * MiB)
    (cg.path / "memory.stat").unlink()
    (cg.path / "memory.events").unlink()
    (cg.path / "memory.max").unlink()
    r = CgroupMemory(cg.path, 2).read()
    assert (r.current, r.limit, r.working_set, r.oom_kills) == (50 * MiB, None, 50 * MiB, 0)
    (cg.path / "memory.current").unlink()
    assert CgroupMemory(cg.path, 2).read() is None  # gone: no reading, no exception


def test_v1_under_the_memory_controller_with_its_no_limit_value(tmp_path):
    root = tmp_path / "sys-fs-cgroup"
    FakeCgroup(root / "memory" / "docker" / "abc", version=1).write(current=400 * MiB, limit=None,
                                                                   inactive_file=150 * MiB, oom_kill=1)
    found = CgroupMemory.discover(root, _self(tmp_path, "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n"))
    assert (found.path, found.version) == (root / "memory" / "docker" / "abc", 1)
    r = found.read()
    assert (r.current, r.limit, r.working_set, r.oom_kills) == (400 * MiB, None, 250 * MiB, 1)
    # an old kernel's memory.oom_control has no oom_kill line; memory.stat without total_*
    (found.path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")
    (found.path / "memory.stat").write_text("cache 0\nrss 1\ninactive_file 4096\n")
    (found.path / "memory.limit_in_bytes").write_text(f"{512 * MiB}\n")
    r = found.read()
    assert (r.limit, r.working_set, r.oom_kills) == (512 * MiB, 400 * MiB - 4096, 0)


def test_no_memory_cgroup_is_none_and_a_wrong_memory_cgroup_is_said(tmp_path):
    assert CgroupMemory.discover(tmp_path / "nothing", _self(tmp_path, "0::/x\n")) is None
    with pytest.raises(ValueError, match="--memory-cgroup .*nothing.*memory.current"):
        CgroupMemory.at(tmp_path / "nothing")
    assert CgroupMemory.at(FakeCgroup(tmp_path / "v1", version=1).write(current=1).path).version == 1


@pytest.mark.timeout(120)
def test_approaching_the_container_limit_evicts_before_the_oom(tmp_path):
    """Three models really held by MLServer; the container's limit is set so that the working set
    sits above 90% of it (but below 100%: the kernel has not killed yet). The reality loop evicts
    least recently used models (reason cgroup_pressure) until the working set is back under 90%,
    never the one under a request, and the working set never reaches the limit. The budget by
    itself (1000 MiB) would evict nothing."""
    other = 200 * MiB  # the rest of the container (the agent, page cache that cannot be reclaimed)
    cg = FakeCgroup(tmp_path / "cgroup").write(current=other)
    with embedded_mlserver(tmp_path / "srv") as srv:
        tracker = ProcessTracker(lambda: srv.adapter.process.pid)
        mm = MemoryManager({HOST: 1000 * MiB}, store=InMemoryStore(), server_pid=lambda: srv.adapter.process.pid,
                           reality_options={"cgroup_dir": cg.path})
        peak = [0]
        stop = threading.Event()
        limit: list[int | None] = [None]

        def kernel() -> None:  # memory.current = the server's real RSS + the rest, as the kernel counts it
            while not stop.is_set():
                current = (tracker.rss() or 0) + other
                peak[0] = max(peak[0], current)
                cg.write(current=current, limit=limit[0])
                time.sleep(0.02)

        t = threading.Thread(target=kernel, daemon=True)
        t.start()
        try:
            mm.reality.check()  # the bare server
            last_used = {}
            for i, name in enumerate(("old", "older_used_later", "busy")):
                d = write_sklearn_model(tmp_path / name, seed=i, pad_bytes=30 * MiB)
                mm.reserve(name, mm.cost_for(key=None, runtime="sklearn", entry_bytes=None, declared_host=31 * MiB))
                srv.call(srv.adapter.load(ServedModel(name=name, path=d, runtime="sklearn")))
                last_used[name] = i
            last_used["older_used_later"], last_used["old"] = 0, 1  # LRU order: older_used_later, old, busy
            time.sleep(0.1)
            loaded = (tracker.rss() or 0) + other
            limit[0] = int((loaded - 45 * MiB) / 0.9)  # 90% of the limit: 45 MiB below what is held now
            time.sleep(0.1)
            assert mm.reality.check().reasons.get(HOST) == "cgroup_pressure"
            evicted = drive_reality_loop(mm, srv, last_used, busy="busy", interval_s=0.1)
            assert evicted == ["older_used_later", "old"], evicted
            r = mm.reality.check()
            assert r.excess == {} and r.cgroup.working_set <= 0.9 * limit[0], r
            assert peak[0] < limit[0]  # the kernel's limit was never reached: no OOM kill
            assert set(srv.call(srv.adapter.index())) >= {"busy"}
        finally:
            stop.set()
            t.join(5)
