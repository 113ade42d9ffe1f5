"""Generators of small, real test models (no downloads), reusable by every test area.

- `write_sklearn_model`: a scikit-learn classifier trained on a tiny synthetic data set, saved
  with joblib as `model.joblib` (served by mlserver-sklearn; output name `predict`).
- `write_broken_model`: a `model.joblib` of garbage bytes (the server fails to load it).
- `write_slow_model`: a custom MLServer runtime (`slow_model.SlowModel`) that sleeps per request
  and can log every load to a file (to count loads on the server).
- `write_triton_model` / `write_triton_broken_model`: a Triton python-backend model dir
  (`config.pbtxt` + `1/model.py`): OUTPUT0 = INPUT0 * factor, FP32.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

N_FEATURES = 4
SKLEARN_KINDS = ("iris-logreg", "tree", "forest")


def sample_rows(n: int = 3, seed: int = 1) -> list[list[float]]:
    """Input rows for the sklearn models (N_FEATURES floats each)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, N_FEATURES)).round(3).tolist()


def _dataset(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An iris-shaped problem: 90 rows, 4 features, 3 classes separated by linear scores."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(90, N_FEATURES))
    w = rng.normal(size=(N_FEATURES, 3))
    return x, np.argmax(x @ w, axis=1)


def write_sklearn_model(directory: Path, kind: str = "iris-logreg", seed: int = 0, pad_bytes: int = 0,
                        pad_chunk: int | None = None) -> Path:
    """Train a small classifier and save it as `<directory>/model.joblib`; return the directory.

    `seed` changes the data, so two seeds give two models that disagree on some rows.
    `pad_bytes` attaches an incompressible array of that size to the estimator, so the file and
    the server's memory after load grow by about that much (for memory-budget tests);
    `pad_chunk` splits it into a list of arrays of at most that size (blocks a server's
    allocator keeps on its heap, as a forest's per-tree arrays).
    """
    import joblib
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeClassifier

    x, y = _dataset(seed)
    if kind == "iris-logreg":
        est = LogisticRegression(max_iter=500)
    elif kind == "tree":
        est = DecisionTreeClassifier(random_state=seed)
    elif kind == "forest":
        est = RandomForestClassifier(n_estimators=5, random_state=seed)
    else:
        raise ValueError(f"unknown sklearn model kind {kind!r} (one of {SKLEARN_KINDS})")
    est.fit(x, y)
    if pad_bytes:
        est.modelshelf_pad_ = np.random.default_rng(seed).integers(0, 255, size=pad_bytes, dtype=np.uint8)
        if pad_chunk:
            est.modelshelf_pad_ = [est.modelshelf_pad_[i:i + pad_chunk].copy() for i in range(0, pad_bytes, pad_chunk)]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    joblib.dump(est, directory / "model.joblib")
    return directory


def write_noise_forest(directory: Path, trees: int = 4, rows: int = 20000, seed: int = 0, compress: int = 0) -> Path:
    """A RandomForest fully grown on noise (`rows` x 4 features, 3 classes: ~0.5 MiB of tree
    arrays per 10,000 rows and tree) saved as `<directory>/model.joblib`, as the big models of
    benchmarks/bench_peers.py; return the directory. `compress` (joblib's level): a file the
    embedded MLServer cannot map, so its load reads every array into fresh buffers
    (agent/runtimes/mlserver_repository.py `load_mapped`)."""
    import joblib
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(rows, N_FEATURES)), rng.integers(0, 3, rows)
    est = RandomForestClassifier(n_estimators=trees, random_state=seed).fit(x, y)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    joblib.dump(est, directory / "model.joblib", compress=compress)
    return directory


def sklearn_predictions(directory: Path, rows: list[list[float]]) -> list[int]:
    """What the model in `directory` predicts for `rows`, computed here (to compare with a server)."""
    import joblib

    return [int(v) for v in joblib.load(Path(directory) / "model.joblib").predict(np.asarray(rows))]


def write_broken_model(directory: Path) -> Path:
    """A `model.joblib` of garbage: a server's load of it fails."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.joblib").write_bytes(b"\x80\x04not a pickle at all" + os.urandom(64))
    return directory


def v2_request(rows: list[list[float]], name: str = "input-0", datatype: str = "FP64") -> dict[str, Any]:
    """A KServe V2 JSON inference request with one 2-D input."""
    return {"inputs": [{"name": name, "shape": [len(rows), len(rows[0])], "datatype": datatype, "data": [v for r in rows for v in r]}]}


_SLOW_MODEL = '''"""A custom MLServer runtime for tests: echoes its input after sleeping.

