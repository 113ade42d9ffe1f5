"""Watch the model-config directory and hand each new config to the caller.

A Kubernetes ConfigMap volume updates by writing a new `..<timestamp>` dir, pointing a
`..data_tmp` symlink at it and renaming that over `..data` (one atomic swap); `models.yaml` is a
symlink to `..data/models.yaml`. A watch on the file path sees nothing of that, so we watch the
DIRECTORY and react to events whose source or destination is `..data` or a config file name
(plain edits in a normal directory: created, modified, closed, moved, deleted).

Guarantees:
  * on_change / on_error are awaited on the event loop, one at a time, in order.
  * A burst of events coalesces into one reload: each event (re)arms a timer of `debounce_s`
    (capped at `max_delay_s` from the first event of the burst). A rename onto `..data` or onto a
    config name is complete by construction and arms only `settle_s` (a few ms).
  * A reload re-reads and hashes the file; an unchanged config calls nothing.
  * Every `resync_interval_s` the file is re-read anyway (catches anything the watch missed);
    `reload(force=True)` re-delivers the current config even when unchanged.
  * A file that does not parse, or is past a limit (`limits`: size, depth, values) goes to
    on_error (once per distinct error); the caller keeps its last good config. The next good
    read is delivered even if it equals the last good one.
  * A file that cannot be read changes nothing either. Once a config was delivered, an ABSENT
    config file is not "zero models": a delete + rewrite, a ConfigMap swapped to an empty
    payload, a directory recreated empty, a dangling or looping symlink, a directory under the
    name are all "unreadable". The watcher re-reads after `missing_grace_s`; if the file is
    back by then nothing is said (a rewrite with the same bytes calls nothing), else on_error
    gets "config file unreadable: ..." and the last good config stays. The explicit way to serve
    no models is a file with an empty list (`[]` or `models: []`). Before any config was
    delivered (start-up), a directory without a config file is the empty set, as ever, and an
    unreadable file is reported at once.
  * A missing directory (volume not mounted yet) is polled every `retry_interval_s`, said once
    in the log and once to on_error; when it appears it is watched and read.
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Awaitable, Callable

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from agent.config import (
    CONFIG_FILES, ConfigLimits, ConfigParseError, ConfigResult, ConfigUnreadable, RawConfig, parse_raw, read_config_dir,
)
from agent.logging import get_logger, kv

log = get_logger("modelshelf.watcher")

_EVENT_FILTER = [
    FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, FileMovedEvent, DirMovedEvent,
    FileDeletedEvent, DirDeletedEvent, FileClosedEvent,
]  # not opened / closed-without-write: our own reads must not wake us
_DATA = "..data"
_RELEVANT = frozenset((_DATA, *CONFIG_FILES))


def _read_and_parse(root: Path, limits: ConfigLimits, last_identity: tuple | None
                    ) -> tuple[RawConfig, ConfigResult | ConfigParseError | None]:
    """(In a thread.) The directory's config read, and parsed unless its identity is
    `last_identity` (None then). A parse error is returned, a read error raised."""
    raw = read_config_dir(root, limits)
    if raw.identity == last_identity:
        return raw, None
    try:
        return raw, parse_raw(raw, limits)
    except ConfigParseError as err:
        return raw, err


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's thread: filter, then hand over to the loop. Nothing else."""

    def __init__(self, watcher: ConfigWatcher, root: str):
        self._watcher = watcher
        self._root = root

    def on_any_event(self, event: FileSystemEvent) -> None:
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(getattr(event, "dest_path", "") or "")
        if event.event_type == "deleted" and src.rstrip("/") == self._root:
            self._watcher._from_thread(None)  # the directory itself went away
            return
        names = {os.path.basename(src), os.path.basename(dest)} if dest else {os.path.basename(src)}
        if not names & _RELEVANT:
            return
        atomic = event.event_type == "moved" and os.path.basename(dest) in _RELEVANT
        self._watcher._from_thread(atomic)


