"""Evaluate any model form on a YOLO-layout dataset the way the official ``val.py`` does, scored by pycocotools.

Public API (used by ``reparam evaluate``, ``reparam convert --eval-data`` and the registry's promotion gates)::

    from reparam.evaluation import EvalSettings, evaluate_file, open_dataset, evaluate_model, load_model

    result = evaluate_file("best.pt", "s3://bucket/datasets/val", EvalSettings(imgsz=640))
    result.map50_95, result.map50, result.per_class, result.dataset["digest"], result.to_dict()

Modules: :mod:`.dataset` (fetch, check, digest), :mod:`.letterbox` (official pre-processing), :mod:`.backends`
(model forms), :mod:`.coco` (pycocotools metrics), :mod:`.confusion` (confusion matrix), :mod:`.evaluate` (the loop),
:mod:`.plots` (PR curve, confusion matrix PNGs and tables), :mod:`.settings`, :mod:`.result`.
Needs the ``[converter]`` extra (torch, opencv-python-headless, pycocotools, matplotlib).
"""

from .backends import LoadedModel, from_module, load_model
from .dataset import Dataset, check_names, load_dataset
from .evaluate import (DEFAULT_EVAL_ATOL, DatasetDetections, comparison, describe, detect_dataset, evaluate_file,
                       evaluate_model, open_dataset, with_shape_of)
from .result import ClassMetrics, EvalCurves, EvalResult
from .settings import EvalSettings

__all__ = ["EvalSettings", "EvalResult", "EvalCurves", "ClassMetrics", "DatasetDetections", "detect_dataset", "Dataset",
           "LoadedModel", "load_model", "from_module", "load_dataset", "open_dataset", "check_names", "evaluate_model",
           "evaluate_file", "comparison", "describe",
           "with_shape_of", "DEFAULT_EVAL_ATOL"]
