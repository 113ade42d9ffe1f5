"""Management off the public port, and request heads with a deadline (issue 9 items 5 and 3).

A real `modelshelf run` (embedded MLServer) with a management listener of its own: the public
port answers the data plane and the probes, and 404 for everything else (`/status`, `/metrics`,
the page, `/docs`, `/openapi.json`); the management port answers those (no docs anywhere).
Slowloris: connections that dribble a request head, or send nothing, are closed once
`--header-timeout` passes while ordinary requests keep being answered, and an idle keep-alive
connection (a complete request answered, then quiet) stays usable.
"""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from agent.demo import write_model
from tests.support.agentproc import IRIS_ROW, AgentProcess, request, v2_infer_body
from tests.support.configmap import ConfigMapDir
from tests.support.net import free_port

HEADER_TIMEOUT = 1.0
KEEP_ALIVE_TIMEOUT = 4.0


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    root = tmp_path_factory.mktemp("management")
    write_model(root / "store" / "iris", "logreg", 0)
    cm = ConfigMapDir(root / "config")
    cm.write({"models.yaml": json.dumps({"models": [{"name": "iris", "uri": str(root / "store" / "iris"),
                                                     "runtime": "sklearn"}]})})
    proc = AgentProcess(cm.root, root / "cache", root / "agent.log", f"--management-port={free_port()}",
                        f"--header-timeout={HEADER_TIMEOUT}", f"--keep-alive-timeout={KEEP_ALIVE_TIMEOUT}")
    try:
        proc.wait_ready()
        proc.wait_state("iris", "loaded", timeout=60)
        yield proc
    finally:
        proc.stop()


def get(url: str) -> int:
    return request("GET", url)[0]


def test_public_port_serves_only_the_data_plane_and_probes(agent):
    code, body = agent.post("/v2/models/iris/infer", v2_infer_body([IRIS_ROW]))
    assert code == 200, body
    assert get(agent.url + "/v2/models/iris/ready") == 200
    assert get(agent.url + "/healthz") == 200 and get(agent.url + "/readyz") == 200
    for path in ("/status", "/status/models/iris", "/metrics", "/docs", "/openapi.json", "/redoc"):
        assert get(agent.url + path) == 404, f"{path} is served on the public port"
    # "/" is KServe V1's liveness there (issue 11), never the page, whatever the client accepts
    for accept in ("*/*", "text/html"):
        assert request("GET", agent.url + "/", headers={"accept": accept}) == (200, {"status": "alive"})


def test_management_port_serves_status_metrics_and_page_but_no_docs(agent):
    m = agent.management_url
    assert m != agent.url
    code, status = request("GET", m + "/status")
    assert code == 200 and status["models"]["iris"]["state"] == "loaded"
    assert get(m + "/status/models/iris") == 200
    code, text = request("GET", m + "/metrics")
    assert code == 200 and b"modelshelf_models" in text
    assert get(m + "/") == 200 and get(m + "/healthz") == 200 and get(m + "/readyz") == 200
    for path in ("/docs", "/openapi.json"):
        assert get(m + path) == 404
    # the data plane is not on the management port
    assert get(m + "/v2/models/iris/ready") == 404


def test_management_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "config").mkdir()
        out = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config-dir", str(tmp_path / "config"),
                              "--cache-dir", str(tmp_path / "cache"), "--port", str(free_port()),
                              "--management-port", str(port)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert f"127.0.0.1:{port}" in out.stderr and "--management-port" in out.stderr, out.stderr


