"""Leases and GC: LRU removal within a budget; live leases (from any holder or process) and
locked keys protect entries; a lease not refreshed within its TTL no longer does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from puller import Cache
from tests.support.httpserver import HTTPFileServer


def _fill(cache: Cache, srv: HTTPFileServer, names: list[str], size: int = 1000) -> dict[str, str]:
    """One entry per name; last-used times 10 s apart in list order (oldest first)."""
    keys = {}
    base = time.time() - 1000
    for i, name in enumerate(names):
        srv.set_file(name, name.encode()[:1] * size)
        entry = cache.ensure(srv.url(name))
        keys[name] = entry.key
        os.utime(entry.path.parent, (base + 10 * i, base + 10 * i))
    return keys


def test_gc_removes_lru_until_within_budget(root: Path, http_server: HTTPFileServer) -> None:
    cache = Cache(root)
    keys = _fill(cache, http_server, ["a", "b", "c", "d"])
    cache.ensure(http_server.url("a"))  # a hit makes "a" the most recently used
    report = cache.gc(2000)
    assert [i.key for i in report.removed] == [keys["b"], keys["c"]]
    assert report.freed == 2000 and report.bytes_after == 2000 and report.within_budget
    assert {i.key for i in cache.ls()} == {keys["a"], keys["d"]}
    assert sorted(os.listdir(root / "trash")) == [] and os.listdir(root / "tmp") == []
    assert not (root / "locks" / f"{keys['b']}.lock").exists()
    assert cache.gc(2000).removed == []  # already within budget


def test_leased_entry_is_never_removed(root: Path, http_server: HTTPFileServer) -> None:
    cache = Cache(root, holder="pod-a")
    keys = _fill(cache, http_server, ["a", "b", "c"])
    other_pod = Cache(root, holder="pod-b")  # another agent sharing the root
    other_pod.lease(keys["a"])
    assert [le.holder for le in cache.leases(keys["a"])] == ["pod-b"]
    report = cache.gc(0)
    assert {i.key for i in report.removed} == {keys["b"], keys["c"]}
    assert report.in_use == [keys["a"]] and not report.within_budget
    assert [i.key for i in cache.ls()] == [keys["a"]]
    assert cache.ls()[0].leases == ("pod-b",)
    other_pod.release(keys["a"])
    assert cache.leases(keys["a"]) == []
    assert [i.key for i in cache.gc(0).removed] == [keys["a"]]


def test_stale_lease_no_longer_protects_but_heartbeat_does(root: Path, http_server: HTTPFileServer) -> None:
    cache = Cache(root, lease_ttl_s=0.5)
    keys = _fill(cache, http_server, ["a", "b"])
    cache.lease(keys["a"])
    cache.lease(keys["b"])
    crashed = Cache(root, lease_ttl_s=0.5)  # the "b" lease stops being refreshed: its pod is gone
    crashed._mine.clear()
    cache._mine.discard((keys["b"], cache.holder))
    for _ in range(4):  # 0.8 s in all: past the TTL, with heartbeats for "a" only
        time.sleep(0.2)
        assert cache.refresh_leases() == 1
    assert [le.holder for le in cache.leases(keys["a"])] == [cache.holder]
    assert cache.leases(keys["b"]) == []
    report = cache.gc(0)
    assert [i.key for i in report.removed] == [keys["b"]]
    assert report.in_use == [keys["a"]]
    assert not (root / "leases" / keys["b"]).exists()


def test_gc_skips_a_key_locked_by_another_process(root: Path, http_server: HTTPFileServer) -> None:
    cache = Cache(root)
    keys = _fill(cache, http_server, ["a", "b"])
    lockfile = root / "locks" / f"{keys['a']}.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDWR|os.O_CREAT);"
                               "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)",
         str(lockfile)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        report = cache.gc(0)
        assert [i.key for i in report.removed] == [keys["b"]]
        assert report.in_use == [keys["a"]]
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert [i.key for i in cache.gc(0).removed] == [keys["a"]]


def test_ensure_runs_gc_with_max_bytes_but_keeps_what_it_returns(root: Path, http_server: HTTPFileServer) -> None:
    cache = Cache(root, max_bytes=2500)
    keys = _fill(cache, http_server, ["a", "b"])
    http_server.set_file("c", b"c" * 1000)
    c = cache.ensure(http_server.url("c"))
    assert {i.key for i in cache.ls()} == {keys["b"], c.key}
    http_server.set_file("huge", b"h" * 5000)  # bigger than the whole budget: still returned
    huge = cache.ensure(http_server.url("huge"), lease=True)
    assert (huge.path / "huge").stat().st_size == 5000
    assert [i.key for i in cache.ls()] == [huge.key]
    assert cache.leases(huge.key)


def test_lease_api_rejects_bad_keys(root: Path) -> None:
    cache = Cache(root)
    with pytest.raises(ValueError):
        cache.lease("../../etc")
    with pytest.raises(ValueError):
        cache.gc()  # no budget anywhere


def test_gc_racing_leased_ensures_never_removes_a_returned_entry(root: Path, http_server: HTTPFileServer) -> None:
    """Threads pull-and-lease while another cache on the same root runs gc(0) in a loop: every
    entry a puller holds a lease on stays complete on disk until it releases it."""
    import threading

    for i in range(6):
        http_server.set_file(f"m{i}", bytes([65 + i]) * 2000)
    stop = threading.Event()
    problems: list[str] = []
    gc_runs = [0]

    def collector() -> None:
        janitor = Cache(root, holder="janitor")
        while not stop.is_set():
            janitor.gc(0)
            gc_runs[0] += 1

    def puller(n: int) -> None:
        cache = Cache(root, holder=f"puller-{n}")
        for j in range(15):
            name = f"m{(n + j) % 6}"
            entry = cache.ensure(http_server.url(name), lease=True)
            time.sleep(0.01)  # "using" the model: the collector keeps running meanwhile
            data = (entry.path / name).read_bytes() if (entry.path / name).exists() else b""
            if data != bytes([65 + int(name[1:])]) * 2000:
                problems.append(f"{name}: entry {entry.key} incomplete while leased")
            cache.release(entry.key)

    threads = [threading.Thread(target=collector)] + [threading.Thread(target=puller, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join(timeout=30)
    stop.set()
    threads[0].join(timeout=10)
    assert not problems
    assert gc_runs[0] > 5
    assert os.listdir(root / "tmp") == [] and os.listdir(root / "trash") == []


# -- leases per (entry, model) ------------------------------------------------------------------

def test_two_models_on_one_uri_hold_two_leases_and_gc_anywhere_keeps_the_entry(
        root: Path, http_server: HTTPFileServer) -> None:
    """Two models with the same URI on one pod: one lease each (`<pod>@<model>`). Releasing one
    keeps the other; while it lives no GC removes the entry: in-process, `modelshelf cache gc`
    in another process, nor another pod's Cache on the same root."""
    from puller.cache import model_holder
    from tests.puller_cache.conftest import run_cli

    http_server.set_file("shared.bin", b"s" * 3000)
    pod = Cache(root, holder="pod-a")
    a = pod.ensure(http_server.url("shared.bin"), lease=True, holder=model_holder("pod-a", "iris"))
    b = pod.ensure(http_server.url("shared.bin"), lease=True, holder=model_holder("pod-a", "iris-copy"))
    assert a.key == b.key and b.hit
    assert sorted(le.holder for le in pod.leases(a.key)) == ["pod-a@iris", "pod-a@iris-copy"]
    pod.release(a.key, model_holder("pod-a", "iris"))  # the model "iris" is removed from the config
    assert [le.holder for le in pod.leases(a.key)] == ["pod-a@iris-copy"]
    assert pod.gc(0).in_use == [a.key]
    other_pod = Cache(root, holder="pod-b")
    assert other_pod.gc(0).removed == [] and other_pod.ls()[0].leases == ("pod-a@iris-copy",)
    r = run_cli("cache", "gc", "--cache-dir", str(root), "--max-cache-bytes", "0")
    assert r.returncode == 0, r.stderr
    assert "1 entries in use kept" in r.stdout and "STILL OVER BUDGET" in r.stdout
    ls = run_cli("cache", "ls", "--cache-dir", str(root), "--json")
    assert [e["leases"] for e in json.loads(ls.stdout)] == [["pod-a@iris-copy"]]
    assert (a.path / "shared.bin").read_bytes() == b"s" * 3000
    assert pod.refresh_leases() == 1  # the heartbeat refreshes the remaining model's lease only
    pod.release(a.key, model_holder("pod-a", "iris-copy"))
    assert [i.key for i in other_pod.gc(0).removed] == [a.key]


