"""A full disk: serving what is cached needs no free space (a restarted agent on a full disk
gets its cached entries and leases them; a lease file that cannot be written is logged and
retried by the heartbeat, never failing the model); a pull that hits ENOSPC publishes nothing,
says so, and leaves the cache usable.

The full disk is real: a small tmpfs mounted for the test (blocks or inodes exhausted). Where
mounting is not allowed the tests are skipped (they never fake the error)."""
from __future__ import annotations

import errno
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from puller import Cache, PullError
from puller.cache import model_holder
from tests.support.httpserver import HTTPFileServer
from tests.support.s3server import S3Server, s3_server, s3_server_session  # noqa: F401 - fixtures


def _mount_tmpfs(opts: str) -> Path | None:
    d = Path(tempfile.mkdtemp(prefix="modelshelf-full-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        os.rmdir(d)
        return None
    return d


@pytest.fixture
def small_fs() -> Iterator[Callable[[str], Path]]:
    mounted: list[Path] = []

    def make(opts: str) -> Path:
        d = _mount_tmpfs(opts)
        if d is None:
            pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)
        os.rmdir(d)


@pytest.fixture
def http_server() -> Iterator[HTTPFileServer]:
    with HTTPFileServer() as srv:
        yield srv


def _fill_blocks(d: Path) -> None:
    with open(d / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


def _fill_inodes(d: Path) -> int:
    n = 0
    try:
        while True:
            (d / f"inode-filler-{n}").touch()
            n += 1
    except OSError as e:
        assert e.errno == errno.ENOSPC
    return n


def test_restarted_agent_on_a_full_disk_serves_and_leases_cached_models(
        small_fs: Callable[[str], Path], http_server: HTTPFileServer) -> None:
    d = small_fs("size=2m")
    root = d / "cache"
    for name in ("m1.bin", "m2.bin"):
        http_server.set_file(name, name.encode()[:2] * 50_000)
    first = Cache(root, holder="pod")
    keys = {n: first.ensure(http_server.url(n)).key for n in ("m1.bin", "m2.bin")}
    _fill_blocks(d)
    restarted = Cache(root, holder="pod")  # the agent restarts: the disk is full
    for n in ("m1.bin", "m2.bin"):
        entry = restarted.ensure(http_server.url(n), lease=True, holder=model_holder("pod", n))
        assert entry.hit and entry.key == keys[n]
        assert (entry.path / n).read_bytes() == n.encode()[:2] * 50_000
        assert [le.holder for le in restarted.leases(entry.key)] == [f"pod@{n}"]
    restarted.set_meta(keys["m1.bin"], {"measured": 1})  # an annotation that does not fit: skipped
    assert restarted.stats()["entries"] == 2


def test_a_lease_that_cannot_be_written_is_retried_by_the_heartbeat(
        small_fs: Callable[[str], Path], http_server: HTTPFileServer, caplog: pytest.LogCaptureFixture) -> None:
    d = small_fs("size=4m,nr_inodes=64")
    root = d / "cache"
    http_server.set_file("m.bin", b"m" * 10_000)
    key = Cache(root).ensure(http_server.url("m.bin")).key
    restarted = Cache(root, holder="pod")
    fillers = _fill_inodes(d)  # no inode left: not even an empty lease file can be created
    assert fillers > 0
    with caplog.at_level(logging.WARNING, logger="modelshelf.puller.cache"):
        entry = restarted.ensure(http_server.url("m.bin"), lease=True, holder=model_holder("pod", "m"))
    assert entry.hit and entry.key == key and (entry.path / "m.bin").stat().st_size == 10_000
    assert any("event=lease_write_failed" in r.getMessage() and "retry_on_heartbeat" in r.getMessage()
               for r in caplog.records)
    assert restarted.leases(key) == []
    for i in range(4):
        (d / f"inode-filler-{i}").unlink()  # space comes back
    assert restarted.refresh_leases() == 1
    assert [le.holder for le in restarted.leases(key)] == ["pod@m"]
    assert restarted.gc(0).in_use == [key]


def test_enospc_mid_pull_publishes_nothing_and_the_cache_stays_usable(
        small_fs: Callable[[str], Path], http_server: HTTPFileServer) -> None:
    d = small_fs("size=1m")
    root = d / "cache"
    http_server.set_file("big.bin", os.urandom(3_000_000))
    http_server.set_file("small.bin", b"s" * 100_000)
    cache = Cache(root)
    with pytest.raises(PullError) as exc:
        cache.ensure(http_server.url("big.bin"))
    assert http_server.url("big.bin") in str(exc.value) and "No space left on device" in str(exc.value)
    assert os.listdir(root / "entries") == [] and os.listdir(root / "tmp") == []
    entry = cache.ensure(http_server.url("small.bin"))
    assert not entry.hit and cache.verify(entry.key).ok


def test_a_local_model_used_in_place_is_served_on_a_disk_with_no_inode_left(
        small_fs: Callable[[str], Path], tmp_path: Path) -> None:
    """A first start on a full cache disk: not even the key's lock file can be created. The local
    model is used in place all the same; its lease follows when the heartbeat finds room."""
    d = small_fs("size=1m,nr_inodes=32")
    root = d / "cache"
    Cache(root)
    model = tmp_path / "model.bin"
    model.write_bytes(b"local" * 100)
    fillers = _fill_inodes(d)
    cache = Cache(root, holder="pod")
    entry = cache.ensure(str(model), lease=True, holder=model_holder("pod", "local"))
    assert entry.in_place and entry.path == model
    (d / "inode-filler-0").unlink()
    (d / f"inode-filler-{fillers - 1}").unlink()
    (d / f"inode-filler-{fillers - 2}").unlink()
    assert cache.refresh_leases() == 1
    assert [le.holder for le in cache.leases(entry.key)] == ["pod@local"]


def test_the_drop_in_pull_onto_a_full_disk_fails_before_any_get_is_sent(
        small_fs: Callable[[str], Path], s3_server: S3Server) -> None:
    """`modelshelf pull URI DEST` sends its first GETs as soon as the listing is known, before it
    sets up where they go: DEST's file system is checked for the listed bytes first, so a disk
    too small fails with nothing fetched and nothing left in DEST's parent."""
    import time

    from tests.puller_cache.conftest import cli_env, run_cli
    from tests.puller_sources.test_s3_transfer import _RecordingProxy

    d = small_fs("size=1m")
    s3_server.create_bucket("models")
    s3_server.put("models", "m/weights.bin", os.urandom(3_000_000))
    proxy = _RecordingProxy(s3_server.endpoint_url)
    try:
        env = cli_env({**s3_server.env(), "AWS_ENDPOINT_URL": proxy.url})
        r = run_cli("pull", "s3://models/m", str(d / "dest"), "--no-progress", env=env)
        time.sleep(0.5)  # (any request sent before the exit reaches the proxy's handler meanwhile)
    finally:
        proxy.close()
    assert r.returncode == 1 and "no space left on device" in r.stderr, r.stderr
    assert sorted(m for m, _ in proxy.seen) == ["GET LIST", "HEAD"]
    assert os.listdir(d) == []
