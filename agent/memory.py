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
container without the host PID namespace). Honest about noise:
  * RSS deltas can be tiny or negative (the allocator reuses what an evicted model freed; Python
    rarely returns memory to the OS, and PyTorch's caching allocator keeps GPU blocks). A recorded
    measurement is never below ``floor_fraction`` x the estimate nor ``min_model_bytes``, and a new
    measurement below ``reuse_ratio`` x the previous one for the same entry is treated as reuse
    and does not lower the record.
  * A window that overlapped another load, or an unload (``begin_unload`` ... ``release``), is not
    recorded: its delta belongs to more than one model. The estimate then stays.
  * The first load of each runtime in a server process pays for importing its libraries
    (measured: ~80 MB for the first sklearn model in MLServer, then 4-300 KB per model) and, on a
    GPU, the CUDA context. ``start_measure(name, runtime=...)`` tells that load apart: what exceeds
    the model's reservation is charged to the server (``overhead()``, counted in ``used()``, never
    freed by eviction) and nothing is recorded for the entry.

Accounting (``MemoryManager``): reservations per model per device; ``admit`` plans the eviction,
reserves the cost and marks the victims as unloading in one step, so concurrent admissions never
count the same free bytes twice. ``plan_eviction`` picks least-recently-used models with no lease,
not pinned and (for lazy loads) older than ``min_residency_s`` until the need fits on every device
involved, or raises ``LargerThanBudget`` (permanent) / ``Blocked`` (retry later, or permanent when
only pinned models are in the way).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import psutil

from agent.quantity import parse_quantity

log = logging.getLogger("modelshelf.memory")

HOST = "host"
METHODS = ("declared", "estimated", "measured")

DEFAULT_HOST_PERCENT = 80.0
DEFAULT_GPU_PERCENT = 90.0
DEFAULT_MULTIPLIER = 2.0  # runtimes not listed below
# Host bytes in the server per byte of cache entry. Rationale: pickles/boosters unpickle to about
# their file size, plus load-time copies (2x); PyTorch weights load at ~1x plus module overhead;
# ONNX Runtime / Triton keep the graph and may duplicate initializers during optimization.
DEFAULT_MULTIPLIERS: dict[str, float] = {
    "sklearn": 2.0,
    "xgboost": 2.0,
    "lightgbm": 2.0,
    "catboost": 2.0,
    "mlflow": 2.0,
    "mlserver": 2.0,
    "python": 2.0,
    "huggingface": 1.5,
    "onnx": 1.5,
    "triton": 1.5,
    "tensorflow": 1.5,
    "pytorch": 1.2,
    "torchscript": 1.2,
}
_NO_LIMIT = 2**60  # cgroup v1 writes 9223372036854771712 for "unlimited"


# --------------------------------------------------------------------------------------------
# Cost


@dataclass(frozen=True)
class Cost:
    """Bytes a model takes on each device, and how that figure was obtained.

    ``host_floor`` / ``gpu_floor`` are the least a measurement of this model may record
    (from the estimate and the declaration); they travel with the cost and are not compared.
    """

    host: int = 0
    gpu: Mapping[str, int] = field(default_factory=dict)  # "gpu:N" -> bytes
    method: str = "estimated"
    host_floor: int = field(default=0, compare=False)
    gpu_floor: int = field(default=0, compare=False)  # total over devices
    declared_host: int | None = field(default=None, compare=False)
    declared_gpu: int | None = field(default=None, compare=False)

    def devices(self) -> dict[str, int]:
        """Device -> bytes, host always present, GPUs only where positive."""
        out = {HOST: self.host}
        out.update({d: b for d, b in self.gpu.items() if b > 0})
        return out

    @property
    def gpu_total(self) -> int:
        return sum(b for b in self.gpu.values() if b > 0)

    def describe(self) -> str:
        """Short text for logs and errors: ``host=1.2GiB gpu:0=3.0GiB (measured)``."""
        parts = [f"{d}={format_bytes(b)}" for d, b in sorted(self.devices().items()) if b or d == HOST]
        return " ".join(parts) + f" ({self.method})"


