"""TritonAdapter against a real embedded Triton (python backend, CPU), one per session.

Skipped with the reason when .venv-triton is absent; `make test` builds it first, so CI runs them.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from agent.runtimes import LoadFailed, ServedModel
from tests.support.models import triton_v2_request, write_triton_broken_model, write_triton_model
from tests.support.interleave import hold_entry_removal, unload_past_a_late_load
from tests.support.servers import RunningServer, poll_during, triton_site_packages

pytestmark = pytest.mark.triton

VALUES = [1.0, 2.5, -4.0]


def _model(tmp_path: Path, sub: str, factor: float = 2.0, name: str = "double") -> Path:
    return write_triton_model(tmp_path / sub, name=name, factor=factor, site_packages=triton_site_packages())


def _infer(srv: RunningServer, name: str) -> list[float]:
    r = httpx.post(f"{srv.base_url}/v2/models/{name}/infer", json=triton_v2_request(VALUES), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["outputs"][0]["data"]


def test_load_infer_index_unload_under_the_served_name(triton: RunningServer, tmp_path: Path) -> None:
    """The source's config says name "double"; it is served as "twice" (config rewritten)."""
    ad = triton.adapter
    src = _model(tmp_path, "src", factor=2.0, name="double")
    triton.call(ad.load(ServedModel("twice", src, "triton")))
    assert _infer(triton, "twice") == [v * 2 for v in VALUES]
    assert triton.call(ad.index()) == {"twice": "READY"}
    assert ad.repository_entries() == {"twice"}
    assert 'name: "twice"' in (triton.repository / "twice" / "config.pbtxt").read_text()
    assert (triton.repository / "twice" / "1" / "model.py").resolve() == (src / "1" / "model.py").resolve()  # linked, not copied

    triton.call(ad.unload("twice"))
    # unload returned only once Triton finished (it is asynchronous there): gone right away
    assert httpx.get(f"{triton.base_url}/v2/models/twice/ready").status_code != 200
    assert triton.call(ad.index()).get("twice") in (None, "UNAVAILABLE")
    assert ad.repository_entries() == set()
    assert (src / "1" / "model.py").is_file()  # the cache copy is untouched


def test_unload_of_unknown_model_is_not_an_error(triton: RunningServer) -> None:
    triton.call(triton.adapter.unload("never-loaded"))


def test_broken_and_missing_models_fail_while_others_keep_serving(triton: RunningServer, tmp_path: Path) -> None:
    ad = triton.adapter
    triton.call(ad.load(ServedModel("good", _model(tmp_path, "good"), "triton")))
    broken = write_triton_broken_model(tmp_path / "broken", name="broken")
    with pytest.raises(LoadFailed) as e:
        triton.call(ad.load(ServedModel("broken", broken, "triton")))
    reason = e.value.reason
    assert "broken on purpose" in reason and "\n" not in reason and len(reason) < 400, reason
    with pytest.raises(LoadFailed, match="not found"):
        triton.call(ad.load(ServedModel("ghost", tmp_path / "nowhere", "triton")))
    assert _infer(triton, "good") == [v * 2 for v in VALUES]
    assert ad.repository_entries() == {"good"}
    assert triton.call(ad.index()) == {"good": "READY"}


def test_reload_in_place_has_no_gap(triton: RunningServer, tmp_path: Path) -> None:
    """Replacing factor 2 by factor 3: every probe during the reload succeeds."""
    ad = triton.adapter
    triton.call(ad.load(ServedModel("swap", _model(tmp_path, "v2", factor=2.0), "triton")))
    new = _model(tmp_path, "v3", factor=3.0)

    async def reload() -> None:
        await ad.load(ServedModel("swap", new, "triton"))
        await asyncio.sleep(0.2)

    polled = triton.call(poll_during(ad.base_url, "swap", triton_v2_request(VALUES), reload()))
    assert polled.failures == []
    assert polled.during >= 1, polled  # probed while it was replaced
    assert polled.outputs == {tuple(v * 2 for v in VALUES), tuple(v * 3 for v in VALUES)}
    assert ad.entry("swap").path == new


def test_failed_reload_keeps_the_old_copy_and_its_entry(triton: RunningServer, tmp_path: Path) -> None:
    ad = triton.adapter
    good = _model(tmp_path, "good")
    triton.call(ad.load(ServedModel("keep", good, "triton")))
    with pytest.raises(LoadFailed):
        triton.call(ad.load(ServedModel("keep", write_triton_broken_model(tmp_path / "bad"), "triton")))
    assert _infer(triton, "keep") == [v * 2 for v in VALUES]
    assert ad.entry("keep").path == good
    assert (triton.repository / "keep" / "1" / "model.py").resolve() == (good / "1" / "model.py").resolve()


def test_python_backend_byproducts_stay_out_of_the_model_dir(triton: RunningServer, tmp_path: Path) -> None:
    """The python backend imports model.py and Python caches its bytecode next to the path it
    was imported from. The model dir is a cache entry (shared, to stay byte-identical): after a
    load and an inference, nothing was written into it through the repository's links."""
    ad = triton.adapter
    src = _model(tmp_path, "pyc-src", factor=3.0)
    before = sorted(str(p.relative_to(src)) for p in src.rglob("*"))
    triton.call(ad.load(ServedModel("pyc", src, "triton")))
    assert _infer(triton, "pyc") == [v * 3 for v in VALUES]
    assert sorted(str(p.relative_to(src)) for p in src.rglob("*")) == before
    assert (triton.repository / "pyc" / "1" / "model.py").resolve() == (src / "1" / "model.py").resolve()  # linked, not copied
    triton.call(ad.unload("pyc"))


def test_a_load_called_while_the_unload_of_the_name_is_in_flight_runs_after_it(
        triton: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """unload(NAME), then load(NAME) while the unload's entry removal is still to run (Triton has
    already unloaded the model): the calls take effect in call order, so the model ends served
    with its entry in place. (Applied as they came, the load reached Triton before the unload's
    removal, which then deleted the entry of the model Triton had just loaded: served, no entry.)"""
    ad = triton.adapter
    served = ServedModel("turn", _model(tmp_path, "turn"), "triton")
    triton.call(ad.load(served))
    entered, gate = hold_entry_removal(ad, monkeypatch)

    async def scenario() -> None:
        unloading = asyncio.create_task(ad.unload("turn"))
        assert await asyncio.to_thread(entered.wait, 20)  # Triton unloaded it; the file work is held
        loading = asyncio.create_task(ad.load(served))
        await asyncio.wait({loading}, timeout=2.0)  # room for the load to overtake the unload
        gate.set()
        await unloading
        await loading

    try:
        triton.call(scenario())
    finally:
        gate.set()
    assert _infer(triton, "turn") == [v * 2 for v in VALUES]
    assert ad.repository_entries() == {"turn"} and ad.entry("turn") == served
    triton.call(ad.unload("turn"))
    assert ad.repository_entries() == set()


def test_an_unload_after_a_load_given_up_in_flight_leaves_nothing_served(
        triton: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As for MLServer: a load the caller gave up reaches Triton after the unload's answer and
    before its entry removal; the unload drops it again. Stand-in for the network only (the
    load's request is sent when the test says)."""
    ad = triton.adapter
    served = ServedModel("lost", _model(tmp_path, "lost"), "triton")
    assert triton.call(unload_past_a_late_load(ad, served, monkeypatch)) == 200
    assert httpx.get(f"{triton.base_url}/v2/models/lost/ready").status_code != 200
    assert ad.repository_entries() == set()
