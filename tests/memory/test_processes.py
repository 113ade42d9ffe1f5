"""The ledger with several server processes (--server-processes N, agent/runtimes/shards.py):
the pid it tracks is a tuple, each process imports a runtime on its first model of it, and the
import is charged once per process that loaded it or may load it for a load admitted (not per
process of the server: a process holding only other runtimes' models, or nothing, never
imported it); the allocator reserve likewise, once per process that loaded any model or may
for a load admitted. Two real process trees stand in for two servers (the conftest's ProcessTree: a
child that holds the bytes it is told to)."""
from __future__ import annotations

import threading
import time

import pytest

from agent.memory import HOST, DoesNotFit, InMemoryStore, MemoryManager
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
    sklearn load happens while process 1 frees as much (an unload beside it): process 2's
    window measures process 2 alone, so its figure is the import again, never ~0, charged for
    both processes."""
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
    so its import stays charged (process 2 never loaded sklearn: it is charged none), and the
    server's baseline is process 1's, kept, plus the new process's bare RSS."""
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
        assert mm.used()[HOST] == imported + mm.reservations()["a"].host
        assert mm.server_baseline(tuple(pids)) == base1 + mm.server_baseline(t3.pid)  # not process 1's RSS now
    finally:
        t3.close()


def test_a_first_load_beside_another_process_load_is_charged_its_own_import_only(two_trees):
    """Both processes' first sklearn loads run at once (as --server-processes 2 starts its
    first two models side by side): each window measures its own process, so the import is
    charged ~80 MiB per process, not the two loads' growth together (~170 MiB, twice over:
    a whole forest of room lost per process, for good, in benchmarks/results/peers.notes.md)."""
    t1, t2 = two_trees
    mm = MemoryManager({HOST: 8 * GiB}, store=InMemoryStore(), server_pid=lambda: (t1.pid, t2.pid), server_processes=2,
                       min_residency_s=0.0)
    mm.reserve("a", Cost(10 * MiB, {}, "declared"))
    mm.reserve("b", Cost(10 * MiB, {}, "declared"))
    wa = mm.start_measure("a", runtime="sklearn", server_pid=t1.pid)
    wb = mm.start_measure("b", runtime="sklearn", server_pid=t2.pid)
    assert wa.first_of_runtime and wb.first_of_runtime
    t1.send(f"alloc {90 * MiB}")  # process 1: the import + model a
    t2.send(f"alloc {90 * MiB}")  # process 2, meanwhile: its import + model b
    mm.finish_measure(wa, key="key-a")
    mm.finish_measure(wb, key="key-b")
    imported = mm.overhead()["runtime:sklearn"].host
    assert 70 * MiB < imported < 100 * MiB, imported / MiB
    assert mm.used()[HOST] < 2 * 100 * MiB + 20 * MiB


def test_a_load_into_a_process_importing_its_runtime_waits_for_the_import_to_end(two_trees):
    """A runtime's first load in a process measures its import; a second load into the same
    process waits for that window to close (past measure_wait_s), so its model is not charged
    to the import for good. Loads into the other process do not wait."""
    t1, t2 = two_trees
    mm = MemoryManager({HOST: 8 * GiB}, store=InMemoryStore(), server_pid=lambda: (t1.pid, t2.pid), server_processes=2,
                       min_residency_s=0.0, measure_wait_s=0.2, import_wait_s=30.0)
    for name in ("a", "b", "c"):
        mm.reserve(name, Cost(10 * MiB, {}, "declared"))
    wa = mm.start_measure("a", runtime="sklearn", server_pid=t1.pid)
    opened = threading.Event()

    def second_load():  # model b's load into process 1: its model grows process 1 once its window opens
        wb = mm.start_measure("b", runtime="sklearn", server_pid=t1.pid)
        opened.set()
        t1.send(f"alloc {40 * MiB}")
        mm.finish_measure(wb, key="key-b")

    th = threading.Thread(target=second_load)
    th.start()
    try:
        wc = mm.start_measure("c", runtime="sklearn", server_pid=t2.pid)  # the other process: at once
        mm.abort_measure(wc)
        assert not opened.wait(0.6), "a load into the importing process opened its window beside the import"
        t1.send(f"alloc {90 * MiB}")  # the import + model a
        mm.finish_measure(wa, key="key-a")
        assert opened.wait(10)
    finally:
        th.join(20)
    imported = mm.overhead()["runtime:sklearn"].host
    assert 70 * MiB < imported < 100 * MiB, imported / MiB


