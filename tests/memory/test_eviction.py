"""The eviction planner and the reservation ledger: LRU order (and --eviction lfu-decay's
decayed request counts: a frequently used model outlives one-shot models, a once-hot one is
forgotten), what may never be evicted
(pinned, leased, too young for a lazy load), several devices at once, and the two ways a model
does not fit (larger than the whole budget: permanent; blocked: retry later)."""
from __future__ import annotations

import pytest

from agent.memory import HOST, Blocked, Candidate, Cost, DoesNotFit, LargerThanBudget, MemoryManager, decayed, plan_eviction
from agent.memory.planner import plan_reclaim

from .conftest import GiB, MiB

NOW = 10_000.0


def c(name, last_used, host=100, gpu=None, loaded_at=0.0, pinned=False, inflight=0):
    return Candidate(name, last_used=last_used, loaded_at=loaded_at, pinned=pinned, inflight=inflight,
                     cost=Cost(host, gpu or {}, "measured"))


def plan(needed, cands, free, budget, **kw):
    kw.setdefault("now", NOW)
    return plan_eviction(needed, cands, free=free, budget=budget, model="new", **kw)


def test_nothing_to_evict_when_it_fits():
    assert plan(Cost(100), [c("a", 1)], free={HOST: 100}, budget={HOST: 500}) == []


def test_lru_order_and_stops_as_soon_as_it_fits():
    cands = [c("warm", 50), c("coldest", 10), c("hot", 90), c("cold", 20), c("mid", 40)]
    assert plan(Cost(150), cands, free={HOST: 0}, budget={HOST: 500}) == ["coldest", "cold"]
    assert plan(Cost(150), cands, free={HOST: 60}, budget={HOST: 500}) == ["coldest"]
    assert plan(Cost(500), cands, free={HOST: 0}, budget={HOST: 500}) == ["coldest", "cold", "mid", "warm", "hot"]


def test_skips_pinned_and_leased():
    cands = [c("pinned-old", 1, pinned=True), c("busy-old", 2, inflight=3), c("idle", 50), c("idle2", 60)]
    assert plan(Cost(200), cands, free={HOST: 0}, budget={HOST: 400}) == ["idle", "idle2"]


def test_min_residency_applies_to_lazy_loads_only():
    cands = [c("young", 1, loaded_at=NOW - 5), c("old", 50, loaded_at=NOW - 100)]
    lazy = dict(respect_residency=True, min_residency_s=30)
    assert plan(Cost(100), cands, free={HOST: 0}, budget={HOST: 200}, **lazy) == ["old"]
    # preload / reconcile: residency does not protect, plain LRU
    assert plan(Cost(100), cands, free={HOST: 0}, budget={HOST: 200}) == ["young"]


def test_multi_device_evicts_only_what_frees_the_short_device():
    budget = {HOST: 1000, "gpu:0": 1000, "gpu:1": 1000}
    cands = [
        c("host-only", 1, host=100),
        c("on-gpu0", 2, host=10, gpu={"gpu:0": 600}),
        c("on-gpu1-a", 3, host=10, gpu={"gpu:1": 300}),
        c("on-gpu1-b", 4, host=10, gpu={"gpu:1": 300}),
    ]
    free = {HOST: 500, "gpu:0": 0, "gpu:1": 100}
    # needs gpu:1 only: older host-only and gpu:0 models are left alone
    assert plan(Cost(50, {"gpu:1": 500}), cands, free=free, budget=budget) == ["on-gpu1-a", "on-gpu1-b"]
    # needs room on host AND gpu:0: one victim that frees gpu:0, then host
    free = {HOST: 0, "gpu:0": 0, "gpu:1": 100}
    assert plan(Cost(50, {"gpu:0": 500}), cands, free=free, budget=budget) == ["host-only", "on-gpu0"]
    # devices without a budget are not checked (GPU budgeting off)
    assert plan(Cost(50, {"gpu:0": 10**12}), cands, free={HOST: 100}, budget={HOST: 1000}) == []


def test_larger_than_whole_budget_is_permanent_and_named():
    with pytest.raises(LargerThanBudget) as ei:
        plan(Cost(3 * GiB, {}, "declared"), [c("a", 1)], free={HOST: GiB}, budget={HOST: 2 * GiB})
    e = ei.value
    assert e.permanent and e.model == "new" and e.devices == (HOST,)
    msg = str(e)
    assert "'new'" in msg and "host=3.0GiB" in msg and "host=2.0GiB" in msg and "larger than the whole budget" in msg
    assert "declared" in msg and "stays cached" in msg


