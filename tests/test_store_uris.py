"""Pure parts of the store: URI parsing, redaction, idempotency key, promotion rule, version tags."""

from __future__ import annotations

import pytest

from reparam.errors import InvalidInputError
from reparam.report import Report
from reparam.store.promotion import RULES, check_aliases, decide, version_problem
from reparam.store.registry import idempotency_key, run_metrics, version_tags
from reparam.store.uris import parse_source, redact


@pytest.mark.parametrize(
    "uri, kind, fields",
    [
        ("./best.pt", "local", {"path": "./best.pt"}),
        ("file:///data/best.pt", "local", {"path": "/data/best.pt"}),
        ("s3://ml-ckpts/traffic/best.pt", "s3", {"bucket": "ml-ckpts", "key": "traffic/best.pt"}),
        ("models:/traffic-dual/7", "models", {"model_name": "traffic-dual", "version": "7", "alias": None}),
        ("models:/traffic-dual@candidate", "models", {"model_name": "traffic-dual", "alias": "candidate"}),
        ("models:/traffic-dual/7/weights/last.pt", "models", {"version": "7", "path": "weights/last.pt"}),
        ("runs:/0123abcd/weights/best.pt", "runs", {"run_id": "0123abcd", "path": "weights/best.pt"}),
        ("https://mlflow.example/get-artifact?path=best.pt", "http", {"url": "https://mlflow.example/get-artifact?path=best.pt"}),
    ],
)
def test_parse_source(uri, kind, fields):
    ref = parse_source(uri)
    assert ref.kind == kind and ref.uri == uri
    for k, v in fields.items():
        assert getattr(ref, k) == v


@pytest.mark.parametrize(
    "uri, hint",
    [
        ("", "empty"),
        ("models:/traffic-dual", "models:/<name>/<version>"),
        ("models:/traffic-dual/latest", "models:/<name>/<version>"),
        ("runs:/abc", "runs:/<run_id>/<artifact path>"),
        ("s3://bucket-only", "s3://<bucket>/<key"),
        ("s3://b/dir/", "s3://<bucket>/<key"),
        ("gs://b/k.pt", "unsupported source scheme 'gs'"),
        ("file://otherhost/x.pt", "remote host"),
    ],
)
def test_parse_source_rejects_malformed(uri, hint):
    with pytest.raises(InvalidInputError, match=hint.replace("(", r"\(")) as ei:
        parse_source(uri)
    assert ei.value.exit_code == 2


def test_malformed_uri_message_is_redacted():
    with pytest.raises(InvalidInputError) as ei:
        parse_source("ftp://joe:hunter22@host/x.pt")
    assert "hunter22" not in str(ei.value)


def test_redact(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "plain-looking-secret")
    text = (
        "GET https://joe:hunter22@mlflow.local/x and "
        "https://b.s3.amazonaws.com/best.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101"
        "&X-Amz-Signature=0badc0ffee&X-Amz-Security-Token=tok123 key AKIAIOSFODNN7EXAMPLE secret plain-looking-secret "
        "Authorization: Bearer abc.def.ghi password=pw1"
    )
    out = redact(text)
    for secret in ("hunter22", "AKIAIOSFODNN7EXAMPLE", "0badc0ffee", "tok123", "plain-looking-secret", "abc.def.ghi",
                   "pw1"):
        assert secret not in out
    assert "https://***@mlflow.local/x" in out and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in out
    assert redact("models:/traffic-dual/7 s3://ml-ckpts/best.pt") == "models:/traffic-dual/7 s3://ml-ckpts/best.pt"


def test_idempotency_key_depends_on_source_and_settings_only():
    a = idempotency_key("ab" * 32, {"variant": "yolov9-t", "fuse": True})
    assert a == idempotency_key("ab" * 32, {"fuse": True, "variant": "yolov9-t"})
    assert len(a) == 64 and int(a, 16) >= 0
    assert a != idempotency_key("cd" * 32, {"variant": "yolov9-t", "fuse": True})
    assert a != idempotency_key("ab" * 32, {"variant": "yolov9-t", "fuse": False})


READY = {"reparam.status": "ready", "reparam.validation_passed": "true"}


