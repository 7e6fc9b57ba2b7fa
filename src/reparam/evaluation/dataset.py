"""A YOLO-layout validation set: fetch it, read ``data.yaml``, check every image and label, and digest it.

Layout (the one WongKinYiu/yolov9 ``utils/dataloaders.py`` reads)::

    data.yaml            names: [a, b, ...] (or {0: a, ...}), val: images/val (folder, .txt list, or a list),
                         path: dataset root (optional; relative = relative to data.yaml's folder)
    images/val/x.jpg     any image OpenCV reads
    labels/val/x.txt     one ``class cx cy w h`` line per box, normalised to [0, 1], or (segmentation) one
                         ``class x1 y1 x2 y2 ... xn yn`` polygon line per object (n >= 3 points, normalised)

Label files are found as the official ``img2label_paths`` does: the last ``/images/`` of the image path becomes
``/labels/`` and the suffix ``.txt``. Unlike the official ``check_dataset`` (which resolves a relative ``path``
against its own checkout), a relative ``path`` is taken relative to the folder of ``data.yaml``; an absolute
``path`` that does not exist here (a dataset copied from another machine) falls back to that folder too.

Bad items never crash the evaluation and are never dropped silently: each is listed in
:attr:`Dataset.skipped` with its reason and left out, the way the official loader drops an image whose label file
is corrupt ("ignoring corrupt image/label"): an image OpenCV cannot decode, a label line without exactly 5 fields
or with a non-number, a class id outside ``names``, a coordinate outside [0, 1], or a box of zero size. An image
without a label file is a background image (no objects), as in the official loader; duplicate label rows are
removed (noted in :attr:`Dataset.notes`) as the official loader does.

Polygon labels (the official segmentation layout, ``utils/segment/dataloaders.py``): a line with more than 5 fields
is a polygon ``class x1 y1 ... xn yn``; its box is the polygon's bounding box (official ``segments2boxes``). A
polygon line needs an even number of coordinates, at least 3 points, all in [0, 1], and a box of non-zero size, or
the image is skipped with the reason. :attr:`Item.segments` keeps each instance's polygon (None for a box line), and
:meth:`Dataset.masks_problem` says whether the split can score masks: only when every labelled instance has a
polygon (a boxes-only or mixed dataset gets box metrics only, with that reason in the result).

Sources (:func:`fetch_dataset`): a local folder (or its ``data.yaml``), a ``.zip``/``.tar``/``.tar.gz``/``.tgz``
archive of one (local, ``s3://``, ``http(s)://``, ``runs:/``, ``models:/``), an ``s3://bucket/prefix`` folder, or an
MLflow artifact folder (``runs:/<id>/path``, ``models:/name/version``). Remote files go through
:mod:`reparam.store.sources` (same credentials, endpoints, redaction and error lines as checkpoints).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..errors import InvalidInputError, SourceError

#: image suffixes read (those of the official ``IMG_FORMATS`` that OpenCV decodes)
IMG_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


@dataclass
class Item:
    """One usable image: its file, native size and boxes.

    Attributes:
        path: the image file; rel: its path relative to the dataset root (POSIX).
        width, height: native size in pixels.
        classes: ``[N]`` int64 class ids; boxes: ``[N, 4]`` float64 ``cx, cy, w, h`` normalised to [0, 1].
        segments: per instance its polygon ``[K, 2]`` float64 ``x, y`` normalised to [0, 1] (K >= 3), or None for
            an instance labelled by a box line.
    """

    path: Path
    rel: str
    width: int
    height: int
    classes: np.ndarray
    boxes: np.ndarray
    segments: list[np.ndarray | None] = field(default_factory=list)

    def polygons_px(self) -> list[np.ndarray | None]:
        """Each instance's polygon in native pixels (``[K, 2]`` ``x, y``), None for a box-labelled one."""
        scale = np.array([self.width, self.height], dtype=np.float64)
        return [None if s is None else s * scale for s in self.segments]