def _slow_client(port: int, payload: bytes, stop: threading.Event, closed: list, lock: threading.Lock) -> None:
    """Dribble `payload` one byte every 0.2 s (never finishing the head); record when the
    server closes the connection and what it said."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.settimeout(0.2)
    sent, got = 0, b""
    try:
        while not stop.is_set():
            if sent < len(payload):
                try:
                    s.sendall(payload[sent:sent + 1])
                    sent += 1
                except OSError:
                    break
            try:
                chunk = s.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            got += chunk
    finally:
        s.close()
        if not stop.is_set():
            with lock:
                closed.append(got)


@pytest.mark.parametrize("which", ["public", "management"])
def test_slowloris_connections_are_closed_while_others_are_served(agent, which):
    url = agent.url if which == "public" else agent.management_url
    port = int(url.rsplit(":", 1)[1])
    stop, lock, closed = threading.Event(), threading.Lock(), []
    head = b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 10_000
    threads = [threading.Thread(target=_slow_client, args=(port, head if i % 2 else b"", stop, closed, lock), daemon=True)
               for i in range(60)]
    for t in threads:
        t.start()
    try:
        answered = 0
        deadline = time.monotonic() + 60  # generous: the header timeout is 1 s
        while time.monotonic() < deadline:
            assert get(url + "/healthz") == 200  # others keep being answered meanwhile
            if which == "public":
                code, body = agent.post("/v2/models/iris/infer", v2_infer_body([IRIS_ROW]))
                assert code == 200, body
            answered += 1
            with lock:
                if len(closed) == len(threads):
                    break
            time.sleep(0.1)
        with lock:
            n, answers = len(closed), list(closed)
        assert n == len(threads), f"{len(threads) - n} of {len(threads)} slow connections still open after 60 s"
        assert answered > 0
        partial = [a for a in answers if a]
        assert partial and all(a.startswith(b"HTTP/1.1 408") for a in partial), partial[:3]
    finally:
        stop.set()
        for t in threads:
            t.join(5)


def test_idle_keep_alive_connection_outlives_the_header_timeout(agent):
    """The head deadline covers an incomplete request, not a quiet keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", int(agent.url.rsplit(":", 1)[1]), timeout=30)
    try:
        conn.request("GET", "/healthz")
        first = conn.getresponse()
        assert first.status == 200
        first.read()
        sock = conn.sock
        time.sleep(3 * HEADER_TIMEOUT)
        conn.request("GET", "/v2/models/iris/ready")
        second = conn.getresponse()
        assert second.status == 200
        second.read()
        assert conn.sock is sock, "the same connection answered both requests"
    finally:
        conn.close()


def test_a_keep_alive_connection_closes_once_idle_for_the_timeout_never_while_in_use(agent):
    """Plain infer requests (answered by the public protocol itself) on one connection, each
    sent whole, for longer than --keep-alive-timeout: all answered on that connection; then
    quiet: the agent closes it, once the timeout has passed since the last answer."""
    data = json.dumps(v2_infer_body([IRIS_ROW])).encode()
    raw = (b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    with socket.create_connection(("127.0.0.1", int(agent.url.rsplit(":", 1)[1])), timeout=30) as s:
        for _ in range(6):  # 6 x 0.8 s: past the timeout, with answers all along
            s.sendall(raw)
            answer = b""
            while b'"outputs"' not in answer:
                chunk = s.recv(65536)
                assert chunk, "closed while in use"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            time.sleep(KEEP_ALIVE_TIMEOUT / 5)
        quiet = time.monotonic()
        assert s.recv(65536) == b""  # closed by the agent (a socket.timeout after 30 s otherwise)
        assert time.monotonic() - quiet >= KEEP_ALIVE_TIMEOUT - KEEP_ALIVE_TIMEOUT / 5 - 0.1


def test_a_slow_head_after_a_keep_alive_answer_gets_408(agent):
    """The head deadline covers every request of a kept-alive connection, not only its first:
    after an answer, a request whose head starts and never completes gets a 408 and the
    connection is closed (the deadline is armed when a read leaves a head incomplete)."""
    body = json.dumps(v2_infer_body([IRIS_ROW])).encode()
    with socket.create_connection(("127.0.0.1", int(agent.url.rsplit(":", 1)[1])), timeout=30) as s:
        s.sendall(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += s.recv(65536)
        head, _, rest = answer.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
        while len(rest) < length:
            rest += s.recv(65536)
        assert head.startswith(b"HTTP/1.1 200"), head
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        second = b""
        while chunk := s.recv(65536):  # until the agent closes it
            second += chunk
    assert second.startswith(b"HTTP/1.1 408"), second[:200]


def _raw(port: int, data: bytes) -> bytes:
    """Send `data` (stopping if the server closes) and return everything it answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(data)
        except OSError:  # closed by the server mid-send: read what it said
            pass
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return out


def test_an_oversized_request_head_is_refused_and_bodies_are_not_heads(agent):
    port = int(agent.url.rsplit(":", 1)[1])
    flood = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Flood: " + b"a" * (4 * 2**20)
    answer = _raw(port, flood)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    # a head of 32 KiB (big cookies, long tokens) is fine ...
    code, _ = request("GET", agent.url + "/healthz", headers={"X-Big": "b" * 32 * 1024})
    assert code == 200
    # ... and a body far larger than the head limit is a body, not a head
    rows = [IRIS_ROW] * 8000  # ~ 500 KB of JSON
    code, body = agent.post("/v2/models/iris/infer", v2_infer_body(rows))
    assert code == 200 and len(body["outputs"][0]["data"]) == len(rows)
