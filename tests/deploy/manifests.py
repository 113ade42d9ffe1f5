"""Reading deploy/: the Kubernetes manifests, the pods in them, and the agent invocations.

Plain YAML, no templating: what is in the files is what `kubectl apply -f` sends.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"

# Kinds that live in a CRD: no bundled schema in kubernetes-validate, checked structurally instead.
CRD_GROUPS = {"monitoring.coreos.com", "networking.istio.io", "gateway.networking.k8s.io", "inference.networking.k8s.io", "gateway.envoyproxy.io"}

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}

AGENT_IMAGE_REPO = "registry.example.com/modelshelf/agent"


@dataclass(frozen=True)
class Doc:
    path: Path
    index: int  # position in a multi-document file
    obj: dict

    @property
    def kind(self) -> str:
        return self.obj["kind"]

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]

    @property
    def group(self) -> str:
        api = self.obj["apiVersion"]
        return api.split("/")[0] if "/" in api else ""

    @property
    def is_crd(self) -> bool:
        return self.group in CRD_GROUPS

    @property
    def label(self) -> str:
        return f"{self.path.relative_to(REPO)}#{self.index}:{self.kind}/{self.name}"


@lru_cache(maxsize=1)
def load_docs() -> tuple[Doc, ...]:
    """Every object of every deploy/k8s/**/*.yaml (and .yml), in path order."""
    docs: list[Doc] = []
    paths = sorted(list(K8S.rglob("*.yaml")) + list(K8S.rglob("*.yml")))
    for path in paths:
        for i, obj in enumerate(yaml.safe_load_all(path.read_text())):
            if obj:
                docs.append(Doc(path, i, obj))
    return tuple(docs)


def by_kind(kind: str) -> list[Doc]:
    return [d for d in load_docs() if d.kind == kind]


def find(kind: str, name: str) -> Doc | None:
    for d in load_docs():
        if d.kind == kind and d.name == name:
            return d
    return None


# ------------------------------------------------------------------ pods and containers

@dataclass(frozen=True)
class Pod:
    doc: Doc
    spec: dict  # the PodSpec
    labels: dict

    @property
    def containers(self) -> list[dict]:
        return list(self.spec.get("initContainers", [])) + list(self.spec.get("containers", []))

    def volume(self, name: str) -> dict:
        for v in self.spec.get("volumes", []):
            if v["name"] == name:
                return v
        if self.doc.kind == "StatefulSet":
            for t in self.doc.obj["spec"].get("volumeClaimTemplates", []):
                if t["metadata"]["name"] == name:
                    return {"name": name, "persistentVolumeClaim": {"claimName": f"<template {name}>"}}
        raise KeyError(f"{self.doc.label}: no volume named {name!r}")

    def pod_names(self) -> list[str]:
        """Plausible names of this workload's pods (what POD_NAME holds at run time)."""
        kind, name, spec = self.doc.kind, self.doc.name, self.doc.obj.get("spec", {})
        if kind == "StatefulSet":
            return [f"{name}-{i}" for i in range(spec.get("replicas", 1))]
        if kind == "Deployment":
            return [f"{name}-7d9c8b6f5d-x2x9q"]
        if kind == "DaemonSet":
            return [f"{name}-x2x9q"]
        if kind == "CronJob":
            return [f"{name}-29012345-x2x9q"]
        if kind == "Job":
            return [f"{name}-x2x9q"]
        return [name]


def pods() -> list[Pod]:
    out: list[Pod] = []
    for d in load_docs():
        if d.kind not in WORKLOAD_KINDS:
            continue
        if d.kind == "Pod":
            template = {"metadata": d.obj["metadata"], "spec": d.obj["spec"]}
        elif d.kind == "CronJob":
            template = d.obj["spec"]["jobTemplate"]["spec"]["template"]
        else:
            template = d.obj["spec"]["template"]
        out.append(Pod(d, template["spec"], template.get("metadata", {}).get("labels", {})))
    return out


def mount_at(container: dict, path: str) -> dict | None:
    """The volumeMount of `container` whose mountPath is `path` (exactly)."""
    for m in container.get("volumeMounts", []):
        if m["mountPath"].rstrip("/") == str(path).rstrip("/"):
            return m
    return None


def mount_covering(container: dict, path: str) -> dict | None:
    """The deepest volumeMount of `container` that contains `path`."""
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if str(path) == mp or str(path).startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                best = m
    return best


def literal_env(container: dict) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}


# ------------------------------------------------------------------ the agent's command lines

def dockerfile_default_cmd(stage: str = "agent") -> list[str]:
    """The CMD of a stage of deploy/Dockerfile (exec form), following FROM <stage> inheritance."""
    from tests.deploy.dockerfile import parse_dockerfile

    stages = parse_dockerfile(DOCKERFILE.read_text())
    return stages.resolve(stage, "CMD")


def is_agent_image(image: str) -> bool:
    return image.split(":")[0] == AGENT_IMAGE_REPO


def modelshelf_argv(container: dict) -> list[str] | None:
    """The argv after `modelshelf` that `container` runs, or None if it does not run the agent.

    The agent image's ENTRYPOINT is ["modelshelf"]: `args` alone are its arguments (the image's
    CMD when absent). A `command` naming modelshelf (any image) works too. A shell command line
    that runs modelshelf is split the way sh would for simple words.
    """
    command = container.get("command")
    args = [str(a) for a in container.get("args", [])]
    if command:
        command = [str(c) for c in command]
        if Path(command[0]).name == "modelshelf":
            return command[1:] + args
        if Path(command[0]).name in ("sh", "bash") and "-c" in command:
            line = (command + args)[command.index("-c") + 1]
            words = shlex.split(line)
            if words and Path(words[0]).name == "modelshelf":
                return words[1:]
        return None
    if is_agent_image(container["image"]):
        return args or dockerfile_default_cmd()
    return None


def agent_invocations() -> Iterator[tuple[Pod, dict, list[str]]]:
    for pod in pods():
        for c in pod.containers:
            argv = modelshelf_argv(c)
            if argv is not None:
                yield pod, c, argv


def flag_value(argv: list[str], flag: str) -> str | None:
    """Value of `--flag` in argv (`--flag=v` or `--flag v`); the last one wins, like argparse."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


_QUANTITY = re.compile(
    r"^[+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def is_k8s_quantity(value: Any) -> bool:
    """Kubernetes' resource.Quantity grammar (what the API server accepts for sizes and CPUs)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value >= 0
    return bool(_QUANTITY.match(str(value)))
