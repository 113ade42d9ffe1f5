"""The contract between the cache and a storage source.

A source does two things, both blocking (the cache runs them in threads):
  1. `list()`  -- cheap metadata only (LIST/HEAD/stat): what files exist, their sizes and a
     per-object identity (ETag, Last-Modified, mtime). The cache derives the entry key from it,
     so an unchanged source is a hit that moves zero bytes.
  2. `fetch(listing, dest, progress)` -- write exactly those files under `dest` (a private temp
     dir the cache owns), verifying sizes (and store checksums where there are any).

Local sources (file://, absolute paths, pvc://) set `Listing.local_path`: the cache uses that
directory in place and never calls `fetch`.
"""
from __future__ import annotations

import abc
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol


@dataclass(frozen=True)
class RemoteObject:
    """One file of a source. `path` is relative, POSIX, never empty, never contains '..'."""

    path: str
    size: int
    identity: str = ""  # ETag / Last-Modified / mtime_ns: anything that changes when content does
    checksum: str | None = None  # "sha256:<hex>" / "crc32:<b64>" ... when the store provides one


@dataclass(frozen=True)
class Listing:
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


@dataclass
class PullOptions:
    """How to reach and check one model's storage. Defaults come from the environment."""

    sha256: str | None = None  # expected digest of the single file / archive
    storage_key: str | None = None  # picks <storage_config_dir>/<key>(.json)
    storage_config_dir: Path | None = field(default_factory=lambda: _env_path("MODELSHELF_STORAGE_CONFIG_DIR"))
    s3cfg: Path | None = field(default_factory=lambda: _env_path("S3CFG"))
    headers: Mapping[str, str] = field(default_factory=dict)  # HTTP(S) only, e.g. Authorization
    pvc_root: Path = field(default_factory=lambda: _env_path("MODELSHELF_PVC_ROOT") or Path("/mnt/pvc"))
    max_concurrency: int = 16  # files and ranged parts in flight
    part_size: int = 16 * 2**20  # ranged-GET part size for large objects
    retry_deadline_s: float = 120.0  # total time transient errors may be retried
    archive_max_bytes: int = 64 * 2**30  # extraction cap
    extract_archives: bool = True
    # sha256 of every file in the manifest, so `cache verify` finds same-size corruption
    # (bit rot on a long-lived shared volume). Off by default: it is a second pass over every
    # byte. Sizes are always recorded; a user's sha256 and store sha256 checksums always checked.
    record_digests: bool = False


class Source(abc.ABC):
    """One storage location. Blocking; may be used from several threads."""

    @abc.abstractmethod
    def list(self) -> Listing:
        """Metadata only. Raises NotFound / AccessDenied / BadURI / TransientError."""

    @abc.abstractmethod
    def fetch(self, listing: Listing, dest: Path, progress: Progress) -> None:
        """Write every object of `listing` to `dest / obj.path`, verifying sizes."""

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
