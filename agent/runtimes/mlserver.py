"""MLServer behind the RuntimeAdapter interface: its quirks on top of `common.HTTPServerAdapter`
(which holds the server process, the HTTP client and the repository protocol).

The repository dir holds exactly the models that are loaded or loading (MLServer re-globs the
whole dir on every load and lists every entry in its index): an entry is written just before
its load, restored or removed when the load fails, and removed right after its unload.

One entry: `<repo>/<name>/model-settings.json` (name, implementation, parameters.uri pointing
into the cache, version, the model's parameters) plus `modelshelf.json` (the ServedModel). For
`runtime: mlserver` the model dir's top-level `*.py` files are linked into the entry, because
MLServer imports `implementation` with the entry's folder on sys.path. The server starts with
`settings.json` in the repository dir and the same settings as MLSERVER_* env vars.

Server quirks handled here: the index wants a JSON body (`{}`; none -> 422); a model that is not
on disk -> 404, a bad URI -> 422 and a broken model -> 500 with a plain-text traceback (trimmed
to its last line); the index says UNKNOWN for a model registered but not ready yet; unload is
synchronous; loading a loaded name loads the new copy before unloading the old one (MLServer's
registry guarantees it).
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import httpx

from agent.runtimes.base import LoadFailed, ServedModel
from agent.runtimes.common import HTTPServerAdapter, Listen, write_json

SETTINGS_FILE = "model-settings.json"

IMPLEMENTATIONS = {
    "sklearn": "mlserver_sklearn.SKLearnModel",
    "xgboost": "mlserver_xgboost.XGBoostModel",
    "lightgbm": "mlserver_lightgbm.LightGBMModel",
    "mlflow": "mlserver_mlflow.MLflowRuntime",
    "huggingface": "mlserver_huggingface.HuggingFaceRuntime",
}

# The file names each runtime finds by itself in a dir; else the single file with a known suffix.
_WELLKNOWN = {
    "sklearn": (("model.joblib", "model.pickle", "model.pkl"), (".joblib", ".pkl", ".pickle")),
    "xgboost": (("model.bst", "model.json", "model.ubj"), (".bst", ".json", ".ubj")),
    "lightgbm": (("model.bst",), (".bst", ".txt")),
}


def implementation_for(model: ServedModel) -> str:
    """The MLServer implementation class for a model; LoadFailed when there is none."""
    if model.runtime == "mlserver" or model.implementation:
        if not model.implementation:
            raise LoadFailed(model.name, "runtime 'mlserver' needs an implementation (module.Class)")
        return model.implementation
    try:
        return IMPLEMENTATIONS[model.runtime]
    except KeyError:
        known = ", ".join(sorted([*IMPLEMENTATIONS, "mlserver"]))
        raise LoadFailed(model.name, f"runtime {model.runtime!r} is not served by MLServer (known: {known})") from None


def model_uri(model: ServedModel) -> str:
    """What goes into parameters.uri: the file itself, the dir when the runtime finds its file
    there by a well-known name, else the single model file with a known suffix, else the dir."""
    path = Path(model.path).resolve()
    if path.is_file() or model.runtime not in _WELLKNOWN:
        return str(path)
    names, suffixes = _WELLKNOWN[model.runtime]
    if any((path / n).is_file() for n in names):
        return str(path)
    candidates = [p for p in path.iterdir() if p.is_file() and p.suffix in suffixes]
    return str(candidates[0]) if len(candidates) == 1 else str(path)


def model_settings(model: ServedModel) -> dict[str, Any]:
    """The model-settings.json document for a model."""
    params: dict[str, Any] = {"uri": model_uri(model)}
    if model.version is not None:
        params["version"] = str(model.version)
    for key, value in (model.parameters or {}).items():
        if key in ("uri", "version"):
            continue  # the adapter owns these
        params[key] = value
    return {"name": model.name, "implementation": implementation_for(model), "parameters": params}


_FRAME_RE = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def server_reason(response: httpx.Response) -> str:
    """The server's error, short: its first line, plus the last line of a traceback."""
    text = response.text or ""
    try:
        body = response.json()
        if isinstance(body, dict):
            text = str(body.get("error") or body.get("detail") or text)
    except ValueError:
        pass
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return f"HTTP {response.status_code}"
    if lines[0].startswith("Traceback"):
        reason = lines[-1]
        frames = _FRAME_RE.findall(text)
        if frames:  # where it was raised: the deepest frame
            file, line, func = frames[-1]
            reason += f" (in {func}, {os.path.basename(file)}:{line})"
    elif len(lines) > 1 and "Traceback" in text and lines[-1] != lines[0]:
        reason = f"{lines[0]} ... {lines[-1]}"
    else:
        reason = lines[0]
    if len(reason) > 300:
        reason = reason[:297] + "..."
    return f"HTTP {response.status_code}: {reason}"


_STATES = {"READY": "READY", "UNAVAILABLE": "UNAVAILABLE", "UNKNOWN": "LOADING", "LOADING": "LOADING", "UNLOADING": "UNLOADING"}


class MLServerAdapter(HTTPServerAdapter):
    """An MLServer, embedded (a child process on loopback; `base_url=None`) or a sidecar at
    `base_url` that reads the same `repository` dir. Call `start()` before use, `stop()` at the end."""

    kind = "mlserver"
    entry_file = SETTINGS_FILE

    def _server_command(self, listen: Listen, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        settings = {
            "host": listen.host,
            "http_port": listen.http_port,
            "grpc_port": listen.grpc_port,
            "metrics_port": listen.metrics_port,
            "parallel_workers": 0,  # TRAP: the default (1) crashes with uvloop>=0.22; 0 is also faster
            "load_models_at_startup": False,  # the agent decides what loads
        }
        write_json(self.repository / "settings.json", settings)
        child_env = {k: v for k, v in env.items() if not k.startswith("MLSERVER_MODEL_")}
        child_env.update(
            MLSERVER_HOST=listen.host,
            MLSERVER_HTTP_PORT=str(listen.http_port),
            MLSERVER_GRPC_PORT=str(listen.grpc_port),
            MLSERVER_METRICS_PORT=str(listen.metrics_port),
            MLSERVER_PARALLEL_WORKERS="0",
            MLSERVER_LOAD_MODELS_AT_STARTUP="false",
        )
        argv = [sys.executable, "-c", "import sys; from mlserver.cli import main; sys.exit(main())", "start", str(self.repository)]
        return argv, child_env

    def _entry_content(self, model: ServedModel) -> tuple[str, dict[str, str]]:
        text = json.dumps(model_settings(model), indent=1, default=str)
        links: dict[str, str] = {}
        if model.runtime == "mlserver" and Path(model.path).is_dir():
            # MLServer imports `implementation` with the entry's folder on sys.path
            links = {p.name: str(p.resolve()) for p in Path(model.path).glob("*.py")}
        return text, links

    def _index_states(self, items: list[dict[str, Any]]) -> dict[str, str]:
        # MLServer lists every entry on disk; UNKNOWN there means registered but not ready yet
        return {item["name"]: _STATES.get(item.get("state"), "UNKNOWN") for item in items}

    _reason = staticmethod(server_reason)


__all__ = ["MLServerAdapter", "IMPLEMENTATIONS", "SETTINGS_FILE", "model_settings", "model_uri", "server_reason"]
