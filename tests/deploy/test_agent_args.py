"""The agent's command lines in the manifests parse with the real CLI, and the pods are wired
the way those command lines assume (mounts, ports, the sidecar server, probes, Services).

Manifests and code cannot drift: every `modelshelf ...` a container runs is parsed by
`agent.cli.build_parser()` and turned into Settings by `agent.cli.settings_from_args`, under
the container's own MODELSHELF_* environment and a POD_NAME like the one Kubernetes sets.
"""
from __future__ import annotations

import argparse
from urllib.parse import urlsplit

import pytest

from agent.cli import build_parser, settings_from_args
from agent.quantity import parse_quantity
from tests.deploy.manifests import (
    agent_invocations,
    by_kind,
    find,
    flag_value,
    is_agent_image,
    literal_env,
    mount_at,
    mount_covering,
    pods,
)

INVOCATIONS = list(agent_invocations())
IDS = [f"{p.doc.label}/{c['name']}" for p, c, _ in INVOCATIONS]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public accessor for subparsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("modelshelf's parser has no subcommands")


def _parse(argv: list[str], capsys) -> argparse.Namespace:
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`modelshelf {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")


def test_every_topology_runs_the_agent():
    kinds = {(p.doc.kind, argv[0]) for p, _, argv in INVOCATIONS}
    assert ("Deployment", "run") in kinds and ("StatefulSet", "run") in kinds
    assert ("CronJob", "prefetch") in kinds and ("DaemonSet", "prefetch") in kinds
    assert ("Deployment", "pull") in kinds
    assert len(INVOCATIONS) >= 10


@pytest.mark.parametrize("pod, container, argv", INVOCATIONS, ids=IDS)
def test_args_parse_with_the_real_cli(pod, container, argv, agent_env, capsys):
    env = literal_env(container)
    for pod_name in pod.pod_names():
        agent_env({**{k: v for k, v in env.items() if k.startswith("MODELSHELF_")}, "POD_NAME": pod_name})
        args = _parse(argv, capsys)
        if args.command in ("run", "prefetch"):
            try:
                settings = settings_from_args(args)
            except SystemExit as e:
                pytest.fail(f"{pod.doc.label} as pod {pod_name}: modelshelf {args.command}: {e}")
            assert settings.config_dir.is_absolute() and settings.cache_dir.is_absolute()
        if args.command == "run":
            assert args.host == "0.0.0.0", "in a pod the agent must listen beyond loopback (probes, Service)"
            for flag in ("host_memory", "gpu_memory"):
                value = getattr(args, flag)
                if value is not None and not str(value).endswith("%"):
                    parse_quantity(value)


@pytest.mark.parametrize("pod, container, argv", INVOCATIONS, ids=IDS)
def test_modelshelf_env_vars_name_real_flags(pod, container, argv):
    """MODELSHELF_<FLAG> only works if --<flag> exists on that subcommand: a typo is ignored
    silently at run time, so it fails here."""
    sub = _subcommands(build_parser())[argv[0]]
    options = {o for a in sub._actions for o in a.option_strings}
    for e in container.get("env", []):
        name = e["name"]
        if name.startswith("MODELSHELF_"):
            flag = "--" + name[len("MODELSHELF_"):].lower().replace("_", "-")
            assert flag in options, f"{pod.doc.label}/{container['name']}: {name} maps to {flag}, which `modelshelf {argv[0]}` does not have"


def test_env_check_rejects_a_made_up_variable():
    """Negative control for the mapping used above."""
    sub = _subcommands(build_parser())["run"]
    options = {o for a in sub._actions for o in a.option_strings}
    assert "--cache-dir" in options and "--shard-index" in options
    assert "--cache-directory" not in options


def test_cli_rejects_a_made_up_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--config-dir=/c", "--cache-dir=/d", "--cache-size=1Gi"])
    assert "unrecognized arguments" in capsys.readouterr().err


# ------------------------------------------------------------------ how the pods are wired

@pytest.mark.parametrize("pod, container, argv", INVOCATIONS, ids=IDS)
def test_paths_are_mounted(pod, container, argv):
    """--config-dir is a mounted model ConfigMap, --cache-dir a writable volume, and every
    referenced Secret (env, envFrom, --storage-config-dir, S3CFG) exists with those keys."""
    where = f"{pod.doc.label}/{container['name']}"
    config_dir = flag_value(argv, "--config-dir")
    cache_dir = flag_value(argv, "--cache-dir")
    if argv[0] in ("run", "prefetch"):
        assert config_dir and cache_dir, f"{where}: --config-dir and --cache-dir are required"
        m = mount_at(container, config_dir)
        assert m, f"{where}: nothing mounted at --config-dir {config_dir}"
        vol = pod.volume(m["name"])
        assert "configMap" in vol, f"{where}: --config-dir is not a ConfigMap volume"
        cm = find("ConfigMap", vol["configMap"]["name"])
        assert cm is not None, f"{where}: ConfigMap {vol['configMap']['name']} is not in deploy/k8s"
    if cache_dir:
        m = mount_at(container, cache_dir)
        assert m and not m.get("readOnly"), f"{where}: --cache-dir {cache_dir} must be a writable volume"
        vol = pod.volume(m["name"])
        assert "emptyDir" in vol or "persistentVolumeClaim" in vol or "hostPath" in vol, where
        if "persistentVolumeClaim" in vol and not vol["persistentVolumeClaim"]["claimName"].startswith("<template"):
            assert find("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]), f"{where}: PVC missing"
        budget = flag_value(argv, "--max-cache-bytes")
        size = vol.get("emptyDir", {}).get("sizeLimit")
        if "persistentVolumeClaim" in vol:
            claim = vol["persistentVolumeClaim"]["claimName"]
            pvc = find("PersistentVolumeClaim", claim)
            if pvc is None:  # a StatefulSet volumeClaimTemplate
                tmpl = next(t for t in pod.doc.obj["spec"]["volumeClaimTemplates"] if t["metadata"]["name"] == m["name"])
                size = tmpl["spec"]["resources"]["requests"]["storage"]
            else:
                size = pvc.obj["spec"]["resources"]["requests"]["storage"]
        if budget and size:
            assert parse_quantity(budget) < parse_quantity(size), f"{where}: --max-cache-bytes {budget} must stay below the volume's {size}"
    storage_dir = flag_value(argv, "--storage-config-dir")
    if storage_dir:
        m = mount_at(container, storage_dir)
        assert m, f"{where}: nothing mounted at --storage-config-dir"
        vol = pod.volume(m["name"])
        assert "secret" in vol and find("Secret", vol["secret"]["secretName"]), f"{where}: --storage-config-dir must be a Secret in deploy/k8s"
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            secret = find("Secret", ref["name"])
            assert secret and ref["key"] in secret.obj.get("stringData", {}) | secret.obj.get("data", {}), f"{where}: {ref}"
    for ef in container.get("envFrom", []):
        if "secretRef" in ef:
            assert find("Secret", ef["secretRef"]["name"]), f"{where}: Secret {ef['secretRef']['name']} missing"
    s3cfg = literal_env(container).get("S3CFG")
    if s3cfg:
        m = mount_covering(container, s3cfg)
        assert m, f"{where}: S3CFG={s3cfg} is not on a mounted volume"
        vol = pod.volume(m["name"])
        secret = find("Secret", vol["secret"]["secretName"])
        key = s3cfg[len(m["mountPath"].rstrip("/")) + 1:]
        assert secret and key in secret.obj.get("stringData", {}) | secret.obj.get("data", {}), f"{where}: {key} not in the Secret"


def test_each_credential_shape_is_used():
    """AWS env vars, an .s3cfg file and a storage-config dir: each shape wired into a workload."""
    shapes = set()
    for pod, container, argv in INVOCATIONS:
        if any(ef.get("secretRef", {}).get("name") == "modelshelf-s3-env" for ef in container.get("envFrom", [])):
            shapes.add("aws-env")
        if "S3CFG" in literal_env(container):
            shapes.add("s3cfg")
        if flag_value(argv, "--storage-config-dir"):
            shapes.add("storage-config")
    assert shapes == {"aws-env", "s3cfg", "storage-config"}
    env_secret = find("Secret", "modelshelf-s3-env").obj["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(env_secret)


def _server_container(pod, agent):
    others = [c for c in pod.spec["containers"] if c is not agent]
    assert len(others) == 1, f"{pod.doc.label}: sidecar mode wants exactly one server container beside the agent"
    return others[0]


def _server_facts(server: dict) -> tuple[str, int, str]:
    """(kind, HTTP port, repository path) of the server container, from its own command line."""
    cmd = [str(x) for x in server.get("command", []) + server.get("args", [])]
    env = literal_env(server)
    if cmd and cmd[0] == "mlserver":
        assert cmd[1] == "start", cmd
        assert env.get("MLSERVER_LOAD_MODELS_AT_STARTUP") == "false", "the agent decides what is loaded"
        assert env.get("MLSERVER_PARALLEL_WORKERS") == "0", "parallel workers crash with uvloop>=0.22"
        return "mlserver", int(env.get("MLSERVER_HTTP_PORT", 8080)), cmd[2]
    if cmd and cmd[0] == "tritonserver":
        assert flag_value(cmd, "--model-control-mode") == "explicit", "Triton must load only what the agent asks"
        return "triton", int(flag_value(cmd, "--http-port") or 8000), flag_value(cmd, "--model-repository")
    raise AssertionError(f"unknown server container {server['name']}: {cmd}")


SIDECARS = [(p, c, a) for p, c, a in INVOCATIONS if a[0] == "run" and flag_value(a, "--server-url")]


def _prestop_seconds(container: dict) -> float:
    """How long a container's preStop keeps it up, at most: `sleep N`, or `modelshelf drain
    --wait=N` (the fleet agents: it returns once the agent is quiet, N at most)."""
    command = [str(c) for c in container["lifecycle"]["preStop"]["exec"]["command"]]
    if command[0] == "sleep":
        return float(command[1])
    assert command[:2] == ["modelshelf", "drain"], f"{container['name']}: preStop {command}"
    return float(flag_value(command, "--wait") or 0)


@pytest.mark.parametrize("pod, agent, argv", SIDECARS, ids=[f"{p.doc.label}" for p, _, _ in SIDECARS])
def test_sidecar_server_matches_the_agent(pod, agent, argv):
    """--server, --server-url and --server-repository agree with the server container, and the
    cache is mounted at the same path in both (the entries the agent writes point into it)."""
    server = _server_container(pod, agent)
    kind, port, repo = _server_facts(server)
    assert flag_value(argv, "--server") == kind
    url = urlsplit(flag_value(argv, "--server-url"))
    assert url.hostname in ("127.0.0.1", "localhost") and url.port == port, f"agent talks to {url.geturl()}, {kind} listens on {port}"
    # gRPC clients reach the server through the agent's own gRPC port: it must know the server's
    grpc_port = int(literal_env(server).get("MLSERVER_GRPC_PORT", 8081)) if kind == "mlserver" \
        else int(flag_value([str(x) for x in server.get("command", []) + server.get("args", [])], "--grpc-port") or 8001)
    target = flag_value(argv, "--server-grpc-target")
    assert target == f"127.0.0.1:{grpc_port}", f"agent passes gRPC to {target}, {kind} listens for gRPC on {grpc_port}"
    agent_repo = flag_value(argv, "--server-repository")
    assert agent_repo, "sidecar mode needs --server-repository (the dir shared with the server)"
    am, sm = mount_at(agent, agent_repo), mount_at(server, repo)
    assert am and sm and am["name"] == sm["name"], f"agent's {agent_repo} and {kind}'s {repo} must be one volume"
    assert "emptyDir" in pod.volume(am["name"]) and not am.get("readOnly")
    assert agent_repo == repo, "absolute paths the agent writes must mean the same in both containers"
    cache = flag_value(argv, "--cache-dir")
    ac, sc = mount_at(agent, cache), mount_at(server, cache)
    assert sc and sc["name"] == ac["name"], f"{kind} must see the cache at {cache} too"
    assert server.get("ports") in (None, []), "the server stays on loopback: clients go through the agent"
    # on pod deletion the server must outlive the agent's drain, both within the grace period
    sleeps = [_prestop_seconds(c) for c in (agent, server)]
    grace = pod.spec.get("terminationGracePeriodSeconds", 30)
    assert sleeps[0] < sleeps[1] < grace, f"preStop sleeps agent={sleeps[0]}s server={sleeps[1]}s, grace {grace}s"


@pytest.mark.parametrize("pod, container, argv", [i for i in INVOCATIONS if i[2][0] == "run"], ids=[i for i, x in zip(IDS, INVOCATIONS) if x[2][0] == "run"])
def test_probes_and_service(pod, container, argv):
    port = int(flag_value(argv, "--port") or 8000)
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert ports.get("http") == port, f"container port 'http' must be the agent's --port {port}"
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = container.get(probe, {}).get("httpGet")
        assert get and get["path"] == path and get["port"] in ("http", port), f"{probe} must GET {path} on the agent's port"
    startup = container["startupProbe"]
    window = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert window >= 300, f"startupProbe allows {window}s: the agent serves HTTP only once its server is up"
    services = [s for s in by_kind("Service")
                if s.obj["spec"]["selector"].items() <= pod.labels.items()]
    assert services, f"{pod.doc.label}: no Service selects these pods"
    for s in services:
        assert any(p.get("targetPort") in ("http", port) for p in s.obj["spec"]["ports"]), s.label
    # management (/status, /metrics, page) on a port of its own, declared, scraped through the Service
    management = int(flag_value(argv, "--management-port") or 0)
    assert management and management != port, f"{pod.doc.label}: the agent must keep management off its public port"
    assert ports.get("management") == management, f"container port 'management' must be --management-port {management}"
    annotations = pod.doc.obj["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/port") == str(management) and annotations.get("prometheus.io/path") == "/metrics"
    for s in services:
        assert any(p.get("targetPort") in ("management", management) for p in s.obj["spec"]["ports"]), s.label
    # KServe V2 gRPC: declared and reachable through every Service of the pods
    grpc_port = int(flag_value(argv, "--grpc-port") or 8001)
    assert ports.get("grpc") == grpc_port, f"container port 'grpc' must be the agent's --grpc-port {grpc_port}"
    for s in services:
        assert any(p.get("targetPort") in ("grpc", grpc_port) for p in s.obj["spec"]["ports"]), f"{s.label}: no gRPC port"


def test_every_service_selects_a_workload():
    for s in by_kind("Service"):
        sel = s.obj["spec"]["selector"]
        assert any(sel.items() <= p.labels.items() for p in pods()), f"{s.label} selects no pod template"


def test_statefulset_shards_match_replicas():
    sets = by_kind("StatefulSet")
    assert sets
    for s in sets:
        pod = next(p for p in pods() if p.doc is s)
        agent = next(c for c in pod.spec["containers"] if is_agent_image(c["image"]))
        shards = int(flag_value(agent["args"], "--shards") or 1)
        assert shards == s.obj["spec"]["replicas"], f"{s.label}: --shards {shards} != replicas"
        assert flag_value(agent["args"], "--shard-index") == "auto"
        svc = find("Service", s.obj["spec"]["serviceName"])
        assert svc and svc.obj["spec"].get("clusterIP") == "None", "per-pod DNS needs a headless Service"


def test_shard_index_auto_needs_a_statefulset_name(agent_env, capsys):
    """Negative control: under a Deployment's pod name `--shard-index auto` is refused."""
    agent_env({"POD_NAME": "modelshelf-7d9c8b6f5d-x2x9q"})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--config-dir=/c", "--cache-dir=/d", "--shards=3", "--shard-index=auto"])
    assert "ordinal" in capsys.readouterr().err


def test_node_local_cache_is_the_prefilled_one():
    """Serving pods of topology 4 use the same host directory, on the same nodes, that the
    prefill DaemonSet fills."""
    ds = [p for p in pods() if p.doc.kind == "DaemonSet"]
    assert ds
    for d in ds:
        host = next(v["hostPath"]["path"] for v in d.spec["volumes"] if "hostPath" in v)
        users = [p for p in pods() if p.doc.kind == "Deployment" and any(v.get("hostPath", {}).get("path") == host for v in p.spec.get("volumes", []))]
        assert users, f"no Deployment uses {host}"
        for u in users:
            assert u.spec.get("nodeSelector") == d.spec.get("nodeSelector"), f"{u.doc.label} may land on nodes {d.doc.label} does not fill"


def test_agent_images_agree_with_the_project_version():
    """All agent images carry one tag, the project's version (bump both together)."""
    import tomllib

    from tests.deploy.manifests import REPO

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    tags = {c["image"].split(":")[1] for p in pods() for c in p.containers if is_agent_image(c["image"])}
    assert tags and all(t == version or t.startswith(version + "-") for t in tags), f"{tags} vs version {version}"
