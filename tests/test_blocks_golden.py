"""Each of our blocks against the official block's recorded golden I/O (fixtures/golden).

A golden holds the official block's state_dict (randomised BatchNorm statistics), its
input and its eval-mode fp32 output; our block must load the state_dict strictly, have
the same keys and reproduce every output tensor within 1e-5.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import reparam.models as rm
from conftest import fixture_path, missing_fixture
from reparam.models import fuse_model

GOLDEN = fixture_path("golden")
# 1e-5 relative to the tensor's scale (max |ref|, at least 1): every block output is O(1)
# and gets 1e-5 absolute; the heads' decoded boxes are in pixels (up to ~500 here), where
# the last-bit softmax differences between torch builds (DFL, x stride 32) reach 3 ULP (9e-5).
ATOL = 1e-5
FILES = sorted(p.stem for p in GOLDEN.glob("*.json"))
if not FILES:  # an empty parameter list would be a silent skip
    pytest.fail(missing_fixture(GOLDEN / "*.json"), pytrace=False)


def _meta(name: str) -> dict:
    return json.loads((GOLDEN / f"{name}.json").read_text())


def _cls(official: str):
    if official == "torch.nn.modules.upsampling.Upsample":
        return nn.Upsample
    return getattr(rm, official.rsplit(".", 1)[1])


def _build(structure: dict, tensors: dict):
    """Rebuild a nested list/tuple of tensors from a recorded structure."""
    if "tensor" in structure:
        return tensors[structure["tensor"]]
    items = [_build(s, tensors) for s in structure["items"]]
    return tuple(items) if structure["type"] == "tuple" else items


def _flatten(structure: dict, value, out: dict) -> dict:
    """Map each recorded tensor name to the matching tensor of ``value``, checking the nesting."""
    if "tensor" in structure:
        assert isinstance(value, torch.Tensor), f"{structure['tensor']}: expected a tensor, got {type(value)}"
        out[structure["tensor"]] = value
        return out
    kind = tuple if structure["type"] == "tuple" else list
    assert isinstance(value, kind), f"expected {structure['type']}, got {type(value).__name__}"
    assert len(value) == len(structure["items"])
    for s, v in zip(structure["items"], value):
        _flatten(s, v, out)
    return out


def _load(name: str) -> tuple[dict, dict]:
    tensors = load_file(str(GOLDEN / f"{name}.safetensors"))
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    return tensors, state


def _make(meta: dict) -> nn.Module:
    m = _cls(meta["official_class"])(*meta["ctor_args"], **meta["ctor_kwargs"])
    if "stride" in meta:
        m.stride = torch.tensor(meta["stride"])
    return m


def _check_outputs(meta: dict, tensors: dict, module: nn.Module) -> None:
    inp = _build(meta["input_structure"], tensors)
    with torch.no_grad():
        out = module(inp)
    got = _flatten(meta["output_structure"], out, {})
    assert got, "golden records no output"
    for key, ours in got.items():
        ref = tensors[key]
        assert ours.shape == ref.shape, f"{key}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
        tol = ATOL * max(1.0, ref.abs().max().item())
        diff = (ours.float() - ref).abs().max().item()
        assert diff <= tol, f"{key}: max |diff| {diff:.3g} > {tol:.3g}"


@pytest.mark.parametrize("name", FILES)
def test_block_matches_golden(name: str) -> None:
    meta = _meta(name)
    tensors, state = _load(name)
    if name.endswith("_fused"):
        base = name[: -len("_fused")]
        module = _make(_meta(base))
        module.load_state_dict(_load(base)[1], strict=True)
        module.eval()
        n_before = len(list(module.modules()))
        fuse_model(module)
        assert len(list(module.modules())) < n_before
        ours = module.state_dict()
        assert set(ours) == set(state) == set(meta["state_dict_keys"])
        for k, v in state.items():
            assert (ours[k] - v).abs().max().item() <= ATOL, k
        assert sum(p.numel() for p in module.parameters()) == meta["n_params"]
    else:
        module = _make(meta)
        assert set(module.state_dict()) == set(meta["state_dict_keys"])
        module.load_state_dict(state, strict=True)
        module.eval()
        assert sum(p.numel() for p in module.parameters()) == meta["n_params"]
    _check_outputs(meta, tensors, module)


def test_every_golden_is_covered() -> None:
    assert len(FILES) >= 28, f"expected the full golden set, found {len(FILES)} in {GOLDEN}"


def test_fused_model_output_is_stable_under_repeat_fuse() -> None:
    """fuse_model is idempotent: a second call changes nothing."""
    meta = _meta("RepNCSPELAN4")
    tensors, state = _load("RepNCSPELAN4")
    module = _make(meta)
    module.load_state_dict(state)
    module.eval()
    fuse_model(module)
    keys = dict(module.state_dict())
    fuse_model(module)
    assert {k: v.shape for k, v in module.state_dict().items()} == {k: v.shape for k, v in keys.items()}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    inp = _build(meta["input_structure"], tensors)
    with torch.no_grad():
        diff = (module(inp) - tensors["output"]).abs().max().item()
    assert diff <= 1e-4


def test_fold_batchnorm_with_a_conv_bias() -> None:
    """The one BatchNorm fold also keeps a conv bias (YOLOv9's fuse_conv_and_bn does): ``bn(conv(x))`` equals the
    folded conv, and a mismatched BatchNorm is refused."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    kernel, bias = rm.fold_batchnorm(conv.weight, conv.bias, bn)
    x = torch.randn(2, 4, 9, 7)
    with torch.no_grad():
        ref = bn(conv(x))
        got = torch.nn.functional.conv2d(x, kernel, bias, padding=1)
    assert (got - ref).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="BatchNorm2d\\(5\\)"):
        rm.fold_batchnorm(conv.weight, None, nn.BatchNorm2d(5))


