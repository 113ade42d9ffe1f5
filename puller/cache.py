"""The model cache and its on-disk protocol (everything a reader needs is in this file).

Layout under the root (node-local disk or a ReadWriteMany volume shared by several pods)::

    VERSION                      layout version ("1")
    entries/<key>/               a PUBLISHED entry: appears by one atomic rename, never changes after;
                                 read-only: files 0444 (0555 if executable), directories 0555
        manifest.json            uri (redacted), source identity and store checksums, directories,
                                 files with size and digest (+ sha256 where one was checked), total bytes
        files/                   the model's files = Entry.path (one subdirectory per sub-model)
    tmp/<key>.<token>/           a download in progress: same shape as an entry, plus owner.json
    trash/<key>.<token>/         an entry being deleted: renamed here first, then removed
    locks/<key>.lock             one lock file per key (fcntl POSIX lock); removed with its entry
    leases/<key>/<holder>        one EMPTY file per (key, holder); its mtime is the holder's last heartbeat.
                                 An agent's holder is `<pod>@<model>` (model_holder): a lease per
                                 (entry, model), so two models on one entry hold two leases
    meta/<key>.json              small annotations per key (get_meta/set_meta), e.g. measured memory
    clock                        touched to read the file system's own clock (see "Clocks")

Other names under the root (e.g. an agent's `.repository/`) are left alone.

Key: sha256 of the normalized, redacted URI(s) and the source identity (`Listing.identity()`:
per object path, size, ETag / Last-Modified / mtime_ns). An unchanged source is a hit that moves
zero bytes; a changed source gets a new key, so a published entry never changes.

Publish (`ensure`, on a miss):
  1. take the key's lock (a per-process thread lock, then `lockf` on locks/<key>.lock);
  2. re-check entries/<key>: another thread/process/pod may have published it while we waited
     (waiters reuse the winner's entry);
  3. download into tmp/<key>.<token>/files (archives go to tmp/.../download, are extracted
     into files/ by puller.archive, then dropped), verify sizes, the user's sha256 and sha256
     checksums given by the store (sha256 is computed only where it is checked); record every
     file's digest (xxh3-128 over 1 MiB parts, `puller.sources.base.FileDigest`), computed from
     the bytes as the source writes them (files it did not report, e.g. extracted ones, are read
     once here); make the tree read-only; write manifest.json;
  4. ONE `rename(tmp/<key>.<token>, entries/<key>)`, then entries/<key> itself becomes 0555. If that loses a race (the target exists:
     a lock that did not hold, e.g. on a misconfigured NFS mount), the temp copy is discarded
     and the existing entry used. A reader never sees a partial entry: before the rename
     there is no entries/<key>, after it there is a complete one.
Local and pvc sources are used in place (Entry.path = the source path, in_place=True): no lock,
no copy. In a sub-model mapping, a local sub-model is a symlink inside the entry.

Locks: a thread lock per key (POSIX locks belong to a process, so one thread per process
touches the lock file at a time), then `lockf(LOCK_EX)` on locks/<key>.lock, polled. GC removes
the lock file of an entry it deleted while still holding it; whoever then gets the lock checks
that the path still names the inode it locked and otherwise locks the new file.

Crash safety: a crashed pull leaves only tmp/<key>.<token> (its owner's lock dies with the
process). `Cache()` sweeps, on start, every tmp dir whose key lock it can take (nobody is
working on it) and everything in trash/.

Immutability: nobody but root can add, remove or rewrite anything in a published entry; root
ignores modes, so consumers never share a writable inode with an entry (`modelshelf pull` gives
DEST copies: reflink / copy_file_range / copy; `--link` hard links are an opt-in for non-root
consumers) and servers write their byproducts elsewhere. `verify` re-hashes every file and
reports changed, missing and extra files and extra directories (e.g. a `__pycache__`). Removal
(GC, discard, sweep) makes the tree writable again under the key lock, then renames it into
trash/ and removes it.

Leases: `lease(key, holder)` creates leases/<key>/<holder> under the key lock; `refresh_leases()`
(a heartbeat the agent calls every lease_ttl_s/4 or so) touches this instance's lease files; a
lease not refreshed within lease_ttl_s is dead, so a crashed pod does not pin an entry forever.
Every pod sharing the root sees every lease; GC, `cache gc` and `cache ls` treat each
`<pod>@<model>` holder as one lease. Releasing one model's lease never touches another's.

Serving what is cached needs no free space: a lease file is empty (on a full disk it can still
be created where inodes remain); when it cannot be created (ENOSPC/EDQUOT/EROFS) the failure is
logged, `ensure` of the published entry still succeeds, and the heartbeat creates it later.
LRU times (utime) and `set_meta` annotations are best-effort in the same way.

Statistics: `stats()` is O(1) after its first call: sizes by key are kept in memory on publish /
GC / discard, and rescanned in a background thread at most every `rescan_s` seconds (listing
entries/ and reading only new keys' manifests) to see other pods' changes. `ensure` with a budget runs GC only after a download
added bytes or when the tracked total is over the budget, never on a plain hit.

GC: `gc(max_bytes)` removes least-recently-used entries (mtime of entries/<key>, touched on
every hit) without a live lease until the total is within budget. For each victim it takes the
key's lock WITHOUT waiting (a locked key is being published or leased: skipped), re-checks the
leases and that the entry was not used since the scan, renames entries/<key> into trash/ (one
atomic step: a reader sees the whole entry or none), releases the lock, then removes the
trash dir. A reader that must not lose its entry to a GC in another pod uses
`ensure(..., lease=True)`, which takes the lease under the same lock.

Clocks: lease ages are measured against the mtime of the just-touched `clock` file, i.e. the
file system's clock (an NFS server's), not the local one, so pods with skewed clocks agree.

NFS and other shared volumes: the protocol needs an atomic directory rename (NFS, CephFS, EFS
have it) and working POSIX locks across clients (NFSv4, or NFSv3 with lockd/statd; do NOT mount
with `local_lock=posix|all`, or nolock, which makes locks node-local: the rename is then the only
safety net, so two pods may download the same entry once each, never publish a broken one). A
lock held by a crashed NFS client is released only when the server expires its lease (NFSv4:
~90 s); until then that key waits. Entry files are not fsync'ed (a process crash is safe; after
a power loss run `modelshelf cache verify`).

The API is blocking and thread-safe; the agent calls it from worker threads.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import Callable, Iterable, Mapping
TYPE_CHECKING = False  # not typing's: importing typing is ~2 ms of a CLI pull's start-up
if TYPE_CHECKING:
    from typing import Any

from puller import archive as _archive
from puller.errors import BadURI, IntegrityError, NotFound, PullError
from puller.record import Factory, Record
from puller.sources.base import (DIGEST_ALGO, DigestRecorder, Listing, NullProgress, Progress, PullOptions, Source,
                                 file_digest, open_source, sha256)

log = logging.getLogger("modelshelf.puller.cache")

LAYOUT_VERSION = "1"
_KEY_RE = re.compile(r"^[0-9a-f]{32}$")
_HASH_CHUNK = 4 * 2**20
# errors of a full or read-only disk: writes that only annotate (lease files, meta, LRU times)
# are then skipped and retried later, never failing the use of a published entry
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


# -- public data ---------------------------------------------------------------------------

class Entry(Record):
    """One model's files, ready to use. Treat `path` as read-only."""

    key: str
    path: Path  # directory with the model files (for a single local file: that file)
    uri: str  # redacted
    size: int  # bytes of the model's files (linked local sub-models included; GC counts only copies)
    files: tuple[str, ...]  # relative POSIX paths of regular files; "name/" for a linked local sub-model
    in_place: bool = False  # a local/pvc source used where it lies, not a cache copy
    hit: bool = False  # True when nothing was downloaded by this call


