"""Progress sinks for pulls (the Progress protocol of puller.sources.base).

- `RichProgress`: a progress bar (bytes, rate, ETA) on a terminal.
- `LogProgress`: one structured log line per event: start, done (bytes, seconds, MiB/s), error.
`make_progress()` picks one. Both are thread-safe: sources call `advance` from many threads.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
TYPE_CHECKING = False  # not typing's: importing typing is ~2 ms of a CLI pull's start-up
if TYPE_CHECKING:
    from typing import IO

log = logging.getLogger("modelshelf.puller.progress")


class LogProgress:
    """Structured log lines, no per-chunk output."""

    def __init__(self, logger: logging.Logger | None = None):
        self._log = logger or log
        self._lock = threading.Lock()
        self._label = ""
        self._total = 0
        self._files = 0
        self._done = 0
        self._files_done = 0
        self._t0 = time.monotonic()
        self._finished = False

    def start(self, total_bytes: int, total_files: int, label: str) -> None:
        with self._lock:
            self._label, self._total, self._files = label, total_bytes, total_files
            self._done = self._files_done = 0
            self._t0 = time.monotonic()
            self._finished = False
        self._log.info("event=download_start uri=%s bytes=%d files=%d", label, total_bytes, total_files)

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes

    def file_done(self, path: str) -> None:
        with self._lock:
            self._files_done += 1

    def finish(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
            secs = time.monotonic() - self._t0
            done, files, label = self._done, self._files_done, self._label
        self._log.info("event=download_done uri=%s bytes=%d files=%d seconds=%.3f mib_s=%.1f",
                       label, done, files, secs, done / 2**20 / max(secs, 1e-9))

    def error(self, message: str) -> None:
        with self._lock:
            self._finished = True
            secs = time.monotonic() - self._t0
            done, label = self._done, self._label
        self._log.error("event=download_error uri=%s bytes=%d seconds=%.3f error=%s", label, done, secs,
                        message.replace("\n", " "))

    @property
    def bytes_done(self) -> int:
        with self._lock:
            return self._done


class RichProgress(LogProgress):
    """A rich progress bar on stderr; start/done/error still go to the log."""

    def __init__(self, stream: IO[str] | None = None, logger: logging.Logger | None = None):
        super().__init__(logger)
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                             TransferSpeedColumn(), TimeRemainingColumn(),
                             console=Console(file=stream or sys.stderr), transient=False)
        self._task: int | None = None

    def start(self, total_bytes: int, total_files: int, label: str) -> None:
        super().start(total_bytes, total_files, label)
        with self._lock:
            if self._task is None:
                self._bar.start()
                self._task = self._bar.add_task(_short(label), total=total_bytes or None)

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        task = self._task
        if task is not None:
            self._bar.advance(task, nbytes)

    def finish(self) -> None:
        self._stop()
        super().finish()

    def error(self, message: str) -> None:
        self._stop()
        super().error(message)

    def _stop(self) -> None:
        with self._lock:
            if self._task is not None:
                self._bar.stop()
                self._task = None


def make_progress(enabled: bool = True, stream: IO[str] | None = None) -> LogProgress:
    """A bar when `enabled` and the stream (stderr) is a terminal, else log lines."""
    stream = stream or sys.stderr
    if enabled and getattr(stream, "isatty", lambda: False)():
        return RichProgress(stream)
    return LogProgress()


def _short(label: str, width: int = 40) -> str:
    return label if len(label) <= width else "..." + label[-(width - 3):]
