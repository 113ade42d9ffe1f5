"""Placement (agent/picker/placement.py) as a pure function of the agents' reports: the rules a
fleet's users notice (which agent serves a model), unit by unit, then as Hypothesis properties
over random fleets."""
from __future__ import annotations

import math
from collections import Counter

from hypothesis import given, settings, strategies as st

from agent.picker.placement import AgentReport, ModelReport, Placement, ring_assignment

GiB = 2**30


def agent(name: str, *, ready: bool = True, draining: bool = False, free: int | None = None,
          models: dict[str, ModelReport] | None = None) -> AgentReport:
    return AgentReport(name, f"{name}:8000", f"{name}:8001", ready, draining, free, models or {})


def fleet(n: int, models: int = 0, **kw) -> Placement:
    p = Placement(**kw)
    for i in range(n):
        p.set_agent(agent(f"10.0.0.{i}"), known=False)
    p.set_known({f"m{j}": 0 for j in range(models)})
    return p


def loaded(inflight: int = 0, last_used: float = 0.0, bytes: int = 0) -> ModelReport:
    return ModelReport("loaded", inflight, 0, bytes, last_used)


# ------------------------------------------------------------------------------ rules
def test_loaded_copy_wins_over_hashing():
    p = fleet(3, 10)
    target = p.choose("m1", 0.0).agent.name  # where hashing sends it
    other = next(a.name for a in p.agents() if a.name != target)
    p = fleet(3, 10)
    p.set_agent(agent(other, models={"m1": loaded()}), known=False)
    assert p.choose("m1", 0.0).agent.name == other
    assert p.choose("m1", 0.0).reason == "copy"


def test_a_reported_copy_beats_a_placement_not_yet_reported():
    """The picker sent m to one agent (not yet reported), then another agent reports m loaded
    (a request that reached it directly, or a report that raced the placement): the loaded copy
    serves, whatever the rendezvous order says; the unconfirmed placement is not a copy."""
    for j in range(40):
        p = fleet(3, 50)
        m = f"m{j}"
        placed = p.choose(m, 0.0).agent.name
        for other in [a.name for a in p.agents() if a.name != placed]:
            q = fleet(3, 50)
            assert q.choose(m, 0.0).agent.name == placed
            q.set_agent(agent(other, models={m: loaded()}), known=False, now=1.0)
            assert q.choose(m, 1.0).agent.name == other, (m, placed, other)


def test_least_inflight_copy_serves():
    p = fleet(3, 10, hot_rate=1e9)
    p.set_agent(agent("10.0.0.0", models={"m1": loaded(inflight=5)}), known=False)
    p.set_agent(agent("10.0.0.1", models={"m1": loaded(inflight=1)}), known=False)
    # one copy wanted: the stable first holder serves, whatever its in-flight count...
    first = p.choose("m1", 0.0).agent.name
    assert first in ("10.0.0.0", "10.0.0.1")
    # ...two copies wanted: the one with fewer requests in flight
    p = fleet(3, 10, hot_rate=0.05, max_copies=2)
    p.set_agent(agent("10.0.0.0", models={"m1": loaded(inflight=5)}), known=False)
    p.set_agent(agent("10.0.0.1", models={"m1": loaded(inflight=1)}), known=False)
    picks = Counter(p.choose("m1", 0.0).agent.name for _ in range(4))
    assert picks["10.0.0.1"] == 4  # 1+0..1+3 < 5: the busy copy gets nothing until they even out
    picks = Counter(p.choose("m1", 0.0).agent.name for _ in range(20))
    assert abs(picks["10.0.0.0"] - picks["10.0.0.1"]) <= 1  # then they alternate


def test_draining_and_not_ready_agents_are_never_chosen_and_their_models_move():
    p = fleet(3, 10)
    p.set_agent(agent("10.0.0.0", draining=True, models={"m1": loaded()}), known=False)
    p.set_agent(agent("10.0.0.1", ready=False, models={"m2": loaded()}), known=False)
    for m in ("m1", "m2", "m3", "nope"):
        for _ in range(3):
            assert p.choose(m, 0.0).agent.name == "10.0.0.2"


def test_dead_agent_leaves_at_once_and_its_models_are_placed_again():
    p = fleet(2, 10)
    p.set_agent(agent("10.0.0.0", models={"m1": loaded()}), known=False)
    assert p.choose("m1", 0.0).agent.name == "10.0.0.0"
    p.remove_agent("10.0.0.0")
    assert p.choose("m1", 0.0).agent.name == "10.0.0.1"
    assert p.choose("m1", 1.0).agent.name == "10.0.0.1"  # and it stays there (pending, then loaded)


