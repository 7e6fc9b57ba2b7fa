"""The conversion pipeline: dual checkpoint in, validated deploy artifacts and a report out.

Steps (each recorded in the report): read the checkpoint safely (:mod:`.checkpoint`), derive the deploy graph
(:mod:`.pruning`), copy the main-branch weights (:mod:`.transfer`), check equivalence (:mod:`.validation`),
optionally fuse, then write the artifacts atomically (:mod:`.artifacts`). Nothing is written into ``out_dir``
unless every step passed; a failed validation leaves only ``report.json`` (marked failed) behind.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .. import spec
from .. import report as report_mod
from ..spec import (DEFAULT_ATOL, DEFAULT_DEVICE, DEFAULT_FORMATS, FORMATS, TRIPLE_HEAD_BRANCHES, Precision,
                    device_problem)
from ..errors import InvalidInputError, ValidationFailedError, brief, count_of
from ..hashing import hash_file
from ..models import DetectionModel, fuse_model
from . import artifacts
from .checkpoint import TRAINING_KEYS, compact, read_checkpoint, variant_of
from .cpus import limit_threads
from .device import resolve_device
from .export.options import EXPORT_DEFAULTS, check_export_options
from .pruning import compare_with_published, derive_deploy_plan
from .transfer import transfer_weights
from .validation import CHECK_LEVELS, check_conversion, count_params


@dataclass
class ConvertOptions:
    """Settings of one conversion.

    Attributes:
        atol: tolerance on max |deploy - dual main| in output units (pixels / probability), fp32.
        fp32: fp32 weights in the .pt/.safetensors (default: fp16, as the official deploy checkpoints); the
            ``weights`` family of ``--precision`` (:func:`reparam.spec.parse_precision`).
        half: fp16 ONNX/TorchScript (weights and input; default fp32, as the official ``export.py``); the
            ``export`` family of ``--precision``. Independent of ``fp32``.
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
        check_level: validation level, ``"fast"`` (default) or ``"full"`` (:func:`.validation.check_conversion`).
        cfg: the source is a bare state_dict of this architecture: a published name (``yolov9-c``) or a config
            file (see :func:`.checkpoint.read_state_dict`); ``None`` for a training checkpoint.
        nc: with ``cfg``: the class count, checked against the weights (which decide it).
        names: with ``cfg``: class names, one per class (default ``class0`` ...).
        head: the TripleDDetect branch to deploy (``--head``: ``fine``/``coarse``,
            :data:`reparam.spec.TRIPLE_HEAD_BRANCHES`); None: the head's default (:func:`.pruning.head_rule`).
        device: where the validation, the fusion check, the export checks and the evaluation compute
            (:mod:`.device`; ``auto``: CUDA when available, else CPU). The TorchScript file is traced on it (and
            keeps it), so a CUDA device is part of :meth:`settings_key` when TorchScript is written; no other
            artifact depends on it.
        check_device: a second device the equivalence check also runs on (``--check-device``; e.g. ``cuda``, the
            device the model will serve on), or None. Its result goes to the report's ``validation.devices``; a
            failure there fails the conversion.
    """

    atol: float = DEFAULT_ATOL
    fp32: bool = False
    half: bool = False
    fuse: bool = False
    formats: tuple[str, ...] = DEFAULT_FORMATS
    imgsz: int = spec.DEFAULT_IMGSZ
    seed: int = 0
    prefer_ema: bool = True
    onnx: dict[str, Any] = field(default_factory=dict)
    export_atol: float = EXPORT_DEFAULTS.export_atol
    eval_data: str | None = None
    eval_imgsz: int = spec.DEFAULT_IMGSZ
    eval_atol: float = spec.DEFAULT_EVAL_ATOL
    cfg: str | None = None
    nc: int | None = None
    names: tuple[str, ...] | None = None
    check_level: str = "fast"
    head: str | None = None
    device: str = DEFAULT_DEVICE
    check_device: str | None = None

    @property
    def precision(self) -> Precision:
        """The precision of each artifact family (:class:`reparam.spec.Precision`)."""
        return Precision("fp32" if self.fp32 else "fp16", "fp16" if self.half else "fp32")

    def settings_key(self) -> str:
        """A stable digest of the settings that change the outputs (for idempotent registration).

        Raises InvalidInputError when TorchScript is written and ``device`` names a CUDA device torch cannot see.
        """
        text = repr((self.atol, self.fp32, self.half, self.fuse, tuple(sorted(self.formats)), self.imgsz, self.seed,
                     self.prefer_ema, sorted(self.onnx.items()))
                    + ((self.export_atol,) if {"onnx", "torchscript"} & set(self.formats) else ())
                    + ((self.eval_data, self.eval_imgsz, self.eval_atol) if self.eval_data else ())
                    + ((_config_digest(self.cfg), self.nc, self.names) if self.cfg is not None else ())
                    + ((self.check_level,) if self.check_level != CHECK_LEVELS[0] else ())
                    + ((("head", self.head),) if self.head is not None else ())
                    + ((("torchscript_device", traced),) if (traced := self._traced_on()) != "cpu" else ()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _traced_on(self) -> str:
        """The device a TorchScript file of these options is traced on (``cpu`` when none is written)."""
        return str(resolve_device(self.device).torch) if "torchscript" in self.formats else "cpu"

    def check(self) -> None:
        """Raise InvalidInputError for contradictory or out-of-range settings."""
        bad = [f for f in self.formats if f not in FORMATS]
        if bad:
            raise InvalidInputError(f"unknown format(s) {', '.join(bad)}; choose from {', '.join(FORMATS)}")
        for flag, value in (("--device", self.device), ("--check-device", self.check_device)):
            problem = device_problem(value) if value is not None else None
            if problem:
                raise InvalidInputError(f"{flag}: {problem}")
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
        if self.head is not None and self.head not in TRIPLE_HEAD_BRANCHES:
            raise InvalidInputError(f"--head must be one of {', '.join(TRIPLE_HEAD_BRANCHES)}, got {self.head!r}")
        if self.check_level not in CHECK_LEVELS:
            raise InvalidInputError(f"--check must be one of {', '.join(CHECK_LEVELS)}, got {self.check_level!r}")
        check_export_options(self)


def _config_digest(spec: str) -> str:
    """``spec`` plus the sha256 of the file it names (a config file's content changes the outputs)."""
    path = Path(spec).expanduser()
    return f"{spec}:{hash_file(path)[0]}" if path.is_file() else spec


def build_model(cfg: dict[str, Any], nc: int, names: dict[int, str], state: dict[str, torch.Tensor] | None = None,
                *, what: str = "model", fits: str = "its config", keep_dtype: bool = False,
                stride: list[float] | None = None) -> DetectionModel:
    """Build our :class:`DetectionModel` from a config and (optionally) load ``state`` strictly (eval mode).

    Without ``state`` the model is freshly initialised in fp32. With ``state`` it is built on the ``meta`` device
    (no initialisation; the stride forward runs on shapes only) and then takes the tensors of ``state``: fp32
    copies, or with ``keep_dtype`` the tensors themselves (no copy, saved dtype such as fp16; compute with
    :func:`.validation.computing_in_fp32`). ``stride`` (pixels per head level, e.g. the checkpoint's own) skips
    measuring them; :func:`.validation.check_conversion` checks them against the feature maps.

    Raises InvalidInputError when the weights do not fit the config: missing, unexpected and other-shape keys by
    count and first example (``fits`` names the config in the message, e.g. ``"--cfg yolov9-c"``).
    """
    if state is None:
        model = DetectionModel(cfg, ch=int(cfg.get("ch", 3) or 3), nc=nc)
        model.names = dict(names)
        return model.float().eval()
    with torch.device("meta"):
        model = DetectionModel(cfg, ch=int(cfg.get("ch", 3) or 3), nc=nc, stride=stride)
    model.names = dict(names)
    return load_weights(model, state, what=what, fits=fits, keep_dtype=keep_dtype)


def load_weights(model: DetectionModel, state: dict[str, torch.Tensor], *, what: str = "model",
                 fits: str = "its config", keep_dtype: bool = False) -> DetectionModel:
    """Give ``model`` (built on any device, e.g. ``meta``) the tensors of ``state``, strictly; returns it in eval.

    fp32 copies of floating tensors unless ``keep_dtype`` (then the tensors themselves, shared, no copy). Plain
    tensor attributes left on ``meta`` (the head's unused ``anchors``/``strides``) become empty CPU tensors.
    Raises InvalidInputError when the weights do not fit (as :func:`build_model`).
    """
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
    tensors = state if keep_dtype else {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(tensors, assign=True)
    for m in model.modules():
        for name, value in list(vars(m).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(m, name, torch.zeros(value.shape, dtype=value.dtype))
    return model.eval()


@dataclass
class Pruned:
    """The dual model, the deploy plan, and the deploy model carrying the main-branch weights (eval).

    Both models hold the checkpoint's own tensors in their saved dtype (no copies; fp16 for official checkpoints);
    run them under :func:`.validation.computing_in_fp32`.
    """

    plan: Any
    dual: DetectionModel
    deploy: DetectionModel
    deploy_sd: dict[str, torch.Tensor]
    account: Any


def prune(cfg: dict[str, Any], nc: int, names: dict[int, str], state: dict[str, torch.Tensor], *,
          what: str = "checkpoint", fits: str = "its config", phase: Callable[[str], Any] | None = None,
          stride: list[float] | None = None, branch: str | None = None) -> Pruned:
    """Build the dual model from ``cfg`` + ``state``, apply the pruning rule and build the deploy model.

    ``deploy_sd`` holds the transferred tensors in their saved dtype (e.g. fp16). ``phase(name)``, when given, is a
    context manager timing the ``derive`` and ``transfer`` steps; ``stride``, when known (the checkpoint's), spares
    measuring it (see :func:`build_model`); ``branch`` picks a TripleDDetect branch (``--head``). Raises
    InvalidInputError when the weights do not fit the config
    (``what``/``fits`` name both in the message) or the transfer is not exact.
    """
    timed = phase or (lambda _name: contextlib.nullcontext())
    with timed("derive"):
        plan = derive_deploy_plan(cfg, branch)
    with timed("transfer"):
        dual = build_model(cfg, nc, names, state, what=what, fits=fits, keep_dtype=True, stride=stride)
        with torch.device("meta"):
            skeleton = DetectionModel(plan.deploy_cfg, ch=int(plan.deploy_cfg.get("ch", 3) or 3), nc=nc,
                                      stride=dual.model[-1].stride.tolist())
        deploy_sd, account = transfer_weights(state, list(skeleton.state_dict()), plan, cfg, branch)
        if not account.exact:
            raise InvalidInputError("weight transfer is not exact: " + "; ".join(account.problems))
        skeleton.names = dict(names)
        deploy = load_weights(skeleton, deploy_sd, what="deploy model", keep_dtype=True)
    deploy.stride = dual.stride.clone()
    deploy.model[-1].stride = dual.model[-1].stride.clone()
    return Pruned(plan, dual, deploy, deploy_sd, account)


#: What each timed step of :func:`convert` does, as its progress line says it (``yolo export`` style).
STEPS = {
    "load": "reading the checkpoint (safe unpickler)",
    "derive": "deriving the deploy graph from the checkpoint's config",
    "transfer": "copying the main-branch weights",
    "validate": "equivalence check: deploy vs dual main output",
    "stats": "counting parameters and GFLOPs",
    "write": "writing the artifacts",
}


def _phases(timings: dict[str, float], say: Callable[[str], None] | None = None) -> Callable[[str], Any]:
    """``phase(name)``: a context manager adding wall (``<name>_s``) and process CPU time (``<name>_cpu_s``: user +
    system of every thread, :func:`time.process_time`) of its block to ``timings``, in seconds.

    With ``say``, each step prints ``<step> ...`` (:data:`STEPS`) as it starts and ``<step> done in X s`` as it ends
    (``failed after X s`` when it raised), so a long step is never a silence.
    """

    @contextmanager
    def phase(name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        what = STEPS.get(name, name)
        if say:
            say(f"{what} ...")
        ok = False
        try:
            yield
            ok = True
        finally:
            took = time.perf_counter() - wall
            timings[f"{name}_s"] = round(timings.get(f"{name}_s", 0.0) + took, 4)
            timings[f"{name}_cpu_s"] = round(timings.get(f"{name}_cpu_s", 0.0) + time.process_time() - cpu, 4)
            if say:
                say(f"{what}: {'done in' if ok else 'failed after'} {took:.1f} s")

    return phase


def convert(
    source: str | Path,
    out_dir: str | Path,
    options: ConvertOptions | None = None,
    *,
    source_info: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    eval_dataset: Any = None,
    command: Sequence[str] | None = None,
) -> report_mod.Report:
    """Convert one dual checkpoint and write its deploy artifacts into ``out_dir``.

    With ``eval_dataset`` (a :class:`reparam.evaluation.Dataset`) the dual model and every artifact are evaluated on
    it before anything is published (:mod:`reparam.evaluation.conversion`; report section ``evaluation``).

    ``command`` is the command line recorded in the report (the CLI passes ``reparam convert ...``).

    Returns the report (:class:`reparam.report.Report`, also written as ``out_dir/report.json``; its schema
    ``reparam/schemas/report.schema.json``).

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
    phase = _phases(timings, say)
    threads = limit_threads()
    device = resolve_device(options.device)  # a missing CUDA device is refused before the checkpoint is read
    check_device = (resolve_device(options.check_device, "--check-device") if options.check_device is not None
                    else None)

    with phase("load"):
        ckpt = read_checkpoint(path, prefer_ema=options.prefer_ema, cfg=options.cfg, nc=options.nc,
                               names=options.names)
    if eval_dataset is not None:  # a dataset of other classes is reported before any conversion work
        from ..evaluation import check_names

        check_names(ckpt.names, eval_dataset.names)
    say(f"loaded {path.name}: {ckpt.head_name}, nc={ckpt.nc}, {len(ckpt.state_dict)} tensors ({ckpt.weights} weights"
        + (f", config {ckpt.origin['config']}" if ckpt.origin else "") + ")")
    for note in (ckpt.origin or {}).get("notes", []):
        say(note)
    say(f"device {device.torch} ({device.name})" + (f"; the equivalence check also on {check_device.torch} "
                                                     f"({check_device.name})" if check_device else ""))
    pruned = prune(ckpt.cfg, ckpt.nc, ckpt.names, ckpt.state_dict, what="state_dict" if ckpt.origin else "checkpoint",
                   fits=ckpt.fits, phase=phase, stride=ckpt.stride, branch=options.head)
    plan, dual, deploy, deploy_sd, account = pruned.plan, pruned.dual, pruned.deploy, pruned.deploy_sd, pruned.account
    if {"onnx", "torchscript"} & set(options.formats):  # an export this model cannot have is refused before any work
        from .export.modules import check_export_target

        check_export_target(deploy, tuple(options.formats), bool(options.onnx.get("nms")))
    if ckpt.stride is None:  # a bare state_dict: the strides the model measured, as YOLOv9 does when it builds one
        ckpt.stride = [float(s) for s in dual.stride.tolist()]

    with phase("validate"):
        stride = int(max(ckpt.stride)) if ckpt.stride else 32
        check = dict(imgsz=options.imgsz, stride=stride, seed=options.seed, atol=options.atol,
                     level=options.check_level, branch=plan.branch)
        result, flops = check_conversion(dual, deploy, **check, device=device.torch)
        fused_result = None
        fused = None
        if options.fuse:
            fused = fuse_model(copy.deepcopy(deploy).float()).eval()
            fused_result, _ = check_conversion(dual, fused, **check, device=device.torch)
            if result.passed and not fused_result.passed:
                result.passed = False
                result.reason = f"fused model: {fused_result.reason}"
            result.max_abs_diff = max(result.max_abs_diff, fused_result.max_abs_diff)
            # the top-level max |diff| covers both models: so do the comparisons listed under it
            result.comparisons += [dataclasses.replace(c, model="fused") for c in fused_result.comparisons]
        devices = [report_mod.DeviceCheck(**device.to_dict(), max_abs_diff=result.max_abs_diff, passed=result.passed)]
        if check_device is not None:
            extra, _ = check_conversion(dual, deploy, **check, device=check_device.torch)
            if fused is not None:
                extra_fused, _ = check_conversion(dual, fused, **check, device=check_device.torch)
                extra.max_abs_diff = max(extra.max_abs_diff, extra_fused.max_abs_diff)
                extra.passed = extra.passed and extra_fused.passed
                extra.reason = extra.reason or (f"fused model: {extra_fused.reason}" if extra_fused.reason else "")
            devices.append(report_mod.DeviceCheck(**check_device.to_dict(), max_abs_diff=extra.max_abs_diff,
                                                  passed=extra.passed))
            if result.passed and not extra.passed:
                result.passed = False
                result.reason = f"on {check_device.torch}: {extra.reason}"
            result.max_abs_diff = max(result.max_abs_diff, extra.max_abs_diff)
    say(f"validation ({options.check_level}): max |diff| {result.max_abs_diff:.3g} (atol {options.atol:g}) -> "
        f"{'passed' if result.passed else 'FAILED'}")

    with phase("stats"):  # the GFLOPs were counted during the validation's non-square check
        params_before, params_after = count_params(dual), count_params(deploy)
        gflops = {"before": round(flops["before"], 3), "after": round(flops["after"], 3)}

    published = compare_with_published(ckpt.cfg, plan)  # where the derived config differs from the published one
    removed = {k: compact(ckpt.top_level[k]) for k in TRAINING_KEYS if ckpt.top_level.get(k) not in (None, -1)}
    if ckpt.weights == "ema" and ckpt.top_level.get("model") is not None:  # the raw weights, not deployed
        removed = {"model": compact(ckpt.top_level["model"]), **removed}
    dropped_attrs = [a for a in ("hyp", "class_weights") if a in ckpt.model_attrs]
    info = dict(source_info or {})
    info.setdefault("uri", str(path))
    info.setdefault("path", str(path.resolve()))
    info.setdefault("bytes", ckpt.file_bytes)
    if "sha256" not in info:
        info["sha256"] = hash_file(path)[0]

    report = report_mod.Report(
        status="running",  # set below, before it is written
        command=list(command) if command is not None else [],
        versions=report_mod.versions(),
        source=report_mod.Source(**info),
        variant=variant_of(ckpt),
        model_class=ckpt.model_class,
        package_prefix=ckpt.package_prefix,
        head={"dual": plan.dual_head, "deploy": plan.deploy_cfg["head"][-1][2] if plan.pruned else plan.dual_head,
              "branch": plan.branch, "inputs": plan.head_inputs, "renamed": dict(plan.head_rename)},
        pruned=plan.pruned,
        nc=ckpt.nc,
        names={str(k): v for k, v in ckpt.names.items()},
        stride=ckpt.stride,
        weights_used=ckpt.weights,
        state_dict=ckpt.origin,
        ema_vs_raw_max_abs_diff=ckpt.ema_differs_by,
        layers={
            "dual": len(ckpt.cfg["backbone"]) + len(ckpt.cfg["head"]),
            "deploy": len(plan.layer_map),
            "dropped": plan.dropped,
            "map": {str(k): v for k, v in sorted(plan.layer_map.items())},
        },
        tensors={"dual": len(ckpt.state_dict), "deploy": len(deploy_sd), "dropped": account.dropped,
                 "main_branch": account.main_keys, "used_exactly_once": account.exact},
        params_before=params_before, params_after=params_after, gflops=gflops, gflops_imgsz=int(flops["imgsz"]),
        removed={"checkpoint_entries": removed, "model_attributes": dropped_attrs},
        validation=result.to_report(imgsz=int(flops["imgsz"]), seed=options.seed, devices=devices),
        device=report_mod.DeviceUse(**device.to_dict()),
        fusion=None if fused_result is None else {
            "max_abs_diff_vs_dual": fused_result.max_abs_diff,
            "modules_before": sum(1 for _ in deploy.modules()),
            "modules_after": sum(1 for _ in fused.modules()),
        },
        options={"atol": options.atol, "fp32": options.fp32, "half": options.half, "fuse": options.fuse,
                    "precision": dataclasses.asdict(options.precision), "device": options.device,
                    "check_device": options.check_device,
                    "formats": list(options.formats), "imgsz": options.imgsz, "seed": options.seed,
                    "onnx": dict(options.onnx), "export_atol": options.export_atol, "check": options.check_level,
                    **({"eval_data": options.eval_data, "eval_imgsz": options.eval_imgsz,
                        "eval_atol": options.eval_atol} if options.eval_data else {}),
                    **({"cfg": options.cfg, "nc": options.nc,
                        "names": list(options.names) if options.names is not None else None}
                       if options.cfg is not None else {})},
        settings_key=options.settings_key(),
        deploy_config=copy.deepcopy(plan.deploy_cfg),
        published_config=published.to_dict() if published else None,
        timing=timings,
        threads=threads,
    )
    out = Path(out_dir)
    if not result.passed:
        report.status = "validation_failed"
        report.timing["total_s"] = time.perf_counter() - t0
        artifacts.write_report_only(out, report, stem=path.stem)
        err = ValidationFailedError(
            f"validation failed: {result.reason}; no deploy model was written (report: {out / 'report.json'}"
            + (f"; {len(report.stale_outputs)} earlier deploy file(s) kept there, stale"
               if report.stale_outputs else "") + "). "
            "Check that the checkpoint is a train_dual.py checkpoint, or loosen --atol if the difference is rounding"
        )
        err.report = report
        raise err

    evaluate: Callable[[Path, list[report_mod.Artifact]], None] | None = None
    if eval_dataset is not None:
        def evaluate_artifacts(stage: Path, arts: list[report_mod.Artifact]) -> None:
            from ..evaluation import EvalSettings
            from ..evaluation.conversion import evaluate_conversion

            t_eval = time.perf_counter()
            what = f"evaluating the dual model and {len(arts)} artifact(s) on the dataset"
            say(f"{what} ...")
            ok = False
            try:
                report.evaluation = section = evaluate_conversion(
                    eval_dataset, EvalSettings(imgsz=options.eval_imgsz), dual, fused, stage,
                    [a.to_dict() for a in arts],
                    options.eval_atol, say, device=device.torch, stem=path.stem)
                for f in section.get("files", []):  # the plots and tables, published next to report.json
                    f["sha256"], f["bytes"] = hash_file(stage / f["name"])
                    f["path"] = str(out / f["name"])
                ok = True
            except ValidationFailedError as err:
                report.evaluation = err.evaluation
                raise
            finally:
                timings["evaluate_s"] = took = time.perf_counter() - t_eval
                say(f"{what}: {'done in' if ok else 'failed after'} {took:.1f} s")

        evaluate = evaluate_artifacts

    try:
        with phase("write"):
            artifacts.write_all(out, path, ckpt, plan, dual, fused if fused is not None else deploy, deploy,
                                options, report, say,
                                evaluate=evaluate if eval_dataset is not None else None)
        for unit in ("s", "cpu_s"):  # write_all times the export (and the evaluation) inside it
            timings[f"write_{unit}"] = round(timings[f"write_{unit}"] - timings.get(f"export_{unit}", 0.0)
                                             - (timings.get("evaluate_s", 0.0) if unit == "s" else 0.0), 4)
    except ValidationFailedError as err:  # an export's check or the evaluation failed: as a failed validation
        report.status = "validation_failed"
        report.timing["total_s"] = time.perf_counter() - t0
        artifacts.write_report_only(out, report, stem=path.stem)
        err.report = report
        raise
    report.status = "succeeded"
    report.timing["total_s"] = time.perf_counter() - t0
    artifacts.finish_report(out, report)
    return report
