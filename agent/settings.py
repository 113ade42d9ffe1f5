"""Typed settings of the agent: one dataclass, defaults in one place, built from the CLI
(`agent.cli`), where every flag also reads a MODELSHELF_* environment variable."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.config import ConfigLimits, ModelSpec
    from puller import PullOptions


EVICTION_POLICIES = ("lru", "lfu-decay")
# --server-malloc-keep: free heap bytes the embedded MLServer's allocator keeps resident between
# loads (agent/runtimes/mlserver_repository.py), a declared line of the ledger
DEFAULT_SERVER_MALLOC_KEEP = 128 * 2**20  # --eviction (agent.memory.planner.eviction_order)


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
    server_processes: int = 1  # embedded MLServer: this many processes, models partitioned (agent/runtimes/shards.py)
    triton_bin: Path | None = None  # tritonserver binary (default: discovered in .venv-triton)
    server_malloc_keep: int = DEFAULT_SERVER_MALLOC_KEEP  # embedded MLServer: freed heap bytes kept resident (0: trim after every load/unload)
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
    idle_unload_s: float = 0.0  # models loaded on demand and unused this long are unloaded (0: only LRU)
    prefetch: str = "all"  # all | preload: which models are pulled before a request asks (see Reconciler._pull_now)
    load_concurrency: int = 2
    resync_interval_s: float = 60.0
    pvc_root: Path | None = None
    storage_config_dir: Path | None = None
    holder: str = field(default_factory=default_holder)
    shards: int = 1  # config sharding across StatefulSet replicas
    shard_index: int = 0
    log_format: str = "text"  # text | json
    log_level: str = "info"
    max_v1_body_bytes: int = 4 * 2**20  # V1 bodies are parsed and translated: their own, smaller limit
    upstream_connections: int = 256  # requests in flight to the co-located server, all models
    max_upstream_per_model: int = 0  # of those, for one model (0: half of upstream_connections)
    management_host: str | None = None  # None: the same address as `host`
    management_port: int | None = 8003  # None or == port (same host): one port serves everything
    header_timeout_s: float = 10.0  # a request head (line + headers) must arrive within this
    keep_alive_timeout_s: float = 75.0  # an idle keep-alive connection is closed after this
    max_header_bytes: int = 64 * 1024  # a larger request head (line + headers) is answered 431
    max_config_bytes: int = 16 * 2**20  # a config file past it is rejected (last good config kept)
    max_config_depth: int = 64  # nesting levels of lists/mappings in a config file
    max_config_nodes: int = 1_000_000  # values in a config file, YAML aliases counted at each use
    drain_timeout_s: float = 30.0  # an unload waits this long for in-flight requests to finish
    retry_base_s: float = 1.0  # first retry delay of a failed model (doubles per failure, jittered)
    stream_body_bytes: int = 2**20  # request bodies with a Content-Length above this are forwarded as they arrive
    fast_path: bool = True  # plain infer requests for loaded models answered without an ASGI task (agent.router)
    grpc_port: int = 8001  # KServe V2 gRPC data plane; 0 turns it off
    grpc_host: str | None = None  # default: `host`
    server_grpc_target: str | None = None  # sidecar: the server's gRPC HOST:PORT (embedded: known)
    server_pid_file: Path | None = None  # sidecar: a file holding the server's pid (shared PID namespace) for memory
    memory_tolerance: float = 0.05  # reality may exceed the budget by this fraction before it is excess
    unload_overlap: float = 0.05  # a load may start while its victims unload only if held <= budget x (1 + this)
    eviction: str = "lru"  # lru | lfu-decay: the order idle models are evicted in (agent.memory.planner.eviction_order)
    eviction_half_life: float = 100.0  # lfu-decay: a model's request count halves every this many requests to the agent
    headroom: float = 8.0  # at most this many loads of the median loaded size kept free, as misses need (0: off; see Reconciler._keep_headroom)
    memory_pressure: float = 0.90  # cgroup working set above this fraction of its limit is excess
    memory_cgroup: Path | None = None  # the cgroup dir whose memory.* files are read (default: the agent's own)
    reality_interval_s: float = 2.0  # how often real memory is checked against the budget (and after each load)

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

    def config_limits(self) -> "ConfigLimits":
        """What one config file may cost to read (--max-config-bytes/-depth/-nodes)."""
        from agent.config import ConfigLimits

        return ConfigLimits(max_bytes=self.max_config_bytes, max_depth=self.max_config_depth,
                            max_nodes=self.max_config_nodes)
