"""Fetch a source checkpoint to local disk, hashing it on the way.

:func:`fetch` accepts every form :func:`reparam.store.uris.parse_source` knows. Remote bytes stream to
``<workdir>/<name>.part`` in 1 MiB chunks while sha256 is computed (one pass, never the whole file in
memory), then the file is renamed into place. A progress bar is drawn on stderr only when stderr is a
terminal (or ``progress=True``). MLflow sources (``models:/``, ``runs:/``) are resolved to their concrete
artifact location first; artifacts proxied by an MLflow server (``mlflow-artifacts:``) or kept in S3 are
streamed the same way, other stores go through MLflow's own downloader and are hashed after.

MLflow objects must be complete: a model version must be ``READY`` (``PENDING_REGISTRATION`` is waited for, up
to ``registry_wait`` seconds, then :class:`SourceError`; ``FAILED_REGISTRATION`` is :class:`InvalidInputError`),
and so must the MLflow 3 logged model behind it (``PENDING``: waited for; ``FAILED``: refused). A ``runs:/``
source of a run that ended ``FAILED`` or ``KILLED`` is fetched with a warning (:attr:`FetchedSource.warnings`):
a checkpoint a crashed training left behind may be fine (``best.pt`` is written when it improves) or not.

S3 is configured the usual way: boto3's credential chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ...); endpoint from ``AWS_ENDPOINT_URL_S3``, ``MLFLOW_S3_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL`` for S3-compatible stores.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import shutil
import sys
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Iterable
from urllib.parse import quote, urlsplit

from ..errors import IntegrityError, InvalidInputError, ReparamError, SourceError, count_of
from ..hashing import CHUNK, hash_file
from ..spec import SHA256_PATTERN
from . import tracking
from .uris import SourceRef, parse_source, redact

if TYPE_CHECKING:
    import requests
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from mypy_boto3_s3 import S3Client

#: how a source of one kind is fetched: ``(ref, shown, workdir, tracking_uri, progress) -> FetchedSource``
Fetcher = Callable[[SourceRef, str, Path, "str | None", bool], "FetchedSource"]

#: file suffixes taken as a checkpoint when a model version or directory holds several files
CHECKPOINT_SUFFIXES = (".pt", ".pth")
_SHA256 = re.compile(SHA256_PATTERN)


@dataclasses.dataclass
class FetchedSource:
    """A checkpoint on local disk.

    Attributes:
        path: the local file (for a local source, the file itself: not copied).
        uri: the source URI as given, credentials redacted.
        sha256: hex sha256 of the file's bytes.
        bytes: its size in bytes.
        lineage: where it came from, for registry tags; keys present as applicable:
            ``source_run_id``, ``source_model_name``, ``source_model_version``, ``source_model_alias``,
            ``source_model_id``, ``source_artifact_path``.
        kind: ``local``, ``s3``, ``models``, ``runs`` or ``http``.
        note: a line for the user, e.g. which file was picked inside a model version (or None).
        warnings: lines the user must see (printed as ``reparam: warning: ...``, kept in the report), e.g. the
            source run FAILED.
    """

    path: Path
    uri: str
    sha256: str
    bytes: int
    lineage: dict[str, Any]
    kind: str
    note: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)


def fetch(
    uri: str,
    workdir: Path,
    *,
    sha256: str | None = None,
    tracking_uri: str | None = None,
    progress: bool | None = None,
    registry_wait: float = tracking.REGISTRY_WAIT_S,
) -> FetchedSource:
    """Bring the checkpoint at ``uri`` to local disk under ``workdir`` and hash it.

    Args:
        uri: local path, ``s3://bucket/key``, ``models:/name/version``, ``models:/name@alias``,
            ``runs:/<run_id>/<path>`` or ``http(s)://`` URL.
        workdir: directory for downloads (created if missing). Local sources are not copied.
        sha256: expected hex sha256 (``--sha256``); a mismatch is an error and the download is removed.
        tracking_uri: MLflow tracking URI for ``models:/``/``runs:/`` (see :mod:`reparam.store.tracking`).
        progress: draw a progress bar on stderr; None = only if stderr is a terminal.
        registry_wait: seconds to wait for a model version in ``PENDING_REGISTRATION`` (or its logged model in
            ``PENDING``) to become ready (``--registry-wait``).

    Returns:
        :class:`FetchedSource`.

    Raises:
        IntegrityError: a local file whose sha256 is not ``sha256`` (not retryable).
        InvalidInputError: malformed URI or malformed ``sha256``; a model version in ``FAILED_REGISTRATION`` or
            whose logged model is ``FAILED`` (retrying cannot help).
        SourceError: a model version (or its logged model) still pending after ``registry_wait``; unreachable
            store, bad credentials, missing object/run/version/alias, no or several checkpoint candidates in a
            model version, sha256 mismatch of a download. The message names the step and the
            cause, never credentials.
    """
    ref = parse_source(uri)
    if sha256 is not None and not _SHA256.match(sha256.strip()):
        raise InvalidInputError(f"--sha256 must be 64 hex digits, got {sha256!r}")
    if progress is None:
        progress = _stderr_is_tty()
    shown = redact(ref.uri)
    if ref.kind == "local":
        fetched = _fetch_local(ref, shown)
    else:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        fetchers: dict[str, Fetcher] = {"s3": _fetch_s3, "http": _fetch_http, "runs": _fetch_run,
                                        "models": functools.partial(_fetch_model, wait_s=registry_wait)}
        fetched = fetchers[ref.kind](ref, shown, workdir, tracking_uri, progress)
    if sha256 is not None and fetched.sha256 != sha256.strip().lower():
        expected = sha256.strip().lower()
        if ref.kind == "local":  # the same bytes next time: not retryable
            raise IntegrityError(f"'{shown}' has sha256 {fetched.sha256}, not the pinned --sha256 {expected}: "
                                 "the wrong or a corrupted file; check the file or the pinned hash")
        fetched.path.unlink(missing_ok=True)
        raise SourceError(
            f"fetch {shown}: verify sha256 failed: expected {expected}, got {fetched.sha256} "
            "(wrong file or corrupted download)"
        )
    return fetched


def check_local(uri: str) -> None:
    """Raise :class:`InvalidInputError` at once when ``uri`` is a local path that does not exist, or a local folder
    that does not hold exactly one ``*.pt`` (else nothing).

    Cheap and torch-free: the CLI calls it before importing the converter, so a mistyped path or a folder with two
    checkpoints is reported in milliseconds rather than after torch has loaded. Other URIs are left to
    :func:`fetch`.
    """
    ref = parse_source(uri)
    if ref.kind == "local":
        _local_checkpoint(ref, redact(ref.uri))


def _local_path(ref: SourceRef, shown: str) -> Path:
    path = Path(os.path.expanduser(ref.path or ""))
    if not path.exists():  # a local path will not appear by retrying: invalid input, not a source outage
        raise InvalidInputError(f"checkpoint '{shown}' does not exist (no such file)")
    return path


# --- local ---------------------------------------------------------------------------------------------


def _local_checkpoint(ref: SourceRef, shown: str) -> Path:
    """The local file ``ref`` names: the path itself, or the one ``*.pt`` of a folder (:func:`_pick_checkpoint`)."""
    path = _local_path(ref, shown)
    if path.is_dir():
        path = path / _pick_checkpoint(shown, [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()])
    return path


def _fetch_local(ref: SourceRef, shown: str) -> FetchedSource:
    path = _local_checkpoint(ref, shown)
    try:
        digest, size = hash_file(path)
    except OSError as err:
        raise SourceError(f"fetch {shown}: read local file failed: {err.strerror or err}") from None
    return FetchedSource(path.resolve(), shown, digest, size, {}, "local")


def _part(value: str | None) -> str:
    """A part of a parsed source URI that its kind always has (:class:`reparam.spec.SourceRef`); a missing one is
    a bug in the parser, reported as bad input rather than a crash."""
    if value is None:
        raise InvalidInputError("the source URI lacks a part its kind needs (bucket, key, run id, path or URL)")
    return value


def _pick_checkpoint(shown: str, names: list[str]) -> str:
    """The one checkpoint among ``names`` (relative paths).

    Raises InvalidInputError (retrying cannot help: the user must name the file) listing what is there when
    there is no ``*.pt`` or more than one.
    """
    cands = sorted(n for n in names if n.lower().endswith(CHECKPOINT_SUFFIXES))
    if len(cands) == 1:
        return cands[0]
    if not cands:
        if not names:
            raise InvalidInputError(f"{shown} holds no files; expected one *.pt checkpoint")
        raise InvalidInputError(
            f"{shown} holds no *.pt checkpoint; it has {count_of(sorted(names), 'files', examples=3)}")
    raise InvalidInputError(
        f"{shown} holds {count_of(cands, 'checkpoints', examples=3)}; name one, e.g. "
        f"{shown.rstrip('/')}/{cands[0]}"
    )


# --- streaming helpers ---------------------------------------------------------------------------------


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _stream_to_file(
    chunks: Iterable[bytes], dest: Path, label: str, total: int | None, progress: bool
) -> tuple[str, int]:
    """Write ``chunks`` to ``dest`` (via ``dest.part``), hashing as they pass; returns (sha256, bytes)."""
    part = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    from tqdm import tqdm

    done = 0
    # tqdm on stderr, only when asked (``progress``: by default when stderr is a terminal)
    bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
               disable=not progress)
    try:
        with open(part, "wb") as fh:
            for chunk in chunks:
                if chunk:
                    fh.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
        bar.close()
        if total is not None and done != total:
            raise SourceError(f"download truncated: got {done} of {total} bytes")
        os.replace(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return h.hexdigest(), done


def _dest_for(workdir: Path, name: str) -> Path:
    base = PurePosixPath(name).name or "checkpoint.pt"
    return workdir / base


# --- S3 ------------------------------------------------------------------------------------------------


def s3_endpoint_url() -> str | None:
    """The S3 endpoint from the environment (``AWS_ENDPOINT_URL_S3`` > ``MLFLOW_S3_ENDPOINT_URL`` >
    ``AWS_ENDPOINT_URL``), or None for AWS itself."""
    for var in ("AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


def s3_client() -> S3Client:
    """A boto3 S3 client configured from the environment, failing fast on an unreachable endpoint."""
    import boto3
    from botocore.config import Config

    cfg = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
    # a fresh session each time: boto3's default session caches the credentials it first found
    return boto3.session.Session().client("s3", endpoint_url=s3_endpoint_url(), config=cfg)


def s3_error(step: str, shown: str, err: BaseException) -> SourceError:
    """A SourceError for a boto3/botocore failure of ``step`` on ``shown`` (one line, redacted)."""
    from botocore import exceptions as bx

    if isinstance(err, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        cause = "no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
    elif isinstance(err, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError)):
        cause = f"cannot reach S3 endpoint {s3_endpoint_url() or 'AWS'} ({type(err).__name__})"
    elif isinstance(err, bx.ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchKey", "NotFound"):
            cause = "no such object (check bucket and key)"
        elif code == "NoSuchBucket":
            cause = "no such bucket"
        elif (code in ("403", "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "Forbidden")
              or status == 403):
            cause = f"access denied ({code or status}): check the AWS credentials and their permissions"
        else:
            cause = f"{code or status}: {err}"
    else:
        cause = f"{type(err).__name__}: {err}"
    return SourceError(redact(f"fetch {shown}: {step} failed: {cause}"))


def _fetch_s3_object(bucket: str, key: str, shown: str, workdir: Path, progress: bool) -> tuple[Path, str, int]:
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = s3_client()
    step = "head S3 object"
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
        step = "download S3 object"
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
        dest = _dest_for(workdir, key)
        digest, size = _stream_to_file(
            body.iter_chunks(CHUNK), dest, PurePosixPath(key).name, head.get("ContentLength"), progress
        )
    except (BotoCoreError, ClientError) as err:
        raise s3_error(step, shown, err) from None
    except SourceError as err:
        raise SourceError(f"fetch {shown}: {step} failed: {err}") from None
    return dest, digest, size


def _fetch_s3(ref: SourceRef, shown: str, workdir: Path, tracking_uri: str | None, progress: bool) -> FetchedSource:
    dest, digest, size = _fetch_s3_object(_part(ref.bucket), _part(ref.key), shown, workdir, progress)
    return FetchedSource(dest, shown, digest, size, {}, "s3")


# --- HTTP ----------------------------------------------------------------------------------------------


def _http_chunks(url: str, shown: str, tracking_uri: str | None,
                 step: str) -> tuple[Iterable[bytes], int | None, Callable[[], None]]:
    """Open a streaming GET; MLflow credentials are sent only to the tracking server's own URLs."""
    import requests

    kw: dict[str, Any] = {"stream": True, "timeout": (10, 120)}
    base = tracking_uri or os.environ.get(tracking.ENV_TRACKING_URI) or ""
    if base.startswith(("http://", "https://")) and url.startswith(base.rstrip("/") + "/"):
        from mlflow.utils.credentials import get_default_host_creds

        creds = get_default_host_creds(base)
        if creds.token:
            kw["headers"] = {"Authorization": f"Bearer {creds.token}"}
        elif creds.username and creds.password:
            kw["auth"] = (creds.username, creds.password)
        if creds.ignore_tls_verification:
            kw["verify"] = False
        elif creds.server_cert_path:
            kw["verify"] = creds.server_cert_path
    try:
        resp = requests.get(url, **kw)
    except requests.exceptions.ConnectionError:
        raise SourceError(f"fetch {shown}: {step} failed: cannot connect to {redact(_host(url))}") from None
    except requests.exceptions.RequestException as err:
        raise SourceError(redact(f"fetch {shown}: {step} failed: {type(err).__name__}: {err}")) from None
    if resp.status_code != 200:
        hint = {401: "unauthorized: check credentials", 403: "forbidden: check credentials", 404: "not found"}
        cause = hint.get(resp.status_code, f"HTTP {resp.status_code} {resp.reason}")
        detail = _error_detail(resp)
        raise SourceError(redact(f"fetch {shown}: {step} failed: {cause}" + (f" ({detail})" if detail else "")))
    total = resp.headers.get("Content-Length")
    return resp.iter_content(CHUNK), (int(total) if total and total.isdigit() else None), resp.close


