"""``reparam webhook register``: the MLflow 3 registry webhook that wakes ``ModelConversionPolicy`` loops.

MLflow's webhooks (``MlflowClient.create_webhook``, MLflow >= 3.3) live in the model registry's SQL store; a file
store has none (``mlflow/webhooks/delivery.py`` skips ``FileStore``) and some managed services do not offer the
API. The webhook is subscribed to the events that can select a new version (``model_version.created``,
``model_version_alias.created``, ``model_version_tag.set``); MLflow signs every delivery with the secret
(``X-MLflow-Signature``, verified by :mod:`reparam.operator.webhooks`). MLflow webhooks are not per model: the
operator ignores deliveries for models no policy watches; ``--model`` names the webhook after the model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ..errors import InvalidInputError, RegistryError
from . import tracking
from .uris import redact

EVENTS = ("model_version.created", "model_version_alias.created", "model_version_tag.set")


@dataclasses.dataclass(frozen=True)
class WebhookInfo:
    """The created webhook: MLflow's ``webhook_id``, ``name``, ``url`` and subscribed ``events``."""

    webhook_id: str
    name: str
    url: str
    events: tuple[str, ...]


def webhook_name(model: str) -> str:
    """MLflow's webhook name for ``model`` (letters, digits, ``.``, ``_``, ``-``; ``reparam-<model>``)."""
    return "reparam-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-") or "model")[:60]


def register_webhook(url: str, secret: str, model: str, tracking_uri: str | None = None) -> WebhookInfo:
    """Create the webhook delivering registry events to ``url`` (the operator's ``/webhooks/mlflow``).

    Raises:
        InvalidInputError: an empty secret, or MLflow refuses the URL (its scheme/host rules, the message says).
        RegistryError: the backend has no webhooks (a file store, a service without the API) or cannot be reached.
    """
    if not secret:
        raise InvalidInputError("the webhook secret is empty: put it in the variable --secret-env names")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    if not uri.startswith(("http://", "https://", "sqlite:", "postgresql", "mysql", "mssql")):
        raise RegistryError(f"{redact(uri)} has no webhooks: MLflow delivers them only from a SQL-backed "
                            "registry (a file store cannot); poll with spec.interval instead")
    client = tracking.client(uri)
    # MLflow types ``events`` as a Literal of its event names, which grows with its releases; ours are plain strings
    events: list[Any] = list(EVENTS)
    try:
        hook = client.create_webhook(name=webhook_name(model), url=url, events=events, secret=secret,
                                     description=f"reparam ModelConversionPolicy events for {model}")
    except Exception as err:  # noqa: BLE001 - every failure becomes one line
        text = tracking.describe_error(err)
        if getattr(err, "error_code", "") == "INVALID_PARAMETER_VALUE":
            raise InvalidInputError(redact(f"MLflow refused the webhook: {text}")) from None
        if getattr(err, "error_code", "") in ("ENDPOINT_NOT_FOUND", "NOT_IMPLEMENTED", "FEATURE_DISABLED") or \
                "404" in text or "not supported" in text.lower():
            raise RegistryError(redact(f"{uri} cannot create webhooks ({text}); poll with spec.interval "
                                       "instead")) from None
        raise RegistryError(redact(f"creating the webhook failed: {text}")) from None
    return WebhookInfo(str(hook.webhook_id), str(hook.name), str(hook.url),
                       tuple(f"{e.entity.value}.{e.action.value}" if hasattr(e, "entity") else str(e)
                             for e in hook.events))
