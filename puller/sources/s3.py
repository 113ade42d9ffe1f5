"""S3-compatible source: s3://, gs:// (GCS's XML API) and rclone s3 remotes.

list(): a HEAD decides between one object (``s3://b/models/model.tgz``) and a prefix
(``s3://b/models/iris`` lists ``models/iris/``), and the prefix is listed only when the HEAD
finds no object. ``begin_list`` (what `modelshelf pull` calls at start-up) sends the HEAD and the
prefix's first LIST page together instead: one round trip, at the price of a LIST whose answer is
dropped unread when the key is an object; a listing not begun (the agent's pulls) never sends
that LIST (a key that may not be listed leaves no AccessDenied in the store's audit log). A URI
ending in '/' or naming a bucket always lists. Keys ending in '/' are directory markers and skipped; zero-byte objects are kept.
Identity per object: ETag (+ version id); sizes are part of the listing.

Requests: puller.sources.s3_wire (SigV4 over plain HTTP/1.1; botocore only for credentials that are
not static, see there).

fetch(): one thread pool of ``options.max_concurrency`` workers over one shared client
(connection pool sized to match; a body read to its end hands its connection back for the next
GET). Small objects are one GET each; objects larger than ``options.part_size`` are split into
ranged GETs written in place, at most one part per worker up to 64 MiB parts (``_part_size``:
a 512 MiB object is 16 parts of 32 MiB, not 32 of 16 MiB; never fewer parts than workers where
there were at least as many before). ``begin_fetch`` (what `modelshelf pull` calls once the
listing is known) sends the first GETs, one per worker, before the caller sets up where the
bytes go: the store starts sending while the caller works; ``fetch`` reads those answers first
(a retry sends again) and ``close`` drops any not read (their connections closed unread: no
byte of them is written anywhere). A plain-HTTP body that nothing needs to see on its way (no digest
being recorded, no store checksum to check) is spliced socket -> pipe -> file at its offset
(splice(2), see s3_wire.Pipe); any other body (TLS, chunked, digests or checksums wanted, a file
system that refuses splice) is read straight off the connection into one reused 64 KiB buffer per
worker, each read written in one pwrite (see _CHUNK for why). Each GET
resumes where it stopped when a transient error (5xx, reset, timeout, short body) hits it,
within ``options.retry_deadline_s``; GETs carry If-Match on the listed ETag, so an object that
changes mid-pull fails instead of mixing versions. Whole-object GETs ask the store for its own
checksum (not for GCS) and check crc32 / sha1 / sha256 ones as the bytes stream by.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path, PurePosixPath
from collections.abc import Callable
TYPE_CHECKING = False  # not typing's: importing typing is ~2 ms of a CLI pull's start-up
if TYPE_CHECKING:
    from typing import Any

from puller.archive import archive_kind
from puller.credentials import S3Settings, resolve_s3
from puller.errors import AccessDenied, BadURI, IntegrityError, NotFound, PullError, TransientError
from puller.logs import get_logger
from puller.record import astuple
from puller.retry import call_with_retry
from puller.sources.base import (Cancelled, FileDigest, Listing, Progress, PullOptions, RemoteObject, Source,
                                 preallocate, pwrite_all, run_all, sha256)
from puller.sources.s3_wire import (NO_LOCK, HTTPProtocolError, NoCredentials, Pipe, S3ConnectionError, S3ResponseError,
                                    S3WireClient, is_cert_error, resolve_credentials)
from puller.uri import ParsedURI, redact

log = get_logger("modelshelf.puller.sources.s3")  # logging imported on first use (puller.logs)

# Reads go into one reused 64 KiB buffer per worker; each read goes out in one pwrite. Both sizes
# are measured (in-process fetch of one 512 MiB object from s3rver on 127.0.0.1, 16 workers x 16
# MiB parts, ext4, 2-core VM, 3 interleaved rounds): 256 KiB reads written in 32 KiB pwrites cost
# 0.60-0.61 s of CPU (system 0.50-0.52), 64 KiB reads in one pwrite 0.45-0.48 s (system 0.31-0.36),
# the same with 5 x 50 MiB parts (s5cmd's shape). perf: the 256 KiB reads' copy out of the socket
# (_copy_to_iter) took 0.2 s against s5cmd's 0.04 s with 32 KiB reads: 16 workers' 256 KiB
# buffers (4 MiB) miss the CPU caches that 64 KiB ones hit. 32 KiB reads cost more user time (a
# Python loop turn per read) for no less system time. Writes stay <= 64 KiB: an earlier
# measurement here found 128 KiB-1 MiB writes costing ~1 s of system time per 512 MiB (large
# page-cache folios from the buddy allocator of a VM with free page reporting); 1 MiB reads and
# writes still cost 0.8-1.0 s of system time in this run.
_CHUNK = 64 << 10
# Parts grow past options.part_size up to one per worker, at most this big (see _part_size)
_MAX_PART = 64 << 20
_REPORT_EVERY = 1 << 20  # progress.advance at most once per MiB per stream
_tls = threading.local()
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchVersion"}
_DENIED = {"AccessDenied", "403", "401", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
           "InvalidToken", "ExpiredToken", "AccountProblem", "InvalidSecurity", "UnauthorizedAccess",
           "InvalidClientTokenId", "Forbidden", "Unauthorized"}
_TRANSIENT = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
              "ThrottlingException", "RequestTimeTooSkewed", "OperationAborted", "503", "500", "502", "504"}
def _send_ahead(begin: Callable[[], Any]) -> Any:
    """A request begun now (a Pending), or the error that stopped it, raised when it is read."""
    try:
        return begin()
    except Exception as e:  # noqa: BLE001 - raised by the first attempt, inside the retry loop
        return e


def _first_then(sent: Any, again: Callable[[], Any]) -> Callable[[], Any]:
    """An attempt for call_with_retry: the first reads the answer to the request `sent` ahead
    (or raises the error that stopped it); any retry, or every attempt when nothing was sent
    ahead (None), sends the request again."""
    first = [] if sent is None else [sent]

    def attempt() -> Any:
        if first:
            ahead = first.pop()
            if isinstance(ahead, BaseException):
                raise ahead
            return ahead.result()
        return again()
    return attempt


def _drop(sent: Any) -> None:
    """An answer sent for and not wanted: its connection closed unread."""
    if sent is not None and not isinstance(sent, BaseException):
        sent.drop()


class _ShortRead(Exception):
    """The body ended before the range did (treated as transient: resume)."""


class ChecksumMismatch(Exception):
    """The bytes of a whole-object GET do not match the checksum the store sent with them."""


class _StreamChecksum:
    """The store's full-object checksum from a GET's headers (crc32, sha1, sha256: what can be
    computed without awscrt, as botocore does without it), checked over the streamed bytes."""

    __slots__ = ("algo", "want", "_h", "_crc", "_crc32")

    def __init__(self, algo: str, want: str):
        self.algo, self.want = algo, want
        if algo == "crc32":
            import zlib  # (base64 and zlib only where a store sends checksums: not on the path to the first request)

            self._h = None
            self._crc32 = zlib.crc32
        else:
            import hashlib  # OpenSSL's, for the whole object: only when the store sent a checksum

            self._h = hashlib.new(algo)
        self._crc = 0

    @classmethod
    def of(cls, headers: Any) -> "_StreamChecksum | None":
        if str(headers.get("x-amz-checksum-type") or "FULL_OBJECT").upper() == "COMPOSITE":
            return None
        for algo in ("crc32", "sha1", "sha256"):
            value = headers.get(f"x-amz-checksum-{algo}")
            if value and "-" not in value:
                return cls(algo, value)
        return None

    def update(self, data: memoryview) -> None:
        if self._h is None:
            self._crc = self._crc32(data, self._crc)
        else:
            self._h.update(data)

    def verify(self) -> None:
        import base64

        raw = self._crc.to_bytes(4, "big") if self._h is None else self._h.digest()
        got = base64.b64encode(raw).decode()
        if got != self.want:
            raise ChecksumMismatch(f"expected {self.algo} {self.want}, calculated {got}")


# -- clients: one per distinct settings, shared by all sources (clients are thread-safe) --

_clients_lock = threading.Lock()
_clients: dict[tuple, Any] = {}
_sessions: dict[tuple, Any] = {}
# what the AWS default chain reads: a client made before these changed must not be reused
_CHAIN_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
              "AWS_CREDENTIAL_EXPIRATION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_DEFAULT_REGION",
              "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
              "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")


def _chain_fingerprint() -> str:
    h = sha256()
    for name in _CHAIN_ENV:
        h.update(f"{name}={os.environ.get(name, '')}\0".encode())
    return h.hexdigest()


def _proxy_fingerprint() -> str:
    """HTTP(S)_PROXY / NO_PROXY as the environment has them now (a client decides routes once)."""
    return "\0".join(sorted(f"{k}={v}" for k, v in os.environ.items() if k.lower().endswith("_proxy")))


def _session(profile: str | None, chain: str) -> Any:
    """A botocore session, for credentials that are not static (see puller.sources.s3_wire)."""
    import botocore.session

    with _clients_lock:
        session = _sessions.get((profile, chain))
        if session is None:
            if len(_sessions) >= 8:
                _sessions.pop(next(iter(_sessions)))
            session = _sessions[(profile, chain)] = botocore.session.Session(profile=profile)
        return session


def _client(settings: S3Settings, pool: int) -> tuple[S3WireClient, bool]:
    """The S3 client for `settings` and whether it signs anonymously.

    Static keys (settings, AWS_ACCESS_KEY_ID/SECRET) sign without importing botocore; any other
    credentials come from botocore's chain (see s3_wire). Clients are cached per settings, pool
    size and the chain's environment (a client made before that changed is not reused).
    """
    chain = _chain_fingerprint() if not settings.access_key_id else ""
    key = (astuple(settings), pool, chain, _proxy_fingerprint())
    with _clients_lock:
        if key in _clients:
            return _clients[key]
    try:
        creds, region = resolve_credentials(settings, lambda profile: _session(profile, chain))
    except Exception as e:  # noqa: BLE001 - botocore's ProfileNotFound, named without importing it
        if type(e).__name__ == "ProfileNotFound":
            raise BadURI(f"AWS profile {settings.profile!r} not found") from None
        raise
    anonymous = creds is None
    if anonymous and not settings.anonymous:
        log.info("event=s3_anonymous reason=no_credentials_found source=%s", settings.source)
    client = S3WireClient(settings, creds, pool, region=region)
    with _clients_lock:
        if len(_clients) >= 16:
            _clients.pop(next(iter(_clients)))
        _clients[key] = (client, anonymous)
    return client, anonymous


class S3Source(Source):
    """Objects under an S3-compatible bucket/prefix (see module docstring)."""

    list_page_size = 1000  # keys per LIST page

    def __init__(self, parsed: ParsedURI, options: PullOptions):
        self._parsed = parsed
        self._options = options
        self._uri = parsed.redacted
        self._settings = resolve_s3(parsed, options)
        self._workers = max(1, int(options.max_concurrency))
        self._client, self._anonymous = _client(self._settings, self._workers + 4)
        self._keys: dict[str, tuple[str, str]] = {}  # path -> (key, etag)
        self._cancel = threading.Event()
        self._ahead: tuple[Any, Any] | None = None  # (HEAD, first LIST page) sent by begin_list
        self._gets_ahead: dict[tuple[str, int, int], Any] = {}  # (key, start, end) -> a GET sent by begin_fetch
        self._fetch_ahead = False  # begin_list(fetch_ahead=True): list() leaves its record to begin_fetch
        self._unlogged: tuple | None = None  # the last listing's s3_list record, not made yet

    def begin_list(self, fetch_ahead: bool = False) -> None:
        """Send the listing's first requests now; `list()` reads their answers. The HEAD that tells
        an object from a prefix and the prefix's first LIST page go out together, on two
        connections: a prefix costs one round trip, not two, and the store answers both while
        the caller does something else. For an object the LIST answer is dropped unread (one
        more request to the store: the price). `fetch_ahead`: the caller calls `begin_fetch`
        right after `list()`, which then leaves its record to `begin_fetch` (see _log_listed)."""
        self._fetch_ahead = fetch_ahead
        if self._ahead is not None:
            return
        p = self._parsed
        head = None if (p.is_prefix or not p.key) else _send_ahead(
            lambda: self._client.begin_head_object(**self._head_args(p.key)))
        first_page = _send_ahead(lambda: self._client.begin_list_objects_v2(
            Bucket=p.bucket, Prefix=f"{p.key}/" if p.key else "", MaxKeys=self.list_page_size))
        self._ahead = (head, first_page)
        import xml.etree.ElementTree  # noqa: F401 - the answers' parser (~3 ms), imported while the store works

    def close(self) -> None:
        ahead, self._ahead = self._ahead, None
        for sent in ahead or ():
            _drop(sent)
        gets, self._gets_ahead = self._gets_ahead, {}
        for sent in gets.values():
            _drop(sent)
        self._log_listed()

    def begin_fetch(self, listing: Listing) -> None:
        """Send the GETs that `fetch(listing, ...)` starts with (one per worker, in its order)
        now, without waiting: the store answers while the caller prepares the destination
        (`modelshelf pull` imports and sets up its scratch cache meanwhile). `fetch` reads them
        (a retry sends again); `close` drops those never read. Nothing is written here: the
        destination's space is still reserved (preallocate) before the first byte lands, and a
        failure before that drops the answers unread."""
        try:
            if self._gets_ahead or any(o.path not in self._keys for o in listing.objects):
                return
            for key, etag, start, end, whole in self._plan(listing)[:self._workers]:
                kwargs = self._get_args(key, etag, start, end, whole)
                self._gets_ahead[(key, start, end)] = _send_ahead(lambda kw=kwargs: self._client.begin_get_object(**kw))
        finally:
            self._log_listed()

    # -- listing ---------------------------------------------------------------------------
    def list(self) -> Listing:
        t0 = time.monotonic()
        p = self._parsed
        objects: list[RemoteObject] = []
        archive = None
        keys: dict[str, tuple[str, str]] = {}
        # begun (begin_list): both answers read here; else the HEAD alone, and a LIST only for a prefix
        ahead, self._ahead = self._ahead, None
        head_sent, page_sent = ahead if ahead is not None else (None, None)
        try:
            head = None if (p.is_prefix or not p.key) else self._head(p.key, head_sent)
        except BaseException:
            _drop(page_sent)
            raise
        if head is not None:
            _drop(page_sent)
            name = PurePosixPath(p.key).name
            etag = head.get("ETag", "")
            identity = etag + (f"@{head['VersionId']}" if head.get("VersionId") not in (None, "null") else "")
            objects.append(RemoteObject(path=name, size=int(head.get("ContentLength", 0)), identity=identity,
                                        checksum=_checksum(head)))
            keys[name] = (p.key, etag)
            if self._options.extract_archives:
                archive = archive_kind(name)
        else:
            prefix = f"{p.key}/" if p.key else ""
            for obj in self._list_prefix(prefix, page_sent):
                rel = obj["Key"][len(prefix):]
                if obj["Key"].endswith("/") or not rel:
                    continue  # directory marker
                path = _safe_path(rel, self._uri)
                if path in keys:
                    raise PullError(f"{self._uri}: keys {keys[path][0]!r} and {obj['Key']!r} map to the same "
                                    f"file {path!r}", uri=self._uri)
                etag = obj.get("ETag", "")
                keys[path] = (obj["Key"], etag)
                objects.append(RemoteObject(path=path, size=int(obj.get("Size", 0)), identity=etag))
            if not objects:
                raise NotFound(f"{self._uri}: no such object, and no objects under prefix {prefix!r} "
                               f"in bucket {p.bucket!r}", uri=self._uri)
            _check_file_dir_conflicts(keys, self._uri)
        self._keys = keys
        listing = Listing(uri=p.normalized, objects=tuple(objects), archive=archive)
        self._unlogged = (self._uri, len(objects), listing.total_bytes, head is not None, time.monotonic() - t0)
        if not self._fetch_ahead:
            self._log_listed()
        return listing

    def _log_listed(self) -> None:
        """The listing's record (s3_list), made once the first GETs are sent where the caller
        fetches ahead (making a record imports logging: after the requests, not before them)."""
        record, self._unlogged = self._unlogged, None
        if record is not None:
            log.info("event=s3_list uri=%s files=%d bytes=%d single=%s seconds=%.3f", *record)

    def _head_args(self, key: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"Bucket": self._parsed.bucket, "Key": key}
        if not self._settings.is_gcs:
            kwargs["ChecksumMode"] = "ENABLED"
        return kwargs

    def _head(self, key: str, sent: Any) -> dict | None:
        """HEAD `key` (its first attempt `sent` by begin_list, or None): its metadata, or None when
        there is no such object (then: list it as a prefix)."""
        try:  # (a retry's arguments: made only when one is needed)
            return self._retry(_first_then(sent, lambda: self._client.head_object(**self._head_args(key))), f"HEAD {self._uri}")
        except PullError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            code = _code(e)
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            if code in ("403", "AccessDenied", "Forbidden") and not self._anonymous:
                # S3 answers 403 for a missing key when the caller may not list: let LIST decide
                return None
            raise self._map(e, "HEAD") from None

    def _list_prefix(self, prefix: str, first_sent: Any):
        """The objects under `prefix`, page by page (the first page's first attempt `first_sent`
        by begin_list, or None: sent now)."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self._parsed.bucket, "Prefix": prefix, "MaxKeys": self.list_page_size}
            if token:
                kwargs["ContinuationToken"] = token
            again = lambda: self._client.list_objects_v2(**kwargs)  # noqa: E731
            try:
                page = self._retry(_first_then(first_sent, again) if token is None else again, f"LIST {self._uri}")
            except PullError:
                raise
            except Exception as e:  # noqa: BLE001
                raise self._map(e, "LIST") from None
            yield from page.get("Contents", ())
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    # -- fetching --------------------------------------------------------------------------
    def _plan(self, listing: Listing) -> list[tuple[str, str, int, int, bool]]:
        """fetch's GETs in the order its workers take them: (key, etag, first byte, last byte, whole
        object); a zero-byte object has none."""
        plan: list[tuple[str, str, int, int, bool]] = []
        for obj in listing.objects:
            key, etag = self._keys[obj.path]
            if obj.size <= self._whole_max:
                if obj.size > 0:
                    plan.append((key, etag, 0, obj.size - 1, True))
                continue
            plan.extend((key, etag, start, end, False) for start, end in self._parts(obj.size))
        return plan

    def _parts(self, size: int) -> list[tuple[int, int]]:
        """The ranged parts, (first byte, last byte), of an object of `size` bytes (more than
        _whole_max), in the order fetch's workers take them."""
        part = self._part_size(size)
        return [(s, min(s + part, size) - 1) for s in range(0, size, part)]

    @property
    def _whole_max(self) -> int:
        """The largest object fetched in one GET (options.part_size, at least 1 MiB); a larger
        one is split into ranged parts, its blocks allocated first."""
        return max(1 << 20, int(self._options.part_size))

    def _part_size(self, size: int) -> int:
        """The ranged-GET part of an object of `size` bytes (more than _whole_max):
        options.part_size, unless its parts would outnumber the workers: then they grow, to one
        part per worker and at most _MAX_PART. Each request costs the store a little (an s3rver
        measure: 32 MiB parts of 512 MiB cost it ~0.08 s less CPU than 16 MiB ones,
        benchmarks/results/pull.notes.md "pull8"), and as many parts go at once as before (never
        fewer parts than workers)."""
        part = self._whole_max
        if size <= part * self._workers:
            return part
        per_worker = -(-size // self._workers)
        per_worker = -(-per_worker // (1 << 20)) << 20  # whole MiB
        return min(per_worker, max(part, _MAX_PART))

    def _get_args(self, key: str, etag: str, start: int, end: int, whole: bool) -> dict[str, Any]:
        """The client's arguments for a GET of bytes [start, end] of `key`: the whole object
        (`whole`, from its first byte: with the store's checksum asked for) or a range."""
        kwargs: dict[str, Any] = {"Bucket": self._parsed.bucket, "Key": key}
        if not whole:
            kwargs["Range"] = f"bytes={start}-{end}"
        elif not self._settings.is_gcs:
            kwargs["ChecksumMode"] = "ENABLED"  # the store's checksum, verified as it streams
        if etag:
            kwargs["IfMatch"] = etag
        return kwargs

    def fetch(self, listing: Listing, dest: Path, progress: Progress) -> None:
        self._log_listed()
        if any(o.path not in self._keys for o in listing.objects):
            self.list()
        dest = Path(dest)
        t0 = time.monotonic()
        self._cancel.clear()
        tasks: list[Callable[[], None]] = []
        open_fds: list[int] = []
        try:
            made: set[Path] = set()
            for obj in listing.objects:
                key, etag = self._keys[obj.path]
                target = dest / obj.path
                if target.parent not in made:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    made.add(target.parent)
                if obj.size <= self._whole_max:
                    tasks.append(self._small_task(key, etag, target, obj, progress))
                    continue
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                open_fds.append(fd)
                preallocate(fd, obj.size)
                parts = self._parts(obj.size)
                tracker = _PartsLeft(len(parts), lambda p=obj.path: progress.file_done(p))
                digest = self.digest_for(target, obj.size)
                # one writer at a time into the file: the kernel takes the file's lock for each
                # write anyway (ext4, XFS...), and its writers left waiting there spin on it, on
                # the CPUs the transfer needs (measured: pull.notes.md "pull11"); these wait asleep
                lock = threading.Lock()
                for start, end in parts:
                    tasks.append(self._part_task(key, etag, fd, start, end, progress, tracker, digest, lock))
            self._run(tasks)
        finally:
            for fd in open_fds:
                os.close(fd)
        for obj in listing.objects:
            size = (dest / obj.path).stat().st_size
            if size != obj.size:
                raise IntegrityError(f"{self._uri}: {obj.path} has {size} bytes, the store listed {obj.size}",
                                     uri=self._uri)
            if obj.checksum:
                _verify_checksum(dest / obj.path, obj.checksum, self._uri, obj.path)
        seconds = time.monotonic() - t0
        log.info("event=s3_fetch uri=%s files=%d bytes=%d seconds=%.3f mib_s=%.1f", self._uri,
                 len(listing.objects), listing.total_bytes, seconds, listing.total_bytes / 2**20 / max(seconds, 1e-9))

    def _small_task(self, key: str, etag: str, target: Path, obj: RemoteObject, progress: Progress):
        def run() -> None:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                if obj.size > 0:
                    self._get_range(key, etag, fd, 0, obj.size - 1, progress, whole=True,
                                    digest=self.digest_for(target, obj.size))
            finally:
                os.close(fd)
            progress.file_done(obj.path)
        return run

    def _part_task(self, key: str, etag: str, fd: int, start: int, end: int, progress: Progress,
                   tracker: "_PartsLeft", digest: FileDigest | None, lock: threading.Lock | None = None):
        def run() -> None:
            self._get_range(key, etag, fd, start, end, progress, whole=False, digest=digest, lock=lock)
            tracker.one_done()
        return run

    def _run(self, tasks: list[Callable[[], None]]) -> None:
        run_all(tasks, self._workers, self._cancel, "s3-fetch")

    def _get_range(self, key: str, etag: str, fd: int, start: int, end: int, progress: Progress,
                   whole: bool, digest: FileDigest | None = None, lock: threading.Lock | None = None) -> None:
        """Write bytes [start, end] of `key` at the same offsets of `fd`, resuming after transient
        errors; holding `lock` (when given) while writing, never while reading the socket."""
        pos = [start]
        buf = _thread_buffer()

        def attempt() -> None:
            if self._cancel.is_set():
                raise Cancelled()
            # the first attempt reads the answer to the GET begin_fetch sent, if it did
            sent = self._gets_ahead.pop((key, start, end), None) if pos[0] == start and self._gets_ahead else None
            if isinstance(sent, BaseException):
                raise sent
            resp = sent.result() if sent is not None else self._client.get_object(
                **self._get_args(key, etag, pos[0], end, whole and pos[0] == start))
            # the whole object in one response: check the store's checksum as the bytes stream by
            check = _StreamChecksum.of(resp.headers) if pos[0] == start and whole else None
            unreported = 0
            done = False
            # nothing to see of the bytes on their way (no digest, no store checksum): splice them
            pipe = Pipe.open() if digest is None and check is None and resp.spliceable else None
            try:
                while pos[0] <= end:
                    n = None if pipe is None else resp.splice_into(fd, pos[0], end + 1 - pos[0], pipe, lock)
                    if n is None:  # TLS, chunked, a refused splice, or the bytes are to be seen
                        if pipe is not None:
                            pipe.close()
                            pipe = None
                        want = min(_CHUNK, end + 1 - pos[0])
                        n = resp.readinto(buf[:want])  # straight off the connection
                        if not n:
                            break
                        data = buf[:n]
                        with lock or NO_LOCK:
                            pwrite_all(fd, data, pos[0], _CHUNK, digest)
                        if check is not None:
                            check.update(data)
                    elif not n:
                        break
                    pos[0] += n
                    unreported += n
                    if unreported >= _REPORT_EVERY:
                        progress.advance(unreported)
                        unreported = 0
                    if self._cancel.is_set():
                        raise Cancelled()
                done = pos[0] > end
            finally:
                if pipe is not None:
                    pipe.close()
                if unreported:
                    progress.advance(unreported)
                if done and resp.isclosed():
                    resp.release_conn()  # the body was read to its end: the connection is reusable
                else:
                    resp.close()  # a half-read body: the connection is dropped, not reused
            if check is not None:
                check.verify()
            if pos[0] != end + 1:
                raise _ShortRead(f"body ended at byte {pos[0]}, expected {end + 1}")

        try:
            self._retry(attempt, f"GET {self._uri} key={key} bytes={start}-{end}")
        except (PullError, Cancelled):
            raise
        except Exception as e:  # noqa: BLE001
            raise self._map(e, "GET", key) from None

    # -- errors ----------------------------------------------------------------------------
    def _retry(self, fn: Callable[[], Any], what: str) -> Any:
        return call_with_retry(fn, is_transient=_is_transient, deadline_s=self._options.retry_deadline_s,
                               what=what, describe=self._describe)

    def _describe(self, e: BaseException) -> str:
        text = redact(f"{type(e).__name__}: {e}")
        for secret in self._settings.secret_values():
            text = text.replace(secret, "***")
        return text

    def _map(self, e: BaseException, op: str, key: str | None = None) -> PullError:
        code = _code(e)
        where = f"{op} {self._uri}" + (f" (key {key!r})" if key and key != self._parsed.key else "")
        cause = self._describe(e)
        if code in ("NoSuchBucket",):
            return NotFound(f"{where}: bucket {self._parsed.bucket!r} does not exist", uri=self._uri)
        if code in _NOT_FOUND:
            return NotFound(f"{where}: no such object ({cause})", uri=self._uri)
        if code in _DENIED or _is_no_credentials(e):
            how = "anonymous access" if self._anonymous else f"credentials from {self._settings.source}"
            return AccessDenied(f"{where}: access denied with {how} ({cause})", uri=self._uri)
        if code in ("PreconditionFailed", "412"):
            return TransientError(f"{where}: the object changed during the download ({cause})", uri=self._uri)
        if code in ("InvalidBucketName",):
            return BadURI(f"{where}: invalid bucket name {self._parsed.bucket!r}", uri=self._uri)
        if isinstance(e, ChecksumMismatch):
            return IntegrityError(f"{where}: the store's checksum does not match the bytes received ({cause})",
                                  uri=self._uri)
        return PullError(f"{where}: {cause}", uri=self._uri)


class _PartsLeft:
    def __init__(self, n: int, on_done: Callable[[], None]):
        self._n, self._on_done, self._lock = n, on_done, threading.Lock()

    def one_done(self) -> None:
        with self._lock:
            self._n -= 1
            last = self._n == 0
        if last:
            self._on_done()


def _thread_buffer() -> memoryview:
    """This thread's reusable read buffer (one per worker: no allocation per chunk)."""
    buf = getattr(_tls, "buf", None)
    if buf is None:
        buf = _tls.buf = memoryview(bytearray(_CHUNK))
    return buf


def _code(e: BaseException) -> str:
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {}) or {}
        code = str(err.get("Code") or "")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if code and not code.isdigit():
            return code
        return code or (str(status) if status else "")
    return ""


def _is_no_credentials(e: BaseException) -> bool:
    return isinstance(e, NoCredentials) or type(e).__name__ in (
        "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, (PullError, Cancelled, ChecksumMismatch)):
        return False
    if isinstance(e, S3ConnectionError):
        return e.transient
    if isinstance(e, _ShortRead):
        return True
    if isinstance(e, S3ResponseError):
        return e.code in _TRANSIENT or e.status >= 500 or e.status == 429
    if isinstance(e, HTTPProtocolError):  # a body cut short (IncompleteRead) or garbled
        return True
    if is_cert_error(e):
        return False
    # a reset, a read timeout, or a TLS record broken mid-body (ssl: imported by https only)
    ssl = sys.modules.get("ssl")
    return isinstance(e, (ConnectionError, TimeoutError, socket.timeout)) or (ssl is not None and type(e) is ssl.SSLError)


def _safe_path(rel: str, uri: str) -> str:
    parts = [p for p in rel.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts) or any("\0" in p for p in parts):
        raise IntegrityError(f"{uri}: object key suffix {rel!r} would escape the destination", uri=uri)
    return "/".join(parts)


def _check_file_dir_conflicts(keys: dict[str, tuple[str, str]], uri: str) -> None:
    for path in keys:  # normalized by _safe_path: no leading '/', no empty segments
        parent = path
        while "/" in parent:
            parent = parent.rsplit("/", 1)[0]
            if parent in keys:
                raise PullError(f"{uri}: {parent!r} is both an object and a directory of {path!r}", uri=uri)


def _checksum(head: dict) -> str | None:
    """The store's full-object checksum as 'algo:value' (sha256/sha1 in hex), if it has one."""
    if str(head.get("ChecksumType", "FULL_OBJECT")).upper() == "COMPOSITE":
        return None
    for field, algo in (("ChecksumSHA256", "sha256"), ("ChecksumSHA1", "sha1"), ("ChecksumCRC32", "crc32"),
                        ("ChecksumCRC32C", "crc32c"), ("ChecksumCRC64NVME", "crc64nvme")):
        value = head.get(field)
        if value and "-" not in value:
            if algo in ("sha256", "sha1"):
                import base64

                return f"{algo}:{base64.b64decode(value).hex()}"
            return f"{algo}:{value}"
    return None


def _verify_checksum(path: Path, checksum: str, uri: str, name: str) -> None:
    """Check a listed sha256/sha1/crc32 store checksum against the file (others: unchecked)."""
    algo, _, want = checksum.partition(":")
    if algo in ("sha256", "sha1"):
        import hashlib

        h = hashlib.new(algo)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(4 << 20), b""):
                h.update(block)
        got = h.hexdigest()
    elif algo == "crc32":
        import base64
        import zlib

        crc = 0
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(4 << 20), b""):
                crc = zlib.crc32(block, crc)
        got = base64.b64encode(crc.to_bytes(4, "big")).decode()
    else:
        return
    if got != want:
        raise IntegrityError(f"{uri}: {name} does not match the store's {algo} checksum", uri=uri)