def test_blocked_by_leases_is_transient():
    cands = [c("busy", 1, host=300, inflight=1), c("idle", 2, host=100)]
    with pytest.raises(Blocked) as ei:
        plan(Cost(300), cands, free={HOST: 0}, budget={HOST: 400})
    e = ei.value
    assert not e.permanent and e.retry_after_s == 1.0
    assert e.blocked_by == {"in_use": 300}
    assert "in-use 300B" in str(e) and "'new'" in str(e)


def test_blocked_by_young_models_says_when_to_retry():
    cands = [c("young", 1, host=300, loaded_at=NOW - 18)]
    with pytest.raises(Blocked) as ei:
        plan(Cost(300), cands, free={HOST: 100}, budget={HOST: 400}, respect_residency=True, min_residency_s=30)
    assert not ei.value.permanent and ei.value.retry_after_s == 12.0 and ei.value.blocked_by == {"young": 300}


def test_blocked_only_by_pinned_is_permanent():
    cands = [c("pinned", 1, host=350, pinned=True), c("idle", 2, host=50)]
    with pytest.raises(Blocked) as ei:
        plan(Cost(200), cands, free={HOST: 0}, budget={HOST: 400})
    e = ei.value
    assert isinstance(e, DoesNotFit) and e.permanent and e.retry_after_s is None
    assert "pinned" in str(e)


def test_planner_picks_the_lru_ones_among_thousands_of_models():
    """(Its speed is not timed here: a timed pass/fail test flakes on a shared machine.)"""
    cands = [c(f"m{i}", last_used=(i * 7919) % 10_000, host=MiB) for i in range(10_000)]
    victims = plan(Cost(500 * MiB), cands, free={HOST: 0}, budget={HOST: 10_000 * MiB})
    assert len(victims) == 500
    order = {x.name: x.last_used for x in cands}
    assert [order[v] for v in victims] == sorted(order[v] for v in victims)
    assert max(order[v] for v in victims) < min(l for n, l in order.items() if n not in victims)


# -- the ledger ---------------------------------------------------------------------------------


def test_reserve_release_used_free():
    mm = MemoryManager({HOST: 1000, "gpu:0": 500})
    mm.reserve("a", Cost(300, {"gpu:0": 200}))
    mm.reserve("b", Cost(200))
    assert mm.used() == {HOST: 500, "gpu:0": 200} and mm.free() == {HOST: 500, "gpu:0": 300}
    assert mm.fits(Cost(500, {"gpu:0": 300})) and not mm.fits(Cost(501))
    assert mm.fits(Cost(800), name="a")  # replacing a's own reservation
    assert mm.release("a") == Cost(300, {"gpu:0": 200})
    assert mm.release("a") is None
    assert mm.used() == {HOST: 200, "gpu:0": 0}


def test_update_reports_over_budget():
    mm = MemoryManager({HOST: 1000})
    mm.reserve("a", Cost(600))
    mm.reserve("b", Cost(300))
    assert mm.update("a", Cost(650, {}, "measured")) == {}
    assert mm.update("a", Cost(900, {}, "measured")) == {HOST: 200}


def test_admit_reserves_and_never_counts_the_same_victim_twice():
    mm = MemoryManager({HOST: 1000}, min_residency_s=0)
    for name, lu in (("old", 1), ("mid", 2), ("new", 3)):
        mm.reserve(name, Cost(300, {}, "measured"))
    cands = [Candidate(n, last_used=lu, loaded_at=0) for n, lu in (("old", 1), ("mid", 2), ("new", 3))]  # cost None: use reservation
    assert mm.admit("x", Cost(400), cands, now=NOW) == ["old"]
    # "old" is being unloaded: its bytes are promised to x. y must take the next one.
    # A swap in progress never reads above the budget: "used" is what admission counts; "held"
    # also counts the victim until its unload finished.
    assert mm.used()[HOST] == 1000 and mm.free()[HOST] == 0
    assert mm.held()[HOST] == 1300
    assert mm.ledger_doc()["devices"][HOST] == {"budget": 1000, "used": 1000, "held": 1300, "overhead": 0}
    assert mm.admit("y", Cost(250), cands, now=NOW) == ["mid"]
    mm.release("old")
    mm.release("mid")
    assert mm.used()[HOST] == 300 + 400 + 250 and mm.free()[HOST] == 50


