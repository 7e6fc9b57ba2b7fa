"""ONNX graph work: export (TorchScript-based exporter), declared output shapes, fp16 conversion and its upcast,
the NMS probe outputs of the check, and running a graph with onnxruntime (CPU, or the providers a check chose)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .nms import MASK_COEFFICIENTS, NMS_OUTPUTS, NMSHead
from .modules import EndToEnd
from .options import EXPORT_DEFAULTS

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "PROTO_NAME", "OnnxRunner", "export_onnx", "declared_shapes", "upcast_onnx",
           "run_onnx", "with_nms_inputs"]

INPUT_NAME = "images"
OUTPUT_NAME = "output0"
#: the mask prototypes of a segmentation model (``[batch, nm, height / 4, width / 4]``), as YOLOv9's export names it
PROTO_NAME = "output1"


def quiet(fn: Callable[[], Any]) -> Any:
    """``fn()`` with warnings silenced (tracer and converter warnings are about code we do not control)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def _output_names(module: nn.Module) -> list[str]:
    """The graph's output names: ``output0`` (and ``output1``, the prototypes, for segmentation), or the end-to-end
    :data:`~.nms.NMS_OUTPUTS` (for segmentation followed by ``mask_coefficients`` and ``output1``)."""
    segment = bool(getattr(module, "segmentation", False))
    if isinstance(module, (EndToEnd, NMSHead)):
        return [*NMS_OUTPUTS, MASK_COEFFICIENTS, PROTO_NAME] if segment else list(NMS_OUTPUTS)
    return [OUTPUT_NAME, PROTO_NAME] if segment else [OUTPUT_NAME]


def export_onnx(module: nn.Module, path: Path, sample: torch.Tensor, *, opset: int = EXPORT_DEFAULTS.opset,
                dynamic: bool = False, half: bool = False, metadata: dict[str, str] | None = None) -> Any:
    """Export ``module`` (fp32) to ONNX with the TorchScript-based exporter and declare its output shapes.

    Args:
        module: :class:`~.modules.Predictions` (output ``output0``; a segmentation model also ``output1``, the
            prototypes), :class:`~.modules.EndToEnd` or a bare
            :class:`~reparam.converter.export.nms.NMSHead` (outputs :data:`~reparam.converter.export.nms.NMS_OUTPUTS`;
            a segmentation :class:`~.modules.EndToEnd` adds ``mask_coefficients [B, max_det, nm]`` and
            ``output1``).
        path: the ``.onnx`` file to write (one file, weights inside).
        sample: tracing input (``images [B, 3, H, W]``, or ``y [B, 4 + nc, A]`` for a bare NMSHead), fp32; its
            shape is the static shape.
        opset: ONNX opset.
        dynamic: symbolic ``batch``/``height``/``width`` on the input (``batch``/``anchors`` for a bare NMSHead);
            on the outputs only ``batch`` and ``anchors`` are symbolic, every other dimension (``4 + nc``,
            ``max_det``, 4) is static (:func:`declared_shapes`).
        half: store fp16 weights and fp16 input (onnxruntime's ``float16`` converter; operators without fp16
            kernels such as NonMaxSuppression/TopK/Range stay fp32 behind Casts).
        metadata: written to ``metadata_props``.

    Returns:
        The saved ``onnx.ModelProto``.

    Raises:
        RuntimeError / ValueError / TypeError: from the exporter (e.g. an opset that lacks an operator).
    """
    import onnx

    outputs = _output_names(module)
    in_axes = {0: "batch", 2: "anchors"} if isinstance(module, NMSHead) else {0: "batch", 2: "height", 3: "width"}
    axes: dict[str, dict[int, str]] | None = None
    if dynamic:
        axes = {INPUT_NAME: in_axes, **{name: {0: "batch"} for name in outputs}}
        if outputs[0] == OUTPUT_NAME:
            axes[OUTPUT_NAME] = {0: "batch", 2: "anchors"}
        if PROTO_NAME in outputs:
            axes[PROTO_NAME] = {0: "batch", 2: "proto_height", 3: "proto_width"}
    module = module.float().eval()
    x = sample.float()
    quiet(lambda: torch.onnx.export(
        module, (x,), str(path), dynamo=False, opset_version=int(opset), input_names=[INPUT_NAME],
        output_names=outputs, dynamic_axes=axes, do_constant_folding=True))
    shapes = declared_shapes(outputs, _output_shapes(module, x), axes)
    proto = onnx.load(str(path))
    _declare(proto, shapes)
    if half:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        proto = quiet(lambda: convert_float_to_float16(proto, keep_io_types=False))
        _toposort(proto.graph)  # the converter may append Casts after their consumers (Resize scales)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "reparam"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return proto


def _output_shapes(module: nn.Module, x: torch.Tensor) -> list[list[int]]:
    """The output shapes of ``module`` on ``x``; end-to-end ones without running NMS (fixed by ``max_det``; a
    segmentation model's prototypes from its prediction)."""
    nms = module if isinstance(module, NMSHead) else getattr(module, "nms", None)
    if isinstance(nms, NMSHead):
        b, k = int(x.shape[0]), nms.max_det
        shapes = [[b, 1], [b, k, 4], [b, k], [b, k]]
        if isinstance(module, EndToEnd) and module.segmentation:
            with torch.no_grad():
                protos = module.predict(x)[1]
            shapes += [[b, k, nms.nm], list(protos.shape)]
        return shapes
    with torch.no_grad():
        got = module(x)
    return [list(t.shape) for t in ([got] if isinstance(got, torch.Tensor) else got)]


