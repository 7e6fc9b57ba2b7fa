"""Class-aware non-maximum suppression for the end-to-end graph, and an independent reference to check it.

The end-to-end export appends :class:`NMSHead` to a deploy model's ``y [B, 4 + nc, A]`` (box xywh in input pixels,
then class scores; a segmentation model's ``y [B, 4 + nc + nm, A]`` ends with ``nm`` raw mask coefficients, which
take no part in the selection and come out gathered for the selected detections). Two semantics
(``NMSHead(multi_label=...)``, CLI ``--multi-label``):

* **best class** (default), as the official YOLOv9 ``detect.py`` (WongKinYiu/yolov9 ``utils/general.py``
  ``non_max_suppression(multi_label=False)``): each box is a candidate once, with its best
  class (first one on a tie) and that class's score; candidates need a score strictly above ``score_thres``.
* **multi-label**, as the official ``val.py`` (``multi_label=True``): every (box, class) pair whose score is strictly
  above ``score_thres`` is a candidate, so one box can come out once per class.

Then, in both: NMS is class-aware (boxes of different classes never suppress each other); candidates are visited by
decreasing score and a box is dropped when its IoU with an already kept box of the same class is strictly above
``iou_thres`` (a box or intersection with no area never suppresses); the ``max_det`` best detections of an image are
returned in fixed-size tensors (padding: box 0, score 0, label -1). The official code also caps the candidates at
30,000 before NMS; the graph does not (it only matters for images with more candidates than that).

In the graph (:class:`NMSHead`), best class is done by zeroing every score but the best class's (``ArgMax`` +
``ScatterElements``) before the standard ``NonMaxSuppression`` operator
(https://onnx.ai/onnx/operators/onnx__NonMaxSuppression.html, per image and class, at most ``max_det`` per class),
then a ``TopK`` over all classes. :func:`reference_detections` computes the same result the other way round (numpy,
greedy over the sorted candidate list as ``detect.py`` does), sharing no code with the graph: the export check
compares the two. torchvision is not needed anywhere.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .options import EXPORT_DEFAULTS

__all__ = ["xywh2xyxy", "nms_indices", "best_class_scores", "gather_detections", "gather_segment_detections",
           "NMSHead", "nms_inputs", "reference_detections", "NMS_OUTPUTS", "MASK_COEFFICIENTS"]

#: Output names of the end-to-end ONNX graph, in order.
NMS_OUTPUTS = ("num_dets", "boxes", "scores", "labels")
#: The extra output of a segmentation end-to-end graph, after :data:`NMS_OUTPUTS`: the selected detections' raw mask
#: coefficients ``[B, max_det, nm]`` (the prototypes ``output1`` follow it unchanged).
MASK_COEFFICIENTS = "mask_coefficients"


def xywh2xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` centre x, y, width, height -> corners x1, y1, x2, y2 (same units)."""
    xy, wh = boxes[..., :2], boxes[..., 2:4]
    return torch.cat((xy - wh / 2, xy + wh / 2), -1)


def _iou_one_to_many(box: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """IoU of ``box [4]`` with ``others [N, 4]`` (xyxy, corners in any order), 0 where an area is not positive."""
    b_lo, b_hi = torch.minimum(box[:2], box[2:]), torch.maximum(box[:2], box[2:])
    o_lo, o_hi = torch.minimum(others[:, :2], others[:, 2:]), torch.maximum(others[:, :2], others[:, 2:])
    wh = (torch.minimum(b_hi, o_hi) - torch.maximum(b_lo, o_lo)).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_b = (b_hi - b_lo).prod()
    area_o = (o_hi - o_lo).prod(-1)
    union = area_b + area_o - inter
    ok = (inter > 0) & (area_b > 0) & (area_o > 0) & (union > 0)
    return torch.where(ok, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))


