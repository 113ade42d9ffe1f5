"""Model config: the desired set of models, read from a (ConfigMap-mounted) directory.

Formats accepted:
  * native `models.yaml` / `models.yml` / `models.json`: a list of models or {"models": [...]}
  * KServe's multi-model `models.json`: [{"modelName": ..., "modelSpec": {"storageUri", "framework", "memory"}}]

Rules: a bad entry is rejected with a reason and the others apply; a file that does not parse
raises ConfigParseError and the caller keeps the last good config.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str | tuple[tuple[str, str], ...]  # one URI, or sub-model name -> URI pairs (sorted)
    runtime: str = "sklearn"
    implementation: str | None = None
    version: str | None = None
    memory: int | None = None  # bytes of host memory, declared
    gpu_memory: int | None = None  # bytes of GPU memory, declared
    pinned: bool = False
    preload: bool = True
    sha256: str | None = None
    storage_key: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def uri(self) -> str | dict[str, str]:
        """What the puller takes: a URI string, or a mapping of sub-model -> URI."""
        return self.source if isinstance(self.source, str) else dict(self.source)

    def fingerprint(self) -> str:
        """Digest of everything that, when changed, means the served copy must be replaced."""
        doc = {
            "source": self.source,
            "runtime": self.runtime,
            "implementation": self.implementation,
            "version": self.version,
            "sha256": self.sha256,
            "storage_key": self.storage_key,
            "parameters": self.parameters,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ConfigError:
    """One rejected entry (or the whole file when `model` is None)."""

    file: str
    model: str | None
    index: int | None
    reason: str


class ConfigParseError(Exception):
    """The file could not be read or parsed at all; nothing in it applies."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


@dataclass(frozen=True)
class ConfigResult:
    models: dict[str, ModelSpec]  # accepted entries by name
    errors: tuple[ConfigError, ...]  # rejected entries
    file: str | None  # which file was read (None: no config file present -> empty set)
    digest: str  # sha256 of the file's bytes; unchanged digest -> nothing to do
