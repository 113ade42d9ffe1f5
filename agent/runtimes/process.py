"""The co-located server's process: an embedded child we start and keep alive (`ServerProcess`),
or an external sidecar we only watch (`SidecarWatch`).

Both call an async `on_restart()` once the server answers /v2/health/ready again after it went
away, so the owner (the reconciler) can reload what was loaded: a restarted server has an empty
registry. The child runs in its own process group (stop kills the whole tree) and, on Linux,
dies with the agent (PR_SET_PDEATHSIG), so a killed agent leaves no orphan server behind.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable, Mapping, Sequence

import httpx

from agent.runtimes.base import ServerUnavailable

log = logging.getLogger("modelshelf.runtimes.process")

OnRestart = Callable[[], Awaitable[None]]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


async def _notify_restart(on_restart: OnRestart | None, name: str) -> None:
    """Await `on_restart` if set; a failure is logged, never raised into the watch loop."""
    if on_restart is None:
        return
    try:
        await on_restart()
    except Exception:
        log.exception("event=on_restart_failed server=%s", name)


async def probe_ready(client: httpx.AsyncClient, url: str) -> bool:
    """One GET of a readiness URL; True on 200, False on anything else (never raises)."""
    return await probe_state(client, url) == "up"


async def probe_state(client: httpx.AsyncClient, url: str) -> str:
    """"up" (200), "busy" (it answered otherwise, or timed out: alive but not ready, e.g.
    blocked importing a model's libraries) or "down" (nothing listens)."""
    try:
        r = await client.get(url)
        return "up" if r.status_code == 200 else "busy"
    except httpx.TimeoutException:
        return "busy"
    except (httpx.HTTPError, OSError):
        return "down"


class ServerProcess:
    """A server started as a child process, restarted with backoff when it dies.

    `start()` spawns it and returns once `ready_url` answers 200. A watch task then waits on the
    child; when it exits unexpectedly the watcher restarts it (backoff 0.5 s doubling to
    `max_backoff`, reset after it stayed up a minute), waits for ready, and awaits
    `on_restart()`. `stop()` sends SIGTERM to the process group, then SIGKILL after
    `stop_timeout`. Output lines go to the logger at debug level (and to `log_file` if given);
    the last lines are kept for error messages.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        ready_url: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        name: str = "server",
        on_restart: OnRestart | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        max_backoff: float = 30.0,
        log_file: Path | None = None,
        die_with_parent: bool = True,
    ):
        self.argv = list(argv)
        self.ready_url = ready_url
        self.env = dict(os.environ if env is None else env)
        self.cwd = Path(cwd) if cwd else None
        self.name = name
        self.on_restart = on_restart
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.max_backoff = max_backoff
        self.log_file = Path(log_file) if log_file else None
        self.die_with_parent = die_with_parent and sys.platform.startswith("linux")
        self.restarts = 0  # successful restarts after an unexpected exit
        self.last_exit: dict | None = None  # the last unexpected exit: pid, code, signal, at
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._stopping = False
        self._ready = asyncio.Event()
        self._log_fh = None
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(2.0), trust_env=False)

    # -- public surface -------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """PID of the current child (None before start or while it is down)."""
        p = self._proc
        return p.pid if p is not None and p.returncode is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def ready(self) -> bool:
        """True while the child is up and was seen ready since its last (re)start."""
        return self._ready.is_set() and self.running

    def pids(self) -> list[int]:
        """The child and all its descendants (for RSS / NVML accounting); [] when down."""
        pid = self.pid
        if pid is None:
            return []
        try:
            import psutil

            proc = psutil.Process(pid)
            return [pid] + [c.pid for c in proc.children(recursive=True)]
        except Exception:  # psutil missing or the process just went away
            return [pid]

    async def start(self) -> None:
        """Spawn the server and wait until it is ready; ServerUnavailable if it is not within
        `start_timeout` (the child is then stopped) or exits first."""
        if self._watcher is not None:
            raise RuntimeError(f"{self.name} already started")
        self._stopping = False
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_fh = open(self.log_file, "a", buffering=1)
        t0 = time.monotonic()
        await self._spawn()
        try:
            await self._wait_ready(self.start_timeout)
        except BaseException:
            await self._terminate()
            raise
        log.info("event=server_ready server=%s pid=%s seconds=%.2f", self.name, self.pid, time.monotonic() - t0)
        self._watcher = asyncio.create_task(self._watch(), name=f"{self.name}-watch")

    async def wait_ready(self, timeout: float) -> None:
        """Return when the child is up and ready (e.g. after a restart); ServerUnavailable after timeout."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            raise ServerUnavailable(None, f"{self.name} not ready within {timeout:.0f}s") from None

    async def stop(self) -> None:
        """Stop watching and terminate the process group (SIGTERM, then SIGKILL)."""
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None
        await self._client.aclose()  # first: Triton waits for open connections before exiting
        await self._terminate()
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    # -- internals ------------------------------------------------------------------------

    async def _spawn(self) -> None:
        self._ready.clear()
        if self.cwd:
            self.cwd.mkdir(parents=True, exist_ok=True)
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            cwd=str(self.cwd) if self.cwd else None,
            start_new_session=True,  # own process group: stop() kills the whole tree
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )
        log.debug("event=server_spawned server=%s pid=%s", self.name, self._proc.pid)
        self._reader = asyncio.create_task(self._read_output(self._proc), name=f"{self.name}-output")

    async def _read_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line over the stream limit: skip its rest
                continue
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            if self._log_fh is not None:
                self._log_fh.write(line + "\n")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("server=%s pid=%s out=%s", self.name, proc.pid, line)

    def _tail_text(self, lines: int = 5) -> str:
        return " | ".join(list(self.tail)[-lines:])

    async def _wait_ready(self, timeout: float, poll: float = 0.05) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if proc.returncode is not None:
                await self._drain()
                raise ServerUnavailable(None, f"{self.name} exited with code {proc.returncode} before ready: {self._tail_text()}")
            if await probe_ready(self._client, self.ready_url):
                self._ready.set()
                return
            if time.monotonic() > deadline:
                raise ServerUnavailable(None, f"{self.name} not ready within {timeout:.0f}s: {self._tail_text()}")
            await asyncio.sleep(poll)

    async def _drain(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(self._reader), 1.0)

    async def _watch(self) -> None:
        backoff = 0.5
        while not self._stopping:
            proc = self._proc
            assert proc is not None
            started = time.monotonic()
            code = await proc.wait()
            # how it ended (a negative code is the signal that killed it: SIGKILL is also how the
            # kernel's OOM killer ends a process); the owner reads it to say why it restarted
            self.last_exit = {"pid": proc.pid, "code": code, "signal": -code if code < 0 else None, "at": time.time()}
            self._ready.clear()
            if self._stopping:
                return
            await self._drain()
            self._kill_group(proc.pid, signal.SIGKILL)  # leftovers of the dead tree
            if time.monotonic() - started > 60:
                backoff = 0.5
            log.warning("event=server_exited server=%s pid=%s code=%s restart_in=%.1fs last=%s", self.name, proc.pid, code, backoff, self._tail_text(2))
            while not self._stopping:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                try:
                    await self._spawn()
                    # probed often: from the moment the restarted server answers until
                    # on_restart() has told the owner, it would answer 404 for every model
                    await self._wait_ready(self.start_timeout, poll=0.01)
                    break
                except (ServerUnavailable, OSError) as e:
                    log.warning("event=server_restart_failed server=%s reason=%s", self.name, e)
                    await self._terminate()
            if self._stopping:
                return
            self.restarts += 1
            log.info("event=server_restarted server=%s pid=%s restarts=%d", self.name, self.pid, self.restarts)
            await _notify_restart(self.on_restart, self.name)

    @staticmethod
    def _kill_group(pgid: int, sig: int) -> bool:
        try:
            os.killpg(pgid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            self._kill_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout)
            except asyncio.TimeoutError:
                log.warning("event=server_kill server=%s pid=%s after=%.0fs", self.name, proc.pid, self.stop_timeout)
                self._kill_group(proc.pid, signal.SIGKILL)
                await proc.wait()
        self._kill_group(proc.pid, signal.SIGKILL)  # any child left in the group
        await self._drain()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        self._ready.clear()


