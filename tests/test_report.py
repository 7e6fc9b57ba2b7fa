"""The typed report (:mod:`reparam.report`): the one writer of ``report.json`` (issue 10, point 2).

A real conversion's report read back and written again gives the same text; the schema lists exactly the keys
the type writes; a key the type does not declare cannot be written; what is left out when (a failed conversion,
the idempotent no-op of ``--register``) is as the type documents.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import report_schema
from reparam import report as report_mod
from reparam.converter.convert import ConvertOptions, convert
from reparam.errors import ValidationFailedError
from reparam.report import (Artifact, DeviceCheck, DeviceUse, OnnxArtifact, Registry, Report, Source,
                            TorchScriptArtifact, Validation)


@pytest.fixture(scope="module")
def converted(fixtures: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Report]:
    out = tmp_path_factory.mktemp("report") / "out"
    report = convert(fixtures / "ckpt" / "yolov9-t-dual-best.pt", out,
                     ConvertOptions(imgsz=64, fuse=True, formats=("pt", "onnx", "torchscript")),
                     command=["reparam", "convert", "yolov9-t-dual-best.pt"])
    return out, report


def test_convert_returns_the_written_report(converted: tuple[Path, Report]) -> None:
    out, report = converted
    text = (out / "report.json").read_text()
    assert text == report_mod.dumps(report) + "\n"
    data = json.loads(text)
    assert list(data)[:4] == ["status", "command", "versions", "artifacts"] and list(data)[-1] == "deploy_config"
    assert [type(a) for a in report.artifacts] == [Artifact, OnnxArtifact, TorchScriptArtifact]
    onnx = data["artifacts"][1]
    assert list(onnx) == ["name", "format", "dtype", "opset", "dynamic", "nms", "input", "inputs", "outputs",
                          "check", "sha256", "bytes", "path"]
    assert onnx["nms"] is None and "nms" not in data["artifacts"][2]  # null without --nms; TorchScript has none
    assert "check" not in data["artifacts"][0]  # a weight file has no export check
    assert data["validation"]["devices"][0]["used"] == "cpu" and data["device"]["used"] == "cpu"
    assert data["params"] == {"before": report.params_before, "after": report.params_after}
    assert data["params"]["after"] < data["params"]["before"]
    assert report.duration_s == data["timing"]["total_s"] > 0


def test_a_written_report_reads_back_to_the_same_text(converted: tuple[Path, Report]) -> None:
    out, _report = converted
    text = (out / "report.json").read_text()
    again = Report.from_dict(json.loads(text))
    assert report_mod.dumps(again) + "\n" == text
    assert again.validation.devices and isinstance(again.validation.devices[0], DeviceCheck)
    assert again.validation.comparisons[0].model == "deploy" and again.validation.comparisons[-1].model == "fused"


def _full() -> Report:
    """A report with every field set (no ``None``)."""
    return Report(
        status="succeeded", command=["reparam"], versions={"reparam": "0", "python": "3"},
        artifacts=[Artifact(name="m.pt", format="pt", dtype="float16", sha256="a" * 64, bytes=10, path="/o/m.pt")],
        source=Source(uri="m.pt", sha256="b" * 64, bytes=20, kind="local", lineage={}, warnings=[], path="/m.pt"),
        variant="yolov9-t", model_class="DetectionModel", package_prefix="", head={"dual": "A", "deploy": "B"},
        pruned=True, nc=1, names={"0": "a"}, stride=[8.0], weights_used="model", state_dict={},
        ema_vs_raw_max_abs_diff=0.0, layers={"dual": 2, "deploy": 1, "dropped": [1], "map": {"0": 0}},
        tensors={"dual": 2}, params_before=2, params_after=1, gflops={"before": 2.0, "after": 1.0}, gflops_imgsz=64,
        removed={}, validation=Validation(passed=True, max_abs_diff=0.0, atol=1e-4, imgsz=64, seed=0,
                                          devices=[DeviceCheck("cpu", "cpu", "x", 0.0, True)]),
        device=DeviceUse("cpu", "cpu", "x"), fusion={}, options={}, settings_key="k", published_config={},
        timing={"total_s": 1.0}, threads=1, evaluation={}, deploy_sha256="a" * 64,
        bytes={"before": 20, "after": 10, "saved": 10}, stale_outputs=[],
        registry=Registry(model_name="m", version="1", model_uri="models:/m/1", tracking_uri="http://x"),
        promotion={}, outputs_kept=True, deploy_config={"nc": 1, "backbone": [], "head": []},
    )


def test_the_schema_lists_exactly_the_keys_the_type_writes() -> None:
    data = json.loads(report_mod.dumps(_full()))
    assert set(data) == set(report_mod.schema()["properties"])
    assert report_schema.problem(data) is None
    assert report_schema.problem({**data, "duration_s": 1.0}) is not None  # an undeclared key fails the schema


def test_a_key_the_type_does_not_declare_cannot_be_written() -> None:
    with pytest.raises(TypeError, match="duration_s"):
        Report(status="succeeded", source=Source(uri="m.pt"), validation=Validation(passed=True, max_abs_diff=0.0),
               duration_s=1.0)  # type: ignore[call-arg]  # the point of the test: no such field
    with pytest.raises(TypeError, match="credentials"):
        Source(**{"uri": "s3://b/k", "credentials": "secret"})


def test_what_a_failed_conversion_leaves_out(fixtures: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValidationFailedError) as info:
        convert(fixtures / "ckpt" / "yolov9-t-dual-best.pt", out, ConvertOptions(imgsz=64, fuse=True, atol=1e-12))
    report = info.value.report
    assert isinstance(report, Report) and report.status == "validation_failed" and not report.validation.passed
    data = json.loads((out / "report.json").read_text())
    assert data == report.to_dict() and data["stale_outputs"] == []
    assert not {"artifacts", "deploy_sha256", "bytes", "evaluation", "registry"} & set(data)
    assert data["fusion"]["max_abs_diff_vs_dual"] > 1e-12 and data["state_dict"] is None  # null, written


def test_the_no_op_report_of_register_writes_only_what_the_tags_give() -> None:
    report = Report(status="succeeded", command=["reparam"], versions={"reparam": "0", "python": "3"},
                    source=Source(uri="m.pt", sha256="b" * 64, bytes=20, kind="local", lineage={}, warnings=[]),
                    reused=True, deploy_sha256="a" * 64, params_before=2, params_after=1, variant="yolov9-t", nc=1,
                    validation=Validation(passed=True, max_abs_diff=3e-5),
                    registry=Registry(model_name="m", version="1", model_uri="models:/m/1", existing=True))
    data = report.to_dict()
    assert list(data) == ["status", "command", "versions", "source", "variant", "nc", "params", "validation",
                          "timing", "deploy_sha256", "registry"]
    assert data["validation"] == {"passed": True, "max_abs_diff": 3e-5}
    assert "tracking_uri" not in data["registry"] and "path" not in data["source"]
    assert report_schema.problem(data) is None
