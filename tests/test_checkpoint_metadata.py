"""Mid-training and foreign-packaged checkpoints: numpy metadata, numpy 1.x/2.x paths, vendored package prefixes.

The official training loop (WongKinYiu/yolov9 ``train_dual.py``, the ``ckpt`` dict saved each epoch) stores
``best_fitness`` as a float64 ndarray once a run has any fitness, the optimizer's ``lr``/``momentum`` as numpy
scalars, the training args (``vars(opt)``, with the ``hyp`` dict), ``updates``, ``epoch`` and ``date``. The early
checkpoint of ``fixtures/eval`` is such a file, exactly as saved; the synthetic variants below are byte rewrites
of it (numpy 1.x module paths, a vendored ``yolov9.`` prefix) or new files holding numpy values of other forms.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from reparam import exitcodes
from reparam.converter.checkpoint import read_checkpoint
from reparam.converter.convert import ConvertOptions, build_model, convert
from reparam.converter.inspect import describe
from reparam.converter.official_format import _pickle_module
from reparam.converter.safe_load import load_pickle
from reparam.errors import InvalidInputError, UnsafeCheckpointError
from reparam.evaluation import EvalSettings, evaluate_file
from test_cli_errors import one_error_line, run_cli
from test_evaluation import assert_official


@pytest.fixture(scope="module")
def early(fixtures: Path) -> Path:
    return fixtures / "eval" / "yolov9-t-dual-shapes-early.pt"


@pytest.fixture(scope="module")
def final(fixtures: Path) -> Path:
    return fixtures / "eval" / "yolov9-t-dual-shapes-final.pt"


def rewrite_pickle(src: Path, dst: Path, *replacements: tuple[bytes, bytes]) -> Path:
    """Copy the torch.save archive ``src`` to ``dst`` with byte replacements in its ``data.pkl`` (each must occur)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("/data.pkl"):
                for old, new in replacements:
                    assert old in data, old
                    data = data.replace(old, new)
            zout.writestr(item, data)
    return dst


def raw_pickle_archive(path: Path, payload: bytes) -> Path:
    """A valid torch.save archive whose ``data.pkl`` is ``payload``."""
    buf = io.BytesIO()
    torch.save({"x": 1}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, payload if item.filename.endswith("data.pkl") else src.read(item))
    return path


def test_early_checkpoint_metadata_is_typed(early: Path) -> None:
    desc = describe(early)
    top = desc["top_level"]
    assert list(top) == ["epoch", "best_fitness", "model", "ema", "updates", "optimizer", "opt", "git", "date"]
    assert top["epoch"] == 11 and top["updates"] == 114 and top["git"] is None
    assert top["best_fitness"] == [pytest.approx(0.58861, abs=1e-5)]  # the README's array([0.58861])
    assert top["model"] == top["ema"] == {"type": "models.yolo.DetectionModel", "tensors": 1772,
                                          "elements": 2681093}
    groups = top["optimizer"]["param_groups"]
    assert len(groups) == 3 and all(isinstance(g["momentum"], float) for g in groups)  # numpy float64 -> float
    assert top["optimizer"]["state"] == {"type": "dict", "entries": 897}
    assert top["opt"]["imgsz"] == 160 and top["opt"]["save_period"] == 1 and top["opt"]["hyp"]["lr0"] == 0.01
    assert top["date"].startswith("2026-")
    assert desc["weights"] == "ema" and desc["package_prefix"] == ""
    json.dumps(desc)  # JSON-able throughout
    assert "numpy._core.multiarray._reconstruct" in desc["globals"]


def test_final_checkpoint_metadata(final: Path) -> None:
    top = describe(final)["top_level"]
    assert top["epoch"] == -1
    assert [top[k] for k in ("optimizer", "best_fitness", "ema", "updates")] == [None] * 4
    assert describe(final)["weights"] == "model"


