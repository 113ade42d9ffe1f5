"""Model config: the desired set of models, read from a (ConfigMap-mounted) directory.

Formats accepted:
  * native `models.yaml` / `models.yml` / `models.json`: a list of models or {"models": [...]}
  * KServe's multi-model `models.json`: [{"modelName": ..., "modelSpec": {"storageUri", "framework", "memory"}}]

Rules: a bad entry is rejected with a reason and the others apply; a file that does not parse
raises ConfigParseError and the caller keeps the last good config. So does a file that cannot be
read (ConfigUnreadable: a dangling or looping symlink, a directory or device under the name) and
one past a limit (ConfigLimits: its size, its nesting depth, its number of values with every
YAML alias counted in full). An absent file is not a parse error: load_config_dir says so with
file=None and the watcher decides what that means (see agent/watcher.py).
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from agent.quantity import parse_quantity
from puller.errors import BadURI
from puller.uri import parse_uri


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
    parameters: Mapping[str, Any] = field(default_factory=dict, hash=False)  # compared, not hashed

    @property
    def uri(self) -> str | dict[str, str]:
        """What the puller takes: a URI string, or a mapping of sub-model -> URI."""
        return self.source if isinstance(self.source, str) else dict(self.source)

    def fingerprint(self) -> str:
        """Digest of everything that, when changed, means the served copy must be replaced."""
        return self._fingerprint

    @functools.cached_property
    def _fingerprint(self) -> str:  # computed once per spec (frozen: cached_property is safe)
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

    def __str__(self) -> str:
        """e.g. "models.yaml[3] (name 'iris'): memory: not a quantity: '12XB' (...)"."""
        where = self.file if self.index is None else f"{self.file}[{self.index}]"
        if self.model is not None:
            where += f" (name {self.model!r})"
        return f"{where}: {self.reason}"


class ConfigParseError(Exception):
    """The file could not be read or parsed at all; nothing in it applies."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


class ConfigUnreadable(ConfigParseError):
    """A config file name is present but its bytes cannot be read (reason starts "config file unreadable")."""


@dataclass(frozen=True)
class ConfigLimits:
    """What one config file may cost to read; past a limit the file is rejected like one that
    does not parse. Each is a `modelshelf run` flag (named in the rejection's message)."""

    max_bytes: int = 16 * 2**20  # --max-config-bytes: the file's size
    max_depth: int = 64  # --max-config-depth: nesting levels of lists and mappings
    max_nodes: int = 1_000_000  # --max-config-nodes: values in the document, each YAML alias use counted in full


@dataclass(frozen=True)
class ConfigResult:
    models: dict[str, ModelSpec]  # accepted entries by name
    errors: tuple[ConfigError, ...]  # rejected entries
    file: str | None  # which file was read (None: no config file present -> empty set)
    digest: str  # sha256 of the file's bytes; unchanged digest -> nothing to do


# --------------------------------------------------------------------------- parsing
#
# Everything below turns a directory or a file's text into a ConfigResult. Index numbers in
# messages are 0-based positions in the file's model list: "models.yaml[3]" is the fourth entry.

try:
    _YAMLLoader: Any = yaml.CSafeLoader  # same rules as yaml.safe_load, in C
except AttributeError:  # pragma: no cover - pyyaml built without libyaml
    _YAMLLoader = yaml.SafeLoader

CONFIG_FILES = ("models.yaml", "models.yml", "models.json")
"""Names looked for in the config directory, in this order; the first present is read."""

RUNTIMES = frozenset({
    "sklearn", "xgboost", "lightgbm", "catboost", "mlflow", "huggingface", "alibi-detect",
    "alibi-explain", "mlserver", "triton", "onnx", "python", "pytorch", "tensorflow", "tensorrt",
    "openvino",
})
"""Runtimes a model may name. `mlserver` needs `implementation` (a MLServer class path);
`triton` means a native Triton model directory; onnx/pytorch/tensorflow/tensorrt/openvino/python
are Triton backends; the others are MLServer runtimes. The adapter decides what it can serve."""

