"""The contract every co-located server adapter fulfils.

The adapter owns the server's repository directory: it writes one entry per served model that
points into the cache, then drives the KServe V2 repository API (index/load/unload). Server
quirks (404 vs 500 for a missing model, Triton's asynchronous unload, MLServer's index body)
stay inside the adapter; callers see only the methods and errors below.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping


class RuntimeErrorBase(Exception):
    """Base of adapter errors. `reason` is short text meant for status pages."""

    def __init__(self, model: str | None, reason: str):
        super().__init__(f"{model}: {reason}" if model else reason)
        self.model = model
        self.reason = reason


class ModelNotFound(RuntimeErrorBase):
    """The server does not know the model (MLServer 404, Triton 500 'failed to stat'...)."""


class LoadFailed(RuntimeErrorBase):
    """The server tried and failed to load the model; `reason` carries the server's message."""


class ServerUnavailable(RuntimeErrorBase):
    """The server did not answer (down, restarting, timeout)."""


@dataclass(frozen=True)
class ServedModel:
    """What an adapter needs to serve one model."""

    name: str  # the served name (unique, path-safe)
    path: Path  # directory with the model's files (a cache entry or a local dir used in place)
    runtime: str  # sklearn | xgboost | lightgbm | mlserver | triton | onnx | python ...
    implementation: str | None = None  # MLServer implementation class when runtime == "mlserver"
    version: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # passed to the server as is


@dataclass(frozen=True)
class Probe:
    """One readiness probe of one server process (`RuntimeAdapter.probe`)."""

    state: str  # "up" (ready), "busy" (alive but not ready: answered otherwise, or not in time), "down" (nothing listens)
    # a "busy" this server may well answer while these loads/unloads are in flight on it (its
    # quirk, said by its adapter: MLServer loads on its event loop): names, oldest first
    busy_with: tuple[str, ...] = ()
    busy_for: float = 0.0  # seconds the oldest of them has been in flight

    @property
    def excused(self) -> bool:
        """Busy because of a load or unload in flight: not counted toward "not ready" (agent/health.py)."""
        return self.state == "busy" and bool(self.busy_with)


class RuntimeAdapter(abc.ABC):
    """One co-located server. All methods are coroutines safe to call concurrently for
    different models. The reconciler calls load/unload for one model under that model's lock
    (one corner aside: the start-up orphan cleanup's unload of a name configured just after it
    began); an adapter that owns a repository dir (common.HTTPServerAdapter) applies overlapping
    loads and unloads of one name one at a time, in call order, so its dir and server agree."""

    kind: str  # "mlserver" | "triton"
    grpc_target: str | None = None  # HOST:PORT of the server's gRPC data plane, when known
    # name -> host bytes the memory ledger reserves for it (the agent wires it); placement
    # between several server processes weighs it (agent/runtimes/shards.py), others ignore it
    reserved: Callable[[], Mapping[str, int]] = dict

    @property
    @abc.abstractmethod
    def base_url(self) -> str:
        """HTTP base URL of the server's data plane (e.g. http://127.0.0.1:8080)."""

    @abc.abstractmethod
    async def wait_ready(self, timeout: float) -> None:
        """Return when the server answers /v2/health/ready; raise ServerUnavailable after timeout."""

    @abc.abstractmethod
    async def is_ready(self) -> bool:
        """One cheap readiness probe of the server; never raises."""

    @abc.abstractmethod
    async def index(self) -> dict[str, str]:
        """Models the server knows -> state ("READY", "UNAVAILABLE", "LOADING", ...)."""

    @abc.abstractmethod
    async def load(self, model: ServedModel) -> float | None:
        """Write the model's repository entry and load it. Loading a name that is already
        loaded replaces it in place: the old copy serves until the new one is ready.
        Raises LoadFailed (with the server's reason; before any server call when `model.path`
        does not exist: the reconciler relies on it for in-place entries) or ServerUnavailable. Returns the seconds
        the server's own load call took (the rest of the call is the adapter's file work: the
        agent's cold-start breakdown tells them apart), or None when the adapter cannot tell."""

    @abc.abstractmethod
    async def unload(self, name: str) -> None:
        """Unload and wait until the server no longer serves it, then remove the repository
        entry. Unloading an unknown model is not an error."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release client connections (does not stop the server)."""

    def server_pid(self) -> int | tuple[int, ...] | None:
        """What the memory ledger tracks: the embedded server's pid (None: not up, or a sidecar,
        whose pid comes from --server-pid-file); several server processes: a tuple of those up."""
        process = getattr(self, "process", None)
        return process.pid if process is not None else None

    async def probe(self) -> list[Probe]:
        """One readiness probe of each server process (one for one server); never raises. This
        default knows no busy server: anything but ready is "down"."""
        return [Probe("up" if await self.is_ready() else "down")]

    def ready_now(self) -> bool:
        """The embedded server's process is up and was seen ready (no I/O; True for a server
        the agent did not start: its readiness is probed, `is_ready`)."""
        process = getattr(self, "process", None)
        return process is None or process.ready

    def status_doc(self) -> dict[str, Any]:
        """Fields the adapter adds to /status `server` ({}: none)."""
        return {}

    def ports_taken(self) -> bool:
        """Whether another process now holds a port this adapter's embedded server was to
        listen on (a failed start's cause: agent.app.start_embedded); False for a server the
        agent did not start."""
        return False

    def repository_entries(self) -> set[str]:
        """Names that have an entry in the repository dir the adapter owns."""
        return set()

    def allocator_reserve(self, process: int | None = None) -> int | None:
        """Freed bytes the server's allocator keeps resident for later loads, as the server
        last reported them (the embedded MLServer's --server-malloc-keep reserve); None when the
        server reports none. The ledger subtracts its change from a load's measured growth.
        ``process``: with several server processes, that one's (None: all together).
        Reads a small file: call off the event loop."""
        return None

    def served_path(self, name: str) -> Path | None:
        """The cache path the repository entry of `name` points at, if the adapter can tell.
        Restart recovery adopts a READY model without reloading only when this matches the
        model's current cache entry; None means "unknown", and the model is reloaded."""
        return None
