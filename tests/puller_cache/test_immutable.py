"""Published entries cannot be changed: files AND directories are read-only, so a process of the
entry's owner uid (an agent and its co-located server running as one non-root user) can neither
rewrite a file nor add one (e.g. a `__pycache__`); `verify` re-hashes and names changed, missing
and extra files and directories; `modelshelf pull --cache-dir` gives DEST its own copies, so a
server running as root (which ignores modes) that rewrites DEST leaves the entry intact.

Root ignores file modes, so the writes are attempted by uid 65534 with the system Python."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from puller import Cache
from tests.puller_cache.conftest import REPO, run_cli
from tests.support.httpserver import HTTPFileServer

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"

_ATTEMPTS = r"""
import os, sys
files = sys.argv[1]
tries = {
    "rewrite a file": lambda: open(os.path.join(files, "sub", "w.bin"), "r+b").write(b"X"),
    "add a file": lambda: open(os.path.join(files, "new.bin"), "wb").write(b"X"),
    "add __pycache__": lambda: os.mkdir(os.path.join(files, "sub", "__pycache__")),
    "delete a file": lambda: os.unlink(os.path.join(files, "sub", "w.bin")),
    "rename a file": lambda: os.rename(os.path.join(files, "sub", "w.bin"), os.path.join(files, "sub", "v.bin")),
    "replace the manifest": lambda: os.rename(os.path.join(files, "sub", "w.bin"),
                                              os.path.join(files, "..", "manifest.json")),
}
for what, fn in tries.items():
    try:
        fn()
        print("SUCCEEDED", what)
    except PermissionError:
        pass
    except OSError as e:  # e.g. a file an earlier write already removed
        print("FAILED OTHERWISE", what, type(e).__name__)
