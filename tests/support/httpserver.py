"""A real threaded HTTP file server on 127.0.0.1 for tests, with knobs for misbehaving.

    with HTTPFileServer(files={"m/model.joblib": b"..."}) as srv:
        url = srv.url("m/model.joblib")
        ...
        assert srv.get_count("m/model.joblib") == 1

Serves files from a dict (path -> bytes) and/or a directory. Supports HEAD, single-range GETs
(206 / 416), ETag, Last-Modified and If-Range, HTTP/1.1 keep-alive. Counters per path are
thread-safe. Knobs (all thread-safe, settable while running):

- ``delay_s``: sleep before answering every request; ``rate_bps``: throttle the body (bytes/s),
  so a test can kill a client mid-transfer.
- ``fail_503(path, times)``: answer 503 that many times, then normally.
- ``drop_mid_body(path, after_bytes, times)``: send headers and ``after_bytes`` of the body,
  then reset the connection.
- ``set_file(path, data)`` (new content, new ETag) / ``set_etag(path, etag)``.
- ``refuse_head``: answer HEAD with 405; ``accept_ranges``: False ignores Range (always 200).
- ``require_headers``: {name: value} every request must carry, else 401.
"""
from __future__ import annotations

import email.utils
import hashlib
import re
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote, unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _File:
    def __init__(self, data: bytes, etag: str | None = None, mtime: float | None = None):
        self.data = data
        self.etag = etag or '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        self.mtime = time.time() if mtime is None else mtime


class HTTPFileServer:
    """Context manager around a ThreadingHTTPServer bound to a free loopback port."""

    def __init__(
        self,
        files: Mapping[str, bytes] | None = None,
        root: str | Path | None = None,
        *,
        delay_s: float = 0.0,
        rate_bps: float | None = None,
        refuse_head: bool = False,
        accept_ranges: bool = True,
        require_headers: Mapping[str, str] | None = None,
    ):
        self._lock = threading.Lock()
        self._files: dict[str, _File] = {}
        for path, data in (files or {}).items():
            self._files[path.lstrip("/")] = _File(bytes(data))
        self.root = Path(root) if root is not None else None
        self.delay_s = delay_s
        self.rate_bps = rate_bps
        self.refuse_head = refuse_head
        self.accept_ranges = accept_ranges
        self.require_headers = dict(require_headers or {})
        self._gets: Counter[str] = Counter()
        self._heads: Counter[str] = Counter()
        self._sent: Counter[str] = Counter()
        self._fail: dict[str, int] = {}
        self._drop: dict[str, tuple[int, int]] = {}
        # (method, path, headers): headers is the request's email.message.Message (case-insensitive get/in)
        self.requests: list[tuple[str, str, Any]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "HTTPFileServer":
        handler = type("_Handler", (_Handler,), {"owner": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="httpfileserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "HTTPFileServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{quote(path.lstrip('/'))}"

    # -- content and knobs ---------------------------------------------------------------
    def set_file(self, path: str, data: bytes, etag: str | None = None) -> None:
        with self._lock:
            self._files[path.lstrip("/")] = _File(bytes(data), etag)

    def set_etag(self, path: str, etag: str) -> None:
        """Change the ETag (and Last-Modified) of `path`, keeping its bytes."""
        with self._lock:
            f = self._lookup(path.lstrip("/"))
            if f is None:
                raise KeyError(path)
            self._files[path.lstrip("/")] = _File(f.data, etag if etag.startswith('"') else f'"{etag}"',
                                                  mtime=f.mtime + 1)

    def fail_503(self, path: str, times: int) -> None:
        with self._lock:
            self._fail[path.lstrip("/")] = times

    def drop_mid_body(self, path: str, after_bytes: int, times: int = 1) -> None:
        with self._lock:
            self._drop[path.lstrip("/")] = (after_bytes, times)

    # -- counters ------------------------------------------------------------------------
    def get_count(self, path: str) -> int:
        """GET requests seen for `path` (ranged or not, whatever the answer)."""
        with self._lock:
            return self._gets[path.lstrip("/")]

    def head_count(self, path: str) -> int:
        with self._lock:
            return self._heads[path.lstrip("/")]

    def bytes_sent(self, path: str) -> int:
        """Body bytes written for `path` (counts partial bodies of dropped responses)."""
        with self._lock:
            return self._sent[path.lstrip("/")]

    def reset_counts(self) -> None:
        with self._lock:
            self._gets.clear()
            self._heads.clear()
            self._sent.clear()
            self.requests.clear()

    # -- internals -----------------------------------------------------------------------
    def _lookup(self, path: str) -> _File | None:
        f = self._files.get(path)
        if f is not None or self.root is None:
            return f
        p = (self.root / path).resolve()
        if self.root.resolve() not in p.parents or not p.is_file():
            return None
        st = p.stat()
        return _File(p.read_bytes(), etag=f'"{st.st_mtime_ns:x}-{st.st_size:x}"', mtime=st.st_mtime)


class _Handler(BaseHTTPRequestHandler):
    owner: HTTPFileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence stderr
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        srv = self.owner
        path = unquote(urlsplit(self.path).path).lstrip("/")
        with srv._lock:
            srv.requests.append((self.command, path, self.headers))
            (srv._heads if head else srv._gets)[path] += 1
            fail = srv._fail.get(path, 0)
            if fail:
                srv._fail[path] = fail - 1
            f = srv._lookup(path)
            drop = None
            if not head and path in srv._drop:
                after, times = srv._drop[path]
                if times > 0:
                    drop = after
                    srv._drop[path] = (after, times - 1)
        if srv.delay_s:
            time.sleep(srv.delay_s)
        for name, value in srv.require_headers.items():
            if self.headers.get(name) != value:
                return self._plain(401, b"unauthorized\n", head)
        if fail:
            return self._plain(503, b"try again\n", head, extra={"Retry-After": "0"})
        if head and srv.refuse_head:
            return self._plain(405, b"", head, extra={"Allow": "GET"})
        if f is None:
            return self._plain(404, b"not found\n", head)

        size = len(f.data)
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and srv.accept_ranges and (if_range is None or if_range == f.etag):
            m = _RANGE.match(rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                return self._plain(416, b"bad range\n", head, extra={"Content-Range": f"bytes */{size}"})
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start, end = max(0, size - int(m.group(2))), size - 1
            if start >= size or start > end:
                return self._plain(416, b"range not satisfiable\n", head,
                                   extra={"Content-Range": f"bytes */{size}"})
            status = 206
        length = end - start + 1 if size else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("ETag", f.etag)
        self.send_header("Last-Modified", email.utils.formatdate(f.mtime, usegmt=True))
        if srv.accept_ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head or not length:
            return
        self._write_body(path, memoryview(f.data)[start:end + 1], drop)

    def _write_body(self, path: str, body: memoryview, drop: int | None) -> None:
        srv = self.owner
        limit = len(body) if drop is None else min(drop, len(body))
        chunk = 64 * 1024
        t0 = time.monotonic()
        sent = 0
        try:
            while sent < limit:
                piece = body[sent:min(sent + chunk, limit)]
                self.wfile.write(piece)
                sent += len(piece)
                with srv._lock:
                    srv._sent[path] += len(piece)
                if srv.rate_bps:
                    ahead = sent / srv.rate_bps - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if drop is not None and limit < len(body):
            # reset the connection (RST, not a clean FIN) in the middle of the body
            self.close_connection = True
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            except OSError:
                pass

    def _plain(self, status: int, body: bytes, head: bool, extra: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)
