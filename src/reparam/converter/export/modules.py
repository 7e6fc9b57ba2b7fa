"""What is exported: the deploy model wrapped to return only its decoded prediction (optionally followed by NMS),
and the metadata every artifact carries."""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from torch import nn

from ...errors import InvalidInputError
from ...models.heads import DDetect
from .nms import NMSHead
from ..validation import main_output
from .options import ExportOptions

__all__ = ["deploy_head", "Predictions", "EndToEnd", "export_metadata"]


def deploy_head(model: nn.Module) -> DDetect:
    """The model's ``DDetect`` head; InvalidInputError for anything else (a dual head is never exported)."""
    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    if type(head) is not DDetect:
        raise InvalidInputError(
            f"export needs a deploy detection model (head DDetect), got head {type(head).__name__}: a dual model is "
            "never exported as is (its first output would be the auxiliary branch); convert it first")
    return head


class Predictions(nn.Module):
    """A deploy model that returns only its decoded prediction.

    Args:
        model: a deploy ``DetectionModel`` (head ``DDetect``); it is deep-copied and its head's ``export`` flag set.

    Shapes: ``images [B, 3, H, W] -> y [B, 4 + nc, A]`` (xywh in input pixels, then class scores).
    Raises InvalidInputError for a model whose head is not ``DDetect``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        deploy_head(model)
        self.model = copy.deepcopy(model).eval()
        self.model.model[-1].export = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return main_output(self.model(images))


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


def export_metadata(model: nn.Module, report: dict[str, Any], imgsz: int, *,
                    options: ExportOptions | None = None) -> dict[str, str]:
    """String metadata stored in the ONNX ``metadata_props`` and the TorchScript ``config.txt``.

    Keys: ``task``, ``names`` (JSON ``{id: name}``), ``nc``, ``stride`` (largest, as the official ``export.py``),
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
    else:
        output = "output0 [batch, 4 + nc, anchors]: box xywh in input pixels, then class scores"
    meta = {
        "task": "detect",
        "names": json.dumps(names),
        "nc": str(len(names) or model.model[-1].nc),
        "stride": str(max(strides)),
        "strides": json.dumps(strides),
        "imgsz": json.dumps([imgsz, imgsz]),
        "output": output,
        "reparam_version": __version__,
        "source_sha256": str((report.get("source") or {}).get("sha256", "")),
        "variant": str(report.get("variant", "")),
    }
    if nms:
        meta["nms"] = json.dumps(nms)
    return meta
