"""What the HTTP-driven adapters share: `HTTPServerAdapter`, a RuntimeAdapter for a server we
drive over the KServe V2 REST repository API and whose repository dir we own, plus the helpers
for that dir's entries.

`HTTPServerAdapter` holds the server (an embedded child on loopback with free ports and a
private working dir, or a sidecar at `base_url`; see `process.ServerHandle`), the clients and
the repository protocol. The repository calls (index, load, unload: two on every cold start)
go through the data plane's lean keep-alive client (`agent.upstream.Upstream`: one write per
request, httptools parsing; httpx took ~15% of the agent's CPU under cold-start traffic,
issue 13); an answer is read into `Answer` (status, text, json()). Readiness probes keep a
pooled `httpx.AsyncClient`. The repository protocol:

- one dir per served model, `<repo>/<name>/`, holding the server's entry file (written last and
  atomically: the server sees the entry only once it is complete), symlinks into the cache and
  `modelshelf.json` (the ServedModel, so an agent restarting against a running server can tell
  what each entry serves);
- load: write the entry, POST load; on a refusal or an unreachable server put the previous
  entry back (or remove it); on a timeout keep it, since the server may still be loading it;
- unload: POST unload, wait until the server no longer serves it, remove the entry; after a
  load of that name that timed out or was cancelled in flight, POST unload once more (that
  request may have reached the server after the first unload's answer, found the entry
  before its removal and loaded: with the entry gone, nothing later can);
- a load and an unload of one name take turns (`_one_at_a_time`): one that overlaps another
  of that name starts once the other ended, so the entry on disk and the server agree.

Repository file work (entry writes, restores, removals) runs in threads (`asyncio.to_thread`),
never on the agent's event loop: a slow disk or a large entry does not stall the data plane.
An embedded server gets PYTHONPYCACHEPREFIX pointing into its private working dir, so what it
compiles is written there, never beside a module in the repository or in a cache entry.

A subclass says only what differs per server: how to start it (`_server_command`), what its
entry holds (`entry_file`, `_entry_content`), how to read its index (`_index_states`) and errors
(`_reason`), and how long an unload takes to finish (`_wait_unloaded`).
"""
from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Self

import httpx

from agent.runtimes.base import LoadFailed, Probe, RuntimeAdapter, RuntimeErrorBase, ServedModel, ServerUnavailable
from agent.runtimes.process import OnRestart, ServerHandle, ServerProcess, free_port, port_taken
from agent.upstream import Upstream, UpstreamError

_JSON_HEADERS = [(b"content-type", b"application/json"), (b"accept", b"application/json")]

ENTRY_FILE = "modelshelf.json"  # the ServedModel an entry was written for


def check_name(name: str) -> None:
    """LoadFailed unless `name` is usable as one directory name in the repository."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise LoadFailed(name, "name is not usable as a repository entry")


def write_text(path: Path, text: str) -> None:
    """Replace `path` atomically: a concurrent reader (a server re-globbing) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """`doc` as indented JSON, replaced atomically."""
    write_text(path, json.dumps(doc, indent=1, default=str))


def served_to_json(model: ServedModel) -> dict[str, Any]:
    """The ServedModel as stored in an entry's modelshelf.json."""
    doc = asdict(model)
    doc["path"] = str(model.path)
    return doc


def served_from_json(doc: dict[str, Any]) -> ServedModel:
    """The ServedModel back from modelshelf.json (KeyError/TypeError when it is not one)."""
    return ServedModel(
        name=doc["name"],
        path=Path(doc["path"]),
        runtime=doc["runtime"],
        implementation=doc.get("implementation"),
        version=doc.get("version"),
        parameters=doc.get("parameters") or {},
    )


@dataclass(frozen=True)
class Listen:
    """Where an embedded server listens (loopback by default, free ports unless given)."""

    host: str
    http_port: int
    grpc_port: int
    metrics_port: int


@dataclass(frozen=True)
class _EntryState:
    """What an entry held: the entry file's text, its links, its ServedModel doc (if any)."""

    text: str
    links: dict[str, str]
    served: dict[str, Any] | None


class _TimedOut(ServerUnavailable):
    """The server took longer than our timeout; it may still complete the operation."""


