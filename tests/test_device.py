"""``--device`` and ``--check-device``: which device the checks and the evaluation compute on, and the report.

Tests run on CPU. Where CUDA is absent (the build machines), ``--device cuda`` must be one line and exit 2 before the
checkpoint is read; where a GPU is lent, the same tests take the CUDA path and check its result (each test asks
torch which case it is in: both branches assert real values, neither is a skip). The device rule itself
(:func:`choose_device`, :func:`export_placement`: which device, which onnxruntime provider) is pure and tested with
tables holding both the CUDA and the CPU cases, so every branch runs on every machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import report_schema
from reparam import cli, exitcodes
from reparam import report as report_mod
from reparam.converter.convert import ConvertOptions
from reparam.converter.device import (_cpu_name, choose_device, export_placement, onnx_placement,
                                      resolve_device)
from reparam.converter.export.onnx_graph import OnnxRunner
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
        assert err.startswith("reparam: error: --check-device cuda: CUDA is not available here")
        assert err.count("\n") == 1
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


# --- the device rule, pure: both branches (CUDA present and absent) run on every machine -------------------------

CPU_EP, CUDA_EP, AZURE_EP = "CPUExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider"


@pytest.mark.parametrize("requested, cuda_count, current, expected", [
    ("auto", 0, 0, "cpu"),
    ("auto", 2, 1, "cuda:0"),  # auto is device 0, as YOLOv9's select_device('')
    ("cpu", 2, 0, "cpu"),
    ("cuda", 2, 1, "cuda:1"),  # a bare cuda is torch's current device
    ("cuda:1", 2, 0, "cuda:1"),
    ("cuda:2", 2, 0, "--device cuda:2: there is no CUDA device 2 (this machine has 2: cuda:0..cuda:1)"),
    ("cuda", 0, 0, "--device cuda: CUDA is not available here; use --device cpu or auto, or run on a GPU node"),
    ("cuda:0", 0, 0, "--device cuda:0: CUDA is not available here; use --device cpu or auto, or run on a GPU node"),
    ("gpu", 1, 0, "--device: device 'gpu' is not valid: use auto, cpu, cuda or cuda:N"),
])
def test_choose_device_table(requested: str, cuda_count: int, current: int, expected: str) -> None:
    if expected.startswith("--device"):
        with pytest.raises(InvalidInputError) as err:
            choose_device(requested, cuda_count, current)
        assert str(err.value) == expected
    else:
        assert choose_device(requested, cuda_count, current) == expected


def test_resolve_device_is_choose_device_with_what_torch_reports() -> None:
    count = torch.cuda.device_count() if CUDA else 0
    for requested in ("auto", "cpu", *(["cuda", "cuda:0"] if CUDA else [])):
        assert str(resolve_device(requested).torch) == choose_device(
            requested, count, torch.cuda.current_device() if CUDA else 0)


NO_CUDA_EP = ("the conversion device is cuda:0 but this onnxruntime has no CUDAExecutionProvider (it has: "
              "AzureExecutionProvider, CPUExecutionProvider); install onnxruntime-gpu to check ONNX files on the GPU")


@pytest.mark.parametrize("requested, cuda_count, ort, torchscript, providers, provider, onnx_device, reason", [
    # no GPU: everything on the CPU, whatever onnxruntime offers
    ("auto", 0, [AZURE_EP, CPU_EP], "cpu", (CPU_EP,), CPU_EP, "cpu", "the conversion device is the CPU"),
    ("auto", 0, [CUDA_EP, CPU_EP], "cpu", (CPU_EP,), CPU_EP, "cpu", "the conversion device is the CPU"),
    # a GPU, and onnxruntime-gpu: both checks there (TF32 off, as the torch checks)
    ("auto", 1, [CUDA_EP, CPU_EP], "cuda:0", ((CUDA_EP, {"device_id": 0, "use_tf32": 0}), CPU_EP), CUDA_EP,
     "cuda:0", "the conversion device is cuda:0"),
    ("cuda:1", 2, [CUDA_EP, CPU_EP], "cuda:1", ((CUDA_EP, {"device_id": 1, "use_tf32": 0}), CPU_EP), CUDA_EP,
     "cuda:1", "the conversion device is cuda:1"),
    # a GPU, but the CPU onnxruntime package: TorchScript on the GPU, ONNX on the CPU and the report says why
    ("cuda", 1, [AZURE_EP, CPU_EP], "cuda:0", (CPU_EP,), CPU_EP, "cpu", NO_CUDA_EP),
    # --device cpu on a GPU machine: the CPU for both
    ("cpu", 1, [CUDA_EP, CPU_EP], "cpu", (CPU_EP,), CPU_EP, "cpu", "the conversion device is the CPU"),
])
def test_export_placement_table(requested, cuda_count, ort, torchscript, providers, provider, onnx_device,
                                reason) -> None:
    place = export_placement(requested, cuda_count, ort)
    assert place.torchscript == torchscript
    assert (place.onnx.providers, place.onnx.provider, place.onnx.device, place.onnx.reason) == (
        providers, provider, onnx_device, reason)


def test_onnx_fallback_is_recorded_from_what_the_session_ran_on() -> None:
    """onnxruntime runs a listed provider that cannot start on the next one with a warning only: the check records
    the provider the session reports, not the one asked for (real onnxruntime, a tiny graph)."""
    import io

    import onnxruntime as ort

    conv = torch.nn.Conv2d(3, 4, 1).eval()
    buf = io.BytesIO()
    torch.onnx.export(conv, torch.zeros(1, 3, 8, 8), buf, dynamo=False)
    place = onnx_placement("cuda:0", [CUDA_EP, CPU_EP])  # what a GPU node with onnxruntime-gpu would choose
    runner = OnnxRunner(buf.getvalue(), place.providers)
    assert runner.used is None
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((runner(x)[0] - conv(x)).abs().max()) <= 1e-5
    can_run_cuda = CUDA and CUDA_EP in ort.get_available_providers()
    if not can_run_cuda:  # this machine: the CUDA provider is not there, the session ran on the CPU
        assert runner.used == [CPU_EP]
        assert place.ran_on(runner.used[0]) == (
            CPU_EP, "cpu", "CUDAExecutionProvider was asked for on cuda:0 but did not start (onnxruntime fell back "
            "to CPUExecutionProvider; check the CUDA and cuDNN libraries onnxruntime-gpu needs)")
    else:
        assert runner.used is not None and runner.used[0] in (CUDA_EP, CPU_EP)
        assert place.ran_on(runner.used[0])[1] == ("cuda:0" if runner.used[0] == CUDA_EP else "cpu")
    assert place.ran_on(None) == (CUDA_EP, "cuda:0", "the conversion device is cuda:0")  # no session: the plan
    assert place.ran_on(CUDA_EP) == (CUDA_EP, "cuda:0", "the conversion device is cuda:0")


def test_torchscript_trace_device_enters_the_settings_key_only_when_cuda() -> None:
    ts = dict(formats=("pt", "torchscript"), imgsz=64)
    cpu_key = ConvertOptions(**ts, device="cpu").settings_key()
    assert ConvertOptions(formats=("pt",), device="cpu").settings_key() == ConvertOptions(
        formats=("pt",), device="auto").settings_key()  # no TorchScript: the device changes no artifact
    if not CUDA:
        assert ConvertOptions(**ts, device="auto").settings_key() == cpu_key  # auto is the CPU here
        with pytest.raises(InvalidInputError, match="--device cuda: CUDA is not available here"):
            ConvertOptions(**ts, device="cuda").settings_key()
    else:  # a CUDA-traced file is another artifact: another key
        assert ConvertOptions(**ts, device="cuda:0").settings_key() != cpu_key
        cuda_key = ConvertOptions(**ts, device="cuda:0").settings_key()
        assert ConvertOptions(**ts, device="auto").settings_key() == cuda_key


def test_export_checks_run_on_the_conversion_device(tmp_path: Path, capsys) -> None:
    """TorchScript traced and checked on --device (auto), ONNX on the provider the placement rule picks; the
    report, the TorchScript's own metadata and the summary say where."""
    import onnxruntime as ort

    out = tmp_path / "out"
    code = cli.main(["convert", str(EXAMPLE), "-o", str(out), "--imgsz", "64", "--only", "onnx", "--only",
                     "torchscript"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    report = report_schema.check(json.loads((out / "report.json").read_text()), "device export report")
    arts = {a["format"]: a for a in report["artifacts"]}
    place = export_placement("auto", torch.cuda.device_count() if CUDA else 0, ort.get_available_providers())
    ts, onnx_check = arts["torchscript"], arts["onnx"]["check"]
    if not CUDA:  # this machine: all on the CPU, and the report says why
        assert (ts["traced_on"], ts["check"]["device"]) == ("cpu", "cpu")
        assert (onnx_check["provider"], onnx_check["device"], onnx_check["provider_reason"]) == (
            "CPUExecutionProvider", "cpu", "the conversion device is the CPU")
        assert onnx_check["runtime"] == f"onnxruntime {ort.__version__} CPUExecutionProvider"
        assert ts["check"]["runtime"] == f"torch {torch.__version__} (torch.jit.load on cpu)"
    assert ts["traced_on"] == ts["check"]["device"] == place.torchscript == report["device"]["used"]
    assert (onnx_check["provider"], onnx_check["device"]) in {(place.onnx.provider, place.onnx.device),
                                                              ("CPUExecutionProvider", "cpu")}
    assert ts["check"]["passed"] is True and onnx_check["passed"] is True
    untraced = json.loads(json.dumps(report))
    del next(a for a in untraced["artifacts"] if a["format"] == "torchscript")["traced_on"]
    assert "'traced_on' is a required property" in (report_schema.problem(untraced) or "")
    extra = {"config.txt": ""}
    torch.jit.load(str(out / ts["name"]), map_location=ts["traced_on"], _extra_files=extra)
    assert json.loads(extra["config.txt"])["device"] == ts["traced_on"]
    typed = report_mod.Report.from_dict(report)
    assert typed.artifact("torchscript").traced_on == ts["traced_on"]
    assert typed.artifact("onnx").check_provider == (onnx_check["provider"], onnx_check["provider_reason"])
    lines = cap.out.splitlines()
    ts_line = next(ln for ln in lines if ln.startswith("  torchscript "))
    assert ts_line.endswith(f"check passed (max |diff| {ts['check']['max_abs_diff']:.3g}) on {ts['traced_on']}")
    onnx_line = next(ln for ln in lines if ln.startswith("  onnx "))
    assert onnx_line.endswith(f" on {onnx_check['device']} ({onnx_check['provider']})" if onnx_check["device"]
                              == report["device"]["used"] else
                              f" on cpu ({onnx_check['provider']}: {onnx_check['provider_reason']})")
    usage = next(ln for ln in lines if ln.startswith(f"  {ts['name']} "))
    if not CUDA:
        assert usage.endswith(f"torch.jit.load('{out / ts['name']}'); traced on the CPU: CPU inputs only (convert "
                              "with --device cuda for a GPU file)")
    else:
        assert f"map_location='{ts['traced_on']}'); traced on {ts['traced_on']}: loads and runs on CUDA only" in usage
    # the evaluation runs the ONNX file by the same placement rule as the check (reparam evaluate --device)
    from reparam.evaluation.backends import load_model

    onnx_file = out / arts["onnx"]["name"]
    assert load_model(onnx_file, device="cpu").runtime == "onnxruntime CPUExecutionProvider on cpu"
    on_gpu = load_model(onnx_file, device="cuda:0")  # onnxruntime is not asked to start CUDA without its provider
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        reason = onnx_placement("cuda:0", ort.get_available_providers()).reason
        assert on_gpu.runtime == f"onnxruntime CPUExecutionProvider on cpu ({reason})"
        y = on_gpu.predict(torch.zeros(1, 3, 64, 64))
        assert isinstance(y, torch.Tensor) and tuple(y.shape[:2]) == (1, 4 + len(on_gpu.names))


def test_summary_of_a_cuda_conversion_without_onnxruntime_gpu() -> None:
    """What a GPU node with the CPU onnxruntime package prints (the typed report of such a run, as the converter
    writes it): the TorchScript says it runs on CUDA only, the ONNX line says where its check ran and why."""
    onnx_art = report_mod.Artifact.from_dict({
        "name": "m-converted.onnx", "format": "onnx", "bytes": 4_090_000, "sha256": "ab" * 32, "path": "/o/m.onnx",
        "dtype": "float32", "check": {"passed": True, "max_abs_diff": 1.2e-4, "device": "cpu",
                                      "provider": CPU_EP, "provider_reason": NO_CUDA_EP}})
    ts_art = report_mod.Artifact.from_dict({
        "name": "m-converted.torchscript", "format": "torchscript", "bytes": 5_930_000, "sha256": "cd" * 32,
        "path": "/o/m.torchscript", "dtype": "float32", "traced_on": "cuda:0",
        "check": {"passed": True, "max_abs_diff": 0.0, "device": "cuda:0"}})
    assert cli._artifact_line(onnx_art, "cuda:0").endswith(
        f"check passed (max |diff| 0.00012) on cpu (CPUExecutionProvider: {NO_CUDA_EP})")
    assert cli._artifact_line(onnx_art, "cpu").endswith("check passed (max |diff| 0.00012) on cpu "
                                                        "(CPUExecutionProvider)")
    assert cli._artifact_line(ts_art, "cuda:0").endswith("check passed (max |diff| 0) on cuda:0")
    assert cli._usage(ts_art) == ("torch.jit.load('/o/m.torchscript', map_location='cuda:0'); traced on cuda:0: "
                                  "loads and runs on CUDA only, inputs on cuda:0 (convert with --device cpu for a "
                                  "CPU file)")
    assert isinstance(ts_art, report_mod.TorchScriptArtifact) and ts_art.traced_on == "cuda:0"
    assert not hasattr(onnx_art, "traced_on")  # only a TorchScript file has a trace device


def test_evaluate_refuses_a_torchscript_of_another_device(tmp_path: Path, fixtures: Path, capsys) -> None:
    """A TorchScript trace keeps its device: a file traced on cuda:0 is refused on the CPU in one line (exit 2),
    on any machine (the trace device is read from the file's own metadata)."""
    from reparam.converter.checkpoint import read_checkpoint
    from reparam.converter.convert import prune
    from reparam.converter.export import Predictions, export_metadata

    ck = read_checkpoint(EXAMPLE)
    deploy = prune(ck.cfg, ck.nc, ck.names, ck.state_dict).deploy.float().eval()
    traced = torch.jit.trace(Predictions(deploy), torch.zeros(1, 3, 64, 64), check_trace=False, strict=False)
    report = report_mod.Report(status="succeeded", source=report_mod.Source(uri=str(EXAMPLE)),
                               validation=report_mod.Validation(passed=True, max_abs_diff=0.0))
    meta = {**export_metadata(deploy, report, 64), "device": "cuda:0"}  # as a CUDA trace records it
    path = tmp_path / "gpu.torchscript"
    torch.jit.save(traced, str(path), _extra_files={"config.txt": json.dumps(meta)})
    code = cli.main(["evaluate", str(path), "--data", str(fixtures / "eval"), "--imgsz", "64", "--device", "cpu",
                     "-q"])
    cap = capsys.readouterr()
    assert code == exitcodes.INVALID_INPUT and cap.out == ""
    assert cap.err.splitlines() == [
        f"reparam: error: '{path}' was traced on cuda:0 and runs there only (a TorchScript trace keeps its device): "
        "evaluate it with --device cuda:0, or convert again with --device cpu for a TorchScript file of that device"]
