"""The export checks: an artifact, loaded back, against the torch model on the validation inputs.

Per artifact (``check`` in the report) and per run (``check["runs"]``), ``passed`` is ``true``, ``false`` (with
``reason``) or ``null`` (did not run, with ``reason``). The only run that may not run is an fp16 one on a device
that has no fp16 kernel for the graph (onnxruntime ``NotImplemented`` / torch "not implemented for 'Half'"); any
other exception is a failed run whose reason names it. A check is ``false`` when any run failed, ``null`` when no
run ran, else ``true``.

* fp32 artifacts: max |diff| <= ``export_atol`` (graph optimisations reorder fp32 sums; the official ONNX differs
  from torch by 1.2e-4 px on yolov9-t);
* ``--half`` artifacts: (a) fp32 run of the upcast artifact vs the torch model holding the same fp16-rounded weights
  in fp32, tolerance ``export_atol``; (b) fp16 run vs the same reference, tolerance
  ``max(export_atol, HALF_RTOL x max|reference|)``. The weights' own rounding error is reported
  (``fp16_weights_max_abs_diff``), not judged;
* end-to-end graphs: the NMS boxes and raw scores the graph computed are compared with torch's as above, and its
  detections with :func:`~reparam.converter.export.nms.reference_detections` (independent of the graph, same semantics)
  run on exactly those values: counts must agree and every detection must match a reference one of the same label
  within the tolerance. torch's own end-to-end count is information (``torch_num_dets``), not judged: NMS is
  discontinuous at its thresholds. For a segmentation model the reference also gathers torch's mask coefficients at
  the anchors it selects, and a detection matches only when its ``mask_coefficients`` are within the tolerance too;
  the prototypes ``output1`` are compared with torch's as a plain output (``prototypes_max_abs_diff``).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..validation import strict_fp32
from .nms import nms_inputs, reference_detections
from .options import HALF_RTOL, ExportOptions

__all__ = ["OnDevice", "compare_detections", "max_diff", "no_fp16_kernel", "run_checks", "to_cpu"]


def outputs_of(value: Any) -> list[torch.Tensor]:
    """An artifact's or model's outputs as a list: one tensor (detection) or several (segmentation: ``output0``,
    then the prototypes ``output1``)."""
    return [value] if isinstance(value, torch.Tensor) else list(value)


def max_diff(a: Any, b: Any) -> float:
    """max |a - b| in fp32 over one tensor or matching lists of them; ``inf`` when the shapes (or counts) differ, 0
    for empty tensors."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        a, b = outputs_of(a), outputs_of(b)
        return max((max_diff(x, y) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else float("inf")
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def compare_detections(ref: Sequence[torch.Tensor], got: Sequence[torch.Tensor], atol: float,
                       allowed_unmatched: int = 0) -> tuple[float, str]:
    """Compare two end-to-end outputs ``(num_dets [B, 1], boxes [B, K, 4], scores [B, K], labels [B, K])``,
    order-insensitively; when both also hold ``mask_coefficients [B, K, nm]`` (segmentation), those too.

    Each detection of ``got`` is matched with the closest reference detection of the same label (distance: max
    |diff| over box corners, score and, for segmentation, the mask coefficients). Returns ``(max distance over
    matched detections, reason)``; ``reason`` is empty when the counts agree and at most ``allowed_unmatched``
    detections per image are farther than ``atol``.
    """
    n_ref, b_ref, s_ref, l_ref = (t.detach().cpu() for t in ref[:4])
    n_got, b_got, s_got, l_got = (t.detach().cpu() for t in got[:4])
    masks = len(ref) > 4 and len(got) > 4
    m_ref = ref[4].detach().cpu().float() if masks else None
    m_got = got[4].detach().cpu().float() if masks else None
    worst, reason = 0.0, ""
    for i in range(n_ref.shape[0]):
        k_ref, k_got = int(n_ref[i, 0]), int(n_got[i, 0])
        if abs(k_ref - k_got) > allowed_unmatched:
            return float("inf"), f"image {i}: {k_got} detections vs {k_ref} in the reference"
        if k_got == 0 or k_ref == 0:
            continue
        rb, rs, rl = b_ref[i, :k_ref].float(), s_ref[i, :k_ref].float(), l_ref[i, :k_ref]
        gb, gs, gl = b_got[i, :k_got].float(), s_got[i, :k_got].float(), l_got[i, :k_got]
        dist = torch.maximum((gb[:, None] - rb[None]).abs().amax(-1), (gs[:, None] - rs[None]).abs())
        if m_ref is not None and m_got is not None and m_ref.shape[-1]:
            coef = (m_got[i, :k_got, None] - m_ref[i, None, :k_ref]).abs().amax(-1)
            dist = torch.maximum(dist, coef)
        dist = torch.where(gl[:, None] == rl[None], dist, torch.full_like(dist, float("inf")))
        best = dist.amin(1)
        far = int((best > atol).sum())
        close = best[best <= atol]
        if close.numel():
            worst = max(worst, float(close.max()))
        if far > allowed_unmatched:
            reason = f"image {i}: {far} of {k_got} detections have no reference detection within {atol:.3g}"
            worst = max(worst, float(best.max()))
    return worst, reason


def to_cpu(value: Any) -> Any:
    """A model's or artifact's outputs (one tensor, or a tuple/list of them) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    return type(value)(to_cpu(v) for v in value) if isinstance(value, (list, tuple)) else value


class OnDevice(nn.Module):
    """``module`` computing on ``device``: inputs are moved there, outputs come back to the CPU, and CUDA computes
    in true fp32 (TF32 off, :func:`reparam.converter.validation.strict_fp32`), as every check here.

    The torch reference of an export check runs where the artifact runs, so the check measures the export, not the
    difference between two devices' kernels (that one is the equivalence check's ``--check-device``). On the CPU
    the module is used as it is; on CUDA a copy is moved there (``module`` itself stays on the CPU).
    """

    def __init__(self, module: nn.Module, device: torch.device | str):
        super().__init__()
        self.device = torch.device(device)
        self.module = module if self.device.type == "cpu" else copy.deepcopy(module).to(self.device)

    def forward(self, x: torch.Tensor) -> Any:
        with strict_fp32():
            return to_cpu(self.module(x.to(self.device)))


def no_fp16_kernel(exc: BaseException) -> bool:
    """True when ``exc`` says the runtime has no fp16 kernel for an operator on this device (the one allowed skip).

    onnxruntime raises ``NotImplemented`` ("Could not find an implementation for Conv(11) node ..."); torch raises
    RuntimeError "... not implemented for 'Half'".
    """
    text = str(exc)
    return (type(exc).__name__ == "NotImplemented" or "Could not find an implementation for" in text
            or (isinstance(exc, RuntimeError) and "not implemented for 'Half'" in text))


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def _half_atol(ref: Any, atol: float) -> float:
    scale = max((float(t.float().abs().max()) for t in outputs_of(ref) if t.numel()), default=0.0)
    return max(atol, HALF_RTOL * max(scale, 1.0))


def _compare_run(kind: str, x: torch.Tensor, ref: Any, got: list[torch.Tensor], tol: float,
                 nms: ExportOptions | None) -> dict[str, Any]:
    """One comparison; for end-to-end graphs ``got`` holds the 4 outputs (6 for segmentation: then
    ``mask_coefficients`` and ``output1``), then the NMS boxes and raw scores. Without
    NMS every output of the reference (one; two for segmentation) is compared with the artifact's output of the
    same position (``output_max_abs_diff`` per output)."""
    run: dict[str, Any] = {"precision": kind, "input_shape": list(x.shape)}
    if nms is None:
        refs = outputs_of(ref)
        d, why, per = 0.0, "", []
        if len(got) < len(refs):
            d, why = float("inf"), f"{len(got)} output(s) vs {len(refs)} in torch"
        for i, (r, y) in enumerate(zip(refs, got)):
            if why:
                break
            if tuple(r.shape) != tuple(y.shape):
                d, why = float("inf"), f"output {i} shape {list(y.shape)} vs torch {list(r.shape)}"
            elif not torch.isfinite(y.float()).all():
                d, why = float("inf"), f"non-finite values in output {i}"
            else:
                per.append(max_diff(r, y))
                d = max(d, per[-1])
        if not why and d > tol:
            why = f"max |diff| {d:.3g} exceeds {tol:.3g}"
        if len(refs) > 1:
            run["output_max_abs_diff"] = per
    else:
        refs = outputs_of(ref)  # [y] or, for segmentation, [y with nm mask coefficients, prototypes]
        nm = int(refs[1].shape[1]) if len(refs) > 1 else 0
        n_out = 6 if nm else 4  # segmentation: + mask_coefficients, output1 (prototypes)
        if len(got) < n_out + 2:
            run.update({"max_abs_diff": float("inf"), "atol": tol, "passed": False,
                        "reason": f"{len(got)} output(s); the end-to-end graph and its probes need {n_out + 2}"})
            return run
        boxes_ref, scores_ref = nms_inputs(refs[0], nm)
        outs, boxes_got, scores_got = list(got[:n_out]), got[n_out].float(), got[n_out + 1].float()
        d = max(max_diff(boxes_ref, boxes_got), max_diff(scores_ref, scores_got))
        why = "" if d <= tol else f"NMS inputs (boxes, scores) max |diff| {d:.3g} exceeds {tol:.3g}"
        if nm:  # the prototypes pass through unchanged
            d_proto = max_diff(refs[1], outs[5])
            run["prototypes_max_abs_diff"] = d_proto
            if d_proto > tol and not why:
                why = f"prototypes (output1) max |diff| {d_proto:.3g} exceeds {tol:.3g}"
            d = max(d, d_proto)
        # the selected detections' mask coefficients are checked against torch's at the anchors the reference picks
        coefficients = refs[0][:, -nm:].float() if nm else None
        expected = reference_detections(boxes_got, scores_got, iou_thres=nms.iou_thres, score_thres=nms.score_thres,
                                        max_det=nms.max_det, multi_label=nms.multi_label, coefficients=coefficients)
        d_nms, why_nms = compare_detections(expected, outs[:5], tol)
        run["nms_max_abs_diff"] = d_nms
        run["num_dets"] = [int(v) for v in outs[0].flatten()]
        run["reference_num_dets"] = [int(v) for v in expected[0].flatten()]
        torch_e2e = reference_detections(boxes_ref, scores_ref, iou_thres=nms.iou_thres,
                                         score_thres=nms.score_thres, max_det=nms.max_det,
                                         multi_label=nms.multi_label)
        run["torch_num_dets"] = [int(v) for v in torch_e2e[0].flatten()]  # info: NMS on torch's own predictions
        if why_nms and not why:
            why = f"NMS outputs differ from the reference NMS on the same inputs: {why_nms}"
        d = max(d, d_nms)
    run.update({"max_abs_diff": d, "atol": tol, "passed": not why})
    if why:
        run["reason"] = why
    return run


def _attempt(kind: str, x: torch.Tensor, runner: Callable[[torch.Tensor], Any], allow_skip: bool, where: str = ""
             ) -> tuple[list[torch.Tensor] | None, dict[str, Any] | None]:
    """Run ``runner(x)``; returns ``(outputs, None)`` or ``(None, run record)`` for a skipped or failed run
    (``where``: the device / runtime, named in a skip's reason)."""
    try:
        got = runner(x)
    except Exception as exc:
        rec: dict[str, Any] = {"precision": kind, "input_shape": list(x.shape)}
        if allow_skip and no_fp16_kernel(exc):
            on = f" ({where})" if where else ""
            rec.update({"passed": None, "reason": f"not run: no fp16 kernel on this device{on} ({_one_line(exc)})"})
        else:
            rec.update({"passed": False, "reason": f"the {kind} run raised {_one_line(exc)}"})
        return None, rec
    return ([got] if isinstance(got, torch.Tensor) else list(got)), None


def run_checks(name: str, runner_fp32: Callable[[torch.Tensor], Any],
               runner_fp16: Callable[[torch.Tensor], Any] | None, reference: nn.Module, inputs: list[torch.Tensor],
               atol: float, *, half: bool, fp32_model: nn.Module | None = None,
               nms: ExportOptions | None = None, where: str = "") -> dict[str, Any]:
    """Run an artifact and its torch reference on each input and judge it (rules: module docstring).

    Args:
        name: artifact kind for the reasons (``onnx``, ``torchscript``).
        runner_fp32: ``images [B, 3, H, W] fp32 ->`` the artifact's outputs (upcast weights with ``half``).
        runner_fp16: the same with fp16 input and weights, or None (fp32 artifacts).
        reference: torch module ``images -> y [B, 4 + nc, A]`` (fp16-rounded weights in fp32 with ``half``).
        inputs: the images to run.
        atol: ``export_atol``.
        half: the artifact holds fp16 weights (``fp32_model``: the unrounded fp32 model, for the rounding report).
        nms: the export settings of an end-to-end graph (its runners then also return the NMS boxes and raw scores,
            :func:`~.onnx_graph.with_nms_inputs`), else None.
        where: the device and runtime the runners compute on (``cpu, CPUExecutionProvider``), named in the reason
            of an fp16 run that found no kernel there. Runners take and return CPU tensors; the reference is an
            :class:`OnDevice` on the same device when that is CUDA.

    Returns:
        ``{"passed": True | False | None, "max_abs_diff" (fp32 runs, vs ``atol``), "atol", "runs": [...],
        "reason"?, "not_run"?, "fp16_max_abs_diff"?, "fp16_weights_max_abs_diff"?}``.
    """
    runs: list[dict[str, Any]] = []
    worst, worst16, reasons, not_run = 0.0, 0.0, [], []
    weights_err = 0.0
    with torch.no_grad():
        for x in inputs:
            ref = reference(x)
            plan = [("fp32" if not half else "fp32 (upcast fp16 weights)", runner_fp32, atol, False)]
            if runner_fp16 is not None:
                plan.append(("fp16", runner_fp16, _half_atol(ref, atol), True))
            for kind, runner, tol, allow_skip in plan:
                got, run = _attempt(kind, x, runner, allow_skip, where)
                if run is None:
                    assert got is not None
                    run = _compare_run(kind, x, ref, got, tol, nms)
                    if allow_skip:
                        worst16 = max(worst16, run["max_abs_diff"])
                    else:
                        worst = max(worst, run["max_abs_diff"])
                runs.append(run)
                if run["passed"] is False:
                    reasons.append(f"{name} {kind} {list(x.shape)}: {run['reason']}")
                elif run["passed"] is None:
                    not_run.append(f"{name} {kind} {list(x.shape)}: {run['reason']}")
            if half and fp32_model is not None:
                weights_err = max(weights_err, max_diff(fp32_model(x), ref))
    ran = [r for r in runs if r["passed"] is not None]
    passed: bool | None = False if reasons else (True if ran else None)
    check: dict[str, Any] = {"passed": passed, "max_abs_diff": worst, "atol": atol, "runs": runs}
    if half:
        check["fp16_weights_max_abs_diff"] = weights_err
    if any(r["precision"] == "fp16" and r["passed"] is not None for r in runs):
        check["fp16_max_abs_diff"] = worst16  # judged per run against its own tolerance (runs[i].atol)
    if reasons:
        check["reason"] = "; ".join(reasons)
    elif passed is None:
        check["reason"] = "no run ran: " + "; ".join(not_run)
    if not_run:
        check["not_run"] = not_run
    return check
