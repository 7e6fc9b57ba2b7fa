"""The equivalence check: the deploy model must give the dual model's main-branch output.

YOLOv9's ``DualDDetect`` in eval mode returns ``([y_aux, y_main], [d_aux, d_main])`` where each ``y`` is
``[B, 4 + nc, A]`` (box xywh in input pixels, then class sigmoid scores; ``A`` anchors, 8400 at 640x640) — the
main half (``cv4``/``cv5``/``dfl2``) is index 1. The deploy ``DDetect`` returns ``(y, d)`` with ``y`` of the same
shape. Both run in fp32 on the same seeded inputs; the largest absolute difference is reported in the units of
``y`` (pixels for boxes, probability for scores).

Two check levels (:func:`check_conversion`):

* ``fast`` (default): the deploy model against the dual model's main branch on one full-size ``[1, 3, s, s]``
  input, where the dual model runs only the layers its main branch depends on (:func:`main_branch_forward`: the
  auxiliary branch cannot influence the main output, so running it would prove nothing more); then, on a small
  non-square batch ``[2, 3, h, w]`` (``h = 128``, ``w = 192`` at 640 px and stride 32: shape handling, batching and
  rectangular anchors), the *whole* dual model (both branches), the main-only evaluation and the deploy model, which
  must all agree. That second step also proves, on every conversion, that the main-only evaluation equals the full
  dual forward. The FLOP count is taken during the small step and scaled to ``s x s``.
* ``full``: the whole dual model and the deploy model on the full-size input and on a non-square batch of 2 at
  half and three quarters of the size (what reparam did before ``fast`` existed).

Weights stay in their saved dtype (fp16) and are upcast one module at a time while it runs
(:func:`computing_in_fp32`): exact, and the fp32 copy of the model is never held in memory at once.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..spec import DEFAULT_ATOL
from .pruning import ancestors, resolve_from

#: Check levels of :func:`check_conversion` (``--check``), the default first.
CHECK_LEVELS = ("fast", "full")
#: Shorter side of the small non-square batch of the ``fast`` level, in pixels (rounded up to the largest stride).
SMALL_SIDE = 128


@dataclass
class Comparison:
    """One input's comparison: its shape ``[B, 3, H, W]``, the output shape and max |diff|."""

    input_shape: list[int]
    output_shape: list[int]
    max_abs_diff: float
    #: how the dual model ran: ``"full"`` (both branches) or ``"main-only"`` (:func:`main_branch_forward`)
    dual: str = "full"


@dataclass
class ValidationResult:
    """Outcome of :func:`check_conversion`.

    ``max_abs_diff`` is the largest |deploy - dual main| over all inputs (fp32); ``passed`` is
    ``max_abs_diff <= atol`` with matching shapes and finite outputs.
    """

    passed: bool
    max_abs_diff: float
    atol: float
    comparisons: list[Comparison] = field(default_factory=list)
    reason: str = ""
    #: the check level that ran (:data:`CHECK_LEVELS`)
    check: str = "full"
    #: ``fast`` only: max |main-only evaluation - full dual forward| on the small batch (must be <= atol)
    main_only_vs_full: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def main_output(out: Any) -> torch.Tensor:
    """The decoded main-branch prediction ``[B, 4 + nc, A]`` of a YOLOv9 head's eval output.

    Handles ``DDetect`` (``(y, d)``) and ``DualDDetect`` (``([y_aux, y_main], [d_aux, d_main])``), and export mode
    (a bare tensor or list). Raises ``ValueError`` for anything else.
    """
    y = out[0] if isinstance(out, tuple) else out
    if isinstance(y, (list, tuple)):
        y = y[-1]
    if not isinstance(y, torch.Tensor) or y.dim() != 3:
        raise ValueError(f"unexpected head output {type(y).__name__}")
    return y


