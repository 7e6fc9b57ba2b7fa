"""Fusion, ONNX (plain, --dynamic, --nms, --half) and TorchScript export on the shared fixture checkpoints.

References: ``reference/<ckpt>-io.safetensors`` (``converted.y``, ``converted_fused.y`` on ``input-640``), the
official ONNX export of converted yolov9-t and onnxruntime's output on it (``ort.output0``).
Tests that do not compare with the 640 references run at small image sizes to stay fast.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file

from reparam.converter.checkpoint import read_checkpoint
from reparam.converter.convert import ConvertOptions, build_model, prune
from reparam.hashing import hash_file
from reparam.converter.export import (EXPORT_DEFAULTS, EndToEnd, ExportOptions, Predictions, compare_detections,
                                      export_all, export_onnx, export_torchscript, run_onnx)
from reparam.converter.export.checks import run_checks
from reparam.models import fuse_model
from reparam.converter.export.nms import NMS_OUTPUTS, NMSHead, nms_indices, reference_detections, xywh2xyxy
from reparam.converter.pruning import derive_deploy_plan
from reparam.errors import InvalidInputError, ValidationFailedError
from reparam.report import Report, Source, Validation

REPO = Path(__file__).resolve().parents[1]
T = "yolov9-t-dual-best"


@pytest.fixture(scope="module")
def models(fixtures: Path):
    """name -> (dual or None, deploy), built once per module from the fixture checkpoint (fp32, eval)."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            ck = read_checkpoint(fixtures / "ckpt" / f"{name}.pt")
            plan = derive_deploy_plan(ck.cfg)
            if not plan.pruned:
                cache[name] = (None, build_model(ck.cfg, ck.nc, ck.names, ck.state_dict))
            else:
                pruned = prune(ck.cfg, ck.nc, ck.names, ck.state_dict)  # the converter's rule, exactness checked
                cache[name] = (pruned.dual.float().eval(), pruned.deploy.float().eval())
        return cache[name]

    return get


@pytest.fixture(scope="module")
def image(fixtures: Path) -> torch.Tensor:
    return load_file(str(fixtures / "reference" / "input-640.safetensors"))["input"]


def _ref(fixtures: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(fixtures / "reference" / f"{name}-io.safetensors"))


@pytest.mark.parametrize("name", [T, "gelan-t"])
def test_fuse_matches_official_fused_output(name, models, fixtures, image):
    _, deploy = models(name)
    fused = fuse_model(copy.deepcopy(deploy)).eval()
    with torch.no_grad():
        y = fused(image)[0]
    ref = _ref(fixtures, name)
    assert y.shape == ref["converted_fused.y"].shape
    assert float((y - ref["converted_fused.y"]).abs().max()) <= 1e-4
    assert float((y - ref["converted.y"]).abs().max()) <= 1e-4
    assert sum(1 for _ in fused.modules()) < sum(1 for _ in deploy.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())


@pytest.mark.parametrize("name", [T])
def test_onnx_like_official_export(name, models, fixtures, image, tmp_path):
    _, deploy = models(name)
    fused = fuse_model(copy.deepcopy(deploy)).eval()
    path = tmp_path / "m.onnx"
    proto = export_onnx(Predictions(fused), path, image, opset=17,
                        metadata={"names": str({int(k): v for k, v in deploy.names.items()}), "stride": "32"})
    assert [o.name for o in proto.graph.output] == ["output0"]
    got = run_onnx(path, image)
    assert len(got) == 1
    ref = _ref(fixtures, name)
    assert float((got[0] - ref["converted_fused.y"]).abs().max()) <= 1e-3
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert ast.literal_eval(meta["names"]) == {int(k): v for k, v in deploy.names.items()}
    if name == T:
        official = onnx.load(str(fixtures / "reference" / f"{T}-converted.onnx"))
        off_out = official.graph.output
        assert [o.name for o in off_out] == [o.name for o in proto.graph.output]
        dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
        assert dims(off_out[0]) == dims(proto.graph.output[0]) == [1, 4 + deploy.nc, 8400]
        ort_io = fixtures / "reference" / f"{T}-converted-onnx-ort-io.safetensors"
        # the README lists onnxruntime's output of the official ONNX; when the file is absent, run it here
        theirs = (load_file(str(ort_io))["ort.output0"] if ort_io.is_file()
                  else run_onnx(fixtures / "reference" / f"{T}-converted.onnx", image)[0])
        assert got[0].shape == theirs.shape
        assert float((got[0] - theirs).abs().max()) <= 1e-3


