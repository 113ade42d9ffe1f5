"""The health loop's count of failed probes, per server process (agent/health.py), driven with
scripted probe rounds: the interleavings (one process loading while another freezes, a load
sent to a server already marked not ready) take seconds per probe and minutes of real servers
to arrange, and the count itself does no I/O. What a real MLServer answers while it loads is
pinned by tests/fleet/test_agent_ready.py and tests/runtimes/test_mlserver.py."""
from __future__ import annotations

import logging

from agent.health import ServerHealth
from agent.logging import _KV
from agent.runtimes.base import Probe

UP = Probe("up")
FROZEN = Probe("busy")  # no answer in time, nothing in flight
DOWN = Probe("down")


def loading(*names: str, busy_for: float = 4.0) -> Probe:
    return Probe("busy", names, busy_for)


def test_a_load_in_flight_on_one_process_excuses_only_that_process() -> None:
    health = ServerHealth()
    # process 0 loads a model for a long time: its unanswered probes do not count
    assert all(health.observe([loading("big"), UP]) for _ in range(10))
    assert health.busy_doc() == [{"process": 0, "models": ["big"], "seconds": 4.0}]
    # process 1 freezes meanwhile with nothing in flight on it: its neighbour's load excuses nothing
    assert health.observe([loading("big"), FROZEN]) and health.observe([loading("big"), FROZEN])
    assert not health.observe([loading("big"), FROZEN])
    assert health.failed_probes == 3
    assert health.observe([loading("big"), UP])  # back once it answers


def test_the_count_starts_again_when_the_load_ends_and_a_refused_connection_always_counts() -> None:
    health = ServerHealth()
    assert health.observe([FROZEN]) and health.observe([FROZEN])
    assert health.observe([loading("big")])  # a load began: not counted, and the count restarts
    assert health.busy_doc()[0]["models"] == ["big"]
    # the load ended (or timed out: --load-timeout) and the server still does not answer:
    # three more probes, counted from zero
    assert health.observe([FROZEN]) and health.observe([FROZEN])
    assert health.busy_doc() == []
    assert not health.observe([FROZEN])
    health = ServerHealth()
    assert health.observe([Probe("down", ("big",))]) and health.observe([DOWN])  # "down" is never excused
    assert not health.observe([DOWN])


def test_a_load_sent_to_a_server_marked_not_ready_does_not_make_it_ready() -> None:
    health = ServerHealth()
    for _ in range(3):
        health.observe([FROZEN])
    assert not health.observe([loading("a")]) and not health.observe([loading("a")])
    assert health.observe([UP])


def test_a_busy_spell_is_logged_once_when_it_begins(caplog) -> None:
    health = ServerHealth()
    with caplog.at_level(logging.INFO, logger="modelshelf.health"):
        for _ in range(5):
            health.observe([loading("big", "small", busy_for=2.5)])
        health.observe([UP])
        health.observe([loading("other")])
    lines = [r for r in caplog.records if r.getMessage().startswith("server busy loading")]
    assert len(lines) == 2, lines  # one per spell: the first five probes, then the last one
    fields = getattr(lines[0], _KV)
    assert fields["models"] == "big,small" and fields["seconds"] == 2.5 and fields["process"] == 0, fields
