"""Pre-processing the way the official validation does it, and mapping boxes back to the original image.

Rules of WongKinYiu/yolov9 ``utils/dataloaders.py`` (``LoadImagesAndLabels`` with ``rect=True, pad=0.5``,
``load_image``, ``utils/augmentations.py letterbox``) and ``utils/general.py scale_boxes``/``clip_boxes``, as
``val.py`` uses them:

* images are read with OpenCV (BGR, converted to RGB; on the fixture JPEGs OpenCV 5.0 and Pillow 13 decode every
  pixel identically, both being libjpeg-turbo, so the choice of library does not move the numbers there), resized
  so the long side is ``imgsz`` (``INTER_AREA`` when shrinking, ``INTER_LINEAR`` when enlarging; sizes rounded up);
* rectangular batches: images are ordered by aspect ratio ``h / w``, cut into batches, and each batch gets one shape
  ``ceil(shape * imgsz / stride + pad) * stride`` (``pad`` 0.5), so a 160x160 image at ``imgsz`` 160 runs at 192x192;
* letterbox without enlarging: the image is centred on a canvas of that shape filled with grey 114;
* predicted boxes go back to the original image: minus the padding, divided by the resize gain, clipped.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

PAD_VALUE = 114
#: the official ``pad`` of validation batches, in strides
RECT_PAD = 0.5


def rect_batches(sizes: Sequence[tuple[int, int]], batch: int, imgsz: int, stride: int,
                 pad: float = RECT_PAD) -> list[tuple[list[int], tuple[int, int]]]:
    """Official rectangular batching.

    Args:
        sizes: native ``(width, height)`` of each image, in pixels.
        batch: images per batch; imgsz: long side in pixels; stride: the model's largest stride.

    Returns:
        ``[(image indices, (height, width) of the batch canvas)]`` in evaluation order.
    """
    s = np.array(sizes, dtype=np.float64).reshape(-1, 2)
    ar = s[:, 1] / s[:, 0]
    order = ar.argsort()
    ar = ar[order]
    out = []
    for start in range(0, len(order), batch):
        part = ar[start:start + batch]
        lo, hi = part.min(), part.max()
        shape = [1.0, 1.0]
        if hi < 1:
            shape = [hi, 1.0]
        elif lo > 1:
            shape = [1.0, 1.0 / lo]
        hw = np.ceil(np.array(shape) * imgsz / stride + pad).astype(int) * stride
        out.append(([int(i) for i in order[start:start + batch]], (int(hw[0]), int(hw[1]))))
    return out


def square_batches(n: int, batch: int, shape: tuple[int, int]) -> list[tuple[list[int], tuple[int, int]]]:
    """Batches of a model with a fixed input ``shape (h, w)``: file order, every image letterboxed to ``shape``."""
    return [(list(range(i, min(n, i + batch))), shape) for i in range(0, n, batch)]


def load_image(path: str, imgsz: int) -> tuple[np.ndarray, tuple[int, int]] | tuple[None, None]:
    """Read an image (BGR ``[h, w, 3]`` uint8) resized so its long side is ``imgsz``; ``(None, None)`` if unreadable.

    Returns ``(image, (h0, w0))`` with the native size.
    """
    import cv2

    im = cv2.imread(str(path))
    if im is None:
        return None, None
    h0, w0 = im.shape[:2]
    r = imgsz / max(h0, w0)
    if r != 1:
        interp = cv2.INTER_LINEAR if r > 1 else cv2.INTER_AREA
        im = cv2.resize(im, (math.ceil(w0 * r), math.ceil(h0 * r)), interpolation=interp)
    return im, (h0, w0)


def letterbox(im: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, tuple[float, float]]:
    """Centre ``im [h, w, 3]`` on a ``shape (h, w)`` canvas of grey 114, shrinking (never enlarging) it to fit.

    Returns ``(canvas, (pad_w, pad_h))`` where the pads are the (fractional) left/top offsets in pixels.
    """
    import cv2

    h, w = im.shape[:2]
    r = min(shape[0] / h, shape[1] / w, 1.0)
    new_w, new_h = int(round(w * r)), int(round(h * r))
    dw, dh = (shape[1] - new_w) / 2, (shape[0] - new_h) / 2
    if (w, h) != (new_w, new_h):
        im = cv2.resize(im, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return im, (dw, dh)


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """BGR ``[h, w, 3]`` uint8 images of one shape -> RGB ``[B, 3, h, w]`` float32 in [0, 1]."""
    arr = np.ascontiguousarray(np.stack(images)[..., ::-1].transpose(0, 3, 1, 2))
    return torch.from_numpy(arr).float().div_(255.0)


def scale_boxes(boxes: torch.Tensor, gain: float, pad: tuple[float, float], size: tuple[int, int]) -> torch.Tensor:
    """Map ``boxes [N, 4]`` xyxy from the canvas back to the native image ``size (h0, w0)``, clipped to it.

    ``gain`` is the resize gain (resized height / native height, as the official ``shapes`` record it) and ``pad``
    the letterbox ``(pad_w, pad_h)``.
    """
    b = boxes.clone()
    b[:, [0, 2]] -= pad[0]
    b[:, [1, 3]] -= pad[1]
    b /= gain
    b[:, [0, 2]] = b[:, [0, 2]].clamp(0, size[1])
    b[:, [1, 3]] = b[:, [1, 3]].clamp(0, size[0])
    return b