@pytest.mark.parametrize("batch, channels, side, chunk_bytes", [
    (1, 64, 64, rm.blocks.CBFUSE_CHUNK_BYTES),  # a few channels per slice
    (2, 7, 24, 6 * 24 * 24 * 4 * 3),            # 3 channels per slice, the last one shorter, two images
    (1, 5, 16, 1),                              # one channel per slice
    (5, 4, 8, 6 * 4 * 8 * 8 * 4 * 2),           # two whole images per slice, the last slice one image
])
def test_cbfuse_in_slices_equals_the_plain_stack(batch: int, channels: int, side: int, chunk_bytes: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """In inference mode CBFuse stacks and sums a few channels of one image at a time (bounded memory); the result
    must be the plain ``stack(...).sum(0)``'s bit for bit, in both memory formats, and with the golden data."""
    monkeypatch.setattr(rm.blocks, "CBFUSE_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(1)
    sides = [side, side // 2, side // 4, side // 8, side]  # five CBLinear outputs (one of the target's size)
    xs: list = [tuple(torch.randn(batch, channels, s, s, generator=g) * 7 for _ in range(2)) for s in sides]
    xs.append(torch.randn(batch, channels, side, side, generator=g))
    fuse = rm.CBFuse([1, 0, 1, 0, 1])
    plain = fuse(xs)  # outside inference mode: the official form
    with torch.inference_mode():
        sliced = fuse(xs)
        last = xs[:-1] + [xs[-1].contiguous(memory_format=torch.channels_last)]
        sliced_cl = fuse(last)
    assert torch.equal(sliced, plain) and torch.equal(sliced_cl, plain)
    assert not torch.equal(plain, torch.stack([xs[-1]] + [xs[-1]]).sum(0))  # the inputs matter: a real comparison
    meta, tensors = _meta("CBFuse"), _load("CBFuse")[0]
    inp = _build(meta["input_structure"], tensors)
    with torch.inference_mode():
        out = rm.CBFuse(*meta["ctor_args"], **meta["ctor_kwargs"])(inp)
    assert torch.equal(out, rm.CBFuse(*meta["ctor_args"], **meta["ctor_kwargs"])(inp))
