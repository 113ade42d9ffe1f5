"""HTTP(S) source: one file per URI; its name is the URL's last path segment.

list(): HEAD (falling back to ``GET Range: bytes=0-0`` when HEAD is refused) gives the size and
the identity: the ETag, else Last-Modified. Headers from ``options.headers`` go with every request
and are never logged. A name ending in .tar/.tar.gz/.tgz/.zip marks the listing as an archive.

fetch(): when the server accepts ranges and the file is larger than ``options.part_size``, parallel
ranged GETs (``options.max_concurrency``) write in place; otherwise one streaming GET. A body cut
short resumes with a Range request (If-Range on the listed validator, so a changed file restarts
instead of splicing versions); 5xx/429, resets and timeouts retry with backoff within
``options.retry_deadline_s``. 404/410 -> NotFound, 401/403 -> AccessDenied.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx  # (its command-line tool is kept out by agent/__init__, which every `modelshelf` command imports first)

from puller.archive import archive_kind
from puller.errors import AccessDenied, IntegrityError, NotFound, PullError, TransientError
from puller.retry import call_with_retry
from puller.sources.base import (Cancelled, FileDigest, Listing, Progress, PullOptions, RemoteObject, Source,
                                 pwrite_all, run_all)
from puller.uri import ParsedURI, redact

log = logging.getLogger("modelshelf.puller.sources.http")

_CHUNK = 1 << 20
_WRITE = 32 << 10  # bytes per pwrite
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class _Status(Exception):
    """A non-success HTTP status (kept to classify: transient or not)."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"HTTP {status} {reason}".strip())
        self.status = status


class _ShortRead(Exception):
    pass


class _Changed(Exception):
    """The server answered 200 to an If-Range request: the file changed since it was listed."""




