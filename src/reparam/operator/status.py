"""Status transitions of a ``ModelConversion``: pure functions over plain dicts.

This module is the one place that decides ``status.phase`` and the conditions.
Every function takes the current ``status`` (never mutated) and returns the new
one. Conditions follow ``metav1.Condition`` (type, status, reason, message,
lastTransitionTime, observedGeneration; ``lastTransitionTime`` changes only when
``status`` flips), see the Kubernetes API conventions, "Typical status properties".

Phases::

    Queued ──slot──▶ Pending ──pod running──▶ Running ──Job Complete──▶ Succeeded
       (no Job yet)   (Job created)      │             └─Job Failed────▶ Failed
    Queued/WaitingForAdmission           └─pod problem (image, unschedulable)─▶ Failed
       (Kueue: Job created suspended, until Kueue admits it)

A terminal phase comes only from the Job's ``Complete``/``Failed`` conditions
(plus the converter's summary from the pod's termination message), never from
"a pod exists". A new ``metadata.generation`` starts over; an older generation's
observations are ignored. The ``result`` of an older generation (with its
``generation``) and its ``Registered``/``Promoted`` conditions stay until the new
generation ends: the registry keeps serving that version during the run, as a
Deployment's status keeps reporting the old ReplicaSet during a rollout.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any, cast

from .. import exitcodes
from .. import summary as summary_mod
from . import jobs, termination

PHASES = ("Pending", "Queued", "Running", "Succeeded", "Failed")
TERMINAL = ("Succeeded", "Failed")
CONDITION_TYPES = ("JobCreated", "Converted", "Validated", "Registered", "Promoted", "Succeeded")



def timestamp(now: datetime.datetime) -> str:
    """RFC 3339 UTC with seconds, as the Kubernetes API writes times."""
    return now.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


parse_time = termination.parse_time  # one parser of the API's times (termination sits below this module)


def get_condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    """The condition of ``type_`` (selected by type, never by list position)."""
    for cond in status.get("conditions") or []:
        if cond.get("type") == type_:
            return cast(dict[str, Any], cond)
    return None


def set_condition(
    conditions: list[dict[str, Any]] | None,
    type_: str,
    status: str,
    reason: str,
    message: str,
    now: datetime.datetime,
    generation: int,
) -> list[dict[str, Any]]:
    """A new condition list with ``type_`` set; ``lastTransitionTime`` is kept unless
    ``status`` changed. Order follows :data:`CONDITION_TYPES`."""
    if status not in ("True", "False", "Unknown"):
        raise ValueError(f"condition status must be True, False or Unknown, got {status!r}")
    old = {c.get("type"): c for c in conditions or []}
    prev = old.get(type_)
    ltt = prev["lastTransitionTime"] if prev and prev.get("status") == status and prev.get(
        "lastTransitionTime") else timestamp(now)
    old[type_] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:4000],
        "lastTransitionTime": ltt,
        "observedGeneration": int(generation),
    }
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(old.values(), key=lambda c: (order.get(c["type"], len(order)), c["type"]))


def is_terminal(status: dict[str, Any], generation: int) -> bool:
    """Whether ``status`` is final for ``generation`` (nothing more to do for it)."""
    return status.get("phase") in TERMINAL and status.get("observedGeneration") == generation


#: Conditions of an older generation kept while a new one runs: they describe what the registry serves now.
KEPT_CONDITIONS = ("Registered", "Promoted")


def _start(status: dict[str, Any], generation: int) -> dict[str, Any]:
    """A copy of ``status``; a new generation drops the older generation's job and failure, and keeps its
    ``result`` (tagged with its ``generation``) and :data:`KEPT_CONDITIONS` until it ends (see module doc)."""
    new = {k: v for k, v in status.items()}
    if new.get("observedGeneration") != generation:
        for key in ("job", "lastFailure"):
            new.pop(key, None)
        if new.get("result") and "generation" not in new["result"] and new.get("observedGeneration"):
            new["result"] = {**new["result"], "generation": int(new["observedGeneration"])}
        new["conditions"] = [c for c in new.get("conditions") or [] if c.get("type") in KEPT_CONDITIONS]
    new["observedGeneration"] = int(generation)
    return new


def queued(status: dict[str, Any], generation: int, position: int, running: int, limit: int,
           now: datetime.datetime) -> dict[str, Any]:
    """Waiting for a slot: ``position`` (1-based) among waiting resources,
    ``running`` of ``limit`` slots taken."""
    if is_terminal(status, generation):
        return status
    new = _start(status, generation)
    new["phase"] = "Queued"
    msg = f"waiting for a free slot: {running} of {limit} conversions running, position {position} in the queue"
    conds = set_condition(new.get("conditions"), "JobCreated", "False", "ConcurrencyLimit", msg, now, generation)
    new["conditions"] = set_condition(conds, "Succeeded", "Unknown", "Queued", msg, now, generation)
    return new


def job_created(status: dict[str, Any], generation: int, job_name: str, now: datetime.datetime) -> dict[str, Any]:
    """The Job of ``generation`` exists (created or adopted); phase Pending unless
    already further along for this generation."""
    if is_terminal(status, generation):
        return status
    new = _start(status, generation)
    if new.get("phase") != "Running" or (new.get("job") or {}).get("name") != job_name:
        new["phase"] = "Pending"
    job = dict(new.get("job") or {})
    job["name"] = job_name
    job.setdefault("attempts", 0)
    new["job"] = job
    conds = set_condition(new.get("conditions"), "JobCreated", "True", "Created", f"Job {job_name} created",
                          now, generation)
    if new["phase"] == "Pending":
        conds = set_condition(conds, "Succeeded", "Unknown", "Pending", f"Job {job_name} is starting",
                              now, generation)
    new["conditions"] = conds
    return new


def invalid(status: dict[str, Any], generation: int, message: str, now: datetime.datetime) -> dict[str, Any]:
    """The spec of ``generation`` cannot be converted: Failed at once, no Job (an older result is dropped)."""
    new = _end(_start(status, generation), generation)
    new["phase"] = "Failed"
    new["lastFailure"] = {"reason": "InvalidSpec", "message": message[:4000], "time": timestamp(now)}
    conds = set_condition(new.get("conditions"), "JobCreated", "False", "InvalidSpec", message, now, generation)
    new["conditions"] = set_condition(conds, "Succeeded", "False", "InvalidSpec", message, now, generation)
    return new


@dataclasses.dataclass(frozen=True)
class JobView:
    """What the operator needs from a Job's status (batch/v1 JobStatus).

    ``state``: "suspended" | "pending" | "running" | "complete" | "failed". Only the
    ``Complete`` and ``Failed`` conditions with status "True" are terminal
    (``SuccessCriteriaMet`` and ``FailureTarget`` precede them and are not);
    "suspended" is a Job with ``spec.suspend`` (Kueue has not admitted it yet).
    """

    state: str
    reason: str = ""
    message: str = ""
    attempts: int = 0
    start_time: str | None = None
    completion_time: str | None = None


def read_job(job: dict[str, Any]) -> JobView:
    """Summarise a Job's ``status`` into a :class:`JobView`."""
    st = job.get("status") or {}
    attempts = int(st.get("failed") or 0) + int(st.get("succeeded") or 0) + int(st.get("active") or 0)
    start, end = st.get("startTime"), st.get("completionTime")

    def view(state: str, reason: str = "", message: str = "") -> JobView:
        return JobView(state, reason, message, attempts, start, end)
    for cond in st.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return view("complete", cond.get("reason") or "Completed", cond.get("message") or "")
        if cond.get("type") == "Failed":
            return view("failed", cond.get("reason") or "Failed", cond.get("message") or "")
    if int(st.get("ready") or 0) > 0 or (int(st.get("active") or 0) > 0 and st.get("ready") is None):
        return view("running")
    if (job.get("spec") or {}).get("suspend") is True:
        return view("suspended")
    return view("pending")


