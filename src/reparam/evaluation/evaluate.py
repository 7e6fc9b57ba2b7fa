"""Run a model over a dataset the way the official ``val.py`` does, and score it with pycocotools.

Per batch (:mod:`.letterbox`): read, resize, letterbox (rectangular batches; a model with a fixed input shape gets
every image letterboxed to that shape, as the official ``val.py`` does for non-PyTorch backends), run the model
(:mod:`.backends`), then the official validation NMS: every (anchor, class) pair whose score is above ``conf`` is a
candidate (multi-label), class-wise greedy NMS at ``iou``, the best ``max_det`` per image
(:func:`reparam.converter.export.nms.nms_indices` + :func:`~reparam.converter.export.nms.gather_detections`); boxes
go back to the native image (``scale_boxes``) and :func:`.coco.coco_metrics` scores them.

Segmentation models (``model.nm > 0``, official ``segment/val.py``): the NMS runs on the boxes and class scores only
(the mask coefficients ride along with their anchor); the box metrics are scored as for detection. When the dataset
has polygon labels (:meth:`~.dataset.Dataset.masks_problem` is None) each kept detection's mask is made from the
prototypes (:mod:`.masks`) and :func:`.coco.coco_mask_metrics` scores them too (:attr:`EvalResult.masks`); a
boxes-only dataset gives the box metrics and the reason in :attr:`EvalResult.masks_absent`.

Public entry points: :func:`detect_dataset` (a model's detections, unscored), :func:`evaluate_model` (a loaded
model), :func:`evaluate_file` (a model file: what the registry calls to evaluate a champion version),
:func:`open_dataset` (fetch + check a dataset once, for several models) and :func:`comparison` (the report's
``evaluation`` section).
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

from .. import spec
from ..converter.export.nms import gather_detections, nms_indices, nms_inputs
from .backends import LoadedModel, load_model
from .coco import coco_mask_metrics, coco_metrics, label_boxes_xyxy
from .confusion import CONFUSION_CONF, CONFUSION_IOU, confusion_matrix
from .dataset import Dataset, check_names, fetch_dataset, load_dataset
from .letterbox import letterbox, load_image, rect_batches, scale_boxes, square_batches, to_tensor
from .masks import image_rles
from .result import ClassMetrics, EvalCurves, EvalResult, MaskMetrics
from .settings import EvalSettings

#: default largest allowed |mAP@0.5:0.95 of an artifact - that of the dual model| (``--eval-atol``; lives in spec)
DEFAULT_EVAL_ATOL = spec.DEFAULT_EVAL_ATOL


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
    """Official val NMS on ``y [B, 4 + nc, A]``.

    Returns ``(num [B, 1], boxes [B, D, 4] xyxy, scores [B, D], labels [B, D])``.
    """
    boxes, scores = nms_inputs(y)
    selected = nms_indices(boxes, scores, settings.max_det, settings.iou, settings.conf)
    return gather_detections(selected, boxes, scores, settings.max_det)


def _segment_detections(y: torch.Tensor, nc: int, settings: EvalSettings
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Official val NMS on a segmentation prediction ``y [B, 4 + nc + nm, A]``: per image ``(rows [M, 6]`` xyxy,
    score, class in input pixels, ``coefficients [M, nm])``, the best ``max_det`` by score (the NMS of
    :func:`_detections` on the boxes and class scores, each kept box with its anchor's mask coefficients)."""
    boxes, scores = nms_inputs(y[:, :4 + nc])
    selected = nms_indices(boxes, scores, settings.max_det, settings.iou, settings.conf)
    out = []
    for b in range(y.shape[0]):
        sel = selected[selected[:, 0] == b]
        c, a = sel[:, 1], sel[:, 2]
        kept = scores[b, c, a]
        order = torch.sort(kept, descending=True, stable=True).indices[:settings.max_det]
        c, a, kept = c[order], a[order], kept[order]
        rows = torch.cat([boxes[b, a], kept[:, None], c[:, None].float()], 1)
        out.append((rows, y[b, 4 + nc:, a].T.float()))
    return out


