"""Write the deploy artifacts atomically and load them back without pickle.

Artifacts of ``<stem>.pt``:

* ``<stem>-converted.pt`` — the official deploy checkpoint format (:mod:`.official_format`), fp16 unless ``--fp32``;
  never fused, so the official ``detect.py``/``val.py``/``export.py`` can load and fuse it themselves;
* ``<stem>-converted.safetensors`` — the same weights; metadata holds the deploy config (JSON), ``nc``, ``names``,
  ``stride`` and the reparam version, so :func:`load_safetensors` rebuilds the model without any pickle;
* ``report.json`` — the conversion report;
* with ``--eval-data``, ``<stem>-eval-*.png``/``.csv`` — the evaluation's PR curve, confusion matrix and tables
  (:mod:`reparam.evaluation.plots`, listed in the report's ``evaluation.files``).

Everything is written into a staging folder inside ``out_dir`` and moved into place (``os.replace``, atomic on one
file system) only when every file was written; a failure removes the staging folder and leaves ``out_dir`` as it was.
Nothing this run did not write is ever deleted: deploy files of the same checkpoint from earlier runs are kept and
listed as ``stale_outputs`` (policy: :mod:`.outdir`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .. import report as report_mod
from ..errors import InvalidInputError, brief
from ..hashing import hash_file
from .outdir import artifact_names, stale_outputs

if TYPE_CHECKING:
    from ..models import DetectionModel
    from .checkpoint import Checkpoint
    from .convert import ConvertOptions
    from .pruning import DeployPlan

SAFETENSORS_FORMAT = "reparam-deploy/1"


def _sha256(path: Path) -> str:
    return hash_file(path)[0]


def _write_json(path: Path, report: report_mod.Report) -> None:
    """Write a report as ``report.json`` text (:func:`reparam.report.dumps`: status, command, versions, artifacts
    first; the deploy config on one line)."""
    path.write_text(report_mod.dumps(report) + "\n")


def _staging(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".reparam-staging-", dir=out))


def _publish(stage: Path, out: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for f in sorted(stage.iterdir(), key=lambda p: p.name == "report.json"):  # report last
        f.chmod(0o666 & ~umask)  # some writers create 0600 files
        os.replace(f, out / f.name)
    stage.rmdir()


__all__ = ["artifact_names", "finish_report", "load_safetensors", "save_safetensors", "write_all",
           "write_report_only"]


def write_report_only(out: Path, report: report_mod.Report, stem: str | None = None) -> Path:
    """Write just ``report.json`` (a failed conversion), atomically. Returns its path.

    With ``stem``, deploy files of an earlier run of the same checkpoint in ``out`` are listed in the report's
    ``stale_outputs`` (they are kept: this run did not write them, and they are not its result).
    """
    if stem:
        report.stale_outputs = stale_outputs(out, stem)
    stage = _staging(out)
    try:
        _write_json(stage / "report.json", report)
        _publish(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out / "report.json"


def _sorted_header(raw: bytes) -> bytes:
    """The safetensors JSON header ``raw`` with its ``__metadata__`` first and its keys in sorted order, compact,
    padded with spaces to a multiple of 8 bytes (the format's alignment; safetensors README, "Format").

    The tensor entries keep the library's order (their ``data_offsets`` count from the end of the header, so they
    stay valid whatever the header's length)."""
    header = json.loads(raw)
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return text + b" " * (-len(text) % 8)


def _sort_metadata(path: Path) -> None:
    """Rewrite the header of the safetensors file ``path`` with its ``__metadata__`` keys in sorted order: the same
    bytes every run.

    safetensors (0.8 included) keeps the metadata in a Rust ``HashMap`` and writes it in that map's random
    iteration order, so two saves of the same tensors and metadata differ in their header bytes and sha256
    (safetensors issue #584). The format (safetensors README, "Format"): an 8-byte little-endian header size N, an
    N-byte JSON header (``__metadata__`` and each tensor's dtype, shape and ``data_offsets``), padded with spaces to
    a multiple of 8, then the tensor bytes. Only the header is rewritten, in place when the sorted header has the
    library's length (the usual case: the same JSON in another order); else the file is rewritten through a
    temporary file, the tensor bytes streamed (never all in memory).
    """
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        text = _sorted_header(f.read(size))
        if len(text) == size:
            f.seek(8)
            f.write(text)
            return
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as g:
            g.write(len(text).to_bytes(8, "little") + text)
            f.seek(8 + size)
            shutil.copyfileobj(f, g, 1 << 20)
    os.replace(tmp, path)


def save_safetensors(model: "DetectionModel", path: Path, *, nc: int, names: dict[int, str], stride: list[float],
                     extra: dict[str, str] | None = None) -> None:
    """Save ``model.state_dict()`` with the config and class metadata (strings, as safetensors requires).

    The library writes the tensors straight from their memory to the file (no copy of the file's bytes in memory);
    then the header is rewritten so that the file is reproducible: the same model and metadata give the same bytes
    (and sha256) every run (:func:`_sort_metadata`)."""
    from safetensors.torch import save_file

    from .. import __version__

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": SAFETENSORS_FORMAT,
        "config": json.dumps(model.yaml),
        "nc": str(nc),
        "names": json.dumps({str(k): v for k, v in names.items()}),
        "stride": json.dumps(stride),
        "reparam_version": __version__,
        **(extra or {}),
    }
    save_file(state, str(path), metadata=meta)
    _sort_metadata(Path(path))