@dataclasses.dataclass(frozen=True)
class PodResult:
    """The converter container's end, from the newest terminated pod of the Job."""

    summary: dict[str, Any] | None = None
    exit_code: int | None = None
    reason: str = ""
    running: bool = False
    memory_limit: str | None = None


def read_pods(pods: list[dict[str, Any]]) -> PodResult:
    """The converter's termination message and exit code from the Job's pods.

    The newest pod (by ``creationTimestamp``) whose ``convert`` container has
    terminated wins; ``running`` tells whether any pod's container runs now.
    The message is parsed with :func:`reparam.summary.parse` (``None`` when it is a
    log tail from ``FallbackToLogsOnError`` rather than a summary).
    """
    running = False
    best: tuple[tuple[str, str], dict[str, Any], str | None] | None = None
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if cs.get("name") != jobs.CONTAINER:
                continue
            state = cs.get("state") or {}
            if "running" in state:
                running = True
            term = state.get("terminated")
            if term is not None:
                created = (pod.get("metadata") or {}).get("creationTimestamp") or ""
                key = (created, term.get("finishedAt") or "")
                if best is None or key >= best[0]:
                    best = (key, term, _memory_limit(pod))
    if best is None:
        return PodResult(running=running)
    _key, term, limit = best
    code = term.get("exitCode")
    return PodResult(
        summary=summary_mod.parse(term.get("message")),
        exit_code=int(code) if code is not None else None,
        reason=term.get("reason") or "",
        running=running,
        memory_limit=limit,
    )


