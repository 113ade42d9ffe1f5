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


def prepare(root: Path) -> tuple[Path, Path, Path]:
    store, config, cache = root / "store", root / "config", root / "cache"
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
    store, config, cache = prepare(args.root)
    if args.command == "prepare":
        return 0
    base = f"http://127.0.0.1:{args.port}"
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
                     "--server", args.server])


if __name__ == "__main__":
    sys.exit(main())
