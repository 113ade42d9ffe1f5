"""Safe extraction of one model archive (.tar, .tar.gz/.tgz, .zip) into a directory.

Refused, with puller.errors.UnsafeArchive naming the member:
  - absolute member names, names with a `..` component, empty names;
  - symlinks whose target is absolute or resolves outside the destination;
  - hard links to anything that is not a regular file already extracted inside the destination;
  - device files, FIFOs, sockets and any other special member;
  - output beyond `max_bytes`, counted while writing (headers are not trusted).

Every write goes through the real, resolved parent directory (checked to lie inside the
destination) and opens the file with O_NOFOLLOW, so a link planted by an earlier member cannot
redirect a later write. Nothing is ever written outside `dest`; on refusal, what was written
inside `dest` stays there for the caller (the cache discards its whole temp dir).
"""
from __future__ import annotations

import os
import posixpath
import stat
from pathlib import Path
from collections.abc import Iterator
TYPE_CHECKING = False  # not typing's: importing typing is ~2 ms of a CLI pull's start-up
if TYPE_CHECKING:
    from typing import IO

from puller.errors import UnsafeArchive

if TYPE_CHECKING:
    import tarfile

# tarfile and zipfile (with their compression modules) are imported by the extraction that needs
# them: most pulls fetch plain files, and a CLI pull's start-up is on the clock (puller/cli.py).

_CHUNK = 1024 * 1024
_WRITE = 32 * 1024  # bytes per write(2)
_SUFFIXES = ((".tar.gz", "tar.gz"), (".tgz", "tar.gz"), (".tar", "tar"), (".zip", "zip"))


def archive_kind(name: str) -> str | None:
    """"tar" | "tar.gz" | "zip" for a file name with one of those suffixes, else None."""
    lower = name.lower()
    for suffix, kind in _SUFFIXES:
        if lower.endswith(suffix):
            return kind
    return None


def extract(archive: Path, dest: Path, kind: str, *, max_bytes: int, label: str = "") -> list[str]:
    """Extract `archive` (of `kind`) into the existing directory `dest`.

    Returns the relative POSIX paths of the regular files written (links excluded).
    `label` (a redacted URI) is put in error messages.
    """
    writer = _Writer(Path(dest), max_bytes, label or archive.name)
    if kind in ("tar", "tar.gz", "tgz"):
        _extract_tar(archive, writer)
    elif kind == "zip":
        _extract_zip(archive, writer)
    else:
        raise UnsafeArchive(f"{writer.label}: unknown archive kind {kind!r}", uri=label or None)
    writer.final_check()
    return sorted(writer.files)