def _graph_shapes(values) -> dict[str, list]:
    """name -> shape as the ONNX graph declares it (symbolic dims by name)."""
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def test_onnx_dynamic_batch_and_size(models, tmp_path):
    _, deploy = models(T)
    pred = Predictions(deploy)
    path = tmp_path / "d.onnx"
    g = torch.Generator().manual_seed(1)
    export_onnx(pred, path, torch.rand(1, 3, 128, 128, generator=g), dynamic=True, opset=13)
    graph = onnx.load(str(path)).graph
    assert deploy.nc == 3
    # only batch, height/width and anchors are symbolic; 4 + nc is static (tools read shape[1])
    assert _graph_shapes(graph.input) == {"images": ["batch", 3, "height", "width"]}
    assert _graph_shapes(graph.output) == {"output0": ["batch", 7, "anchors"]}
    static = tmp_path / "s.onnx"
    export_onnx(pred, static, torch.rand(1, 3, 128, 128, generator=g), opset=13)
    assert _graph_shapes(onnx.load(str(static)).graph.output) == {"output0": [1, 7, 16 * 16 + 8 * 8 + 4 * 4]}
    for shape in [(1, 3, 128, 128), (2, 3, 96, 160)]:
        x = torch.rand(*shape, generator=g)
        with torch.no_grad():
            want = pred(x)
        got = run_onnx(path, x)[0]
        assert got.shape == want.shape == (shape[0], 4 + deploy.nc, (shape[2] * shape[3]) // 64 * 21 // 16)
        assert float((got - want).abs().max()) <= 1e-3


def test_torch_nms_twin_semantics():
    # the torch twin of the ONNX operator (used when tracing): per class, strict thresholds, per-class cap
    boxes = torch.tensor([[[0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60]]], dtype=torch.float32)
    scores = torch.tensor([[[0.9, 0.8, 0.3], [0.0, 0.7, 0.1]]])
    sel = nms_indices(boxes, scores, 10, 0.5, 0.2)
    assert sel.tolist() == [[0, 0, 0], [0, 0, 2], [0, 1, 1]]
    assert nms_indices(boxes, scores, 10, 0.95, 0.2).tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 1]]
    assert nms_indices(boxes, scores, 1, 0.5, 0.2).tolist() == [[0, 0, 0], [0, 1, 1]]


def _crafted() -> torch.Tensor:
    """``y [2, 4 + 3, 6]``: high scores, boxes with two classes above 0.25, overlapping boxes (IoU 0.905), a box
    identical to another but with another best class, a box below the threshold; image 1 has no candidate."""
    xywh = [[50, 50, 40, 40], [52, 50, 40, 40], [150, 150, 20, 20], [151, 150, 20, 20], [300, 300, 10, 10],
            [50, 50, 40, 40]]
    cls = [[0.90, 0.80, 0.10], [0.85, 0.30, 0.05], [0.60, 0.00, 0.70], [0.10, 0.64, 0.65], [0.20, 0.20, 0.20],
           [0.50, 0.95, 0.00]]
    y0 = torch.cat([torch.tensor(xywh, dtype=torch.float32), torch.tensor(cls)], 1).T
    y1 = y0.clone()
    y1[4:] = 0.1
    return torch.stack([y0, y1])


XYXY = {0: (30.0, 30.0, 70.0, 70.0), 2: (140.0, 140.0, 160.0, 160.0), 3: (141.0, 140.0, 161.0, 160.0),
        5: (30.0, 30.0, 70.0, 70.0)}
# (label, score, anchor) by decreasing score; worked out by hand from _crafted() with IoU 0.45, score 0.25
BEST_CLASS = [(1, 0.95, 5), (0, 0.90, 0), (2, 0.70, 2)]
MULTI_LABEL = [(1, 0.95, 5), (0, 0.90, 0), (2, 0.70, 2), (1, 0.64, 3), (0, 0.60, 2)]


def _detections(outputs) -> list[list[tuple]]:
    n, b, s, lab = (t.detach().cpu() for t in outputs)
    return [[(int(lab[i, j]), round(float(s[i, j]), 5), tuple(float(v) for v in b[i, j])) for j in range(int(n[i, 0]))]
            for i in range(n.shape[0])]


