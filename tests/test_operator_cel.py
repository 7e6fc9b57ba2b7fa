"""The CRD's cross-field CEL rules (``x-kubernetes-validations``, issue #12): evaluated by a real CEL
implementation on the examples and on broken variants, equal to :mod:`reparam.spec`'s rule strings, and
agreeing with the operator's own checks (kept for API servers without CEL)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from reparam import spec
from reparam.operator import jobs
from test_spec import crd_errors

ROOT = Path(__file__).resolve().parents[1]
CRD = yaml.safe_load((ROOT / "crds" / "modelconversion.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
SPEC = SCHEMA["properties"]["spec"]
EXAMPLES = sorted((ROOT / "examples").glob("conversion-*.yaml"))

BASE: dict[str, Any] = {
    "apiVersion": "reparam.dev/v1alpha1", "kind": "ModelConversion", "metadata": {"name": "m", "namespace": "n"},
    "spec": {"source": {"uri": "models:/traffic-dual/7", "sha256": "a" * 64},
             "conversion": {"precision": "fp16", "formats": ["pt", "onnx"]},
             "registry": {"trackingUri": "http://mlflow:5000", "modelName": "traffic-deploy", "aliases": ["staging"]},
             "evaluation": {"data": "s3://datasets/coco-val"},
             "promotion": {"alias": "champion", "holdAlias": "challenger"}},
}


def rules(schema: dict[str, Any]) -> list[str]:
    return [r["rule"] for r in schema.get("x-kubernetes-validations", [])]


def test_the_crd_rules_are_the_spec_modules() -> None:
    props = SPEC["properties"]
    assert rules(props["conversion"]) == [spec.PRECISION_FAMILY_RULE]
    assert rules(SPEC) == [spec.PROMOTION_NEEDS_RULE, spec.PROMOTION_ALIAS_RULE]
    assert rules(props["source"]) == [spec.SHA256_PINNED_RULE]
    assert rules(props["promotion"]) == [spec.HOLD_ALIAS_RULE]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_every_rule(path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    assert crd_errors(obj) == []
    jobs.validate_spec(obj["spec"])


def test_base_passes() -> None:
    assert crd_errors(BASE) == []
    jobs.validate_spec(BASE["spec"])


def _set(obj: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        obj = obj.setdefault(key, {})
    if value is _DELETE:
        obj.pop(last, None)
    else:
        obj[last] = value


_DELETE = object()


@pytest.mark.parametrize("changes, crd_needle, operator_needle", [
    ({"source.uri": "models:/traffic-dual@candidate"}, "pinned source", "needs a pinned source"),
    ({"source.uri": "models:/traffic-dual@Latest", "source.sha256": ""}, "reserved by MLflow", "reserved"),
    ({"registry.aliases": ["v3"]}, "reserved by MLflow", "reserved"),
    ({"promotion.alias": "latest"}, "reserved by MLflow", "reserved"),
    ({"evaluation": _DELETE}, "needs spec.evaluation", "needs spec.evaluation"),
    ({"registry": _DELETE}, "needs spec.evaluation", "needs spec.evaluation"),
    ({"registry.aliases": ["staging", "champion"]}, "gated and ungated", "gated and ungated"),
    ({"promotion.holdAlias": "champion"}, "must differ", "must differ"),
    ({"conversion.precision": "export=fp16", "conversion.formats": ["pt"]}, "no format in spec.conversion.formats",
     "sets the export family"),
    ({"conversion.precision": "export=fp16", "conversion.formats": _DELETE}, "no format in spec.conversion.formats",
     "sets the export family"),  # no formats: the operator's default .pt
    ({"conversion.precision": "weights=fp32", "conversion.formats": ["onnx"]}, "no format in spec.conversion",
     "sets the weights family"),
])
def test_broken_variants_are_rejected_by_cel_and_by_the_operator(changes: dict, crd_needle: str,
                                                                  operator_needle: str) -> None:
    obj = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        _set(obj["spec"], dotted, value)
    errs = crd_errors(obj)
    assert any(crd_needle in e for e in errs), errs
    with pytest.raises(jobs.InvalidSpec, match=operator_needle):
        jobs.validate_spec(obj["spec"])


@pytest.mark.parametrize("changes", [
    {"source.uri": "models:/traffic-dual@candidate", "source.sha256": ""},  # an alias without a digest
    {"source.uri": "s3://bucket/ckpt/best.pt"},                               # an object with a digest
    {"conversion.formats": ["onnx"]},  # fp16 graphs only: the CLI accepts --half --format onnx, so does the CRD
    {"conversion.formats": ["onnx"], "conversion.precision": "export=fp16"},
    {"conversion.formats": ["pt", "onnx"], "conversion.precision": "weights=fp32,export=fp16"},
    {"conversion.precision": "weights=fp32"},  # no formats: the operator's default, a .pt
    {"promotion.holdAlias": _DELETE},
    {"registry.aliases": _DELETE},
])
def test_legal_variants_pass(changes: dict) -> None:
    obj = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        _set(obj["spec"], dotted, value)
    assert crd_errors(obj) == []
    jobs.validate_spec(obj["spec"])


def test_the_crd_with_its_rules_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(CRD, kubernetes_validate.latest_version(), strict=True)