def format_bytes(n: int | float) -> str:
    """Human-readable binary size: 0B, 512KiB, 1.5GiB."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{int(n)}{unit}" if unit == "B" else f"{sign}{n:.1f}{unit}"
        n /= 1024
    return f"{sign}{n:.1f}TiB"  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Budgets


def parse_budget(spec: str | int | None, whole: int | None, *, default_percent: float, what: str) -> tuple[int, bool]:
    """Bytes from a budget spec: None/"" -> ``default_percent`` of ``whole``; "N%" -> N% of
    ``whole``; anything else a quantity (bytes, 8Gi, 1.5G). Returns (bytes, was_percentage).
    Raises ValueError naming ``what`` when the spec is bad or a percentage has no whole."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        percent: float | None = default_percent
    elif isinstance(spec, str) and spec.strip().endswith("%"):
        try:
            percent = float(spec.strip()[:-1].strip())
        except ValueError:
            raise ValueError(f"{what}: not a percentage: {spec!r}") from None
        if not 0 < percent <= 100:
            raise ValueError(f"{what}: percentage must be in (0, 100], got {spec!r}")
    else:
        try:
            return parse_quantity(spec), False
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
    if whole is None:
        raise ValueError(f"{what}: {percent}% of an unknown total")
    return int(whole * percent / 100.0), True


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < _NO_LIMIT else None


