"""The device path on a GPU, in one run (issue #17): what the build machines cannot test.

For a lent GPU machine (the device tool's ``run``), under 5 minutes. It installs nothing: it uses that machine's
own ``python3`` (a CUDA build of torch >= 2.3, onnx, onnxruntime, safetensors, pyyaml, numpy: all there) and reparam
from ``src/`` on ``PYTHONPATH``; the conversion imports neither mlflow nor boto3. Only ``examples/`` is read (not
``tests/fixtures``, 102 MB, more than a device run carries: see "Run" below).

What it does, stopping with exit 1 at the first unexpected result:

1. prints torch, its CUDA device, onnxruntime and its providers;
2. ``reparam convert examples/yolov9-t-dual-best.pt --device cuda --check-device cuda --fuse --format onnx
   --format torchscript``, then prints the report's device, the equivalence check per device, and per artifact
   where its export check ran (``traced_on``, ``device``, onnxruntime ``provider`` and ``provider_reason``);
   expects the validation on ``cuda:N`` (also the fused model), the TorchScript traced and checked there, and the
   ONNX check on ``CUDAExecutionProvider`` when onnxruntime lists it, else on the CPU with the reason;
3. the same with ``--precision export=fp16`` at half the size (fp16 TorchScript traced on the GPU; an fp16 ONNX
   run may only be "not run: no fp16 kernel");
4. loads the CUDA-traced TorchScript back on the GPU (runs) and on the CPU (expected to fail: the trace keeps its
   device, as the summary's usage line says); prints both.

Run (from the repository root; ``--device cpu --imgsz 64 --timeout 600`` runs the same steps on the CPU, as a
smoke test of this script)::

    PYTHONPATH=src python3 bench/gpu_check.py [--device cuda] [--imgsz 640] [--timeout 150] [--out DIR]

With the device tool the checkout must stay under its 64 MiB: in that session, first
``git sparse-checkout set --no-cone '/*' '!/tests/fixtures/'`` (the fixtures are not needed here), then
``run`` with the command above and ``timeout_s`` 300. When ``$OUT`` is set (the device tool's folder of returned
files) the reports are copied there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "yolov9-t-dual-best.pt"


def fail(msg: str) -> None:
    print(f"GPU CHECK FAILED: {msg}", flush=True)
    sys.exit(1)


def convert(out: Path, device: str, timeout: float, *extra: str) -> dict:
    """Run ``reparam convert`` as a user would (a subprocess); returns its report."""
    cmd = [sys.executable, "-m", "reparam.cli", "convert", str(EXAMPLE), "-o", str(out), "--device", device,
           "--check-device", device, "--format", "onnx", "--format", "torchscript", "-q", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        fail(f"convert took more than {timeout:.0f} s (--timeout)")
    print(f"$ reparam {' '.join(cmd[3:])}  ({time.perf_counter() - t:.1f} s, exit {proc.returncode})")
    print(proc.stdout.rstrip())
    if proc.returncode != 0:
        fail(f"convert exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    return json.loads((out / "report.json").read_text())


def show_and_judge(report: dict, device: str, half: bool) -> None:
    """Print where everything ran; fail on anything but the documented outcome."""
    import onnxruntime as ort

    used = report["device"]["used"]
    print(f"device: {report['device']}")
    for d in report["validation"]["devices"]:
        print(f"  equivalence check on {d['used']} ({d['name']}): max |diff| {d['max_abs_diff']:.3g} "
              f"passed={d['passed']}")
    if device.startswith("cuda") and not used.startswith("cuda"):
        fail(f"--device {device} resolved to {used}")
    if not report["validation"]["passed"] or [d["used"] for d in report["validation"]["devices"]] != [used, used]:
        fail("the equivalence check did not pass on the device twice (--device and --check-device)")
    for a in report["artifacts"]:
        c = a.get("check")
        if c is None:
            continue
        runs = [(r["precision"], r["passed"], r.get("reason", "")) for r in c["runs"]]
        print(f"  {a['format']:<12} traced_on={a.get('traced_on')} check device={c.get('device')} "
              f"provider={c.get('provider')} passed={c['passed']} max|diff|={c['max_abs_diff']:.3g}\n"
              f"               reason: {c.get('provider_reason')}\n               runs: {runs}")
        if c["passed"] is not True:
            fail(f"{a['format']} check: {c.get('reason') or c.get('not_run')}")
        if any(p is None and not (kind == "fp16" and "no fp16 kernel on this device" in why)
               for kind, p, why in runs):
            fail(f"{a['format']}: a run did not run for another reason than a missing fp16 kernel")
        if a["format"] == "torchscript" and (a["traced_on"], c["device"]) != (used, used):
            fail(f"TorchScript traced on {a['traced_on']}, checked on {c['device']}, not on {used}")
        if a["format"] == "onnx":
            cuda_ep = used.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
            if cuda_ep and (c["provider"], c["device"]) != ("CUDAExecutionProvider", used):
                print(f"  note: onnxruntime lists CUDAExecutionProvider but the check ran on {c['provider']}")
            if not cuda_ep and c["provider"] != "CPUExecutionProvider":
                fail(f"ONNX check on {c['provider']} without a usable CUDA provider")
    if half and not all(a["dtype"] == "float16" for a in report["artifacts"] if a.get("check")):
        fail("--precision export=fp16 did not write fp16 exports")


def trace_device_probe(path: Path, traced_on: str) -> None:
    """The usage line's claim: a TorchScript file runs on the device it was traced on only."""
    import torch

    for where in dict.fromkeys([traced_on, "cpu"]):
        try:
            m = torch.jit.load(str(path), map_location=where).eval()
            with torch.no_grad():
                y = m(torch.rand(1, 3, 64, 64, device=where).to(next(m.parameters()).dtype))
            print(f"  TorchScript traced on {traced_on}, run on {where}: ok, output {list(y.shape)}")
            if where != traced_on:
                print("  note: it ran on another device than its trace's: the usage line is too strict")
        except Exception as exc:  # noqa: BLE001 - reported, not judged, for the other device
            print(f"  TorchScript traced on {traced_on}, run on {where}: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
            if where == traced_on:
                fail("the TorchScript file does not run on the device it was traced on")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=os.environ.get("DEVICE", "cuda"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/reparam-gpu-check"))
    ap.add_argument("--imgsz", type=int, default=640, help="check size of the fp32 run (the fp16 run: half)")
    ap.add_argument("--timeout", type=float, default=150, help="seconds per conversion")
    args = ap.parse_args()
    t0 = time.perf_counter()
    import onnxruntime as ort
    import torch

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}"
          + (f", {torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}"
             if torch.cuda.is_available() else ""))
    print(f"onnxruntime {ort.__version__}, providers: {ort.get_available_providers()}")
    shutil.rmtree(args.out, ignore_errors=True)
    ret = Path(os.environ["OUT"]) if os.environ.get("OUT") else None

    print(f"\n== fp32 exports, --fuse, {args.imgsz} px")
    report = convert(args.out / "fp32", args.device, args.timeout, "--fuse", "--imgsz", str(args.imgsz))
    show_and_judge(report, args.device, half=False)
    ts = next(a for a in report["artifacts"] if a["format"] == "torchscript")
    trace_device_probe(args.out / "fp32" / ts["name"], ts["traced_on"])

    half_size = str(max(32, args.imgsz // 2))
    print(f"\n== fp16 exports (--precision export=fp16), {half_size} px")
    report16 = convert(args.out / "fp16", args.device, args.timeout, "--precision", "export=fp16", "--imgsz",
                       half_size)
    show_and_judge(report16, args.device, half=True)

    if ret is not None:
        for name in ("fp32", "fp16"):
            shutil.copy(args.out / name / "report.json", ret / f"report-{name}.json")
    print(f"\nGPU CHECK PASSED in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