def declared_shapes(names: list[str], shapes: list[list[int]],
                    axes: dict[str, dict[int, str]] | None) -> dict[str, list[int | str]]:
    """Output name -> shape to declare: the traced output's shape, with the dynamic axes' names where dynamic.

    The exporter leaves dimensions it cannot prove constant symbolic (``output0``'s ``4 + nc`` came out as
    ``Concat..._dim_1`` with ``--dynamic``); what is static is known from the module, so it is declared.
    """
    return {name: [(axes or {}).get(name, {}).get(i, int(d)) for i, d in enumerate(shape)]
            for name, shape in zip(names, shapes)}


def _declare(proto: Any, shapes: dict[str, list[int | str]]) -> None:
    for out in proto.graph.output:
        if out.name not in shapes:
            continue
        dims = out.type.tensor_type.shape.dim
        del dims[:]
        for d in shapes[out.name]:
            dim = dims.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d


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


def with_nms_inputs(proto: Any, multi_label: bool) -> Any:
    """A copy of an end-to-end ONNX model with two more outputs: the NMS boxes and the raw class scores.

    The boxes are the first input of the ``NonMaxSuppression`` node (``[B, A, 4]`` xyxy). The raw scores
    ``[B, nc, A]`` are its second input with ``multi_label``, else the input of the best-class ``ArgMax`` (the NMS
    node sees them with all but the best class zeroed). The check compares these with torch, then runs the
    independent reference (:func:`reference_detections <reparam.converter.export.nms.reference_detections>`) on exactly
    these values: NMS is discontinuous (a score or IoU at a threshold flips with rounding), so the reference must
    see what the graph saw. Raises ValueError when the graph lacks those nodes.
    """
    import onnx
    from onnx import TensorProto, helper

    proto = copy.deepcopy(proto)
    nodes = proto.graph.node
    nms = [n for n in nodes if n.op_type == "NonMaxSuppression"]
    if len(nms) != 1:
        raise ValueError(f"the end-to-end graph has {len(nms)} NonMaxSuppression nodes, expected 1")
    boxes, scores = nms[0].input[0], nms[0].input[1]
    if not multi_label:
        argmax = [n for n in nodes if n.op_type == "ArgMax"]
        if len(argmax) != 1:
            raise ValueError(f"the best-class end-to-end graph has {len(argmax)} ArgMax nodes, expected 1")
        scores = argmax[0].input[0]
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    for name in (boxes, scores):
        proto.graph.output.append(helper.make_tensor_value_info(name, types.get(name) or TensorProto.FLOAT, None))
    return proto


def _session(model: Any, providers: Sequence[Any] | None = None) -> Any:
    """An onnxruntime session of ``model`` (path str, bytes or ModelProto) on ``providers`` (default the CPU;
    :func:`reparam.converter.device.onnx_placement` chooses them for a check)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # onnxruntime's default is one thread per host core; under a CPU limit that oversubscribes: use torch's
    # count, which reparam.converter.cpus.limit_threads lowered to the CPUs this process may use
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    with warnings.catch_warnings():  # an unavailable provider is only warned about: OnnxRunner.used tells
        warnings.simplefilter("ignore")
        return ort.InferenceSession(data, sess_options=opts, providers=list(providers or ["CPUExecutionProvider"]))


def _run(sess: Any, images: torch.Tensor) -> list[torch.Tensor]:
    name = sess.get_inputs()[0].name
    return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, {name: images.detach().cpu().numpy()})]


def run_onnx(model: Any, images: torch.Tensor, providers: Sequence[Any] | None = None) -> list[torch.Tensor]:
    """Run an ONNX model (path, bytes or ModelProto) on ``images`` with onnxruntime (``providers``, default the
    CPU); outputs as CPU torch tensors.

    Raises onnxruntime's exceptions (``NotImplemented`` when a kernel for the graph's types is missing).
    """
    return _run(_session(str(model) if isinstance(model, Path) else model, providers), images)


class OnnxRunner:
    """``images [B, 3, H, W] (CPU) -> outputs`` (CPU torch tensors) of one ONNX graph on ``providers``, with one
    onnxruntime session made at the first call (so a graph with no kernel for its types fails inside the check's
    run, where :func:`~.checks.no_fp16_kernel` can tell it apart).

    :attr:`used` is what the session runs on (``InferenceSession.get_providers()``, first = preferred): onnxruntime
    drops a listed provider that fails to start (a CUDA provider without its libraries) and carries on with the
    rest, so this, not the request, says where the check ran. None before the first call.
    """

    def __init__(self, model: Any, providers: Sequence[Any] | None = None):
        self.model = str(model) if isinstance(model, Path) else model
        self.providers = providers
        self.session: Any = None

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.session is None:
            self.session = _session(self.model, self.providers)
        return _run(self.session, images)

    @property
    def used(self) -> list[str] | None:
        return list(self.session.get_providers()) if self.session is not None else None
