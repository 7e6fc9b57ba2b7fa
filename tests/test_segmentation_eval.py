"""Evaluation of segmentation models (issue #14 point 5): polygon labels, box and mask mAP from pycocotools, the
promotion metric, and the "box mAP only" case of a boxes-only dataset.

There is no real segmentation dataset in the fixtures, and a random-weight model predicts nothing useful, so the
checks are: (a) the mask pipeline (prototypes x coefficients, crop, threshold, back to native pixels, RLE) fed
with the ground truth scores mask mAP 1.0, and a perturbed copy a strictly lower value equal to a direct pycocotools
call; (b) a quarter-width yolov9-c-dseg (built from the published config) converts with --eval-data on a drawn
polygon set and every artifact reports box and mask metrics of the right types and counts; (c) on the boxes-only
fixture set the mask metrics are absent with the reason.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reparam import spec
from reparam.evaluation import EvalSettings, evaluate_model, from_module, load_model
from reparam.evaluation.coco import coco_mask_metrics
from reparam.evaluation.dataset import Dataset, load_dataset
from reparam.evaluation.masks import encode, image_rles, native_masks, polygon_masks
from reparam.store import champion, promotion
from reparam.report import Report, Source, Validation
from reparam.store.promotion import Gates, Measured

REPO = Path(__file__).resolve().parents[1]
NAMES = ["c0", "c1", "c2"]
#: (width, height) of the drawn images: landscape and portrait, so rectangular batches and letterbox padding differ
SIZES = [(160, 128), (128, 160), (160, 160), (144, 112), (160, 120), (120, 160)]


def draw_polygon_set(root: Path, boxes_only: int = 0) -> Path:
    """A YOLO segmentation val set: each image gets 2-3 filled polygons (hexagons, triangles) of classes 0-2 and a
    polygon label line per object; the first ``boxes_only`` images get box lines instead. Returns data.yaml."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    for i, (w, h) in enumerate(SIZES):
        im = Image.new("RGB", (w, h), (30, 30, 30))
        d = ImageDraw.Draw(im)
        lines = []
        for k in range(2 + i % 2):
            cx, cy, r = rng.uniform(35, w - 35), rng.uniform(35, h - 35), rng.uniform(14, 28)
            n = 6 if k % 2 == 0 else 3
            pts = [(cx + r * np.cos(a + 0.3), cy + r * np.sin(a + 0.3)) for a in np.linspace(0, 2 * np.pi, n + 1)[:-1]]
            d.polygon(pts, fill=(220, 60 + 80 * k, 40))
            xy = np.array(pts) / [w, h]
            if i < boxes_only:
                lo, hi = xy.min(0), xy.max(0)
                lines.append(f"{k} {(lo[0] + hi[0]) / 2:.6f} {(lo[1] + hi[1]) / 2:.6f} {hi[0] - lo[0]:.6f} "
                             f"{hi[1] - lo[1]:.6f}")
            else:
                lines.append(f"{k} " + " ".join(f"{v:.6f}" for v in xy.reshape(-1)))
        im.save(root / "images" / "val" / f"s{i}.png")
        (root / "labels" / "val" / f"s{i}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(f"val: images/val\nnames: {NAMES}\n")
    return root / "data.yaml"


@pytest.fixture(scope="module")
def polygon_set(tmp_path_factory) -> Dataset:
    return load_dataset(draw_polygon_set(tmp_path_factory.mktemp("seg-data")))


def _with_evaluation(evaluation: dict) -> Report:
    """A passed conversion's typed report holding only this ``evaluation`` section (what the gates read)."""
    return Report(status="succeeded", source=Source(uri=""), validation=Validation(passed=True, max_abs_diff=0.0),
                  evaluation=evaluation)


# --- labels ---------------------------------------------------------------------------------------------------


def test_polygon_labels_give_boxes_and_polygons(polygon_set: Dataset, tmp_path: Path) -> None:
    ds = polygon_set
    assert len(ds.items) == len(SIZES) and ds.skipped == []
    assert ds.instances == ds.polygon_instances == sum(2 + i % 2 for i in range(len(SIZES))) == 15
    assert ds.masks_problem() is None and ds.summary()["polygon_instances"] == 15
    item = ds.items[0]
    for box, poly in zip(item.boxes, item.segments):
        assert poly is not None and poly.shape[1] == 2 and len(poly) in (3, 6)
        lo, hi = poly.min(0), poly.max(0)  # the box is the polygon's bounding box (official segments2boxes)
        np.testing.assert_allclose(box, [*(lo + hi) / 2, *(hi - lo)], atol=1e-12)
    # mixed: some images with box lines -> no mask metrics, the reason counts the instances
    mixed = load_dataset(draw_polygon_set(tmp_path / "mixed", boxes_only=2))
    assert mixed.polygon_instances == 15 - 5
    assert mixed.masks_problem() == "only 10 of the dataset's 15 labelled instances have a polygon (the others are " \
                                    "box lines)"
    # a polygon line with an odd number of coordinates, or only 2 points, is refused with the reason (image skipped)
    bad = tmp_path / "bad"
    draw_polygon_set(bad)
    (bad / "labels" / "val" / "s0.txt").write_text("0 0.1 0.1 0.5 0.1 0.5\n")
    (bad / "labels" / "val" / "s1.txt").write_text("1 0.1 0.1 0.5 0.5 0.2\n")
    (bad / "labels" / "val" / "s2.txt").write_text("2 0.1 0.1 0.5 0.1 1.5 0.5\n")
    got = {s["file"]: s["reason"] for s in load_dataset(bad / "data.yaml").skipped}
    assert "has 6 fields, expected 5 (class cx cy w h) or a polygon" in got["images/val/s0.png"]
    assert "has 6 fields" in got["images/val/s1.png"]
    assert "polygon 0.1 0.1 0.5 0.1 ... is outside [0, 1]" in got["images/val/s2.png"]


# --- (a) the mask pipeline on the ground truth ------------------------------------------------------------------


def _direct_segm_map(ds: Dataset, rles: list[list[dict]], dets: list[np.ndarray]) -> tuple[float, float]:
    """mAP@0.5:0.95 and mAP@0.5 by pycocotools alone (``COCO.loadRes`` + ``COCOeval('segm').summarize``), built
    independently of reparam.evaluation.coco."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, res = [], [], []
    for i, item in enumerate(ds.items):
        images.append({"id": i + 1, "width": item.width, "height": item.height})
        for c, poly in zip(item.classes, item.polygons_px()):
            assert poly is not None
            xs, ys = poly[:, 0], poly[:, 1]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1, "iscrowd": 0,
                         "segmentation": [poly.reshape(-1).tolist()], "area": float(np.ptp(xs) * np.ptp(ys)),
                         "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs)), float(np.ptp(ys))]})
        for rle, row in zip(rles[i], dets[i]):
            res.append({"image_id": i + 1, "category_id": int(row[5]) + 1, "score": float(row[4]),
                        "segmentation": rle})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": k + 1, "name": n} for k, n in enumerate(NAMES)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(res), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def _ground_truth_predictions(ds: Dataset, shift: int = 0) -> tuple[list[list[dict]], list[np.ndarray]]:
    """Per image: masks made by our pipeline from prototypes that encode the ground-truth masks (one prototype per
    object, logit +8 inside / -8 outside, one-hot coefficients), cropped to a box 1 px larger than the polygon's,
    mapped back through a letterbox pad and encoded; ``shift`` rolls every prototype right by that many pixels."""
    rles, dets = [], []
    for item in ds.items:
        h, w = item.height, item.width
        gt = polygon_masks([p for p in item.polygons_px() if p is not None], (h, w))
        pad_w, pad_h = 3.0, 5.0  # a letterboxed canvas: the image sits at (3, 5) on a (h + 10, w + 6) canvas
        protos = torch.full((len(gt), h + 10, w + 6), -8.0)
        protos[:, 5:5 + h, 3:3 + w] = torch.from_numpy(gt).float() * 16 - 8
        protos = torch.roll(protos, shift, dims=2)
        coef = torch.eye(len(gt))
        boxes = torch.tensor([[x0 + 3 - 1, y0 + 5 - 1, x1 + 3 + 1 + shift, y1 + 5 + 1] for x0, y0, x1, y1 in
                              ((p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max())
                               for p in item.polygons_px() if p is not None)], dtype=torch.float32)
        rles.append(image_rles(protos, coef, boxes, (h + 10, w + 6), (pad_w, pad_h), (h, w), chunk=2))
        dets.append(np.array([[*b, 0.9 - 0.01 * k, c] for k, (b, c) in enumerate(zip(boxes.tolist(),
                                                                                    item.classes))]))
    return rles, dets


def test_mask_map_of_the_ground_truth_is_one_and_a_shift_lowers_it_as_pycocotools_says(polygon_set: Dataset) -> None:
    ds = polygon_set
    sizes = [(i.width, i.height) for i in ds.items]
    labels = [(i.classes, i.polygons_px()) for i in ds.items]
    rles, dets = _ground_truth_predictions(ds)
    # the pipeline reproduces pycocotools' own rasterisation of the polygons exactly
    for item, r in zip(ds.items, rles):
        from pycocotools import mask as mask_utils

        ours = np.asarray(mask_utils.decode(r)).transpose(2, 0, 1)
        ref = polygon_masks([p for p in item.polygons_px() if p is not None], (item.height, item.width))
        assert ours.shape == ref.shape and (ours == ref).all()
    m = coco_mask_metrics(sizes, labels, dets, rles, len(NAMES))
    assert m["map50_95"] == pytest.approx(1.0) and m["map50"] == pytest.approx(1.0)
    assert [c["instances"] for c in m["per_class"]] == [6, 6, 3]
    assert _direct_segm_map(ds, rles, dets) == pytest.approx((1.0, 1.0))

    shifted_rles, shifted_dets = _ground_truth_predictions(ds, shift=3)
    s = coco_mask_metrics(sizes, labels, shifted_dets, shifted_rles, len(NAMES))
    direct = _direct_segm_map(ds, shifted_rles, shifted_dets)
    assert 0.0 < s["map50_95"] < 1.0
    assert (s["map50_95"], s["map50"]) == pytest.approx(direct, abs=1e-12)


def test_native_masks_cut_the_padding_and_resize_like_official_scale_image() -> None:
    canvas = torch.zeros(1, 20, 30, dtype=torch.bool)
    canvas[0, 5:15, 4:14] = True  # a 10x10 square; pad (4.5, 5.0) -> the image is canvas[5:15, 4:25]
    out = native_masks(canvas, (4.5, 5.0), (20, 42))  # native = 2x the cut region
    assert out.shape == (1, 20, 42) and out.dtype == np.uint8
    assert out[0].sum() == 20 * 20 and out[0, :, :20].all() and not out[0, :, 20:].any()
    assert encode(out)[0]["size"] == [20, 42]


# --- the promotion metric -----------------------------------------------------------------------------------------


def test_promotion_compares_mask_map_for_a_segmentation_model() -> None:
    assert spec.DEFAULT_PROMOTION_METRIC == "mask" and spec.DEFAULT_PROMOTION_METRIC in spec.PROMOTION_METRICS
    ours = Measured("d" * 64, 160, map50_95=0.30, map50=0.5, mask_map50_95=0.20, mask_map50=0.4)
    assert (ours.metric, ours.primary, ours.label) == ("mask", 0.20, "mask mAP@0.5:0.95")
    box_only = Measured("d" * 64, 160, map50_95=0.10)
    assert (box_only.metric, box_only.primary) == ("box", 0.10)
    ready = {promotion.TAG_STATUS: promotion.STATUS_READY, promotion.TAG_VALIDATION: "true"}

    def decide(holder_m: Measured | None, gates: Gates = Gates()) -> promotion.Decision:
        return promotion.decide(["champion"], validation_passed=True, version_status="READY", version_tags=ready,
                                gates=gates, measured=ours, holder="1", holder_measured=holder_m, version="2")

    # the holder's box mAP is higher, its mask mAP lower: promoted on masks
    assert decide(Measured("d" * 64, 160, 0.50, 0.7, 0.15, 0.3)).allowed
    held = decide(Measured("d" * 64, 160, 0.10, 0.2, 0.25, 0.5))
    assert held.rule == "regression" and "mask mAP@0.5:0.95 0.2000 is below version 1's 0.2500" in held.reason
    # a holder measured without masks is no mask measurement: unmeasured (it gets evaluated), never box vs mask
    unmeasured = decide(Measured("d" * 64, 160, 0.05))
    assert unmeasured.rule == "champion_unmeasured" and "no evaluation with masks" in unmeasured.reason
    low = decide(None, Gates(min_map=0.25))
    assert low.rule == "min_map" and "mask mAP@0.5:0.95 0.2000 is below --min-map 0.25" in low.reason


def test_version_tags_carry_box_and_mask_metrics() -> None:
    m = Measured("a" * 64, 320, 0.31, 0.52, 0.21, 0.41)
    tags = champion.eval_tags(m)
    assert tags["reparam.eval.map50_95"] == "0.31" and tags["reparam.eval.mask_map50_95"] == "0.21"
    assert tags["reparam.eval.mask_map50"] == "0.41" and tags["reparam.eval.metric"] == "mask"
    assert tags[f"reparam.eval.d-{'a' * 16}-320"] == "0.31,0.52,0.21,0.41"
    assert champion.measured_from_tags(tags, "a" * 64, 320) == m
    assert champion.measured_from_tags(tags) == m
    box = Measured("b" * 64, 320, 0.3, None)
    assert champion.measured_from_tags(champion.eval_tags(box), "b" * 64, 320) == box
    # a report's evaluation: the deploy .pt's box and mask numbers
    report = _with_evaluation({"dataset": {"digest": "a" * 64}, "settings": {"imgsz": 320},
                               "dual": {"map50_95": 0.3, "map50": 0.5, "masks": {"map50_95": 0.2, "map50": 0.4}},
                               "artifacts": [{"format": "pt", "map50_95": 0.31, "map50": 0.52, "mask_map50_95": 0.21,
                                              "mask_map50": 0.41, "passed": True}]})
    assert champion.measured_from_report(report) == (m, True)
    del report.evaluation["artifacts"][0]
    assert champion.measured_from_report(report) == (Measured("a" * 64, 320, 0.3, 0.5, 0.2, 0.4), True)


# --- (b) a quarter-width yolov9-c-dseg through convert --eval-data and reparam evaluate -------------------------


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory) -> Path:
    from reparam.converter.official_format import save_official
    from reparam.models.published import published_config
    from test_segmentation_heads import build, quarter

    dual = build(quarter(published_config("yolov9-c-dseg", nc=len(NAMES))))
    dual.names = dict(enumerate(NAMES))
    path = tmp_path_factory.mktemp("seg-ckpt") / "yolov9-c-dseg-quarter.pt"
    save_official(dual.half(), path)
    return path


def _check_masks(entry: dict, instances: list[int]) -> None:
    masks = entry["masks"]
    assert entry["task"] == "segment" and "masks_absent" not in entry
    for key in ("map50_95", "map50", "precision", "recall"):
        assert isinstance(masks[key], float) and 0.0 <= masks[key] <= 1.0
        assert isinstance(entry[key], float) and 0.0 <= entry[key] <= 1.0
    assert [masks["per_class"][n]["instances"] for n in NAMES] == instances
    assert [entry["per_class"][n]["instances"] for n in NAMES] == instances


def test_segmentation_conversion_reports_box_and_mask_metrics(seg_checkpoint: Path, polygon_set: Dataset,
                                                              tmp_path: Path) -> None:
    from reparam.converter.convert import ConvertOptions, convert

    out = tmp_path / "out"
    typed = convert(seg_checkpoint, out, ConvertOptions(imgsz=128, formats=("pt", "onnx"),
                                                        eval_data=str(polygon_set.root),
                                                        eval_imgsz=128), eval_dataset=polygon_set)
    report = typed.to_dict()
    ev = report["evaluation"]
    assert report["status"] == "succeeded" and ev["passed"] is True
    assert ev["dataset"]["polygon_instances"] == ev["dataset"]["instances"] == 15
    _check_masks(ev["dual"], [6, 6, 3])
    arts = {a["format"]: a for a in ev["artifacts"]}
    assert {"pt", "onnx"} <= set(arts) <= {"fused", "pt", "onnx"}
    for a in arts.values():
        assert a["passed"] is True and isinstance(a["mask_map50_95"], float)
        assert abs(a["delta_mask_map50_95"]) <= ev["atol"] and abs(a["delta_map50_95"]) <= ev["atol"]
    # the ONNX graph (output0 + output1) gives the deploy .pt's numbers
    assert arts["onnx"]["mask_map50_95"] == pytest.approx(arts["pt"]["mask_map50_95"], abs=1e-3)
    # the plots and tables: the mask PR curve, and the per-class table's mask columns (of the deploy .pt)
    files = {f["kind"]: f["name"] for f in ev["files"]}
    assert set(files) == {"pr_curve", "confusion_matrix", "per_class", "confusion_counts", "mask_pr_curve"}
    from PIL import Image

    from reparam.evaluation.plots import PR_CURVE_PX

    with Image.open(out / files["mask_pr_curve"]) as im:
        assert im.format == "PNG" and im.size == PR_CURVE_PX
    rows = [r.split(",") for r in (out / files["per_class"]).read_text().splitlines()]
    assert rows[0] == ["class", "instances", "precision", "recall", "map50", "map50_95", "mask_precision",
                       "mask_recall", "mask_map50", "mask_map50_95"]
    assert rows[1][:2] == ["all", "15"] and float(rows[1][9]) == arts["pt"]["mask_map50_95"]
    assert [r[0] for r in rows[2:]] == NAMES
    # what a champion is compared on: the deploy .pt's mask mAP
    measured, passed = champion.measured_from_report(typed)
    assert passed and measured is not None and measured.metric == "mask"
    assert measured.primary == arts["pt"]["mask_map50_95"] and measured.map50_95 == arts["pt"]["map50_95"]

    # the same .pt through the library: same numbers, timing of the masks, detections counted
    res = evaluate_model(load_model(out / "yolov9-c-dseg-quarter-converted.pt"), polygon_set,
                         EvalSettings(imgsz=128))
    assert res.form == "pt" and res.task == "segment" and res.masks is not None
    assert res.masks.map50_95 == arts["pt"]["mask_map50_95"] and res.detections > 0
    assert res.timing["masks_s"] > 0


def test_reparam_evaluate_json_of_a_segmentation_model(seg_checkpoint: Path, polygon_set: Dataset) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-m", "reparam.cli", "evaluate", str(seg_checkpoint), "--data",
                           str(polygon_set.root / "data.yaml"), "--imgsz", "128", "--json", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    ev = json.loads(proc.stdout)["evaluation"]
    _check_masks(ev["dual"], [6, 6, 3])
    text = subprocess.run([sys.executable, "-m", "reparam.cli", "evaluate", str(seg_checkpoint), "--data",
                           str(polygon_set.root / "data.yaml"), "--imgsz", "128", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert text.returncode == 0 and "all (mask)" in text.stdout


# --- (c) boxes-only dataset: box mAP only, with the reason ----------------------------------------------------


def test_boxes_only_dataset_gives_box_metrics_and_says_why_no_masks(seg_checkpoint: Path, fixtures: Path) -> None:
    from reparam.converter.checkpoint import read_checkpoint
    from reparam.converter.convert import build_model

    full = load_dataset(fixtures / "eval" / "data.yaml")
    ds = Dataset(full.root, full.source, full.names, full.items[:6], digest=full.digest)
    ckpt = read_checkpoint(seg_checkpoint)
    model = build_model(ckpt.cfg, ckpt.nc, ckpt.names, ckpt.state_dict)
    loaded = from_module(model, "dual", dict(full.names))
    assert loaded.nm == 32 and loaded.task == "segment"
    res = evaluate_model(loaded, ds, EvalSettings(imgsz=128))
    assert res.task == "segment" and res.masks is None
    assert res.masks_absent == "the dataset's labels are boxes only (no polygon labels: class x1 y1 x2 y2 ...)"
    metrics = res.metrics()
    assert metrics["masks_absent"] == res.masks_absent and "masks" not in metrics
    assert isinstance(metrics["map50_95"], float) and "masks_s" not in res.timing
    assert sum(c.instances for c in res.per_class) == sum(len(i.classes) for i in ds.items)
    # labels of the mask coefficients never become classes: every detection is one of the 3 classes
    assert res.curves is not None and res.curves.confusion.shape == (4, 4)
    measured = Measured(res.dataset["digest"], 128, res.map50_95, res.map50)
    assert measured.metric == "box"


# --- the registry: box and mask metrics on versions, a box-only champion measured again --------------------------


@pytest.mark.servers
def test_registry_measures_a_box_only_champion_again_and_compares_masks(mlflow_server, tmp_path: Path) -> None:
    """Version 1 holds @champion with a box-only evaluation on this dataset (tags); version 2 is a segmentation
    conversion with mask metrics: the holder's .pt is downloaded and evaluated again (our evaluator), both versions
    then carry box and mask tags and run metrics, and the alias moves on the mask mAP (0.30 > 0.20) although the
    holder's box mAP is higher."""
    import uuid

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.tracking_uri)
    name = f"seg-deploy-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    ready = {promotion.TAG_STATUS: promotion.STATUS_READY, promotion.TAG_VALIDATION: "true"}
    digest = "c" * 64

    def version():
        run = client.create_run("0")
        (tmp_path / "model.pt").write_bytes(b"deploy weights")
        client.log_artifact(run.info.run_id, str(tmp_path / "model.pt"), "model")
        client.set_terminated(run.info.run_id)
        return client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                           tags=ready)

    v1 = version()
    champion.record_evaluation(client, name, v1, Measured(digest, 128, 0.50, 0.70), "data")
    client.set_registered_model_alias(name, "champion", v1.version)
    v2 = version()
    report = _with_evaluation({"dataset": {"digest": digest}, "settings": {"imgsz": 128},
                               "dual": {"map50_95": 0.40, "map50": 0.6, "masks": {"map50_95": 0.30, "map50": 0.5}},
                               "artifacts": [{"format": "pt", "map50_95": 0.40, "map50": 0.6, "mask_map50_95": 0.30,
                                              "mask_map50": 0.5, "delta_mask_map50_95": 0.0,
                                              "delta_mask_map50": 0.0, "passed": True}]})
    evaluated: list[str] = []

    def evaluate(path: Path) -> Measured:
        evaluated.append(path.read_text())
        return Measured(digest, 128, 0.50, 0.70, 0.20, 0.45)

    res = champion.promote_gated(name, v2.version, "champion", report, Gates(), evaluate=evaluate,
                                 tracking_uri=mlflow_server.tracking_uri)
    assert evaluated == ["deploy weights"]  # the holder's registered .pt, downloaded
    assert (res.decision, res.metric, res.map50_95, res.previous_map50_95) == ("promoted", "mask", 0.30, 0.20)
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(v2.version)
    t1 = client.get_model_version(name, v1.version).tags
    t2 = client.get_model_version(name, v2.version).tags
    assert (t1["reparam.eval.mask_map50_95"], t1["reparam.eval.map50_95"], t1["reparam.eval.metric"]) == (
        "0.2", "0.5", "mask")
    assert (t2["reparam.eval.mask_map50_95"], t2["reparam.eval.map50_95"], t2["reparam.eval.metric"]) == (
        "0.3", "0.4", "mask")
    assert t2[f"reparam.eval.d-{'c' * 16}-128"] == "0.4,0.6,0.3,0.5"
    metrics = client.get_run(v2.run_id).data.metrics
    assert (metrics["eval_map50_95"], metrics["eval_mask_map50_95"], metrics["eval_mask_map50"]) == (0.4, 0.3, 0.5)