def _error_detail(resp: requests.Response) -> str:
    """The first line of an error body (MLflow sends JSON with ``message``), at most 200 characters."""
    try:
        text = resp.text
    except Exception:  # noqa: BLE001 - best effort: the body only adds detail to an error
        return ""
    try:
        import json

        text = str(json.loads(text).get("message", text))
    except (ValueError, AttributeError):
        pass
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:200]


def _host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def _download_http(url: str, shown: str, workdir: Path, tracking_uri: str | None, progress: bool,
                   step: str = "download over HTTP") -> tuple[Path, str, int]:
    import requests

    chunks, total, close = _http_chunks(url, shown, tracking_uri, step)
    name = PurePosixPath(urlsplit(url).path).name
    dest = _dest_for(workdir, name)
    try:
        digest, size = _stream_to_file(chunks, dest, name, total, progress)
    except requests.exceptions.RequestException as err:
        raise SourceError(redact(f"fetch {shown}: {step} failed: {type(err).__name__}: {err}")) from None
    except SourceError as err:
        raise SourceError(f"fetch {shown}: {step} failed: {err}") from None
    finally:
        close()
    return dest, digest, size


def _fetch_http(ref: SourceRef, shown: str, workdir: Path, tracking_uri: str | None,
                progress: bool) -> FetchedSource:
    dest, digest, size = _download_http(_part(ref.url), shown, workdir, tracking_uri, progress)
    return FetchedSource(dest, shown, digest, size, {}, "http")


