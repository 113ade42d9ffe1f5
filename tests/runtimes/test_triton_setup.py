"""triton_setup on a wheel-shaped directory tree: puts the stub in place, idempotently."""
from __future__ import annotations

from pathlib import Path

import pytest

from agent.runtimes.triton_setup import find_install, main, setup


def _wheel_tree(venv: Path) -> Path:
    root = venv / "lib/python3.11/site-packages/pytriton/tritonserver"
    (root / "bin").mkdir(parents=True)
    (root / "bin/tritonserver").write_text("#!/bin/sh\n")
    (root / "backends/python").mkdir(parents=True)
    for version in ("3.10", "3.11"):
        (root / "python_backend_stubs" / version).mkdir(parents=True)
        (root / "python_backend_stubs" / version / "triton_python_backend_stub").write_bytes(f"stub {version}".encode())
    return root


def test_setup_copies_the_stub_for_the_venv_python_and_is_idempotent(tmp_path: Path) -> None:
    root = _wheel_tree(tmp_path / "venv")
    target = setup(tmp_path / "venv")
    assert target == root / "backends/python/triton_python_backend_stub"
    assert target.read_bytes() == b"stub 3.11" and target.stat().st_mode & 0o111
    before = target.stat().st_mtime_ns
    assert setup(tmp_path / "venv") == target and target.stat().st_mtime_ns == before
    assert find_install(tmp_path / "venv").site_packages == tmp_path / "venv/lib/python3.11/site-packages"


def test_missing_install_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nothing")]) == 1
    assert "pip install nvidia-pytriton" in capsys.readouterr().err