KSERVE_FRAMEWORKS = {
    "sklearn": "sklearn", "xgboost": "xgboost", "lightgbm": "lightgbm", "catboost": "catboost",
    "mlflow": "mlflow", "huggingface": "huggingface", "onnx": "onnx", "pytorch": "pytorch",
    "tensorflow": "tensorflow", "triton": "triton", "tensorrt": "tensorrt", "openvino": "openvino",
}
"""KServe `modelSpec.framework` -> our runtime. Others (pmml, paddle, ...) are rejected."""

NATIVE_KEYS = frozenset({
    "name", "uri", "storageUri", "runtime", "implementation", "version", "memory", "gpuMemory",
    "gpu_memory", "pinned", "preload", "sha256", "storageKey", "storage_key", "parameters",
})
IGNORED_KEYS = frozenset({"description", "labels", "annotations"})
"""Accepted and ignored (free-form notes). So are keys starting with "x-". Anything else is a
typo until proven otherwise: the entry is rejected, naming the key."""

KSERVE_ENTRY_KEYS = frozenset({"modelName", "modelSpec"})
KSERVE_SPEC_KEYS = frozenset({"storageUri", "framework", "memory"})

_ALIASES = (("uri", "storageUri"), ("gpuMemory", "gpu_memory"), ("storageKey", "storage_key"))
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_IMPL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_QUANTITY_HINT = "(expected e.g. 512Mi, 1G, 1048576)"


class _Reject(Exception):
    """One entry is bad; the message says which field and why."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, str) else repr(value)


def _check_name(value: Any, field_name: str = "name") -> str:
    if not isinstance(value, str):
        raise _Reject(f"{field_name}: expected a string, got {_describe(value)} (quote it in YAML)")
    if not _NAME_RE.match(value) or ".." in value:
        raise _Reject(
            f"{field_name}: {value!r} is not a safe model name (1-128 of letters, digits, '_', '.', '-', "
            "starting with a letter or digit, no '..')"
        )
    return value


def _check_uri(value: Any, field_name: str) -> str:
    """The puller's parser decides (one notion of a valid URI); its message names the URI redacted."""
    if not isinstance(value, str) or not value.strip():
        raise _Reject(f"{field_name}: expected a URI string, got {_describe(value)}")
    uri = value.strip()
    problem = _uri_problem(uri)
    if problem is not None:
        raise _Reject(f"{field_name}: {problem}")
    return uri


@functools.lru_cache(maxsize=16384)
def _uri_problem(uri: str) -> str | None:
    """parse_uri's verdict, remembered: a 1,000-model config re-checks the same URIs on every edit."""
    try:
        parse_uri(uri)
    except BadURI as exc:
        return str(exc)
    return None


def _check_source(value: Any, field_name: str) -> str | tuple[tuple[str, str], ...]:
    if isinstance(value, dict):
        if not value:
            raise _Reject(f"{field_name}: empty mapping (give a URI, or sub-model name -> URI pairs)")
        pairs = []
        for sub, uri in value.items():
            _check_name(sub, f"{field_name}.{sub}" if isinstance(sub, str) else field_name)
            pairs.append((sub, _check_uri(uri, f"{field_name}.{sub}")))
        return tuple(sorted(pairs))
    return _check_uri(value, field_name)


def _check_quantity(value: Any, field_name: str) -> int | None:
    if value is None:
        return None
    try:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"not a whole number of bytes: {value!r} {_QUANTITY_HINT}")
        qty = parse_quantity(value)
    except ValueError as exc:
        msg = str(exc)
        if _QUANTITY_HINT not in msg:
            msg = f"{msg} {_QUANTITY_HINT}"
        raise _Reject(f"{field_name}: {msg}") from None
    if qty <= 0:
        raise _Reject(f"{field_name}: must be more than 0 bytes, got {value!r} {_QUANTITY_HINT}")
    return qty


