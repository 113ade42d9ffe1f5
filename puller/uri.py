"""Storage URIs: parse, normalize (the stable form that feeds cache keys) and redact (for logs).

Accepted forms:
    s3://bucket/key-or-prefix      gs://bucket/key-or-prefix
    remote:bucket/path             (rclone remote, configured through RCLONE_CONFIG_<REMOTE>_*)
    http(s)://host/path/file       (userinfo allowed, but never logged nor part of the cache key)
    pvc://claim/path               (resolved to <options.pvc_root>/<claim>/<path>)
    file:///abs/path, /abs/path, ./rel/path
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from puller.errors import BadURI

if TYPE_CHECKING:
    from puller.sources.base import PullOptions

SCHEMES = ("s3", "gs", "rclone", "http", "https", "pvc", "file")

# Query parameters whose value is a secret (case-insensitive): masked by redact(), dropped by normalize().
_SECRET_PARAMS = {
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
    "x-goog-credential", "awsaccesskeyid", "signature", "sig", "token", "access_token", "id_token",
    "key", "api_key", "apikey", "api-key", "password", "passwd", "secret", "client_secret", "code",
    "auth", "authorization",
}
# Parameters of a presigned URL that change on every signing: dropped by normalize() too.
_VOLATILE_PARAMS = {"x-amz-date", "x-amz-expires", "x-amz-algorithm", "x-amz-signedheaders",
                    "x-goog-date", "x-goog-expires", "x-goog-algorithm", "x-goog-signedheaders", "expires"}

_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@?#]*@")
_QUERY_SECRET = re.compile(
    r"(?i)([?&;](?:" + "|".join(re.escape(p) for p in sorted(_SECRET_PARAMS, key=len, reverse=True))
    + r")=)[^&#\s\"'<>]*")
_RCLONE = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_.\-+@ ]*):(.*)$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.S)


@dataclass(frozen=True)
class ParsedURI:
    """One parsed storage URI. `original` may hold secrets: log `redacted`/`normalized` only."""

    scheme: str  # one of SCHEMES
    original: str
    normalized: str  # stable, credential-free form (cache keys, logs)
    bucket: str = ""  # s3 / gs / rclone
    key: str = ""  # s3 / gs / rclone: object key or prefix, no leading '/', no trailing '/'
    is_prefix: bool = False  # the URI ended with '/' (or named a whole bucket): list, don't HEAD
    remote: str = ""  # rclone remote name
    url: str = ""  # http(s): the URL to request (keeps userinfo/query: never log it)
    path: Path | None = None  # file / pvc: the local path
    claim: str = ""  # pvc claim name

    @property
    def prefix(self) -> str:
        """The key as a listing prefix ('' for a whole bucket)."""
        return self.key

    @property
    def redacted(self) -> str:
        return redact(self.original)

    @property
    def filename(self) -> str:
        """Last path segment (http, single objects): the name the file gets on disk."""
        if self.scheme in ("http", "https"):
            return PurePosixPath(urlsplit(self.url).path).name
        if self.path is not None:
            return self.path.name
        return PurePosixPath(self.key).name


def redact(text: str) -> str:
    """Strip URL userinfo and mask secret query parameters anywhere in `text`."""
    if not text:
        return text
    text = _URL_USERINFO.sub(r"\1***@", text)
    return _QUERY_SECRET.sub(r"\1***", text)


def normalize(uri: str) -> str:
    """The stable form of `uri`: no credentials, no trailing-slash or '//' ambiguity."""
    return _parse(uri.strip(), pvc_root=None).normalized


def parse_uri(uri: str, options: "PullOptions | None" = None) -> ParsedURI:
    """Parse `uri`; raises BadURI (naming the redacted URI) when it cannot be used."""
    pvc_root = getattr(options, "pvc_root", None) if options is not None else None
    return _parse(uri.strip() if isinstance(uri, str) else uri, pvc_root=pvc_root)


# -- internals ---------------------------------------------------------------------------

def _bad(uri: str, why: str) -> BadURI:
    shown = redact(uri) if isinstance(uri, str) else repr(uri)
    return BadURI(f"bad URI {shown!r}: {why}", uri=shown if isinstance(uri, str) else None)


def _parse(uri: str, pvc_root: Path | None) -> ParsedURI:
    if not isinstance(uri, str) or not uri:
        raise _bad(uri if isinstance(uri, str) else str(uri), "empty")
    if any(c in uri for c in "\n\r\0"):
        raise _bad(uri, "contains control characters")
    m = _SCHEME.match(uri)
    if m:
        scheme, rest = m.group(1).lower(), m.group(2)
        if scheme in ("s3", "gs"):
            return _parse_bucket(uri, scheme, rest)
        if scheme in ("http", "https"):
            return _parse_http(uri, scheme)
        if scheme == "pvc":
            return _parse_pvc(uri, rest, pvc_root)
        if scheme == "file":
            return _parse_file(uri, rest)
        raise _bad(uri, f"unsupported scheme {scheme!r} (supported: s3, gs, http, https, pvc, file, "
                        "rclone 'remote:bucket/path', absolute paths)")
    if uri.startswith("/") or uri.startswith("./") or uri.startswith("../") or uri in (".", ".."):
        return _local(uri, "file", Path(os.path.abspath(uri)))
    m = _RCLONE.match(uri)
    if m:
        return _parse_rclone(uri, m.group(1), m.group(2))
    raise _bad(uri, "no scheme; expected s3://, gs://, http(s)://, pvc://, file://, remote:bucket/path "
                    "or an absolute path")


def _clean_key(uri: str, key: str) -> tuple[str, bool]:
    is_prefix = key == "" or key.endswith("/")
    parts = [p for p in key.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise _bad(uri, "'.' and '..' segments are not allowed in an object key")
    return "/".join(parts), is_prefix


def _check_bucket(uri: str, bucket: str) -> None:
    if not bucket:
        raise _bad(uri, "missing bucket name")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,254}", bucket):
        raise _bad(uri, f"invalid bucket name {bucket!r}")


def _parse_bucket(uri: str, scheme: str, rest: str) -> ParsedURI:
    if "?" in rest or "#" in rest:
        raise _bad(uri, "query strings and fragments are not allowed in an object URI")
    bucket, _, key = rest.partition("/")
    if "@" in bucket:
        raise _bad(uri, "credentials in the URI are not supported; use a storage key, .s3cfg or env")
    _check_bucket(uri, bucket)
    key, is_prefix = _clean_key(uri, key)
    norm = f"{scheme}://{bucket}/{key}" if key else f"{scheme}://{bucket}"
    return ParsedURI(scheme=scheme, original=uri, normalized=norm, bucket=bucket, key=key, is_prefix=is_prefix)


def _parse_rclone(uri: str, remote: str, rest: str) -> ParsedURI:
    rest = rest.lstrip("/")
    bucket, _, key = rest.partition("/")
    _check_bucket(uri, bucket)
    key, is_prefix = _clean_key(uri, key)
    norm = f"{remote}:{bucket}/{key}" if key else f"{remote}:{bucket}"
    return ParsedURI(scheme="rclone", original=uri, normalized=norm, bucket=bucket, key=key,
                     is_prefix=is_prefix, remote=remote)


def _parse_http(uri: str, scheme: str) -> ParsedURI:
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as e:
        raise _bad(uri, str(e)) from None
    host = (parts.hostname or "").lower()
    if not host:
        raise _bad(uri, "missing host")
    path = parts.path or "/"
    if not PurePosixPath(path).name:
        raise _bad(uri, "the URL must name a file (its last path segment is the file name)")
    default = {"http": 80, "https": 443}[scheme]
    netloc = f"[{host}]" if ":" in host else host
    if port and port != default:
        netloc += f":{port}"
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k.lower() not in _SECRET_PARAMS and k.lower() not in _VOLATILE_PARAMS]
    norm = urlunsplit((scheme, netloc, re.sub(r"/{2,}", "/", path), urlencode(query), ""))
    return ParsedURI(scheme=scheme, original=uri, normalized=norm, url=urlunsplit(
        (scheme, parts.netloc, parts.path or "/", parts.query, "")))


def _parse_pvc(uri: str, rest: str, pvc_root: Path | None) -> ParsedURI:
    claim, _, sub = rest.partition("/")
    if not claim:
        raise _bad(uri, "missing claim name (pvc://claim/path)")
    sub_parts = [p for p in sub.split("/") if p]
    if claim in (".", "..") or any(p in (".", "..") for p in sub_parts):
        raise _bad(uri, "'.' and '..' segments are not allowed")
    root = Path(pvc_root) if pvc_root is not None else Path(os.environ.get("MODELSHELF_PVC_ROOT", "/mnt/pvc"))
    path = root.joinpath(claim, *sub_parts)
    norm = "pvc://" + "/".join([claim, *sub_parts])
    return ParsedURI(scheme="pvc", original=uri, normalized=norm, path=path, claim=claim)


def _parse_file(uri: str, rest: str) -> ParsedURI:
    host, slash, path = rest.partition("/")
    if host not in ("", "localhost"):
        raise _bad(uri, f"file URIs must be local (file:///path), got host {host!r}")
    return _local(uri, "file", Path(os.path.abspath("/" + path)))


def _local(uri: str, scheme: str, path: Path) -> ParsedURI:
    return ParsedURI(scheme=scheme, original=uri, normalized="file://" + path.as_posix(), path=path)
