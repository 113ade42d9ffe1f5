"""S3Source against moto's real S3 HTTP server on loopback."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from puller.errors import AccessDenied, BadURI, NotFound
from puller.sources.base import NullProgress, PullOptions, open_source
from puller.sources.s3 import S3Source
from tests.puller_sources.conftest import CountingProgress, tree
from tests.support.s3server import S3Server

SECRET_MARK = "zz-SECRET-must-not-leak-zz"


def pull(uri: str, dest: Path, options: PullOptions | None = None, progress=None):
    src = open_source(uri, options or PullOptions(retry_deadline_s=2))
    listing = src.list()
    src.fetch(listing, dest, progress or NullProgress())
    return listing


def test_prefix_with_nested_keys_zero_byte_files_and_dir_markers(s3: S3Server, tmp_path: Path,
                                                                  progress: CountingProgress) -> None:
    files = {"iris/model.joblib": os.urandom(5000), "iris/sub/deep/weights.bin": os.urandom(70_000),
             "iris/empty.txt": b"", "iris/sub/config.json": b"{}"}
    for k, v in files.items():
        s3.put("models", k, v)
    s3.put("models", "iris/sub/", b"")  # a directory marker, as consoles create them
    s3.put("models", "iris2/not-mine.bin", b"other model")  # same string prefix, another "directory"

    listing = pull("s3://models/iris", tmp_path, progress=progress)

    want = {k.removeprefix("iris/"): v for k, v in files.items()}
    assert tree(tmp_path) == want
    assert {o.path: o.size for o in listing.objects} == {k: len(v) for k, v in want.items()}
    assert (tmp_path / "empty.txt").is_file()
    assert listing.uri == "s3://models/iris" and listing.archive is None
    assert progress.bytes == sum(map(len, want.values())) and sorted(progress.files) == sorted(want)
    # trailing slash: same objects, same identity (it feeds the cache key)
    assert open_source("s3://models/iris/", PullOptions()).list().identity() == listing.identity()


def test_listing_paginates(s3: S3Server, tmp_path: Path) -> None:
    for i in range(11):
        s3.put("models", f"many/f{i:02d}", str(i).encode())
    src = open_source("s3://models/many", PullOptions())
    assert isinstance(src, S3Source)
    src.list_page_size = 3
    listing = src.list()
    src.fetch(listing, tmp_path, NullProgress())
    assert sorted(o.path for o in listing.objects) == [f"f{i:02d}" for i in range(11)]
    assert tree(tmp_path)["f10"] == b"10"


def test_single_object_and_its_identity(s3: S3Server, tmp_path: Path) -> None:
    s3.put("models", "xgb/model.bst", b"v1-bytes")
    listing = pull("s3://models/xgb/model.bst", tmp_path)
    assert tree(tmp_path) == {"model.bst": b"v1-bytes"}
    assert listing.objects[0].identity.strip('"') == hashlib.md5(b"v1-bytes").hexdigest()
    assert listing.objects[0].checksum and listing.objects[0].checksum.startswith("crc32:")  # the store's own
    s3.put("models", "xgb/model.bst", b"v2-bytes")
    assert open_source("s3://models/xgb/model.bst", PullOptions()).list().identity() != listing.identity()


def test_single_archive_object_is_flagged(s3: S3Server, tmp_path: Path) -> None:
    s3.put("models", "packed/model.tar.gz", b"not really gzip, the cache extracts")
    listing = pull("s3://models/packed/model.tar.gz", tmp_path)
    assert listing.archive == "tar.gz" and (tmp_path / "model.tar.gz").is_file()
    assert open_source("s3://models/packed/model.tar.gz", PullOptions(extract_archives=False)).list().archive is None


def test_large_object_in_parallel_ranged_parts(s3: S3Server, tmp_path: Path, progress: CountingProgress) -> None:
    data = os.urandom(40 * 2**20)
    etag = s3.put_large("models", "llm/weights.bin", data, part_size=8 * 2**20)
    assert etag.strip('"').endswith("-5")  # a real multipart object
    opts = PullOptions(part_size=4 * 2**20, max_concurrency=4, retry_deadline_s=2)
    listing = pull("s3://models/llm/weights.bin", tmp_path, opts, progress)
    got = tmp_path / "weights.bin"
    assert got.stat().st_size == len(data)
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert progress.bytes == len(data) and progress.files == ["weights.bin"]
    assert listing.objects[0].identity == etag


def test_missing_key_prefix_and_bucket_are_not_found(s3: S3Server, tmp_path: Path) -> None:
    s3.put("models", "iris/model.joblib", b"x")
    for uri in ("s3://models/nope", "s3://models/nope/", "s3://no-such-bucket/iris"):
        with pytest.raises(NotFound) as exc:
            open_source(uri, PullOptions(retry_deadline_s=1)).list()
        assert uri.rstrip("/") in str(exc.value) and exc.value.exit_code == 3
    with pytest.raises(NotFound, match="bucket 'no-such-bucket' does not exist"):
        open_source("s3://no-such-bucket/iris", PullOptions()).list()


def test_key_deleted_between_list_and_fetch(s3: S3Server, tmp_path: Path) -> None:
    s3.put("models", "gone/model.bin", b"x" * 10)
    src = open_source("s3://models/gone/model.bin", PullOptions(retry_deadline_s=1))
    listing = src.list()
    s3.client().delete_object(Bucket="models", Key="gone/model.bin")
    with pytest.raises(NotFound):
        src.fetch(listing, tmp_path, NullProgress())


# -- credentials: moto's IAM check is on, so only the right key can read ---------------------

@pytest.fixture
def authed(s3: S3Server, monkeypatch: pytest.MonkeyPatch):
    s3.put("models", "iris/model.joblib", b"model-bytes")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    with s3.iam_auth() as (key_id, secret):
        yield s3, key_id, secret


def test_wrong_keys_are_access_denied_and_never_leak(authed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    s3, key_id, _ = authed
    caplog.set_level(logging.DEBUG)  # every logger, botocore's included
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    for bad_id, bad_secret in ((key_id, SECRET_MARK), ("AKIANOSUCHKEY0000000", SECRET_MARK)):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", bad_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad_secret)
        with pytest.raises(AccessDenied) as exc:
            pull("s3://models/iris/model.joblib", tmp_path)
        assert "s3://models/iris/model.joblib" in str(exc.value) and exc.value.exit_code == 4
        assert SECRET_MARK not in str(exc.value) and SECRET_MARK not in repr(exc.value)
    assert caplog.records, "expected the puller to log something"
    assert not [r for r in caplog.records if SECRET_MARK in r.getMessage()]


def test_aws_env_and_endpoint_url(authed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s3, key_id, secret = authed
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    pull("s3://models/iris", tmp_path)
    assert tree(tmp_path) == {"model.joblib": b"model-bytes"}


def test_aws_shared_credentials_file_profile(authed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s3, key_id, secret = authed
    creds = tmp_path / "credentials"
    creds.write_text(f"[team]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "team")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint_url)
    pull("s3://models/iris", tmp_path / "out")
    assert tree(tmp_path / "out") == {"model.joblib": b"model-bytes"}


def test_storage_config_dir(authed, tmp_path: Path) -> None:
    s3, key_id, secret = authed
    (tmp_path / "sc").mkdir()
    (tmp_path / "sc" / "localminio").write_text(json.dumps({
        "type": "s3", "access_key_id": key_id, "secret_access_key": secret, "endpoint_url": s3.endpoint_url,
        "region": "us-east-1", "bucket": "models"}))
    opts = PullOptions(storage_key="localminio", storage_config_dir=tmp_path / "sc")
    pull("s3://models/iris", tmp_path / "out", opts)
    assert tree(tmp_path / "out") == {"model.joblib": b"model-bytes"}


def test_s3cfg_file(authed, tmp_path: Path) -> None:
    s3, key_id, secret = authed
    host = s3.endpoint_url.removeprefix("http://")
    cfg = tmp_path / ".s3cfg"
    cfg.write_text(f"[default]\naccess_key = {key_id}\nsecret_key = {secret}\nhost_base = {host}\n"
                   f"host_bucket = {host}\nuse_https = False\nbucket_location = us-east-1\n")
    pull("s3://models/iris", tmp_path / "out", PullOptions(s3cfg=cfg))
    assert tree(tmp_path / "out") == {"model.joblib": b"model-bytes"}


def test_rclone_remote(authed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s3, key_id, secret = authed
    for k, v in {"TYPE": "s3", "PROVIDER": "Minio", "ENV_AUTH": "false", "ACCESS_KEY_ID": key_id,
                 "SECRET_ACCESS_KEY": secret, "ENDPOINT": s3.endpoint_url}.items():
        monkeypatch.setenv(f"RCLONE_CONFIG_LOCALS3_{k}", v)
    listing = pull("locals3:models/iris", tmp_path / "out")
    assert tree(tmp_path / "out") == {"model.joblib": b"model-bytes"}
    assert listing.uri == "locals3:models/iris"


def test_gcs_hmac_through_the_xml_api_endpoint(authed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s3, key_id, secret = authed
    monkeypatch.setenv("MODELSHELF_GCS_ENDPOINT", s3.endpoint_url)
    monkeypatch.setenv("GCS_HMAC_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("GCS_HMAC_SECRET", secret)
    listing = pull("gs://models/iris", tmp_path / "out")
    assert tree(tmp_path / "out") == {"model.joblib": b"model-bytes"}
    assert listing.uri == "gs://models/iris"
    monkeypatch.setenv("GCS_HMAC_SECRET", SECRET_MARK)
    with pytest.raises(AccessDenied) as exc:
        pull("gs://models/iris", tmp_path / "out2")
    assert SECRET_MARK not in str(exc.value)


# -- anonymous ----------------------------------------------------------------------------

def test_anonymous_public_bucket_and_denied_private(s3: S3Server, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    s3.create_bucket("public-models", public=True)
    s3.put("public-models", "iris/model.joblib", b"open")
    s3.put("models", "iris/model.joblib", b"closed")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_NO_SIGN_REQUEST", "true")
    pull("s3://public-models/iris/model.joblib", tmp_path / "pub")
    assert tree(tmp_path / "pub") == {"model.joblib": b"open"}
    with pytest.raises(AccessDenied, match="anonymous"):
        pull("s3://models/iris/model.joblib", tmp_path / "priv")


def test_no_credentials_at_all_falls_back_to_anonymous(s3: S3Server, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    s3.create_bucket("public-models", public=True)
    s3.put("public-models", "m/a.bin", b"A")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    pull("s3://public-models/m/a.bin", tmp_path)
    assert tree(tmp_path) == {"a.bin": b"A"}


def test_gcs_public_bucket_anonymous(s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s3.create_bucket("gcs-public", public=True)
    s3.put("gcs-public", "bert/model.onnx", b"onnx")
    monkeypatch.setenv("MODELSHELF_GCS_ENDPOINT", s3.endpoint_url)
    pull("gs://gcs-public/bert/model.onnx", tmp_path)
    assert tree(tmp_path) == {"model.onnx": b"onnx"}


def test_storage_key_unknown_is_bad_uri(s3: S3Server, tmp_path: Path) -> None:
    with pytest.raises(BadURI, match="storage key 'ghost'"):
        open_source("s3://models/x", PullOptions(storage_key="ghost", storage_config_dir=tmp_path))


def test_unreachable_endpoint_is_transient_then_fails_within_deadline(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from puller.errors import TransientError
    from tests.support.net import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAX")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_MARK)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TransientError) as exc:
        open_source("s3://models/x", PullOptions(retry_deadline_s=0.5)).list()
    assert "s3://models/x" in str(exc.value) and SECRET_MARK not in str(exc.value)
