"""The three S3 calls a pull makes (HEAD, LIST v2, GET), signed with SigV4 over plain HTTP/1.1.

Why not botocore: a CLI pull of 200 x 1 MiB spent more CPU in botocore than in moving bytes:
~0.1 s importing it and loading its S3 model before the first request, and ~1 ms of its request
pipeline (events, endpoint rules, parsing) per GET (py-spy, benchmarks/results/pull.md). A pull
needs none of that: three fixed requests, their headers, one XML listing and S3's error codes.
Nor urllib3: its import (~35 ms here, a third of a short pull's start-up) buys a pool and proxy
plumbing that `_Pool` below does in ~100 lines. Nor http.client: ~17 ms of import (email's parser,
ssl for every endpoint) for what `_Conn` does over a socket (see its docstring).

What stays botocore's: credentials that are not static. Keys given in the settings (storage
config, rclone, .s3cfg, GCS HMAC) or in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (botocore's
first provider, which an explicit profile skips) are used as they are; anything else (profiles,
web identity / IRSA, SSO, container and instance credentials) goes through botocore's own
credential chain, imported only then, refreshed per request. No credentials at all: anonymous.

Requests follow botocore's S3 choices: the endpoint (AWS's for the region unless one is set),
path or virtual-host addressing, ``encoding-type=url`` listings, HTTP(S)_PROXY / NO_PROXY (an
http:// proxy: absolute URIs for http origins, CONNECT for https ones; user:password in the
proxy URL is sent as Proxy-Authorization), TLS verification or a CA bundle. Connections are kept
alive and reused (one idle list per origin; one that the server closed while idle is replaced
before use); a connect timeout, then a read timeout per socket operation. A wrong-region answer (301/400 naming the bucket's region in
``x-amz-bucket-region``) is re-signed once for that region, as botocore's redirector does.
Errors raise S3ResponseError with botocore's ``response`` shape ({"Error": {"Code"},
"ResponseMetadata": {"HTTPStatusCode"}}) so callers classify both alike. Secrets never enter a
message: only the URL (no query) and S3's code and message.
"""
from __future__ import annotations

import errno
import os
import re
import select
import socket
import struct
import sys
import threading
import time
import urllib.parse
from pathlib import Path
TYPE_CHECKING = False  # not typing's: importing typing is ~2 ms of a CLI pull's start-up
if TYPE_CHECKING:
    import datetime as _dt
    from typing import Any

from puller.credentials import S3Settings
from puller.logs import get_logger
from puller.sources.base import hmac_sha256, pwrite_all, sha256

log = get_logger("modelshelf.puller.sources.s3_wire")  # logging imported on first use (puller.logs)
_EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256 of no bytes
_UNRESERVED = "-_.~"
_DNS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_S3_NS = re.compile(r"^\{[^}]*\}")
_ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


class S3ResponseError(Exception):
    """S3 answered with an error status. `response` has botocore's shape (see module docstring)."""

    def __init__(self, op: str, status: int, code: str, message: str, headers: Any = None):
        self.operation, self.status, self.code = op, status, code
        self.headers = headers or {}
        self.response = {"Error": {"Code": code, "Message": message},
                         "ResponseMetadata": {"HTTPStatusCode": status}}
        super().__init__(f"An error occurred ({code}) when calling the {op} operation: {message or status}")


class S3ConnectionError(Exception):
    """The endpoint could not be reached or the connection broke (transient, unless `transient`
    says otherwise: a certificate that fails verification)."""

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message)
        self.transient = transient


class NoCredentials(Exception):
    """The credential chain failed to produce credentials it promised (e.g. an expired SSO token)."""


# -- credentials -----------------------------------------------------------------------------

class _Static:
    __slots__ = ("access_key", "secret_key", "token")

    def __init__(self, access_key: str, secret_key: str, token: str | None):
        self.access_key, self.secret_key, self.token = access_key, secret_key, token or None

    def get(self) -> "_Static":
        return self


class _Chain:
    """botocore's credentials (refreshable ones refresh themselves); frozen per request."""

    def __init__(self, creds: Any):
        self._creds = creds

    def get(self) -> _Static:
        try:
            f = self._creds.get_frozen_credentials()
        except Exception as e:  # noqa: BLE001 - botocore's refresh errors: no secret in the text
            raise NoCredentials(f"{type(e).__name__}: {e}") from None
        return _Static(f.access_key, f.secret_key, f.token)


def static_env_credentials(settings: S3Settings, env: Any = None) -> _Static | None:
    """What botocore's first provider (EnvProvider) returns, without botocore: AWS_ACCESS_KEY_ID +
    AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN / AWS_SECURITY_TOKEN), unless an explicit profile
    skips it or AWS_CREDENTIAL_EXPIRATION makes it refreshable (then botocore handles it)."""
    env = os.environ if env is None else env
    if settings.profile or env.get("AWS_CREDENTIAL_EXPIRATION"):
        return None
    key, secret = (env.get(n) or "" for n in _ENV_KEYS)
    if not key or not secret:
        return None
    return _Static(key, secret, env.get("AWS_SESSION_TOKEN") or env.get("AWS_SECURITY_TOKEN"))


