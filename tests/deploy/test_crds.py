"""CRD objects (ServiceMonitor, Istio DestinationRule) and the ingress affinity, checked
structurally: kubernetes-validate bundles no schema for CRDs.

What this checks, honestly: a hand-written JSON schema of the *subset* of each CRD's fields
that deploy/ uses (names and types taken from the Prometheus Operator and Istio API references;
unknown fields are rejected, so a typo fails), plus the cross-references that make them work
(the Services they select or name exist and have the named port; the hash header is the same
at the mesh and at the ingress). It does not check against the CRDs' own OpenAPI schemas.
"""
from __future__ import annotations

import re

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

SCHEMAS = {"ServiceMonitor": SERVICEMONITOR, "DestinationRule": DESTINATIONRULE}
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


def test_mesh_and_ingress_hash_the_same_header():
    dr = by_kind("DestinationRule")
    ing = [i for i in by_kind("Ingress") if "nginx.ingress.kubernetes.io/upstream-hash-by" in i.obj["metadata"].get("annotations", {})]
    assert dr and ing
    header = dr[0].obj["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["httpHeaderName"]
    assert find("Service", dr[0].obj["spec"]["host"].split(".")[0]), "DestinationRule host must be a Service"
    for i in ing:
        by = i.obj["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"]
        assert by == "$http_" + header.replace("-", "_"), f"nginx variable for header {header}: {by}"
        for rule in i.obj["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                svc = find("Service", backend["name"])
                assert svc and backend["port"]["name"] in {p["name"] for p in svc.obj["spec"]["ports"]}
                assert svc.name == dr[0].obj["spec"]["host"], "ingress and mesh must front the same Service"
        body = i.obj["metadata"]["annotations"].get("nginx.ingress.kubernetes.io/proxy-body-size")
        assert body and re.match(r"^[0-9]+[kmg]?$", body)
