"""Which torch device a conversion computes on (``--device``, CRD ``spec.conversion.device``).

The grammar (``auto``, ``cpu``, ``cuda``, ``cuda:N``) is :data:`reparam.spec.DEVICE_PATTERN`; here it meets torch:
``auto`` is CUDA device 0 when ``torch.cuda.is_available()``, else the CPU (the rule of ``yolo`` and of the official
YOLOv9 ``select_device('')``); a CUDA device torch cannot see is refused with one line (exit 2), never silently
replaced by the CPU.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import spec
from ..errors import InvalidInputError

__all__ = ["Device", "resolve_device"]


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


def resolve_device(requested: str | None = None, flag: str = "--device") -> Device:
    """Resolve a device string (default :data:`reparam.spec.DEFAULT_DEVICE`) to the device torch will use.

    ``flag`` names the option in error messages (``--device``, ``--check-device``).

    Raises:
        InvalidInputError: the string is outside the grammar, or names a CUDA device torch cannot see (no CUDA
            build, no driver, no GPU, or an index >= ``torch.cuda.device_count()``).
    """
    requested = spec.DEFAULT_DEVICE if requested is None else requested
    problem = spec.device_problem(requested)
    if problem:
        raise InvalidInputError(f"{flag}: {problem}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return Device(requested, torch.device("cpu"), _cpu_name())
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + (" is a CPU-only build" if torch.version.cuda is None else
                                                " finds no CUDA device (driver or GPU missing)")
        raise InvalidInputError(f"{flag} {requested}: CUDA is not available here ({build}); use --device cpu or "
                                "auto, or run on a GPU node")
    index = int(requested.split(":")[1]) if ":" in requested else (0 if requested == "auto" else
                                                                     torch.cuda.current_device())
    count = torch.cuda.device_count()
    if index >= count:
        raise InvalidInputError(f"{flag} {requested}: there is no CUDA device {index} (this machine has {count}: "
                                f"cuda:0..cuda:{count - 1})")
    return Device(requested, torch.device("cuda", index), torch.cuda.get_device_name(index))
