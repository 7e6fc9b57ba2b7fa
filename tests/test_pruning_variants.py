"""The pruning rule on every published dual architecture (random weights) and on custom graphs.

The deploy graph derived from yolov9-{t,s,m,c,e} must equal the published gelan-{t,s,m,c,e} config layer by layer,
the layer offsets must be the official ones (fixtures README), and the deploy model must give the dual model's
main-branch output.
"""

from __future__ import annotations

import copy

import pytest
import torch

from reparam.converter.convert import prune
from reparam.converter.pruning import derive_deploy_plan, normalized_layers
from reparam.errors import InvalidInputError
from reparam.models import DetectionModel
from reparam.models.published import published_config

NC = 3


def config(name: str, nc: int = 80) -> dict:
    """The published config (package data) with every layer in ``backbone``: these tests index layers by number."""
    cfg = published_config(name, nc=nc)
    return {**cfg, "backbone": cfg["backbone"] + cfg["head"], "head": []}


def official_offsets(variant: str) -> dict[int, int]:
    """deploy index -> dual index as the fixtures README lists them for the official notebook."""
    if variant in ("t", "s"):
        return {**{i: i for i in range(22)}, 22: 29}
    if variant in ("m", "c"):
        return {**{i: i + 1 for i in range(22)}, 22: 38}
    return {**{i: i for i in range(29)}, **{i: i + 7 for i in range(29, 42)}, 42: 49}


@pytest.mark.parametrize("v", ["t", "s", "m", "c", "e"])
def test_published_dual_prunes_to_published_deploy(v: str) -> None:
    dual_cfg = config(f"yolov9-{v}", nc=NC)
    plan = derive_deploy_plan(dual_cfg)
    assert normalized_layers(plan.deploy_cfg) == normalized_layers(config(f"gelan-{v}", nc=NC))
    assert plan.layer_map == official_offsets(v)

    torch.manual_seed(0)
    dual = DetectionModel(dual_cfg, nc=NC).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics so that every layer matters
        for m in dual.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    pruned = prune(dual_cfg, NC, {i: f"c{i}" for i in range(NC)}, dual.state_dict())
    assert pruned.account.exact
    assert pruned.account.used == len(pruned.deploy.state_dict())
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (y_aux, y_main), _ = pruned.dual(x)
        y, _ = pruned.deploy(x)
    assert y.shape == y_main.shape == (2, 4 + NC, 8 * 12 + 4 * 6 + 2 * 3)
    assert torch.equal(y, y_main)
    assert not torch.allclose(y, y_aux)
    kept = sum(p.numel() for p in pruned.deploy.parameters())
    assert kept < sum(p.numel() for p in pruned.dual.parameters())


def test_silence_rule() -> None:
    # c: Silence only feeds layer 1 (and the auxiliary branch) -> dropped; e: layer 15 reads it -> kept
    c = derive_deploy_plan(config("yolov9-c")).deploy_cfg["backbone"]
    e = derive_deploy_plan(config("yolov9-e")).deploy_cfg["backbone"]
    assert c[0][2] == "Conv" and c[0][0] == -1
    assert e[0][2] == "Silence" and e[15][0] == 0


def test_reordered_auxiliary_layers_still_prune() -> None:
    """A custom graph: the auxiliary neck of yolov9-t placed *before* the main neck (indices change)."""
    cfg = config("yolov9-t", nc=NC)
    layers = cfg["backbone"]
    head = layers[29]
    # renumber: backbone 0..8, aux 9..15, main 16..28, head 29
    order = list(range(9)) + list(range(22, 29)) + list(range(9, 22))
    old_to_new = {old: new for new, old in enumerate(order)}
    new_layers = []
    for old in order:
        f, n, b, a = copy.deepcopy(layers[old])
        if isinstance(f, list):
            f = [old_to_new[x if x >= 0 else old + x] for x in f]
        elif f >= 0:
            f = old_to_new[f]
        elif old > 0:  # layer 0 reads the image (-1) and stays first
            f = old_to_new[old + f]
        new_layers.append([f, n, b, a])
    new_layers.append([[old_to_new[j] for j in head[0]], 1, "DualDDetect", ["nc"]])
    custom = {**cfg, "backbone": new_layers, "head": []}
    plan = derive_deploy_plan(custom)
    assert normalized_layers(plan.deploy_cfg) == normalized_layers(config("gelan-t", nc=NC))
    assert plan.dropped == list(range(9, 16))
    torch.manual_seed(0)
    dual = DetectionModel(custom, nc=NC).eval()
    pruned = prune(custom, NC, {0: "a", 1: "b", 2: "c"}, dual.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(pruned.deploy(x)[0], pruned.dual(x)[0][1])


def test_other_width_and_nc() -> None:
    # (width scaling does not apply to CBLinear's channel lists in YOLOv9's parse_model, so scaled c/m/e graphs
    # are inconsistent in the official code too; t/s graphs have no CBLinear)
    cfg = {**config("yolov9-s", nc=11), "width_multiple": 0.5}
    torch.manual_seed(0)
    dual = DetectionModel(cfg, nc=11).eval()
    pruned = prune(cfg, 11, {i: str(i) for i in range(11)}, dual.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        y = pruned.deploy(x)[0]
        assert y.shape[1] == 4 + 11
        assert torch.equal(y, pruned.dual(x)[0][1])


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["backbone"][-1].__setitem__(2, "Concat"), "cannot find the main detection head"),
    (lambda c: c["backbone"][-1].__setitem__(0, [28, 25, 22, 15, 18]), "2 x nl"),
    (lambda c: c["backbone"][-1].__setitem__(slice(0, 3), [[28, 25, 22, 15, 18], 1, "TripleDDetect"]),
     "TripleDDetect head .* has 5 inputs; it needs 3 x nl"),
    (lambda c: c["backbone"][-1].__setitem__(2, "Panoptic"), "panoptic checkpoints .* not supported: reparam converts"),
    (lambda c: c["backbone"][5].__setitem__(0, 7), "does not come before it"),
    (lambda c: c.pop("backbone"), "no 'backbone'/'head'"),
])
def test_bad_configs_are_named(mutate, message) -> None:
    cfg = config("yolov9-t")
    mutate(cfg)
    with pytest.raises(InvalidInputError, match=message):
        derive_deploy_plan(cfg)
