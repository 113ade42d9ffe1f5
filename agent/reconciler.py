"""The model's life: one state machine, one owner.

    registered ─► pulling ─► cached ─► loading ─► loaded ─► unloading ─► cached
         ▲            │                    │         │  (evicted: LRU)
         └── failed ◄─┴────────────────────┘         └─ removed from config: unload, release lease

Guarantees, each enforced here and nowhere else:
  * Every transition of one model happens under that model's lock, in order (`_set` checks
    it against TRANSITIONS). Different models proceed in parallel under global bounds:
    `pull_concurrency` pulls and `load_concurrency` loads at a time.
  * A request holds an in-flight lease (`Model.inflight`) from `acquire` to `release`.
    `acquire` takes the lease before it looks at the state and without awaiting in between,
    and eviction re-checks `inflight == 0` under the victim's lock before it unloads: a model
    is never unloaded under a request (Seldon's agent does that; we must not).
  * A request for a model that is not loaded triggers one load (single flight) and waits,
    bounded by `load_timeout_s` and by `max_queue` waiters.
  * An update loads the new copy before the old one goes (the adapters replace in place);
    when memory cannot hold both, it swaps and says so in the log.
  * `failed` keeps its reason and retries with exponential backoff and jitter; a config change
    to that model resets the count.
"""
from __future__ import annotations

import asyncio
import enum
import random
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from agent.config import ConfigError, ConfigParseError, ConfigResult, ModelSpec
from agent.logging import get_logger, kv
from agent.memory import Candidate, DoesNotFit, MemoryManager
from agent.metrics import Metrics
from agent.runtimes import RuntimeAdapter, RuntimeErrorBase, ServedModel
from agent.settings import Settings
from puller import Cache, Entry, PullError

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
TRANSITIONS: dict[State, set[State]] = {
    S.REGISTERED: {S.PULLING, S.FAILED},
    S.PULLING: {S.CACHED, S.FAILED},
    S.CACHED: {S.PULLING, S.LOADING, S.FAILED},
    # LOADING -> CACHED: it did not fit in memory (the model stays cached, the reason says why)
    S.LOADING: {S.LOADED, S.FAILED, S.CACHED},
    # LOADED -> CACHED: the server lost it (restart). An update stays LOADED (`updating`):
    # the old copy serves until the new one replaces it in place.
    S.LOADED: {S.UNLOADING, S.CACHED},
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


@dataclass(eq=False)
class Model:
    spec: ModelSpec
    state: State = S.REGISTERED
    reason: str | None = None
    entry: Entry | None = None
    entry_fp: str | None = None  # spec fingerprint `entry` was pulled for
    recheck: bool = False  # list the source again (periodic source check)
    served: tuple[str, str] | None = None  # (cache key, spec fingerprint) the server holds
    removed: bool = False
    inflight: int = 0
    waiters: int = 0
    last_used: float = 0.0
    loaded_at: float = 0.0
    failures: int = 0
    permanent: bool = False  # does not fit even alone: no retry until the config changes
    retry_hint: float | None = None  # seconds until a load that did not fit may (retry-after)
    retry_at: float | None = None
    pull_seconds: float | None = None
    load_seconds: float | None = None
    loads: int = 0
    updating: bool = False  # a new copy is loading in place of the served one
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    load_task: asyncio.Task | None = None
    changed_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.spec.name

    def wants_loaded(self) -> bool:
        return self.spec.pinned or self.spec.preload

    def status(self, memory: MemoryManager) -> dict[str, Any]:
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
            "pull_seconds": self.pull_seconds,
            "load_seconds": self.load_seconds,
            "loaded_for_seconds": round(now - self.loaded_at, 3) if self.state == S.LOADED else None,
            "idle_seconds": round(now - self.last_used, 3) if self.last_used else None,
            "retry_in_seconds": round(max(0.0, self.retry_at - now), 3) if self.retry_at else None,
            "changed_at": self.changed_at,
        }
        return doc


