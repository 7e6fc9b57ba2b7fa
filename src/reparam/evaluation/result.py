"""The typed result of one evaluation and its report form."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class ClassMetrics:
    """COCO metrics of one class (None when the class has no label in the dataset)."""

    name: str
    instances: int
    map50_95: float | None
    map50: float | None
    precision: float | None
    recall: float | None


@dataclass
class MaskMetrics:
    """COCO instance-mask metrics (``iouType="segm"``, :func:`.coco.coco_mask_metrics`) of a segmentation model.

    Attributes:
        map50_95, map50, precision, recall: over all classes with labels (fractions in [0, 1]), defined as the box
            metrics of :class:`EvalResult` with mask IoU instead of box IoU.
        per_class: one entry per class id.
        pr_precision: ``[R, nc]`` COCO's interpolated mask precision at IoU 0.5 at the recall points of
            :attr:`EvalCurves.recall` (the mask PR curve of :mod:`.plots`); not in :meth:`to_dict`.
    """

    map50_95: float
    map50: float
    precision: float
    recall: float
    per_class: list[ClassMetrics]
    pr_precision: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """``{map50_95, map50, precision, recall, per_class: {name: {...}}}``."""
        return {"map50_95": self.map50_95, "map50": self.map50, "precision": self.precision, "recall": self.recall,
                "per_class": _per_class(self.per_class)}


def _per_class(per_class: list[ClassMetrics]) -> dict[str, dict[str, Any]]:
    return {c.name: {k: v for k, v in asdict(c).items() if k != "name"} for c in per_class}


@dataclass
class EvalCurves:
    """What the plots of an evaluation show (:mod:`.plots`); not part of the JSON report.

    Attributes:
        recall: ``[R]`` COCO's recall points (101, 0 to 1).
        precision: ``[R, nc]`` COCO's interpolated precision at IoU 0.5 at those recall points (its mean is the
            class's AP50); NaN for a class without labels.
        confusion: ``[nc + 1, nc + 1]`` int64 counts, row = detected class, column = true class, index ``nc`` =
            background (:mod:`.confusion`); confusion_conf, confusion_iou: its thresholds.
    """

    recall: np.ndarray
    precision: np.ndarray
    confusion: np.ndarray
    confusion_conf: float
    confusion_iou: float


@dataclass
class EvalResult:
    """Metrics of one model on one dataset (see :mod:`.coco` for their definitions).

    Attributes:
        form: model form (``dual``, ``pt``, ``safetensors``, ``onnx``, ``torchscript``, ``fused``); path: its file
            (None for an in-memory model).
        map50_95, map50, precision, recall: over all classes with labels (fractions in [0, 1]).
        per_class: one entry per class id.
        dataset: :meth:`Dataset.summary` (digest, source, images, instances, skipped, notes).
        settings: the :class:`~.settings.EvalSettings` used, as a dict, plus the input shapes actually run.
        precision_run: what the forward pass computed in; weights_dtype: the stored weights' dtype.
        seconds: wall time of the pass over the images (load, forward, NMS); images_per_s: images / seconds;
            timing: ``forward_s`` and ``nms_s`` of that pass.
        detections: detections kept over all images.
        curves: the PR curve and confusion matrix (:class:`EvalCurves`), for the plots; not in :meth:`to_dict`.
        task: ``detect`` or ``segment`` (a model with mask coefficients and prototypes).
        masks: a segmentation model's mask metrics (:class:`MaskMetrics`) on a polygon-labelled dataset; None
            otherwise. The box metrics above are there for every model.
        masks_absent: for a segmentation model without ``masks``, why (the dataset has no polygon labels, see
            :meth:`~.dataset.Dataset.masks_problem`); None otherwise.
    """

    form: str
    path: str | None
    map50_95: float
    map50: float
    precision: float
    recall: float
    per_class: list[ClassMetrics]
    dataset: dict[str, Any]
    settings: dict[str, Any]
    precision_run: str = "float32"
    weights_dtype: str = "float32"
    seconds: float = 0.0
    images_per_s: float = 0.0
    detections: int = 0
    timing: dict[str, float] = field(default_factory=dict)
    curves: EvalCurves | None = field(default=None, repr=False)
    task: str = "detect"
    masks: MaskMetrics | None = None
    masks_absent: str | None = None

    def metrics(self) -> dict[str, Any]:
        """``{map50_95, map50, precision, recall, per_class: {name: {...}}, task}`` (the report's model entry; the
        box metrics), plus for a segmentation model ``masks`` (:meth:`MaskMetrics.to_dict`) or ``masks_absent``
        (the reason)."""
        out: dict[str, Any] = {
            "map50_95": self.map50_95, "map50": self.map50, "precision": self.precision, "recall": self.recall,
            "per_class": _per_class(self.per_class), "task": self.task,
        }
        if self.masks is not None:
            out["masks"] = self.masks.to_dict()
        elif self.masks_absent is not None:
            out["masks_absent"] = self.masks_absent
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready."""
        return {"format": self.form, "path": self.path, **self.metrics(), "dataset": self.dataset,
                "settings": self.settings, "precision_run": self.precision_run, "weights_dtype": self.weights_dtype,
                "seconds": self.seconds, "images_per_s": self.images_per_s, "detections": self.detections,
                "timing": dict(self.timing)}