class _Writer:
    """Creates members under `dest`, enforcing the rules in the module docstring."""

    def __init__(self, dest: Path, max_bytes: int, label: str):
        self.dest = os.path.realpath(dest)
        self.max_bytes = max_bytes
        self.label = label
        self.written = 0
        self.files: set[str] = set()

    def fail(self, member: str, why: str) -> UnsafeArchive:
        return UnsafeArchive(f"{self.label}: unsafe archive member {member!r}: {why}", uri=self.label)

    # -- names -------------------------------------------------------------------------
    def clean(self, name: str) -> str:
        """Relative normalized member path, or UnsafeArchive."""
        if not name or "\0" in name:
            raise self.fail(name, "empty or NUL in name")
        if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
            raise self.fail(name, "absolute path")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            raise self.fail(name, "'..' in path")
        return "/".join(parts)

    def _inside(self, real: str) -> bool:
        return real == self.dest or real.startswith(self.dest + os.sep)

    def parent_dir(self, member: str, rel: str) -> str:
        """Create the parent dirs of `rel` and return the parent's real path (checked inside)."""
        parent = posixpath.dirname(rel)
        real_parent = os.path.realpath(os.path.join(self.dest, parent)) if parent else self.dest
        if not self._inside(real_parent):
            raise self.fail(member, "parent directory resolves outside the destination")
        os.makedirs(real_parent, exist_ok=True)
        # re-resolve after creation: an intermediate component may be a (checked) symlink
        real_parent = os.path.realpath(real_parent)
        if not self._inside(real_parent):
            raise self.fail(member, "parent directory resolves outside the destination")
        return real_parent

    def _clear(self, path: str, member: str) -> None:
        """Remove an earlier member at `path` (a later member of the same name wins)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise self.fail(member, "replaces a directory")
        os.unlink(path)

    # -- members -----------------------------------------------------------------------
    def directory(self, name: str) -> None:
        rel = self.clean(name)
        if not rel:
            return
        real_parent = self.parent_dir(name, rel)
        target = os.path.join(real_parent, posixpath.basename(rel))
        if os.path.islink(target):
            raise self.fail(name, "directory over an existing link")
        os.makedirs(target, exist_ok=True)

    def regular(self, name: str, src: IO[bytes], mode: int) -> None:
        rel = self.clean(name)
        if not rel:
            raise self.fail(name, "file with an empty name")
        real_parent = self.parent_dir(name, rel)
        target = os.path.join(real_parent, posixpath.basename(rel))
        self._clear(target, name)
        perm = 0o755 if mode & 0o111 else 0o644
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, perm)
        with os.fdopen(fd, "wb", buffering=0) as out:
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                self.written += len(chunk)
                if self.written > self.max_bytes:
                    raise self.fail(name, f"output exceeds the cap of {self.max_bytes} bytes")
                _write_all(out, chunk)
        self.files.add(os.path.relpath(target, self.dest).replace(os.sep, "/"))

    def symlink(self, name: str, target: str) -> None:
        rel = self.clean(name)
        if not rel:
            raise self.fail(name, "link with an empty name")
        if not target or target.startswith("/") or "\0" in target:
            raise self.fail(name, f"symlink to absolute or empty target {target!r}")
        lexical = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
        if lexical == ".." or lexical.startswith("../"):
            raise self.fail(name, f"symlink escapes the destination ({target!r})")
        real_parent = self.parent_dir(name, rel)
        resolved = os.path.realpath(os.path.join(real_parent, target))
        if not self._inside(resolved):
            raise self.fail(name, f"symlink escapes the destination ({target!r})")
        link = os.path.join(real_parent, posixpath.basename(rel))
        self._clear(link, name)
        os.symlink(target, link)

    def hardlink(self, name: str, target: str) -> None:
        rel = self.clean(name)
        trel = self.clean(target)
        if not rel or not trel:
            raise self.fail(name, "hard link with an empty name or target")
        source = os.path.join(self.dest, trel)
        real_source = os.path.realpath(source)
        if not self._inside(real_source):
            raise self.fail(name, f"hard link escapes the destination ({target!r})")
        try:
            st = os.lstat(real_source)
        except FileNotFoundError:
            raise self.fail(name, f"hard link to a missing member ({target!r})") from None
        if not stat.S_ISREG(st.st_mode):
            raise self.fail(name, f"hard link to a non-regular file ({target!r})")
        real_parent = self.parent_dir(name, rel)
        link = os.path.join(real_parent, posixpath.basename(rel))
        self._clear(link, name)
        os.link(real_source, link, follow_symlinks=False)
        self.files.add(os.path.relpath(link, self.dest).replace(os.sep, "/"))

    def final_check(self) -> None:
        """Belt and braces: every link left in dest must resolve inside it."""
        for root, dirs, files in os.walk(self.dest):
            for n in dirs + files:
                p = os.path.join(root, n)
                if os.path.islink(p) and not self._inside(os.path.realpath(p)):
                    raise self.fail(os.path.relpath(p, self.dest), "symlink resolves outside the destination")


def _extract_tar(archive: Path, w: _Writer) -> None:
    import tarfile

    try:
        tf = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UnsafeArchive(f"{w.label}: not a readable tar archive: {e}", uri=w.label) from None
    data_filter = getattr(tarfile, "data_filter", None)
    with tf:
        try:
            for m in _tar_members(tf):
                if data_filter is not None:
                    try:
                        data_filter(m, w.dest)
                    except tarfile.FilterError as e:
                        raise w.fail(m.name, str(e)) from None
                if m.isdir():
                    w.directory(m.name)
                elif m.isreg():
                    src = tf.extractfile(m)
                    assert src is not None
                    with src:
                        w.regular(m.name, src, m.mode)
                elif m.issym():
                    w.symlink(m.name, m.linkname)
                elif m.islnk():
                    w.hardlink(m.name, m.linkname)
                else:
                    raise w.fail(m.name, "device file, FIFO or other special member")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise UnsafeArchive(f"{w.label}: broken tar archive: {e}", uri=w.label) from None


def _tar_members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while True:
        m = tf.next()
        if m is None:
            return
        yield m


def _extract_zip(archive: Path, w: _Writer) -> None:
    import zipfile

    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise UnsafeArchive(f"{w.label}: not a readable zip archive: {e}", uri=w.label) from None
    with zf:
        try:
            for info in zf.infolist():
                mode = (info.external_attr >> 16) & 0xFFFF
                kind = stat.S_IFMT(mode)
                if info.is_dir() or kind == stat.S_IFDIR:
                    w.directory(info.filename)
                elif kind == stat.S_IFLNK:
                    with zf.open(info) as src:
                        target = src.read(4097)
                    if len(target) > 4096:
                        raise w.fail(info.filename, "symlink target too long")
                    w.symlink(info.filename, target.decode("utf-8", "surrogateescape"))
                elif kind in (0, stat.S_IFREG):
                    with zf.open(info) as src:
                        w.regular(info.filename, src, mode)
                else:
                    raise w.fail(info.filename, "device file, FIFO or other special member")
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, OSError) as e:
            raise UnsafeArchive(f"{w.label}: broken zip archive: {e}", uri=w.label) from None


def _write_all(out: IO[bytes], data: bytes) -> None:
    """Write `data` in pieces of at most 32 KiB: larger writes make the page cache take large
    folios, which fault in slowly on VMs that return free memory to the host (see
    puller.sources.s3._WRITE)."""
    view = memoryview(data)
    while view:
        n = out.write(view[:_WRITE])
        view = view[n:]
