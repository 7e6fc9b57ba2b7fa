"""Orchestration: write and check the ONNX / TorchScript artifacts a conversion asks for."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ... import report as report_mod
from ...models.blocks import Conv
from ...errors import InvalidInputError, ValidationFailedError
from .nms import NMSHead
from ..device import onnx_placement, resolve_device
from ..validation import main_output, sample_inputs, strict_fp32
from .checks import OnDevice, max_diff, outputs_of, run_checks, to_cpu
from .modules import EndToEnd, Predictions, check_export_target, deploy_head, export_metadata
from .onnx_graph import INPUT_NAME, OnnxRunner, export_onnx, quiet, upcast_onnx, with_nms_inputs
from .options import ExportOptions
from .torchscript import export_torchscript

if TYPE_CHECKING:
    from ..convert import ConvertOptions

__all__ = ["export_all"]


def _dtype_name(half: bool) -> str:
    return "float16" if half else "float32"


def _verdict(check: dict[str, Any]) -> str:
    if check["passed"] is None:
        return "NOT RUN"
    word = "passed" if check["passed"] else "FAILED"
    return word + (f" ({len(check['not_run'])} fp16 run(s) not run: no fp16 kernel)" if check.get("not_run") else "")


def _batchnorm_folded(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``Conv``'s BatchNorm folded into its conv in fp32 (:meth:`Conv.fuse`), and
    nothing else merged (a ``RepConvN`` keeps its two branches): the arithmetic of the ONNX graph, whose exporter
    folds Conv+BatchNorm (torch.onnx's eval-mode peephole) and keeps the rest as traced."""
    folded = copy.deepcopy(model)
    for module in folded.modules():
        if isinstance(module, Conv):
            module.fuse()
    return folded


