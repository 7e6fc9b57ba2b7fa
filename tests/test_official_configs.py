"""Every published YOLOv9 / GELAN detection config (package data, reparam/models/configs) builds and runs (the
segmentation and yolov9-cf configs: tests/test_segmentation_heads.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reparam.models import DDetect, DetectionModel, DualDDetect
from reparam.models.published import published_config, published_names, resolve_config


NC = 3
#: the published detection configs with a DualDDetect / DDetect head
DETECTION = [f"{p}-{v}" for p in ("gelan", "yolov9") for v in "cemst"]
#: the other published configs: segmentation (DualDSegment / DSegment / Segment) and yolov9-cf (TripleDDetect)
OTHER_HEADS = ["gelan-c-dseg", "gelan-c-seg", "yolov9-c-dseg", "yolov9-cf"]


def test_published_names() -> None:
    assert published_names() == sorted(DETECTION + OTHER_HEADS)


@pytest.mark.parametrize("name", DETECTION)
def test_config_builds_and_runs(name: str) -> None:
    torch.manual_seed(0)
    model = DetectionModel(published_config(name, nc=NC)).eval()
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
    ours = published_config(name, nc=official["nc"])
    assert {**ours, "ch": 3} == official  # every key, the backbone/head split included


def test_cfg_spec_rule(tmp_path: Path) -> None:
    """--cfg: an existing file wins, else a bare published name (with or without .yaml); anything else errs."""
    from reparam.errors import InvalidInputError

    assert resolve_config("yolov9-c").source == "published:yolov9-c"
    assert resolve_config("yolov9-c.yaml").yaml_file == "yolov9-c.yaml"
    own = tmp_path / "yolov9-c.yaml"
    own.write_text("nc: 2\ndepth_multiple: 1.0\nwidth_multiple: 1.0\nbackbone: []\nhead: []\n")
    assert resolve_config(own).source == str(own) and resolve_config(own).cfg["nc"] == 2
    with pytest.raises(InvalidInputError, match="neither a config file nor a published config"):
        resolve_config(tmp_path / "nope" / "yolov9-c.yaml")
    with pytest.raises(InvalidInputError, match="neither a config file nor a published config"):
        resolve_config("yolov9-x")
    (tmp_path / "bad.yaml").write_text("nc: [1\n")
    with pytest.raises(InvalidInputError, match="not valid YAML at line"):
        resolve_config(tmp_path / "bad.yaml")
    (tmp_path / "partial.yaml").write_text("nc: 2\nbackbone: []\n")
    with pytest.raises(InvalidInputError, match="lacks depth_multiple, width_multiple, head"):
        resolve_config(tmp_path / "partial.yaml")


def test_gelan_s_matches_official_converted_keys(fixtures: Path) -> None:
    ref = json.loads((fixtures / "reference" / "yolov9-s-dual-converted-keys.json").read_text())
    model = DetectionModel(published_config("gelan-s", nc=ref["model_attributes"]["nc"]))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == {
        k: v["shape"] for k, v in ref["state_dict"].items()}
    assert list(model.state_dict()) == list(ref["state_dict"])


def test_cli_help_names_the_shipped_configs() -> None:
    """The --cfg help lists the published configs without importing torch; it must name exactly the shipped ones."""
    from reparam.cli import build_parser

    parser = build_parser()
    convert = parser._subparsers._group_actions[0].choices["convert"]  # type: ignore[union-attr]
    help_text = next(a.help for a in convert._actions if "--cfg" in a.option_strings)
    assert "yolov9-t/s/m/c/e, gelan-t/s/m/c/e, yolov9-cf, yolov9-c-dseg, gelan-c-dseg, gelan-c-seg" in help_text
    assert set(published_names()) == {f"{family}-{v}" for family in ("yolov9", "gelan") for v in "tsmce"} | {
        "yolov9-cf", "yolov9-c-dseg", "gelan-c-dseg", "gelan-c-seg"}
