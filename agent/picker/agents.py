"""The fleet as the picker sees it: which agents exist (a static list, or a headless Service's A
records re-resolved every `dns_interval` seconds) and what each reports on its management port
(GET /fleet/state, polled every `poll_interval` seconds with a `timeout`). With `long_poll` > 0
each read after the first asks `?since=SEQ&wait=long_poll`: an agent that supports it answers
as soon as its placement-relevant state changes (a model loaded or evicted, readiness, drain),
so the picker learns of it within milliseconds, and at the latest after `long_poll` seconds (the
live counters: in-flight, last use); an agent that ignores it answers at once and is polled every
`poll_interval`. A killed agent's long poll fails at once (connection reset); a frozen one
after `long_poll` + `timeout`.

Soft state only: everything here is rebuilt from the agents, so a restarted picker routes like
the old one after one round of reports. An agent whose report fails (connection refused, a
timeout, a non-200 answer, a body that is not the state document) leaves the placement at once
and its models are placed elsewhere on their next request; it comes back with its next good
report. An agent that reports `ready: false` or `draining: true` stays known but gets no request.

Every report is parsed in full on the picker's event loop: cheap for tens of agents and
thousands of models; at 1,000 agents x 100,000 models the full documents (~10 MB each) are not
(see README "Past one node").
"""
from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterable

import httpx

from agent.logging import get_logger, kv
from agent.picker.placement import AgentReport, ModelReport, Placement

log = get_logger("modelshelf.picker.agents")


@dataclass(frozen=True, slots=True)
class AgentAddress:
    """Where an agent is: its data-plane host and HTTP port, and its management URL."""

    host: str
    http_port: int
    management_url: str

    @property
    def name(self) -> str:
        return host_port(self.host, self.http_port)


def host_port(host: str, port: int) -> str:
    """`ip:port` as the destination header wants it (`[v6]:port` for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_agent(text: str) -> AgentAddress:
    """`HOST:HTTP_PORT=MANAGEMENT_URL` (the --agent flag). ValueError naming what is wrong."""
    data, sep, management = text.partition("=")
    host, _, port = data.rpartition(":")
    if not sep or not host or not port.isdigit() or not management.startswith(("http://", "https://")):
        raise ValueError(f"--agent wants HOST:HTTP_PORT=http://HOST:MANAGEMENT_PORT, got {text!r}")
    return AgentAddress(host.strip("[]"), int(port), management.rstrip("/"))


def report_from_state(address: AgentAddress, doc: dict[str, Any]) -> AgentReport:
    """The placement's view of one GET /fleet/state answer. ValueError when it is not one."""
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict):
        raise ValueError("not a /fleet/state document (no 'models' object)")
    models = {}
    for name, m in doc["models"].items():
        if isinstance(m, dict):
            models[name] = ModelReport(str(m.get("state", "")), int(m.get("inflight") or 0), int(m.get("requests") or 0),
                                       int(m.get("bytes") or 0), float(m.get("last_used") or 0.0))
    host_free = ((doc.get("memory") or {}).get("host") or {}).get("free")
    grpc_port = doc.get("grpc_port")
    return AgentReport(
        name=address.name,
        endpoint=address.name,
        grpc_endpoint=host_port(address.host, int(grpc_port)) if grpc_port else "",
        ready=bool(doc.get("ready")),
        draining=bool(doc.get("draining")),
        host_free=int(host_free) if host_free is not None else None,
        models=models,
    )