def _expected(rows, max_det):
    return [[(lab, score, XYXY[a]) for lab, score, a in rows[:max_det]], []]


@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize("max_det", [10, 4, 2])
def test_nms_semantics_on_crafted_predictions(multi_label, max_det, tmp_path):
    y = _crafted()
    want = _expected(MULTI_LABEL if multi_label else BEST_CLASS, max_det)
    boxes = xywh2xyxy(y[:, :4].transpose(1, 2))
    ref = reference_detections(boxes, y[:, 4:], iou_thres=0.45, score_thres=0.25, max_det=max_det,
                               multi_label=multi_label)
    assert _detections(ref) == want
    head = NMSHead(0.45, 0.25, max_det, multi_label=multi_label)
    path = tmp_path / "nms.onnx"
    proto = export_onnx(head, path, y, dynamic=True)
    assert _graph_shapes(proto.graph.output) == {"num_dets": ["batch", 1], "boxes": ["batch", max_det, 4],
                                                 "scores": ["batch", max_det], "labels": ["batch", max_det]}
    got = run_onnx(path, y)
    assert _detections(got) == want
    assert got[3][1].tolist() == [-1] * max_det and got[2][1].tolist() == [0.0] * max_det
    with torch.no_grad():
        assert _detections(head(y)) == want  # the traced torch twin agrees too


def test_reference_nms_is_strict_at_thresholds():
    # IoU exactly 0.5 with iou_thres 0.5 does not suppress; a score equal to the threshold is not a candidate
    boxes = torch.tensor([[[0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30]]], dtype=torch.float32)
    scores = torch.tensor([[[0.9, 0.8, 0.25]]])
    n, b, s, lab = reference_detections(boxes, scores, iou_thres=0.5, score_thres=0.25, max_det=5, multi_label=False)
    assert n.tolist() == [[2]] and lab.tolist() == [[0, 0, -1, -1, -1]]
    n, *_ = reference_detections(boxes, scores, iou_thres=0.49, score_thres=0.25, max_det=5, multi_label=False)
    assert n.tolist() == [[1]]


def test_onnx_nms_matches_reference(models, tmp_path):
    _, deploy = models(T)
    pred = Predictions(deploy)
    # this barely trained model scores ~1e-3 everywhere; 0.002 keeps only clear maxima (well-conditioned)
    e2e = EndToEnd(pred, NMSHead(iou_thres=0.45, score_thres=0.002, max_det=50))
    path = tmp_path / "e2e.onnx"
    g = torch.Generator().manual_seed(0)
    proto = export_onnx(e2e, path, torch.rand(1, 3, 320, 320, generator=g), dynamic=True)
    assert [o.name for o in proto.graph.output] == list(NMS_OUTPUTS)
    assert any(n.op_type == "NonMaxSuppression" for n in proto.graph.node)
    x = torch.rand(2, 3, 320, 320, generator=g)
    with torch.no_grad():
        y = pred(x)
    got = run_onnx(path, x)
    assert [tuple(t.shape) for t in got] == [(2, 1), (2, 50, 4), (2, 50), (2, 50)]
    assert int(got[0].min()) > 0  # not a trivial comparison
    boxes = xywh2xyxy(y[:, :4].transpose(1, 2))
    want = reference_detections(boxes, y[:, 4:], iou_thres=0.45, score_thres=0.002, max_det=50, multi_label=False)
    d, why = compare_detections(want, got, 1e-3)
    assert not why and d <= 1e-3
    for i in range(2):
        k = int(got[0][i, 0])
        assert torch.all(got[3][i, :k] >= 0) and torch.all(got[3][i, k:] == -1)
        assert torch.all(got[2][i, :k] > 0.002) and torch.all(got[2][i, k:] == 0)
        assert torch.all(got[2][i, :k - 1] >= got[2][i, 1:k])  # sorted by score
        for j in range(k):  # each kept box is a prediction whose best class is the label, with that score
            a = int(((boxes[i] - got[1][i, j]).abs().amax(-1)).argmin())
            assert float((boxes[i, a] - got[1][i, j]).abs().max()) <= 1e-3
            assert int(y[i, 4:, a].argmax()) == int(got[3][i, j])
            assert abs(float(y[i, 4 + int(got[3][i, j]), a]) - float(got[2][i, j])) <= 1e-4