@dataclasses.dataclass
class DatasetDetections:
    """The detections of one model over a dataset (before scoring).

    Attributes:
        per_image: per dataset item, ``[M, 6]`` float rows ``x1, y1, x2, y2, score, class`` in native pixels (the
            official val NMS, :func:`_detections`), or None for an image that could not be read any more.
        late_skips: ``{"file", "reason"}`` of those unreadable images.
        batch, imgsz: the batch size and long side actually used; input_shapes: the ``(h, w)`` inputs run.
        seconds: wall time of the pass; forward_s, nms_s: of which the forward passes and the NMS.
        rles: segmentation with masks only: per dataset item the COCO RLEs of its detections' masks in native
            pixels, in the order of ``per_image`` (None for an unreadable image); None otherwise.
        masks_s: of ``seconds``, the time spent making and encoding masks.
    """

    per_image: list[np.ndarray | None]
    late_skips: list[dict[str, str]]
    batch: int
    imgsz: int
    input_shapes: set[tuple[int, ...]]
    seconds: float
    forward_s: float
    nms_s: float
    rles: list[list[dict[str, Any]] | None] | None = None
    masks_s: float = 0.0

    @property
    def used(self) -> list[int]:
        """Indices of the items that were evaluated."""
        return [j for j, d in enumerate(self.per_image) if d is not None]


