"""The contract between the cache and a storage source.

A source does two things, both blocking (the cache runs them in threads):
  1. `list()`  -- cheap metadata only (LIST/HEAD/stat): what files exist, their sizes and a
     per-object identity (ETag, Last-Modified, mtime). The cache derives the entry key from it,
     so an unchanged source is a hit that moves zero bytes.
  2. `fetch(listing, dest, progress)` -- write exactly those files under `dest` (a private temp
     dir the cache owns), verifying sizes (and store checksums where there are any).

Local sources (file://, absolute paths, pvc://) set `Listing.local_path`: the cache uses that
directory in place and never calls `fetch`.

Digests while streaming: before `fetch` the cache sets `source.digests` (a `DigestRecorder`);
a source hands every chunk it writes to `digest_for(target, size).update(offset, chunk)` (or
writes through `pwrite_all(..., digest=...)`), so the per-file digest recorded in the manifest
costs no second read of the file. A source that does not (or a chunk written out of order) is
safe: the cache re-reads exactly the parts it did not see in order.
"""
from __future__ import annotations

import abc
import errno
import os
import threading
from pathlib import Path
from collections.abc import Callable, Mapping
TYPE_CHECKING = False  # not typing's: importing typing is ~2 ms of a CLI pull's start-up
if TYPE_CHECKING:
    from typing import Any, Protocol
else:
    Protocol = object  # Progress below is a structural type for the type checker only

from puller.record import Factory, Record

try:  # the interpreter's built-in sha256 (3.12+: _sha2); hashlib loads OpenSSL's (libcrypto) first
    from _sha2 import sha256 as _small_sha256
except ImportError:
    try:
        from _sha256 import sha256 as _small_sha256
    except ImportError:  # a build without the built-in hashes
        from hashlib import sha256 as _small_sha256

if TYPE_CHECKING:
    import xxhash


def sha256(data: bytes = b"") -> Any:
    """A sha256 for a few hundred bytes (cache keys, request signatures). The built-in one: importing
    hashlib loads OpenSSL's libcrypto, ~2 ms of a CLI pull's ~80 ms start-up, which pays off only
    on large data (file digests and store checksums import hashlib where they run)."""
    return _small_sha256(data)


_IPAD, _OPAD = bytes(b ^ 0x36 for b in range(256)), bytes(b ^ 0x5C for b in range(256))


def hmac_sha256(key: bytes, msg: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104) over `sha256` (the hmac module imports OpenSSL's too)."""
    if len(key) > 64:
        key = sha256(key).digest()
    key = key.ljust(64, b"\0")
    inner = sha256(key.translate(_IPAD) + msg).digest()
    return sha256(key.translate(_OPAD) + inner).digest()


class RemoteObject(Record):
    """One file of a source. `path` is relative, POSIX, never empty, never contains '..'."""

    path: str
    size: int
    identity: str = ""  # ETag / Last-Modified / mtime_ns: anything that changes when content does
    checksum: str | None = None  # "sha256:<hex>" / "crc32:<b64>" ... when the store provides one


class Listing(Record):
    uri: str  # normalized and redacted: safe to log and to hash
    objects: tuple[RemoteObject, ...]
    local_path: Path | None = None  # set => use in place, no copy
    archive: str | None = None  # "tar" | "tar.gz" | "zip" when the source is one archive to extract

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.objects)

    def identity(self) -> str:
        """Stable text of everything that identifies the content (feeds the entry key)."""
        parts = [self.uri, self.archive or ""]
        parts += [f"{o.path}\0{o.size}\0{o.identity}" for o in sorted(self.objects, key=lambda o: o.path)]
        return "\n".join(parts)


class Progress(Protocol):
    """Thread-safe progress sink. The CLI renders it with rich; the agent logs it."""

    def start(self, total_bytes: int, total_files: int, label: str) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def file_done(self, path: str) -> None: ...
    def finish(self) -> None: ...


