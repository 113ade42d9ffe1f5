"""`modelshelf pull URI DEST` and `modelshelf cache ls|gc|verify` (argparse in agent/cli.py).

`pull` is a drop-in for KServe's storage-initializer and Seldon's rclone initializer (URI,
then destination). DEST gets the model files. With --cache-dir, DEST gets its OWN copies of the
cache entry's files: a reflink (FICLONE) where the file system shares blocks, else
copy_file_range (in-kernel, no user-space pass over the bytes), else a plain copy. A server that
runs as root ignores file modes, so a hard link would let it rewrite the shared, immutable
entry; `--link` (read-only hard links) is an explicit opt-in for consumers that do not run as
root. Without --cache-dir the files are downloaded through a throw-away (scratch) cache next to
DEST, which records no digests and leaves them writable, and moved in: the whole tree in one
rename when DEST does not exist yet, else file by file (an existing DEST keeps its inode and
mode). Exit codes: 0 ok, 2 usage / bad URI, 3 not found,
4 access denied, 5 integrity failure or unsafe archive, 6 transient failure outlasting retries,
1 anything else; the one-line error on stderr names the URI with credentials redacted. Known
secrets (credential env vars, header values, storage-config / .s3cfg keys) are masked in every
line this command prints.
"""
from __future__ import annotations

import argparse
import atexit
import errno
import gc
import os
import re
import sys
import time
from pathlib import Path
from collections.abc import Iterable
TYPE_CHECKING = False  # not typing's: importing typing is ~2 ms of a CLI pull's start-up
if TYPE_CHECKING:
    import logging
    from typing import Any

    from puller.cache import Cache, Entry
    from puller.sources.base import Listing, Source

# The cache (and what only it needs: tempfile, shutil, datetime...) and the progress sinks are
# imported where used: a pull imports them after its listing's requests are on the wire (_opened)
from puller.errors import BadURI, PullError
from puller.logs import configure_first, configure_now, forget, get_logger
from puller.sources.base import PullOptions, open_source
from puller.uri import redact

log = get_logger("modelshelf.puller.cli")  # logging imported on first use (puller.logs)

_SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|AUTH|_KEY$|_KEY_ID$|APIKEY|SIGNATURE", re.I)
_NOT_SECRET_ENV = re.compile(r"(_FILE|_PATH|_DIR|_URL|_ENDPOINT|_REGION|_PROVIDER|_TYPE)$", re.I)
_UNITS = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30,
          "TiB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def main(args: argparse.Namespace) -> int:
    """Run `pull` or `cache ...`; returns the exit code."""
    scrubber = _Scrubber()
    scrubber.add_env(os.environ)
    # the handler (and logging's import, ~6 ms) when something first logs: a pull configures it
    # once its listing's requests are on the wire (_pull), before the cache is imported
    setup = lambda: _setup_logging(scrubber)  # noqa: E731
    configure_first(setup)
    threshold = _quiet_gc()
    try:
        if args.command == "pull":
            return _pull(args, scrubber)
        if args.command == "cache":
            return _cache(args, scrubber)
        _fail(scrubber, f"modelshelf: unknown command {args.command!r}")
        return 2
    finally:
        gc.set_threshold(*threshold)
        forget(setup)  # (never run: nothing logged)
        _remove_filter(scrubber)


_freeze_registered = False


def _quiet_gc() -> tuple[int, ...]:
    """Fewer cyclic-GC passes while this command runs, none over its objects at exit.

    botocore builds large object graphs when it loads its models, and the default thresholds
    ran ~15% of a short pull's CPU in gc passes over them, plus a full pass at interpreter exit
    (~0.1 s of CPU together, measured). The threshold is restored on return; the freeze runs only
    at exit (objects alive then are not collected by the final pass; nothing here relies on it).
    Returns the previous thresholds.
    """
    global _freeze_registered
    old = gc.get_threshold()
    gc.set_threshold(max(old[0], 20_000), *old[1:])
    if not _freeze_registered:
        atexit.register(gc.freeze)
        _freeze_registered = True
    return old


# -- pull --------------------------------------------------------------------------------------