def resolve_credentials(settings: S3Settings, session_for: Any) -> tuple[Any, str | None]:
    """(credentials or None for anonymous, the region from the AWS config when the chain was used).

    `session_for(profile)` returns a botocore session; it is called only when the credentials are
    not static (see module docstring). Raises botocore's ProfileNotFound for a missing profile.
    """
    if settings.anonymous:
        return None, None
    if settings.access_key_id:
        return _Static(settings.access_key_id, settings.secret_access_key or "", settings.session_token), None
    env = static_env_credentials(settings)
    if env is not None:
        return env, None
    session = session_for(settings.profile)
    creds = session.get_credentials()
    region = session.get_config_variable("region")
    return (_Chain(creds) if creds is not None else None), region


def config_file_region(profile: str | None, env: Any = None) -> str | None:
    """The region of `profile` (or the default) in the AWS config file, as botocore would read it."""
    env = os.environ if env is None else env
    path = Path(env.get("AWS_CONFIG_FILE") or Path.home() / ".aws" / "config").expanduser()
    if not path.is_file():
        return None  # what configparser would find there: nothing (and its import is not paid)
    import configparser

    cp = configparser.RawConfigParser()
    try:
        cp.read(path)
    except (OSError, configparser.Error):
        return None
    name = profile or env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    for section in (f"profile {name}", name) if name != "default" else ("default", "profile default"):
        if cp.has_section(section) and cp.get(section, "region", fallback=None):
            return cp.get(section, "region")
    return None


# -- SigV4 -------------------------------------------------------------------------------------

def _quote(s: str, safe: str = _UNRESERVED) -> str:
    return urllib.parse.quote(s, safe=safe)


class _Signer:
    """AWS Signature Version 4 for S3 requests without a body (the signing key is cached per day)."""

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str, str], bytes] = {}
        self._lock = threading.Lock()

    def _key(self, secret: str, day: str, region: str) -> bytes:
        k = (secret, day, region)
        key = self._keys.get(k)
        if key is None:
            key = ("AWS4" + secret).encode()
            for part in (day, region, "s3", "aws4_request"):
                key = hmac_sha256(key, part.encode())
            with self._lock:
                if len(self._keys) > 16:
                    self._keys.clear()
                self._keys[k] = key
        return key

    def sign(self, creds: _Static, region: str, method: str, host: str, path: str, query: str,
             headers: dict[str, str], now: _dt.datetime | None = None) -> None:
        """Add x-amz-date, x-amz-content-sha256, the token and Authorization to `headers`.
        `path` and `query` are already URI-encoded as they will be sent."""
        # time's UTC clock, not datetime's (~1 ms of import before a pull's first request)
        stamp = now.strftime("%Y%m%dT%H%M%SZ") if now is not None else time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        day = stamp[:8]
        headers["x-amz-date"] = stamp
        headers["x-amz-content-sha256"] = _EMPTY_SHA256
        if creds.token:
            headers["x-amz-security-token"] = creds.token
        signed = {"host": host}
        for name, value in headers.items():
            lname = name.lower()
            if lname.startswith("x-amz-") or lname in ("range", "if-match"):
                signed[lname] = " ".join(str(value).split())
        names = sorted(signed)
        canonical = "\n".join((method, path, query, "".join(f"{n}:{signed[n]}\n" for n in names),
                               ";".join(names), _EMPTY_SHA256))
        scope = f"{day}/{region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{sha256(canonical.encode()).hexdigest()}"
        sig = hmac_sha256(self._key(creds.secret_key, day, region), to_sign.encode()).hex()
        headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
                                    f"SignedHeaders={';'.join(names)}, Signature={sig}")


def _canonical_query(params: dict[str, str]) -> str:
    return "&".join(f"{_quote(k)}={_quote(str(v))}" for k, v in sorted(params.items()))


# -- the client --------------------------------------------------------------------------------

