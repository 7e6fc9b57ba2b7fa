"""kopf glue: registers the handlers and adapts them to :class:`.reconciler.Reconciler`.

Importing this module registers, in kopf's default registry:

* start-up: settings (annotation storage: a structural schema would prune kopf's
  ``status.kopf``), login, queue seeding, the ``/metrics`` server;
* ``ModelConversion`` create / update of ``spec`` / resume -> ``reconcile``;
* ``ModelConversion`` DELETED events -> free the slot (no finalizer: the Job goes
  with its owner through the garbage collector);
* events of Jobs labelled ``app.kubernetes.io/managed-by=reparam-operator``;
* events of pods with that label (the Job copies it from its template): image pulls,
  scheduling, disruptions and failed attempts while the Job runs.

Each handler is timed and counted in :mod:`.metrics` by handler and result.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import kopf

from . import jobs, metrics as metrics_mod
from . import settings as settings_mod
from .kube import KubeClient
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
    if cfg.metrics_port:
        _state["metrics_server"] = m.serve(cfg.metrics_host, cfg.metrics_port)
        logger.info("metrics on http://%s:%d/metrics", cfg.metrics_host, cfg.metrics_port)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    rec = _state.pop("reconciler", None)
    if rec is not None:
        await rec.close()
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


def _plain(body: kopf.Body) -> dict[str, Any]:
    """kopf's read-only body view as a plain dict."""
    return {k: v for k, v in dict(body).items()}