Settings: `probe.json` next to this file ({"delay": s, "load_delay": s, "load_block": s,
"load_log": path, "load_gate": path}); the model's parameters.extra (same keys) override it; a
request parameter `delay` overrides both; the answer's parameters say the `delay` applied. A load
first blocks the server's event loop for `load_block` seconds (time.sleep: as a big joblib.load
in MLServer's sklearn runtime does), then takes `load_delay` seconds, then waits until the file
`load_gate` exists when set (a test holds the load in the server that way), and appends one line
to `load_log` when set (to count loads).
"""
import asyncio
import json
import os
import time

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, Parameters


class SlowModel(MLModel):
    async def load(self) -> bool:
        conf = {}
        uri = self.settings.parameters.uri if self.settings.parameters else None
        if uri:
            probe = os.path.join(uri if os.path.isdir(uri) else os.path.dirname(uri), "probe.json")
            if os.path.isfile(probe):
                with open(probe) as f:
                    conf.update(json.load(f))
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        conf.update({k: v for k, v in extra.items() if k in ("delay", "load_delay", "load_block", "load_log", "load_gate")})
        self.delay = float(conf.get("delay", 1.0))
        time.sleep(float(conf.get("load_block", 0.0)))
        await asyncio.sleep(float(conf.get("load_delay", 0.0)))
        gate = conf.get("load_gate")
        while gate and not os.path.exists(gate):
            await asyncio.sleep(0.01)
        load_log = conf.get("load_log")
        if load_log:
            with open(load_log, "a") as f:
                f.write(f"{self.name} {os.getpid()} {time.time()}\\n")
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        delay = self.delay
        if payload.parameters is not None and getattr(payload.parameters, "delay", None) is not None:
            delay = float(payload.parameters.delay)
        await asyncio.sleep(delay)
        data = NumpyCodec.decode_input(payload.inputs[0])
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            parameters=Parameters(delay=delay),  # the delay it applied (REST; gRPC drops floats)
            outputs=[NumpyCodec.encode_output("echo", data)],
        )
'''

SLOW_IMPLEMENTATION = "slow_model.SlowModel"


def write_slow_model(directory: Path, delay: float = 1.0, load_log: Path | None = None, load_delay: float = 0.0,
                     load_gate: Path | None = None, load_block: float = 0.0) -> Path:
    """A custom MLServer model dir (`runtime: mlserver`, implementation SLOW_IMPLEMENTATION)
    whose requests take `delay` seconds and whose load blocks the server's event loop for
    `load_block` seconds, then takes `load_delay` seconds and, with `load_gate`, lasts until that
    file exists (the test creates it to let the load finish); each load appends a line to
    `load_log` if given (count them with `count_loads`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "slow_model.py").write_text(_SLOW_MODEL)
    probe: dict[str, Any] = {"delay": delay, "load_delay": load_delay, "load_block": load_block}
    if load_log is not None:
        probe["load_log"] = str(load_log)
    if load_gate is not None:
        probe["load_gate"] = str(load_gate)
    (directory / "probe.json").write_text(json.dumps(probe))
    return directory


def count_loads(load_log: Path, name: str | None = None) -> int:
    """Loads recorded by slow models in `load_log` (of model `name`, or all)."""
    try:
        lines = Path(load_log).read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for ln in lines if name is None or ln.split(" ", 1)[0] == name)


from agent.demo import TRITON_PYTHON_CONFIG as _TRITON_CONFIG  # one config.pbtxt template

_TRITON_MODEL = '''"""Triton python-backend test model: OUTPUT0 = INPUT0 * {factor!r}.

The backend stub runs the system Python, which ignores PYTHONPATH: put the Triton venv's
site-packages (numpy) on sys.path here, from the adapter's MODELSHELF_TRITON_SITE_PACKAGES or
the path known when this file was written.
"""
import os
import sys

for _p in (os.environ.get("MODELSHELF_TRITON_SITE_PACKAGES"), {site_packages!r}):
    if _p and _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
{extra}

class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            y = (x * {factor!r}).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", y)]))
        return responses
'''


def write_triton_model(directory: Path, name: str = "double", factor: float = 2.0, site_packages: Path | None = None, version: int = 1) -> Path:
    """A Triton python-backend model dir: `config.pbtxt` (served name `name`) + `<version>/model.py`."""
    directory = Path(directory)
    (directory / str(version)).mkdir(parents=True, exist_ok=True)
    (directory / "config.pbtxt").write_text(_TRITON_CONFIG.format(name=name))
    sp = str(site_packages) if site_packages else None
    (directory / str(version) / "model.py").write_text(_TRITON_MODEL.format(factor=float(factor), site_packages=sp, extra=""))
    return directory


def write_triton_broken_model(directory: Path, name: str = "broken") -> Path:
    """A Triton python-backend model whose model.py raises on import."""
    directory = write_triton_model(directory, name=name)
    path = directory / "1" / "model.py"
    path.write_text(path.read_text() + '\nraise RuntimeError("model file is broken on purpose")\n')
    return directory


def triton_v2_request(values: list[float]) -> dict[str, Any]:
    return {"inputs": [{"name": "INPUT0", "shape": [len(values)], "datatype": "FP32", "data": list(values)}]}


__all__ = [
    "SKLEARN_KINDS",
    "SLOW_IMPLEMENTATION",
    "count_loads",
    "sample_rows",
    "sklearn_predictions",
    "triton_v2_request",
    "v2_request",
    "write_broken_model",
    "write_slow_model",
    "write_sklearn_model",
    "write_triton_broken_model",
    "write_triton_model",
]