# --- MLflow --------------------------------------------------------------------------------------------


def mlflow_error(step: str, shown: str, err: BaseException) -> str:
    """One redacted line for an MLflow/requests failure of ``step``."""
    return redact(f"fetch {shown}: {step} failed: {tracking.describe_error(err, with_type=True)}")


def _download_artifact(artifact_uri: str, shown: str, workdir: Path, tracking_uri: str,
                       progress: bool) -> tuple[Path, str, int]:
    """Download one artifact file given its concrete URI; returns (path, sha256, bytes)."""
    parts = urlsplit(artifact_uri)
    if parts.scheme == "s3":
        return _fetch_s3_object(parts.netloc, parts.path.lstrip("/"), shown, workdir, progress)
    if parts.scheme == "mlflow-artifacts":
        base = f"http://{parts.netloc}" if parts.netloc else tracking_uri
        if not base.startswith(("http://", "https://")):
            raise SourceError(
                f"fetch {shown}: resolve artifact failed: mlflow-artifacts URI needs an HTTP tracking URI")
        url = base.rstrip("/") + "/api/2.0/mlflow-artifacts/artifacts/" + quote(parts.path.lstrip("/"))
        return _download_http(url, shown, workdir, base, progress, step="download artifact via the MLflow server")
    if parts.scheme in ("http", "https"):
        return _download_http(artifact_uri, shown, workdir, tracking_uri, progress)
    # file stores and other clouds: MLflow's own downloader, then hash the result
    import mlflow.artifacts

    dst = workdir / f".dl-{os.getpid()}-{time.monotonic_ns()}"
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst),
                                                         tracking_uri=tracking_uri))
    except Exception as err:  # noqa: BLE001 - MLflow raises many types; all become one line
        shutil.rmtree(dst, ignore_errors=True)
        raise SourceError(mlflow_error("download artifact", shown, err)) from None
    dest = _dest_for(workdir, local.name)
    os.replace(local, dest)
    shutil.rmtree(dst, ignore_errors=True)
    digest, size = hash_file(dest)
    return dest, digest, size