def test_check_finds_deleted_and_truncated_files_verify_finds_same_size_replacement(
        root: Path, http_server: HTTPFileServer) -> None:
    """check() (cheap, before a load) sees a deleted or truncated file; a same-size replacement
    passes check() (no hashing) but not verify(). discard() then makes ensure download again."""
    http_server.set_file("m/a.bin", b"a" * 2000)
    http_server.set_file("m/b.bin", b"b" * 2000)
    cache = Cache(root)
    source = {"a": http_server.url("m/a.bin"), "b": http_server.url("m/b.bin")}  # one entry, two files
    entry = cache.ensure(source)
    assert cache.check(entry) == []
    os.chmod(entry.path / "a", 0o755)  # entries are read-only: as root we can still break one
    (entry.path / "a" / "a.bin").unlink()
    assert cache.check(entry) == ["a/a.bin: missing"]
    os.chmod(entry.path / "b" / "b.bin", 0o644)
    (entry.path / "b" / "b.bin").write_bytes(b"b" * 10)
    assert cache.check(entry) == ["a/a.bin: missing", "b/b.bin: 10 bytes, manifest says 2000"]
    assert cache.discard(entry.key, "test: files broken")
    assert cache.check(entry) == [f"cache entry {entry.key} is gone"]
    again = cache.ensure(source)
    assert not again.hit and again.key == entry.key and cache.check(again) == []
    assert http_server.get_count("m/a.bin") == 2
    p = again.path / "a" / "a.bin"
    os.chmod(p, 0o644)
    p.write_bytes(b"X" + b"a" * 1999)  # same size, other bytes: another model's predictions
    assert cache.check(again) == []
    problems = [(m.path, m.problem) for m in cache.verify(again.key).mismatches]
    assert ("a/a.bin", "content changed (digest differs)") in problems
