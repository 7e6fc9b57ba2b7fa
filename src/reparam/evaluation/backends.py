"""Every model form reparam reads or writes, behind one call: images in, decoded predictions out.

=================  ===========================================================================================
form               how it is loaded and run
=================  ===========================================================================================
``dual``           a training checkpoint (``train_dual.py``): :func:`~reparam.converter.checkpoint.read_checkpoint`
                   (the EMA when the file holds one, as the official ``attempt_load``), our model, main branch
``pt``             a deploy checkpoint (``*-converted.pt``, official format), read the same way
``safetensors``    :func:`~reparam.converter.artifacts.load_safetensors` (no pickle)
``onnx``           onnxruntime (CPU); class names and stride from the metadata reparam writes
``torchscript``    ``torch.jit.load`` on the device it was traced on (``config.txt``'s ``device``; another device is
                   refused); names and stride from its ``config.txt`` extra file
``fused``          an in-memory model handed over by the converter (:func:`from_module`)
=================  ===========================================================================================

Precision (decided once for all forms): torch models run in **fp32** with the weights as stored (fp16 weights are
upcast exactly), as the official ``val.py`` does on CPU (``half`` only on CUDA); an fp16 ONNX graph runs as stored
(fp16 input) when onnxruntime can run it here, else upcast to fp32 (the ``precision`` field says which); an fp16
TorchScript module is upcast to fp32. Models are not fused here (the converter evaluates its fused model as its own
``fused`` entry).

Every predictor maps ``images [B, 3, H, W]`` float32 RGB in [0, 1] to ``y [B, 4 + nc, A]`` float32 (box xywh in
input pixels, then class scores), the main branch only. A segmentation model (``DSegment``/``DualDSegment`` head;
ONNX/TorchScript metadata ``task: segment``, ONNX ``output0``/``output1``) has ``nm > 0`` and its predictor returns
``(y [B, 4 + nc + nm, A], prototypes [B, nm, H/4, W/4])``: the mask coefficients after the class scores, as
YOLOv9's ``DSegment`` outputs them.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import torch
from torch import nn

from ..errors import InvalidInputError

#: what a predictor returns: ``y`` (detection) or ``(y, prototypes)`` (segmentation, ``nm > 0``)
Prediction = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LoadedModel:
    """A model ready to evaluate.

    Attributes:
        form: ``dual``, ``pt``, ``safetensors``, ``onnx``, ``torchscript`` or ``fused``.
        names: class id -> name; stride: the largest stride in pixels.
        predict: ``images [B, 3, H, W] float32 -> y [B, 4 + nc, A] float32``; for a segmentation model
            (``nm > 0``) ``-> (y [B, 4 + nc + nm, A], prototypes [B, nm, H_p, W_p])`` float32.
        fixed_shape: ``(h, w)`` the model only accepts (a static ONNX graph), else None.
        fixed_batch: the only batch size it accepts, else None.
        precision: what the forward pass computes in (``float32`` / ``float16``), and the stored weights' dtype.
        nm: number of mask coefficients (0: a detection model).
        runtime: what computes the forward pass, in words: ``torch on cpu``, ``torch on cuda:0``, or for ONNX
            ``onnxruntime CUDAExecutionProvider on cuda:0`` / ``onnxruntime CPUExecutionProvider on cpu`` with the
            reason when ``--device cuda`` could not be honoured (:func:`reparam.converter.device.onnx_placement`).
    """

    form: str
    names: dict[int, str]
    stride: int
    predict: Callable[[torch.Tensor], Prediction]
    fixed_shape: tuple[int, int] | None = None
    fixed_batch: int | None = None
    precision: str = "float32"
    weights_dtype: str = "float32"
    nm: int = 0
    runtime: str = "torch on cpu"

    @property
    def task(self) -> str:
        """``segment`` for a model with mask outputs, else ``detect``."""
        return "segment" if self.nm else "detect"


def _segment_output(out: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, prototypes)`` of a segmentation head's eval output (``(cat(y, mc), (maps, mc, p))``) or export output
    (``(cat(y, mc), p)``, TorchScript)."""
    from ..converter.validation import unpack_output

    if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out) \
            and out[1].dim() == 4:
        return out[0], out[1]
    parts = unpack_output(out)
    if parts.prototypes is None:
        raise ValueError("the segmentation model returned no prototypes")
    return parts.y, parts.prototypes


