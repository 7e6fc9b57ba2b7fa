"""The pruning rule: which layers of a dual (PGI) YOLOv9 graph the deploy graph keeps.

This module is the one place that decides it. It works on config dicts only (the ``model.yaml`` dict every
checkpoint embeds: ``backbone`` + ``head`` lists of ``[from, number, module, args]``), never on weights.

The rule (YOLOv9, Wang et al. 2024, "Programmable Gradient Information"; WongKinYiu/yolov9
``models/yolo.py::DualDDetect``): the last layer is a ``DualDDetect`` whose ``from`` list has ``2 * nl`` entries;
the first ``nl`` feed the auxiliary half (``cv2``/``cv3``/``dfl``), the last ``nl`` the main half
(``cv4``/``cv5``/``dfl2``). At deploy time only the main half runs, so:

1. keep every layer the main inputs depend on (transitively through ``from``), in the original order;
2. drop every other layer (the auxiliary reversible branch: CBLinear/CBFuse routing and the second backbone
   of yolov9-c/m, the auxiliary head of t/s, the auxiliary neck of e);
3. a leading ``Silence`` (an identity that exists so that later layers can name the network input by its
   index) is kept only when a kept layer other than the one right after it reads it by index — the config
   format cannot name the input otherwise. This reproduces the official deploy configs: gelan-c/m drop it,
   gelan-e keeps it (its second backbone starts with ``[0, 1, Conv, ...]``);
4. renumber the kept layers and remap every ``from``, keeping each entry's style (relative stays relative,
   absolute stays absolute, as the official deploy configs are written);
5. the head becomes ``DDetect`` over the main inputs, with the same args; its ``cv2``/``cv3``/``dfl`` weights
   come from the dual head's ``cv4``/``cv5``/``dfl2``.

The same rule covers the other multi-branch heads (:data:`MULTI_HEADS`), which differ only in which ``from``
entries are "main":

* ``DualDSegment`` (yolov9-c-dseg): ``[aux P3-P5, main P3-P5, aux proto input, main proto input]``; the deploy head
  is ``DSegment`` over the main P3-P5 and the main proto input (``cv7`` -> ``cv4``, ``proto2`` -> ``proto``). The
  kept prototype path is the one the dual model trained, so the derived config keeps its depth: the published
  ``gelan-c-dseg.yaml`` has RepNCSP depth 1 at that layer (deploy 22, dual 41) where ``yolov9-c-dseg.yaml`` trains
  depth 2; :func:`compare_with_published` reports such differences.
* ``TripleDDetect`` (yolov9-cf): ``[aux, coarse, fine]`` groups of P3-P5; ``branch`` (``--head``) picks ``fine``
  (default) or ``coarse``, which becomes the deploy ``DDetect``; the other two and the layers only they need are
  dropped. The default is the branch the official ``detect.py`` (WongKinYiu/yolov9 at 5b1ea9a) uses: line 98
  ``pred = model(im, ...)``, line 102 ``non_max_suppression(pred, ...)``, which takes ``prediction[0]``
  (``utils/general.py`` lines 902-903) of the ``(y, d)`` that ``TripleDDetect``'s eval forward returns, and that
  ``y`` is the third (fine) branch's.

A graph whose last layer is already ``DDetect``, ``DSegment`` or ``Segment`` (a gelan checkpoint from ``train.py``:
gelan-c, gelan-c-dseg, gelan-c-seg) passes through unchanged.
The official notebook (``tools/reparameterization.ipynb``) hard-codes the resulting offsets per variant; here
they are derived, so custom configs work too.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import InvalidInputError, brief
from ..spec import DEFAULT_TRIPLE_HEAD

@dataclass(frozen=True)
class Branch:
    """One selectable branch of a multi-branch head and the deploy head it becomes.

    Attributes:
        group: which group of detection inputs the branch reads (0 = the first ``nl`` entries of the head's
            ``from`` list, 1 = the next ``nl``, ...).
        deploy_head: the deploy head class name (``DDetect``, ``DSegment``).
        rename: deploy head sub-module name -> multi-branch head sub-module name it is copied from.
        what: one phrase for reports (``"main"``, ``"fine (NMS-free)"``).
    """

    group: int
    deploy_head: str
    rename: dict[str, str]
    what: str


@dataclass(frozen=True)
class HeadRule:
    """How the ``from`` list of a multi-branch head is laid out, and its branches (WongKinYiu/yolov9
    ``models/yolo.py``).

    The ``from`` list holds ``groups`` groups of ``nl`` detection inputs (P3, P4, P5 each), then ``protos`` mask
    prototype inputs, one per group that has a prototype conv (``DualDSegment``: ``[aux P3-P5, main P3-P5,
    aux proto, main proto]``). A branch keeps its group's ``nl`` inputs and, with prototypes, its group's proto input.

    Attributes:
        groups: detection input groups; protos: trailing prototype inputs (0 or ``groups``).
        branches: selectable branch name -> :class:`Branch`; default: the branch a conversion keeps unless told.
        official_eval_branch: the group whose output the official eval ``forward`` returns (what ``detect.py`` /
            ``segment/predict.py`` use).
        order: the ``from`` list's layout in words, for messages.
    """

    groups: int
    protos: int
    branches: dict[str, Branch]
    default: str
    official_eval_branch: int
    order: str

    def layout(self, n_inputs: int, head: str, layer: int) -> int:
        """``nl`` for a ``from`` list of ``n_inputs`` entries; InvalidInputError when it does not fit the layout."""
        det = n_inputs - self.protos
        if det < self.groups or det % self.groups:
            what = f"{self.groups} x nl" + (f" + {self.protos} prototype inputs" if self.protos else "")
            raise InvalidInputError(
                f"the {head} head (layer {layer}) has {n_inputs} inputs; it needs {what} ({self.order})")
        return det // self.groups

    def positions(self, n_inputs: int, branch: Branch) -> list[int]:
        """Positions in the head's ``from`` list that ``branch`` reads: its ``nl`` detection inputs, then its
        prototype input when the head has them."""
        nl = (n_inputs - self.protos) // self.groups
        out = list(range(branch.group * nl, (branch.group + 1) * nl))
        if self.protos:
            out.append(n_inputs - self.protos + branch.group)
        return out


_MAIN_DETECT = {"cv2": "cv4", "cv3": "cv5", "dfl": "dfl2"}
#: Multi-branch heads, by class name. Sources (WongKinYiu/yolov9 ``models/yolo.py``): ``DualDDetect`` reads
#: ``[aux P3-P5, main P3-P5]`` (main half ``cv4``/``cv5``/``dfl2``); ``DualDSegment`` adds mask-coefficient towers
#: ``cv6`` (aux) / ``cv7`` (main) and prototype convs ``proto`` (aux) / ``proto2`` (main) after them; ``TripleDDetect``
#: (``models/detect/yolov9-cf.yaml``: "Auxiliary/Coarse(NMS-based)/Fine(NMS-free)") reads three groups,
#: ``cv2``/``cv3``/``dfl``, ``cv4``/``cv5``/``dfl2``, ``cv6``/``cv7``/``dfl3``, and its eval forward returns the third
#: (fine) one only, which is therefore what the official ``detect.py`` runs its NMS on (module docstring): the
#: default here.
MULTI_HEADS: dict[str, HeadRule] = {
    "DualDDetect": HeadRule(groups=2, protos=0, default="main", official_eval_branch=1,
                            order="auxiliary inputs first, main inputs second", branches={
        "main": Branch(1, "DDetect", dict(_MAIN_DETECT), "main"),
    }),
    "DualDSegment": HeadRule(groups=2, protos=2, default="main", official_eval_branch=1,
                             order="auxiliary P3-P5, main P3-P5, auxiliary proto input, main proto input", branches={
        "main": Branch(1, "DSegment", {**_MAIN_DETECT, "cv4": "cv7", "proto": "proto2"}, "main"),
    }),
    "TripleDDetect": HeadRule(groups=3, protos=0, default=DEFAULT_TRIPLE_HEAD, official_eval_branch=2,
                              order="auxiliary, coarse and fine P3-P5, in that order", branches={
        "coarse": Branch(1, "DDetect", dict(_MAIN_DETECT), "coarse (NMS-based)"),
        "fine": Branch(2, "DDetect", {"cv2": "cv6", "cv3": "cv7", "dfl": "dfl3"}, "fine (NMS-free)"),
    }),
}
#: Dual heads and, for each, the class of the deploy head and how its sub-module names map (the default branch of
#: :data:`MULTI_HEADS`). Deploy head attribute <- dual head attribute.
DUAL_HEADS: dict[str, tuple[str, dict[str, str]]] = {
    name: (rule.branches[rule.default].deploy_head, dict(rule.branches[rule.default].rename))
    for name, rule in MULTI_HEADS.items()
}
#: Heads that need no pruning (a ``train.py`` checkpoint: gelan detection or segmentation).
DEPLOY_HEADS = ("DDetect", "Detect", "DSegment", "Segment")
#: Heads we recognise but do not convert (the message names them instead of guessing).
UNSUPPORTED_HEADS = {
    "Panoptic": "panoptic checkpoints (Panoptic head, e.g. gelan-c-pan) are not supported",
    "TripleDetect": "TripleDetect checkpoints are not supported",
    "DualDetect": "DualDetect checkpoints are not supported",
}
#: What reparam converts, for the messages above.
SUPPORTED_HEADS = ("detection (DualDDetect, TripleDDetect, DDetect) and segmentation (DualDSegment, DSegment, "
                   "Segment)")


def head_rule(head_name: str, branch: str | None = None) -> tuple[HeadRule, Branch] | None:
    """The rule of a multi-branch head and the branch to keep (``branch``, else the rule's default); None for a
    head that is not multi-branch.

    Raises:
        InvalidInputError: ``branch`` is not one of this head's branches (e.g. ``--head coarse`` for a
            ``DualDDetect`` checkpoint).
    """
    rule = MULTI_HEADS.get(head_name)
    if branch is None:
        return None if rule is None else (rule, rule.branches[rule.default])
    if rule is None or (len(rule.branches) == 1 and branch not in rule.branches):
        raise InvalidInputError(f"--head {branch} selects a branch of a TripleDDetect head (yolov9-cf); this "
                                f"checkpoint's head is {head_name}: leave --head out")
    if branch not in rule.branches:
        raise InvalidInputError(
            f"--head {branch} does not name a branch of the {head_name} head: it has "
            f"{', '.join(sorted(rule.branches))}")
    return rule, rule.branches[branch]


@dataclass
class DeployPlan:
    """The result of applying the pruning rule to a dual config.

    Attributes:
        deploy_cfg: the deploy config dict (same top-level keys as the dual one, ``backbone``/``head`` rewritten).
        layer_map: deploy layer index -> dual layer index, for every deploy layer (head included).
        dropped: dual layer indices that the deploy graph does not contain.
        head_rename: deploy head sub-module name -> dual head sub-module name (empty when not pruned).
        dual_head: dual head module name (``"DualDDetect"``, or ``"DDetect"`` when nothing was pruned).
        pruned: False when the config had no auxiliary branch.
        branch: the head branch kept (``"main"``; ``"fine"``/``"coarse"`` for TripleDDetect), None when not pruned.
        head_inputs: positions in the dual head's ``from`` list that the deploy head reads (empty when not pruned).
    """

    deploy_cfg: dict[str, Any]
    layer_map: dict[int, int]
    dropped: list[int]
    head_rename: dict[str, str] = field(default_factory=dict)
    dual_head: str = "DDetect"
    pruned: bool = True
    branch: str | None = None
    head_inputs: list[int] = field(default_factory=list)

    @property
    def head_index(self) -> int:
        """Index of the head layer in the deploy graph."""
        return max(self.layer_map)

    def map_key(self, deploy_key: str) -> str:
        """The dual state_dict key that a deploy state_dict key is copied from.

        ``model.22.cv2.0.0.conv.weight`` -> ``model.29.cv4.0.0.conv.weight`` for yolov9-t. Raises ``KeyError`` for a
        key outside ``model.<i>.``.
        """
        m = re.match(r"^model\.(\d+)\.(.*)$", deploy_key)
        if not m:
            raise KeyError(deploy_key)
        i, rest = int(m.group(1)), m.group(2)
        j = self.layer_map[i]
        if i == self.head_index and self.head_rename:
            head, _, tail = rest.partition(".")
            rest = self.head_rename.get(head, head) + ("." + tail if tail else "")
        return f"model.{j}.{rest}"


def layers_of(cfg: dict[str, Any]) -> list[list[Any]]:
    """``backbone + head`` of a config, validated to be lists of ``[from, number, module, args]``.

    Raises InvalidInputError when the config is not in the YOLOv9 format.
    """
    if not isinstance(cfg, dict) or not isinstance(cfg.get("backbone"), list) or not isinstance(cfg.get("head"), list):
        raise InvalidInputError(
            "the checkpoint's model config has no 'backbone'/'head' layer lists; is it a WongKinYiu/yolov9 checkpoint?"
        )
    layers = list(cfg["backbone"]) + list(cfg["head"])
    for i, layer in enumerate(layers):
        if not (isinstance(layer, (list, tuple)) and len(layer) == 4 and isinstance(layer[2], str)):
            raise InvalidInputError(f"model config layer {i} is {brief(layer)}; expected [from, number, module, args]")
    return [list(layer) for layer in layers]


def resolve_from(f: Any, i: int) -> list[int]:
    """Absolute input indices of layer ``i`` (``-1``/negative are relative; ``-1`` at layer 0 is the image).

    Raises InvalidInputError for an index that points forward or is not an int.
    """
    items = f if isinstance(f, (list, tuple)) else [f]
    out = []
    for x in items:
        if not isinstance(x, int) or isinstance(x, bool):
            raise InvalidInputError(f"model config layer {i} has a non-integer input index {brief(x)}")
        j = x if x >= 0 else i + x
        if j >= i or (j < 0 and not (i == 0 and x == -1)):
            raise InvalidInputError(f"model config layer {i} reads layer {x}, which does not come before it")
        out.append(j)
    return out


def _encode_from(original: Any, old_i: int, new_i: int, new_index: dict[int, int]) -> Any:
    """Remap a layer's ``from`` into the deploy numbering, keeping the config's own style.

    A relative entry stays relative (``-1`` stays ``-1``: adjacent kept layers stay adjacent) and an absolute one
    stays absolute, so the result reads like the official deploy configs (``[[15, 18, 21], 1, DDetect, [nc]]``).
    An input that was a dropped leading Silence becomes ``-1`` (the image, at deploy index 0).
    """
    items = original if isinstance(original, (list, tuple)) else [original]
    out = []
    for x in items:
        src = x if x >= 0 else old_i + x
        if src not in new_index:  # the dropped Silence: read the image
            out.append(-1)
        elif x < 0:
            out.append(new_index[src] - new_i)
        else:
            out.append(new_index[src])
    return list(out) if isinstance(original, (list, tuple)) else out[0]


def ancestors(sources: Sequence[list[int]] | Mapping[int, list[int]], start: list[int]) -> set[int]:
    """Layers ``start`` and every layer they read, transitively (``sources[i]``: absolute inputs of layer ``i``,
    a list indexed by layer or a dict keyed by it; ``-1`` the image, which is not a layer)."""
    keep: set[int] = set()
    stack = [j for j in start if j >= 0]
    while stack:
        j = stack.pop()
        if j not in keep:
            keep.add(j)
            stack.extend(s for s in sources[j] if s >= 0)
    return keep


def main_branch(dual_cfg: dict[str, Any], branch: str | None = None) -> tuple[set[int], int, set[str] | None]:
    """The main branch of a graph, from the config alone: ``(layers, head index, head sub-modules)``.

    ``layers``: every layer the kept head branch's inputs depend on (for a dual head its main inputs, the last
    ``nl`` detection inputs and the main prototype input; for TripleDDetect the ``branch`` group), head excluded;
    ``head sub-modules``: that branch's part of the head (``{"cv4", "cv5", "dfl2"}`` for ``DualDDetect``), or None
    when the head is a deploy head (all of it is main, and every layer is main). Independent of any
    :class:`DeployPlan`, so the transfer's accounting (:func:`.transfer.transfer_weights`) can check a plan
    against it. Raises InvalidInputError as :func:`derive_deploy_plan` does for malformed configs.
    """
    layers = layers_of(dual_cfg)
    if not layers:
        raise InvalidInputError("the checkpoint's model config has no layers")
    head_i = len(layers) - 1
    head_name = layers[head_i][2].rsplit(".", 1)[-1]
    found = head_rule(head_name, branch)
    if found is None:
        return set(range(head_i)), head_i, None
    rule, chosen = found
    sources = [resolve_from(layer[0], i) for i, layer in enumerate(layers)]
    inputs = sources[head_i]
    rule.layout(len(inputs), head_name, head_i)
    main_in = [inputs[p] for p in rule.positions(len(inputs), chosen)]
    return ancestors(sources, main_in), head_i, set(chosen.rename.values())


def derive_deploy_plan(dual_cfg: dict[str, Any], branch: str | None = None) -> DeployPlan:
    """Apply the pruning rule to a dual config and return the deploy plan.

    ``branch`` picks the head branch to keep where a head has several (TripleDDetect: ``"fine"``, the default, or
    ``"coarse"``; see :data:`MULTI_HEADS`); None keeps the head's default branch.

    Raises:
        InvalidInputError: malformed config, a last layer that is not a detection head ("the main head cannot be
            found"), a head whose input count does not fit its layout (:meth:`HeadRule.layout`), a head we do not
            support (named), or a ``branch`` the head does not have.
    """
    layers = layers_of(dual_cfg)
    if not layers:
        raise InvalidInputError("the checkpoint's model config has no layers")
    n = len(layers)
    head_i = n - 1
    head_f, _head_n, head_mod, head_args = layers[head_i]
    head_name = head_mod.rsplit(".", 1)[-1]
    sources = [resolve_from(layer[0], i) for i, layer in enumerate(layers)]

    if head_name in UNSUPPORTED_HEADS:
        raise InvalidInputError(f"{UNSUPPORTED_HEADS[head_name]}: reparam converts {SUPPORTED_HEADS} heads")
    found = head_rule(head_name, branch) if head_name in MULTI_HEADS or head_name in DEPLOY_HEADS else None
    if head_name in DEPLOY_HEADS:
        return DeployPlan(
            deploy_cfg=copy.deepcopy(dual_cfg),
            layer_map={i: i for i in range(n)},
            dropped=[],
            dual_head=head_name,
            pruned=False,
        )
    if found is None:
        raise InvalidInputError(
            f"cannot find the main detection head: the last layer ({head_i}) is '{head_mod}', expected one of "
            f"{', '.join(list(MULTI_HEADS) + list(DEPLOY_HEADS))}"
        )
    rule, chosen = found
    inputs = sources[head_i]
    rule.layout(len(inputs), head_name, head_i)
    positions = rule.positions(len(inputs), chosen)
    keep = ancestors(sources, [inputs[p] for p in positions])

    # Rule 3: a leading Silence survives only if a kept layer other than layer 1 reads it by index.
    silence_dropped = False
    if 0 in keep and layers[0][2].rsplit(".", 1)[-1] == "Silence":
        readers = [i for i in keep if i != 0 and 0 in sources[i]]
        if all(i == 1 for i in readers):
            keep.discard(0)
            silence_dropped = True

    kept = sorted(keep)
    new_index = {old: new for new, old in enumerate(kept)}
    deploy_layers: list[list[Any]] = []
    for new_i, old in enumerate(kept):
        f, number, module, args = layers[old]
        lost = [s for s in sources[old] if s >= 0 and s not in new_index and not (s == 0 and silence_dropped)]
        if lost:  # cannot happen by construction (ancestors are kept); guard anyway
            raise InvalidInputError(f"layer {old} reads dropped layer {lost[0]}; the config is not a valid dual graph")
        deploy_layers.append([_encode_from(f, old, new_i, new_index), number, module, copy.deepcopy(args)])

    deploy_head_name, rename = chosen.deploy_head, chosen.rename
    head_new_i = len(kept)
    head_module = head_mod[: -len(head_name)] + deploy_head_name
    head_from = [list(head_f)[p] for p in positions]
    deploy_layers.append(
        [_encode_from(head_from, head_i, head_new_i, {**new_index, head_i: head_new_i}), _head_n, head_module,
         copy.deepcopy(head_args)]
    )

    n_backbone = sum(1 for old in kept if old < len(dual_cfg["backbone"]))
    deploy_cfg = copy.deepcopy({k: v for k, v in dual_cfg.items() if k not in ("backbone", "head")})
    deploy_cfg["backbone"] = deploy_layers[:n_backbone]
    deploy_cfg["head"] = deploy_layers[n_backbone:]

    layer_map = {new: old for old, new in new_index.items()}
    layer_map[head_new_i] = head_i
    dropped = [i for i in range(n) if i not in keep and i != head_i]
    return DeployPlan(
        deploy_cfg=deploy_cfg,
        layer_map=layer_map,
        dropped=dropped,
        head_rename=dict(rename),
        dual_head=head_name,
        pruned=True,
        branch=next(k for k, v in rule.branches.items() if v is chosen),
        head_inputs=positions,
    )


def normalized_layers(cfg: dict[str, Any]) -> list[tuple[tuple[int, ...], Any, str, Any]]:
    """Layers with ``from`` resolved to absolute indices, for comparing configs written in different styles."""
    out = []
    for i, (f, number, module, args) in enumerate(layers_of(cfg)):
        out.append((tuple(resolve_from(f, i)), number, module.rsplit(".", 1)[-1], args))
    return out


@dataclass
class LayerDifference:
    """One layer where the deploy config derived from a checkpoint differs from the published deploy config.

    Attributes:
        deploy_layer: index in the deploy graph; dual_layer: the dual layer it comes from.
        module: the block (``RepNCSPELAN4``).
        derived / published: the layer as ``[from (absolute), number, module, args]`` in each config.
        tensors: how many of the derived layer's tensors the published layer has no place for (missing there or of
            another shape): what a conversion into the published config would drop or could not load.
        why: one sentence for the report.
    """

    deploy_layer: int
    dual_layer: int | None
    module: str
    derived: list[Any]
    published: list[Any]
    tensors: int
    why: str


@dataclass
class PublishedComparison:
    """The derived deploy config against the published deploy config of the published dual config the checkpoint
    was built from (:data:`reparam.models.published.PUBLISHED_DEPLOY`).

    Attributes:
        dual_config: the published dual config the checkpoint's config equals (``yolov9-c-dseg``).
        deploy_config: its published deploy config (``gelan-c-dseg``).
        differences: the layers that differ (empty: the derived config equals the published one).
    """

    dual_config: str
    deploy_config: str
    differences: list[LayerDifference] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the report's ``config.published``)."""
        return asdict(self)

    def summary(self) -> str:
        """One line: equal, or where and why the derived config differs."""
        if not self.differences:
            return f"the derived deploy config equals the published {self.deploy_config}"
        first = self.differences[0]
        more = f" (and {len(self.differences) - 1} more layer(s))" if len(self.differences) > 1 else ""
        return f"the derived deploy config differs from the published {self.deploy_config}: {first.why}{more}"


