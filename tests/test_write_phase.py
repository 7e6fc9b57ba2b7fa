"""The write phase of ``reparam convert`` (issue #16): the official ``.pt`` through the C pickler, the
``.safetensors`` streamed to its file, the checkpoint's own tensors written without a copy.

* ``.pt``: :class:`~reparam.converter.official_format.FastOfficialPickler` (C pickler + renaming of the class
  ``GLOBAL`` opcodes in the finished bytes) writes the very bytes of the pure-Python
  :class:`~reparam.converter.official_format.OfficialNamePickler` (which renames while pickling) on detection and
  segmentation models, deploy and dual; where the renaming is not provably exact (an opcode's bytes also inside a
  string) it falls back to the pure-Python pickler, and a look-alike string stays as it was.
* ``.safetensors``: the header is rewritten in place, or through a temporary file when its length changes, to the
  same bytes the library's in-memory ``save`` + sorted header gave.
* ``write_all``: the fp16 files hold the checkpoint's own tensors (same storage as the deploy weights transferred
  from the checkpoint, no copy); ``--fp32`` files hold their exact upcast.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from reparam.converter import convert as convert_mod
from reparam.converter import official_format
from reparam.converter.artifacts import _sort_metadata, _sorted_header
from reparam.converter.checkpoint import read_checkpoint
from reparam.converter.convert import ConvertOptions, convert, prune
from reparam.converter.official_format import (
    EMPTY_TRAINING_STATE,
    OfficialNamePickler,
    _pickle_module,
    official_names,
    rename_globals,
    save_official,
)
from reparam.converter.safe_load import load_pickle
from reparam.models import Conv, DualDDetect
from reparam.models.published import published_config
from test_segmentation_heads import build, quarter


@pytest.fixture
def fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the dumps of the pure-Python :class:`OfficialNamePickler` (the fallback, and ``fast=False``)."""
    calls: list[int] = []
    real = OfficialNamePickler.dump

    def counted(self, obj):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(self, obj)

    monkeypatch.setattr(OfficialNamePickler, "dump", counted)
    return calls


def _saved(model: torch.nn.Module, *, fast: bool, protocol: int = 2) -> bytes:
    """The archive torch.save writes to a buffer (records under ``archive/``; a file's are under its stem)."""
    buf = io.BytesIO()
    torch.save({"model": model, **EMPTY_TRAINING_STATE}, buf, pickle_module=_pickle_module(fast),
               pickle_protocol=protocol)
    return buf.getvalue()


def _deploy(path: Path) -> torch.nn.Module:
    ckpt = read_checkpoint(path)
    return prune(ckpt.cfg, ckpt.nc, ckpt.names, ckpt.state_dict, fits=ckpt.fits, stride=ckpt.stride).deploy.half()


@pytest.fixture(scope="module")
def t_deploy(fixtures: Path) -> torch.nn.Module:
    return _deploy(fixtures / "ckpt" / "yolov9-t-dual-best.pt")


def test_official_pt_is_the_pure_python_picklers_bytes(fixtures: Path, t_deploy: torch.nn.Module,
                                                       fallbacks: list[int], tmp_path: Path) -> None:
    """The C pickler with renamed globals gives the pure-Python pickler's bytes, and does not fall back: the yolov9-t
    fixture's deploy model and its dual model, gelan-c-dseg (DSegment, passed through) and yolov9-c-dseg
    (DualDSegment, dual); save_official itself writes the same archive as torch.save with the pure-Python one."""
    ckpt = read_checkpoint(fixtures / "ckpt" / "yolov9-t-dual-best.pt")
    t_dual = prune(ckpt.cfg, ckpt.nc, ckpt.names, ckpt.state_dict, fits=ckpt.fits, stride=ckpt.stride).dual
    models = {"yolov9-t deploy": t_deploy, "yolov9-t dual": t_dual}
    for cfg in ("gelan-c-dseg", "yolov9-c-dseg"):
        models[cfg] = build(quarter(published_config(cfg, nc=3))).half().eval()
    for what, model in models.items():
        fast = _saved(model, fast=True)
        assert fallbacks == [], what
        slow = _saved(model, fast=False)
        assert fallbacks == [1], what
        fallbacks.clear()
        assert fast == slow, what
        save_official(model, tmp_path / "archive.pt")
        assert fallbacks == [] and (tmp_path / "archive.pt").read_bytes() == fast, what
        globals_ = load_pickle(tmp_path / "archive.pt").globals
        assert not [g for g in globals_ if g.startswith("reparam")], what
    # the published deploy model's classes, as the official scripts name them
    raw = load_pickle(tmp_path / "archive.pt")
    assert raw.obj["model"].cls == "models.yolo.SegmentationModel"
    assert {"models.common.RepNCSPELAN4", "models.yolo.DualDSegment", "models.common.CBFuse"} <= set(raw.globals)


