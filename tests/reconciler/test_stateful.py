"""Hypothesis stateful runs of the real Reconciler/MemoryManager/Cache with the scripted server:
random config edits, requests (acquire/release), load failures, server restarts and models lost
behind the agent's back, checking after every step:

  * no reservation without its model loaded, loading or unloading (`name#new`: updating);
  * the ledger within budget (unloading models counted as gone, as admission does);
  * no unload while a request holds the model;
  * every copy the server serves is leased by its model and present on disk;
  * no model task crashed (the safety net logs "model step crashed"), no unhandled task error;
  * once quiet, no model stuck `updating`.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from agent.reconciler import ModelUnavailable, State, UnknownModel
from agent.runtimes.base import LoadFailed
from tests.reconciler.conftest import KB, Harness

NAMES = ("a", "b", "c")
BUDGET = 300 * KB  # two 128 KiB models fit, three do not


class _Crashes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "crashed" in record.getMessage() or "failed" in record.getMessage():
            self.seen.append(record.getMessage())


class ReconcilerMachine(RuleBasedStateMachine):
    http = None  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.errors: list[str] = []
        self.loop.set_exception_handler(lambda loop, ctx: self.errors.append(str(ctx.get("exception") or ctx["message"])))
        self.tmp = Path(tempfile.mkdtemp(prefix="rec-stateful-"))
        self.h = Harness(self.tmp, self.http, budget=BUDGET, retry_base_s=0.02, drain_timeout_s=30.0)
        self.crashes = _Crashes()
        logging.getLogger("modelshelf.reconciler").addHandler(self.crashes)
        self.unsafe_unloads: list[str] = []
        unload = self.h.adapter.unload

        async def checked_unload(name: str) -> None:
            m = self.h.rec.models.get(name)
            if m is not None and m.inflight > 0:
                self.unsafe_unloads.append(f"{name} unloaded with {m.inflight} in flight")
            await unload(name)

        self.h.adapter.unload = checked_unload  # type: ignore[method-assign]
        self.desired: dict[str, tuple[int, bool, bool]] = {}  # name -> (version, preload, broken)
        self.leases: list = []
        self.pending: list[asyncio.Task] = []
        self.run(self.h.__aenter__())

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def spin(self, seconds: float = 0.03) -> None:
        self.run(asyncio.sleep(seconds))
        done = [t for t in self.pending if t.done()]
        for t in done:
            self.pending.remove(t)
            if t.cancelled():
                continue
            e = t.exception()
            if e is None:
                self.leases.append(t.result())
            elif not isinstance(e, (ModelUnavailable, UnknownModel)):
                self.errors.append(f"acquire raised {type(e).__name__}: {e}")

    async def _apply(self) -> None:
        specs = [self.h.spec(n, self.h.publish(n, version=f"v{v}", broken=broken), preload=preload)
                 for n, (v, preload, broken) in sorted(self.desired.items())]
        await self.h.apply(*specs, settle=False)

    # -- rules ------------------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES), version=st.integers(1, 2), preload=st.booleans(),
          broken=st.sampled_from([False, False, False, True]))
    def configure(self, name, version, preload, broken):
        self.desired[name] = (version, preload, broken)
        self.run(self._apply())
        self.spin(0.15)  # long enough for a pull and a load: requests then find it loaded

    @rule(name=st.sampled_from(NAMES))
    def remove(self, name):
        if self.desired.pop(name, None) is not None:
            self.run(self._apply())
        self.spin()

    @rule(name=st.sampled_from(NAMES))
    def request(self, name):
        self.pending.append(self.loop.create_task(self.h.rec.acquire(name)))
        self.spin()

    @rule(index=st.integers(0, 7))
    def finish_request(self, index):
        if self.leases:  # (no precondition: what is leased depends on timing)
            self.h.rec.release(self.leases.pop(index % len(self.leases)))
        self.spin()

    @rule(name=st.sampled_from(NAMES))
    def next_load_fails(self, name):
        self.h.adapter.fail_next("load", name, LoadFailed(name, "scripted failure"))

    @rule()
    def server_restarts(self):
        self.run(self.h.adapter.restart())
        self.spin()

    @rule(name=st.sampled_from(NAMES))
    def lost_behind_our_back(self, name):
        self.h.adapter.lose(name)

        async def the_router_saw_a_404() -> None:
            self.h.rec.report_missing(name)

        self.run(the_router_saw_a_404())
        self.spin()

    @rule()
    def time_passes(self):
        self.spin(0.15)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def reservations_belong_to_live_models(self):
        for slot in self.h.memory.reservations():
            name, _, new = slot.partition("#")
            m = self.h.rec.models.get(name)
            assert m is not None, f"reservation {slot!r} without a model"
            if new:
                assert m.state is State.LOADED and m.updating, f"{slot!r} reserved while {m.state.value}, updating={m.updating}"
            else:
                assert m.state in (State.LOADED, State.LOADING, State.UNLOADING), f"{slot!r} reserved while {m.state.value}"

    @invariant()
    def ledger_within_budget(self):
        assert self.h.memory.free()["host"] >= 0, self.h.memory.reservations()

    @invariant()
    def no_unload_under_a_request(self):
        assert not self.unsafe_unloads, self.unsafe_unloads

    @invariant()
    def served_entries_leased_and_present(self):
        for name, m in self.h.rec.models.items():
            if m.state is not State.LOADED or m.served is None:
                continue
            key = m.served.entry.key
            assert self.h.leased(name, key), f"{name} serves {key} without a lease"
            assert self.h.cache.check(m.served.entry) == [], f"{name} serves a damaged entry"

    @invariant()
    def nothing_crashed(self):
        assert not self.crashes.seen, self.crashes.seen
        assert not self.errors, self.errors

    def teardown(self):
        try:
            for m in self.leases:
                self.h.rec.release(m)
            self.leases.clear()
            self.spin(0.05)
            for t in self.pending:
                t.cancel()
            if self.pending:
                self.run(asyncio.wait(self.pending))
            self.run(self.h.rec.wait_idle(10))
            stuck = [n for n, m in self.h.rec.models.items() if m.updating]
            assert not stuck, f"updating stuck: {stuck}"
            self.reservations_belong_to_live_models()
            self.nothing_crashed()
        finally:
            logging.getLogger("modelshelf.reconciler").removeHandler(self.crashes)
            self.run(self.h.__aexit__(None, None, None))
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


def test_reconciler_invariants_hold_under_random_edits_requests_and_faults(http):
    ReconcilerMachine.http = http
    run_state_machine_as_test(ReconcilerMachine, settings=settings(
        max_examples=12, stateful_step_count=15, deadline=None, derandomize=True,
        suppress_health_check=list(HealthCheck)))
