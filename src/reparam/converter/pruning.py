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

A graph whose last layer is already ``DDetect`` (a gelan checkpoint from ``train.py``) passes through unchanged.
The official notebook (``tools/reparameterization.ipynb``) hard-codes the resulting offsets per variant; here
they are derived, so custom configs work too.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import InvalidInputError, brief

#: Dual heads and, for each, the class of the deploy head and how its sub-module names map.
#: Deploy head attribute <- dual head attribute (YOLOv9 models/yolo.py: DualDDetect.cv4/cv5/dfl2 is the main half).
DUAL_HEADS: dict[str, tuple[str, dict[str, str]]] = {
    "DualDDetect": ("DDetect", {"cv2": "cv4", "cv3": "cv5", "dfl": "dfl2"}),
}
#: Heads that need no pruning.
DEPLOY_HEADS = ("DDetect", "Detect")
#: Heads we recognise but cannot convert yet (the message says so instead of guessing).
UNSUPPORTED_HEADS = {
    "TripleDDetect": "yolov9-cf (TripleDDetect) checkpoints are not supported yet",
    "DualDSegment": "segmentation checkpoints (DualDSegment) are not supported yet",
    "DSegment": "segmentation checkpoints (DSegment) are not supported yet",
    "TripleDetect": "TripleDetect checkpoints are not supported",
    "DualDetect": "DualDetect (anchor-based) checkpoints are not supported",
}


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
    """

    deploy_cfg: dict[str, Any]
    layer_map: dict[int, int]
    dropped: list[int]
    head_rename: dict[str, str] = field(default_factory=dict)
    dual_head: str = "DDetect"
    pruned: bool = True

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


def main_branch(dual_cfg: dict[str, Any]) -> tuple[set[int], int, set[str] | None]:
    """The main branch of a graph, from the config alone: ``(layers, head index, head sub-modules)``.

    ``layers``: every layer the head's main inputs (the last ``nl`` of a dual head) depend on, head excluded;
    ``head sub-modules``: the dual head's main half (``{"cv4", "cv5", "dfl2"}`` for ``DualDDetect``), or None when
    the head is a deploy head (all of it is main, and every layer is main). Independent of any
    :class:`DeployPlan`, so the transfer's accounting (:func:`.transfer.transfer_weights`) can check a plan
    against it. Raises InvalidInputError as :func:`derive_deploy_plan` does for malformed configs.
    """
    layers = layers_of(dual_cfg)
    if not layers:
        raise InvalidInputError("the checkpoint's model config has no layers")
    head_i = len(layers) - 1
    head_name = layers[head_i][2].rsplit(".", 1)[-1]
    if head_name not in DUAL_HEADS:
        return set(range(head_i)), head_i, None
    sources = [resolve_from(layer[0], i) for i, layer in enumerate(layers)]
    inputs = sources[head_i]
    return ancestors(sources, inputs[len(inputs) // 2:]), head_i, set(DUAL_HEADS[head_name][1].values())


def derive_deploy_plan(dual_cfg: dict[str, Any]) -> DeployPlan:
    """Apply the pruning rule to a dual config and return the deploy plan.

    Raises:
        InvalidInputError: malformed config, a last layer that is not a detection head ("the main head cannot be
            found"), a head whose input count is not even, or a head we do not support (named).
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
        raise InvalidInputError(UNSUPPORTED_HEADS[head_name])
    if head_name in DEPLOY_HEADS:
        return DeployPlan(
            deploy_cfg=copy.deepcopy(dual_cfg),
            layer_map={i: i for i in range(n)},
            dropped=[],
            dual_head=head_name,
            pruned=False,
        )
    if head_name not in DUAL_HEADS:
        raise InvalidInputError(
            f"cannot find the main detection head: the last layer ({head_i}) is '{head_mod}', expected one of "
            f"{', '.join(list(DUAL_HEADS) + list(DEPLOY_HEADS))}"
        )
    inputs = sources[head_i]
    if len(inputs) < 2 or len(inputs) % 2:
        raise InvalidInputError(
            f"the {head_name} head (layer {head_i}) has {len(inputs)} inputs; a dual head needs 2 x nl "
            "(auxiliary inputs first, main inputs second)"
        )
    nl = len(inputs) // 2
    keep = ancestors(sources, inputs[nl:])

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

    deploy_head_name, rename = DUAL_HEADS[head_name]
    head_new_i = len(kept)
    head_module = head_mod[: -len(head_name)] + deploy_head_name
    head_from = [x for x in (head_f if isinstance(head_f, (list, tuple)) else [head_f])][nl:]
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
    )
