"""Planted secrets never reach an output (issue 9 item 2).

Every credential shape a storage URI can carry gets a unique marker: passwords with an
unencoded '/', with '@' and ':', a bare token as userinfo, and the values of every
credential-bearing query parameter (presigned S3/GCS, Azure SAS, GitLab/GitHub tokens, API
keys). Real paths carry them: a `modelshelf run` with its embedded MLServer pulls and loads
models from a local HTTP server through those URIs (one fails, one is rejected by the config
parser), and `modelshelf pull` / `modelshelf cache ls` run on them. Then every surface is
searched for every marker: the agent's log (JSON), /status, /status/models/NAME, the page,
/metrics, every file the cache wrote, `cache ls` (text and --json), pull's stdout and stderr
(plain lines and the progress bar), error and config-rejection messages.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.demo import write_model
from agent.logging import JSONFormatter, TextFormatter
from puller.uri import normalize, parse_uri, redact
from tests.support.agentproc import AgentProcess, request
from tests.support.configmap import ConfigMapDir
from tests.support.httpserver import HTTPFileServer

REPO = Path(__file__).resolve().parents[2]
MARK = "Zq7"  # every planted secret contains this; no other output does


def _m(tag: str) -> str:
    return f"{MARK}{tag}x"


# query parameters that carry credentials: name -> planted value
SECRET_PARAMS = {
    "access_key": _m("ak"), "private_token": _m("pt"), "X-Amz-Signature": _m("as"),
    "X-Amz-Credential": _m("ac"), "X-Amz-Security-Token": _m("ast"), "Signature": _m("sg"), "sig": _m("sig"),
    "sv": _m("sv"), "se": _m("se"), "sp": _m("sp"), "st": _m("st"), "key": _m("key"), "password": _m("pw"),
    "secret": _m("sec"), "token": _m("tok"), "access_token": _m("at"), "api_key": _m("apk"), "apikey": _m("apik"),
    "client_secret": _m("cs"), "GoogleAccessId": _m("gai"), "X-Goog-Signature": _m("gs"), "code": _m("code"),
}
QUERY = "&".join(f"{k}={v}" for k, v in SECRET_PARAMS.items()) + "&v=2&Expires=1700000000"


def uri_shapes(base: str) -> dict[str, str]:
    """model name -> URI with planted secrets; `base` is http://127.0.0.1:PORT."""
    host = base.split("://", 1)[1]
    return {
        "slash-pw": f"http://user{_m('u1')}:{_m('p1a')}/{_m('p1b')}@{host}/m/model.joblib",
        "at-pw": f"http://user{_m('u2')}:{_m('p2a')}@{_m('p2b')}:{_m('p2c')}@{host}/m/model.joblib",
        "token-userinfo": f"http://{_m('t3')}@{host}/m/model.joblib",
        "query": f"{base}/m/model.joblib?{QUERY}",
        "fragment": f"{base}/m/model.joblib#access_token={_m('frag')}",
        "encoded-pw": f"http://user:{_m('p5')}%2F{_m('p5b')}@{host}/m/model.joblib",
        "qmark-pw": f"http://user:{_m('p6')}?{_m('p6b')}#{_m('p6c')}@{host}/m/model.joblib",
    }


def missing_uri(base: str) -> str:
    host = base.split("://", 1)[1]
    return f"http://u:{_m('m1')}/{_m('m2')}@{host}/nothing/model.joblib?private_token={_m('m3')}"


REJECTED = {  # config entries the parser rejects: their reasons must not show the secret either
    "ftp-rejected": f"ftp://user:{_m('r1')}/{_m('r2')}@files.example/m",
    "s3-userinfo": f"s3://AKIA{_m('r3')}:{_m('r4')}/{_m('r5')}@bucket/model",
}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def leaks(text: str) -> list[str]:
    """The planted markers found in `text`, each with a little context."""
    found, start = [], 0
    while (i := text.find(MARK, start)) >= 0:
        found.append(text[max(0, i - 60):i + 20])
        start = i + 1
    return found


def assert_clean(surface: str, text: str | bytes) -> None:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    assert MARK in QUERY  # the search itself works
    found = leaks(text)
    assert not found, f"{surface} shows planted secrets: {found[:5]}"


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("model")
    write_model(d, "logreg", 0)
    return (d / "model.joblib").read_bytes()


@pytest.fixture(scope="module")
def http(model_bytes):
    with HTTPFileServer(files={"m/model.joblib": model_bytes}) as srv:
        yield srv


def cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MODELSHELF_"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_every_surface_of_a_running_agent_is_clean(tmp_path, http):
    shapes = uri_shapes(http.base_url)
    models = [{"name": name, "uri": uri, "runtime": "sklearn"} for name, uri in shapes.items()]
    models.append({"name": "missing", "uri": missing_uri(http.base_url), "runtime": "sklearn"})
    models += [{"name": name, "uri": uri, "runtime": "sklearn"} for name, uri in REJECTED.items()]
    cm = ConfigMapDir(tmp_path / "config")
    cm.write({"models.yaml": json.dumps({"models": models})})
    cache = tmp_path / "cache"
    agent = AgentProcess(cm.root, cache, tmp_path / "agent.log", "--log-format", "json", "--log-level", "debug")
    try:
        agent.wait_ready()
        status = agent.wait_for(lambda s: all(s["models"].get(n, {}).get("state") == "loaded" for n in shapes)
                                and s["models"].get("missing", {}).get("state") == "failed",
                                timeout=90, what="every secret-bearing model loaded, 'missing' failed")
        # the password with '/' and '@' really authenticated (basic auth reached the server intact)
        auths = {h.get("authorization") for _, _, h in http.requests if h.get("authorization")}
        assert basic(f"user{_m('u1')}", f"{_m('p1a')}/{_m('p1b')}") in auths
        assert basic(f"user{_m('u2')}", f"{_m('p2a')}@{_m('p2b')}:{_m('p2c')}") in auths
        assert status["models"]["missing"]["reason"], "a failed model says why"
        rejected = json.dumps(status["config"])
        assert "ftp" in rejected and "s3" in rejected, "both bad entries are reported"
        for name in (*shapes, "missing"):
            code, doc = agent.get(f"/status/models/{name}")
            assert code == 200
            assert "127.0.0.1" in doc["uri"] if isinstance(doc["uri"], str) else True
            assert_clean(f"/status/models/{name}", json.dumps(doc))
        assert_clean("/status", json.dumps(agent.status()))
        code, page = agent.get("/")
        assert code == 200 and b"slash-pw" in page
        assert_clean("the status page", page)
        code, metrics = agent.get("/metrics")
        assert code == 200 and b"modelshelf_" in metrics
        assert_clean("/metrics", metrics)
        # inference through a model whose URI held secrets works and says nothing about them
        code, body = agent.post("/v2/models/slash-pw/infer", {"inputs": [
            {"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]})
        assert code == 200, body
    finally:
        agent.stop()
    log = agent.log()
    assert "slash-pw" in log and "missing" in log
    assert_clean("the agent's log", log)
    written = [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size < 2**20]
    assert any(p.name == "manifest.json" for p in written)
    for p in written:
        if p.suffix != ".joblib":
            assert_clean(f"cache file {p.relative_to(cache)}", p.read_bytes())
    ls = cli("cache", "ls", "--cache-dir", str(cache))
    assert ls.returncode == 0 and "127.0.0.1" in ls.stdout, ls.stderr
    assert_clean("cache ls", ls.stdout + ls.stderr)
    ls_json = cli("cache", "ls", "--json", "--cache-dir", str(cache))
    assert ls_json.returncode == 0 and json.loads(ls_json.stdout)
    assert_clean("cache ls --json", ls_json.stdout + ls_json.stderr)


@pytest.mark.parametrize("shape", ["slash-pw", "at-pw", "query"])
def test_pull_prints_no_secret(tmp_path, http, shape):
    uri = uri_shapes(http.base_url)[shape]
    plain = cli("pull", uri, str(tmp_path / "dest"), "--no-progress")
    assert plain.returncode == 0, plain.stderr
    assert (tmp_path / "dest" / "model.joblib").exists()
    assert "127.0.0.1" in plain.stderr  # it does log what it pulled
    assert_clean("pull --no-progress", plain.stdout + plain.stderr)
    cached = cli("pull", uri, str(tmp_path / "dest2"), "--cache-dir", str(tmp_path / "cache"))
    assert cached.returncode == 0, cached.stderr
    assert_clean("pull --cache-dir (progress bar)", cached.stdout + cached.stderr)


def test_pull_errors_name_the_uri_without_secrets(tmp_path, http):
    missing = cli("pull", missing_uri(http.base_url), str(tmp_path / "dest"), "--no-progress")
    assert missing.returncode == 3, missing.stderr
    assert "nothing/model.joblib" in missing.stderr
    assert_clean("pull of a missing file", missing.stdout + missing.stderr)
    for uri in REJECTED.values():
        bad = cli("pull", uri, str(tmp_path / "dest"), "--no-progress")
        assert bad.returncode == 2, bad.stderr
        assert_clean(f"pull of a bad URI ({uri.split(':')[0]})", bad.stdout + bad.stderr)


def test_redact_parses_every_shape():
    """The choke point itself, on the URIs above and inside free text, and the forms derived
    from a URI (normalized cache-key form, parse errors)."""
    for name, uri in {**uri_shapes("http://h.example:81"), "missing": missing_uri("http://h.example")}.items():
        assert_clean(f"redact({name})", redact(uri))
        assert_clean(f"redact(text with {name})", redact(f"GET {uri} failed: 'x' ({uri}) [{uri}]"))
        assert_clean(f"normalize({name})", normalize(uri))
        assert "h.example" in redact(uri)
    for uri in REJECTED.values():
        with pytest.raises(Exception) as e:
            parse_uri(uri)
        assert_clean("a parse error", str(e.value))
    assert redact("s3://bucket/models/iris@v2/model.bst") == "s3://bucket/models/iris@v2/model.bst"
    assert redact("https://h.example/m.bin?v=2&Expires=1") == "https://h.example/m.bin?v=2&Expires=1"


@pytest.mark.parametrize("formatter", [TextFormatter(), JSONFormatter()], ids=["text", "json"])
def test_log_lines_are_clean_with_exceptions_and_structured_values(formatter):
    """Messages, values of any type (dicts, lists, paths) and exception text, in both formats."""
    uri = uri_shapes("http://h.example")["slash-pw"]
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    log = logging.getLogger("modelshelf.test_secrets")
    log.addHandler(handler)
    try:
        log.warning("pull of %s failed", uri, extra={"_kv": {"source": {"uri": uri}, "uris": [uri], "path": Path(uri)}})
        try:
            raise RuntimeError(f"connection to {uri} reset")
        except RuntimeError:
            log.exception("boom", extra={"_kv": {"uri": uri}})
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    assert "h.example" in text and "boom" in text
    assert_clean("a log line", text)
