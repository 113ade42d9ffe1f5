"""The data plane's fast path (agent.router.Router.fast_forward): a plain infer request for a
loaded model is answered from the connection's callbacks, without an ASGI task. Every test
checks, through /status (`data_plane.fast_path_answers`), that the request it is about took the
fast path, and that the client notices nothing else: the same answers as the ASGI path, the
lease held until the answer is sent, the request timeout, keep-alive, pipelining, HTTP/1.0 and
clients that go away. A real agent with its embedded MLServer."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.agentproc import IRIS_ROW, AgentProcess, request
from tests.support.configmap import ConfigMapDir
from tests.support.models import SLOW_IMPLEMENTATION, write_sklearn_model, write_slow_model

REQUEST_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """`iris` (sklearn, 10Mi), `slow` (echoes after the request's `delay` parameter, 300Mi) and
    `other` (300Mi, lazy): within the 400Mi budget `other` can only load by evicting `slow` (no
    allocator reserve, --server-malloc-keep 0: its default, 1/8 of the budget, would leave no room
    for `slow` beside `iris` and the runtime imports)."""
    root = tmp_path_factory.mktemp("fast-path")
    store = root / "store"
    write_sklearn_model(store / "iris", "iris-logreg", 0)
    write_sklearn_model(store / "other", "tree", 1)
    write_slow_model(store / "slow", delay=0.0)
    models = [
        {"name": "iris", "uri": str(store / "iris"), "memory": "10Mi"},
        {"name": "slow", "uri": str(store / "slow"), "runtime": "mlserver", "implementation": SLOW_IMPLEMENTATION,
         "memory": "300Mi"},
        {"name": "other", "uri": str(store / "other"), "memory": "300Mi", "preload": False},
    ]
    cm = ConfigMapDir(root / "config")
    cm.write({"models.json": json.dumps({"models": models})})
    proc = AgentProcess(cm.root, root / "cache", root / "agent.log", "--min-residency", "0", "--host-memory", "400Mi",
                        "--server-malloc-keep", "0", "--request-timeout", str(REQUEST_TIMEOUT)).wait_ready()
    try:
        proc.wait_for(lambda s: all(s["models"][n]["state"] == "loaded" for n in ("iris", "slow")), timeout=60,
                      what="iris and slow loaded")
        for name in ("iris", "slow"):  # the upstream pool gets idle connections (the fast path needs one)
            assert proc.post(f"/v2/models/{name}/infer", body("warm", name))[0] == 200
        yield proc
    finally:
        proc.stop()


def body(request_id: str, model: str = "iris", delay: float | None = None, row: list[float] = IRIS_ROW) -> dict:
    doc: dict = {"id": request_id, "inputs": [{"name": "x", "shape": [1, len(row)], "datatype": "FP64", "data": row}]}
    if delay is not None:
        doc["parameters"] = {"delay": delay}
    return doc


def fast_answers(agent: AgentProcess) -> int:
    return agent.status()["data_plane"]["fast_path_answers"]


def exchange(port: int, raw: bytes, answers: int = 1, timeout: float = 30, pieces: tuple[int, ...] = (),
             first: tuple[int, ...] = ()) -> tuple[list[tuple[int, dict, bytes]], bool]:
    """Send `raw` bytes on one connection and read `answers` HTTP/1.1 answers (Content-Length
    bodies); returns them as (status, headers, body) and whether the server closed the connection.
    With `pieces`: written in pieces, the `first` sizes then `pieces` cycled, each its own segment
    (TCP_NODELAY and a pause)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if not pieces:
            s.sendall(raw)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        i = n = 0
        while pieces and i < len(raw):
            size = first[n] if n < len(first) else pieces[(n - len(first)) % len(pieces)]
            s.sendall(raw[i:i + size])
            i, n = i + size, n + 1
            time.sleep(0.002)
        buf, out = b"", []
        closed = False
        while len(out) < answers or not closed:
            head_end = buf.find(b"\r\n\r\n")
            if head_end >= 0:
                lines = buf[:head_end].decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
                end = head_end + 4 + int(headers["content-length"])
                if len(buf) >= end:
                    out.append((int(lines[0].split(" ")[1]), headers, buf[head_end + 4:end]))
                    buf = buf[end:]
                    continue
            if len(out) == answers:  # all answers in: is the connection closed (or kept)?
                s.settimeout(0.5)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                closed = True
                break
            buf += chunk
    return out, closed


def post_line(model: str, doc: dict, version: bytes = b"HTTP/1.1", extra: bytes = b"") -> bytes:
    data = json.dumps(doc).encode()
    return (b"POST /v2/models/%s/infer %s\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
            % (model.encode(), version, len(data), extra, data))


def test_the_fast_path_answers_exactly_as_the_asgi_path(agent):
    """The same request through both paths (a query string sends it through the ASGI app):
    the same status, headers and body, for an answer and for a server error."""
    for doc in (body("same-1"), body("same-2", row=[5.1, 3.5, 1.4])):  # 4 features: 200; 3: the server's 500
        before = fast_answers(agent)
        fast = request("POST", f"{agent.url}/v2/models/iris/infer", doc)
        assert fast_answers(agent) == before + 1  # it took the fast path ...
        slow = request("POST", f"{agent.url}/v2/models/iris/infer?via=asgi", doc)
        assert fast_answers(agent) == before + 1  # ... and this one did not
        assert fast == slow
    assert fast[0] == 500 and set(fast[1]) == {"error"} and "4 features" in fast[1]["error"], fast
    for path in ("/v2/models/iris/infer", "/v2/models/iris/infer?via=asgi"):
        data = json.dumps(body("headers")).encode()
        conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
        conn.request("POST", path, data, {"content-type": "application/json"})
        r = conn.getresponse()
        r.read()
        conn.close()
        assert r.status == 200 and sorted(k.lower() for k in r.headers) == ["content-length", "content-type", "date", "server"]


def test_keep_alive_pipelining_and_http_1_0(agent):
    before = fast_answers(agent)
    # two requests in one write on a keep-alive connection: two answers, in order, connection kept
    answers, closed = exchange(agent.port, post_line("iris", body("p1")) + post_line("iris", body("p2")), answers=2)
    assert [(s, json.loads(b)["id"]) for s, _, b in answers] == [(200, "p1"), (200, "p2")]
    assert not closed
    # HTTP/1.0 without keep-alive: the answer says it closes, and the connection is closed
    answers, closed = exchange(agent.port, post_line("iris", body("old"), version=b"HTTP/1.0"))
    assert answers[0][0] == 200 and json.loads(answers[0][2])["id"] == "old"
    assert answers[0][1].get("connection") == "close" and closed
    assert fast_answers(agent) == before + 3


def test_pipelined_requests_split_at_odd_byte_boundaries_are_answered_in_order(agent):
    """Four pipelined requests (a slow one, then one only the ASGI path answers, with a query
    string) arrive in pieces that cut heads, bodies and the gaps between requests anywhere:
    each answer is its own request's, in order, and the slow one is not overtaken by the quick
    ASGI answer behind it (whether the slow one came whole in one read or in pieces)."""
    s1, s2 = post_line("iris", body("s1")), post_line("slow", body("s2", "slow", delay=0.3))
    stream = s1 + s2 + post_line("iris", body("s3")).replace(b"/infer ", b"/infer?via=asgi ", 1) \
        + post_line("iris", body("s4"))
    for first, sizes in (((), (len(stream),)),  # all in one read
                         ((len(s1) + len(s2) + 7,), (1, 2, 5, 11, 17, 64)),  # s1 and s2 whole, the rest in bits
                         ((len(s1), len(s2)), (3, 40)),  # cut at the requests' boundaries, then in bits
                         ((), (1, 2, 5, 11, 17, 64)),  # every head in bits
                         ((), (150, 3))):
        before = fast_answers(agent)
        answers, _ = exchange(agent.port, stream, answers=4, pieces=sizes, first=first)
        assert [(st, json.loads(b).get("id")) for st, _, b in answers] == [(200, "s1"), (200, "s2"), (200, "s3"), (200, "s4")]
        assert fast_answers(agent) == before + 3  # s3 took the ASGI path


@pytest.mark.parametrize("extra", [
    b"content-length: 3\r\n",  # a second, different Content-Length
    b"content-length: 5\r\n",  # placeholder: replaced by the same length below
    b"transfer-encoding: chunked\r\n",  # Transfer-Encoding beside Content-Length
    b"transfer-encoding: identity\r\n",
    b"content-length : 3\r\n",  # a space before the colon
    b"x-folded: a\r\n b\r\n",  # obs-fold
    b"x-bare: a\nx-next: b\r\n",  # a bare LF
], ids=["two-lengths", "same-length-twice", "te-chunked", "te-identity", "space-colon", "obs-fold", "bare-lf"])
def test_a_request_with_ambiguous_framing_is_refused_and_nothing_behind_it_is_answered(agent, extra):
    """Framing two parsers could read differently (two Content-Lengths, Transfer-Encoding with
    Content-Length, malformed header lines) is never forwarded: a 400 and the connection
    closed, and the request pipelined behind it gets no answer (it could be someone's smuggled
    request)."""
    before = fast_answers(agent)
    first = post_line("iris", body("framed"))
    if extra == b"content-length: 5\r\n":
        extra = b"content-length: %d\r\n" % len(json.dumps(body("framed")).encode())
    head, sep, rest = first.partition(b"\r\n\r\n")
    raw = head + b"\r\n" + extra + b"\r\n" + rest + post_line("iris", body("behind"))
    answers, closed = exchange(agent.port, raw)
    assert [a[0] for a in answers] == [400] and closed, answers
    assert fast_answers(agent) == before


def test_a_body_shorter_than_announced_then_a_close_forwards_and_holds_nothing(agent):
    before = fast_answers(agent)
    data = json.dumps(body("short")).encode()
    with socket.create_connection(("127.0.0.1", agent.port), timeout=30) as s:
        s.sendall(b"POST /v2/models/iris/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(data) + 20, data))
        time.sleep(0.2)
    time.sleep(0.2)
    assert fast_answers(agent) == before and agent.status()["models"]["iris"]["inflight"] == 0
    # head and body written apart (as http.client does), the body in two pieces: answered
    answers, _ = exchange(agent.port, post_line("iris", body("apart")), pieces=(120, 30, 1000))
    assert answers[0][0] == 200 and json.loads(answers[0][2])["id"] == "apart"
    assert fast_answers(agent) == before + 1


def test_a_client_that_goes_away_releases_the_lease_when_the_answer_comes(agent):
    before = fast_answers(agent)
    with socket.create_connection(("127.0.0.1", agent.port), timeout=30) as s:
        s.sendall(post_line("slow", body("gone", "slow", delay=1.0)))
        agent.wait_for(lambda st: st["models"]["slow"]["inflight"] == 1, timeout=10, what="slow request in flight")
    # the server still answers after 1 s; then the lease ends though no one reads the answer
    agent.wait_for(lambda st: st["models"]["slow"]["inflight"] == 0, timeout=10, what="the lease released")
    assert fast_answers(agent) == before + 1
    assert agent.post("/v2/models/slow/infer", body("next", "slow"))[0] == 200  # and the model serves on


def metric(agent: AgentProcess, name: str, **labels: str) -> float:
    """The value of one series in the agent's /metrics (0 when absent)."""
    text = request("GET", agent.management_url + "/metrics")[1].decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_fast_path_requests_show_in_the_metrics_at_each_scrape(agent):
    """Answers by model and code, lookup hits and the in-flight gauge (counted as plain
    integers, folded in at the scrape): what a dashboard shows after fast-path requests."""
    ok = metric(agent, "modelshelf_requests_total", model="iris", code="200")
    failed = metric(agent, "modelshelf_requests_total", model="iris", code="500")
    hits = metric(agent, "modelshelf_loaded_lookups_total", result="hit")
    before = fast_answers(agent)
    for i in range(3):
        assert agent.post("/v2/models/iris/infer", body(f"m{i}"))[0] == 200
    assert agent.post("/v2/models/iris/infer", body("bad", row=[1.0]))[0] == 500
    assert fast_answers(agent) == before + 4
    assert metric(agent, "modelshelf_requests_total", model="iris", code="200") == ok + 3
    assert metric(agent, "modelshelf_requests_total", model="iris", code="500") == failed + 1
    assert metric(agent, "modelshelf_loaded_lookups_total", result="hit") >= hits + 4
    t = threading.Thread(target=lambda: agent.post("/v2/models/slow/infer", body("gauge", "slow", delay=1.0)))
    t.start()
    agent.wait_for(lambda st: st["models"]["slow"]["inflight"] == 1, timeout=10, what="slow request in flight")
    assert metric(agent, "modelshelf_inflight_requests", model="slow") == 1
    t.join(30)
    assert metric(agent, "modelshelf_inflight_requests", model="slow") == 0


def test_an_answer_later_than_the_request_timeout_is_503_and_frees_the_lease(agent):
    before = fast_answers(agent)
    started = time.monotonic()
    status, doc = agent.post("/v2/models/slow/infer", body("late", "slow", delay=REQUEST_TIMEOUT + 2))
    waited = time.monotonic() - started
    assert status == 503 and "--request-timeout" in doc["error"], doc
    assert REQUEST_TIMEOUT - 0.5 < waited < REQUEST_TIMEOUT + 1.5, waited  # answered at the timeout, not later
    assert fast_answers(agent) == before + 1
    assert agent.status()["models"]["slow"]["inflight"] == 0
    assert agent.post("/v2/models/slow/infer", body("after", "slow"))[0] == 200


def test_a_fast_path_request_holds_its_lease_until_its_answer_is_sent(agent):
    """`other` needs the memory `slow` holds; a fast-path request to `slow` is in flight: the
    eviction waits for its answer (last: it leaves `slow` evicted)."""
    before = fast_answers(agent)
    result: dict = {}

    def slow_request() -> None:
        result["slow"] = agent.post("/v2/models/slow/infer", body("held", "slow", delay=1.5))
        result["slow_done"] = time.monotonic()

    t = threading.Thread(target=slow_request)
    t.start()
    agent.wait_for(lambda s: s["models"]["slow"]["inflight"] == 1, timeout=10, what="slow request in flight")
    status, doc = agent.post("/v2/models/other/infer", body("other", "other"))
    other_done = time.monotonic()
    t.join(30)
    assert result["slow"][0] == 200 and result["slow"][1]["id"] == "held", result["slow"]
    assert status == 200, doc
    assert result["slow_done"] <= other_done  # slow was not unloaded under its request
    assert fast_answers(agent) == before + 1  # the slow request took the fast path (other loaded lazily: ASGI)
    agent.wait_state("slow", "cached")


def test_a_request_in_flight_when_the_agent_stops_is_answered_before_it_exits(agent):
    """SIGTERM with a fast-path request in flight, and another whose body is still on its way:
    each is answered (the second once its body is in) and its connection closed, then the agent
    exits (last: it stops the module's agent)."""
    assert agent.post("/v2/models/slow/infer", body("load-again", "slow"))[0] == 200  # evicted above: loads lazily
    assert agent.post("/v2/models/slow/infer", body("warm-again", "slow"))[0] == 200
    before = fast_answers(agent)
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("r", agent.post("/v2/models/slow/infer",
                                                                          body("last", "slow", delay=1.5))))
    t.start()
    agent.wait_for(lambda s: s["models"]["slow"]["inflight"] == 1, timeout=10, what="slow request in flight")
    assert fast_answers(agent) == before  # counted when answered
    raw = post_line("iris", body("body-on-its-way"))
    half = socket.create_connection(("127.0.0.1", agent.port), timeout=30)
    half.sendall(raw[:-10])  # the head and most of the body
    stopping = threading.Event()

    def finish_body() -> None:
        stopping.wait(30)
        time.sleep(0.5)  # the agent has its SIGTERM by now
        half.sendall(raw[-10:])
        answer = b""
        while chunk := half.recv(65536):  # until the agent closes it
            answer += chunk
        result["half"] = answer

    t2 = threading.Thread(target=finish_body)
    t2.start()
    stopping.set()
    code = agent.stop()
    t.join(30)
    t2.join(30)
    half.close()
    assert result["r"][0] == 200 and result["r"][1]["id"] == "last", result["r"]
    assert result["half"].startswith(b"HTTP/1.1 200") and b"body-on-its-way" in result["half"], result["half"][:300]
    assert b"connection: close" in result["half"].lower()
    assert code == 0


def test_a_fast_path_answer_carries_the_date_uvicorn_has_now():
    """The answer's date and server lines come from uvicorn's default headers, which uvicorn
    replaces each second: joined once per list, never an older second's."""
    from agent.app import _answer

    parts = (200, [(b"content-type", b"application/json")], b"{}")
    seen = []
    for second in (b"Wed, 02 Dec 2026 20:00:00 GMT", b"Wed, 02 Dec 2026 20:00:01 GMT"):
        defaults = [(b"date", second), (b"server", b"uvicorn")]
        seen += [_answer(defaults, parts, True), _answer(defaults, parts, False)]
    assert seen[0] == (b"HTTP/1.1 200 OK\r\ndate: Wed, 02 Dec 2026 20:00:00 GMT\r\nserver: uvicorn\r\n"
                       b"content-type: application/json\r\n\r\n{}")
    assert seen[1] == seen[0].replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
    assert seen[2] == seen[0].replace(b"20:00:00", b"20:00:01") and seen[3] == seen[1].replace(b"20:00:00", b"20:00:01")


def test_a_request_the_fast_path_hands_on_for_want_of_a_connection_is_never_leased_there():
    """No idle upstream connection now (a burst's first requests): the request goes to the ASGI
    path before any lease is taken, so the lease, the lookup hit and the model's request count
    are the ASGI path's alone (counted once). The router's real upstream pool, empty; the
    reconciler a stand-in that counts leases (the interleaving a real agent gives only by chance)."""
    import asyncio

    from agent.metrics import Metrics
    from agent.router import Router
    from agent.settings import Settings

    class Reconciler:
        settings = Settings(config_dir="/nonexistent", cache_dir="/nonexistent")

        def __init__(self):
            self.leases = []

        def try_acquire(self, name):
            self.leases.append(name)
            return object()

        def release(self, model):
            pass

    async def main():
        reconciler = Reconciler()
        router = Router(reconciler, lambda: "http://127.0.0.1:1", Metrics(), server_ready=lambda: True)
        await router.start()
        handed_on = []
        router.fast_forward("iris", [(b"content-type", b"application/json")], b"{}", lambda parts: None,
                            lambda: handed_on.append(True))
        await router.close()
        return handed_on, reconciler.leases, router.fast_fallbacks
    assert asyncio.run(main()) == ([True], [], 1)
