"""puller.archive: good archives extract; hostile ones are refused with nothing written outside."""
from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from puller.archive import archive_kind, extract
from puller.errors import UnsafeArchive


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = mode
    return info


def _zip(path: Path, members: list[tuple[str, bytes, int | None]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in members:
            zi = zipfile.ZipInfo(name)
            if mode is not None:
                zi.external_attr = mode << 16
            zf.writestr(zi, data)
    return path


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, Path]:
    """(dest, outside): dest sits inside a sandbox dir; nothing may appear next to it."""
    sandbox = tmp_path / "sandbox"
    dest = sandbox / "dest"
    dest.mkdir(parents=True)
    return dest, sandbox


def _outside_is_clean(sandbox: Path, tmp_path: Path) -> None:
    assert sorted(p.name for p in sandbox.iterdir()) == ["dest"]
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "escaped").exists()


def test_archive_kind_by_suffix() -> None:
    assert archive_kind("m.tar.gz") == "tar.gz"
    assert archive_kind("M.TGZ") == "tar.gz"
    assert archive_kind("m.tar") == "tar"
    assert archive_kind("m.zip") == "zip"
    assert archive_kind("model.joblib") is None


def test_good_tar_gz_extracts_files_dirs_and_inside_links(tmp_path: Path, box) -> None:
    dest, _ = box
    arc = _tar(tmp_path / "m.tar.gz", [
        (_info("model", tarfile.DIRTYPE, mode=0o755), None),
        (_info("model/weights.bin"), b"\x00\x01" * 1000),
        (_info("model/run.sh", mode=0o755), b"#!/bin/sh\n"),
        (_info("model/empty.txt"), b""),
        (_info("model/alias.bin", tarfile.SYMTYPE, linkname="weights.bin"), None),
        (_info("model/copy.bin", tarfile.LNKTYPE, linkname="model/weights.bin"), None),
    ])
    files = extract(arc, dest, "tar.gz", max_bytes=10_000)
    assert files == ["model/copy.bin", "model/empty.txt", "model/run.sh", "model/weights.bin"]
    assert (dest / "model/weights.bin").read_bytes() == b"\x00\x01" * 1000
    assert (dest / "model/empty.txt").read_bytes() == b""
    assert (dest / "model/alias.bin").read_bytes() == b"\x00\x01" * 1000
    assert os.readlink(dest / "model/alias.bin") == "weights.bin"
    assert (dest / "model/copy.bin").stat().st_ino == (dest / "model/weights.bin").stat().st_ino
    assert os.stat(dest / "model/run.sh").st_mode & 0o111


def test_good_zip_extracts(tmp_path: Path, box) -> None:
    dest, _ = box
    arc = _zip(tmp_path / "m.zip", [("m/", b"", None), ("m/a.txt", b"alpha", None), ("m/sub/b.txt", b"beta", 0o100644)])
    files = extract(arc, dest, "zip", max_bytes=1000)
    assert files == ["m/a.txt", "m/sub/b.txt"]
    assert (dest / "m/sub/b.txt").read_text() == "beta"


