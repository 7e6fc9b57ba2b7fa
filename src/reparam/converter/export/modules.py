"""What is exported: the deploy model wrapped to return only its decoded prediction (optionally followed by NMS),
and the metadata every artifact carries."""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...errors import InvalidInputError
from ...models.heads import DDetect, DSegment
from .nms import NMSHead
from ..validation import main_output
from .options import ExportOptions

if TYPE_CHECKING:
    from ...report import Report

__all__ = ["deploy_head", "is_segmentation", "check_export_target", "Predictions", "EndToEnd", "export_metadata"]


def deploy_head(model: nn.Module) -> DDetect:
    """The model's ``DDetect`` or ``DSegment`` head; InvalidInputError for anything else (a dual head is never
    exported)."""
    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    if type(head) not in (DDetect, DSegment):
        raise InvalidInputError(
            f"export needs a deploy model (head DDetect or DSegment), got head {type(head).__name__}: a dual model is "
            "never exported as is (its first output would be the auxiliary branch); convert it first")
    return head


def is_segmentation(model: nn.Module) -> bool:
    """True when ``model``'s head is ``DSegment`` (two outputs: ``output0`` and the prototypes ``output1``)."""
    return isinstance(deploy_head(model), DSegment)


def check_export_target(model: nn.Module, formats: tuple[str, ...], nms: bool) -> None:
    """Refuse, before any work, an export this model cannot have: ``--nms`` for a segmentation model (the
    end-to-end graph carries no mask coefficients). Raises InvalidInputError (one line)."""
    if nms and "onnx" in formats and is_segmentation(model):
        raise InvalidInputError("--nms is not supported for segmentation models yet (the end-to-end graph carries no "
                                "mask coefficients); export without --nms: output0 and the prototypes output1")


class Predictions(nn.Module):
    """A deploy model that returns only its decoded prediction.

    Args:
        model: a deploy ``DetectionModel`` (head ``DDetect``); it is deep-copied and its head's ``export`` flag set.

    Shapes: ``images [B, 3, H, W] -> y [B, 4 + nc, A]`` (xywh in input pixels, then class scores). A segmentation
    model (``DSegment``) returns ``(y [B, 4 + nc + nm, A], protos [B, nm, H/4, W/4])``: ``y`` ends with the ``nm``
    raw mask coefficients, ``protos`` are the mask prototypes (YOLOv9 ``DSegment`` in export mode).
    Raises InvalidInputError for a model whose head is neither ``DDetect`` nor ``DSegment``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        deploy_head(model)
        self.model = copy.deepcopy(model).eval()
        self.model.model[-1].export = True
        self.segmentation = is_segmentation(model)

    def forward(self, images: torch.Tensor):
        out = self.model(images)
        if self.segmentation:
            return out[0], out[1]
        return main_output(out)


class EndToEnd(nn.Module):
    """:class:`Predictions` followed by :class:`~reparam.converter.export.nms.NMSHead`.

    Args:
        model: a deploy model or a :class:`Predictions` (used as is).
        nms: the NMS head (its semantics: :mod:`reparam.converter.export.nms`); default ``NMSHead()`` (default
            settings).

    Shapes: ``images [B, 3, H, W] -> (num_dets [B, 1], boxes [B, max_det, 4], scores [B, max_det],
    labels [B, max_det])``.
    """

    def __init__(self, model: nn.Module, nms: NMSHead | None = None):
        super().__init__()
        self.predict = model if isinstance(model, Predictions) else Predictions(model)
        self.nms = nms if nms is not None else NMSHead()

    def forward(self, images: torch.Tensor):
        return self.nms(self.predict(images))


def export_metadata(model: nn.Module, report: "Report", imgsz: int, *,
                    options: ExportOptions | None = None) -> dict[str, str]:
    """String metadata stored in the ONNX ``metadata_props`` and the TorchScript ``config.txt``.

    Keys: ``task`` (``detect``, or ``segment`` with ``nm`` for a ``DSegment`` model), ``names`` (JSON ``{id: name}``),
    ``nc``, ``stride`` (largest, as the official ``export.py``),
    ``strides``, ``imgsz``, ``output`` (what the outputs hold), ``reparam_version``, ``source_sha256``, ``variant``;
    with NMS also ``nms`` (JSON of :meth:`ExportOptions.nms_settings`, including ``semantics``).
    """
    from ... import __version__

    nms = options.nms_settings() if options is not None else None
    strides = [int(s) for s in torch.as_tensor(model.stride).tolist()]
    names = {str(k): v for k, v in getattr(model, "names", {}).items()}
    if nms:
        output = ("num_dets [batch, 1], boxes [batch, max_det, 4] (xyxy px), scores [batch, max_det], "
                  "labels [batch, max_det]; " + (
                      "multi-label: one detection per (box, class) above score_thres (as official val.py)"
                      if nms["multi_label"] else
                      "best class: one detection per box, its best class (as official detect.py)"))
    elif is_segmentation(model):
        output = ("output0 [batch, 4 + nc + nm, anchors]: box xywh in input pixels, class scores, then nm mask "
                  "coefficients; output1 [batch, nm, height / 4, width / 4]: mask prototypes (mask = "
                  "sigmoid(coefficients @ prototypes), as the official segment/predict.py)")
    else:
        output = "output0 [batch, 4 + nc, anchors]: box xywh in input pixels, then class scores"
    segment = is_segmentation(model)
    meta = {
        "task": "segment" if segment else "detect",
        "names": json.dumps(names),
        "nc": str(len(names) or model.model[-1].nc),
        "stride": str(max(strides)),
        "strides": json.dumps(strides),
        "imgsz": json.dumps([imgsz, imgsz]),
        "output": output,
        "reparam_version": __version__,
        "source_sha256": str(report.source.sha256 or ""),
        "variant": str(report.variant or ""),
    }
    if segment:
        meta["nm"] = str(model.model[-1].nm)
    if nms:
        meta["nms"] = json.dumps(nms)
    return meta
