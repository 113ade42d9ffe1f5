"""Whether the co-located server counts as ready, from the agent's periodic probes (the health
loop in agent/app.py probes every server process every 2 s through `RuntimeAdapter.probe`).

The rules, per server process (`--server-processes N`: each counted on its own):

- three probes in a row that are not "up" mark the server not ready (MLServer blocks its loop
  for a second or two while it imports a runtime: one or two misses are noise);
- a refused connection ("down") always counts;
- a "busy" probe (answered not ready, or not in time) while a load or unload is in flight on
  THAT process, of a server whose adapter says it is busy then (`Probe.excused`: MLServer runs a
  load on its event loop, and answers not ready while any model is loading), does not count:
  the server is alive, and every model it holds serves as soon as the load ends. The count
  starts again from zero once no load is in flight. Bounded: a load never outlives
  --load-timeout (the reconciler cancels it, and it is no longer in flight), so a server hung in
  a load is marked not ready at most its load timeout plus three probes after the load began;
- an excused probe never makes a process that was marked not ready ready again: only "up" does
  (a load sent to a frozen server must not flip it back).

A busy spell (excused probes in a row of one process) is logged once, at info, when it begins,
and shown in /status (`server.busy`) while it lasts.
"""
from __future__ import annotations

from typing import Any, Sequence

from agent.logging import get_logger, kv
from agent.runtimes.base import Probe

log = get_logger("modelshelf.health")

FAILED_PROBES = 3  # probes in a row not "up" (and not excused) that mark a server process not ready


class ServerHealth:
    """The probe counts of each server process; `observe` one round of probes at a time."""

    def __init__(self, threshold: int = FAILED_PROBES):
        self.threshold = threshold
        self._failures: list[int] = []
        self._down: list[bool] = []  # marked not ready (until an "up")
        self._busy: list[Probe | None] = []  # the latest excused probe of a busy spell, per process

    def observe(self, probes: Sequence[Probe]) -> bool:
        """Count one round of probes (one per process); True when every process counts as ready."""
        if len(probes) != len(self._failures):  # first round (the processes never change in number)
            self._failures = [0] * len(probes)
            self._down = [False] * len(probes)
            self._busy = [None] * len(probes)
        for i, probe in enumerate(probes):
            if probe.excused:
                self._failures[i] = 0
                if self._busy[i] is None:
                    log.info("server busy loading; its probes do not count against readiness meanwhile",
                             extra=kv(process=i, state=probe.state, models=",".join(probe.busy_with),
                                      seconds=probe.busy_for))
                self._busy[i] = probe
                continue
            self._busy[i] = None
            if probe.state == "up":
                self._failures[i] = 0
                self._down[i] = False
            else:
                self._failures[i] += 1
                if self._failures[i] >= self.threshold:
                    self._down[i] = True
        return not any(self._down)

    @property
    def failed_probes(self) -> int:
        """The longest run of counted failures now (for the "not ready" log line)."""
        return max(self._failures, default=0)

    def busy_doc(self) -> list[dict[str, Any]]:
        """/status `server.busy`: each process in a busy spell, what it loads and for how long
        (as of its latest probe)."""
        return [{"process": i, "models": list(p.busy_with), "seconds": p.busy_for}
                for i, p in enumerate(self._busy) if p is not None]


__all__ = ["FAILED_PROBES", "ServerHealth"]