def test_early_converts_with_the_ema(early: Path, tmp_path: Path) -> None:
    report = convert(early, tmp_path, ConvertOptions(imgsz=192)).to_dict()
    assert report["weights_used"] == "ema"
    assert report["ema_vs_raw_max_abs_diff"] == pytest.approx(0.0078125)  # the README's max |diff| 0.0078
    assert report["validation"]["passed"] and report["validation"]["max_abs_diff"] == 0.0
    entries = report["removed"]["checkpoint_entries"]
    assert entries["epoch"] == 11 and entries["updates"] == 114
    assert entries["best_fitness"] == [pytest.approx(0.58861, abs=1e-5)]
    assert entries["opt"] == {"type": "dict", "entries": 43}
    # the deploy weights are the EMA's main-branch tensors, not the raw model's
    ema = read_checkpoint(early)
    raw = read_checkpoint(early, prefer_ema=False)
    deploy = load_pickle(tmp_path / "yolov9-t-dual-shapes-early-converted.pt").obj["model"]
    dsd = dict(deploy.named_tensors())
    key = "model.0.conv.weight"
    assert torch.equal(dsd[key], ema.state_dict[key]) and not torch.equal(dsd[key], raw.state_dict[key])
    # the deploy model's val numbers are the official val.py numbers of the converted EMA (fixtures/eval/README.md)
    deploy_metrics = evaluate_file(tmp_path / "yolov9-t-dual-shapes-early-converted.pt", early.parent,
                                   EvalSettings(imgsz=160)).metrics()
    assert_official(deploy_metrics, "early")
    dual_metrics = evaluate_file(early, early.parent, EvalSettings(imgsz=160)).metrics()
    assert deploy_metrics["map50_95"] == dual_metrics["map50_95"] and deploy_metrics["map50"] == dual_metrics["map50"]


