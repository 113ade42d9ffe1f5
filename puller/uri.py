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
from pathlib import Path, PurePosixPath
TYPE_CHECKING = False  # not typing's: importing typing is ~2 ms of a CLI pull's start-up
if TYPE_CHECKING:
    from typing import Any
from urllib.parse import parse_qsl, quote, unquote, unquote_plus, urlencode, urlsplit, urlunsplit

from puller.errors import BadURI
from puller.record import Record

if TYPE_CHECKING:
    from puller.sources.base import PullOptions

SCHEMES = ("s3", "gs", "rclone", "http", "https", "pvc", "file")

# Query (and fragment) parameters whose value is a secret, matched case-insensitively: exact
# names, then any name containing one of the words. Masked by redact(), dropped by normalize().
_SECRET_PARAMS = {
    "sig", "sv", "se", "sp", "st", "sr", "spr", "si", "skoid", "sktid", "skt", "ske", "sks", "skv",
    "code", "auth", "authorization", "googleaccessid", "pass", "pw",
}
_SECRET_WORDS = ("token", "secret", "signature", "key", "password", "passwd", "pwd", "credential",
                 "auth", "session")
# Parameters of a presigned URL that change on every signing: dropped by normalize() too.
_VOLATILE_PARAMS = {"x-amz-date", "x-amz-expires", "x-amz-algorithm", "x-amz-signedheaders",
                    "x-goog-date", "x-goog-expires", "x-goog-algorithm", "x-goog-signedheaders", "expires"}
MASK = "REDACTED"  # what a secret query value becomes; userinfo becomes "***"

# the start of a URL in free text; the URL runs to the next whitespace or quote-like character
_URL_START = re.compile(r"(?i)(?<![a-z0-9+.\-])[a-z][a-z0-9+.\-]*:/{1,3}(?=[^/\s])")  # ':/' too: Path(url) drops a '/'
_URL_END = re.compile(r"[\s\"'<>`]")
_RCLONE = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_.\-+@ ]*):(.*)$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.S)


class ParsedURI(Record):
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


def is_secret_param(name: str) -> bool:
    """Whether a query parameter named `name` carries a credential (case-insensitive)."""
    n = unquote_plus(name).strip().lower()
    return n in _SECRET_PARAMS or any(w in n for w in _SECRET_WORDS)


def redact(text: str) -> str:
    """`text` (a URI, or free text with URIs in it) with every credential masked.

    This is the one choke point for every output (logs, /status, the page, metrics, manifests,
    errors, CLI). It parses each URL it finds instead of matching one pattern: the userinfo runs
    to the last '@' that can end an authority (passwords may hold unencoded '/', '@', ':'), and
    every query or fragment parameter whose name is credential-like (see is_secret_param) keeps
    its name and loses its value. When in doubt it masks more (`https://h:8080/a@b` shows as
    `https://***@b`), never less.
    """
    if not isinstance(text, str):
        text = str(text)
    if ":/" not in text:
        return text
    out: list[str] = []
    pos = 0
    for m in _URL_START.finditer(text):
        if m.start() < pos:
            continue  # inside a URL already handled
        end_m = _URL_END.search(text, m.end())
        end = end_m.start() if end_m else len(text)
        out.append(text[pos:m.start()])
        out.append(m.group(0) + _redact_rest(text[m.end():end]))
        pos = end
    out.append(text[pos:])
    return "".join(out)


def redact_doc(doc: Any) -> Any:
    """A copy of a JSON-like document (dicts, lists, strings, numbers) with redact() applied to
    every string in it, keys included; other objects become their redacted str()."""
    if isinstance(doc, str):
        return redact(doc)
    if doc is None or isinstance(doc, (bool, int, float)):
        return doc
    if isinstance(doc, dict):
        return {redact_doc(k) if isinstance(k, str) else k: redact_doc(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple, set, frozenset)):
        return [redact_doc(v) for v in doc]
    return redact(str(doc))