def _pull(args: argparse.Namespace, scrubber: "_Scrubber") -> int:
    shown = redact(args.uri)
    t0 = time.monotonic()
    try:
        options = _options(args, scrubber)
        dest = Path(args.dest)
        # without a cache, the first GETs go out as soon as the listing is known (_fetch_ahead)
        src = _opened(args.uri, options, fetch_ahead=not args.cache_dir)
        try:
            listing = None if args.cache_dir else _fetch_ahead(src, dest)
            configure_now()
            from puller.progress import make_progress

            progress = make_progress(enabled=not args.no_progress)
            if args.cache_dir:
                from puller.cache import Cache

                entry = Cache(args.cache_dir).ensure_source(src, options, progress)
                mode = "link" if getattr(args, "link", False) and not entry.in_place else "copy"
                if mode == "link" and os.geteuid() == 0:
                    log.warning("event=pull_link_as_root dest=%s risk=a_root_process_writing_DEST_rewrites_the_cache_entry",
                                dest)
                _place(entry, dest, mode)
            else:
                entry = _pull_uncached(src, listing, dest, options, progress)
        finally:
            src.close()  # (the cache closed it already, unless an error came first)
        log.info("event=pull_done uri=%s dest=%s files=%d bytes=%d cache=%s seconds=%.3f", entry.uri, dest,
                 len(entry.files), entry.size, "in_place" if entry.in_place else ("hit" if entry.hit else "miss"),
                 time.monotonic() - t0)
        return 0
    except PullError as e:
        msg = str(e)
        if shown not in msg and (e.uri is None or e.uri not in msg):
            msg = f"{shown}: {msg}"
        _fail(scrubber, f"modelshelf pull: {msg}")
        return e.exit_code
    except KeyboardInterrupt:
        _fail(scrubber, f"modelshelf pull: {shown}: interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - one line, exit 1, never a traceback with secrets
        _fail(scrubber, f"modelshelf pull: {shown}: {type(e).__name__}: {e}")
        return 1


def _options(args: argparse.Namespace, scrubber: "_Scrubber") -> PullOptions:
    headers: dict[str, str] = {}
    for item in args.header or []:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise BadURI(f"--header wants NAME:VALUE, got a value without ':' ({len(item)} characters)")
        headers[name.strip()] = value.strip()
        scrubber.add(value.strip())
        scrubber.add_words(value)
    scrubber.add_uri(args.uri)
    options = PullOptions(sha256=(args.sha256 or None), storage_key=args.storage_key, headers=headers)
    if args.sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", args.sha256):
        raise BadURI(f"--sha256 wants 64 hex digits, got {len(args.sha256)} characters")
    if args.storage_config_dir:
        options.storage_config_dir = Path(args.storage_config_dir)
    if args.pvc_root:
        options.pvc_root = Path(args.pvc_root)
    scrubber.add_storage_config(options.storage_config_dir)
    scrubber.add_s3cfg(options.s3cfg)
    return options


def _opened(uri: str, options: PullOptions, fetch_ahead: bool = False) -> Source:
    """The source of `uri` with its listing's requests sent (S3: the HEAD and the first LIST
    page): the store works on them while this process goes on, instead of after. Nothing but
    what the request needs is imported before (the module-list test in
    tests/puller_sources/test_s3_wire.py pins that). `fetch_ahead`: see _fetch_ahead."""
    src = open_source(uri, options)
    try:
        src.begin_list(fetch_ahead)
    except BaseException:
        src.close()
        raise
    return src


def _fetch_ahead(src: Source, dest: Path) -> Listing:
    """The drop-in's listing, and its first GETs sent at once (`begin_fetch`): the store sends
    the first bytes while this process imports the cache and makes its scratch root (the
    interpreter's start-up and those imports were most of the CLI's lag behind s5cmd, pull.notes.md
    "pull9"). Before any GET leaves, DEST's file system must have room for the listed bytes
    (statvfs): a disk too full fails here, with nothing fetched. The space itself is still
    reserved (fallocate) before the first byte is written; answers never read are dropped unread."""
    listing = src.list()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if listing.local_path is None:
        _check_space(dest.parent, listing.total_bytes, listing.uri)
        src.begin_fetch(listing)
    return listing


def _check_space(directory: Path, need: int, uri: str) -> None:
    """Raise PullError when `directory`'s file system has fewer than `need` bytes free for this
    user (root may use the reserved blocks too). A file system that reports no size (some
    network and FUSE ones) is not checked: fallocate still is, before the first write."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return
    if st.f_blocks == 0:
        return
    free = st.f_frsize * (st.f_bfree if os.geteuid() == 0 else st.f_bavail)
    if need > free:
        raise PullError(f"{uri}: no space left on device: {need} bytes to fetch, {free} free in {directory}",
                        uri=uri)


def _pull_uncached(src: Source, listing: Listing | None, dest: Path, options: PullOptions, progress: Any) -> Entry:
    """Download through a throw-away (scratch) cache next to DEST (same file system: files are
    moved; when DEST does not exist yet, the whole tree in one rename). `listing`: src's, when
    known already (_fetch_ahead)."""
    from puller.cache import Cache

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp_root = _private_dir(dest.parent, ".modelshelf-pull-")
    except OSError:
        import tempfile

        tmp_root = Path(tempfile.mkdtemp(prefix="modelshelf-pull-"))
    try:
        entry = Cache(tmp_root, scratch=True).ensure_source(src, options, progress, listing=listing)
        if entry.in_place:
            _place(entry, dest, "copy")
        elif not _rename_tree(Path(entry.path), dest):
            _place(entry, dest, "move")
        return entry
    finally:
        _remove_tree(tmp_root)


def _remove_tree(root: Path) -> None:
    """Remove the scratch root, bottom up, without importing shutil (with bz2 and lzma: ~2.5 ms
    of a pull's finish); anything else than plain writable directories, files and links (a
    read-only directory from an archive, a file that will not go) is left to shutil.rmtree,
    as before, after the directories are made writable again."""
    try:
        for dirpath, dirs, names in os.walk(root, topdown=False):
            for name in names:
                os.unlink(os.path.join(dirpath, name))
            for name in dirs:  # (links to directories are listed here, not followed)
                path = os.path.join(dirpath, name)
                os.unlink(path) if os.path.islink(path) else os.rmdir(path)
        os.rmdir(root)
    except OSError:
        import shutil

        from puller.cache import make_tree_writable

        make_tree_writable(root)
        shutil.rmtree(root, ignore_errors=True)


def _private_dir(parent: Path, prefix: str) -> Path:
    """A new directory only this user can enter (0700) under `parent`, named `prefix` + 12 random
    hex digits: tempfile.mkdtemp's promise without importing tempfile (with shutil, bz2, lzma and
    random: ~4 ms on the way to a pull's first GET)."""
    for _ in range(100):
        path = parent / f"{prefix}{os.urandom(6).hex()}"
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no unused name for a directory {prefix}* in {parent}")


def _rename_tree(src: Path, dest: Path) -> bool:
    """Move a scratch entry's files directory to DEST in one rename when DEST does not exist
    (an existing DEST, even an empty one, keeps its own inode, mode and mount: False)."""
    if os.path.lexists(dest):
        return False
    try:
        os.rename(src, dest)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EXDEV, errno.ENOTDIR, errno.EBUSY):
            return False  # DEST appeared meanwhile, or another file system: file by file
        raise
    return True


