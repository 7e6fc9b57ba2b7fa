"""The pure promotion gates of ``--promote`` (rules 5-8 of :mod:`reparam.store.promotion`) and the report helpers of
:mod:`reparam.store.champion` that feed them, without a registry."""

from __future__ import annotations

import pytest

from reparam import summary
from reparam.report import Report, Source, Validation
from reparam.store.champion import eval_tags, measured_from_report, measured_from_tags
from reparam.store.promotion import RULES, Gates, Measured, decide

DIGEST = "a" * 64
READY = {"status": "READY", "tags": {"reparam.status": "ready", "reparam.validation_passed": "true"}}


def gated(measured=Measured(DIGEST, 160, 0.80, 0.95), *, gates=Gates(), holder=None, holder_measured=None,
          passed=True, artifacts_passed=True, version="2"):
    return decide(["champion"], validation_passed=passed, version_status=READY["status"], version_tags=READY["tags"],
                  gates=gates, measured=measured, artifacts_passed=artifacts_passed, holder=holder,
                  holder_measured=holder_measured, version=version)


def test_rule_order_puts_the_cheap_gates_before_the_registry_reads():
    names = [n for n, _r, _v in RULES]
    assert names == ["requested", "validation", "evaluated", "artifacts", "min_map", "version_complete",
                     "champion_unmeasured", "regression"]
    assert [n for n, _r, reads in RULES if reads] == ["version_complete", "champion_unmeasured", "regression"]


@pytest.mark.parametrize("kwargs, rule, reason_part", [
    ({"passed": False}, "validation", "validation did not pass"),
    ({"measured": None}, "evaluated", "--eval-data"),
    ({"artifacts_passed": False}, "artifacts", "--eval-atol"),
    ({"gates": Gates(min_map=0.81)}, "min_map", "below --min-map 0.81"),
    ({"holder": "1", "holder_measured": None}, "champion_unmeasured", "no evaluation on dataset aaaaaaaaaaaa"),
    ({"holder": "1", "holder_measured": Measured("b" * 64, 160, 0.1)}, "champion_unmeasured", "no evaluation"),
    ({"holder": "1", "holder_measured": Measured(DIGEST, 640, 0.1)}, "champion_unmeasured", "at 160 px"),
    ({"holder": "1", "holder_measured": Measured(DIGEST, 160, 0.8001)}, "regression",
     "regression: mAP@0.5:0.95 0.8000"),
    ({"holder": "1", "holder_measured": Measured(DIGEST, 160, 0.83), "gates": Gates(max_regression=0.02)},
     "regression", "by 0.0300 (> --max-regression 0.02)"),
])
def test_each_gate_holds_with_its_reason(kwargs, rule, reason_part):
    d = gated(**kwargs)
    assert not d.allowed and d.aliases == []
    assert d.rule == rule
    assert reason_part in d.reason


@pytest.mark.parametrize("kwargs", [
    {},  # first version: no holder, gates (a)-(c) only
    {"gates": Gates(min_map=0.80)},  # the bound is inclusive
    {"holder": "1", "holder_measured": Measured(DIGEST, 160, 0.80)},  # equal is not worse
    {"holder": "1", "holder_measured": Measured(DIGEST, 160, 0.81), "gates": Gates(max_regression=0.01)},
    {"holder": "2", "holder_measured": None},  # it already holds the alias itself
])
def test_gates_pass(kwargs):
    d = gated(**kwargs)
    assert d.allowed and d.aliases == ["champion"], d.reason


def test_ungated_alias_ignores_the_gates():
    d = decide(["stable"], validation_passed=True, version_status="READY", version_tags=READY["tags"],
               measured=None, artifacts_passed=False, holder="1")
    assert d.allowed and d.aliases == ["stable"]


def test_early_decision_refuses_on_min_map_without_the_registry():
    d = decide(["champion"], validation_passed=True, version_status=None, version_tags=None, version_known=False,
               gates=Gates(min_map=0.9), measured=Measured(DIGEST, 160, 0.5))
    assert d.rule == "min_map"


def report(artifacts, dual=0.70, evaluated=True):
    """A passed conversion's report, with an evaluation section of ``artifacts`` (none: ``evaluated`` False)."""
    ev = {"dataset": {"digest": DIGEST}, "settings": {"imgsz": 160}, "dual": {"map50_95": dual, "map50": 0.9},
          "artifacts": artifacts}
    return Report(status="succeeded", source=Source(uri="best.pt"),
                  validation=Validation(passed=True, max_abs_diff=0.0), evaluation=ev if evaluated else None)


def test_measured_from_report_prefers_the_deploy_pt_and_collects_artifact_results():
    m, ok = measured_from_report(report([{"format": "fused", "map50_95": 0.6, "passed": True},
                                         {"format": "pt", "map50_95": 0.71, "map50": 0.91, "passed": True},
                                         {"format": "onnx", "skipped": "end-to-end graph", "passed": None}]))
    assert m == Measured(DIGEST, 160, 0.71, 0.91) and ok is True
    m, ok = measured_from_report(report([{"format": "onnx", "map50_95": 0.5, "passed": False}]))
    assert m == Measured(DIGEST, 160, 0.70, 0.9) and ok is False
    assert measured_from_report(report([], evaluated=False)) == (None, True)


def test_eval_tags_round_trip():
    m = Measured(DIGEST, 160, 0.8340123456789, 0.97)
    tags = eval_tags(m)
    assert tags["reparam.eval.digest"] == DIGEST and tags["reparam.eval.imgsz"] == "160"
    assert measured_from_tags(tags) == m
    assert measured_from_tags(tags, DIGEST, 160) == m
    assert measured_from_tags(tags, DIGEST, 640) is None and measured_from_tags(tags, "b" * 64, 160) is None
    other = Measured("b" * 64, 160, 0.5, None)
    both = {**tags, **eval_tags(other)}  # a second dataset keeps the first one's result
    assert measured_from_tags(both, DIGEST, 160) == m and measured_from_tags(both, "b" * 64, 160) == other
    assert measured_from_tags({**tags, "reparam.eval.map50_95": "x"}) is None
    assert measured_from_tags({}) is None


def test_summary_carries_metrics_and_promotion():
    s = {"outcome": "succeeded", "metrics": {"map50_95": 0.83, "map50": 0.97, "datasetDigest": DIGEST},
         "promotion": {"alias": "champion", "decision": "held", "reason": "regression: " + "x" * 5000,
                       "previousVersion": "1"}}
    text = summary.dumps(s)
    assert len(text.encode()) <= summary.MAX_BYTES
    back = summary.result_fields(summary.parse(text))
    assert back["metrics"]["map50_95"] == 0.83 and back["promotion"]["decision"] == "held"
    assert back["promotion"]["reason"].startswith("regression: ")


def test_human_summary_line_names_decision_map_and_previous_version():
    from reparam.cli import _promotion_line

    held = {"alias": "champion", "decision": "held", "map50_95": 0.4637, "previous_version": "2",
            "previous_map50_95": 0.8342, "reason": "regression: ...", "hold_alias": "challenger"}
    assert _promotion_line(held) == ["  promotion    @champion: HELD, mAP@0.5:0.95 0.4637 vs version 2 (0.8342); "
                                     "reason: regression: ...; @challenger set"]
    first = {"alias": "champion", "decision": "promoted", "map50_95": 0.8342, "previous_version": None}
    assert _promotion_line(first) == ["  promotion    @champion: PROMOTED, mAP@0.5:0.95 0.8342 (first holder)"]
    assert _promotion_line(None) == []