@torch.no_grad()
def nms_indices(boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou_thres: float,
                score_thres: float) -> torch.Tensor:
    """Greedy per-class NMS with the ONNX operator's semantics, in plain torch.

    Args:
        boxes: ``[B, A, 4]`` xyxy.
        scores: ``[B, C, A]``.
        max_per_class: most boxes kept per image and class.
        iou_thres: a box is suppressed when its IoU with a kept box is > this.
        score_thres: only boxes with score > this are candidates.

    Returns:
        ``selected [N, 3]`` int64 rows ``(batch index, class index, box index)``, ordered by batch, class, then
        decreasing score (as onnxruntime orders them).
    """
    rows: list[torch.Tensor] = []
    boxes = boxes.float()
    scores = scores.float()
    for b in range(scores.shape[0]):
        for c in range(scores.shape[1]):
            cand = torch.nonzero(scores[b, c] > score_thres).flatten()
            if cand.numel() == 0 or max_per_class <= 0:
                continue
            order = torch.sort(scores[b, c, cand], descending=True, stable=True).indices
            cand = cand[order]
            kept: list[int] = []
            while cand.numel() and len(kept) < max_per_class:
                best = cand[0]
                kept.append(int(best))
                rest = cand[1:]
                if rest.numel() == 0:
                    break
                cand = rest[_iou_one_to_many(boxes[b, best], boxes[b, rest]) <= iou_thres]
            idx = torch.tensor(kept, dtype=torch.int64)
            rows.append(torch.stack((torch.full_like(idx, b), torch.full_like(idx, c), idx), 1))
    return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.int64)


class _NonMaxSuppression(torch.autograd.Function):
    """:func:`nms_indices` in torch; the ONNX ``NonMaxSuppression`` node when exported (TorchScript exporter).

    While tracing for export the torch value is a placeholder row ``[[0, 0, 0]]``: the exporter replaces this
    node by the operator, only the output's type matters there, and :func:`nms_indices` (a Python loop) would cost
    minutes on a prediction with many candidates.
    """

    @staticmethod
    def forward(ctx, boxes, scores, max_per_class: int, iou_thres: float, score_thres: float):
        if torch.jit.is_tracing():
            return torch.zeros((1, 3), dtype=torch.int64)
        return nms_indices(boxes, scores, max_per_class, iou_thres, score_thres)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class: int, iou_thres: float, score_thres: float):
        return g.op(
            "NonMaxSuppression", boxes, scores,
            g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64)),
            g.op("Constant", value_t=torch.tensor([iou_thres], dtype=torch.float32)),
            g.op("Constant", value_t=torch.tensor([score_thres], dtype=torch.float32)),
            center_point_box_i=0,
        )


