"""The YOLOv9 model graph built from a config dict (the ``model.yaml`` of a checkpoint).

:class:`DetectionModel` re-implements the semantics of the official
``models/yolo.py`` (``parse_model``, ``DetectionModel``, ``BaseModel._forward_once``)
without ``eval``: module names resolve through :data:`BLOCKS`, string arguments
through a fixed token table.

Config format (as in the official YAML files): ``nc``, ``depth_multiple``,
``width_multiple``, ``anchors``, ``backbone`` and ``head``; each layer is
``[from, number, module, args]`` where ``from`` is ``-1`` (previous layer), a
layer index, or a list of them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import InvalidInputError, brief
from .blocks import (ADown, AConv, CBFuse, CBLinear, Concat, Conv, ELAN1, RepConvN, RepNBottleneck, RepNCSP,
                     RepNCSPELAN4, Silence, SP, SPPELAN, fuse_model)
from .heads import DDetect, DSegment, DualDDetect, DualDSegment, TripleDDetect, _AnchorFreeHead, make_divisible
from .segment import Segment

__all__ = ["BlockSpec", "BLOCKS", "DetectionModel", "SegmentationModel", "SEGMENTATION_HEADS", "parse_model",
           "resolve_arg", "STRIDE_PROBE_SIZE"]

#: side of the blank image used to measure the head strides (YOLOv9: 2 x the largest stride)
STRIDE_PROBE_SIZE = 256


@dataclass(frozen=True)
class BlockSpec:
    """How ``parse_model`` treats one block name.

    Attributes:
        cls: the module class.
        type: the class's official dotted name (what YOLOv9 stores as the layer's ``type``).
        rule: channel rule: ``"scaled"`` (args[0] is the output width, scaled by
            ``width_multiple``; input width prepended), ``"concat"``, ``"cblinear"``,
            ``"cbfuse"``, ``"head"``, ``"seghead"`` or ``"same"`` (output width = input width).
    """

    cls: Callable[..., nn.Module]
    type: str
    rule: str


def _common(name: str) -> str:
    return f"models.common.{name}"


def _yolo(name: str) -> str:
    return f"models.yolo.{name}"


#: block names accepted in a config; the rules follow YOLOv9 ``parse_model``
BLOCKS: dict[str, BlockSpec] = {
    "Conv": BlockSpec(Conv, _common("Conv"), "scaled"),
    "AConv": BlockSpec(AConv, _common("AConv"), "scaled"),
    "ADown": BlockSpec(ADown, _common("ADown"), "scaled"),
    "ELAN1": BlockSpec(ELAN1, _common("ELAN1"), "scaled"),
    "RepNCSPELAN4": BlockSpec(RepNCSPELAN4, _common("RepNCSPELAN4"), "scaled"),
    "SPPELAN": BlockSpec(SPPELAN, _common("SPPELAN"), "scaled"),
    "Concat": BlockSpec(Concat, _common("Concat"), "concat"),
    "CBLinear": BlockSpec(CBLinear, _common("CBLinear"), "cblinear"),
    "CBFuse": BlockSpec(CBFuse, _common("CBFuse"), "cbfuse"),
    "Silence": BlockSpec(Silence, _common("Silence"), "same"),
    "SP": BlockSpec(SP, _common("SP"), "same"),
    "RepConvN": BlockSpec(RepConvN, _common("RepConvN"), "same"),
    "RepNBottleneck": BlockSpec(RepNBottleneck, _common("RepNBottleneck"), "same"),
    "RepNCSP": BlockSpec(RepNCSP, _common("RepNCSP"), "same"),
    "nn.Upsample": BlockSpec(nn.Upsample, "torch.nn.modules.upsampling.Upsample", "same"),
    "DDetect": BlockSpec(DDetect, _yolo("DDetect"), "head"),
    "DualDDetect": BlockSpec(DualDDetect, _yolo("DualDDetect"), "head"),
    "TripleDDetect": BlockSpec(TripleDDetect, _yolo("TripleDDetect"), "head"),
    "DSegment": BlockSpec(DSegment, _yolo("DSegment"), "seghead"),
    "DualDSegment": BlockSpec(DualDSegment, _yolo("DualDSegment"), "seghead"),
    "Segment": BlockSpec(Segment, _yolo("Segment"), "seghead"),
}

_ACTIVATIONS_OK = (None, "nn.SiLU()")
#: Heads whose model is a ``SegmentationModel`` (the class YOLOv9's ``segment/train*.py`` build for them).
SEGMENTATION_HEADS = tuple(name for name, spec in BLOCKS.items() if spec.rule == "seghead")


def _head_name(cfg: Any) -> str | None:
    """The last layer's module name of a config dict, or None when it has none."""
    try:
        rows = list(cfg["backbone"]) + list(cfg["head"])
        return str(rows[-1][2]).rsplit(".", 1)[-1]
    except (KeyError, TypeError, IndexError):
        return None


