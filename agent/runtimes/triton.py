"""Triton (the binary bundled in the `nvidia-pytriton` wheel) behind the RuntimeAdapter interface.

One entry per served model: `<repo>/<name>/config.pbtxt` (the source's config with its top-level
`name` rewritten to the served name, or a generated one for a bare model file; the model's
parameters appended as string parameters), the source's version dirs (and other files) symlinked
from the cache, and `modelshelf.json` (the ServedModel). A source that is not a Triton model dir
(no numeric version dir) gets a version dir `1/` linking its files.

Server quirks handled here: load of a model that is not in the repository -> 500 ("failed to
poll"), a model that fails -> 400; both map to LoadFailed with the first line of the message.
Unload is asynchronous (state UNLOADING first): unload() polls the index until the model is
gone, bounded by `unload_timeout`. Unload of an unknown model -> 200. The index accepts an empty
body. A failed reload leaves the old copy serving, so its entry is put back.
The server runs with `--strict-readiness=false` so one failed model does not make the whole
server unready.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from agent.runtimes.base import LoadFailed, RuntimeAdapter, RuntimeErrorBase, ServedModel, ServerUnavailable
from agent.runtimes.mlserver import ENTRY_FILE, _check_name, _write_json, served_from_json, served_to_json
from agent.runtimes.process import OnRestart, ServerHandle, ServerProcess, free_port
from agent.runtimes.triton_setup import TritonInstall, find_install, install_from_binary

log = logging.getLogger("modelshelf.runtimes.triton")

CONFIG_FILE = "config.pbtxt"
SITE_PACKAGES_ENV = "MODELSHELF_TRITON_SITE_PACKAGES"

# runtime -> config line for a source without config.pbtxt
BACKENDS = {
    "python": 'backend: "python"',
    "onnx": 'backend: "onnxruntime"',
    "onnxruntime": 'backend: "onnxruntime"',
    "pytorch": 'backend: "pytorch"',
    "tensorflow": 'backend: "tensorflow"',
    "openvino": 'backend: "openvino"',
    "tensorrt": 'platform: "tensorrt_plan"',
}


def find_triton(triton_bin: Path | None = None) -> TritonInstall:
    """The Triton install to run: `triton_bin`, else $MODELSHELF_TRITON_BIN, else a
    `.venv-triton` in the working dir or next to this package. FileNotFoundError if none."""
    explicit = triton_bin or os.environ.get("MODELSHELF_TRITON_BIN")
    if explicit:
        if not Path(explicit).is_file():
            raise FileNotFoundError(f"tritonserver binary not found at {explicit}")
        return install_from_binary(Path(explicit))
    looked = []
    for venv in (Path.cwd() / ".venv-triton", Path(__file__).resolve().parents[2] / ".venv-triton"):
        looked.append(str(venv))
        try:
            return find_install(venv)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"no tritonserver found (looked in {', '.join(looked)}); run `make triton` or pass --triton-bin")


_NAME_RE = re.compile(r"""name\s*:\s*(?:"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')""")


def _skip_string(text: str, i: int) -> int:
    quote, j = text[i], i + 1
    while j < len(text) and text[j] != quote and text[j] != "\n":
        j += 2 if text[j] == "\\" else 1
    return min(j + 1, len(text))


def set_config_name(text: str, name: str) -> str:
    """`text` (protobuf text format) with its top-level `name` set to `name` (added if absent);
    names inside blocks (inputs, outputs...) are left alone."""
    out: list[str] = []
    i, depth, found = 0, 0, False
    while i < len(text):
        c = text[i]
        if c == "#":
            j = text.find("\n", i)
            j = len(text) if j < 0 else j
            out.append(text[i:j])
            i = j
            continue
        if c in "\"'":
            j = _skip_string(text, i)
            out.append(text[i:j])
            i = j
            continue
        if c in "{[<":
            depth += 1
        elif c in "}]>":
            depth -= 1
        elif depth == 0 and c == "n" and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = _NAME_RE.match(text, i)
            if m:
                if not found:
                    out.append(f"name: {json.dumps(name)}")
                found = True
                i = m.end()
                continue
        out.append(c)
        i += 1
    result = "".join(out)
    return result if found else f"name: {json.dumps(name)}\n{result}"


