"""The equivalence check: the deploy model must give the dual model's main-branch output.

YOLOv9's ``DualDDetect`` in eval mode returns ``([y_aux, y_main], [d_aux, d_main])`` where each ``y`` is
``[B, 4 + nc, A]`` (box xywh in input pixels, then class sigmoid scores; ``A`` anchors, 8400 at 640x640) — the
main half (``cv4``/``cv5``/``dfl2``) is index 1. The deploy ``DDetect`` returns ``(y, d)`` with ``y`` of the same
shape. Both run in fp32 on the same seeded inputs; the largest absolute difference is reported in the units of
``y`` (pixels for boxes, probability for scores).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..spec import DEFAULT_ATOL


@dataclass
class Comparison:
    """One input's comparison: its shape ``[B, 3, H, W]``, the output shape and max |diff|."""

    input_shape: list[int]
    output_shape: list[int]
    max_abs_diff: float


@dataclass
class ValidationResult:
    """Outcome of :func:`check_equivalence`.

    ``max_abs_diff`` is the largest |deploy - dual main| over all inputs (fp32); ``passed`` is
    ``max_abs_diff <= atol`` with matching shapes and finite outputs.
    """

    passed: bool
    max_abs_diff: float
    atol: float
    comparisons: list[Comparison] = field(default_factory=list)
    reason: str = ""

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


@torch.no_grad()
def check_equivalence(
    dual: nn.Module, deploy: nn.Module, inputs: list[torch.Tensor], atol: float = DEFAULT_ATOL
) -> ValidationResult:
    """Run both models (fp32, eval) on each input and compare main outputs.

    Args:
        dual: the dual model (its head returns both halves); ``deploy``: the pruned model.
        inputs: ``[B, 3, H, W]`` tensors, stride-aligned.
        atol: tolerance on max |diff| (output units: pixels / probability).
    """
    dual.eval()
    deploy.eval()
    comps: list[Comparison] = []
    worst = 0.0
    reason = ""
    for x in inputs:
        a = main_output(dual(x)).float()
        b = main_output(deploy(x)).float()
        if a.shape != b.shape:
            reason = f"output shapes differ: dual main {list(a.shape)} vs deploy {list(b.shape)}"
            comps.append(Comparison(list(x.shape), list(b.shape), float("inf")))
            worst = float("inf")
            continue
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            reason = "non-finite values in the outputs"
            worst = float("inf")
        d = float((a - b).abs().max()) if a.numel() else 0.0
        worst = max(worst, d)
        comps.append(Comparison(list(x.shape), list(b.shape), d))
    passed = not reason and worst <= atol
    if not passed and not reason:
        reason = f"max |diff| {worst:.3g} exceeds atol {atol:.3g}"
    return ValidationResult(passed=passed, max_abs_diff=worst, atol=atol, comparisons=comps, reason=reason)


def count_params(model: nn.Module) -> int:
    """Number of parameters (elements), buffers excluded."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def gflops(model: nn.Module, imgsz: int = 640, probe: int = 128) -> float:
    """GFLOPs of one forward pass at ``[1, 3, imgsz, imgsz]`` (fp32), counted by ``torch.utils.flop_counter``.

    Counted as torch does: 2 x multiply-accumulates for convolutions (the official YOLOv9 printout uses thop's
    MACs x 2 too, so numbers are comparable). The count runs at ``probe`` pixels and is scaled by
    ``(imgsz / probe) ** 2``: every layer's work is proportional to its feature-map area, so this is exact when
    both sizes are multiples of the largest stride, and far cheaper than counting at 640.
    """
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    x = torch.zeros(1, 3, probe, probe, dtype=p.dtype, device=p.device)
    with FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return counter.get_total_flops() * (imgsz / probe) ** 2 / 1e9
