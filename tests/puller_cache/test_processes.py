"""Several processes share one root: one download in all; a pull killed with SIGKILL leaves no
published entry, and the next start sweeps its leftovers and completes."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

from puller import Cache
from tests.puller_cache.conftest import REPO, cli_cmd, cli_env
from tests.support.httpserver import HTTPFileServer


def test_processes_pulling_one_uri_download_it_once(tmp_path: Path, http_server: HTTPFileServer) -> None:
    data = os.urandom(400_000)
    http_server.set_file("models/m.bin", data)
    http_server.rate_bps = 1_000_000  # ~0.4 s of body: the processes overlap
    root = tmp_path / "cache"
    procs = [subprocess.Popen(cli_cmd("pull", http_server.url("models/m.bin"), str(tmp_path / f"dest{i}"),
                                      "--cache-dir", str(root), "--no-progress"),
                              env=cli_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    assert http_server.get_count("models/m.bin") == 1, "one GET of the body across all processes"
    for i in range(4):
        assert (tmp_path / f"dest{i}" / "m.bin").read_bytes() == data
    cache_lines = [line for _, err in outputs for line in err.splitlines() if "event=pull_done" in line]
    assert sorted(line.split("cache=")[1].split()[0] for line in cache_lines) == ["hit", "hit", "hit", "miss"]
    assert len(Cache(root).ls()) == 1


def test_kill_9_mid_transfer_leaves_no_entry_and_next_pull_completes(tmp_path: Path,
                                                                      http_server: HTTPFileServer) -> None:
    data = os.urandom(2_000_000)
    http_server.set_file("big.bin", data)
    http_server.rate_bps = 500_000  # 4 s of body: plenty of time to kill it in the middle
    root = tmp_path / "cache"
    proc = subprocess.Popen(cli_cmd("pull", http_server.url("big.bin"), str(tmp_path / "dest"),
                                    "--cache-dir", str(root), "--no-progress"),
                            env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while http_server.bytes_sent("big.bin") < 200_000 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert http_server.bytes_sent("big.bin") >= 200_000, "the pull never started"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert os.listdir(root / "entries") == [], "no partial entry may be published"
    leftovers = os.listdir(root / "tmp")
    assert len(leftovers) == 1
    assert not (tmp_path / "dest" / "big.bin").exists()

    http_server.rate_bps = None
    cache = Cache(root)  # start: sweeps the dead pull's temp dir
    assert os.listdir(root / "tmp") == []
    entry = cache.ensure(http_server.url("big.bin"))
    assert not entry.hit
    assert hashlib.sha256((entry.path / "big.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    assert cache.verify().ok


def test_sweep_leaves_a_live_download_alone(tmp_path: Path, http_server: HTTPFileServer) -> None:
    http_server.set_file("slow.bin", b"s" * 600_000)
    http_server.rate_bps = 1_000_000
    root = tmp_path / "cache"
    proc = subprocess.Popen(cli_cmd("pull", http_server.url("slow.bin"), str(tmp_path / "dest"),
                                    "--cache-dir", str(root), "--no-progress"),
                            env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while http_server.bytes_sent("slow.bin") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        live = os.listdir(root / "tmp")
        assert len(live) == 1
        assert Cache(root).sweep() == []  # its owner holds the key lock: not a leftover
        assert os.listdir(root / "tmp") == live
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "dest" / "slow.bin").stat().st_size == 600_000
