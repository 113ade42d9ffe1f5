"""Errors of the puller: a small hierarchy, each with the CLI exit code it maps to.

Every message names the URI with credentials redacted (see puller.uri.redact) and the cause.
"""
from __future__ import annotations


class PullError(Exception):
    """Base class. `exit_code` is what `modelshelf pull` exits with."""

    exit_code = 1

    def __init__(self, message: str, *, uri: str | None = None):
        super().__init__(message)
        self.uri = uri  # always redacted by whoever raises


class BadURI(PullError):
    """The URI does not parse, names an unknown scheme, or a required option is missing."""

    exit_code = 2


class NotFound(PullError):
    """The object, prefix, bucket or file does not exist (404, NoSuchBucket, empty prefix)."""

    exit_code = 3


class AccessDenied(PullError):
    """Credentials were refused (401, 403, InvalidAccessKeyId, SignatureDoesNotMatch)."""

    exit_code = 4


class IntegrityError(PullError):
    """Bytes on disk do not match the size, sha256 or store checksum they must have."""

    exit_code = 5


class UnsafeArchive(PullError):
    """An archive member escapes the destination, is a device/link out, or exceeds the cap."""

    exit_code = 5


class TransientError(PullError):
    """A retryable failure (5xx, reset, timeout) that outlasted the retry deadline."""

    exit_code = 6