def _memory_limit(pod: dict[str, Any]) -> str | None:
    """``resources.limits.memory`` of the pod's ``convert`` container, as written (``"8Gi"``)."""
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == jobs.CONTAINER:
            limit = ((c.get("resources") or {}).get("limits") or {}).get("memory")
            return str(limit) if limit is not None else None
    return None


def observe(status: dict[str, Any], body_spec: dict[str, Any], generation: int, job: dict[str, Any],
            pods: list[dict[str, Any]], now: datetime.datetime) -> dict[str, Any]:
    """The status after looking at the Job of ``generation`` and its pods.

    Ignored (status returned as is) when the Job belongs to another generation or
    the status is already terminal for this generation.
    """
    if jobs.generation_of(job) not in (None, generation) or is_terminal(status, generation):
        return status
    view = read_job(job)
    pod = read_pods(pods)
    name = (job.get("metadata") or {}).get("name", "")
    new = job_created(status, generation, name, now)
    jinfo = {"name": name, "attempts": view.attempts}
    if view.start_time:
        jinfo["startTime"] = view.start_time
    if view.completion_time:
        jinfo["completionTime"] = view.completion_time
    new["job"] = jinfo
    if view.state == "suspended":
        queue = ((job.get("metadata") or {}).get("labels") or {}).get(jobs.LABEL_KUEUE_QUEUE, "")
        new["phase"] = "Queued"
        new["conditions"] = set_condition(new["conditions"], "Succeeded", "Unknown", "WaitingForAdmission",
                                          f"Job {name} waits for Kueue to admit it (queue {queue})", now,
                                          generation)
        return new
    if view.state == "pending" and not pod.running:
        return new
    if view.state in ("pending", "running"):
        new["phase"] = "Running"
        new["conditions"] = set_condition(new["conditions"], "Succeeded", "Unknown", "Running",
                                          f"Job {name} is running", now, generation)
        return new
    if view.state == "complete":
        return _succeeded(new, body_spec, generation, view, pod, now)
    return _failed(new, body_spec, generation, view, pod, now, job)


def _result(summ: dict[str, Any], generation: int) -> dict[str, Any]:
    """``status.result`` from a summary; ``version`` as a string (MLflow's API type), ``generation`` the
    resource generation that produced it."""
    result = summary_mod.result_fields(summ)
    if "version" in result:
        result["version"] = str(result["version"])
    if result:
        result["generation"] = int(generation)
    return result


def _end(new: dict[str, Any], generation: int) -> dict[str, Any]:
    """``new`` at the end of ``generation``: an older generation's result and conditions are no longer in force."""
    if (new.get("result") or {}).get("generation") not in (None, generation):
        new.pop("result", None)
    new["conditions"] = [c for c in new.get("conditions") or [] if c.get("observedGeneration") == generation]
    return new


