"""The ``reparam`` command.

::

    reparam convert SOURCE [-o OUT] [--json] [--atol X] [--precision P] [--fuse] [--format F... | --only F...]
                           [--device auto|cpu|cuda|cuda:N] [--check-device DEVICE]
                           [--cfg NAME|FILE [--nc N] [--names A,B,...]]
                           [--register NAME [--alias A]... [--tag K=V]...] [--tracking-uri URI] [--sha256 HEX]
                           [--registry-wait SECONDS] [--termination-log PATH] [-v]
                           [--eval-data DATA [--eval-imgsz N] [--eval-atol X]]
                           [--promote ALIAS [--min-map X] [--max-regression X] [--hold-alias ALIAS]]
    reparam inspect SOURCE [--json] [--cfg NAME|FILE [--nc N] [--names A,B,...]] [--registry-wait SECONDS] [-v]
    reparam evaluate MODEL --data DATA [--imgsz N] [--batch N] [--conf X] [--iou X] [--max-det N] [--json]
                           [--device DEVICE]
    reparam operator [...]            # the Kubernetes operator (needs the [operator] extra)

Exit codes: :mod:`reparam.exitcodes`. Every user error prints one line ``reparam: error: ...`` of at most
:data:`reparam.errors.MAX_ERROR_CHARS` characters (:func:`error_line`); ``-v`` adds the whole message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn, Sequence

from . import __version__, exitcodes, spec
from . import report as report_mod
from . import summary as summary_mod
from .errors import MAX_ERROR_CHARS, InvalidInputError, ReparamError, ValidationFailedError, brief


def _eprint(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def error_line(message: str, *, prefix: str = "reparam: error: ", limit: int = MAX_ERROR_CHARS,
               more: str = "rerun with -v for all of it") -> str:
    """The one line a user error prints: ``prefix`` + ``message`` on one line, at most ``limit`` characters.

    The one place the bound is enforced: whitespace runs (newlines included) become one space, and a longer
    message is cut, ending in ``... [N more characters; <more>]``. Messages give the cause first, so the cut
    keeps it.
    """
    text = prefix + " ".join(str(message).split())
    if len(text) <= limit:
        return text

    def tail(n: int) -> str:
        return f"... [{n:,} more characters; {more}]"

    keep = max(limit - len(tail(len(text))), len(prefix))  # the count shrinks as the kept part grows: fits
    return text[:keep] + tail(len(text) - keep)


def _print_error(message: str, verbose: bool = False, *, prefix: str = "reparam: error: ",
                 more: str = "rerun with -v for all of it") -> str:
    """Print :func:`error_line` of ``message`` (and with ``verbose`` the whole message on a second line);
    returns the printed line."""
    line = error_line(message, prefix=prefix, more=more)
    _eprint(line)
    if verbose and line != prefix + " ".join(str(message).split()):
        _eprint(f"reparam: the whole message: {message}")
    return line


def _parse_tags(items: Sequence[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"--tag expects KEY=VALUE, got {brief(item)}")
        problem = spec.tag_key_problem(key)
        if problem:
            raise InvalidInputError(f"--tag: {problem}")
        tags[key] = value
    return tags


def _check_registration(model_name: str | None, aliases: Sequence[str]) -> None:
    """Refuse a bad ``--register`` name or ``--alias`` before anything is fetched (rules: :mod:`reparam.spec`)."""
    problem = spec.model_name_problem(model_name) if model_name is not None else None
    if problem:
        raise InvalidInputError(f"--register: {problem}")
    try:
        spec.check_aliases(aliases)
    except spec.SpecError as err:
        raise InvalidInputError(f"--alias: {err}") from None


def _precision(args: argparse.Namespace) -> spec.Precision:
    """``--precision`` (or a deprecated ``--fp32``/``--half``, with a one-line note) as a :class:`spec.Precision`."""
    for flag, value in (("fp32", "fp32"), ("half", "fp16")):
        if getattr(args, flag):
            _eprint(f"reparam: note: --{flag} is deprecated; use --precision {value}")
            args.precision = value
    try:
        return spec.parse_precision(args.precision) if args.precision is not None else spec.OFFICIAL_PRECISION
    except spec.SpecError as err:
        raise InvalidInputError(f"--precision: {err}") from None


def _check_output(args: argparse.Namespace, out: Path | None = None) -> None:
    """The output folder can be written (``-o``, else the default ``./<stem>-deploy`` in the current folder):
    checked before torch is imported or the source is read, and again once the default's name is known."""
    from .converter.outdir import check_output_dir

    if args.output:
        check_output_dir(out if out is not None else args.output)
    elif out is not None:
        check_output_dir(out, default=not args.register)  # with --register, out is this run's temporary folder
    elif not args.register:  # the checkpoint's stem is known here only for a local file
        local = Path(args.source)
        check_output_dir(f"{local.stem if local.is_file() else '<checkpoint stem>'}-deploy", default=True)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``reparam: error: ...``) and exit code 2, like every user error."""

    def error(self, message: str) -> "NoReturn":
        self.exit(exitcodes.INVALID_INPUT,
                  error_line(f"{message} (see '{self.prog} --help')", more=f"see '{self.prog} --help'") + "\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"expected 0 to 86400 seconds, got {text}")
    return value


def _add_registry_wait(p: argparse.ArgumentParser) -> None:
    from .store.tracking import REGISTRY_WAIT_S

    p.add_argument("--registry-wait", type=_seconds, default=REGISTRY_WAIT_S, metavar="SECONDS",
                   help="how long to wait for an MLflow model version (or logged model) that is still being "
                        f"registered, PENDING_REGISTRATION, before giving up with exit 4 (default {REGISTRY_WAIT_S:g})")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    from .converter.export.options import EXPORT_DEFAULTS, HALF_RTOL  # torch-free: the defaults live there

    p = _Parser(prog="reparam", description="YOLOv9 dual checkpoints -> validated deploy models")
    p.add_argument("--version", action="version", version=f"reparam {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a dual checkpoint into a deploy model")
    c.add_argument("source", help="checkpoint: local path, s3://bucket/key, models:/name/version, models:/name@alias, "
                                  "runs:/run_id/path or http(s):// URL")
    c.add_argument("-o", "--output", default=None, help="output folder (default: ./<checkpoint stem>-deploy)")
    c.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    c.add_argument("--atol", type=float, default=spec.DEFAULT_ATOL,
                   help=f"max |diff| allowed between deploy and dual main output (fp32, output units; "
                        f"default {spec.DEFAULT_ATOL:g})")
    prec = c.add_mutually_exclusive_group()
    prec.add_argument("--precision", default=None, metavar="P",
                      help="weight precision per artifact family: fp16 or fp32 for every artifact, or weights=P "
                           "(.pt/.safetensors) and/or export=P (ONNX/TorchScript), comma-separated; default "
                           f"{spec.OFFICIAL_PRECISION} as the official tools (deploy .pt fp16, export.py fp32). The "
                           "checks compute in fp32 whatever is stored")
    prec.add_argument("--fp32", action="store_true", help="deprecated: --precision fp32")
    prec.add_argument("--half", action="store_true", help="deprecated: --precision fp16")
    c.add_argument("--fuse", action="store_true", help="fold BatchNorm and re-parameterize RepConvN before export")
    fmt = c.add_mutually_exclusive_group()
    fmt.add_argument("--format", action="append", dest="formats", default=None, choices=spec.FORMATS,
                     help=f"also write this artifact (repeatable; added to the defaults, "
                          f"{' and '.join(spec.DEFAULT_FORMATS)})")
    fmt.add_argument("--only", action="append", default=None, choices=spec.FORMATS, metavar="FORMAT",
                     help="write exactly these artifacts, not the defaults (repeatable; e.g. --only onnx)")
    c.add_argument("--device", default=spec.DEFAULT_DEVICE, metavar="DEVICE",
                   help="where the equivalence, fusion and export checks and the evaluation compute: auto "
                        "(default: CUDA when available, else CPU), cpu, cuda or cuda:N; recorded in the report. "
                        "TorchScript is traced there and runs there only; ONNX is checked on onnxruntime's CUDA "
                        "provider when it has one (onnxruntime-gpu), else on the CPU (the report says why)")
    c.add_argument("--check-device", default=None, metavar="DEVICE",
                   help="also run the equivalence check on this device (e.g. cuda: the one the model will serve "
                        "on); a mismatch there fails the conversion")
    c.add_argument("--imgsz", type=int, default=spec.DEFAULT_IMGSZ,
                   help=f"validation image size in pixels (default {spec.DEFAULT_IMGSZ})")
    c.add_argument("--seed", type=int, default=0, help="seed of the validation inputs (default 0)")
    c.add_argument("--check", choices=["fast", "full"], default="fast",
                   help="validation level: fast (default: main-only dual vs deploy at full size, a small non-square "
                        "batch of 2 with the whole dual model) or full (the whole dual model at full size and on a "
                        "half-size non-square batch of 2)")
    c.add_argument("--no-ema", action="store_true", help="deploy the raw weights even when the checkpoint has an EMA")
    _head_arg(c)
    d = EXPORT_DEFAULTS
    c.add_argument("--opset", type=int, default=d.opset, help=f"ONNX opset (default {d.opset})")
    c.add_argument("--dynamic", action="store_true",
                   help="ONNX: dynamic batch and image size (output0 [batch, 4 + nc, anchors])")
    c.add_argument("--nms", action="store_true", help="ONNX: append NonMaxSuppression (end-to-end boxes; one "
                                                      "detection per box, its best class, as official detect.py)")
    c.add_argument("--multi-label", action="store_true",
                   help="with --nms: one detection per (box, class) above --score-thres, as official val.py")
    c.add_argument("--iou-thres", type=float, default=d.iou_thres, help=f"NMS IoU threshold (default {d.iou_thres})")
    c.add_argument("--score-thres", type=float, default=d.score_thres,
                   help=f"NMS score threshold (default {d.score_thres})")
    c.add_argument("--max-det", type=int, default=d.max_det, help=f"NMS max detections (default {d.max_det})")
    c.add_argument("--export-atol", type=float, default=d.export_atol,
                   help=f"max |diff| between an ONNX/TorchScript artifact and torch (fp32 graph; default "
                        f"{d.export_atol:g}; fp16 runs allow {HALF_RTOL:g} x the output range)")
    c.add_argument("--sha256", default=None, help="expected sha256 of the source checkpoint")
    c.add_argument("--register", metavar="NAME", default=None,
                   help="register the deploy model as a new version of NAME")
    c.add_argument("--alias", action="append", default=[], help="alias to set on the new version (repeatable)")
    c.add_argument("--tag", action="append", default=[], help="KEY=VALUE tag on the new version (repeatable)")
    c.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlruns/mlflow.db)")
    _add_registry_wait(c)
    c.add_argument("--termination-log", default=os.environ.get("REPARAM_TERMINATION_LOG"),
                   help="also write the JSON summary here (Kubernetes: /dev/termination-log)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    c.add_argument("--eval-data", default=None, metavar="DATA",
                   help="evaluate the dual model and every artifact on this YOLO dataset (as for 'reparam evaluate "
                        "--data'); an artifact whose mAP@0.5:0.95 differs from the dual's by more than --eval-atol "
                        "fails the conversion (exit 3)")
    c.add_argument("--eval-imgsz", type=int, default=spec.DEFAULT_IMGSZ,
                   help=f"evaluation image size in pixels (default {spec.DEFAULT_IMGSZ})")
    c.add_argument("--eval-atol", type=float, default=spec.DEFAULT_EVAL_ATOL,
                   help=f"largest |mAP@0.5:0.95 artifact - dual| allowed (default {spec.DEFAULT_EVAL_ATOL:g})")
    c.add_argument("--promote", default=None, metavar="ALIAS",
                   help="gated alias (needs --register and --eval-data): moves to the new version only if the "
                        "equivalence check and every evaluated artifact passed, mAP@0.5:0.95 >= --min-map, and it is "
                        "not worse than the version holding ALIAS by more than --max-regression on the same dataset; "
                        "otherwise the version is registered but held. --alias moves ungated, as before")
    c.add_argument("--min-map", type=float, default=None, help="gate: lowest mAP@0.5:0.95 to promote (0-1)")
    c.add_argument("--max-regression", type=float, default=0.0,
                   help="gate: how much lower than the current holder's mAP@0.5:0.95 may be (default 0)")
    c.add_argument("--hold-alias", default=None, metavar="ALIAS",
                   help="alias set on a version the gates held (e.g. challenger)")
    _state_dict_args(c)

    i = sub.add_parser("inspect", help="show what a checkpoint holds, without converting")
    i.add_argument("source", help="checkpoint: local path or folder, s3://, models:/, runs:/ or http(s):// URI")
    i.add_argument("--json", action="store_true", help="print the description as JSON")
    i.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (as for convert)")
    i.add_argument("--sha256", default=None, help="expected sha256 of the checkpoint")
    _head_arg(i)
    _state_dict_args(i)
    _add_registry_wait(i)

    e = sub.add_parser("evaluate", help="mAP of a model on a YOLO dataset, the way the official val.py computes it")
    e.add_argument("model", help="dual checkpoint, converted .pt, .safetensors, .onnx or TorchScript: local path, "
                                 "s3://, models:/, runs:/ or http(s)://")
    e.add_argument("--data", required=True, help="YOLO dataset: folder with data.yaml, .zip/.tar.gz of one, "
                                                 "s3://bucket/prefix, runs:/<id>/<path> or models:/<name>/<version>")
    e.add_argument("--imgsz", type=int, default=spec.DEFAULT_IMGSZ,
                   help=f"image size in pixels (default {spec.DEFAULT_IMGSZ})")
    e.add_argument("--batch", type=int, default=spec.DEFAULT_EVAL_BATCH,
                   help=f"images per batch (default {spec.DEFAULT_EVAL_BATCH})")
    e.add_argument("--conf", type=float, default=spec.DEFAULT_EVAL_CONF,
                   help=f"score threshold (default {spec.DEFAULT_EVAL_CONF:g}, as official val)")
    e.add_argument("--iou", type=float, default=spec.DEFAULT_EVAL_IOU,
                   help=f"NMS IoU threshold (default {spec.DEFAULT_EVAL_IOU:g}, as official val)")
    e.add_argument("--max-det", type=int, default=spec.DEFAULT_EVAL_MAX_DET,
                   help=f"detections per image (default {spec.DEFAULT_EVAL_MAX_DET})")
    e.add_argument("--split", default="val", help="data.yaml split to evaluate (default val)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (as for convert)")
    e.add_argument("--sha256", default=None, help="expected sha256 of the model file")
    e.add_argument("--device", default=spec.DEFAULT_DEVICE, metavar="DEVICE",
                   help="where a torch model computes (fp32): auto (default: CUDA when available, else CPU), cpu, "
                        "cuda or cuda:N; ONNX runs on onnxruntime's CPU provider")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.add_argument("-v", "--verbose", action="store_true", help="on an error, also print the whole message")
    _add_registry_wait(e)

    w = sub.add_parser("webhook", help="MLflow registry webhooks for ModelConversionPolicy")
    wsub = w.add_subparsers(dest="webhook_command", required=True)
    wr = wsub.add_parser("register", help="create the MLflow webhook that delivers registry events to the operator")
    wr.add_argument("--url", required=True, help="the operator's endpoint, https://HOST/webhooks/mlflow")
    wr.add_argument("--secret-env", required=True, metavar="VAR",
                    help="environment variable holding the signing secret (never the secret itself)")
    wr.add_argument("--model", required=True, help="the source registered model (names the webhook)")
    wr.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (as for convert)")
    wr.add_argument("-v", "--verbose", action="store_true", help="on an error, also print the whole message")

    o = sub.add_parser("operator", help="run the Kubernetes operator (needs reparam[operator])", add_help=False)
    o.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _names_arg(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError("expects comma-separated class names, e.g. car,truck,bus")
    return names


def _head_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head", choices=spec.TRIPLE_HEAD_BRANCHES, default=None,
                   help="TripleDDetect (yolov9-cf) checkpoints: the branch that becomes the deploy DDetect (default "
                        f"{spec.DEFAULT_TRIPLE_HEAD}, the one the official detect.py uses)")


def _state_dict_args(p: argparse.ArgumentParser) -> None:
    # the help names the published configs without importing reparam.models (torch): the parser is built by
    # `reparam operator` too, which must stay torch-free
    p.add_argument("--cfg", default=None, metavar="NAME|FILE",
                   help="the source is a bare state_dict ({key: tensor}); build this architecture for it: a "
                        "published config (yolov9-t/s/m/c/e, gelan-t/s/m/c/e, yolov9-cf, yolov9-c-dseg, gelan-c-dseg, "
                        "gelan-c-seg; the yaml files in reparam/models/configs) or a model yaml in the official format")
    p.add_argument("--nc", type=int, default=None,
                   help="with --cfg: number of classes (default: from the weights' head, which must agree)")
    p.add_argument("--names", type=_names_arg, default=None,
                   help="with --cfg: comma-separated class names, one per class (default: class0, class1, ...)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help=f"print the whole error message too (the error line stops at {MAX_ERROR_CHARS} characters)")


def _fetch(source: str, workdir: Path, args: argparse.Namespace, say=lambda _m: None) -> tuple[Path, dict[str, Any]]:
    """Resolve a source (local path, s3://, models:/, runs:/, http(s)://) to a local file, with its sha256.

    The source's warnings (e.g. its run FAILED) go to stderr, one line each, whatever ``--quiet`` says.
    """
    from .store.sources import fetch

    fetched = fetch(source, workdir, sha256=args.sha256, tracking_uri=args.tracking_uri,
                    registry_wait=args.registry_wait)
    if fetched.note:
        say(fetched.note)
    for warning in fetched.warnings:
        _eprint(f"reparam: warning: {warning}")
    return fetched.path, {"uri": fetched.uri, "sha256": fetched.sha256, "bytes": fetched.bytes,
                          "kind": fetched.kind, "lineage": fetched.lineage, "warnings": list(fetched.warnings)}


def _weights_note(report: "report_mod.Report") -> list[str]:
    """A line saying that the EMA of a mid-training checkpoint was converted (official ``attempt_load`` does too)."""
    if report.weights_used != "ema":
        return []
    epoch = (report.removed or {}).get("checkpoint_entries", {}).get("epoch")
    diff = report.ema_vs_raw_max_abs_diff
    return ["  weights      the EMA (ckpt['ema'] of a mid-training checkpoint"
            + (f", epoch {epoch}" if isinstance(epoch, int) else "") + ")"
            + (f"; the raw 'model' differs by up to {diff:.3g}" if isinstance(diff, float) else "")
            + "; --no-ema converts the raw weights"]


#: How to use each artifact format, for the closing "Results saved to ..." lines.
USAGE = {
    "pt": "official YOLOv9: python detect.py --weights {path} (also val.py, export.py)",
    "safetensors": "no pickle: reparam.converter.artifacts.load_safetensors('{path}')",
    "onnx": "onnxruntime.InferenceSession('{path}')",
    "torchscript": "torch.jit.load('{path}')",
}


def _usage(a: "report_mod.Artifact") -> str:
    """How to use the artifact ``a`` (:data:`USAGE`). For ONNX also its real input, as the report records it: name,
    dtype and shape (static ``[1, 3, imgsz, imgsz]`` unless ``--dynamic``; float16 with ``--precision export=fp16``),
    RGB scaled to 0-1 as the official ``detect.py`` feeds it; a TorchScript file also says the one device it runs
    on, as its trace keeps that device (:mod:`reparam.converter.device`)."""
    text = USAGE.get(a.format, "").format(path=a.path)
    inputs = a.inputs if isinstance(a, report_mod.OnnxArtifact) else None
    if inputs and len(inputs) == 1 and isinstance(inputs[0], dict):
        shape = ", ".join(str(d) for d in inputs[0].get("shape") or [])
        text += f"; input '{inputs[0].get('name')}' {a.dtype or ''} [{shape}] RGB 0-1"
    if isinstance(a, report_mod.TorchScriptArtifact) and a.traced_on:
        if a.traced_on.startswith("cuda"):
            text = (f"torch.jit.load('{a.path}', map_location='{a.traced_on}'); traced on {a.traced_on}: loads and "
                    f"runs on CUDA only, inputs on {a.traced_on} (convert with --device cpu for a CPU file)")
        else:
            text += "; traced on the CPU: CPU inputs only (convert with --device cuda for a GPU file)"
    return text


def _mb(n: int | None) -> str:
    return f"{n / 1e6:.2f} MB" if isinstance(n, int) else "?"


def _artifact_line(a: "report_mod.Artifact", device: str | None = None) -> str:
    """``pt  4.51 MB  sha256 345f840baf36  float16  check passed (max |diff| 1e-05)``: one artifact, like with
    like (its own size, hash and check), and where an export check ran (``on cuda:0``; ONNX: the onnxruntime
    provider, and why when the check ran elsewhere than the conversion ``device``)."""
    if a.check is None:
        check = "exact copy of the validated weights"
    elif a.check_passed is None:
        check = f"check did not run ({a.check.get('reason') or a.check.get('skipped') or 'no reason given'})"
    else:
        diff = a.check.get("max_abs_diff")
        check = ("check passed" if a.check_passed else "check FAILED") + (
            f" (max |diff| {diff:.3g})" if isinstance(diff, (int, float)) else "")
    if a.check_device:
        check += f" on {a.check_device}"
        if a.check_provider:
            provider, why = a.check_provider
            check += f" ({provider}: {why})" if device and a.check_device != device else f" ({provider})"
    return f"  {a.format:<12} {_mb(a.bytes):>10}  sha256 {a.sha256[:12]}  {a.dtype or '':<8} {check}"


def _human_summary(r: "report_mod.Report", tracking_uri: str | None = None) -> str:
    """The text ``reparam convert`` prints on stdout (the report itself with ``--json``)."""
    v = r.validation
    reg = r.registry
    head = f"reparam {r.versions.get('reparam') or __version__}: {r.source.uri}"
    if r.reused and reg:  # nothing converted: an identical version already existed
        return "\n".join([
            head,
            f"  registered   {reg.model_uri} already holds this conversion (deploy sha256 "
            f"{r.deploy_sha256}); nothing new was created",
            f"  aliases      {', '.join(reg.aliases) or 'none'}",
            *([f"  updated tags: {', '.join(reg.updated_tags)}"] if reg.updated_tags else []),
            *_promotion_line(r.promotion),
            *_registry_lines(reg, tracking_uri),
        ])
    head_names, layers, gflops = r.head or {}, r.layers or {}, r.gflops or {}
    lines = [
        head,
        f"  variant      {r.variant} ({head_names['dual']} -> {head_names['deploy']}), "
        f"nc={r.nc}, weights={r.weights_used}",
        *_weights_note(r),
    ]
    if r.pruned is False:
        lines.append(f"  layers       {layers['dual']}: already a deploy model (no auxiliary branch): "
                     "passed through, nothing pruned")
    else:
        lines += [
            f"  layers       {layers['dual']} -> {layers['deploy']} "
            f"(dropped {len(layers['dropped'])})",
            f"  parameters   {r.params_before:,} -> {r.params_after:,}",
        ]
    lines.append(f"  GFLOPs       {gflops['before']:.2f} -> {gflops['after']:.2f} "
                 f"(at {r.gflops_imgsz}px)")
    fused = [c for c in v.comparisons if c.model == "fused"]
    lines.append(f"  max |diff|   {v.max_abs_diff:.3g} (atol {v.atol:g}, check {v.check}"
                 + (f"; fused {max(c.max_abs_diff for c in fused):.3g}" if fused else "") + ") "
                 + ("passed" if v.passed else "FAILED: " + v.reason))
    for c in v.comparisons:
        if c.layers_shared is not None and c.layers_run is not None:
            lines.append(f"  lockstep     {c.model} at {'x'.join(map(str, c.input_shape[2:]))}: {c.layers_shared} of "
                         f"{c.layers_shared + c.layers_run} layers shared with the dual forward, {c.layers_run} ran")
    if r.device:
        lines.append(f"  device       {r.device.used} ({r.device.name})" + "".join(
            f"; also checked on {d.used}: max |diff| {d.max_abs_diff:.3g} "
            f"{'passed' if d.passed else 'FAILED'}" for d in (v.devices or [])[1:]))
    kept = r.outputs_kept is not False
    lines.append(f"  source       {_mb(r.source.bytes):>10}  sha256 {(r.source.sha256 or '?')[:12]}  "
                 f"{r.source.uri}")
    if kept:
        used = r.device.used if r.device else None
        lines.extend(_artifact_line(a, used) for a in r.artifacts)
    stale = r.stale_outputs if kept else None
    if stale:
        lines.append(f"  stale        {len(stale)} file(s) of an earlier run, kept but not written now (not in "
                     f"report.json's artifacts): {', '.join(stale)}")
    ev = r.evaluation
    if ev:
        d = ev["dataset"]
        lines.append(f"  evaluation   {d['source']} ({d['images']} images, {len(d['skipped'])} skipped, digest "
                     f"{d['digest'][:12]}): dual mAP@0.5:0.95 {ev['dual']['map50_95']:.4f}, mAP@0.5 "
                     f"{ev['dual']['map50']:.4f}" + _mask_part(ev["dual"]))
        for a in ev["artifacts"]:
            mask = (f", mask {a['mask_map50_95']:.4f} (delta {a['delta_mask_map50_95']:+.2g})"
                    if "delta_mask_map50_95" in a else "")
            lines.append(f"  evaluated    {a['format']}: " + (f"skipped ({a['skipped']})" if a.get("skipped") else
                         f"mAP@0.5:0.95 {a['map50_95']:.4f} (delta {a['delta_map50_95']:+.2g}){mask} "
                         f"{'passed' if a['passed'] else 'FAILED'}"))
        for f in ev.get("files", []) if kept else []:
            lines.append(f"  wrote        {f['path']} ({f['kind'].replace('_', ' ')} of {f['form']})")
    if reg:
        skipped = reg.promotion_skipped
        lines.append(f"  registered   {reg.model_uri} (aliases: {', '.join(reg.aliases) or 'none'})"
                     + (" [existing version, nothing new]" if reg.existing else "")
                     + (f" [no alias moved: {skipped}]" if skipped and skipped != "no alias requested" else ""))
        if reg.updated_tags:
            lines.append(f"  updated tags: {', '.join(reg.updated_tags)}")
    lines.extend(_promotion_line(r.promotion))
    lines.append(f"  time         {r.duration_s or 0:.1f} s")
    if kept and r.artifacts:
        folder = str(Path(r.artifacts[0].path).parent)
        lines.append(f"Results saved to {folder} (report.json says what was checked)")
        lines.extend(f"  {a.name:<40} {_usage(a)}" for a in r.artifacts)
    if reg:
        lines.extend(_registry_lines(reg, tracking_uri))
    return "\n".join(lines)


def _registry_lines(reg: "report_mod.Registry", tracking_uri: str | None) -> list[str]:
    """Where the registered model lives: tracking URI, run id, ``models:/name/version`` and how to load it."""
    return [f"Registered in MLflow at {reg.tracking_uri or tracking_uri or '$MLFLOW_TRACKING_URI'}",
            f"  model        {reg.model_uri}  (mlflow.artifacts.download_artifacts('{reg.model_uri}'), or "
            f"reparam evaluate {reg.model_uri})",
            f"  run          {reg.run_id or 'none'} (metrics of this conversion, experiment 'reparam')"]


def _summary_of(r: "report_mod.Report | None", code: int, message: str | None) -> dict[str, Any]:
    """The termination summary (:mod:`reparam.summary`) of a run, read from its report (``None`` when the run
    failed before there was one)."""
    outcome = "succeeded" if code == 0 else ("validation_failed" if code == exitcodes.VALIDATION_FAILED else "failed")
    s: dict[str, Any] = {"outcome": outcome, "exitCode": code}
    if code:
        s["reason"] = exitcodes.REASONS.get(code, "Error")
        s["message"] = message
    if r is not None and r.status in report_mod.STATUSES:
        reg = r.registry
        pt = r.artifact("pt")
        s.update({
            "modelName": reg.model_name if reg else None,
            "version": reg.version if reg else None,
            "modelUri": reg.model_uri if reg else None,
            "aliases": reg.aliases if reg else None,
            "deploySha256": r.deploy_sha256,
            "paramsBefore": r.params_before,
            "paramsAfter": r.params_after,
            "maxAbsDiff": r.validation.max_abs_diff,
            "bytesBefore": r.source.bytes if pt else None,
            "bytesAfter": pt.bytes if pt else None,
        })
        ev = r.evaluation or {}
        promo = r.promotion or {}
        if ev.get("dual") or promo.get("map50_95") is not None:
            dual = ev.get("dual") or {}
            box = promo.get("map50_95") if promo.get("metric", "box") == "box" else None
            s["metrics"] = {"map50_95": box if box is not None else dual.get("map50_95"),
                            "map50": dual.get("map50"),
                            "datasetDigest": promo.get("compared_on_digest") or (ev.get("dataset") or {}).get("digest")}
            masks = dual.get("masks") or {}
            mask = promo.get("map50_95") if promo.get("metric") == "mask" else masks.get("map50_95")
            if mask is not None:  # a segmentation model on polygon labels
                s["metrics"].update({"mask_map50_95": mask, "mask_map50": masks.get("map50")})
        if promo:
            s["promotion"] = {"alias": promo.get("alias"), "decision": promo.get("decision"),
                              "reason": promo.get("reason"), "previousVersion": promo.get("previous_version")}
    return s


def _write_termination(path: str | None, summary: dict[str, Any]) -> None:
    if not path:
        return
    try:
        Path(path).write_text(summary_mod.dumps(summary))
    except OSError as exc:
        _eprint(f"reparam: warning: cannot write termination log {path}: {exc}")


def _check_promotion(args: argparse.Namespace) -> None:
    """Refuse inconsistent ``--promote`` options before anything is fetched."""
    gated_opts = args.min_map is not None or args.max_regression != 0.0 or args.hold_alias
    if args.promote is None:
        if gated_opts:
            raise InvalidInputError("--min-map, --max-regression and --hold-alias need --promote ALIAS")
        return
    if not args.register:
        raise InvalidInputError("--promote needs --register NAME")
    if not args.eval_data:
        raise InvalidInputError("--promote needs --eval-data DATA: the gates compare mAP on your validation set")
    try:
        spec.check_aliases([args.promote] + ([args.hold_alias] if args.hold_alias else []))
    except spec.SpecError as err:
        raise InvalidInputError(f"--promote/--hold-alias: {err}") from None
    if args.promote in args.alias or args.hold_alias == args.promote:
        raise InvalidInputError(f"alias {args.promote!r} is both gated (--promote) and ungated (--alias/--hold-alias)")
    if args.min_map is not None and not 0.0 <= args.min_map <= 1.0:
        raise InvalidInputError(f"--min-map must be between 0 and 1, got {args.min_map:g}")
    if not 0.0 <= args.max_regression <= 1.0:
        raise InvalidInputError(f"--max-regression must be between 0 and 1, got {args.max_regression:g}")


def _mask_part(entry: dict[str, Any]) -> str:
    """The mask metrics of a segmentation model's evaluation entry (or why there are none); empty for detection."""
    if entry.get("masks"):
        return f"; mask mAP@0.5:0.95 {entry['masks']['map50_95']:.4f}, mAP@0.5 {entry['masks']['map50']:.4f}"
    return f"; masks not scored: {entry['masks_absent']}" if entry.get("masks_absent") else ""


def _promotion_line(p: dict[str, Any] | None) -> list[str]:
    """The summary line of the report's ``promotion`` section (none without ``--promote``)."""
    if not p:
        return []
    kind = "mask mAP@0.5:0.95" if p.get("metric") == "mask" else "mAP@0.5:0.95"
    m = f"{kind} {p['map50_95']:.4f}" if isinstance(p.get("map50_95"), float) else "no mAP"
    prev = " (first holder)"
    if p.get("previous_version"):
        prev = f" vs version {p['previous_version']}" + (f" ({p['previous_map50_95']:.4f})"
                                                         if isinstance(p.get("previous_map50_95"), float) else "")
    return [f"  promotion    @{p['alias']}: {p['decision'].upper()}, {m}{prev}"
            + (f"; reason: {p['reason']}" if p.get("reason") else "")
            + (f"; @{p['hold_alias']} set" if p.get("hold_alias") else "")]


def _gated_request(args: argparse.Namespace, dataset) -> dict[str, Any] | None:
    """The ``gated`` argument of :func:`reparam.store.publish.register_conversion` for ``--promote``."""
    if args.promote is None:
        return None
    from .evaluation import EvalSettings, evaluate_model, load_model
    from .store.promotion import Gates, Measured

    settings = EvalSettings(imgsz=args.eval_imgsz)

    def evaluate(path: Path) -> Measured:
        res = evaluate_model(load_model(path), dataset, settings, path=str(path), progress=False)
        mk = res.masks
        return Measured(res.dataset["digest"], args.eval_imgsz, float(res.map50_95), float(res.map50),
                        None if mk is None else float(mk.map50_95), None if mk is None else float(mk.map50))

    return {"alias": args.promote, "gates": Gates(args.min_map, args.max_regression), "hold_alias": args.hold_alias,
            "evaluate": evaluate, "dataset_source": dataset.source,
            "probe": Measured(dataset.digest, args.eval_imgsz, 0.0)}


def cmd_convert(args: argparse.Namespace) -> int:
    """``reparam convert``; returns the exit code."""
    say = (lambda m: None) if args.quiet else (lambda m: _eprint(f"reparam: {m}"))
    report: report_mod.Report | None = None
    t0 = time.perf_counter()
    try:
        _check_output(args)  # first: before torch is imported or the source is read
        from types import SimpleNamespace

        from .converter.export.options import check_export_options  # torch-free
        from .store.sources import check_local

        onnx = {"opset": args.opset, "dynamic": args.dynamic, "nms": args.nms, "multi_label": args.multi_label,
                "iou_thres": args.iou_thres, "score_thres": args.score_thres, "max_det": args.max_det}
        try:
            formats = spec.resolve_formats(args.formats, args.only)
        except spec.SpecError as err:
            raise InvalidInputError(str(err)) from None
        # contradictory export flags first (a usage error, whatever the source), then a mistyped path: both
        # reported before torch is imported (seconds)
        check_export_options(SimpleNamespace(onnx=onnx, export_atol=args.export_atol, formats=formats))
        check_local(args.source)
        tags = _parse_tags(args.tag)
        if (args.alias or tags) and not args.register:
            raise InvalidInputError("--alias and --tag need --register NAME")
        _check_registration(args.register, args.alias)
        _check_promotion(args)
        if tags:
            from .store.registry import check_user_tags

            check_user_tags(tags)  # a reserved key is refused before anything is downloaded
        precision = _precision(args)
        problem = spec.precision_family_problem(args.precision, formats)
        if problem:
            raise InvalidInputError(f"--{problem}")
        from .converter.convert import ConvertOptions, convert  # torch: after every check of the command line

        options = ConvertOptions(
            atol=args.atol, fp32=precision.weights == "fp32", half=precision.export == "fp16", fuse=args.fuse,
            formats=formats, imgsz=args.imgsz, seed=args.seed, device=args.device, check_device=args.check_device,
            prefer_ema=not args.no_ema, check_level=args.check,
            onnx=onnx, export_atol=args.export_atol,
            eval_data=args.eval_data, eval_imgsz=args.eval_imgsz, eval_atol=args.eval_atol,
            cfg=args.cfg, nc=args.nc, names=args.names, head=args.head,
        )
        options.check()
        with tempfile.TemporaryDirectory(prefix="reparam-") as work:
            eval_dataset = None
            if args.eval_data:  # a bad dataset is reported before any conversion work
                from .evaluation import open_dataset

                eval_dataset = open_dataset(args.eval_data, Path(work) / "eval-data", tracking_uri=args.tracking_uri)
            path, info = _fetch(args.source, Path(work), args, say)
            out = Path(args.output) if args.output else (
                Path(work) / "out" if args.register else Path(f"{Path(path).stem}-deploy"))
            _check_output(args, out)
            key = previous = None
            if args.register:
                from .store import publish

                key = publish.idempotency_key(info["sha256"], options.settings_key())
                previous = publish.find_previous(args.register, key, args.alias, args.tracking_uri, tags=tags,
                                                 log=say)
            if previous is not None:
                say(f"{args.source} was already converted with these settings: "
                    f"{args.register} version {previous['version']}; nothing to convert")
                report = publish.reused_report(previous, source=report_mod.Source(**info),
                                               command=report_mod.command_line(getattr(args, 'argv', None)),
                                               versions=report_mod.versions())
                report.registry, report.promotion = publish.reuse(
                    previous, args.alias, args.tracking_uri, report, tags=tags, log=say,
                    gated=_gated_request(args, eval_dataset))
            else:
                try:
                    report = convert(path, out, options, source_info=info, log=say, eval_dataset=eval_dataset,
                                     command=report_mod.command_line(getattr(args, 'argv', None)))
                except ReparamError as err:
                    report = err.report if isinstance(err, ValidationFailedError) else None
                    raise
                if args.register:
                    from .converter.artifacts import finish_report

                    from .store.tracking import resolve_tracking_uri
                    from .store.uris import redact

                    say(f"registering in MLflow at {redact(resolve_tracking_uri(args.tracking_uri))} ...")
                    t_reg = time.perf_counter()
                    report.registry, report.promotion = publish.register_conversion(
                        report, out, model_name=args.register, aliases=args.alias, tags=tags, key=key,
                        lineage=info.get("lineage"), tracking_uri=args.tracking_uri, log=say,
                        wait_s=args.registry_wait, gated=_gated_request(args, eval_dataset),
                    )
                    report.registry.tracking_uri = redact(resolve_tracking_uri(args.tracking_uri))
                    report.timing["register_s"] = round(time.perf_counter() - t_reg, 4)
                    say(f"registering in MLflow: done in {report.timing['register_s']:.1f} s")
                    report.outputs_kept = bool(args.output)
                    finish_report(out, report)
        report.timing["total_s"] = time.perf_counter() - t0
        if args.json:
            print(report_mod.dumps(report))
        else:
            print(_human_summary(report, args.tracking_uri))
        _write_termination(args.termination_log, _summary_of(report, 0, None))
        return exitcodes.OK
    except ReparamError as err:
        line = _print_error(str(err), args.verbose)
        if args.json and report:
            print(report_mod.dumps(report))
        _write_termination(args.termination_log,
                           _summary_of(report, err.exit_code, line.removeprefix("reparam: error: ")))
        return err.exit_code


def cmd_inspect(args: argparse.Namespace) -> int:
    """``reparam inspect``: print what the checkpoint holds and what conversion would keep."""
    try:
        from .store.sources import check_local

        check_local(args.source)  # before torch is imported
        from .converter.inspect import describe, format_description

        with tempfile.TemporaryDirectory(prefix="reparam-") as work:
            path, info = _fetch(args.source, Path(work), args)
            if args.cfg is None and (args.nc is not None or args.names is not None):
                raise InvalidInputError("--nc and --names are for a bare state_dict and need --cfg")
            desc = describe(path, cfg=args.cfg, nc=args.nc, names=args.names, head=args.head)
            desc["source"] = info
        print(json.dumps(desc, indent=2, default=str) if args.json else format_description(desc))
        return exitcodes.OK
    except ReparamError as err:
        _print_error(str(err), args.verbose)
        return err.exit_code


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``reparam evaluate``: evaluate one model file on a dataset; returns the exit code."""
    try:
        from .store.sources import check_local

        check_local(args.model)  # a mistyped path in milliseconds, before torch is imported
    except ReparamError as err:
        _print_error(str(err), args.verbose)
        return err.exit_code
    try:
        from .evaluation import EvalSettings, comparison, describe, evaluate_model, load_model, open_dataset
    except ImportError as exc:
        _print_error(f"evaluation needs the [converter] extra ({exc}): pip install -e '.[converter]'")
        return exitcodes.INVALID_INPUT
    try:
        settings = EvalSettings(imgsz=args.imgsz, batch=args.batch, conf=args.conf, iou=args.iou,
                                max_det=args.max_det, split=args.split)
        settings.check()
        from .converter.device import resolve_device

        device = resolve_device(args.device).torch  # a missing CUDA device is refused before anything is fetched
        with tempfile.TemporaryDirectory(prefix="reparam-") as work:
            dataset = open_dataset(args.data, Path(work) / "data", split=args.split, tracking_uri=args.tracking_uri)
            path, info = _fetch(args.model, Path(work) / "model", args)
            model = load_model(path, device=device)
            result = evaluate_model(model, dataset, settings, path=info["uri"],
                                    progress=None if not args.quiet else False)
        section = comparison(dataset, result, []) if result.form == "dual" else {
            "dataset": result.dataset, "settings": result.settings, "dual": None,
            "artifacts": [{"format": result.form, "path": result.path, **result.metrics(), "delta_map50_95": None,
                           "passed": None, "precision_run": result.precision_run,
                           "weights_dtype": result.weights_dtype, "images_per_s": result.images_per_s}]}
        section.pop("atol", None), section.pop("passed", None)
        if args.json:
            print(json.dumps({"reparam_version": __version__, "model": info, "evaluation": section}, indent=2,
                             default=str))
        else:
            print(f"reparam {__version__}: {info['uri']} ({result.form}, weights {result.weights_dtype})")
            print(describe(result))
        return exitcodes.OK
    except ReparamError as err:
        _print_error(str(err), args.verbose)
        return err.exit_code


def cmd_webhook(args: argparse.Namespace) -> int:
    """``reparam webhook register``: create the MLflow webhook (:func:`reparam.store.webhooks.register_webhook`)."""
    from .store.webhooks import register_webhook

    try:
        secret = os.environ.get(args.secret_env, "")
        if not secret:
            raise InvalidInputError(f"environment variable {args.secret_env} is empty or unset: it must hold the "
                                    "webhook secret (the operator's REPARAM_WEBHOOK_SECRET)")
        info = register_webhook(args.url, secret, args.model, args.tracking_uri)
    except ReparamError as err:
        _print_error(str(err), args.verbose)
        return err.exit_code
    print(f"webhook {info.webhook_id} ({info.name}) -> {info.url}: {', '.join(info.events)}")
    return exitcodes.OK


def cmd_operator(args: argparse.Namespace) -> int:
    """``reparam operator``: hand over to :func:`reparam.operator.main.run`."""
    try:
        from .operator.main import run
    except ImportError as exc:
        _print_error(f"the operator needs the [operator] extra: pip install -e '.[operator]' in a checkout, or pip "
                     f"install 'reparam[operator]' ({exc})")
        return exitcodes.INVALID_INPUT
    return int(run(args.args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``reparam`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # MLflow logs schema migrations of a new local store at INFO; our own progress lines say what matters
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if argv[:1] == ["operator"]:  # everything after it belongs to the operator's own parser (--help included)
        return cmd_operator(argparse.Namespace(args=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in the report's "command"
    handlers = {"convert": cmd_convert, "inspect": cmd_inspect, "evaluate": cmd_evaluate, "operator": cmd_operator,
                "webhook": cmd_webhook}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        _eprint("reparam: interrupted")
        return 130
    except MemoryError:
        _print_error("out of memory; convert on a machine with more RAM")
        return exitcodes.INTERNAL
    except Exception as exc:  # a bug: one line, the traceback only on request
        if os.environ.get("REPARAM_DEBUG"):
            raise
        _print_error(f"{type(exc).__name__}: {exc} (set REPARAM_DEBUG=1 for the traceback and report it)",
                     prefix="reparam: internal error: ", more="set REPARAM_DEBUG=1 for all of it")
        return exitcodes.INTERNAL


if __name__ == "__main__":
    sys.exit(main())