@pytest.mark.parametrize(
    "aliases, passed, status, tags, expect, reason, rule",
    [
        (["champion"], True, "READY", READY, ["champion"], None, None),
        (["champion", "prod", "champion"], True, "READY", READY, ["champion", "prod"], None, None),
        ([], True, "READY", READY, [], "no alias", "requested"),
        (["champion"], False, "READY", READY, [], "validation did not pass", "validation"),
        (["champion"], True, "READY", {**READY, "reparam.status": "pending"}, [], "not ready", "version_complete"),
        (["champion"], True, "READY", {**READY, "reparam.status": "failed"}, [], "not ready", "version_complete"),
        (["champion"], True, "READY", {"reparam.status": "ready"}, [], "not marked validated", "version_complete"),
        # MLflow's own status counts as well as our tags
        (["champion"], True, "FAILED_REGISTRATION", READY, [], "MLflow status is FAILED_REGISTRATION",
         "version_complete"),
        (["champion"], True, "PENDING_REGISTRATION", READY, [], "MLflow status is PENDING_REGISTRATION",
         "version_complete"),
        (["champion"], True, None, READY, [], "MLflow status is None", "version_complete"),
    ],
)
def test_promotion_rule(aliases, passed, status, tags, expect, reason, rule):
    d = decide(aliases, validation_passed=passed, version_status=status, version_tags=tags)
    assert d.aliases == expect and d.rule == rule and d.allowed is (reason is None)
    assert (d.reason is None) if reason is None else (reason in d.reason)


def test_reuse_and_promotion_share_one_completeness_rule():
    assert version_problem("READY", READY) is None
    assert version_problem("FAILED_REGISTRATION", READY) == "MLflow status is FAILED_REGISTRATION (not READY)"
    assert version_problem("READY", {}) == "version is not ready (reparam.status=None)"
    assert [(name, reads) for name, _, reads in RULES] == [
        ("requested", False), ("validation", False), ("evaluated", False), ("artifacts", False), ("min_map", False),
        ("version_complete", True), ("champion_unmeasured", True), ("regression", True)]
    early = decide(["champion"], validation_passed=True, version_status=None, version_tags=None, version_known=False)
    assert early.allowed and early.aliases == ["champion"]


@pytest.mark.parametrize("bad", ["latest", "v3", "has space", "a/b", ""])
def test_alias_names_checked(bad):
    with pytest.raises(InvalidInputError, match="invalid alias"):
        check_aliases([bad])


REPORT = {
    "status": "succeeded",
    "validation": {"passed": True, "max_abs_diff": 3.0e-5},
    "variant": "yolov9-t",
    "nc": 3,
    "params": {"before": 2_700_000, "after": 2_000_000},
    "source": {"uri": "https://joe:pw9x@host/best.pt", "sha256": "ab" * 32, "bytes": 6_000_000},
    "artifacts": [{"name": "best.pt", "path": "/o/best.pt", "format": "pt", "sha256": "cd" * 32, "bytes": 4_400_000}],
    "deploy_sha256": "cd" * 32,
}


def test_version_tags_and_metrics():
    tags = version_tags(Report.from_dict(REPORT), tags={"team": "vision"}, lineage={"source_run_id": "r1", "x": None},
                        idempotency_key="k")
    assert tags["reparam.source_uri"] == "https://***@host/best.pt"
    assert tags["reparam.nc"] == "3" and tags["reparam.max_abs_diff"] == "3e-05"
    assert tags["reparam.validation_passed"] == "true" and tags["reparam.source_run_id"] == "r1"
    assert "reparam.x" not in tags and tags["team"] == "vision"
    assert all(isinstance(v, str) for v in tags.values())
    with pytest.raises(InvalidInputError, match="tag 'reparam.status' is reserved"):
        version_tags(Report.from_dict(REPORT), tags={"reparam.status": "ready"}, lineage={}, idempotency_key="k")
    assert run_metrics(Report.from_dict({**REPORT, "timing": {"total_s": 2}})) == {
        "max_abs_diff": 3.0e-5, "params_before": 2.7e6, "params_after": 2e6,
        "bytes_before": 6e6, "bytes_after": 4.4e6, "duration_s": 2.0,
    }  # fmt: skip
    with pytest.raises(ValueError, match="report status"):  # a report is read through reparam.report.Report
        Report.from_dict({k: v for k, v in REPORT.items() if k != "status"})
