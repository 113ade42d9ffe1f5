"""Measurement windows: snapshots of the server before and after a load, and their delta."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .probes import GpuUsage


@dataclass
class Snapshot:
    pid: int | None
    host: int | None
    gpu: dict[str, GpuUsage]
    reserve: int | None = None  # the server's allocator reserve (freed bytes it keeps resident), when it reports one


@dataclass
class Measurement:
    """An open load window for one model (``start_measure`` ... ``finish_measure``): measured,
    or only announced (``measured=False``) so that it spoils no other model's measurement."""

    name: str
    before: Snapshot
    started: float
    runtime: str | None = None
    first_of_runtime: bool = False  # the server imports the runtime's libraries during this load
    measured: bool = True  # False: a load whose cost is remembered; no snapshot, but it grows the server
    process: int | None = None  # the server process the load goes to (several: --server-processes N)
    contaminated: bool = False
    reasons: set[str] = field(default_factory=set)


def gpu_delta(before: Mapping[str, GpuUsage], after: Mapping[str, GpuUsage]) -> dict[str, int]:
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




SAMPLE_MIN_ENTRY = 2**20  # entries below 1 MiB say little about bytes per entry byte


@dataclass
class FirstLoad:
    """The first load of a runtime in one server process: the server's growth is the runtime's
    import (plus, on a GPU, the CUDA context) AND the model. Held until it can be split."""

    name: str
    key: str | None
    entry_bytes: int | None
    raw_host: int
    raw_gpu: dict[str, int]


@dataclass(frozen=True)
class Split:
    """How a first load's growth divides: the runtime's import and the model."""

    import_host: int
    import_gpu: dict[str, int]
    model_host: int
    model_gpu: dict[str, int]
    source: str  # "reload" (the model measured alone later) | "ratio" (bytes per entry byte of later loads)
    name: str = ""  # the first model
    key: str | None = None  # its cache entry


class ImportAttribution:
    """Splits the first load of each runtime into import and model once later loads tell how much
    a model of that runtime costs (not thread-safe: the ledger calls it under its lock).

    * ``pending[runtime]``: the first load of that runtime in the current server process, not
      split yet. Until it is, the model keeps its reservation and the rest of the growth is the
      server's (provisional: the ledger's total equals the server's growth either way).
    * ``samples[runtime]``: clean measurements (entry bytes, host bytes, GPU bytes) of later loads.
    * A split is found from the first model's own entry measured alone later ("reload"), else
      from the median bytes per entry byte of later loads of entries of 1 MiB or more applied to
      the first model's entry size, or (for a first entry under 1 MiB) the median cost of later
      small entries ("ratio").
    * ``known[runtime]``: the import's bytes once split; it outlives a server restart (importing
      sklearn costs the same in the next process), so the next first load is split at once.
    """

    def __init__(self, min_model_bytes: int) -> None:
        self.min_model_bytes = int(min_model_bytes)
        self.pending: dict[str, FirstLoad] = {}
        self.samples: dict[str, list[tuple[int, int, int]]] = {}
        self.known: dict[str, tuple[int, dict[str, int]]] = {}

    def server_restarted(self) -> None:
        self.pending.clear()

    def sample(self, runtime: str | None, key: str | None, entry_bytes: int | None, raw_host: int,
               raw_gpu: Mapping[str, int]) -> Split | None:
        """A clean measurement of a later load; returns the split of the pending first load of
        ``runtime`` when it can now be made (and forgets that first load)."""
        if runtime is None:
            return None
        gpu_total = sum(b for b in raw_gpu.values() if b > 0)
        if entry_bytes is not None and raw_host > 0:
            self.samples.setdefault(runtime, []).append((int(entry_bytes), int(raw_host), int(gpu_total)))
        first = self.pending.get(runtime)
        if first is None:
            return None
        if key is not None and key == first.key:
            split = self._split(first, raw_host, gpu_total, "reload")
        else:
            est = self._estimate(runtime, first.entry_bytes)
            if est is None:
                return None
            split = self._split(first, est[0], est[1], "ratio")
        del self.pending[runtime]
        self.known[runtime] = (split.import_host, dict(split.import_gpu))
        return split

    def _estimate(self, runtime: str, entry_bytes: int | None) -> tuple[int, int] | None:
        samples = self.samples.get(runtime) or []
        big = [s for s in samples if s[0] >= SAMPLE_MIN_ENTRY]
        small = [s for s in samples if s[0] < SAMPLE_MIN_ENTRY]
        if entry_bytes is not None and entry_bytes < SAMPLE_MIN_ENTRY and small:
            return _median([s[1] for s in small]), _median([s[2] for s in small])
        if not big or entry_bytes is None:
            return None
        return (int(_median([s[1] / s[0] for s in big]) * entry_bytes),
                int(_median([s[2] / s[0] for s in big]) * entry_bytes))

    def _split(self, first: FirstLoad, model_host: int, model_gpu: int, source: str) -> Split:
        mh = min(max(self.min_model_bytes, int(model_host)), max(0, first.raw_host))
        grown = {d: b for d, b in first.raw_gpu.items() if b > 0}
        mg: dict[str, int] = {}
        if grown and model_gpu > 0:  # the model's GPU bytes sit where the growth was largest
            d = max(grown, key=grown.get)
            mg[d] = min(int(model_gpu), grown[d])
        ig = {d: b - mg.get(d, 0) for d, b in grown.items() if b - mg.get(d, 0) > 0}
        return Split(max(0, first.raw_host - mh), ig, mh, mg, source, first.name, first.key)


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
