"""Fixtures for the memory accountant's tests.

`FakeGpu` is a small, honest stand-in for NVML: this machine has no GPU, so multi-GPU budgeting
and GPU measurement are exercised through the `GpuProbe` seam the manager takes (`gpu_probe=`).
It reports per-device totals and per-pid usage that the test sets, nothing more. The default
path (no probe injected) uses the real nvidia-ml-py and is tested for its degradation here.

`ProcessTree` is a REAL process tree (a python parent with a python child) whose child allocates
and touches memory on command: host measurement is tested against real RSS, not a fake.
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from agent.memory import GpuUsage

GiB = 2**30
MiB = 2**20

_CHILD = r"""
import sys
held = []
print("child-ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if not cmd:
        continue
    if cmd[0] == "alloc":
        held.append(b"\x01" * int(cmd[1]))  # bytes * n writes every page: real RSS
        print("ok", flush=True)
    elif cmd[0] == "free":
        held.clear()
        print("ok", flush=True)
    elif cmd[0] == "quit":
        break
"""

_PARENT = r"""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "child-ready"
print(f"ready {child.pid}", flush=True)
for line in sys.stdin:
    child.stdin.write(line)
    child.stdin.flush()
    if line.strip() == "quit":
        break
    print(child.stdout.readline().strip(), flush=True)
child.wait(timeout=10)
"""


class ProcessTree:
    """A parent python process with one child; `send("alloc N")` makes the child hold N touched
    bytes. `pid` is the parent (the 'server'), `child_pid` the worker that grows."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        first = self._readline(timeout=20)
        assert first.startswith("ready "), first
        self.pid = self.proc.pid
        self.child_pid = int(first.split()[1])

    def _readline(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"process tree {self.proc.pid} did not answer within {timeout}s")
        return self.proc.stdout.readline().strip()

    def send(self, cmd: str, timeout: float = 20) -> str:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        reply = self._readline(timeout)
        assert reply == "ok", reply
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)
        # the child exits when its stdin closes; make sure it is gone
        try:
            os.kill(self.child_pid, 0)
        except OSError:
            return
        os.kill(self.child_pid, 9)


@pytest.fixture
def tree():
    t = ProcessTree()
    try:
        yield t
    finally:
        t.close()


@dataclass
class FakeGpu:
    """Fake NVML (tests only, see module doc): `totals` per device, `by_pid[(dev, pid)]` bytes,
    `others[dev]` bytes used by processes not visible to us (other pid namespace)."""

    totals: dict[str, int]
    by_pid: dict[tuple[str, int], int] = field(default_factory=dict)
    others: dict[str, int] = field(default_factory=dict)
    seen_pids: list[set[int]] = field(default_factory=list)

    def devices(self) -> dict[str, int]:
        return dict(self.totals)

    def usage(self, pids: set[int]) -> dict[str, GpuUsage]:
        self.seen_pids.append(set(pids))
        out = {}
        for dev in self.totals:
            mine = [b for (d, pid), b in self.by_pid.items() if d == dev and pid in pids]
            used = sum(b for (d, _), b in self.by_pid.items() if d == dev) + self.others.get(dev, 0)
            out[dev] = GpuUsage(sum(mine) if mine else None, used)
        return out


@pytest.fixture
def fake_gpu():
    return FakeGpu({"gpu:0": 16 * GiB, "gpu:1": 24 * GiB})


class FakeCgroup:
    """A cgroup directory in the kernel's file formats (v2: memory.current, memory.max,
    memory.stat, memory.events; v1: memory.usage_in_bytes, memory.limit_in_bytes, memory.stat,
    memory.oom_control), written by the test: a controllable stand-in for /sys/fs/cgroup, whose
    counters (the OOM-kill count above all) only the kernel can move for real. The agent reads it
    through ``--memory-cgroup`` exactly as it reads the real files."""

    def __init__(self, path, version: int = 2):
        self.path = path
        self.version = version
        path.mkdir(parents=True, exist_ok=True)

    def write(self, current: int, limit: int | None = None, inactive_file: int = 0, oom_kill: int = 0) -> "FakeCgroup":
        if self.version == 2:
            files = {"memory.current": f"{current}\n", "memory.max": "max\n" if limit is None else f"{limit}\n",
                     "memory.stat": f"anon {max(0, current - inactive_file)}\nfile {inactive_file}\n"
                                    f"active_file 0\ninactive_file {inactive_file}\n",
                     "memory.events": f"low 0\nhigh 0\nmax 0\noom {oom_kill}\noom_kill {oom_kill}\n"}
        else:
            files = {"memory.usage_in_bytes": f"{current}\n",
                     "memory.limit_in_bytes": f"{9223372036854771712 if limit is None else limit}\n",
                     "memory.stat": f"cache {inactive_file}\nrss {max(0, current - inactive_file)}\n"
                                    f"inactive_file {inactive_file}\ntotal_inactive_file {inactive_file}\n",
                     "memory.oom_control": f"oom_kill_disable 0\nunder_oom 0\noom_kill {oom_kill}\n"}
        for name, text in files.items():  # each file replaced whole: a reader never sees half of one
            tmp = self.path / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.path / name)
        return self


def drive_reality_loop(mm, srv, last_used: dict, *, busy: str, interval_s: float = 0.2, rounds: int = 100) -> list[str]:
    """Run the reconciler's reality loop (agent.memory.reality_loop) against a real server
    (`srv` from tests.support.servers) until an eviction brought reality back within, for at
    most `rounds` x 0.1 s. `last_used`: model -> last use (evicted ones are removed from it);
    `busy` is under a request. Returns the evicted models in order."""
    import asyncio

    from agent.memory import Candidate, reality_loop

    evicted: list[str] = []

    def candidates():
        return [Candidate(n, last_used=u, loaded_at=0, inflight=1 if n == busy else 0) for n, u in last_used.items()]

    async def evict(name: str) -> bool:
        await asyncio.to_thread(srv.call, srv.adapter.unload(name))
        mm.release(name)
        del last_used[name]
        evicted.append(name)
        return True

    async def run() -> None:
        task = asyncio.create_task(reality_loop(mm.reality, candidates, evict, interval_s=interval_s))
        for _ in range(rounds):
            await asyncio.sleep(0.1)
            last = mm.reality.last()
            if evicted and last is not None and not last.excess:
                break
        task.cancel()

    asyncio.run(run())
    return evicted