def aligned_size(size: int, stride: int) -> int:
    """``size`` rounded up to a multiple of ``stride`` (YOLO inputs must be stride-aligned)."""
    return max(stride, -(-int(size) // stride) * stride)


def sample_inputs(imgsz: int, stride: int, seed: int = 0) -> list[torch.Tensor]:
    """Seeded inputs in [0, 1): one ``[1, 3, s, s]`` at ``s = aligned(imgsz)`` and one non-square ``[2, 3, h, w]``.

    The second exercises batching and anchor generation for a rectangular shape.
    """
    g = torch.Generator().manual_seed(seed)
    s = aligned_size(imgsz, stride)
    h, w = aligned_size(s // 2, stride), aligned_size(s * 3 // 4, stride)
    return [torch.rand(1, 3, s, s, generator=g), torch.rand(2, 3, h, w, generator=g)]


def fast_inputs(imgsz: int, stride: int, seed: int = 0) -> list[torch.Tensor]:
    """Seeded inputs in [0, 1) of the ``fast`` level: ``[1, 3, s, s]`` and a small non-square ``[2, 3, h, w]``.

    ``s = aligned(imgsz)`` (the first input equals :func:`sample_inputs`' first), ``h = aligned(min(s, 128))`` and
    ``w = aligned(1.5 h)`` (128 x 192 at 640 px and stride 32): every size a multiple of ``stride``.
    """
    g = torch.Generator().manual_seed(seed)
    s = aligned_size(imgsz, stride)
    h = aligned_size(min(s, SMALL_SIDE), stride)
    w = aligned_size(h * 3 // 2, stride)
    return [torch.rand(1, 3, s, s, generator=g), torch.rand(2, 3, h, w, generator=g)]


def _own_tensors(module: nn.Module) -> list[tuple[dict, str]]:
    return [(group, name) for group in (module._parameters, module._buffers)
            for name, t in group.items() if t is not None and t.is_floating_point() and t.dtype != torch.float32]


@contextmanager
def computing_in_fp32(*models: nn.Module) -> Iterator[None]:
    """Within the block, ``models`` compute in fp32 while their weights stay stored as saved (e.g. fp16).

    Each module's own floating parameters and buffers are replaced by fp32 copies just before it runs and put back
    right after, so at most one module's fp32 copy exists at a time (peak memory: the saved weights plus one
    layer). fp16 -> fp32 is exact, so the outputs equal those of ``model.float()``. Inputs must be fp32. Models
    already in fp32 are left alone. Everything is restored on exit, also after an exception.
    """
    handles = []
    stash: dict[int, list[tuple[dict, str, torch.Tensor]]] = {}

    def before(module: nn.Module, _args: Any) -> None:
        saved = stash.setdefault(id(module), [])
        for group, name in _own_tensors(module):
            saved.append((group, name, group[name]))
            group[name] = group[name].float()

    def after(module: nn.Module, _args: Any, _out: Any) -> None:
        for group, name, t in reversed(stash.pop(id(module), [])):
            group[name] = t

    try:
        for model in models:
            for m in model.modules():
                if _own_tensors(m):
                    handles.append(m.register_forward_pre_hook(before))
                    handles.append(m.register_forward_hook(after))
        yield
    finally:
        for h in handles:
            h.remove()
        for saved in stash.values():
            for group, name, t in reversed(saved):
                group[name] = t
        stash.clear()


def main_branch_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The main-branch prediction ``[B, 4 + nc, A]`` of a dual model, running only the layers it depends on.

    Layers are routed exactly as YOLOv9's ``_forward_once`` (each layer reads ``from``: ``-1`` the previous layer,
    the image at layer 0), but a layer runs only when the head's last ``nl`` (main) inputs depend on it, and each
    output is dropped after its last reader. The head runs its main half (``DualDDetect.forward_main``). The
    dependencies are read from the built model itself (each layer's ``f``), not from the deploy plan, so this is
    an evaluation of the dual graph, independent of the conversion under test. A model without a dual head runs
    its plain forward.
    """
    layers = list(model.model)  # type: ignore[attr-defined]
    head = layers[-1]
    if not hasattr(head, "forward_main"):
        return main_output(model(x))
    sources = {m.i: resolve_from(m.f, m.i) for m in layers}
    main_in = sources[head.i][head.nl:]
    needed = ancestors(sources, main_in)
    last_read: dict[int, int] = {}
    for i in sorted(needed) + [head.i]:
        for j in (sources[i] if i != head.i else main_in):
            last_read[j] = i
    outputs: dict[int, torch.Tensor] = {-1: x}
    for m in layers[:-1]:
        if m.i not in needed:
            continue
        ins = [outputs[j] for j in sources[m.i]]
        outputs[m.i] = m(ins[0] if isinstance(m.f, int) else ins)
        for j in set(sources[m.i]):
            if last_read.get(j) == m.i:
                del outputs[j]
    y, _maps = head.forward_main([outputs[j] for j in main_in])
    return y


def _compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, str]:
    """max |a - b| and a reason when the outputs cannot be compared (shapes) or are not finite."""
    if a.shape != b.shape:
        return float("inf"), f"output shapes differ: dual main {list(a.shape)} vs deploy {list(b.shape)}"
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf"), "non-finite values in the outputs"
    return (float((a - b).abs().max()) if a.numel() else 0.0), ""


def _stride_mismatch(x: torch.Tensor, out: Any, *models: nn.Module) -> str:
    """A reason when the models' head strides differ from those of the feature maps ``out`` holds (else "").

    ``out`` is a head's eval output ``(y, maps)``; for a dual head ``maps`` is ``[maps_aux, maps_main]``. The
    stride of level ``i`` is ``H / H_i`` (YOLOv9 measures it the same way, on a blank 256 px image).
    """
    maps = out[1] if isinstance(out, tuple) and len(out) > 1 else None
    if isinstance(maps, (list, tuple)) and maps and isinstance(maps[0], (list, tuple)):
        maps = maps[-1]
    if not isinstance(maps, (list, tuple)) or not maps:
        return "cannot read the feature maps of the dual model's head"
    measured = [x.shape[-2] / m.shape[-2] for m in maps]
    for model in models:
        used = [float(v) for v in model.model[-1].stride]  # type: ignore[attr-defined,index]
        if used != measured:
            return f"the head strides {used} do not match the feature maps (strides {measured})"
    return ""


def check_conversion(
    dual: nn.Module, deploy: nn.Module, *, imgsz: int, stride: int, seed: int = 0, atol: float = DEFAULT_ATOL,
    level: str = "fast",
) -> tuple[ValidationResult, dict[str, float]]:
    """Prove that ``deploy`` computes the dual model's main branch; count both models' GFLOPs on the way.

    Args:
        dual: the dual model (its head returns both halves); ``deploy``: the pruned model. Weights in any float
            dtype (computed in fp32 via :func:`computing_in_fp32`), eval mode.
        imgsz: full-size side in pixels (rounded up to ``stride``); stride: the largest head stride (pixels).
        seed: seed of the inputs; atol: tolerance on every max |diff| (output units: pixels / probability).
        level: ``"fast"`` or ``"full"`` (see the module docstring).

    Returns:
        ``(result, gflops)``: ``gflops = {"before": dual, "after": deploy, "imgsz": s}``, GFLOPs of one
        ``[1, 3, s, s]`` forward, counted during the non-square check (:func:`counting_conv_flops`) and scaled by
        area (:func:`scaled_gflops`). The head strides both models decode with must equal those of the dual
        model's feature maps on that check (models built with a checkpoint's stored strides are checked here).

    Raises ValueError for an unknown level.
    """
    if level not in CHECK_LEVELS:
        raise ValueError(f"unknown check level {level!r}; choose from {', '.join(CHECK_LEVELS)}")
    dual.eval()
    deploy.eval()
    inputs = fast_inputs(imgsz, stride, seed) if level == "fast" else sample_inputs(imgsz, stride, seed)
    s = int(inputs[0].shape[-1])
    comps: list[Comparison] = []
    reasons: list[str] = []
    worst = 0.0
    main_only_vs_full = None
    flops: dict[str, float] = {}

    def record(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, how: str) -> None:
        nonlocal worst
        d, why = _compare(a, b)
        if why:
            reasons.append(why)
        worst = max(worst, d)
        comps.append(Comparison(list(x.shape), list(b.shape), d, how))

    with computing_in_fp32(dual, deploy), torch.inference_mode():
        big, small = inputs
        if level == "fast":
            record(big, main_branch_forward(dual, big).float(), main_output(deploy(big)).float(), "main-only")
        else:
            record(big, main_output(dual(big)).float(), main_output(deploy(big)).float(), "full")
        with counting_conv_flops(dual) as counter:
            out = dual(small)
        full = main_output(out).float()
        why = _stride_mismatch(small, out, dual, deploy)
        if why:
            reasons.append(why)
        flops["before"] = scaled_gflops(counter["flops"], small.shape, s)
        with counting_conv_flops(deploy) as counter:
            b = main_output(deploy(small)).float()
        flops["after"] = scaled_gflops(counter["flops"], small.shape, s)
        record(small, full, b, "full")
        if level == "fast":
            lazy = main_branch_forward(dual, small).float()
            d, why = _compare(lazy, full)
            main_only_vs_full = d
            if why or d > atol:
                reasons.append(f"the main-only evaluation of the dual model differs from its full forward "
                               f"({why or f'max |diff| {d:.3g}'})")
    passed = not reasons and worst <= atol
    reason = "; ".join(reasons)
    if not passed and not reason:
        reason = f"max |diff| {worst:.3g} exceeds atol {atol:.3g}"
    result = ValidationResult(passed=passed, max_abs_diff=worst, atol=atol, comparisons=comps, reason=reason,
                              check=level, main_only_vs_full=main_only_vs_full)
    return result, {**flops, "imgsz": s}


def count_params(model: nn.Module) -> int:
    """Number of parameters (elements), buffers excluded."""
    return sum(p.numel() for p in model.parameters())


@contextmanager
def counting_conv_flops(model: nn.Module) -> Iterator[dict[str, int]]:
    """Count the FLOPs of every ``nn.Conv2d`` of ``model`` run inside the block into ``counter["flops"]``.

    ``2 x out.numel() x (C_in / groups) x k_h x k_w`` per call: the rule of ``torch.utils.flop_counter`` for
    convolutions (2 x multiply-accumulates, bias not counted). YOLOv9 graphs compute with convolutions only (their
    other ops, activations, pooling, upsampling, concatenation, are not counted by that rule either), so this
    equals ``FlopCounterMode``'s total, without its per-op Python dispatch, which is slow and, on the first
    ``.float()`` it sees, imports torch's decompositions (seconds).
    """
    counter = {"flops": 0}

    def count(m: nn.Module, _args: Any, out: torch.Tensor) -> None:
        counter["flops"] += 2 * out.numel() * m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        yield counter
    finally:
        for h in handles:
            h.remove()


def scaled_gflops(flops: int, shape: torch.Size | tuple[int, ...], imgsz: int) -> float:
    """GFLOPs of one ``[1, 3, imgsz, imgsz]`` forward, from ``flops`` counted on an input of ``shape [B, 3, h, w]``.

    Counted as ``torch.utils.flop_counter`` does (:func:`counting_conv_flops`): 2 x multiply-accumulates for
    convolutions (the official YOLOv9 printout uses thop's MACs x 2 too, so numbers are comparable). Every layer's
    work is proportional to its feature-map area and to the batch, so ``flops / B * imgsz**2 / (h * w)`` is exact
    when ``h``, ``w`` and ``imgsz`` are multiples of the largest stride; counting at 640 would cost a full-size
    forward.
    """
    b, _c, h, w = (int(v) for v in shape)
    return flops / b * (imgsz * imgsz) / (h * w) / 1e9
