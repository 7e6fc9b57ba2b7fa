"""The export settings and their defaults: the one place they live (torch-free, so the CLI reads them cheaply).

The CLI's ``--opset``, ``--iou-thres``, ``--score-thres``, ``--max-det``, ``--export-atol`` defaults,
:class:`~reparam.converter.convert.ConvertOptions` and the export step all read :class:`ExportOptions`' defaults.
The NMS defaults (IoU 0.45, score 0.25, 300 detections) are those of the official YOLOv9 ``detect.py``
(WongKinYiu/yolov9, ``--iou-thres``, ``--conf-thres``, ``--max-det``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from ...errors import InvalidInputError

__all__ = ["ExportOptions", "EXPORT_DEFAULTS", "MIN_OPSET", "HALF_RTOL", "max_opset", "check_export_options"]

#: Lowest ONNX opset the graphs need (ScatterElements, NonMaxSuppression with these inputs).
MIN_OPSET = 11
#: fp16 runs are compared with ``max(export_atol, HALF_RTOL x max|reference|)`` (fp16 has 11 significant bits).
HALF_RTOL = 2e-3


def max_opset() -> int:
    """Highest opset torch's TorchScript-based ONNX exporter writes (20 when torch does not say)."""
    try:
        from torch.onnx import _constants

        return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
    except Exception:  # pragma: no cover - private module moved
        return 20


@dataclass(frozen=True)
class ExportOptions:
    """Settings of the ONNX / TorchScript export and its check.

    Attributes:
        opset: ONNX opset (:data:`MIN_OPSET` .. :func:`max_opset`).
        dynamic: ONNX with symbolic ``batch``, ``height``, ``width`` (input) and ``anchors`` (``output0``); the
            class dimension ``4 + nc`` stays static.
        nms: append ``NonMaxSuppression`` (end-to-end graph, :mod:`reparam.converter.export.nms`).
        multi_label: NMS keeps every (box, class) pair above ``score_thres`` (as the official ``val.py``); default
            one detection per box with its best class (as the official ``detect.py``).
        iou_thres: NMS IoU threshold (a lower-scored box of the same class is dropped when IoU > this).
        score_thres: NMS score threshold (a candidate needs a class score > this), in [0, 1).
        max_det: detections per image in the end-to-end outputs (>= 1).
        export_atol: max |artifact - torch| of an fp32 export check, in output units (pixels / probability).
    """

    opset: int = 17
    dynamic: bool = False
    nms: bool = False
    multi_label: bool = False
    iou_thres: float = 0.45
    score_thres: float = 0.25
    max_det: int = 300
    export_atol: float = 1e-3

    @classmethod
    def from_convert(cls, options: Any) -> "ExportOptions":
        """The export settings of a :class:`~reparam.converter.convert.ConvertOptions` (its ``onnx`` dict and
        ``export_atol``); keys the dict does not hold take the defaults. Unknown keys: InvalidInputError."""
        onnx: Mapping[str, Any] = getattr(options, "onnx", None) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(onnx) - known)
        if unknown:
            raise InvalidInputError(f"unknown ONNX option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = dict(onnx)
        values.setdefault("export_atol", getattr(options, "export_atol", cls.export_atol))
        return cls(**values)

    def nms_settings(self) -> dict[str, Any] | None:
        """What the end-to-end graph records (report, metadata) about its NMS, or None without ``nms``."""
        if not self.nms:
            return None
        return {"iou_thres": float(self.iou_thres), "score_thres": float(self.score_thres),
                "max_det": int(self.max_det), "multi_label": bool(self.multi_label),
                "semantics": "multi-label" if self.multi_label else "best-class"}

    def check(self, formats: tuple[str, ...] | list[str]) -> None:
        """Raise InvalidInputError (one line naming the flag) for settings that cannot work with ``formats``."""
        wants_onnx = "onnx" in formats
        for flag, on in (("nms", self.nms), ("dynamic", self.dynamic), ("multi-label", self.multi_label)):
            if on and not wants_onnx:
                raise InvalidInputError(f"--{flag} applies to the ONNX export; add --format onnx")
        if self.multi_label and not self.nms:
            raise InvalidInputError("--multi-label chooses the NMS semantics; add --nms")
        hi = max_opset() if wants_onnx else MIN_OPSET  # asks torch: only when an ONNX file is wanted
        if wants_onnx and not (MIN_OPSET <= int(self.opset) <= hi):
            raise InvalidInputError(
                f"--opset {self.opset} is not supported: choose {MIN_OPSET}..{hi} (default {EXPORT_DEFAULTS.opset})")
        if self.nms:
            if not 0.0 <= float(self.iou_thres) <= 1.0:
                raise InvalidInputError(f"--iou-thres must be in [0, 1], got {self.iou_thres}")
            if not 0.0 <= float(self.score_thres) < 1.0:
                raise InvalidInputError(f"--score-thres must be in [0, 1), got {self.score_thres}")
            if int(self.max_det) < 1:
                raise InvalidInputError(f"--max-det must be >= 1, got {self.max_det}")
        if not float(self.export_atol) > 0:
            raise InvalidInputError(f"--export-atol must be > 0, got {self.export_atol}")


#: The defaults, for readers that need one value (argparse, ConvertOptions).
EXPORT_DEFAULTS = ExportOptions()


def check_export_options(options: Any) -> None:
    """Raise InvalidInputError for export settings of a ``ConvertOptions`` that cannot work (its ``check``)."""
    ExportOptions.from_convert(options).check(tuple(options.formats))
