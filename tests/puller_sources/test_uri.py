"""URI parsing, normalization (cache-key form) and redaction."""
from __future__ import annotations

from pathlib import Path

import pytest

from puller.errors import BadURI
from puller.sources.base import PullOptions
from puller.uri import normalize, parse_uri, redact


@pytest.mark.parametrize("uri, scheme, bucket, key, is_prefix", [
    ("s3://models/iris/v1", "s3", "models", "iris/v1", False),
    ("s3://models/iris/v1/", "s3", "models", "iris/v1", True),
    ("s3://models", "s3", "models", "", True),
    ("gs://public-bkt/a/model.bst", "gs", "public-bkt", "a/model.bst", False),
    ("myminio:models/iris", "rclone", "models", "iris", False),
])
def test_bucket_uris(uri: str, scheme: str, bucket: str, key: str, is_prefix: bool) -> None:
    p = parse_uri(uri, PullOptions())
    assert (p.scheme, p.bucket, p.key, p.prefix, p.is_prefix) == (scheme, bucket, key, key, is_prefix)


def test_rclone_remote_name() -> None:
    p = parse_uri("my-remote:bkt/x/y.onnx", PullOptions())
    assert (p.remote, p.bucket, p.filename, p.normalized) == ("my-remote", "bkt", "y.onnx", "my-remote:bkt/x/y.onnx")


def test_pvc_resolves_under_root(tmp_path: Path) -> None:
    p = parse_uri("pvc://claim-a/models/iris", PullOptions(pvc_root=tmp_path))
    assert p.scheme == "pvc" and p.claim == "claim-a"
    assert p.path == tmp_path / "claim-a" / "models" / "iris"
    assert p.normalized == "pvc://claim-a/models/iris"


def test_local_paths(tmp_path: Path) -> None:
    assert parse_uri(str(tmp_path)).path == tmp_path
    assert parse_uri(f"file://{tmp_path}/").path == tmp_path
    assert parse_uri(f"file://{tmp_path}").scheme == "file"
    assert normalize(f"file://{tmp_path}/x/../y") == f"file://{tmp_path}/y"


def test_http_keeps_request_url_but_normalizes_without_secrets() -> None:
    uri = "HTTPS://user:pa55@Files.Example.com:443/m//model.tgz?X-Amz-Signature=abc&X-Amz-Date=1&v=2"
    p = parse_uri(uri)
    assert p.scheme == "https" and p.filename == "model.tgz"
    assert "pa55" in p.url  # the request needs it ...
    assert p.normalized == "https://files.example.com/m/model.tgz?v=2"  # ... the cache key must not
    assert "pa55" not in p.redacted and "abc" not in p.redacted


def test_normalize_is_stable() -> None:
    assert normalize("s3://b1/models/iris/") == normalize("s3://b1/models/iris") == "s3://b1/models/iris"
    assert normalize("S3://b1//models//iris") == "s3://b1/models/iris"
    a = normalize("https://h.example/x/m.bin?X-Amz-Signature=1&X-Amz-Date=20240101&X-Amz-Credential=AK%2F1")
    b = normalize("https://h.example/x/m.bin?X-Amz-Signature=2&X-Amz-Date=20250101&X-Amz-Credential=AK%2F2")
    assert a == b == "https://h.example/x/m.bin"
    assert normalize("http://h.example:80/m.bin") == "http://h.example/m.bin"


@pytest.mark.parametrize("uri, says", [
    ("", "empty"),
    ("ftp://host/model.bin", "unsupported scheme 'ftp'"),
    ("s3://", "missing bucket"),
    ("s3:///key", "missing bucket"),
    ("s3://bkt/../etc", "'..'"),
    ("models/iris", "no scheme"),
    ("https://host.example/", "must name a file"),
    ("file://otherhost/x", "must be local"),
    ("pvc://claim/../../etc", "'..'"),
    ("s3://user:secret@bkt/x", "credentials in the URI"),
])
def test_bad_uris_raise_clear_errors(uri: str, says: str) -> None:
    with pytest.raises(BadURI) as exc:
        parse_uri(uri, PullOptions())
    assert says in str(exc.value)
    assert exc.value.exit_code == 2
    assert "secret" not in str(exc.value)


def test_redact_masks_userinfo_and_signed_query_params() -> None:
    text = ("fetching https://alice:hunter2@h.example/m.bin?X-Amz-Credential=AKIAXX%2F2024&"
            "X-Amz-Signature=deadbeef&sig=s1g&token=t0k&v=1 failed")
    out = redact(text)
    for secret in ("hunter2", "alice", "AKIAXX", "deadbeef", "s1g", "t0k"):
        assert secret not in out
    assert "https://***@h.example/m.bin?" in out and "v=1" in out
    assert redact("s3://bucket/key") == "s3://bucket/key"
