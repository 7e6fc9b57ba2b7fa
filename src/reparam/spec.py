"""The grammar and defaults of a conversion request, in one place (pure: the standard library only).

The CLI (:mod:`reparam.cli`, :mod:`reparam.store.uris`), the operator's validation
(:func:`reparam.operator.jobs.validate_spec`), the promotion rule (:mod:`reparam.store.promotion`) and the CRD
(``crds/modelconversion.yaml``, whose patterns, enums and CEL rules are the strings below; a test checks the
committed CRD field by field and case by case) all take their rules from here, so that a request refused in one
place is refused in all of them.

Regular expressions are written in the common subset of Python's ``re`` and RE2 (what Kubernetes uses for a CRD
``pattern`` and for CEL ``matches``): no lookarounds, no ``\\w``/``\\d`` (Unicode in Python, ASCII in RE2), explicit
``^...$`` anchors. Python code matches them with ``fullmatch`` because Python's ``$`` also matches before a final
newline, RE2's does not.

Sources of the rules:

* **Aliases** -- MLflow ``mlflow/utils/validation.py``: ``_validate_model_alias_name`` (``^[\\w\\-]*$``, not empty,
  at most 255 characters) and ``_validate_model_alias_name_reserved`` (``latest`` in any case, and ``^[vV]\\d+$``).
  We accept **ASCII only** (``[A-Za-z0-9_-]``), a subset of MLflow's Unicode ``\\w``: a Kubernetes ``pattern`` is RE2,
  whose ``\\w`` is ASCII, so a Unicode rule could not be said the same way in the CRD; an alias also travels in
  ``models:/NAME@ALIAS`` URIs, command lines and label-like status fields, where look-alike letters (a Cyrillic
  ``а`` in ``chаmpion``) would name a different alias that reads the same.
* **Registered-model names** -- MLflow ``_validate_model_name``: not blank, no ``/`` or ``:``, and not a name that
  ``posixpath.normpath`` would change (``.``, ``..``, ``..x``); at most 256 characters (the ``name`` column of
  MLflow's model-registry tables is ``String(256)``). We also refuse ``@`` (``models:/NAME@ALIAS`` could not name
  it), leading/trailing spaces (a second name that looks like the first) and anything outside printable ASCII.
* **Tag keys** -- MLflow ``_validate_model_version_tag``: ``^[/\\w.\\- :]*$`` (POSIX servers), at most 250
  characters, and the same ``normpath`` rule; ASCII only, not empty. Values: at most 5000 characters here (MLflow
  allows more; the CRD has always said 5000).
* **Source URIs** -- MLflow's ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` (an artifact path may follow
  either), ``runs:/RUN_ID/PATH``; ``s3://BUCKET/KEY``; ``http(s)://HOST/...``; ``file://`` or a plain local path.
  A Job in a cluster can fetch only :data:`CLUSTER_SOURCE_KINDS`.
* **Formats** -- ``--format F`` adds ``F`` to :data:`DEFAULT_FORMATS` (as ``yolo export`` users expect the deploy
  ``.pt`` to stay); ``--only F`` (and the CRD's ``formats``) writes exactly the named artifacts
  (:func:`resolve_formats`).
* **Precision** -- per artifact family (:data:`PRECISION_FAMILIES`): ``weights`` (``.pt``, ``.safetensors``) and
  ``export`` (ONNX, TorchScript). Defaults as the official tools: the published deploy ``.pt`` files
  (``tools/reparameterization.ipynb`` saves ``model.half()``) are fp16, the official ``export.py`` writes fp32
  graphs unless ``--half`` (:data:`OFFICIAL_PRECISION`). Grammar: :data:`PRECISION_PATTERN`, parsed by
  :func:`parse_precision`.
* **Devices** -- torch's device strings that a conversion can use: ``auto`` (CUDA when available, else CPU),
  ``cpu``, ``cuda`` (the current CUDA device, index 0 in a fresh process) and ``cuda:N`` (:data:`DEVICE_PATTERN`).
* **Head branch** -- which branch of a ``TripleDDetect`` head (yolov9-cf) becomes the deploy ``DDetect``: one of
  :data:`TRIPLE_HEAD_BRANCHES` (CLI ``--head``, CRD ``spec.conversion.head``, an enum with no default: left out,
  the converter takes :data:`DEFAULT_TRIPLE_HEAD` for a yolov9-cf checkpoint and every other head needs none).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable
from urllib.parse import unquote, urlsplit

__all__ = [
    "ALIAS_MAX", "ALIAS_PATTERN", "ALIAS_RESERVED_PATTERN", "CLUSTER_SOURCE_KINDS", "CLUSTER_SOURCE_URI_PATTERN",
    "CLUSTER_SOURCE_URI_RULE", "DEFAULT_ATOL", "DEFAULT_DEVICE", "DEFAULT_EVAL_ATOL", "DEFAULT_EVAL_BATCH",
    "DEFAULT_EVAL_CONF", "DEFAULT_EVAL_IOU", "DEFAULT_EVAL_MAX_DET", "DEFAULT_IMGSZ", "DEFAULT_FORMATS",
    "DEFAULT_PRECISION",
    "DEFAULT_PROMOTION_METRIC", "DEFAULT_TRIPLE_HEAD", "DEVICE_PATTERN", "FORMATS", "MODEL_NAME_MAX",
    "MODEL_NAME_PATTERN", "OFFICIAL_PRECISION", "OPERATOR_DEFAULT_FORMATS", "PRECISIONS", "PROMOTION_METRICS",
    "PRECISION_FAMILIES", "PRECISION_PATTERN", "Precision",
    "SHA256_PATTERN", "SOURCE_KINDS", "SourceRef", "SpecError", "TAG_KEY_MAX", "TAG_KEY_PATTERN", "TAG_VALUE_MAX",
    "TRACKING_URI_PATTERN", "TRIPLE_HEAD_BRANCHES", "alias_problem", "check_aliases", "device_problem", "head_problem",
    "model_name_problem", "parse_precision", "parse_source_uri", "resolve_formats", "sha256_problem",
    "tag_key_problem",
]


class SpecError(ValueError):
    """A value outside the grammar; ``str(err)`` names the value, the rule and the accepted form."""


# --- formats, precision, tolerance ------------------------------------------------------------------------

#: Artifacts a conversion can write (CLI ``--format``/``--only``, CRD ``spec.conversion.formats``).
FORMATS = ("pt", "safetensors", "onnx", "torchscript")
#: What ``reparam convert`` always writes; ``--format`` adds to these, ``--only`` replaces them.
DEFAULT_FORMATS = ("pt", "safetensors")
#: What a ``ModelConversion`` writes when ``spec.conversion.formats`` is empty (the CRD's default; the list is exact,
#: the Job passes it as ``--only``).
OPERATOR_DEFAULT_FORMATS = ("pt",)
#: Weight precisions (CLI ``--precision``, CRD ``spec.conversion.precision``).
PRECISIONS = ("fp16", "fp32")
#: Artifact families a precision applies to, and the formats of each.
PRECISION_FAMILIES = {"weights": ("pt", "safetensors"), "export": ("onnx", "torchscript")}
_P = r"fp(?:16|32)"
#: ``fp16`` / ``fp32`` (every family) or ``weights=P``, ``export=P`` or both, comma-separated (anchored; the CRD's
#: ``spec.conversion.precision`` pattern).
PRECISION_PATTERN = rf"^(?:{_P}|weights={_P}(?:,export={_P})?|export={_P}(?:,weights={_P})?)$"
#: The CRD's default precision: fp16 in every artifact (the CLI's default is :data:`OFFICIAL_PRECISION`).
DEFAULT_PRECISION = "fp16"
#: A device a conversion runs its checks and evaluation on (anchored; CRD ``spec.conversion.device`` pattern).
DEVICE_PATTERN = r"^(?:auto|cpu|cuda(?::[0-9]{1,2})?)$"
#: ``--device`` / ``spec.conversion.device`` default: CUDA when torch sees one, else the CPU.
DEFAULT_DEVICE = "auto"
#: Default tolerance of the equivalence check: max |deploy - dual main| in output units (pixels / probability).
DEFAULT_ATOL = 1e-4

#: Default input size in pixels of the equivalence check (``--imgsz``) and of an evaluation (``--eval-imgsz``,
#: ``reparam evaluate --imgsz``): the official ``val.py``/``detect.py`` default.
DEFAULT_IMGSZ = 640
#: Evaluation defaults, as the official ``val.py``: images per batch, score threshold, NMS IoU threshold,
#: detections kept per image.
DEFAULT_EVAL_BATCH = 16
DEFAULT_EVAL_CONF = 0.001
DEFAULT_EVAL_IOU = 0.7
DEFAULT_EVAL_MAX_DET = 300
#: Default largest allowed |mAP@0.5:0.95 of an artifact - that of the dual model| (``--eval-atol``).
DEFAULT_EVAL_ATOL = 1e-3
#: Branches of a TripleDDetect head (yolov9-cf) that can become the deploy DDetect (CLI ``--head``): ``fine``
#: (NMS-free) and ``coarse`` (NMS-based), as models/detect/yolov9-cf.yaml of WongKinYiu/yolov9 names them.
TRIPLE_HEAD_BRANCHES = ("fine", "coarse")
#: The default: the branch the official eval forward returns, which the official detect.py runs NMS on.
DEFAULT_TRIPLE_HEAD = "fine"

# --- promotion metric ---------------------------------------------------------------------------------------

#: The COCO mAP@0.5:0.95 kinds the gated promotion can compare (``--min-map``, ``--max-regression``, the champion
#: race): ``box`` (every model) and ``mask`` (a segmentation model evaluated on polygon labels).
PROMOTION_METRICS = ("mask", "box")
#: The metric compared: ``mask`` = a segmentation model's mask mAP@0.5:0.95 when its evaluation has one, else the
#: box mAP@0.5:0.95. Mask mAP is what a segmentation model is for (the official segment/val.py reports both and
#: WongKinYiu/yolov9 publishes the seg models' mask AP next to their box AP); its boxes are scored too and recorded.
#: A champion measured without masks is evaluated again before a mask comparison (never box against mask).
DEFAULT_PROMOTION_METRIC = "mask"

# --- names --------------------------------------------------------------------------------------------------

ALIAS_MAX = 255
_ALIAS = r"[A-Za-z0-9_-]{1,255}"
_RESERVED = r"(?:[lL][aA][tT][eE][sS][tT]|[vV][0-9]+)"
#: An alias name (anchored; CRD ``spec.registry.aliases[]`` pattern).
ALIAS_PATTERN = rf"^{_ALIAS}$"
#: The reserved alias names; refused by a CEL rule in the CRD (a CRD ``pattern`` cannot say "not").
ALIAS_RESERVED_PATTERN = rf"^{_RESERVED}$"

MODEL_NAME_MAX = 256
# printable ASCII without '/', ':' and '@': as a whole (C), without space (L), without space and '.' (F)
_NAME_C = r"[\x20-\x2e\x30-\x39\x3b-\x3f\x41-\x7e]"
_NAME_L = r"[\x21-\x2e\x30-\x39\x3b-\x3f\x41-\x7e]"
_NAME_F = r"[\x21-\x2d\x30-\x39\x3b-\x3f\x41-\x7e]"
_MODEL_NAME = rf"\.?{_NAME_F}(?:{_NAME_C}*{_NAME_L})?"
#: A registered-model name (anchored; CRD ``spec.registry.modelName`` pattern, with ``maxLength`` 256).
MODEL_NAME_PATTERN = rf"^{_MODEL_NAME}$"

TAG_KEY_MAX = 250
TAG_VALUE_MAX = 5000
# MLflow's characters (letters, digits, '_', '-', '.', ' ', ':', '/') in '/'-separated segments that
# posixpath.normpath keeps as they are: no leading, trailing or doubled '/', no segment starting with '..' or
# equal to '.'.
_TAG_SEG = r"\.?[A-Za-z0-9_ :-][A-Za-z0-9_. :-]*"
#: A tag key (anchored; CRD rule on the keys of ``spec.registry.tags``).
TAG_KEY_PATTERN = rf"^{_TAG_SEG}(?:/{_TAG_SEG})*$"

#: An MLflow tracking server a Job can reach (CRD ``spec.registry.trackingUri`` pattern).
TRACKING_URI_PATTERN = r"^https?://[^\x00-\x20\x7f]+$"

#: Expected sha256 of a source checkpoint: 64 hex digits, either case.
SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"


def _full(pattern: str, text: object) -> bool:
    return isinstance(text, str) and re.fullmatch(pattern, text) is not None


def _problem(what: str, value: object, pattern: str, max_len: int, rule: str) -> str | None:
    """Why ``value`` is not a ``what`` (longer than ``max_len`` or outside ``pattern``), or None."""
    if isinstance(value, str) and len(value) > max_len:
        return f"{what} {value[:40]!r}... is {len(value)} characters long; at most {max_len}"
    if not _full(pattern, value):
        return f"{what} {value!r} is not valid: {rule}"
    return None


def alias_problem(alias: object) -> str | None:
    """Why ``alias`` is not a usable MLflow alias name, or None when it is (rules: module docstring).

    Examples: ``champion``, ``prod-2``, ``1prod``, ``_x`` are accepted; ``latest``, ``Latest``, ``v3``, ``V12``,
    ``a b``, ``a/b``, ``""``, ``champión`` and names over 255 characters are refused.
    """
    problem = _problem("alias", alias, ALIAS_PATTERN, ALIAS_MAX, "use ASCII letters, digits, '_' or '-'")
    if problem is None and _full(ALIAS_RESERVED_PATTERN, alias):
        return f"alias {alias!r} is reserved by MLflow ('latest' in any case and v<number> name versions)"
    return problem


def check_aliases(aliases: Iterable[str] | None) -> list[str]:
    """The alias names, deduplicated in order.

    Raises:
        SpecError: the first bad name, with the reason (:func:`alias_problem`).
    """
    out: list[str] = []
    for alias in aliases or []:
        problem = alias_problem(alias)
        if problem:
            raise SpecError(f"invalid {problem}")
        if alias not in out:
            out.append(alias)
    return out


def model_name_problem(name: object) -> str | None:
    """Why ``name`` is not a usable registered-model name, or None (rules: module docstring).

    Examples: ``traffic-deploy``, ``Traffic Deploy (v2)``, ``.x`` are accepted; ``""``, ``a/b``, ``a:b``, ``a@b``,
    ``.``, ``..``, ``..x``, `` a`` and names over 256 characters are refused.
    """
    return _problem("registered-model name", name, MODEL_NAME_PATTERN, MODEL_NAME_MAX,
                    "use printable ASCII without '/', ':' or '@', no leading or trailing space, not '.' and not "
                    "starting with '..'")


def tag_key_problem(key: object) -> str | None:
    """Why ``key`` is not a usable MLflow model-version tag key, or None (rules: module docstring)."""
    return _problem("tag key", key, TAG_KEY_PATTERN, TAG_KEY_MAX,
                    "use ASCII letters, digits, '_', '-', '.', ' ', ':' and '/' (no empty or '.' segment, none "
                    "starting with '..')")


def sha256_problem(value: object) -> str | None:
    """Why ``value`` is not a sha256 hex digest (64 hex digits), or None."""
    if not _full(SHA256_PATTERN, value):
        return f"{value!r} is not a sha256: give 64 hex digits"
    return None


@dataclasses.dataclass(frozen=True)
class Precision:
    """The precision of each artifact family (:data:`PRECISION_FAMILIES`): ``"fp16"`` or ``"fp32"`` each.

    ``weights``: the ``.pt`` and ``.safetensors`` files; ``export``: the ONNX graph (weights and input) and the
    TorchScript module. The equivalence checks always compute in fp32, whatever is stored.
    """

    weights: str
    export: str

    def __str__(self) -> str:
        return self.weights if self.weights == self.export else f"weights={self.weights},export={self.export}"


#: The official tools' precisions: deploy ``.pt`` fp16 (``tools/reparameterization.ipynb``), ``export.py`` fp32
#: unless ``--half``. What ``reparam convert`` writes without ``--precision``.
OFFICIAL_PRECISION = Precision(weights="fp16", export="fp32")


def parse_precision(text: object, default: Precision = OFFICIAL_PRECISION) -> Precision:
    """Parse a ``--precision`` value (:data:`PRECISION_PATTERN`); families it does not name keep ``default``'s.

    Examples: ``fp16`` -> weights fp16, export fp16; ``fp32`` -> both fp32; ``export=fp16`` -> weights fp16 (the
    default), export fp16; ``weights=fp32,export=fp16``.

    Raises:
        SpecError: anything else (``int8``, ``FP16``, ``weights=fp16,weights=fp32``, an unknown family).
    """
    if not _full(PRECISION_PATTERN, text):
        raise SpecError(f"precision {text!r} is not valid: use fp16 or fp32 (every artifact), or weights=P and/or "
                        "export=P, comma-separated (weights: .pt/.safetensors, export: ONNX/TorchScript)")
    assert isinstance(text, str)
    if "=" not in text:
        return Precision(text, text)
    parts = dict(item.split("=") for item in text.split(","))
    return Precision(parts.get("weights", default.weights), parts.get("export", default.export))


def device_problem(device: object) -> str | None:
    """Why ``device`` is not a device string reparam accepts (:data:`DEVICE_PATTERN`), or None.

    Whether the device exists is decided where torch runs (:func:`reparam.converter.device.resolve_device`).
    """
    if not _full(DEVICE_PATTERN, device):
        return f"device {device!r} is not valid: use auto, cpu, cuda or cuda:N"
    return None


def head_problem(head: object) -> str | None:
    """Why ``head`` is not a branch of a ``TripleDDetect`` head (:data:`TRIPLE_HEAD_BRANCHES`), or None.

    Whether the checkpoint has such a head is decided when it is read (:func:`reparam.converter.pruning.head_rule`).
    """
    if not isinstance(head, str) or head not in TRIPLE_HEAD_BRANCHES:
        return (f"head {head!r} is not a TripleDDetect (yolov9-cf) branch: use {' or '.join(TRIPLE_HEAD_BRANCHES)}, "
                "or leave it out (only yolov9-cf checkpoints have a choice)")
    return None


def resolve_formats(added: Iterable[str] | None = None, only: Iterable[str] | None = None) -> tuple[str, ...]:
    """The artifacts a conversion writes, in :data:`FORMATS` order.

    ``only`` (CLI ``--only``, the CRD's ``formats``): exactly these. Else :data:`DEFAULT_FORMATS` plus ``added``
    (CLI ``--format``: additive, so ``--format onnx`` writes ``.pt``, ``.safetensors`` and ``.onnx``).

    Raises:
        SpecError: both given, or a name outside :data:`FORMATS`.
    """
    added, only = list(added or []), list(only or [])
    if added and only:
        raise SpecError("--format adds to the default formats and --only replaces them: use one of them")
    chosen = only or [*DEFAULT_FORMATS, *added]
    bad = [f for f in chosen if f not in FORMATS]
    if bad:
        raise SpecError(f"unknown format(s) {', '.join(map(repr, bad))}; choose from {', '.join(FORMATS)}")
    return tuple(f for f in FORMATS if f in chosen)


# --- source URIs --------------------------------------------------------------------------------------------

SOURCE_KINDS = ("local", "s3", "models", "runs", "http")
#: Source kinds a Job in a cluster can fetch (a local path or file:// is meaningless inside a pod; http(s) needs
#: no operator and is not offered there).
CLUSTER_SOURCE_KINDS = ("models", "runs", "s3")

_SEGMENT = r"[^/\x00-\x1f\x7f]+"  # a path segment: no '/', no control character
_PATH = rf"{_SEGMENT}(?:/{_SEGMENT})*"  # no leading, trailing or doubled '/'
_VERSION = r"[0-9]+"
_RUN_ID = r"[0-9A-Za-z_-]+"
_BUCKET = r"[A-Za-z0-9._-]+"


def _group(name: str, fragment: str, named: bool) -> str:
    return f"(?P<{name}>{fragment})" if named else f"(?:{fragment})"


def _models(named: bool) -> str:
    name, version, alias, path = (_group(n, f, named) for n, f in (
        ("name", _MODEL_NAME), ("version", _VERSION), ("alias", _ALIAS), ("path", _PATH)))
    return f"models:/{name}(?:/{version}|@{alias})(?:/{path})?"


def _runs(named: bool) -> str:
    return f"runs:/{_group('run_id', _RUN_ID, named)}/{_group('path', _PATH, named)}"


def _s3(named: bool) -> str:
    return f"[sS]3://{_group('bucket', _BUCKET, named)}/{_group('key', _PATH, named)}"


#: The URI forms a ``ModelConversion`` accepts (CRD ``spec.source.uri`` pattern).
CLUSTER_SOURCE_URI_PATTERN = f"^(?:{_models(False)}|{_runs(False)}|{_s3(False)})$"
#: The CRD's CEL rule on ``spec.source.uri``: no reserved alias after ``@`` (:data:`ALIAS_RESERVED_PATTERN`).
CLUSTER_SOURCE_URI_RULE = f"!self.matches('^models:/[^/@]+@{_RESERVED}(?:/.*)?$')"

# --- cross-field rules of a ModelConversion (issue #12): the CRD's CEL rules and the operator's own checks ------

#: A ``models:/NAME@ALIAS`` source moves when the alias moves, so a pinned ``sha256`` would break at the next
#: promotion: a digest needs a pinned source (a version, a run or an object).
MOVING_SOURCE_PATTERN = r"^models:/[^/@]+@"
#: CEL on ``spec.source`` (:data:`MOVING_SOURCE_PATTERN`).
SHA256_PINNED_RULE = f"!(has(self.sha256) && self.sha256 != '' && self.uri.matches('{MOVING_SOURCE_PATTERN}'))"
#: CEL on ``spec``: a gated promotion compares mAP (needs evaluation) and moves a registry alias.
PROMOTION_NEEDS_RULE = "!has(self.promotion) || (has(self.evaluation) && has(self.registry))"
#: CEL on ``spec``: the gated alias is not also set ungated.
PROMOTION_ALIAS_RULE = ("!has(self.promotion) || !has(self.registry) || !has(self.registry.aliases) || "
                        "!(self.promotion.alias in self.registry.aliases)")
#: CEL on ``spec.promotion``: the hold alias differs from the gated one.
HOLD_ALIAS_RULE = "!has(self.holdAlias) || self.holdAlias != self.alias"
#: CEL on ``spec.conversion``: a precision that names a family (``weights=``/``export=``) needs a format of that
#: family (:data:`PRECISION_FAMILIES`; no formats: :data:`OPERATOR_DEFAULT_FORMATS`, a weights file). A plain
#: ``fp16``/``fp32`` applies to whatever is written and is always accepted.
PRECISION_FAMILY_RULE = (
    "!has(self.precision) || ("
    "(!self.precision.contains('weights=') || !has(self.formats) || size(self.formats) == 0 || "
    "self.formats.exists(f, f == 'pt' || f == 'safetensors')) && "
    "(!self.precision.contains('export=') || (has(self.formats) && "
    "self.formats.exists(f, f == 'onnx' || f == 'torchscript'))))"
)


def precision_family_problem(precision: object, formats: Iterable[str]) -> str | None:
    """Why ``precision`` names an artifact family none of ``formats`` belongs to (:data:`PRECISION_FAMILY_RULE`), or
    None. ``formats`` are the formats actually written (CLI: after ``--format``/``--only``; CRD: ``formats``, or
    :data:`OPERATOR_DEFAULT_FORMATS` when empty)."""
    if not isinstance(precision, str):
        return None
    written = set(formats)
    for family, members in PRECISION_FAMILIES.items():
        if f"{family}=" in precision and not written & set(members):
            return (f"precision {precision!r} sets the {family} family ({', '.join(members)}), but no such file is "
                    f"written (formats: {', '.join(sorted(written)) or 'none'}); add one, or drop {family}=")
    return None


def sha256_pin_problem(uri: object, sha256: object) -> str | None:
    """Why a ``sha256`` cannot go with ``uri`` (:data:`SHA256_PINNED_RULE`), or None."""
    if sha256 and isinstance(uri, str) and re.match(MOVING_SOURCE_PATTERN, uri):
        return ("spec.source.sha256 needs a pinned source: models:/NAME@ALIAS moves with the alias; "
                "use models:/NAME/VERSION or leave sha256 empty")
    return None


_MODELS_RE = re.compile(_models(True))
_RUNS_RE = re.compile(_runs(True))
_S3_RE = re.compile(_s3(True))
_SCHEME_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://")
_MODELS_FORMS = "models:/<name>/<version> or models:/<name>@<alias>, optionally followed by /<artifact path>"


@dataclasses.dataclass(frozen=True)
class SourceRef:
    """A parsed source URI.

    ``kind`` is one of :data:`SOURCE_KINDS`. Fields that do not apply to a kind are None:
    local: ``path``; s3: ``bucket``, ``key``; models: ``model_name`` and ``version`` or ``alias``,
    optional ``path`` (an artifact inside the version); runs: ``run_id``, ``path``; http: ``url``.
    """

    kind: str
    uri: str
    path: str | None = None
    bucket: str | None = None
    key: str | None = None
    model_name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    url: str | None = None


def parse_source_uri(uri: object, show: Callable[[str], str] = str) -> SourceRef:
    """Classify ``uri`` as one of :data:`SOURCE_KINDS`.

    Whitespace is not trimmed: a local path may hold spaces, and a URI with a trailing newline is refused here as
    it is by the CRD.

    Args:
        uri: ``./best.pt``, ``file:///abs/best.pt``, ``s3://bucket/key``, ``models:/name/7[/path]``,
            ``models:/name@alias[/path]``, ``runs:/<id>/path`` or ``http(s)://host/...``.
        show: how a URI is written into an error message (the store passes its credential redactor).

    Raises:
        SpecError: empty URI, unknown scheme, or a ``models:/``, ``runs:/``, ``s3://``, ``http(s)://`` or
            ``file://`` URI outside its grammar (the message shows the accepted form).
    """
    if not isinstance(uri, str) or not uri.strip():
        raise SpecError("source URI is empty; give a path, s3://, models:/, runs:/ or http(s):// URI")
    shown = show(uri)
    if uri.startswith("models:"):
        m = _MODELS_RE.fullmatch(uri)
        if not m:
            raise SpecError(f"malformed model URI {shown!r}: use {_MODELS_FORMS}; names and aliases as MLflow "
                            "allows them")
        problem = alias_problem(m["alias"]) if m["alias"] is not None else None
        if problem:
            raise SpecError(f"malformed model URI {shown!r}: {problem}")
        return SourceRef("models", uri, path=m["path"], model_name=m["name"], version=m["version"],
                         alias=m["alias"])
    if uri.startswith("runs:"):
        m = _RUNS_RE.fullmatch(uri)
        if not m:
            raise SpecError(f"malformed run URI {shown!r}: use runs:/<run_id>/<artifact path>")
        return SourceRef("runs", uri, run_id=m["run_id"], path=m["path"])
    m = _SCHEME_RE.match(uri)
    scheme = m["scheme"].lower() if m else None
    if scheme == "s3":
        m = _S3_RE.fullmatch(uri)
        if not m:
            raise SpecError(f"malformed S3 URI {shown!r}: use s3://<bucket>/<key of the checkpoint>")
        return SourceRef("s3", uri, bucket=m["bucket"], key=m["key"])
    if scheme in ("http", "https"):
        if not urlsplit(uri).netloc:
            raise SpecError(f"malformed URL {shown!r}: it has no host")
        return SourceRef("http", uri, url=uri)
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise SpecError(f"file URI {shown!r} names a remote host; use a local path")
        return SourceRef("local", uri, path=unquote(parts.path))
    if scheme is not None:
        raise SpecError(f"unsupported source scheme {scheme!r} in {shown!r}: use a local path, s3://, models:/, "
                        "runs:/ or http(s)://")
    return SourceRef("local", uri, path=uri)


# --- ModelConversionPolicy (issue #13): polling interval, version selectors, history ------------------------

#: A polling interval: a Go/Kubernetes duration of whole units (``30s``, ``5m``, ``1h30m``, ``1500ms``), as Flux's
#: ``ImageRepository.spec.interval`` is written (CRD ``spec.interval`` pattern).
INTERVAL_PATTERN = r"^(?:[0-9]+(?:ms|s|m|h))+$"
#: The shortest interval a policy may poll at (a registry is not a queue) and the default.
INTERVAL_MIN_S = 1.0
DEFAULT_INTERVAL = "5m"
#: How many finished conversions a policy keeps (``spec.historyLimit`` default) and at most.
DEFAULT_HISTORY_LIMIT = 10
HISTORY_LIMIT_MAX = 100
#: The selectors of ``spec.source.select`` (exactly one): the version an alias points at, versions carrying all
#: the given tags, or every new version.
SELECTORS = ("alias", "tag", "newest")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_interval(text: object) -> float:
    """Seconds of a duration such as ``5m`` or ``1h30m`` (:data:`INTERVAL_PATTERN`).

    Raises:
        SpecError: not a duration, or shorter than :data:`INTERVAL_MIN_S`.
    """
    if not _full(INTERVAL_PATTERN, text):
        raise SpecError(f"interval {text!r} is not a duration: write e.g. 30s, 5m or 1h30m (units ms, s, m, h)")
    assert isinstance(text, str)
    seconds = sum(int(n) * _UNITS[u] for n, u in re.findall(r"([0-9]+)(ms|s|m|h)", text))
    if seconds < INTERVAL_MIN_S:
        raise SpecError(f"interval {text!r} is shorter than {INTERVAL_MIN_S:g}s")
    return seconds


def selector_problem(select: object) -> str | None:
    """Why ``select`` is not one selector of :data:`SELECTORS`, or None.

    Accepted: ``{"alias": "<alias>"}`` (:func:`alias_problem`), ``{"tag": {"<key>": "<value>", ...}}`` (at least one
    tag, keys as :func:`tag_key_problem`), ``{"newest": true}``.
    """
    if not isinstance(select, dict) or len(select) != 1 or next(iter(select)) not in SELECTORS:
        keys = sorted(select) if isinstance(select, dict) else select
        return f"select {keys!r} must be exactly one of {', '.join(SELECTORS)}"
    kind, value = next(iter(select.items()))
    if kind == "alias":
        return alias_problem(value)
    if kind == "newest":
        return None if value is True else "select.newest must be true"
    if not isinstance(value, dict) or not value:
        return "select.tag must map at least one tag key to its value"
    for key, val in value.items():
        problem = tag_key_problem(key)
        if problem:
            return problem
        if not isinstance(val, str) or len(val) > TAG_VALUE_MAX:
            return f"select.tag value of {key!r} must be a string of at most {TAG_VALUE_MAX} characters"
    return None