def test_cli_says_the_ema_is_converted(early: Path, tmp_path: Path) -> None:
    proc = run_cli("convert", str(early), "-o", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "the EMA (ckpt['ema'] of a mid-training checkpoint, epoch 11)" in proc.stdout
    assert "differs by up to 0.00781" in proc.stdout


def test_pickle_protocol_4_loads_the_same(early: Path, tmp_path: Path) -> None:
    """A checkpoint saved with ``pickle_protocol=4`` (STACK_GLOBAL, memoized module names) loads like protocol 2:
    the globals scan reads names got back from the memo (it used to pair the wrong strings and refuse the file)."""
    ck = read_checkpoint(early)
    model = build_model(ck.cfg, ck.nc, ck.names, dict(ck.state_dict)).half()
    paths = {}
    for proto in (2, 4):
        paths[proto] = tmp_path / f"proto{proto}.pt"
        torch.save({"model": model, "epoch": -1, "best_fitness": np.array([0.5])}, str(paths[proto]),
                   pickle_module=_pickle_module(), pickle_protocol=proto)
    p2, p4 = load_pickle(paths[2]), load_pickle(paths[4])
    # the same classes and torch/numpy functions (protocol 2 also names __builtin__.set and _codecs.encode for
    # bytes, protocol 4 has opcodes for both)
    def own(found: list[str]) -> set[str]:
        return {g for g in found if not g.startswith(("__builtin__.", "builtins.", "_codecs."))}

    assert own(p4.globals) == own(p2.globals) and len(own(p4.globals)) > 10
    assert "torch._utils._rebuild_tensor_v2" in p4.globals and "models.yolo.DetectionModel" in p4.globals
    a, b = dict(p2.obj["model"].named_tensors()), dict(p4.obj["model"].named_tensors())
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert p4.obj["best_fitness"].tolist() == [0.5] and p4.obj["epoch"] == -1


def test_numpy1_module_paths_load_the_same(early: Path, tmp_path: Path) -> None:
    np1 = rewrite_pickle(early, tmp_path / "np1.pt", (b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    a, b = read_checkpoint(early), read_checkpoint(np1)
    assert "numpy.core.multiarray._reconstruct" in b.globals and "numpy.core.multiarray.scalar" in b.globals
    assert a.top_level == b.top_level
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


@pytest.mark.parametrize("prefix", [b"yolov9."])
def test_vendored_package_prefix_is_accepted_and_reported(early: Path, tmp_path: Path, prefix: bytes) -> None:
    path = rewrite_pickle(early, tmp_path / "vendored.pt", (b"cmodels.common\n", b"c" + prefix + b"models.common\n"),
                          (b"cmodels.yolo\n", b"c" + prefix + b"models.yolo\n"))
    ckpt = read_checkpoint(path)
    assert ckpt.package_prefix == prefix.decode() and ckpt.model_class == "models.yolo.DetectionModel"
    original = read_checkpoint(early).state_dict
    assert list(ckpt.state_dict) == list(original)
    assert all(torch.equal(v, original[k]) for k, v in ckpt.state_dict.items())
    report = convert(path, tmp_path / "out", ConvertOptions(imgsz=128)).to_dict()
    assert report["package_prefix"] == "yolov9." and report["validation"]["max_abs_diff"] == 0.0
    proc = run_cli("inspect", str(path))
    assert proc.returncode == 0 and "under the prefix 'yolov9.'" in proc.stdout


@pytest.mark.parametrize("module, message", [
    (b"evil.models.yolo", "unknown package prefix 'evil.'"),
    (b"xmodels.yolo", "'xmodels.yolo.DetectionModel', which is not allowed"),  # no suffix matching
])
def test_unknown_package_prefix_is_refused(early: Path, tmp_path: Path, module: bytes, message: str) -> None:
    path = rewrite_pickle(early, tmp_path / "foreign.pt", (b"cmodels.yolo\n", b"c" + module + b"\n"))
    with pytest.raises(UnsafeCheckpointError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_pickle(path)
    proc = run_cli("inspect", str(path))
    assert proc.returncode == exitcodes.INVALID_INPUT and message in one_error_line(proc)


def _dual_with_metadata(early: Path, path: Path, **entries: object) -> Path:
    """A checkpoint in the official format holding the early EMA model and the given metadata entries."""
    ck = read_checkpoint(early)
    model = build_model(ck.cfg, ck.nc, ck.names, dict(ck.state_dict)).half()
    torch.save({"model": model, **entries}, str(path), pickle_module=_pickle_module(), pickle_protocol=2)
    return path


def test_numpy_scalars_and_arrays_of_other_forms(early: Path, tmp_path: Path) -> None:
    path = _dual_with_metadata(
        early, tmp_path / "scalars.pt", epoch=np.int64(5), best_fitness=np.float64(0.25), ema=None, updates=np.int32(9),
        optimizer={"param_groups": [{"lr": np.float32(0.5), "betas": (np.float64(0.9), 0.999)}], "state": {}},
        results=np.arange(12, dtype=np.float32).reshape(3, 4), git={"remote": "r", "branch": "main", "commit": "c"},
        date="2026-01-01T00:00:00")
    desc = describe(path)
    top = desc["top_level"]
    assert top["epoch"] == 5 and isinstance(top["epoch"], int)
    assert top["best_fitness"] == 0.25 and top["updates"] == 9
    assert top["optimizer"]["param_groups"][0] == {"lr": 0.5, "betas": [0.9, 0.999]}
    assert top["results"] == {"type": "ndarray", "shape": [3, 4], "dtype": "float32"}
    assert top["git"]["branch"] == "main"
    report = convert(path, tmp_path / "out", ConvertOptions(imgsz=128)).to_dict()
    assert report["validation"]["max_abs_diff"] == 0.0 and report["weights_used"] == "model"


def test_object_array_is_refused(early: Path, tmp_path: Path) -> None:
    path = _dual_with_metadata(early, tmp_path / "objects.pt", best_fitness=np.array([0.5, None], dtype=object))
    with pytest.raises(UnsafeCheckpointError, match="object"):
        load_pickle(path)
    proc = run_cli("convert", str(path), "-o", str(tmp_path / "out"))
    assert proc.returncode == exitcodes.INVALID_INPUT
    assert "object" in one_error_line(proc) and not (tmp_path / "out").exists()


def test_extension_code_goes_through_the_allowlist(tmp_path: Path) -> None:
    """A pickle extension code (EXT1) names a global through copyreg's registry, not a GLOBAL opcode: the unpickler
    resolves it through the allowlist too (the globals are checked as the stream is read, no separate scan)."""
    import copyreg

    path = raw_pickle_archive(tmp_path / "ext.pt", b"\x80\x02\x82\xf0X\x04\x00\x00\x00true\x85R.")
    copyreg.add_extension("os", "system", 240)
    try:
        with pytest.raises(UnsafeCheckpointError, match=r"'os\.system', which is not allowed"):
            load_pickle(path)
    finally:
        copyreg.remove_extension("os", "system", 240)


def test_damaged_pickle_is_one_line(tmp_path: Path) -> None:
    path = raw_pickle_archive(tmp_path / "bad.pt", b"\x80\x02}q\x00(X\x01\x00\x00\x00xq\x01\xff.")
    with pytest.raises(InvalidInputError, match="damaged or truncated"):
        load_pickle(path)


@pytest.mark.parametrize("payload, match", [
    # numpy's _reconstruct with another subtype than ndarray (would construct an arbitrary class)
    (b"\x80\x02cnumpy._core.multiarray\n_reconstruct\nccollections\nOrderedDict\nK\x00\x85U\x01b\x87R.",
     "only numpy.ndarray is allowed"),
    # an array whose BUILD state carries an object dtype built by hand
    (b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
     b"(K\x01K\x01\x85cnumpy\ndtype\nU\x02O8\x85R\x89]q\x00tb.", "only plain numeric dtypes"),
    # numpy.ndarray itself is no callable
    (b"\x80\x02cnumpy\nndarray\nK\x03\x85R.", "could not be unpickled safely"),
])
def test_numpy_globals_run_no_code(tmp_path: Path, payload: bytes, match: str) -> None:
    path = raw_pickle_archive(tmp_path / "np-hostile.pt", payload)
    with pytest.raises(InvalidInputError, match=match):
        load_pickle(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_finite_check_finds_every_non_finite_value(dtype: torch.dtype, bad: float | None) -> None:
    """The load-time NaN/Inf check (one min/max pass per tensor) finds a single bad value anywhere, in every float
    dtype a checkpoint holds, at sizes on both sides of the vectorized kernels' tails."""
    from reparam.converter.checkpoint import _all_finite

    for n in (1, 7, 1000, 100003):
        for where in (0, n // 2, n - 1):
            t = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
            if bad is not None:
                t[where] = bad
            assert _all_finite(t) is (bad is None), (n, where)
    assert _all_finite(torch.empty(0, dtype=dtype))


def test_no_ema_on_an_ema_only_checkpoint_is_one_line(early: Path, tmp_path: Path) -> None:
    """A checkpoint whose 'model' entry is None and whose EMA is the model: the default converts the EMA; --no-ema
    (the raw weights, which the file does not hold) is refused in one line, nothing written."""
    ck = read_checkpoint(early)
    model = build_model(ck.cfg, ck.nc, ck.names, dict(ck.state_dict)).half()
    path = tmp_path / "ema-only.pt"
    torch.save({"model": None, "ema": model, "epoch": 3}, str(path), pickle_module=_pickle_module(),
               pickle_protocol=2)
    assert read_checkpoint(path).weights == "ema"
    with pytest.raises(InvalidInputError, match="holds only the EMA model"):
        read_checkpoint(path, prefer_ema=False)
    proc = run_cli("convert", str(path), "--no-ema", "-o", str(tmp_path / "out"))
    assert proc.returncode == exitcodes.INVALID_INPUT
    assert "convert it without --no-ema" in one_error_line(proc) and not (tmp_path / "out").exists()
