"""Triton (the binary bundled in the `nvidia-pytriton` wheel) behind the RuntimeAdapter interface.

One entry per served model: `<repo>/<name>/config.pbtxt` (the source's config with its top-level
`name` rewritten to the served name, or a generated one for a bare model file; the model's
parameters appended as string parameters), the source's version dirs (and other files) symlinked
from the cache, and `modelshelf.json` (the ServedModel). A source that is not a Triton model dir
(no numeric version dir) gets a version dir `1/` linking its files.

Server quirks handled here (on top of `common.HTTPServerAdapter`, which holds the server
process, the HTTP client and the repository protocol): how the binary is found and started;
load of a model that is not in the repository -> 500 ("failed to poll"), a model that fails ->
400; both map to LoadFailed with the first line of the message. Unload is asynchronous (state
UNLOADING first): unload() polls the index until the model is gone, bounded by
`unload_timeout`. Unload of an unknown model -> 200. The index has one item per version and no
state for a model never loaded. A failed reload leaves the old copy serving, so its entry is put
back. The server runs with `--strict-readiness=false` so one failed model does not make the
whole server unready.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path
from typing import Any


from agent.runtimes.base import LoadFailed, ServedModel, ServerUnavailable
from agent.runtimes.common import Answer, HTTPServerAdapter, Listen
from agent.runtimes.process import OnRestart
from agent.runtimes.triton_setup import TritonInstall, find_install, install_from_binary

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


def _file_links(rel: str, target: Path) -> dict[str, str]:
    """`target` placed at `rel` in an entry: a file (or an empty dir) is one link; a dir is a
    real dir in the repository with a link per file, recursively. What the server writes beside
    a model file (the python backend's `__pycache__`) then lands in the repository, never
    through a linked dir into the cache entry."""
    if not target.is_dir():
        return {rel: str(target)}
    out: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(target, followlinks=True):
        for f in files:
            p = Path(dirpath) / f
            out[f"{rel}/{p.relative_to(target).as_posix()}"] = str(p)
    return out or {rel: str(target)}


def entry_links(model: ServedModel) -> dict[str, str]:
    """Entry-relative path -> target in the cache, one per file of the version dirs and the
    other files (dirs are made in the entry, see `_file_links`)."""
    src = Path(model.path).resolve()
    if src.is_file():
        return {f"1/{src.name}": str(src)}
    children = [p for p in src.iterdir() if p.name != CONFIG_FILE and not p.name.startswith(".")]
    versions = [p for p in children if p.is_dir() and p.name.isdigit()]
    if not versions:  # a bare model dir: make it version 1
        version = model.version if model.version and str(model.version).isdigit() else "1"
        placed = {f"{version}/{p.name}": p for p in children}
    else:
        if model.version and str(model.version).isdigit() and (src / str(model.version)).is_dir():
            children = [p for p in children if not (p.is_dir() and p.name.isdigit()) or p.name == str(model.version)]
        placed = {p.name: p for p in children}
    links: dict[str, str] = {}
    for rel, target in placed.items():
        links.update(_file_links(rel, target))
    return links


def server_reason(response: Answer) -> str:
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


class TritonAdapter(HTTPServerAdapter):
    """A Triton server, embedded (child process on loopback, `base_url=None`, binary from
    `triton_bin` or .venv-triton) or a sidecar at `base_url` reading the same `repository`.
    Call `start()` before use and `stop()` at the end."""

    kind = "triton"
    entry_file = CONFIG_FILE

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
        self.unload_timeout = unload_timeout
        self.install: TritonInstall | None = None  # set when embedded
        self._triton_bin = triton_bin
        self._extra_args = list(extra_args or [])
        super().__init__(
            repository, base_url, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
            workdir=workdir, env=env, log_file=log_file, on_restart=on_restart, load_timeout=load_timeout,
            request_timeout=request_timeout, sidecar_interval=sidecar_interval,
        )

    def _server_command(self, listen: Listen, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        self.install = find_triton(self._triton_bin)
        argv = [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.install.backends}",
            "--model-control-mode=explicit",
            f"--http-address={listen.host}",
            f"--http-port={listen.http_port}",
            f"--grpc-address={listen.host}",
            f"--grpc-port={listen.grpc_port}",
            f"--metrics-address={listen.host}",
            f"--metrics-port={listen.metrics_port}",
            "--strict-readiness=false",  # one failed model must not make the server unready
            "--exit-on-error=false",
            "--exit-timeout-secs=5",  # on SIGTERM, wait at most 5 s for open connections/requests
            *self._extra_args,
        ]
        env[SITE_PACKAGES_ENV] = str(self.install.site_packages)
        return argv, env

    def _entry_content(self, model: ServedModel) -> tuple[str, dict[str, str]]:
        return config_text(model), entry_links(model)

    def _index_states(self, items: list[dict[str, Any]]) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in items:
            state = item.get("state") or "UNAVAILABLE"  # in the repository, never loaded
            if out.get(item["name"]) != "READY":  # one item per version: READY if any is
                out[item["name"]] = state
        return out

    _reason = staticmethod(server_reason)

    async def _wait_unloaded(self, name: str) -> None:
        # asynchronous on Triton: wait until the index no longer shows it loaded or unloading
        delay, deadline = 0.02, time.monotonic() + self.unload_timeout
        while (await self.index()).get(name) in ("READY", "UNLOADING", "LOADING"):
            if time.monotonic() > deadline:
                raise ServerUnavailable(name, f"still unloading after {self.unload_timeout:.0f}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)


__all__ = ["TritonAdapter", "BACKENDS", "config_text", "entry_links", "find_triton", "server_reason", "set_config_name"]
