"""`modelshelf picker`: the Endpoint Picker as one process. One asyncio loop runs the ext_proc
gRPC server (agent/picker/extproc.py), the fleet's pollers (agent/picker/agents.py) and the
placement they share (agent/picker/placement.py).

gRPC health (grpc.health.v1, as the protocol asks): `liveness` is SERVING while the process
answers; `readiness`, `envoy.service.ext_proc.v3.ExternalProcessor` and "" are SERVING once every
agent known at start has answered once (or failed), NOT_SERVING before and while stopping.
"""
from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.logging import get_logger, kv, setup_logging
from agent.picker.agents import AgentAddress, Fleet
from agent.picker.extproc import EndpointPicker
from agent.picker.placement import Placement

log = get_logger("modelshelf.picker")
READY_SERVICES = ("", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor")


@dataclass
class PickerSettings:
    listen: str = "127.0.0.1:9002"
    agents: list[AgentAddress] = field(default_factory=list)
    agents_dns: tuple[str, int] | None = None
    agent_management_port: int = 8003
    poll_interval: float = 0.25
    poll_timeout: float = 1.0
    long_poll: float = 1.0
    dns_interval: float = 5.0
    load_factor: float = 1.25
    hot_rate: float = 50.0
    max_copies: int = 4
    copy_hold: float = 30.0
    fallbacks: int = 0
    log_format: str = "text"
    log_level: str = "info"


async def serve(s: PickerSettings, stop: asyncio.Event | None = None) -> None:
    placement = Placement(load_factor=s.load_factor, hot_rate=s.hot_rate, max_copies=s.max_copies, copy_hold=s.copy_hold)
    fleet = Fleet(placement, s.agents, dns=s.agents_dns, management_port=s.agent_management_port,
                  poll_interval=s.poll_interval, timeout=s.poll_timeout, dns_interval=s.dns_interval,
                  long_poll=s.long_poll)
    picker = EndpointPicker(placement, fallbacks=s.fallbacks)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((picker.handler(),))
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    await _set(checks, ("liveness",), health_pb2.HealthCheckResponse.SERVING)
    await _set(checks, READY_SERVICES, health_pb2.HealthCheckResponse.NOT_SERVING)
    if server.add_insecure_port(s.listen) == 0:
        raise SystemExit(f"modelshelf picker: cannot listen on {s.listen}")
    await server.start()
    log.info("picker listening", extra=kv(listen=s.listen, agents=len(s.agents), dns=s.agents_dns or ""))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    fleet_task = asyncio.create_task(fleet.run(), name="fleet")
    copies_seen = 0

    async def ready_when_synced() -> None:
        await fleet.synced.wait()
        await _set(checks, READY_SERVICES, health_pb2.HealthCheckResponse.SERVING)

    async def report_copies() -> None:  # one log line per hot-copy change, off the decision path
        nonlocal copies_seen
        while True:
            await asyncio.sleep(1.0)
            for event, model, copies in placement.events[copies_seen:]:
                log.info(event, extra=kv(model=model, copies=copies))
            copies_seen = len(placement.events)
            if copies_seen > 10_000:
                del placement.events[:copies_seen]
                copies_seen = 0

    helpers = [asyncio.create_task(ready_when_synced()), asyncio.create_task(report_copies())]
    try:
        await stop.wait()
    finally:
        await _set(checks, READY_SERVICES, health_pb2.HealthCheckResponse.NOT_SERVING)
        for task in (fleet_task, *helpers):
            task.cancel()
        await asyncio.gather(fleet_task, *helpers, return_exceptions=True)
        await server.stop(grace=2.0)
        log.info("picker stopped", extra=kv(decisions=picker.decisions))


async def _set(checks: health.aio.HealthServicer, services: tuple[str, ...], status: int) -> None:
    for service in services:
        await checks.set(service, status)


def run(s: PickerSettings) -> int:
    setup_logging(s.log_format, s.log_level)
    asyncio.run(serve(s))
    return 0