def _rank(selected: torch.Tensor, scores: torch.Tensor, max_det: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``max_det`` best kept (box, class) pairs of each image, by decreasing score (traceable).

    Returns ``num_dets [B, 1]`` int64, ``values [B, max_det]`` (kept scores, -1 past ``num_dets``), ``labels
    [B, max_det]`` int64 (-1 past ``num_dets``), ``anchor [B, max_det]`` int64 (the box index of each detection; any
    index past ``num_dets``) and ``valid [B, max_det]`` bool.
    """
    n_cls, n_anchor = scores.shape[1], scores.shape[2]
    width = n_cls * n_anchor + max_det  # max_det padding columns so top-k always has max_det entries
    flat = scores.flatten(1) * 0 - 1  # [B, C*A], -1 = not kept
    dense = torch.cat((flat, flat[:, :1].expand(-1, max_det)), 1)
    b, c, a = selected[:, 0], selected[:, 1], selected[:, 2]
    kept = scores[b, c, a]
    dense = dense.flatten().scatter(0, b * width + c * n_anchor + a, kept).view(-1, width)
    values, idx = dense.topk(max_det, dim=1)
    valid = values > -0.5
    num_dets = valid.sum(1, keepdim=True).to(torch.int64)
    labels = torch.where(valid, torch.div(idx, n_anchor, rounding_mode="floor"), torch.full_like(idx, -1))
    anchor = torch.remainder(idx, n_anchor)
    return num_dets, values, labels, anchor, valid


def _gather_at(values: torch.Tensor, anchor: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``values [B, A, K]`` at ``anchor [B, max_det]`` -> ``[B, max_det, K]``, zero where not ``valid``."""
    out = torch.gather(values, 1, anchor.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
    return torch.where(valid.unsqueeze(-1), out, torch.zeros_like(out))


def gather_detections(selected: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
                      max_det: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank the kept boxes of each image by score and pad to ``max_det`` (traceable; no data-dependent shapes out).

    Args:
        selected: ``[N, 3]`` (batch, class, box) rows from NMS.
        boxes: ``[B, A, 4]`` xyxy; scores: ``[B, C, A]``.
        max_det: detections per image in the outputs.

    Returns:
        ``num_dets [B, 1]`` int64, ``boxes [B, max_det, 4]`` xyxy, ``scores [B, max_det]``, ``labels [B, max_det]``
        int64; rows past ``num_dets`` are box 0, score 0, label -1. Sorted by decreasing score.
    """
    num_dets, values, labels, anchor, valid = _rank(selected, scores, max_det)
    out_scores = torch.where(valid, values, torch.zeros_like(values))
    return num_dets, _gather_at(boxes, anchor, valid), out_scores, labels


def gather_segment_detections(selected: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
                              coefficients: torch.Tensor, max_det: int
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`gather_detections` plus each detection's mask coefficients (traceable).

    Args:
        selected, boxes, scores, max_det: as :func:`gather_detections`.
        coefficients: the raw mask coefficients ``[B, nm, A]`` (the last ``nm`` rows of a segmentation model's
            ``y``, YOLOv9 ``DSegment``).

    Returns:
        ``(num_dets, boxes, scores, labels)`` as :func:`gather_detections`, then ``mask_coefficients
        [B, max_det, nm]`` of the same detections (rows past ``num_dets`` are 0). A detection's mask is
        ``sigmoid(mask_coefficients @ prototypes)`` (official ``utils/segment/general.py`` ``process_mask``).
    """
    num_dets, values, labels, anchor, valid = _rank(selected, scores, max_det)
    out_scores = torch.where(valid, values, torch.zeros_like(values))
    return (num_dets, _gather_at(boxes, anchor, valid), out_scores, labels,
            _gather_at(coefficients.transpose(1, 2), anchor, valid))


def best_class_scores(scores: torch.Tensor) -> torch.Tensor:
    """``scores [B, C, A]`` with every score but each box's best class's set to 0 (first class on a tie).

    A zero score is never an NMS candidate (the score threshold is >= 0 and compared with ``>``), so per-class NMS on
    the result is NMS over each box's best class only. Traceable: ``ArgMax`` + ``ScatterElements`` + ``Mul`` in ONNX.
    """
    best = scores.argmax(1, keepdim=True)
    keep = torch.zeros_like(scores).scatter(1, best, 1.0)
    return scores * keep


class NMSHead(nn.Module):
    """End-to-end post-processing of a YOLO prediction (semantics: module docstring).

    Args:
        iou_thres: IoU above which a lower-scored box of the same class is dropped.
        score_thres: class score a candidate must exceed, in [0, 1).
        max_det: detections per image (also the per-class cap of the NMS operator).
        multi_label: every (box, class) pair above ``score_thres`` is a candidate (official ``val.py``); default
            one candidate per box, its best class (official ``detect.py``).
        nm: number of mask coefficients at the end of ``y`` (a segmentation model, YOLOv9 ``DSegment``), 0 for
            detection. :class:`~reparam.converter.export.modules.EndToEnd` sets it from the model.

    Input: ``y [B, 4 + nc + nm, A]`` (xywh in input pixels, class scores, then ``nm`` mask coefficients; any float
    dtype, computed in fp32 since the ONNX operator takes float only).
    Output: ``(num_dets [B, 1] int64, boxes [B, max_det, 4] xyxy fp32, scores [B, max_det] fp32,
    labels [B, max_det] int64)``, with ``nm`` also ``mask_coefficients [B, max_det, nm]``; see
    :func:`gather_detections` and :func:`gather_segment_detections`.
    """

    def __init__(self, iou_thres: float = EXPORT_DEFAULTS.iou_thres, score_thres: float = EXPORT_DEFAULTS.score_thres,
                 max_det: int = EXPORT_DEFAULTS.max_det, multi_label: bool = EXPORT_DEFAULTS.multi_label,
                 nm: int = 0):
        super().__init__()
        self.iou_thres = float(iou_thres)
        self.score_thres = float(score_thres)
        self.max_det = int(max_det)
        self.multi_label = bool(multi_label)
        self.nm = int(nm)

    def forward(self, y: torch.Tensor):
        boxes, scores = nms_inputs(y, self.nm)
        if not self.nm:
            return self.select(boxes, scores)
        candidates, selected = self._selected(boxes, scores)
        coefficients = y[:, -self.nm:].float()
        return gather_segment_detections(selected, boxes, candidates, coefficients, self.max_det)

    def _selected(self, boxes: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        candidates = scores if self.multi_label else best_class_scores(scores)
        return candidates, _NonMaxSuppression.apply(boxes, candidates, self.max_det, self.iou_thres, self.score_thres)

    def select(self, boxes: torch.Tensor, scores: torch.Tensor):
        """NMS + ranking on prepared ``boxes [B, A, 4]`` xyxy and raw class ``scores [B, C, A]`` (fp32)."""
        candidates, selected = self._selected(boxes, scores)
        return gather_detections(selected, boxes, candidates, self.max_det)


def nms_inputs(y: torch.Tensor, nm: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``y [B, 4 + nc + nm, A]`` -> ``boxes [B, A, 4]`` xyxy and raw class ``scores [B, nc, A]``, fp32 (the last
    ``nm`` rows, a segmentation model's mask coefficients, are not part of either)."""
    y = y.float()
    return xywh2xyxy(y[:, :4].transpose(1, 2)), (y[:, 4:-int(nm)] if nm else y[:, 4:])


def _pairwise_iou(one: np.ndarray, many: np.ndarray) -> np.ndarray:
    """IoU of ``one [4]`` with ``many [N, 4]`` (xyxy in any corner order); 0 where an area is not positive."""
    lo1, hi1 = np.minimum(one[:2], one[2:]), np.maximum(one[:2], one[2:])
    lo, hi = np.minimum(many[:, :2], many[:, 2:]), np.maximum(many[:, :2], many[:, 2:])
    inter_wh = np.clip(np.minimum(hi, hi1) - np.maximum(lo, lo1), 0, None)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = np.prod(hi1 - lo1) + np.prod(hi - lo, axis=1) - inter
    ok = (inter > 0) & (union > 0) & (np.prod(hi1 - lo1) > 0) & (np.prod(hi - lo, axis=1) > 0)
    return np.where(ok, inter / np.where(ok, union, 1), 0.0)


def reference_detections(boxes: torch.Tensor | np.ndarray, scores: torch.Tensor | np.ndarray, *, iou_thres: float,
                         score_thres: float, max_det: int, multi_label: bool,
                         coefficients: torch.Tensor | np.ndarray | None = None) -> tuple[torch.Tensor, ...]:
    """The end-to-end post-processing computed independently of the graph (numpy, no code shared with it).

    Follows the official ``non_max_suppression`` flow: candidates (best class per box, or every pair above the
    threshold with ``multi_label``), sorted by decreasing score (stable), then greedy: a candidate is kept unless an
    already kept one of the same class overlaps it with IoU > ``iou_thres``; stop at ``max_det``.

    Args:
        boxes: ``[B, A, 4]`` xyxy (pixels); scores: raw class scores ``[B, C, A]``; both as fed to the graph's NMS.
        coefficients: a segmentation model's raw mask coefficients ``[B, nm, A]``, or None.

    Returns:
        ``(num_dets [B, 1] int64, boxes [B, max_det, 4] fp32, scores [B, max_det] fp32, labels [B, max_det] int64)``,
        by decreasing score, padded like :class:`NMSHead`'s outputs; with ``coefficients`` also the detections'
        ``mask_coefficients [B, max_det, nm]`` fp32 (padding 0).
    """
    bx = np.asarray(boxes, dtype=np.float32)
    sc = np.asarray(scores, dtype=np.float32)
    n_img = sc.shape[0]
    out_n = np.zeros((n_img, 1), np.int64)
    out_b = np.zeros((n_img, max_det, 4), np.float32)
    out_s = np.zeros((n_img, max_det), np.float32)
    out_l = np.full((n_img, max_det), -1, np.int64)
    mc = None if coefficients is None else np.asarray(coefficients, dtype=np.float32)
    out_m = np.zeros((n_img, max_det, 0 if mc is None else mc.shape[1]), np.float32)
    for i in range(n_img):
        per_box = sc[i].T  # [A, C]
        if multi_label:
            anchor, label = np.nonzero(per_box > score_thres)
        else:
            best = per_box.argmax(1)
            anchor = np.nonzero(per_box[np.arange(per_box.shape[0]), best] > score_thres)[0]
            label = best[anchor]
        conf = per_box[anchor, label]
        order = np.argsort(-conf, kind="stable")
        anchor, label, conf = anchor[order], label[order], conf[order]
        alive = np.ones(len(anchor), bool)
        kept: list[int] = []
        for k in range(len(anchor)):
            if not alive[k]:
                continue
            kept.append(k)
            if len(kept) == max_det:
                break
            rest = np.nonzero(alive[k + 1:] & (label[k + 1:] == label[k]))[0] + k + 1
            if rest.size:
                alive[rest[_pairwise_iou(bx[i, anchor[k]], bx[i, anchor[rest]]) > iou_thres]] = False
        n = len(kept)
        out_n[i, 0] = n
        out_b[i, :n] = bx[i, anchor[kept]]
        out_s[i, :n] = conf[kept]
        out_l[i, :n] = label[kept]
        if mc is not None:
            out_m[i, :n] = mc[i][:, anchor[kept]].T
    out = (torch.from_numpy(out_n), torch.from_numpy(out_b), torch.from_numpy(out_s), torch.from_numpy(out_l))
    return out if mc is None else (*out, torch.from_numpy(out_m))

