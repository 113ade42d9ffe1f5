"""One server (the default, --server-processes 1): a runtime's first load imports it (~80 MiB
for sklearn in MLServer), and the ledger counts that import from the load's ADMISSION on, not
only from its window: a first load that fits alone but not beside its import is refused (or
evicts to make room) instead of being found over the budget once loaded, and first loads
admitted together (the preloads at start-up) count the import once. The server is a REAL
process tree (the conftest's ProcessTree: a child that holds the bytes it is told to)."""
from __future__ import annotations

import pytest

from agent.memory import HOST, Cost, DoesNotFit, InMemoryStore, MemoryManager
from agent.memory.cost import DEFAULT_IMPORTS
from agent.memory.planner import Candidate

from .conftest import MiB

EXPECTED = DEFAULT_IMPORTS["mlserver"]["sklearn"]


def _ledger(tree, budget: int, **kwargs) -> MemoryManager:
    return MemoryManager({HOST: budget}, store=InMemoryStore(), server_pid=tree.pid, min_residency_s=0.0,
                         profile="mlserver", **kwargs)


def _imports(mm: MemoryManager) -> dict:
    return {r: (d["host"], d["processes"]) for r, d in mm.ledger_doc()["runtime_imports"].items()}


def test_a_first_load_that_fits_only_without_its_import_is_not_admitted(tree):
    """The budget holds the model but not the model and sklearn's expected import: the first
    sklearn load is refused (with the import charged from its window only, it was admitted and
    the server then held the import beyond the budget); nothing stays charged for the refusal,
    which names the server's own bytes as what no eviction frees; a model that fits beside the
    import is admitted and charged it."""
    mm = _ledger(tree, EXPECTED + 20 * MiB)
    with pytest.raises(DoesNotFit) as e:
        mm.admit("big", Cost(30 * MiB, {}, "declared"), [], runtime="sklearn")
    assert e.value.permanent and "the server's own bytes" in str(e.value) and "pinned" not in str(e.value), e.value
    assert mm.used()[HOST] == 0 and _imports(mm) == {}
    assert mm.admit("a", Cost(2 * MiB, {}, "declared"), [], runtime="sklearn") == []
    assert mm.used()[HOST] == EXPECTED + 2 * MiB
    assert _imports(mm) == {"sklearn": (EXPECTED, 1)}


def test_a_first_load_evicts_to_make_room_for_its_import(tree):
    """A model of another runtime fills the budget but for room for the new model alone: the
    first sklearn load evicts it to make room for the import too (with the import charged from
    its window only, it evicted nothing)."""
    mm = _ledger(tree, EXPECTED + 40 * MiB)
    mm.reserve("other", Cost(30 * MiB, {}, "declared"))
    victims = mm.admit("a", Cost(30 * MiB, {}, "declared"), [Candidate("other", last_used=1, loaded_at=0)],
                       runtime="sklearn")
    assert victims == ["other"]
    assert mm.used()[HOST] == EXPECTED + 30 * MiB


def test_first_loads_admitted_together_charge_the_import_once_until_their_windows_take_over(tree):
    """Two sklearn first loads admitted together (preloads) count one import, not two and not
    none; the first window's import line is that same figure (not a second one), the second
    window adds none, and the measurement replaces the figure. A load admitted once the server
    holds sklearn counts its model only."""
    mm = _ledger(tree, 1024 * MiB)
    mm.admit("a", Cost(2 * MiB, {}, "declared"), [], runtime="sklearn")
    mm.admit("b", Cost(3 * MiB, {}, "declared"), [], runtime="sklearn")
    assert mm.used()[HOST] == EXPECTED + 5 * MiB
    assert _imports(mm) == {"sklearn": (EXPECTED, 1)}
    assert not mm.settled()
    w = mm.start_measure("a", runtime="sklearn")
    assert w.first_of_runtime
    assert mm.used()[HOST] == EXPECTED + 5 * MiB and _imports(mm) == {"sklearn": (EXPECTED, 1)}
    tree.send(f"alloc {90 * MiB}")  # the import and model a
    mm.finish_measure(w, key="ka")
    imported = mm.overhead()["runtime:sklearn"].host
    assert 70 * MiB < imported < 100 * MiB, imported
    assert mm.used()[HOST] == imported + 5 * MiB  # b, still admitted, adds no import
    w = mm.start_measure("b", runtime="sklearn")
    assert not w.first_of_runtime
    tree.send(f"alloc {3 * MiB}")
    mm.finish_measure(w, key="kb")
    assert mm.settled() and _imports(mm) == {"sklearn": (imported, 1)}
    loaded = mm.used()[HOST]
    assert loaded == imported + sum(c.host for c in mm.reservations().values())
    mm.admit("c", Cost(4 * MiB, {}, "declared"), [], runtime="sklearn")
    assert mm.used()[HOST] == loaded + 4 * MiB