class Lease(Record):
    key: str
    holder: str
    refreshed: float  # epoch seconds (file system clock) of the last heartbeat
    age_s: float


class EntryInfo(Record):
    key: str
    path: Path
    uri: str
    size: int
    files: int
    created: float
    last_used: float
    leases: tuple[str, ...]  # holders with a live lease


class GCReport(Record, frozen=False):
    budget: int
    bytes_before: int = 0
    bytes_after: int = 0
    removed: list[EntryInfo] = Factory(list)
    in_use: list[str] = Factory(list)  # keys skipped: live lease, locked, or just used

    @property
    def freed(self) -> int:
        return sum(e.size for e in self.removed)

    @property
    def within_budget(self) -> bool:
        return self.bytes_after <= self.budget


class Mismatch(Record):
    key: str
    path: str
    problem: str


class VerifyReport(Record, frozen=False):
    checked: list[str] = Factory(list)
    mismatches: list[Mismatch] = Factory(list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


# -- locks -------------------------------------------------------------------------------

_registry_lock = threading.Lock()
# path -> [thread lock, number of _KeyLocks acquiring or holding it]: an entry lives only while
# someone uses it, so the registry stays as small as the keys being locked right now
_thread_locks: dict[str, list[Any]] = {}


class _KeyLock:
    """Exclusive lock on one key: a thread lock (one thread per process touches the file lock,
    which POSIX locks need: they belong to the process) plus `lockf` on the lock file."""

    def __init__(self, path: Path):
        self.path = path
        self._tlock: threading.Lock | None = None
        self._fd: int | None = None

    def _enter(self) -> threading.Lock:
        with _registry_lock:
            slot = _thread_locks.get(str(self.path))
            if slot is None:
                slot = _thread_locks[str(self.path)] = [threading.Lock(), 0]
            slot[1] += 1
            return slot[0]

    def _leave(self) -> None:
        with _registry_lock:
            slot = _thread_locks[str(self.path)]
            slot[1] -= 1
            if slot[1] == 0:
                del _thread_locks[str(self.path)]

    def _unlock_thread(self) -> None:
        tlock, self._tlock = self._tlock, None
        if tlock is not None:
            tlock.release()
        self._leave()

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        tlock = self._enter()
        if not tlock.acquire(blocking, -1 if timeout is None or not blocking else timeout):
            self._leave()
            return False
        self._tlock = tlock
        fd = -1
        delay = 0.002
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                else:
                    if self._same_file(fd):
                        self._fd = fd
                        return True
                    # the holder we waited for unlinked the file (GC of the key): lock the new one
                    os.close(fd)
                    fd = -1
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                    continue
                if not blocking or (deadline is not None and time.monotonic() >= deadline):
                    os.close(fd)
                    fd = -1
                    self._unlock_thread()
                    return False
                time.sleep(delay)
                delay = min(delay * 1.5, 0.05)
        except BaseException:
            if self._fd is None:
                if fd >= 0:
                    os.close(fd)
                self._unlock_thread()
            raise

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        fst = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)

    def release(self, unlink: bool = False) -> None:
        """Unlock; `unlink=True` also removes the lock file (waiters notice and re-lock)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            if unlink:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            try:
                fcntl.lockf(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
                self._unlock_thread()

    def __enter__(self) -> "_KeyLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- the cache -----------------------------------------------------------------------------

class Cache:
    """A cache root. See the module docstring for the protocol.

    `max_bytes`: disk budget; when set, `ensure` runs `gc` after each call (and makes room
    before a download). `holder`: default lease holder (a pod name). `lease_ttl_s`: a lease not
    refreshed for this long is dead. `scratch`: a throw-away root whose entries are moved out as
    soon as they are published (`modelshelf pull URI DEST` without --cache-dir): no per-file
    digests (nothing will verify them; a user's sha256 and store checksums are still checked),
    files and directories stay writable, no fsync. Never share a scratch root.
    """

    def __init__(self, root: str | os.PathLike[str], *, max_bytes: int | None = None,
                 holder: str | None = None, lease_ttl_s: float = 300.0, hash_workers: int = 4,
                 scratch: bool = False):
        self.root = Path(root)
        self._scratch = scratch
        self.max_bytes = max_bytes
        self.holder = _safe_holder(holder or f"{socket.gethostname()}-{os.getpid()}")
        self.lease_ttl_s = float(lease_ttl_s)
        self._hash_workers = max(1, hash_workers)
        for d in ("entries", "tmp", "trash", "locks", "leases", "meta"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._real_root = Path(os.path.realpath(self.root))
        version = self.root / "VERSION"
        if not version.exists():
            _atomic_write(version, LAYOUT_VERSION + "\n")
        elif version.read_text().strip() != LAYOUT_VERSION:
            raise PullError(f"cache root {self.root} has layout version {version.read_text().strip()!r}, "
                            f"this modelshelf speaks {LAYOUT_VERSION!r}")
        self._mu = threading.Lock()
        self._mine: set[tuple[str, str]] = set()  # (key, holder) leases this instance refreshes
        self._unwritten: set[str] = set()  # keys whose lease file could not be written (disk full)
        # entry sizes by key, kept on publish / GC / discard, rescanned at most every rescan_s
        # (other pods publish and remove too): stats() reads no manifest on the common path
        self.rescan_s = 30.0
        self._index: dict[str, int] | None = None
        self._index_bytes = 0
        self._index_leased = 0
        self._index_at = 0.0
        self._rescanning = False
        self._counters = {"hits": 0, "misses": 0, "in_place": 0, "bytes_downloaded": 0}
        self.sweep()

    # -- paths -----------------------------------------------------------------------------
    def _entry_dir(self, key: str) -> Path:
        return self.root / "entries" / key

    def _lock(self, key: str) -> _KeyLock:
        return _KeyLock(self._real_root / "locks" / f"{key}.lock")

    def _lease_path(self, key: str, holder: str) -> Path:
        return self.root / "leases" / key / holder

    # -- ensure ----------------------------------------------------------------------------
    def ensure(self, source: str | Mapping[str, str], options: PullOptions | None = None,
               progress: Progress | None = None, *, lease: bool = False, holder: str | None = None) -> Entry:
        """Make `source` (a URI, or a mapping sub-model name -> URI) available locally.

        Lists the source(s) (metadata only), derives the key, and returns the published entry
        (a hit: zero bytes moved) or downloads, verifies and publishes it once, however many
        threads, processes or pods ask at the same time. `lease=True` also takes a lease for
        `holder` (default: `self.holder`) under the key's lock, so no GC anywhere can remove the
        entry before the caller has it. An agent leases per model (`model_holder`), so two models
        on one entry hold two leases and removing one never releases the other. Raises puller.errors.PullError subclasses (BadURI, NotFound, ...).
        """
        options = options or PullOptions()
        opens = [(name, lambda uri=uri: open_source(uri, options)) for name, uri in _sub_models(source)]
        return self._ensure_opened(opens, options, progress or NullProgress(), lease, holder)

    def ensure_source(self, src: Source, options: PullOptions | None = None, progress: Progress | None = None,
                      listing: Listing | None = None) -> Entry:
        """`ensure` for one source the caller opened itself, e.g. to `begin_list()` it before this
        cache's code was even imported (`modelshelf pull`); lists it (unless the caller did:
        `listing`), then as `ensure`. Closes `src`."""
        return self._ensure_opened([("", lambda: src)], options or PullOptions(), progress or NullProgress(), False, None,
                                   listing)

    def _ensure_opened(self, opens: list[tuple[str, Callable[[], Source]]], options: PullOptions, progress: Progress,
                       lease: bool, holder: str | None, listing: Listing | None = None) -> Entry:
        sources: list[Source] = []
        try:
            listed: list[tuple[str, Source, Listing]] = []
            for name, open_one in opens:
                src = open_one()
                sources.append(src)
                listed.append((name, src, listing if listing is not None else src.list()))
            return self._ensure_listed(listed, options, progress, lease, _safe_holder(holder or self.holder))
        finally:
            for src in sources:
                try:
                    src.close()
                except Exception:  # noqa: BLE001 - closing must not hide the real outcome
                    pass

    def _ensure_listed(self, listed: list[tuple[str, Source, Listing]], options: PullOptions,
                       progress: Progress, lease: bool, holder: str) -> Entry:
        single = len(listed) == 1 and listed[0][0] == ""
        label = listed[0][2].uri if single else _mapping_label({n: li.uri for n, _, li in listed})
        key = _key(listed, options)
        if options.sha256 and (not single or len(listed[0][2].objects) != 1):
            raise BadURI(f"{label}: sha256 applies to a single file or archive, the source has "
                         f"{sum(len(li.objects) for _, _, li in listed)} objects", uri=label)
        if single and listed[0][2].local_path is not None:
            return self._in_place(key, listed[0][2], options, lease, holder)

        entry = None if lease else self._published(key, options, label)
        if entry is None:
            lock = self._lock(key)
            lock.acquire()
            try:
                entry = self._published(key, options, label)
                if entry is None:
                    need = sum(li.total_bytes for _, _, li in listed)
                    if self.max_bytes is not None and self._tracked_bytes() + need > self.max_bytes:
                        self._gc_quietly(max(0, self.max_bytes - need), exclude={key})  # make room first
                    entry = self._download(key, listed, options, progress, label)
                if lease:
                    self._write_lease(key, holder)
            finally:
                lock.release()
        with self._mu:
            self._counters["hits" if entry.hit else "misses"] += 1
            if not entry.hit:
                self._counters["bytes_downloaded"] += entry.size
        # a hit adds no bytes: GC only after a download, or when another pod's writes (seen by
        # the periodic rescan) put the total over the budget
        if self.max_bytes is not None and (not entry.hit or self._tracked_bytes() > self.max_bytes):
            self._gc_quietly(self.max_bytes, exclude={key})
        return entry

    def _in_place(self, key: str, listing: Listing, options: PullOptions, lease: bool, holder: str) -> Entry:
        path = Path(listing.local_path)  # type: ignore[arg-type]
        if options.sha256:
            file = path if path.is_file() else path / listing.objects[0].path
            digest = self._local_sha256(key, file)
            if digest != options.sha256.lower():
                raise IntegrityError(f"{listing.uri}: sha256 mismatch (expected {options.sha256.lower()}, "
                                     f"got {digest})", uri=listing.uri)
        if lease:
            self.lease(key, holder)
        with self._mu:
            self._counters["in_place"] += 1
        log.info("event=cache_in_place key=%s uri=%s files=%d", key, listing.uri, len(listing.objects))
        return Entry(key=key, path=path, uri=listing.uri, size=listing.total_bytes,
                     files=tuple(o.path for o in listing.objects), in_place=True, hit=True)

    def _local_sha256(self, key: str, file: Path) -> str:
        """sha256 of a local file used in place, remembered in meta/<key>.local.json by (path,
        size, mtime_ns, inode, device): a periodic source check stays metadata only."""
        st = os.stat(file)
        sig = [str(file), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
        memo = self.root / "meta" / f"{key}.local.json"
        try:
            doc = json.loads(memo.read_text())
            if doc.get("sig") == sig and isinstance(doc.get("sha256"), str):
                return doc["sha256"]
        except (OSError, ValueError):
            pass
        digest = _sha256_file(file)
        try:
            _atomic_write(memo, json.dumps({"sig": sig, "sha256": digest}))
        except OSError as e:
            log.warning("event=cache_meta_write_failed key=%s error=%s", key, e.strerror or type(e).__name__)
        return digest

    def _published(self, key: str, options: PullOptions, label: str) -> Entry | None:
        """The published entry for `key` (touched as used), or None."""
        d = self._entry_dir(key)
        manifest = _read_manifest(d)
        if manifest is None:
            return None
        if options.sha256:
            have = manifest.get("source_sha256")
            if have and have != options.sha256.lower():
                raise IntegrityError(f"{label}: sha256 mismatch (expected {options.sha256.lower()}, "
                                     f"cached entry {key} has {have})", uri=label)
        _touch(d)
        log.info("event=cache_hit key=%s uri=%s bytes=%d", key, label, manifest.get("total_bytes", 0))
        return _entry_from_manifest(key, d, manifest, hit=True)

    def _download(self, key: str, listed: list[tuple[str, Source, Listing]], options: PullOptions,
                  progress: Progress, label: str) -> Entry:
        t0 = time.monotonic()
        tmp = self.root / "tmp" / f"{key}.{os.urandom(6).hex()}"
        files_dir = tmp / "files"
        files_dir.mkdir(parents=True)
        _atomic_write(tmp / "owner.json", json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "holder": self.holder, "started": time.time()}))
        total = sum(li.total_bytes for _, _, li in listed)
        nfiles = sum(len(li.objects) for _, _, li in listed)
        log.info("event=cache_miss key=%s uri=%s bytes=%d files=%d", key, label, total, nfiles)
        try:
            progress.start(total, nfiles, label)
            # the sources report what they write: digests while streaming (none for a scratch root)
            recorder = None if self._scratch else DigestRecorder()
            links: list[dict[str, Any]] = []
            sources_meta: list[dict[str, Any]] = []
            source_sha256: str | None = None
            for name, src, listing in listed:
                sub = files_dir / name if name else files_dir
                meta: dict[str, Any] = {"name": name, "uri": listing.uri, "archive": listing.archive,
                                        "identity": listing.identity()}
                checksums = {o.path: o.checksum for o in listing.objects if o.checksum}
                if checksums:
                    meta["checksums"] = checksums
                sources_meta.append(meta)
                for o in listing.objects:
                    _check_rel(o.path, listing.uri)
                if listing.local_path is not None:  # local sub-model: link, never copy
                    os.symlink(os.path.abspath(listing.local_path), sub)
                    links.append({"path": name, "target": os.path.abspath(listing.local_path),
                                  "bytes": listing.total_bytes})
                    continue
                src.digests = recorder
                if listing.archive and options.extract_archives:
                    dl = tmp / "download" / (name or "_")
                    dl.mkdir(parents=True)
                    src.fetch(listing, dl, progress)
                    _check_sizes(dl, listing)
                    arch = dl / listing.objects[0].path
                    digest = _sha256_file(arch)
                    _check_digests(listing, {listing.objects[0].path: digest}, options, single=len(listed) == 1)
                    source_sha256 = digest
                    sub.mkdir(parents=True, exist_ok=True)
                    _archive.extract(arch, sub, listing.archive, max_bytes=options.archive_max_bytes,
                                     label=listing.uri)
                    import shutil  # (after the transfer: not on the way to a pull's first GET)

                    shutil.rmtree(dl)
                else:
                    sub.mkdir(parents=True, exist_ok=True)
                    src.fetch(listing, sub, progress)
                    _check_sizes(sub, listing)
            if os.path.lexists(tmp / "download"):
                import shutil

                shutil.rmtree(tmp / "download", ignore_errors=True)
            # sha256 only where something can be checked against it (the user's sha256, a
            # store's sha256 checksum): hashing every byte again would double a big pull's time
            need: set[str] = set()
            if source_sha256 is None:
                for name, _src, listing in listed:
                    prefix = f"{name}/" if name else ""
                    for o in listing.objects:
                        if options.record_digests or (options.sha256 and len(listed) == 1 and len(listing.objects) == 1) or (
                                o.checksum and o.checksum.lower().startswith("sha256:")):
                            need.add(prefix + o.path)
            if self._scratch and not need and not any(li.archive and options.extract_archives for _, _, li in listed):
                # a scratch root records no digests: the listed sizes (fetch and _check_sizes
                # verified them) without another stat of every file
                files = {(f"{name}/" if name else "") + o.path: {"size": o.size}
                         for name, _src, li in listed if li.local_path is None for o in li.objects}
            else:
                files = self._hash_tree(files_dir, need, recorder)
            if source_sha256 is None:  # plain files: check the user's sha256 / store checksums
                for name, _src, listing in listed:
                    if listing.local_path is not None:
                        continue
                    prefix = f"{name}/" if name else ""
                    digests = {o.path: files[prefix + o.path]["sha256"] for o in listing.objects
                               if "sha256" in files[prefix + o.path]}
                    _check_digests(listing, digests, options, single=len(listed) == 1)
                    if len(listed) == 1 and len(listing.objects) == 1:
                        source_sha256 = digests.get(listing.objects[0].path)
            size = sum(f["size"] for f in files.values())
            dirs = sorted(os.path.relpath(r, files_dir).replace(os.sep, "/") for r, _d, _n in os.walk(files_dir)
                          if r != str(files_dir))
            manifest = {
                "format": 1,
                "key": key,
                "uri": label,
                "sources": sources_meta,
                "created": _utc_now_iso(),
                "created_ts": time.time(),
                "created_by": {"host": socket.gethostname(), "pid": os.getpid(), "holder": self.holder},
                "total_bytes": size,
                "digest_algo": None if recorder is None else DIGEST_ALGO,
                "source_sha256": source_sha256,
                "links": links,
                "dirs": dirs,
                "files": [dict(path=p, **v) for p, v in sorted(files.items())],
            }
            if not self._scratch:
                _make_read_only(files_dir)
            _atomic_write(tmp / "manifest.json", json.dumps(manifest, indent=1), fsync=not self._scratch)
            os.chmod(tmp / "manifest.json", 0o444)
            (tmp / "owner.json").unlink()
            final = self._entry_dir(key)
            try:
                os.rename(tmp, final)  # (a directory moved to another parent must be writable)
                if not self._scratch:
                    os.chmod(final, 0o555)
                hit = False
                self._note_added(key, size)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                    raise
                # lost a race the lock should have prevented: the winner's entry is as good
                log.warning("event=cache_publish_race key=%s uri=%s action=discard_own_copy", key, label)
                _rmtree(tmp)
                hit = True
                existing = _read_manifest(final)
                if existing is None:
                    raise PullError(f"{label}: entry {key} exists but has no manifest", uri=label) from None
                manifest = existing
            if not self._scratch:
                _fsync_dir(final.parent)
            _touch(final)
            progress.finish()
            secs = time.monotonic() - t0
            log.info("event=cache_published key=%s uri=%s bytes=%d files=%d seconds=%.3f mib_s=%.1f",
                     key, label, size, len(files), secs, size / 2**20 / max(secs, 1e-9))
            return _entry_from_manifest(key, final, manifest, hit=hit)
        except BaseException as e:
            _rmtree(tmp)
            err = getattr(progress, "error", None)
            if callable(err):
                err(str(e) if isinstance(e, PullError) else f"{type(e).__name__}")
            if isinstance(e, OSError) and not isinstance(e, PullError):
                raise PullError(f"{label}: {e.strerror or e} ({type(e).__name__})", uri=label) from e
            raise

    def _hash_tree(self, files_dir: Path, need: set[str],
                   recorder: DigestRecorder | None) -> dict[str, dict[str, Any]]:
        """{relative path: {size, digest[, sha256]}} of every regular file (links to local dirs
        skipped): the digest as streamed by the source (files it did not report, e.g. extracted
        from an archive, are read here; no digest without a recorder: a scratch root); sha256
        for the paths in `need` only."""
        paths: list[str] = []
        for root, dirs, names in os.walk(files_dir):
            for n in names:
                full = os.path.join(root, n)
                if os.path.islink(full):
                    continue
                paths.append(os.path.relpath(full, files_dir).replace(os.sep, "/"))
        def one(rel: str) -> tuple[str, dict[str, Any]]:
            full = files_dir / rel
            doc: dict[str, Any] = {"size": full.stat().st_size}
            if recorder is not None:
                doc["digest"] = recorder.finish(full)
            if rel in need:
                doc["sha256"] = _sha256_file(full)
            return rel, doc
        # files hashed while streaming cost no read: done here; threads only for the bytes to read
        out = dict(one(p) for p in paths if p not in need and (recorder is None or recorder.fully_streamed(files_dir / p)))
        rest = [p for p in paths if p not in out]
        if len(rest) <= 1:
            out.update(one(p) for p in rest)
            return out
        with ThreadPoolExecutor(max_workers=min(self._hash_workers, len(rest))) as ex:
            out.update(ex.map(one, rest))
        return out

    # -- lookups ---------------------------------------------------------------------------
    def get(self, key: str) -> Entry | None:
        """The published entry `key` (not touched), or None."""
        if not _KEY_RE.match(key):
            return None
        d = self._entry_dir(key)
        manifest = _read_manifest(d)
        return None if manifest is None else _entry_from_manifest(key, d, manifest, hit=True)

    def check(self, entry: Entry) -> list[str]:
        """Cheap presence check before a load (no hashing): the problems found, [] when the
        entry's files are all there with their recorded sizes. An in-place entry is checked
        for existence only (its source may change; the periodic source check sees that)."""
        if entry.in_place:
            return [] if entry.path.exists() else [f"{entry.path} is gone"]
        d = self._entry_dir(entry.key)
        manifest = _read_manifest(d)
        if manifest is None:
            return [f"cache entry {entry.key} is gone"]
        problems = []
        files_dir = d / "files"
        for f in manifest.get("files", []):
            try:
                size = os.stat(files_dir / f["path"]).st_size
            except OSError:
                problems.append(f"{f['path']}: missing")
                continue
            if size != f["size"]:
                problems.append(f"{f['path']}: {size} bytes, manifest says {f['size']}")
        return problems

    def discard(self, key: str, reason: str) -> bool:
        """Remove a broken entry whatever its leases (a broken entry is broken for every
        holder), so the next `ensure` downloads it again. True when it was removed here."""
        _check_key(key)
        lock = self._lock(key)
        lock.acquire()
        removed = False
        try:
            d = self._entry_dir(key)
            if not d.exists():
                return False
            self._to_trash(key)
            removed = True
        finally:
            lock.release(unlink=removed)
        log.warning("event=cache_discarded key=%s reason=%s", key, reason)
        self._sweep_trash()
        return True

    def ls(self) -> list[EntryInfo]:
        """Every published entry, least recently used first."""
        now = self._fs_now()
        out = []
        for key in self._keys():
            info = self._info(key, now)
            if info is not None:
                out.append(info)
        return sorted(out, key=lambda i: i.last_used)

    def stats(self) -> dict[str, Any]:
        """Entries and bytes on disk, plus this process's hit/miss counters. O(1) after the first
        call (which reads every manifest once): kept as this instance publishes and removes, and
        rescanned in a background thread (new keys' manifests only) when older than `rescan_s`,
        to see other pods' changes. `leased_entries` is as of the last scan."""
        self._fresh_index()
        with self._mu:
            counters = dict(self._counters)
            assert self._index is not None
            entries, total, leased = len(self._index), self._index_bytes, self._index_leased
        return {"root": str(self.root), "entries": entries, "bytes": total,
                "max_bytes": self.max_bytes, "leased_entries": leased, **counters}

    def _tracked_bytes(self) -> int:
        self._fresh_index()
        with self._mu:
            return self._index_bytes

    def _fresh_index(self) -> None:
        """Build the index on first use (in the caller's thread); later, when it is older than
        `rescan_s`, rescan in a background thread (one at a time) and answer from the current one."""
        with self._mu:
            build = self._index is None
            stale = (not build and not self._rescanning
                     and time.monotonic() - self._index_at >= self.rescan_s)
            if stale:
                self._rescanning = True
        if build:
            self._rescan()
        elif stale:
            threading.Thread(target=self._rescan_in_background, name="cache-rescan", daemon=True).start()

    def _rescan_in_background(self) -> None:
        try:
            self._rescan()
        except Exception as e:  # noqa: BLE001 - statistics must never take a caller down
            log.warning("event=cache_rescan_failed error=%s", f"{type(e).__name__}: {e}")
        finally:
            with self._mu:
                self._rescanning = False

    def refresh_stats(self) -> dict[str, Any]:
        """Rescan now (in this thread), then `stats()`."""
        self._rescan()
        return self.stats()

    def _rescan(self) -> None:
        """List entries/ (and leases/); read the manifests of keys not indexed yet."""
        with self._mu:
            known = dict(self._index or {})
        keys = set(self._keys())
        index = {k: v for k, v in known.items() if k in keys}
        for k in keys - index.keys():
            m = _read_manifest(self._entry_dir(k))
            if m is not None:
                index[k] = int(m.get("total_bytes", 0))
        leased = 0
        try:
            lease_dirs = [n for n in os.listdir(self.root / "leases") if n in index]
        except FileNotFoundError:
            lease_dirs = []
        if lease_dirs:
            now = self._fs_now()
            leased = sum(1 for k in lease_dirs if self._live_leases(k, now))
        with self._mu:
            self._index, self._index_at = index, time.monotonic()
            self._index_bytes, self._index_leased = sum(index.values()), leased

    def _reindex(self, infos: list[EntryInfo]) -> None:
        """A full scan (ls) was just made: take it as the index."""
        with self._mu:
            self._index = {i.key: i.size for i in infos}
            self._index_bytes = sum(self._index.values())
            self._index_leased = sum(1 for i in infos if i.leases)
            self._index_at = time.monotonic()

    def _note_added(self, key: str, size: int) -> None:
        with self._mu:
            if self._index is not None and key not in self._index:
                self._index[key] = size
                self._index_bytes += size

    def _note_removed(self, key: str) -> None:
        with self._mu:
            if self._index is not None and key in self._index:
                self._index_bytes -= self._index.pop(key)

    def _keys(self) -> list[str]:
        try:
            return [n for n in os.listdir(self.root / "entries") if _KEY_RE.match(n)]
        except FileNotFoundError:
            return []

    def _info(self, key: str, now: float) -> EntryInfo | None:
        d = self._entry_dir(key)
        try:
            st = d.stat()
        except FileNotFoundError:
            return None
        m = _read_manifest(d)
        if m is None:
            return None
        holders = tuple(le.holder for le in self._live_leases(key, now))
        return EntryInfo(key=key, path=d / "files", uri=m.get("uri", ""), size=int(m.get("total_bytes", 0)),
                         files=len(m.get("files", [])), created=float(m.get("created_ts", st.st_mtime)),
                         last_used=st.st_mtime, leases=holders)

    # -- leases ----------------------------------------------------------------------------
    def lease(self, key: str, holder: str | None = None) -> None:
        """Mark `key` in use by `holder` (default: this cache's holder) until `release`.

        Taken under the key's lock, so a GC in any pod either removed the entry before (check
        with `get`) or sees the lease. Refreshed by `refresh_leases()`.
        """
        _check_key(key)
        h = _safe_holder(holder or self.holder)
        lock = self._lock(key)
        try:
            lock.acquire()
        except OSError as e:  # no room even for the lock file: the heartbeat takes the lease later
            if e.errno not in _NO_SPACE:
                raise
            with self._mu:
                self._mine.add((key, h))
                self._unwritten.add(key)
            log.warning("event=lease_write_failed key=%s holder=%s error=%s action=retry_on_heartbeat",
                        key, h, e.strerror or type(e).__name__)
            return
        try:
            self._write_lease(key, h)
        finally:
            lock.release()

    def _write_lease(self, key: str, holder: str) -> bool:
        """Create/touch the (empty) lease file. Never raises for a full or read-only disk: the
        failure is logged and the heartbeat (`refresh_leases`) tries again; serving a published
        entry needs no free space. True when the lease file is there."""
        path = self._lease_path(key, holder)
        try:
            for _ in range(5):  # release() may rmdir leases/<key> between our mkdir and create
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
                    break
                except FileNotFoundError:
                    continue
            os.utime(path, None)  # mtime from the file system clock
        except OSError as e:
            if e.errno not in _NO_SPACE:
                raise
            with self._mu:
                first = key not in self._unwritten
                self._unwritten.add(key)
                self._mine.add((key, holder))
            (log.warning if first else log.debug)(
                "event=lease_write_failed key=%s holder=%s error=%s action=retry_on_heartbeat",
                key, holder, e.strerror or type(e).__name__)
            return False
        with self._mu:
            self._unwritten.discard(key)
            self._mine.add((key, holder))
        return True

    def release(self, key: str, holder: str | None = None) -> None:
        """Drop `holder`'s lease on `key` (no error if there is none)."""
        _check_key(key)
        h = _safe_holder(holder or self.holder)
        with self._mu:
            self._mine.discard((key, h))
        path = self._lease_path(key, h)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        try:
            path.parent.rmdir()
        except OSError:
            pass

    def refresh_leases(self) -> int:
        """Heartbeat: touch every lease this instance took (re-create lost ones). Returns the count."""
        with self._mu:
            mine = sorted(self._mine)
        for key, holder in mine:
            path = self._lease_path(key, holder)
            try:
                os.utime(path, None)
            except FileNotFoundError:
                with self._mu:
                    known = key in self._unwritten
                if not known:
                    log.warning("event=lease_lost key=%s holder=%s action=recreate", key, holder)
                self._write_lease(key, holder)
        return len(mine)

    def leases(self, key: str) -> list[Lease]:
        """Live leases on `key` (from every pod sharing the root)."""
        _check_key(key)
        return self._live_leases(key, self._fs_now())

    def _live_leases(self, key: str, now: float) -> list[Lease]:
        d = self.root / "leases" / key
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            if n.startswith("."):
                continue  # a lease being written
            try:
                mtime = os.stat(d / n).st_mtime
            except FileNotFoundError:
                continue
            age = now - mtime
            if age < self.lease_ttl_s:
                out.append(Lease(key=key, holder=n, refreshed=mtime, age_s=max(0.0, age)))
        return out

    def _fs_now(self) -> float:
        clock = self.root / "clock"
        try:
            try:
                os.utime(clock, None)
            except FileNotFoundError:
                clock.touch()
            return clock.stat().st_mtime
        except OSError:  # a read-only root: the local clock will do
            return time.time()

    # -- gc ----------------------------------------------------------------------------------
    def gc(self, max_bytes: int | None = None, *, exclude: Iterable[str] = ()) -> GCReport:
        """Remove LRU entries without a live lease until the total is <= max_bytes (default:
        the cache's budget). Entries that are leased, locked (being published or leased) or
        used since the scan are never removed; keys in `exclude` neither."""
        budget = self.max_bytes if max_bytes is None else max_bytes
        if budget is None:
            raise ValueError("gc needs a budget: Cache(max_bytes=...) or gc(max_bytes)")
        self._sweep_trash()
        excluded = set(exclude)
        infos = self.ls()
        total = sum(i.size for i in infos)
        self._reindex(infos)
        report = GCReport(budget=budget, bytes_before=total, bytes_after=total)
        now = self._fs_now()
        for info in infos:  # least recently used first
            if total <= budget:
                break
            if info.key in excluded or info.leases:
                report.in_use.append(info.key)
                continue
            lock = self._lock(info.key)
            if not lock.acquire(blocking=False):
                report.in_use.append(info.key)
                continue
            removed = False
            try:
                d = self._entry_dir(info.key)
                try:
                    used = d.stat().st_mtime
                except FileNotFoundError:
                    continue  # another pod removed it
                if used != info.last_used or self._live_leases(info.key, now):
                    report.in_use.append(info.key)
                    continue
                self._to_trash(info.key)
                removed = True
            finally:
                lock.release(unlink=removed)
            total -= info.size
            report.removed.append(info)
            self._forget(info.key, now)
            log.info("event=cache_gc_removed key=%s uri=%s bytes=%d last_used=%.0f",
                     info.key, info.uri, info.size, info.last_used)
        self._sweep_trash()
        report.bytes_after = total
        if total > budget:
            log.warning("event=cache_over_budget bytes=%d budget=%d in_use=%d", total, budget, len(report.in_use))
        return report

    def _to_trash(self, key: str) -> None:
        """Move entries/<key> into trash/ (caller holds the key's lock). The entry directory is
        read-only; a directory moved to another parent must be writable (for a non-root owner)."""
        d = self._entry_dir(key)
        try:
            os.chmod(d, 0o755)
        except OSError:
            pass  # not ours to chmod: the rename says whether it may go
        os.rename(d, self.root / "trash" / f"{key}.{os.urandom(6).hex()}")
        self._note_removed(key)

    def _gc_quietly(self, budget: int, exclude: set[str]) -> None:
        try:
            self.gc(budget, exclude=exclude)
        except Exception as e:  # noqa: BLE001 - GC trouble must not fail a pull
            log.warning("event=cache_gc_failed error=%s", type(e).__name__ + ": " + str(e))

    def _forget(self, key: str, now: float) -> None:
        """After removing an entry: drop its annotations and its dead lease files."""
        try:
            (self.root / "meta" / f"{key}.json").unlink()
        except FileNotFoundError:
            pass
        d = self.root / "leases" / key
        try:
            for n in os.listdir(d):
                p = d / n
                try:
                    if now - p.stat().st_mtime >= self.lease_ttl_s:
                        p.unlink()
                except FileNotFoundError:
                    pass
            d.rmdir()
        except OSError:
            pass

    # -- sweep -------------------------------------------------------------------------------
    def sweep(self) -> list[str]:
        """Remove leftovers of crashed pulls (tmp dirs nobody holds the lock of) and trash.
        Returns the names removed. Runs on start; safe at any time."""
        removed = self._sweep_trash()
        tmp = self.root / "tmp"
        for name in sorted(os.listdir(tmp)):
            key = name.split(".", 1)[0]
            if not _KEY_RE.match(key):
                continue
            lock = self._lock(key)
            try:
                if not lock.acquire(blocking=False):
                    continue  # someone is downloading this key right now
            except OSError as e:  # e.g. no space for the lock file: the next sweep tries again
                log.warning("event=cache_sweep_skipped path=tmp/%s error=%s", name, e.strerror or type(e).__name__)
                continue
            try:
                if (tmp / name).exists():
                    _rmtree(tmp / name)
                    removed.append(f"tmp/{name}")
                    log.info("event=cache_swept path=tmp/%s reason=owner_gone", name)
            finally:
                lock.release(unlink=not self._entry_dir(key).exists())
        return removed

    def _sweep_trash(self) -> list[str]:
        removed = []
        trash = self.root / "trash"
        for name in os.listdir(trash):
            _rmtree(trash / name)
            removed.append(f"trash/{name}")
        return removed

    # -- verify ------------------------------------------------------------------------------
    def verify(self, key: str | None = None) -> VerifyReport:
        """Re-hash entries (one, or all) against their manifests; report every changed, missing
        and extra file, extra directory (e.g. a `__pycache__` a server wrote) and writable mode."""
        report = VerifyReport()
        keys = [key] if key is not None else sorted(self._keys())
        for k in keys:
            d = self._entry_dir(k) if _KEY_RE.match(k) else None
            manifest = _read_manifest(d) if d is not None else None
            if manifest is None:
                if key is not None:
                    raise NotFound(f"no cache entry {k!r} in {self.root}")
                continue
            report.checked.append(k)
            report.mismatches += _verify_entry(k, d / "files", manifest)  # type: ignore[operator]
        for m in report.mismatches:
            log.warning("event=cache_verify_mismatch key=%s path=%s problem=%s", m.key, m.path, m.problem)
        return report

    # -- annotations -------------------------------------------------------------------------
    def get_meta(self, key: str) -> dict[str, Any]:
        """Annotations stored for `key` ({} when none)."""
        _check_key(key)
        try:
            return json.loads((self.root / "meta" / f"{key}.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def set_meta(self, key: str, data: Mapping[str, Any]) -> None:
        """Replace the annotations of `key` (atomic: readers see the old or the new file)."""
        _check_key(key)
        try:
            _atomic_write(self.root / "meta" / f"{key}.json", json.dumps(dict(data), sort_keys=True))
        except OSError as e:
            if e.errno not in _NO_SPACE:
                raise
            log.warning("event=cache_meta_write_failed key=%s error=%s action=skipped", key, e.strerror)


# -- helpers -------------------------------------------------------------------------------

def _sub_models(source: str | Mapping[str, str]) -> list[tuple[str, str]]:
    if isinstance(source, str):
        return [("", source)]
    if not isinstance(source, Mapping) or not source:
        raise BadURI(f"a source is a URI or a non-empty mapping of sub-model name to URI, got {type(source).__name__}")
    out = []
    for name, uri in source.items():
        if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
                or "\0" in name or name.startswith(".")):
            raise BadURI(f"invalid sub-model name {name!r}: one path segment, not hidden")
        if not isinstance(uri, str):
            raise BadURI(f"sub-model {name!r}: the URI must be a string")
        out.append((name, uri))
    return sorted(out)


def _key(listed: list[tuple[str, Source, Listing]], options: PullOptions) -> str:
    h = sha256(b"modelshelf-cache-key/1\n")
    for name, _src, listing in listed:
        h.update(f"sub\0{name}\n".encode())
        h.update(listing.identity().encode("utf-8", "surrogateescape"))
        if listing.archive and not options.extract_archives:
            h.update(b"\0no-extract")
        h.update(b"\n")
    return h.hexdigest()[:32]


def _mapping_label(uris: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"{n}: {u}" for n, u in sorted(uris.items())) + "}"


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"not a cache key: {key!r}")


def _safe_holder(holder: str) -> str:
    h = re.sub(r"[^A-Za-z0-9_.@\-]", "_", holder)[:200].lstrip(".")
    return h or "_"


def model_holder(holder: str, model: str) -> str:
    """The lease holder for one model served by `holder` (a pod): `<holder>@<model>`."""
    return _safe_holder(f"{holder}@{model}")


def _check_rel(path: str, uri: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise IntegrityError(f"{uri}: unsafe object path {path!r} from the source", uri=uri)


def _check_sizes(root: Path, listing: Listing) -> None:
    for o in listing.objects:
        try:
            size = (root / o.path).stat().st_size
        except FileNotFoundError:
            raise IntegrityError(f"{listing.uri}: {o.path} was not written by the download", uri=listing.uri) from None
        if size != o.size:
            raise IntegrityError(f"{listing.uri}: {o.path} has {size} bytes, the source listed {o.size}",
                                 uri=listing.uri)


def _check_digests(listing: Listing, digests: Mapping[str, str], options: PullOptions, single: bool) -> None:
    """The user's sha256 (single file/archive) and sha256 checksums given by the store."""
    if options.sha256 and single and len(listing.objects) == 1:
        got = digests[listing.objects[0].path]
        if got != options.sha256.lower():
            raise IntegrityError(f"{listing.uri}: sha256 mismatch (expected {options.sha256.lower()}, got {got})",
                                 uri=listing.uri)
    for o in listing.objects:
        if o.checksum and o.checksum.lower().startswith("sha256:") and o.path in digests:
            want = o.checksum.split(":", 1)[1].lower()
            if len(want) == 64 and want != digests[o.path]:
                raise IntegrityError(f"{listing.uri}: {o.path} does not match the store's sha256", uri=listing.uri)


def _sha256_file(path: Path) -> str:
    import hashlib  # OpenSSL's: large data (see puller.sources.base.sha256)

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verify_entry(k: str, files_dir: Path, manifest: Mapping[str, Any]) -> list[Mismatch]:
    out: list[Mismatch] = []
    expected = {f["path"]: f for f in manifest.get("files", [])}
    for rel, f in sorted(expected.items()):
        p = files_dir / rel
        try:
            st = p.lstat()
        except FileNotFoundError:
            out.append(Mismatch(k, rel, "missing"))
            continue
        if not stat.S_ISREG(st.st_mode):
            out.append(Mismatch(k, rel, "not a regular file any more"))
            continue
        if st.st_size != f["size"]:
            out.append(Mismatch(k, rel, f"size {st.st_size} != {f['size']}"))
            continue
        if "digest" in f and file_digest(p) != f["digest"]:
            out.append(Mismatch(k, rel, "content changed (digest differs)"))
        elif "sha256" in f and _sha256_file(p) != f["sha256"]:
            out.append(Mismatch(k, rel, "content changed (sha256 differs)"))
        if st.st_mode & 0o222:
            out.append(Mismatch(k, rel, f"writable (mode {stat.S_IMODE(st.st_mode):o})"))
    link_names = {lk["path"] for lk in manifest.get("links", [])}
    for lk in manifest.get("links", []):
        if not (files_dir / lk["path"]).exists():
            out.append(Mismatch(k, lk["path"], f"linked source {lk['target']} is gone"))
    dirs_expected = {""} | {rel.rsplit("/", 1)[0] if "/" in rel else "" for rel in expected}
    dirs_expected |= set(manifest.get("dirs", []))
    for rel in list(dirs_expected):
        while "/" in rel:
            rel = rel.rsplit("/", 1)[0]
            dirs_expected.add(rel)
    for root, dirs, names in os.walk(files_dir):
        rel_root = os.path.relpath(root, files_dir).replace(os.sep, "/")
        rel_root = "" if rel_root == "." else rel_root
        for x in list(dirs):
            rel = f"{rel_root}/{x}" if rel_root else x
            if rel in link_names or os.path.islink(os.path.join(root, x)):
                dirs.remove(x)
            elif rel not in dirs_expected:
                out.append(Mismatch(k, rel + "/", "extra directory, not in the manifest"))
        for n in names:
            rel = f"{rel_root}/{n}" if rel_root else n
            if rel not in expected and not os.path.islink(os.path.join(root, n)) and rel not in link_names:
                out.append(Mismatch(k, rel, "extra file, not in the manifest"))
    return out


def _read_manifest(d: Path) -> dict[str, Any] | None:
    try:
        with open(d / "manifest.json", "rb") as f:
            return json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except json.JSONDecodeError:
        log.warning("event=cache_bad_manifest path=%s", d)
        return None


def _entry_from_manifest(key: str, d: Path, m: Mapping[str, Any], hit: bool) -> Entry:
    files = tuple(f["path"] for f in m.get("files", []))
    files += tuple(lk["path"] + "/" for lk in m.get("links", []))
    size = int(m.get("total_bytes", 0)) + sum(int(lk.get("bytes", 0)) for lk in m.get("links", []))
    return Entry(key=key, path=d / "files", uri=m.get("uri", ""), size=size, files=files, in_place=False, hit=hit)


def _atomic_write(path: Path, text: str, fsync: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _touch(d: Path) -> None:
    try:
        os.utime(d, None)
    except OSError:
        pass  # a read-only root still serves hits; LRU order just does not move


def _make_read_only(root: Path) -> None:
    """Entry files 0444 (0555 if executable) and directories 0555, deepest first: nobody but
    root adds, removes or rewrites anything. Removal makes the tree writable again (_rmtree)."""
    for dirpath, dirs, names in os.walk(root, topdown=False):
        for n in names:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                os.chmod(p, 0o555 if st.st_mode & 0o111 else 0o444)
        for n in dirs:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                os.chmod(p, 0o555)
    os.chmod(root, 0o555)


def make_tree_writable(root: Path) -> None:
    """Directories u+w again (top down: a 0555 dir can be listed, not emptied) before removal."""
    try:
        if not os.path.islink(root):
            os.chmod(root, 0o755)
    except OSError:
        return
    for dirpath, dirs, _names in os.walk(root):
        for n in dirs:
            p = os.path.join(dirpath, n)
            try:
                if not os.path.islink(p):
                    os.chmod(p, 0o755)
            except OSError:
                pass


def _utc_now_iso() -> str:
    """Now in UTC, ISO 8601 to the second, as datetime.now(timezone.utc).isoformat(timespec=
    "seconds") writes it (without importing datetime: ~1.5 ms of a pull's finish)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


def _rmtree(path: Path) -> None:
    def onerror(func: Any, p: str, exc: Any) -> None:
        err = exc[1] if isinstance(exc, tuple) else exc
        if isinstance(err, FileNotFoundError):
            return
        if isinstance(err, PermissionError):  # a read-only dir inside an archive entry
            try:
                os.chmod(os.path.dirname(p), 0o755)
                func(p)
                return
            except OSError:
                pass
        log.warning("event=cache_rmtree_failed path=%s error=%s", p, type(err).__name__)
    import shutil  # (with bz2 and lzma: not on the way to a pull's first GET)

    make_tree_writable(path)
    shutil.rmtree(path, onerror=onerror)
