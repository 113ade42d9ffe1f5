"""The test harness's own promises (tests/support): what every other test relies on."""
from __future__ import annotations

import socket

from tests.support.net import ephemeral_range, free_port


def test_free_ports_are_never_ones_an_outgoing_connection_could_take_meanwhile():
    # A server is started on free_port()'s port only a moment (an agent: seconds) later; a port of
    # the ephemeral range could meanwhile become the source port of any connection on the
    # machine, and the server would fail to bind it (EADDRINUSE).
    low, high = ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert not [p for p in ports if low <= p <= high], (low, high, ports)
    assert len(set(ports)) > 40  # random picks: two test workers rarely pick alike
    with socket.socket() as s:  # and each is free to bind
        s.bind(("127.0.0.1", ports[-1]))
