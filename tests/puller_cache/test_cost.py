"""What cache bookkeeping costs, counted (not timed): stats() reads no manifest once it has
its index (kept on publish / GC / discard, rescanned for other pods' changes at most every
`rescan_s`, reading only new keys' manifests); a cache hit with a disk budget runs no GC scan;
the per-key thread-lock registry does not grow with the keys ever locked; a local file with a
sha256 is hashed once per (path, size, mtime, inode), not on every source check."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

import puller.cache as cache_mod
from puller import Cache, PullOptions
from tests.support.httpserver import HTTPFileServer


@pytest.fixture
def manifest_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    reads: list[Path] = []
    real = cache_mod._read_manifest

    def counting(d: Path):
        reads.append(d)
        return real(d)

    monkeypatch.setattr(cache_mod, "_read_manifest", counting)
    return reads


def _publish(cache: Cache, srv: HTTPFileServer, n: int, prefix: str = "m") -> list[str]:
    keys = []
    for i in range(n):
        srv.set_file(f"{prefix}{i}", b"x" * 100)
        keys.append(cache.ensure(srv.url(f"{prefix}{i}")).key)
    return keys


def test_stats_reads_no_manifest_per_call(root: Path, http_server: HTTPFileServer,
                                          manifest_reads: list[Path]) -> None:
    cache = Cache(root)
    keys = _publish(cache, http_server, 8)
    cache.stats()
    manifest_reads.clear()
    for _ in range(5):
        s = cache.stats()
    assert (s["entries"], s["bytes"]) == (8, 800)
    assert manifest_reads == [], "stats() read manifests"
    _publish(cache, http_server, 1, prefix="new")  # a publish here updates the index
    cache.discard(keys[0], "test")
    cache.gc(650)
    manifest_reads.clear()
    s = cache.stats()
    assert (s["entries"], s["bytes"]) == (6, 600) and manifest_reads == []
    other_pod = Cache(root)
    _publish(other_pod, http_server, 2, prefix="other")
    manifest_reads.clear()
    s = cache.refresh_stats()  # the rescan sees other pods' entries, reading their manifests only
    assert (s["entries"], s["bytes"]) == (8, 800)
    assert len(manifest_reads) == 2
    _publish(other_pod, http_server, 1, prefix="later")
    cache.rescan_s = 0  # stats() answers at once and rescans in the background when stale
    deadline = time.monotonic() + 30
    while cache.stats()["entries"] != 9 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.stats()["entries"] == 9


def test_a_hit_with_a_budget_runs_no_gc_scan(root: Path, http_server: HTTPFileServer,
                                             manifest_reads: list[Path]) -> None:
    cache = Cache(root, max_bytes=10_000)
    _publish(cache, http_server, 10)
    manifest_reads.clear()
    entry = cache.ensure(http_server.url("m3"))
    assert entry.hit
    assert len(manifest_reads) == 1, f"a hit read {len(manifest_reads)} manifests"


def test_thread_lock_registry_stays_bounded(root: Path, http_server: HTTPFileServer) -> None:
    cache = Cache(root)
    before = len(cache_mod._thread_locks)
    keys = _publish(cache, http_server, 8)
    for k in keys:
        cache.lease(k, "pod@m")
        cache.release(k, "pod@m")
    assert len(cache_mod._thread_locks) == before


def test_local_sha256_is_not_rehashed_on_every_check(root: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"weights" * 1000)
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    hashed: list[Path] = []
    real = cache_mod._sha256_file
    monkeypatch.setattr(cache_mod, "_sha256_file", lambda p: hashed.append(Path(p)) or real(p))
    cache = Cache(root)
    for _ in range(3):
        assert cache.ensure(str(f), PullOptions(sha256=want)).in_place
    assert hashed == [f]
    assert Cache(root).ensure(str(f), PullOptions(sha256=want)).in_place  # a restart remembers too
    assert hashed == [f]
    f.write_bytes(b"WEIGHTS" * 1000)  # changed (same size, new mtime): hashed again, and refused
    with pytest.raises(cache_mod.IntegrityError):
        cache.ensure(str(f), PullOptions(sha256=want))
    assert hashed == [f, f]
