"""`modelshelf pull` and `modelshelf cache ...` run as real processes: exit codes, DEST
contents (copied from the cache or moved in; see test_immutable.py), and no secret in any output."""
from __future__ import annotations

import hashlib
import json
import os
import pty
import subprocess
from pathlib import Path

from tests.puller_cache.conftest import REPO, cli_cmd, cli_env, run_cli
from tests.support.httpserver import HTTPFileServer
from tests.support.s3server import S3Server, s3_server, s3_server_session  # noqa: F401 - fixtures

TOKEN = "tok-9f8e7d6c5b4a39281706"


def test_pull_without_cache_moves_files_and_leaves_nothing_behind(tmp_path: Path, http_server: HTTPFileServer) -> None:
    http_server.set_file("w.bin", b"w" * 5000)
    dest = tmp_path / "out" / "model"
    r = run_cli("pull", http_server.url("w.bin"), str(dest), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (dest / "w.bin").read_bytes() == b"w" * 5000
    assert os.access(dest / "w.bin", os.W_OK)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"], "temp cache removed"


def test_pull_without_cache_into_an_existing_dest_keeps_that_directory(tmp_path: Path, s3_server: S3Server) -> None:
    """A new DEST gets the downloaded tree in one rename; an existing one (e.g. an emptyDir
    mount, or a directory made for a non-root consumer) keeps its own inode and mode, and gets
    the files and sub-directories, all writable, and nothing else."""
    s3_server.create_bucket("models")
    for key, body in (("m/a.bin", b"a" * 3000), ("m/sub/b.bin", b"b" * 10), ("m/sub/deeper/c.bin", b"c")):
        s3_server.put("models", key, body)
    env = cli_env(s3_server.env())
    fresh = tmp_path / "fresh" / "model"
    kept = tmp_path / "kept"
    kept.mkdir()
    os.chmod(kept, 0o2777)
    before = os.stat(kept)
    for dest in (fresh, kept):
        r = run_cli("pull", "s3://models/m", str(dest), "--no-progress", env=env)
        assert r.returncode == 0, r.stderr
        got = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
        assert got == {"a.bin": b"a" * 3000, "sub/b.bin": b"b" * 10, "sub/deeper/c.bin": b"c"}
        assert all(os.access(p, os.W_OK) for p in dest.rglob("*"))
        assert [p.name for p in dest.parent.iterdir() if p.name.startswith(".modelshelf")] == []
    after = os.stat(kept)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)


def test_pull_local_dir_copies_into_dest(tmp_path: Path) -> None:
    src = tmp_path / "pvc" / "claim" / "iris"
    (src / "1").mkdir(parents=True)
    (src / "1" / "model.onnx").write_bytes(b"onnx")
    dest = tmp_path / "dest"
    r = run_cli("pull", "pvc://claim/iris", str(dest), "--pvc-root", str(tmp_path / "pvc"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (dest / "1" / "model.onnx").read_bytes() == b"onnx"


def test_exit_codes(tmp_path: Path, http_server: HTTPFileServer) -> None:
    http_server.set_file("w.bin", b"abc")
    cases = [
        (["pull", "ftp://host/model.bin", str(tmp_path / "d1")], 2, "ftp://host/model.bin"),
        (["pull", "s3://", str(tmp_path / "d2")], 2, "s3://"),
        (["pull", http_server.url("missing.bin"), str(tmp_path / "d3")], 3, http_server.url("missing.bin")),
        (["pull", str(tmp_path / "no-such-dir"), str(tmp_path / "d4")], 3, "no-such-dir"),
        (["pull", http_server.url("w.bin"), str(tmp_path / "d5"), "--sha256", "0" * 64], 5, "sha256 mismatch"),
        (["pull", http_server.url("w.bin"), str(tmp_path / "d6"), "--sha256", "xyz"], 2, "--sha256"),
    ]
    for args, code, needle in cases:
        r = run_cli(*args, "--no-progress")
        assert r.returncode == code, (args, r.returncode, r.stderr)
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("modelshelf pull: ") and needle in last, last
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "d5").exists() or not any((tmp_path / "d5").iterdir())
    good = hashlib.sha256(b"abc").hexdigest()
    assert run_cli("pull", http_server.url("w.bin"), str(tmp_path / "d7"), "--sha256", good).returncode == 0


def test_secrets_never_printed_http(tmp_path: Path) -> None:
    with HTTPFileServer(files={"m.bin": b"m" * 100}, require_headers={"Authorization": f"Bearer {TOKEN}"}) as srv:
        ok = run_cli("pull", srv.url("m.bin"), str(tmp_path / "ok"), "--header", f"Authorization: Bearer {TOKEN}",
                     "--cache-dir", str(tmp_path / "cache"), "--no-progress")
        assert ok.returncode == 0, ok.stderr
        denied = run_cli("pull", srv.url("m.bin"), str(tmp_path / "no"), "--header",
                         f"Authorization: Bearer {TOKEN}-wrong", "--no-progress")
        assert denied.returncode == 4
    with HTTPFileServer() as open_srv:  # credentials in the URL itself: userinfo and a query token
        userinfo = open_srv.url("gone.bin").replace("http://", f"http://admin:{TOKEN}@") + f"?token={TOKEN}"
        missing = run_cli("pull", userinfo, str(tmp_path / "gone"), "--no-progress")
        assert missing.returncode == 3, missing.stderr
        assert "127.0.0.1" in missing.stderr and "gone.bin" in missing.stderr
    for r in (ok, denied, missing):
        assert TOKEN not in r.stdout + r.stderr, r.stderr
    manifest = next((tmp_path / "cache" / "entries").iterdir()) / "manifest.json"
    assert TOKEN not in manifest.read_text()


def test_secrets_never_printed_s3(tmp_path: Path, s3_server: S3Server) -> None:
    s3_server.create_bucket("models")
    s3_server.put("models", "iris/model.joblib", b"iris" * 10)
    s3_server.put("models", "iris/sub/meta.json", b"{}")
    env = s3_server.env()
    secret = env["AWS_SECRET_ACCESS_KEY"]
    ok = run_cli("pull", "s3://models/iris", str(tmp_path / "dest"), "--cache-dir", str(tmp_path / "cache"),
                 "--no-progress", env=env)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "dest" / "model.joblib").read_bytes() == b"iris" * 10
    assert (tmp_path / "dest" / "sub" / "meta.json").read_bytes() == b"{}"
    missing = run_cli("pull", "s3://models/nothing-here", str(tmp_path / "d2"), "--no-progress", env=env)
    assert missing.returncode == 3 and "s3://models/nothing-here" in missing.stderr
    for r in (ok, missing):
        assert secret not in r.stdout + r.stderr


