"""The example model ConfigMaps parse with the agent's own loader, and each pod's storage
credentials resolve, with the puller's own resolver, to the store its Secret describes.

The Secrets are materialized the way the kubelet mounts them (one file per key under the
mount path, here rebased under tmp_path) and exposed the way the container sees them (envFrom,
env, S3CFG, --storage-config-dir); no store is contacted: resolving is local.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import CONFIG_FILES, load_config_dir, parse_config
from puller.credentials import resolve_s3
from puller.sources.base import PullOptions
from puller.uri import parse_uri
from tests.deploy.manifests import agent_invocations, by_kind, find, flag_value, literal_env, mount_at
from tests.support.configmap import ConfigMapDir

MODEL_CONFIGMAPS = [d for d in by_kind("ConfigMap") if d.obj["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "model-config"]


def _secret_data(name: str) -> dict[str, str]:
    doc = find("Secret", name)
    assert doc is not None, f"Secret {name} is not in deploy/k8s"
    assert "data" not in doc.obj, "examples use stringData (no base64 to hide placeholders in)"
    return {k: str(v) for k, v in doc.obj["stringData"].items()}


def test_there_are_native_and_kserve_examples():
    files = {k for d in MODEL_CONFIGMAPS for k in d.obj["data"]}
    assert {"models.yaml", "models.json"} <= files
    assert len(MODEL_CONFIGMAPS) >= 3


@pytest.mark.parametrize("doc", MODEL_CONFIGMAPS, ids=lambda d: d.name)
def test_configmap_parses_with_the_agent_loader(doc):
    data = doc.obj["data"]
    present = [k for k in data if k in CONFIG_FILES]
    assert present == list(data), f"{doc.label}: keys other than {CONFIG_FILES}: {set(data) - set(present)}"
    assert len(present) == 1, f"{doc.label}: the agent reads only the first of {CONFIG_FILES}; keep one per ConfigMap"
    filename = present[0]
    result = parse_config(data[filename], filename)
    assert result.errors == (), f"{doc.label}: {[e.reason for e in result.errors]}"
    assert len(result.models) >= 2
    if filename == "models.json" and json.loads(data[filename])[0].get("modelName"):
        names = [e["modelName"] for e in json.loads(data[filename])]
        assert sorted(result.models) == sorted(names), "every KServe entry is accepted as it is"


@pytest.mark.parametrize("doc", MODEL_CONFIGMAPS, ids=lambda d: d.name)
def test_configmap_mounted_as_a_directory_loads(doc, tmp_path):
    """What the agent sees in the pod: the ConfigMap as a kubelet-style directory (..data link)."""
    cm = ConfigMapDir(tmp_path / "config")
    cm.write(doc.obj["data"])
    result = load_config_dir(cm.root)
    (filename, text), = doc.obj["data"].items()
    assert result.file is not None and result.errors == ()
    assert result.models == parse_config(text, filename).models


def test_loader_rejects_a_broken_example():
    """Negative control: the same loader refuses a misspelt key and a bad quantity."""
    bad = "models:\n  - name: iris\n    uri: s3://models/iris/\n    memroy: 64Mi\n  - name: x\n    uri: s3://m/x\n    memory: lots\n"
    result = parse_config(bad, "models.yaml")
    assert len(result.errors) == 2 and not result.models


def _materialize_secret(name: str, root: Path, items: list | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    data = _secret_data(name)
    if items:
        data = {i["path"]: data[i["key"]] for i in items}
    for key, value in data.items():
        (root / key).write_text(value)


def _pod_storage(pod, container, argv, tmp_path) -> tuple[dict[str, str], PullOptions]:
    """The environment and pull options the container's puller runs with."""
    env: dict[str, str] = {}
    for ef in container.get("envFrom", []):
        if "secretRef" in ef:
            env.update(_secret_data(ef["secretRef"]["name"]))
    env.update(literal_env(container))

    def rebase(path: str) -> Path:
        m = next(m for m in container["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/"))
        vol = pod.volume(m["name"])
        target = tmp_path / m["mountPath"].lstrip("/")
        if "secret" in vol and not target.exists():
            _materialize_secret(vol["secret"]["secretName"], target, vol["secret"].get("items"))
        return tmp_path / path.lstrip("/")

    storage_dir = flag_value(argv, "--storage-config-dir") or env.get("MODELSHELF_STORAGE_CONFIG_DIR")
    s3cfg = env.get("S3CFG")
    if s3cfg:
        env["S3CFG"] = str(rebase(s3cfg))
    options = PullOptions(
        storage_config_dir=rebase(storage_dir) if storage_dir else None,
        s3cfg=Path(env["S3CFG"]) if s3cfg else None,
    )
    return env, options