def test_an_admission_that_fits_reads_no_candidate_and_one_that_does_not_reads_them():
    """A miss on a node with free room (the headroom kept) costs no pass over the loaded models:
    the reconciler hands the candidates over lazily and the ledger reads them only when short."""
    mm = MemoryManager({HOST: 1000}, min_residency_s=0)
    mm.reserve("old", Cost(600, {}, "measured"))
    read: list[str] = []

    def cands():
        read.append("old")
        yield Candidate("old", last_used=1, loaded_at=0)

    assert mm.admit("fits", Cost(300), cands(), now=NOW) == [] and read == []
    assert "fits" in mm.reservations()
    assert mm.admit("short", Cost(300), cands(), now=NOW) == ["old"] and read == ["old"]


def test_admit_failure_reserves_nothing_and_names_loading_models():
    mm = MemoryManager({HOST: 1000})
    mm.reserve("loading", Cost(700))  # no candidate for it: it is still loading
    with pytest.raises(Blocked) as ei:
        mm.admit("x", Cost(500), [], lazy=True, now=NOW)
    assert ei.value.blocked_by == {"loading": 700} and not ei.value.permanent
    assert "x" not in mm.reservations()


def test_manager_applies_min_residency_for_lazy():
    mm = MemoryManager({HOST: 300}, min_residency_s=30, clock=lambda: NOW)
    mm.reserve("a", Cost(300))
    cands = [Candidate("a", last_used=NOW - 1, loaded_at=NOW - 10)]
    with pytest.raises(Blocked) as ei:
        mm.plan_eviction(Cost(100), cands, model="b", lazy=True)
    assert ei.value.retry_after_s == 20.0
    assert mm.plan_eviction(Cost(100), cands, model="b", lazy=False) == ["a"]


def test_headroom_is_n_loads_of_the_median_model_within_a_tenth_of_the_budget():
    mm = MemoryManager({HOST: 1000, "gpu:0": 1000}, min_residency_s=0.0, min_model_bytes=1)
    assert mm.headroom(4, 0.10) == {}  # nothing loaded: nothing to size it by
    for i, size in enumerate([10, 20, 20, 300]):
        mm.reserve(f"m{i}", Cost(size, {"gpu:0": 300} if i == 3 else {}, "measured"))
    assert mm.headroom(2, 0.10) == {HOST: 40}  # the median (20), not the mean; gpu: 300 > 10% of it
    assert mm.headroom(8, 0.10) == {HOST: 100}  # capped at whole loads within 10% of the budget
    assert mm.headroom(0, 0.10) == {}
    mm.begin_unload("m0")  # unloading models no longer count: the median is 300 now
    mm.begin_unload("m1")
    assert mm.headroom(1, 0.5) == {HOST: 300, "gpu:0": 300}


def test_reclaim_frees_the_target_lru_first_and_marks_nothing():
    mm = MemoryManager({HOST: 400}, min_residency_s=5.0, min_model_bytes=1, clock=lambda: NOW)
    for name in ("old", "pinned", "leased", "young", "recent"):
        mm.reserve(name, Cost(80, {}, "measured"))
    cands = [c("old", 1, host=80), c("pinned", 0, host=80, pinned=True), c("leased", 2, host=80, inflight=1),
             c("young", 3, host=80, loaded_at=NOW - 1), c("recent", 9, host=80)]
    assert mm.free() == {HOST: 0}
    assert mm.reclaim({HOST: 100}, cands) == ["old", "recent"]  # never pinned, leased or young
    assert mm.free() == {HOST: 0}  # nothing counts as free before each unload commits
    assert mm.reclaim({HOST: 500}, cands) == ["old", "recent"]  # best effort: all it may take
    mm.release("old")
    assert mm.reclaim({HOST: 80}, cands) == []  # the target is free already