class HTTPSource(Source):
    """One file over http(s) (see module docstring)."""

    def __init__(self, parsed: ParsedURI, options: PullOptions):
        self._parsed = parsed
        self._options = options
        self._uri = parsed.redacted
        self._url = parsed.url
        self._name = parsed.filename
        self._workers = max(1, int(options.max_concurrency))
        headers = {"Accept-Encoding": "identity", "User-Agent": "modelshelf-puller"}
        headers.update(dict(options.headers or {}))
        self._secrets = [v for v in (options.headers or {}).values() if v]
        self._client = httpx.Client(
            headers=headers, follow_redirects=True,
            timeout=httpx.Timeout(60.0, connect=10.0),
            limits=httpx.Limits(max_connections=self._workers + 2, max_keepalive_connections=self._workers + 2))
        self._ranges = False
        self._validator: str | None = None  # strong ETag or Last-Modified, for If-Range
        self._listed = False
        self._cancel = threading.Event()

    def close(self) -> None:
        self._client.close()

    # -- listing ---------------------------------------------------------------------------
    def list(self) -> Listing:
        t0 = time.monotonic()
        size, etag, modified, ranges = self._retry(self._probe, f"HEAD {self._uri}")
        self._ranges = ranges
        self._listed = True
        strong = etag if etag and not etag.startswith("W/") else None
        self._validator = strong or modified
        identity = f"etag:{etag}" if etag else (f"last-modified:{modified}" if modified else "")
        if not identity:
            log.warning("event=http_no_validator uri=%s note=changes_detected_by_size_only", self._uri)
        archive = archive_kind(self._name) if self._options.extract_archives else None
        listing = Listing(uri=self._parsed.normalized, archive=archive,
                          objects=(RemoteObject(path=self._name, size=size, identity=identity),))
        log.info("event=http_list uri=%s bytes=%d ranges=%s seconds=%.3f", self._uri, size, ranges,
                 time.monotonic() - t0)
        return listing

    def _probe(self) -> tuple[int, str | None, str | None, bool]:
        """(size, etag, last_modified, accepts_ranges) from HEAD, or a 1-byte ranged GET."""
        r = self._request("HEAD")
        if r.status_code in (403, 405, 501, 400) or (r.status_code == 200 and "content-length" not in r.headers):
            with self._client.stream("GET", self._url, headers={"Range": "bytes=0-0"}) as g:
                self._check(g)
                etag, modified = g.headers.get("etag"), g.headers.get("last-modified")
                if g.status_code == 206:
                    m = _CONTENT_RANGE.match(g.headers.get("content-range", ""))
                    if m and m.group(3) != "*":
                        return int(m.group(3)), etag, modified, True
                length = g.headers.get("content-length")
                if length is None:
                    raise PullError(f"{self._uri}: the server gives no size (no Content-Length)", uri=self._uri)
                return int(length), etag, modified, False
        self._check(r)
        ranges = r.headers.get("accept-ranges", "").lower() == "bytes"
        return int(r.headers["content-length"]), r.headers.get("etag"), r.headers.get("last-modified"), ranges

    def _request(self, method: str, **kw: Any) -> httpx.Response:
        return self._client.request(method, self._url, **kw)

    def _check(self, r: httpx.Response) -> None:
        if r.status_code >= 400:
            raise _Status(r.status_code, r.reason_phrase)

    # -- fetching --------------------------------------------------------------------------
    def fetch(self, listing: Listing, dest: Path, progress: Progress) -> None:
        if not self._listed:
            self.list()  # fetch without a list() on this instance: learn ranges/validator first
        obj = listing.objects[0]
        target = Path(dest) / obj.path
        target.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        self._cancel.clear()
        part = max(_CHUNK, int(self._options.part_size))
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        digest = self.digest_for(target, obj.size)
        try:
            if self._ranges and obj.size > part and self._workers > 1:
                os.ftruncate(fd, obj.size)
                parts = [(s, min(s + part, obj.size) - 1) for s in range(0, obj.size, part)]
                self._parallel([lambda s=s, e=e: self._get(fd, s, e, progress, False, digest) for s, e in parts])
            elif obj.size > 0:
                self._get(fd, 0, obj.size - 1, progress, True, digest)
        finally:
            os.close(fd)
        got = target.stat().st_size
        if got != obj.size:
            raise IntegrityError(f"{self._uri}: got {got} bytes, the server announced {obj.size}", uri=self._uri)
        progress.file_done(obj.path)
        seconds = time.monotonic() - t0
        log.info("event=http_fetch uri=%s bytes=%d seconds=%.3f mib_s=%.1f", self._uri, got, seconds,
                 got / 2**20 / max(seconds, 1e-9))

    def _parallel(self, tasks: list[Callable[[], None]]) -> None:
        run_all(tasks, self._workers, self._cancel, "http-fetch")

    def _get(self, fd: int, start: int, end: int, progress: Progress, whole: bool,
             digest: FileDigest | None = None) -> None:
        """Write bytes [start, end] at their offsets in `fd`, resuming after a cut with a Range request."""
        pos = [start]

        def attempt() -> None:
            if self._cancel.is_set():
                raise Cancelled()
            headers: dict[str, str] = {}
            ranged = not (whole and pos[0] == 0)
            if ranged:
                headers["Range"] = f"bytes={pos[0]}-{end}"
                if self._validator:
                    headers["If-Range"] = self._validator
            with self._client.stream("GET", self._url, headers=headers) as r:
                self._check(r)
                if ranged and r.status_code == 200:
                    if not whole or (self._ranges and self._validator):
                        raise _Changed()  # If-Range did not match: the file is not the one listed
                    pos[0] = 0  # the server ignores ranges: start this file over
                    os.ftruncate(fd, 0)
                    if digest is not None:
                        digest.invalidate()
                elif r.status_code == 206:
                    m = _CONTENT_RANGE.match(r.headers.get("content-range", ""))
                    if not m or int(m.group(1)) != pos[0]:
                        raise _Changed()
                for chunk in r.iter_raw():  # as received: a cut loses nothing already read
                    if pos[0] + len(chunk) > end + 1:
                        chunk = chunk[:end + 1 - pos[0]]
                    pwrite_all(fd, chunk, pos[0], _WRITE, digest)
                    pos[0] += len(chunk)
                    progress.advance(len(chunk))
                    if self._cancel.is_set():
                        raise Cancelled()
                    if pos[0] > end:
                        break
            if pos[0] != end + 1:
                raise _ShortRead(f"body ended at byte {pos[0]}, expected {end + 1}")

        try:
            self._retry(attempt, f"GET {self._uri} bytes={start}-{end}")
        except _Changed:
            raise TransientError(f"GET {self._uri}: the file changed on the server during the download",
                                 uri=self._uri) from None

    # -- errors ----------------------------------------------------------------------------
    def _retry(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            return call_with_retry(fn, is_transient=_is_transient, deadline_s=self._options.retry_deadline_s,
                                   what=what, describe=self._describe)
        except (PullError, Cancelled, _Changed):
            raise
        except _Status as e:
            if e.status in (404, 410):
                raise NotFound(f"{what}: not found (HTTP {e.status})", uri=self._uri) from None
            if e.status in (401, 403, 407):
                raise AccessDenied(f"{what}: access denied (HTTP {e.status}); check the headers/token given "
                                   "for this URI", uri=self._uri) from None
            raise PullError(f"{what}: {self._describe(e)}", uri=self._uri) from None
        except httpx.UnsupportedProtocol as e:
            raise PullError(f"{what}: {self._describe(e)}", uri=self._uri) from None
        except Exception as e:  # noqa: BLE001 - name the URI, scrub the cause
            raise PullError(f"{what}: {self._describe(e)}", uri=self._uri) from None

    def _describe(self, e: BaseException) -> str:
        text = redact(f"{type(e).__name__}: {e}")
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, _Status):
        return e.status >= 500 or e.status in (408, 429)
    if isinstance(e, _ShortRead):
        return True
    if isinstance(e, httpx.UnsupportedProtocol):
        return False
    return isinstance(e, (httpx.TransportError, ConnectionError, TimeoutError))
