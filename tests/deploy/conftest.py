"""Fixtures for the deploy/ checks: no cluster, no network; everything reads the files."""
from __future__ import annotations

import os

import pytest


@pytest.fixture
def agent_env(monkeypatch):
    """An environment with no MODELSHELF_* / POD_NAME / S3 settings of the machine running the
    tests, so only what a manifest sets reaches the parser. Returns a setter."""
    for key in list(os.environ):
        if key.startswith("MODELSHELF_") or key in ("POD_NAME", "S3CFG"):
            monkeypatch.delenv(key)

    def set_env(values: dict[str, str]) -> None:
        for k, v in values.items():
            monkeypatch.setenv(k, v)

    return set_env
