"""The ledger with several server processes (--server-processes N, agent/runtimes/shards.py):
the pid it tracks is a tuple, each process imports a runtime on its first model of it, and the
import is charged once per process. Two real process trees stand in for two servers (the
conftest's ProcessTree: a child that holds the bytes it is told to)."""
from __future__ import annotations

import pytest

from agent.memory import HOST, InMemoryStore, MemoryManager
from agent.memory.cost import Cost

from .conftest import GiB, MiB, ProcessTree


@pytest.fixture
def two_trees():
    trees = [ProcessTree(), ProcessTree()]
    try:
        yield trees
    finally:
        for t in trees:
            t.close()


def test_a_later_process_first_load_beside_another_process_unload_keeps_the_import_charged(two_trees):
    """Process 1's first sklearn load measures the import (~80 MiB here); process 2's first
    sklearn load happens while process 1 frees as much (an unload beside it): its growth reads
    ~0, which must not become the import's figure, charged for both processes."""
    t1, t2 = two_trees
    mm = MemoryManager({HOST: 8 * GiB}, store=InMemoryStore(), server_pid=lambda: (t1.pid, t2.pid), server_processes=2,
                       min_residency_s=0.0)
    mm.reserve("a", Cost(10 * MiB, {}, "declared"))
    w = mm.start_measure("a", runtime="sklearn", server_pid=t1.pid)
    t1.send(f"alloc {90 * MiB}")  # the import + model a
    mm.finish_measure(w, key="key-a")
    imported = mm.overhead()["runtime:sklearn"].host
    assert 70 * MiB < imported < 100 * MiB, imported

    mm.reserve("b", Cost(10 * MiB, {}, "declared"))
    w = mm.start_measure("b", runtime="sklearn", server_pid=t2.pid)
    assert w.first_of_runtime  # process 2 has not imported sklearn yet
    t2.send(f"alloc {90 * MiB}")  # its own import + model b
    t1.send("free")  # meanwhile process 1 gives back as much
    mm.finish_measure(w, key="key-b")
    assert mm.overhead()["runtime:sklearn"].host == imported
    assert mm.used()[HOST] >= 2 * imported + 20 * MiB  # the import once per process, and both models


def test_one_process_restarting_keeps_the_others_import_and_baseline(two_trees):
    """Process 2 of 2 restarts (a new pid, bare): process 1 still holds its import and models,
    so the import stays charged (once per process: the reloads into the new one pay it again),
    and the server's baseline is process 1's, kept, plus the new process's bare RSS."""
    t1, t2 = two_trees
    pids = [t1.pid, t2.pid]
    mm = MemoryManager({HOST: 8 * GiB}, store=InMemoryStore(), server_pid=lambda: tuple(pids), server_processes=2,
                       min_residency_s=0.0)
    base1 = mm.server_baseline(t1.pid)
    assert base1, "each process's bare baseline is noted when the ledger is built"
    mm.reserve("a", Cost(10 * MiB, {}, "declared"))
    w = mm.start_measure("a", runtime="sklearn", server_pid=t1.pid)
    t1.send(f"alloc {90 * MiB}")
    mm.finish_measure(w, key="key-a")
    imported = mm.overhead()["runtime:sklearn"].host
    assert imported > 50 * MiB, imported

    t3 = ProcessTree()  # process 2 restarted: a new, bare process
    try:
        pids[1] = t3.pid
        mm.reset_server()
        assert mm.overhead()["runtime:sklearn"].host == imported
        assert mm.used()[HOST] >= 2 * imported + 10 * MiB
        assert mm.server_baseline(tuple(pids)) == base1 + mm.server_baseline(t3.pid)  # not process 1's RSS now
    finally:
        t3.close()
