"""Anchor-free detection heads of YOLOv9: DFL, DDetect, DualDDetect, TripleDDetect
and the segmentation heads DSegment, DualDSegment.

Behaviour, ``state_dict`` keys and instance attributes follow the official
``models/yolo.py`` (WongKinYiu/yolov9). One deliberate difference: the anchor
grid is computed afresh in every forward from the feature-map sizes (no cached
``shape``/``anchors`` state that could make results depend on call history).
The instance attributes ``anchors`` and ``strides`` exist, as in official
checkpoints, but forward never reads them.

Shapes: ``B`` batch, ``nc`` classes, ``reg_max`` = 16 DFL bins, ``A`` = total
anchors over the levels (``sum H_i * W_i``; 8400 for a 640x640 image).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .blocks import Conv

__all__ = [
    "make_divisible",
    "make_anchors",
    "dist2bbox",
    "DFL",
    "DDetect",
    "DualDDetect",
    "TripleDDetect",
    "DSegment",
    "DualDSegment",
]


def make_divisible(x: float, divisor: int) -> int:
    """Smallest multiple of ``divisor`` that is >= ``x`` (YOLOv9 ``utils.general.make_divisible``)."""
    return math.ceil(x / divisor) * divisor


def make_anchors(feats: Sequence[torch.Tensor], strides: Sequence[float] | torch.Tensor,
                 offset: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor points (cell centres, in grid units) and their stride for each level.

    Args:
        feats: feature maps ``[B, C, H_i, W_i]``; only their size, dtype and device are used.
        strides: stride of each level in input pixels.
        offset: position of the point inside its cell (0.5 = centre).

    Returns:
        ``points [A, 2]`` (x, y) row-major per level, levels concatenated, and
        ``stride [A, 1]``.
    """
    points, stride_col = [], []
    dtype, device = feats[0].dtype, feats[0].device
    for feat, stride in zip(feats, strides):
        h, w = feat.shape[-2:]
        xs = torch.arange(w, device=device, dtype=dtype) + offset
        ys = torch.arange(h, device=device, dtype=dtype) + offset
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((gx, gy), -1).view(-1, 2))
        stride_col.append(torch.full((h * w, 1), stride, dtype=dtype, device=device))
    return torch.cat(points), torch.cat(stride_col)


def dist2bbox(distance: torch.Tensor, anchor_points: torch.Tensor, xywh: bool = True,
              dim: int = -1) -> torch.Tensor:
    """Distances (left, top, right, bottom) from anchor points to boxes.

    Returns ``(cx, cy, w, h)`` when ``xywh`` else ``(x1, y1, x2, y2)``, along ``dim``.
    """
    lt, rb = distance.split(2, dim)
    x1y1 = anchor_points - lt
    x2y2 = anchor_points + rb
    if xywh:
        return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)
    return torch.cat((x1y1, x2y2), dim)


class DFL(nn.Module):
    """Distribution Focal Loss integral: expected bin index of a softmax over ``c1`` bins.

    The 1x1 conv has fixed weights ``arange(c1)`` (not trained).

    Args:
        c1: number of bins (``reg_max``).

    Shapes: ``[B, 4 * c1, A] -> [B, 4, A]``.
    """

    def __init__(self, c1: int = 17):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        if not self.conv.weight.is_meta:  # a model built on "meta" (no storage) gets its weights loaded later
            self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        probs = x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)
        return self.conv(probs).view(b, 4, a)


def _box_branch(c_in: int, c_hidden: int, reg_max: int) -> nn.Sequential:
    """Box regression tower: Conv3x3, grouped Conv3x3 (g=4), grouped 1x1 to ``4 * reg_max``."""
    return nn.Sequential(Conv(c_in, c_hidden, 3), Conv(c_hidden, c_hidden, 3, g=4),
                         nn.Conv2d(c_hidden, 4 * reg_max, 1, groups=4))


