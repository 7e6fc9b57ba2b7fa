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


def _without_none(d: dict[str, Any], *names: str) -> dict[str, Any]:
    """``d`` without the keys ``names`` whose value is ``None`` (sections a report holds only when they apply)."""
    return {k: v for k, v in d.items() if not (k in names and v is None)}


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """The items of ``d`` that are fields of dataclass ``cls`` (a reader ignores keys it does not know)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class Artifact:
    """One file a conversion wrote: a weight file (``pt``, ``safetensors``); ONNX and TorchScript files are
    :class:`OnnxArtifact` and :class:`TorchScriptArtifact`.

    Attributes:
        name: file name in the output folder; format: :data:`reparam.spec.FORMATS`; dtype: weight dtype
        (``float16``/``float32``); check: the export check of an ONNX/TorchScript file (``passed`` true/false/null,
        ``max_abs_diff``, ``device`` and for ONNX ``provider``/``provider_reason``, ``runs`` ...: the open-ended dict
        of :func:`reparam.converter.export.checks.run_checks`, its shape fixed by the schema), ``None`` for the
        weight files (exact copies, proven by the transfer) and then not written; sha256: hex digest of the file;
        bytes: its size; path: where it was published. The last three are filled in once the file is written
        (``""``/``0`` before).
    """

    name: str
    format: str
    dtype: str | None = None
    check: dict[str, Any] | None = None
    sha256: str = ""
    bytes: int = 0
    path: str = ""

    #: written last, after the format's own fields
    _TAIL = ("check", "sha256", "bytes", "path")

    @property
    def check_passed(self) -> bool | None:
        """The export check's verdict; ``None`` when there is none (weight files) or it did not run."""
        passed = self.check.get("passed") if isinstance(self.check, dict) else None
        return passed if isinstance(passed, bool) else None

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

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Artifact":
        """Read one ``artifacts`` entry (the class by its ``format``; keys of no field are ignored)."""
        cls: type[Artifact] = {"onnx": OnnxArtifact, "torchscript": TorchScriptArtifact}.get(
            str(d.get("format", "")), Artifact)
        return cls(**_known(cls, d))

    def to_dict(self) -> dict[str, Any]:
        """The ``artifacts`` entry: name, format, dtype, the format's own fields, check (when any), sha256, bytes,
        path."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        head = {k: v for k, v in d.items() if k not in self._TAIL}
        return _without_none({**head, **{k: d[k] for k in self._TAIL}}, "check")


@dataclass
class OnnxArtifact(Artifact):
    """An ONNX file (:mod:`reparam.converter.export`): ``opset``; ``dynamic`` batch and image size; ``nms``: the
    end-to-end graph's NMS settings (:meth:`reparam.converter.export.options.ExportOptions.nms_settings`), ``None``
    without ``--nms`` (written as null); ``input``: the image input's name; ``inputs``/``outputs``: each graph
    input/output as ``{"name", "shape"}`` (symbolic axes by name)."""

    opset: int = 0
    dynamic: bool = False
    nms: dict[str, Any] | None = None
    input: str = ""
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TorchScriptArtifact(Artifact):
    """A TorchScript file (traced): ``input``, the image input's name; ``traced_on``: the device it was traced on
    (``cpu``, ``cuda:0``): the trace keeps it, so the file runs with inputs on that device only."""

    input: str = ""
    traced_on: str = "cpu"


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
    #: how the dual model ran: ``"full"`` (both branches) or ``"main-only"`` (main branch only)
    dual: str = "full"
    #: max |diff| of each part of the output: ``boxes``, ``scores`` and, for segmentation, ``mask_coefficients`` and
    #: ``prototypes``
    parts: dict[str, float] = field(default_factory=dict)
    #: the model compared with the dual one: ``"deploy"`` (pruned, as saved) or ``"fused"`` (``--fuse``: BatchNorm
    #: folded, RepConvN merged; its fp32 rounding is where a non-zero difference comes from)
    model: str = "deploy"
    layers_shared: int | None = None
    layers_run: int | None = None


@dataclass
class DeviceUse:
    """The report's ``device`` section: the ``--device`` asked for (``auto``, ``cpu``, ``cuda:N``), the torch device
    used (``cpu``, ``cuda:0``) and the hardware's name (:class:`reparam.converter.device.Device`)."""

    requested: str
    used: str
    name: str

    def to_dict(self) -> dict[str, Any]:
        """The section as written."""
        return dataclasses.asdict(self)


