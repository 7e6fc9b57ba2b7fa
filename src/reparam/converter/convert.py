"""The conversion pipeline: dual checkpoint in, validated deploy artifacts and a report out.

Steps (each recorded in the report): read the checkpoint safely (:mod:`.checkpoint`), derive the deploy graph
(:mod:`.pruning`), copy the main-branch weights (:mod:`.transfer`), check equivalence (:mod:`.validation`),
optionally fuse, then write the artifacts atomically (:mod:`.artifacts`). Nothing is written into ``out_dir``
unless every step passed; a failed validation leaves only ``report.json`` (marked failed) behind.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import __version__
from ..spec import DEFAULT_ATOL, DEFAULT_FORMATS, FORMATS
from ..errors import InvalidInputError, ValidationFailedError, brief, count_of
from ..hashing import hash_file
from ..models import DetectionModel, fuse_model
from . import artifacts
from .checkpoint import TRAINING_KEYS, compact, read_checkpoint, variant_of
from .export.options import EXPORT_DEFAULTS, check_export_options
from .pruning import derive_deploy_plan
from .transfer import transfer_weights
from .validation import check_equivalence, count_params, gflops, sample_inputs


@dataclass
class ConvertOptions:
    """Settings of one conversion.

    Attributes:
        atol: tolerance on max |deploy - dual main| in output units (pixels / probability), fp32.
        fp32: keep fp32 weights in the .pt/.safetensors (default: fp16, as the official deploy checkpoints).
        half: fp16 weights in every artifact, ONNX/TorchScript included.
        fuse: fold BatchNorm into convs and re-parameterize RepConvN before export.
        formats: artifacts to write, from :data:`reparam.spec.FORMATS`.
        imgsz: validation / GFLOPs image size in pixels (rounded up to the model's largest stride).
        seed: seed of the validation inputs.
        prefer_ema: deploy the EMA weights when the checkpoint holds them.
        onnx: ONNX options (fields of :class:`~.export.options.ExportOptions`: opset, dynamic, nms, multi_label,
            iou_thres, score_thres, max_det); missing ones take its defaults.
        export_atol: tolerance on max |artifact - torch| for the ONNX/TorchScript checks (fp32 graphs; see
            :mod:`.export`).
        eval_data: the dataset source evaluated (``--eval-data``; the dataset itself is passed to :func:`convert`).
        eval_imgsz: evaluation image size in pixels; eval_atol: largest |mAP@0.5:0.95 artifact - dual|
            (:mod:`reparam.evaluation.conversion`).
        cfg: the source is a bare state_dict of this architecture: a published name (``yolov9-c``) or a config
            file (see :func:`.checkpoint.read_state_dict`); ``None`` for a training checkpoint.
        nc: with ``cfg``: the class count, checked against the weights (which decide it).
        names: with ``cfg``: class names, one per class (default ``class0`` ...).
    """

    atol: float = DEFAULT_ATOL
    fp32: bool = False
    half: bool = False
    fuse: bool = False
    formats: tuple[str, ...] = DEFAULT_FORMATS
    imgsz: int = 640
    seed: int = 0
    prefer_ema: bool = True
    onnx: dict[str, Any] = field(default_factory=dict)
    export_atol: float = EXPORT_DEFAULTS.export_atol
    eval_data: str | None = None
    eval_imgsz: int = 640
    eval_atol: float = 1e-3
    cfg: str | None = None
    nc: int | None = None
    names: tuple[str, ...] | None = None

    def settings_key(self) -> str:
        """A stable digest of the settings that change the outputs (for idempotent registration)."""
        text = repr((self.atol, self.fp32, self.half, self.fuse, tuple(sorted(self.formats)), self.imgsz, self.seed,
                     self.prefer_ema, sorted(self.onnx.items()))
                    + ((self.export_atol,) if {"onnx", "torchscript"} & set(self.formats) else ())
                    + ((self.eval_data, self.eval_imgsz, self.eval_atol) if self.eval_data else ())
                    + ((_config_digest(self.cfg), self.nc, self.names) if self.cfg is not None else ()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def check(self) -> None:
        """Raise InvalidInputError for contradictory or out-of-range settings."""
        bad = [f for f in self.formats if f not in FORMATS]
        if bad:
            raise InvalidInputError(f"unknown format(s) {', '.join(bad)}; choose from {', '.join(FORMATS)}")
        if self.fp32 and self.half:
            raise InvalidInputError("--fp32 and --half contradict each other; pick one")
        if not (self.atol > 0):
            raise InvalidInputError(f"--atol must be > 0, got {self.atol}")
        if self.cfg is None and (self.nc is not None or self.names is not None):
            raise InvalidInputError("--nc and --names are for a bare state_dict and need --cfg")
        if self.nc is not None and self.nc < 1:
            raise InvalidInputError(f"--nc must be >= 1, got {self.nc}")
        if self.imgsz < 32 or self.imgsz > 4096:
            raise InvalidInputError(f"--imgsz must be between 32 and 4096 pixels, got {self.imgsz}")
        if self.eval_data is not None:
            if not (self.eval_atol > 0):
                raise InvalidInputError(f"--eval-atol must be > 0, got {self.eval_atol}")
            if not 32 <= self.eval_imgsz <= 4096:
                raise InvalidInputError(f"--eval-imgsz must be between 32 and 4096 pixels, got {self.eval_imgsz}")
        check_export_options(self)


def _config_digest(spec: str) -> str:
    """``spec`` plus the sha256 of the file it names (a config file's content changes the outputs)."""
    path = Path(spec).expanduser()
    return f"{spec}:{hash_file(path)[0]}" if path.is_file() else spec


def build_model(cfg: dict[str, Any], nc: int, names: dict[int, str], state: dict[str, torch.Tensor] | None = None,
                *, what: str = "model", fits: str = "its config") -> DetectionModel:
    """Build our :class:`DetectionModel` from a config and (optionally) load ``state`` strictly, in fp32.

    Raises InvalidInputError when the weights do not fit the config: missing, unexpected and other-shape keys by
    count and first example (``fits`` names the config in the message, e.g. ``"--cfg yolov9-c"``).
    """
    model = DetectionModel(cfg, ch=int(cfg.get("ch", 3) or 3), nc=nc)
    model.names = dict(names)
    if state is not None:
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(count_of(missing, "missing"))
            if unexpected:
                parts.append(count_of(unexpected, "unexpected"))
            if shapes:
                k = shapes[0]
                parts.append(f"{len(shapes):,} of another shape (e.g. {brief(k)}: {list(state[k].shape)} vs "
                             f"{list(own[k].shape)})")
            raise InvalidInputError(f"the {what}'s weights do not fit {fits}: " + "; ".join(parts))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.float().eval()


@dataclass
class Pruned:
    """The dual model, the deploy plan, and the deploy model carrying the main-branch weights (both fp32, eval)."""

    plan: Any
    dual: DetectionModel
    deploy: DetectionModel
    deploy_sd: dict[str, torch.Tensor]
    account: Any


def prune(cfg: dict[str, Any], nc: int, names: dict[int, str], state: dict[str, torch.Tensor], *,
          what: str = "checkpoint", fits: str = "its config") -> Pruned:
    """Build the dual model from ``cfg`` + ``state``, apply the pruning rule and build the deploy model.

    ``deploy_sd`` holds the transferred tensors in their saved dtype (e.g. fp16). Raises InvalidInputError when the
    weights do not fit the config (``what``/``fits`` name both in the message) or the transfer is not exact.
    """
    plan = derive_deploy_plan(cfg)
    dual = build_model(cfg, nc, names, state, what=what, fits=fits)
    skeleton = DetectionModel(plan.deploy_cfg, ch=int(plan.deploy_cfg.get("ch", 3) or 3), nc=nc)
    deploy_sd, account = transfer_weights(state, list(skeleton.state_dict()), plan)
    if not account.exact:
        raise InvalidInputError("weight transfer is not exact: " + "; ".join(account.problems))
    deploy = build_model(plan.deploy_cfg, nc, names, deploy_sd, what="deploy model")
    deploy.stride = dual.stride.clone()
    deploy.model[-1].stride = dual.model[-1].stride.clone()
    return Pruned(plan, dual, deploy, deploy_sd, account)


def convert(
    source: str | Path,
    out_dir: str | Path,
    options: ConvertOptions | None = None,
    *,
    source_info: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    eval_dataset: Any = None,
) -> dict[str, Any]:
    """Convert one dual checkpoint and write its deploy artifacts into ``out_dir``.

    With ``eval_dataset`` (a :class:`reparam.evaluation.Dataset`) the dual model and every artifact are evaluated on
    it before anything is published (:mod:`reparam.evaluation.conversion`; report section ``evaluation``).

    Returns the report dict (also written as ``out_dir/report.json``).

    Raises:
        InvalidInputError / UnsafeCheckpointError: bad input (nothing written).
        ValidationFailedError: the deploy model's output differs, or an artifact's mAP differs from the dual's by
            more than ``options.eval_atol`` (only a failed ``report.json`` is written); the report is attached as
            ``err.report``.
    """
    options = options or ConvertOptions()
    options.check()
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    path = Path(source)
    timings: dict[str, float] = {}

    ckpt = read_checkpoint(path, prefer_ema=options.prefer_ema, cfg=options.cfg, nc=options.nc,
                           names=options.names)
    timings["load_s"] = time.perf_counter() - t0
    if eval_dataset is not None:  # a dataset of other classes is reported before any conversion work
        from ..evaluation import check_names

        check_names(ckpt.names, eval_dataset.names)
    say(f"loaded {path.name}: {ckpt.head_name}, nc={ckpt.nc}, {len(ckpt.state_dict)} tensors ({ckpt.weights} weights"
        + (f", config {ckpt.origin['config']}" if ckpt.origin else "") + ")")
    for note in (ckpt.origin or {}).get("notes", []):
        say(note)
    t = time.perf_counter()
    pruned = prune(ckpt.cfg, ckpt.nc, ckpt.names, ckpt.state_dict,
                   what="state_dict" if ckpt.origin else "checkpoint", fits=ckpt.fits)
    plan, dual, deploy, deploy_sd, account = pruned.plan, pruned.dual, pruned.deploy, pruned.deploy_sd, pruned.account
    if ckpt.stride is None:  # a bare state_dict: the strides the model measured, as YOLOv9 does when it builds one
        ckpt.stride = [float(s) for s in dual.stride.tolist()]
    timings["build_s"] = time.perf_counter() - t

    t = time.perf_counter()
    stride = int(max(ckpt.stride)) if ckpt.stride else 32
    inputs = sample_inputs(options.imgsz, stride, options.seed)
    result = check_equivalence(dual, deploy, inputs, options.atol)
    fused_result = None
    fused = None
    if options.fuse:
        fused = fuse_model(copy.deepcopy(deploy)).eval()
        fused_result = check_equivalence(dual, fused, inputs, options.atol)
        if result.passed and not fused_result.passed:
            result.passed = False
            result.reason = f"fused model: {fused_result.reason}"
        result.max_abs_diff = max(result.max_abs_diff, fused_result.max_abs_diff)
    timings["validate_s"] = time.perf_counter() - t
    say(f"validation: max |diff| {result.max_abs_diff:.3g} (atol {options.atol:g}) -> {'passed' if result.passed else 'FAILED'}")

    t = time.perf_counter()
    stats = {
        "params": {"before": count_params(dual), "after": count_params(deploy)},
        "gflops": {"before": round(gflops(dual, inputs[0].shape[-1]), 3), "after": round(gflops(deploy, inputs[0].shape[-1]), 3)},
        "gflops_imgsz": int(inputs[0].shape[-1]),
    }
    timings["stats_s"] = time.perf_counter() - t

    removed = {k: compact(ckpt.top_level[k]) for k in TRAINING_KEYS if ckpt.top_level.get(k) not in (None, -1)}
    dropped_attrs = [a for a in ("hyp", "class_weights") if a in ckpt.model_attrs]
    info = dict(source_info or {})
    info.setdefault("uri", str(path))
    info.setdefault("path", str(path.resolve()))
    info.setdefault("bytes", ckpt.file_bytes)
    if "sha256" not in info:
        info["sha256"] = hash_file(path)[0]

    report: dict[str, Any] = {
        "reparam_version": __version__,
        "source": info,
        "variant": variant_of(ckpt),
        "model_class": ckpt.model_class,
        "package_prefix": ckpt.package_prefix,
        "head": {"dual": plan.dual_head, "deploy": plan.deploy_cfg["head"][-1][2] if plan.pruned else plan.dual_head},
        "pruned": plan.pruned,
        "nc": ckpt.nc,
        "names": {str(k): v for k, v in ckpt.names.items()},
        "stride": ckpt.stride,
        "weights_used": ckpt.weights,
        "state_dict": ckpt.origin,
        "ema_vs_raw_max_abs_diff": ckpt.ema_differs_by,
        "layers": {
            "dual": len(ckpt.cfg["backbone"]) + len(ckpt.cfg["head"]),
            "deploy": len(plan.layer_map),
            "dropped": plan.dropped,
            "map": {str(k): v for k, v in sorted(plan.layer_map.items())},
        },
        "tensors": {"dual": len(ckpt.state_dict), "deploy": len(deploy_sd), "dropped": account.dropped,
                    "main_branch": account.main_keys, "used_exactly_once": account.exact},
        **stats,
        "removed": {"checkpoint_entries": removed, "model_attributes": dropped_attrs},
        "validation": {**result.to_dict(), "imgsz": int(inputs[0].shape[-1]), "seed": options.seed},
        "fusion": None if fused_result is None else {
            "max_abs_diff_vs_dual": fused_result.max_abs_diff,
            "modules_before": sum(1 for _ in deploy.modules()),
            "modules_after": sum(1 for _ in fused.modules()),
        },
        "options": {"atol": options.atol, "fp32": options.fp32, "half": options.half, "fuse": options.fuse,
                    "formats": list(options.formats), "imgsz": options.imgsz, "seed": options.seed,
                    "onnx": dict(options.onnx), "export_atol": options.export_atol,
                    **({"eval_data": options.eval_data, "eval_imgsz": options.eval_imgsz,
                        "eval_atol": options.eval_atol} if options.eval_data else {}),
                    **({"cfg": options.cfg, "nc": options.nc,
                        "names": list(options.names) if options.names is not None else None}
                       if options.cfg is not None else {})},
        "settings_key": options.settings_key(),
        "deploy_config": copy.deepcopy(plan.deploy_cfg),
        "timing": timings,
    }
    out = Path(out_dir)
    if not result.passed:
        report["status"] = "validation_failed"
        report["timing"]["total_s"] = time.perf_counter() - t0
        artifacts.write_report_only(out, report, stem=path.stem)
        err = ValidationFailedError(
            f"validation failed: {result.reason}; no deploy model was written (report: {out / 'report.json'}). "
            "Check that the checkpoint is a train_dual.py checkpoint, or loosen --atol if the difference is rounding"
        )
        err.report = report  # type: ignore[attr-defined]
        raise err

    evaluate = None
    if eval_dataset is not None:
        def evaluate(stage: Path, arts: list[dict[str, Any]]) -> None:
            from ..evaluation import EvalSettings
            from ..evaluation.conversion import evaluate_conversion

            t_eval = time.perf_counter()
            try:
                report["evaluation"] = evaluate_conversion(
                    eval_dataset, EvalSettings(imgsz=options.eval_imgsz), dual, fused, stage, arts,
                    options.eval_atol, say)
            except ValidationFailedError as err:
                report["evaluation"] = getattr(err, "evaluation", None)
                raise
            finally:
                timings["evaluate_s"] = time.perf_counter() - t_eval

    try:
        artifacts.write_all(out, path, ckpt, plan, dual, fused if fused is not None else deploy, deploy, deploy_sd,
                            options, report, say, evaluate=evaluate)
    except ValidationFailedError as err:  # an export's check or the evaluation failed: as a failed validation
        report["status"] = "validation_failed"
        report["timing"]["total_s"] = time.perf_counter() - t0
        artifacts.write_report_only(out, report, stem=path.stem)
        err.report = report  # type: ignore[attr-defined]
        raise
    report["status"] = "succeeded"
    report["timing"]["total_s"] = time.perf_counter() - t0
    artifacts.finish_report(out, report)
    return report
