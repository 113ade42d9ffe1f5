"""Reality: what the server really holds, checked against the ledger and the budget.

The ledger (``MemoryManager``) decides admission from reservations; this module reads the real
figures and says how far off the ledger is and how many bytes must go:

* host: the server's process-tree RSS over TRACKED pids (the tree is walked, one scan of /proc,
  only when the server's pid changes, after each load and at most once a minute; each check
  reads ``/proc/<pid>/statm`` of the known pids), minus the server's baseline (its RSS before
  any model: the budget covers models and runtime imports, not the bare server). With
  ``source="cgroup"`` (the agent and the server share a container whose cgroup covers both),
  the cgroup's working set (``memory.current`` minus inactive file pages) minus its baseline.
  Shared pages of forked workers are counted once per process: an over-estimate.
* GPU (NVML): bytes used by the tracked pids on each device (falling back, when NVML lists none
  of them as in a container without the host PID namespace, to the device's used bytes over what
  it used while the ledger held nothing there: other tenants of a shared GPU are not ours).
* ``excess()``: device -> bytes to free now. A device is in excess when reality exceeds the
  budget by more than ``tolerance`` (default 5%: allocator noise), or the ledger itself does
  (a measurement larger than reserved), or the container's cgroup working set is above
  ``pressure`` (default 90%) of its limit: the kernel OOM-kills at 100%. The figure is the
  largest of the three gaps (reality over budget, ledger over budget, working set over
  ``pressure`` x limit), so evicting models whose reservations sum to it brings it back.
* drift = ledger ``used()`` - reality, per device (the embedded server's allocator reserve,
  ``malloc_keep``, counted only as far as reality uses it: it is a bound, not a use; where the
  server reports what it keeps now, ``MemoryManager.allocator_reserve``, exactly that much of
  it); logged when it exceeds the tolerance while the
  ledger is ``settled`` (no load or unload in flight: mid-load the model is reserved before the
  server holds it, mid-unload it is still held but promised to its successor).
* OOM kills: the cgroup's ``oom_kill`` counter (v2 ``memory.events``, v1 ``memory.oom_control``);
  a rise is logged, counted and kept as the status reason.

Python's allocator keeps small freed blocks: a model evicted may leave RSS where it was, so
evictions for excess are bounded by the ledger (never more than the excess by reservations) and
the next check sees what they gave back.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

import psutil

from .cost import HOST, format_bytes
from .budget import own_cgroup_paths
from .planner import Candidate, eviction_order, take_in_order

if TYPE_CHECKING:
    from .ledger import MemoryManager
    from .probes import GpuProbe

log = logging.getLogger("modelshelf.memory")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_NO_LIMIT = 2**60


class ProcessTracker:
    """The server's pids, tracked: ``pids()`` finds the tree again only when the root pid
    changed, after ``refresh()`` was asked, or every ``rescan_s``; otherwise it returns the
    known pids still alive. Finding the tree walks down from the root through
    ``/proc/<pid>/task/<tid>/children`` (a few reads per server process), never a scan of
    every process on the machine (psutil's ``children()`` reads all of /proc: only where the
    kernel has no ``children`` files)."""

    def __init__(self, root: Callable[[], int | tuple[int, ...] | None] | int | tuple[int, ...] | None, *, rescan_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self._root = root
        self._rescan_s = rescan_s
        self._clock = clock
        self._lock = threading.Lock()
        self._for: int | None = None
        self._pids: set[int] = set()
        self._scanned = 0.0
        self._stale = True
        self.scans = 0

    def root(self) -> int | tuple[int, ...] | None:
        r = self._root
        return r() if callable(r) else r

    def refresh(self) -> None:
        """The tree may have changed (a load can start worker processes): rescan next time."""
        self._stale = True

    def pids(self) -> set[int]:
        root = self.root()
        with self._lock:
            if root is None:
                self._pids, self._for = set(), None
                return set()
            now = self._clock()
            if self._stale or root != self._for or now - self._scanned >= self._rescan_s:
                # several roots (a tuple): the server processes of --server-processes N
                self._pids = set().union(*map(_descendants, root)) if isinstance(root, tuple) else _descendants(root)
                self._for, self._scanned, self._stale = root, now, False
                self.scans += 1
            else:
                self._pids = {p for p in self._pids if os.path.exists(f"/proc/{p}")}
            return set(self._pids)

    @staticmethod
    def pids_of(process: int) -> set[int]:
        """One server process's tree, found now (a few reads: one of several processes'
        load windows measure it alone, see MemoryManager.start_measure)."""
        return _descendants(process)

    def rss(self, pids: set[int] | None = None) -> int | None:
        """Sum of RSS over the tracked pids (``/proc/<pid>/statm``); None without a server."""
        pids = self.pids() if pids is None else pids
        if not pids:
            return None
        total = 0
        for p in pids:
            try:
                with open(f"/proc/{p}/statm") as f:
                    total += int(f.read().split()[1]) * _PAGE
            except (OSError, ValueError, IndexError):
                pass  # gone meanwhile
        return total


def _descendants(root: int) -> set[int]:
    """``root`` and its descendants, from the kernel's per-thread ``children`` lists; psutil
    (a scan of all of /proc) where those files do not exist. Empty when ``root`` is gone."""
    if not os.path.exists(f"/proc/{root}"):
        return set()
    if not os.path.exists(f"/proc/{root}/task/{root}/children"):
        try:
            return {root, *(c.pid for c in psutil.Process(root).children(recursive=True))}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return set()
    found, todo = {root}, [root]
    while todo:
        pid = todo.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # exited meanwhile
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids = [int(c) for c in f.read().split()]
            except (OSError, ValueError):
                continue
            for c in kids:
                if c not in found:
                    found.add(c)
                    todo.append(c)
    return found


@dataclass(frozen=True)
class CgroupReading:
    current: int
    limit: int | None
    working_set: int  # current minus inactive file pages (what the OOM killer cannot reclaim)
    oom_kills: int
    high_events: int


class CgroupMemory:
    """One cgroup's memory files (v2 or v1), read on each ``read()``."""

    def __init__(self, path: Path, version: int):
        self.path = Path(path)
        self.version = version

    @classmethod
    def discover(cls, root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")) -> "CgroupMemory | None":
        """This process's memory cgroup: v2 (``memory.current``) or v1 (``memory.usage_in_bytes``),
        under its own path from ``self_cgroup`` or at the mount root (a cgroup namespace)."""
        v2_path, v1_path = (p.strip("/") for p in own_cgroup_paths(self_cgroup))
        for cand in ([root / v2_path] if v2_path else []) + [root]:
            if (cand / "memory.current").exists():
                return cls(cand, 2)
        for cand in ([root / "memory" / v1_path] if v1_path else []) + [root / "memory", root]:
            if (cand / "memory.usage_in_bytes").exists():
                return cls(cand, 1)
        return None

    @classmethod
    def at(cls, path: Path) -> "CgroupMemory":
        """The cgroup at ``path`` (``--memory-cgroup``): v2 when it has ``memory.current``, else v1.
        Raises ValueError naming the path when it has neither."""
        path = Path(path)
        if (path / "memory.current").exists():
            return cls(path, 2)
        if (path / "memory.usage_in_bytes").exists():
            return cls(path, 1)
        raise ValueError(f"--memory-cgroup {path}: no memory.current (cgroup v2) nor memory.usage_in_bytes (v1) there")

    def read(self) -> CgroupReading | None:
        try:
            if self.version == 2:
                current = int((self.path / "memory.current").read_text())
                limit = _limit(self.path / "memory.max")
                stat = _kv(self.path / "memory.stat")
                events = _kv(self.path / "memory.events")
                inactive = stat.get("inactive_file", 0)
                return CgroupReading(current, limit, max(0, current - inactive), events.get("oom_kill", 0), events.get("high", 0))
            current = int((self.path / "memory.usage_in_bytes").read_text())
            limit = _limit(self.path / "memory.limit_in_bytes")
            stat = _kv(self.path / "memory.stat")
            oom = _kv(self.path / "memory.oom_control")
            inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
            return CgroupReading(current, limit, max(0, current - inactive), oom.get("oom_kill", 0), 0)
        except (OSError, ValueError):
            return None


def _limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text in ("", "max"):
        return None
    value = int(text)
    return value if 0 < value < _NO_LIMIT else None


def _kv(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            try:
                out[k] = int(v)
            except ValueError:
                pass
    except OSError:
        pass
    return out


def _drift(ledger: int, real: int, keep: int, kept: int | None = None) -> int:
    """ledger - real, where the ledger's allocator reserve (``keep``, a bound the server may use
    or not) counts only as far as real memory uses it: with the server's own figure of what it
    keeps now (``kept``) exactly that much of it; without one, real anywhere between the ledger
    without the reserve and the ledger with it is no drift."""
    if not keep:
        return ledger - real
    if kept is not None:
        return ledger - keep + min(max(0, kept), keep) - real
    if real > ledger:
        return ledger - real
    return max(0, ledger - keep - real)


@dataclass
class RealityReport:
    """One check: per device the real bytes, the ledger's, drift (ledger - real), budget and the
    bytes to free now; the cgroup reading; OOM kills seen since the agent started."""

    at: float
    real: dict[str, int]
    ledger: dict[str, int]
    drift: dict[str, int]
    budget: dict[str, int]
    excess: dict[str, int]
    reasons: dict[str, str] = field(default_factory=dict)  # device -> why it is in excess
    source: str = "rss"
    server_rss: int | None = None
    baseline: int | None = None
    cgroup: CgroupReading | None = None
    oom_kills: int = 0
    last_oom_kill_at: float | None = None
    # no load and no unload in flight: the ledger's figures are what the server should hold
    # (during a load the model is reserved before the server holds it; during an unload it is
    # still held but its bytes are promised to its successor), so drift is judged only here
    settled: bool = True
    # the server's allocator reserve as it reported it (freed bytes it keeps; None: not reported)
    allocator_reserve: int | None = None

    def doc(self) -> dict[str, Any]:
        cg = self.cgroup
        return {
            "checked_at": self.at, "source": self.source, "server_rss": self.server_rss, "server_baseline": self.baseline,
            "devices": {d: {"real": self.real.get(d), "ledger": self.ledger.get(d, 0), "drift": self.drift.get(d),
                            "budget": b, "excess": self.excess.get(d, 0), "reason": self.reasons.get(d)}
                        for d, b in self.budget.items()},
            "cgroup": None if cg is None else {"current": cg.current, "working_set": cg.working_set, "limit": cg.limit,
                                               "oom_kills": cg.oom_kills, "high_events": cg.high_events},
            "oom_kills": self.oom_kills, "last_oom_kill_at": self.last_oom_kill_at, "settled": self.settled,
            "allocator_reserve": self.allocator_reserve,
            "reason": (f"{self.oom_kills} process(es) of this container OOM-killed by the kernel (last at "
                       f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self.last_oom_kill_at or 0))})"
                       if self.oom_kills else None),
        }


