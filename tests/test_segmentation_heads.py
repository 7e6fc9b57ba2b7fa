"""Segmentation duals (yolov9-c-dseg -> DSegment) and TripleDDetect (yolov9-cf): the derived deploy graph, the
weight transfer and the equivalence check, on the published configs (package data) and on quarter-width variants of
them (every channel count divided by 4, as tests/fixtures/configs/yolov9-c-quarter.yaml) with random weights.

The published gelan-c-dseg.yaml differs from the deploy graph of yolov9-c-dseg.yaml at one layer (deploy 22, dual
41: RepNCSP depth 1 there, 2 in the dual config); the derived graph keeps the trained depth and the report says so.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from reparam import exitcodes, spec
from reparam.converter.convert import prune
from reparam.converter.pruning import MULTI_HEADS, compare_with_published, derive_deploy_plan, normalized_layers
from reparam.converter.validation import check_conversion, main_branch_forward, unpack_output
from reparam.errors import InvalidInputError
from reparam.models import DDetect, DSegment, DetectionModel, DualDSegment, TripleDDetect
from reparam.models.published import published_config

NC = 3
NAMES = {i: f"c{i}" for i in range(NC)}
#: channel arguments of each block in the official config format (positions in ``args``)
CHANNEL_ARGS = {"Conv": 1, "ADown": 1, "AConv": 1, "RepNCSPELAN4": 3, "ELAN1": 3, "SPPELAN": 2}
#: x: a small non-square batch at strides 8/16/32 (P3 8x12, P4 4x6, P5 2x3; prototypes 16x24)
X = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
#: deploy index -> dual index for yolov9-c-dseg (derived by hand from the config: Silence dropped, backbone and
#: main neck shifted by one, then the main prototype path 41-43 and the head)
C_DSEG_MAP = {**{i: i + 1 for i in range(22)}, 22: 41, 23: 42, 24: 43, 25: 44}


def quarter(cfg: dict) -> dict:
    """``cfg`` with every channel count divided by 4 (CBLinear lists too; depths, nc, nm and npr unchanged)."""
    out = copy.deepcopy(cfg)
    for layer in out["backbone"] + out["head"]:
        module, args = layer[2], layer[3]
        if module == "CBLinear":
            args[0] = [c // 4 for c in args[0]]
        for k in range(CHANNEL_ARGS.get(module, 0)):
            args[k] //= 4
    return out


def randomized(model: DetectionModel) -> DetectionModel:
    """``model`` in eval with non-trivial BatchNorm statistics (so that every layer matters) and random biases."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


def build(cfg: dict, seed: int = 0) -> DetectionModel:
    torch.manual_seed(seed)
    return randomized(DetectionModel(cfg, nc=NC))


def layers_except(cfg: dict, skip: int) -> list:
    return [layer for i, layer in enumerate(normalized_layers(cfg)) if i != skip]


# --- the quarter helper is the fixture's quarter config ------------------------------------------------------------

@pytest.mark.parametrize("name", ["yolov9-c", "gelan-c"])
def test_quarter_is_the_fixture_quarter_config(name: str, fixtures: Path) -> None:
    ref = yaml.safe_load((fixtures / "configs" / f"{name}-quarter.yaml").read_text())
    assert normalized_layers(quarter(published_config(name))) == normalized_layers(ref)


# --- the published configs ----------------------------------------------------------------------------------------

def test_published_segmentation_and_cf_configs_build() -> None:
    heads = {"yolov9-c-dseg": DualDSegment, "gelan-c-dseg": DSegment, "yolov9-cf": TripleDDetect}
    for name, cls in heads.items():
        with torch.device("meta"):
            model = DetectionModel(published_config(name, nc=NC))
        assert type(model.model[-1]) is cls, name
        assert model.stride.tolist() == [8.0, 16.0, 32.0]


