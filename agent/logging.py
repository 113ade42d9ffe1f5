"""Structured logs: one line per event, `key=value` (text) or one JSON object (json).

    log = get_logger("modelshelf.reconciler")
    log.info("model loaded", extra=kv(model="iris", seconds=0.004))

The message, every value (strings, and dicts/lists deeply, in text and JSON) and the exception
line pass through puller.uri.redact, so a URI with userinfo or a signed query never reaches a
log line.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_KV = "_kv"


def kv(**fields: Any) -> dict[str, Any]:
    """Build the `extra=` of a log call."""
    return {_KV: fields}


def _redact(value: Any) -> Any:
    """Strings (and anything else, as its str) with credentials masked; JSON-like values deeply."""
    from puller.uri import redact_doc

    return redact_doc(value)


def _fmt_value(value: Any) -> str:
    text = _redact(str(value))
    if text == "" or any(c in text for c in ' "=\n'):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [ts, record.levelname.lower(), record.name, _redact(record.getMessage())]
        for key, value in getattr(record, _KV, {}).items():
            parts.append(f"{key}={_fmt_value(value)}")
        if record.exc_info:
            parts.append("exc=" + _fmt_value(_exc_line(self, record)))
        return " ".join(parts)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _redact(record.getMessage()),
        }
        for key, value in getattr(record, _KV, {}).items():
            doc[key] = _redact(value)
        if record.exc_info:
            doc["exc"] = _redact(_exc_line(self, record))
        return json.dumps(doc, default=str)


def _exc_line(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    """The last line of the exception (its type and message); redacted by the caller."""
    lines = formatter.formatException(record.exc_info).splitlines()
    return lines[-1] if lines else ""


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "watchdog", "uvicorn.access", "botocore", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
