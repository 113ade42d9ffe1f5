"""Probes of real memory: the server's process tree (psutil) and the GPUs (NVML)."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

log = logging.getLogger("modelshelf.memory")


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


def tree_rss(pid: int | tuple[int, ...]) -> int:
    """Sum of RSS over a process tree (bytes), or over several (a tuple of roots: the server
    processes of --server-processes N); processes vanishing meanwhile count 0. Shared pages of
    forked workers are counted in each: an over-estimate, never an under-estimate."""
    total = 0
    for p in (q for root in (pid if isinstance(pid, tuple) else (pid,)) for q in process_tree(root)):
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


