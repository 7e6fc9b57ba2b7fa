"""The pure parts of issue #12: pod problems, Job failure reasons, the Job's cluster fields, Event limits."""

from __future__ import annotations

import datetime

import pytest

from reparam import summary
from reparam.operator import events, jobs, status as st, termination

T0 = datetime.datetime(2025, 3, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)
MC = {"metadata": {"name": "traffic-v7", "namespace": "vision", "uid": "mc-uid", "generation": 1},
      "spec": {"source": {"uri": "models:/traffic-dual/7"}}}


def pod(phase: str = "Pending", conditions: list | None = None, state: dict | None = None,
        memory: str | None = "8Gi") -> dict:
    limits = {"memory": memory} if memory else {}
    p = {"metadata": {"name": "traffic-v7-g1-abc-x1", "uid": "pod-uid"},
         "spec": {"containers": [{"name": "convert", "image": "ghcr.io/reparam/reparam:0.1.0",
                                  "resources": {"limits": limits}}]},
         "status": {"phase": phase, "conditions": conditions or []}}
    if state is not None:
        p["status"]["containerStatuses"] = [{"name": "convert", "image": "ghcr.io/reparam/reparam:0.1.0",
                                             "state": state}]
    return p


def problem(p: dict, now: datetime.datetime = T0, timeout: float = 900) -> termination.PodProblem | None:
    return termination.pod_problem(p, "convert", now, timeout)


def test_image_pull_reasons_fail_with_the_image_name() -> None:
    for reason in ("ErrImagePull", "ImagePullBackOff"):
        got = problem(pod(state={"waiting": {"reason": reason, "message": "not found"}}))
        assert got is not None and (got.action, got.reason) == ("fail", "ImagePullFailed")
        assert "ghcr.io/reparam/reparam:0.1.0" in got.message and reason in got.message
    assert problem(pod(state={"waiting": {"reason": "ContainerCreating"}})) is None


def test_unschedulable_waits_until_the_timeout_then_fails_with_the_scheduler_message() -> None:
    cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/5 nodes are available: 5 Insufficient nvidia.com/gpu.",
            "lastTransitionTime": "2025-03-01T12:00:00Z"}
    early = problem(pod(conditions=[cond]), T0 + datetime.timedelta(seconds=899))
    assert early is not None and early.action == "wait" and early.due == T0 + datetime.timedelta(seconds=900)
    late = problem(pod(conditions=[cond]), T0 + datetime.timedelta(seconds=900))
    assert late is not None and (late.action, late.reason) == ("fail", "Unschedulable")
    assert "0/5 nodes are available: 5 Insufficient nvidia.com/gpu." in late.message and "900 s" in late.message
    # a pod the scheduler placed is not unschedulable
    assert problem(pod(conditions=[{**cond, "status": "True", "reason": ""}])) is None


def test_disruption_is_retried_and_says_why() -> None:
    got = problem(pod("Failed", [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                                  "message": "preempting"}],
                      {"terminated": {"exitCode": 143, "reason": "Error"}}))
    assert got is not None and (got.action, got.reason) == ("retried", "Disrupted")
    assert "PreemptionByScheduler" in got.message and "spec.job.backoffLimit" in got.message


def test_failed_attempts_are_retried_with_their_reason() -> None:
    oom = problem(pod("Failed", state={"terminated": {"exitCode": 137, "reason": "OOMKilled"}}, memory="6Gi"))
    assert oom is not None and (oom.action, oom.reason, oom.exit_code) == ("retried", "OutOfMemory", 137)
    assert "(6Gi)" in oom.message
    said = summary.dumps({"outcome": "failed", "exitCode": 4, "reason": "SourceError",
                          "message": "s3://b/k: 403 Forbidden"})
    src = problem(pod("Failed", state={"terminated": {"exitCode": 4, "reason": "Error", "message": said}}))
    assert src is not None and (src.reason, src.message) == ("SourceError", "pod traffic-v7-g1-abc-x1 failed: "
                                                                           "s3://b/k: 403 Forbidden")
    # a permanent exit code fails the Job through its podFailurePolicy: nothing to add here
    assert problem(pod("Failed", state={"terminated": {"exitCode": 3, "reason": "Error"}})) is None
    assert problem(pod("Succeeded", state={"terminated": {"exitCode": 0, "reason": "Completed"}})) is None


