"""Runtime adapters: one per co-located server. Nothing outside this package knows which runs."""
from agent.runtimes.base import (
    LoadFailed,
    ModelNotFound,
    Probe,
    RuntimeAdapter,
    RuntimeErrorBase,
    ServedModel,
    ServerUnavailable,
)

__all__ = [
    "LoadFailed",
    "ModelNotFound",
    "Probe",
    "RuntimeAdapter",
    "RuntimeErrorBase",
    "ServedModel",
    "ServerUnavailable",
    "make_adapter",
]


def make_adapter(kind: str, **kwargs) -> RuntimeAdapter:
    """`kind` is "mlserver" or "triton"; kwargs go to the adapter's constructor."""
    if kind == "mlserver":
        from agent.runtimes.mlserver import MLServerAdapter

        return MLServerAdapter(**kwargs)
    if kind == "triton":
        from agent.runtimes.triton import TritonAdapter

        return TritonAdapter(**kwargs)
    raise ValueError(f"unknown server kind {kind!r} (expected 'mlserver' or 'triton')")
