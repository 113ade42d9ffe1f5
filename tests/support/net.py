"""Loopback helpers shared by the tests: free ports, waiting for a server, stopping one."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
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
