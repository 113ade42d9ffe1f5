"""Typed settings of the agent: one dataclass, defaults in one place, built from the CLI
(`agent.cli`), where every flag also reads a MODELSHELF_* environment variable."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.config import ModelSpec
    from puller import PullOptions


def default_holder() -> str:
    """Who holds cache leases: the pod name in Kubernetes, else the host name."""
    return os.environ.get("POD_NAME") or socket.gethostname()


@dataclass
class Settings:
    config_dir: Path
    cache_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    server: str = "mlserver"  # mlserver | triton
    server_url: str | None = None  # sidecar mode: an external server; None -> embedded
    server_repository: Path | None = None  # repository dir the adapter owns (default: <cache>/.repository/<holder>)
    server_port: int | None = None  # embedded server's HTTP port (None: a free one)
    triton_bin: Path | None = None  # tritonserver binary (default: discovered in .venv-triton)
    max_cache_bytes: int | None = None
    host_memory: str | None = None  # bytes, quantity or "N%" of the cgroup limit / RAM
    gpu_memory: str | None = None  # bytes, quantity or "N%" of each GPU
    memory_multipliers: dict[str, float] = field(default_factory=dict)  # runtime -> x entry size
    min_residency_s: float = 30.0
    load_timeout_s: float = 120.0
    request_timeout_s: float = 60.0
    max_queue: int = 256  # waiting requests per model during a lazy load
    max_body_bytes: int = 64 * 2**20
    pull_concurrency: int = 4
    load_concurrency: int = 2
    resync_interval_s: float = 60.0
    pvc_root: Path | None = None
    storage_config_dir: Path | None = None
    holder: str = field(default_factory=default_holder)
    shards: int = 1  # config sharding across StatefulSet replicas
    shard_index: int = 0
    log_format: str = "text"  # text | json
    log_level: str = "info"
    grpc_port: int = 8001  # KServe V2 gRPC data plane; 0 turns it off
    grpc_host: str | None = None  # default: `host`
    server_grpc_target: str | None = None  # sidecar: the server's gRPC HOST:PORT (embedded: known)

    def pull_options(self, spec: "ModelSpec") -> "PullOptions":
        """How the puller reaches one model's storage: its own sha256 and storage key, the
        node's storage-config dir and PVC root (the environment's defaults otherwise)."""
        from puller import PullOptions

        options = PullOptions(sha256=spec.sha256, storage_key=spec.storage_key)
        if self.storage_config_dir:
            options.storage_config_dir = self.storage_config_dir
        if self.pvc_root:
            options.pvc_root = self.pvc_root
        return options