def _place(entry: Entry, dest: Path, mode: str) -> None:
    """Put the entry's files under DEST: mode 'copy' (reflink / copy_file_range / copy), 'link'
    (read-only hard link, copy as fallback), 'move'."""
    dest.mkdir(parents=True, exist_ok=True)
    src = Path(entry.path)
    if src.is_file():
        _place_file(src, dest / src.name, mode)
        return
    _place_dir(str(src), str(dest), mode)


def _place_dir(src: str, out: str, mode: str) -> None:
    # scandir's entry types come with the listing: one syscall per file (the link) on a fresh DEST
    with os.scandir(src) as it:
        entries = list(it)
    for e in entries:
        target = os.path.join(out, e.name)
        if e.is_symlink():  # a linked local sub-model or an archive's link: keep the link
            _replace_with_symlink(os.readlink(e.path), Path(target))
        elif e.is_dir():
            os.makedirs(target, exist_ok=True)
            _place_dir(e.path, target, mode)
        else:
            _place_file(Path(e.path), Path(target), mode)


def _place_file(src: Path, out: Path, mode: str) -> None:
    if mode == "link":
        try:
            os.link(src, out)
            return
        except FileExistsError:
            pass  # replace what is there (below)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.ENOTSUP):
                raise
    if out.is_symlink() or out.exists():
        if out.is_dir() and not out.is_symlink():
            raise PullError(f"cannot place {src.name}: {out} is a directory")
        out.unlink()
    if mode == "link":
        try:
            os.link(src, out)
            return
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.ENOTSUP):
                raise
    elif mode == "move":  # from a scratch entry: files are writable already
        try:
            os.rename(src, out)
            return
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
    copy_file(src, out)
    os.chmod(out, _writable(src))


