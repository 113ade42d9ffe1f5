"""Cache.ensure against a real HTTP server and real local files: hits, changes, in-place
sources, sub-models, integrity, thread dedup, the publish-race safety net."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
import time
from pathlib import Path

import pytest

from puller import Cache, PullOptions
from puller.errors import IntegrityError, NotFound, UnsafeArchive
from puller.sources.base import file_digest
from tests.support.httpserver import HTTPFileServer


def _tgz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_hit_moves_zero_bytes_and_changed_source_makes_new_entry(root: Path, http_server: HTTPFileServer) -> None:
    http_server.set_file("m/model.joblib", b"v1" * 5000)
    cache = Cache(root)
    first = cache.ensure(http_server.url("m/model.joblib"))
    assert not first.hit and first.files == ("model.joblib",) and first.size == 10_000
    assert (first.path / "model.joblib").read_bytes() == b"v1" * 5000
    assert http_server.get_count("m/model.joblib") == 1

    ino = (first.path / "model.joblib").stat().st_ino
    again = Cache(root).ensure(http_server.url("m/model.joblib"))  # a new process would do the same
    assert again.hit and again.key == first.key and again.path == first.path
    assert http_server.get_count("m/model.joblib") == 1, "a hit must not GET the body"
    assert (again.path / "model.joblib").stat().st_ino == ino

    http_server.set_file("m/model.joblib", b"v2" * 5000)  # new bytes, new ETag
    changed = cache.ensure(http_server.url("m/model.joblib"))
    assert not changed.hit and changed.key != first.key
    assert (changed.path / "model.joblib").read_bytes() == b"v2" * 5000
    assert http_server.get_count("m/model.joblib") == 2
    assert {i.key for i in cache.ls()} == {first.key, changed.key}
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"], stats["bytes"]) == (0, 2, 2, 20_000)


def test_manifest_records_files_digests_identity(root: Path, http_server: HTTPFileServer) -> None:
    data = os.urandom(3000)
    http_server.set_file("a/w.bin", data)
    entry = Cache(root).ensure(http_server.url("a/w.bin"))
    manifest = json.loads((entry.path.parent / "manifest.json").read_text())
    assert manifest["uri"] == http_server.url("a/w.bin")
    # every file gets a fast digest computed while streaming (no second pass over the bytes)
    assert manifest["files"] == [{"path": "w.bin", "size": 3000, "digest": file_digest(entry.path / "w.bin")}]
    assert manifest["digest_algo"] == "xxh3-128/1m" and manifest["files"][0]["digest"].startswith("xxh3-128/1m:")
    assert manifest["total_bytes"] == 3000
    # with the user's sha256, the checked digest is recorded for `cache verify`
    http_server.set_file("b/w.bin", data)
    digest = hashlib.sha256(data).hexdigest()
    checked = Cache(root).ensure(http_server.url("b/w.bin"), PullOptions(sha256=digest))
    manifest2 = json.loads((checked.path.parent / "manifest.json").read_text())
    assert manifest2["files"] == [{"path": "w.bin", "size": 3000, "sha256": digest,
                                   "digest": manifest["files"][0]["digest"]}]
    assert "etag" in manifest["sources"][0]["identity"]
    assert manifest["created"] and manifest["key"] == entry.key
    assert os.listdir(root / "tmp") == []


def test_archive_source_is_extracted(root: Path, http_server: HTTPFileServer) -> None:
    http_server.set_file("m.tar.gz", _tgz({"model/a.txt": b"alpha", "model/b/c.txt": b"gamma"}))
    entry = Cache(root).ensure(http_server.url("m.tar.gz"))
    assert entry.files == ("model/a.txt", "model/b/c.txt")
    assert (entry.path / "model/b/c.txt").read_bytes() == b"gamma"
    assert not (entry.path / "m.tar.gz").exists()


def test_hostile_archive_publishes_nothing(root: Path, http_server: HTTPFileServer, tmp_path: Path) -> None:
    http_server.set_file("bad.tgz", _tgz({"ok.txt": b"fine", "../../../evil.txt": b"x"}))
    with pytest.raises(UnsafeArchive, match="evil.txt"):
        Cache(root).ensure(http_server.url("bad.tgz"))
    assert os.listdir(root / "entries") == [] and os.listdir(root / "tmp") == []
    assert not list(tmp_path.rglob("evil.txt"))


def test_local_dir_and_pvc_are_used_in_place(root: Path, tmp_path: Path) -> None:
    src = tmp_path / "models" / "iris"
    (src / "1").mkdir(parents=True)
    (src / "1" / "model.joblib").write_bytes(b"m" * 100)
    (src / "config.pbtxt").write_text("name: 'iris'")
    cache = Cache(root)
    for uri, options in ((str(src), None), ("file://" + str(src), None),
                         ("pvc://models/iris", PullOptions(pvc_root=tmp_path))):
        entry = cache.ensure(uri, options)
        assert entry.in_place and entry.hit and entry.path == src
        assert entry.files == ("1/model.joblib", "config.pbtxt") and entry.size == 112
    assert os.listdir(root / "entries") == [] and os.listdir(root / "tmp") == []
    key = cache.ensure(str(src)).key
    time.sleep(0.01)
    (src / "config.pbtxt").write_text("name: 'iris2'")  # changed source: new key, still in place
    assert cache.ensure(str(src)).key != key


def test_missing_local_path_is_not_found(root: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="nope") as exc:
        Cache(root).ensure(str(tmp_path / "nope"))
    assert exc.value.exit_code == 3


def test_local_archive_is_extracted_once(root: Path, tmp_path: Path) -> None:
    arc = tmp_path / "m.tgz"
    arc.write_bytes(_tgz({"w.bin": b"w" * 10}))
    cache = Cache(root)
    first = cache.ensure(str(arc))
    assert not first.in_place and (first.path / "w.bin").read_bytes() == b"w" * 10
    mtime = (first.path / "w.bin").stat().st_mtime_ns
    second = cache.ensure(str(arc))
    assert second.hit and (second.path / "w.bin").stat().st_mtime_ns == mtime


def test_sub_models_make_one_entry_with_one_subdir_each(root: Path, http_server: HTTPFileServer, tmp_path: Path) -> None:
    http_server.set_file("enc/encoder.onnx", b"E" * 50)
    http_server.set_file("dec.tar.gz", _tgz({"decoder.onnx": b"D" * 60}))
    local = tmp_path / "tok"
    local.mkdir()
    (local / "vocab.txt").write_text("a b c")
    cache = Cache(root)
    mapping = {"encoder": http_server.url("enc/encoder.onnx"), "decoder": http_server.url("dec.tar.gz"),
               "tokenizer": str(local)}
    entry = cache.ensure(mapping)
    assert sorted(os.listdir(entry.path)) == ["decoder", "encoder", "tokenizer"]
    assert (entry.path / "encoder" / "encoder.onnx").read_bytes() == b"E" * 50
    assert (entry.path / "decoder" / "decoder.onnx").read_bytes() == b"D" * 60
    assert (entry.path / "tokenizer").is_symlink(), "a local sub-model is linked, not copied"
    assert (entry.path / "tokenizer" / "vocab.txt").read_text() == "a b c"
    assert entry.size == 115  # 50 + 60 copied, 5 linked
    assert [i.size for i in cache.ls()] == [110]  # the budget counts only what the cache holds
    again = cache.ensure(dict(reversed(list(mapping.items()))))
    assert again.hit and again.key == entry.key
    assert cache.verify().ok


def test_sha256_checked_on_download_and_on_hit(root: Path, http_server: HTTPFileServer) -> None:
    data = b"weights" * 100
    good = hashlib.sha256(data).hexdigest()
    http_server.set_file("w.bin", data)
    cache = Cache(root)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        cache.ensure(http_server.url("w.bin"), PullOptions(sha256="0" * 64))
    assert os.listdir(root / "entries") == [] and os.listdir(root / "tmp") == []
    entry = cache.ensure(http_server.url("w.bin"), PullOptions(sha256=good.upper()))
    assert not entry.hit
    with pytest.raises(IntegrityError):
        cache.ensure(http_server.url("w.bin"), PullOptions(sha256="1" * 64))
    assert cache.ensure(http_server.url("w.bin"), PullOptions(sha256=good)).hit


def test_threads_share_one_download(root: Path, http_server: HTTPFileServer) -> None:
    http_server.set_file("big.bin", os.urandom(200_000))
    http_server.rate_bps = 1_000_000  # ~0.2 s body: every thread arrives while it runs
    cache = Cache(root)
    results, errors = [], []

    def pull() -> None:
        try:
            results.append(cache.ensure(http_server.url("big.bin")))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=pull) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors
    assert http_server.get_count("big.bin") == 1
    assert len({r.key for r in results}) == 1 and sum(not r.hit for r in results) == 1
    assert cache.stats()["misses"] == 1 and cache.stats()["hits"] == 5


def test_rename_race_discards_own_copy_and_uses_winner(tmp_path: Path, http_server: HTTPFileServer) -> None:
    """The lock is bypassed (another root's entry appears under ours mid-download, as when locks
    do not work across nodes): the rename loses, the temp copy is dropped, the winner is used."""
    http_server.set_file("m.bin", b"x" * 300_000)
    winner = Cache(tmp_path / "other").ensure(http_server.url("m.bin"))
    http_server.rate_bps = 1_000_000
    cache = Cache(tmp_path / "cache")
    out: list = []
    t = threading.Thread(target=lambda: out.append(cache.ensure(http_server.url("m.bin"))))
    t.start()
    deadline = time.monotonic() + 10
    while not os.listdir(tmp_path / "cache" / "tmp") and time.monotonic() < deadline:
        time.sleep(0.005)
    shutil.copytree(winner.path.parent, tmp_path / "cache" / "entries" / winner.key)
    t.join(timeout=20)
    assert out and out[0].key == winner.key and out[0].hit
    assert (out[0].path / "m.bin").read_bytes() == b"x" * 300_000
    assert os.listdir(tmp_path / "cache" / "tmp") == []


def test_meta_annotations_are_per_key_and_atomic(root: Path, tmp_path: Path) -> None:
    src = tmp_path / "m"
    src.mkdir()
    (src / "f").write_text("x")
    cache = Cache(root)
    key = cache.ensure(str(src)).key
    assert cache.get_meta(key) == {}
    cache.set_meta(key, {"memory_bytes": 123, "runtime": "mlserver"})
    assert Cache(root).get_meta(key) == {"memory_bytes": 123, "runtime": "mlserver"}
    cache.set_meta(key, {"memory_bytes": 456})
    assert cache.get_meta(key) == {"memory_bytes": 456}
    assert [p.name for p in (root / "meta").iterdir()] == [f"{key}.json"]


def test_verify_reports_a_corrupted_file(root: Path, http_server: HTTPFileServer) -> None:
    http_server.set_file("w.bin", b"a" * 1000)
    cache = Cache(root)
    entry = cache.ensure(http_server.url("w.bin"), PullOptions(record_digests=True))
    assert cache.verify(entry.key).ok
    f = entry.path / "w.bin"
    os.chmod(f, 0o644)
    f.write_bytes(b"b" * 1000)
    report = cache.verify()
    assert not report.ok and [(m.path, m.problem) for m in report.mismatches] == [
        ("w.bin", "content changed (digest differs)"), ("w.bin", "writable (mode 644)")]
    f.write_bytes(b"b" * 999)  # a size change is found without digests too
    assert ("w.bin", "size 999 != 1000") in [(m.path, m.problem) for m in cache.verify().mismatches]
    (entry.path / "extra").write_text("?")
    assert ("extra", "extra file, not in the manifest") in [
        (m.path, m.problem) for m in cache.verify(entry.key).mismatches]
