"""deploy/README.md stays true to the files and the code it describes."""
from __future__ import annotations

import re

from agent.reconciler import shard_of
from tests.deploy.manifests import DEPLOY, K8S, REPO

README = (DEPLOY / "README.md").read_text()


def test_every_topology_directory_is_documented():
    for d in sorted(p for p in K8S.rglob("*") if p.is_dir()):
        rel = d.relative_to(K8S).as_posix()
        assert rel.split("/")[-1] + "/" in README, f"deploy/k8s/{rel}/ is not described in deploy/README.md"


def test_paths_named_in_the_readme_exist():
    paths = set(re.findall(r"(?<![\w/])deploy/[A-Za-z0-9_./-]+[A-Za-z0-9_]", README))
    paths |= {"tests/" + p for p in re.findall(r"tests/(deploy/[A-Za-z0-9_./-]+[A-Za-z0-9_])", README)}
    assert len(paths) > 10
    for p in paths:
        assert (REPO / p).exists(), f"deploy/README.md names {p}, which does not exist"


def test_documented_shard_function_is_the_agents():
    """Clients of the sharded StatefulSet route with the README's function: it must pick the
    replica whose agent actually serves the model."""
    block = re.search(r"```python\n(.*?def replica_for.*?)```", README, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "deploy/README.md", "exec"), scope)  # noqa: S102 - our own doc snippet
    names = ["iris", "churn-xgb", "fraud-lgbm", "sentiment", "resnet50", "bert-base"] + [f"model-{i}" for i in range(200)]
    for shards in (1, 2, 3, 4, 7, 16):
        for name in names:
            assert scope["replica_for"](name, shards) == shard_of(name, shards), (name, shards)


def test_documented_image_names_match_the_manifests():
    images = set(re.findall(r"registry\.example\.com/modelshelf/agent:[\w.-]+", README))
    manifests = set()
    for f in K8S.rglob("*.yaml"):
        manifests |= set(re.findall(r"registry\.example\.com/modelshelf/agent:[\w.-]+", f.read_text()))
    assert manifests <= images, f"images in manifests but not in the README: {manifests - images}"