def _list_files(artifact_uri: str, tracking_uri: str, prefix: str = "", depth: int = 0) -> list[str]:
    """Relative paths of all files under ``artifact_uri`` (recursive, at most 4 levels)."""
    import mlflow.artifacts

    out: list[str] = []
    for info in mlflow.artifacts.list_artifacts(artifact_uri=artifact_uri, tracking_uri=tracking_uri):
        rel = PurePosixPath(info.path).name
        full = f"{prefix}{rel}"
        if info.is_dir:
            if depth < 4:
                out += _list_files(f"{artifact_uri.rstrip('/')}/{rel}", tracking_uri, full + "/", depth + 1)
        else:
            out.append(full)
    return out


def _fetch_run(ref: SourceRef, shown: str, workdir: Path, tracking_uri: str | None, progress: bool) -> FetchedSource:
    uri = tracking.resolve_tracking_uri(tracking_uri)
    client = tracking.client(uri)
    step = "look up run"
    try:
        run = client.get_run(_part(ref.run_id))
        root = run.info.artifact_uri.rstrip("/")
        warnings = run_warnings(_part(ref.run_id), str(run.info.status))
        step = "list run artifacts"
        parent = PurePosixPath(_part(ref.path)).parent.as_posix()
        listing = _list_files(root if parent == "." else f"{root}/{parent}", uri)
    except SourceError:
        raise
    except Exception as err:  # noqa: BLE001 - MLflow raises many types; all become one line
        raise SourceError(mlflow_error(step, shown, err)) from None
    name = PurePosixPath(_part(ref.path)).name
    path = _part(ref.path)
    if name not in listing:
        # the path may be a directory holding the checkpoint
        sub = [p[len(name) + 1 :] for p in listing if p.startswith(name + "/")]
        if not sub:
            raise SourceError(f"fetch {shown}: find artifact failed: run {ref.run_id} has no artifact {ref.path!r}")
        path = f"{ref.path}/{_pick_checkpoint(shown, sub)}"
    dest, digest, size = _download_artifact(f"{root}/{path}", shown, workdir, uri, progress)
    lineage = {"source_run_id": ref.run_id, "source_artifact_path": path}
    return FetchedSource(dest, shown, digest, size, lineage, "runs", warnings=warnings)


