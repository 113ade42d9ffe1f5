"""The model's life: one state machine, one owner.

    registered ─► pulling ─► cached ─► loading ─► loaded ─► unloading ─► cached
         ▲            │                    │         │  (evicted: LRU; drained first when removed)
         └── failed ◄─┴────────────────────┘         └─ removed from config: drain, unload, release leases

What holds (each pinned by a test in tests/reconciler/ against the real Reconciler, MemoryManager
and Cache, with the scripted server of tests/support/scripted.py):
  * A model's state changes only under that model's lock: in its converge step (`_step`, one
    readable sequence), its lazy load, a source check applying its result, or an eviction of
    it. Server restarts, resyncs, `report_missing` and the retry loop only mark a model
    (`lost_since`, `crashes`, `retry_at`) and schedule its task, which applies the mark under
    the lock. Different models proceed in parallel under global bounds: `pull_concurrency`
    pulls and `load_concurrency` loads at a time; loads nobody waits for (preloads, restores,
    updates) use at most `load_concurrency - 1` slots, so a request's lazy load always finds one
    (with `load_concurrency >= 2`).
  * Every way out of a pull, a load or an unload (success, server error, timeout, an
    unexpected exception such as OSError, cancellation) goes through one try/finally in
    `_load`/`_unload` and the safety net `_guarded`: the measurement window is closed, the
    `name#new` reservation is released, `updating` is false, and the model is LOADED (old copy
    kept), CACHED or FAILED with a reason. A request waiting for a lazy load gets
    ModelUnavailable (503) with that reason, never a raw error.
  * Cache leases are per (entry, model): holder `<holder>@<model>`. A model leases the entry
    it serves and the entry it wants (both during an update); the old one is released only
    once the new copy serves. An entry is checked (`Cache.check`) before every load; a
    vanished or broken one is discarded and pulled again. (An in-place entry, a local or PVC
    path, on a request's load: the adapter's load checks the path in its file-work thread and
    refuses one that is gone; there is nothing to pull again.)
  * A request holds an in-flight lease (`Model.inflight`) from `acquire` to `release`. No
    unload runs under a request: eviction picks models with no lease (re-checked under the
    victim's lock); removal and the update swap drain first (new requests for a removed
    model get UnknownModel at once; the unload waits for `release` to signal idle, at most
    `drain_timeout_s`, logged when it expires).
  * A miss's victims are unloaded off its critical path: each eviction commits under the
    victim's lock (no lease; UNLOADING from then on, so no request leases it) and the load
    starts while the unloads run. The ledger's `used()` never exceeds the budget (an unloading
    model counts as gone, `held()` counts it until its unload ends). A load that will be
    measured, or whose victims hold GPU memory, waits for the unloads first. Each lazy load's
    time is split into phases in `modelshelf_cold_start_phase_seconds` (see ColdStart).
    Requests waiting for a lazy load wake on an event the load sets as it ends, and the
    adapter's load runs in the load's own task (`asyncio.timeout`): on a loop busy serving hits
    each task hop is a turn of callbacks. A miss that fits in the free room walks no candidate
    (`_relief_candidates` is lazy; the ledger reads it only when the load is short).
  * Eviction order (`--eviction`): every eviction (a miss's, the headroom's, reality's relief)
    takes eligible models lowest `Candidate.score` first, then least recently used. Under `lru`
    every score is 0; under `lfu-decay` it is the model's request count, each lease adding 1
    and the count halving every `--eviction-half-life` leases to the agent (`_lease`: one float
    update, no lock), kept while the model is unloaded. Only the order differs: the rules
    on who may be evicted are the same.
  * Headroom (`--headroom` N, default 8; 0: off): under pressure (from a miss that had to
    evict on its own path until HEADROOM_PRESSURE_S after the last miss; a node whose models
    all fit gives up nothing), after each load commits, one background task evicts idle
    models (in eviction order) until the budget has room for as many loads of the median
    loaded size as the misses need (`MissRuns`: the longest run of misses that came while
    unloads were in flight, over the last HEADROOM_WINDOW_S; 1 where misses are rare), at
    most N and HEADROOM_MAX_FRACTION of a device's budget (in whole loads), so that a
    miss on a full node normally finds room and loads at once, with no unload on its path.
    Same rules as a miss's eviction (no lease, not pinned, past `min_residency_s`, committed
    under the victim's lock); a victim's bytes are free for admission only once its eviction
    commits; no headroom eviction starts while a measured window is open. A miss that needs
    no victim but finds unloads in flight waits for them only while its window would see them
    or the server could not hold them beside it (`held()` within budget x (1 + unload_overlap)
    on the host, within the budget on a GPU).
  * Reality is checked after each load (reality_loop): at once after a load reserved from an
    estimate or a declaration alone (it may hold more than it reserved); after loads reserved at
    least at their entry's own measurement, once within REALITY_COALESCE_S for all of them (`_wake_reality`).
  * A request for a model that is not loaded triggers one load (single flight) and waits,
    bounded by `load_timeout_s` (which also bounds the server's load call) and `max_queue`
    waiters. When memory is short only because other models are loading, leased or young,
    the lazy load waits for memory to free (within `load_timeout_s`) instead of failing.
  * An update loads the new copy beside the old one (the adapters replace in place); when
    memory cannot hold both it drains and swaps, and says so in the log. A failed update
    keeps the old copy serving and is retried with backoff.
  * `failed` keeps its reason and is retried with exponential backoff and jitter; within the
    backoff a request gets 503 with the true Retry-After and no load is attempted. A config
    change to the model resets the count. A preload that did not fit is retried when memory
    frees (an unload, a removal, a failed load) and on its retry hint.
  * The server's index is compared with what the agent holds every `resync_interval_s`, and
    at once for a model `report_missing` names; a model it lost is loaded again (the copy that
    served, not a failed update). A model whose load was in flight when the server died twice
    in a row is quarantined (FAILED, no retry) until its config changes; after the first death
    it loads alone (`_load_gate`), so the second names the culprit only, and a load that reached
    the server after it died is not blamed. (An update whose new copy kills the server is not
    quarantined: the old copy is restored and the update retried with growing backoff.)
  * Pull slots (`agent/slots.py`) go to a pull a request waits for first (a queued preload or
    prefetch is promoted as soon as a request waits for its model), then preloads/prefetches,
    then source checks; the last slot is kept for requests. A source check never holds the
    model's lock while it queues, and a model's next check is not queued while one is.
    `--prefetch preload` leaves a `preload: false` model unpulled until its first request
    (`_pull_now`).
  * Readiness (`restocking`): after the first config and after a server restart (or a sidecar
    seen down), the agent is not ready until each marked model's next converge step has ended
    (pulled/checked, loaded when it is to be, or failed with its reason).
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from itertools import compress, filterfalse
from operator import is_not
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

from agent.config import ConfigError, ConfigParseError, ConfigResult, ModelSpec
from agent.logging import get_logger, kv
from agent.memory import Candidate, DoesNotFit, MemoryManager, decayed, reality_loop
from agent.metrics import Metrics
from agent.runtimes import RuntimeAdapter, RuntimeErrorBase, ServedModel
from agent.runtimes.base import ServerUnavailable
from agent.settings import Settings
from agent.slots import BACKGROUND, CHECK, URGENT, PrioritySlots
from puller import Cache, Entry, PullError, model_holder

log = get_logger("modelshelf.reconciler")


class State(str, enum.Enum):
    REGISTERED = "registered"
    PULLING = "pulling"
    CACHED = "cached"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


S = State
_LOADED = S.LOADED  # the lease check (try_acquire) reads a global: an enum member lookup is ~10x slower
TRANSITIONS: dict[State, set[State]] = {
    S.REGISTERED: {S.PULLING, S.FAILED},
    S.PULLING: {S.CACHED, S.FAILED},
    S.CACHED: {S.PULLING, S.LOADING, S.FAILED},
    # LOADING -> CACHED: it did not fit in memory (the model stays cached, the reason says why)
    S.LOADING: {S.LOADED, S.FAILED, S.CACHED},
    # LOADED -> CACHED: the server lost it (restart). An update stays LOADED (`updating`):
    # the old copy serves until the new one replaces it in place. LOADED -> FAILED: the
    # safety net, when what the server holds is no longer known.
    S.LOADED: {S.UNLOADING, S.CACHED, S.FAILED},
    S.UNLOADING: {S.CACHED, S.FAILED},
    S.FAILED: {S.PULLING, S.LOADING, S.CACHED, S.UNLOADING},
}


class UnknownModel(Exception):
    """No such model is configured (404)."""


class ModelUnavailable(Exception):
    """The model is configured but cannot serve now (503). `retry_after` seconds, when known."""

    def __init__(self, model: str, reason: str, retry_after: float | None = None):
        super().__init__(f"model {model!r}: {reason}")
        self.model = model
        self.reason = reason
        self.retry_after = retry_after


@dataclass
class ColdStart:
    """Where one lazy load's time went, exported as modelshelf_cold_start_phase_seconds{phase}:
    `queue` (waiting for the model's lock, for memory to free, for a load slot), `unload`
    (waiting for unloads: its victims', or ones in flight it needed none of; only a load that
    will be measured, or that the server could not hold beside them, waits: see _make_room),
    `server` (the server's own load call, as the adapter reports it), `measure` (memory
    snapshots) and `agent` (the rest: cache check, repository files, bookkeeping)."""

    started: float
    queue: float = 0.0
    unload: float = 0.0
    server: float = 0.0
    measure: float = 0.0
    loaded: bool = False  # this load made the model LOADED (else nothing is observed)

    def observe(self, metrics: Metrics) -> None:
        total = time.monotonic() - self.started
        phases = {"queue": self.queue, "unload": self.unload, "server": self.server, "measure": self.measure}
        phases["agent"] = max(0.0, total - sum(phases.values()))
        for phase, seconds in phases.items():
            metrics.cold_start_phase_seconds.labels(phase=phase).observe(seconds)


# the headroom never takes more than this share of a device's budget (whole loads; none on a node
# holding under ~10 models): beyond it, the hits it would cost outweigh the unloads it saves
HEADROOM_MAX_FRACTION = 0.10
# the headroom is kept from a miss that had to evict on its own path until this long after the
# last miss: a node whose models all fit (or whose misses stopped) gives up no capacity for it
HEADROOM_PRESSURE_S = 60.0
# the headroom's size is the longest run of misses seen within this long (see MissRuns)
HEADROOM_WINDOW_S = 10.0
# after a load reserved at least at its entry's measurement (the server grows by no more), the
# reality check is woken at most once per this long: a stream of such loads costs one check (a
# thread hop and /proc reads), not one per load. A load reserved from an estimate or a
# declaration (its real memory may exceed what it reserved) still wakes it at once.
REALITY_COALESCE_S = 0.25


class MissRuns:
    """How much room requests' misses need: the headroom's state, in one place.

    Under pressure (from a miss that had to evict on its own path until HEADROOM_PRESSURE_S
    after the last miss needing room) the headroom keeps room for `loads()` loads free: the
    longest run of misses seen within the last HEADROOM_WINDOW_S, where a run is a miss that
    found no unload in flight and every miss that came while unloads were still in flight after
    it (`miss(unloading=True)`). That is the room the misses take before the first refill's
    unload ends and gives its bytes back to the server: a node whose misses are rare (each one's
    refill done before the next comes) keeps one load free, a node under a miss storm (unloads
    always in flight) as many as `--headroom` and the 10% cap allow. 0 without pressure."""

    def __init__(self) -> None:
        self.until = 0.0  # pressure ends then (monotonic)
        self.run = 0  # misses in the current run
        self._peaks: deque[tuple[float, int]] = deque()  # (when, run): runs decreasing, the front the window's longest

    def pressed(self, now: float) -> bool:
        return now < self.until

    def miss(self, now: float, *, unloading: bool) -> None:
        """A request's miss that needed room (it evicted on its path, or came under pressure);
        `unloading`: unloads were in flight as it was admitted (the run goes on)."""
        self.until = now + HEADROOM_PRESSURE_S
        self.run = self.run + 1 if unloading else 1
        while self._peaks and self._peaks[-1][1] <= self.run:
            self._peaks.pop()
        self._peaks.append((now, self.run))

    def loads(self, now: float) -> int:
        """Loads of room to keep free now (0: no pressure)."""
        if not self.pressed(now):
            return 0
        while self._peaks and self._peaks[0][0] < now - HEADROOM_WINDOW_S:
            self._peaks.popleft()
        return self._peaks[0][1] if self._peaks else 1


QUARANTINE = "server died twice while loading this model; quarantined until its config changes"


def _placement_load_s(times: tuple[float, ...]) -> float | None:
    """The load time placement judges a model by (agent/runtimes/shards.py `is_quick`): the
    lesser of the server's part of its last two loads, None until two are known. One load
    alone is not enough: its time is the server's wall, which includes waiting on the server's
    loop behind other loads and requests. Under bench_peers' small workload with two processes
    the server's part of a tiny model's load averaged 9-17 ms a pass, and in two of six passes 2-3
    loads took over 100 ms; judged by one of those, a tiny model went to the second process, which then
    imported its runtime (benchmarks/results/import_place_ab2.md). A model slow to load is slow
    every time; a wait that long twice in a row for the same model is rare."""
    return min(times) if len(times) >= 2 else None


def _within_measurement(cost: Any) -> bool:
    """The reservation is at least what a measurement of this very entry found on every device
    (measured, or declared above the measurement): the load should hold no more than it reserved."""
    return cost.measured_host is not None and cost.host >= cost.measured_host \
        and sum(cost.gpu.values()) >= (cost.measured_gpu or 0)


@dataclass(frozen=True)
class Copy:
    """One copy of a model the server can serve: a cache entry loaded for a spec."""

    entry: Entry
    spec: ModelSpec

    def same(self, entry: Entry | None, spec: ModelSpec) -> bool:
        return entry is not None and self.entry.key == entry.key and self.spec.fingerprint() == spec.fingerprint()


@dataclass(eq=False)
class Model:
    spec: ModelSpec
    state: State = S.REGISTERED
    reason: str | None = None
    entry: Entry | None = None  # the entry the spec wants (leased)
    entry_fp: str | None = None  # spec fingerprint `entry` was pulled for
    served: Copy | None = None  # what the server holds (LOADED/UNLOADING; leased)
    last_good: Copy | None = None  # the copy that served last: restored after the server lost it
    removed: bool = False
    inflight: int = 0
    requests: int = 0  # requests that asked for it (monotonic; /fleet/state)
    waiters: int = 0
    last_used: float = 0.0  # time.monotonic() when its last request ended (release), or it loaded
    loaded_at: float = 0.0
    score: float = 0.0  # --eviction lfu-decay: its decayed request count as of `score_at` (see Reconciler._lease)
    score_at: float = 0.0  # in requests to the agent (Reconciler._tick)
    failures: int = 0
    last_failure: str | None = None  # the last load failure's reason, kept while it is retried (`failures` > 0)
    permanent: bool = False  # no retry until the config changes (does not fit even alone; quarantined)
    nofit: bool = False  # its last load did not fit in memory: retried when memory frees
    retry_hint: float | None = None  # seconds until a load that did not fit may (retry-after)
    retry_at: float | None = None
    lost_since: float | None = None  # the server did not list it at that time (resync/restart)
    crashes: int = 0  # server deaths in a row while this model's load was in flight
    died_loading: float | None = None  # when its last load that found the server gone was sent to it
    pull_seconds: float | None = None
    load_seconds: float | None = None
    # the server's part of its last two loads that imported no runtime (placement: _placement_load_s)
    server_load_times: tuple[float, ...] = ()
    loads: int = 0
    updating: bool = False  # a new copy is loading in place of the served one
    draining: bool = False  # an unload waits for in-flight requests: no new lease on this copy
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while inflight == 0
    load_task: asyncio.Task | None = None
    load_done: asyncio.Event | None = None  # set when load_task's lazy load ended: wakes its waiters
    changed_at: float = field(default_factory=time.time)

    def failure_now(self) -> str | None:
        """The last load failure's reason while it counts (`failures` > 0: the model is retried);
        None once a load succeeded or its config changed."""
        return self.last_failure if self.failures else None

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def name(self) -> str:
        return self.spec.name

    def wants_loaded(self) -> bool:
        return self.spec.pinned or self.spec.preload

    def score_now(self, tick: float, half_life: float) -> float:
        """Its request count decayed to `tick` (`--eviction lfu-decay`; the lowest is evicted first)."""
        return decayed(self.score, self.score_at, tick, half_life)

    def status(self, memory: MemoryManager, tick: float = 0.0, half_life: float = 0.0) -> dict[str, Any]:
        """`half_life` > 0 (lfu-decay): with its eviction score as of request `tick`."""
        now = time.monotonic()
        doc: dict[str, Any] = {
            "name": self.name,
            "state": self.state.value,
            "reason": self.reason,
            "uri": self.entry.uri if self.entry else _redact_source(self.spec),
            "runtime": self.spec.runtime,
            "version": self.spec.version,
            "pinned": self.spec.pinned,
            "preload": self.spec.preload,
            "cache_key": self.entry.key if self.entry else None,
            "size_bytes": self.entry.size if self.entry else None,
            "in_place": self.entry.in_place if self.entry else None,
            "memory": _memory_doc(memory, self.name),
            "updating": self.updating,
            "inflight": self.inflight,
            "loads": self.loads,
            "failures": self.failures,
            "last_failure": self.failure_now(),
            "pull_seconds": self.pull_seconds,
            "load_seconds": self.load_seconds,
            "loaded_for_seconds": round(now - self.loaded_at, 3) if self.state == S.LOADED else None,
            "idle_seconds": round(now - self.last_used, 3) if self.last_used else None,
            "eviction_score": round(self.score_now(tick, half_life), 3) if half_life else None,
            "retry_in_seconds": round(max(0.0, self.retry_at - now), 3) if self.retry_at else None,
            "changed_at": self.changed_at,
        }
        return doc


def _memory_doc(memory: MemoryManager, name: str) -> dict[str, Any] | None:
    """The model's reservation: bytes per device, method, declared beside measured."""
    return memory.model_doc(name)


def _redact_source(spec: ModelSpec) -> Any:
    from puller.uri import redact

    if isinstance(spec.source, str):
        return redact(spec.source)
    return {k: redact(v) for k, v in spec.source}


def shard_of(name: str, shards: int) -> int:
    """The replica that serves `name` when the config is sharded (`--shards`): crc32 mod N.
    Clients or ingresses can compute the same function to route to the right replica."""
    return zlib.crc32(name.encode()) % shards


class Reconciler:
    """Owns every model's state. The watcher calls `apply`, the router `acquire`/`release` and
    `report_missing`, the server's watcher `server_restarted`."""

    def __init__(self, settings: Settings, cache: Cache, adapter: RuntimeAdapter, memory: MemoryManager, metrics: Metrics):
        self.settings = settings
        self.cache = cache
        self.adapter = adapter
        self.memory = memory
        self.metrics = metrics
        self.models: dict[str, Model] = {}
        self.config: ConfigResult | None = None
        self._desired: dict[str, ModelSpec] = {}  # the models the last apply() made the desired set
        self.config_errors: tuple[ConfigError, ...] = ()
        self.config_parse_error: str | None = None
        self.applied_once = asyncio.Event()
        # pull slots go to the pulls a request waits for first, then preloads/prefetches, then
        # source checks: a cold model's first request never queues behind hundreds of checks
        self._pull_slots = PrioritySlots(settings.pull_concurrency)
        self._checking: set[str] = set()  # models whose source check is queued or running
        self._load_sem = asyncio.Semaphore(settings.load_concurrency)
        # loads nobody waits for (preloads, restores, updates) never take the last load slot
        self._background_sem = asyncio.Semaphore(max(1, settings.load_concurrency - 1))
        self._tasks: set[asyncio.Task] = set()
        self._adoptable: dict[str, str] = {}  # READY on the server at start, not yet adopted
        self._background: list[asyncio.Task] = []
        self._closing = False
        self._loading: dict[str, float] = {}  # server load calls in flight: name -> start
        # a suspect's load (the server died during one of its loads) runs alone: see _load_gate
        self._gate_moved = asyncio.Event()  # replaced each time the gate's counts change
        self._gate_in = 0  # loads past the gate
        self._solo_waiting = 0  # suspects waiting to load alone
        self._solo_in = False
        self._unloads: set[str] = set()  # server unload calls in flight
        # server process (None: the one server) -> (set when the load importing a runtime in it
        # ends, when that load began; see _after_import)
        self._imports: dict[int | None, tuple[asyncio.Event, float]] = {}
        self._down_since: float | None = None  # first load that found the server gone
        self._memory_changed = asyncio.Event()  # replaced each time memory frees (see _signal_memory)
        self._missing: set[str] = set()  # reported by the router, not rechecked yet
        self._recheck_task: asyncio.Task | None = None
        self._reality_wake = asyncio.Event()  # set after a load: check reality (see _wake_reality)
        self._reality_later: asyncio.TimerHandle | None = None  # a coalesced wake pending
        self._headroom_wake = asyncio.Event()  # set after a load: restore the free margin (see _keep_headroom)
        self._misses = MissRuns()  # whether misses need room, and how much: the headroom's size (_keep_headroom)
        self.on_change: Callable[[], None] = lambda: None  # a state or the configured set changed (/fleet/state seq)
        # readiness: model -> when it was marked; its next step (begun after the mark) must finish
        # before the agent is ready (the first config, a server restart); see `restocking`
        self._restocking: dict[str, float] = {}
        self.last_restart: dict[str, Any] | None = None  # why the server last restarted (/status)
        # the data plane's per-request metrics are plain integers (no locked prometheus update
        # per request), folded into their series at each scrape (fold_request_metrics): the
        # lookup hits, and the requests in flight per name, summed over the Model objects that
        # hold a lease (`_busy`: a replaced or removed one may still hold requests; a model
        # joins it on its first lease and leaves it on its last release, not per request)
        self._inflight_gauges: dict[str, Any] = {}
        self._busy: set[Model] = set()
        self._hits = metrics.lookups.labels(result="hit")
        # --eviction lfu-decay: each lease adds 1 to its model's request count, which halves every
        # `eviction_half_life` leases to the agent (`_tick`); 0.0 under lru (no count kept)
        self._half_life = settings.eviction_half_life if settings.eviction == "lfu-decay" else 0.0
        self._tick = 0.0
        self._hit_count = 0
        hooks = getattr(metrics, "before_render", None)
        if hooks is not None:
            hooks.append(self.fold_request_metrics)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Read what the server already serves (restart recovery), start the periodic loops."""
        try:
            index = await self.adapter.index()
        except RuntimeErrorBase as e:
            log.warning("server index unavailable at start", extra=kv(reason=e.reason))
            index = {}
        self._adoptable = {n: st for n, st in index.items() if st.upper() == "READY"}
        if self._adoptable:
            log.info("server already serves models", extra=kv(count=len(self._adoptable)))
        for loop in (self._retry_loop, self._lease_loop, self._source_loop, self._resync_loop):
            self._background.append(asyncio.create_task(loop(), name=loop.__name__.strip("_")))
        # reality beside the ledger: every few seconds and after each load, evict LRU models no
        # request holds while the server really holds more than the budget (agent/memory/reality.py)
        self._background.append(asyncio.create_task(reality_loop(
            self.memory.reality, self._relief_candidates, self._evict_for_reality,
            interval_s=self.settings.reality_interval_s, wake=self._reality_wake), name="reality-loop"))
        if self.settings.headroom > 0:
            self._background.append(asyncio.create_task(self._headroom_loop(), name="headroom-loop"))

    async def close(self) -> None:
        self._closing = True
        if self._reality_later is not None:
            self._reality_later.cancel()
        for t in [*self._background, *self._tasks]:
            t.cancel()
        await asyncio.gather(*self._background, *self._tasks, return_exceptions=True)

    async def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until no model task runs (converge, lazy load, recheck; tests and prefetch)."""
        deadline = time.monotonic() + timeout
        while self._tasks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"reconciler still busy with {len(self._tasks)} task(s)")
            await asyncio.wait(list(self._tasks), timeout=remaining)

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ config
    async def apply(self, result: ConfigResult) -> None:
        """Make `result` the desired set. Cheap: Python work only for the models that changed
        since the last apply (the rest is a pass in C); I/O runs in tasks."""
        self.config = result
        self.config_parse_error = None
        self.config_errors = result.errors
        for err in result.errors:
            self.metrics.config_errors.labels(kind="entry").inc()
            log.warning("config entry rejected", extra=kv(file=err.file, model=err.model, index=err.index, reason=err.reason))
        desired = result.models if self.settings.shards <= 1 else {n: s for n, s in result.models.items() if self._mine(n)}
        last, self._desired = self._desired, desired
        # Only what differs from the last applied set is visited: the parser hands back an
        # unchanged entry's ModelSpec object, and each model of `last` holds the spec applied
        # then (apply alone sets spec and removed), so an identity test per name, run in C,
        # leaves the unchanged ones out. An edit of one model among 1,000 visits that one.
        for name in compress(desired, map(is_not, desired.values(), map(last.get, desired))):
            spec = desired[name]
            m = self.models.get(name)
            if m is None:
                m = self.models[name] = Model(spec)
                self._schedule(m)
            elif m.spec is spec and not m.removed:
                continue  # the parser reuses the ModelSpec of an unchanged entry
            elif m.removed or m.spec != spec or m.spec.fingerprint() != spec.fingerprint():
                if m.removed or m.spec.fingerprint() != spec.fingerprint():
                    m.failures, m.permanent, m.retry_at, m.crashes = 0, False, None, 0
                m.spec, m.removed = spec, False
                self._schedule(m)
        for name in filterfalse(desired.__contains__, last):  # configured last time, gone now
            m = self.models.get(name)
            if m is not None and not m.removed:
                m.removed = True
                self._schedule(m)
        if not self.applied_once.is_set():
            self._schedule_orphan_cleanup(set(desired))
            self._restock(desired)
            self.applied_once.set()
        self.metrics.config_applied.set_to_current_time()
        self.on_change()
        log.info("config applied", extra=kv(file=result.file, models=len(desired), rejected=len(result.errors)))

    async def config_failed(self, error: ConfigParseError) -> None:
        """A file that does not parse changes nothing: the last good config stays in force."""
        self.config_parse_error = f"{error.file}: {error.reason}"
        self.metrics.config_errors.labels(kind="file").inc()
        kept = len(self.config.models) if self.config else 0
        log.error("config file rejected; keeping the last good config", extra=kv(file=error.file, reason=error.reason, kept_models=kept))

    def _mine(self, name: str) -> bool:
        return self.settings.shards <= 1 or shard_of(name, self.settings.shards) == self.settings.shard_index

    # ------------------------------------------------------------------ data plane
    async def acquire(self, name: str) -> Model:
        """Lease `name` for one request, loading it first if needed. Pair with `release`."""
        hit = self.try_acquire(name)
        if hit is not None:
            return hit
        m = self.models.get(name)
        if m is None or m.removed:
            raise UnknownModel(name)
        self._lease(m)
        self.metrics.lookups.labels(result="miss").inc()
        try:
            await self._wait_loaded(m)
        except BaseException:
            self.release(m)
            raise
        return m

    def try_acquire(self, name: str) -> Model | None:
        """acquire() when it need not wait: the lease on `name` if it is loaded (and not
        draining) now; else None, nothing held (await acquire()). The data plane's fast path:
        a lease is integer bumps; the model's idle Event and the busy set change only on its
        first lease and its last release (see _lease)."""
        m = self.models.get(name)
        if m is None or m.removed or m.state is not _LOADED or m.draining:
            return None
        self._lease(m)
        self._hit_count += 1
        return m

    def _lease(self, m: Model) -> None:
        """One lease on `m` (acquire and try_acquire). `last_used` is set when the lease ends
        (release): an eviction never picks a model in flight."""
        if not m.inflight:  # its first lease: a drain now waits for the last release
            m.idle.clear()
            self._busy.add(m)
        m.inflight += 1  # from here on eviction skips this model
        m.requests += 1  # /fleet/state's monotonic count
        if self._half_life:  # lfu-decay: one more request, counted on the agent's request clock
            self._tick = tick = self._tick + 1.0
            m.score, m.score_at = decayed(m.score, m.score_at, tick, self._half_life) + 1.0, tick

    def fold_request_metrics(self) -> None:
        """The lookup hits since the last scrape and the requests in flight now, into their
        series (runs at each /metrics scrape): every name seen in flight keeps its series (0 when
        none is)."""
        hits, self._hit_count = self._hit_count, 0
        if hits:
            self._hits.inc(hits)
        inflight: dict[str, int] = {}
        for m in self._busy:
            inflight[m.name] = inflight.get(m.name, 0) + m.inflight
        for name in inflight.keys() - self._inflight_gauges.keys():
            self._inflight_gauge(name)
        for name, gauge in self._inflight_gauges.items():
            gauge.set(inflight.get(name, 0))

    def _inflight_gauge(self, name: str) -> Any:
        gauge = self._inflight_gauges.get(name)
        if gauge is None:
            gauge = self._inflight_gauges[name] = self.metrics.inflight.labels(model=name)
        return gauge

    def release(self, m: Model) -> None:
        m.inflight -= 1
        m.last_used = time.monotonic()
        if not m.inflight:  # its last lease ended
            self._busy.discard(m)
            m.idle.set()  # a drain waits for this
            self._signal_memory()  # a load waiting for memory may evict it now

    def report_missing(self, name: str) -> None:
        """The server answered 404 for `name` though the agent holds it loaded: recheck the
        server's index now and reload what it lost. Sync, cheap, never raises."""
        try:
            m = self.models.get(name)
            if m is None or m.removed or m.state is not S.LOADED or self._closing:
                return
            self._missing.add(name)
            if self._recheck_task is None or self._recheck_task.done():
                self._recheck_task = self._spawn(self._recheck_missing(), "recheck-missing")
        except Exception:  # the router's error path must not fail because of us
            log.exception("report_missing failed", extra=kv(model=name))

    async def _recheck_missing(self) -> None:
        while self._missing:
            names, self._missing = self._missing, set()
            await self.resync_server(names)

    async def _wait_loaded(self, m: Model) -> None:
        if m.state is S.FAILED and (m.permanent or self._backing_off(m)):
            # backoff is obeyed: no load within it, and the client is told the true wait
            raise ModelUnavailable(m.name, m.reason or "failed", retry_after=None if m.permanent else self._retry_after(m))
        if m.waiters >= self.settings.max_queue:
            raise ModelUnavailable(m.name, f"{m.waiters} requests already wait for it to load", retry_after=1)
        if m.load_task is None or m.load_task.done():
            m.load_done = done = asyncio.Event()
            m.load_task = self._spawn(self._lazy_load(m, done), f"lazy-load:{m.name}")
            # the load sets it as it ends; a task cancelled before its first step (close()
            # right after the request came) never runs that, and its waiters would sit out the
            # whole load timeout
            m.load_task.add_done_callback(lambda _task, done=done: done.set())
        done = m.load_done
        assert done is not None  # set with load_task
        m.waiters += 1
        started = time.monotonic()
        try:
            # the load task sets `done` as it ends: its waiters run on the next loop turn (a
            # wait_for on a shield of the task takes three turns of callbacks, each behind every
            # request the loop is serving), and a waiter that gives up cancels only its own wait
            async with asyncio.timeout(self.settings.load_timeout_s):
                await done.wait()
        except TimeoutError:
            raise ModelUnavailable(m.name, f"not loaded within {self.settings.load_timeout_s:g}s", retry_after=5) from None
        finally:
            m.waiters -= 1
        self.metrics.cold_start_seconds.observe(time.monotonic() - started)
        if m.removed:
            raise UnknownModel(m.name)
        if m.state is not S.LOADED:
            if m.permanent:
                raise ModelUnavailable(m.name, m.reason or "does not fit", retry_after=None)
            retry = m.retry_hint if m.state is S.CACHED and m.retry_hint else self._retry_after(m)
            raise ModelUnavailable(m.name, m.reason or f"not loaded ({m.state.value})", retry_after=retry)

    async def _lazy_load(self, m: Model, done: asyncio.Event) -> None:
        phases = ColdStart(time.monotonic())
        try:
            async with m.lock:
                phases.queue += time.monotonic() - phases.started
                await self._guarded(m, self._lazy_step(m, phases))
            if phases.loaded:
                phases.observe(self.metrics)
        finally:
            done.set()

    async def _lazy_step(self, m: Model, phases: ColdStart) -> None:
        if m.removed or (m.state is S.LOADED and not m.draining):
            return
        if self._quarantine(m) or not await self._pull(m, lazy=True):
            return
        if m.state is not S.LOADED:
            await self._load(m, self._wanted(m), lazy=True, phases=phases)

    def _retry_after(self, m: Model) -> float:
        if m.retry_at:
            return max(1.0, round(m.retry_at - time.monotonic(), 1))
        return 1.0

    def _backing_off(self, m: Model) -> bool:
        return m.retry_at is not None and m.retry_at > time.monotonic()

    # ------------------------------------------------------------------ converge
    def _schedule(self, m: Model) -> None:
        if not self._closing:
            self._spawn(self._converge(m), f"converge:{m.name}")

    async def _converge(self, m: Model) -> None:
        async with m.lock:
            began = time.monotonic()
            try:
                await self._guarded(m, self._step(m))
            finally:
                self._restocked(m.name, began)

    def _restock(self, names: Any) -> None:
        """Readiness waits for these models' next steps (scheduled by the caller): their files
        checked or pulled per --prefetch, and loaded when they are to be."""
        now = time.monotonic()
        self._restocking.update((n, now) for n in names)
        if self._restocking:
            self.on_change()

    def _restocked(self, name: str, began: float) -> None:
        mark = self._restocking.get(name)
        if mark is None or began < mark:
            return  # a step that began before the mark does not count
        del self._restocking[name]
        if not self._restocking:
            log.info("restocked: every model checked and loaded as configured")
            self.on_change()

    @property
    def restocking(self) -> int:
        """Models whose step after the first config or a server restart has not finished: the
        agent is not ready while any is left (a failed or not-fitting model has finished)."""
        return len(self._restocking)

    async def _guarded(self, m: Model, step: Awaitable[None]) -> None:
        """The safety net around every step of one model (caller holds m.lock): a bug or an
        unexpected error fails this model with a reason and leaves it consistent; the rest run on."""
        try:
            await step
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("model step crashed", extra=kv(model=m.name))
            self._recover(m, f"internal error: {type(e).__name__}: {e}")

    async def _step(self, m: Model) -> None:
        """Bring one model to what its spec asks, in one readable sequence. Idempotent; the
        caller holds m.lock, and this is the only place (with the helpers it calls) that changes
        the model's state."""
        if m.removed:
            await self._remove(m)
            return
        restore = self._notice_loss(m)
        if self._quarantine(m):
            return
        if restore is not None and not await asyncio.to_thread(self.cache.check, restore.entry):
            await self._load(m, restore, lazy=False)  # the copy that served, not a failed update
        if not self._pull_now(m):
            return  # pulled when a request first asks for it here (--prefetch preload)
        if not await self._pull(m):
            return
        if m.name in self._adoptable and m.state is not S.LOADED and await self._adopt(m):
            return
        wanted = self._wanted(m)
        if m.state is S.LOADED and m.served is not None and m.served.same(wanted.entry, wanted.spec):
            return
        if self._backing_off(m):
            return  # the retry loop schedules it again when the backoff ends
        if m.wants_loaded() or m.state is S.LOADED or restore is not None:
            await self._load(m, wanted, lazy=False)

    def _pull_now(self, m: Model) -> bool:
        """The lazy-pull decision (`--prefetch`): `all` (the default: a single node serves every
        model, so its first requests should only load) pulls every configured model ahead;
        `preload` (agents of a fleet) pulls what is loaded without a request (preload, pinned,
        what the server already serves or served) and leaves a `preload: false` model unpulled
        and unlisted until its first request, so each agent downloads only what is placed on it.
        A model with its entry in hand is only re-checked (cheap)."""
        if self.settings.prefetch == "all" or m.wants_loaded() or m.state is S.LOADED or m.name in self._adoptable:
            return True
        return m.entry is not None and m.entry_fp == m.spec.fingerprint()

    def _wanted(self, m: Model) -> Copy:
        assert m.entry is not None
        return Copy(m.entry, m.spec)

    def _notice_loss(self, m: Model) -> Copy | None:
        """Apply a resync's or a restart's mark: the server lost a copy loaded before the mark.
        Returns the copy to restore."""
        since, m.lost_since = m.lost_since, None
        if since is None or m.state is not S.LOADED or m.loaded_at > since or m.served is None:
            return None
        lost = m.served
        self._release_memory(m.name)
        m.served = None
        self._set(m, S.CACHED, reason="the server lost it; loading it again")
        log.warning("server lost a model; reloading it", extra=kv(model=m.name, key=lost.entry.key))
        return lost

    async def _pull(self, m: Model, *, lazy: bool = False) -> bool:
        """Make the spec's files available and checked (a cache hit moves nothing). False on
        failure. A loaded model being updated stays LOADED while its new copy is pulled. `lazy`
        (a request's load follows): an in-place entry is not checked here, the adapter's load
        refuses a path that is gone (LoadFailed) in the thread that writes its repository entry,
        and there is no copy to pull again: one thread hop less on the request's path."""
        fingerprint = m.spec.fingerprint()
        if m.entry is not None and m.entry_fp == fingerprint:
            if lazy and m.entry.in_place:
                return True
            problems = await asyncio.to_thread(self.cache.check, m.entry)
            if not problems:
                return True
            log.warning("cache entry gone or damaged; pulling it again",
                        extra=kv(model=m.name, key=m.entry.key, problems="; ".join(problems[:3])))
            if not m.entry.in_place:
                await asyncio.to_thread(self.cache.discard, m.entry.key, f"model {m.name}: {problems[0]}")
        serving = m.state is S.LOADED
        if not serving:
            self._set(m, S.PULLING)
        started = time.monotonic()
        try:
            async with self._pull_slots.slot(lambda: URGENT if m.waiters else BACKGROUND):
                entry = await asyncio.to_thread(self._ensure, m.spec)
        except PullError as e:
            self.metrics.pulls.labels(result="error").inc()
            if serving:
                self._update_failed(m, f"pull: {e}")
            else:
                self._fail(m, f"pull: {e}")
            return False
        m.pull_seconds = round(time.monotonic() - started, 4)
        self.metrics.pull_seconds.observe(m.pull_seconds)
        self.metrics.pulls.labels(result="hit" if entry.hit else "downloaded").inc()
        self._keep_entry(m, entry, fingerprint)
        if not serving:
            self._set(m, S.CACHED)
        log.info("model files ready", extra=kv(model=m.name, key=entry.key, hit=entry.hit, bytes=entry.size, seconds=m.pull_seconds))
        return True

    def _ensure(self, spec: ModelSpec, *, check: bool = False) -> Entry:
        """Blocking: the cache entry of `spec`, leased for that model (under the key's lock,
        so no GC, in any pod, removes it first). `check`: a background source check, which
        must not hold a pull slot through minutes of retries."""
        options = self.settings.pull_options(spec)
        if check:
            options.retry_deadline_s = min(options.retry_deadline_s, 5.0)
        return self.cache.ensure(spec.uri, options, None, lease=True, holder=self._holder(spec.name))

    def _holder(self, name: str) -> str:
        return model_holder(self.settings.holder, name)

    def _keep_entry(self, m: Model, entry: Entry, fingerprint: str) -> None:
        before = self._leased(m)
        m.entry, m.entry_fp = entry, fingerprint
        self._drop_leases(m, before | {entry.key})

    def _leased(self, m: Model) -> set[str]:
        """Keys this model holds leases on: what it wants, what serves, what it would restore."""
        return {c.key for c in (m.entry, m.served and m.served.entry, m.last_good and m.last_good.entry) if c}

    def _drop_leases(self, m: Model, before: set[str]) -> None:
        """Release the leases of keys in `before` the model no longer uses (quick file unlinks)."""
        for key in before - self._leased(m):
            try:
                self.cache.release(key, self._holder(m.name))
            except OSError as e:
                log.warning("could not release a cache lease", extra=kv(model=m.name, key=key, error=str(e)))

    async def _adopt(self, m: Model) -> bool:
        """Restart recovery: the server already serves this model from this very entry."""
        self._adoptable.pop(m.name, None)
        assert m.entry is not None
        served_path = self.adapter.served_path(m.name)
        if served_path is None or served_path.resolve() != m.entry.path.resolve():
            return False
        self.memory.reserve(m.name, self._cost(m, m.entry))
        self._set(m, S.LOADING)
        self._loaded(m, self._wanted(m), trusted=False)
        log.info("model adopted from the running server (no reload)", extra=kv(model=m.name, key=m.entry.key))
        return True

    def _cost(self, m: Model, entry: Entry) -> Any:
        return self.memory.cost_for(key=entry.key, runtime=m.spec.runtime, entry_bytes=entry.size,
                                    declared_host=m.spec.memory, declared_gpu=m.spec.gpu_memory)

    async def _load(self, m: Model, copy: Copy, *, lazy: bool, phases: ColdStart | None = None) -> None:
        """Load `copy` (or replace the served copy in place). Caller holds m.lock. Every way
        out leaves the window closed, the reservations right and the state LOADED (new copy,
        or old copy after a failed update), CACHED (did not fit) or FAILED, with a reason."""
        replacing = m.state is S.LOADED
        cost = self._cost(m, copy.entry)
        slot = f"{m.name}#new" if replacing else m.name  # the new copy is reserved beside the old one
        wait_until = time.monotonic() + self.settings.load_timeout_s if lazy else None
        # a load that will be measured waits for its victims' unloads (its window must not see
        # them); any other load starts while they unload (see _make_room)
        measure = not replacing and not (lazy and self._window_spoilt(copy.spec.runtime)) \
            and self.memory.needs_measure(copy.entry.key, copy.spec.runtime,
                                          server_pid=self._server_pid_for(m.name, copy.spec.runtime, cost=cost))
        try:
            await self._make_room(slot, cost, lazy=lazy, wait_until=wait_until, wait_unloads=measure, phases=phases,
                                  runtime=copy.spec.runtime, server_pid=self._admission_pid(m.name, copy.spec.runtime, cost))
        except DoesNotFit as e:
            if not replacing:
                self._nofit(m, e)
                return
            log.warning("not enough memory to load the new copy beside the old one; swapping", extra=kv(model=m.name))
            if not await self._unload(m, reason="replaced"):
                return
            replacing, slot = False, m.name
            try:
                await self._make_room(slot, cost, lazy=lazy, wait_until=wait_until, wait_unloads=True, phases=phases,
                                      runtime=copy.spec.runtime, server_pid=self._admission_pid(m.name, copy.spec.runtime, cost))
            except DoesNotFit as e2:
                self._nofit(m, e2)
                return
        if replacing:
            m.updating = True  # stays LOADED: the old copy serves until the new one replaces it
        else:
            self._set(m, S.LOADING)
        served = ServedModel(name=m.name, path=copy.entry.path, runtime=copy.spec.runtime,
                             implementation=copy.spec.implementation, version=copy.spec.version,
                             parameters=dict(copy.spec.parameters))
        started = time.monotonic()
        sent: float | None = None  # when the load call went to the server (after any queueing)
        window = None
        importing: asyncio.Event | None = None
        error: BaseException | None = None
        try:
            async with self._load_slot(lazy, phases), self._load_gate(solo=m.crashes > 0):
                mark = time.monotonic()
                # every load opens a window (a remembered one takes no snapshot) so that it never
                # lands in another model's measurement (agent/memory/ledger.py). A measured one, or
                # a preload while others are measured, may wait for open windows: in a thread. A
                # request's load never waits: opened on the loop, an overlap only marks the
                # measured windows contaminated (they are measured again on a later load)
                server_pid = self._server_pid_for(m.name, copy.spec.runtime, place=True, cost=cost)  # several server processes: its own
                await self._after_import(server_pid, phases)
                if self.memory.imports(copy.spec.runtime, server_pid=server_pid):
                    # this load imports the runtime there: the next loads into that process wait for
                    # it (registered before its window opens in a thread, with no await between the
                    # check above and here, so no load slips in beside it meanwhile)
                    importing = asyncio.Event()
                    self._imports[server_pid] = (importing, time.monotonic())
                if measure or (not lazy and self.memory.measuring()):
                    window = await asyncio.to_thread(self.memory.start_measure, m.name, copy.spec.runtime, measure=measure,
                                                     server_pid=server_pid)
                else:
                    window = self.memory.start_measure(m.name, copy.spec.runtime, measure=False, server_pid=server_pid)
                server_mark = sent = time.monotonic()
                self._loading[m.name] = sent
                try:
                    async with asyncio.timeout(self.settings.load_timeout_s):  # in this task: no task to start and join
                        server_s = await self.adapter.load(served)
                finally:
                    self._loading.pop(m.name, None)
                loaded_mark = time.monotonic()
                server_took = server_s if server_s is not None else loaded_mark - server_mark
                if importing is None:  # a load that imported its runtime timed the import, not the
                    # model: kept, a tiny model would be placed as a slow one (agent/runtimes/shards.py)
                    m.server_load_times = (*m.server_load_times[-1:], server_took)
                if window is not None:
                    measured, window = window, None
                    if measured.measured:  # a snapshot (/proc reads) and a store write
                        await asyncio.to_thread(self.memory.finish_measure, measured, key=copy.entry.key)
                    else:
                        self.memory.finish_measure(measured, key=copy.entry.key)
                if phases is not None:  # the adapter says how long the server's own call took
                    phases.server = server_took
                    phases.measure = (server_mark - mark) + (time.monotonic() - loaded_mark)
        except Exception as e:  # adapter errors, timeouts, OSError (disk full), bugs: all end here
            error = e
        except BaseException as e:  # cancelled: leave it consistent, then stop
            error = e
            raise
        finally:
            if window is not None:
                self.memory.abort_measure(window)
            if importing is not None:
                importing.set()
                if self._imports.get(server_pid, (None,))[0] is importing:
                    del self._imports[server_pid]
            m.updating = False
            if error is not None:
                self._release_memory(slot)
                self._load_failed(m, error, replacing=replacing, sent=sent)
        if error is not None:
            if isinstance(error, asyncio.TimeoutError) and not replacing:
                await self._forget_on_server(m.name)
            return
        m.load_seconds = round(time.monotonic() - started, 4)
        self.metrics.load_seconds.observe(m.load_seconds)
        self.metrics.loads.labels(result="ok").inc()
        if replacing:  # the old copy is gone: its reservation passes to the new one
            self.metrics.unloads.labels(reason="replaced").inc()
            self.memory.reserve(m.name, self.memory.release(slot) or cost)
        m.loads += 1
        m.failures, m.retry_at, m.permanent, m.nofit, m.crashes = 0, None, False, False, 0
        self._loaded(m, copy, trusted=_within_measurement(cost))
        if phases is not None:
            phases.loaded = True
        log.info("model loaded", extra=kv(model=m.name, seconds=m.load_seconds, lazy=lazy, replaced=replacing, key=copy.entry.key))

    async def _after_import(self, server_pid: int | None, phases: ColdStart | None) -> None:
        """Wait while a runtime's first load in the server process `server_pid` runs (its
        import: seconds): its window measures the import, charged to the server for good, and
        a load beside it, opened on the loop as a request's load is, would land in that
        figure (agent/memory/ledger.py start_measure, which makes loads opened in a thread wait
        the same way). The wait costs the load little: the process is busy importing, and its
        own load would wait for the same import there. At most `memory.import_wait_s` (5 s)
        after the import's load began: one that hangs holds the others back no longer."""
        waited = time.monotonic()
        while (entry := self._imports.get(server_pid)) is not None:
            importing, began = entry
            remaining = began + self.memory.import_wait_s - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(importing.wait(), remaining)
        if phases is not None:
            phases.queue += time.monotonic() - waited

    def _window_spoilt(self, runtime: str) -> bool:
        """A measurement window opened now would not be recorded (another load or an unload is
        in flight: the server's growth would not be this model's alone), so a lazy load skips
        it rather than snapshot the server's process tree twice for nothing and wait up to
        `measure_wait_s` for the open window; the entry is measured on a quieter load. The
        first load of a runtime in the server is always measured: its import is charged then
        (`memory.overhead()` holds "runtime:<name>" once it was). Preloads keep their windows:
        the ledger serializes them so that those started together are each measured."""
        return bool(self._loading or self._unloads) and f"runtime:{runtime}" in self.memory.overhead()

    def _loaded(self, m: Model, copy: Copy, *, trusted: bool) -> None:
        """`trusted`: the load reserved at least its entry's own measurement (see _wake_reality)."""
        before = self._leased(m)
        m.served = m.last_good = copy
        m.loaded_at = m.last_used = time.monotonic()
        self._set(m, S.LOADED, reason=None)
        self._drop_leases(m, before)  # the previous copy's entry, now that this one serves
        self._signal_memory()  # no longer "loading": a load waiting for memory may evict it
        self._wake_reality(at_once=not trusted)
        self._headroom_wake.set()  # the load took free room: make it again, off any request's path

    def _wake_reality(self, *, at_once: bool) -> None:
        """Check reality after a load: at once when the load may hold more than it reserved (an
        estimate or a declaration alone), else within REALITY_COALESCE_S, one check for every such
        load in that time (a measured entry grows the server by what was reserved; the periodic
        check and the next untrusted load catch any drift)."""
        if at_once:
            if self._reality_later is not None:
                self._reality_later.cancel()
                self._reality_later = None
            self._reality_wake.set()
        elif self._reality_later is None and not self._reality_wake.is_set():
            self._reality_later = asyncio.get_running_loop().call_later(REALITY_COALESCE_S, self._reality_due)

    def _reality_due(self) -> None:
        self._reality_later = None
        self._reality_wake.set()

    @contextlib.asynccontextmanager
    async def _load_slot(self, lazy: bool, phases: ColdStart | None = None) -> AsyncIterator[None]:
        """A load slot. Loads nobody waits for also take a background slot first, so they
        never hold the last slot: a request's lazy load is not starved by stuck preloads."""
        if lazy:
            waited = time.monotonic()
            async with self._load_sem:
                if phases is not None:
                    phases.queue += time.monotonic() - waited
                yield
        else:
            async with self._background_sem, self._load_sem:
                yield

    @contextlib.asynccontextmanager
    async def _load_gate(self, *, solo: bool) -> AsyncIterator[None]:
        """A suspect (the server died while one of its loads was in flight, `crashes` > 0) loads
        alone: it waits for the loads in flight to end and no other load starts beside it, so
        the next death names the culprit alone and an innocent model that happened to load
        beside it is never quarantined; its strike is forgotten once it loads. Suspects go
        first: loads arriving meanwhile wait. Other loads pass as before."""
        if solo:
            self._solo_waiting += 1
            try:
                await self._gate_wait(lambda: self._gate_in == 0)
            finally:
                self._solo_waiting -= 1
                self._gate_move()
            self._solo_in = True
        else:
            await self._gate_wait(lambda: not self._solo_in and not self._solo_waiting)
        self._gate_in += 1
        try:
            yield
        finally:  # no await here: a cancelled load never leaves the gate shut
            self._gate_in -= 1
            if solo:
                self._solo_in = False
            self._gate_move()

    async def _gate_wait(self, open_: Callable[[], bool]) -> None:
        while not open_():
            await self._gate_moved.wait()

    def _gate_move(self) -> None:
        self._gate_moved = _pulsed(self._gate_moved)

    def _load_failed(self, m: Model, error: BaseException, *, replacing: bool, sent: float | None) -> None:
        """`sent`: when the load call went to the server (None: it never did). A load that only
        reached the server after it died is not blamed for the death (see server_restarted)."""
        if isinstance(error, asyncio.TimeoutError):
            reason = f"load: no answer within --load-timeout {self.settings.load_timeout_s:g}s"
        elif isinstance(error, RuntimeErrorBase):
            reason = f"load: {error.reason}"
            if isinstance(error, ServerUnavailable):
                # keep the earliest: a retry that finds the server still down must not move it
                # past the moment the server died (it would no longer be blamed)
                if m.died_loading is None and sent is not None:
                    m.died_loading = sent
                self._down_since = min(self._down_since or time.monotonic(), time.monotonic())
        elif isinstance(error, asyncio.CancelledError):
            reason = "load: cancelled (agent stopping)"
        else:
            reason = f"load: {type(error).__name__}: {error}"
        self.metrics.loads.labels(result="error").inc()
        if replacing and not isinstance(error, asyncio.CancelledError):
            self._update_failed(m, reason)  # the adapters replace in place: the old copy still serves
        elif m.state is S.LOADING:
            self._fail(m, reason)
        self._quarantine(m)

    async def _forget_on_server(self, name: str) -> None:
        """After a load timed out the server may still finish it: unload it, best effort."""
        try:
            await asyncio.wait_for(self.adapter.unload(name), timeout=min(10.0, self.settings.load_timeout_s))
        except (RuntimeErrorBase, asyncio.TimeoutError) as e:
            log.warning("could not unload a model whose load timed out", extra=kv(model=name, error=str(e)))

    def _nofit(self, m: Model, e: DoesNotFit) -> None:
        self.metrics.loads.labels(result="nofit").inc()
        m.permanent = e.permanent
        m.nofit = not e.permanent
        m.retry_hint = e.retry_after_s
        m.retry_at = time.monotonic() + e.retry_after_s if e.retry_after_s and not e.permanent else None
        if m.state is not S.CACHED:
            self._set(m, S.CACHED)
        m.reason = str(e)
        log.warning("model does not fit in memory; it stays cached", extra=kv(model=m.name, reason=str(e)))

    async def _make_room(self, slot: str, cost: Any, *, lazy: bool, wait_until: float | None = None,
                         wait_unloads: bool = True, phases: ColdStart | None = None, runtime: str | None = None,
                         server_pid: int | None = None) -> None:
        """Reserve `cost` under `slot`, evicting LRU models (not pinned, no lease, old enough for
        lazy loads) first. Raises DoesNotFit with nothing reserved. `wait_until`: while memory
        is short only for now (models loading, leased or young), wait for it to free until then.

        `memory.admit` plans, reserves and marks the victims as unloading in one atomic step,
        so concurrent loads never pick the same victim nor count the same free bytes: no
        agent-wide lock is held while victims unload, and several misses proceed together.

        Victims are unloaded off the load's critical path: each eviction commits first (under
        the victim's lock, no lease: it is UNLOADING from then on, so no request can lease it),
        and this returns once every victim committed; their unloads run on while the load
        starts. The ledger allows it: a model being unloaded counts as free in `used()` (its
        bytes are promised to this load) and in `held()` until its unload ends. The load waits
        for the unloads when `wait_unloads` (its memory will be measured: its window must not
        see them), when a victim holds GPU memory (a device has no slack for both copies), or
        when the server would hold more than the budget x (1 + `unload_overlap`) while both
        copies are in it (`held()`: real memory stays within the budget's tolerance by default).

        `runtime`: the load's, whose import the ledger plans and charges from admission on
        unless the load's server process is known to hold it (`server_pid`: the process the
        name is placed on already, or a quick model's, see `_admission_pid`; any other is placed
        only later, right before its load, so it may go to a process that never imported it:
        see `memory.admit`)."""
        busy = 0
        while True:
            waited = time.monotonic()
            try:
                victims = self.memory.admit(slot, cost, self._relief_candidates(), lazy=lazy, runtime=runtime,
                                            server_pid=server_pid)
            except DoesNotFit as e:
                remaining = (wait_until or 0.0) - time.monotonic()
                if e.permanent or remaining <= 0:
                    raise
                changed = self._memory_changed
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=min(remaining, e.retry_after_s or remaining))
                if phases is not None:
                    phases.queue += time.monotonic() - waited
                continue
            if lazy and (victims or self._misses.pressed(time.monotonic())):
                # requests' misses need room: keep the headroom while they go on, sized by their runs
                self._misses.miss(time.monotonic(), unloading=bool(self._unloads))
            if not victims:
                await self._after_unloads(wait_unloads, phases)
                return
            rule = ("victim_measured" if wait_unloads else "victim_gpu" if any(self._holds_gpu(v) for v in victims)
                    else None if self._room_for_both() else "victim_overlap")
            wait_unloads = rule is not None
            loop = asyncio.get_running_loop()
            claims = [loop.create_future() for _ in victims]
            unloads = [self._spawn(self._evict(self.models[v], claim), f"evict:{v}") for v, claim in zip(victims, claims)]
            evicted = await asyncio.gather(*(unloads if wait_unloads else claims))
            if phases is not None:
                phases.unload += time.monotonic() - waited
                if rule is not None:
                    self.metrics.cold_start_unload_wait_seconds.labels(rule=rule).observe(time.monotonic() - waited)
            kept = [v for v, ok in zip(victims, evicted) if not ok]
            if not kept:
                return
            # a request leased a victim meanwhile: it stays; give back and plan again
            for name in kept:
                self.memory.cancel_unload(name)
            self._release_memory(slot)
            busy += 1
            if busy >= 8:
                raise DoesNotFit(slot, cost.devices(), self.memory.budget(),
                                 f"model {slot!r}: the models that could make room stay busy", retry_after_s=1.0)

    async def _after_unloads(self, measured: bool, phases: ColdStart | None) -> None:
        """A load that needed no victim may still find unloads in flight (the headroom's, or
        another miss's victims): it waits for them while its window would see them (`measured`)
        or while the server could not hold them and it at once (`_room_for_both`)."""
        waited, rule = time.monotonic(), None
        while self._unloads and (measured or not self._room_for_both()):
            rule = rule or ("in_flight_measured" if measured else "in_flight_overlap")
            await self._memory_changed.wait()  # set when an unload ends (its reservation released)
        if phases is not None:
            phases.unload += time.monotonic() - waited
            if rule is not None:
                self.metrics.cold_start_unload_wait_seconds.labels(rule=rule).observe(time.monotonic() - waited)

    # ------------------------------------------------------------------ headroom
    async def _headroom_loop(self) -> None:
        while True:
            await self._headroom_wake.wait()
            self._headroom_wake.clear()
            try:
                await self._keep_headroom()
            except Exception:  # an eviction's own errors end in its model's state; this is a bug
                log.exception("headroom eviction failed")

    def _headroom_loads(self) -> int:
        """Loads of room the headroom keeps free now: what the misses need (`MissRuns`), at most
        `--headroom`; 0 without pressure or with `--headroom 0`."""
        if self.settings.headroom <= 0:
            return 0
        return int(min(self.settings.headroom, self._misses.loads(time.monotonic())))

    def _headroom_target(self, loads: int | None = None) -> dict[str, int]:
        """Device -> bytes the headroom keeps free now (`loads`, default `_headroom_loads()`, of
        the median loaded size, at most HEADROOM_MAX_FRACTION of the budget in whole loads);
        empty: none."""
        if loads is None:
            loads = self._headroom_loads()
        return self.memory.headroom(loads, HEADROOM_MAX_FRACTION) if loads else {}

    async def _keep_headroom(self) -> int:
        """Keep room for as many loads of the median loaded size free as misses need (`MissRuns`:
        the longest run of misses that came while unloads were in flight, over the last
        HEADROOM_WINDOW_S), at most `--headroom` and HEADROOM_MAX_FRACTION of a device's budget,
        by evicting idle models (in `--eviction` order) ahead of need, so that a miss on a full
        node finds room and loads at once: no victim's unload round trip on its path. Runs in
        one background task, woken after each load commits. Same rules as a miss's eviction
        (`memory.reclaim`: no lease, not pinned, past `--min-residency`; each eviction commits
        under the victim's lock, `_evict`); a victim's bytes count as free only once its
        eviction commits. Never while a measured window is open (the unload would spoil it: the
        next load's commit wakes this again). Only under pressure: from a miss that had to
        evict on its own path, while misses go on (HEADROOM_PRESSURE_S after the last), so that
        a node whose models all fit keeps them all (no capacity is given up where no miss needs
        room), and a node whose misses are rare gives up one load, not the whole margin.
        Returns how many it unloaded."""
        evicted = 0
        for _ in range(8):  # a few rounds: loads committing meanwhile take room again
            if self._closing or self.memory.measuring():
                break
            target = self._headroom_target()
            if not target:
                break
            victims = self.memory.reclaim(target, self._relief_candidates())
            if not victims:
                break
            done = await asyncio.gather(*(self._evict(self.models[v], reason="headroom") for v in victims))
            evicted += sum(done)
            if not any(done):
                break
        return evicted

    def _relief_candidates(self) -> Iterator[Candidate]:
        """Loaded models an eviction may pick, each with its score (`--eviction`: lfu-decay's
        decayed request count, else 0: least recently used first). Lazy: the ledger walks the
        models only when a load does not fit in the free room (with the headroom kept, most
        misses fit and cost no pass over every configured model)."""
        tick, half_life = self._tick, self._half_life  # (under lru no score is ever counted: all 0)
        return (Candidate(o.name, o.last_used, o.loaded_at, o.spec.pinned, o.inflight, score=o.score_now(tick, half_life))
                for o in self.models.values() if o.state is S.LOADED and not o.lock.locked())

    async def _evict_for_reality(self, name: str) -> bool:
        m = self.models.get(name)
        return m is not None and await self._evict(m)

    def _room_for_both(self) -> bool:
        """Whether the server may hold the victims being unloaded and the reservation just made
        at once: `held()` within the budget x (1 + unload_overlap) on every device."""
        held, limit = self.memory.held(), 1.0 + self.settings.unload_overlap
        # a GPU has no slack: a victim's bytes there are free only once its unload ended
        return all(held.get(d, 0) <= b * (limit if d == "host" else 1.0) for d, b in self.memory.budget().items() if b)

    def _holds_gpu(self, name: str) -> bool:
        cost = self.memory.reservations().get(name)
        return cost is not None and any(d != "host" and b > 0 for d, b in cost.devices().items())

    async def _evict(self, v: Model, claim: asyncio.Future | None = None, reason: str = "evicted") -> bool:
        """Unload `v` to make room, unless a request holds it. Never waits for v's lock.
        `claim` is resolved as soon as the eviction committed (True: `v` is UNLOADING and no
        request can lease it any more) or declined (False), before the unload's round trip."""
        try:
            if v.lock.locked():
                return False
            async with v.lock:  # free lock: acquired without yielding, so the check below is current
                if v.inflight > 0 or v.state is not S.LOADED:
                    return False  # a request took a lease: never unload under it
                # committed: _unload marks it draining and UNLOADING before its first await
                # (no request in flight, so no drain), before `claim`'s waiter runs again
                if claim is not None and not claim.done():
                    claim.set_result(True)
                if not await self._unload(v, reason=reason):
                    return False
                self.metrics.evictions.inc()
                return True
        finally:
            if claim is not None and not claim.done():
                claim.set_result(False)

    async def unload_idle(self, idle_s: float) -> int:
        """Unload models loaded on demand (not pinned, not preload) that no request used for
        `idle_s` seconds, as an eviction would (never under a request); in a fleet these are
        copies the picker no longer routes here (`--idle-unload`). Returns how many."""
        cutoff = time.monotonic() - idle_s
        idle = [m for m in self.models.values()
                if m.state is S.LOADED and not m.wants_loaded() and not m.removed and m.inflight == 0 and m.last_used < cutoff]
        return sum([await self._evict(m, reason="idle") for m in idle])

    async def _unload(self, m: Model, *, reason: str) -> bool:
        """Drain, then unload what the server holds. Caller holds m.lock. True when it is gone;
        else the model is FAILED with a reason (and its reservation released)."""
        m.draining = True  # new requests wait for the next load instead of leasing this copy
        try:
            if m.inflight > 0:
                await self._drain(m, reason)
            self._set(m, S.UNLOADING)
            self.memory.begin_unload(m.name)
            started = time.monotonic()
            self._unloads.add(m.name)
            try:
                await self.adapter.unload(m.name)
            except RuntimeErrorBase as e:
                self._fail(m, f"unload: {e.reason}")
                return False
            finally:
                self._unloads.discard(m.name)
                before = self._leased(m)
                if not self._release_memory(m.name):
                    self._signal_memory()  # a load waiting for unloads to end (_after_unloads), even if nothing was reserved
                m.served = None
                if reason != "replaced":
                    m.last_good = None
                self._drop_leases(m, before)
            self.metrics.unload_seconds.observe(time.monotonic() - started)
            self.metrics.unloads.labels(reason=reason).inc()
            m.loaded_at = 0.0
            self._set(m, S.CACHED, reason=None)
            log.info("model unloaded", extra=kv(model=m.name, reason=reason, seconds=round(time.monotonic() - started, 4)))
            return True
        finally:
            m.draining = False

    async def _drain(self, m: Model, reason: str) -> None:
        """Wait for the requests in flight to finish (release() signals), at most drain_timeout_s."""
        log.info("draining before unload", extra=kv(model=m.name, reason=reason, inflight=m.inflight))
        try:
            await asyncio.wait_for(m.idle.wait(), timeout=self.settings.drain_timeout_s)
        except asyncio.TimeoutError:
            log.warning("drain timeout expired; unloading with requests in flight",
                        extra=kv(model=m.name, reason=reason, inflight=m.inflight, drain_timeout=self.settings.drain_timeout_s))

    async def _remove(self, m: Model) -> None:
        """Removed from config: drain, unload, then release the cache leases (the entries stay)."""
        if m.name in self._adoptable:  # served by the server before we started, never adopted
            self._adoptable.pop(m.name, None)
            try:
                await self.adapter.unload(m.name)
            except RuntimeErrorBase as e:
                log.warning("could not unload removed model", extra=kv(model=m.name, reason=e.reason))
        if m.state is S.LOADED or m.served is not None:
            await self._unload(m, reason="removed")
        if not m.removed:
            return  # added again while it unloaded: it keeps its leases; its converge reloads it
        before = self._leased(m)
        m.entry = m.served = m.last_good = None
        self._drop_leases(m, before)
        if self.models.get(m.name) is m:
            del self.models[m.name]
        log.info("model removed", extra=kv(model=m.name))

    def _schedule_orphan_cleanup(self, desired: set[str]) -> None:
        """After the first config: unload what the server serves but nobody configured."""
        orphans = [n for n in self._adoptable if n not in desired and self._mine(n)]

        async def _cleanup() -> None:
            for name in orphans:
                if name in self._desired:  # configured since: its converge adopts or loads it (an
                    continue  # unload now would land after that load: served no more, LOADED here)
                self._adoptable.pop(name, None)
                try:
                    await self.adapter.unload(name)
                    log.info("unloaded a model the config no longer names", extra=kv(model=name))
                except RuntimeErrorBase as e:
                    log.warning("could not unload orphan", extra=kv(model=name, reason=e.reason))

        if orphans:
            self._spawn(_cleanup(), "orphans")

    def _admission_pid(self, name: str, runtime: str, cost: Any) -> int | None:
        """With several server processes: the pid of the one `name`'s load will go to where
        that is known before it is placed (`ShardedAdapter.admission_pid`: the one it is placed
        on, or the first for a quick model while that one holds the runtime), so the ledger
        charges no possible import for it there; None when only its placement will tell (see
        `_server_pid_for`) or with one server."""
        return self._ask_placement("admission_pid", name, runtime, cost)

    def _server_pid_for(self, name: str, runtime: str, *, place: bool = False, cost: Any = None) -> int | None:
        """With several server processes (agent/runtimes/shards.py): the pid of the one that
        holds `name` or would get it now (`place`: put it there now, its load follows), so the
        ledger tells each process's first load of a runtime apart. None with one server. Where
        it goes weighs its load time (`_placement_load_s`) and its files' bytes (`cost`'s
        entry_bytes: what a load reads; not the declared memory, a reservation users round up)."""
        return self._ask_placement("server_pid_for", name, runtime, cost, place=place)

    def _ask_placement(self, method: str, name: str, runtime: str, cost: Any, **kwargs: Any) -> int | None:
        """Call the adapter's placement `method` (only ShardedAdapter has them; None without)
        with what placement weighs: the model's load time (`_placement_load_s`) and its files' bytes."""
        ask = getattr(self.adapter, method, None)
        if ask is None:
            return None
        m = self.models.get(name)
        return ask(name, runtime=runtime, load_s=_placement_load_s(m.server_load_times) if m is not None else None,
                   size=cost.entry_bytes if cost is not None else None, **kwargs)

    # ------------------------------------------------------------------ the server's real state
    async def server_restarted(self, names: set[str] | None = None, exit_: dict | None = None) -> None:
        """The server came back empty. Blame the loads in flight when it died (twice in a row:
        quarantine), then mark every served model lost; each model's own task reloads it. The
        reason ("oom_killed" when the cgroup's OOM-kill counter grew, see agent/memory/reality.py)
        is counted by reason and shown in /status (after the reloads are scheduled).
        `names`: one of several server processes restarted (--server-processes N) and these are
        the models it held or was loading: only they are lost; `exit_` is how it exited."""
        self.memory.reset_server()
        now = time.monotonic()
        cut = self._down_since or now
        self._down_since = None
        retry = []
        held = list(self.models.values()) if names is None else [m for m in self.models.values() if m.name in names]
        for m in held:
            if m.name in self._loading or (m.died_loading is not None and m.died_loading <= cut):
                m.crashes += 1
                log.warning("server died while this model was loading", extra=kv(model=m.name, times=m.crashes))
            elif m.died_loading is not None and m.state is S.FAILED and not m.permanent:
                # its load only found the server gone: not its fault, and no reason to wait
                # out a backoff now that the server is back
                m.retry_at = None
                retry.append(m)
            m.died_loading = None
        lost = [m for m in held if m.served is not None or m.crashes >= 2] + retry
        log.warning("server restarted; reloading what it served", extra=kv(models=len(lost)))
        for m in lost:
            m.lost_since = now
            self._schedule(m)
        self._restock(m.name for m in lost)
        if names is None:
            exit_ = getattr(getattr(self.adapter, "process", None), "last_exit", None)
        try:
            why = await asyncio.to_thread(self.memory.restart_reason, exit_)
        except Exception as e:  # reading the cgroup must not hold up anything
            why = {"reason": "unknown", "detail": f"{type(e).__name__}: {e}", "at": time.time()}
        self.last_restart = why
        self.metrics.server_restarts.labels(reason=why["reason"]).inc()
        log.warning("server restart reason", extra=kv(reason=why["reason"], detail=why["detail"]))

    async def resync_server(self, names: set[str] | None = None, *, restock: bool = False) -> None:
        """Compare what the agent holds loaded with the server's index (a sidecar restart we
        did not see, a model unloaded behind our back); each lost model's task reloads it.
        `restock`: the server was seen down; the agent is not ready until they are back."""
        taken = time.monotonic()
        try:
            index = await self.adapter.index()
        except RuntimeErrorBase as e:
            log.warning("server index unavailable; resync skipped", extra=kv(reason=e.reason))
            return
        # a model that finished loading after the index was asked for may be missing from it
        # only because the server listed its models first: not lost (as _notice_loss says)
        missing = [m for m in self.models.values()
                   if (names is None or m.name in names) and m.state is S.LOADED and not m.removed
                   and m.loaded_at <= taken and index.get(m.name, "").upper() != "READY"]
        if missing:
            log.warning("server lost models; reloading", extra=kv(models=",".join(m.name for m in missing)))
        for m in missing:
            m.lost_since = taken
            self._schedule(m)
        if restock:
            self._restock(m.name for m in missing)

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.resync_interval_s)
            await self.resync_server()

    def _quarantine(self, m: Model) -> bool:
        """A model whose loads killed the server twice in a row never loads again until its
        config changes (the rest keep serving)."""
        if m.crashes < 2:
            return False
        if m.reason != QUARANTINE or m.state is not S.FAILED:
            if m.state is S.LOADED:  # it did load in the end; keep it, forget the strikes
                m.crashes = 0
                return False
            self._release_memory(m.name)
            self._set(m, S.FAILED, reason=QUARANTINE)
            m.permanent, m.retry_at = True, None
            log.error("model quarantined", extra=kv(model=m.name, reason=QUARANTINE))
        return True

    # ------------------------------------------------------------------ failures
    def _backoff(self, m: Model) -> float:
        base = min(300.0, self.settings.retry_base_s * 2 ** min(m.failures, 9))
        return base * random.uniform(0.5, 1.5)

    def _fail(self, m: Model, reason: str) -> None:
        m.failures += 1
        m.retry_at = time.monotonic() + self._backoff(m)
        if m.state is not S.FAILED:
            self._set(m, S.FAILED, reason=reason)
        m.reason = reason
        m.last_failure = reason
        log.warning("model failed", extra=kv(model=m.name, reason=reason, failures=m.failures, retry_in=round(m.retry_at - time.monotonic(), 1)))

    def _update_failed(self, m: Model, reason: str) -> None:
        """An update failed: the old copy keeps serving; the update is retried with backoff."""
        m.failures += 1
        m.retry_at = time.monotonic() + self._backoff(m)
        m.reason = f"update failed, previous copy still serving: {reason}"
        log.warning("update failed; previous copy still serving", extra=kv(model=m.name, reason=reason,
                                                                           retry_in=round(m.retry_at - time.monotonic(), 1)))

    def _recover(self, m: Model, reason: str) -> None:
        """After an unexpected error: no `#new` reservation, not updating, and either LOADED
        (the old copy, which the server still serves) or FAILED with nothing reserved."""
        self._release_memory(f"{m.name}#new")
        m.updating = m.draining = False
        if m.state is S.LOADED and m.served is not None:
            self._update_failed(m, reason)
            return
        if m.state in (S.LOADING, S.UNLOADING, S.LOADED):  # what the server holds is unknown now
            self._release_memory(m.name)
            m.served = None
        self._fail(m, reason)

    def _release_memory(self, name: str) -> bool:
        """Release `name`'s reservation; wake what waits for memory. False: it held none."""
        if self.memory.release(name) is None:
            return False
        self._signal_memory()
        self._wake_nofit()
        return True

    def _signal_memory(self) -> None:
        """Wake the loads waiting for memory (see _make_room)."""
        self._memory_changed = _pulsed(self._memory_changed)

    def _wake_nofit(self) -> None:
        """Memory freed: preloads that did not fit try again now (not only on their timer)."""
        for o in self.models.values():
            if o.nofit and o.state is S.CACHED and o.wants_loaded() and not o.removed and not o.lock.locked():
                o.nofit, o.retry_at = False, None
                self._schedule(o)

    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5 * min(1.0, self.settings.retry_base_s))
            now = time.monotonic()
            for m in list(self.models.values()):
                if m.removed or m.permanent or m.lock.locked() or m.retry_at is None or m.retry_at > now:
                    continue
                failed = m.state is S.FAILED and (m.wants_loaded() or m.entry is None)
                update = m.state is S.LOADED  # a failed update: try again
                nofit = m.state is S.CACHED and m.nofit and m.wants_loaded()
                if failed or update or nofit:
                    m.retry_at = None
                    self._schedule(m)

    async def _source_loop(self) -> None:
        """Every resync interval, list each model's source again (metadata only): an object
        replaced under the same URI makes a new cache entry, which is then loaded in place of
        the old one. Unchanged sources are cache hits that move nothing."""
        while True:
            await asyncio.sleep(self.settings.resync_interval_s)
            self.refresh_sources()

    def refresh_sources(self) -> int:
        """Schedule a source check of every settled model (not one whose last check is still
        queued or running); returns how many."""
        n = 0
        for m in list(self.models.values()):
            if (not m.removed and m.entry is not None and m.state in (S.CACHED, S.LOADED) and not self._closing
                    and m.name not in self._checking):
                self._checking.add(m.name)
                self._spawn(self._check_source(m), f"source-check:{m.name}")
                n += 1
        return n

    async def _check_source(self, m: Model) -> None:
        """List the source and maybe pull, WITHOUT the model's lock (a request's load never
        queues behind a check waiting for a pull slot); then apply the result under the lock."""
        spec = m.spec
        try:
            async with self._pull_slots.slot(lambda: CHECK):
                entry = await asyncio.to_thread(self._ensure, spec, check=True)
        except PullError as e:
            self.metrics.pulls.labels(result="error").inc()
            log.warning("source check failed; cached copy kept", extra=kv(model=m.name, reason=str(e)))
            return
        finally:
            self._checking.discard(m.name)
        async with m.lock:
            current = not m.removed and m.spec.fingerprint() == spec.fingerprint() and m.entry_fp == spec.fingerprint()
            if not current or m.entry is None or m.entry.key == entry.key:
                self._drop_leases(m, {entry.key})  # the check's own lease, unless the model uses the key
                return
            log.info("model source changed", extra=kv(model=m.name, old=m.entry.key, new=entry.key))
            self._keep_entry(m, entry, spec.fingerprint())
            await self._guarded(m, self._step(m))

    async def _lease_loop(self) -> None:
        """Heartbeat the cache leases so other pods sharing the cache see them as live."""
        while True:
            await asyncio.sleep(30)
            try:
                await asyncio.to_thread(self.cache.refresh_leases)
            except Exception:
                log.exception("lease refresh failed")

    # ------------------------------------------------------------------ bookkeeping
    def _set(self, m: Model, new: State, reason: str | None = ...) -> None:  # type: ignore[assignment]
        old = m.state
        if new is not old and new not in TRANSITIONS[old]:
            raise RuntimeError(f"illegal transition {old.value} -> {new.value} for model {m.name!r}")
        m.state = new
        if reason is not ...:
            m.reason = reason
        elif new is not S.FAILED:
            m.reason = None if new in (S.LOADED, S.PULLING, S.LOADING) else m.reason
        m.changed_at = time.time()
        if new is not old:
            self.on_change()
            log.debug("transition", extra=kv(model=m.name, old=old.value, new=new.value))

    def update_gauges(self) -> None:
        """Models per state, memory used and budget, the headroom kept now: refreshed when
        /metrics is scraped."""
        counts = {s: 0 for s in State}
        for m in self.models.values():
            counts[m.state] += 1
        for s, n in counts.items():
            self.metrics.models.labels(state=s.value).set(n)
        used, headroom = self.memory.used(), self._headroom_target()
        for device, budget in self.memory.budget().items():
            self.metrics.memory_used.labels(device=device).set(used.get(device, 0))
            self.metrics.memory_budget.labels(device=device).set(budget)
            self.metrics.headroom.labels(device=device).set(headroom.get(device, 0))

    def status(self) -> dict[str, Any]:
        used, held = self.memory.used(), self.memory.held()
        headroom_loads = self._headroom_loads()
        return {
            "models": {name: m.status(self.memory, self._tick, self._half_life) for name, m in sorted(self.models.items())},
            "eviction": {"policy": self.settings.eviction,
                         "half_life_requests": self._half_life or None},
            "config": {
                "file": self.config.file if self.config else None,
                "digest": self.config.digest if self.config else None,
                "rejected": [e.__dict__ for e in self.config_errors],
                "parse_error": self.config_parse_error,
            },
            "memory": {d: {"used": used.get(d, 0), "held": held.get(d, 0), "budget": b}
                       for d, b in self.memory.budget().items()},
            # the free margin kept now (`_keep_headroom`): loads of room and bytes per device
            "headroom": {"max_loads": self.settings.headroom, "loads": headroom_loads,
                         "bytes": self._headroom_target(headroom_loads)},
            "counts": {s.value: sum(1 for m in self.models.values() if m.state is s) for s in State},
            "server_restart": self.last_restart,
        }


def _pulsed(event: asyncio.Event) -> asyncio.Event:
    """Wake whoever waits on `event` now and return a fresh one for the next waiters: a waiter
    that took the old event is woken once; one that comes later waits for the next pulse."""
    event.set()
    return asyncio.Event()