def _memory_doc(memory: MemoryManager, name: str) -> dict[str, Any] | None:
    cost = memory.reservations().get(name)
    if cost is None:
        return None
    return {"host": cost.host, "gpu": dict(cost.gpu), "method": cost.method}


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
    """Owns every model's state. The watcher calls `apply`, the router `acquire`/`release`."""

    def __init__(self, settings: Settings, cache: Cache, adapter: RuntimeAdapter, memory: MemoryManager, metrics: Metrics):
        self.settings = settings
        self.cache = cache
        self.adapter = adapter
        self.memory = memory
        self.metrics = metrics
        self.models: dict[str, Model] = {}
        self.config: ConfigResult | None = None
        self.config_errors: tuple[ConfigError, ...] = ()
        self.config_parse_error: str | None = None
        self.applied_once = asyncio.Event()
        self._pull_sem = asyncio.Semaphore(settings.pull_concurrency)
        self._load_sem = asyncio.Semaphore(settings.load_concurrency)
        self._tasks: set[asyncio.Task] = set()
        self._adoptable: dict[str, str] = {}  # READY on the server at start, not yet adopted
        self._background: list[asyncio.Task] = []
        self._closing = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Read what the server already serves (restart recovery), start the retry loop."""
        try:
            index = await self.adapter.index()
        except RuntimeErrorBase as e:
            log.warning("server index unavailable at start", extra=kv(reason=e.reason))
            index = {}
        self._adoptable = {n: st for n, st in index.items() if st.upper() == "READY"}
        if self._adoptable:
            log.info("server already serves models", extra=kv(count=len(self._adoptable)))
        self._background.append(asyncio.create_task(self._retry_loop(), name="retry-loop"))
        self._background.append(asyncio.create_task(self._lease_loop(), name="lease-loop"))
        self._background.append(asyncio.create_task(self._source_loop(), name="source-loop"))

    async def close(self) -> None:
        self._closing = True
        for t in self._background:
            t.cancel()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._background, *self._tasks, return_exceptions=True)

    async def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until no converge task runs (tests and prefetch use it)."""
        deadline = time.monotonic() + timeout
        while self._tasks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"reconciler still busy with {len(self._tasks)} task(s)")
            await asyncio.wait(list(self._tasks), timeout=remaining)

    # ------------------------------------------------------------------ config
    async def apply(self, result: ConfigResult) -> None:
        """Make `result` the desired set. Cheap: O(models) dict work; I/O runs in tasks."""
        self.config = result
        self.config_parse_error = None
        self.config_errors = result.errors
        for err in result.errors:
            self.metrics.config_errors.labels(kind="entry").inc()
            log.warning("config entry rejected", extra=kv(file=err.file, model=err.model, index=err.index, reason=err.reason))
        desired = {n: s for n, s in result.models.items() if self._mine(n)}
        for name, spec in desired.items():
            m = self.models.get(name)
            if m is None:
                m = self.models[name] = Model(spec)
                self._schedule(m)
            elif m.spec is spec and not m.removed:
                continue  # the parser reuses the ModelSpec of an unchanged entry
            elif m.removed or m.spec != spec or m.spec.fingerprint() != spec.fingerprint():
                if m.removed or m.spec.fingerprint() != spec.fingerprint():
                    m.failures, m.permanent, m.retry_at = 0, False, None
                m.spec, m.removed = spec, False
                self._schedule(m)
        for name, m in self.models.items():
            if name not in desired and not m.removed:
                m.removed = True
                self._schedule(m)
        if not self.applied_once.is_set():
            self._schedule_orphan_cleanup(set(desired))
            self.applied_once.set()
        self.metrics.config_applied.set_to_current_time()
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
        m = self.models.get(name)
        if m is None or m.removed:
            raise UnknownModel(name)
        m.inflight += 1  # the lease comes first: from here on eviction skips this model
        self.metrics.inflight.labels(model=name).inc()
        m.last_used = time.monotonic()
        if m.state is S.LOADED:
            self.metrics.lookups.labels(result="hit").inc()
            return m
        self.metrics.lookups.labels(result="miss").inc()
        try:
            await self._wait_loaded(m)
        except BaseException:
            self.release(m)
            raise
        return m

    def release(self, m: Model) -> None:
        m.inflight -= 1
        m.last_used = time.monotonic()
        self.metrics.inflight.labels(model=m.name).dec()

    async def _wait_loaded(self, m: Model) -> None:
        if m.state is S.FAILED and (m.permanent or m.entry is None):
            raise ModelUnavailable(m.name, m.reason or "failed", retry_after=None if m.permanent else self._retry_after(m))
        if m.waiters >= self.settings.max_queue:
            raise ModelUnavailable(m.name, f"{m.waiters} requests already wait for it to load", retry_after=1)
        if m.load_task is None or m.load_task.done():
            m.load_task = asyncio.create_task(self._lazy_load(m), name=f"lazy-load:{m.name}")
        m.waiters += 1
        started = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(m.load_task), timeout=self.settings.load_timeout_s)
        except asyncio.TimeoutError:
            raise ModelUnavailable(m.name, f"not loaded within {self.settings.load_timeout_s:g}s", retry_after=5) from None
        finally:
            m.waiters -= 1
        self.metrics.cold_start_seconds.observe(time.monotonic() - started)
        if m.state is not S.LOADED:
            if m.permanent:
                raise ModelUnavailable(m.name, m.reason or "does not fit", retry_after=None)
            retry = m.retry_hint if m.state is S.CACHED and m.retry_hint else self._retry_after(m)
            raise ModelUnavailable(m.name, m.reason or f"not loaded ({m.state.value})", retry_after=retry)

    async def _lazy_load(self, m: Model) -> None:
        async with m.lock:
            if m.removed or m.state is S.LOADED:
                return
            if not await self._pull(m):
                return
            await self._load(m, lazy=True)

    def _retry_after(self, m: Model) -> float:
        if m.retry_at:
            return max(1.0, round(m.retry_at - time.monotonic(), 1))
        return 1.0

    # ------------------------------------------------------------------ converge
    def _schedule(self, m: Model) -> None:
        if self._closing:
            return
        task = asyncio.create_task(self._converge(m), name=f"converge:{m.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _converge(self, m: Model) -> None:
        """Bring one model to what its spec asks. Idempotent; runs under the model's lock."""
        try:
            async with m.lock:
                if m.removed:
                    await self._remove(m)
                    return
                if not await self._pull(m):
                    return
                served_now = m.served == (m.entry.key, m.spec.fingerprint()) if m.entry else False
                if m.state is S.LOADED and served_now:
                    return
                if m.name in self._adoptable and await self._adopt(m):
                    return
                if m.wants_loaded() or m.state is S.LOADED:
                    await self._load(m, lazy=False)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug must not kill the agent: fail this model, keep the rest
            log.exception("converge crashed", extra=kv(model=m.name))
            self._fail(m, f"internal error: {type(e).__name__}: {e}")

    async def _pull(self, m: Model) -> bool:
        """Make the spec's files available (a cache hit moves nothing). False on failure.

        A loaded model being updated stays LOADED while its new copy is pulled: the old copy
        serves until the new one is loaded in its place."""
        fingerprint = m.spec.fingerprint()
        recheck, m.recheck = m.recheck and m.entry is not None and m.entry_fp == fingerprint, False
        if m.entry is not None and m.entry_fp == fingerprint and not recheck:
            return True
        # a loaded model being updated, and any model whose source is only re-checked, keeps
        # its state: what it has stays usable while the source is listed (and maybe pulled)
        serving = m.state is S.LOADED or recheck
        old_key = m.entry.key if m.entry else None
        if not serving:
            self._set(m, S.PULLING)
        started = time.monotonic()
        options = self.settings.pull_options(m.spec)
        if recheck:  # a background check must not hold a pull slot through minutes of retries
            options.retry_deadline_s = min(options.retry_deadline_s, 5.0)
        try:
            async with self._pull_sem:
                # lease=True: leased under the key's lock, so no GC (any pod) removes it first
                entry = await asyncio.to_thread(self.cache.ensure, m.spec.uri, options, None, lease=True)
        except PullError as e:
            self.metrics.pulls.labels(result="error").inc()
            if recheck:  # the source is unreachable now: the cached copy is as good as before
                log.warning("source check failed; cached copy kept", extra=kv(model=m.name, reason=str(e)))
                return True
            if serving:
                m.reason = f"update failed, previous copy still serving: pull: {e}"
                m.failures += 1
                m.retry_at = time.monotonic() + self._backoff(m)
                log.warning("update pull failed; previous copy still serving", extra=kv(model=m.name, reason=str(e)))
            else:
                self._fail(m, f"pull: {e}")
            return False
        m.pull_seconds = round(time.monotonic() - started, 4)
        self.metrics.pull_seconds.observe(m.pull_seconds)
        self.metrics.pulls.labels(result="hit" if entry.hit else "downloaded").inc()
        if old_key and old_key != entry.key:
            await asyncio.to_thread(self.cache.release, old_key, self.settings.holder)
        m.entry, m.entry_fp = entry, fingerprint
        if not serving:
            self._set(m, S.CACHED)
        log.info("model files ready", extra=kv(model=m.name, key=entry.key, hit=entry.hit, bytes=entry.size, seconds=m.pull_seconds))
        return True

    async def _adopt(self, m: Model) -> bool:
        """Restart recovery: the server already serves this model from this very entry."""
        self._adoptable.pop(m.name, None)
        assert m.entry is not None
        served_path = self.adapter.served_path(m.name)
        if served_path is None or served_path.resolve() != m.entry.path.resolve():
            return False
        cost = self.memory.cost_for(key=m.entry.key, runtime=m.spec.runtime, entry_bytes=m.entry.size,
                                    declared_host=m.spec.memory, declared_gpu=m.spec.gpu_memory)
        self.memory.reserve(m.name, cost)
        self._set(m, S.LOADING)
        self._set(m, S.LOADED, reason=None)
        m.served = (m.entry.key, m.spec.fingerprint())
        m.loaded_at = m.last_used = time.monotonic()
        log.info("model adopted from the running server (no reload)", extra=kv(model=m.name, key=m.entry.key))
        return True

    async def _load(self, m: Model, *, lazy: bool) -> None:
        """Load (or replace in place) the model's current entry. Caller holds m.lock."""
        assert m.entry is not None
        replacing = m.state is S.LOADED
        cost = self.memory.cost_for(key=m.entry.key, runtime=m.spec.runtime, entry_bytes=m.entry.size,
                                    declared_host=m.spec.memory, declared_gpu=m.spec.gpu_memory)
        # the new copy is reserved beside the old one while both exist
        slot = f"{m.name}#new" if replacing else m.name
        try:
            await self._make_room(slot, cost, lazy=lazy)
        except DoesNotFit as e:
            if not replacing:
                self._nofit(m, e)
                return
            log.warning("not enough memory to load the new copy beside the old one; swapping", extra=kv(model=m.name))
            await self._unload(m, reason="replaced")
            replacing, slot = False, m.name
            try:
                await self._make_room(slot, cost, lazy=lazy)
            except DoesNotFit as e2:
                self._nofit(m, e2)
                return
        if replacing:
            m.updating = True  # stays LOADED: the old copy serves until the new one replaces it
        else:
            self._set(m, S.LOADING)
        served = ServedModel(
            name=m.name,
            path=m.entry.path,
            runtime=m.spec.runtime,
            implementation=m.spec.implementation,
            version=m.spec.version,
            parameters=dict(m.spec.parameters),
        )
        started = time.monotonic()
        async with self._load_sem:
            measure = not replacing and self.memory.needs_measure(m.entry.key, m.spec.runtime)
            window = self.memory.start_measure(m.name, m.spec.runtime) if measure else None
            try:
                await self.adapter.load(served)
            except RuntimeErrorBase as e:
                m.updating = False
                if window is not None:
                    self.memory.abort_measure(window)
                self.memory.release(slot)
                self.metrics.loads.labels(result="error").inc()
                if replacing:
                    # the adapters replace in place: the old copy still serves; keep it
                    m.reason = f"update failed, previous copy still serving: {e.reason}"
                    m.failures += 1
                    m.retry_at = time.monotonic() + self._backoff(m)
                    return
                self._fail(m, f"load: {e.reason}")
                return
            if window is not None:
                await asyncio.to_thread(self.memory.finish_measure, window, key=m.entry.key)
        m.load_seconds = round(time.monotonic() - started, 4)
        self.metrics.load_seconds.observe(m.load_seconds)
        self.metrics.loads.labels(result="ok").inc()
        m.updating = False
        if replacing:  # the old copy is gone: its reservation passes to the new one
            self.metrics.unloads.labels(reason="replaced").inc()
            self.memory.reserve(m.name, self.memory.release(slot) or cost)
        m.served = (m.entry.key, m.spec.fingerprint())
        m.loaded_at = m.last_used = time.monotonic()
        m.loads += 1
        m.failures, m.retry_at, m.permanent = 0, None, False
        self._set(m, S.LOADED, reason=None)
        log.info("model loaded", extra=kv(model=m.name, seconds=m.load_seconds, lazy=lazy, replaced=replacing, key=m.entry.key))

    def _nofit(self, m: Model, e: DoesNotFit) -> None:
        self.metrics.loads.labels(result="nofit").inc()
        m.permanent = e.permanent
        m.retry_hint = e.retry_after_s
        if m.state is not S.CACHED:
            self._set(m, S.CACHED)
        m.reason = str(e)
        log.warning("model does not fit in memory; it stays cached", extra=kv(model=m.name, reason=str(e)))

    async def _make_room(self, slot: str, cost: Any, *, lazy: bool) -> None:
        """Reserve `cost` under `slot`, evicting LRU models (not pinned, no lease, old enough for
        lazy loads) first. Raises DoesNotFit with nothing reserved.

        `memory.admit` plans, reserves and marks the victims as unloading in one atomic step,
        so concurrent loads never pick the same victim nor count the same free bytes: no
        agent-wide lock is held while victims unload, and several misses proceed together."""
        for _ in range(8):
            candidates = [
                Candidate(o.name, o.last_used, o.loaded_at, o.spec.pinned, o.inflight)
                for o in self.models.values()
                if o.state is S.LOADED and not o.lock.locked()
            ]
            victims = self.memory.admit(slot, cost, candidates, lazy=lazy)
            if not victims:
                return
            evicted = await asyncio.gather(*(self._evict(self.models[v]) for v in victims))
            kept = [v for v, ok in zip(victims, evicted) if not ok]
            if not kept:
                return
            # a request leased a victim meanwhile: it stays; give back and plan again
            for name in kept:
                self.memory.reserve(name, self.memory.reservations()[name])
            self.memory.release(slot)
        raise DoesNotFit(slot, cost.devices(), self.memory.budget(),
                         f"model {slot!r}: the models that could make room stay busy", retry_after_s=1.0)

    async def _evict(self, v: Model) -> bool:
        """Unload `v` to make room, unless a request holds it. Never waits for v's lock."""
        if v.lock.locked():
            return False
        async with v.lock:  # free lock: acquired without yielding, so the check below is current
            if v.inflight > 0 or v.state is not S.LOADED:
                return False  # a request took a lease: never unload under it
            await self._unload(v, reason="evicted")
            self.metrics.evictions.inc()
            return True

    async def _unload(self, m: Model, *, reason: str) -> None:
        self._set(m, S.UNLOADING)
        self.memory.begin_unload(m.name)
        started = time.monotonic()
        try:
            await self.adapter.unload(m.name)
        except RuntimeErrorBase as e:
            self.memory.release(m.name)
            m.served = None
            self._fail(m, f"unload: {e.reason}")
            return
        self.metrics.unload_seconds.observe(time.monotonic() - started)
        self.metrics.unloads.labels(reason=reason).inc()
        self.memory.release(m.name)
        m.served = None
        m.loaded_at = 0.0
        self._set(m, S.CACHED, reason=None)
        log.info("model unloaded", extra=kv(model=m.name, reason=reason, seconds=round(time.monotonic() - started, 4)))

    async def _remove(self, m: Model) -> None:
        """Removed from config: unload, then release the cache lease (the entry stays)."""
        if m.name in self._adoptable:  # served by the server before we started, never adopted
            self._adoptable.pop(m.name, None)
            try:
                await self.adapter.unload(m.name)
            except RuntimeErrorBase as e:
                log.warning("could not unload removed model", extra=kv(model=m.name, reason=e.reason))
        if m.state is S.LOADED or m.served is not None:
            await self._unload(m, reason="removed")
        if m.entry is not None:
            await asyncio.to_thread(self.cache.release, m.entry.key, self.settings.holder)
        if m.removed and self.models.get(m.name) is m:
            del self.models[m.name]
        log.info("model removed", extra=kv(model=m.name))

    def _schedule_orphan_cleanup(self, desired: set[str]) -> None:
        """After the first config: unload what the server serves but nobody configured."""
        orphans = [n for n in self._adoptable if n not in desired and self._mine(n)]

        async def _cleanup() -> None:
            for name in orphans:
                self._adoptable.pop(name, None)
                try:
                    await self.adapter.unload(name)
                    log.info("unloaded a model the config no longer names", extra=kv(model=name))
                except RuntimeErrorBase as e:
                    log.warning("could not unload orphan", extra=kv(model=name, reason=e.reason))

        if orphans:
            task = asyncio.create_task(_cleanup(), name="orphans")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ server restarts
    async def server_restarted(self) -> None:
        """The server came back empty: what it served must be loaded again."""
        self.metrics.server_restarts.inc()
        self.memory.reset_server()
        lost = [m for m in self.models.values() if m.state is S.LOADED]
        log.warning("server restarted; reloading what it served", extra=kv(models=len(lost)))
        for m in lost:
            self._reload_lost(m, "server restarted")

    def _reload_lost(self, m: Model, reason: str) -> None:
        """The server no longer serves `m` though we loaded it: account for that, load it again."""
        self.memory.release(m.name)
        m.served = None
        self._set(m, S.CACHED, reason=reason)
        self._schedule_reload(m)

    def _schedule_reload(self, m: Model) -> None:
        async def _reload() -> None:
            async with m.lock:
                if not m.removed and m.state is S.CACHED:
                    await self._load(m, lazy=False)

        task = asyncio.create_task(_reload(), name=f"reload:{m.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resync_server(self) -> None:
        """Compare our LOADED set with the server's index (sidecar restarts we did not see)."""
        try:
            index = await self.adapter.index()
        except RuntimeErrorBase:
            return
        missing = [m for m in self.models.values() if m.state is S.LOADED and index.get(m.name, "").upper() != "READY"]
        if missing:
            log.warning("server lost models; reloading", extra=kv(models=",".join(m.name for m in missing)))
            for m in missing:
                self._reload_lost(m, "server lost it")

    # ------------------------------------------------------------------ failures
    def _backoff(self, m: Model) -> float:
        base = min(300.0, 1.0 * 2 ** min(m.failures, 9))
        return base * random.uniform(0.5, 1.5)

    def _fail(self, m: Model, reason: str, server_down: bool = False) -> None:
        m.failures += 1
        m.retry_at = time.monotonic() + self._backoff(m)
        if m.state is not S.FAILED:
            self._set(m, S.FAILED, reason=reason)
        m.reason = reason
        log.warning("model failed", extra=kv(model=m.name, reason=reason, failures=m.failures, retry_in=round(m.retry_at - time.monotonic(), 1)))

    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for m in list(self.models.values()):
                if m.state is S.FAILED and not m.permanent and m.retry_at and m.retry_at <= now and not m.lock.locked():
                    m.retry_at = None
                    if m.wants_loaded() or m.entry is None:
                        self._schedule(m)

    async def _source_loop(self) -> None:
        """Every resync interval, list each model's source again (metadata only): an object
        replaced under the same URI makes a new cache entry, which is then loaded in place of
        the old one. Unchanged sources are cache hits that move nothing."""
        while True:
            await asyncio.sleep(self.settings.resync_interval_s)
            self.refresh_sources()

    def refresh_sources(self) -> int:
        """Schedule a source check of every settled model; returns how many."""
        n = 0
        for m in list(self.models.values()):
            if not m.removed and m.entry is not None and m.state in (S.CACHED, S.LOADED) and not m.lock.locked():
                m.recheck = True
                self._schedule(m)
                n += 1
        return n

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
            log.debug("transition", extra=kv(model=m.name, old=old.value, new=new.value))

    def update_gauges(self) -> None:
        """Models per state, memory used and budget: refreshed when /metrics is scraped."""
        counts = {s: 0 for s in State}
        for m in self.models.values():
            counts[m.state] += 1
        for s, n in counts.items():
            self.metrics.models.labels(state=s.value).set(n)
        used = self.memory.used()
        for device, budget in self.memory.budget().items():
            self.metrics.memory_used.labels(device=device).set(used.get(device, 0))
            self.metrics.memory_budget.labels(device=device).set(budget)

    def status(self) -> dict[str, Any]:
        used = self.memory.used()
        return {
            "models": {name: m.status(self.memory) for name, m in sorted(self.models.items())},
            "config": {
                "file": self.config.file if self.config else None,
                "digest": self.config.digest if self.config else None,
                "rejected": [e.__dict__ for e in self.config_errors],
                "parse_error": self.config_parse_error,
            },
            "memory": {d: {"used": used.get(d, 0), "budget": b} for d, b in self.memory.budget().items()},
            "counts": {s.value: sum(1 for m in self.models.values() if m.state is s) for s in State},
        }