class ConfigWatcher:
    """Delivers the config of `config_dir` to `on_change` whenever it changes (see module doc)."""

    def __init__(
        self,
        config_dir: Path | str,
        on_change: Callable[[ConfigResult], Awaitable[None]],
        on_error: Callable[[ConfigParseError], Awaitable[None]],
        resync_interval_s: float = 60.0,
        debounce_s: float = 0.05,
        *,
        settle_s: float = 0.002,
        max_delay_s: float | None = None,
        retry_interval_s: float = 0.5,
        limits: ConfigLimits | None = None,
        missing_grace_s: float = 1.0,
    ):
        self.config_dir = Path(config_dir)
        self.on_change = on_change
        self.on_error = on_error
        self.resync_interval_s = resync_interval_s
        self.debounce_s = debounce_s
        self.settle_s = min(settle_s, debounce_s)
        self.max_delay_s = max_delay_s if max_delay_s is not None else max(10 * debounce_s, 0.5)
        self.retry_interval_s = retry_interval_s
        self.limits = limits or ConfigLimits()
        self.missing_grace_s = missing_grace_s
        self.last: ConfigResult | None = None  # the last config delivered to on_change
        self.reloads = 0  # reads of the directory (for tests and metrics)
        self.last_event_at: float | None = None  # time.monotonic() of the latest relevant event
        self._root = os.path.abspath(os.fspath(self.config_dir)).rstrip("/")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: Observer | None = None
        self._watch = None
        self._watched_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the watched dir
        self._lock = asyncio.Lock()
        self._last_key: tuple | None = None
        self._last_identity: tuple | None = None  # bytes of the last delivered config (skip re-parsing)
        self._last_error: tuple[str, str] | None = None
        self._missing_said = False
        self._arm_failed_said = False
        self._timer: asyncio.TimerHandle | None = None
        self._burst_start: float | None = None
        self._unreadable_since: float | None = None  # loop time the file was first seen unreadable
        self._recheck: asyncio.TimerHandle | None = None
        self._reload_wanted = asyncio.Event()
        self._check_dir = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Watch the directory (when it exists), read it once, and start the resync timer."""
        self._loop = asyncio.get_running_loop()
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.start()
        self._arm()  # watch first, then read: no change can fall between the two
        try:
            await self.reload()
        except BaseException:
            await self.stop()
            raise
        self._tasks = [
            asyncio.create_task(self._reloader(), name="config-reloader"),
            asyncio.create_task(self._supervisor(), name="config-supervisor"),
        ]
        log.info("config watcher started", extra=kv(dir=self._root, resync_s=self.resync_interval_s, debounce_s=self.debounce_s))

    async def stop(self) -> None:
        """Stop watching; no callback runs after this returns."""
        for timer in (self._timer, self._recheck):
            if timer is not None:
                timer.cancel()
        self._timer = self._recheck = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []
        observer, self._observer = self._observer, None
        self._watch = self._watched_id = None
        if observer is not None:
            observer.stop()
            await asyncio.to_thread(observer.join, 5.0)
        self._loop = None

    async def reload(self, force: bool = False) -> ConfigResult | None:
        """Re-read the directory now. Calls on_change when the config changed (or `force`),
        on_error when it does not parse. Returns what was delivered, else None.

        Callbacks run under the watcher's lock: they must not await reload() themselves."""
        async with self._lock:
            self.reloads += 1
            if not os.path.isdir(self._root):
                await self._dir_missing(force)
                return None
            if self._missing_said:
                log.info("config directory present", extra=kv(dir=self._root))
                self._missing_said = False
            root = Path(self._root)
            last_identity = None if force else self._last_identity
            try:  # read, and parse unless the bytes are those delivered last: one thread hop
                raw, parsed = await asyncio.to_thread(_read_and_parse, root, self.limits, last_identity)
                if raw.file is None and self.last is not None and self.last.file is not None:
                    raise ConfigUnreadable(self.last.file, (
                        f"config file unreadable: it is gone (none of {', '.join(CONFIG_FILES)} in the directory; "
                        "a file with an empty list serves no models)"))
            except ConfigUnreadable as err:
                if self._still_settling(force, err):
                    return None
                await self._failed(err, force)
                return None
            except ConfigParseError as err:
                self._unreadable_since = None
                await self._failed(err, force)
                return None
            self._unreadable_since = None
            if isinstance(parsed, ConfigParseError):
                await self._failed(parsed, force)
                return None
            if parsed is None:
                return None  # same bytes as the last delivered config: nothing to parse
            result = parsed
            key = (result.file, result.digest, result.errors)
            if not force and key == self._last_key:
                return None
            await self.on_change(result)
            self._last_key, self._last_error, self.last = key, None, result
            self._last_identity = raw.identity
            return result

    async def _failed(self, err: ConfigParseError, force: bool) -> None:
        """The caller keeps its last good config; on_error hears each distinct error once."""
        key = (err.file, err.reason)
        self._last_key = self._last_identity = None  # the next good read is delivered, even if it equals the last good
        if force or key != self._last_error:
            self._last_error = key
            log.debug("config not applied", extra=kv(file=err.file, reason=err.reason))  # on_error logs it
            await self.on_error(err)

    def _still_settling(self, force: bool, err: ConfigUnreadable) -> bool:
        """True while an unreadable file is given `missing_grace_s` to come back (a delete +
        rewrite, a non-atomic swap); a re-read is scheduled for when the grace ends."""
        if self.last is None or self.last.file is None or force or self._loop is None:
            return False  # no file was ever delivered: nothing to protect, say it at once
        now = self._loop.time()
        if self._unreadable_since is None:
            self._unreadable_since = now
            log.info("config file unreadable; re-reading before reporting it",
                     extra=kv(dir=self._root, reason=err.reason, grace_s=self.missing_grace_s))
        left = self._unreadable_since + self.missing_grace_s - now
        if left <= 0:
            return False
        if self._recheck is None or self._recheck.when() < now:
            self._recheck = self._loop.call_later(left, self._reload_wanted.set)
        return True

    # ------------------------------------------------------------------ internals
    async def _dir_missing(self, force: bool) -> None:
        self._disarm()
        self._check_dir.set()  # the supervisor polls until it appears
        if self._missing_said and not force:
            return
        self._missing_said = True
        self._last_key = self._last_identity = None
        err = ConfigParseError(self._root, "config directory does not exist (yet); waiting for it, keeping the last good config")
        self._last_error = (err.file, err.reason)
        log.warning("config directory missing; will retry", extra=kv(dir=self._root, retry_s=self.retry_interval_s))
        await self.on_error(err)

    def _arm(self) -> bool:
        """Watch the directory if it exists and is not watched yet (or was replaced)."""
        try:
            st = os.stat(self._root)
        except OSError:
            self._disarm()
            return False
        ident = (st.st_dev, st.st_ino)
        if self._watch is not None and ident == self._watched_id:
            return False
        self._disarm()
        if self._observer is None:
            return False
        try:
            self._watch = self._observer.schedule(_Handler(self, self._root), self._root, recursive=False, event_filter=_EVENT_FILTER)
        except OSError as exc:  # vanished between stat and watch, or out of inotify watches
            if not self._arm_failed_said:
                self._arm_failed_said = True
                log.warning("cannot watch config directory; resync only until it can", extra=kv(dir=self._root, error=exc))
            return False
        self._watched_id = ident
        self._arm_failed_said = False
        return True

    def _disarm(self) -> None:
        watch, self._watch, self._watched_id = self._watch, None, None
        if watch is not None and self._observer is not None:
            try:
                self._observer.unschedule(watch)
            except (KeyError, OSError):
                pass

    def _from_thread(self, atomic: bool | None) -> None:
        """Called on watchdog's thread. atomic=None: the directory itself was deleted."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._on_event, atomic)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _on_event(self, atomic: bool | None) -> None:
        if self._loop is None:
            return
        self.last_event_at = time.monotonic()
        if atomic is None:  # the watched directory went away: whatever is there next needs a new watch,
            self._watched_id = None  # even one that got the same inode number back
            self._check_dir.set()
            atomic = False
        now = self._loop.time()
        if self._burst_start is None:
            self._burst_start = now
        delay = self.settle_s if atomic else self.debounce_s
        deadline = min(now + delay, self._burst_start + self.max_delay_s)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._burst_start = None
        self._reload_wanted.set()

    async def _reloader(self) -> None:
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            await self._safe_reload()

    async def _supervisor(self) -> None:
        """Periodic resync; polls for the directory while it is missing or not watched."""
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + self.resync_interval_s
        while True:
            watched = self._watch is not None
            timeout = max(0.0, next_resync - loop.time())
            if not watched:
                timeout = min(timeout, self.retry_interval_s)
            try:
                await asyncio.wait_for(self._check_dir.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            self._check_dir.clear()
            if self._arm():  # (re)appeared: read it now
                log.info("watching config directory", extra=kv(dir=self._root))
                await self._safe_reload()
            if loop.time() >= next_resync:
                next_resync = loop.time() + self.resync_interval_s
                self._arm()  # a replaced directory needs a new watch
                await self._safe_reload()

    async def _safe_reload(self) -> None:
        try:
            await self.reload()
        except asyncio.CancelledError:
            raise
        except Exception:  # a failing callback must not stop the watcher; the next resync retries
            log.exception("config callback failed; will retry at the next change or resync", extra=kv(dir=self._root))