def _torch_predictor(model: nn.Module, device: torch.device | str | None = None,
                     segment: bool = False) -> Callable[[torch.Tensor], Prediction]:
    """``images -> y`` (``segment``: ``-> (y, prototypes)``) of a torch model in fp32; with a CUDA ``device`` the
    model is moved there (in place), each batch goes there and the prediction comes back to the CPU."""
    from ..converter.validation import main_output, strict_fp32

    dev = torch.device(device) if device is not None else torch.device("cpu")
    model = model.float().eval()
    if dev.type != "cpu":
        model.to(dev)

    def predict(x: torch.Tensor) -> Prediction:
        with torch.inference_mode(), strict_fp32():
            out = model(x.to(dev))
            if segment:
                y, p = _segment_output(out)
                return y.float().cpu(), p.float().cpu()
            return main_output(out).float().cpu()

    return predict


def _dtype_of(model: nn.Module) -> str:
    p = next(iter(model.parameters()), None)
    return str(p.dtype).replace("torch.", "") if p is not None else "float32"


def from_module(model: nn.Module, form: str = "fused", names: dict[int, str] | None = None, *,
                device: torch.device | str | None = None) -> LoadedModel:
    """Wrap an in-memory YOLOv9 model (ours, eval; any head: the main branch is evaluated).

    ``device``: where it computes (``None``: the CPU; a CUDA device moves the model there, in place, in fp32)."""
    stride = int(max(torch.as_tensor(model.stride).tolist()))
    dtype = _dtype_of(model)
    nm = int(getattr(model.model[-1], "nm", 0) or 0) if hasattr(model, "model") else 0
    return LoadedModel(form, dict(names or model.names), stride, _torch_predictor(model, device, bool(nm)),
                       weights_dtype=dtype, nm=nm, runtime=f"torch on {torch.device(device or 'cpu')}")


def _is_torchscript(path: Path) -> bool:
    if path.suffix == ".torchscript":
        return True
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _meta_nm(meta: dict[str, str], path: Path) -> int:
    """Mask coefficients of an exported model from its metadata (``task: segment``, ``nm``); 0 for detection."""
    if str(meta.get("task", "detect")) != "segment":
        return 0
    try:
        return int(meta["nm"])
    except (KeyError, ValueError, TypeError):
        raise InvalidInputError(f"'{path}' is a segmentation model without 'nm' in its metadata (export it with "
                                "reparam, which stores it)") from None