def test_job_failure_reasons() -> None:
    spec = {"activeDeadlineSeconds": 3600, "backoffLimit": 2}
    d = termination.job_failure("DeadlineExceeded", "", spec, 1)
    assert d is not None and d.reason == "DeadlineExceeded" and "(3600 s)" in d.message
    b = termination.job_failure("BackoffLimitExceeded", "", spec, 3)
    assert b is not None and "failed 3 times" in b.message and "(2)" in b.message
    assert termination.job_failure("PodFailurePolicy", "", spec, 1) is None


def test_the_deadline_wins_over_the_kill_it_caused_and_oom_over_the_backoff() -> None:
    def failed(reason: str, term: dict) -> dict:
        job = {"metadata": {"name": "traffic-v7-g1-abcdef", "labels": {jobs.LABEL_GENERATION: "1"}},
               "spec": {"activeDeadlineSeconds": 60, "backoffLimit": 1},
               "status": {"failed": 2, "conditions": [{"type": "Failed", "status": "True", "reason": reason}]}}
        p = pod("Failed", state={"terminated": term}, memory="6Gi")
        p["metadata"]["creationTimestamp"] = "2025-03-01T12:00:01Z"
        return st.observe({}, MC["spec"], 1, job, [p], T0)
    s = failed("DeadlineExceeded", {"exitCode": 143, "reason": "Error"})
    assert s["lastFailure"]["reason"] == "DeadlineExceeded" and "(60 s)" in s["lastFailure"]["message"]
    s = failed("BackoffLimitExceeded", {"exitCode": 137, "reason": "OOMKilled"})
    assert s["lastFailure"]["reason"] == "OutOfMemory" and "(6Gi)" in s["lastFailure"]["message"]
    s = failed("BackoffLimitExceeded", {"exitCode": 139, "reason": "Error"})
    assert s["lastFailure"]["reason"] == "Crashed"


def test_metric_reasons_are_a_bounded_set() -> None:
    assert termination.metric_reason("OutOfMemory") == "OutOfMemory"
    assert termination.metric_reason("SomethingTheClusterSaid") == termination.OTHER
    assert termination.metric_reason(None) == termination.OTHER
    for reason in ("OutOfMemory", "ImagePullFailed", "Unschedulable", "DeadlineExceeded", "BackoffLimitExceeded",
                   "Disrupted", "InvalidSpec", "ValidationFailed", "SourceError"):
        assert reason in termination.FAILURE_REASONS


def test_status_of_pod_problems() -> None:
    created = st.job_created({}, 1, "traffic-v7-g1-abcdef", T0)
    fail = termination.PodProblem("fail", "ImagePullFailed", "the image x cannot be pulled", "k")
    s = st.pod_problem(created, 1, "traffic-v7-g1-abcdef", fail, T0)
    assert s["phase"] == "Failed" and s["lastFailure"]["reason"] == "ImagePullFailed"
    assert st.get_condition(s, "Succeeded")["reason"] == "ImagePullFailed"
    assert st.pod_problem(s, 1, "traffic-v7-g1-abcdef", fail, T0) is s  # terminal stays
    retried = termination.PodProblem("retried", "Disrupted", "pod p was disrupted", "k2")
    r = st.pod_problem(created, 1, "traffic-v7-g1-abcdef", retried, T0)
    assert r["phase"] == "Pending" and r["lastFailure"] == {"reason": "Disrupted", "message": "pod p was disrupted",
                                                            "time": "2025-03-01T12:00:00Z", "retried": True}
    assert st.get_condition(r, "Succeeded")["reason"] == "Retrying"
    # another generation's Job changes nothing
    assert st.pod_problem(created, 2, "traffic-v7-g1-abcdef", fail, T0) is created
    other = st.pod_problem(created, 1, "traffic-v7-g9-abcdef", fail, T0)
    assert other is created


