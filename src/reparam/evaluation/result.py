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

    def metrics(self) -> dict[str, Any]:
        """``{map50_95, map50, precision, recall, per_class: {name: {...}}}`` (the report's model entry)."""
        return {
            "map50_95": self.map50_95, "map50": self.map50, "precision": self.precision, "recall": self.recall,
            "per_class": {c.name: {k: v for k, v in asdict(c).items() if k != "name"} for c in self.per_class},
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready."""
        return {"format": self.form, "path": self.path, **self.metrics(), "dataset": self.dataset,
                "settings": self.settings, "precision_run": self.precision_run, "weights_dtype": self.weights_dtype,
                "seconds": self.seconds, "images_per_s": self.images_per_s, "detections": self.detections,
                "timing": dict(self.timing)}
