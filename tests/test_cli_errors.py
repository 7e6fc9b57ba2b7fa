"""The `reparam` command as a user meets it: the shipped example, inspect, hostile and bad inputs."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from reparam import exitcodes
from reparam.converter.convert import ConvertOptions, build_model, convert
from reparam.converter.official_format import save_official
from reparam.converter.safe_load import load_pickle
from reparam.errors import UnsafeCheckpointError
from reparam.hashing import hash_file

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "yolov9-t-dual-best.pt"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "reparam.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("reparam: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


def test_example_converts_via_cli(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("convert", str(EXAMPLE), "-o", str(out), "--json", "--termination-log", str(tmp_path / "term"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == "succeeded"
    assert report["variant"] == "yolov9-t" and report["nc"] == 3
    assert (out / "yolov9-t-dual-best-converted.pt").is_file()
    assert (out / "yolov9-t-dual-best-converted.safetensors").is_file()
    term = json.loads((tmp_path / "term").read_text())
    assert term["outcome"] == "succeeded" and term["exitCode"] == 0
    assert term["deploySha256"] == report["deploy_sha256"]
    assert term["paramsAfter"] == report["params"]["after"] < term["paramsBefore"]


def test_human_summary(tmp_path: Path) -> None:
    proc = run_cli("convert", str(EXAMPLE), "-o", str(tmp_path / "o"), "-q", "--imgsz", "128")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for word in ("yolov9-t", "DualDDetect -> DDetect", "parameters", "GFLOPs", "MB  sha256", "max |diff|", "passed",
                 "Results saved to"):
        assert word in text


def test_inspect(tmp_path: Path, fixtures: Path) -> None:
    proc = run_cli("inspect", str(fixtures / "ckpt" / "yolov9-t-dual-last.pt"), "--json")
    assert proc.returncode == 0, proc.stderr
    desc = json.loads(proc.stdout)
    assert desc["weights"] == "ema"
    assert desc["nc"] == 3 and desc["names"] == {"0": "red", "1": "green", "2": "blue"}
    assert desc["layers"] == {"dual": 30, "deploy": 23, "dropped": list(range(22, 29)), "pruned": True}
    assert desc["top_level"]["epoch"] == 0 and desc["top_level"]["best_fitness"] == 0.0  # typed, not strings
    assert desc["top_level"]["optimizer"]["state"]["type"] == "dict"
    assert not (tmp_path / "yolov9-t-dual-last-deploy").exists()  # inspect writes nothing


class _Hostile:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_hostile_pickle_is_refused_before_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"model": _Hostile(marker), "epoch": -1}, bad)
    with pytest.raises(UnsafeCheckpointError, match=r"'(posix|os|nt)\.system'"):
        load_pickle(bad)
    assert not marker.exists()
    proc = run_cli("convert", str(bad), "-o", str(tmp_path / "out"))
    assert proc.returncode == exitcodes.INVALID_INPUT
    assert "system" in one_error_line(proc)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_hostile_stack_global_eval_is_refused(tmp_path: Path) -> None:
    # protocol-4 STACK_GLOBAL builtins.eval, hidden inside an otherwise valid torch archive
    marker = tmp_path / "pwned2"
    payload = pickle.dumps({"model": None}, protocol=4)
    evil = (b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c" + bytes([len(f"open('{marker}','w')")])
            + f"open('{marker}','w')".encode() + b"\x85R.")
    path = tmp_path / "evil2.pt"
    buf = io.BytesIO()
    torch.save({"x": 1}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, evil if item.filename.endswith("data.pkl") else src.read(item))
    assert payload  # the plain pickle module works; only our loader is under test
    with pytest.raises(UnsafeCheckpointError, match="builtins.eval"):
        load_pickle(path)
    assert not marker.exists()


def _deploy_like(fixtures: Path, tmp_path: Path, mutate) -> Path:
    """Write a gelan-t checkpoint whose model was changed by ``mutate(model)`` (official format, real weights)."""
    raw = load_pickle(fixtures / "ckpt" / "gelan-t.pt").obj["model"]
    state = dict(raw.named_tensors())
    model = build_model(raw.get("yaml"), raw.get("nc"), raw.get("names"), state)
    mutate(model)
    path = tmp_path / "mutated.pt"
    save_official(model.half(), path)
    return path


@pytest.mark.parametrize(
    "case, expect",
    [
        ("text", "not a PyTorch checkpoint"),
        ("truncated", "truncated"),
        ("missing", "does not exist"),
        ("lightning", "PyTorch Lightning"),
        ("ultralytics", "Ultralytics"),
        ("state_dict", "bare state_dict"),
        ("unknown_block", "unknown block 'FancyBlock'"),
        ("no_head", "cannot find the main detection head"),
        ("nan", "NaN/Inf"),
    ],
)
def test_bad_input_gets_one_clear_line(case: str, expect: str, tmp_path: Path, fixtures: Path) -> None:
    path = tmp_path / f"{case}.pt"
    if case == "text":
        path.write_text("hello, I am not a model\n")
    elif case == "truncated":
        data = (fixtures / "ckpt" / "yolov9-t-dual-best.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "missing":
        path = tmp_path / "nope.pt"
    elif case == "lightning":
        torch.save({"epoch": 3, "global_step": 10, "pytorch-lightning_version": "2.4.0",
                    "state_dict": {"w": torch.zeros(2)}}, path)
    elif case == "ultralytics":
        cls = type("DetectionModel", (torch.nn.Module,), {"__module__": "ultralytics.nn.tasks"})
        sys.modules.setdefault("ultralytics", type(sys)("ultralytics"))
        tasks = type(sys)("ultralytics.nn.tasks")
        tasks.DetectionModel = cls
        sys.modules["ultralytics.nn"] = type(sys)("ultralytics.nn")
        sys.modules["ultralytics.nn.tasks"] = tasks
        try:
            torch.save({"model": cls(), "train_args": {}}, path)
        finally:
            for m in ("ultralytics.nn.tasks", "ultralytics.nn", "ultralytics"):
                sys.modules.pop(m, None)
    elif case == "state_dict":
        torch.save({"model.0.conv.weight": torch.zeros(1)}, path)
    elif case == "unknown_block":
        path = _deploy_like(fixtures, tmp_path, lambda m: m.yaml["head"][3].__setitem__(2, "FancyBlock"))
    elif case == "no_head":
        path = _deploy_like(fixtures, tmp_path, lambda m: m.yaml["head"][-1].__setitem__(2, "Concat"))
    elif case == "nan":
        def poison(m):
            with torch.no_grad():
                m.model[3].cv1.conv.weight[0, 0, 0, 0] = float("nan")
        path = _deploy_like(fixtures, tmp_path, poison)
    out = tmp_path / "out"
    proc = run_cli("convert", str(path), "-o", str(out))
    assert proc.returncode == exitcodes.INVALID_INPUT, proc.stderr
    assert expect in one_error_line(proc)
    assert not out.exists()  # nothing written


def test_failed_validation_leaves_no_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("convert", str(EXAMPLE), "-o", str(out), "--fuse", "--atol", "1e-12", "--imgsz", "128",
                   "--termination-log", str(tmp_path / "term"))
    assert proc.returncode == exitcodes.VALIDATION_FAILED
    assert "validation failed" in one_error_line(proc)
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "validation_failed" and report["validation"]["passed"] is False
    term = json.loads((tmp_path / "term").read_text())
    assert term["outcome"] == "validation_failed" and term["exitCode"] == exitcodes.VALIDATION_FAILED


def test_pickled_format_matches_official_converted_file(tmp_path: Path, fixtures: Path) -> None:
    """Same globals and, module by module, the same instance attributes as the official converted .pt."""
    convert(fixtures / "ckpt" / "yolov9-t-dual-best.pt", tmp_path, ConvertOptions(imgsz=128))
    ours = load_pickle(tmp_path / "yolov9-t-dual-best-converted.pt")
    ref = load_pickle(fixtures / "reference" / "yolov9-t-dual-best-converted.pt")
    assert sorted(ours.globals) == sorted(ref.globals)

    a = dict(ours.obj["model"].named_modules())
    b = dict(ref.obj["model"].named_modules())
    assert list(a) == list(b)
    for name in b:
        assert a[name].cls == b[name].cls, name
        assert set(a[name].state) == set(b[name].state), name
    assert a["model.22"].get("f") == b["model.22"].get("f") == [15, 18, 21]
    assert a[""].get("yaml") == b[""].get("yaml")  # the derived deploy config equals the official gelan-t dict
    assert a["model.22"].get("stride").dtype == b["model.22"].get("stride").dtype


def test_failed_validation_keeps_the_outputs_of_an_earlier_run_and_names_them_stale(tmp_path: Path) -> None:
    """A failed run deletes nothing it did not write: the earlier good deploy files stay byte for byte, and the
    failed report names them as stale (not this run's result)."""
    out = tmp_path / "out"
    assert run_cli("convert", str(EXAMPLE), "-o", str(out), "-q", "--imgsz", "64").returncode == 0
    good = {p.name: hash_file(p)[0] for p in out.glob("*-converted.*")}
    assert sorted(good) == ["yolov9-t-dual-best-converted.pt", "yolov9-t-dual-best-converted.safetensors"]
    (out / "unrelated.txt").write_text("keep me")
    proc = run_cli("convert", str(EXAMPLE), "-o", str(out), "--fuse", "--atol", "1e-12", "--imgsz", "64", "-v")
    assert proc.returncode == exitcodes.VALIDATION_FAILED
    one_error_line(proc)
    assert "2 earlier deploy file(s) kept there, stale" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([*good, "report.json", "unrelated.txt"])
    assert {n: hash_file(out / n)[0] for n in good} == good
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "validation_failed"
    assert report["stale_outputs"] == ["yolov9-t-dual-best-converted.pt", "yolov9-t-dual-best-converted.safetensors"]
    assert "removed_stale_outputs" not in report


def test_directory_sources(tmp_path: Path, fixtures: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("inspect", str(empty))
    assert proc.returncode == exitcodes.INVALID_INPUT and "holds no files" in one_error_line(proc)
    proc = run_cli("inspect", str(fixtures / "ckpt"))
    cands = sorted(p.name for p in (fixtures / "ckpt").glob("*.pt"))
    assert len(cands) >= 2
    assert proc.returncode == exitcodes.INVALID_INPUT
    line = one_error_line(proc)
    shown = ", ".join(repr(c) for c in cands[:3])
    assert f"holds {len(cands)} checkpoints (e.g. {shown}); name one, e.g. {fixtures / 'ckpt'}/{cands[0]}" in line


def test_usage_errors_are_one_line() -> None:
    proc = run_cli("convert", str(EXAMPLE), "--format", "xyz")
    assert proc.returncode == exitcodes.INVALID_INPUT
    assert "invalid choice: 'xyz'" in one_error_line(proc)
    assert "usage:" not in proc.stderr
