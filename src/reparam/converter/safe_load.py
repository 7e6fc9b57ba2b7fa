"""Load a YOLOv9 checkpoint without importing the official code and without running pickle code.

A ``train.py``/``train_dual.py`` checkpoint is a ``torch.save`` zip archive whose ``data.pkl`` pickles the
official classes (``models.yolo.DetectionModel``, ``models.common.RepNCSPELAN4`` ...), torch's own modules and
tensors. ``torch.load(weights_only=True)`` (the default since torch 2.6) refuses such files, and
``weights_only=False`` would import and run whatever the pickle names. Here every global the pickle names is
looked up in a fixed allowlist (:data:`ALLOWED_GLOBALS`) *before* anything is called:

* module classes (official and ``torch.nn``) become inert :class:`ObjectRecord` instances holding the pickled
  ``__dict__`` (``_modules``, ``_parameters``, ``_buffers`` and plain attributes such as ``yaml``);
* tensors are rebuilt by torch's own ``_rebuild_tensor_v2`` / ``_rebuild_parameter`` from the archive's
  storages, which this module reads itself (no ``torch.load``);
* a few harmless builtins (``set``, ``OrderedDict``, ``torch.Size``) are allowed as they are;
* numpy values that the official training loop writes into checkpoint metadata (``best_fitness`` is a float64
  array once a run has any fitness; the optimizer's ``lr``/``momentum`` are float64 scalars from ``np.interp``)
  are rebuilt as plain data: scalars through ``numpy.*.multiarray.scalar``, arrays through
  ``numpy.*.multiarray._reconstruct`` into :class:`InertArray`, numeric dtypes only (object dtypes refused),
  for numpy 1.x (``numpy.core``) and 2.x (``numpy._core``) pickles alike.

The official classes are accepted under the module paths of the official layout (``models.common``,
``models.yolo``) and under the known vendored prefixes of :data:`OFFICIAL_PACKAGE_PREFIXES` (pip-installed forks
of the official repository pickle ``yolov9.models.yolo.DetectionModel``), always by full dotted name; records are
named by the official path and :attr:`RawCheckpoint.package_prefix` says which prefix the file used.

Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, an unknown class) raises
:class:`reparam.errors.UnsafeCheckpointError` naming it, and nothing of it is executed. The list of globals
real checkpoints use is in ``tests/fixtures/README.md``.
"""

from __future__ import annotations

import codecs
import collections
import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import InvalidInputError, UnsafeCheckpointError, brief

# Classes of the official repository (WongKinYiu/yolov9 models/common.py, models/yolo.py) that appear in
# checkpoints, including the segmentation ones. They are never imported: each becomes an ObjectRecord.
OFFICIAL_CLASSES = {
    "models.common": {
        "AConv", "ADown", "CBFuse", "CBLinear", "Concat", "Conv", "DFL", "ELAN1", "RepConvN",
        "RepNBottleneck", "RepNCSP", "RepNCSPELAN4", "SP", "SPPELAN", "Silence", "Proto", "Bottleneck",
        "DWConv",
    },
    "models.yolo": {
        "DetectionModel", "SegmentationModel", "DDetect", "DualDDetect", "TripleDDetect", "DSegment",
        "DualDSegment", "Detect", "DualDetect", "TripleDetect", "Segment",
    },
}

#: Package prefixes under which the official module layout (``models/common.py``, ``models/yolo.py``) is accepted:
#: ``""`` is the official repository run from its root; ``"yolov9."`` is the same code installed as the ``yolov9``
#: package (the ``yolov9pip`` distribution and vendored copies import it as ``yolov9.models.yolo``). Matched by the
#: full dotted name (prefix + ``models.common``/``models.yolo`` + a class in :data:`OFFICIAL_CLASSES`), never by suffix.
OFFICIAL_PACKAGE_PREFIXES = ("", "yolov9.")

