"""N embedded MLServer processes behind one RuntimeAdapter, models partitioned between them
(`--server-processes N`).

Why: one MLServer runs every load, unload and inference of its models on ONE event loop, so
one server process caps a node at one core (issue 13: under cold-start traffic with 19-49 MiB
forests the embedded server sat at ~100% of a core while a miss queued ~50 ms behind other
loads). A load in a thread of the same process does not help (the GIL), and MLServer's own
`parallel_workers` loads every model in every worker (memory x N) and crashes with uvloop>=0.22.
Here each model lives in exactly ONE of N servers (memory x1, plus one interpreter per server
and one runtime import per server that loads a model of it), so loads and inference of
different models run on N cores.

Each shard is a whole `MLServerAdapter`: its own repository subfolder (`<repo>/shard-<i>`), its
own free ports, its own process (restarted on its own by its `ServerProcess`).

Placement: a name stays on the shard it was loaded on until it is unloaded (an update in place
goes to the same server, which swaps the copies without a gap). A new load of a QUICK model goes
to shard 0; any other new load goes to the shard with the fewest loads in flight, then the least
memory reserved (`reserved()`, the ledger's host reservations, wired by the agent), then the
lowest index. Quick: its files' bytes (the cache entry: what its load reads; not its declared
memory, a reservation users round up) are under `QUICK_BYTES` (4 MiB) and its load time, if
known, is under `SLOW_LOAD_S` (100 ms); or, bigger, its load time is under `QUICK_LOAD_S` (20
ms). Its load time (the reconciler's `_placement_load_s`) is the lesser of the server's part of
its last two loads that imported no runtime: an importing load times the import (seconds), and
one load alone may have waited on a busy server loop (a tiny model's, 9-17 ms on average,
took over 100 ms now and then: benchmarks/results/import_place_ab2.md). Why: a second server is worth its core only for loads that block its
loop long (issue 13: 19-49 MiB forests, 20-40 ms of joblib.load each); a tiny model's load is
over in a few ms, and spread over two servers on a 2-core node the second one's loop takes CPU
the agent needs (benchmarks/results/peers.notes.md, bigcold: small's p95 1.3-1.8x one process's;
with this rule 1.05-1.07x in two rounds of three, place). With tiny models only, the other
servers hold nothing and import no runtime, and the memory ledger charges them none (it charges
a runtime's import per process that loaded it, plus one per load admitted and not placed yet:
admission comes before placement, see below; agent/memory/ledger.py `charged_processes`). Either way, while one shard imports a runtime (its first model of it), that
runtime's other new loads go to shards that have imported it or to that one, never start a
second import at once (a quick one too): the memory ledger learns a runtime's import from a
process's first load, and two at once would each see both. The reconciler places a model
(`server_pid_for(..., place=True)`, with its load time and its files' bytes) right before
its load, after the ledger admitted it (so the ledger counts a possible import for it until
then, unless its process is known already: `admission_pid`), and the ledger measures the process the
load goes to.

Upstreams: the data plane asks `base_url_for(name)` / `grpc_target_for(name)` per request; a
name not placed (not loaded) gets shard 0, whose answer (404) the router handles as for one
server. A gRPC ModelStreamInfer goes to the shard of its first message's model.

Restart of one shard: only its models are lost. Its `on_restart` hook gets the names that were
placed on it (`on_shard_restart(names, exit)`), and they are forgotten here (their next load
places them again); the other shards' models keep serving untouched. Readiness: `is_ready()`
and `ready_now()` are true only when every shard is (the agent is not ready while one is
down: its models cannot be served, and the agent alone knows which they are); `probe()` probes
each process, and the agent counts each one's failed probes on its own (agent/health.py).
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

from agent.runtimes.base import LoadFailed, Probe, RuntimeAdapter, ServedModel
from agent.runtimes.mlserver import MLServerAdapter

log = logging.getLogger("modelshelf.runtimes.shards")

OnShardRestart = Callable[[set[str], dict | None], Awaitable[None]]

# a model is quick (placed on shard 0, see the module doc and `is_quick`)
QUICK_BYTES = 4 * 2**20  # its files' bytes below this: quick unless its load time is SLOW_LOAD_S
SLOW_LOAD_S = 0.100
QUICK_LOAD_S = 0.020  # a bigger one whose load time is less than this: quick too


def is_quick(load_s: float | None, size: int | None) -> bool:
    """A model whose load holds its server's loop briefly: small (its files' bytes, what a
    load reads, under QUICK_BYTES) unless its load time (`load_s`: the server's part of a load,
    as the caller judges it; the reconciler's is the lesser of the last two) is SLOW_LOAD_S or
    more, or bigger and its load time is under QUICK_LOAD_S; neither known: not quick. The bytes come
    first because a load's time is the server call's wall, which counts the loop's other work:
    a tiny model's read 20-30 ms on a busy server (peers.notes.md, place), as a forest's does."""
    if size is not None and size < QUICK_BYTES:
        return load_s is None or load_s < SLOW_LOAD_S
    return load_s is not None and load_s < QUICK_LOAD_S


class ShardedAdapter(RuntimeAdapter):
    """`n` embedded MLServers; the methods of one adapter, routed per model name. The agent
    uses it for n >= 2 (`--server-processes`); n == 1 works but is one MLServerAdapter with a
    detour."""

    kind = "mlserver"

    def __init__(self, repository: Path, n: int, *, http_port: int | None = None,
                 on_restart: OnShardRestart | None = None, **kwargs: Any):
        if n < 1:
            raise ValueError(f"server processes must be >= 1, got {n}")
        self.repository = Path(repository).resolve()
        self.on_shard_restart = on_restart
        self.shards: list[MLServerAdapter] = []
        for i in range(n):
            shard = MLServerAdapter.embedded(self.repository / f"shard-{i}", http_port=http_port if i == 0 else None,
                                             on_restart=self._restart_hook(i), **kwargs)
            self.shards.append(shard)
        self._home: dict[str, int] = {}  # name -> the shard it is placed on (loading or loaded)
        self._loading = [0] * n  # loads in flight per shard
        # runtimes each shard has loaded a model of (imported), and per runtime the one load
        # importing it now: while it runs, the runtime's other loads go to shards that have it
        # or to that one, never to a second process importing it at the same time: the memory
        # ledger measures a runtime's import from a process's first load, and two imports at
        # once spoil both measurements (each window sees both)
        self._warm: list[set[str]] = [set() for _ in range(n)]
        self._importing: dict[str, tuple[int, str]] = {}

    # -- placement ----------------------------------------------------------------------

    def shard_of(self, name: str) -> int | None:
        """The index of the shard `name` is placed on (None: not placed)."""
        return self._home.get(name)

    def _place(self, name: str, runtime: str | None, quick: bool = False) -> int:
        i = self._home.get(name)
        if i is None:
            i = self._home[name] = self._choose(runtime, quick)
            log.debug("event=placed model=%s shard=%d loading=%s importing=%s", name, i, self._loading, self._importing)
            if runtime is not None and runtime not in self._warm[i] and runtime not in self._importing:
                self._importing[runtime] = (i, name)  # this load imports the runtime in that process
        return i

    def _choose(self, runtime: str | None, quick: bool = False) -> int:
        """`quick` (`is_quick`): shard 0. Else fewest loads in flight, then least memory
        reserved, then lowest index. Never a second process importing a runtime while another
        one is (see `_importing`), a quick model neither."""
        candidates = range(len(self.shards))
        if runtime is not None and runtime in self._importing:
            importer = self._importing[runtime][0]
            candidates = [j for j in candidates if j == importer or runtime in self._warm[j]]
        if quick and 0 in candidates:
            return 0
        held = [0] * len(self.shards)
        reserved = self.reserved()
        for other, j in self._home.items():
            held[j] += reserved.get(other, 0)
        return min(candidates, key=lambda j: (self._loading[j], held[j], j))

    def server_pid_for(self, name: str, *, runtime: str | None = None, place: bool = False,
                       load_s: float | None = None, size: int | None = None) -> int | None:
        """The pid of the server process `name` is on, or would be placed on now; `place`:
        place it there now (its load follows; the memory ledger measures that process).
        `load_s`: its load time (`is_quick`); `size`: its files' bytes (whether it
        is quick: `is_quick`)."""
        quick = is_quick(load_s, size)
        i = self._place(name, runtime, quick) if place else self._home.get(name)
        if i is None:
            i = self._choose(runtime, quick)
        return self._pid(i)

    def admission_pid(self, name: str, *, runtime: str | None = None, load_s: float | None = None,
                      size: int | None = None) -> int | None:
        """The pid of the server process `name`'s next load will go to, where that is known
        before the load is placed (the memory ledger charges a possible import of its runtime
        from its admission unless that process holds the runtime): the process it is placed on
        (an update in place, a load after one that failed there); else, for a quick model
        (`is_quick`) while the first process holds its runtime, the first process (`_choose`
        puts every quick load there then). None: known only when it is placed. A restart of
        the first process in between sends the load to a process that imports the runtime
        anyway, whose window charges the import (as with one server)."""
        i = self._home.get(name)
        if i is None and runtime is not None and runtime in self._warm[0] and is_quick(load_s, size):
            i = 0
        return self._pid(i) if i is not None else None

    def _pid(self, i: int) -> int | None:
        """The pid of shard `i`'s server process (None while it is down)."""
        process = self.shards[i].process
        return process.pid if process is not None else None

    def _end_import(self, name: str, runtime: str | None, i: int, ok: bool) -> None:
        if ok and runtime is not None:
            self._warm[i].add(runtime)
        if runtime is not None and self._importing.get(runtime) == (i, name):
            del self._importing[runtime]

    def _shard_for(self, name: str) -> MLServerAdapter:
        return self.shards[self._home.get(name, 0)]

    def allocator_reserve(self, process: int | None = None) -> int | None:
        """The allocator reserve of the server process ``process`` (a load's window measures
        that process alone), or with None the processes' reserves together (each as it last
        reported it; None when none reports one)."""
        shards = [s for s in self.shards if process is None or (s.process is not None and s.process.pid == process)]
        figures = [f for f in (shard.allocator_reserve() for shard in shards) if f is not None]
        return sum(figures) if figures else None

    def base_url_for(self, name: str) -> str:
        """HTTP base URL of the server holding `name` (shard 0's when it is not placed)."""
        return self._shard_for(name).base_url

    def grpc_target_for(self, name: str) -> str | None:
        return self._shard_for(name).grpc_target

    # -- lifecycle ------------------------------------------------------------------------

    def _restart_hook(self, i: int) -> Callable[[], Awaitable[None]]:
        async def restarted() -> None:
            lost = {name for name, j in self._home.items() if j == i}
            for name in lost:
                del self._home[name]
            self._warm[i] = set()  # a new process: it imports again
            self._importing = {r: v for r, v in self._importing.items() if v[0] != i}
            process = self.shards[i].process
            log.warning("event=shard_restarted shard=%d models=%d", i, len(lost))
            if self.on_shard_restart is not None:
                await self.on_shard_restart(lost, process.last_exit if process is not None else None)
        return restarted

    async def start(self, timeout: float = 60.0) -> None:
        """Start every shard at once (each is an interpreter importing MLServer: seconds)."""
        results = await asyncio.gather(*(s.start(timeout) for s in self.shards), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop()
            raise errors[0]

    def ports_taken(self) -> bool:
        return any(shard.ports_taken() for shard in self.shards)

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.shards), return_exceptions=True)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.shards))

    @property
    def processes(self) -> list[Any]:
        """Each shard's ServerProcess."""
        return [s.process for s in self.shards]

    @property
    def process(self) -> Any:
        """Shard 0's process (what single-server callers read); see `processes`."""
        return self.shards[0].process

    def server_pids(self) -> list[int]:
        """The root pid of every shard that is up (memory accounting tracks each tree)."""
        return [p.pid for p in self.processes if p is not None and p.pid is not None]

    def server_pid(self) -> tuple[int, ...] | None:
        """Every shard's pid that is up (the memory ledger tracks all their trees), None when none is."""
        return tuple(self.server_pids()) or None

    def status_doc(self) -> dict[str, Any]:
        """/status `server`: every server process, and the models each holds."""
        return {"pids": self.server_pids(), "processes": self.shard_docs()}

    def pids(self) -> list[int]:
        return [pid for s in self.shards for pid in s.pids()]

    def shard_docs(self) -> list[dict[str, Any]]:
        """Per server process, for /status: its URL, pid, restarts and the models placed on it."""
        placed: list[list[str]] = [[] for _ in self.shards]
        for name, i in self._home.items():
            placed[i].append(name)
        return [{"url": s.base_url, "pid": s.process.pid if s.process is not None else None,
                 "restarts": s.restarts, "loads_in_flight": self._loading[i], "models": sorted(placed[i])}
                for i, s in enumerate(self.shards)]

    @property
    def restarts(self) -> int:
        return sum(s.restarts for s in self.shards)

    # -- RuntimeAdapter -----------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.shards[0].base_url

    @property
    def grpc_target(self) -> str | None:  # type: ignore[override]
        return self.shards[0].grpc_target

    async def wait_ready(self, timeout: float) -> None:
        await asyncio.gather(*(s.wait_ready(timeout) for s in self.shards))

    async def is_ready(self) -> bool:
        """Ready only when every shard is: a model placed on a shard that is down cannot be
        served, and which models those are is known only to this adapter (see README)."""
        return all(await asyncio.gather(*(s.is_ready() for s in self.shards)))

    async def probe(self) -> list[Probe]:
        """One probe of each shard's process, in shard order: a shard busy with its own load is
        excused, never one whose neighbour loads (agent/health.py counts them per process)."""
        return [p for probes in await asyncio.gather(*(s.probe() for s in self.shards)) for p in probes]

    def ready_now(self) -> bool:
        """Every shard's process is up and was seen ready (no I/O)."""
        return all(p is None or p.ready for p in self.processes)

    async def index(self) -> dict[str, str]:
        """Every shard's index merged; a name's state is the one its own shard reports."""
        indexes = await asyncio.gather(*(s.index() for s in self.shards))
        merged: dict[str, str] = {}
        for i, states in enumerate(indexes):
            for name, state in states.items():
                if self._home.get(name, i) == i or name not in merged:
                    merged[name] = state
        return merged

    async def load(self, model: ServedModel) -> float | None:
        i = self._place(model.name, model.runtime)
        self._loading[i] += 1
        ok = False
        try:
            server_s = await self.shards[i].load(model)
            ok = True
            return server_s
        except LoadFailed:
            if self.shards[i].served_path(model.name) is None and self._home.get(model.name) == i:
                del self._home[model.name]  # nothing of it there: its next load is placed afresh
            raise
        finally:
            # a load that found its shard down keeps the name placed there: that shard's
            # restart reports it among its lost models
            self._loading[i] -= 1
            self._end_import(model.name, model.runtime, i, ok)

    async def unload(self, name: str) -> None:
        i = self._home.get(name)
        if i is None:  # not placed here (an orphan from before a restart): wherever it has an entry
            await asyncio.gather(*(s.unload(name) for s in self.shards if name in s.repository_entries()))
            return
        await self.shards[i].unload(name)
        if self._home.get(name) == i:
            del self._home[name]
        for runtime, (j, importer) in list(self._importing.items()):
            if importer == name and j == i:  # placed for a load that never came
                del self._importing[runtime]

    def repository_entries(self) -> set[str]:
        return set().union(*(s.repository_entries() for s in self.shards))

    def served_path(self, name: str) -> Path | None:
        i = self._home.get(name)
        if i is not None:
            return self.shards[i].served_path(name)
        return None


__all__ = ["QUICK_BYTES", "QUICK_LOAD_S", "SLOW_LOAD_S", "ShardedAdapter", "is_quick"]
