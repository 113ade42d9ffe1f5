"""Backoff with full jitter within a deadline; only transient errors are retried."""
from __future__ import annotations

import time

import pytest

from puller.errors import TransientError
from puller.retry import backoff_delays, call_with_retry


class Flaky(Exception):
    pass


def test_transient_errors_retry_until_success() -> None:
    calls = []

    def fn() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise Flaky("boom")
        return "ok"

    assert call_with_retry(fn, is_transient=lambda e: isinstance(e, Flaky), deadline_s=5, what="op",
                           base_s=0.001) == "ok"
    assert len(calls) == 3


def test_permanent_errors_fail_at_once() -> None:
    calls = []

    def fn() -> None:
        calls.append(1)
        raise ValueError("permanent")

    with pytest.raises(ValueError):
        call_with_retry(fn, is_transient=lambda e: isinstance(e, Flaky), deadline_s=5, what="op", base_s=0.001)
    assert len(calls) == 1


def test_deadline_bounds_total_time_and_names_the_operation() -> None:
    def fn() -> None:
        raise Flaky("still down")

    t0 = time.monotonic()
    with pytest.raises(TransientError) as exc:
        call_with_retry(fn, is_transient=lambda e: True, deadline_s=0.3, what="GET s3://b/k", base_s=0.05, cap_s=0.1)
    assert time.monotonic() - t0 < 0.6
    assert "GET s3://b/k" in str(exc.value) and "still down" in str(exc.value)
    assert exc.value.exit_code == 6


def test_full_jitter_delays_grow_exponentially_up_to_the_cap() -> None:
    gen = backoff_delays(base_s=1.0, cap_s=8.0)
    delays = [next(gen) for _ in range(200)]
    assert all(0 <= d <= 8.0 for d in delays)
    assert max(delays[:1]) <= 1.0 and max(delays[100:]) > 4.0  # capped, not stuck at the base
