"""The data plane against an attacker: a real agent (`modelshelf run`) with its embedded MLServer.

Every case is what an attacker can send to the inference port; each asserts what a user would
notice: no client ever gets another client's answer, every error is {"error": ...} with a reason
and no traceback or server path, and each bound is answered with its error while the others'
requests keep answering.
"""
from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.agentproc import IRIS_ROW, AgentProcess, request
from tests.support.configmap import ConfigMapDir
from tests.support.models import SLOW_IMPLEMENTATION, write_sklearn_model, write_slow_model

MODELS = ("m1", "m2")
AGENT_ARGS = ("--min-residency", "0", "--request-timeout", "5", "--upstream-connections", "8",
              "--max-upstream-per-model", "4", "--max-v1-body-bytes", "4Mi")
# request lines an attacker smuggles into the version segment (percent-decoded by the agent's
# HTTP server): today's main writes them into the upstream request line, where the server reads
# a second request (answered 200, 400 "Invalid HTTP request" or 405 by MLServer 1.7.1)
DESYNC_PATHS = (
    "/v2/models/m1/versions/1%0d%0ax:%20y%0d%0a%0d%0aGET%20*",
    "/v2/models/m1/versions/1%0d%0a%0d%0a",
    "/v2/models/m1/versions/1%0d%0a",
    "/v2/models/m1/versions/1%0d%0a%0d%0a/infer",
)


def _models_config(store, extra: list[dict] | None = None) -> str:
    models = [
        {"name": "m1", "uri": str(store / "m1"), "version": "1"},
        {"name": "m2", "uri": str(store / "m2")},
        {"name": "slow", "uri": str(store / "slow"), "runtime": "mlserver", "implementation": SLOW_IMPLEMENTATION},
        *(extra or []),
    ]
    return json.dumps({"models": models})


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One agent for the module: m1 (version "1"), m2, and `slow` (answers after `delay` s)."""
    root = tmp_path_factory.mktemp("hostile")
    store = root / "store"
    write_sklearn_model(store / "m1", "iris-logreg", 0)
    write_sklearn_model(store / "m2", "tree", 1)
    write_slow_model(store / "slow", delay=30.0)
    cm = ConfigMapDir(root / "config")
    cm.write({"models.json": _models_config(store)})
    agent = AgentProcess(cm.root, root / "cache", root / "agent.log", *AGENT_ARGS).wait_ready()
    try:
        agent.wait_for(lambda s: all(s["models"].get(n, {}).get("state") == "loaded" for n in (*MODELS, "slow")),
                       timeout=60, what="models loaded")
        agent.configmap, agent.store = cm, store
        yield agent
    finally:
        agent.stop()


def infer_body(request_id: str, rows: int = 1) -> bytes:
    return json.dumps({"id": request_id, "inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP64",
                                                      "data": IRIS_ROW * rows}]}).encode()


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written (already percent-encoded) on a fresh connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET %s HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n" % path.encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


class Legit:
    """A client on one keep-alive connection: infers alternating m1/m2, each with its own id;
    records every answer that is not its own."""

    def __init__(self, port: int, index: int):
        self.port, self.index = port, index
        self.answers = 0
        self.wrong: list[str] = []

    def run(self, stop: threading.Event) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        n = 0
        while not stop.is_set():
            model = MODELS[n % 2]
            rid = f"c{self.index}-{n}"
            n += 1
            conn.request("POST", f"/v2/models/{model}/infer", infer_body(rid), {"content-type": "application/json"})
            r = conn.getresponse()
            body = r.read()
            self.answers += 1
            try:
                doc = json.loads(body)
                ok = r.status == 200 and doc.get("model_name") == model and doc.get("id") == rid
            except ValueError:
                ok = False
            if not ok:
                self.wrong.append(f"asked {model} id={rid}, got {r.status} {body[:160]!r}")
        conn.close()


def run_legit_beside(agent: AgentProcess, attack, clients: int = 4) -> list[Legit]:
    """Legitimate clients infer while `attack()` runs; returns them once the attack ended."""
    legit = [Legit(agent.port, i) for i in range(clients)]
    stop = threading.Event()
    threads = [threading.Thread(target=c.run, args=(stop,)) for c in legit]
    for t in threads:
        t.start()
    try:
        attack()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    return legit


def assert_error_shape(status: int, body, expected_status: int | tuple[int, ...]) -> str:
    """An error in the protocol's shape, with a reason and no traceback or server path."""
    expected = expected_status if isinstance(expected_status, tuple) else (expected_status,)
    assert status in expected, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str), body
    reason = body["error"]
    assert reason and "Traceback" not in reason and 'File "' not in reason, reason
    assert not re.search(r"/(tmp|usr|home|work|root|site-packages)\b|\.py\b", reason), reason
    return reason