_FICLONE = 0x40049409  # ioctl(dest_fd, FICLONE, src_fd): share the blocks (btrfs, XFS, bcachefs...)
_NO_FAST_COPY = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTTY, errno.EPERM,
                 errno.EBADF, errno.ETXTBSY)


def copy_file(src: Path | str, out: Path | str) -> str:
    """Copy `src` to a new, independent `out`; returns how: 'reflink' (blocks shared copy-on-write),
    'copy_file_range' (copied in the kernel) or 'copy' (read/write)."""
    import fcntl
    import shutil

    with open(src, "rb") as fi, open(out, "wb") as fo:
        try:
            fcntl.ioctl(fo.fileno(), _FICLONE, fi.fileno())
            return "reflink"
        except OSError as e:
            if e.errno not in _NO_FAST_COPY:
                raise
        size = os.fstat(fi.fileno()).st_size
        done = 0
        try:
            while done < size:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), size - done)
                if n == 0:
                    break
                done += n
            if done == size:
                return "copy_file_range"
        except OSError as e:
            if e.errno not in _NO_FAST_COPY:
                raise
    shutil.copyfile(src, out)
    return "copy"


def _writable(p: Path) -> int:
    return 0o755 if os.stat(p).st_mode & 0o111 else 0o644


def _replace_with_symlink(target: str, out: Path) -> None:
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif out.is_dir():
        import shutil

        shutil.rmtree(out)
    os.symlink(target, out)


# -- cache ls | gc | verify ----------------------------------------------------------------------

def _cache(args: argparse.Namespace, scrubber: "_Scrubber") -> int:
    configure_now()
    from puller.cache import Cache

    try:
        cache = Cache(args.cache_dir)
        if args.cache_command == "ls":
            return _cache_ls(cache, args.json)
        if args.cache_command == "gc":
            try:
                budget = parse_bytes(args.max_cache_bytes)
            except ValueError as e:
                _fail(scrubber, f"modelshelf cache gc: {e}")
                return 2
            report = cache.gc(budget)
            for info in report.removed:
                print(f"removed {info.key} {_human(info.size)} {info.uri}")
            print(f"freed {_human(report.freed)}; {_human(report.bytes_after)} in cache, budget {_human(budget)}"
                  + (f"; {len(report.in_use)} entries in use kept" if report.in_use else "")
                  + ("" if report.within_budget else "; STILL OVER BUDGET"))
            return 0
        if args.cache_command == "verify":
            report = cache.verify(args.key)
            if args.json:
                import json

                print(json.dumps({"checked": report.checked, "ok": report.ok,
                                  "mismatches": [m.__dict__ for m in report.mismatches]}, indent=1))
            else:
                for m in report.mismatches:
                    print(f"MISMATCH {m.key} {m.path}: {m.problem}")
                print(f"verified {len(report.checked)} entries: "
                      + ("ok" if report.ok else f"{len(report.mismatches)} mismatches"))
            return 0 if report.ok else 5
    except PullError as e:
        _fail(scrubber, f"modelshelf cache {args.cache_command}: {e}")
        return e.exit_code
    except OSError as e:
        _fail(scrubber, f"modelshelf cache {args.cache_command}: {args.cache_dir}: {e.strerror or e}")
        return 1
    _fail(scrubber, f"modelshelf cache: unknown subcommand {args.cache_command!r}")
    return 2


