"""DetectionModel built from config dicts, checked against real official checkpoints.

The checkpoints are read with reparam's own allowlisting loader (reparam.converter.safe_load):
no official class is imported or called.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from collections import OrderedDict

from reparam.converter.safe_load import ObjectRecord, load_pickle
from reparam.models import fuse_model
from reparam.errors import InvalidInputError
from reparam.models import DDetect, DetectionModel, DualDDetect, RepConvN


CKPTS = ["yolov9-t-dual-best", "yolov9-t-dual-last", "yolov9-c-quarter-dual", "gelan-t"]
# official attributes our DetectionModel does not set: yaml_file (set only when built from a
# file path), hyp and class_weights (set by the training script)
MODEL_ONLY_OFFICIAL = {"yaml_file", "hyp", "class_weights"}
SCALAR = (int, float, str, bool, list, tuple, type(None))


@pytest.fixture(scope="module")
def probes(fixtures: Path) -> dict:
    out = {name: load_pickle(fixtures / "ckpt" / f"{name}.pt").obj for name in CKPTS}
    out["converted"] = load_pickle(fixtures / "reference" / "yolov9-t-dual-best-converted.pt").obj
    return out


@pytest.fixture(scope="module")
def image(fixtures: Path) -> torch.Tensor:
    return load_file(str(fixtures / "reference" / "input-640.safetensors"))["input"]


def public_attrs(state: dict) -> dict:
    """Instance attributes without ``nn.Module`` internals (``_*`` and ``training``)."""
    return {k: v for k, v in state.items() if not k.startswith("_") and k != "training"}


def _state_dict(rec: ObjectRecord) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((k, v.detach()) for k, v in rec.named_tensors())


def _official_model(probes: dict, name: str) -> ObjectRecord:
    ck = probes[name]
    return ck["ema"] if ck.get("ema") is not None else ck["model"]


def _ours(official: ObjectRecord) -> DetectionModel:
    model = DetectionModel(official.state["yaml"])
    model.load_state_dict({k: v.float() for k, v in _state_dict(official).items()}, strict=True)
    return model.eval()


@pytest.mark.parametrize("name", CKPTS + ["converted"])
def test_graph_matches_checkpoint_structure(probes: dict, name: str) -> None:
    official = _official_model(probes, name)
    model = DetectionModel(official.state["yaml"])
    ref_sd = _state_dict(official)
    ours_sd = model.state_dict()
    assert list(ours_sd) == list(ref_sd)
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    assert sum(p.numel() for p in model.parameters()) == sum(
        v.numel() for k, v in ref_sd.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert model.save == official.state["save"]
    assert model.stride.tolist() == [8.0, 16.0, 32.0] == official.state["stride"].tolist()
    assert model.model[-1].stride.tolist() == [8.0, 16.0, 32.0]
    assert model.nc == official.state["nc"] == len(model.names)

    # every module has the official instance attributes, with equal plain values
    ref_modules = dict(official.named_modules())
    ours_modules = dict(model.named_modules())
    assert list(ours_modules) == list(ref_modules)
    for path, stub in ref_modules.items():
        ref_attrs = public_attrs(stub.state)
        ours = ours_modules[path]
        ours_attrs = public_attrs(vars(ours))
        allowed = MODEL_ONLY_OFFICIAL if path == "" else {"shape"}  # shape: set by an eval forward
        assert set(ref_attrs) - allowed == set(ours_attrs), f"{path or 'model'} ({stub.cls})"
        assert stub.cls.rsplit(".", 1)[1] == type(ours).__name__
        for key in set(ref_attrs) & set(ours_attrs):
            ref_v = ref_attrs[key]
            if isinstance(ref_v, SCALAR) and key != "yaml":
                assert ours_attrs[key] == ref_v, f"{path}.{key}"
    assert model.yaml == official.state["yaml"]


@pytest.mark.parametrize("name", ["yolov9-t-dual-best", "yolov9-t-dual-last", "yolov9-c-quarter-dual"])
def test_dual_model_reproduces_reference_outputs(probes: dict, image: torch.Tensor, name: str, fixtures: Path) -> None:
    ref = load_file(str(fixtures / "reference" / f"{name}-io.safetensors"))
    model = _ours(_official_model(probes, name))
    with torch.no_grad():
        y, d = model(image)
    assert isinstance(model.model[-1], DualDDetect) and len(y) == 2 and len(d) == 2
    nc = model.nc
    assert y[1].shape == (1, 4 + nc, 8400)
    # boxes are in pixels (up to 640): a few float32 ULPs there are ~1e-4
    assert (y[0] - ref["dual.y_aux"]).abs().max().item() <= 2e-4
    assert (y[1] - ref["dual.y_main"]).abs().max().item() <= 2e-4
    for i in range(3):
        if f"dual.d_main.{i}" in ref:
            assert (d[1][i] - ref[f"dual.d_main.{i}"]).abs().max().item() <= 1e-4


def test_gelan_model_and_fusion_reproduce_reference(probes: dict, image: torch.Tensor, fixtures: Path) -> None:
    ref = load_file(str(fixtures / "reference" / "gelan-t-io.safetensors"))
    model = _ours(_official_model(probes, "gelan-t"))
    with torch.no_grad():
        y, d = model(image)
    assert isinstance(model.model[-1], DDetect)
    assert (y - ref["converted.y"]).abs().max().item() <= 2e-4
    for i in range(3):
        assert (d[i] - ref[f"converted.d.{i}"]).abs().max().item() <= 1e-5

    n_modules = len(list(model.modules()))
    fuse_model(model)
    assert len(list(model.modules())) < n_modules
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(not hasattr(m, "conv1") and hasattr(m, "conv") for m in model.modules() if isinstance(m, RepConvN))
    with torch.no_grad():
        yf, _ = model(image)
    assert (yf - ref["converted_fused.y"]).abs().max().item() <= 2e-4

    # fused models carry no bound methods: they pickle and reload with the same output
    buf = io.BytesIO()
    torch.save(model, buf)
    assert b"forward_fuse" not in buf.getvalue()
    reloaded = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(reloaded(image)[0], yf)


def test_deploy_config_matches_official_converted_keys(fixtures: Path) -> None:
    """gelan-c-quarter (the deploy config of yolov9-c-quarter) vs the official conversion's keys."""
    cfg = yaml.safe_load((fixtures / "configs" / "gelan-c-quarter.yaml").read_text())
    ref = json.loads((fixtures / "reference" / "yolov9-c-quarter-dual-converted-keys.json").read_text())
    model = DetectionModel(cfg, nc=5)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(ref["state_dict"])
    assert ours == {k: v["shape"] for k, v in ref["state_dict"].items()}
    assert sum(v.numel() for v in model.state_dict().values()) == ref["n_elements"]
    assert model.stride.tolist() == ref["model_attributes"]["stride"]
    assert model.nc == ref["model_attributes"]["nc"]