@dataclass
class Dataset:
    """A checked validation split.

    Attributes:
        root: the dataset root folder; source: the URI it came from (credentials redacted).
        names: class id -> name from ``data.yaml``.
        items: the usable images, in sorted file order.
        skipped: ``{"file", "reason"}`` of every image left out.
        notes: things fixed on the way that the user should know (duplicate label rows removed, blank lines).
        digest: sha256 over the relative names and bytes of ``data.yaml`` and every image and label file of the
            split (:func:`dataset_digest`); it identifies the data whatever the source (folder, archive, S3).
        images_without_labels: images that have no label file (background images).
    """

    root: Path
    source: str
    names: dict[int, str]
    items: list[Item]
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    digest: str = ""
    images_without_labels: int = 0

    @property
    def instances(self) -> int:
        """Number of labelled boxes over the usable images."""
        return int(sum(len(i.classes) for i in self.items))

    @property
    def polygon_instances(self) -> int:
        """Number of labelled instances that have a polygon (segmentation labels)."""
        return int(sum(s is not None for i in self.items for s in i.segments))

    def masks_problem(self) -> str | None:
        """Why this split cannot score masks (None when it can: every labelled instance has a polygon)."""
        n, poly = self.instances, self.polygon_instances
        if n == 0:
            return "the dataset has no labelled instances"
        if poly == 0:
            return "the dataset's labels are boxes only (no polygon labels: class x1 y1 x2 y2 ...)"
        if poly < n:
            return f"only {poly} of the dataset's {n} labelled instances have a polygon (the others are box lines)"
        return None

    def summary(self) -> dict[str, Any]:
        """``{digest, source, images, instances, polygon_instances, skipped, notes, images_without_labels}`` for
        reports."""
        return {"digest": self.digest, "source": self.source, "images": len(self.items), "instances": self.instances,
                "polygon_instances": self.polygon_instances,
                "skipped": list(self.skipped), "notes": list(self.notes),
                "images_without_labels": self.images_without_labels}


# --- fetching ------------------------------------------------------------------------------------------------


