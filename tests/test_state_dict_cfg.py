"""Bare state_dicts (issue 9.3): bounded error lines, and `reparam convert weights.pt --cfg NAME|FILE`.

State_dicts are made from the real fixture checkpoints' main models, saved the ways forks and scripts save them;
converting them with the right config must give the very deploy file the original checkpoint gives.
"""

from __future__ import annotations

import hashlib
from importlib import resources
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from reparam import exitcodes
from reparam.cli import error_line, main
from reparam.converter.checkpoint import read_checkpoint
from reparam.converter.convert import ConvertOptions, convert
from reparam.converter.safe_load import load_pickle
from reparam.errors import MAX_ERROR_CHARS, InvalidInputError
from test_cli_errors import one_error_line, run_cli


def _main_state_dict(fixtures: Path, ckpt: str) -> "OrderedDict[str, torch.Tensor]":
    """The checkpoint's main model as ``model.state_dict()`` gives it (``model.<i>.<name>`` -> tensor)."""
    model = load_pickle(fixtures / "ckpt" / f"{ckpt}.pt").obj["model"]
    return OrderedDict((k, v.detach()) for k, v in model.named_tensors())


def _save(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


class _Proc:
    """What :func:`run_in_process` returns: the fields of ``subprocess.CompletedProcess`` the tests read."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_in_process(capsys, *args: str) -> _Proc:
    """``reparam ARGS`` through the CLI's own ``main`` (same printer, no interpreter start-up per case)."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    got = capsys.readouterr()
    return _Proc(code, got.out, got.err)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- bounded error lines --------------------------------------------------------------------------------------

def test_error_line_bound_and_cut() -> None:
    assert error_line("short\n  message") == "reparam: error: short message"
    for n in (260, 284, 285, 300, 301, 999, 99_999):
        line = error_line("cause first: " + "x" * n)
        assert len(line) <= MAX_ERROR_CHARS and "\n" not in line
        assert line.startswith("reparam: error: cause first: ")
        full = len("reparam: error: cause first: ") + n
        if full > MAX_ERROR_CHARS:
            kept = line.index("... [")
            assert line.endswith(f"... [{full - kept:,} more characters; rerun with -v for all of it]")
        else:
            assert len(line) == full


def test_bare_state_dict_error_is_one_bounded_line(tmp_path: Path, fixtures: Path) -> None:
    sd = _save(_main_state_dict(fixtures, "yolov9-t-dual-best"), tmp_path / "weights.pt")
    assert {g.split(".")[0] for g in load_pickle(sd).globals} <= {"torch", "collections"}  # nothing else pickled
    out = tmp_path / "out"
    proc = run_cli("convert", str(sd), "-o", str(out))
    assert proc.returncode == exitcodes.INVALID_INPUT
    line = one_error_line(proc)
    assert len(line) <= MAX_ERROR_CHARS, len(line)
    assert line.startswith("reparam: error: bare state_dict without a model config: give its architecture with "
                           "--cfg")
    assert "1,772 tensors (e.g. 'model.0.conv.weight')" in line
    # besides the progress lines of the steps that ran ("reading the checkpoint ..."), the line is all there is
    from reparam.converter.convert import STEPS

    others = [ln for ln in proc.stderr.splitlines() if ln != line]
    assert others and all(ln.startswith(f"reparam: {STEPS['load']}") for ln in others), proc.stderr
    assert others[-1].startswith(f"reparam: {STEPS['load']}: failed after ")
    assert not out.exists()


def test_big_inputs_give_bounded_cause_first_lines(tmp_path: Path, fixtures: Path, capsys) -> None:
    def run_cli(*args: str) -> _Proc:
        return run_in_process(capsys, *args)

    # 5,000 top-level entries that are no model
    junk = _save({f"entry{i}": i for i in range(5000)}, tmp_path / "junk.pt")
    line = one_error_line(run_cli("inspect", str(junk)))
    assert line.startswith("reparam: error: no YOLOv9 model in ") and "5,000 top-level keys" in line
    assert len(line) <= MAX_ERROR_CHARS

    # 3,000 keys a model would not expect, a pickle-named block of 5,000 characters
    state = _main_state_dict(fixtures, "yolov9-t-dual-best")
    extra = _save({**state, **{f"model.5.extra{i}.weight": torch.zeros(1) for i in range(3000)}},
                  tmp_path / "extra.pt")
    proc = run_cli("convert", str(extra), "--cfg", "yolov9-t", "-o", str(tmp_path / "o1"), "--imgsz", "64")
    line = one_error_line(proc)
    assert line.startswith("reparam: error: the state_dict's weights do not fit --cfg yolov9-t: "
                           "3,000 unexpected (e.g. 'model.5.extra0.weight')"), line
    assert len(line) <= MAX_ERROR_CHARS

    cfg = resources.files("reparam.models").joinpath("configs", "yolov9-t.yaml").read_text()
    long_block = tmp_path / "long-block.yaml"
    long_block.write_text(cfg.replace("[-1, 1, AConv, [64]],  # 3", f"[-1, 1, {'Fancy' * 1000}, [64]],  # 3"))
    proc = run_cli("convert", str(tmp_path / "extra.pt"), "--cfg", str(long_block), "-o", str(tmp_path / "o2"))
    line = one_error_line(proc)
    assert line.startswith("reparam: error: unknown block 'FancyFancy"), line
    assert len(line) <= MAX_ERROR_CHARS

    # a path longer than the bound: the printer cuts, -v gives the whole message
    deep = tmp_path.joinpath(*["d" * 120] * 3) / "missing.pt"
    proc = run_cli("inspect", str(deep), "-v")
    line = one_error_line(proc)
    assert len(line) <= MAX_ERROR_CHARS and line.endswith("more characters; rerun with -v for all of it]")
    assert line.startswith("reparam: error: checkpoint '")
    assert f"reparam: the whole message: checkpoint '{deep}' does not exist" in proc.stderr


# --- --cfg: the same deploy model as from the training checkpoint ----------------------------------------------

def test_plain_state_dict_with_published_cfg_gives_the_same_deploy_file(tmp_path: Path, fixtures: Path) -> None:
    ckpt = fixtures / "ckpt" / "yolov9-t-dual-best.pt"
    opts = ConvertOptions(imgsz=64)
    ref = convert(ckpt, tmp_path / "from-ckpt", opts).to_dict()

    sd = _save(_main_state_dict(fixtures, "yolov9-t-dual-best"), tmp_path / "sd" / ckpt.name)  # same stem
    got = convert(sd, tmp_path / "from-sd",
                  ConvertOptions(imgsz=64, cfg="yolov9-t", names=("red", "green", "blue"))).to_dict()
    assert got["status"] == "succeeded" and got["validation"]["max_abs_diff"] == 0.0
    assert got["deploy_sha256"] == ref["deploy_sha256"]  # the .pt, byte for byte
    assert got["state_dict"] == {
        "format": "state_dict", "entry": "file", "key_prefix": "model.", "config": "published:yolov9-t",
        "config_name": "yolov9-t", "nc_from": "weights", "names_from": "--names",
        "notes": ["config nc=80 overridden by the weights' nc=3"]}
    assert (got["variant"], got["nc"], got["stride"]) == ("yolov9-t", 3, [8.0, 16.0, 32.0])
    # safetensors: same tensors and metadata (its metadata order is not stable between runs, so not the bytes)
    a = safe_open(str(tmp_path / "from-sd" / "yolov9-t-dual-best-converted.safetensors"), "pt")
    b = safe_open(str(tmp_path / "from-ckpt" / "yolov9-t-dual-best-converted.safetensors"), "pt")
    assert a.metadata() == b.metadata()
    assert list(a.keys()) == list(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    # a different settings key than without --cfg (idempotent registration tells them apart)
    assert got["settings_key"] != ref["settings_key"]


def test_wrapped_state_dict_with_user_yaml_via_cli(tmp_path: Path, fixtures: Path) -> None:
    ckpt = fixtures / "ckpt" / "yolov9-c-quarter-dual.pt"
    yaml_file = fixtures / "configs" / "yolov9-c-quarter.yaml"
    ref = convert(ckpt, tmp_path / "from-ckpt", ConvertOptions(imgsz=64)).to_dict()
    state = {f"module.{k}": v for k, v in _main_state_dict(fixtures, "yolov9-c-quarter-dual").items()}
    sd = _save({"model": state, "epoch": 7}, tmp_path / "sd" / ckpt.name)  # DataParallel keys under 'model'
    out = tmp_path / "from-sd"
    proc = run_cli("convert", str(sd), "--cfg", str(yaml_file), "--names", "car,truck,bus,bike,person",
                   "-o", str(out), "--imgsz", "64", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["deploy_sha256"] == ref["deploy_sha256"] == _sha(out / "yolov9-c-quarter-dual-converted.pt")
    assert report["state_dict"]["entry"] == "model" and report["state_dict"]["key_prefix"] == "module.model."
    assert report["state_dict"]["notes"] == []  # the yaml says nc: 5, as the weights
    assert report["variant"] == "yolov9-c-quarter" and report["layers"] == ref["layers"]
    assert report["removed"]["checkpoint_entries"] == {"epoch": 7}  # typed, as inspect shows it


@pytest.mark.parametrize("entry, prefix", [("state_dict", "model.model."), (None, ""), (None, "_orig_mod.model.")])
def test_state_dict_layouts_read_the_same(entry, prefix, tmp_path: Path, fixtures: Path) -> None:
    state = _main_state_dict(fixtures, "gelan-t")
    renamed = {prefix + k.removeprefix("model."): v for k, v in state.items()}
    sd = _save({entry: renamed} if entry else renamed, tmp_path / "w.pt")
    got = read_checkpoint(sd, cfg="gelan-t")
    assert list(got.state_dict) == list(state)
    assert all(torch.equal(got.state_dict[k], state[k]) for k in state)
    assert (got.nc, got.names, got.origin["key_prefix"]) == (3, {0: "class0", 1: "class1", 2: "class2"}, prefix)


# --- mismatches: each one line, count and example -------------------------------------------------------------

@pytest.mark.parametrize("case, args, expect", [
    ("gelan_as_dual", ["--cfg", "yolov9-t"],
     "state_dict does not fit --cfg yolov9-t: no head class conv model.29.cv3.0.2.bias (the config's head is layer "
     "29, the state_dict's last layer is 22)"),
    ("missing", ["--cfg", "gelan-t"], "the state_dict's weights do not fit --cfg gelan-t: 2 missing (e.g. "
                                      "'model.3.cv1.conv.weight'); 1 unexpected (e.g. 'model.3.cv1.conv.weigth')"),
    ("other_shape", ["--cfg", "gelan-s"], "the state_dict's weights do not fit --cfg gelan-s: "),
    ("nc", ["--cfg", "gelan-t", "--nc", "80"],
     "--nc 80 contradicts the weights: the head's class conv model.22.cv3.0.2.bias has 3 outputs"),
    ("names", ["--cfg", "gelan-t", "--names", "a,b"], "--names gives 2 names, the weights have nc=3"),
    ("full_ckpt", ["--cfg", "gelan-t"], "--cfg is for a bare state_dict, but"),
    ("prefix", ["--cfg", "gelan-t"], "state_dict key prefix 'backbone.' is not a model wrapper's"),
    ("no_cfg_nc", ["--nc", "3"], "--nc and --names are for a bare state_dict and need --cfg"),
    ("unknown_cfg", ["--cfg", "yolov9-x"], "--cfg 'yolov9-x' is neither a config file nor a published config"),
])
def test_mismatches_are_named(case, args, expect, tmp_path: Path, fixtures: Path, capsys) -> None:
    state = _main_state_dict(fixtures, "gelan-t")
    path = tmp_path / "w.pt"
    if case == "missing":
        state["model.3.cv1.conv.weigth"] = state.pop("model.3.cv1.conv.weight")
        del state["model.3.cv1.bn.bias"]
    elif case == "full_ckpt":
        path = fixtures / "ckpt" / "gelan-t.pt"
    elif case == "prefix":
        state = {"backbone." + k.removeprefix("model."): v for k, v in state.items()}
    if path.name == "w.pt":
        _save(state, path)
    out = tmp_path / "out"
    proc = run_in_process(capsys, "convert", str(path), *args, "-o", str(out), "--imgsz", "64")
    assert proc.returncode == exitcodes.INVALID_INPUT, proc.stderr
    line = one_error_line(proc)
    assert line.startswith("reparam: error: " + expect), line
    assert len(line) <= MAX_ERROR_CHARS
    assert not out.exists()
    if case == "other_shape":
        assert "of another shape (e.g. 'model.0.conv.weight': [16, 3, 3, 3] vs [32, 3, 3, 3])" in line


def test_state_dict_without_a_head_class_conv_is_refused_before_building(fixtures: Path, tmp_path: Path) -> None:
    state = _main_state_dict(fixtures, "gelan-t")
    state.pop("model.22.cv3.0.2.bias")
    with pytest.raises(InvalidInputError, match="no head class conv model.22.cv3.0.2.bias"):
        read_checkpoint(_save(state, tmp_path / "w.pt"), cfg="gelan-t")