def test_dual_config_file_builds_like_its_checkpoint(probes: dict, fixtures: Path) -> None:
    cfg = yaml.safe_load((fixtures / "configs" / "yolov9-c-quarter.yaml").read_text())
    official = _official_model(probes, "yolov9-c-quarter-dual")
    model = DetectionModel(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in _state_dict(official).items()}
    assert model.model[0].type == "models.common.Silence"


def _tiny_cfg() -> dict:
    return {"nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": 3,
            "backbone": [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [16, 3, 2]],
                         [-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [16, 3, 2]]],
            "head": [[[2, 3, 4], 1, "DDetect", ["nc"]]]}


def test_unknown_block_names_block_and_layer() -> None:
    cfg = _tiny_cfg()
    cfg["backbone"][3][2] = "Foo"
    with pytest.raises(InvalidInputError, match=r"unknown block 'Foo' at layer 3: reparam supports Conv, "):
        DetectionModel(cfg)


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.pop("head"), "lacks"),
    (lambda c: c["backbone"].__setitem__(1, [-1, 1, "Conv"]), "layer 1: expected"),
    (lambda c: c["head"][0].__setitem__(0, [2, 3, 9]), "layer 5: 'from' 9"),
    (lambda c: c["backbone"].__setitem__(1, [-1, 1, "Conv", [16, "x", 2]]), "layer 1: cannot build Conv"),
    (lambda c: c.__setitem__("activation", "nn.ReLU()"), "activation"),
    (lambda c: c["backbone"].__setitem__(0, [-1, 1, "__import__", ["os"]]), "unknown block '__import__'"),
])
def test_malformed_config_is_invalid_input(mutate, message: str) -> None:
    cfg = _tiny_cfg()
    mutate(cfg)
    with pytest.raises(InvalidInputError, match=message):
        DetectionModel(cfg)


def test_nc_override_and_config_not_mutated() -> None:
    cfg = _tiny_cfg()
    before = copy.deepcopy(cfg)
    model = DetectionModel(cfg, nc=7)
    assert cfg == before
    assert model.nc == 7 and model.yaml["nc"] == 7 and model.model[-1].nc == 7
    assert model.names == {i: str(i) for i in range(7)}
    assert model.yaml["ch"] == 3
    model.eval()
    with torch.no_grad():
        y, maps = model(torch.rand(1, 3, 64, 96))
    assert y.shape == (1, 4 + 7, 8 * 12 + 4 * 6 + 2 * 3)
    assert [m.shape[-2:] for m in maps] == [(8, 12), (4, 6), (2, 3)]
    # the anchor grid follows the input size on every call (no cached state)
    with torch.no_grad():
        y2, _ = model(torch.rand(1, 3, 32, 32))
    assert y2.shape[-1] == 16 + 4 + 1