# -- --eviction lfu-decay: the order by decayed request count (what Reconciler._lease keeps) --------
def scored(requests: list[str], half_life: float, resident: list[str]) -> list[Candidate]:
    """Candidates for `resident` after `requests` (one per tick, in order), each with the score
    the agent gives it: every request adds 1 to its model's count, which halves every
    `half_life` requests; half_life 0: lru (every score 0)."""
    score: dict[str, float] = {}
    at: dict[str, float] = {}
    for tick, name in enumerate(requests, 1):
        if half_life:
            score[name] = decayed(score.get(name, 0.0), at.get(name, 0.0), tick, half_life) + 1.0
            at[name] = tick
    now = float(len(requests))
    last = {name: tick for tick, name in enumerate(requests, 1)}
    return [Candidate(n, last_used=last[n], loaded_at=0.0, cost=Cost(100, {}, "measured"),
                      score=decayed(score[n], at[n], now, half_life) if half_life else 0.0) for n in resident]


def test_lfu_decay_keeps_a_frequently_used_model_through_a_burst_of_one_shot_models():
    one_shots = [f"once-{i}" for i in range(4)]
    requests = ["hot"] * 20 + one_shots  # room for 5: hot and the four one-shots are loaded
    resident = ["hot", *one_shots]
    evict = lambda half_life: plan(Cost(100), scored(requests, half_life, resident), free={HOST: 0}, budget={HOST: 500})  # noqa: E731
    assert evict(100) == ["once-0"]  # lfu-decay: the least asked-for (then least recent) goes
    assert evict(0) == ["hot"]  # lru: the frequently used model is the least recently used one


def test_lfu_decay_forgets_a_once_hot_model_after_its_half_lives():
    # "old" was asked for 50 times, then (after 90 requests to others) "steady" 3 times, then "old"
    # once more: LRU evicts "steady" (its last use is older), a count that never decays keeps "old"
    # for ever; with a half-life of 10 requests, old's 50 requests ~10 half-lives ago weigh less
    # than steady's 3 recent ones
    requests = ["old"] * 50 + [f"other-{i % 30}" for i in range(90)] + ["steady", "a", "steady", "b", "steady"] + ["old"] + ["x"] * 10
    resident = ["old", "steady"]
    evict = lambda half_life: plan(Cost(100), scored(requests, half_life, resident), free={HOST: 0}, budget={HOST: 300})  # noqa: E731
    assert evict(10) == ["old"]
    assert evict(10_000) == ["steady"]  # within its half-life, old's 50 requests still protect it
    assert evict(0) == ["steady"]  # lru


def test_reclaim_for_the_headroom_follows_the_same_order():
    cands = [Candidate("hot", last_used=1, loaded_at=0, cost=Cost(100, {}, "measured"), score=9.0),
             Candidate("rare", last_used=5, loaded_at=0, cost=Cost(100, {}, "measured"), score=1.0)]
    assert plan_reclaim({HOST: 100}, cands, now=NOW) == ["rare"]


def test_the_eviction_flags_take_a_policy_and_a_half_life_and_say_what_is_wrong(capsys):
    from agent.cli import build_parser, settings_from_args

    def parse(*flags: str):
        return settings_from_args(build_parser().parse_args(["run", "--config-dir", "/c", "--cache-dir", "/d", *flags]))

    s = parse()
    assert (s.eviction, s.eviction_half_life) == ("lru", 100.0)
    s = parse("--eviction", "lfu-decay", "--eviction-half-life", "500")
    assert (s.eviction, s.eviction_half_life) == ("lfu-decay", 500.0)
    with pytest.raises(SystemExit):
        parse("--eviction", "lfu")
    assert "invalid choice: 'lfu'" in capsys.readouterr().err
    for bad in ("0", "-5", "soon", "inf"):
        with pytest.raises(SystemExit):
            parse("--eviction-half-life", bad)
        assert f"--eviction-half-life {bad!r} is not a number of requests" in capsys.readouterr().err