def test_c_dseg_derives_gelan_c_dseg_except_the_documented_depth() -> None:
    dual = published_config("yolov9-c-dseg", nc=NC)
    plan = derive_deploy_plan(dual)
    ours, published = normalized_layers(plan.deploy_cfg), normalized_layers(published_config("gelan-c-dseg", nc=NC))
    assert len(ours) == len(published) == 26
    assert [i for i in range(26) if ours[i] != published[i]] == [22]
    assert ours[22] == ((15,), 1, "RepNCSPELAN4", [256, 256, 128, 2])  # dual layer 41 as trained
    assert published[22] == ((15,), 1, "RepNCSPELAN4", [256, 256, 128, 1])
    assert plan.layer_map == C_DSEG_MAP
    assert plan.dropped == [0, *range(23, 41)]  # Silence, the auxiliary branch and the auxiliary prototype path
    assert plan.deploy_cfg["head"][-1] == [[15, 18, 21, 24], 1, "DSegment", ["nc", 32, 256]]
    assert plan.head_inputs == [3, 4, 5, 7] and plan.branch == "main"
    assert plan.head_rename == {"cv2": "cv4", "cv3": "cv5", "dfl": "dfl2", "cv4": "cv7", "proto": "proto2"}

    cmp = compare_with_published(dual, plan)
    assert (cmp.dual_config, cmp.deploy_config) == ("yolov9-c-dseg", "gelan-c-dseg")
    assert [(d.deploy_layer, d.dual_layer, d.module, d.tensors) for d in cmp.differences] == [
        (22, 41, "RepNCSPELAN4", 36)]  # one RepNBottleneck (18 tensors) in each of the block's two RepNCSPs
    assert "deploy layer 22 (dual layer 41)" in cmp.summary() and "[256, 256, 128, 1]" in cmp.summary()


@pytest.mark.parametrize("branch, rename, inputs", [
    ("fine", {"cv2": "cv6", "cv3": "cv7", "dfl": "dfl3"}, [6, 7, 8]),
    ("coarse", {"cv2": "cv4", "cv3": "cv5", "dfl": "dfl2"}, [3, 4, 5]),
])
def test_cf_derives_gelan_c(branch: str, rename: dict, inputs: list) -> None:
    dual = published_config("yolov9-cf", nc=NC)
    plan = derive_deploy_plan(dual, branch)
    assert normalized_layers(plan.deploy_cfg) == normalized_layers(published_config("gelan-c", nc=NC))
    assert plan.layer_map == {**{i: i + 1 for i in range(22)}, 22: 38}  # the yolov9-c offsets
    assert (plan.branch, plan.head_rename, plan.head_inputs) == (branch, rename, inputs)
    assert compare_with_published(dual, plan).differences == []


def test_cf_default_is_the_official_eval_branch() -> None:
    """The default --head is the branch the official TripleDDetect eval forward returns (y3 of cv6/cv7/dfl3): what
    the official detect.py runs NMS on."""
    rule = MULTI_HEADS["TripleDDetect"]
    assert rule.default == spec.DEFAULT_TRIPLE_HEAD == "fine"
    assert rule.branches[rule.default].group == rule.official_eval_branch == 2
    assert set(rule.branches) == set(spec.TRIPLE_HEAD_BRANCHES)
    assert derive_deploy_plan(published_config("yolov9-cf")).branch == "fine"


# --- conversions with random weights (quarter width) ----------------------------------------------------------------

