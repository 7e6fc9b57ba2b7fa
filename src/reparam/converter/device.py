"""Which torch device a conversion computes on (``--device``, CRD ``spec.conversion.device``).

The grammar (``auto``, ``cpu``, ``cuda``, ``cuda:N``) is :data:`reparam.spec.DEVICE_PATTERN`; here it meets torch:
``auto`` is CUDA device 0 when ``torch.cuda.is_available()``, else the CPU (the rule of ``yolo`` and of the official
YOLOv9 ``select_device('')``); a CUDA device torch cannot see is refused with one line (exit 2), never silently
replaced by the CPU.

Where the export checks run (:func:`export_placement`, pure: it takes what torch and onnxruntime report, so both
the CUDA and the CPU branch are tested on a machine without a GPU):

* TorchScript is traced on the conversion device and checked there, as the official YOLOv9 ``export.py`` traces
  on its ``--device`` (WongKinYiu/yolov9 ``export.py``: model and sample moved to the device, then
  ``torch.jit.trace``). The trace records that device in its graph (``prim::Constant`` devices of the anchor grid),
  so a CUDA-traced file runs with inputs on that CUDA device only; a CPU-traced one on the CPU.
* ONNX is checked with onnxruntime's ``CUDAExecutionProvider`` (TF32 off, as the torch checks) when the conversion
  device is CUDA and that provider is in ``onnxruntime.get_available_providers()`` (the ``onnxruntime-gpu``
  build); otherwise with the ``CPUExecutionProvider``, and the report says why. The ONNX file itself does not
  depend on the device (it is exported from the CPU model).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import spec
from ..errors import InvalidInputError

__all__ = ["Device", "ExportPlacement", "OnnxPlacement", "ORT_CPU", "ORT_CUDA", "choose_device", "export_placement",
           "onnx_placement", "resolve_device"]

#: onnxruntime's execution providers reparam uses (names as ``onnxruntime.get_available_providers()`` lists them).
ORT_CPU = "CPUExecutionProvider"
ORT_CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class Device:
    """A resolved device.

    Attributes:
        requested: what was asked for (``auto``, ``cpu``, ``cuda``, ``cuda:1``).
        torch: the ``torch.device`` used (``cpu`` or ``cuda:N``, always with an index for CUDA).
        name: the hardware in words: the CUDA device name (``torch.cuda.get_device_name``) or the CPU model.
    """

    requested: str
    torch: torch.device
    name: str

    @property
    def is_cuda(self) -> bool:
        return self.torch.type == "cuda"

    def to_dict(self) -> dict[str, str]:
        """The report's ``device`` section: ``{"requested", "used", "name"}``."""
        return {"requested": self.requested, "used": str(self.torch), "name": self.name}


def _cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (Linux), else :func:`platform.processor` or the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def choose_device(requested: str, cuda_count: int, current: int = 0, *, flag: str = "--device",
                  no_cuda: str = "CUDA is not available here") -> str:
    """The device a request resolves to, from what torch reports: ``"cpu"`` or ``"cuda:N"`` (pure).

    Args:
        requested: a device string of :data:`reparam.spec.DEVICE_PATTERN` (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
        cuda_count: CUDA devices torch can use (``torch.cuda.device_count()`` when ``torch.cuda.is_available()``,
            else 0).
        current: ``torch.cuda.current_device()``, the device a bare ``cuda`` means (as in torch).
        flag: the option named in error messages; no_cuda: why CUDA is missing, for the message.

    ``auto`` is ``cuda:0`` when any CUDA device exists, else ``cpu`` (YOLOv9's ``select_device('')``).

    Raises:
        InvalidInputError: outside the grammar, CUDA asked for where there is none, or an index >= ``cuda_count``.
    """
    problem = spec.device_problem(requested)
    if problem:
        raise InvalidInputError(f"{flag}: {problem}")
    if requested == "cpu" or (requested == "auto" and cuda_count == 0):
        return "cpu"
    if cuda_count == 0:
        raise InvalidInputError(f"{flag} {requested}: {no_cuda}; use --device cpu or auto, or run on a GPU node")
    index = int(requested.split(":")[1]) if ":" in requested else (0 if requested == "auto" else current)
    if index >= cuda_count:
        raise InvalidInputError(f"{flag} {requested}: there is no CUDA device {index} (this machine has "
                                f"{cuda_count}: cuda:0..cuda:{cuda_count - 1})")
    return f"cuda:{index}"


