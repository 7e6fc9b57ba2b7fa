"""``--device`` and ``--check-device``: which device the checks and the evaluation compute on, and the report.

Tests run on CPU. Where CUDA is absent (the build machines), ``--device cuda`` must be one line and exit 2 before the
checkpoint is read; where a GPU is lent, the same tests take the CUDA path and check its result (each test asks
torch which case it is in: both branches assert real values, neither is a skip).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reparam import cli, exitcodes
from reparam.converter.device import _cpu_name, resolve_device
from reparam.errors import InvalidInputError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "yolov9-t-dual-best.pt"
CUDA = torch.cuda.is_available()


def test_auto_is_cuda_when_available_else_cpu() -> None:
    dev = resolve_device("auto")
    if CUDA:
        assert (str(dev.torch), dev.name) == ("cuda:0", torch.cuda.get_device_name(0))
    else:
        assert (str(dev.torch), dev.name) == ("cpu", _cpu_name())
    assert resolve_device(None).torch == dev.torch
    cpu = resolve_device("cpu")
    assert cpu.to_dict() == {"requested": "cpu", "used": "cpu", "name": _cpu_name()}
    assert cpu.name and "\n" not in cpu.name


def test_missing_cuda_device_is_refused() -> None:
    count = torch.cuda.device_count() if CUDA else 0
    with pytest.raises(InvalidInputError, match=rf"there is no CUDA device {count}|CUDA is not available here"):
        resolve_device(f"cuda:{count}")
    if not CUDA:
        with pytest.raises(InvalidInputError, match="CUDA is not available here"):
            resolve_device("cuda")
    with pytest.raises(InvalidInputError, match="--device: device 'gpu' is not valid: use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")


def test_cli_device_cuda(tmp_path: Path, capsys) -> None:
    """CUDA absent: one line, exit 2, and nothing written; present: the conversion runs there."""
    out = tmp_path / "out"
    code = cli.main(["convert", str(EXAMPLE), "-o", str(out), "--device", "cuda", "--imgsz", "64", "-q", "--json"])
    cap = capsys.readouterr()
    if not CUDA:
        assert code == exitcodes.INVALID_INPUT
        assert cap.err.splitlines() == [
            f"reparam: error: --device cuda: CUDA is not available here (torch {torch.__version__} "
            + ("is a CPU-only build" if torch.version.cuda is None else "finds no CUDA device (driver or GPU missing)")
            + "); use --device cpu or auto, or run on a GPU node"]
        assert not out.exists()
    else:
        assert code == 0, cap.err
        report = json.loads(cap.out)
        assert report["device"] == {"requested": "cuda", "used": f"cuda:{torch.cuda.current_device()}",
                                    "name": torch.cuda.get_device_name()}
        assert report["validation"]["passed"] and report["validation"]["max_abs_diff"] <= 1e-4


def test_report_names_the_device_and_check_device_runs_again(tmp_path: Path, capsys) -> None:
    """``--check-device`` repeats the equivalence check (plain and fused) there; each device is in the report."""
    code = cli.main(["convert", str(EXAMPLE), "-o", str(tmp_path / "out"), "--imgsz", "64", "--fuse", "--only", "pt",
                     "--check-device", "cpu", "-q"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    auto = resolve_device("auto")
    assert report["device"] == {"requested": "auto", "used": str(auto.torch), "name": auto.name}
    assert report["options"]["device"] == "auto" and report["options"]["check_device"] == "cpu"
    devices = report["validation"]["devices"]
    assert [d["used"] for d in devices] == [str(auto.torch), "cpu"]
    assert all(d["passed"] for d in devices)
    assert report["validation"]["max_abs_diff"] == max(d["max_abs_diff"] for d in devices)
    if not CUDA:  # the same device twice: the same numbers (fused model: fp32 rounding of the folded weights)
        assert devices[0]["max_abs_diff"] == devices[1]["max_abs_diff"] > 0
    assert f"  device       {auto.torch} ({auto.name}); also checked on cpu: max |diff| " in cap.out
    assert report["settings_key"] == _settings_key_without_device(tmp_path, capsys)


def _settings_key_without_device(tmp_path: Path, capsys) -> str:
    """The device does not change the artifacts, so it does not change the idempotency key."""
    code = cli.main(["convert", str(EXAMPLE), "-o", str(tmp_path / "cpu"), "--imgsz", "64", "--fuse", "--only", "pt",
                     "--device", "cpu", "-q"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    report = json.loads((tmp_path / "cpu" / "report.json").read_text())
    assert report["device"]["used"] == "cpu" and [d["used"] for d in report["validation"]["devices"]] == ["cpu"]
    return report["settings_key"]


def test_check_device_cuda_without_cuda(tmp_path: Path, capsys) -> None:
    code = cli.main(["convert", str(EXAMPLE), "-o", str(tmp_path / "out"), "--device", "cpu", "--check-device",
                     "cuda", "--imgsz", "64", "-q"])
    err = capsys.readouterr().err
    if not CUDA:
        assert code == exitcodes.INVALID_INPUT
        assert err.startswith("reparam: error: --check-device cuda: CUDA is not available here") and err.count("\n") == 1
        assert not (tmp_path / "out").exists()
    else:
        assert code == 0, err
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        assert [d["used"] for d in report["validation"]["devices"]] == ["cpu", f"cuda:{torch.cuda.current_device()}"]
        assert all(d["passed"] for d in report["validation"]["devices"])


def test_evaluate_device(fixtures: Path, capsys) -> None:
    """``reparam evaluate --device``: refused at once without CUDA; with CUDA the mAP equals the CPU's."""
    argv = ["evaluate", str(EXAMPLE), "--data", str(fixtures / "eval"), "--imgsz", "160", "--json", "-q"]
    code = cli.main([*argv, "--device", "cuda"])
    cap = capsys.readouterr()
    if not CUDA:
        assert code == exitcodes.INVALID_INPUT
        assert cap.err.startswith("reparam: error: --device cuda: CUDA is not available here")
        assert cap.err.count("\n") == 1 and cap.out == ""
    else:
        assert code == 0, cap.err
        assert cli.main([*argv, "--device", "cpu"]) == 0
        cpu = json.loads(capsys.readouterr().out)["evaluation"]["dual"]["map50_95"]
        assert abs(json.loads(cap.out)["evaluation"]["dual"]["map50_95"] - cpu) <= 1e-3