def resolve_arg(token: Any, nc: int, anchors: Any) -> Any:
    """Resolve one config argument without ``eval``.

    ``'nc'`` -> ``nc``, ``'anchors'`` -> ``anchors``, ``'None'``/``'True'``/``'False'``
    -> the constant; any other string (e.g. ``'nearest'``) and any non-string stay as
    they are (what YOLOv9's ``eval`` with ``NameError`` suppressed gives for these).
    """
    if not isinstance(token, str):
        return token
    table = {"nc": nc, "anchors": anchors, "None": None, "True": True, "False": False}
    return table.get(token, token)


def _bad(i: int, what: str) -> InvalidInputError:
    return InvalidInputError(f"model config layer {i}: {what}")


def _sources(f: Any, i: int) -> list[int]:
    if isinstance(f, bool) or not isinstance(f, (int, list)):
        raise _bad(i, f"'from' must be an int or a list of ints, got {brief(f)}")
    srcs = [f] if isinstance(f, int) else f
    if not srcs or any(isinstance(x, bool) or not isinstance(x, int) for x in srcs):
        raise _bad(i, f"'from' must be an int or a non-empty list of ints, got {brief(f)}")
    for x in srcs:
        if x >= i or (x < -1 and -x > i):
            raise _bad(i, f"'from' {x} does not name an earlier layer")
    return srcs