def _cls_branch(c_in: int, c_hidden: int, nc: int) -> nn.Sequential:
    """Classification tower: Conv3x3, Conv3x3, 1x1 to ``nc`` logits."""
    return nn.Sequential(Conv(c_in, c_hidden, 3), Conv(c_hidden, c_hidden, 3), nn.Conv2d(c_hidden, nc, 1))


def _branch_channels(c_in: int, nc: int, reg_max: int) -> tuple[int, int]:
    """Hidden widths of the box and class towers, from the first input's channels (YOLOv9 rule)."""
    c_box = make_divisible(max(c_in // 4, reg_max * 4, 16), 4)
    c_cls = max(c_in, min(nc * 2, 128))
    return c_box, c_cls


class _AnchorFreeHead(nn.Module):
    """Shared parts of the D*Detect heads: attributes, towers and the decode step."""

    dynamic = False  # kept for compatibility; anchors are always rebuilt
    export = False  # True: eval forward returns only the decoded predictions
    shape = None

    def _init_common(self, nc: int, nl: int, inplace: bool) -> None:
        self.nc = nc
        self.nl = nl
        self.reg_max = 16
        self.no = nc + self.reg_max * 4
        self.inplace = inplace
        self.stride = torch.zeros(nl)
        # present in official checkpoints (set by BaseModel._apply); never read by forward
        self.anchors = torch.empty(0)
        self.strides = torch.empty(0)

    def _raw(self, box: nn.ModuleList, cls: nn.ModuleList, x: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-level raw maps ``[B, 4 * reg_max + nc, H_i, W_i]``."""
        return [torch.cat((box[i](x[i]), cls[i](x[i])), 1) for i in range(self.nl)]

    def _decode(self, maps: list[torch.Tensor], dfl: DFL, anchors: torch.Tensor,
                strides: torch.Tensor) -> torch.Tensor:
        """Raw maps -> ``[B, 4 + nc, A]``: box xywh in input pixels, then class sigmoid scores."""
        b = maps[0].shape[0]
        flat = torch.cat([m.view(b, self.no, -1) for m in maps], 2)
        box, cls = flat.split((self.reg_max * 4, self.nc), 1)
        dbox = dist2bbox(dfl(box), anchors.unsqueeze(0), xywh=True, dim=1) * strides
        return torch.cat((dbox, cls.sigmoid()), 1)

    def _anchor_grid(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``anchors [2, A]`` and ``strides [1, A]`` for these maps."""
        points, stride_col = make_anchors(maps, self.stride, 0.5)
        return points.transpose(0, 1), stride_col.transpose(0, 1)

    def bias_init(self) -> None:
        """Prior biases (box 1.0, class log(5 / nc / (640 / s)^2)); needs ``stride``. From YOLOv9."""
        for box, cls in self._tower_pairs():
            for a, b, s in zip(box, cls, self.stride):
                a[-1].bias.data[:] = 1.0
                b[-1].bias.data[: self.nc] = math.log(5 / self.nc / (640 / s) ** 2)

    def _tower_pairs(self) -> list[tuple[nn.ModuleList, nn.ModuleList]]:
        raise NotImplementedError


def _single_branch(head: _AnchorFreeHead, x: list[torch.Tensor]):
    """The forward of a one-branch head (``DDetect``, the plain ``Detect``): towers ``cv2``/``cv3`` on each level,
    decoded through ``dfl``. Training: the raw maps ``[B, 64 + nc, H_i, W_i]``; eval: ``(y [B, 4 + nc, A], maps)``
    (xywh in input pixels, sigmoid scores), or ``y`` alone when ``export`` is set."""
    maps = head._raw(head.cv2, head.cv3, x)
    if head.training:
        return maps
    anchors, strides = head._anchor_grid(maps)
    y = head._decode(maps, head.dfl, anchors, strides)
    return y if head.export else (y, maps)


class _SingleBranchHead(_AnchorFreeHead):
    """One branch on ``nl`` levels: box towers ``cv2``, class towers ``cv3``, ``dfl``; forward :func:`_single_branch`.

    ``DDetect`` and the plain ``Detect`` differ only in their box tower and in the towers' widths, given by the
    subclass as :meth:`_box_tower` and :meth:`_widths`. Each subclass still defines ``forward`` (calling this one):
    the segmentation heads store ``DDetect.forward``/``Detect.forward`` as an attribute, as the official ones do, and
    a pickle names a function by its qualified name, which must be the official class's.
    """

    @staticmethod
    def _box_tower(c_in: int, c_hidden: int, reg_max: int) -> nn.Sequential:
        raise NotImplementedError

    @staticmethod
    def _widths(c_in: int, nc: int, reg_max: int) -> tuple[int, int]:
        raise NotImplementedError

    def __init__(self, nc: int = 80, ch: Sequence[int] = (), inplace: bool = True):
        super().__init__()
        self._init_common(nc, len(ch), inplace)
        c2, c3 = self._widths(ch[0], nc, self.reg_max)
        self.cv2 = nn.ModuleList(self._box_tower(x, c2, self.reg_max) for x in ch)
        self.cv3 = nn.ModuleList(_cls_branch(x, c3, nc) for x in ch)
        self.dfl = DFL(self.reg_max)

    def _tower_pairs(self):
        return [(self.cv2, self.cv3)]

    def forward(self, x: list[torch.Tensor]):
        return _single_branch(self, x)


class DDetect(_SingleBranchHead):
    """Single-branch anchor-free detection head (GELAN / deploy models).

    Args:
        nc: number of classes.
        ch: input channels of each level (P3, P4, P5).
        inplace: kept for compatibility (unused).

    Input: list of ``nl`` maps ``[B, ch[i], H_i, W_i]``.
    Output: training: the list of raw maps ``[B, 64 + nc, H_i, W_i]``;
    eval: ``(y, maps)`` with ``y [B, 4 + nc, A]`` (xywh pixels, sigmoid scores),
    or ``y`` alone when ``export`` is set.
    """

    _box_tower = staticmethod(_box_branch)
    _widths = staticmethod(_branch_channels)

    def forward(self, x: list[torch.Tensor]):
        # its own (the base's, by another name): DSegment stores ``DDetect.forward`` and a pickle names the function
        # by its qualified name, which must be ``DDetect.forward`` (official ``models.yolo``)
        return super().forward(x)


class DualDDetect(_AnchorFreeHead):
    """Two-branch head of YOLOv9 PGI training: branch 0 (``cv2``/``cv3``/``dfl``)
    reads the first ``nl`` inputs, branch 1 (``cv4``/``cv5``/``dfl2``) the last ``nl``.

    In the official yolov9 configs the first inputs come from the auxiliary
    (reversible) branch and the last from the main branch; the conversion keeps
    branch 1.

    Args:
        nc: number of classes.
        ch: input channels, ``2 * nl`` entries.
        inplace: kept for compatibility (unused).

    Output: training: ``[maps_0, maps_1]``; eval: ``([y_0, y_1], [maps_0, maps_1])``
    with ``y_k [B, 4 + nc, A]``, or ``[y_0, y_1]`` when ``export`` is set.
    """

    def __init__(self, nc: int = 80, ch: Sequence[int] = (), inplace: bool = True):
        super().__init__()
        nl = len(ch) // 2
        self._init_common(nc, nl, inplace)
        c2, c3 = _branch_channels(ch[0], nc, self.reg_max)
        c4, c5 = _branch_channels(ch[nl], nc, self.reg_max)
        self.cv2 = nn.ModuleList(_box_branch(x, c2, self.reg_max) for x in ch[:nl])
        self.cv3 = nn.ModuleList(_cls_branch(x, c3, nc) for x in ch[:nl])
        self.cv4 = nn.ModuleList(_box_branch(x, c4, self.reg_max) for x in ch[nl:])
        self.cv5 = nn.ModuleList(_cls_branch(x, c5, nc) for x in ch[nl:])
        self.dfl = DFL(self.reg_max)
        self.dfl2 = DFL(self.reg_max)

    def _tower_pairs(self):
        return [(self.cv2, self.cv3), (self.cv4, self.cv5)]

    def forward(self, x: list[torch.Tensor]):
        d1 = self._raw(self.cv2, self.cv3, x[: self.nl])
        d2 = self._raw(self.cv4, self.cv5, x[self.nl:])
        if self.training:
            return [d1, d2]
        anchors, strides = self._anchor_grid(d1)
        y = [self._decode(d1, self.dfl, anchors, strides), self._decode(d2, self.dfl2, anchors, strides)]
        return y if self.export else (y, [d1, d2])

    def forward_main(self, x_main: list[torch.Tensor]):
        """Branch 1 alone (``cv4``/``cv5``/``dfl2``), in eval: ``(y_1, maps_1)`` as :meth:`forward` gives them.

        ``x_main`` is the last ``nl`` inputs ``[B, ch[nl + i], H_i, W_i]``. The anchor grid depends only on the map
        sizes, which both branches share (same strides), so ``y_1`` equals ``forward(x)[0][1]``; the converter
        checks that equality on every conversion (:func:`reparam.converter.validation.check_conversion`).
        """
        return self.forward_branch(x_main, 1)

    def forward_branch(self, x_branch: list[torch.Tensor], group: int):
        """Branch ``group`` alone (0: ``cv2``/``cv3``/``dfl``, 1: ``cv4``/``cv5``/``dfl2``) on its ``nl`` inputs, in
        eval: ``(y [B, 4 + nc, A], maps)``, the values :meth:`forward` computes for that branch."""
        box, cls, dfl = _detect_branches(self)[group]
        d = self._raw(box, cls, x_branch)
        anchors, strides = self._anchor_grid(d)
        return self._decode(d, dfl, anchors, strides), d


class TripleDDetect(_AnchorFreeHead):
    """Three-branch head (yolov9-cf): ``cv2/cv3/dfl``, ``cv4/cv5/dfl2``, ``cv6/cv7/dfl3``.

    Args:
        nc: number of classes.
        ch: input channels, ``3 * nl`` entries.
        inplace: kept for compatibility (unused).

    Output: training: ``[maps_0, maps_1, maps_2]``; eval: ``(y_2, maps_2)`` (the third
    branch only, as the official head), or ``y_2`` when ``export`` is set.
    """

    def __init__(self, nc: int = 80, ch: Sequence[int] = (), inplace: bool = True):
        super().__init__()
        nl = len(ch) // 3
        self._init_common(nc, nl, inplace)
        c2, c3 = _branch_channels(ch[0], nc, self.reg_max)
        c4, c5 = _branch_channels(ch[nl], nc, self.reg_max)
        c6, c7 = _branch_channels(ch[2 * nl], nc, self.reg_max)
        self.cv2 = nn.ModuleList(_box_branch(x, c2, self.reg_max) for x in ch[:nl])
        self.cv3 = nn.ModuleList(_cls_branch(x, c3, nc) for x in ch[:nl])
        self.cv4 = nn.ModuleList(_box_branch(x, c4, self.reg_max) for x in ch[nl:2 * nl])
        self.cv5 = nn.ModuleList(_cls_branch(x, c5, nc) for x in ch[nl:2 * nl])
        self.cv6 = nn.ModuleList(_box_branch(x, c6, self.reg_max) for x in ch[2 * nl:3 * nl])
        self.cv7 = nn.ModuleList(_cls_branch(x, c7, nc) for x in ch[2 * nl:3 * nl])
        self.dfl = DFL(self.reg_max)
        self.dfl2 = DFL(self.reg_max)
        self.dfl3 = DFL(self.reg_max)

    def _tower_pairs(self):
        return [(self.cv2, self.cv3), (self.cv4, self.cv5), (self.cv6, self.cv7)]

    def forward_branch(self, x_branch: list[torch.Tensor], group: int):
        """Branch ``group`` alone (0 auxiliary ``cv2``/``cv3``/``dfl``, 1 coarse ``cv4``/``cv5``/``dfl2``, 2 fine
        ``cv6``/``cv7``/``dfl3``) on its ``nl`` inputs, in eval: ``(y [B, 4 + nc, A], maps)``. Group 2 equals
        :meth:`forward`'s eval output; the others are what the official head computes and discards in eval (its
        ``forward`` returned all three before the fine branch became the only output)."""
        box, cls, dfl = _detect_branches(self)[group]
        d = self._raw(box, cls, x_branch)
        anchors, strides = self._anchor_grid(d)
        return self._decode(d, dfl, anchors, strides), d

    def forward(self, x: list[torch.Tensor]):
        nl = self.nl
        d1 = self._raw(self.cv2, self.cv3, x[:nl])
        d2 = self._raw(self.cv4, self.cv5, x[nl:2 * nl])
        d3 = self._raw(self.cv6, self.cv7, x[2 * nl:3 * nl])
        if self.training:
            return [d1, d2, d3]
        anchors, strides = self._anchor_grid(d1)
        y = self._decode(d3, self.dfl3, anchors, strides)
        return y if self.export else (y, d3)


def _detect_branches(head: nn.Module) -> list[tuple[nn.ModuleList, nn.ModuleList, DFL]]:
    """``(box towers, class towers, DFL)`` of each branch of a multi-branch head, in ``from``-list group order
    (official names: ``cv2``/``cv3``/``dfl``, ``cv4``/``cv5``/``dfl2``, ``cv6``/``cv7``/``dfl3``)."""
    out = [(head.cv2, head.cv3, head.dfl), (head.cv4, head.cv5, head.dfl2)]
    if hasattr(head, "dfl3"):
        out.append((head.cv6, head.cv7, head.dfl3))
    return out


def _mask_branch(c_in: int, c_hidden: int, nm: int) -> nn.Sequential:
    """Mask-coefficient tower: Conv3x3, Conv3x3, 1x1 to ``nm``."""
    return nn.Sequential(Conv(c_in, c_hidden, 3), Conv(c_hidden, c_hidden, 3), nn.Conv2d(c_hidden, nm, 1))


class DSegment(DDetect):
    """DDetect plus mask coefficients and a 1x1 prototype conv (gelan-c-dseg).

    Args:
        nc: number of classes.
        nm: number of masks.
        npr: number of protos (stored, unused by this head).
        ch: channels of P3, P4, P5 and, last, the prototype input.
        inplace: kept for compatibility (unused).

    Output: training: ``(maps, mc, p)``; eval: ``(cat(y, mc) [B, 4+nc+nm, A], (maps, mc, p))``
    with ``mc [B, nm, A]`` and ``p [B, nm, H, W]`` (the prototype input's size);
    export: ``(cat(y, mc), p)``.

    ``detect`` is ``DDetect.forward``, as the official head stores it (and calls it; ours does not): a pickled
    deploy model then carries it as ``getattr(models.yolo.DDetect, 'forward')``, which the official ``forward``
    needs.
    """

    def __init__(self, nc: int = 80, nm: int = 32, npr: int = 256, ch: Sequence[int] = (),
                 inplace: bool = True):
        super().__init__(nc, ch[:-1], inplace)
        self.nl = len(ch) - 1
        self.nm = nm
        self.npr = npr
        self.proto = Conv(ch[-1], nm, 1)
        self.detect = DDetect.forward
        c4 = max(ch[0] // 4, nm)
        self.cv4 = nn.ModuleList(_mask_branch(x, c4, nm) for x in ch[:-1])

    def forward(self, x: list[torch.Tensor]):
        p = self.proto(x[-1])
        b = p.shape[0]
        mc = torch.cat([self.cv4[i](x[i]).view(b, self.nm, -1) for i in range(self.nl)], 2)
        out = DDetect.forward(self, x[:-1])
        if self.training:
            return out, mc, p
        if self.export:
            return torch.cat([out, mc], 1), p
        return torch.cat([out[0], mc], 1), (out[1], mc, p)


class DualDSegment(DualDDetect):
    """DualDDetect plus mask coefficients (``cv6``/``cv7``) and 1x1 prototype convs
    (``proto``/``proto2``) for each branch (yolov9-c-dseg).

    Args:
        nc: number of classes.
        nm: number of masks.
        npr: number of protos (stored, unused by this head).
        ch: ``2 * nl`` detection inputs, then the two prototype inputs.
        inplace: kept for compatibility (unused).

    Output: training: ``(d, mc, p)`` with two entries each; eval: branch 1 only,
    ``(cat(y_1, mc_1) [B, 4+nc+nm, A], (maps_1, mc_1, p_1))``. ``detect`` is ``DualDDetect.forward``, as in the
    official head.
    """

    def __init__(self, nc: int = 80, nm: int = 32, npr: int = 256, ch: Sequence[int] = (),
                 inplace: bool = True):
        super().__init__(nc, ch[:-2], inplace)
        nl = (len(ch) - 2) // 2
        self.nl = nl
        self.nm = nm
        self.npr = npr
        self.proto = Conv(ch[-2], nm, 1)
        self.proto2 = Conv(ch[-1], nm, 1)
        self.detect = DualDDetect.forward
        c6 = max(ch[0] // 4, nm)
        c7 = max(ch[nl] // 4, nm)
        self.cv6 = nn.ModuleList(_mask_branch(x, c6, nm) for x in ch[:nl])
        self.cv7 = nn.ModuleList(_mask_branch(x, c7, nm) for x in ch[nl:2 * nl])

    def forward(self, x: list[torch.Tensor]):
        p = [self.proto(x[-2]), self.proto2(x[-1])]
        b = p[0].shape[0]
        nl = self.nl
        mc = [torch.cat([self.cv6[i](x[i]).view(b, self.nm, -1) for i in range(nl)], 2),
              torch.cat([self.cv7[i](x[nl + i]).view(b, self.nm, -1) for i in range(nl)], 2)]
        d = DualDDetect.forward(self, x[:-2])
        if self.training:
            return d, mc, p
        if self.export:
            return torch.cat([d[1], mc[1]], 1), p[1]
        y, maps = d
        return torch.cat([y[1], mc[1]], 1), (maps[1], mc[1], p[1])

    def forward_branch(self, x_branch: list[torch.Tensor], group: int):
        """Branch ``group`` alone, in eval, on its ``nl`` detection inputs followed by its prototype input.

        Group 1 (main: ``cv4``/``cv5``/``dfl2``, ``cv7``, ``proto2``) gives exactly :meth:`forward`'s eval output
        ``(cat(y_1, mc_1) [B, 4+nc+nm, A], (maps_1, mc_1 [B, nm, A], p_1 [B, nm, H, W]))`` without computing the
        auxiliary branch; group 0 uses ``cv2``/``cv3``/``dfl``, ``cv6``, ``proto``.
        """
        nl = self.nl
        box, cls, dfl = _detect_branches(self)[group]
        masks, proto = (self.cv6, self.proto) if group == 0 else (self.cv7, self.proto2)
        p = proto(x_branch[nl])
        b = p.shape[0]
        mc = torch.cat([masks[i](x_branch[i]).view(b, self.nm, -1) for i in range(nl)], 2)
        d = self._raw(box, cls, x_branch[:nl])
        anchors, strides = self._anchor_grid(d)
        y = self._decode(d, dfl, anchors, strides)
        return torch.cat([y, mc], 1), (d, mc, p)

    def forward_main(self, x_main: list[torch.Tensor]):
        """The main branch alone (:meth:`forward_branch` group 1): ``x_main`` = the main P3-P5 inputs, then the main
        prototype input."""
        return self.forward_branch(x_main, 1)
