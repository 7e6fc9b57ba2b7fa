"""ONNX and TorchScript export of a deploy model, each checked against torch before it is published.

What is exported is always the *deploy* model (head ``DDetect``; a dual model is refused), wrapped so the graph
returns only the decoded prediction, never the raw per-level maps:

* ONNX (``<stem>-converted.onnx``): input ``images [B, 3, H, W]``, one output ``output0 [B, 4 + nc, A]`` (box
  xywh in input pixels, then class scores), as the official YOLOv9 deploy models export it. Static ``[1, 3, s, s]``
  at ``--imgsz`` unless ``--dynamic`` (batch, height and width free). Metadata (``metadata_props``): ``names``
  (JSON ``{id: name}``), ``stride`` (largest stride, as official ``export.py``), ``strides``, ``nc``, ``imgsz``,
  ``task``, ``output``, ``reparam_version``, ``source_sha256``.
* ONNX with ``--nms`` (``<stem>-converted-end2end.onnx``): the same prediction followed by the standard
  ``NonMaxSuppression`` operator (class-aware, :mod:`.nms`), outputs ``num_dets [B, 1]``, ``boxes [B, max_det, 4]``
  xyxy pixels, ``scores [B, max_det]``, ``labels [B, max_det]`` (int64; padding: 0, 0, -1).
* TorchScript (``<stem>-converted.torchscript``): ``torch.jit.trace`` of the same wrapper (shapes stay free: the
  anchor grid is computed from the feature maps); ``config.txt`` extra file holds the metadata as JSON.

Checks (recorded per artifact under ``check``): the artifact is loaded back (onnxruntime CPU / ``torch.jit.load``)
and run on the validation inputs (seeded, :func:`~.validation.sample_inputs`; the static ONNX only on the
``[1, 3, s, s]`` one, dynamic graphs on two batch sizes and two image sizes), compared with the torch model:

* fp32 artifacts: max |diff| <= ``export_atol`` (default :data:`DEFAULT_EXPORT_ATOL` = 1e-3 output units: graph
  optimisations reorder fp32 sums; the official ONNX differs from torch by 1.2e-4 px on yolov9-t);
* ``--half`` artifacts (fp16 weights): (a) fp32 run on the upcast artifact vs the torch model holding the same
  fp16-rounded weights in fp32, tolerance ``export_atol``; (b) fp16 run vs the same reference where the runtime
  can run it on this machine (else ``skipped: reason``), tolerance ``HALF_RTOL x max|reference|`` (fp16 has 11
  significant bits; boxes are in pixels up to the image size). The rounding error of the weights themselves is
  reported as ``fp16_weights_max_abs_diff`` (vs the fp32 model), not judged;
* NMS graphs: the NonMaxSuppression inputs (boxes xyxy, scores) are compared with torch's as above, and the graph's
  outputs with the torch reference NMS (:mod:`.nms`) run on those same inputs: counts must agree and every detection
  must match one of the reference (same label) within the tolerance. NMS is discontinuous (a score or IoU at a
  threshold flips with rounding), so the count of torch's own end-to-end run is reported (``torch_num_dets``) but
  not judged.

Errors: :class:`~reparam.errors.InvalidInputError` for a non-deploy model or bad option combinations,
:class:`~reparam.errors.ValidationFailedError` when a check fails (nothing is published; see
:func:`.artifacts.write_all`).
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InvalidInputError, ValidationFailedError
from ..models.heads import DDetect
from .nms import NMS_OUTPUTS, NMSHead, nms_inputs
from .validation import main_output, sample_inputs

if TYPE_CHECKING:
    from .convert import ConvertOptions

__all__ = [
    "DEFAULT_EXPORT_ATOL", "HALF_RTOL", "INPUT_NAME", "OUTPUT_NAME", "MIN_OPSET",
    "check_export_options", "deploy_head", "Predictions", "EndToEnd", "export_metadata",
    "export_onnx", "export_torchscript", "upcast_onnx", "run_onnx", "compare_detections", "export_all",
]

DEFAULT_EXPORT_ATOL = 1e-3
HALF_RTOL = 2e-3
INPUT_NAME = "images"
OUTPUT_NAME = "output0"
MIN_OPSET = 11  # ScatterElements, NonMaxSuppression with these inputs


def _max_opset() -> int:
    try:
        from torch.onnx import _constants

        return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
    except Exception:  # pragma: no cover - private module moved
        return 20


def check_export_options(options: "ConvertOptions") -> None:
    """Raise InvalidInputError for export settings that cannot work (called by ``ConvertOptions.check``)."""
    o = options.onnx or {}
    wants_onnx = "onnx" in options.formats
    for flag in ("nms", "dynamic"):
        if o.get(flag) and not wants_onnx:
            raise InvalidInputError(f"--{flag} applies to the ONNX export; add --format onnx")
    opset = int(o.get("opset", 17))
    if wants_onnx and not (MIN_OPSET <= opset <= _max_opset()):
        raise InvalidInputError(f"--opset {opset} is not supported: choose {MIN_OPSET}..{_max_opset()} (default 17)")
    if o.get("nms"):
        iou, score, max_det = o.get("iou_thres", 0.45), o.get("score_thres", 0.25), o.get("max_det", 300)
        if not 0.0 <= float(iou) <= 1.0:
            raise InvalidInputError(f"--iou-thres must be in [0, 1], got {iou}")
        if not 0.0 <= float(score) < 1.0:
            raise InvalidInputError(f"--score-thres must be in [0, 1), got {score}")
        if int(max_det) < 1:
            raise InvalidInputError(f"--max-det must be >= 1, got {max_det}")
    atol = getattr(options, "export_atol", DEFAULT_EXPORT_ATOL)
    if not atol > 0:
        raise InvalidInputError(f"--export-atol must be > 0, got {atol}")


def deploy_head(model: nn.Module) -> DDetect:
    """The model's ``DDetect`` head; InvalidInputError for anything else (a dual head is never exported)."""
    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    if type(head) is not DDetect:
        raise InvalidInputError(
            f"export needs a deploy detection model (head DDetect), got head {type(head).__name__}: a dual model is "
            "never exported as is (its first output would be the auxiliary branch); convert it first")
    return head