def _models_of(pod, container, argv):
    if argv[0] == "pull":
        return [(argv[1], flag_value(argv, "--storage-key"))]
    m = mount_at(container, flag_value(argv, "--config-dir"))
    cm = find("ConfigMap", pod.volume(m["name"])["configMap"]["name"])
    (filename, text), = cm.obj["data"].items()
    return [(spec.source, spec.storage_key) for spec in parse_config(text, filename).models.values()]


INVOCATIONS = [i for i in agent_invocations() if i[2][0] in ("run", "prefetch", "pull")]  # the ones that read models


@pytest.mark.parametrize("pod, container, argv", INVOCATIONS, ids=[f"{p.doc.label}/{c['name']}" for p, c, _ in INVOCATIONS])
def test_credentials_resolve_to_the_secret_store(pod, container, argv, tmp_path):
    env, options = _pod_storage(pod, container, argv, tmp_path)
    checked = 0
    for uri, storage_key in _models_of(pod, container, argv):
        parsed = parse_uri(uri, options)
        if parsed.scheme not in ("s3", "gs", "rclone"):
            continue
        options.storage_key = storage_key
        s = resolve_s3(parsed, options, env)
        where = f"{pod.doc.label}/{container['name']} {uri}"
        if storage_key:
            cfg = json.loads((options.storage_config_dir / storage_key).read_text())
            assert s.source == f"storage-config:{storage_key}", where
            assert s.endpoint_url == cfg.get("endpoint_url") and s.region == cfg["region"], where
            assert s.access_key_id and not s.anonymous, where
            assert cfg.get("bucket") in (None, parsed.bucket), f"{where}: storage key bound to bucket {cfg['bucket']}"
        elif "S3CFG" in env:
            assert s.source.startswith("s3cfg:"), where
            assert s.endpoint_url == "http://minio.storage.svc.cluster.local:9000" and s.access_key_id, where
        else:
            assert s.source == "aws-default-chain", where
            assert s.endpoint_url == env["AWS_ENDPOINT_URL"] and s.region == env["AWS_DEFAULT_REGION"], where
        checked += 1
    assert checked, f"{pod.doc.label}: no storage URI to check"


def test_storage_config_secret_entries_are_complete():
    for key, text in _secret_data("modelshelf-storage-config").items():
        cfg = json.loads(text)
        assert cfg["type"] == "s3"
        assert {"access_key_id", "secret_access_key", "region"} <= set(cfg), key


def test_placeholders_only():
    """No real-looking credentials in the examples: every secret value is REPLACE_ME."""
    for doc in by_kind("Secret"):
        for key, value in doc.obj["stringData"].items():
            if "SECRET" in key.upper() or "ACCESS_KEY" in key.upper():
                assert value == "REPLACE_ME", f"{doc.label}: {key}"
            if key == ".s3cfg":
                for line in value.splitlines():
                    if line.split("=")[0].strip() in ("access_key", "secret_key"):
                        assert line.split("=", 1)[1].strip() == "REPLACE_ME", doc.label
            if key not in (".s3cfg",) and value.lstrip().startswith("{"):
                cfg = json.loads(value)
                assert cfg["access_key_id"] == cfg["secret_access_key"] == "REPLACE_ME", doc.label