def _check_bool(value: Any, field_name: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _Reject(f"{field_name}: expected true or false, got {_describe(value)}")
    return value


def _check_str(value: Any, field_name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Reject(f"{field_name}: expected a string, got {_describe(value)} (quote it in YAML)")
    text = str(value).strip()
    if not text:
        raise _Reject(f"{field_name}: empty string")
    return text


def _check_runtime(value: Any, field_name: str = "runtime") -> str:
    if value is None:
        return "sklearn"
    if not isinstance(value, str):
        raise _Reject(f"{field_name}: expected a string, got {_describe(value)}")
    runtime = value.strip().lower()
    if runtime not in RUNTIMES:
        raise _Reject(f"{field_name}: unknown runtime {value!r} (known: {', '.join(sorted(RUNTIMES))})")
    return runtime


def _resolve_aliases(entry: dict[str, Any]) -> dict[str, Any]:
    out = dict(entry)
    for key, alias in _ALIASES:
        if alias in out:
            if key in out:
                raise _Reject(f"{key} and {alias} are the same field: give one of them")
            out[key] = out.pop(alias)
    return out


def _native_entry(entry: dict[str, Any]) -> ModelSpec:
    unknown = sorted(
        str(k) for k in entry
        if k not in NATIVE_KEYS and k not in IGNORED_KEYS and not (isinstance(k, str) and k.startswith("x-"))
    )
    if unknown:
        hint = ""
        if any(k in KSERVE_ENTRY_KEYS or k in KSERVE_SPEC_KEYS for k in unknown):
            hint = " (a KServe entry needs both modelName and modelSpec)"
        raise _Reject(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}{hint}; "
            f"known: {', '.join(sorted(NATIVE_KEYS))}"
        )
    e = _resolve_aliases(entry)
    if "name" not in e:
        raise _Reject("name: missing")
    name = _check_name(e["name"])
    if e.get("uri") is None:
        raise _Reject("uri: missing (or storageUri)")
    source = _check_source(e["uri"], "uri")
    runtime = _check_runtime(e.get("runtime"))
    implementation = _check_str(e.get("implementation"), "implementation")
    if implementation is not None and not _IMPL_RE.match(implementation):
        raise _Reject(f"implementation: {implementation!r} is not a class path (e.g. mlserver_sklearn.SKLearnModel)")
    if runtime == "mlserver" and implementation is None:
        raise _Reject("implementation: missing; runtime 'mlserver' needs the MLServer class path (e.g. mymodule.MyModel)")
    sha = _check_str(e.get("sha256"), "sha256")
    if sha is not None:
        sha = sha.lower().removeprefix("sha256:")
        if not _SHA256_RE.match(sha):
            raise _Reject(f"sha256: expected 64 hex digits, got {e['sha256']!r}")
    parameters = e.get("parameters")
    if parameters is None:
        parameters = {}
    elif not isinstance(parameters, dict):
        raise _Reject(f"parameters: expected a mapping, got {_describe(parameters)}")
    elif any(not isinstance(k, str) for k in parameters):
        raise _Reject("parameters: keys must be strings")
    return ModelSpec(
        name=name,
        source=source,
        runtime=runtime,
        implementation=implementation,
        version=_check_str(e.get("version"), "version"),
        memory=_check_quantity(e.get("memory"), "memory"),
        gpu_memory=_check_quantity(e.get("gpuMemory"), "gpuMemory"),
        pinned=_check_bool(e.get("pinned"), "pinned", False),
        preload=_check_bool(e.get("preload"), "preload", True),
        sha256=sha,
        storage_key=_check_str(e.get("storageKey"), "storageKey"),
        parameters=parameters,
    )


def _kserve_entry(entry: dict[str, Any]) -> ModelSpec:
    unknown = sorted(map(str, set(entry) - KSERVE_ENTRY_KEYS))
    if unknown:
        raise _Reject(f"unknown key(s) {', '.join(map(repr, unknown))} in a KServe entry (known: modelName, modelSpec)")
    name = _check_name(entry["modelName"], "modelName")
    spec = entry["modelSpec"]
    if not isinstance(spec, dict):
        raise _Reject(f"modelSpec: expected a mapping, got {_describe(spec)}")
    unknown = sorted(map(str, set(spec) - KSERVE_SPEC_KEYS))
    if unknown:
        raise _Reject(f"modelSpec: unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(sorted(KSERVE_SPEC_KEYS))})")
    if spec.get("storageUri") is None:
        raise _Reject("modelSpec.storageUri: missing")
    framework = spec.get("framework")
    if not isinstance(framework, str) or not framework.strip():
        raise _Reject(f"modelSpec.framework: missing or not a string (one of: {', '.join(sorted(KSERVE_FRAMEWORKS))})")
    runtime = KSERVE_FRAMEWORKS.get(framework.strip().lower())
    if runtime is None:
        raise _Reject(f"modelSpec.framework: {framework!r} is not supported (supported: {', '.join(sorted(KSERVE_FRAMEWORKS))})")
    return ModelSpec(
        name=name,
        source=_check_uri(spec["storageUri"], "modelSpec.storageUri"),
        runtime=runtime,
        memory=_check_quantity(spec.get("memory"), "modelSpec.memory"),
    )


def _entry_name(entry: Any) -> str | None:
    if isinstance(entry, dict):
        name = entry.get("name", entry.get("modelName"))
        if isinstance(name, (str, int)) and not isinstance(name, bool):
            return str(name)
    return None


def _too_deep(filename: str, limits: ConfigLimits, where: str = "") -> ConfigParseError:
    return ConfigParseError(
        filename, f"nested deeper than {limits.max_depth} levels{where} (limit: --max-config-depth)")


def _load_document(text: str, filename: str, limits: ConfigLimits) -> Any:
    """The document as Python data. Nesting the parser itself refuses (libyaml stops at 1,000
    levels, json at the interpreter's recursion limit) is reported as the depth limit."""
    if len(text) > limits.max_bytes:  # characters <= bytes: load_config_dir checks the bytes
        raise ConfigParseError(filename, f"{len(text)} characters is over the limit of {limits.max_bytes} bytes (limit: --max-config-bytes)")
    if filename.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigParseError(filename, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        except RecursionError:
            raise _too_deep(filename, limits) from None
    try:
        return yaml.load(text, Loader=_YAMLLoader)  # noqa: S506 - a safe loader
    except RecursionError:  # the pure-Python loader (no libyaml) recurses per level
        raise _too_deep(filename, limits) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if "maximum nesting depth" in problem:
            raise _too_deep(filename, limits, where) from None
        raise ConfigParseError(filename, f"not valid YAML: {problem}{where}") from None


class _Shape:
    """Counts a document's values and bounds its nesting against ConfigLimits.

    A YAML alias is one shared object here (the loader builds it once), but everything after
    (validation, digests, status, the server's settings file) would copy it: so its values
    count at every use. Shared objects are measured once (memo by id), so a 500-byte alias bomb
    is rejected after a few dozen steps, in microseconds. Depth 1 is the document itself."""

    def __init__(self, filename: str, limits: ConfigLimits):
        self.filename, self.limits = filename, limits
        self.total = 0
        self._memo: dict[int, tuple[int, int]] = {}  # id -> (values below, levels below)

    def add(self, obj: Any, depth: int) -> None:
        """Count `obj` (a value at `depth`) and everything below it."""
        self.total += 1
        if type(obj) is dict or type(obj) is list:
            self.total += self._measure(obj, depth)[0]
        if self.total > self.limits.max_nodes:
            raise self.too_many()

    def check_depth(self, depth: int) -> None:
        if depth > self.limits.max_depth:
            raise _too_deep(self.filename, self.limits)

    def too_many(self) -> ConfigParseError:
        return ConfigParseError(
            self.filename, f"more than {self.limits.max_nodes} values (YAML aliases counted at each use) "
            "(limit: --max-config-nodes)")

    def _measure(self, obj: Any, depth: int) -> tuple[int, int]:
        seen = self._memo.get(id(obj))
        if seen is not None:
            self.check_depth(depth + seen[1])
            return seen
        self.check_depth(depth)
        values = obj.values() if type(obj) is dict else obj
        count, height = len(values), 0
        for value in values:
            if type(value) is dict or type(value) is list:
                below, levels = self._measure(value, depth + 1)
                count += below
                height = max(height, levels + 1)
        if count > self.limits.max_nodes:
            raise self.too_many()
        self._memo[id(obj)] = (count, height)
        return count, height


def _model_list(doc: Any, filename: str) -> tuple[list[Any], list[ConfigError]]:
    notes: list[ConfigError] = []
    if doc is None:
        raise ConfigParseError(
            filename, "empty document (write [] or 'models: []' to serve no models; an empty file is taken "
            "for a half-written one)"
        )
    if isinstance(doc, dict):
        if "models" not in doc:
            keys = ", ".join(map(repr, list(doc)[:5]))
            raise ConfigParseError(filename, f"a mapping at the top needs a 'models' list (found keys {keys})")
        extra = sorted(str(k) for k in doc if k != "models")
        if extra:
            notes.append(ConfigError(filename, None, None, f"top-level key(s) {', '.join(map(repr, extra))} ignored (only 'models' is read)"))
        doc = doc["models"] if doc["models"] is not None else []
        if not isinstance(doc, list):
            raise ConfigParseError(filename, f"'models' must be a list, got {type(doc).__name__}")
        return doc, notes
    if not isinstance(doc, list):
        raise ConfigParseError(filename, f"top level must be a list of models or a mapping with 'models', got {type(doc).__name__}")
    return doc, notes


def parse_config(text: str, filename: str, limits: ConfigLimits | None = None, *,
                 digest: str | None = None) -> ConfigResult:
    """Parse one config file's text (format from the name: .json is JSON, else YAML).

    Bad entries come back in `errors` and the rest apply; a document that does not parse, that
    is past one of `limits`, or whose top level is not a list of models (or {"models": [...]})
    raises ConfigParseError.
    """
    global _previous
    limits = limits or ConfigLimits()
    doc = _load_document(text, filename, limits)
    shape = _Shape(filename, limits)
    entries, errors = _model_list(doc, filename)
    depth = 2  # of an entry: the document is a list of entries...
    if type(doc) is dict:  # ...or a mapping whose 'models' is that list
        depth = 3
        for key, value in doc.items():
            if key != "models":
                shape.add(value, 2)
    shape.check_depth(depth)
    shape.total += 1 + len(entries)
    models: dict[str, ModelSpec] = {}
    first_index: dict[str, int] = {}  # a name belongs to its first entry, even a rejected one
    previous, keys = _previous, []
    reuse = previous.get
    for index, entry in enumerate(entries):
        key, spec = None, None
        if type(entry) is dict:
            try:  # an entry of scalars (the usual one) is its own key: one flat tuple, built and hashed in C
                key = (*entry, *entry.values(), *map(type, entry.values()))  # the types: 1 == True in Python
                spec = reuse(key)
            except TypeError:  # a list or mapping inside (parameters, sub-models): measured first
                shape.add(entry, depth)
                shape.total -= 1  # counted with the list
                key = json.dumps(entry, sort_keys=True, default=str)
                spec = reuse(key)
            else:
                shape.total += len(entry)
            if spec is not None and spec.name not in first_index:  # unchanged content: nothing to check
                first_index[spec.name] = index
                keys.append(key)
                models[spec.name] = spec
                continue
        name = spec.name if spec is not None else _entry_name(entry)
        try:
            if key is None:
                raise _Reject(f"expected a mapping with name and uri, got {_describe(entry)}")
            if name is not None:
                if name in first_index:
                    raise _Reject(f"duplicate name: {filename}[{first_index[name]}] already defines {name!r}; this entry is ignored")
                first_index[name] = index
            if spec is None:
                is_kserve = "modelName" in entry and "modelSpec" in entry
                spec = previous[key] = _kserve_entry(entry) if is_kserve else _native_entry(entry)
            keys.append(key)
        except _Reject as exc:
            errors.append(ConfigError(filename, name, index, str(exc)))
            continue
        models[spec.name] = spec
    if shape.total > limits.max_nodes:
        raise shape.too_many()
    if len(previous) > 2 * len(keys) + 64:  # contents no longer in the file pile up: keep this file's
        _previous = {k: previous[k] for k in keys}
    return ConfigResult(models=models, errors=tuple(errors), file=filename,
                        digest=digest if digest is not None else _sha256(text.encode()))


# Accepted entries by their raw content: an edit of one model among 1,000 validates one entry,
# and the others keep their ModelSpec object (so the reconciler's diff sees them as identical
# without comparing). A spec depends on its entry's content alone, so entries of earlier parses
# may stay; each entry is hashed once per parse (looked up, and inserted only when new), and the
# dict is cut back to the current file's entries when it grows past twice their number.
_previous: dict[Any, ModelSpec] = {}


def find_config_file(path: Path) -> tuple[Path | None, list[str]]:
    """The config file to read in `path` (first of CONFIG_FILES present) and the others present.

    A name is present when it exists as a directory entry, even as a dangling symlink: a
    broken models.yaml is reported as unreadable, never skipped for the next name."""
    present = [name for name in CONFIG_FILES if os.path.lexists(os.path.join(path, name))]
    return (Path(path) / present[0] if present else None), present[1:]


def _unreadable(path: Path, exc: OSError) -> ConfigUnreadable:
    why = exc.strerror or str(exc)
    if os.path.islink(path):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        kind = "symlink loop" if exc.errno == errno.ELOOP else "dangling symlink"
        why = f"{kind} -> {target} ({why})"
    return ConfigUnreadable(path.name, f"config file unreadable: {why}")


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    """The file's bytes, at most max_bytes of them; only a regular file is read (a FIFO or a
    device under the name would block or never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    too_big = f"over the limit of {max_bytes} bytes (limit: --max-config-bytes)"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ConfigUnreadable(path.name, f"config file unreadable: {kind}")
        if st.st_size > max_bytes:
            raise ConfigParseError(path.name, f"{st.st_size} bytes is {too_big}")
        chunks, left = [], max_bytes + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # it grew after the stat
        raise ConfigParseError(path.name, f"the file is {too_big}")
    return data


@dataclass(frozen=True)
class RawConfig:
    """A config directory's file, read but not parsed: cheap to compare with the last one."""

    file: str | None  # the name read; None: no config file present
    data: bytes
    ignored: tuple[str, ...]  # other config names present (not read)
    digest: str  # sha256 of data

    @property
    def identity(self) -> tuple[str | None, str, tuple[str, ...]]:
        return (self.file, self.digest, self.ignored)


def read_config_dir(path: Path, limits: ConfigLimits | None = None) -> RawConfig:
    """Read the config file of a directory (a mounted ConfigMap or a plain one) without parsing.

    Reads through the normal names (models.yaml -> ..data/models.yaml in a ConfigMap), never
    the dotfiles. No config file -> RawConfig(file=None). Raises ConfigParseError when the
    directory is missing, ConfigUnreadable when the file cannot be read, ConfigParseError when
    it is past limits.max_bytes."""
    path = Path(path)
    limits = limits or ConfigLimits()
    if not path.is_dir():
        raise ConfigParseError(str(path), "config directory does not exist (or is not a directory)")
    chosen, ignored = find_config_file(path)
    data = _read_bytes(chosen, limits.max_bytes) if chosen is not None else b""
    return RawConfig(chosen.name if chosen else None, data, tuple(ignored), _sha256(data))


def parse_raw(raw: RawConfig, limits: ConfigLimits | None = None) -> ConfigResult:
    """Parse what read_config_dir read. No file -> an empty set with file=None."""
    if raw.file is None:
        return ConfigResult(models={}, errors=(), file=None, digest=raw.digest)
    try:
        text = raw.data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigParseError(raw.file, f"not UTF-8 text (byte {exc.start})") from None
    result = parse_config(text, raw.file, limits, digest=raw.digest)
    notes = tuple(
        ConfigError(raw.file, None, None, f"{other} ignored: {raw.file} is read first (keep one config file)")
        for other in raw.ignored
    )
    return ConfigResult(models=result.models, errors=notes + result.errors, file=raw.file, digest=raw.digest)


def load_config_dir(path: Path, limits: ConfigLimits | None = None) -> ConfigResult:
    """Read and parse the model config in a directory (read_config_dir, then parse_raw).

    No config file -> an empty set with file=None. A missing directory, a file that cannot be
    read, is past a limit or does not parse raises ConfigParseError: the caller keeps its last
    good config."""
    return parse_raw(read_config_dir(path, limits), limits)