def test_a_look_alike_string_falls_back_to_the_same_bytes(t_deploy: torch.nn.Module, fallbacks: list[int],
                                                         tmp_path: Path) -> None:
    """A class name holding the bytes of a pickled class's GLOBAL opcode (``c<module>\\n<name>\\n``) makes the
    renaming ambiguous: the pure-Python pickler writes the file (the same bytes as without the fast path) and the
    string is kept as it was. The opcode of a class that is not pickled (DualDDetect, absent from a deploy model)
    in a string is no reason to fall back, and is not renamed either."""
    conv = f"c{Conv.__module__}\nConv\n"
    dual = f"c{DualDDetect.__module__}\nDualDDetect\n"
    saved_names = t_deploy.names
    written = {}
    try:
        for name, fell_back in ((f"x{conv}y", [1]), (dual, [])):
            t_deploy.names = {**saved_names, 0: name}
            fast = _saved(t_deploy, fast=True)
            assert fallbacks == fell_back, name
            assert fast == _saved(t_deploy, fast=False), name
            fallbacks.clear()
            written[name] = fast
    finally:
        t_deploy.names = saved_names
    for i, (name, data) in enumerate(written.items()):
        path = tmp_path / f"{i}.pt"
        path.write_bytes(data)
        raw = load_pickle(path)
        assert raw.obj["model"].get("names")[0] == name  # the look-alike, untouched
        assert "models.common.Conv" in raw.globals and not [g for g in raw.globals if g.startswith("reparam")]


def test_rename_globals_only_where_unambiguous() -> None:
    """Each old opcode must occur exactly once (overlapping matches counted) for the bytes to be renamed."""
    a, b = b"cx.y\nA\n", b"cx.y\nB\n"
    renames = {a: b"cm.c\nA\n", b: b"cm.yolo\nB\n"}
    assert rename_globals(b"\x80\x02" + a + b"q\x00" + b + b".", renames) == \
        b"\x80\x02cm.c\nA\nq\x00cm.yolo\nB\n."
    assert rename_globals(b"\x80\x02" + a + b"X\x05\x00\x00\x00" + b + b".", renames) == \
        b"\x80\x02cm.c\nA\nX\x05\x00\x00\x00cm.yolo\nB\n."
    assert rename_globals(a + a + b, renames) is None  # twice
    assert rename_globals(a, renames) is None  # B missing: not the pickle it claims to be
    periodic = b"ca\nca\n"  # occurs overlapping in b"ca\nca\nca\n"
    assert rename_globals(b"ca\nca\nca\n", {periodic: b"z"}) is None
    assert rename_globals(b"q" + periodic + b"q", {periodic: b"z"}) == b"qzq"


def test_protocol_4_uses_the_pure_python_pickler(t_deploy: torch.nn.Module, fallbacks: list[int]) -> None:
    """Protocols 4 and 5 name classes by memoized strings (STACK_GLOBAL) in frames: no byte renaming there."""
    data = _saved(t_deploy, fast=True, protocol=4)
    assert fallbacks == [1] and b"models.common" in data
    mapping = official_names()
    assert mapping[Conv] == ("models.common", "Conv") and mapping[DualDDetect] == ("models.yolo", "DualDDetect")


def _library_bytes(state: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """The file as the earlier code wrote it: the library's bytes with the sorted header."""
    data = save(state, metadata=meta)
    size = int.from_bytes(data[:8], "little")
    text = _sorted_header(data[8:8 + size])
    return len(text).to_bytes(8, "little") + text + data[8 + size:]


def test_safetensors_header_sorted_in_place_or_through_a_temp_file(tmp_path: Path) -> None:
    """The library's file with its metadata sorted: in place (same header length), and when the header's length
    changes (a header written with spaces) through a temporary file that replaces it; the same bytes as the
    library's in-memory save with a sorted header, readable by the library, no temporary file left."""
    g = torch.Generator().manual_seed(0)
    state = {"b.weight": torch.rand(7, 3, generator=g).half(), "a.bias": torch.rand(5, generator=g),
             "c.n": torch.tensor(3)}
    meta = {"zeta": "1", "alpha": json.dumps({"x": [1, 2]}), "names": json.dumps({"0": "grün"}), "m": "q\"\n"}
    want = _library_bytes(state, meta)
    header = json.loads(want[8:8 + int.from_bytes(want[:8], "little")])
    assert list(header["__metadata__"]) == sorted(meta)

    path = tmp_path / "a.safetensors"
    save_file(state, str(path), metadata=meta)
    _sort_metadata(path)
    assert path.read_bytes() == want

    loose = json.dumps(header, indent=2, ensure_ascii=False).encode()  # the same header, longer
    loose += b" " * (-len(loose) % 8)
    path.write_bytes(len(loose).to_bytes(8, "little") + loose + want[8 + int.from_bytes(want[:8], "little"):])
    _sort_metadata(path)
    assert path.read_bytes() == want
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == meta
    got = load_file(str(path))
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in state.items())