def _userinfo_end(rest: str) -> int:
    """Index of the '@' that ends the userinfo of `rest` (a URL after 'scheme://'), or -1.

    The last '@' whose prefix can be userinfo: a prefix without '/' (a password may hold '?'
    or '#' too), or, before the query, one whose part before its first '/' holds a ':' or '@'
    (a password with an unencoded '/'). `bucket/model@v2` has none; `user:pa/ss@host`,
    `user:p@ss@host` and `user:p?ss@host` end at their last '@'."""
    head_end = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    at = rest.rfind("@")
    while at >= 0:
        prefix = rest[:at]
        before_slash = prefix.split("/", 1)[0]
        if "/" not in prefix or (at < head_end and (":" in before_slash or "@" in before_slash)):
            return at
        at = rest.rfind("@", 0, at)
    return -1


def _redact_rest(rest: str) -> str:
    at = _userinfo_end(rest)
    if at >= 0:
        rest = "***" + rest[at:]
    q, h = rest.find("?"), rest.find("#")
    if q >= 0 and (h < 0 or q < h):
        path, query = rest[:q], rest[q + 1:]
        query, sep, fragment = query.partition("#")
        return path + "?" + _redact_params(query) + sep + (_redact_params(fragment) if sep else "")
    if h >= 0:
        return rest[:h] + "#" + _redact_params(rest[h + 1:])
    return rest


def _redact_params(query: str) -> str:
    """Mask the values of secret parameters in `a=1&b=2;c=3`; other values are redacted in turn
    (a URL passed as a parameter keeps no credentials either)."""
    parts = re.split(r"([&;])", query)
    for i in range(0, len(parts), 2):
        name, eq, value = parts[i].partition("=")
        if not eq:
            continue
        if is_secret_param(name):
            parts[i] = f"{name}={MASK}" if value else parts[i]
        elif "://" in unquote(value):
            parts[i] = f"{name}={MASK}" if redact(unquote(value)) != unquote(value) else parts[i]
    return "".join(parts)


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
    return BadURI(f"bad URI {shown!r}: {redact(why)}", uri=shown if isinstance(uri, str) else None)


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
    if "@" in bucket or _userinfo_end(rest) >= 0:
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


def _split_userinfo(uri: str, scheme: str) -> tuple[str, str]:
    """(userinfo, the URL without it). None when the part before the first '/' is a plain
    host[:port]; else the userinfo runs to the '@' that redact() would mask up to, so a password
    with unencoded '/', '@' or ':' works and never ends up in the host or path. The userinfo
    comes back percent-encoded (the request sends it as basic auth)."""
    rest = uri.split("://", 1)[1]
    head_end = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    slash = rest.find("/", 0, head_end)
    authority = rest[:slash if slash >= 0 else head_end]
    if "@" not in authority and re.fullmatch(r"[A-Za-z0-9.\-]*(:[0-9]*)?|\[[0-9A-Fa-f:.]*\](:[0-9]*)?", authority):
        return "", uri
    at = _userinfo_end(rest)
    if at < 0:
        return "", uri
    user, colon, password = rest[:at].partition(":")
    userinfo = quote(unquote(user), safe="") + colon + quote(unquote(password), safe="")
    return userinfo, f"{scheme}://{rest[at + 1:]}"


def _parse_http(uri: str, scheme: str) -> ParsedURI:
    userinfo, bare = _split_userinfo(uri, scheme)
    try:
        parts = urlsplit(bare)
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
             if not is_secret_param(k) and k.lower() not in _VOLATILE_PARAMS]
    # redact(): a path that only looks like userinfo is masked here too, so no key can leak one
    norm = redact(urlunsplit((scheme, netloc, re.sub(r"/{2,}", "/", path), urlencode(query), "")))
    request_netloc = f"{userinfo}@{parts.netloc}" if userinfo else parts.netloc
    return ParsedURI(scheme=scheme, original=uri, normalized=norm, url=urlunsplit(
        (scheme, request_netloc, parts.path or "/", parts.query, "")))


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