def _confident(deploy, boost: float = 7.5):
    """A copy of ``deploy`` whose classes 0 and 1 score high (~0.9) on every anchor: class biases raised."""
    model = copy.deepcopy(deploy)
    for branch in model.model[-1].cv3:
        branch[-1].bias.data[:2] += boost
    return model


def _report(**fields) -> Report:
    """The report so far that export_all reads (source sha256, variant) and adds its timings to."""
    return Report(**{"status": "succeeded", "source": Source(uri=""),
                     "validation": Validation(passed=True, max_abs_diff=0.0), **fields})


@pytest.mark.parametrize("multi_label", [False, True])
def test_export_all_nms_high_scores(models, tmp_path, multi_label):
    _, deploy = models(T)
    model = fuse_model(_confident(deploy)).eval()
    onnx_opts = {"nms": True, "multi_label": multi_label, "max_det": 30, "dynamic": True}
    opts = ConvertOptions(fuse=True, formats=("onnx",), imgsz=64, onnx=onnx_opts)
    arts = [a.to_dict() for a in export_all(model, None, tmp_path, "m", opts, _report(), lambda _m: None)]
    (art,) = arts
    check = art["check"]
    assert check["passed"] is True, check
    assert art["nms"]["semantics"] == ("multi-label" if multi_label else "best-class")
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / art["name"])).metadata_props}
    assert json.loads(meta["nms"])["multi_label"] is multi_label
    assert ("multi-label" if multi_label else "best class") in meta["output"]
    for run in check["runs"]:
        assert run["num_dets"] == run["reference_num_dets"] and min(run["num_dets"]) >= 5  # many detections
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    got = run_onnx(tmp_path / art["name"], x)
    per_image = [got[1][i, :int(got[0][i, 0])].tolist() for i in range(2)]
    labels = [lab for i in range(2) for lab in got[3][i, :int(got[0][i, 0])].tolist()]
    assert set(labels) <= {0, 1, 2} and 0 in labels and 1 in labels
    repeated = [len(boxes) - len({tuple(b) for b in boxes}) for boxes in per_image]
    if multi_label:  # some box comes out once per class
        assert sum(repeated) > 0
    else:  # one detection per box
        assert repeated == [0, 0]


