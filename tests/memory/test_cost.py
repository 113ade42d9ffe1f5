"""A model's cost: estimated (entry size x runtime multiplier) vs declared (a floor) vs measured
(remembered per cache key through any get_meta/set_meta store, across manager instances)."""
from __future__ import annotations

import json
from pathlib import Path


from agent.memory import HOST, Cost, InMemoryStore, MemoryManager

from .conftest import GiB, MiB


class JsonFileStore:
    """A get_meta/set_meta store on disk, shaped like the puller Cache's (one JSON per key), to
    show the record survives a new manager AND a new store object (i.e. a restart)."""

    def __init__(self, root: Path):
        self.root = root

    def get_meta(self, key):
        p = self.root / f"{key}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def set_meta(self, key, meta):
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / f"{key}.json").write_text(json.dumps(meta))


def _record(host, gpu=None):
    return {"host": host, "gpu": gpu or {}, "method": "measured", "samples": 1}


def test_estimate_uses_runtime_multiplier_and_overrides():
    mm = MemoryManager({HOST: 8 * GiB}, multipliers={"sklearn": 3.0, "mine": 1.1})
    assert mm.cost_for(key=None, runtime="sklearn", entry_bytes=100 * MiB) == Cost(300 * MiB, {}, "estimated")
    assert mm.cost_for(key=None, runtime="pytorch", entry_bytes=100 * MiB).host == int(100 * MiB * 1.2)
    assert mm.cost_for(key=None, runtime="mine", entry_bytes=100 * MiB).host == int(100 * MiB * 1.1)
    assert mm.cost_for(key=None, runtime="unheard-of", entry_bytes=100 * MiB).host == 200 * MiB
    # a tiny or unknown entry still reserves something
    assert mm.cost_for(key=None, runtime="sklearn", entry_bytes=10).host == mm.min_model_bytes
    assert mm.cost_for(key=None, runtime="sklearn", entry_bytes=None).host == mm.min_model_bytes


def test_declared_beats_estimate_and_is_a_floor_for_measurement():
    store = InMemoryStore()
    store.set_meta("k", {"memory": {"default": _record(300 * MiB)}})
    mm = MemoryManager({HOST: 8 * GiB}, store=store)
    # declared, no measurement: declared (even when below the estimate)
    c = mm.cost_for(key=None, runtime="sklearn", entry_bytes=100 * MiB, declared_host=50 * MiB)
    assert (c.host, c.method) == (50 * MiB, "declared")
    # measurement above the declaration wins: the declaration was too low
    c = mm.cost_for(key="k", runtime="sklearn", entry_bytes=100 * MiB, declared_host=200 * MiB)
    assert (c.host, c.method) == (300 * MiB, "measured")
    # declaration above the measurement is kept (it may cover inference peaks)
    c = mm.cost_for(key="k", runtime="sklearn", entry_bytes=100 * MiB, declared_host=1 * GiB)
    assert (c.host, c.method) == (1 * GiB, "declared")


def test_measured_beats_estimate_and_survives_a_new_manager(tmp_path):
    mm = MemoryManager({HOST: 8 * GiB}, store=JsonFileStore(tmp_path))
    est = mm.cost_for(key="entry-1", runtime="sklearn", entry_bytes=100 * MiB)
    assert (est.host, est.method) == (200 * MiB, "estimated")
    mm._save_record("entry-1", _record(37 * MiB))
    # a fresh manager over a fresh store object on the same files: the measurement is used
    mm2 = MemoryManager({HOST: 8 * GiB}, store=JsonFileStore(tmp_path))
    c = mm2.cost_for(key="entry-1", runtime="sklearn", entry_bytes=100 * MiB)
    assert (c.host, c.method) == (37 * MiB, "measured")
    # other entries and other server profiles do not see it
    assert mm2.cost_for(key="entry-2", runtime="sklearn", entry_bytes=100 * MiB).method == "estimated"
    triton = MemoryManager({HOST: 8 * GiB}, store=JsonFileStore(tmp_path), profile="triton")
    assert triton.cost_for(key="entry-1", runtime="sklearn", entry_bytes=100 * MiB).method == "estimated"