# ---------------------------------------------------------------------- desync (issue 9 item 1)
def test_a_smuggled_request_line_never_gives_a_client_someone_elses_answer(hostile):
    attacks: list[tuple[int, bytes]] = []

    def attack() -> None:
        for i in range(32):
            attacks.append(raw_get(hostile.port, DESYNC_PATHS[i % len(DESYNC_PATHS)]))
            time.sleep(0.05)

    legit = run_legit_beside(hostile, attack)
    wrong = [w for c in legit for w in c.wrong]
    assert sum(c.answers for c in legit) > 30  # the clients ran beside the attack
    assert wrong == [], f"{len(wrong)} wrong answers, e.g. {wrong[:3]}"
    for status, body in attacks:  # refused before anything was forwarded
        reason = assert_error_shape(status, json.loads(body), 400)
        assert "version" in reason
    # the pool is healthy after: every answer is the asker's own
    after = run_legit_beside(hostile, lambda: time.sleep(1.0), clients=2)
    assert [w for c in after for w in c.wrong] == [] and all(c.answers for c in after)


@pytest.mark.parametrize("path, status", [
    ("/v2/models/m1/versions/1%0d%0ax-a:%20b/infer", 400),  # CR LF
    ("/v2/models/m1/versions/1%201", 400),  # a space
    ("/v2/models/m1/versions/%E2%82%AC", 400),  # not latin-1
    ("/v2/models/m1/versions/%C3%A9", 400),  # latin-1, not ASCII
    ("/v2/models/m1/versions/2", 404),  # not the configured version
    ("/v2/models/m1%0d%0a/infer", 404),  # not a configured model
    ("/v2/models/nope", 404),
    ("/v2/models/m1/infer%0d%0ax:%20y", 404),  # no such route
])
def test_a_crafted_path_gets_a_clean_error_before_anything_is_forwarded(hostile, path, status):
    code, body = raw_get(hostile.port, path)
    assert_error_shape(code, json.loads(body), status)


def test_the_configured_version_and_a_safe_query_string_are_forwarded(hostile):
    code, body = hostile.post("/v2/models/m1/versions/1/infer", data=infer_body("v1"),
                              headers={"content-type": "application/json"})
    assert code == 200 and body["model_name"] == "m1" and body["id"] == "v1", body
    code, body = raw_get(hostile.port, "/v2/models/m2?a=1&b=%0d%0a")
    assert code == 200 and json.loads(body)["name"] == "m2"


# ---------------------------------------------------------------------- error bodies (issue 9 item 4)
DEEP = b'{"instances": ' + b"[" * 100_000 + b"1" + b"]" * 100_000 + b"}"


@pytest.mark.parametrize("path, data, status", [
    ("/v2/models/m1/infer", b'{"inputs": [', (400, 422)),  # malformed JSON
    ("/v2/models/m1/infer", bytes(range(256)) * 4, (400, 422)),  # binary garbage
    ("/v2/models/m1/infer", b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [1, 2]}]}',
     (400, 422, 500)),  # data does not fit the shape: the server's error, as a reason
    ("/v2/models/m1/infer", b'{"inputs": "nope"}', (400, 422)),
    ("/v1/models/m1:predict", b'{"instances": [[], []]}', 400),
    ("/v1/models/m1:predict", b'{"instances": [[1, 2], [3]]}', 400),  # ragged
    ("/v1/models/m1:predict", b'{"instances": "abc"}', 400),
    ("/v1/models/m1:predict", b'{"instances": [["a", 1]]}', 400),
    ("/v1/models/m1:predict", b'{"instances": [{"a": 1}]}', 400),
    ("/v1/models/m1:predict", DEEP, 400),  # nesting: no RecursionError, no 500
    ("/v1/models/m1:predict", b"\x00\xff garbage", 400),
    ("/v1/models/m1:predict", b'{"instances": [1, 2]}', (400, 422, 500)),  # wrong feature count: the model says so
    ("/v1/models/m1:predict", b'{"instances": ["a", "b"]}', (400, 422, 500)),
])
def test_every_error_has_the_protocol_shape_without_traceback_or_path(hostile, path, data, status):
    code, body = hostile.post(path, data=data, headers={"content-type": "application/json"})
    assert_error_shape(code, body, status)


# ---------------------------------------------------------------------- bounds (issue 9 item 3, issue 8 item 8)
def test_a_v1_body_over_its_limit_is_refused_with_the_flag_named(hostile):
    """Refused on its content-length, before the agent reads (or parses) a byte of it."""
    size = 4 * 2**20 + 1
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=30) as s:
        s.sendall(b"POST /v1/models/m1:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n" % size)
        data = b""
        while not data.endswith(b"}") and (chunk := s.recv(65536)):  # a JSON object, then keep-alive
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    reason = assert_error_shape(int(head.split(b" ")[1]), json.loads(body), 413)
    assert "--max-v1-body-bytes" in reason
    # the same body as V2 is within --max-body-bytes (64 MiB): the V1 limit is V1's own
    code, body = hostile.post("/v2/models/m1/infer", data=b"{" + b" " * size + b"}",
                              headers={"content-type": "application/json"})
    assert code != 413 and set(body) == {"error"}, (code, body)


