"""Regenerate the vendored CRD schemas in this directory from the upstream CRD manifests.

    python tests/deploy/crd_schemas/extract.py SRC_CRD.yaml [...]

Each CRD's served `openAPIV3Schema` (one file per kind and version, `<Kind>.<version>.json`) is
kept without its `description` texts (size), with the CRD's source recorded in `_source`.
The upstreams (Apache-2.0): kubernetes-sigs/gateway-api config/crd/standard/ (Gateway,
GatewayClass, HTTPRoute) and kubernetes-sigs/gateway-api-inference-extension config/crd/bases/
(InferencePool). Pass `--source TEXT` to record where the files came from (repo@commit).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("crds", nargs="+", type=Path)
    p.add_argument("--source", default="")
    p.add_argument("--versions", default="v1", help="comma-separated versions to keep")
    a = p.parse_args()
    keep = set(a.versions.split(","))
    for path in a.crds:
        crd = yaml.safe_load(path.read_text())
        kind, group = crd["spec"]["names"]["kind"], crd["spec"]["group"]
        for v in crd["spec"]["versions"]:
            if v["name"] not in keep or not v.get("served"):
                continue
            doc = {"_source": f"{a.source} {path.name}".strip(), "group": group, "kind": kind, "version": v["name"],
                   "schema": _strip(v["schema"]["openAPIV3Schema"])}
            out = HERE / f"{kind}.{v['name']}.json"
            out.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n")
            print(out.name, out.stat().st_size)


if __name__ == "__main__":
    main()
