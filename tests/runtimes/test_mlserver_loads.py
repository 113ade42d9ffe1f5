"""An embedded MLServer's sklearn loads run off its event loop (mlserver_repository.ThreadedSKLearnModel),
against the session's real MLServer (conftest).

A load is held in progress without timing: the model file unpickles to the real model only after
it has created a marker file and read one byte from a FIFO the test holds open; the test writes
that byte (or closes the FIFO) when it has checked what the server does meanwhile."""
from __future__ import annotations

import asyncio
import io
import json
import operator
import os
from pathlib import Path
from typing import Any

import httpx

from agent.runtimes import ServedModel
from agent.runtimes.mlserver import MLServerAdapter
from tests.support.models import sample_rows, sklearn_predictions, v2_request, write_sklearn_model
from tests.support.servers import RunningServer

ROWS = sample_rows(8, seed=3)


class _Call:
    """Pickles as `fn(*args)`: run by the server's unpickler."""

    def __init__(self, fn: Any, *args: Any):
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


def _held_model(directory: Path, real: Path, marker: Path, fifo: Path) -> Path:
    """`<directory>/model.joblib`: the model of `real`, whose unpickling first creates `marker`,
    then reads one byte from `fifo` (blocking until the test writes it or closes the FIFO)."""
    import joblib

    model = joblib.load(real / "model.joblib")
    held = _Call(operator.getitem, (
        _Call(io.open, str(marker), "w"),
        _Call(operator.methodcaller("read", 1), _Call(io.open, str(fifo), "rb")),
        model), 2)
    directory.mkdir(parents=True)
    joblib.dump(held, directory / "model.joblib")
    return directory


async def _until_loading(marker: Path, load: asyncio.Task) -> None:
    """Wait until the server's unpickler of the held model reached its FIFO read."""
    while not marker.exists():
        assert not load.done(), load
        await asyncio.sleep(0.01)


def _predictions(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    (out,) = [o for o in r.json()["outputs"] if o["name"] == "predict"]
    return [int(v) for v in out["data"]]


def _hold(tmp_path: Path, real: Path) -> tuple[Path, Path, int]:
    fifo, marker = tmp_path / "hold", tmp_path / "unpickling"
    os.mkfifo(fifo)
    held = _held_model(tmp_path / "held", real, marker, fifo)
    # read+write: the server's open of the FIFO returns at once, its read waits for our byte
    return held, marker, os.open(fifo, os.O_RDWR | os.O_NONBLOCK)


def test_only_an_embedded_servers_default_sklearn_runtime_is_threaded(tmp_path: Path) -> None:
    """Embedded: the threaded runtime; a sidecar MLServer (which cannot import the agent), a
    configured `implementation` and one shipped in the model's model-settings.json: untouched."""
    d = write_sklearn_model(tmp_path / "m")
    plain = ServedModel("m", d, "sklearn")

    def implementation(adapter: MLServerAdapter, model: ServedModel) -> str:
        return json.loads(adapter._entry_content(model)[0])["implementation"]

    embedded = MLServerAdapter.embedded(tmp_path / "e" / "repository", workdir=tmp_path / "e" / "cwd", env={})
    sidecar = MLServerAdapter(tmp_path / "s" / "repository", "http://127.0.0.1:9")
    assert implementation(embedded, plain) == "agent.runtimes.mlserver_repository.ThreadedSKLearnModel"
    assert implementation(sidecar, plain) == "mlserver_sklearn.SKLearnModel"
    own = ServedModel("m", d, "sklearn", implementation="mlserver_sklearn.SKLearnModel")
    assert implementation(embedded, own) == "mlserver_sklearn.SKLearnModel"
    shipped = write_sklearn_model(tmp_path / "shipped")
    (shipped / "model-settings.json").write_text(json.dumps({"implementation": "mlserver_sklearn.SKLearnModel"}))
    assert implementation(embedded, ServedModel("m", shipped, "sklearn")) == "mlserver_sklearn.SKLearnModel"


def test_other_models_are_answered_while_a_load_is_in_progress(mlserver: RunningServer, tmp_path: Path) -> None:
    """With the load inline on MLServer's loop, the inference below waits for the held load
    (and fails on its timeout)."""
    ad = mlserver.adapter
    good = write_sklearn_model(tmp_path / "good")
    mlserver.load(ServedModel("good", good, "sklearn"))
    held, marker, fd = _hold(tmp_path, good)

    async def scenario() -> tuple[list[int], int, int, list[int]]:
        load = asyncio.create_task(ad.load(ServedModel("held", held, "sklearn")))
        try:
            await _until_loading(marker, load)
            async with httpx.AsyncClient(base_url=ad.base_url, timeout=30, trust_env=False) as c:
                during = _predictions(await c.post("/v2/models/good/infer", json=v2_request(ROWS)))
                held_ready = (await c.get("/v2/models/held/ready")).status_code
                os.write(fd, b"x")
                await load
                await ad.parked("held")
                after = (await c.get("/v2/models/held/ready")).status_code
                return during, held_ready, after, _predictions(await c.post("/v2/models/held/infer", json=v2_request(ROWS)))
        finally:
            os.close(fd)  # unblocks a load still waiting (EOF)
            await asyncio.wait([load])

    during, held_ready, after, held_answer = mlserver.call(scenario(), timeout=90)
    assert during == sklearn_predictions(good, ROWS)
    assert held_ready != 200  # not ready until its load finished
    assert after == 200 and held_answer == sklearn_predictions(good, ROWS)


def test_an_unload_during_a_load_leaves_the_model_unserved_and_the_server_serving(mlserver: RunningServer, tmp_path: Path) -> None:
    ad = mlserver.adapter
    good = write_sklearn_model(tmp_path / "good")
    mlserver.load(ServedModel("good", good, "sklearn"))
    held, marker, fd = _hold(tmp_path, good)

    async def scenario() -> tuple[int, int, list[int]]:
        load = asyncio.create_task(ad.load(ServedModel("held", held, "sklearn")))
        try:
            await _until_loading(marker, load)
            async with httpx.AsyncClient(base_url=ad.base_url, timeout=30, trust_env=False) as c:
                unload = asyncio.create_task(c.post("/v2/repository/models/held/unload", json={}))
                # the registry drops the model as the unload starts: then its ready answers 404
                while (await c.get("/v2/models/held/ready")).status_code != 404:
                    assert not unload.done(), unload
                    await asyncio.sleep(0.01)
                os.write(fd, b"x")
                await asyncio.wait([load])
                unloaded = (await unload).status_code
                await ad.parked("held")
                ready = (await c.get("/v2/models/held/ready")).status_code
                return unloaded, ready, _predictions(await c.post("/v2/models/good/infer", json=v2_request(ROWS)))
        finally:
            os.close(fd)
            await asyncio.wait([load])

    unloaded, ready, good_answer = mlserver.call(scenario(), timeout=90)
    assert unloaded == 200
    assert ready == 404  # not served: the unload won
    assert good_answer == sklearn_predictions(good, ROWS)
    again = write_sklearn_model(tmp_path / "again", seed=1)
    mlserver.load(ServedModel("again", again, "sklearn"))
    assert mlserver.call(ad.model_state("again")) == "READY"
