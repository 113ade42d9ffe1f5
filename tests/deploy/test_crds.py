"""CRD objects, checked structurally: kubernetes-validate bundles no schema for CRDs.

Two kinds of check, honestly named:
- ServiceMonitor, Istio DestinationRule: a hand-written JSON schema of the *subset* of each CRD's
  fields that deploy/ uses (names and types taken from the Prometheus Operator and Istio API
  references; unknown fields are rejected, so a typo fails). Not the CRDs' own schemas.
- Gateway API (Gateway, GatewayClass, HTTPRoute) and the Inference Extension's InferencePool:
  the CRDs' own openAPIV3Schema, vendored in crd_schemas/ (extract.py says from where), checked
  the way the API server would with strict field validation: every object with `properties` and
  no `x-kubernetes-preserve-unknown-fields` rejects unknown fields. Not evaluated: the CRDs'
  CEL rules (`x-kubernetes-validations`); the cross-references they would check are tested in
  test_gateway_manifests.py.
Plus the cross-references that make them work (the Services they select or name exist and have
the named port; the mesh and the ingress hash the model name).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from tests.deploy.manifests import by_kind, find, load_docs

_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                   "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                   "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
    "additionalProperties": False,
}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}

SERVICEMONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}, "additionalProperties": False},
                "namespaceSelector": {"type": "object", "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}, "additionalProperties": False},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object",
                    "required": ["port"],
                    "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"}, "scheme": {"enum": ["http", "https"]},
                                   "interval": _DURATION, "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"}},
                    "additionalProperties": False}},
                "jobLabel": {"type": "string"},
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}

_HASH = {
    "type": "object",
    "properties": {
        "httpHeaderName": {"type": "string", "pattern": "^[a-z0-9-]+$"},
        "httpQueryParameterName": {"type": "string"},
        "useSourceIp": {"type": "boolean"},
        "ringHash": {"type": "object", "properties": {"minimumRingSize": {"type": "integer"}}, "additionalProperties": False},
        "maglev": {"type": "object", "properties": {"tableSize": {"type": "integer"}}, "additionalProperties": False},
    },
    "additionalProperties": False,
    "oneOf": [{"required": ["httpHeaderName"]}, {"required": ["httpQueryParameterName"]}, {"required": ["useSourceIp"]}],
}
DESTINATIONRULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"enum": ["networking.istio.io/v1", "networking.istio.io/v1beta1"]},
        "kind": {"const": "DestinationRule"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "required": ["host", "trafficPolicy"],
            "properties": {
                "host": {"type": "string"},
                "trafficPolicy": {
                    "type": "object",
                    "properties": {
                        "loadBalancer": {"type": "object", "properties": {"consistentHash": _HASH}, "required": ["consistentHash"], "additionalProperties": False},
                        "connectionPool": {"type": "object", "properties": {"http": {"type": "object", "properties": {
                            "idleTimeout": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
                            "http2MaxRequests": {"type": "integer"}, "maxRequestsPerConnection": {"type": "integer"}},
                            "additionalProperties": False}}, "additionalProperties": False},
                    },
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}

CRD_SCHEMA_DIR = Path(__file__).resolve().parent / "crd_schemas"


def strict_openapi(node: dict) -> dict:
    """A CRD's structural OpenAPI v3 schema as a JSON schema that rejects unknown fields, as the
    API server does (it prunes them; `kubectl apply --validate=strict`, the default, rejects them)."""
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if "properties" in node:
        out["properties"] = {k: strict_openapi(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_openapi(node["additionalProperties"])
    if "items" in node:
        out["items"] = strict_openapi(node["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            out[key] = [strict_openapi(v) for v in node[key]]
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def _vendored(path: Path) -> dict:
    doc = json.loads(path.read_text())
    schema = strict_openapi(doc["schema"])
    schema["properties"]["apiVersion"] = {"const": f"{doc['group']}/{doc['version']}"}
    schema["properties"]["kind"] = {"const": doc["kind"]}
    schema["properties"]["metadata"] = _META  # the CRD leaves ObjectMeta to the API server
    schema["required"] = sorted({"apiVersion", "kind", "metadata", "spec", *schema.get("required", [])})
    return schema


VENDORED = {p.name.split(".")[0]: _vendored(p) for p in sorted(CRD_SCHEMA_DIR.glob("*.json"))}
SCHEMAS = {"ServiceMonitor": SERVICEMONITOR, "DestinationRule": DESTINATIONRULE, **VENDORED}
CRDS = [d for d in load_docs() if d.is_crd]


def test_crd_objects_are_known():
    assert {d.kind for d in CRDS} == set(SCHEMAS), "a new CRD kind needs a structural schema here"


@pytest.mark.parametrize("doc", CRDS, ids=lambda d: d.label)
def test_crd_object_matches_its_structural_schema(doc):
    errors = sorted(jsonschema.Draft202012Validator(SCHEMAS[doc.kind]).iter_errors(doc.obj), key=str)
    assert not errors, f"{doc.label}: " + "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_structural_schema_rejects_a_typo():
    """Negative control: a misspelt field fails, as with --strict for built-in kinds."""
    sm = dict(by_kind("ServiceMonitor")[0].obj)
    sm["spec"] = {**sm["spec"], "endpoint": sm["spec"]["endpoints"]}
    assert list(jsonschema.Draft202012Validator(SERVICEMONITOR).iter_errors(sm))


def test_servicemonitor_scrapes_the_agent_services():
    for sm in by_kind("ServiceMonitor"):
        selector = sm.obj["spec"]["selector"]["matchLabels"]
        selected = [s for s in by_kind("Service") if selector.items() <= s.obj["metadata"].get("labels", {}).items()]
        assert len(selected) >= 5, f"{sm.label} selects {len(selected)} Services"
        for ep in sm.obj["spec"]["endpoints"]:
            assert ep["path"] == "/metrics"
            for s in selected:
                assert ep["port"] in {p.get("name") for p in s.obj["spec"]["ports"]}, f"{s.label} has no port {ep['port']}"
        # every Service of an agent Deployment/StatefulSet is scraped
        agent_services = [s for s in by_kind("Service") if s.obj["metadata"]["labels"].get("app.kubernetes.io/name") == "modelshelf"]
        assert {s.name for s in agent_services} == {s.name for s in selected}


def test_vendored_schema_rejects_a_typo_and_a_bad_enum():
    """Negative control for the CRDs' own schemas: a misspelt field and a value outside an enum fail."""
    pool = next(d for d in by_kind("InferencePool"))
    typo = json.loads(json.dumps(pool.obj))
    typo["spec"]["endpointPickerRef"]["failuremode"] = typo["spec"]["endpointPickerRef"].pop("failureMode")
    assert list(jsonschema.Draft202012Validator(SCHEMAS["InferencePool"]).iter_errors(typo))
    bad = json.loads(json.dumps(pool.obj))
    bad["spec"]["appProtocol"] = "grpc"
    assert list(jsonschema.Draft202012Validator(SCHEMAS["InferencePool"]).iter_errors(bad))
    route = json.loads(json.dumps(by_kind("HTTPRoute")[0].obj))
    route["spec"]["rules"][0]["backendRef"] = route["spec"]["rules"][0].pop("backendRefs")
    assert list(jsonschema.Draft202012Validator(SCHEMAS["HTTPRoute"]).iter_errors(route))