def test_kueue_queue_suspends_the_job_and_priority_passes_through() -> None:
    body = {**MC, "spec": {**MC["spec"], "job": {"queueName": "gpu", "priorityClassName": "batch-low"}}}
    job = jobs.build_job(body, "img")
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][jobs.LABEL_KUEUE_QUEUE] == "gpu"
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "batch-low"
    assert jobs.kueue_managed(job)
    plain = jobs.build_job(MC, "img")
    assert "suspend" not in plain["spec"] and not jobs.kueue_managed(plain)
    # the operator's default queue (Helm jobDefaults) applies when the resource names none
    dflt = jobs.build_job(MC, "img", {"job": {"queueName": "team-a"}})
    assert dflt["metadata"]["labels"][jobs.LABEL_KUEUE_QUEUE] == "team-a" and dflt["spec"]["suspend"] is True
    with pytest.raises(jobs.InvalidSpec, match="spec.job.queueName"):
        jobs.build_job({**MC, "spec": {**MC["spec"], "job": {"queueName": "Not_A_Queue"}}}, "img")
    with pytest.raises(jobs.InvalidSpec, match="scheduleTimeoutSeconds"):
        jobs.validate_spec({**MC["spec"], "job": {"scheduleTimeoutSeconds": 0}})
    assert jobs.schedule_timeout({"scheduleTimeoutSeconds": 30}, 900) == 30
    assert jobs.schedule_timeout({}, 900) == 900


@pytest.mark.parametrize("resources, expected", [
    ({"limits": {"cpu": "2"}}, "2"),
    ({"limits": {"cpu": "1500m"}}, "2"),           # rounded up, as the converter's cgroup rule
    ({"limits": {"cpu": "500m"}}, "1"),            # never zero
    ({"requests": {"cpu": 4}}, "4"),               # no limit: the request
    ({"limits": {"cpu": "3"}, "requests": {"cpu": "1"}}, "3"),
    ({"limits": {"memory": "8Gi"}}, None),         # no CPU named: torch's own default
])
def test_threads_follow_the_container_cpus(resources: dict, expected: str | None) -> None:
    job = jobs.build_job({**MC, "spec": {**MC["spec"], "job": {"resources": resources}}}, "img")
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    for var in jobs.THREAD_ENV:
        assert env.get(var) == expected


def test_threads_set_in_the_spec_win() -> None:
    spec = {**MC["spec"], "job": {"resources": {"limits": {"cpu": "8"}},
                                  "env": [{"name": "OMP_NUM_THREADS", "value": "1"}]}}
    env = jobs.build_job({**MC, "spec": spec}, "img")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e["value"] for e in env if e["name"] == "OMP_NUM_THREADS"] == ["1"]
    assert [e["value"] for e in env if e["name"] == "MKL_NUM_THREADS"] == ["8"]


def test_event_limiter_dedupes_and_rate_limits() -> None:
    lim = events.EventLimiter(burst=3, refill_seconds=60, dedupe_seconds=600)
    assert lim.allow("u", "JobCreated", "created Job j", T0)
    assert not lim.allow("u", "JobCreated", "created Job j", T0 + datetime.timedelta(seconds=5))  # duplicate
    assert lim.allow("u", "Started", "running", T0)
    assert lim.allow("u", "Retried", "a", T0)
    assert not lim.allow("u", "Retried", "b", T0)  # burst spent
    assert lim.allow("other", "Retried", "b", T0)  # per object
    assert lim.allow("u", "Retried", "b", T0 + datetime.timedelta(seconds=61))  # one token back
    assert lim.allow("u", "JobCreated", "created Job j", T0 + datetime.timedelta(seconds=3600))


def test_event_body_carries_no_credentials() -> None:
    ev = events.body(MC["metadata"], "Warning", "SourceError",
                     "cannot read https://user:hunter2@minio.local/b/k?X-Amz-Signature=abcdef123456 " + "x" * 2000,
                     T0)
    assert "hunter2" not in ev["message"] and "abcdef123456" not in ev["message"]
    assert len(ev["message"]) <= events.MAX_MESSAGE
    assert ev["involvedObject"] == {"apiVersion": "reparam.dev/v1alpha1", "kind": "ModelConversion",
                                    "name": "traffic-v7", "namespace": "vision", "uid": "mc-uid",
                                    "resourceVersion": None}
    assert ev["firstTimestamp"] == "2025-03-01T12:00:00Z" and ev["type"] == "Warning"


def test_operator_and_converter_extras_share_one_environment_without_torch_in_the_operator() -> None:
    """This venv holds the converter, operator and dev extras together (kubernetes_asyncio next to botocore's
    python-dateutil pin): pip finds no broken requirement, and importing the operator loads no torch."""
    import subprocess
    import sys

    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    probe = subprocess.run([sys.executable, "-c", "import sys, reparam.operator, kubernetes_asyncio; "
                            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx')))"],
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"
