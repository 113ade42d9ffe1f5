"""The Grafana dashboard queries only metrics and labels the agent really exports.

The exported names come from the agent's own registry (`agent.metrics.Metrics`), so a renamed
metric or label breaks this test instead of leaving an empty panel.
"""
from __future__ import annotations

import json
import re

import pytest

from agent.metrics import Metrics
from tests.deploy.manifests import K8S

DASHBOARD = K8S / "monitoring" / "grafana-dashboard.json"
# labels Prometheus adds to every scraped series (ServiceMonitor target labels) and `le` of buckets
TARGET_LABELS = {"namespace", "service", "pod", "job", "instance", "endpoint", "container"}
_METRIC = re.compile(r"\bmodelshelf_[a-z0-9_]+")


_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def _exported() -> dict[str, set[str]]:
    """Series name -> label names, for every series the agent's registry exposes. Label names
    come from the collectors (`_labelnames`: prometheus_client has no public accessor, and a
    labelled metric exposes no sample before its first use)."""
    m = Metrics()
    labels = {c._name: set(c._labelnames) for c in vars(m).values() if hasattr(c, "_labelnames") and hasattr(c, "_name")}
    out: dict[str, set[str]] = {}
    for family in m.registry.collect():
        for suffix in _SUFFIXES.get(family.type, ("",)):
            out[family.name + suffix] = labels.get(family.name, set()) | ({"le"} if suffix == "_bucket" else set())
    return out


EXPORTED = _exported()
TARGETS = [(p["title"], t["expr"]) for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def test_registry_exports_what_the_dashboard_is_about():
    for name in ("modelshelf_models", "modelshelf_requests_total", "modelshelf_cold_start_seconds_bucket",
                 "modelshelf_memory_budget_bytes"):
        assert name in EXPORTED
    assert "state" in EXPORTED["modelshelf_models"] and {"model", "code"} <= EXPORTED["modelshelf_requests_total"]


def test_dashboard_is_importable():
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] and d["title"] and d["panels"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        assert p["datasource"]["uid"] == "${datasource}"
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
    variables = {v["name"] for v in d["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", json.dumps(d["panels"]))) - {"__rate_interval"}
    assert used <= variables, f"undefined dashboard variables: {used - variables}"


@pytest.mark.parametrize("title, expr", TARGETS, ids=[t for t, _ in TARGETS])
def test_query_uses_exported_metrics_and_labels(title, expr):
    metrics = _METRIC.findall(expr)
    assert metrics, f"{title}: no modelshelf_ metric in {expr}"
    unknown = [m for m in metrics if m not in EXPORTED]
    assert not unknown, f"{title}: the agent exports no {unknown}"
    allowed = set().union(*(EXPORTED[m] for m in metrics)) | TARGET_LABELS
    # label matchers: {name=~"..", other="..."} and grouping: by (a, b)
    used = set()
    for sel in re.findall(r"\{([^}]*)\}", expr):
        used |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", sel))
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        used |= {g.strip() for g in group.split(",") if g.strip()}
    bad = used - allowed
    assert not bad, f"{title}: labels {bad} are not on {metrics}"


def test_label_check_catches_a_wrong_label():
    """Negative control for the parsing above."""
    expr = 'sum by (modell) (rate(modelshelf_requests_total{namespace=~"x"}[5m]))'
    groups = {g.strip() for grp in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr) for g in grp.split(",")}
    assert groups - (EXPORTED["modelshelf_requests_total"] | TARGET_LABELS) == {"modell"}
