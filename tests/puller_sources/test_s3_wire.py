"""The S3 wire client (puller.sources.s3_wire) against moto's real server with IAM checks on (so
every signature is verified by the server), plus a scripted endpoint for a wrong-region answer,
a self-signed HTTPS endpoint (TLS verification) and one that closes idle keep-alive connections,
and the CLI's imports per scheme (botocore only where credentials need its chain; nothing of the
agent, no digest or progress-bar library, no other scheme's client)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from puller.errors import IntegrityError
from puller.sources.base import NullProgress, PullOptions, open_source
from tests.puller_sources.conftest import tree
from tests.puller_sources.test_s3_transfer import proxy_factory  # noqa: F401 - fixture
from tests.support.httpserver import HTTPFileServer
from tests.support.s3server import S3Server

ROOT = Path(__file__).resolve().parents[2]


def _pull(uri: str, dest: Path, begin: bool = False) -> None:
    """A source's list + fetch, as the agent's cache does; `begin`: its listing begun first, as
    `modelshelf pull` does (the HEAD and the first LIST page sent together)."""
    src = open_source(uri, PullOptions(retry_deadline_s=2))
    if begin:
        src.begin_list()
    src.fetch(src.list(), dest, NullProgress())


def test_keys_that_need_encoding_round_trip_with_verified_signatures(s3: S3Server, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """SigV4's canonical path and query encoding, and the url-encoded listing: a signature
    mistake is SignatureDoesNotMatch from moto's IAM check, a decoding mistake a wrong tree."""
    names = ["plain.bin", "with space.bin", "plus+sign.bin", "pct%41.bin", "ünï/cöde.bin", "a=b&c.bin",
             "tilde~(x).bin", "sub/dir/x.bin"]
    files = {f"odd/{n}": f"bytes of {n}".encode() for n in names}
    for k, v in files.items():
        s3.put("models", k, v)
    with s3.iam_auth() as (key_id, secret):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        _pull("s3://models/odd", tmp_path / "all")
        _pull("s3://models/odd/with space.bin", tmp_path / "one")
    assert tree(tmp_path / "all") == {k.removeprefix("odd/"): v for k, v in files.items()}
    assert tree(tmp_path / "one") == {"with space.bin": files["odd/with space.bin"]}


@pytest.mark.parametrize("algo", ["CRC32", "SHA256"])
def test_a_listed_prefix_checks_each_store_checksum_as_it_streams(algo: str, s3: S3Server, proxy_factory,
                                                                   tmp_path: Path) -> None:
    """A prefix listing carries no checksums: only the GET's x-amz-checksum-* header can catch a
    byte changed in transit (same length, so sizes agree)."""
    body = b"weights " * 500 + b"MARKER" + b" weights" * 500
    s3.client().put_object(Bucket="models", Key="ckp/a/model.bin", Body=body, ChecksumAlgorithm=algo)
    _pull("s3://models/ckp/a", tmp_path / "good")
    assert (tmp_path / "good" / "model.bin").read_bytes() == body
    proxy_factory(swap=(b"MARKER", b"MARKEX"))
    with pytest.raises(IntegrityError, match="checksum"):
        _pull("s3://models/ckp/a", tmp_path / "bad")


class _Scripted(ThreadingHTTPServer):
    """A scripted endpoint on 127.0.0.1, serving from its own thread once made."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass


class _WrongRegion(_Scripted):
    """Answers 301 + x-amz-bucket-region: eu-west-2 to any request not signed for eu-west-2
    (as S3 does), else serves one object; records each request's signing scope by request."""

    body = b"served from eu-west-2"

    def __init__(self) -> None:
        self.scopes: dict[str, list[str]] = {}  # "HEAD" / "LIST" / "GET" -> regions signed for
        super().__init__(_WrongRegionHandler)