def test_no_agent_no_choice():
    p = fleet(0, 3)
    assert p.choose("m1", 0.0) is None
    p.set_agent(agent("10.0.0.9", ready=False), known=False)
    assert p.choose("m1", 0.0) is None
    assert p.any_agent(0) is None


def test_unknown_model_is_hashed_without_bookkeeping():
    p = fleet(4, 3)
    first = p.choose("never-configured", 0.0)
    assert first.reason == "unknown"
    assert all(p.choose("never-configured", t).agent.name == first.agent.name for t in range(5))
    assert sum(p.load(a.name) for a in p.agents()) == 0


def test_room_decides_then_the_oldest_lru_victim():
    p = Placement()
    p.set_agent(agent("a", free=1 * GiB, models={"old": loaded(last_used=10.0), "x": ModelReport("cached", bytes=2 * GiB)}))
    p.set_agent(agent("b", free=1 * GiB, models={"older": loaded(last_used=5.0)}), known=False)
    p.set_agent(agent("c", free=3 * GiB), known=False)
    assert p.choose("x", 0.0).agent.name == "c"  # the only one with room
    p = Placement()
    p.set_agent(agent("a", free=1 * GiB, models={"old": loaded(last_used=10.0), "x": ModelReport("cached", bytes=2 * GiB)}))
    p.set_agent(agent("b", free=1 * GiB, models={"older": loaded(last_used=5.0)}), known=False)
    choice = p.choose("x", 0.0)
    assert (choice.agent.name, choice.reason) == ("b", "lru")  # nobody has room: oldest victim


def test_room_counts_what_the_picker_already_sent():
    p = Placement(load_factor=100)
    p.set_agent(agent("a", free=3 * GiB), known=False)
    p.set_agent(agent("b", free=3 * GiB), known=False)
    p.set_known({f"m{i}": 1 * GiB for i in range(6)})
    picks = Counter(p.choose(f"m{i}", 0.0).agent.name for i in range(6))
    assert picks == {"a": 3, "b": 3}


def test_a_model_sent_but_never_loaded_stops_counting_after_a_while():
    """Its load failed, or the agent evicted it before a report: the bound must not keep it."""
    p = fleet(2, 10, pending_ttl=30.0)
    name = p.choose("m1", 0.0).agent.name
    assert p.load(name) == 1
    p.set_agent(agent(name), known=False, now=10.0)
    assert p.load(name) == 1  # still on its way
    p.set_agent(agent(name), known=False, now=31.0)
    assert p.load(name) == 0
    p.set_agent(agent(name, models={"m1": loaded()}), known=False, now=40.0)
    assert p.load(name) == 1  # held now: counted as held


def test_hot_model_gets_copies_and_gives_them_back_with_hysteresis():
    p = fleet(4, 10, hot_rate=10.0, max_copies=3, rate_window=1.0, copy_hold=5.0)
    t = 0.0
    for _ in range(400):  # 100 requests/s for 4 s
        t += 0.01
        p.choose("m1", t)
    assert p.copies("m1") == 3
    assert len({p.choose("m1", t).agent.name for _ in range(12)}) == 3
    # rate 15/s: above what 1 copy carries, not low enough to give back the 3rd (< 0.5 x 2 x 10)
    for _ in range(150):
        t += 1 / 15
        p.choose("m1", t)
    assert p.copies("m1") == 3
    for _ in range(60):  # 2 requests/s for 30 s: copies go back, one per hold period
        t += 0.5
        p.choose("m1", t)
    assert p.copies("m1") == 1
    kinds = [e[0] for e in p.events]
    assert kinds == ["copy added", "copy added", "copy removed", "copy removed"]


