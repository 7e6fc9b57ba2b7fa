"""Every wrong conversion must be refused, whatever check level runs.

Each case tampers with the deploy plan of a real fixture checkpoint (yolov9-t and the custom yolov9-c-quarter) the
way a buggy pruning rule would: a layer fed from the wrong place, weights from the wrong dual layer, an auxiliary
tensor leaked into the deploy head, a missing block, a block with fewer bottlenecks. Two guards must catch them:
the transfer's exactly-once accounting (``reparam: error``, exit 2, nothing written) and, independently, the
validation (exit 3, only ``report.json``), at both levels: a speed-up of the validation must not let any through.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import pytest
import torch

import reparam.converter.convert as convert_mod
from reparam import exitcodes
from reparam.converter.checkpoint import Checkpoint, read_checkpoint
from reparam.converter.convert import ConvertOptions, build_model, convert, load_weights
from reparam.converter.pruning import DeployPlan, layers_of, resolve_from
from reparam.converter.transfer import transfer_weights
from reparam.converter.validation import (CHECK_LEVELS, check_conversion, computing_in_fp32, lockstep_forward,
                                          main_branch_forward, same_function, unpack_output)
from reparam.errors import InvalidInputError, ValidationFailedError
from reparam.models import DetectionModel

CKPTS = ["yolov9-t-dual-best", "yolov9-c-quarter-dual"]


def _with_layers(plan: DeployPlan, layers: list, n_backbone: int) -> DeployPlan:
    plan = copy.deepcopy(plan)
    plan.deploy_cfg["backbone"], plan.deploy_cfg["head"] = layers[:n_backbone], layers[n_backbone:]
    return plan


def _output_shapes(plan: DeployPlan, nc: int) -> list[tuple[int, ...]]:
    """Each deploy layer's output shape on a 64x64 image (shapes only, on the meta device)."""
    with torch.device("meta"):
        model = DetectionModel(plan.deploy_cfg, nc=nc).eval()
        shapes: list[tuple[int, ...]] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
                 for m in model.model[:-1]]
        model._run(torch.zeros(1, 3, 64, 64), upto=len(model.model) - 1)
    for h in hooks:
        h.remove()
    return shapes


def rewired(plan: DeployPlan, ck: Checkpoint) -> DeployPlan:
    """A deploy layer reads another earlier layer whose output has the same shape (its real input is skipped)."""
    layers = layers_of(plan.deploy_cfg)
    shapes = _output_shapes(plan, ck.nc)
    for k in range(1, len(layers) - 1):
        if not isinstance(layers[k][0], int):
            continue
        (src,) = resolve_from(layers[k][0], k)
        twins = [j for j in range(k) if j != src and shapes[j] == shapes[src]]
        if twins:
            layers[k][0] = twins[-1]
            return _with_layers(plan, layers, len(plan.deploy_cfg["backbone"]))
    raise AssertionError("no layer with a same-shaped alternative input")


def _signature(ck: Checkpoint, layer: int) -> list[tuple[str, tuple[int, ...]]]:
    prefix = f"model.{layer}."
    return sorted((k[len(prefix):], tuple(v.shape)) for k, v in ck.state_dict.items() if k.startswith(prefix))


def _twin_layers(plan: DeployPlan, ck: Checkpoint, *, kept: bool) -> tuple[int, int]:
    """(deploy layer, dual layer): another dual layer whose tensors have the same names and shapes."""
    used = set(plan.layer_map.values())
    for i, j in sorted(plan.layer_map.items()):
        if i == plan.head_index:
            continue
        for other in sorted(used if kept else set(range(max(used))) - used):
            if other != j and _signature(ck, other) == _signature(ck, j):
                return i, other
    raise AssertionError("no twin layer")


def weights_of_aux_twin(plan: DeployPlan, ck: Checkpoint) -> DeployPlan:
    """A deploy layer takes the weights of an auxiliary dual layer of the same shapes (yolov9-t: 9 <- 22)."""
    i, other = _twin_layers(plan, ck, kept=False)
    plan = copy.deepcopy(plan)
    plan.layer_map[i] = other
    return plan


def swapped_main_layers(plan: DeployPlan, ck: Checkpoint) -> DeployPlan:
    """Two deploy layers of identical shapes take each other's (main-branch) weights: each used exactly once."""
    i, other = _twin_layers(plan, ck, kept=True)
    k = next(d for d, j in plan.layer_map.items() if j == other)
    plan = copy.deepcopy(plan)
    plan.layer_map[i], plan.layer_map[k] = plan.layer_map[k], plan.layer_map[i]
    return plan


