"""Operator settings: environment variables, overridden by command-line flags.

One frozen :class:`Settings` value is built at start-up (``reparam operator`` or
``kopf run -m reparam.operator``) and read by the handlers; nothing else keeps
configuration.

Environment (flag):

=============================  ======================  ==========================================
REPARAM_NAMESPACES             ``--namespace/-n``       comma-separated namespaces (globs allowed)
REPARAM_CLUSTERWIDE            ``--all-namespaces/-A``  "true": watch every namespace
REPARAM_IMAGE                  ``--image``              default converter image of the Jobs
REPARAM_MAX_CONCURRENT         ``--max-concurrent``     conversions running at once, operator-wide
REPARAM_METRICS_PORT           ``--metrics-port``       port of ``/metrics``; 0 turns it off
REPARAM_METRICS_HOST           ``--metrics-host``       address ``/metrics`` binds to
REPARAM_LIVENESS_PORT          ``--liveness-port``      port of kopf's ``/healthz``; 0 turns it off
REPARAM_RETRY_DELAY            ``--retry-delay``        seconds before a transient error is retried
REPARAM_SCANNING               ``--no-scanning``        "false": no CRD/namespace scanning
REPARAM_PEERING                ``--peering NAME``       kopf peering (default: standalone)
REPARAM_JOB_DEFAULTS           ``--job-defaults JSON``  defaults for spec.job / spec.registry.trackingUri
REPARAM_SCHEDULE_TIMEOUT       ``--schedule-timeout``   seconds a pod may stay unschedulable (default 900)
REPARAM_WEBHOOK_PORT           ``--webhook-port``       port of ``POST /webhooks/mlflow``; 0 (default) off
REPARAM_WEBHOOK_HOST           ``--webhook-host``       address the webhook endpoint binds to
REPARAM_WEBHOOK_SECRET         (environment only)       HMAC secret of MLflow's webhook signatures
REPARAM_WEBHOOK_TOLERANCE      ``--webhook-tolerance``  seconds a delivery's timestamp may be old (300)
=============================  ======================  ==========================================
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import InvalidInputError, brief, count_of
from .jobs import DEFAULT_SCHEDULE_TIMEOUT

#: Image the Jobs run when neither the resource nor the operator names one.
DEFAULT_IMAGE = "ghcr.io/reparam/reparam:0.1.0"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the operator can be told at start-up.

    ``namespaces`` empty and ``clusterwide`` false means: the namespace from the
    environment is required (kopf refuses to guess).
    """

    namespaces: tuple[str, ...] = ()
    clusterwide: bool = False
    image: str = DEFAULT_IMAGE
    max_concurrent: int = 4
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9090
    liveness_port: int = 8080
    retry_delay: float = 10.0
    scanning: bool = True
    peering: str | None = None
    verbose: bool = False
    job_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: Seconds a converter pod may stay unschedulable before the conversion fails (``spec.job.scheduleTimeoutSeconds``
    #: overrides it per resource); the default queue of Kueue is ``job_defaults["job"]["queueName"]``.
    schedule_timeout: float = float(DEFAULT_SCHEDULE_TIMEOUT)
    #: ``POST /webhooks/mlflow`` (issue #13): address and port (0: off), the HMAC secret MLflow signs with
    #: (only from the environment, ``REPARAM_WEBHOOK_SECRET``: a secret does not belong on a command line) and
    #: how old (seconds) a delivery's timestamp may be.
    webhook_host: str = "0.0.0.0"
    webhook_port: int = 0
    webhook_secret: str = dataclasses.field(default="", repr=False)
    webhook_tolerance: float = 300.0

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise InvalidInputError(
                f"max concurrent conversions must be at least 1, got {self.max_concurrent}"
            )
        if self.webhook_port and not self.webhook_secret:
            raise InvalidInputError("the webhook port is set but REPARAM_WEBHOOK_SECRET is empty: set the secret "
                                    "MLflow signs deliveries with (from a Kubernetes Secret), or --webhook-port 0")
        if self.webhook_tolerance <= 0:
            raise InvalidInputError(f"webhook tolerance must be positive seconds, got {self.webhook_tolerance}")
        for port in (self.metrics_port, self.liveness_port, self.webhook_port):
            if not 0 <= port <= 65535:
                raise InvalidInputError(f"port must be within 0..65535, got {port}")
        if self.schedule_timeout <= 0:
            raise InvalidInputError(f"schedule timeout must be positive seconds, got {self.schedule_timeout}")
        if self.retry_delay <= 0:
            raise InvalidInputError(f"retry delay must be positive seconds, got {self.retry_delay}")


def _bool(text: str, name: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise InvalidInputError(f"{name} must be true or false, got {brief(text)}")


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidInputError(f"{name} must be an integer, got {brief(text)}") from None


def _float(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidInputError(f"{name} must be a number of seconds, got {brief(text)}") from None


def parse_job_defaults(text: str, name: str = "REPARAM_JOB_DEFAULTS") -> dict[str, Any]:
    """Parse the Job defaults JSON (``{"job": {...}, "registry": {"trackingUri": ...}}``).

    Raises InvalidInputError for bad JSON, a non-object, or keys the operator does not default.
    """
    import json

    from .jobs import DEFAULTABLE_JOB_FIELDS

    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise InvalidInputError(f"{name} is not valid JSON: {brief(exc, 100)}") from None
    if not isinstance(data, dict) or set(data) - {"job", "registry"}:
        raise InvalidInputError(f"{name} must be a JSON object with keys 'job' and/or 'registry'")
    bad = sorted(set(data.get("job") or {}) - set(DEFAULTABLE_JOB_FIELDS))
    if bad:
        raise InvalidInputError(f"{name}: {count_of(bad, 'job fields')} cannot be defaulted; allowed: "
                                f"{', '.join(DEFAULTABLE_JOB_FIELDS)}")
    bad = sorted(set(data.get("registry") or {}) - {"trackingUri"})
    if bad:
        raise InvalidInputError(f"{name}: registry fields {bad} cannot be defaulted; allowed: ['trackingUri']")
    return data


def _str(text: str, _name: str) -> str:
    return text


#: ``REPARAM_*`` variable -> (the :class:`Settings` field it sets, its parser ``(text, variable name) -> value``).
_ENV_FIELDS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "REPARAM_CLUSTERWIDE": ("clusterwide", _bool),
    "REPARAM_IMAGE": ("image", _str),
    "REPARAM_MAX_CONCURRENT": ("max_concurrent", _int),
    "REPARAM_METRICS_HOST": ("metrics_host", _str),
    "REPARAM_METRICS_PORT": ("metrics_port", _int),
    "REPARAM_LIVENESS_PORT": ("liveness_port", _int),
    "REPARAM_RETRY_DELAY": ("retry_delay", _float),
    "REPARAM_SCANNING": ("scanning", _bool),
    "REPARAM_PEERING": ("peering", _str),
    "REPARAM_SCHEDULE_TIMEOUT": ("schedule_timeout", _float),
    "REPARAM_WEBHOOK_HOST": ("webhook_host", _str),
    "REPARAM_WEBHOOK_PORT": ("webhook_port", _int),
    "REPARAM_WEBHOOK_SECRET": ("webhook_secret", _str),
    "REPARAM_WEBHOOK_TOLERANCE": ("webhook_tolerance", _float),
}


def from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``REPARAM_*`` environment variables (see module docstring).

    Raises :class:`reparam.errors.InvalidInputError` naming the bad variable.
    """
    env = os.environ if environ is None else environ
    kw: dict[str, object] = {}
    if env.get("REPARAM_NAMESPACES"):
        kw["namespaces"] = tuple(n.strip() for n in env["REPARAM_NAMESPACES"].split(",") if n.strip())
    for var, (field_name, parse) in _ENV_FIELDS.items():
        # a flag counts when set at all (an empty value is an error); other variables only when not empty
        if (var in env) if parse is _bool else bool(env.get(var)):
            kw[field_name] = parse(env[var], var)
    if env.get("REPARAM_JOB_DEFAULTS"):
        kw["job_defaults"] = parse_job_defaults(env["REPARAM_JOB_DEFAULTS"])
    return Settings(**kw)  # type: ignore[arg-type]  # kw holds each field's own type (parsed above); mypy sees object


def parser() -> argparse.ArgumentParser:
    """The ``reparam operator`` argument parser (flags override the environment)."""
    p = argparse.ArgumentParser(prog="reparam operator", description="Run the ModelConversion operator.")
    p.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NS",
                   help="namespace to watch (repeatable, globs allowed)")
    p.add_argument("-A", "--all-namespaces", action="store_true", dest="clusterwide", default=None,
                   help="watch every namespace")
    p.add_argument("--image", help="default converter image of the Jobs")
    p.add_argument("--max-concurrent", type=int, help="conversions running at once (operator-wide)")
    p.add_argument("--metrics-host", help="address /metrics binds to")
    p.add_argument("--metrics-port", type=int, help="port of /metrics (0: off)")
    p.add_argument("--liveness-port", type=int, help="port of /healthz (0: off)")
    p.add_argument("--retry-delay", type=float, help="seconds before a transient error is retried")
    p.add_argument("--no-scanning", action="store_false", dest="scanning", default=None,
                   help="do not scan for CRDs/namespaces (the CRD must exist at start-up)")
    p.add_argument("--peering", help="kopf peering name (default: standalone)")
    p.add_argument("--job-defaults", metavar="JSON",
                   help='defaults for empty spec.job fields and spec.registry.trackingUri, e.g. '
                        '\'{"job": {"nodeSelector": {"gpu": "h100"}}}\'')
    p.add_argument("--schedule-timeout", type=float,
                   help="seconds a converter pod may stay unschedulable before the conversion fails (default 900)")
    p.add_argument("--webhook-host", help="address POST /webhooks/mlflow binds to")
    p.add_argument("--webhook-port", type=int,
                   help="port of POST /webhooks/mlflow (0: off; the secret comes from REPARAM_WEBHOOK_SECRET)")
    p.add_argument("--webhook-tolerance", type=float,
                   help="seconds a webhook delivery's timestamp may be old (default 300)")
    p.add_argument("-v", "--verbose", action="store_true", default=None)
    return p


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment, then overridden by the flags in ``argv``."""
    base = from_env(environ)
    args = parser().parse_args(list(argv) if argv is not None else None)
    changes = {k: v for k, v in vars(args).items() if v is not None}
    if "namespaces" in changes:
        changes["namespaces"] = tuple(changes["namespaces"])
    if "job_defaults" in changes:
        changes["job_defaults"] = parse_job_defaults(changes["job_defaults"], "--job-defaults")
    return dataclasses.replace(base, **changes)