class _WrongRegionHandler(_Handler):
    server: _WrongRegion

    def do_HEAD(self) -> None:
        scope = self.headers.get("Authorization", "").split("Credential=")[-1].split(",")[0]
        what = "LIST" if "list-type=" in self.path else self.command
        self.server.scopes.setdefault(what, []).append(scope.split("/")[2] if scope.count("/") >= 2 else scope)  # KEY/DAY/REGION/s3/...
        if "/eu-west-2/s3/" not in scope:
            self.send_response(301)
            self.send_header("x-amz-bucket-region", "eu-west-2")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("ETag", '"e1"')
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(self.server.body)

    do_GET = do_HEAD


def _pull_from(srv: ThreadingHTTPServer, uri: str, dest: Path, monkeypatch: pytest.MonkeyPatch,
               begin: bool = False) -> None:
    """Pull `uri` from the scripted endpoint `srv` (static keys), then stop it."""
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{srv.server_address[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASCRIPTED")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "scripted-secret")
        _pull(uri, dest, begin)
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_wrong_region_answer_is_signed_again_for_the_bucket_region_once(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    srv = _WrongRegion()
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    _pull_from(srv, "s3://bkt/m/model.bin", tmp_path, monkeypatch, begin=True)
    assert (tmp_path / "model.bin").read_bytes() == _WrongRegion.body
    # HEAD (us-east-1: 301), HEAD again for eu-west-2, then the GET straight to eu-west-2; the LIST
    # sent with the first HEAD (in case the key is a prefix) is dropped unread, never sent again
    # (the server may not have read it before the client closed that connection)
    assert srv.scopes.pop("LIST", []) in ([], ["us-east-1"])
    assert srv.scopes == {"HEAD": ["us-east-1", "eu-west-2"], "GET": ["eu-west-2"]}


class _HeadWaitsForList(_Scripted):
    """A store that answers a HEAD only once a LIST has reached it (or after 5 s): a client that
    sends the LIST only after the HEAD's answer finds the HEAD answered late and `list_first`
    False. The key is a prefix (HEAD: 404) holding one object. A stand-in: no real server can be
    made to hold one request's answer until another request arrives."""

    body = b"under the prefix"

    def __init__(self) -> None:
        self.listed = threading.Event()
        self.list_first: bool | None = None  # whether the LIST arrived before the HEAD was answered
        self.requests: list[str] = []
        super().__init__(_HeadWaitsForListHandler)


class _HeadWaitsForListHandler(_Handler):
    server: _HeadWaitsForList

    def _send(self, status: int, body: bytes = b"", head_only: bool = False) -> None:
        self.send_response(status)
        self.send_header("ETag", '"e1"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.server.requests.append("HEAD")
        self.server.list_first = self.server.listed.wait(5)
        self._send(404, head_only=True)

    def do_GET(self) -> None:
        if "list-type=2" in self.path:
            self.server.requests.append("LIST")
            self.server.listed.set()
            size = len(self.server.body)
            self._send(200, (f'<ListBucketResult><IsTruncated>false</IsTruncated><Contents><Key>m/w.bin</Key>'
                             f'<Size>{size}</Size><ETag>"e1"</ETag></Contents></ListBucketResult>').encode())
        else:
            self.server.requests.append("GET " + self.path)
            self._send(200, self.server.body)


def test_the_head_and_the_first_list_page_go_out_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key that may be an object or a prefix costs one round trip before the listing is known:
    the LIST is sent with the HEAD, not after its answer."""
    srv = _HeadWaitsForList()
    _pull_from(srv, "s3://bkt/m", tmp_path, monkeypatch, begin=True)
    assert (tmp_path / "w.bin").read_bytes() == _HeadWaitsForList.body
    assert srv.list_first is True
    assert sorted(srv.requests) == ["GET /bkt/m/w.bin", "HEAD", "LIST"]


def test_the_agents_pull_of_one_object_sends_the_head_alone(s3: S3Server, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The HEAD and LIST sent together are `modelshelf pull`'s start-up only: the agent's pulls
    (Cache.ensure, whose listing nobody began) send no LIST for a key that is one object (one
    request fewer per model, and no AccessDenied in the store's audit log where the key may not
    list). The requests are read off this process's sockets, on their way to moto."""
    import socket

    s3.put("models", "one/model.bin", b"one object")
    port = s3.endpoint_url.rsplit(":", 1)[1].encode()
    sent: list[str] = []
    sendall = socket.socket.sendall

    def recording(self, data, *args, **kwargs):
        if b"Host: 127.0.0.1:" + port in bytes(data):
            sent.append(bytes(data).split(b" ", 2)[0].decode() + (" LIST" if b"list-type=" in bytes(data) else ""))
        return sendall(self, data, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "sendall", recording)
    from puller.cache import Cache

    entry = Cache(tmp_path / "cache").ensure("s3://models/one/model.bin", PullOptions(retry_deadline_s=2))
    assert (Path(entry.path) / "model.bin").read_bytes() == b"one object"
    assert sent == ["HEAD", "GET"]


_PROBE = """
import socket, sys
first_request, first_get = [], []  # the modules imported when the first request / GET of an object leaves
send = socket.socket.sendall
def sendall(self, data, *args, **kwargs):
    for seen, starts in ((first_request, True), (first_get, data.startswith(b"GET ") and b"list-type=" not in data)):
        if starts and not seen:
            seen.append(sorted(m for m, module in sys.modules.items() if module is not None))
    return send(self, data, *args, **kwargs)
socket.socket.sendall = sendall
from agent.cli import main
code = main(sys.argv[1:])
imported = [m for m, module in sys.modules.items() if module is not None]  # None: an import blocked, not made
import json
print(json.dumps({"code": code, "heavy": sorted(m for m in imported if m.split(".")[0] in ("botocore", "boto3", "s3transfer")),
                  "modules": sorted(imported), "before_first_request": (first_request or [None])[0],
                  "before_first_get": (first_get or [None])[0]}))
"""


def _cli_modules(args: list[str], env: dict[str, str]) -> dict:
    r = subprocess.run([sys.executable, "-c", _PROBE, "pull", *args, "--no-progress"], env=env,
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_cli_imports_botocore_only_for_credentials_that_need_its_chain(s3: S3Server, tmp_path: Path) -> None:
    """Start-up is most of a short pull: local and HTTP pulls never import botocore/boto3, nor
    an S3 pull with static keys; a profile (shared credentials file) does, and still works."""
    s3.put("models", "iris/model.joblib", b"model-bytes")
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "w.bin").write_bytes(b"local")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PYTHON"))}
    env.update(s3.env(), PYTHONPATH=str(ROOT), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    with HTTPFileServer(files={"m/w.bin": b"http"}) as srv:
        runs = {"local": [str(tmp_path / "local"), str(tmp_path / "d1")],
                "http": [srv.url("m/w.bin"), str(tmp_path / "d2")],
                "s3 static keys": ["s3://models/iris", str(tmp_path / "d3")]}
        for name, args in runs.items():
            out = _cli_modules(args, env)
            assert (out["code"], out["heavy"]) == (0, []), name
    creds = tmp_path / "credentials"
    creds.write_text(f"[team]\naws_access_key_id = {env.pop('AWS_ACCESS_KEY_ID')}\n"
                     f"aws_secret_access_key = {env.pop('AWS_SECRET_ACCESS_KEY')}\n")
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(creds), AWS_PROFILE="team")
    out = _cli_modules(["s3://models/iris", str(tmp_path / "d4")], env)
    assert out["code"] == 0 and "botocore" in out["heavy"] and "boto3" not in out["heavy"]
    assert (tmp_path / "d4" / "model.joblib").read_bytes() == b"model-bytes"


def test_http_proxy_from_the_environment_is_used_unless_no_proxy_names_the_host(
        s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.puller_sources.test_s3_transfer import _KeepAliveHandler, _KeepAliveProxy

    class _Forward(_KeepAliveHandler):  # a forward proxy gets absolute URIs: pass the path on
        def _forward(self) -> None:
            self.path = "/" + self.path.split("://", 1)[-1].split("/", 1)[-1]
            super()._forward()
        do_GET = do_HEAD = _forward

    s3.put("models", "px/w.bin", b"through the proxy")
    proxy = _KeepAliveProxy(s3.endpoint_url)
    proxy.RequestHandlerClass = _Forward
    try:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "example.invalid")
        _pull("s3://models/px", tmp_path / "a")
        assert proxy.requests == 3  # HEAD (no such key: a prefix), LIST, GET
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        _pull("s3://models/px", tmp_path / "b")
        assert proxy.requests == 3
    finally:
        proxy.close()
    assert tree(tmp_path / "a") == tree(tmp_path / "b") == {"w.bin": b"through the proxy"}


# what no `pull` needs: the agent and its settings (pydantic), botocore for static keys, digests
# of a scratch cache (xxhash), a progress bar with --no-progress (rich), servers' stacks
_NEVER_FOR_PULL = ("pydantic", "pydantic_core", "botocore", "boto3", "s3transfer", "xxhash", "rich", "click", "pygments", "yaml",
                   "starlette", "uvicorn", "psutil", "grpc")
# what an S3 pull imports only once its listing's HEAD and LIST are on the wire (the store answers
# them meanwhile): the cache and what only it uses, the progress sinks, the transfer's thread
# pool, the listing's XML parser; and never before it, unless a request needs it: datetime (the
# signature's date comes from time), random (a retry's backoff), json (a storage config),
# base64 / zlib (a store's checksum, a proxy's password), shutil with bz2 and lzma (argparse's help
# formatter imports it for every argument; agent.cli's does not), logging with traceback, tokenize,
# textwrap and string (the modules on the way log through puller.logs' loggers, made on first use)
_AFTER_FIRST_REQUEST = ("puller.cache", "puller.progress", "tempfile", "concurrent", "xml", "datetime", "random", "json",
                        "base64", "zlib", "shutil", "bz2", "lzma",
                        "logging", "traceback", "linecache", "tokenize", "textwrap", "string")
# and what waits until the transfer is under way: the drop-in sends its first GETs as soon as the
# listing is known (puller.cli._fetch_ahead), then imports the cache, the progress sinks, the
# transfer's thread pool (concurrent.futures), json (the scratch entry's files) and logging (the
# listing's record is made after those GETs; a prefix's 404 HEAD makes none), fcntl (the key's
# lock), ctypes (fallocate); the scratch root is made without tempfile, the cache imports shutil
# (rmtree) and datetime (the manifest's date) where it uses them
_AFTER_FIRST_GET = ("tempfile", "random", "shutil", "bz2", "lzma", "datetime", "puller.cache", "puller.progress",
                    "concurrent", "json", "logging", "traceback", "tokenize", "textwrap", "string", "fcntl", "ctypes",
                    "queue")
# an S3 pull of plain files with static keys and no AWS config file also leaves these to the
# pulls that need them: archive readers (an archive), configparser (an .s3cfg, an AWS config
# file), uuid (never: temp names come from os.urandom), http.client with email's parser (the wire
# client speaks HTTP/1.1 itself), ssl (an https endpoint only), OpenSSL's hashes (hashlib, hmac:
# signatures and cache keys use the built-in sha256; a store checksum or file sha256 imports it)
# and typing (annotations are strings; nothing on the path needs it at run time), the idna codec
# (an ASCII endpoint host goes to getaddrinfo as bytes; encodings.idna is a module of encodings),
# dataclasses with inspect, ast and dis (puller.record makes the puller's value classes; httpx's
# dependencies import dataclasses for an http:// pull), shutil with bz2 and lzma (the scratch root
# is removed with os.walk; shutil only where that fails) and datetime (the manifest's date comes
# from time)
_NOT_FOR_SCHEME = {"s3": ("httpx", "httpcore", "h11", "anyio", "urllib3", "tarfile", "zipfile", "configparser", "uuid",
                          "http", "email", "ssl", "hashlib", "_hashlib", "hmac", "typing", "stringprep",
                          "dataclasses", "inspect", "ast", "dis", "shutil", "bz2", "lzma", "datetime"),
                   "http": ("urllib3", "xml")}


def test_a_pull_imports_nothing_of_the_agent_nor_what_its_scheme_does_not_use(s3: S3Server, tmp_path: Path) -> None:
    """`modelshelf pull` is dispatched before anything of the agent is imported (agent.cli
    only), records no digests in its throw-away cache, and loads one scheme's client: the wire
    client for s3:// (no urllib3, no http.client, no ssl for an http:// endpoint), httpx (without its CLI) for http://. Interpreter start-up is most of a short pull,
    and an S3 pull's first request leaves before the cache code is imported (_AFTER_FIRST_REQUEST)."""
    s3.put("models", "lean/w.bin", b"s3-bytes")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PYTHON", "MODELSHELF_"))}
    env.update(s3.env(), PYTHONPATH=str(ROOT), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    with HTTPFileServer(files={"m/w.bin": b"http-bytes"}) as srv:
        runs = {"s3": ["s3://models/lean", str(tmp_path / "s3")], "http": [srv.url("m/w.bin"), str(tmp_path / "http")]}
        for scheme, args in runs.items():
            out = _cli_modules(args, env)
            assert out["code"] == 0, scheme
            agent = [m for m in out["modules"] if m.split(".")[0] == "agent" and m not in ("agent", "agent.cli")]
            unwanted = [m for m in out["modules"] if m.split(".")[0] in _NEVER_FOR_PULL + _NOT_FOR_SCHEME[scheme]
                        or (scheme == "s3" and m == "encodings.idna")]
            assert (agent, unwanted) == ([], []), scheme
            if scheme == "s3":
                early = [m for m in out["before_first_request"] if m in _AFTER_FIRST_REQUEST
                         or m.split(".")[0] in _AFTER_FIRST_REQUEST]
                early += [m for m in out["before_first_get"] if m in _AFTER_FIRST_GET
                          or m.split(".")[0] in _AFTER_FIRST_GET]
                assert early == []
    assert (tmp_path / "s3" / "w.bin").read_bytes() == b"s3-bytes"
    assert (tmp_path / "http" / "w.bin").read_bytes() == b"http-bytes"


class _TLSObjectHandler(BaseHTTPRequestHandler):
    """One object over HTTPS, as S3 answers HEAD and GET for it (moto's server here speaks no TLS)."""

    protocol_version = "HTTP/1.1"
    body = b"over TLS " * 1000

    def _answer(self, with_body: bool) -> None:
        if self.path != "/bkt/m/w.bin":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("ETag", '"e1"')
        self.end_headers()
        if with_body:
            self.wfile.write(self.body)

    def do_HEAD(self) -> None:
        self._answer(False)

    def do_GET(self) -> None:
        self._answer(True)

    def log_message(self, *args) -> None:
        pass


def _tls_server(tmp_path: Path) -> tuple[ThreadingHTTPServer, Path]:
    """The one-object server over TLS with a fresh self-signed certificate for 127.0.0.1 (started)."""
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _TLSObjectHandler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, cert


def test_https_endpoints_verify_against_the_ca_bundle_and_a_failed_verification_is_not_retried(tmp_path: Path) -> None:
    """TLS as botocore does it: the CA bundle given (verify=PATH) is trusted, the system's CAs
    by default (a self-signed endpoint then fails at once, not retried as transient), verify=False
    skips the check. Keep-alive connections are reused across requests."""
    from puller.credentials import S3Settings
    from puller.sources.s3 import _is_transient
    from puller.sources.s3_wire import S3ConnectionError, S3WireClient, _Static

    srv, cert = _tls_server(tmp_path)
    url = f"https://127.0.0.1:{srv.server_address[1]}"
    creds = _Static("AKIDEXAMPLE", "secret-example", None)

    def client(verify) -> S3WireClient:
        return S3WireClient(S3Settings(source="test", endpoint_url=url, addressing_style="path", verify=verify),
                            creds, pool=2)
    try:
        for verify in (str(cert), False):
            c = client(verify)
            assert c.head_object(Bucket="bkt", Key="m/w.bin")["ContentLength"] == len(_TLSObjectHandler.body)
            r = c.get_object(Bucket="bkt", Key="m/w.bin")
            buf = bytearray(len(_TLSObjectHandler.body) + 10)
            got = 0
            while n := r.readinto(memoryview(buf)[got:]):
                got += n
            r.release_conn()
            assert bytes(buf[:got]) == _TLSObjectHandler.body
            assert len(c._route(url)._idle) == 1, "one connection, reused and handed back"
        with pytest.raises(S3ConnectionError) as exc:
            client(True).head_object(Bucket="bkt", Key="m/w.bin")
        assert "certificate" in str(exc.value).lower() and not _is_transient(exc.value)
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_keep_alive_connection_the_server_closed_while_idle_is_replaced_not_failed(tmp_path: Path) -> None:
    """Servers close idle keep-alive connections without notice (S3 after a few seconds): the next
    request opens a new connection instead of failing on the dead one (a transient error, retried
    after a back-off, for every connection of the pool)."""
    from puller.credentials import S3Settings
    from puller.sources.s3_wire import S3WireClient, _Static

    closed = threading.Event()

    class _CloseAfterOne(_TLSObjectHandler):
        def handle(self) -> None:
            self.handle_one_request()  # keep-alive answer, then the server drops the connection
            self.connection.shutdown(2)
            closed.set()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), _CloseAfterOne)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        c = S3WireClient(S3Settings(source="test", endpoint_url=f"http://127.0.0.1:{srv.server_address[1]}",
                                    addressing_style="path"), _Static("AKIDEXAMPLE", "secret-example", None), pool=2)
        for _ in range(3):
            closed.clear()
            assert c.head_object(Bucket="bkt", Key="m/w.bin")["ETag"] == '"e1"'
            assert closed.wait(5)
    finally:
        srv.shutdown()
        srv.server_close()


class _Framings(BaseHTTPRequestHandler):
    """S3 answers in every HTTP/1.1 framing the wire client must read: a 100 Continue before the
    real answer, a chunked LIST body with a trailer, a GET cut short mid-body (the connection
    closed after 400 of 1,000 promised bytes), and the ranged retry's body read to the close."""

    protocol_version = "HTTP/1.1"
    body = bytes(range(250)) * 4
    seen: list[str] = []

    def do_HEAD(self) -> None:  # the URI is a prefix: no such key
        self.seen.append(f"HEAD {self.path}")
        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        rng = self.headers.get("Range") or ""
        self.seen.append(f"GET {self.path.split('?')[0]} {rng}".strip())
        if "list-type=2" in self.path:
            xml = (b'<?xml version="1.0"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                   b"<EncodingType>url</EncodingType><IsTruncated>false</IsTruncated><Contents><Key>m/w%20x.bin</Key>"
                   b"<Size>1000</Size><ETag>&quot;e1&quot;</ETag></Contents></ListBucketResult>")
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (xml[:50], xml[50:]):
                self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\nx-trailer: 1\r\n\r\n")
        elif not rng:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.send_header("ETag", '"e1"')
            self.end_headers()
            self.wfile.write(self.body[:400])
            self.close_connection = True
        else:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.wfile.write(b"HTTP/1.1 206 Partial Content\r\nConnection: close\r\nETag: \"e1\"\r\n\r\n")
            self.wfile.write(self.body[start:])
            self.close_connection = True

    def log_message(self, *args) -> None:
        pass


def test_chunked_interim_cut_short_and_read_to_close_answers_are_read_as_http_1_1_says(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wire client speaks HTTP/1.1 itself (no http.client): interim 1xx answers are skipped,
    chunked bodies decoded (extensions, trailer), a body cut short is an error that is retried
    from the byte it stopped at, and a body without a length ends at the server's close."""
    _Framings.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Framings)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _pull_from(srv, "s3://bkt/m", tmp_path, monkeypatch)
    assert (tmp_path / "w x.bin").read_bytes() == _Framings.body
    assert _Framings.seen == ["HEAD /bkt/m", "GET /bkt", "GET /bkt/m/w%20x.bin", "GET /bkt/m/w%20x.bin bytes=400-999"]


class _ConnectProxy(threading.Thread):
    """An http:// proxy that tunnels CONNECT (what an https endpoint behind HTTPS_PROXY needs),
    recording each CONNECT line and its Proxy-Authorization."""

    def __init__(self) -> None:
        import socket

        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.seen: list[tuple[str, str]] = []

    def run(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client) -> None:
        import socket

        head = b""
        while b"\r\n\r\n" not in head:
            head += client.recv(4096)
        lines = head.decode().split("\r\n")
        auth = next((ln.split(":", 1)[1].strip() for ln in lines if ln.lower().startswith("proxy-authorization:")), "")
        self.seen.append((lines[0], auth))
        host, port = lines[0].split()[1].rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pipe(a, b) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
                b.shutdown(socket.SHUT_WR)
            except OSError:  # the other side closed first
                pass
        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)


def test_an_https_endpoint_behind_https_proxy_is_reached_through_a_connect_tunnel(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTPS_PROXY with an https endpoint: the wire client opens a CONNECT tunnel (the proxy's
    user:password as Proxy-Authorization), then speaks TLS to the endpoint through it, verified
    against the endpoint's certificate."""
    import base64

    from puller.credentials import S3Settings
    from puller.sources.s3_wire import S3WireClient, _Static

    srv, cert = _tls_server(tmp_path)
    proxy = _ConnectProxy()
    proxy.start()
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://tunnel-user:tunnel-pw@127.0.0.1:{proxy.port}")
    try:
        c = S3WireClient(S3Settings(source="test", endpoint_url=f"https://127.0.0.1:{srv.server_address[1]}",
                                    addressing_style="path", verify=str(cert)),
                         _Static("AKIDEXAMPLE", "secret-example", None), pool=2)
        assert c.head_object(Bucket="bkt", Key="m/w.bin")["ETag"] == '"e1"'
        assert c.get_object(Bucket="bkt", Key="m/w.bin").data == _TLSObjectHandler.body
    finally:
        srv.shutdown()
        srv.server_close()
        proxy.sock.close()
    basic = "Basic " + base64.b64encode(b"tunnel-user:tunnel-pw").decode()
    assert proxy.seen == [(f"CONNECT 127.0.0.1:{srv.server_address[1]} HTTP/1.1", basic)], "one tunnel, kept alive"


class _Stall(BaseHTTPRequestHandler):
    """Answers that stop mid-way and hold the connection open: inside the body, or inside the head."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.endswith("/head"):
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        else:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 300)
        self.wfile.flush()
        time.sleep(3)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


def test_a_response_that_stalls_times_out_as_a_transient_error(tmp_path: Path) -> None:
    """The read timeout holds on every read (the kernel's SO_RCVTIMEO on plain connections): a body
    or a head that stops arriving ends in a transient error after the timeout, not a hang and not
    a short body taken for a whole one."""
    from puller.credentials import S3Settings
    from puller.sources.s3 import _is_transient
    from puller.sources.s3_wire import S3ConnectionError, S3WireClient, _Static

    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Stall)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        c = S3WireClient(S3Settings(source="test", endpoint_url=f"http://127.0.0.1:{srv.server_address[1]}",
                                    addressing_style="path"), _Static("AKIDEXAMPLE", "secret-example", None),
                         pool=2, read_timeout=0.3)
        r = c.get_object(Bucket="bkt", Key="body")
        buf, got = bytearray(2000), 0
        with pytest.raises(TimeoutError) as body:
            while n := r.readinto(memoryview(buf)[got:]):
                got += n
        r.close()
        with pytest.raises(S3ConnectionError) as head:
            c.get_object(Bucket="bkt", Key="head")
    finally:
        srv.shutdown()
        srv.server_close()
    assert got == 300 and _is_transient(body.value)
    assert "timed out" in str(head.value) and _is_transient(head.value)
