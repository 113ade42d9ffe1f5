"""HTTPSource against a real threaded HTTP server on loopback (tests/support/httpserver.py)."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from puller.errors import AccessDenied, NotFound, TransientError
from puller.sources.base import NullProgress, PullOptions, open_source
from tests.puller_sources.conftest import CountingProgress, tree
from tests.support.httpserver import HTTPFileServer

TOKEN = "Bearer zz-http-token-must-not-leak-zz"


def pull(url: str, dest: Path, options: PullOptions | None = None, progress=None):
    src = open_source(url, options or PullOptions(retry_deadline_s=3))
    try:
        listing = src.list()
        src.fetch(listing, dest, progress or NullProgress())
        return listing
    finally:
        src.close()


def test_plain_download_one_get(tmp_path: Path, progress: CountingProgress) -> None:
    data = os.urandom(300_000)
    with HTTPFileServer(files={"m/model.joblib": data}) as srv:
        listing = pull(srv.url("m/model.joblib"), tmp_path, progress=progress)
        assert srv.get_count("m/model.joblib") == 1
    assert tree(tmp_path) == {"model.joblib": data}
    obj = listing.objects[0]
    assert (obj.path, obj.size) == ("model.joblib", len(data)) and obj.identity.startswith("etag:")
    assert listing.archive is None and progress.bytes == len(data) and progress.files == ["model.joblib"]


def test_header_from_options_is_sent_and_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with HTTPFileServer(files={"private/model.onnx": b"onnx"}, require_headers={"Authorization": TOKEN}) as srv:
        with pytest.raises(AccessDenied) as exc:
            pull(srv.url("private/model.onnx"), tmp_path / "a")
        assert exc.value.exit_code == 4 and srv.url("private/model.onnx") in str(exc.value)
        with pytest.raises(AccessDenied) as exc:
            pull(srv.url("private/model.onnx"), tmp_path / "b",
                 PullOptions(headers={"Authorization": TOKEN + "-wrong"}, retry_deadline_s=1))
        assert "zz-http-token" not in str(exc.value)
        pull(srv.url("private/model.onnx"), tmp_path / "c", PullOptions(headers={"Authorization": TOKEN}))
    assert tree(tmp_path / "c") == {"model.onnx": b"onnx"}
    assert not [r for r in caplog.records if "zz-http-token" in r.getMessage()]


def test_userinfo_in_url_never_reaches_errors(tmp_path: Path) -> None:
    with HTTPFileServer(files={}) as srv:
        url = srv.url("x/model.bin").replace("http://", "http://bob:pa55word@")
        with pytest.raises(NotFound) as exc:
            pull(url, tmp_path)
    assert "pa55word" not in str(exc.value) and "bob" not in str(exc.value) and exc.value.exit_code == 3


def test_connection_dropped_mid_body_resumes_with_a_range(tmp_path: Path) -> None:
    data = os.urandom(1_000_000)
    with HTTPFileServer(files={"m/model.bin": data}) as srv:
        srv.drop_mid_body("m/model.bin", after_bytes=400_000)
        pull(srv.url("m/model.bin"), tmp_path)
        gets = [h for method, path, h in srv.requests if method == "GET" and path == "m/model.bin"]
        sent = srv.bytes_sent("m/model.bin")
    assert tree(tmp_path) == {"model.bin": data}
    assert len(gets) == 2 and "Range" not in gets[0]
    resumed_at = int(gets[1]["Range"].removeprefix("bytes=").split("-")[0])
    assert 0 < resumed_at <= 400_000 and gets[1].get("If-Range")
    assert sent < len(data) + 400_000 + 1  # resumed, not downloaded twice


def test_dropped_mid_body_without_range_support_starts_over(tmp_path: Path) -> None:
    data = os.urandom(500_000)
    with HTTPFileServer(files={"m/model.bin": data}, accept_ranges=False) as srv:
        srv.drop_mid_body("m/model.bin", after_bytes=100_000)
        pull(srv.url("m/model.bin"), tmp_path)
        assert srv.get_count("m/model.bin") == 2
    assert tree(tmp_path) == {"model.bin": data}


def test_503_then_200_is_retried(tmp_path: Path) -> None:
    with HTTPFileServer(files={"m/model.bin": b"weights"}) as srv:
        srv.fail_503("m/model.bin", times=3)  # the HEAD and two GETs (or three HEADs) see 503
        pull(srv.url("m/model.bin"), tmp_path)
    assert tree(tmp_path) == {"model.bin": b"weights"}


def test_503_forever_fails_transient_within_the_deadline(tmp_path: Path) -> None:
    with HTTPFileServer(files={"m/model.bin": b"weights"}) as srv:
        srv.fail_503("m/model.bin", times=10_000)
        with pytest.raises(TransientError) as exc:
            pull(srv.url("m/model.bin"), tmp_path, PullOptions(retry_deadline_s=0.5))
    assert "503" in str(exc.value) and exc.value.exit_code == 6


def test_etag_change_changes_the_identity(tmp_path: Path) -> None:
    with HTTPFileServer(files={"m/model.bin": b"v1"}) as srv:
        first = open_source(srv.url("m/model.bin"), PullOptions()).list()
        same = open_source(srv.url("m/model.bin"), PullOptions()).list()
        srv.set_etag("m/model.bin", "v2-etag")
        changed = open_source(srv.url("m/model.bin"), PullOptions()).list()
    assert first.identity() == same.identity()
    assert changed.identity() != first.identity() and 'etag:"v2-etag"' in changed.identity()


def test_404_is_not_found(tmp_path: Path) -> None:
    with HTTPFileServer(files={"m/a.bin": b"a"}) as srv:
        with pytest.raises(NotFound) as exc:
            pull(srv.url("m/missing.bin"), tmp_path)
    assert "missing.bin" in str(exc.value) and exc.value.exit_code == 3


def test_head_refused_falls_back_to_a_one_byte_get(tmp_path: Path) -> None:
    with HTTPFileServer(files={"m/model.pt": b"0123456789"}, refuse_head=True) as srv:
        listing = pull(srv.url("m/model.pt"), tmp_path)
        first_get = next(h for m, p, h in srv.requests if m == "GET")
    assert listing.objects[0].size == 10 and listing.objects[0].identity.startswith("etag:")
    assert first_get.get("Range") == "bytes=0-0"
    assert tree(tmp_path) == {"model.pt": b"0123456789"}


def test_large_file_in_parallel_ranged_parts_survives_a_drop(tmp_path: Path) -> None:
    data = os.urandom(6 * 2**20 + 12345)
    with HTTPFileServer(files={"big/model.safetensors": data}) as srv:
        srv.drop_mid_body("big/model.safetensors", after_bytes=200_000, times=2)
        pull(srv.url("big/model.safetensors"), tmp_path,
             PullOptions(part_size=2**20, max_concurrency=4, retry_deadline_s=3))
        ranges = [h.get("Range") for m, p, h in srv.requests if m == "GET"]
    got = (tmp_path / "model.safetensors").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert len(ranges) == 7 + 2 and all(ranges)  # 7 parts + 2 resumed after the drops, all ranged


def test_file_changed_between_list_and_fetch_is_not_spliced(tmp_path: Path) -> None:
    with HTTPFileServer(files={"big/m.bin": os.urandom(3 * 2**20)}) as srv:
        src = open_source(srv.url("big/m.bin"), PullOptions(part_size=2**20, max_concurrency=2, retry_deadline_s=1))
        listing = src.list()
        srv.set_file("big/m.bin", os.urandom(3 * 2**20))  # new content, new ETag
        with pytest.raises(TransientError, match="changed"):
            src.fetch(listing, tmp_path, NullProgress())
        src.close()


def test_archive_url_is_flagged(tmp_path: Path) -> None:
    with HTTPFileServer(files={"dl/model.tgz": b"\x1f\x8b fake"}) as srv:
        assert open_source(srv.url("dl/model.tgz"), PullOptions()).list().archive == "tar.gz"
        assert open_source(srv.url("dl/model.tgz"), PullOptions(extract_archives=False)).list().archive is None