class NullProgress:
    def start(self, total_bytes: int, total_files: int, label: str) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def file_done(self, path: str) -> None:
        pass

    def finish(self) -> None:
        pass


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


class PullOptions(Record, frozen=False):
    """How to reach and check one model's storage. Defaults come from the environment."""

    sha256: str | None = None  # expected digest of the single file / archive
    storage_key: str | None = None  # picks <storage_config_dir>/<key>(.json)
    storage_config_dir: Path | None = Factory(lambda: _env_path("MODELSHELF_STORAGE_CONFIG_DIR"))
    s3cfg: Path | None = Factory(lambda: _env_path("S3CFG"))
    headers: Mapping[str, str] = Factory(dict)  # HTTP(S) only, e.g. Authorization
    pvc_root: Path = Factory(lambda: _env_path("MODELSHELF_PVC_ROOT") or Path("/mnt/pvc"))
    max_concurrency: int = 16  # files and ranged parts in flight
    part_size: int = 16 * 2**20  # ranged-GET part size for large objects
    retry_deadline_s: float = 120.0  # total time transient errors may be retried
    archive_max_bytes: int = 64 * 2**30  # extraction cap
    extract_archives: bool = True
    # sha256 of every file in the manifest as well (a second pass over every byte; off by
    # default). Sizes and a fast digest per file (xxh3, computed while streaming: enough for
    # `cache verify` to find same-size corruption) are always recorded; a user's sha256 and
    # store sha256 checksums are always checked.
    record_digests: bool = False


# -- per-file digests ------------------------------------------------------------------------
# xxh3-128 over 1 MiB parts, then xxh3-128 over the parts' digests. Parts let ranged GETs that
# write one file from several threads hash in place (each part is hashed by whoever writes it,
# in order); the parts' size is fixed so `verify` recomputes the same value from the file.
# xxh3 rather than BLAKE3: measured here on 512 MiB in memory (what streaming hashes), xxh3_128
# 0.010 s vs blake3 0.091 s (1 thread) vs sha256 0.31 s. It finds corruption and accidental
# rewrites, not a forger (who could rewrite the manifest as well); the user's sha256 and the
# store's sha256 checksums are still checked where they exist.
DIGEST_ALGO = "xxh3-128/1m"
DIGEST_PART = 1 << 20


def _xxhash():
    """xxhash, imported on first use: a pull that records no digests (the CLI's scratch cache)
    never loads it."""
    import xxhash

    return xxhash


