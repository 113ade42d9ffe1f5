"""Eviction planning (pure): which loaded models to unload so that a need fits."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .cost import Cost, format_bytes


@dataclass(frozen=True)
class Candidate:
    """A loaded model the planner may evict. ``cost`` None: the manager's reservation for it.
    Times are ``time.monotonic()`` seconds. ``score``: how often it is asked for, as of the
    plan (``decayed``; the lowest goes first); 0 for every model under ``--eviction lru``."""

    name: str
    last_used: float
    loaded_at: float
    pinned: bool = False
    inflight: int = 0  # leases held by requests
    cost: Cost | None = None
    score: float = 0.0


def decayed(score: float, at: float, now: float, half_life: float) -> float:
    """A request count that halves every ``half_life`` ticks of the clock ``at``/``now`` are
    read on (the agent counts in requests: ``--eviction-half-life``) (LRFU's combined
    recency-frequency value with a base-2 decay: Lee et al., IEEE Trans. Computers 2001):
    ``score`` as of ``now``, given its value at ``at``. Each request adds 1 to the decayed
    value (the lease path inlines this), so a model asked for often ranks above one asked for
    once, and one that stopped being asked for sinks back to 0 within a few half-lives."""
    return score * math.exp2((at - now) / half_life) if score else 0.0


class DoesNotFit(Exception):
    """The model cannot be given its memory. ``permanent``: retrying will not help until the
    config changes (router: a failure); else ``retry_after_s`` says when it may (router: 503 +
    Retry-After). The model stays cached either way."""

    permanent = False

    def __init__(self, model: str | None, needed: Mapping[str, int], budget: Mapping[str, int],
                 message: str, *, devices: Iterable[str] = (), retry_after_s: float | None = None,
                 blocked_by: Mapping[str, int] | None = None, method: str = "estimated"):
        super().__init__(message)
        self.model = model
        self.needed = dict(needed)
        self.budget = dict(budget)
        self.devices = tuple(devices)  # devices where it does not fit
        self.retry_after_s = retry_after_s
        self.blocked_by = dict(blocked_by or {})  # "pinned" | "in_use" | "young" | "loading" -> bytes
        self.method = method


class LargerThanBudget(DoesNotFit):
    """The model's cost exceeds the whole budget of a device: it can never load here."""

    permanent = True