def export_all(export_model: nn.Module, dual: nn.Module | None, stage: Path, stem: str, options: "ConvertOptions",
               report: report_mod.Report, say: Callable[[str], None]) -> list[report_mod.Artifact]:
    """Write and check the ONNX / TorchScript artifacts that ``options.formats`` asks for, into ``stage``.

    Args:
        export_model: the deploy model (fp32, eval; fused with ``--fuse``); head must be ``DDetect``.
        dual: the dual model (fp32, eval) or None; only used to report the artifact's distance to its main branch.
        stage: staging folder; stem: checkpoint stem for the file names.
        options: conversion options (``formats``, ``half``, ``imgsz``, ``seed``, ``device``; export settings through
            :meth:`ExportOptions.from_convert`). The TorchScript file is traced and checked on ``device``; the ONNX
            check runs on onnxruntime's CUDA provider when ``device`` is CUDA and onnxruntime has it, else on the CPU
            (:func:`reparam.converter.device.onnx_placement`; the check records ``device``, ``provider`` and
            ``provider_reason``).
        report: the report so far (read for metadata; ``report.timing`` gets ``export_*_s``).
        say: progress logger.

    Returns:
        :class:`~reparam.report.OnnxArtifact` / :class:`~reparam.report.TorchScriptArtifact` (sha256/bytes/path
        are added by the caller); ONNX ones hold ``input``/``inputs`` and ``outputs`` with their declared shapes
        (names for symbolic axes), TorchScript ones ``traced_on`` (the device the trace ran on and the only one it
        runs on).

    Raises:
        InvalidInputError: ``export_model`` is not a deploy model, or bad options.
        ValidationFailedError: an artifact's check failed (``err.report`` is the report with the failed check).
    """
    eo = ExportOptions.from_convert(options)
    eo.check(tuple(options.formats))
    if export_model is dual:
        raise InvalidInputError("export got the dual model; export starts from the deploy model")
    deploy_head(export_model)
    check_export_target(export_model, tuple(options.formats), bool(eo.nms))
    atol = float(eo.export_atol)
    half = bool(options.half)
    device = resolve_device(options.device).torch  # the same rule, the same answer as the validation's
    model = copy.deepcopy(export_model).float().eval()
    stride = int(max(torch.as_tensor(model.stride).tolist()))
    inputs = sample_inputs(options.imgsz, stride, options.seed)
    sample = inputs[0]
    predict = Predictions(model)
    # the torch reference of a --half artifact: the same fp16-rounded weights, computed in fp32. A TorchScript trace
    # keeps each BatchNorm, so its weights are rounded apart from the conv's; the ONNX exporter folds every
    # Conv+BatchNorm in fp32 before the graph is converted to fp16, so its reference is folded first too
    # (:func:`_batchnorm_folded`), else an unfused model's check would measure the two roundings' difference
    reference = copy.deepcopy(predict).half().float() if half else predict
    onnx_reference = Predictions(_batchnorm_folded(model)).half().float() if half else predict

    def references(where: str, ref: nn.Module = reference) -> tuple[nn.Module, nn.Module]:
        """The torch reference ``ref`` of a check and the fp32 model (rounding report), computing on ``where``."""
        ref32 = OnDevice(predict, where)
        return (ref32 if ref is predict else OnDevice(ref, where)), ref32

    timings = report.timing
    arts: list[report_mod.Artifact] = []
    with torch.no_grad():
        dual_main = {tuple(x.shape): main_output(dual(x)) for x in inputs} if dual is not None else {}

    if "onnx" in options.formats:
        t = time.perf_counter()
        import onnxruntime as ort

        nms = eo.nms_settings()
        module: nn.Module = predict
        if nms:
            module = EndToEnd(predict, NMSHead(eo.iou_thres, eo.score_thres, eo.max_det, eo.multi_label))
        name = f"{stem}-converted{'-end2end' if nms else ''}.onnx"
        path = stage / name
        say(f"exporting ONNX (opset {eo.opset}, {'dynamic' if eo.dynamic else 'static ' + str(list(sample.shape))}"
            f"{', NMS ' + nms['semantics'] if nms else ''}{', fp16' if half else ''}) -> {name}")
        try:
            proto = export_onnx(module, path, sample, opset=eo.opset, dynamic=eo.dynamic, half=half,
                                metadata=export_metadata(model, report, int(sample.shape[-1]), options=eo))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidInputError(f"ONNX export failed at opset {eo.opset}: {str(exc).splitlines()[0][:300]}; "
                                    f"try the default --opset {ExportOptions.opset}") from None
        checked = inputs if eo.dynamic else [sample]
        runnable = with_nms_inputs(proto, eo.multi_label) if nms else proto
        as_stored = runnable.SerializeToString()
        place = onnx_placement(str(device), ort.get_available_providers())
        fp32_run = OnnxRunner(upcast_onnx(runnable).SerializeToString() if half else as_stored, place.providers)
        fp16_run: Callable[[torch.Tensor], Any] | None = None
        if half:
            as_fp16 = OnnxRunner(as_stored, place.providers)
            fp16_run = lambda x: as_fp16(x.half())  # noqa: E731
        ref, ref32 = references(place.device, onnx_reference)
        check = run_checks("onnx", fp32_run, fp16_run, ref, checked, atol, half=half, fp32_model=ref32,
                           nms=eo if nms else None, where=f"{place.device}, {place.provider}")
        used, where, why = place.ran_on((fp32_run.used or [None])[0])
        check.update({"runtime": f"onnxruntime {ort.__version__} {used}", "provider": used, "device": where,
                      "provider_reason": why})
        if not nms and not half and dual_main:
            check["vs_dual_max_abs_diff"] = max(max_diff(fp32_run(x)[0], dual_main[tuple(x.shape)])
                                                for x in checked)
        shape = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
        arts.append(report_mod.OnnxArtifact(
            name=name, format="onnx", dtype=_dtype_name(half), opset=eo.opset, dynamic=eo.dynamic, nms=nms,
            input=INPUT_NAME, inputs=[{"name": v.name, "shape": shape(v)} for v in proto.graph.input],
            outputs=[{"name": v.name, "shape": shape(v)} for v in proto.graph.output], check=check))
        timings["export_onnx_s"] = time.perf_counter() - t
        say(f"ONNX export and check: max |diff| {check['max_abs_diff']:.3g} (atol {atol:g}) -> {_verdict(check)} "
            f"(done in {timings['export_onnx_s']:.1f} s)")
        _fail_if(check, "ONNX", report)

    if "torchscript" in options.formats:
        t = time.perf_counter()
        name = f"{stem}-converted.torchscript"
        path = stage / name
        say(f"exporting TorchScript (trace on {device}{', fp16' if half else ''}) -> {name}")
        export_torchscript(predict, path, sample, half=half, device=device,
                           metadata=export_metadata(model, report, int(sample.shape[-1])))
        loaded = torch.jit.load(str(path), map_location=device).eval()  # checked on the device it was traced on
        ts16: Callable[[torch.Tensor], Any] | None = None

        def on_device(module: Any) -> Callable[[torch.Tensor], Any]:
            def run(x: torch.Tensor) -> Any:
                with strict_fp32():
                    return to_cpu(module(x.to(device)))
            return run

        if half:
            ts32 = on_device(quiet(lambda: copy.deepcopy(loaded).float()))
            ts16 = on_device(lambda x: loaded(x.half()))
        else:
            ts32 = on_device(loaded)
        ref, ref32 = references(str(device))
        check = run_checks("torchscript", ts32, ts16, ref, inputs, atol, half=half, fp32_model=ref32,
                           where=str(device))
        check.update({"runtime": f"torch {torch.__version__} (torch.jit.load on {device})", "device": str(device)})
        if not half and dual_main:
            with torch.no_grad():
                check["vs_dual_max_abs_diff"] = max(max_diff(outputs_of(ts32(x))[0], dual_main[tuple(x.shape)])
                                                    for x in inputs)
        arts.append(report_mod.TorchScriptArtifact(name=name, format="torchscript", dtype=_dtype_name(half),
                                                   input=INPUT_NAME, traced_on=str(device), check=check))
        timings["export_torchscript_s"] = time.perf_counter() - t
        say(f"TorchScript export and check: max |diff| {check['max_abs_diff']:.3g} (atol {atol:g}) -> "
            f"{_verdict(check)} (done in {timings['export_torchscript_s']:.1f} s)")
        _fail_if(check, "TorchScript", report)
    return arts


def _fail_if(check: dict[str, Any], what: str, report: report_mod.Report) -> None:
    """Raise ValidationFailedError (carrying ``report``) when ``check`` failed; a check that did not run
    (``passed`` None) is not a failure, and its reason stays in the report."""
    if check["passed"] is not False:
        return
    err = ValidationFailedError(
        f"{what} export check failed: {check.get('reason')}; nothing was published. Loosen --export-atol only if "
        "the difference is rounding")
    err.report = report
    raise err