#: MLflow ``RunStatus`` values of a run that did not end well (a training that crashed or was stopped)
RUN_STATUSES_WARNED = ("FAILED", "KILLED")


def run_warnings(run_id: str, status: str) -> list[str]:
    """A warning for a source run whose MLflow status is in :data:`RUN_STATUSES_WARNED`, else none."""
    if status not in RUN_STATUSES_WARNED:
        return []
    return [f"source run {run_id} is {status}: its training did not finish; the checkpoint is what the run left "
            "behind, check that it is the one you want"]


def _short(text: object, limit: int = 120) -> str:
    """The first line of ``text``, redacted, at most ``limit`` characters ("" for None)."""
    text = redact(text or "").strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _ready_version(client: MlflowClient, mv: ModelVersion, shown: str, wait_s: float) -> ModelVersion:
    """``mv`` once MLflow reports it ``READY`` (re-read while ``PENDING_REGISTRATION``, up to ``wait_s``).

    Raises:
        SourceError: still ``PENDING_REGISTRATION`` after ``wait_s`` (retrying later may help: exit 4).
        InvalidInputError: ``FAILED_REGISTRATION`` or any other status (retrying cannot help: exit 2).
    """
    from .promotion import MLFLOW_READY

    name, version = mv.name, mv.version
    mv = tracking.await_settled(lambda: client.get_model_version(name, version), lambda m: m.status, wait_s, first=mv)
    status = str(mv.status)
    if status == MLFLOW_READY:
        return mv
    what = f"fetch {shown}: model version {mv.version} of {mv.name} is {status}"
    if status in tracking.PENDING:
        raise SourceError(f"{what} after waiting {wait_s:g} s (its registration has not finished); retry later "
                          "or wait longer with --registry-wait SECONDS")
    why = f" ({_short(mv.status_message)})" if _short(mv.status_message) else ""
    raise InvalidInputError(f"{what}{why}: its registration did not complete, so its files cannot be trusted; "
                            "register the checkpoint again and convert the new version")


