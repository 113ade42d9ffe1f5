"""The model repository an embedded MLServer uses (its `model_repository_implementation`, set
by agent/runtimes/mlserver.py): MLServer's own per-load bookkeeping, cut to what a load needs.

MLServer 1.7's SchemalessModelRepository answers a load of NAME by globbing
`**/model-settings.json` under the whole repository, parsing every file it finds (a
pydantic-settings model: 2-8 ms each, on the server's event loop) and keeping those named NAME;
then reading `implementation` on settings that carry their source file inserts the entry's
folder into sys.path and `importlib.reload`s the runtime's module (~4 ms), on every load. Every
request queued on that loop waits meanwhile. Here:

- `find(name)` reads `<root>/<name>/model-settings.json`, the one entry the agent writes for
  that name (the adapter's layout), and falls back to MLServer's glob only when that file is
  absent or names another model (an entry someone else wrote);
- parsed settings are kept per file content (bytes -> ModelSettings, at most `cache_size`):
  a model loaded again gets a deep copy of what was parsed before, no pydantic-settings pass;
- settings whose implementation is one of `builtin` (installed runtimes such as
  mlserver_sklearn.SKLearnModel) carry no source file, so MLServer imports the class without
  touching sys.path or reloading the module. Their `parameters.uri` is absolute (the adapter
  writes it so): nothing is resolved relative to the file. A custom implementation (`runtime:
  mlserver`, its code linked into the entry) keeps the source, and MLServer's reload.

Memory follows what the server holds, within a bounded reserve: the embedded server runs with
glibc's mmap threshold fixed at 4 MiB (`MLServerAdapter.malloc_mmap_threshold`), so a model's
large arrays are mmapped and unmapped at free, and its smaller blocks (a forest's per-tree arrays,
0.5-1.5 MiB) land on the heap. Once this repository is in use, every registry load and unload
(`MultiModelRegistry.load` / `unload` / `unload_version`: the repository API's calls) ends with a
look at the allocator (`Reserve`): when the heap's free pages that are still resident (an
unloaded model's blocks, the read buffers a load freed) have grown by more than `malloc_keep`
bytes since the last trim, `malloc_trim(0)` hands them back; below it they stay for the next
load to reuse. `malloc_keep` is the agent's --server-malloc-keep (the adapter passes it in
`model_repository_implementation_args`); the agent's ledger counts the same bytes as a line of
its own, so real memory (the server's RSS over its bare baseline) stays within models + runtime
imports + keep. "Resident free" is read as RSS - mallinfo2's bytes in use (`uordblks` heap +
`hblkhd` mmapped) - what that was right after the last trim: one /proc/self/statm read and one
mallinfo2 (which walks the free lists: ~0.26 ms with 20 forests held). mallinfo2's `fordblks` is
no measure of it: it still counts free chunks whose pages a trim already released, so a bound on
it trims after almost every call. With `malloc_keep` 0, or without mallinfo2 (glibc < 2.33), the
server trims after every call, as before.

The reserve is published: after every registry call `Reserve` writes its current figure (the
resident free bytes above, 8 bytes little-endian) with one pwrite to the file named by
`reserve_file` (the adapter passes `<repository>/.malloc-reserve`; MLServerAdapter.allocator_reserve
reads it). The agent measures a load as the server's RSS growth minus the figure's growth over
the same window: without that, a load's freed read buffers that stayed in the reserve counted as
the model (a forest measured ~2x: 70.8 MiB for one declared at 35.8 in
benchmarks/results/peers_keep_r2), and kept pages a load reused did not (measured near 0). Its
limits: the figure is what the last registry call saw (frees between calls, an inference's, show
up at the next one), and it counts every resident byte malloc does not hand out, so memory a load
takes outside malloc (Python's small-object arenas, a library's pages) counts as reserve until
the next trim folds it into `_left`. The big one of those, a runtime's import, is folded at
once: a call that imported modules (len(sys.modules) grew) ends with a trim.

Why not trim always: every page a trim gives back is faulted in again by the next load. On
bench_peers' forests (19-49 MiB, 20 held, benchmarks/results/load_malloc.md) a load is p50
~60-67 ms and 2.29 M faults per 128 loads trimmed after each load and unload, 33.6-36.8 ms and
0.83 M with 100 MiB kept, 25.3-26.4 ms and 0.34 M with 200 MiB (no trim at all: 24.6-26.6 ms,
0.25 M, but RSS then keeps what was freed: 617 MiB after freeing all against 160). With the
threshold at glibc's initial 128 KiB (the agent before) every block above it, joblib.load's
transient arrays as much as the model, was a fresh mmap faulted in page by page: 85-96 ms per
load and 3.38 M faults.

A sklearn model's load reads its big arrays in place (`load_mapped`, installed over
mlserver_sklearn's SKLearnModel.load at the first sklearn entry parsed). joblib.load reads each
array of a file into a fresh bytes object, copies it into a fresh array, and a forest's trees
then copy that into their own node storage (Tree.__setstate__): three fresh allocations per
array, two of them freed at once, each page of them faulted in unless the allocator kept warm
pages (the reserve above). With joblib's mmap_mode="c" an array of MAP_MIN_BYTES or more is
a private, copy-on-write mapping of the file (the page cache: no zeroing, fault-around), so a
forest's load allocates only the trees' own copy. Measured (exploratory: bench_load_malloc's LOOP
run by hand with a mapped variant, which the script itself does not have; 109 loads
of bench_peers' forests, 15 held, MALLOC_MMAP_THRESHOLD_ 4 MiB, load average 2.0-2.9): a load's
p50 19.2-19.5 ms against 51.7-52.1 with a 57 MiB reserve (trims 17-18 against 84, minor faults
0.50 M against 1.71 M, CPU 3.7 s against 7.5), 15.0-15.9 against 26.6-26.8 with 128 MiB, 31.0-34.0
against 56.1-63.0 trimming after every call. Smaller arrays are read as joblib reads them: a
forest keeps ~20 tiny ones (classes, counts) as they were read, and each would keep a mapping.
The model then keeps no mapping of its file, and that is checked: each mapping the load made is
watched by a weak reference to its mmap object (alive: the model still holds it; a mapping not
found that way falls back to reading `/proc/self/maps`, by inode and real path, ~3 ms in a
server with ~1,400 mappings, which is why it is not the usual check: a tiny model's whole load
is ~0.3 ms, and a load that mapped nothing is not checked at all). A model that does hold a mapped array (a nearest-neighbours model's training
rows, a linear model's coefficients) is loaded again the plain way, so a cache file rewritten or
truncated in place never changes or breaks what the server holds (at the cost of a second load
for such models). A sidecar MLServer loads as MLServer does.

A registry unload runs in one turn of the server's loop (`_unload_in_one_turn`): MLServer's
own gathers its hooks in new tasks, so every load queued meanwhile ran its whole blocking
`joblib.load` before the unload ended (50 ms median for ~1 ms of work with the forests above).

This module runs INSIDE the MLServer process: it imports only mlserver and the standard library
at start; joblib and mlserver_sklearn (both the sklearn runtime's) at the first sklearn load.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import json
import math
import mmap
import os
import sys
import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Iterable, List

from mlserver.context import model_context
from mlserver.logging import logger as mlserver_logger
from mlserver.registry import MultiModelRegistry, SingleModelRegistry
from mlserver.repository.repository import DEFAULT_MODEL_SETTINGS_FILENAME, SchemalessModelRepository
from mlserver.settings import ModelParameters, ModelSettings


class EntryRepository(SchemalessModelRepository):
    """SchemalessModelRepository with a direct `find` (see the module doc)."""

    def __init__(self, root: str, builtin: Iterable[str] = (), cache_size: int = 4096, malloc_keep: int = 0,
                 reserve_file: str | None = None):
        super().__init__(root)
        self._abs_root = os.path.abspath(root) if root else ""
        self._builtin = frozenset(builtin)
        self._cache: OrderedDict[bytes, ModelSettings] = OrderedDict()
        self._cache_size = int(cache_size)
        # builtin-runtime settings per document shape (the document with its name and
        # parameters.uri left out): entries that differ only there share one parse
        self._shapes: OrderedDict[str, ModelSettings] = OrderedDict()
        _trim_after_registry_calls(int(malloc_keep), reserve_file)
        _unload_in_one_turn()

    async def find(self, name: str) -> List[ModelSettings]:
        if self._abs_root and name and "/" not in name and not name.startswith("."):
            path = os.path.join(self._abs_root, name, DEFAULT_MODEL_SETTINGS_FILENAME)
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError:
                raw = None
            if raw is not None:
                settings = self._parse(path, raw)
                if settings.name == name:
                    return [settings]
        return await super().find(name)

    def _parse(self, path: str, raw: bytes) -> ModelSettings:
        key = path.encode() + b"\0" + raw
        cached = self._cache.get(key)
        if cached is None:
            shape = _shape_of(raw)
            cached = self._from_shape(shape)
            if cached is None:
                cached = _settings_from(path, raw)
                if cached.implementation_ in self._builtin:
                    cached._source = None  # installed runtime: import it, no sys.path entry, no reload
                    self._remember_shape(shape[0], cached)
                if cached.implementation_ == SKLEARN_IMPLEMENTATION:
                    _map_sklearn_loads()
            self._cache[key] = cached
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return cached.model_copy(deep=True)

    def _from_shape(self, shaped: tuple[str | None, str, str]) -> ModelSettings | None:
        """The settings of a builtin-runtime document whose shape was parsed before (another
        entry's, with another name and uri): a deep copy with this document's name and uri, no
        pydantic-settings pass (2-8 ms on the server's loop, each model's first load in each
        server process). None when the shape is new or the document is not of that form."""
        shape, name, uri = shaped  # _shape_of the document
        template = self._shapes.get(shape) if shape is not None else None
        if template is None:
            return None
        self._shapes.move_to_end(shape)
        settings = template.model_copy(deep=True)
        settings.name = name
        settings.parameters.uri = uri
        return settings

    def _remember_shape(self, shape: str | None, settings: ModelSettings) -> None:
        if shape is not None and settings.parameters is not None:
            self._shapes[shape] = settings.model_copy(deep=True)
            if len(self._shapes) > self._cache_size:
                self._shapes.popitem(last=False)


def _shape_of(raw: bytes) -> tuple[str | None, str, str]:
    """(the document without its name and parameters.uri, as canonical JSON; the name; the
    uri), or (None, "", "") when it does not name both as non-empty strings."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None, "", ""
    params = doc.get("parameters") if isinstance(doc, dict) else None
    name, uri = (doc.get("name"), params.get("uri")) if isinstance(params, dict) else (None, None)
    if not (isinstance(name, str) and name and isinstance(uri, str) and uri):
        return None, "", ""
    rest = {**doc, "name": None, "parameters": {**params, "uri": None}}
    return json.dumps(rest, sort_keys=True), name, uri


def _settings_from(path: str, raw: bytes) -> ModelSettings:
    """What mlserver.repository.load.load_model_settings makes of `path`, from the bytes read
    (the file may be replaced meanwhile: the cache key is these bytes)."""
    doc = json.loads(raw)
    doc["_source"] = path
    settings = ModelSettings.model_validate(doc)
    folder = os.path.dirname(path)
    if not settings.name:
        settings.name = os.path.basename(folder)
    if not settings.parameters:
        settings.parameters = ModelParameters()
    if not settings.parameters.uri:
        settings.parameters.uri = folder
    return settings


SKLEARN_IMPLEMENTATION = "mlserver_sklearn.SKLearnModel"
MAP_MIN_BYTES = 64 * 2**10  # smaller arrays are read as joblib reads them: they would outlive the load mapped


def _map_sklearn_loads() -> None:
    """Make MLServer's SKLearnModel load through `load_mapped` (once per process; imported at
    the first sklearn load, where MLServer would import the runtime itself)."""
    import mlserver_sklearn.sklearn as runtime

    if getattr(runtime.SKLearnModel, "_modelshelf_mapped", False):
        return

    async def load(self) -> bool:  # mlserver_sklearn 1.7's SKLearnModel.load, with load_mapped
        uri = await runtime.get_model_uri(self._settings, wellknown_filenames=runtime.WELLKNOWN_MODEL_FILENAMES)
        self._model = load_mapped(uri)
        return True

    runtime.SKLearnModel.load = load
    runtime.SKLearnModel._modelshelf_mapped = True


_mapping = threading.local()  # .maps: the mappings of the load_mapped call running in this thread (None: none runs)


def load_mapped(path: str) -> Any:
    """joblib.load(path), reading the arrays of MAP_MIN_BYTES and more through a private,
    copy-on-write mapping of the file instead of into fresh memory (see the module doc), and
    guaranteeing that the model keeps no mapping of its file: where one of those arrays outlived
    the load (the model holds it as it was read, not a copy of it), the model is loaded again
    the plain way, so a file rewritten or truncated in place later never changes nor breaks
    what the server holds."""
    import joblib
    from joblib import numpy_pickle

    _patch_array_reads(numpy_pickle)
    _mapping.maps = maps = []
    try:
        model = joblib.load(path, mmap_mode="c")
    except Exception:  # a file system that cannot map, a file joblib cannot map: the plain load decides
        model = None
    finally:
        _mapping.maps = None
    if model is None or (maps and _maps_kept(maps, path)):
        model = None
        gc.collect()  # a mapped array held in a reference cycle: unmapped now, not at some later collection
        model = joblib.load(path)
    return model


def _patch_array_reads(numpy_pickle: Any) -> None:
    """joblib maps every array when mmap_mode is set; under load_mapped only the big ones are
    (a mapping per array: a forest's ~20 tiny arrays that outlive the load would each keep one)."""
    wrapper = numpy_pickle.NumpyArrayWrapper
    if getattr(wrapper, "_modelshelf_small_read", False):
        return
    read = wrapper.read

    @functools.wraps(read)
    def read_small_plainly(self, unpickler, *args, **kwargs):
        mode, maps = unpickler.mmap_mode, getattr(_mapping, "maps", None)
        if mode is None or maps is None:
            return read(self, unpickler, *args, **kwargs)
        if math.prod(self.shape) * self.dtype.itemsize >= MAP_MIN_BYTES:
            array = read(self, unpickler, *args, **kwargs)
            maps.append(_mmap_of(array))
            return array
        unpickler.mmap_mode = None
        try:
            return read(self, unpickler, *args, **kwargs)
        finally:
            unpickler.mmap_mode = mode

    wrapper.read = read_small_plainly
    wrapper._modelshelf_small_read = True


def _mmap_of(array: Any) -> "weakref.ref[mmap.mmap] | None":
    """A weak reference to the mmap object under `array` (the end of its base chain), or None
    when there is none to be found (an array read another way: the caller checks the process's
    mappings instead)."""
    base = array
    while getattr(base, "base", None) is not None:
        base = base.base
    return weakref.ref(base) if isinstance(base, mmap.mmap) else None


def _maps_kept(maps: list, path: str) -> bool:
    """Whether any mapping made by the load outlived it (the model holds a mapped array)."""
    if any(ref is None for ref in maps):
        return _still_mapped(path)
    return any(ref() is not None for ref in maps)


def _still_mapped(path: str) -> bool:
    """Whether this process maps ``path`` (by device and inode, or by its real path)."""
    try:
        st = os.stat(path)
        real = os.path.realpath(path)
        with open("/proc/self/maps", "rb") as f:
            maps = f.read().decode(errors="replace")
    except OSError:
        return True  # cannot tell: load again, plainly
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    for line in maps.splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and ((fields[4] == str(st.st_ino) and fields[3] == dev) or fields[5] == real):
            return True
    return False


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    """This process's resident bytes (/proc/self/statm: one read, a few microseconds)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


class Reserve:
    """When to trim after a registry call (see the module doc). ``keep`` 0, or a C library
    without malloc_trim/mallinfo2: trim after every call. Else trim only when the bytes resident
    beyond what malloc hands out (RSS - in use - mmapped) have grown by more than ``keep`` since
    the last trim (``unaccounted() - left``). That growth is, by construction, free heap pages
    that are still resident plus whatever non-malloc memory grew (an import, Python's own
    arenas): counting the latter only trims sooner. mallinfo2's ``fordblks`` alone is no
    measure: it counts free chunks whose pages a trim already gave back."""

    def __init__(self, keep: int = 0, publish: str | None = None):
        self.keep = max(0, int(keep))
        self.trims = 0
        self._fd: int | None = None
        self._modules = len(sys.modules)
        self._trim: Callable[[], Any] | None = None
        self._mallinfo: Callable[[], _Mallinfo2] | None = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            fn = libc.malloc_trim
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
            self._trim = functools.partial(fn, 0)
            info = libc.mallinfo2  # glibc >= 2.33
            info.argtypes, info.restype = [], _Mallinfo2
            self._mallinfo = info
        except (OSError, AttributeError):
            pass
        self._left = 0
        if self.bounded:
            try:
                self._left = self.unaccounted()
            except (OSError, ValueError, IndexError):  # no /proc/self/statm: trim after every call
                self._mallinfo = None
        if publish and self.bounded:  # trimmed after every call: nothing kept, nothing to publish
            self._fd = os.open(publish, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._publish(0)

    @property
    def available(self) -> bool:
        return self._trim is not None

    @property
    def bounded(self) -> bool:
        """Trims only past ``keep`` (else after every call)."""
        return self.keep > 0 and self._trim is not None and self._mallinfo is not None

    def unaccounted(self) -> int:
        """RSS minus malloc's bytes in use (heap and mmapped)."""
        m = self._mallinfo()
        return _rss() - m.uordblks - m.hblkhd

    def after_call(self) -> None:
        if self._trim is None:
            return
        if self.bounded:
            kept = self.unaccounted() - self._left
            # a call that imported modules (a runtime's first load) grew the process by code and
            # objects no trim gives back: trim now, so that they count into `_left`, not into
            # the reserve the agent subtracts from a load's growth
            imported, self._modules = len(sys.modules) != self._modules, len(sys.modules)
            if kept <= self.keep and not imported:
                self._publish(kept)
                return
        self._trim()
        self.trims += 1
        if self.bounded:
            self._left = self.unaccounted()  # what a trim cannot give back is not a reserve
            self._publish(0)

    def _publish(self, kept: int) -> None:
        """Write the reserve's resident free bytes now (8 bytes, little-endian, at offset 0)
        to the file the agent reads (MLServerAdapter.allocator_reserve): no fsync, a page-cache
        write of a few microseconds."""
        if self._fd is not None:
            os.pwrite(self._fd, max(0, int(kept)).to_bytes(8, "little"), 0)


def _trim_after_registry_calls(keep: int, publish: str | None = None) -> None:
    """Make every registry load and unload end with `Reserve.after_call`, which publishes the
    reserve's figure to the file `publish` (once per process; see the module doc)."""
    if getattr(MultiModelRegistry, "_modelshelf_trims", False):
        return
    reserve = Reserve(keep, publish)
    if not reserve.available:
        return

    def trimming(method):
        @functools.wraps(method)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await method(*args, **kwargs)
            finally:  # an unloaded model's last references went with the registry's, a load's
                reserve.after_call()  # transient buffers with the load: their bytes are free
        return wrapper

    MultiModelRegistry.load = trimming(MultiModelRegistry.load)  # the load's transient buffers
    MultiModelRegistry.unload = trimming(MultiModelRegistry.unload)
    MultiModelRegistry.unload_version = trimming(MultiModelRegistry.unload_version)
    MultiModelRegistry._modelshelf_trims = True
    MultiModelRegistry._modelshelf_reserve = reserve


ONE_TURN_MLSERVER = "1.7."  # the MLServer whose SingleModelRegistry.unload _unload_in_one_turn rewrites


def _mlserver_version() -> str:
    from mlserver import __version__

    return __version__


def _unload_in_one_turn() -> None:
    """Make a registry unload run its steps one after the other instead of through
    `asyncio.gather` (once per process). MLServer 1.7's SingleModelRegistry.unload gathers
    `_unload_model` over the versions, which gathers the unload hooks: each gather hands the
    steps to new tasks and waits for the loop's next turns, and every load queued on the loop
    meanwhile runs its whole `joblib.load` (the loop is blocked 20-40 ms per forest) before the
    unload goes on. Measured in the server (bench_peers' big set, two server processes): the
    registry's unload of a forest took 50 ms median, 126 ms p90, for work of ~1 ms, and a miss
    whose victim must be gone first waited for all of it (peers.notes.md, bigcold). Here the
    hooks are awaited in order (the embedded server's hooks, `remove_custom_handlers`, and
    the model's own unload never wait on the loop), so an unload that has started ends before
    anything else runs; as with gather(return_exceptions=True), a hook that raises does not stop
    the others, and the model is unloaded all the same."""
    if getattr(SingleModelRegistry, "_modelshelf_one_turn", False):
        return
    if not _mlserver_version().startswith(ONE_TURN_MLSERVER):
        # the two methods below are 1.7's, rewritten: another version keeps its own (slower) unload
        mlserver_logger.warning("modelshelf: MLServer %s is not %s.x: its registry unload is left as it is",
                                _mlserver_version(), ONE_TURN_MLSERVER.rstrip("."))
        return

    async def _unload_model(self, model) -> None:  # SingleModelRegistry._unload_model, hooks in order
        with model_context(model.settings):
            for callback in self._on_model_unload:
                try:
                    await callback(model)
                except Exception:  # noqa: BLE001 - gather(return_exceptions=True) ignored them too
                    mlserver_logger.exception("an unload hook of model %r failed", model.name)
            if model.version:
                del self._versions[model.version]
            if model == self.default:
                self._clear_default()
            model.ready = not await model.unload()
            mlserver_logger.info("Unloaded model '%s' successfully.", model.name)

    async def unload(self) -> None:  # SingleModelRegistry.unload, versions one after the other
        for model in await self.get_models():
            await self._unload_model(model)
        self._versions.clear()
        self._clear_default()

    SingleModelRegistry._unload_model = _unload_model
    SingleModelRegistry.unload = unload
    SingleModelRegistry._modelshelf_one_turn = True


__all__ = ["EntryRepository"]
