"""What a user sees: the summary, progress, report order, exit codes and messages (issue 17: 3, 5, 6, 7)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import report_schema
from reparam import exitcodes, spec
from reparam import report as report_mod

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "yolov9-t-dual-best.pt"


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "reparam.cli", *args], capture_output=True, text=True, env=full,
                          cwd=cwd, timeout=600)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [ln for ln in proc.stderr.splitlines() if "error:" in ln]


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> dict:
    """The example converted by the CLI with --fuse, as a user runs it (summary on stdout, progress on stderr)."""
    out = tmp_path_factory.mktemp("fused") / "out"
    argv = ["convert", str(EXAMPLE), "-o", str(out), "--fuse", "--imgsz", "128"]
    proc = run_cli(*argv)
    assert proc.returncode == 0, proc.stderr
    return {"proc": proc, "out": out, "argv": argv, "report": json.loads((out / "report.json").read_text())}


def test_report_leads_with_status_command_versions_artifacts(fused) -> None:
    report = fused["report"]
    assert list(report)[:4] == ["status", "command", "versions", "artifacts"]
    assert report["status"] == "succeeded"
    assert report["command"] == ["reparam", *fused["argv"]]
    from importlib import metadata

    assert report["versions"]["torch"] == metadata.version("torch")
    assert report["versions"]["reparam"] == metadata.version("reparam")
    assert list(report)[-1] == "deploy_config"
    text = (fused["out"] / "report.json").read_text()
    # the top-level key (indent 2); "published" names the published config it was compared with under the same key
    config_lines = [ln for ln in text.splitlines() if ln.startswith('  "deploy_config"')]
    assert len(config_lines) == 1 and json.loads("{" + config_lines[0] + "}")["deploy_config"] == report["deploy_config"]
    assert len(text.splitlines()) < 300  # was ~450, most of it the pretty-printed config
    report_schema.check(report, "fused report")


def test_fused_comparisons_explain_the_top_level_max(fused) -> None:
    v = fused["report"]["validation"]
    by_model = {m: [c["max_abs_diff"] for c in v["comparisons"] if c["model"] == m] for m in ("deploy", "fused")}
    assert len(by_model["deploy"]) == len(by_model["fused"]) == 2
    assert max(by_model["deploy"]) == 0.0  # pruning copies weights: exact
    assert 0 < max(by_model["fused"]) == v["max_abs_diff"] == fused["report"]["fusion"]["max_abs_diff_vs_dual"]


def test_summary_compares_like_with_like_and_says_how_to_use_each_artifact(fused) -> None:
    out, report, text = fused["out"], fused["report"], fused["proc"].stdout
    assert "saved" not in text.split("Results saved")[0]  # no "saved N bytes" across formats
    for a in report["artifacts"]:
        f = out / a["name"]
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(a["format"] + " "))
        assert f"{f.stat().st_size / 1e6:.2f} MB" in line
        assert hashlib.sha256(f.read_bytes()).hexdigest()[:12] in line
        assert "exact copy of the validated weights" in line
    assert f"Results saved to {out}" in text
    assert f"python detect.py --weights {out / 'yolov9-t-dual-best-converted.pt'}" in text
    assert f"load_safetensors('{out / 'yolov9-t-dual-best-converted.safetensors'}')" in text
    assert report["bytes"] == {"before": EXAMPLE.stat().st_size, "after": report["artifacts"][0]["bytes"],
                               "saved": EXAMPLE.stat().st_size - report["artifacts"][0]["bytes"]}


def test_progress_names_each_step_with_its_duration(fused) -> None:
    err = fused["proc"].stderr.splitlines()
    from reparam.converter.convert import STEPS

    for what in STEPS.values():
        start = err.index(f"reparam: {what} ...")
        done = next(i for i, ln in enumerate(err) if ln.startswith(f"reparam: {what}: done in "))
        assert done > start
        assert float(err[done].split("done in ")[1].removesuffix(" s")) >= 0
    assert not fused["proc"].stderr.count("Results saved")  # the results go to stdout


def test_json_keeps_stdout_pure_and_onnx_has_no_cross_format_bytes(tmp_path: Path) -> None:
    proc = run_cli("convert", str(EXAMPLE), "-o", str(tmp_path / "o"), "--format", "onnx", "--imgsz", "128", "--json")
    assert proc.returncode == 0, proc.stderr
    report = report_schema.check(json.loads(proc.stdout), "--json onnx report")  # stdout is nothing but the JSON
    assert "reparam: writing the artifacts ..." in proc.stderr
    onnx = [a for a in report["artifacts"] if a["format"] == "onnx"]
    assert onnx and onnx[0]["check"]["passed"] is True
    if not any(a["format"] == "pt" for a in report["artifacts"]):  # --format replaced the defaults
        assert report["bytes"] is None  # a .pt source is not compared with an ONNX file
    typed = report_mod.Report.from_dict(report)
    assert typed.artifact("onnx").check_passed is True


def test_gelan_checkpoint_is_passed_through(tmp_path: Path, fixtures: Path) -> None:
    proc = run_cli("convert", str(fixtures / "ckpt" / "gelan-t.pt"), "-o", str(tmp_path / "o"), "--imgsz", "128",
                   "-q")
    assert proc.returncode == 0, proc.stderr
    assert "already a deploy model (no auxiliary branch): passed through" in proc.stdout
    assert "larger" not in proc.stdout


def test_failed_validation_report_validates(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("convert", str(EXAMPLE), "-o", str(out), "--fuse", "--atol", "1e-12", "--imgsz", "64")
    assert proc.returncode == exitcodes.VALIDATION_FAILED
    report = report_schema.check(json.loads((out / "report.json").read_text()), "failed report")
    assert list(report)[:3] == ["status", "command", "versions"] and report["status"] == "validation_failed"
    assert report_mod.Report.from_dict(report).validation.passed is False


def test_schema_formats_are_the_spec_formats() -> None:
    s = report_mod.schema()
    assert tuple(s["$defs"]["artifact"]["properties"]["format"]["enum"]) == spec.FORMATS
    assert tuple(s["properties"]["status"]["enum"]) == report_mod.STATUSES
    assert report_schema.problem({"status": "succeeded", "source": {"uri": "x"},
                                  "validation": {"passed": "yes", "max_abs_diff": 0}}) is not None


def test_wrong_sha256_of_a_local_file_is_a_permanent_integrity_error(tmp_path: Path) -> None:
    wrong = "0" * 64
    proc = run_cli("convert", str(EXAMPLE), "-o", str(tmp_path / "o"), "--sha256", wrong,
                   "--termination-log", str(tmp_path / "term"))
    assert proc.returncode == exitcodes.INTEGRITY_ERROR == 6
    [line] = error_lines(proc)
    assert f"not the pinned --sha256 {wrong}" in line and hashlib.sha256(EXAMPLE.read_bytes()).hexdigest() in line
    term = json.loads((tmp_path / "term").read_text())
    assert (term["outcome"], term["reason"], term["exitCode"]) == ("failed", "IntegrityError", 6)
    assert exitcodes.INTEGRITY_ERROR in exitcodes.PERMANENT  # the Job's podFailurePolicy fails it at once
    assert exitcodes.SOURCE_ERROR not in exitcodes.PERMANENT
    assert not (tmp_path / "o").exists()


def test_missing_file_is_reported_before_torch_is_imported(tmp_path: Path) -> None:
    code = ("import sys, time; t = time.perf_counter(); from reparam.cli import main; "
            "rc = main(['convert', 'no-such.pt']); "
            "print(rc, 'torch' in sys.modules, time.perf_counter() - t)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    rc, torch_loaded, seconds = proc.stdout.split()
    assert (int(rc), torch_loaded) == (exitcodes.INVALID_INPUT, "False")
    assert error_lines(proc) == ["reparam: error: checkpoint 'no-such.pt' does not exist (no such file)"]
    assert float(seconds) < 2.0  # torch alone takes seconds to import; without it this is milliseconds
    proc = run_cli("inspect", "no-such.pt", cwd=tmp_path)
    assert proc.returncode == exitcodes.INVALID_INPUT and len(error_lines(proc)) == 1


def test_operator_without_a_cluster_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO / "src"))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "reparam.cli", "operator"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert time.perf_counter() - t < 30
    assert proc.returncode == exitcodes.INVALID_INPUT
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [ln for ln in lines if ln.startswith("reparam operator: error: no Kubernetes API")] and len(lines) == 1
    (tmp_path / "kubeconfig").write_text("apiVersion: v1\nkind: Config\n")  # no current context
    proc = subprocess.run([sys.executable, "-m", "reparam.cli", "operator"], capture_output=True, text=True,
                          env={**env, "KUBECONFIG": str(tmp_path / "kubeconfig")}, timeout=60)
    assert proc.returncode == exitcodes.INVALID_INPUT
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()][0].startswith(
        "reparam operator: error: cannot read the kubeconfig")


def test_inspect_says_parameters_and_buffers(fused) -> None:
    proc = run_cli("inspect", str(EXAMPLE), "--json")
    desc = json.loads(proc.stdout)
    assert desc["parameters"] == fused["report"]["params"]["before"] == 2_660_066  # what convert counts
    assert desc["parameters"] + desc["buffer_elements"] == desc["elements"] == 2_681_093
    text = run_cli("inspect", str(EXAMPLE)).stdout
    assert "2,660,066 parameters (what convert counts) + 21,027 BatchNorm statistics = 2,681,093 numbers" in text
    assert desc["top_level"]["epoch"] == -1 and desc["top_level"]["ema"] is None  # typed, not "-1" / "None"
    removed = fused["report"]["removed"]["checkpoint_entries"]
    assert removed["opt"] == {"type": "dict", "entries": 43}
