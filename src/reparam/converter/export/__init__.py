"""ONNX and TorchScript export of a deploy model, each checked against torch before it is published.

What is exported is always the *deploy* model (head ``DDetect``; a dual model is refused), wrapped so the graph
returns only the decoded prediction, never the raw per-level maps:

* ONNX (``<stem>-converted.onnx``): input ``images [B, 3, H, W]``, one output ``output0 [B, 4 + nc, A]`` (box
  xywh in input pixels, then class scores), as the official YOLOv9 deploy models export it. Static ``[1, 3, s, s]``
  at ``--imgsz`` unless ``--dynamic``: then the input is ``[batch, 3, height, width]`` and ``output0``
  ``[batch, 4 + nc, anchors]`` (``4 + nc`` static). Metadata (``metadata_props``): ``names`` (JSON ``{id: name}``),
  ``stride`` (largest stride, as official ``export.py``), ``strides``, ``nc``, ``imgsz``, ``task``, ``output``,
  ``reparam_version``, ``source_sha256``, ``variant``, and with NMS ``nms`` (settings and ``semantics``).
* ONNX with ``--nms`` (``<stem>-converted-end2end.onnx``): the same prediction followed by NMS (best class per box
  by default, ``--multi-label`` per class: :mod:`reparam.converter.export.nms`), outputs ``num_dets [B, 1]``,
  ``boxes [B, max_det, 4]`` xyxy pixels, ``scores [B, max_det]``, ``labels [B, max_det]`` (int64; padding 0, 0, -1);
  a segmentation model adds ``mask_coefficients [B, max_det, nm]`` (the selected detections' raw coefficients,
  padding 0) and ``output1`` (the prototypes, as without NMS).
* TorchScript (``<stem>-converted.torchscript``): ``torch.jit.trace`` of the same wrapper (shapes stay free: the
  anchor grid is computed from the feature maps); ``config.txt`` extra file holds the metadata as JSON.

Modules: :mod:`.options` (the one settings type, :class:`ExportOptions`, and its defaults; torch-free),
:mod:`.modules` (what is exported), :mod:`.onnx_graph`, :mod:`.torchscript`, :mod:`.checks` (the rules of a check)
and :mod:`.pipeline` (:func:`export_all`). Importing this package loads only :mod:`.options`; the other names are
loaded (with torch) on first use.

Errors: :class:`~reparam.errors.InvalidInputError` for a non-deploy model or bad option combinations,
:class:`~reparam.errors.ValidationFailedError` when a check fails (nothing is published; see
:func:`reparam.converter.artifacts.write_all`).
"""

from __future__ import annotations

import importlib
from typing import Any

from .options import EXPORT_DEFAULTS, HALF_RTOL, MIN_OPSET, ExportOptions, check_export_options, max_opset

_LAZY = {
    "deploy_head": "modules", "Predictions": "modules", "EndToEnd": "modules", "export_metadata": "modules",
    "INPUT_NAME": "onnx_graph", "OUTPUT_NAME": "onnx_graph", "export_onnx": "onnx_graph",
    "upcast_onnx": "onnx_graph", "run_onnx": "onnx_graph", "with_nms_inputs": "onnx_graph",
    "export_torchscript": "torchscript",
    "compare_detections": "checks", "run_checks": "checks",
    "export_all": "pipeline",
}

__all__ = ["ExportOptions", "EXPORT_DEFAULTS", "HALF_RTOL", "MIN_OPSET", "check_export_options", "max_opset",
           *_LAZY]


def __getattr__(name: str) -> Any:
    """Load torch-backed names on first use (PEP 562), so the CLI reads the defaults without importing torch."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
