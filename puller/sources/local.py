"""Local files: `file:///abs/path`, `/abs/path` and `pvc://claim/path` (under options.pvc_root).

A local directory or file is used in place: `list()` stats the tree (identity = size + mtime_ns
per file) and returns `Listing(local_path=...)`, so the cache never copies it. The one
exception is a single local archive (.tar, .tar.gz/.tgz, .zip) when extraction is on: it must
be unpacked somewhere, so its listing has no local_path and `fetch` copies it for the cache to
extract.
"""
from __future__ import annotations

import os
from pathlib import Path

from puller.archive import archive_kind
from puller.errors import AccessDenied, IntegrityError, NotFound, PullError
from puller.sources.base import Listing, Progress, PullOptions, RemoteObject, Source, pwrite_all

_CHUNK = 4 * 2**20


class LocalSource(Source):
    def __init__(self, parsed, options: PullOptions):  # parsed: puller.uri.ParsedURI
        if parsed.path is None:
            raise PullError(f"{parsed.redacted}: no local path for scheme {parsed.scheme}", uri=parsed.redacted)
        self.path = Path(parsed.path)
        self.uri = parsed.normalized
        self.options = options

    def list(self) -> Listing:
        """Stat the file or tree. Missing path -> NotFound; unreadable -> AccessDenied."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise NotFound(f"{self.uri}: no such file or directory", uri=self.uri) from None
        except PermissionError:
            raise AccessDenied(f"{self.uri}: permission denied", uri=self.uri) from None
        if not self.path.is_dir():
            obj = RemoteObject(self.path.name, st.st_size, identity=str(st.st_mtime_ns))
            kind = archive_kind(self.path.name) if self.options.extract_archives else None
            if kind is not None:
                return Listing(uri=self.uri, objects=(obj,), archive=kind)
            return Listing(uri=self.uri, objects=(obj,), local_path=self.path)
        objects = []
        for root, dirs, files in os.walk(self.path, onerror=self._walk_error):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                try:
                    fst = os.stat(full)
                except FileNotFoundError:
                    continue  # a dangling symlink or a file removed while walking
                rel = os.path.relpath(full, self.path).replace(os.sep, "/")
                objects.append(RemoteObject(rel, fst.st_size, identity=str(fst.st_mtime_ns)))
        objects.sort(key=lambda o: o.path)
        return Listing(uri=self.uri, objects=tuple(objects), local_path=self.path)

    def _walk_error(self, err: OSError) -> None:
        if isinstance(err, PermissionError):
            raise AccessDenied(f"{self.uri}: permission denied ({os.path.basename(err.filename or '')})",
                               uri=self.uri)
        raise PullError(f"{self.uri}: cannot list: {err.strerror}", uri=self.uri)

    def fetch(self, listing: Listing, dest: Path, progress: Progress) -> None:
        """Copy the listed files (used only for a local archive that the cache extracts)."""
        for obj in listing.objects:
            src = self.path if not self.path.is_dir() else self.path / obj.path
            out = Path(dest) / obj.path
            out.parent.mkdir(parents=True, exist_ok=True)
            digest = self.digest_for(out, obj.size)
            try:
                with open(src, "rb") as fi, open(out, "wb", buffering=0) as fo:
                    offset = 0
                    while chunk := fi.read(_CHUNK):
                        pwrite_all(fo.fileno(), chunk, offset, 32 << 10, digest)
                        offset += len(chunk)
                        progress.advance(len(chunk))
            except FileNotFoundError:
                raise NotFound(f"{self.uri}: {obj.path} disappeared while copying", uri=self.uri) from None
            if out.stat().st_size != obj.size:
                raise IntegrityError(f"{self.uri}: {obj.path} changed size while copying", uri=self.uri)
            progress.file_done(obj.path)
