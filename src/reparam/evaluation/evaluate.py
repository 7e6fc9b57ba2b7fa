"""Run a model over a dataset the way the official ``val.py`` does, and score it with pycocotools.

Per batch (:mod:`.letterbox`): read, resize, letterbox (rectangular batches; a model with a fixed input shape gets
every image letterboxed to that shape, as the official ``val.py`` does for non-PyTorch backends), run the model
(:mod:`.backends`), then the official validation NMS: every (anchor, class) pair whose score is above ``conf`` is a
candidate (multi-label), class-wise greedy NMS at ``iou``, the best ``max_det`` per image
(:func:`reparam.converter.export.nms.nms_indices` + :func:`~reparam.converter.export.nms.gather_detections`); boxes go back to the
native image (``scale_boxes``) and :func:`.coco.coco_metrics` scores them.

Public entry points: :func:`evaluate_model` (a loaded model), :func:`evaluate_file` (a model file: what the
registry calls to evaluate a champion version), :func:`open_dataset` (fetch + check a dataset once, for several
models) and :func:`comparison` (the report's ``evaluation`` section).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..converter.export.nms import gather_detections, nms_indices, nms_inputs
from .backends import LoadedModel, load_model
from .coco import coco_metrics
from .dataset import Dataset, check_names, fetch_dataset, load_dataset
from .letterbox import letterbox, load_image, rect_batches, scale_boxes, square_batches, to_tensor
from .result import ClassMetrics, EvalResult
from .settings import EvalSettings

#: default largest allowed |mAP@0.5:0.95 of an artifact - that of the dual model| (``--eval-atol``)
DEFAULT_EVAL_ATOL = 1e-3


def _bar(label: str, total: int, enabled: bool | None = None):
    """A tqdm progress bar of ``total`` images on stderr; off when ``enabled`` is False, or (``None``) when stderr
    is not a terminal (logs and ``--json`` pipelines get no control characters)."""
    from tqdm import tqdm

    if enabled is None:
        try:
            enabled = sys.stderr.isatty()
        except (AttributeError, ValueError):
            enabled = False
    return tqdm(total=total, desc=label, unit="img", file=sys.stderr, disable=not enabled, leave=True)


def _detections(y: torch.Tensor, settings: EvalSettings) -> tuple[torch.Tensor, ...]:
    """Official val NMS on ``y [B, 4 + nc, A]``: ``(num [B, 1], boxes [B, D, 4] xyxy, scores [B, D], labels [B, D])``."""
    boxes, scores = nms_inputs(y)
    selected = nms_indices(boxes, scores, settings.max_det, settings.iou, settings.conf)
    return gather_detections(selected, boxes, scores, settings.max_det)


def evaluate_model(model: LoadedModel, dataset: Dataset, settings: EvalSettings | None = None, *,
                   path: str | None = None, progress: bool | None = None,
                   label: str | None = None) -> EvalResult:
    """Evaluate a loaded model on a checked dataset.

    Args:
        model: from :func:`~.backends.load_model` or :func:`~.backends.from_module`.
        dataset: from :func:`open_dataset` / :func:`~.dataset.load_dataset`.
        settings: thresholds and sizes (default :class:`EvalSettings`).
        path: the model file, for the result; progress: progress bar on stderr (None: when it is a terminal).

    Returns:
        :class:`EvalResult`.

    Raises:
        InvalidInputError: the class names differ from the dataset's (one line listing the differences).
    """
    settings = settings or EvalSettings()
    settings.check()
    check_names(model.names, dataset.names)
    items = dataset.items
    batch = model.fixed_batch or settings.batch
    if model.fixed_shape:
        imgsz = max(model.fixed_shape)
        batches = square_batches(len(items), batch, model.fixed_shape)
    else:
        imgsz = settings.imgsz
        batches = rect_batches([(i.width, i.height) for i in items], batch, imgsz, model.stride)
    dets: list[np.ndarray | None] = [None] * len(items)
    shapes_run: set[tuple[int, int]] = set()
    late_skips: list[dict[str, str]] = []
    bar = _bar(label or f"evaluating {model.form}", len(items), progress)
    t0 = time.perf_counter()
    t_fwd = t_nms = 0.0
    for idx, shape in batches:
        ims, metas = [], []
        for j in idx:
            im, hw0 = load_image(str(items[j].path), imgsz)
            if im is None:  # changed on disk since the dataset was checked
                late_skips.append({"file": items[j].rel, "reason": "image cannot be decoded (corrupt or not an image)"})
                continue
            canvas, pad = letterbox(im, shape)
            ims.append(canvas)
            metas.append((j, im.shape[0] / hw0[0], pad, hw0))
        if not ims:
            continue
        x = to_tensor(ims)
        if model.fixed_batch and x.shape[0] < model.fixed_batch:
            x = torch.cat([x, x.new_zeros((model.fixed_batch - x.shape[0], *x.shape[1:]))])
        shapes_run.add(tuple(x.shape[2:]))
        t = time.perf_counter()
        y = model.predict(x)
        t_fwd += time.perf_counter() - t
        t = time.perf_counter()
        num, boxes, scores, labels = _detections(y, settings)
        t_nms += time.perf_counter() - t
        for r, (j, gain, pad, hw0) in enumerate(metas):
            n = int(num[r, 0])
            b = scale_boxes(boxes[r, :n], gain, pad, hw0)
            dets[j] = torch.cat([b, scores[r, :n, None], labels[r, :n, None].float()], 1).numpy()
        bar.update(len(idx))
    seconds = time.perf_counter() - t0
    bar.close()
    used = [j for j, d in enumerate(dets) if d is not None]
    m = coco_metrics([(items[j].width, items[j].height) for j in used],
                     [(items[j].classes, items[j].boxes) for j in used], [dets[j] for j in used],
                     len(dataset.names), settings.max_det)
    summary = dataset.summary()
    if late_skips:
        summary["skipped"] = summary["skipped"] + late_skips
        summary["images"] = len(used)
        summary["instances"] = int(sum(len(items[j].classes) for j in used))
    per_class = [ClassMetrics(dataset.names[k], **c) for k, c in enumerate(m["per_class"])]
    run = {**settings.to_dict(), "batch": batch, "imgsz": imgsz,
           "rect": model.fixed_shape is None, "input_shapes": sorted([list(s) for s in shapes_run])}
    return EvalResult(model.form, path, m["map50_95"], m["map50"], m["precision"], m["recall"], per_class, summary,
                      run, model.precision, model.weights_dtype, seconds, len(used) / seconds if seconds else 0.0,
                      int(sum(len(dets[j]) for j in used)), {"forward_s": t_fwd, "nms_s": t_nms})


def open_dataset(source: str | Path, workdir: Path, *, split: str = "val",
                 tracking_uri: str | None = None) -> Dataset:
    """Fetch (:func:`~.dataset.fetch_dataset`) and check (:func:`~.dataset.load_dataset`) a dataset.

    ``workdir`` must outlive the returned :class:`Dataset` (its images are read from there).

    Raises:
        InvalidInputError: malformed source, no data.yaml, no ``split``, an empty split (exit 2).
        SourceError: the store is unreachable or the object/prefix/run is missing (exit 4).
    """
    data_yaml, shown = fetch_dataset(str(source), Path(workdir), tracking_uri=tracking_uri)
    return load_dataset(data_yaml, shown, split)


def evaluate_file(path: str | Path, dataset: Dataset | str | Path, settings: EvalSettings | None = None, *,
                  tracking_uri: str | None = None, progress: bool | None = None) -> EvalResult:
    """Evaluate a model file (any form of :func:`~.backends.load_model`) on a dataset (a :class:`Dataset` or any
    source :func:`open_dataset` accepts).

    Raises: as :func:`open_dataset`, :func:`~.backends.load_model` and :func:`evaluate_model`.
    """
    settings = settings or EvalSettings()
    settings.check()
    if isinstance(dataset, Dataset):
        return evaluate_model(load_model(path), dataset, settings, path=str(path), progress=progress)
    with tempfile.TemporaryDirectory(prefix="reparam-eval-") as work:
        ds = open_dataset(dataset, Path(work), split=settings.split, tracking_uri=tracking_uri)
        model = load_model(path)  # after the dataset: a bad dataset is reported before a slow load
        return evaluate_model(model, ds, settings, path=str(path), progress=progress)


def with_shape_of(model: LoadedModel, other: LoadedModel) -> LoadedModel:
    """``model`` run under ``other``'s fixed input shape (to compare a static-shape artifact like for like)."""
    return dataclasses.replace(model, fixed_shape=other.fixed_shape)