def test_mesh_and_ingress_hash_the_model_name():
    """The mesh hashes the x-model-name header (Istio cannot hash a path segment); the ingress
    hashes the model name that the controller's `map` takes from the path (no client header)."""
    dr = by_kind("DestinationRule")
    ing = [i for i in by_kind("Ingress") if "nginx.ingress.kubernetes.io/upstream-hash-by" in i.obj["metadata"].get("annotations", {})]
    assert dr and ing
    header = dr[0].obj["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["httpHeaderName"]
    assert header == "x-model-name"
    assert find("Service", dr[0].obj["spec"]["host"].split(".")[0]), "DestinationRule host must be a Service"
    snippet = find("ConfigMap", "ingress-nginx-controller").obj["data"]["http-snippet"]
    defined = re.findall(r"map \$uri (\$\w+) \{", snippet)
    for i in ing:
        by = i.obj["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"]
        assert [by] == defined, f"the ingress hashes {by}; the controller's http-snippet defines {defined}"
        for rule in i.obj["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                svc = find("Service", backend["name"])
                assert svc and backend["port"]["name"] in {p["name"] for p in svc.obj["spec"]["ports"]}
                assert svc.name == dr[0].obj["spec"]["host"], "ingress and mesh must front the same Service"
        body = i.obj["metadata"]["annotations"].get("nginx.ingress.kubernetes.io/proxy-body-size")
        assert body and re.match(r"^[0-9]+[kmg]?$", body)
