"""Item 1: cache leases belong to the model, and a served entry is checked before each load."""
from __future__ import annotations

import shutil

from agent.reconciler import State
from tests.reconciler.conftest import Harness, run


def removed_by_gc(h: Harness) -> set[str]:
    """Keys a GC down to zero bytes removes (what any pod sharing the cache may run)."""
    return {info.key for info in h.cache.gc(max_bytes=0).removed}


def test_removing_one_of_two_models_on_one_entry_keeps_the_others_entry(tmp_path, http):
    """Two models on one URI: removing one must not let GC delete the entry the other serves;
    a server restart afterwards still reloads the other from its files."""
    async def scenario():
        async with Harness(tmp_path, http) as h:
            uri = h.publish("shared")
            await h.apply(h.spec("a", uri), h.spec("b", uri))
            key = h.model("a").entry.key
            assert h.model("b").entry.key == key
            await h.apply(h.spec("a", uri))  # b removed
            assert key not in removed_by_gc(h), "GC removed the entry model a serves"
            await h.adapter.restart()
            await h.settle()
            assert h.state("a") is State.LOADED, h.model("a").reason
            assert h.cache.leases(key)
    run(scenario())


def test_an_entry_that_vanished_is_pulled_again_before_the_next_load(tmp_path, http):
    """The entry disappears from disk (GC by another pod, an operator's rm): the next load
    re-downloads it instead of failing with "model files not found" forever."""
    async def scenario():
        async with Harness(tmp_path, http) as h:
            await h.apply(h.spec("m"))
            entry = h.model("m").entry
            gets = http.get_count("m/v1/model.bin")
            shutil.rmtree(entry.path.parent)  # the entry dir (files/ + manifest)
            await h.adapter.restart()
            await h.settle()
            await h.wait_for(lambda: h.state("m") is State.LOADED, what="m reloaded")
            assert http.get_count("m/v1/model.bin") == gets + 1
            assert h.adapter.ready["m"].path.exists()
    run(scenario())


def test_a_damaged_entry_is_discarded_and_downloaded_again(tmp_path, http):
    """A truncated cache file is caught by the presence check before a load: the entry is
    discarded and fetched again, the model serves again."""
    async def scenario():
        async with Harness(tmp_path, http) as h:
            await h.apply(h.spec("m", preload=False))
            await h.rec.acquire("m")
            m = h.model("m")
            h.rec.release(m)
            f = m.entry.path / "model.bin"
            f.chmod(0o644)
            f.write_bytes(b"short")
            await h.adapter.restart()
            await h.settle()
            assert h.state("m") is State.LOADED, h.model("m").reason
            assert (h.model("m").entry.path / "model.bin").stat().st_size == 64 * 1024
    run(scenario())


def test_remove_and_add_again_during_the_unload_keeps_a_lease_on_the_served_entry(tmp_path, http):
    async def scenario():
        async with Harness(tmp_path, http) as h:
            spec = h.spec("m")
            await h.apply(spec)
            key = h.model("m").entry.key
            gate = h.adapter.hold("unload", "m")
            await h.apply(settle=False)  # removed
            await gate.entered.wait()
            await h.apply(spec, settle=False)  # back while its unload runs
            gate.release()
            await h.settle()
            assert h.state("m") is State.LOADED
            assert h.cache.leases(key), "the served entry has no lease: any GC may delete it"
            assert key not in removed_by_gc(h)
    run(scenario())