def _check_logged_model(client: MlflowClient, model_id: str, mv: ModelVersion, shown: str, wait_s: float) -> None:
    """Refuse a model version whose MLflow 3 logged model is not finalized ``READY`` (``PENDING`` is waited for).

    A logged model that no longer exists is not checked (the version's own files are what is fetched).

    Raises:
        SourceError: still ``PENDING`` after ``wait_s``.
        InvalidInputError: ``FAILED``.
    """
    from mlflow.exceptions import MlflowException

    try:
        lm = tracking.await_settled(lambda: client.get_logged_model(model_id), lambda m: m.status, wait_s)
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return
        raise
    status = str(getattr(lm.status, "value", lm.status))
    what = f"fetch {shown}: logged model {model_id} of model version {mv.version} of {mv.name} is {status}"
    if status in tracking.PENDING:
        raise SourceError(f"{what} after waiting {wait_s:g} s (its upload was not finalized); retry later or wait "
                          "longer with --registry-wait SECONDS")
    if status == "FAILED":
        raise InvalidInputError(f"{what}: its upload failed, so its files cannot be trusted; log the model again "
                                "and register a new version")


def _fetch_model(ref: SourceRef, shown: str, workdir: Path, tracking_uri: str | None, progress: bool,
                 wait_s: float = tracking.REGISTRY_WAIT_S) -> FetchedSource:
    uri = tracking.resolve_tracking_uri(tracking_uri)
    client = tracking.client(uri)
    step = "look up model version"
    try:
        if ref.alias:
            step = f"resolve alias @{ref.alias}"
            mv = client.get_model_version_by_alias(_part(ref.model_name), ref.alias)
        else:
            mv = client.get_model_version(_part(ref.model_name), _part(ref.version))
        step = "check model version status"
        mv = _ready_version(client, mv, shown, wait_s)
        model_id = getattr(mv, "model_id", None)
        source = str(mv.source or "")
        if not model_id and re.match(r"^models:/m-[0-9a-f]+$", source):
            model_id = source[len("models:/") :]  # MLflow 3 logged model as the version's source
        if model_id:
            step = "check logged model status"
            _check_logged_model(client, model_id, mv, shown, wait_s)
        step = "resolve model version artifacts"
        root = client.get_model_version_download_uri(mv.name, mv.version).rstrip("/")
        step = "list model version artifacts"
        listing = _list_files(root, uri)
    except ReparamError:
        raise
    except Exception as err:  # noqa: BLE001 - MLflow raises many types; all become one line
        raise SourceError(mlflow_error(step, shown, err)) from None
    note = None
    if ref.path:
        if ref.path not in listing:
            raise SourceError(
                f"fetch {shown}: find artifact failed: version {mv.version} has no {ref.path!r} "
                f"(it has {count_of(sorted(listing), 'files', examples=3)})"
            )
        path = ref.path
    else:
        path = _pick_checkpoint(shown, listing)
        if len(listing) > 1:
            note = f"picked {path} from {mv.name} version {mv.version} ({len(listing)} files)"
    dest, digest, size = _download_artifact(f"{root}/{path}", shown, workdir, uri, progress)
    lineage = {
        "source_model_name": mv.name,
        "source_model_version": str(mv.version),
        "source_artifact_path": path,
    }
    if ref.alias:
        lineage["source_model_alias"] = ref.alias
    if mv.run_id:
        lineage["source_run_id"] = mv.run_id
    if model_id:
        lineage["source_model_id"] = model_id
    return FetchedSource(dest, shown, digest, size, lineage, "models", note)
