"""A fleet on loopback for tests and benchmarks: N real agents (`modelshelf run --prefetch preload`,
each with its embedded MLServer) on one shared cache dir and one config dir, the real picker (`modelshelf
picker`) watching them, and a real Envoy (tests/support/envoy.py) calling the picker (`lb`: how
Envoy reaches the picked agent; the override-host policy by default, which retries a request that
met a dead agent on another one).

Agents' addresses are fixed up front, so an agent can join later (`start_agent(i)`): the picker
lists every slot from the start (a slot with no process is an unreachable agent: no placement),
the way a Kubernetes picker learns a new pod from the headless Service. `kill(i)` is kill -9 of
the agent's whole process group (agent + its MLServer).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.agentproc import AgentProcess
from tests.support.configmap import ConfigMapDir
from tests.support.envoy import Envoy
from tests.support.net import free_port, stop_group


@dataclass
class Slot:
    index: int
    port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    proc: AgentProcess | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"


class Fleet:
    """`slots` agent addresses, `initial` of them started; picker + Envoy in front (`start()`)."""

    def __init__(self, root: Path, models: list[dict], *, slots: int = 4, agent_args: tuple[str, ...] = (),
                 picker_args: tuple[str, ...] = (), fail_open: bool = True, lb: str = "override_host"):
        self.root = root
        self.config = ConfigMapDir(root / "config")
        self.config.write({"models.yaml": json.dumps({"models": models})})
        self.cache = root / "cache"
        self.slots = [Slot(i) for i in range(slots)]
        self.agent_args = agent_args
        self.picker_args = picker_args
        self.fail_open = fail_open
        self.lb = lb
        self.picker_port = free_port()
        self.picker: subprocess.Popen | None = None
        self.envoy: Envoy | None = None

    # ------------------------------------------------------------------ life

    def start(self, initial: int = 3, gateway: bool = True) -> "Fleet":
        """Start `initial` agents; with `gateway`, the picker and Envoy in front of them."""
        for i in range(initial):
            self.start_agent(i, wait=False)
        for s in self.slots[:initial]:
            s.proc.wait_ready(timeout=120)  # type: ignore[union-attr]
        if not gateway:
            return self
        self.start_picker()
        self.envoy = Envoy(f"127.0.0.1:{self.picker_port}", workdir=self.root / "envoy", fail_open=self.fail_open, lb=self.lb,
                           pool_http=[s.endpoint for s in self.slots], pool_grpc=[s.grpc_endpoint for s in self.slots]).start()
        return self

    def start_agent(self, i: int, wait: bool = True) -> AgentProcess:
        s = self.slots[i]
        s.proc = AgentProcess(self.config.root, self.cache, self.root / f"agent{i}.log", "--prefetch", "preload", *self.agent_args,
                              port=s.port, grpc_port=s.grpc_port, env={"POD_NAME": f"agent-{i}"})
        if wait:
            s.proc.wait_ready(timeout=120)
        return s.proc

    def start_picker(self) -> None:
        agents = [a for s in self.slots for a in ("--agent", f"{s.endpoint}=http://{s.endpoint}")]
        log = open(self.root / "picker.log", "ab")
        self.picker = subprocess.Popen([sys.executable, "-m", "agent.cli", "picker", "--listen", f"127.0.0.1:{self.picker_port}",
                                        "--poll-interval", "0.1", *agents, *self.picker_args],
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_picker_ready()

    def _wait_picker_ready(self, timeout: float = 30) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(f"127.0.0.1:{self.picker_port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"picker not ready; log:\n{(self.root / 'picker.log').read_text()[-3000:]}")

    def kill(self, i: int) -> tuple[float, float]:
        """kill -9 agent i and its MLServer (its process group). Returns (monotonic time of the
        signal, monotonic time the agent was reaped): a request that reached the agent before the
        second may fail with it (its server may die a few ms before the agent does)."""
        proc = self.slots[i].proc
        assert proc is not None
        sent = time.monotonic()
        os.killpg(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait(10)
        return sent, time.monotonic()

    def stop(self) -> None:
        if self.envoy:
            self.envoy.stop()
        stop_group(self.picker)
        for s in self.slots:
            if s.proc is not None:
                s.proc.stop()

    # ------------------------------------------------------------------ what the agents say

    def live(self) -> list[Slot]:
        return [s for s in self.slots if s.proc is not None and s.proc.proc.poll() is None]

    def state(self, s: Slot) -> dict:
        with urllib.request.urlopen(f"{s.url}/fleet/state", timeout=5) as r:
            return json.load(r)

    def wait_all_ready(self, timeout: float = 60) -> None:
        """Until every live agent reports ready (and the picker, polling every 0.1 s, has seen it)."""
        deadline = time.monotonic() + timeout
        while not all(self.state(s)["ready"] for s in self.live()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"agents not ready: {[(s.index, self.state(s).get('reasons')) for s in self.live()]}")
            time.sleep(0.1)
        time.sleep(0.3)

    def holders(self, model: str) -> list[int]:
        """Indexes of the live agents that have `model` loaded."""
        return [s.index for s in self.live() if self.state(s)["models"].get(model, {}).get("state") == "loaded"]

    def requests(self, model: str) -> dict[int, int]:
        """Requests each live agent has served for `model` (the agents' own counters)."""
        return {s.index: self.state(s)["models"].get(model, {}).get("requests", 0) for s in self.live()}
