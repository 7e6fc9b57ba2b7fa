"""The evaluation step of ``reparam convert --eval-data``: the dual model and every artifact written, on one dataset.

Called by :func:`reparam.converter.artifacts.write_all` after the artifacts are written into the staging folder and
before anything is published, so a failed evaluation publishes nothing (only ``report.json``, marked failed).

Evaluated: the dual model's main branch (the reference), the fused model (``--fuse``, in memory), and each artifact
file as written (``.pt`` fp16 as saved, ``.safetensors``, ONNX through onnxruntime, TorchScript), all with the same
:class:`~.settings.EvalSettings`. A static-shape ONNX graph only runs at its own input shape, so it is compared with
the dual model evaluated at that shape too (``dual_map50_95_same_shapes`` in its entry). An end-to-end (``--nms``)
ONNX graph applies its own NMS thresholds and is listed as ``skipped`` with the reason, not scored.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ValidationFailedError
from .backends import from_module, load_model
from .dataset import Dataset
from .evaluate import comparison, evaluate_model, with_shape_of
from .result import EvalResult
from .settings import EvalSettings


def evaluate_conversion(dataset: Dataset, settings: EvalSettings, dual: nn.Module, fused: nn.Module | None,
                        stage: Path, artifacts: list[dict[str, Any]], atol: float,
                        say: Callable[[str], None] = lambda _m: None, *,
                        device: torch.device | str | None = None, stem: str | None = None) -> dict[str, Any]:
    """Evaluate the dual model, ``fused`` (when given) and every artifact file in ``stage``.

    Args:
        dataset: the checked dataset; settings: evaluation settings.
        dual: the dual model (fp32, eval; names set); fused: the fused deploy model or None.
        stage: the folder holding the artifact files; artifacts: the report's artifact dicts (``name``, ``format``,
            ``path``, ``nms``).
        atol: largest allowed ``|mAP@0.5:0.95 artifact - dual|``.
        device: where the torch models (dual, fused, ``.pt``, ``.safetensors``, TorchScript) compute, in fp32
            (``None``: the CPU); ONNX graphs run on onnxruntime's CPU provider whatever it says.
        stem: when given, the PR curve, confusion matrix and per-class table (:mod:`.plots`) of the deploy ``.pt``
            (the registered model's main file; the dual model's when no ``.pt`` was evaluated) are written into
            ``stage`` as ``<stem>-eval-*`` and listed in the section's ``files`` (``kind``, ``name``, ``form``).

    Returns:
        The report's ``evaluation`` section (:func:`~.evaluate.comparison`, plus ``seconds`` and ``files``).

    Raises:
        InvalidInputError: the dataset's class names differ from the model's.
        ValidationFailedError: an artifact's mAP differs by more than ``atol`` (``err.evaluation`` holds the
            section).
    """
    t0 = time.perf_counter()
    ref_model = from_module(dual, "dual", device=device)
    say(f"evaluating on {dataset.source} ({len(dataset.items)} images, digest {dataset.digest[:12]})")
    ref = evaluate_model(ref_model, dataset, settings, label="evaluating dual")
    say(f"dual: mAP@0.5:0.95 {ref.map50_95:.4f}, mAP@0.5 {ref.map50:.4f}" + _mask_note(ref))
    same_shape: dict[tuple[int, int], EvalResult] = {}
    pairs: list[tuple[EvalResult, EvalResult]] = []
    skipped: list[dict[str, Any]] = []
    candidates: list[tuple[str, Any, str | None]] = []
    if fused is not None:
        candidates.append(("fused", from_module(fused, "fused", device=device), None))
    for a in artifacts:
        if a.get("nms"):
            skipped.append({"format": a["format"], "path": a["path"], "passed": None,
                            "skipped": "end-to-end graph: its NMS thresholds are not the evaluation's"})
            continue
        candidates.append((a["format"], lambda p=stage / a["name"]: load_model(p, device=device), a["path"]))
    for form, model, path in candidates:
        loaded = model() if callable(model) and not hasattr(model, "predict") else model
        res = evaluate_model(loaded, dataset, settings, path=path, label=f"evaluating {form}")
        base = ref
        if loaded.fixed_shape is not None:
            if loaded.fixed_shape not in same_shape:
                same_shape[loaded.fixed_shape] = evaluate_model(with_shape_of(ref_model, loaded), dataset, settings,
                                                                label=f"evaluating dual at {loaded.fixed_shape}")
            base = same_shape[loaded.fixed_shape]
        pairs.append((res, base))
        say(f"{form}: mAP@0.5:0.95 {res.map50_95:.4f} (delta {res.map50_95 - base.map50_95:+.2g})"
            + ("" if res.masks is None or base.masks is None else
               f", mask {res.masks.map50_95:.4f} (delta {res.masks.map50_95 - base.masks.map50_95:+.2g})"))
    section = comparison(dataset, ref, pairs, atol)
    section["artifacts"] += skipped
    if stem is not None and section["passed"]:
        from .plots import write_evaluation_files

        shown = next((res for res, _base in pairs if res.form == "pt"), ref)
        section["files"] = [{**f, "form": shown.form} for f in write_evaluation_files(shown, stage, stem)]
    section["seconds"] = time.perf_counter() - t0
    if not section["passed"]:
        bad = [a for a in section["artifacts"] if a.get("passed") is False]
        err = ValidationFailedError(
            "evaluation failed: " + "; ".join(_failure(a) for a in bad)
            + f" (--eval-atol {atol:g}); nothing was published")
        err.evaluation = section
        raise err
    return section


def _mask_note(res: EvalResult) -> str:
    """``, mask mAP@0.5:0.95 x`` / ``; masks not scored: why`` for a segmentation model; empty for detection."""
    if res.masks is not None:
        return f"; mask mAP@0.5:0.95 {res.masks.map50_95:.4f}, mask mAP@0.5 {res.masks.map50:.4f}"
    return f"; masks not scored: {res.masks_absent}" if res.masks_absent else ""


def _failure(a: dict[str, Any]) -> str:
    """One failed artifact: the metric(s) that differ from the dual model's."""
    parts = [f"mAP@0.5:0.95 {a['map50_95']:.4f} differs from the dual model's by {a['delta_map50_95']:+.4f}"]
    if "delta_mask_map50_95" in a:
        parts.append(f"mask mAP@0.5:0.95 {a['mask_map50_95']:.4f} by {a['delta_mask_map50_95']:+.4f}")
    return f"{a['format']} " + ", ".join(parts)