class S3WireClient:
    """HEAD / LIST v2 / GET against one S3-compatible endpoint; thread-safe (one connection pool per origin)."""

    def __init__(self, settings: S3Settings, credentials: Any, pool: int, region: str | None = None,
                 connect_timeout: float = 10, read_timeout: float = 60):
        self._settings = settings
        self._creds = credentials  # None: anonymous
        self.region = settings.region or region or config_file_region(settings.profile) or "us-east-1"
        self._regions: dict[str, str] = {}  # bucket -> region learned from a redirect
        self._custom = bool(settings.endpoint_url)
        self._signer = _Signer()
        self._pool_size = pool
        self._timeouts = (connect_timeout, read_timeout)
        self._verify = settings.verify
        self._ssl_context: Any = None  # made on the first https connection
        self._routes: dict[str, _Pool] = {}  # origin -> its connections
        self._lock = threading.Lock()

    # -- the three calls (botocore's names and keyword arguments, for S3Source) ----------------
    def head_object(self, Bucket: str, Key: str, ChecksumMode: str | None = None) -> dict:
        return self.begin_head_object(Bucket, Key, ChecksumMode).result()

    @staticmethod
    def _head_result(r: "_Response") -> dict:
        h = r.headers
        out: dict[str, Any] = {"ETag": h.get("ETag", ""), "ContentLength": int(h.get("Content-Length") or 0)}
        if h.get("x-amz-version-id"):
            out["VersionId"] = h["x-amz-version-id"]
        for algo in ("SHA256", "SHA1", "CRC32", "CRC32C", "CRC64NVME"):
            value = h.get(f"x-amz-checksum-{algo.lower()}")
            if value:
                out[f"Checksum{algo}"] = value
        if h.get("x-amz-checksum-type"):
            out["ChecksumType"] = h["x-amz-checksum-type"]
        return out

    def list_objects_v2(self, Bucket: str, Prefix: str = "", MaxKeys: int = 1000,
                        ContinuationToken: str | None = None) -> dict:
        return self.begin_list_objects_v2(Bucket, Prefix, MaxKeys, ContinuationToken).result()

    def get_object(self, Bucket: str, Key: str, Range: str | None = None, IfMatch: str | None = None,
                   ChecksumMode: str | None = None) -> "_Response":
        """The streaming response (`readinto` to its end, then `release_conn()`; else `close()`)."""
        return self.begin_get_object(Bucket, Key, Range, IfMatch, ChecksumMode).result()

    # -- plumbing ---------------------------------------------------------------------------
    def _url(self, bucket: str, key: str, region: str) -> tuple[str, str, str]:
        """(scheme://host[:port], host header, encoded path) for `bucket`/`key`."""
        if self._settings.endpoint_url:
            base = urllib.parse.urlsplit(self._settings.endpoint_url)
            # userinfo in an endpoint URL is never sent (nor shown in an error)
            scheme, netloc, prefix = base.scheme or "https", base.netloc.rpartition("@")[2], base.path.rstrip("/")
            default_port = {"https": ":443", "http": ":80"}.get(scheme, "")
            if default_port and netloc.endswith(default_port):
                netloc = netloc[: -len(default_port)]
        else:
            scheme, prefix = "https", ""
            netloc = "s3.amazonaws.com" if region == "us-east-1" else f"s3.{region}.amazonaws.com"
        style = self._settings.addressing_style
        virtual = style == "virtual" or (style == "auto" and not self._custom and _DNS_BUCKET.match(bucket)
                                         and "." not in bucket)
        kpath = _quote(key, "/" + _UNRESERVED)
        if virtual:
            netloc = f"{bucket}.{netloc}"
            path = f"{prefix}/{kpath}"
        else:
            path = f"{prefix}/{_quote(bucket)}" + (f"/{kpath}" if key else "")
        return f"{scheme}://{netloc}", netloc, path

    def _route(self, origin: str) -> "_Pool":
        """The connections to `origin`, direct or through the HTTP(S)_PROXY that applies to it
        (decided once per origin: no URL parsing per request)."""
        route = self._routes.get(origin)
        if route is not None:
            return route
        proxy = _proxy_for(origin)
        with self._lock:
            route = self._routes.get(origin)
            if route is None:
                route = self._routes[origin] = _Pool(origin, proxy, self._pool_size, self._timeouts, self._context)
            return route

    def _context(self) -> Any:
        """The TLS context of every https connection: the system's CAs, the CA bundle, or none
        checked (verify=False)."""
        import ssl  # only an https endpoint pays for it (~5 ms of a pull's start-up)

        with self._lock:
            if self._ssl_context is None:
                if self._verify is False:
                    ctx = ssl.create_default_context()
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                else:
                    ctx = ssl.create_default_context(cafile=self._verify if isinstance(self._verify, str) else None)
                self._ssl_context = ctx
            return self._ssl_context

    def begin_head_object(self, Bucket: str, Key: str, ChecksumMode: str | None = None) -> "Pending":
        """`head_object` sent now, on a connection of its own; `.result()` reads its answer."""
        headers = {"x-amz-checksum-mode": ChecksumMode} if ChecksumMode else {}
        return self._begin("HeadObject", "HEAD", Bucket, Key, {}, headers, shape=self._head_result)

    def begin_list_objects_v2(self, Bucket: str, Prefix: str = "", MaxKeys: int = 1000,
                              ContinuationToken: str | None = None) -> "Pending":
        """`list_objects_v2` sent now, on a connection of its own; `.result()` reads its answer."""
        params = {"list-type": "2", "prefix": Prefix, "max-keys": str(MaxKeys), "encoding-type": "url"}
        if ContinuationToken:
            params["continuation-token"] = ContinuationToken
        return self._begin("ListObjectsV2", "GET", Bucket, "", params, {}, shape=lambda r: _parse_listing(r.data))

    def begin_get_object(self, Bucket: str, Key: str, Range: str | None = None, IfMatch: str | None = None,
                         ChecksumMode: str | None = None) -> "Pending":
        """`get_object` sent now, on a connection of its own; `.result()` is the streaming response."""
        headers: dict[str, str] = {}
        if Range:
            headers["Range"] = Range
        if IfMatch:
            headers["If-Match"] = IfMatch
        if ChecksumMode:
            headers["x-amz-checksum-mode"] = ChecksumMode
        return self._begin("GetObject", "GET", Bucket, Key, {}, headers, stream=True)

    def _begin(self, op: str, method: str, bucket: str, key: str, params: dict[str, str],
               headers: dict[str, str], stream: bool = False, redirected: bool = False,
               shape: Any = None) -> "Pending":
        """Sign and send one request; the answer is read by the returned Pending's `result()`."""
        region = self._regions.get(bucket, self.region)
        origin, host, path = self._url(bucket, key, region)
        query = _canonical_query(params)
        headers = dict(headers)
        headers["Host"] = host  # sent exactly as signed
        if self._creds is not None:
            self._signer.sign(self._creds.get(), region, method, host, path, query, headers)
        target = path + (f"?{query}" if query else "")
        sent = self._route(origin).begin(method, target, headers, f"{method} {origin}{path}")
        return Pending(self, sent, (op, method, bucket, key, params, headers, stream, redirected), region, shape)