def aux_head_leaked(plan: DeployPlan, ck: Checkpoint) -> DeployPlan:
    """The deploy head's box towers come from the auxiliary half (cv2) instead of the main half (cv4)."""
    plan = copy.deepcopy(plan)
    plan.head_rename["cv2"] = "cv2"
    return plan


def missing_block(plan: DeployPlan, ck: Checkpoint) -> DeployPlan:
    """The first shape-preserving deploy block (SPPELAN) is left out; its readers read its input instead."""
    layers = layers_of(plan.deploy_cfg)
    shapes = _output_shapes(plan, ck.nc)
    k = next(i for i in range(1, len(layers) - 1) if isinstance(layers[i][0], int)
             and shapes[resolve_from(layers[i][0], i)[0]] == shapes[i] and layers[i][2] != "nn.Upsample")
    (src,) = resolve_from(layers[k][0], k)
    new = []
    for i, (f, n, mod, args) in enumerate(layers):
        if i == k:
            continue
        srcs = [src if j == k else (j - 1 if j > k else j) for j in resolve_from(f, i)]
        new.append([srcs if isinstance(f, list) else srcs[0], n, mod, args])
    plan = _with_layers(plan, new, len(plan.deploy_cfg["backbone"]) - (k < len(plan.deploy_cfg["backbone"])))
    plan.layer_map = {i: plan.layer_map[i if i < k else i + 1] for i in range(len(new))}
    return plan


def fewer_bottlenecks(plan: DeployPlan, ck: Checkpoint) -> DeployPlan:
    """The first RepNCSPELAN4 of the deploy graph gets one RepNBottleneck less than the dual one has."""
    plan = copy.deepcopy(plan)
    layer = next(row for row in plan.deploy_cfg["backbone"] if row[2] == "RepNCSPELAN4")
    layer[3] = [*layer[3][:3], layer[3][3] - 1]
    return plan


#: (mutation, which checkpoints have such a case, the guard that refuses it first at conversion time)
CASES: list[tuple[Callable[[DeployPlan, Checkpoint], DeployPlan], list[str], str]] = [
    (rewired, CKPTS, "validation"),
    (swapped_main_layers, ["yolov9-c-quarter-dual"], "validation"),  # yolov9-t has no two same-shaped main layers
    (weights_of_aux_twin, CKPTS, "accounting"),
    (aux_head_leaked, CKPTS, "accounting"),
    (missing_block, CKPTS, "accounting"),
    (fewer_bottlenecks, CKPTS, "accounting"),
]
PARAMS = [pytest.param(mutate, name, guard, id=f"{mutate.__name__}-{name}")
          for mutate, names, guard in CASES for name in names]


@pytest.fixture(scope="module")
def checkpoints(fixtures: Path) -> dict[str, Checkpoint]:
    return {name: read_checkpoint(fixtures / "ckpt" / f"{name}.pt") for name in CKPTS}


def _plan(ck: Checkpoint, mutate) -> DeployPlan:
    plan = mutate(convert_mod.derive_deploy_plan(ck.cfg), ck)
    assert plan.layer_map != convert_mod.derive_deploy_plan(ck.cfg).layer_map or plan.deploy_cfg != \
        convert_mod.derive_deploy_plan(ck.cfg).deploy_cfg or plan.head_rename != \
        convert_mod.derive_deploy_plan(ck.cfg).head_rename  # the mutation changed something
    return plan


@pytest.mark.parametrize("mutate, name, guard", PARAMS)
def test_accounting_catches_what_it_can(mutate, name: str, guard: str, checkpoints) -> None:
    ck = checkpoints[name]
    plan = _plan(ck, mutate)
    with torch.device("meta"):
        keys = list(DetectionModel(plan.deploy_cfg, nc=ck.nc).state_dict())
    _sd, account = transfer_weights(ck.state_dict, keys, plan, ck.cfg)
    if guard == "accounting":
        assert not account.exact and account.problems
    else:  # every main tensor is used exactly once: only the validation can see this one
        assert account.exact, account.problems


def _wrong_models(ck, mutate, guard: str):
    """``(dual, deploy)`` of the wrong conversion ``mutate`` with the accounting bypassed (the deploy model built from
    the tensors the mutated plan picks), or None when those tensors do not even fit the deploy graph (then the
    accounting must be the guard that catches it)."""
    plan = _plan(ck, mutate)
    dual = build_model(ck.cfg, ck.nc, ck.names, ck.state_dict, keep_dtype=True)
    with torch.device("meta"):
        skeleton = DetectionModel(plan.deploy_cfg, nc=ck.nc)
    sd, _account = transfer_weights(ck.state_dict, list(skeleton.state_dict()), plan, ck.cfg)
    try:
        deploy = load_weights(skeleton, sd, keep_dtype=True)
    except InvalidInputError as err:  # the wrong tensors do not even fit the deploy graph
        assert guard == "accounting" and "do not fit" in str(err)
        return None
    deploy.stride = dual.stride.clone()
    deploy.model[-1].stride = dual.model[-1].stride.clone()
    return dual, deploy