@pytest.fixture
def spied(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """The real pipeline, watched: the Pruned that convert's prune returns and the model save_official writes."""
    seen: dict[str, list] = {"pruned": [], "saved": []}
    real_prune, real_save = convert_mod.prune, official_format.save_official

    def prune_spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen["pruned"].append(real_prune(*args, **kwargs))
        return seen["pruned"][-1]

    def save_spy(model, path):  # type: ignore[no-untyped-def]
        seen["saved"].append({k: (v.data_ptr(), v.dtype) for k, v in model.state_dict().items()})
        return real_save(model, path)

    monkeypatch.setattr(convert_mod, "prune", prune_spy)
    monkeypatch.setattr(official_format, "save_official", save_spy)
    return seen


def test_fp16_files_hold_the_checkpoints_own_tensors(fixtures: Path, tmp_path: Path,
                                                      spied: dict[str, list]) -> None:
    """``reparam convert``'s fp16 deploy model is written from the very tensors transferred from the checkpoint
    (the same storage: no copy); both files hold their values. (A check on another device gives the models their
    own tensors back: the test below.)"""
    source = fixtures / "ckpt" / "yolov9-t-dual-best.pt"
    report = convert(source, tmp_path / "out", ConvertOptions(imgsz=64, device="cpu"))
    assert report.status == "succeeded"
    [pruned], [saved] = spied["pruned"], spied["saved"]
    sd = pruned.deploy_sd
    assert list(saved) == list(sd) and len(sd) > 1000
    assert all(saved[k] == (v.data_ptr(), v.dtype) for k, v in sd.items())
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float16}
    st = load_file(str(tmp_path / "out" / "yolov9-t-dual-best-converted.safetensors"))
    pt = dict(load_pickle(tmp_path / "out" / "yolov9-t-dual-best-converted.pt").obj["model"].named_tensors())
    for k, v in sd.items():
        assert torch.equal(st[k], v) and st[k].dtype == v.dtype, k
        assert torch.equal(pt[k], v) and pt[k].dtype == v.dtype, k


def test_fp32_files_hold_the_exact_upcast(fixtures: Path, tmp_path: Path, spied: dict[str, list]) -> None:
    """With ``--fp32`` the files hold the fp16 checkpoint tensors upcast (exact), written from a copy: the deploy
    weights the checkpoint gave stay fp16 and untouched."""
    source = fixtures / "ckpt" / "yolov9-t-dual-best.pt"
    report = convert(source, tmp_path / "out", ConvertOptions(imgsz=64, fp32=True, device="cpu"))
    assert report.status == "succeeded" and [a.dtype for a in report.artifacts] == ["float32", "float32"]
    [pruned] = spied["pruned"]
    sd = pruned.deploy_sd
    st = load_file(str(tmp_path / "out" / "yolov9-t-dual-best-converted.safetensors"))
    pt = dict(load_pickle(tmp_path / "out" / "yolov9-t-dual-best-converted.pt").obj["model"].named_tensors())
    assert sorted(st) == sorted(sd) and len(sd) > 1000
    for k, v in sd.items():
        want = v.float() if v.is_floating_point() else v
        assert v.dtype in (torch.float16, torch.int64), k
        assert torch.equal(st[k], want) and st[k].dtype == want.dtype, k
        assert torch.equal(pt[k], want) and pt[k].dtype == want.dtype, k
    deploy = pruned.deploy.state_dict()
    assert all(deploy[k].data_ptr() == v.data_ptr() for k, v in sd.items())  # no in-place change of the deploy


def test_a_check_on_another_device_gives_the_models_their_own_tensors_back(fixtures: Path) -> None:
    """:func:`models_on` moves the models away for a check and then puts back the very tensors they held (same
    storage, no copy back): on ``meta`` here, the one non-CPU device every machine has; CUDA takes the same path."""
    from reparam.converter.validation import models_on

    ck = read_checkpoint(fixtures / "ckpt" / "yolov9-t-dual-best.pt")
    pruned = convert_mod.prune(ck.cfg, ck.nc, ck.names, ck.state_dict)
    before = {id(m): {k: v.data_ptr() for k, v in m.state_dict().items()} for m in (pruned.dual, pruned.deploy)}
    stride = pruned.deploy.model[-1].stride
    with models_on("meta", pruned.dual, pruned.deploy):
        assert {v.device.type for v in pruned.deploy.state_dict().values()} == {"meta"}
    for m in (pruned.dual, pruned.deploy):
        assert {k: v.data_ptr() for k, v in m.state_dict().items()} == before[id(m)]
    assert all(v.device.type == "cpu" for v in pruned.deploy.state_dict().values())
    assert pruned.deploy.model[-1].stride.device.type == "cpu" and torch.equal(pruned.deploy.model[-1].stride, stride)
    sd = pruned.deploy_sd
    assert all(pruned.deploy.state_dict()[k].data_ptr() == v.data_ptr() for k, v in sd.items())
