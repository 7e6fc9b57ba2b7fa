"""YOLOv9 building blocks and the model graph built from a config dict (reparam's own code).

Blocks match the official WongKinYiu/yolov9 modules in ``state_dict`` keys, instance
attributes and eval-mode numerics; :class:`DetectionModel` builds the graph from a
checkpoint's ``model.yaml`` dict.
"""

from .blocks import (ADown, AConv, CBFuse, CBLinear, Concat, Conv, ELAN1, Proto, RepConvN, RepNBottleneck,
                     RepNCSP, RepNCSPELAN4, Silence, SP, SPPELAN, autopad, fold_batchnorm, fuse_model)
from .graph import BLOCKS, BlockSpec, DetectionModel, SegmentationModel, parse_model, resolve_arg
from .heads import (DDetect, DFL, DSegment, DualDDetect, DualDSegment, TripleDDetect, dist2bbox, make_anchors,
                    make_divisible)
from .segment import Detect, Segment

__all__ = [
    "ADown", "AConv", "CBFuse", "CBLinear", "Concat", "Conv", "ELAN1", "Proto", "RepConvN", "RepNBottleneck",
    "RepNCSP", "RepNCSPELAN4", "Silence", "SP", "SPPELAN", "autopad", "fold_batchnorm", "fuse_model",
    "BLOCKS", "BlockSpec", "DetectionModel", "SegmentationModel", "parse_model", "resolve_arg",
    "DDetect", "DFL", "DSegment", "DualDDetect", "DualDSegment", "TripleDDetect", "dist2bbox", "make_anchors",
    "make_divisible", "Detect", "Segment",
]
