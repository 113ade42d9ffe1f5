"""MLServer behind the RuntimeAdapter interface.

The repository dir holds exactly the models that are loaded or loading (MLServer re-globs the
whole dir on every load and lists every entry in its index): an entry is written just before
its load, restored or removed when the load fails, and removed right after its unload.

One entry: `<repo>/<name>/model-settings.json` (name, implementation, parameters.uri pointing
into the cache, version, the model's parameters) plus `modelshelf.json` (the ServedModel, so
an agent restarting against a running server can tell what each entry serves). For
`runtime: mlserver` the model dir's top-level `*.py` files are linked into the entry, because
MLServer imports `implementation` with the entry's folder on sys.path.

Server quirks handled here: the index wants a JSON body (`{}`; none -> 422); a model that is not
on disk -> 404, a bad URI -> 422 and a broken model -> 500 with a plain-text traceback (trimmed
to its last line); unload is synchronous; loading a loaded name loads the new copy before
unloading the old one (MLServer's registry guarantees it).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from agent.runtimes.base import (
    LoadFailed,
    RuntimeAdapter,
    RuntimeErrorBase,
    ServedModel,
    ServerUnavailable,
)
from agent.runtimes.process import OnRestart, ServerHandle, ServerProcess, free_port

log = logging.getLogger("modelshelf.runtimes.mlserver")

SETTINGS_FILE = "model-settings.json"
ENTRY_FILE = "modelshelf.json"

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


def _check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise LoadFailed(name, "name is not usable as a repository entry")


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)  # atomic: a concurrent re-glob never reads half a file


def served_to_json(model: ServedModel) -> dict[str, Any]:
    doc = asdict(model)
    doc["path"] = str(model.path)
    return doc


def served_from_json(doc: dict[str, Any]) -> ServedModel:
    return ServedModel(
        name=doc["name"],
        path=Path(doc["path"]),
        runtime=doc["runtime"],
        implementation=doc.get("implementation"),
        version=doc.get("version"),
        parameters=doc.get("parameters") or {},
    )


_STATES = {"READY": "READY", "UNAVAILABLE": "UNAVAILABLE", "UNKNOWN": "LOADING", "LOADING": "LOADING", "UNLOADING": "UNLOADING"}


class _TimedOut(ServerUnavailable):
    """The server took longer than our timeout; it may still complete the operation."""


class MLServerAdapter(RuntimeAdapter):
    """An MLServer, embedded (a child process on loopback; `base_url=None`) or a sidecar at
    `base_url` that reads the same `repository` dir. Call `start()` before use, `stop()` at the end."""

    kind = "mlserver"

    def __init__(
        self,
        repository: Path,
        base_url: str | None = None,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        workdir: Path | None = None,
        env: dict[str, str] | None = None,
        log_file: Path | None = None,
        on_restart: OnRestart | None = None,
        load_timeout: float = 120.0,
        request_timeout: float = 10.0,
        sidecar_interval: float | None = 2.0,
    ):
        self.repository = Path(repository).resolve()
        self.repository.mkdir(parents=True, exist_ok=True)
        self.load_timeout = load_timeout
        self._own_workdir: Path | None = None
        process = None
        if base_url is None:
            http_port = http_port or free_port(host)
            grpc_port = grpc_port or free_port(host)
            metrics_port = metrics_port or free_port(host)
            if workdir is None:
                workdir = self._own_workdir = Path(tempfile.mkdtemp(prefix="modelshelf-mlserver-"))
            process = self._build_process(host, http_port, grpc_port, metrics_port, Path(workdir), env, log_file)
            base_url = f"http://{host}:{http_port}"
        self._server = ServerHandle(base_url, process=process, name="mlserver", sidecar_interval=sidecar_interval)
        self._server.on_restart = on_restart
        self._http = httpx.AsyncClient(
            base_url=self._server.base_url,
            timeout=httpx.Timeout(request_timeout, connect=2.0),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            trust_env=False,
        )

    @classmethod
    def embedded(cls, repository: Path, **kwargs: Any) -> "MLServerAdapter":
        """An adapter that starts its own MLServer on loopback (free ports unless given)."""
        kwargs.pop("base_url", None)
        return cls(repository, None, **kwargs)

    # -- lifecycle ------------------------------------------------------------------------

    def _build_process(self, host: str, http_port: int, grpc_port: int, metrics_port: int, workdir: Path, env: dict[str, str] | None, log_file: Path | None) -> ServerProcess:
        settings = {
            "host": host,
            "http_port": http_port,
            "grpc_port": grpc_port,
            "metrics_port": metrics_port,
            "parallel_workers": 0,  # TRAP: the default (1) crashes with uvloop>=0.22; 0 is also faster
            "load_models_at_startup": False,  # the agent decides what loads
        }
        _write_json(self.repository / "settings.json", settings)
        child_env = {k: v for k, v in (os.environ if env is None else env).items() if not k.startswith("MLSERVER_MODEL_")}
        child_env.update(
            MLSERVER_HOST=host,
            MLSERVER_HTTP_PORT=str(http_port),
            MLSERVER_GRPC_PORT=str(grpc_port),
            MLSERVER_METRICS_PORT=str(metrics_port),
            MLSERVER_PARALLEL_WORKERS="0",
            MLSERVER_LOAD_MODELS_AT_STARTUP="false",
        )
        argv = [sys.executable, "-c", "import sys; from mlserver.cli import main; sys.exit(main())", "start", str(self.repository)]
        return ServerProcess(argv, ready_url=f"http://{host}:{http_port}/v2/health/ready", env=child_env, cwd=workdir, name="mlserver", log_file=log_file)

    async def start(self, timeout: float = 60.0) -> None:
        """Embedded: spawn MLServer and wait for it. Sidecar: wait for it and watch it."""
        await self._server.start(timeout)

    async def stop(self) -> None:
        """Close connections and stop the embedded server (a sidecar keeps running)."""
        await self.close()
        await self._server.stop()
        if self._own_workdir is not None:
            shutil.rmtree(self._own_workdir, ignore_errors=True)

    @property
    def on_restart(self) -> OnRestart | None:
        return self._server.on_restart

    @on_restart.setter
    def on_restart(self, fn: OnRestart | None) -> None:
        """Awaited after the server came back from a restart (its registry is then empty)."""
        self._server.on_restart = fn

    @property
    def process(self) -> ServerProcess | None:
        """The embedded server's process (None in sidecar mode)."""
        return self._server.process

    @property
    def restarts(self) -> int:
        return self._server.restarts

    def pids(self) -> list[int]:
        """PIDs of the embedded server's process tree ([] in sidecar mode)."""
        return self._server.pids()

    # -- RuntimeAdapter -------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self._server.base_url

    async def wait_ready(self, timeout: float) -> None:
        await self._server.wait_ready(timeout)

    async def is_ready(self) -> bool:
        return await self._server.is_ready()

    async def close(self) -> None:
        await self._http.aclose()

    async def index(self) -> dict[str, str]:
        r = await self._post("/v2/repository/index", None, json={})  # TRAP: no body -> 422
        if r.status_code != 200:
            raise RuntimeErrorBase(None, f"index failed: {server_reason(r)}")
        # MLServer lists every entry on disk; UNKNOWN there means registered but not ready yet
        return {item["name"]: _STATES.get(item.get("state"), "UNKNOWN") for item in r.json()}

    async def model_state(self, name: str) -> str | None:
        """The server's state for one model ("READY", "UNAVAILABLE", ...), None if unknown."""
        return (await self.index()).get(name)

    async def model_ready(self, name: str) -> bool:
        """GET /v2/models/{name}/ready: True only when the server serves it now."""
        try:
            r = await self._http.get(f"/v2/models/{name}/ready")
        except (httpx.HTTPError, OSError):
            return False
        return r.status_code == 200

    async def load(self, model: ServedModel) -> None:
        _check_name(model.name)
        if not Path(model.path).exists():
            raise LoadFailed(model.name, f"model files not found at {model.path}")
        doc = model_settings(model)
        entry = self.repository / model.name
        previous = self._read_entry(entry)
        self._write_entry(entry, model, doc)
        t0 = time.monotonic()
        try:
            r = await self._post(f"/v2/repository/models/{model.name}/load", model.name, timeout=self.load_timeout)
        except _TimedOut:
            raise  # the server may still be loading it: keep its entry (unload cleans up)
        except ServerUnavailable:
            self._restore_entry(entry, previous)
            raise
        if r.status_code != 200:
            self._restore_entry(entry, previous)
            raise LoadFailed(model.name, server_reason(r))
        log.info("event=model_loaded server=mlserver model=%s seconds=%.3f replaced=%s", model.name, time.monotonic() - t0, previous is not None)

    async def unload(self, name: str) -> None:
        _check_name(name)
        t0 = time.monotonic()
        r = await self._post(f"/v2/repository/models/{name}/unload", name)
        if r.status_code not in (200, 404):  # 404: not loaded, which is what we want
            raise RuntimeErrorBase(name, f"unload failed: {server_reason(r)}")
        shutil.rmtree(self.repository / name, ignore_errors=True)
        log.info("event=model_unloaded server=mlserver model=%s seconds=%.3f", name, time.monotonic() - t0)

    def served_path(self, name: str) -> Path | None:
        """The model path the entry of `name` was written for (None: no entry of ours)."""
        served = self.entry(name)
        return served.path if served is not None else None

    def repository_entries(self) -> set[str]:
        try:
            return {p.name for p in self.repository.iterdir() if (p / SETTINGS_FILE).is_file()}
        except FileNotFoundError:
            return set()

    def entry(self, name: str) -> ServedModel | None:
        """The ServedModel an entry was written for (None if absent or written by someone else)."""
        doc = self._read_entry(self.repository / name)
        if doc is None or ENTRY_FILE not in doc:
            return None
        try:
            return served_from_json(doc[ENTRY_FILE])
        except (KeyError, TypeError):
            return None

    # -- internals ------------------------------------------------------------------------

    async def _post(self, path: str, model: str | None, *, json: Any = None, timeout: float | None = None) -> httpx.Response:
        kwargs: dict[str, Any] = {}
        if timeout is not None:
            kwargs["timeout"] = httpx.Timeout(timeout, connect=2.0)
        try:
            try:
                return await self._http.post(path, json=json, **kwargs)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                # uvicorn closes a keep-alive connection after a 500; a pooled request can
                # race that close. The request was not processed: send it once more.
                return await self._http.post(path, json=json, **kwargs)
        except httpx.TimeoutException as e:
            raise _TimedOut(model, f"mlserver at {self.base_url} timed out ({type(e).__name__})") from None
        except (httpx.HTTPError, OSError) as e:
            raise ServerUnavailable(model, f"mlserver at {self.base_url} unreachable ({type(e).__name__})") from None

    @staticmethod
    def _read_entry(entry: Path) -> dict[str, Any] | None:
        """The entry's files as {file name: parsed JSON} (None if it has no settings)."""
        try:
            out = {SETTINGS_FILE: json.loads((entry / SETTINGS_FILE).read_text())}
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        try:
            out[ENTRY_FILE] = json.loads((entry / ENTRY_FILE).read_text())
        except (FileNotFoundError, ValueError):
            pass
        links = {p.name: os.readlink(p) for p in entry.iterdir() if p.is_symlink()}
        if links:
            out["links"] = links
        return out

    def _write_entry(self, entry: Path, model: ServedModel, doc: dict[str, Any]) -> None:
        entry.mkdir(parents=True, exist_ok=True)
        wanted: dict[str, str] = {}
        if model.runtime == "mlserver" and Path(model.path).is_dir():
            # MLServer imports `implementation` with the entry's folder on sys.path
            wanted = {p.name: str(p.resolve()) for p in Path(model.path).glob("*.py")}
        self._set_links(entry, wanted)
        _write_json(entry / ENTRY_FILE, served_to_json(model))
        _write_json(entry / SETTINGS_FILE, doc)  # last: the glob finds the entry only now

    @staticmethod
    def _set_links(entry: Path, wanted: dict[str, str]) -> None:
        for p in entry.iterdir():
            if p.is_symlink() and p.name not in wanted:
                p.unlink()
        for name, target in wanted.items():
            tmp = entry / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            os.replace(tmp, entry / name)

    def _restore_entry(self, entry: Path, previous: dict[str, Any] | None) -> None:
        """After a failed load: put back what served before, or remove the entry."""
        if previous is None:
            shutil.rmtree(entry, ignore_errors=True)
            return
        self._set_links(entry, previous.get("links", {}))
        if ENTRY_FILE in previous:
            _write_json(entry / ENTRY_FILE, previous[ENTRY_FILE])
        else:
            (entry / ENTRY_FILE).unlink(missing_ok=True)
        _write_json(entry / SETTINGS_FILE, previous[SETTINGS_FILE])


__all__ = ["MLServerAdapter", "IMPLEMENTATIONS", "model_settings", "model_uri", "server_reason"]