class Pending:
    """A request on the wire, its answer not read yet (S3Source sends a listing's HEAD and its LIST
    together). `result()` returns or raises what the blocking call does: the response (or its
    `shape`d value), S3ResponseError for an error status (a wrong-region answer re-signed and sent
    again once), S3ConnectionError; `drop()` closes the connection unread when the answer is not
    wanted."""

    __slots__ = ("_client", "_sent", "_request", "_region", "_shape")

    def __init__(self, client: S3WireClient, sent: "_Sent", request: tuple, region: str, shape: Any):
        self._client, self._sent, self._request, self._region, self._shape = client, sent, request, region, shape

    def result(self) -> Any:
        op, method, bucket, key, params, headers, stream, redirected = self._request
        r = self._sent.response()
        if not stream:
            r.preload()
        if r.status < 300:
            return r if self._shape is None else self._shape(r)
        body = r.data if method != "HEAD" else b""
        r.release_conn()
        code, message = _parse_error(body, r.status, r.reason)
        if not (method == "HEAD" and r.status == 404):  # (a prefix's HEAD: the expected answer, and a
            # record made before the first GET would import logging on the way to it: puller.logs)
            log.debug("event=s3_error_response op=%s what=%s status=%d code=%s", op, self._sent.what, r.status, code)
        new_region = r.headers.get("x-amz-bucket-region")
        if not redirected and new_region and new_region != self._region and r.status in (301, 400):
            self._client._regions[bucket] = new_region  # botocore's S3RegionRedirector: re-sign there, once
            return self._client._begin(op, method, bucket, key, params, headers_without_auth(headers), stream, True,
                                       self._shape).result()
        raise S3ResponseError(op, r.status, code, message, r.headers)

    def drop(self) -> None:
        self._sent.drop()


def headers_without_auth(headers: dict[str, str]) -> dict[str, str]:
    drop = {"authorization", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token"}
    return {k: v for k, v in headers.items() if k.lower() not in drop}


class HTTPProtocolError(Exception):
    """A response that breaks HTTP/1.1: a garbled status line or header, a body cut short (what
    http.client calls HTTPException / IncompleteRead). Transient: the request is retried."""


_MAX_LINE, _MAX_HEADERS = 65536, 100  # http.client's limits


class _Headers(dict):
    """Response headers, names matched without regard to case (the first of repeated ones)."""

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())


def _line(fp: Any, what: str) -> bytes:
    """One whole CRLF (or LF) line of a response head or of a chunked body's framing. A line
    cut short is an error: the server closed, or the kernel's read timeout (SO_RCVTIMEO, see
    `_Conn.connect`) ended the read."""
    line = fp.readline(_MAX_LINE + 1)
    if len(line) > _MAX_LINE:
        raise HTTPProtocolError(f"{what} too long")
    if not line.endswith(b"\n"):
        if line:
            raise TimeoutError(f"the response stopped inside the {what} (closed or timed out)")
        raise HTTPProtocolError(f"the server closed the connection before the {what}")
    return line


def _read_head(fp: Any) -> tuple[bytes, _Headers]:
    """The status line and the headers of one response (or of a proxy's CONNECT answer)."""
    line = _line(fp, "status line")
    headers = _Headers()
    for _ in range(_MAX_HEADERS + 1):
        h = _line(fp, "header line")
        if h in (b"\r\n", b"\n"):
            return line, headers
        name, sep, value = h.decode("iso-8859-1").partition(":")
        if not sep:
            raise HTTPProtocolError(f"malformed header line {h[:40]!r}")
        headers.setdefault(name.strip().lower(), value.strip())
    raise HTTPProtocolError(f"more than {_MAX_HEADERS} headers")


