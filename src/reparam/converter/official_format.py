"""Write a deploy model in the official YOLOv9 checkpoint format.

The official ``detect.py``/``val.py``/``export.py`` load weights with ``torch.load`` and expect the pickled model to
be an instance of their own ``models.yolo.DetectionModel`` built from ``models.common`` blocks (see
``models/experimental.py::attempt_load``). The published ``yolov9-c-converted.pt`` is::

    {'model': DetectionModel (fp16, eval), 'optimizer': None, 'best_fitness': None, 'ema': None,
     'updates': None, 'opt': None, 'git': None, 'date': None, 'epoch': -1}

Our blocks carry the same instance attributes as the official ones, so a pickle that names the official classes
instead of ours is what those scripts load. :class:`OfficialNamePickler` does exactly that renaming at pickling
time; nothing is monkey-patched and ``sys.modules`` is untouched.

The C pickler cannot be told to write a class under another name (its ``save_global`` imports the class's module
and checks that the name leads back to the class), and the pure-Python one is ~4x slower on a large model. So
:class:`FastOfficialPickler` pickles with the C pickler and renames the class references in the finished bytes,
where that is provably exact (:func:`rename_globals`), and falls back to :class:`OfficialNamePickler` otherwise;
both give the same bytes.
"""

from __future__ import annotations

import _compat_pickle
import copyreg
import io
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


def rename_globals(data: bytes, renames: dict[bytes, bytes]) -> bytes | None:
    """``data`` with each ``GLOBAL`` opcode of ``renames`` (old opcode bytes -> new) replaced, or ``None`` when
    that is not provably exact.

    In protocols 0-3 a class is written as the ``GLOBAL`` opcode ``c<module>\\n<name>\\n`` once and then fetched from
    the memo by index, and there are no frames (CPython ``Lib/pickle.py``, ``Lib/pickletools.py``): the opcodes
    hold no offsets, so an opcode may change length. The caller passes only classes that were really pickled, so
    each old opcode occurs at least once; when it occurs exactly once (also counting overlapping matches), that one
    is the opcode, not a look-alike inside a string or bytes value. Otherwise ``None``: the caller falls back to
    renaming while pickling.
    """
    spans: list[tuple[int, int, bytes]] = []
    for old, new in renames.items():
        at = data.find(old)
        if at < 0 or data.find(old, at + 1) >= 0:
            return None
        spans.append((at, at + len(old), new))
    spans.sort()
    parts: list[bytes] = []
    pos = 0
    for start, end, new in spans:
        if start < pos:  # two opcodes cannot overlap; a match that does is not an opcode
            return None
        parts += [data[pos:start], new]
        pos = end
    parts.append(data[pos:])
    return b"".join(parts)


def _global_opcode(module: str, name: str) -> bytes:
    return pickle.GLOBAL + module.encode("utf-8") + b"\n" + name.encode("utf-8") + b"\n"


class FastOfficialPickler(pickle.Pickler):
    """The C pickler, writing our block classes under the official global names like :class:`OfficialNamePickler`
    (the same bytes, ~4x faster).

    Protocols 0-3: the object is pickled with the C pickler into a buffer; :meth:`reducer_override` (called for
    every class the pickler writes, before it writes it) records which of our classes are pickled; their
    ``GLOBAL`` opcodes are then renamed in the buffer (:func:`rename_globals`) and the result is written to the file.
    Where that is not provably exact (an opcode's bytes also occur inside a string or bytes value, a class written
    by a ``copyreg`` extension code or renamed by Python 2 compatibility), and for protocols 4 and 5 (classes as
    memoized ``STACK_GLOBAL`` strings, and frames), the object is pickled again with :class:`OfficialNamePickler`;
    a subclass's ``persistent_id`` (``torch.save``'s) is used by both.

    Only :meth:`dump` is supported (what ``torch.save`` calls), once per pickler.
    """

    _names: dict[type, tuple[str, str]] = {}

    def __init__(self, file: Any, protocol: int | None = None, **kwargs: Any) -> None:
        self._file = file
        self._buffer = io.BytesIO()
        self._kwargs = kwargs
        proto = pickle.DEFAULT_PROTOCOL if protocol is None else protocol
        self._proto = pickle.HIGHEST_PROTOCOL if proto < 0 else proto
        self._pickled: set[type] = set()
        super().__init__(self._buffer, self._proto, **kwargs)

    def reducer_override(self, obj: Any) -> Any:  # noqa: D401 - pickle API
        """Record our classes as the pickler meets them; reduce nothing (``NotImplemented``: pickle as usual)."""
        if isinstance(obj, type) and obj in self._names:
            self._pickled.add(obj)
        return NotImplemented

    def _renames(self) -> dict[bytes, bytes] | None:
        """The ``GLOBAL`` opcode of each of our pickled classes -> the official one; ``None`` when a class was not
        written as its plain ``GLOBAL`` (a ``copyreg`` extension code, or a Python 2 name mapping of protocols 0-2:
        CPython ``save_global``)."""
        out: dict[bytes, bytes] = {}
        fix = self._kwargs.get("fix_imports", True) and self._proto < 3
        # the ignore: copyreg._extension_registry (what pickle's save_global reads) is not in typeshed
        extensions = copyreg._extension_registry  # type: ignore[attr-defined]
        for cls in self._pickled:
            module, name = cls.__module__, cls.__qualname__
            if (module, name) in extensions or (fix and (
                    (module, name) in _compat_pickle.REVERSE_NAME_MAPPING
                    or module in _compat_pickle.REVERSE_IMPORT_MAPPING)):
                return None
            out[_global_opcode(module, name)] = _global_opcode(*self._names[cls])
        return out

    def dump(self, obj: Any) -> None:
        """Pickle ``obj`` to the file, our classes under their official names."""
        data: bytes | None = None
        if self._proto < 4:
            super().dump(obj)
            renames = self._renames()
            if renames is not None:
                data = rename_globals(self._buffer.getvalue(), renames)
        if data is None:
            fallback = type("Pickler", (OfficialNamePickler,), {"_names": self._names})(
                self._file, self._proto, **self._kwargs)
            fallback.persistent_id = self.persistent_id
            fallback.dump(obj)
        else:
            self._file.write(data)


def _pickle_module(fast: bool = True) -> SimpleNamespace:
    """A ``pickle_module`` for ``torch.save`` whose ``Pickler`` writes our classes under the official names:
    :class:`FastOfficialPickler`, or with ``fast=False`` always the pure-Python :class:`OfficialNamePickler`."""
    names = official_names()
    base = FastOfficialPickler if fast else OfficialNamePickler
    pickler = type("Pickler", (base,), {"_names": names})
    return SimpleNamespace(Pickler=pickler, __name__="reparam_official_pickle", dump=pickle.dump, load=pickle.load)


def save_official(model: nn.Module, path: str | Path) -> None:
    """``torch.save`` the official deploy checkpoint dict holding ``model`` to ``path`` (no other side effects).

    Protocol 2, as the official checkpoints; pickled by :class:`FastOfficialPickler` (about the time of a plain
    ``torch.save``; the same bytes as the pure-Python :class:`OfficialNamePickler`)."""
    ckpt = {"model": model, **EMPTY_TRAINING_STATE}
    torch.save(ckpt, str(path), pickle_module=_pickle_module(), pickle_protocol=2)
