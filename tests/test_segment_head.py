"""The single-branch segmentation checkpoints: gelan-c-seg (``Segment`` head: anchor-free ``Detect`` + ``Proto``)
and gelan-c-dseg (``DSegment``) pass through unpruned as "already a deploy model", in the official format, and
export (ONNX output0/output1, TorchScript).

No golden I/O of the official ``Segment`` or ``Detect`` exists in fixtures/golden (only DSegment, DualDSegment,
TripleDDetect, Proto and the detection blocks), so ``Segment`` is checked here by its structure against the rules
of the official ``models/yolo.py`` (tensor shapes), by the parameter count the official code printed for a
gelan-c-seg model, and by its outputs against our own model (pass-through, fused, exported); its ``Proto`` and
``Conv`` parts have golden data (tests/test_blocks_golden.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import onnx
import torch

from reparam.converter.artifacts import load_safetensors
from reparam.converter.convert import ConvertOptions, convert
from reparam.converter.export.onnx_graph import run_onnx
from reparam.converter.official_format import save_official
from reparam.converter.safe_load import MethodRef, load_pickle
from reparam.converter.validation import unpack_output
from reparam.models import DetectionModel, Detect, DSegment, Segment, SegmentationModel, fuse_model
from reparam.models.published import published_config
from test_segmentation_heads import NAMES, NC, X, build, quarter

NM = 32


def test_gelan_c_seg_has_the_official_parameter_count() -> None:
    """Fused, with nc=10, gelan-c-seg has 27,369,838 parameters: the number the official code's model summary
    printed after "Fusing layers..." for a gelan-c-seg checkpoint (WongKinYiu/yolov9 issue #270: "gelan-c-seg
    summary: 414 layers, 27369838 parameters"); 80 classes give 27,423,808."""
    for nc, want in ((10, 27_369_838), (80, 27_423_808)):
        with torch.device("meta"):
            model = DetectionModel(published_config("gelan-c-seg", nc=nc), stride=[8, 16, 32])
        fuse_model(model)
        assert sum(p.numel() for p in model.parameters()) == want


def test_segment_head_structure_and_outputs() -> None:
    """Tensor shapes by the official rules (``Detect``: plain box tower, width max(ch0 // 4, 64, 16); ``Segment``:
    cv4 width max(ch0 // 4, nm), Proto(ch0, npr, nm) on P3), and the training / eval / export outputs."""
    model = build(quarter(published_config("gelan-c-seg", nc=NC)))
    assert type(model) is SegmentationModel
    head = model.model[-1]
    assert type(head) is Segment and isinstance(head, Detect) and not isinstance(head, DSegment)
    assert head.detect is Detect.forward and (head.nc, head.nm, head.npr, head.nl) == (NC, NM, 256, 3)
    sd = {k[len("model.22."):]: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("model.22.")}
    ch0 = 64  # quarter gelan-c: P3/P4/P5 widths 64, 128, 128
    assert sd["cv2.0.1.conv.weight"] == (64, 64, 3, 3)  # no groups (DDetect's second box conv has g=4)
    assert sd["cv2.2.0.conv.weight"] == (64, 128, 3, 3) and sd["cv2.0.2.weight"] == (64, 64, 1, 1)
    assert sd["cv3.0.2.weight"] == (NC, max(ch0, min(2 * NC, 128)), 1, 1)
    assert sd["cv4.1.0.conv.weight"] == (max(ch0 // 4, NM), 128, 3, 3) and sd["cv4.0.2.weight"] == (NM, NM, 1, 1)
    assert sd["proto.cv1.conv.weight"] == (256, ch0, 3, 3) and sd["proto.cv3.conv.weight"] == (NM, 256, 1, 1)
    assert sorted({k.split(".")[0] for k in sd}) == ["cv2", "cv3", "cv4", "dfl", "proto"]

    with torch.no_grad():
        feats = model._run(X, upto=22)
        y, (maps, mc, p) = head(list(feats))
        a = 8 * 12 + 4 * 6 + 2 * 3
        assert y.shape == (2, 4 + NC + NM, a) and mc.shape == (2, NM, a) and p.shape == (2, NM, 16, 24)
        assert [tuple(m.shape) for m in maps] == [(2, 64 + NC, 8, 12), (2, 64 + NC, 4, 6), (2, 64 + NC, 2, 3)]
        assert torch.equal(y[:, 4 + NC:], mc)
        assert torch.equal(y[:, :4 + NC], Detect.forward(head, list(feats))[0])
        head.export = True
        y_e, p_e = head(list(feats))
        head.export = False
        assert torch.equal(y_e, y) and torch.equal(p_e, p)
        head.train()  # BatchNorm on batch statistics: the structure, not the values
        maps_t, mc_t, p_t = head(list(feats))
        head.eval()
        assert mc_t.shape == mc.shape and p_t.shape == p.shape and [t.shape for t in maps_t] == [
            t.shape for t in maps]


def test_gelan_c_seg_checkpoint_passes_through_and_exports(tmp_path: Path) -> None:
    """An official-format gelan-c-seg checkpoint (pickled as segment/train.py leaves it) is already a deploy model:
    nothing pruned, every tensor used once, outputs identical; the converted .pt names models.yolo.Segment (its
    ``detect`` as ``getattr(models.yolo.Detect, 'forward')``); ONNX has output0 and the prototypes output1 and, like
    TorchScript, matches torch."""
    model = build(quarter(published_config("gelan-c-seg", nc=NC)))
    model.names = dict(NAMES)
    source = tmp_path / "gelan-c-seg-quarter.pt"
    save_official(model.half(), source)
    assert {"models.yolo.SegmentationModel", "models.yolo.Segment", "models.yolo.Detect",
            "models.common.Proto"} <= set(load_pickle(source).globals)

    out = tmp_path / "out"
    report = convert(source, out, ConvertOptions(imgsz=64, fuse=True, formats=("pt", "safetensors", "onnx",
                                                                               "torchscript")))
    report = report.to_dict()  # convert returns the typed Report
    assert report["status"] == "succeeded" and report["pruned"] is False
    assert report["head"] == {**report["head"], "dual": "Segment", "deploy": "Segment"}
    comparisons = report["validation"]["comparisons"]
    assert report["tensors"]["used_exactly_once"] and report["validation"]["passed"]
    assert {c["model"] for c in comparisons} == {"deploy", "fused"}
    assert all(c["max_abs_diff"] == 0.0 for c in comparisons if c["model"] == "deploy")  # the same model
    assert all(c["max_abs_diff"] <= 1e-3 for c in comparisons)  # fused: BatchNorm folded, sums reordered
    assert set(comparisons[0]["parts"]) == {"boxes", "scores", "mask_coefficients", "prototypes"}
    converted = load_pickle(out / "gelan-c-seg-quarter-converted.pt")
    head = converted.obj["model"].state["_modules"]["model"].state["_modules"]["22"]
    assert converted.obj["model"].cls == "models.yolo.SegmentationModel" and head.cls == "models.yolo.Segment"
    assert head.state["detect"] == MethodRef("models.yolo.Detect", "forward")
    assert (head.state["nc"], head.state["nm"], head.state["npr"], head.state["nl"]) == (NC, NM, 256, 3)
    assert head.state["_modules"]["proto"].cls == "models.common.Proto"

    arts = {a["format"]: a for a in report["artifacts"]}
    assert [o["name"] for o in arts["onnx"]["outputs"]] == ["output0", "output1"]
    assert arts["onnx"]["outputs"][0]["shape"] == [1, 4 + NC + NM, 8 * 8 + 4 * 4 + 2 * 2]
    assert arts["onnx"]["outputs"][1]["shape"] == [1, NM, 16, 16]
    for kind in ("onnx", "torchscript"):
        assert arts[kind]["check"]["passed"] is True, arts[kind]["check"]
    meta = {p.key: p.value for p in onnx.load(str(out / arts["onnx"]["name"])).metadata_props}
    assert meta["task"] == "segment" and meta["nm"] == str(NM) and ast.literal_eval(meta["names"]) == {
        int(k): v for k, v in NAMES.items()}

    deploy = load_safetensors(out / "gelan-c-seg-quarter-converted.safetensors")
    assert type(deploy.model[-1]) is Segment
    x = X[:1, :, :, :64]
    with torch.no_grad():
        ref = unpack_output(model.float()(x))
        got = unpack_output(deploy(x))
    assert (got.y - ref.y).abs().max().item() <= 1e-5 and (got.prototypes - ref.prototypes).abs().max() <= 1e-5
    y, protos = run_onnx(out / arts["onnx"]["name"], x)
    assert (y - ref.y).abs().max().item() <= 1e-3 and (protos - ref.prototypes).abs().max().item() <= 1e-4


def test_gelan_c_dseg_checkpoint_passes_through_unpruned(tmp_path: Path) -> None:
    """An official-format gelan-c-dseg checkpoint (single-branch DSegment) converts without pruning: same layers,
    every tensor used once, identical outputs, DSegment in the converted .pt."""
    model = build(quarter(published_config("gelan-c-dseg", nc=NC)))
    model.names = dict(NAMES)
    source = tmp_path / "gelan-c-dseg-quarter.pt"
    save_official(model.half(), source)
    report = convert(source, tmp_path / "out", ConvertOptions(imgsz=64))
    report = report.to_dict()  # convert returns the typed Report
    assert report["status"] == "succeeded" and report["pruned"] is False
    assert report["head"]["dual"] == report["head"]["deploy"] == "DSegment"
    assert report["tensors"]["used_exactly_once"] and report["validation"]["max_abs_diff"] == 0.0
    assert report["layers"]["map"] == {str(i): i for i in range(26)}
    converted = load_pickle(tmp_path / "out" / "gelan-c-dseg-quarter-converted.pt")
    head = converted.obj["model"].state["_modules"]["model"].state["_modules"]["25"]
    assert head.cls == "models.yolo.DSegment" and head.state["detect"] == MethodRef("models.yolo.DDetect", "forward")