TORCH_NN_CLASSES = {
    "torch.nn.modules.container": {"Sequential", "ModuleList"},
    "torch.nn.modules.conv": {"Conv2d"},
    "torch.nn.modules.batchnorm": {"BatchNorm2d"},
    "torch.nn.modules.activation": {"SiLU", "ReLU", "LeakyReLU", "Hardswish", "Sigmoid"},
    "torch.nn.modules.linear": {"Identity"},
    "torch.nn.modules.pooling": {"MaxPool2d", "AvgPool2d"},
    "torch.nn.modules.upsampling": {"Upsample"},
}

# Storage classes named in the archive's persistent ids -> element dtype.
STORAGE_DTYPES = {
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class ObjectRecord:
    """An inert stand-in for a pickled class instance: its qualified name and its pickled ``__dict__``.

    ``record.cls`` is ``"models.common.Conv"`` (the name as pickled), ``record.state`` the dict that
    ``pickle`` passed to BUILD (for an ``nn.Module``: ``_modules``, ``_parameters``, ``_buffers``, ``training``
    and the plain attributes). Nothing of the original class runs.
    """

    cls: str = "?"

    def __init__(self, *args: Any) -> None:  # REDUCE on a record class (never used by torch.save, harmless)
        self.state: dict[str, Any] = {}
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) form
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = state if isinstance(state, dict) else {"__state__": state}

    @property
    def name(self) -> str:
        """Class name without the module, e.g. ``"RepNCSPELAN4"``."""
        return self.cls.rsplit(".", 1)[-1]

    def get(self, key: str, default: Any = None) -> Any:
        """An attribute of the pickled object (``default`` when absent)."""
        return self.state.get(key, default)

    def modules(self) -> dict[str, "ObjectRecord"]:
        """Direct child modules in registration order (``_modules``)."""
        mods = self.state.get("_modules") or {}
        return {k: v for k, v in mods.items() if v is not None}

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "ObjectRecord"]]:
        """(dotted name, record) for this module and every submodule, as ``nn.Module.named_modules``."""
        yield prefix, self
        for k, child in self.modules().items():
            if isinstance(child, ObjectRecord):
                yield from child.named_modules(f"{prefix}.{k}" if prefix else k)

    def named_tensors(self, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
        """``state_dict``-style (name, tensor) pairs: parameters and persistent buffers, depth first.

        Order and names follow ``nn.Module.state_dict`` (own parameters, own buffers, then children).
        """
        non_persistent = self.state.get("_non_persistent_buffers_set") or set()
        for k, v in (self.state.get("_parameters") or {}).items():
            if v is not None:
                yield prefix + k, v
        for k, v in (self.state.get("_buffers") or {}).items():
            if v is not None and k not in non_persistent:
                yield prefix + k, v
        for k, child in self.modules().items():
            if isinstance(child, ObjectRecord):
                yield from child.named_tensors(prefix + k + ".")

    def __repr__(self) -> str:
        return f"<{self.cls} record>"


@dataclass(frozen=True)
class MethodRef:
    """``getattr(<official class>, name)`` as pickled by segmentation checkpoints; inert."""

    cls: str
    attr: str


_RECORD_TYPES: dict[str, type[ObjectRecord]] = {}


def _record_type(qualname: str) -> type[ObjectRecord]:
    if qualname not in _RECORD_TYPES:
        _RECORD_TYPES[qualname] = type(qualname.rsplit(".", 1)[-1] + "Record", (ObjectRecord,), {"cls": qualname})
    return _RECORD_TYPES[qualname]


def _safe_getattr(obj: Any, name: str) -> MethodRef:
    if isinstance(obj, type) and issubclass(obj, ObjectRecord) and isinstance(name, str):
        return MethodRef(obj.cls, name)
    raise UnsafeCheckpointError(
        f"checkpoint calls getattr({brief(obj)}, {brief(name)}); only getattr on a YOLOv9 class is allowed"
    )


def _safe_encode(text: str, encoding: str = "utf-8") -> bytes:
    # numpy scalars are pickled as _codecs.encode(<latin-1 str>, 'latin1')
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(
            f"checkpoint calls _codecs.encode with encoding {encoding!r}; only latin1 is allowed")
    return codecs.encode(text, encoding)


def _numpy_scalar(dtype: Any, data: bytes | None = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafeCheckpointError("checkpoint builds a numpy scalar of an object dtype; refused")
    return np.frombuffer(data or b"", dtype=dtype, count=1)[0]


def _numpy_dtype(*args: Any) -> Any:
    if not args or not isinstance(args[0], str) or args[0].startswith("O"):
        what = " (an object dtype: arbitrary Python objects)" if args and str(args[0]).startswith("O") else ""
        raise UnsafeCheckpointError(
            f"checkpoint builds numpy.dtype{args!r:.60}{what}; only plain numeric dtypes are allowed"
        )
    return np.dtype(args[0])


class InertArray(np.ndarray):  # type: ignore[type-arg]  # any shape and dtype: numpy's generics add nothing here
    """A numpy array rebuilt from a checkpoint pickle: numeric data only, no Python objects inside.

    numpy pickles an array as ``_reconstruct(ndarray, (0,), b'b')`` followed by ``__setstate__((version, shape,
    dtype, is_fortran, raw bytes))``. This subclass runs numpy's own ``__setstate__`` only after checking that the
    dtype holds no Python objects (an object array's state is a list of arbitrary unpickled objects). It behaves as
    a plain ``numpy.ndarray`` (``best_fitness[0]``, ``.tolist()``).

    Raises:
        UnsafeCheckpointError: the pickled array has an object dtype (or a structured dtype with object fields).
    """

    def __setstate__(self, state: Any) -> None:
        dtype = next((x for x in state if isinstance(x, np.dtype)), None) if isinstance(state, tuple) else None
        if dtype is None or dtype.hasobject:
            raise UnsafeCheckpointError(
                "checkpoint holds a numpy object array (arbitrary Python objects inside); refused — only numeric "
                "arrays are accepted in checkpoint metadata"
            )
        super().__setstate__(state)


@dataclass(frozen=True)
class _NdarrayMarker:
    """``numpy.ndarray`` as named by a pickle: usable only as the subtype argument of ``_reconstruct``."""


def _numpy_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> Any:
    if not isinstance(subtype, _NdarrayMarker):
        raise UnsafeCheckpointError(
            f"checkpoint calls numpy _reconstruct with subtype {subtype!r:.60}; only numpy.ndarray is allowed"
        )
    return InertArray.__new__(InertArray, (0,), dtype=np.uint8)


def _plain_globals() -> dict[str, Any]:
    from torch import _utils

    return {
        "__builtin__.set": set,
        "builtins.set": set,
        "__builtin__.frozenset": frozenset,
        "builtins.frozenset": frozenset,
        "__builtin__.getattr": _safe_getattr,
        "builtins.getattr": _safe_getattr,
        "collections.OrderedDict": collections.OrderedDict,
        "torch.Size": torch.Size,
        "torch._utils._rebuild_tensor_v2": _utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": _utils._rebuild_parameter,
        "torch.float16": torch.float16,
        "torch.float32": torch.float32,
        "_codecs.encode": _safe_encode,
        "numpy.core.multiarray.scalar": _numpy_scalar,
        "numpy._core.multiarray.scalar": _numpy_scalar,
        "numpy.dtype": _numpy_dtype,
        "numpy.core.multiarray._reconstruct": _numpy_reconstruct,
        "numpy._core.multiarray._reconstruct": _numpy_reconstruct,
        "numpy.ndarray": _NdarrayMarker(),
    }


def allowed_global(module: str, name: str) -> Any:
    """Resolve one pickled global through the allowlist.

    Returns the object the unpickler may use: a record type, a storage-dtype marker, or one of the plain
    callables above. Raises :class:`UnsafeCheckpointError` for anything else, before it is imported or called.
    """
    qual = f"{module}.{name}"
    official = official_module(module)
    if official is not None and name in OFFICIAL_CLASSES[official]:
        return _record_type(f"{official}.{name}")
    if name in TORCH_NN_CLASSES.get(module, ()):
        return _record_type(qual)
    if module == "torch" and name in STORAGE_DTYPES:
        return _StorageMarker(name)
    plain = _plain_globals()
    if qual in plain:
        return plain[qual]
    hint = _framework_hint(module)
    raise UnsafeCheckpointError(
        f"checkpoint references the global '{qual}', which is not allowed"
        + (f" ({hint})" if hint else "; it was not imported or called. Only YOLOv9 (WongKinYiu/yolov9) "
           "checkpoints and the torch/numpy globals they use are accepted")
    )


def official_module(module: str) -> str | None:
    """The official module (``models.common``/``models.yolo``) that ``module`` names, or None.

    ``module`` must be one of :data:`OFFICIAL_PACKAGE_PREFIXES` followed by an official module name, e.g.
    ``"yolov9.models.yolo"`` -> ``"models.yolo"``; ``"evil.models.yolo"`` -> None.
    """
    for prefix in OFFICIAL_PACKAGE_PREFIXES:
        if module.startswith(prefix) and module[len(prefix):] in OFFICIAL_CLASSES:
            return module[len(prefix):]
    return None


def package_prefix(found_globals: list[str]) -> str | None:
    """The package prefix under which ``found_globals`` name the official classes (``""``, ``"yolov9."``), or None
    when they name none."""
    for qual in found_globals:
        module = qual.rpartition(".")[0]
        official = official_module(module)
        if official is not None:
            return module[: len(module) - len(official)]
    return None


def _framework_hint(module: str) -> str | None:
    root = module.split(".", 1)[0]
    for official in OFFICIAL_CLASSES:
        if module.endswith("." + official):
            known = ", ".join(f"'{p}{official}'" for p in OFFICIAL_PACKAGE_PREFIXES)
            return (f"the YOLOv9 module '{official}' under the unknown package prefix "
                    f"'{module[: -len(official)]}'; accepted: {known}")
    if root == "ultralytics":
        return ("this is an Ultralytics checkpoint (YOLOv8/YOLO11 style), not a WongKinYiu/yolov9 one; reparam "
                "converts YOLOv9 dual checkpoints")
    if root in ("pytorch_lightning", "lightning", "lightning_fabric"):
        return "this is a PyTorch Lightning checkpoint, not a WongKinYiu/yolov9 one"
    if root in ("mmdet", "mmengine", "mmcv", "detectron2", "timm"):
        return f"this is a {root} checkpoint, not a WongKinYiu/yolov9 one"
    return None


@dataclass(frozen=True)
class _StorageMarker:
    name: str

    @property
    def dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.name]


class _Unpickler(pickle.Unpickler):
    """The allowlisting unpickler: every global the stream names goes through :func:`allowed_global`.

    The C unpickler resolves each ``GLOBAL``/``STACK_GLOBAL`` opcode (and each extension code) through
    :meth:`find_class` and nothing else, so a global outside the allowlist is refused there, before it is imported or
    called (the approach of ``torch.load(weights_only=True)``). ``globals`` records, in first-use order, every global
    the stream named, for :attr:`RawCheckpoint.package_prefix`.
    """

    def __init__(self, file: io.BytesIO, storages: "_StorageReader") -> None:
        super().__init__(file, encoding="utf-8")
        self._storages = storages
        self.globals: dict[str, None] = {}

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        found = allowed_global(module, name)  # raises for anything outside the allowlist
        self.globals.setdefault(f"{module}.{name}", None)
        return found

    def persistent_load(self, pid: Any) -> Any:
        # torch.save writes ('storage', <storage class>, key, location, numel) for each storage
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise InvalidInputError(
                f"checkpoint has an unknown persistent id {brief(pid)}; is it a torch.save archive?")
        _, marker, key, _location, numel = pid
        dtype = marker.dtype if isinstance(marker, _StorageMarker) else torch.uint8
        return self._storages.typed(str(key), dtype, int(numel))


class _StorageReader:
    """Reads ``<archive>/data/<key>`` records of a torch.save zip into typed storages (CPU, once each)."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str) -> None:
        self._zf = zf
        self._prefix = prefix
        self._cache: dict[str, Any] = {}

    def typed(self, key: str, dtype: torch.dtype, numel: int) -> Any:
        if key not in self._cache:
            name = f"{self._prefix}data/{key}"
            try:
                raw = self._zf.read(name)
            except KeyError:
                raise InvalidInputError(f"checkpoint archive lacks tensor data '{name}'; the file is damaged") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) < numel * itemsize:
                raise InvalidInputError(
                    f"checkpoint tensor data '{name}' holds {len(raw)} bytes, {numel * itemsize} expected; "
                    "the file is truncated or damaged"
                )
            untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
            self._cache[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return self._cache[key]


@dataclass
class RawCheckpoint:
    """What :func:`load_pickle` found: the unpickled top-level object and the globals the pickle names."""

    path: Path
    obj: Any
    globals: list[str] = field(default_factory=list)

    @property
    def package_prefix(self) -> str | None:
        """Prefix of the official module layout in this file (``""`` official, ``"yolov9."`` a pip fork)."""
        return package_prefix(self.globals)


def load_pickle(path: str | Path) -> RawCheckpoint:
    """Unpickle a ``torch.save`` zip archive through the allowlist.

    Returns the top-level object (a dict for YOLOv9 checkpoints) with module instances as
    :class:`ObjectRecord` and tensors as real CPU tensors in their saved dtype.

    Raises:
        InvalidInputError: missing file, not a zip archive (not a torch >= 1.6 checkpoint), truncated or damaged.
        UnsafeCheckpointError: the pickle references a global outside the allowlist (named in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"checkpoint '{path}' does not exist or is not a file")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        head = path.read_bytes()[:16] if path.stat().st_size else b""
        if head.startswith(b"\x80") or head[:2] == b"\x8a\x0a":
            raise InvalidInputError(
                f"'{path}' is a legacy (pre-1.6) torch pickle; re-save it with a current torch, then convert"
            ) from None
        if head[:8] == b"\x89HDF\r\n\x1a\n"[:8]:
            raise InvalidInputError(f"'{path}' is an HDF5 file (Keras?), not a YOLOv9 checkpoint") from None
        if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
            raise InvalidInputError(
                f"'{path}' looks like a safetensors file; reparam converts YOLOv9 training checkpoints (.pt)"
            ) from None
        raise InvalidInputError(
            f"'{path}' is not a PyTorch checkpoint (not a torch.save zip archive) or it is truncated"
        ) from None
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise InvalidInputError(f"'{path}' is a zip file but has no data.pkl: not a torch.save checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        try:
            data = zf.read(pkl[0])
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise InvalidInputError(f"'{path}' is damaged or truncated ({brief(exc, 100)})") from None
        unpickler = _Unpickler(io.BytesIO(data), _StorageReader(zf, prefix))
        try:
            obj = unpickler.load()
        except (UnsafeCheckpointError, InvalidInputError):
            raise
        except (zipfile.BadZipFile, EOFError, OSError, pickle.UnpicklingError) as exc:
            raise InvalidInputError(f"'{path}' is damaged or truncated ({brief(exc, 100)})") from None
        except Exception as exc:
            raise InvalidInputError(
                f"'{path}' could not be unpickled safely: {type(exc).__name__}: {brief(exc, 100)}") from None
    return RawCheckpoint(path=path, obj=obj, globals=list(unpickler.globals))
