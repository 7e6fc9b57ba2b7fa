"""Detection confusion matrix at the official ``val.py`` thresholds.

The rule is that of the official ``ConfusionMatrix`` (WongKinYiu/yolov9 ``utils/metrics.py``, used by ``val.py`` for
its ``confusion_matrix.png``), written here from its description:

* only detections with score ``> conf`` (0.25) count;
* a detection and a label may match when their IoU is ``> iou`` (0.45), whatever their classes;
* each detection keeps only its best pair (highest IoU); of those, each label keeps only its best pair (a detection
  whose best label went to another detection stays unmatched, as in the official code);
* a matched label adds one to ``[detected class, true class]``; an unmatched label to ``[background, true class]``;
  an unmatched detection to ``[detected class, background]``.

One difference, on purpose: the official code counts unmatched detections only in an image where at least one pair
matched, so false positives in an image without any match (for instance an image without labels) are lost. Here
every detection above ``conf`` is counted, so the row sums are the numbers of detections per class and the column
sums the numbers of labels per class.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: score threshold of the confusion matrix (official ``ConfusionMatrix(conf=0.25)``)
CONFUSION_CONF = 0.25
#: IoU threshold of a match (official ``ConfusionMatrix(iou_thres=0.45)``)
CONFUSION_IOU = 0.45


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every pair of ``a [N, 4]`` and ``b [M, 4]`` boxes ``x1, y1, x2, y2`` (any unit): ``[N, M]``."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = (a[:, 2:] - a[:, :2]).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).prod(1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def image_confusion(label_classes: np.ndarray, label_boxes: np.ndarray, detections: np.ndarray, nc: int,
                    conf: float = CONFUSION_CONF, iou: float = CONFUSION_IOU) -> np.ndarray:
    """The confusion counts of one image.

    Args:
        label_classes: ``[N]`` class ids; label_boxes: ``[N, 4]`` ``x1, y1, x2, y2`` (same unit as the detections).
        detections: ``[M, 6]`` rows ``x1, y1, x2, y2, score, class``.
        nc: number of classes; conf, iou: the thresholds (module docstring).

    Returns:
        ``[nc + 1, nc + 1]`` int64 counts: row = detected class, column = true class, index ``nc`` = background.
    """
    out = np.zeros((nc + 1, nc + 1), dtype=np.int64)
    det = np.asarray(detections, dtype=np.float64).reshape(-1, 6)
    det = det[det[:, 4] > conf]
    gt_cls = np.asarray(label_classes, dtype=np.int64).reshape(-1)
    det_cls = det[:, 5].astype(np.int64)
    gt_free = np.ones(len(gt_cls), dtype=bool)
    det_free = np.ones(len(det), dtype=bool)
    if len(gt_cls) and len(det):
        ious = box_iou(np.asarray(label_boxes, dtype=np.float64).reshape(-1, 4), det[:, :4])
        gi, di = np.nonzero(ious > iou)
        order = np.argsort(-ious[gi, di], kind="stable")
        gi, di = gi[order], di[order]
        _, first = np.unique(di, return_index=True)  # each detection: its best label
        gi, di = gi[np.sort(first)], di[np.sort(first)]  # still in descending IoU order
        _, first = np.unique(gi, return_index=True)  # each label: its best remaining detection
        for g, d in zip(gi[first], di[first]):
            gt_free[g] = det_free[d] = False
            out[det_cls[d], gt_cls[g]] += 1
    np.add.at(out, (np.full(int(gt_free.sum()), nc), gt_cls[gt_free]), 1)  # missed labels: background row
    np.add.at(out, (det_cls[det_free], np.full(int(det_free.sum()), nc)), 1)  # unmatched detections
    return out


def confusion_matrix(labels: Sequence[tuple[np.ndarray, np.ndarray]], detections: Sequence[np.ndarray], nc: int,
                     conf: float = CONFUSION_CONF, iou: float = CONFUSION_IOU) -> np.ndarray:
    """Sum of :func:`image_confusion` over a dataset.

    Args:
        labels: per image ``(classes [N], boxes [N, 4] x1, y1, x2, y2)``; detections: per image ``[M, 6]``
            ``x1, y1, x2, y2, score, class`` in the labels' unit.

    Returns:
        ``[nc + 1, nc + 1]`` int64 (row detected, column true, last = background).
    """
    total = np.zeros((nc + 1, nc + 1), dtype=np.int64)
    for (cls, box), det in zip(labels, detections):
        total += image_confusion(cls, box, det, nc, conf, iou)
    return total


__all__ = ["CONFUSION_CONF", "CONFUSION_IOU", "box_iou", "image_confusion", "confusion_matrix"]
