"""Retry transient failures with exponential backoff and full jitter, within a total deadline.

Only errors that `is_transient` accepts are retried; anything else propagates at once. When the
deadline would be passed, the last transient error is raised as puller.errors.TransientError
(chained), with a message naming what was attempted (the caller passes a redacted description).
"""
from __future__ import annotations

import time
from collections.abc import Callable
TYPE_CHECKING = False  # not typing's: importing typing is ~2 ms of a CLI pull's start-up
if TYPE_CHECKING:
    import random
    from typing import TypeVar

    T = TypeVar("T")

from puller.errors import TransientError
from puller.logs import get_logger

log = get_logger("modelshelf.puller.retry")  # logging imported on first use (puller.logs)


def backoff_delays(base_s: float = 0.2, cap_s: float = 10.0, rng: random.Random | None = None):
    """Endless full-jitter delays: uniform(0, min(cap, base * 2**attempt)). random is imported at
    the first delay asked for: a pull whose requests all succeed never does (~1 ms of start-up)."""
    if rng is None:
        import random as rng
    attempt = 0
    while True:
        yield rng.uniform(0, min(cap_s, base_s * (2 ** attempt)))
        attempt += 1


def call_with_retry(
    fn: Callable[[], T],
    *,
    is_transient: Callable[[BaseException], bool],
    deadline_s: float,
    what: str,
    base_s: float = 0.2,
    cap_s: float = 10.0,
    describe: Callable[[BaseException], str] = lambda e: f"{type(e).__name__}: {e}",
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `fn()`; on a transient error sleep and retry until `deadline_s` after the first failure.

    `what` names the operation for logs and the final error and must already be redacted.
    `describe` renders a cause for logs (override it to scrub secrets from foreign messages).
    """
    delays = backoff_delays(base_s, cap_s)
    deadline: float | None = None
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except BaseException as e:  # noqa: BLE001 - filtered right below
            if not is_transient(e):
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + deadline_s
            delay = next(delays)
            if now + delay > deadline:
                raise TransientError(
                    f"{what}: still failing after {attempt} attempts within {deadline_s:g}s: {describe(e)}"
                ) from e
            log.info("event=retry what=%s attempt=%d wait_s=%.2f cause=%s", what, attempt, delay, describe(e))
            sleep(delay)