def test_c_dseg_quarter_converts_to_an_equivalent_dsegment() -> None:
    dual_cfg = quarter(published_config("yolov9-c-dseg", nc=NC))
    dual = build(dual_cfg)
    pruned = prune(dual_cfg, NC, NAMES, dual.state_dict())
    assert pruned.account.exact and pruned.account.used == len(pruned.deploy.state_dict())
    assert type(pruned.deploy.model[-1]) is DSegment
    assert layers_except(pruned.plan.deploy_cfg, 22) == layers_except(
        quarter(published_config("gelan-c-dseg", nc=NC)), 22)
    assert pruned.plan.layer_map == C_DSEG_MAP

    with torch.no_grad():
        ref = unpack_output(pruned.dual(X))
        got = unpack_output(pruned.deploy(X))
        lazy = unpack_output(main_branch_forward(pruned.dual, X))
        aux = pruned.dual.model[-1].forward_branch(
            [pruned.dual._run(X, upto=44)[j] for j in (0, 1, 2, 6)], 0)  # the auxiliary branch, for contrast
    nm = 32
    assert got.y.shape == ref.y.shape == (2, 4 + NC + nm, 8 * 12 + 4 * 6 + 2 * 3)
    assert got.prototypes.shape == ref.prototypes.shape == (2, nm, 16, 24)
    for a, b in ((got.y, ref.y), (got.prototypes, ref.prototypes), (lazy.y, ref.y), (lazy.prototypes, ref.prototypes)):
        assert (a - b).abs().max().item() <= 1e-5
    assert not torch.allclose(aux[0], ref.y) and not torch.allclose(aux[1][2], ref.prototypes)

    result, _ = check_conversion(pruned.dual, pruned.deploy, imgsz=128, stride=32)
    assert result.passed, result.reason
    assert result.max_abs_diff <= 1e-5
    for comp in result.comparisons:
        assert set(comp.parts) == {"boxes", "scores", "mask_coefficients", "prototypes"}
        assert max(comp.parts.values()) == comp.max_abs_diff


def test_the_published_gelan_c_dseg_would_change_the_masks() -> None:
    """The issue's point: the converted weights loaded into the published deploy config lose the trained prototype
    block's second bottlenecks (36 tensors) and give other prototypes, while boxes and scores stay."""
    dual_cfg = quarter(published_config("yolov9-c-dseg", nc=NC))
    pruned = prune(dual_cfg, NC, NAMES, build(dual_cfg).state_dict())
    published = DetectionModel(quarter(published_config("gelan-c-dseg", nc=NC)), nc=NC).eval()
    missing, unexpected = published.load_state_dict(pruned.deploy.state_dict(), strict=False)
    assert missing == [] and len(unexpected) == 36 and all(k.startswith("model.22.") for k in unexpected)
    with torch.no_grad():
        ours, theirs = unpack_output(pruned.deploy(X)), unpack_output(published(X))
    assert torch.equal(ours.y[:, :4 + NC], theirs.y[:, :4 + NC])  # the detection path is untouched
    diff = (ours.prototypes - theirs.prototypes).abs().max().item()
    assert diff > 10 * 1e-5, diff  # ten times the tolerance the conversions here are checked with


def test_gelan_c_dseg_passes_through() -> None:
    cfg = quarter(published_config("gelan-c-dseg", nc=NC))
    model = build(cfg)
    pruned = prune(cfg, NC, NAMES, model.state_dict())
    assert not pruned.plan.pruned and pruned.plan.dropped == [] and pruned.plan.branch is None
    assert pruned.account.exact and pruned.account.used == len(model.state_dict())
    result, _ = check_conversion(pruned.dual, pruned.deploy, imgsz=128, stride=32, level="full")
    assert result.passed and result.max_abs_diff == 0.0
    assert compare_with_published(cfg, pruned.plan) is None


@pytest.mark.parametrize("branch, group", [("fine", 2), ("coarse", 1)])
def test_cf_quarter_converts_either_branch(branch: str, group: int) -> None:
    dual_cfg = quarter(published_config("yolov9-cf", nc=NC))
    dual = build(dual_cfg)
    pruned = prune(dual_cfg, NC, NAMES, dual.state_dict(), branch=branch)
    assert pruned.account.exact and type(pruned.deploy.model[-1]) is DDetect
    head = pruned.dual.model[-1]
    with torch.no_grad():
        feats = pruned.dual._run(X, upto=head.i)
        y_branch, _ = head.forward_branch(feats[3 * group:3 * group + 3], group)
        y_official, _ = pruned.dual(X)  # the official eval output: the fine branch
        y, _ = pruned.deploy(X)
    assert (y - y_branch).abs().max().item() <= 1e-5
    assert torch.equal(y_branch, y_official) == (branch == "fine")
    for level in ("fast", "full"):
        result, _ = check_conversion(pruned.dual, pruned.deploy, imgsz=128, stride=32, level=level, branch=branch)
        assert result.passed and result.max_abs_diff <= 1e-5, result.reason
    other = "coarse" if branch == "fine" else "fine"  # checked against the other branch, the same model must fail
    wrong, _ = check_conversion(pruned.dual, pruned.deploy, imgsz=128, stride=32, branch=other)
    assert not wrong.passed and "exceeds atol" in wrong.reason


