"""`make run`: the agent on its embedded default, with nothing to prepare.

Writes a few small sklearn models into a local model store (./demo/store), an example model
config (./demo/config/models.yaml), and starts `modelshelf run` with an embedded MLServer on
127.0.0.1. Edit the config while it runs: models appear and disappear within moments.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

DEMO_MODELS = {
    "iris-logreg": ("logreg", 0),
    "iris-tree": ("tree", 1),
    "iris-forest": ("forest", 2),
}


def write_model(dest: Path, kind: str, seed: int) -> None:
    """A small 4-feature, 3-class classifier saved as dest/model.joblib (no downloads)."""
    import joblib
    import numpy as np
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeClassifier

    rng = np.random.default_rng(seed)
    centers = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]])
    X = np.concatenate([c + 0.3 * rng.standard_normal((50, 4)) for c in centers])
    y = np.repeat([0, 1, 2], 50)
    model = {
        "logreg": lambda: LogisticRegression(max_iter=500),
        "tree": lambda: DecisionTreeClassifier(random_state=seed),
        "forest": lambda: RandomForestClassifier(n_estimators=10, random_state=seed),
    }[kind]()
    model.fit(X, y)
    dest.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, dest / "model.joblib")


TRITON_PYTHON_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""
_TRITON_MODEL = '''"""A Triton python-backend demo model: OUTPUT0 = INPUT0 * {factor}."""
import os
import sys

# the backend stub runs the system Python: numpy comes from the Triton venv the agent names
_site = os.environ.get("MODELSHELF_TRITON_SITE_PACKAGES")
if _site and _site not in sys.path:
    sys.path.insert(0, _site)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", (x * {factor}).astype(np.float32))]))
        return out
'''


def write_triton_model(dest: Path, factor: float) -> None:
    """A native Triton model dir (python backend) that multiplies its input by `factor`."""
    (dest / "1").mkdir(parents=True, exist_ok=True)
    (dest / "config.pbtxt").write_text(TRITON_PYTHON_CONFIG.format(name=dest.name))
    (dest / "1" / "model.py").write_text(_TRITON_MODEL.format(factor=float(factor)))


def _triton_config(store: Path) -> str:
    return textwrap.dedent(f"""\
        # modelshelf model config (Triton). Edit and save: the agent applies it within moments.
        models:
          - name: double
            uri: {(store / 'triton-double').resolve()}
            runtime: triton
          - name: triple
            uri: {(store / 'triton-triple').resolve()}
            runtime: triton
            preload: false      # loaded on its first request
        """)


def prepare(root: Path, server: str = "mlserver") -> tuple[Path, Path, Path]:
    store, config, cache = root / "store", root / "config", root / "cache"
    if server == "triton":
        for name, factor in (("triton-double", 2), ("triton-triple", 3)):
            if not (store / name / "config.pbtxt").exists():
                write_triton_model(store / name, factor)
        config = root / "config-triton"
        config.mkdir(parents=True, exist_ok=True)
        if not (config / "models.yaml").exists():
            (config / "models.yaml").write_text(_triton_config(store))
        return store, config, cache
    for name, (kind, seed) in DEMO_MODELS.items():
        if not (store / name / "model.joblib").exists():
            write_model(store / name, kind, seed)
    config.mkdir(parents=True, exist_ok=True)
    models_yaml = config / "models.yaml"
    if not models_yaml.exists():
        models_yaml.write_text(textwrap.dedent(f"""\
            # modelshelf model config. Edit and save: the agent applies it within moments.
            # Each model: name, uri (s3://, gs://, http(s)://, pvc://, file:// or a path),
            # runtime (sklearn, xgboost, lightgbm, mlserver, triton...), optional memory,
            # pinned, preload (false = load on the first request).
            models:
              - name: iris-logreg
                uri: {(store / 'iris-logreg').resolve()}
                runtime: sklearn
              - name: iris-tree
                uri: {(store / 'iris-tree').resolve()}
                runtime: sklearn
                preload: false      # loaded on its first request
            # - name: iris-forest
            #   uri: {(store / 'iris-forest').resolve()}
            #   runtime: sklearn
            """))
    return store, config, cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.demo", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "prepare"])
    parser.add_argument("--root", type=Path, default=Path("demo"))
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--server", choices=["mlserver", "triton"], default="mlserver")
    args = parser.parse_args(argv)
    store, config, cache = prepare(args.root, args.server)
    if args.command == "prepare":
        return 0
    base = f"http://127.0.0.1:{args.port}"
    if args.server == "triton":
        print(textwrap.dedent(f"""
            modelshelf demo (Triton)
              model config: {config / 'models.yaml'}   <- edit me
              status page : {base}/
              infer (V2)  : curl -s {base}/v2/models/double/infer -H 'content-type: application/json' \\
                              -d '{{"inputs":[{{"name":"INPUT0","shape":[3],"datatype":"FP32","data":[1,2,3]}}]}}'
            Ctrl-C stops the agent and its Triton.
            """), flush=True)
    else:
        print(textwrap.dedent(f"""
        modelshelf demo
          model store : {store}
          model config: {config / 'models.yaml'}   <- edit me (uncomment iris-forest, save)
          cache       : {cache}
          status page : {base}/
          status JSON : curl -s {base}/status
          metrics     : curl -s {base}/metrics
          infer (V2)  : curl -s {base}/v2/models/iris-logreg/infer -H 'content-type: application/json' \\
                          -d '{{"inputs":[{{"name":"x","shape":[1,4],"datatype":"FP64","data":[5.1,3.5,1.4,0.2]}}]}}'
          predict (V1): curl -s {base}/v1/models/iris-tree:predict -d '{{"instances":[[6.7,3.0,5.2,2.3]]}}'
        Ctrl-C stops the agent and its MLServer.
        """), flush=True)
    from agent.cli import main as cli_main

    return cli_main(["run", "--config-dir", str(config), "--cache-dir", str(cache), "--port", str(args.port),
                     "--management-port", str(args.port), "--server", args.server])  # one port: the URLs above


if __name__ == "__main__":
    sys.exit(main())