def test_a_record_logged_before_the_first_request_goes_through_the_clis_handler(tmp_path: Path,
                                                                              s3_server: S3Server) -> None:
    """Logging is imported on first use (puller.logs): a record made before the pull's first
    request (an anonymous pull says so while its client is made) still sets up the CLI's handler,
    the one that masks secrets, first; without it logging's last resort drops INFO records."""
    s3_server.create_bucket("public", public=True)
    s3_server.put("public", "m/w.bin", b"anonymous bytes")
    env = {k: v for k, v in s3_server.env().items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    r = run_cli("pull", "s3://public/m", str(tmp_path / "dest"), "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dest" / "w.bin").read_bytes() == b"anonymous bytes"
    assert " INFO modelshelf.puller.sources.s3 event=s3_anonymous reason=no_credentials_found " in r.stderr, r.stderr
    # the listing's record, made once the first GETs are on the wire (puller.cli._fetch_ahead)
    assert " INFO modelshelf.puller.sources.s3 event=s3_list uri=s3://public/m files=1 " in r.stderr, r.stderr


def test_cache_ls_gc_verify(tmp_path: Path, http_server: HTTPFileServer) -> None:
    cache = tmp_path / "cache"
    for name in ("a.bin", "b.bin"):
        http_server.set_file(name, name.encode() * 500)
        assert run_cli("pull", http_server.url(name), str(tmp_path / name), "--cache-dir", str(cache),
                       "--no-progress").returncode == 0
    ls = run_cli("cache", "ls", "--cache-dir", str(cache))
    assert ls.returncode == 0 and ls.stdout.splitlines()[0].split()[:2] == ["KEY", "SIZE"]
    assert http_server.url("a.bin") in ls.stdout and http_server.url("b.bin") in ls.stdout
    rows = json.loads(run_cli("cache", "ls", "--cache-dir", str(cache), "--json").stdout)
    assert sorted(r["uri"] for r in rows) == [http_server.url("a.bin"), http_server.url("b.bin")]
    assert all(r["size"] == 2500 and r["files"] == 1 and r["leases"] == [] for r in rows)

    assert run_cli("cache", "verify", "--cache-dir", str(cache)).returncode == 0
    victim = cache / "entries" / rows[0]["key"] / "files" / Path(rows[0]["uri"]).name
    os.chmod(victim, 0o644)
    victim.write_bytes(b"corrupt")
    bad = run_cli("cache", "verify", "--cache-dir", str(cache))
    assert bad.returncode == 5 and "MISMATCH" in bad.stdout and rows[0]["key"] in bad.stdout
    assert run_cli("cache", "verify", "--cache-dir", str(cache), "0" * 32).returncode == 3

    gc = run_cli("cache", "gc", "--cache-dir", str(cache), "--max-cache-bytes", "3Ki")
    assert gc.returncode == 0 and gc.stdout.count("removed ") == 1, gc.stdout
    assert len(json.loads(run_cli("cache", "ls", "--cache-dir", str(cache), "--json").stdout)) == 1
    assert run_cli("cache", "gc", "--cache-dir", str(cache), "--max-cache-bytes", "lots").returncode == 2


def test_progress_bar_on_a_terminal(tmp_path: Path, http_server: HTTPFileServer) -> None:
    http_server.set_file("p.bin", b"p" * 300_000)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(cli_cmd("pull", http_server.url("p.bin"), str(tmp_path / "d")), env=cli_env(),
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=30) == 0
    finally:
        os.close(master)
    out = b"".join(chunks).decode(errors="replace")
    assert "300.0/300.0 kB" in out or "300.0 kB" in out, out[-2000:]