"""


def _as_nobody(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True, text=True,
                          timeout=60, cwd="/")


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A cache root that uid 65534 can reach (pytest's tmp dirs are 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="modelshelf-ro-"))
    os.chmod(d, 0o755)
    yield d / "cache"
    subprocess.run(["chmod", "-R", "u+w", str(d)], check=False)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def http_server() -> Iterator[HTTPFileServer]:
    with HTTPFileServer() as srv:
        yield srv


def _publish(root: Path, srv: HTTPFileServer) -> tuple[Cache, object]:
    srv.set_file("w.bin", b"w" * 4000)
    cache = Cache(root)
    return cache, cache.ensure({"sub": srv.url("w.bin")})


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK), reason="needs root to switch uid")
def test_the_owner_uid_cannot_change_a_published_entry(open_root: Path, http_server: HTTPFileServer) -> None:
    cache, entry = _publish(open_root, http_server)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(open_root)], check=True)  # the agent's uid
    r = _as_nobody(SYSTEM_PYTHON, "-c", _ATTEMPTS, str(entry.path))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "", f"writes that an entry must refuse went through:\n{r.stdout}"
    assert cache.verify(entry.key).ok


def test_verify_names_changed_and_extra_files_and_dirs_and_cli_exits_non_zero(
        tmp_path: Path, http_server: HTTPFileServer) -> None:
    root = tmp_path / "cache"
    cache, entry = _publish(root, http_server)
    assert run_cli("cache", "verify", "--cache-dir", str(root)).returncode == 0
    f = entry.path / "sub" / "w.bin"
    with open(f, "r+b") as fh:  # root ignores the mode: one flipped byte, same size
        fh.seek(1234)
        fh.write(b"\x00")
    os.mkdir(entry.path / "sub" / "__pycache__")  # what Triton's python backend did through a link
    r = run_cli("cache", "verify", "--cache-dir", str(root), "--json")
    assert r.returncode == 5, r.stdout + r.stderr
    problems = {(m["path"], m["problem"]) for m in json.loads(r.stdout)["mismatches"]}
    assert problems == {("sub/w.bin", "content changed (digest differs)"),
                        ("sub/__pycache__/", "extra directory, not in the manifest")}
    os.rmdir(entry.path / "sub" / "__pycache__")
    os.chmod(entry.path / "sub", 0o755)
    os.unlink(f)
    assert [(m.path, m.problem) for m in cache.verify(entry.key).mismatches] == [("sub/w.bin", "missing")]


def test_pull_dest_gets_copies_a_root_writer_cannot_reach_the_entry(tmp_path: Path,
                                                                    http_server: HTTPFileServer) -> None:
    http_server.set_file("m/model.joblib", b"model" * 1000)
    cache, dest = tmp_path / "cache", tmp_path / "mnt" / "models"
    r = run_cli("pull", http_server.url("m/model.joblib"), str(dest), "--cache-dir", str(cache), "--no-progress")
    assert r.returncode == 0, r.stderr
    (entry_dir,) = (cache / "entries").iterdir()
    cached = entry_dir / "files" / "model.joblib"
    assert (dest / "model.joblib").stat().st_ino != cached.stat().st_ino
    (dest / "model.joblib").write_bytes(b"rewritten by a server running as root")  # we are root
    assert cached.read_bytes() == b"model" * 1000
    v = run_cli("cache", "verify", "--cache-dir", str(cache))
    assert v.returncode == 0 and "ok" in v.stdout
    # a later pull (a hit) still gets the original bytes
    r2 = run_cli("pull", http_server.url("m/model.joblib"), str(tmp_path / "d2"), "--cache-dir", str(cache),
                 "--no-progress")
    assert r2.returncode == 0 and "cache=hit" in r2.stderr
    assert (tmp_path / "d2" / "model.joblib").read_bytes() == b"model" * 1000
    assert http_server.get_count("m/model.joblib") == 1


def test_pull_link_is_an_explicit_opt_in_of_read_only_links(tmp_path: Path, http_server: HTTPFileServer) -> None:
    http_server.set_file("m/model.joblib", b"model" * 1000)
    cache, dest = tmp_path / "cache", tmp_path / "dest"
    r = run_cli("pull", http_server.url("m/model.joblib"), str(dest), "--cache-dir", str(cache), "--link",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    (entry_dir,) = (cache / "entries").iterdir()
    linked = dest / "model.joblib"
    assert linked.stat().st_ino == (entry_dir / "files" / "model.joblib").stat().st_ino
    assert linked.stat().st_mode & 0o222 == 0
    if os.geteuid() == 0:
        assert "event=pull_link_as_root" in r.stderr  # the risk is said, not hidden


def _nobody_python(code: str) -> subprocess.CompletedProcess:
    """Run `code` as uid 65534 with the system Python (same minor version as this venv), this
    checkout and this venv's site-packages on sys.path (the venv's own interpreter lives under
    /root, which that uid cannot reach)."""
    import sysconfig

    paths = [str(REPO), sysconfig.get_paths()["purelib"]]
    return _as_nobody(SYSTEM_PYTHON, "-c", f"import sys; sys.path[:0] = {paths!r}\n{code}")


def _nobody_can_import_puller() -> bool:
    try:
        return _nobody_python("import puller.cache").returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uid")
def test_gc_discard_and_sweep_remove_read_only_entries_as_a_non_root_owner(open_root: Path,
                                                                          http_server: HTTPFileServer) -> None:
    """The agent running as a non-root uid can still remove its read-only entries (GC, discard,
    sweep of a crashed pull that had made its tree read-only)."""
    if not _nobody_can_import_puller():
        pytest.skip("uid 65534 cannot run this checkout with the system Python here")
    cache, entry = _publish(open_root, http_server)
    http_server.set_file("x.bin", b"x" * 100)
    other = cache.ensure(http_server.url("x.bin"))
    crashed = open_root / "tmp" / f"{entry.key}.deadbeef0000"  # a crash after the tree went read-only
    shutil.copytree(entry.path.parent, crashed, symlinks=True)
    for d in (crashed / "files" / "sub", crashed / "files"):
        os.chmod(d, 0o555)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(open_root)], check=True)
    r = _nobody_python(f"from puller import Cache; c = Cache({str(open_root)!r}); "
                       f"print(c.discard({entry.key!r}, 'test'), [i.key for i in c.gc(0).removed])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", f"['{other.key}']"]
    assert os.listdir(open_root / "entries") == []
    assert os.listdir(open_root / "tmp") == [] and os.listdir(open_root / "trash") == []