def test_torchscript_roundtrip(models, tmp_path):
    _, deploy = models(T)
    pred = Predictions(fuse_model(copy.deepcopy(deploy)))
    path = tmp_path / "m.torchscript"
    g = torch.Generator().manual_seed(2)
    export_torchscript(pred, path, torch.rand(1, 3, 128, 128, generator=g),
                       metadata={"stride": "32", "names": "{0: 'red', 1: 'green', 10: 'blue'}"})
    extra = {"config.txt": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    # read as the official DetectMultiBackend reads it: JSON, digit keys back to ints, stride an int, names by id
    config = json.loads(extra["config.txt"],
                        object_hook=lambda d: {int(k) if k.isdigit() else k: v for k, v in d.items()})
    assert int(config["stride"]) == 32 and config["names"] == {0: "red", 1: "green", 10: "blue"}
    assert config["shape"] == [1, 3, 128, 128] and config["device"] == "cpu"
    for shape in [(1, 3, 128, 128), (2, 3, 96, 160)]:
        x = torch.rand(*shape, generator=g)
        with torch.no_grad():
            assert float((loaded(x) - pred(x)).abs().max()) <= 1e-4


def test_export_all_half(models, fixtures, tmp_path):
    dual, deploy = models(T)
    fused = fuse_model(copy.deepcopy(deploy)).eval()
    opts = ConvertOptions(half=True, fuse=True, formats=("onnx", "torchscript"), imgsz=64)
    report = _report(source=Source(uri="", sha256="ab"), variant="yolov9-t")
    arts = [a.to_dict() for a in export_all(fused, dual, tmp_path, "m", opts, report, lambda _m: None)]
    assert [a["format"] for a in arts] == ["onnx", "torchscript"]
    for a in arts:
        assert a["dtype"] == "float16" and a["check"]["passed"] is True, a["check"]
        kinds = [r["precision"] for r in a["check"]["runs"]]
        assert "fp16" in kinds and any(k.startswith("fp32") for k in kinds)
        for r in a["check"]["runs"]:
            if r["passed"] is None:  # the one allowed skip, and it says so
                assert r["precision"] == "fp16" and "no fp16 kernel on this device" in r["reason"]
                assert r["reason"] in " ".join(a["check"]["not_run"])
            else:
                assert r["passed"] is True and r["max_abs_diff"] <= r["atol"]
        assert any(r["passed"] is True for r in a["check"]["runs"] if r["precision"] == "fp32 (upcast fp16 weights)")
        assert a["check"]["fp16_weights_max_abs_diff"] > 0  # fused weights are rounded to fp16
    proto = onnx.load(str(tmp_path / arts[0]["name"]))
    big = [t for t in proto.graph.initializer if len(t.dims) == 4]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    meta = {p.key: p.value for p in proto.metadata_props}
    # the official export's form, which its DetectMultiBackend reads with eval and indexes by class id
    official = {p.key: p.value for p in onnx.load(str(fixtures / "reference" / f"{T}-converted.onnx")).metadata_props}
    assert (meta["stride"], meta["names"]) == (official["stride"], official["names"]) == (
        "32", "{0: 'red', 1: 'green', 2: 'blue'}")
    ts = torch.jit.load(str(tmp_path / arts[1]["name"]))
    assert {p.dtype for p in ts.parameters()} == {torch.float16}


def _no_kernel_error() -> Exception:
    """What onnxruntime raises for a graph with no fp16 kernel on this device."""
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

    return OrtNotImplemented("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for "
                             "Conv(11) node with name '/model/Conv'")


def _raiser(exc: Exception):
    def run(_x):
        raise exc
    return run


@pytest.mark.parametrize("fp16_error, passed, fp16_passed, words", [
    (_no_kernel_error(), True, None, "no fp16 kernel on this device (NotImplemented: [ONNXRuntimeError]"),
    (RuntimeError('"slow_conv2d_cpu" not implemented for \'Half\''), True, None, "no fp16 kernel on this device"),
    (ValueError("input has 2 dims, expected 4"), False, False, "the fp16 run raised ValueError: input has 2 dims"),
    (MemoryError("out of memory"), False, False, "the fp16 run raised MemoryError: out of memory"),
])
def test_check_that_did_not_run_never_passes(fp16_error, passed, fp16_passed, words):
    ref = torch.nn.Conv2d(3, 4, 1).eval()
    x = [torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))]
    check = run_checks("onnx", ref, _raiser(fp16_error), ref, x, 1e-3, half=True)
    assert check["passed"] is passed
    fp32_run, fp16_run = check["runs"]
    assert fp32_run["passed"] is True and fp32_run["max_abs_diff"] == 0.0
    assert fp16_run["passed"] is fp16_passed and words in fp16_run["reason"]
    if passed:
        assert check["not_run"] == [f"onnx fp16 [1, 3, 8, 8]: {fp16_run['reason']}"] and "reason" not in check
    else:
        assert words in check["reason"] and "not_run" not in check


def test_check_with_no_run_is_null():
    ref = torch.nn.Conv2d(3, 4, 1).eval()
    x = [torch.rand(1, 3, 8, 8)]
    check = run_checks("torchscript", _raiser(RuntimeError("boom")), None, ref, x, 1e-3, half=False)
    assert check["passed"] is False and "the fp32 run raised RuntimeError: boom" in check["reason"]
    skipped = run_checks("onnx", _raiser(_no_kernel_error()), None, ref, x, 1e-3, half=False)
    # an fp32 run is never allowed to skip: a missing kernel there is a failure
    assert skipped["passed"] is False and "NotImplemented" in skipped["reason"]
    assert run_checks("onnx", ref, None, ref, [], 1e-3, half=False)["passed"] is None


def test_export_check_failure_raises(models, tmp_path):
    dual, deploy = models(T)
    opts = ConvertOptions(formats=("onnx",), imgsz=64, export_atol=1e-9)
    with pytest.raises(ValidationFailedError, match="ONNX export check failed"):
        export_all(fuse_model(copy.deepcopy(deploy)), None, tmp_path, "m", opts, _report(), lambda _m: None)


def test_dual_model_is_never_exported(models, tmp_path):
    dual, _ = models(T)
    with pytest.raises(InvalidInputError, match="dual model is never exported"):
        export_all(dual, None, tmp_path, "m", ConvertOptions(formats=("onnx",)), _report(), lambda _m: None)
    with pytest.raises(InvalidInputError):
        Predictions(dual)


