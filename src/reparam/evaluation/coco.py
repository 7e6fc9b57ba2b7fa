"""Detection and instance-mask metrics with pycocotools (the reference COCO API), not our own AP code.

The labels become a COCO ground truth (one category per class id, boxes in native pixels, clipped to the image as the
official ``val.py`` clips them); the detections a COCO result set. ``COCOeval`` (bbox, ``maxDets`` raised to the
evaluation's ``max_det``) gives, over the area range "all":

* ``map50_95``: mean precision over IoU 0.50:0.05:0.95, the 101 recall points and the classes that have labels
  (COCO's AP); ``map50``: the same at IoU 0.5; per-class AP and AP50 likewise per class;
* ``precision``/``recall`` (per class, and their mean over classes for "all"): the point of COCO's IoU-0.5
  precision/recall curve (101 recall points) with the largest F1.

How this differs from the official ``val.py`` numbers (``utils/metrics.py ap_per_class``): the official code matches
predictions to labels per IoU threshold by IoU rank, and integrates an interpolated continuous PR curve
(``np.interp`` on 101 points, trapezoid); its P/R is taken at one confidence shared by all classes (max mean F1).
COCO matches by score order and averages the precision envelope at 101 recall points. The measured differences on
the fixture set are in ``tests/test_evaluation.py`` (the documented tolerance).

Masks (:func:`coco_mask_metrics`): the same numbers with ``COCOeval(iouType="segm")``: ground truths are the polygon
labels in native pixels (pycocotools rasterises them), detections the RLEs of :mod:`.masks`; IoU is mask IoU
(``pycocotools.mask.iou``). This is what the official ``segment/val.py --save-json`` scores with pycocotools.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Sequence

import numpy as np


def label_boxes_xyxy(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised ``[N, 4]`` ``cx, cy, w, h`` labels as native-pixel ``x1, y1, x2, y2``, clipped to the image (as the
    official ``val.py`` clips them)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    xy = np.stack([(b[:, 0] - b[:, 2] / 2) * width, (b[:, 1] - b[:, 3] / 2) * height,
                   (b[:, 0] + b[:, 2] / 2) * width, (b[:, 1] + b[:, 3] / 2) * height], 1)
    xy[:, [0, 2]] = xy[:, [0, 2]].clip(0, width)
    xy[:, [1, 3]] = xy[:, [1, 3]].clip(0, height)
    return xy


def coco_metrics(sizes: Sequence[tuple[int, int]], labels: Sequence[tuple[np.ndarray, np.ndarray]],
                 detections: Sequence[np.ndarray], nc: int, max_det: int = 300) -> dict[str, Any]:
    """COCO metrics of a detector on a dataset.

    Args:
        sizes: native ``(width, height)`` of each image, pixels.
        labels: per image ``(classes [N] int, boxes [N, 4] normalised cx, cy, w, h)``.
        detections: per image ``[M, 6]`` rows ``x1, y1, x2, y2, score, class`` in native pixels.
        nc: number of classes; max_det: most detections per image that count.

    Returns:
        ``{"map50_95", "map50", "precision", "recall", "per_class": [{"map50_95", "map50", "precision", "recall",
        "instances"} per class id], "pr_recall", "pr_precision"}``; a class without labels has None metrics.
        ``pr_recall [R]`` are COCO's 101 recall points and ``pr_precision [R, nc]`` COCO's interpolated precision
        at IoU 0.5 there (the precision envelope whose mean is AP50; NaN for a class without labels, 0 past the
        largest recall reached): the PR curve of :mod:`.plots`.
    """
    images, gts, dts = [], [], []
    for i, ((w, h), (cls, box)) in enumerate(zip(sizes, labels)):
        images.append({"id": i + 1, "width": int(w), "height": int(h)})
        if len(cls):
            xy = label_boxes_xyxy(box, w, h)
            for c, (x1, y1, x2, y2) in zip(cls, xy):
                gts.append({"id": len(gts) + 1, "image_id": i + 1, "category_id": int(c) + 1, "iscrowd": 0,
                            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                            "area": float((x2 - x1) * (y2 - y1))})
    for i, det in enumerate(detections):
        for x1, y1, x2, y2, score, c in np.asarray(det, dtype=np.float64).reshape(-1, 6):
            dts.append({"id": len(dts) + 1, "image_id": i + 1, "category_id": int(c) + 1, "score": float(score),
                        "iscrowd": 0, "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                        "area": float((x2 - x1) * (y2 - y1))})
    return _score(images, gts, dts, nc, max_det, "bbox")


def coco_mask_metrics(sizes: Sequence[tuple[int, int]],
                      labels: Sequence[tuple[np.ndarray, Sequence[np.ndarray]]],
                      detections: Sequence[np.ndarray], rles: Sequence[Sequence[dict[str, Any]]], nc: int,
                      max_det: int = 300) -> dict[str, Any]:
    """COCO instance-mask metrics (``iouType="segm"``) of a segmentation model on a polygon-labelled dataset.

    Args:
        sizes: native ``(width, height)`` of each image, pixels.
        labels: per image ``(classes [N] int, polygons: N arrays [K, 2] x, y in native pixels)``.
        detections: per image ``[M, 6]`` rows ``x1, y1, x2, y2, score, class`` in native pixels.
        rles: per image the ``M`` COCO RLEs of those detections' masks (native size, :func:`.masks.image_rles`).
        nc: number of classes; max_det: most detections per image that count.

    Returns:
        As :func:`coco_metrics` (the same keys, mask AP instead of box AP).
    """
    from pycocotools import mask as mask_utils

    from .masks import polygon_annotation

    images, gts, dts = [], [], []
    for i, ((w, h), (cls, polys)) in enumerate(zip(sizes, labels)):
        images.append({"id": i + 1, "width": int(w), "height": int(h)})
        for c, poly in zip(cls, polys):
            seg = polygon_annotation(poly)
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, int(h), int(w)))
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            gts.append({"id": len(gts) + 1, "image_id": i + 1, "category_id": int(c) + 1, "iscrowd": 0,
                        "segmentation": seg, "bbox": [x, y, bw, bh], "area": float(mask_utils.area(rle))})
    for i, (det, det_rles) in enumerate(zip(detections, rles)):
        rows = np.asarray(det, dtype=np.float64).reshape(-1, 6)
        if len(rows) != len(det_rles):
            raise ValueError(f"image {i}: {len(rows)} detections but {len(det_rles)} masks")
        for (x1, y1, x2, y2, score, c), rle in zip(rows, det_rles):
            dts.append({"id": len(dts) + 1, "image_id": i + 1, "category_id": int(c) + 1, "score": float(score),
                        "iscrowd": 0, "segmentation": rle, "bbox": [float(x1), float(y1), float(x2 - x1),
                                                                      float(y2 - y1)],
                        "area": float(mask_utils.area(rle))})
    return _score(images, gts, dts, nc, max_det, "segm")


def _score(images: list[dict[str, Any]], gts: list[dict[str, Any]], dts: list[dict[str, Any]], nc: int,
           max_det: int, iou_type: str) -> dict[str, Any]:
    """Run ``COCOeval`` (``iou_type`` ``bbox`` or ``segm``) and summarise it (module docstring)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cats = [{"id": k + 1, "name": str(k)} for k in range(nc)]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on stdout
        gt = COCO()
        gt.dataset = {"images": images, "annotations": gts, "categories": cats}
        gt.createIndex()
        dt = COCO()
        dt.dataset = {"images": images, "annotations": dts, "categories": cats}
        dt.createIndex()
        ev = COCOeval(gt, dt, iou_type)
        ev.params.maxDets = [1, 10, int(max_det)]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, -1]  # [T, R, K] area "all", max_det
    rec_thr = np.asarray(ev.params.recThrs)
    instances = np.bincount([g["category_id"] - 1 for g in gts], minlength=nc)

    def mean(a: np.ndarray) -> float | None:
        a = a[a > -1]
        return float(a.mean()) if a.size else None

    per_class = []
    for k in range(nc):
        p50 = prec[0, :, k]
        if instances[k] == 0 or (p50 <= -1).all():
            per_class.append({"map50_95": None, "map50": None, "precision": None, "recall": None,
                              "instances": int(instances[k])})
            continue
        p = np.clip(p50, 0, None)
        f1 = np.where(p + rec_thr > 0, 2 * p * rec_thr / np.maximum(p + rec_thr, 1e-16), 0)
        best = int(f1.argmax())
        per_class.append({"map50_95": mean(prec[:, :, k]), "map50": mean(prec[0, :, k]),
                          "precision": float(p[best]) if f1[best] > 0 else 0.0,
                          "recall": float(rec_thr[best]) if f1[best] > 0 else 0.0, "instances": int(instances[k])})
    seen = [c for c in per_class if c["map50"] is not None]
    return {
        "map50_95": mean(prec) or 0.0,
        "map50": mean(prec[0]) or 0.0,
        "precision": float(np.mean([c["precision"] for c in seen])) if seen else 0.0,
        "recall": float(np.mean([c["recall"] for c in seen])) if seen else 0.0,
        "per_class": per_class,
        "pr_recall": rec_thr.copy(),
        "pr_precision": np.where(prec[0] <= -1, np.nan, prec[0]),
    }