def test_cf_coarse_accounting_sees_the_branch() -> None:
    """The transfer's accounting reads the kept branch from the dual graph: the fine plan's tensors are not the
    coarse branch's."""
    from reparam.converter.transfer import transfer_weights

    cfg = quarter(published_config("yolov9-cf", nc=NC))
    sd = build(cfg).state_dict()
    fine = derive_deploy_plan(cfg, "fine")
    with torch.device("meta"):
        keys = list(DetectionModel(fine.deploy_cfg, nc=NC).state_dict())
    assert transfer_weights(sd, keys, fine, cfg, "fine")[1].exact
    account = transfer_weights(sd, keys, fine, cfg, "coarse")[1]
    assert not account.exact and any("not used" in p for p in account.problems)


# --- bad input --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, branch, message", [
    ("yolov9-c", "coarse", "--head coarse selects a branch of a TripleDDetect head .* this checkpoint's head is "
                           "DualDDetect"),
    ("yolov9-cf", "main", "--head main does not name a branch of the TripleDDetect head: it has coarse, fine"),
    ("gelan-c-dseg", "fine", "this checkpoint's head is DSegment: leave --head out"),
])
def test_wrong_head_branch_is_named(name: str, branch: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        derive_deploy_plan(published_config(name), branch)


def test_dseg_input_layout_is_checked() -> None:
    cfg = published_config("yolov9-c-dseg")
    cfg["head"][-1][0] = [31, 34, 37, 16, 19, 22, 43]
    with pytest.raises(InvalidInputError, match="DualDSegment head .* 7 inputs; it needs 2 x nl \\+ 2 prototype"):
        derive_deploy_plan(cfg)


def _reparam(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reparam.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def _state_dict_file(tmp_path: Path, cfg: dict, name: str) -> tuple[Path, Path]:
    cfg_path = tmp_path / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    weights = tmp_path / f"{name}.pt"
    torch.save(build(cfg).half().state_dict(), weights)
    return weights, cfg_path


def test_cli_refuses_a_panoptic_head_in_one_line(tmp_path: Path) -> None:
    cfg = quarter(published_config("gelan-c", nc=NC))
    weights, _ = _state_dict_file(tmp_path, cfg, "gelan-c-quarter")
    pan = copy.deepcopy(cfg)
    pan["head"][-1] = [[15, 18, 21], 1, "Panoptic", ["nc", 93, 32, 256]]
    (tmp_path / "pan.yaml").write_text(yaml.safe_dump(pan, sort_keys=False))
    for command in ("convert", "inspect"):
        proc = _reparam(command, str(weights), "--cfg", str(tmp_path / "pan.yaml"), cwd=tmp_path)
        assert proc.returncode == exitcodes.INVALID_INPUT, proc.stderr
        lines = [x for x in proc.stderr.splitlines() if x.startswith("reparam: error: ")]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "panoptic checkpoints (Panoptic head" in lines[0] and "DualDSegment" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gelan-c-quarter.pt", "gelan-c-quarter.yaml", "pan.yaml"]


def test_cli_converts_and_inspects_a_segmentation_state_dict(tmp_path: Path) -> None:
    cfg = quarter(published_config("yolov9-c-dseg", nc=NC))
    weights, cfg_path = _state_dict_file(tmp_path, cfg, "yolov9-c-dseg-quarter")
    proc = _reparam("inspect", str(weights), "--cfg", str(cfg_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "a conversion keeps 26 and drops 19 (auxiliary branch)" in proc.stdout
    assert ("DualDSegment -> DSegment from the main branch (inputs [3, 4, 5, 7] of its from-list; cv2<-cv4, "
            "cv3<-cv5, dfl<-dfl2, cv4<-cv7, proto<-proto2)") in proc.stdout

    out = tmp_path / "out"
    proc = _reparam("convert", str(weights), "--cfg", str(cfg_path), "-o", str(out), "--imgsz", "128", "--json",
                    "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["head"]["dual"] == "DualDSegment" and report["head"]["deploy"] == "DSegment"
    assert report["layers"]["map"]["22"] == 41 and report["published_config"] is None  # a custom width
    assert report["tensors"]["used_exactly_once"] and report["validation"]["passed"]
    for comp in report["validation"]["comparisons"]:
        assert set(comp["parts"]) == {"boxes", "scores", "mask_coefficients", "prototypes"}
    assert report["validation"]["max_abs_diff"] <= 1e-5


def test_cli_inspect_names_the_published_config_difference(tmp_path: Path) -> None:
    """The full-size yolov9-c-dseg as a bare state_dict (--cfg yolov9-c-dseg): inspect says where the derived deploy
    config differs from the published gelan-c-dseg and why."""
    with torch.device("meta"):
        keys = DetectionModel(published_config("yolov9-c-dseg", nc=NC), nc=NC).state_dict()
    weights = tmp_path / "c-dseg.pt"
    torch.save({k: torch.zeros(v.shape, dtype=torch.float16 if v.is_floating_point() else v.dtype)
                for k, v in keys.items()}, weights)
    proc = _reparam("inspect", str(weights), "--cfg", "yolov9-c-dseg", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    desc = json.loads(proc.stdout)
    assert desc["published"]["dual_config"] == "yolov9-c-dseg"
    assert [(d["deploy_layer"], d["dual_layer"], d["tensors"]) for d in desc["published"]["differences"]] == [
        (22, 41, 36)]
    proc = _reparam("inspect", str(weights), "--cfg", "yolov9-c-dseg", cwd=tmp_path)
    line = next(x for x in proc.stdout.splitlines() if x.strip().startswith("config"))
    assert "differs from the published gelan-c-dseg: deploy layer 22 (dual layer 41) RepNCSPELAN4" in line
    assert "no place for 36 of its tensors" in line


# --- the official deploy format ---------------------------------------------------------------------------------

def test_dual_segmentation_checkpoint_converts_to_the_official_format(tmp_path: Path) -> None:
    """A pickled dual segmentation checkpoint (official class names, as train_dual.py's stripped best.pt) converts
    to ``{'model': SegmentationModel with a DSegment head, ...}`` under the official names, with the head's
    ``detect`` pickled as ``getattr(models.yolo.DDetect, 'forward')`` as in the official segmentation checkpoints;
    the safetensors load back to an equal model."""
    from reparam.converter.artifacts import load_safetensors
    from reparam.converter.convert import ConvertOptions, convert
    from reparam.converter.official_format import save_official
    from reparam.converter.safe_load import MethodRef, load_pickle
    from reparam.models import SegmentationModel

    cfg = quarter(published_config("yolov9-c-dseg", nc=NC))
    dual = build(cfg)
    assert type(dual) is SegmentationModel
    dual.names = dict(NAMES)
    source = tmp_path / "yolov9-c-dseg-quarter.pt"
    save_official(dual.half(), source)
    dual_globals = load_pickle(source).globals
    assert {"models.yolo.SegmentationModel", "models.yolo.DualDSegment", "models.yolo.DualDDetect",
            "__builtin__.getattr"} <= set(dual_globals)

    report = convert(source, tmp_path / "out", ConvertOptions(imgsz=128)).to_dict()
    assert report["status"] == "succeeded" and report["head"]["deploy"] == "DSegment"
    assert report["validation"]["max_abs_diff"] <= 1e-5
    assert set(report["validation"]["comparisons"][0]["parts"]) == {"boxes", "scores", "mask_coefficients",
                                                                   "prototypes"}
    converted = load_pickle(tmp_path / "out" / "yolov9-c-dseg-quarter-converted.pt")
    assert {g for g in converted.globals if g.startswith("models.yolo.") or "getattr" in g} == {
        "models.yolo.SegmentationModel", "models.yolo.DSegment", "models.yolo.DDetect", "__builtin__.getattr"}
    model = converted.obj["model"]
    assert model.cls == "models.yolo.SegmentationModel" and converted.obj["epoch"] == -1
    head = model.state["_modules"]["model"].state["_modules"]["25"]
    assert head.cls == "models.yolo.DSegment"
    assert head.state["detect"] == MethodRef("models.yolo.DDetect", "forward")
    assert (head.state["nc"], head.state["nm"], head.state["nl"]) == (NC, 32, 3)

    loaded = load_safetensors(tmp_path / "out" / "yolov9-c-dseg-quarter-converted.safetensors")
    assert type(loaded) is SegmentationModel and type(loaded.model[-1]) is DSegment
    with torch.no_grad():
        ref = unpack_output(main_branch_forward(dual.float(), X))
        got = unpack_output(loaded(X))
    assert (got.y - ref.y).abs().max().item() <= 1e-5
    assert (got.prototypes - ref.prototypes).abs().max().item() <= 1e-5


def test_segmentation_onnx_has_output0_and_the_prototypes_output1(tmp_path: Path) -> None:
    """ONNX of a segmentation model: output0 (boxes, scores, mask coefficients) and output1 (prototypes), names and
    shapes declared, metadata task=segment; run through onnxruntime here, both outputs match the torch deploy model;
    the TorchScript returns the same pair (--nms: tests/test_segmentation_export.py)."""
    import onnx

    from reparam.converter.artifacts import load_safetensors
    from reparam.converter.convert import ConvertOptions, convert
    from reparam.converter.export.onnx_graph import run_onnx
    from reparam.converter.official_format import save_official

    cfg = quarter(published_config("yolov9-c-dseg", nc=NC))
    dual = build(cfg)
    dual.names = dict(NAMES)
    source = tmp_path / "seg.pt"
    save_official(dual.half(), source)
    out = tmp_path / "out"
    report = convert(source, out, ConvertOptions(imgsz=128, formats=("safetensors", "onnx", "torchscript"),
                                                 onnx={"dynamic": True})).to_dict()
    arts = {a["format"]: a for a in report["artifacts"]}
    assert arts["onnx"]["outputs"] == [{"name": "output0", "shape": ["batch", 4 + NC + 32, "anchors"]},
                                       {"name": "output1", "shape": ["batch", 32, "proto_height", "proto_width"]}]
    for kind in ("onnx", "torchscript"):
        check = arts[kind]["check"]
        assert check["passed"] and all(len(r["output_max_abs_diff"]) == 2 for r in check["runs"])
    proto = onnx.load(str(out / "seg-converted.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["task"] == "segment" and meta["nm"] == "32" and "output1 [batch, nm" in meta["output"]

    deploy = load_safetensors(out / "seg-converted.safetensors")
    x = torch.rand(2, 3, 96, 160, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = unpack_output(deploy(x))
    y, protos = run_onnx(out / "seg-converted.onnx", x)
    assert y.shape == ref.y.shape == (2, 4 + NC + 32, 12 * 20 + 6 * 10 + 3 * 5)
    assert protos.shape == ref.prototypes.shape == (2, 32, 24, 40)
    assert (y - ref.y).abs().max().item() <= 1e-3 and (protos - ref.prototypes).abs().max().item() <= 1e-4
    ts = torch.jit.load(str(out / "seg-converted.torchscript"))
    with torch.no_grad():
        ts_y, ts_p = ts(x)
    assert (ts_y - ref.y).abs().max().item() <= 1e-3 and (ts_p - ref.prototypes).abs().max().item() <= 1e-4

