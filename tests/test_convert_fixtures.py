"""Every shared fixture checkpoint converts and reproduces the official conversion.

For each checkpoint the deploy state_dict must equal ``reference/<ckpt>-converted-keys.json`` key by key (shape,
dtype, sha256 of the bytes) and the deploy output on ``reference/input-640.safetensors`` must equal the official
converted model's ``converted.y`` (and the dual model's main branch ``dual.y_main``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from reparam.converter.artifacts import load_safetensors
from reparam.converter.convert import ConvertOptions, convert
from config_layers import normalized_layers
from reparam.converter.safe_load import load_pickle

DUAL = ["yolov9-t-dual-best", "yolov9-t-dual-last", "yolov9-c-quarter-dual"]
ALL = DUAL + ["gelan-t"]


@pytest.fixture(scope="module")
def converted(fixtures: Path, tmp_path_factory: pytest.TempPathFactory):
    """Convert each fixture once (lazily) with default options; name -> (out_dir, report)."""
    cache: dict[str, tuple[Path, dict]] = {}

    def get(name: str) -> tuple[Path, dict]:
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            report = convert(fixtures / "ckpt" / f"{name}.pt", out, ConvertOptions(imgsz=256)).to_dict()
            cache[name] = (out, report)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def image(fixtures: Path) -> torch.Tensor:
    return load_file(str(fixtures / "reference" / "input-640.safetensors"))["input"]


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("name", DUAL)
def test_state_dict_reproduces_official_conversion(name: str, converted, fixtures: Path) -> None:
    out, report = converted(name)
    ref = json.loads((fixtures / "reference" / f"{name}-converted-keys.json").read_text())
    raw = load_pickle(out / f"{name}-converted.pt")
    assert list(raw.obj) == ref["checkpoint_top_level_keys"]
    for key, desc in ref["checkpoint_top_level"].items():
        if "value" in desc:
            assert raw.obj[key] == desc["value"], key
    model = raw.obj["model"]
    assert model.cls == ref["model_attributes"]["class"] == "models.yolo.DetectionModel"
    assert model.get("nc") == ref["model_attributes"]["nc"]
    assert {str(k): v for k, v in model.get("names").items()} == ref["model_attributes"]["names"]
    assert model.get("stride").tolist() == ref["model_attributes"]["stride"]
    assert model.get("training") is False
    sd = dict(model.named_tensors())
    assert list(sd) == list(ref["state_dict"])  # same keys, same order
    mismatched = [
        k for k, d in ref["state_dict"].items()
        if list(sd[k].shape) != d["shape"] or str(sd[k].dtype).replace("torch.", "") != d["dtype"]
        or _sha(sd[k]) != d["sha256"]
    ]
    assert mismatched == []
    assert report["tensors"]["deploy"] == ref["n_state_dict_keys"]
    assert report["tensors"]["used_exactly_once"] is True
    assert report["validation"]["passed"] is True
    assert report["validation"]["max_abs_diff"] == 0.0  # same weights, same graph: bit-identical main output


@pytest.mark.parametrize("name", ALL)
def test_deploy_output_equals_reference(name: str, converted, fixtures: Path, image: torch.Tensor) -> None:
    out, _report = converted(name)
    io = load_file(str(fixtures / "reference" / f"{name}-io.safetensors"))
    model = load_safetensors(out / f"{name}-converted.safetensors")
    with torch.no_grad():
        y = model(image)[0]
    assert y.shape == io["converted.y"].shape
    assert float((y - io["converted.y"]).abs().max()) <= 1e-4
    if "dual.y_main" in io:
        assert float((y - io["dual.y_main"]).abs().max()) <= 1e-4
        # and the auxiliary branch really is something else
        assert float((y - io["dual.y_aux"]).abs().max()) > 1e-2


def test_mid_training_checkpoint_uses_ema(converted, fixtures: Path) -> None:
    _out, report = converted("yolov9-t-dual-last")
    assert report["weights_used"] == "ema"
    assert report["ema_vs_raw_max_abs_diff"] == pytest.approx(4.9e-4, rel=0.2)
    removed = report["removed"]["checkpoint_entries"]
    assert {"optimizer", "ema", "updates", "opt"} <= set(removed)
    # the EMA was deployed: the raw weights are what was left out
    assert removed["model"]["type"] == "models.yolo.DetectionModel"
    assert removed["model"]["tensors"] == report["tensors"]["dual"]
    assert removed["model"]["elements"] > report["params"]["before"]  # the dual model's parameters and buffers
    assert report["bytes"]["saved"] == report["bytes"]["before"] - report["bytes"]["after"] > 10_000_000


def test_gelan_passes_through_unpruned(converted) -> None:
    _out, report = converted("gelan-t")
    assert report["pruned"] is False
    assert report["layers"]["dual"] == report["layers"]["deploy"] == 23
    assert report["layers"]["dropped"] == []
    assert report["params"]["before"] == report["params"]["after"]


def test_custom_config_matches_its_deploy_config(converted, fixtures: Path) -> None:
    _out, report = converted("yolov9-c-quarter-dual")
    official = yaml.safe_load((fixtures / "configs" / "gelan-c-quarter.yaml").read_text())
    assert normalized_layers(report["deploy_config"]) == normalized_layers(official)
    # the official offsets for c-style graphs: deploy i <- dual i+1 (Silence dropped), head 22 <- 38
    assert report["layers"]["map"]["0"] == 1 and report["layers"]["map"]["22"] == 38
    assert report["names"] == {"0": "car", "1": "truck", "2": "bus", "3": "bike", "4": "person"}


def test_report_records_sizes_and_artifacts(converted) -> None:
    out, report = converted("yolov9-t-dual-best")
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["status"] == "succeeded"
    assert on_disk["deploy_sha256"] == report["deploy_sha256"]
    names = sorted(a["name"] for a in report["artifacts"])
    assert names == ["yolov9-t-dual-best-converted.pt", "yolov9-t-dual-best-converted.safetensors"]
    for a in report["artifacts"]:
        p = out / a["name"]
        assert p.stat().st_size == a["bytes"]
        assert hashlib.sha256(p.read_bytes()).hexdigest() == a["sha256"]
    assert report["params"]["after"] < report["params"]["before"]
    assert 0 < report["gflops"]["after"] < report["gflops"]["before"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["report.json"])  # no staging left


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_canonical_zeros_turns_only_negative_zeros(dtype: torch.dtype) -> None:
    """-0.0 becomes +0.0 in place (the official notebook's ``w -= w; w += v`` does the same); every other value, the
    most negative finite one and -inf included, keeps its bits; a tensor without -0.0 is left untouched."""
    from reparam.converter.transfer import canonical_zeros

    info = torch.finfo(dtype)
    t = torch.tensor([-0.0, 0.0, -1.5, info.min, -info.tiny, float("-inf"), 2.0, -0.0], dtype=dtype)
    before = t.clone()
    assert canonical_zeros(t) is t
    width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    assert t.view(width).tolist() == [0, 0, *before.view(width).tolist()[2:7], 0]
    clean = before[1:7].clone()
    bits = clean.view(width).clone()
    canonical_zeros(clean)
    assert torch.equal(clean.view(width), bits)
    assert canonical_zeros(torch.empty(0, dtype=dtype)).numel() == 0