class Blocked(DoesNotFit):
    """It would fit, but the models in the way cannot be evicted now (leased, young, loading)
    or ever (pinned: then ``permanent``)."""

    def __init__(self, *args: Any, permanent: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.permanent = permanent


def eviction_order(c: Candidate) -> tuple[float, float, float, str]:
    """Eviction order: lowest score first (``--eviction lfu-decay``; all 0 under ``lru``), then
    least recently used, then loaded earliest, then by name (stable)."""
    return (c.score, c.last_used, c.loaded_at, c.name)


def plan_eviction(needed: Cost | Mapping[str, int], candidates: Iterable[Candidate], *,
                  free: Mapping[str, int], budget: Mapping[str, int], model: str | None = None,
                  respect_residency: bool = False, min_residency_s: float = 0.0,
                  now: float | None = None, reserved_elsewhere: Mapping[str, int] | None = None,
                  overhead: Mapping[str, int] | None = None) -> list[str]:
    """Names to evict in ``eviction_order`` (lowest score, then least recently used) so that
    ``needed`` fits on every budgeted device it touches. Devices without a budget are not checked. Eligible: not pinned, no lease,
    and (``respect_residency``) loaded at least ``min_residency_s`` ago; a candidate that frees
    nothing on a device still short is skipped. ``reserved_elsewhere``: bytes per device held by
    models that are not candidates because they are loading, ``overhead``: server-level bytes
    (both only used to explain a Blocked). Raises LargerThanBudget or Blocked. O(n log n)."""
    need = needed.devices() if isinstance(needed, Cost) else {d: int(b) for d, b in needed.items()}
    method = needed.method if isinstance(needed, Cost) else "estimated"
    need = {d: b for d, b in need.items() if b > 0 and d in budget}
    too_big = [d for d, b in need.items() if b > budget[d]]
    if too_big:
        raise LargerThanBudget(
            model, need, budget,
            f"model {model!r} needs {_fmt_devs(need, too_big)} ({method}), larger than the whole budget "
            f"({_fmt_devs(budget, too_big)}); it stays cached but cannot load on this node"
            + ("; if the estimate is too high, declare its memory or lower --memory-multiplier"
               if method == "estimated" else ""),
            devices=too_big, method=method)
    short = shortfall(need, free, budget)
    if not short:
        return []
    now = time.monotonic() if now is None else now
    eligible: list[Candidate] = []
    blocked = {"pinned": 0, "in_use": 0, "young": 0}
    movable = dict.fromkeys(short, 0)  # bytes per short device held by leased/young models
    young_until: list[float] = []
    for c in candidates:
        if c.cost is None:
            raise ValueError(f"candidate {c.name!r} has no cost")
        if c.pinned:
            blocked["pinned"] += _on(c.cost, short)
            continue
        if c.inflight > 0:
            blocked["in_use"] += _on(c.cost, short)
        elif respect_residency and now - c.loaded_at < min_residency_s:
            blocked["young"] += _on(c.cost, short)
            young_until.append(c.loaded_at + min_residency_s)
        else:
            eligible.append(c)
            continue
        devs = c.cost.devices()
        for d in movable:
            movable[d] += devs.get(d, 0)
    eligible.sort(key=eviction_order)
    victims, remaining = take_in_order(eligible, short)
    if not remaining:
        return victims
    # Not enough even with every eligible model gone: say what is in the way.
    elsewhere = reserved_elsewhere or {}
    blocked["loading"] = _on_map(elsewhere, short)
    blocked["server"] = _on_map(overhead or {}, short)
    blocked = {k: v for k, v in blocked.items() if v > 0}
    # Permanent when even the leased, young and loading models going away would leave a device
    # short: only pinned models (or models outside any budget's reach) are in the way.
    permanent = any(remaining[d] > movable[d] + elsewhere.get(d, 0) for d in remaining)
    retry = None
    if not permanent:
        retry = 1.0
        if young_until and set(blocked) <= {"young", "pinned"}:
            retry = float(max(1, math.ceil(min(young_until) - now)))
    what = ", ".join(f"{k.replace('_', '-')} {format_bytes(v)}" for k, v in sorted(blocked.items())) or "nothing evictable"
    raise Blocked(
        model, need, budget,
        f"model {model!r} needs {_fmt_devs(need, short)} ({method}); free {_fmt_devs(free, short)} "
        f"of budget {_fmt_devs(budget, short)}; evicting every eligible model leaves "
        f"{_fmt_devs(remaining, remaining)} short; in the way: {what}"
        + (f"; {_unmovable(blocked)} leave too little room" if permanent else ""),
        devices=list(short), retry_after_s=retry, blocked_by=blocked, permanent=permanent, method=method)


def _unmovable(blocked: Mapping[str, int]) -> str:
    """What no eviction frees among what is in the way (a permanent Blocked): pinned models, the
    server's own bytes (its runtime imports, also one expected for a first load, and its
    allocator reserve), or both."""
    what = [w for k, w in (("pinned", "pinned models"),
                           ("server", "the server's own bytes (runtime imports, allocator reserve)")) if blocked.get(k)]
    return " and ".join(what) or "pinned models"


def shortfall(needed: Cost | Mapping[str, int], free: Mapping[str, int], budget: Mapping[str, int]) -> dict[str, int]:
    """Device -> bytes ``needed`` lacks beyond ``free`` on the budgeted devices it touches; empty
    when it fits (``plan_eviction`` then evicts nothing, whatever the candidates)."""
    need = needed.devices() if isinstance(needed, Cost) else needed
    return {d: b - free.get(d, 0) for d, b in need.items() if b > 0 and d in budget and b > free.get(d, 0)}


def plan_reclaim(short: Mapping[str, int], candidates: Iterable[Candidate], *, min_residency_s: float = 0.0,
                 now: float | None = None) -> list[str]:
    """Victims that free ``short`` bytes per device ahead of need (headroom), in
    ``eviction_order``, by the rules of ``plan_eviction`` for a lazy load: never pinned, never leased,
    never loaded less than ``min_residency_s`` ago. Best effort: when the eligible models free
    less than ``short``, all of them (none raises)."""
    now = time.monotonic() if now is None else now
    eligible = sorted((c for c in candidates if not c.pinned and c.inflight == 0 and now - c.loaded_at >= min_residency_s),
                      key=eviction_order)
    return take_in_order(eligible, short)[0]


def take_in_order(eligible: Iterable[Candidate], short: Mapping[str, int]) -> tuple[list[str], dict[str, int]]:
    """Take candidates in order (each with a cost) until ``short`` bytes are covered on every
    device; one that frees nothing on a device still short is skipped. Returns (victims, what
    is still short)."""
    victims: list[str] = []
    remaining = {d: b for d, b in short.items() if b > 0}
    for c in eligible:
        if not remaining:
            break
        devs = c.cost.devices() if c.cost is not None else {}
        if not any(devs.get(d, 0) > 0 for d in remaining):
            continue
        victims.append(c.name)
        for d in list(remaining):
            remaining[d] -= devs.get(d, 0)
            if remaining[d] <= 0:
                del remaining[d]
    return victims, remaining


def _on(cost: Cost, devices: Mapping[str, int]) -> int:
    devs = cost.devices()
    return sum(devs.get(d, 0) for d in devices)


def _on_map(amounts: Mapping[str, int], devices: Mapping[str, int]) -> int:
    return sum(amounts.get(d, 0) for d in devices)


def _fmt_devs(amounts: Mapping[str, int], devices: Iterable[str]) -> str:
    return " ".join(f"{d}={format_bytes(amounts.get(d, 0))}" for d in sorted(devices))