def config_text(model: ServedModel) -> str:
    """The entry's config.pbtxt."""
    src = Path(model.path)
    cfg = src / CONFIG_FILE if src.is_dir() else None
    if cfg is not None and cfg.is_file():
        text = set_config_name(cfg.read_text(), model.name)
    elif model.runtime in BACKENDS:
        text = f"name: {json.dumps(model.name)}\n{BACKENDS[model.runtime]}\n"
    else:
        raise LoadFailed(model.name, f"no {CONFIG_FILE} in {model.path} and runtime {model.runtime!r} names no Triton backend (known: {', '.join(sorted(BACKENDS))})")
    for key, value in (model.parameters or {}).items():
        sval = value if isinstance(value, str) else json.dumps(value)
        text += f"\nparameters: {{ key: {json.dumps(str(key))} value: {{ string_value: {json.dumps(sval)} }} }}"
    return text.rstrip("\n") + "\n"


def entry_links(model: ServedModel) -> dict[str, str]:
    """Entry-relative path -> target in the cache, for the version dirs and other files."""
    src = Path(model.path).resolve()
    if src.is_file():
        return {f"1/{src.name}": str(src)}
    children = [p for p in src.iterdir() if p.name != CONFIG_FILE and not p.name.startswith(".")]
    versions = [p for p in children if p.is_dir() and p.name.isdigit()]
    if not versions:  # a bare model dir: make it version 1
        version = model.version if model.version and str(model.version).isdigit() else "1"
        return {f"{version}/{p.name}": str(p) for p in children}
    if model.version and str(model.version).isdigit() and (src / str(model.version)).is_dir():
        children = [p for p in children if not (p.is_dir() and p.name.isdigit()) or p.name == str(model.version)]
    return {p.name: str(p) for p in children}


def server_reason(response: httpx.Response) -> str:
    """Triton's error, short: the first line of its message."""
    text = response.text or ""
    try:
        body = response.json()
        if isinstance(body, dict) and body.get("error"):
            text = str(body["error"])
    except ValueError:
        pass
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    first = first.rstrip(";")
    if len(first) > 300:
        first = first[:297] + "..."
    return f"HTTP {response.status_code}: {first}" if first else f"HTTP {response.status_code}"


class _TimedOut(ServerUnavailable):
    """The server took longer than our timeout; it may still complete the operation."""