def test_a_load_reads_an_entrys_record_from_the_store_once(tmp_path):
    """Every load asks for its entry's record twice on the event loop (its cost, whether to
    measure it): the store (a file per entry, maybe on a network PVC) is read once per key;
    this manager's own new measurement is seen at once, without reading the file again."""
    reads: list[str] = []

    class Counting(JsonFileStore):
        def get_meta(self, key):
            reads.append(key)
            return super().get_meta(key)

    JsonFileStore(tmp_path).set_meta("measured", {"memory": {"default": _record(37 * MiB)}})
    mm = MemoryManager({HOST: 8 * GiB}, store=Counting(tmp_path))
    for _ in range(5):  # five loads of each entry
        assert mm.cost_for(key="measured", runtime="sklearn", entry_bytes=100 * MiB).host == 37 * MiB
        assert mm.cost_for(key="new", runtime="sklearn", entry_bytes=100 * MiB).method == "estimated"
        mm.needs_measure("measured", "sklearn"), mm.needs_measure("new", "sklearn")
    assert sorted(reads) == ["measured", "new"]
    mm._save_record("new", _record(12 * MiB))
    assert mm.cost_for(key="new", runtime="sklearn", entry_bytes=100 * MiB).host == 12 * MiB
    assert reads.count("new") == 2  # the save's own read-modify-write of the file, no lookup


def test_record_keeps_other_metadata_of_the_entry():
    store = InMemoryStore()
    store.set_meta("k", {"last_used": 123, "memory": {"triton": _record(5 * MiB)}})
    mm = MemoryManager({HOST: 8 * GiB}, store=store, profile="mlserver")
    mm._save_record("k", _record(9 * MiB))
    meta = store.get_meta("k")
    assert meta["last_used"] == 123
    assert meta["memory"]["triton"]["host"] == 5 * MiB and meta["memory"]["mlserver"]["host"] == 9 * MiB


def test_broken_store_falls_back_to_estimate(caplog):
    class Broken:
        def get_meta(self, key):
            raise OSError("disk gone")

        def set_meta(self, key, meta):
            raise OSError("disk gone")

    mm = MemoryManager({HOST: 8 * GiB}, store=Broken())
    c = mm.cost_for(key="k", runtime="sklearn", entry_bytes=10 * MiB)
    assert (c.host, c.method) == (20 * MiB, "estimated")
    assert any("store_read_failed" in r.getMessage() for r in caplog.records)


def test_gpu_cost_declared_estimated_measured(fake_gpu):
    budget = {HOST: 8 * GiB, "gpu:0": 10 * GiB, "gpu:1": 10 * GiB}
    store = InMemoryStore()
    mm = MemoryManager(budget, store=store, gpu_probe=fake_gpu, multipliers={"gpu:pytorch": 1.5})
    # no GPU multiplier for sklearn: no GPU estimate (learnt by measurement)
    assert mm.cost_for(key=None, runtime="sklearn", entry_bytes=GiB).gpu == {}
    # GPU multiplier configured with "gpu:RUNTIME": placed on the first GPU, or where asked
    assert mm.cost_for(key=None, runtime="pytorch", entry_bytes=GiB).gpu == {"gpu:0": int(1.5 * GiB)}
    assert mm.cost_for(key=None, runtime="pytorch", entry_bytes=GiB, gpu_device="gpu:1").gpu == {"gpu:1": int(1.5 * GiB)}
    c = mm.cost_for(key=None, runtime="sklearn", entry_bytes=GiB, declared_gpu=3 * GiB)
    assert (c.gpu, c.method) == ({"gpu:0": 3 * GiB}, "declared")
    # a measurement from a node with more GPUs folds onto a device this node has
    store.set_meta("k", {"memory": {"default": _record(10 * MiB, {"gpu:7": 2 * GiB})}})
    c = mm.cost_for(key="k", runtime="pytorch", entry_bytes=GiB)
    assert (c.gpu, c.method) == ({"gpu:0": 2 * GiB}, "measured")
    assert c.devices() == {HOST: 10 * MiB, "gpu:0": 2 * GiB}
    assert "gpu:0=2.0GiB" in c.describe() and "(measured)" in c.describe()
