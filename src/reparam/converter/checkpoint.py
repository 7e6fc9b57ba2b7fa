"""What a YOLOv9 training checkpoint holds, read through :mod:`reparam.converter.safe_load`.

``train.py``/``train_dual.py`` (WongKinYiu/yolov9 ``train_dual.py``, the ``ckpt`` dict saved each epoch) write::

    {'epoch': int, 'best_fitness': ndarray|None, 'model': DetectionModel (fp16), 'ema': DetectionModel|None,
     'updates': int|None, 'optimizer': state dict|None, 'opt': vars(argparse), 'git': dict|None, 'date': str}

``strip_optimizer`` (run on best.pt/last.pt at the end of training) replaces ``model`` by the EMA and sets
``ema``, ``optimizer``, ``updates``, ``best_fitness`` to None and ``epoch`` to -1. Mid-training files
(``last.pt``, ``epochN.pt``) keep the raw weights under ``model`` and the EMA under ``ema``; the EMA is the model
that was validated, so it is the one to deploy.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInputError
from .safe_load import ObjectRecord, load_pickle

#: Top-level entries that are training state, dropped from the deploy checkpoint (report lists them).
TRAINING_KEYS = ("optimizer", "ema", "updates", "best_fitness", "opt", "git", "date", "epoch", "results", "wandb_id")
#: Model attributes that are training state (hyperparameters, class weights), dropped from the deploy model.
TRAINING_MODEL_ATTRS = ("hyp", "class_weights")


@dataclass
class Checkpoint:
    """A parsed YOLOv9 checkpoint.

    Attributes:
        path: the file.
        cfg: the model config dict (``model.yaml``).
        nc: number of classes; ``names``: class id -> name (dict, as the official code stores it).
        stride: detection strides, e.g. ``[8.0, 16.0, 32.0]`` (pixels).
        state_dict: ``model.<i>.…`` -> tensor, in the saved dtype (fp16 for official checkpoints).
        weights: ``"ema"`` when the EMA model was taken (mid-training file), else ``"model"``.
        model_class: the pickled model class (``models.yolo.DetectionModel``).
        top_level: top-level key -> typed summary of what it held (:func:`summarize`; inspect and report).
        package_prefix: prefix of the official module layout in the pickle (``""``; ``"yolov9."`` for a
            pip-installed fork), see :data:`reparam.converter.safe_load.OFFICIAL_PACKAGE_PREFIXES`.
        globals: pickle globals the file references.
        file_bytes: size of the file in bytes.
        model_attrs: plain (non-module) attributes of the pickled model, e.g. ``yaml_file``, ``inplace``.
    """

    path: Path
    cfg: dict[str, Any]
    nc: int
    names: dict[int, str]
    stride: list[float]
    state_dict: "OrderedDict[str, torch.Tensor]"
    weights: str
    model_class: str
    top_level: dict[str, Any]
    globals: list[str]
    file_bytes: int
    model_attrs: dict[str, Any] = field(default_factory=dict)
    ema_differs_by: float | None = None
    package_prefix: str = ""

    @property
    def head_name(self) -> str:
        """Module name of the last layer (``DualDDetect``, ``DDetect`` …)."""
        layers = list(self.cfg.get("backbone", [])) + list(self.cfg.get("head", []))
        return str(layers[-1][2]).rsplit(".", 1)[-1] if layers else "?"

    @property
    def dtype(self) -> str:
        """The floating dtype of the saved weights (``"float16"``)."""
        for t in self.state_dict.values():
            if t.is_floating_point():
                return str(t.dtype).replace("torch.", "")
        return "?"


#: Bounds of :func:`summarize`: nesting depth, list items and dict entries shown before a count replaces them.
SUMMARY_DEPTH, SUMMARY_ITEMS, SUMMARY_ENTRIES, SUMMARY_TEXT = 3, 16, 64, 200


def summarize(value: Any, depth: int = 0) -> Any:
    """A typed, JSON-able, bounded summary of one checkpoint entry (for ``inspect`` and the report).

    Plain values keep their type (``epoch`` -> ``11``, ``best_fitness`` ndarray ``[0.5886]`` -> ``[0.5886]``, numpy
    scalars -> Python numbers, ``None`` -> ``null``); models become ``{"type": <pickled class>, "tensors": n,
    "elements": n}``, tensors ``{"type": "tensor", "shape": [...], "dtype": "float16"}``. Containers are shown up to
    :data:`SUMMARY_DEPTH` levels, :data:`SUMMARY_ITEMS` list items and :data:`SUMMARY_ENTRIES` dict entries; past
    that a count replaces them (``{"type": "dict", "entries": 1772}``). Strings are cut at :data:`SUMMARY_TEXT`.
    """
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, np.generic):
        return summarize(value.item(), depth)
    if isinstance(value, str):
        return value if len(value) <= SUMMARY_TEXT else value[: SUMMARY_TEXT - 3] + "..."
    if isinstance(value, np.ndarray):
        if value.size <= SUMMARY_ITEMS and value.ndim <= 1:
            return [summarize(x, depth + 1) for x in np.asarray(value).reshape(-1)]
        return {"type": "ndarray", "shape": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, torch.Tensor):
        return {"type": "tensor", "shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, ObjectRecord):
        tensors = list(value.named_tensors())
        return {"type": value.cls, "tensors": len(tensors), "elements": sum(t.numel() for _, t in tensors)}
    if isinstance(value, dict):
        if depth >= SUMMARY_DEPTH or len(value) > SUMMARY_ENTRIES:
            return {"type": "dict", "entries": len(value)}
        return {str(k): summarize(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        if depth >= SUMMARY_DEPTH or len(value) > SUMMARY_ITEMS:
            return {"type": type(value).__name__, "items": len(value)}
        return [summarize(x, depth + 1) for x in value]
    return {"type": type(value).__name__}


def compact(summary: Any) -> Any:
    """A :func:`summarize` result one level shallower: nested containers become counts (the report's ``removed``).

    ``{"opt": {...43 entries}}`` -> ``{"type": "dict", "entries": 43}``; scalars and typed leaves stay as they are.
    """
    if isinstance(summary, dict) and "type" not in summary:
        return {"type": "dict", "entries": len(summary)}
    if isinstance(summary, list) and len(summary) > 4:
        return {"type": "list", "items": len(summary)}
    return summary


def short(value: Any) -> str:
    """One short human-readable word or number for a :func:`summarize` result (``inspect``'s text form)."""
    if isinstance(value, dict):
        if "type" in value and ("entries" in value or "items" in value):
            return f"{value['type']} ({value.get('entries', value.get('items'))} entries)"
        if "type" in value:
            return str(value["type"])
        return f"dict ({len(value)} entries)"
    if isinstance(value, list):
        return "[" + ", ".join(short(x) for x in value[:4]) + (", ..." if len(value) > 4 else "") + "]"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _names(model: ObjectRecord, nc: int) -> dict[int, str]:
    names = model.get("names")
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        names = {i: f"class{i}" for i in range(nc)}
    return {int(k): str(v) for k, v in names.items()}


def read_checkpoint(path: str | Path, *, prefer_ema: bool = True) -> Checkpoint:
    """Load and check a YOLOv9 checkpoint without running pickle code.

    The EMA model is used when the file holds one (``ckpt['ema']`` is a model) and ``prefer_ema``.

    Raises:
        InvalidInputError: not a checkpoint, another framework's checkpoint, no model config, NaN/Inf weights.
        UnsafeCheckpointError: a disallowed pickle global (named).
    """
    raw = load_pickle(path)
    obj = raw.obj
    if not isinstance(obj, dict):
        raise InvalidInputError(
            f"'{path}' holds a {type(obj).__name__}, not a YOLOv9 training checkpoint dict with a 'model' entry"
        )
    keys = list(obj)
    model = obj.get("model")
    ema = obj.get("ema")
    if not isinstance(model, ObjectRecord) and not isinstance(ema, ObjectRecord):
        hint = ""
        if "state_dict" in obj and ("pytorch-lightning_version" in obj or "global_step" in obj):
            hint = " (this looks like a PyTorch Lightning checkpoint)"
        elif "train_args" in obj or "train_results" in obj:
            hint = " (this looks like an Ultralytics checkpoint)"
        elif all(isinstance(v, torch.Tensor) for v in obj.values()):
            hint = " (this is a bare state_dict; reparam needs the training checkpoint that embeds the model config)"
        raise InvalidInputError(
            f"'{path}' has no YOLOv9 model: top-level keys are {', '.join(map(str, keys)) or 'none'}{hint}"
        )
    use_ema = prefer_ema and isinstance(ema, ObjectRecord)
    chosen: ObjectRecord = ema if use_ema else model  # type: ignore[assignment]
    if not chosen.cls.startswith("models.yolo."):
        raise InvalidInputError(f"'{path}': the model is a {chosen.cls}, not a WongKinYiu/yolov9 model")
    cfg = chosen.get("yaml")
    if not isinstance(cfg, dict) or "backbone" not in cfg or "head" not in cfg:
        raise InvalidInputError(
            f"'{path}': the model carries no config (model.yaml with backbone/head); reparam derives the deploy "
            "graph from it and cannot convert without it"
        )
    state = OrderedDict((k, v.detach()) for k, v in chosen.named_tensors())
    if not state:
        raise InvalidInputError(f"'{path}': the model has no weights")
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise InvalidInputError(
                f"'{path}': weight '{name}' has {bad} NaN/Inf value(s); the training run diverged — convert an "
                "earlier checkpoint"
            )
    nc = chosen.get("nc")
    if not isinstance(nc, int):
        nc = cfg.get("nc")
    if not isinstance(nc, int) or nc < 1:
        raise InvalidInputError(f"'{path}': cannot tell the number of classes (nc={nc!r})")
    stride = chosen.get("stride")
    stride_list = [float(s) for s in stride.tolist()] if isinstance(stride, torch.Tensor) else [8.0, 16.0, 32.0]
    ema_diff = None
    if use_ema and isinstance(model, ObjectRecord):
        raw_sd = {k: v.detach() for k, v in model.named_tensors()}
        diffs = [
            float((raw_sd[k].float() - v.float()).abs().max())
            for k, v in state.items()
            if k in raw_sd and v.is_floating_point() and raw_sd[k].shape == v.shape and v.numel()
        ]
        ema_diff = max(diffs) if diffs else None
    attrs = {
        k: v
        for k, v in chosen.state.items()
        if not k.startswith("_") and k not in ("yaml", "training") and not isinstance(v, ObjectRecord)
    }
    return Checkpoint(
        path=Path(path),
        cfg=cfg,
        nc=nc,
        names=_names(chosen, nc),
        stride=stride_list,
        state_dict=state,
        weights="ema" if use_ema else "model",
        model_class=chosen.cls,
        top_level={str(k): summarize(v) for k, v in obj.items()},
        globals=raw.globals,
        file_bytes=Path(path).stat().st_size,
        model_attrs=attrs,
        ema_differs_by=ema_diff if ema_diff is None or math.isfinite(ema_diff) else None,
        package_prefix=raw.package_prefix or "",
    )