def test_a_process_that_imported_its_runtime_in_an_unmeasured_load_is_not_measured_as_importing_again(two_trees):
    """Process 2's first sklearn load goes unmeasured (a request's load beside others: no
    snapshot) and imports sklearn there. Its next, measured, load must not be taken for the
    import: that one's growth is its model alone, and would read the import as ~0."""
    t1, t2 = two_trees
    mm = MemoryManager({HOST: 8 * GiB}, store=InMemoryStore(), server_pid=lambda: (t1.pid, t2.pid), server_processes=2,
                       min_residency_s=0.0)
    for name in ("a", "b", "c"):
        mm.reserve(name, Cost(10 * MiB, {}, "declared"))
    w = mm.start_measure("a", runtime="sklearn", server_pid=t1.pid)
    t1.send(f"alloc {90 * MiB}")
    mm.finish_measure(w, key="key-a")
    imported = mm.overhead()["runtime:sklearn"].host

    assert mm.imports("sklearn", server_pid=t2.pid)
    w = mm.start_measure("b", runtime="sklearn", measure=False, server_pid=t2.pid)
    t2.send(f"alloc {90 * MiB}")  # process 2 imports sklearn, unmeasured
    mm.abort_measure(w)
    assert not mm.imports("sklearn", server_pid=t2.pid)
    w = mm.start_measure("c", runtime="sklearn", server_pid=t2.pid)
    assert not w.first_of_runtime
    t2.send(f"alloc {10 * MiB}")  # model c alone
    mm.finish_measure(w, key="key-c")
    assert mm.overhead()["runtime:sklearn"].host == imported
    assert 9 * MiB < mm.reservations()["c"].host < 14 * MiB, mm.reservations()["c"].host / MiB


def test_a_load_that_starts_waiting_while_the_import_window_opens_waits_for_the_import(two_trees):
    """The import's window is known as the import from the moment it is registered: a load that
    begins waiting while that window is still opening (here: the server's pid is slow to read)
    waits for the import to end, not only measure_wait_s, and never opens beside it."""
    t1, t2 = two_trees
    slow, reading = threading.Event(), threading.Event()

    def pid():
        if slow.is_set():
            slow.clear()
            reading.set()  # a's window is registered and reads the pid
            time.sleep(0.5)  # the import's window opening, slowly
        return (t1.pid, t2.pid)

    mm = MemoryManager({HOST: 8 * GiB}, store=InMemoryStore(), server_pid=pid, server_processes=2,
                       min_residency_s=0.0, measure_wait_s=0.2, import_wait_s=30.0)
    for name in ("a", "b"):
        mm.reserve(name, Cost(10 * MiB, {}, "declared"))
    windows: dict[str, object] = {}
    opened = {n: threading.Event() for n in ("a", "b")}

    def start(name):
        windows[name] = mm.start_measure(name, runtime="sklearn", server_pid=t1.pid)
        opened[name].set()

    slow.set()
    importing = threading.Thread(target=start, args=("a",))
    importing.start()
    assert reading.wait(10)  # a's window is registered; its pid read is still running
    second = threading.Thread(target=start, args=("b",))
    second.start()
    try:
        assert opened["a"].wait(5)
        assert windows["a"].first_of_runtime
        assert not opened["b"].wait(0.6), "b's window opened beside the import's"
        t1.send(f"alloc {90 * MiB}")
        mm.finish_measure(windows["a"], key="key-a")
        assert opened["b"].wait(5)
    finally:
        importing.join(10)
        second.join(10)
    assert not windows["b"].first_of_runtime


