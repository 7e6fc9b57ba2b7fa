"""Prometheus metrics of the operator, served on its own ``/metrics``.

kopf exports no metrics, so the handlers record them here (prometheus-client).
Label values are small fixed sets (handler names, results, outcomes): never a
resource name, namespace or UID, so the series count stays bounded whatever the
number of ModelConversions.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import REGISTRY as DEFAULT_REGISTRY

from ..summary import OUTCOMES
from . import termination

#: Conversion durations: 30 s to 8 h.
DURATION_BUCKETS = (30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800)
#: Queue time of a Job (created to running).
QUEUE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)
#: Reconcile handler time.
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

RESULTS = ("ok", "temporary_error", "permanent_error", "error")


#: Results of an MLflow webhook delivery (:mod:`.webhooks`).
WEBHOOK_RESULTS = ("accepted", "bad_signature", "stale", "replay", "ignored", "malformed")


class Metrics:
    """All operator metrics on one registry (the process default unless given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry if registry is not None else DEFAULT_REGISTRY
        self.registry = reg
        self.reconcile_total = Counter(
            "reparam_operator_reconcile_total", "Handler invocations by handler and result.",
            ["handler", "result"], registry=reg)
        self.reconcile_errors_total = Counter(
            "reparam_operator_reconcile_errors_total",
            "Handler invocations that raised, by handler and kind (temporary_error, permanent_error, error).",
            ["handler", "result"], registry=reg)
        self.reconcile_seconds = Histogram(
            "reparam_operator_reconcile_duration_seconds", "Handler run time.",
            ["handler"], buckets=RECONCILE_BUCKETS, registry=reg)
        self.conversions_total = Counter(
            "reparam_conversions_total", "Finished conversions by outcome.", ["outcome"], registry=reg)
        self.in_progress = Gauge(
            "reparam_conversions_in_progress", "Conversions holding a slot (Job created, not finished).",
            registry=reg)
        self.queued = Gauge(
            "reparam_conversions_queued", "Conversions waiting for a slot.", registry=reg)
        self.duration = Histogram(
            "reparam_conversion_duration_seconds", "Job creation to Job end, by outcome.",
            ["outcome"], buckets=DURATION_BUCKETS, registry=reg)
        self.queue_seconds = Histogram(
            "reparam_job_queue_duration_seconds", "Job creation until its pod runs.",
            buckets=QUEUE_BUCKETS, registry=reg)
        self.registry_ops = Counter(
            "reparam_registry_operations_total",
            "Model registry operations done by the conversions (register, promote) by result.",
            ["operation", "result"], registry=reg)
        self.last_success = Gauge(
            "reparam_last_success_timestamp_seconds", "Unix time of the last succeeded conversion (0: none yet).",
            registry=reg)
        self.promotions_total = Counter(
            "reparam_promotions_total", "Gated promotions (spec.promotion) by decision.", ["decision"], registry=reg)
        self.last_map = Gauge(
            "reparam_last_map50_95", "mAP@0.5:0.95 of the last succeeded evaluated conversion, by registered model.",
            ["model"], registry=reg)
        # the baseline for "no success for a long time" alerts while no conversion has succeeded yet
        self.started = Gauge(
            "reparam_operator_start_time_seconds", "Unix time this operator process started.", registry=reg)
        self.started.set_to_current_time()
        self.failures_total = Counter(
            "reparam_conversion_failures_total",
            "Failed conversions by status.lastFailure.reason (the bounded set of termination.FAILURE_REASONS, "
            "else Other).", ["reason"], registry=reg)
        self.retries_total = Counter(
            "reparam_conversion_retries_total",
            "Converter pods that failed or were disrupted while the Job retried them, by reason.",
            ["reason"], registry=reg)
        # ModelConversionPolicy (issue #13)
        self.policy_conversions_total = Counter(
            "reparam_policy_conversions_total",
            "ModelConversions a policy created, by what triggered the registry read (webhook, poll).",
            ["trigger"], registry=reg)
        self.policy_poll_errors_total = Counter(
            "reparam_policy_poll_errors_total", "Registry reads of a policy that failed (registry unreachable).",
            registry=reg)
        self.policy_registry_requests_total = Counter(
            "reparam_policy_registry_reads_total", "Registry reads made by policies (two MLflow requests each).",
            registry=reg)
        self.webhook_deliveries_total = Counter(
            "reparam_webhook_deliveries_total",
            "MLflow webhook deliveries by result (accepted, bad_signature, stale, replay, ignored, malformed).",
            ["result"], registry=reg)
        for trigger in ("webhook", "poll"):
            self.policy_conversions_total.labels(trigger=trigger)
        for result in WEBHOOK_RESULTS:
            self.webhook_deliveries_total.labels(result=result)
        for reason in (*termination.FAILURE_REASONS, termination.OTHER):
            self.failures_total.labels(reason=reason)
            self.retries_total.labels(reason=reason)
        for outcome in OUTCOMES:
            self.conversions_total.labels(outcome=outcome)
        for decision in ("promoted", "held"):
            self.promotions_total.labels(decision=decision)
        for op in ("register", "promote"):
            for result in ("success", "failure"):
                self.registry_ops.labels(operation=op, result=result)

    def record_result(self, result: dict[str, Any]) -> None:
        """Count a gated promotion and keep the last mAP of a succeeded conversion's ``status.result``."""
        decision = (result.get("promotion") or {}).get("decision")
        if decision in ("promoted", "held"):
            self.promotions_total.labels(decision=decision).inc()
        m = (result.get("metrics") or {}).get("map50_95")
        if isinstance(m, (int, float)) and not isinstance(m, bool):
            self.last_map.labels(model=str(result.get("modelName") or "")).set(float(m))

    def failure(self, reason: str | None) -> None:
        """Count a failed conversion by its ``lastFailure.reason`` (bounded by :func:`.termination.metric_reason`)."""
        self.failures_total.labels(reason=termination.metric_reason(reason)).inc()

    def retry(self, reason: str | None) -> None:
        """Count a pod the Job retries, by reason (bounded as :meth:`failure`)."""
        self.retries_total.labels(reason=termination.metric_reason(reason)).inc()

    def set_slots(self, running: int, waiting: int) -> None:
        """Update the in-progress and queued gauges from the slot queue."""
        self.in_progress.set(running)
        self.queued.set(waiting)

    def serve(self, host: str, port: int) -> tuple[Any, threading.Thread]:  # pragma: no cover - trivial wrapper
        """Start the ``/metrics`` HTTP server in a thread; returns ``(server, thread)``."""
        return start_http_server(port, addr=host, registry=self.registry)


_METRICS: Metrics | None = None


def get() -> Metrics:
    """The process-wide :class:`Metrics` (created on first use)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = Metrics()
    return _METRICS