def cgroup_memory_limit(root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The container's memory limit in bytes, or None when there is none.

    Reads cgroup v2 ``memory.max`` and v1 ``memory/memory.limit_in_bytes`` (also
    ``memory.limit_in_bytes`` at the root, as some runtimes mount it), both at the mount root
    (a container's own cgroup under a cgroup namespace) and under this process's own cgroup path
    from ``/proc/self/cgroup`` (no namespace). The smallest limit found wins."""
    v2_path = v1_path = ""
    try:
        for line in self_cgroup.read_text().splitlines():
            hier, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if hier == "0" and controllers == "":
                v2_path = path
            elif "memory" in controllers.split(","):
                v1_path = path
    except OSError:
        pass
    candidates = [root / "memory.max", root / "memory.limit_in_bytes", root / "memory" / "memory.limit_in_bytes"]
    if v2_path.strip("/"):
        candidates.append(root / v2_path.strip("/") / "memory.max")
    if v1_path.strip("/"):
        candidates.append(root / "memory" / v1_path.strip("/") / "memory.limit_in_bytes")
    limits = [v for v in (_read_limit(p) for p in candidates) if v is not None]
    return min(limits) if limits else None


def host_memory_total(root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup"),
                      ram_total: int | None = None) -> tuple[int, str]:
    """(bytes, source) the host percentage applies to: the cgroup limit ("cgroup") when it is
    below RAM, else total RAM ("ram")."""
    ram = ram_total if ram_total is not None else psutil.virtual_memory().total
    limit = cgroup_memory_limit(root, self_cgroup)
    if limit is not None and limit < ram:
        return limit, "cgroup"
    return ram, "ram"


def discover_budget(host_memory: str | int | None = None, gpu_memory: str | int | None = None, *,
                    gpu_probe: "GpuProbe | None" = None, host_overhead: int = 0,
                    cgroup_root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup"),
                    ram_total: int | None = None) -> dict[str, int]:
    """Device -> budget bytes for model costs. ``gpu_probe`` None: no GPU entries.

    ``host_overhead`` (server baseline + agent RSS) is subtracted from a percentage budget only;
    explicit bytes above the limit and GPU bytes above a device's total are clamped, with a
    warning."""
    whole, source = host_memory_total(cgroup_root, self_cgroup, ram_total)
    host, percent = parse_budget(host_memory, whole, default_percent=DEFAULT_HOST_PERCENT, what="--host-memory")
    if percent:
        host = max(0, host - max(0, int(host_overhead)))
    elif host > whole:
        log.warning("memory budget_clamped device=host asked=%d limit=%d source=%s", host, whole, source)
        host = whole
    budget = {HOST: host}
    if gpu_probe is not None:
        for dev, total in sorted(gpu_probe.devices().items()):
            b, _ = parse_budget(gpu_memory, total, default_percent=DEFAULT_GPU_PERCENT, what="--gpu-memory")
            if b > total:
                log.warning("memory budget_clamped device=%s asked=%d total=%d", dev, b, total)
                b = total
            budget[dev] = b
    log.info("memory budget %s host_source=%s host_overhead=%d", " ".join(f"{d}={b}" for d, b in budget.items()), source, host_overhead)
    return budget


# --------------------------------------------------------------------------------------------
# GPU probe (NVML)


@dataclass(frozen=True)
class GpuUsage:
    """One device at one instant: bytes used by the given pids (None: none of them is listed,
    e.g. NVML reports host-namespace pids in a container) and by everything on the device."""

    process_bytes: int | None
    device_used: int


class GpuProbe(Protocol):
    """What the manager needs from a GPU: totals, and usage by a set of pids."""

    def devices(self) -> dict[str, int]:
        """"gpu:N" -> total bytes."""

    def usage(self, pids: set[int]) -> dict[str, GpuUsage]:
        """"gpu:N" -> usage by ``pids`` and overall."""


class NvmlProbe:
    """The real GPU probe over nvidia-ml-py (``import pynvml``). Use ``open_gpu_probe()``."""

    def __init__(self, nvml: Any, handles: dict[str, Any]):
        self._nvml = nvml
        self._handles = handles
        self._lock = threading.Lock()

    def devices(self) -> dict[str, int]:
        with self._lock:
            return {d: int(self._nvml.nvmlDeviceGetMemoryInfo(h).total) for d, h in self._handles.items()}

    def usage(self, pids: set[int]) -> dict[str, GpuUsage]:
        nvml = self._nvml
        out: dict[str, GpuUsage] = {}
        with self._lock:
            for dev, h in self._handles.items():
                used = int(nvml.nvmlDeviceGetMemoryInfo(h).used)
                proc: int | None = None
                try:
                    procs = nvml.nvmlDeviceGetComputeRunningProcesses(h)
                except nvml.NVMLError:
                    procs = []
                for p in procs:
                    if p.pid in pids:
                        proc = (proc or 0) + int(p.usedGpuMemory or 0)  # None: not available (MIG, perms)
                out[dev] = GpuUsage(proc, used)
        return out

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # already shut down / never initialized: nothing to release
            pass


def open_gpu_probe() -> NvmlProbe | None:
    """An NVML probe, or None with ONE info line saying why GPU budgeting is off (no library,
    no driver, no device). Never raises."""
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError, ...
        log.info("memory gpu_budgeting=off reason=%r", f"{type(e).__name__}: {e}")
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = {f"gpu:{i}": pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)}
    except Exception as e:
        log.info("memory gpu_budgeting=off reason=%r", f"{type(e).__name__}: {e}")
        _shutdown(pynvml)
        return None
    if not handles:
        log.info("memory gpu_budgeting=off reason='no GPU device'")
        _shutdown(pynvml)
        return None
    return NvmlProbe(pynvml, handles)


def _shutdown(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:
        pass


# --------------------------------------------------------------------------------------------
# Process tree


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and its descendants (recursive); [] when it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def tree_rss(pid: int) -> int:
    """Sum of RSS over a process tree (bytes); processes vanishing meanwhile count 0. Shared
    pages of forked workers are counted in each: an over-estimate, never an under-estimate."""
    total = 0
    for p in process_tree(pid):
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


# --------------------------------------------------------------------------------------------
# Measurement store


class MetaStore(Protocol):
    """Anything with the puller Cache's per-entry metadata methods."""

    def get_meta(self, key: str) -> dict | None: ...

    def set_meta(self, key: str, meta: dict) -> None: ...


class InMemoryStore:
    """Fallback MetaStore: remembers for the life of the process only."""

    def __init__(self) -> None:
        self._data: dict[str, dict] = {}
        self._lock = threading.Lock()

    def get_meta(self, key: str) -> dict | None:
        with self._lock:
            meta = self._data.get(key)
            return None if meta is None else _deepcopy(meta)

    def set_meta(self, key: str, meta: dict) -> None:
        with self._lock:
            self._data[key] = _deepcopy(meta)


def _deepcopy(d: dict) -> dict:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


# --------------------------------------------------------------------------------------------
# Eviction planning (pure)


@dataclass(frozen=True)
class Candidate:
    """A loaded model the planner may evict. ``cost`` None: the manager's reservation for it.
    Times are ``time.monotonic()`` seconds."""

    name: str
    last_used: float
    loaded_at: float
    pinned: bool = False
    inflight: int = 0  # leases held by requests
    cost: Cost | None = None


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


def plan_eviction(needed: Cost | Mapping[str, int], candidates: Iterable[Candidate], *,
                  free: Mapping[str, int], budget: Mapping[str, int], model: str | None = None,
                  respect_residency: bool = False, min_residency_s: float = 0.0,
                  now: float | None = None, reserved_elsewhere: Mapping[str, int] | None = None,
                  overhead: Mapping[str, int] | None = None) -> list[str]:
    """Names to evict, least recently used first, so that ``needed`` fits on every budgeted
    device it touches. Devices without a budget are not checked. Eligible: not pinned, no lease,
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
    short = {d: b - free.get(d, 0) for d, b in need.items() if b > free.get(d, 0)}
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
    eligible.sort(key=lambda c: (c.last_used, c.loaded_at, c.name))
    victims: list[str] = []
    remaining = dict(short)
    for c in eligible:
        devs = c.cost.devices()
        if not any(devs.get(d, 0) > 0 for d in remaining):
            continue
        victims.append(c.name)
        for d in list(remaining):
            remaining[d] -= devs.get(d, 0)
            if remaining[d] <= 0:
                del remaining[d]
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
        + ("; pinned models leave too little room" if permanent else ""),
        devices=list(short), retry_after_s=retry, blocked_by=blocked, permanent=permanent, method=method)


def _on(cost: Cost, devices: Mapping[str, int]) -> int:
    devs = cost.devices()
    return sum(devs.get(d, 0) for d in devices)


def _on_map(amounts: Mapping[str, int], devices: Mapping[str, int]) -> int:
    return sum(amounts.get(d, 0) for d in devices)


def _fmt_devs(amounts: Mapping[str, int], devices: Iterable[str]) -> str:
    return " ".join(f"{d}={format_bytes(amounts.get(d, 0))}" for d in sorted(devices))


# --------------------------------------------------------------------------------------------
# The manager


@dataclass
class _Snapshot:
    pid: int | None
    host: int | None
    gpu: dict[str, GpuUsage]


@dataclass
class Measurement:
    """An open measurement window for one model's load (``start_measure`` ... ``finish_measure``)."""

    name: str
    before: _Snapshot
    started: float
    runtime: str | None = None
    first_of_runtime: bool = False  # the server imports the runtime's libraries during this load
    contaminated: bool = False
    reasons: set[str] = field(default_factory=set)


class MemoryManager:
    """Budgets, reservations and costs for one node. Thread-safe; every method is cheap (a dict
    update) except ``start_measure``/``finish_measure`` (read /proc and NVML: ~1 ms per server
    process) and ``cost_for``/``finish_measure`` (one store read/write when a key is given)."""

    def __init__(self, budget: Mapping[str, int], *, store: MetaStore | None = None,
                 multipliers: Mapping[str, float] | None = None, gpu_probe: GpuProbe | None = None,
                 server_pid: Callable[[], int | None] | int | None = None, min_residency_s: float = 30.0,
                 floor_fraction: float = 0.5, min_model_bytes: int = 256 * 2**10, reuse_ratio: float = 0.5,
                 profile: str = "default", clock: Callable[[], float] = time.monotonic):
        self._budget = {d: int(b) for d, b in budget.items()}
        self._store: MetaStore = store if store is not None else InMemoryStore()
        self._multipliers = {**DEFAULT_MULTIPLIERS, **(multipliers or {})}
        self._gpu = gpu_probe
        self._server_pid = server_pid
        self.min_residency_s = float(min_residency_s)
        self.floor_fraction = float(floor_fraction)
        self.min_model_bytes = int(min_model_bytes)
        self.reuse_ratio = float(reuse_ratio)
        self.profile = profile
        self._clock = clock
        self._lock = threading.RLock()
        self._reserved: dict[str, Cost] = {}
        self._unloading: set[str] = set()
        self._windows: dict[int, Measurement] = {}
        self._warm: dict[int, set[str]] = {}  # server pid -> runtimes it has loaded once
        self._overhead: dict[str, Cost] = {}  # "runtime:<name>" -> server-level bytes (imports, CUDA context)
        self._overhead_pid: int | None = None

    @classmethod
    def from_settings(cls, settings: Any, *, store: MetaStore | None = None,
                      server_pid: Callable[[], int | None] | int | None = None, host_overhead: int = 0,
                      gpu_probe: GpuProbe | None | str = "nvml", **kwargs: Any) -> "MemoryManager":
        """Budgets discovered from ``settings.host_memory`` / ``gpu_memory`` (agent.settings),
        multipliers from ``settings.memory_multipliers``, residency from ``min_residency_s``,
        ``profile`` from ``settings.server``. ``gpu_probe="nvml"`` opens NVML (or logs once that
        GPU budgeting is off); pass a probe or None to choose."""
        probe = open_gpu_probe() if gpu_probe == "nvml" else gpu_probe
        budget = discover_budget(settings.host_memory, settings.gpu_memory, gpu_probe=probe, host_overhead=host_overhead)
        kwargs.setdefault("min_residency_s", settings.min_residency_s)
        kwargs.setdefault("profile", getattr(settings, "server", "default"))
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
        """Device -> reserved bytes (loaded + loading + still unloading), every budgeted device."""
        with self._lock:
            out = {d: 0 for d in self._budget}
            for cost in [*self._reserved.values(), *self._overhead.values()]:
                for d, b in cost.devices().items():
                    out[d] = out.get(d, 0) + b
            return out

    def free(self) -> dict[str, int]:
        """Device -> bytes available to a new model, counting models being unloaded as gone
        (their bytes are promised to whoever admitted after them). May be negative."""
        with self._lock:
            used = self.used()
            free = {d: self._budget[d] - used.get(d, 0) for d in self._budget}
            for name in self._unloading:
                for d, b in self._reserved[name].devices().items():
                    if d in free:
                        free[d] += b
            return free

    def reservations(self) -> dict[str, Cost]:
        with self._lock:
            return dict(self._reserved)

    def overhead(self) -> dict[str, Cost]:
        """Server-level bytes no model owns and no eviction frees, learnt from the first load of
        each runtime in the current server process ("runtime:sklearn" -> the sklearn import,
        "runtime:pytorch" -> torch + the CUDA context). Counted in ``used()``; cleared when the
        server's pid changes or by ``reset_server()``."""
        with self._lock:
            return dict(self._overhead)

    def reset_server(self) -> None:
        """The server restarted: forget what its process had imported."""
        with self._lock:
            self._overhead.clear()
            self._warm = {}
            self._overhead_pid = None

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
        method = _combine(h_src, g_src if gpu else None)
        return Cost(host, gpu, method, host_floor=host_floor, gpu_floor=gpu_floor,
                    declared_host=declared_host, declared_gpu=declared_gpu)

    def _default_gpu(self) -> str | None:
        gpus = sorted((d for d in self._budget if d != HOST), key=_dev_index)
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
        try:
            meta = self._store.get_meta(key) or {}
        except Exception as e:  # a broken store must not stop a load: fall back to the estimate
            log.warning("memory store_read_failed key=%s error=%r", key, f"{type(e).__name__}: {e}")
            return None
        rec = (meta.get("memory") or {}).get(self.profile)
        return rec if isinstance(rec, dict) and rec.get("method") == "measured" else None

    def _save_record(self, key: str, record: dict) -> None:
        try:
            meta = self._store.get_meta(key) or {}
            mem = dict(meta.get("memory") or {})
            mem[self.profile] = record
            meta = {**meta, "memory": mem}
            self._store.set_meta(key, meta)
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

    def release(self, name: str) -> Cost | None:
        """Forget ``name``'s reservation (after its unload finished, or its load failed)."""
        with self._lock:
            self._unloading.discard(name)
            cost = self._reserved.pop(name, None)
            if cost is not None:
                self._touch_windows(name, "release")
            return cost

    def begin_unload(self, name: str) -> None:
        """``name`` is being unloaded: its bytes count as free for admissions from now on, and
        measurements running meanwhile are not recorded. ``release`` ends it."""
        with self._lock:
            if name in self._reserved:
                self._unloading.add(name)
                self._touch_windows(name, "unload")

    def cancel_unload(self, name: str) -> None:
        """A victim marked by ``admit`` stays loaded after all (a request leased it): its bytes
        count as used again. Nothing happens when its reservation is gone meanwhile."""
        with self._lock:
            self._unloading.discard(name)

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
        use their reservation; unloading or unreserved ones are ignored. Reads state only."""
        with self._lock:
            cands, loading = self._resolve_candidates(candidates, model)
            overhead: dict[str, int] = {}
            for cost in self._overhead.values():
                for d, b in cost.devices().items():
                    overhead[d] = overhead.get(d, 0) + b
            return plan_eviction(needed, cands, free=self._free_for(model), budget=self._budget, model=model,
                                 respect_residency=lazy, min_residency_s=self.min_residency_s,
                                 now=self._clock() if now is None else now, reserved_elsewhere=loading,
                                 overhead=overhead)

    def admit(self, name: str, cost: Cost, candidates: Iterable[Candidate], *, lazy: bool = False,
              now: float | None = None) -> list[str]:
        """Plan, reserve ``cost`` for ``name`` and mark the victims as unloading, atomically.
        Returns the victims: unload each, then ``release`` it. Raises DoesNotFit (nothing
        reserved then)."""
        with self._lock:
            victims = self.plan_eviction(cost, candidates, model=name, lazy=lazy, now=now)
            for v in victims:
                self.begin_unload(v)
            self.reserve(name, cost)
            return victims

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
            out.append(c if c.cost is not None else Candidate(c.name, c.last_used, c.loaded_at, c.pinned, c.inflight, cost))
        loading: dict[str, int] = {}
        for n, cost in self._reserved.items():
            if n not in seen and n != model and n not in self._unloading:
                for d, b in cost.devices().items():
                    loading[d] = loading.get(d, 0) + b
        return out, loading

    # -- measurement ----------------------------------------------------------------------------

    def needs_measure(self, key: str | None, runtime: str | None) -> bool:
        """Whether a load of entry `key` should be measured: no measurement is remembered for
        it yet, or the server process has not loaded this runtime yet (its import must be
        charged). A remembered entry is not measured again: snapshotting the server's process
        tree twice costs a few ms on every cold start."""
        pid = self._pid()
        with self._lock:
            warm = pid is not None and self._overhead_pid == pid and runtime in self._warm.get(pid, set())
        return not warm or self._load_record(key) is None

    def start_measure(self, name: str, runtime: str | None = None) -> Measurement:
        """Snapshot the server's process tree before ``name`` loads. Call after its victims are
        unloaded and released, right before the load. ``runtime``: lets the first load of each
        runtime in a server process be told apart (see ``overhead``)."""
        snap = self._snapshot()
        with self._lock:
            m = Measurement(name, snap, self._clock(), runtime=runtime)
            if snap.pid is not None:
                if self._overhead_pid != snap.pid:  # a new server process: old imports are gone
                    self._overhead.clear()
                    self._warm = {}
                    self._overhead_pid = snap.pid
                warm = self._warm.setdefault(snap.pid, set())
                if runtime is not None and runtime not in warm:
                    m.first_of_runtime = True
                    warm.add(runtime)
            if self._windows:
                m.contaminated = True
                m.reasons.add("concurrent_load")
                for other in self._windows.values():
                    other.contaminated = True
                    other.reasons.add("concurrent_load")
            if self._unloading:
                m.contaminated = True
                m.reasons.add("unload")
            self._windows[id(m)] = m
            return m

    def abort_measure(self, m: Measurement) -> None:
        """Close a window without recording (the load failed)."""
        with self._lock:
            self._windows.pop(id(m), None)

    def finish_measure(self, m: Measurement, *, key: str | None = None) -> Cost:
        """Snapshot after the load, turn the delta into the model's cost (floors, reuse rule),
        update its reservation, remember it under ``key`` and return it. Returns the reserved
        cost unchanged when nothing could be measured (no server pid, server restarted) or the
        window was shared with another load/unload; a zero cost when the model's reservation
        was released meanwhile (nothing is recorded then)."""
        after = self._snapshot()
        with self._lock:
            self._windows.pop(id(m), None)
            reserved = self._reserved.get(m.name)
        if reserved is None:
            return Cost(0, {}, "estimated")
        if m.before.host is None or after.host is None or m.before.pid != after.pid:
            return reserved  # nothing to measure, or the server restarted in between
        raw_host = after.host - m.before.host
        raw_gpu = _gpu_delta(m.before.gpu, after.gpu)
        if m.contaminated and not m.first_of_runtime:
            log.info("memory measure_skipped model=%s reason=%s raw_host=%d", m.name, ",".join(sorted(m.reasons)), raw_host)
            return reserved
        if m.first_of_runtime:
            # Also when another load overlapped: the runtime is marked warm now, so no later
            # load would ever see its import again. Charging what exceeds this model's
            # reservation may count the other model's bytes twice: over-reserving is safe,
            # never charging the import is not.
            # The server imported the runtime's libraries (sklearn ~80 MB in MLServer, torch plus a
            # CUDA context): bytes no eviction frees. What exceeds the model's reservation is
            # charged to the server, the model keeps its reservation, nothing is recorded: the
            # entry's next load measures the model alone.
            over_h = max(0, raw_host - reserved.host)
            over_g = {d: b - reserved.gpu.get(d, 0) for d, b in raw_gpu.items() if b - reserved.gpu.get(d, 0) > 0}
            with self._lock:
                if self._overhead_pid == after.pid:
                    self._overhead[f"runtime:{m.runtime}"] = Cost(over_h, over_g, "measured")
            log.info("memory runtime_overhead runtime=%s model=%s raw_host=%d host=%d gpu=%s", m.runtime, m.name,
                     raw_host, over_h, ",".join(f"{d}:{b}" for d, b in over_g.items()) or "0")
            return reserved
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
        cost = Cost(h, g, _combine(h_src, g_src if g else None), host_floor=reserved.host_floor,
                    gpu_floor=reserved.gpu_floor, declared_host=reserved.declared_host, declared_gpu=reserved.declared_gpu)
        over = self.update(m.name, cost)
        log.info("memory measured model=%s key=%s raw_host=%d host=%d gpu=%s method=%s before_host=%d before_method=%s%s",
                 m.name, key, raw_host, cost.host, ",".join(f"{d}:{b}" for d, b in g.items()) or "0", cost.method,
                 reserved.host, reserved.method, "".join(f" over_budget_{d}={b}" for d, b in over.items()))
        return cost

    def _pid(self) -> int | None:
        src = self._server_pid
        return src() if callable(src) else src

    def _snapshot(self) -> _Snapshot:
        pid = self._pid()
        if pid is None:
            return _Snapshot(None, None, {})
        procs = process_tree(pid)
        host = 0
        for p in procs:
            try:
                host += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        gpu: dict[str, GpuUsage] = {}
        if self._gpu is not None and procs:
            try:
                gpu = self._gpu.usage({p.pid for p in procs})
            except Exception as e:  # a GPU probe failing mid-run must not fail a load
                log.warning("memory gpu_probe_failed error=%r", f"{type(e).__name__}: {e}")
        return _Snapshot(pid, host if procs else None, gpu)

    def _touch_windows(self, name: str, reason: str) -> None:
        for m in self._windows.values():
            if m.name != name:
                m.contaminated = True
                m.reasons.add(reason)


def _gpu_delta(before: Mapping[str, GpuUsage], after: Mapping[str, GpuUsage]) -> dict[str, int]:
    """Per-device delta: per-process bytes when our pids are listed on either side, else the
    device's used bytes (pid namespaces differ: NVML lists host pids in a container)."""
    out: dict[str, int] = {}
    for d in set(before) | set(after):
        b, a = before.get(d), after.get(d)
        if a is None or b is None:
            continue
        if a.process_bytes is not None or b.process_bytes is not None:
            out[d] = (a.process_bytes or 0) - (b.process_bytes or 0)
        else:
            out[d] = a.device_used - b.device_used
    return out


def _combine(host_src: str, gpu_src: str | None) -> str:
    """One method for a cost: "measured" if any part was measured, else "declared" if any part
    was declared, else "estimated"."""
    srcs = {host_src} | ({gpu_src} if gpu_src else set())
    for m in ("measured", "declared"):
        if m in srcs:
            return m
    return "estimated"


def _dev_index(dev: str) -> int:
    try:
        return int(dev.split(":", 1)[1])
    except (IndexError, ValueError):
        return 1 << 30
