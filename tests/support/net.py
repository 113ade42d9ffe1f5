"""Loopback helpers shared by the tests: free ports, waiting for a server, stopping one."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


# Ports are picked from here up to the start of the kernel's ephemeral range (see free_port).
PICK_FROM = 20000
_picks = random.Random()  # seeded from the OS: each test worker (process) picks on its own


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out as the local port of outgoing connections
    (net.ipv4.ip_local_port_range; Linux's default where it cannot be read)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2]
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free on 127.0.0.1 now, outside the kernel's ephemeral range.

    A test starts a server on it a moment later (for an agent, seconds: its imports come first).
    A port of the ephemeral range (bind to port 0 gives one) can meanwhile become the source port
    of any connection made on the machine, the other test worker's clients included, and the
    server then fails to bind it (EADDRINUSE: the agent exits and its /healthz refuses). The
    kernel never hands out a port below that range on its own, so only another bind can take one;
    a random pick keeps the two workers' picks apart, and each pick is checked free."""
    low, _ = ephemeral_range()
    start = PICK_FROM if low - PICK_FROM >= 1000 else 1024
    for _ in range(200):
        port = _picks.randrange(start, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a range that full: the kernel's pick, as before
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, status: int = 200) -> None:
    """Poll `url` until it answers `status`; raise TimeoutError naming the URL otherwise."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == status:
                    return
                last = r.status
        except urllib.error.HTTPError as e:
            last = e.code
            if e.code == status:
                return
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer {status} within {timeout}s (last: {last})")


def stop_group(proc: "subprocess.Popen | None", sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Stop a server started in its own process group: `sig` first (SIGTERM, or SIGQUIT for nginx's
    graceful stop), SIGKILL after `timeout` seconds. Nothing to do when it already exited."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