class FileDigest:
    """The digest of one file being written at arbitrary offsets, possibly from several threads.
    Bytes that arrive in order within their part are hashed as they come; a part that saw a gap,
    an overlap or a rewrite is re-read from the file by `finish`."""

    __slots__ = ("size", "_next", "_hashers", "_dirty", "_lock")

    def __init__(self, size: int):
        self.size = size
        n = max(1, -(-size // DIGEST_PART))
        self._next = [i * DIGEST_PART for i in range(n)]  # next offset expected in each part
        self._hashers: list[xxhash.xxh3_128 | None] = [None] * n
        self._dirty: set[int] = set()
        self._lock = threading.Lock()

    def update(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        with self._lock:
            while view:
                i = offset // DIGEST_PART
                if i >= len(self._next):
                    self._dirty.add(len(self._next) - 1)  # written past the listed size: re-read
                    return
                take = min(len(view), (i + 1) * DIGEST_PART - offset)
                if i not in self._dirty:
                    if offset == self._next[i]:
                        h = self._hashers[i]
                        if h is None:
                            h = self._hashers[i] = _xxhash().xxh3_128()
                        h.update(view[:take])
                        self._next[i] = offset + take
                    else:
                        self._dirty.add(i)
                view, offset = view[take:], offset + take

    def invalidate(self) -> None:
        """Everything written so far is suspect (e.g. the file was truncated to start over)."""
        with self._lock:
            self._dirty.update(range(len(self._next)))

    def unseen_bytes(self) -> int:
        """Bytes `finish` will have to read back from the file (0: all hashed while streaming)."""
        with self._lock:
            return sum(min((i + 1) * DIGEST_PART, self.size) - i * DIGEST_PART for i in range(len(self._next))
                       if i in self._dirty or self._hashers[i] is None
                       or self._next[i] != min((i + 1) * DIGEST_PART, self.size))

    def finish(self, path: str | os.PathLike[str]) -> str:
        """The file's digest: streamed parts as they were hashed, the others read from `path`."""
        size = os.stat(path).st_size
        with self._lock:
            if size != self.size:
                return file_digest(path)
            parts: list[bytes] = []
            fd = None
            try:
                for i, h in enumerate(self._hashers):
                    end = min((i + 1) * DIGEST_PART, size)
                    if h is not None and i not in self._dirty and self._next[i] == end:
                        parts.append(h.digest())
                    elif end == i * DIGEST_PART:  # the one part of an empty file
                        parts.append(_xxhash().xxh3_128_digest(b""))
                    else:
                        if fd is None:
                            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                        parts.append(_xxhash().xxh3_128_digest(os.pread(fd, end - i * DIGEST_PART, i * DIGEST_PART)))
            finally:
                if fd is not None:
                    os.close(fd)
        return _combine(parts)


def _combine(parts: list[bytes]) -> str:
    return f"{DIGEST_ALGO}:{_xxhash().xxh3_128_hexdigest(b''.join(parts))}"


def file_digest(path: str | os.PathLike[str]) -> str:
    """The digest of a file on disk (what `FileDigest` computes while streaming)."""
    xxhash = _xxhash()
    parts: list[bytes] = []
    buf = bytearray(DIGEST_PART)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            while n < DIGEST_PART:  # a short read mid-file: fill the part before hashing it
                more = f.readinto(memoryview(buf)[n:])
                if not more:
                    break
                n += more
            parts.append(xxhash.xxh3_128_digest(memoryview(buf)[:n]))
            if n < DIGEST_PART:
                break
    if not parts:
        parts.append(xxhash.xxh3_128_digest(b""))
    return _combine(parts)


class DigestRecorder:
    """Digests of the files one fetch writes, by absolute target path (thread-safe)."""

    def __init__(self) -> None:
        self._files: dict[str, FileDigest] = {}
        self._lock = threading.Lock()

    def file(self, target: str | os.PathLike[str], size: int) -> FileDigest:
        """The digest of `target` (a new one for a path not seen yet)."""
        key = os.path.abspath(target)
        with self._lock:
            d = self._files.get(key)
            if d is None or d.size != size:
                d = self._files[key] = FileDigest(size)
            return d

    def fully_streamed(self, path: str | os.PathLike[str]) -> bool:
        """Whether every byte of `path` was hashed as it was written (`finish` reads nothing)."""
        with self._lock:
            d = self._files.get(os.path.abspath(path))
        return d is not None and d.unseen_bytes() == 0

    def finish(self, path: str | os.PathLike[str]) -> str:
        """The digest of `path`: streamed where the source reported its bytes, else read."""
        with self._lock:
            d = self._files.get(os.path.abspath(path))
        return d.finish(path) if d is not None else file_digest(path)


_fallocate: "tuple[Callable[..., int], Callable[[], int]] | bool | None" = None  # libc's, found on first use


def preallocate(fd: int, size: int) -> None:
    """Give `fd` (just opened, empty) its final `size` with its blocks allocated up front
    (fallocate(2), through ctypes: ~2 ms of import, paid only by pulls of objects split into
    parts), else a sparse ftruncate where the file system or the platform cannot. Measured: a 512
    MiB S3 object written into allocated blocks costs ~0.06 s less system time than into a sparse
    file on ext4 (no delayed-allocation reservation per page; benchmarks/results/pull.notes.md
    "pull5"). Too little space or quota is an error here, before a byte is fetched; any other
    refusal falls back to ftruncate. (Not os.posix_fallocate: where fallocate is unsupported,
    glibc emulates it by writing to every block.)"""
    global _fallocate
    if _fallocate is None:
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).fallocate
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
            fn.restype = ctypes.c_int
            _fallocate = (fn, ctypes.get_errno)
        except (ImportError, OSError, AttributeError):  # no ctypes, or a libc without fallocate
            _fallocate = False
    if _fallocate and size > 0:
        fn, get_errno = _fallocate  # type: ignore[misc]
        if fn(fd, 0, 0, size) == 0:
            return
        err = get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(err, os.strerror(err))
    os.ftruncate(fd, size)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int, piece: int = 32 << 10,
               digest: FileDigest | None = None) -> None:
    """Write all of `data` at `offset`, at most `piece` bytes per pwrite (default 32 KiB;
    why writes stay small: see puller.sources.s3._CHUNK), feeding `digest` with what was written."""
    view = memoryview(data)
    if digest is not None:
        digest.update(offset, view)
    while view:
        n = os.pwrite(fd, view[:piece], offset)
        view, offset = view[n:], offset + n


class Source(abc.ABC):
    """One storage location. Blocking; may be used from several threads."""

    digests: DigestRecorder | None = None  # set by the cache before fetch

    def digest_for(self, target: str | os.PathLike[str], size: int) -> FileDigest | None:
        """Where to report the bytes written to `target` (None: nobody asked)."""
        return self.digests.file(target, size) if self.digests is not None else None

    def begin_list(self, fetch_ahead: bool = False) -> None:
        """Send what `list()` will wait for, without waiting (a source over a network may; the
        default sends nothing). `list()` reads the answers; `close()` drops unread ones.
        `fetch_ahead`: the caller will call `begin_fetch` right after `list()`."""

    @abc.abstractmethod
    def list(self) -> Listing:
        """Metadata only. Raises NotFound / AccessDenied / BadURI / TransientError."""

    @abc.abstractmethod
    def fetch(self, listing: Listing, dest: Path, progress: Progress) -> None:
        """Write every object of `listing` to `dest / obj.path`, verifying sizes."""

    def begin_fetch(self, listing: Listing) -> None:
        """Send the requests `fetch(listing, ...)` starts with, without waiting and without
        writing anything (the default sends nothing); `fetch` reads their answers, `close()`
        drops unread ones."""

    def close(self) -> None:
        pass


class Cancelled(Exception):
    """A transfer task stopped early because a sibling failed (see run_all)."""


def run_all(tasks: list[Callable[[], None]], workers: int, cancel: threading.Event, name: str) -> None:
    """Run blocking transfer tasks on up to `workers` threads. The first failure sets `cancel`
    (tasks check it between chunks and raise Cancelled), the rest are waited for, and the first
    real error is raised, never a sibling's Cancelled."""
    if not tasks:
        return
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait  # after the listing's requests (puller.cli)

    with ThreadPoolExecutor(max_workers=min(workers, len(tasks)), thread_name_prefix=name) as pool:
        futures = [pool.submit(t) for t in tasks]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        errors = [f.exception() for f in done if not f.cancelled() and f.exception() is not None]
        if errors:
            cancel.set()
            for f in pending:
                f.cancel()
            wait(pending)
            raise next((e for e in errors if not isinstance(e, Cancelled)), errors[0])


def open_source(uri: str, options: PullOptions) -> Source:
    """Pick the source for `uri` by its scheme. Raises BadURI for anything unknown."""
    from puller.uri import parse_uri  # local import: sources import uri, uri imports nothing here

    parsed = parse_uri(uri, options)
    if parsed.scheme in ("s3", "gs", "rclone"):
        from puller.sources.s3 import S3Source

        return S3Source(parsed, options)
    if parsed.scheme in ("http", "https"):
        from puller.sources.http import HTTPSource

        return HTTPSource(parsed, options)
    from puller.sources.local import LocalSource

    return LocalSource(parsed, options)