def resolve_device(requested: str | None = None, flag: str = "--device") -> Device:
    """Resolve a device string (default :data:`reparam.spec.DEFAULT_DEVICE`) to the device torch will use
    (:func:`choose_device` with what this torch reports).

    ``flag`` names the option in error messages (``--device``, ``--check-device``).

    Raises:
        InvalidInputError: the string is outside the grammar, or names a CUDA device torch cannot see (no CUDA
            build, no driver, no GPU, or an index >= ``torch.cuda.device_count()``).
    """
    requested = spec.DEFAULT_DEVICE if requested is None else requested
    available = spec.device_problem(requested) is None and requested != "cpu" and torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    no_cuda = (f"CUDA is not available here (torch {torch.__version__} "
               + ("is a CPU-only build" if torch.version.cuda is None else
                  "finds no CUDA device (driver or GPU missing)") + ")")
    used = choose_device(requested, count, torch.cuda.current_device() if count and requested == "cuda" else 0,
                         flag=flag, no_cuda=no_cuda)
    dev = torch.device(used)
    return Device(requested, dev, torch.cuda.get_device_name(dev.index) if dev.type == "cuda" else _cpu_name())


@dataclass(frozen=True)
class OnnxPlacement:
    """Where onnxruntime runs an ONNX export check.

    Attributes:
        providers: what ``onnxruntime.InferenceSession(providers=...)`` is given: ``(ORT_CUDA, {options}),
            ORT_CPU`` or ``ORT_CPU`` alone. CUDA options: ``device_id`` and ``use_tf32 = 0`` (true fp32, as the torch
            checks compute: :func:`reparam.converter.validation.strict_fp32`).
        provider: the provider expected to run the graph (:data:`ORT_CUDA` or :data:`ORT_CPU`).
        device: the device it computes on (``cuda:N`` or ``cpu``); the torch reference of the check runs there too.
        reason: why this provider, in words, for the report.
    """

    providers: tuple[Any, ...]
    provider: str
    device: str
    reason: str

    def ran_on(self, used: str | None) -> tuple[str, str, str]:
        """``(provider, device, reason)`` of a check whose session ran on ``used`` (the first of
        ``InferenceSession.get_providers()``; None: no session was made, the planned provider is assumed).

        onnxruntime drops a listed provider that cannot start (``CUDAExecutionProvider`` without its CUDA/cuDNN
        libraries, or not in this build) and runs on the next one with a warning only; then the check ran on the
        CPU and the reason says so.
        """
        used = used or self.provider
        if used == self.provider:
            return used, self.device, self.reason
        return used, "cpu", (f"{self.provider} was asked for on {self.device} but did not start (onnxruntime fell "
                             f"back to {used}; check the CUDA and cuDNN libraries onnxruntime-gpu needs)")


def onnx_placement(device: str, available: Sequence[str]) -> OnnxPlacement:
    """Choose the onnxruntime provider of an ONNX check on the conversion device ``device`` (``cpu``/``cuda:N``),
    given ``available`` (``onnxruntime.get_available_providers()``). Pure.

    CUDA device and ``CUDAExecutionProvider`` available: that provider on the same device index (CPU as
    onnxruntime's fallback for nodes without a CUDA kernel). CUDA device without it (the CPU ``onnxruntime``
    package): the CPU, and the reason says so and what to install. CPU device: the CPU.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return OnnxPlacement((ORT_CPU,), ORT_CPU, "cpu", "the conversion device is the CPU")
    index = dev.index or 0
    if ORT_CUDA in available:
        return OnnxPlacement(((ORT_CUDA, {"device_id": index, "use_tf32": 0}), ORT_CPU), ORT_CUDA, f"cuda:{index}",
                             f"the conversion device is cuda:{index}")
    have = ", ".join(available) or "none"
    return OnnxPlacement((ORT_CPU,), ORT_CPU, "cpu",
                         f"the conversion device is cuda:{index} but this onnxruntime has no {ORT_CUDA} (it has: "
                         f"{have}); install onnxruntime-gpu to check ONNX files on the GPU")


@dataclass(frozen=True)
class ExportPlacement:
    """Where the export checks of one conversion run: ``torchscript`` the device the TorchScript file is traced
    for and checked on (``cpu``/``cuda:N``), ``onnx`` the ONNX check's :class:`OnnxPlacement`."""

    torchscript: str
    onnx: OnnxPlacement


def export_placement(requested: str, cuda_count: int, ort_available: Sequence[str], current: int = 0
                     ) -> ExportPlacement:
    """The export checks' devices for ``--device requested`` on a machine where torch sees ``cuda_count`` CUDA
    devices and onnxruntime offers ``ort_available`` (pure: :func:`choose_device`, then :func:`onnx_placement`).

    Raises InvalidInputError as :func:`choose_device`.
    """
    used = choose_device(requested, cuda_count, current)
    return ExportPlacement(used, onnx_placement(used, ort_available))
