"""Reconciler.apply: an edit of one model among many touches that model and no other."""
from __future__ import annotations

from dataclasses import replace

from agent.reconciler import State
from tests.reconciler.conftest import Harness, run


def test_an_edit_applies_only_the_changed_model_and_a_model_configured_again_as_it_was_comes_back(tmp_path, http):
    """apply() visits the names whose spec differs from the last applied set (the parser hands
    an unchanged entry's spec back as the same object): a version change reloads that model
    alone, a removed model goes, and the same spec object configured again serves again."""
    async def scenario():
        async with Harness(tmp_path, http) as h:
            specs = [h.spec(n) for n in ("a", "b", "c")]
            a, b, c = specs
            await h.apply(a, b, c)
            assert [h.state(n) for n in "abc"] == [State.LOADED] * 3
            b2 = replace(b, version="v2")
            await h.apply(a, b2, c)
            assert [h.adapter.count("load", n) for n in "abc"] == [1, 2, 1]
            await h.apply(a, c)
            assert h.state("b") is None and h.adapter.count("unload", "b") >= 1
            await h.apply(a, b2, c)  # b's spec object as applied two edits ago
            assert h.state("b") is State.LOADED
            assert [h.adapter.count("load", n) for n in "abc"] == [1, 3, 1]
    run(scenario())
