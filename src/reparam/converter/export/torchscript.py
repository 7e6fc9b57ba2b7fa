"""TorchScript export: ``torch.jit.trace`` of the prediction wrapper on the conversion device, metadata in a
``config.txt`` extra file."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .modules import Predictions, names_from_metadata
from .onnx_graph import quiet

__all__ = ["export_torchscript"]


def export_torchscript(module: Predictions, path: Path, sample: torch.Tensor, *, half: bool = False,
                       metadata: dict[str, str] | None = None, device: torch.device | str = "cpu"
                       ) -> torch.jit.ScriptModule:
    """Trace ``module`` on ``device`` and save it with a ``config.txt`` extra file (metadata JSON plus the tracing
    ``shape`` and ``device``; ``names`` as a JSON object and ``stride`` as an int, the official ``export.py`` form).

    Shapes stay free (the anchor grid is computed from the feature maps): ``images [B, 3, H, W] -> [B, 4 + nc, A]``.
    With ``half`` the model and the tracing input are fp16 (the trace runs one fp16 forward on ``device``).
    ``device``: where the trace runs, as the official YOLOv9 ``export.py`` traces on its ``--device``; the graph
    keeps that device (:mod:`reparam.converter.device`), so a CUDA-traced file takes inputs on that CUDA device only.
    ``module`` itself is not moved (a copy is). Returns the traced module (on ``device``).
    """
    dev = torch.device(device)
    module = copy.deepcopy(module).eval()
    module = (module.half() if half else module.float()).to(dev)
    x = (sample.half() if half else sample.float()).to(dev)
    with torch.no_grad():
        traced = quiet(lambda: torch.jit.trace(module, x, check_trace=False, strict=False))
    config: dict[str, object] = {**(metadata or {}), "shape": list(sample.shape), "device": str(dev)}
    # as the official export.py writes config.txt: "stride" an int and "names" a JSON object of id -> name (its
    # DetectMultiBackend turns the digit keys back into ints and indexes names by class id; a string there would
    # be indexed by character)
    if "names" in config:
        config["names"] = names_from_metadata(str(config["names"]))
    if "stride" in config:
        config["stride"] = int(float(str(config["stride"])))
    extra = {"config.txt": json.dumps(config)}
    torch.jit.save(traced, str(path), _extra_files=extra)
    return traced
