"""What a fleet's endpoint picker reads from an agent, and how an agent leaves a fleet.

`GET /fleet/state` (management port) answers, from in-memory state only (no /proc read, no
disk walk, no call to the server; a few hundred microseconds for 1,000 models)::

    {"agent": holder, "started": unix time, "seq": int, "ready": bool, "reasons": [...],
     "draining": bool, "http_port": int, "grpc_port": int (0: off),
     "models": {name: {"state", "inflight", "requests", "bytes", "gpu_bytes", "last_used"}},
     "memory": {"host": {"budget", "reserved", "free"}, "gpu": {"gpu:N": {...}}}}

- `models` holds every configured model in any state (a model removed from the config leaves
  at once, even while it drains). `bytes` is the host memory the ledger reserves for a loaded or
  loading model; for the others what a load would reserve as far as known without I/O (the
  declared `memory`, else the last reservation this agent made for it, else the cache entry's
  size x the runtime's multiplier, else 0). `last_used` is a unix time (0.0: never).
- `seq` bumps on every change a placement depends on: a model's state, the configured set,
  readiness, draining. The live counters (`inflight`, `requests`, `last_used`) and `bytes`
  are read at each call and do NOT bump it, or every request would wake every long-poller.
- `?since=N`: when `seq` is still N the answer waits for the next change, at most 5 s
  (`&wait=S` shortens it), so a picker learns of a change within milliseconds.

`POST /fleet/drain` (the preStop hook: `modelshelf drain`) marks the agent draining: it reports
not ready on every readiness surface (`/readyz`, `/v2/health/ready`, gRPC ServerReady, the state
above), so neither the picker nor a Service sends it new placements, and it keeps serving every
request it still receives until the pod exits. Nothing is unloaded by the drain: copies the
picker no longer routes here age out by LRU when other models need the memory, or at pod exit.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from agent.logging import get_logger, kv

if TYPE_CHECKING:
    from agent.app import Agent

log = get_logger("modelshelf.fleet")

LONG_POLL_S = 5.0


class FleetState:
    """The agent's fleet-facing state: a change sequence, the drain flag, the state document."""

    def __init__(self, agent: "Agent"):
        self.agent = agent
        self.started = time.time()
        self.seq = 0
        self.draining = False
        self._changed = asyncio.Event()
        self._last_bytes: dict[str, int] = {}  # model -> its last host reservation here

    def bump(self) -> None:
        """Something a placement depends on changed: wake the long-pollers."""
        self.seq += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def wait_change(self, since: int, timeout: float = LONG_POLL_S) -> None:
        """Return when `seq` differs from `since`, or after `timeout` seconds."""
        if self.seq != since:
            return
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), timeout=max(0.0, min(timeout, LONG_POLL_S)))
        except asyncio.TimeoutError:
            pass

    def drain(self) -> bool:
        """Take no new placements from now on. True the first time."""
        if self.draining:
            return False
        self.draining = True
        inflight = sum(m.inflight for m in self._models().values())
        log.info("draining: not ready, no new placements; requests still served", extra=kv(inflight=inflight))
        self.bump()
        return True

    def _models(self) -> dict[str, Any]:
        rec = self.agent.reconciler
        return {} if rec is None else rec.models

    def doc(self) -> dict[str, Any]:
        a, s = self.agent, self.agent.settings
        memory = a.memory
        reserved = memory.reservations() if memory is not None else {}
        multiplier = memory.multiplier if memory is not None else (lambda runtime: None)
        offset = time.time() - time.monotonic()
        last = self._last_bytes
        models = {}
        for name, m in self._models().items():
            if m.removed:
                continue
            cost = reserved.get(name)
            if cost is not None:
                host, gpu = cost.host, sum(cost.gpu.values())
                last[name] = host
            else:
                host, gpu = m.spec.memory, m.spec.gpu_memory or 0
                if host is None:
                    host = last.get(name)
                if host is None and m.entry is not None:
                    host = int(m.entry.size * (multiplier(m.spec.runtime) or 1.0))
            models[name] = {"state": m.state.value, "inflight": m.inflight, "requests": m.requests,
                            "bytes": host or 0, "gpu_bytes": gpu,
                            "last_used": round(m.last_used + offset, 3) if m.last_used else 0.0}
        reasons = a.not_ready_reasons()
        return {"agent": s.holder, "started": self.started, "seq": self.seq, "ready": not reasons,
                "reasons": reasons, "draining": self.draining, "http_port": s.port, "grpc_port": s.grpc_port,
                "models": models, "memory": _memory(memory)}

    def body(self) -> bytes:
        return json.dumps(self.doc(), separators=(",", ":")).encode()


def _memory(memory: Any) -> dict[str, Any]:
    """Budget, reserved (what admission counts) and free per device; host budget null before start."""
    if memory is None:
        return {"host": {"budget": None, "reserved": 0, "free": None}, "gpu": {}}
    budget, used = memory.budget(), memory.used()
    out: dict[str, Any] = {"host": None, "gpu": {}}
    for device, b in budget.items():
        doc = {"budget": b, "reserved": used.get(device, 0), "free": b - used.get(device, 0)}
        if device == "host":
            out["host"] = doc
        else:
            out["gpu"][device] = doc
    if out["host"] is None:
        out["host"] = {"budget": None, "reserved": used.get("host", 0), "free": None}
    return out


# ---------------------------------------------------------------------- `modelshelf drain`
def drain_main(management_url: str, wait_s: float, quiet_s: float, poll_s: float = 0.5) -> int:
    """POST /fleet/drain, then (with `wait_s` > 0) wait until the agent is quiet: nothing in
    flight and no new request for `quiet_s` seconds (the picker has moved its traffic), at most
    `wait_s` seconds. Exit 0 when drained or quiet, 1 when the wait ended with traffic still
    arriving (the pod exits anyway: preStop must not hang), 2 when the agent cannot be reached."""
    base = management_url.rstrip("/")
    try:
        _call("POST", base + "/fleet/drain")
    except OSError as e:
        print(f"modelshelf drain: cannot reach {base}: {e}", file=sys.stderr)
        return 2
    print(f"modelshelf drain: {base} is draining", file=sys.stderr)
    if wait_s <= 0:
        return 0
    deadline = time.monotonic() + wait_s
    last_requests, quiet_since = -1, time.monotonic()
    while True:
        try:
            doc = _call("GET", base + "/fleet/state")
        except OSError as e:  # the agent is gone: nothing left to drain
            print(f"modelshelf drain: agent gone ({e})", file=sys.stderr)
            return 0
        models = doc.get("models", {}).values()
        requests = sum(m.get("requests", 0) for m in models)
        inflight = sum(m.get("inflight", 0) for m in models)
        now = time.monotonic()
        if requests != last_requests or inflight:
            last_requests, quiet_since = requests, now
        elif now - quiet_since >= quiet_s:
            print(f"modelshelf drain: quiet for {quiet_s:g}s (no request in flight)", file=sys.stderr)
            return 0
        if now >= deadline:
            print(f"modelshelf drain: still busy after {wait_s:g}s ({inflight} in flight); leaving anyway",
                  file=sys.stderr)
            return 1
        time.sleep(min(poll_s, max(0.0, deadline - now)))


def _call(method: str, url: str) -> dict[str, Any]:
    req = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise OSError(f"HTTP {e.code} from {url}") from None
