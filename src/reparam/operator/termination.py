"""Why a converter container ended when the converter itself could not say: one table, pure functions.

The converter writes a JSON summary to its termination message (``reparam.summary``) for every end it
controls (exit codes of :mod:`reparam.exitcodes`). When the container is killed from outside, Kubernetes is the
only witness: the container's ``state.terminated`` carries ``exitCode`` (128 + signal number for a signal, see
the Kubernetes docs "Debug Running Pods" / POSIX shell convention) and a ``reason``. The kubelet reports the
kernel OOM killer as ``reason: OOMKilled``, but not always: a cgroup-v2 kill of the whole pod, a kill by the
container runtime or a node-pressure kill can leave ``reason: Error`` with exit code 137 (SIGKILL). Both are
mapped here to a reason and a message a user can act on; the operator uses nothing else for them.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

from .. import exitcodes
from .. import summary as summary_mod

#: Signal number -> name, for exit codes 128 + n (Linux numbering).
SIGNALS = {1: "SIGHUP", 2: "SIGINT", 6: "SIGABRT", 7: "SIGBUS", 9: "SIGKILL", 11: "SIGSEGV", 15: "SIGTERM"}


@dataclasses.dataclass(frozen=True)
class Explanation:
    """A container end in words: ``reason`` (CamelCase, for ``lastFailure.reason`` and conditions) and ``message``."""

    reason: str
    message: str


def _limit_text(memory_limit: str | None) -> str:
    return f"the memory limit ({memory_limit})" if memory_limit else "the memory limit (none set on the container)"


def explain(exit_code: int | None, k8s_reason: str, memory_limit: str | None) -> Explanation | None:
    """Explain a container termination the converter did not describe itself; ``None`` when there is nothing to add.

    Args:
        exit_code: ``state.terminated.exitCode`` of the ``convert`` container.
        k8s_reason: ``state.terminated.reason`` (``OOMKilled``, ``Error``, ``Completed`` ...).
        memory_limit: ``resources.limits.memory`` of the container as written in the pod spec (``"8Gi"``), if any.

    Rules: ``OOMKilled`` -> ``OutOfMemory``; exit 137 (SIGKILL) with any other reason -> ``Killed``, "most often
    the memory limit"; exit 143 (SIGTERM) -> ``Terminated`` (eviction, preemption or deletion); another signal
    -> ``Crashed`` naming it.
    """
    limit = _limit_text(memory_limit)
    if k8s_reason == "OOMKilled":
        return Explanation("OutOfMemory", f"the converter was killed for exceeding {limit} (OOMKilled); raise "
                                          "spec.job.resources.limits.memory")
    if exit_code is None or exit_code <= 128:
        return None
    signal = SIGNALS.get(exit_code - 128, f"signal {exit_code - 128}")
    if exit_code == 137:
        return Explanation("Killed", f"the converter was killed by SIGKILL (exit 137), most often {limit}; raise "
                                     "spec.job.resources.limits.memory, or see the pod's events for another killer")
    if exit_code == 143:
        return Explanation("Terminated", "the converter was stopped by SIGTERM (exit 143): the pod was evicted, "
                                         "preempted or deleted; the Job retries it")
    return Explanation("Crashed", f"the converter crashed with {signal} (exit {exit_code}); see the pod's log")


# ------------------------------------------------------------------------------------------------------------------
# What Kubernetes reports about a converter pod or Job, as a reason a user can act on (issue #12).
#
# Sources: Pod API (``status.containerStatuses[].state.waiting.reason`` set by the kubelet: ``ErrImagePull``,
# ``ImagePullBackOff``, ``InvalidImageName``; ``status.conditions`` ``PodScheduled=False`` with reason
# ``Unschedulable`` set by the scheduler; ``DisruptionTarget=True`` set before a pod is preempted
# (``PreemptionByScheduler``), evicted (``EvictionByEvictionAPI``), removed by the taint manager
# (``DeletionByTaintManager``) or terminated by the kubelet (``TerminationByKubelet``), see "Pod disruption
# conditions" in the Kubernetes docs) and Job API (``Failed`` condition reasons ``DeadlineExceeded``,
# ``BackoffLimitExceeded``, ``PodFailurePolicy``).

#: Every ``status.lastFailure.reason`` the operator writes, with what the user can do about it. It is also the
#: bounded set of ``reason`` label values of the failure metrics (:func:`metric_reason`).
FAILURE_REASONS: dict[str, str] = {
    "OutOfMemory": "raise spec.job.resources.limits.memory",
    "Killed": "raise spec.job.resources.limits.memory, or see the pod's events for another killer",
    "Terminated": "none: the Job retries it",
    "Crashed": "see the pod's log",
    "ImagePullFailed": "check spec.job.image and spec.job.imagePullSecrets",
    "Unschedulable": "free or add capacity, or change spec.job.resources, nodeSelector or tolerations",
    "DeadlineExceeded": "raise spec.job.activeDeadlineSeconds",
    "BackoffLimitExceeded": "see lastFailure and the pod logs; raise spec.job.backoffLimit for flaky sources",
    "Disrupted": "none: the pod was preempted or evicted and the Job retries it without counting it",
    "InvalidSpec": "fix the spec as the message says",
    "SummaryMissing": "see the pod's log",
    **{reason: "see lastFailure.message" for reason in exitcodes.REASONS.values()},
}
#: The metric label value of a reason outside :data:`FAILURE_REASONS`.
OTHER = "Other"

#: Container waiting reasons of an image that cannot be pulled (kubelet, images package).
IMAGE_PULL_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")


def metric_reason(reason: str | None) -> str:
    """``reason`` as a label value of the failure metrics: itself when it is in :data:`FAILURE_REASONS`, else
    :data:`OTHER` (so a reason copied from the cluster can never grow the series count)."""
    return reason if reason in FAILURE_REASONS else OTHER


@dataclasses.dataclass(frozen=True)
class PodProblem:
    """What the operator does about one pod.

    ``action``: ``"fail"`` (the conversion fails now and its Job is deleted), ``"retried"`` (the Job retries the
    pod; the status says why) or ``"wait"`` (not scheduled yet; look again at ``due``). ``key`` identifies the
    observation (pod uid + kind), so one is reported once.
    """

    action: str
    reason: str
    message: str
    key: str
    due: datetime.datetime | None = None
    exit_code: int | None = None


def parse_time(text: str | None) -> datetime.datetime | None:
    """Parse an RFC 3339 time from the API (``None`` when absent or malformed)."""
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _condition(pod: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def pod_problem(pod: dict[str, Any], container: str, now: datetime.datetime,
                schedule_timeout: float) -> PodProblem | None:
    """The problem of a converter pod, or ``None`` when it is fine (or finished well).

    Args:
        pod: the pod as the API returns it.
        container: the converter container's name.
        now: the current time (UTC).
        schedule_timeout: seconds a pod may stay unschedulable (``spec.job.scheduleTimeoutSeconds``).

    Order: a disruption (retried), an image that cannot be pulled (fail), unschedulable for longer than the
    timeout (fail; ``wait`` with ``due`` before), a failed container (retried: the Job decides whether it retries;
    the operator's final word comes from the Job's ``Failed`` condition).
    """
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    uid = str(meta.get("uid") or meta.get("name") or "")
    name = meta.get("name", "")
    disruption = _condition(pod, "DisruptionTarget")
    if disruption and disruption.get("status") == "True":
        why = disruption.get("reason") or "Disrupted"
        detail = f": {disruption['message']}" if disruption.get("message") else ""
        return PodProblem("retried", "Disrupted", f"pod {name} was disrupted ({why}{detail}); the Job retries it "
                          "without counting it against spec.job.backoffLimit", f"{uid}/disrupted")
    statuses = status.get("containerStatuses") or []
    for cs in statuses:
        if cs.get("name") != container:
            continue
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in IMAGE_PULL_REASONS:
            image = cs.get("image") or _image(pod, container) or "?"
            detail = f": {waiting['message']}" if waiting.get("message") else ""
            return PodProblem("fail", "ImagePullFailed",
                              f"the image {image} cannot be pulled ({waiting['reason']}{detail}); "
                              f"{FAILURE_REASONS['ImagePullFailed']}", f"{uid}/image")
    scheduled = _condition(pod, "PodScheduled")
    if (status.get("phase") in (None, "Pending") and scheduled and scheduled.get("status") == "False"
            and scheduled.get("reason") == "Unschedulable"):
        since = parse_time(scheduled.get("lastTransitionTime")) or now
        due = since + datetime.timedelta(seconds=schedule_timeout)
        said = scheduled.get("message") or "the scheduler gave no message"
        if now >= due:
            return PodProblem("fail", "Unschedulable",
                              f"no node could run pod {name} for {schedule_timeout:g} s "
                              f"(spec.job.scheduleTimeoutSeconds): {said}; {FAILURE_REASONS['Unschedulable']}",
                              f"{uid}/unschedulable")
        return PodProblem("wait", "Unschedulable", f"waiting for a node: {said}", f"{uid}/unschedulable", due=due)
    if status.get("phase") == "Failed":
        for cs in statuses:
            term = (cs.get("state") or {}).get("terminated")
            if cs.get("name") != container or not term or term.get("exitCode") in (None, 0):
                continue
            code = int(term["exitCode"])
            if code in exitcodes.PERMANENT:
                return None  # the podFailurePolicy fails the Job at once: its Failed condition tells the rest
            summ = summary_mod.parse(term.get("message")) or {}
            said = None if summ else explain(code, term.get("reason") or "", _memory_limit(pod, container))
            reason = str(summ.get("reason") or (said.reason if said else exitcodes.REASONS.get(code, "Crashed")))
            message = str(summ.get("message") or (said.message if said else f"the converter exited with code {code}"))
            return PodProblem("retried", reason, f"pod {name} failed: {message}", f"{uid}/failed", exit_code=code)
    return None


def _image(pod: dict[str, Any], container: str) -> str | None:
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == container:
            return str(c["image"]) if c.get("image") else None
    return None


def _memory_limit(pod: dict[str, Any], container: str) -> str | None:
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == container:
            limit = ((c.get("resources") or {}).get("limits") or {}).get("memory")
            return str(limit) if limit is not None else None
    return None


def job_failure(reason: str, message: str, job_spec: dict[str, Any], failed_pods: int) -> Explanation | None:
    """Explain a Job's ``Failed`` condition (Job API reasons), ``None`` for reasons with nothing to add.

    ``job_spec`` is the Job's ``spec`` (``activeDeadlineSeconds``, ``backoffLimit``); ``failed_pods`` its
    ``status.failed``.
    """
    if reason == "DeadlineExceeded":
        limit = job_spec.get("activeDeadlineSeconds")
        return Explanation("DeadlineExceeded",
                           f"the Job ran longer than spec.job.activeDeadlineSeconds ({limit} s) and was stopped; "
                           f"{FAILURE_REASONS['DeadlineExceeded']}, or see why the conversion is slow")
    if reason == "BackoffLimitExceeded":
        return Explanation("BackoffLimitExceeded",
                           f"the converter failed {failed_pods} times, more than spec.job.backoffLimit "
                           f"({job_spec.get('backoffLimit')}); {FAILURE_REASONS['BackoffLimitExceeded']}")
    return None
