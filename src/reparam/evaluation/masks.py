"""Instance masks of a segmentation model, and of polygon labels, as COCO run-length encodings (RLE).

Predicted masks follow the rules of WongKinYiu/yolov9 ``segment/val.py`` on its COCO-JSON path (the one scored by
pycocotools), written here from their description (``utils/segment/general.py``):

* ``process_mask_upsample``: mask logits = coefficients ``[n, nm]`` x prototypes ``[nm, h_p * w_p]``, sigmoid,
  bilinear upsampling (``align_corners=False``) to the letterboxed input size, every pixel outside the detection's
  box (input pixels) set to 0, then threshold ``> 0.5``;
* ``scale_image``: the letterbox padding is cut off (``int`` of the pad on the top/left, ``int(size - pad)`` on the
  bottom/right) and the rest resized to the native image with OpenCV (bilinear, on the 0/1 ``uint8`` mask);
* ``save_one_json``: each mask becomes a COCO RLE (``pycocotools.mask.encode`` of a Fortran-ordered ``uint8``).

Ground truth: a polygon label (normalised ``x, y`` points) becomes a native-pixel COCO polygon; pycocotools
rasterises it (``frPyObjects``) itself, as for the official COCO annotations.

Masks are made ``chunk`` detections at a time, so memory stays at ``chunk x H x W`` floats whatever ``max_det``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: a mask pixel is on when its sigmoid probability is above this (official ``gt_(0.5)``)
MASK_THRESHOLD = 0.5
#: detections turned into masks at once
CHUNK = 32


def crop_to_boxes(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``masks [n, H, W]`` with every pixel outside its box set to 0.

    ``boxes [n, 4]`` ``x1, y1, x2, y2`` in the masks' pixel units; pixel column ``c`` is inside when
    ``x1 <= c < x2`` (row likewise), as the official ``crop_mask``.
    """
    n, h, w = masks.shape
    x1, y1, x2, y2 = (boxes[:, k, None, None] for k in range(4))
    cols = torch.arange(w, dtype=boxes.dtype, device=masks.device)[None, None, :]
    rows = torch.arange(h, dtype=boxes.dtype, device=masks.device)[None, :, None]
    return masks * ((cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2))


def input_masks(protos: torch.Tensor, coefficients: torch.Tensor, boxes: torch.Tensor,
                shape: tuple[int, int]) -> torch.Tensor:
    """Binary masks at the model input size (official ``process_mask_upsample``).

    Args:
        protos: ``[nm, h_p, w_p]`` prototypes of one image.
        coefficients: ``[n, nm]`` mask coefficients of its detections (raw, before the sigmoid).
        boxes: ``[n, 4]`` ``x1, y1, x2, y2`` in input pixels.
        shape: ``(H, W)`` of the model input (the letterboxed canvas), pixels.

    Returns:
        ``[n, H, W]`` bool.
    """
    nm, mh, mw = protos.shape
    logits = (coefficients.float() @ protos.float().reshape(nm, -1)).sigmoid().reshape(-1, mh, mw)
    up = F.interpolate(logits[None], size=tuple(shape), mode="bilinear", align_corners=False)[0]
    return crop_to_boxes(up, boxes.float()) > MASK_THRESHOLD


def native_masks(masks: torch.Tensor, pad: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
    """Input-size masks mapped to the native image (official ``scale_image``).

    Args:
        masks: ``[n, H, W]`` bool at the input size.
        pad: the letterbox ``(pad_w, pad_h)`` in pixels (:func:`~.letterbox.letterbox`).
        size: native ``(h0, w0)``.

    Returns:
        ``[n, h0, w0]`` uint8 (0/1).
    """
    import cv2

    n, h, w = masks.shape
    top, left = int(pad[1]), int(pad[0])
    bottom, right = int(h - pad[1]), int(w - pad[0])
    m = masks[:, top:bottom, left:right].to(torch.uint8).numpy()
    out = np.empty((n, size[0], size[1]), dtype=np.uint8)
    for i in range(n):
        out[i] = cv2.resize(m[i], (size[1], size[0]))
    return out


def encode(masks: np.ndarray) -> list[dict[str, Any]]:
    """``[n, h, w]`` 0/1 masks as COCO RLEs (``{"size": [h, w], "counts": str}``, pycocotools)."""
    from pycocotools import mask as mask_utils

    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return list(rles)


def image_rles(protos: torch.Tensor, coefficients: torch.Tensor, boxes: torch.Tensor, shape: tuple[int, int],
               pad: tuple[float, float], size: tuple[int, int], chunk: int = CHUNK) -> list[dict[str, Any]]:
    """The RLEs of one image's detections in native pixels (:func:`input_masks`, :func:`native_masks`,
    :func:`encode`), ``chunk`` detections at a time.

    Args:
        protos: ``[nm, h_p, w_p]``; coefficients: ``[n, nm]``; boxes: ``[n, 4]`` xyxy in input pixels.
        shape: ``(H, W)`` input size; pad: letterbox ``(pad_w, pad_h)``; size: native ``(h0, w0)``.

    Returns:
        ``n`` RLE dicts, in the detections' order.
    """
    out: list[dict[str, Any]] = []
    for start in range(0, len(boxes), chunk):
        m = input_masks(protos, coefficients[start:start + chunk], boxes[start:start + chunk], shape)
        out += encode(native_masks(m, pad, size))
    return out


def polygon_annotation(polygon_px: np.ndarray) -> list[list[float]]:
    """A native-pixel polygon ``[K, 2]`` as a COCO ``segmentation`` (one flat ``x1, y1, x2, y2 ...`` list)."""
    return [np.asarray(polygon_px, dtype=np.float64).reshape(-1).tolist()]


def polygon_masks(polygons_px: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Rasterise native-pixel polygons the way pycocotools does for a COCO ground truth (``frPyObjects`` +
    ``decode``): ``[n, h0, w0]`` uint8 for ``size (h0, w0)``."""
    from pycocotools import mask as mask_utils

    h, w = size
    if not polygons_px:
        return np.zeros((0, h, w), dtype=np.uint8)
    rles = [mask_utils.merge(mask_utils.frPyObjects(polygon_annotation(p), h, w)) for p in polygons_px]
    return np.asarray(mask_utils.decode(rles), dtype=np.uint8).transpose(2, 0, 1)


__all__ = ["MASK_THRESHOLD", "CHUNK", "crop_to_boxes", "input_masks", "native_masks", "encode", "image_rles",
           "polygon_annotation", "polygon_masks"]