def detect_dataset(model: LoadedModel, dataset: Dataset, settings: EvalSettings, *, progress: bool | None = None,
                   label: str | None = None, masks: bool | None = None) -> DatasetDetections:
    """Run ``model`` over every item of ``dataset`` with the official val pre-processing and NMS (module docstring).

    ``masks``: make the masks of a segmentation model's detections (``rles``); None: when the model has mask
    outputs and the dataset has polygon labels.

    Raises: whatever the model's ``predict`` raises.
    """
    if masks is None:
        masks = bool(model.nm) and dataset.masks_problem() is None
    nc = len(model.names)
    items = dataset.items
    batch = model.fixed_batch or settings.batch
    if model.fixed_shape:
        imgsz = max(model.fixed_shape)
        batches = square_batches(len(items), batch, model.fixed_shape)
    else:
        imgsz = settings.imgsz
        batches = rect_batches([(i.width, i.height) for i in items], batch, imgsz, model.stride)
    dets: list[np.ndarray | None] = [None] * len(items)
    rles: list[list[dict[str, Any]] | None] | None = [None] * len(items) if masks else None
    shapes_run: set[tuple[int, ...]] = set()
    late_skips: list[dict[str, str]] = []
    bar = _bar(label or f"evaluating {model.form}", len(items), progress)
    t0 = time.perf_counter()
    t_fwd = t_nms = t_masks = 0.0
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
        pred = model.predict(x)
        t_fwd += time.perf_counter() - t
        t = time.perf_counter()
        if model.nm:
            y, protos = pred if isinstance(pred, tuple) else (pred, None)
            per = _segment_detections(y, nc, settings)
            t_nms += time.perf_counter() - t
            for r, (j, gain, pad, hw0) in enumerate(metas):
                rows, coef = per[r]
                b = scale_boxes(rows[:, :4], gain, pad, hw0)
                dets[j] = torch.cat([b, rows[:, 4:]], 1).numpy()
                if rles is not None and protos is not None:
                    t = time.perf_counter()
                    rles[j] = image_rles(protos[r], coef, rows[:, :4], tuple(x.shape[2:]), pad, hw0)
                    t_masks += time.perf_counter() - t
        else:
            assert isinstance(pred, torch.Tensor)
            num, boxes, scores, labels = _detections(pred, settings)
            t_nms += time.perf_counter() - t
            for r, (j, gain, pad, hw0) in enumerate(metas):
                n = int(num[r, 0])
                b = scale_boxes(boxes[r, :n], gain, pad, hw0)
                dets[j] = torch.cat([b, scores[r, :n, None], labels[r, :n, None].float()], 1).numpy()
        bar.update(len(idx))
    seconds = time.perf_counter() - t0
    bar.close()
    return DatasetDetections(dets, late_skips, batch, imgsz, shapes_run, seconds, t_fwd, t_nms, rles, t_masks)


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
        :class:`EvalResult` (with :class:`~.result.EvalCurves`: the PR curve and the confusion matrix).

    Raises:
        InvalidInputError: the class names differ from the dataset's (one line listing the differences).
    """
    settings = settings or EvalSettings()
    settings.check()
    check_names(model.names, dataset.names)
    items = dataset.items
    run = detect_dataset(model, dataset, settings, progress=progress, label=label)
    dets, used = run.per_image, run.used
    nc = len(dataset.names)
    m = coco_metrics([(items[j].width, items[j].height) for j in used],
                     [(items[j].classes, items[j].boxes) for j in used], [dets[j] for j in used],
                     nc, settings.max_det)
    confusion = confusion_matrix(
        [(items[j].classes, label_boxes_xyxy(items[j].boxes, items[j].width, items[j].height)) for j in used],
        [dets[j] for j in used], nc)
    summary = dataset.summary()
    if run.late_skips:
        summary["skipped"] = summary["skipped"] + run.late_skips
        summary["images"] = len(used)
        summary["instances"] = int(sum(len(items[j].classes) for j in used))
    per_class = [ClassMetrics(dataset.names[k], **c) for k, c in enumerate(m["per_class"])]
    ran = {**settings.to_dict(), "batch": run.batch, "imgsz": run.imgsz,
           "rect": model.fixed_shape is None, "input_shapes": sorted([list(s) for s in run.input_shapes]),
           "runtime": model.runtime}
    seconds = run.seconds
    curves = EvalCurves(m["pr_recall"], m["pr_precision"], confusion, CONFUSION_CONF, CONFUSION_IOU)
    timing = {"forward_s": run.forward_s, "nms_s": run.nms_s}
    mask_metrics, masks_absent = None, None
    if model.nm and run.rles is not None:
        rles = run.rles
        mm = coco_mask_metrics([(items[j].width, items[j].height) for j in used],
                               [(items[j].classes, items[j].polygons_px()) for j in used], [dets[j] for j in used],
                               [rles[j] or [] for j in used], nc, settings.max_det)
        mask_metrics = MaskMetrics(mm["map50_95"], mm["map50"], mm["precision"], mm["recall"],
                                   [ClassMetrics(dataset.names[k], **c) for k, c in enumerate(mm["per_class"])],
                                   mm["pr_precision"])
        timing["masks_s"] = run.masks_s
    elif model.nm:
        masks_absent = dataset.masks_problem() or "masks were not computed"
    return EvalResult(model.form, path, m["map50_95"], m["map50"], m["precision"], m["recall"], per_class, summary,
                      ran, model.precision, model.weights_dtype, seconds, len(used) / seconds if seconds else 0.0,
                      int(sum(len(dets[j]) for j in used)), timing, curves, model.task, mask_metrics, masks_absent)


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
        atol: largest allowed ``|delta_map50_95|`` (box, and mask for a segmentation model with mask metrics).

    Returns:
        ``{dataset: {digest, source, images, instances, skipped, ...}, dual: {map50_95, map50, precision, recall,
        per_class, task, masks | masks_absent}, artifacts: [{format, path, map50_95, map50, delta_map50_95,
        delta_map50, passed, ...; with masks also mask_map50_95, mask_map50, delta_mask_map50_95,
        delta_mask_map50}], atol, passed}``.
    """
    arts = []
    for res, ref in artifacts:
        delta = res.map50_95 - ref.map50_95
        passed = abs(delta) <= atol
        entry = {"format": res.form, "path": res.path, "map50_95": res.map50_95, "map50": res.map50,
                 "delta_map50_95": delta, "delta_map50": res.map50 - ref.map50,
                 "passed": passed, "precision_run": res.precision_run,
                 "weights_dtype": res.weights_dtype, "input_shapes": res.settings["input_shapes"],
                 "images_per_s": res.images_per_s}
        if res.masks is not None and ref.masks is not None:
            mdelta = res.masks.map50_95 - ref.masks.map50_95
            entry.update({"mask_map50_95": res.masks.map50_95, "mask_map50": res.masks.map50,
                          "delta_mask_map50_95": mdelta, "delta_mask_map50": res.masks.map50 - ref.masks.map50,
                          "passed": passed and abs(mdelta) <= atol})
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
    if result.masks is not None:
        mk = result.masks
        lines.append(f"  {'all (mask)':<12} {d['instances']:>9} {fmt(mk.precision)} {fmt(mk.recall)} "
                     f"{fmt(mk.map50)} {fmt(mk.map50_95):>9}")
        for c in mk.per_class:
            lines.append(f"  {('mask ' + c.name)[:12]:<12} {c.instances:>9} {fmt(c.precision)} {fmt(c.recall)} "
                         f"{fmt(c.map50)} {fmt(c.map50_95):>9}")
    elif result.masks_absent:
        lines.append(f"  masks        not scored: {result.masks_absent} (box metrics only)")
    lines.append(f"  speed        {result.images_per_s:.1f} images/s ({result.form}, {result.precision_run}, "
                 f"inputs {', '.join('x'.join(map(str, s)) for s in result.settings['input_shapes'])}; "
                 f"{result.settings.get('runtime', 'torch on cpu')})")
    return "\n".join(lines)


__all__ = ["DEFAULT_EVAL_ATOL", "DatasetDetections", "detect_dataset", "evaluate_model", "evaluate_file",
           "open_dataset", "with_shape_of", "comparison",
           "describe"]
