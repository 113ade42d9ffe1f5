"""MLServer behind the RuntimeAdapter interface: its quirks on top of `common.HTTPServerAdapter`
(which holds the server process, the HTTP client and the repository protocol).

Why loaded models are parked in `<repo>/.loaded/` (the main quirk): MLServer 1.7 answers
`POST /v2/repository/models/{name}/load` by globbing `**/model-settings.json` under the WHOLE
repository dir and parsing every file it finds (pydantic-settings, ~2 ms each) before picking
the one named, on its event loop, so every inference on the server stalls meanwhile. With the
loaded models' entries in the dir, a load cost 7 ms with 2 entries, 60 ms with 30 and 235 ms
with 100; in the density benchmark p95 grew 23x from over-commit ratio 1.0 to 1.5 (goal: 3x).
Python's glob skips dot-directories, and MLServer serves a loaded model from its registry, not
from disk. So an entry is written visibly (`<repo>/<name>/`), loaded, and then moved out of the
glob's sight to `<repo>/.loaded/<name>` (in a thread, like all the adapter's file work, and in
the background: load() answers once the server has the model; the next load or unload of that
name, index() and close() see or wait for the park in flight): a load
costs ~5 ms again however many models are loaded, and p95(1.5)/p95(1.0) fell to ~2x. Measurements and the experiment:
benchmarks/results/density.notes.md (and density.md for the current figures).

An embedded MLServer goes further: its `model_repository_implementation` is
`mlserver_repository.EntryRepository` (imported from this checkout of the agent: the child's
PYTHONPATH starts with it), whose load reads only `<repo>/<name>/model-settings.json`, parses
each entry's content once and imports installed runtimes without MLServer's per-load
`importlib.reload`, and loads a sklearn model's big arrays through a copy-on-write mapping of
its file instead of fresh copies (`load_mapped`; a model that would keep a mapped array is loaded
again the plain way). Parking still keeps MLServer's index (which globs) cheap, and a sidecar
MLServer, which cannot import the agent, relies on it for its loads too.

The visible part of the repository therefore holds only the entries being loaded (and, after
a crash between a load and its park, at worst the entry just loaded). The parked part:

- `.loaded/<name>` is a relative symlink to `.loaded/.<name>.<8 hex>`, the moved entry dir. A
  park renames the visible entry to a fresh `.<name>.<hex>` dir, then swaps the link with one
  `os.replace` (atomic), then removes the dir the link pointed at before: a crash leaves the
  old or the new parked copy, plus at worst the visible entry and unreferenced dot-dirs. Those
  are swept when the adapter starts (an embedded server's parked dir is cleared; a sidecar's
  unreferenced dot-dirs are removed), and for a name whose park failed in this process at its
  next park/unload. A park or unload otherwise touches only that name's link and the dir it
  points at: no listing of `.loaded/` per load or unload (it held one entry per loaded model,
  and its sweep was ~7% of the agent's samples under cold-start traffic, issue 13).
- An update in place (load of a loaded name) writes the new entry visibly and loads it
  (MLServer's glob finds only that one; its registry loads the new copy before dropping the
  old, so serving never stops); only after the load succeeded is the parked copy replaced. A
  failed update removes the visible entry (or puts back the visible one it replaced): the old
  parked copy and the old model keep serving.
- unload: POST unload, then remove the visible entry, the link and the dir it points at.
- entry()/served_path()/repository_entries() look at the parked copy first, then the visible
  one (a visible entry next to a parked one may be a load that never finished: the parked copy
  is what the server is known to serve, and a wrong "unknown" only costs a reload).
- index(): MLServer's own index lists only visible entries; each parked name is asked
  `GET /v2/models/{name}/ready` (200 -> READY, else UNAVAILABLE unless the index said
  otherwise), at most `index_concurrency` at a time. After a server restart the registry is
  empty, so a stale parked entry reads UNAVAILABLE, never READY; the reconciler reloads what
  it wants (each load re-parks) and unloading a name removes its parked leftovers. An embedded
  server starts with nothing loaded, so its parked dir is cleared before it starts. MLServer
  imports a custom `implementation` with the entry's folder on sys.path only during the load:
  moving the folder afterwards changes nothing for the loaded model.

One entry: `<repo>/<name>/model-settings.json` (name, implementation, parameters.uri pointing
into the cache, version, the model's parameters) plus `modelshelf.json` (the ServedModel). For
`runtime: mlserver` the model dir's top-level `*.py` files are linked into the entry, because
MLServer imports `implementation` with the entry's folder on sys.path. The server starts with
`settings.json` in the repository dir and the same settings as MLSERVER_* env vars. Its
`logging_settings` drop the access line MLServer writes per request (REST: `uvicorn.access`,
gRPC: `mlserver.grpc`), which the agent would read from the server's output pipe, a wake-up of
the agent per request; its other lines (start-up, loads, unloads, errors) stay. `debug` stays
on: with it off MLServer answers a failed inference with a bare "Internal Server Error" instead
of the error's reason. A user's MLSERVER_LOGGING_SETTINGS in the agent's environment wins.

Other server quirks handled here: the index wants a JSON body (`{}`; none -> 422); a model that
is not on disk -> 404, a bad URI -> 422 and a broken model -> 500 with a plain-text traceback
(trimmed to its last line); the index says UNKNOWN for a model registered but not ready yet
(and /v2/health/ready answers 400 meanwhile, or nothing while the load blocks its event loop:
`busy_while_loading`); unload is synchronous; loading a loaded name loads the new copy before
unloading the old one (MLServer's registry guarantees it).
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from agent.runtimes.base import LoadFailed, ServedModel, ServerUnavailable
from agent.quantity import parse_quantity
from agent.runtimes.common import Answer, HTTPServerAdapter, Listen, check_name, write_json
from agent.settings import DEFAULT_SERVER_MALLOC_KEEP

SETTINGS_FILE = "model-settings.json"
_GRPC_MAX_MESSAGE = 2**31 - 1  # gRPC's largest; the agent bounds messages itself
PARKED_DIR = ".loaded"  # loaded entries, out of sight of MLServer's re-glob (see the module doc)
REPOSITORY_IMPLEMENTATION = "agent.runtimes.mlserver_repository.EntryRepository"
RESERVE_FILE = ".malloc-reserve"  # the embedded server's allocator reserve, in bytes (see allocator_reserve)
# the agent's --server-malloc-keep, in bytes: its flag's own variable (agent.cli.env_name), so a
# keep given in the environment and the one `modelshelf run` exports are the same setting
MALLOC_KEEP_ENV = "MODELSHELF_SERVER_MALLOC_KEEP"
_AGENT_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding the `agent` package

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
    """The model-settings.json document for a model: the one shipped in its folder (MLServer's
    convention) as the base, under the agent's served name, with parameters.uri pointing into
    the cache, the configured version, implementation and parameters over the shipped ones."""
    doc, shipped_uri = shipped_settings(model)
    params: dict[str, Any] = dict(doc.get("parameters") or {})
    params["uri"] = shipped_uri or model_uri(model)
    if model.version is not None:
        params["version"] = str(model.version)
    for key, value in (model.parameters or {}).items():
        if key in ("uri", "version"):
            continue  # the adapter owns these
        params[key] = value
    implementation = doc.get("implementation") if not model.implementation and isinstance(
        doc.get("implementation"), str) else None
    return {**doc, "name": model.name, "implementation": implementation or implementation_for(model),
            "parameters": params}


def shipped_settings(model: ServedModel) -> tuple[dict[str, Any], str | None]:
    """The model-settings.json shipped at the top of the model's folder ({} when none or
    unreadable) and its parameters.uri resolved inside the folder (None when it has none, or
    one that leaves the folder). Its `name` is dropped: the agent serves the configured name."""
    folder = Path(model.path)
    try:
        doc = json.loads((folder / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return {}, None
    if not isinstance(doc, dict):
        return {}, None
    doc.pop("name", None)
    uri = (doc.get("parameters") or {}).get("uri") if isinstance(doc.get("parameters"), dict) else None
    if not isinstance(uri, str) or not uri:
        return doc, None
    root = folder.resolve()
    target = (root / uri).resolve()
    return doc, str(target) if target == root or root in target.parents else None


_FRAME_RE = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def server_reason(response: Answer) -> str:
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


def quiet_logging() -> dict[str, Any]:
    """MLServer's `logging_settings` (a logging dictConfig, which it also hands to uvicorn):
    uvicorn's default configuration without the access line per request, and without the line
    per gRPC call that MLServer's debug mode logs (`mlserver.grpc`). Everything else is kept."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["uvicorn.access"]["level"] = "WARNING"
    config["loggers"]["mlserver.grpc"] = {"level": "WARNING"}
    return config


