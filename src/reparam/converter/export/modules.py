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
from ...models.segment import Segment
from .nms import NMSHead
from ..validation import main_output
from .options import ExportOptions

if TYPE_CHECKING:
    from ...report import Report

__all__ = ["deploy_head", "is_segmentation", "check_export_target", "Predictions", "EndToEnd", "export_metadata"]


def deploy_head(model: nn.Module) -> nn.Module:
    """The model's ``DDetect``, ``DSegment`` or ``Segment`` head; InvalidInputError for anything else (a dual head
    is never exported)."""
    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    if type(head) not in (DDetect, DSegment, Segment):
        raise InvalidInputError(
            f"export needs a deploy model (head DDetect, DSegment or Segment), got head {type(head).__name__}: a dual "
            "model is never exported as is (its first output would be the auxiliary branch); convert it first")
    return head


def is_segmentation(model: nn.Module) -> bool:
    """True when ``model``'s head is ``DSegment`` or ``Segment`` (two outputs: ``output0`` and the prototypes
    ``output1``)."""
    return isinstance(deploy_head(model), (DSegment, Segment))


def check_export_target(model: nn.Module, formats: tuple[str, ...], nms: bool) -> None:
    """Refuse, before any work, an export this model cannot have: a model without a deploy head (:func:`deploy_head`).
    Every format/NMS combination a detection model has, a segmentation model has too (``--nms``: the end-to-end graph
    also returns the selected detections' mask coefficients and the prototypes). Raises InvalidInputError (one
    line)."""
    if {"onnx", "torchscript"} & set(formats):
        deploy_head(model)


class Predictions(nn.Module):
    """A deploy model that returns only its decoded prediction.

    Args:
        model: a deploy ``DetectionModel`` (head ``DDetect``); it is deep-copied and its head's ``export`` flag set.

    Shapes: ``images [B, 3, H, W] -> y [B, 4 + nc, A]`` (xywh in input pixels, then class scores). A segmentation
    model (``DSegment``) returns ``(y [B, 4 + nc + nm, A], protos [B, nm, H/4, W/4])``: ``y`` ends with the ``nm``
    raw mask coefficients, ``protos`` are the mask prototypes (YOLOv9 ``DSegment`` in export mode).
    Raises InvalidInputError for a model whose head is neither ``DDetect`` nor ``DSegment``.

    Attributes: ``segmentation`` (bool) and ``nm`` (mask coefficients per anchor; 0 for detection).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        head = deploy_head(model)
        self.model = copy.deepcopy(model).eval()
        self.model.model[-1].export = True
        self.segmentation = is_segmentation(model)
        self.nm = int(head.nm) if self.segmentation else 0

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
            settings). Its ``nm`` is set to the model's (0 for detection).

    Shapes: ``images [B, 3, H, W] -> (num_dets [B, 1] int64, boxes [B, max_det, 4] xyxy px, scores [B, max_det],
    labels [B, max_det] int64)``. A segmentation model (``DSegment``) adds ``mask_coefficients [B, max_det, nm]``
    (the selected detections' raw coefficients, 0 past ``num_dets``) and the prototypes ``[B, nm, H/4, W/4]``
    unchanged (``output1``): a detection's mask is ``sigmoid(mask_coefficients[j] @ prototypes.view(nm, -1))``
    reshaped to ``[H/4, W/4]`` and cropped to its box, as the official ``segment/predict.py`` (``process_mask``).
    """

    def __init__(self, model: nn.Module, nms: NMSHead | None = None):
        super().__init__()
        self.predict = model if isinstance(model, Predictions) else Predictions(model)
        self.nms = nms if nms is not None else NMSHead()
        self.nms.nm = self.predict.nm
        self.segmentation = self.predict.segmentation

    def forward(self, images: torch.Tensor):
        if self.segmentation:
            y, protos = self.predict(images)
            return (*self.nms(y), protos)
        return self.nms(self.predict(images))


def names_from_metadata(text: str) -> dict[int, str]:
    """Class names from the ``names`` metadata of an export: the official Python literal (``{0: 'red'}``, what
    :func:`export_metadata` writes) or the JSON with string keys of reparam's earlier files (``{"0": "red"}``).
    Parsed with :func:`ast.literal_eval` (literals only, never code).

    Raises:
        ValueError: not a literal mapping of class ids to names.
    """
    import ast

    try:
        value = ast.literal_eval(text)
    except (SyntaxError, ValueError) as exc:
        raise ValueError(f"names is not a literal mapping ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError("names is not a mapping")
    return {int(k): str(v) for k, v in value.items()}


def export_metadata(model: nn.Module, report: "Report", imgsz: int, *,
                    options: ExportOptions | None = None) -> dict[str, str]:
    """String metadata stored in the ONNX ``metadata_props`` and the TorchScript ``config.txt``.

    Keys: ``task`` (``detect``, or ``segment`` with ``nm`` for a ``DSegment`` model), ``names`` (``{id: name}`` as a
    Python literal with int keys, ``{0: 'red', 1: 'green'}``, as the official ``export.py`` writes it: the official
    ``DetectMultiBackend`` reads it with ``eval`` and indexes it by class id; :func:`names_from_metadata` reads it),
    ``nc``, ``stride`` (largest, as the official ``export.py``),
    ``strides``, ``imgsz``, ``output`` (what the outputs hold), ``reparam_version``, ``source_sha256``, ``variant``;
    with NMS also ``nms`` (JSON of :meth:`ExportOptions.nms_settings`, including ``semantics``).
    """
    from ... import __version__

    nms = options.nms_settings() if options is not None else None
    strides = [int(s) for s in torch.as_tensor(model.stride).tolist()]
    names = {int(k): str(v) for k, v in getattr(model, "names", {}).items()}
    segment = is_segmentation(model)
    if nms:
        output = ("num_dets [batch, 1], boxes [batch, max_det, 4] (xyxy px), scores [batch, max_det], "
                  "labels [batch, max_det]; " + (
                      "mask_coefficients [batch, max_det, nm] (raw, of the same detections), output1 [batch, nm, "
                      "height / 4, width / 4]: mask prototypes (mask = sigmoid(coefficients @ prototypes), as the "
                      "official segment/predict.py); " if segment else "") + (
                      "multi-label: one detection per (box, class) above score_thres (as official val.py)"
                      if nms["multi_label"] else
                      "best class: one detection per box, its best class (as official detect.py)"))
    elif segment:
        output = ("output0 [batch, 4 + nc + nm, anchors]: box xywh in input pixels, class scores, then nm mask "
                  "coefficients; output1 [batch, nm, height / 4, width / 4]: mask prototypes (mask = "
                  "sigmoid(coefficients @ prototypes), as the official segment/predict.py)")
    else:
        output = "output0 [batch, 4 + nc, anchors]: box xywh in input pixels, then class scores"
    meta = {
        "task": "segment" if segment else "detect",
        "names": str(names),
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
