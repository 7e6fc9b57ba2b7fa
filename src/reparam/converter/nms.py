"""Class-aware non-maximum suppression: the ONNX ``NonMaxSuppression`` operator and its plain-torch twin.

The end-to-end export appends this to a deploy model's ``y [B, 4 + nc, A]`` (box xywh in input pixels, then class
scores). Semantics are those of the ONNX operator (https://onnx.ai/onnx/operators/onnx__NonMaxSuppression.html) as
onnxruntime implements it (``core/providers/cpu/object_detection/non_max_suppression.cc``):

* per image and per class, candidates are the boxes whose score is strictly above ``score_thres``;
* they are visited by decreasing score; a box is dropped when its IoU with an already kept box of the same class is
  strictly above ``iou_thres`` (a box or an intersection with no area never suppresses);
* at most ``max_det`` boxes are kept per image and class.

Then the kept boxes of all classes of an image are ranked by score and the best ``max_det`` are returned in fixed-size
tensors (padding: box 0, score 0, label -1). torchvision is not needed anywhere.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["xywh2xyxy", "nms_indices", "gather_detections", "NMSHead", "nms_inputs", "reference_nms", "NMS_OUTPUTS"]

#: Output names of the end-to-end ONNX graph, in order.
NMS_OUTPUTS = ("num_dets", "boxes", "scores", "labels")


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
    """:func:`nms_indices` in torch; the ONNX ``NonMaxSuppression`` node when exported (TorchScript exporter)."""

    @staticmethod
    def forward(ctx, boxes, scores, max_per_class: int, iou_thres: float, score_thres: float):  # noqa: D102
        return nms_indices(boxes, scores, max_per_class, iou_thres, score_thres)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class: int, iou_thres: float, score_thres: float):  # noqa: D102
        return g.op(
            "NonMaxSuppression", boxes, scores,
            g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64)),
            g.op("Constant", value_t=torch.tensor([iou_thres], dtype=torch.float32)),
            g.op("Constant", value_t=torch.tensor([score_thres], dtype=torch.float32)),
            center_point_box_i=0,
        )


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
    out_boxes = torch.gather(boxes, 1, anchor.unsqueeze(-1).expand(-1, -1, 4))
    out_boxes = torch.where(valid.unsqueeze(-1), out_boxes, torch.zeros_like(out_boxes))
    out_scores = torch.where(valid, values, torch.zeros_like(values))
    return num_dets, out_boxes, out_scores, labels


class NMSHead(nn.Module):
    """End-to-end post-processing of a YOLO prediction.

    Args:
        iou_thres: IoU above which a lower-scored box of the same class is dropped.
        score_thres: class score a box must exceed.
        max_det: detections per image (also the per-class cap of the NMS operator).

    Input: ``y [B, 4 + nc, A]`` (xywh in input pixels, then class scores; any float dtype, computed in fp32 since
    the ONNX operator takes float only).
    Output: ``(num_dets [B, 1] int64, boxes [B, max_det, 4] xyxy fp32, scores [B, max_det] fp32,
    labels [B, max_det] int64)``; see :func:`gather_detections`.
    """

    def __init__(self, iou_thres: float = 0.45, score_thres: float = 0.25, max_det: int = 300):
        super().__init__()
        self.iou_thres = float(iou_thres)
        self.score_thres = float(score_thres)
        self.max_det = int(max_det)

    def forward(self, y: torch.Tensor):
        boxes, scores = nms_inputs(y)
        return self.select(boxes, scores)

    def select(self, boxes: torch.Tensor, scores: torch.Tensor):
        """NMS + ranking on prepared ``boxes [B, A, 4]`` xyxy and ``scores [B, C, A]`` (fp32)."""
        selected = _NonMaxSuppression.apply(boxes, scores, self.max_det, self.iou_thres, self.score_thres)
        return gather_detections(selected, boxes, scores, self.max_det)


def nms_inputs(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``y [B, 4 + nc, A]`` -> the NonMaxSuppression inputs ``boxes [B, A, 4]`` xyxy and ``scores [B, nc, A]``, fp32."""
    y = y.float()
    return xywh2xyxy(y[:, :4].transpose(1, 2)), y[:, 4:]


def reference_nms(y: torch.Tensor, iou_thres: float = 0.45, score_thres: float = 0.25,
                  max_det: int = 300) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch reference of the end-to-end graph's post-processing: ``NMSHead(...)(y)`` without export machinery.

    Shapes as :class:`NMSHead`.
    """
    with torch.no_grad():
        return NMSHead(iou_thres, score_thres, max_det)(y)
