"""Every manifest in deploy/k8s validates offline against the Kubernetes schemas.

Built-in kinds: `kubernetes-validate --strict` (bundled OpenAPI-derived JSON schemas; strict
rejects any field the API does not know, so a typo such as `readOnlyRootFileSystem` fails).
CRD kinds (ServiceMonitor, Istio DestinationRule) have no bundled schema: test_crds.py checks
them structurally, and here we make sure nothing else slips through as "schema not found".
"""
from __future__ import annotations

import copy
import subprocess
import sys

import kubernetes_validate
import pytest

from tests.deploy.manifests import K8S, REPO, is_k8s_quantity, load_docs, pods

K8S_VERSION = "1.30.0"  # a version kubernetes-validate bundles; the oldest we support

DOCS = load_docs()
BUILTIN = [d for d in DOCS if not d.is_crd]


def test_manifests_exist_for_every_topology():
    dirs = {p.name for p in K8S.iterdir() if p.is_dir()}
    for wanted in ("00-embedded", "01-mlserver-sidecar", "02-triton-sidecar", "03-shared-cache",
                   "04-node-local-cache", "05-prefetch-cronjob", "07-scale-out", "08-inference-gateway", "credentials",
                   "models", "monitoring"):
        assert wanted in dirs, f"deploy/k8s/{wanted}/ is missing"
    assert len(BUILTIN) >= 25


@pytest.mark.parametrize("doc", BUILTIN, ids=lambda d: d.label)
def test_builtin_kind_validates_strict(doc):
    try:
        kubernetes_validate.validate(doc.obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        pytest.fail(f"{doc.label}: {path}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        pytest.fail(f"{doc.label}: {e.message} (a CRD kind must be listed in CRD_GROUPS and checked in test_crds.py)")


def test_kubernetes_validate_cli_over_all_files():
    """The command an operator would run, over every file: only the CRD objects are unknown."""
    files = sorted(str(p.relative_to(REPO)) for p in K8S.rglob("*.yaml"))
    r = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", K8S_VERSION, *files],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    passed = [line for line in lines if line.startswith("INFO") and " passed " in line]
    warned = [line for line in lines if line.startswith("WARN")]
    assert len(passed) == len(BUILTIN), r.stdout
    crd_kinds = sorted({d.kind for d in DOCS if d.is_crd})
    assert len(warned) == len([d for d in DOCS if d.is_crd]), r.stdout
    for line in warned:
        assert "Couldn't find schema for kind" in line and any(f"kind {k} " in line for k in crd_kinds), line


def test_strict_validation_catches_an_unknown_field():
    """Negative control: the validator is really strict about what the manifests rely on."""
    deployment = next(d for d in BUILTIN if d.kind == "Deployment")
    bad = copy.deepcopy(deployment.obj)
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def _quantities(obj, path=""):
    """(path, value) of every size/CPU quantity in a manifest object."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{path}.{k}" if path else k
            if k in ("requests", "limits") and isinstance(v, dict):
                for rk, rv in v.items():
                    yield f"{p}.{rk}", rv
            elif k == "sizeLimit":
                yield p, v
            else:
                yield from _quantities(v, p)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _quantities(v, f"{path}[{i}]")


@pytest.mark.parametrize("doc", [d for d in BUILTIN if d.kind in ("Deployment", "StatefulSet", "DaemonSet", "CronJob", "PersistentVolumeClaim")], ids=lambda d: d.label)
def test_quantities_parse(doc):
    """The schemas accept any string for a quantity (int-or-string); the API server does not."""
    found = list(_quantities(doc.obj))
    assert found, f"{doc.label}: no resource quantities at all"
    bad = [(p, v) for p, v in found if not is_k8s_quantity(v)]
    assert not bad, f"{doc.label}: not Kubernetes quantities: {bad}"


def test_quantity_check_rejects_garbage():
    assert is_k8s_quantity("4Gi") and is_k8s_quantity("250m") and is_k8s_quantity(1) and is_k8s_quantity("1e3")
    assert not is_k8s_quantity("4Gix") and not is_k8s_quantity("4 Gi") and not is_k8s_quantity("4GB")


@pytest.mark.parametrize("pod", pods(), ids=lambda p: p.doc.label)
def test_pod_security(pod):
    """Restricted-style pods: non-root, read-only root FS, no privilege escalation, no caps.

    One documented exception: the node-local cache's `prepare-cache-dir` init container runs as
    root with CAP_CHOWN only, because a hostPath directory is not chowned by fsGroup.
    """
    psc = pod.spec.get("securityContext", {})
    assert psc.get("runAsNonRoot") is True, f"{pod.doc.label}: pod securityContext.runAsNonRoot"
    assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", pod.doc.label
    uid = psc.get("runAsUser")
    assert isinstance(uid, int) and uid > 0, f"{pod.doc.label}: pod runAsUser must be a numeric non-root uid"
    for c in pod.containers:
        sc = c.get("securityContext", {})
        where = f"{pod.doc.label} container {c['name']}"
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        if c["name"] == "prepare-cache-dir":
            assert sc.get("capabilities", {}).get("add") == ["CHOWN"], where
            assert pod.spec["volumes"] and any("hostPath" in v for v in pod.spec["volumes"]), where
        else:
            assert sc.get("runAsUser", uid) != 0 and sc.get("runAsNonRoot", True) is True, where
            assert not sc.get("capabilities", {}).get("add"), where
        res = c.get("resources", {})
        assert res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory"), f"{where}: memory request and limit"
    assert pod.spec.get("automountServiceAccountToken") is False, f"{pod.doc.label}: the agent needs no API token"


@pytest.mark.parametrize("pod", pods(), ids=lambda p: p.doc.label)
def test_read_only_root_has_writable_scratch(pod):
    """With a read-only root FS, every process that writes temp files gets a writable /tmp, and
    a container's workingDir (MLServer writes .envs/.metrics there) is a writable volume."""
    for c in pod.containers:
        if c["image"].startswith(("registry.k8s.io/pause", "busybox")):
            continue  # write nothing
        where = f"{pod.doc.label} container {c['name']}"
        tmp = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"), None)
        assert tmp is not None and not tmp.get("readOnly"), f"{where}: no writable /tmp"
        if "workingDir" in c:
            wd = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == c["workingDir"]), None)
            assert wd is not None and not wd.get("readOnly"), f"{where}: workingDir {c['workingDir']} is not a writable volume"