class _Conn:
    """One HTTP/1.1 client connection, requests without a body, over a plain socket.

    Why not http.client: importing it costs a CLI pull ~17 ms of its ~100 ms start-up (it imports
    email's parser for headers and ssl even for http:// endpoints; benchmarks/results/pull.notes.md).
    This speaks what S3 answers need: Content-Length, chunked and read-to-close bodies, keep-alive,
    1xx interim answers skipped, TLS (ssl imported for the first https connection only) and an
    http:// proxy's CONNECT tunnel.
    """

    __slots__ = ("host", "port", "sock", "_fp", "_timeouts", "_context", "_tunnel")

    def __init__(self, host: str, port: int, timeouts: tuple[float, float], context: Any = None,
                 tunnel: tuple[str, int, dict[str, str]] | None = None):
        self.host, self.port, self._timeouts = host, port, timeouts
        self._context, self._tunnel = context, tunnel  # context: a callable giving the TLS context
        self.sock: Any = None
        self._fp: Any = None

    def connect(self) -> None:
        # an ASCII host goes to getaddrinfo as bytes: a str is encoded with the idna codec, whose
        # import (encodings.idna, stringprep, unicodedata: ~2.5 ms) would delay a pull's first request
        host = self.host.encode("ascii") if self.host.isascii() else self.host
        sock = socket.create_connection((host, self.port), self._timeouts[0])
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            server = self.host
            if self._tunnel is not None:
                server, port, headers = self._tunnel
                lines = [f"CONNECT {server}:{port} HTTP/1.1", f"Host: {server}:{port}"]
                lines += [f"{k}: {v}" for k, v in headers.items()]
                sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                fp = sock.makefile("rb")
                status, _ = _read_head(fp)
                fp.close()
                parts = status.split(None, 2)
                if len(parts) < 2 or parts[1] != b"200":
                    raise OSError(f"Tunnel connection failed: {status.decode('latin-1').strip()}")
            if self._context is not None:
                sock = self._context().wrap_socket(sock, server_hostname=server)
                sock.settimeout(self._timeouts[1])
            else:
                # The read timeout in the kernel (SO_RCVTIMEO) rather than Python's: a socket with
                # a Python timeout polls before every recv, one more syscall per read (~11,000 per
                # 512 MiB). A timed-out read then ends short (`_line`, `_Body.readinto`). TLS keeps
                # Python's timeout: its reads would fail as SSLWantReadError instead.
                t = self._timeouts[1]
                timeval = struct.pack("ll", int(t), int(t % 1 * 1e6))
                sock.settimeout(None)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        except BaseException:
            sock.close()
            raise
        self.sock, self._fp = sock, sock.makefile("rb")

    def request(self, method: str, target: str, headers: dict[str, str]) -> None:
        lines = [f"{method} {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
        if "Accept-Encoding" not in headers:
            lines.append("Accept-Encoding: identity")  # as http.client asks: bodies as stored
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def getresponse(self, method: str) -> "_Body":
        while True:
            status_line, headers = _read_head(self._fp)
            parts = status_line.split(None, 2)
            try:
                version, status = parts[0], int(parts[1])
            except (IndexError, ValueError):
                raise HTTPProtocolError(f"bad status line {status_line[:40]!r}") from None
            if not version.startswith(b"HTTP/1."):
                raise HTTPProtocolError(f"bad status line {status_line[:40]!r}")
            if status >= 200 or status == 101:
                break  # 100 Continue and other interim answers: the real one follows
        reason = parts[2].decode("iso-8859-1").strip() if len(parts) > 2 else ""
        # a plain socket's body can be spliced to a file (TLS bodies are decrypted in user space)
        sock = self.sock if self._context is None else None
        return _Body(self._fp, method, status, reason, headers, version == b"HTTP/1.0", sock)

    def close(self) -> None:
        sock, fp, self.sock, self._fp = self.sock, self._fp, None, None
        if fp is not None:
            fp.close()
        if sock is not None:
            sock.close()


class _NoLock:
    """A lock that is no lock: a file only one thread writes (see `_Body.splice_into`)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


NO_LOCK = _NoLock()


class _Body:
    """One response's body as it streams: Content-Length, chunked, or up to the close."""

    __slots__ = ("status", "reason", "headers", "will_close", "_fp", "_length", "_chunked", "_chunk_left", "_sock",
                 "_drained")

    def __init__(self, fp: Any, method: str, status: int, reason: str, headers: _Headers, http10: bool,
                 sock: Any = None):
        self.status, self.reason, self.headers, self._fp = status, reason, headers, fp
        self._sock, self._drained = sock, False
        conn = headers.get("connection", "").lower()
        self.will_close = "close" in conn or (http10 and "keep-alive" not in conn)
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self._chunk_left = 0
        self._length: int | None = None
        if method == "HEAD" or status in (204, 304) or status < 200:
            self._length = 0
        elif not self._chunked and headers.get("content-length") is not None:
            try:
                self._length = int(headers["content-length"])
            except ValueError:
                raise HTTPProtocolError("bad Content-Length") from None
            if self._length < 0:
                raise HTTPProtocolError("bad Content-Length")
        elif not self._chunked:
            self.will_close = True  # a body that ends when the server closes
        if self._length == 0:
            self._fp = None

    def isclosed(self) -> bool:
        """Whether the body was read to its end."""
        return self._fp is None

    def readinto(self, buf: Any) -> int:
        fp = self._fp
        if fp is None:
            return 0
        if self._chunked:
            return self._readinto_chunked(buf)
        if self._length is not None:
            if len(buf) > self._length:
                buf = memoryview(buf)[: self._length]
            n = fp.readinto(buf)
            if n is None:  # the kernel's read timeout
                self._fp = None
                raise TimeoutError("the response body timed out")
            if not n and buf:
                self._fp = None
                raise HTTPProtocolError(f"IncompleteRead: {self._length} more bytes expected")
            self._length -= n
            if not self._length:
                self._fp = None
            return n
        n = fp.readinto(buf)
        if n is None:
            self._fp = None
            raise TimeoutError("the response body timed out")
        if not n:
            self._fp = None
        return n

    @property
    def spliceable(self) -> bool:
        """Whether `splice_into` can move this body: a Content-Length body on a plain socket."""
        return self._sock is not None and self._length is not None and self._fp is not None

    def splice_into(self, fd: int, offset: int, count: int, pipe: "Pipe", lock: Any = None) -> int | None:
        """Move up to `count` bytes of the body to `fd` at `offset` through `pipe` with splice(2)
        (socket -> pipe -> file: the bytes never enter user space); the number moved, 0 at the
        body's end, or None when this body cannot be spliced now (TLS, chunked or read-to-close
        bodies, a socket that refuses): then `readinto` reads on from the same byte. A file
        system that refuses the pipe -> file half (EINVAL) gets what is in the pipe with read +
        pwrite and sets `pipe.refused`. A body cut short raises as `readinto` does.

        Use it from a body's first byte or not at all: the head's reads may have buffered the
        start of the body, which the first call writes first (what was buffered never reaches
        the socket again). `lock` (held while bytes go into `fd`, not while the socket is read):
        the file's writers' lock, when several threads write parts of one file (see
        puller.sources.s3.S3Source.fetch)."""
        fp = self._fp
        if fp is None:
            return 0
        if self._sock is None or self._length is None or pipe.refused:
            return None
        want = min(count, self._length)
        if not self._drained:  # the bytes the head's read buffered past the headers
            head = fp.peek(want)  # blocks only until the body's first bytes, when none are buffered
            if not head:  # closed, or the kernel's read timeout
                self._fp = None
                raise HTTPProtocolError(f"IncompleteRead: {self._length} more bytes expected (closed or timed out)")
            data = fp.read(min(len(head), want))  # from the buffer only: no read of the socket
            self._drained = len(data) == len(head)
            with lock or NO_LOCK:
                pwrite_all(fd, data, offset, 64 << 10)
            return self._took(len(data))
        try:
            n = os.splice(self._sock.fileno(), pipe.w, min(want, pipe.size))
        except BlockingIOError:  # the kernel's read timeout (SO_RCVTIMEO)
            self._fp = None
            raise TimeoutError("the response body timed out") from None
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                pipe.refused = True  # nothing was taken off the socket: readinto goes on from here
                return None
            raise
        if not n:
            self._fp = None
            raise HTTPProtocolError(f"IncompleteRead: {self._length} more bytes expected")
        with lock or NO_LOCK:
            self._empty(pipe, n, fd, offset)
        return self._took(n)

    @staticmethod
    def _empty(pipe: "Pipe", n: int, fd: int, offset: int) -> None:
        """The `n` bytes in `pipe` into `fd` at `offset`."""
        done = 0
        while done < n:
            try:
                done += os.splice(pipe.r, fd, min(n - done, pipe.WRITE), offset_dst=offset + done)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                pipe.refused = True  # this file refuses splice: the pipe's bytes through user space
                while done < n:
                    data = os.read(pipe.r, n - done)
                    pwrite_all(fd, data, offset + done, 64 << 10)
                    done += len(data)

    def _took(self, n: int) -> int:
        self._length -= n
        if not self._length:
            self._fp = None
        return n

    def _readinto_chunked(self, buf: Any) -> int:
        fp = self._fp
        if not self._chunk_left:
            size_line = _line(fp, "chunk size line")
            try:
                self._chunk_left = int(size_line.split(b";", 1)[0], 16)
            except ValueError:
                self._fp = None
                raise HTTPProtocolError(f"bad chunk size line {size_line[:40]!r}") from None
            if not self._chunk_left:  # the last chunk: trailers up to a blank line
                while _line(fp, "trailer line") not in (b"\r\n", b"\n"):
                    pass
                self._fp = None
                return 0
        if len(buf) > self._chunk_left:
            buf = memoryview(buf)[: self._chunk_left]
        n = fp.readinto(buf)
        if n is None:
            self._fp = None
            raise TimeoutError("the response body timed out")
        if not n and buf:
            self._fp = None
            raise HTTPProtocolError("IncompleteRead: a chunk cut short")
        self._chunk_left -= n
        if not self._chunk_left:
            _line(fp, "chunk end")  # the CRLF after the chunk's data
        return n

    def read(self) -> bytes:
        out = bytearray()
        buf = bytearray(64 << 10)
        while True:
            n = self.readinto(buf)
            if not n:
                return bytes(out)
            out += memoryview(buf)[:n]


class Pipe:
    """A pipe for `_Body.splice_into` (one per GET attempt: never a byte left over from another);
    `refused`: a splice was refused, read on with `readinto`.

    Sizes, measured (one 512 MiB object from s3rver on 127.0.0.1, in-process fetch, 16 workers x
    16 MiB parts, ext4, 2-core VM, 6 interleaved rounds, load 3.9-4.7; benchmarks/results/
    pull.notes.md "pull5"): a 1 MiB pipe (F_SETPIPE_SZ, the default pipe-max-size) emptied into
    the file 64 KiB per splice: CPU min 0.340 s / median 0.394 s (user 0.068); a 64 KiB pipe 0.377
    / 0.383 s (user 0.090); readinto + pwrite 0.385 / 0.423 s (user 0.098). Emptied 1 MiB per
    splice, the CLI's CPU went to 0.77-1.1 s (large page-cache writes: see puller.sources.s3._CHUNK).
    """

    __slots__ = ("r", "w", "size", "refused")
    SIZE = 1 << 20  # bytes taken off the socket per splice, at most
    WRITE = 64 << 10  # bytes put into the file per splice, at most

    def __init__(self) -> None:
        import fcntl

        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        self.refused = False
        try:
            self.size = fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, self.SIZE)
        except OSError:  # over /proc/sys/fs/pipe-max-size or the user's pipe pages: the default
            self.size = 64 << 10

    @staticmethod
    def open() -> "Pipe | None":
        """A new pipe, or None where splice(2) does not exist (not Linux) or no pipe can be made."""
        if not hasattr(os, "splice"):
            return None
        try:
            return Pipe()
        except OSError:
            return None

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class _Pool:
    """Keep-alive HTTP/1.1 connections to one origin, direct or through an http:// proxy.

    Idle connections wait in a list (at most `size`); one the server closed while it was idle is
    dropped when taken, not found broken by the request. A connection is handed back only by a
    response read to its end (`_Response.release_conn`); any other ends with it closed.
    """

    def __init__(self, origin: str, proxy: str | None, size: int, timeouts: tuple[float, float], context: Any):
        parts = urllib.parse.urlsplit(origin)
        self._tls = parts.scheme == "https"
        self._host, self._port = parts.hostname or "", parts.port or (443 if self._tls else 80)
        self._size, self._timeouts = size, timeouts
        self._context = context
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._proxy: tuple[str, int] | None = None
        self._proxy_headers: dict[str, str] = {}
        self.origin = origin
        if proxy:
            p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            if p.scheme != "http":
                raise S3ConnectionError(f"proxy {p.scheme}://{p.hostname}: only http:// proxies are supported",
                                        transient=False)
            self._proxy = (p.hostname or "", p.port or 80)
            if p.username is not None:
                import base64

                user = urllib.parse.unquote(p.username) + ":" + urllib.parse.unquote(p.password or "")
                self._proxy_headers["Proxy-Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()

    def begin(self, method: str, target: str, headers: dict[str, str], what: str) -> "_Sent":
        """Send one request without a body on a connection of its own and return without waiting
        for the answer: requests begun one after the other are answered in parallel. A failure to
        connect or send is raised by `_Sent.response()`, as a failure to read would be."""
        if self._proxy and not self._tls:  # a forward proxy takes the absolute URI
            target = self.origin + target
            headers = {**headers, **self._proxy_headers}
        conn = self._take()
        try:
            if conn.sock is None:
                conn.connect()
            conn.request(method, target, headers)
        except (OSError, HTTPProtocolError) as e:
            conn.close()
            return _Sent(self, None, method, what, e)
        return _Sent(self, conn, method, what)

    def _take(self) -> _Conn:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._new()
            if not _dropped(conn.sock):
                return conn
            conn.close()

    def _new(self) -> _Conn:
        host, port = self._proxy or (self._host, self._port)
        tunnel = (self._host, self._port, self._proxy_headers) if self._tls and self._proxy else None
        return _Conn(host, port, self._timeouts, self._context if self._tls else None, tunnel)

    def give_back(self, conn: _Conn) -> None:
        with self._lock:
            if len(self._idle) < self._size:
                self._idle.append(conn)
                return
        conn.close()


def is_cert_error(e: BaseException) -> bool:
    """A TLS certificate that failed verification (ssl is imported only by https connections)."""
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(e, ssl.SSLCertVerificationError)


def _dropped(sock: Any) -> bool:
    """Whether an idle keep-alive connection is unusable: closed by the peer (readable at EOF)
    or sent something unasked. A connection never opened is not dropped."""
    if sock is None:
        return False
    try:
        p = select.poll()
        p.register(sock, select.POLLIN)
        return bool(p.poll(0))
    except (OSError, ValueError):
        return True


class _Sent:
    """A request on the wire whose answer is not read yet (see `_Pool.begin`)."""

    __slots__ = ("_pool", "_conn", "_method", "what", "_error")

    def __init__(self, pool: _Pool, conn: _Conn | None, method: str, what: str, error: BaseException | None = None):
        self._pool, self._conn, self._method, self.what, self._error = pool, conn, method, what, error

    def response(self) -> "_Response":
        """The answer with its headers read (once); S3ConnectionError when the request could not
        be sent or its answer not read."""
        conn, self._conn = self._conn, None
        e = self._error
        if conn is not None:
            try:
                return _Response(conn.getresponse(self._method), conn, self._pool)
            except (OSError, HTTPProtocolError) as err:
                conn.close()
                e = err
        if e is None:
            raise RuntimeError(f"{self.what}: the answer was read or dropped already")
        raise S3ConnectionError(f"{self.what}: {type(e).__name__}: {e}", transient=not is_cert_error(e)) from None

    def drop(self) -> None:
        """The answer is not wanted: its connection is closed unread (not handed back)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class _Response:
    """A response whose body streams off its connection: `status`, `headers` (case-insensitive
    `get`), `readinto`, `data`; `release_conn()` hands the connection back when the body was read
    to its end (else closes it), `close()` closes it."""

    __slots__ = ("status", "reason", "headers", "_r", "_conn", "_pool", "_data")

    def __init__(self, r: _Body, conn: _Conn, pool: _Pool):
        self.status, self.reason, self.headers = r.status, r.reason, r.headers
        self._r, self._conn, self._pool = r, conn, pool
        self._data: bytes | None = None

    def readinto(self, buf: Any) -> int:
        return self._r.readinto(buf)

    @property
    def spliceable(self) -> bool:
        return self._r.spliceable

    def splice_into(self, fd: int, offset: int, count: int, pipe: Pipe, lock: Any = None) -> int | None:
        return self._r.splice_into(fd, offset, count, pipe, lock)

    def isclosed(self) -> bool:
        return self._r.isclosed()

    def preload(self) -> None:
        """Read the whole body now and hand the connection back (small bodies: HEAD, LIST, errors)."""
        if self._data is None:
            try:
                self._data = self._r.read()
            except (OSError, HTTPProtocolError) as e:
                self.close()
                raise S3ConnectionError(f"reading a response: {type(e).__name__}: {e}") from None
            self.release_conn()

    @property
    def data(self) -> bytes:
        self.preload()
        return self._data or b""

    def release_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._r.isclosed() and not self._r.will_close:
            self._pool.give_back(conn)
        else:
            conn.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _proxy_for(origin: str) -> str | None:
    if not any(k.lower().endswith("_proxy") for k in os.environ):
        return None  # the common case, without importing urllib.request (email, http.cookiejar...)
    import urllib.request

    parts = urllib.parse.urlsplit(origin)
    proxies = urllib.request.getproxies_environment()
    if not proxies or urllib.request.proxy_bypass_environment(parts.hostname or "", proxies):
        return None
    return proxies.get(parts.scheme)


def _strip(tag: str) -> str:
    return _S3_NS.sub("", tag)


def _parse_error(body: bytes, status: int, reason: str = "") -> tuple[str, str]:
    """S3's <Error><Code>..</Code><Message>..</Message></Error>, else the status and its phrase
    (as botocore): the server's reason phrase, else the standard one."""
    from xml.etree import ElementTree

    if body:
        try:
            root = ElementTree.fromstring(body)
            fields = {_strip(c.tag): (c.text or "") for c in root}
            if fields.get("Code"):
                return fields["Code"], fields.get("Message", "")
        except ElementTree.ParseError:
            pass
    if reason:
        return str(status), reason
    from http import HTTPStatus

    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return str(status), phrase


def _parse_listing(body: bytes) -> dict:
    from xml.etree import ElementTree

    root = ElementTree.fromstring(body)
    out: dict[str, Any] = {"Contents": [], "IsTruncated": False}
    encoded = False
    for child in root:
        tag = _strip(child.tag)
        if tag == "Contents":
            item = {_strip(c.tag): (c.text or "") for c in child}
            out["Contents"].append({"Key": item.get("Key", ""), "Size": int(item.get("Size") or 0),
                                    "ETag": item.get("ETag", "")})
        elif tag == "IsTruncated":
            out["IsTruncated"] = (child.text or "").strip().lower() == "true"
        elif tag == "NextContinuationToken":
            out["NextContinuationToken"] = child.text or ""
        elif tag == "EncodingType":
            encoded = (child.text or "").strip().lower() == "url"
    if encoded:
        for item in out["Contents"]:
            item["Key"] = urllib.parse.unquote_plus(item["Key"])
    return out
