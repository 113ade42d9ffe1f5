"""Memory budgets and model costs: the accountant the reconciler and the router consult.

Plain data in, plain data out: this module knows nothing of the reconciler, the router or HTTP.

Devices are named ``"host"`` and ``"gpu:N"`` (N = NVML device index). Amounts are bytes.

Budgets (``discover_budget``)
  * host: ``--host-memory`` as bytes / a quantity (``8Gi``) / ``"N%"`` of the container's cgroup
    limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``; "max" or huge values mean no limit),
    else of total RAM. Default 80%.
  * The budget is for MODEL costs only. The server's own baseline (MLServer ~130-230 MB, Triton ~41 MB)
    and the agent's RSS are overhead no model gets: when the host budget is a percentage (or the
    default), the caller passes that overhead as ``host_overhead`` and it is subtracted; an absolute
    byte value is taken as the models' budget as written.
  * The embedded MLServer's allocator reserve (``--server-malloc-keep``, ``MemoryManager.malloc_keep``:
    freed heap it may keep resident between loads, agent/runtimes/mlserver_repository.py) is a
    declared line of the ledger beside the runtime imports: counted in ``used()``, it takes its
    room from models. Its default is bounded by the budget (``default_malloc_keep``). With
    several server processes it is counted once per process that has loaded a model since it
    started, plus one per load admitted whose process is not known yet (``keep_processes``).
  * GPU: ``--gpu-memory`` as bytes / quantity / ``"N%"`` of EACH device's total memory (NVML,
    nvidia-ml-py). Default 90% (the rest covers the CUDA context of the server and fragmentation).
    No NVML (no library, no driver, no device): GPU budgeting is off, one info line says so.

Cost of a model (``MemoryManager.cost_for``), per device, in this order:
  1. a measurement remembered for the cache entry (by cache key and ``profile``, e.g. the server
     kind), and/or the declared amount (``memory`` / ``gpuMemory``): with both, the larger wins.
     The declaration is a floor: the user's number is always reserved (it may cover
     inference-time peaks no load-time measurement sees), and a measurement above it wins (the
     declaration was too low; accounting must follow reality);
  2. else the estimate: cache entry size x a per-runtime multiplier (``DEFAULT_MULTIPLIERS``;
     a ``"gpu:RUNTIME"`` key gives a GPU multiplier, none by default: GPU use is then learnt by
     measurement).
  ``Cost.method`` says which source decided: "declared" | "estimated" | "measured".

Measurement after load (``start_measure`` / ``finish_measure``): host = RSS delta of the server's
process tree (psutil, children recursive), GPU = NVML per-process used memory summed over the
tree's pids (falling back to the device's used memory when none of our pids is visible, as in a
container without the host PID namespace). Where the server reports an allocator reserve (freed
bytes it keeps resident for later loads: the embedded MLServer's --server-malloc-keep,
``allocator_reserve``), host = the RSS delta minus the reserve's change over the same window:
freed buffers the reserve kept are not the model's, kept pages the load reused are. Honest about noise:
  * RSS deltas can be tiny or negative (the allocator reuses what an evicted model freed; Python
    rarely returns memory to the OS, and PyTorch's caching allocator keeps GPU blocks). A recorded
    measurement is never below ``floor_fraction`` x the estimate nor ``min_model_bytes``, and a new
    measurement below ``reuse_ratio`` x the previous one for the same entry is treated as reuse
    and does not lower the record.
  * Every load opens a window, measured or not: a load whose cost is remembered (or an update
    in place) takes no snapshot (``start_measure(..., measure=False)``) but still grows the
    server, so it is announced. Windows are serialized: a measured window waits for every open
    one, an unmeasured load for the measured ones (from a worker thread, never on the event
    loop; at most until the oldest is ``measure_wait_s`` = 1 s old, so nothing waits long behind
    a slow or hanging load), so quick start-up preloads are each measured. A measured window
    that still overlapped another load (measured or not), or an unload (``begin_unload`` ...
    ``release``), is not recorded: its delta belongs to more than one model. Snapshots are taken
    only for windows that can be kept, over the tracked pids (``reality.ProcessTracker``).
  * The first load of each runtime in a server process also pays for importing its libraries
    (measured: ~80 MB for the first sklearn model in MLServer, then 4-300 KB per model) and, on a
    GPU, the CUDA context. That growth is split (``measure.ImportAttribution``): the model keeps
    its reservation and the rest is charged to the server PROVISIONALLY until a later load of
    the same runtime tells what a model costs (the first entry reloaded and measured alone, or
    the median bytes per entry byte of later loads); then the import is charged as itself
    (``overhead()``, counted in ``used()``, never freed by eviction) and the first model gets its
    own share, recorded for its entry. The import's size outlives a server restart: it stays
    charged from the restart on (the reloads are admitted counting it) and the next process's
    first load is split at once. While a first load runs, its import is charged as expected (the
    known size, else ``cost.DEFAULT_IMPORTS``) until the load's measurement replaces it.
  * A measurement above a model's declaration replaces it in the reservation and is said so:
    ``Cost.under_declared``, ``model_doc(name)`` (declared and measured side by side), a warning.

Accounting (``MemoryManager``): reservations per model per device. ``used()`` is what admission
counts (models loaded or loading + server overhead; never above the budget because of a swap),
``held()`` adds models whose unload has not finished; ``admit`` plans the eviction,
reserves the cost and marks the victims as unloading in one step, so concurrent admissions never
count the same free bytes twice. ``plan_eviction`` picks models in ``eviction_order`` (lowest
``Candidate.score`` first: a decayed request count under ``--eviction lfu-decay``, 0 under ``lru``;
then least recently used) with no lease, not pinned and (for lazy loads) older than
``min_residency_s`` until the need fits on every device involved, or raises ``LargerThanBudget``
(permanent) / ``Blocked`` (retry later, or permanent when only what no eviction frees is in the
way: pinned models, the server's own bytes).
``headroom`` and ``reclaim`` serve the reconciler's eviction ahead of need: how many bytes to keep
free per device (room for N loads of the median reservation, only where that is a small share of the
budget) and which models to unload for it (the same order), by the same rules, marking nothing until
each unload commits.

One role per module: ``cost`` (Cost, formatting), ``budget`` (discovery), ``probes`` (process tree,
NVML), ``store`` (where measurements are remembered), ``planner`` (eviction, pure), ``measure``
(windows and deltas, the split of a runtime's import), ``ledger`` (MemoryManager), ``reality``
(what the server really holds against the ledger and the budget: excess, drift, OOM kills, and
the loop that evicts on excess).
"""
from __future__ import annotations