@dataclass
class DeviceCheck(DeviceUse):
    """The equivalence check on one device (``validation.devices``): its max |diff| and verdict."""

    max_abs_diff: float = 0.0
    passed: bool = False


@dataclass
class Validation:
    """The equivalence check: ``max_abs_diff`` (fp32, output units) is the largest of ``comparisons``'.

    ``imgsz``, ``seed`` and ``devices`` (the check per device, ``--device`` first) are not written when ``None``.
    """

    passed: bool
    max_abs_diff: float | None
    atol: float | None = None
    comparisons: list[Comparison] = field(default_factory=list)
    reason: str = ""
    check: str = "fast"
    main_only_vs_full: float | None = None
    imgsz: int | None = None
    seed: int | None = None
    devices: list[DeviceCheck] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Validation":
        """Read a ``validation`` section (``passed`` false and ``max_abs_diff`` null when absent)."""
        kw = _known(cls, d)
        kw["comparisons"] = [Comparison(**_known(Comparison, c)) for c in d.get("comparisons") or []]
        if d.get("devices") is not None:
            kw["devices"] = [DeviceCheck(**_known(DeviceCheck, x)) for x in d["devices"]]
        return cls(**{"passed": False, "max_abs_diff": None, **kw})

    def to_dict(self, brief: bool = False) -> dict[str, Any]:
        """The section as written; ``brief``: only ``passed`` and ``max_abs_diff`` (a reused version's, read from
        its tags)."""
        if brief:
            return {"passed": self.passed, "max_abs_diff": self.max_abs_diff}
        d = dataclasses.asdict(self)
        return _without_none(d, "imgsz", "seed", "devices")


@dataclass
class Source:
    """Where the checkpoint came from: ``uri`` as given (credentials redacted), its ``sha256`` and ``bytes``,
    ``kind`` (``local``, ``s3``, ``http``, ``runs``, ``models``), the registry ``lineage``
    (:class:`reparam.store.sources.Fetched`), the fetch's ``warnings`` and the local ``path`` it was read from.
    ``kind``, ``lineage``, ``warnings`` and ``path`` are not written when ``None`` (a library call gives no
    fetch)."""

    uri: str
    sha256: str | None = None
    bytes: int | None = None
    kind: str | None = None
    lineage: dict[str, Any] | None = None
    warnings: list[str] | None = None
    path: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Source":
        """Read a ``source`` section (``uri`` ``""`` when absent)."""
        return cls(**{"uri": "", **_known(cls, d)})

    def to_dict(self) -> dict[str, Any]:
        """The section as written."""
        return _without_none(dataclasses.asdict(self), "kind", "lineage", "warnings", "path")


@dataclass
class Registry:
    """The MLflow result of ``--register`` (:mod:`reparam.store.publish`): ``models:/name/version``, the run holding
    the metrics, the aliases moved (and the versions they held before, ``previous_aliases``), why no alias moved
    (``promotion_skipped``), whether an existing version was reused and which of its tags were updated, and the
    tracking URI (credentials redacted; not written when ``None``)."""

    model_name: str
    version: str
    model_uri: str
    run_id: str | None = None
    aliases: list[str] = field(default_factory=list)
    previous_aliases: dict[str, str | None] = field(default_factory=dict)
    promotion_skipped: str | None = None
    existing: bool = False
    updated_tags: list[str] = field(default_factory=list)
    tracking_uri: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Registry":
        """Read a ``registry`` section (``version`` as a string)."""
        kw = _known(cls, d)
        kw["version"] = str(kw.get("version", ""))
        return cls(**{"model_name": "", "model_uri": "", **kw})

    def to_dict(self) -> dict[str, Any]:
        """The section as written."""
        return _without_none(dataclasses.asdict(self), "tracking_uri")