@pytest.mark.parametrize("mutate, name, guard", PARAMS)
def test_fast_check_is_as_strong_as_full(mutate, name: str, guard: str, checkpoints) -> None:
    """With the accounting bypassed, both check levels give the same verdict and (nearly) the same max |diff|; the
    cases the accounting cannot see fail both. (These checkpoints are barely trained: a missing bottleneck can move
    the output by less than the tolerance; the accounting refuses those.)"""
    built = _wrong_models(checkpoints[name], mutate, guard)
    if built is None:
        return
    dual, deploy = built
    fast, full = (check_conversion(dual, deploy, imgsz=ConvertOptions().imgsz, stride=32, level=level)[0]
                  for level in CHECK_LEVELS)
    assert (fast.check, full.check) == ("fast", "full")
    assert fast.passed == full.passed, (fast.max_abs_diff, full.max_abs_diff)
    assert fast.max_abs_diff == pytest.approx(full.max_abs_diff, rel=0.25)
    assert fast.max_abs_diff > 0
    if guard == "validation":
        assert not fast.passed and "exceeds atol" in fast.reason


@pytest.mark.parametrize("mutate, name, guard", PARAMS)
def test_convert_refuses_with_the_right_exit_code(mutate, name: str, guard: str, fixtures: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = convert_mod.derive_deploy_plan
    ck_cfgs: dict = {}

    def wrong_plan(cfg, branch=None):
        plan = real(cfg, branch)
        ck = ck_cfgs.setdefault("ck", read_checkpoint(fixtures / "ckpt" / f"{name}.pt"))
        return mutate(plan, ck)

    monkeypatch.setattr(convert_mod, "derive_deploy_plan", wrong_plan)
    out = tmp_path / "out"
    expected = InvalidInputError if guard == "accounting" else ValidationFailedError
    with pytest.raises(expected) as info:
        convert(fixtures / "ckpt" / f"{name}.pt", out, ConvertOptions())
    err = info.value
    if guard == "accounting":
        assert err.exit_code == exitcodes.INVALID_INPUT
        assert "weight transfer is not exact" in str(err)
        assert not out.exists()
    else:
        assert err.exit_code == exitcodes.VALIDATION_FAILED
        assert sorted(p.name for p in out.iterdir()) == ["report.json"]
        assert err.report.validation.check == "fast" and err.report.validation.passed is False


def test_correct_conversion_passes_both_levels(checkpoints) -> None:
    """The control: the same machinery with the real plan passes, and the two levels agree on the GFLOPs."""
    ck = checkpoints["yolov9-t-dual-best"]
    pruned = convert_mod.prune(ck.cfg, ck.nc, ck.names, ck.state_dict)
    results = {level: check_conversion(pruned.dual, pruned.deploy, imgsz=640, stride=32, level=level)
               for level in CHECK_LEVELS}
    for level, (result, flops) in results.items():
        assert result.passed and result.max_abs_diff == 0.0, (level, result.reason)
        assert flops["before"] == pytest.approx(10.807, abs=1e-3) and flops["after"] == pytest.approx(7.165, abs=1e-3)
    fast = results["fast"][0]
    assert fast.main_only_vs_full == 0.0
    assert [c.input_shape for c in fast.comparisons] == [[1, 3, 640, 640], [2, 3, 64, 96]]
    assert [c.dual for c in fast.comparisons] == ["main-only", "full"]


@pytest.mark.parametrize("level", [None, "full"])
def test_cli_reports_the_check_level(level: str | None, fixtures: Path, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    flag = ["--check", level] if level else []
    proc = subprocess.run([sys.executable, "-m", "reparam.cli", "convert", str(fixtures / "ckpt" / f"{CKPTS[0]}.pt"),
                           "-o", str(tmp_path / "out"), "--imgsz", "64", *flag],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == exitcodes.OK, proc.stderr
    ran = level or "fast"
    assert f"check {ran}) passed" in proc.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["validation"]["check"] == ran and report["options"]["check"] == ran
    assert len(report["validation"]["comparisons"]) == 2
    assert report["threads"] >= 1 and report["timing"]["validate_cpu_s"] > 0


def test_wrong_stored_strides_fail_the_check(checkpoints) -> None:
    """Models built with a checkpoint's stored strides (no measuring forward) are checked against the maps."""
    ck = checkpoints["yolov9-t-dual-best"]
    pruned = convert_mod.prune(ck.cfg, ck.nc, ck.names, ck.state_dict, stride=[8.0, 16.0, 64.0])
    result, _ = check_conversion(pruned.dual, pruned.deploy, imgsz=64, stride=32, level="fast")
    assert not result.passed
    assert "head strides [8.0, 16.0, 64.0] do not match the feature maps (strides [8.0, 16.0, 32.0])" in result.reason


@pytest.mark.parametrize("mutate, name, guard", PARAMS)
def test_lockstep_equals_running_every_layer(mutate, name: str, guard: str, checkpoints) -> None:
    """The lockstep's outputs are exactly those of the dual main-only forward and of the whole deploy forward, for
    every wrong conversion that builds; the deploy layers the mutation touched run, the rest are shared."""
    built = _wrong_models(checkpoints[name], mutate, guard)
    if built is None:
        return
    dual, deploy = built
    x = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(1))
    with computing_in_fp32(dual, deploy), torch.inference_mode():
        theirs, ours, steps = lockstep_forward(dual, deploy, x)
        assert torch.equal(unpack_output(theirs).y, unpack_output(main_branch_forward(dual, x)).y)
        assert torch.equal(unpack_output(ours).y, unpack_output(deploy(x)).y)
    assert not torch.equal(unpack_output(theirs).y, unpack_output(ours).y)
    n = len(deploy.model)
    assert steps.shared + steps.ran == n and steps.ran_layers[-1] == n - 1
    if mutate is aux_head_leaked:
        assert steps.ran_layers == [n - 1]  # every layer but the head is right: the head always runs
    else:
        assert steps.ran > 1 and steps.shared < n - 1


def test_lockstep_shares_only_the_same_function(checkpoints) -> None:
    """A correct conversion shares every deploy layer but the head; a layer differing in one hyperparameter, one
    weight bit or a NaN runs; equal values in other memory (a copy, a -0.0 for a +0.0) are the same function."""
    ck = checkpoints["yolov9-t-dual-best"]
    pruned = convert_mod.prune(ck.cfg, ck.nc, ck.names, ck.state_dict)
    dual, deploy = pruned.dual, pruned.deploy
    result, _ = check_conversion(dual, deploy, imgsz=256, stride=32, level="fast")
    big = result.comparisons[0]
    assert (big.layers_shared, big.layers_run) == (len(deploy.model) - 1, 1)
    assert result.comparisons[1].layers_shared is None  # the small batch runs the whole deploy model

    k = 4  # a RepNCSPELAN4: convs, BatchNorms, nested blocks
    d = pruned.plan.layer_map[k]
    a, b = dual.model[d], deploy.model[k]
    assert same_function(a, b)
    twin = copy.deepcopy(b)
    assert same_function(a, twin)  # equal tensors, other memory
    conv = next(m for m in twin.modules() if isinstance(m, torch.nn.Conv2d))
    zero = conv.weight.detach().view(-1)
    zero[0] = 0.0
    a_zero = copy.deepcopy(a)
    next(m for m in a_zero.modules() if isinstance(m, torch.nn.Conv2d)).weight.detach().view(-1)[0] = -0.0
    assert same_function(a_zero, twin)
    bits = zero.view(torch.int16) if zero.dtype == torch.float16 else zero.view(torch.int32)
    bits[1] += 1  # one ulp
    assert not same_function(a_zero, twin)
    twin = copy.deepcopy(b)
    next(m for m in twin.modules() if isinstance(m, torch.nn.Conv2d)).weight.detach().view(-1)[1] = float("nan")
    nan_too = copy.deepcopy(twin)
    assert not same_function(twin, nan_too)
    assert not same_function(twin, twin)  # the very same storage: a NaN still never counts as identical
    twin = copy.deepcopy(b)
    next(m for m in twin.modules() if isinstance(m, torch.nn.BatchNorm2d)).eps = 1e-5
    assert not same_function(a, twin)
    twin = copy.deepcopy(b)
    next(m for m in twin.modules() if isinstance(m, torch.nn.Conv2d)).stride = (2, 2)
    assert not same_function(a, twin)
    twin = copy.deepcopy(b)
    twin.c = twin.c + 1  # a block attribute the forward reads (RepNCSPELAN4 splits at c)
    assert not same_function(a, twin)

    fused = convert_mod.fuse_model(copy.deepcopy(deploy).float()).eval()
    with computing_in_fp32(dual), torch.inference_mode():
        _theirs, _ours, steps = lockstep_forward(dual, fused, torch.rand(1, 3, 128, 128))
    assert steps.shared < len(fused.model) - 1  # fused layers are other functions: they run
