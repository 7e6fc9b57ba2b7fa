"""Fusion, ONNX (plain, --dynamic, --nms, --half) and TorchScript export on the shared fixture checkpoints.

References: ``reference/<ckpt>-io.safetensors`` (``converted.y``, ``converted_fused.y`` on ``input-640``), the
official ONNX export of converted yolov9-t and onnxruntime's output on it (``ort.output0``).
Tests that do not compare with the 640 references run at small image sizes to stay fast.
"""

from __future__ import annotations

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
from reparam.converter.convert import ConvertOptions, build_model
from reparam.store.sources import hash_file
from reparam.converter.export import (EndToEnd, Predictions, export_all, export_onnx, export_torchscript,
                                      compare_detections, run_onnx)
from reparam.converter.fusion import fuse_model
from reparam.converter.nms import NMS_OUTPUTS, nms_indices, reference_nms, xywh2xyxy
from reparam.converter.pruning import derive_deploy_plan
from reparam.converter.transfer import transfer_weights
from reparam.errors import InvalidInputError, ValidationFailedError
from reparam.models import DetectionModel

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
                dual = build_model(ck.cfg, ck.nc, ck.names, ck.state_dict)
                skeleton = DetectionModel(plan.deploy_cfg, nc=ck.nc)
                sd, _ = transfer_weights(ck.state_dict, list(skeleton.state_dict()), plan, ck.cfg)
                deploy = build_model(plan.deploy_cfg, ck.nc, ck.names, sd)
                deploy.stride = dual.stride.clone()
                deploy.model[-1].stride = dual.model[-1].stride.clone()
                cache[name] = (dual, deploy)
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
                        metadata={"names": json.dumps({str(k): v for k, v in deploy.names.items()}), "stride": "32"})
    assert [o.name for o in proto.graph.output] == ["output0"]
    got = run_onnx(path, image)
    assert len(got) == 1
    ref = _ref(fixtures, name)
    assert float((got[0] - ref["converted_fused.y"]).abs().max()) <= 1e-3
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["names"]) == {str(k): v for k, v in deploy.names.items()}
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


def test_onnx_dynamic_batch_and_size(models, tmp_path):
    _, deploy = models(T)
    pred = Predictions(deploy)
    path = tmp_path / "d.onnx"
    g = torch.Generator().manual_seed(1)
    export_onnx(pred, path, torch.rand(1, 3, 128, 128, generator=g), dynamic=True, opset=13)
    for shape in [(1, 3, 128, 128), (2, 3, 96, 160)]:
        x = torch.rand(*shape, generator=g)
        with torch.no_grad():
            want = pred(x)
        got = run_onnx(path, x)[0]
        assert got.shape == want.shape == (shape[0], 4 + deploy.nc, (shape[2] * shape[3]) // 64 * 21 // 16)
        assert float((got - want).abs().max()) <= 1e-3


def test_reference_nms_semantics():
    # two overlapping boxes of class 0 (IoU 0.9), one far box; class 1 shares a box with class 0 (class-aware)
    boxes = torch.tensor([[[0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60]]], dtype=torch.float32)
    scores = torch.tensor([[[0.9, 0.8, 0.3], [0.0, 0.7, 0.1]]])
    sel = nms_indices(boxes, scores, 10, 0.5, 0.2)
    assert sel.tolist() == [[0, 0, 0], [0, 0, 2], [0, 1, 1]]
    assert nms_indices(boxes, scores, 10, 0.95, 0.2).tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 1]]
    assert nms_indices(boxes, scores, 1, 0.5, 0.2).tolist() == [[0, 0, 0], [0, 1, 1]]
    y = torch.cat([torch.tensor([[[5, 5, 55], [5, 4.5, 55], [10, 10, 10], [10, 9, 10]]]), scores], 1)
    n, b, s, lab = reference_nms(y, 0.5, 0.2, 4)
    assert n.tolist() == [[3]] and lab.tolist() == [[0, 1, 0, -1]]
    assert torch.allclose(s, torch.tensor([[0.9, 0.7, 0.3, 0.0]]))
    assert b[0, 1].tolist() == [0.0, 0.0, 10.0, 9.0] and b[0, 3].tolist() == [0.0] * 4


def test_onnx_nms_matches_torch_reference(models, tmp_path):
    _, deploy = models(T)
    pred = Predictions(deploy)
    # this barely trained model scores ~1e-3 everywhere; 0.002 keeps only clear maxima (well-conditioned)
    e2e = EndToEnd(pred, iou_thres=0.45, score_thres=0.002, max_det=50)
    path = tmp_path / "e2e.onnx"
    g = torch.Generator().manual_seed(0)
    proto = export_onnx(e2e, path, torch.rand(1, 3, 320, 320, generator=g), dynamic=True)
    assert [o.name for o in proto.graph.output] == list(NMS_OUTPUTS)
    assert any(n.op_type == "NonMaxSuppression" for n in proto.graph.node)
    x = torch.rand(2, 3, 320, 320, generator=g)
    with torch.no_grad():
        want = e2e(x)
        y = pred(x)
    got = run_onnx(path, x)
    assert [tuple(t.shape) for t in got] == [(2, 1), (2, 50, 4), (2, 50), (2, 50)]
    assert int(got[0].min()) > 0  # not a trivial comparison
    d, why = compare_detections(want, got, 1e-3)
    assert not why and d <= 1e-3
    # the torch reference is an independent NMS: cross-check with a brute-force greedy on the same predictions
    boxes = xywh2xyxy(y[:, :4].transpose(1, 2))
    for i in range(2):
        k = int(got[0][i, 0])
        assert torch.all(got[3][i, :k] >= 0) and torch.all(got[3][i, k:] == -1)
        assert torch.all(got[2][i, :k] > 0.002) and torch.all(got[2][i, k:] == 0)
        assert torch.all(got[2][i, :k - 1] >= got[2][i, 1:k])  # sorted by score
        for j in range(k):  # each kept box exists among the predictions with that class score
            a = int(((boxes[i] - got[1][i, j]).abs().amax(-1)).argmin())
            assert float((boxes[i, a] - got[1][i, j]).abs().max()) <= 1e-3
            assert abs(float(y[i, 4 + int(got[3][i, j]), a]) - float(got[2][i, j])) <= 1e-4


