"""The conversion report (``report.json``) as one typed object: written by the converter, read by the registry
(:mod:`reparam.store`), the CLI's summary and the termination summary the operator reads (:mod:`reparam.summary`).

Pure (standard library only), so the operator image and the CLI's error paths use it without torch. The same
fields are described for other tools by ``reparam/schemas/report.schema.json`` (JSON Schema 2020-12, shipped as
package data, :func:`schema`); the tests validate every report the suite produces against it.

The top-level order of ``report.json`` puts what a reader looks for first (:data:`LEAD`): ``status``, the
``command`` line that made it, the ``versions`` it ran with, the ``artifacts`` written (name, format, bytes,
sha256, check); then the conversion's facts; the deploy graph (``deploy_config``, YOLOv9's model-yaml dict) comes
last and on one line (:func:`dumps`), as it is data for programs, not for reading.

In the spirit of torchvision's ``Weights.meta``: typed fields for what the code reads; the sections only people
read (``layers``, ``tensors``, ``removed``, ``options``, ``evaluation`` ...) stay JSON objects in ``details``,
their shape fixed by the schema.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Sequence

#: Statuses of a report: a finished conversion, or one whose equivalence check (or evaluation) failed.
STATUSES = ("succeeded", "validation_failed")
#: Keys written first, in this order.
LEAD = ("status", "command", "versions", "artifacts")
#: Keys written last (long, for programs).
TAIL = ("deploy_config",)
#: Packages whose versions a report records (``None`` when not installed).
VERSIONED = ("torch", "numpy", "onnx", "onnxruntime", "safetensors", "mlflow-skinny", "mlflow")


@dataclass
class Artifact:
    """One file a conversion wrote.

    Attributes:
        name: file name in the output folder; path: where it was published; format: ``pt``, ``safetensors``,
        ``onnx`` or ``torchscript`` (:data:`reparam.spec.FORMATS`); bytes: file size; sha256: hex digest of the
        file; dtype: weight dtype (``float16``/``float32``); check: the export check of an ONNX/TorchScript file
        (``passed``, ``max_abs_diff``, ``device`` and for ONNX ``provider``/``provider_reason`` ...), ``None`` for
        the weight files (exact copies, proven by the transfer). traced_on: the device a TorchScript file was
        traced on (``cpu``, ``cuda:0``): the trace keeps it, so the file runs with inputs on that device only;
        ``None`` for the other formats. extra: any further fields the exporter records (input/output names, opset
        ...).
    """

    name: str
    format: str
    bytes: int
    sha256: str
    path: str = ""
    dtype: str | None = None
    check: dict[str, Any] | None = None
    traced_on: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def check_passed(self) -> bool | None:
        """The export check's verdict; ``None`` when there is none (weight files) or it did not run."""
        return self.check.get("passed") if isinstance(self.check, dict) else None

    @property
    def check_device(self) -> str | None:
        """Where the export check computed (``cpu``, ``cuda:0``); ``None`` without a check (or an older report)."""
        return self.check.get("device") if isinstance(self.check, dict) else None

    @property
    def check_provider(self) -> tuple[str, str] | None:
        """The onnxruntime provider of an ONNX check and why it was chosen, e.g. ``("CPUExecutionProvider", "the
        conversion device is cuda:0 but this onnxruntime has no CUDAExecutionProvider ...")``; ``None`` for other
        formats."""
        if not isinstance(self.check, dict) or not self.check.get("provider"):
            return None
        return str(self.check["provider"]), str(self.check.get("provider_reason") or "")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Artifact":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: d[k] for k in names if k in d}, extra={k: v for k, v in d.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**d, **self.extra}


@dataclass
class Comparison:
    """One input of the equivalence check (:mod:`reparam.converter.validation`): shapes ``[B, 3, H, W]`` and
    ``[B, 4 + nc, anchors]``, max |diff| in output units, how the dual ran, which model was compared, and the max
    |diff| of each output part (``boxes``, ``scores``; for segmentation also ``mask_coefficients``, ``prototypes``).
    ``layers_shared``/``layers_run``: for a lockstep comparison (``fast`` level, full size), the deploy layers whose
    output was the dual model's (same function on the same inputs, not recomputed) and those that ran (the head
    always); None where the compared model ran whole."""

    input_shape: list[int]
    output_shape: list[int]
    max_abs_diff: float
    dual: str = "full"
    model: str = "deploy"
    parts: dict[str, float] = field(default_factory=dict)
    layers_shared: int | None = None
    layers_run: int | None = None


@dataclass
class Validation:
    """The equivalence check: ``max_abs_diff`` (fp32, output units) is the largest of ``comparisons``'."""

    passed: bool
    max_abs_diff: float | None
    atol: float | None = None
    comparisons: list[Comparison] = field(default_factory=list)
    reason: str = ""
    check: str = "fast"
    main_only_vs_full: float | None = None
    imgsz: int | None = None
    seed: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Validation":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["comparisons"] = [Comparison(**c) for c in d.get("comparisons") or []]
        return cls(**{"passed": False, "max_abs_diff": None, **kw})


