"""S3Source's transfer path (one buffer per worker, bodies read straight off the connection)
against moto's S3 server behind real proxies on loopback: a TCP proxy that can cut or corrupt
what it forwards, and an HTTP/1.1 keep-alive proxy that counts client connections (moto's own
server closes every connection after one response, so reuse is only visible through it)."""
from __future__ import annotations

import errno
import hashlib
import http.client
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from puller.errors import IntegrityError, PullError
from puller.sources.base import PullOptions, open_source
from tests.puller_sources.conftest import CountingProgress, tree
from tests.support.s3server import S3Server


class _Proxy:
    """TCP proxy 127.0.0.1:port -> upstream. Counts accepted connections; optionally cuts the
    first connection whose downstream bytes pass `cut_after` (every one with `cut_every`), and
    replaces `swap` in what it forwards downstream (a (old, new) pair of equal length)."""

    def __init__(self, upstream: str, cut_after: int | None = None, swap: tuple[bytes, bytes] | None = None,
                 cut_every: bool = False):
        host, port = upstream.removeprefix("http://").split(":")
        self._up = (host, int(port))
        self._cut_after, self._swap, self._cut_every = cut_after, swap, cut_every
        self._lock = threading.Lock()
        self.connections = 0
        self.cuts = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self.connections += 1
            upstream = socket.create_connection(self._up, timeout=10)
            for src, dst, down in ((client, upstream, False), (upstream, client, True)):
                t = threading.Thread(target=self._pump, args=(src, dst, down, client, upstream), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool, *both: socket.socket) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if down and self._swap:
                    data = data.replace(*self._swap)
                if down and self._cut_after is not None and sent + len(data) > self._cut_after:
                    with self._lock:
                        cut = self.cuts == 0 or self._cut_every
                        self.cuts += cut
                    if cut:  # forward part of it, then drop the connection mid-body
                        dst.sendall(data[: self._cut_after - sent])
                        break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in both:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        for t in self._threads:
            t.join(timeout=5)


