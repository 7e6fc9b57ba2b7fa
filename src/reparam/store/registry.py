"""Register a validated deploy model as a new MLflow model version (MLflow 3 logged-model API).

:func:`register` runs these steps, each named in any error:

1. ``find existing`` - a complete version with the same ``reparam.idempotency_key`` tag is returned as is
   (no new version): converting the same source with the same settings twice registers once. Complete means
   :func:`reparam.store.promotion.version_problem` finds nothing: MLflow's own status is ``READY`` and our
   tags say ready and validated. A version holding the key that is not complete (``PENDING_REGISTRATION``,
   ``FAILED_REGISTRATION``, or our ``pending``/``failed`` tag) is never reused and never changed here: it is
   left as it is for its owner to inspect or delete, and a new version is registered.
2. ``create registered model`` (if missing; a concurrent creator is fine).
3. ``create run`` - a run in experiment ``reparam`` (or ``$MLFLOW_EXPERIMENT_NAME``) carrying the
   conversion's params, metrics and lineage tags.
4. ``create logged model`` / ``upload artifacts`` / ``finalize logged model`` - the deploy outputs as
   one logged model: an ``MLmodel`` file, the ``.pt``/``.safetensors``/``report.json`` files, and an
   ``.onnx`` file (if any) as an ONNX-flavor model that ``mlflow models serve`` can serve. With an evaluation
   (``--eval-data``) its PR curve, confusion matrix and per-class table are among those files and are also
   logged on the run, under ``evaluation/``.
5. ``create model version`` - source ``models:/<model_id>``, run_id = the conversion run, with all tags
   and ``reparam.status = pending``; a registry that registers asynchronously is waited for up to ``wait_s``
   to report ``READY`` (a version that ends ``FAILED_REGISTRATION`` or stays ``PENDING_REGISTRATION`` fails
   this step and is cleaned up like any failure).
6. ``mark version ready`` - ``reparam.status = ready`` is the LAST write. A version without it never
   counts as done (not found by :func:`find_existing`, never promoted).

On a failure after step 3 the half-made parts are cleaned up as far as the registry still answers: the
version is deleted (or, if that fails, it keeps ``reparam.status = pending``/``failed``), the logged
model is finalized FAILED, the run ends FAILED. Then RegistryError names the step and the cause.
Aliases are not touched here: see :mod:`reparam.store.promotion`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .. import __version__
from ..errors import InvalidInputError, RegistryError, count_of
from ..report import Report, dumps
from . import tracking
from .promotion import MLFLOW_READY, STATUS_READY, TAG_STATUS, TAG_VALIDATION, version_problem
from .uris import redact

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models import Model

TAG_KEY = "reparam.idempotency_key"
TAG_PREFIX = "reparam."
DEFAULT_EXPERIMENT = "reparam"
#: run artifact folder of the evaluation's plots and tables
EVAL_ARTIFACT_PATH = "evaluation"


@dataclasses.dataclass
class Registration:
    """A registered deploy model version.

    Attributes:
        model_name, version: the registered model and its version (a string, as MLflow gives it).
        model_uri: ``models:/<name>/<version>``.
        run_id: the conversion run (metrics, params) - for an existing version, the run that made it.
        model_id: the MLflow 3 logged model holding the artifacts.
        created: False when an existing version with the same idempotency key was returned.
        tags: the version's tags.
        aliases: aliases pointing at it when it was found/created.
    """

    model_name: str
    version: str
    model_uri: str
    run_id: str | None
    model_id: str | None
    created: bool
    tags: dict[str, str]
    aliases: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def idempotency_key(source_sha256: str, settings: dict[str, Any]) -> str:
    """sha256 hex of the source's sha256 and the conversion settings (JSON, sorted keys).

    ``settings`` must hold everything that changes the output (variant, nc, fuse, opset, dtype,
    tolerance, reparam version...) and nothing that does not (paths, timestamps).
    """
    blob = json.dumps({"source_sha256": source_sha256, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _as_dict(mv: ModelVersion) -> dict[str, Any]:
    return {
        "model_name": mv.name,
        "version": str(mv.version),
        "model_uri": f"models:/{mv.name}/{mv.version}",
        "run_id": mv.run_id or None,
        "model_id": model_id_of(mv),
        "tags": dict(mv.tags or {}),
        "aliases": list(getattr(mv, "aliases", None) or []),
    }


def model_id_of(mv: ModelVersion) -> str | None:
    """The MLflow 3 logged model id of a model version (``mv.model_id``, else from its ``models:/m-...`` source;
    a server's reply may leave ``model_id`` empty), or None."""
    return getattr(mv, "model_id", None) or _model_id_from_source(mv.source)


def _model_id_from_source(source: str | None) -> str | None:
    if source and source.startswith("models:/m-") and "/" not in source[len("models:/") :]:
        return source[len("models:/") :]
    return None


def _keyed_versions(client: MlflowClient, model_name: str, key: str) -> tuple[list[ModelVersion], list[ModelVersion]]:
    """(complete, not complete) versions of ``model_name`` tagged with ``key``, each oldest first."""
    flt = f"name = {_quote(model_name)} AND tags.`{TAG_KEY}` = {_quote(key)}"
    found = sorted(client.search_model_versions(flt), key=lambda mv: int(mv.version))
    ready = [mv for mv in found if version_problem(mv.status, mv.tags) is None]
    return ready, [mv for mv in found if version_problem(mv.status, mv.tags) is not None]


def _ready_versions(client: MlflowClient, model_name: str, key: str) -> list[ModelVersion]:
    return _keyed_versions(client, model_name, key)[0]


def find_existing(model_name: str, idempotency_key: str, tracking_uri: str | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """The oldest complete version of ``model_name`` tagged with ``idempotency_key``, or None.

    Complete: :func:`reparam.store.promotion.version_problem` is None (MLflow status ``READY``, our tags ready
    and validated). Versions holding the key that are not complete are skipped and left untouched; ``log`` gets
    one line naming each (version and why).

    Returns a dict: model_name, version, model_uri, run_id, model_id, tags, aliases.

    Raises:
        RegistryError: the registry cannot be queried.
    """
    try:
        client = tracking.client(tracking_uri)
        ready, broken = _keyed_versions(client, model_name, idempotency_key)
    except Exception as err:  # noqa: BLE001 - MLflow raises many types; all become one line
        raise RegistryError(
            redact(f"register {model_name}: find existing failed: {tracking.describe_error(err)}")) from None
    if log and not ready:
        for mv in broken:
            log(f"{model_name} version {mv.version} holds this conversion but is not usable "
                f"({version_problem(mv.status, mv.tags)}); left as it is, a new version will be registered")
    return _as_dict(ready[0]) if ready else None


def check_user_tags(tags: Mapping[str, object] | None) -> dict[str, str]:
    """The user's tags (``--tag k=v``) as MLflow tag strings, credentials redacted.

    Raises:
        InvalidInputError: a key in the reserved ``reparam.*`` namespace (those tags are written by reparam).
    """
    out: dict[str, str] = {}
    for k, v in (tags or {}).items():
        if k.startswith(TAG_PREFIX) or k == TAG_STATUS:
            raise InvalidInputError(f"tag {k!r} is reserved (the {TAG_PREFIX}* tags are set by reparam); "
                                    "choose another key")
        out[k] = redact(str(v))
    return out


def update_tags(model_name: str, version: str | int, tags: Mapping[str, object] | None,
                current: Mapping[str, str] | None, tracking_uri: str | None = None) -> list[str]:
    """Set the user's ``tags`` that are missing or different on an existing version; returns their keys, sorted.

    Tags are metadata, not conversion settings: a changed ``--tag`` never makes a new version. Tags the version
    has but ``tags`` lacks are kept (others may have set them).

    Args:
        current: the version's tags as read (e.g. ``find_existing(...)["tags"]``).

    Raises:
        InvalidInputError: a reserved key (:func:`check_user_tags`).
        RegistryError: a tag cannot be written (names the key; tags set before it stay).
    """
    wanted = check_user_tags(tags)
    current = current or {}
    changed = sorted(k for k, v in wanted.items() if current.get(k) != v)
    if not changed:
        return []
    client = tracking.client(tracking_uri)
    for k in changed:
        try:
            client.set_model_version_tag(model_name, str(version), k, wanted[k])
        except Exception as err:  # noqa: BLE001 - MLflow raises many types; all become one line
            raise RegistryError(redact(f"update tags of {model_name} v{version}: set tag {k!r} failed: "
                                       f"{tracking.describe_error(err)}")) from None
    return changed


def version_tags(r: Report, *, tags: Mapping[str, object] | None, lineage: Mapping[str, object] | None,
                 idempotency_key: str) -> dict[str, str]:
    """All tags a new version gets (strings): conversion facts of the report ``r``, lineage, the key, the user's
    tags."""
    out: dict[str, object] = {
        TAG_KEY: idempotency_key,
        f"{TAG_PREFIX}source_uri": redact(r.source.uri),
        f"{TAG_PREFIX}source_sha256": r.source.sha256 or "",
        f"{TAG_PREFIX}deploy_sha256": r.deploy_sha256 or "",
        f"{TAG_PREFIX}variant": r.variant or "",
        f"{TAG_PREFIX}nc": "" if r.nc is None else r.nc,
        f"{TAG_PREFIX}params_before": "" if r.params_before is None else r.params_before,
        f"{TAG_PREFIX}params_after": "" if r.params_after is None else r.params_after,
        f"{TAG_PREFIX}max_abs_diff": "" if r.validation.max_abs_diff is None else r.validation.max_abs_diff,
        TAG_VALIDATION: "true" if r.validation.passed is True else "false",
        f"{TAG_PREFIX}version": __version__,
    }
    for k, v in (lineage or {}).items():
        if v not in (None, ""):
            out[f"{TAG_PREFIX}{k}"] = v
    out.update(check_user_tags(tags))
    return {k: redact(str(v)) for k, v in out.items()}


def run_metrics(r: Report) -> dict[str, float]:
    """Numeric conversion metrics for the run (those known): max_abs_diff, params_before/after, bytes_before (the
    source checkpoint), bytes_after (the deploy ``.pt``), duration_s (the conversion's wall time, the report's
    ``timing.total_s``)."""
    pt = r.artifact("pt")
    values = {"max_abs_diff": r.validation.max_abs_diff, "params_before": r.params_before,
              "params_after": r.params_after, "bytes_before": r.source.bytes, "bytes_after": pt.bytes if pt else None,
              "duration_s": r.duration_s}
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def evaluation_files(report: Report, artifacts_dir: Path) -> list[Path]:
    """The evaluation's plots and tables (report ``evaluation.files``, :mod:`reparam.evaluation.plots`) that are
    in ``artifacts_dir``."""
    listed = (report.evaluation or {}).get("files") or []
    return [p for p in (Path(artifacts_dir) / str(f.get("name", "")) for f in listed) if p.is_file()]


def _experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - created concurrently: read it back
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Deploy models converted by reparam")
    except MlflowException as err:
        if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise


def _build_model_dir(dest: Path, artifacts_dir: Path, report: Report, model_id: str, run_id: str) -> list[str]:
    """Lay out the logged model: deploy files + MLmodel (ONNX flavor if an .onnx is there)."""
    from mlflow.models import Model

    files = sorted(p for p in artifacts_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    onnx_files = [p for p in files if p.suffix == ".onnx"]
    if len(onnx_files) > 1:
        raise RegistryError(
            f"{count_of([p.name for p in onnx_files], '.onnx files')} in {artifacts_dir}; a deploy model has one")
    model = Model(model_id=model_id, run_id=run_id, artifact_path=None)
    dest.mkdir(parents=True, exist_ok=True)
    if onnx_files:
        _add_onnx_flavor(model, dest, onnx_files[0].name)
    model.metadata = {"reparam_version": __version__, "variant": report.variant, "nc": report.nc}
    model.model_id, model.run_id = model_id, run_id
    for p in files:
        shutil.copyfile(p, dest / p.name)
    if not (dest / "report.json").exists():
        (dest / "report.json").write_text(dumps(report) + "\n")
    model.save(str(dest / "MLmodel"))
    return sorted(p.name for p in dest.iterdir())


def _add_onnx_flavor(model: "Model", dest: Path, data: str) -> None:
    """Describe the ONNX file ``data`` (kept byte for byte under its own name) as MLflow's ``onnx`` and
    ``python_function`` flavors, so ``mlflow.pyfunc.load_model`` / ``mlflow models serve`` run it.

    Written with :class:`mlflow.models.Model`'s public ``add_flavor`` and the fields ``mlflow.onnx.save_model``
    writes (MLflow's ``mlflow/onnx/__init__.py``: ``onnx_version``, ``data``, ``providers``, ``code``; pyfunc
    ``loader_module: mlflow.onnx`` with its environment files), instead of calling ``mlflow.onnx`` itself: that
    module imports pandas, which the ``mlflow-skinny`` client of the ``[converter]`` extra does not install.
    The requirements are the flavor's own (mlflow, onnx, onnxruntime), pinned to the versions installed here, and
    nothing is resolved against a package index (a conversion Job may have none).
    """
    import platform
    from importlib import metadata

    import yaml

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    mlflow_version = version("mlflow") or version("mlflow-skinny")
    reqs = [f"{d}=={v}" if v else d for d, v in (("mlflow", mlflow_version), ("onnx", version("onnx")),
                                                  ("onnxruntime", version("onnxruntime")))]
    py = platform.python_version()
    (dest / "requirements.txt").write_text("\n".join(reqs))
    (dest / "python_env.yaml").write_text(yaml.safe_dump(
        {"python": py, "build_dependencies": ["pip", "setuptools", "wheel"], "dependencies": ["-r requirements.txt"]},
        sort_keys=False))
    (dest / "conda.yaml").write_text(yaml.safe_dump(
        {"channels": ["conda-forge"], "dependencies": [f"python={py}", "pip", {"pip": reqs}]},
        default_flow_style=False))
    model.add_flavor("python_function", loader_module="mlflow.onnx", data=data,
                     env={"conda": "conda.yaml", "virtualenv": "python_env.yaml"}, python_version=py)
    model.add_flavor("onnx", onnx_version=version("onnx"), data=data,
                     providers=["CUDAExecutionProvider", "CPUExecutionProvider"], code=None)


def _upload_model_dir(client: Any, model_id: str, model_dir: Path, progress: bool | None) -> list[str]:
    """Upload every file under ``model_dir`` to the logged model ``model_id``, one
    ``MlflowClient.log_model_artifact`` per file (its folder as ``artifact_path``; the same layout
    ``log_model_artifacts`` gives), with a tqdm bar in bytes on stderr when ``progress`` (None: stderr is a
    terminal). Returns the uploaded paths relative to ``model_dir``, in upload order (sorted).

    Raises: whatever the MLflow client raises (the caller names the step and cleans up).
    """
    import sys

    from tqdm import tqdm

    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    if progress is None:
        progress = sys.stderr.isatty()
    bar = tqdm(total=sum(p.stat().st_size for p in files), desc="uploading to the registry", unit="B",
               unit_scale=True, unit_divisor=1024, file=sys.stderr, disable=not progress)
    done: list[str] = []
    try:
        for p in files:
            rel = p.relative_to(model_dir)
            folder = rel.parent.as_posix()
            client.log_model_artifact(model_id, str(p), None if folder == "." else folder)
            bar.update(p.stat().st_size)
            done.append(rel.as_posix())
    finally:
        bar.close()
    return done


def register(
    model_name: str,
    artifacts_dir: Path,
    report: Report,
    *,
    tags: Mapping[str, object] | None = None,
    lineage: Mapping[str, object] | None = None,
    idempotency_key: str,
    tracking_uri: str | None = None,
    experiment_name: str | None = None,
    wait_s: float = tracking.REGISTRY_WAIT_S,
    progress: bool | None = None,
) -> Registration:
    """Register the deploy outputs in ``artifacts_dir`` as a new version of ``model_name``.

    Args:
        model_name: registered model to add a version to (created if missing).
        artifacts_dir: directory with the deploy outputs (.pt, .safetensors, .onnx, report.json).
        report: the conversion report (see module :mod:`reparam.converter` report schema).
        tags: user tags for the version (``--tag k=v``); ``reparam.*`` keys are reserved.
        lineage: :attr:`reparam.store.sources.FetchedSource.lineage` of the source.
        idempotency_key: see :func:`idempotency_key`.
        tracking_uri: see :func:`reparam.store.tracking.resolve_tracking_uri`.
        experiment_name: experiment for the conversion run (default ``$MLFLOW_EXPERIMENT_NAME`` or
            ``reparam``).
        wait_s: seconds to wait for a new version that the registry reports ``PENDING_REGISTRATION``
            (``--registry-wait``).
        progress: draw an upload progress bar (bytes, file by file) on stderr; None = only when stderr is a
            terminal (as the source download's bar).

    Returns:
        :class:`Registration` (``created=False`` if an existing version was found).

    Raises:
        RegistryError: validation did not pass, or a step failed (the message names it); nothing is
            left that looks registered.
    """
    artifacts_dir = Path(artifacts_dir)
    if report.validation.passed is not True:
        raise RegistryError(f"register {model_name}: refused: validation did not pass (nothing registered)")
    if not artifacts_dir.is_dir():
        raise RegistryError(f"register {model_name}: read artifacts failed: {artifacts_dir} is not a directory")
    all_tags = version_tags(report, tags=tags, lineage=lineage, idempotency_key=idempotency_key)
    metrics = run_metrics(report)
    state: dict[str, Any] = {"step": "connect"}
    client = None

    def fail(err: BaseException) -> RegistryError:
        msg = str(err) if isinstance(err, RegistryError) else (
            f"register {model_name}: {state['step']} failed: {tracking.describe_error(err)}")
        if client is not None:
            _cleanup(client, model_name, state)
        return RegistryError(redact(msg))

    from mlflow.entities import Metric

    try:
        client = tracking.client(tracking_uri)
        state["step"] = "find existing"
        ready = _ready_versions(client, model_name, idempotency_key)
        if ready:
            return _registration(ready[0], created=False)
        state["step"] = "create registered model"
        _ensure_registered_model(client, model_name)
        state["step"] = "create run"
        exp_id = _experiment_id(client,
                                experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)
        run_tags = {k: v for k, v in all_tags.items() if k.startswith(TAG_PREFIX)}
        run_tags["mlflow.runName"] = f"reparam-{model_name}"
        run = client.create_run(exp_id, tags=run_tags)
        state["run_id"] = run_id = run.info.run_id
        state["step"] = "create logged model"
        logged = client.create_logged_model(
            exp_id,
            name=model_name,
            source_run_id=run_id,
            tags={k: v for k, v in all_tags.items() if k != TAG_STATUS},
            params={k[len(TAG_PREFIX) :]: v for k, v in run_tags.items() if k.startswith(TAG_PREFIX) and k != TAG_KEY},
            model_type="reparam-deploy",
        )
        state["model_id"] = model_id = logged.model_id
        state["step"] = "log metrics"
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0, model_id=model_id) for k, v in metrics.items()])
        eval_files = evaluation_files(report, artifacts_dir)
        if eval_files:
            state["step"] = "upload evaluation plots"
            for p in eval_files:  # on the run too (its Artifacts tab); the logged model gets them with the rest
                client.log_artifact(run_id, str(p), EVAL_ARTIFACT_PATH)
        with tempfile.TemporaryDirectory(prefix="reparam-model-") as tmp:
            state["step"] = "build model directory"
            model_dir = Path(tmp) / "model"
            files = _build_model_dir(model_dir, artifacts_dir, report, model_id, run_id)
            state["step"] = "upload artifacts"
            _upload_model_dir(client, model_id, model_dir, progress)
        state["step"] = "finalize logged model"
        client.finalize_logged_model(model_id, "READY")
        state["step"] = "create model version"
        # a server resolves models:/<model_id> itself; a local store would look it up through MLflow's
        # global tracking URI (not ours), so it gets the logged model's concrete location instead
        remote = str(client.tracking_uri).startswith(("http://", "https://", "databricks"))
        mv = client.create_model_version(
            model_name,
            source=f"models:/{model_id}" if remote else logged.artifact_location,
            run_id=run_id,
            tags={**all_tags, TAG_STATUS: "pending", f"{TAG_PREFIX}files": ",".join(files)},
            description=f"reparam {__version__}: {report.variant or '?'} deploy model from "
            f"{all_tags.get(f'{TAG_PREFIX}source_uri', '?')}",
            model_id=model_id,
            await_creation_for=0,  # waited for below, once the version number is known (for the cleanup)
        )
        state["version"] = str(mv.version)
        mv = tracking.await_settled(lambda: client.get_model_version(model_name, state["version"]),
                                    lambda m: m.status, wait_s, first=mv)
        if mv.status != MLFLOW_READY:
            raise RegistryError(f"register {model_name}: create model version failed: version {mv.version} is "
                                f"{mv.status}" + (f" ({mv.status_message})" if mv.status_message else "")
                                + f" after {wait_s:g} s; nothing was promoted (raise --registry-wait for a slow "
                                "registry)")
        state["step"] = "mark version ready"
        client.set_model_version_tag(model_name, mv.version, TAG_STATUS, STATUS_READY)
        state["done"] = True
        state["step"] = "end run"
        client.set_terminated(run_id, "FINISHED")
        # a racing conversion with the same key: keep the oldest ready version, drop ours
        state["step"] = "check duplicates"
        ready = _ready_versions(client, model_name, idempotency_key)
        if ready and str(ready[0].version) != state["version"]:
            try:
                client.set_model_version_tag(model_name, mv.version, TAG_STATUS, "duplicate")
                client.delete_model_version(model_name, mv.version)
            except Exception:  # noqa: BLE001 - the duplicate is tagged or harmless; the original wins
                pass
            return _registration(ready[0], created=False)
        return _registration(client.get_model_version(model_name, mv.version), created=True)
    except Exception as err:  # noqa: BLE001 - MLflow raises many types; all become one line
        if state.get("done"):  # registered and marked ready: only bookkeeping after it failed
            version = state["version"]
            return Registration(model_name, version, f"models:/{model_name}/{version}", state.get("run_id"),
                                state.get("model_id"), True, {**all_tags, TAG_STATUS: STATUS_READY})  # fmt: skip
        raise fail(err) from None


