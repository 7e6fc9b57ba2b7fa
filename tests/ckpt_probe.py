"""Test helper: read an official YOLOv9 checkpoint without importing or calling its classes.

The pickle's globals are replaced by inert stand-ins that only record their state;
tensors are rebuilt from the zip's raw storages. Used to compare our modules with the
official ones (instance attributes, state_dict keys, shapes, values).
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

_DTYPES = {"HalfStorage": torch.float16, "FloatStorage": torch.float32, "LongStorage": torch.int64,
           "DoubleStorage": torch.float64, "BFloat16Storage": torch.bfloat16}


class Stub:
    """Stand-in for any pickled class instance: keeps the class name and the state."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["args"] = args
        self.__dict__["state"] = None

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state


def _stub_class(module: str, name: str) -> type:
    return type(name, (Stub,), {"qualname": f"{module}.{name}"})


class _Unpickler(pickle.Unpickler):
    def __init__(self, fh, zf: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(fh)
        self._zf, self._prefix, self._storages = zf, prefix, {}

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle hook
        full = f"{module}.{name}"
        if full == "collections.OrderedDict":
            return OrderedDict
        if full in ("__builtin__.set", "builtins.set"):
            return set
        if full == "torch._utils._rebuild_tensor_v2":
            return lambda storage, offset, size, stride, *rest: torch.as_strided(storage, size, stride, offset)
        if full == "torch._utils._rebuild_parameter":
            return lambda data, requires_grad, hooks, *rest: data
        if full == "torch.Size":
            return lambda *a: torch.Size(*a)
        return _stub_class(module, name)

    def persistent_load(self, pid):
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            raw = self._zf.read(f"{self._prefix}/data/{key}")
            dtype = _DTYPES[storage_type.__name__]
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            self._storages[key] = flat[:numel]
        return self._storages[key]


def load(path: Path) -> dict:
    """The checkpoint's top-level dict with Stub modules and real tensors."""
    with zipfile.ZipFile(path) as zf:
        pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        with zf.open(pkl) as fh:
            return _Unpickler(fh, zf, pkl.rsplit("/", 1)[0]).load()


def public_attrs(obj: Stub) -> dict:
    """Instance attributes of a pickled module, without nn.Module internals."""
    return {k: v for k, v in obj.state.items() if not k.startswith("_") and k != "training"}


def named_modules(obj: Stub, prefix: str = ""):
    """(dotted name, Stub) for the module and all submodules, like nn.Module.named_modules."""
    yield prefix, obj
    for name, child in obj.state["_modules"].items():
        if child is not None:
            yield from named_modules(child, f"{prefix}.{name}" if prefix else name)


def state_dict(obj: Stub) -> "OrderedDict[str, torch.Tensor]":
    """The module tree's parameters and persistent buffers, keyed as nn.Module.state_dict."""
    out: OrderedDict = OrderedDict()
    for name, mod in named_modules(obj):
        st = mod.state
        skip = st.get("_non_persistent_buffers_set", set())
        for group in ("_parameters", "_buffers"):
            for k, v in st[group].items():
                if v is not None and k not in skip:
                    out[f"{name}.{k}" if name else k] = v
    return out
