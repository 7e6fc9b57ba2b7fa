"""``spec.evaluation`` / ``spec.promotion`` of a ModelConversion: the Job's command line (which the CLI parses and
accepts), the operator's checks, ``status.result.metrics``/``promotion`` from the termination summary, and the
promotion metrics."""

from __future__ import annotations

import copy

import pytest
from prometheus_client import CollectorRegistry

from reparam import cli, summary
from reparam.operator import jobs
from reparam.operator.metrics import Metrics
from test_operator_jobs import body

EVAL = {"data": "s3://ml-data/shapes-val.zip", "imgsz": 320, "atol": 0.002}
PROMO = {"alias": "champion", "minMap": 0.4, "maxRegression": 0.002, "holdAlias": "challenger"}


def gated_body() -> dict:
    b = body(evaluation=dict(EVAL), promotion=dict(PROMO))
    b["spec"]["registry"]["aliases"] = ["latest-build"]
    return b


def test_command_maps_evaluation_and_promotion_to_the_cli_flags() -> None:
    cmd = jobs.build_job(gated_body(), "img")["spec"]["template"]["spec"]["containers"][0]["command"]
    joined = " ".join(cmd)
    for part in ("--eval-data s3://ml-data/shapes-val.zip", "--eval-imgsz 320", "--eval-atol 0.002",
                 "--promote champion", "--min-map 0.4", "--max-regression 0.002", "--hold-alias challenger",
                 "--alias latest-build"):
        assert part in joined
    args = cli.build_parser().parse_args(cmd[1:])
    cli._check_promotion(args)  # the converter accepts what the operator builds
    assert (args.promote, args.min_map, args.max_regression, args.hold_alias, args.eval_imgsz) == (
        "champion", 0.4, 0.002, "challenger", 320)


@pytest.mark.parametrize("change, needle", [
    ({"evaluation": None}, "spec.promotion needs spec.evaluation"),
    ({"promotion": {"alias": "latest"}}, "spec.promotion.alias"),
    ({"promotion": {"alias": "champion", "holdAlias": "champion"}}, "holdAlias must differ"),
    ({"promotion": {"alias": "latest-build"}}, "also in spec.registry.aliases"),
    ({"evaluation": {"data": ""}}, "spec.evaluation.data"),
])
def test_validate_spec_refuses_bad_gates(change: dict, needle: str) -> None:
    b = copy.deepcopy(gated_body())
    for k, v in change.items():
        if v is None:
            b["spec"].pop(k)
        else:
            b["spec"][k] = v
    with pytest.raises(jobs.InvalidSpec, match=needle):
        jobs.build_job(b, "img")


def test_summary_result_and_metrics() -> None:
    text = summary.dumps({"outcome": "succeeded", "modelName": "shapes", "version": "2",
                          "metrics": {"map50_95": 0.834, "map50": 0.994, "datasetDigest": "d" * 64},
                          "promotion": {"alias": "champion", "decision": "promoted", "reason": None,
                                        "previousVersion": "1"}})
    result = summary.result_fields(summary.parse(text))
    assert result["metrics"]["map50_95"] == 0.834 and result["promotion"]["previousVersion"] == "1"
    reg = CollectorRegistry()
    m = Metrics(reg)
    m.record_result(result)
    m.record_result({"modelName": "shapes", "metrics": {"map50_95": 0.5}, "promotion": {"decision": "held"}})
    assert reg.get_sample_value("reparam_promotions_total", {"decision": "promoted"}) == 1
    assert reg.get_sample_value("reparam_promotions_total", {"decision": "held"}) == 1
    assert reg.get_sample_value("reparam_last_map50_95", {"model": "shapes"}) == 0.5
