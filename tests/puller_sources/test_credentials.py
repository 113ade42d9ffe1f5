"""Where S3 settings come from, in order, and that they never print a secret."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from puller.credentials import GCS_ENDPOINT, resolve_s3
from puller.errors import BadURI
from puller.sources.base import PullOptions
from puller.uri import parse_uri

SECRET = "s3cr3t-VALUE-never-printed"


def write_storage_config(root: Path, key: str, **cfg: object) -> None:
    root.mkdir(exist_ok=True)
    (root / f"{key}.json").write_text(json.dumps(cfg))


def test_storage_config_wins_and_hides_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_storage_config(tmp_path / "sc", "minio", type="s3", access_key_id="AKIAMINIOKEY1234",
                         secret_access_key=SECRET, endpoint_url="http://minio.local:9000", region="eu-1",
                         bucket="models")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFROMENV")
    s = resolve_s3(parse_uri("s3://models/x"), PullOptions(storage_key="minio", storage_config_dir=tmp_path / "sc"))
    assert (s.source, s.endpoint_url, s.region, s.access_key_id, s.bucket) == (
        "storage-config:minio", "http://minio.local:9000", "eu-1", "AKIAMINIOKEY1234", "models")
    assert s.addressing_style == "path"  # custom endpoint
    assert SECRET not in repr(s) and SECRET not in str(s) and "AKIAMINIOKEY1234" not in repr(s)


def test_storage_key_file_without_json_suffix(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text(json.dumps({"type": "s3", "access_key_id": "K", "secret_access_key": SECRET}))
    s = resolve_s3(parse_uri("s3://b/x"), PullOptions(storage_key="plain", storage_config_dir=tmp_path))
    assert s.access_key_id == "K" and not s.anonymous


def test_storage_config_errors_name_the_key_not_the_content(tmp_path: Path) -> None:
    opts = PullOptions(storage_key="nope", storage_config_dir=tmp_path)
    with pytest.raises(BadURI, match="storage key 'nope' not found"):
        resolve_s3(parse_uri("s3://b/x"), opts)
    (tmp_path / "broken.json").write_text('{"secret_access_key": "' + SECRET + '",,}')
    with pytest.raises(BadURI) as exc:
        resolve_s3(parse_uri("s3://b/x"), PullOptions(storage_key="broken", storage_config_dir=tmp_path))
    assert "not valid JSON" in str(exc.value) and SECRET not in str(exc.value)
    write_storage_config(tmp_path, "gcs", type="gs")
    with pytest.raises(BadURI, match="type 'gs'"):
        resolve_s3(parse_uri("s3://b/x"), PullOptions(storage_key="gcs", storage_config_dir=tmp_path))


def test_s3cfg(tmp_path: Path) -> None:
    cfg = tmp_path / "s3cfg"
    cfg.write_text(f"[default]\naccess_key = AKIAS3CMD0000001\nsecret_key = {SECRET}\nhost_base = store.local:7480\n"
                   "host_bucket = store.local:7480\nuse_https = False\nbucket_location = US\n"
                   "check_ssl_certificate = False\n")
    s = resolve_s3(parse_uri("s3://b/x"), PullOptions(s3cfg=cfg))
    assert (s.endpoint_url, s.region, s.addressing_style, s.verify) == (
        "http://store.local:7480", "us-east-1", "path", False)
    assert s.secret_access_key == SECRET and SECRET not in repr(s)
    cfg.write_text("[default]\naccess_key = A\nsecret_key = B\nhost_base = s3.example.com\n"
                   "host_bucket = %(bucket)s.s3.example.com\n")
    s = resolve_s3(parse_uri("s3://b/x"), PullOptions(s3cfg=cfg))
    assert (s.endpoint_url, s.addressing_style) == ("https://s3.example.com", "virtual")


def test_s3cfg_from_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "s3cfg"
    cfg.write_text("[default]\naccess_key = AKIAENVCFG\nsecret_key = x\nhost_base = h.local\n")
    monkeypatch.setenv("S3CFG", str(cfg))
    assert resolve_s3(parse_uri("s3://b/x"), PullOptions()).source == f"s3cfg:{cfg}"


def test_rclone_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"TYPE": "s3", "PROVIDER": "Minio", "ACCESS_KEY_ID": "AKIARCLONE", "SECRET_ACCESS_KEY": SECRET,
                 "ENDPOINT": "http://minio:9000", "REGION": "us-west-2"}.items():
        monkeypatch.setenv(f"RCLONE_CONFIG_MYMINIO_{k}", v)
    s = resolve_s3(parse_uri("myminio:models/iris"), PullOptions())
    assert (s.source, s.endpoint_url, s.region, s.access_key_id, s.addressing_style) == (
        "rclone:myminio", "http://minio:9000", "us-west-2", "AKIARCLONE", "path")


def test_rclone_unconfigured_or_wrong_type(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BadURI, match="RCLONE_CONFIG_GHOST_TYPE"):
        resolve_s3(parse_uri("ghost:b/x"), PullOptions())
    monkeypatch.setenv("RCLONE_CONFIG_DRIVE_TYPE", "drive")
    with pytest.raises(BadURI, match="only s3-type"):
        resolve_s3(parse_uri("drive:b/x"), PullOptions())


def test_aws_env_switches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.internal:8443")
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "ca.pem"))
    s = resolve_s3(parse_uri("s3://b/x"), PullOptions())
    assert (s.source, s.endpoint_url, s.region, s.verify, s.addressing_style, s.anonymous) == (
        "aws-default-chain", "https://s3.internal:8443", "ap-south-1", str(tmp_path / "ca.pem"), "path", False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3-only.internal")
    monkeypatch.setenv("S3_VERIFY_SSL", "0")
    monkeypatch.setenv("AWS_NO_SIGN_REQUEST", "true")
    s = resolve_s3(parse_uri("s3://b/x"), PullOptions())
    assert (s.endpoint_url, s.verify, s.anonymous) == ("https://s3-only.internal", False, True)


def test_aws_default_endpoint_stays_virtual_capable(monkeypatch: pytest.MonkeyPatch) -> None:
    s = resolve_s3(parse_uri("s3://b/x"), PullOptions())
    assert (s.endpoint_url, s.addressing_style) == (None, "auto")
    monkeypatch.setenv("AWS_S3_FORCE_PATH_STYLE", "true")
    assert resolve_s3(parse_uri("s3://b/x"), PullOptions()).addressing_style == "path"


def test_kserve_style_s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_ENDPOINT", "minio.kubeflow:9000")
    monkeypatch.setenv("S3_USE_HTTPS", "0")
    assert resolve_s3(parse_uri("s3://b/x"), PullOptions()).endpoint_url == "http://minio.kubeflow:9000"


def test_gcs_defaults_and_hmac(monkeypatch: pytest.MonkeyPatch) -> None:
    s = resolve_s3(parse_uri("gs://pub/x"), PullOptions())
    assert (s.endpoint_url, s.anonymous, s.is_gcs) == (GCS_ENDPOINT, True, True)
    monkeypatch.setenv("MODELSHELF_GCS_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("GCS_HMAC_ACCESS_KEY_ID", "GOOG1EXAMPLE")
    monkeypatch.setenv("GCS_HMAC_SECRET", SECRET)
    s = resolve_s3(parse_uri("gs://priv/x"), PullOptions())
    assert (s.endpoint_url, s.anonymous, s.access_key_id, s.source) == (
        "http://127.0.0.1:1", False, "GOOG1EXAMPLE", "gcs-hmac-env")
    assert SECRET not in repr(s)
