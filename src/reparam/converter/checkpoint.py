"""What a YOLOv9 training checkpoint holds, read through :mod:`reparam.converter.safe_load`.

``train.py``/``train_dual.py`` (WongKinYiu/yolov9 ``train_dual.py``, the ``ckpt`` dict saved each epoch) write::

    {'epoch': int, 'best_fitness': ndarray|None, 'model': DetectionModel (fp16), 'ema': DetectionModel|None,
     'updates': int|None, 'optimizer': state dict|None, 'opt': vars(argparse), 'git': dict|None, 'date': str}

``strip_optimizer`` (run on best.pt/last.pt at the end of training) replaces ``model`` by the EMA and sets
``ema``, ``optimizer``, ``updates``, ``best_fitness`` to None and ``epoch`` to -1. Mid-training files
(``last.pt``, ``epochN.pt``) keep the raw weights under ``model`` and the EMA under ``ema``; the EMA is the model
that was validated, so it is the one to deploy.

A *bare state_dict* (``{key: tensor}``, no pickled model, no config: how forks and scripts often ship YOLOv9
weights) is read by :func:`read_state_dict` together with a config (``--cfg``): a published name or the training's
model yaml (:mod:`reparam.models.published`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInputError, brief, count_of
from .safe_load import ObjectRecord, load_pickle

#: Top-level entries that are training state, dropped from the deploy checkpoint (report lists them).
TRAINING_KEYS = ("optimizer", "ema", "updates", "best_fitness", "opt", "git", "date", "epoch", "results", "wandb_id")
#: Top-level entries a bare state_dict may sit under, when it is not the whole file: what forks and scripts write
#: (``torch.save({'model': model.state_dict()})``, PyTorch Lightning's ``state_dict``, ``model_state_dict``).
STATE_DICT_ENTRIES = ("model", "state_dict", "model_state_dict")
#: Module-path components a wrapper puts before a state_dict's layer index, all stripped: ``module``
#: (DataParallel / DistributedDataParallel), ``_orig_mod`` (torch.compile), ``model`` (``DetectionModel.model``,
#: or a wrapper holding the DetectionModel as ``.model``). Any other prefix is refused, naming it.
WRAPPER_PREFIXES = ("module", "_orig_mod", "model")


@dataclass
class Checkpoint:
    """A parsed YOLOv9 checkpoint.

    Attributes:
        path: the file.
        cfg: the model config dict (``model.yaml``).
        nc: number of classes; ``names``: class id -> name (dict, as the official code stores it).
        stride: detection strides, e.g. ``[8.0, 16.0, 32.0]`` (pixels); ``None`` for a bare state_dict until the
            conversion has built the model and measured them.
        state_dict: ``model.<i>.…`` -> tensor, in the saved dtype (fp16 for official checkpoints).
        weights: ``"ema"`` when the EMA model was taken (mid-training file), else ``"model"``.
        model_class: the pickled model class (``models.yolo.DetectionModel``).
        top_level: top-level key -> typed summary of what it held (:func:`summarize`; inspect and report).
        package_prefix: prefix of the official module layout in the pickle (``""``; ``"yolov9."`` for a
            pip-installed fork), see :data:`reparam.converter.safe_load.OFFICIAL_PACKAGE_PREFIXES`.
        globals: pickle globals the file references.
        file_bytes: size of the file in bytes.
        model_attrs: plain (non-module) attributes of the pickled model, e.g. ``yaml_file``, ``inplace``.
        ema_differs_by: max |EMA - raw| over the weights when the EMA was taken (output units of each tensor).
        origin: for a bare state_dict read with a config (:func:`read_state_dict`): where the tensors sat, the key
            prefix stripped, the config source, where ``nc`` came from, and notes; ``None`` for a checkpoint.
    """

    path: Path
    cfg: dict[str, Any]
    nc: int
    names: dict[int, str]
    stride: list[float] | None
    state_dict: "OrderedDict[str, torch.Tensor]"
    weights: str
    model_class: str
    top_level: dict[str, Any]
    globals: list[str]
    file_bytes: int
    model_attrs: dict[str, Any] = field(default_factory=dict)
    ema_differs_by: float | None = None
    package_prefix: str = ""
    origin: dict[str, Any] | None = None

    @property
    def fits(self) -> str:
        """What the weights must fit, for error messages: ``"its config"`` or ``"--cfg yolov9-c"``."""
        return f"--cfg {self.origin['config_name']}" if self.origin else "its config"

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
SUMMARY_DEPTH, SUMMARY_ITEMS, SUMMARY_ENTRIES, SUMMARY_TEXT = 4, 16, 64, 200


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


def _names(names: Any, nc: int) -> dict[int, str]:
    """Class id -> name from a list/dict (as the official code stores ``model.names``); ``class<i>`` if absent."""
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        names = {i: f"class{i}" for i in range(nc)}
    return {int(k): str(v) for k, v in names.items()}


def _all_finite(t: torch.Tensor) -> bool:
    """True when every element of the float tensor ``t`` is finite.

    One vectorized pass without a copy: ``torch.aminmax`` propagates NaN (torch docs: "If there are NaN values, they
    are propagated to the output") and its min or max is infinite when an element is, so both are finite exactly when
    all elements are. (``isfinite(t).all()`` is the same test at ~30x the CPU time on fp16 weights.)
    """
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _check_finite(path: str | Path, state: dict[str, torch.Tensor]) -> None:
    for name, t in state.items():
        if t.is_floating_point() and not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise InvalidInputError(
                f"NaN/Inf weights: {brief(name)} has {bad:,} NaN/Inf value(s); the training run diverged, convert "
                f"an earlier checkpoint ('{path}')"
            )


def _is_state_dict(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def find_state_dict(obj: Any) -> tuple[str, dict[str, torch.Tensor]] | None:
    """Where a bare state_dict sits in an unpickled file: ``("file", obj)`` when the whole file is
    ``{key: tensor}``, ``(entry, obj[entry])`` for an entry of :data:`STATE_DICT_ENTRIES`; ``None`` otherwise."""
    if _is_state_dict(obj):
        return "file", obj
    if isinstance(obj, dict):
        for entry in STATE_DICT_ENTRIES:
            if _is_state_dict(obj.get(entry)):
                return entry, obj[entry]
    return None


def normalize_keys(state: dict[str, torch.Tensor]) -> tuple["OrderedDict[str, torch.Tensor]", str]:
    """Rename a state_dict's keys to ``DetectionModel`` form ``model.<layer>.<name>``; returns them and the prefix.

    Rule: a key's layer index is its first all-digit dotted component; what comes before it is the prefix, which
    must be the same for every key and consist of :data:`WRAPPER_PREFIXES` components only (``""``,
    ``"model."``, ``"module.model."``, ``"model.model."`` ...). The prefix is replaced by ``model.``.

    Raises:
        InvalidInputError: a key without a layer index, differing prefixes, or a prefix of another component.
    """
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    prefixes: dict[str, str] = {}
    no_index = []
    for key, t in state.items():
        parts = key.split(".")
        i = next((j for j, p in enumerate(parts) if p.isdigit()), None)
        if i is None or i + 1 == len(parts):
            no_index.append(key)
            continue
        prefixes.setdefault(".".join(parts[:i] + [""]), key)
        out["model." + ".".join(parts[i:])] = t.detach()
    if no_index:
        raise InvalidInputError(
            f"state_dict keys without a layer index: {count_of(no_index, 'keys')}; a YOLOv9 key is "
            "[prefix.]<layer>.<name>, e.g. model.0.conv.weight"
        )
    if len(prefixes) > 1:
        a, b = list(prefixes.values())[:2]
        raise InvalidInputError(f"state_dict keys carry {len(prefixes)} different prefixes (e.g. {brief(a)} and "
                                f"{brief(b)}); one model's state_dict has one")
    (prefix,) = prefixes
    others = [p for p in prefix.split(".")[:-1] if p not in WRAPPER_PREFIXES]
    if others:
        raise InvalidInputError(
            f"state_dict key prefix {brief(prefix)} is not a model wrapper's (reparam strips "
            f"{', '.join(p + '.' for p in WRAPPER_PREFIXES)}): is this a YOLOv9 DetectionModel's state_dict?"
        )
    return out, prefix


def head_classes(cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[int | None, str]:
    """The number of classes the weights were trained for: out-channels of the head's first class conv.

    YOLOv9 heads (``DDetect``, ``DualDDetect``, ``DSegment`` ...) end every class tower ``cv3[i]`` in
    ``nn.Conv2d(c3, nc, 1)`` (models/yolo.py), so ``model.<last layer>.cv3.0.2.bias`` has ``nc`` elements.
    Returns ``(nc, key)``; ``(None, key)`` when the state_dict has no such tensor.
    """
    last = len(cfg["backbone"]) + len(cfg["head"]) - 1
    key = f"model.{last}.cv3.0.2.bias"
    t = state.get(key)
    return (int(t.shape[0]) if t is not None and t.dim() == 1 else None), key


def read_state_dict(path: str | Path, cfg: str | Path, *, nc: int | None = None,
                    names: list[str] | tuple[str, ...] | None = None) -> Checkpoint:
    """Read a bare state_dict and pair it with a model config (``reparam convert weights.pt --cfg yolov9-c``).

    ``path``: a ``torch.save`` file of ``{key: tensor}``, as a whole or under an entry of
    :data:`STATE_DICT_ENTRIES`; keys renamed by :func:`normalize_keys`. ``cfg``: a published name or a config
    file (:func:`reparam.models.published.resolve_config`).

    ``nc`` rule: the weights decide. The head's class convs fix the class count (:func:`head_classes`); the
    config's ``nc`` is overridden by it, as the official ``train.py`` overrides a ``model.yaml``'s ``nc`` with the
    data set's (the published configs say ``nc: 80``), and a note says so. ``nc``, when given (``--nc``), must
    agree with the weights. ``names``: ``--names`` (one per class), else ``class0`` ... ``class<nc-1>``.
    ``stride`` is ``None`` until the model is built (the conversion measures it, as YOLOv9 does).

    Whether every tensor fits the config is checked strictly when the model is built
    (:func:`reparam.converter.convert.build_model`: missing / unexpected / other-shape keys by count and example).

    Raises:
        InvalidInputError: no state_dict in the file, the file is a full checkpoint (it carries its own config),
            keys of an unknown layout, no head class conv where the config has its head, ``nc``/``names`` that
            contradict the weights, NaN/Inf weights, a bad config.
        UnsafeCheckpointError: a disallowed pickle global (a bare state_dict needs only torch/collections ones).
    """
    from ..models.published import resolve_config

    raw = load_pickle(path)
    obj = raw.obj
    found = find_state_dict(obj)
    if found is None:
        if isinstance(obj, dict) and any(isinstance(obj.get(k), ObjectRecord) for k in ("model", "ema")):
            raise InvalidInputError(f"--cfg is for a bare state_dict, but '{path}' is a YOLOv9 checkpoint that "
                                    "carries its own config: convert it without --cfg")
        what = (count_of(obj, "top-level keys", examples=3, limit=30) if isinstance(obj, dict)
                else f"a {type(obj).__name__}")
        raise InvalidInputError(
            f"no state_dict in '{path}' ({what}): --cfg expects {{name: tensor}} as the whole file or under "
            f"{', '.join(repr(e) for e in STATE_DICT_ENTRIES)}"
        )
    where, tensors = found
    state, prefix = normalize_keys(tensors)
    _check_finite(path, state)
    resolved = resolve_config(cfg)
    config = resolved.cfg
    config_name = resolved.source.removeprefix("published:") if resolved.source.startswith("published:") \
        else resolved.yaml_file
    inferred, key = head_classes(config, state)
    if inferred is None:
        last = max(int(k.split(".")[1]) for k in state)
        raise InvalidInputError(
            f"state_dict does not fit --cfg {config_name}: no head class conv {key} (the config's head is "
            f"layer {len(config['backbone']) + len(config['head']) - 1}, the state_dict's last layer is {last}); "
            "pass the config the weights were trained with"
        )
    if nc is not None and nc != inferred:
        raise InvalidInputError(f"--nc {nc} contradicts the weights: the head's class conv {key} has {inferred} "
                                "outputs; drop --nc or fix it")
    notes = []
    if config.get("nc") != inferred:
        notes.append(f"config nc={brief(config.get('nc'), 20)} overridden by the weights' nc={inferred}")
    config["nc"] = inferred
    config["ch"] = config.get("ch", 3)  # as the official Model.__init__ records it: the config a checkpoint holds
    if names is not None and len(names) != inferred:
        raise InvalidInputError(f"--names gives {len(names)} names, the weights have nc={inferred}: give one name "
                                "per class")
    return Checkpoint(
        path=Path(path),
        cfg=config,
        nc=inferred,
        names=_names(list(names) if names is not None else None, inferred),
        stride=None,  # measured when the model is built
        state_dict=state,
        weights="state_dict",
        model_class="state_dict",
        top_level={} if where == "file" else {str(k): summarize(v) for k, v in obj.items()},
        globals=raw.globals,
        file_bytes=Path(path).stat().st_size,
        model_attrs={"yaml_file": resolved.yaml_file},
        origin={"format": "state_dict", "entry": where, "key_prefix": prefix, "config": resolved.source,
                "config_name": config_name, "nc_from": "--nc and weights" if nc is not None else "weights",
                "names_from": "--names" if names is not None else "default", "notes": notes},
    )


def read_checkpoint(path: str | Path, *, prefer_ema: bool = True, cfg: str | Path | None = None,
                    nc: int | None = None, names: list[str] | tuple[str, ...] | None = None) -> Checkpoint:
    """Load and check a YOLOv9 checkpoint without running pickle code.

    The EMA model is used when the file holds one (``ckpt['ema']`` is a model) and ``prefer_ema``. With ``cfg``
    the file is a bare state_dict and :func:`read_state_dict` reads it (``nc``, ``names`` go there).

    Raises:
        InvalidInputError: not a checkpoint, another framework's checkpoint, a bare state_dict without ``cfg``,
            no model config, NaN/Inf weights.
        UnsafeCheckpointError: a disallowed pickle global (named).
    """
    if cfg is not None:
        return read_state_dict(path, cfg, nc=nc, names=names)
    raw = load_pickle(path)
    obj = raw.obj
    if not isinstance(obj, dict):
        raise InvalidInputError(
            f"'{path}' holds a {type(obj).__name__}, not a YOLOv9 training checkpoint dict with a 'model' entry"
        )
    model = obj.get("model")
    ema = obj.get("ema")
    if not isinstance(model, ObjectRecord) and not isinstance(ema, ObjectRecord):
        lightning = "state_dict" in obj and ("pytorch-lightning_version" in obj or "global_step" in obj)
        found = find_state_dict(obj)
        if found is not None:
            where, tensors = found
            raise InvalidInputError(
                f"bare state_dict without a model config{' (a PyTorch Lightning checkpoint)' if lightning else ''}: "
                "give its architecture with --cfg, a published name (yolov9-t/s/m/c/e, gelan-t/s/m/c/e) or the "
                f"training's model yaml; '{path}' holds {count_of(tensors, 'tensors')}"
                f"{'' if where == 'file' else ' under ' + repr(where)}"
            )
        hint = ""
        if lightning:
            hint = "; this looks like a PyTorch Lightning checkpoint"
        elif "train_args" in obj or "train_results" in obj:
            hint = "; this looks like an Ultralytics checkpoint"
        raise InvalidInputError(
            f"no YOLOv9 model in '{path}': {count_of(obj, 'top-level keys', examples=3, limit=30)}{hint}"
        )
    if not prefer_ema and not isinstance(model, ObjectRecord):
        raise InvalidInputError(
            f"'{path}' holds only the EMA model (its 'model' entry is {brief(model)}), and --no-ema asks for the raw "
            "one; convert it without --no-ema"
        )
    use_ema = prefer_ema and isinstance(ema, ObjectRecord)
    # the ignore: obj.get() is typed object; `model` is an ObjectRecord unless only `ema` is one, and then use_ema
    # holds (the --no-ema case is refused above)
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
    _check_finite(path, state)
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
        names=_names(chosen.get("names"), nc),
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


def variant_of(ckpt: Checkpoint) -> str:
    """A short name of the architecture: the ``yaml_file`` stem when the model carries one, else a description."""
    yf = ckpt.model_attrs.get("yaml_file")
    if isinstance(yf, str) and yf:
        return Path(yf).stem
    return f"custom-{len(ckpt.cfg['backbone']) + len(ckpt.cfg['head'])}-layers"
