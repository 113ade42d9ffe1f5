"""The adapter contract the reconciler relies on, checked the same way against the real MLServer
adapter, the real Triton adapter and the ScriptedAdapter the reconciler tests drive (so what
those tests reproduce is what a real server does)."""
from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from agent.runtimes.base import LoadFailed, RuntimeErrorBase, ServedModel
from tests.support.models import write_broken_model, write_sklearn_model, write_triton_broken_model, write_triton_model
from tests.support.scripted import BROKEN_MARKER, ScriptedAdapter
from tests.support.servers import LoopThread, triton_site_packages

_names = itertools.count()


@dataclass
class Backend:
    """One adapter under the contract: how to call it and how to write a good / broken model."""

    adapter: Any
    call: Callable[[Any], Any]
    runtime: str
    good: Callable[[Path, str], Path]
    broken: Callable[[Path, str], Path]

    def served(self, name: str, path: Path) -> ServedModel:
        return ServedModel(name, path, self.runtime)

    def state(self, name: str) -> str | None:
        return self.call(self.adapter.index()).get(name)


def _scripted_broken(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / BROKEN_MARKER).write_text("this copy does not load\n")
    return directory


@pytest.fixture(scope="module")
def _scripted_loop() -> Iterator[LoopThread]:
    loop = LoopThread("scripted")
    yield loop
    loop.close()


@pytest.fixture(params=["scripted", "mlserver", pytest.param("triton", marks=pytest.mark.triton)])
def backend(request: pytest.FixtureRequest, _scripted_loop: LoopThread) -> Iterator[Backend]:
    kind = request.param
    if kind == "scripted":
        yield Backend(ScriptedAdapter(), _scripted_loop.run, "sklearn",
                      lambda d, n: write_sklearn_model(d), _scripted_broken)
    elif kind == "mlserver":
        srv = request.getfixturevalue("mlserver")
        yield Backend(srv.adapter, srv.call, "sklearn", lambda d, n: write_sklearn_model(d),
                      lambda d, n: write_broken_model(d))
    else:
        srv = request.getfixturevalue("triton")
        sp = triton_site_packages()
        yield Backend(srv.adapter, srv.call, "triton",
                      lambda d, n: write_triton_model(d, name=n, site_packages=sp),
                      lambda d, n: write_triton_broken_model(d, name=n))


def _name() -> str:
    return f"contract-{next(_names)}"


def test_load_makes_the_model_ready_in_the_index(backend: Backend, tmp_path: Path):
    name = _name()
    path = backend.good(tmp_path / "a", name)
    backend.call(backend.adapter.load(backend.served(name, path)))
    assert backend.state(name) == "READY"
    assert backend.adapter.served_path(name) == path


def test_load_of_a_missing_dir_fails_with_load_failed(backend: Backend, tmp_path: Path):
    name = _name()
    with pytest.raises(LoadFailed) as e:
        backend.call(backend.adapter.load(backend.served(name, tmp_path / "nowhere")))
    assert "not found" in e.value.reason
    assert backend.state(name) != "READY"


def test_broken_model_fails_and_is_not_ready(backend: Backend, tmp_path: Path):
    name = _name()
    path = backend.broken(tmp_path / "b", name)
    with pytest.raises(LoadFailed):
        backend.call(backend.adapter.load(backend.served(name, path)))
    assert backend.state(name) != "READY"


def test_unload_of_an_unknown_model_is_fine(backend: Backend):
    backend.call(backend.adapter.unload(_name()))


def test_unload_then_the_index_no_longer_says_ready(backend: Backend, tmp_path: Path):
    name = _name()
    backend.call(backend.adapter.load(backend.served(name, backend.good(tmp_path / "a", name))))
    backend.call(backend.adapter.unload(name))
    assert backend.state(name) != "READY"
    assert name not in backend.adapter.repository_entries()


def test_reload_in_place_serves_the_new_copy(backend: Backend, tmp_path: Path):
    name = _name()
    backend.call(backend.adapter.load(backend.served(name, backend.good(tmp_path / "a", name))))
    second = backend.good(tmp_path / "b", name)
    backend.call(backend.adapter.load(backend.served(name, second)))
    assert backend.state(name) == "READY"
    assert backend.adapter.served_path(name) == second


def test_failed_reload_keeps_the_previous_copy_serving(backend: Backend, tmp_path: Path):
    """The reconciler keeps a model LOADED after a failed update: the server must agree."""
    name = _name()
    first = backend.good(tmp_path / "a", name)
    backend.call(backend.adapter.load(backend.served(name, first)))
    with pytest.raises(RuntimeErrorBase):
        backend.call(backend.adapter.load(backend.served(name, backend.broken(tmp_path / "b", name))))
    assert backend.state(name) == "READY"
    assert backend.adapter.served_path(name) == first


def test_concurrent_loads_of_different_models_all_succeed(backend: Backend, tmp_path: Path):
    names = [_name() for _ in range(3)]
    paths = [backend.good(tmp_path / n, n) for n in names]

    async def both() -> None:
        await asyncio.gather(*(backend.adapter.load(backend.served(n, p)) for n, p in zip(names, paths)))

    backend.call(both())
    assert all(backend.state(n) == "READY" for n in names)