def test_healthz_keeps_answering_while_a_big_v1_body_is_translated(hostile):
    """A V1 body just under 4 MiB (a million one-value rows) whose last row is ragged: the agent
    parses and translates all of it (seconds of CPU) and then refuses it; the server never sees
    it. /healthz requests sent after the whole body was sent keep being answered before that
    answer comes (today none is: the event loop is busy translating)."""
    rows = b"[1]," * (4 * 2**20 // 4 - 100)
    big = b'{"instances": [' + rows + b"[1, 2]]}"
    assert len(big) < 4 * 2**20
    done = threading.Event()
    probes: list[tuple[float, float, int]] = []

    def poll() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", hostile.port, timeout=30)
        while not done.is_set():
            sent = time.monotonic()
            conn.request("GET", "/healthz")
            r = conn.getresponse()
            r.read()
            probes.append((sent, time.monotonic(), r.status))
        conn.close()

    conn = http.client.HTTPConnection("127.0.0.1", hostile.port, timeout=60)
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        conn.putrequest("POST", "/v1/models/m1:predict")
        conn.putheader("content-type", "application/json")
        conn.putheader("content-length", str(len(big)))
        conn.endheaders()
        conn.send(big)
        body_sent = time.monotonic()
        r = conn.getresponse()
        answer = json.loads(r.read())
        answered = time.monotonic()
    finally:
        done.set()
        poller.join(30)
        conn.close()
    assert_error_shape(r.status, answer, 400)
    assert "ragged" in answer["error"]
    inside = [p for p in probes if p[0] > body_sent and p[1] < answered]
    assert len(inside) >= 10 and all(p[2] == 200 for p in inside), (len(probes), len(inside))


def test_a_big_valid_v1_body_is_translated_off_the_loop_and_answered(hostile):
    """20,000 rows (~440 KB, above the 256 KiB in-loop size): the same predictions as one row."""
    code, small = hostile.post("/v1/models/m1:predict", {"instances": [IRIS_ROW]})
    assert code == 200, small
    code, big = hostile.post("/v1/models/m1:predict", {"instances": [IRIS_ROW] * 20_000})
    assert code == 200, big
    assert big["predictions"] == small["predictions"] * 20_000


def test_one_models_hanging_requests_do_not_starve_the_others(hostile):
    """12 requests to `slow` (each would take 30 s) against a pool of 8 with at most 4 per model:
    once all 12 are in flight, requests to m1/m2 are answered while they still hang (before the
    first of them ends); the slow ones end at --request-timeout with 503 + Retry-After, naming
    the model and the bound."""
    slow = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1.0]}]}).encode()
    results: list[tuple[float, int, dict, str | None]] = []
    others: list[tuple[float, int]] = []

    def one_slow(_: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", hostile.port, timeout=60)
        conn.request("POST", "/v2/models/slow/infer", slow, {"content-type": "application/json"})
        r = conn.getresponse()
        body = json.loads(r.read())
        results.append((time.monotonic(), r.status, body, r.getheader("retry-after")))
        conn.close()

    def attack() -> None:
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(one_slow, i) for i in range(12)]
            hostile.wait_for(lambda s: s["models"]["slow"]["inflight"] == 12, timeout=20, what="12 slow in flight")
            for i in range(6):
                code, body = hostile.post(f"/v2/models/{MODELS[i % 2]}/infer", data=infer_body(f"o{i}"),
                                          headers={"content-type": "application/json"})
                others.append((time.monotonic(), code))
            for f in futures:
                f.result()

    legit = run_legit_beside(hostile, attack, clients=2)
    assert [w for c in legit for w in c.wrong] == []
    assert [code for _, code in others] == [200] * 6
    assert len(results) == 12
    first_slow_end = min(t for t, *_ in results)
    assert max(t for t, _ in others) < first_slow_end  # answered while all 12 still hung
    reasons = []
    for _, status, body, retry_after in results:
        reason = assert_error_shape(status, body, 503)
        assert "slow" in reason and retry_after is not None, (reason, retry_after)
        reasons.append(reason)
    assert any("--max-upstream-per-model" in r or "--request-timeout" in r for r in reasons), reasons


# ---------------------------------------------------------------------- metrics (issue 9 item 3)
def _series(agent: AgentProcess) -> set[str]:
    text = agent.get("/metrics")[1].decode()
    return set(re.findall(r'^modelshelf_requests_total\{code="\d+",model="([^"]*)"\}', text, re.M))


