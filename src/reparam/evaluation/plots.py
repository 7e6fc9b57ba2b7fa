"""The evaluation's pictures and tables: PR curve, confusion matrix (PNG, matplotlib) and the per-class table (CSV).

Written next to ``report.json`` by ``reparam convert --eval-data`` (and so registered with the deploy model, see
:mod:`reparam.store.registry`), because people look at these rather than read numbers. The plots follow the
official ``val.py`` ones (``PR_curve.png``, ``confusion_matrix.png``) in content, not in code:

* PR curve: per class COCO's interpolated precision at IoU 0.5 over the 101 recall points (its mean is the class's
  AP50, shown in the legend), and their mean over classes, thick;
* confusion matrix: :mod:`.confusion` at the official thresholds; cells coloured by the fraction of the true class
  (column-normalised, as official) and annotated with the counts;
* per-class table: ``class, instances, precision, recall, map50, map50_95`` with a first ``all`` row; and the
  confusion counts as CSV (row = detected, column = true, ``background`` last), the numbers behind the picture;
* segmentation models with mask metrics: the mask PR curve (as the box one, mask IoU; official
  ``PR_curve_masks``-like) and the per-class table's ``mask_precision, mask_recall, mask_map50, mask_map50_95``
  columns.

matplotlib is imported here only (object-oriented API on the Agg canvas: no pyplot, no global backend switch), so
``reparam`` starts and the operator runs without it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .result import EvalCurves, EvalResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: pixel sizes ``(width, height)`` of the two PNGs (figure inches x DPI)
PR_CURVE_PX = (900, 600)
CONFUSION_PX = (800, 700)
_DPI = 100
#: file name suffixes, after ``<stem>``
SUFFIXES = {"pr_curve": "-eval-pr-curve.png", "confusion_matrix": "-eval-confusion-matrix.png",
            "per_class": "-eval-per-class.csv", "confusion_counts": "-eval-confusion-matrix.csv",
            "mask_pr_curve": "-eval-mask-pr-curve.png"}
#: written only for a result with mask metrics
MASK_KINDS = ("mask_pr_curve",)


def file_names(stem: str) -> dict[str, str]:
    """``{kind: file name}`` of the files :func:`write_evaluation_files` writes for ``<stem>``."""
    return {kind: f"{stem}{suffix}" for kind, suffix in SUFFIXES.items()}


def _curves(result: EvalResult) -> EvalCurves:
    if result.curves is None:
        raise ValueError(f"the {result.form} evaluation has no curves (made by evaluate_model)")
    return result.curves


def _figure(size_px: tuple[int, int]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size_px[0] / _DPI, size_px[1] / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def plot_pr_curve(result: EvalResult, path: Path, title: str, masks: bool = False) -> None:
    """Write the PR curve PNG (:data:`PR_CURVE_PX` pixels): of the boxes, or (``masks``) of the masks. Raises
    ValueError without ``result.curves`` (or, ``masks``, without mask curves)."""
    curves = _curves(result)
    precision, per_class, map50 = curves.precision, result.per_class, result.map50
    if masks:
        if result.masks is None or result.masks.pr_precision is None:
            raise ValueError(f"the {result.form} evaluation has no mask curves")
        precision, per_class, map50 = result.masks.pr_precision, result.masks.per_class, result.masks.map50
    fig = _figure(PR_CURVE_PX)
    ax = fig.add_axes((0.08, 0.1, 0.62, 0.8))
    names = [c.name for c in per_class]
    shown = [k for k in range(precision.shape[1]) if not np.isnan(precision[:, k]).all()]
    for k in shown:
        ap50 = per_class[k].map50
        label = f"{names[k]} {ap50:.3f}" if ap50 is not None else names[k]
        ax.plot(curves.recall, precision[:, k], linewidth=1, label=label if len(shown) <= 20 else None)
    if shown:
        ax.plot(curves.recall, np.nanmean(precision[:, shown], axis=1), linewidth=3, color="blue",
                label=f"all classes {map50:.3f} {'mask ' if masks else ''}mAP@0.5")
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title, fontsize=9)
    if shown:
        ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8)
    fig.savefig(str(path), dpi=_DPI, format="png")


def plot_confusion(result: EvalResult, path: Path, title: str) -> None:
    """Write the confusion matrix PNG (:data:`CONFUSION_PX` pixels). Raises ValueError without ``result.curves``."""
    curves = _curves(result)
    cm = curves.confusion
    n = cm.shape[0]
    frac = cm / np.maximum(cm.sum(0, keepdims=True), 1)
    fig = _figure(CONFUSION_PX)
    ax = fig.add_axes((0.16, 0.14, 0.72, 0.76))
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    labels = [c.name for c in result.per_class] + ["background"]
    if n <= 30:
        ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        for r in range(n):
            for c in range(n):
                if cm[r, c]:
                    ax.text(c, r, str(int(cm[r, c])), ha="center", va="center", fontsize=8,
                            color="white" if frac[r, c] > 0.5 else "black")
    ax.set_xlabel("True")
    ax.set_ylabel("Predicted")
    ax.set_title(f"{title}\nscore > {curves.confusion_conf:g}, IoU > {curves.confusion_iou:g}", fontsize=9)
    fig.savefig(str(path), dpi=_DPI, format="png")


def write_per_class(result: EvalResult, path: Path) -> None:
    """The per-class table as CSV: ``class, instances, precision, recall, map50, map50_95`` (empty = no labels),
    plus ``mask_precision, mask_recall, mask_map50, mask_map50_95`` for a result with mask metrics."""
    def fmt(v: float | None) -> str:
        return "" if v is None else repr(float(v))

    mk = result.masks
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        head = ["class", "instances", "precision", "recall", "map50", "map50_95"]
        w.writerow(head + ([f"mask_{h}" for h in head[2:]] if mk else []))
        all_row = ["all", sum(c.instances for c in result.per_class), fmt(result.precision), fmt(result.recall),
                   fmt(result.map50), fmt(result.map50_95)]
        w.writerow(all_row + ([fmt(mk.precision), fmt(mk.recall), fmt(mk.map50), fmt(mk.map50_95)] if mk else []))
        for k, c in enumerate(result.per_class):
            row = [c.name, c.instances, fmt(c.precision), fmt(c.recall), fmt(c.map50), fmt(c.map50_95)]
            if mk:
                m = mk.per_class[k]
                row += [fmt(m.precision), fmt(m.recall), fmt(m.map50), fmt(m.map50_95)]
            w.writerow(row)


def write_confusion_counts(result: EvalResult, path: Path) -> None:
    """The confusion counts as CSV: header ``predicted\\true`` + class names + ``background``, one row each."""
    curves = _curves(result)
    labels = [c.name for c in result.per_class] + ["background"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["predicted\\true", *labels])
        for name, row in zip(labels, curves.confusion):
            w.writerow([name, *(int(v) for v in row)])


def write_evaluation_files(result: EvalResult, folder: Path, stem: str) -> list[dict[str, str]]:
    """Write the four files of ``result`` into ``folder`` (names from :func:`file_names`), and the mask PR curve
    when it has mask metrics.

    Returns:
        ``[{"kind", "name"}]`` of the files written, in :data:`SUFFIXES` order (the caller adds paths and hashes).
    """
    names = file_names(stem)
    d = result.dataset
    title = f"{result.form} on {d.get('source', '?')} ({d.get('images', '?')} images, digest " \
            f"{str(d.get('digest', ''))[:12]})"
    plot_pr_curve(result, folder / names["pr_curve"], f"Precision-recall (IoU 0.5): {title}")
    plot_confusion(result, folder / names["confusion_matrix"], f"Confusion matrix: {title}")
    write_per_class(result, folder / names["per_class"])
    write_confusion_counts(result, folder / names["confusion_counts"])
    with_masks = result.masks is not None and result.masks.pr_precision is not None
    if with_masks:
        plot_pr_curve(result, folder / names["mask_pr_curve"], f"Mask precision-recall (IoU 0.5): {title}", True)
    return [{"kind": kind, "name": name} for kind, name in names.items() if with_masks or kind not in MASK_KINDS]


__all__ = ["PR_CURVE_PX", "CONFUSION_PX", "SUFFIXES", "MASK_KINDS", "file_names", "plot_pr_curve", "plot_confusion",
           "write_per_class", "write_confusion_counts", "write_evaluation_files"]
