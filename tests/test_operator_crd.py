"""The CRD's schema: examples validate, bad specs are rejected at admission, the
schema is structural enough for the status fields the operator writes."""

from __future__ import annotations

import copy
import datetime
from pathlib import Path

import jsonschema
import pytest
import yaml

from reparam.operator import jobs, status as st

ROOT = Path(__file__).resolve().parents[1]
CRD = yaml.safe_load((ROOT / "crds" / "modelconversion.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
EXAMPLES = sorted((ROOT / "examples").glob("conversion-*.yaml"))
# OpenAPI v3.0 (boolean exclusiveMinimum, no $schema) is closest to JSON Schema draft 4.
VALIDATOR = jsonschema.Draft4Validator(SCHEMA)


def errors(obj: dict) -> list[str]:
    return [e.message for e in VALIDATOR.iter_errors(obj)]


def test_crd_identity() -> None:
    assert CRD["metadata"]["name"] == f"{jobs.PLURAL}.{jobs.GROUP}"
    assert CRD["spec"]["names"]["kind"] == jobs.KIND
    assert CRD["spec"]["names"]["shortNames"] == ["mconv"]
    assert VERSION["name"] == jobs.VERSION
    assert VERSION["subresources"] == {"status": {}}


def test_printer_columns_select_condition_by_type() -> None:
    cols = {c["name"]: c for c in VERSION["additionalPrinterColumns"]}
    assert list(cols) == ["Phase", "Succeeded", "Model", "Version", "MaxDiff", "mAP", "Promotion", "Age"]
    assert cols["Succeeded"]["jsonPath"] == '.status.conditions[?(@.type=="Succeeded")].status'
    assert cols["Age"]["type"] == "date"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    assert errors(obj) == []
    jobs.validate_spec(obj["spec"])  # the operator's own checks agree


def test_one_example_per_source_kind() -> None:
    uris = [yaml.safe_load(p.read_text())["spec"]["source"]["uri"] for p in EXAMPLES]
    kinds = {u.split(":")[0] + ("@" if "@" in u else "") for u in uris}
    assert kinds == {"models", "models@", "runs", "s3"}


@pytest.mark.parametrize("mutate, needle", [
    (lambda s: s["source"].update(uri="http://example.com/x.pt"), "does not match"),
    (lambda s: s["source"].update(sha256="abc"), "does not match"),
    (lambda s: s["conversion"].update(precision="int8"), "does not match"),
    (lambda s: s["conversion"].update(formats=["tflite"]), "is not one of"),
    (lambda s: s["conversion"].update(formats=[]), "should be non-empty"),
    (lambda s: s["conversion"].update(atol=0), "less than or equal to the minimum"),
    (lambda s: s["registry"].pop("modelName"), "'modelName' is a required property"),
    (lambda s: s["registry"].update(aliases=["no spaces"]), "does not match"),
    (lambda s: s["job"].update(backoffLimit=-1), "less than the minimum"),
    (lambda s: s.pop("source"), "'source' is a required property"),
])
def test_schema_rejects(mutate, needle: str) -> None:
    obj = yaml.safe_load((ROOT / "examples" / "conversion-models-version.yaml").read_text())
    mutate(obj["spec"])
    errs = errors(obj)
    assert errs and any(needle in e for e in errs), errs


def test_status_written_by_operator_fits_schema() -> None:
    """Every field the status logic writes is declared (a structural schema would prune it)."""
    now = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    body = yaml.safe_load((ROOT / "examples" / "conversion-models-version.yaml").read_text())
    body["metadata"].update(uid="u-1", generation=1)
    job = jobs.build_job(body, "img")
    job["metadata"]["uid"] = "job-uid"
    job["status"] = {"failed": 0, "succeeded": 1, "startTime": "2025-01-02T03:00:00Z",
                     "completionTime": "2025-01-02T03:04:00Z",
                     "conditions": [{"type": "Complete", "status": "True"}]}
    summary = {"outcome": "succeeded", "exitCode": 0, "modelName": "traffic-deploy", "version": "3",
               "modelUri": "models:/traffic-deploy/3", "aliases": ["champion"], "deploySha256": "ab" * 32,
               "paramsBefore": 2_000_000, "paramsAfter": 1_800_000, "maxAbsDiff": 1.5e-5,
               "bytesBefore": 6_000_000, "bytesAfter": 4_000_000}
    import json
    pod = {"metadata": {"creationTimestamp": "2025-01-02T03:00:00Z"}, "status": {"containerStatuses": [
        {"name": "convert", "state": {"terminated": {"exitCode": 0, "message": json.dumps(summary)}}}]}}
    new = st.observe({}, body["spec"], 1, job, [pod], now)
    failed = st.invalid(copy.deepcopy(new), 2, "bad", now)
    queued = st.queued({}, 1, 2, 4, 4, now)
    status_schema = SCHEMA["properties"]["status"]

    def undeclared(value, schema, where="status"):
        out = []
        if isinstance(value, dict):
            props = schema.get("properties", {})
            for k, v in value.items():
                if k not in props:
                    out.append(f"{where}.{k}")
                else:
                    out += undeclared(v, props[k], f"{where}.{k}")
        elif isinstance(value, list) and "items" in schema:
            for v in value:
                out += undeclared(v, schema["items"], where + "[]")
        return out

    for s in (new, failed, queued):
        assert undeclared(s, status_schema) == []
        assert errors({"spec": body["spec"], "status": s}) == []