@pytest.mark.parametrize("kwargs, match", [
    ({"formats": ("pt",), "onnx": {"nms": True}}, "--nms applies to the ONNX export"),
    ({"formats": ("onnx",), "onnx": {"opset": 9}}, "--opset 9"),
    ({"formats": ("onnx",), "onnx": {"nms": True, "iou_thres": 1.5}}, "--iou-thres"),
    ({"formats": ("onnx",), "onnx": {"nms": True, "max_det": 0}}, "--max-det"),
    ({"formats": ("onnx",), "export_atol": 0.0}, "--export-atol"),
    ({"formats": ("onnx",), "onnx": {"multi_label": True}}, "--multi-label chooses the NMS semantics; add --nms"),
    ({"formats": ("pt",), "onnx": {"multi_label": True, "nms": True}}, "--nms applies to the ONNX export"),
    ({"formats": ("onnx",), "onnx": {"nsm": True}}, "unknown ONNX option"),
])
def test_bad_export_options(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        ConvertOptions(**kwargs).check()


def test_defaults_live_once():
    from reparam.cli import build_parser

    args = build_parser().parse_args(["convert", "x.pt"])
    d = EXPORT_DEFAULTS
    assert (args.opset, args.iou_thres, args.score_thres, args.max_det, args.export_atol, args.multi_label) == (
        d.opset, d.iou_thres, d.score_thres, d.max_det, d.export_atol, d.multi_label) == (17, 0.45, 0.25, 300, 1e-3,
                                                                                           False)
    assert ConvertOptions().export_atol == d.export_atol
    head = NMSHead()
    assert (head.iou_thres, head.score_thres, head.max_det, head.multi_label) == (0.45, 0.25, 300, False)
    assert ExportOptions.from_convert(ConvertOptions(onnx={"nms": True})) == ExportOptions(nms=True)


def test_options_import_without_torch():
    # the CLI reads the defaults at parser build time; `reparam operator` must not pull torch in for that
    code = ("import sys, reparam.converter.export as e, reparam.cli as c; c.build_parser(); "
            "print(e.EXPORT_DEFAULTS.opset, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["17", "False"]


def test_cli_multi_label_needs_nms(tmp_path):
    cmd = [sys.executable, "-m", "reparam.cli", "convert", str(tmp_path / "never-read.pt"), "--format", "onnx",
           "--multi-label"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["reparam: error: --multi-label chooses the NMS semantics; add --nms"]


def test_cli_writes_every_artifact_in_report(fixtures, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "reparam.cli", "convert", str(fixtures / "ckpt" / f"{T}.pt"), "-o", str(out),
           "--fuse", "--format", "onnx", "--format", "torchscript", "--imgsz", "64", "--nms",
           "--score-thres", "0.002", "--max-det", "20", "--dynamic", "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    arts = {a["format"]: a for a in report["artifacts"]}
    assert set(arts) == {"pt", "safetensors", "onnx", "torchscript"}  # --format adds to the default .pt/.safetensors
    for a in arts.values():
        f = out / a["name"]
        assert a["sha256"] == hash_file(f)[0] and a["bytes"] == f.stat().st_size
    for fmt in ("onnx", "torchscript"):
        check = arts[fmt]["check"]
        assert check["passed"] and check["max_abs_diff"] <= check["atol"] == 1e-3
    assert arts["onnx"]["name"].endswith("-end2end.onnx") and arts["onnx"]["nms"]["max_det"] == 20
    assert arts["onnx"]["nms"]["semantics"] == "best-class" and arts["onnx"]["nms"]["multi_label"] is False
    assert arts["onnx"]["inputs"] == [{"name": "images", "shape": ["batch", 3, "height", "width"]}]
    assert arts["onnx"]["outputs"] == [{"name": "num_dets", "shape": ["batch", 1]},
                                       {"name": "boxes", "shape": ["batch", 20, 4]},
                                       {"name": "scores", "shape": ["batch", 20]},
                                       {"name": "labels", "shape": ["batch", 20]}]
    assert report["fusion"]["modules_after"] < report["fusion"]["modules_before"]
    assert not [p for p in out.iterdir() if p.name.startswith(".reparam-staging")]