def test_the_allocator_keep_is_a_ledger_line_of_its_own():
    """--server-malloc-keep: bytes the embedded server's allocator may keep resident after
    models are freed are counted as used (beside the runtime imports), so they take room from
    models, and /status's ledger shows them; a sidecar or Triton keeps none."""
    from agent.settings import Settings

    mm = MemoryManager({HOST: 1000}, malloc_keep=300, min_residency_s=0)
    assert mm.used()[HOST] == 300 and mm.free()[HOST] == 700
    mm.reserve("a", Cost(600))
    assert not mm.fits(Cost(200))
    assert mm.plan_eviction(Cost(200), [Candidate("a", last_used=1, loaded_at=0)], now=NOW) == ["a"]
    doc = mm.ledger_doc()
    assert doc["malloc_keep"]["host"] == 300 and doc["devices"][HOST]["overhead"] == 300
    with pytest.raises(Blocked) as ei:  # fits the budget, never beside the keep: said so, for good
        mm.plan_eviction(Cost(800), [Candidate("a", last_used=1, loaded_at=0)], now=NOW)
    assert ei.value.permanent and "server 300B" in str(ei.value)

    s = Settings(config_dir=".", cache_dir=".", host_memory="1000", server_malloc_keep=300)
    assert MemoryManager.from_settings(s, gpu_probe=None).malloc_keep == 300
    for other in ({"server_url": "http://127.0.0.1:1"}, {"server": "triton"}):
        s = Settings(config_dir=".", cache_dir=".", host_memory="1000", server_malloc_keep=300, **other)
        assert MemoryManager.from_settings(s, gpu_probe=None).malloc_keep == 0


def test_each_server_process_keeps_its_own_allocator_reserve_line():
    """--server-processes N with --server-malloc-keep K: every process that loads a model keeps
    its own reserve, so the ledger counts K for each of them beside the models, plus K for each
    load admitted whose process is not known yet (it may be an idle process's first), at most
    N x K; /status says how many; a model that only fits beside no reserve is refused for good;
    and the default K is split so that all processes together keep at most the default's share
    of the budget."""
    from agent.cli import build_parser, settings_from_args

    mm = MemoryManager({HOST: 1000}, malloc_keep=200, server_processes=2, min_residency_s=0)
    assert mm.used()[HOST] == 0  # no process has loaded anything: none keeps freed heap
    mm.admit("a", Cost(100), [])  # not placed yet: its process may be one that holds nothing
    assert mm.used()[HOST] == 300
    mm.abort_measure(mm.start_measure("a", measure=False, server_pid=11))  # placed: process 11
    mm.admit("b", Cost(100), [], server_pid=11)  # into process 11, which keeps its reserve already
    assert mm.used()[HOST] == 400
    doc = mm.ledger_doc()
    assert doc["malloc_keep"] == {"host": 200, "per_process": 200, "processes": 1}
    assert doc["devices"][HOST]["overhead"] == 200
    mm.admit("c", Cost(100), [])
    mm.admit("d", Cost(100), [])  # two loads not placed, one process idle: one more reserve, not two
    assert mm.used()[HOST] == 800 and mm.ledger_doc()["malloc_keep"]["processes"] == 2
    for name in "abcd":
        mm.release(name)
    assert mm.used()[HOST] == 200  # process 11 keeps what its models freed
    with pytest.raises(Blocked) as ei:  # 900 fits the budget, never beside process 11's reserve
        mm.plan_eviction(Cost(900), [], now=NOW)
    assert ei.value.permanent

    def keep(*argv: str) -> int:
        return settings_from_args(build_parser().parse_args(
            ["run", "--config-dir=/c", "--cache-dir=/d", "--host-memory=800Mi", *argv])).server_malloc_keep

    assert keep() == 100 * 2**20  # 1/8 of 800Mi
    assert keep("--server-processes=2") == 50 * 2**20  # two reserves, the same share together
    assert keep("--server-processes=2", "--server-malloc-keep=30Mi") == 30 * 2**20  # given: per process


def test_several_server_processes_report_their_reserves_summed(tmp_path):
    """The ledger snapshots every process's tree at once, so a load's measurement subtracts the
    growth of all the processes' reserves together (ShardedAdapter.allocator_reserve)."""
    from agent.runtimes.shards import ShardedAdapter

    adapter = ShardedAdapter(tmp_path, 2, malloc_keep=64 * 2**20)
    figures = [5, None]
    for shard, figure in zip(adapter.shards, figures):
        shard.allocator_reserve = (lambda f=figure: f)
    assert adapter.allocator_reserve() == 5
    figures_2 = [5, 7]
    for shard, figure in zip(adapter.shards, figures_2):
        shard.allocator_reserve = (lambda f=figure: f)
    assert adapter.allocator_reserve() == 12
    for shard in adapter.shards:
        shard.allocator_reserve = lambda: None
    assert adapter.allocator_reserve() is None