def test_what_a_load_asks_on_the_event_loop_reads_no_pid():
    """A sidecar's pid comes from a file (--server-pid-file): the ledger's answers a load asks
    for on the event loop (needs_measure, imports) must not read it there, every load."""
    import asyncio
    import os

    reads: list[int] = []

    def pid():
        reads.append(1)
        return os.getpid()

    mm = MemoryManager({HOST: GiB}, store=InMemoryStore(), server_pid=pid)
    reads.clear()

    async def ask():
        return mm.needs_measure("key-a", "sklearn"), mm.imports("sklearn")

    assert asyncio.run(ask()) == (True, True)  # nothing loaded yet: measured, and the import
    assert reads == []


KEEP = 16 * MiB  # --server-malloc-keep: each process that loaded a model keeps up to this much freed heap


def _models(mm: MemoryManager) -> int:
    return sum(c.host for c in mm.reservations().values())


def _first_import(mm: MemoryManager, tree: ProcessTree, name: str = "t0") -> int:
    """Model ``name``'s load into ``tree``'s process, its first sklearn load: the import
    (~80 MiB) and a 1 MiB model; returns the import charged for one process."""
    mm.reserve(name, Cost(MiB, {}, "declared"))
    w = mm.start_measure(name, runtime="sklearn", server_pid=tree.pid)
    assert w.first_of_runtime
    tree.send(f"alloc {81 * MiB}")
    mm.finish_measure(w, key=f"key-{name}")
    imported = mm.overhead()["runtime:sklearn"].host
    assert 70 * MiB < imported < 100 * MiB, imported / MiB
    return imported


def test_quick_models_all_in_one_process_are_charged_one_import_and_one_reserve(two_trees):
    """--server-processes 2 with tiny models only: they all go to the first process (shards.py
    is_quick), the second never imports sklearn nor frees any heap, so the ledger charges the
    import and the allocator reserve once (its used is one import + one reserve + the models,
    as the server's real growth is), not once per process; /status's ledger says for how many
    processes each import and the reserve are charged."""
    t1, t2 = two_trees
    mm = MemoryManager({HOST: 8 * GiB}, store=InMemoryStore(), server_pid=lambda: (t1.pid, t2.pid), server_processes=2,
                       min_residency_s=0.0, profile="mlserver", malloc_keep=KEEP)
    for i, name in enumerate(("t0", "t1", "t2")):
        mm.reserve(name, Cost(MiB, {}, "declared"))
        w = mm.start_measure(name, runtime="sklearn", server_pid=t1.pid)
        t1.send(f"alloc {(81 if i == 0 else 1) * MiB}")  # the first: the import too
        mm.finish_measure(w, key=f"key-{name}")
    imported = mm.overhead()["runtime:sklearn"].host
    assert 70 * MiB < imported < 100 * MiB, imported / MiB
    assert mm.used()[HOST] == imported + KEEP + _models(mm)  # one import, one reserve: process 2 holds none
    doc = mm.ledger_doc()
    assert doc["runtime_imports"]["sklearn"]["processes"] == 1, doc["runtime_imports"]
    assert doc["malloc_keep"] == {"host": KEEP, "per_process": KEEP, "processes": 1}, doc["malloc_keep"]
    assert doc["devices"][HOST]["overhead"] == imported + KEEP