def test_a_released_admission_drops_its_expected_import(tree):
    """A first load admitted then released before its window (its load failed, or it was
    cancelled) leaves no import charged."""
    mm = _ledger(tree, 1024 * MiB)
    mm.admit("a", Cost(2 * MiB, {}, "declared"), [], runtime="sklearn")
    assert mm.used()[HOST] == EXPECTED + 2 * MiB
    mm.release("a")
    assert mm.used()[HOST] == 0 and _imports(mm) == {} and mm.settled()


def test_a_runtime_with_no_expected_import_and_a_ledger_with_no_server_pid_charge_none_at_admission(tree):
    """A runtime with no figure expected (not in DEFAULT_IMPORTS, never measured) is learnt by
    its load, as before; a ledger told no server pid measures nothing and charges no import."""
    mm = _ledger(tree, 1024 * MiB)
    mm.admit("x", Cost(2 * MiB, {}, "declared"), [], runtime="custom")
    assert mm.used()[HOST] == 2 * MiB and _imports(mm) == {}
    blind = MemoryManager({HOST: 1024 * MiB}, store=InMemoryStore(), profile="mlserver")
    blind.admit("a", Cost(2 * MiB, {}, "declared"), [], runtime="sklearn")
    assert blind.used()[HOST] == 2 * MiB


def test_after_a_restart_the_known_import_is_charged_once_and_an_unknown_one_again_from_admission(tree):
    """After a restart the server holds no runtime: the reloads' admissions count the import
    again. A figure known (split from two loads) is charged already (``reset_server``): the
    reloads add none beside it. A figure not known yet (provisional) is dropped by the restart
    and charged again from the first reload's admission, as expected."""
    mm = MemoryManager({HOST: 1024 * MiB}, store=InMemoryStore(), server_pid=tree.pid, min_model_bytes=MiB,
                       min_residency_s=0.0)
    for i, (name, grow) in enumerate((("a", 180 * MiB), ("b", 100 * MiB))):  # a: ~80 MiB import + 100 MiB
        mm.admit(name, mm.cost_for(key=f"k{i}", runtime="sklearn", entry_bytes=100 * MiB, declared_host=100 * MiB), [],
                 runtime="sklearn")
        w = mm.start_measure(name, runtime="sklearn")
        tree.send(f"alloc {grow}")
        mm.finish_measure(w, key=f"k{i}")
    imported = mm.overhead()["runtime:sklearn"].host
    assert 70 * MiB <= imported <= 100 * MiB
    mm.reset_server()
    mm.release("a")
    mm.release("b")
    assert mm.used()[HOST] == imported
    mm.admit("a", Cost(100 * MiB, declared_host=100 * MiB), [], runtime="sklearn")
    mm.admit("b", Cost(100 * MiB, declared_host=100 * MiB), [], runtime="sklearn")
    assert mm.used()[HOST] == imported + 200 * MiB and _imports(mm) == {"sklearn": (imported, 1)}

    fresh = _ledger(tree, 1024 * MiB)  # one first load only: its import is provisional, not known
    fresh.admit("a", Cost(2 * MiB, {}, "declared"), [], runtime="sklearn")
    w = fresh.start_measure("a", runtime="sklearn")
    tree.send(f"alloc {90 * MiB}")
    fresh.finish_measure(w, key="ka")
    assert fresh.ledger_doc()["runtime_imports"]["sklearn"]["provisional"] is True
    fresh.reset_server()
    fresh.release("a")
    assert fresh.used()[HOST] == 0
    fresh.admit("a", Cost(2 * MiB, {}, "declared"), [], runtime="sklearn")
    fresh.admit("b", Cost(2 * MiB, {}, "declared"), [], runtime="sklearn")
    assert fresh.used()[HOST] == EXPECTED + 4 * MiB and _imports(fresh) == {"sklearn": (EXPECTED, 1)}