def _registration(mv: ModelVersion, *, created: bool) -> Registration:
    d = _as_dict(mv)
    return Registration(d["model_name"], d["version"], d["model_uri"], d["run_id"], d["model_id"], created,
                        d["tags"], d["aliases"])  # fmt: skip


def _cleanup(client: MlflowClient, model_name: str, state: dict[str, Any]) -> None:
    """Best effort: leave nothing that looks registered (each call may fail if the server is gone)."""
    version = state.get("version")
    if version is not None:
        try:
            client.set_model_version_tag(model_name, version, TAG_STATUS, "failed")
        except Exception:  # noqa: BLE001 - best-effort cleanup; the error raised names the failed step
            pass
        try:
            client.delete_model_version(model_name, version)
        except Exception:  # noqa: BLE001 - best-effort cleanup; the error raised names the failed step
            pass
    if state.get("model_id"):
        try:
            client.finalize_logged_model(state["model_id"], "FAILED")
        except Exception:  # noqa: BLE001 - best-effort cleanup; the error raised names the failed step
            pass
    if state.get("run_id"):
        try:
            client.set_tag(state["run_id"], f"{TAG_PREFIX}failed_step", state.get("step", "?"))
            client.set_terminated(state["run_id"], "FAILED")
        except Exception:  # noqa: BLE001 - best-effort cleanup; the error raised names the failed step
            pass