class SidecarWatch:
    """Watches an external server (sidecar mode): polls readiness every `interval` seconds and
    awaits `on_restart()` when it answers again after being seen down (connection refused; a
    timeout or a non-200 answer means busy, not restarted). A restart faster than the interval
    can go unseen; the reconciler's periodic resync against the index catches that."""

    def __init__(self, ready_url: str, *, on_restart: OnRestart | None = None, interval: float = 2.0, name: str = "server"):
        self.ready_url = ready_url
        self.on_restart = on_restart
        self.interval = interval
        self.name = name
        self.restarts = 0
        self._task: asyncio.Task | None = None
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(2.0), trust_env=False)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self.name}-sidecar-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        await self._client.aclose()

    async def _run(self) -> None:
        was_down = False
        while True:
            await asyncio.sleep(self.interval)
            state = await probe_state(self._client, self.ready_url)
            if state == "down" and not was_down:
                was_down = True
                log.warning("event=server_down server=%s url=%s", self.name, self.ready_url)
            elif state == "up" and was_down:  # only a real outage counts, not a slow answer
                was_down = False
                self.restarts += 1
                log.info("event=server_back server=%s url=%s restarts=%d", self.name, self.ready_url, self.restarts)
                await _notify_restart(self.on_restart, self.name)


class ServerHandle:
    """What an adapter holds: the server's base URL and its lifecycle, embedded or sidecar.

    Embedded (`process` given): `start()` spawns the child and `stop()` terminates it.
    Sidecar (no process): `start()` waits for the external server and watches it (every
    `sidecar_interval` s; None turns the watch off); `stop()` only stops watching.
    Either way `on_restart` (settable later) is awaited after the server came back from a restart.
    """

    def __init__(self, base_url: str, *, process: ServerProcess | None = None, name: str = "server", sidecar_interval: float | None = 2.0):
        self.base_url = base_url.rstrip("/")
        self.process = process
        self.name = name
        self.on_restart: OnRestart | None = None
        self._ready_url = self.base_url + "/v2/health/ready"
        self._sidecar: SidecarWatch | None = None
        self._sidecar_interval = sidecar_interval
        self._sidecar_restarts = 0
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(2.0), trust_env=False)
        if process is not None:
            process.on_restart = self._restarted

    @property
    def embedded(self) -> bool:
        return self.process is not None

    @property
    def restarts(self) -> int:
        return self.process.restarts if self.process is not None else self._sidecar_restarts

    def pids(self) -> list[int]:
        """The embedded server's process tree; [] in sidecar mode (not ours to measure)."""
        return self.process.pids() if self.process is not None else []

    async def _restarted(self) -> None:
        if self.process is None:
            self._sidecar_restarts += 1
        if self.on_restart is not None:
            await self.on_restart()

    async def start(self, timeout: float = 60.0) -> None:
        if self.process is not None:
            self.process.start_timeout = timeout
            await self.process.start()
            return
        await self.wait_ready(timeout)
        if self._sidecar is None and self._sidecar_interval:  # None/0: the owner watches itself
            self._sidecar = SidecarWatch(self._ready_url, on_restart=self._restarted, interval=self._sidecar_interval, name=self.name)
            self._sidecar.start()

    async def stop(self) -> None:
        await self._client.aclose()  # first: Triton waits for open connections before exiting
        if self._sidecar is not None:
            await self._sidecar.stop()
            self._sidecar = None
        if self.process is not None:
            await self.process.stop()

    async def is_ready(self) -> bool:
        return await probe_ready(self._client, self._ready_url)

    async def probe_state(self) -> str:
        """One probe: "up", "busy" or "down" (see `probe_state`)."""
        return await probe_state(self._client, self._ready_url)

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not await self.is_ready():  # embedded and down: the watcher is restarting it
            if time.monotonic() > deadline:
                raise ServerUnavailable(None, f"{self.name} at {self.base_url} not ready within {timeout:.0f}s")
            await asyncio.sleep(0.05)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` right now (the server binds it a moment later)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_taken(host: str, port: int) -> bool:
    """Whether another socket holds `port` on `host` now (a closed connection's TIME_WAIT does
    not count: only a live binding stops a server from binding it)."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False
