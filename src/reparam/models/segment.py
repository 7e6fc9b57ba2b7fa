"""The single-branch ``Segment`` head of gelan-c-seg and the anchor-free ``Detect`` it extends.

Behaviour, ``state_dict`` keys and instance attributes follow the official ``models/yolo.py`` (WongKinYiu/yolov9:
``class Detect``, ``class Segment(Detect)``; configs ``models/segment/gelan-c-seg.yaml``, last layer
``[[15, 18, 21], 1, Segment, [nc, 32, 256]]``). ``Detect`` differs from :class:`~.heads.DDetect` only in its box
tower (two plain 3x3 convs, no groups, width ``max(ch[0] // 4, 64, 16)`` without rounding to a multiple of 4);
``Segment`` adds mask-coefficient towers ``cv4`` and a full :class:`~.blocks.Proto` (3x3 conv, nearest x2, 3x3 conv,
1x1 conv) on the P3 input, where ``DSegment`` has a 1x1 conv on a separate prototype input.

As in :mod:`.heads`, the anchor grid is computed afresh in every forward and the input list is never modified (the
official ``Detect.forward`` overwrites ``x[i]`` in place). Neither head has a fuse of its own: its ``Conv`` blocks
fold their BatchNorm through :func:`~.blocks.fuse_model`, like every other block.

Shapes: ``B`` batch, ``nc`` classes, ``nm`` mask coefficients (32), ``reg_max`` = 16 DFL bins, ``A`` anchors over
the levels (``sum H_i * W_i``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .blocks import Conv, Proto
from .heads import _mask_branch, _SingleBranchHead

__all__ = ["Detect", "Segment"]


def _plain_box_branch(c_in: int, c_hidden: int, reg_max: int) -> nn.Sequential:
    """Box tower of ``Detect``: Conv3x3, Conv3x3, 1x1 to ``4 * reg_max`` (no groups)."""
    return nn.Sequential(Conv(c_in, c_hidden, 3), Conv(c_hidden, c_hidden, 3), nn.Conv2d(c_hidden, 4 * reg_max, 1))


def _plain_widths(c_in: int, nc: int, reg_max: int) -> tuple[int, int]:
    """Hidden widths of ``Detect``'s box and class towers (YOLOv9 ``Detect``: the box width not rounded to 4)."""
    return max(c_in // 4, reg_max * 4, 16), max(c_in, min(nc * 2, 128))


class Detect(_SingleBranchHead):
    """Anchor-free single-branch detection head (official ``Detect``; the base of ``Segment``).

    Arguments, input and output as :class:`~.heads.DDetect` (``nc``, ``ch`` of P3/P4/P5; eval ``(y [B, 4 + nc, A],
    maps)``); only its box towers and their width differ (module docstring).
    """

    _box_tower = staticmethod(_plain_box_branch)
    _widths = staticmethod(_plain_widths)

    def forward(self, x: list[torch.Tensor]):
        # its own (the base's, by another name): Segment stores ``Detect.forward`` and a pickle names the function
        # by its qualified name, which must be ``Detect.forward`` (official ``models.yolo``)
        return super().forward(x)


class Segment(Detect):
    """``Detect`` plus mask coefficients and a ``Proto`` module on P3 (official ``Segment``, gelan-c-seg).

    Args:
        nc: number of classes.
        nm: number of masks (mask coefficients per anchor, prototype channels).
        npr: hidden channels of the ``Proto`` module (``number of protos``; the config's 256 scaled by
            ``width_multiple``, as ``parse_model`` does).
        ch: channels of P3, P4, P5.
        inplace: kept for compatibility (unused).

    Output: training: ``(maps, mc, p)``; eval: ``(cat(y, mc) [B, 4 + nc + nm, A], (maps, mc, p))`` with
    ``mc [B, nm, A]`` and ``p [B, nm, 2 H_0, 2 W_0]`` (the prototypes at twice the P3 size: input / 4);
    export: ``(cat(y, mc), p)``. The same structure as ``DSegment``'s, so everything that reads a segmentation output
    reads both.

    ``detect`` is ``Detect.forward``, as the official head stores it: a pickled deploy model carries it as
    ``getattr(models.yolo.Detect, 'forward')``, which the official ``Segment.forward`` calls.
    """

    def __init__(self, nc: int = 80, nm: int = 32, npr: int = 256, ch: Sequence[int] = (), inplace: bool = True):
        super().__init__(nc, ch, inplace)
        self.nm = nm
        self.npr = npr
        self.proto = Proto(ch[0], npr, nm)
        self.detect = Detect.forward
        c4 = max(ch[0] // 4, nm)
        self.cv4 = nn.ModuleList(_mask_branch(x, c4, nm) for x in ch)

    def forward(self, x: list[torch.Tensor]):
        p = self.proto(x[0])
        b = p.shape[0]
        mc = torch.cat([self.cv4[i](x[i]).view(b, self.nm, -1) for i in range(self.nl)], 2)
        out = Detect.forward(self, x)
        if self.training:
            return out, mc, p
        if self.export:
            return torch.cat([out, mc], 1), p
        return torch.cat([out[0], mc], 1), (out[1], mc, p)
