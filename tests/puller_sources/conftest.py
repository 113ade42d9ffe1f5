"""Fixtures for the storage-source tests: a clean environment, moto's S3 server, helpers."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.support.s3server import S3Server, s3_server, s3_server_session  # noqa: F401 - fixtures

_ENV_PREFIXES = ("AWS_", "RCLONE_CONFIG_", "GCS_", "S3_", "MODELSHELF_")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credential, endpoint or config from the machine leaks into a test."""
    for name in list(os.environ):
        if name.startswith(_ENV_PREFIXES) or name in ("S3CFG",):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server, with the AWS default chain pointed at it, and a bucket "models"."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    s3_server.create_bucket("models")
    return s3_server


class CountingProgress:
    """A thread-safe progress sink that remembers what it was told."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.files: list[str] = []

    def start(self, total_bytes: int, total_files: int, label: str) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.bytes += nbytes

    def file_done(self, path: str) -> None:
        with self._lock:
            self.files.append(path)

    def finish(self) -> None:
        pass


@pytest.fixture
def progress() -> CountingProgress:
    return CountingProgress()


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` as {relative posix path: bytes}."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
