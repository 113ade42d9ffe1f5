"""`modelshelf` command line: run | pull | prefetch | cache.

Every `run`/`prefetch` flag can also be set by an environment variable named
MODELSHELF_<FLAG> (e.g. --cache-dir -> MODELSHELF_CACHE_DIR); the flag wins.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from agent.settings import Settings, default_holder


def _env(flag: str, default=None):
    return os.environ.get("MODELSHELF_" + flag.upper().replace("-", "_"), default)


def _multipliers(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        runtime, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[runtime.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--memory-multiplier wants RUNTIME=FLOAT, got {item!r}") from None
    return out


def _shard_index(value: str) -> int:
    """An integer, or "auto": the ordinal at the end of a StatefulSet pod's host name."""
    if value == "auto":
        name = os.environ.get("POD_NAME") or default_holder()
        ordinal = name.rsplit("-", 1)[-1]
        if not ordinal.isdigit():
            raise argparse.ArgumentTypeError(f"--shard-index auto: host name {name!r} has no StatefulSet ordinal")
        return int(ordinal)
    return int(value)


def _grpc_port(value: str) -> int:
    """A port number, or 0 / "off" (no gRPC data plane)."""
    if value.strip().lower() in ("off", "0", ""):
        return 0
    port = int(value)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"--grpc-port {value!r} is not a port (1-65535, or 0/off)")
    return port


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-dir", type=Path, default=_env("config-dir"), help="directory with models.yaml/models.json (a mounted ConfigMap)")
    p.add_argument("--cache-dir", type=Path, default=_env("cache-dir"), help="cache root: node-local disk or a shared RWX PVC")
    p.add_argument("--max-cache-bytes", default=_env("max-cache-bytes"), help="disk budget of the cache (bytes or 50Gi); LRU entries without leases are removed past it")
    p.add_argument("--pvc-root", type=Path, default=_env("pvc-root"), help="where pvc://CLAIM/path resolves (default /mnt/pvc)")
    p.add_argument("--storage-config-dir", type=Path, default=_env("storage-config-dir"), help="one JSON file per storage key (KServe storage-config shape)")
    p.add_argument("--pull-concurrency", type=int, default=int(_env("pull-concurrency", 4)), help="models pulled at a time")
    p.add_argument("--holder", default=_env("holder", None), help="cache lease holder id (default: $POD_NAME or host name)")
    p.add_argument("--log-format", choices=["text", "json"], default=_env("log-format", "text"))
    p.add_argument("--log-level", default=_env("log-level", "info"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelshelf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent (embedded MLServer by default)")
    _add_common(run)
    run.add_argument("--host", default=_env("host", "127.0.0.1"), help="address for the data plane and management API")
    run.add_argument("--port", type=int, default=int(_env("port", 8000)))
    run.add_argument("--server", choices=["mlserver", "triton"], default=_env("server", "mlserver"))
    run.add_argument("--server-url", default=_env("server-url"), help="sidecar mode: URL of an external server; embedded when absent")
    run.add_argument("--server-repository", type=Path, default=_env("server-repository"), help="repository dir the agent writes model entries into (shared with a sidecar server)")
    run.add_argument("--server-port", type=int, default=_env("server-port"), help="embedded server's HTTP port (default: a free one)")
    run.add_argument("--triton-bin", type=Path, default=_env("triton-bin"), help="tritonserver binary (default: found in .venv-triton)")
    run.add_argument("--host-memory", default=_env("host-memory"), help="host memory budget: bytes, 8Gi, or 80%% of the cgroup limit/RAM")
    run.add_argument("--gpu-memory", default=_env("gpu-memory"), help="GPU memory budget per device: bytes, 20Gi, or 90%%")
    run.add_argument("--memory-multiplier", action="append", default=[], metavar="RUNTIME=X", help="estimated cost = cache entry size x X for RUNTIME (repeatable)")
    run.add_argument("--min-residency", type=float, default=float(_env("min-residency", 30)), help="seconds a loaded model is safe from eviction for a lazy load")
    run.add_argument("--load-timeout", type=float, default=float(_env("load-timeout", 120)), help="seconds a request waits for its model to load")
    run.add_argument("--request-timeout", type=float, default=float(_env("request-timeout", 60)), help="seconds for one forwarded request")
    run.add_argument("--max-queue", type=int, default=int(_env("max-queue", 256)), help="requests waiting per model during a load; past it 503")
    run.add_argument("--max-body-bytes", default=_env("max-body-bytes", str(64 * 2**20)), help="request body limit (413 past it)")
    run.add_argument("--load-concurrency", type=int, default=int(_env("load-concurrency", 2)), help="models loaded at a time")
    run.add_argument("--resync-interval", type=float, default=float(_env("resync-interval", 60)), help="seconds between full resyncs of config and server")
    run.add_argument("--shards", type=int, default=int(_env("shards", 1)), help="split the config across N replicas by hash of model name")
    run.add_argument("--shard-index", type=_shard_index, default=_env("shard-index", "0"), help="this replica's shard, or 'auto' (StatefulSet ordinal)")
    run.add_argument("--grpc-port", type=_grpc_port, default=_env("grpc-port", "8001"), help="KServe V2 gRPC port (0 or 'off' disables it)")
    run.add_argument("--grpc-host", default=_env("grpc-host"), help="address for the gRPC data plane (default: --host)")
    run.add_argument("--server-grpc-target", default=_env("server-grpc-target"), help="sidecar mode: the server's gRPC HOST:PORT (gRPC model calls answer UNAVAILABLE without it)")

    pull = sub.add_parser("pull", help="pull one URI into DEST (storage-initializer drop-in)")
    pull.add_argument("uri")
    pull.add_argument("dest", type=Path)
    pull.add_argument("--cache-dir", type=Path, default=_env("cache-dir"), help="link files from this cache instead of copying")
    pull.add_argument("--sha256", help="expected sha256 of the single file or archive")
    pull.add_argument("--storage-key", help="storage key in the storage-config dir")
    pull.add_argument("--storage-config-dir", type=Path, default=_env("storage-config-dir"))
    pull.add_argument("--header", action="append", default=[], metavar="NAME:VALUE", help="HTTP header (repeatable)")
    pull.add_argument("--pvc-root", type=Path, default=_env("pvc-root"))
    pull.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")

    prefetch = sub.add_parser("prefetch", help="pull every configured model into the cache, then exit (Job/CronJob)")
    _add_common(prefetch)

    cache = sub.add_parser("cache", help="inspect and maintain a cache root")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    for name, text in (("ls", "list entries"), ("gc", "remove LRU entries without leases past the budget"), ("verify", "re-check sizes and digests")):
        c = cache_sub.add_parser(name, help=text)
        c.add_argument("--cache-dir", type=Path, default=_env("cache-dir"), required=_env("cache-dir") is None)
        if name == "gc":
            c.add_argument("--max-cache-bytes", required=True, help="bytes or quantity (e.g. 50Gi)")
        if name in ("ls", "verify"):
            c.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "verify":
            c.add_argument("key", nargs="?", help="one entry (default: all)")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings for `run` and `prefetch`. Raises SystemExit(2) with a message on bad values."""
    from agent.quantity import parse_quantity

    if args.config_dir is None or args.cache_dir is None:
        raise SystemExit(f"modelshelf {args.command}: --config-dir and --cache-dir are required (or MODELSHELF_CONFIG_DIR / MODELSHELF_CACHE_DIR)")
    s = Settings(config_dir=Path(args.config_dir), cache_dir=Path(args.cache_dir))
    s.max_cache_bytes = parse_quantity(args.max_cache_bytes) if args.max_cache_bytes else None
    s.pvc_root = args.pvc_root
    s.storage_config_dir = args.storage_config_dir
    s.pull_concurrency = args.pull_concurrency
    s.holder = args.holder or default_holder()
    s.log_format, s.log_level = args.log_format, args.log_level
    if args.command == "run":
        s.host, s.port = args.host, args.port
        s.server, s.server_url = args.server, args.server_url
        s.server_repository = args.server_repository
        s.server_port = int(args.server_port) if args.server_port else None
        s.triton_bin = args.triton_bin
        s.host_memory, s.gpu_memory = args.host_memory, args.gpu_memory
        s.memory_multipliers = _multipliers(args.memory_multiplier)
        s.min_residency_s = args.min_residency
        s.load_timeout_s, s.request_timeout_s = args.load_timeout, args.request_timeout
        s.max_queue = args.max_queue
        s.max_body_bytes = parse_quantity(args.max_body_bytes)
        s.load_concurrency = args.load_concurrency
        s.resync_interval_s = args.resync_interval
        s.shards = args.shards
        s.shard_index = args.shard_index if isinstance(args.shard_index, int) else _shard_index(args.shard_index)
        s.grpc_port = args.grpc_port if isinstance(args.grpc_port, int) else _grpc_port(args.grpc_port)
        s.grpc_host, s.server_grpc_target = args.grpc_host, args.server_grpc_target
        if not 0 <= s.shard_index < s.shards:
            raise SystemExit(f"modelshelf run: --shard-index {s.shard_index} is outside 0..{s.shards - 1}")
    return s


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("pull", "cache"):
        from puller import cli as puller_cli

        return puller_cli.main(args)
    settings = settings_from_args(args)
    if args.command == "prefetch":
        from agent.prefetch import prefetch

        return prefetch(settings)
    from agent.app import run

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