@pytest.mark.parametrize("name,members", [
    ("traversal", [(_info("../evil"), b"x")]),
    ("nested traversal", [(_info("ok/../../evil"), b"x")]),
    ("absolute", [(_info("/ABS/evil"), b"x")]),
    ("symlink escape", [(_info("link", tarfile.SYMTYPE, linkname="../../escaped"), None),
                        (_info("link/evil"), b"x")]),
    ("absolute symlink", [(_info("link", tarfile.SYMTYPE, linkname="/etc"), None)]),
    ("hardlink escape", [(_info("hl", tarfile.LNKTYPE, linkname="../../evil"), None)]),
    ("hardlink absolute", [(_info("hl", tarfile.LNKTYPE, linkname="/etc/passwd"), None)]),
    ("char device", [(_info("dev", tarfile.CHRTYPE), None)]),
    ("block device", [(_info("blk", tarfile.BLKTYPE), None)]),
    ("fifo", [(_info("fifo", tarfile.FIFOTYPE), None)]),
    ("oversize", [(_info("a.bin"), b"a" * 600), (_info("b.bin"), b"b" * 600)]),
])
def test_hostile_tar_is_refused(tmp_path: Path, box, name: str, members) -> None:
    dest, sandbox = box
    fixed = []
    for info, data in members:  # point "absolute" names at a real place we can check
        if info.name.startswith("/ABS"):
            info = _info(str(tmp_path / "evil"))
        fixed.append((info, data))
    arc = _tar(tmp_path / "bad.tar.gz", fixed)
    with pytest.raises(UnsafeArchive) as exc:
        extract(arc, dest, "tar.gz", max_bytes=1000, label="http://example/bad.tar.gz")
    assert fixed[-1][0].name.lstrip("/").split("/")[-1] in str(exc.value) or fixed[0][0].name in str(exc.value)
    assert "http://example/bad.tar.gz" in str(exc.value)
    assert exc.value.exit_code == 5
    _outside_is_clean(sandbox, tmp_path)


def test_symlink_chain_cannot_redirect_a_later_write(tmp_path: Path, box) -> None:
    """A link that is fine on its own, then a member written through it, stays inside."""
    dest, sandbox = box
    arc = _tar(tmp_path / "chain.tar", [
        (_info("d", tarfile.DIRTYPE, mode=0o755), None),
        (_info("d/up", tarfile.SYMTYPE, linkname=".."), None),  # resolves to dest: allowed
        (_info("d/up/up2", tarfile.SYMTYPE, linkname=".."), None),  # dest/.. : outside
        (_info("d/up/up2/evil"), b"x"),
    ], mode="w")
    with pytest.raises(UnsafeArchive, match="up2"):
        extract(arc, dest, "tar", max_bytes=1000)
    _outside_is_clean(sandbox, tmp_path)


@pytest.mark.parametrize("name,members", [
    ("traversal", [("../evil", b"x", None)]),
    ("absolute", [("/ABS", b"x", None)]),
    ("symlink escape", [("link", b"../../escaped", stat.S_IFLNK | 0o777), ("link/evil", b"x", None)]),
    ("fifo", [("fifo", b"", stat.S_IFIFO | 0o644)]),
    ("oversize", [("a.bin", b"a" * 700, None), ("b.bin", b"b" * 700, None)]),
])
def test_hostile_zip_is_refused(tmp_path: Path, box, name: str, members) -> None:
    dest, sandbox = box
    members = [(str(tmp_path / "evil") if n == "/ABS" else n, d, m) for n, d, m in members]
    arc = _zip(tmp_path / "bad.zip", members)
    with pytest.raises(UnsafeArchive):
        extract(arc, dest, "zip", max_bytes=1000)
    _outside_is_clean(sandbox, tmp_path)


def test_size_cap_counts_real_bytes_not_headers(tmp_path: Path, box) -> None:
    """A zip bomb-ish member (10 MB of zeros, tiny compressed) stops at the cap while writing."""
    dest, sandbox = box
    arc = tmp_path / "bomb.zip"
    with zipfile.ZipFile(arc, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", b"\0" * 10_000_000)
    assert arc.stat().st_size < 100_000
    with pytest.raises(UnsafeArchive, match="zeros.bin.*cap"):
        extract(arc, dest, "zip", max_bytes=1_000_000)
    assert (dest / "zeros.bin").stat().st_size <= 1_000_000 + 1024 * 1024
    _outside_is_clean(sandbox, tmp_path)


def test_not_an_archive_is_refused(tmp_path: Path, box) -> None:
    dest, _ = box
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not gzip")
    with pytest.raises(UnsafeArchive, match="junk.tar.gz"):
        extract(junk, dest, "tar.gz", max_bytes=1000)