class TritonAdapter(RuntimeAdapter):
    """A Triton server, embedded (child process on loopback, `base_url=None`, binary from
    `triton_bin` or .venv-triton) or a sidecar at `base_url` reading the same `repository`.
    Call `start()` before use and `stop()` at the end."""

    kind = "triton"

    def __init__(
        self,
        repository: Path,
        base_url: str | None = None,
        *,
        triton_bin: Path | None = None,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        workdir: Path | None = None,
        env: dict[str, str] | None = None,
        log_file: Path | None = None,
        on_restart: OnRestart | None = None,
        load_timeout: float = 120.0,
        unload_timeout: float = 60.0,
        request_timeout: float = 10.0,
        sidecar_interval: float | None = 2.0,
        extra_args: list[str] | None = None,
    ):
        self.repository = Path(repository).resolve()
        self.repository.mkdir(parents=True, exist_ok=True)
        self.load_timeout = load_timeout
        self.unload_timeout = unload_timeout
        self.install: TritonInstall | None = None
        self._own_workdir: Path | None = None
        process = None
        if base_url is None:
            self.install = find_triton(triton_bin)
            http_port = http_port or free_port(host)
            grpc_port = grpc_port or free_port(host)
            metrics_port = metrics_port or free_port(host)
            if workdir is None:
                workdir = self._own_workdir = Path(tempfile.mkdtemp(prefix="modelshelf-triton-"))
            argv = [
                str(self.install.binary),
                f"--model-repository={self.repository}",
                f"--backend-directory={self.install.backends}",
                "--model-control-mode=explicit",
                f"--http-address={host}",
                f"--http-port={http_port}",
                f"--grpc-address={host}",
                f"--grpc-port={grpc_port}",
                f"--metrics-address={host}",
                f"--metrics-port={metrics_port}",
                "--strict-readiness=false",  # one failed model must not make the server unready
                "--exit-on-error=false",
                "--exit-timeout-secs=5",  # on SIGTERM, wait at most 5 s for open connections/requests
                *(extra_args or []),
            ]
            child_env = dict(os.environ if env is None else env)
            child_env[SITE_PACKAGES_ENV] = str(self.install.site_packages)
            process = ServerProcess(argv, ready_url=f"http://{host}:{http_port}/v2/health/ready", env=child_env, cwd=Path(workdir), name="triton", log_file=log_file)
            base_url = f"http://{host}:{http_port}"
        self._server = ServerHandle(base_url, process=process, name="triton", sidecar_interval=sidecar_interval)
        self._server.on_restart = on_restart
        self._http = httpx.AsyncClient(
            base_url=self._server.base_url,
            timeout=httpx.Timeout(request_timeout, connect=2.0),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            trust_env=False,
        )

    @classmethod
    def embedded(cls, repository: Path, **kwargs: Any) -> "TritonAdapter":
        """An adapter that starts its own Triton on loopback (free ports unless given)."""
        kwargs.pop("base_url", None)
        return cls(repository, None, **kwargs)

    # -- lifecycle (same surface as MLServerAdapter) ---------------------------------------

    async def start(self, timeout: float = 60.0) -> None:
        await self._server.start(timeout)

    async def stop(self) -> None:
        await self.close()
        await self._server.stop()
        if self._own_workdir is not None:
            shutil.rmtree(self._own_workdir, ignore_errors=True)

    @property
    def on_restart(self) -> OnRestart | None:
        return self._server.on_restart

    @on_restart.setter
    def on_restart(self, fn: OnRestart | None) -> None:
        self._server.on_restart = fn

    @property
    def process(self) -> ServerProcess | None:
        return self._server.process

    @property
    def restarts(self) -> int:
        return self._server.restarts

    def pids(self) -> list[int]:
        """The embedded server's process tree, python-backend stubs included ([] in sidecar mode)."""
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
        r = await self._post("/v2/repository/index", None, json={})
        if r.status_code != 200:
            raise RuntimeErrorBase(None, f"index failed: {server_reason(r)}")
        out: dict[str, str] = {}
        for item in r.json():
            state = item.get("state") or "UNAVAILABLE"  # in the repository, never loaded
            if out.get(item["name"]) != "READY":  # one item per version: READY if any is
                out[item["name"]] = state
        return out

    async def model_state(self, name: str) -> str | None:
        return (await self.index()).get(name)

    async def model_ready(self, name: str) -> bool:
        try:
            r = await self._http.get(f"/v2/models/{name}/ready")
        except (httpx.HTTPError, OSError):
            return False
        return r.status_code == 200

    async def load(self, model: ServedModel) -> None:
        _check_name(model.name)
        if not Path(model.path).exists():
            raise LoadFailed(model.name, f"model files not found at {model.path}")
        text = config_text(model)
        links = entry_links(model)
        entry = self.repository / model.name
        previous = self._read_entry(entry)
        self._write_entry(entry, text, links, served_to_json(model))
        t0 = time.monotonic()
        try:
            r = await self._post(f"/v2/repository/models/{model.name}/load", model.name, json={}, timeout=self.load_timeout)
        except _TimedOut:
            raise  # it may still be loading: keep the entry (unload cleans up)
        except ServerUnavailable:
            self._restore_entry(entry, previous)
            raise
        if r.status_code != 200:
            self._restore_entry(entry, previous)
            raise LoadFailed(model.name, server_reason(r))
        log.info("event=model_loaded server=triton model=%s seconds=%.3f replaced=%s", model.name, time.monotonic() - t0, previous is not None)

    async def unload(self, name: str) -> None:
        _check_name(name)
        t0 = time.monotonic()
        r = await self._post(f"/v2/repository/models/{name}/unload", name, json={})
        if r.status_code not in (200, 404):
            raise RuntimeErrorBase(name, f"unload failed: {server_reason(r)}")
        # asynchronous on Triton: wait until the index no longer shows it loaded or unloading
        delay, deadline = 0.02, time.monotonic() + self.unload_timeout
        while (await self.index()).get(name) in ("READY", "UNLOADING", "LOADING"):
            if time.monotonic() > deadline:
                raise ServerUnavailable(name, f"still unloading after {self.unload_timeout:.0f}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        shutil.rmtree(self.repository / name, ignore_errors=True)
        log.info("event=model_unloaded server=triton model=%s seconds=%.3f", name, time.monotonic() - t0)

    def served_path(self, name: str) -> Path | None:
        """The model path the entry of `name` was written for (None: no entry of ours)."""
        served = self.entry(name)
        return served.path if served is not None else None

    def repository_entries(self) -> set[str]:
        try:
            return {p.name for p in self.repository.iterdir() if (p / CONFIG_FILE).is_file()}
        except FileNotFoundError:
            return set()

    def entry(self, name: str) -> ServedModel | None:
        """The ServedModel an entry was written for (None if absent or not written by us)."""
        try:
            return served_from_json(json.loads((self.repository / name / ENTRY_FILE).read_text()))
        except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, TypeError):
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
                # a server may close a keep-alive connection after an error; a pooled request can
                # race that close. The request was not processed: send it once more.
                return await self._http.post(path, json=json, **kwargs)
        except httpx.TimeoutException as e:
            raise _TimedOut(model, f"triton at {self.base_url} timed out ({type(e).__name__})") from None
        except (httpx.HTTPError, OSError) as e:
            raise ServerUnavailable(model, f"triton at {self.base_url} unreachable ({type(e).__name__})") from None

    @staticmethod
    def _read_entry(entry: Path) -> dict[str, Any] | None:
        """Config text, links (entry-relative path -> target) and ServedModel doc of an entry."""
        try:
            text = (entry / CONFIG_FILE).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None
        links = {}
        for p in entry.rglob("*"):
            if p.is_symlink():
                links[str(p.relative_to(entry))] = os.readlink(p)
        doc: dict[str, Any] = {"config": text, "links": links}
        try:
            doc["served"] = json.loads((entry / ENTRY_FILE).read_text())
        except (FileNotFoundError, ValueError):
            pass
        return doc

    @staticmethod
    def _write_entry(entry: Path, config: str, links: dict[str, str], served: dict[str, Any] | None) -> None:
        """Make the entry hold exactly `links` and `config`, each swapped in atomically."""
        entry.mkdir(parents=True, exist_ok=True)
        for p in sorted(entry.rglob("*"), key=lambda q: len(q.parts), reverse=True):
            rel = str(p.relative_to(entry))
            if p.is_symlink() and rel not in links:
                p.unlink()
            elif p.is_dir() and not p.is_symlink() and not any(k.startswith(rel + "/") for k in links):
                shutil.rmtree(p, ignore_errors=True)
        for rel, target in links.items():
            dest = entry / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink() and os.readlink(dest) == target:
                continue
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            tmp = dest.with_name(f".{dest.name}.tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            os.replace(tmp, dest)
        if served is not None:
            _write_json(entry / ENTRY_FILE, served)
        tmp = entry / f".{CONFIG_FILE}.tmp"
        tmp.write_text(config)
        os.replace(tmp, entry / CONFIG_FILE)

    def _restore_entry(self, entry: Path, previous: dict[str, Any] | None) -> None:
        if previous is None:
            shutil.rmtree(entry, ignore_errors=True)
            return
        self._write_entry(entry, previous["config"], previous["links"], previous.get("served"))
        if "served" not in previous:
            (entry / ENTRY_FILE).unlink(missing_ok=True)
