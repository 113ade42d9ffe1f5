"""Loggers that import `logging` when they are first used, not when their module is imported.

`modelshelf pull` sends its first request before logging is imported: logging brings traceback,
tokenize, textwrap and string (~6 ms of a CLI pull's start-up, pull7), and the modules on the
path to the first request (puller.cli, puller.credentials, puller.retry, puller.sources.s3 and
s3_wire) log only on a retry, an error or after their answer. They take their logger from
`get_logger`; modules imported after the first request (the cache, the progress sinks) use
logging directly.

A program that configures logging for these loggers (the CLI's handler, which masks secrets)
registers it with `configure_first`: it runs once, before the first record of a lazy logger
is made, or when `configure_now` is called (the CLI calls it before importing anything that
logs through logging itself), or at once when logging is imported already. A thread that first
uses a lazy logger while another runs the setups waits for them: no record is made before the
program's handler is in place (logging's last resort would drop INFO and mask no secret).
"""
from __future__ import annotations

import sys
import threading

TYPE_CHECKING = False  # not typing's: see puller.cli
if TYPE_CHECKING:
    from collections.abc import Callable
    from logging import Logger

_pending: list[Callable[[], None]] = []
_configuring = threading.RLock()  # held while the setups run (re-entrant: a setup may log)


class LazyLogger:
    """`logging.getLogger(name)`, made on first use (any attribute: info, warning, ...)."""

    __slots__ = ("name", "_logger")

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger: Logger | None = None

    def __getattr__(self, attr: str):
        logger = self._logger
        if logger is None:
            configure_now()
            import logging

            logger = self._logger = logging.getLogger(self.name)
        return getattr(logger, attr)


def get_logger(name: str) -> LazyLogger:
    """A logger named `name` (modelshelf.*) that imports logging on its first use."""
    return LazyLogger(name)


def configure_first(setup: Callable[[], None]) -> None:
    """Run `setup` before any lazy logger is first used (at once if logging is imported already:
    then configuring costs nothing more)."""
    _pending.append(setup)
    if "logging" in sys.modules:
        configure_now()


def forget(setup: Callable[[], None]) -> None:
    """Drop `setup` if it has not run (its program is done: nothing logged)."""
    with _configuring:
        if setup in _pending:
            _pending.remove(setup)


def configure_now() -> None:
    """Run the setups `configure_first` holds (each once); returns when they have run, also when
    another thread is running them."""
    with _configuring:
        while _pending:
            _pending.pop(0)()


__all__ = ["LazyLogger", "configure_first", "configure_now", "forget", "get_logger"]
