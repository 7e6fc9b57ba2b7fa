"""``ModelConversionPolicy``: which registered dual versions to convert, and the ``ModelConversion`` of each.

Pure except :func:`read_registry` (blocking MLflow calls, run in a thread by :mod:`.policy_runner`).

A policy (``crds/modelconversionpolicy.yaml``) names a source registered model, a selector and a template::

    spec:
      source: {registeredModel: traffic-dual, select: {alias: candidate}, minVersion: 3}
      interval: 5m
      template: {registry: {modelName: traffic-deploy}, ...}   # a ModelConversion spec without source.uri
      historyLimit: 10

Rules (issue #13):

* **Selection** (:func:`select_versions`): only versions MLflow reports ``READY`` (``ModelVersion.status``,
  MLflow's ``model_version_status.py``) and numbered at least ``minVersion``. ``alias``: the version the alias
  points at (each version it has pointed at while the operator watched gets its conversion); ``tag``: every
  version carrying all the given tags; ``newest``: every version (the newest first).
* **One conversion per version** (:func:`conversion_name`): the name is a pure function of the policy's name and
  the version, so a webhook and a poll, two replicas or a restart all create the same object; the API server
  answers the second create with 409 AlreadyExists, which counts as success. It is owned by the policy
  (``ownerReferences``, ``controller``: deleting the policy deletes its conversions, the registry versions stay).
* **A version converted by hand** with the same settings is not converted twice: the conversion's Job finds the
  deploy version by the registry's idempotency key (:func:`reparam.store.registry.find_existing`) and registers
  nothing new.
* **The template** is checked with the operator's ``ModelConversion`` rules (:func:`.jobs.validate_spec`) on the
  spec a version would get, before anything is created; the API server then checks the ``ModelConversion``
  schema on create.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import re
from collections.abc import Mapping
from typing import Any

from .. import spec as grammar
from . import jobs

PLURAL = "modelconversionpolicies"
KIND = "ModelConversionPolicy"
#: Labels a policy puts on its conversions (values shortened by :func:`.jobs.label_value`).
LABEL_POLICY = f"{jobs.GROUP}/policy"
LABEL_SOURCE_MODEL = f"{jobs.GROUP}/source-model"
LABEL_SOURCE_VERSION = f"{jobs.GROUP}/source-version"
#: The full source model name (a label value is limited to 63 characters of ``[A-Za-z0-9_.-]``).
ANNOTATION_SOURCE_MODEL = f"{jobs.GROUP}/source-model"
#: ``ModelConversion`` phases after which a conversion is finished (history may delete it).
FINISHED_PHASES = ("Succeeded", "Failed")
#: MLflow's ``ModelVersionStatus.READY``.
MLFLOW_READY = "READY"


class InvalidPolicy(ValueError):
    """The policy cannot be acted on; ``reason`` is the condition reason, ``str(err)`` names the field and fix."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Selector:
    """One of :data:`reparam.spec.SELECTORS`: ``alias`` (a name), ``tags`` (key -> value, all must match) or
    ``newest`` (every version)."""

    alias: str | None = None
    tags: Mapping[str, str] | None = None
    newest: bool = False


@dataclasses.dataclass(frozen=True)
class Policy:
    """A parsed ``ModelConversionPolicy``.

    Attributes:
        name, namespace, uid: the resource's.
        model: the source registered model (``spec.source.registeredModel``).
        tracking_uri: the MLflow server it lives on (``spec.source.trackingUri``, else the template's
            ``registry.trackingUri``, else the operator's default).
        selector: which versions to convert.
        min_version: versions below it are ignored (``spec.source.minVersion``, default 1).
        interval_s: polling period in seconds (``spec.interval``).
        template: the ``ModelConversion`` spec each conversion gets (``source.uri`` filled per version).
        history_limit: finished conversions kept (``spec.historyLimit``).
    """

    name: str
    namespace: str
    uid: str
    model: str
    tracking_uri: str
    selector: Selector
    min_version: int
    interval_s: float
    template: Mapping[str, Any]
    history_limit: int


