"""kopf glue: registers the handlers and adapts them to :class:`.reconciler.Reconciler`.

Importing this module registers, in kopf's default registry:

* start-up: settings (annotation storage: a structural schema would prune kopf's
  ``status.kopf``), login, queue seeding, the ``/metrics`` server;
* ``ModelConversion`` create / update of ``spec`` / resume -> ``reconcile``;
* ``ModelConversion`` DELETED events -> free the slot (no finalizer: the Job goes
  with its owner through the garbage collector);
* events of Jobs labelled ``app.kubernetes.io/managed-by=reparam-operator``;
* events of pods with that label (the Job copies it from its template): image pulls,
  scheduling, disruptions and failed attempts while the Job runs;
* ``ModelConversionPolicy``: one daemon per policy (:class:`.policy_runner.PolicyRunner`), woken by a
  change of its spec, of one of its conversions' phase, or by an MLflow webhook delivered to
  ``POST /webhooks/mlflow`` (:mod:`.webhooks`, on its own port when ``--webhook-port`` is set).

Each handler is timed and counted in :mod:`.metrics` by handler and result.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import kopf

from . import jobs, metrics as metrics_mod, policy as policy_mod, webhooks
from . import settings as settings_mod
from .kube import KubeClient
from .policy_runner import PolicyRunner
from .reconciler import Reconciler

logger = logging.getLogger("reparam.operator")

_configured: settings_mod.Settings | None = None
_state: dict[str, Any] = {}


def configure(cfg: settings_mod.Settings) -> None:
    """Use ``cfg`` instead of the environment at the next start-up (``reparam operator``)."""
    global _configured
    _configured = cfg


def reconciler() -> Reconciler:
    """The running operator's reconciler (after start-up)."""
    rec = _state.get("reconciler")
    if not isinstance(rec, Reconciler):
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return rec


def instrumented(handler: str) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Count and time a handler in the metrics (result: ok, temporary_error, permanent_error, error)."""

    def decorate(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            m = metrics_mod.get()
            start = time.perf_counter()
            result = "ok"
            try:
                return await fn(*args, **kwargs)
            except kopf.TemporaryError:
                result = "temporary_error"
                raise
            except kopf.PermanentError:
                result = "permanent_error"
                raise
            except Exception:
                result = "error"
                raise
            finally:
                m.reconcile_seconds.labels(handler=handler).observe(time.perf_counter() - start)
                m.reconcile_total.labels(handler=handler, result=result).inc()
                if result != "ok":
                    m.reconcile_errors_total.labels(handler=handler, result=result).inc()

        return wrapper

    return decorate


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    cfg = _configured or settings_mod.from_env()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=jobs.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=jobs.GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    settings.scanning.disabled = not cfg.scanning
    settings.networking.error_backoffs = [1, 2, 5, 10, 30]
    client = KubeClient.login(settings)
    m = metrics_mod.get()
    rec = Reconciler(client, cfg, m)
    await rec.seed()
    _state["reconciler"] = rec
    tracking = str(((cfg.job_defaults or {}).get("registry") or {}).get("trackingUri") or "")
    policies = PolicyRunner(KubeClient.login(settings), m, tracking)
    _state["policies"] = policies
    if cfg.webhook_port:
        app = webhooks.app(cfg.webhook_secret, cfg.webhook_tolerance, m, policies.trigger)
        _state["webhook_server"] = await webhooks.serve(cfg.webhook_host, cfg.webhook_port, app)
        logger.info("MLflow webhooks on http://%s:%d%s", cfg.webhook_host, cfg.webhook_port, webhooks.PATH)
    if cfg.metrics_port:
        _state["metrics_server"] = m.serve(cfg.metrics_host, cfg.metrics_port)
        logger.info("metrics on http://%s:%d/metrics", cfg.metrics_host, cfg.metrics_port)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    rec = _state.pop("reconciler", None)
    if rec is not None:
        await rec.close()
    web = _state.pop("webhook_server", None)
    if web is not None:
        await web.cleanup()
    policies = _state.pop("policies", None)
    if isinstance(policies, PolicyRunner):
        await policies.client.close()
    served = _state.pop("metrics_server", None)
    if served is not None:
        server, thread = served
        server.shutdown()
        server.server_close()


@kopf.on.probe(id="slots")
def slots(**_: Any) -> dict[str, int]:
    rec = _state.get("reconciler")
    return {"running": rec.queue.running, "waiting": rec.queue.waiting} if rec else {}


@kopf.on.resume(jobs.GROUP, jobs.VERSION, jobs.PLURAL, id="reconcile")
@kopf.on.create(jobs.GROUP, jobs.VERSION, jobs.PLURAL, id="reconcile")
@kopf.on.update(jobs.GROUP, jobs.VERSION, jobs.PLURAL, field="spec", id="reconcile")
@instrumented("reconcile")
async def reconcile(body: kopf.Body, **_: Any) -> None:
    await reconciler().reconcile(_plain(body))


def _is_deletion(type: str | None, **_: Any) -> bool:
    return type == "DELETED"


@kopf.on.event(jobs.GROUP, jobs.VERSION, jobs.PLURAL, id="resource-deleted", when=_is_deletion)
@instrumented("resource_deleted")
async def resource_deleted(body: kopf.Body, **_: Any) -> None:
    await reconciler().resource_gone(_plain(body))


@kopf.on.event("batch", "v1", "jobs", labels={jobs.LABEL_MANAGED_BY: jobs.MANAGER}, id="job-events")
@instrumented("job_event")
async def job_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    await reconciler().job_event(type or "ADDED", _plain(body))


@kopf.on.event("", "v1", "pods", labels={jobs.LABEL_MANAGED_BY: jobs.MANAGER}, id="pod-events")
@instrumented("pod_event")
async def pod_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    await reconciler().pod_event(type or "ADDED", _plain(body))


def policies() -> PolicyRunner:
    """The running operator's policy loops (after start-up)."""
    runner = _state.get("policies")
    if not isinstance(runner, PolicyRunner):
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return runner


@kopf.daemon(jobs.GROUP, jobs.VERSION, policy_mod.PLURAL, id="policy", cancellation_timeout=5.0)
async def policy_daemon(body: kopf.Body, stopped: kopf.DaemonStopped, **_: Any) -> None:
    while "policies" not in _state and not stopped:
        await stopped.wait(0.2)
    if not stopped:
        await policies().run(body, stopped)


@kopf.on.update(jobs.GROUP, jobs.VERSION, policy_mod.PLURAL, field="spec", id="policy-spec")
async def policy_spec_changed(meta: kopf.Meta, **_: Any) -> None:
    policies().refresh(str(meta.get("namespace")), str(meta.get("name")), reason="spec")


# any event of a policy's conversion (created, phase changed, deleted) refreshes the policy's history; kopf's
# field handlers would not see status changes (its diff base leaves status out)
@kopf.on.event(jobs.GROUP, jobs.VERSION, jobs.PLURAL, id="policy-history",
               labels={policy_mod.LABEL_POLICY: kopf.PRESENT})
async def policy_conversion_changed(meta: kopf.Meta, **_: Any) -> None:
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == policy_mod.KIND:
            policies().refresh(str(meta.get("namespace")), str(ref.get("name")))


def _plain(body: kopf.Body) -> dict[str, Any]:
    """kopf's read-only body view as a plain dict."""
    return {k: v for k, v in dict(body).items()}