def _cache_ls(cache: "Cache", as_json: bool) -> int:
    infos = cache.ls()
    if as_json:
        import json

        print(json.dumps([{"key": i.key, "path": str(i.path), "uri": i.uri, "size": i.size, "files": i.files,
                           "created": i.created, "last_used": i.last_used, "leases": list(i.leases)}
                          for i in infos], indent=1))
        return 0
    rows = [("KEY", "SIZE", "FILES", "LAST USED", "LEASES", "URI")]
    for i in reversed(infos):  # most recently used first
        rows.append((i.key, _human(i.size), str(i.files), _when(i.last_used), ",".join(i.leases) or "-", i.uri))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in range(5)) + "  " + r[5])
    return 0


def parse_bytes(value: str) -> int:
    """Bytes from 1048576, 512Mi, 50Gi, 1G. Raises ValueError naming the value."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"not a byte quantity: {value!r} (expected e.g. 512Mi, 50Gi, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(ts: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- output hygiene ----------------------------------------------------------------------------

class _Scrubber:
    """Masks known secret values in log records (a logging filter: any object with `filter`)
    and in the CLI's own error lines."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self.handlers: list[logging.Handler] = []

    def add(self, value: str | None) -> None:
        if value and len(value) >= 6:
            self._secrets.add(value)

    def add_words(self, value: str) -> None:
        for word in re.split(r"[\s,;]+", value):
            self.add(word)

    def add_env(self, env: Iterable[str] | dict[str, str]) -> None:
        for name, value in dict(env).items():
            if _SECRET_ENV.search(name) and not _NOT_SECRET_ENV.search(name):
                self.add(value)

    def add_uri(self, uri: str) -> None:
        m = re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://([^/@?#]*)@", uri)
        if m:
            user, _, password = m.group(1).partition(":")
            self.add(password)
            self.add(user if password == "" else None)
        for pm in re.finditer(r"[?&;][^=&#]*=([^&#]*)", uri):
            if pm.group(1) and f"={pm.group(1)}" not in redact(uri):
                self.add(pm.group(1))

    def add_storage_config(self, directory: Path | None) -> None:
        if not directory:
            return
        import json

        try:
            for p in Path(directory).iterdir():
                try:
                    data = json.loads(p.read_text())
                except (OSError, ValueError):
                    continue
                if isinstance(data, dict):
                    for k, v in data.items():
                        if isinstance(v, str) and re.search(r"secret|key|token|password", k, re.I):
                            self.add(v)
        except OSError:
            pass

    def add_s3cfg(self, path: Path | None) -> None:
        if not path:
            return
        import configparser

        cp = configparser.RawConfigParser()
        try:
            cp.read(path)
        except (OSError, configparser.Error):
            return
        for section in cp.sections():
            for k, v in cp.items(section):
                if re.search(r"secret|key|token|password", k, re.I):
                    self.add(v)

    def scrub(self, text: str) -> str:
        for s in sorted(self._secrets, key=len, reverse=True):
            if s in text:
                text = text.replace(s, "***")
        return redact(text)

    def filter(self, record: logging.LogRecord) -> bool:
        import logging

        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is still logged, scrubbed
            message = str(record.msg)
        record.msg, record.args = self.scrub(message), None
        if record.exc_info:
            record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def _setup_logging(scrubber: _Scrubber) -> None:
    import logging

    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)
        if root.level == logging.WARNING:
            root.setLevel(logging.INFO)
    for h in root.handlers:
        h.addFilter(scrubber)
        scrubber.handlers.append(h)


def _remove_filter(scrubber: _Scrubber) -> None:
    for h in scrubber.handlers:
        h.removeFilter(scrubber)


def _fail(scrubber: _Scrubber, message: str) -> None:
    line = scrubber.scrub(" ".join(message.split()))
    print(line, file=sys.stderr, flush=True)


__all__ = ["main", "parse_bytes"]