def parse_policy(body: Mapping[str, Any], default_tracking_uri: str = "") -> Policy:
    """The policy of a resource body.

    Raises:
        InvalidPolicy: reason ``InvalidSelector``, ``InvalidInterval``, ``InvalidTemplate`` or ``InvalidSource``;
            the message names the field (all problems of the template at once).
    """
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    source = spec.get("source") or {}
    model = source.get("registeredModel")
    problem = grammar.model_name_problem(model)
    if problem:
        raise InvalidPolicy("InvalidSource", f"spec.source.registeredModel: {problem}")
    select = source.get("select")
    problem = grammar.selector_problem(select)
    if problem:
        raise InvalidPolicy("InvalidSelector", f"spec.source.select: {problem}")
    assert isinstance(select, dict)
    selector = Selector(alias=select.get("alias"), tags=dict(select["tag"]) if "tag" in select else None,
                        newest=bool(select.get("newest")))
    min_version = source.get("minVersion", 1)
    if not isinstance(min_version, int) or isinstance(min_version, bool) or min_version < 1:
        raise InvalidPolicy("InvalidSource", f"spec.source.minVersion must be an integer >= 1, got {min_version!r}")
    try:
        interval = grammar.parse_interval(spec.get("interval", grammar.DEFAULT_INTERVAL))
    except grammar.SpecError as err:
        raise InvalidPolicy("InvalidInterval", f"spec.interval: {err}") from None
    history = spec.get("historyLimit", grammar.DEFAULT_HISTORY_LIMIT)
    if not isinstance(history, int) or isinstance(history, bool) or not 0 <= history <= grammar.HISTORY_LIMIT_MAX:
        raise InvalidPolicy("InvalidHistoryLimit",
                            f"spec.historyLimit must be an integer within 0..{grammar.HISTORY_LIMIT_MAX}")
    template = spec.get("template")
    if not isinstance(template, dict):
        raise InvalidPolicy("InvalidTemplate", "spec.template must be a ModelConversion spec (an object)")
    registry = template.get("registry") or {}
    tracking = source.get("trackingUri") or registry.get("trackingUri") or default_tracking_uri
    if not re.fullmatch(grammar.TRACKING_URI_PATTERN, tracking or ""):
        raise InvalidPolicy("InvalidSource", "spec.source.trackingUri (or spec.template.registry.trackingUri) must "
                                             "be the http(s):// URI of the MLflow server holding the source model")
    try:
        jobs.validate_spec(conversion_spec(template, str(model), 1, default_tracking_uri))
    except jobs.InvalidSpec as err:
        raise InvalidPolicy("InvalidTemplate", f"spec.template: {err}") from None
    return Policy(name=str(meta.get("name") or ""), namespace=str(meta.get("namespace") or ""),
                  uid=str(meta.get("uid") or ""), model=str(model), tracking_uri=tracking, selector=selector,
                  min_version=min_version, interval_s=interval, template=template, history_limit=history)


@dataclasses.dataclass(frozen=True)
class SourceVersion:
    """A version of the source registered model as the registry reports it.

    ``version`` is MLflow's number; ``status`` its ``ModelVersion.status``; ``aliases`` the aliases pointing at it;
    ``tags`` its tags.
    """

    version: int
    status: str
    aliases: tuple[str, ...] = ()
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)


def select_versions(policy: Policy, versions: list[SourceVersion]) -> list[int]:
    """The version numbers to convert, newest first (rules: module docstring)."""
    ready = [v for v in versions if v.status == MLFLOW_READY and v.version >= policy.min_version]
    sel = policy.selector
    if sel.alias is not None:
        chosen = [v for v in ready if sel.alias in v.aliases]
    elif sel.tags is not None:
        tags = sel.tags
        chosen = [v for v in ready if all(v.tags.get(k) == val for k, val in tags.items())]
    else:
        chosen = ready
    return sorted({v.version for v in chosen}, reverse=True)


def conversion_name(policy_name: str, version: int) -> str:
    """The ``ModelConversion`` of ``version`` (at most 63 characters, so that its Job's name stays readable):
    ``<policy>-v<version>``; a long policy name is cut and gets 6 hex of its sha256, so two long names sharing
    a prefix still differ. Example: ``("traffic", 7) -> "traffic-v7"``."""
    suffix = f"-v{int(version)}"
    base = jobs._dns_part(policy_name)
    if len(base) + len(suffix) > 63:
        base = base[: 63 - len(suffix) - 7].rstrip("-") + "-" + hashlib.sha256(policy_name.encode()).hexdigest()[:6]
    return base + suffix


def conversion_spec(template: Mapping[str, Any], model: str, version: int,
                    default_tracking_uri: str = "") -> dict[str, Any]:
    """The template with ``source.uri = models:/<model>/<version>`` (a pinned version: the alias may move on)
    and, when the template has a registry without a tracking URI, the operator's default one."""
    out = copy.deepcopy(dict(template))
    source = dict(out.get("source") or {})
    source["uri"] = f"models:/{model}/{int(version)}"
    out["source"] = source
    if isinstance(out.get("registry"), dict) and not out["registry"].get("trackingUri") and default_tracking_uri:
        out["registry"]["trackingUri"] = default_tracking_uri
    return out