def load_safetensors(path: str | Path, *, dtype: torch.dtype | None = torch.float32) -> "DetectionModel":
    """Rebuild a deploy model from a reparam ``.safetensors`` file, without pickle.

    Returns our :class:`DetectionModel` in eval mode, in ``dtype`` (``None`` keeps the saved dtype).
    Raises InvalidInputError when the file is not a reparam deploy safetensors file.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..models import DetectionModel

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise InvalidInputError(f"'{path}' is not a safetensors file ({exc})") from None
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise InvalidInputError(f"'{path}' is not a reparam deploy model (metadata format {brief(meta.get('format'))})")
    cfg = json.loads(meta["config"])
    nc = int(meta["nc"])
    model = DetectionModel(cfg, ch=int(cfg.get("ch", 3) or 3), nc=nc)
    model.names = {int(k): v for k, v in json.loads(meta["names"]).items()}
    state = load_file(str(path))
    model.load_state_dict(state, strict=True)
    stride = torch.tensor(json.loads(meta["stride"]), dtype=torch.float32)
    model.stride = stride
    model.model[-1].stride = stride.clone()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def write_all(
    out: Path,
    source: Path,
    ckpt: "Checkpoint",
    plan: "DeployPlan",
    dual: torch.nn.Module,
    export_model: torch.nn.Module,
    deploy: "DetectionModel",
    options: "ConvertOptions",
    report: report_mod.Report,
    say: Callable[[str], None],
    evaluate: Callable[[Path, list[report_mod.Artifact]], None] | None = None,
) -> None:
    """Write every requested artifact plus ``report.json`` atomically into ``out``; fills ``report.artifacts``.

    ``evaluate(stage, artifacts)``, when given, runs on the written files before anything is published; what it
    raises (:class:`~reparam.errors.ValidationFailedError` for a failed evaluation) publishes nothing.

    The ``.pt``/``.safetensors`` weights are ``deploy``'s: the checkpoint's own tensors (fp16 unless
    ``options.fp32``, then their exact fp32 upcast, on a copy) in the unfused deploy graph; ``export_model`` (the
    fused model with ``--fuse``) is what ONNX/TorchScript export. Without ``--fp32``, ``deploy`` itself is turned to
    fp16 in place (no copy of an fp16 checkpoint's tensors: the files are written from them). The export's wall
    and CPU time go to ``report.timing['export_s'/'export_cpu_s']``. Raises whatever an export step raises, after
    removing the staging folder.
    """
    from .official_format import save_official

    stem = source.stem
    stage = _staging(out)
    arts: list[report_mod.Artifact] = []
    try:
        # fp16 like the official deploy checkpoints: deploy holds the checkpoint's own tensors (load_weights with
        # keep_dtype), so .half() of an fp16 checkpoint changes nothing and the very tensors are saved; --fp32
        # saves their exact upcast (fp16 -> fp32 is exact)
        saved = copy.deepcopy(deploy).float() if options.fp32 else deploy.half()
        saved.yaml_file = f"{stem}-deploy.yaml"
        saved.eval()
        if "pt" in options.formats:
            p = stage / f"{stem}-converted.pt"
            save_official(saved, p)
            arts.append(report_mod.Artifact(name=p.name, format="pt",
                                            dtype=str(next(saved.parameters()).dtype).replace("torch.", "")))
        if "safetensors" in options.formats:
            p = stage / f"{stem}-converted.safetensors"
            save_safetensors(saved, p, nc=ckpt.nc, names=ckpt.names, stride=ckpt.stride)
            arts.append(report_mod.Artifact(name=p.name, format="safetensors",
                                            dtype=str(next(saved.parameters()).dtype).replace("torch.", "")))
        extra_formats = [f for f in options.formats if f in ("onnx", "torchscript")]
        if extra_formats:
            from . import export
            from .validation import computing_in_fp32

            wall, cpu = time.perf_counter(), time.process_time()
            with computing_in_fp32(dual):  # the dual model keeps its saved (fp16) weights
                arts.extend(export.export_all(export_model, dual, stage, stem, options, report, say))
            timing = report.timing
            timing["export_s"] = round(time.perf_counter() - wall, 4)
            timing["export_cpu_s"] = round(time.process_time() - cpu, 4)
        for a in arts:
            p = stage / a.name
            a.sha256 = _sha256(p)
            a.bytes = p.stat().st_size
            a.path = str(out / a.name)
        report.artifacts = arts
        if evaluate is not None:
            evaluate(stage, arts)
        main = next((a for a in arts if a.format == "pt"), arts[0] if arts else None)
        report.deploy_sha256 = main.sha256 if main else None
        # like with like: the source .pt against the deploy .pt (no size comparison without a .pt artifact)
        pt = next((a for a in arts if a.format == "pt"), None)
        before = int(report.source.bytes or 0)
        report.bytes = {"before": before, "after": int(pt.bytes), "saved": before - int(pt.bytes)} \
            if pt and before else None
        written = [a.name for a in arts] + [f["name"] for f in (report.evaluation or {}).get("files", [])]
        report.stale_outputs = stale_outputs(out, stem, written)
        report.status = "succeeded"
        _write_json(stage / "report.json", report)
        _publish(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def finish_report(out: Path, report: report_mod.Report) -> None:
    """Rewrite ``report.json`` after the move (final timing), atomically via a temp file + ``os.replace``."""
    tmp = out / ".report.json.tmp"
    _write_json(tmp, report)
    os.replace(tmp, out / "report.json")
