"""The ``ModelConversionPolicy`` CRD, derived from the ``ModelConversion`` CRD and :mod:`reparam.spec`.

``spec.template`` is the ``ModelConversion`` spec schema (everything but ``source``, which the policy fills per
version), so the API server checks a template with the same schema and CEL rules as a conversion. The committed
``crds/modelconversionpolicy.yaml`` must equal :func:`build` (``tests/test_policy.py`` checks it); after the
``ModelConversion`` CRD changes, regenerate it with ``python tests/policy_crd.py``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

from reparam import spec as grammar
from reparam.operator import jobs, policy

ROOT = Path(__file__).resolve().parents[1]
MC_CRD = ROOT / "crds" / "modelconversion.yaml"
POLICY_CRD = ROOT / "crds" / "modelconversionpolicy.yaml"
HEADER = "# generated from crds/modelconversion.yaml and reparam.spec by tests/policy_crd.py: do not edit\n"


def template_schema(mc_crd: dict) -> dict:
    """The ModelConversion spec schema without ``source`` (filled per version) and its requirement."""
    mc_spec = copy.deepcopy(mc_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"])
    mc_spec["properties"].pop("source")
    mc_spec.pop("required", None)
    mc_spec["description"] = ("A ModelConversion spec; spec.source is filled per version "
                              "(models:/<registeredModel>/<version>).")
    return mc_spec


def build() -> dict:
    mc = yaml.safe_load(MC_CRD.read_text())
    condition = {
        "type": "object", "required": ["type", "status", "lastTransitionTime", "reason", "message"],
        "properties": {
            "type": {"type": "string", "enum": ["Ready", "RegistryReachable"]},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string", "maxLength": 1024},
            "message": {"type": "string", "maxLength": 32768},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
        },
    }
    tag_keys = f"self.all(k, k.matches('{grammar.TAG_KEY_PATTERN}'))"
    select = {
        "type": "object", "description": "Exactly one of alias, tag, newest.",
        "minProperties": 1, "maxProperties": 1,
        "properties": {
            "alias": {"type": "string", "maxLength": grammar.ALIAS_MAX, "pattern": grammar.ALIAS_PATTERN,
                      "description": "Convert the version this alias points at, whenever it moves.",
                      "x-kubernetes-validations": [{
                          "rule": f"!self.matches('{grammar.ALIAS_RESERVED_PATTERN}')",
                          "message": "the alias is reserved by MLflow (latest, v<number>)"}]},
            "tag": {"type": "object", "minProperties": 1, "description": "Convert every version with all these tags.",
                    "additionalProperties": {"type": "string", "maxLength": grammar.TAG_VALUE_MAX},
                    "x-kubernetes-validations": [{"rule": tag_keys, "message": "a tag key outside MLflow's grammar"}]},
            "newest": {"type": "boolean", "enum": [True], "description": "Convert every new version."},
        },
    }
    schema = {
        "type": "object",
        "description": "Converts every selected READY version of a registered dual model (issue #13).",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
            "spec": {
                "type": "object", "required": ["source", "template"],
                "properties": {
                    "source": {
                        "type": "object", "required": ["registeredModel", "select"],
                        "properties": {
                            "registeredModel": {"type": "string", "maxLength": grammar.MODEL_NAME_MAX,
                                                "pattern": grammar.MODEL_NAME_PATTERN},
                            "trackingUri": {"type": "string", "pattern": grammar.TRACKING_URI_PATTERN,
                                            "description": "MLflow server of the source model; default: "
                                                           "template.registry.trackingUri, else the operator's."},
                            "select": select,
                            "minVersion": {"type": "integer", "minimum": 1, "default": 1,
                                           "description": "Versions below it are ignored."},
                        },
                    },
                    "interval": {"type": "string", "pattern": grammar.INTERVAL_PATTERN,
                                 "default": grammar.DEFAULT_INTERVAL,
                                 "description": "Polling period (webhooks trigger at once), e.g. 30s, 5m, 1h."},
                    "historyLimit": {"type": "integer", "minimum": 0, "maximum": grammar.HISTORY_LIMIT_MAX,
                                     "default": grammar.DEFAULT_HISTORY_LIMIT,
                                     "description": "Finished conversions kept; older ones are deleted "
                                                    "(their registry versions stay)."},
                    "template": template_schema(mc),
                },
            },
            "status": {
                "type": "object",
                "properties": {
                    "observedGeneration": {"type": "integer", "format": "int64"},
                    "conditions": {"type": "array", "x-kubernetes-list-type": "map",
                                   "x-kubernetes-list-map-keys": ["type"], "items": condition},
                    "lastSeenVersion": {"type": "string"},
                    "lastPollTime": {"type": "string", "format": "date-time"},
                    "lastConversion": {"type": "string"},
                    "lastOutcome": {"type": "string"},
                    "historyFloor": {"type": "integer", "format": "int64",
                                     "description": "Versions at or below it are not converted again."},
                    "conversions": {"type": "array", "items": {"type": "object", "properties": {
                        "name": {"type": "string"}, "version": {"type": "string"},
                        "outcome": {"type": "string"}, "created": {"type": "string"}}}},
                },
            },
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{policy.PLURAL}.{jobs.GROUP}",
                     "labels": {"app.kubernetes.io/name": "reparam", "app.kubernetes.io/component": "operator"}},
        "spec": {
            "group": jobs.GROUP, "scope": "Namespaced",
            "names": {"kind": policy.KIND, "listKind": f"{policy.KIND}List", "plural": policy.PLURAL,
                      "singular": policy.KIND.lower(), "shortNames": ["mcpolicy"], "categories": ["reparam"]},
            "versions": [{
                "name": jobs.VERSION, "served": True, "storage": True, "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Model", "type": "string", "jsonPath": ".spec.source.registeredModel"},
                    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
                    {"name": "LastSeen", "type": "string", "jsonPath": ".status.lastSeenVersion"},
                    {"name": "LastConversion", "type": "string", "jsonPath": ".status.lastConversion"},
                    {"name": "Outcome", "type": "string", "jsonPath": ".status.lastOutcome"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": schema},
            }],
        },
    }


def render() -> str:
    return HEADER + yaml.safe_dump(build(), sort_keys=False, width=120)


if __name__ == "__main__":
    POLICY_CRD.write_text(render())
    sys.exit(0)