def test_metric_labels_only_for_configured_models_and_dropped_with_them(hostile):
    for i in range(20):
        request("POST", f"{hostile.url}/v2/models/made-up-{i}/infer", data=b"x" * 100)
    code, _ = hostile.post("/v2/models/m2/infer", data=infer_body("m"), headers={"content-type": "application/json"})
    assert code == 200
    series = _series(hostile)
    assert not [s for s in series if s.startswith("made-up")], series
    assert "" in series and "m2" in series
    # a model that served requests, then removed from the config: its series go with it
    write_sklearn_model(hostile.store / "temp", "tree", 3)
    temp = {"name": "temp", "uri": str(hostile.store / "temp")}
    hostile.configmap.write({"models.json": _models_config(hostile.store, [temp])})
    hostile.wait_state("temp", "loaded", timeout=60)
    code, _ = hostile.post("/v2/models/temp/infer", data=infer_body("t"), headers={"content-type": "application/json"})
    assert code == 200 and "temp" in _series(hostile)
    hostile.configmap.write({"models.json": _models_config(hostile.store)})
    hostile.wait_state("temp", None, timeout=60)
    assert "temp" not in _series(hostile)


# ---------------------------------------------------------------------- Triton
@pytest.mark.triton
def test_triton_smuggled_request_lines_are_refused_not_left_hanging(tmp_path):
    """Against Triton, a smuggled request line used to hang its upstream slot until the request
    timeout (enough of them fill the pool). Now each is refused at once, while clients of two
    models with distinct outputs keep getting their own answers."""
    from tests.support.models import triton_v2_request, write_triton_model
    from tests.support.servers import triton_available, triton_site_packages

    why = triton_available()
    if why:
        pytest.skip(f"Triton not installed: {why}")
    site = triton_site_packages()
    store = tmp_path / "store"
    write_triton_model(store / "double", name="double", factor=2.0, site_packages=site)
    write_triton_model(store / "triple", name="triple", factor=3.0, site_packages=site)
    cm = ConfigMapDir(tmp_path / "config")
    cm.write({"models.json": json.dumps({"models": [
        {"name": n, "uri": str(store / n), "runtime": "triton", "version": "1"} for n in ("double", "triple")]})})
    agent = AgentProcess(cm.root, tmp_path / "cache", tmp_path / "agent.log", "--server", "triton",
                         "--request-timeout", "20").wait_ready()
    try:
        agent.wait_for(lambda s: all(s["models"].get(n, {}).get("state") == "loaded" for n in ("double", "triple")),
                       timeout=90, what="triton models loaded")
        paths = [p.replace("/m1/", "/double/") for p in DESYNC_PATHS]
        with ThreadPoolExecutor(8) as pool:
            attacks = pool.map(lambda i: raw_get(agent.port, paths[i % len(paths)]), range(16))
            answers = []
            for i in range(10):
                name, factor = ("double", 2.0) if i % 2 == 0 else ("triple", 3.0)
                code, body = agent.post(f"/v2/models/{name}/infer", triton_v2_request([1.0, float(i)]))
                answers.append((code, body["outputs"][0]["data"] if code == 200 else body, [factor, factor * i]))
            attacks = list(attacks)
        assert all(code == 200 and got == want for code, got, want in answers), answers
        for status, body in attacks:
            assert_error_shape(status, json.loads(body), 400)
    finally:
        agent.stop()


# ---------------------------------------------------------------------- a model lost behind the agent
def test_a_model_the_server_lost_is_503_with_retry_after_never_404(tmp_path):
    """Unloaded on the server behind the agent's back (as after a server restart): the agent
    still holds it loaded, so a request gets 503 + Retry-After naming the model (the router
    reports it to the reconciler, which reloads it), never the server's 404 "not found"."""
    write_sklearn_model(tmp_path / "store" / "lost", "tree", 2)
    cm = ConfigMapDir(tmp_path / "config")
    cm.write({"models.json": json.dumps({"models": [{"name": "lost", "uri": str(tmp_path / "store" / "lost")}]})})
    agent = AgentProcess(cm.root, tmp_path / "cache", tmp_path / "agent.log", "--min-residency", "0").wait_ready()
    try:
        status = agent.wait_state("lost", "loaded", timeout=60)
        code, _ = request("POST", f"{status['server']['url']}/v2/repository/models/lost/unload", data=b"{}")
        assert code == 200
        conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
        conn.request("POST", "/v2/models/lost/infer", infer_body("x"), {"content-type": "application/json"})
        r = conn.getresponse()
        body = json.loads(r.read())
        conn.close()
        reason = assert_error_shape(r.status, body, 503)
        assert "lost" in reason and r.getheader("retry-after") is not None
    finally:
        agent.stop()
