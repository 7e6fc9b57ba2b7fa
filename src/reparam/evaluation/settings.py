"""Settings of one evaluation (the official ``val.py`` defaults)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .. import spec
from ..errors import InvalidInputError


@dataclass(frozen=True)
class EvalSettings:
    """How a model is evaluated.

    Attributes:
        imgsz: long side of the letterboxed images, pixels (rectangular batches add half a stride of padding, as
            the official ``val.py``: 160 runs 160x160 images at 192x192).
        batch: images per forward pass (a model with a fixed batch size uses its own).
        conf: score threshold of the NMS candidates (official val default 0.001).
        iou: NMS IoU threshold (official val default 0.7).
        max_det: detections kept per image (official default 300).
        split: the ``data.yaml`` entry evaluated.
    """

    imgsz: int = spec.DEFAULT_IMGSZ
    batch: int = spec.DEFAULT_EVAL_BATCH
    conf: float = spec.DEFAULT_EVAL_CONF
    iou: float = spec.DEFAULT_EVAL_IOU
    max_det: int = spec.DEFAULT_EVAL_MAX_DET
    split: str = "val"

    def check(self) -> None:
        """Raise InvalidInputError for out-of-range values."""
        if not 32 <= self.imgsz <= 4096:
            raise InvalidInputError(f"--imgsz must be between 32 and 4096 pixels, got {self.imgsz}")
        if self.batch < 1:
            raise InvalidInputError(f"--batch must be >= 1, got {self.batch}")
        if not 0 <= self.conf < 1:
            raise InvalidInputError(f"--conf must be in [0, 1), got {self.conf}")
        if not 0 < self.iou <= 1:
            raise InvalidInputError(f"--iou must be in (0, 1], got {self.iou}")
        if self.max_det < 1:
            raise InvalidInputError(f"--max-det must be >= 1, got {self.max_det}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