def build_conversion(policy: Policy, version: int, default_tracking_uri: str = "") -> dict[str, Any]:
    """The ``ModelConversion`` manifest of one selected version: named by :func:`conversion_name`, owned by the
    policy (controller reference: the garbage collector deletes it with the policy), labelled with the policy,
    the source model and the version."""
    return {
        "apiVersion": jobs.API_VERSION,
        "kind": jobs.KIND,
        "metadata": {
            "name": conversion_name(policy.name, version),
            "namespace": policy.namespace,
            "labels": {
                jobs.LABEL_MANAGED_BY: jobs.MANAGER,
                LABEL_POLICY: jobs.label_value(policy.name),
                LABEL_SOURCE_MODEL: _label_safe(policy.model),
                LABEL_SOURCE_VERSION: str(int(version)),
            },
            "annotations": {ANNOTATION_SOURCE_MODEL: policy.model},
            "ownerReferences": [{
                "apiVersion": jobs.API_VERSION, "kind": KIND, "name": policy.name, "uid": policy.uid,
                "controller": True, "blockOwnerDeletion": True,
            }],
        },
        "spec": conversion_spec(policy.template, policy.model, version, default_tracking_uri),
    }


def _label_safe(text: str) -> str:
    """A label value for a registered-model name (``[A-Za-z0-9_.-]``, alphanumeric at both ends, <= 63)."""
    value = jobs.label_value(re.sub(r"[^A-Za-z0-9_.-]+", "_", text)).strip("_.-")
    return value or "model"


@dataclasses.dataclass(frozen=True)
class HistoryEntry:
    """One conversion of a policy: its name, source version, phase (``Pending`` until it has one) and creation
    time (RFC 3339, as the API server wrote it)."""

    name: str
    version: int
    phase: str
    created: str

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED_PHASES

    def to_status(self) -> dict[str, Any]:
        return {"name": self.name, "version": str(self.version), "outcome": self.phase, "created": self.created}


def history(conversions: list[dict[str, Any]]) -> list[HistoryEntry]:
    """A policy's conversions (its labelled ``ModelConversion`` objects), newest version first."""
    out = []
    for obj in conversions:
        meta = obj.get("metadata") or {}
        try:
            version = int((meta.get("labels") or {}).get(LABEL_SOURCE_VERSION) or 0)
        except ValueError:
            continue
        phase = str((obj.get("status") or {}).get("phase") or "Pending")
        out.append(HistoryEntry(str(meta.get("name")), version, phase, str(meta.get("creationTimestamp") or "")))
    return sorted(out, key=lambda e: e.version, reverse=True)


def expired(entries: list[HistoryEntry], limit: int) -> list[HistoryEntry]:
    """Finished conversions beyond the newest ``limit`` finished ones (to delete; running ones stay)."""
    finished = [e for e in entries if e.finished]
    return finished[limit:]


# --------------------------------------------------------------------------------------------- registry (I/O)

class RegistryUnreachable(Exception):
    """The MLflow server did not answer (or answered 5xx); ``str(err)`` is one line, credentials redacted."""


class ModelNotFound(Exception):
    """The source registered model does not exist on the MLflow server."""


#: Seconds one MLflow request may take, and no client-side retries: the policy loop has its own backoff.
REQUEST_TIMEOUT_S = 10


def read_registry(tracking_uri: str, model: str) -> list[SourceVersion]:
    """Every version of ``model`` with its status, aliases and tags (blocking: run it in a thread).

    Raises:
        ModelNotFound: MLflow answers ``RESOURCE_DOES_NOT_EXIST`` for the registered model.
        RegistryUnreachable: no connection, a time-out or any other registry failure (the message says which).
    """
    import os

    # MLflow's REST client retries a refused connection for minutes by default (MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    # backoff factor 2); the policy loop backs off itself and reports the outage on the policy meanwhile
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(REQUEST_TIMEOUT_S))
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ..store.tracking import describe_error
    from ..store.uris import redact

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        registered = client.get_registered_model(model)
        aliases: dict[int, list[str]] = {}
        for alias, version in (getattr(registered, "aliases", None) or {}).items():
            aliases.setdefault(int(version), []).append(alias)
        found = client.search_model_versions(f"name = '{_quote(model)}'")
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            raise ModelNotFound(f"registered model {model!r} does not exist on {redact(tracking_uri)}") from None
        raise _unreachable(describe_error(err), tracking_uri) from None
    except Exception as err:  # noqa: BLE001 - requests/urllib3 failures: reported on the policy, retried later
        raise _unreachable(describe_error(err, with_type=True), tracking_uri) from None
    return [SourceVersion(int(mv.version), str(mv.status), tuple(sorted(aliases.get(int(mv.version), []))),
                          dict(mv.tags or {})) for mv in found]


def _unreachable(text: str, tracking_uri: str) -> RegistryUnreachable:
    from ..store.uris import redact

    text = text.replace("--tracking-uri", "spec.source.trackingUri")
    return RegistryUnreachable(redact(f"{text}; server {tracking_uri}"))


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")