def _same_architecture(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same layers (``from`` resolved, any ``nc``) and the same depth/width multiples."""
    keys = ("depth_multiple", "width_multiple")
    return all(a.get(k) == b.get(k) for k in keys) and normalized_layers(a) == normalized_layers(b)


def compare_with_published(dual_cfg: dict[str, Any], plan: DeployPlan) -> PublishedComparison | None:
    """Compare ``plan``'s derived deploy config with the published deploy config, layer by layer.

    Returns None when the checkpoint's config is not one of the published dual configs (a custom architecture: there
    is nothing to compare with) or was not pruned. YOLOv9's published ``gelan-c-dseg.yaml`` differs from the deploy
    graph of ``yolov9-c-dseg.yaml``: its layer 22 (dual layer 41, the main prototype path's ``RepNCSPELAN4``) has
    RepNCSP depth 1 where the dual config trains depth 2; this comparison reports that layer and the 36 trained
    tensors the published config has no place for.
    """
    from ..models import DetectionModel
    from ..models.published import PUBLISHED_DEPLOY, published_config

    if not plan.pruned:
        return None
    nc = plan.deploy_cfg.get("nc", 80)
    name = next((n for n in PUBLISHED_DEPLOY if _same_architecture(dual_cfg, published_config(n, nc=nc))), None)
    if name is None:
        return None
    deploy_name = PUBLISHED_DEPLOY[name]
    published = published_config(deploy_name, nc=nc)
    ours, theirs = normalized_layers(plan.deploy_cfg), normalized_layers(published)
    out = PublishedComparison(name, deploy_name)
    differing = [i for i in range(max(len(ours), len(theirs)))
                 if i >= len(ours) or i >= len(theirs) or ours[i] != theirs[i]]
    if not differing:
        return out
    import torch

    with torch.device("meta"):
        own = DetectionModel(plan.deploy_cfg, nc=nc).state_dict()
        other = DetectionModel(published, nc=nc).state_dict()
    for i in differing:
        mine = [list(ours[i][0]), *ours[i][1:]] if i < len(ours) else []
        pub = [list(theirs[i][0]), *theirs[i][1:]] if i < len(theirs) else []
        prefix = f"model.{i}."
        lost = sum(1 for k, v in own.items() if k.startswith(prefix) and (k not in other or other[k].shape != v.shape))
        module = (mine or pub)[2]
        dual_i = plan.layer_map.get(i)
        why = (f"deploy layer {i} (dual layer {dual_i}) {module} is {_layer_text(mine)} as the checkpoint trained it, "
               f"where {deploy_name}.yaml has {_layer_text(pub)}; the derived config keeps the trained layer (the "
               f"published one has no place for {lost} of its tensors)")
        out.differences.append(LayerDifference(i, dual_i, module, mine, pub, lost, why))
    return out


def _layer_text(layer: list[Any]) -> str:
    if not layer:
        return "absent"
    f, n, _module, args = layer
    return f"from {f[0] if len(f) == 1 else f}, args {list(args)}" + (f", number {n}" if n != 1 else "")
