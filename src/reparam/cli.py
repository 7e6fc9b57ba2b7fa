"""The ``reparam`` command.

::

    reparam convert SOURCE [-o OUT] [--json] [--atol X] [--fp32|--half] [--fuse] [--format F]...
                           [--register NAME [--alias A]... [--tag K=V]...] [--tracking-uri URI] [--sha256 HEX]
                           [--termination-log PATH]
    reparam inspect SOURCE [--json]
    reparam operator [...]            # the Kubernetes operator (needs the [operator] extra)

Exit codes: :mod:`reparam.exitcodes`. Every user error prints one line ``reparam: error: ...``.
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

from . import __version__, exitcodes
from . import summary as summary_mod
from .errors import InvalidInputError, ReparamError


def _eprint(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _parse_tags(items: Sequence[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"--tag expects KEY=VALUE, got {item!r}")
        tags[key] = value
    return tags


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``reparam: error: ...``) and exit code 2, like every user error."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(exitcodes.INVALID_INPUT, f"reparam: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    p = _Parser(prog="reparam", description="YOLOv9 dual checkpoints -> validated deploy models")
    p.add_argument("--version", action="version", version=f"reparam {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a dual checkpoint into a deploy model")
    c.add_argument("source", help="checkpoint: local path, s3://bucket/key, models:/name/version, models:/name@alias, "
                                  "runs:/run_id/path or http(s):// URL")
    c.add_argument("-o", "--output", default=None, help="output folder (default: ./<checkpoint stem>-deploy)")
    c.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    c.add_argument("--atol", type=float, default=1e-4, help="max |diff| allowed between deploy and dual main output "
                                                           "(fp32, output units; default 1e-4)")
    prec = c.add_mutually_exclusive_group()
    prec.add_argument("--fp32", action="store_true", help="keep fp32 weights (default: fp16 like official deploy files)")
    prec.add_argument("--half", action="store_true", help="fp16 weights in every artifact, ONNX/TorchScript included")
    c.add_argument("--fuse", action="store_true", help="fold BatchNorm and re-parameterize RepConvN before export")
    c.add_argument("--format", action="append", dest="formats", default=None,
                   choices=["pt", "safetensors", "onnx", "torchscript"],
                   help="artifact to write (repeatable; default: pt and safetensors)")
    c.add_argument("--imgsz", type=int, default=640, help="validation image size in pixels (default 640)")
    c.add_argument("--seed", type=int, default=0, help="seed of the validation inputs (default 0)")
    c.add_argument("--check", choices=["fast", "full"], default="fast",
                   help="validation level: fast (default: main-only dual vs deploy at full size, a small non-square "
                        "batch of 2 with the whole dual model) or full (the whole dual model at full size and on a "
                        "half-size non-square batch of 2)")
    c.add_argument("--no-ema", action="store_true", help="deploy the raw weights even when the checkpoint has an EMA")
    c.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    c.add_argument("--dynamic", action="store_true", help="ONNX: dynamic batch and image size")
    c.add_argument("--nms", action="store_true", help="ONNX: append NonMaxSuppression (end-to-end boxes)")
    c.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold (default 0.45)")
    c.add_argument("--score-thres", type=float, default=0.25, help="NMS score threshold (default 0.25)")
    c.add_argument("--max-det", type=int, default=300, help="NMS max detections (default 300)")
    c.add_argument("--export-atol", type=float, default=1e-3,
                   help="max |diff| between an ONNX/TorchScript artifact and torch (fp32 graph; default 1e-3; "
                        "fp16 runs allow 2e-3 x the output range)")
    c.add_argument("--sha256", default=None, help="expected sha256 of the source checkpoint")
    c.add_argument("--register", metavar="NAME", default=None, help="register the deploy model as a new version of NAME")
    c.add_argument("--alias", action="append", default=[], help="alias to set on the new version (repeatable)")
    c.add_argument("--tag", action="append", default=[], help="KEY=VALUE tag on the new version (repeatable)")
    c.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlruns/mlflow.db)")
    c.add_argument("--termination-log", default=os.environ.get("REPARAM_TERMINATION_LOG"),
                   help="also write the JSON summary here (Kubernetes: /dev/termination-log)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")

    i = sub.add_parser("inspect", help="show what a checkpoint holds, without converting")
    i.add_argument("source", help="checkpoint: local path or folder, s3://, models:/, runs:/ or http(s):// URI")
    i.add_argument("--json", action="store_true", help="print the description as JSON")
    i.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (as for convert)")
    i.add_argument("--sha256", default=None, help="expected sha256 of the checkpoint")

    o = sub.add_parser("operator", help="run the Kubernetes operator (needs reparam[operator])", add_help=False)
    o.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _fetch(source: str, workdir: Path, sha256: str | None, tracking_uri: str | None,
           say=lambda _m: None) -> tuple[Path, dict[str, Any]]:
    """Resolve a source (local path, s3://, models:/, runs:/, http(s)://) to a local file, with its sha256."""
    from .store.sources import fetch

    fetched = fetch(source, workdir, sha256=sha256, tracking_uri=tracking_uri)
    if fetched.note:
        say(fetched.note)
    return fetched.path, {"uri": fetched.uri, "sha256": fetched.sha256, "bytes": fetched.bytes,
                          "kind": fetched.kind, "lineage": fetched.lineage}


def _human_summary(report: dict[str, Any]) -> str:
    v = report["validation"]
    reg = report.get("registry")
    if "layers" not in report and reg:  # nothing converted: an identical version already existed
        return "\n".join([
            f"reparam {report['reparam_version']}: {report['source']['uri']}",
            f"  registered   {reg['model_uri']} already holds this conversion (deploy sha256 "
            f"{report.get('deploy_sha256')}); nothing new was created",
            f"  aliases      {', '.join(reg.get('aliases') or []) or 'none'}",
        ])
    lines = [
        f"reparam {report['reparam_version']}: {report['source']['uri']}",
        f"  variant      {report['variant']} ({report['head']['dual']} -> {report['head']['deploy']}), "
        f"nc={report['nc']}, weights={report['weights_used']}",
        f"  layers       {report['layers']['dual']} -> {report['layers']['deploy']} "
        f"(dropped {len(report['layers']['dropped'])})",
        f"  parameters   {report['params']['before']:,} -> {report['params']['after']:,}",
        f"  GFLOPs       {report['gflops']['before']:.2f} -> {report['gflops']['after']:.2f} "
        f"(at {report['gflops_imgsz']}px)",
    ]
    if "bytes" in report:
        b = report["bytes"]
        change = f"saved {b['saved']:,}" if b["saved"] >= 0 else f"{-b['saved']:,} larger"
        lines.append(f"  bytes        {b['before']:,} -> {b['after']:,} ({change})")
    lines.append(f"  max |diff|   {v['max_abs_diff']:.3g} (atol {v['atol']:g}, check {v.get('check', 'full')}) "
                 f"{'passed' if v['passed'] else 'FAILED: ' + v['reason']}")
    for a in report.get("artifacts", []) if report.get("outputs_kept", True) else []:
        check = a.get("check")
        extra = f", check max |diff| {check['max_abs_diff']:.3g}" if isinstance(check, dict) and "max_abs_diff" in check else ""
        lines.append(f"  wrote        {a['path']} ({a['bytes']:,} bytes{extra})")
    if reg:
        lines.append(f"  registered   {reg.get('model_uri')} (aliases: {', '.join(reg.get('aliases') or []) or 'none'})"
                     + (" [existing version, nothing new]" if reg.get("existing") else "")
                     + (f" [no alias moved: {reg['promotion_skipped']}]" if reg.get("promotion_skipped")
                        and reg["promotion_skipped"] != "no alias requested" else ""))
    lines.append(f"  time         {report['timing'].get('total_s', 0):.1f} s")
    return "\n".join(lines)


def _summary_of(report: dict[str, Any] | None, code: int, message: str | None) -> dict[str, Any]:
    outcome = "succeeded" if code == 0 else ("validation_failed" if code == exitcodes.VALIDATION_FAILED else "failed")
    s: dict[str, Any] = {"outcome": outcome, "exitCode": code}
    if code:
        s["reason"] = exitcodes.REASONS.get(code, "Error")
        s["message"] = message
    if report:
        reg = report.get("registry") or {}
        s.update({
            "modelName": reg.get("model_name"),
            "version": str(reg["version"]) if reg.get("version") is not None else None,
            "modelUri": reg.get("model_uri"),
            "aliases": reg.get("aliases"),
            "deploySha256": report.get("deploy_sha256"),
            "paramsBefore": report.get("params", {}).get("before"),
            "paramsAfter": report.get("params", {}).get("after"),
            "maxAbsDiff": report.get("validation", {}).get("max_abs_diff"),
            "bytesBefore": report.get("bytes", {}).get("before"),
            "bytesAfter": report.get("bytes", {}).get("after"),
        })
    return s


def _write_termination(path: str | None, summary: dict[str, Any]) -> None:
    if not path:
        return
    try:
        Path(path).write_text(summary_mod.dumps(summary))
    except OSError as exc:
        _eprint(f"reparam: warning: cannot write termination log {path}: {exc}")


def cmd_convert(args: argparse.Namespace) -> int:
    """``reparam convert``; returns the exit code."""
    from .converter.convert import ConvertOptions, convert

    say = (lambda m: None) if args.quiet else (lambda m: _eprint(f"reparam: {m}"))
    report: dict[str, Any] | None = None
    t0 = time.perf_counter()
    try:
        tags = _parse_tags(args.tag)
        if (args.alias or tags) and not args.register:
            raise InvalidInputError("--alias and --tag need --register NAME")
        options = ConvertOptions(
            atol=args.atol, fp32=args.fp32, half=args.half, fuse=args.fuse,
            formats=tuple(dict.fromkeys(args.formats or ["pt", "safetensors"])), imgsz=args.imgsz, seed=args.seed,
            prefer_ema=not args.no_ema, check_level=args.check,
            onnx={"opset": args.opset, "dynamic": args.dynamic, "nms": args.nms, "iou_thres": args.iou_thres,
                  "score_thres": args.score_thres, "max_det": args.max_det},
            export_atol=args.export_atol,
        )
        options.check()
        with tempfile.TemporaryDirectory(prefix="reparam-") as work:
            path, info = _fetch(args.source, Path(work), args.sha256, args.tracking_uri, say)
            out = Path(args.output) if args.output else (
                Path(work) / "out" if args.register else Path(f"{Path(path).stem}-deploy"))
            key = previous = None
            if args.register:
                from .store import publish

                key = publish.idempotency_key(info["sha256"], options.settings_key())
                previous = publish.find_previous(args.register, key, args.alias, args.tracking_uri)
            if previous is not None:
                say(f"{args.source} was already converted with these settings: "
                    f"{args.register} version {previous['version']}; nothing to do")
                report = {"reparam_version": __version__, "status": "succeeded", "source": info,
                          **publish.summary_from_tags(previous), "timing": {},
                          "registry": publish.reuse(previous, args.alias, args.tracking_uri)}
            else:
                try:
                    report = convert(path, out, options, source_info=info, log=say)
                except ReparamError as err:
                    report = getattr(err, "report", None)
                    raise
                if args.register:
                    from .converter.artifacts import finish_report

                    report["registry"] = publish.register_conversion(
                        report, out, model_name=args.register, aliases=args.alias, tags=tags, key=key,
                        lineage=info.get("lineage"), tracking_uri=args.tracking_uri, log=say,
                    )
                    report["outputs_kept"] = bool(args.output)
                    finish_report(out, report)
        report["timing"]["total_s"] = time.perf_counter() - t0
        if args.json:
            print(json.dumps(report, indent=2, default=str))
        else:
            print(_human_summary(report))
        _write_termination(args.termination_log, _summary_of(report, 0, None))
        return exitcodes.OK
    except ReparamError as err:
        _eprint(f"reparam: error: {err}")
        if args.json and report:
            print(json.dumps(report, indent=2, default=str))
        _write_termination(args.termination_log, _summary_of(report, err.exit_code, str(err)))
        return err.exit_code


def cmd_inspect(args: argparse.Namespace) -> int:
    """``reparam inspect``: print what the checkpoint holds and what conversion would keep."""
    from .converter.inspect import describe, format_description

    try:
        with tempfile.TemporaryDirectory(prefix="reparam-") as work:
            path, info = _fetch(args.source, Path(work), args.sha256, args.tracking_uri)
            desc = describe(path)
            desc["source"] = info
        print(json.dumps(desc, indent=2, default=str) if args.json else format_description(desc))
        return exitcodes.OK
    except ReparamError as err:
        _eprint(f"reparam: error: {err}")
        return err.exit_code


def cmd_operator(args: argparse.Namespace) -> int:
    """``reparam operator``: hand over to :func:`reparam.operator.main.run`."""
    try:
        from .operator.main import run
    except ImportError as exc:
        _eprint(f"reparam: error: the operator needs the [operator] extra ({exc}): pip install -e '.[operator]' "
                "in a checkout, or pip install 'reparam[operator]'")
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
    handlers = {"convert": cmd_convert, "inspect": cmd_inspect, "operator": cmd_operator}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        _eprint("reparam: interrupted")
        return 130
    except MemoryError:
        _eprint("reparam: error: out of memory; convert on a machine with more RAM")
        return exitcodes.INTERNAL
    except Exception as exc:  # a bug: one line, the traceback only on request
        if os.environ.get("REPARAM_DEBUG"):
            raise
        _eprint(f"reparam: internal error: {type(exc).__name__}: {exc} (set REPARAM_DEBUG=1 for the traceback "
                "and report it)")
        return exitcodes.INTERNAL


if __name__ == "__main__":
    sys.exit(main())
