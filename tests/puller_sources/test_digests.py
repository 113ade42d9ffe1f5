"""Per-file digests computed while the sources write (no second pass over the bytes): S3 ranged
GETs written from several threads, a plain GET, an HTTP server that ignores ranges. The digest
always equals the one `verify` recomputes from the file; parts that did not arrive in order are
re-read, the rest never are."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from puller.sources.base import DigestRecorder, PullOptions, file_digest, open_source
from tests.puller_sources.conftest import CountingProgress
from tests.support.httpserver import HTTPFileServer
from tests.support.s3server import S3Server


@pytest.fixture
def http_server():
    with HTTPFileServer() as srv:
        yield srv


def _fetch(uri: str, dest: Path, options: PullOptions) -> tuple[DigestRecorder, list[Path]]:
    src = open_source(uri, options)
    try:
        listing = src.list()
        src.digests = recorder = DigestRecorder()
        src.fetch(listing, dest, CountingProgress())
    finally:
        src.close()
    return recorder, [dest / o.path for o in listing.objects]


def test_s3_ranged_parts_are_hashed_as_they_stream(s3: S3Server, tmp_path: Path) -> None:
    data = os.urandom(3 * 2**20 + 12345)
    s3.put("models", "big/w.bin", data)
    s3.put("models", "big/small.txt", b"tiny")
    recorder, files = _fetch("s3://models/big/", tmp_path / "a", PullOptions(part_size=2**20, max_concurrency=4))
    for f in files:
        d = recorder.file(f, f.stat().st_size)
        assert d.unseen_bytes() == 0, f"{f.name}: every part hashed while it was written"
        assert recorder.finish(f) == file_digest(f)
    # ranges not aligned to the digest's parts: straddled parts are read back, still correct
    recorder, files = _fetch("s3://models/big/w.bin", tmp_path / "b",
                             PullOptions(part_size=1536 * 1024, max_concurrency=4))
    (w,) = files
    assert w.read_bytes() == data
    assert recorder.finish(w) == file_digest(w) == file_digest(tmp_path / "a" / "w.bin")


def test_http_server_ignoring_ranges_restarts_and_digest_stays_true(http_server: HTTPFileServer,
                                                                    tmp_path: Path) -> None:
    data = os.urandom(2 * 2**20 + 7)
    http_server.set_file("m.bin", data)
    http_server.drop_mid_body("m.bin", after_bytes=300_000)  # resumed with a Range request
    recorder, (f,) = _fetch(http_server.url("m.bin"), tmp_path, PullOptions(max_concurrency=1))
    assert f.read_bytes() == data
    assert recorder.finish(f) == file_digest(f)
    other = tmp_path / "other"
    other.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert file_digest(other) != file_digest(f)