def comparison(dataset: Dataset, dual: EvalResult, artifacts: list[tuple[EvalResult, EvalResult]],
               atol: float = DEFAULT_EVAL_ATOL) -> dict[str, Any]:
    """The report's ``evaluation`` section.

    Args:
        dataset: the dataset; dual: the dual model's result.
        artifacts: ``(artifact result, the dual model's result under the same input shapes)`` pairs (the second is
            ``dual`` itself unless the artifact has a fixed input shape).
        atol: largest allowed ``|delta_map50_95|``.

    Returns:
        ``{dataset: {digest, source, images, instances, skipped, ...}, dual: {map50_95, map50, precision, recall,
        per_class}, artifacts: [{format, path, map50_95, map50, delta_map50_95, delta_map50, passed, ...}],
        atol, passed}``.
    """
    arts = []
    for res, ref in artifacts:
        delta = res.map50_95 - ref.map50_95
        entry = {"format": res.form, "path": res.path, "map50_95": res.map50_95, "map50": res.map50,
                 "delta_map50_95": delta, "delta_map50": res.map50 - ref.map50,
                 "passed": abs(delta) <= atol, "precision_run": res.precision_run,
                 "weights_dtype": res.weights_dtype, "input_shapes": res.settings["input_shapes"],
                 "images_per_s": res.images_per_s}
        if ref is not dual:
            entry["dual_map50_95_same_shapes"] = ref.map50_95
        arts.append(entry)
    return {"dataset": dual.dataset, "settings": dual.settings,
            "dual": {**dual.metrics(), "images_per_s": dual.images_per_s}, "artifacts": arts, "atol": atol,
            "passed": all(a["passed"] for a in arts)}


