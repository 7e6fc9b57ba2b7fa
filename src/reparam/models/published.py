"""Model configs: the published YOLOv9 / GELAN architectures (package data) and users' config files.

The published configs of WongKinYiu/yolov9 (``models/detect/{yolov9,gelan}-{t,s,m,c,e}.yaml``, ``yolov9-cf.yaml``,
``models/segment/{yolov9,gelan}-c-dseg.yaml`` and ``gelan-c-seg.yaml``) ship as
``reparam/models/configs/<name>.yaml``, in the official config format (``nc``, ``depth_multiple``,
``width_multiple``, ``anchors``, ``backbone``, ``head``; each layer ``[from, number, module, args]``). They are
reparam's own description of those architectures (the one source: tests read them from here too), and what
``reparam convert weights.pt --cfg yolov9-c`` builds for a bare state_dict.

No torch import: a config is a plain dict until :class:`reparam.models.DetectionModel` builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import InvalidInputError, brief

__all__ = ["CONFIG_SUFFIXES", "PUBLISHED_DEPLOY", "ResolvedConfig", "published_config", "published_names",
           "resolve_config"]

#: File name endings of a config file.
CONFIG_SUFFIXES = (".yaml", ".yml")
#: Each published dual (PGI) config -> the published deploy config WongKinYiu/yolov9 gives for it (the README's
#: model table and ``tools/reparameterization.ipynb``: yolov9-X -> gelan-X; yolov9-cf keeps the yolov9-c graph).
#: Only for comparing: reparam derives the deploy graph from the checkpoint (``reparam.converter.pruning``).
PUBLISHED_DEPLOY = {
    **{f"yolov9-{v}": f"gelan-{v}" for v in "tsmce"},
    "yolov9-cf": "gelan-c",
    "yolov9-c-dseg": "gelan-c-dseg",
}


def _configs_dir():
    return resources.files("reparam.models").joinpath("configs")


def published_names() -> list[str]:
    """Names of the published configs shipped with reparam, sorted: ``gelan-c`` ... ``yolov9-t``."""
    return sorted(p.name[: -len(".yaml")] for p in _configs_dir().iterdir() if p.name.endswith(".yaml"))


def _check(cfg: Any, where: str) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise InvalidInputError(f"model config {where} is not a mapping (it holds a {type(cfg).__name__})")
    missing = [k for k in ("nc", "depth_multiple", "width_multiple", "backbone", "head") if k not in cfg]
    if missing:
        raise InvalidInputError(f"model config {where} lacks {', '.join(missing)}: it needs nc, depth_multiple, "
                                "width_multiple, backbone and head (the official YOLOv9 config format)")
    return cfg


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        return _check(yaml.safe_load(text), where)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise InvalidInputError(f"model config {where} is not valid YAML{at}: "
                                f"{brief(getattr(err, 'problem', None) or err, 80)}") from None


def published_config(name: str, nc: int | None = None) -> dict[str, Any]:
    """The published config ``name`` (e.g. ``"yolov9-c"``) as a dict, with ``nc`` overriding its ``nc: 80``.

    Raises:
        InvalidInputError: ``name`` is not one of :func:`published_names`.
    """
    path = _configs_dir().joinpath(f"{name}.yaml")
    if name not in published_names():
        raise InvalidInputError(f"unknown published config {brief(name)}: choose from {', '.join(published_names())}")
    cfg = _parse(path.read_text(), name)
    if nc is not None:
        cfg["nc"] = nc
    return cfg


@dataclass(frozen=True)
class ResolvedConfig:
    """A config dict and where it came from.

    Attributes:
        cfg: the config dict (``model.yaml`` form).
        source: ``"published:<name>"`` or the config file's path.
        yaml_file: the file name the official code records as the model's ``yaml_file`` (``yolov9-c.yaml``).
    """

    cfg: dict[str, Any]
    source: str
    yaml_file: str


def resolve_config(spec: str | Path) -> ResolvedConfig:
    """The config ``--cfg spec`` names: a config file, else a published name.

    Rule: an existing file is read (official YOLOv9 YAML format). Otherwise a bare name, with or without
    ``.yaml``/``.yml`` and without a folder (``yolov9-c``, ``yolov9-c.yaml``), is the published config of that
    name. Anything else is an error naming what exists.

    Raises:
        InvalidInputError: no such file and no such published config; invalid YAML; not a model config.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        try:
            raw = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise InvalidInputError(f"cannot read model config {brief(text)}: {brief(err, 80)}") from None
        return ResolvedConfig(_parse(raw, brief(text)), str(path), path.name)
    name = path.name
    for suffix in CONFIG_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if path.parent == Path(".") and name in published_names():
        return ResolvedConfig(published_config(name), f"published:{name}", f"{name}.yaml")
    raise InvalidInputError(
        f"--cfg {brief(text)} is neither a config file nor a published config "
        f"({', '.join(published_names())})"
    )