class RealityCheck:
    """Reality against the ledger for one node. ``check()`` every few seconds and after each
    load (cheap: a few /proc reads, one NVML query); ``excess()`` says what to evict;
    ``relief(candidates)`` picks the victims."""

    def __init__(self, ledger: "MemoryManager", *, tracker: ProcessTracker, gpu_probe: "GpuProbe | None" = None,
                 cgroup: CgroupMemory | None = None, source: str = "rss", tolerance: float = 0.05,
                 pressure: float = 0.90, baseline: int | None = None,
                 on_oom_kill: Callable[[int], None] | None = None, clock: Callable[[], float] = time.time):
        if source not in ("rss", "cgroup"):
            raise ValueError(f"reality source must be 'rss' or 'cgroup', got {source!r}")
        self.ledger = ledger
        self.tracker = tracker
        self.gpu = gpu_probe
        self.cgroup = cgroup
        self.source = source if (source == "rss" or cgroup is not None) else "rss"
        self.tolerance = float(tolerance)
        self.pressure = float(pressure)
        self._baseline = baseline  # server RSS (or cgroup working set) with no model loaded
        self._baseline_for: int | None = None
        self._on_oom_kill = on_oom_kill
        self._clock = clock
        self._lock = threading.Lock()
        self._oom_seen: int | None = None
        self._oom_at_restart = 0  # ``oom_kills`` at the previous server restart
        self._gpu_baseline: dict[str, int] = {}  # device -> its used bytes while the ledger held nothing there
        self.oom_kills = 0
        self.last_oom_kill_at: float | None = None
        self._last: RealityReport | None = None
        self._drift_logged: dict[str, bool] = {}

    def last(self) -> RealityReport | None:
        return self._last

    def reality(self) -> dict[str, int]:
        """Device -> real bytes now (a fresh check)."""
        return dict(self.check().real)

    def excess(self) -> dict[str, int]:
        """Device -> bytes to free now (a fresh check); empty when within."""
        return {d: b for d, b in self.check().excess.items() if b > 0}

    def check(self) -> RealityReport:
        with self._lock:
            budget = self.ledger.budget()
            settled = self.ledger.settled()
            ledger = self.ledger.used()
            root = self.tracker.root()
            rss = self.tracker.rss()
            cg = self.cgroup.read() if self.cgroup is not None else None
            self._note_oom(cg)
            host_now = cg.working_set if (self.source == "cgroup" and cg is not None) else rss
            empty = not self.ledger.reservations() and not self.ledger.overhead()
            if host_now is not None and empty and (self._baseline is None or root != self._baseline_for):
                self._baseline, self._baseline_for = host_now, root  # nothing loaded: this is the bare server
            baseline = self._baseline
            if self.source == "rss" and (baseline is None or root != self._baseline_for):
                baseline = self.ledger.server_baseline(root) or baseline  # seen before its first load
            real: dict[str, int] = {}
            if host_now is not None and baseline is not None:
                real[HOST] = max(0, host_now - baseline)
            real.update(self._gpu_real(budget, ledger))
            excess: dict[str, int] = {}
            reasons: dict[str, str] = {}
            for d, b in budget.items():
                gaps = {"ledger_over_budget": ledger.get(d, 0) - b}
                if d in real and real[d] > b * (1 + self.tolerance):
                    gaps["real_over_budget"] = real[d] - b
                if d == HOST and cg is not None and cg.limit is not None and cg.working_set > self.pressure * cg.limit:
                    gaps["cgroup_pressure"] = int(cg.working_set - self.pressure * cg.limit)
                why, gap = max(gaps.items(), key=lambda kv: kv[1])
                if gap > 0:
                    excess[d], reasons[d] = int(gap), why
            keep = self.ledger.keep_bytes()  # one reserve per server process charged (keep_processes)
            kept = self.ledger.allocator_reserve() if keep else None
            drift = {d: _drift(ledger.get(d, 0), r, keep if d == HOST else 0, kept if d == HOST else None)
                     for d, r in real.items()}
            report = RealityReport(self._clock(), real, ledger, drift, budget, excess, reasons, self.source, rss,
                                   baseline, cg, self.oom_kills, self.last_oom_kill_at,
                                   settled=settled and self.ledger.settled(), allocator_reserve=kept)
            self._last = report
        self._log(report)
        return report

    def _gpu_real(self, budget: dict[str, int], ledger: dict[str, int]) -> dict[str, int]:
        """Per GPU: the bytes NVML lists for the tracked pids; where it lists none of them
        (another PID namespace), the device's used bytes over what the device used while the
        ledger held nothing on it (other processes on a shared GPU are not the server's). A
        device with no such baseline yet is left out (not judged by reality)."""
        if self.gpu is None or not any(d != HOST for d in budget):
            return {}
        pids = self.tracker.pids()
        try:
            usage = self.gpu.usage(pids)
        except Exception as e:  # a failing probe must not stop the check
            log.warning("memory gpu_probe_failed error=%r", f"{type(e).__name__}: {e}")
            return {}
        out: dict[str, int] = {}
        for d, u in usage.items():
            if d not in budget:
                continue
            if u.process_bytes is not None:
                out[d] = u.process_bytes
                continue
            if ledger.get(d, 0) == 0:
                self._gpu_baseline[d] = u.device_used
            if d in self._gpu_baseline:
                out[d] = max(0, u.device_used - self._gpu_baseline[d])
        return out

    def _note_oom(self, cg: CgroupReading | None) -> None:
        if cg is None:
            return
        if self._oom_seen is not None and cg.oom_kills > self._oom_seen:
            n = cg.oom_kills - self._oom_seen
            self.oom_kills += n
            self.last_oom_kill_at = self._clock()
            log.error("memory oom_kill count=%d working_set=%d limit=%s: the kernel killed a process of this "
                      "container for memory; models are reloaded only as far as the budget allows", n, cg.working_set, cg.limit)
            if self._on_oom_kill is not None:
                self._on_oom_kill(n)
        self._oom_seen = cg.oom_kills

    def restart_reason(self, exit: dict | None) -> dict[str, Any]:
        """Why the server restarted, from how its process ended (``exit``: code, signal; None
        for a sidecar, whose end the agent does not see) and the cgroup's ``oom_kill`` counter
        read now: "oom_killed" when the counter grew since the previous restart (the kernel
        killed a process of this container for memory: it ends it with SIGKILL), else "killed"
        (SIGKILL), "signal" (another signal), "exited" (an exit code) or "unknown"."""
        self.check()  # reads the counter now (the kill happened before the restart finished)
        with self._lock:
            grew = self.oom_kills - self._oom_at_restart
            self._oom_at_restart = self.oom_kills
        sig = (exit or {}).get("signal")
        if grew > 0:
            reason = "oom_killed"
        elif sig == 9:
            reason = "killed"
        elif sig is not None:
            reason = "signal"
        elif exit is not None:
            reason = "exited"
        else:
            reason = "unknown"
        detail = {"oom_killed": f"the kernel OOM-killed {grew} process(es) of this container (cgroup oom_kill counter)",
                  "killed": "SIGKILL (not counted as an OOM kill by the cgroup)", "signal": f"signal {sig}",
                  "exited": f"exit code {(exit or {}).get('code')}", "unknown": "the server came back (its exit is not seen)"}[reason]
        return {"reason": reason, "detail": detail, "at": self._clock(), "exit_code": (exit or {}).get("code"),
                "signal": sig, "oom_kills": grew}

    def _log(self, r: RealityReport) -> None:
        for d, dr in (r.drift.items() if r.settled else ()):  # mid-load drift is expected, not news
            off = abs(dr) > self.tolerance * max(1, r.budget.get(d, 0))
            if off != self._drift_logged.get(d, False):
                self._drift_logged[d] = off
                log.log(logging.WARNING if off else logging.INFO,
                        "memory drift device=%s ledger=%d real=%d drift=%d tolerance=%d %s", d, r.ledger.get(d, 0),
                        r.real[d], dr, int(self.tolerance * r.budget.get(d, 0)), "beyond" if off else "within")
        for d, b in r.excess.items():
            log.warning("memory excess device=%s bytes=%d reason=%s real=%s ledger=%d budget=%d", d, b, r.reasons.get(d),
                        r.real.get(d), r.ledger.get(d, 0), r.budget.get(d, 0))

    def relief(self, excess: dict[str, int], candidates: Iterable[Candidate]) -> list[str]:
        """Models to evict for ``excess``, in ``eviction_order`` (lowest score, then least
        recently used), never pinned nor under a request (no residency rule: memory is short
        now), until their reservations cover the excess on every device in excess. Returns
        what it can (maybe fewer than needed)."""
        reserved = self.ledger.reservations()
        eligible = []
        for c in sorted(candidates, key=eviction_order):
            cost = c.cost or reserved.get(c.name)
            if not c.pinned and c.inflight == 0 and cost is not None:
                eligible.append(c if c.cost is not None else replace(c, cost=cost))
        victims, remaining = take_in_order(eligible, {d: b for d, b in excess.items() if b > 0})
        if remaining:
            log.warning("memory relief_short %s: no more evictable models (pinned or in use)",
                        " ".join(f"{d}={format_bytes(b)}" for d, b in remaining.items()))
        return victims


