"""Where the MLflow tracking server / model registry is, and a client for it.

Resolution order: an explicit URI (``--tracking-uri``) > ``MLFLOW_TRACKING_URI`` > a local sqlite store
``sqlite:///<cwd>/mlruns/mlflow.db`` (artifacts next to it under ``./mlruns``), so the registry works with
no server. (MLflow 3's own default is ``sqlite:///mlflow.db`` in the working directory; we keep everything
under ``./mlruns`` as the issue asks.) The registry URI is the tracking URI unless ``MLFLOW_REGISTRY_URI``
is set.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_REGISTRY_URI = "MLFLOW_REGISTRY_URI"


def default_tracking_uri(cwd: Path | None = None) -> str:
    """``sqlite:///<cwd>/mlruns/mlflow.db`` (absolute); creates ``<cwd>/mlruns``."""
    root = (cwd or Path.cwd()).resolve() / "mlruns"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The tracking URI to use: ``tracking_uri`` > ``$MLFLOW_TRACKING_URI`` > :func:`default_tracking_uri`."""
    return tracking_uri or os.environ.get(ENV_TRACKING_URI) or default_tracking_uri()


def client(tracking_uri: str | None = None):
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
