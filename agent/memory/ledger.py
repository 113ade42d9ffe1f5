"""The ledger: budgets, reservations and costs for one node (``MemoryManager``)."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping


from .budget import discover_budget
from .cost import DEFAULT_IMPORTS, DEFAULT_MULTIPLIER, DEFAULT_MULTIPLIERS, HOST, Cost, combine, dev_index
from .measure import FirstLoad, ImportAttribution, Measurement, Snapshot, Split, gpu_delta
from .planner import Candidate, plan_eviction, plan_reclaim, shortfall
from .reality import CgroupMemory, ProcessTracker, RealityCheck
from .probes import GpuProbe, GpuUsage, open_gpu_probe, tree_rss
from .store import InMemoryStore, MetaStore

log = logging.getLogger("modelshelf.memory")


_RECORDS_KEPT = 100_000  # remembered measurement records (per key); more: start over
# how long the other loads into a server process wait for a runtime's first load there (its
# import: ~2.7 s for sklearn in MLServer on 2 loaded cores) before they go beside it anyway: a
# first load that hangs holds them back no longer (its import figure is then contaminated and
# charged provisionally, an over-charge, see ``_charge_first_load``)
IMPORT_WAIT_S = 5.0

class MemoryManager:
    """Budgets, reservations and costs for one node. Thread-safe; every method is cheap (a dict
    update) except ``start_measure``/``finish_measure`` (read /proc and NVML: ~1 ms per server
    process) and ``cost_for``/``finish_measure`` (one store read/write when a key is given)."""

    def __init__(self, budget: Mapping[str, int], *, store: MetaStore | None = None,
                 multipliers: Mapping[str, float] | None = None, gpu_probe: GpuProbe | None = None,
                 server_pid: Callable[[], int | None] | int | None = None, min_residency_s: float = 30.0,
                 floor_fraction: float = 0.5, min_model_bytes: int = 256 * 2**10, reuse_ratio: float = 0.5,
                 profile: str = "default", clock: Callable[[], float] = time.monotonic,
                 measure_wait_s: float = 1.0, reality_options: Mapping[str, Any] | None = None,
                 malloc_keep: int = 0, allocator_reserve: Callable[..., int | None] | None = None,
                 server_processes: int = 1, import_wait_s: float = IMPORT_WAIT_S):
        self._budget = {d: int(b) for d, b in budget.items()}
        # host bytes the server's allocator may keep resident after models are freed (the
        # embedded MLServer's --server-malloc-keep): a declared line, like a runtime import;
        # with several server processes, one per process that loaded a model (``keep_processes``)
        self.malloc_keep = max(0, int(malloc_keep))
        # what of that reserve the server holds now, as it reports it (RuntimeAdapter.allocator_reserve):
        # a load's measured growth is the server's RSS growth minus this figure's growth
        self._allocator_reserve = allocator_reserve
        self._store: MetaStore = store if store is not None else InMemoryStore()
        # key -> this profile's measured record (None: none), read from the store once per key:
        # a load asks for it twice on the event loop (its cost, whether to measure), and the
        # store is a file per entry (on a shared PVC, maybe over the network). Only this
        # manager's own measurements change it after the first read (`_save_record`).
        self._records: dict[str, dict | None] = {}
        self._multipliers = {**DEFAULT_MULTIPLIERS, **(multipliers or {})}
        self._gpu = gpu_probe
        self._server_pid = server_pid
        # --server-processes N: N server processes, each imports a runtime's libraries once it
        # loads a model of that runtime; the import is charged once per process that imported
        # it or may import it for a load admitted now (see ``overhead`` and ``charged_processes``)
        self.server_processes = max(1, int(server_processes))
        self.min_residency_s = float(min_residency_s)
        self.floor_fraction = float(floor_fraction)
        self.min_model_bytes = int(min_model_bytes)
        self.reuse_ratio = float(reuse_ratio)
        self.profile = profile
        self._clock = clock
        self._lock = threading.RLock()
        self._reserved: dict[str, Cost] = {}
        self._unloading: set[str] = set()
        self._admitted: set[str] = set()  # admitted, their load not finished (see ``settled``)
        self._windows: dict[int, Measurement] = {}
        # server pid (each of several) -> runtimes it has loaded once; a pid is here once a load
        # went to it (its allocator reserve is charged from then on: ``keep_processes``)
        self._warm: dict[int, set[str]] = {}
        self._overhead: dict[str, Cost] = {}  # "runtime:<name>" -> server-level bytes (imports, CUDA context)
        self._overhead_pid: int | None = None
        self._attr = ImportAttribution(self.min_model_bytes)
        self._baselines: dict[Any, int] = {}  # server pid (each of several) -> its tree RSS with no model loaded
        self._reality: RealityCheck | None = None
        self._note_baseline()  # the agent builds its ledger when the server has just started, bare
        self._window_closed = threading.Condition(self._lock)
        self.reality_options = dict(reality_options or {})  # RealityCheck keywords (tolerance, pressure, source)
        self.measure_wait_s = float(measure_wait_s)  # how long a window waits for the open one (see start_measure)
        self.import_wait_s = float(import_wait_s)  # ... for a runtime's first load in its process (see start_measure)
        self._process: dict[str, int] = {}  # model -> the server process its load went to (several processes)
        # model -> its runtime, for a load admitted whose server process is not known to have
        # imported that runtime: not placed yet (admission precedes placement, see ``admit``)
        # or placed on a process that has not loaded it; each may import it once more. One
        # server: a load admitted for a runtime the server has not loaded since it started, until
        # its window opens (its expected import is charged once, however many such loads)
        self._awaiting: dict[str, str] = {}
        # models whose load is admitted and whose server process is not known to have loaded a
        # model since it started (not placed yet, or placed on one that has not): each may be a
        # process's first load, from which on that process keeps its allocator reserve
        self._awaiting_keep: set[str] = set()

    @classmethod
    def from_settings(cls, settings: Any, *, store: MetaStore | None = None,
                      server_pid: Callable[[], int | None] | int | None = None, host_overhead: int = 0,
                      gpu_probe: GpuProbe | None | str = "nvml", **kwargs: Any) -> "MemoryManager":
        """Budgets discovered from ``settings.host_memory`` / ``gpu_memory`` (agent.settings),
        multipliers from ``settings.memory_multipliers``, residency from ``min_residency_s``,
        ``profile`` from ``settings.server``. ``gpu_probe="nvml"`` opens NVML (or logs once that
        GPU budgeting is off); pass a probe or None to choose."""
        cgroup_dir = getattr(settings, "memory_cgroup", None)
        if cgroup_dir is not None:
            CgroupMemory.at(cgroup_dir)  # a wrong --memory-cgroup is said at start, not at the first check
        probe = open_gpu_probe() if gpu_probe == "nvml" else gpu_probe
        budget = discover_budget(settings.host_memory, settings.gpu_memory, gpu_probe=probe, host_overhead=host_overhead)
        pid_file = getattr(settings, "server_pid_file", None)
        if pid_file is not None:  # a sidecar: the adapter has no process, the file names it
            server_pid = _pid_from_file(Path(pid_file), server_pid)
        kwargs.setdefault("reality_options", {"tolerance": getattr(settings, "memory_tolerance", 0.05),
                                              "pressure": getattr(settings, "memory_pressure", 0.90),
                                              "cgroup_dir": cgroup_dir})
        kwargs.setdefault("min_residency_s", settings.min_residency_s)
        kwargs.setdefault("profile", getattr(settings, "server", "default"))
        if getattr(settings, "server", None) == "mlserver" and not getattr(settings, "server_url", None):
            kwargs.setdefault("malloc_keep", getattr(settings, "server_malloc_keep", 0))  # only the embedded one keeps it
        kwargs.setdefault("server_processes", getattr(settings, "server_processes", 1))
        return cls(budget, store=store, multipliers=settings.memory_multipliers, gpu_probe=probe,
                   server_pid=server_pid, **kwargs)

    # -- facts for metrics and status ----------------------------------------------------------

    @property
    def gpu_enabled(self) -> bool:
        return any(d != HOST for d in self._budget)

    def budget(self) -> dict[str, int]:
        """Device -> budget bytes."""
        return dict(self._budget)

    def used(self) -> dict[str, int]:
        """Device -> reserved bytes: models loaded or loading plus the server's overhead (runtime
        imports, the allocator's ``malloc_keep``), every budgeted device. Models being unloaded are not counted (their bytes are promised to the
        model admitted in their place), so a swap never reads above the budget: ``held()`` counts
        them until their unload finished."""
        with self._lock:
            return self._sum(n for n in self._reserved if n not in self._unloading)

    def held(self) -> dict[str, int]:
        """Device -> bytes the server still holds by the ledger: ``used()`` plus models whose unload
        has not finished. Above the budget during a swap, by design."""
        with self._lock:
            return self._sum(self._reserved)

    def _sum(self, names: Iterable[str]) -> dict[str, int]:
        out = {d: 0 for d in self._budget}
        for cost in (self._reserved[n] for n in names):
            for d, b in cost.devices().items():
                out[d] = out.get(d, 0) + b
        for d, b in self._server_bytes().items():
            out[d] = out.get(d, 0) + b
        return out

    def _import_lines(self) -> dict[str, Cost]:
        """"runtime:<name>" -> one process's import of it: those learnt or expected
        (``_overhead``) and, for a runtime whose first load is admitted but has not opened its
        window yet, the figure expected for it (``_expected_import``)."""
        lines = dict(self._overhead)
        for runtime in set(self._awaiting.values()):
            key = f"runtime:{runtime}"
            if key not in lines:
                expected = self._expected_import(runtime)
                if expected is not None:
                    lines[key] = expected
        return lines

    def charged_processes(self, runtime: str) -> int:
        """How many server processes ``runtime``'s import is charged for. One server: 1 (its
        line exists from the admission of the server's first load of it on, see ``admit``). Several
        (--server-processes N): the processes that loaded it (``_warm``: a process that
        restarted is dropped from it, see ``_warm_still_up``), plus one per load admitted
        whose process is not known to hold it yet (``_awaiting``: each could go to a process
        that never imported it), at most N. Never fewer than hold it in reality: a tiny
        model's placement on a process that already has it is known only when its load
        starts, so until then its load counts as a possible import (conservative)."""
        with self._lock:
            return self._processes_charged([p for p, runtimes in self._warm.items() if runtime in runtimes],
                                           sum(1 for r in self._awaiting.values() if r == runtime))

    def keep_processes(self) -> int:
        """How many server processes the allocator reserve (``malloc_keep``) is charged for. One
        server: 1, always. Several (--server-processes N): each process that has loaded a model
        since it started (``_warm``: a process keeps freed heap only once a load or an unload
        freed some; one that restarted is dropped with its pid, as its imports are), plus one
        per load admitted whose process is not known to have loaded one (``_awaiting_keep``:
        it may be that process's first), at most N. Tiny models all go to the first process
        (shards.py ``is_quick``): the others, holding nothing, keep no reserve and are charged none."""
        with self._lock:
            return self._processes_charged(list(self._warm), len(self._awaiting_keep))

    def _processes_charged(self, holding: list[Any], awaiting: int) -> int:
        """What ``charged_processes`` and ``keep_processes`` count: one server, 1; several, the
        processes ``holding`` (pids from ``_warm``) plus ``awaiting`` loads whose process is not
        known yet, at most N (all N where a load went to processes not told apart)."""
        if self.server_processes == 1:
            return 1
        if any(isinstance(p, tuple) for p in holding):  # loaded into a process not told apart: any
            return self.server_processes
        return min(self.server_processes, len(holding) + awaiting)

    def keep_bytes(self) -> int:
        """Host bytes charged for the allocator reserve: ``malloc_keep`` x ``keep_processes``."""
        return self.malloc_keep * self.keep_processes()

    def _server_bytes(self) -> dict[str, int]:
        """Device -> the server's own bytes: each runtime's import once per process charged
        for it (``charged_processes``), and the allocator's kept bytes once per process charged
        for them (``keep_processes``: --server-processes N, each process keeps its own reserve
        once it has loaded a model)."""
        out: dict[str, int] = {}
        for key, cost in self._import_lines().items():
            n = self.charged_processes(key.split(":", 1)[1])
            for d, b in cost.devices().items():
                out[d] = out.get(d, 0) + b * n
        if self.malloc_keep:
            out[HOST] = out.get(HOST, 0) + self.keep_bytes()
        return out

    def free(self) -> dict[str, int]:
        """Device -> bytes available to a new model (budget - used). May be negative."""
        with self._lock:
            used = self.used()
            return {d: self._budget[d] - used.get(d, 0) for d in self._budget}

    def measuring(self) -> bool:
        """A measured load window is open (a new load would wait for it: call from a thread)."""
        with self._lock:
            return any(w.measured for w in self._windows.values())

    def settled(self) -> bool:
        """No load admitted and unfinished, no load window open, no unload in flight: what the
        ledger counts is what the server should hold (see ``RealityReport.settled``)."""
        with self._lock:
            return not self._windows and not self._unloading and not self._admitted

    def reservations(self) -> dict[str, Cost]:
        with self._lock:
            return dict(self._reserved)

    def overhead(self) -> dict[str, Cost]:
        """Server-level bytes no model owns and no eviction frees, learnt from the first load of
        each runtime in the current server process ("runtime:sklearn" -> the sklearn import,
        "runtime:pytorch" -> torch + the CUDA context): one process's figure. Counted in
        ``used()`` once per process charged for it (``charged_processes``: with N server
        processes, those that loaded the runtime plus the loads admitted that may import it
        in theirs, so a process that holds only other runtimes', or nothing, is not charged
        it); cleared when the server's pid changes or by ``reset_server()``."""
        with self._lock:
            return dict(self._overhead)

    def reset_server(self) -> None:
        """The server restarted: forget what its process had imported, except the imports whose
        size is known (split from a first load): the models that served are reloaded into the
        new process, which pays the same imports, so those stay charged from now on. Else the
        loads admitted before the first reload is measured would count the import as free, and
        a restart after an OOM kill would load more than fits. With several server processes
        (--server-processes N) a figure kept is charged per process that loads the runtime
        again (``charged_processes``): from each reload's admission on (``admit``). One of them
        restarted while others kept running: theirs stay charged; the restarted one's is
        dropped with its pid (``_warm_still_up``: its new process imported nothing) and charged
        again by the loads admitted that may go to it. One server: a figure kept is its line
        already, so the reloads admitted (``_awaiting``, the server holds no runtime now) add
        none; a runtime whose figure is not known is charged again from its first reload's
        admission on, as expected (``_expected_import``)."""
        pid = self._pid()
        with self._lock:
            if self._some_survive(pid):
                self._overhead_pid = pid
            else:
                self._overhead = self._expected_imports()
                self._overhead_pid = None
            self._warm = self._warm_still_up(pid)
            self._attr.server_restarted()
        self._note_baseline()  # called when the new process is up and before anything reloads

    def _some_survive(self, pid: Any) -> bool:
        """Several server processes (a tuple of pids), some of them seen loading before."""
        return isinstance(pid, tuple) and any(p in self._warm for p in pid)

    def _warm_still_up(self, pid: Any) -> dict[int, set[str]]:
        """Of several server processes (a tuple), the runtimes loaded by those still up: one
        that restarted has a new pid and imports again; a single server's are all gone."""
        return {p: w for p, w in self._warm.items() if isinstance(pid, tuple) and p in pid}

    def _expected_imports(self) -> dict[str, Cost]:
        """The runtime imports charged now whose size is known (see ``reset_server``)."""
        out = {}
        for k in self._overhead:
            known = self._attr.known.get(k.split(":", 1)[1])
            if known is not None:
                out[k] = Cost(known[0], dict(known[1]), "measured")
        return out

    def restart_reason(self, exit: dict | None) -> dict[str, Any]:
        """Why the server restarted ("oom_killed" when the cgroup's OOM-kill counter grew; see
        ``RealityCheck.restart_reason``). Reads the cgroup: call from a worker thread."""
        return self.reality.restart_reason(exit)

    def _note_baseline(self) -> None:
        """Remember the server's tree RSS now as its bare baseline (nothing loaded yet). With
        several server processes (the pid is a tuple, --server-processes N) each has its own:
        a process seen before keeps its baseline (it may hold models now: one of them
        restarted), a new one (bare: just started) is noted now; the server's is their sum."""
        try:
            pid = self._pid()
            if isinstance(pid, tuple):
                with self._lock:
                    known = dict(self._baselines)
                rss = {p: known[p] if p in known else tree_rss(p) for p in pid}
                if all(rss.values()):
                    with self._lock:
                        self._baselines = rss
                return
            rss = tree_rss(pid) if pid is not None else 0
        except Exception:  # an adapter not started yet: the first window will note it
            return
        if pid is not None and rss > 0:
            with self._lock:
                self._baselines = {pid: rss}

    def model_doc(self, name: str) -> dict[str, Any] | None:
        """``name``'s reservation for /status: reserved bytes, method, declared and measured
        figures side by side (a note when the measurement exceeds the declaration), unloading."""
        with self._lock:
            cost = self._reserved.get(name)
            if cost is None:
                return None
            return {**cost.doc(), "unloading": name in self._unloading}

    def ledger_doc(self) -> dict[str, Any]:
        """The ledger for /status: per device budget, used (reserved, what admission counts),
        held (used + models still unloading) and the server's overhead (imports + ``malloc_keep``);
        per runtime one process's import (``host``, ``gpu``), how many server processes it is
        charged for (``processes``: see ``charged_processes``) and whether it is split from its
        first model yet; the allocator's kept bytes (``malloc_keep``: ``host`` charged in all,
        ``per_process``, and ``processes`` charged, see ``keep_processes``; 0 where the server
        trims after each call)."""
        with self._lock:
            used, held = self.used(), self.held()
            over = self._server_bytes()
            devices = {d: {"budget": b, "used": used.get(d, 0), "held": held.get(d, 0), "overhead": over.get(d, 0)}
                       for d, b in self._budget.items()}
            runtimes = {r: {"host": c.host, "gpu": dict(c.gpu), "method": c.method,
                            "processes": self.charged_processes(r),
                            "provisional": r in self._attr.pending or c.method == "estimated"}
                        for k, c in self._import_lines().items() for r in [k.split(":", 1)[1]]}
            corrected = sorted(n for n, c in self._reserved.items() if c.under_declared)
            models = {n: {**c.doc(), "unloading": n in self._unloading} for n, c in sorted(self._reserved.items())}
            return {"devices": devices, "runtime_imports": runtimes, "malloc_keep": {"host": self.keep_bytes(), "per_process": self.malloc_keep,
                                                                                     "processes": self.keep_processes()},
                    "under_declared": corrected, "models": models}

    def server_baseline(self, pid: int | None) -> int | None:
        """The server process ``pid``'s tree RSS before its first model (None: not seen)."""
        with self._lock:
            if isinstance(pid, tuple):  # several server processes: the sum of theirs
                each = [self._baselines.get(p) for p in pid]
                return sum(each) if each and None not in each else self._baselines.get(pid)
            return self._baselines.get(pid) if pid is not None else None

    @property
    def reality(self) -> RealityCheck:
        """The reality check for this ledger (created on first use: tracked server pids, this
        manager's GPU probe, the container's cgroup when there is one)."""
        with self._lock:
            if self._reality is None:
                options = dict(self.reality_options)
                where = options.pop("cgroup_dir", None)
                self._reality = RealityCheck(self, tracker=ProcessTracker(self._server_pid), gpu_probe=self._gpu,
                                             cgroup=CgroupMemory.at(where) if where else CgroupMemory.discover(), **options)
            return self._reality

    def allocator_reserve(self, process: int | None = None) -> int | None:
        """The server's allocator reserve as it last reported it (freed host bytes it keeps
        resident, at most ``malloc_keep``); None when it reports none. ``process``: one of
        several server processes' own (None: all of them together). Reads a small file:
        call from a worker thread."""
        if self._allocator_reserve is None:
            return None
        try:
            return self._allocator_reserve() if process is None else self._allocator_reserve(process)
        except Exception as e:  # a figure missing must not fail a load or a check: treated as unknown
            log.warning("memory reserve_read_failed error=%r", f"{type(e).__name__}: {e}")
            return None

    def server_rss(self) -> int | None:
        """Current RSS of the server's process tree, or None when its pid is unknown."""
        pid = self._pid()
        return None if pid is None else tree_rss(pid)

    # -- cost -----------------------------------------------------------------------------------

    def multiplier(self, runtime: str, *, gpu: bool = False) -> float | None:
        """Host (or GPU) bytes per entry byte for ``runtime``; GPU: None when not configured."""
        if gpu:
            return self._multipliers.get(f"gpu:{runtime}")
        return self._multipliers.get(runtime, DEFAULT_MULTIPLIER)

    def cost_for(self, *, key: str | None, runtime: str, entry_bytes: int | None,
                 declared_host: int | None = None, declared_gpu: int | None = None,
                 gpu_device: str | None = None) -> Cost:
        """The cost to reserve for a model about to load (see the module doc for precedence).
        ``entry_bytes`` None: unknown size, the estimate is ``min_model_bytes``. ``gpu_device``:
        where a declared/estimated GPU amount is placed (default the first budgeted GPU)."""
        size = max(0, int(entry_bytes or 0))
        est_host = max(self.min_model_bytes, int(size * (self.multiplier(runtime) or DEFAULT_MULTIPLIER)))
        gm = self.multiplier(runtime, gpu=True)
        est_gpu = int(size * gm) if gm else 0
        gdev = gpu_device or self._default_gpu()
        # floors of a measurement: from the estimate only (declarations are applied on top)
        host_floor = max(self.min_model_bytes, int(self.floor_fraction * est_host))
        gpu_floor = int(self.floor_fraction * est_gpu)

        record = self._load_record(key)
        if record is not None:
            host, h_src = int(record.get("host", 0)), "measured"
            gpu = self._place_known(record.get("gpu") or {}, gdev)
            g_src = "measured"
        else:
            host, h_src = est_host, "estimated"
            gpu, g_src = ({gdev: est_gpu} if est_gpu and gdev else {}), "estimated"
        # declared replaces the estimate; against a measurement it is a floor
        if declared_host is not None and (h_src == "estimated" or declared_host >= host):
            host, h_src = int(declared_host), "declared"
        if declared_gpu is not None and (g_src == "estimated" or declared_gpu >= sum(gpu.values())):
            gpu = {gdev: int(declared_gpu)} if gdev else {}
            g_src = "declared"
        method = combine(h_src, g_src if gpu else None)
        measured_h = int(record.get("host", 0)) if record is not None else None
        measured_g = sum(self._place_known(record.get("gpu") or {}, gdev).values()) if record is not None else None
        return Cost(host, gpu, method, host_floor=host_floor, gpu_floor=gpu_floor,
                    declared_host=declared_host, declared_gpu=declared_gpu, entry_bytes=entry_bytes,
                    measured_host=measured_h, measured_gpu=measured_g)

    def _default_gpu(self) -> str | None:
        gpus = sorted((d for d in self._budget if d != HOST), key=dev_index)
        return gpus[0] if gpus else None

    def _place_known(self, gpu: Mapping[str, int], default: str | None) -> dict[str, int]:
        """A remembered per-device GPU record, with devices this node lacks folded into the
        default GPU (a shared cache may carry measurements from another node's layout)."""
        out: dict[str, int] = {}
        for d, b in gpu.items():
            d = d if d in self._budget else (default or d)
            if b > 0:
                out[d] = out.get(d, 0) + int(b)
        return out

    def _load_record(self, key: str | None) -> dict | None:
        if not key:
            return None
        with self._lock:
            if key in self._records:
                return self._records[key]
        try:
            meta = self._store.get_meta(key) or {}
        except Exception as e:  # a broken store must not stop a load: fall back to the estimate
            log.warning("memory store_read_failed key=%s error=%r", key, f"{type(e).__name__}: {e}")
            return None  # not remembered: read again next time
        rec = (meta.get("memory") or {}).get(self.profile)
        rec = rec if isinstance(rec, dict) and rec.get("method") == "measured" else None
        with self._lock:
            if len(self._records) >= _RECORDS_KEPT:
                self._records.clear()
            return self._records.setdefault(key, rec)  # a measurement saved meanwhile wins

    def _save_record(self, key: str, record: dict) -> None:
        try:
            meta = self._store.get_meta(key) or {}
            mem = dict(meta.get("memory") or {})
            mem[self.profile] = record
            meta = {**meta, "memory": mem}
            self._store.set_meta(key, meta)
            with self._lock:
                self._records[key] = record
        except Exception as e:
            log.warning("memory store_write_failed key=%s error=%r", key, f"{type(e).__name__}: {e}")

    # -- accounting -----------------------------------------------------------------------------

    def fits(self, cost: Cost, *, name: str | None = None) -> bool:
        """Whether ``cost`` fits in what is free now on every budgeted device (replacing
        ``name``'s own reservation when given)."""
        with self._lock:
            free = self._free_for(name)
        return all(b <= free.get(d, 0) for d, b in cost.devices().items() if d in self._budget and b > 0)

    def reserve(self, name: str, cost: Cost) -> None:
        """Record ``cost`` for ``name`` (replacing any previous one). Does not check the budget:
        use ``admit`` (or ``fits``/``plan_eviction`` first)."""
        with self._lock:  # bookkeeping only: no process memory moves, open windows stay clean
            self._reserved[name] = cost
            self._unloading.discard(name)

    def cancel_unload(self, name: str) -> None:
        """A victim marked by ``admit`` stays loaded after all (a request leased it): its bytes
        count as used again. Nothing happens when its reservation is gone meanwhile."""
        with self._lock:
            self._unloading.discard(name)

    def release(self, name: str) -> Cost | None:
        """Forget ``name``'s reservation (after its unload finished, or its load failed)."""
        with self._lock:
            self._unloading.discard(name)
            self._admitted.discard(name)
            self._awaiting.pop(name, None)
            self._awaiting_keep.discard(name)
            cost = self._reserved.pop(name, None)
            if cost is not None:
                self._touch_windows(name, "release")
            self._process.pop(name, None)
            return cost

    def begin_unload(self, name: str) -> None:
        """``name`` is being unloaded: its bytes count as free for admissions from now on, and
        measurements running meanwhile are not recorded. ``release`` ends it."""
        with self._lock:
            if name in self._reserved:
                self._unloading.add(name)
                self._touch_windows(name, "unload")

    def update(self, name: str, cost: Cost) -> dict[str, int]:
        """Replace ``name``'s reservation with a corrected (measured) cost. Returns device ->
        bytes over budget now (empty when within): the caller may evict to get back under."""
        with self._lock:
            if name in self._reserved:
                self._reserved[name] = cost
            return self.over_budget()

    def over_budget(self) -> dict[str, int]:
        """Device -> bytes reserved beyond budget, counting unloading models as gone."""
        return {d: -f for d, f in self.free().items() if f < 0}

    def plan_eviction(self, needed: Cost, candidates: Iterable[Candidate], *, model: str | None = None,
                      lazy: bool = False, now: float | None = None) -> list[str]:
        """Victims for ``needed`` given the current reservations (see ``plan_eviction`` above).
        ``lazy``: a load for a request, so ``min_residency_s`` applies. Candidates with no cost
        use their reservation; unloading or unreserved ones are ignored. Reads state only. When
        ``needed`` fits in the free room the candidates are not read (they may be a lazy iterable)."""
        with self._lock:
            free = self._free_for(model)
            if not shortfall(needed, free, self._budget):
                return []
            cands, loading = self._resolve_candidates(candidates, model)
            overhead = self._server_bytes()
            return plan_eviction(needed, cands, free=free, budget=self._budget, model=model,
                                 respect_residency=lazy, min_residency_s=self.min_residency_s,
                                 now=self._clock() if now is None else now, reserved_elsewhere=loading,
                                 overhead=overhead)

    def admit(self, name: str, cost: Cost, candidates: Iterable[Candidate], *, lazy: bool = False,
              now: float | None = None, runtime: str | None = None, server_pid: int | None = None) -> list[str]:
        """Plan, reserve ``cost`` for ``name`` and mark the victims as unloading, atomically.
        Returns the victims: unload each, then ``release`` it. Raises DoesNotFit (nothing
        reserved then).

        ``runtime`` (several server processes, --server-processes N): the load may be its
        process's first of that runtime, so that import is planned and charged from now on
        (the figure known or expected, see ``_expected_import``) unless its process is known to
        hold it (``server_pid``: the process the load will go to, where that is known before
        it is placed: the one the name is placed on already, or the first for a quick model,
        see ``ShardedAdapter.admission_pid``). Admission precedes placement: the reconciler places a load with
        ``server_pid_for(..., place=True)`` only once it has its load slot, right before its
        window opens (which tells the process: ``start_measure``), so a load admitted with no
        ``server_pid`` is charged one more import until then wherever some process has not
        loaded its runtime (conservative: it may go to that one; ``charged_processes``).

        With one server likewise: a load of a runtime the server has not loaded since it started
        (``_has_runtime``: the server the last window saw) counts the expected import from its
        admission, once per runtime however many such loads are admitted together (the preloads
        at start-up), until its window opens (``start_measure`` charges it then, and its
        measurement replaces the figure): a first load that fits alone but not beside the
        import is refused or evicts for it, rather than found over the budget once loaded. A
        runtime with no figure expected yet (``_expected_import``: None) is learnt by its load,
        and a ledger told no server pid charges no import at all (nothing measures it)."""
        with self._lock:
            if runtime is not None and self._may_import(runtime, server_pid):
                self._awaiting[name] = runtime
            if self.server_processes > 1 and server_pid not in self._warm:
                self._awaiting_keep.add(name)
            try:
                victims = self.plan_eviction(cost, candidates, model=name, lazy=lazy, now=now)
            except BaseException:
                if name not in self._reserved:
                    self._awaiting.pop(name, None)
                    self._awaiting_keep.discard(name)
                raise
            for v in victims:
                self.begin_unload(v)
            self.reserve(name, cost)
            self._admitted.add(name)
            return victims

    def _may_import(self, runtime: str, server_pid: int | None) -> bool:
        """Whether a load of ``runtime`` admitted now may be its server process's first of it
        (see ``admit``). Several processes: unless placed on one that holds it (``_holds``).
        One server: unless the server holds it (``_has_runtime``; reads no pid: admission runs
        on the event loop), and only where a server pid is told (``imports``)."""
        if self.server_processes > 1:
            return not self._holds(runtime, server_pid)
        return self.imports(runtime)

    def _holds(self, runtime: str, server_pid: int | None) -> bool:
        """Whether a load of ``runtime`` into ``server_pid`` goes to a process that has loaded
        it (None: not placed yet, not known: False)."""
        return server_pid is not None and self._has_runtime(runtime, server_pid)

    def headroom(self, models: float, max_fraction: float) -> dict[str, int]:
        """Device -> bytes to keep free ahead of need: room for ``models`` loads of the median
        reservation on that device among the models reserved now, but never more than
        ``max_fraction`` of its budget (then as many whole loads as fit in that share; none on
        a device where not even one does: a node that holds few models would give up too large
        a share of its hits). Empty when nothing is reserved."""
        with self._lock:
            out: dict[str, int] = {}
            for d, budget in self._budget.items():
                sizes = sorted(b for n, c in self._reserved.items() if n not in self._unloading
                               for b in [c.devices().get(d, 0)] if b > 0)
                if not sizes or models <= 0:
                    continue
                median = sizes[len(sizes) // 2]
                want = min(models, max_fraction * budget // median) * median
                if want > 0:
                    out[d] = int(want)
            return out

    def reclaim(self, target: Mapping[str, int], candidates: Iterable[Candidate], *, now: float | None = None) -> list[str]:
        """Victims to unload so that ``target`` bytes are free per device (``plan_reclaim``:
        ``eviction_order``, no lease, not pinned, past ``min_residency_s``; best effort). Marks nothing: each
        victim's bytes count as free only once its unload commits (``begin_unload``), so no
        admission counts bytes a request may still keep by leasing the victim first."""
        with self._lock:
            free = self.free()
            short = {d: t - free.get(d, 0) for d, t in target.items() if t > free.get(d, 0)}
            if not short:
                return []
            cands, _ = self._resolve_candidates(candidates, None)
            return plan_reclaim(short, cands, min_residency_s=self.min_residency_s,
                                now=self._clock() if now is None else now)

    def _free_for(self, name: str | None) -> dict[str, int]:
        free = self.free()
        own = self._reserved.get(name) if name is not None else None
        if own is not None and name not in self._unloading:
            for d, b in own.devices().items():
                if d in free:
                    free[d] += b
        return free

    def _resolve_candidates(self, candidates: Iterable[Candidate], model: str | None) -> tuple[list[Candidate], dict[str, int]]:
        out: list[Candidate] = []
        seen: set[str] = set()
        for c in candidates:
            if c.name == model or c.name in self._unloading or c.name in seen:
                continue
            cost = c.cost if c.cost is not None else self._reserved.get(c.name)
            if cost is None:
                continue
            seen.add(c.name)
            out.append(c if c.cost is not None else replace(c, cost=cost))
        loading: dict[str, int] = {}
        for n, cost in self._reserved.items():
            if n not in seen and n != model and n not in self._unloading:
                for d, b in cost.devices().items():
                    loading[d] = loading.get(d, 0) + b
        return out, loading

    # -- measurement ----------------------------------------------------------------------------

    def imports(self, runtime: str | None, *, server_pid: int | None = None) -> bool:
        """Whether a load of ``runtime`` into the server process ``server_pid`` (None: the server)
        would be that process's first of it, its import (``start_measure`` then marks its window
        ``first_of_runtime``). False when nothing tells the server's pid (nothing is measured).
        Asked on the event loop, it reads no pid (a sidecar's is a file, --server-pid-file): the
        server is the one the last window saw (``_has_runtime``)."""
        return runtime is not None and self._server_pid is not None and not self._has_runtime(runtime, server_pid)

    def needs_measure(self, key: str | None, runtime: str | None, *, server_pid: int | None = None) -> bool:
        """Whether a load of entry `key` should be measured: no measurement is remembered for
        it yet, or the server process has not loaded this runtime yet (its import must be
        charged). A remembered entry is not measured again: snapshotting the server's process
        tree twice costs a few ms on every cold start. Asked on the event loop: reads no pid
        (see ``imports``)."""
        return not self._has_runtime(runtime, server_pid) or self._load_record(key) is None

    def _has_runtime(self, runtime: str | None, server_pid: int | None) -> bool:
        """Whether server process ``server_pid`` (None: the server) has loaded ``runtime`` once.
        Reads no pid: the server is the one the last load window saw (``_overhead_pid``: None
        before the first, and after a restart until the next, as ``reset_server`` forgets it,
        so the first load after a restart is measured and known as the import)."""
        with self._lock:
            key = server_pid or self._overhead_pid
            return key is not None and runtime in self._warm.get(key, set())

    def start_measure(self, name: str, runtime: str | None = None, *, measure: bool = True,
                      server_pid: int | None = None) -> Measurement:
        """Open ``name``'s load window right before the server's load call (after its victims
        are unloaded and released); ``finish_measure`` (or ``abort_measure``) closes it. EVERY
        load opens one: ``measure=False`` for a load whose cost is remembered (or an update in
        place), which takes no snapshot but still grows the server, so it must not land in
        another model's measurement. ``runtime``: lets the first load of each runtime in a
        server process be told apart (see ``overhead``); ``server_pid``: the process the load
        goes to when there are several (--server-processes N), each importing on its own.

        Per process: with several server processes a window snapshots only the process its
        load goes to (``server_pid``), and only windows, loads and unloads in that same process
        spoil it or make it wait: the processes load side by side, and a load or an unload in
        one never moves another's RSS. (A window with no ``server_pid`` shares every process.)

        Windows are serialized per process: called from a worker thread (``asyncio.to_thread``),
        a measured window waits for every open window to close, and an unmeasured load waits
        for the open measured windows, but never past ``measure_wait_s`` (1 s) after the oldest
        of them opened, so loads started together (the preloads at start-up) are measured one
        after another when they are quick, and a load never waits long behind one that is slow
        or hangs (their windows then overlap: the measured ones are marked contaminated and not
        recorded; the entry is measured on its next load). Except behind a runtime's first load
        in a process (its import, seconds long): every other load into that process waits for
        it to end, up to ``import_wait_s`` (IMPORT_WAIT_S, 5 s) after it opened, because no later
        load would see that import again: a load beside it would be charged to the import for
        good (benchmarks/results/peers.notes.md, 2026-12-03). Waiting costs such a load little: the process it goes to is busy
        importing, and its own load would wait for the same import. Called on an event loop's
        thread it never blocks.

        Snapshots are taken only when they can be kept: never for ``measure=False``, nor for a
        window already contaminated when it opens (unless it is the runtime's first load,
        whose import must be charged anyway); they read the TRACKED server pids
        (``ProcessTracker``: ``/proc/<pid>/statm``), never a scan of every process."""
        with self._lock:
            if self._windows and self.measure_wait_s > 0 and not _on_event_loop():
                self._wait_for_windows(measure, server_pid)
            m = Measurement(name, Snapshot(None, None, {}), self._clock(), runtime=runtime, measured=measure,
                            process=server_pid)
            if server_pid is not None:
                self._process[name] = server_pid
            self._mark_overlaps(m)
            self._windows[id(m)] = m  # registered before the snapshot: the next window waits for it
            if not measure:
                if server_pid is not None:  # a load went to it: it keeps its reserve from now on
                    warm = self._warm.setdefault(server_pid, set())
                    if runtime is not None:
                        # an unmeasured load may import its runtime in its process (a request's load
                        # beside another): that process has it now, and no later load of it is
                        # mistaken for the import (it would read ~0); the figure stays the one an
                        # earlier process measured, charged once per process (or the estimate)
                        warm.add(runtime)
                        self._expect_import(runtime)
                self._placed(name, runtime, server_pid)
                return m
            # whether it imports its runtime is known from the moment it is registered (under the
            # same hold of the lock): a load that begins waiting now must see it as an import's
            # window, not as a plain one it would stop waiting for after measure_wait_s
            pid = self._pid()
            # the bare server (nothing reserved but this model, no import charged): its RSS now
            # is the baseline reality is measured over
            bare = not [n for n in self._reserved if n != name] and (not self._overhead or self._overhead_pid != pid)
            if pid is not None:
                if self._overhead_pid != pid:  # a new server process: old imports are gone
                    self._new_server_process(pid)
                warm = self._warm.setdefault(server_pid or pid, set())
                if runtime is not None and runtime not in warm:
                    m.first_of_runtime = True
                    warm.add(runtime)
                    self._expect_import(runtime)
            self._placed(name, runtime, server_pid)
            if m.contaminated and not m.first_of_runtime:
                return m  # its delta will not be recorded: no snapshot
        snap = self._snapshot(refresh=False, process=m.process)
        with self._lock:
            m.before = snap
            if isinstance(snap.pid, tuple):  # several server processes: a baseline each
                if bare and snap.host is not None and not all(p in self._baselines for p in snap.pid):
                    self._baselines = {p: tree_rss(p) for p in snap.pid}
            elif snap.pid is not None and snap.host is not None and bare and snap.pid not in self._baselines:
                self._baselines = {snap.pid: snap.host}  # the bare server, right before its first model
            return m

    def _placed(self, name: str, runtime: str | None, server_pid: int | None) -> None:
        """``name``'s load opens its window: its process is known now, and holds its runtime
        (``_warm``: loaded before, or importing it in this load, charged as that process's)
        and its allocator reserve (charged as that process's from this load on). Its
        admission's possible import (``_awaiting``) and reserve (``_awaiting_keep``) end here.
        One server: always (its window charges the import where it is the server's first load
        of it, ``_expect_import``, and a window that tells no server pid measures none)."""
        if self.server_processes == 1 or (runtime is not None and self._awaiting.get(name) == runtime
                                          and self._has_runtime(runtime, server_pid)):
            self._awaiting.pop(name, None)
        if (server_pid or self._overhead_pid) in self._warm:
            self._awaiting_keep.discard(name)

    def _expect_import(self, runtime: str) -> None:
        """The server starts importing ``runtime`` now (its first load in this process): charge
        the import from now on, as known from an earlier process, else as ``DEFAULT_IMPORTS``
        says, so the ledger does not read ~80 MiB low while the import runs. The load's
        measurement replaces the figure when it ends."""
        key = f"runtime:{runtime}"
        if key in self._overhead:
            return
        expected = self._expected_import(runtime)
        if expected is not None:
            self._overhead[key] = expected

    def _expected_import(self, runtime: str) -> Cost | None:
        """One process's import of ``runtime`` as expected before a load there measures it:
        known from an earlier process, else ``DEFAULT_IMPORTS``; None: learnt only by a load."""
        known = self._attr.known.get(runtime)
        if known is not None:
            return Cost(known[0], dict(known[1]), "measured")
        if DEFAULT_IMPORTS.get(self.profile, {}).get(runtime):
            return Cost(DEFAULT_IMPORTS[self.profile][runtime], {}, "estimated")
        return None

    def _new_server_process(self, pid: Any) -> None:
        if not self._some_survive(pid):  # else only one of several restarted (see reset_server)
            self._overhead = self._expected_imports()
        self._warm = self._warm_still_up(pid)
        self._attr.server_restarted()
        self._overhead_pid = pid

    def _wait_for_windows(self, measure: bool, process: int | None) -> None:
        """Wait (holding nothing: the condition releases the lock) until the windows that would
        spoil a new one into ``process``, or that it would spoil, are closed: at most
        ``measure_wait_s`` after the oldest opened, or ``import_wait_s`` after a runtime's first
        load in that process opened (see ``start_measure``)."""
        while True:
            blocking = [w for w in self._windows.values()
                        if _shares_process(w.process, process) and (measure or w.measured)]
            if not blocking:
                return
            deadline = min(w.started for w in blocking) + self.measure_wait_s
            imports = [w.started + self.import_wait_s for w in blocking if w.first_of_runtime]
            deadline = max([deadline, *imports])
            now = self._clock()
            if now >= deadline or not self._window_closed.wait(timeout=deadline - now):
                return  # (timed out: a clock that stands still in a test ends the wait too)

    def _mark_overlaps(self, m: Measurement) -> None:
        """``m`` opens while other loads are in flight in its process: the measured windows
        among them all (``m`` included) hold bytes of more than one model; so does ``m`` when
        a model of its process is unloading."""
        others = [o for o in self._windows.values() if _shares_process(o.process, m.process)]
        if (m.measured and others) or any(o.measured for o in others):
            for w in [m, *others]:
                if w.measured:
                    w.contaminated = True
                    w.reasons.add("concurrent_load" if all(o.measured for o in [m, *others]) else "unmeasured_load")
        if m.measured and any(_shares_process(self._process.get(n), m.process) for n in self._unloading):
            m.contaminated = True
            m.reasons.add("unload")

    def _close(self, m: Measurement) -> None:
        self._windows.pop(id(m), None)
        self._admitted.discard(m.name)
        self._window_closed.notify_all()

    def abort_measure(self, m: Measurement) -> None:
        """Close a window without recording (the load failed)."""
        with self._lock:
            self._close(m)

    def finish_measure(self, m: Measurement, *, key: str | None = None) -> Cost:
        """Snapshot after the load, turn the delta into the model's cost (floors, reuse rule),
        update its reservation, remember it under ``key`` and return it. Returns the reserved
        cost unchanged when nothing could be measured (no server pid, server restarted) or the
        window was shared with another load/unload; a zero cost when the model's reservation
        was released meanwhile (nothing is recorded then).

        The first load of a runtime in a server process also grows by the runtime's import:
        when the import's size is known (split earlier, see ``ImportAttribution``) it is charged
        to the server and the rest measured as the model; else the model keeps its reservation,
        the rest is charged to the server provisionally, and both are corrected as soon as a
        later load of that runtime (or this model's entry reloaded) tells the model's share."""
        keep = m.measured and m.before.host is not None and (m.first_of_runtime or not m.contaminated)
        after = self._snapshot(refresh=True, process=m.process) if keep else None  # the load may have started workers
        with self._lock:
            self._close(m)
            reserved = self._reserved.get(m.name)
            if not keep and self._reality is not None:
                self._reality.tracker.refresh()
        if m.measured and m.contaminated and not m.first_of_runtime:
            log.info("memory measure_skipped model=%s reason=%s", m.name, ",".join(sorted(m.reasons)))
        if reserved is None:
            return Cost(0, {}, "estimated")
        if after is None or m.before.host is None or after.host is None or m.before.pid != after.pid:
            return reserved  # not measured, nothing to measure, or the server restarted in between
        raw_host = after.host - m.before.host
        if m.before.reserve is not None and after.reserve is not None and after.reserve != m.before.reserve:
            # the allocator's reserve grew by the load's freed buffers it kept, or shrank by the
            # kept pages the load reused: neither is the model's
            log.info("memory reserve_moved model=%s rss_growth=%d reserve_before=%d reserve_after=%d",
                     m.name, raw_host, m.before.reserve, after.reserve)
            raw_host -= after.reserve - m.before.reserve
        raw_gpu = gpu_delta(m.before.gpu, after.gpu)
        if m.first_of_runtime:
            with self._lock:
                known = self._attr.known.get(m.runtime or "")
                if known is None or m.contaminated:
                    return self._charge_first_load(m, reserved, raw_host, raw_gpu, key, after.pid)
                imp_h = min(max(0, raw_host), known[0])
                imp_g = {d: min(max(0, raw_gpu.get(d, 0)), b) for d, b in known[1].items() if raw_gpu.get(d, 0) > 0}
                if self._overhead_pid == after.pid:
                    self._charge_import(m.runtime, Cost(imp_h, imp_g, "measured"))
            log.info("memory runtime_import runtime=%s model=%s raw_host=%d import_host=%d source=known",
                     m.runtime, m.name, raw_host, imp_h)
            raw_host -= imp_h
            raw_gpu = {d: b - imp_g.get(d, 0) for d, b in raw_gpu.items()}
        cost = self._record(m.name, reserved, raw_host, raw_gpu, key)
        with self._lock:
            split = self._attr.sample(m.runtime, key, reserved.entry_bytes, raw_host, raw_gpu)
            if split is not None:
                self._apply_split(m.runtime or "", split, after.pid)
        return cost

    def _charge_first_load(self, m: Measurement, reserved: Cost, raw_host: int, raw_gpu: dict[str, int],
                           key: str | None, pid: int | None) -> Cost:
        """Provisional: the model keeps its reservation, what exceeds it is the server's, until
        the split is known. Also when another load overlapped: no later load would see this
        import again, and over-reserving is safe where never charging the import is not."""
        over_h = max(0, raw_host - reserved.host)
        over_g = {d: b - reserved.gpu.get(d, 0) for d, b in raw_gpu.items() if b - reserved.gpu.get(d, 0) > 0}
        if self._overhead_pid == pid:
            self._charge_import(m.runtime, Cost(over_h, over_g, "measured"))
        if m.runtime is not None and not m.contaminated:
            self._attr.pending[m.runtime] = FirstLoad(m.name, key, reserved.entry_bytes, raw_host, dict(raw_gpu))
        log.info("memory runtime_overhead runtime=%s model=%s raw_host=%d host=%d gpu=%s provisional=%s", m.runtime, m.name,
                 raw_host, over_h, ",".join(f"{d}:{b}" for d, b in over_g.items()) or "0", not m.contaminated)
        return reserved

    def _charge_import(self, runtime: str | None, cost: Cost) -> None:
        """Charge ``runtime``'s import as measured by a process's first load of it. With several
        server processes the figure is one per runtime (every process imports the same), and a
        later process's figure can read low (even 0: a process that imported it in a load not
        measured, a request's load beside another, see ``start_measure``): it never lowers a
        figure another process's first load measured (only a split, ``_apply_split``, corrects
        it). Each first load is measured alone, in its own process, so the first figure is clean."""
        key = f"runtime:{runtime}"
        old = self._overhead.get(key)
        if self.server_processes > 1 and old is not None and old.method == "measured" and old.host >= cost.host:
            return
        self._overhead[key] = cost

    def _apply_split(self, runtime: str, split: Split, pid: int | None) -> None:
        """A first load's growth is split: charge the import to the server, correct the first
        model's reservation (if it is still loaded) and remember its share for its entry."""
        if self._overhead_pid == pid:
            self._overhead[f"runtime:{runtime}"] = Cost(split.import_host, split.import_gpu, "measured")
        cost = self._reserved.get(split.name) or Cost(0)  # gone: only its entry's record is written
        self._record(split.name, cost, split.model_host, split.model_gpu, split.key, attributed=split.source)
        log.info("memory runtime_import runtime=%s import_host=%d import_gpu=%s model_host=%d source=%s",
                 runtime, split.import_host, ",".join(f"{d}:{b}" for d, b in split.import_gpu.items()) or "0",
                 split.model_host, split.source)

    def _record(self, name: str, reserved: Cost, raw_host: int, raw_gpu: Mapping[str, int], key: str | None,
                attributed: str | None = None) -> Cost:
        """Turn a model's measured bytes into its cost (floors, reuse rule, declarations as
        floors), remember it under ``key`` and replace its reservation."""
        prev = self._load_record(key)
        host = max(raw_host, reserved.host_floor)
        if prev is not None and raw_host < self.reuse_ratio * int(prev.get("host", 0)):
            host = max(int(prev["host"]), reserved.host_floor)  # allocator reuse, not a smaller model
        gpu = {d: b for d, b in raw_gpu.items() if b > 0}
        prev_gpu = self._place_known((prev or {}).get("gpu") or {}, self._default_gpu())
        if prev_gpu and sum(gpu.values()) < self.reuse_ratio * sum(prev_gpu.values()):
            gpu = dict(prev_gpu)  # the caching allocator reused blocks, not a smaller model
        if sum(gpu.values()) < reserved.gpu_floor:
            target = max(gpu, key=gpu.get) if gpu else (next(iter(reserved.gpu), None) or self._default_gpu())
            if target is not None:
                gpu[target] = gpu.get(target, 0) + reserved.gpu_floor - sum(gpu.values())
        record = {
            "host": int(host), "gpu": {d: int(b) for d, b in gpu.items()}, "method": "measured",
            "raw_host": int(raw_host), "raw_gpu": {d: int(b) for d, b in raw_gpu.items()},
            "samples": int((prev or {}).get("samples", 0)) + 1, "measured_at": time.time(),
        }
        if attributed:
            record["attributed"] = attributed  # split from a first load's growth, not measured alone
        if key:
            self._save_record(key, record)
        # declared amounts stay floors of what is reserved (see module doc)
        h, h_src = int(host), "measured"
        if reserved.declared_host is not None and reserved.declared_host > h:
            h, h_src = int(reserved.declared_host), "declared"
        g, g_src = dict(record["gpu"]), "measured"
        if reserved.declared_gpu is not None and reserved.declared_gpu > sum(g.values()):
            g = {next(iter(g), None) or next(iter(reserved.gpu), None) or self._default_gpu() or "gpu:0": int(reserved.declared_gpu)}
            g_src = "declared"
        cost = Cost(h, g, combine(h_src, g_src if g else None), host_floor=reserved.host_floor,
                    gpu_floor=reserved.gpu_floor, declared_host=reserved.declared_host, declared_gpu=reserved.declared_gpu,
                    entry_bytes=reserved.entry_bytes, measured_host=int(host), measured_gpu=sum(record["gpu"].values()))
        over = self.update(name, cost)
        log.info("memory measured model=%s key=%s raw_host=%d host=%d gpu=%s method=%s before_host=%d before_method=%s%s%s",
                 name, key, raw_host, cost.host, ",".join(f"{d}:{b}" for d, b in g.items()) or "0", cost.method,
                 reserved.host, reserved.method, f" attributed={attributed}" if attributed else "",
                 "".join(f" over_budget_{d}={b}" for d, b in over.items()))
        if cost.under_declared:
            log.warning("memory above_declaration model=%s declared_host=%s measured_host=%d declared_gpu=%s measured_gpu=%d "
                        "reserved=%s", name, reserved.declared_host, int(host), reserved.declared_gpu,
                        sum(record["gpu"].values()), cost.describe())
        return cost

    def _pid(self) -> int | None:
        src = self._server_pid
        return src() if callable(src) else src

    def _snapshot(self, *, refresh: bool, process: int | None = None) -> Snapshot:
        """The server's tree RSS (and GPU use) over the tracked pids; ``refresh``: find the
        tree's processes again first (after a load, which may have started workers).
        ``process``: one of several server processes: its own tree and allocator reserve only
        (``pid`` stays the server's, all processes: a restart of any is told by it)."""
        tracker = self.reality.tracker
        if refresh:
            tracker.refresh()
        pid = tracker.root()
        if pid is None:
            return Snapshot(None, None, {})
        if process is not None and isinstance(pid, tuple) and process in pid:
            pids = tracker.pids_of(process)
            reserve = self.allocator_reserve(process)
        else:
            pids = tracker.pids()
            reserve = self.allocator_reserve()
        host = tracker.rss(pids)
        gpu: dict[str, GpuUsage] = {}
        if self._gpu is not None and pids:
            try:
                gpu = self._gpu.usage(pids)
            except Exception as e:  # a GPU probe failing mid-run must not fail a load
                log.warning("memory gpu_probe_failed error=%r", f"{type(e).__name__}: {e}")
        return Snapshot(pid, host, gpu, reserve)

    def _touch_windows(self, name: str, reason: str) -> None:
        """``name``'s bytes leave its server process: the other windows open in it are spoilt."""
        process = self._process.get(name)
        for m in self._windows.values():
            if m.name != name and m.measured and _shares_process(m.process, process):
                m.contaminated = True
                m.reasons.add(reason)




def _shares_process(a: int | None, b: int | None) -> bool:
    """Whether what happens in server process ``a`` moves what is measured in ``b`` (None:
    not known, or one server: every process)."""
    return a is None or b is None or a == b


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _pid_from_file(path: Path, fallback: Callable[[], int | None] | int | None) -> Callable[[], int | None]:
    """The server's pid read from ``path`` on each call (a sidecar restarted writes a new one);
    ``fallback`` (the adapter's own process) first when it knows one."""
    def pid() -> int | None:
        own = fallback() if callable(fallback) else fallback
        if own is not None:
            return own
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
    return pid