_STATES = {"READY": "READY", "UNAVAILABLE": "UNAVAILABLE", "UNKNOWN": "LOADING", "LOADING": "LOADING", "UNLOADING": "UNLOADING"}


class MLServerAdapter(HTTPServerAdapter):
    """An MLServer, embedded (a child process on loopback; `base_url=None`) or a sidecar at
    `base_url` that reads the same `repository` dir. Call `start()` before use, `stop()` at the end."""

    kind = "mlserver"
    entry_file = SETTINGS_FILE
    # MLServer runs a model's load on its one event loop (sklearn/xgboost: a synchronous
    # joblib.load inside `async def load`), so a probe waits until the load ends and times out;
    # and /v2/health/ready answers 400 while any model is registered but still loading. Neither
    # means the server is down: the agent stays ready through such a load (agent/health.py)
    busy_while_loading = True
    # blocks under 4 MiB on the heap, whose free pages EntryRepository keeps up to `malloc_keep`
    # and trims past it: joblib.load's transient buffers reuse warm heap pages instead of faulting
    # in a fresh mmap each (benchmarks/results/load_malloc.md)
    malloc_mmap_threshold = str(4 * 2**20)

    def _server_command(self, listen: Listen, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        if self.malloc_keep is None:  # the agent's --server-malloc-keep (agent.cli exports it), else the default
            raw = env.get(MALLOC_KEEP_ENV)
            try:
                self.malloc_keep = DEFAULT_SERVER_MALLOC_KEEP if raw is None else parse_quantity(raw)
            except ValueError as e:
                raise ValueError(f"{MALLOC_KEEP_ENV}: {e}") from None
        settings = {
            "host": listen.host,
            "http_port": listen.http_port,
            "grpc_port": listen.grpc_port,
            "metrics_port": listen.metrics_port,
            "parallel_workers": 0,  # TRAP: the default (1) crashes with uvloop>=0.22; 0 is also faster
            "load_models_at_startup": False,  # the agent decides what loads
            # the agent's gRPC plane enforces --max-body-bytes; MLServer's own 4 MiB default
            # would refuse larger messages the agent has admitted
            "grpc_max_message_length": _GRPC_MAX_MESSAGE,
            # a load reads its own entry, parsed once per content, installed runtimes not
            # reloaded: no re-glob of the repository, no per-load import (mlserver_repository.py)
            "model_repository_implementation": REPOSITORY_IMPLEMENTATION,
            "model_repository_implementation_args": {"builtin": sorted(IMPLEMENTATIONS.values()),
                                                     "malloc_keep": self.malloc_keep,
                                                     "reserve_file": str(self.reserve_file)},
        }
        self.reserve_file.unlink(missing_ok=True)  # a figure a former server (kept more) left
        if "MLSERVER_LOGGING_SETTINGS" not in env:  # settings.json would override the user's choice
            settings["logging_settings"] = quiet_logging()
        write_json(self.repository / "settings.json", settings)
        child_env = {k: v for k, v in env.items() if not k.startswith("MLSERVER_MODEL_")}
        # the repository class is imported from this very checkout of the agent
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (_AGENT_ROOT, env.get("PYTHONPATH")) if p)
        child_env.update(
            MLSERVER_HOST=listen.host,
            MLSERVER_HTTP_PORT=str(listen.http_port),
            MLSERVER_GRPC_PORT=str(listen.grpc_port),
            MLSERVER_METRICS_PORT=str(listen.metrics_port),
            MLSERVER_PARALLEL_WORKERS="0",
            MLSERVER_LOAD_MODELS_AT_STARTUP="false",
            MLSERVER_GRPC_MAX_MESSAGE_LENGTH=str(_GRPC_MAX_MESSAGE),
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
        # MLServer lists every entry its glob finds (parked ones are not); UNKNOWN there means
        # registered but not ready yet
        return {item["name"]: _STATES.get(item.get("state"), "UNKNOWN") for item in items}

    _reason = staticmethod(server_reason)

    # -- parking loaded entries out of MLServer's re-glob (see the module doc) ---------------

    index_concurrency = 16  # parked models probed at once by index()

    def __init__(self, *args: Any, malloc_keep: int | None = None, **kwargs: Any):
        # freed heap bytes the embedded server keeps resident between loads (mlserver_repository.Reserve;
        # 0: trimmed after every load and unload); None: $MODELSHELF_SERVER_MALLOC_KEEP, else the default.
        # The agent's ledger counts the same figure (MemoryManager.malloc_keep). A sidecar: unused.
        self.malloc_keep = None if malloc_keep is None else max(0, int(malloc_keep))
        super().__init__(*args, **kwargs)
        self._parks: dict[str, asyncio.Task] = {}  # name -> its park in flight (see load; one per name: a load waits for the last)
        self._dirty: set[str] = set()  # names whose park failed here: swept at their next park/unload

    @property
    def reserve_file(self) -> Path:
        """`<repo>/.malloc-reserve`: where the embedded server publishes its allocator reserve."""
        return self.repository / RESERVE_FILE

    def allocator_reserve(self, process: int | None = None) -> int | None:
        """The embedded server's allocator reserve now: freed heap bytes it keeps resident, as
        its repository class wrote them after its last load or unload (mlserver_repository.Reserve;
        one small file read). None for a sidecar, or when the server keeps none (trims after
        every call) or has not written it yet. (One process: ``process`` changes nothing.)"""
        if self.process is None or not self.malloc_keep:
            return None
        try:
            with open(self.reserve_file, "rb") as f:
                raw = f.read(8)
        except OSError:
            return None
        return int.from_bytes(raw, "little") if len(raw) == 8 else None

    @property
    def parked_dir(self) -> Path:
        """`<repo>/.loaded`: the entries of loaded models, hidden from MLServer's glob."""
        return self.repository / PARKED_DIR

    async def start(self, timeout: float = 60.0) -> None:
        if self.process is not None:  # embedded: the server about to start serves nothing yet
            await asyncio.to_thread(shutil.rmtree, self.parked_dir, ignore_errors=True)
        else:  # a sidecar keeps serving: only what a crash left (nothing points at it) goes
            await asyncio.to_thread(self._sweep_all)
        await super().start(timeout)

    async def _load(self, model: ServedModel) -> float | None:
        """Load, then park the entry in the background: the load answers as soon as the server
        has the model (the park is file work, off the caller's path). A later load or unload of
        the same name (each in its turn, after this one), and close(), wait for that park first."""
        await self.parked(model.name)  # a reload writes the visible entry the park moves
        server_s = await super()._load(model)
        self._parks[model.name] = asyncio.create_task(self._park_now(model.name), name=f"park:{model.name}")
        return server_s

    async def _park_now(self, name: str) -> None:
        try:
            await asyncio.to_thread(self._park, name)
        except Exception as e:  # still loaded and served; only later loads are slower
            self._dirty.add(name)
            self._log.warning("event=park_failed server=%s model=%s error=%s", self.kind, name, type(e).__name__)
        finally:
            if self._parks.get(name) is asyncio.current_task():
                del self._parks[name]

    async def parked(self, name: str | None = None) -> None:
        """Wait for the park of `name` in flight (None: every park in flight) to end."""
        tasks = [self._parks[name]] if name in self._parks else [] if name is not None else list(self._parks.values())
        if tasks:
            await asyncio.wait([asyncio.shield(t) for t in tasks])

    async def _unload(self, name: str) -> None:
        await self.parked(name)  # the unload removes what the park moves
        await super()._unload(name)

    async def close(self) -> None:
        await self.parked()
        await super().close()

    def _remove_entry(self, name: str) -> None:
        super()._remove_entry(name)  # runs only once the server unloaded it: the parked copy goes too
        self._unpark(name)

    async def index(self) -> dict[str, str]:
        states = await super().index()  # first: a park that happens meanwhile is seen below
        # a park runs in a thread: between its rename and its link switch the entry is neither
        # visible nor parked, so names being parked are probed too (taken before the listing)
        parking = set(self._parks)
        names = sorted(parking | await asyncio.to_thread(self._entries_in, self.parked_dir))
        sem = asyncio.Semaphore(self.index_concurrency)

        async def probe(name: str) -> tuple[str, bool]:
            async with sem:
                return name, await self._ready(name)

        for name, ready in await asyncio.gather(*(probe(n) for n in names)):
            if ready:
                states[name] = "READY"
            else:  # a stale parked entry (the server restarted): not READY, whatever it says
                states.setdefault(name, "UNAVAILABLE")
        return states

    async def model_state(self, name: str) -> str | None:
        """As index() says for `name`, probing only that name's parked entry."""
        state = (await HTTPServerAdapter.index(self)).get(name)
        if name in self._parks or await asyncio.to_thread(self._served_in, self.parked_dir / name) is not None:
            return "READY" if await self._ready(name) else state or "UNAVAILABLE"
        return state

    def entry(self, name: str) -> ServedModel | None:
        return self._served_in(self.parked_dir / name) or super().entry(name)

    def repository_entries(self) -> set[str]:
        return super().repository_entries() | self._entries_in(self.parked_dir)

    def parked_entries(self) -> set[str]:
        """Names whose entry is parked (loaded, hidden from MLServer's glob)."""
        return self._entries_in(self.parked_dir)

    def visible_entries(self) -> set[str]:
        """Names whose entry MLServer's glob sees (being loaded; at worst one left by a crash)."""
        return super().repository_entries()

    async def _ready(self, name: str) -> bool:
        """GET /v2/models/{name}/ready == 200; ServerUnavailable when the server does not answer."""
        try:
            r = await self._http.get(f"/v2/models/{quote(name, safe='')}/ready")
        except (httpx.HTTPError, OSError) as e:
            raise ServerUnavailable(name, f"{self.kind} at {self.base_url} unreachable ({type(e).__name__})") from None
        return r.status_code == 200

    def _park(self, name: str) -> None:
        """Move the just-loaded visible entry of `name` under `.loaded/`, replacing an older
        parked copy: the link `.loaded/<name>` switches from the old dir to the new in one
        os.replace. Runs in a thread: the next load or unload of the name waits for it (and
        they take turns: `_one_at_a_time`), and index() probes the names whose park is in flight."""
        check_name(name)
        visible = self.repository / name
        self.parked_dir.mkdir(exist_ok=True)
        link = self.parked_dir / name
        old = self._store_of(name)
        if link.is_dir() and not link.is_symlink():  # a plain dir (not written by us): make it a store dir
            old = self.parked_dir / f".{name}.{secrets.token_hex(4)}"
            os.rename(link, old)
        store = self.parked_dir / f".{name}.{secrets.token_hex(4)}"
        os.rename(visible, store)  # still hidden: the old copy stays the parked one until the switch
        tmp = self.parked_dir / f".{name}.link"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(store.name)  # relative: the repository may be mounted elsewhere
        os.replace(tmp, link)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if name in self._dirty:
            self._dirty.discard(name)
            self._sweep(name, keep=store.name)

    def _unpark(self, name: str) -> None:
        """Remove the parked copy of `name`: the link first (a crash then leaves only a hidden
        dir that nothing points at), then every store dir of that name."""
        check_name(name)
        link = self.parked_dir / name
        store = self._store_of(name)
        if link.is_symlink():
            link.unlink(missing_ok=True)
        else:
            shutil.rmtree(link, ignore_errors=True)
        if store is not None:
            shutil.rmtree(store, ignore_errors=True)
        if name in self._dirty:
            self._dirty.discard(name)
            self._sweep(name, keep=None)

    def _store_of(self, name: str) -> Path | None:
        """The `.<name>.<hex>` dir the link `.loaded/<name>` points at (None: no such link)."""
        try:
            target = os.readlink(self.parked_dir / name)
        except OSError:
            return None
        return self.parked_dir / target if _is_store(target, name) else None

    def _sweep_all(self) -> None:
        """Remove every store dir no link points at, and temporary links, under `.loaded/`."""
        try:
            children = list(self.parked_dir.iterdir())
        except FileNotFoundError:
            return
        referenced = {str(store.name) for p in children if not p.name.startswith(".")
                      for store in [self._store_of(p.name)] if store is not None}
        for p in children:
            stem, _, token = p.name.rpartition(".")
            if not stem.startswith(".") or p.name in referenced:
                continue
            if token == "link" and p.is_symlink():
                p.unlink(missing_ok=True)
            elif _is_store(p.name, stem[1:]) and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)

    def _sweep(self, name: str, keep: str | None) -> None:
        """Remove `.loaded/.<name>.<hex>` dirs of `name` other than `keep` (replaced copies,
        leftovers of a failed park) and a stray `.<name>.link`."""
        try:
            children = list(self.parked_dir.iterdir())
        except FileNotFoundError:
            return
        for p in children:
            stem, _, token = p.name.rpartition(".")
            if stem != f".{name}" or p.name == keep:
                continue
            if token == "link" and p.is_symlink():
                p.unlink(missing_ok=True)
            elif _is_store(p.name, name) and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)


def _is_store(target: str, name: str) -> bool:
    """`target` is a store dir name of `name`: `.<name>.<8 hex>`."""
    stem, _, token = target.rpartition(".")
    return stem == f".{name}" and len(token) == 8 and all(c in "0123456789abcdef" for c in token)


__all__ = ["MLServerAdapter", "IMPLEMENTATIONS", "PARKED_DIR", "SETTINGS_FILE", "model_settings", "model_uri",
           "server_reason", "shipped_settings"]
