"""`modelshelf` command line: run | pull | prefetch | cache | drain | picker.

Every option of every subcommand can also be set by an environment variable named
MODELSHELF_<FLAG> (e.g. --cache-dir -> MODELSHELF_CACHE_DIR, --memory-multiplier ->
MODELSHELF_MEMORY_MULTIPLIER); a flag given on the command line wins. The value is read like
the flag's (same type and choices); a repeatable flag takes a list, one item per line, or
separated by commas or spaces on one line; a switch (store_true) takes 1/true/yes/on or
0/false/no/off. The mapping is generic (`_apply_env`): a flag added later gets its variable.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
TYPE_CHECKING = False  # not typing's: importing typing is ~2 ms of a CLI pull's start-up

if TYPE_CHECKING:
    from agent.settings import Settings

# `pull` and `cache` are dispatched before anything of the agent is imported (see main): a
# storage-initializer pull pays only for the interpreter, argparse and the puller.
_LIGHT = ("pull", "cache")

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


class _Formatter(argparse.HelpFormatter):
    """argparse's help layout, for the terminal's width as shutil.get_terminal_size gives it but
    without importing shutil: argparse's own formatter does for every argument added, and with it
    bz2 and lzma (~2.5 ms before a pull's first request)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
        if width is None:
            width = _columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)


