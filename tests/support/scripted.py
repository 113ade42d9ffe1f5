"""A scripted co-located server: a RuntimeAdapter whose every call can be held, failed, made to
hang or to kill the "server", on command, and which records every call.

It follows the same contract as the real adapters (checked by tests/runtimes/test_contract.py,
which runs the same tests against MLServer, Triton and this one): a load of a dir that exists
makes the name READY in the index; a load of a missing dir fails with LoadFailed; a dir holding a
file named ``BROKEN`` fails to load (LoadFailed) and a failed reload keeps the previous copy
serving; unloading an unknown name is fine; ``restart()`` empties the server and then awaits
``on_restart`` (as the real adapters do once the server answers again).

Use it to reproduce an interleaving exactly (the reconciler runs for real, only the server is
scripted)::

    gate = adapter.hold("load", "iris")      # the next load of "iris" waits here
    ...                                      # start what should race with it
    await gate.entered.wait()                # the load is in flight now
    gate.release()                           # or gate.fail(LoadFailed(...)), gate.crash()
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from agent.runtimes.base import LoadFailed, RuntimeAdapter, RuntimeErrorBase, ServedModel, ServerUnavailable

BROKEN_MARKER = "BROKEN"


@dataclass
class Call:
    """One recorded adapter call: op ("load" | "unload" | "index"), model name, served path,
    and the outcome ("ok", "error: ..." or None while it is still in flight)."""

    op: str
    name: str | None
    path: Path | None = None
    outcome: str | None = None


@dataclass
class Gate:
    """Holds one adapter call open until `release()`, `fail(exc)` or `crash()`.
    `entered` is set when the call arrived and waits."""

    op: str
    name: str | None
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    _outcome: asyncio.Future | None = None

    def _future(self) -> asyncio.Future:
        if self._outcome is None:
            self._outcome = asyncio.get_running_loop().create_future()
        return self._outcome

    def release(self) -> None:
        """Let the call proceed as the server would do it."""
        if not self._future().done():
            self._future().set_result(None)

    def fail(self, error: BaseException) -> None:
        """Make the call raise `error` (nothing changes on the server)."""
        if not self._future().done():
            self._future().set_result(error)

    def crash(self) -> None:
        """The server dies while this call runs: the call raises ServerUnavailable, every model
        is lost and `on_restart` is awaited (the server came back empty)."""
        if not self._future().done():
            self._future().set_result("crash")


class ScriptedAdapter(RuntimeAdapter):
    """An in-process stand-in for the co-located server (see the module doc)."""

    kind = "scripted"

    def __init__(self, *, load_delay: float = 0.0,
                 on_restart: Callable[[], Awaitable[None]] | None = None):
        self.ready: dict[str, ServedModel] = {}  # name -> the copy the "server" serves
        self.calls: list[Call] = []
        self.load_delay = load_delay
        self.on_restart = on_restart
        self.up = True
        self.restarts = 0
        self._gates: dict[tuple[str, str | None], list[Gate]] = {}
        self._failures: dict[tuple[str, str | None], list[BaseException | str]] = {}
        self.on_load: Callable[[ServedModel], None] | None = None  # a probe run as a load starts

    # -- scripting --------------------------------------------------------------------------

    def hold(self, op: str, name: str | None = None) -> Gate:
        """The next `op` call for `name` (None: for index) waits until the gate opens."""
        gate = Gate(op, name)
        self._gates.setdefault((op, name), []).append(gate)
        return gate

    def fail_next(self, op: str, name: str | None, error: BaseException | str) -> None:
        """The next `op` call for `name` raises `error` ("crash": the server dies during it)."""
        self._failures.setdefault((op, name), []).append(error)

    async def restart(self) -> None:
        """The server restarts: it comes back with no model loaded, then `on_restart` runs."""
        self.ready.clear()
        self.restarts += 1
        if self.on_restart is not None:
            await self.on_restart()

    def lose(self, name: str) -> None:
        """The server forgets one model behind the agent's back (unloaded directly)."""
        self.ready.pop(name, None)

    def count(self, op: str, name: str | None = None) -> int:
        """How many `op` calls (for `name`, when given) were made."""
        return sum(1 for c in self.calls if c.op == op and (name is None or c.name == name))

    # -- RuntimeAdapter ---------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return "http://127.0.0.1:9"  # nothing listens there: the data plane is not scripted

    async def wait_ready(self, timeout: float) -> None:
        if not self.up:
            raise ServerUnavailable(None, "scripted server is down")

    async def is_ready(self) -> bool:
        return self.up

    async def index(self) -> dict[str, str]:
        call = self._record("index", None)
        states = {name: "READY" for name in self.ready}  # as the server saw it when the call arrived
        await self._script(call)
        call.outcome = "ok"
        return states

    async def load(self, model: ServedModel) -> None:
        call = self._record("load", model.name, model.path)
        if self.on_load is not None:
            self.on_load(model)
        await self._script(call)
        if self.load_delay:
            await asyncio.sleep(self.load_delay)
        if not Path(model.path).exists():
            call.outcome = "error: files not found"
            raise LoadFailed(model.name, f"model files not found at {model.path}")
        if (Path(model.path) / BROKEN_MARKER).exists():
            call.outcome = "error: broken"
            raise LoadFailed(model.name, "the model's files do not load (scripted: BROKEN)")
        self.ready[model.name] = model  # in place: the old copy served until now
        call.outcome = "ok"

    async def unload(self, name: str) -> None:
        call = self._record("unload", name)
        await self._script(call)
        self.ready.pop(name, None)
        call.outcome = "ok"

    async def close(self) -> None:
        pass

    def repository_entries(self) -> set[str]:
        return set(self.ready)

    def served_path(self, name: str) -> Path | None:
        served = self.ready.get(name)
        return served.path if served is not None else None

    # -- internals --------------------------------------------------------------------------

    def _record(self, op: str, name: str | None, path: Path | None = None) -> Call:
        call = Call(op, name, path)
        self.calls.append(call)
        return call

    async def _script(self, call: Call) -> None:
        key = (call.op, call.name)
        outcome: BaseException | str | None = None
        if self._gates.get(key):
            gate = self._gates[key].pop(0)
            gate.entered.set()
            outcome = await gate._future()
        elif self._failures.get(key):
            outcome = self._failures[key].pop(0)
        if outcome is None:
            if not self.up:
                outcome = ServerUnavailable(call.name, "scripted server is down")
            else:
                return
        if outcome == "crash":
            call.outcome = "error: server died"
            await self.restart()
            raise ServerUnavailable(call.name, "scripted server died (ConnectError)")
        assert isinstance(outcome, BaseException)
        call.outcome = f"error: {outcome}"
        raise outcome


__all__ = ["BROKEN_MARKER", "Call", "Gate", "RuntimeErrorBase", "ScriptedAdapter"]
