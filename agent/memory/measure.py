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


@dataclass
class Measurement:
    """An open measurement window for one model's load (``start_measure`` ... ``finish_measure``)."""

    name: str
    before: Snapshot
    started: float
    runtime: str | None = None
    first_of_runtime: bool = False  # the server imports the runtime's libraries during this load
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