async def reality_loop(check: RealityCheck, candidates: Callable[[], Iterable[Candidate]],
                       evict: Callable[[str], Awaitable[bool]], *, interval_s: float = 2.0,
                       wake: asyncio.Event | None = None) -> None:
    """Check reality every ``interval_s`` (or when ``wake`` is set, e.g. after a load); while
    there is excess, evict least-recently-used models no request holds (``relief``), one at a
    time, re-checking after each (an eviction may free more than its reservation says, or less).
    ``evict(name)`` unloads one model and returns whether it did (False: it got leased meanwhile,
    or is no longer loaded). Runs until cancelled; a failing check or eviction is logged."""
    while True:
        try:
            report = await asyncio.to_thread(check.check)
            tried: set[str] = set()
            while report.excess:
                victims = [v for v in check.relief(report.excess, candidates()) if v not in tried]
                if not victims:
                    break
                tried.add(victims[0])
                if await evict(victims[0]):
                    log.warning("memory evicted_for_excess model=%s %s", victims[0],
                                " ".join(f"{d}={b}({report.reasons.get(d)})" for d, b in report.excess.items()))
                report = await asyncio.to_thread(check.check)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # keep checking: one bad read must not end the loop
            log.warning("memory reality_loop_error error=%r", f"{type(e).__name__}: {e}")
        if wake is None:
            await asyncio.sleep(interval_s)
        else:
            try:
                # asyncio.timeout, not wait_for: wait_for swallows a cancellation that lands as
                # the event is set (a load just finished), and the loop would never stop
                async with asyncio.timeout(interval_s):
                    await wake.wait()
            except TimeoutError:
                pass
            wake.clear()