@dataclass(kw_only=True)
class Report:
    """A conversion report, typed: the converter, the CLI and the registry build this and write it with
    :func:`dumps` (:meth:`to_dict`), so no key is written that is not a field here; :meth:`from_dict` reads a
    ``report.json`` back.

    Fields in the order they are written (:data:`LEAD` first, :data:`TAIL` last). Sections that are open-ended
    JSON objects, their shape fixed by ``report.schema.json``, are typed ``dict[str, Any]``: ``head``, ``layers``,
    ``tensors``, ``removed``, ``state_dict``, ``fusion``, ``options``, ``published_config``, ``evaluation``
    (:func:`reparam.evaluation.conversion.evaluate_conversion`), ``promotion``
    (:meth:`reparam.store.champion.Decision.to_dict`) and ``deploy_config`` (YOLOv9's model-yaml dict).

    Attributes:
        status: :data:`STATUSES`; command: the argv that ran (``["reparam", "convert", ...]``, empty when the
        converter was called as a library); versions: package -> version (:func:`versions`); artifacts: the files
        written (empty for a failed conversion, and then not written); source: the checkpoint; variant, nc,
        names, stride (pixels per level): the model; model_class, package_prefix: the pickled model's class and
        package; head: dual/deploy head names; pruned: ``False`` when the checkpoint had no auxiliary branch (a
        gelan model passed through); weights_used: ``model``, ``ema`` or ``state_dict``; state_dict: where a bare
        state_dict's config came from (``None`` for a checkpoint); ema_vs_raw_max_abs_diff: how far the EMA is
        from the raw weights; layers, tensors: what the pruning kept; params_before/after: parameter elements
        of the dual and deploy models (``model.parameters()``, buffers excluded; written as ``params``); gflops,
        gflops_imgsz: compute at that size; removed: the training entries dropped; validation: the equivalence
        check; device: where it ran; fusion: the ``--fuse`` check (``None`` without it); options: the
        conversion options; settings_key: their canonical key (the idempotency key's half); published_config:
        where the derived config differs from the published one; timing: seconds per phase (``total_s``: the
        whole command, :attr:`duration_s`); threads: torch's intra-op threads; evaluation: ``--eval-data``'s
        section; deploy_sha256: sha256 of the deploy ``.pt`` (else the first artifact); bytes: the source
        checkpoint against the deploy ``.pt`` (``None`` without a ``.pt`` artifact); stale_outputs: earlier
        deploy files kept in the output folder; registry: the ``--register`` result; promotion: the gated
        ``--promote`` decision; outputs_kept: with ``--register``, whether the output folder is kept (``-o``);
        deploy_config: the deploy model's YOLOv9 config.

    What is not written when ``None``: ``evaluation``, ``stale_outputs``, ``registry``, ``promotion``,
    ``outputs_kept`` (they apply to some runs only); ``deploy_sha256`` and with it ``bytes`` (set once the artifacts
    are hashed: a failed conversion has neither); and, in a ``reused`` report (the idempotent no-op of
    ``--register``: nothing converted, its facts read from the version's tags), every conversion fact that is
    ``None``. ``reused`` itself is not written.
    """

    status: str
    command: list[str] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    source: Source
    variant: str | None = None
    model_class: str | None = None
    package_prefix: str | None = None
    head: dict[str, Any] | None = None
    pruned: bool | None = None
    nc: int | None = None
    names: dict[str, str] | None = None
    stride: list[float] | None = None
    weights_used: str | None = None
    state_dict: dict[str, Any] | None = None
    ema_vs_raw_max_abs_diff: float | None = None
    layers: dict[str, Any] | None = None
    tensors: dict[str, Any] | None = None
    params_before: int | None = None
    params_after: int | None = None
    gflops: dict[str, float] | None = None
    gflops_imgsz: int | None = None
    removed: dict[str, Any] | None = None
    validation: Validation
    device: DeviceUse | None = None
    fusion: dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    settings_key: str | None = None
    published_config: dict[str, Any] | None = None
    timing: dict[str, float] = field(default_factory=dict)
    threads: int | None = None
    evaluation: dict[str, Any] | None = None
    deploy_sha256: str | None = None
    bytes: dict[str, int] | None = None
    stale_outputs: list[str] | None = None
    registry: Registry | None = None
    promotion: dict[str, Any] | None = None
    outputs_kept: bool | None = None
    deploy_config: dict[str, Any] | None = None
    reused: bool = False

    #: Not written when ``None``, whatever the report (sections that apply to some runs only).
    _OPTIONAL = ("evaluation", "stale_outputs", "registry", "promotion", "outputs_kept", "deploy_sha256")
    #: Facts of a conversion: not written when ``None`` in a ``reused`` report.
    _CONVERSION = ("variant", "model_class", "package_prefix", "head", "pruned", "nc", "names", "stride",
                   "weights_used", "state_dict", "ema_vs_raw_max_abs_diff", "layers", "tensors", "gflops",
                   "gflops_imgsz", "removed", "device", "fusion", "options", "settings_key", "published_config",
                   "threads", "bytes", "deploy_config")

    @property
    def duration_s(self) -> float | None:
        """Wall time of the whole command in seconds (``timing.total_s``), ``None`` before it is known."""
        total = self.timing.get("total_s")
        return float(total) if isinstance(total, (int, float)) and not isinstance(total, bool) else None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        """Read a report dict (keys that are no field are ignored). Raises ``ValueError`` when ``status`` is missing
        or unknown."""
        if d.get("status") not in STATUSES:
            raise ValueError(f"report status must be one of {STATUSES}, got {d.get('status')!r}")
        kw = _known(cls, d)
        kw.pop("reused", None)
        params = d.get("params") or {}
        device = d.get("device")
        return cls(**{
            **kw,
            "command": list(d.get("command") or []), "versions": dict(d.get("versions") or {}),
            "artifacts": [Artifact.from_dict(a) for a in d.get("artifacts") or []],
            "source": Source.from_dict(d.get("source") or {}),
            "validation": Validation.from_dict(d.get("validation") or {}),
            "params_before": params.get("before"), "params_after": params.get("after"),
            "device": DeviceUse(**_known(DeviceUse, device)) if isinstance(device, dict) else None,
            "timing": dict(d.get("timing") or {}),
            "registry": Registry.from_dict(d["registry"]) if d.get("registry") else None,
        })

    def to_dict(self) -> dict[str, Any]:
        """The report as written, in field order (``params_before``/``after`` as ``params: {before, after}``)."""
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "reused" or (f.name == "artifacts" and not value):
                continue
            if value is None and (f.name in self._OPTIONAL or (self.reused and f.name in self._CONVERSION)
                                  or (f.name == "bytes" and self.deploy_sha256 is None)):
                continue
            if f.name == "params_after":
                continue
            if f.name == "params_before":
                d["params"] = {"before": self.params_before, "after": self.params_after}
            elif f.name == "artifacts":
                d[f.name] = [a.to_dict() for a in value]
            elif f.name == "validation":
                d[f.name] = self.validation.to_dict(brief=self.reused)
            elif isinstance(value, (Source, Registry, DeviceUse)):
                d[f.name] = value.to_dict()
            else:
                d[f.name] = value
        return d

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


def dumps(report: Report) -> str:
    """The text of ``report.json`` (and of ``reparam convert --json``): :meth:`Report.to_dict`, indented, each
    :data:`TAIL` value on one line. The one way a report is written."""
    data = report.to_dict()
    marks = {k: f"@@reparam-compact-{k}@@" for k in TAIL if k in data}
    text = json.dumps({k: (marks[k] if k in marks else v) for k, v in data.items()}, indent=2, default=str)
    for k, mark in marks.items():
        text = text.replace(json.dumps(mark), json.dumps(data[k], separators=(",", ":"), default=str))
    return text


def schema() -> dict[str, Any]:
    """The JSON Schema of ``report.json`` (``reparam/schemas/report.schema.json``, package data)."""
    from importlib import resources

    data: dict[str, Any] = json.loads(resources.files("reparam").joinpath("schemas/report.schema.json").read_text())
    return data
