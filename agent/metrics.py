"""Prometheus metrics of one agent (its own registry, so several agents can live in one
process, as they do in tests). Names are `modelshelf_*`; deploy/ dashboards use them."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# cold-start phases are sub-millisecond to seconds: finer at the low end
_PHASE = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.models = Gauge("modelshelf_models", "Configured models by state", ["state"], registry=r)
        self.pulls = Counter("modelshelf_pulls_total", "Pulls by result (hit, downloaded, error)", ["result"], registry=r)
        self.pull_seconds = Histogram("modelshelf_pull_seconds", "Time to make a model's files available", buckets=_LATENCY, registry=r)
        self.loads = Counter("modelshelf_loads_total", "Loads by result (ok, error, nofit)", ["result"], registry=r)
        self.load_seconds = Histogram("modelshelf_load_seconds", "Server load latency", buckets=_LATENCY, registry=r)
        self.unloads = Counter("modelshelf_unloads_total", "Unloads by reason (removed, evicted, replaced)", ["reason"], registry=r)
        self.unload_seconds = Histogram("modelshelf_unload_seconds", "Server unload latency", buckets=_LATENCY, registry=r)
        self.evictions = Counter("modelshelf_evictions_total", "Models evicted to make room", registry=r)
        self.cold_start_seconds = Histogram("modelshelf_cold_start_seconds", "Wait of a request for its model to load", buckets=_LATENCY, registry=r)
        self.cold_start_phase_seconds = Histogram(
            "modelshelf_cold_start_phase_seconds",
            "Where each lazy load's time went: queue (model lock, memory, load slot), unload (victims' unloads "
            "waited for), server (the server's load call), measure (memory snapshots), agent (the rest)",
            ["phase"], buckets=_PHASE, registry=r)
        self.cold_start_unload_wait_seconds = Histogram(
            "modelshelf_cold_start_unload_wait_seconds",
            "A lazy load's wait for unloads, by the rule that made it wait: victim_* (its own victims) or "
            "in_flight_* (others' unloads, e.g. the headroom's); *_measured (its memory window must not see "
            "them), *_gpu (a victim holds GPU memory), *_overlap (the server could not hold them beside it: "
            "held over budget x (1 + --unload-overlap))",
            ["rule"], buckets=_PHASE, registry=r)
        self.lookups = Counter("modelshelf_loaded_lookups_total", "Requests finding their model loaded (hit) or not (miss)", ["result"], registry=r)
        self.requests = Counter("modelshelf_requests_total", "Data-plane requests by model and status code", ["model", "code"], registry=r)
        self.inflight = Gauge("modelshelf_inflight_requests", "Requests in flight per model", ["model"], registry=r)
        self.cache_bytes = Gauge("modelshelf_cache_bytes", "Bytes in the cache root", registry=r)
        self.memory_used = Gauge("modelshelf_memory_used_bytes", "Reserved model memory per device", ["device"], registry=r)
        self.memory_budget = Gauge("modelshelf_memory_budget_bytes", "Model memory budget per device", ["device"], registry=r)
        self.headroom = Gauge("modelshelf_headroom_bytes", "Free memory the headroom keeps now per device (--headroom: as many loads as misses need; 0 without pressure)", ["device"], registry=r)
        self.config_errors = Counter("modelshelf_config_errors_total", "Rejected config files and entries", ["kind"], registry=r)
        self.config_applied = Gauge("modelshelf_config_applied_timestamp_seconds", "When the last good config was applied", registry=r)
        self.server_restarts = Counter("modelshelf_server_restarts_total", "Co-located server restarts seen, by reason "
                                       "(oom_killed, killed, signal, exited, unknown)", ["reason"], registry=r)
        self.memory_held = Gauge("modelshelf_memory_held_bytes", "Model memory the server still holds by the ledger (used + unloading)", ["device"], registry=r)
        self.memory_real = Gauge("modelshelf_memory_real_bytes", "Real memory of the server's models per device (RSS or cgroup over baseline; NVML)", ["device"], registry=r)
        self.memory_drift = Gauge("modelshelf_memory_drift_bytes", "Ledger minus real memory per device", ["device"], registry=r)
        self.memory_excess = Gauge("modelshelf_memory_excess_bytes", "Bytes to free now per device (real or ledger over budget, cgroup pressure)", ["device"], registry=r)
        self.cgroup_memory = Gauge("modelshelf_cgroup_memory_bytes", "The container's cgroup memory (current, working_set, limit)", ["kind"], registry=r)
        self.oom_kills = Counter("modelshelf_oom_kills_total", "OOM kills in the container's cgroup seen by the agent", registry=r)
        self.before_render: list = []  # callables run at each scrape (e.g. the router drops series of removed models)
        self.grpc_requests = Counter("modelshelf_grpc_requests_total", "gRPC data-plane calls by model and status code", ["model", "code"], registry=r)

    def render(self) -> bytes:
        for hook in self.before_render:
            hook()
        return generate_latest(self.registry)
