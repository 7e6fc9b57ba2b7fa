"""Test helper: compare model configs written in different styles (relative or absolute ``from`` fields)."""

from __future__ import annotations

from typing import Any

from reparam.converter.pruning import layers_of, resolve_from


def normalized_layers(cfg: dict[str, Any]) -> list[tuple[tuple[int, ...], Any, str, Any]]:
    """Layers of ``cfg`` as ``(absolute from indices, number, module class name, args)``, using the converter's own
    parsing of ``from`` fields (:func:`reparam.converter.pruning.resolve_from`)."""
    return [(tuple(resolve_from(f, i)), number, module.rsplit(".", 1)[-1], args)
            for i, (f, number, module, args) in enumerate(layers_of(cfg))]
