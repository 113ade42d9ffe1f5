"""Costs: bytes a model takes per device, how that figure was obtained, and byte formatting.

Devices are named ``"host"`` and ``"gpu:N"`` (N = NVML device index). Amounts are bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

HOST = "host"
METHODS = ("declared", "estimated", "measured")

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

# What a server process grows by when it imports a runtime for its first model, per server kind
# (the ledger's ``profile``) and runtime, charged to the server from the moment that first load
# starts until the load measures the real figure. Measured, not guessed: MLServer 1.7.1 with
# mlserver-sklearn 1.7.1 and scikit-learn 1.9 grew by 80-85 MiB on the first sklearn model
# (benchmarks/results/density_real.md, tests/memory/test_attribution.py). Runtimes not listed
# are learnt from their first load only.
DEFAULT_IMPORTS: dict[str, dict[str, int]] = {
    "mlserver": {"sklearn": 80 * 2**20},
}


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
    entry_bytes: int | None = field(default=None, compare=False)  # the cache entry's size, when known
    measured_host: int | None = field(default=None, compare=False)  # what a measurement found (status)
    measured_gpu: int | None = field(default=None, compare=False)  # total over devices

    @property
    def under_declared(self) -> bool:
        """A measurement found more than the user declared (the reservation follows it)."""
        return ((self.declared_host is not None and self.measured_host is not None and self.measured_host > self.declared_host)
                or (self.declared_gpu is not None and self.measured_gpu is not None and self.measured_gpu > self.declared_gpu))

    def doc(self) -> dict:
        """The cost for /status: what is reserved and, side by side, what was declared and measured."""
        out: dict = {"host": self.host, "gpu": dict(self.gpu), "method": self.method,
                     "declared": {"host": self.declared_host, "gpu": self.declared_gpu},
                     "measured": {"host": self.measured_host, "gpu": self.measured_gpu}}
        if self.under_declared:
            figures = [f"{what} measured {format_bytes(m)}, declared {format_bytes(d)}"
                       for what, m, d in (("host", self.measured_host, self.declared_host), ("gpu", self.measured_gpu, self.declared_gpu))
                       if m is not None and d is not None and m > d]
            out["note"] = f"measured above its declaration ({'; '.join(figures)}): the measurement is reserved"
        return out

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


def combine(host_src: str, gpu_src: str | None) -> str:
    """One method for a cost: "measured" if any part was measured, else "declared" if any part
    was declared, else "estimated"."""
    srcs = {host_src} | ({gpu_src} if gpu_src else set())
    for m in ("measured", "declared"):
        if m in srcs:
            return m
    return "estimated"


def dev_index(dev: str) -> int:
    try:
        return int(dev.split(":", 1)[1])
    except (IndexError, ValueError):
        return 1 << 30