def _meta_names(meta: dict[str, Any], path: Path) -> tuple[dict[int, str], int]:
    from ..converter.export.modules import names_from_metadata

    try:
        raw = meta["names"]  # a JSON object in a TorchScript config.txt (official form), else the literal's text
        names = ({int(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else names_from_metadata(raw))
        stride = int(float(meta.get("stride", 32)))
    except (KeyError, ValueError, TypeError, AttributeError):
        raise InvalidInputError(f"'{path}' carries no class names in its metadata (export it with reparam, which "
                                "stores 'names' and 'stride')") from None
    return names, stride


def _load_onnx(path: Path, device: torch.device | str | None = None) -> LoadedModel:
    """An ONNX file run by onnxruntime on ``device`` (None: the CPU): its CUDA provider when the device is CUDA and
    this onnxruntime has it, else the CPU with the reason in :attr:`LoadedModel.runtime` (the same rule as the
    export check, :func:`reparam.converter.device.onnx_placement`)."""
    import onnx
    import onnxruntime as ort

    from ..converter.device import onnx_placement
    from ..converter.export.onnx_graph import _session, upcast_onnx

    placement = onnx_placement(str(torch.device(device) if device is not None else torch.device("cpu")),
                               ort.get_available_providers())

    def _session_on(proto: Any) -> Any:
        return _session(proto, placement.providers)

    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for a bad file
        raise InvalidInputError(f"'{path}' is not a readable ONNX model ({type(exc).__name__})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    names, stride = _meta_names(meta, path)
    nm = _meta_nm(meta, path)
    wanted = 2 if nm else 1
    if len(proto.graph.output) != wanted:
        raw = "output0 and output1 (prototypes)" if nm else "output0"
        raise InvalidInputError(f"'{path}' has {len(proto.graph.output)} outputs: evaluation needs the raw prediction "
                                f"graph ({raw}), not an end-to-end (--nms) graph")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in proto.graph.input[0].type.tensor_type.shape.dim]
    fp16 = proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    sess = None
    precision = "float16" if fp16 else "float32"
    if fp16:
        try:
            sess = _session_on(proto)
            probe = np.zeros([d or s for d, s in zip(dims, (1, 3, 2 * stride, 2 * stride))], dtype=np.float16)
            sess.run(None, {sess.get_inputs()[0].name: probe})
        except Exception:  # noqa: BLE001 - no fp16 kernels here: run the upcast graph
            sess, precision = _session_on(upcast_onnx(proto)), "float32 (fp16 graph upcast: no fp16 kernels here)"
    else:
        sess = _session_on(proto)
    name = sess.get_inputs()[0].name
    half_in = precision == "float16"

    def predict(x: torch.Tensor) -> Prediction:
        arr = x.numpy().astype(np.float16) if half_in else x.numpy()
        outs = sess.run(None, {name: arr})
        y = torch.from_numpy(np.asarray(outs[0])).float()
        return (y, torch.from_numpy(np.asarray(outs[1])).float()) if nm else y

    fixed = (dims[2], dims[3]) if dims[2] and dims[3] else None
    used = sess.get_providers()
    provider, on, reason = placement.ran_on(used[0] if used else None)
    runtime = f"onnxruntime {provider} on {on}" + ("" if on == placement.device == str(torch.device(device or "cpu"))
                                                    else f" ({reason})")
    return LoadedModel("onnx", names, stride, predict, fixed_shape=fixed, fixed_batch=dims[0],
                       precision=precision, weights_dtype="float16" if fp16 else "float32", nm=nm, runtime=runtime)


def _load_torchscript(path: Path, device: torch.device | str | None = None) -> LoadedModel:
    """A TorchScript file on ``device``. A trace keeps the device it ran on (``config.txt``'s ``device``; files
    without it were traced on the CPU), so it is loaded there and a different ``device`` is refused with one line
    (InvalidInputError) rather than failing inside the graph."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    extra = {"config.txt": ""}
    try:
        module = torch.jit.load(str(path), map_location=dev, _extra_files=extra).eval()
    except Exception as exc:  # noqa: BLE001 - torch.jit raises several types for a bad file; all become one line
        raise InvalidInputError(f"'{path}' is not a loadable TorchScript module ({type(exc).__name__})") from None
    try:
        meta = json.loads(extra["config.txt"] or "{}")
    except ValueError:
        meta = {}
    names, stride = _meta_names(meta, path)
    nm = _meta_nm(meta, path)
    traced_on = str(meta.get("device") or "cpu")
    if traced_on != str(dev):
        raise InvalidInputError(f"'{path}' was traced on {traced_on} and runs there only (a TorchScript trace keeps "
                                f"its device): evaluate it with --device {traced_on}, or convert again with --device "
                                f"{dev} for a TorchScript file of that device")
    dtype = _dtype_of(module)
    module = module.float()

    def predict(x: torch.Tensor) -> Prediction:
        from ..converter.validation import main_output, strict_fp32

        with torch.inference_mode(), strict_fp32():
            out = module(x.to(dev))
            if nm:
                y, p = _segment_output(out)
                return y.float().cpu(), p.float().cpu()
            return main_output(out).float().cpu()

    return LoadedModel("torchscript", names, stride, predict, weights_dtype=dtype, nm=nm, runtime=f"torch on {dev}")


def load_model(path: str | Path, *, prefer_ema: bool = True, device: torch.device | str | None = None) -> LoadedModel:
    """Load any model form reparam knows from a local file (see the module table).

    ``device``: where the model computes (``None``: the CPU); ONNX on onnxruntime's CUDA provider when ``device`` is
    CUDA and this onnxruntime has it, else on its CPU provider (:attr:`LoadedModel.runtime` says which and why).

    Raises:
        InvalidInputError: not a model file, an end-to-end ONNX graph, no class names in the metadata.
        UnsafeCheckpointError: a checkpoint whose pickle names a disallowed global.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"model '{path}' does not exist (no such file)")
    if path.suffix == ".onnx":
        return _load_onnx(path, device)
    if path.suffix == ".safetensors":
        from ..converter.artifacts import load_safetensors

        return from_module(load_safetensors(path, dtype=None), "safetensors", device=device)
    if _is_torchscript(path):
        return _load_torchscript(path, device)
    from ..converter.checkpoint import read_checkpoint
    from ..converter.convert import build_model

    ckpt = read_checkpoint(path, prefer_ema=prefer_ema)
    model = build_model(ckpt.cfg, ckpt.nc, ckpt.names, ckpt.state_dict)
    from ..converter.pruning import DEPLOY_HEADS

    form = "pt" if ckpt.head_name in DEPLOY_HEADS else "dual"
    loaded = from_module(model, form, ckpt.names, device=device)
    loaded.weights_dtype = ckpt.dtype
    return loaded