@dataclass(frozen=True)
class Answer:
    """A repository call's answer: what the adapters read of it (`_reason`, index items)."""

    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class HTTPServerAdapter(RuntimeAdapter):
    """A server driven over HTTP, embedded (a child process on loopback; `base_url=None`) or a
    sidecar at `base_url` that reads the same `repository` dir. Call `start()` before use and
    `stop()` at the end."""

    entry_file: str  # the file in `<repo>/<name>/` that makes the dir an entry the server sees
    # whether the server may leave a readiness probe unanswered (or answer not ready) while a
    # load or unload runs on it: then such a probe says "busy loading", not "not ready" (`probe`)
    busy_while_loading = False
    # glibc's mmap threshold in an embedded server (MALLOC_MMAP_THRESHOLD_): its initial 128 KiB,
    # fixed, unless the server gives the heap's free pages back itself (MLServerAdapter)
    malloc_mmap_threshold = "131072"

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
        self._log = logging.getLogger(f"modelshelf.runtimes.{self.kind}")
        self._own_workdir: Path | None = None
        process = None
        self.listen: Listen | None = None  # embedded: where its server listens
        if base_url is None:
            self.listen = listen = Listen(host, http_port or free_port(host), grpc_port or free_port(host), metrics_port or free_port(host))
            if workdir is None:  # a private cwd: servers write state files there
                workdir = self._own_workdir = Path(tempfile.mkdtemp(prefix=f"modelshelf-{self.kind}-"))
            base_env = dict(os.environ if env is None else env)
            # bytecode of what the server imports (a custom runtime, a python-backend model.py)
            # goes to its private dir, never next to the module: in the repository or, through
            # a link, into a cache entry (entries stay byte-identical to what was published)
            base_env["PYTHONPYCACHEPREFIX"] = str(Path(workdir).resolve() / "pycache")
            # memory an unload frees goes back to the OS: with glibc's default (a dynamic mmap
            # threshold that rises up to 32 MiB after a large block is freed) model arrays land
            # on the heap and stay in the server's RSS after their model is unloaded (80 MiB of
            # 258 MiB measured, benchmarks/results/density_real.md); a fixed threshold keeps
            # blocks above it mmapped and returned at free (`malloc_mmap_threshold`). A user's
            # own setting is kept; set to "" it is removed (glibc's dynamic default).
            base_env.setdefault("MALLOC_MMAP_THRESHOLD_", self.malloc_mmap_threshold)
            if not base_env["MALLOC_MMAP_THRESHOLD_"]:
                del base_env["MALLOC_MMAP_THRESHOLD_"]
            argv, child_env = self._server_command(listen, base_env)
            base_url = f"http://{host}:{listen.http_port}"
            self.grpc_target = f"{host}:{listen.grpc_port}"
            process = ServerProcess(argv, ready_url=f"{base_url}/v2/health/ready", env=child_env, cwd=Path(workdir), name=self.kind, log_file=log_file)
        self._server = ServerHandle(base_url, process=process, name=self.kind, sidecar_interval=sidecar_interval)
        self._server.on_restart = on_restart
        self._http = httpx.AsyncClient(
            base_url=self._server.base_url,
            timeout=httpx.Timeout(request_timeout, connect=2.0),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            trust_env=False,
        )
        self.request_timeout = request_timeout
        self._control = Upstream(self._server.base_url, max_connections=32, connect_timeout=2.0)
        self._turns: dict[str, list[Any]] = {}  # name -> [its lock, calls holding or awaiting it] (_one_at_a_time)
        self._given_up: set[str] = set()  # names whose load request was left unanswered (see _unload)
        # load/unload calls in flight on the server: name -> when sent (one at a time per name);
        # `probe` reads it. Kept here, not in the reconciler: only the adapter knows every call
        # it sends (unloads and orphan clean-ups too) and, with several server processes, which
        # process gets it (agent/runtimes/shards.py holds one adapter per process)
        self._calls: dict[str, float] = {}

    @classmethod
    def embedded(cls, repository: Path, **kwargs: Any) -> Self:
        """An adapter that starts its own server on loopback (free ports unless given)."""
        kwargs.pop("base_url", None)
        return cls(repository, None, **kwargs)

    # -- what differs per server ----------------------------------------------------------

    @abc.abstractmethod
    def _server_command(self, listen: Listen, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """argv and environment of the embedded server (`env` is the base environment)."""

    @abc.abstractmethod
    def _entry_content(self, model: ServedModel) -> tuple[str, dict[str, str]]:
        """The text of `entry_file` and the links (entry-relative path -> target) of the
        model's entry. LoadFailed when this server cannot serve the model; nothing is written
        before this returns."""

    @abc.abstractmethod
    def _index_states(self, items: list[dict[str, Any]]) -> dict[str, str]:
        """The body of POST /v2/repository/index -> {name: state}."""

    @staticmethod
    @abc.abstractmethod
    def _reason(response: Answer) -> str:
        """The server's error in a response, short and on one line."""

    async def _wait_unloaded(self, name: str) -> None:
        """Return once the server no longer serves `name` after its unload answered
        (here at once: the unload's answer means it is done)."""

    # -- lifecycle ------------------------------------------------------------------------

    def ports_taken(self) -> bool:
        listen = self.listen
        return listen is not None and any(port_taken(listen.host, port) for port in (listen.http_port, listen.grpc_port, listen.metrics_port))

    async def start(self, timeout: float = 60.0) -> None:
        """Embedded: spawn the server and wait for it. Sidecar: wait for it and watch it."""
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
        """PIDs of the embedded server's process tree, child processes included ([] in sidecar mode)."""
        return self._server.pids()

    # -- RuntimeAdapter -------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self._server.base_url

    async def wait_ready(self, timeout: float) -> None:
        await self._server.wait_ready(timeout)

    async def is_ready(self) -> bool:
        return await self._server.is_ready()

    async def probe(self) -> list[Probe]:
        """One readiness probe; a "busy" one names the loads/unloads in flight on the server
        when it was sent or answered, if this server is `busy_while_loading`."""
        before = dict(self._calls)
        state = await self._server.probe_state()
        if state != "busy" or not self.busy_while_loading:
            return [Probe(state)]
        calls = {**self._calls, **before}
        if not calls:
            return [Probe(state)]
        names = sorted(calls, key=calls.__getitem__)
        return [Probe(state, tuple(names), round(time.monotonic() - calls[names[0]], 1))]

    @contextlib.contextmanager
    def _in_flight(self, name: str) -> Iterator[None]:
        """Mark a load/unload call of `name` as in flight on the server while it runs."""
        self._calls[name] = time.monotonic()
        try:
            yield
        finally:
            self._calls.pop(name, None)

    async def close(self) -> None:
        await self._http.aclose()
        await self._control.close()

    async def index(self) -> dict[str, str]:
        r = await self._post("/v2/repository/index", None)
        if r.status_code != 200:
            raise RuntimeErrorBase(None, f"index failed: {self._reason(r)}")
        return self._index_states(r.json())

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

    async def load(self, model: ServedModel) -> float | None:
        check_name(model.name)
        async with self._one_at_a_time(model.name):
            return await self._load(model)

    async def unload(self, name: str) -> None:
        check_name(name)
        async with self._one_at_a_time(name):
            await self._unload(name)

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, name: str) -> AsyncIterator[None]:
        """Hold `name`'s turn: its loads and unloads run one at a time, in call order. Two that
        overlap otherwise interleave their file work and their server calls (an unload's entry
        removal deleting the entry of a load the server took after the unload's answer: served
        with no entry; an unload dropping a model mid-load: the load fails with a 404)."""
        turn = self._turns.get(name)
        if turn is None:
            turn = self._turns[name] = [asyncio.Lock(), 0]
        turn[1] += 1
        try:
            async with turn[0]:
                yield
        finally:
            turn[1] -= 1
            if not turn[1]:
                del self._turns[name]

    async def _load(self, model: ServedModel) -> float | None:
        """load() in `model.name`'s turn."""
        entry = self.repository / model.name
        previous = await asyncio.to_thread(self._prepare_entry, entry, model)  # file work: off the loop
        t0 = time.monotonic()
        try:
            with self._in_flight(model.name):
                r = await self._post(f"/v2/repository/models/{model.name}/load", model.name, timeout=self.load_timeout)
        except (_TimedOut, asyncio.CancelledError):
            # the server may still be loading it, or get the request later: keep its entry
            # (unload cleans up, and looks again: see _unload)
            self._given_up.add(model.name)
            raise
        except ServerUnavailable:
            await asyncio.to_thread(self._restore_entry, entry, previous)
            raise
        server_s = time.monotonic() - t0
        if r.status_code != 200:
            await asyncio.to_thread(self._restore_entry, entry, previous)
            raise LoadFailed(model.name, self._reason(r))
        self._given_up.discard(model.name)
        self._log.info("event=model_loaded server=%s model=%s seconds=%.3f replaced=%s", self.kind, model.name, server_s, previous is not None)
        return server_s

    async def _unload(self, name: str) -> None:
        """unload() in `name`'s turn."""
        t0 = time.monotonic()
        await self._server_unload(name)
        await asyncio.to_thread(self._remove_entry, name)
        if name in self._given_up:
            # a load of `name` given up in flight may have reached the server after the unload
            # above answered and before the entry went: it found the entry and loads. With the
            # entry gone no later copy of it can, so one more unload settles it.
            self._given_up.discard(name)
            await self._server_unload(name)
        self._log.info("event=model_unloaded server=%s model=%s seconds=%.3f", self.kind, name, time.monotonic() - t0)

    async def _server_unload(self, name: str) -> None:
        """POST unload and wait until the server no longer serves `name`."""
        with self._in_flight(name):
            r = await self._post(f"/v2/repository/models/{name}/unload", name)
            if r.status_code not in (200, 404):  # 404: not loaded, which is what we want
                raise RuntimeErrorBase(name, f"unload failed: {self._reason(r)}")
            await self._wait_unloaded(name)

    def served_path(self, name: str) -> Path | None:
        """The model path the entry of `name` was written for (None: no entry of ours)."""
        served = self.entry(name)
        return served.path if served is not None else None

    def repository_entries(self) -> set[str]:
        return self._entries_in(self.repository)

    def entry(self, name: str) -> ServedModel | None:
        """The ServedModel an entry was written for (None if absent or written by someone else)."""
        return self._served_in(self.repository / name)

    # -- internals ------------------------------------------------------------------------

    def _entries_in(self, directory: Path) -> set[str]:
        """Names of the entry dirs in `directory` (those holding `entry_file`; dot-names skipped)."""
        try:
            return {p.name for p in directory.iterdir() if not p.name.startswith(".") and (p / self.entry_file).is_file()}
        except (FileNotFoundError, NotADirectoryError):
            return set()

    def _served_in(self, entry: Path) -> ServedModel | None:
        """The ServedModel the entry dir `entry` was written for (None if it is not an entry of ours)."""
        if not (entry / self.entry_file).is_file():
            return None
        try:
            return served_from_json(json.loads((entry / ENTRY_FILE).read_text()))
        except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, TypeError):
            return None

    async def _post(self, path: str, model: str | None, *, timeout: float | None = None) -> Answer:
        """POST a repository call with a JSON body `{}` (the form both servers accept);
        ServerUnavailable (or _TimedOut) when the server did not answer. A pooled connection
        the server closed before answering (uvicorn does after a 500) is retried once by the
        client, on a fresh connection: nothing was processed on it."""
        try:
            status, _, body = await self._control.request(
                "POST", path, _JSON_HEADERS, b"{}", timeout if timeout is not None else self.request_timeout)
        except asyncio.TimeoutError as e:  # UpstreamBusy included: no slot in time
            raise _TimedOut(model, f"{self.kind} at {self.base_url} timed out ({type(e).__name__})") from None
        except (UpstreamError, OSError) as e:
            raise ServerUnavailable(model, f"{self.kind} at {self.base_url} unreachable ({type(e).__name__})") from None
        return Answer(status, body)

    def _prepare_entry(self, entry: Path, model: ServedModel) -> _EntryState | None:
        """(In a thread.) Write the entry of `model`; return what it held before (to put back
        after a refusal). LoadFailed, with nothing written, when the model cannot be served."""
        if not Path(model.path).exists():
            raise LoadFailed(model.name, f"model files not found at {model.path}")
        text, links = self._entry_content(model)
        previous = self._read_entry(entry)
        self._write_entry(entry, _EntryState(text, links, served_to_json(model)))
        return previous

    def _read_entry(self, entry: Path) -> _EntryState | None:
        """What the entry holds now (None if it has no entry file)."""
        try:
            text = (entry / self.entry_file).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None
        links = {str(p.relative_to(entry)): os.readlink(p) for p in entry.rglob("*") if p.is_symlink()}
        try:
            served = json.loads((entry / ENTRY_FILE).read_text())
        except (FileNotFoundError, ValueError):
            served = None
        return _EntryState(text, links, served)

    def _write_entry(self, entry: Path, content: _EntryState) -> None:
        """Make the entry hold exactly `content`: links first, each swapped in atomically, then
        modelshelf.json, then the entry file (the server finds a new entry only now)."""
        entry.mkdir(parents=True, exist_ok=True)
        for p in sorted(entry.rglob("*"), key=lambda q: len(q.parts), reverse=True):
            rel = str(p.relative_to(entry))
            if p.is_symlink() and rel not in content.links:
                p.unlink()
            elif p.is_dir() and not p.is_symlink() and not any(k.startswith(rel + "/") for k in content.links):
                shutil.rmtree(p, ignore_errors=True)
        for rel, target in content.links.items():
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
        if content.served is not None:
            write_json(entry / ENTRY_FILE, content.served)
        else:
            (entry / ENTRY_FILE).unlink(missing_ok=True)
        write_text(entry / self.entry_file, content.text)

    def _remove_entry(self, name: str) -> None:
        """(In a thread, after the server unloaded `name`.) Remove its entry; a subclass adds
        its own file work here, so one unload costs one thread hop."""
        shutil.rmtree(self.repository / name, ignore_errors=True)

    def _restore_entry(self, entry: Path, previous: _EntryState | None) -> None:
        """After a failed load: put back what served before, or remove the entry."""
        if previous is None:
            shutil.rmtree(entry, ignore_errors=True)
        else:
            self._write_entry(entry, previous)


__all__ = [
    "Answer",
    "ENTRY_FILE",
    "HTTPServerAdapter",
    "Listen",
    "check_name",
    "served_from_json",
    "served_to_json",
    "write_json",
    "write_text",
]