class _KeepAliveProxy(ThreadingHTTPServer):
    """HTTP/1.1 reverse proxy that keeps client connections open (one upstream request per
    client request) and counts the client connections it accepted."""

    daemon_threads = True

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.connections = 0
        self.requests = 0
        self._count = threading.Lock()
        super().__init__(("127.0.0.1", 0), _KeepAliveHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


class _KeepAliveHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _KeepAliveProxy

    def setup(self) -> None:
        super().setup()
        with self.server._count:
            self.server.connections += 1

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _forward(self) -> None:
        with self.server._count:
            self.server.requests += 1
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        up = http.client.HTTPConnection(*self.server.upstream, timeout=10)
        try:
            up.request(self.command, self.path, body=body, headers=headers)
            resp = up.getresponse()
            data = resp.read()
            self.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                             else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            up.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


@pytest.fixture
def proxy_factory(s3: S3Server, monkeypatch: pytest.MonkeyPatch):
    made: list[_Proxy] = []

    def make(**kw) -> _Proxy:
        p = _Proxy(s3.endpoint_url, **kw)
        made.append(p)
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        return p
    yield make
    for p in made:
        p.close()


def _pull(uri: str, dest: Path, progress=None, **opts):
    opts.setdefault("retry_deadline_s", 5)
    src = open_source(uri, PullOptions(**opts))
    listing = src.list()
    src.fetch(listing, dest, progress or CountingProgress())
    return listing


def test_many_objects_reuse_a_few_keep_alive_connections(s3: S3Server, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from botocore.config import Config

    files = {f"many/f{i:03d}.bin": os.urandom(3000 + i) for i in range(40)}
    # stored without a checksum (as most S3-compatible stores do): bodies take the direct path
    plain = boto3.session.Session().client(
        "s3", endpoint_url=s3.endpoint_url, region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required"))
    for k, v in files.items():
        plain.put_object(Bucket="models", Key=k, Body=v)
    proxy = _KeepAliveProxy(s3.endpoint_url)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        progress = CountingProgress()
        _pull("s3://models/many", tmp_path, progress, max_concurrency=3)
    finally:
        proxy.close()
    assert tree(tmp_path) == {k.removeprefix("many/"): v for k, v in files.items()}
    assert progress.bytes == sum(len(v) for v in files.values()) and len(progress.files) == 40
    # every body is read to its end, so each worker reuses its connection: 42 requests (HEAD,
    # LIST, 40 GETs) over at most 3 connections (+1 if the listing's was not yet back in the pool)
    assert proxy.requests == 42
    assert proxy.connections <= 4, proxy.connections


def test_connection_cut_mid_body_resumes_byte_exact(s3: S3Server, proxy_factory, tmp_path: Path) -> None:
    data = os.urandom(6 * 2**20)
    s3.put("models", "big/weights.bin", data)
    proxy = proxy_factory(cut_after=1_500_000)
    progress = CountingProgress()
    _pull("s3://models/big/weights.bin", tmp_path, progress, part_size=2 * 2**20, max_concurrency=2)
    assert proxy.cuts == 1
    assert hashlib.sha256((tmp_path / "weights.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    assert progress.bytes == len(data)  # resumed where it stopped: nothing counted twice


@pytest.fixture
def splices(monkeypatch: pytest.MonkeyPatch):
    """Records the splice(2) calls the pull makes (real ones): (fd_out, count, offset_dst, moved);
    `refuse` ("file" / "socket") makes that half fail with EINVAL, as some file systems do."""
    real = os.splice
    calls: list[tuple[int, int, int | None, int]] = []
    refuse: list[str] = []

    def spy(src: int, dst: int, count: int, offset_src=None, offset_dst=None, flags: int = 0) -> int:
        to_file = offset_dst is not None
        if ("file" if to_file else "socket") in refuse:
            raise OSError(errno.EINVAL, "Invalid argument")
        n = real(src, dst, count, offset_src, offset_dst, flags)
        calls.append((dst, count, offset_dst, n))
        return n

    monkeypatch.setattr(os, "splice", spy)
    spy.calls, spy.refuse = calls, refuse
    return spy


def test_plain_http_bodies_are_spliced_to_each_parts_offset_byte_exact(s3: S3Server, tmp_path: Path,
                                                                       splices) -> None:
    data = os.urandom(5 * 2**20 + 12345)
    s3.put("models", "big/weights.bin", data)
    progress = CountingProgress()
    _pull("s3://models/big/weights.bin", tmp_path, progress, part_size=2**20, max_concurrency=3)
    assert hashlib.sha256((tmp_path / "weights.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    assert progress.bytes == len(data) and progress.files == ["weights.bin"]
    to_file = [c for c in splices.calls if c[2] is not None]
    # the bytes went socket -> pipe -> file (all but what the response heads' reads buffered)
    assert sum(c[3] for c in to_file) > len(data) - 6 * 64 * 1024
    assert {c[2] // 2**20 for c in to_file} == set(range(6))  # into every part, at its offsets


def test_a_spliced_body_cut_short_every_time_is_an_error_not_a_short_file(s3: S3Server, proxy_factory,
                                                                          tmp_path: Path, splices) -> None:
    data = os.urandom(3 * 2**20)
    s3.put("models", "big/weights.bin", data)
    proxy_factory(cut_after=500_000, cut_every=True)
    # no time to resume (each resume would get further): the first cut is the pull's error
    with pytest.raises(PullError, match="IncompleteRead"):
        _pull("s3://models/big/weights.bin", tmp_path, part_size=2**20, max_concurrency=1, retry_deadline_s=0)
    assert splices.calls  # the spliced path saw the body end early


@pytest.mark.parametrize("half", ["file", "socket"])
def test_a_refused_splice_falls_back_to_reads_and_writes(s3: S3Server, tmp_path: Path, splices, half: str) -> None:
    data = os.urandom(3 * 2**20 + 7)
    s3.put("models", "big/weights.bin", data)
    splices.refuse.append(half)
    progress = CountingProgress()
    _pull("s3://models/big/weights.bin", tmp_path, progress, part_size=2**20, max_concurrency=2)
    assert hashlib.sha256((tmp_path / "weights.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    assert progress.bytes == len(data)
    if half == "file":  # the bytes taken into the pipe before the refusal were written, not lost
        assert splices.calls and all(c[2] is None for c in splices.calls)


def _refusing_fallocate(monkeypatch: pytest.MonkeyPatch, err: int) -> list[tuple[int, int]]:
    """libc's fallocate as a file system answers when it refuses with `err` (calls recorded)."""
    import puller.sources.base as base

    calls: list[tuple[int, int]] = []

    def fallocate(fd: int, mode: int, offset: int, size: int) -> int:
        calls.append((offset, size))
        return -1
    monkeypatch.setattr(base, "_fallocate", (fallocate, lambda: err))
    return calls


def test_a_file_system_without_fallocate_gets_a_sparse_file_filled_byte_exact(
        s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(3 * 2**20 + 5)
    s3.put("models", "big/weights.bin", data)
    calls = _refusing_fallocate(monkeypatch, errno.EOPNOTSUPP)
    _pull("s3://models/big/weights.bin", tmp_path, part_size=2**20, max_concurrency=2)
    assert calls == [(0, len(data))]
    assert hashlib.sha256((tmp_path / "weights.bin").read_bytes()).digest() == hashlib.sha256(data).digest()


def test_no_space_for_a_large_object_fails_before_any_byte_is_fetched(
        s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, splices) -> None:
    s3.put("models", "big/weights.bin", os.urandom(3 * 2**20))
    _refusing_fallocate(monkeypatch, errno.ENOSPC)
    with pytest.raises(OSError, match="No space left"):
        _pull("s3://models/big/weights.bin", tmp_path, part_size=2**20)
    assert not splices.calls  # no GET body was read


def test_store_checksum_is_verified_while_streaming(s3: S3Server, proxy_factory, tmp_path: Path) -> None:
    body = b"weights " * 500 + b"MARKER" + b" weights" * 500
    s3.client().put_object(Bucket="models", Key="ck/model.bin", Body=body, ChecksumAlgorithm="SHA256")
    listing = _pull("s3://models/ck/model.bin", tmp_path / "good")
    assert listing.objects[0].checksum == "sha256:" + hashlib.sha256(body).hexdigest()
    assert (tmp_path / "good" / "model.bin").read_bytes() == body
    proxy_factory(swap=(b"MARKER", b"MARKEX"))  # one byte changed in transit, same length
    with pytest.raises(IntegrityError, match="checksum"):
        _pull("s3://models/ck/model.bin", tmp_path / "bad")


def test_a_key_that_is_also_a_directory_of_another_key_is_refused(s3: S3Server, tmp_path: Path) -> None:
    s3.put("models", "clash/a/b", b"file")
    s3.put("models", "clash/a/b/c/weights.bin", b"under it")
    s3.put("models", "clash/ok/x.bin", b"fine")
    with pytest.raises(PullError, match="'a/b' is both an object and a directory of 'a/b/c/weights.bin'"):
        open_source("s3://models/clash", PullOptions(retry_deadline_s=1)).list()


class _RecordingProxy(_KeepAliveProxy):
    """The keep-alive proxy, remembering each request as (method, Range header or None)."""

    def __init__(self, upstream: str):
        self.seen: list[tuple[str, str | None]] = []
        super().__init__(upstream)
        self.RequestHandlerClass = _RecordingHandler


class _RecordingHandler(_KeepAliveHandler):
    server: _RecordingProxy

    def _record(self) -> None:
        self.server.seen.append((self.command + (" LIST" if "list-type=" in self.path else ""),
                                 self.headers.get("Range")))
        self._forward()

    do_GET = do_HEAD = _record


@pytest.fixture
def recording_proxy(s3: S3Server, monkeypatch: pytest.MonkeyPatch):
    proxy = _RecordingProxy(s3.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.close()


def test_parts_that_would_outnumber_the_workers_grow_to_one_per_worker(s3: S3Server, tmp_path: Path,
                                                                       recording_proxy: _RecordingProxy,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each request costs the store something: an object split into more parts than there are
    workers is fetched in one part per worker instead (as many transfers at once, fewer
    requests), parts no larger than the cap (64 MiB; 2 MiB here); one that splits into fewer
    keeps the configured part size."""
    data = os.urandom(6 * 2**20 + 3)
    s3.put("models", "big/weights.bin", data)
    _pull("s3://models/big/weights.bin", tmp_path / "a", part_size=2**20, max_concurrency=2)
    assert (tmp_path / "a" / "weights.bin").read_bytes() == data
    half = 3 * 2**20 + 2**20  # ceil(size / 2 workers), in whole MiB
    assert sorted(r for m, r in recording_proxy.seen if m == "GET") == [
        f"bytes=0-{half - 1}", f"bytes={half}-{len(data) - 1}"]
    recording_proxy.seen.clear()
    _pull("s3://models/big/weights.bin", tmp_path / "b", part_size=4 * 2**20, max_concurrency=2)
    assert (tmp_path / "b" / "weights.bin").read_bytes() == data
    assert sorted(r for m, r in recording_proxy.seen if m == "GET") == [
        f"bytes=0-{4 * 2**20 - 1}", f"bytes={4 * 2**20}-{len(data) - 1}"]
    recording_proxy.seen.clear()
    import puller.sources.s3 as s3_source

    monkeypatch.setattr(s3_source, "_MAX_PART", 2 * 2**20)
    _pull("s3://models/big/weights.bin", tmp_path / "c", part_size=2**20, max_concurrency=2)
    assert (tmp_path / "c" / "weights.bin").read_bytes() == data
    assert sorted((r for m, r in recording_proxy.seen if m == "GET"), key=lambda r: int(r[6:].split("-")[0])) == [
        f"bytes={s}-{min(s + 2 * 2**20, len(data)) - 1}" for s in range(0, len(data), 2 * 2**20)]


def test_gets_sent_ahead_are_read_by_fetch_never_sent_twice(s3: S3Server, tmp_path: Path,
                                                           recording_proxy: _RecordingProxy) -> None:
    """`modelshelf pull` sends a fetch's first GETs (one per worker) as soon as the listing is
    known, before it sets up where they go: fetch reads those answers instead of asking again,
    and a source closed before its fetch drops them unread, writing nothing."""
    files = {f"m/f{i}.bin": os.urandom(1000 + i) for i in range(5)}
    for k, v in files.items():
        s3.put("models", k, v)
    src = open_source("s3://models/m", PullOptions(retry_deadline_s=5, max_concurrency=2))
    src.begin_list(fetch_ahead=True)
    listing = src.list()
    src.begin_fetch(listing)
    gets_ahead = [m for m, _ in recording_proxy.seen if m == "GET"]
    src.fetch(listing, tmp_path / "a", CountingProgress())
    src.close()
    assert tree(tmp_path / "a") == {k.removeprefix("m/"): v for k, v in files.items()}
    assert len(gets_ahead) <= 2  # (the proxy may not have seen both yet)
    assert sorted(m for m, _ in recording_proxy.seen) == ["GET"] * 5 + ["GET LIST", "HEAD"]
    recording_proxy.seen.clear()
    src = open_source("s3://models/m", PullOptions(retry_deadline_s=5, max_concurrency=2))
    src.begin_list(fetch_ahead=True)
    src.begin_fetch(src.list())
    src.close()
    assert not (tmp_path / "b").exists()


def test_parts_of_one_file_are_written_one_writer_at_a_time(s3: S3Server, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A file fetched in parts has one writer at a time (the workers still read their sockets
    at once): the kernel serializes a file's writes anyway, and writers left waiting on its lock
    spun there, on the CPUs the transfer needs (benchmarks/results/pull.notes.md "pull11").
    Each write here is held a little so that writers that overlap are seen to."""
    import stat
    import time

    data = os.urandom(8 * 2**20 + 5)
    s3.put("models", "big/weights.bin", data)
    inside: dict[int, int] = {}
    most = [0]
    mu = threading.Lock()
    real_splice, real_pwrite = os.splice, os.pwrite

    def writing(fd: int, call):
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # socket -> pipe: not a write into the file
            return call()
        with mu:
            inside[fd] = inside.get(fd, 0) + 1
            most[0] = max(most[0], inside[fd])
        try:
            time.sleep(0.002)
            return call()
        finally:
            with mu:
                inside[fd] -= 1

    monkeypatch.setattr(os, "splice", lambda src, dst, count, *a, **k: writing(dst, lambda: real_splice(src, dst, count, *a, **k)))
    monkeypatch.setattr(os, "pwrite", lambda fd, b, off: writing(fd, lambda: real_pwrite(fd, b, off)))
    _pull("s3://models/big/weights.bin", tmp_path / "a", part_size=2**20, max_concurrency=4)
    assert (tmp_path / "a" / "weights.bin").read_bytes() == data
    assert most[0] == 1, f"{most[0]} writers in one file at once"
