"""Every model form reparam reads or writes, behind one call: images in, decoded predictions out.

=================  ===========================================================================================
form               how it is loaded and run
=================  ===========================================================================================
``dual``           a training checkpoint (``train_dual.py``): :func:`~reparam.converter.checkpoint.read_checkpoint`
                   (the EMA when the file holds one, as the official ``attempt_load``), our model, main branch
``pt``             a deploy checkpoint (``*-converted.pt``, official format), read the same way
``safetensors``    :func:`~reparam.converter.artifacts.load_safetensors` (no pickle)
``onnx``           onnxruntime (CPU); class names and stride from the metadata reparam writes
``torchscript``    ``torch.jit.load``; names and stride from its ``config.txt`` extra file
``fused``          an in-memory model handed over by the converter (:func:`from_module`)
=================  ===========================================================================================

Precision (decided once for all forms): torch models run in **fp32** with the weights as stored (fp16 weights are
upcast exactly), as the official ``val.py`` does on CPU (``half`` only on CUDA); an fp16 ONNX graph runs as stored
(fp16 input) when onnxruntime can run it here, else upcast to fp32 (the ``precision`` field says which); an fp16
TorchScript module is upcast to fp32. Models are not fused here (the converter evaluates its fused model as its own
``fused`` entry).

Every predictor maps ``images [B, 3, H, W]`` float32 RGB in [0, 1] to ``y [B, 4 + nc, A]`` float32 (box xywh in
input pixels, then class scores), the main branch only.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import InvalidInputError


@dataclass
class LoadedModel:
    """A model ready to evaluate.

    Attributes:
        form: ``dual``, ``pt``, ``safetensors``, ``onnx``, ``torchscript`` or ``fused``.
        names: class id -> name; stride: the largest stride in pixels.
        predict: ``images [B, 3, H, W] float32 -> y [B, 4 + nc, A] float32``.
        fixed_shape: ``(h, w)`` the model only accepts (a static ONNX graph), else None.
        fixed_batch: the only batch size it accepts, else None.
        precision: what the forward pass computes in (``float32`` / ``float16``), and the stored weights' dtype.
    """

    form: str
    names: dict[int, str]
    stride: int
    predict: Callable[[torch.Tensor], torch.Tensor]
    fixed_shape: tuple[int, int] | None = None
    fixed_batch: int | None = None
    precision: str = "float32"
    weights_dtype: str = "float32"


def _torch_predictor(model: nn.Module, device: torch.device | str | None = None) -> Callable[[torch.Tensor],
                                                                                           torch.Tensor]:
    """``images -> y`` of a torch model in fp32; with a CUDA ``device`` the model is moved there (in place), each
    batch goes there and the prediction comes back to the CPU."""
    from ..converter.validation import main_output, strict_fp32

    dev = torch.device(device) if device is not None else torch.device("cpu")
    model = model.float().eval()
    if dev.type != "cpu":
        model.to(dev)

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), strict_fp32():
            return main_output(model(x.to(dev))).float().cpu()

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
    return LoadedModel(form, dict(names or model.names), stride, _torch_predictor(model, device),
                       weights_dtype=dtype)


def _is_torchscript(path: Path) -> bool:
    if path.suffix == ".torchscript":
        return True
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _meta_names(meta: dict[str, str], path: Path) -> tuple[dict[int, str], int]:
    try:
        names = {int(k): str(v) for k, v in json.loads(meta["names"]).items()}
        stride = int(float(meta.get("stride", 32)))
    except (KeyError, ValueError, TypeError, AttributeError):
        raise InvalidInputError(f"'{path}' carries no class names in its metadata (export it with reparam, which "
                                "stores 'names' and 'stride')") from None
    return names, stride


def _load_onnx(path: Path) -> LoadedModel:
    import onnx

    from ..converter.export.onnx_graph import _session, upcast_onnx

    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for a bad file
        raise InvalidInputError(f"'{path}' is not a readable ONNX model ({type(exc).__name__})") from None
    names, stride = _meta_names({p.key: p.value for p in proto.metadata_props}, path)
    if len(proto.graph.output) != 1:
        raise InvalidInputError(f"'{path}' has {len(proto.graph.output)} outputs: evaluation needs the raw prediction "
                                "graph (output0), not an end-to-end (--nms) graph")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in proto.graph.input[0].type.tensor_type.shape.dim]
    fp16 = proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    sess = None
    precision = "float16" if fp16 else "float32"
    if fp16:
        try:
            sess = _session(proto)
            probe = np.zeros([d or s for d, s in zip(dims, (1, 3, 2 * stride, 2 * stride))], dtype=np.float16)
            sess.run(None, {sess.get_inputs()[0].name: probe})
        except Exception:  # noqa: BLE001 - no fp16 kernels here: run the upcast graph
            sess, precision = _session(upcast_onnx(proto)), "float32 (fp16 graph upcast: no fp16 kernels here)"
    else:
        sess = _session(proto)
    name = sess.get_inputs()[0].name
    half_in = precision == "float16"

    def predict(x: torch.Tensor) -> torch.Tensor:
        arr = x.numpy().astype(np.float16) if half_in else x.numpy()
        return torch.from_numpy(np.asarray(sess.run(None, {name: arr})[0])).float()

    fixed = (dims[2], dims[3]) if dims[2] and dims[3] else None
    return LoadedModel("onnx", names, stride, predict, fixed_shape=fixed, fixed_batch=dims[0],
                       precision=precision, weights_dtype="float16" if fp16 else "float32")


def _load_torchscript(path: Path, device: torch.device | str | None = None) -> LoadedModel:
    extra = {"config.txt": ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra).eval()
    except Exception as exc:  # noqa: BLE001 - torch.jit raises several types for a bad file; all become one line
        raise InvalidInputError(f"'{path}' is not a loadable TorchScript module ({type(exc).__name__})") from None
    try:
        meta = json.loads(extra["config.txt"] or "{}")
    except ValueError:
        meta = {}
    names, stride = _meta_names(meta, path)
    dtype = _dtype_of(module)
    module = module.float()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cpu":
        module = module.to(dev)

    def predict(x: torch.Tensor) -> torch.Tensor:
        from ..converter.validation import main_output, strict_fp32

        with torch.inference_mode(), strict_fp32():
            return main_output(module(x.to(dev))).float().cpu()

    return LoadedModel("torchscript", names, stride, predict, weights_dtype=dtype)


def load_model(path: str | Path, *, prefer_ema: bool = True, device: torch.device | str | None = None) -> LoadedModel:
    """Load any model form reparam knows from a local file (see the module table).

    ``device``: where torch forms compute (``None``: the CPU); ONNX runs on onnxruntime's CPU provider.

    Raises:
        InvalidInputError: not a model file, an end-to-end ONNX graph, no class names in the metadata.
        UnsafeCheckpointError: a checkpoint whose pickle names a disallowed global.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"model '{path}' does not exist (no such file)")
    if path.suffix == ".onnx":
        return _load_onnx(path)
    if path.suffix == ".safetensors":
        from ..converter.artifacts import load_safetensors

        return from_module(load_safetensors(path, dtype=None), "safetensors", device=device)
    if _is_torchscript(path):
        return _load_torchscript(path, device)
    from ..converter.checkpoint import read_checkpoint
    from ..converter.convert import build_model

    ckpt = read_checkpoint(path, prefer_ema=prefer_ema)
    model = build_model(ckpt.cfg, ckpt.nc, ckpt.names, ckpt.state_dict)
    form = "pt" if ckpt.head_name == "DDetect" else "dual"
    loaded = from_module(model, form, ckpt.names, device=device)
    loaded.weights_dtype = ckpt.dtype
    return loaded
