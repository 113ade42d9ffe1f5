"""Where measurements are remembered: the puller Cache's per-entry metadata, or memory."""
from __future__ import annotations

import threading
from typing import Protocol


class MetaStore(Protocol):
    """Anything with the puller Cache's per-entry metadata methods."""

    def get_meta(self, key: str) -> dict | None: ...

    def set_meta(self, key: str, meta: dict) -> None: ...


class InMemoryStore:
    """Fallback MetaStore: remembers for the life of the process only."""

    def __init__(self) -> None:
        self._data: dict[str, dict] = {}
        self._lock = threading.Lock()

    def get_meta(self, key: str) -> dict | None:
        with self._lock:
            meta = self._data.get(key)
            return None if meta is None else _deepcopy(meta)

    def set_meta(self, key: str, meta: dict) -> None:
        with self._lock:
            self._data[key] = _deepcopy(meta)


def _deepcopy(d: dict) -> dict:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


