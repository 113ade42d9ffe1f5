"""Placement: which agent a request for a model goes to. Pure: no I/O, no clock (callers pass
`now`), so the unit tests, the Hypothesis properties and the 1,000-agent simulation drive the same
code the picker runs.

The picker only routes; agents alone load and unload (a request for a model an agent does not
hold makes that agent load it lazily, evicting its least-recently-used model when memory is
short). So placement is a preference expressed by routing, and every bit of state here is soft:
it is rebuilt from the agents' reports (`set_agent`) and the picker's own request counts.

The decision for one request (`choose`), in order:

1. Eligible agents: ready and not draining (and inside the gateway's subset hint, when it sends
   one). None: no choice (the picker answers 503). An agent whose report fails is removed by the
   caller (`remove_agent`) and stops being chosen at once; its models are placed again on their
   next request by the rules below.
2. A model no agent reports (not configured anywhere): plain ring hashing over the eligible
   agents, no bookkeeping; that agent answers 404 in the protocol's shape.
3. A loaded copy first: the model's holders are the eligible agents that report it `loaded` or
   `loading`, plus agents this picker sent it to that have not reported yet. Of those, the first
   `copies(model)` serve: reported `loaded` copies before `loading` ones before unconfirmed
   placements (a placement never beats a copy), each class in rendezvous order (so the surplus after a failback or a resize gets no
   traffic and ages out of its agent's LRU: stale copies drain), and the one with the fewest
   requests in flight wins: the agent's last reported in-flight count for the model plus the
   requests this picker sent it since that report.
4. Fewer holders than wanted copies (no copy at all, or a hot model wanting one more): a new copy
   goes to the first agent clockwise from the model's point on a hash ring (`vnodes` points per
   agent) that is under the bounded load, i.e. holds fewer than ceil(c x (total + 1) / agents)
   models (c = `load_factor`, 1.25: consistent hashing with bounded loads), and whose free host
   memory (reported free minus what this picker already sent it) covers the model's bytes. When
   none of the first `room_candidates` agents under the bound has room, the one among them whose
   least-recently-used idle model is oldest takes it (it evicts that model to load this one).
5. Hot models: the picker counts requests per model (an exponentially weighted rate over
   `rate_window` seconds). Above `hot_rate` requests/s per copy a model wants one more copy (up to
   `max_copies`); it gives one back only when its rate falls under half of what the remaining
   copies would carry and the last change is `copy_hold` seconds old (hysteresis: no flapping).
   A new copy is placed as in 4, skipping agents this picker sends more than c x the mean agent's
   request rate (copies are there to spread requests; the model bound alone would not).

A new agent takes load gradually: loaded copies never move to it; it receives only new
placements (cold models, a dead agent's models, new hot copies) that hash onto its arcs of the
ring, and the bound keeps it at most c x mean even while it is the emptiest agent. Adding an
agent changes where ~1/N of cold models would be placed; loaded ones stay.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Collection, Iterable, Iterator, Mapping

import xxhash

HOLDING = frozenset({"loaded", "loading"})


def _hash(text: str) -> int:
    return xxhash.xxh3_64_intdigest(text.encode())


@dataclass(frozen=True, slots=True)
class ModelReport:
    """One model as an agent reports it (GET /fleet/state `models.<name>`)."""

    state: str
    inflight: int = 0
    requests: int = 0
    bytes: int = 0
    last_used: float = 0.0


@dataclass(slots=True)
class AgentReport:
    """One agent as the picker last saw it. `endpoint` is the data plane's ip:port (REST),
    `grpc_endpoint` its gRPC ip:port; `host_free` None means no host budget."""

    name: str
    endpoint: str
    grpc_endpoint: str = ""
    ready: bool = True
    draining: bool = False
    host_free: int | None = None
    models: Mapping[str, ModelReport] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Choice:
    agent: AgentReport
    reason: str  # "copy" (a holder), "placed" (bounded-load hashing), "lru" (evicts), "unknown"


@dataclass(slots=True)
class _Agent:
    report: AgentReport
    eligible: bool
    held: dict[str, ModelReport]
    lru_age: float  # last_used of its oldest idle loaded model (inf: none)
    pending_bytes: int = 0
    pending: int = 0
    routed: dict[str, int] = field(default_factory=dict)
    rate: float = 0.0  # requests/s this picker sent it (exponentially weighted), as of rate_at
    rate_at: float = 0.0

    @property
    def load(self) -> int:
        return len(self.held) + self.pending


class Placement:
    def __init__(self, *, load_factor: float = 1.25, vnodes: int = 64, hot_rate: float = 50.0, max_copies: int = 4,
                 rate_window: float = 10.0, copy_hold: float = 30.0, room_candidates: int = 8, pending_ttl: float = 60.0):
        if load_factor < 1.0:
            raise ValueError(f"load_factor must be >= 1 (got {load_factor})")
        self.load_factor, self.vnodes = load_factor, vnodes
        self.hot_rate, self.max_copies = hot_rate, max_copies
        self.rate_window, self.copy_hold = rate_window, copy_hold
        self.room_candidates = room_candidates
        self.pending_ttl = pending_ttl  # a model sent to an agent that never reports it stops counting against it
        self._agents: dict[str, _Agent] = {}
        self._ring_keys: list[int] = []
        self._ring_names: list[str] = []
        self._ring_sorted = True
        self._holders: dict[str, set[str]] = {}  # model -> agents reporting it loaded/loading
        self._assigned: dict[str, dict[str, float]] = {}  # model -> {agent sent it, not yet reporting it: when}
        self._known: dict[str, int] = {}  # every configured model -> bytes (latest report)
        self._rate: dict[str, tuple[float, float]] = {}  # model -> (requests/s, at)
        self._copies: dict[str, tuple[int, float]] = {}  # model -> (wanted copies, changed at)
        self._eligible_load = 0
        self._eligible_count = 0
        self._total_rate, self._total_at = 0.0, 0.0  # requests/s of the whole fleet through this picker
        self.events: list[tuple[str, str, int]] = []  # (event, model, copies): hot copies added/removed

    # ------------------------------------------------------------------ the fleet
    def set_agent(self, report: AgentReport, known: bool = True, now: float | None = None) -> None:
        """Replace what is known of one agent. `known`: its model list also names every
        configured model (the agents share one config), refreshing the known set and sizes.
        `now` (the clock `choose` gets): models sent to it more than `pending_ttl` ago that it
        does not hold (their load failed, or they were already evicted) stop counting against it."""
        old = self._agents.get(report.name)
        if old is None:
            self._add_to_ring(report.name)
        else:
            self._forget(old)
            for model in old.held:
                holders = self._holders.get(model)
                if holders is not None:
                    holders.discard(report.name)
                    if not holders:
                        del self._holders[model]
        held = {m: r for m, r in report.models.items() if r.state in HOLDING}
        if known and report.models:
            self._known = {m: r.bytes for m, r in report.models.items()}
        idle = [r.last_used for r in held.values() if r.state == "loaded" and r.inflight == 0]
        agent = _Agent(report, report.ready and not report.draining, held, min(idle) if idle else math.inf)
        if old is not None:
            agent.rate, agent.rate_at = old.rate, old.rate_at
        for model in held:
            self._holders.setdefault(model, set()).add(report.name)
            self._unassign(model, report.name)
        # what this picker sent it and it has not reported yet still counts against it, for a while
        for model, agents in list(self._assigned.items()):
            at = agents.get(report.name)
            if at is None:
                continue
            if now is not None and now - at > self.pending_ttl:
                self._unassign(model, report.name)
            else:
                agent.pending += 1
                agent.pending_bytes += self._known.get(model, 0)
        self._agents[report.name] = agent
        self._count(agent)

    def set_known(self, models: Mapping[str, int]) -> None:
        """Every configured model and its bytes (when reports carry only held models)."""
        self._known = dict(models)

    def remove_agent(self, name: str) -> None:
        """The agent is gone (its report failed): never chosen again until it reports again."""
        agent = self._agents.pop(name, None)
        if agent is None:
            return
        self._forget(agent)
        for model in agent.held:
            holders = self._holders.get(model)
            if holders is not None:
                holders.discard(name)
                if not holders:
                    del self._holders[model]
        for model in [m for m, agents in self._assigned.items() if name in agents]:
            self._unassign(model, name)
        keep = [i for i, n in enumerate(self._ring_names) if n != name]
        self._ring_keys = [self._ring_keys[i] for i in keep]
        self._ring_names = [self._ring_names[i] for i in keep]

    def agents(self) -> list[AgentReport]:
        return [a.report for a in self._agents.values()]

    def load(self, name: str) -> int:
        """Models the agent holds or was sent (what the bound counts)."""
        agent = self._agents.get(name)
        return agent.load if agent else 0

    def known(self, model: str) -> bool:
        return model in self._known

    def _count(self, agent: _Agent) -> None:
        if agent.eligible:
            self._eligible_load += agent.load
            self._eligible_count += 1

    def _forget(self, agent: _Agent) -> None:
        if agent.eligible:
            self._eligible_load -= agent.load
            self._eligible_count -= 1

    def _add_to_ring(self, name: str) -> None:
        self._ring_keys.extend(_hash(f"{name}#{v}") for v in range(self.vnodes))
        self._ring_names.extend([name] * self.vnodes)
        self._ring_sorted = False

    def _walk(self, model: str) -> Iterator[str]:
        """Distinct agent names clockwise from the model's point on the ring."""
        if not self._ring_sorted:
            pairs = sorted(zip(self._ring_keys, self._ring_names))
            self._ring_keys, self._ring_names = [k for k, _ in pairs], [n for _, n in pairs]
            self._ring_sorted = True
        n = len(self._ring_keys)
        if not n:
            return
        start = bisect.bisect_left(self._ring_keys, _hash(model))
        seen: set[str] = set()
        for k in range(n):
            name = self._ring_names[(start + k) % n]
            if name not in seen:
                seen.add(name)
                yield name
                if len(seen) == len(self._agents):
                    return

    # ------------------------------------------------------------------ the decision
    def choose(self, model: str, now: float, allowed: Collection[str] | None = None) -> Choice | None:
        """The agent for one request for `model` (None: no eligible agent). `allowed`: the
        endpoints the gateway lets this request go to (the protocol's subset hint)."""

        def ok(name: str) -> bool:
            a = self._agents.get(name)
            return a is not None and a.eligible and (allowed is None or _allowed(a.report, allowed))

        if model not in self._known:
            name = next((n for n in self._walk(model) if ok(n)), None)
            return Choice(self._agents[name].report, "unknown") if name else None
        wanted = self._wanted_copies(model, now)
        holders = [n for n in self._holders.get(model, ()) if ok(n)]
        holders += [n for n in self._assigned.get(model, ()) if ok(n) and n not in holders]
        if len(holders) > wanted:
            holders.sort(key=lambda n: (self._rank(n, model), _hash(f"{model}@{n}")))
            del holders[wanted:]
        new, reason = None, "copy"
        if len(holders) < wanted:
            placed = self._place(model, holders, ok, now)
            if placed is not None:
                new, reason = placed
                holders.append(new)
                self._assign(model, new, now)
        if not holders:
            return None
        best = min(holders, key=lambda n: self._inflight(n, model))
        agent = self._agents[best]
        agent.routed[model] = agent.routed.get(model, 0) + 1
        agent.rate, agent.rate_at = self._decay(agent.rate, agent.rate_at, now) + 1.0 / self.rate_window, now
        self._total_rate, self._total_at = self._decay(self._total_rate, self._total_at, now) + 1.0 / self.rate_window, now
        return Choice(agent.report, reason if best == new else "copy")

    def _decay(self, rate: float, at: float, now: float) -> float:
        return rate * math.exp(-max(0.0, now - at) / self.rate_window)

    def any_agent(self, salt: int, allowed: Collection[str] | None = None) -> AgentReport | None:
        """An eligible agent for a request that names no model (round robin by `salt`)."""
        eligible = [a.report for a in self._agents.values()
                    if a.eligible and (allowed is None or _allowed(a.report, allowed))]
        return eligible[salt % len(eligible)] if eligible else None

    def fallbacks(self, model: str, first: str, n: int) -> list[AgentReport]:
        """Up to `n` other eligible agents in the model's ring order (for the gateway's retries)."""
        out: list[AgentReport] = []
        for name in self._walk(model):
            if len(out) >= n:
                break
            a = self._agents[name]
            if name != first and a.eligible:
                out.append(a.report)
        return out

    def _rank(self, name: str, model: str) -> int:
        """Which holders serve first: a reported loaded copy, then one reported loading, then an
        agent this picker sent the model to that has not reported it (a placement, not a copy)."""
        report = self._agents[name].held.get(model)
        return 2 if report is None else 0 if report.state == "loaded" else 1

    def _inflight(self, name: str, model: str) -> int:
        agent = self._agents[name]
        report = agent.held.get(model)
        return (report.inflight if report else 0) + agent.routed.get(model, 0)

    def _unassign(self, model: str, name: str) -> None:
        pending = self._assigned.get(model)
        if pending is not None and pending.pop(name, None) is not None and not pending:
            del self._assigned[model]

    def _assign(self, model: str, name: str, now: float) -> None:
        agent = self._agents[name]
        self._forget(agent)
        self._assigned.setdefault(model, {})[name] = now
        agent.pending += 1
        agent.pending_bytes += self._known.get(model, 0)
        self._count(agent)

    def _place(self, model: str, exclude: list[str], ok, now: float) -> tuple[str, str] | None:
        """Bounded-load consistent hashing with room; else the oldest LRU victim's agent. One
        more copy of a model that has copies (`exclude`) also skips agents this picker already
        sends more than c x the mean agent's request rate: copies spread requests, not models."""
        if not self._eligible_count:
            return None
        cap = math.ceil(self.load_factor * (self._eligible_load + 1) / self._eligible_count)
        busy = self.load_factor * self._decay(self._total_rate, self._total_at, now) / self._eligible_count if exclude else None
        size = self._known.get(model, 0)
        under: list[_Agent] = []
        loaded: list[_Agent] = []  # under the model bound, above the request bound
        fallback: str | None = None
        for name in self._walk(model):
            if name in exclude or not ok(name):
                continue
            agent = self._agents[name]
            fallback = fallback or name
            if agent.load >= cap:
                continue
            if busy is not None and self._decay(agent.rate, agent.rate_at, now) >= busy:
                loaded.append(agent)
                if len(loaded) >= 4 * self.room_candidates:
                    break
                continue
            free = agent.report.host_free
            if free is None or free - agent.pending_bytes >= size:
                return name, "placed"
            under.append(agent)
            if len(under) >= self.room_candidates:
                break
        if under:
            return min(under, key=lambda a: a.lru_age).report.name, "lru"
        if loaded:
            return min(loaded, key=lambda a: self._decay(a.rate, a.rate_at, now)).report.name, "placed"
        return (fallback, "placed") if fallback else None

    def _wanted_copies(self, model: str, now: float) -> int:
        rate, at = self._rate.get(model, (0.0, now))
        rate = rate * math.exp(-max(0.0, now - at) / self.rate_window) + 1.0 / self.rate_window
        self._rate[model] = (rate, now)
        copies, changed = self._copies.get(model, (1, -math.inf))
        limit = min(self.max_copies, max(1, self._eligible_count))
        if rate > copies * self.hot_rate and copies < limit:
            copies, changed = copies + 1, now
            self.events.append(("copy added", model, copies))
        elif copies > 1 and rate < (copies - 1) * self.hot_rate * 0.5 and now - changed >= self.copy_hold:
            copies, changed = copies - 1, now
            self.events.append(("copy removed", model, copies))
        if copies == 1 and changed == -math.inf:
            self._copies.pop(model, None)
        else:
            self._copies[model] = (copies, changed)
        return copies

    def copies(self, model: str) -> int:
        return self._copies.get(model, (1, 0.0))[0]

    def rate(self, model: str, now: float) -> float:
        rate, at = self._rate.get(model, (0.0, now))
        return rate * math.exp(-max(0.0, now - at) / self.rate_window)


def _allowed(report: AgentReport, allowed: Collection[str]) -> bool:
    host = report.endpoint.rsplit(":", 1)[0]
    return report.endpoint in allowed or report.grpc_endpoint in allowed or host in allowed


def ring_assignment(names: Iterable[str], models: Iterable[str], load_factor: float = 1.25,
                    vnodes: int = 64) -> dict[str, str]:
    """Where each model would be placed from scratch, in the given order, by bounded-load
    consistent hashing alone (no memory): what the simulation compares across a resize."""
    p = Placement(load_factor=load_factor, vnodes=vnodes)
    for name in names:
        p.set_agent(AgentReport(name, name), known=False)
    model_list = list(models)
    p.set_known({m: 0 for m in model_list})
    out: dict[str, str] = {}
    for m in model_list:
        placed = p._place(m, [], lambda n: True, 0.0)
        if placed is not None:
            out[m] = placed[0]
            p._assign(m, placed[0], 0.0)
    return out