from .budget import (DEFAULT_GPU_PERCENT, DEFAULT_HOST_PERCENT, cgroup_memory_limit, discover_budget,
                     host_memory_total, parse_budget)
from .cost import DEFAULT_MULTIPLIER, DEFAULT_MULTIPLIERS, HOST, METHODS, Cost, format_bytes
from .ledger import MemoryManager
from .measure import Measurement
from .planner import Blocked, Candidate, DoesNotFit, LargerThanBudget, decayed, plan_eviction
from .reality import CgroupMemory, ProcessTracker, RealityCheck, RealityReport, reality_loop
from .probes import GpuProbe, GpuUsage, NvmlProbe, open_gpu_probe, process_tree, tree_rss
from .store import InMemoryStore, MetaStore

__all__ = [
    "DEFAULT_GPU_PERCENT", "DEFAULT_HOST_PERCENT", "DEFAULT_MULTIPLIER", "DEFAULT_MULTIPLIERS", "HOST", "METHODS",
    "Blocked", "Candidate", "Cost", "DoesNotFit", "GpuProbe", "GpuUsage", "InMemoryStore", "LargerThanBudget",
    "Measurement", "MemoryManager", "MetaStore", "NvmlProbe", "cgroup_memory_limit", "discover_budget",
    "decayed", "format_bytes", "host_memory_total", "open_gpu_probe", "parse_budget", "plan_eviction", "process_tree",
    "tree_rss", "CgroupMemory", "ProcessTracker", "RealityCheck", "RealityReport", "reality_loop",
]