class Predictions(nn.Module):
    """A deploy model that returns only its decoded prediction.

    Args:
        model: a deploy ``DetectionModel`` (head ``DDetect``); it is deep-copied and its head's ``export`` flag set.

    Shapes: ``images [B, 3, H, W] -> y [B, 4 + nc, A]`` (xywh in input pixels, then class scores).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        deploy_head(model)
        self.model = copy.deepcopy(model).eval()
        self.model.model[-1].export = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return main_output(self.model(images))


class EndToEnd(nn.Module):
    """:class:`Predictions` followed by :class:`~.nms.NMSHead`.

    Shapes: ``images [B, 3, H, W] -> (num_dets [B, 1], boxes [B, max_det, 4], scores [B, max_det],
    labels [B, max_det])``.
    """

    def __init__(self, model: nn.Module, iou_thres: float = 0.45, score_thres: float = 0.25, max_det: int = 300):
        super().__init__()
        self.predict = model if isinstance(model, Predictions) else Predictions(model)
        self.nms = NMSHead(iou_thres, score_thres, max_det)

    def forward(self, images: torch.Tensor):
        return self.nms(self.predict(images))


def export_metadata(model: nn.Module, report: dict[str, Any], imgsz: int, *, nms: dict[str, Any] | None) -> dict[str, str]:
    """String metadata stored in the ONNX ``metadata_props`` and the TorchScript ``config.txt``."""
    from .. import __version__

    strides = [int(s) for s in torch.as_tensor(model.stride).tolist()]
    names = {str(k): v for k, v in getattr(model, "names", {}).items()}
    meta = {
        "task": "detect",
        "names": json.dumps(names),
        "nc": str(len(names) or model.model[-1].nc),
        "stride": str(max(strides)),
        "strides": json.dumps(strides),
        "imgsz": json.dumps([imgsz, imgsz]),
        "output": ("num_dets, boxes (xyxy px), scores, labels" if nms else
                   "output0 [batch, 4 + nc, anchors]: box xywh in input pixels, then class scores"),
        "reparam_version": __version__,
        "source_sha256": str((report.get("source") or {}).get("sha256", "")),
        "variant": str(report.get("variant", "")),
    }
    if nms:
        meta["nms"] = json.dumps(nms)
    return meta


def _quiet_export(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def export_onnx(module: nn.Module, path: Path, sample: torch.Tensor, *, opset: int = 17, dynamic: bool = False,
                half: bool = False, metadata: dict[str, str] | None = None) -> Any:
    """Export ``module`` (:class:`Predictions` or :class:`EndToEnd`, fp32) to ONNX with the TorchScript-based exporter.

    Args:
        module: fp32, eval; its outputs are named ``output0`` or :data:`~.nms.NMS_OUTPUTS`.
        path: the ``.onnx`` file to write (one file, weights inside).
        sample: ``[B, 3, H, W]`` fp32 tracing input (its shape is the static shape).
        opset: ONNX opset.
        dynamic: batch, height and width as named dynamic axes.
        half: store fp16 weights and fp16 input (onnxruntime's ``float16`` converter; operators without fp16
            kernels such as NonMaxSuppression/TopK/Range stay fp32 behind Casts).
        metadata: written to ``metadata_props``.

    Returns:
        The saved ``onnx.ModelProto``.
    """
    import onnx

    e2e = isinstance(module, EndToEnd)
    outputs = list(NMS_OUTPUTS) if e2e else [OUTPUT_NAME]
    axes: dict[str, dict[int, str]] | None = None
    if dynamic:
        axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
        for name in outputs:
            axes[name] = {0: "batch"} if e2e else {0: "batch", 2: "anchors"}
    module = module.float().eval()
    _quiet_export(lambda: torch.onnx.export(
        module, (sample.float(),), str(path), dynamo=False, opset_version=int(opset), input_names=[INPUT_NAME],
        output_names=outputs, dynamic_axes=axes, do_constant_folding=True))
    proto = onnx.load(str(path))
    if half:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        proto = _quiet_export(lambda: convert_float_to_float16(proto, keep_io_types=False))
        _toposort(proto.graph)  # the converter may append Casts after their consumers (Resize scales)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "reparam"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return proto


def _toposort(graph: Any) -> None:
    """Reorder ``graph.node`` in place so every node comes after the producers of its inputs (stable)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[Any] = []
    while pending:
        rest = []
        for node in pending:
            if all(name in known for name in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"ONNX graph has a cycle or a missing input near node {rest[0].name!r}")
        pending = rest
    copies = [copy.deepcopy(n) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def upcast_onnx(proto: Any) -> Any:
    """A copy of an ONNX model with every fp16 tensor, type and Cast made fp32 (to run fp16 weights in fp32)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    proto = copy.deepcopy(proto)
    f16, f32 = TensorProto.FLOAT16, TensorProto.FLOAT

    def fix_tensor(t: Any) -> None:
        if t.data_type == f16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    def fix_type(vi: Any) -> None:
        tt = vi.type.tensor_type
        if tt.elem_type == f16:
            tt.elem_type = f32

    g = proto.graph
    for t in g.initializer:
        fix_tensor(t)
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        fix_type(vi)
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                fix_tensor(attr.t)
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == f16:
                attr.i = f32
    return proto


def _session(model: Any):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(model: Any, images: torch.Tensor) -> list[torch.Tensor]:
    """Run an ONNX model (path, bytes or ModelProto) with onnxruntime CPU; outputs as torch tensors."""
    sess = _session(str(model) if isinstance(model, Path) else model)
    name = sess.get_inputs()[0].name
    return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, {name: images.numpy()})]


def compare_detections(ref: Sequence[torch.Tensor], got: Sequence[torch.Tensor], atol: float,
                       allowed_unmatched: int = 0) -> tuple[float, str]:
    """Compare two end-to-end outputs ``(num_dets, boxes, scores, labels)``, order-insensitively.

    Each detection of ``got`` is matched with the closest reference detection of the same label (distance: max
    |diff| over box corners and score). Returns ``(max distance over matched detections, reason)``; ``reason`` is
    empty when the counts agree and at most ``allowed_unmatched`` detections per image are farther than ``atol``.
    """
    n_ref, b_ref, s_ref, l_ref = (t.detach().cpu() for t in ref)
    n_got, b_got, s_got, l_got = (t.detach().cpu() for t in got)
    worst, reason = 0.0, ""
    for i in range(n_ref.shape[0]):
        k_ref, k_got = int(n_ref[i, 0]), int(n_got[i, 0])
        if abs(k_ref - k_got) > allowed_unmatched:
            return float("inf"), f"image {i}: {k_got} detections vs {k_ref} in the torch reference"
        if k_got == 0 or k_ref == 0:
            continue
        rb, rs, rl = b_ref[i, :k_ref].float(), s_ref[i, :k_ref].float(), l_ref[i, :k_ref]
        gb, gs, gl = b_got[i, :k_got].float(), s_got[i, :k_got].float(), l_got[i, :k_got]
        dist = torch.maximum((gb[:, None] - rb[None]).abs().amax(-1), (gs[:, None] - rs[None]).abs())
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


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _compare(ref: Any, got: Any, atol: float, e2e: bool = False) -> tuple[float, str]:
    ref_t = ref if isinstance(ref, torch.Tensor) else ref[0]
    got_t = got if isinstance(got, torch.Tensor) else got[0]
    if tuple(ref_t.shape) != tuple(got_t.shape):
        return float("inf"), f"output shape {list(got_t.shape)} vs torch {list(ref_t.shape)}"
    if not torch.isfinite(got_t.float()).all():
        return float("inf"), "non-finite values in the output"
    d = _max_diff(ref_t, got_t)
    return d, "" if d <= atol else f"max |diff| {d:.3g} exceeds {atol:.3g}"


def _half_atol(ref: torch.Tensor, atol: float) -> float:
    scale = float(ref.float().abs().max()) if ref.numel() else 0.0
    return max(atol, HALF_RTOL * max(scale, 1.0))


def with_nms_inputs(proto: Any) -> Any:
    """A copy of an end-to-end ONNX model that also outputs the two inputs of its NonMaxSuppression node.

    Used by the check: the prediction part is compared with torch on these, and the NMS part is compared with the
    torch reference NMS run on exactly these (NMS is discontinuous: a score at the threshold or an IoU at the
    threshold flips with fp32 rounding, so the reference must see the same inputs).
    """
    from onnx import TensorProto, helper

    proto = copy.deepcopy(proto)
    node = next((n for n in proto.graph.node if n.op_type == "NonMaxSuppression"), None)
    if node is None:
        raise ValueError("the end-to-end graph has no NonMaxSuppression node")
    for name in node.input[:2]:
        proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return proto


def _check_run(kind: str, x: torch.Tensor, ref: Any, got: Any, tol: float, e2e: bool,
               nms: NMSHead | None) -> dict[str, Any]:
    """One comparison; for end-to-end graphs ``got`` holds the 4 outputs then the NMS inputs."""
    run: dict[str, Any] = {"precision": kind, "input_shape": list(x.shape)}
    if not e2e:
        d, why = _compare(ref, got, tol, False)
    else:
        y_ref = ref
        boxes_ref, scores_ref = nms_inputs(y_ref)
        outs, boxes_got, scores_got = list(got[:4]), got[4].float(), got[5].float()
        d = max(_max_diff(boxes_ref, boxes_got), _max_diff(scores_ref, scores_got))
        why = "" if d <= tol else f"NMS inputs (boxes, scores) max |diff| {d:.3g} exceeds {tol:.3g}"
        assert nms is not None
        with torch.no_grad():
            expected = nms.select(boxes_got, scores_got)
            torch_e2e = nms(y_ref)
        d_nms, why_nms = compare_detections(expected, outs, tol)
        run["nms_max_abs_diff"] = d_nms
        run["num_dets"] = [int(v) for v in outs[0].flatten()]
        run["torch_num_dets"] = [int(v) for v in torch_e2e[0].flatten()]  # info: NMS on torch's own predictions
        if why_nms and not why:
            why = f"NMS outputs differ from the torch reference NMS on the same inputs: {why_nms}"
        d = max(d, d_nms)
    run.update({"max_abs_diff": d, "atol": tol, "passed": not why})
    if why:
        run["reason"] = why
    return run


def _run_checks(name: str, runner_fp32: Callable[[torch.Tensor], Any], runner_fp16: Callable[[torch.Tensor], Any] | None,
                reference: nn.Module, inputs: list[torch.Tensor], atol: float, half: bool,
                fp32_model: nn.Module | None, nms: NMSHead | None = None) -> dict[str, Any]:
    """Run an artifact and its torch reference (``reference``: prediction ``y``) on each input; returns the check."""
    runs: list[dict[str, Any]] = []
    worst, reasons = 0.0, []
    weights_err = 0.0
    e2e = nms is not None
    with torch.no_grad():
        for x in inputs:
            ref = reference(x)
            run = _check_run("fp32" if not half else "fp32 (upcast fp16 weights)", x, ref, runner_fp32(x), atol, e2e,
                             nms)
            runs.append(run)
            worst = max(worst, run["max_abs_diff"])
            if not run["passed"]:
                reasons.append(f"{name} {list(x.shape)}: {run['reason']}")
            if half and fp32_model is not None:
                weights_err = max(weights_err, _max_diff(fp32_model(x), ref))
            if runner_fp16 is not None:
                tol = _half_atol(ref, atol)
                try:
                    got16 = runner_fp16(x)
                except Exception as exc:  # the runtime has no fp16 kernels here
                    runs.append({"precision": "fp16", "input_shape": list(x.shape),
                                 "skipped": f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                    continue
                run16 = _check_run("fp16", x, ref, got16, tol, e2e, nms)
                runs.append(run16)
                if not run16["passed"]:
                    reasons.append(f"{name} fp16 {list(x.shape)}: {run16['reason']}")
    check: dict[str, Any] = {"passed": not reasons, "max_abs_diff": worst, "atol": atol, "runs": runs}
    if half:
        check["fp16_weights_max_abs_diff"] = weights_err
    if reasons:
        check["reason"] = "; ".join(reasons)
    return check


def export_torchscript(module: Predictions, path: Path, sample: torch.Tensor, *, half: bool = False,
                       metadata: dict[str, str] | None = None) -> torch.jit.ScriptModule:
    """Trace ``module`` and save it with a ``config.txt`` extra file (metadata JSON).

    With ``half`` the model and the tracing input are fp16 (the trace runs one fp16 forward on this machine).
    Returns the traced module.
    """
    module = copy.deepcopy(module).eval()
    module = module.half() if half else module.float()
    x = sample.half() if half else sample.float()
    with torch.no_grad():
        traced = _quiet_export(lambda: torch.jit.trace(module, x, check_trace=False, strict=False))
    extra = {"config.txt": json.dumps({**(metadata or {}), "shape": list(sample.shape)})}
    torch.jit.save(traced, str(path), _extra_files=extra)
    return traced


def _dtype_name(half: bool) -> str:
    return "float16" if half else "float32"


def export_all(export_model: nn.Module, dual: nn.Module, stage: Path, stem: str, options: "ConvertOptions",
               report: dict[str, Any], say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Write and check the ONNX / TorchScript artifacts that ``options.formats`` asks for, into ``stage``.

    Args:
        export_model: the deploy model (fp32, eval; fused with ``--fuse``); head must be ``DDetect``.
        dual: the dual model (fp32, eval); only used to report the artifact's distance to its main branch.
        stage: staging folder; stem: checkpoint stem for the file names.
        options: conversion options (``formats``, ``half``, ``imgsz``, ``seed``, ``export_atol``, ``onnx``).
        report: the report so far (read for metadata; ``timing`` gets ``export_*_s``).
        say: progress logger.

    Returns:
        Artifact dicts ``{"name", "format", "dtype", "check", ...}`` (sha256/bytes are added by the caller).

    Raises:
        InvalidInputError: ``export_model`` is not a deploy model, or bad options.
        ValidationFailedError: an artifact's check failed (``err.report`` is the report with the failed check).
    """
    check_export_options(options)
    if export_model is dual:
        raise InvalidInputError("export got the dual model; export starts from the deploy model")
    deploy_head(export_model)
    o = {"opset": 17, "dynamic": False, "nms": False, "iou_thres": 0.45, "score_thres": 0.25, "max_det": 300,
         **(options.onnx or {})}
    atol = float(getattr(options, "export_atol", DEFAULT_EXPORT_ATOL))
    half = bool(options.half)
    model = copy.deepcopy(export_model).float().eval()
    stride = int(max(torch.as_tensor(model.stride).tolist()))
    inputs = sample_inputs(options.imgsz, stride, options.seed)
    sample = inputs[0]
    predict = Predictions(model)
    # the torch reference of a --half artifact: the same fp16-rounded weights, computed in fp32
    reference = copy.deepcopy(predict).half().float() if half else predict
    timings = report.setdefault("timing", {})
    arts: list[dict[str, Any]] = []
    with torch.no_grad():
        dual_main = {tuple(x.shape): main_output(dual(x)) for x in inputs} if dual is not None else {}

    if "onnx" in options.formats:
        t = time.perf_counter()
        import onnxruntime as ort

        nms = {k: o[k] for k in ("iou_thres", "score_thres", "max_det")} if o["nms"] else None
        module: nn.Module = EndToEnd(predict, **nms) if nms else predict
        nms_head = NMSHead(**nms) if nms else None
        name = f"{stem}-converted{'-end2end' if nms else ''}.onnx"
        path = stage / name
        say(f"exporting ONNX (opset {o['opset']}, {'dynamic' if o['dynamic'] else 'static ' + str(list(sample.shape))}"
            f"{', NMS' if nms else ''}{', fp16' if half else ''}) -> {name}")
        try:
            proto = export_onnx(module, path, sample, opset=int(o["opset"]), dynamic=bool(o["dynamic"]), half=half,
                                metadata=export_metadata(model, report, int(sample.shape[-1]), nms=nms))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidInputError(f"ONNX export failed at opset {o['opset']}: {str(exc).splitlines()[0][:300]}; "
                                    "try the default --opset 17") from None
        checked = inputs if o["dynamic"] else [sample]
        runnable = with_nms_inputs(proto) if nms else proto
        as_stored = runnable.SerializeToString()
        if half:
            up = upcast_onnx(runnable).SerializeToString()
            fp32_run = lambda x: run_onnx(up, x)  # noqa: E731
            fp16_run = lambda x: run_onnx(as_stored, x.half())  # noqa: E731
        else:
            fp32_run, fp16_run = (lambda x: run_onnx(as_stored, x)), None
        check = _run_checks("onnx", fp32_run, fp16_run, reference, checked, atol, half, predict, nms_head)
        check["runtime"] = f"onnxruntime {ort.__version__} CPUExecutionProvider"
        if not nms and not half:
            check["vs_dual_max_abs_diff"] = max(_max_diff(run_onnx(path, x)[0], dual_main[tuple(x.shape)])
                                                for x in checked) if dual_main else None
        outputs = [{"name": v.name, "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
                   for v in proto.graph.output]
        arts.append({"name": name, "format": "onnx", "dtype": _dtype_name(half), "opset": int(o["opset"]),
                     "dynamic": bool(o["dynamic"]), "nms": nms, "input": INPUT_NAME, "outputs": outputs,
                     "check": check})
        timings["export_onnx_s"] = time.perf_counter() - t
        say(f"ONNX check: max |diff| {check['max_abs_diff']:.3g} (atol {atol:g}) -> "
            f"{'passed' if check['passed'] else 'FAILED'}")
        _fail_if(check, "ONNX", report)

    if "torchscript" in options.formats:
        t = time.perf_counter()
        name = f"{stem}-converted.torchscript"
        path = stage / name
        say(f"exporting TorchScript (trace{', fp16' if half else ''}) -> {name}")
        export_torchscript(predict, path, sample, half=half,
                           metadata=export_metadata(model, report, int(sample.shape[-1]), nms=None))
        loaded = torch.jit.load(str(path), map_location="cpu").eval()
        if half:
            upcast = _quiet_export(lambda: copy.deepcopy(loaded).float())
            fp32_run = lambda x: upcast(x)  # noqa: E731
            fp16_run = lambda x: loaded(x.half())  # noqa: E731
        else:
            fp32_run, fp16_run = (lambda x: loaded(x)), None
        check = _run_checks("torchscript", fp32_run, fp16_run, reference, inputs, atol, half, predict)
        check["runtime"] = f"torch {torch.__version__} (torch.jit.load, CPU)"
        if not half and dual_main:
            with torch.no_grad():
                check["vs_dual_max_abs_diff"] = max(_max_diff(loaded(x), dual_main[tuple(x.shape)]) for x in inputs)
        arts.append({"name": name, "format": "torchscript", "dtype": _dtype_name(half), "input": INPUT_NAME,
                     "check": check})
        timings["export_torchscript_s"] = time.perf_counter() - t
        say(f"TorchScript check: max |diff| {check['max_abs_diff']:.3g} (atol {atol:g}) -> "
            f"{'passed' if check['passed'] else 'FAILED'}")
        _fail_if(check, "TorchScript", report)
    return arts


def _fail_if(check: dict[str, Any], what: str, report: dict[str, Any]) -> None:
    if check["passed"]:
        return
    err = ValidationFailedError(
        f"{what} export check failed: {check.get('reason')}; nothing was published. Loosen --export-atol only if "
        "the difference is rounding")
    err.report = report  # type: ignore[attr-defined]
    raise err
