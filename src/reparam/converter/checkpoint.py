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
        top_level: top-level key -> short description of what it held (for the report).
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
    top_level: dict[str, str]
    globals: list[str]
    file_bytes: int
    model_attrs: dict[str, Any] = field(default_factory=dict)
    ema_differs_by: float | None = None

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


def _describe(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, ObjectRecord):
        return value.cls
    if isinstance(value, dict):
        return f"dict ({len(value)} entries)"
    if isinstance(value, (int, float, str)):
        text = repr(value)
        return text if len(text) < 60 else text[:57] + "..."
    return type(value).__name__


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
        top_level={k: _describe(v) for k, v in obj.items()},
        globals=raw.globals,
        file_bytes=Path(path).stat().st_size,
        model_attrs=attrs,
        ema_differs_by=ema_diff if ema_diff is None or math.isfinite(ema_diff) else None,
    )


def variant_of(ckpt: Checkpoint) -> str:
    """A short name of the architecture: the ``yaml_file`` stem when the model carries one, else a description."""
    yf = ckpt.model_attrs.get("yaml_file")
    if isinstance(yf, str) and yf:
        return Path(yf).stem
    return f"custom-{len(ckpt.cfg['backbone']) + len(ckpt.cfg['head'])}-layers"
