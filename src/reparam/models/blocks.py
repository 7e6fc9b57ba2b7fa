"""Convolution-level and ELAN-family blocks of YOLOv9 / GELAN.

Every class mirrors one block of the official YOLOv9 code (WongKinYiu/yolov9,
``models/common.py``) in behaviour, ``state_dict`` keys and instance attributes,
so that weights trained with the official code load strictly and give identical
numbers in eval mode. Submodule attribute names (``conv``, ``bn``, ``act``,
``cv1`` ... ``cv5``, ``m``, ``conv1``, ``conv2``) are part of that contract and
must not be renamed.

Shapes use ``B`` for batch, ``C`` for channels and ``H x W`` for the map size.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "autopad",
    "fold_batchnorm",
    "fuse_model",
    "Conv",
    "RepConvN",
    "RepNBottleneck",
    "RepNCSP",
    "RepNCSPELAN4",
    "ELAN1",
    "AConv",
    "ADown",
    "SP",
    "SPPELAN",
    "CBLinear",
    "CBFuse",
    "Concat",
    "Silence",
    "Proto",
]


def autopad(k: int | Sequence[int], p: int | Sequence[int] | None = None, d: int = 1):
    """Padding that keeps the map size at stride 1 ("same" padding).

    Args:
        k: kernel size (int or per-dimension sequence).
        p: explicit padding; returned unchanged when given.
        d: dilation; the effective kernel is ``d * (k - 1) + 1``.
    """
    if p is not None:
        return p
    if isinstance(k, int):
        return (d * (k - 1) + 1) // 2
    return [(d * (x - 1) + 1) // 2 for x in k]


def _activation(act: bool | nn.Module) -> nn.Module:
    """``True`` -> SiLU, a module -> itself, anything else -> Identity (as YOLOv9's ``Conv``)."""
    if act is True:
        return nn.SiLU()
    if isinstance(act, nn.Module):
        return act
    return nn.Identity()


@torch.no_grad()
def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None,
                   bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of one conv equal to ``bn(conv(x))`` in eval mode (BatchNorm running statistics).

    ``W' = W * t`` per output channel and ``b' = b * t + beta - gamma * mean / sqrt(var + eps)`` with
    ``t = gamma / sqrt(var + eps)`` (``b`` left out when the conv has no bias). Source: YOLOv9
    ``utils.torch_utils.fuse_conv_and_bn`` and ``RepConvN._fuse_bn_tensor`` (the same fold).

    Args:
        weight: conv weight ``[C_out, C_in / groups, kH, kW]``.
        bias: conv bias ``[C_out]`` or None.
        bn: the BatchNorm over ``C_out`` channels.

    Returns:
        ``(kernel [C_out, C_in / groups, kH, kW], bias [C_out])`` on ``weight``'s device and dtype.

    Raises:
        ValueError: ``bn.num_features`` differs from ``C_out``.
    """
    if bn.num_features != weight.shape[0]:
        raise ValueError(f"cannot fuse BatchNorm2d({bn.num_features}) into a conv with {weight.shape[0]} outputs")
    std = torch.sqrt(bn.running_var + bn.eps)
    scale = bn.weight.div(std)
    folded = bn.bias - bn.weight.mul(bn.running_mean).div(std)
    if bias is not None:
        folded = bias * scale + folded
    return weight * scale.view(-1, 1, 1, 1), folded


def _biased_conv(ref: nn.Conv2d, kernel: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A biased ``nn.Conv2d`` with ``ref``'s geometry holding ``kernel`` and ``bias`` (``requires_grad`` off)."""
    fused = nn.Conv2d(ref.in_channels, ref.out_channels, kernel_size=ref.kernel_size, stride=ref.stride,
                      padding=ref.padding, dilation=ref.dilation, groups=ref.groups, bias=True,
                      padding_mode=ref.padding_mode).requires_grad_(False)
    fused.to(device=ref.weight.device, dtype=ref.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)
    return fused


def fuse_model(model: nn.Module) -> nn.Module:
    """Fuse every block of ``model`` for inference, in place: each :class:`RepConvN` and :class:`Conv` runs its
    own :meth:`fuse` (the walker visits a block before its children, so a RepConvN folds its inner Convs'
    BatchNorms itself). Idempotent; eval-mode outputs stay equal up to float rounding (YOLOv9 reports <= 6.1e-5
    px on the boxes). Source: YOLOv9 ``BaseModel.fuse``.

    Args:
        model: any module tree (a ``DetectionModel`` or a single block).

    Returns:
        ``model`` itself (fewer modules: every ``bn``, ``conv1`` and ``conv2`` folded away).
    """
    if isinstance(model, (RepConvN, Conv)):
        model.fuse()
    for child in list(model.children()):
        fuse_model(child)
    return model


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> activation.

    Args:
        c1: input channels.
        c2: output channels.
        k: kernel size.
        s: stride.
        p: padding; ``None`` means "same" padding (:func:`autopad`).
        g: groups.
        d: dilation.
        act: ``True`` for SiLU, a module to use it, ``False`` for none.

    Shapes: ``[B, c1, H, W] -> [B, c2, ceil(H/s), ceil(W/s)]`` (with "same" padding).

    After :meth:`fuse` the ``bn`` submodule is gone, ``conv`` carries the folded
    bias and the forward is conv -> act.
    """

    def __init__(self, c1: int, c2: int, k=1, s=1, p=None, g: int = 1, d: int = 1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "bn" in self._modules:
            return self.act(self.bn(self.conv(x)))
        return self.act(self.conv(x))

    def fuse(self) -> None:
        """Fold ``bn`` into ``conv`` (:func:`fold_batchnorm`) and remove it; idempotent."""
        if "bn" not in self._modules:
            return
        self.conv = _biased_conv(self.conv, *fold_batchnorm(self.conv.weight, self.conv.bias, self.bn))
        del self.bn


class RepConvN(nn.Module):
    """Re-parameterizable 3x3 conv: ``act(Conv3x3_bn(x) + Conv1x1_bn(x))``.

    The training graph has two branches, ``conv1`` (k x k) and ``conv2`` (1x1),
    each a :class:`Conv` without activation; YOLOv9 disables the identity branch
    (``bn`` is ``None``). :meth:`fuse` folds both into one biased 3x3
    ``conv`` (RepVGG-style reparameterization).

    Args:
        c1: input channels.
        c2: output channels.
        k: kernel size (must be 3).
        s: stride.
        p: padding (must be 1).
        g: groups.
        d: dilation (unused, as in YOLOv9).
        act: ``True`` for SiLU, a module to use it, ``False`` for none.
        bn: accepted for signature compatibility; the identity branch is never built.
        deploy: accepted for signature compatibility; unused.

    Shapes: ``[B, c1, H, W] -> [B, c2, ceil(H/s), ceil(W/s)]``.
    """

    def __init__(self, c1: int, c2: int, k=3, s=1, p=1, g: int = 1, d: int = 1, act=True,
                 bn: bool = False, deploy: bool = False):
        super().__init__()
        if k != 3 or p != 1:
            raise ValueError(f"RepConvN needs k=3 and p=1, got k={k}, p={p}")
        self.g = g
        self.c1 = c1
        self.c2 = c2
        self.act = _activation(act)
        self.bn = None  # identity branch: disabled in YOLOv9
        self.conv1 = Conv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = Conv(c1, c2, 1, s, p=p - k // 2, g=g, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "conv" in self._modules:  # re-parameterized
            return self.act(self.conv(x))
        out = self.conv1(x) + self.conv2(x)
        if self.bn is not None:
            out = out + self.bn(x)
        return self.act(out)

    def fuse(self) -> None:
        """Replace ``conv1``/``conv2`` by one biased 3x3 ``conv``; idempotent.

        Source: RepVGG reparameterization as in YOLOv9 ``RepConvN.fuse_convs``: each branch's BatchNorm folded
        (:func:`fold_batchnorm`), then ``W = W3 + pad(W1)``, ``b = b3 + b1``.
        """
        if "conv" in self._modules:
            return
        k3, b3 = fold_batchnorm(self.conv1.conv.weight, self.conv1.conv.bias, self.conv1.bn)
        k1, b1 = fold_batchnorm(self.conv2.conv.weight, self.conv2.conv.bias, self.conv2.bn)
        self.conv = _biased_conv(self.conv1.conv, k3 + F.pad(k1, [1, 1, 1, 1]), b3 + b1)
        del self.conv1
        del self.conv2
        if hasattr(self, "bn"):
            del self.bn


class RepNBottleneck(nn.Module):
    """Bottleneck ``RepConvN(k[0]) -> Conv(k[1])`` with an optional residual add.

    Args:
        c1: input channels.
        c2: output channels.
        shortcut: add the input when ``c1 == c2``.
        g: groups of the second conv.
        k: kernel sizes of the two convs.
        e: hidden channel ratio (``c_ = int(c2 * e)``).

    Shapes: ``[B, c1, H, W] -> [B, c2, H, W]``.
    """

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, k=(3, 3), e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = RepConvN(c1, c_, k[0], 1)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class RepNCSP(nn.Module):
    """CSP block with ``n`` :class:`RepNBottleneck` s and three 1x1 convs.

    ``cv3(cat(m(cv1(x)), cv2(x)))``.

    Args:
        c1: input channels.
        c2: output channels.
        n: number of bottlenecks.
        shortcut: residual add inside the bottlenecks.
        g: groups.
        e: hidden channel ratio (``c_ = int(c2 * e)``).

    Shapes: ``[B, c1, H, W] -> [B, c2, H, W]``.
    """

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*[RepNBottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class _SplitTwoStages(nn.Module):
    """The forward shared by :class:`RepNCSPELAN4` and :class:`ELAN1` (the same in YOLOv9's ``models/common.py``):
    ``y = chunk(cv1(x), 2); y += [cv2(y[-1]), cv3(y[-1])]; cv4(cat(y))``. Subclasses set ``cv1``..``cv4``."""

    cv1: nn.Module
    cv2: nn.Module
    cv3: nn.Module
    cv4: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.append(self.cv2(y[-1]))
        y.append(self.cv3(y[-1]))
        return self.cv4(torch.cat(y, 1))


class RepNCSPELAN4(_SplitTwoStages):
    """GELAN block: 1x1 split, two RepNCSP+Conv3x3 stages, 1x1 merge.

    ``y = chunk(cv1(x), 2); y += [cv2(y[-1]), cv3(y[-1])]; cv4(cat(y))``.

    Args:
        c1: input channels.
        c2: output channels.
        c3: channels after ``cv1`` (split in two halves).
        c4: channels of each stage.
        c5: RepNCSP depth (bottlenecks per stage).

    Shapes: ``[B, c1, H, W] -> [B, c2, H, W]``.
    """

    def __init__(self, c1: int, c2: int, c3: int, c4: int, c5: int = 1):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = nn.Sequential(RepNCSP(c3 // 2, c4, c5), Conv(c4, c4, 3, 1))
        self.cv3 = nn.Sequential(RepNCSP(c4, c4, c5), Conv(c4, c4, 3, 1))
        self.cv4 = Conv(c3 + 2 * c4, c2, 1, 1)


class ELAN1(_SplitTwoStages):
    """Light ELAN block (YOLOv9-t/s): 1x1 split, two Conv3x3 stages, 1x1 merge.

    Args:
        c1: input channels.
        c2: output channels.
        c3: channels after ``cv1`` (split in two halves).
        c4: channels of each stage.

    Shapes: ``[B, c1, H, W] -> [B, c2, H, W]``.
    """

    def __init__(self, c1: int, c2: int, c3: int, c4: int):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = Conv(c3 // 2, c4, 3, 1)
        self.cv3 = Conv(c4, c4, 3, 1)
        self.cv4 = Conv(c3 + 2 * c4, c2, 1, 1)


def _avg_pool_2x2_s1(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pool, stride 1, no padding, ``count_include_pad=True``: H, W shrink by 1."""
    return F.avg_pool2d(x, kernel_size=2, stride=1, padding=0, ceil_mode=False, count_include_pad=True)


class AConv(nn.Module):
    """Downsampling by 2x2 average (stride 1) then Conv3x3 stride 2, padding 1.

    Args:
        c1: input channels.
        c2: output channels.

    Shapes: ``[B, c1, H, W] -> [B, c2, floor((H-1+1)/2), ...]``, i.e. ``H/2`` for even H.
    """

    def __init__(self, c1: int, c2: int):
        super().__init__()
        self.cv1 = Conv(c1, c2, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv1(_avg_pool_2x2_s1(x))


class ADown(nn.Module):
    """YOLOv9 downsampling: 2x2 average (stride 1), split channels in halves,
    Conv3x3/2 on one half, MaxPool3x3/2 + Conv1x1 on the other, concat.

    Args:
        c1: input channels (even).
        c2: output channels (even).

    Shapes: ``[B, c1, H, W] -> [B, c2, H/2, W/2]`` for even H, W.
    """

    def __init__(self, c1: int, c2: int):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1 // 2, self.c, 3, 2, 1)
        self.cv2 = Conv(c1 // 2, self.c, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = _avg_pool_2x2_s1(x).chunk(2, 1)
        a = self.cv1(a)
        b = self.cv2(F.max_pool2d(b, kernel_size=3, stride=2, padding=1))
        return torch.cat((a, b), 1)


class SP(nn.Module):
    """Max pooling with "same" padding: ``MaxPool2d(k, s, padding=k // 2)``.

    Args:
        k: kernel size.
        s: stride.

    Shapes: ``[B, C, H, W] -> [B, C, H, W]`` for ``s=1``.
    """

    def __init__(self, k: int = 3, s: int = 1):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=s, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


class SPPELAN(nn.Module):
    """SPP in ELAN form: Conv1x1, three chained 5x5 max pools, concat of all four, Conv1x1.

    Args:
        c1: input channels.
        c2: output channels.
        c3: hidden channels.

    Shapes: ``[B, c1, H, W] -> [B, c2, H, W]``.
    """

    def __init__(self, c1: int, c2: int, c3: int):
        super().__init__()
        self.c = c3
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = SP(5)
        self.cv3 = SP(5)
        self.cv4 = SP(5)
        self.cv5 = Conv(4 * c3, c2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for pool in (self.cv2, self.cv3, self.cv4):
            y.append(pool(y[-1]))
        return self.cv5(torch.cat(y, 1))


class CBLinear(nn.Module):
    """CBNet linear projection: one biased conv whose output is split into ``c2s`` parts.

    Args:
        c1: input channels.
        c2s: output channels of each part.
        k: kernel size.
        s: stride.
        p: padding (``None``: "same").
        g: groups.

    Shapes: ``[B, c1, H, W] -> tuple of [B, c2s[i], H, W]``.
    """

    def __init__(self, c1: int, c2s: Sequence[int], k: int = 1, s: int = 1, p=None, g: int = 1):
        super().__init__()
        self.c2s = c2s
        self.conv = nn.Conv2d(c1, sum(c2s), k, s, autopad(k, p), groups=g, bias=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.conv(x).split(self.c2s, dim=1)


#: Bytes of resized parts :class:`CBFuse` stacks at once in inference mode on the CPU (see its docstring), and on
#: an accelerator, where fewer, larger slices keep the kernel launches few.
CBFUSE_CHUNK_BYTES = 16 * 2**20
CBFUSE_CHUNK_BYTES_ACCELERATOR = 256 * 2**20


class CBFuse(nn.Module):
    """CBNet fusion: pick part ``idx[i]`` of each CBLinear output, resize it
    (nearest) to the last input's size and sum everything.

    As the official ``CBFuse.forward``: ``torch.stack(parts).sum(0)`` of the resized parts and the last input. In
    inference mode (``torch.inference_mode``: the equivalence check, evaluation) the same stack-and-sum runs a few
    images, or a few channels of one image, at a time into the output (:data:`CBFUSE_CHUNK_BYTES` of parts at once,
    :data:`CBFUSE_CHUNK_BYTES_ACCELERATOR` on a GPU): nearest resizing, stacking and the sum over the stacked
    dimension are each element by element, so every output element is computed by the same operations on the same
    values, bit for bit (the sum goes into a fresh contiguous tensor, then is copied: a strided ``out=`` could let
    the reduction reorder its additions), while the full-size parts and their stack are never held (at the first
    fusion of yolov9-e at 640 px: five resized 64x320x320 fp32 maps and the stack of six, 275 MiB, more than the
    model's weights). Traced or
    exported (TorchScript, ONNX) it is always the plain form, so the graph keeps free shapes.

    Args:
        idx: for each CBLinear input, which split to take.

    Shapes: ``[tuple(...[B, C, h_i, w_i]...), ..., [B, C, H, W]] -> [B, C, H, W]``.
    """

    def __init__(self, idx: Sequence[int]):
        super().__init__()
        self.idx = idx

    def forward(self, xs: list) -> torch.Tensor:
        target = xs[-1]
        size = target.shape[2:]
        if torch.is_inference_mode_enabled() and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            return self._chunked(xs)
        parts = [F.interpolate(x[self.idx[i]], size=size, mode="nearest") for i, x in enumerate(xs[:-1])]
        parts.append(target)
        return torch.stack(parts).sum(dim=0)

    def _chunked(self, xs: list) -> torch.Tensor:
        """The plain forward's result, computed ``[b', c', H, W]`` slice by slice (equal bits, bounded memory):
        whole images when one fits the budget, else a few channels of one image."""
        target = xs[-1]
        b, c, h, w = target.shape
        budget = CBFUSE_CHUNK_BYTES if target.device.type == "cpu" else CBFUSE_CHUNK_BYTES_ACCELERATOR
        per_channel = max(1, len(xs) * h * w * target.element_size())
        images, step = (max(1, budget // (per_channel * c)), c) if per_channel * c <= budget \
            else (1, max(1, budget // per_channel))
        out = torch.empty_like(target)
        for i in range(0, b, images):
            for c0 in range(0, c, step):
                where = (slice(i, i + images), slice(c0, c0 + step))
                parts = [F.interpolate(x[self.idx[k]][where], size=(h, w), mode="nearest")
                         for k, x in enumerate(xs[:-1])]
                parts.append(target[where])
                # into a fresh tensor, then copied: a strided ``out=`` (a channels-last output) would let the
                # reduction reorder its loop, and its additions
                out[where] = torch.stack(parts).sum(dim=0)
                del parts
        return out


class Concat(nn.Module):
    """Concatenate a list of tensors along dimension ``dimension`` (``d``).

    Shapes: ``[[B, C_i, H, W], ...] -> [B, sum C_i, H, W]`` for ``dimension=1``.
    """

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


class Silence(nn.Module):
    """Identity; YOLOv9 dual configs start with it so that both branches read the image.

    Shapes: ``x -> x``.
    """

    def forward(self, x):
        return x


class Proto(nn.Module):
    """Mask prototypes for segmentation heads: Conv3x3, nearest x2, Conv3x3, Conv1x1.

    Args:
        c1: input channels.
        c_: hidden channels (number of protos).
        c2: output channels (number of masks).

    Shapes: ``[B, c1, H, W] -> [B, c2, 2H, 2W]``.
    """

    def __init__(self, c1: int, c_: int = 256, c2: int = 32):
        super().__init__()
        self.cv1 = Conv(c1, c_, k=3)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.cv2 = Conv(c_, c_, k=3)
        self.cv3 = Conv(c_, c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(self.cv2(self.upsample(self.cv1(x))))
