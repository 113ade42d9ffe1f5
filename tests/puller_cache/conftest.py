"""Fixtures for the cache tests: a real HTTP file server, a cache root, and a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.httpserver import HTTPFileServer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def http_server() -> Iterator[HTTPFileServer]:
    with HTTPFileServer() as srv:
        yield srv


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MODELSHELF_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra or {})
    return env


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *args]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `modelshelf ARGS` in a fresh process; returns the completed process (text output)."""
    return subprocess.run(cli_cmd(*args), env=cli_env(env), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