def _succeeded(new: dict[str, Any], spec: dict[str, Any], gen: int, view: JobView, pod: PodResult,
               now: datetime.datetime) -> dict[str, Any]:
    summ = pod.summary or {}
    new = _end(new, gen)
    conds = new["conditions"]
    new["phase"] = "Succeeded"
    if not summ:
        msg = "the Job completed but the converter's summary was not readable from the pod"
        for t in ("Converted", "Validated", "Registered", "Promoted"):
            conds = set_condition(conds, t, "Unknown", "SummaryMissing", msg, now, gen)
        new["conditions"] = set_condition(conds, "Succeeded", "True", "Completed", msg, now, gen)
        return new
    result = _result(summ, gen)
    new["result"] = result
    conds = set_condition(conds, "Converted", "True", "Converted", _params_message(result), now, gen)
    diff = result.get("maxAbsDiff")
    conds = set_condition(conds, "Validated", "True", "WithinTolerance",
                          f"max |diff| {diff:.3g}" if isinstance(diff, (int, float)) else "validated", now, gen)
    conds = _registry_conditions(conds, spec, result, gen, now, failed_reason=None, message="")
    new["conditions"] = set_condition(
        conds, "Succeeded", "True", "Succeeded",
        f"registered {result['modelName']} version {result['version']}" if result.get("version")
        else "converted and validated", now, gen)
    new.pop("lastFailure", None)
    return new


def _params_message(result: dict[str, Any]) -> str:
    before, after = result.get("paramsBefore"), result.get("paramsAfter")
    if before is not None and after is not None:
        return f"{before} parameters -> {after} after reparameterization"
    return "reparameterized"


def _registry_conditions(conds: list[dict[str, Any]], spec: dict[str, Any], result: dict[str, Any], gen: int,
                         now: datetime.datetime, failed_reason: str | None, message: str) -> list[dict[str, Any]]:
    reg = spec.get("registry") or None
    wanted = list((reg or {}).get("aliases") or [])
    if reg is None:
        conds = set_condition(conds, "Registered", "False", "NotRequested", "spec.registry is not set", now, gen)
        return set_condition(conds, "Promoted", "False", "NotRequested", "spec.registry is not set", now, gen)
    if result.get("version"):
        conds = set_condition(conds, "Registered", "True", "Registered",
                              f"{result.get('modelName')} version {result['version']}", now, gen)
    else:
        conds = set_condition(conds, "Registered", "False", failed_reason or "NotRegistered",
                              message or "no model version was registered", now, gen)
    if not wanted:
        return set_condition(conds, "Promoted", "False", "NotRequested", "spec.registry.aliases is empty",
                             now, gen)
    got = set(result.get("aliases") or [])
    missing = [a for a in wanted if a not in got]
    if result.get("version") and not missing:
        return set_condition(conds, "Promoted", "True", "AliasesSet",
                             f"{', '.join(wanted)} -> version {result['version']}", now, gen)
    return set_condition(conds, "Promoted", "False", failed_reason or "AliasesMissing",
                         message or f"aliases not set: {', '.join(missing)}", now, gen)


