"""The published YOLOv9 detection architectures, in reparam's compact test format.

Each variant is a list of layers ``(from, number, block, args)``; ``"nc"`` stands for
the class count and ``UP`` for the nearest x2 upsample. ``config(name, nc)`` turns a
variant into the dict form a checkpoint's ``model.yaml`` has. The dual (PGI) variants
``yolov9-*`` end in ``DualDDetect``; their deploy forms ``gelan-*`` in ``DDetect``.
"""

from __future__ import annotations

UP = (-1, 1, "nn.Upsample", ["None", 2, "nearest"])


def _cat(j: int):
    return ([-1, j], 1, "Concat", [1])


def _shift(layers: list, k: int, start: int = 0) -> list:
    """Renumber absolute 'from' indices >= ``start`` after inserting ``k`` layers before them."""
    def move(f):
        if isinstance(f, list):
            return [x if x < start else x + k for x in f]
        return f if f < start else f + k
    return [(move(f), n, b, a) for f, n, b, a in layers]


def _rn4(c2: int, c3: int, c4: int, n: int):
    return (-1, 1, "RepNCSPELAN4", [c2, c3, c4, n])


# t and s: ELAN1 stem block, AConv downsampling, depth-3 RepNCSP; the auxiliary branch of
# the dual form is a second neck (SPPELAN + top-down path) on the backbone.
def _gelan_light(stem: int, p3: int, p4: int, p5: int) -> list:
    backbone = [(-1, 1, "Conv", [stem // 2, 3, 2]), (-1, 1, "Conv", [stem, 3, 2]),
                (-1, 1, "ELAN1", [stem, stem, stem // 2]),
                (-1, 1, "AConv", [p3]), _rn4(p3, p3, p3 // 2, 3),
                (-1, 1, "AConv", [p4]), _rn4(p4, p4, p4 // 2, 3),
                (-1, 1, "AConv", [p5]), _rn4(p5, p5, p5 // 2, 3)]
    head = [(-1, 1, "SPPELAN", [p5, p5 // 2]), UP, _cat(6), _rn4(p4, p4, p4 // 2, 3),
            UP, _cat(4), _rn4(p3, p3, p3 // 2, 3),                       # 15: P3
            (-1, 1, "AConv", [p3 * 3 // 4]), _cat(12), _rn4(p4, p4, p4 // 2, 3),  # 18: P4
            (-1, 1, "AConv", [p5 // 2]), _cat(9), _rn4(p5, p5, p5 // 2, 3)]       # 21: P5
    return backbone + head


def _dual_light(stem: int, p3: int, p4: int, p5: int) -> list:
    aux = [(8, 1, "SPPELAN", [p5, p5 // 2]), UP, _cat(6), _rn4(p4, p4, p4 // 2, 3),
           UP, _cat(4), _rn4(p3, p3, p3 // 2, 3)]                        # 22..28
    return _gelan_light(stem, p3, p4, p5) + aux + [([28, 25, 22, 15, 18, 21], 1, "DualDDetect", ["nc"])]


# m and c: RepNCSPELAN4 throughout, depth 1; the dual form adds a Silence input layer and
# an auxiliary backbone fed by CBLinear/CBFuse (CBNet-style reversible branch).
_MC = {
    # down block, stem widths, stem block, (P3, P4, P5) backbone blocks, head blocks (P4, P3, P4', P5'), head downs
    "m": ("AConv", (32, 64), [128, 128, 64], [(240, [240, 240, 120]), (360, [360, 360, 180]), (480, [480, 480, 240])],
          [[360, 360, 180], [240, 240, 120], [360, 360, 180], [480, 480, 240]], (180, 240), [480, 240]),
    "c": ("ADown", (64, 128), [256, 128, 64], [(256, [512, 256, 128]), (512, [512, 512, 256]), (512, [512, 512, 256])],
          [[512, 512, 256], [256, 256, 128], [512, 512, 256], [512, 512, 256]], (256, 512), [512, 256]),
}


def _gelan_mc(v: str) -> list:
    down, (s1, s2), stem_block, stages, heads, (d1, d2), spp = _MC[v]
    layers = [(-1, 1, "Conv", [s1, 3, 2]), (-1, 1, "Conv", [s2, 3, 2]), _rn4(*stem_block, 1)]
    for width, block in stages:
        layers += [(-1, 1, down, [width]), _rn4(*block, 1)]
    layers += [(-1, 1, "SPPELAN", spp), UP, _cat(6), _rn4(*heads[0], 1), UP, _cat(4), _rn4(*heads[1], 1),
               (-1, 1, down, [d1]), _cat(12), _rn4(*heads[2], 1), (-1, 1, down, [d2]), _cat(9), _rn4(*heads[3], 1)]
    return layers


def _gelan_mc_deploy(v: str) -> list:
    return _gelan_mc(v) + [([15, 18, 21], 1, "DDetect", ["nc"])]


def _dual_mc(v: str) -> list:
    down, (s1, s2), stem_block, stages, _, _, _ = _MC[v]
    (w3, b3), (w4, b4), (w5, b5) = stages
    main = [(-1, 1, "Silence", [])] + _shift(_gelan_mc(v), 1)            # 0..22
    aux = [(5, 1, "CBLinear", [[w3]]), (7, 1, "CBLinear", [[w3, w4]]), (9, 1, "CBLinear", [[w3, w4, w5]]),
           (0, 1, "Conv", [s1, 3, 2]), (-1, 1, "Conv", [s2, 3, 2]), _rn4(*stem_block, 1),
           (-1, 1, down, [w3]), ([23, 24, 25, -1], 1, "CBFuse", [[0, 0, 0]]), _rn4(*b3, 1),
           (-1, 1, down, [w4]), ([24, 25, -1], 1, "CBFuse", [[1, 1]]), _rn4(*b4, 1),
           (-1, 1, down, [w5]), ([25, -1], 1, "CBFuse", [[2]]), _rn4(*b5, 1)]   # 23..37
    return main + aux + [([31, 34, 37, 16, 19, 22], 1, "DualDDetect", ["nc"])]


# e: two stacked backbones joined by CBLinear/CBFuse in both forms; depth-2 RepNCSP.
def _e_trunk() -> list:
    bb = [(-1, 1, "Silence", []), (-1, 1, "Conv", [64, 3, 2]), (-1, 1, "Conv", [128, 3, 2]),
          _rn4(256, 128, 64, 2), (-1, 1, "ADown", [256]), _rn4(512, 256, 128, 2),
          (-1, 1, "ADown", [512]), _rn4(1024, 512, 256, 2), (-1, 1, "ADown", [1024]), _rn4(1024, 512, 256, 2)]
    splits = [64, 128, 256, 512, 1024]
    lin = [(2 * k + 1, 1, "CBLinear", [splits[:k + 1]]) for k in range(5)]             # 10..14
    fuse = lambda k: (list(range(10 + k, 15)) + [-1], 1, "CBFuse", [[k] * (5 - k)])
    second = [(0, 1, "Conv", [64, 3, 2]), fuse(0), (-1, 1, "Conv", [128, 3, 2]), fuse(1),
              _rn4(256, 128, 64, 2), (-1, 1, "ADown", [256]), fuse(2), _rn4(512, 256, 128, 2),
              (-1, 1, "ADown", [512]), fuse(3), _rn4(1024, 512, 256, 2),
              (-1, 1, "ADown", [1024]), fuse(4), _rn4(1024, 512, 256, 2)]                 # 15..28
    return bb + lin + second


def _gelan_e() -> list:
    head = [(28, 1, "SPPELAN", [512, 256]), UP, _cat(25), _rn4(512, 512, 256, 2), UP, _cat(22),
            _rn4(256, 256, 128, 2), (-1, 1, "ADown", [256]), _cat(32), _rn4(512, 512, 256, 2),
            (-1, 1, "ADown", [512]), _cat(29), _rn4(512, 1024, 512, 2)]                  # 29..41
    return _e_trunk() + head + [([35, 38, 41], 1, "DDetect", ["nc"])]


def _dual_e() -> list:
    aux = [(9, 1, "SPPELAN", [512, 256]), UP, _cat(7), _rn4(512, 512, 256, 2), UP, _cat(5),
           _rn4(256, 256, 128, 2)]                                                       # 29..35
    main = _shift(_gelan_e()[29:42], 7, start=29)                                        # 36..48
    return _e_trunk() + aux + main + [([35, 32, 29, 42, 45, 48], 1, "DualDDetect", ["nc"])]


VARIANTS: dict[str, list] = {
    "yolov9-t": _dual_light(32, 64, 96, 128), "gelan-t": _gelan_light(32, 64, 96, 128)
    + [([15, 18, 21], 1, "DDetect", ["nc"])],
    "yolov9-s": _dual_light(64, 128, 192, 256), "gelan-s": _gelan_light(64, 128, 192, 256)
    + [([15, 18, 21], 1, "DDetect", ["nc"])],
    "yolov9-m": _dual_mc("m"), "gelan-m": _gelan_mc_deploy("m"),
    "yolov9-c": _dual_mc("c"), "gelan-c": _gelan_mc_deploy("c"),
    "yolov9-e": _dual_e(), "gelan-e": _gelan_e(),
}


def config(name: str, nc: int = 80) -> dict:
    """The variant as a ``model.yaml`` dict (all layers in ``backbone``, ``head`` empty)."""
    layers = [[list(f) if isinstance(f, list) else f, n, b, [list(a) if isinstance(a, list) else a for a in args]]
              for f, n, b, args in VARIANTS[name]]
    return {"nc": nc, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": 3, "backbone": layers, "head": []}