def test_a_quick_load_admitted_counts_an_import_until_it_is_placed(two_trees):
    """A load is admitted before it is placed (the reconciler places it right before its
    window opens): until then it may go to the process that never imported sklearn, so it
    counts that import and that process's allocator reserve; once its window opens in the
    process that has both, it counts neither."""
    t1, t2 = two_trees
    mm = MemoryManager({HOST: 8 * GiB}, store=InMemoryStore(), server_pid=lambda: (t1.pid, t2.pid), server_processes=2,
                       min_residency_s=0.0, profile="mlserver", malloc_keep=KEEP)
    imported = _first_import(mm, t1)
    assert mm.used()[HOST] == imported + KEEP + _models(mm)
    mm.admit("t1", Cost(MiB, {}, "declared"), [], runtime="sklearn")  # not placed yet: may go to process 2
    assert mm.used()[HOST] == 2 * imported + 2 * KEEP + _models(mm)
    assert mm.ledger_doc()["runtime_imports"]["sklearn"]["processes"] == 2
    w = mm.start_measure("t1", runtime="sklearn", server_pid=t1.pid)  # placed: process 1, which has it
    assert mm.used()[HOST] == imported + KEEP + _models(mm)
    t1.send(f"alloc {MiB}")
    mm.finish_measure(w, key="key-t1")
    assert mm.used()[HOST] == imported + KEEP + _models(mm)


