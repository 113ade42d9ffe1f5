"""deploy/k8s/08-inference-gateway is wired the way the gateway, the picker and the agents expect,
and 07-scale-out's nginx path map really gives one replica per model.

The CRD objects' fields are checked against their own schemas in test_crds.py; here: the
references between objects (what the CRDs' CEL rules and controllers would resolve at run time),
the picker's and the drain hook's command lines with the real CLI, and the `map` run in a real
nginx in front of real HTTP servers.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import pytest

from agent.cli import build_parser
from tests.deploy.manifests import K8S, by_kind, find, flag_value, modelshelf_argv, pods
from tests.support.agentproc import request

GATEWAY_DIR = K8S / "08-inference-gateway"
POOLS = [d for d in by_kind("InferencePool")]
ROUTES = [d for d in by_kind("HTTPRoute")]


def _in(doc, directory) -> bool:
    return directory in doc.path.parents


def _agents_pod():
    found = [p for p in pods() if _in(p.doc, GATEWAY_DIR) and any(c["name"] == "agent" for c in p.containers)]
    assert len(found) == 1, "08-inference-gateway has one agents Deployment"
    return found[0]


def _picker():
    pod = next(p for p in pods() if _in(p.doc, GATEWAY_DIR) and p.containers[0]["name"] == "picker")
    return pod, pod.containers[0], modelshelf_argv(pod.containers[0])


def _selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def test_every_gateway_routes_rest_and_grpc_to_the_pools():
    gateways = {d.name: d for d in by_kind("Gateway")}
    assert {"modelshelf-istio", "modelshelf-envoy-gateway"} <= set(gateways)
    assert gateways["modelshelf-istio"].obj["spec"]["gatewayClassName"] == "istio"
    eg = find("GatewayClass", gateways["modelshelf-envoy-gateway"].obj["spec"]["gatewayClassName"])
    assert eg and eg.obj["spec"]["controllerName"] == "gateway.envoyproxy.io/gatewayclass-controller"
    pools = {d.name: d for d in POOLS}
    routed = defaultdict(set)
    for route in ROUTES:
        (parent,) = route.obj["spec"]["parentRefs"]
        assert parent["kind"] == "Gateway" and parent["name"] in gateways, f"{route.label}: parent {parent}"
        for rule in route.obj["spec"]["rules"]:
            (backend,) = rule["backendRefs"]
            assert backend["group"] == "inference.networking.k8s.io" and backend["kind"] == "InferencePool"
            pool = pools[backend["name"]]
            prefixes = {m["path"]["value"] for m in rule["matches"]}
            routed[parent["name"]] |= {(p, pool.obj["spec"]["appProtocol"]) for p in prefixes}
    for name in gateways:
        assert routed[name] == {("/inference.GRPCInferenceService/", "kubernetes.io/h2c"), ("/v2/", "http"), ("/v1/", "http")}, name


def test_pools_select_the_agents_on_their_data_plane_ports():
    pod = _agents_pod()
    agent = next(c for c in pod.containers if c["name"] == "agent")
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    argv = modelshelf_argv(agent)
    assert ports["http"] == int(flag_value(argv, "--port")) and ports["grpc"] == int(flag_value(argv, "--grpc-port") or 8001)
    by_protocol = {}
    for pool in POOLS:
        spec = pool.obj["spec"]
        assert _selects(spec["selector"]["matchLabels"], pod.labels), f"{pool.label} selects no agent"
        assert not any(_selects(spec["selector"]["matchLabels"], p.labels) for p in pods() if p.doc.label != pod.doc.label), \
            f"{pool.label} also selects pods that are not the fleet's agents"
        by_protocol[spec["appProtocol"]] = [t["number"] for t in spec["targetPorts"]]
    assert by_protocol == {"http": [ports["http"]], "kubernetes.io/h2c": [ports["grpc"]]}


def test_pools_call_the_picker_and_fail_open():
    pod, picker, argv = _picker()
    listen_port = int(flag_value(argv, "--listen").rsplit(":", 1)[1])
    assert {p["containerPort"] for p in picker["ports"]} == {listen_port}
    for pool in POOLS:
        ref = pool.obj["spec"]["endpointPickerRef"]
        svc = find("Service", ref["name"])
        assert svc and _selects(svc.obj["spec"]["selector"], pod.labels), f"{pool.label}: no Service {ref['name']} for the picker"
        (port,) = [p for p in svc.obj["spec"]["ports"] if p["port"] == ref["port"]["number"]]
        assert port["targetPort"] in (listen_port, "ext-proc")
        # every agent serves every configured model (lazy load): without the picker, any agent will do
        assert ref["failureMode"] == "FailOpen"


def test_picker_command_line_parses_and_finds_the_agents(capsys):
    pod, picker, argv = _picker()
    assert argv[0] == "picker"
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`modelshelf {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")
    listen_port = int(flag_value(argv, "--listen").rsplit(":", 1)[1])
    name, port = flag_value(argv, "--agents-dns").rsplit(":", 1)
    svc = find("Service", name)
    agents = _agents_pod()
    assert svc and svc.obj["spec"].get("clusterIP") == "None", "--agents-dns must name a headless Service (A records per pod)"
    assert svc.obj["spec"].get("publishNotReadyAddresses") is False, "not-ready agents must drop out of DNS"
    assert _selects(svc.obj["spec"]["selector"], agents.labels)
    agent = next(c for c in agents.containers if c["name"] == "agent")
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert int(port) == ports["http"]
    assert int(flag_value(argv, "--agent-management-port")) == ports["management"]
    from agent.picker.service import READY_SERVICES

    for probe, service in (("livenessProbe", "liveness"), ("readinessProbe", "readiness")):
        assert picker[probe]["grpc"]["port"] == listen_port and picker[probe]["grpc"]["service"] == service
    assert "readiness" in READY_SERVICES, "the picker's gRPC health names the service the probe asks"


def test_agents_drain_on_prestop_and_share_one_rwx_cache(capsys):
    pod = _agents_pod()
    agent = next(c for c in pod.containers if c["name"] == "agent")
    argv = modelshelf_argv(agent)
    drain = [str(c) for c in agent["lifecycle"]["preStop"]["exec"]["command"]]
    assert drain[:2] == ["modelshelf", "drain"]
    try:
        args = build_parser().parse_args(drain[1:])
    except SystemExit:
        pytest.fail(f"preStop `{' '.join(drain)}` does not parse: {capsys.readouterr().err.strip()}")
    assert args.management_url == f"http://127.0.0.1:{flag_value(argv, '--management-port')}", "drain must call this agent"
    assert 0 < args.wait < pod.spec["terminationGracePeriodSeconds"], "drain waits for traffic to move, within the grace period"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    cache = next(m for m in agent["volumeMounts"] if m["mountPath"] == flag_value(argv, "--cache-dir"))
    claim = find("PersistentVolumeClaim", pod.volume(cache["name"])["persistentVolumeClaim"]["claimName"])
    assert claim and claim.obj["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pod.doc.obj["spec"]["replicas"] >= 2


def test_scale_out_agents_evict_pull_lazily_and_drop_stale_copies():
    """After a replica dies the survivors must evict to take its models: a long --min-residency
    (the issue's 60 s) held them full and answered 503 for 30 s."""
    for p in pods():
        if "mesh-affinity" in p.doc.path.parts or _in(p.doc, GATEWAY_DIR):
            for c in p.containers:
                argv = modelshelf_argv(c)
                if argv and argv[0] == "run":
                    residency = flag_value(argv, "--min-residency")
                    assert residency is not None and float(residency) <= 5, f"{p.doc.label}: --min-residency {residency}"
                    # a replica pulls what is sent to it, not every model (the issue: 180 GETs for
                    # 60 models), and copies left behind by a move or a resize leave when idle
                    assert flag_value(argv, "--prefetch") == "preload", p.doc.label
                    assert float(flag_value(argv, "--idle-unload") or 0) > 0, p.doc.label


# ------------------------------------------------------------------ the nginx path map, live

@pytest.fixture(scope="module")
def nginx_over_four():
    from tests.support.nginx import Nginx, nginx_binary
    from tests.support.whoami import WhoAmI

    try:
        nginx_binary()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    backends = [WhoAmI(f"r{i}") for i in range(4)]
    with Nginx([b.http_addr for b in backends]) as ngx:
        yield ngx
    for b in backends:
        b.stop()


def _who(url: str, method: str = "GET") -> str:
    status, body = request(method, url, {} if method == "POST" else None)
    assert status == 200, body
    return body["who"]


def test_nginx_map_keeps_every_call_for_a_model_on_one_replica(nginx_over_four):
    """Header-less V2 and V1 calls for one model (infer, ready, metadata, V1 predict) reach one
    replica; 40 models spread over all four. Fails with "$request_uri" as the hash key."""
    where = {}
    for i in range(40):
        m = f"model-{i}"
        u = nginx_over_four.url
        seen = {_who(f"{u}/v2/models/{m}/infer", "POST"), _who(f"{u}/v2/models/{m}/ready"),
                _who(f"{u}/v2/models/{m}"), _who(f"{u}/v2/models/{m}/versions/1/infer", "POST"),
                _who(f"{u}/v1/models/{m}:predict", "POST")}
        assert len(seen) == 1, f"{m} reached {seen}"
        where[m] = seen.pop()
    spread = Counter(where.values())
    assert len(spread) == 4 and max(spread.values()) <= 20, spread


def test_envoy_gateway_retries_a_dead_agent_without_overflowing():
    """The HTTPRoute to the pools has a retry policy on connect failure (not after the request was
    sent) and room for many retries at once."""
    (policy,) = by_kind("BackendTrafficPolicy")
    (target,) = policy.obj["spec"]["targetRefs"]
    route = find("HTTPRoute", target["name"])
    assert route and target["kind"] == "HTTPRoute" and _in(route, GATEWAY_DIR / "envoy-gateway")
    retry = policy.obj["spec"]["retry"]
    assert "connect-failure" in retry["retryOn"]["triggers"] and "reset" not in retry["retryOn"]["triggers"]
    assert retry["numRetries"] >= 1 and policy.obj["spec"]["circuitBreaker"]["maxParallelRetries"] >= 64