def test_torchscript_roundtrip(models, tmp_path):
    _, deploy = models(T)
    pred = Predictions(fuse_model(copy.deepcopy(deploy)))
    path = tmp_path / "m.torchscript"
    g = torch.Generator().manual_seed(2)
    export_torchscript(pred, path, torch.rand(1, 3, 128, 128, generator=g), metadata={"stride": "32"})
    extra = {"config.txt": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["config.txt"])["stride"] == "32"
    for shape in [(1, 3, 128, 128), (2, 3, 96, 160)]:
        x = torch.rand(*shape, generator=g)
        with torch.no_grad():
            assert float((loaded(x) - pred(x)).abs().max()) <= 1e-4


def test_export_all_half(models, tmp_path):
    dual, deploy = models(T)
    fused = fuse_model(copy.deepcopy(deploy)).eval()
    opts = ConvertOptions(half=True, fuse=True, formats=("onnx", "torchscript"), imgsz=64)
    report: dict = {"source": {"sha256": "ab"}, "variant": "yolov9-t"}
    arts = export_all(fused, dual, tmp_path, "m", opts, report, lambda _m: None)
    assert [a["format"] for a in arts] == ["onnx", "torchscript"]
    for a in arts:
        assert a["dtype"] == "float16" and a["check"]["passed"], a["check"]
        kinds = [r["precision"] for r in a["check"]["runs"]]
        assert "fp16" in kinds and any(k.startswith("fp32") for k in kinds)
        for r in a["check"]["runs"]:
            assert "skipped" in r or r["max_abs_diff"] <= r["atol"]
        assert a["check"]["fp16_weights_max_abs_diff"] > 0  # fused weights are rounded to fp16
    proto = onnx.load(str(tmp_path / arts[0]["name"]))
    big = [t for t in proto.graph.initializer if len(t.dims) == 4]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["stride"] == "32" and json.loads(meta["names"]) == {"0": "red", "1": "green", "2": "blue"}
    ts = torch.jit.load(str(tmp_path / arts[1]["name"]))
    assert {p.dtype for p in ts.parameters()} == {torch.float16}


def test_export_check_failure_raises(models, tmp_path):
    dual, deploy = models(T)
    opts = ConvertOptions(formats=("onnx",), imgsz=64, export_atol=1e-9)
    with pytest.raises(ValidationFailedError, match="ONNX export check failed"):
        export_all(fuse_model(copy.deepcopy(deploy)), None, tmp_path, "m", opts, {}, lambda _m: None)


def test_dual_model_is_never_exported(models, tmp_path):
    dual, _ = models(T)
    with pytest.raises(InvalidInputError, match="dual model is never exported"):
        export_all(dual, None, tmp_path, "m", ConvertOptions(formats=("onnx",)), {}, lambda _m: None)
    with pytest.raises(InvalidInputError):
        Predictions(dual)


@pytest.mark.parametrize("kwargs, match", [
    ({"formats": ("pt",), "onnx": {"nms": True}}, "--nms applies to the ONNX export"),
    ({"formats": ("onnx",), "onnx": {"opset": 9}}, "--opset 9"),
    ({"formats": ("onnx",), "onnx": {"nms": True, "iou_thres": 1.5}}, "--iou-thres"),
    ({"formats": ("onnx",), "onnx": {"nms": True, "max_det": 0}}, "--max-det"),
    ({"formats": ("onnx",), "export_atol": 0.0}, "--export-atol"),
])
def test_bad_export_options(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        ConvertOptions(**kwargs).check()


def test_cli_writes_every_artifact_in_report(fixtures, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "reparam.cli", "convert", str(fixtures / "ckpt" / f"{T}.pt"), "-o", str(out),
           "--fuse", "--format", "pt", "--format", "onnx", "--format", "torchscript", "--imgsz", "64", "--nms",
           "--score-thres", "0.002", "--max-det", "20", "--dynamic", "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    arts = {a["format"]: a for a in report["artifacts"]}
    assert set(arts) == {"pt", "onnx", "torchscript"}
    for a in arts.values():
        f = out / a["name"]
        assert a["sha256"] == hash_file(f)[0] and a["bytes"] == f.stat().st_size
    for fmt in ("onnx", "torchscript"):
        check = arts[fmt]["check"]
        assert check["passed"] and check["max_abs_diff"] <= check["atol"] == 1e-3
    assert arts["onnx"]["name"].endswith("-end2end.onnx") and arts["onnx"]["nms"]["max_det"] == 20
    assert [o["name"] for o in arts["onnx"]["outputs"]] == list(NMS_OUTPUTS)
    assert report["fusion"]["modules_after"] < report["fusion"]["modules_before"]
    assert not [p for p in out.iterdir() if p.name.startswith(".reparam-staging")]