def test_a_new_copy_goes_where_requests_are_fewer():
    p = fleet(4, 20, hot_rate=5.0, max_copies=2)
    names = [a.name for a in p.agents()]
    held = {n: {f"m{10 + 2 * i}": loaded(), f"m{11 + 2 * i}": loaded()} for i, n in enumerate(names)}  # idle fillers
    holder = names[0]
    held[holder]["m1"] = loaded()
    first, second = [n for n in p._walk("m1") if n != holder][:2]  # where hashing alone puts the copy
    held[first]["m9"] = loaded()
    for n in names:
        p.set_agent(agent(n, models=held[n]), known=False)
    assert max(p.load(n) for n in names) < math.ceil(1.25 * (sum(p.load(n) for n in names) + 1) / 4)  # models: room
    t = 0.0
    for _ in range(300):  # `first` serves m9 at 4.5 requests/s for a minute (not hot: one copy)
        t += 1 / 4.5
        p.choose("m9", t)
    for _ in range(80):  # m1 turns hot (100 requests/s): it wants a second copy
        t += 0.01
        p.choose("m1", t)
    assert p.copies("m9") == 1 and p.copies("m1") == 2
    assert {p.choose("m1", t).agent.name for _ in range(200)} == {holder, second}  # not the busy `first`


def test_stale_surplus_copies_get_no_traffic():
    p = fleet(4, 10, hot_rate=1e9)
    for i in range(3):
        p.set_agent(agent(f"10.0.0.{i}", models={"m1": loaded()}), known=False)
    assert len({p.choose("m1", 0.0).agent.name for _ in range(10)}) == 1


def test_subset_hint_limits_the_choice():
    p = fleet(3, 10)
    p.set_agent(agent("10.0.0.0", models={"m1": loaded()}), known=False)
    assert p.choose("m1", 0.0, {"10.0.0.2:8000"}).agent.name == "10.0.0.2"
    assert p.choose("m1", 0.0, {"10.0.0.7:8000"}) is None


def test_new_agent_takes_only_new_placements():
    p = fleet(3, 300)
    for j in range(300):
        p.choose(f"m{j}", 0.0)
    before = {f"m{j}": p.choose(f"m{j}", 0.0).agent.name for j in range(300)}
    p.set_agent(agent("10.0.0.3"), known=False)
    assert {m: p.choose(m, 0.0).agent.name for m in before} == before  # placed copies stay
    p.set_known({f"m{j}": 0 for j in range(400)})
    new = Counter(p.choose(f"m{j}", 0.0).agent.name for j in range(300, 400))
    assert new["10.0.0.3"] > 0
    cap = math.ceil(1.25 * (sum(p.load(a.name) for a in p.agents())) / 4)
    assert max(p.load(a.name) for a in p.agents()) <= cap


# ------------------------------------------------------------------------------ properties
names = st.lists(st.integers(0, 10_000), min_size=1, max_size=40, unique=True).map(lambda xs: [f"a{x}" for x in xs])


@settings(max_examples=40, deadline=None)
@given(names, st.integers(1, 400), st.sampled_from([1.1, 1.25, 1.5, 2.0]))
def test_property_bounded_load_holds(agent_names, models, c):
    p = Placement(load_factor=c)
    for n in agent_names:
        p.set_agent(agent(n), known=False)
    p.set_known({f"m{j}": 0 for j in range(models)})
    for j in range(models):
        p.choose(f"m{j}", 0.0)
        total = sum(p.load(n) for n in agent_names)
        assert max(p.load(n) for n in agent_names) <= math.ceil(c * total / len(agent_names))


@settings(max_examples=25, deadline=None)
@given(st.integers(4, 40), st.integers(0, 10_000))
def test_property_adding_an_agent_moves_about_one_nth(n, seed):
    models = [f"m{seed}-{j}" for j in range(40 * n)]
    before = ring_assignment([f"a{i}" for i in range(n)], models)
    after = ring_assignment([f"a{i}" for i in range(n + 1)], models)
    moved = sum(before[m] != after[m] for m in models) / len(models)
    # plain consistent hashing moves 1/(n+1); the bound cascades a little more
    assert moved <= 4.0 / (n + 1)


@settings(max_examples=40, deadline=None)
@given(names, st.data())
def test_property_a_loaded_copy_always_wins_and_draining_is_never_picked(agent_names, data):
    p = Placement(hot_rate=1e9)
    holders, draining = set(), set()
    for n in agent_names:
        drain = data.draw(st.booleans(), label=f"{n} draining")
        hold = data.draw(st.booleans(), label=f"{n} holds m")
        p.set_agent(agent(n, draining=drain, models={"m": loaded()} if hold else {}), known=False)
        (draining.add(n) if drain else None)
        (holders.add(n) if hold and not drain else None)
    p.set_known({"m": 0, "other": 0})
    for model in ("m", "other", "unknown"):
        choice = p.choose(model, 0.0)
        if len(draining) == len(agent_names):
            assert choice is None
            continue
        assert choice.agent.name not in draining
        if model == "m" and holders:
            assert choice.agent.name in holders
