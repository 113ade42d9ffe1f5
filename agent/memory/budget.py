"""Budget discovery: how many bytes models may take on each device (see the package doc)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from agent.quantity import parse_quantity

from .cost import HOST

if TYPE_CHECKING:
    from .probes import GpuProbe

log = logging.getLogger("modelshelf.memory")

DEFAULT_HOST_PERCENT = 80.0
DEFAULT_GPU_PERCENT = 90.0
_NO_LIMIT = 2**60  # cgroup v1 writes 9223372036854771712 for "unlimited"


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


def own_cgroup_paths(self_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[str, str]:
    """(v2 path, v1 memory path) of this process's cgroup from ``/proc/self/cgroup``; "" if none."""
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
    return v2_path, v1_path


def cgroup_memory_limit(root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The container's memory limit in bytes, or None when there is none.

    Reads cgroup v2 ``memory.max`` and v1 ``memory/memory.limit_in_bytes`` (also
    ``memory.limit_in_bytes`` at the root, as some runtimes mount it), both at the mount root
    (a container's own cgroup under a cgroup namespace) and under this process's own cgroup path
    from ``/proc/self/cgroup`` (no namespace). The smallest limit found wins."""
    v2_path, v1_path = own_cgroup_paths(self_cgroup)
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


MALLOC_KEEP_SHARE = 8  # the default --server-malloc-keep takes at most 1/8 of the host budget


def default_malloc_keep(host_memory: str | int | None, cap: int) -> int:
    """The embedded server's allocator reserve when --server-malloc-keep is not given: ``cap``,
    but never more than 1/``MALLOC_KEEP_SHARE`` of the host budget (a percentage read before the
    server's and agent's own RSS is subtracted), so a small budget keeps its room for models.
    0 when --host-memory does not parse (the agent refuses it at start, naming it)."""
    try:
        whole, _ = host_memory_total()
        host, _ = parse_budget(host_memory, whole, default_percent=DEFAULT_HOST_PERCENT, what="--host-memory")
    except ValueError:
        return 0
    return max(0, min(int(cap), host // MALLOC_KEEP_SHARE))


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


