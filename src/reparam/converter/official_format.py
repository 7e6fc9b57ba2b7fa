"""Write a deploy model in the official YOLOv9 checkpoint format.

The official ``detect.py``/``val.py``/``export.py`` load weights with ``torch.load`` and expect the pickled model to
be an instance of their own ``models.yolo.DetectionModel`` built from ``models.common`` blocks (see
``models/experimental.py::attempt_load``). The published ``yolov9-c-converted.pt`` is::

    {'model': DetectionModel (fp16, eval), 'optimizer': None, 'best_fitness': None, 'ema': None,
     'updates': None, 'opt': None, 'git': None, 'date': None, 'epoch': -1}

Our blocks carry the same instance attributes as the official ones, so a pickle that names the official classes
instead of ours is what those scripts load. :class:`OfficialNamePickler` does exactly that renaming at pickling
time; nothing is monkey-patched and ``sys.modules`` is untouched.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

#: The deploy checkpoint's top-level entries besides ``model`` (official ``tools/reparameterization.ipynb``).
EMPTY_TRAINING_STATE: dict[str, Any] = {
    "optimizer": None,
    "best_fitness": None,
    "ema": None,
    "updates": None,
    "opt": None,
    "git": None,
    "date": None,
    "epoch": -1,
}


#: Our classes that YOLOv9 defines in ``models/yolo.py``; every other block lives in ``models/common.py``.
_YOLO_CLASSES = ("DetectionModel", "SegmentationModel", "DDetect", "DualDDetect", "TripleDDetect", "DSegment",
                 "DualDSegment", "Detect", "Segment")


def official_names() -> dict[type, tuple[str, str]]:
    """Our class -> (official module, official class name), for every block :mod:`reparam.models` defines."""
    from .. import models

    out: dict[type, tuple[str, str]] = {}
    for name in getattr(models, "__all__", dir(models)):
        cls = getattr(models, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith("reparam.models"):
            official = getattr(cls, "official_name", None)
            if official is None:
                module = "models.yolo" if name in _YOLO_CLASSES else "models.common"
                official = f"{module}.{cls.__name__}"
            mod, _, qual = official.rpartition(".")
            out[cls] = (mod, qual)
    return out


# the ignore: pickle._Pickler (the pure-Python pickler, whose save_global can be overridden) is not in typeshed
class OfficialNamePickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """A pure-Python pickler that writes our block classes under the official global names.

    Protocol 2 (torch.save's default) writes a class as ``GLOBAL module\\nname\\n``; for the classes in
    :func:`official_names` the official module and name are written instead of ours.
    """

    _names: dict[type, tuple[str, str]] = {}

    def save_global(self, obj: Any, name: str | None = None) -> None:  # noqa: D401 - pickle API
        target = self._names.get(obj) if isinstance(obj, type) else None
        if target is None:
            return super().save_global(obj, name)
        module, qual = target
        if self.proto >= 4:
            self.save(module)
            self.save(qual)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + module.encode("utf-8") + b"\n" + qual.encode("utf-8") + b"\n")
        self.memoize(obj)


def _pickle_module() -> SimpleNamespace:
    names = official_names()
    pickler = type("Pickler", (OfficialNamePickler,), {"_names": names})
    return SimpleNamespace(Pickler=pickler, __name__="reparam_official_pickle", dump=pickle.dump, load=pickle.load)


def save_official(model: nn.Module, path: str | Path) -> None:
    """``torch.save`` the official deploy checkpoint dict holding ``model`` to ``path`` (no other side effects)."""
    ckpt = {"model": model, **EMPTY_TRAINING_STATE}
    torch.save(ckpt, str(path), pickle_module=_pickle_module(), pickle_protocol=2)
