"""Every published YOLOv9 / GELAN detection config builds with our blocks and runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data.official_configs import VARIANTS, config
from reparam.models import DDetect, DetectionModel, DualDDetect


NC = 3


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_config_builds_and_runs(name: str) -> None:
    torch.manual_seed(0)
    model = DetectionModel(config(name, nc=NC)).eval()
    head = model.model[-1]
    dual = name.startswith("yolov9-")
    assert type(head) is (DualDDetect if dual else DDetect)
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    with torch.no_grad():
        y, d = model(torch.rand(1, 3, 64, 64))
    sizes = [(8, 8), (4, 4), (2, 2)]
    anchors = sum(h * w for h, w in sizes)
    if dual:
        assert isinstance(y, list) and len(y) == 2 and len(d) == 2
        for yi, di in zip(y, d):
            assert yi.shape == (1, 4 + NC, anchors)
            assert [tuple(m.shape) for m in di] == [(1, 64 + NC, h, w) for h, w in sizes]
    else:
        assert y.shape == (1, 4 + NC, anchors)
        assert [tuple(m.shape) for m in d] == [(1, 64 + NC, h, w) for h, w in sizes]
    scores = (y[1] if dual else y)[:, 4:]
    assert torch.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()


@pytest.mark.parametrize("name, ckpt", [("yolov9-t", "yolov9-t-dual-best"), ("gelan-t", "gelan-t")])
def test_config_equals_checkpoint_yaml(name: str, ckpt: str, fixtures: Path) -> None:
    from reparam.converter.safe_load import load_pickle

    official = load_pickle(fixtures / "ckpt" / f"{ckpt}.pt").obj["model"].state["yaml"]
    ours = config(name, nc=official["nc"])
    assert ours["backbone"] == official["backbone"] + official["head"]


def test_gelan_s_matches_official_converted_keys(fixtures: Path) -> None:
    ref = json.loads((fixtures / "reference" / "yolov9-s-dual-converted-keys.json").read_text())
    model = DetectionModel(config("gelan-s", nc=ref["model_attributes"]["nc"]))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == {
        k: v["shape"] for k, v in ref["state_dict"].items()}
    assert list(model.state_dict()) == list(ref["state_dict"])