def parse_model(cfg: Mapping[str, Any], ch: int) -> tuple[nn.Sequential, list[int]]:
    """Build the layer list of a YOLOv9 config (official ``parse_model`` semantics).

    Channel rule: for "scaled" blocks the output width ``args[0]`` becomes
    ``make_divisible(args[0] * width_multiple, 8)`` (unless it equals
    ``anchors * (nc + 5)``, the legacy "output layer" width, as in YOLOv9). Depth rule:
    ``number > 1`` becomes ``max(round(number * depth_multiple), 1)`` copies in an
    ``nn.Sequential``. Each layer gets ``i`` (index), ``f`` (from), ``type`` (official
    dotted class name) and ``np`` (parameter count).

    Returns:
        ``(layers, save)``: the ``nn.Sequential`` and the sorted indices whose outputs
        later layers read.

    Raises:
        InvalidInputError: missing keys, malformed layers, unknown block names,
            or arguments the block rejects.
    """
    try:
        nc, gd, gw = cfg["nc"], cfg["depth_multiple"], cfg["width_multiple"]
        anchors = cfg.get("anchors", 3)
        rows = list(cfg["backbone"]) + list(cfg["head"])
    except (KeyError, TypeError) as err:
        raise InvalidInputError(
            f"model config lacks {err}: it needs nc, depth_multiple, width_multiple, backbone and head") from None
    na = (len(anchors[0]) // 2) if isinstance(anchors, list) else anchors
    no = na * (nc + 5)

    layers: list[nn.Module] = []
    save: list[int] = []
    widths: list = [ch]
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != 4:
            raise _bad(i, f"expected [from, number, module, args], got {brief(row)}")
        f, n, name, args = row
        spec = BLOCKS.get(name) if isinstance(name, str) else None
        if spec is None:
            raise InvalidInputError(
                f"unknown block {brief(name)} at layer {i}: reparam supports {', '.join(BLOCKS)}")
        srcs = _sources(f, i)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise _bad(i, f"'number' must be a positive int, got {brief(n)}")
        if not isinstance(args, (list, tuple)):
            raise _bad(i, f"'args' must be a list, got {brief(args)}")
        args = [resolve_arg(a, nc, anchors) for a in copy.deepcopy(list(args))]
        n = max(round(n * gd), 1) if n > 1 else n

        rule = spec.rule
        try:
            if rule == "scaled":
                c1, c2 = widths[f], args[0]
                if c2 != no:
                    c2 = make_divisible(c2 * gw, 8)
                args = [c1, c2, *args[1:]]
            elif rule == "concat":
                c2 = sum(widths[x] for x in srcs)
            elif rule == "cblinear":
                c2 = args[0]
                args = [widths[f], c2, *args[1:]]
            elif rule == "cbfuse":
                c2 = widths[srcs[-1]]
            elif rule in ("head", "seghead"):
                args.append([widths[x] for x in srcs])
                if rule == "seghead":
                    args[2] = make_divisible(args[2] * gw, 8)
                c2 = None
            else:
                c2 = widths[f]
            module = nn.Sequential(*(spec.cls(*args) for _ in range(n))) if n > 1 else spec.cls(*args)
        except InvalidInputError:
            raise
        except (TypeError, ValueError, IndexError, AssertionError, RuntimeError, ZeroDivisionError) as err:
            raise _bad(i, f"cannot build {name} with args {brief(args)}: {brief(err, 120)}") from None

        module.i, module.f, module.type = i, f, spec.type
        module.np = sum(p.numel() for p in module.parameters())
        save.extend(x % i for x in srcs if x != -1)
        layers.append(module)
        if i == 0:
            widths = []
        widths.append(c2)
    return nn.Sequential(*layers), sorted(save)


def _initialize_weights(model: nn.Module) -> None:
    """YOLOv9 ``initialize_weights``: BatchNorm eps 1e-3 and momentum 0.03, in-place activations."""
    for m in model.modules():
        t = type(m)
        if t is nn.BatchNorm2d:
            m.eps = 1e-3
            m.momentum = 0.03
        elif t in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU):
            m.inplace = True