def _is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _extract(archive: Path, dest: Path, shown: str) -> Path:
    """Extract a zip/tar archive into ``dest``; members that would land outside it are refused."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    target = (dest / name).resolve()
                    if not target.is_relative_to(dest.resolve()):
                        raise InvalidInputError(f"dataset archive {shown} has a member outside its root: {name!r}")
                zf.extractall(dest)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(dest, filter="data")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise InvalidInputError(f"dataset archive {shown} cannot be read ({type(exc).__name__}: {exc})") from None
    return dest


def _find_yaml(folder: Path, shown: str) -> Path:
    """The ``data.yaml`` (or the single ``*.yaml``) nearest the top of ``folder``."""
    for depth in range(4):
        pattern = "/".join(["*"] * depth + ["data.yaml"]) if depth else "data.yaml"
        hits = sorted(folder.glob(pattern))
        if hits:
            if len(hits) > 1:
                raise InvalidInputError(f"dataset {shown} holds several data.yaml at one level: "
                                        + ", ".join(h.relative_to(folder).as_posix() for h in hits[:5]))
            return hits[0]
    yamls = sorted(p for p in folder.glob("*.y*ml"))
    if len(yamls) == 1:
        return yamls[0]
    raise InvalidInputError(f"dataset {shown} has no data.yaml (expected a YOLO dataset folder with data.yaml, "
                            "images/ and labels/)")


def _download_s3_prefix(bucket: str, prefix: str, dest: Path, shown: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    from ..store.sources import s3_client, s3_error

    s3 = s3_client()
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    step = "list S3 prefix"
    n = 0
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if not rel or rel.endswith("/"):
                    continue
                target = (dest / rel).resolve()
                if not target.is_relative_to(dest.resolve()):
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                step = "download S3 object"
                s3.download_file(bucket, obj["Key"], str(target))
                n += 1
    except (BotoCoreError, ClientError) as err:
        raise s3_error(step, shown, err) from None
    if n == 0:
        raise SourceError(f"fetch {shown}: list S3 prefix failed: no objects under s3://{bucket}/{prefix}")


def _download_mlflow(uri: str, dest: Path, shown: str, tracking_uri: str | None) -> Path:
    import mlflow.artifacts

    from ..store import tracking
    from ..store.sources import mlflow_error

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest),
                                                        tracking_uri=tracking.resolve_tracking_uri(tracking_uri)))
    except Exception as err:  # noqa: BLE001 - MLflow raises many types; all become one line
        raise SourceError(mlflow_error("download dataset artifacts", shown, err)) from None


def fetch_dataset(uri: str, workdir: Path, *, tracking_uri: str | None = None) -> tuple[Path, str]:
    """Bring a dataset to a local folder; returns ``(path of data.yaml, source shown)``.

    Args:
        uri: local folder / ``data.yaml`` / archive, ``s3://bucket/prefix`` (folder) or ``s3://…/x.zip``,
            ``http(s)://…/x.zip``, ``runs:/<id>/<path>``, ``models:/<name>/<version>[/path]``.
        workdir: scratch folder for downloads and extraction (created).
        tracking_uri: MLflow tracking URI for ``runs:/``/``models:/`` (see :mod:`reparam.store.tracking`).

    Raises:
        InvalidInputError: malformed URI, a local path that does not exist, an unreadable archive, no data.yaml.
        SourceError: unreachable store, missing object/prefix/run/version, bad credentials.
    """
    from ..store.sources import fetch
    from ..store.uris import parse_source, redact

    uri = (uri or "").strip()
    shown = redact(uri)
    workdir = Path(workdir)
    if uri.startswith("s3://") and not _is_archive(uri):
        from urllib.parse import urlsplit

        parts = urlsplit(uri)
        if not parts.netloc:
            raise InvalidInputError(f"malformed S3 URI {shown!r}: use s3://<bucket>/<dataset prefix>")
        dest = workdir / "dataset"
        _download_s3_prefix(parts.netloc, parts.path.lstrip("/"), dest, shown)
        return _find_yaml(dest, shown), shown
    ref = parse_source(uri)
    if ref.kind in ("runs", "models") and not _is_archive(uri):
        got = _download_mlflow(uri, workdir / "dataset", shown, tracking_uri)
        if got.is_file() and not _is_archive(got.name):
            raise InvalidInputError(f"dataset {shown} is a single file {got.name}; expected a folder or archive")
        local = got
    elif ref.kind == "local":
        local = Path(os.path.expanduser(ref.path or ""))
        if not local.exists():
            raise InvalidInputError(f"dataset '{shown}' does not exist (no such file or folder)")
        if local.is_file() and local.suffix.lower() in (".yaml", ".yml"):
            return local.resolve(), shown
    else:
        local = fetch(uri, workdir, tracking_uri=tracking_uri).path
    if local.is_file():
        if not _is_archive(local.name):
            raise InvalidInputError(f"dataset '{shown}' is a file but not a data.yaml or a "
                                    f"{'/'.join(ARCHIVE_SUFFIXES)} archive")
        local = _extract(local, workdir / "extracted", shown)
    return _find_yaml(local, shown), shown


# --- reading -------------------------------------------------------------------------------------------------


def _names(cfg: dict[str, Any], shown: str) -> dict[int, str]:
    names = cfg.get("names")
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise InvalidInputError(f"dataset {shown}: data.yaml has no 'names' (a list or a dict of class names)")
    try:
        out = {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError):
        raise InvalidInputError(f"dataset {shown}: data.yaml 'names' keys must be class ids 0..n-1") from None
    if sorted(out) != list(range(len(out))):
        raise InvalidInputError(f"dataset {shown}: data.yaml 'names' must number the classes 0..{len(out) - 1}")
    return out


def _split_images(root: Path, split: Any, shown: str) -> list[Path]:
    entries = split if isinstance(split, list) else [split]
    files: list[Path] = []
    for entry in entries:
        p = Path(str(entry))
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_SUFFIXES]
        elif p.is_file() and p.suffix == ".txt":  # a list of image paths, relative to the list's folder
            for line in p.read_text().splitlines():
                line = line.strip()
                if line:
                    f = Path(line)
                    files.append(f if f.is_absolute() else (p.parent / f))
        else:
            raise InvalidInputError(
                f"dataset {shown}: the val split '{entry}' does not exist under {root.name or root}")
    return sorted(set(files))


def label_path(image: Path) -> Path:
    """The label file of ``image`` (official ``img2label_paths``: last ``/images/`` -> ``/labels/``, ``.txt``)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _parse_labels(path: Path, nc: int) -> tuple[np.ndarray | None, list[np.ndarray | None], str, list[str]]:
    """``(rows [N, 5] or None, polygons per row, reason when None, notes)`` of one label file.

    A 5-field line is a box (``class cx cy w h``); a longer one a polygon (``class x1 y1 ... xn yn``) whose row is
    its bounding box (official ``segments2boxes``) and whose polygon ``[n, 2]`` is kept (None for a box line).
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return None, [], f"label file unreadable ({type(exc).__name__})", []
    notes: list[str] = []
    lines = text.splitlines()
    blank = sum(1 for ln in lines if not ln.strip())
    if blank and text.strip():
        notes.append(f"{blank} blank line(s) ignored")
    rows: list[list[float]] = []
    polys: list[np.ndarray | None] = []
    keys: set[tuple[float, ...]] = set()
    duplicates = 0
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 5 or (len(fields) > 5 and (len(fields) % 2 == 0 or len(fields) < 7)):
            return None, [], (f"label line {n} has {len(fields)} fields, expected 5 (class cx cy w h) or a polygon "
                              "(class x1 y1 x2 y2 ... with 3 or more points)"), notes
        try:
            vals = [float(v) for v in fields]
        except ValueError:
            return None, [], f"label line {n} is not numeric: {line.strip()[:60]!r}", notes
        cls = vals[0]
        if cls != int(cls) or not 0 <= cls < nc:
            return None, [], f"label line {n}: class {fields[0]} is not one of 0..{nc - 1}", notes
        what = "box" if len(fields) == 5 else "polygon"
        if not all(np.isfinite(vals[1:])) or min(vals[1:]) < 0 or max(vals[1:]) > 1:
            coords = " ".join(fields[1:5]) + (" ..." if len(fields) > 5 else "")
            return None, [], f"label line {n}: {what} {coords} is outside [0, 1] (normalised)", notes
        key = tuple(vals)
        if key in keys:
            duplicates += 1
            continue
        keys.add(key)
        if len(fields) == 5:
            poly = None
        else:
            poly = np.array(vals[1:], dtype=np.float64).reshape(-1, 2)
            lo, hi = poly.min(0), poly.max(0)
            vals = [cls, *((lo + hi) / 2).tolist(), *(hi - lo).tolist()]
        if vals[3] <= 0 or vals[4] <= 0:
            return None, [], f"label line {n}: {what} has zero width or height", notes
        rows.append(vals)
        polys.append(poly)
    if duplicates:
        notes.append(f"{duplicates} duplicate label row(s) removed")
    return np.array(rows, dtype=np.float64).reshape(-1, 5), polys, "", notes


def _image_size(path: Path) -> tuple[int, int] | None:
    import cv2

    im = cv2.imread(str(path))
    return None if im is None else (int(im.shape[1]), int(im.shape[0]))


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name


def dataset_digest(root: Path, files: list[Path]) -> str:
    """sha256 over ``files`` sorted by their path relative to ``root`` (the bare name for a file outside it): for
    each, the POSIX relative name (UTF-8), a NUL byte, the size as 8 bytes big-endian, then the bytes. The same
    files give the same digest from any source (folder, archive, S3, MLflow)."""
    h = hashlib.sha256()
    for rel, f in sorted((_rel(f, root), f) for f in files):
        h.update(rel.encode())
        h.update(b"\0")
        h.update(f.stat().st_size.to_bytes(8, "big"))
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def load_dataset(data_yaml: Path, source: str | None = None, split: str = "val") -> Dataset:
    """Read ``data_yaml`` and check every image and label of ``split``.

    Returns a :class:`Dataset` (bad items in ``skipped``; nothing raised for them).

    Raises:
        InvalidInputError: unreadable ``data.yaml``, no ``names``, no ``split`` entry, a split path that does not
            exist, or a split with no usable image.
    """
    data_yaml = Path(data_yaml).resolve()
    shown = source or str(data_yaml)
    try:
        cfg = yaml.safe_load(data_yaml.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInputError(f"dataset {shown}: data.yaml cannot be read ({type(exc).__name__})") from None
    if not isinstance(cfg, dict):
        raise InvalidInputError(f"dataset {shown}: data.yaml is not a mapping")
    names = _names(cfg, shown)
    if not cfg.get(split):
        raise InvalidInputError(
            f"dataset {shown}: data.yaml has no '{split}' split (add e.g. '{split}: images/{split}')")
    base = data_yaml.parent
    given = Path(str(cfg.get("path") or "."))
    moved = given.is_absolute() and not given.is_dir()
    root = (base if moved else given if given.is_absolute() else base / given).resolve()
    images = _split_images(root, cfg[split], shown)
    if not images:
        raise InvalidInputError(f"dataset {shown}: the '{split}' split has no images ({', '.join(IMG_SUFFIXES)})")
    ds = Dataset(root=root, source=shown, names=names, items=[])
    if moved:
        ds.notes.append(f"data.yaml path {given} does not exist here; the folder of data.yaml was used")
    hashed = [data_yaml]
    for img in images:
        rel = _rel(img, root)
        if not img.is_file():
            ds.skipped.append({"file": rel, "reason": "listed image does not exist"})
            continue
        hashed.append(img)
        lp = label_path(img)
        if lp.is_file():
            hashed.append(lp)
            rows, polys, reason, notes = _parse_labels(lp, len(names))
            lrel = _rel(lp, root)
            ds.notes += [f"{lrel}: {n}" for n in notes]
            if rows is None:
                ds.skipped.append({"file": rel, "reason": f"{lrel}: {reason}"})
                continue
        else:
            rows, polys = np.zeros((0, 5)), []
            ds.images_without_labels += 1
        size = _image_size(img)
        if size is None:
            ds.skipped.append({"file": rel, "reason": "image cannot be decoded (corrupt or not an image)"})
            continue
        ds.items.append(Item(img, rel, size[0], size[1], rows[:, 0].astype(np.int64), rows[:, 1:5].copy(), polys))
    if not ds.items:
        raise InvalidInputError(f"dataset {shown}: the '{split}' split has no usable image "
                                f"({len(ds.skipped)} skipped, e.g. {ds.skipped[0]['file']}: {ds.skipped[0]['reason']})")
    ds.digest = dataset_digest(root, hashed)
    return ds


def check_names(model_names: dict[int, str], data_names: dict[int, str], what: str = "model") -> None:
    """Raise InvalidInputError (one line listing the differences) unless the class names agree id by id."""
    if dict(model_names) == dict(data_names):
        return
    diffs = []
    for k in sorted(set(model_names) | set(data_names)):
        a, b = data_names.get(k), model_names.get(k)
        if a != b:
            diffs.append(f"{k}: dataset {a!r} vs {what} {b!r}")
    more = f" (+{len(diffs) - 6} more)" if len(diffs) > 6 else ""
    raise InvalidInputError(
        f"class names differ between the dataset ({len(data_names)} classes) and the {what} ({len(model_names)} "
        f"classes): {'; '.join(diffs[:6])}{more}; evaluate on a dataset labelled with the {what}'s classes")


__all__ = ["Item", "Dataset", "fetch_dataset", "load_dataset", "dataset_digest", "check_names", "label_path",
           "IMG_SUFFIXES"]