@dataclass
class Source:
    """Where the checkpoint came from: ``uri`` as given (credentials redacted), its ``sha256`` and ``bytes``,
    ``kind`` (``local``, ``s3``, ``http``, ``runs``, ``models``) and the registry ``lineage``."""

    uri: str
    sha256: str | None = None
    bytes: int | None = None
    kind: str | None = None
    path: str | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Source":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        return cls(**{"uri": "", **kw})


@dataclass
class Registry:
    """The MLflow result of ``--register``: ``models:/name/version``, the run holding the metrics, the aliases
    moved, and whether an existing version was reused."""

    model_name: str
    version: str
    model_uri: str
    run_id: str | None = None
    aliases: list[str] = field(default_factory=list)
    existing: bool = False
    updated_tags: list[str] = field(default_factory=list)
    promotion_skipped: str | None = None
    tracking_uri: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Registry":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kw = {k: d[k] for k in names if k in d}
        kw["version"] = str(kw.get("version", ""))
        return cls(**{"model_name": "", "model_uri": "", **kw},
                   extra={k: v for k, v in d.items() if k not in names})


@dataclass
class Report:
    """A conversion report, typed. :meth:`from_dict` reads a ``report.json`` (or the dict the converter builds);
    :meth:`to_dict` gives it back in the written order.

    Attributes:
        status: :data:`STATUSES`; command: the argv that ran (``["reparam", "convert", ...]``, empty when the
        converter was called as a library); versions: package -> version (:func:`versions`); artifacts: the files
        written (empty for a failed validation); source: the checkpoint; validation: the equivalence check;
        params_before/after: parameter elements of the dual and deploy models (``model.parameters()``, buffers
        excluded); deploy_sha256: sha256 of the deploy ``.pt`` (else the first artifact); duration_s: wall time of
        the whole command (``timing.total_s``); registry: the ``--register`` result; variant, nc: the model;
        pruned: ``False`` when the checkpoint had no auxiliary branch (a gelan model passed through);
        details: every other section, as written.
    """

    status: str
    source: Source
    validation: Validation
    command: list[str] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    variant: str | None = None
    nc: int | None = None
    pruned: bool | None = None
    params_before: int | None = None
    params_after: int | None = None
    deploy_sha256: str | None = None
    duration_s: float | None = None
    registry: Registry | None = None
    details: dict[str, Any] = field(default_factory=dict)

    _TYPED = ("status", "command", "versions", "artifacts", "source", "validation", "variant", "nc", "pruned",
              "params", "deploy_sha256", "registry")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        """Read a report dict. Raises ``ValueError`` when ``status`` is missing or unknown."""
        if d.get("status") not in STATUSES:
            raise ValueError(f"report status must be one of {STATUSES}, got {d.get('status')!r}")
        params = d.get("params") or {}
        timing = d.get("timing") or {}
        return cls(
            status=d["status"], command=list(d.get("command") or []), versions=dict(d.get("versions") or {}),
            artifacts=[Artifact.from_dict(a) for a in d.get("artifacts") or []],
            source=Source.from_dict(d.get("source") or {}), validation=Validation.from_dict(d.get("validation") or {}),
            variant=d.get("variant"), nc=d.get("nc"), pruned=d.get("pruned"),
            params_before=params.get("before"), params_after=params.get("after"),
            deploy_sha256=d.get("deploy_sha256"),
            duration_s=timing.get("total_s") if isinstance(timing.get("total_s"), (int, float)) else None,
            registry=Registry.from_dict(d["registry"]) if d.get("registry") else None,
            details={k: v for k, v in d.items() if k not in cls._TYPED},
        )

    def artifact(self, fmt: str) -> Artifact | None:
        """The first artifact of format ``fmt`` (``"pt"`` ...), or ``None``."""
        return next((a for a in self.artifacts if a.format == fmt), None)


def versions() -> dict[str, str | None]:
    """Versions that decide a conversion's bytes: reparam, Python, and :data:`VERSIONED` (``None``: absent).

    Read from the installed distributions' metadata (:mod:`importlib.metadata`), importing nothing.
    """
    from . import __version__

    out: dict[str, str | None] = {"reparam": __version__, "python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def command_line(argv: Sequence[str] | None = None) -> list[str]:
    """The command that ran, ``["reparam", *args]`` (``sys.argv`` by default)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return ["reparam", *args]


def ordered(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` with :data:`LEAD` keys first and :data:`TAIL` keys last (other keys keep their order)."""
    head = {k: report[k] for k in LEAD if k in report}
    tail = {k: report[k] for k in TAIL if k in report}
    return {**head, **{k: v for k, v in report.items() if k not in head and k not in tail}, **tail}


def dumps(report: dict[str, Any]) -> str:
    """The text of ``report.json``: :func:`ordered`, indented, with each :data:`TAIL` value on one line."""
    data = ordered(report)
    marks = {k: f"@@reparam-compact-{k}@@" for k in TAIL if k in data}
    text = json.dumps({k: (marks[k] if k in marks else v) for k, v in data.items()}, indent=2, default=str)
    for k, mark in marks.items():
        text = text.replace(json.dumps(mark), json.dumps(data[k], separators=(",", ":"), default=str))
    return text


def schema() -> dict[str, Any]:
    """The JSON Schema of ``report.json`` (``reparam/schemas/report.schema.json``, package data)."""
    from importlib import resources

    return json.loads(resources.files("reparam").joinpath("schemas/report.schema.json").read_text())