def _failed(new: dict[str, Any], spec: dict[str, Any], gen: int, view: JobView, pod: PodResult,
            now: datetime.datetime, job: dict[str, Any]) -> dict[str, Any]:
    """Rules, first match wins: the converter's own summary; a Job deadline (its kill is a consequence);
    a kill explained by :func:`.termination.explain` (OOM first); the exit code's reason; the Job's reason
    explained by :func:`.termination.job_failure`; the Job's reason as is."""
    summ = pod.summary or {}
    new = _end(new, gen)
    code = summ.get("exitCode", pod.exit_code)
    by_job = termination.job_failure(view.reason, view.message, job.get("spec") or {},
                                     int((job.get("status") or {}).get("failed") or 0))
    deadline = by_job if by_job is not None and by_job.reason == "DeadlineExceeded" else None
    backoff = by_job if by_job is not None and deadline is None else None
    killed = None if summ else (deadline or termination.explain(pod.exit_code, pod.reason, pod.memory_limit))
    reason = (summ.get("reason") or (killed.reason if killed else None)
              or (exitcodes.REASONS.get(int(code)) if code is not None else None)
              or (backoff.reason if backoff else None) or pod.reason or view.reason or "Failed")
    message = summ.get("message") or (killed.message if killed else None) or (
        backoff.message if backoff and reason == backoff.reason else None) or view.message or (
        f"container exited with code {code}" if code is not None else f"Job failed: {view.reason}")
    new["phase"] = "Failed"
    result = _result(summ, gen) if summ else {}
    if result:
        new["result"] = result
    failure: dict[str, Any] = {"reason": reason, "message": message[:4000], "time": timestamp(now)}
    if code is not None:
        failure["exitCode"] = int(code)
    new["lastFailure"] = failure
    conds = new["conditions"]
    validation_failed = summ.get("outcome") == "validation_failed" or code == exitcodes.VALIDATION_FAILED
    if validation_failed:
        conds = set_condition(conds, "Converted", "True", "Converted", _params_message(result), now, gen)
        conds = set_condition(conds, "Validated", "False", "ValidationFailed", message, now, gen)
        conds = set_condition(conds, "Registered", "False", "NotAttempted", "validation failed", now, gen)
        conds = set_condition(conds, "Promoted", "False", "NotAttempted", "validation failed", now, gen)
    elif code == exitcodes.REGISTRY_ERROR:
        conds = set_condition(conds, "Converted", "True", "Converted", _params_message(result), now, gen)
        conds = set_condition(conds, "Validated", "True", "WithinTolerance", "validated", now, gen)
        conds = _registry_conditions(conds, spec, result, gen, now, failed_reason=reason, message=message)
    else:
        conds = set_condition(conds, "Converted", "False", reason, message, now, gen)
        for t in ("Validated", "Registered", "Promoted"):
            conds = set_condition(conds, t, "False", "NotAttempted", "conversion did not finish", now, gen)
    new["conditions"] = set_condition(conds, "Succeeded", "False", reason, message, now, gen)
    return new


def outcome(status: dict[str, Any]) -> str | None:
    """Metrics outcome of a terminal status: "succeeded", "validation_failed", "failed"
    (``None`` while not terminal)."""
    phase = status.get("phase")
    if phase == "Succeeded":
        return "succeeded"
    if phase == "Failed":
        validated = get_condition(status, "Validated")
        if validated and validated.get("status") == "False" and validated.get("reason") == "ValidationFailed":
            return "validation_failed"
        return "failed"
    return None


def pod_problem(status: dict[str, Any], generation: int, job_name: str, problem: termination.PodProblem,
                now: datetime.datetime) -> dict[str, Any]:
    """The status after the operator saw ``problem`` on a pod of the Job of ``generation``.

    ``fail``: phase Failed with ``lastFailure`` and the conditions of a conversion that did not finish (the
    caller deletes the Job). ``retried``: ``lastFailure`` with ``retried: true``, the phase unchanged, the
    ``Succeeded`` condition saying the Job retries and why. ``wait``: the ``Succeeded`` condition says what the
    scheduler said. Terminal statuses and other generations are returned as they are.
    """
    if is_terminal(status, generation) or (status.get("observedGeneration") not in (None, generation)):
        return status
    if (status.get("job") or {}).get("name") not in (None, job_name):
        return status  # a pod of another Job (a replaced one)
    new = job_created(status, generation, job_name, now)
    failure: dict[str, Any] = {"reason": problem.reason, "message": problem.message[:4000], "time": timestamp(now)}
    if problem.exit_code is not None:
        failure["exitCode"] = problem.exit_code
    if problem.action == "fail":
        new = _end(new, generation)
        new["phase"] = "Failed"
        new["lastFailure"] = failure
        conds = set_condition(new["conditions"], "Converted", "False", problem.reason, problem.message, now,
                              generation)
        for t in ("Validated", "Registered", "Promoted"):
            conds = set_condition(conds, t, "False", "NotAttempted", "conversion did not start", now, generation)
        new["conditions"] = set_condition(conds, "Succeeded", "False", problem.reason, problem.message, now,
                                          generation)
        return new
    if problem.action == "retried":
        old = new.get("lastFailure") or {}
        if old.get("reason") == problem.reason and old.get("message") == problem.message[:4000]:
            return new  # seen already: keep its time
        new["lastFailure"] = {**failure, "retried": True}
        new["conditions"] = set_condition(new["conditions"], "Succeeded", "Unknown", "Retrying",
                                          f"{problem.message}", now, generation)
        return new
    new["conditions"] = set_condition(new["conditions"], "Succeeded", "Unknown", problem.reason, problem.message,
                                      now, generation)
    return new