def _columns() -> int:
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser (and its subcommands' parsers) laid out by _Formatter."""

    def __init__(self, *args, formatter_class: type = _Formatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def env_name(option: str) -> str:
    """The environment variable of a flag: --memory-multiplier -> MODELSHELF_MEMORY_MULTIPLIER."""
    return "MODELSHELF_" + option.lstrip("-").upper().replace("-", "_")


class _EnvValue(str):
    """A default that came from the environment: argparse converts it like a command-line value
    (only when the flag is absent), and a bad one is reported naming its variable."""

    variable = ""


def _env_typed(action: argparse.Action):
    convert = action.type or (lambda v: v)
    choices = action.choices

    def typed(value: str):
        try:
            out = convert(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            if not isinstance(value, _EnvValue):
                raise
            raise argparse.ArgumentTypeError(f"{value.variable}={value!r}: {e}") from None
        if isinstance(value, _EnvValue) and choices is not None and out not in choices:
            raise argparse.ArgumentTypeError(f"{value.variable}={value!r}: choose from {', '.join(map(str, choices))}")
        return out

    typed.__name__ = getattr(action.type, "__name__", "value")
    return typed


def _split_list(value: str) -> list[str]:
    """One item per line; or, on one line, items separated by commas or spaces."""
    items = value.splitlines() if "\n" in value else re.split(r"[,\s]+", value)
    return [item.strip() for item in items if item.strip()]


def _apply_env(parser: argparse.ArgumentParser) -> None:
    """Every option of `parser` and its subcommands reads MODELSHELF_<FLAG> as its default."""
    for action in parser._actions:  # argparse has no public accessor for actions
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                _apply_env(sub)
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        variable = env_name(longs[0])
        raw = os.environ.get(variable)
        if raw is None:
            continue
        action.required = False
        if isinstance(action, (argparse._StoreConstAction, argparse.BooleanOptionalAction)):
            word = raw.strip().lower()  # a switch: "true" means as if the flag were given
            if word not in _TRUE | _FALSE:
                parser.error(f"{variable}={raw!r}: expected 1/true/yes/on or 0/false/no/off")
            given = True if isinstance(action, argparse.BooleanOptionalAction) else action.const
            action.default = given if word in _TRUE else (not given if isinstance(given, bool) else action.default)
        elif isinstance(action, argparse._CountAction):
            try:
                action.default = int(raw)
            except ValueError:
                parser.error(f"{variable}={raw!r}: expected a count")
        elif isinstance(action, argparse._AppendAction):
            typed = _env_typed(action)
            try:
                action.default = [typed(_env_value(item, variable)) for item in _split_list(raw)]
            except argparse.ArgumentTypeError as e:
                parser.error(f"argument {longs[0]}: {e}")
        elif isinstance(action, argparse._StoreAction):
            action.type = _env_typed(action)
            action.default = _env_value(raw, variable)


def _env_value(raw: str, variable: str) -> _EnvValue:
    value = _EnvValue(raw)
    value.variable = variable
    return value


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
        from agent.settings import default_holder

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


def _server_processes(value: str) -> int:
    """A count of embedded server processes, 1 or more."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--server-processes {value!r} is not a count of server processes (1 or more)")
    return n


def _headroom(value: str) -> float:
    """A number of loads, 0 or more (0: no headroom)."""
    try:
        n = float(value)
    except ValueError:
        n = -1.0
    if not 0 <= n < float("inf"):
        raise argparse.ArgumentTypeError(f"--headroom {value!r} is not a number of loads (0 or more; 0 turns it off)")
    return n


def _malloc_keep(value: str) -> int:
    """Bytes, a quantity (0: none kept)."""
    from agent.quantity import parse_quantity

    try:
        return parse_quantity(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _half_life(value: str) -> float:
    """A number of requests, above 0."""
    try:
        n = float(value)
    except ValueError:
        n = 0.0
    if not 0 < n < float("inf"):
        raise argparse.ArgumentTypeError(f"--eviction-half-life {value!r} is not a number of requests (above 0)")
    return n


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-dir", type=Path, default=None, help="directory with models.yaml/models.json (a mounted ConfigMap)")
    p.add_argument("--cache-dir", type=Path, default=None, help="cache root: node-local disk or a shared RWX PVC")
    p.add_argument("--max-cache-bytes", default=None, help="disk budget of the cache (bytes or 50Gi); LRU entries without leases are removed past it")
    p.add_argument("--pvc-root", type=Path, default=None, help="where pvc://CLAIM/path resolves (default /mnt/pvc)")
    p.add_argument("--storage-config-dir", type=Path, default=None, help="one JSON file per storage key (KServe storage-config shape)")
    p.add_argument("--pull-concurrency", type=int, default=4, help="models pulled at a time")
    p.add_argument("--holder", default=None, help="cache lease holder id (default: $POD_NAME or host name)")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument("--log-level", default="info")
    p.add_argument("--max-config-bytes", default=str(16 * 2**20), help="size limit of the config file (bytes or 16Mi); past it the file is rejected and the last good config kept")
    p.add_argument("--max-config-depth", type=int, default=64, help="nesting levels of lists/mappings allowed in the config file")
    p.add_argument("--max-config-nodes", type=int, default=1_000_000, help="values allowed in the config file, each YAML alias use counted in full")


def _add_pull(sub: "argparse._SubParsersAction") -> None:
    pull = sub.add_parser("pull", help="pull one URI into DEST (storage-initializer drop-in)")
    pull.add_argument("uri")
    pull.add_argument("dest", type=Path)
    pull.add_argument("--cache-dir", type=Path, default=None, help="pull through this cache; DEST gets its own copies (reflink / copy_file_range where the file system allows)")
    pull.add_argument("--sha256", help="expected sha256 of the single file or archive")
    pull.add_argument("--storage-key", help="storage key in the storage-config dir")
    pull.add_argument("--storage-config-dir", type=Path, default=None)
    pull.add_argument("--header", action="append", default=[], metavar="NAME:VALUE", help="HTTP header (repeatable)")
    pull.add_argument("--pvc-root", type=Path, default=None)
    pull.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    pull.add_argument("--link", action="store_true", help="with --cache-dir: read-only hard links into the cache instead of copies (only for consumers that do not run as root: root ignores modes and would rewrite the shared entry)")


def _add_cache(sub: "argparse._SubParsersAction") -> None:
    cache = sub.add_parser("cache", help="inspect and maintain a cache root")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    for name, text in (("ls", "list entries"), ("gc", "remove LRU entries without leases past the budget"), ("verify", "re-check sizes and digests")):
        c = cache_sub.add_parser(name, help=text)
        c.add_argument("--cache-dir", type=Path, required=True)
        if name == "gc":
            c.add_argument("--max-cache-bytes", required=True, help="bytes or quantity (e.g. 50Gi)")
        if name in ("ls", "verify"):
            c.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "verify":
            c.add_argument("key", nargs="?", help="one entry (default: all)")


def build_parser() -> argparse.ArgumentParser:
    from agent.settings import DEFAULT_SERVER_MALLOC_KEEP, EVICTION_POLICIES

    parser = _Parser(prog="modelshelf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent (embedded MLServer by default)")
    _add_common(run)
    run.add_argument("--host", default="127.0.0.1", help="address of the public listener (data plane and probes)")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--server", choices=["mlserver", "triton"], default="mlserver")
    run.add_argument("--server-url", default=None, help="sidecar mode: URL of an external server; embedded when absent")
    run.add_argument("--server-repository", type=Path, default=None, help="repository dir the agent writes model entries into (shared with a sidecar server)")
    run.add_argument("--server-port", type=int, default=None, help="embedded server's HTTP port (default: a free one)")
    run.add_argument("--server-processes", type=_server_processes, default="1", help="embedded MLServer only: run this many server processes and place each model in exactly one of them (its own cores for loads and inference; memory: one interpreter and runtime import per process, each model once). Default 1")
    run.add_argument("--triton-bin", type=Path, default=None, help="tritonserver binary (default: found in .venv-triton)")
    run.add_argument("--server-malloc-keep", type=_malloc_keep, default=None, help="embedded MLServer: freed heap memory its allocator may keep resident between loads (bytes or quantity, e.g. 128Mi), so the next load reuses warm pages instead of faulting fresh ones; past it the server gives the free pages back (malloc_trim). Counted in the memory budget as a line of its own (/status: malloc_keep). With --server-processes N each process keeps its own, counted once it has loaded a model (a process holding nothing keeps none). 0: give them back after every load and unload (default %dMi per process, but all processes together at most 1/8 of the host budget)" % (DEFAULT_SERVER_MALLOC_KEEP // 2**20))
    run.add_argument("--server-pid-file", type=Path, default=None, help="sidecar mode: file holding the server's pid (needs a shared PID namespace), so its real memory (RSS, NVML per process) is measured")
    run.add_argument("--memory-tolerance", type=float, default=0.05, help="fraction by which real memory may exceed the budget before the agent evicts (default 0.05)")
    run.add_argument("--memory-pressure", type=float, default=0.90, help="fraction of the container's cgroup limit above which the agent evicts (default 0.90)")
    run.add_argument("--memory-cgroup", type=Path, default=None, help="cgroup directory whose memory.current/max/events/stat the agent reads (default: its own cgroup; e.g. the pod's, for a sidecar server)")
    run.add_argument("--host-memory", default=None, help="host memory budget: bytes, 8Gi, or 80%% of the cgroup limit/RAM")
    run.add_argument("--gpu-memory", default=None, help="GPU memory budget per device: bytes, 20Gi, or 90%%")
    run.add_argument("--memory-multiplier", action="append", default=[], metavar="RUNTIME=X", help="estimated cost = cache entry size x X for RUNTIME (repeatable)")
    run.add_argument("--min-residency", type=float, default=30.0, help="seconds a loaded model is safe from eviction for a lazy load")
    run.add_argument("--load-timeout", type=float, default=120.0, help="seconds a request waits for its model to load")
    run.add_argument("--request-timeout", type=float, default=60.0, help="seconds for one forwarded request")
    run.add_argument("--max-queue", type=int, default=256, help="requests waiting per model during a load; past it 503")
    run.add_argument("--max-body-bytes", default=str(64 * 2**20), help="request body limit (413 past it)")
    run.add_argument("--load-concurrency", type=int, default=2, help="models loaded at a time")
    run.add_argument("--idle-unload", type=float, default=0.0, help="seconds after which a model loaded on demand (not pinned, not preload) that no request used is unloaded (0, the default: only LRU eviction unloads); in a fleet, copies the picker stopped routing here")
    run.add_argument("--prefetch", choices=["all", "preload"], default="all", help="which models are pulled before a request asks: 'all' (default: one node serves every model, so its first requests only load) pulls every configured model at once; 'preload' (agents of a fleet: each downloads only what is placed on it) pulls preload and pinned models, a 'preload: false' model on its first request")
    run.add_argument("--resync-interval", type=float, default=60.0, help="seconds between full resyncs of config and server")
    run.add_argument("--shards", type=int, default=1, help="split the config across N replicas by hash of model name")
    run.add_argument("--shard-index", type=_shard_index, default="0", help="this replica's shard, or 'auto' (StatefulSet ordinal)")
    run.add_argument("--management-host", default=None, help="address of the management listener (/status, /metrics, page; default: --host)")
    run.add_argument("--management-port", type=int, default=8003, help="port of the management listener (/status, /metrics, page); equal to --port: one port serves everything")
    run.add_argument("--header-timeout", type=float, default=10.0, help="seconds a connection has to send a complete request head; then it is closed")
    run.add_argument("--keep-alive-timeout", type=float, default=75.0, help="seconds an idle keep-alive connection stays open")
    run.add_argument("--max-header-bytes", default="64Ki", help="request head (line + headers) limit; 431 past it")
    run.add_argument("--max-v1-body-bytes", default=str(4 * 2**20), help="V1 :predict body limit (413 past it); V1 JSON is parsed and translated by the agent")
    run.add_argument("--upstream-connections", type=int, default=256, help="requests in flight to the server, all models together")
    run.add_argument("--max-upstream-per-model", type=int, default=0, help="requests in flight to the server for one model (default 0: half of --upstream-connections); past it requests wait, within --request-timeout, then 503")
    run.add_argument("--drain-timeout", type=float, default=30.0, help="seconds an unload (config removal, update swap) waits for in-flight requests to finish")
    run.add_argument("--stream-body-bytes", default=str(2**20), help="request bodies with a Content-Length above this are forwarded to the server as they arrive, not buffered whole (--max-body-bytes still applies)")
    run.add_argument("--unload-overlap", type=float, default=0.05, help="a miss's load starts while its victims unload only if what the server holds by the ledger (the victims included) stays within the budget x (1 + this); else it waits for the unloads. Raise it (e.g. 0.3) where the container's limit has that much room above the budget: faster cold starts, real memory briefly above the budget (default 0.05)")
    run.add_argument("--eviction", choices=EVICTION_POLICIES, default="lru", help="the order idle models are evicted in when room is needed: lru (least recently used first) or lfu-decay (the model asked for least often first, counting each request to it as 1 that halves every --eviction-half-life requests to the agent; ties least recently used). Only the order changes: no lease, pinned, --min-residency, loading and --headroom rules apply either way (benchmarks/results/peers_lfu_order.md)")
    run.add_argument("--eviction-half-life", type=_half_life, default=100.0, help="lfu-decay: requests (to the whole agent) after which a model's request count has halved; ~5x the number of models that fit did best in benchmarks/bench_eviction_sim.py (default 100)")
    run.add_argument("--headroom", type=_headroom, default=8.0, help="the most loads of the median loaded model kept free while misses need room (from a miss that had to evict on its own path until 60 s after the last miss): as many as the misses need, the longest run of misses over the last 10 s that came while unloads were in flight (1 where each miss's refill ends before the next miss, up to this many under a miss storm); after each load, idle least-recently-used models are evicted in the background (never under a request, pinned or younger than --min-residency), so a miss on a full node loads at once instead of waiting for its victim's unload; never more than 10%% of a device's budget (whole loads). 0 turns it off (default 8: under a storm with a few misses in flight at once and each unload a round trip, fewer left most misses evicting on their path in benchmarks/results/coldstart.md)")
    run.add_argument("--fast-path", action=argparse.BooleanOptionalAction, default=True, help="answer plain infer requests (POST /v2/models/M/infer, a loaded model, a body of at most 64 KiB) from the connection's callbacks, without an ASGI task: same answers, less CPU per request; --no-fast-path sends every request through the ASGI router")
    run.add_argument("--grpc-port", type=_grpc_port, default="8001", help="KServe V2 gRPC port (0 or 'off' disables it)")
    run.add_argument("--grpc-host", default=None, help="address for the gRPC data plane (default: --host)")
    run.add_argument("--server-grpc-target", default=None, help="sidecar mode: the server's gRPC HOST:PORT (gRPC model calls answer UNAVAILABLE without it)")

    _add_pull(sub)

    prefetch = sub.add_parser("prefetch", help="pull every configured model into the cache, then exit (Job/CronJob)")
    _add_common(prefetch)

    picker = sub.add_parser("picker", help="the Endpoint Picker: Envoy ext_proc routing each request to an agent (past one node)")
    picker.add_argument("--listen", default="127.0.0.1:9002", help="HOST:PORT of the ext_proc gRPC server (and its gRPC health service)")
    picker.add_argument("--agent", action="append", default=[], metavar="HOST:HTTP_PORT=MANAGEMENT_URL", help="one agent: its data plane and its management URL (repeatable)")
    picker.add_argument("--agents-dns", default=None, metavar="NAME:HTTP_PORT", help="discover agents from a headless Service's A records, re-resolved every --dns-interval")
    picker.add_argument("--agent-management-port", type=int, default=8003, help="with --agents-dns: the agents' management port")
    picker.add_argument("--dns-interval", type=float, default=5.0, help="seconds between DNS resolutions")
    picker.add_argument("--poll-interval", type=float, default=0.25, help="seconds between two reads of an agent's /fleet/state")
    picker.add_argument("--poll-timeout", type=float, default=1.0, help="seconds a /fleet/state read may take; past it the agent gets no requests until it answers again")
    picker.add_argument("--long-poll", type=float, default=1.0, help="seconds an agent may hold a /fleet/state read until its state changes (?since=); 0: plain polling")
    picker.add_argument("--load-factor", type=float, default=1.25, help="bounded loads: no agent holds more than this x the mean number of models")
    picker.add_argument("--hot-rate", type=float, default=50.0, help="requests/s per copy above which a model gets another copy")
    picker.add_argument("--max-copies", type=int, default=4, help="copies of one hot model at most")
    picker.add_argument("--copy-hold", type=float, default=30.0, help="seconds a copy count holds before a copy is given back")
    picker.add_argument("--fallbacks", type=int, default=0, help="extra endpoints listed after the chosen one (ip:port,ip:port; for gateways that retry down the list; Envoy's ORIGINAL_DST wants 0)")
    picker.add_argument("--log-format", choices=["text", "json"], default="text")
    picker.add_argument("--log-level", default="info")
    drain = sub.add_parser("drain", help="preStop hook: the agent takes no new placements (not ready), keeps serving, and this waits until its traffic has moved")
    drain.add_argument("--management-url", default="http://127.0.0.1:8003", help="the agent's management listener")
    drain.add_argument("--wait", type=float, default=0.0, help="seconds to wait, at most, for the agent to go quiet (nothing in flight, no new request for --quiet seconds); 0: return at once")
    drain.add_argument("--quiet", type=float, default=2.0, help="seconds without a new request that count as quiet")

    _add_cache(sub)
    _apply_env(parser)
    return parser


def build_light_parser() -> argparse.ArgumentParser:
    """Only `pull` and `cache` (same flags, same MODELSHELF_* variables): what main parses when
    the command is one of them, so that nothing of the agent is imported for a pull."""
    parser = _Parser(prog="modelshelf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pull(sub)
    _add_cache(sub)
    _apply_env(parser)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings for `run` and `prefetch`. Raises SystemExit(2) with a message on bad values."""
    from agent.quantity import parse_quantity
    from agent.settings import DEFAULT_SERVER_MALLOC_KEEP, Settings, default_holder

    if args.config_dir is None or args.cache_dir is None:
        raise SystemExit(f"modelshelf {args.command}: --config-dir and --cache-dir are required (or MODELSHELF_CONFIG_DIR / MODELSHELF_CACHE_DIR)")
    s = Settings(config_dir=Path(args.config_dir), cache_dir=Path(args.cache_dir))
    s.max_cache_bytes = parse_quantity(args.max_cache_bytes) if args.max_cache_bytes else None
    s.pvc_root = args.pvc_root
    s.storage_config_dir = args.storage_config_dir
    s.pull_concurrency = args.pull_concurrency
    s.holder = args.holder or default_holder()
    s.log_format, s.log_level = args.log_format, args.log_level
    s.max_config_bytes = parse_quantity(args.max_config_bytes)
    s.max_config_depth, s.max_config_nodes = args.max_config_depth, args.max_config_nodes
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
        s.prefetch = args.prefetch
        s.idle_unload_s = args.idle_unload
        s.resync_interval_s = args.resync_interval
        s.shards = args.shards
        s.management_host, s.management_port = args.management_host, args.management_port
        s.header_timeout_s, s.keep_alive_timeout_s = args.header_timeout, args.keep_alive_timeout
        s.max_header_bytes = parse_quantity(args.max_header_bytes)
        s.shard_index = args.shard_index if isinstance(args.shard_index, int) else _shard_index(args.shard_index)
        s.max_v1_body_bytes = parse_quantity(args.max_v1_body_bytes)
        s.upstream_connections = args.upstream_connections
        s.max_upstream_per_model = args.max_upstream_per_model
        s.stream_body_bytes = parse_quantity(args.stream_body_bytes)
        s.fast_path = args.fast_path
        s.unload_overlap = args.unload_overlap
        s.headroom = args.headroom
        s.eviction, s.eviction_half_life = args.eviction, args.eviction_half_life
        s.grpc_port = args.grpc_port if isinstance(args.grpc_port, int) else _grpc_port(args.grpc_port)
        s.grpc_host, s.server_grpc_target = args.grpc_host, args.server_grpc_target
        s.server_pid_file = args.server_pid_file
        s.memory_tolerance, s.memory_pressure = args.memory_tolerance, args.memory_pressure
        s.memory_cgroup = args.memory_cgroup
        if not 0 <= s.shard_index < s.shards:
            raise SystemExit(f"modelshelf run: --shard-index {s.shard_index} is outside 0..{s.shards - 1}")
        s.drain_timeout_s = args.drain_timeout
        s.server_processes = args.server_processes if isinstance(args.server_processes, int) else _server_processes(args.server_processes)
        if s.server_processes > 1 and (s.server_url or s.server != "mlserver"):
            which = "--server-url (a sidecar server)" if s.server_url else f"--server {s.server}"
            raise SystemExit(f"modelshelf run: --server-processes {s.server_processes} needs the embedded MLServer; "
                             f"it cannot be combined with {which}")
        if args.server_malloc_keep is None:  # the default: bounded by the budget (agent.memory.budget)
            from agent.memory.budget import default_malloc_keep

            # each server process keeps its own reserve: together at most the default's share of the budget
            n = s.server_processes
            s.server_malloc_keep = default_malloc_keep(s.host_memory, DEFAULT_SERVER_MALLOC_KEEP * n) // n
        else:
            s.server_malloc_keep = args.server_malloc_keep
    return s


def picker_settings_from_args(args: argparse.Namespace):
    """Settings for `picker`. Raises SystemExit(2) naming the bad value."""
    from agent.picker.agents import parse_agent
    from agent.picker.service import PickerSettings

    try:
        agents = [parse_agent(a) for a in args.agent]
    except ValueError as e:
        raise SystemExit(f"modelshelf picker: {e}") from None
    dns = None
    if args.agents_dns:
        name, _, port = args.agents_dns.rpartition(":")
        if not name or not port.isdigit():
            raise SystemExit(f"modelshelf picker: --agents-dns wants NAME:HTTP_PORT, got {args.agents_dns!r}")
        dns = (name, int(port))
    if not agents and dns is None:
        raise SystemExit("modelshelf picker: give the agents: --agent HOST:HTTP_PORT=MANAGEMENT_URL (repeatable) or --agents-dns NAME:HTTP_PORT")
    if args.load_factor < 1.0:
        raise SystemExit(f"modelshelf picker: --load-factor must be >= 1 (got {args.load_factor})")
    return PickerSettings(listen=args.listen, agents=agents, agents_dns=dns, agent_management_port=args.agent_management_port,
                          poll_interval=args.poll_interval, poll_timeout=args.poll_timeout, dns_interval=args.dns_interval,
                          long_poll=args.long_poll,
                          load_factor=args.load_factor, hot_rate=args.hot_rate, max_copies=args.max_copies,
                          copy_hold=args.copy_hold, fallbacks=args.fallbacks, log_format=args.log_format, log_level=args.log_level)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    light = bool(argv) and argv[0] in _LIGHT
    args = (build_light_parser() if light else build_parser()).parse_args(argv)
    if args.command == "drain":
        from agent.fleet import drain_main

        return drain_main(args.management_url, args.wait, args.quiet)
    if args.command in ("pull", "cache"):
        from puller import cli as puller_cli

        return puller_cli.main(args)
    if args.command == "picker":
        from agent.picker.service import run as run_picker

        return run_picker(picker_settings_from_args(args))
    settings = settings_from_args(args)
    if args.command == "prefetch":
        from agent.prefetch import prefetch

        return prefetch(settings)
    from agent.app import run
    from agent.runtimes.mlserver import MALLOC_KEEP_ENV

    # the embedded MLServer's adapter finds the keep in the environment it starts the server with
    # (MLServerAdapter.malloc_keep), normalized to bytes; the variable is the flag's own
    os.environ[MALLOC_KEEP_ENV] = str(settings.server_malloc_keep)
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