class DetectionModel(nn.Module):
    """A YOLOv9 / GELAN detection model built from its config dict.

    Args:
        cfg: the config dict (a checkpoint's ``model.yaml``); it is deep-copied, and the
            copy gets ``ch`` (and ``nc`` when overridden) as YOLOv9 does.
        ch: input image channels (the config's ``ch`` wins when present).
        nc: number of classes, overriding the config's ``nc`` when given.
        stride: the head strides when already known (e.g. a checkpoint's own ``stride``, pixels): skips the
            measuring forward, which is most of the cost of building a large model on the ``meta`` device.

    Attributes (as official checkpoints have them): ``yaml`` (config dict), ``model``
    (``nn.Sequential`` of layers carrying ``i``, ``f``, ``type``, ``np``), ``save``
    (indices whose outputs are kept), ``names`` (``{class id: name}``, default
    ``{0: '0', ...}``), ``nc``, ``inplace``, ``stride`` (float tensor ``[nl]``, e.g.
    ``[8, 16, 32]``, also set on the head).

    Forward: ``[B, ch, H, W]`` (H, W multiples of the largest stride) -> the head's
    output; in eval a ``DDetect`` model gives ``(y [B, 4+nc, A], maps)``, a
    ``DualDDetect`` model ``([y_0, y_1], [maps_0, maps_1])``.

    Raises:
        InvalidInputError: the config is malformed or names an unknown block.
    """

    def __new__(cls, cfg: Any = None, *args: Any, **kwargs: Any):
        # A segmentation config builds a SegmentationModel, as YOLOv9's segmentation training does; pickling and
        # copying call __new__ with no config and get the class they ask for.
        if cls is DetectionModel and _head_name(cfg) in SEGMENTATION_HEADS:
            cls = SegmentationModel
        return super().__new__(cls)

    def __init__(self, cfg: Mapping[str, Any], ch: int = 3, nc: int | None = None, *,
                 stride: Any = None):
        super().__init__()
        if not isinstance(cfg, Mapping):
            raise InvalidInputError(f"model config must be a mapping, got {type(cfg).__name__}")
        self.yaml = copy.deepcopy(dict(cfg))
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc and nc != self.yaml.get("nc"):
            self.yaml["nc"] = nc
        act = self.yaml.get("activation")
        if act not in _ACTIVATIONS_OK:
            raise InvalidInputError(
                f"model config activation {brief(act)} is not supported: reparam builds SiLU models")
        self.model, self.save = parse_model(self.yaml, ch)
        self.names = {i: str(i) for i in range(self.yaml["nc"])}
        self.nc = self.yaml["nc"]
        self.inplace = self.yaml.get("inplace", True)

        head = self.model[-1]
        if isinstance(head, _AnchorFreeHead):
            head.inplace = self.inplace
            head.stride = (self._measure_strides(ch) if stride is None
                           else torch.tensor([float(v) for v in stride], device="cpu"))
            self.stride = head.stride
            head.bias_init()
        else:
            self.stride = torch.tensor([32.0])
        _initialize_weights(self)

    def _run(self, x: torch.Tensor, upto: int | None = None):
        """Official ``_forward_once``: route each layer's input via ``f``, keep outputs in ``save``.

        With ``upto``, stop and return the input that layer ``upto`` would get.
        """
        outputs: list = []
        for m in self.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            if upto is not None and m.i == upto:
                return x
            x = m(x)
            outputs.append(x if m.i in self.save else None)
        return x

    def forward(self, x: torch.Tensor):
        return self._run(x)

    @torch.no_grad()
    def _measure_strides(self, ch: int) -> torch.Tensor:
        """Strides of the head's first ``nl`` inputs on a blank ``STRIDE_PROBE_SIZE`` image.

        YOLOv9 measures them by a training-mode forward (which also updates BatchNorm
        statistics); here the head's inputs are measured in eval mode, which gives the
        same sizes and leaves all state untouched.
        """
        head = self.model[-1]
        was_training = self.training
        self.eval()
        p = next(self.parameters(), None)
        try:
            s = STRIDE_PROBE_SIZE
            # on a model built on the "meta" device this runs on shapes only (no arithmetic)
            feats = self._run(torch.zeros(1, ch, s, s, device=p.device if p is not None else "cpu"), upto=head.i)
        finally:
            self.train(was_training)
        return torch.tensor([s / t.shape[-2] for t in feats[: head.nl]], device="cpu")

    def _apply(self, fn, *args, **kwargs):
        # As YOLOv9 BaseModel._apply: head tensors that are plain attributes follow .to()/.half().
        self = super()._apply(fn, *args, **kwargs)
        head = self.model[-1]
        if isinstance(head, _AnchorFreeHead):
            head.stride = fn(head.stride)
            head.anchors = fn(head.anchors)
            head.strides = fn(head.strides)
        return self

    def fuse(self) -> "DetectionModel":
        """Fold BatchNorm into convs and re-parameterize RepConvN, in place (:func:`.blocks.fuse_model`)."""
        fuse_model(self)
        return self


class SegmentationModel(DetectionModel):
    """A :class:`DetectionModel` whose head is ``DSegment``/``DualDSegment``/``Segment`` (YOLOv9 ``models/yolo.py``:
    the official ``SegmentationModel`` adds nothing to ``DetectionModel`` either). ``DetectionModel(cfg)`` returns one
    for a segmentation config, so the deploy ``.pt`` pickles it under the official name
    ``models.yolo.SegmentationModel``.

    Forward (eval): ``(cat(y, mc) [B, 4 + nc + nm, A], (maps, mc [B, nm, A], p [B, nm, H/4, W/4]))``.
    """