def test_a_big_model_admitted_for_the_second_process_is_charged_its_import_from_admission(two_trees):
    """A big model's load is admitted before it is placed: it may go to the process that never
    imported sklearn, so its admission counts that process's import and allocator reserve (a
    model that fits beside one import but not two is refused, and one that fits beside one
    reserve but not two), both stay charged once the load is placed there and measured, and a
    load admitted into a process placed already and warm counts neither."""
    t1, t2 = two_trees
    mm = MemoryManager({HOST: 400 * MiB}, store=InMemoryStore(), server_pid=lambda: (t1.pid, t2.pid), server_processes=2,
                       min_residency_s=0.0, profile="mlserver", malloc_keep=KEEP)
    imported = _first_import(mm, t1)
    room = mm.free()[HOST]
    with pytest.raises(DoesNotFit):  # fits beside process 1's import, not beside process 2's too
        mm.admit("huge", Cost(room - imported // 2, {}, "declared"), [], runtime="sklearn")
    with pytest.raises(DoesNotFit):  # no import to pay here (no runtime), but process 2's reserve
        mm.admit("huge", Cost(room - KEEP // 2, {}, "declared"), [])
    assert mm.used()[HOST] == imported + KEEP + _models(mm)  # the refused loads charge nothing
    # an update in place of t0 goes to t0's process, which has sklearn: no second import
    assert mm.admit("t0#new", Cost(room - imported // 2, {}, "declared"), [], runtime="sklearn", server_pid=t1.pid) == []
    mm.release("t0#new")

    mm.admit("big", Cost(20 * MiB, {}, "declared"), [], runtime="sklearn")
    assert mm.used()[HOST] == 2 * imported + 2 * KEEP + _models(mm)  # from its admission on
    w = mm.start_measure("big", runtime="sklearn", server_pid=t2.pid)
    assert w.first_of_runtime
    assert mm.used()[HOST] == 2 * imported + 2 * KEEP + _models(mm)
    t2.send(f"alloc {100 * MiB}")  # process 2's import + the big model
    mm.finish_measure(w, key="key-big")
    assert mm.used()[HOST] == 2 * imported + 2 * KEEP + _models(mm)
    assert mm.ledger_doc()["runtime_imports"]["sklearn"]["processes"] == 2
    assert mm.ledger_doc()["malloc_keep"]["processes"] == 2


def test_a_restart_of_the_second_process_drops_its_import_and_reserve(two_trees):
    """Process 2 holds the big model, its own import and its own allocator reserve; it restarts
    (a new pid, bare): neither is charged any longer (process 1's are), and the big model's
    reload, admitted, is charged both again."""
    t1, t2 = two_trees
    pids = [t1.pid, t2.pid]
    mm = MemoryManager({HOST: 8 * GiB}, store=InMemoryStore(), server_pid=lambda: tuple(pids), server_processes=2,
                       min_residency_s=0.0, profile="mlserver", malloc_keep=KEEP)
    imported = _first_import(mm, t1)
    mm.reserve("big", Cost(20 * MiB, {}, "declared"))
    w = mm.start_measure("big", runtime="sklearn", server_pid=t2.pid)
    t2.send(f"alloc {100 * MiB}")
    mm.finish_measure(w, key="key-big")
    assert mm.used()[HOST] == 2 * imported + 2 * KEEP + _models(mm)

    t3 = ProcessTree()  # process 2 restarted: a new, bare process
    try:
        pids[1] = t3.pid
        mm.reset_server()
        assert mm.used()[HOST] == imported + KEEP + _models(mm)  # (big's reservation goes when its loss is noticed)
        assert mm.ledger_doc()["malloc_keep"]["processes"] == 1
        mm.release("big")
        mm.admit("big", Cost(20 * MiB, {}, "declared"), [], runtime="sklearn")  # its reload
        assert mm.used()[HOST] == 2 * imported + 2 * KEEP + _models(mm)
        w = mm.start_measure("big", runtime="sklearn", server_pid=t3.pid)
        assert w.first_of_runtime
        assert mm.ledger_doc()["runtime_imports"]["sklearn"]["processes"] == 2
        mm.abort_measure(w)
    finally:
        t3.close()


def test_a_runtime_first_load_is_admitted_with_its_expected_import(two_trees):
    """Before any process imported sklearn, the first sklearn load's admission counts the
    expected import (DEFAULT_IMPORTS): a model that fits alone but not beside it is refused."""
    from agent.memory.cost import DEFAULT_IMPORTS

    t1, t2 = two_trees
    expected = DEFAULT_IMPORTS["mlserver"]["sklearn"]
    mm = MemoryManager({HOST: expected + 20 * MiB}, store=InMemoryStore(), server_pid=lambda: (t1.pid, t2.pid),
                       server_processes=2, min_residency_s=0.0, profile="mlserver")
    with pytest.raises(DoesNotFit):
        mm.admit("big", Cost(30 * MiB, {}, "declared"), [], runtime="sklearn")
    assert mm.used()[HOST] == 0 and mm.ledger_doc()["runtime_imports"] == {}
    mm.admit("a", Cost(2 * MiB, {}, "declared"), [], runtime="sklearn")
    assert mm.used()[HOST] == expected + 2 * MiB
    assert mm.ledger_doc()["runtime_imports"]["sklearn"]["processes"] == 1
    w = mm.start_measure("a", runtime="sklearn", server_pid=t1.pid)
    assert w.first_of_runtime and mm.used()[HOST] == expected + 2 * MiB
    mm.abort_measure(w)


def test_reality_counts_the_reserve_of_the_processes_charged_for_it(two_trees):
    """Drift counts of the allocator reserve's line what the server reports it keeps: the line
    is one reserve when one process of two has loaded a model (the other holds nothing and
    keeps nothing), so drift is the ledger less that one bound's unused part, not less two."""
    t1, t2 = two_trees
    kept = {"now": 30 * MiB}  # what process 1's allocator says it keeps (process 2 reports nothing)
    mm = MemoryManager({HOST: GiB}, server_pid=lambda: (t1.pid, t2.pid), server_processes=2, min_residency_s=0.0,
                       malloc_keep=40 * MiB, allocator_reserve=lambda *process: kept["now"])
    mm.reality.check()  # baseline: the bare 'servers'
    mm.reserve("m", Cost(20 * MiB, {}, "declared"))
    mm.abort_measure(mm.start_measure("m", runtime="sklearn", measure=False, server_pid=t1.pid))
    t1.send(f"alloc {20 * MiB}")
    t1.send(f"alloc {30 * MiB}")  # the model, and 30 MiB the allocator says it kept
    report = mm.reality.check()
    assert mm.ledger_doc()["malloc_keep"]["processes"] == 1
    assert 45 * MiB <= report.real[HOST] <= 58 * MiB, report
    assert report.drift[HOST] == report.ledger[HOST] - 10 * MiB - report.real[HOST], report  # 10 MiB of one bound unused
