"""Regenerate kubernetes-v1.34.json: the Kubernetes JSON schemas that tests/test_security_infra.py
validates infra/k8s/*.yaml against, offline.

Source: the strict schemas (unknown fields rejected) that the PyPI package kubernetes-validate
ships, generated from Kubernetes' OpenAPI. Only the definitions reachable from the kinds the
manifests use are kept, without their descriptions, so the vendored file stays small:

    pip install --no-deps --target /tmp/kv kubernetes-validate==1.37.0
    python tests/schemas/vendor_kubernetes.py /tmp/kv
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VERSION = "v1.34.0"
ROOTS = ("io.k8s.api.batch.v1.CronJob", "io.k8s.api.networking.v1.NetworkPolicy",
         "io.k8s.api.core.v1.PodTemplateSpec")  # PodTemplateSpec: the pod templates of the RayJob


def _refs(node, out: set[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                out.add(value.rsplit("/", 1)[-1])
            else:
                _refs(value, out)
    elif isinstance(node, list):
        for value in node:
            _refs(value, out)


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def main(site_packages: str) -> None:
    source = (Path(site_packages) / "kubernetes_validate" / "kubernetes-json-schema"
              / f"{VERSION}-local-strict" / "_definitions.json")
    full = json.loads(source.read_text())
    defs, keep, todo = full["$defs"], set(), list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            found: set[str] = set()
            _refs(defs[name], found)
            todo += sorted(found - keep)
    lines = [f"  {json.dumps(name)}: {json.dumps(_strip(defs[name]), sort_keys=True)}"
             for name in sorted(keep)]
    head = {"$schema": full["$schema"], "$id": full["$id"],
            "$comment": f"Kubernetes {VERSION} strict schemas (kubernetes-validate), reduced by "
                        "tests/schemas/vendor_kubernetes.py to the kinds used in infra/k8s"}
    text = json.dumps(head, indent=1)[:-2] + ',\n "$defs": {\n' + ",\n".join(lines) + "\n }\n}\n"
    out = Path(__file__).with_name(f"kubernetes-{VERSION.rsplit('.', 1)[0]}.json")
    out.write_text(text)
    print(f"{out}: {len(keep)} definitions, {len(text)} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
