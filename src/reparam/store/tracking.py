"""Where the MLflow tracking server / model registry is, and a client for it.

Resolution order: an explicit URI (``--tracking-uri``) > ``MLFLOW_TRACKING_URI`` > a local sqlite store
``sqlite:///<cwd>/mlruns/mlflow.db`` (artifacts next to it under ``./mlruns``), so the registry works with
no server. (MLflow 3's own default is ``sqlite:///mlflow.db`` in the working directory; we keep everything
under ``./mlruns`` as the issue asks.) The registry URI is the tracking URI unless ``MLFLOW_REGISTRY_URI``
is set.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:
    from mlflow import MlflowClient

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_REGISTRY_URI = "MLFLOW_REGISTRY_URI"

#: Default seconds to wait for a registry object that MLflow reports pending (``--registry-wait``).
REGISTRY_WAIT_S = 60.0
#: Seconds between two reads while waiting.
POLL_S = 1.0
#: MLflow's pending states: ``ModelVersionStatus.PENDING_REGISTRATION``, ``LoggedModelStatus.PENDING``.
PENDING = ("PENDING_REGISTRATION", "PENDING")

T = TypeVar("T")


def default_tracking_uri(cwd: Path | None = None) -> str:
    """``sqlite:///<cwd>/mlruns/mlflow.db`` (absolute); creates ``<cwd>/mlruns``."""
    root = (cwd or Path.cwd()).resolve() / "mlruns"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The tracking URI to use: ``tracking_uri`` > ``$MLFLOW_TRACKING_URI`` > :func:`default_tracking_uri`."""
    return tracking_uri or os.environ.get(ENV_TRACKING_URI) or default_tracking_uri()


def client(tracking_uri: str | None = None) -> MlflowClient:
    """An ``mlflow.MlflowClient`` for the resolved tracking URI (registry: ``$MLFLOW_REGISTRY_URI`` or the same)."""
    # MLflow prints "View run ... at: <tracking URI>" on stdout when a run ends: that would pollute the
    # CLI's stdout and could show credentials embedded in the URI
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    registry = os.environ.get(ENV_REGISTRY_URI) if not tracking_uri else None
    return MlflowClient(tracking_uri=uri, registry_uri=registry or uri)


_NO_CONNECTION = ("Max retries exceeded", "Connection refused", "Failed to establish")


def describe_error(err: BaseException, *, with_type: bool = False) -> str:
    """The first line of an MLflow (or requests) failure, for one-line errors; not redacted.

    An MLflow error reads ``CODE: message``; a refused connection reads "cannot connect to the MLflow tracking
    server ..."; any other error its first line, prefixed by its type when ``with_type``.
    """
    code = getattr(err, "error_code", None)
    text = str(getattr(err, "message", err)).strip()
    first = text.splitlines()[0] if text else (code or type(err).__name__)
    if any(marker in first for marker in _NO_CONNECTION):
        return "cannot connect to the MLflow tracking server (is it running? check --tracking-uri)"
    if code:
        return f"{code}: {first}" if code not in first else first
    return f"{type(err).__name__}: {first}" if with_type else first


def await_settled(read: Callable[[], T], status_of: Callable[[T], object], wait_s: float, *, first: T | None = None,
                  poll_s: float = POLL_S) -> T:
    """Re-read an MLflow object while its status is pending (:data:`PENDING`), for at most ``wait_s`` seconds.

    Args:
        read: reads the object (e.g. ``lambda: client.get_model_version(name, version)``); its errors propagate.
        status_of: its status (``ModelVersion.status``, ``LoggedModel.status``), compared by ``str``.
        wait_s: the longest wait in seconds (0: no wait).
        first: an already read object (no first read then).

    Returns:
        The last object read: its status is no longer pending, or the wait ran out (the caller decides what a
        pending or failed status means).
    """
    obj = read() if first is None else first
    deadline = time.monotonic() + max(0.0, wait_s)
    while _status_str(status_of(obj)) in PENDING:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(poll_s, left))
        obj = read()
    return obj


def _status_str(status: object) -> str:
    """``READY`` for ``READY``, ``"READY"`` and ``LoggedModelStatus.READY`` alike."""
    return str(getattr(status, "value", status))
