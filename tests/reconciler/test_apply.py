"""Reconciler.apply: an edit of one model among many touches that model and no other."""
from __future__ import annotations

import asyncio
from dataclasses import replace

from agent.reconciler import State
from tests.reconciler.conftest import Harness, run
from tests.support.scripted import ScriptedAdapter


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


def test_a_sharded_agent_applies_only_its_share_and_edits_to_it(tmp_path, http):
    """With --shards 2 the desired set is this replica's share, rebuilt on every apply: an edit
    inside the share reloads that model, one outside it changes nothing here."""
    from agent.reconciler import shard_of

    async def scenario():
        async with Harness(tmp_path, http, shards=2, shard_index=0) as h:
            specs = {n: h.spec(n) for n in (f"m{i}" for i in range(8))}
            mine = sorted(n for n in specs if shard_of(n, 2) == 0)
            other = sorted(n for n in specs if shard_of(n, 2) == 1)
            assert mine and other
            await h.apply(*specs.values())
            assert sorted(h.rec.models) == mine
            edited = {**specs, mine[0]: replace(specs[mine[0]], version="v2"), other[0]: replace(specs[other[0]], version="v2")}
            await h.apply(*edited.values())
            assert sorted(h.rec.models) == mine
            assert [h.adapter.count("load", n) for n in mine] == [2] + [1] * (len(mine) - 1)
    run(scenario())


def test_a_model_configured_while_the_orphan_cleanup_runs_is_not_unloaded_by_it(tmp_path, http):
    """After the first config the agent unloads, one by one in a background task, what the
    server served that the config does not name. A name configured again meanwhile is the
    config's now: its converge loads (or adopts) it, and the cleanup leaves it alone, so it
    ends served as the agent says. (The cleanup used to unload it anyway, after its load: the
    agent said LOADED while the server no longer served it.)"""
    from agent.runtimes import ServedModel

    async def scenario():
        adapter = ScriptedAdapter()
        for name in ("o1", "o2"):  # served before this agent started (an earlier config)
            (tmp_path / name).mkdir()
            await adapter.load(ServedModel(name, tmp_path / name, "sklearn"))
        held = adapter.hold("unload", "o1")
        async with Harness(tmp_path, http, adapter=adapter) as h:
            await h.apply(settle=False)  # names neither: the cleanup starts and holds at o1
            await asyncio.wait_for(held.entered.wait(), 10)
            o2 = h.spec("o2")
            await h.apply(o2, settle=False)  # o2 configured while the cleanup is still on o1
            await h.wait_for(lambda: h.state("o2") is State.LOADED, what="o2 loaded")
            held.release()
            await h.settle()
            assert h.state("o2") is State.LOADED
            assert "o2" in await adapter.index() and adapter.count("unload", "o2") == 0
            assert "o1" not in await adapter.index()
    run(scenario())