def describe(result: EvalResult) -> str:
    """A human summary: the all-classes line and one line per class (official ``val.py`` column order)."""
    d = result.dataset
    lines = [f"  dataset      {d['source']} ({d['images']} images, {d['instances']} instances, "
             f"{len(d['skipped'])} skipped; digest {d['digest'][:12]})"]
    for s in d["skipped"][:10]:
        lines.append(f"  skipped      {s['file']}: {s['reason']}")
    if len(d["skipped"]) > 10:
        lines.append(f"  skipped      ... {len(d['skipped']) - 10} more (see --json)")
    lines.append(f"  {'class':<12} {'instances':>9} {'P':>7} {'R':>7} {'mAP50':>7} {'mAP50-95':>9}")
    fmt = lambda v: f"{v:7.3f}" if v is not None else "      -"  # noqa: E731
    lines.append(f"  {'all':<12} {d['instances']:>9} {fmt(result.precision)} {fmt(result.recall)} "
                 f"{fmt(result.map50)} {fmt(result.map50_95):>9}")
    for c in result.per_class:
        lines.append(f"  {c.name[:12]:<12} {c.instances:>9} {fmt(c.precision)} {fmt(c.recall)} {fmt(c.map50)} "
                     f"{fmt(c.map50_95):>9}")
    lines.append(f"  speed        {result.images_per_s:.1f} images/s ({result.form}, {result.precision_run}, "
                 f"inputs {', '.join('x'.join(map(str, s)) for s in result.settings['input_shapes'])})")
    return "\n".join(lines)


__all__ = ["DEFAULT_EVAL_ATOL", "evaluate_model", "evaluate_file", "open_dataset", "with_shape_of", "comparison",
           "describe"]