class Fleet:
    """Keeps `placement` up to date from the agents' reports. Runs on the picker's event loop
    (the same one that answers Envoy), so the placement needs no lock."""

    def __init__(self, placement: Placement, agents: Iterable[AgentAddress] = (), *, dns: tuple[str, int] | None = None,
                 management_port: int = 8003, poll_interval: float = 0.25, timeout: float = 1.0,
                 dns_interval: float = 5.0, long_poll: float = 1.0):
        self.placement = placement
        self._static = list(agents)
        self._dns, self._management_port = dns, management_port
        self.poll_interval, self.timeout, self.dns_interval = poll_interval, timeout, dns_interval
        self.long_poll = long_poll
        self._tasks: dict[str, asyncio.Task] = {}
        self._up: dict[str, bool] = {}
        self._first: dict[str, asyncio.Event] = {}
        self.synced = asyncio.Event()  # every agent known at start has answered (or failed) once
        self._client: httpx.AsyncClient | None = None

    async def run(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.timeout, limits=httpx.Limits(max_keepalive_connections=1024))
        try:
            if self._dns is None:
                self._watch(self._static)
                await self._mark_synced()
                await asyncio.Event().wait()
            else:
                first = True
                while True:
                    addresses = await self._resolve()
                    if addresses is not None:
                        self._watch(addresses)
                    if first:
                        first = False
                        await self._mark_synced()
                    await asyncio.sleep(self.dns_interval)
        finally:
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            await self._client.aclose()

    async def _mark_synced(self) -> None:
        await asyncio.gather(*(e.wait() for e in self._first.values()))
        self.synced.set()
        log.info("fleet synced", extra=kv(agents=len(self._tasks), ready=sum(self._up.values())))

    async def _resolve(self) -> list[AgentAddress] | None:
        name, port = self._dns  # type: ignore[misc]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except OSError as e:
            log.warning("agent discovery failed; keeping the agents known", extra=kv(dns=name, error=e))
            return None
        hosts = sorted({info[4][0] for info in infos})
        return [AgentAddress(h, port, f"http://{host_port(h, self._management_port)}") for h in hosts]

    def _watch(self, addresses: list[AgentAddress]) -> None:
        wanted = {a.name: a for a in addresses}
        for name in [n for n in self._tasks if n not in wanted]:
            self._tasks.pop(name).cancel()
            self._first.pop(name, None)
            self._up.pop(name, None)
            self.placement.remove_agent(name)
            log.info("agent left discovery", extra=kv(agent=name))
        for name, address in wanted.items():
            if name not in self._tasks:
                self._first[name] = asyncio.Event()
                self._tasks[name] = asyncio.create_task(self._poll(address), name=f"poll {name}")

    async def _poll(self, address: AgentAddress) -> None:
        url = address.management_url + "/fleet/state"
        seq: Any = None
        while True:
            started = time.monotonic()
            long_poll = self.long_poll > 0 and seq is not None
            params = {"since": str(seq), "wait": str(self.long_poll)} if long_poll else None
            changed = False
            try:
                assert self._client is not None
                r = await self._client.get(url, params=params, timeout=self.timeout + (self.long_poll if long_poll else 0))
                if r.status_code != 200:
                    raise ValueError(f"HTTP {r.status_code}")
                doc = r.json()
                report = report_from_state(address, doc)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any failed report means: do not route there
                self._down(address.name, e)
                seq = None
            else:
                self._report(address.name, report)
                changed, seq = doc.get("seq") != seq, doc.get("seq")
            self._first[address.name].set()
            elapsed = time.monotonic() - started
            if self.long_poll > 0 and seq is not None and (changed or (long_poll and elapsed >= self.long_poll / 2)):
                continue  # a new state, or the agent held the request for its wait: ask again now
            await asyncio.sleep(max(0.0, self.poll_interval - elapsed))

    def _report(self, name: str, report: AgentReport) -> None:
        eligible = report.ready and not report.draining
        if self._up.get(name) != eligible:
            log.info("agent eligible" if eligible else "agent not eligible",
                     extra=kv(agent=name, ready=report.ready, draining=report.draining))
        self._up[name] = eligible
        self.placement.set_agent(report, now=time.monotonic())

    def _down(self, name: str, error: Exception) -> None:
        if self._up.get(name, True):
            log.warning("agent unreachable; its models go elsewhere",
                        extra=kv(agent=name, error=f"{type(error).__name__}: {error}"))
        self._up[name] = False
        self.placement.remove_agent(name)
