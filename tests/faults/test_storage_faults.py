"""Storage faults: bits flipped in a published cache entry (caught by `modelshelf cache verify`)
and a cache filesystem that fills up while pulling (a small tmpfs: a clear error for that
model, the others unaffected)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.conftest import infer, served
from tests.support.httpserver import HTTPFileServer
from tests.support.models import write_sklearn_model


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=120)


def _model_bytes(tmp_path: Path, name: str, pad_bytes: int = 0, seed: int = 1) -> bytes:
    return (write_sklearn_model(tmp_path / "src" / name, seed=seed, pad_bytes=pad_bytes) / "model.joblib").read_bytes()


def test_cache_verify_catches_flipped_bits_and_extra_files(tmp_path):
    cache = tmp_path / "cache"
    with HTTPFileServer(files={"m/model.joblib": _model_bytes(tmp_path, "m")}) as srv:
        pulled = _cli("pull", srv.url("m/model.joblib"), str(tmp_path / "dest"), "--cache-dir", str(cache), "--no-progress")
        assert pulled.returncode == 0, pulled.stderr
    ok = _cli("cache", "verify", "--cache-dir", str(cache))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (entry,) = json.loads(_cli("cache", "ls", "--cache-dir", str(cache), "--json").stdout)
    files = [p for p in Path(entry["path"]).rglob("*") if p.is_file()]
    (victim,) = [p for p in files if p.name == "model.joblib"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    victim.write_bytes(bytes(data))  # as root: file modes do not stop it, the digest does
    flipped = _cli("cache", "verify", "--cache-dir", str(cache))
    assert flipped.returncode != 0, "a flipped bit passed verify: " + flipped.stdout
    assert "model.joblib" in flipped.stdout + flipped.stderr, flipped.stdout + flipped.stderr

    data[len(data) // 2] ^= 0x01  # put it back: the entry verifies again
    victim.write_bytes(bytes(data))
    assert _cli("cache", "verify", "--cache-dir", str(cache)).returncode == 0
    os.chmod(victim.parent, 0o755)
    (victim.parent / "__pycache__").mkdir()
    (victim.parent / "__pycache__" / "x.pyc").write_bytes(b"byproduct")  # what a server might add
    extra = _cli("cache", "verify", "--cache-dir", str(cache))
    assert extra.returncode != 0 and "x.pyc" in extra.stdout + extra.stderr, extra.stdout + extra.stderr


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (skips where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_while_pulling_fails_that_model_clearly_and_the_others_serve(start_agent, tmp_path, small_fs):
    small = _model_bytes(tmp_path, "small", seed=1)
    big = _model_bytes(tmp_path, "big", pad_bytes=3 * 2**20, seed=2)  # 3 MiB: cannot fit in 1 MiB
    with HTTPFileServer(files={"small/model.joblib": small, "big/model.joblib": big}) as srv:
        agent = start_agent([{"name": "small", "uri": srv.url("small/model.joblib")},
                             {"name": "big", "uri": srv.url("big/model.joblib")}], cache=small_fs / "cache", wait=False)
        agent.wait_ready(60)
        status = agent.wait_for(lambda s: s["models"]["big"]["state"] == "failed" and s["models"]["small"]["state"] == "loaded",
                                timeout=60, what="big failed, small loaded")
        reason = status["models"]["big"]["reason"]
        assert "big" in reason or srv.url("big/model.joblib") in reason or "pull" in reason, reason
        assert "No space left" in reason or "ENOSPC" in reason or "disk full" in reason.lower(), reason
        r = infer(agent, "small")
        assert r.status_code == 200, r.text
        r = infer(agent, "big")
        assert r.status_code == 503 and r.headers.get("retry-after") and ("No space" in r.text or "disk full" in r.text.lower()), r.text
        assert served(agent)["small"]["state"] == "loaded"
        leftovers = [p for p in (small_fs / "cache").rglob("*") if p.is_file() and p.stat().st_size > 2**19]
        assert leftovers == [], f"the failed pull left {leftovers} behind on the full disk"
