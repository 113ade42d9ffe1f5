"""Run `modelshelf run` as a real subprocess on loopback for tests, and talk to it over HTTP."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from tests.support.net import free_port, stop_group, wait_http


class AgentProcess:
    def __init__(self, config_dir: Path, cache_dir: Path, log_path: Path, *args: str, env: dict[str, str] | None = None,
                 port: int | None = None, grpc_port: int | None = None):
        self.port = port or free_port()  # a port given: the caller chose the address up front (a fleet slot)
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = grpc_port or free_port()  # never the default 8001: agents of parallel tests would share it
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        # one port for everything unless the test asks for a management listener of its own
        # (`--management-port=N`): then /status is read there, the data plane and probes here
        management = [a.split("=", 1)[1] for a in args if a.startswith("--management-port=")]
        single = [] if management else ["--management-port", str(self.port)]
        self.management_url = f"http://127.0.0.1:{management[-1]}" if management else self.url
        cmd = [sys.executable, "-m", "agent.cli", "run", "--config-dir", str(config_dir), "--cache-dir", str(cache_dir),
               "--port", str(self.port), "--grpc-port", str(self.grpc_port), *single, *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> "AgentProcess":
        """Wait for /readyz: the agent listens, its server is up and its preloads are loaded."""
        return self._wait("/readyz", timeout, "agent not ready")

    def wait_up(self, timeout: float = 60) -> "AgentProcess":
        """Wait for /healthz: the agent listens (its server may still be starting or loading)."""
        return self._wait("/healthz", timeout, "agent not up")

    def _wait(self, path: str, timeout: float, what: str) -> "AgentProcess":
        """Poll `path` until it answers 200. Fails at once when the agent process exited (with its
        exit code), else after `timeout`; either way the error carries the agent's log tail."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                wait_http(self.url + path, timeout=min(1.0, max(0.05, deadline - time.monotonic())))
                return self
            except TimeoutError as e:
                if self.proc.poll() is not None:
                    raise TimeoutError(f"{what}: the agent exited with code {self.proc.returncode}; "
                                       f"log:\n{self.log()[-4000:]}") from None
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{what} within {timeout}s ({e}); log:\n{self.log()[-4000:]}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> tuple[int, Any]:
        return request("GET", self.url + path)

    def post(self, path: str, doc: Any = None, data: bytes | None = None, headers: dict | None = None) -> tuple[int, Any]:
        return request("POST", self.url + path, doc, data=data, headers=headers)

    def status(self) -> dict:
        return request("GET", self.management_url + "/status")[1]

    def state(self, name: str) -> str | None:
        m = self.status()["models"].get(name)
        return m["state"] if m else None

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 30, what: str = "condition") -> dict:
        deadline = time.monotonic() + timeout
        status: dict = {}
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; status: {json.dumps(status)[:3000]}")

    def wait_state(self, name: str, state: str | None, timeout: float = 30) -> dict:
        def ok(s: dict) -> bool:
            m = s["models"].get(name)
            return (m is None) if state is None else (m is not None and m["state"] == state)

        return self.wait_for(ok, timeout, f"{name} -> {state}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        stop_group(self.proc, sig, timeout)
        self._log.close()
        return self.proc.returncode


def request(method: str, url: str, doc: Any = None, *, data: bytes | None = None, headers: dict | None = None,
            timeout: float = 30) -> tuple[int, Any]:
    """One HTTP call; returns (status, parsed JSON or raw bytes). Never raises on HTTP errors."""
    if doc is not None:
        data = json.dumps(doc).encode()
        headers = {"content-type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body, status, hdrs = r.read(), r.status, r.headers
    except urllib.error.HTTPError as e:
        body, status, hdrs = e.read(), e.code, e.headers
    if "json" in (hdrs.get("content-type") or ""):
        return status, json.loads(body)
    return status, body


IRIS_ROW = [5.1, 3.5, 1.4, 0.2]


def v2_infer_body(rows: list[list[float]]) -> dict:
    return {"inputs": [{"name": "x", "shape": [len(rows), len(rows[0])], "datatype": "FP64",
                        "data": [v for r in rows for v in r]}]}
